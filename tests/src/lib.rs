//! Test support for black-box tests of the `palisade` CNI plugin: namespaces and directories that
//! clean up after themselves, and a mini-libcni that executes plugins exactly as a runtime does
//! (env + stdin, conflist chaining with injected `name`/`cniVersion`/`prevResult`, DEL in reverse,
//! cached results replayed as `prevResult`, GC input with both attachment keys). The chain itself
//! is testkit's [`libcni`] (shared with the lab); [`Runtime`] adds the result cache and hands tests
//! the plugin's CNI error ([`PluginError`]) to assert on.
//!
//! Everything runs inside network namespaces this module creates: the "node" is a namespace the
//! plugin is executed in (`ip netns exec`), pods are namespaces too. The host's own namespace is
//! never touched.

use palisade_testkit::libcni::{self, Chain, Runner, StepError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Where the reference plugins (host-local, portmap, ptp) are installed (Debian's package).
pub const REFERENCE_PLUGIN_DIR: &str = libcni::SYSTEM_PLUGIN_DIR;

pub use palisade_testkit::cmd::{must, require_root, run};
pub use palisade_testkit::libcni::{result_ips, Attachment, PluginError};
pub use palisade_testkit::nft::NftNs;
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

/// The `CNI_PATH` directories: the one holding `palisade`, then the reference plugins.
pub fn cni_dirs() -> Vec<PathBuf> {
    let bin = palisade_bin();
    vec![
        bin.parent().expect("bin dir").to_path_buf(),
        PathBuf::from(REFERENCE_PLUGIN_DIR),
    ]
}

/// [`cni_dirs`] as `CNI_PATH` (`dir:dir`).
pub fn cni_path() -> String {
    libcni::join_path(&cni_dirs())
}

/// A mini libcni: runs a conflist's plugins inside a node namespace (testkit's [`libcni::Runner`],
/// hermetic: plugins see only `PATH` and the `CNI_*` variables), and caches each attachment's final
/// result to replay it as `prevResult` on CHECK and DEL, as libcni does.
pub struct Runtime {
    /// Runs the plugins in the node's namespace; `runner.env` is extra environment for every run.
    pub runner: Runner,
    /// Result cache directory (libcni's `/var/lib/cni/results`).
    pub cache_dir: PathBuf,
    cache: Mutex<HashMap<String, Value>>,
}

impl Runtime {
    pub fn new(node: &Netns, cache_dir: &Path) -> Self {
        Runtime {
            runner: Runner::new(node.name(), cni_dirs()).hermetic(),
            cache_dir: cache_dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Executes one plugin binary with `command`, the environment of `att` and `stdin`.
    pub fn exec(
        &self,
        plugin: &str,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> Result<Option<Value>, PluginError> {
        self.runner
            .exec(plugin, command, att, stdin)
            .map_err(libcni::Error::into_plugin_error)
    }

    /// A test's conflist; one libcni would refuse is a broken test.
    fn chain(list: &Value) -> Chain {
        Chain::from_conflist(list).unwrap_or_else(|e| panic!("{e}: {list}"))
    }

    fn cache_key(chain: &Chain, att: &Attachment) -> String {
        format!("{}-{}-{}", chain.name, att.container_id, att.ifname)
    }

    /// ADD through the chain; the final result is cached for CHECK and DEL.
    pub fn add(&self, list: &Value, att: &Attachment) -> Result<Value, PluginError> {
        let chain = Self::chain(list);
        let result = self
            .runner
            .add(&chain, att)
            .map_err(StepError::into_plugin_error)?;
        let key = Self::cache_key(&chain, att);
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
        let key = Self::cache_key(&Self::chain(list), att);
        std::fs::read(self.cache_dir.join(&key))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| v["result"].clone())
            .or_else(|| self.cache.lock().expect("cache").get(&key).cloned())
    }

    /// CHECK through the chain with the cached result as prevResult.
    pub fn check(&self, list: &Value, att: &Attachment) -> Result<(), PluginError> {
        let prev = self.cached(list, att);
        self.runner
            .check(&Self::chain(list), att, prev.as_ref())
            .map_err(StepError::into_plugin_error)
    }

    /// CHECK of one plugin of the chain (by type) with the cached final result as prevResult.
    pub fn check_only(
        &self,
        list: &Value,
        att: &Attachment,
        plugin: &str,
    ) -> Result<(), PluginError> {
        let prev = self.cached(list, att);
        self.runner
            .check_plugin(&Self::chain(list), att, prev.as_ref(), plugin)
            .map_err(StepError::into_plugin_error)
    }

    /// DEL in reverse order with the cached result as prevResult; the cache entry is removed.
    pub fn del(&self, list: &Value, att: &Attachment) -> Result<(), PluginError> {
        let chain = Self::chain(list);
        let prev = self.cached(list, att);
        self.runner
            .del(&chain, att, prev.as_ref())
            .map_err(StepError::into_plugin_error)?;
        let key = Self::cache_key(&chain, att);
        let _ = std::fs::remove_file(self.cache_dir.join(&key));
        self.cache.lock().expect("cache").remove(&key);
        Ok(())
    }

    /// GC with the given valid attachments (sent under both the new and the legacy key).
    pub fn gc(&self, list: &Value, valid: &[(&str, &str)]) -> Result<(), PluginError> {
        self.runner
            .gc(&Self::chain(list), valid)
            .map_err(StepError::into_plugin_error)
    }

    /// STATUS of the first plugin.
    pub fn status(&self, list: &Value) -> Result<(), PluginError> {
        self.runner
            .status(&Self::chain(list))
            .map_err(StepError::into_plugin_error)
    }
}

/// Runs `palisade` once with raw env and stdin inside `node` (for malformed-input cases).
pub fn exec_raw(
    node: &Netns,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> Result<Option<Value>, PluginError> {
    libcni::exec_plugin(node.name(), &palisade_bin(), env, true, stdin)
        .map_err(libcni::Error::into_plugin_error)
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
