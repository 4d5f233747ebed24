//! The nodes' `palisade-agent`s: starting and restarting them, their health, their conflist, what
//! they have compiled (pending sets, `compile` output) and queries on the nft JSON they print.

use super::{check_interrupted, tail, Lab, NodeState};
use crate::error::{LabError, Result};
use crate::netns;
use crate::process;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where each agent listens (inside its node namespace, so every node can use the same address).
pub const AGENT_LISTEN: &str = "127.0.0.1:9799";
/// Each node's agent writes its flow log (`--flow-log`) to this file of the node's directory.
pub const FLOW_LOG: &str = "flows.jsonl";

/// How long agents get to write their conflist.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `/healthz` may take to answer `status`.
pub const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(2);

/// A node's agent as `palisade-lab status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHealth {
    pub node: String,
    pub pid: Option<u32>,
    /// The recorded pid is alive and is this lab's process (not a reused pid).
    pub running: bool,
    /// HTTP status of `/healthz` in the node's namespace, or why there was none.
    pub healthz: std::result::Result<u16, String>,
    pub log: PathBuf,
}

impl AgentHealth {
    /// Running and `/healthz` answered 200.
    pub fn healthy(&self) -> bool {
        self.running && self.healthz == Ok(200)
    }
}

impl std::fmt::Display for AgentHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self
            .pid
            .map_or_else(|| "no pid".to_string(), |p| format!("pid {p}"));
        let health = match &self.healthz {
            Ok(200) => "/healthz 200".to_string(),
            Ok(code) => format!("/healthz {code}"),
            Err(e) => format!("/healthz unreachable ({e})"),
        };
        if self.running {
            write!(f, "  {:<7} agent {pid:<10} running  {health}", self.node)
        } else {
            write!(
                f,
                "  {:<7} agent {pid:<10} DEAD     {health}; log {}; `palisade-lab restart-agent {}` starts it",
                self.node,
                self.log.display(),
                self.node
            )
        }
    }
}

/// `GET path` at `addr` inside network namespace `netns` (a thread of ours enters it, nothing else
/// does): the HTTP status code.
pub fn http_status_in_netns(
    netns: &str,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> std::result::Result<u16, String> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    palisade_testkit::http::get_in(&netns::path(netns), addr, path, timeout).map(|r| r.status)
}

impl Lab {
    /// The `/metrics` text of `node`'s agent.
    pub fn agent_metrics(&self, node: &str) -> std::result::Result<String, String> {
        let n = self.node(node).map_err(|e| e.to_string())?;
        let addr: std::net::SocketAddr = AGENT_LISTEN
            .parse()
            .map_err(|e| format!("address {AGENT_LISTEN:?}: {e}"))?;
        palisade_testkit::http::get_in(&netns::path(&n.netns), addr, "/metrics", HEALTHZ_TIMEOUT)
            .map(|r| r.body)
    }

    pub(super) fn start_agent(&mut self, i: usize) -> Result<()> {
        check_interrupted()?;
        let node = self.state.nodes[i].clone();
        let manifests = self.manifests.dir.display().to_string();
        let args: Vec<String> = if !node.agent_args.is_empty() {
            node.agent_args.clone()
        } else {
            let mut args: Vec<String> = vec![
                "run".into(),
                "--node-name".into(),
                node.name.clone(),
                "--manifests".into(),
                manifests,
                "--state-dir".into(),
                node.dir.join("state").display().to_string(),
                "--cni-conf-dir".into(),
                node.dir.join("net.d").display().to_string(),
                "--ipam-data-dir".into(),
                node.dir.join("ipam").display().to_string(),
                "--listen".into(),
                AGENT_LISTEN.into(),
                "--flow-log".into(),
                node.dir.join(FLOW_LOG).display().to_string(),
            ];
            if let Some(level) = &self.state.agent_log_level {
                args.extend(["--log-level".into(), level.clone()]);
            }
            args
        };
        // A restarted agent's log goes after the old one's.
        let log = node.dir.join("agent.log");
        let pid = if node.agent_args.is_empty() {
            process::spawn_in_netns(
                &self.state.name,
                &node.netns,
                &self.state.bins.agent(),
                &args,
                &log,
            )?
        } else {
            process::spawn_in_netns_appending(
                &self.state.name,
                &node.netns,
                &self.state.bins.agent(),
                &args,
                &log,
            )?
        };
        self.state.nodes[i].agent_pid = Some(pid);
        self.state.nodes[i].agent_args = args;
        self.state.save()
    }

    /// The agent of `node`: is its recorded pid alive (and ours), does `/healthz` answer.
    pub fn agent_health(&self, node: &str) -> Result<AgentHealth> {
        let n = self.node(node)?;
        process::reap();
        let running = n
            .agent_pid
            .is_some_and(|p| process::is_ours(p, &self.state.name) && process::alive(p as i32));
        let healthz = http_status_in_netns(&n.netns, AGENT_LISTEN, "/healthz", HEALTHZ_TIMEOUT);
        Ok(AgentHealth {
            node: n.name.clone(),
            pid: n.agent_pid,
            running,
            healthz,
            log: n.dir.join("agent.log"),
        })
    }

