//! tamper-bench: how long the real palisade-agent takes to restore its table after a change behind
//! its back, per kind of change (issue 11's list), p50 / max over `--tries`.
//!
//! The time is commit to commit: from the kernel's first notification of the tampering transaction
//! to the agent's restore, both read by one nf_tables monitor (palisade-nft's) that this bench runs
//! inside the agent's node namespace. Two moments per try: "isolated", the agent's first commit
//! after the tampering (the lockdown table, when the table must be restored in full; else the
//! repair), and "restored", its last before the table is quiet for [`QUIET`] (the full table).
//! A kind repaired in one commit has both the same. It needs root; it creates the enforce-bench lab (its
//! own namespaces, deleted at the end, also on failure) and never touches the host's namespace.

use clap::Parser;
use palisade_bench::datapath::cmd::{run_in, ChildGuard};
use palisade_bench::datapath::run::enter_netns;
use palisade_bench::datapath::stats::{max, median};
use palisade_bench::datapath::topo::Lab;
use palisade_bench::datapath::workload::{Cluster, Shape};
use palisade_bench::datapath::{k8s, rulesets};
use palisade_bench::enforce::{path_str, write_manifest, AgentDirs};
use palisade_bench::{io_err_pub, Error, Result};
use palisade_nft::monitor::{Drift, Monitor, Scope};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "palisade tamper-to-restore benchmark")]
struct Cli {
    /// palisade-agent binary.
    #[arg(long, default_value = "target/release/palisade-agent")]
    agent: PathBuf,
    /// Cluster sizes (pods); the agent's node holds its share of them.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pods: Vec<usize>,
    #[arg(long, default_value_t = 0.1)]
    policies_per_pod: f64,
    /// Tries per kind of tampering.
    #[arg(long, default_value_t = 20)]
    tries: usize,
    /// The agent's nft backend (lib or exec).
    #[arg(long, default_value = "lib")]
    nft_backend: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Copy each size's agent log here (`agent-<pods>.log`) before the work directory is removed.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Kinds of tampering to try, in this order (default: all, in the order of the table).
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// How the bench sees the tampering and the restore: `notifications` (an nf_tables monitor of
    /// its own: the kernel then builds a notification per object of the agent's restore for it,
    /// which a node without such a listener does not pay) or `generation` (no listener: the
    /// ruleset's generation polled every 250 µs; the tampering is the next transaction, the
    /// restore the one after).
    #[arg(long, value_enum, default_value = "notifications")]
    probe: Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Probe {
    Notifications,
    Generation,
}

/// Poll period of `--probe generation`.
const GENERATION_POLL: Duration = Duration::from_micros(250);

/// Longest wait for one notification.
const WAIT: Duration = Duration::from_secs(5);
/// Pause after each restore (the agent's post-commit read-back comes 200 ms after a commit).
const SETTLE: Duration = Duration::from_millis(300);
/// After the agent's first commit, how long no commit must follow for its last to be the restore
/// (the lockdown and the full table are two commits, tens of ms apart at 10k pods).
const QUIET: Duration = Duration::from_millis(250);

const KINDS: [&str; 8] = [
    "flush chain",
    "flush map",
    "delete element",
    "add element",
    "insert accept",
    "delete rule",
    "flush ruleset",
    "delete table",
];

fn main() {
    palisade_bench::init_logging();
    let mut cli = Cli::parse();
    // A missing agent would only show as "no conflist" after the start-up wait.
    match std::fs::canonicalize(&cli.agent) {
        Ok(agent) => cli.agent = agent,
        Err(e) => {
            eprintln!(
                "tamper-bench failed: the agent binary {}: {e} (build it: cargo build --release -p palisade-agent, or pass --agent)",
                cli.agent.display()
            );
            std::process::exit(1);
        }
    }
    if let Err(e) = run(&cli) {
        eprintln!("tamper-bench failed: {e}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let lab = Lab::create()?;
    rulesets::load_base(&lab.node2)?;
    println!(
        "| pods | kind | isolated p50 ms | isolated max ms | restored p50 ms | restored max ms | restored / tries |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &pods in &cli.pods {
        let work = std::env::temp_dir().join(format!(
            "palisade-tamper-bench-{}-{pods}",
            std::process::id()
        ));
        let r = measure_size(cli, &lab, &work, pods);
        if let Some(dir) = &cli.keep_logs {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(
                work.join("agent.log"),
                dir.join(format!("agent-{pods}.log")),
            );
        }
        let _ = std::fs::remove_dir_all(&work);
        // The agent is gone; its table goes too, so the next size starts clean.
        let _ = run_in(
            &lab.node2,
            "nft",
            &["delete", "table", "inet", palisade_contract::TABLE_NAME],
            None,
        );
        for (kind, times, tries) in r? {
            let (iso, ms): (Vec<f64>, Vec<f64>) = times.into_iter().unzip();
            println!(
                "| {pods} | {kind} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{tries} |",
                median(&iso).unwrap_or(f64::NAN),
                max(&iso).unwrap_or(f64::NAN),
                median(&ms).unwrap_or(f64::NAN),
                max(&ms).unwrap_or(f64::NAN),
                ms.len()
            );
        }
    }
    Ok(())
}

/// Per kind: (isolated, restored) ms of each try that saw both, and the tries.
type Rows = Vec<(&'static str, Vec<(f64, f64)>, usize)>;

fn measure_size(cli: &Cli, lab: &Lab, work: &Path, pods: usize) -> Result<Rows> {
    let policies = (pods as f64 * cli.policies_per_pod).round() as usize;
    let dirs = AgentDirs::create(work)?;
    let manifests = &dirs.manifests;
    let cluster = Cluster::generate_shape(Shape::for_pods(pods, policies), cli.seed)?;
    let items: Vec<Value> = k8s::objects(&cluster);
    write_manifest(
        manifests,
        "00-cluster.json",
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )?;
    // The measured server is ingress-isolated, so the ingress map has an element to tamper with.
    write_manifest(
        manifests,
        "05-server-deny.json",
        &json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "server-deny", "namespace": "bench"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}
        }),
    )?;
    let log = work.join("agent.log");
    let source = ["--manifests".to_string(), path_str(manifests)?.to_string()];
    let mut args = dirs.run_args(&source, palisade_bench::enforce::NO_RESYNC)?;
    args.extend(["--nft-backend".to_string(), cli.nft_backend.clone()]);
    let agent = ChildGuard::spawn_in_logged(
        &lab.node2,
        path_str(&cli.agent)?,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &log,
    )?;
    dirs.wait_conflist(&log)?;
    std::thread::sleep(SETTLE);
    let probe = match cli.probe {
        Probe::Notifications => Watcher::Notifications(watch(&lab.node2)?),
        Probe::Generation => Watcher::Generation(GenerationProbe::start(&lab.node2)?),
    };
    let mut rows = Vec::new();
    let kinds: Vec<&'static str> = if cli.kinds.is_empty() {
        KINDS.to_vec()
    } else {
        cli.kinds
            .iter()
            .map(|k| {
                KINDS
                    .iter()
                    .copied()
                    .find(|known| known == k)
                    .ok_or_else(|| {
                        Error::Invalid(format!("unknown tampering {k:?}; one of {KINDS:?}"))
                    })
            })
            .collect::<Result<_>>()?
    };
    for &kind in &kinds {
        let mut ms = Vec::new();
        for _ in 0..cli.tries {
            let args = tamper_args(&lab.node2, kind)?;
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            probe.arm()?;
            run_in(&lab.node2, "nft", &words, None)?;
            match probe.restore_time() {
                Some(t) => {
                    let (iso, back) = (
                        t.isolated.as_secs_f64() * 1e3,
                        t.restored.as_secs_f64() * 1e3,
                    );
                    tracing::debug!(
                        kind,
                        isolated_ms = iso,
                        ms = back,
                        "restored (logged at the restore's notification)"
                    );
                    ms.push((iso, back))
                }
                None => tracing::warn!(kind, pods, "no restore seen within 5 s"),
            }
            if kind == "flush ruleset" {
                rulesets::load_base(&lab.node2)?; // the node's other tables, as before
            }
            std::thread::sleep(SETTLE);
        }
        let back: Vec<f64> = ms.iter().map(|t| t.1).collect();
        tracing::info!(
            kind,
            pods,
            p50_ms = median(&back).unwrap_or(f64::NAN),
            max_ms = max(&back).unwrap_or(f64::NAN),
            "tampering kind done"
        );
        rows.push((kind, ms, cli.tries));
    }
    std::thread::sleep(Duration::from_secs(1));
    drop(agent);
    // One restore per tampering and none more (no loop): the agent logs each one.
    let text =
        std::fs::read_to_string(&log).map_err(io_err_pub(format!("reading {}", log.display())))?;
    let restores = text.matches("changed behind our back").count();
    let tampered = kinds.len() * cli.tries;
    println!(
        "<!-- {pods} pods: {restores} restores logged by the agent for {tampered} tamperings -->"
    );
    if restores != tampered {
        tracing::warn!(pods, restores, tampered, log = %log.display(), "restores differ from tamperings");
    }
    Ok(rows)
}

