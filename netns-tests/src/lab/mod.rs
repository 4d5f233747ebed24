//! The lab: nodes as network namespaces joined by an underlay bridge, each running the real
//! `palisade-agent`; pods as namespaces wired by the real `palisade` CNI plugin and running
//! `palisade-probe serve`. All state lives in a run directory so separate CLI invocations (and a
//! `down` after a crash) find everything the lab created.

mod agent;
mod agent_logs;
mod objects;
mod probe;
mod state;
mod topology;

pub use agent::{
    has_sctp_port, http_status_in_netns, map_has_element, run_agent_compile, AgentHealth,
    AGENT_LISTEN, FLOW_LOG, HEALTHZ_TIMEOUT,
};
pub use agent_logs::{AgentLogMark, REPORT_LINES};
pub use probe::{Family, ProbeRecord, DEFAULT_PROBE_TIMEOUT};
pub use state::{down_run_dir, list_labs, teardown, ExternalState, LabState, NodeState, PodState};
pub use topology::{
    node_underlay_v4, node_underlay_v6, Topology, EXTERNAL_NAME, EXTERNAL_V4, EXTERNAL_V6,
    NODE_UPLINK, OVERLAY_UDP_PORT,
};

use self::state::STATE_FILE;
use crate::error::{LabError, Result};
use crate::k8s::ManifestDir;
use crate::signals;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Parent of every lab's run directory.
pub const RUN_ROOT: &str = "/run/palisade-lab";

/// Environment variable naming the directory with `palisade`, `palisade-agent`, `palisade-probe`.
pub const BIN_DIR_ENV: &str = "PALISADE_BIN_DIR";

/// Paths of the three binaries the lab drives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// `$PALISADE_BIN_DIR`; else the directory of the running executable (or its parent, for test
    /// binaries in `deps/`) when it holds `palisade-agent`; else the workspace's `target/debug`.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Self {
                dir: PathBuf::from(dir),
            };
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1).take(2) {
                if dir.join("palisade-agent").is_file() {
                    return Self {
                        dir: dir.to_path_buf(),
                    };
                }
            }
        }
        Self {
            dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
        }
    }
    pub fn plugin(&self) -> PathBuf {
        self.dir.join("palisade")
    }
    pub fn agent(&self) -> PathBuf {
        self.dir.join("palisade-agent")
    }
    pub fn probe(&self) -> PathBuf {
        self.dir.join("palisade-probe")
    }
    /// Fails with a clear message when a binary has not been built.
    pub fn check(&self) -> Result<()> {
        for b in [self.plugin(), self.agent(), self.probe()] {
            if !b.is_file() {
                return Err(LabError::Invalid(format!(
                    "{} not found: run `cargo build --workspace --bins` first (or set {BIN_DIR_ENV})",
                    b.display()
                )));
            }
        }
        Ok(())
    }
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Short name, `[a-z0-9]{1,10}`: namespaces are `pl-<name>-...`.
    pub name: String,
    pub nodes: usize,
    pub run_root: PathBuf,
    pub bins: Bins,
    /// Also build an external network (a namespace with a server) behind the underlay's router.
    pub external: bool,
    /// How the nodes' underlay is laid out.
    pub topology: Topology,
    /// The agents' `--log-level` (RUST_LOG syntax); `None`: theirs (`info`, or `RUST_LOG`).
    pub agent_log_level: Option<String>,
}

impl LabOptions {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            nodes: 2,
            run_root: PathBuf::from(RUN_ROOT),
            bins: Bins::from_env(),
            external: false,
            topology: Topology::Flat,
            agent_log_level: None,
        }
    }

    /// The test suites' options: every commit and every object the agents see is logged, so
    /// a failed case's report (which carries the agents' log lines of the case) shows when each
    /// node committed what.
    pub fn for_tests(name: &str) -> Self {
        Self {
            agent_log_level: Some(TEST_AGENT_LOG_LEVEL.into()),
            ..Self::new(name)
        }
    }
}

/// The agents' log filter in test labs ([`LabOptions::for_tests`]).
pub const TEST_AGENT_LOG_LEVEL: &str = "info,palisade_agent::reconcile=debug";

