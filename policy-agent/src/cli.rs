//! The command line: `run`, `cleanup`, `explain`, `compile`. Every flag can also come from the
//! environment (shown in `--help`).

use crate::nft::Backend;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Default address of /healthz, /readyz and /metrics: the loopback only. The agent runs with
/// hostNetwork, where 0.0.0.0 is every address of the node (deploy/README.md says how to expose it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9799";

/// palisade-agent: compiles Kubernetes NetworkPolicies into the nftables table `inet palisade` on this
/// node, routes to other nodes' pod ranges, and writes the CNI conflist once the first sync succeeded.
#[derive(Debug, Parser)]
#[command(name = "palisade-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "PALISADE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `palisade_agent=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

const RUN_HELP: &str = "\
Behaviour:
  - Nothing is enforced until the source listed everything once; then our table `inet palisade` is
    replaced atomically, and later changes go in as one incremental transaction each.
  - The conflist is written only after that first commit, and /readyz turns 200 after that
    (at once when the Node has no podCIDRs yet: the log says why there is no conflist).
  - Fail closed: while the agent is down the rules stay in the kernel and new pods stay pending
    (dropped). SIGTERM exits 0 and leaves the rules in place; `palisade-agent cleanup` removes them.
  - If our table is changed or removed behind our back (e.g. `nft flush ruleset`) it is restored and
    palisade_resync_restores_total counts it.
  - Needs root (CAP_NET_ADMIN) in the node's network namespace, and `nft` on PATH for the exec backend.

Example (lab node in a network namespace):
  ip netns exec node1 palisade-agent run --node-name node1 --manifests ./manifests \\
    --state-dir /run/pal/node1 --cni-conf-dir /run/pal/node1/net.d --listen 127.0.0.1:9799";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch the cluster (or a manifest directory), enforce policies, route, serve metrics.
    #[command(after_long_help = RUN_HELP)]
    Run(RunArgs),
    /// Remove everything the agent put on this node: our nft table, our routes, our conflist, the
    /// flow log's socket.
    Cleanup(CleanupArgs),
    /// Say whether traffic from one pod (or IP) to another on PORT/PROTO is allowed, and why.
    Explain(ExplainArgs),
    /// Print the nft JSON a node would get (debug aid; no root, no kernel).
    Compile(CompileArgs),
    /// Print this node's recent flow-log lines (the agent's `--flow-log`); `--follow` for new ones.
    Flows(FlowsArgs),
}

