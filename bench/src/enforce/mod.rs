//! Enforcement latency: from the moment a change is written into the agent's manifest directory to
//! the moment a probe that sends a SYN every millisecond flips, for policy create/delete, label
//! change and new/deleted pod, with the real `palisade-agent` running in the server's node namespace.
//! Also the agent's CPU time and memory, at rest and while a background churn writes changes.

use crate::datapath::cmd::{run_in, ChildGuard};
use crate::datapath::k8s;
use crate::datapath::stats::{max, median, quantile};
use crate::datapath::topo::{Lab, CLIENT_IP, SERVER_IP};
use crate::datapath::workload::{Cluster, Pod, Shape};
use crate::{io_err, Error, Result};
use palisade_policy::synth::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{ApiStore, Store};

mod agent;
mod churn;
mod compile_cost;
mod irrelevant;
mod objects;
mod probe;
mod report;
mod revocation;
mod scenario;
pub mod store;
#[cfg(test)]
mod tests;

use agent::{fetch_metrics, write_server_record};
use churn::{churn_window, Churn, Observed};
use irrelevant::{heartbeat_name, heartbeat_pod, irrelevant_windows, HEARTBEAT_WRITERS};
use objects::{
    admin_client_policy, allow_policy, allow_stream_policy, client_pod, list, server_deny, F_ALLOW,
    F_ALLOW_LABEL, F_ALLOW_STREAM, F_CLIENT, F_CLUSTER, F_CNP_ACCEPT, F_CNP_DENY, F_DENY,
};
use probe::Probe;
use revocation::established_flow;

pub use agent::{
    http_get, metric_sum, metric_value, path_str, proc_stats, AgentDirs, ProcStats, NO_RESYNC,
};
pub use churn::ChurnResult;
pub use compile_cost::{compile_cost, CompileCost};
pub use irrelevant::IrrelevantResult;
pub use objects::{remove_manifest, write_manifest};
pub use probe::{mono_ns, probe_loop, stream_loop, stream_serve, syn_flood};
pub use report::markdown;
pub use revocation::RevocationResult;
pub use scenario::{Scenario, ScenarioResult};

/// Port the probe targets on the server pod.
pub const PROBE_PORT: u16 = 7000;

/// Port of the long-lived TCP flow whose revocation is measured (an echo server per connection).
pub const STREAM_PORT: u16 = 7002;

/// How long the stream waits for one echo before it counts the message as failed.
pub const STREAM_REPLY_TIMEOUT: Duration = Duration::from_millis(100);

/// How long one flip may take before the trial counts as failed.
pub const FLIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Node the agent runs as (the server's node).
pub const AGENT_NODE: &str = "node-2";

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: PathBuf,
    pub exe: PathBuf,
    pub pods: Vec<usize>,
    pub policies_per_pod: f64,
    /// Nodes of the synthetic cluster (`Shape::for_pods_on`).
    pub nodes: u32,
    /// Every background pod carries a label of its own (`Shape::unique_labels`).
    pub unique_pod_labels: bool,
    /// The agent's `--resync-seconds` (`agent::NO_RESYNC`: none during the run).
    pub resync_seconds: u64,
    pub trials: usize,
    pub churn: Vec<u32>,
    pub seed: u64,
    pub work_dir: PathBuf,
    /// Length of each churn-only window.
    pub churn_seconds: u64,
    /// Trials per scenario while churn runs (rates > 0).
    pub churn_trials: usize,
    /// Pod status heartbeats per second for the irrelevant-events windows (0: skip them).
    pub irrelevant_rate: u32,
    /// Length of each irrelevant-events window (idle, then heartbeats).
    pub irrelevant_seconds: u64,
    /// Background pods (one override file each) the heartbeats go round.
    pub irrelevant_files: usize,
    /// Where the agent reads the cluster from.
    pub source: Source,
    /// The scenarios measured (default: the NetworkPolicy ones, `Scenario::ALL`).
    pub scenarios: Vec<Scenario>,
    /// Also measure every scenario while the client floods the server with denied SYNs (the agent
    /// then runs with `--flow-log`, in both windows).
    pub flood: bool,
}

