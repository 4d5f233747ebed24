//! `diff(last, next)`: one nft transaction taking the kernel from `last` to `next`.
//!
//! Order inside the batch (every step only refers to what exists at that point):
//! 1. add new chains (empty), 2. add new sets and maps (empty), and new named counters,
//! 3. delete stale elements of kept sets (pending: `add` + `delete`, see below),
//! 4. flush kept chains whose rules changed or that name a set outgrowing the size the kernel
//!    holds it at (`DeclaredSizes`), then delete and add each such set again at its new size
//!    (`Set::size`: the kernel cannot resize one),
//! 5. add new elements (all of a re-added set's; maps may now `goto` new chains),
//! 6. add the rules of new and changed chains and of those flushed for a resized set,
//! 7. flush then delete stale chains, 8. delete stale sets and counters.
//!
//! Pending-set deletions are emitted as `add element` + `delete element`: the CNI plugin may
//! already have removed the element, and a bare delete of a missing element fails the batch.
//! A chain whose hook changed or a set whose type changed cannot be altered in place; our names
//! make that impossible, but should it happen the result is a full replace.

use crate::ruleset::names::is_pending_set;
use crate::ruleset::netlink::Transaction;
use crate::ruleset::render::{chain_obj, cmd, counter_obj, rule_obj, set_obj, set_ref, Command};
use crate::ruleset::{Batch, Chain, Ruleset, Set, Stmt};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) mod changelog;
mod declared;

pub use declared::DeclaredSizes;

/// The transaction that takes the kernel from `last` to `next`. Empty (`is_empty()`) when they
/// are equal. Each set is taken to be held at the size its elements in `last` give it.
pub fn diff(last: &Ruleset, next: &Ruleset) -> Batch {
    diff_holding(last, next, &mut DeclaredSizes::default())
}

/// [`diff`] when the kernel holds the sets `declared` names at the larger sizes it says (they
/// shrank since they were declared); `declared` becomes what the kernel holds after the batch.
pub fn diff_holding(last: &Ruleset, next: &Ruleset, declared: &mut DeclaredSizes) -> Batch {
    diff_parts(last, next, next, &BTreeMap::new(), declared)
}

/// Whether some chain or set of `next` redefines one of `last` in a way the kernel cannot change
/// in place (a base chain's hook, a set's type or flags): the one check, for `diff` and the
/// change log alike.
fn redefined(last: &Ruleset, next: &Ruleset) -> bool {
    let chain = next
        .chains
        .values()
        .any(|c| last.chains.get(&c.name).is_some_and(|l| l.base != c.base));
    let set = next.sets.values().any(|s| {
        last.sets.get(&s.name).is_some_and(|l| {
            l.key != s.key || l.interval != s.interval || l.verdict_map != s.verdict_map
        })
    });
    chain || set
}

