//! enforce-bench: enforcement latency of the real palisade-agent (manifest source → probe flip),
//! the agent's CPU and memory under churn, and the compiler's per-change cost.
//!
//! `run` needs root and the agent binary; it creates and deletes its own namespaces. `compile-cost`
//! needs neither. `probe-loop`, `serve` and `fetch-metrics` are run by `run` inside the namespaces.

use clap::{Parser, Subcommand};
use palisade_bench::datapath::{report, traffic};
use palisade_bench::enforce;
use palisade_bench::{Error, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "palisade enforcement-latency and scale benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure enforcement latency and agent CPU/RSS; write `bench/results/<name>.{json,md}`.
    Run {
        /// palisade-agent binary.
        #[arg(long, default_value = "target/release/palisade-agent")]
        agent: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        pods: Vec<usize>,
        /// Background policies per pod (0.1: 1,000 policies at 10,000 pods).
        #[arg(long, default_value_t = 0.1)]
        policies_per_pod: f64,
        /// Nodes the pods are spread over (the agent's node holds pods / nodes of them); 2..=1000,
        /// at most 128 past 20,000 pods per 100 nodes' worth of namespaces.
        #[arg(long, default_value_t = palisade_bench::datapath::workload::NODES)]
        nodes: u32,
        /// Every background pod carries a label of its own (`pod=<namespace>.<name>`): no two pods
        /// share a label set, the worst case for the agent's shared label sets.
        #[arg(long)]
        unique_pod_labels: bool,
        /// The agent's periodic resync (a full replace of its table) in seconds; the default keeps
        /// it out of the run. With a shorter period the peak RSS column includes the resyncs'.
        #[arg(long, default_value_t = palisade_bench::enforce::NO_RESYNC)]
        resync_seconds: u64,
        /// Trials per scenario (each a grant and a revoke).
        #[arg(long, default_value_t = 100)]
        trials: usize,
        /// Background churn rates (changes per second) to measure under.
        #[arg(long, value_delimiter = ',', default_value = "0,20,100")]
        churn: Vec<u32>,
        /// Also measure the compiler's per-change cost with this many changes per size (0: skip).
        #[arg(long, default_value_t = 200)]
        compile_changes: usize,
        /// Trials per scenario under churn (rates > 0).
        #[arg(long, default_value_t = 30)]
        churn_trials: usize,
        /// Length of each churn-only window (agent CPU/RSS while only churn runs).
        #[arg(long, default_value_t = 10)]
        churn_seconds: u64,
        /// Irrelevant events: Pod status heartbeats per second (a new resourceVersion and condition
        /// times, nothing compiled changes), measured beside an idle window of the same length
        /// before the trials (0: skip).
        #[arg(long, default_value_t = 0)]
        irrelevant_rate: u32,
        /// Length of each irrelevant-events window (idle, then heartbeats).
        #[arg(long, default_value_t = 20)]
        irrelevant_seconds: u64,
        /// Background pods the heartbeats go round (one override file each).
        #[arg(long, default_value_t = 1000)]
        irrelevant_pods: usize,
        /// Where the agent reads the cluster from: `manifests` (a directory, `--manifests`) or
        /// `apiserver` (the in-test API server over list/watch, `--kubeconfig`: a cluster's path).
        #[arg(long, default_value = "manifests")]
        source: String,
        /// Scenarios: policy, label, pod (NetworkPolicy), cnp (an Admin-tier ClusterNetworkPolicy
        /// created/deleted), cnp-priority (its priority moved before/after a Deny), or `all`.
        #[arg(long, value_delimiter = ',', default_value = "policy,label,pod")]
        scenarios: Vec<String>,
        /// Also measure every scenario while the client floods the server with denied SYNs (to a
        /// port no policy admits; the agent runs with --flow-log in both windows).
        #[arg(long)]
        flood: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Only the compiler's per-change cost (no root, no agent).
    CompileCost {
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        pods: Vec<usize>,
        #[arg(long, default_value_t = 0.1)]
        policies_per_pod: f64,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// SYN probe every interval; prints `<monotonic ns> open|blocked` at start and at each flip.
    ProbeLoop {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_us: u64,
        #[arg(long)]
        secs: u64,
    },
    /// The measured established flow: one connection, a message every interval, each echoed;
    /// prints `<monotonic ns> open|blocked` when it connects and at the first message that fails.
    StreamLoop {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long)]
        secs: u64,
    },
    /// Denied SYNs as fast as one thread sends them (a new connection attempt each); prints the count.
    SynFlood {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// The stream's echo server (a thread per connection).
    StreamServe {
        #[arg(long)]
        ip: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secs: u64,
    },
    /// The probe's server (accepts and closes; same as datapath-bench serve).
    Serve {
        #[arg(long)]
        ip: String,
        #[arg(long)]
        crr_port: u16,
        #[arg(long)]
        rr_port: u16,
        #[arg(long)]
        secs: u64,
    },
    /// GET /metrics from the agent (run inside its namespace).
    FetchMetrics {
        #[arg(long)]
        addr: SocketAddr,
    },
}

fn main() {
    palisade_bench::init_logging();
    if let Err(e) = real_main(Cli::parse()) {
        tracing::error!(error = %e, "enforce-bench failed");
        std::process::exit(1);
    }
}

fn policies_for(pods: usize, per_pod: f64) -> usize {
    (pods as f64 * per_pod).round() as usize
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ProbeLoop {
            target,
            interval_us,
            timeout_us,
            secs,
        } => {
            enforce::probe_loop(
                target,
                Duration::from_micros(interval_us),
                Duration::from_micros(timeout_us),
                Duration::from_secs(secs),
            );
            Ok(())
        }
        Command::StreamLoop {
            target,
            interval_us,
            secs,
        } => {
            enforce::stream_loop(
                target,
                Duration::from_micros(interval_us),
                enforce::STREAM_REPLY_TIMEOUT,
                Duration::from_secs(secs),
            );
            Ok(())
        }
        Command::SynFlood { target, secs } => {
            enforce::syn_flood(target, Duration::from_secs(secs));
            Ok(())
        }
        Command::StreamServe { ip, port, secs } => {
            enforce::stream_serve(&ip, port, Duration::from_secs(secs))
        }
        Command::Serve {
            ip,
            crr_port,
            rr_port,
            secs,
        } => traffic::serve(&ip, crr_port, rr_port, None, Duration::from_secs(secs)),
        Command::FetchMetrics { addr } => {
            print!("{}", enforce::http_get(addr, "/metrics")?);
            Ok(())
        }
        Command::CompileCost {
            pods,
            policies_per_pod,
            changes,
            seed,
        } => {
            let mut costs = Vec::new();
            for p in pods {
                costs.push(enforce::compile_cost(
                    p,
                    policies_for(p, policies_per_pod),
                    changes,
                    seed,
                )?);
            }
            print!(
                "{}",
                enforce::markdown(&enforce::RunResults::default(), &costs)
            );
            Ok(())
        }
        Command::Run {
            agent,
            pods,
            policies_per_pod,
            nodes,
            unique_pod_labels,
            resync_seconds,
            trials,
            churn,
            compile_changes,
            churn_seconds,
            churn_trials,
            irrelevant_rate,
            irrelevant_seconds,
            irrelevant_pods,
            source,
            scenarios,
            flood,
            seed,
            out,
            name,
        } => {
            let scenarios = if scenarios.iter().any(|s| s == "all") {
                enforce::Scenario::EVERY.to_vec()
            } else {
                scenarios
                    .iter()
                    .map(|s| {
                        enforce::Scenario::parse(s).ok_or_else(|| {
                            Error::Invalid(format!(
                                "--scenarios {s}: expected policy, label, pod, cnp, cnp-priority or all"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let source = enforce::Source::parse(&source).ok_or_else(|| {
                Error::Invalid(format!(
                    "--source {source}: expected `manifests` or `apiserver`"
                ))
            })?;
            let exe = std::env::current_exe()
                .map_err(palisade_bench::io_err_pub("finding this binary"))?;
            let agent = std::fs::canonicalize(&agent).map_err(palisade_bench::io_err_pub(
                format!("finding the agent at {}", agent.display()),
            ))?;
            let work_dir =
                std::env::temp_dir().join(format!("palisade-enforce-{}", std::process::id()));
            let cfg = enforce::Config {
                agent,
                exe,
                pods: pods.clone(),
                policies_per_pod,
                nodes,
                unique_pod_labels,
                resync_seconds,
                trials,
                churn,
                seed,
                work_dir: work_dir.clone(),
                churn_seconds,
                churn_trials,
                irrelevant_rate,
                irrelevant_seconds,
                irrelevant_files: irrelevant_pods,
                source,
                scenarios,
                flood,
            };
            let command: String = std::env::args().collect::<Vec<_>>().join(" ");
            let started = palisade_bench::utc_now();
            let before = report::machine();
            let run = enforce::run(&cfg);
            // ENFORCE_KEEP_WORK=1 keeps the manifests and the agent's log of each size.
            if std::env::var_os("ENFORCE_KEEP_WORK").is_none() {
                let _ = std::fs::remove_dir_all(&work_dir);
            }
            let results = run?;
            let mut costs = Vec::new();
            if compile_changes > 0 {
                for &p in &pods {
                    costs.push(enforce::compile_cost(
                        p,
                        policies_for(p, policies_per_pod),
                        compile_changes,
                        seed,
                    )?);
                }
            }
            let after = report::machine();
            let stem = name.unwrap_or_else(|| format!("enforce-{}", palisade_bench::unix_now()));
            let json = serde_json::json!({"run": results, "compile_cost": costs});
            let charts = report::write_results(&out, &stem, &json, report::Charts::Enforce)?;
            let chart_md: String = charts.iter().map(|c| format!("\n![{c}]({c})\n")).collect();
            let md = format!(
                "# Enforcement latency and agent scale (issue 7)\n\nStarted {started} (UTC).\n\nCommand:\n\n```\n{command}\n```\n\n## Machine\n\nBefore:\n\n{before}\nAfter:\n\n{after}\n## Method\n\n\
Lab of `bench/src/datapath/topo.rs` (client pod on node 1, server pod on node 2). The real `palisade-agent run --manifests DIR --node-name node-2 --no-routes` runs in node 2's namespace \
(with `--source apiserver`: `--kubeconfig` instead, pointing at palisade-testkit's in-test API server, which listens in node 2's namespace; each file below is then the objects it holds, \
applied or deleted through list/watch, and a change is timestamped just before the server publishes it); \
the synthetic cluster (`Shape::for_pods`: pods spread over 100 nodes, background policies that do not select the measured pods) is one List file, the measured objects are small files. \
The server is isolated by a deny-all ingress policy. A probe in the client pod sends a SYN to the server every 1 ms (1 ms timeout) and timestamps each flip with CLOCK_MONOTONIC; \
a change is timestamped just before its file is renamed into (or unlinked from) the directory. Latency = flip − write, so it includes inotify, parsing, debounce (5 ms default), compile, diff, \
the nft commit and up to ~1 ms of probe granularity. Changes: policy create/delete (grant/revoke), the client's label added/removed (the policy selects it), the client pod created/deleted \
(a remote pod entering/leaving a peer set); with `--scenarios cnp,cnp-priority`: an Admin-tier ClusterNetworkPolicy accepting the client created/deleted (over the server's NetworkPolicy deny), \
and an Admin Accept moved from priority 60 to 40 and back around an Admin Deny at 50. Churn: a writer thread rewrites one of 200 pod files per change (a random background pod's `role` label) at the given rate during the trials; \
its CPU figures are the agent's /proc utime+stime+cutime+cstime (its own and any `nft` process it runs and waits for) over the scenario's wall time. \
Irrelevant events (`--irrelevant-rate`): right after the first sync, one override file per heartbeat pod (`--irrelevant-pods` background pods spread over all nodes) is written and left 3 s to settle; \
then two windows of `--irrelevant-seconds` each (+0.3 s for the last writes to land): idle (no writes), and two writer threads rewriting those files round robin at the rate between them (each its own half; dotfile + rename; up to 250 ms of lag made up), each write the same pod with a new \
`metadata.resourceVersion` and new `lastProbeTime`/`lastTransitionTime` of its Ready/ContainersReady conditions (labels, IPs, phase, node, ports unchanged: a kubelet status heartbeat). \
Per window: agent CPU (/proc utime+stime+cutime+cstime over the window), RSS at its end, and deltas of the agent's `palisade_reconciles_total`, `palisade_node_lock_acquisitions_total`, \
`palisade_source_changes_total`, `palisade_transactions_total`. The files are removed before the churn windows and trials. \
Established-flow revocation: a policy `allow-stream` admits the client on port 7002; a stream in the client pod connects (a 1 ms attempt every 1 ms while blocked), then sends one byte per ms on that one \
connection and waits for its echo (a thread per connection in the server pod). Grant = policy written → stream connected; revoke = policy file removed → send time of the first message whose echo \
did not come within 100 ms (the agent must delete the flow's conntrack entry: the policy alone leaves an established flow alone). A flow not cut within 5 s counts as not cut. \
With `--flood`, the agent runs with `--flow-log` and every scenario is measured twice: as above, and while the client pod sends denied SYNs to the server's port 7999 as fast as one thread can \
(a non-blocking connect per SYN, a new source port each); the last columns are the packets the policies dropped per second meanwhile (the agent's per-policy counters; the probe's own SYNs, 1,000/s while blocked, are among them) and \
what the kernel handed to the flow log per second (its rate limit, 100/s burst 200 by default). Compiler cost: `palisade_policy` in this process, per change apply + compile(node) + diff + nfnetlink messages, the path the agent runs (its JSON, for nft only, is rendered outside the timing to check both ways agree).\n\n## Results\n\n{}\n## Charts\n{chart_md}",
                enforce::markdown(&results, &costs)
            );
            let md_path = out.join(format!("{stem}.md"));
            std::fs::write(&md_path, md).map_err(|source| Error::Write {
                path: md_path.clone(),
                source,
            })?;
            println!("{}", md_path.display());
            Ok(())
        }
    }
}
