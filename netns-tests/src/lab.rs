//! The lab: nodes as network namespaces joined by an underlay bridge, each running the real
//! `palisade-agent`; pods as namespaces wired by the real `palisade` CNI plugin and running
//! `palisade-probe serve`. All state lives in a run directory so separate CLI invocations (and a
//! `down` after a crash) find everything the lab created.

use crate::cni;
use crate::error::{LabError, Result};
use crate::k8s::{self, LabelEdit, ManifestDir, ObjKey};
use crate::netns;
use crate::probe::{Outcome, Protocol, Target};
use crate::process;
use crate::signals;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Parent of every lab's run directory.
pub const RUN_ROOT: &str = "/run/palisade-lab";
/// Environment variable naming the directory with `palisade`, `palisade-agent`, `palisade-probe`.
pub const BIN_DIR_ENV: &str = "PALISADE_BIN_DIR";
/// Where each agent listens (inside its node namespace, so every node can use the same address).
pub const AGENT_LISTEN: &str = "127.0.0.1:9799";
/// Bridge joining the nodes, inside the underlay namespace.
/// UDP conntrack timeouts in lab nodes (seconds): short, so a probe reusing an earlier probe's source
/// port does not ride that probe's entry across a policy change (see where they are set).
const LAB_UDP_CT_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout=1";
const LAB_UDP_CT_STREAM_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout_stream=1";

const UNDERLAY_BRIDGE: &str = "br0";
/// Name of a node's underlay interface inside its namespace.
const NODE_UPLINK: &str = "eth0";
/// Interface of the node that has the external network behind it.
const NODE_EXTERNAL_LINK: &str = "ext0";
/// State file inside a run directory.
const STATE_FILE: &str = "state.json";
/// How long agents get to write their conflist.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Default probe timeout per connection.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// The external network behind node 1 (an address outside every pod CIDR, reached via ipBlock).
pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const EXTERNAL_GW_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x77, 0, 0, 0, 2);
const EXTERNAL_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x77, 0, 0, 0, 1);
/// Name the external server answers with.
pub const EXTERNAL_NAME: &str = "external";

/// Node `n` (1-based) underlay IPv4 address.
pub fn node_underlay_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, n as u8)
}
/// Node `n` underlay IPv6 address.
pub fn node_underlay_v6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, n as u16)
}

/// Address family of probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn pick(self, ips: &[IpAddr]) -> Option<IpAddr> {
        ips.iter()
            .copied()
            .find(|ip| ip.is_ipv4() == (self == Family::V4))
    }
}

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
    use std::io::{Read, Write};
    let ns_path = netns::path(netns);
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&ns_path).map_err(|e| format!("{}: {e}", ns_path.display()))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {}: {e}", ns_path.display()))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        out.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                format!(
                    "not an HTTP answer: {:?}",
                    out.lines().next().unwrap_or_default()
                )
            })
    })
    .join()
    .map_err(|_| "the HTTP thread panicked".to_string())?
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
    pub behind: String,
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
}

