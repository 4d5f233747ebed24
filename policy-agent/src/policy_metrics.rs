//! Per-policy counters in `/metrics`: `palisade_policy_packets_total{kind, namespace, policy,
//! direction, verdict}`, read from the kernel's named counters of our table at each scrape and
//! labelled with what the compiled model says each counts (`Compiled::policy_counters`, asked of
//! the engine, which owns the model). Only policies that have a counter now are shown: a deleted
//! policy's series disappear with its counters. A full replace of our table starts the counters
//! from zero again (a counter reset, which Prometheus' `rate` handles).

use crate::nft::Nft;
use crate::reconcile::Msg;
use palisade_policy::compile::counters::{PolicyCounter, Unit};
use palisade_policy::model::CLUSTER_KEY_PREFIX;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a scrape waits for the engine (busy with a commit) before leaving the family out.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The scrape's half: asks the engine, reads the kernel.
pub struct PolicyMetrics {
    engine: mpsc::Sender<Msg>,
}

impl PolicyMetrics {
    pub fn new(engine: mpsc::Sender<Msg>) -> Self {
        PolicyMetrics { engine }
    }

    /// The family's text (empty when the engine or the kernel cannot answer now; logged at debug).
    pub async fn render(&self) -> String {
        let (tx, rx) = oneshot::channel();
        if self.engine.try_send(Msg::PolicyCounters(tx)).is_err() {
            tracing::debug!("per-policy counters left out: the engine's queue is full");
            return String::new();
        }
        let Ok(Ok(described)) = tokio::time::timeout(ASK_TIMEOUT, rx).await else {
            tracing::debug!("per-policy counters left out: the engine did not answer in time");
            return String::new();
        };
        match tokio::task::spawn_blocking(Nft::counter_packets).await {
            Ok(Ok(values)) => render(&described, &values),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "per-policy counters left out: cannot read them");
                String::new()
            }
            Err(_) => String::new(),
        }
    }
}

/// `(kind, namespace, name)` of a compiler policy key.
fn policy_labels(key: &str) -> (&'static str, &str, &str) {
    match key.strip_prefix(CLUSTER_KEY_PREFIX) {
        Some(name) => ("ClusterNetworkPolicy", "", name),
        None => {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            ("NetworkPolicy", ns, name)
        }
    }
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The families in the Prometheus text format; a counter missing from the kernel counts 0.
pub fn render(described: &[PolicyCounter], values: &HashMap<String, u64>) -> String {
    let mut out = String::new();
    for (unit, name, help) in [
        (
            Unit::Packets,
            "palisade_policy_packets_total",
            "Packets each policy decided on this node, by direction and verdict: allow counts the packets a rule of the policy admitted (only packets of connections not established yet meet policy rules: a TCP SYN, a UDP flow's datagrams until the first reply), drop the packets dropped because the policy isolates the pod and no rule allowed them (a drop isolated by several policies counts for each), a ClusterNetworkPolicy's pass what it handed to the next tier, would_drop what a NetworkPolicy in audit mode would have dropped (nothing was). From zero again after a full replace of our table.",
        ),
        (
            Unit::Connections,
            "palisade_policy_connections_total",
            "New connections each NetworkPolicy decided on this node (each connection's first packet): allow those a rule of the policy admitted, drop the connection attempts dropped because it isolates the pod and no rule allowed them (a retransmitted first packet is an attempt again; one isolated by several policies counts for each). From zero again after a full replace of our table.",
        ),
    ] {
        let mut sums: BTreeMap<(&str, &str, &str, String, &str), u64> = BTreeMap::new();
        for c in described.iter().filter(|c| c.unit == unit) {
            let n = values.get(&c.counter).copied().unwrap_or(0);
            for key in &c.policies {
                let (kind, ns, policy) = policy_labels(key);
                *sums
                    .entry((kind, ns, policy, c.direction.to_string(), c.verdict.label()))
                    .or_insert(0) += n;
            }
        }
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for ((kind, ns, policy, dir, verdict), n) in sums {
            out.push_str(&format!(
                "{name}{{kind=\"{kind}\",namespace=\"{}\",policy=\"{}\",direction=\"{dir}\",verdict=\"{verdict}\"}} {n}\n",
                escape(ns),
                escape(policy)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::compile::counters::Counted;
    use palisade_policy::model::Direction;

    fn values() -> HashMap<String, u64> {
        [("cnt_a".to_string(), 7), ("cnt_g".to_string(), 3)].into()
    }

    fn counter(name: &str, dir: Direction, verdict: Counted, policies: &[&str]) -> PolicyCounter {
        PolicyCounter {
            counter: name.into(),
            direction: dir,
            verdict,
            unit: Unit::Packets,
            policies: policies.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn counters_are_summed_per_policy_and_a_group_drop_counts_for_each_isolating_policy() {
        let described = [
            counter(
                "cnt_a",
                Direction::Ingress,
                Counted::Allow,
                &["shop/allow-fe"],
            ),
            counter(
                "cnt_g",
                Direction::Ingress,
                Counted::Drop,
                &["shop/allow-fe", "shop/deny-all"],
            ),
            counter("cnt_c", Direction::Egress, Counted::Pass, &["cnp:guard"]),
            PolicyCounter {
                unit: Unit::Connections,
                ..counter(
                    "cnt_g",
                    Direction::Ingress,
                    Counted::Drop,
                    &["shop/deny-all"],
                )
            },
        ];
        let text = render(&described, &values());
        for line in [
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="allow-fe",direction="ingress",verdict="allow"} 7"#,
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="allow-fe",direction="ingress",verdict="drop"} 3"#,
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="deny-all",direction="ingress",verdict="drop"} 3"#,
            r#"palisade_policy_packets_total{kind="ClusterNetworkPolicy",namespace="",policy="guard",direction="egress",verdict="pass"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.lines().any(|l| l == r#"palisade_policy_connections_total{kind="NetworkPolicy",namespace="shop",policy="deny-all",direction="ingress",verdict="drop"} 3"#), "{text}");
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 5);
        assert!(text.contains("# TYPE palisade_policy_packets_total counter"));
        assert!(text.contains("# TYPE palisade_policy_connections_total counter"));
    }

    #[test]
    fn a_policy_without_a_counter_has_no_series() {
        let text = render(&[], &values());
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 0);
    }
}
