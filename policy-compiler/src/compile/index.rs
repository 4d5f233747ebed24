//! The one index over the pods NetworkPolicy applies to (the subjects), read by every resolution
//! in `resolve`. A full compile builds it from the state; the incremental compiler builds it once
//! and keeps it up to date per change ([`PodIndex::refresh`], [`PodIndex::relabel_namespace`]).

use super::owners::AddressOwners;
use crate::model::{namespace_entries, ClusterState, Labels, Pod, PodKey, PodUid, Policy};
use palisade_contract::Attachment;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A pod NetworkPolicy applies to, as the compiler sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Subject {
    /// Shared with the cluster state.
    pub pod: Arc<Pod>,
    /// Status IPs ∪ IPs of this node's attachment records that match the pod: sorted, no
    /// duplicates (one or two: a slice, where a `BTreeSet` took a 200-byte node per pod).
    pub ips: Box<[IpAddr]>,
    /// Enforced on this node.
    pub local: bool,
}

impl Subject {
    /// The compiler's view of one pod (`None`: NetworkPolicy does not apply to it: hostNetwork or
    /// terminated). It is local when scheduled on `node` or when one of this node's attachment
    /// records (`records`: those naming the pod) matches it.
    fn view(pod: &Arc<Pod>, records: &[Attachment], node: &str) -> Option<Self> {
        if !pod.is_policy_subject() {
            return None;
        }
        let mut ips: BTreeSet<IpAddr> = pod.ips.iter().copied().collect();
        let mut local = pod.node_name.as_deref() == Some(node);
        for a in records.iter().filter(|a| attachment_matches(a, pod)) {
            // Attachments are authoritative: they arrive before the API knows the IPs.
            ips.extend(a.ips.iter().copied());
            local = true;
        }
        Some(Self {
            pod: Arc::clone(pod),
            ips: ips.into_iter().collect(),
            local,
        })
    }

    /// Whether `pol` selects this pod as one it enforces: a local pod of its namespace that its
    /// pod selector matches.
    pub fn selected_by(&self, pol: &Policy) -> bool {
        self.local
            && *self.pod.namespace == *pol.namespace
            && pol.pod_selector.matches(&self.pod.labels)
    }
}

/// Whether an attachment record naming pod `p` is one of `p`'s (not of an earlier pod of the same
/// name): the UIDs agree, or one of them is unknown.
fn attachment_matches(a: &Attachment, p: &Pod) -> bool {
    match a.pod_uid.as_deref() {
        Some(au) if !au.is_empty() && p.uid.is_known() => PodUid::of(au) == p.uid,
        _ => true,
    }
}

/// The old and new view of one pod whose facts changed, with the labels of its namespace before
/// and after.
#[derive(Debug)]
pub(crate) struct Moved {
    pub key: PodKey,
    pub old: Option<Subject>,
    pub new: Option<Subject>,
    pub old_ns: Labels,
    pub new_ns: Labels,
}

impl Moved {
    /// The pod's namespace (it is a subject before or after, or it would not have moved).
    pub fn namespace(&self) -> Option<&str> {
        let s = self.old.as_ref().or(self.new.as_ref())?;
        Some(&s.pod.namespace)
    }
}

/// The subjects of one node's compile, with what resolution looks up.
#[derive(Debug)]
pub(crate) struct PodIndex {
    node: String,
    /// By `namespace/name`: the subjects of one namespace are one range ([`namespace_entries`]).
    subjects: BTreeMap<PodKey, Subject>,
    /// Labels of every namespace holding subjects.
    namespaces: BTreeMap<String, Labels>,
    /// Subject pods claiming an address, for patching elements; a full compile never asks, so
    /// it is kept only after [`Self::track_owners`] (~a third of a full compile's time otherwise).
    ip_owners: Option<AddressOwners>,
    /// This node's attachment records, by the key of the pod they name.
    records: BTreeMap<String, Vec<Attachment>>,
}