impl LabState {
    fn save(&self) -> Result<()> {
        let path = self.run_dir.join(STATE_FILE);
        let tmp = self.run_dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| LabError::Parse {
            what: "lab state".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(LabError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(LabError::io(&path))
    }

    fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(LabError::io(&path))?;
        serde_json::from_slice(&text).map_err(|e| LabError::Parse {
            what: path.display().to_string(),
            detail: e.to_string(),
        })
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
    /// Also build an external network (a namespace with a server) behind node 1.
    pub external: bool,
    /// How the nodes' underlay is laid out.
    pub topology: Topology,
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
        }
    }
}

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

    fn new_netns(&mut self, role: &str) -> Result<String> {
        check_interrupted()?;
        let name = format!("pl-{}-{role}", self.state.name);
        self.state.netns.push(name.clone());
        self.state.save()?;
        netns::create(&name)?;
        Ok(name)
    }

    fn build(&mut self, opts: &LabOptions) -> Result<()> {
        let ul = self.new_netns("ul")?;
        cmd_ip(&["-n", &ul, "link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        cmd_ip(&["-n", &ul, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        for i in 1..=opts.nodes {
            self.add_node(&ul, i)?;
        }
        self.count_encapsulation(&ul)?;
        if opts.topology == Topology::Routed {
            self.route_underlay(&ul, opts)?;
        }
        if opts.external {
            self.add_external()?;
        }
        for i in 0..self.state.nodes.len() {
            self.start_agent(i)?;
        }
        for i in 0..self.state.nodes.len() {
            self.wait_conflist(i)?;
        }
        Ok(())
    }

    fn add_node(&mut self, ul: &str, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let ns = self.new_netns(&name)?;
        let ul_port = format!("n{i}");
        cmd_ip(&[
            "-n",
            ul,
            "link",
            "add",
            &ul_port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_UPLINK,
            "netns",
            &ns,
        ])?;
        cmd_ip(&[
            "-n",
            ul,
            "link",
            "set",
            &ul_port,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ])?;
        cmd_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node_underlay_v4(i)),
            "dev",
            NODE_UPLINK,
        ])?;
        cmd_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", node_underlay_v6(i)),
            "dev",
            NODE_UPLINK,
            "nodad",
        ])?;
        cmd_ip(&["-n", &ns, "link", "set", NODE_UPLINK, "up"])?;
        netns::sysctl(
            &ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                // Probes are new sockets, but one may reuse an ephemeral UDP source port and so the
                // 5-tuple of an earlier probe whose conntrack entry (30 s, 120 s once answered) is
                // still ESTABLISHED: that flow predates a policy change and rides the entry, which is
                // conntrack's (implementation-defined) behaviour, not what a matrix means to check.
                // Seen once in CI: z/c -> y/a UDP/80 connected under deny-all. Node namespaces only.
                LAB_UDP_CT_TIMEOUT,
                LAB_UDP_CT_STREAM_TIMEOUT,
            ],
        )?;
        let dir = self.state.run_dir.join("nodes").join(&name);
        for sub in ["state", "net.d", "ipam"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(LabError::io(dir.join(sub)))?;
        }
        let node = NodeState {
            name: name.clone(),
            index: i,
            netns: ns,
            dir,
            pod_cidr_v4: format!("10.244.{i}.0/24"),
            pod_cidr_v6: format!("fd00:10:244:{i:x}::/64"),
            agent_pid: None,
            agent_args: Vec::new(),
        };
        let obj = node_object(&node);
        self.manifests.write(&obj)?;
        self.state.nodes.push(node);
        self.state.save()
    }

    fn add_external(&mut self) -> Result<()> {
        let ext = self.new_netns("ext")?;
        let behind = self
            .state
            .nodes
            .first()
            .cloned()
            .ok_or_else(|| LabError::Invalid("no node".into()))?;
        cmd_ip(&[
            "-n",
            &behind.netns,
            "link",
            "add",
            NODE_EXTERNAL_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ext,
        ])?;
        cmd_ip(&[
            "-n",
            &behind.netns,
            "addr",
            "add",
            &format!("{EXTERNAL_GW_V4}/24"),
            "dev",
            NODE_EXTERNAL_LINK,
        ])?;
        cmd_ip(&[
            "-n",
            &behind.netns,
            "addr",
            "add",
            &format!("{EXTERNAL_GW_V6}/64"),
            "dev",
            NODE_EXTERNAL_LINK,
            "nodad",
        ])?;
        cmd_ip(&["-n", &behind.netns, "link", "set", NODE_EXTERNAL_LINK, "up"])?;
        cmd_ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{EXTERNAL_V4}/24"),
            "dev",
            "eth0",
        ])?;
        cmd_ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{EXTERNAL_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        cmd_ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        // As the internet: it knows the nodes' addresses and no pod network, so a pod reaches it
        // only through the node's egress NAT (and its replies find the node, then conntrack).
        for n in &self.state.nodes {
            cmd_ip(&[
                "-n",
                &ext,
                "route",
                "add",
                &node_underlay_v4(n.index).to_string(),
                "via",
                &EXTERNAL_GW_V4.to_string(),
            ])?;
            cmd_ip(&[
                "-n",
                &ext,
                "-6",
                "route",
                "add",
                &node_underlay_v6(n.index).to_string(),
                "via",
                &EXTERNAL_GW_V6.to_string(),
            ])?;
        }
        // The other nodes reach the external network through node 1's underlay address.
        for n in self.state.nodes.iter().filter(|n| n.name != behind.name) {
            cmd_ip(&[
                "-n",
                &n.netns,
                "route",
                "add",
                "192.168.77.0/24",
                "via",
                &node_underlay_v4(behind.index).to_string(),
            ])?;
            cmd_ip(&[
                "-n",
                &n.netns,
                "-6",
                "route",
                "add",
                "fd00:192:168:77::/64",
                "via",
                &node_underlay_v6(behind.index).to_string(),
            ])?;
        }
        let log = self.state.run_dir.join("external.log");
        let pid = process::spawn_in_netns(
            &self.state.name,
            &ext,
            &self.state.bins.probe(),
            &[
                "serve".into(),
                "--name".into(),
                EXTERNAL_NAME.into(),
                "--tcp".into(),
                "80,81".into(),
                "--udp".into(),
                "80,81".into(),
            ],
            &log,
        )?;
        self.state.external = Some(ExternalState {
            netns: ext,
            behind: behind.name,
            server_pid: Some(pid),
        });
        self.state.save()
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        check_interrupted()?;
        let node = self.state.nodes[i].clone();
        let manifests = self.manifests.dir.display().to_string();
        let args: Vec<String> = if !node.agent_args.is_empty() {
            node.agent_args.clone()
        } else {
            vec![
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
            ]
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

    fn conflist_path(node: &NodeState) -> PathBuf {
        node.dir
            .join("net.d")
            .join(palisade_contract::CONFLIST_FILE)
    }

    fn wait_conflist(&self, i: usize) -> Result<()> {
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

    fn node(&self, name: &str) -> Result<&NodeState> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                LabError::Invalid(format!("no node {name:?} in lab {}", self.state.name))
            })
    }

    /// Applies objects as `kubectl apply` would: namespaces first, pods last. Pods that exist get
    /// their labels updated (a pod's spec is immutable); new pods are wired and started.
    pub fn apply(&mut self, objects: Vec<Value>) -> Result<()> {
        let mut objects = objects;
        objects.sort_by_key(|o| match o.get("kind").and_then(Value::as_str) {
            Some("Namespace") => 0,
            Some("Pod") => 2,
            _ => 1,
        });
        for obj in objects {
            check_interrupted()?;
            let key = k8s::key_of(&obj)?;
            match key.kind.as_str() {
                "Namespace" => {
                    let mut obj = obj;
                    // The API server sets this label on every namespace; policies select by it.
                    k8s::edit_labels(
                        &mut obj,
                        &[LabelEdit::Set(
                            k8s::NAMESPACE_NAME_LABEL.into(),
                            key.name.clone(),
                        )],
                    )?;
                    self.manifests.write(&obj)?;
                }
                "Pod" => self.apply_pod(obj, &key)?,
                "Node" => {
                    return Err(LabError::Invalid(format!(
                        "{key}: the lab owns Node objects; do not apply them"
                    )));
                }
                _ => {
                    self.require_namespace(&key)?;
                    self.manifests.write(&obj)?;
                }
            }
        }
        Ok(())
    }

    fn require_namespace(&self, key: &ObjKey) -> Result<()> {
        if key.namespace.is_empty()
            || self
                .read_object(&ObjKey::new("Namespace", "", &key.namespace))
                .is_ok()
        {
            Ok(())
        } else {
            Err(LabError::Invalid(format!(
                "{key}: namespace {:?} not found (apply the Namespace first)",
                key.namespace
            )))
        }
    }

    /// Reads an object back from the manifest directory.
    pub fn read_object(&self, key: &ObjKey) -> Result<Value> {
        let path = self.manifests.dir.join(key.file_name());
        let text = std::fs::read_to_string(&path)
            .map_err(|_| LabError::Invalid(format!("{key} not found")))?;
        crate::yaml::from_str(&text, &path.display().to_string())
    }

    fn apply_pod(&mut self, obj: Value, key: &ObjKey) -> Result<()> {
        self.require_namespace(key)?;
        let pod_key = format!("{}/{}", key.namespace, key.name);
        // A pod without a sandbox (Pending, terminated) exists as its object only.
        if self.state.pods.contains_key(&pod_key) || self.read_object(key).is_ok() {
            let mut current = self.read_object(key)?;
            let labels = obj
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .cloned()
                .unwrap_or(Value::Null);
            k8s::set_path(&mut current, &["metadata", "labels"], labels)?;
            self.manifests.write(&current)?;
            return Ok(());
        }
        if k8s::requested_phase(&obj)? == Some(k8s::PodPhase::Pending) {
            return self.create_pending_pod(obj, key);
        }
        self.create_pod(obj, key)
    }

    fn create_pod(&mut self, mut obj: Value, key: &ObjKey) -> Result<()> {
        let node_name = match k8s::get_str(&obj, &["spec", "nodeName"]) {
            Some(n) => n.to_string(),
            None => {
                // Spread unscheduled pods round-robin, as a scheduler might.
                let n = &self.state.nodes[(self.state.counter as usize) % self.state.nodes.len()];
                let n = n.name.clone();
                k8s::set_path(&mut obj, &["spec", "nodeName"], Value::from(n.as_str()))?;
                n
            }
        };
        let node = self.node(&node_name)?.clone();
        self.state.counter += 1;
        let seq = self.state.counter;
        let uid = match k8s::get_str(&obj, &["metadata", "uid"]) {
            Some(u) => u.to_string(),
            None => {
                let u = pseudo_uid(&self.state.name, &key.namespace, &key.name, seq);
                k8s::set_path(&mut obj, &["metadata", "uid"], Value::from(u.as_str()))?;
                u
            }
        };
        if k8s::host_network(&obj) {
            return self.create_host_network_pod(obj, key, &node, uid);
        }
        let runtime_args = cni::RuntimeArgs {
            port_mappings: k8s::host_ports(&obj)?,
            ips: k8s::requested_ips(&obj)?,
        };
        let container_id = format!("pl{}{}", self.state.name, seq);
        let pod_ns = self.new_netns(&format!("p{seq}"))?;
        let pod_key = format!("{}/{}", key.namespace, key.name);
        self.state.pods.insert(
            pod_key.clone(),
            PodState {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: uid.clone(),
                node: node.name.clone(),
                netns: pod_ns.clone(),
                container_id: container_id.clone(),
                ips: Vec::new(),
                cni_result: None,
                server_pid: None,
                host_network: false,
                runtime_args: runtime_args.clone(),
            },
        );
        self.state.save()?;
        let pod_netns_path = netns::path(&pod_ns);
        let inv = cni::Invocation {
            node_netns: &node.netns,
            container_id: &container_id,
            pod_netns_path: &pod_netns_path,
            pod_namespace: &key.namespace,
            pod_name: &key.name,
            pod_uid: &uid,
        };
        // The agent's whole conflist, as the runtime runs it. A failed ADD (or a result without
        // the addresses asked for) tears the sandbox down again, as a runtime does.
        let added = cni::read_conflist(&Self::conflist_path(&node))
            .and_then(|c| cni::Chain::from_conflist(&c))
            .and_then(|chain| {
                cni::add(
                    &chain,
                    &cni::cni_path(&self.state.bins.dir),
                    &runtime_args,
                    &inv,
                )
            })
            .and_then(|result| {
                let ips = cni::result_ips(&result);
                if ips.is_empty() {
                    return Err(LabError::Parse {
                        what: format!("CNI ADD result for pod {pod_key}"),
                        detail: format!("no ips: {result}"),
                    });
                }
                if let Some(ip) = runtime_args.ips.iter().find(|ip| !ips.contains(ip)) {
                    return Err(LabError::Invalid(format!(
                        "pod {pod_key} asked for {ip} ({}) and got {ips:?}: the address is taken or outside {}'s podCIDRs",
                        k8s::IPS_ANNOTATION,
                        node.name
                    )));
                }
                Ok(result)
            });
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                let errors = self.discard_sandbox(&pod_key);
                return Err(if errors.is_empty() {
                    e
                } else {
                    LabError::Command {
                        what: format!("creating pod {pod_key}"),
                        detail: format!(
                            "{e}; then tearing its sandbox down: {}",
                            errors.join("; ")
                        ),
                    }
                });
            }
        };
        let ips = cni::result_ips(&result);
        if let Some(p) = self.state.pods.get_mut(&pod_key) {
            p.ips = ips.clone();
            p.cni_result = Some(result);
        }
        self.state.save()?;
        self.start_server(&pod_key, &obj, &pod_ns)?;
        self.write_running(obj, &ips, &node)
    }

    /// `palisade-probe serve` in `netns` on the pod's declared TCP and UDP container ports.
    fn start_server(&mut self, pod_key: &str, obj: &Value, netns: &str) -> Result<()> {
        let pod_key = pod_key.to_string();
        let key = k8s::key_of(obj)?;
        let ports = k8s::container_ports(obj);
        let tcp: Vec<String> = ports
            .iter()
            .filter(|(_, p)| p == "TCP")
            .map(|(n, _)| n.to_string())
            .collect();
        let udp: Vec<String> = ports
            .iter()
            .filter(|(_, p)| p == "UDP")
            .map(|(n, _)| n.to_string())
            .collect();
        for (port, proto) in ports.iter().filter(|(_, p)| p != "TCP" && p != "UDP") {
            tracing::warn!(pod = %pod_key, port, protocol = %proto, "no server for this protocol (the kernel has no sockets for it)");
        }
        let mut args = vec!["serve".to_string(), "--name".to_string(), pod_key.clone()];
        if !tcp.is_empty() {
            args.extend(["--tcp".to_string(), tcp.join(",")]);
        }
        if !udp.is_empty() {
            args.extend(["--udp".to_string(), udp.join(",")]);
        }
        let log = self
            .state
            .run_dir
            .join(format!("pod-{}-{}.log", key.namespace, key.name));
        let pid = process::spawn_in_netns(
            &self.state.name,
            netns,
            &self.state.bins.probe(),
            &args,
            &log,
        )?;
        if let Some(p) = self.state.pods.get_mut(&pod_key) {
            p.server_pid = Some(pid);
        }
        self.state.save()?;
        Ok(())
    }

    /// Writes the Pod object as the kubelet reports a started pod: Running, its addresses, hostIP.
    fn write_running(&mut self, mut obj: Value, ips: &[IpAddr], node: &NodeState) -> Result<()> {
        let first = ips
            .first()
            .ok_or_else(|| LabError::Invalid("a running pod needs an address".into()))?;
        // What the kubelet reports once the sandbox is up.
        let pod_ips: Vec<Value> = ips
            .iter()
            .map(|ip| {
                let mut m = serde_json::Map::new();
                m.insert("ip".into(), Value::from(ip.to_string()));
                Value::Object(m)
            })
            .collect();
        k8s::set_path(&mut obj, &["status", "phase"], Value::from("Running"))?;
        k8s::set_path(
            &mut obj,
            &["status", "podIP"],
            Value::from(first.to_string()),
        )?;
        k8s::set_path(&mut obj, &["status", "podIPs"], Value::Array(pod_ips))?;
        k8s::set_path(
            &mut obj,
            &["status", "hostIP"],
            Value::from(node_underlay_v4(node.index).to_string()),
        )?;
        self.manifests.write(&obj)?;
        Ok(())
    }

    /// A `hostNetwork: true` pod: no sandbox, no CNI; its server runs in the node's namespace and
    /// its status carries the node's addresses, as the kubelet reports them.
    fn create_host_network_pod(
        &mut self,
        obj: Value,
        key: &ObjKey,
        node: &NodeState,
        uid: String,
    ) -> Result<()> {
        if k8s::annotation(&obj, k8s::IPS_ANNOTATION).is_some() {
            return Err(LabError::Invalid(format!(
                "{key}: a hostNetwork pod has its node's addresses; drop {}",
                k8s::IPS_ANNOTATION
            )));
        }
        let pod_key = format!("{}/{}", key.namespace, key.name);
        let ips = vec![
            IpAddr::V4(node_underlay_v4(node.index)),
            IpAddr::V6(node_underlay_v6(node.index)),
        ];
        self.state.pods.insert(
            pod_key.clone(),
            PodState {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid,
                node: node.name.clone(),
                netns: node.netns.clone(),
                container_id: String::new(),
                ips: ips.clone(),
                cni_result: None,
                server_pid: None,
                host_network: true,
                runtime_args: cni::RuntimeArgs::default(),
            },
        );
        self.state.save()?;
        self.start_server(&pod_key, &obj, &node.netns)?;
        self.write_running(obj, &ips, node)
    }

    /// A Pod that is scheduled but not started (`palisade-lab/phase: Pending`): its object says
    /// Pending and has no address; no sandbox exists until `set_pod_phase(.., Running)`.
    fn create_pending_pod(&mut self, mut obj: Value, key: &ObjKey) -> Result<()> {
        // Refuse now what would fail at start.
        k8s::host_ports(&obj)?;
        k8s::requested_ips(&obj)?;
        let node = match k8s::get_str(&obj, &["spec", "nodeName"]) {
            Some(n) => n.to_string(),
            None => {
                let n = self.state.nodes[(self.state.counter as usize) % self.state.nodes.len()]
                    .name
                    .clone();
                k8s::set_path(&mut obj, &["spec", "nodeName"], Value::from(n.as_str()))?;
                n
            }
        };
        self.node(&node)?;
        self.state.counter += 1;
        if k8s::get_str(&obj, &["metadata", "uid"]).is_none() {
            let u = pseudo_uid(
                &self.state.name,
                &key.namespace,
                &key.name,
                self.state.counter,
            );
            k8s::set_path(&mut obj, &["metadata", "uid"], Value::from(u.as_str()))?;
        }
        let mut status = serde_json::Map::new();
        status.insert("phase".into(), Value::from("Pending"));
        k8s::set_path(&mut obj, &["status"], Value::Object(status))?;
        self.state.save()?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// Moves a pod on as the kubelet would: Pending → Running creates its sandbox (the whole CNI
    /// chain) and starts it; Pending or Running → Succeeded/Failed stops it and removes its
    /// sandbox (CNI DEL: its address goes back to IPAM, free for a new pod) while the Pod object
    /// keeps `status.podIPs`, as a terminated pod's does. Phases never move back.
    pub fn set_pod_phase(
        &mut self,
        namespace: &str,
        name: &str,
        phase: k8s::PodPhase,
    ) -> Result<()> {
        use k8s::PodPhase::{Failed, Pending, Running, Succeeded};
        let key = ObjKey::new("Pod", namespace, name);
        let pod_key = format!("{namespace}/{name}");
        let mut obj = self.read_object(&key)?;
        let running = self.state.pods.contains_key(&pod_key);
        let current = if running {
            Running
        } else {
            k8s::phase(&obj).unwrap_or(Pending)
        };
        match (current, phase) {
            (from, to) if from == to => Ok(()),
            (Pending, Running) => {
                k8s::remove_annotation(&mut obj, k8s::PHASE_ANNOTATION);
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
                self.create_pod(obj, &key)
            }
            (Pending | Running, Succeeded | Failed) => {
                k8s::set_path(&mut obj, &["status", "phase"], Value::from(phase.as_str()))?;
                self.manifests.write(&obj)?;
                let errors = self.discard_sandbox(&pod_key);
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(LabError::Teardown(errors))
                }
            }
            (from, to) => Err(LabError::Invalid(format!(
                "pod {pod_key} is {from}; a phase moves only Pending -> Running -> Succeeded/Failed, never to {to}"
            ))),
        }
    }

    /// Stops a pod, removes its sandbox (CNI DEL of the whole chain, its namespace; nothing for a
    /// hostNetwork pod but its process) and forgets it; returns what failed along the way.
    fn discard_sandbox(&mut self, pod_key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        let Some(pod) = self.state.pods.remove(pod_key) else {
            return errors;
        };
        teardown_pod(&self.state, &pod, &mut errors);
        if !pod.host_network {
            self.state.netns.retain(|n| *n != pod.netns);
        }
        if let Err(e) = self.state.save() {
            errors.push(e.to_string());
        }
        errors
    }

    /// Pods that exist as objects only (Pending, Succeeded, Failed): `(namespace/name, phase,
    /// status.podIPs)`, sorted.
    pub fn pods_without_sandbox(&self) -> Result<Vec<(String, String, Vec<String>)>> {
        let mut out = Vec::new();
        for obj in k8s::read_path(&self.manifests.dir)? {
            let key = k8s::key_of(&obj)?;
            let pod_key = format!("{}/{}", key.namespace, key.name);
            if key.kind != "Pod" || self.state.pods.contains_key(&pod_key) {
                continue;
            }
            let phase = k8s::get_str(&obj, &["status", "phase"])
                .unwrap_or("Pending")
                .to_string();
            let ips = obj
                .get("status")
                .and_then(|s| s.get("podIPs"))
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(|i| i.get("ip").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            out.push((pod_key, phase, ips));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes objects as `kubectl delete` would; deleting a namespace deletes what lives in it.
    pub fn delete(&mut self, objects: Vec<Value>) -> Result<()> {
        for obj in objects {
            let key = k8s::key_of(&obj)?;
            self.delete_key(&key)?;
        }
        Ok(())
    }

    /// Deletes one object by key.
    pub fn delete_key(&mut self, key: &ObjKey) -> Result<()> {
        match key.kind.as_str() {
            "Pod" => self.delete_pod(&key.namespace, &key.name),
            "Namespace" => {
                let pods: Vec<String> = self
                    .state
                    .pods
                    .values()
                    .filter(|p| p.namespace == key.name)
                    .map(|p| p.name.clone())
                    .collect();
                for p in pods {
                    self.delete_pod(&key.name, &p)?;
                }
                for other in self.objects_in(&key.name)? {
                    self.manifests.remove(&other)?;
                }
                self.manifests.remove(key)
            }
            "Node" => Err(LabError::Invalid(format!(
                "{key}: the lab owns Node objects"
            ))),
            _ => self.manifests.remove(key),
        }
    }

    /// Keys of the objects in the manifest directory.
    pub fn objects(&self) -> Result<Vec<ObjKey>> {
        let mut out = Vec::new();
        for v in k8s::read_path(&self.manifests.dir)? {
            out.push(k8s::key_of(&v)?);
        }
        Ok(out)
    }

    fn objects_in(&self, namespace: &str) -> Result<Vec<ObjKey>> {
        Ok(self
            .objects()?
            .into_iter()
            .filter(|k| k.namespace == namespace)
            .collect())
    }

    /// Deletes every NetworkPolicy in every namespace.
    pub fn delete_all_policies(&mut self) -> Result<()> {
        for k in self
            .objects()?
            .into_iter()
            .filter(|k| k.kind == "NetworkPolicy")
        {
            self.manifests.remove(&k)?;
        }
        Ok(())
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let pod_key = format!("{namespace}/{name}");
        let obj_key = ObjKey::new("Pod", namespace, name);
        if !self.state.pods.contains_key(&pod_key) {
            // A pod without a sandbox (Pending, Succeeded, Failed) is only its object.
            self.read_object(&obj_key).map_err(|_| {
                LabError::Invalid(format!("no pod {pod_key} in lab {}", self.state.name))
            })?;
            return self.manifests.remove(&obj_key);
        }
        self.manifests.remove(&obj_key)?;
        let errors = self.discard_sandbox(&pod_key);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown(errors))
        }
    }

    /// `label pod ns/name k=v k-`.
    pub fn label_pod(&mut self, namespace: &str, name: &str, edits: &[LabelEdit]) -> Result<()> {
        let key = ObjKey::new("Pod", namespace, name);
        let mut obj = self.read_object(&key)?;
        k8s::edit_labels(&mut obj, edits)?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// Replaces an object's labels wholesale (reverting label changes).
    pub fn restore_labels(&mut self, key: &ObjKey, labels: Value) -> Result<()> {
        let mut obj = self.read_object(key)?;
        k8s::set_path(&mut obj, &["metadata", "labels"], labels)?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// `label ns name k=v k-` (the `kubernetes.io/metadata.name` label is the API server's).
    pub fn label_namespace(&mut self, name: &str, edits: &[LabelEdit]) -> Result<()> {
        let touches_name_label = edits.iter().any(|e| match e {
            LabelEdit::Set(k, _) | LabelEdit::Remove(k) => k == k8s::NAMESPACE_NAME_LABEL,
        });
        if touches_name_label {
            return Err(LabError::Invalid(format!(
                "{} is set by the API server and cannot be changed",
                k8s::NAMESPACE_NAME_LABEL
            )));
        }
        let key = ObjKey::new("Namespace", "", name);
        let mut obj = self.read_object(&key)?;
        k8s::edit_labels(&mut obj, edits)?;
        self.manifests.write(&obj).map(|_| ())
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

    /// Runs targets from inside one namespace with one `palisade-probe connect`.
    pub fn probe_from_netns(
        &self,
        netns: &str,
        targets: &[Target],
        timeout: Duration,
    ) -> Result<Vec<Outcome>> {
        let mut batch = self.spawn_probe(netns, targets, timeout)?;
        batch.finish()
    }

    fn spawn_probe(
        &self,
        netns: &str,
        targets: &[Target],
        timeout: Duration,
    ) -> Result<ProbeBatch> {
        use std::io::Write;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(self.state.bins.probe())
            .args(["connect", "--timeout-ms", &timeout.as_millis().to_string()])
            .env(process::MARKER_ENV, &self.state.name)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let what = format!("palisade-probe connect in {netns}");
        let mut child = cmd.spawn().map_err(|e| LabError::Command {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let input = serde_json::to_vec(targets).map_err(|e| LabError::Parse {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input).map_err(|e| LabError::Command {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(ProbeBatch {
            child: Some(child),
            what,
        })
    }

    /// Targets for every pod (except `skip`) on each (port, protocol), ids `ns/name|port|proto`.
    fn pod_targets(
        &self,
        skip: Option<&str>,
        ports: &[(u16, Protocol)],
        family: Family,
    ) -> Vec<Target> {
        let mut out = Vec::new();
        for to in self.state.pods.values() {
            if Some(to.key().as_str()) == skip {
                continue;
            }
            let Some(ip) = family.pick(&to.ips) else {
                continue;
            };
            for &(port, protocol) in ports {
                out.push(Target {
                    id: format!("{}|{port}|{}", to.key(), protocol.as_str()),
                    addr: SocketAddr::new(ip, port),
                    protocol,
                });
            }
        }
        out
    }

    /// Probes every ordered pair of distinct pods on each (port, protocol): one probe process per
    /// source pod, all in parallel.
    pub fn probe_matrix(
        &self,
        ports: &[(u16, Protocol)],
        family: Family,
        timeout: Duration,
    ) -> Result<Vec<ProbeRecord>> {
        let mut batches = Vec::new();
        for from in self.state.pods.values() {
            let targets = self.pod_targets(Some(&from.key()), ports, family);
            batches.push((
                from.key(),
                self.spawn_probe(&from.netns, &targets, timeout)?,
            ));
        }
        let mut records = Vec::new();
        for (from, mut batch) in batches {
            for o in batch.finish()? {
                records.push(ProbeRecord::from_outcome(&from, &o));
            }
        }
        records.sort();
        Ok(records)
    }

    /// Probes every pod from a node's own namespace (what the kubelet's probes do).
    pub fn probe_from_node(
        &self,
        node: &str,
        ports: &[(u16, Protocol)],
        family: Family,
        timeout: Duration,
    ) -> Result<Vec<ProbeRecord>> {
        let n = self.node(node)?;
        let targets = self.pod_targets(None, ports, family);
        Ok(self
            .probe_from_netns(&n.netns, &targets, timeout)?
            .iter()
            .map(|o| ProbeRecord::from_outcome(node, o))
            .collect())
    }

    /// Node state by name.
    pub fn node_state(&self, name: &str) -> Result<&NodeState> {
        self.node(name)
    }

    /// Installs a ClusterIP stand-in in a node's namespace: `vip:port` DNAT to the backend pod.
    /// This is what kube-proxy does before our chains see the packet.
    pub fn add_cluster_ip(
        &self,
        node: &str,
        vip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        backend: &str,
    ) -> Result<()> {
        let n = self.node(node)?;
        let pod = self.pod(backend)?;
        let ip = Family::V4
            .pick(&pod.ips)
            .ok_or_else(|| LabError::Invalid(format!("pod {backend} has no IPv4")))?;
        let proto = protocol.as_str();
        let script = format!(
            "table ip pl_svc {{\n  chain svc_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {vip} {proto} dport {port} dnat to {ip}:{port}\n  }}\n}}\n"
        );
        netns::nft(&n.netns, &script)
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

    /// Tears everything down now (also done on drop for owned labs).
    pub fn down(mut self) -> Result<()> {
        self.owned = false;
        // Unregister only afterwards: a signal arriving meanwhile waits for this teardown.
        let r = teardown(&self.state);
        signals::unregister(&self.state.run_dir);
        r
    }
}

/// One running `palisade-probe connect`.
struct ProbeBatch {
    child: Option<std::process::Child>,
    what: String,
}

impl ProbeBatch {
    fn finish(&mut self) -> Result<Vec<Outcome>> {
        let child = self
            .child
            .take()
            .ok_or_else(|| LabError::Invalid("probe already collected".into()))?;
        let out = child.wait_with_output().map_err(|e| LabError::Command {
            what: self.what.clone(),
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(LabError::Command {
                what: self.what.clone(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| LabError::Parse {
            what: self.what.clone(),
            detail: e.to_string(),
        })
    }
}

impl Drop for ProbeBatch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One probe of a matrix, as printed by `probe --json` (schema in netns-tests/README.md).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub from: String,
    pub to: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub connected: bool,
}

impl ProbeRecord {
    fn from_outcome(from: &str, o: &Outcome) -> Self {
        let to = o.id.split('|').next().unwrap_or(&o.id).to_string();
        ProbeRecord {
            from: from.to_string(),
            to,
            port: o.addr.port(),
            protocol: o.protocol.to_string(),
            connected: o.connected,
        }
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

/// A stable, UUID-shaped id for a pod without `metadata.uid`.
fn pseudo_uid(lab: &str, ns: &str, name: &str, seq: u64) -> String {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in format!("{lab}/{ns}/{name}/{seq}").bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let s = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

fn node_object(node: &NodeState) -> Value {
    let text = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\nspec:\n  podCIDR: {v4}\n  podCIDRs: [\"{v4}\", \"{v6}\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{a4}\"}}\n  - {{type: InternalIP, address: \"{a6}\"}}\n  - {{type: Hostname, address: {name}}}\n",
        name = node.name,
        v4 = node.pod_cidr_v4,
        v6 = node.pod_cidr_v6,
        a4 = node_underlay_v4(node.index),
        a6 = node_underlay_v6(node.index),
    );
    crate::yaml::from_str(&text, "node object").unwrap_or(Value::Null)
}

fn teardown_pod(state: &LabState, pod: &PodState, errors: &mut Vec<String>) {
    if let Some(pid) = pod.server_pid {
        process::stop(pid, &state.name);
    }
    // A hostNetwork pod is a process in its node's namespace: nothing else is its own.
    if pod.host_network {
        return;
    }
    if let Some(node) = state.nodes.iter().find(|n| n.name == pod.node) {
        let conflist = Lab::conflist_path(node);
        if netns::exists(&node.netns) && conflist.is_file() {
            let pod_netns_path = netns::path(&pod.netns);
            let inv = cni::Invocation {
                node_netns: &node.netns,
                container_id: &pod.container_id,
                pod_netns_path: &pod_netns_path,
                pod_namespace: &pod.namespace,
                pod_name: &pod.name,
                pod_uid: &pod.uid,
            };
            let res = cni::read_conflist(&conflist)
                .and_then(|c| cni::Chain::from_conflist(&c))
                .and_then(|chain| {
                    cni::del(
                        &chain,
                        &cni::cni_path(&state.bins.dir),
                        &pod.runtime_args,
                        pod.cni_result.as_ref(),
                        &inv,
                    )
                });
            if let Err(e) = res {
                errors.push(e.to_string());
            }
        }
    }
    if let Err(e) = netns::delete(&pod.netns) {
        errors.push(e.to_string());
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

/// How the nodes' underlay is laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One L2 segment: every node's address is on-link (172.31.0.0/24, fd00:172:31::/64).
    #[default]
    Flat,
    /// Two L2 segments (odd nodes, even nodes) behind a router namespace (the underlay namespace),
    /// each node with a /32 and /128 address and a route to the router, as cloud VMs often have:
    /// no node's address is on-link to another's, and the router knows only node addresses (no pod
    /// range), so cross-node pod traffic needs the overlay.
    Routed,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::Flat => "flat",
            Topology::Routed => "routed",
        })
    }
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flat" => Ok(Topology::Flat),
            "routed" => Ok(Topology::Routed),
            _ => Err(format!("topology {s:?}: want flat or routed")),
        }
    }
}

/// UDP port of the agent's VXLAN devices (`palisade_agent::overlay::PORT`).
pub const OVERLAY_UDP_PORT: u16 = 4796;
/// Second underlay bridge (even nodes) of the routed topology.
const UNDERLAY_BRIDGE_B: &str = "br1";
/// The router's IPv4 address on each segment (a /32, reached `onlink`).
const ROUTER_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(172, 31, 255, 1),
    Ipv4Addr::new(172, 31, 255, 2),
];
/// The router's IPv6 gateway on both segments (link-local).
const ROUTER_V6: &str = "fe80::1";
/// Counters of UDP to [`OVERLAY_UDP_PORT`] in the underlay namespace: `routed` (forwarded between
/// segments) and `bridged` (within one segment).
const COUNT_TABLE: &str = "pallab_count";

impl Lab {
    /// The underlay namespace (bridge, or router in the routed topology).
    fn underlay_netns(&self) -> String {
        format!("pl-{}-ul", self.state.name)
    }

    /// Counts UDP to the overlay port crossing the underlay, routed or bridged.
    fn count_encapsulation(&mut self, ul: &str) -> Result<()> {
        let script = format!(
            "table inet {COUNT_TABLE} {{\n chain routed {{ type filter hook forward priority 0; udp dport {OVERLAY_UDP_PORT} counter; }}\n}}\ntable bridge {COUNT_TABLE} {{\n chain bridged {{ type filter hook forward priority 0; udp dport {OVERLAY_UDP_PORT} counter; }}\n}}\n"
        );
        netns::nft(ul, &script)
    }

    /// Packets to the overlay's UDP port the underlay has carried so far (both counters).
    pub fn encapsulated_packets(&self) -> Result<u64> {
        let ul = self.underlay_netns();
        let mut total = 0;
        for family in ["inet", "bridge"] {
            let out = cmd_ip(&[
                "netns",
                "exec",
                &ul,
                "nft",
                "list",
                "table",
                family,
                COUNT_TABLE,
            ])?;
            for part in out.split("packets ").skip(1) {
                total += part
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Turns the flat underlay built by `add_node` into the routed one: even nodes move to a second
    /// bridge, every node's address becomes a /32 (/128) with a route to the router, and the
    /// underlay namespace routes between the segments (node addresses only).
    fn route_underlay(&mut self, ul: &str, opts: &LabOptions) -> Result<()> {
        if opts.external {
            return Err(LabError::Invalid(
                "--external is not available with --topology routed yet".into(),
            ));
        }
        cmd_ip(&["-n", ul, "link", "add", UNDERLAY_BRIDGE_B, "type", "bridge"])?;
        cmd_ip(&["-n", ul, "link", "set", UNDERLAY_BRIDGE_B, "up"])?;
        netns::sysctl(
            ul,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        for (seg, bridge) in [UNDERLAY_BRIDGE, UNDERLAY_BRIDGE_B].iter().enumerate() {
            cmd_ip(&[
                "-n",
                ul,
                "addr",
                "add",
                &format!("{}/32", ROUTER_V4[seg]),
                "dev",
                bridge,
            ])?;
            cmd_ip(&[
                "-n",
                ul,
                "addr",
                "add",
                &format!("{ROUTER_V6}/64"),
                "dev",
                bridge,
                "nodad",
            ])?;
        }
        for node in self.state.nodes.clone() {
            let i = node.index;
            let seg = (i + 1) % 2;
            let bridge = [UNDERLAY_BRIDGE, UNDERLAY_BRIDGE_B][seg];
            if seg == 1 {
                cmd_ip(&["-n", ul, "link", "set", &format!("n{i}"), "master", bridge])?;
            }
            let (v4, v6) = (node_underlay_v4(i), node_underlay_v6(i));
            let ns = node.netns.as_str();
            for (old, new, v6opt) in [
                (format!("{v4}/24"), format!("{v4}/32"), false),
                (format!("{v6}/64"), format!("{v6}/128"), true),
            ] {
                cmd_ip(&["-n", ns, "addr", "del", &old, "dev", NODE_UPLINK])?;
                let mut add = vec!["-n", ns, "addr", "add", &new, "dev", NODE_UPLINK];
                if v6opt {
                    add.push("nodad");
                }
                cmd_ip(&add)?;
            }
            cmd_ip(&[
                "-n",
                ns,
                "route",
                "add",
                "172.31.0.0/16",
                "via",
                &ROUTER_V4[seg].to_string(),
                "dev",
                NODE_UPLINK,
                "onlink",
            ])?;
            cmd_ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "fd00:172:31::/48",
                "via",
                ROUTER_V6,
                "dev",
                NODE_UPLINK,
            ])?;
            cmd_ip(&["-n", ul, "route", "add", &format!("{v4}/32"), "dev", bridge])?;
            cmd_ip(&[
                "-n",
                ul,
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                bridge,
            ])?;
        }
        Ok(())
    }
}
