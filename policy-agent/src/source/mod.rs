//! Sources of cluster objects. Every source (the Kubernetes API, a manifest directory) converts what
//! it reads into model changes at the edge and emits the same [`SourceEvent`]s, so nothing
//! downstream knows which one is in use, nor any `k8s-openapi` type: those stop here.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::model::{self, Change, PodSharing};
use palisade_policy::ModelError;

pub use self::cluster_policy::ClusterNetworkPolicy;

/// One cluster object of a kind the agent cares about, as the API serves it (inside the sources).
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
    ClusterNetworkPolicy(Box<ClusterNetworkPolicy>),
}

/// Kind of an [`Object`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
    ClusterNetworkPolicy,
}

/// Identity of an object: kind, namespace (empty for cluster-scoped kinds) and name. Its strings
/// are boxed (two words, no spare capacity): the manifest source keeps one per object, shared by
/// `Arc`, which is then a 56-byte allocation instead of 80 (~2.7 MB at 111k objects).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: Box<str>,
    pub name: Box<str>,
}

/// What a source tells the reconcile engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// An object was created, changed or seen in a (re)list (an upsert), or is gone (deleted, or
    /// missing from a relist after a disconnect): as the model change it means. It may equal what
    /// the model holds already (a status heartbeat); the engine finds that out.
    Changed { object: ObjectRef, change: Change },
    /// An object the model cannot take (the API server would have refused it); the error names
    /// the field. Its previous version, if any, stays.
    Rejected {
        object: ObjectRef,
        error: ModelError,
    },
    /// Every kind's initial list is complete: enforcing may start. Sent once per source start.
    Synced,
}

impl SourceEvent {
    /// The event for an object created, changed or listed.
    pub fn applied(object: Object) -> Self {
        let reference = object.reference();
        match object.into_change() {
            Ok(change) => SourceEvent::Changed {
                object: reference,
                change,
            },
            Err(error) => SourceEvent::Rejected {
                object: reference,
                error,
            },
        }
    }

    /// Hands a new Pod to `sharing`, so that pods with equal labels (a ReplicaSet's), namespaces
    /// and node names share one copy of each; the event's Pod is its own (an `Arc` just made),
    /// else it is left as it is.
    pub fn share(mut self, sharing: &mut PodSharing) -> Self {
        if let SourceEvent::Changed {
            change: Change::UpsertPod(pod),
            ..
        } = &mut self
        {
            if let Some(pod) = std::sync::Arc::get_mut(pod) {
                sharing.share(pod);
            }
        }
        self
    }

    /// The event for an object that is gone.
    pub fn deleted(object: ObjectRef) -> Self {
        let change = object.delete_change();
        SourceEvent::Changed { object, change }
    }
}

pub mod cluster_policy;
pub mod kube;
pub mod manifests;

pub use self::kube::KubeSource;
pub use self::manifests::ManifestSource;

use std::path::PathBuf;

use ::kube::api::ObjectMeta;
use ::kube::Resource;

/// What can stop a source. Watch errors inside a running source are not errors of this type: the
/// Kubernetes source logs them and retries with backoff; the manifest source logs a bad file and keeps its
/// last good objects.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The Kubernetes client configuration (in-cluster or kubeconfig) could not be loaded.
    #[error("kubernetes client config from {origin}: {message}")]
    KubeConfig { origin: String, message: String },
    /// The Kubernetes client could not be built from a valid configuration.
    #[error("kubernetes client: {0}")]
    KubeClient(String),
    /// The manifest directory could not be read or watched.
    #[error("manifest directory {path}: {action}: {source}")]
    ManifestDir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Kind {
    /// Every kind the agent watches, in a stable order.
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Node,
        Kind::ClusterNetworkPolicy,
    ];

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy)
    }

    /// The `kind` field the API uses for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::ClusterNetworkPolicy => cluster_policy::KIND,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl ObjectRef {
    /// The model change that removes this object.
    pub fn delete_change(&self) -> Change {
        let (namespace, name) = (self.namespace.to_string(), self.name.to_string());
        match self.kind {
            Kind::Pod => Change::DeletePod { namespace, name },
            Kind::Namespace => Change::DeleteNamespace { name },
            Kind::NetworkPolicy => Change::DeletePolicy { namespace, name },
            Kind::Node => Change::DeleteNode { name },
            Kind::ClusterNetworkPolicy => Change::DeleteClusterPolicy { name },
        }
    }

    /// A reference to a namespaced object.
    pub fn namespaced(
        kind: Kind,
        namespace: impl Into<Box<str>>,
        name: impl Into<Box<str>>,
    ) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A reference to a cluster-scoped object (empty namespace).
    pub fn cluster(kind: Kind, name: impl Into<Box<str>>) -> Self {
        ObjectRef {
            kind,
            namespace: "".into(),
            name: name.into(),
        }
    }
}