/// A unique lab name for a test: `t<pid><counter>`.
pub fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A running lab. Dropping it tears everything down, unless it was [`Lab::detach`]ed.
pub struct Lab {
    state: LabState,
    manifests: ManifestDir,
    owned: bool,
}

fn valid_lab_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_interrupted() -> Result<()> {
    if signals::interrupted() {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

impl Lab {
    /// Run directory of a lab name.
    pub fn run_dir_of(run_root: &Path, name: &str) -> PathBuf {
        run_root.join(name)
    }

    /// Builds the nodes, underlay and agents (no pods yet); tears down whatever it built on error,
    /// panic or signal.
    pub fn up(opts: &LabOptions) -> Result<Lab> {
        if !valid_lab_name(&opts.name) {
            return Err(LabError::Invalid(format!(
                "lab name {:?}: use 1-16 of [a-z0-9]",
                opts.name
            )));
        }
        if opts.nodes == 0 || opts.nodes > 200 {
            return Err(LabError::Invalid("a lab has 1 to 200 nodes".into()));
        }
        opts.bins.check()?;
        let run_dir = Self::run_dir_of(&opts.run_root, &opts.name);
        if run_dir.join(STATE_FILE).exists() {
            return Err(LabError::Invalid(format!(
                "lab {} is already up ({}); run `palisade-lab down --name {}` first",
                opts.name,
                run_dir.display(),
                opts.name
            )));
        }
        std::fs::create_dir_all(run_dir.join("manifests")).map_err(LabError::io(&run_dir))?;
        let state = LabState {
            name: opts.name.clone(),
            run_dir: run_dir.clone(),
            bins: opts.bins.clone(),
            netns: Vec::new(),
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            external: None,
            counter: 0,
            topology: opts.topology,
            agent_log_level: opts.agent_log_level.clone(),
        };
        state.save()?;
        signals::register(&run_dir);
        let mut lab = Lab {
            manifests: ManifestDir::new(run_dir.join("manifests")),
            state,
            owned: true,
        };
        // On error, `lab` is dropped here and tears down what exists.
        lab.build(opts)?;
        Ok(lab)
    }

    /// Opens a running lab (from a previous `up`); dropping it leaves the lab running.
    pub fn open(run_root: &Path, name: &str) -> Result<Lab> {
        let run_dir = Self::run_dir_of(run_root, name);
        let state = LabState::load(&run_dir).map_err(|e| {
            LabError::Invalid(format!(
                "no lab {name:?} is up ({e}); start one with `palisade-lab up DIR`"
            ))
        })?;
        Ok(Lab {
            manifests: ManifestDir::new(run_dir.join("manifests")),
            state,
            owned: false,
        })
    }

    /// Leaves the lab running when this handle is dropped (CLI `up`).
    pub fn detach(mut self) {
        self.owned = false;
        signals::unregister(&self.state.run_dir);
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    fn node(&self, name: &str) -> Result<&NodeState> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                LabError::Invalid(format!("no node {name:?} in lab {}", self.state.name))
            })
    }

    /// Node state by name.
    pub fn node_state(&self, name: &str) -> Result<&NodeState> {
        self.node(name)
    }

    /// Pods, sorted by `namespace/name`.
    pub fn pods(&self) -> impl Iterator<Item = &PodState> {
        self.state.pods.values()
    }

    pub fn pod(&self, key: &str) -> Result<&PodState> {
        self.state
            .pods
            .get(key)
            .ok_or_else(|| LabError::Invalid(format!("no pod {key} in lab {}", self.state.name)))
    }

    /// Tears everything down now (also done on drop for owned labs).
    pub fn down(mut self) -> Result<()> {
        self.owned = false;
        // Unregister only afterwards: a signal arriving meanwhile waits for this teardown.
        let r = teardown(&self.state);
        signals::unregister(&self.state.run_dir);
        r
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            self.owned = false;
            if let Err(e) = teardown(&self.state) {
                eprintln!("palisade-lab: tearing down lab {}: {e}", self.state.name);
            }
            // Only now: a signal arriving during the teardown waits for it instead of exiting.
            signals::unregister(&self.state.run_dir);
        }
    }
}

fn cmd_ip(args: &[&str]) -> Result<String> {
    crate::cmd::ip(args)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
