//! `compile(state, node)`: NetworkPolicy semantics, decided here and only here.
//!
//! The result holds the semantic model (per local pod and direction: isolated or not, which
//! policies and rules allow, with peers and ports resolved to addresses) and the [`Ruleset`]
//! rendered from exactly that model. `explain` reads the same model.

pub mod admit;
mod build;
pub mod counters;
pub mod incremental;
mod index;
pub mod intervals;
mod owners;
mod resolve;

use crate::model::{Action, Direction, Protocol, Tier};
use crate::ruleset::{names, Family, Ruleset};
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
    /// Keys of the ClusterNetworkPolicies selecting the pod for ingress (with ingress rules), per
    /// tier, in evaluation order.
    pub cluster_ingress: TierLists,
    /// Same for egress.
    pub cluster_egress: TierLists,
    /// Keys of the NetworkPolicies in audit mode selecting the pod for ingress, sorted: they
    /// isolate nothing; what they would drop is counted and logged.
    pub audit_ingress: Vec<String>,
    /// Same for egress.
    pub audit_egress: Vec<String>,
}

/// The ClusterNetworkPolicies of one direction of a pod, per tier, in evaluation order
/// (priority, then name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TierLists {
    pub admin: Vec<String>,
    pub baseline: Vec<String>,
}

impl TierLists {
    pub fn tier(&self, tier: Tier) -> &[String] {
        match tier {
            Tier::Admin => &self.admin,
            Tier::Baseline => &self.baseline,
        }
    }
    pub fn tier_mut(&mut self, tier: Tier) -> &mut Vec<String> {
        match tier {
            Tier::Admin => &mut self.admin,
            Tier::Baseline => &mut self.baseline,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.baseline.is_empty()
    }
}

impl LocalPod {
    /// Policies selecting the pod in a direction (empty = not isolated, semantics 1).
    pub fn policies(&self, dir: Direction) -> &[String] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
    /// Whether a NetworkPolicy selects the pod in `dir` (it is isolated: they decide).
    pub fn isolated(&self, dir: Direction) -> bool {
        !self.policies(dir).is_empty()
    }
    /// ClusterNetworkPolicies selecting the pod in a direction.
    pub fn cluster(&self, dir: Direction) -> &TierLists {
        match dir {
            Direction::Ingress => &self.cluster_ingress,
            Direction::Egress => &self.cluster_egress,
        }
    }
    /// NetworkPolicies in audit mode selecting the pod in a direction.
    pub fn audit(&self, dir: Direction) -> &[String] {
        match dir {
            Direction::Ingress => &self.audit_ingress,
            Direction::Egress => &self.audit_egress,
        }
    }
    /// The policies in audit mode that would drop something of the pod in `dir` were they
    /// enforced: those selecting it while no enforced NetworkPolicy does. (Where one does, the pod
    /// is isolated already and another policy could only allow more: NetworkPolicies add up.)
    pub fn audited(&self, dir: Direction) -> &[String] {
        if self.isolated(dir) {
            &[]
        } else {
            self.audit(dir)
        }
    }
    /// The name of the pod's group chain in `dir` (pods with the same policies of every kind share
    /// one).
    pub fn group_chain(&self, dir: Direction) -> String {
        let tiers = self.cluster(dir);
        crate::ruleset::names::group_chain(
            self.policies(dir),
            &tiers.admin,
            &tiers.baseline,
            self.audited(dir),
            dir,
        )
    }
    /// Whether any policy of any tier (or in audit mode) applies to the pod in `dir` (then its
    /// packets of that direction go through its group chain; otherwise they cost one map miss).
    pub fn governed(&self, dir: Direction) -> bool {
        self.isolated(dir) || !self.cluster(dir).is_empty() || !self.audited(dir).is_empty()
    }
}

/// A ClusterNetworkPolicy that selects at least one local pod, with its rules resolved by the same
/// resolution as a NetworkPolicy's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledClusterPolicy {
    /// `cnp:<name>`
    pub key: String,
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    /// Local pods it selects (in either direction).
    pub selected: BTreeSet<String>,
    pub ingress: Vec<CompiledClusterRule>,
    pub egress: Vec<CompiledClusterRule>,
}

