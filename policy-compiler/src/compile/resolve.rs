//! From cluster state to the semantic model: which local pods, which policies select them, and
//! every rule's peers and ports resolved to addresses. The one resolution path: a full compile
//! runs all of it over a fresh [`PodIndex`]; the incremental compiler runs the same functions for
//! what a change touches, and patches elements with the same predicates ([`PeerQuery::selects`],
//! [`NamedPortScope`], [`NamedPorts`]).

use super::index::{PodIndex, Subject};
use super::{
    intervals, Compiled, CompiledClusterPolicy, CompiledClusterRule, CompiledPolicy, CompiledRule,
    LocalPod, PeerSet, PortSet, Refusal, TierLists,
};
use crate::model::{
    namespace_entries, ClusterPolicy, ClusterState, ClusterSubject, ContainerPort, Direction,
    LabelSelector, Labels, Node, Peer, Pod, PodKey, Policy, PolicyLimits, PortMatch, Protocol,
    Rule,
};
use crate::ruleset::Ruleset;
use ipnet::IpNet;
use palisade_contract::Attachment;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

/// Resolves the whole model of one node from the state and its index.
pub(crate) fn resolve(state: &ClusterState, ix: &PodIndex) -> Compiled {
    let pods = ix
        .subjects()
        .filter(|(_, s)| s.local)
        .map(|(k, s)| (k.to_string(), local_pod(state, k, s)))
        .collect();
    let resolver = Resolver::new(ix, &state.nodes, state.policy_limits);
    let mut policies = BTreeMap::new();
    for (pkey, pol) in &state.policies {
        if !applies(pol) {
            continue;
        }
        let selected = selected(ix, pol);
        if selected.is_empty() {
            continue;
        }
        let cp = resolver.compile_policy(pkey, pol, selected, BTreeMap::new());
        policies.insert(pkey.clone(), cp);
    }
    let mut cluster_policies = BTreeMap::new();
    for cp in state.cluster_policies.values() {
        let selected = cluster_selected(ix, cp);
        if selected.is_empty() {
            continue;
        }
        let ccp = resolver.compile_cluster_policy(cp, selected, BTreeMap::new());
        cluster_policies.insert(ccp.key.clone(), ccp);
    }
    let mut c = Compiled {
        node: ix.node().to_string(),
        pods,
        policies,
        cluster_policies,
        pending: BTreeSet::new(),
        sources: BTreeSet::new(),
        egress_nat: None,
        flow_log: None,
        tunnel: None,
        ruleset: Ruleset::default(),
        warnings: Vec::new(),
        priority_ties: Vec::new(),
    };
    resolve_local(state, ix, &mut c);
    c
}

/// The facts of the local part that come from the records and the agent: pending addresses,
/// source bindings, egress NAT, and the warnings of resolution (which replace the model's).
pub(crate) fn resolve_local(state: &ClusterState, ix: &PodIndex, c: &mut Compiled) {
    c.pending = state
        .attachments
        .iter()
        .filter(|a| a.pending && !ix.claims(a))
        .flat_map(|a| a.ips.iter().copied())
        .collect();
    c.sources.clear();
    c.warnings.clear();
    for a in &state.attachments {
        source_bindings(a, c);
    }
    c.egress_nat = state.egress_nat.clone();
    c.flow_log = state.flow_log;
    c.tunnel = state.tunnel.clone();
}

/// Whether a policy applies to any direction at all (else it selects nothing to enforce).
pub(crate) fn applies(pol: &Policy) -> bool {
    pol.ingress.is_some() || pol.egress.is_some()
}

/// Keys of the local pods `pol` selects.
pub(crate) fn selected(ix: &PodIndex, pol: &Policy) -> BTreeSet<String> {
    ix.in_namespace(&pol.namespace)
        .filter(|(_, s)| s.selected_by(pol))
        .map(|(k, _)| k.to_string())
        .collect()
}

