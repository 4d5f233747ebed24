//! Executing the real `palisade` CNI plugin as a container runtime does: the network config
//! derived from the agent's conflist on stdin, CNI_* in the environment, run inside the node's
//! network namespace, results cached for DEL.

use crate::cmd;
use crate::error::{LabError, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Interface name inside pods.
pub const POD_IFNAME: &str = "eth0";

/// Identity of one pod attachment, as a runtime passes it to CNI.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub node_netns: &'a str,
    pub container_id: &'a str,
    pub pod_netns_path: &'a Path,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
}

/// The network config of the first plugin of a conflist, as libcni hands it over: the plugin's own
/// keys plus the conflist's `name` and `cniVersion`.
pub fn plugin_config(conflist: &Value) -> Result<Value> {
    let name = conflist.get("name").cloned().unwrap_or(Value::Null);
    let version = conflist.get("cniVersion").cloned().unwrap_or(Value::Null);
    let mut plugin = conflist
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.first())
        .cloned()
        .ok_or_else(|| LabError::Parse {
            what: "conflist".into(),
            detail: "no plugins".into(),
        })?;
    let map = plugin.as_object_mut().ok_or_else(|| LabError::Parse {
        what: "conflist".into(),
        detail: "plugin is not an object".into(),
    })?;
    map.insert("name".into(), name);
    map.insert("cniVersion".into(), version);
    Ok(plugin)
}

/// Reads the conflist the agent wrote.
pub fn read_conflist(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(LabError::io(path))?;
    serde_json::from_str(&text).map_err(|e| LabError::Parse {
        what: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn command(plugin: &Path, cni_path: &Path, verb: &str, inv: &Invocation<'_>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", inv.node_netns])
        .arg(plugin)
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.pod_netns_path)
        .env("CNI_IFNAME", POD_IFNAME)
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                inv.pod_namespace, inv.pod_name, inv.container_id, inv.pod_uid
            ),
        );
    c
}

/// CNI ADD; returns the plugin's result.
pub fn add(plugin: &Path, cni_path: &Path, config: &Value, inv: &Invocation<'_>) -> Result<Value> {
    let stdin = serde_json::to_vec(config).map_err(|e| LabError::Parse {
        what: "CNI config".into(),
        detail: e.to_string(),
    })?;
    let out = cmd::output(command(plugin, cni_path, "ADD", inv), Some(&stdin)).map_err(|e| {
        LabError::Command {
            what: format!(
                "CNI ADD for pod {}/{} on {}",
                inv.pod_namespace, inv.pod_name, inv.node_netns
            ),
            detail: e.to_string(),
        }
    })?;
    serde_json::from_str(&out).map_err(|e| LabError::Parse {
        what: format!(
            "CNI ADD result for pod {}/{}",
            inv.pod_namespace, inv.pod_name
        ),
        detail: format!("{e}: {out}"),
    })
}

/// CNI DEL with the cached ADD result as `prevResult`.
pub fn del(
    plugin: &Path,
    cni_path: &Path,
    config: &Value,
    prev: Option<&Value>,
    inv: &Invocation<'_>,
) -> Result<()> {
    let mut config = config.clone();
    if let (Some(prev), Some(map)) = (prev, config.as_object_mut()) {
        map.insert("prevResult".into(), prev.clone());
    }
    let stdin = serde_json::to_vec(&config).map_err(|e| LabError::Parse {
        what: "CNI config".into(),
        detail: e.to_string(),
    })?;
    cmd::output(command(plugin, cni_path, "DEL", inv), Some(&stdin))
        .map(|_| ())
        .map_err(|e| LabError::Command {
            what: format!(
                "CNI DEL for pod {}/{} on {}",
                inv.pod_namespace, inv.pod_name, inv.node_netns
            ),
            detail: e.to_string(),
        })
}

/// Pod addresses of a CNI result (`ips[].address` without prefix length).
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_config_injects_name_and_version_from_the_conflist() {
        let conflist: Value = serde_json::json!({
            "cniVersion": "1.1.0", "name": "palisade",
            "plugins": [{"type": "palisade", "stateDir": "/s"}, {"type": "portmap"}]
        });
        let c = plugin_config(&conflist).unwrap();
        assert_eq!(c["name"], "palisade");
        assert_eq!(c["cniVersion"], "1.1.0");
        assert_eq!(c["type"], "palisade");
        assert_eq!(c["stateDir"], "/s");
    }

    #[test]
    fn result_ips_strip_prefix_lengths() {
        let r = serde_json::json!({"ips": [{"address": "10.244.1.2/32"}, {"address": "fd00:10:244:1::2/128"}]});
        let ips = result_ips(&r);
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.244.1.2");
    }
}