impl PodIndex {
    pub fn build(state: &ClusterState, node: &str) -> Self {
        let records = records_by_pod(&state.attachments);
        let records_of = |key: &str| records.get(key).map_or(&[][..], Vec::as_slice);
        // Collected from sorted keys: built in bulk, not insert by insert.
        let subjects: BTreeMap<PodKey, Subject> = state
            .pods
            .iter()
            .filter_map(|(key, pod)| {
                Some((key.clone(), Subject::view(pod, records_of(key), node)?))
            })
            .collect();
        let mut namespaces = BTreeMap::new();
        for s in subjects.values() {
            let ns = &s.pod.namespace;
            if !namespaces.contains_key(&**ns) {
                namespaces.insert(ns.to_string(), state.namespace_labels(ns));
            }
        }
        Self {
            node: node.to_string(),
            subjects,
            namespaces,
            ip_owners: None,
            records,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn subject(&self, key: &str) -> Option<&Subject> {
        self.subjects.get(key)
    }

    /// Every subject, by key.
    pub fn subjects(&self) -> impl Iterator<Item = (&PodKey, &Subject)> {
        self.subjects.iter()
    }

    /// The subjects of one namespace.
    pub fn in_namespace<'s>(&'s self, ns: &str) -> impl Iterator<Item = (&'s PodKey, &'s Subject)> {
        namespace_entries(&self.subjects, ns)
    }

    /// Namespaces holding subjects, with their labels.
    pub fn namespaces(&self) -> impl Iterator<Item = (&String, &Labels)> {
        self.namespaces.iter()
    }

    /// Keeps the owners of every address from now on (see [`Self::owners`]).
    pub fn track_owners(&mut self) {
        let mut owners = AddressOwners::default();
        for (key, s) in &self.subjects {
            for ip in &s.ips {
                owners.insert(*ip, key);
            }
        }
        self.ip_owners = Some(owners);
    }

    /// Keys of the subjects claiming an address, sorted. Only after [`Self::track_owners`].
    pub fn owners(&self, ip: &IpAddr) -> &[PodKey] {
        debug_assert!(self.ip_owners.is_some(), "address owners are not tracked");
        self.ip_owners.as_ref().map_or(&[], |o| o.get(ip))
    }

    /// Whether a record's pod is a subject the record matches (then the record's addresses are
    /// that pod's; otherwise a pending record's addresses stay pending).
    pub fn claims(&self, a: &Attachment) -> bool {
        a.pod_key()
            .and_then(|k| self.subjects.get(k.as_str()))
            .is_some_and(|s| attachment_matches(a, &s.pod))
    }

    fn records_of(&self, key: &str) -> &[Attachment] {
        self.records.get(key).map_or(&[], Vec::as_slice)
    }

    fn insert(&mut self, state: &ClusterState, key: &PodKey, s: Subject) {
        let ns = &s.pod.namespace;
        if !self.namespaces.contains_key(&**ns) {
            self.namespaces
                .insert(ns.to_string(), state.namespace_labels(ns));
        }
        if let Some(owners) = self.ip_owners.as_mut() {
            for ip in &s.ips {
                owners.insert(*ip, key);
            }
        }
        self.subjects.insert(PodKey::clone(key), s);
    }

    fn remove(&mut self, key: &str) {
        let Some(s) = self.subjects.remove(key) else {
            return;
        };
        let ns = &s.pod.namespace;
        if self.in_namespace(ns).next().is_none() {
            self.namespaces.remove(&**ns);
        }
        if let Some(owners) = self.ip_owners.as_mut() {
            for ip in &s.ips {
                owners.remove(ip, key);
            }
        }
    }

    /// The attachment records changed (the state holds the new ones); pods whose view they
    /// change are then [`Self::refresh`]ed by the caller.
    pub fn set_records(&mut self, attachments: &[Attachment]) {
        self.records = records_by_pod(attachments);
    }

    /// Views one pod of the (changed) state again; returns how it moved, if it did.
    pub fn refresh(&mut self, state: &ClusterState, key: &str) -> Option<Moved> {
        let held = state.pods.get_key_value(key);
        let new = held.and_then(|(_, pod)| Subject::view(pod, self.records_of(key), &self.node));
        let had = self.subjects.get_key_value(key);
        if new.as_ref() == had.map(|(_, s)| s) {
            return None;
        }
        // The pod's one key: the state's while it holds the pod, else the one we held.
        let shared = held
            .map(|(k, _)| k)
            .or(had.map(|(k, _)| k))
            .map_or_else(|| PodKey::from(key), PodKey::clone);
        let old = had.map(|(_, s)| s.clone());
        self.remove(key);
        if let Some(s) = &new {
            self.insert(state, &shared, s.clone());
        }
        let ns = &new.as_ref().or(old.as_ref())?.pod.namespace;
        let labels = state.namespace_labels(ns);
        Some(Moved {
            key: shared,
            old,
            new,
            old_ns: labels.clone(),
            new_ns: labels,
        })
    }

    /// A namespace's labels changed from `old` to `new`: the subjects of the namespace, moved.
    pub fn relabel_namespace(&mut self, ns: &str, old: &Labels, new: &Labels) -> Vec<Moved> {
        let Some(labels) = self.namespaces.get_mut(ns) else {
            return Vec::new(); // no pods: nothing selected changes
        };
        labels.clone_from(new);
        self.in_namespace(ns)
            .map(|(key, s)| Moved {
                key: key.clone(),
                old: Some(s.clone()),
                new: Some(s.clone()),
                old_ns: old.clone(),
                new_ns: new.clone(),
            })
            .collect()
    }
}

fn records_by_pod(attachments: &[Attachment]) -> BTreeMap<String, Vec<Attachment>> {
    let mut m: BTreeMap<String, Vec<Attachment>> = BTreeMap::new();
    for a in attachments {
        if let Some(k) = a.pod_key() {
            m.entry(k).or_default().push(a.clone());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodPhase;

    /// An attachment record names its pod by namespace, name and UID: a record left by an earlier
    /// pod of the same name (another UID) is not the new pod's, so its addresses are not the new
    /// pod's either.
    #[test]
    fn an_attachment_is_a_pods_only_when_their_uids_agree_or_one_is_unknown() {
        let uuid = "0f8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
        let pod = |uid: &str| Pod {
            namespace: "ns".into(),
            name: "p".into(),
            uid: uid.into(),
            labels: Labels::default(),
            node_name: Some("n1".into()),
            ips: Box::default(),
            ports: Box::default(),
            host_network: false,
            phase: PodPhase::Running,
        };
        let record = |uid: Option<&str>| Attachment {
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            host_veth: "palx".into(),
            ips: Vec::new(),
            pod_namespace: Some("ns".into()),
            pod_name: Some("p".into()),
            pod_uid: uid.map(Into::into),
            pending: true,
        };
        assert!(attachment_matches(&record(Some(uuid)), &pod(uuid)));
        assert!(attachment_matches(
            &record(Some(&uuid.to_uppercase())),
            &pod(uuid)
        ));
        assert!(!attachment_matches(
            &record(Some("0f8e2b4a-1c3d-4e5f-8a9b-0c1d2e3f4a5c")),
            &pod(uuid)
        ));
        assert!(attachment_matches(&record(Some("uid-1")), &pod("uid-1")));
        assert!(!attachment_matches(&record(Some("uid-1")), &pod("uid-2")));
        assert!(attachment_matches(&record(None), &pod(uuid)));
        assert!(attachment_matches(&record(Some("")), &pod(uuid)));
        assert!(attachment_matches(&record(Some(uuid)), &pod("")));
    }
}
