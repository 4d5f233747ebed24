//! The trimmed cluster state the compiler reads: only what NetworkPolicy semantics need.
//!
//! Objects enter through the `*_from_k8s` conversions (which validate exactly as the API server
//! would and name the object and field on error) and through [`Change`]s applied to a
//! [`ClusterState`].

mod cluster;
pub mod cluster_api;
mod convert;
mod interner;
mod labels;
mod selector;
mod shared;

pub use cluster::{
    cluster_key, Action, ClusterPolicy, ClusterRule, ClusterSubject, Tier, CLUSTER_KEY_PREFIX,
};
pub use cluster_api::ClusterNetworkPolicyApi;
pub use convert::{
    cluster_policy_from_api, namespace_from_k8s, node_from_k8s, pod_from_k8s, policy_from_k8s,
};
pub use labels::Labels;
pub use selector::{LabelSelector, Requirement, Values};
pub use shared::{PodSharing, PodUid, SharedStr};

use palisade_contract::Attachment;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

/// Label every namespace carries, equal to its name (semantics 18).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Transport protocols NetworkPolicy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`; case-sensitive as the API server is).
    pub fn from_api(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
    /// The API spelling.
    pub fn as_api(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
    /// The nft `inet_proto` name.
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
    /// All protocols, for generators and tests.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api())
    }
}

/// Traffic direction relative to the selected (local) pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];
    /// Short tag used in derived names (`in` / `eg`).
    pub fn tag(self) -> &'static str {
        match self {
            Self::Ingress => "in",
            Self::Egress => "eg",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// A namespace: its name and labels (always including [`NAMESPACE_NAME_LABEL`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// Builds a namespace, adding `kubernetes.io/metadata.name` (the API server always sets it).
    pub fn new(name: impl Into<String>, mut labels: Labels) -> Self {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Self { name, labels }
    }
}

/// Pod lifecycle phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// Parses `status.phase`; absent or unknown spellings are `Pending`/`Unknown`.
    pub fn from_api(s: Option<&str>) -> Self {
        match s {
            None | Some("Pending") => Self::Pending,
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some(_) => Self::Unknown,
        }
    }
    /// Succeeded and Failed pods have released their IPs: they are gone for policy purposes.
    pub fn is_terminated(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// One declared container port (used to resolve named ports, semantics 34).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod, trimmed, and sized for 100k of them: its name boxed (two words, no spare capacity), its
/// namespace and node name one shared pointer each (see [`PodSharing`]), its UID 16 bytes, its
/// addresses and ports boxed slices; with the `Arc`'s counts one 128-byte allocation (it was 160,
/// with a UID's text beside it). A test keeps it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: SharedStr,
    pub name: Box<str>,
    pub uid: PodUid,
    pub labels: Labels,
    pub node_name: Option<SharedStr>,
    /// `status.podIPs` (IPv4 and/or IPv6).
    pub ips: Box<[IpAddr]>,
    pub ports: Box<[ContainerPort]>,
    pub host_network: bool,
    pub phase: PodPhase,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        pod_key(&self.namespace, &self.name)
    }
    /// Whether NetworkPolicy applies to this pod at all (not hostNetwork, not terminated).
    pub fn is_policy_subject(&self) -> bool {
        !self.host_network && !self.phase.is_terminated()
    }
}

/// `namespace/name` key used for pods and policies.
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// A pod's [`pod_key`] as the compiler holds it: allocated once, when the pod enters the
/// [`ClusterState`], and shared by every map and set that names the pod (the index, the owners of
/// each address, every peer set). At 100k pods the per-map copies of the key were ~20 MB.
pub type PodKey = Arc<str>;

/// The entries of namespace `ns` in a map keyed by [`pod_key`]: one contiguous range, since no
/// namespace name contains `/`.
pub(crate) fn namespace_entries<'m, K, V>(
    map: &'m BTreeMap<K, V>,
    ns: &str,
) -> impl Iterator<Item = (&'m K, &'m V)> + 'm
where
    K: std::borrow::Borrow<str> + Ord,
{
    // Every key starting with `ns/` and no other lies in [`ns/`, `ns0`) ('0' follows '/'): a
    // range with both ends finds its first and last leaf once, where a prefix test per key
    // compared strings for every pod (~50 ms of a full compile at 100k pods).
    let (lo, hi) = (format!("{ns}/"), format!("{ns}0"));
    map.range::<str, _>((Bound::Included(lo.as_str()), Bound::Excluded(hi.as_str())))
}

