//! The routes edge: for every other Node, a route to each of its podCIDRs via its InternalIP of the same
//! family, and for each of our own podCIDRs an `unreachable` route under the pods' own routes, in the
//! main table, tagged with [`ROUTE_PROTOCOL`] so we only ever list, replace or delete our own.

use crate::error::{Error, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use palisade_policy::model::Node;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Route protocol number marking palisade's routes (`ip route show proto 140`). Unassigned in
/// /etc/iproute2/rt_protos; everything else in the routing table is left alone.
pub const ROUTE_PROTOCOL: u8 = 140;

/// One route of ours: to another node's pod range, or under our own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub destination: IpNet,
    /// The gateway; the family's unspecified address for [`Hop::Unreachable`].
    pub via: IpAddr,
    pub hop: Hop,
}

/// How a route of ours forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hop {
    /// Via the other node's InternalIP, on a directly connected subnet.
    Gateway,
    /// Through our overlay device of the family (`onlink`, via the other node's VTEP address; see
    /// `overlay`), not via its InternalIP.
    Overlay,
    /// One of our own podCIDRs: each pod has its own route to its veth, more specific; an address
    /// of the range without a pod (a deleted pod's, one never handed out) is answered "unreachable"
    /// here instead of following the node's default route out of the cluster (where a cloud
    /// network routes it back to us, until its TTL runs out).
    Unreachable,
}

impl PodRoute {
    /// The `unreachable` route under one of our own podCIDRs.
    pub fn unreachable(destination: IpNet) -> Self {
        let via = match destination {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        PodRoute {
            destination,
            via,
            hop: Hop::Unreachable,
        }
    }
}

impl std::fmt::Display for PodRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hop {
            Hop::Gateway => write!(f, "{} via {}", self.destination, self.via),
            Hop::Overlay => write!(f, "{} via {} (overlay)", self.destination, self.via),
            Hop::Unreachable => write!(f, "unreachable {} (our own pod range)", self.destination),
        }
    }
}

/// Shortest IPv4 podCIDR prefix we route. A node's range holds its pods (kubelet's max-pods is 110 by
/// default and a few hundred in practice; kube-controller-manager hands out /24s by default): a /16
/// (65k addresses) is already far more than any node can use, and anything wider claims whole private
/// ranges (10.0.0.0/8, 172.16.0.0/12), the default route at the extreme. Wider is refused.
pub const MIN_PREFIX_V4: u8 = 16;
/// Shortest IPv6 podCIDR prefix we route: node ranges are /64 by default (/80–/112 on some clusters);
/// a /48 is a whole site. Wider is refused.
pub const MIN_PREFIX_V6: u8 = 48;

/// Validates `--cluster-cidr`: at most one per family; host bits are dropped.
pub fn cluster_cidrs(given: &[IpNet]) -> Result<Vec<IpNet>> {
    for (family, v4) in [("IPv4", true), ("IPv6", false)] {
        let of: Vec<String> = given
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)) == v4)
            .map(|c| c.to_string())
            .collect();
        if of.len() > 1 {
            return Err(Error::Usage(format!(
                "--cluster-cidr (PALISADE_CLUSTER_CIDR) takes at most one CIDR per family, got {} {family} ones: {}",
                of.len(),
                of.join(", ")
            )));
        }
    }
    Ok(given.iter().map(IpNet::trunc).collect())
}

/// Why a Node's podCIDR gets no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// Prefix shorter than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`] (the default route included).
    TooWide,
    /// Not inside any configured `--cluster-cidr` of its family.
    OutsideClusterCidr,
    /// Contains a Node's InternalIP (ours or another's): a route to it would take over the path
    /// between nodes.
    ContainsNodeAddress,
    /// Overlaps a podCIDR of our own Node.
    OverlapsOwnNode,
    /// Overlaps a podCIDR another Node claims too (both claims are refused).
    OverlapsOtherNode,
    /// Its Node claims an InternalIP of that family inside `--cluster-cidr`: an address of the
    /// pods' network, never a node's (a route or tunnel to it would hand the range to a pod).
    NodeAddressInPodNetwork,
}

impl RefusalReason {
    /// Every reason, in the order the metric shows them.
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::TooWide,
        RefusalReason::OutsideClusterCidr,
        RefusalReason::ContainsNodeAddress,
        RefusalReason::OverlapsOwnNode,
        RefusalReason::OverlapsOtherNode,
        RefusalReason::NodeAddressInPodNetwork,
    ];

    /// A stable label for the `palisade_refused_pod_cidrs{reason=...}` gauge.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::TooWide => "too_wide",
            RefusalReason::OutsideClusterCidr => "outside_cluster_cidr",
            RefusalReason::ContainsNodeAddress => "contains_node_address",
            RefusalReason::OverlapsOwnNode => "overlaps_own_node",
            RefusalReason::OverlapsOtherNode => "overlaps_other_node",
            RefusalReason::NodeAddressInPodNetwork => "node_address_in_pod_network",
        }
    }
}

