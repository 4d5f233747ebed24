//! The incremental compiler: owns the cluster state, the compiled model and its ruleset, plus the
//! compile's pod index (`index::PodIndex`) kept up to date, and turns one [`Change`] into the
//! batch that takes the kernel from the last ruleset to the next, touching only what the change
//! can affect.
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
//!   rebuilt every time, compared object by object. The tier chains it names (the rules of many
//!   ClusterNetworkPolicies inlined) are parts of their own, built again only when one of their
//!   policies is recompiled or a new combination appears (rebuilding them with every change cost
//!   ~10 ms at 10k pods and 100 ClusterNetworkPolicies).
//!
//! This module only dispatches changes and patches: the subject view, the index, the pending set,
//! namespace scope, the pods a policy selects and named ports are `index`'s and `resolve`'s, the
//! same code a full compile runs, and the batch is the change log's (`diff` of the touched
//! objects). The property test asserts that after every change `compiled()` equals
//! `compile(state, node)` and that the batch equals `diff(last, next)` exactly.

use super::build;
use super::index::{Moved, PodIndex, Subject};
use super::resolve::{
    self, applies, cluster_selected, cluster_selects, local_pod, rule_selections, Kept,
    NamedPortScope, NamedPorts, Resolver, RuleRef,
};
use super::{Compiled, CompiledRule, PeerSet};
use crate::diff::changelog::{ChangeLog, PartNames, SetHolders};
use crate::diff::DeclaredSizes;
use crate::model::{namespace_entries, Change, ClusterState, Direction, Policy, Protocol, Rule};
use crate::ruleset::names;
use crate::ruleset::{Batch, Elem, Family, Ruleset};
use palisade_contract::Attachment;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// Compiles one node incrementally; see the module documentation.
#[derive(Debug)]
pub struct IncrementalCompiler {
    state: ClusterState,
    compiled: Compiled,
    ix: PodIndex,
    /// Names of the chains and sets of the local part.
    local_names: PartNames,
    /// Names of the chains and sets of each compiled policy.
    policy_names: BTreeMap<String, PartNames>,
    /// The tier chains in the ruleset, by name: what each was built from, and its part's names.
    /// A tier chain is built again only when one of its ClusterNetworkPolicies is recompiled.
    tier_parts: BTreeMap<String, (build::TierChain, PartNames)>,
    /// How many of the parts above hold each set (shared port and peer sets are held by several).
    holders: SetHolders,
    /// What changed since the last [`IncrementalCompiler::take_batch`].
    tr: ChangeLog,
    /// The sets the kernel holds larger than their elements give them, after the batches taken
    /// (a set keeps the size it was declared with as it shrinks).
    declared: DeclaredSizes,
    /// Resolved peers of unchanged rules of a policy being recompiled, by policy.
    reuse: BTreeMap<String, BTreeMap<RuleRef, PeerSet>>,
    /// Set by [`IncrementalCompiler::invalidate`]: changes go to the state only, and
    /// [`IncrementalCompiler::recompile`] compiles in full.
    stale: bool,
}

/// What a full compile of one node keeps for later changes, built from a state it only reads.
struct Built {
    compiled: Compiled,
    ix: PodIndex,
    local_names: PartNames,
    policy_names: BTreeMap<String, PartNames>,
    tier_parts: BTreeMap<String, (build::TierChain, PartNames)>,
    holders: SetHolders,
}

