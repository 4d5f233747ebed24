//! Executing the agent's conflist as a container runtime does (libcni): every plugin of the chain
//! in order on ADD, each with the previous plugin's result as `prevResult` and the runtime's
//! capability arguments (`portMappings`, `ips`) as `runtimeConfig` for the capabilities it declares;
//! DEL in reverse order, each plugin with the cached final result. Each plugin is found by its
//! `type` in `CNI_PATH` (the lab's binaries, then the system's CNI plugins, for `portmap`) and run
//! inside the node's network namespace.
//!
//! The chain itself is testkit's [`libcni`] (one mini-libcni for the CNI black-box tests and the
//! lab); this module adds what is the lab's: its runtime arguments and pod identity, its
//! `CNI_PATH`, and its errors.

use crate::error::{LabError, Result};
use palisade_testkit::libcni::{self, Attachment, Runner, StepError};
pub use palisade_testkit::libcni::{result_ips, POD_IFNAME};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// Where Debian's containernetworking-plugins (portmap, ...) live; searched after the lab's binaries.
pub const SYSTEM_CNI_DIR: &str = libcni::SYSTEM_PLUGIN_DIR;
/// Capability key of host port mappings (portmap).
pub const CAP_PORT_MAPPINGS: &str = "portMappings";
/// Capability key of requested addresses (CNI conventions; the palisade plugin reads it).
pub const CAP_IPS: &str = "ips";

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

/// One `hostPort` as the CRI hands it to CNI (`runtimeConfig.portMappings[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// Lowercase, as containerd passes it: `tcp`, `udp`, `sctp`.
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// What the runtime asks of the network besides the attachment itself (libcni's
/// `CapabilityArgs`), kept in the lab state so DEL gets the same as ADD (as containerd does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeArgs {
    /// Always passed (empty for a pod without hostPorts), as containerd's CRI does.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// Requested pod addresses; passed only when non-empty.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl RuntimeArgs {
    /// libcni's `CapabilityArgs` map.
    fn capability_args(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            CAP_PORT_MAPPINGS.into(),
            serde_json::to_value(&self.port_mappings).unwrap_or(Value::Array(Vec::new())),
        );
        if !self.ips.is_empty() {
            m.insert(
                CAP_IPS.into(),
                Value::Array(
                    self.ips
                        .iter()
                        .map(|ip| Value::String(ip.to_string()))
                        .collect(),
                ),
            );
        }
        Value::Object(m)
    }
}

/// A conflist as libcni loads it (testkit's [`libcni::Chain`]: name, top-level version, plugins),
/// refused with the lab's errors.
#[derive(Debug, Clone)]
pub struct Chain(pub libcni::Chain);

impl Chain {
    /// Validates what libcni insists on: a name, a version, at least one plugin, each an object
    /// with a `type`.
    pub fn from_conflist(conflist: &Value) -> Result<Chain> {
        libcni::Chain::from_conflist(conflist)
            .map(Chain)
            .map_err(LabError::from)
    }
}

impl Deref for Chain {
    type Target = libcni::Chain;
    fn deref(&self) -> &libcni::Chain {
        &self.0
    }
}

/// What to do about a plugin missing from the lab's `CNI_PATH`.
const MISSING_PLUGIN_HINT: &str =
    "build the workspace's binaries, and for portmap install containernetworking-plugins (scripts/setup.sh)";

/// The detail of a libcni error, with the lab's hint where the fix is the lab user's.
fn detail(e: &libcni::Error) -> String {
    match e {
        libcni::Error::NotFound { .. } => format!("{e}: {MISSING_PLUGIN_HINT}"),
        _ => e.to_string(),
    }
}

impl From<libcni::Error> for LabError {
    fn from(e: libcni::Error) -> LabError {
        match e {
            libcni::Error::Conflist(detail) => LabError::Parse {
                what: "conflist".into(),
                detail,
            },
            libcni::Error::BadType(_) | libcni::Error::NotFound { .. } => {
                LabError::Invalid(detail(&e))
            }
            libcni::Error::Exec { ref plugin, .. } => LabError::Command {
                what: format!("CNI plugin {plugin}"),
                detail: detail(&e),
            },
            libcni::Error::Plugin(ref p) => LabError::Command {
                what: format!("CNI plugin {}", p.plugin),
                detail: detail(&e),
            },
        }
    }
}

