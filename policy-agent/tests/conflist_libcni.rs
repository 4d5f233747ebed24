//! The conflist the agent writes, read as libcni reads it (network name rule, `cniVersions`
//! choice, the stdin each chained plugin gets), and handed to Debian's real `portmap` plugin
//! (containernetworking-plugins 1.1.1, spec <= 1.0.0) inside namespaces of our own (root).

use palisade_agent::cniconf::{render, ConflistParams, PORTMAP_TYPE};
use palisade_contract::{NETWORK_NAME, PLUGIN_TYPE};
use palisade_testkit::libcni::Chain;
use palisade_testkit::Netns;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A dual-stack node's conflist parameters.
fn dual_stack() -> ConflistParams {
    ConflistParams {
        pod_cidrs: vec![
            "10.244.1.0/24".parse().expect("cidr"),
            "fd00:10:244:1::/64".parse().expect("cidr"),
        ],
        mtu: 1500,
        state_dir: PathBuf::from("/var/lib/palisade"),
        ipam_data_dir: PathBuf::from("/var/lib/cni/networks"),
        fail_open: false,
    }
}

/// libcni's network name rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn libcni_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn semver(v: &str) -> (u64, u64, u64) {
    let parts: Vec<u64> = v
        .split('.')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("bad version {v}")))
        .collect();
    assert_eq!(parts.len(), 3, "libcni wants x.y.z, got {v}");
    (parts[0], parts[1], parts[2])
}

/// libcni's NetworkConfFromBytes checks and version choice, for a libcni whose own spec
/// version is `current`; returns the chosen version and the plugin configs as libcni keeps them.
fn libcni_load(text: &str, current: &str) -> Result<(String, Vec<Value>), String> {
    let raw: Value = serde_json::from_str(text).map_err(|e| format!("parse: {e}"))?;
    let name = raw["name"].as_str().ok_or("no name")?;
    if !libcni_valid_name(name) {
        return Err(format!("invalid network name {name:?}"));
    }
    let mut version = match raw.get("cniVersion") {
        None => String::new(),
        Some(v) => v.as_str().ok_or("invalid cniVersion type")?.to_string(),
    };
    if let Some(list) = raw.get("cniVersions") {
        let list = list.as_array().ok_or("invalid type for cniVersions")?;
        let mut vs = Vec::new();
        for v in list {
            let v = v.as_str().ok_or("invalid cniVersions entry")?;
            if semver(v) <= semver(current) {
                vs.push(v.to_string());
            }
        }
        if !version.is_empty() && semver(&version) <= semver(current) {
            vs.push(version.clone());
        }
        vs.sort_by_key(|v| semver(v));
        if let Some(highest) = vs.last() {
            version = highest.clone();
        }
    }
    let plugins = raw["plugins"].as_array().ok_or("invalid 'plugins' type")?;
    if plugins.is_empty() {
        return Err("no plugins in list".into());
    }
    for p in plugins {
        match p.get("type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => {}
            _ => return Err("missing 'type'".into()),
        }
    }
    Ok((version, plugins.clone()))
}

#[test]
fn libcni_accepts_the_dual_stack_conflist_and_picks_1_1_0() {
    let text = render(&dual_stack()).unwrap();
    let (version, plugins) = libcni_load(&text, "1.1.0").expect("libcni 1.2+ loads it");
    assert_eq!(version, "1.1.0");
    let types: Vec<&str> = plugins
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![PLUGIN_TYPE, PORTMAP_TYPE],
        "palisade first, then portmap"
    );
    assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    // A libcni limited to spec 1.0.0 still finds a version it speaks in cniVersions.
    let (old, _) = libcni_load(&text, "1.0.0").unwrap();
    assert_eq!(old, "1.0.0");
}

#[test]
fn libcni_without_cni_versions_support_hands_plugins_1_0_0_which_old_portmap_accepts() {
    // libcni 1.1.x (containerd 1.6/1.7) knows nothing of `cniVersions`: it uses the top-level
    // version for every plugin, so that must be one Debian 12's portmap 1.1.1 speaks.
    let text = render(&dual_stack()).unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(raw["cniVersion"], "1.0.0");
}

