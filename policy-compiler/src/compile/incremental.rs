//! The incremental compiler: owns the cluster state, the compiled model and its ruleset, plus a
//! persistent index of subject pods, and turns one [`Change`] into the batch that takes the
//! kernel from the last ruleset to the next, touching only what the change can affect.
//!
//! Why: a full `compile` of one node at 10k pods / 1k policies is ~80 ms (almost all of it
//! resolving every peer set of every policy again, ~100k addresses) and `diff` over the whole
//! table another ~7 ms. One change moves a handful of elements.
//!
//! - A pod change (or an attachment change, which changes its pods' addresses and locality)
//!   compares the pod's old and new view (labels, addresses, namespace labels, locality) against
//!   the specs of the compiled rules: peer sets and named-port sets are patched element by element
//!   for the pod's addresses only. If the pod is local, its verdict-map entries, group and the
//!   `selected` sets of the policies of its namespace are updated; a policy that starts or stops
//!   selecting a local pod is recompiled whole.
//! - A namespace label change does the same for the pods of that namespace.
//! - A policy change recompiles that policy (its chains and sets) and the groups of the local
//!   pods of its namespace.
//! - The local part (base chains, pending/self sets, verdict maps, group chains) is small and is
//!   rebuilt every time, compared object by object.
//!
//! Semantics still live in `resolve`/`build`: a recompiled policy goes through the same
//! `compile_policy`, and patched elements follow the same rules. The property test asserts that
//! after every change `compiled()` equals `compile(state, node)` and that the batch equals
//! `diff(last, next)` exactly. The batch is `diff` itself, run on the touched objects only.

use super::build;
use super::resolve::{
    self, attachment_matches, compile_policy, selector_opt_matches, Lookup, ResolvedPods,
};
use super::{Compiled, CompiledRule, LocalPod};
use crate::diff::changelog::{ChangeLog, PartNames};
use crate::model::{
    Change, ClusterState, Direction, LabelSelector, Labels, Peer, Pod, Policy, PortMatch, Protocol,
    Rule,
};
use crate::ruleset::names::{self, NAMED_SET_PREFIX, PEER_SET_PREFIX};
use crate::ruleset::{Batch, Elem, Family, Ruleset};
use palisade_contract::Attachment;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

/// A pod NetworkPolicy applies to, as the compiler sees it.
#[derive(Debug, Clone, PartialEq)]
struct Subject {
    /// Shared with the cluster state.
    pod: Arc<Pod>,
    /// Status IPs ∪ IPs of this node's matching attachment records.
    ips: BTreeSet<IpAddr>,
    /// Enforced on this node.
    local: bool,
}

/// Persistent lookup structures over the subject pods.
#[derive(Debug, Default)]
struct SubjectIndex {
    subjects: BTreeMap<String, Subject>,
    by_ns: BTreeMap<String, BTreeSet<String>>,
    /// Labels of every namespace holding subjects.
    ns_labels: BTreeMap<String, Labels>,
    /// Subject pods claiming an address.
    /// Nearly always one owner: a sorted vector is a tenth of a `BTreeSet`'s size.
    ip_owners: HashMap<IpAddr, Vec<String>>,
}

impl SubjectIndex {
    fn insert(&mut self, state: &ClusterState, key: &str, s: Subject) {
        let ns = s.pod.namespace.clone();
        if !self.ns_labels.contains_key(&ns) {
            self.ns_labels
                .insert(ns.clone(), state.namespace_labels(&ns));
        }
        self.by_ns.entry(ns).or_default().insert(key.to_string());
        for ip in &s.ips {
            let owners = self.ip_owners.entry(*ip).or_default();
            if let Err(at) = owners.binary_search_by(|k| k.as_str().cmp(key)) {
                owners.insert(at, key.to_string());
            }
        }
        self.subjects.insert(key.to_string(), s);
    }

    fn remove(&mut self, key: &str) {
        let Some(s) = self.subjects.remove(key) else {
            return;
        };
        let ns = &s.pod.namespace;
        if let Some(keys) = self.by_ns.get_mut(ns) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_ns.remove(ns);
                self.ns_labels.remove(ns);
            }
        }
        for ip in &s.ips {
            if let Some(o) = self.ip_owners.get_mut(ip) {
                o.retain(|k| k != key);
                if o.is_empty() {
                    self.ip_owners.remove(ip);
                }
            }
        }
    }
}

