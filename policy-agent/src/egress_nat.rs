//! Egress NAT: which pod traffic leaves this node with the node's address. The agent decides it
//! (from the Nodes that pass route validation, and its flags); the compiler renders it into our
//! table (`palisade_policy::model::EgressNat`, a nat chain after every policy check).
//!
//! Masqueraded: a packet from the cluster's pod networks to anything outside the exempt ranges.
//! Pod networks are `--cluster-cidr` when given, plus every podCIDR that passes validation (ours
//! and other Nodes'); a Node whose podCIDR is refused (too wide, overlapping, ...) cannot widen the
//! exempt ranges, so it cannot switch NAT off for the cluster. Exempt: the pod networks, every
//! Node's InternalIPs (pod → node keeps the pod's address), and `--no-masquerade-cidr`.

use crate::routes::RoutePlan;
use ipnet::IpNet;
use palisade_policy::model::{Change, ClusterState, EgressNat, Node};
use std::collections::{BTreeMap, BTreeSet};
use tracing::info;

/// The operator's choices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// `--masquerade` (default true).
    pub enabled: bool,
    /// `--cluster-cidr`.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--no-masquerade-cidr`: more destinations that keep the pod's address.
    pub no_masquerade: Vec<IpNet>,
}

/// This node's egress NAT; `None` when it is off.
pub fn desired(
    cfg: &NatConfig,
    nodes: &BTreeMap<String, Node>,
    self_name: &str,
    routes: &RoutePlan,
) -> Option<EgressNat> {
    if !cfg.enabled {
        return None;
    }
    let mut sources: BTreeSet<IpNet> = cfg.cluster_cidrs.iter().map(IpNet::trunc).collect();
    if let Some(me) = nodes.get(self_name) {
        sources.extend(me.pod_cidrs.iter().map(IpNet::trunc));
    }
    sources.extend(routes.routes.iter().map(|r| r.destination.trunc()));
    let mut exempt = sources.clone();
    for n in nodes.values() {
        exempt.extend(n.internal_ips.iter().map(|ip| IpNet::from(*ip)));
    }
    exempt.extend(cfg.no_masquerade.iter().map(IpNet::trunc));
    Some(EgressNat {
        sources: sources.into_iter().collect(),
        exempt: exempt.into_iter().collect(),
    })
}

/// The change that brings `state` to the egress NAT its Nodes and `cfg` call for (logged), `None`
/// when it has that already. `plan`: the validated routes of `state`'s Nodes
/// (`routes::desired_routes` with `cfg.cluster_cidrs`), computed once per reconcile.
pub fn change(
    cfg: &NatConfig,
    state: &ClusterState,
    self_name: &str,
    plan: &RoutePlan,
) -> Option<Change> {
    let nat = desired(cfg, &state.nodes, self_name, plan);
    if nat == state.egress_nat {
        return None;
    }
    match &nat {
        Some(n) => info!(
            sources = %join(&n.sources),
            exempt = %join(&n.exempt),
            "egress NAT: pod traffic from the sources to outside the exempt ranges leaves with the node's address"
        ),
        None => info!("egress NAT off (--masquerade=false)"),
    }
    Some(Change::SetEgressNat(nat))
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::desired_routes;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> (String, Node) {
        (
            name.to_string(),
            Node {
                name: name.to_string(),
                pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
                ..Node::default()
            },
        )
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn on() -> NatConfig {
        NatConfig {
            enabled: true,
            ..NatConfig::default()
        }
    }

    #[test]
    fn pod_networks_of_valid_nodes_are_the_sources_and_nodes_are_exempt() {
        let nodes: BTreeMap<_, _> = [
            node(
                "a",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &["172.31.0.1"],
            ),
            node("b", &["10.244.2.0/24"], &["172.31.0.2", "fd00:172:31::2"]),
        ]
        .into();
        let plan = desired_routes(&nodes, "a", &[]);
        let mut cfg = on();
        cfg.no_masquerade = nets(&["192.168.0.0/16"]);
        let nat = desired(&cfg, &nodes, "a", &plan).unwrap();
        assert_eq!(
            nat.sources,
            nets(&["10.244.1.0/24", "10.244.2.0/24", "fd00:10:244:1::/64"])
        );
        assert_eq!(
            nat.exempt,
            nets(&[
                "10.244.1.0/24",
                "10.244.2.0/24",
                "172.31.0.1/32",
                "172.31.0.2/32",
                "192.168.0.0/16",
                "fd00:10:244:1::/64",
                "fd00:172:31::2/128",
            ])
        );
    }

    #[test]
    fn a_refused_pod_cidr_cannot_exempt_the_internet() {
        let nodes: BTreeMap<_, _> = [
            node("a", &["10.244.1.0/24"], &["172.31.0.1"]),
            node("evil", &["0.0.0.0/0"], &["172.31.0.9"]),
        ]
        .into();
        let plan = desired_routes(&nodes, "a", &[]);
        let nat = desired(&on(), &nodes, "a", &plan).unwrap();
        assert!(!nat.exempt.contains(&"0.0.0.0/0".parse().unwrap()));
        assert_eq!(nat.sources, nets(&["10.244.1.0/24"]));
    }

    #[test]
    fn the_cluster_cidr_is_a_source_even_before_nodes_are_known() {
        let mut cfg = on();
        cfg.cluster_cidrs = nets(&["10.244.0.0/16"]);
        let nat = desired(&cfg, &BTreeMap::new(), "a", &RoutePlan::default()).unwrap();
        assert_eq!(nat.sources, nets(&["10.244.0.0/16"]));
    }

    #[test]
    fn the_change_is_asked_for_once_and_then_nothing() {
        let mut st = ClusterState::default();
        let (name, n) = node("a", &["10.244.1.0/24"], &["172.31.0.1"]);
        st.apply(Change::UpsertNode(n));
        let cfg = on();
        let plan = desired_routes(&st.nodes, &name, &[]);
        let c = change(&cfg, &st, &name, &plan);
        assert!(matches!(c, Some(Change::SetEgressNat(Some(_)))), "{c:?}");
        assert!(st.egress_nat.is_none(), "asking changes nothing");
        assert!(st.apply(c.unwrap()));
        assert_eq!(
            change(&cfg, &st, &name, &plan),
            None,
            "nothing changed: nothing to stage"
        );
    }

    #[test]
    fn masquerade_false_renders_no_nat() {
        let nodes: BTreeMap<_, _> = [node("a", &["10.244.1.0/24"], &["172.31.0.1"])].into();
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(desired(&NatConfig::default(), &nodes, "a", &plan), None);
    }
}