/// Port the flood's SYNs go to: no policy ever admits it.
pub const FLOOD_PORT: u16 = 7999;

/// The agent's source of objects in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A manifest directory (`--manifests`).
    Manifests,
    /// palisade-testkit's in-test API server, through the agent's kube source (`--kubeconfig`).
    ApiServer,
}

impl Source {
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "manifests" => Some(Source::Manifests),
            "apiserver" => Some(Source::ApiServer),
            _ => None,
        }
    }
}

/// One step of a paced writer: true if it wrote.
type Step = Box<dyn FnMut() -> bool + Send>;

/// The agent's /metrics text at the end of each size's run, by pod count.
pub type AgentMetrics = Vec<(usize, String)>;

/// Everything one `run` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResults {
    pub scenarios: Vec<ScenarioResult>,
    /// Revocation of an established TCP flow, per size and churn rate.
    #[serde(default)]
    pub revocations: Vec<RevocationResult>,
    pub churn: Vec<ChurnResult>,
    /// Agent load idle and under Pod status heartbeats (irrelevant events), per size.
    #[serde(default)]
    pub irrelevant: Vec<IrrelevantResult>,
    pub metrics: AgentMetrics,
    /// Seconds from agent start to its conflist (first sync committed), by pod count.
    pub first_sync_seconds: Vec<(usize, f64)>,
    /// The agent's `--resync-seconds` (0: a run from before it was recorded).
    #[serde(default)]
    pub resync_seconds: u64,
}

/// Starts `exe args` in namespace `ns` and waits for the first line it prints (its "ready").
fn spawn_ready(ns: &str, exe: &str, args: &[&str], what: &str) -> Result<ChildGuard> {
    let mut s = ChildGuard::spawn_in(ns, exe, args)?;
    let out = s
        .child_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| Error::Invalid(format!("{what}: no stdout")))?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(io_err(format!("reading the ready line of {what}")))?;
    Ok(s)
}

/// Runs every size; returns every scenario result and the agent's metrics per size.
pub fn run(cfg: &Config) -> Result<RunResults> {
    let lab = Lab::create()?;
    crate::datapath::rulesets::load_base(&lab.node1)?;
    crate::datapath::rulesets::load_base(&lab.node2)?;
    let exe = path_str(&cfg.exe)?.to_string();
    let crr_port = PROBE_PORT.to_string();
    let _server = spawn_ready(
        &lab.server,
        &exe,
        &[
            "serve",
            "--ip",
            SERVER_IP,
            "--crr-port",
            &crr_port,
            "--rr-port",
            "7001",
            "--secs",
            "7200",
        ],
        "the server",
    )?;
    let stream_port = STREAM_PORT.to_string();
    let _stream_server = spawn_ready(
        &lab.server,
        &exe,
        &[
            "stream-serve",
            "--ip",
            SERVER_IP,
            "--port",
            &stream_port,
            "--secs",
            "7200",
        ],
        "the stream server",
    )?;
    let mut all = RunResults::default();
    for (i, &pods) in cfg.pods.iter().enumerate() {
        let policies = (pods as f64 * cfg.policies_per_pod).round() as usize;
        let work = cfg.work_dir.join(format!("size-{i}-{pods}"));
        let r = run_size(cfg, &lab, &exe, &work, pods, policies);
        // The agent is gone; remove its table so the next size starts clean.
        let _ = run_in(
            &lab.node2,
            "nft",
            &["delete", "table", "inet", palisade_contract::TABLE_NAME],
            None,
        );
        match r {
            Ok(mut r) => {
                all.scenarios.append(&mut r.scenarios);
                all.revocations.append(&mut r.revocations);
                all.churn.append(&mut r.churn);
                all.irrelevant.append(&mut r.irrelevant);
                all.metrics.append(&mut r.metrics);
                all.first_sync_seconds.append(&mut r.first_sync_seconds);
                all.resync_seconds = r.resync_seconds;
            }
            Err(e) => tracing::error!(pods, error = %e, "size failed; continuing with the next"),
        }
    }
    Ok(all)
}