/// A node: its pod CIDRs and internal addresses (for routes), its labels and every address of
/// `status.addresses` (a ClusterNetworkPolicy's `nodes` peer).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub name: String,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    pub internal_ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Every IP address in `status.addresses` (InternalIP, ExternalIP, ...), deduplicated.
    pub addresses: Vec<IpAddr>,
}

/// Egress NAT of this node, decided by the agent (which validates the Nodes it comes from): a
/// packet from one of `sources` (the cluster's pod networks) to an address outside `exempt` (pod
/// networks, node addresses, configured exceptions) leaves with the node's address. After every
/// policy check, so policies see the pod's own address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressNat {
    pub sources: Vec<ipnet::IpNet>,
    pub exempt: Vec<ipnet::IpNet>,
}

/// This node's overlay, as the agent runs it: UDP `port` of its VXLAN devices and the underlay
/// addresses allowed to send to it (every Node's InternalIPs). The kernel decapsulates whatever
/// reaches the port from anywhere, and a decapsulated packet carries whatever inner source its
/// sender wrote: a pod (with a plain UDP socket) or an outside host could otherwise deliver packets
/// under another pod's address. Our input chain drops packets to `port` from any other source
/// before the VXLAN socket sees them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tunnel {
    pub port: u16,
    pub peers: Vec<IpAddr>,
    /// This node's InternalIPs: the only addresses other nodes encapsulate to. A datagram to
    /// another address of the node is not the overlay's, even from a peer: a pod's datagram
    /// masqueraded on its way to an address of a node that is not an InternalIP leaves with its
    /// node's (a peer's) address.
    pub local: Vec<IpAddr>,
    /// Whether some route of this node goes over the overlay (the agent's route plan: the mode,
    /// and which nodes are on a connected subnet). Only then do outer packets leave and arrive,
    /// and only then are they kept out of conntrack: two base chains before it, whose hook every
    /// packet of the node enters. A cluster whose nodes share one subnet (kind) has the device
    /// and its guard, and no untracking to pay for. A node that tunnels to us while we reach it
    /// directly (subnets seen differently at both ends) still gets through: its outer packets are
    /// tracked here, which costs a lookup each, not a verdict.
    pub carries_routes: bool,
}

/// What one NetworkPolicy may cost a node (set by the agent: `--max-policy-pod-peers`,
/// `--max-policy-peer-pods`). A namespace's tenant writes its policies, and the API bounds an
/// object's bytes, not what it resolves to: a 600 KB policy of 4,000 pod peers, each selecting
/// every pod, took a 10k-pod compile 14 s and 1.7 GB, and one of 4,000 rules with a peer each put
/// 40 million elements into the table. A policy over either limit is refused: it still isolates
/// the pods it selects in its directions and allows nothing (fail closed, and only its own
/// namespace's pods are affected), and the compile says so in its warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Pod peers (`podSelector` / `namespaceSelector` entries) over all rules of one policy:
    /// each is matched against the pods of the namespaces it draws from, whether it selects them
    /// or not.
    pub pod_peers: usize,
    /// Pods those peers select, summed over the peers (a pod two peers select counts twice):
    /// what the policy's peer sets hold on the node.
    pub peer_pods: usize,
}

impl PolicyLimits {
    /// The agent's defaults: far above any policy written by hand (256 selector peers; a million
    /// selected pods is ten peers that each select every pod of a 100k-pod cluster), and a bound
    /// on what one tenant's policy costs every node its pods run on.
    pub const DEFAULT: PolicyLimits = PolicyLimits {
        pod_peers: 256,
        peer_pods: 1_000_000,
    };
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The flow log of this node, decided by the agent (`--flow-log`): the packets a policy drops (and,
/// when `allowed`, the first packet of each connection admitted) are handed to the agent through
/// NFLOG `group`, at most `rate` per second (burst `burst`) for each kind, counted in the kernel
/// before the log so that a flood is cut there, not in the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLog {
    pub group: u16,
    pub rate: u32,
    pub burst: u32,
    pub allowed: bool,
}

/// A validated NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// `Some` iff `Ingress` is in the (defaulted) policyTypes; rules of a direction not listed are
    /// dropped here (semantics 2, 3). `Some(vec![])` denies all ingress (semantics 4).
    pub ingress: Option<Vec<Rule>>,
    /// Same for `Egress`.
    pub egress: Option<Vec<Rule>>,
    /// Audit mode (annotation [`AUDIT_ANNOTATION`]`: "true"`): compiled, counted and logged as
    /// what it would drop, never enforced (it isolates no pod and allows nothing).
    pub audit: bool,
}