/// Where cluster objects come from: a kubeconfig, a manifest directory, or (neither) in-cluster config.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Kubeconfig file to reach the API server (default: in-cluster service account). Ignored when
    /// --manifests is given.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of YAML/JSON manifests (Pods, Namespaces, NetworkPolicies, ClusterNetworkPolicies, Nodes) used instead of an
    /// API server; watched for changes.
    #[arg(long, env = "PALISADE_MANIFESTS")]
    pub manifests: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Name of the Node this agent runs on (in a DaemonSet: the downward API's spec.nodeName).
    #[arg(long, env = "PALISADE_NODE_NAME")]
    pub node_name: String,
    #[command(flatten)]
    pub source: SourceArgs,
    /// State directory shared with the CNI plugin (lock file, attachment records).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = palisade_contract::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Directory the container runtime reads CNI configs from; our conflist goes there.
    #[arg(long, env = "PALISADE_CNI_CONF_DIR", default_value = palisade_contract::DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// IPAM data directory written into the conflist (host-local layout).
    #[arg(long, env = "PALISADE_IPAM_DATA_DIR", default_value = palisade_contract::DEFAULT_IPAM_DATA_DIR)]
    pub ipam_data_dir: PathBuf,
    /// Pod interface MTU written into the conflist. Default: the MTU of the link of our
    /// InternalIP, less the VXLAN overhead (50 bytes over IPv4, 70 over IPv6) unless
    /// `--encapsulation never`.
    #[arg(long, env = "PALISADE_MTU")]
    pub mtu: Option<u32>,
    /// Let the plugin wire pods when our table is missing (written into the conflist). Default: fail closed.
    #[arg(long, env = "PALISADE_FAIL_OPEN")]
    pub fail_open: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PALISADE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Seconds between resyncs: our table is listed and compared with what we committed (a drift
    /// is logged, counted and restored), and every 10th resync it is compiled and replaced as a
    /// whole anyway. A change to our table by another process is undone at once (see
    /// --no-drift-watch), not only here.
    #[arg(long, env = "PALISADE_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Milliseconds to wait for more events before compiling (changes arriving together are coalesced).
    #[arg(long, env = "PALISADE_DEBOUNCE_MS", default_value_t = 5)]
    pub debounce_ms: u64,
    /// Do not install routes to other nodes' pod ranges (another component routes pod traffic).
    #[arg(long, env = "PALISADE_NO_ROUTES")]
    pub no_routes: bool,
    /// When another node's pod range is reached through our VXLAN device instead of a route via
    /// its InternalIP: `cross-subnet` (only nodes whose InternalIP is not on a directly connected
    /// subnet), `always`, `never` (VNI 5259596, UDP port 4796; see ARCHITECTURE.md).
    #[arg(long, env = "PALISADE_ENCAPSULATION", value_enum, default_value_t = crate::overlay::Mode::CrossSubnet)]
    pub encapsulation: crate::overlay::Mode,
    /// Do not watch our table for changes by other processes (they are then undone at resync only):
    /// for tracking down a restore loop, and for tests that need a table changed behind our back.
    #[arg(long, env = "PALISADE_NO_DRIFT_WATCH")]
    pub no_drift_watch: bool,
    /// The cluster's pod CIDR (kube-controller-manager's --cluster-cidr), at most one per family,
    /// repeatable or comma-separated. Another Node's podCIDR outside it gets no route. Unset for a
    /// family: that family's podCIDRs are only checked for width and overlaps.
    #[arg(
        long = "cluster-cidr",
        env = "PALISADE_CLUSTER_CIDR",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// Masquerade pod traffic that leaves the cluster (to an address outside the pod networks and
    /// the Nodes' addresses) with the node's address, IPv4 and IPv6: `--masquerade=false` to turn it
    /// off (e.g. when the pod networks are routed by the network itself).
    #[arg(
        long,
        env = "PALISADE_MASQUERADE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub masquerade: bool,
    /// More destinations that keep the pod's address (no masquerade), repeatable or comma-separated.
    #[arg(
        long = "no-masquerade-cidr",
        env = "PALISADE_NO_MASQUERADE_CIDR",
        value_delimiter = ','
    )]
    pub no_masquerade_cidrs: Vec<ipnet::IpNet>,
    /// How transactions reach the kernel: in-process libnftables, or `nft -j -f -`.
    #[arg(long, env = "PALISADE_NFT_BACKEND", value_enum, default_value_t = Backend::Lib)]
    pub nft_backend: Backend,
    /// Keep established connections when a policy change (or a restore of our table) revokes their
    /// permission, as Calico does. Default: after such commits the conntrack entries of flows the
    /// new rules would not admit as new are deleted, so their next packet meets the rules. Either
    /// way a deleted pod's flows are flushed with it (never passed to the next pod at its address).
    #[arg(long, env = "PALISADE_KEEP_ESTABLISHED_FLOWS")]
    pub keep_established_flows: bool,
    /// When our table must be restored in full after a change behind our back (deleted, `nft
    /// flush ruleset`), commit a lockdown table first: every new connection of this node's pods
    /// is dropped (the node still reaches them, established ones go on) until the full table
    /// commits, tens of ms later at 10k pods, instead of passing unchecked. `--restore-lockdown=false`
    /// lets them through until then.
    #[arg(
        long,
        env = "PALISADE_RESTORE_LOCKDOWN",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub restore_lockdown: bool,
    /// Log every connection a policy drops, one JSON line each (pods, port, protocol, the policies
    /// that decided), to this file, or `-` for stdout; the recent lines are also served to
    /// `palisade-agent flows` on this node. Unset: no flow log (no log rules in the kernel).
    #[arg(long, env = "PALISADE_FLOW_LOG")]
    pub flow_log: Option<String>,
    /// Also log connections a policy admitted (costs a base chain on each hook while on).
    #[arg(long, env = "PALISADE_FLOW_LOG_ALLOWED", requires = "flow_log")]
    pub flow_log_allowed: bool,
    /// Most packets per second the kernel hands to the flow log, for drops and for admitted
    /// connections each; beyond, they are still dropped (or admitted), only not logged.
    #[arg(long, env = "PALISADE_FLOW_LOG_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub flow_log_rate: u32,
    /// Packets the kernel may log at once above the rate.
    #[arg(long, env = "PALISADE_FLOW_LOG_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub flow_log_burst: u32,
    /// NFLOG group of the flow log (change it if another program of the node uses this one).
    #[arg(long, env = "PALISADE_FLOW_LOG_GROUP", default_value_t = crate::flow_log::DEFAULT_GROUP)]
    pub flow_log_group: u16,
    /// Most pod peers (podSelector / namespaceSelector entries, over all its rules) one
    /// NetworkPolicy may have; one with more is refused on this node: the pods it selects are
    /// isolated in its directions and it allows them nothing (logged as a warning). Each peer is
    /// matched against the pods of every namespace it draws from.
    #[arg(long, env = "PALISADE_MAX_POLICY_POD_PEERS", default_value_t = palisade_policy::model::PolicyLimits::DEFAULT.pod_peers, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_policy_pod_peers: usize,
    /// Most pods the pod peers of one NetworkPolicy may select on this node's table, summed over
    /// the peers; past it the policy is refused as above. Bounds what one tenant's policy costs
    /// the agent and the kernel (a few hundred bytes per selected pod).
    #[arg(long, env = "PALISADE_MAX_POLICY_PEER_PODS", default_value_t = palisade_policy::model::PolicyLimits::DEFAULT.peer_pods, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_policy_peer_pods: usize,
}