impl<'a> Lookup<'a> for SubjectIndex {
    fn peer_pods(
        &self,
        pol: &'a Policy,
        namespace_selector: &'a Option<LabelSelector>,
        pod_selector: &'a Option<LabelSelector>,
    ) -> Rc<ResolvedPods> {
        let mut out = ResolvedPods::default();
        for (ns, keys) in &self.by_ns {
            let in_scope = match namespace_selector {
                None => *ns == pol.namespace,
                Some(sel) => self.ns_labels.get(ns).is_some_and(|l| sel.matches(l)),
            };
            if !in_scope {
                continue;
            }
            for k in keys {
                if let Some(s) = self.subjects.get(k) {
                    if selector_opt_matches(pod_selector, &s.pod.labels) {
                        out.0.insert(k.clone());
                        out.1.extend(s.ips.iter().copied());
                    }
                }
            }
        }
        Rc::new(out)
    }
    fn subject(&self, key: &str) -> Option<(&Pod, &BTreeSet<IpAddr>)> {
        self.subjects.get(key).map(|s| (&*s.pod, &s.ips))
    }
    fn subject_keys(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.subjects.keys().map(String::as_str))
    }
}

/// The old and new view of one pod whose facts changed.
struct Moved {
    key: String,
    old: Option<Subject>,
    new: Option<Subject>,
    old_ns: Labels,
    new_ns: Labels,
}

/// Compiles one node incrementally; see the module documentation.
#[derive(Debug)]
pub struct IncrementalCompiler {
    state: ClusterState,
    compiled: Compiled,
    ix: SubjectIndex,
    att_by_pod: BTreeMap<String, Vec<Attachment>>,
    /// Names of the chains and sets of the local part.
    local_names: PartNames,
    /// Names of the chains and sets of each compiled policy.
    policy_names: BTreeMap<String, PartNames>,
    /// What changed since the last [`IncrementalCompiler::take_batch`].
    tr: ChangeLog,
    /// Resolved peers of unchanged rules of a policy being recompiled, by (policy, dir, index).
    reuse: BTreeMap<(String, Direction, usize), super::PeerSet>,
    /// Set by [`IncrementalCompiler::invalidate`]: changes go to the state only, and
    /// [`IncrementalCompiler::recompile`] compiles in full.
    stale: bool,
}

fn attachments_by_pod(atts: &[Attachment]) -> BTreeMap<String, Vec<Attachment>> {
    let mut m: BTreeMap<String, Vec<Attachment>> = BTreeMap::new();
    for a in atts {
        if let Some(k) = a.pod_key() {
            m.entry(k).or_default().push(a.clone());
        }
    }
    m
}

fn subject_view(
    state: &ClusterState,
    att_by_pod: &BTreeMap<String, Vec<Attachment>>,
    node: &str,
    key: &str,
) -> Option<Subject> {
    let pod = state.pods.get(key)?;
    if !pod.is_policy_subject() {
        return None;
    }
    let mut ips: BTreeSet<IpAddr> = pod.ips.iter().copied().collect();
    let mut local = pod.node_name.as_deref() == Some(node);
    for a in att_by_pod.get(key).into_iter().flatten() {
        if attachment_matches(a, pod) {
            ips.extend(a.ips.iter().copied());
            local = true;
        }
    }
    Some(Subject {
        pod: Arc::clone(pod),
        ips,
        local,
    })
}

/// Whether one rule's pod peers select a pod (semantics 13-15, 18).
fn rule_selects(pol: &Policy, rule: &Rule, pod: &Pod, ns_labels: &Labels) -> bool {
    rule.peers.iter().any(|peer| match peer {
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => {
            let ns_ok = match namespace_selector {
                None => pod.namespace == pol.namespace,
                Some(sel) => sel.matches(ns_labels),
            };
            ns_ok && selector_opt_matches(pod_selector, &pod.labels)
        }
        Peer::IpBlock { .. } => false,
    })
}

/// Policies of one namespace, by key.
fn policies_in<'s>(
    state: &'s ClusterState,
    ns: &'s str,
) -> impl Iterator<Item = (&'s String, &'s Policy)> + 's {
    let prefix = format!("{ns}/");
    state
        .policies
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
        .filter(move |(_, p)| p.namespace == ns)
}

