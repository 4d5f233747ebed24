//! `compile(state, node)`: NetworkPolicy semantics, decided here and only here.
//!
//! The result holds the semantic model (per local pod and direction: isolated or not, which
//! policies and rules allow, with peers and ports resolved to addresses) and the [`Ruleset`]
//! rendered from exactly that model. `explain` reads the same model.

pub mod admit;
mod build;
pub mod incremental;
mod index;
pub mod intervals;
mod resolve;

use crate::model::{Direction, Protocol};
use crate::ruleset::Ruleset;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// A local pod (enforced on this node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    /// `namespace/name`
    pub key: String,
    /// Status IPs ∪ IPs of this node's attachment records for the pod.
    pub ips: BTreeSet<IpAddr>,
    /// Keys of the policies selecting the pod for ingress, sorted; empty = not isolated.
    pub ingress: Vec<String>,
    /// Same for egress.
    pub egress: Vec<String>,
}

impl LocalPod {
    /// Policies selecting the pod in a direction (empty = not isolated, semantics 1).
    pub fn policies(&self, dir: Direction) -> &[String] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
    pub fn isolated(&self, dir: Direction) -> bool {
        !self.policies(dir).is_empty()
    }
}

/// A policy that selects at least one local pod, with its rules resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub key: String,
    pub namespace: String,
    pub name: String,
    /// Local pods it selects.
    pub selected: BTreeSet<String>,
    /// `Some` iff the policy applies to ingress.
    pub ingress: Option<Vec<CompiledRule>>,
    pub egress: Option<Vec<CompiledRule>>,
}

impl CompiledPolicy {
    pub fn rules(&self, dir: Direction) -> Option<&[CompiledRule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// One rule, resolved: it allows a packet iff its peer matches [`PeerSet`] and its destination
/// matches [`PortSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    /// Index of the rule in the policy's `ingress`/`egress` list.
    pub index: usize,
    pub peers: PeerSet,
    pub ports: PortSet,
}

impl CompiledRule {
    /// Whether the rule allows traffic whose peer (source for ingress, destination for egress)
    /// is `peer`, going to `dst` on `proto`/`port`.
    pub fn allows(&self, peer: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> bool {
        self.peers.matches(peer).is_some() && self.ports.matches(dst, proto, port)
    }
}

/// How a peer matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMatch {
    /// The rule has no `from`/`to`: any peer.
    Any,
    /// The address belongs to a pod its selectors chose.
    Pod,
    /// The address is inside one of its ipBlocks (and outside their excepts).
    IpBlock,
}

/// The peers of a rule, resolved to addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerSet {
    /// No `from`/`to` (or empty): any peer (semantics 12).
    pub any: bool,
    /// The rule has pod/namespace selector peers (spec-derived; decides the rule's shape).
    pub uses_pods: bool,
    /// Keys of the pods the selectors chose.
    pub pods: BTreeSet<String>,
    /// Their addresses.
    pub pod_ips: BTreeSet<IpAddr>,
    /// The rule has IPv4 / IPv6 ipBlocks (spec-derived).
    pub has_v4_blocks: bool,
    pub has_v6_blocks: bool,
    /// Union of all ipBlocks minus their excepts: disjoint inclusive ranges.
    pub blocks: Vec<(IpAddr, IpAddr)>,
}

impl PeerSet {
    pub fn matches(&self, ip: IpAddr) -> Option<PeerMatch> {
        if self.any {
            Some(PeerMatch::Any)
        } else if self.pod_ips.contains(&ip) {
            Some(PeerMatch::Pod)
        } else if intervals::ranges_contain(&self.blocks, ip) {
            Some(PeerMatch::IpBlock)
        } else {
            None
        }
    }
}

/// The destination ports of a rule, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet {
    /// No `ports`: every port of every protocol (semantics 29).
    pub any: bool,
    /// Numeric ports and ranges (port omitted = 0-65535), merged per protocol.
    pub ranges: Vec<(Protocol, u16, u16)>,
    /// The rule has named ports (spec-derived).
    pub uses_named: bool,
    /// Named ports resolved per destination pod: (pod address, protocol, port) (semantics 34).
    pub named: BTreeSet<(IpAddr, Protocol, u16)>,
}

impl PortSet {
    pub fn matches(&self, dst: IpAddr, proto: Protocol, port: u16) -> bool {
        self.any
            || self
                .ranges
                .iter()
                .any(|(p, a, b)| *p == proto && *a <= port && port <= *b)
            || self.named.contains(&(dst, proto, port))
    }
}

/// The compiled state of one node: semantic model and the ruleset built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub node: String,
    /// Local pods by `namespace/name`.
    pub pods: BTreeMap<String, LocalPod>,
    /// Policies selecting at least one local pod, by `namespace/name`.
    pub policies: BTreeMap<String, CompiledPolicy>,
    /// Addresses of local attachments still pending (their pod is not known yet).
    pub pending: BTreeSet<IpAddr>,
    /// (host veth, address) of every local pod interface: a packet coming in through a pod's veth
    /// must carry one of that pod's addresses (the source guard).
    pub sources: BTreeSet<(String, IpAddr)>,
    /// This node's egress NAT, as the agent set it.
    pub egress_nat: Option<crate::model::EgressNat>,
    pub ruleset: Ruleset,
    /// Problems the compiler worked around, each naming the objects (for the agent's log).
    pub warnings: Vec<String>,
}

impl Compiled {
    /// The local pod owning an address, if any.
    pub fn local_pod_by_ip(&self, ip: IpAddr) -> Option<&LocalPod> {
        self.pods.values().find(|p| p.ips.contains(&ip))
    }
}

/// Compiles the cluster state for one node. Pure and deterministic.
pub fn compile(state: &crate::model::ClusterState, node: &str) -> Compiled {
    let ix = index::PodIndex::build(state, node);
    let mut c = resolve::resolve(state, &ix);
    let (ruleset, warnings) = build::build(&c);
    c.ruleset = ruleset;
    c.warnings.extend(warnings);
    c
}

#[cfg(test)]
mod tests;