/// The annotation that puts a NetworkPolicy in audit mode (value `"true"`).
pub const AUDIT_ANNOTATION: &str = "palisade.dev/audit";

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        pod_key(&self.namespace, &self.name)
    }
    /// The rules of one direction, `None` if the policy does not apply to that direction.
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
    /// The rules of every direction it applies to, ingress first.
    pub fn all_rules(&self) -> impl Iterator<Item = &Rule> {
        Direction::BOTH
            .into_iter()
            .flat_map(|d| self.rules(d).unwrap_or_default())
    }
}

/// One ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Empty = any peer, pods and external IPs alike (semantics 12).
    pub peers: Vec<Peer>,
    /// Empty = all ports of all protocols (semantics 29).
    pub ports: Vec<PortSpec>,
}

/// One `from`/`to` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by selectors. At least one selector is set.
    Pods {
        /// `None` = the policy's own namespace (semantics 13).
        namespace_selector: Option<LabelSelector>,
        /// `None` = all pods of the selected namespaces (semantics 14).
        pod_selector: Option<LabelSelector>,
    },
    /// Addresses; `cidr` is masked (semantics 26), each `except` is a strict subset of it.
    IpBlock {
        cidr: ipnet::IpNet,
        except: Vec<ipnet::IpNet>,
    },
    /// The addresses of the Nodes whose labels match (ClusterNetworkPolicy egress only).
    Nodes(LabelSelector),
}

/// One `ports` element: protocol and which destination ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// The port part of a [`PortSpec`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    /// `port` omitted: every port of the protocol (semantics 31).
    All,
    /// `port` (and `endPort`), inclusive.
    Range(u16, u16),
    /// A named port, resolved per destination pod (semantics 34).
    Named(String),
}

/// One change to the cluster state, as the agent's sources emit them.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    UpsertNamespace(Namespace),
    DeleteNamespace {
        name: String,
    },
    /// Shared: the same pod is held by every state it is applied to (the agent's and the
    /// compiler's), so a change costs one allocation however many copies of the state exist.
    UpsertPod(Arc<Pod>),
    DeletePod {
        namespace: String,
        name: String,
    },
    UpsertPolicy(Policy),
    DeletePolicy {
        namespace: String,
        name: String,
    },
    UpsertNode(Node),
    DeleteNode {
        name: String,
    },
    UpsertClusterPolicy(ClusterPolicy),
    DeleteClusterPolicy {
        name: String,
    },
    /// The complete current set of this node's attachment records (from the CNI plugin).
    SetAttachments(Vec<Attachment>),
    /// This node's egress NAT (`None`: off).
    SetEgressNat(Option<EgressNat>),
    /// This node's flow log (`None`: off).
    SetFlowLog(Option<FlowLog>),
    /// This node's overlay port and its peers (`None`: no overlay, no rule).
    SetTunnel(Option<Tunnel>),
    /// What one NetworkPolicy may cost this node.
    SetPolicyLimits(PolicyLimits),
}

/// Everything the compiler reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// By `namespace/name`. Succeeded/Failed pods are never stored. Shared (see [`Change::UpsertPod`]):
    /// cloning a state does not copy its pods. The key is the one [`PodKey`] of the pod.
    pub pods: BTreeMap<PodKey, Arc<Pod>>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, Policy>,
    /// By name.
    pub nodes: BTreeMap<String, Node>,
    /// ClusterNetworkPolicies by name.
    pub cluster_policies: BTreeMap<String, ClusterPolicy>,
    /// Attachment records of THIS node (set by the agent).
    pub attachments: Vec<Attachment>,
    /// Egress NAT of THIS node (set by the agent); `None`: no NAT in our table.
    pub egress_nat: Option<EgressNat>,
    /// Flow log of THIS node (set by the agent); `None`: no log statements in our table.
    pub flow_log: Option<FlowLog>,
    /// Overlay of THIS node (set by the agent); `None`: no tunnel rule in our table.
    pub tunnel: Option<Tunnel>,
    /// What one NetworkPolicy may cost THIS node (set by the agent).
    pub policy_limits: PolicyLimits,
}

impl ClusterState {
    /// A copy whose maps are built in bulk, with full nodes. A map filled change by change (an
    /// initial list arrives in key order) keeps its nodes about half full, and `clone` copies
    /// that shape: at 100k pods and 10k policies the difference is ~5 MB.
    pub fn compacted(&self) -> Self {
        fn bulk<K: Ord + Clone, V: Clone>(m: &BTreeMap<K, V>) -> BTreeMap<K, V> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        Self {
            namespaces: bulk(&self.namespaces),
            pods: bulk(&self.pods),
            policies: bulk(&self.policies),
            nodes: bulk(&self.nodes),
            cluster_policies: bulk(&self.cluster_policies),
            attachments: self.attachments.clone(),
            egress_nat: self.egress_nat.clone(),
            flow_log: self.flow_log,
            tunnel: self.tunnel.clone(),
            policy_limits: self.policy_limits,
        }
    }