fn local_pod(state: &ClusterState, key: &str, s: &Subject) -> LocalPod {
    let mut lp = LocalPod {
        key: key.to_string(),
        ips: s.ips.clone(),
        ingress: Vec::new(),
        egress: Vec::new(),
    };
    for (pkey, pol) in policies_in(state, &s.pod.namespace) {
        if !pol.pod_selector.matches(&s.pod.labels) {
            continue;
        }
        if pol.ingress.is_some() {
            lp.ingress.push(pkey.clone());
        }
        if pol.egress.is_some() {
            lp.egress.push(pkey.clone());
        }
    }
    lp
}

impl IncrementalCompiler {
    /// Compiles `state` for `node` in full and keeps what later changes need.
    pub fn new(state: ClusterState, node: &str) -> Self {
        // `compile`, keeping the names of each part's objects on the way.
        let mut compiled = resolve::resolve(&state, node);
        let (mut rs, warnings) = build::local_part(&compiled);
        let local_names = PartNames::of(&rs);
        let mut policy_names = BTreeMap::new();
        for (k, cp) in &compiled.policies {
            let part = build::policy_part(cp);
            policy_names.insert(k.clone(), PartNames::of(&part));
            rs.chains.extend(part.chains);
            rs.sets.extend(part.sets);
        }
        compiled.ruleset = rs;
        compiled.warnings.extend(warnings);
        let att_by_pod = attachments_by_pod(&state.attachments);
        let mut ix = SubjectIndex::default();
        for key in state.pods.keys() {
            if let Some(s) = subject_view(&state, &att_by_pod, node, key) {
                ix.insert(&state, key, s);
            }
        }
        Self {
            state,
            compiled,
            ix,
            att_by_pod,
            local_names,
            policy_names,
            tr: ChangeLog::default(),
            reuse: BTreeMap::new(),
            stale: false,
        }
    }

    /// A compiler for `node` that holds no state yet and compiles in full at the first
    /// [`Self::recompile`] (the changes of an initial list go to the state only).
    pub fn empty(node: &str) -> Self {
        let mut c = Self::new(ClusterState::default(), node);
        c.stale = true;
        c
    }

    /// Compile in full next time: until [`Self::recompile`], changes are applied to the state only
    /// (no incremental work), and what [`Self::compiled`] shows is out of date.
    pub fn invalidate(&mut self) {
        self.stale = true;
    }

    /// Whether the next [`Self::recompile`] compiles in full.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Compiles the held state in full (a fresh start: the next batch is relative to this
    /// ruleset, which callers commit as a full replace); nothing to do unless stale. The state is
    /// cloned, not moved, into the new compile (pods are shared, so it is cheap beside the compile):
    /// should the compile panic, this compiler still holds the whole state and stays stale.
    pub fn recompile(&mut self) {
        if self.stale {
            *self = Self::new(self.state.clone(), &self.compiled.node);
        }
    }

    pub fn node(&self) -> &str {
        &self.compiled.node
    }
    pub fn state(&self) -> &ClusterState {
        &self.state
    }
    /// Equal to `compile(self.state(), self.node())`.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }
    pub fn ruleset(&self) -> &Ruleset {
        &self.compiled.ruleset
    }
    pub fn into_state(self) -> ClusterState {
        self.state
    }

    /// Applies one change; returns the batch from the previous ruleset to the new one (empty
    /// when nothing in the table changes). Same as [`Self::stage`] then [`Self::take_batch`].
    pub fn apply(&mut self, change: Change) -> Batch {
        self.stage(change);
        self.take_batch()
    }

    /// The one batch from the ruleset of the last `take_batch` (or of `new`) to the current one,
    /// however many changes were staged since.
    pub fn take_batch(&mut self) -> Batch {
        std::mem::take(&mut self.tr).batch(&self.compiled.ruleset)
    }

