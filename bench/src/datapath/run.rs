//! The datapath run: for every round, every policy count and every system (order rotated per round),
//! load that system's ruleset into both node namespaces, check that allowed traffic passes and a
//! port no policy admits is dropped, then measure connect/close rate, request/response latency and
//! iperf3 throughput from the client pod to the server pod. With `--alternate` the labs are
//! measured in turns by one client from the host: connections (`crr-alternate`) and, in place of
//! iperf3, a bulk stream in acknowledged chunks (`stream-alternate`).

use super::cmd::{self, run_in, ChildGuard};
use super::quiet;
use super::rulesets::{self, Rendered, System};
use super::topo::{Lab, Underlay, CLIENT_IP, SERVER_IP};
use super::traffic::{CrrResult, RrResult, StreamResult};
use super::workload::Cluster;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

pub const CRR_PORT: u16 = 7000;
pub const RR_PORT: u16 = 7001;
pub const IPERF_PORT: u16 = 5201;
/// A port no policy admits: with policies loaded, a SYN to it must time out (dropped), not be refused.
pub const DENIED_PORT: u16 = 7999;
/// CPUs the client and the server side are pinned to.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;
/// After a ruleset swap: at most this share of all CPUs busy over one window counts as quiet.
const QUIET_BUSY: f64 = 0.05;
const QUIET_WINDOW: Duration = Duration::from_millis(100);
const QUIET_LIMIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Config {
    pub policies: Vec<usize>,
    pub systems: Vec<System>,
    pub rounds: usize,
    /// Length of one connect/close or request/response slice.
    pub slice_ms: u64,
    /// Length of one iperf3 run.
    pub iperf_secs: u64,
    /// Seconds left out at the start of each iperf3 run (slow start), run before `iperf_secs`.
    pub iperf_omit: u64,
    pub seed: u64,
    pub iperf: bool,
    /// Run iperf3 only in every n-th round (it is the slowest and least noisy measurement).
    pub iperf_every: usize,
    /// This binary, run inside the pod namespaces for `serve`, `crr` and `rr`.
    pub exe: PathBuf,
    /// Overrides the palisade ruleset (e.g. from `palisade-agent compile`): policy count ->
    /// (node-1 nft input, node-2 nft input).
    pub palisade_override: BTreeMap<usize, (String, String)>,
    /// Underlays every system is measured on (a sample's system name carries the suffix,
    /// `Underlay::suffix`).
    pub underlays: Vec<Underlay>,
    /// All systems share one lab per underlay, each slice loading its system's ruleset first.
    pub same_lab: bool,
    /// Two systems on each underlay, every one in a lab of its own, all their connect/close
    /// slices one slice alternating between the labs; the two labs of an underlay trade rulesets
    /// every round (`--alternate`).
    pub alternate: bool,
    /// Connections from one lab before the other's turn (`--alternate-turn`).
    pub alternate_turn: usize,
    /// ClusterNetworkPolicies added to every cluster (`Cluster::with_cluster_policies`).
    pub cluster_policies: usize,
}

/// One measurement of one system at one policy count in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub policies: usize,
    pub system: String,
    pub rules: usize,
    pub elements: usize,
    pub load_ms: f64,
    pub deny_ok: bool,
    pub crr: Option<CrrResult>,
    pub rr: Option<RrResult>,
    pub iperf_gbps: Option<f64>,
    /// `--alternate`'s bulk throughput (in place of iperf3).
    #[serde(default)]
    pub stream: Option<StreamResult>,
    pub error: Option<String>,
}

#[derive(Clone)]
struct Prepared {
    node1: Rendered,
    node2: Rendered,
}

