//! What many pods hold alike, held once: [`SharedStr`] (a namespace, a node name: one pointer
//! per pod), [`PodUid`] (a UID in 16 bytes, no allocation) and [`PodSharing`], through which a
//! source passes each new pod so that equal names and label sets are one copy.
//!
//! At 100k pods the per-pod copies were ~9 MB of the agent's memory: a boxed namespace and node
//! name (two words and an allocation each), a UID's 36-byte text, and a `Pod` in the allocator's
//! 160-byte class; with these a pod is one 128-byte allocation and its name.

use super::interner::{Interner, Shareable};
use super::labels::LabelSets;
use super::Pod;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// An immutable string shared by pointer (one word): equal, ordered and hashed as its text.
#[derive(Clone)]
pub struct SharedStr(Arc<Box<str>>);

impl SharedStr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether both are the very same copy (shared through [`PodSharing`]).
    pub fn is_shared_with(&self, other: &SharedStr) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq for SharedStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for SharedStr {}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}
impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for SharedStr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SharedStr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// As its text's.
impl Hash for SharedStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(Arc::new(s.into()))
    }
}
impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(Arc::new(s.into_boxed_str()))
    }
}
impl From<Box<str>> for SharedStr {
    fn from(s: Box<str>) -> Self {
        SharedStr(Arc::new(s))
    }
}

/// A pod's `metadata.uid`, in 16 bytes: the UUID the API server makes, or, for any other text
/// (a hand-written manifest's), a 128-bit digest of it; all zeros for none. Two UIDs are equal
/// iff their texts are (UUIDs compared as UUIDs, so regardless of case). Never persisted: the
/// digest is this build's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PodUid([u8; 16]);

impl PodUid {
    /// No UID (an empty or absent `metadata.uid`).
    pub const UNKNOWN: PodUid = PodUid([0; 16]);

    pub fn of(text: &str) -> Self {
        if text.is_empty() {
            return Self::UNKNOWN;
        }
        match uuid_bytes(text) {
            Some(b) => PodUid(b),
            None => {
                // Two SipHash digests (std's fixed keys), each over a different prefix.
                let half = |salt: u8| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    salt.hash(&mut h);
                    text.hash(&mut h);
                    h.finish().to_be_bytes()
                };
                let mut b = [0; 16];
                b[..8].copy_from_slice(&half(1));
                b[8..].copy_from_slice(&half(2));
                PodUid(b)
            }
        }
    }

    pub fn is_known(&self) -> bool {
        *self != Self::UNKNOWN
    }
}

impl From<&str> for PodUid {
    fn from(s: &str) -> Self {
        PodUid::of(s)
    }
}
impl From<String> for PodUid {
    fn from(s: String) -> Self {
        PodUid::of(&s)
    }
}

impl fmt::Debug for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodUid(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The 16 bytes of a UUID in its text form (`8-4-4-4-12` hex digits, either case).
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let t = text.as_bytes();
    if t.len() != 36 || [8, 13, 18, 23].iter().any(|&i| t[i] != b'-') {
        return None;
    }
    let mut digits = t.iter().filter(|&&c| c != b'-');
    let mut out = [0u8; 16];
    for byte in &mut out {
        let hi = (*digits.next()? as char).to_digit(16)?;
        let lo = (*digits.next()? as char).to_digit(16)?;
        *byte = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The copy that matters is the `Arc`: held by pods and by the interner.
impl Shareable for SharedStr {
    fn held_elsewhere(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

/// Shares a new pod's label set, namespace and node name with the pods that came before it.
#[derive(Debug, Default)]
pub struct PodSharing {
    labels: LabelSets,
    strings: Interner<SharedStr>,
}

impl PodSharing {
    /// `pod` with its labels, namespace and node name replaced by the equal copies held.
    pub fn share(&mut self, pod: &mut Pod) {
        pod.labels = self.labels.share(std::mem::take(&mut pod.labels));
        pod.namespace = self.strings.share(pod.namespace.clone());
        if let Some(node) = pod.node_name.take() {
            pod.node_name = Some(self.strings.share(node));
        }
    }

    /// Distinct label sets held.
    pub fn label_sets(&self) -> usize {
        self.labels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_kept_as_its_bytes_in_either_case_and_other_text_as_a_digest() {
        let a = PodUid::of("0f8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(a, PodUid::of("0F8E2B4A-1C3D-4E5F-8A9B-0C1D2E3F4A5B"));
        assert_ne!(a, PodUid::of("0f8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5c"));
        assert_eq!(a.0[..4], [0x0f, 0x8e, 0x2b, 0x4a]);
        assert!(a.is_known());
        assert_eq!(PodUid::of("uid-a"), PodUid::of("uid-a"));
        assert_ne!(PodUid::of("uid-a"), PodUid::of("uid-b"));
        // Not a UUID: digested, not misread (a hyphen missing, a non-hex digit).
        assert_ne!(
            PodUid::of("0f8e2b4a-1c3d-4e5f-8a9b00c1d2e3f4a5b"),
            PodUid::of("0f8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert!(PodUid::of("0g8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5b").is_known());
        assert!(!PodUid::of("").is_known());
    }

    #[test]
    fn equal_names_are_one_copy_and_unused_ones_are_swept() {
        let mut set = Interner::<SharedStr>::default();
        let a = set.share("ns-1".into());
        let b = set.share(String::from("ns-1").into());
        assert!(a.is_shared_with(&b));
        assert_eq!(a, "ns-1");
        assert!(a < set.share("ns-2".into()));
        drop((a, b));
        // Past the floor, a sweep forgets what only the set holds.
        for i in 0..2 * crate::model::interner::SWEEP_FLOOR {
            set.share(format!("x-{i}").into());
        }
        assert!(set.len() <= 2 * crate::model::interner::SWEEP_FLOOR);
        assert!(!set.holds(&"ns-1".into()));
    }

    #[test]
    fn a_pod_is_one_128_byte_allocation_with_its_counts() {
        // The allocator's size classes go 112, 128, 160: a field more than this moves every pod up.
        assert!(std::mem::size_of::<std::sync::Arc<Pod>>() == 8);
        assert!(
            std::mem::size_of::<Pod>() + 16 <= 128,
            "Pod is {} bytes",
            std::mem::size_of::<Pod>()
        );
    }
}
