//! The small libcni that runs a whole conflist as a container runtime does: one copy for the CNI
//! black-box tests (`palisade-tests`) and the lab (`palisade-lab`).
//!
//! - [`Chain`]: a conflist as libcni loads it (its name, the top-level `cniVersion` it hands every
//!   plugin, the plugins), and the stdin of each plugin ([`Chain::plugin_stdin`]).
//! - [`Attachment`]: one attachment as the runtime passes it: container id, interface, netns,
//!   `CNI_ARGS` pairs and capability args (libcni's `CapabilityArgs`).
//! - [`Runner`]: executes plugins inside a node's network namespace (`ip netns exec`) with the
//!   `CNI_*` environment, each found by its `type` in `CNI_PATH`: one plugin ([`Runner::exec`]), or
//!   the chain: ADD in order (each plugin with the previous one's result as `prevResult`), CHECK and
//!   DEL (in reverse) with the cached final result, GC with the valid attachments, STATUS.
//! - [`PluginError`]: the CNI error object a plugin printed, returned as a value (tests assert on
//!   codes and messages); [`Error`] adds what fails before a plugin answers (a conflist libcni would
//!   refuse, a plugin missing from `CNI_PATH`); [`StepError`] names the step of a chain that failed.
//! - [`result_ips`]: the pod addresses of a result; [`FakePlugins`]: shell plugins that record
//!   their calls, for testing chain runners.
//!
//! Caching results is the caller's business (libcni's `/var/lib/cni/results`): ADD returns the
//! final result, CHECK and DEL take it back. Plugins run only inside the node namespace given; the
//! host's own namespace is never touched.

use crate::temp::{temp_dir, TempDir};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's containernetworking-plugins (host-local, portmap, ptp, ...) are installed.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Interface name inside pods (what CRI runtimes pass as `CNI_IFNAME`).
pub const POD_IFNAME: &str = "eth0";

/// The error a plugin printed (or a synthesised one when it printed nothing parseable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// The plugin's `type` (its file name).
    pub plugin: String,
    /// The CNI error code; 0 when the plugin printed no error object.
    pub code: u64,
    pub msg: String,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {}",
            self.plugin, self.code, self.msg
        )?;
        if let Some(details) = self.details() {
            write!(f, "; {details}")?;
        }
        write!(f, " (stderr: {})", self.stderr.trim())
    }
}

impl std::error::Error for PluginError {}

impl PluginError {
    /// The error object's `details`, when it has some.
    pub fn details(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.stdout).ok()?;
        v.get("details")?
            .as_str()
            .filter(|d| !d.is_empty())
            .map(str::to_string)
    }
}

/// What can go wrong running a plugin or a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A conflist libcni would refuse (no name, no version, no plugins, a plugin without `type`).
    Conflist(String),
    /// A plugin `type` that is not a plain file name (libcni looks types up in `CNI_PATH` only).
    BadType(String),
    /// No `CNI_PATH` directory holds the plugin.
    NotFound { plugin: String, cni_path: String },
    /// The plugin could not be started or waited for.
    Exec { plugin: String, detail: String },
    /// The plugin ran and failed (its CNI error), or answered with no usable result.
    Plugin(Box<PluginError>),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Conflist(detail) => write!(f, "conflist: {detail}"),
            Error::BadType(kind) => write!(f, "plugin type {kind:?} is not a file name"),
            Error::NotFound { plugin, cni_path } => {
                write!(f, "CNI plugin {plugin:?} not found in CNI_PATH {cni_path}")
            }
            Error::Exec { plugin, detail } => write!(f, "cannot run plugin {plugin}: {detail}"),
            Error::Plugin(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The plugin's own error, for a test that asserts on it; anything else (a plugin missing, a
    /// conflist refused, `ip` not startable) is a broken test setup and panics.
    pub fn into_plugin_error(self) -> PluginError {
        match self {
            Error::Plugin(e) => *e,
            other => panic!("{other}"),
        }
    }
}

/// A step of a chain that failed: the verb, which plugin of how many, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// `ADD`, `CHECK`, `DEL`, `GC` or `STATUS`.
    pub verb: &'static str,
    /// The plugin's `type`.
    pub plugin: String,
    /// 1-based position of the plugin in the chain.
    pub position: usize,
    /// How many plugins the chain has.
    pub count: usize,
    pub error: Error,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CNI {} of plugin {} ({}/{}): {}",
            self.verb, self.plugin, self.position, self.count, self.error
        )
    }
}

