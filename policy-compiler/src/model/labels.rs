//! [`Labels`]: a small sorted map of label keys to values, and [`LabelSets`], which shares equal
//! ones (an `Interner`).
//!
//! Why not `BTreeMap<String, String>`: a B-tree allocates a whole node (eleven keys and eleven values,
//! 544 bytes) even for one label, and every pod and namespace carries a label map. At 10k pods that was
//! 5.4 MB of the agent's ~35 MB live heap. A sorted slice of the few pairs a pod has, with boxed
//! strings (no spare capacity, two words each), is 32 bytes a pair. Lookups are a binary search over
//! a handful of entries.
//!
//! The slice is shared (`Arc`): the pods of one ReplicaSet carry the same labels, and a source that
//! passes each new pod through `PodSharing` (its label sets an `Interner`) keeps one copy per
//! distinct set. At 100k
//! pods the labels were 14 MB, one copy per pod. Changing a label copies the slice (rare: labels
//! change by whole objects).

use super::interner::{Interner, Shareable};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

type Pairs = [(Box<str>, Box<str>)];

/// Label keys to values, sorted by key, each key once. Cloning shares the pairs.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Option<Arc<Pairs>>);

impl Labels {
    /// No labels.
    pub const fn new() -> Self {
        Self(None)
    }

    fn from_sorted(pairs: Vec<(Box<str>, Box<str>)>) -> Self {
        Self((!pairs.is_empty()).then(|| Arc::from(pairs)))
    }

    fn pairs(&self) -> &Pairs {
        self.0.as_deref().unwrap_or(&[])
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.find(key).ok().map(|i| &*self.pairs()[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        let mut pairs = self.pairs().to_vec();
        let old = match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut pairs[i].1, value.into_boxed_str()).into_string()),
            Err(i) => {
                pairs.insert(i, (key.into_boxed_str(), value.into_boxed_str()));
                None
            }
        };
        *self = Self::from_sorted(pairs);
        old
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.find(key).ok()?;
        let mut pairs = self.pairs().to_vec();
        let (_, value) = pairs.remove(i);
        *self = Self::from_sorted(pairs);
        Some(value.into_string())
    }

    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// Pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.pairs().iter().map(|(k, _)| &**k)
    }

    /// Which set of pairs this is: the same number for label sets that share their pairs (as
    /// [`LabelSets`] makes them), 0 for no labels. Equal sets that do not share have different
    /// numbers. Valid while the pairs live (a memo within one pass over the pods).
    pub(crate) fn identity(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |a| Arc::as_ptr(a).cast::<u8>() as usize)
    }

    /// Whether both hold the very same pairs (one set shared, as `LabelSets` makes it),
    /// not merely equal ones.
    pub fn is_shared_with(&self, other: &Labels) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.pairs().binary_search_by(|(k, _)| (**k).cmp(key))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Later pairs win over earlier ones with the same key, as with a map.
impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut pairs: Vec<(String, String)> = iter.into_iter().collect();
        // Stable: among equal keys the input order stays, and the last one is kept below.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.last_mut() {
                Some(last) if *last.0 == *k => last.1 = v.into_boxed_str(),
                _ => out.push((k.into_boxed_str(), v.into_boxed_str())),
            }
        }
        Self::from_sorted(out)
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted with unique keys.
        Self::from_sorted(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl Extend<(String, String)> for Labels {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Box<str>, Box<str>)>,
        fn(&'a (Box<str>, Box<str>)) -> (&'a str, &'a str),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

/// Equal label sets, shared: the pods of one ReplicaSet (same labels, pod-template-hash included)
/// hold one copy (see `super::interner`).
pub(crate) type LabelSets = Interner<Labels>;

impl Shareable for Labels {
    fn held_elsewhere(&self) -> bool {
        self.0.as_ref().is_some_and(|a| Arc::strong_count(a) > 1)
    }
    fn worth_sharing(&self) -> bool {
        !self.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_behave_as_a_map_sorted_by_key_with_the_last_value_winning() {
        let mut x = l(&[("b", "1"), ("a", "2"), ("b", "3")]);
        assert_eq!(x.len(), 2);
        assert_eq!(x.get("b"), Some("3"));
        assert_eq!(x.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(x.insert("a".into(), "4".into()).as_deref(), Some("2"));
        assert_eq!(x.insert("c".into(), "5".into()), None);
        assert!(x.contains_key("c") && !x.contains_key("d"));
        assert_eq!(x.remove("a").as_deref(), Some("4"));
        assert_eq!(x.get("a"), None);
        assert_eq!(x, l(&[("c", "5"), ("b", "3")]));
        let map: BTreeMap<String, String> =
            [("z".into(), "1".into()), ("y".into(), "2".into())].into();
        assert_eq!(Labels::from(map), l(&[("y", "2"), ("z", "1")]));
        assert_eq!(format!("{:?}", l(&[("k", "v")])), r#"{"k": "v"}"#);
        assert_eq!(
            x.clone().into_iter().collect::<Vec<_>>(),
            [("b".to_string(), "3".to_string()), ("c".into(), "5".into())]
        );
        assert_eq!(l(&[]), Labels::new());
        assert_eq!(l(&[("a", "1")]).remove_all_for_test(), Labels::new());
    }

    impl Labels {
        fn remove_all_for_test(mut self) -> Self {
            let keys: Vec<String> = self.keys().map(str::to_owned).collect();
            for k in keys {
                self.remove(&k);
            }
            self
        }
    }

    #[test]
    fn changing_a_shared_set_leaves_its_other_holders_alone() {
        let a = l(&[("app", "web")]);
        let mut b = a.clone();
        b.insert("tier".into(), "front".into());
        assert_eq!(a, l(&[("app", "web")]));
        assert_eq!(b, l(&[("app", "web"), ("tier", "front")]));
    }

    #[test]
    fn equal_sets_are_shared_and_sets_no_one_holds_are_swept() {
        let mut sets = LabelSets::default();
        let a = sets.share(l(&[("app", "web")]));
        let b = sets.share(l(&[("app", "web")]));
        let (Some(pa), Some(pb)) = (&a.0, &b.0) else {
            panic!("non-empty sets are held")
        };
        assert!(Arc::ptr_eq(pa, pb), "the second is the first");
        assert_eq!(sets.share(Labels::new()), Labels::new());
        assert_eq!(sets.len(), 1, "an empty set is not held");
        drop(sets.share(l(&[("app", "db")])));
        assert_eq!(sets.len(), 2);
        sets.sweep();
        assert_eq!(sets.len(), 1, "app=db was held by the table alone");
        drop((a, b));
        sets.sweep();
        assert_eq!(sets.len(), 0);
    }

    #[test]
    fn the_table_stays_within_twice_the_sets_in_use() {
        let mut sets = LabelSets::default();
        for i in 0..10 * crate::model::interner::SWEEP_FLOOR {
            drop(sets.share(l(&[("pod", &i.to_string())])));
        }
        assert!(
            sets.len() <= 2 * crate::model::interner::SWEEP_FLOOR,
            "{}",
            sets.len()
        );
    }
}
