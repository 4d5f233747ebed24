//! One flow-log line: what the kernel logged, attributed from the compiled model (which policies
//! decided, and the names of both ends). Pure: the engine calls it with its model.

use super::packet::{self, PacketFacts};
use palisade_policy::compile::admit::{Admitter, Flow};
use palisade_policy::explain::{DirectionVerdict, Outcome};
use palisade_policy::model::{ClusterState, Direction, Protocol};
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;

/// Which of our log rules handed the packet over (by its NFLOG prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A policy dropped it (`flow_drop`).
    Dropped,
    /// The first packet of a connection we let through (`flow_allow*`).
    Allowed,
    /// What NetworkPolicies in audit mode would have dropped in this direction (`flow_audit_*`);
    /// the packet went on to the enforced rules.
    WouldDrop(Direction),
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Dropped => "dropped",
            Kind::Allowed => "allowed",
            Kind::WouldDrop(_) => "would_drop",
        }
    }
}

/// One packet as NFLOG handed it to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    pub kind: Kind,
    pub facts: PacketFacts,
    /// It came from this node itself (no input interface: a local process sent it).
    pub from_this_node: bool,
}

/// Names of the addresses the model knows: pods (`namespace/name`) and Nodes.
#[derive(Debug, Default)]
pub struct Names {
    by_ip: HashMap<IpAddr, Name>,
}

#[derive(Debug, Clone)]
enum Name {
    Pod(String),
    Node(String),
}

impl Names {
    /// Every address of a Node and of a pod NetworkPolicy applies to (a hostNetwork pod has its
    /// node's addresses: it is named as the node).
    pub fn of(state: &ClusterState) -> Self {
        let mut by_ip = HashMap::new();
        for n in state.nodes.values() {
            for ip in &n.addresses {
                by_ip.insert(*ip, Name::Node(n.name.clone()));
            }
        }
        for p in state.pods.values().filter(|p| p.is_policy_subject()) {
            for ip in &p.ips {
                by_ip.insert(*ip, Name::Pod(p.key()));
            }
        }
        Names { by_ip }
    }