/// Keys of the local pods a ClusterNetworkPolicy selects (hostNetwork pods are no subjects).
pub(crate) fn cluster_selected(ix: &PodIndex, cp: &ClusterPolicy) -> BTreeSet<String> {
    let q = PeerQuery::subject(&cp.subject);
    let mut out = BTreeSet::new();
    for (ns, labels) in ix.namespaces() {
        if !q.namespaces.contains(ns, labels) {
            continue;
        }
        for (k, s) in ix.in_namespace(ns) {
            if s.local && q.matches_pod(&s.pod) {
                out.insert(k.to_string());
            }
        }
    }
    out
}

/// Whether a ClusterNetworkPolicy selects the subject `s` (local or not), whose namespace has
/// `ns_labels`.
pub(crate) fn cluster_selects(cp: &ClusterPolicy, s: &Subject, ns_labels: &Labels) -> bool {
    PeerQuery::subject(&cp.subject).selects(&s.pod, ns_labels)
}

/// The ClusterNetworkPolicies selecting a local pod, per direction and tier, in evaluation order.
/// A policy without rules of a direction does not affect that direction.
fn cluster_lists(state: &ClusterState, s: &Subject) -> (TierLists, TierLists) {
    let ns_labels = state.namespace_labels(&s.pod.namespace);
    let mut found: Vec<&ClusterPolicy> = state
        .cluster_policies
        .values()
        .filter(|cp| cluster_selects(cp, s, &ns_labels))
        .collect();
    found.sort_by(|a, b| a.order().cmp(&b.order()));
    let mut lists = (TierLists::default(), TierLists::default());
    for cp in found {
        if !cp.ingress.is_empty() {
            lists.0.tier_mut(cp.tier).push(cp.key());
        }
        if !cp.egress.is_empty() {
            lists.1.tier_mut(cp.tier).push(cp.key());
        }
    }
    lists
}

/// A local pod with the policies selecting it, by direction (semantics 1).
pub(crate) fn local_pod(state: &ClusterState, key: &str, s: &Subject) -> LocalPod {
    let (cluster_ingress, cluster_egress) = cluster_lists(state, s);
    let mut lp = LocalPod {
        key: key.to_string(),
        ips: s.ips.iter().copied().collect(),
        ingress: Vec::new(),
        egress: Vec::new(),
        cluster_ingress,
        cluster_egress,
        audit_ingress: Vec::new(),
        audit_egress: Vec::new(),
    };
    // `state.policies` is sorted: the lists are sorted.
    for (pkey, pol) in namespace_entries(&state.policies, &s.pod.namespace) {
        if !s.selected_by(pol) {
            continue;
        }
        let (ingress, egress) = if pol.audit {
            (&mut lp.audit_ingress, &mut lp.audit_egress)
        } else {
            (&mut lp.ingress, &mut lp.egress)
        };
        if pol.ingress.is_some() {
            ingress.push(pkey.clone());
        }
        if pol.egress.is_some() {
            egress.push(pkey.clone());
        }
    }
    lp
}

/// (host veth, address) of an attachment record of this node: what the source guard lets in.
/// A record whose host veth is not the name the plugin derives from its container id and ifname
/// was not written by our plugin (or was edited): it binds nothing, so that veth's traffic stays
/// dropped (fail closed), with a warning naming the record.
fn source_bindings(a: &Attachment, c: &mut Compiled) {
    let expected = palisade_contract::host_veth_name(&a.container_id, &a.ifname);
    if a.host_veth != expected {
        c.warnings.push(format!(
            "attachment record {}_{} names host veth {:?}, not {expected:?}: its addresses are not accepted from any interface",
            a.container_id, a.ifname, a.host_veth
        ));
        return;
    }
    c.sources
        .extend(a.ips.iter().map(|ip| (a.host_veth.clone(), *ip)));
}

/// Which namespaces one pod peer draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NsScope<'a> {
    /// No namespace selector: the policy's own namespace (semantics 13).
    Own(&'a str),
    /// Namespaces whose labels match (semantics 14, 18).
    Matching(&'a LabelSelector),
}

impl NsScope<'_> {
    fn contains(&self, ns: &str, labels: &Labels) -> bool {
        match self {
            Self::Own(own) => *own == ns,
            Self::Matching(sel) => sel.matches(labels),
        }
    }
}