    /// Stops `node`'s agent by its recorded pid (SIGTERM, then SIGKILL; only if the pid is still
    /// this lab's) and starts it again with the same arguments; returns once the new agent's
    /// `/readyz` answers 200 (its first sync is committed). Returns (old pid, new pid).
    pub fn restart_agent(&mut self, node: &str) -> Result<(Option<u32>, u32)> {
        let i = self
            .state
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| {
                LabError::Invalid(format!("no node {node:?} in lab {}", self.state.name))
            })?;
        let old = self.state.nodes[i].agent_pid;
        if let Some(pid) = old {
            process::stop(pid, &self.state.name);
        }
        self.start_agent(i)?;
        let n = &self.state.nodes[i];
        let new = n.agent_pid.unwrap_or_default();
        let start = Instant::now();
        loop {
            check_interrupted()?;
            if http_status_in_netns(&n.netns, AGENT_LISTEN, "/readyz", HEALTHZ_TIMEOUT) == Ok(200) {
                return Ok((old, new));
            }
            process::reap();
            if !process::alive(new as i32) {
                return Err(LabError::Command {
                    what: format!("palisade-agent on {node}"),
                    detail: format!(
                        "exited right after the restart; log:\n{}",
                        tail(&n.dir.join("agent.log"))
                    ),
                });
            }
            if start.elapsed() > AGENT_SYNC_TIMEOUT {
                return Err(LabError::Timeout(format!(
                    "restarted palisade-agent on {node} not ready within {AGENT_SYNC_TIMEOUT:?}; log:\n{}",
                    tail(&n.dir.join("agent.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn conflist_path(node: &NodeState) -> PathBuf {
        node.dir
            .join("net.d")
            .join(palisade_contract::CONFLIST_FILE)
    }

    pub(super) fn wait_conflist(&self, i: usize) -> Result<()> {
        let node = &self.state.nodes[i];
        let path = Self::conflist_path(node);
        let start = Instant::now();
        loop {
            check_interrupted()?;
            if path.is_file() {
                return Ok(());
            }
            if let Some(pid) = node.agent_pid {
                process::reap();
                // Our own unreaped child: its pid cannot be reused, and right after the fork its
                // environment is still ours (no marker), so ask only whether it runs.
                if !process::alive(pid as i32) {
                    return Err(LabError::Command {
                        what: format!("palisade-agent on {}", node.name),
                        detail: format!(
                            "exited before writing its conflist; log:\n{}",
                            tail(&node.dir.join("agent.log"))
                        ),
                    });
                }
            }
            if start.elapsed() > AGENT_SYNC_TIMEOUT {
                return Err(LabError::Timeout(format!(
                    "palisade-agent on {} did not write {} within {:?}; log:\n{}",
                    node.name,
                    path.display(),
                    AGENT_SYNC_TIMEOUT,
                    tail(&node.dir.join("agent.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Addresses in a node's pending sets (pods wired but not yet compiled by the agent); an error
    /// when the agent's table or sets do not exist yet.
    pub fn pending_ips(&self, node: &str) -> Result<Vec<IpAddr>> {
        let n = self.node(node)?;
        let mut out = Vec::new();
        for set in [
            palisade_contract::PENDING_SET_V4,
            palisade_contract::PENDING_SET_V6,
        ] {
            let text = crate::cmd::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &n.netns,
                    "nft",
                    "-j",
                    "list",
                    "set",
                    palisade_contract::TABLE_FAMILY,
                    palisade_contract::TABLE_NAME,
                    set,
                ],
                None,
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LabError::Parse {
                    what: format!("nft set {set} on {node}"),
                    detail: e.to_string(),
                })?;
            for item in v
                .get("nftables")
                .and_then(|x| x.as_array())
                .into_iter()
                .flatten()
            {
                for elem in item
                    .get("set")
                    .and_then(|s| s.get("elem"))
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                {
                    let s = elem.as_str().or_else(|| {
                        elem.get("elem")
                            .and_then(|e| e.get("val"))
                            .and_then(|v| v.as_str())
                    });
                    if let Some(ip) = s.and_then(|s| s.parse().ok()) {
                        out.push(ip);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Waits until no pod of the lab is pending on its node (the agent has compiled every pod).
    pub fn wait_pods_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            check_interrupted()?;
            let mut waiting = Vec::new();
            for node in &self.state.nodes {
                match self.pending_ips(&node.name) {
                    Ok(pending) => {
                        for p in self.state.pods.values().filter(|p| p.node == node.name) {
                            if p.ips.iter().any(|ip| pending.contains(ip)) {
                                waiting.push(p.key());
                            }
                        }
                    }
                    Err(e) => waiting.push(format!("{} ({e})", node.name)),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout(format!(
                    "pods still pending after {timeout:?} (the agent has not compiled them): {}",
                    waiting.join(", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `palisade-agent compile --manifests DIR --node-name NODE --state-dir NODE/state`: the ruleset
/// the agent would commit on that node, as printed by the agent (nft JSON).
pub fn run_agent_compile(lab: &Lab, manifests: &Path, node: &NodeState) -> Result<String> {
    let manifests = manifests.display().to_string();
    let state_dir = node.dir.join("state").display().to_string();
    let agent = lab.state.bins.agent();
    let agent = agent.display().to_string();
    crate::cmd::run(
        &agent,
        &[
            "compile",
            "--manifests",
            &manifests,
            "--node-name",
            &node.name,
            "--state-dir",
            &state_dir,
        ],
        None,
    )
}

fn contains_string(v: &serde_json::Value, s: &str) -> bool {
    match v {
        serde_json::Value::String(x) => x == s,
        serde_json::Value::Array(a) => a.iter().any(|x| contains_string(x, s)),
        serde_json::Value::Object(o) => o.values().any(|x| contains_string(x, s)),
        _ => false,
    }
}

/// Whether nft JSON holds `value` among the elements of the map or set named `name` (in a `map`,
/// `set` or `element` object).
pub fn map_has_element(v: &serde_json::Value, name: &str, value: &str) -> bool {
    match v {
        serde_json::Value::Array(a) => a.iter().any(|x| map_has_element(x, name, value)),
        serde_json::Value::Object(o) => {
            let here = o.get("name").and_then(|n| n.as_str()) == Some(name)
                && o.get("elem").is_some_and(|e| contains_string(e, value));
            here || o.values().any(|x| map_has_element(x, name, value))
        }
        _ => false,
    }
}

/// Whether nft JSON holds an SCTP port rule for `port`: a `sctp . port` concatenation element, or a
/// match whose left side names sctp and whose right side holds the port.
pub fn has_sctp_port(v: &serde_json::Value, port: u16) -> bool {
    use serde_json::Value as J;
    let is_port = |x: &J| x.as_u64() == Some(u64::from(port));
    let holds_port = |x: &J| contains_number(x, u64::from(port));
    match v {
        J::Array(a) => {
            // A set element `sctp . 81`, or a rule's matches `meta l4proto sctp` and `th dport 81`.
            let matched = |want: &dyn Fn(&J) -> bool| {
                a.iter()
                    .any(|x| x.pointer("/match/right").is_some_and(want))
            };
            (a.iter().any(|x| x.as_str() == Some("sctp")) && a.iter().any(is_port))
                || (matched(&|r| r.as_str() == Some("sctp")) && matched(&is_port))
                || a.iter().any(|x| has_sctp_port(x, port))
        }
        J::Object(o) => {
            let this = o.get("match").is_some_and(|m| {
                m.get("left").is_some_and(|l| contains_string(l, "sctp"))
                    && m.get("right").is_some_and(holds_port)
            });
            this || o.values().any(|x| has_sctp_port(x, port))
        }
        _ => false,
    }
}

fn contains_number(v: &serde_json::Value, n: u64) -> bool {
    match v {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Array(a) => a.iter().any(|x| contains_number(x, n)),
        serde_json::Value::Object(o) => o.values().any(|x| contains_number(x, n)),
        _ => false,
    }
}

#[cfg(test)]
mod nft_json_tests {
    use super::*;

    #[test]
    fn sctp_port_rules_are_found_in_concatenations_and_matches_only() {
        let concat = serde_json::json!({"add": {"set": {"name": "ports_x", "elem": [{"concat": ["sctp", 81]}]}}});
        assert!(has_sctp_port(&concat, 81));
        assert!(!has_sctp_port(&concat, 80));
        let tcp = serde_json::json!({"add": {"set": {"comment": "sctp-only", "elem": [{"concat": ["tcp", 81]}]}}});
        assert!(
            !has_sctp_port(&tcp, 81),
            "a policy named sctp-only is no SCTP rule"
        );
        let m = serde_json::json!({"match": {"op": "==", "left": {"payload": {"protocol": "sctp", "field": "dport"}}, "right": 81}});
        assert!(has_sctp_port(&m, 81));
        // A rule of one port: `meta l4proto sctp th dport 81`.
        let rule = |proto: &str| {
            serde_json::json!({"add": {"rule": {"expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 81}},
                {"accept": null}]}}})
        };
        assert!(has_sctp_port(&rule("sctp"), 81));
        assert!(!has_sctp_port(&rule("sctp"), 80));
        assert!(!has_sctp_port(&rule("tcp"), 81));
    }

    #[test]
    fn map_elements_are_found_by_map_name() {
        let v = serde_json::json!([{"add": {"map": {"name": "ingress_v4", "elem": [["10.244.1.3", {"goto": {"target": "in_a"}}]]}}}]);
        assert!(map_has_element(&v, "ingress_v4", "10.244.1.3"));
        assert!(!map_has_element(&v, "egress_v4", "10.244.1.3"));
        assert!(!map_has_element(&v, "ingress_v4", "10.244.1.30"));
    }
}