    /// Pending marks the CNI plugin put into the kernel behind our back (from the attachment
    /// records, read under the node lock): the batch treats them as committed, so it removes the
    /// ones whose pod is known now (`add` + `delete`, which never fails on an element the plugin
    /// removed meanwhile).
    pub fn note_plugin_pending(&mut self, attachments: &[Attachment]) {
        let mut tr = std::mem::take(&mut self.tr);
        for a in attachments.iter().filter(|a| a.pending) {
            for ip in &a.ips {
                let set = names::pending_set(Family::of(ip));
                tr.note_committed_elem(&mut self.compiled.ruleset, set, Elem::Addr(*ip));
            }
        }
        // The current ruleset is what compile says again (the marks were taken as committed).
        self.rebuild_local(&mut tr);
        self.tr = tr;
    }

    /// Applies one change to the state, the model and the ruleset; the kernel's part is kept
    /// for the next [`Self::take_batch`]. Returns whether the state changed: a change equal to what
    /// is held (see [`ClusterState::would_change`]) does no work at all. While stale, only the state
    /// changes.
    pub fn stage(&mut self, change: Change) -> bool {
        if !self.state.would_change(&change) {
            return false;
        }
        if self.stale {
            return self.state.apply(change);
        }
        let mut tr = std::mem::take(&mut self.tr);
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        match change {
            Change::UpsertPod(p) => {
                let key = p.key();
                self.pods_changed(Change::UpsertPod(p), [key].into(), &mut dirty, &mut tr);
            }
            Change::DeletePod { namespace, name } => {
                let key = crate::model::pod_key(&namespace, &name);
                let ch = Change::DeletePod { namespace, name };
                self.pods_changed(ch, [key].into(), &mut dirty, &mut tr);
            }
            Change::SetAttachments(atts) => {
                let keys: BTreeSet<String> = self
                    .state
                    .attachments
                    .iter()
                    .chain(atts.iter())
                    .filter_map(Attachment::pod_key)
                    .collect();
                self.pods_changed(Change::SetAttachments(atts), keys, &mut dirty, &mut tr);
            }
            Change::UpsertNamespace(ns) => {
                let name = ns.name.clone();
                self.namespace_changed(Change::UpsertNamespace(ns), &name, &mut dirty, &mut tr);
            }
            Change::DeleteNamespace { name } => {
                let ch = Change::DeleteNamespace { name: name.clone() };
                self.namespace_changed(ch, &name, &mut dirty, &mut tr);
            }
            Change::UpsertPolicy(p) => {
                let (key, ns) = (p.key(), p.namespace.clone());
                // The previous version is moved out, not cloned (`would_change` said it differs).
                let old = self.state.policies.insert(key.clone(), p);
                self.policy_changed(key, &ns, old, &mut dirty);
            }
            Change::DeletePolicy { namespace, name } => {
                let key = crate::model::pod_key(&namespace, &name);
                self.state.apply(Change::DeletePolicy {
                    namespace: namespace.clone(),
                    name,
                });
                self.policy_changed(key, &namespace, None, &mut dirty);
            }
            ch @ (Change::UpsertNode(_) | Change::DeleteNode { .. }) => {
                self.state.apply(ch); // nodes are for routes: nothing compiled reads them
            }
            ch @ Change::SetEgressNat(_) => {
                self.state.apply(ch); // the local part, rebuilt below, renders it
            }
        }
        self.recompile_policies(&dirty, &mut tr);
        self.reuse.clear(); // peers of a policy that no longer selects a local pod
        self.rebuild_local(&mut tr);
        self.tr = tr;
        true
    }

    fn pods_changed(
        &mut self,
        change: Change,
        keys: BTreeSet<String>,
        dirty: &mut BTreeSet<String>,
        tr: &mut ChangeLog,
    ) {
        let old: Vec<(String, Option<Subject>)> = keys
            .into_iter()
            .map(|k| {
                let s = self.ix.subjects.get(&k).cloned();
                (k, s)
            })
            .collect();
        let attachments = matches!(change, Change::SetAttachments(_));
        self.state.apply(change);
        if attachments {
            self.att_by_pod = attachments_by_pod(&self.state.attachments);
        }
        let node = self.compiled.node.clone();
        let mut moved = Vec::new();
        for (key, old) in old {
            let new = subject_view(&self.state, &self.att_by_pod, &node, &key);
            if new == old {
                continue;
            }
            self.ix.remove(&key);
            if let Some(s) = &new {
                self.ix.insert(&self.state, &key, s.clone());
            }
            let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
            let labels = self.state.namespace_labels(ns);
            moved.push(Moved {
                key,
                old,
                new,
                old_ns: labels.clone(),
                new_ns: labels,
            });
        }
        self.local_pods_moved(&moved, dirty);
        self.patch_peers(&moved, dirty, tr);
    }