impl CompiledClusterPolicy {
    pub fn rules(&self, dir: Direction) -> &[CompiledClusterRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// One rule of a ClusterNetworkPolicy, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledClusterRule {
    /// Peers and ports, as a NetworkPolicy rule's; `index` is the rule's place in its direction.
    pub rule: CompiledRule,
    pub name: Option<String>,
    pub action: Action,
    /// Matches nothing (an Accept rule whose every peer had no known field).
    pub inert: bool,
}

impl CompiledClusterRule {
    /// `name`, or `#<index>`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("#{}", self.rule.index),
        }
    }
    /// Whether the rule matches a packet whose peer is `peer`, going to `dst` on `proto`/`port`
    /// (`None`: a protocol without ports, which only a rule without `protocols` matches).
    pub fn matches(
        &self,
        peer: IpAddr,
        dst: IpAddr,
        proto: Option<Protocol>,
        port: u16,
    ) -> Option<PeerMatch> {
        if self.inert {
            return None;
        }
        let ports = match proto {
            Some(proto) => self.rule.ports.matches(dst, proto, port),
            None => self.rule.ports.any,
        };
        self.rule.peers.matches(peer).filter(|_| ports)
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
    /// In audit mode: its rules are only evaluated in the audit chains (its part holds its sets,
    /// no chain of its own).
    pub audit: bool,
    /// Over the node's [`crate::model::PolicyLimits`]: its directions hold no rules (it isolates
    /// the pods it selects and allows nothing).
    pub refused: Option<Refusal>,
}

impl CompiledPolicy {
    pub fn rules(&self, dir: Direction) -> Option<&[CompiledRule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Pods its pod peers select, summed over the peers (what [`crate::model::PolicyLimits::peer_pods`]
    /// bounds); 0 when it was refused for its number of pod peers (they were not resolved).
    pub fn peer_pods(&self) -> usize {
        match self.refused {
            Some(Refusal::PeerPods { found, .. }) => found,
            Some(Refusal::PodPeers { .. }) => 0,
            None => Direction::BOTH
                .into_iter()
                .flat_map(|d| self.rules(d).unwrap_or_default())
                .map(|r| r.peers.matched)
                .sum(),
        }
    }
}

/// Why a policy was refused, with what it came to and the limit it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Pod peers over all its rules (`found` of at most `limit`).
    PodPeers { found: usize, limit: usize },
    /// Pods its pod peers select, summed over the peers.
    PeerPods { found: usize, limit: usize },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PodPeers { found, limit } => write!(
                f,
                "it has {found} pod peers (podSelector/namespaceSelector entries), over the limit of {limit} (--max-policy-pod-peers)"
            ),
            Refusal::PeerPods { found, limit } => write!(
                f,
                "its pod peers select {found} pods (summed over the peers), over the limit of {limit} (--max-policy-peer-pods)"
            ),
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

    /// Whether its named-port entries follow from its pod peers and port names alone, so that
    /// every such rule of any policy holds one set (spec-derived): an egress rule whose peers
    /// are all pod peers. An ingress rule's entries are the pods its policy selects; an egress
    /// rule with ipBlocks, `nodes` or no peers reaches every subject pod at the addresses those
    /// hold.
    pub(crate) fn shares_named(&self, dir: Direction) -> bool {
        self.ports.uses_named && self.peers.share_named_ports(dir)
    }

    /// Whether its nft rules look its peers up (in a peer or ipBlock set): every rule but an
    /// egress rule whose ports are all named, whose lookup of the destination with its port
    /// implies the peer (its entries are peer addresses by construction, `NamedPortScope`).
    /// Such a rule builds no peer or ipBlock set: none of its rules would name it.
    pub(crate) fn looks_peers_up(&self, dir: Direction) -> bool {
        !(dir == Direction::Egress
            && self.ports.uses_named
            && !self.ports.any
            && self.ports.ranges.is_empty())
    }

    /// Name of its named-port set of `fam` (it is a rule of the policy `policy_key`, in `dir`):
    /// named by content when [`Self::shares_named`], else its own.
    pub(crate) fn named_set(&self, policy_key: &str, dir: Direction, fam: Family) -> String {
        if self.shares_named(dir) {
            names::shared_named_set(&self.peers.pod_key, &self.ports.named_key, fam)
        } else {
            names::rule_set(
                names::NAMED_SET_PREFIX,
                policy_key,
                dir,
                self.index,
                Some(fam),
            )
        }
    }
}

/// How a peer matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMatch {
    /// The rule has no `from`/`to`: any peer.
    Any,
    /// The address belongs to a pod its selectors chose.
    Pod,
    /// The address is inside one of its ipBlocks (and outside their excepts), or a
    /// ClusterNetworkPolicy's networks.
    IpBlock,
    /// The address is one of a Node's its `nodes` peer selects (ClusterNetworkPolicy).
    Node,
}

