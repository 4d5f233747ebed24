//! Executing the agent's conflist as a container runtime does (libcni): every plugin of the chain
//! in order on ADD, each with the previous plugin's result as `prevResult` and the runtime's
//! capability arguments (`portMappings`, `ips`) as `runtimeConfig` for the capabilities it declares;
//! DEL in reverse order, each plugin with the cached final result. Each plugin is found by its
//! `type` in `CNI_PATH` (the lab's binaries, then the system's CNI plugins, for `portmap`) and run
//! inside the node's network namespace.

use crate::cmd;
use crate::error::{LabError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Interface name inside pods.
pub const POD_IFNAME: &str = "eth0";
/// Where Debian's containernetworking-plugins (portmap, ...) live; searched after the lab's binaries.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
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
    fn capability_args(&self) -> Map<String, Value> {
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
        m
    }
}

/// A conflist as libcni loads it: its name, the version it hands every plugin, the plugins.
#[derive(Debug, Clone)]
pub struct Chain {
    pub name: String,
    /// The top-level `cniVersion`: what libcni before 1.2 (containerd 1.6/1.7) hands every plugin,
    /// and what Debian's portmap 1.1.1 speaks (see ARCHITECTURE.md, "Conflist").
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

impl Chain {
    /// Validates what libcni insists on: a name, a version, at least one plugin, each an object
    /// with a `type`.
    pub fn from_conflist(conflist: &Value) -> Result<Chain> {
        let bad = |detail: String| LabError::Parse {
            what: "conflist".into(),
            detail,
        };
        let name = conflist
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no name".into()))?;
        let cni_version = conflist
            .get("cniVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no cniVersion".into()))?;
        let plugins = conflist
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("no plugins".into()))?;
        for (i, p) in plugins.iter().enumerate() {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(bad(format!("plugins[{i}] has no type")));
            }
        }
        Ok(Chain {
            name: name.to_string(),
            cni_version: cni_version.to_string(),
            plugins: plugins.clone(),
        })
    }

    /// `type` of plugin `i`.
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins
            .get(i)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// Whether some plugin declares `capability` (`"capabilities": {"ips": true}`).
    pub fn declares(&self, capability: &str) -> bool {
        self.plugins.iter().any(|p| declares(p, capability))
    }

    /// The stdin of plugin `i`, as libcni's `buildOneConfig` makes it: the entry with `name` and
    /// `cniVersion` injected, `prevResult` when given, and `runtimeConfig` holding the runtime's
    /// capability args for exactly the capabilities this plugin declares (none: no key).
    pub fn plugin_stdin(
        &self,
        i: usize,
        prev: Option<&Value>,
        args: &RuntimeArgs,
    ) -> Result<Value> {
        let entry = self.plugins.get(i).ok_or_else(|| {
            LabError::Invalid(format!("conflist {} has no plugin {i}", self.name))
        })?;
        let mut conf = entry.as_object().cloned().ok_or_else(|| LabError::Parse {
            what: "conflist".into(),
            detail: format!("plugins[{i}] is not an object"),
        })?;
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut runtime = Map::new();
        for (cap, value) in args.capability_args() {
            if declares(entry, &cap) {
                runtime.insert(cap, value);
            }
        }
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Ok(Value::Object(conf))
    }
}

fn declares(plugin: &Value, capability: &str) -> bool {
    plugin
        .get("capabilities")
        .and_then(|c| c.get(capability))
        .and_then(Value::as_bool)
        == Some(true)
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

/// The executable of plugin type `kind`: the first `CNI_PATH` directory holding it, as libcni
/// looks it up.
pub fn find_plugin(kind: &str, path: &[PathBuf]) -> Result<PathBuf> {
    if kind.contains('/') || kind == "." || kind == ".." {
        return Err(LabError::Invalid(format!(
            "plugin type {kind:?} is not a file name"
        )));
    }
    path.iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            LabError::Invalid(format!(
                "CNI plugin {kind:?} not found in CNI_PATH {}: build the workspace's binaries, and for portmap install containernetworking-plugins (scripts/setup.sh)",
                join_path(path)
            ))
        })
}