fn prepare(cfg: &Config) -> Result<BTreeMap<(usize, System, Underlay), Prepared>> {
    let mut out = BTreeMap::new();
    for &p in &cfg.policies {
        let cluster = Cluster::generate(p, cfg.seed)?.with_cluster_policies(cfg.cluster_policies);
        for (&sys, &u) in cfg
            .systems
            .iter()
            .flat_map(|s| cfg.underlays.iter().map(move |u| (s, u)))
        {
            let mut prepared = Prepared {
                node1: rulesets::render(sys, &cluster, "node-1", u)?,
                node2: rulesets::render(sys, &cluster, "node-2", u)?,
            };
            if sys == System::Palisade {
                if let Some((a, b)) = cfg.palisade_override.get(&p) {
                    prepared.node1.nft_json = Some(a.clone());
                    prepared.node2.nft_json = Some(b.clone());
                }
            }
            tracing::info!(
                policies = p,
                system = sys.name(),
                rules = prepared.node1.rules + prepared.node2.rules,
                "rendered"
            );
            out.insert((p, sys, u), prepared);
        }
    }
    Ok(out)
}

fn exe_str(cfg: &Config) -> Result<String> {
    cfg.exe.to_str().map(str::to_string).ok_or_else(|| {
        Error::Invalid(format!(
            "bench binary path {} is not UTF-8",
            cfg.exe.display()
        ))
    })
}

/// A lab (two nodes, a client and a server pod) with its server running; `current` is the system
/// whose ruleset is loaded in it.
struct LabRun {
    lab: Lab,
    _server: ChildGuard,
    current: Cell<Option<System>>,
}

impl LabRun {
    /// Builds a lab on `underlay` (conntrack on in both nodes) and starts its server (serving the
    /// acknowledged stream on [`IPERF_PORT`] with `stream`: no iperf3 server runs then).
    fn start(underlay: Underlay, exe: &str, stream: bool) -> Result<LabRun> {
        let lab = Lab::create_with(underlay)?;
        rulesets::load_base(&lab.node1)?;
        rulesets::load_base(&lab.node2)?;
        let (crr, rr, iperf, cpu) = (
            CRR_PORT.to_string(),
            RR_PORT.to_string(),
            IPERF_PORT.to_string(),
            SERVER_CPU.to_string(),
        );
        let mut args = vec![
            "serve",
            "--ip",
            SERVER_IP,
            "--crr-port",
            &crr,
            "--rr-port",
            &rr,
            "--secs",
            "7200",
            "--cpu",
            &cpu,
        ];
        if stream {
            args.extend(["--stream-port", &iperf]);
        }
        let mut server = ChildGuard::spawn_in(&lab.server, exe, &args)?;
        wait_ready(&mut server)?;
        Ok(LabRun {
            lab,
            _server: server,
            current: Cell::new(None),
        })
    }

    /// Loads `sys`'s ruleset into both nodes (in parallel) after removing the one loaded before;
    /// returns the mean load time per node.
    fn switch_to(&self, sys: System, prep: &Prepared) -> Result<Duration> {
        if let Some(old) = self.current.take() {
            rulesets::clear(&self.lab.node1, old)?;
            rulesets::clear(&self.lab.node2, old)?;
        }
        let (n1, n2) = (self.lab.node1.clone(), self.lab.node2.clone());
        let (r1, r2) = std::thread::scope(|s| {
            let a = s.spawn(|| rulesets::load(&n1, &prep.node1));
            let b = s.spawn(|| rulesets::load(&n2, &prep.node2));
            (a.join(), b.join())
        });
        match (r1, r2) {
            (Ok(Ok(a)), Ok(Ok(b))) => {
                self.current.set(Some(sys));
                Ok((a + b) / 2)
            }
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e),
            _ => Err(Error::Invalid("loader thread panicked".into())),
        }
    }
}

/// One system on one underlay. By default every system has a lab of its own with its ruleset
/// loaded once, so rounds interleave short slices of every system without reloading (the
/// 10k-policy naive ruleset takes minutes to load). With `--same-lab` all systems share one lab
/// and each slice first loads its system's ruleset (`reload`): no lab-to-lab difference (CPU
/// placement of the softirqs, hash seeds) can pass for a difference between rulesets.
struct Loaded {
    system: System,
    underlay: Underlay,
    lab: Rc<LabRun>,
    reload: Option<Prepared>,
    load_ms: f64,
    rules: usize,
    elements: usize,
    deny_ok: bool,
    error: Option<String>,
}