#[test]
fn libcni_rule_checker_rejects_what_libcni_rejects() {
    // Guards the checker above: it must be able to fail.
    assert!(libcni_load(
        r#"{"cniVersion":"1.0.0","name":"-x","plugins":[{"type":"a"}]}"#,
        "1.1.0"
    )
    .is_err());
    assert!(libcni_load(
        r#"{"cniVersion":"1.0.0","name":"a b","plugins":[{"type":"a"}]}"#,
        "1.1.0"
    )
    .is_err());
    assert!(libcni_load(r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "1.1.0").is_err());
    assert!(libcni_load(
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"mtu":1}]}"#,
        "1.1.0"
    )
    .is_err());
    assert!(libcni_load(
        r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#,
        "1.1.0"
    )
    .is_err());
    assert!(libcni_valid_name(NETWORK_NAME));
}

// ---- The real portmap plugin (Debian containernetworking-plugins 1.1.1, spec <= 1.0.0) ----

const PORTMAP: &str = "/usr/lib/cni/portmap";

/// Runs portmap inside `node` (so its iptables rules land there, never in the host's netns).
fn portmap(node: &Netns, command: &str, container: &Netns, stdin: &Value) -> (bool, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node.name(), PORTMAP])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "0123456789abcdef")
        .env("CNI_NETNS", container.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portmap via ip netns exec");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "portmap {command} printed non-JSON ({e}): {stdout} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    (out.status.success(), value)
}

fn iptables_save(node: &Netns, tool: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node.name(), tool, "-t", "nat"])
        .output()
        .unwrap_or_else(|e| panic!("run {tool} in {}: {e}", node.name()));
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn real_portmap_plugin_accepts_the_chained_entry_as_libcni_derives_it() {
    assert!(
        Path::new(PORTMAP).exists(),
        "{PORTMAP} missing: apt-get install containernetworking-plugins (scripts/setup.sh)"
    );
    let text = render(&dual_stack()).unwrap();
    libcni_load(&text, "1.1.0").expect("libcni loads it");
    // The stdin each plugin gets, built by the tests' one mini-libcni (name, the top-level
    // cniVersion 1.0.0, prevResult, runtimeConfig for declared capabilities).
    let chain = Chain::from_conflist(&serde_json::from_str(&text).expect("conflist is JSON"))
        .expect("a valid chain");

    let node = Netns::new("palcc");
    let container = Netns::new("palcc");

    // VERSION: the plugin speaks the version we hand it.
    let (ok, info) = portmap(
        &node,
        "VERSION",
        &container,
        &json!({"cniVersion": "1.0.0"}),
    );
    assert!(ok, "VERSION failed: {info}");
    let supported = info["supportedVersions"]
        .as_array()
        .expect("supportedVersions");
    assert!(supported.contains(&json!("1.0.0")), "{info}");

    // What palisade's ADD returns (host veth first, the pod interface in the sandbox).
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "pal0123456789a" }, { "name": "eth0", "sandbox": container.path() }],
        "ips": [
            { "address": "10.244.1.5/32", "interface": 1, "gateway": "169.254.1.1" },
            { "address": "fd00:10:244:1::5/128", "interface": 1, "gateway": "fe80::1" }
        ]
    });
    let mappings = json!({ "portMappings": [
        { "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }
    ]});

    // ADD with a hostPort: the plugin parses our entry and programs both families.
    let add = chain.plugin_stdin(1, Some(&prev), &mappings);
    let (ok, result) = portmap(&node, "ADD", &container, &add);
    assert!(ok, "portmap ADD rejected our entry: {result}");
    assert_eq!(
        result["ips"], prev["ips"],
        "portmap passes prevResult through"
    );
    let v4 = iptables_save(&node, "iptables-save");
    assert!(v4.contains("--to-destination 10.244.1.5:80"), "{v4}");
    let v6 = iptables_save(&node, "ip6tables-save");
    assert!(
        v6.contains("--to-destination [fd00:10:244:1::5]:80"),
        "{v6}"
    );

    // CHECK without mappings (what libcni sends for a pod without hostPorts) parses and passes.
    let check = chain.plugin_stdin(1, Some(&prev), &json!({}));
    let (ok, out) = portmap(&node, "CHECK", &container, &check);
    assert!(ok, "portmap CHECK rejected our entry: {out}");

    // DEL removes what ADD made.
    let (ok, out) = portmap(&node, "DEL", &container, &add);
    assert!(ok, "portmap DEL failed: {out}");
    let v4 = iptables_save(&node, "iptables-save");
    assert!(!v4.contains("10.244.1.5:80"), "{v4}");
}