fn join_path(path: &[PathBuf]) -> String {
    path.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

fn command(
    plugin: &Path,
    cni_path: &[PathBuf],
    verb: &str,
    inv: &Invocation<'_>,
    extra_args: &str,
) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", inv.node_netns])
        .arg(plugin)
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.pod_netns_path)
        .env("CNI_IFNAME", POD_IFNAME)
        .env("CNI_PATH", join_path(cni_path))
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}{extra_args}",
                inv.pod_namespace, inv.pod_name, inv.container_id, inv.pod_uid
            ),
        );
    c
}

/// `CNI_ARGS` beyond the pod identity: requested addresses go as host-local's `IP=` when no plugin
/// of the chain declares the `ips` capability (libcni would drop the capability arg then).
fn extra_cni_args(chain: &Chain, args: &RuntimeArgs) -> String {
    if args.ips.is_empty() || chain.declares(CAP_IPS) {
        return String::new();
    }
    let ips: Vec<String> = args.ips.iter().map(IpAddr::to_string).collect();
    format!(";IP={}", ips.join(","))
}

fn run_plugin(
    chain: &Chain,
    i: usize,
    verb: &str,
    stdin: &Value,
    cni_path: &[PathBuf],
    args: &RuntimeArgs,
    inv: &Invocation<'_>,
) -> Result<String> {
    let kind = chain.plugin_type(i);
    let what = || {
        format!(
            "CNI {verb} of plugin {kind} ({}/{}) for pod {}/{} on {}",
            i + 1,
            chain.plugins.len(),
            inv.pod_namespace,
            inv.pod_name,
            inv.node_netns
        )
    };
    let plugin = find_plugin(kind, cni_path).map_err(|e| LabError::Command {
        what: what(),
        detail: e.to_string(),
    })?;
    let input = serde_json::to_vec(stdin).map_err(|e| LabError::Parse {
        what: what(),
        detail: e.to_string(),
    })?;
    let c = command(&plugin, cni_path, verb, inv, &extra_cni_args(chain, args));
    cmd::output(c, Some(&input)).map_err(|e| LabError::Command {
        what: what(),
        detail: e.to_string(),
    })
}

/// CNI ADD of the whole chain; returns the final result (what libcni caches for DEL). On failure
/// the error names the plugin; the caller runs [`del`] as a runtime tears a failed sandbox down.
pub fn add(
    chain: &Chain,
    cni_path: &[PathBuf],
    args: &RuntimeArgs,
    inv: &Invocation<'_>,
) -> Result<Value> {
    let mut prev: Option<Value> = None;
    for i in 0..chain.plugins.len() {
        let stdin = chain.plugin_stdin(i, prev.as_ref(), args)?;
        let out = run_plugin(chain, i, "ADD", &stdin, cni_path, args, inv)?;
        let result: Value = serde_json::from_str(&out).map_err(|e| LabError::Parse {
            what: format!(
                "CNI ADD result of plugin {} for pod {}/{}",
                chain.plugin_type(i),
                inv.pod_namespace,
                inv.pod_name
            ),
            detail: format!("{e}: {out}"),
        })?;
        prev = Some(result);
    }
    prev.ok_or_else(|| LabError::Invalid(format!("conflist {} has no plugins", chain.name)))
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
    let mut errors = Vec::new();
    for i in (0..chain.plugins.len()).rev() {
        let r = chain
            .plugin_stdin(i, cached, args)
            .and_then(|stdin| run_plugin(chain, i, "DEL", &stdin, cni_path, args, inv));
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown(errors))
    }
}

