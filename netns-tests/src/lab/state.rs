//! What a lab created, persisted in its run directory after every change: the state types, their
//! load and save, and the teardown that works from the state file alone (after a crash too).

use super::objects::teardown_pod;
use super::{Bins, Topology};
use crate::cni;
use crate::error::{LabError, Result};
use crate::netns;
use crate::process;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// State file inside a run directory.
pub(super) const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub index: usize,
    pub netns: String,
    pub dir: PathBuf,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    pub agent_pid: Option<u32>,
    /// The arguments the agent was started with (`restart-agent` starts it again with the same).
    #[serde(default)]
    pub agent_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    pub cni_result: Option<serde_json::Value>,
    pub server_pid: Option<u32>,
    /// `hostNetwork: true`: no sandbox and no CNI; `netns` is the node's, `ips` are the node's.
    #[serde(default)]
    pub host_network: bool,
    /// What the runtime asked of CNI (hostPorts, requested addresses); DEL gets the same.
    #[serde(default)]
    pub runtime_args: cni::RuntimeArgs,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExternalState {
    pub netns: String,
    pub server_pid: Option<u32>,
}

/// Everything a lab created, persisted after every change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub run_dir: PathBuf,
    pub bins: Bins,
    /// Every namespace the lab created (recorded before it is created), in creation order.
    pub netns: Vec<String>,
    pub nodes: Vec<NodeState>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, PodState>,
    pub external: Option<ExternalState>,
    pub counter: u64,
    /// Recorded so `status` and tests know it; absent in older state files: flat.
    #[serde(default)]
    pub topology: Topology,
    /// The agents' `--log-level`, when the lab was asked for one.
    #[serde(default)]
    pub agent_log_level: Option<String>,
}

impl LabState {
    pub(super) fn save(&self) -> Result<()> {
        let path = self.run_dir.join(STATE_FILE);
        let tmp = self.run_dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| LabError::Parse {
            what: "lab state".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(LabError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(LabError::io(&path))
    }

    pub(super) fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(LabError::io(&path))?;
        serde_json::from_slice(&text).map_err(|e| LabError::Parse {
            what: path.display().to_string(),
            detail: e.to_string(),
        })
    }
}

/// Removes everything a lab created, from its state: pods (CNI DEL), servers, agents, namespaces,
/// run directory. Keeps going past errors and reports them all.
pub fn teardown(state: &LabState) -> Result<()> {
    let mut errors = Vec::new();
    for pod in state.pods.values() {
        teardown_pod(state, pod, &mut errors);
    }
    if let Some(ext) = &state.external {
        if let Some(pid) = ext.server_pid {
            process::stop(pid, &state.name);
        }
    }
    for node in &state.nodes {
        if let Some(pid) = node.agent_pid {
            process::stop(pid, &state.name);
        }
    }
    // Anything else carrying our marker (e.g. a process whose pid a crash kept out of the state).
    for pid in process::lab_pids(&state.name) {
        process::stop(pid, &state.name);
    }
    for ns in state.netns.iter().rev() {
        if let Err(e) = netns::delete(ns) {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&state.run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(format!("{}: {e}", state.run_dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown(errors))
    }
}

/// `down` for a run directory: works from the state file alone (after a crash too).
pub fn down_run_dir(run_dir: &Path) -> Result<()> {
    let state = LabState::load(run_dir)?;
    teardown(&state)
}

/// Every lab run directory under a root that has a state file.
pub fn list_labs(run_root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(run_root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join(STATE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