impl std::error::Error for StepError {}

impl StepError {
    /// The plugin's own error, as [`Error::into_plugin_error`] (panics, naming the step, otherwise).
    pub fn into_plugin_error(self) -> PluginError {
        match self.error {
            Error::Plugin(e) => *e,
            _ => panic!("{self}"),
        }
    }
}

/// A conflist as libcni loads it: its name, the version it hands every plugin, the plugins.
#[derive(Debug, Clone, PartialEq)]
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
    pub fn from_conflist(conflist: &Value) -> Result<Chain, Error> {
        let name = conflist
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Conflist("no name".into()))?;
        let cni_version = conflist
            .get("cniVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Conflist("no cniVersion".into()))?;
        let plugins = conflist
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Conflist("no plugins".into()))?;
        for (i, p) in plugins.iter().enumerate() {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(Error::Conflist(format!("plugins[{i}] has no type")));
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
    /// `capability_args` (an object) for exactly the capabilities this plugin declares (none: no
    /// key). Panics when the chain has no plugin `i`.
    pub fn plugin_stdin(&self, i: usize, prev: Option<&Value>, capability_args: &Value) -> Value {
        let entry = self
            .plugins
            .get(i)
            .unwrap_or_else(|| panic!("conflist {} has no plugin {i}", self.name));
        // from_conflist let only objects with a type through.
        let mut conf = entry.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut runtime = Map::new();
        for (cap, value) in capability_args.as_object().into_iter().flatten() {
            if declares(entry, cap) {
                runtime.insert(cap.clone(), value.clone());
            }
        }
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(conf)
    }
}

fn declares(plugin: &Value, capability: &str) -> bool {
    plugin
        .get("capabilities")
        .and_then(|c| c.get(capability))
        .and_then(Value::as_bool)
        == Some(true)
}

/// One attachment as a runtime sees it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// `CNI_NETNS`; `None` for DEL with the netns unset.
    pub netns: Option<String>,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Runtime-supplied capability arguments (an object, e.g. `{"portMappings": [...]}`); each
    /// plugin gets those it declares as `runtimeConfig`.
    pub capability_args: Value,
}

