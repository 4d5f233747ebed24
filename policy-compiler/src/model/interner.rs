//! One copy of equal values that many pods hold (a label set, a namespace, a node name):
//! [`Interner::share`] hands back the copy it holds of an equal value. Values no one else holds any
//! more are forgotten once the table has doubled since the last sweep, so it stays within twice
//! the values in use.

use std::collections::HashSet;
use std::hash::Hash;

/// A value an [`Interner`] can share: cloning it shares one allocation, whose other holders it
/// can tell.
pub(crate) trait Shareable: Eq + Hash + Clone {
    /// Whether anyone besides the interner holds this copy.
    fn held_elsewhere(&self) -> bool;
    /// Whether the value is worth holding at all (an empty label set allocates nothing).
    fn worth_sharing(&self) -> bool {
        true
    }
}

/// Sweeps never run below this many values.
pub(crate) const SWEEP_FLOOR: usize = 1024;

#[derive(Debug)]
pub(crate) struct Interner<T> {
    held: HashSet<T>,
    /// Values held after the last sweep.
    kept: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            held: HashSet::new(),
            kept: 0,
        }
    }
}

impl<T: Shareable> Interner<T> {
    /// `value`, or the equal copy held already.
    pub fn share(&mut self, value: T) -> T {
        if !value.worth_sharing() {
            return value;
        }
        if let Some(held) = self.held.get(&value) {
            return held.clone();
        }
        if self.held.len() >= 2 * self.kept.max(SWEEP_FLOOR) {
            self.sweep();
        }
        self.held.insert(value.clone());
        value
    }

    /// Distinct values held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether an equal value is held.
    #[cfg(test)]
    pub fn holds(&self, value: &T) -> bool {
        self.held.contains(value)
    }

    /// Forgets the values only this table holds.
    pub fn sweep(&mut self) {
        self.held.retain(Shareable::held_elsewhere);
        self.kept = self.held.len();
    }
}