impl Built {
    /// `compile`, keeping the index and the names of each part's objects on the way.
    fn of(state: &ClusterState, node: &str) -> Self {
        let mut ix = PodIndex::build(state, node);
        let mut compiled = resolve::resolve(state, &ix);
        ix.track_owners();
        let build::LocalPart {
            mut rs,
            warnings,
            ties,
            tiers,
        } = build::local_part(&compiled);
        compiled.priority_ties = ties;
        let local_names = PartNames::of(&rs);
        let mut tier_parts = BTreeMap::new();
        for (name, t) in tiers {
            let part = build::tier_part(&compiled, &name, &t);
            tier_parts.insert(name, (t, PartNames::of(&part)));
            rs.merge(part);
        }
        let mut policy_names = BTreeMap::new();
        // A set named by its content that an earlier part built is only named by the later ones.
        for (k, cp) in &compiled.policies {
            let part = build::policy_part(cp, &|n| rs.sets.contains_key(n));
            policy_names.insert(k.clone(), PartNames::of_borrowing(&part.rs, &part.borrowed));
            rs.merge(part.rs);
        }
        for (k, cp) in &compiled.cluster_policies {
            let part = build::cluster_part(cp, &|n| rs.sets.contains_key(n));
            policy_names.insert(k.clone(), PartNames::of_borrowing(&part.rs, &part.borrowed));
            rs.merge(part.rs);
        }
        compiled.ruleset = rs;
        compiled.warnings.extend(warnings);
        let holders = SetHolders::of(
            std::iter::once(&local_names)
                .chain(tier_parts.values().map(|(_, n)| n))
                .chain(policy_names.values()),
        );
        Built {
            compiled,
            ix,
            local_names,
            policy_names,
            tier_parts,
            holders,
        }
    }
}

impl IncrementalCompiler {
    /// Compiles `state` for `node` in full and keeps what later changes need.
    pub fn new(state: ClusterState, node: &str) -> Self {
        let built = Built::of(&state, node);
        Self::from_parts(state, built)
    }