/// One pod peer of a policy's rule: which pods it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PeerQuery<'a> {
    namespaces: NsScope<'a>,
    /// `None`: every pod of those namespaces.
    pods: Option<&'a LabelSelector>,
}

impl<'a> PeerQuery<'a> {
    /// The query of a pod peer of a policy in namespace `own` (`None` for an ipBlock or nodes
    /// peer). A ClusterNetworkPolicy's pod peers always carry a namespace selector.
    pub fn of(own: &'a str, peer: &'a Peer) -> Option<Self> {
        match peer {
            Peer::Pods {
                namespace_selector,
                pod_selector,
            } => Some(Self {
                namespaces: match namespace_selector {
                    None => NsScope::Own(own),
                    Some(sel) => NsScope::Matching(sel),
                },
                pods: pod_selector.as_ref(),
            }),
            Peer::IpBlock { .. } | Peer::Nodes(_) => None,
        }
    }

    /// This query exactly (`Debug` quotes every label, so distinct queries never meet), and as
    /// an operator would read it.
    fn identity(&self) -> (String, String) {
        let (ns_key, ns_label) = match self.namespaces {
            NsScope::Own(ns) => (format!("own {ns:?}"), format!("namespace {ns}")),
            NsScope::Matching(sel) => (format!("ns {sel:?}"), format!("namespaces {sel}")),
        };
        match self.pods {
            None => (ns_key, format!("{ns_label}, every pod")),
            Some(sel) => (
                format!("{ns_key} pods {sel:?}"),
                format!("{ns_label}, pods {sel}"),
            ),
        }
    }

    /// The pods a ClusterNetworkPolicy's subject chooses: the same namespace AND pod selection as
    /// a pod peer.
    pub fn subject(subject: &'a ClusterSubject) -> Self {
        match subject {
            ClusterSubject::Namespaces(ns) => Self {
                namespaces: NsScope::Matching(ns),
                pods: None,
            },
            ClusterSubject::Pods {
                namespace_selector,
                pod_selector,
            } => Self {
                namespaces: NsScope::Matching(namespace_selector),
                pods: Some(pod_selector),
            },
        }
    }

    /// Whether it selects `pod`, whose namespace has `ns_labels` (semantics 15: both selectors
    /// of one peer are ANDed).
    pub fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        self.namespaces.contains(&pod.namespace, ns_labels) && self.matches_pod(pod)
    }

    fn matches_pod(&self, pod: &Pod) -> bool {
        self.pods.is_none_or(|s| s.matches(&pod.labels))
    }
}

/// How many pod peers of a rule of a policy in namespace `own` select `pod` (each counts: what
/// [`PeerSet::matched`] sums).
pub(crate) fn rule_selections(own: &str, rule: &Rule, pod: &Pod, ns_labels: &Labels) -> usize {
    rule.peers
        .iter()
        .filter_map(|peer| PeerQuery::of(own, peer))
        .filter(|q| q.selects(pod, ns_labels))
        .count()
}

/// Pod peers of a policy, over all its rules (what [`PolicyLimits::pod_peers`] bounds).
pub(crate) fn pod_peers(pol: &Policy) -> usize {
    pol.all_rules()
        .flat_map(|r| &r.peers)
        .filter(|p| matches!(p, Peer::Pods { .. }))
        .count()
}

/// Keys and addresses of the subject pods one pod peer selects.
#[derive(Debug, Default)]
struct ResolvedPods {
    keys: std::sync::Arc<BTreeSet<PodKey>>,
    ips: std::sync::Arc<BTreeSet<IpAddr>>,
}

/// Which rule of a policy: direction and index in that direction's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RuleRef {
    pub dir: Direction,
    pub index: usize,
}

/// Named-port entries of a rule: (pod address, protocol, port).
type NamedEntries = std::sync::Arc<BTreeSet<(IpAddr, Protocol, u16)>>;