/// A podCIDR of a Node that gets no route, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    pub node: String,
    pub cidr: IpNet,
    pub reason: RefusalReason,
    /// What it collides with or must lie in (a CIDR, a node), for the log line.
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (node, cidr, detail) = (&self.node, &self.cidr, &self.detail);
        match self.reason {
            RefusalReason::TooWide => write!(
                f,
                "node {node}: podCIDR {cidr} is wider than /{} (IPv4) or /{} (IPv6); no route. A node's pod range is never that wide: check who wrote this Node",
                MIN_PREFIX_V4, MIN_PREFIX_V6
            ),
            RefusalReason::OutsideClusterCidr => write!(
                f,
                "node {node}: podCIDR {cidr} is not inside the cluster CIDR ({detail}); no route. Fix the Node or --cluster-cidr"
            ),
            RefusalReason::ContainsNodeAddress => write!(
                f,
                "node {node}: podCIDR {cidr} contains {detail}; no route (it would take over the path between nodes). Check who wrote this Node"
            ),
            RefusalReason::OverlapsOwnNode => write!(
                f,
                "node {node}: podCIDR {cidr} overlaps our own node's podCIDR {detail}; no route. Our pods stay local; check who wrote this Node"
            ),
            RefusalReason::OverlapsOtherNode => write!(
                f,
                "node {node}: podCIDR {cidr} overlaps {detail}; both claims are refused (no route to either) until one Node is fixed"
            ),
            RefusalReason::NodeAddressInPodNetwork => write!(
                f,
                "node {node}: podCIDR {cidr} refused: the Node claims InternalIP {detail}, an address of the pods' network, never a node's (a route or tunnel to it would hand the range to a pod); no route, no tunnel peer, and no other Node's range is refused for holding it. Check who wrote this Node"
            ),
        }
    }
}

/// What [`desired_routes`] decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// To other nodes' podCIDRs, each via its node's InternalIP ([`Hop::Gateway`]).
    pub routes: BTreeSet<PodRoute>,
    /// Our own podCIDRs that pass validation: each gets an `unreachable` route
    /// ([`PodRoute::unreachable`]).
    pub own: BTreeSet<IpNet>,
    /// podCIDRs refused, sorted (node, cidr).
    pub refused: Vec<Refused>,
    /// podCIDRs accepted but without an InternalIP of their family (no route).
    pub warnings: Vec<String>,
}

/// Whether `n` is IPv4.
fn v4(n: &IpNet) -> bool {
    matches!(n, IpNet::V4(_))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn start_end(n: &IpNet) -> (u128, u128) {
    match n {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// The `--cluster-cidr` (the pods' network, where no node address can be) that holds `ip`, if any.
fn pod_network_of<'a>(ip: &IpAddr, cluster_cidrs: &'a [IpNet]) -> Option<&'a IpNet> {
    cluster_cidrs.iter().find(|c| c.contains(ip))
}

/// A Node's InternalIPs that count as node addresses: all of ours (we do not refuse ourselves), and
/// of another Node those outside the pods' network (`--cluster-cidr`): an address inside it is a
/// pod's, claimed by a Node that is wrong or forged.
fn node_addresses<'a>(
    name: &str,
    n: &'a Node,
    self_name: &str,
    cluster_cidrs: &'a [IpNet],
) -> impl Iterator<Item = &'a IpAddr> + 'a {
    let trust_all = name == self_name;
    n.internal_ips
        .iter()
        .filter(move |ip| trust_all || pod_network_of(ip, cluster_cidrs).is_none())
}

/// Every Node's InternalIPs that count as node addresses ([`node_addresses`]), sorted, so that
/// [`checked`] asks "does this podCIDR hold one?" with a binary search: walking every Node for
/// every podCIDR was quadratic in Nodes (at 1,000 Nodes ~17 % of the agent's reconcile thread
/// under changes, on the path of every commit).
struct NodeAddressIndex<'a> {
    /// (address, its Node's place in name order, its place among that Node's addresses, the Node).
    sorted: Vec<(IpAddr, usize, usize, &'a str)>,
}

impl<'a> NodeAddressIndex<'a> {
    fn new(nodes: &'a BTreeMap<String, Node>, self_name: &str, cluster_cidrs: &'a [IpNet]) -> Self {
        let mut sorted = Vec::new();
        for (i, (name, n)) in nodes.iter().enumerate() {
            for (j, ip) in node_addresses(name, n, self_name, cluster_cidrs).enumerate() {
                sorted.push((*ip, i, j, name.as_str()));
            }
        }
        sorted.sort_unstable();
        Self { sorted }
    }