/// The peers of a rule, resolved to addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerSet {
    /// No `from`/`to` (or empty): any peer (semantics 12).
    pub any: bool,
    /// The rule has pod/namespace selector peers (spec-derived; decides the rule's shape).
    pub uses_pods: bool,
    /// Who its pod peers are (each one's namespace scope and pod selector, in a canonical
    /// order; empty without pod peers): the identity of its peer sets, which every rule with the
    /// same pod peers shares (`names::peer_set`).
    pub pod_key: String,
    /// The same, readable (selectors as written in the API), for the sets' comments.
    pub pod_label: String,
    /// Keys of the pods the selectors chose. Shared (copy on write) with every rule whose pod
    /// peers resolved alike in the same compile: at 100k pods the per-rule copies were the largest
    /// part of the agent's memory.
    pub pods: std::sync::Arc<BTreeSet<crate::model::PodKey>>,
    /// Their addresses (shared likewise).
    pub pod_ips: std::sync::Arc<BTreeSet<IpAddr>>,
    /// Pods its pod peers select, summed over the peers (a pod two peers select counts twice;
    /// `pods` holds it once): what it counts against [`crate::model::PolicyLimits::peer_pods`].
    pub matched: usize,
    /// The rule has IPv4 / IPv6 ipBlocks (spec-derived).
    pub has_v4_blocks: bool,
    pub has_v6_blocks: bool,
    /// The rule has `nodes` peers (spec-derived; their addresses are in `blocks` too, so the
    /// rule has a CIDR set of both families).
    pub uses_nodes: bool,
    /// Addresses of the Nodes its `nodes` peers select.
    pub node_ips: BTreeSet<IpAddr>,
    /// Union of all ipBlocks minus their excepts (and of the node addresses): disjoint inclusive
    /// ranges.
    pub blocks: Vec<(IpAddr, IpAddr)>,
}