    fn namespace_changed(
        &mut self,
        change: Change,
        ns: &str,
        dirty: &mut BTreeSet<String>,
        tr: &mut ChangeLog,
    ) {
        let old_ns = self.state.namespace_labels(ns);
        self.state.apply(change);
        let new_ns = self.state.namespace_labels(ns);
        if old_ns == new_ns {
            return;
        }
        let Some(keys) = self.ix.by_ns.get(ns).cloned() else {
            return; // no pods: nothing selected changes
        };
        self.ix.ns_labels.insert(ns.to_string(), new_ns.clone());
        let moved: Vec<Moved> = keys
            .into_iter()
            .filter_map(|key| {
                let s = self.ix.subjects.get(&key).cloned()?;
                Some(Moved {
                    key,
                    old: Some(s.clone()),
                    new: Some(s),
                    old_ns: old_ns.clone(),
                    new_ns: new_ns.clone(),
                })
            })
            .collect();
        self.patch_peers(&moved, dirty, tr);
    }

    /// Local pods whose facts changed: their map entries and groups, and the `selected` sets of
    /// the policies of their namespace.
    fn local_pods_moved(&mut self, moved: &[Moved], dirty: &mut BTreeSet<String>) {
        for m in moved {
            let was_local = m.old.as_ref().is_some_and(|s| s.local);
            let is_local = m.new.as_ref().is_some_and(|s| s.local);
            if !was_local && !is_local {
                continue;
            }
            self.compiled.pods.remove(&m.key);
            if let Some(s) = m.new.as_ref().filter(|s| s.local) {
                self.compiled
                    .pods
                    .insert(m.key.clone(), local_pod(&self.state, &m.key, s));
            }
            let ns = m.key.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
            for (pkey, pol) in policies_in(&self.state, ns) {
                if pol.ingress.is_none() && pol.egress.is_none() {
                    continue;
                }
                let sel = |s: &Option<Subject>| {
                    s.as_ref()
                        .is_some_and(|s| s.local && pol.pod_selector.matches(&s.pod.labels))
                };
                let (was, is) = (sel(&m.old), sel(&m.new));
                if was == is {
                    continue;
                }
                match self.compiled.policies.get_mut(pkey) {
                    Some(cp) => {
                        if is {
                            cp.selected.insert(m.key.clone());
                        } else {
                            cp.selected.remove(&m.key);
                        }
                        if cp.selected.is_empty() {
                            dirty.insert(pkey.clone());
                        }
                    }
                    None if is => {
                        dirty.insert(pkey.clone());
                    }
                    None => {}
                }
            }
        }
    }

    /// Peer and named-port sets of the compiled rules (of policies not recompiled whole):
    /// memberships of the moved pods, then every address they held or hold.
    fn patch_peers(&mut self, moved: &[Moved], dirty: &BTreeSet<String>, tr: &mut ChangeLog) {
        if moved.is_empty() {
            return;
        }
        let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
        for m in moved {
            for s in [&m.old, &m.new].into_iter().flatten() {
                ips.extend(s.ips.iter().copied());
            }
        }
        let rs = &mut self.compiled.ruleset;
        for (pkey, cp) in self.compiled.policies.iter_mut() {
            if dirty.contains(pkey) {
                continue;
            }
            let Some(pol) = self.state.policies.get(pkey) else {
                continue;
            };
            let selected = &cp.selected;
            for dir in Direction::BOTH {
                let (Some(specs), Some(rules)) = (
                    pol.rules(dir),
                    match dir {
                        Direction::Ingress => cp.ingress.as_mut(),
                        Direction::Egress => cp.egress.as_mut(),
                    },
                ) else {
                    continue;
                };
                for (spec, cr) in specs.iter().zip(rules.iter_mut()) {
                    if cr.peers.uses_pods {
                        for m in moved {
                            let was = m
                                .old
                                .as_ref()
                                .is_some_and(|s| rule_selects(pol, spec, &s.pod, &m.old_ns));
                            let is = m
                                .new
                                .as_ref()
                                .is_some_and(|s| rule_selects(pol, spec, &s.pod, &m.new_ns));
                            if is {
                                cr.peers.pods.insert(m.key.clone());
                            } else if was {
                                cr.peers.pods.remove(&m.key);
                            }
                        }
                        for ip in &ips {
                            patch_peer_ip(&self.ix, pkey, dir, cr, *ip, rs, tr);
                        }
                    }
                    if cr.ports.uses_named {
                        for ip in &ips {
                            patch_named_ip(&self.ix, pkey, dir, spec, selected, cr, *ip, rs, tr);
                        }
                    }
                }
            }
        }
    }

