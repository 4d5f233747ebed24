//! Label selectors with apimachinery semantics (semantics 8, 19).

use super::Labels;
use std::collections::BTreeSet;
use std::fmt;

/// The values of an `In`/`NotIn` requirement: sorted, each once.
///
/// Why not `BTreeSet<String>`: a B-tree allocates a whole node (eleven values, ~290 bytes) for the
/// one or two values a requirement nearly always has, and every policy carries several selectors:
/// at 10k policies the selectors' B-tree nodes were ~12 MB of the agent's heap. Lookups are a binary
/// search over a handful of entries.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Values(Box<[String]>);

impl Values {
    pub fn contains(&self, value: &str) -> bool {
        self.0.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Values in order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl FromIterator<String> for Values {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        let mut v: Vec<String> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self(v.into_boxed_slice())
    }
}

impl From<BTreeSet<String>> for Values {
    fn from(set: BTreeSet<String>) -> Self {
        // Already sorted, each once.
        Self(set.into_iter().collect())
    }
}

impl<const N: usize> From<[String; N]> for Values {
    fn from(values: [String; N]) -> Self {
        values.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Values {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// One `matchExpressions` requirement. In/NotIn always carry at least one value (validated).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In { key: String, values: Values },
    NotIn { key: String, values: Values },
    Exists { key: String },
    DoesNotExist { key: String },
}

impl Requirement {
    /// Whether a label map satisfies this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            // NotIn matches when the key is absent (semantics 19).
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

/// A validated label selector: `matchLabels` AND every expression. Empty selects everything.
/// `matchLabels` is a [`Labels`] (a sorted vector) for the reason [`Values`] gives.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector `{}`: matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }
    /// Selector from `matchLabels` pairs.
    pub fn from_labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            match_labels: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            expressions: Vec::new(),
        }
    }
    /// Whether it selects everything.
    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }
    /// Whether a label map matches (semantics 8: matchLabels and matchExpressions are ANDed).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_everything() {
            return f.write_str("{} (everything)");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.expressions {
            parts.push(match r {
                Requirement::In { key, values } => {
                    format!(
                        "{key} in ({})",
                        values.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
                Requirement::NotIn { key, values } => {
                    format!(
                        "{key} notin ({})",
                        values.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
                Requirement::Exists { key } => key.clone(),
                Requirement::DoesNotExist { key } => format!("!{key}"),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn semantics_19_notin_matches_missing_key_and_in_needs_key() {
        let vals: Values = ["a".to_string()].into();
        let not_in = Requirement::NotIn {
            key: "k".into(),
            values: vals.clone(),
        };
        let is_in = Requirement::In {
            key: "k".into(),
            values: vals,
        };
        assert!(not_in.matches(&labels(&[])));
        assert!(not_in.matches(&labels(&[("k", "b")])));
        assert!(!not_in.matches(&labels(&[("k", "a")])));
        assert!(!is_in.matches(&labels(&[])));
        assert!(is_in.matches(&labels(&[("k", "a")])));
        assert!(Requirement::Exists { key: "k".into() }.matches(&labels(&[("k", "")])));
        assert!(Requirement::DoesNotExist { key: "k".into() }.matches(&labels(&[("x", "")])));
    }

    #[test]
    fn semantics_08_empty_selector_selects_all_and_parts_are_anded() {
        assert!(LabelSelector::everything().matches(&labels(&[])));
        let mut s = LabelSelector::from_labels([("a", "1")]);
        s.expressions.push(Requirement::Exists { key: "b".into() });
        assert!(!s.matches(&labels(&[("a", "1")])));
        assert!(!s.matches(&labels(&[("b", "1")])));
        assert!(s.matches(&labels(&[("a", "1"), ("b", "x")])));
    }
}