    /// A fresh start from a full compile's parts: empty change log, nothing to reuse, not stale.
    fn from_parts(state: ClusterState, b: Built) -> Self {
        Self {
            state,
            compiled: b.compiled,
            ix: b.ix,
            local_names: b.local_names,
            policy_names: b.policy_names,
            tier_parts: b.tier_parts,
            holders: b.holders,
            tr: ChangeLog::default(),
            declared: DeclaredSizes::default(),
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
    /// ruleset, which callers commit as a full replace); nothing to do unless stale.
    ///
    /// What the last compile built is dropped first (stale, it is of no use past this point; at
    /// 100k pods the new compile stood beside ~40 MB of it at every resync), then the state is
    /// rebuilt with full map nodes ([`ClusterState::compacted`]; the maps it replaces go before the
    /// compile allocates), and compiled from where it is held. Should the compile panic, this
    /// compiler still holds the whole state, stays stale, and shows an empty model until a
    /// recompile succeeds.
    pub fn recompile(&mut self) {
        if !self.stale {
            return;
        }
        let node = self.compiled.node.clone();
        let held = std::mem::replace(self, Self::empty(&node)).into_state();
        self.state = held.compacted();
        drop(held);
        let built = Built::of(&self.state, &node);
        let state = std::mem::take(&mut self.state);
        *self = Self::from_parts(state, built);
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
        std::mem::take(&mut self.tr).batch(&self.compiled.ruleset, &mut self.declared)
    }

    /// Our table was replaced in full with [`Self::ruleset`] (every set declared at its elements'
    /// size), so the next batch must not count on any larger one. A batch that is not committed
    /// is followed by a full replace, so this is all the taken batches need to stay true.
    pub fn table_replaced(&mut self) {
        self.declared.clear();
    }

    /// A repair wrote these sets (adding each that was missing at its elements' size).
    pub fn sets_repaired(&mut self, sets: &BTreeSet<String>) {
        self.declared.forget(sets);
    }

    /// The sets the kernel holds larger than their elements give them.
    pub fn declared_sizes(&self) -> &DeclaredSizes {
        &self.declared
    }

    /// Pending marks the CNI plugin put into the kernel behind our back (from the attachment
    /// records, read under the node lock): the batch treats them as committed, so it removes the
    /// ones whose pod is known now (`add` + `delete`, which never fails on an element the plugin
    /// removed meanwhile).
    ///
    /// Without a pending record nothing is taken as committed and the local part stays as the
    /// last change left it (rebuilding it anyway was ~12 % of the agent's reconcile thread at
    /// 1,000 local pods).
    pub fn note_plugin_pending(&mut self, attachments: &[Attachment]) {
        let mut pending = attachments.iter().filter(|a| a.pending).peekable();
        if pending.peek().is_none() {
            return;
        }
        let mut tr = std::mem::take(&mut self.tr);
        for a in pending {
            for ip in &a.ips {
                let set = names::pending_set(Family::of(ip));
                tr.note_committed_elem(&mut self.compiled.ruleset, set, Elem::Addr(*ip));
            }
        }
        // The current ruleset is what compile says again (the marks were taken as committed).
        self.rebuild_local(&mut tr, &BTreeSet::new());
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
        // Whether the local part may have changed; only a pod that is not ours and shares no
        // address with ours leaves it as it is (see `touches_local`).
        let mut local = true;
        match change {
            Change::UpsertPod(p) => {
                let key = p.key();
                local = self.pods_changed(Change::UpsertPod(p), [key].into(), &mut dirty, &mut tr);
            }
            Change::DeletePod { namespace, name } => {
                let key = crate::model::pod_key(&namespace, &name);
                let ch = Change::DeletePod { namespace, name };
                local = self.pods_changed(ch, [key].into(), &mut dirty, &mut tr);
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
                // Routes read Nodes; of the compiled model only `nodes` peers do.
                self.state.apply(ch);
                for (k, cp) in &self.compiled.cluster_policies {
                    let uses_nodes = Direction::BOTH
                        .into_iter()
                        .flat_map(|d| cp.rules(d))
                        .any(|r| r.rule.peers.uses_nodes);
                    if uses_nodes {
                        dirty.insert(k.clone());
                    }
                }
            }
            Change::UpsertClusterPolicy(cp) => {
                let key = cp.key();
                self.state.apply(Change::UpsertClusterPolicy(cp));
                self.cluster_policy_changed(key, &mut dirty);
            }
            Change::DeleteClusterPolicy { name } => {
                let key = crate::model::cluster_key(&name);
                self.state.apply(Change::DeleteClusterPolicy { name });
                self.cluster_policy_changed(key, &mut dirty);
            }
            ch @ (Change::SetEgressNat(_) | Change::SetTunnel(_)) => {
                self.state.apply(ch); // the local part, rebuilt below, renders it
            }
            ch @ (Change::SetFlowLog(_) | Change::SetPolicyLimits(_)) => {
                // Every drop of every chain, or which policies are refused, changes (start-up
                // settings): compile in full.
                self.state.apply(ch);
                self.tr = tr;
                self.stale = true;
                return true;
            }
        }
        self.recompile_policies(&dirty, &mut tr);
        self.reuse.clear(); // peers of a policy that no longer selects a local pod
        if local || !dirty.is_empty() {
            // A remote pod's change (a label, a new pod elsewhere) patches peer sets only: the
            // local part (the node's pods, their groups, maps and tier lists) cannot change, and
            // rebuilding it to find that out was most of a change's cost at 10k pods.
            self.rebuild_local(&mut tr, &dirty);
        }
        self.tr = tr;
        true
    }

    /// Applies a pod or attachment change; returns whether it may touch the local part.
    fn pods_changed(
        &mut self,
        change: Change,
        keys: BTreeSet<String>,
        dirty: &mut BTreeSet<String>,
        tr: &mut ChangeLog,
    ) -> bool {
        let attachments = matches!(change, Change::SetAttachments(_));
        self.state.apply(change);
        if attachments {
            self.ix.set_records(&self.state.attachments);
        }
        let moved: Vec<Moved> = keys
            .iter()
            .filter_map(|key| self.ix.refresh(&self.state, key))
            .collect();
        let local = attachments || self.touches_local(&moved, &keys);
        self.local_pods_moved(&moved, dirty);
        // A refused policy's count is in the local part's warnings.
        let recounted = self.patch_peers(&moved, dirty, tr);
        local || recounted
    }

    /// Whether the local part may differ after `moved` (of pods `keys`): one of them was or is a
    /// local pod, or holds an address a local pod or an attachment record holds (the pending
    /// marks and address owners are the local part's). A key that moved no subject (it is none
    /// before and after) is taken as touching it: nothing is guessed.
    fn touches_local(&self, moved: &[Moved], keys: &BTreeSet<String>) -> bool {
        if moved.len() != keys.len() {
            return true; // a key that moved no subject: do not guess
        }
        let ours: BTreeSet<IpAddr> = self
            .compiled
            .pods
            .values()
            .flat_map(|p| p.ips.iter().copied())
            .chain(
                self.state
                    .attachments
                    .iter()
                    .flat_map(|a| a.ips.iter().copied()),
            )
            .collect();
        moved.iter().any(|m| {
            [&m.old, &m.new]
                .into_iter()
                .flatten()
                .any(|s| s.local || s.ips.iter().any(|ip| ours.contains(ip)))
        })
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
        let moved = self.ix.relabel_namespace(ns, &old_ns, &new_ns);
        // ClusterNetworkPolicies select their subjects by namespace labels too.
        self.local_pods_moved(&moved, dirty);
        self.patch_peers(&moved, dirty, tr);
    }

    /// A ClusterNetworkPolicy changed (the state holds the new one): it is compiled again, and the
    /// tier lists of every local pod (it is cluster-wide) are made again.
    fn cluster_policy_changed(&mut self, key: String, dirty: &mut BTreeSet<String>) {
        let local: Vec<String> = self.compiled.pods.keys().cloned().collect();
        self.relist_local(local);
        dirty.insert(key);
    }

    /// The policy lists of these local pods, again.
    fn relist_local(&mut self, keys: Vec<String>) {
        for k in keys {
            if let Some(s) = self.ix.subject(&k) {
                let lp = local_pod(&self.state, &k, s);
                self.compiled.pods.insert(k, lp);
            }
        }
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
            self.compiled.pods.remove(&*m.key);
            if let Some(s) = m.new.as_ref().filter(|s| s.local) {
                self.compiled
                    .pods
                    .insert(m.key.to_string(), local_pod(&self.state, &m.key, s));
            }
            let Some(ns) = m.namespace() else {
                continue;
            };
            for (pkey, pol) in namespace_entries(&self.state.policies, ns) {
                if !applies(pol) {
                    continue;
                }
                let sel = |s: &Option<Subject>| s.as_ref().is_some_and(|s| s.selected_by(pol));
                let selected = self
                    .compiled
                    .policies
                    .get_mut(pkey)
                    .map(|cp| &mut cp.selected);
                moved_selection(pkey, &m.key, (sel(&m.old), sel(&m.new)), selected, dirty);
            }
            for cp in self.state.cluster_policies.values() {
                let sel = |s: &Option<Subject>, ns| {
                    s.as_ref()
                        .is_some_and(|s| s.local && cluster_selects(cp, s, ns))
                };
                let pkey = cp.key();
                let change = (sel(&m.old, &m.old_ns), sel(&m.new, &m.new_ns));
                let selected = self
                    .compiled
                    .cluster_policies
                    .get_mut(&pkey)
                    .map(|cp| &mut cp.selected);
                moved_selection(&pkey, &m.key, change, selected, dirty);
            }
        }
    }

    /// Peer and named-port sets of the compiled rules (of policies not recompiled whole), of
    /// NetworkPolicies and ClusterNetworkPolicies alike: memberships of the moved pods, then every
    /// address they held or hold.
    /// Patches the peer sets of the compiled rules the moved pods join or leave; returns whether
    /// the count of a refused policy changed.
    fn patch_peers(
        &mut self,
        moved: &[Moved],
        dirty: &mut BTreeSet<String>,
        tr: &mut ChangeLog,
    ) -> bool {
        let mut recounted = false;
        if moved.is_empty() {
            return recounted;
        }
        // Policies whose rules gain a peer family's set or lose one: recompiled whole below.
        let mut whole = Vec::new();
        let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
        for m in moved {
            for s in [&m.old, &m.new].into_iter().flatten() {
                ips.extend(s.ips.iter().copied());
            }
        }
        let patch = Patch { moved, ips: &ips };
        let rs = &mut self.compiled.ruleset;
        let limits = self.state.policy_limits;
        for (pkey, cp) in self.compiled.policies.iter_mut() {
            if dirty.contains(pkey) {
                continue;
            }
            let Some(pol) = self.state.policies.get(pkey) else {
                continue;
            };
            // What its pod peers select, summed, follows the pods that moved; a policy that
            // crosses its limit either way is compiled again, which decides it as a full
            // compile does. One refused for its number of peers stays so (the spec decides).
            match &mut cp.refused {
                Some(super::Refusal::PodPeers { .. }) => continue,
                Some(super::Refusal::PeerPods { found, limit }) => {
                    let now = patch.selections(&pol.namespace, pol, *found);
                    recounted |= now != *found;
                    *found = now;
                    if *found <= *limit {
                        whole.push(pkey.clone());
                    }
                    continue;
                }
                None => {}
            }
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
                    let at = RulePatch {
                        ix: &self.ix,
                        pkey,
                        dir,
                    };
                    if patch.rule(&at, &pol.namespace, spec, &cp.selected, cr, rs, tr) {
                        whole.push(pkey.clone());
                    }
                }
            }
            if cp.peer_pods() > limits.peer_pods {
                whole.push(pkey.clone());
            }
        }
        for (pkey, ccp) in self.compiled.cluster_policies.iter_mut() {
            if dirty.contains(pkey) {
                continue;
            }
            let Some(cp) = self.state.cluster_policy_by_key(pkey) else {
                continue;
            };
            for dir in Direction::BOTH {
                let selected = &ccp.selected;
                let rules = match dir {
                    Direction::Ingress => &mut ccp.ingress,
                    Direction::Egress => &mut ccp.egress,
                };
                for (spec, cr) in cp.rules(dir).iter().zip(rules.iter_mut()) {
                    let at = RulePatch {
                        ix: &self.ix,
                        pkey,
                        dir,
                    };
                    if patch.rule(&at, "", &spec.rule, selected, &mut cr.rule, rs, tr) {
                        whole.push(pkey.clone());
                    }
                }
            }
        }
        dirty.extend(whole);
        recounted
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
            let reuse = self.reuse.entry(pkey.clone()).or_default();
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
                for (index, cr) in rules.iter_mut().enumerate() {
                    if a.get(index).map(|r| &r.peers) == b.get(index).map(|r| &r.peers) {
                        reuse.insert(RuleRef { dir, index }, std::mem::take(&mut cr.peers));
                    }
                }
            }
        }
        // The policy lists of the local pods of its namespace.
        let local: Vec<String> = namespace_entries(&self.compiled.pods, ns)
            .map(|(k, _)| k.clone())
            .collect();
        for k in local {
            if let Some(s) = self.ix.subject(&k) {
                let lp = local_pod(&self.state, &k, s);
                self.compiled.pods.insert(k, lp);
            }
        }
        dirty.insert(pkey);
    }

    /// Recompiles whole policies: their chains and sets are replaced. The policies kept lend
    /// what they resolved to those compiled now (the same peers, the same named ports).
    fn recompile_policies(&mut self, dirty: &BTreeSet<String>, tr: &mut ChangeLog) {
        for pkey in dirty {
            self.compiled.policies.remove(pkey);
            self.compiled.cluster_policies.remove(pkey);
        }
        let kept = Kept {
            compiled: &self.compiled.policies,
            policies: &self.state.policies,
        };
        let resolver =
            Resolver::new(&self.ix, &self.state.nodes, self.state.policy_limits).keeping(kept);
        let mut done = Vec::with_capacity(dirty.len());
        for pkey in dirty {
            let mut compiled = Recompiled::Gone;
            if let Some(cp) = self.state.cluster_policy_by_key(pkey) {
                let selected = cluster_selected(&self.ix, cp);
                if !selected.is_empty() {
                    let ccp = resolver.compile_cluster_policy(cp, selected, BTreeMap::new());
                    compiled = Recompiled::Cluster(ccp);
                }
            } else if let Some(pol) = self.state.policies.get(pkey) {
                let selected = resolve::selected(&self.ix, pol);
                if !selected.is_empty() && applies(pol) {
                    let reuse = self.reuse.remove(pkey).unwrap_or_default();
                    let cp = resolver.compile_policy(pkey, pol, selected, reuse);
                    compiled = Recompiled::Policy(cp);
                }
            }
            done.push((pkey, compiled));
        }
        drop(resolver);
        // A set named by its content that a kept part holds was patched with every move: the
        // parts built now only name it. One that only recompiled parts hold was patched by none
        // of them: the first part that names it builds it again.
        let mut stale = self.held_by_dirty_only(dirty);
        for (pkey, compiled) in done {
            let part = {
                let rs = &self.compiled.ruleset;
                let borrow = |n: &str| rs.sets.contains_key(n) && !stale.contains(n);
                match &compiled {
                    Recompiled::Policy(cp) => build::policy_part(cp, &borrow),
                    Recompiled::Cluster(ccp) => build::cluster_part(ccp, &borrow),
                    Recompiled::Gone => build::Part::default(),
                }
            };
            for name in part.rs.sets.keys() {
                stale.remove(name);
            }
            match compiled {
                Recompiled::Policy(cp) => {
                    self.compiled.policies.insert(pkey.clone(), cp);
                }
                Recompiled::Cluster(ccp) => {
                    self.compiled.cluster_policies.insert(pkey.clone(), ccp);
                }
                Recompiled::Gone => {}
            }
            let old = self.policy_names.remove(pkey).unwrap_or_default();
            let new = tr.replace_part_borrowing(
                &mut self.compiled.ruleset,
                &old,
                part.rs,
                &part.borrowed,
                &mut self.holders,
            );
            if !new.is_empty() {
                self.policy_names.insert(pkey.clone(), new);
            }
        }
    }

    /// The sets only parts of `dirty` hold (nothing patched them since they were built).
    fn held_by_dirty_only(&self, dirty: &BTreeSet<String>) -> BTreeSet<String> {
        let mut held: BTreeMap<&str, usize> = BTreeMap::new();
        for names in dirty.iter().filter_map(|k| self.policy_names.get(k)) {
            for set in names.sets.iter() {
                *held.entry(set).or_default() += 1;
            }
        }
        held.into_iter()
            .filter(|(set, n)| self.holders.count(set) == *n)
            .map(|(set, _)| set.to_string())
            .collect()
    }

    /// Pending addresses and the local part, compared object by object; then the tier chains the
    /// groups need: a new one is built, one of a policy in `recompiled` is built again, one no group
    /// needs goes.
    fn rebuild_local(&mut self, tr: &mut ChangeLog, recompiled: &BTreeSet<String>) {
        // In the order of a full compile: resolve's warnings, then the build's.
        resolve::resolve_local(&self.state, &self.ix, &mut self.compiled);
        let build::LocalPart {
            rs: part,
            warnings,
            ties,
            tiers,
        } = build::local_part(&self.compiled);
        self.compiled.warnings.extend(warnings);
        self.compiled.priority_ties = ties;
        self.local_names = tr.replace_part(
            &mut self.compiled.ruleset,
            &self.local_names,
            part,
            &mut self.holders,
        );
        let gone: Vec<String> = self
            .tier_parts
            .keys()
            .filter(|n| !tiers.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some((_, names)) = self.tier_parts.remove(&name) {
                tr.replace_part(
                    &mut self.compiled.ruleset,
                    &names,
                    Ruleset::default(),
                    &mut self.holders,
                );
            }
        }
        for (name, t) in tiers {
            let fresh = self.tier_parts.get(&name).is_some_and(|(held, _)| {
                *held == t && !t.keys.iter().any(|k| recompiled.contains(k))
            });
            if fresh {
                continue;
            }
            let part = build::tier_part(&self.compiled, &name, &t);
            let old = self
                .tier_parts
                .remove(&name)
                .map(|(_, names)| names)
                .unwrap_or_default();
            let names = tr.replace_part(&mut self.compiled.ruleset, &old, part, &mut self.holders);
            self.tier_parts.insert(name, (t, names));
        }
    }
}

