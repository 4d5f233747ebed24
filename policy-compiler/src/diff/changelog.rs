//! The change log of a ruleset patched in place: what the incremental compiler changed since the
//! last batch (old versions of replaced chains and sets, net element changes of patched sets).
//! [`ChangeLog::batch`] runs `diff` on exactly those objects, which equals `diff` of the whole
//! rulesets since every other object is unchanged.

use super::{diff_parts, DeclaredSizes};
use crate::ruleset::{Batch, Chain, Elem, Ruleset, Set};
use std::collections::{BTreeMap, BTreeSet};

/// Net element changes of one set patched in place since the last batch.
#[derive(Debug, Default)]
struct ElemDelta {
    removed: BTreeSet<Elem>,
    added: BTreeSet<Elem>,
}

/// Names of the chains and sets of one part of a ruleset (the local part, or one policy's).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PartNames {
    pub chains: Names,
    pub sets: Names,
    pub counters: Names,
}

impl PartNames {
    pub fn of(rs: &Ruleset) -> Self {
        Self::of_borrowing(rs, &BTreeSet::new())
    }
    /// The names of a part that also holds the sets `borrowed`, which it does not carry.
    pub fn of_borrowing(rs: &Ruleset, borrowed: &BTreeSet<String>) -> Self {
        let sets = if borrowed.is_empty() {
            Names::of(rs.sets.keys())
        } else {
            let mut all: Vec<&String> = rs.sets.keys().chain(borrowed).collect();
            all.sort_unstable();
            all.dedup();
            Names::of(all.into_iter())
        };
        Self {
            chains: Names::of(rs.chains.keys()),
            sets,
            counters: Names::of(rs.counters.iter()),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.counters.is_empty()
    }
}

/// Sorted distinct names in one allocation. A part has a few names of each kind, and a
/// `BTreeSet<String>` of even one name is a 280-byte node: at 100k pods (~5k policy parts,
/// three sets each) that was ~4 MB of the agent's memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Names(Box<[Box<str>]>);

impl Names {
    /// From names in ascending order, each once (a `BTreeMap`'s keys or a `BTreeSet`).
    fn of<'a>(sorted: impl Iterator<Item = &'a String>) -> Self {
        let names: Box<[Box<str>]> = sorted.map(|n| n.as_str().into()).collect();
        debug_assert!(names.windows(2).all(|w| w[0] < w[1]));
        Names(names)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.0.binary_search_by(|n| (**n).cmp(name)).is_ok()
    }
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|n| &**n)
    }
    /// The names in either, ascending, each once.
    pub fn union<'a>(&'a self, other: &'a Names) -> Vec<&'a str> {
        let mut out: Vec<&str> = self.iter().chain(other.iter()).collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// How many parts of a ruleset hold each set (most sets: one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SetHolders(BTreeMap<String, usize>);

impl SetHolders {
    /// Counts the sets of `parts`.
    pub fn of<'a>(parts: impl IntoIterator<Item = &'a PartNames>) -> Self {
        let mut h = SetHolders::default();
        for p in parts {
            for s in p.sets.iter() {
                h.hold(s);
            }
        }
        h
    }
    pub fn hold(&mut self, set: &str) {
        *self.0.entry(set.to_string()).or_default() += 1;
    }
    /// How many parts hold `set`.
    pub fn count(&self, set: &str) -> usize {
        self.0.get(set).copied().unwrap_or(0)
    }
    /// One holder lets `set` go; true when it was the last.
    pub fn release(&mut self, set: &str) -> bool {
        match self.0.get_mut(set) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.0.remove(set);
                true
            }
        }
    }
}

/// Records what changes in a ruleset; every change to it goes through these methods.
#[derive(Debug, Default)]
pub(crate) struct ChangeLog {
    /// The version of each replaced chain at the last batch (`None`: it did not exist).
    old_chains: BTreeMap<String, Option<Chain>>,
    /// The same for sets replaced whole.
    old_sets: BTreeMap<String, Option<Set>>,
    /// Sets patched element by element (and not replaced whole).
    elems: BTreeMap<String, ElemDelta>,
    /// Named counters added or removed: whether each existed at the last batch.
    old_counters: BTreeMap<String, bool>,
}

impl ChangeLog {
    /// Puts a chain (`None`: removes it).
    pub fn put_chain(&mut self, rs: &mut Ruleset, name: &str, new: Option<Chain>) {
        if rs.chains.get(name) == new.as_ref() {
            return;
        }
        if !self.old_chains.contains_key(name) {
            self.old_chains
                .insert(name.to_string(), rs.chains.get(name).cloned());
        }
        match new {
            Some(c) => rs.add_chain(c),
            None => {
                rs.chains.remove(name);
            }
        }
    }

    /// Puts a set whole (`None`: removes it).
    pub fn put_set(&mut self, rs: &mut Ruleset, name: &str, new: Option<Set>) {
        if rs.sets.get(name) == new.as_ref() {
            return;
        }
        if !self.old_sets.contains_key(name) {
            let mut old = rs.sets.get(name).cloned();
            if let (Some(o), Some(d)) = (old.as_mut(), self.elems.remove(name)) {
                for e in &d.added {
                    o.elements.remove(e);
                }
                o.elements.extend(d.removed);
            }
            self.old_sets.insert(name.to_string(), old);
        }
        match new {
            Some(s) => rs.add_set(s),
            None => {
                rs.sets.remove(name);
            }
        }
    }

