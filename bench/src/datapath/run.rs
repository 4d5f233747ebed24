//! The datapath run: for every round, every policy count and every system (order rotated per round),
//! load that system's ruleset into both node namespaces, check that allowed traffic passes and a
//! port no policy admits is dropped, then measure connect/close rate, request/response latency and
//! iperf3 throughput from the client pod to the server pod.

use super::cmd::{run_in, ChildGuard};
use super::rulesets::{self, Rendered, System};
use super::topo::{Lab, CLIENT_IP, SERVER_IP};
use super::traffic::{CrrResult, RrResult};
use super::workload::Cluster;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::Duration;

pub const CRR_PORT: u16 = 7000;
pub const RR_PORT: u16 = 7001;
pub const IPERF_PORT: u16 = 5201;
/// A port no policy admits: with policies loaded, a SYN to it must time out (dropped), not be refused.
pub const DENIED_PORT: u16 = 7999;
/// CPUs the client and the server side are pinned to.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

#[derive(Debug, Clone)]
pub struct Config {
    pub policies: Vec<usize>,
    pub systems: Vec<System>,
    pub rounds: usize,
    pub secs: u64,
    pub seed: u64,
    pub iperf: bool,
    /// Run iperf3 only in every n-th round (it is the slowest and least noisy measurement).
    pub iperf_every: usize,
    /// This binary, run inside the pod namespaces for `serve`, `crr` and `rr`.
    pub exe: PathBuf,
    /// Overrides the palisade ruleset (e.g. from `palisade-agent compile`): policy count ->
    /// (node-1 nft input, node-2 nft input).
    pub palisade_override: BTreeMap<usize, (String, String)>,
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
    pub error: Option<String>,
}

struct Prepared {
    node1: Rendered,
    node2: Rendered,
}