/// A moved pod's selection by one policy changed from `was` to `is` (`.0`, `.1`): its compiled
/// `selected` set (if compiled) follows, or the policy is compiled again when it starts selecting
/// its first local pod or stops selecting its last.
fn moved_selection(
    pkey: &str,
    pod: &str,
    (was, is): (bool, bool),
    selected: Option<&mut BTreeSet<String>>,
    dirty: &mut BTreeSet<String>,
) {
    if was == is {
        return;
    }
    match selected {
        Some(selected) => {
            if is {
                selected.insert(pod.to_string());
            } else {
                selected.remove(pod);
            }
            if selected.is_empty() {
                dirty.insert(pkey.to_string());
            }
        }
        None if is => {
            dirty.insert(pkey.to_string());
        }
        None => {}
    }
}

/// What a patch of a rule's peer set came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patched {
    Done,
    /// The set comes into being or goes: the policy's part must be compiled again.
    NeedsRecompile,
}

/// A policy compiled again: what it is now (nothing when it selects no local pod or is gone).
enum Recompiled {
    Policy(super::CompiledPolicy),
    Cluster(super::CompiledClusterPolicy),
    Gone,
}

/// The pods that moved and every address they held or hold: what [`Patch::rule`] patches.
struct Patch<'a> {
    moved: &'a [Moved],
    ips: &'a BTreeSet<IpAddr>,
}