    fn policy_changed(
        &mut self,
        pkey: String,
        ns: &str,
        old: Option<Policy>,
        dirty: &mut BTreeSet<String>,
    ) {
        // Rules whose peers did not change keep their resolved peers (they are up to date).
        if let (Some(old), Some(new), Some(cp)) = (
            old,
            self.state.policies.get(&pkey),
            self.compiled.policies.get_mut(&pkey),
        ) {
            for dir in Direction::BOTH {
                let (Some(a), Some(b)) = (old.rules(dir), new.rules(dir)) else {
                    continue;
                };
                let Some(rules) = (match dir {
                    Direction::Ingress => cp.ingress.as_mut(),
                    Direction::Egress => cp.egress.as_mut(),
                }) else {
                    continue;
                };
                for (i, cr) in rules.iter_mut().enumerate() {
                    if a.get(i).map(|r| &r.peers) == b.get(i).map(|r| &r.peers) {
                        self.reuse
                            .insert((pkey.clone(), dir, i), std::mem::take(&mut cr.peers));
                    }
                }
            }
        }
        let local: Vec<String> = self
            .compiled
            .pods
            .keys()
            .filter(|k| k.split_once('/').is_some_and(|(n, _)| n == ns))
            .cloned()
            .collect();
        for k in local {
            if let Some(s) = self.ix.subjects.get(&k) {
                let lp = local_pod(&self.state, &k, s);
                self.compiled.pods.insert(k, lp);
            }
        }
        dirty.insert(pkey);
    }

    /// Recompiles whole policies: their chains and sets are replaced.
    fn recompile_policies(&mut self, dirty: &BTreeSet<String>, tr: &mut ChangeLog) {
        for pkey in dirty {
            self.compiled.policies.remove(pkey);
            let mut part = Ruleset::default();
            if let Some(pol) = self.state.policies.get(pkey) {
                let selected: BTreeSet<String> = self
                    .ix
                    .by_ns
                    .get(&pol.namespace)
                    .into_iter()
                    .flatten()
                    .filter(|k| {
                        self.ix
                            .subjects
                            .get(*k)
                            .is_some_and(|s| s.local && pol.pod_selector.matches(&s.pod.labels))
                    })
                    .cloned()
                    .collect();
                if !selected.is_empty() && (pol.ingress.is_some() || pol.egress.is_some()) {
                    let reuse = self
                        .reuse
                        .range((pkey.clone(), Direction::Ingress, 0)..)
                        .take_while(|((k, _, _), _)| k == pkey)
                        .map(|((_, d, i), _)| (*d, *i))
                        .collect::<Vec<_>>()
                        .into_iter()
                        .filter_map(|(d, i)| {
                            let p = self.reuse.remove(&(pkey.clone(), d, i))?;
                            Some(((d, i), p))
                        })
                        .collect();
                    let cp = compile_policy(&self.ix, pkey, pol, selected, reuse);
                    part = build::policy_part(&cp);
                    self.compiled.policies.insert(pkey.clone(), cp);
                }
            }
            let old = self.policy_names.remove(pkey).unwrap_or_default();
            let new = tr.replace_part(&mut self.compiled.ruleset, &old, part);
            if !new.is_empty() {
                self.policy_names.insert(pkey.clone(), new);
            }
        }
    }

