//! Test support for black-box tests of the `palisade` CNI plugin: namespaces and directories that
//! clean up after themselves, and a mini-libcni that executes plugins exactly as a runtime does
//! (env + stdin, conflist chaining with injected `name`/`cniVersion`/`prevResult`, DEL in reverse,
//! cached results replayed as `prevResult`, GC input with both attachment keys).
//!
//! Everything runs inside network namespaces this module creates: the "node" is a namespace the
//! plugin is executed in (`ip netns exec`), pods are namespaces too. The host's own namespace is
//! never touched.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Where the reference plugins (host-local, portmap, ptp) are installed (Debian's package).
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

pub mod nft;

pub use nft::NftNs;
pub use palisade_testkit::cmd::{must, require_root, run};
pub use palisade_testkit::temp::{temp_dir, TempDir};
pub use palisade_testkit::{unique, Netns};

/// The workspace target directory of the running test binary (`target/<profile>`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target dir")
}

/// The built `palisade` binary: `$PALISADE_CNI_BIN`, or built once with cargo for this profile.
pub fn palisade_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("PALISADE_CNI_BIN") {
            return PathBuf::from(p);
        }
        let dir = target_profile_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "palisade-cni", "--bin", "palisade"]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("Cargo.toml");
        cmd.arg("--manifest-path").arg(manifest);
        let status = cmd
            .status()
            .expect("run cargo build for the palisade binary");
        assert!(status.success(), "building palisade failed");
        let bin = dir.join("palisade");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A directory for `CNI_PATH` holding `palisade` plus the reference plugins.
pub fn cni_path() -> String {
    let bin = palisade_bin();
    format!(
        "{}:{REFERENCE_PLUGIN_DIR}",
        bin.parent().expect("bin dir").display()
    )
}

/// The error a plugin printed (or a synthesised one when it printed nothing parseable).
#[derive(Debug, Clone)]
pub struct PluginError {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {} (stderr: {})",
            self.plugin,
            self.code,
            self.msg,
            self.stderr.trim()
        )
    }
}

/// One attachment as a runtime sees it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// `None` for DEL with the netns unset.
    pub netns: Option<String>,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Runtime-supplied capability arguments (e.g. `portMappings`).
    pub capability_args: Value,
}

impl Attachment {
    pub fn new(container_id: &str, netns: &str) -> Self {
        Attachment {
            container_id: container_id.into(),
            ifname: "eth0".into(),
            netns: Some(netns.into()),
            args: Vec::new(),
            capability_args: json!({}),
        }
    }

    /// Adds the Kubernetes pod identity a CRI runtime sends.
    pub fn pod(mut self, namespace: &str, name: &str, uid: &str) -> Self {
        self.args = vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), namespace.into()),
            ("K8S_POD_NAME".into(), name.into()),
            (
                "K8S_POD_INFRA_CONTAINER_ID".into(),
                self.container_id.clone(),
            ),
            ("K8S_POD_UID".into(), uid.into()),
        ];
        self
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// A mini libcni: runs a conflist's plugins inside a node namespace.
pub struct Runtime {
    /// Namespace the plugins run in (the node).
    pub node: String,
    pub cni_path: String,
    /// Result cache directory (libcni's `/var/lib/cni/results`).
    pub cache_dir: PathBuf,
    /// Extra environment for every plugin run.
    pub extra_env: Vec<(String, String)>,
    cache: Mutex<HashMap<String, Value>>,
}

impl Runtime {
    pub fn new(node: &Netns, cache_dir: &Path) -> Self {
        Runtime {
            node: node.name().to_string(),
            cni_path: cni_path(),
            cache_dir: cache_dir.to_path_buf(),
            extra_env: Vec::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, plugin: &str) -> PathBuf {
        self.cni_path
            .split(':')
            .map(|d| Path::new(d).join(plugin))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {plugin} not in {}", self.cni_path))
    }

    /// Executes one plugin binary with `command`, the environment of `att` and `stdin`.
    pub fn exec(
        &self,
        plugin: &str,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> Result<Option<Value>, PluginError> {
        let bin = self.find(plugin);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node]).arg(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path)
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(a) = att {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", a.cni_args());
            if let Some(n) = &a.netns {
                cmd.env("CNI_NETNS", n);
            }
        }
        exec_with_stdin(plugin, cmd, stdin)
    }

    fn cache_key(list: &Value, att: &Attachment) -> String {
        format!(
            "{}-{}-{}",
            list["name"].as_str().unwrap_or_default(),
            att.container_id,
            att.ifname
        )
    }

    /// The conf one plugin of `list` receives.
    fn plugin_conf(
        list: &Value,
        i: usize,
        att: Option<&Attachment>,
        prev: Option<&Value>,
    ) -> Value {
        let mut c = list["plugins"][i].clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        if let (Some(a), Some(caps)) = (
            att,
            c.get("capabilities").and_then(Value::as_object).cloned(),
        ) {
            let mut rc = serde_json::Map::new();
            for (k, on) in caps {
                if on == json!(true) {
                    if let Some(v) = a.capability_args.get(&k) {
                        rc.insert(k, v.clone());
                    }
                }
            }
            if !rc.is_empty() {
                c["runtimeConfig"] = Value::Object(rc);
            }
        }
        c
    }

    fn plugin_count(list: &Value) -> usize {
        list["plugins"].as_array().map_or(0, Vec::len)
    }

    fn plugin_type(list: &Value, i: usize) -> String {
        list["plugins"][i]["type"]
            .as_str()
            .expect("plugin type")
            .to_string()
    }