#[derive(Debug, Clone, Args)]
pub struct FlowsArgs {
    /// The agent's state directory (its flow log socket is there).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = palisade_contract::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// After the recent lines, print new ones as they come, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Directory holding our conflist.
    #[arg(long, env = "PALISADE_CNI_CONF_DIR", default_value = palisade_contract::DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The agent's state directory (its flow log socket is removed; the plugin's records stay).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = palisade_contract::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Leave routes alone.
    #[arg(long, env = "PALISADE_NO_ROUTES")]
    pub no_routes: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Source: `namespace/pod` or an IP address.
    #[arg(long, required_unless_present = "matrix", conflicts_with = "matrix")]
    pub from: Option<String>,
    /// Destination: `namespace/pod` or an IP address.
    #[arg(long, required_unless_present = "matrix", conflicts_with = "matrix")]
    pub to: Option<String>,
    /// Destination port and protocol, e.g. `80/TCP`, `53/udp` (protocol defaults to TCP).
    #[arg(long)]
    pub port: String,
    /// Instead of one pair: every pod of these namespaces (comma-separated) to every other, as a
    /// table (rows: from, columns: to; `.` allowed, `X` denied), like the demo's.
    #[arg(long, value_delimiter = ',')]
    pub matrix: Option<Vec<String>>,
    /// Output of `--matrix`: `text` or `json` (every cell with both directions' reasons).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, Args)]
pub struct CompileArgs {
    /// Directory of manifests to compile.
    #[arg(long, env = "PALISADE_MANIFESTS")]
    pub manifests: PathBuf,
    /// Node whose table to print.
    #[arg(long, env = "PALISADE_NODE_NAME")]
    pub node_name: String,
    /// State directory whose attachment records to include (pending marks, local pod IPs).
    #[arg(long, env = "PALISADE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_lab_command_line_parses() {
        let c = Cli::try_parse_from([
            "palisade-agent",
            "run",
            "--node-name",
            "n1",
            "--manifests",
            "/m",
            "--state-dir",
            "/s",
            "--cni-conf-dir",
            "/c",
            "--ipam-data-dir",
            "/i",
            "--listen",
            "127.0.0.1:9799",
        ])
        .unwrap();
        let Command::Run(r) = c.command else {
            panic!("not run")
        };
        assert_eq!(r.node_name, "n1");
        assert_eq!(r.resync_seconds, 30);
        assert!(!r.fail_open);
    }
}