/// What sees the tampering and the restore.
enum Watcher {
    Notifications(mpsc::Receiver<(Instant, Drift)>),
    Generation(GenerationProbe),
}

impl Watcher {
    /// Ready for the next tampering.
    fn arm(&self) -> Result<()> {
        match self {
            Watcher::Notifications(events) => {
                while events.try_recv().is_ok() {}
                Ok(())
            }
            Watcher::Generation(p) => p.arm(),
        }
    }
    fn restore_time(&self) -> Option<Restore> {
        match self {
            Watcher::Notifications(events) => restore_time(events),
            Watcher::Generation(p) => p.restore_time(),
        }
    }
}

/// One try's two moments, from the tampering's commit.
#[derive(Debug, Clone, Copy)]
struct Restore {
    /// The agent's first commit after the tampering.
    isolated: Duration,
    /// Its last before [`QUIET`].
    restored: Duration,
}

/// Follows the agent's commits after the tampering at `t0`: `next` gives the time of each (`None`
/// once none came within the time it is given).
fn follow(
    t0: Instant,
    first: Instant,
    mut next: impl FnMut(Duration) -> Option<Instant>,
) -> Restore {
    let mut last = first;
    while let Some(t) = next(QUIET) {
        last = t;
    }
    Restore {
        isolated: first.saturating_duration_since(t0),
        restored: last.saturating_duration_since(t0),
    }
}