/// NetworkPolicies compiled before and kept (the incremental compiler's, up to date with the
/// index), with their specs: their resolved peers and named-port entries serve a policy compiled
/// now whose rules repeat them.
#[derive(Clone, Copy)]
pub(crate) struct Kept<'a> {
    pub compiled: &'a BTreeMap<String, CompiledPolicy>,
    pub policies: &'a BTreeMap<String, Policy>,
}

/// Resolves policies against one index. Pod peers already resolved are kept for its lifetime:
/// many policies repeat the same peers.
pub(crate) struct Resolver<'a> {
    ix: &'a PodIndex,
    /// The cluster's Nodes (a ClusterNetworkPolicy's `nodes` peers).
    nodes: &'a BTreeMap<String, Node>,
    /// What one NetworkPolicy may cost (ClusterNetworkPolicies, an administrator's, are not
    /// bounded).
    limits: PolicyLimits,
    peers: RefCell<HashMap<PeerQuery<'a>, Rc<ResolvedPods>>>,
    /// Entries of the rules that share them ([`CompiledRule::shares_named`]), by pod peers and
    /// port names ([`PeerSet::pod_key`], [`PortSet::named_key`]).
    named: RefCell<HashMap<(String, String), NamedEntries>>,
    /// Read into `peers` and `named` at their first miss (a landing pod's policy at 100k pods
    /// spent ~60 % of its ~90 ms compile resolving peers and named ports that three kept
    /// policies held already).
    kept: Option<Kept<'a>>,
    seeded: Cell<bool>,
}

impl<'a> Resolver<'a> {
    pub fn new(ix: &'a PodIndex, nodes: &'a BTreeMap<String, Node>, limits: PolicyLimits) -> Self {
        Self {
            ix,
            nodes,
            limits,
            peers: RefCell::new(HashMap::new()),
            named: RefCell::new(HashMap::new()),
            kept: None,
            seeded: Cell::new(false),
        }
    }

    /// The same, also taking what `kept` resolved.
    pub fn keeping(self, kept: Kept<'a>) -> Self {
        Self {
            kept: Some(kept),
            ..self
        }
    }

    /// Reads the kept policies' peers and named-port entries into the caches, once; returns
    /// whether it did so now (so a miss is worth looking up again).
    fn seed(&self) -> bool {
        let Some(kept) = self.kept else {
            return false;
        };
        if self.seeded.replace(true) {
            return false;
        }
        let mut peers = self.peers.borrow_mut();
        let mut named = self.named.borrow_mut();
        for (pkey, cp) in kept.compiled {
            let Some(pol) = kept.policies.get(pkey) else {
                continue;
            };
            for dir in Direction::BOTH {
                let (Some(specs), Some(rules)) = (pol.rules(dir), cp.rules(dir)) else {
                    continue;
                };
                for cr in rules {
                    if cr.shares_named(dir) {
                        named
                            .entry((cr.peers.pod_key.clone(), cr.ports.named_key.clone()))
                            .or_insert_with(|| std::sync::Arc::clone(&cr.ports.named));
                    }
                    // A rule whose pod peers are one query holds exactly what it selects.
                    let Some(spec) = specs.get(cr.index) else {
                        continue;
                    };
                    let mut queries = spec
                        .peers
                        .iter()
                        .filter_map(|p| PeerQuery::of(&pol.namespace, p));
                    let Some(q) = queries.next() else {
                        continue;
                    };
                    if queries.any(|o| o != q) {
                        continue;
                    }
                    peers.entry(q).or_insert_with(|| {
                        Rc::new(ResolvedPods {
                            keys: std::sync::Arc::clone(&cr.peers.pods),
                            ips: std::sync::Arc::clone(&cr.peers.pod_ips),
                        })
                    });
                }
            }
        }
        true
    }

    /// What `q` selects, if resolved already (in this compile or by a kept policy).
    fn resolved(&self, q: &PeerQuery<'a>) -> Option<Rc<ResolvedPods>> {
        if let Some(found) = self.peers.borrow().get(q) {
            return Some(Rc::clone(found));
        }
        if self.seed() {
            return self.peers.borrow().get(q).cloned();
        }
        None
    }

