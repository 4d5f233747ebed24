//! From cluster state to the semantic model: which local pods, which policies select them, and
//! every rule's peers and ports resolved to addresses.

use super::{intervals, Compiled, CompiledPolicy, CompiledRule, LocalPod, PeerSet, PortSet};
use crate::model::{
    ClusterState, Direction, LabelSelector, Labels, Peer, Pod, Policy, PortMatch, Protocol, Rule,
};
use crate::ruleset::Ruleset;
use ipnet::IpNet;
use palisade_contract::Attachment;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

/// Lookup structures over the state, built once per compile.
pub(crate) struct Index<'a> {
    /// Every pod NetworkPolicy applies to (not hostNetwork, not terminated), with its addresses.
    pub subjects: &'a BTreeMap<&'a str, (&'a Pod, BTreeSet<IpAddr>)>,
    /// Subject pods by namespace.
    pub by_ns: BTreeMap<&'a str, Vec<Subject<'a>>>,
    /// Labels of every namespace known or holding pods.
    pub ns_labels: BTreeMap<String, Labels>,
    /// Pod peers already resolved in this compile, by (namespace selector, own namespace when
    /// that is absent, pod selector): many policies repeat the same peers.
    pub peer_cache: RefCell<HashMap<PeerKey<'a>, Rc<ResolvedPods>>>,
}

/// A subject pod: key, object, addresses.
pub(crate) type Subject<'a> = (&'a str, &'a Pod, &'a BTreeSet<IpAddr>);
type PeerKey<'a> = (
    Option<&'a LabelSelector>,
    &'a str,
    Option<&'a LabelSelector>,
);
/// Keys and addresses of the pods one pod peer selects.
pub(crate) type ResolvedPods = (BTreeSet<String>, BTreeSet<IpAddr>);

/// What rule resolution reads: the per-compile [`Index`] of a full compile, or the persistent
/// index of the incremental compiler. Both answer from the same state, so a rule resolves the same.
pub(crate) trait Lookup<'a> {
    /// Keys and addresses of the subject pods one pod peer of `pol` selects.
    fn peer_pods(
        &self,
        pol: &'a Policy,
        namespace_selector: &'a Option<LabelSelector>,
        pod_selector: &'a Option<LabelSelector>,
    ) -> Rc<ResolvedPods>;
    /// A subject pod and its addresses.
    fn subject(&self, key: &str) -> Option<(&Pod, &BTreeSet<IpAddr>)>;
    /// Keys of every subject pod.
    fn subject_keys(&self) -> Box<dyn Iterator<Item = &str> + '_>;
}

impl<'a> Lookup<'a> for Index<'a> {
    fn peer_pods(
        &self,
        pol: &'a Policy,
        namespace_selector: &'a Option<LabelSelector>,
        pod_selector: &'a Option<LabelSelector>,
    ) -> Rc<ResolvedPods> {
        let scope = if namespace_selector.is_none() {
            pol.namespace.as_str()
        } else {
            ""
        };
        let key = (namespace_selector.as_ref(), scope, pod_selector.as_ref());
        let cached = self.peer_cache.borrow().get(&key).cloned();
        match cached {
            Some(f) => f,
            None => {
                let namespaces: Vec<&str> = match namespace_selector {
                    // semantics 13: only the policy's own namespace.
                    None => vec![pol.namespace.as_str()],
                    // semantics 14, 18: namespaces whose labels match.
                    Some(ns_sel) => self
                        .ns_labels
                        .iter()
                        .filter(|(_, l)| ns_sel.matches(l))
                        .map(|(n, _)| n.as_str())
                        .collect(),
                };
                let mut out = ResolvedPods::default();
                for ns in namespaces {
                    for (k, p, ips) in self.by_ns.get(ns).into_iter().flatten() {
                        // semantics 15: both selectors in one peer are ANDed.
                        if selector_opt_matches(pod_selector, &p.labels) {
                            out.0.insert(k.to_string());
                            out.1.extend(ips.iter().copied());
                        }
                    }
                }
                let f = Rc::new(out);
                self.peer_cache.borrow_mut().insert(key, f.clone());
                f
            }
        }
    }
    fn subject(&self, key: &str) -> Option<(&Pod, &BTreeSet<IpAddr>)> {
        self.subjects.get(key).map(|(p, ips)| (*p, ips))
    }
    fn subject_keys(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.subjects.keys().copied())
    }
}