/// `diff` of parts of two rulesets (the objects a change touched; every other object is equal
/// in both) inside `whole`, the complete next ruleset: a redefinition is answered with a full
/// replace of `whole`, not of the part. A set of the parts may be a shell holding only the
/// elements that changed: `shells` has how many elements each such set held in `last` (its
/// whole is in `whole`). `declared` is brought to the sizes the kernel holds sets at after it.
pub(crate) fn diff_parts(
    last: &Ruleset,
    next: &Ruleset,
    whole: &Ruleset,
    shells: &BTreeMap<String, usize>,
    declared: &mut DeclaredSizes,
) -> Batch {
    if redefined(last, next) {
        declared.clear();
        let mut b = whole.full_replace();
        b.netlink = whole.full_replace_netlink().ok();
        return b;
    }
    let mut cmds: Vec<Command> = Vec::new();
    // The same steps as nfnetlink messages (`Batch::netlink`), when each can be encoded.
    let mut nl = Transaction::new();
    // 1. new chains
    for c in next
        .chains
        .values()
        .filter(|c| !last.chains.contains_key(&c.name))
    {
        cmds.push(cmd("add", chain_obj(c, true)).into());
        nl.add_chain(c);
    }
    // 2. new sets
    for s in next
        .sets
        .values()
        .filter(|s| !last.sets.contains_key(&s.name))
    {
        cmds.push(cmd("add", set_obj(s, None)).into());
        nl.add_set(s);
    }
    for n in next.counters.difference(&last.counters) {
        cmds.push(cmd("add", counter_obj(n)).into());
        nl.add_counter(n);
    }
    // Kept sets whose elements outgrow the size the kernel holds them at (`Set::size` when it
    // was declared, `declared`): a set's size cannot change in place, so each is deleted and
    // added again with its new size, after every rule naming it is flushed (step 4) and before
    // any is written again (step 6). Only growth past the size does it: a smaller size would
    // fit as well, so a set that shrinks keeps its size, and `declared` remembers it.
    // Each with its whole next version (a part may hold a shell of it). After this batch the
    // kernel holds a new or recreated set at its elements' size, a kept one at the size it had;
    // each set's entry in `declared` is its own, so it is brought up to date as the set is passed.
    let mut resized: BTreeMap<&str, &Set> = BTreeMap::new();
    for s in next.sets.values() {
        let w = whole.sets.get(&s.name).unwrap_or(s);
        let held = last.sets.get(&s.name).map(|l| {
            let had = shells.get(&s.name).copied().unwrap_or(l.elements.len());
            declared.held(w, had)
        });
        let size = match held {
            Some(h) if w.size() > h => {
                resized.insert(s.name.as_str(), w);
                w.size()
            }
            Some(h) => h,
            None => w.size(),
        };
        declared.hold(w, size);
    }
    declared.forget(last.sets.keys().filter(|n| !whole.sets.contains_key(*n)));
    // 3. stale elements of kept sets. An interval set's ranges are written with end elements
    // that depend on their neighbours, so as messages it is flushed and written whole at step 5
    // (`refill`), as a full replace writes it; the JSON names the elements and nft works the
    // ends out.
    let mut refill = BTreeSet::new();
    for s in next.sets.values() {
        let Some(l) = last.sets.get(&s.name) else {
            continue;
        };
        if resized.contains_key(s.name.as_str()) {
            continue;
        }
        let gone: Vec<_> = l.elements.difference(&s.elements).collect();
        if gone.is_empty() {
            continue;
        }
        if is_pending_set(&s.name) {
            cmds.push(Command::elements(true, s, gone.iter().copied()));
            nl.add_elements(l, gone.iter().copied());
        }
        cmds.push(Command::elements(false, s, gone.iter().copied()));
        if s.interval {
            refill.insert(&s.name);
        } else {
            nl.delete_elements(l, gone.iter().copied());
        }
    }
    // 4. flush changed chains
    let changed: Vec<_> = next
        .chains
        .values()
        .filter(|c| last.chains.get(&c.name).is_some_and(|l| l.rules != c.rules))
        .collect();
    for c in &changed {
        cmds.push(cmd("flush", chain_obj(c, false)).into());
        nl.flush_chain(&c.name);
    }
    // The other chains the kernel holds that name a resized set: those of `last` (kept or
    // stale) and those no change touched (in `whole` only).
    let names_resized = |c: &Chain| {
        c.rules
            .iter()
            .flat_map(|r| &r.stmts)
            .filter_map(Stmt::set_name)
            .any(|n| resized.contains_key(n))
    };
    let rewritten: Vec<&Chain> = if resized.is_empty() {
        Vec::new()
    } else {
        whole
            .chains
            .values()
            .filter(|c| last.chains.contains_key(&c.name) || !next.chains.contains_key(&c.name))
            .chain(last.chains.values().filter(|c| {
                !next.chains.contains_key(&c.name) && !whole.chains.contains_key(&c.name)
            }))
            .filter(|c| names_resized(c) && !changed.iter().any(|x| x.name == c.name))
            .collect()
    };
    for c in &rewritten {
        cmds.push(cmd("flush", chain_obj(c, false)).into());
        nl.flush_chain(&c.name);
    }
    // The resized sets, now that no rule names them.
    for s in resized.values() {
        cmds.push(cmd("delete", set_ref(s)).into());
        nl.delete_set(&s.name);
        cmds.push(cmd("add", set_obj(s, None)).into());
        nl.add_set(s);
    }
    // 5. new elements
    for s in next.sets.values() {
        let new: Vec<_> = match (resized.get(s.name.as_str()), last.sets.get(&s.name)) {
            (Some(w), _) => w.elements.iter().collect(),
            (None, Some(l)) => s.elements.difference(&l.elements).collect(),
            (None, None) => s.elements.iter().collect(),
        };
        if !new.is_empty() {
            cmds.push(Command::elements(true, s, new.iter().copied()));
        }
        if !s.interval {
            if !new.is_empty() {
                nl.add_elements(s, new);
            }
        } else if !new.is_empty() || refill.contains(&s.name) {
            match whole.sets.get(&s.name) {
                Some(w) => nl.refill_set(w, last.sets.contains_key(&s.name)),
                None => nl.refill_set(s, last.sets.contains_key(&s.name)),
            }
        }
    }
    // 6. rules of new and changed chains, and of the kept ones that name a resized set (in name
    // order, whichever part holds them, so a diff of parts equals the diff of the wholes)
    let mut fill: BTreeMap<&str, &Chain> = next
        .chains
        .values()
        .filter(|c| match last.chains.get(&c.name) {
            None => true,
            Some(l) => l.rules != c.rules,
        })
        .map(|c| (c.name.as_str(), c))
        .collect();
    // A stale one is not written again (it is deleted at step 7).
    for w in rewritten.iter().filter_map(|c| whole.chains.get(&c.name)) {
        fill.insert(&w.name, w);
    }
    for c in fill.values() {
        for r in &c.rules {
            cmds.push(cmd("add", rule_obj(&c.name, r)).into());
            nl.add_rule(&c.name, r);
        }
    }
    // 7. stale chains: flush all first (they may jump to each other), then delete.
    let stale: Vec<_> = last
        .chains
        .values()
        .filter(|c| !next.chains.contains_key(&c.name))
        .collect();
    for c in &stale {
        if !c.rules.is_empty() && !rewritten.iter().any(|x| x.name == c.name) {
            cmds.push(cmd("flush", chain_obj(c, false)).into());
            nl.flush_chain(&c.name);
        }
    }
    for c in &stale {
        cmds.push(cmd("delete", chain_obj(c, false)).into());
        nl.delete_chain(&c.name);
    }
    // 8. stale sets
    for s in last
        .sets
        .values()
        .filter(|s| !next.sets.contains_key(&s.name))
    {
        cmds.push(cmd("delete", set_ref(s)).into());
        nl.delete_set(&s.name);
    }
    for n in last.counters.difference(&next.counters) {
        cmds.push(cmd("delete", counter_obj(n)).into());
        nl.delete_counter(n);
    }
    let mut b = Batch::from_commands(cmds);
    b.netlink = nl.finish().ok().flatten();
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::kernel_sim::KernelTable;
    use crate::model::{Change, ClusterState};
    use crate::ruleset::names::PENDING_SET_V4;
    use crate::ruleset::{Elem, Set};
    use crate::synth::{self, Rng, SynthConfig};
    use serde_json::Value;

    fn kernel_after_full(rs: &Ruleset) -> KernelTable {
        let mut k = KernelTable::default();
        k.apply(&rs.full_replace().json()).unwrap();
        k
    }

    fn verbs_and_kinds(b: &Batch) -> Vec<(String, String)> {
        b.json()["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let (v, o) = c.as_object().unwrap().iter().next().unwrap();
                (
                    v.clone(),
                    o.as_object().unwrap().keys().next().unwrap().clone(),
                )
            })
            .collect()
    }

    #[test]
    fn diff_of_equal_rulesets_is_empty() {
        let st = synth::cluster(&SynthConfig::small(1));
        let rs = compile(&st, "n0").ruleset;
        let b = diff(&rs, &rs);
        assert!(b.is_empty());
        assert_eq!(b.commands(), 0);
    }

    #[test]
    fn pending_deletions_are_add_then_delete_so_they_never_fail() {
        let mut last = Ruleset::default();
        let pending = |ips: &[&str]| Set {
            name: PENDING_SET_V4.into(),
            key: crate::ruleset::SetKey::Ipv4,
            interval: false,
            verdict_map: false,
            comment: String::new(),
            elements: ips.iter().map(|s| Elem::Addr(s.parse().unwrap())).collect(),
        };
        last.add_set(pending(&["10.0.0.1", "10.0.0.2"]));
        let mut next = Ruleset::default();
        next.add_set(pending(&["10.0.0.2"]));
        let b = diff(&last, &next);
        assert_eq!(
            verbs_and_kinds(&b),
            vec![
                ("add".into(), "element".into()),
                ("delete".into(), "element".into())
            ]
        );
        // The plugin already removed the element: the batch still applies.
        let mut k = KernelTable::default();
        let mut already = last.clone();
        already
            .sets
            .get_mut(PENDING_SET_V4)
            .unwrap()
            .elements
            .remove(&Elem::Addr("10.0.0.1".parse().unwrap()));
        k.apply(&already.full_replace().json()).unwrap();
        k.apply(&b.json()).unwrap();
        assert_eq!(k, kernel_after_full(&next));
    }

    #[test]
    fn peer_pod_churn_changes_only_elements() {
        let cfg = SynthConfig::small(7);
        let mut st = synth::cluster(&cfg);
        let before = compile(&st, "n0").ruleset;
        // A new pod on another node: only peer/named set elements may change.
        let mut rng = Rng::new(99);
        let mut p = synth::make_pod(&cfg, &mut rng, 500);
        p.node_name = Some("n2".into());
        st.apply(Change::UpsertPod(p.into()));
        let after = compile(&st, "n0").ruleset;
        let b = diff(&before, &after);
        for (verb, kind) in verbs_and_kinds(&b) {
            assert_eq!(kind, "element", "{verb} {kind}");
        }
    }

    /// Seeded random change sequences: applying each diff in turn gives the same kernel table as
    /// a full replace of the final ruleset, and every intermediate batch is valid (the kernel
    /// model refuses a set filled past the size it was added with, so a set held larger than
    /// its elements give it is never counted on beyond what the kernel holds).
    #[test]
    fn diff_sequences_equal_full_replace_on_the_kernel_model() {
        let (mut steps, mut nonempty, mut chain_changes, mut resized) = (0, 0, 0, 0);
        let mut held_larger = 0;
        for seed in 0..40u64 {
            let cfg = SynthConfig::small(seed);
            let mut st: ClusterState = synth::cluster(&cfg);
            let mut rng = Rng::new(seed * 7919 + 1);
            let mut last = compile(&st, "n0").ruleset;
            let mut kernel = kernel_after_full(&last);
            let mut declared = DeclaredSizes::default();
            for step in 0..40 {
                for j in 0..=rng.below(3) {
                    let ch = synth::random_change(&cfg, &st, &mut rng, step * 8 + j);
                    st.apply(ch);
                }
                let next = compile(&st, "n0").ruleset;
                let b = diff_holding(&last, &next, &mut declared);
                kernel
                    .apply(&b.json())
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                steps += 1;
                nonempty += usize::from(!b.is_empty());
                chain_changes += usize::from(verbs_and_kinds(&b).iter().any(|(_, k)| k == "chain"));
                // A set outgrowing its size is deleted and added again in the same batch.
                resized += b.recreated_sets().len();
                held_larger += declared.names().len();
                assert_eq!(kernel, kernel_after_full(&next), "seed {seed} step {step}");
                let round: Value = serde_json::from_str(&b.to_json_string()).unwrap();
                assert_eq!(round, b.json());
                last = next;
            }
        }
        // The sequences must exercise the diff, or this test proves nothing.
        assert!(
            nonempty * 2 > steps,
            "{nonempty} of {steps} batches changed something"
        );
        assert!(
            chain_changes * 10 > steps,
            "{chain_changes} of {steps} batches changed chains"
        );
        assert!(resized >= 10, "{resized} sets outgrew their size");
        assert!(
            held_larger >= 10,
            "{held_larger}: sets were never held larger than their elements"
        );
    }
}

#[cfg(test)]
mod redefinition_tests {
    use super::*;
    use crate::compile::compile;
    use crate::ruleset::names::{CHAIN_POSTROUTING, MAP_INGRESS_V4};
    use crate::synth::{self, SynthConfig};

    #[test]
    fn a_chain_or_set_that_cannot_change_in_place_gives_a_full_replace() {
        let st = synth::cluster(&SynthConfig::small(2));
        let last = compile(&st, "n0").ruleset;
        let mut next = last.clone();
        if let Some(b) = next
            .chains
            .get_mut(CHAIN_POSTROUTING)
            .and_then(|c| c.base.as_mut())
        {
            b.priority += 1;
        }
        assert_eq!(diff(&last, &next).json(), next.full_replace().json());
        let mut next = last.clone();
        if let Some(s) = next.sets.get_mut(MAP_INGRESS_V4) {
            s.interval = true;
        }
        assert_eq!(diff(&last, &next).json(), next.full_replace().json());
    }
}