    /// The node address inside `cidr` that a walk of the Nodes in name order (each Node's
    /// addresses in order) meets first, with its Node.
    fn first_inside(&self, cidr: &IpNet) -> Option<(&'a str, IpAddr)> {
        let from = self.sorted.partition_point(|(ip, ..)| *ip < cidr.network());
        self.sorted[from..]
            .iter()
            .take_while(|(ip, ..)| *ip <= cidr.broadcast())
            .min_by_key(|(_, node, place, _)| (*node, *place))
            .map(|(ip, _, _, name)| (*name, *ip))
    }
}

/// The checks every podCIDR must pass, ours included: not wider than [`MIN_PREFIX_V4`] /
/// [`MIN_PREFIX_V6`], inside a `--cluster-cidr` of its family (when there is one), holding no
/// Node's InternalIP (of those [`node_addresses`] counts). `None`: it passes; otherwise why not,
/// and the detail for the log line.
fn checked(
    cidr: &IpNet,
    addresses: &NodeAddressIndex<'_>,
    cluster_cidrs: &[IpNet],
) -> Option<(RefusalReason, String)> {
    let min = match cidr {
        IpNet::V4(_) => MIN_PREFIX_V4,
        IpNet::V6(_) => MIN_PREFIX_V6,
    };
    let family: Vec<&IpNet> = cluster_cidrs.iter().filter(|c| v4(c) == v4(cidr)).collect();
    if cidr.prefix_len() < min {
        return Some((RefusalReason::TooWide, String::new()));
    }
    if !family.is_empty() && !family.iter().any(|c| c.contains(cidr)) {
        let list: Vec<String> = family.iter().map(|c| c.to_string()).collect();
        return Some((RefusalReason::OutsideClusterCidr, list.join(", ")));
    }
    addresses.first_inside(cidr).map(|(holder, ip)| {
        (
            RefusalReason::ContainsNodeAddress,
            format!("InternalIP {ip} of node {holder}"),
        )
    })
}