/// Compiles one policy whose selected local pods are known (non-empty). `reuse` holds peers
/// already resolved against the same state for rules (by direction and index) whose peers are
/// unchanged; the others are resolved.
pub(crate) fn compile_policy<'a>(
    ix: &impl Lookup<'a>,
    pkey: &str,
    pol: &'a Policy,
    selected: BTreeSet<String>,
    mut reuse: BTreeMap<(Direction, usize), PeerSet>,
) -> CompiledPolicy {
    let mut compile_dir = |dir: Direction| {
        pol.rules(dir).map(|rules| {
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let peers = reuse.remove(&(dir, i));
                    compile_rule(ix, pol, dir, &selected, i, r, peers)
                })
                .collect()
        })
    };
    CompiledPolicy {
        key: pkey.to_string(),
        namespace: pol.namespace.clone(),
        name: pol.name.clone(),
        ingress: compile_dir(Direction::Ingress),
        egress: compile_dir(Direction::Egress),
        selected,
    }
}

pub(crate) fn attachment_matches(a: &Attachment, p: &Pod) -> bool {
    match (a.pod_uid.as_deref(), p.uid.as_str()) {
        (Some(au), pu) if !au.is_empty() && !pu.is_empty() => au == pu,
        _ => true,
    }
}

pub(crate) fn resolve(state: &ClusterState, node: &str) -> Compiled {
    // Attachments of this node by pod key.
    let mut att_by_pod: BTreeMap<String, Vec<&Attachment>> = BTreeMap::new();
    for a in &state.attachments {
        if let Some(k) = a.pod_key() {
            att_by_pod.entry(k).or_default().push(a);
        }
    }
    let mut subjects = BTreeMap::new();
    let mut local_keys: Vec<&str> = Vec::new();
    let mut matched_attachments: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (key, pod) in &state.pods {
        if !pod.is_policy_subject() {
            continue;
        }
        let mut ips: BTreeSet<IpAddr> = pod.ips.iter().copied().collect();
        let mut local = pod.node_name.as_deref() == Some(node);
        for a in att_by_pod.get(key).into_iter().flatten() {
            if attachment_matches(a, pod) {
                // Attachments are authoritative: they arrive before the API knows the IPs.
                ips.extend(a.ips.iter().copied());
                matched_attachments.insert((a.container_id.as_str(), a.ifname.as_str()));
                local = true;
            }
        }
        subjects.insert(key.as_str(), (&**pod, ips));
        if local {
            local_keys.push(key.as_str());
        }
    }
    let mut pending = BTreeSet::new();
    for a in &state.attachments {
        if a.pending && !matched_attachments.contains(&(a.container_id.as_str(), a.ifname.as_str()))
        {
            pending.extend(a.ips.iter().copied());
        }
    }
    let mut by_ns: BTreeMap<&str, Vec<Subject<'_>>> = BTreeMap::new();
    for (k, (p, ips)) in &subjects {
        by_ns
            .entry(p.namespace.as_str())
            .or_default()
            .push((k, p, ips));
    }
    let mut ns_labels: BTreeMap<String, Labels> = state
        .namespaces
        .iter()
        .map(|(n, ns)| (n.clone(), ns.labels.clone()))
        .collect();
    for ns in by_ns.keys() {
        if !ns_labels.contains_key(*ns) {
            ns_labels.insert(ns.to_string(), state.namespace_labels(ns));
        }
    }
    let ix = Index {
        subjects: &subjects,
        by_ns,
        ns_labels,
        peer_cache: RefCell::new(HashMap::new()),
    };

    // Local pods by namespace, for policy selection.
    let mut local_by_ns: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for k in &local_keys {
        if let Some((p, _)) = ix.subjects.get(k) {
            local_by_ns.entry(p.namespace.as_str()).or_default().push(k);
        }
    }
    let mut pods: BTreeMap<String, LocalPod> = local_keys
        .iter()
        .map(|k| {
            let ips = ix
                .subjects
                .get(k)
                .map(|(_, ips)| ips.clone())
                .unwrap_or_default();
            (
                k.to_string(),
                LocalPod {
                    key: k.to_string(),
                    ips,
                    ingress: Vec::new(),
                    egress: Vec::new(),
                },
            )
        })
        .collect();

    let mut policies = BTreeMap::new();
    for (pkey, pol) in &state.policies {
        let selected: BTreeSet<String> = local_by_ns
            .get(pol.namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|k| {
                ix.subjects
                    .get(*k)
                    .is_some_and(|(p, _)| pol.pod_selector.matches(&p.labels))
            })
            .map(|k| k.to_string())
            .collect();
        if selected.is_empty() || (pol.ingress.is_none() && pol.egress.is_none()) {
            continue;
        }
        for k in &selected {
            if let Some(lp) = pods.get_mut(k) {
                if pol.ingress.is_some() {
                    lp.ingress.push(pkey.clone()); // state.policies is sorted: lists stay sorted
                }
                if pol.egress.is_some() {
                    lp.egress.push(pkey.clone());
                }
            }
        }
        policies.insert(
            pkey.clone(),
            compile_policy(&ix, pkey, pol, selected, BTreeMap::new()),
        );
    }
    let (sources, warnings) = source_bindings(&state.attachments);
    Compiled {
        node: node.to_string(),
        pods,
        policies,
        pending,
        sources,
        egress_nat: state.egress_nat.clone(),
        ruleset: Ruleset::default(),
        warnings,
    }
}

