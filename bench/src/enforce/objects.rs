//! The objects a run writes for the agent to see (the client pod, the policies that allow or deny
//! it) and the manifest-file writes that timestamp a change.

use super::*;

/// Writes `name` into the manifest directory atomically (dotfile + rename); returns the monotonic
/// time just before the rename, which is when the change becomes visible.
pub fn write_manifest(dir: &Path, name: &str, doc: &Value) -> Result<u64> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_vec(doc).map_err(|e| Error::Parse {
        what: "manifest".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    let t = mono_ns();
    std::fs::rename(&tmp, dir.join(name))
        .map_err(io_err(format!("renaming into {}", dir.display())))?;
    Ok(t)
}

/// Removes `name` from the manifest directory; returns the monotonic time just before the unlink.
pub fn remove_manifest(dir: &Path, name: &str) -> Result<u64> {
    let t = mono_ns();
    std::fs::remove_file(dir.join(name)).map_err(io_err(format!("removing {name}")))?;
    Ok(t)
}

pub(super) fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The measured client pod object, with or without the `access=yes` label.
pub(super) fn client_pod(access: bool) -> Value {
    let mut labels = json!({"app": "client"});
    if access {
        labels["access"] = json!("yes");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "bench", "labels": labels, "uid": "bench-client"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "none"}]},
        "status": {"phase": "Running", "podIP": CLIENT_IP, "podIPs": [{"ip": CLIENT_IP}]}
    })
}

/// A policy on the server admitting pods matching `from` on the probe port.
pub(super) fn allow_policy(name: &str, from: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": from}}], "ports": [{"protocol": "TCP", "port": PROBE_PORT}]}]}
    })
}

/// A policy on the server admitting the client on the stream port (the measured established flow).
pub(super) fn allow_stream_policy() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-stream", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"protocol": "TCP", "port": STREAM_PORT}]}]}
    })
}

/// An Admin-tier ClusterNetworkPolicy on the server whose one rule does `action` to the client on
/// the probe port.
pub(super) fn admin_client_policy(name: &str, action: &str, priority: u32) -> Value {
    let bench = json!({"matchLabels": {"kubernetes.io/metadata.name": "bench"}});
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": priority,
                 "subject": {"pods": {"namespaceSelector": bench, "podSelector": {"matchLabels": {"app": "server"}}}},
                 "ingress": [{"name": "client", "action": action,
                              "from": [{"pods": {"namespaceSelector": bench, "podSelector": {"matchLabels": {"app": "client"}}}}],
                              "protocols": [{"tcp": {"destinationPort": {"number": PROBE_PORT}}}]}]}
    })
}

/// The server's default deny (always present): the server is ingress-isolated.
pub(super) fn server_deny() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-deny", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}
    })
}

pub(super) const F_CLUSTER: &str = "00-cluster.json";

pub(super) const F_DENY: &str = "05-server-deny.json";

pub(super) const F_CLIENT: &str = "10-client.json";

pub(super) const F_ALLOW: &str = "60-allow.json";

pub(super) const F_ALLOW_LABEL: &str = "61-allow-access.json";

pub(super) const F_ALLOW_STREAM: &str = "62-allow-stream.json";

pub(super) const F_CNP_DENY: &str = "70-cnp-deny-client.json";

pub(super) const F_CNP_ACCEPT: &str = "71-cnp-accept-client.json";