fn run_size(
    cfg: &Config,
    lab: &Lab,
    exe: &str,
    work: &Path,
    pods: usize,
    policies: usize,
) -> Result<RunResults> {
    let dirs = AgentDirs::create(work)?;
    write_server_record(&dirs.state)?;
    let cluster = Cluster::generate_shape(
        Shape {
            unique_labels: cfg.unique_pod_labels,
            ..Shape::for_pods_on(pods, policies, cfg.nodes)
        },
        cfg.seed,
    )?;
    // Everything but the measured client pod goes into one list; the client has its own file.
    let objects: Vec<Value> = k8s::objects(&cluster)
        .into_iter()
        .filter(|o| o["metadata"]["name"] != "client")
        .collect();
    let store = match cfg.source {
        Source::Manifests => Store::Dir(dirs.manifests.clone()),
        Source::ApiServer => Store::Api(Arc::new(ApiStore::start(&lab.node2, work)?)),
    };
    store.put(F_CLUSTER, &list(objects))?;
    store.put(F_DENY, &server_deny())?;
    Scenario::Policy.setup(&store)?;
    let log = work.join("agent.log");
    let mut args = dirs.run_args(&store.agent_args()?, cfg.resync_seconds)?;
    if cfg.flood {
        args.extend([
            "--flow-log".to_string(),
            path_str(&work.join("flows.jsonl"))?.to_string(),
        ]);
    }
    let agent = ChildGuard::spawn_in_logged(
        &lab.node2,
        path_str(&cfg.agent)?,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &log,
    )?;
    let pid = agent
        .pid()
        .ok_or_else(|| Error::Invalid("agent has no pid".into()))?;
    let first_sync = dirs.wait_conflist(&log)?.as_secs_f64();
    tracing::info!(pods, policies, first_sync_s = first_sync, "agent synced");
    let mut out = RunResults {
        first_sync_seconds: vec![(cluster.pods.len(), first_sync)],
        resync_seconds: cfg.resync_seconds,
        ..RunResults::default()
    };
    if cfg.irrelevant_rate > 0 {
        let obs = Observed {
            lab,
            exe,
            store: &store,
            pid,
        };
        let windows = irrelevant_windows(
            &obs,
            &cluster,
            cfg.irrelevant_files,
            cfg.irrelevant_rate,
            cfg.irrelevant_seconds,
        )?;
        for w in &windows {
            tracing::info!(
                pods,
                rate = w.rate,
                writes_per_s = w.writes_per_second(),
                cpu_percent = w.cpu_percent(),
                rss_mib = w.rss_kib as f64 / 1024.0,
                reconciles = ?w.reconciles,
                lock_acquisitions = ?w.lock_acquisitions,
                unchanged = ?w.unchanged,
                "irrelevant-events window done"
            );
        }
        out.irrelevant = windows;
    }
    for &rate in cfg.churn.iter().filter(|r| **r > 0) {
        let obs = Observed {
            lab,
            exe,
            store: &store,
            pid,
        };
        let r = churn_window(&obs, &cluster, rate, cfg.churn_seconds, cfg.seed ^ 0xc4)?;
        tracing::info!(
            pods,
            rate,
            cpu_s = r.agent_cpu_seconds,
            wall_s = r.wall_seconds,
            reconciles = r.reconciles,
            mean_ms = r.reconcile_mean_ms,
            "churn window done"
        );
        out.churn.push(r);
    }
    let mut probe = Probe::start(lab, exe)?;
    let mut results = Vec::new();
    let floods: &[bool] = if cfg.flood { &[false, true] } else { &[false] };
    for &churn in &cfg.churn {
        for (&flood, &scenario) in floods
            .iter()
            .flat_map(|f| cfg.scenarios.iter().map(move |s| (f, s)))
        {
            scenario.setup(&store)?;
            if probe.wait_for(false, Duration::from_secs(10)).is_none() {
                return Err(Error::Invalid(format!(
                    "{}: probe not blocked after setup",
                    scenario.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
            let churner = Churn::start(&store, &cluster, churn, cfg.seed ^ u64::from(churn));
            // (packets handed to the flow log, packets policies dropped) so far.
            let logged = || {
                let text = fetch_metrics(lab, exe);
                let dropped: f64 = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("palisade_policy_packets_total{")
                            && l.contains("verdict=\"drop\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                (
                    metric_sum(&text, "palisade_flow_log_packets_total").unwrap_or(0.0),
                    dropped,
                )
            };
            let logged_before = logged();
            let flooder = if flood {
                let target = format!("{SERVER_IP}:{FLOOD_PORT}");
                Some(ChildGuard::spawn_in(
                    &lab.client,
                    exe,
                    &["syn-flood", "--target", &target, "--secs", "3600"],
                )?)
            } else {
                None
            };
            let before = proc_stats(pid)?;
            let t = Instant::now();
            let mut res = ScenarioResult {
                pods: cluster.pods.len(),
                policies,
                churn_per_second: churn,
                scenario,
                grant_ms: Vec::new(),
                revoke_ms: Vec::new(),
                failures: 0,
                agent_before: before,
                agent_after: before,
                wall_seconds: 0.0,
                churn_writes: 0,
                flood,
                flow_log_packets: 0.0,
                dropped_packets: 0.0,
            };
            let mut rng = Rng::new(cfg.seed);
            let trials = if churn == 0 {
                cfg.trials
            } else {
                cfg.churn_trials
            };
            for _ in 0..trials {
                match probe.measure(true, || scenario.grant(&store))? {
                    Some(ms) => res.grant_ms.push(ms),
                    None => res.failures += 1,
                }
                std::thread::sleep(Duration::from_millis(10 + rng.below(20) as u64));
                match probe.measure(false, || scenario.revoke(&store))? {
                    Some(ms) => res.revoke_ms.push(ms),
                    None => res.failures += 1,
                }
                std::thread::sleep(Duration::from_millis(10 + rng.below(20) as u64));
                if res.failures > 5 {
                    break;
                }
            }
            res.churn_writes = churner.finish();
            res.wall_seconds = t.elapsed().as_secs_f64();
            res.agent_after = proc_stats(pid)?;
            drop(flooder);
            let logged_after = logged();
            res.flow_log_packets = logged_after.0 - logged_before.0;
            res.dropped_packets = logged_after.1 - logged_before.1;
            let (g50, g99, gmax) = ScenarioResult::summary(&res.grant_ms);
            let (r50, r99, rmax) = ScenarioResult::summary(&res.revoke_ms);
            tracing::info!(
                pods,
                churn,
                scenario = scenario.name(),
                flood,
                g50,
                g99,
                gmax,
                r50,
                r99,
                rmax,
                failures = res.failures,
                "scenario done"
            );
            results.push(res);
        }
        let churner = Churn::start(&store, &cluster, churn, cfg.seed ^ u64::from(churn) ^ 1);
        let trials = if churn == 0 {
            cfg.trials
        } else {
            cfg.churn_trials
        };
        let rev = established_flow(
            lab,
            exe,
            &store,
            (cluster.pods.len(), policies, churn),
            trials,
            cfg.seed,
        );
        churner.finish();
        let rev = rev?;
        let (g50, g99, _) = ScenarioResult::summary(&rev.grant_ms);
        let (r50, r99, rmax) = ScenarioResult::summary(&rev.revoke_ms);
        tracing::info!(
            pods,
            churn,
            g50,
            g99,
            r50,
            r99,
            rmax,
            failures = rev.failures,
            "established flow revocation done"
        );
        out.revocations.push(rev);
    }
    drop(probe);
    out.metrics
        .push((cluster.pods.len(), fetch_metrics(lab, exe)));
    drop(agent);
    out.scenarios = results;
    Ok(out)
}
