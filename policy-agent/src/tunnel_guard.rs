//! Who may send to the overlay's UDP port. The kernel's VXLAN socket decapsulates whatever reaches
//! [`crate::overlay::PORT`] with our VNI, from any source, and the inner packet then enters through
//! our overlay device with whatever source its sender wrote: a pod (a plain UDP socket is enough)
//! or any host that reaches a node could deliver packets to a pod under another pod's address, past
//! the source guard (which watches pod veths) and past the policies that trust that address. The
//! agent decides who may (`palisade_policy::model::Tunnel`), the compiler renders it into our
//! input chain: new packets to the port from anything but a node's InternalIP are counted and
//! dropped before the socket sees them.
//!
//! The peers are our own InternalIPs and those of every Node whose routes pass validation (the
//! nodes we route to, directly or over the overlay; a refused Node adds none), and they must send
//! to one of our own InternalIPs: a pod's datagram to another address of a node (one that is not
//! an InternalIP, so egress NAT masquerades it) leaves with its node's address, a peer's. With the overlay
//! off (`--encapsulation never`, or routes not managed) there is no device and no rule.

use crate::routes::RoutePlan;
use palisade_policy::model::{Change, ClusterState, Tunnel};
use std::collections::BTreeSet;
use std::net::IpAddr;
use tracing::info;

/// What the overlay asks of our table: who may send to its port (`Tunnel::peers`, `local`), and
/// whether outer packets flow (`carries_routes`: some route of ours goes over it, as the routes'
/// last plan found; the table then keeps them out of conntrack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    /// The device exists (`--encapsulation` other than `never`, routes managed).
    pub device: bool,
    pub carries_routes: bool,
}

impl Use {
    /// No overlay (routes not managed, or `--encapsulation never`).
    pub const NONE: Use = Use {
        device: false,
        carries_routes: false,
    };
}

/// The tunnel guard our table needs; `None` when the overlay is not in use. `plan`: the validated
/// routes of `state`'s Nodes (`routes::desired_routes`), computed once per reconcile.
pub fn desired(
    overlay: Use,
    state: &ClusterState,
    self_name: &str,
    plan: &RoutePlan,
) -> Option<Tunnel> {
    if !overlay.device {
        return None;
    }
    let local: BTreeSet<IpAddr> = state
        .nodes
        .get(self_name)
        .map(|me| me.internal_ips.iter().copied().collect())
        .unwrap_or_default();
    let mut peers = local.clone();
    peers.extend(plan.routes.iter().map(|r| r.via));
    Some(Tunnel {
        port: crate::overlay::PORT,
        peers: peers.into_iter().collect(),
        local: local.into_iter().collect(),
        carries_routes: overlay.carries_routes,
    })
}

/// The tunnel guard its Nodes call for when `state` does not hold it yet (`Some(None)`: no guard
/// wanted, one held); `None` when it holds it already.
pub fn unmet(
    overlay: Use,
    state: &ClusterState,
    self_name: &str,
    plan: &RoutePlan,
) -> Option<Option<Tunnel>> {
    let want = desired(overlay, state, self_name, plan);
    (want != state.tunnel).then_some(want)
}

/// The change that brings `state` to the tunnel guard its Nodes call for (logged), `None` when it
/// has that already.
pub fn change(
    overlay: Use,
    state: &ClusterState,
    self_name: &str,
    plan: &RoutePlan,
) -> Option<Change> {
    let want = unmet(overlay, state, self_name, plan)?;
    match &want {
        Some(t) => info!(
            port = t.port,
            peers = %t.peers.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", "),
            local = %t.local.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", "),
            outer_packets_untracked = t.carries_routes,
            "overlay port open to these node addresses sending to our InternalIPs (local) only; anything else sending to it is dropped (counted in chain tunnel_in). Outer packets are kept out of conntrack while some route of ours goes over the overlay"
        ),
        None => info!("overlay not in use: no rule for its port"),
    }
    Some(Change::SetTunnel(want))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::desired_routes;
    use palisade_policy::model::Node;

    const ROUTED: Use = Use {
        device: true,
        carries_routes: true,
    };
    const OFF: Use = Use::NONE;

    fn plan(st: &ClusterState) -> RoutePlan {
        desired_routes(&st.nodes, "a", &[])
    }

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> Node {
        Node {
            name: name.to_string(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
            ..Node::default()
        }
    }

    fn state(nodes: Vec<Node>) -> ClusterState {
        let mut st = ClusterState::default();
        for n in nodes {
            st.apply(Change::UpsertNode(n));
        }
        st
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn peers_are_our_own_and_every_valid_nodes_internal_ips() {
        let st = state(vec![
            node("a", &["10.244.1.0/24"], &["172.31.0.1", "fd00:172:31::1"]),
            node(
                "b",
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                &["172.31.1.2", "fd00:172:31:1::2"],
            ),
        ]);
        let t = desired(ROUTED, &st, "a", &plan(&st)).unwrap();
        assert_eq!(t.port, crate::overlay::PORT);
        assert_eq!(
            t.peers,
            ips(&[
                "172.31.0.1",
                "172.31.1.2",
                "fd00:172:31::1",
                "fd00:172:31:1::2"
            ])
        );
        assert_eq!(t.local, ips(&["172.31.0.1", "fd00:172:31::1"]));
    }

    #[test]
    fn a_node_whose_routes_are_refused_may_not_send_to_the_overlay() {
        let st = state(vec![
            node("a", &["10.244.1.0/24"], &["172.31.0.1"]),
            node("evil", &["0.0.0.0/0"], &["192.168.50.9"]),
        ]);
        let t = desired(ROUTED, &st, "a", &plan(&st)).unwrap();
        assert_eq!(t.peers, ips(&["172.31.0.1"]));
    }

    #[test]
    fn no_overlay_no_guard_and_the_change_is_asked_for_once() {
        let mut st = state(vec![node("a", &["10.244.1.0/24"], &["172.31.0.1"])]);
        assert_eq!(desired(OFF, &st, "a", &plan(&st)), None);
        assert_eq!(change(OFF, &st, "a", &plan(&st)), None, "already off");
        let c = change(ROUTED, &st, "a", &plan(&st));
        assert!(matches!(c, Some(Change::SetTunnel(Some(_)))), "{c:?}");
        assert!(st.apply(c.unwrap()));
        assert_eq!(
            change(ROUTED, &st, "a", &plan(&st)),
            None,
            "nothing changed"
        );
        assert!(matches!(
            change(OFF, &st, "a", &plan(&st)),
            Some(Change::SetTunnel(None))
        ));
    }

    #[test]
    fn outer_packets_are_untracked_only_while_a_route_rides_the_overlay() {
        let mut st = state(vec![
            node("a", &["10.244.1.0/24"], &["172.31.0.1"]),
            node("b", &["10.244.2.0/24"], &["172.31.0.2"]),
        ]);
        let direct = Use {
            device: true,
            carries_routes: false,
        };
        let c = change(direct, &st, "a", &plan(&st));
        let Some(Change::SetTunnel(Some(t))) = &c else {
            panic!("the device listens: its port needs the guard ({c:?})");
        };
        assert!(!t.carries_routes, "{t:?}");
        assert!(st.apply(c.unwrap()));
        let c = change(ROUTED, &st, "a", &plan(&st));
        assert!(
            matches!(&c, Some(Change::SetTunnel(Some(t))) if t.carries_routes && t.peers.len() == 2),
            "a route over the overlay now: the same guard, outer packets untracked ({c:?})"
        );
    }
}