/// A thread in the node's namespace that, once armed, polls the ruleset's generation until it moved
/// twice (the tampering, then the agent's first commit), then until it stays for [`QUIET`], and
/// reports the moves' times from the tampering's.
struct GenerationProbe {
    arm: mpsc::Sender<()>,
    armed: mpsc::Receiver<std::result::Result<(), String>>,
    done: mpsc::Receiver<Option<Restore>>,
}

impl GenerationProbe {
    fn start(ns: &str) -> Result<Self> {
        let (arm_tx, arm_rx) = mpsc::channel::<()>();
        let (armed_tx, armed_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let ns_name = ns.to_string();
        std::thread::Builder::new()
            .name("tamper-generation".into())
            .spawn(move || {
                if let Err(e) = enter_netns(&ns_name) {
                    let _ = armed_tx.send(Err(e.to_string()));
                    return;
                }
                let mut writer = palisade_nft::setelem::ElementWriter::new();
                while arm_rx.recv().is_ok() {
                    let g0 = match writer.generation() {
                        Ok(g) => g,
                        Err(e) => {
                            let _ = armed_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = armed_tx.send(Ok(()));
                    let deadline = Instant::now() + 2 * WAIT;
                    let mut tampered = None;
                    let mut out = None;
                    while Instant::now() < deadline {
                        let Ok(g) = writer.generation() else { break };
                        let now = Instant::now();
                        let moved = g.wrapping_sub(g0);
                        if moved >= 1 && tampered.is_none() {
                            tampered = Some(now);
                        }
                        if moved >= 2 {
                            let t0 = tampered.unwrap_or(now);
                            let mut seen = g;
                            out = Some(follow(t0, now, |quiet| {
                                let until = Instant::now() + quiet;
                                while Instant::now() < until {
                                    let g = writer.generation().ok()?;
                                    if g != seen {
                                        seen = g;
                                        return Some(Instant::now());
                                    }
                                    std::thread::sleep(GENERATION_POLL);
                                }
                                None
                            }));
                            break;
                        }
                        std::thread::sleep(GENERATION_POLL);
                    }
                    if done_tx.send(out).is_err() {
                        return;
                    }
                }
            })
            .map_err(io_err_pub("spawning the generation probe"))?;
        Ok(GenerationProbe {
            arm: arm_tx,
            armed: armed_rx,
            done: done_rx,
        })
    }
    fn arm(&self) -> Result<()> {
        // An answer of an earlier try that timed out is dropped.
        while self.done.try_recv().is_ok() {}
        self.arm
            .send(())
            .map_err(|_| Error::Invalid("the generation probe died".into()))?;
        self.armed
            .recv()
            .map_err(|_| Error::Invalid("the generation probe died".into()))?
            .map_err(|e| Error::Invalid(format!("the generation probe: {e}")))
    }
    fn restore_time(&self) -> Option<Restore> {
        self.done.recv_timeout(3 * WAIT).ok().flatten()
    }
}

/// From the tampering's first notification to the first notification of the next transactions of
/// another committer (the agent's): the kernel sends a transaction's notifications once it is
/// live, so this is commit to commit, without the time this bench takes to parse them. `None`
/// when either does not come within [`WAIT`].
fn restore_time(events: &mpsc::Receiver<(Instant, Drift)>) -> Option<Restore> {
    let (t0, tamper) = events.recv_timeout(WAIT).ok()?;
    let t0 = tamper.first_seen.unwrap_or(t0);
    let deadline = Instant::now() + WAIT;
    let agent = |events: &mpsc::Receiver<(Instant, Drift)>, until: Instant| loop {
        let left = until.saturating_duration_since(Instant::now());
        let (t1, d) = events.recv_timeout(left).ok()?;
        if d.portid != tamper.portid {
            return Some(d.first_seen.unwrap_or(t1));
        }
    };
    let first = agent(events, deadline)?;
    Some(follow(t0, first, |quiet| {
        agent(events, Instant::now() + quiet)
    }))
}

/// A thread in `ns` reading nf_tables notifications: every transaction on our table not committed
/// by this process (so the tampering `nft` and the agent both) with the time it was read.
fn watch(ns: &str) -> Result<mpsc::Receiver<(Instant, Drift)>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns_name = ns.to_string();
    std::thread::Builder::new()
        .name("tamper-watch".into())
        .spawn(move || {
            let opened = enter_netns(&ns_name)
                .map_err(std::io::Error::other)
                .and_then(|()| {
                    let scope = Scope::new(
                        palisade_contract::TABLE_FAMILY,
                        palisade_contract::TABLE_NAME,
                        &[
                            palisade_contract::PENDING_SET_V4,
                            palisade_contract::PENDING_SET_V6,
                        ],
                    )
                    .map_err(std::io::Error::other)?;
                    Monitor::open(scope).map_err(std::io::Error::other)
                });
            let mut monitor = match opened {
                Ok(m) => {
                    let _ = ready_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(Some(d)) = monitor.next(None) {
                if tx.send((Instant::now(), d)).is_err() {
                    return;
                }
            }
        })
        .map_err(io_err_pub("spawning the watch thread"))?;
    ready_rx
        .recv()
        .map_err(|_| Error::Invalid("the watch thread died".into()))?
        .map_err(io_err_pub(format!("opening an nf_tables monitor in {ns}")))?;
    Ok(rx)
}

/// `nft` arguments of one tampering, read from the table as it is now (handles and elements change
/// with every restore).
fn tamper_args(ns: &str, kind: &str) -> Result<Vec<String>> {
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    Ok(match kind {
        "flush chain" => words("flush chain inet palisade postrouting"),
        "flush map" => words("flush map inet palisade ingress_v4"),
        "delete element" => {
            let key = first_ingress_element(ns)?;
            words(&format!(
                "delete element inet palisade ingress_v4 {{ {key} }}"
            ))
        }
        "add element" => words("add element inet palisade ingress_v4 { 10.99.0.1 : accept }"),
        "insert accept" => words("insert rule inet palisade postrouting accept"),
        "delete rule" => {
            let (chain, handle) = a_drop_rule(ns)?;
            words(&format!(
                "delete rule inet palisade {chain} handle {handle}"
            ))
        }
        "flush ruleset" => words("flush ruleset"),
        "delete table" => words("delete table inet palisade"),
        other => return Err(Error::Invalid(format!("unknown tampering {other}"))),
    })
}

fn listing(ns: &str) -> Result<Vec<Value>> {
    let out = run_in(
        ns,
        "nft",
        &["-a", "-j", "list", "table", "inet", "palisade"],
        None,
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| Error::Parse {
        what: "our table's listing".into(),
        detail: e.to_string(),
    })?;
    Ok(v["nftables"].as_array().cloned().unwrap_or_default())
}

fn first_ingress_element(ns: &str) -> Result<String> {
    listing(ns)?
        .iter()
        .find(|i| i["map"]["name"] == "ingress_v4")
        .and_then(|m| m["map"]["elem"][0][0].as_str().map(String::from))
        .ok_or_else(|| Error::Check("ingress_v4 has no element (is the server isolated?)".into()))
}

/// A `counter drop` of a group chain (the end of an isolated pod's chain), else the last rule of
/// `postrouting`.
fn a_drop_rule(ns: &str) -> Result<(String, String)> {
    let items = listing(ns)?;
    let rules: Vec<&Value> = items
        .iter()
        .map(|i| &i["rule"])
        .filter(|r| r.is_object())
        .collect();
    let drop = rules.iter().find(|r| {
        let chain = r["chain"].as_str().unwrap_or_default();
        (chain.starts_with("in_") || chain.starts_with("eg_"))
            && r["expr"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x.get("drop").is_some()))
    });
    let rule = drop
        .or_else(|| rules.iter().rev().find(|r| r["chain"] == "postrouting"))
        .ok_or_else(|| Error::Check("no rule of ours to delete".into()))?;
    Ok((
        rule["chain"].as_str().unwrap_or_default().to_string(),
        rule["handle"].to_string(),
    ))
}
