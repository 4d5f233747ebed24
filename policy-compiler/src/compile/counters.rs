//! What each of our named counters counts, for the per-policy metrics: the kernel counts, the
//! agent reads the counters by name and labels them with this.
//!
//! - `cnt_<policy>_<in|eg>[_conn]`: packets (connections: their first packets, counted in the
//!   policy's `acc_` chain) a NetworkPolicy admitted in one direction (only packets of
//!   connections not established yet meet policy rules: a TCP SYN, a UDP flow's datagrams until the
//!   first reply; established ones are accepted before).
//! - `cnt_<group chain>[_conn]`: packets (connection attempts) dropped because no rule of the NetworkPolicies isolating a group
//!   of pods allowed them; every one of those policies is named (a drop isolated by two policies
//!   counts for both).
//! - `cnt_<audit chain>`: packets the NetworkPolicies in audit mode of a group of pods would have
//!   dropped (nothing was), named for those policies.
//! - `cnt_<cnp>_<in|eg>_<accept|deny|pass>`: what a ClusterNetworkPolicy's rules of one action
//!   matched.
//!
//! The counters of what is dropped before any policy (`names::FORGED_KINDS`: forged sources,
//! forged overlay packets, foreign related packets) are no policy's and not described here.

use super::Compiled;
use crate::model::{Action, Direction};
use crate::ruleset::names;
use std::collections::BTreeMap;

/// The verdict a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counted {
    Allow,
    Drop,
    /// A ClusterNetworkPolicy's Pass: handed to the next tier.
    Pass,
    /// What a NetworkPolicy in audit mode would have dropped (nothing was).
    WouldDrop,
}

impl Counted {
    pub fn label(self) -> &'static str {
        match self {
            Counted::Allow => "allow",
            Counted::Drop => "drop",
            Counted::Pass => "pass",
            Counted::WouldDrop => "would_drop",
        }
    }
}

/// What a counter's count is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    Packets,
    /// Connections: the first packet of each (its conntrack entry not confirmed yet). For drops,
    /// connection attempts: a dropped connection is never confirmed, so each retransmitted first
    /// packet is an attempt again.
    Connections,
}

/// One named counter of our table and what it counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCounter {
    /// The counter object's name.
    pub counter: String,
    pub direction: Direction,
    pub verdict: Counted,
    pub unit: Unit,
    /// The policies it counts for: `namespace/name` of NetworkPolicies, `cnp:<name>` of a
    /// ClusterNetworkPolicy.
    pub policies: Vec<String>,
}

impl Compiled {
    /// Every named counter of this node's ruleset, with what it counts.
    pub fn policy_counters(&self) -> Vec<PolicyCounter> {
        let exists = |n: &String| self.ruleset.counters.contains(n);
        let mut out = Vec::new();
        for (key, pol) in &self.policies {
            for dir in Direction::BOTH {
                for (counter, unit) in [
                    (names::policy_counter(key, dir), Unit::Packets),
                    (names::policy_conn_counter(key, dir), Unit::Connections),
                ] {
                    if pol.rules(dir).is_some() && exists(&counter) {
                        out.push(PolicyCounter {
                            counter,
                            direction: dir,
                            verdict: Counted::Allow,
                            unit,
                            policies: vec![key.clone()],
                        });
                    }
                }
            }
        }
        let mut groups: BTreeMap<String, PolicyCounter> = BTreeMap::new();
        for pod in self.pods.values() {
            for dir in Direction::BOTH {
                let keys = pod.policies(dir);
                if keys.is_empty() {
                    continue;
                }
                let group = pod.group_chain(dir);
                for (counter, unit) in [
                    (names::group_counter(&group), Unit::Packets),
                    (names::group_conn_counter(&group), Unit::Connections),
                ] {
                    if exists(&counter) && !groups.contains_key(&counter) {
                        groups.insert(
                            counter.clone(),
                            PolicyCounter {
                                counter,
                                direction: dir,
                                verdict: Counted::Drop,
                                unit,
                                policies: keys.to_vec(),
                            },
                        );
                    }
                }
            }
        }
        out.extend(groups.into_values());
        let mut audits: BTreeMap<String, PolicyCounter> = BTreeMap::new();
        for pod in self.pods.values() {
            for dir in Direction::BOTH {
                if pod.audited(dir).is_empty() {
                    continue;
                }
                let counter = names::group_counter(&names::audit_chain(pod.audited(dir), dir));
                if exists(&counter) && !audits.contains_key(&counter) {
                    audits.insert(
                        counter.clone(),
                        PolicyCounter {
                            counter,
                            direction: dir,
                            verdict: Counted::WouldDrop,
                            unit: Unit::Packets,
                            policies: pod.audited(dir).to_vec(),
                        },
                    );
                }
            }
        }
        out.extend(audits.into_values());
        for key in self.cluster_policies.keys() {
            for dir in Direction::BOTH {
                for (action, verdict) in [
                    (Action::Accept, Counted::Allow),
                    (Action::Deny, Counted::Drop),
                    (Action::Pass, Counted::Pass),
                ] {
                    let counter = names::cluster_counter(key, dir, action);
                    if exists(&counter) {
                        out.push(PolicyCounter {
                            counter,
                            direction: dir,
                            verdict,
                            unit: Unit::Packets,
                            policies: vec![key.clone()],
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::scenarios::Scenario;
    use serde_json::json;

    #[test]
    fn every_named_counter_of_the_ruleset_is_described_once() {
        let st = Scenario::new()
            .pod("a/x", "n1", &["10.244.1.2"], &[("app", "x")], &[])
            .pod("a/y", "n1", &["10.244.1.3"], &[("app", "y")], &[])
            .policy("a", "deny-all", json!({"podSelector": {}}))
            .policy("a", "allow-y", json!({"podSelector": {"matchLabels": {"app": "x"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]}))
            .cnp("guard", json!({"tier": "Admin", "priority": 1,
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]},
                            {"action": "Pass", "from": [{"namespaces": {}}]}]}))
            .pod("b/z", "n2", &["10.244.2.2"], &[], &[])
            .st;
        let c = compile(&st, "n1");
        let described = c.policy_counters();
        let names: std::collections::BTreeSet<&String> =
            described.iter().map(|p| &p.counter).collect();
        assert_eq!(names.len(), described.len(), "each counter once");
        assert_eq!(
            names,
            c.ruleset
                .counters
                .iter()
                .filter(|n| !names::FORGED_KINDS.iter().any(|(c, _)| c == n))
                .collect(),
            "every policy counter of the ruleset, and only those"
        );
        let find = |pol: &str, verdict: Counted| {
            described
                .iter()
                .filter(|p| p.verdict == verdict && p.policies.iter().any(|k| k == pol))
                .count()
        };
        // Packets and connections of each.
        assert_eq!(find("a/allow-y", Counted::Allow), 2);
        // x is isolated by both policies, y by deny-all alone: two groups.
        assert_eq!(find("a/deny-all", Counted::Drop), 4);
        assert_eq!(find("a/allow-y", Counted::Drop), 2);
        assert_eq!(find("cnp:guard", Counted::Drop), 1);
        assert_eq!(find("cnp:guard", Counted::Pass), 1);
    }
}