impl Loaded {
    /// Makes this system's ruleset the loaded one (same-lab mode; a no-op otherwise), and after a
    /// swap waits for the machine to go quiet (the old table freed, the loaders' work drained), so
    /// the slice that follows measures the ruleset, not the swap.
    fn activate(&self) -> Result<()> {
        if let Some(prep) = &self.reload {
            if self.lab.current.get() != Some(self.system) {
                self.lab.switch_to(self.system, prep)?;
                let (waited, quiet) = quiet::wait_quiet(QUIET_BUSY, QUIET_WINDOW, QUIET_LIMIT);
                if quiet {
                    tracing::debug!(
                        system = self.system.name(),
                        waited_ms = waited.as_millis() as u64,
                        "quiet after the swap"
                    );
                } else {
                    tracing::warn!(
                        system = self.system.name(),
                        waited_ms = waited.as_millis() as u64,
                        "the machine did not go quiet after the swap; measuring anyway"
                    );
                }
            }
        }
        Ok(())
    }
}

/// Loads `sys` into `lab` and checks the gates: a port no policy admits is dropped (unless no
/// policy is loaded) and the measured flow passes.
fn load_one(
    p: usize,
    sys: System,
    underlay: Underlay,
    lab: Rc<LabRun>,
    prep: &Prepared,
    reloads: bool,
    exe: &str,
) -> Result<Loaded> {
    tracing::info!(policies = p, system = sys.name(), "loading");
    let mut loaded = Loaded {
        system: sys,
        underlay,
        lab,
        reload: None,
        load_ms: 0.0,
        rules: prep.node1.rules + prep.node2.rules,
        elements: prep.node1.elements + prep.node2.elements,
        deny_ok: false,
        error: None,
    };
    match loaded.lab.switch_to(sys, prep) {
        Ok(took) => loaded.load_ms = took.as_secs_f64() * 1e3,
        Err(e) => {
            loaded.error = Some(e.to_string());
            return Ok(loaded);
        }
    }
    if reloads {
        loaded.reload = Some(prep.clone());
    }
    tracing::info!(
        policies = p,
        system = sys.name(),
        load_ms = loaded.load_ms,
        "loaded"
    );
    let probe = |port: u16| {
        run_in(
            &loaded.lab.lab.client,
            exe,
            &[
                "probe",
                "--target",
                &format!("{SERVER_IP}:{port}"),
                "--timeout-ms",
                "300",
            ],
            None,
        )
        .map(|o| o.trim().to_string())
    };
    let denied = probe(DENIED_PORT)? == "blocked";
    let allowed = probe(CRR_PORT)? == "open";
    loaded.deny_ok = if sys == System::None || p == 0 {
        !denied
    } else {
        denied
    };
    if !loaded.deny_ok {
        loaded.error = Some(
            "deny gate failed (a port no policy admits was not dropped): the run is void".into(),
        );
    } else if !allowed {
        loaded.error = Some("the measured flow is blocked: the run is void".into());
    }
    Ok(loaded)
}