impl Object {
    /// The model change this object means (an upsert), or why the model cannot take it.
    pub fn into_change(self) -> Result<Change, ModelError> {
        Ok(match self {
            Object::Pod(p) => Change::UpsertPod(model::pod_from_k8s(&p)?.into()),
            Object::Namespace(n) => Change::UpsertNamespace(model::namespace_from_k8s(&n)?),
            Object::NetworkPolicy(p) => Change::UpsertPolicy(model::policy_from_k8s(&p)?),
            Object::Node(n) => Change::UpsertNode(model::node_from_k8s(&n)?),
            Object::ClusterNetworkPolicy(p) => {
                Change::UpsertClusterPolicy(model::cluster_policy_from_api(&p.0)?)
            }
        })
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
            Object::ClusterNetworkPolicy(_) => Kind::ClusterNetworkPolicy,
        }
    }

    /// The object's metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Pod(o) => o.meta(),
            Object::Namespace(o) => o.meta(),
            Object::NetworkPolicy(o) => o.meta(),
            Object::Node(o) => o.meta(),
            Object::ClusterNetworkPolicy(o) => o.meta(),
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Pod(o) => o.meta_mut(),
            Object::Namespace(o) => o.meta_mut(),
            Object::NetworkPolicy(o) => o.meta_mut(),
            Object::Node(o) => o.meta_mut(),
            Object::ClusterNetworkPolicy(o) => o.meta_mut(),
        }
    }

    /// The object's identity: kind, namespace (empty for cluster-scoped kinds) and name.
    pub fn reference(&self) -> ObjectRef {
        let meta = self.meta();
        let namespace = match &meta.namespace {
            Some(ns) if self.kind().is_namespaced() => ns.as_str(),
            _ => "",
        };
        ObjectRef {
            kind: self.kind(),
            namespace: namespace.into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }

    /// Drops what nothing downstream reads, what makes objects large and what changes on every
    /// heartbeat: `managedFields`, annotations (but a NetworkPolicy's audit annotation,
    /// `palisade.dev/audit`, which the model reads), and the status but for what the model reads (a Pod's
    /// phase and IPs, a Node's addresses; conditions, container statuses, probe times, capacity and
    /// images go). Every source strips objects before emitting them; the manifest source compares
    /// stripped objects, so a status heartbeat there is not even emitted.
    pub fn strip(mut self) -> Self {
        let keep_audit = matches!(self, Object::NetworkPolicy(_));
        let meta = self.meta_mut();
        meta.managed_fields = None;
        let audit = meta
            .annotations
            .take()
            .and_then(|mut a| a.remove_entry(palisade_policy::model::AUDIT_ANNOTATION))
            .filter(|_| keep_audit);
        meta.annotations = audit.map(|(k, v)| [(k, v)].into());
        match &mut self {
            Object::Pod(p) => {
                if let Some(s) = p.status.as_mut() {
                    *s = k8s_openapi::api::core::v1::PodStatus {
                        phase: s.phase.take(),
                        pod_ip: s.pod_ip.take(),
                        pod_ips: s.pod_ips.take(),
                        host_ip: s.host_ip.take(),
                        host_ips: s.host_ips.take(),
                        ..Default::default()
                    };
                }
            }
            Object::Node(n) => {
                if let Some(s) = n.status.as_mut() {
                    *s = k8s_openapi::api::core::v1::NodeStatus {
                        addresses: s.addresses.take(),
                        ..Default::default()
                    };
                }
            }
            // A ClusterNetworkPolicy's status is not even decoded.
            Object::Namespace(_) | Object::NetworkPolicy(_) | Object::ClusterNetworkPolicy(_) => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> Object {
        Object::NetworkPolicy(Box::new(serde_json::from_value(json).unwrap()))
    }

    #[test]
    fn strip_keeps_a_network_policys_audit_annotation_and_drops_every_other() {
        let np = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "audited", "annotations": {
                "palisade.dev/audit": "true", "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"podSelector": {}}
        }))
        .strip();
        assert_eq!(
            np.meta().annotations,
            Some([("palisade.dev/audit".to_string(), "true".to_string())].into())
        );
        match SourceEvent::applied(np) {
            SourceEvent::Changed {
                change: Change::UpsertPolicy(p),
                ..
            } => assert!(p.audit),
            other => panic!("{other:?}"),
        }
        let plain = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "p", "annotations": {"x": "y"}},
            "spec": {"podSelector": {}}
        }))
        .strip();
        assert_eq!(plain.meta().annotations, None);
    }

    #[test]
    fn an_object_reference_is_five_words_at_most() {
        // The manifest source keeps one per object behind an `Arc`: 40 bytes + the counts fit
        // the allocator's 56-byte class (with `String`s it was 80).
        assert!(std::mem::size_of::<ObjectRef>() <= 40);
        let r = ObjectRef::namespaced(Kind::Pod, "ns", "a");
        assert_eq!(r.to_string(), "Pod ns/a");
        assert_eq!(ObjectRef::cluster(Kind::Node, "n1").to_string(), "Node n1");
    }

    #[test]
    fn pods_with_equal_labels_namespaces_and_nodes_share_one_copy_of_each() {
        let pod = |name: &str, app: &str, node: &str| {
            Object::Pod(Box::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"namespace": "ns", "name": name, "labels": {"app": app, "tier": "x"}},
                    "spec": {"containers": [], "nodeName": node}
                }))
                .unwrap(),
            ))
        };
        let mut sharing = PodSharing::default();
        let pod_of = |event: SourceEvent| match event {
            SourceEvent::Changed {
                change: Change::UpsertPod(p),
                ..
            } => p,
            other => panic!("{other:?}"),
        };
        let a = pod_of(SourceEvent::applied(pod("a", "web", "n1")).share(&mut sharing));
        let b = pod_of(SourceEvent::applied(pod("b", "web", "n1")).share(&mut sharing));
        let c = pod_of(SourceEvent::applied(pod("c", "db", "n2")).share(&mut sharing));
        assert!(a.labels.is_shared_with(&b.labels), "same labels, one copy");
        assert!(!a.labels.is_shared_with(&c.labels) && a.labels != c.labels);
        assert_eq!(sharing.label_sets(), 2);
        assert!(a.namespace.is_shared_with(&c.namespace), "one namespace");
        let node = |p: &model::Pod| p.node_name.clone().unwrap();
        assert!(node(&a).is_shared_with(&node(&b)), "one node name");
        assert!(!node(&a).is_shared_with(&node(&c)) && node(&c) == "n2");
    }

    #[test]
    fn a_bad_object_is_rejected_at_the_edge_by_name_and_field_and_a_good_one_is_a_change() {
        let bad = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "broken"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}
        }));
        match SourceEvent::applied(bad) {
            SourceEvent::Rejected { object, error } => {
                assert_eq!(object.to_string(), "NetworkPolicy ns/broken");
                let e = error.to_string();
                assert!(e.contains("ns/broken") && e.contains("10.0.0.0/33"), "{e}");
            }
            other => panic!("accepted a bad policy: {other:?}"),
        }
        let good = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "ok"},
            "spec": {"podSelector": {}}
        }));
        assert!(matches!(
            SourceEvent::applied(good),
            SourceEvent::Changed {
                change: Change::UpsertPolicy(_),
                ..
            }
        ));
        let gone = ObjectRef::namespaced(Kind::NetworkPolicy, "ns", "ok");
        assert_eq!(
            SourceEvent::deleted(gone.clone()),
            SourceEvent::Changed {
                object: gone,
                change: Change::DeletePolicy {
                    namespace: "ns".into(),
                    name: "ok".into()
                }
            }
        );
    }
}