impl Attachment {
    /// Interface [`POD_IFNAME`], no `CNI_ARGS`, no capability args.
    pub fn new(container_id: &str, netns: &str) -> Self {
        Attachment {
            container_id: container_id.into(),
            ifname: POD_IFNAME.into(),
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

    /// `CNI_ARGS`: the pairs as `K=V;K=V`.
    pub fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// `CNI_PATH` as one string (`dir:dir`).
pub fn join_path(path: &[PathBuf]) -> String {
    path.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The executable of plugin type `kind`: the first `CNI_PATH` directory holding it, as libcni
/// looks it up (never a path outside `CNI_PATH`).
pub fn find_plugin(kind: &str, cni_path: &[PathBuf]) -> Result<PathBuf, Error> {
    if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
        return Err(Error::BadType(kind.to_string()));
    }
    cni_path
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound {
            plugin: kind.to_string(),
            cni_path: join_path(cni_path),
        })
}

/// Runs the plugin executable `bin` once inside the network namespace `node` (`ip netns exec`)
/// with `env` and `stdin`; with `clear_env` it starts from an empty environment but `PATH`.
/// Exit 0: the JSON it printed (`None` when it printed nothing). Otherwise the CNI error object it
/// printed, as [`Error::Plugin`].
pub fn exec_plugin(
    node: &str,
    bin: &Path,
    env: &[(&str, &str)],
    clear_env: bool,
    stdin: &[u8],
) -> Result<Option<Value>, Error> {
    let plugin = bin.file_name().map_or_else(
        || bin.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node]).arg(bin);
    if clear_env {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let exec_error = |detail: String| Error::Exec {
        plugin: plugin.clone(),
        detail,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| exec_error(format!("cannot start ip netns exec {node}: {e}")))?;
    if let Some(mut s) = child.stdin.take() {
        // A plugin that exits early closes its stdin: its status and output tell why.
        let _ = s.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| exec_error(format!("waiting: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let v: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        let msg = match v["msg"].as_str() {
            Some(m) => m.to_string(),
            None => format!(
                "{}, and no CNI error object on stdout: {}",
                out.status,
                stdout.trim()
            ),
        };
        return Err(Error::Plugin(Box::new(PluginError {
            plugin,
            code: v["code"].as_u64().unwrap_or(0),
            msg,
            stdout,
            stderr,
        })));
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&stdout).map(Some).map_err(|e| {
        Error::Plugin(Box::new(PluginError {
            plugin,
            code: 0,
            msg: format!("stdout is not JSON: {e}"),
            stdout,
            stderr,
        }))
    })
}

/// How a runtime runs plugins: inside a node's network namespace, found in `CNI_PATH`.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The node's network namespace (a name for `ip netns exec`).
    pub node: String,
    /// Where plugins are looked up, in order; also passed as `CNI_PATH` (for delegated IPAM).
    pub cni_path: Vec<PathBuf>,
    /// Extra environment for every plugin run.
    pub env: Vec<(String, String)>,
    /// Start plugins from an empty environment (only `PATH` kept), not the caller's as libcni does.
    pub clear_env: bool,
}

impl Runner {
    /// Plugins get the caller's environment plus the `CNI_*` variables, as libcni passes them.
    pub fn new(node: &str, cni_path: Vec<PathBuf>) -> Self {
        Runner {
            node: node.to_string(),
            cni_path,
            env: Vec::new(),
            clear_env: false,
        }
    }

    /// Plugins start from an empty environment (only `PATH`, [`Runner::env`] and the `CNI_*`
    /// variables), so nothing of the test's environment changes what they do.
    pub fn hermetic(mut self) -> Self {
        self.clear_env = true;
        self
    }

    /// Executes one plugin (found by type) with `verb`, the environment of `att` and `stdin`.
    pub fn exec(
        &self,
        plugin: &str,
        verb: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> Result<Option<Value>, Error> {
        let bin = find_plugin(plugin, &self.cni_path)?;
        let cni_path = join_path(&self.cni_path);
        let mut env = vec![("CNI_COMMAND", verb), ("CNI_PATH", cni_path.as_str())];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let cni_args = att.map(Attachment::cni_args).unwrap_or_default();
        if let Some(a) = att {
            env.extend([
                ("CNI_CONTAINERID", a.container_id.as_str()),
                ("CNI_IFNAME", a.ifname.as_str()),
                ("CNI_ARGS", cni_args.as_str()),
            ]);
            if let Some(n) = &a.netns {
                env.push(("CNI_NETNS", n.as_str()));
            }
        }
        exec_plugin(&self.node, &bin, &env, self.clear_env, stdin)
    }

    /// Runs plugin `i` of `chain` with the stdin libcni builds for it.
    fn step(
        &self,
        chain: &Chain,
        i: usize,
        verb: &'static str,
        att: Option<&Attachment>,
        stdin: &Value,
    ) -> Result<Option<Value>, StepError> {
        let kind = chain.plugin_type(i);
        self.exec(kind, verb, att, stdin.to_string().as_bytes())
            .map_err(|error| StepError {
                verb,
                plugin: kind.to_string(),
                position: i + 1,
                count: chain.plugins.len(),
                error,
            })
    }

    /// ADD through the chain in order, each plugin with the previous one's result as
    /// `prevResult`; the final result (what libcni caches for CHECK and DEL). Stops at the first
    /// failure; the caller runs DEL as a runtime tears a failed sandbox down.
    pub fn add(&self, chain: &Chain, att: &Attachment) -> Result<Value, StepError> {
        let mut prev: Option<Value> = None;
        for i in 0..chain.plugins.len() {
            let stdin = chain.plugin_stdin(i, prev.as_ref(), &att.capability_args);
            let result = match self.step(chain, i, "ADD", Some(att), &stdin)? {
                Some(result) => result,
                // libcni refuses an empty result too (it parses stdout as one).
                None => {
                    return Err(StepError {
                        verb: "ADD",
                        plugin: chain.plugin_type(i).to_string(),
                        position: i + 1,
                        count: chain.plugins.len(),
                        error: Error::Plugin(Box::new(PluginError {
                            plugin: chain.plugin_type(i).to_string(),
                            code: 0,
                            msg: "ADD printed no result".into(),
                            stdout: String::new(),
                            stderr: String::new(),
                        })),
                    })
                }
            };
            prev = Some(result);
        }
        // from_conflist let no chain without plugins through.
        Ok(prev.unwrap_or_else(|| json!({})))
    }

    /// CHECK through the chain, each plugin with the cached final result `prev` as `prevResult`.
    pub fn check(
        &self,
        chain: &Chain,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), StepError> {
        self.check_where(chain, att, prev, |_| true)
    }

    /// CHECK of the plugins of type `plugin` only, with the cached final result as `prevResult`
    /// (for a chained plugin whose own CHECK is known broken).
    pub fn check_plugin(
        &self,
        chain: &Chain,
        att: &Attachment,
        prev: Option<&Value>,
        plugin: &str,
    ) -> Result<(), StepError> {
        self.check_where(chain, att, prev, |kind| kind == plugin)
    }

    fn check_where(
        &self,
        chain: &Chain,
        att: &Attachment,
        prev: Option<&Value>,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<(), StepError> {
        for i in (0..chain.plugins.len()).filter(|i| wanted(chain.plugin_type(*i))) {
            let stdin = chain.plugin_stdin(i, prev, &att.capability_args);
            self.step(chain, i, "CHECK", Some(att), &stdin)?;
        }
        Ok(())
    }

    /// DEL through the chain in reverse order, each plugin with the cached final result `prev` as
    /// `prevResult` and the same capability args as ADD; stops at the first failure, as libcni.
    pub fn del(
        &self,
        chain: &Chain,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), StepError> {
        match self.del_each(chain, att, prev, false).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// As [`Runner::del`], but it goes on past a failing plugin (a teardown should remove all it
    /// can) and returns every failure.
    pub fn del_all(&self, chain: &Chain, att: &Attachment, prev: Option<&Value>) -> Vec<StepError> {
        self.del_each(chain, att, prev, true)
    }

    fn del_each(
        &self,
        chain: &Chain,
        att: &Attachment,
        prev: Option<&Value>,
        keep_going: bool,
    ) -> Vec<StepError> {
        let mut errors = Vec::new();
        for i in (0..chain.plugins.len()).rev() {
            let stdin = chain.plugin_stdin(i, prev, &att.capability_args);
            if let Err(e) = self.step(chain, i, "DEL", Some(att), &stdin) {
                errors.push(e);
                if !keep_going {
                    break;
                }
            }
        }
        errors
    }

    /// GC through the chain with the given valid attachments `(containerID, ifname)`, sent under
    /// both the new (`cni.dev/valid-attachments`) and the legacy (`cni.dev/attachments`) key.
    pub fn gc(&self, chain: &Chain, valid: &[(&str, &str)]) -> Result<(), StepError> {
        let atts: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for i in 0..chain.plugins.len() {
            let mut conf = chain.plugin_stdin(i, None, &Value::Null);
            conf["cni.dev/valid-attachments"] = json!(atts);
            conf["cni.dev/attachments"] = json!(atts);
            self.step(chain, i, "GC", None, &conf)?;
        }
        Ok(())
    }

    /// STATUS of the first plugin of the chain (the network's own plugin).
    pub fn status(&self, chain: &Chain) -> Result<(), StepError> {
        let conf = chain.plugin_stdin(0, None, &Value::Null);
        self.step(chain, 0, "STATUS", None, &conf).map(|_| ())
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

/// A conflist of the agent's shape, for tests of what runs a chain: `palisade` (declaring no
/// capability), then `portmap` declaring `portMappings`; version 1.0.0, also listing
/// `cniVersions` (what libcni 1.2+ picks from).
pub fn example_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "palisade",
        "plugins": [
            {"type": "palisade", "stateDir": "/s"},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
}

/// Plugins of a few lines of shell, for testing what runs a chain: each appends
/// `<verb> <type> <CNI_ARGS>` to a shared log, keeps its stdin of each verb, and answers a
/// result naming itself (`"by": "<type>"`, one address) or, when made failing, fails ADD with
/// CNI error 7 "broken on purpose". Their directory goes when this drops.
pub struct FakePlugins {
    dir: TempDir,
}

impl Default for FakePlugins {
    fn default() -> Self {
        Self::new()
    }
}

impl FakePlugins {
    pub fn new() -> Self {
        let dir = temp_dir("palisade-fake-cni-");
        crate::temp::sub_dir(dir.path(), "bin");
        crate::temp::sub_dir(dir.path(), "log");
        FakePlugins { dir }
    }

    /// The directory to put in `CNI_PATH`.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// Adds plugin type `kind`; with `fail_add` its ADD fails.
    pub fn plugin(&self, kind: &str, fail_add: bool) -> &Self {
        use std::os::unix::fs::PermissionsExt;
        let log = self.dir.path().join("log");
        let fail = if fail_add {
            "if [ \"$CNI_COMMAND\" = ADD ]; then echo '{\"code\":7,\"msg\":\"broken on purpose\"}'; exit 1; fi\n"
        } else {
            ""
        };
        let script = format!(
            "#!/bin/sh\necho \"$CNI_COMMAND {kind} $CNI_ARGS\" >> {log}/seq\ncat > {log}/$CNI_COMMAND-{kind}.json\n{fail}echo '{{\"cniVersion\":\"1.0.0\",\"by\":\"{kind}\",\"ips\":[{{\"address\":\"10.9.0.2/32\"}}]}}'\n",
            log = log.display()
        );
        let p = self.bin_dir().join(kind);
        std::fs::write(&p, script).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    /// The stdin plugin `kind` last got for `verb`.
    pub fn stdin(&self, verb: &str, kind: &str) -> Value {
        let p = self.dir.path().join(format!("log/{verb}-{kind}.json"));
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", p.display()))
    }

    /// The log: one `<verb> <type> <CNI_ARGS>` line a call, in order.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/seq")).unwrap_or_default()
    }

    /// The calls in order, as `<verb> <type>`.
    pub fn calls(&self) -> Vec<String> {
        self.log()
            .lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Netns;

    fn http() -> Value {
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
    }

    #[test]
    fn each_plugin_gets_name_top_level_version_and_only_the_previous_result() {
        let chain = Chain::from_conflist(&example_conflist()).unwrap();
        let first = chain.plugin_stdin(0, None, &http());
        assert_eq!(first["name"], "palisade");
        assert_eq!(
            first["cniVersion"], "1.0.0",
            "libcni < 1.2 hands the top-level version"
        );
        assert_eq!(first["stateDir"], "/s");
        assert!(first.get("prevResult").is_none());
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/32"}]});
        let second = chain.plugin_stdin(1, Some(&prev), &http());
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["snat"], true);
    }

    #[test]
    fn runtime_config_carries_only_the_capabilities_a_plugin_declares() {
        let chain = Chain::from_conflist(&example_conflist()).unwrap();
        let mut args = http();
        args["ips"] = json!(["10.244.1.9"]);
        let palisade = chain.plugin_stdin(0, None, &args);
        assert!(
            palisade.get("runtimeConfig").is_none(),
            "palisade declares no capability: {palisade}"
        );
        let portmap = chain.plugin_stdin(1, None, &args);
        assert_eq!(portmap["runtimeConfig"], http());
        // No capability args (GC, STATUS): no runtimeConfig at all.
        let none = chain.plugin_stdin(1, None, &Value::Null);
        assert!(none.get("runtimeConfig").is_none(), "{none}");
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
        assert!(Chain::from_conflist(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": ["portmap"]})
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
        let dir = temp_dir("palisade-cni-path-");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
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
        assert!(matches!(
            find_plugin("../b/bridge", &path),
            Err(Error::BadType(_))
        ));
    }

    #[test]
    fn cni_args_are_the_pairs_joined() {
        let a = Attachment::new("c1", "/run/netns/x").pod("ns", "p", "u");
        assert_eq!(
            a.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u"
        );
        assert_eq!(Attachment::new("c1", "/x").cni_args(), "");
    }

    #[test]
    fn a_plugin_error_shows_its_message_and_details() {
        let mut e = PluginError {
            plugin: "palisade".into(),
            code: 11,
            msg: "no table".into(),
            stdout: r#"{"code":11,"msg":"no table","details":"start the agent"}"#.into(),
            stderr: "log\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "palisade failed with code 11: no table; start the agent (stderr: log)"
        );
        e.stdout = r#"{"code":11,"msg":"no table"}"#.into();
        assert_eq!(e.details(), None);
    }

    #[test]
    fn result_ips_strip_prefix_lengths() {
        let r = json!({"ips": [{"address": "10.244.1.2/32"}, {"address": "fd00:10:244:1::2/128"}]});
        let ips = result_ips(&r);
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.244.1.2");
        assert!(result_ips(&json!({})).is_empty());
    }

    /// Needs root (a network namespace, as the plugins run inside the node's).
    #[test]
    fn add_runs_the_chain_in_order_and_del_in_reverse_with_the_cached_result() {
        let fakes = FakePlugins::new();
        fakes
            .plugin("first", false)
            .plugin("second", false)
            .plugin("broken", true);
        let node = Netns::new("pl-cnitest");
        let runner = Runner::new(node.name(), vec![fakes.bin_dir()]);
        let mut att = Attachment::new("c1", &node.path().display().to_string()).pod("x", "p", "u");
        att.capability_args = http();
        let chain = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "first"}, {"type": "second", "capabilities": {"portMappings": true}}
        ]}))
        .unwrap();
        let result = runner.add(&chain, &att).unwrap();
        assert_eq!(
            result["by"], "second",
            "the chain's result is the last plugin's"
        );
        assert_eq!(fakes.stdin("ADD", "second")["prevResult"]["by"], "first");
        assert_eq!(
            fakes.stdin("ADD", "second")["runtimeConfig"]["portMappings"][0]["hostPort"],
            18080
        );
        runner.check(&chain, &att, Some(&result)).unwrap();
        runner.del(&chain, &att, Some(&result)).unwrap();
        for kind in ["first", "second"] {
            for verb in ["CHECK", "DEL"] {
                assert_eq!(
                    fakes.stdin(verb, kind)["prevResult"]["by"],
                    "second",
                    "{kind} {verb} gets the cached result"
                );
            }
        }
        assert_eq!(
            fakes.calls(),
            [
                "ADD first",
                "ADD second",
                "CHECK first",
                "CHECK second",
                "DEL second",
                "DEL first"
            ]
        );
        let log = fakes.log();
        assert!(log.contains("K8S_POD_NAMESPACE=x;K8S_POD_NAME=p"), "{log}");

        // A broken link fails ADD, naming the plugin, its place and its message; the error is a
        // value with the plugin's code.
        let broken = Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "first"}, {"type": "broken"}
        ]}))
        .unwrap();
        let e = runner.add(&broken, &att).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("plugin broken (2/2)") && text.contains("broken on purpose"),
            "{text}"
        );
        assert_eq!(e.into_plugin_error().code, 7);
        // DEL goes on past a failing plugin only when asked to.
        let failing_del =
            Chain::from_conflist(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "first"}, {"type": "nowhere"}
            ]}))
            .unwrap();
        let before = fakes.calls().len();
        assert!(runner.del(&failing_del, &att, None).is_err());
        assert_eq!(fakes.calls().len(), before, "DEL stopped at nowhere");
        let errors = runner.del_all(&failing_del, &att, None);
        assert_eq!(errors.len(), 1);
        assert_eq!(fakes.calls().last().unwrap(), "DEL first");
        // A plugin missing from CNI_PATH fails too.
        let e = runner.add(&failing_del, &att).unwrap_err();
        assert!(
            matches!(&e.error, Error::NotFound { plugin, .. } if plugin == "nowhere"),
            "{e}"
        );
        assert!(
            e.to_string().contains("\"nowhere\" not found in CNI_PATH"),
            "{e}"
        );
    }

    /// Needs root. GC gets both attachment keys, STATUS goes to the first plugin, and a hermetic
    /// runner starts plugins from an empty environment.
    #[test]
    fn gc_status_and_a_hermetic_environment() {
        let fakes = FakePlugins::new();
        fakes.plugin("first", false).plugin("second", false);
        let node = Netns::new("pl-cnitest");
        let chain = Chain::from_conflist(&json!({"cniVersion": "1.1.0", "name": "n", "plugins": [
            {"type": "first"}, {"type": "second", "capabilities": {"portMappings": true}}
        ]}))
        .unwrap();
        let runner = Runner::new(node.name(), vec![fakes.bin_dir()]).hermetic();
        runner.gc(&chain, &[("c1", "eth0")]).unwrap();
        let gc = fakes.stdin("GC", "second");
        let want = json!([{"containerID": "c1", "ifname": "eth0"}]);
        assert_eq!(gc["cni.dev/valid-attachments"], want);
        assert_eq!(gc["cni.dev/attachments"], want);
        assert!(gc.get("runtimeConfig").is_none(), "{gc}");
        runner.status(&chain).unwrap();
        assert_eq!(fakes.calls(), ["GC first", "GC second", "STATUS first"]);
        let env_dump = exec_plugin(
            node.name(),
            Path::new("/usr/bin/env"),
            &[("CNI_COMMAND", "VERSION")],
            true,
            b"",
        );
        // env prints KEY=VALUE lines, not JSON: a plugin error that carries its stdout.
        let out = env_dump.unwrap_err().into_plugin_error().stdout;
        let mut keys: Vec<&str> = out.lines().filter_map(|l| l.split('=').next()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["CNI_COMMAND", "PATH"], "{out}");
    }
}