fn prepare(cfg: &Config) -> Result<BTreeMap<(usize, System), Prepared>> {
    let mut out = BTreeMap::new();
    for &p in &cfg.policies {
        let cluster = Cluster::generate(p, cfg.seed)?;
        for &sys in &cfg.systems {
            let mut prepared = Prepared {
                node1: rulesets::render(sys, &cluster, "node-1")?,
                node2: rulesets::render(sys, &cluster, "node-2")?,
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
            out.insert((p, sys), prepared);
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

/// One lab per system with that system's ruleset loaded once, so rounds interleave systems without
/// reloading (the 10k-policy naive ruleset takes minutes to load).
struct Loaded {
    system: System,
    lab: Lab,
    load_ms: f64,
    rules: usize,
    elements: usize,
    load_error: Option<String>,
}

fn load_labs(
    p: usize,
    systems: &[System],
    prepared: &BTreeMap<(usize, System), Prepared>,
) -> Result<Vec<Loaded>> {
    let mut labs = Vec::new();
    for &sys in systems {
        let Some(prep) = prepared.get(&(p, sys)) else {
            continue;
        };
        let lab = Lab::create()?;
        rulesets::load_base(&lab.node1)?;
        rulesets::load_base(&lab.node2)?;
        tracing::info!(policies = p, system = sys.name(), "loading");
        // Both nodes load in parallel; the figure is the mean per node.
        let (n1, n2) = (lab.node1.clone(), lab.node2.clone());
        let (r1, r2) = std::thread::scope(|s| {
            let a = s.spawn(|| rulesets::load(&n1, &prep.node1));
            let b = s.spawn(|| rulesets::load(&n2, &prep.node2));
            (a.join(), b.join())
        });
        let mut loaded = Loaded {
            system: sys,
            lab,
            load_ms: 0.0,
            rules: prep.node1.rules + prep.node2.rules,
            elements: prep.node1.elements + prep.node2.elements,
            load_error: None,
        };
        match (r1, r2) {
            (Ok(Ok(a)), Ok(Ok(b))) => loaded.load_ms = (a + b).as_secs_f64() * 1e3 / 2.0,
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => loaded.load_error = Some(e.to_string()),
            _ => loaded.load_error = Some("loader thread panicked".into()),
        }
        tracing::info!(
            policies = p,
            system = sys.name(),
            load_ms = loaded.load_ms,
            "loaded"
        );
        labs.push(loaded);
    }
    Ok(labs)
}

/// Runs the whole matrix; returns every sample (failed measurements carry `error`).
pub fn run(cfg: &Config) -> Result<Vec<Sample>> {
    let exe = exe_str(cfg)?;
    let mut samples = Vec::new();
    for &p in &cfg.policies {
        let single = Config {
            policies: vec![p],
            ..cfg.clone()
        };
        let prepared = prepare(&single)?;
        let labs = load_labs(p, &cfg.systems, &prepared)?;
        drop(prepared);
        for round in 0..cfg.rounds {
            let mut order: Vec<&Loaded> = labs.iter().collect();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            for loaded in order {
                let sys = loaded.system;
                tracing::info!(round, policies = p, system = sys.name(), "measuring");
                let mut sample = Sample {
                    round,
                    policies: p,
                    system: sys.name().to_string(),
                    rules: loaded.rules,
                    elements: loaded.elements,
                    load_ms: loaded.load_ms,
                    deny_ok: false,
                    crr: None,
                    rr: None,
                    iperf_gbps: None,
                    error: loaded.load_error.clone(),
                };
                if sample.error.is_none() {
                    if let Err(e) = measure_into(cfg, &loaded.lab, &exe, sys, p, &mut sample) {
                        sample.error = Some(e.to_string());
                    }
                }
                if let Some(e) = &sample.error {
                    tracing::error!(round, policies = p, system = sys.name(), error = %e, "measurement failed");
                }
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

fn measure_into(
    cfg: &Config,
    lab: &Lab,
    exe: &str,
    sys: System,
    p: usize,
    sample: &mut Sample,
) -> Result<()> {
    let secs = cfg.secs.to_string();
    let server_secs = (cfg.secs * 2 + 10).to_string();
    let cpu_s = SERVER_CPU.to_string();
    let cpu_c = CLIENT_CPU.to_string();
    let mut server = ChildGuard::spawn_in(
        &lab.server,
        exe,
        &[
            "serve",
            "--ip",
            SERVER_IP,
            "--crr-port",
            &CRR_PORT.to_string(),
            "--rr-port",
            &RR_PORT.to_string(),
            "--secs",
            &server_secs,
            "--cpu",
            &cpu_s,
        ],
    )?;
    wait_ready(&mut server)?;
    // Gate: a port no policy admits must be dropped (timeout), unless no policy is loaded.
    let deny = run_in(
        &lab.client,
        exe,
        &[
            "probe",
            "--target",
            &format!("{SERVER_IP}:{DENIED_PORT}"),
            "--timeout-ms",
            "200",
        ],
        None,
    )?;
    let denied = deny.trim() == "blocked";
    sample.deny_ok = if sys == System::None || p == 0 {
        !denied
    } else {
        denied
    };
    let crr_out = run_in(
        &lab.client,
        exe,
        &[
            "crr",
            "--target",
            &format!("{SERVER_IP}:{CRR_PORT}"),
            "--secs",
            &secs,
            "--cpu",
            &cpu_c,
        ],
        None,
    )?;
    let crr: CrrResult = serde_json::from_str(crr_out.trim()).map_err(|e| Error::Parse {
        what: "crr output".into(),
        detail: e.to_string(),
    })?;
    let rr_out = run_in(
        &lab.client,
        exe,
        &[
            "rr",
            "--target",
            &format!("{SERVER_IP}:{RR_PORT}"),
            "--secs",
            &secs,
            "--cpu",
            &cpu_c,
        ],
        None,
    )?;
    let rr: RrResult = serde_json::from_str(rr_out.trim()).map_err(|e| Error::Parse {
        what: "rr output".into(),
        detail: e.to_string(),
    })?;
    sample.crr = Some(crr);
    sample.rr = Some(rr);
    drop(server);
    if cfg.iperf && sample.round.is_multiple_of(cfg.iperf_every.max(1)) {
        sample.iperf_gbps = Some(iperf(lab, cfg.secs)?);
    }
    if !sample.deny_ok {
        return Err(Error::Invalid("deny gate failed: the run is void".into()));
    }
    if sample.crr.as_ref().is_some_and(|c| c.failures > 0) {
        return Err(Error::Invalid(
            "allowed connections failed: the run is void".into(),
        ));
    }
    Ok(())
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

/// iperf3 bulk throughput client pod -> server pod, in Gbit/s.
fn iperf(lab: &Lab, secs: u64) -> Result<f64> {
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

/// Runs `f` on a fresh thread that has entered network namespace `ns` (only that thread moves).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(crate::io_err(format!("opening {path}")))?;
    let handle = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; it only changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(Error::Io {
                context: "entering the namespace".into(),
                source: std::io::Error::last_os_error(),
            });
        }
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
        for sys in System::ALL {
            for (ns, node) in [(&lab.node1, "node-1"), (&lab.node2, "node-2")] {
                rulesets::load(ns, &rulesets::render(sys, &cluster, node).unwrap()).unwrap();
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