    /// Whether applying `change` would change this state. A source re-emits every modified object
    /// (a status heartbeat, a resourceVersion bump, an annotation) and the model keeps only what the
    /// compiler reads, so most such events are equal to what is held: they are no-ops, and callers
    /// schedule no work for them.
    pub fn would_change(&self, change: &Change) -> bool {
        match change {
            Change::UpsertNamespace(ns) => match self.namespaces.get(&ns.name) {
                None => true,
                // What `apply` holds: the labels with the name label added.
                Some(held) => {
                    let mut labels = ns.labels.clone();
                    labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
                    held.labels != labels
                }
            },
            Change::DeleteNamespace { name } => self.namespaces.contains_key(name),
            Change::UpsertPod(pod) => {
                let held = self.pods.get(pod.key().as_str());
                if pod.phase.is_terminated() {
                    held.is_some()
                } else {
                    held.is_none_or(|h| **h != **pod)
                }
            }
            Change::DeletePod { namespace, name } => {
                self.pods.contains_key(pod_key(namespace, name).as_str())
            }
            Change::UpsertPolicy(p) => self.policies.get(&p.key()) != Some(p),
            Change::DeletePolicy { namespace, name } => {
                self.policies.contains_key(&pod_key(namespace, name))
            }
            Change::UpsertNode(n) => self.nodes.get(&n.name) != Some(n),
            Change::DeleteNode { name } => self.nodes.contains_key(name),
            Change::UpsertClusterPolicy(p) => self.cluster_policies.get(&p.name) != Some(p),
            Change::DeleteClusterPolicy { name } => self.cluster_policies.contains_key(name),
            Change::SetAttachments(a) => self.attachments != *a,
            Change::SetEgressNat(n) => self.egress_nat != *n,
            Change::SetFlowLog(f) => self.flow_log != *f,
            Change::SetTunnel(t) => self.tunnel != *t,
            Change::SetPolicyLimits(l) => self.policy_limits != *l,
        }
    }