    /// Calls `hit` with each subject `q` selects.
    fn each_selected(&self, q: PeerQuery<'a>, mut hit: impl FnMut(&'a PodKey, &'a Subject)) {
        let namespaces: Box<dyn Iterator<Item = &str>> = match q.namespaces {
            NsScope::Own(ns) => Box::new(std::iter::once(ns)),
            NsScope::Matching(_) => Box::new(
                self.ix
                    .namespaces()
                    .filter(|(ns, labels)| q.namespaces.contains(ns, labels))
                    .map(|(ns, _)| ns.as_str()),
            ),
        };
        // Pods share their label sets (the sources intern them): the selector is matched once
        // per distinct set, not once per pod (at 100k pods the matching was ~half of a full
        // compile, most of it comparing label strings).
        let mut matched: HashMap<usize, bool> = HashMap::new();
        for ns in namespaces {
            for (k, s) in self.ix.in_namespace(ns) {
                let labels = &s.pod.labels;
                let selects = *matched
                    .entry(labels.identity())
                    .or_insert_with(|| q.matches_pod(&s.pod));
                if selects {
                    hit(k, s);
                }
            }
        }
    }

    /// How many subjects `q` selects, without keeping them (a refused policy's count).
    fn count_selected(&self, q: PeerQuery<'a>) -> usize {
        if let Some(found) = self.resolved(&q) {
            return found.keys.len();
        }
        let mut n = 0;
        self.each_selected(q, |_, _| n += 1);
        n
    }

    fn peer_pods(&self, q: PeerQuery<'a>) -> Rc<ResolvedPods> {
        if let Some(found) = self.resolved(&q) {
            return found;
        }
        // Gathered into vectors and built in bulk: a B-tree filled insert by insert keeps its
        // nodes about half full, one built from a sorted run fills them (at 100k pods the peer
        // sets were the compiler's largest part).
        let (mut keys, mut ips) = (Vec::new(), Vec::new());
        self.each_selected(q, |k, s| {
            keys.push(PodKey::clone(k));
            ips.extend(s.ips.iter().copied());
        });
        let found = Rc::new(ResolvedPods {
            keys: std::sync::Arc::new(keys.into_iter().collect()),
            ips: std::sync::Arc::new(ips.into_iter().collect()),
        });
        self.peers.borrow_mut().insert(q, Rc::clone(&found));
        found
    }

    /// Compiles one policy whose selected local pods are known (non-empty). `reuse` holds peers
    /// already resolved against the same state for rules whose peers are unchanged; the others
    /// are resolved.
    ///
    /// Over the [`PolicyLimits`] it is refused ([`CompiledPolicy::refused`]): its directions keep
    /// no rule. Its pod peers are counted before any is resolved, and the pods they select are
    /// counted as they are resolved: past the limit the rest are only counted (nothing is kept),
    /// so a refused policy holds no more than the limit in memory while it is found out.
    pub fn compile_policy(
        &self,
        pkey: &str,
        pol: &'a Policy,
        selected: BTreeSet<String>,
        mut reuse: BTreeMap<RuleRef, PeerSet>,
    ) -> CompiledPolicy {
        let limits = self.limits;
        let own = pol.namespace.as_str();
        let peers_n = pod_peers(pol);
        let too_many_peers = peers_n > limits.pod_peers;
        // Pods the pod peers select so far, summed over the peers, and whether that passed the
        // limit (the rest is then only counted).
        let mut total = 0usize;
        let mut too_many_pods = false;
        let mut compile_dir = |dir: Direction| -> Option<Vec<CompiledRule>> {
            let rules = pol.rules(dir)?;
            let mut out = Vec::with_capacity(rules.len());
            for (index, r) in rules.iter().enumerate() {
                let reused = reuse.remove(&RuleRef { dir, index });
                if too_many_peers {
                    continue;
                }
                if too_many_pods {
                    total += match reused {
                        Some(p) => p.matched,
                        None => self.count_rule(own, r),
                    };
                    continue;
                }
                let peers = match reused {
                    Some(p) => Ok(p),
                    None => self.peers_within(own, r, limits.peer_pods - total),
                };
                match peers {
                    Ok(p) if total + p.matched <= limits.peer_pods => {
                        total += p.matched;
                        out.push(self.compile_rule(dir, &selected, index, r, p));
                    }
                    Ok(PeerSet { matched: n, .. }) | Err(n) => {
                        total += n;
                        too_many_pods = true;
                    }
                }
            }
            Some(out)
        };
        let mut ingress = compile_dir(Direction::Ingress);
        let mut egress = compile_dir(Direction::Egress);
        let refused = if too_many_peers {
            Some(Refusal::PodPeers {
                found: peers_n,
                limit: limits.pod_peers,
            })
        } else if too_many_pods {
            Some(Refusal::PeerPods {
                found: total,
                limit: limits.peer_pods,
            })
        } else {
            None
        };
        if refused.is_some() {
            for rules in [&mut ingress, &mut egress].into_iter().flatten() {
                rules.clear();
            }
        }
        CompiledPolicy {
            key: pkey.to_string(),
            namespace: pol.namespace.clone(),
            name: pol.name.clone(),
            ingress,
            egress,
            selected,
            audit: pol.audit,
            refused,
        }
    }

