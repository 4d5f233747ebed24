//! The synthetic cluster as Kubernetes objects: what the agent's manifest source reads, and (through
//! palisade-policy's converters) the `ClusterState` its compiler reads. So palisade and the baselines
//! consume the same input.

use super::workload::{Cluster, Direction, Labels, Namespace, Pod, Policy};
use crate::{Error, Result};
use palisade_policy::model::{Change, ClusterState};
use serde_json::{json, Value};

/// Underlay address of `node-<n>` (the lab's underlay is 10.250.0.0/24).
pub fn node_internal_ip(n: u32) -> String {
    format!("10.250.{}.{}", n / 256, n % 256)
}

fn pod_cidr(n: u32) -> String {
    let [a, b, c] = super::workload::node_pod_net(n);
    format!("{a}.{b}.{c}.0/24")
}

pub fn namespace(ns: &Namespace) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": ns.labels}})
}

pub fn node(n: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{n}")},
        "spec": {"podCIDR": pod_cidr(n), "podCIDRs": [pod_cidr(n)]},
        "status": {"addresses": [{"type": "InternalIP", "address": node_internal_ip(n)}]}
    })
}

/// Stable uid of a pod (the agent matches attachments by uid when both sides have one).
pub fn pod_uid(pod: &Pod) -> String {
    format!("{:016x}", super::fnv1a(&pod.key()))
}

pub fn pod(pod: &Pod) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels, "uid": pod_uid(pod)},
        "spec": {"nodeName": pod.node, "containers": [{"name": "c", "image": "none"}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}
    })
}

fn selector(labels: &Labels) -> Value {
    json!({"matchLabels": labels})
}

pub fn policy(p: &Policy) -> Value {
    let peers: Vec<Value> = p
        .peers
        .iter()
        .map(|peer| {
            let mut v = json!({"podSelector": selector(&peer.pod_selector)});
            if let Some(ns) = &peer.namespace_selector {
                v["namespaceSelector"] = selector(ns);
            }
            v
        })
        .collect();
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|port| json!({"protocol": "TCP", "port": port}))
        .collect();
    let (types, rules) = match p.direction {
        Direction::Ingress => (
            "Ingress",
            json!({"ingress": [{"from": peers, "ports": ports}]}),
        ),
        Direction::Egress => ("Egress", json!({"egress": [{"to": peers, "ports": ports}]})),
    };
    let mut spec = json!({"podSelector": selector(&p.pod_selector), "policyTypes": [types]});
    if let (Some(s), Some(r)) = (spec.as_object_mut(), rules.as_object()) {
        s.extend(r.clone());
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": p.name, "namespace": p.namespace},
        "spec": spec
    })
}

/// Every object of the cluster: namespaces, nodes, pods, policies.
pub fn objects(cluster: &Cluster) -> Vec<Value> {
    let mut out: Vec<Value> = cluster.namespaces.iter().map(namespace).collect();
    out.extend((1..=cluster.nodes).map(node));
    out.extend(cluster.pods.iter().map(pod));
    out.extend(cluster.policies.iter().map(policy));
    out.extend(cluster.cluster_policies.iter().cloned());
    out
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| Error::Parse {
        what: what.into(),
        detail: e.to_string(),
    })
}

fn model_err(e: impl std::fmt::Display) -> Error {
    Error::Parse {
        what: "synthetic object".into(),
        detail: e.to_string(),
    }
}

/// One object as a compiler change.
pub fn change(v: &Value) -> Result<Change> {
    use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
    Ok(match v["kind"].as_str() {
        Some("Namespace") => Change::UpsertNamespace(
            palisade_policy::namespace_from_k8s(&parse::<core::Namespace>(v, "Namespace")?)
                .map_err(model_err)?,
        ),
        Some("Node") => Change::UpsertNode(
            palisade_policy::node_from_k8s(&parse::<core::Node>(v, "Node")?).map_err(model_err)?,
        ),
        Some("Pod") => Change::UpsertPod(
            palisade_policy::pod_from_k8s(&parse::<core::Pod>(v, "Pod")?)
                .map_err(model_err)?
                .into(),
        ),
        Some("NetworkPolicy") => Change::UpsertPolicy(
            palisade_policy::policy_from_k8s(&parse::<net::NetworkPolicy>(v, "NetworkPolicy")?)
                .map_err(model_err)?,
        ),
        Some("ClusterNetworkPolicy") => Change::UpsertClusterPolicy(
            palisade_policy::model::cluster_policy_from_api(&parse(v, "ClusterNetworkPolicy")?)
                .map_err(model_err)?,
        ),
        other => return Err(Error::Invalid(format!("unexpected kind {other:?}"))),
    })
}

/// The cluster as palisade-policy's state.
pub fn cluster_state(cluster: &Cluster) -> Result<ClusterState> {
    let mut state = ClusterState::default();
    for v in objects(cluster) {
        state.apply(change(&v)?);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_synthetic_object_converts_and_the_compiler_isolates_the_measured_server() {
        let cluster = Cluster::generate(100, 5).unwrap();
        let state = cluster_state(&cluster).unwrap();
        assert_eq!(state.policies.len(), 100);
        assert_eq!(state.pods.len(), cluster.pods.len());
        let compiled = palisade_policy::compile(&state, "node-2");
        let server = compiled
            .local_pod_by_ip("10.244.2.10".parse().unwrap())
            .unwrap();
        assert_eq!(
            server
                .policies(palisade_policy::model::Direction::Ingress)
                .len(),
            4
        );
    }
}