/// Runs the whole matrix; returns every sample (failed measurements carry `error`).
pub fn run(cfg: &Config) -> Result<Vec<Sample>> {
    let exe = exe_str(cfg)?;
    if cfg.alternate && (cfg.systems.len() != 2 || cfg.same_lab) {
        return Err(Error::Invalid(
            "--alternate measures exactly two systems, each in a lab of its own on every \
             underlay (not with --same-lab)"
                .into(),
        ));
    }
    let mut samples = Vec::new();
    for &p in &cfg.policies {
        let single = Config {
            policies: vec![p],
            ..cfg.clone()
        };
        let prepared = prepare(&single)?;
        let mut labs = Vec::new();
        let mut shared: BTreeMap<Underlay, Rc<LabRun>> = BTreeMap::new();
        for &sys in &cfg.systems {
            for &u in &cfg.underlays {
                let Some(prep) = prepared.get(&(p, sys, u)) else {
                    continue;
                };
                let lab = match shared.get(&u) {
                    Some(lab) if cfg.same_lab => lab.clone(),
                    _ => {
                        let lab = Rc::new(LabRun::start(u, &exe, cfg.alternate)?);
                        if cfg.same_lab {
                            shared.insert(u, lab.clone());
                        }
                        lab
                    }
                };
                let reloads = cfg.same_lab || cfg.alternate;
                labs.push(load_one(p, sys, u, lab, prep, reloads, &exe)?);
            }
        }
        drop(prepared);
        for round in 0..cfg.rounds {
            if cfg.alternate && round > 0 {
                // The two labs of each underlay trade rulesets: on even rounds each system is in
                // the lab it was loaded in, on odd rounds in the other's (`activate` reloads).
                // `labs` holds the first system's underlays, then the second's, in one order.
                let half = labs.len() / 2;
                let (first, second) = labs.split_at_mut(half);
                for (a, b) in first.iter_mut().zip(second.iter_mut()) {
                    if a.underlay == b.underlay {
                        std::mem::swap(&mut a.lab, &mut b.lab);
                    }
                }
            }
            let mut order: Vec<&Loaded> = labs.iter().collect();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            let mut round_samples: Vec<Sample> = order
                .iter()
                .map(|l| Sample {
                    round,
                    policies: p,
                    system: format!("{}{}", l.system.name(), l.underlay.suffix()),
                    rules: l.rules,
                    elements: l.elements,
                    load_ms: l.load_ms,
                    deny_ok: l.deny_ok,
                    crr: None,
                    rr: None,
                    iperf_gbps: None,
                    stream: None,
                    error: l.error.clone(),
                })
                .collect();
            if cfg.alternate {
                crr_alternate(cfg, &order, &mut round_samples, &exe);
            }
            // Short slices, one system after the other, so every system sees the same machine.
            for (l, sample) in order.iter().zip(round_samples.iter_mut()) {
                if sample.error.is_none() && !cfg.alternate {
                    match l.activate().and_then(|()| client(cfg, l, &exe, "crr")) {
                        Ok(v) => sample.crr = serde_json::from_str(v.trim()).ok(),
                        Err(e) => sample.error = Some(e.to_string()),
                    }
                }
            }
            for (l, sample) in order.iter().zip(round_samples.iter_mut()) {
                if sample.error.is_none() {
                    match l.activate().and_then(|()| client(cfg, l, &exe, "rr")) {
                        Ok(v) => sample.rr = serde_json::from_str(v.trim()).ok(),
                        Err(e) => sample.error = Some(e.to_string()),
                    }
                }
            }
            let bulk_round = cfg.iperf && round.is_multiple_of(cfg.iperf_every.max(1));
            if bulk_round && cfg.alternate {
                stream_alternate(cfg, &order, &mut round_samples, &exe);
            } else if bulk_round {
                for (l, sample) in order.iter().zip(round_samples.iter_mut()) {
                    if sample.error.is_none() {
                        match l
                            .activate()
                            .and_then(|()| iperf(&l.lab.lab, cfg.iperf_secs, cfg.iperf_omit))
                        {
                            Ok(g) => sample.iperf_gbps = Some(g),
                            Err(e) => sample.error = Some(e.to_string()),
                        }
                    }
                }
            }
            for sample in &mut round_samples {
                if sample.error.is_none() && sample.crr.as_ref().is_some_and(|c| c.failures > 0) {
                    sample.error = Some("allowed connections failed: the run is void".into());
                }
                if let Some(e) = &sample.error {
                    tracing::error!(round, policies = p, system = %sample.system, error = %e, "measurement void");
                }
            }
            tracing::info!(round, policies = p, "round done");
            samples.append(&mut round_samples);
        }
    }
    Ok(samples)
}