    fn end(&self, ip: IpAddr, port: Option<u16>) -> End {
        let (pod, node) = match self.by_ip.get(&ip) {
            Some(Name::Pod(k)) => (Some(k.clone()), None),
            Some(Name::Node(n)) => (None, Some(n.clone())),
            None => (None, None),
        };
        End {
            ip,
            port,
            pod,
            node,
        }
    }
}

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct End {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `namespace/name` of the pod holding the address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The Node holding the address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One line of the flow log (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// The node that logged it.
    pub node: String,
    /// `dropped`, `allowed`, or `would_drop` (a policy in audit mode would have dropped it; it was
    /// not).
    pub verdict: &'static str,
    /// The direction whose policies decided: `egress` (of the source), `ingress` (of the
    /// destination), or `egress,ingress` when both admitted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    pub protocol: String,
    pub source: End,
    pub destination: End,
    /// The policies that decided: `namespace/name`, or `clusternetworkpolicy <name>`; for "no
    /// rule allows it", every policy isolating the pod.
    pub policies: Vec<String>,
    /// In words, as `palisade-agent explain` says it.
    pub reason: String,
}

/// Attributes one logged packet with this node's compiled model; `None` for an admitted connection
/// that no policy of any tier admitted (the Kubernetes default, an exemption: not logged).
pub fn attribute(
    logged: &Logged,
    adm: &Admitter<'_>,
    names: &Names,
    node: &str,
    time: String,
) -> Option<FlowRecord> {
    let f = &logged.facts;
    let proto = match f.proto {
        packet::TCP => Some(Protocol::Tcp),
        packet::UDP => Some(Protocol::Udp),
        packet::SCTP => Some(Protocol::Sctp),
        _ => None,
    };
    let (sport, dport) = match f.ports {
        Some((s, d)) => (Some(s), Some(d)),
        None => (None, None),
    };
    let flow = Flow {
        src: f.src,
        dst: f.dst,
        proto,
        port: dport.unwrap_or(0),
        from_this_node: logged.from_this_node,
    };
    let j = adm.judge(&flow);
    let verdict = |dir: Direction, pod: &str, outcome: Outcome| DirectionVerdict {
        direction: dir,
        pod: Some(pod.to_string()),
        node: Some(node.to_string()),
        outcome,
        audit: None,
        refused: adm.refusals(pod, dir),
    };
    let mut decided: Vec<DirectionVerdict> = Vec::new();
    let mut audit_note = None;
    match logged.kind {
        Kind::WouldDrop(dir) => {
            let own = match dir {
                Direction::Egress => f.src,
                Direction::Ingress => f.dst,
            };
            let lp = adm.governed_pod(dir, own)?;
            let keys = lp.audited(dir).to_vec();
            if keys.is_empty() {
                return None; // the model changed since: nothing is audited there now
            }
            audit_note = Some(format!(
                "{dir} of {} (node {node}): would be DENIED by {} in audit mode (not enforced): no rule of {} matches",
                lp.key,
                keys.join(", "),
                if keys.len() == 1 { "it" } else { "theirs" }
            ));
            decided.push(verdict(dir, &lp.key, Outcome::Denied(keys)));
        }
        Kind::Dropped => {
            if let Some(ip) = j.pending {
                let dir = if ip == f.src {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                let who = names.end(ip, None).pod.unwrap_or_else(|| ip.to_string());
                decided.push(verdict(dir, &who, Outcome::Pending));
            }
            for (dir, v) in [
                (Direction::Egress, j.egress),
                (Direction::Ingress, j.ingress),
            ] {
                if let Some((pod, v)) = v.filter(|(_, v)| !v.allows()) {
                    decided.push(verdict(dir, pod, v.into()));
                }
            }
        }
        Kind::Allowed => {
            if j.exempt.is_some() {
                return None;
            }
            for (dir, v) in [
                (Direction::Egress, j.egress),
                (Direction::Ingress, j.ingress),
            ] {
                if let Some((pod, v)) = v {
                    let outcome: Outcome = v.into();
                    // Admitted by a rule of some tier, not by the default.
                    if !matches!(outcome, Outcome::NotIsolated | Outcome::Default { .. }) {
                        decided.push(verdict(dir, pod, outcome));
                    }
                }
            }
            if decided.is_empty() {
                return None;
            }
        }
    }
    let reason = if let Some(note) = audit_note {
        note
    } else if decided.is_empty() {
        "dropped by this node's ruleset, but the policies in force now admit it: a change was \
         being committed (the next attempt meets the new rules)"
            .to_string()
    } else {
        decided
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut policies: Vec<String> = decided.iter().flat_map(|d| d.outcome.policies()).collect();
    policies.dedup();
    let direction = (!decided.is_empty()).then(|| {
        decided
            .iter()
            .map(|d| d.direction.to_string())
            .collect::<Vec<_>>()
            .join(",")
    });
    Some(FlowRecord {
        time,
        node: node.to_string(),
        verdict: logged.kind.label(),
        direction,
        protocol: f.protocol_name(),
        source: names.end(f.src, sport),
        destination: names.end(f.dst, dport),
        policies,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::compile;
    use palisade_policy::scenarios::Scenario;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp(src: &str, dst: &str, dport: u16) -> PacketFacts {
        PacketFacts {
            src: ip(src),
            dst: ip(dst),
            proto: packet::TCP,
            ports: Some((40000, dport)),
        }
    }

    fn state() -> ClusterState {
        Scenario::new()
            .pod("shop/backend", "n1", &["10.244.1.2"], &[("app", "backend")], &[])
            .pod("shop/frontend", "n1", &["10.244.1.3"], &[("app", "frontend")], &[])
            .pod("guest/visitor", "n2", &["10.244.2.2"], &[("app", "visitor")], &[])
            .policy("shop", "deny-all", json!({"podSelector": {}}))
            .policy("shop", "frontend-to-backend", json!({"podSelector": {"matchLabels": {"app": "backend"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}], "ports": [{"port": 80}]}]}))
            .st
    }

    fn record(kind: Kind, facts: PacketFacts) -> Option<FlowRecord> {
        record_in(&state(), kind, facts)
    }

    fn record_in(st: &ClusterState, kind: Kind, facts: PacketFacts) -> Option<FlowRecord> {
        let c = compile(st, "n1");
        let adm = Admitter::new(&c);
        let logged = Logged {
            kind,
            facts,
            from_this_node: false,
        };
        attribute(&logged, &adm, &Names::of(st), "n1", "T".into())
    }

    #[test]
    fn a_drop_names_both_pods_the_direction_and_every_isolating_policy() {
        let r = record(Kind::Dropped, tcp("10.244.2.2", "10.244.1.2", 80)).unwrap();
        assert_eq!(r.verdict, "dropped");
        assert_eq!(r.direction.as_deref(), Some("ingress"));
        assert_eq!(r.source.pod.as_deref(), Some("guest/visitor"));
        assert_eq!(r.destination.pod.as_deref(), Some("shop/backend"));
        assert_eq!(r.destination.port, Some(80));
        assert_eq!(r.protocol, "TCP");
        assert_eq!(r.policies, ["shop/deny-all", "shop/frontend-to-backend"]);
        assert!(r.reason.contains("DENIED"), "{}", r.reason);
        let line = serde_json::to_value(&r).unwrap();
        assert_eq!(line["source"]["ip"], "10.244.2.2");
        assert_eq!(line["source"]["port"], 40000);
    }

    #[test]
    fn a_drop_by_a_policy_the_node_refused_says_it_was_refused_and_why() {
        let mut st = state();
        // One pod peer is over the limit: frontend-to-backend is refused and allows nothing.
        st.policy_limits.pod_peers = 0;
        let r = record_in(&st, Kind::Dropped, tcp("10.244.1.3", "10.244.1.2", 80)).unwrap();
        assert_eq!(r.verdict, "dropped");
        assert!(
            r.reason.contains("refused on this node, allowing nothing: shop/frontend-to-backend (it has 1 pod peers"),
            "{}",
            r.reason
        );
        // Within the limits a drop mentions no refusal.
        let r = record(Kind::Dropped, tcp("10.244.2.2", "10.244.1.2", 80)).unwrap();
        assert!(!r.reason.contains("refused"), "{}", r.reason);
    }

    #[test]
    fn an_admitted_connection_names_the_rule_that_admitted_it_and_the_default_is_not_logged() {
        let r = record(Kind::Allowed, tcp("10.244.1.3", "10.244.1.2", 80)).unwrap();
        assert_eq!(r.verdict, "allowed");
        assert_eq!(r.policies, ["shop/frontend-to-backend"]);
        assert_eq!(r.direction.as_deref(), Some("ingress"));
        // guest/visitor to an outside address: no policy governs either end here.
        assert_eq!(
            record(Kind::Allowed, tcp("10.244.2.2", "8.8.8.8", 53)),
            None
        );
    }

    #[test]
    fn a_drop_the_model_no_longer_explains_says_a_change_was_in_flight() {
        // frontend -> backend on 80 is admitted by the model; the kernel dropped it before the commit.
        let r = record(Kind::Dropped, tcp("10.244.1.3", "10.244.1.2", 80)).unwrap();
        assert!(r.policies.is_empty());
        assert_eq!(r.direction, None);
        assert!(r.reason.contains("a change was being committed"));
    }

    #[test]
    fn what_an_audited_policy_would_drop_names_it_and_says_nothing_was_dropped() {
        let st = Scenario::new()
            .pod(
                "shop/backend",
                "n1",
                &["10.244.1.2"],
                &[("app", "backend")],
                &[],
            )
            .pod(
                "guest/visitor",
                "n2",
                &["10.244.2.2"],
                &[("app", "visitor")],
                &[],
            )
            .audit_policy("shop", "deny-all", json!({"podSelector": {}}))
            .st;
        let c = compile(&st, "n1");
        let adm = Admitter::new(&c);
        let logged = Logged {
            kind: Kind::WouldDrop(Direction::Ingress),
            facts: tcp("10.244.2.2", "10.244.1.2", 80),
            from_this_node: false,
        };
        let r = attribute(&logged, &adm, &Names::of(&st), "n1", "T".into()).unwrap();
        assert_eq!(r.verdict, "would_drop");
        assert_eq!(r.direction.as_deref(), Some("ingress"));
        assert_eq!(r.policies, ["shop/deny-all"]);
        assert_eq!(r.source.pod.as_deref(), Some("guest/visitor"));
        assert!(
            r.reason.contains("audit mode (not enforced)"),
            "{}",
            r.reason
        );
        // A pod nothing audits any more (the model moved on): no line.
        let other = Logged {
            facts: tcp("10.244.1.2", "10.244.2.2", 80),
            ..logged
        };
        assert_eq!(
            attribute(&other, &adm, &Names::of(&st), "n1", "T".into()),
            None
        );
    }

    #[test]
    fn unknown_addresses_and_protocols_without_ports_are_logged_by_address() {
        let f = PacketFacts {
            src: ip("192.0.2.9"),
            dst: ip("10.244.1.2"),
            proto: packet::ICMP,
            ports: None,
        };
        let r = record(Kind::Dropped, f).unwrap();
        assert_eq!(r.protocol, "ICMP");
        assert_eq!(r.source.pod, None);
        assert_eq!(r.destination.port, None);
        assert_eq!(r.direction.as_deref(), Some("ingress"));
    }
}