    /// Pods the pod peers of `rule` select, summed over the peers, without keeping them.
    fn count_rule(&self, own: &'a str, rule: &'a Rule) -> usize {
        rule.peers
            .iter()
            .filter_map(|peer| PeerQuery::of(own, peer))
            .map(|q| self.count_selected(q))
            .sum()
    }

    /// Compiles one ClusterNetworkPolicy whose selected local pods are known (non-empty), its rules
    /// by the same path as a NetworkPolicy's (`reuse` as for [`Self::compile_policy`]).
    pub fn compile_cluster_policy(
        &self,
        cp: &'a ClusterPolicy,
        selected: BTreeSet<String>,
        mut reuse: BTreeMap<RuleRef, PeerSet>,
    ) -> CompiledClusterPolicy {
        let mut compile_dir = |dir: Direction| -> Vec<CompiledClusterRule> {
            cp.rules(dir)
                .iter()
                .enumerate()
                .map(|(index, r)| {
                    let peers = match reuse.remove(&RuleRef { dir, index }) {
                        Some(p) => p,
                        None => self.peers_of("", &r.rule),
                    };
                    CompiledClusterRule {
                        rule: self.compile_rule(dir, &selected, index, &r.rule, peers),
                        name: r.name.clone(),
                        action: r.action,
                        inert: r.inert,
                    }
                })
                .collect()
        };
        CompiledClusterPolicy {
            key: cp.key(),
            name: cp.name.clone(),
            tier: cp.tier,
            priority: cp.priority,
            ingress: compile_dir(Direction::Ingress),
            egress: compile_dir(Direction::Egress),
            selected,
        }
    }

    fn compile_rule(
        &self,
        dir: Direction,
        selected: &BTreeSet<String>,
        index: usize,
        rule: &'a Rule,
        peers: PeerSet,
    ) -> CompiledRule {
        let mut ports = PortSet {
            any: rule.ports.is_empty(),
            ..PortSet::default()
        };
        let mut ranges = Vec::new();
        for spec in &rule.ports {
            match &spec.port {
                PortMatch::All => ranges.push((spec.protocol, 0, u16::MAX)),
                PortMatch::Range(a, b) => ranges.push((spec.protocol, *a, *b)),
                PortMatch::Named(_) => {}
            }
        }
        ports.ranges = intervals::merge_ports(ranges);
        let named = NamedPorts::of(rule);
        if !named.is_empty() {
            ports.uses_named = true;
            ports.named_key = named.key();
            // Resolved once for every rule that shares them (`CompiledRule::shares_named`).
            let shared = peers
                .share_named_ports(dir)
                .then(|| (peers.pod_key.clone(), ports.named_key.clone()));
            let known = shared.as_ref().and_then(|id| {
                let found = self.named.borrow().get(id).cloned();
                found.or_else(|| self.seed().then(|| self.named.borrow().get(id).cloned())?)
            });
            ports.named = match known {
                Some(entries) => entries,
                None => {
                    let entries =
                        std::sync::Arc::new(self.named_entries(dir, selected, &peers, &named));
                    if let Some(id) = shared {
                        self.named
                            .borrow_mut()
                            .insert(id, std::sync::Arc::clone(&entries));
                    }
                    entries
                }
            };
        }
        CompiledRule {
            index,
            peers,
            ports,
        }
    }