    /// ADD through the chain; the final result is cached for CHECK and DEL.
    pub fn add(&self, list: &Value, att: &Attachment) -> Result<Value, PluginError> {
        let mut prev: Option<Value> = None;
        for i in 0..Self::plugin_count(list) {
            let conf = Self::plugin_conf(list, i, Some(att), prev.as_ref());
            let out = self.exec(
                &Self::plugin_type(list, i),
                "ADD",
                Some(att),
                conf.to_string().as_bytes(),
            )?;
            prev = Some(out.unwrap_or(json!({})));
        }
        let result = prev.unwrap_or(json!({}));
        let key = Self::cache_key(list, att);
        let _ = std::fs::create_dir_all(&self.cache_dir);
        let _ = std::fs::write(
            self.cache_dir.join(&key),
            json!({"kind":"cniCacheV1","result":result}).to_string(),
        );
        self.cache
            .lock()
            .expect("cache")
            .insert(key, result.clone());
        Ok(result)
    }

    /// The cached result of an attachment, read back from the cache file as libcni does.
    pub fn cached(&self, list: &Value, att: &Attachment) -> Option<Value> {
        let key = Self::cache_key(list, att);
        std::fs::read(self.cache_dir.join(&key))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| v["result"].clone())
            .or_else(|| self.cache.lock().expect("cache").get(&key).cloned())
    }

    /// CHECK through the chain with the cached result as prevResult.
    pub fn check(&self, list: &Value, att: &Attachment) -> Result<(), PluginError> {
        let prev = self.cached(list, att);
        for i in 0..Self::plugin_count(list) {
            let conf = Self::plugin_conf(list, i, Some(att), prev.as_ref());
            self.exec(
                &Self::plugin_type(list, i),
                "CHECK",
                Some(att),
                conf.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// CHECK of one plugin of the chain (by type) with the cached final result as prevResult.
    pub fn check_only(
        &self,
        list: &Value,
        att: &Attachment,
        plugin: &str,
    ) -> Result<(), PluginError> {
        let prev = self.cached(list, att);
        for i in (0..Self::plugin_count(list)).filter(|i| Self::plugin_type(list, *i) == plugin) {
            let conf = Self::plugin_conf(list, i, Some(att), prev.as_ref());
            self.exec(plugin, "CHECK", Some(att), conf.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// DEL in reverse order with the cached result as prevResult; the cache entry is removed.
    pub fn del(&self, list: &Value, att: &Attachment) -> Result<(), PluginError> {
        let prev = self.cached(list, att);
        for i in (0..Self::plugin_count(list)).rev() {
            let conf = Self::plugin_conf(list, i, Some(att), prev.as_ref());
            self.exec(
                &Self::plugin_type(list, i),
                "DEL",
                Some(att),
                conf.to_string().as_bytes(),
            )?;
        }
        let key = Self::cache_key(list, att);
        let _ = std::fs::remove_file(self.cache_dir.join(&key));
        self.cache.lock().expect("cache").remove(&key);
        Ok(())
    }

    /// GC with the given valid attachments (sent under both the new and the legacy key).
    pub fn gc(&self, list: &Value, valid: &[(&str, &str)]) -> Result<(), PluginError> {
        let atts: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for i in 0..Self::plugin_count(list) {
            let mut conf = Self::plugin_conf(list, i, None, None);
            conf["cni.dev/valid-attachments"] = json!(atts);
            conf["cni.dev/attachments"] = json!(atts);
            self.exec(
                &Self::plugin_type(list, i),
                "GC",
                None,
                conf.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// STATUS of the first plugin.
    pub fn status(&self, list: &Value) -> Result<(), PluginError> {
        let conf = Self::plugin_conf(list, 0, None, None);
        self.exec(
            &Self::plugin_type(list, 0),
            "STATUS",
            None,
            conf.to_string().as_bytes(),
        )
        .map(|_| ())
    }
}

fn exec_with_stdin(
    plugin: &str,
    mut cmd: Command,
    stdin: &[u8],
) -> Result<Option<Value>, PluginError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {plugin}: {e}"));
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait for plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let v: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        return Err(PluginError {
            plugin: plugin.to_string(),
            code: v["code"].as_u64().unwrap_or(0),
            msg: v["msg"].as_str().unwrap_or_default().to_string(),
            stdout,
            stderr,
        });
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(&stdout).map_err(|e| PluginError {
        plugin: plugin.to_string(),
        code: 0,
        msg: format!("stdout is not JSON: {e}"),
        stdout: stdout.clone(),
        stderr: stderr.clone(),
    })?;
    Ok(Some(v))
}

/// Runs `palisade` once with raw env and stdin inside `node` (for malformed-input cases).
pub fn exec_raw(
    node: &Netns,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> Result<Option<Value>, PluginError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.name()]).arg(palisade_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    exec_with_stdin("palisade", cmd, stdin)
}

/// Creates the agent's minimal `table inet palisade` with the two pending sets in `node`
/// (the agent normally does this).
pub fn create_pending_table(node: &Netns) {
    node.exec(&[
        "nft",
        "add table inet palisade; add set inet palisade pending_v4 { type ipv4_addr; }; add set inet palisade pending_v6 { type ipv6_addr; }",
    ]);
}

/// Elements of one pending set in `node` (empty when the table is absent).
pub fn pending_elements(node: &Netns, set: &str) -> Vec<String> {
    let out = node.try_exec(&["nft", "-j", "list", "set", "inet", "palisade", set]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["set"]["elem"].as_array().cloned())
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}
