//! `diff(last, next)`: one nft transaction taking the kernel from `last` to `next`.
//!
//! Order inside the batch (every step only refers to what exists at that point):
//! 1. add new chains (empty), 2. add new sets and maps (empty),
//! 3. delete stale elements of kept sets (pending: `add` + `delete`, see below),
//! 4. flush kept chains whose rules changed, 5. add new elements (maps may now `goto` new chains),
//! 6. add the rules of new and changed chains, 7. flush then delete stale chains,
//! 8. delete stale sets.
//!
//! Pending-set deletions are emitted as `add element` + `delete element`: the CNI plugin may
//! already have removed the element, and a bare delete of a missing element fails the batch.
//! A chain whose hook changed or a set whose type changed cannot be altered in place; our names
//! make that impossible, but should it happen the result is a full replace.

use crate::ruleset::names::{PENDING_SET_V4, PENDING_SET_V6};
use crate::ruleset::render::{chain_obj, cmd, element_obj, rule_obj, set_obj, set_ref};
use crate::ruleset::{Batch, Ruleset};

/// The transaction that takes the kernel from `last` to `next`. Empty (`is_empty()`) when they
/// are equal.
pub fn diff(last: &Ruleset, next: &Ruleset) -> Batch {
    // Definitions that cannot change in place: fall back to a full replace.
    let chain_redefined = next
        .chains
        .values()
        .any(|c| last.chains.get(&c.name).is_some_and(|l| l.base != c.base));
    let set_redefined = next.sets.values().any(|s| {
        last.sets.get(&s.name).is_some_and(|l| {
            l.key != s.key || l.interval != s.interval || l.verdict_map != s.verdict_map
        })
    });
    if chain_redefined || set_redefined {
        return next.full_replace();
    }
    let mut cmds = Vec::new();
    // 1. new chains
    for c in next
        .chains
        .values()
        .filter(|c| !last.chains.contains_key(&c.name))
    {
        cmds.push(cmd("add", chain_obj(c, true)));
    }
    // 2. new sets
    for s in next
        .sets
        .values()
        .filter(|s| !last.sets.contains_key(&s.name))
    {
        cmds.push(cmd("add", set_obj(s, None)));
    }
    // 3. stale elements of kept sets
    for s in next.sets.values() {
        let Some(l) = last.sets.get(&s.name) else {
            continue;
        };
        let gone: Vec<_> = l.elements.difference(&s.elements).collect();
        if gone.is_empty() {
            continue;
        }
        if s.name == PENDING_SET_V4 || s.name == PENDING_SET_V6 {
            cmds.push(cmd("add", element_obj(s, gone.iter().copied(), false)));
        }
        cmds.push(cmd("delete", element_obj(s, gone.iter().copied(), true)));
    }
    // 4. flush changed chains
    let changed: Vec<_> = next
        .chains
        .values()
        .filter(|c| last.chains.get(&c.name).is_some_and(|l| l.rules != c.rules))
        .collect();
    for c in &changed {
        cmds.push(cmd("flush", chain_obj(c, false)));
    }
    // 5. new elements
    for s in next.sets.values() {
        let new: Vec<_> = match last.sets.get(&s.name) {
            Some(l) => s.elements.difference(&l.elements).collect(),
            None => s.elements.iter().collect(),
        };
        if !new.is_empty() {
            cmds.push(cmd("add", element_obj(s, new, false)));
        }
    }
    // 6. rules of new and changed chains
    for c in next.chains.values() {
        let refill = match last.chains.get(&c.name) {
            None => true,
            Some(l) => l.rules != c.rules,
        };
        if refill {
            for r in &c.rules {
                cmds.push(cmd("add", rule_obj(&c.name, r)));
            }
        }
    }
    // 7. stale chains: flush all first (they may jump to each other), then delete.
    let stale: Vec<_> = last
        .chains
        .values()
        .filter(|c| !next.chains.contains_key(&c.name))
        .collect();
    for c in &stale {
        if !c.rules.is_empty() {
            cmds.push(cmd("flush", chain_obj(c, false)));
        }
    }
    for c in &stale {
        cmds.push(cmd("delete", chain_obj(c, false)));
    }
    // 8. stale sets
    for s in last
        .sets
        .values()
        .filter(|s| !next.sets.contains_key(&s.name))
    {
        cmds.push(cmd("delete", set_ref(s)));
    }
    Batch::from_commands(cmds)
}