    /// Pending addresses and the local part, compared object by object.
    fn rebuild_local(&mut self, tr: &mut ChangeLog) {
        self.compiled.pending = self
            .state
            .attachments
            .iter()
            .filter(|a| {
                a.pending
                    && !a.pod_key().is_some_and(|k| {
                        self.state
                            .pods
                            .get(&k)
                            .is_some_and(|p| p.is_policy_subject() && attachment_matches(a, p))
                    })
            })
            .flat_map(|a| a.ips.iter().copied())
            .collect();
        let (sources, source_warnings) = resolve::source_bindings(&self.state.attachments);
        self.compiled.sources = sources;
        self.compiled.egress_nat = self.state.egress_nat.clone();
        let (part, part_warnings) = build::local_part(&self.compiled);
        // In the order of a full compile: resolve's, then the build's.
        let mut warnings = source_warnings;
        warnings.extend(part_warnings);
        self.local_names = tr.replace_part(&mut self.compiled.ruleset, &self.local_names, part);
        self.compiled.warnings = warnings;
    }
}

/// Whether `ip` belongs in a rule's peer addresses: some subject pod claiming it is a peer.
fn patch_peer_ip(
    ix: &SubjectIndex,
    pkey: &str,
    dir: Direction,
    cr: &mut CompiledRule,
    ip: IpAddr,
    rs: &mut Ruleset,
    tr: &mut ChangeLog,
) {
    let want = ix
        .ip_owners
        .get(&ip)
        .is_some_and(|o| o.iter().any(|k| cr.peers.pods.contains(k)));
    if want == cr.peers.pod_ips.contains(&ip) {
        return;
    }
    let set = names::rule_set(PEER_SET_PREFIX, pkey, dir, cr.index, Some(Family::of(&ip)));
    if want {
        cr.peers.pod_ips.insert(ip);
        tr.insert_elem(rs, &set, Elem::Addr(ip));
    } else {
        cr.peers.pod_ips.remove(&ip);
        tr.remove_elem(rs, &set, &Elem::Addr(ip));
    }
}

/// The named-port entries of `ip` in one rule, as `resolve::compile_rule` derives them
/// (semantics 34, 35): from the candidate pods claiming the address.
#[allow(clippy::too_many_arguments)]
fn patch_named_ip(
    ix: &SubjectIndex,
    pkey: &str,
    dir: Direction,
    spec: &Rule,
    selected: &BTreeSet<String>,
    cr: &mut CompiledRule,
    ip: IpAddr,
    rs: &mut Ruleset,
    tr: &mut ChangeLog,
) {
    let named: Vec<(&str, Protocol)> = spec
        .ports
        .iter()
        .filter_map(|p| match &p.port {
            PortMatch::Named(n) => Some((n.as_str(), p.protocol)),
            _ => None,
        })
        .collect();
    let every_subject = cr.peers.any || !cr.peers.blocks.is_empty();
    let mut want: BTreeSet<(IpAddr, Protocol, u16)> = BTreeSet::new();
    let peer_ok = dir == Direction::Ingress || cr.peers.matches(ip).is_some();
    for k in ix.ip_owners.get(&ip).into_iter().flatten() {
        let candidate = match dir {
            Direction::Ingress => selected.contains(k),
            Direction::Egress => every_subject || cr.peers.pods.contains(k),
        };
        let Some(s) = ix.subjects.get(k) else {
            continue;
        };
        if !candidate || !peer_ok {
            continue;
        }
        for cp in &s.pod.ports {
            let hit = cp.name.as_deref().is_some_and(|cn| {
                named
                    .iter()
                    .any(|(n, proto)| *n == cn && *proto == cp.protocol)
            });
            if hit {
                want.insert((ip, cp.protocol, cp.port));
            }
        }
    }
    let have: BTreeSet<(IpAddr, Protocol, u16)> = cr
        .ports
        .named
        .range((ip, Protocol::Tcp, 0)..=(ip, Protocol::Sctp, u16::MAX))
        .copied()
        .collect();
    if want == have {
        return;
    }
    let set = names::rule_set(NAMED_SET_PREFIX, pkey, dir, cr.index, Some(Family::of(&ip)));
    for t in have.difference(&want) {
        cr.ports.named.remove(t);
        tr.remove_elem(rs, &set, &Elem::AddrProtoPort(t.0, t.1, t.2));
    }
    for t in want.difference(&have) {
        cr.ports.named.insert(*t);
        tr.insert_elem(rs, &set, Elem::AddrProtoPort(t.0, t.1, t.2));
    }
}

#[cfg(test)]
mod tests;
