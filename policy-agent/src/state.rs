//! Turns source events into changes of the compiler's cluster state. A bad object is logged with its
//! kind and namespace/name and skipped (the previous good version, if any, stays); nothing else stops.

use crate::source::{Kind, Object, ObjectRef, SourceEvent};
use palisade_policy::model::{self, Change, ClusterState};

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The state changed (or may have).
    Changed,
    /// The object was invalid and skipped; the message names it and the field at fault.
    Rejected(String),
    /// Every source finished its initial list.
    Synced,
}

/// The change an object or deletion means for the state.
pub fn change_for(event: SourceEvent) -> Result<Option<Change>, String> {
    Ok(Some(match event {
        SourceEvent::Synced => return Ok(None),
        SourceEvent::Applied(Object::Pod(p)) => {
            Change::UpsertPod(model::pod_from_k8s(&p).map_err(|e| e.to_string())?.into())
        }
        SourceEvent::Applied(Object::Namespace(n)) => {
            Change::UpsertNamespace(model::namespace_from_k8s(&n).map_err(|e| e.to_string())?)
        }
        SourceEvent::Applied(Object::NetworkPolicy(p)) => {
            Change::UpsertPolicy(model::policy_from_k8s(&p).map_err(|e| e.to_string())?)
        }
        SourceEvent::Applied(Object::Node(n)) => {
            Change::UpsertNode(model::node_from_k8s(&n).map_err(|e| e.to_string())?)
        }
        SourceEvent::Deleted(ObjectRef {
            kind,
            namespace,
            name,
        }) => match kind {
            Kind::Pod => Change::DeletePod { namespace, name },
            Kind::Namespace => Change::DeleteNamespace { name },
            Kind::NetworkPolicy => Change::DeletePolicy { namespace, name },
            Kind::Node => Change::DeleteNode { name },
        },
    }))
}

/// Applies one source event to `state`.
pub fn apply(state: &mut ClusterState, event: SourceEvent) -> Applied {
    if event == SourceEvent::Synced {
        return Applied::Synced;
    }
    match change_for(event) {
        Ok(Some(c)) => {
            state.apply(c);
            Applied::Changed
        }
        Ok(None) => Applied::Synced,
        Err(e) => Applied::Rejected(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> SourceEvent {
        SourceEvent::Applied(Object::NetworkPolicy(Box::new(
            serde_json::from_value(json).unwrap(),
        )))
    }

    #[test]
    fn a_bad_policy_is_rejected_by_name_and_a_good_one_applies() {
        let mut s = ClusterState::default();
        let bad = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "broken"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}
        }));
        match apply(&mut s, bad) {
            Applied::Rejected(m) => assert!(m.contains("ns/broken"), "{m}"),
            other => panic!("accepted a bad policy: {other:?}"),
        }
        let good = policy(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "ok"},
            "spec": {"podSelector": {}}
        }));
        assert_eq!(apply(&mut s, good), Applied::Changed);
        assert_eq!(s.policies.len(), 1);
        let del = SourceEvent::Deleted(ObjectRef::namespaced(Kind::NetworkPolicy, "ns", "ok"));
        assert_eq!(apply(&mut s, del), Applied::Changed);
        assert!(s.policies.is_empty());
    }
}
