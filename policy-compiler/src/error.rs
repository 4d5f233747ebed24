//! The one error type of this crate.

use thiserror::Error;

/// A Kubernetes object that cannot be turned into our model. It names the object (kind and
/// namespace/name) and the field at fault, so the agent can log it and skip just that object.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{kind} {key}: {field}: {reason}")]
pub struct ModelError {
    /// `Pod`, `Namespace`, `NetworkPolicy`, `Node` or `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// `namespace/name` (or `name` for cluster-scoped objects).
    pub key: String,
    /// Path of the offending field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ModelError {
    pub(crate) fn new(
        kind: &'static str,
        key: &str,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            key: key.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Errors of `explain` and of applying a batch to a ruleset model.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("pod {0} is not known (or is terminated, or uses hostNetwork)")]
    UnknownPod(String),
    #[error("{0} has no address of the same family as the other endpoint")]
    NoCommonFamily(String),
    #[error("bad batch command: {0}")]
    BadBatch(String),
}