/// One connect/close slice alternating connection by connection between the labs of `order`
/// (`crr-alternate`, from the host), each lab's result into its sample. A failure voids every
/// sample of the slice.
fn crr_alternate(cfg: &Config, order: &[&Loaded], samples: &mut [Sample], exe: &str) {
    let target = format!("{SERVER_IP}:{CRR_PORT}");
    let (turn, ms) = (cfg.alternate_turn.to_string(), cfg.slice_ms.to_string());
    let args = ["--target", &target, "--turn", &turn, "--ms", &ms];
    alternate(order, samples, exe, "crr-alternate", &args, |s, r| {
        s.crr = Some(r)
    });
}

/// One bulk slice of `--iperf-secs` in acknowledged chunks, in turns between the labs of `order`
/// (`stream-alternate`, from the host), each lab's result into its sample. A failure voids every
/// sample of the slice.
fn stream_alternate(cfg: &Config, order: &[&Loaded], samples: &mut [Sample], exe: &str) {
    let target = format!("{SERVER_IP}:{IPERF_PORT}");
    let ms = (cfg.iperf_secs * 1000).to_string();
    let args = ["--target", &target, "--ms", &ms];
    alternate(order, samples, exe, "stream-alternate", &args, |s, r| {
        s.stream = Some(r)
    });
}

/// Runs the bench's `kind` client (`crr-alternate`, `stream-alternate`) from the host over the
/// client pods of `order` (all their rulesets loaded), pinned as the pods' clients are, and
/// hands each lab's result to `put` with its sample; a failure voids every sample of the slice.
fn alternate<R: serde::de::DeserializeOwned>(
    order: &[&Loaded],
    samples: &mut [Sample],
    exe: &str,
    kind: &str,
    args: &[&str],
    put: impl Fn(&mut Sample, R),
) {
    if samples.iter().any(|s| s.error.is_some()) {
        return;
    }
    let measured = (|| -> Result<Vec<R>> {
        for l in order {
            l.activate()?;
        }
        let cpu = CLIENT_CPU.to_string();
        let mut all = vec![kind, "--cpu", &cpu];
        all.extend(args);
        for l in order {
            all.extend(["--netns", l.lab.lab.client.as_str()]);
        }
        let out = cmd::run(exe, &all)?;
        let results: Vec<R> = serde_json::from_str(out.trim()).map_err(|e| Error::Parse {
            what: format!("{kind} result"),
            detail: e.to_string(),
        })?;
        if results.len() != order.len() {
            return Err(Error::Invalid(format!(
                "{kind} answered {} results for {} labs",
                results.len(),
                order.len()
            )));
        }
        Ok(results)
    })();
    match measured {
        Ok(results) => {
            for (sample, r) in samples.iter_mut().zip(results) {
                put(sample, r);
            }
        }
        Err(e) => {
            for sample in samples.iter_mut() {
                sample.error = Some(e.to_string());
            }
        }
    }
}

/// Runs one `crr` or `rr` slice in the lab's client pod; returns its JSON.
fn client(cfg: &Config, l: &Loaded, exe: &str, kind: &str) -> Result<String> {
    let port = if kind == "crr" { CRR_PORT } else { RR_PORT };
    run_in(
        &l.lab.lab.client,
        exe,
        &[
            kind,
            "--target",
            &format!("{SERVER_IP}:{port}"),
            "--ms",
            &cfg.slice_ms.to_string(),
            "--cpu",
            &CLIENT_CPU.to_string(),
        ],
        None,
    )
}