impl Patch<'_> {
    /// How many pod peers of `spec` (a rule of a policy in namespace `own`) selected the moved
    /// pod `m` before, and select it now.
    fn selections_of(own: &str, spec: &Rule, m: &Moved) -> (usize, usize) {
        let count = |s: &Option<Subject>, ns| {
            s.as_ref()
                .map_or(0, |s| rule_selections(own, spec, &s.pod, ns))
        };
        (count(&m.old, &m.old_ns), count(&m.new, &m.new_ns))
    }

    /// `was`, the pods the pod peers of a refused policy's rules selected (summed over the
    /// peers), after the moves ([`Patch::rule`] keeps a compiled rule's count).
    fn selections(&self, own: &str, pol: &Policy, was: usize) -> usize {
        pol.all_rules().fold(was, |n, spec| {
            self.moved.iter().fold(n, |n, m| {
                let (before, now) = Self::selections_of(own, spec, m);
                (n + now).saturating_sub(before)
            })
        })
    }

    /// Patches one compiled rule (`cr`, of the spec `spec` of a policy in namespace `own`, which
    /// selects the local pods `selected`), and its count of selected pods
    /// ([`PeerSet::matched`]); returns whether its policy must be compiled again.
    #[allow(clippy::too_many_arguments)]
    fn rule(
        &self,
        at: &RulePatch,
        own: &str,
        spec: &Rule,
        selected: &BTreeSet<String>,
        cr: &mut CompiledRule,
        rs: &mut Ruleset,
        tr: &mut ChangeLog,
    ) -> bool {
        let mut whole = false;
        if cr.peers.uses_pods {
            for m in self.moved {
                let (was, is) = Self::selections_of(own, spec, m);
                cr.peers.matched = (cr.peers.matched + is).saturating_sub(was);
                // Written only when it changes: the set may be shared (copy on write).
                if is > 0 {
                    if !cr.peers.pods.contains(&m.key) {
                        Arc::make_mut(&mut cr.peers.pods).insert(m.key.clone());
                    }
                } else if was > 0 && cr.peers.pods.contains(&m.key) {
                    Arc::make_mut(&mut cr.peers.pods).remove(&m.key);
                }
            }
            for ip in self.ips {
                if at.peer_ip(cr, *ip, rs, tr) == Patched::NeedsRecompile {
                    whole = true;
                }
            }
        }
        if cr.ports.uses_named {
            for ip in self.ips {
                at.named_ip(spec, selected, cr, *ip, rs, tr);
            }
        }
        whole
    }
}