    /// Applies one change; returns whether the state changed (see [`Self::would_change`]).
    /// Upserts replace the whole object (semantics 10).
    pub fn apply(&mut self, change: Change) -> bool {
        if !self.would_change(&change) {
            return false;
        }
        match change {
            Change::UpsertNamespace(mut ns) => {
                ns.labels
                    .insert(NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Change::DeleteNamespace { name } => {
                self.namespaces.remove(&name);
            }
            Change::UpsertPod(pod) => {
                let key = pod.key();
                if pod.phase.is_terminated() {
                    self.pods.remove(key.as_str());
                } else if let Some(held) = self.pods.get_mut(key.as_str()) {
                    *held = pod; // the key stays the one already shared
                } else {
                    self.pods.insert(PodKey::from(key), pod);
                }
            }
            Change::DeletePod { namespace, name } => {
                self.pods.remove(pod_key(&namespace, &name).as_str());
            }
            Change::UpsertPolicy(p) => {
                self.policies.insert(p.key(), p);
            }
            Change::DeletePolicy { namespace, name } => {
                self.policies.remove(&pod_key(&namespace, &name));
            }
            Change::UpsertNode(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Change::DeleteNode { name } => {
                self.nodes.remove(&name);
            }
            Change::UpsertClusterPolicy(p) => {
                self.cluster_policies.insert(p.name.clone(), p);
            }
            Change::DeleteClusterPolicy { name } => {
                self.cluster_policies.remove(&name);
            }
            Change::SetAttachments(a) => {
                self.attachments = a;
            }
            Change::SetEgressNat(n) => {
                self.egress_nat = n;
            }
            Change::SetFlowLog(f) => {
                self.flow_log = f;
            }
            Change::SetTunnel(t) => {
                self.tunnel = t;
            }
            Change::SetPolicyLimits(l) => {
                self.policy_limits = l;
            }
        }
        true
    }

    /// The ClusterNetworkPolicy whose compiler key (`cnp:<name>`, see [`cluster_key`]) is `key`.
    pub fn cluster_policy_by_key(&self, key: &str) -> Option<&ClusterPolicy> {
        key.strip_prefix(CLUSTER_KEY_PREFIX)
            .and_then(|name| self.cluster_policies.get(name))
    }

    /// Labels of a namespace. A namespace not (yet) known still carries its name label, so
    /// `kubernetes.io/metadata.name` selectors work before the namespace event arrives.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_entries_are_exactly_the_keys_of_that_namespace() {
        let keys = [
            "a-b/x", "a.b/x", "a/", "a/p", "a/q", "a/zz", "a0/p", "ab/p", "b/p",
        ];
        let map: BTreeMap<String, ()> = keys.iter().map(|k| (k.to_string(), ())).collect();
        let of = |ns: &str| -> Vec<&str> {
            namespace_entries(&map, ns)
                .map(|(k, _)| k.as_str())
                .collect()
        };
        assert_eq!(of("a"), ["a/", "a/p", "a/q", "a/zz"]);
        assert_eq!(of("a-b"), ["a-b/x"]);
        assert_eq!(of("ab"), ["ab/p"]);
        assert_eq!(of("a0"), ["a0/p"]);
        assert!(of("c").is_empty());
        assert!(of("").is_empty());
    }

    fn pod(labels: &[(&str, &str)]) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node_name: Some("n1".into()),
            ips: ["10.0.0.1".parse().unwrap()].into(),
            ports: [].into(),
            host_network: false,
            phase: PodPhase::Running,
        })
    }

    #[test]
    fn an_upsert_equal_to_what_is_held_changes_nothing_and_says_so() {
        let mut s = ClusterState::default();
        assert!(s.apply(Change::UpsertPod(pod(&[("app", "a")]))));
        // A status heartbeat converts to the same model pod (a fresh allocation, equal content).
        assert!(!s.apply(Change::UpsertPod(pod(&[("app", "a")]))));
        assert!(s.apply(Change::UpsertPod(pod(&[("app", "b")]))));
        let mut failed = (*pod(&[("app", "b")])).clone();
        failed.phase = PodPhase::Failed;
        assert!(s.apply(Change::UpsertPod(Arc::new(failed.clone()))));
        assert!(s.pods.is_empty());
        assert!(
            !s.apply(Change::UpsertPod(Arc::new(failed))),
            "a terminated pod not held"
        );
        assert!(!s.apply(Change::DeletePod {
            namespace: "ns".into(),
            name: "p".into()
        }));
    }

    #[test]
    fn a_namespace_without_its_name_label_equals_the_held_one_with_it() {
        let mut s = ClusterState::default();
        let bare = Namespace {
            name: "x".into(),
            labels: Labels::from([("team".to_string(), "t".to_string())]),
        };
        assert!(s.apply(Change::UpsertNamespace(bare.clone())));
        assert!(!s.apply(Change::UpsertNamespace(bare.clone())));
        assert!(!s.apply(Change::UpsertNamespace(Namespace::new(
            "x",
            bare.labels.clone()
        ))));
        let mut other = bare.clone();
        other.labels.insert("team".into(), "u".into());
        assert!(s.apply(Change::UpsertNamespace(other)));
        assert!(s.apply(Change::DeleteNamespace { name: "x".into() }));
        assert!(!s.apply(Change::DeleteNamespace { name: "x".into() }));
    }

    #[test]
    fn attachments_and_egress_nat_set_to_what_is_held_change_nothing() {
        let mut s = ClusterState::default();
        assert!(!s.apply(Change::SetAttachments(Vec::new())));
        assert!(!s.apply(Change::SetEgressNat(None)));
        assert!(!s.apply(Change::DeleteNode { name: "n".into() }));
        assert!(!s.apply(Change::DeletePolicy {
            namespace: "ns".into(),
            name: "p".into()
        }));
    }

    #[test]
    fn a_compacted_state_is_the_same_state_sharing_its_pods_and_keys() {
        let st = crate::synth::cluster(&crate::synth::SynthConfig::small(7));
        let c = st.compacted();
        assert_eq!(c, st);
        let (k, p) = st.pods.iter().next().unwrap();
        let (ck, cp) = c.pods.get_key_value(&**k).unwrap();
        assert!(Arc::ptr_eq(k, ck) && Arc::ptr_eq(p, cp));
    }

    #[test]
    fn a_shared_pod_stays_within_160_bytes() {
        // Arc<Pod> is the counts (16 bytes) and the pod: at 100k pods each 32 bytes over an
        // allocation class costs 3 MB (mimalloc's classes around it: 128, 160, 192).
        assert!(
            std::mem::size_of::<Pod>() + 16 <= 160,
            "{}",
            std::mem::size_of::<Pod>()
        );
    }
}