/// A failed step of the chain, naming the verb, the plugin, its place, the pod and the node.
fn step_error(e: StepError, inv: &Invocation<'_>) -> LabError {
    LabError::Command {
        what: format!(
            "CNI {} of plugin {} ({}/{}) for pod {}/{} on {}",
            e.verb, e.plugin, e.position, e.count, inv.pod_namespace, inv.pod_name, inv.node_netns
        ),
        detail: detail(&e.error),
    }
}

/// Reads the conflist the agent wrote.
pub fn read_conflist(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(LabError::io(path))?;
    serde_json::from_str(&text).map_err(|e| LabError::Parse {
        what: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Directories (`:`-separated) searched for the chained plugins after the lab's binaries, instead
/// of [`SYSTEM_CNI_DIR`] (e.g. `/opt/cni/bin` where the upstream plugin tarball is unpacked).
pub const CNI_PATH_ENV: &str = "PALISADE_LAB_CNI_PATH";

/// `CNI_PATH` of the lab's runtime: the lab's binaries (the `palisade` plugin), then
/// `$PALISADE_LAB_CNI_PATH` or [`SYSTEM_CNI_DIR`].
pub fn cni_path(bin_dir: &Path) -> Vec<PathBuf> {
    let mut path = vec![bin_dir.to_path_buf()];
    match std::env::var_os(CNI_PATH_ENV) {
        Some(dirs) => {
            path.extend(std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()))
        }
        None => path.push(PathBuf::from(SYSTEM_CNI_DIR)),
    }
    path
}

/// The attachment as the runtime passes it: the pod identity in `CNI_ARGS`, the runtime args as
/// capability args. Requested addresses go as host-local's `IP=` when no plugin of the chain
/// declares the `ips` capability (libcni would drop the capability arg then).
fn attachment(chain: &Chain, args: &RuntimeArgs, inv: &Invocation<'_>) -> Attachment {
    let mut att = Attachment::new(inv.container_id, &inv.pod_netns_path.display().to_string()).pod(
        inv.pod_namespace,
        inv.pod_name,
        inv.pod_uid,
    );
    if !args.ips.is_empty() && !chain.declares(CAP_IPS) {
        let ips: Vec<String> = args.ips.iter().map(IpAddr::to_string).collect();
        att.args.push(("IP".into(), ips.join(",")));
    }
    att.capability_args = args.capability_args();
    att
}

/// CNI ADD of the whole chain; returns the final result (what libcni caches for DEL). On failure
/// the error names the plugin; the caller runs [`del`] as a runtime tears a failed sandbox down.
pub fn add(
    chain: &Chain,
    cni_path: &[PathBuf],
    args: &RuntimeArgs,
    inv: &Invocation<'_>,
) -> Result<Value> {
    Runner::new(inv.node_netns, cni_path.to_vec())
        .add(chain, &attachment(chain, args, inv))
        .map_err(|e| step_error(e, inv))
}

/// CNI DEL of the whole chain in reverse order, each plugin with the cached final ADD result as
/// `prevResult` and the same runtime args as ADD. Unlike libcni it goes on past a failing plugin
/// (a lab teardown should remove all it can) and reports every failure.
pub fn del(
    chain: &Chain,
    cni_path: &[PathBuf],
    args: &RuntimeArgs,
    cached: Option<&Value>,
    inv: &Invocation<'_>,
) -> Result<()> {
    let errors: Vec<String> = Runner::new(inv.node_netns, cni_path.to_vec())
        .del_all(chain, &attachment(chain, args, inv), cached)
        .into_iter()
        .map(|e| step_error(e, inv).to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_testkit::libcni::{example_conflist, FakePlugins};
    use serde_json::json;

    fn http() -> RuntimeArgs {
        RuntimeArgs {
            port_mappings: vec![PortMapping {
                host_port: 18080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: None,
            }],
            ips: Vec::new(),
        }
    }

    fn inv<'a>(node: &'a str, pod_netns: &'a Path) -> Invocation<'a> {
        Invocation {
            node_netns: node,
            container_id: "c1",
            pod_netns_path: pod_netns,
            pod_namespace: "x",
            pod_name: "p",
            pod_uid: "u",
        }
    }

    #[test]
    fn runtime_config_carries_only_the_capabilities_a_plugin_declares() {
        let chain = Chain::from_conflist(&example_conflist()).unwrap();
        let mut args = http();
        args.ips = vec!["10.244.1.9".parse().unwrap()];
        let palisade = chain.plugin_stdin(0, None, &args.capability_args());
        assert!(
            palisade.get("runtimeConfig").is_none(),
            "palisade declares no capability: {palisade}"
        );
        let portmap = chain.plugin_stdin(1, None, &args.capability_args());
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
        );
        // A pod without hostPorts: containerd still passes an empty list.
        let none = chain.plugin_stdin(1, None, &RuntimeArgs::default().capability_args());
        assert_eq!(none["runtimeConfig"], json!({"portMappings": []}));
    }

    #[test]
    fn requested_ips_go_as_the_ips_capability_when_declared_else_as_cni_args_ip() {
        let args = RuntimeArgs {
            port_mappings: Vec::new(),
            ips: vec![
                "10.244.1.9".parse().unwrap(),
                "fd00:10:244:1::9".parse().unwrap(),
            ],
        };
        let netns = PathBuf::from("/run/netns/pod");
        let inv = inv("node", &netns);
        let identity =
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u";
        let undeclared = Chain::from_conflist(&example_conflist()).unwrap();
        assert_eq!(
            attachment(&undeclared, &args, &inv).cni_args(),
            format!("{identity};IP=10.244.1.9,fd00:10:244:1::9")
        );
        let mut c = example_conflist();
        c["plugins"][0]["capabilities"] = json!({"ips": true});
        let declared = Chain::from_conflist(&c).unwrap();
        let att = attachment(&declared, &args, &inv);
        assert_eq!(att.cni_args(), identity);
        let stdin = declared.plugin_stdin(0, None, &att.capability_args);
        assert_eq!(
            stdin["runtimeConfig"]["ips"],
            json!(["10.244.1.9", "fd00:10:244:1::9"])
        );
        assert_eq!(
            attachment(&undeclared, &RuntimeArgs::default(), &inv).cni_args(),
            identity
        );
    }

    #[test]
    fn conflists_libcni_would_refuse_are_parse_errors() {
        let e = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}))
            .unwrap_err();
        assert!(
            matches!(&e, LabError::Parse { what, .. } if what == "conflist"),
            "{e}"
        );
    }

    /// Needs root (a network namespace, as the plugins run inside the node's).
    #[test]
    fn the_chain_runs_with_the_pods_args_and_failures_name_plugin_pod_and_node() {
        let node = palisade_testkit::Netns::new("pl-labcni");
        let pod_netns = node.path();
        let inv = inv(node.name(), &pod_netns);
        // Fakes standing in for the agent's chain (palisade, then portmap), and a broken one.
        let fakes = FakePlugins::new();
        for (kind, fail_add) in [("palisade", false), ("portmap", false), ("broken", true)] {
            fakes.plugin(kind, fail_add);
        }
        let path = vec![fakes.bin_dir()];
        let chain = Chain::from_conflist(&example_conflist()).unwrap();
        let result = add(&chain, &path, &http(), &inv).unwrap();
        assert_eq!(result["by"], "portmap");
        assert_eq!(
            fakes.stdin("ADD", "portmap")["runtimeConfig"]["portMappings"][0]["hostPort"],
            18080
        );
        del(&chain, &path, &http(), Some(&result), &inv).unwrap();
        assert_eq!(
            fakes.calls(),
            ["ADD palisade", "ADD portmap", "DEL portmap", "DEL palisade"]
        );
        assert_eq!(
            fakes.stdin("DEL", "portmap")["runtimeConfig"]["portMappings"][0]["hostPort"],
            18080,
            "DEL gets the runtime args of ADD"
        );
        // A broken link fails ADD, naming the plugin, its place, the pod and its message.
        let broken = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "palisade"}, {"type": "broken"}
        ]}))
        .unwrap();
        let e = add(&broken, &path, &RuntimeArgs::default(), &inv)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plugin broken (2/2) for pod x/p") && e.contains("broken on purpose"),
            "{e}"
        );
        // A plugin missing from CNI_PATH fails too, with what to do about it; DEL goes on past it.
        let missing =
            Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "palisade"}, {"type": "nowhere"}
            ]}))
            .unwrap();
        let e = add(&missing, &path, &RuntimeArgs::default(), &inv)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"nowhere\" not found in CNI_PATH") && e.contains("scripts/setup.sh"),
            "{e}"
        );
        let e = del(&missing, &path, &RuntimeArgs::default(), None, &inv).unwrap_err();
        assert!(
            matches!(&e, LabError::Teardown(errors) if errors.len() == 1),
            "{e}"
        );
        assert_eq!(fakes.calls().last().unwrap(), "DEL palisade");
    }
}
