//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as a kube-rs resource: the compiler's
//! API type (`ClusterNetworkPolicyApi`, the upstream field names) behind the `Resource` impl that
//! kube-rs' watcher and the manifest source need. A CRD, not a built-in kind: a cluster without it
//! answers 404, which the Kubernetes source takes as "none" (see `kube`).

use std::borrow::Cow;

use kube::api::ObjectMeta;
use kube::core::ClusterResourceScope;
use kube::Resource;
use palisade_policy::model::ClusterNetworkPolicyApi;
use serde::{Deserialize, Serialize};

/// The API group of ClusterNetworkPolicy.
pub const GROUP: &str = "policy.networking.k8s.io";
/// The version served.
pub const VERSION: &str = "v1alpha2";
/// `apiVersion` of a ClusterNetworkPolicy object.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
pub const KIND: &str = "ClusterNetworkPolicy";
pub const PLURAL: &str = "clusternetworkpolicies";

/// One ClusterNetworkPolicy as the API serves it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterNetworkPolicy(pub ClusterNetworkPolicyApi);

impl Resource for ClusterNetworkPolicy {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_the_upstream_crds() {
        assert_eq!(
            ClusterNetworkPolicy::url_path(&(), None),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
        );
        let o: ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": "c", "resourceVersion": "7"},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}},
            "status": {"conditions": []}
        }))
        .unwrap();
        assert_eq!(o.meta().resource_version.as_deref(), Some("7"));
        assert!(palisade_policy::model::cluster_policy_from_api(&o.0).is_ok());
    }
}