fn wait_ready(server: &mut ChildGuard) -> Result<()> {
    let child = server
        .child_mut()
        .ok_or_else(|| Error::Invalid("server process already finished".into()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Invalid("server stdout not captured".into()))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(crate::io_err("reading the server's ready line"))?;
    if line.trim() != "ready" {
        return Err(Error::Invalid(format!("server did not start: {line:?}")));
    }
    Ok(())
}

/// iperf3 bulk throughput client pod -> server pod, in Gbit/s, over `secs` seconds after the
/// first `omit` (left out of the figure).
fn iperf(lab: &Lab, secs: u64, omit: u64) -> Result<f64> {
    let server = ChildGuard::spawn_in(
        &lab.server,
        "iperf3",
        &[
            "-s",
            "-1",
            "-B",
            SERVER_IP,
            "-p",
            &IPERF_PORT.to_string(),
            "-A",
            &SERVER_CPU.to_string(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let out = run_in(
        &lab.client,
        "iperf3",
        &[
            "-c",
            SERVER_IP,
            "-B",
            CLIENT_IP,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-O",
            &omit.to_string(),
            "-J",
            "-A",
            &CLIENT_CPU.to_string(),
        ],
        None,
    )?;
    let _ = server.finish(Duration::from_secs(3));
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| Error::Parse {
        what: "iperf3 JSON".into(),
        detail: e.to_string(),
    })?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e9)
        .ok_or_else(|| Error::Parse {
            what: "iperf3 JSON".into(),
            detail: "no end.sum_received.bits_per_second".into(),
        })
}

/// Moves the calling thread (only it) into the network namespace `ns` (an `ip netns` name).
pub fn enter_netns(ns: &str) -> Result<()> {
    let file = super::traffic::open_netns(ns)?;
    super::traffic::set_netns(&file).map_err(|source| Error::Io {
        context: format!("entering network namespace {ns}"),
        source,
    })
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (only that thread moves).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = ns.to_string();
    let handle = std::thread::spawn(move || {
        enter_netns(&ns)?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| Error::Invalid("namespace thread panicked".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::traffic::{probe_once, ProbeOutcome};
    use std::net::{SocketAddr, TcpListener};

    /// The bench's server in `lab`'s server pod for `ms` (the stream too on `stream`), on a thread
    /// of its own; returns once it had time to bind.
    fn serve_in(lab: &Lab, stream: Option<u16>, ms: u64) -> std::thread::JoinHandle<Result<()>> {
        let ns = lab.server.clone();
        let t = std::thread::spawn(move || {
            enter_netns(&ns)?;
            crate::datapath::traffic::serve(
                SERVER_IP,
                CRR_PORT,
                RR_PORT,
                stream,
                Duration::from_millis(ms),
            )
        });
        std::thread::sleep(Duration::from_millis(400));
        t
    }

    /// `--alternate`'s client: every lab gets its turns, each lab's connections are counted on its
    /// own side in the order the labs were given, and a lab whose server is gone fails alone.
    #[test]
    fn alternating_connections_are_counted_on_each_labs_own_side() {
        use crate::datapath::traffic::{crr_alternate, open_netns};
        let labs = [Lab::create().unwrap(), Lab::create().unwrap()];
        let server = serve_in(&labs[0], None, 1500);
        let target: SocketAddr = format!("{SERVER_IP}:{CRR_PORT}").parse().unwrap();
        let sides: Vec<_> = labs
            .iter()
            .map(|l| (open_netns(&l.client).unwrap(), target))
            .collect();
        let turn = 3;
        let r = crr_alternate(&sides, turn, Duration::from_millis(300)).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r[0].connections > 0, "the served lab connects: {:?}", r[0]);
        assert_eq!(r[0].failures, 0, "{:?}", r[0]);
        assert_eq!(
            r[1].connections, 0,
            "no server in the second lab: {:?}",
            r[1]
        );
        assert!(r[1].failures > 0, "{:?}", r[1]);
        let tries = |i: usize| r[i].connections + r[i].failures;
        assert!(
            tries(0).abs_diff(tries(1)) <= turn as u64,
            "turns of {turn}: {} against {}",
            tries(0),
            tries(1)
        );
        server.join().unwrap().unwrap();
    }

    /// `--alternate`'s bulk client: both labs' streams get the same number of turns, each counted
    /// on its own side in the order given, every byte acknowledged; a lab without a stream server
    /// fails the slice with an error naming its side.
    #[test]
    fn alternating_streams_take_equal_turns_and_count_on_each_labs_own_side() {
        use crate::datapath::traffic::{open_netns, stream_alternate, STREAM_CHUNK};
        let labs = [Lab::create().unwrap(), Lab::create().unwrap()];
        let servers: Vec<_> = labs
            .iter()
            .map(|l| serve_in(l, Some(IPERF_PORT), 2500))
            .collect();
        let target: SocketAddr = format!("{SERVER_IP}:{IPERF_PORT}").parse().unwrap();
        let sides: Vec<_> = labs
            .iter()
            .map(|l| (open_netns(&l.client).unwrap(), target))
            .collect();
        let r = stream_alternate(&sides, 2, Duration::from_millis(300)).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r[0].turns > 0, "{:?}", r[0]);
        assert_eq!(r[0].turns, r[1].turns, "turns in alternation: {r:?}");
        for side in &r {
            assert_eq!(side.bytes, side.turns * STREAM_CHUNK as u64, "{side:?}");
            assert!(side.gbps > 0.0 && side.seconds > 0.0, "{side:?}");
        }
        // A crr-only server (no stream port) in a third lab: the slice fails, naming that side.
        let third = Lab::create().unwrap();
        let crr_only = serve_in(&third, None, 1200);
        let sides = vec![
            (open_netns(&labs[0].client).unwrap(), target),
            (open_netns(&third.client).unwrap(), target),
        ];
        let e = stream_alternate(&sides, 1, Duration::from_millis(100))
            .expect_err("no stream server in the second lab")
            .to_string();
        assert!(e.contains("side 1"), "{e}");
        for s in servers {
            s.join().unwrap().unwrap();
        }
        crr_only.join().unwrap().unwrap();
    }

    /// Needs root (we always run tests as root): fails, never skips, when it cannot build the lab.
    #[test]
    fn every_system_admits_the_measured_flow_and_drops_a_port_no_policy_admits() {
        let lab = Lab::create().expect("creating the lab needs root");
        rulesets::load_base(&lab.node1).unwrap();
        rulesets::load_base(&lab.node2).unwrap();
        let listener = in_netns(&lab.server, || TcpListener::bind((SERVER_IP, CRR_PORT)))
            .unwrap()
            .unwrap();
        let cluster = Cluster::generate(100, 42).unwrap();
        let allowed: SocketAddr = format!("{SERVER_IP}:{CRR_PORT}").parse().unwrap();
        let denied: SocketAddr = format!("{SERVER_IP}:{DENIED_PORT}").parse().unwrap();
        // palisade-after is palisade plus commands an experimenter writes, palisade-tc-guard
        // needs BPF objects built by hand (llc); there are none here.
        for sys in System::ALL
            .into_iter()
            .filter(|s| !matches!(s, System::PalisadeAfter | System::PalisadeTcGuard))
        {
            for (ns, node) in [(&lab.node1, "node-1"), (&lab.node2, "node-2")] {
                rulesets::load(
                    ns,
                    &rulesets::render(sys, &cluster, node, Underlay::Flat).unwrap(),
                )
                .unwrap();
            }
            let t = Duration::from_millis(300);
            let ok = in_netns(&lab.client, move || probe_once(allowed, t)).unwrap();
            let no = in_netns(&lab.client, move || probe_once(denied, t)).unwrap();
            assert_eq!(ok, ProbeOutcome::Open, "{}: allowed flow", sys.name());
            let expect = if sys == System::None {
                ProbeOutcome::Refused
            } else {
                ProbeOutcome::Blocked
            };
            assert_eq!(no, expect, "{}: port no policy admits", sys.name());
            for ns in [&lab.node1, &lab.node2] {
                rulesets::clear(ns, sys).unwrap();
            }
        }
        drop(listener);
    }
}
