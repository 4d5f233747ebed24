//! Sources of cluster objects. Every source (the Kubernetes API, a manifest directory) emits the same
//! [`SourceEvent`]s, so nothing downstream knows which one is in use.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// One cluster object of a kind the agent cares about, as the API serves it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
}

/// Kind of an [`Object`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
}

/// Identity of an object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// What a source tells the reconcile engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// The object was created or changed (or seen in a (re)list).
    Applied(Object),
    /// The object is gone (deleted, or missing from a relist after a disconnect).
    Deleted(ObjectRef),
    /// Every kind's initial list is complete: enforcing may start. Sent once per source start.
    Synced,
}