/// Routes this node wants: every other node's podCIDRs via its first InternalIP of the same family,
/// for the podCIDRs that pass validation. A podCIDR is refused when it is wider than
/// [`MIN_PREFIX_V4`]/[`MIN_PREFIX_V6`], lies outside every `cluster_cidrs` entry of its family (when
/// there is one), contains any Node's InternalIP, overlaps our own Node's podCIDRs, or overlaps a
/// podCIDR of another Node; every podCIDR of a family is refused for a Node that claims an
/// InternalIP of that family inside `cluster_cidrs` (a pod's address: such a Node would make a pod
/// the next hop or tunnel peer for its range), and that address refuses no other Node's range.
/// Our own podCIDRs that pass the first three checks are `own` (each gets an `unreachable` route);
/// one that fails them is refused under our name (an `unreachable` route over a node's address
/// would cut the path between nodes).
///
/// Two Nodes claiming overlapping ranges are both refused: kube-controller-manager never hands out
/// overlapping ranges, so one of the claims is wrong and we cannot tell which (names and order of
/// arrival prove nothing; a forged Node could pick a name that sorts first). A route to the wrong
/// node hands its traffic to whoever wrote that Node; no route only breaks reachability, loudly (log
/// line, metric). The decision depends only on the set of Nodes, never on the order events came in.
pub fn desired_routes(
    nodes: &BTreeMap<String, Node>,
    self_name: &str,
    cluster_cidrs: &[IpNet],
) -> RoutePlan {
    let mut plan = RoutePlan::default();
    let addresses = NodeAddressIndex::new(nodes, self_name, cluster_cidrs);
    let own: Vec<IpNet> = nodes
        .get(self_name)
        .map(|n| n.pod_cidrs.iter().map(IpNet::trunc).collect())
        .unwrap_or_default();
    for cidr in &own {
        if let Some((reason, detail)) = checked(cidr, &addresses, cluster_cidrs) {
            plan.refused.push(Refused {
                node: self_name.to_string(),
                cidr: *cidr,
                reason,
                detail,
            });
        } else {
            plan.own.insert(*cidr);
        }
    }
    // Claims that pass the per-CIDR checks: (cidr, node).
    let mut claims: Vec<(IpNet, &str)> = Vec::new();
    for (name, n) in nodes {
        if name == self_name {
            continue;
        }
        let mut seen = BTreeSet::new();
        for cidr in n.pod_cidrs.iter().map(IpNet::trunc) {
            if !seen.insert(cidr) {
                continue;
            }
            let refuse = |reason, detail: String| Refused {
                node: name.clone(),
                cidr,
                reason,
                detail,
            };
            let claimed_pod_address = n
                .internal_ips
                .iter()
                .filter(|ip| ip.is_ipv4() == v4(&cidr))
                .find_map(|ip| Some((ip, pod_network_of(ip, cluster_cidrs)?)));
            if let Some((ip, within)) = claimed_pod_address {
                plan.refused.push(refuse(
                    RefusalReason::NodeAddressInPodNetwork,
                    format!("{ip} (inside the cluster CIDR {within})"),
                ));
            } else if let Some((reason, detail)) = checked(&cidr, &addresses, cluster_cidrs) {
                plan.refused.push(refuse(reason, detail));
            } else if let Some(o) = own.iter().find(|o| overlaps(o, &cidr)) {
                plan.refused
                    .push(refuse(RefusalReason::OverlapsOwnNode, o.to_string()));
            } else {
                claims.push((cidr, name.as_str()));
            }
        }
    }
    // Overlaps between nodes: CIDRs are nested or disjoint, so after sorting by (start, widest first)
    // every CIDR still open on the stack when `c` comes contains `c`.
    claims.sort_by_key(|(c, n)| (!v4(c), start_end(c).0, c.prefix_len(), *n));
    let mut conflict: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut open: Vec<usize> = Vec::new();
    for i in 0..claims.len() {
        let (c, node) = claims[i];
        let (s, _) = start_end(&c);
        open.retain(|&j| v4(&claims[j].0) == v4(&c) && start_end(&claims[j].0).1 >= s);
        for &j in &open {
            let (o, other) = claims[j];
            if other != node && overlaps(&o, &c) {
                conflict
                    .entry(i)
                    .or_default()
                    .insert(format!("{o} of node {other}"));
                conflict
                    .entry(j)
                    .or_default()
                    .insert(format!("{c} of node {node}"));
            }
        }
        open.push(i);
    }
    for (i, (cidr, name)) in claims.iter().enumerate() {
        if let Some(with) = conflict.get(&i) {
            plan.refused.push(Refused {
                node: name.to_string(),
                cidr: *cidr,
                reason: RefusalReason::OverlapsOtherNode,
                detail: with.iter().cloned().collect::<Vec<_>>().join(", "),
            });
            continue;
        }
        let Some(n) = nodes.get(*name) else { continue };
        match n.internal_ips.iter().find(|ip| ip.is_ipv4() == v4(cidr)) {
            Some(via) => {
                plan.routes.insert(PodRoute {
                    destination: *cidr,
                    via: *via,
                    hop: Hop::Gateway,
                });
            }
            None => plan.warnings.push(format!(
                "node {name}: no InternalIP of the family of podCIDR {cidr}, no route"
            )),
        }
    }
    plan.refused.sort();
    plan
}

/// A netlink handle on the current network namespace; its connection runs on the tokio runtime.
pub struct Routes {
    handle: rtnetlink::Handle,
}

