//! The sizes the kernel holds our sets at, where they exceed what a set's elements give it.
//!
//! A hash set is declared with [`Set::size`] of the elements it is created with, and the kernel
//! keeps that size while the set shrinks (it cannot be changed in place). `diff` recreates a set
//! whose elements outgrow the size the kernel holds it at; inferring that size from the elements
//! the set had at the last batch undercounts a set that shrank since it was declared, so one whose
//! count moves back and forth across a size boundary was recreated, with every rule naming it, at
//! each crossing upward (a few ms for a peer set of ~30k addresses at 100k pods).

use crate::ruleset::Set;
use std::collections::{BTreeMap, BTreeSet};

/// The sets the kernel holds at a larger size than the elements they had at the last batch give
/// them (they shrank since they were declared): name → the size they were declared with. Any
/// other set is held at [`Set::size_holding`] of those elements.
///
/// What it says is never more than the kernel holds: a set recreated or new in a batch is
/// declared at its elements' size (no entry), a full replace declares every set anew
/// ([`DeclaredSizes::clear`]), and a set written by a repair may have been re-added at its
/// elements' size ([`DeclaredSizes::forget`]). Were it more, a batch would fill a set past its
/// size (ENFILE) and the agent would fall back to a full replace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredSizes(BTreeMap<String, u32>);

impl DeclaredSizes {
    /// The size the kernel holds `set` at, which held `had` elements at the last batch (`None`
    /// for a set declared without one: interval and pending sets).
    pub fn held(&self, set: &Set, had: usize) -> Option<u32> {
        let by_elements = set.size_holding(had);
        match self.0.get(&set.name) {
            Some(&declared) => by_elements.max(Some(declared)),
            None => by_elements,
        }
    }

    /// After a batch: the kernel holds `set` (its whole next version) at `size`.
    pub(crate) fn hold(&mut self, set: &Set, size: Option<u32>) {
        match size {
            Some(s) if Some(s) > set.size() => {
                self.0.insert(set.name.clone(), s);
            }
            _ => {
                self.0.remove(&set.name);
            }
        }
    }

    /// The sets a batch deleted, or a repair may have added again at their elements' size.
    pub fn forget<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        for n in names {
            self.0.remove(n);
        }
    }

    /// After a full replace, which declares every set at its elements' size.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The names of the sets held larger than their elements give them.
    pub fn names(&self) -> BTreeSet<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