/// Pod addresses of a CNI result (`ips[].address` without prefix length).
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
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
    use serde_json::json;

    fn conflist() -> Value {
        json!({
            "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "palisade",
            "plugins": [
                {"type": "palisade", "stateDir": "/s"},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        })
    }

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

    #[test]
    fn each_plugin_gets_name_top_level_version_and_only_the_previous_result() {
        let chain = Chain::from_conflist(&conflist()).unwrap();
        let first = chain.plugin_stdin(0, None, &http()).unwrap();
        assert_eq!(first["name"], "palisade");
        assert_eq!(
            first["cniVersion"], "1.0.0",
            "libcni < 1.2 hands the top-level version"
        );
        assert_eq!(first["stateDir"], "/s");
        assert!(first.get("prevResult").is_none());
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/32"}]});
        let second = chain.plugin_stdin(1, Some(&prev), &http()).unwrap();
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["snat"], true);
    }

    #[test]
    fn runtime_config_carries_only_the_capabilities_a_plugin_declares() {
        let chain = Chain::from_conflist(&conflist()).unwrap();
        let mut args = http();
        args.ips = vec!["10.244.1.9".parse().unwrap()];
        let palisade = chain.plugin_stdin(0, None, &args).unwrap();
        assert!(
            palisade.get("runtimeConfig").is_none(),
            "palisade declares no capability: {palisade}"
        );
        let portmap = chain.plugin_stdin(1, None, &args).unwrap();
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
        );
        // A pod without hostPorts: containerd still passes an empty list.
        let none = chain
            .plugin_stdin(1, None, &RuntimeArgs::default())
            .unwrap();
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
        let undeclared = Chain::from_conflist(&conflist()).unwrap();
        assert_eq!(
            extra_cni_args(&undeclared, &args),
            ";IP=10.244.1.9,fd00:10:244:1::9"
        );
        let mut c = conflist();
        c["plugins"][0]["capabilities"] = json!({"ips": true});
        let declared = Chain::from_conflist(&c).unwrap();
        assert_eq!(extra_cni_args(&declared, &args), "");
        let stdin = declared.plugin_stdin(0, None, &args).unwrap();
        assert_eq!(
            stdin["runtimeConfig"]["ips"],
            json!(["10.244.1.9", "fd00:10:244:1::9"])
        );
        assert_eq!(extra_cni_args(&undeclared, &RuntimeArgs::default()), "");
    }

    #[test]
    fn conflists_libcni_would_refuse_are_refused() {
        assert!(
            Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}))
                .is_err()
        );
        assert!(Chain::from_conflist(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"mtu": 1}]})
        )
        .is_err());
        assert!(
            Chain::from_conflist(&json!({"cniVersion": "1.0.0", "plugins": [{"type": "a"}]}))
                .is_err()
        );
        assert!(Chain::from_conflist(&json!({"name": "n", "plugins": [{"type": "a"}]})).is_err());
    }

    #[test]
    fn plugins_are_found_in_cni_path_order_and_never_outside_it() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-path-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("portmap"), "").unwrap();
        std::fs::write(b.join("portmap"), "").unwrap();
        std::fs::write(b.join("bridge"), "").unwrap();
        let path = vec![a.clone(), b.clone()];
        assert_eq!(find_plugin("portmap", &path).unwrap(), a.join("portmap"));
        assert_eq!(find_plugin("bridge", &path).unwrap(), b.join("bridge"));
        let missing = find_plugin("flannel", &path).unwrap_err().to_string();
        assert!(
            missing.contains("flannel") && missing.contains(&a.display().to_string()),
            "{missing}"
        );
        assert!(find_plugin("../b/bridge", &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn result_ips_strip_prefix_lengths() {
        let r = json!({"ips": [{"address": "10.244.1.2/32"}, {"address": "fd00:10:244:1::2/128"}]});
        let ips = result_ips(&r);
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.244.1.2");
    }

    /// A node namespace for the chain tests, deleted on drop (also on panic).
    struct TestNetns(String);
    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = crate::netns::delete(&self.0);
        }
    }

    /// A fake plugin: records `<verb> <type>` in `seq`, its stdin in `<verb>-<type>.json`, and
    /// answers a result naming itself (or fails with a CNI error).
    fn fake_plugin(dir: &Path, kind: &str, fail_add: bool) {
        use std::os::unix::fs::PermissionsExt;
        let log = dir.join("log");
        let fail = if fail_add {
            "if [ \"$CNI_COMMAND\" = ADD ]; then echo '{\"code\":7,\"msg\":\"broken on purpose\"}'; exit 1; fi\n"
        } else {
            ""
        };
        let script = format!(
            "#!/bin/sh\necho \"$CNI_COMMAND {kind} $CNI_ARGS\" >> {log}/seq\ncat > {log}/$CNI_COMMAND-{kind}.json\n{fail}echo '{{\"cniVersion\":\"1.0.0\",\"by\":\"{kind}\",\"ips\":[{{\"address\":\"10.9.0.2/32\"}}]}}'\n",
            log = log.display()
        );
        let p = dir.join("bin").join(kind);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn read_json(p: PathBuf) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }

    /// Needs root (a network namespace, as the plugins run inside the node's).
    #[test]
    fn add_runs_the_chain_in_order_and_del_in_reverse_with_the_cached_result() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-chain-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        fake_plugin(&dir, "first", false);
        fake_plugin(&dir, "second", false);
        fake_plugin(&dir, "broken", true);
        let ns = TestNetns(format!("pl-cnitest{}", std::process::id()));
        crate::netns::create(&ns.0).expect("create a netns (run as root)");
        let path = vec![dir.join("bin")];
        let pod_netns = crate::netns::path(&ns.0);
        let inv = Invocation {
            node_netns: &ns.0,
            container_id: "c1",
            pod_netns_path: &pod_netns,
            pod_namespace: "x",
            pod_name: "p",
            pod_uid: "u",
        };
        let chain = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "first"}, {"type": "second", "capabilities": {"portMappings": true}}
        ]}))
        .unwrap();
        let result = add(&chain, &path, &http(), &inv).unwrap();
        assert_eq!(
            result["by"], "second",
            "the chain's result is the last plugin's"
        );
        assert_eq!(
            read_json(dir.join("log/ADD-second.json"))["prevResult"]["by"],
            "first"
        );
        assert_eq!(
            read_json(dir.join("log/ADD-second.json"))["runtimeConfig"]["portMappings"][0]
                ["hostPort"],
            18080
        );
        del(&chain, &path, &http(), Some(&result), &inv).unwrap();
        for kind in ["first", "second"] {
            let stdin = read_json(dir.join(format!("log/DEL-{kind}.json")));
            assert_eq!(
                stdin["prevResult"]["by"], "second",
                "{kind} DEL gets the cached result"
            );
        }
        let seq = std::fs::read_to_string(dir.join("log/seq")).unwrap();
        let order: Vec<String> = seq
            .lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            order,
            ["ADD first", "ADD second", "DEL second", "DEL first"]
        );
        assert!(seq.contains("K8S_POD_NAMESPACE=x;K8S_POD_NAME=p"), "{seq}");

        // A broken link fails ADD, naming the plugin and its message.
        let broken = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "first"}, {"type": "broken"}
        ]}))
        .unwrap();
        let e = add(&broken, &path, &RuntimeArgs::default(), &inv)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plugin broken (2/2)") && e.contains("broken on purpose"),
            "{e}"
        );
        // A plugin missing from CNI_PATH fails too.
        let missing =
            Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "first"}, {"type": "nowhere"}
            ]}))
            .unwrap();
        let e = add(&missing, &path, &RuntimeArgs::default(), &inv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nowhere\" not found in CNI_PATH"), "{e}");
        drop(ns);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