    /// The named-port entries of a rule in `dir` with `peers` and `named`, of a policy selecting
    /// the local pods `selected`.
    fn named_entries(
        &self,
        dir: Direction,
        selected: &BTreeSet<String>,
        peers: &PeerSet,
        named: &NamedPorts<'_>,
    ) -> BTreeSet<(IpAddr, Protocol, u16)> {
        let scope = NamedPortScope {
            dir,
            selected,
            peers,
        };
        // The candidates of `scope`, listed rather than tested one by one, and whether their
        // addresses still need [`NamedPortScope::address`]: an ingress candidate's always
        // count, and so do a peer pod's (the peer set holds its addresses); a subject
        // among all of them counts only at an address the peers match.
        let (candidates, every_address): (Box<dyn Iterator<Item = &Subject>>, bool) = match dir {
            Direction::Egress if scope.every_subject() => {
                (Box::new(self.ix.subjects().map(|(_, s)| s)), false)
            }
            Direction::Ingress => (
                Box::new(selected.iter().filter_map(|k| self.ix.subject(k))),
                true,
            ),
            Direction::Egress => (
                Box::new(peers.pods.iter().filter_map(|k| self.ix.subject(k))),
                true,
            ),
        };
        // Gathered, then built in bulk (at 100k pods, inserting one by one was a fifth of a
        // pod's landing when its policies name ports).
        let mut entries = Vec::new();
        for s in candidates {
            for ip in s.ips.iter().filter(|ip| every_address || scope.address(ip)) {
                entries.extend(named.entries(&s.pod, *ip));
            }
        }
        entries.into_iter().collect()
    }

    /// The peers of a rule, without a limit (a ClusterNetworkPolicy's).
    fn peers_of(&self, own: &'a str, rule: &'a Rule) -> PeerSet {
        // `Err` would take more than usize::MAX selections.
        self.peers_within(own, rule, usize::MAX).unwrap_or_default()
    }

    /// The peers of a rule whose pod peers select at most `budget` pods (summed over the peers);
    /// past it, `Err` with how many they select (the rest counted, not kept).
    fn peers_within(&self, own: &'a str, rule: &'a Rule, budget: usize) -> Result<PeerSet, usize> {
        let mut peers = PeerSet {
            any: rule.peers.is_empty(),
            ..PeerSet::default()
        };
        let mut blocks: Vec<(&IpNet, &[IpNet])> = Vec::new();
        let mut node_nets: Vec<IpNet> = Vec::new();
        let mut identities: BTreeSet<(String, String)> = BTreeSet::new();
        for peer in &rule.peers {
            match peer {
                Peer::Nodes(sel) => {
                    // Both families' CIDR sets exist whatever the Nodes hold: the rule's shape
                    // follows its spec, and Node changes only move elements.
                    peers.uses_nodes = true;
                    peers.has_v4_blocks = true;
                    peers.has_v6_blocks = true;
                    for n in self.nodes.values().filter(|n| sel.matches(&n.labels)) {
                        peers.node_ips.extend(n.addresses.iter().copied());
                    }
                }
                Peer::Pods { .. } => {
                    peers.uses_pods = true;
                    let Some(q) = PeerQuery::of(own, peer) else {
                        continue;
                    };
                    if peers.matched > budget {
                        peers.matched += self.count_selected(q);
                        continue;
                    }
                    identities.insert(q.identity());
                    let found = self.peer_pods(q);
                    peers.matched += found.keys.len();
                    if peers.matched > budget {
                        continue;
                    }
                    if peers.pods.is_empty() {
                        // Shared, not copied: rules with the same peers hold one set.
                        peers.pods = std::sync::Arc::clone(&found.keys);
                        peers.pod_ips = std::sync::Arc::clone(&found.ips);
                    } else {
                        std::sync::Arc::make_mut(&mut peers.pods)
                            .extend(found.keys.iter().cloned());
                        std::sync::Arc::make_mut(&mut peers.pod_ips)
                            .extend(found.ips.iter().copied());
                    }
                }
                Peer::IpBlock { cidr, except } => {
                    match cidr {
                        IpNet::V4(_) => peers.has_v4_blocks = true,
                        IpNet::V6(_) => peers.has_v6_blocks = true,
                    }
                    blocks.push((cidr, except.as_slice()));
                }
            }
        }
        let (keys, labels): (Vec<String>, Vec<String>) = identities.into_iter().unzip();
        peers.pod_key = keys.join(" | ");
        peers.pod_label = labels.join("; ");
        node_nets.extend(peers.node_ips.iter().map(|ip| IpNet::from(*ip)));
        blocks.extend(node_nets.iter().map(|n| (n, &[][..])));
        if peers.matched > budget {
            return Err(peers.matched);
        }
        peers.blocks = intervals::block_ranges(blocks);
        Ok(peers)
    }
}