/// (host veth, address) of every attachment record of this node: what the source guard lets in.
/// A record whose host veth is not the name the plugin derives from its container id and ifname
/// was not written by our plugin (or was edited): it binds nothing, so that veth's traffic stays
/// dropped (fail closed), with a warning naming the record.
pub(crate) fn source_bindings(
    attachments: &[Attachment],
) -> (BTreeSet<(String, IpAddr)>, Vec<String>) {
    let mut sources = BTreeSet::new();
    let mut warnings = Vec::new();
    for a in attachments {
        let expected = palisade_contract::host_veth_name(&a.container_id, &a.ifname);
        if a.host_veth != expected {
            warnings.push(format!(
                "attachment record {}_{} names host veth {:?}, not {expected:?}: its addresses are not accepted from any interface",
                a.container_id, a.ifname, a.host_veth
            ));
            continue;
        }
        sources.extend(a.ips.iter().map(|ip| (a.host_veth.clone(), *ip)));
    }
    (sources, warnings)
}

pub(crate) fn selector_opt_matches(s: &Option<LabelSelector>, labels: &Labels) -> bool {
    s.as_ref().is_none_or(|s| s.matches(labels))
}

fn compile_rule<'a>(
    ix: &impl Lookup<'a>,
    pol: &'a Policy,
    dir: Direction,
    selected: &BTreeSet<String>,
    index: usize,
    rule: &'a Rule,
    reuse: Option<PeerSet>,
) -> CompiledRule {
    let mut peers = PeerSet {
        any: rule.peers.is_empty(),
        ..PeerSet::default()
    };
    let mut blocks: Vec<(&IpNet, &[IpNet])> = Vec::new();
    let resolve_peers = reuse.is_none();
    for peer in rule.peers.iter().filter(|_| resolve_peers) {
        match peer {
            Peer::Pods {
                namespace_selector,
                pod_selector,
            } => {
                peers.uses_pods = true;
                let found = ix.peer_pods(pol, namespace_selector, pod_selector);
                if peers.pods.is_empty() {
                    peers.pods = found.0.clone();
                    peers.pod_ips = found.1.clone();
                } else {
                    peers.pods.extend(found.0.iter().cloned());
                    peers.pod_ips.extend(found.1.iter().copied());
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
    match reuse {
        Some(p) => peers = p,
        None => peers.blocks = intervals::block_ranges(blocks),
    }

    let mut ports = PortSet {
        any: rule.ports.is_empty(),
        ..PortSet::default()
    };
    let mut ranges = Vec::new();
    let mut named: Vec<(&str, Protocol)> = Vec::new();
    for spec in &rule.ports {
        match &spec.port {
            PortMatch::All => ranges.push((spec.protocol, 0, u16::MAX)),
            PortMatch::Range(a, b) => ranges.push((spec.protocol, *a, *b)),
            PortMatch::Named(n) => named.push((n.as_str(), spec.protocol)),
        }
    }
    ports.ranges = intervals::merge_ports(ranges);
    if !named.is_empty() {
        ports.uses_named = true;
        // semantics 34: ingress → the selected local pod's own ports; egress → the peer's.
        let candidates: Box<dyn Iterator<Item = &str>> = match dir {
            Direction::Ingress => Box::new(selected.iter().map(String::as_str)),
            Direction::Egress if peers.any || !peers.blocks.is_empty() => ix.subject_keys(),
            Direction::Egress => Box::new(peers.pods.iter().map(String::as_str)),
        };
        let mut out = BTreeSet::new();
        for k in candidates {
            let Some((p, ips)) = ix.subject(k) else {
                continue;
            };
            for cp in &p.ports {
                // semantics 35: name and protocol must both match.
                let hit = cp.name.as_deref().is_some_and(|cn| {
                    named
                        .iter()
                        .any(|(n, proto)| *n == cn && *proto == cp.protocol)
                });
                if !hit {
                    continue;
                }
                for ip in ips {
                    // For egress the destination must itself be an allowed peer.
                    if dir == Direction::Egress && peers.matches(*ip).is_none() {
                        continue;
                    }
                    out.insert((*ip, cp.protocol, cp.port));
                }
            }
        }
        ports.named = out;
    }
    CompiledRule {
        index,
        peers,
        ports,
    }
}