/// Outcome of one [`Routes::sync`]: each route is tried on its own; one that fails keeps no other
/// from being added or removed.
#[derive(Debug, Default)]
pub struct RouteChanges {
    pub added: Vec<PodRoute>,
    pub removed: Vec<PodRoute>,
    /// Routes that could not be added or removed, with the error.
    pub failed: Vec<(PodRoute, Error)>,
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
        Ok(self.ours_listed().await?.into_keys().collect())
    }

    /// Our routes with the kernel's own message for each (deleting with it removes exactly that route,
    /// whatever attributes it has).
    async fn ours_listed(&self) -> Result<BTreeMap<PodRoute, RouteMessage>> {
        let mut out = BTreeMap::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(r) = s.try_next().await.map_err(nl("list routes"))? {
                if let Some(pr) = parse_ours(&r) {
                    out.insert(pr, r);
                }
            }
        }
        Ok(out)
    }

    /// Converges our routes to `want`: adds (replace) missing ones, deletes ours that are not wanted.
    /// Every route is tried; failures are collected in [`RouteChanges::failed`]. Errs only when our
    /// routes cannot be listed.
    pub async fn sync(&self, want: &BTreeSet<PodRoute>) -> Result<RouteChanges> {
        self.sync_with(want, &BTreeMap::new()).await
    }

    /// [`Routes::sync`], with the overlay device index per family (true: IPv4) for the overlay
    /// routes; an overlay route whose device is missing fails (and is retried).
    pub async fn sync_with(
        &self,
        want: &BTreeSet<PodRoute>,
        devices: &BTreeMap<bool, u32>,
    ) -> Result<RouteChanges> {
        let have = self.ours_listed().await?;
        let mut changes = RouteChanges::default();
        for (r, msg) in have.iter().filter(|(r, _)| !want.contains(*r)) {
            match self.handle.route().del(msg.clone()).execute().await {
                Ok(()) => changes.removed.push(r.clone()),
                Err(e) => changes.failed.push((r.clone(), nl("delete route")(e))),
            }
        }
        for r in want.iter().filter(|r| !have.contains_key(*r)) {
            let msg = match message(r, devices) {
                Ok(m) => m,
                Err(e) => {
                    changes.failed.push((r.clone(), e));
                    continue;
                }
            };
            // Never `replace`: a route to the same destination that is not ours (a connected route,
            // an operator's) must stay; the add then fails (EEXIST) and is reported.
            match self.handle.route().add(msg).execute().await {
                Ok(()) => changes.added.push(r.clone()),
                Err(e) => {
                    let action = match &e {
                        rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == libc::EEXIST => {
                            "add route (a route to this destination that is not ours is in the way; it is left alone)"
                        }
                        rtnetlink::Error::NetlinkError(m)
                            if m.raw_code().abs() == libc::ENETUNREACH =>
                        {
                            "add route (the node's InternalIP is not on a directly connected link)"
                        }
                        _ => "add route",
                    };
                    changes.failed.push((r.clone(), nl(action)(e)));
                }
            }
        }
        Ok(changes)
    }

    /// Deletes all our routes (cleanup), default routes included. Returns how many were removed;
    /// errs naming every route that could not be.
    pub async fn remove_all(&self) -> Result<usize> {
        let c = self.sync(&BTreeSet::new()).await?;
        if c.failed.is_empty() {
            return Ok(c.removed.len());
        }
        let failed: Vec<String> = c.failed.iter().map(|(r, e)| format!("{r}: {e}")).collect();
        Err(Error::Netlink {
            action: "delete routes",
            message: failed.join("; "),
        })
    }
}

fn bad<E: std::fmt::Display>(e: E) -> Error {
    Error::Netlink {
        action: "build route",
        message: e.to_string(),
    }
}