    /// Puts a named counter (`false`: removes it).
    pub fn put_counter(&mut self, rs: &mut Ruleset, name: &str, present: bool) {
        if rs.counters.contains(name) == present {
            return;
        }
        self.old_counters
            .entry(name.to_string())
            .or_insert(!present);
        if present {
            rs.counters.insert(name.to_string());
        } else {
            rs.counters.remove(name);
        }
    }

    /// Replaces one part of the ruleset (named `old` so far) by `part`; returns its new names.
    /// A set several parts hold (a shared port or peer set, named by what decides its content and
    /// so equal in each)
    /// goes only when its last holder lets it go: `holders` counts the parts holding each set.
    pub fn replace_part(
        &mut self,
        rs: &mut Ruleset,
        old: &PartNames,
        part: Ruleset,
        holders: &mut SetHolders,
    ) -> PartNames {
        self.replace_part_borrowing(rs, old, part, &BTreeSet::new(), holders)
    }

    /// The same for a part that also holds the sets `borrowed` without carrying them: sets named
    /// by their content that `rs` holds up to date (`compile::build::SetSink`), kept as they are.
    pub fn replace_part_borrowing(
        &mut self,
        rs: &mut Ruleset,
        old: &PartNames,
        part: Ruleset,
        borrowed: &BTreeSet<String>,
        holders: &mut SetHolders,
    ) -> PartNames {
        let new = PartNames::of_borrowing(&part, borrowed);
        let Ruleset {
            mut chains,
            mut sets,
            counters,
        } = part;
        for name in old.chains.union(&new.chains) {
            self.put_chain(rs, name, chains.remove(name));
        }
        for name in old.sets.union(&new.sets) {
            match (old.sets.contains(name), new.sets.contains(name)) {
                (true, false) => {
                    if holders.release(name) {
                        self.put_set(rs, name, None);
                    }
                }
                (false, true) => {
                    holders.hold(name);
                    if !borrowed.contains(name) {
                        self.put_set(rs, name, sets.remove(name));
                    }
                }
                _ if borrowed.contains(name) => {}
                _ => self.put_set(rs, name, sets.remove(name)),
            }
        }
        for name in old.counters.union(&new.counters) {
            self.put_counter(rs, name, counters.contains(name));
        }
        new
    }

    pub fn insert_elem(&mut self, rs: &mut Ruleset, set: &str, e: Elem) {
        let Some(s) = rs.sets.get_mut(set) else {
            return;
        };
        if !s.elements.insert(e.clone()) || self.old_sets.contains_key(set) {
            return;
        }
        let d = self.elems.entry(set.to_string()).or_default();
        if !d.removed.remove(&e) {
            d.added.insert(e);
        }
    }

    pub fn remove_elem(&mut self, rs: &mut Ruleset, set: &str, e: &Elem) {
        let Some(s) = rs.sets.get_mut(set) else {
            return;
        };
        if !s.elements.remove(e) || self.old_sets.contains_key(set) {
            return;
        }
        let d = self.elems.entry(set.to_string()).or_default();
        if !d.added.remove(e) {
            d.removed.insert(e.clone());
        }
    }

    /// Takes an element as committed already (someone else put it into the kernel): into the
    /// set as of the last batch, which is the current one unless it was replaced since.
    pub fn note_committed_elem(&mut self, rs: &mut Ruleset, set: &str, e: Elem) {
        let committed = match self.old_sets.get_mut(set) {
            Some(old) => old.as_mut(),
            None => rs.sets.get_mut(set),
        };
        if let Some(s) = committed {
            s.elements.insert(e);
        }
    }

    /// The batch from the ruleset at the last batch to `rs`, the kernel holding sets at the
    /// sizes `declared` says (which becomes what it holds after the batch).
    pub fn batch(self, rs: &Ruleset, declared: &mut DeclaredSizes) -> Batch {
        let mut last = Ruleset::default();
        let mut next = Ruleset::default();
        for (name, old) in self.old_chains {
            if let Some(c) = old {
                last.add_chain(c);
            }
            if let Some(c) = rs.chains.get(&name) {
                next.add_chain(c.clone());
            }
        }
        for (name, old) in self.old_sets {
            if let Some(s) = old {
                last.add_set(s);
            }
            if let Some(s) = rs.sets.get(&name) {
                next.add_set(s.clone());
            }
        }
        for (name, existed) in self.old_counters {
            if existed {
                last.add_counter(name.clone());
            }
            if rs.counters.contains(&name) {
                next.add_counter(name);
            }
        }
        let mut shells = BTreeMap::new();
        for (name, d) in self.elems {
            if d.removed.is_empty() && d.added.is_empty() {
                continue;
            }
            let Some(s) = rs.sets.get(&name) else {
                continue;
            };
            // What it held at the last batch: the elements since added were not in it, the ones
            // since removed were.
            let had = (s.elements.len() + d.removed.len()).saturating_sub(d.added.len());
            shells.insert(name.clone(), had);
            let shell = |elements| Set {
                name: s.name.clone(),
                key: s.key,
                interval: s.interval,
                verdict_map: s.verdict_map,
                comment: s.comment.clone(),
                elements,
            };
            last.add_set(shell(d.removed));
            next.add_set(shell(d.added));
        }
        diff_parts(&last, &next, rs, &shells, declared)
    }
}
