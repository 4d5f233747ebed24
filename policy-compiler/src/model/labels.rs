//! [`Labels`]: a small sorted map of label keys to values.
//!
//! Why not `BTreeMap<String, String>`: a B-tree allocates a whole node (eleven keys and eleven values,
//! 544 bytes) even for one label, and every pod and namespace carries a label map. At 10k pods that was
//! 5.4 MB of the agent's ~35 MB live heap. A sorted vector of the few pairs a pod has costs 48 bytes a
//! pair; with boxed strings (no spare capacity, two words each) a pair is 32 bytes. Lookups are a
//! binary search over a handful of entries.

use std::collections::BTreeMap;
use std::fmt;

/// Label keys to values, sorted by key, each key once.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<(Box<str>, Box<str>)>);

impl Labels {
    /// No labels.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.find(key).ok().map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => {
                Some(std::mem::replace(&mut self.0[i].1, value.into_boxed_str()).into_string())
            }
            Err(i) => {
                self.0
                    .insert(i, (key.into_boxed_str(), value.into_boxed_str()));
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key)
            .ok()
            .map(|i| self.0.remove(i).1.into_string())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
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
        out.shrink_to_fit();
        Self(out)
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
        let v: Vec<(Box<str>, Box<str>)> = map
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        Self(v)
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
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::iter::Map<
        std::vec::IntoIter<(Box<str>, Box<str>)>,
        fn((Box<str>, Box<str>)) -> (String, String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0
            .into_iter()
            .map(|(k, v)| (k.into_string(), v.into_string()))
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
    }
}