fn message(r: &PodRoute, devices: &BTreeMap<bool, u32>) -> Result<RouteMessage> {
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.destination.addr(), r.destination.prefix_len())
        .map_err(bad)?
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if r.hop == Hop::Unreachable {
        return Ok(b.kind(RouteType::Unreachable).build());
    }
    let b = b.gateway(r.via).map_err(bad)?;
    if r.hop == Hop::Gateway {
        return Ok(b.build());
    }
    let dev = devices
        .get(&r.destination.addr().is_ipv4())
        .ok_or_else(|| Error::Netlink {
            action: "build route",
            message: format!(
                "overlay route to {}: our overlay device of that family is missing (see the overlay errors above)",
                r.destination
            ),
        })?;
    Ok(b.output_interface(*dev).onlink().build())
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
    // The kernel sends no RTA_DST for a default route (prefix length 0), and a route of ours without a
    // gateway could only have been changed behind our back: both are still ours, recognised by the
    // family, and removed when not wanted.
    let unspecified = match r.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let dst = match dst {
        Some(d) => d,
        None if r.header.destination_prefix_length == 0 => unspecified,
        None => return None,
    };
    let destination = IpNet::new(dst, r.header.destination_prefix_length).ok()?;
    let hop = if r.header.kind == RouteType::Unreachable {
        Hop::Unreachable
    } else if r.header.flags.contains(RouteFlags::Onlink) {
        Hop::Overlay
    } else {
        Hop::Gateway
    };
    Some(PodRoute {
        destination,
        via: via.unwrap_or(unspecified),
        hop,
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
            ..Node::default()
        };
        (name.to_string(), n)
    }

    /// The index answers what walking every Node in name order answers (the walk it replaced):
    /// for many Nodes with overlapping, shared and pod-network addresses, both families, every
    /// CIDR asked names the same Node and address, or none.
    #[test]
    fn the_node_address_index_finds_what_a_walk_of_the_nodes_finds() {
        let walk = |cidr: &IpNet, nodes: &BTreeMap<String, Node>, me: &str, cc: &[IpNet]| {
            nodes.iter().find_map(|(holder, h)| {
                node_addresses(holder, h, me, cc)
                    .find(|ip| cidr.contains(*ip))
                    .map(|ip| (holder.clone(), *ip))
            })
        };
        let cluster: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let mut nodes = BTreeMap::new();
        let mut x: u32 = 7;
        let mut next = move || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            x >> 8
        };
        for i in 0..300u32 {
            let r = next();
            // Few distinct addresses, so Nodes share them; some inside the cluster CIDR.
            let v4 = if r % 5 == 0 {
                format!("10.244.{}.{}", r % 4, next() % 8)
            } else {
                format!("192.168.{}.{}", r % 3, next() % 16)
            };
            let v6 = format!("fd00::{:x}", next() % 32);
            let ips: Vec<&str> = match r % 3 {
                0 => vec![&v4, &v6],
                1 => vec![&v6, &v4],
                _ => vec![&v4],
            };
            nodes.extend([node(&format!("n{:03}", (i * 37) % 300), &[], &ips)]);
        }
        let mut asked = 0;
        for cidr in [
            "192.168.0.0/16",
            "192.168.1.0/24",
            "192.168.2.8/29",
            "192.168.0.3/32",
            "10.244.1.0/24",
            "10.244.0.0/16",
            "172.16.0.0/12",
            "fd00::/64",
            "fd00::10/124",
            "fd00::1f/128",
            "fd01::/64",
        ] {
            let cidr: IpNet = cidr.parse().unwrap();
            for me in ["n000", "n150", "nobody"] {
                for cc in [&cluster[..], &[]] {
                    let index = NodeAddressIndex::new(&nodes, me, cc);
                    let got = index.first_inside(&cidr).map(|(n, ip)| (n.to_string(), ip));
                    assert_eq!(got, walk(&cidr, &nodes, me, cc), "{cidr} as {me}, {cc:?}");
                    asked += usize::from(got.is_some());
                }
            }
        }
        assert!(
            asked > 30,
            "the cases hardly ever found an address ({asked})"
        );
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
        let plan = desired_routes(&nodes, "a", &[]);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert!(plan.refused.is_empty(), "{:?}", plan.refused);
        let r: Vec<_> = plan
            .routes
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
        let plan = desired_routes(&nodes, "a", &[]);
        assert!(plan.routes.is_empty());
        assert!(plan.warnings[0].contains("node b"), "{:?}", plan.warnings);
    }

    fn routes(plan: &RoutePlan) -> Vec<String> {
        plan.routes
            .iter()
            .map(|r| format!("{} via {}", r.destination, r.via))
            .collect()
    }

    fn refused(plan: &RoutePlan) -> Vec<String> {
        plan.refused
            .iter()
            .map(|r| format!("{} {} {}", r.node, r.cidr, r.reason.label()))
            .collect()
    }

    #[test]
    fn a_default_route_or_too_wide_pod_cidr_is_refused_and_the_nodes_other_cidrs_still_route() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.0.1"])]);
        nodes.extend([node(
            "evil",
            &[
                "0.0.0.0/0",
                "10.0.0.0/8",
                "::/0",
                "fd00::/32",
                "10.244.9.0/24",
            ],
            &["192.168.0.9", "fd00::9"],
        )]);
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(routes(&plan), vec!["10.244.9.0/24 via 192.168.0.9"]);
        assert_eq!(
            refused(&plan),
            vec![
                "evil 0.0.0.0/0 too_wide",
                "evil 10.0.0.0/8 too_wide",
                "evil ::/0 too_wide",
                "evil fd00::/32 too_wide"
            ]
        );
        assert!(plan.refused[0].to_string().contains("node evil"));
        assert!(plan.refused[0].to_string().contains("0.0.0.0/0"));
    }

    #[test]
    fn cluster_cidr_takes_one_per_family_and_drops_host_bits() {
        let c = |s: &[&str]| {
            cluster_cidrs(&s.iter().map(|c| c.parse().unwrap()).collect::<Vec<IpNet>>())
        };
        let ok = c(&["10.244.1.1/16", "fd00:10:244::/56"]).unwrap();
        assert_eq!(ok[0].to_string(), "10.244.0.0/16");
        let e = c(&["10.244.0.0/16", "10.245.0.0/16"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most one") && e.contains("IPv4"), "{e}");
        assert!(c(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_pod_cidr_containing_a_node_address_is_refused() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.77.1"])]);
        nodes.extend([node(
            "b",
            &["192.168.77.0/24", "10.244.1.0/24"],
            &["192.168.77.2"],
        )]);
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(routes(&plan), vec!["10.244.1.0/24 via 192.168.77.2"]);
        assert_eq!(
            refused(&plan),
            vec!["b 192.168.77.0/24 contains_node_address"]
        );
        assert!(plan.refused[0]
            .to_string()
            .contains("InternalIP 192.168.77.1 of node a"));
    }

    #[test]
    fn a_node_claiming_a_pods_address_is_refused_and_cannot_take_the_range_that_holds_it() {
        // "evil" claims the address of a pod on "b" as its InternalIP. Without a cluster CIDR we
        // cannot tell the pod's address from a node's: b's range is refused for holding it, as
        // before. With one, the address is a pod's by definition: evil's ranges of that family are
        // refused (no route via the pod, no tunnel peer), and b's range keeps its route.
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.0.1"])]);
        nodes.extend([node("b", &["10.244.1.0/24"], &["192.168.0.2"])]);
        nodes.extend([node(
            "evil",
            &["10.244.9.0/24", "fd00:10:244:9::/64"],
            &["10.244.1.7", "fd00::9"],
        )]);
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(
            refused(&plan),
            vec!["b 10.244.1.0/24 contains_node_address"]
        );
        let cluster: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let plan = desired_routes(&nodes, "a", &cluster);
        assert_eq!(
            routes(&plan),
            vec![
                "10.244.1.0/24 via 192.168.0.2",
                "fd00:10:244:9::/64 via fd00::9"
            ]
        );
        assert_eq!(
            refused(&plan),
            vec!["evil 10.244.9.0/24 node_address_in_pod_network"]
        );
        let line = plan.refused[0].to_string();
        assert!(
            line.contains("node evil")
                && line.contains("10.244.1.7 (inside the cluster CIDR 10.244.0.0/16)"),
            "{line}"
        );
        // Seen from b, whose own range holds the address: b's range stays its own (an unreachable
        // route, not refused under b's name).
        let plan = desired_routes(&nodes, "b", &cluster);
        assert!(plan.own.contains(&"10.244.1.0/24".parse().unwrap()));
        assert!(
            plan.refused.iter().all(|r| r.node == "evil"),
            "{:?}",
            plan.refused
        );
        // Our own InternalIP is never judged: a misconfigured self still counts as a node address.
        nodes.extend([node("a", &["10.244.0.0/24"], &["10.244.1.9"])]);
        let plan = desired_routes(&nodes, "a", &cluster);
        assert_eq!(
            refused(&plan),
            vec![
                "b 10.244.1.0/24 contains_node_address",
                "evil 10.244.9.0/24 node_address_in_pod_network"
            ]
        );
    }

    #[test]
    fn a_pod_cidr_overlapping_our_own_nodes_is_refused() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.0.1"])]);
        nodes.extend([node("b", &["10.244.0.128/25"], &["192.168.0.2"])]);
        nodes.extend([node("c", &["10.244.0.0/24"], &["192.168.0.3"])]);
        let plan = desired_routes(&nodes, "a", &[]);
        assert!(plan.routes.is_empty(), "{:?}", routes(&plan));
        assert_eq!(
            refused(&plan),
            vec![
                "b 10.244.0.128/25 overlaps_own_node",
                "c 10.244.0.0/24 overlaps_own_node"
            ]
        );
    }

    #[test]
    fn two_nodes_claiming_overlapping_ranges_are_both_refused_and_the_others_still_route() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.0.1"])]);
        // "aaa" sorts before "n1" and claims n1's range: neither gets a route (no hijack by name).
        nodes.extend([node("aaa", &["10.244.1.0/24"], &["192.168.0.66"])]);
        nodes.extend([node("n1", &["10.244.1.0/24"], &["192.168.0.2"])]);
        // Nested claims: a /20 covering n3's /24, with a same-node /24 inside it.
        nodes.extend([node(
            "wide",
            &["10.244.16.0/20", "10.244.17.0/24"],
            &["192.168.0.7"],
        )]);
        nodes.extend([node("n3", &["10.244.17.0/24"], &["192.168.0.3"])]);
        nodes.extend([node(
            "n4",
            &["10.244.4.0/24", "fd00:10:244:4::/64"],
            &["192.168.0.4", "fd00::4"],
        )]);
        nodes.extend([node("n5", &["fd00:10:244:4::/64"], &["fd00::5"])]);
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(routes(&plan), vec!["10.244.4.0/24 via 192.168.0.4"]);
        assert_eq!(
            refused(&plan),
            vec![
                "aaa 10.244.1.0/24 overlaps_other_node",
                "n1 10.244.1.0/24 overlaps_other_node",
                "n3 10.244.17.0/24 overlaps_other_node",
                "n4 fd00:10:244:4::/64 overlaps_other_node",
                "n5 fd00:10:244:4::/64 overlaps_other_node",
                "wide 10.244.16.0/20 overlaps_other_node",
                "wide 10.244.17.0/24 overlaps_other_node",
            ]
        );
        let n1 = plan.refused.iter().find(|r| r.node == "n1").unwrap();
        assert!(n1.to_string().contains("node aaa"), "{n1}");
        // The decision does not depend on the order the Nodes are seen in.
        let mut reversed: Vec<_> = nodes.into_iter().collect();
        reversed.reverse();
        let again = desired_routes(&reversed.into_iter().collect(), "a", &[]);
        assert_eq!(again, plan);
    }

    #[test]
    fn a_pod_cidr_outside_the_cluster_cidr_of_its_family_is_refused() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node("a", &["10.244.0.0/24"], &["192.168.0.1"])]);
        nodes.extend([node(
            "b",
            &["10.244.1.0/24", "10.99.0.0/24", "fd00:10:244:1::/64"],
            &["192.168.0.2", "fd00::2"],
        )]);
        // Only an IPv4 cluster CIDR: IPv6 ranges are not checked against one.
        let plan = desired_routes(&nodes, "a", &["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(
            routes(&plan),
            vec![
                "10.244.1.0/24 via 192.168.0.2",
                "fd00:10:244:1::/64 via fd00::2"
            ]
        );
        assert_eq!(refused(&plan), vec!["b 10.99.0.0/24 outside_cluster_cidr"]);
        assert!(plan.refused[0].to_string().contains("10.244.0.0/16"));
        let plan = desired_routes(
            &nodes,
            "a",
            &[
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:245::/48".parse().unwrap(),
            ],
        );
        assert_eq!(routes(&plan), vec!["10.244.1.0/24 via 192.168.0.2"]);
    }

    #[test]
    fn our_own_pod_cidrs_get_an_unreachable_route_unless_they_fail_the_checks() {
        let mut nodes = BTreeMap::new();
        nodes.extend([node(
            "a",
            &[
                "10.244.0.0/24",
                "fd00:10:244::/64",
                "::/0",
                "192.168.0.0/24",
                "10.99.0.0/24",
            ],
            &["192.168.0.1"],
        )]);
        nodes.extend([node("b", &["10.244.1.0/24"], &["192.168.0.2"])]);
        let plan = desired_routes(&nodes, "a", &["10.0.0.0/8".parse().unwrap()]);
        let own: Vec<String> = plan.own.iter().map(IpNet::to_string).collect();
        assert_eq!(
            own,
            vec!["10.99.0.0/24", "10.244.0.0/24", "fd00:10:244::/64"]
        );
        // Ours are refused under our name: a default route or one over the node addresses would
        // cut this node off; one outside the cluster CIDR is not a pod range.
        assert_eq!(
            refused(&plan),
            vec!["a 192.168.0.0/24 outside_cluster_cidr", "a ::/0 too_wide",]
        );
        let plan = desired_routes(&nodes, "a", &[]);
        assert_eq!(
            refused(&plan),
            vec!["a 192.168.0.0/24 contains_node_address", "a ::/0 too_wide",]
        );
        // Another node's routes are unchanged by ours.
        assert_eq!(routes(&plan), vec!["10.244.1.0/24 via 192.168.0.2"]);
        let r = PodRoute::unreachable("fd00:10:244::/64".parse().unwrap());
        assert_eq!(
            r.to_string(),
            "unreachable fd00:10:244::/64 (our own pod range)"
        );
        assert_eq!(r.via, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }

    #[test]
    fn an_unreachable_route_is_written_and_read_back_as_one() {
        let want = PodRoute::unreachable("10.244.0.0/24".parse().unwrap());
        let m = message(&want, &BTreeMap::new()).unwrap();
        assert_eq!(m.header.kind, RouteType::Unreachable);
        assert!(
            !m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_))),
            "{m:?}"
        );
        assert_eq!(parse_ours(&m), Some(want));
        let gw = PodRoute {
            destination: "10.244.1.0/24".parse().unwrap(),
            via: "192.168.0.2".parse().unwrap(),
            hop: Hop::Gateway,
        };
        let m = message(&gw, &BTreeMap::new()).unwrap();
        assert_eq!(parse_ours(&m), Some(gw));
    }

    fn our_message(family: AddressFamily, prefix: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.destination_prefix_length = prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        m.attributes = attrs;
        m
    }

    #[test]
    fn our_default_route_without_a_destination_attribute_is_recognised_as_ours() {
        // The kernel omits RTA_DST for 0.0.0.0/0 and ::/0: such a route of ours used to go unseen,
        // so neither the agent nor `cleanup` removed it.
        let gw = RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(192, 168, 0, 9)));
        let r = parse_ours(&our_message(AddressFamily::Inet, 0, vec![gw])).unwrap();
        assert_eq!(r.destination.to_string(), "0.0.0.0/0");
        assert_eq!(r.via.to_string(), "192.168.0.9");
        let r = parse_ours(&our_message(AddressFamily::Inet6, 0, vec![])).unwrap();
        assert_eq!(r.destination.to_string(), "::/0");
        // Not ours: another protocol.
        let mut other = our_message(AddressFamily::Inet, 0, vec![]);
        other.header.protocol = RouteProtocol::Boot;
        assert!(parse_ours(&other).is_none());
    }
}