impl PeerSet {
    /// How many of its pod addresses are of `fam`, counted up to two (what decides whether
    /// the family's rule exists, and whether a change is its first or last address).
    pub(crate) fn pod_ips_of_family_upto_two(&self, fam: Family) -> usize {
        use std::net::{Ipv4Addr, Ipv6Addr};
        // Addresses sort IPv4 before IPv6: a family is one range.
        let range = match fam {
            Family::V4 => (
                std::ops::Bound::Included(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                std::ops::Bound::Included(IpAddr::V4(Ipv4Addr::BROADCAST)),
            ),
            Family::V6 => (
                std::ops::Bound::Included(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                std::ops::Bound::Unbounded,
            ),
        };
        self.pod_ips.range(range).take(2).count()
    }

    /// Whether a rule in `dir` with these peers shares its named-port entries with every rule
    /// of the same pod peers and port names ([`CompiledRule::shares_named`]; spec-derived): an
    /// egress rule whose peers are pod peers only (no ipBlocks, `nodes` or "any peer").
    pub(crate) fn share_named_ports(&self, dir: Direction) -> bool {
        dir == Direction::Egress
            && self.uses_pods
            && !(self.any || self.has_v4_blocks || self.has_v6_blocks || self.uses_nodes)
    }

    pub fn matches(&self, ip: IpAddr) -> Option<PeerMatch> {
        if self.any {
            Some(PeerMatch::Any)
        } else if self.pod_ips.contains(&ip) {
            Some(PeerMatch::Pod)
        } else if self.node_ips.contains(&ip) {
            Some(PeerMatch::Node)
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
    /// Its named ports as `protocol/name`, sorted, each once (spec-derived; empty without
    /// named ports): with the pod peers, the identity of a shared named-port set
    /// (`CompiledRule::named_set`).
    pub named_key: String,
    /// Named ports resolved per destination pod: (pod address, protocol, port) (semantics 34).
    /// Shared (copy on write) with every egress rule of the same pod peers and port names
    /// (`CompiledRule::shares_named`).
    pub named: std::sync::Arc<BTreeSet<(IpAddr, Protocol, u16)>>,
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
    /// ClusterNetworkPolicies selecting at least one local pod, by `cnp:<name>`.
    pub cluster_policies: BTreeMap<String, CompiledClusterPolicy>,
    /// Addresses of local attachments still pending (their pod is not known yet).
    pub pending: BTreeSet<IpAddr>,
    /// (host veth, address) of every local pod interface: a packet coming in through a pod's veth
    /// must carry one of that pod's addresses (the source guard).
    pub sources: BTreeSet<(String, IpAddr)>,
    /// This node's egress NAT, as the agent set it.
    pub egress_nat: Option<crate::model::EgressNat>,
    /// This node's flow log, as the agent set it.
    pub flow_log: Option<crate::model::FlowLog>,
    /// This node's overlay port and peers, as the agent set them.
    pub tunnel: Option<crate::model::Tunnel>,
    pub ruleset: Ruleset,
    /// Problems the compiler worked around, each naming the objects (for the agent's log).
    pub warnings: Vec<String>,
    /// Pairs of ClusterNetworkPolicies of one tier with the same priority that select the same
    /// local pod in the same direction: ordered by name (a warning each, and a metric).
    pub priority_ties: Vec<PriorityTie>,
}

/// Two ClusterNetworkPolicies of one tier and priority both selecting a local pod in `direction`;
/// `first` (by name) is evaluated before `second`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PriorityTie {
    pub direction: Direction,
    pub tier: Tier,
    pub priority: u32,
    pub first: String,
    pub second: String,
}

impl Compiled {
    /// The local pod owning an address, if any.
    pub fn local_pod_by_ip(&self, ip: IpAddr) -> Option<&LocalPod> {
        self.pods.values().find(|p| p.ips.contains(&ip))
    }

    /// The NetworkPolicies selecting the local pod `pod` (a key) in `dir` that this node refused
    /// for their size (they isolate it and allow nothing), each as `namespace/name (why)`: what
    /// `explain` and the flow log add to a verdict.
    pub fn refusals(&self, pod: &str, dir: Direction) -> Vec<String> {
        let Some(lp) = self.pods.get(pod) else {
            return Vec::new();
        };
        lp.policies(dir)
            .iter()
            .filter_map(|k| {
                let why = self.policies.get(k)?.refused?;
                Some(format!("{k} ({why})"))
            })
            .collect()
    }

    /// The lockdown table of this node: the base chains with every local pod address pending and
    /// no policy (`build/lockdown.rs`). What the agent commits first when its table must be
    /// restored in full: every new connection of a local pod is dropped until the full table
    /// replaces it, which takes the kernel far longer to commit. `also`: addresses pending too
    /// (the attachment records' as they are now, when this compiled state may predate some).
    pub fn lockdown(&self, also: impl IntoIterator<Item = IpAddr>) -> crate::ruleset::Ruleset {
        build::lockdown(self, also)
    }
}

/// Compiles the cluster state for one node. Pure and deterministic.
pub fn compile(state: &crate::model::ClusterState, node: &str) -> Compiled {
    let ix = index::PodIndex::build(state, node);
    let mut c = resolve::resolve(state, &ix);
    let (ruleset, warnings, ties) = build::build(&c);
    c.ruleset = ruleset;
    c.warnings.extend(warnings);
    c.priority_ties = ties;
    c
}

#[cfg(test)]
mod tests;