/// Where element patches of one compiled rule go: its policy and direction, read against the index.
struct RulePatch<'a> {
    ix: &'a PodIndex,
    pkey: &'a str,
    dir: Direction,
}

impl RulePatch<'_> {
    /// The rule's named-port set of `ip`'s family.
    fn named_set(&self, cr: &CompiledRule, ip: &IpAddr) -> String {
        cr.named_set(self.pkey, self.dir, Family::of(ip))
    }

    /// Whether `ip` belongs in a rule's peer addresses: some subject pod claiming it is a peer.
    /// A family's rules (and peer set) exist only while it has an address (`build`): the first
    /// address of a family, or the removal of its last, needs the policy recompiled instead of a
    /// patch. A rule that does not look its peers up has no peer set to patch.
    fn peer_ip(
        &self,
        cr: &mut CompiledRule,
        ip: IpAddr,
        rs: &mut Ruleset,
        tr: &mut ChangeLog,
    ) -> Patched {
        let want = self
            .ix
            .owners(&ip)
            .iter()
            .any(|k| cr.peers.pods.contains(k));
        if want == cr.peers.pod_ips.contains(&ip) {
            return Patched::Done;
        }
        let fam = Family::of(&ip);
        match cr.peers.pod_ips_of_family_upto_two(fam) {
            0 => return Patched::NeedsRecompile,
            1 if !want => return Patched::NeedsRecompile,
            _ => {}
        }
        let set = cr
            .looks_peers_up(self.dir)
            .then(|| names::peer_set(&cr.peers.pod_key, fam));
        if want {
            Arc::make_mut(&mut cr.peers.pod_ips).insert(ip);
            if let Some(set) = set {
                tr.insert_elem(rs, &set, Elem::Addr(ip));
            }
        } else {
            Arc::make_mut(&mut cr.peers.pod_ips).remove(&ip);
            if let Some(set) = set {
                tr.remove_elem(rs, &set, &Elem::Addr(ip));
            }
        }
        Patched::Done
    }

    /// The named-port entries of `ip` in one rule, as a full compile derives them: from the
    /// candidate pods claiming the address.
    fn named_ip(
        &self,
        spec: &Rule,
        selected: &BTreeSet<String>,
        cr: &mut CompiledRule,
        ip: IpAddr,
        rs: &mut Ruleset,
        tr: &mut ChangeLog,
    ) {
        let named = NamedPorts::of(spec);
        let scope = NamedPortScope {
            dir: self.dir,
            selected,
            peers: &cr.peers,
        };
        let mut want: BTreeSet<(IpAddr, Protocol, u16)> = BTreeSet::new();
        if scope.address(&ip) {
            for k in self.ix.owners(&ip).iter().filter(|k| scope.candidate(k)) {
                if let Some(s) = self.ix.subject(k) {
                    want.extend(named.entries(&s.pod, ip));
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
        let set = self.named_set(cr, &ip);
        // Written only when it changes (above): the entries may be shared (copy on write).
        let named = Arc::make_mut(&mut cr.ports.named);
        for t in have.difference(&want) {
            named.remove(t);
            tr.remove_elem(rs, &set, &Elem::AddrProtoPort(t.0, t.1, t.2));
        }
        for t in want.difference(&have) {
            named.insert(*t);
            tr.insert_elem(rs, &set, Elem::AddrProtoPort(t.0, t.1, t.2));
        }
    }
}

#[cfg(test)]
mod tests;
