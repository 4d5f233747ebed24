//! The routes edge: for every other Node, a route to each of its podCIDRs via its InternalIP of the same
//! family, in the main table, tagged with [`ROUTE_PROTOCOL`] so we only ever list, replace or delete our own.

use crate::error::{Error, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use palisade_policy::model::Node;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::RouteMessageBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Route protocol number marking palisade's routes (`ip route show proto 140`). Unassigned in
/// /etc/iproute2/rt_protos; everything else in the routing table is left alone.
pub const ROUTE_PROTOCOL: u8 = 140;

/// One route to another node's pod range.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub destination: IpNet,
    pub via: IpAddr,
}

/// Routes this node wants: every other node's podCIDRs via its first InternalIP of the same family.
/// A CIDR without an InternalIP of its family gets no route (returned as a warning naming the node).
pub fn desired_routes(
    nodes: &BTreeMap<String, Node>,
    self_name: &str,
) -> (BTreeSet<PodRoute>, Vec<String>) {
    let mut routes = BTreeSet::new();
    let mut warnings = Vec::new();
    for (name, n) in nodes {
        if name == self_name {
            continue;
        }
        for cidr in &n.pod_cidrs {
            let via = n
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == matches!(cidr, IpNet::V4(_)));
            match via {
                Some(via) => {
                    routes.insert(PodRoute {
                        destination: *cidr,
                        via: *via,
                    });
                }
                None => warnings.push(format!(
                    "node {name}: no InternalIP of the family of podCIDR {cidr}, no route"
                )),
            }
        }
    }
    (routes, warnings)
}

/// A netlink handle on the current network namespace; its connection runs on the tokio runtime.
pub struct Routes {
    handle: rtnetlink::Handle,
}

/// Outcome of one [`Routes::sync`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<PodRoute>,
    pub removed: Vec<PodRoute>,
}

fn nl(action: &'static str) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Netlink {
        action,
        message: e.to_string(),
    }
}

impl Routes {
    /// Opens a route socket in the calling thread's network namespace. Needs a tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Netlink {
            action: "open route socket",
            message: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Routes { handle })
    }

    /// Our routes in the main table, as the kernel has them.
    pub async fn ours(&self) -> Result<BTreeSet<PodRoute>> {
        let mut out = BTreeSet::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(r) = s.try_next().await.map_err(nl("list routes"))? {
                if let Some(pr) = parse_ours(&r) {
                    out.insert(pr);
                }
            }
        }
        Ok(out)
    }

    /// Converges our routes to `want`: adds (replace) missing ones, deletes ours that are not wanted.
    /// Keeps going past a failed route and reports the first error after trying all.
    pub async fn sync(&self, want: &BTreeSet<PodRoute>) -> Result<RouteChanges> {
        let have = self.ours().await?;
        let mut changes = RouteChanges::default();
        let mut first_err = None;
        for r in have.difference(want) {
            match self.handle.route().del(message(r)?).execute().await {
                Ok(()) => changes.removed.push(r.clone()),
                Err(e) => {
                    tracing::warn!(destination = %r.destination, via = %r.via, error = %e, "cannot delete stale pod route");
                    first_err.get_or_insert(nl("delete route")(e));
                }
            }
        }
        for r in want.difference(&have) {
            match self
                .handle
                .route()
                .add(message(r)?)
                .replace()
                .execute()
                .await
            {
                Ok(()) => changes.added.push(r.clone()),
                Err(e) => {
                    tracing::warn!(destination = %r.destination, via = %r.via, error = %e,
                        "cannot add pod route (is the node's InternalIP reachable on a directly connected link?)");
                    first_err.get_or_insert(nl("add route")(e));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// Deletes all our routes (cleanup). Returns how many were removed.
    pub async fn remove_all(&self) -> Result<usize> {
        Ok(self.sync(&BTreeSet::new()).await?.removed.len())
    }
}

fn bad<E: std::fmt::Display>(e: E) -> Error {
    Error::Netlink {
        action: "build route",
        message: e.to_string(),
    }
}

fn message(r: &PodRoute) -> Result<RouteMessage> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.destination.addr(), r.destination.prefix_len())
        .map_err(bad)?
        .gateway(r.via)
        .map_err(bad)?
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build())
}

fn parse_ours(r: &RouteMessage) -> Option<PodRoute> {
    if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
        || r.header.table != RouteHeader::RT_TABLE_MAIN
    {
        return None;
    }
    let mut dst = None;
    let mut via = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => via = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    let destination = IpNet::new(dst?, r.header.destination_prefix_length).ok()?;
    Some(PodRoute {
        destination,
        via: via?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> (String, Node) {
        let n = Node {
            name: name.to_string(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
        };
        (name.to_string(), n)
    }

    #[test]
    fn routes_go_to_other_nodes_pod_cidrs_via_internal_ip_of_the_same_family() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node(
            "a",
            &["10.244.0.0/24", "fd00:10:244::/64"],
            &["192.168.0.1", "fd00::1"],
        )]);
        nodes.extend([node(
            "b",
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
            &["fd00::2", "192.168.0.2"],
        )]);
        let (r, w) = desired_routes(&nodes, "a");
        assert!(w.is_empty(), "{w:?}");
        let r: Vec<_> = r
            .into_iter()
            .map(|r| format!("{} via {}", r.destination, r.via))
            .collect();
        assert_eq!(
            r,
            vec![
                "10.244.1.0/24 via 192.168.0.2",
                "fd00:10:244:1::/64 via fd00::2"
            ]
        );
    }

    #[test]
    fn a_cidr_without_an_address_of_its_family_is_a_warning_not_a_route() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("b", &["fd00:10:244:1::/64"], &["192.168.0.2"])]);
        let (r, w) = desired_routes(&nodes, "a");
        assert!(r.is_empty());
        assert!(w[0].contains("node b"), "{w:?}");
    }
}