/// One named port of a rule.
struct NamedPort<'r> {
    name: &'r str,
    protocol: Protocol,
}

/// The named ports of one rule (semantics 34, 35).
pub(crate) struct NamedPorts<'r>(Vec<NamedPort<'r>>);

impl<'r> NamedPorts<'r> {
    pub fn of(rule: &'r Rule) -> Self {
        Self(
            rule.ports
                .iter()
                .filter_map(|p| match &p.port {
                    PortMatch::Named(name) => Some(NamedPort {
                        name,
                        protocol: p.protocol,
                    }),
                    _ => None,
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each as `protocol/"name"`, sorted, each once ([`PortSet::named_key`]; quoted as `Debug`
    /// quotes, so distinct lists never meet).
    pub fn key(&self) -> String {
        let mut all: Vec<String> = self
            .0
            .iter()
            .map(|n| format!("{}/{:?}", n.protocol.as_api(), n.name))
            .collect();
        all.sort_unstable();
        all.dedup();
        all.join(" ")
    }

    /// Whether a container port is one of them: name and protocol must both match (semantics 35).
    fn hit(&self, cp: &ContainerPort) -> bool {
        cp.name.as_deref().is_some_and(|cn| {
            self.0
                .iter()
                .any(|n| n.name == cn && n.protocol == cp.protocol)
        })
    }

    /// The rule's named-port entries for a candidate pod at one of its addresses.
    pub fn entries<'p>(
        &'p self,
        pod: &'p Pod,
        ip: IpAddr,
    ) -> impl Iterator<Item = (IpAddr, Protocol, u16)> + 'p {
        pod.ports
            .iter()
            .filter(|cp| self.hit(cp))
            .map(move |cp| (ip, cp.protocol, cp.port))
    }
}

/// Whose named ports a rule resolves, and at which of their addresses (semantics 34): for
/// ingress the selected local pods' own; for egress the destination's, which must itself be an
/// allowed peer.
pub(crate) struct NamedPortScope<'c> {
    pub dir: Direction,
    pub selected: &'c BTreeSet<String>,
    pub peers: &'c PeerSet,
}

impl NamedPortScope<'_> {
    /// Egress to any peer or to ipBlocks: any subject pod may be the destination.
    fn every_subject(&self) -> bool {
        self.peers.any || !self.peers.blocks.is_empty()
    }

    /// Whether the pod `key` is a candidate.
    pub fn candidate(&self, key: &str) -> bool {
        match self.dir {
            Direction::Ingress => self.selected.contains(key),
            Direction::Egress => self.every_subject() || self.peers.pods.contains(key),
        }
    }

    /// Whether a candidate's address counts.
    pub fn address(&self, ip: &IpAddr) -> bool {
        self.dir == Direction::Ingress || self.peers.matches(*ip).is_some()
    }
}
