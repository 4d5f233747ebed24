//! Enforcement latency: from the moment a change is written into the agent's manifest directory to
//! the moment a probe that sends a SYN every millisecond flips, for policy create/delete, label
//! change and new/deleted pod, with the real `palisade-agent` running in the server's node namespace.
//! Also the agent's CPU time and memory, at rest and while a background churn writes changes.

use super::cmd::{run_in, ChildGuard};
use super::k8s;
use super::stats::{max, median, quantile};
use super::store::{ApiStore, Store};
use super::topo::{Lab, CLIENT_IP, SERVER_IP};
use super::workload::{Cluster, Pod, Shape};
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

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The probe: one SYN every `interval`; prints `<mono_ns> open|blocked` at start and at every flip.
/// The timestamp of a flip is the send time of the first attempt with the new outcome.
pub fn probe_loop(
    target: std::net::SocketAddr,
    interval: Duration,
    timeout: Duration,
    duration: Duration,
) {
    use std::io::Write;
    let start = Instant::now();
    let mut last: Option<bool> = None;
    let mut next = Instant::now();
    let stdout = std::io::stdout();
    while start.elapsed() < duration {
        let sent = mono_ns();
        let open =
            super::traffic::probe_once(target, timeout) == super::traffic::ProbeOutcome::Open;
        if last != Some(open) {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{sent} {}", if open { "open" } else { "blocked" });
            let _ = out.flush();
            last = Some(open);
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// The measured established flow, client side: connects (a 1 ms attempt every `interval` while
/// blocked), then sends one byte every `interval` on that one connection and waits for its echo.
/// Prints `<mono_ns> open` when connected, `<mono_ns> blocked` with the send time of the first
/// message whose echo did not come within `reply_timeout` (then drops the connection and reconnects).
pub fn stream_loop(
    target: std::net::SocketAddr,
    interval: Duration,
    reply_timeout: Duration,
    duration: Duration,
) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let stdout = std::io::stdout();
    let say = |ns: u64, open: bool| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{ns} {}", if open { "open" } else { "blocked" });
        let _ = out.flush();
    };
    let mut said_blocked = false;
    let mut next = Instant::now();
    let pace = |next: &mut Instant| {
        *next += interval;
        let now = Instant::now();
        if *next > now {
            std::thread::sleep(*next - now);
        } else {
            *next = now;
        }
    };
    while start.elapsed() < duration {
        let sent = mono_ns();
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, interval) else {
            if !said_blocked {
                say(sent, false);
                said_blocked = true;
            }
            pace(&mut next);
            continue;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(reply_timeout));
        say(sent, true);
        said_blocked = false;
        let mut buf = [0u8; 1];
        while start.elapsed() < duration {
            let sent = mono_ns();
            let ok = s.write_all(b"m").is_ok() && matches!(s.read(&mut buf), Ok(1));
            if !ok {
                say(sent, false);
                said_blocked = true;
                break;
            }
            pace(&mut next);
        }
    }
}

/// The measured flow's server: echoes every byte, a thread per connection; a connection silent for
/// 5 s is dropped (a cut flow never closes cleanly).
pub fn stream_serve(ip: &str, port: u16, duration: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let listener =
        std::net::TcpListener::bind((ip, port)).map_err(io_err(format!("binding {ip}:{port}")))?;
    println!("ready");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // `accept` blocks: the process ends at the deadline whatever its connections do.
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// CPU seconds (user + system) and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(io_err(format!("reading /proc/{pid}/stat")))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state field (index 0).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(io_err(format!("reading /proc/{pid}/status")))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStats {
        cpu_seconds: (ticks(11) + ticks(12)) / hz,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Writes `name` into the manifest directory atomically (dotfile + rename); returns the monotonic
/// time just before the rename, which is when the change becomes visible.
pub fn write_manifest(dir: &Path, name: &str, doc: &Value) -> Result<u64> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_vec(doc).map_err(|e| Error::Parse {
        what: "manifest".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    let t = mono_ns();
    std::fs::rename(&tmp, dir.join(name))
        .map_err(io_err(format!("renaming into {}", dir.display())))?;
    Ok(t)
}

/// Removes `name` from the manifest directory; returns the monotonic time just before the unlink.
pub fn remove_manifest(dir: &Path, name: &str) -> Result<u64> {
    let t = mono_ns();
    std::fs::remove_file(dir.join(name)).map_err(io_err(format!("removing {name}")))?;
    Ok(t)
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The measured client pod object, with or without the `access=yes` label.
fn client_pod(access: bool) -> Value {
    let mut labels = json!({"app": "client"});
    if access {
        labels["access"] = json!("yes");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "bench", "labels": labels, "uid": "bench-client"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "none"}]},
        "status": {"phase": "Running", "podIP": CLIENT_IP, "podIPs": [{"ip": CLIENT_IP}]}
    })
}

/// A policy on the server admitting pods matching `from` on the probe port.
fn allow_policy(name: &str, from: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": from}}], "ports": [{"protocol": "TCP", "port": PROBE_PORT}]}]}
    })
}

/// A policy on the server admitting the client on the stream port (the measured established flow).
fn allow_stream_policy() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-stream", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"protocol": "TCP", "port": STREAM_PORT}]}]}
    })
}

/// The server's default deny (always present): the server is ingress-isolated.
fn server_deny() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-deny", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}
    })
}

const F_CLUSTER: &str = "00-cluster.json";
const F_DENY: &str = "05-server-deny.json";
const F_CLIENT: &str = "10-client.json";
const F_ALLOW: &str = "60-allow.json";
const F_ALLOW_LABEL: &str = "61-allow-access.json";
const F_ALLOW_STREAM: &str = "62-allow-stream.json";

/// The changes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scenario {
    /// grant: create a policy admitting the client; revoke: delete it.
    Policy,
    /// grant: the client pod gains the label the policy selects; revoke: loses it.
    Label,
    /// grant: a new (remote) pod matching the policy's peers appears; revoke: it is deleted.
    Pod,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Policy, Scenario::Label, Scenario::Pod];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Policy => "policy create/delete",
            Scenario::Label => "label change",
            Scenario::Pod => "new/deleted pod",
        }
    }

    /// Puts the directory in this scenario's starting (blocked) state.
    fn setup(self, store: &Store) -> Result<()> {
        store.clear(F_ALLOW);
        store.clear(F_ALLOW_LABEL);
        match self {
            Scenario::Policy => {
                store.put(F_CLIENT, &client_pod(false))?;
            }
            Scenario::Label => {
                store.put(F_CLIENT, &client_pod(false))?;
                store.put(
                    F_ALLOW_LABEL,
                    &allow_policy("allow-access", json!({"access": "yes"})),
                )?;
            }
            Scenario::Pod => {
                store.clear(F_CLIENT);
                store.put(
                    F_ALLOW,
                    &allow_policy("allow-client", json!({"app": "client"})),
                )?;
            }
        }
        Ok(())
    }

    fn grant(self, store: &Store) -> Result<u64> {
        match self {
            Scenario::Policy => store.put(
                F_ALLOW,
                &allow_policy("allow-client", json!({"app": "client"})),
            ),
            Scenario::Label => store.put(F_CLIENT, &client_pod(true)),
            Scenario::Pod => store.put(F_CLIENT, &client_pod(false)),
        }
    }

    fn revoke(self, store: &Store) -> Result<u64> {
        match self {
            Scenario::Policy => store.remove(F_ALLOW),
            Scenario::Label => store.put(F_CLIENT, &client_pod(false)),
            Scenario::Pod => store.remove(F_CLIENT),
        }
    }
}

/// Latencies of one scenario at one size, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub pods: usize,
    pub policies: usize,
    pub churn_per_second: u32,
    pub scenario: Scenario,
    pub grant_ms: Vec<f64>,
    pub revoke_ms: Vec<f64>,
    pub failures: usize,
    pub agent_before: ProcStats,
    pub agent_after: ProcStats,
    pub wall_seconds: f64,
    pub churn_writes: u64,
}

impl ScenarioResult {
    pub fn summary(v: &[f64]) -> (f64, f64, f64) {
        (
            median(v).unwrap_or(f64::NAN),
            quantile(v, 0.99).unwrap_or(f64::NAN),
            max(v).unwrap_or(f64::NAN),
        )
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: PathBuf,
    pub exe: PathBuf,
    pub pods: Vec<usize>,
    pub policies_per_pod: f64,
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
}

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

/// Flip events from the probe process.
struct Probe {
    _guard: ChildGuard,
    rx: mpsc::Receiver<(u64, bool)>,
    state: Option<bool>,
}

impl Probe {
    fn start(lab: &Lab, exe: &str) -> Result<Probe> {
        let target = format!("{SERVER_IP}:{PROBE_PORT}");
        Self::spawn(
            lab,
            exe,
            &["probe-loop", "--target", &target, "--secs", "7200"],
        )
    }

    /// The established flow (`stream-loop`): `open` while its connection echoes.
    fn stream(lab: &Lab, exe: &str) -> Result<Probe> {
        let target = format!("{SERVER_IP}:{STREAM_PORT}");
        Self::spawn(
            lab,
            exe,
            &["stream-loop", "--target", &target, "--secs", "7200"],
        )
    }

    fn spawn(lab: &Lab, exe: &str, args: &[&str]) -> Result<Probe> {
        let mut guard = ChildGuard::spawn_in(&lab.client, exe, args)?;
        let stdout = guard
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| Error::Invalid("probe stdout not captured".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                let mut it = line.split_whitespace();
                if let (Some(ns), Some(state)) =
                    (it.next().and_then(|v| v.parse::<u64>().ok()), it.next())
                {
                    if tx.send((ns, state == "open")).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Probe {
            _guard: guard,
            rx,
            state: None,
        })
    }

    /// Waits until the probe reports `open` (true) or `blocked`; returns the flip time.
    fn wait_for(&mut self, open: bool, limit: Duration) -> Option<u64> {
        let deadline = Instant::now() + limit;
        loop {
            if self.state == Some(open) {
                return Some(0);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok((ns, state)) => {
                    self.state = Some(state);
                    if state == open {
                        return Some(ns);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Applies a change and waits for the flip to `open`; returns the latency in ms.
    fn measure(&mut self, open: bool, change: impl FnOnce() -> Result<u64>) -> Result<Option<f64>> {
        // Drain anything pending so `state` is current.
        while let Ok((_, s)) = self.rx.try_recv() {
            self.state = Some(s);
        }
        if self.state == Some(open) {
            return Err(Error::Invalid(format!(
                "probe already {} before the change",
                if open { "open" } else { "blocked" }
            )));
        }
        let t0 = change()?;
        Ok(self
            .wait_for(open, FLIP_TIMEOUT)
            .map(|t| (t.saturating_sub(t0)) as f64 / 1e6))
    }
}

/// Revocation of an established TCP flow at one size and churn rate, in milliseconds: grant = allow
/// policy written → the stream connects; revoke = policy removed → send time of the first message
/// of the (still open) connection whose echo never came.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevocationResult {
    pub pods: usize,
    pub policies: usize,
    pub churn_per_second: u32,
    pub grant_ms: Vec<f64>,
    pub revoke_ms: Vec<f64>,
    /// Trials whose flow was not cut (or not granted) within [`FLIP_TIMEOUT`].
    pub failures: usize,
}

/// Measures [`RevocationResult`]: `trials` times, the allow-stream policy is written, the stream
/// connects and runs for 20-50 ms, then the policy is removed and the stream must fail.
fn established_flow(
    lab: &Lab,
    exe: &str,
    store: &Store,
    (pods, policies, churn): (usize, usize, u32),
    trials: usize,
    seed: u64,
) -> Result<RevocationResult> {
    // The client pod exists (the allow-stream peer), no other allow policy.
    Scenario::Policy.setup(store)?;
    store.clear(F_ALLOW_STREAM);
    let mut stream = Probe::stream(lab, exe)?;
    if stream.wait_for(false, Duration::from_secs(10)).is_none() {
        return Err(Error::Invalid(
            "the established-flow stream connects without its allow policy".into(),
        ));
    }
    let mut res = RevocationResult {
        pods,
        policies,
        churn_per_second: churn,
        grant_ms: Vec::new(),
        revoke_ms: Vec::new(),
        failures: 0,
    };
    let mut rng = Rng::new(seed);
    for _ in 0..trials {
        match stream.measure(true, || store.put(F_ALLOW_STREAM, &allow_stream_policy()))? {
            Some(ms) => res.grant_ms.push(ms),
            None => {
                res.failures += 1;
                store.clear(F_ALLOW_STREAM);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(30) as u64));
        match stream.measure(false, || store.remove(F_ALLOW_STREAM))? {
            Some(ms) => res.revoke_ms.push(ms),
            None => {
                // The flow outlived its deny: count it, start a fresh stream (blocked).
                res.failures += 1;
                tracing::warn!(
                    pods,
                    churn,
                    "an established flow was not cut within the timeout"
                );
                stream = Probe::stream(lab, exe)?;
                let _ = stream.wait_for(false, Duration::from_secs(10));
            }
        }
        std::thread::sleep(Duration::from_millis(10 + rng.below(20) as u64));
        if res.failures > 5 {
            break;
        }
    }
    Ok(res)
}

/// Background churn: every 1/rate seconds, one random background pod gets another `role` label
/// (one of 200 churn files, each overriding one pod; rewriting a file moves its override to another
/// pod, so a write is one or two pod changes).
struct Churn {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start(store: &Store, cluster: &Cluster, rate: u32, seed: u64) -> Churn {
        if rate == 0 {
            return Churn::paced(0, Duration::ZERO, || false);
        }
        let store = store.clone();
        let pods: Vec<_> = cluster
            .pods
            .iter()
            .filter(|p| p.namespace != "bench")
            .cloned()
            .collect();
        let mut rng = Rng::new(seed);
        Churn::paced(rate, Duration::ZERO, move || {
            let mut pod = pods[rng.below(pods.len())].clone();
            pod.labels
                .insert("role".into(), format!("r{}", rng.below(20)));
            let name = format!("70-churn-{}.json", rng.below(200));
            store.put(&name, &k8s::pod(&pod)).is_ok()
        })
    }

    /// Status heartbeats that change nothing the agent compiles: file `i` of [`heartbeat_name`] always
    /// holds `pods[i]`; [`HEARTBEAT_WRITERS`] threads share the rate, each rewriting its own files
    /// (`i` ≡ thread mod writers) round robin, its writes numbered from `first` on (see
    /// [`heartbeat_pod`]).
    fn heartbeats(store: &Store, pods: Arc<Vec<Pod>>, rate: u32, first: u64) -> Churn {
        if pods.is_empty() {
            return Churn::paced(0, Duration::ZERO, || false);
        }
        let writers = HEARTBEAT_WRITERS.min(pods.len());
        let steps = (0..writers)
            .map(|t| {
                let share = rate / writers as u32 + u32::from((t as u32) < rate % writers as u32);
                let (store, pods) = (store.clone(), pods.clone());
                let mine: Vec<usize> = (t..pods.len()).step_by(writers).collect();
                let mut n = first;
                let step: Step = Box::new(move || {
                    let i = mine[(n % mine.len() as u64) as usize];
                    n += 1;
                    store
                        .put(&heartbeat_name(i), &heartbeat_pod(&pods[i], n))
                        .is_ok()
                });
                (share, step)
            })
            .collect();
        // Sleeps overshoot by tens of µs and a rename on a disk can stall for a while: at 1 ms
        // periods a writer makes up for up to 250 ms of lag, so the rate asked for is the rate
        // written unless the machine cannot keep it up (the report shows the rate achieved).
        Churn::paced_each(Duration::from_millis(250), steps)
    }

    /// A writer thread calling `step` `rate` times per second (none at rate 0) until [`Churn::finish`];
    /// counts the steps that wrote. A writer that falls behind catches up on at most `max_lag` of
    /// missed steps, without sleeping; more is dropped.
    fn paced(rate: u32, max_lag: Duration, step: impl FnMut() -> bool + Send + 'static) -> Churn {
        Churn::paced_each(max_lag, vec![(rate, Box::new(step))])
    }

    /// [`Churn::paced`] with one thread per `(rate, step)`, counted together.
    fn paced_each(max_lag: Duration, writers: Vec<(u32, Step)>) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let handles = writers
            .into_iter()
            .filter(|(rate, _)| *rate > 0)
            .map(|(rate, mut step)| {
                let (stop, writes) = (stop.clone(), writes.clone());
                std::thread::spawn(move || {
                    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        if step() {
                            writes.fetch_add(1, Ordering::Relaxed);
                        }
                        next += period;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else if now - next > max_lag {
                            next = now;
                        }
                    }
                })
            })
            .collect();
        Churn {
            stop,
            writes,
            handles,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

/// One step of a paced writer: true if it wrote.
type Step = Box<dyn FnMut() -> bool + Send>;

/// Threads writing the status heartbeats: a rename into the manifest directory can wait on the disk
/// (~0.4–0.6 ms on ext4 here), so one thread alone falls short of 1,000 writes/s on a busy machine.
const HEARTBEAT_WRITERS: usize = 2;

/// Agent load while the churn writer runs alone (no trials).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnResult {
    pub pods: usize,
    pub policies: usize,
    pub rate: u32,
    pub writes: u64,
    pub wall_seconds: f64,
    pub agent_cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Reconciles (committed transactions) during the window and their mean duration, from /metrics.
    pub reconciles: f64,
    pub reconcile_mean_ms: f64,
}

/// Value of an unlabelled (or exactly labelled) sample in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn fetch_metrics(lab: &Lab, exe: &str) -> String {
    run_in(
        &lab.node2,
        exe,
        &["fetch-metrics", "--addr", "127.0.0.1:9799"],
        None,
    )
    .unwrap_or_default()
}

/// The agent under observation: its node's lab, the bench binary, its manifest directory and pid.
struct Observed<'a> {
    lab: &'a Lab,
    exe: &'a str,
    store: &'a Store,
    pid: u32,
}

fn churn_window(
    obs: &Observed<'_>,
    cluster: &Cluster,
    rate: u32,
    secs: u64,
    seed: u64,
) -> Result<ChurnResult> {
    let Observed {
        lab,
        exe,
        store,
        pid,
    } = *obs;
    const SUM: &str = "palisade_reconcile_duration_seconds_sum";
    const COUNT: &str = "palisade_reconcile_duration_seconds_count";
    let m0 = fetch_metrics(lab, exe);
    let before = proc_stats(pid)?;
    let t = Instant::now();
    let churn = Churn::start(store, cluster, rate, seed);
    std::thread::sleep(Duration::from_secs(secs));
    let writes = churn.finish();
    // Let the last changes land before reading the counters.
    std::thread::sleep(Duration::from_millis(300));
    let wall = t.elapsed().as_secs_f64();
    let after = proc_stats(pid)?;
    let m1 = fetch_metrics(lab, exe);
    let d = |name: &str| {
        metric_value(&m1, name).unwrap_or(f64::NAN) - metric_value(&m0, name).unwrap_or(f64::NAN)
    };
    let reconciles = d(COUNT);
    Ok(ChurnResult {
        pods: cluster.pods.len(),
        policies: cluster.policies.len(),
        rate,
        writes,
        wall_seconds: wall,
        agent_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        rss_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        reconciles,
        reconcile_mean_ms: if reconciles > 0.0 {
            d(SUM) * 1e3 / reconciles
        } else {
            f64::NAN
        },
    })
}

/// Override file `i` of the status heartbeats (sorted before the churn files, which win over them).
fn heartbeat_name(i: usize) -> String {
    format!("65-status-{i:04}.json")
}

/// `pod` as the API server shows it after its `n`-th status heartbeat: a new `resourceVersion` and
/// fresh `lastProbeTime`/`lastTransitionTime` of its conditions; labels, IPs, phase, node and ports
/// as in the cluster list. Nothing the agent compiles changes.
fn heartbeat_pod(pod: &Pod, n: u64) -> Value {
    let now = format!("{}Z", crate::utc_now().replace(' ', "T"));
    let mut v = k8s::pod(pod);
    v["metadata"]["resourceVersion"] = json!(n.to_string());
    v["status"]["conditions"] = json!([
        {"type": "Ready", "status": "True", "lastProbeTime": now, "lastTransitionTime": now},
        {"type": "ContainersReady", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}
    ]);
    v
}

/// The background pods that get status heartbeats: `count` of them, spread over the list (so over
/// every node, the agent's own included).
fn heartbeat_targets(cluster: &Cluster, count: usize) -> Vec<Pod> {
    let pods: Vec<&Pod> = cluster
        .pods
        .iter()
        .filter(|p| p.namespace != "bench")
        .collect();
    let count = count.min(pods.len());
    if count == 0 {
        return Vec::new();
    }
    let step = pods.len() / count;
    pods.into_iter()
        .step_by(step)
        .take(count)
        .cloned()
        .collect()
}

/// Agent load in one window of the irrelevant-events measurement: idle (no writes) or while Pod
/// status heartbeats stream in. Counter deltas are `None` where the agent does not export them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrrelevantResult {
    pub pods: usize,
    pub policies: usize,
    /// Writes per second asked for (0: the idle window).
    pub rate: u32,
    /// Override files (= pods) the heartbeats go round.
    pub files: usize,
    pub writes: u64,
    /// How long the writer ran (or the idle window lasted).
    pub write_seconds: f64,
    /// The window as measured (writer time + settle before the counters are read).
    pub wall_seconds: f64,
    pub agent_cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// `palisade_reconciles_total`
    pub reconciles: Option<f64>,
    /// `palisade_node_lock_acquisitions_total`
    pub lock_acquisitions: Option<f64>,
    /// `palisade_source_changes_total{result="unchanged"}`
    pub unchanged: Option<f64>,
    /// `palisade_source_changes_total{result="changed"}`
    pub changed: Option<f64>,
    /// `palisade_transactions_total` (every kind)
    pub transactions: Option<f64>,
}

impl IrrelevantResult {
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.agent_cpu_seconds / self.wall_seconds.max(1e-9)
    }

    pub fn writes_per_second(&self) -> f64 {
        self.writes as f64 / self.write_seconds.max(1e-9)
    }

    /// A counter delta per second of the window.
    pub fn per_second(&self, v: Option<f64>) -> Option<f64> {
        v.map(|v| v / self.wall_seconds.max(1e-9))
    }
}

/// Sum of every sample of a metric family (any labels) in Prometheus text; `None` if it has none.
pub fn metric_sum(text: &str, family: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// One window of the irrelevant-events measurement: `rate` heartbeat writes per second (0: none)
/// for `secs`, then 300 ms for the last ones to land; the agent's CPU, memory and counters over it.
fn irrelevant_window(
    obs: &Observed<'_>,
    cluster: &Cluster,
    targets: &Arc<Vec<Pod>>,
    rate: u32,
    secs: u64,
    first: u64,
) -> Result<IrrelevantResult> {
    let Observed {
        lab,
        exe,
        store,
        pid,
    } = *obs;
    let m0 = fetch_metrics(lab, exe);
    let before = proc_stats(pid)?;
    let t = Instant::now();
    let writer = Churn::heartbeats(store, targets.clone(), rate, first);
    std::thread::sleep(Duration::from_secs(secs));
    let writes = writer.finish();
    let write_seconds = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let wall = t.elapsed().as_secs_f64();
    let after = proc_stats(pid)?;
    let m1 = fetch_metrics(lab, exe);
    let delta = |get: &dyn Fn(&str) -> Option<f64>| Some(get(&m1)? - get(&m0)?);
    Ok(IrrelevantResult {
        pods: cluster.pods.len(),
        policies: cluster.policies.len(),
        rate,
        files: targets.len(),
        writes,
        write_seconds,
        wall_seconds: wall,
        agent_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        rss_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        reconciles: delta(&|m| metric_value(m, "palisade_reconciles_total")),
        lock_acquisitions: delta(&|m| metric_value(m, "palisade_node_lock_acquisitions_total")),
        unchanged: delta(&|m| {
            metric_value(m, "palisade_source_changes_total{result=\"unchanged\"}")
        }),
        changed: delta(&|m| metric_value(m, "palisade_source_changes_total{result=\"changed\"}")),
        transactions: delta(&|m| metric_sum(m, "palisade_transactions_total")),
    })
}

/// The irrelevant-events measurement at one size: the heartbeat files are written once and left to
/// settle, then an idle window and a window of `rate` heartbeat writes per second, `secs` each; the
/// files are removed afterwards (the rest of the run sees the directory as before).
fn irrelevant_windows(
    obs: &Observed<'_>,
    cluster: &Cluster,
    files: usize,
    rate: u32,
    secs: u64,
) -> Result<Vec<IrrelevantResult>> {
    let targets = Arc::new(heartbeat_targets(cluster, files));
    if targets.is_empty() {
        return Err(Error::Invalid(
            "no background pods for the heartbeats".into(),
        ));
    }
    for (i, pod) in targets.iter().enumerate() {
        obs.store.put(&heartbeat_name(i), &heartbeat_pod(pod, 0))?;
    }
    // The first write of each file is an object the agent already has (plus conditions): let it
    // pass, and the drift check and memory trims after the first sync, before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let first = targets.len() as u64;
    let result = (|| {
        let idle = irrelevant_window(obs, cluster, &targets, 0, secs, first)?;
        let busy = irrelevant_window(obs, cluster, &targets, rate, secs, first)?;
        Ok(vec![idle, busy])
    })();
    for i in 0..targets.len() {
        obs.store.clear(&heartbeat_name(i));
    }
    std::thread::sleep(Duration::from_secs(1));
    result
}

/// `p` as a command-line argument.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("path {} is not UTF-8", p.display())))
}

/// The directories of one benchmark agent under a work directory: manifests, state (attachment
/// records, node lock), CNI config and IPAM data.
pub struct AgentDirs {
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub conf: PathBuf,
    pub ipam: PathBuf,
}

impl AgentDirs {
    /// Creates them under `work`.
    pub fn create(work: &Path) -> Result<AgentDirs> {
        let dirs = AgentDirs {
            manifests: work.join("manifests"),
            state: work.join("state"),
            conf: work.join("cni"),
            ipam: work.join("ipam"),
        };
        for d in [&dirs.manifests, &dirs.state, &dirs.conf, &dirs.ipam] {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(dirs)
    }

    /// `palisade-agent run` arguments of a benchmark's agent in node 2: `source` (its source flags,
    /// [`super::store::Store::agent_args`]), these directories, metrics on loopback, no routes, no
    /// resync during the run.
    pub fn run_args(&self, source: &[String]) -> Result<Vec<String>> {
        let mut args: Vec<String> = ["run", "--node-name", AGENT_NODE]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(source.iter().cloned());
        for (flag, dir) in [
            ("--state-dir", &self.state),
            ("--cni-conf-dir", &self.conf),
            ("--ipam-data-dir", &self.ipam),
        ] {
            args.extend([flag.to_string(), path_str(dir)?.to_string()]);
        }
        args.extend(
            [
                "--listen",
                "127.0.0.1:9799",
                "--no-routes",
                "--resync-seconds",
                "3600",
            ]
            .map(String::from),
        );
        Ok(args)
    }
}

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
}

/// Runs every size; returns every scenario result and the agent's metrics per size.
pub fn run(cfg: &Config) -> Result<RunResults> {
    let lab = Lab::create()?;
    super::rulesets::load_base(&lab.node1)?;
    super::rulesets::load_base(&lab.node2)?;
    let exe = path_str(&cfg.exe)?.to_string();
    let _server = {
        let mut s = ChildGuard::spawn_in(
            &lab.server,
            &exe,
            &[
                "serve",
                "--ip",
                SERVER_IP,
                "--crr-port",
                &PROBE_PORT.to_string(),
                "--rr-port",
                "7001",
                "--secs",
                "7200",
            ],
        )?;
        let out = s
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| Error::Invalid("server stdout".into()))?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(io_err("reading the server's ready line"))?;
        s
    };
    let _stream_server = {
        let mut s = ChildGuard::spawn_in(
            &lab.server,
            &exe,
            &[
                "stream-serve",
                "--ip",
                SERVER_IP,
                "--port",
                &STREAM_PORT.to_string(),
                "--secs",
                "7200",
            ],
        )?;
        let out = s
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| Error::Invalid("stream server stdout".into()))?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(io_err("reading the stream server's ready line"))?;
        s
    };
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
            }
            Err(e) => tracing::error!(pods, error = %e, "size failed; continuing with the next"),
        }
    }
    Ok(all)
}

/// The server pod's attachment record, as the plugin writes it on ADD: the source guard then admits
/// what the server's veth sends from its own address.
fn write_server_record(state: &Path) -> Result<()> {
    let record = palisade_contract::Attachment {
        container_id: super::topo::container_id("server"),
        ifname: super::topo::POD_IFNAME.into(),
        netns: String::new(),
        host_veth: super::topo::host_veth("server"),
        ips: vec![SERVER_IP
            .parse()
            .map_err(|e| Error::Invalid(format!("server address {SERVER_IP}: {e}")))?],
        pod_namespace: Some(super::workload::BENCH_NS.into()),
        pod_name: Some("server".into()),
        pod_uid: None,
        pending: false,
    };
    let dir = palisade_contract::attachments_dir(state);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let path = palisade_contract::attachment_path(state, &record.container_id, &record.ifname);
    let text = serde_json::to_vec(&record).map_err(|e| Error::Parse {
        what: "attachment record".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(|source| Error::Write { path, source })
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
    let cluster = Cluster::generate_shape(Shape::for_pods(pods, policies), cfg.seed)?;
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
    let args = dirs.run_args(&store.agent_args()?)?;
    let agent = ChildGuard::spawn_in_logged(
        &lab.node2,
        path_str(&cfg.agent)?,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &log,
    )?;
    let pid = agent
        .pid()
        .ok_or_else(|| Error::Invalid("agent has no pid".into()))?;
    let started = Instant::now();
    let conflist = dirs.conf.join(palisade_contract::CONFLIST_FILE);
    while !conflist.exists() {
        if started.elapsed() > Duration::from_secs(300) {
            return Err(Error::Invalid(format!(
                "agent wrote no conflist in 300 s; see {}",
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first_sync = started.elapsed().as_secs_f64();
    tracing::info!(pods, policies, first_sync_s = first_sync, "agent synced");
    let mut out = RunResults {
        first_sync_seconds: vec![(cluster.pods.len(), first_sync)],
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
    for &churn in &cfg.churn {
        for scenario in Scenario::ALL {
            scenario.setup(&store)?;
            if probe.wait_for(false, Duration::from_secs(10)).is_none() {
                return Err(Error::Invalid(format!(
                    "{}: probe not blocked after setup",
                    scenario.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
            let churner = Churn::start(&store, &cluster, churn, cfg.seed ^ u64::from(churn));
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
            let (g50, g99, gmax) = ScenarioResult::summary(&res.grant_ms);
            let (r50, r99, rmax) = ScenarioResult::summary(&res.revoke_ms);
            tracing::info!(
                pods,
                churn,
                scenario = scenario.name(),
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

/// Fetches `path` from an HTTP/1.0 server (the agent's /metrics), inside whatever namespace we run in.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(io_err(format!("connecting to {addr}")))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err("setting read timeout"))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(io_err("sending the request"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(io_err("reading the response"))?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(body))
}

/// Per-change cost of the compiler as the agent uses it (apply one change, compile the node, diff
/// against the last ruleset), under the same churn as [`Churn`]; one figure per change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompileCost {
    pub pods: usize,
    pub policies: usize,
    pub initial_compile_ms: f64,
    pub initial_batch_bytes: usize,
    /// The agent's path: `IncrementalCompiler::stage` + `take_batch` + JSON.
    pub change_ms: Vec<f64>,
    /// The same change by full compile of the node + diff + JSON, for comparison.
    pub full_change_ms: Vec<f64>,
    pub batch_bytes: Vec<f64>,
    pub batch_commands: Vec<f64>,
}

/// Measures [`CompileCost`] for `changes` churn changes (role flips of random pods; every tenth is a
/// policy created or deleted): each through the incremental compiler, as the agent does, and the same
/// change through a full compile + diff beside it. The two batches must be equal (the property the
/// compiler's tests hold); a difference fails the bench.
pub fn compile_cost(
    pods: usize,
    policies: usize,
    changes: usize,
    seed: u64,
) -> Result<CompileCost> {
    use palisade_policy::model::Change;
    let cluster = Cluster::generate_shape(Shape::for_pods(pods, policies), seed)?;
    let mut state = k8s::cluster_state(&cluster)?;
    let t = Instant::now();
    let mut last = palisade_policy::compile(&state, AGENT_NODE);
    let initial_batch = last.ruleset.full_replace();
    let initial_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut inc = palisade_policy::IncrementalCompiler::new(state.clone(), AGENT_NODE);
    let _ = inc.take_batch();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let others: Vec<_> = cluster
        .pods
        .iter()
        .filter(|p| p.namespace != "bench")
        .collect();
    let mut out = CompileCost {
        pods: cluster.pods.len(),
        policies,
        initial_compile_ms,
        initial_batch_bytes: initial_batch.bytes,
        change_ms: Vec::new(),
        full_change_ms: Vec::new(),
        batch_bytes: Vec::new(),
        batch_commands: Vec::new(),
    };
    let extra = allow_policy("churn-allow", json!({"app": "client"}));
    let mut extra_present = false;
    for i in 0..changes {
        let change = if i % 10 == 9 {
            extra_present = !extra_present;
            if extra_present {
                k8s::change(&extra)?
            } else {
                Change::DeletePolicy {
                    namespace: "bench".into(),
                    name: "churn-allow".into(),
                }
            }
        } else {
            let mut pod = others[rng.below(others.len())].clone();
            pod.labels
                .insert("role".into(), format!("r{}", rng.below(20)));
            k8s::change(&k8s::pod(&pod))?
        };
        let t = Instant::now();
        inc.stage(change.clone());
        let batch = inc.take_batch();
        let text = batch.to_json_string();
        out.change_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        state.apply(change);
        let next = palisade_policy::compile(&state, AGENT_NODE);
        let full = palisade_policy::diff(&last.ruleset, &next.ruleset);
        let full_text = full.to_json_string();
        out.full_change_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if text != full_text {
            return Err(Error::Check(format!(
                "change {i}: the incremental batch differs from the full compile's diff"
            )));
        }
        out.batch_bytes.push(batch.bytes as f64);
        out.batch_commands.push(batch.commands as f64);
        last = next;
    }
    Ok(out)
}

/// The irrelevant-events target, one line per size with both windows, judged from the figures, with
/// the same run's enforcement p99 (no churn) and RSS beside it.
fn irrelevant_verdicts(run: &RunResults) -> Vec<String> {
    let mut out = Vec::new();
    let mut sizes: Vec<usize> = run.irrelevant.iter().map(|w| w.pods).collect();
    sizes.dedup();
    for pods in sizes {
        let at = |busy: bool| {
            run.irrelevant
                .iter()
                .find(|w| w.pods == pods && (w.rate > 0) == busy)
        };
        let (Some(idle), Some(busy)) = (at(false), at(true)) else {
            continue;
        };
        let cpu_above = busy.cpu_percent() - idle.cpu_percent();
        let cpu_ok = cpu_above <= 5.0;
        let count = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}"));
        // No work for them: not one reconcile or lock acquisition more than in the idle window.
        let work_ok = match (
            busy.reconciles,
            idle.reconciles,
            busy.lock_acquisitions,
            idle.lock_acquisitions,
        ) {
            (Some(br), Some(ir), Some(bl), Some(il)) => Some(br <= ir && bl <= il),
            _ => None,
        };
        let verdict = match work_ok {
            Some(true) if cpu_ok => "met",
            Some(_) => "NOT met",
            None if cpu_ok => "not judged (reconcile/lock counters absent; CPU part met)",
            None => "NOT met (CPU; reconcile/lock counters absent)",
        };
        let short = if busy.writes_per_second() < 0.9 * f64::from(busy.rate) {
            format!(
                " (the writer fell short of {}/s: judged at the rate achieved)",
                busy.rate
            )
        } else {
            String::new()
        };
        out.push(format!(
            "- Irrelevant events at {pods} pods / {} policies: {:.0} Pod status writes/s achieved{short}, {} reached the agent as unchanged changes ({} changed); reconciles {} (idle window {}), node-lock acquisitions {} (idle {}), agent CPU {:.1} % of a core vs {:.1} % idle (**{cpu_above:+.1} %**); target no reconcile and no lock for them, CPU ≤ 5 % of a core above idle: **{verdict}**.",
            busy.policies,
            busy.writes_per_second(),
            count(busy.unchanged),
            count(busy.changed),
            count(busy.reconciles),
            count(idle.reconciles),
            count(busy.lock_acquisitions),
            count(idle.lock_acquisitions),
            busy.cpu_percent(),
            idle.cpu_percent(),
        ));
        // The same run's latency and memory, beside BENCHMARKS.md's figures.
        let quiet: Vec<&ScenarioResult> = run
            .scenarios
            .iter()
            .filter(|r| r.pods == pods && r.churn_per_second == 0)
            .collect();
        let worst_p99 = quiet
            .iter()
            .flat_map(|r| {
                [
                    ScenarioResult::summary(&r.grant_ms).1,
                    ScenarioResult::summary(&r.revoke_ms).1,
                ]
            })
            .fold(f64::NAN, f64::max);
        let best_p99 = quiet
            .iter()
            .flat_map(|r| {
                [
                    ScenarioResult::summary(&r.grant_ms).1,
                    ScenarioResult::summary(&r.revoke_ms).1,
                ]
            })
            .fold(f64::NAN, f64::min);
        let trial_rss = quiet
            .iter()
            .map(|r| r.agent_after.rss_kib)
            .max()
            .unwrap_or(0) as f64
            / 1024.0;
        let (was_p99, was_rss) = if pods >= 10_000 {
            (
                " (BENCHMARKS.md, old/new pair of 2026-12-04 at load 2–4: p99 37–67 ms old engine, 37–59 ms new; 17–22 ms before flow revocation at load 1.3)",
                " (BENCHMARKS.md: 51–53 MiB old engine, 47.5–49 MiB new)",
            )
        } else {
            ("", "")
        };
        out.push(format!(
            "- Same run at {pods} pods: enforcement p99 (no churn, every change) {best_p99:.1}–{worst_p99:.1} ms{was_p99}; agent RSS {:.1} MiB idle, {:.1} MiB under the heartbeats, {trial_rss:.1} MiB after the trials{was_rss}.",
            idle.rss_kib as f64 / 1024.0,
            busy.rss_kib as f64 / 1024.0,
        ));
    }
    out
}

/// Markdown for the enforcement results.
pub fn markdown(run: &RunResults, costs: &[CompileCost]) -> String {
    use std::fmt::Write;
    let results = &run.scenarios;
    let metrics = &run.metrics;
    let mut o = String::new();
    if !run.first_sync_seconds.is_empty() {
        let _ = writeln!(o, "### Agent start → first sync committed (conflist written)\n\n| pods | seconds |\n|---|---|");
        for (p, s) in &run.first_sync_seconds {
            let _ = writeln!(o, "| {p} | {s:.2} |");
        }
        o.push('\n');
    }
    if !run.churn.is_empty() {
        let _ = writeln!(o, "### Agent under churn alone (no probe trials)\n\n| pods | policies | churn/s | writes | wall s | agent CPU s | CPU share of one core | RSS MiB | peak RSS MiB | reconciles | mean reconcile ms |\n|---|---|---|---|---|---|---|---|---|---|---|");
        for c in &run.churn {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.1} | {:.2} | {:.0} % | {:.1} | {:.1} | {:.0} | {:.1} |",
                c.pods,
                c.policies,
                c.rate,
                c.writes,
                c.wall_seconds,
                c.agent_cpu_seconds,
                100.0 * c.agent_cpu_seconds / c.wall_seconds.max(1e-9),
                c.rss_kib as f64 / 1024.0,
                c.hwm_kib as f64 / 1024.0,
                c.reconciles,
                c.reconcile_mean_ms
            );
        }
        o.push('\n');
    }
    if !run.irrelevant.is_empty() {
        let _ = writeln!(o, "### Irrelevant events: Pod status heartbeats that change nothing compiled (agent counters per second of the window; n/a: the agent does not export the counter)\n\n| pods | policies | window | heartbeat files | writes/s | agent CPU % of one core | RSS MiB | reconciles/s | lock acquisitions/s | unchanged changes/s | changed changes/s | transactions/s | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let rate = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
        for w in &run.irrelevant {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.1} |",
                w.pods,
                w.policies,
                if w.rate == 0 {
                    "idle".to_string()
                } else {
                    format!("{}/s heartbeats", w.rate)
                },
                w.files,
                w.writes_per_second(),
                w.cpu_percent(),
                w.rss_kib as f64 / 1024.0,
                rate(w.per_second(w.reconciles)),
                rate(w.per_second(w.lock_acquisitions)),
                rate(w.per_second(w.unchanged)),
                rate(w.per_second(w.changed)),
                rate(w.per_second(w.transactions)),
                w.wall_seconds
            );
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "### Enforcement latency (ms, change written → probe flips; probe period 1 ms)\n"
    );
    let _ = writeln!(o, "| pods | policies | churn/s | change | grant p50 | grant p99 | grant max | revoke p50 | revoke p99 | revoke max | n (grant/revoke) | failed |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let (g50, g99, gmax) = ScenarioResult::summary(&r.grant_ms);
        let (r50, r99, rmax) = ScenarioResult::summary(&r.revoke_ms);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {g50:.1} | {g99:.1} | {gmax:.1} | {r50:.1} | {r99:.1} | {rmax:.1} | {}/{} | {} |",
            r.pods, r.policies, r.churn_per_second, r.scenario.name(), r.grant_ms.len(), r.revoke_ms.len(), r.failures
        );
    }
    if !run.revocations.is_empty() {
        let _ = writeln!(o, "\n### Revocation of an established TCP flow (ms; one message per ms on one connection; revoke = allow policy removed → send time of the first message whose echo never came; grant = the same run's policy create → probe flip, and allow-stream written → stream connected)\n");
        let _ = writeln!(o, "| pods | policies | churn/s | policy grant p50 | policy grant p99 | stream grant p50 | stream grant p99 | flow cut p50 | flow cut p99 | flow cut max | n | not cut / failed |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for v in &run.revocations {
            let (pg50, pg99, _) = results
                .iter()
                .find(|r| {
                    r.pods == v.pods
                        && r.churn_per_second == v.churn_per_second
                        && r.scenario == Scenario::Policy
                })
                .map(|r| ScenarioResult::summary(&r.grant_ms))
                .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
            let (g50, g99, _) = ScenarioResult::summary(&v.grant_ms);
            let (r50, r99, rmax) = ScenarioResult::summary(&v.revoke_ms);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {pg50:.1} | {pg99:.1} | {g50:.1} | {g99:.1} | {r50:.1} | {r99:.1} | {rmax:.1} | {} | {} |",
                v.pods, v.policies, v.churn_per_second, v.revoke_ms.len(), v.failures
            );
        }
    }
    let _ = writeln!(o, "\n### Agent CPU and memory during each scenario\n");
    let _ = writeln!(o, "| pods | churn/s (writes) | change | wall s | agent CPU s | CPU share of one core | RSS MiB | peak RSS MiB |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in results {
        let cpu = r.agent_after.cpu_seconds - r.agent_before.cpu_seconds;
        let _ = writeln!(
            o,
            "| {} | {} ({}) | {} | {:.1} | {:.2} | {:.0} % | {:.1} | {:.1} |",
            r.pods,
            r.churn_per_second,
            r.churn_writes,
            r.scenario.name(),
            r.wall_seconds,
            cpu,
            100.0 * cpu / r.wall_seconds.max(1e-9),
            r.agent_after.rss_kib as f64 / 1024.0,
            r.agent_after.hwm_kib as f64 / 1024.0
        );
    }
    if !costs.is_empty() {
        let _ = writeln!(o, "\n### Compiler cost per change, in process: the agent's incremental compiler (stage + batch + JSON) beside a full compile of the node + diff + JSON (same batch, checked)\n");
        let _ = writeln!(o, "| pods | policies | initial compile ms | initial batch KiB | incremental p50 ms | p99 ms | max ms | full compile + diff p50 ms | p99 ms | batch bytes p50 | p99 | commands p50 |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for c in costs {
            let (a, b, m) = ScenarioResult::summary(&c.change_ms);
            let (fa, fb, _) = ScenarioResult::summary(&c.full_change_ms);
            let _ = writeln!(
                o,
                "| {} | {} | {:.1} | {:.0} | {a:.2} | {b:.2} | {m:.2} | {fa:.2} | {fb:.2} | {:.0} | {:.0} | {:.0} |",
                c.pods,
                c.policies,
                c.initial_compile_ms,
                c.initial_batch_bytes as f64 / 1024.0,
                median(&c.batch_bytes).unwrap_or(f64::NAN),
                quantile(&c.batch_bytes, 0.99).unwrap_or(f64::NAN),
                median(&c.batch_commands).unwrap_or(f64::NAN)
            );
        }
    }
    let _ = writeln!(o, "\n### Targets\n");
    for r in results
        .iter()
        .filter(|r| r.churn_per_second == 0 && r.pods >= 10_000)
    {
        let (_, g99, _) = ScenarioResult::summary(&r.grant_ms);
        let (_, r99, _) = ScenarioResult::summary(&r.revoke_ms);
        let worst = g99.max(r99);
        let verdict = if worst < 100.0 { "met" } else { "NOT met" };
        let _ = writeln!(o, "- {} at {} pods: p99 grant {g99:.1} ms, revoke {r99:.1} ms; target p99 < 100 ms: **{verdict}**.", r.scenario.name(), r.pods);
    }
    for v in run
        .revocations
        .iter()
        .filter(|v| v.churn_per_second == 0 && v.pods >= 10_000)
    {
        let (_, r99, _) = ScenarioResult::summary(&v.revoke_ms);
        let verdict = if r99 <= 100.0 && v.failures == 0 {
            "met"
        } else {
            "NOT met"
        };
        let _ = writeln!(o, "- Established TCP flow cut at {} pods: p99 {r99:.1} ms, {} not cut; target p99 ≤ 100 ms: **{verdict}**.", v.pods, v.failures);
    }
    for r in results.iter().filter(|r| r.churn_per_second == 0) {
        let (g50, g99, _) = ScenarioResult::summary(&r.grant_ms);
        let (r50, r99, _) = ScenarioResult::summary(&r.revoke_ms);
        let same = r50 <= g50 * 1.2 + 1.0 && r99 <= g99 * 1.2 + 5.0;
        let _ = writeln!(
            o,
            "- Revocation vs grant, {} at {} pods: p50 {r50:.1} vs {g50:.1} ms, p99 {r99:.1} vs {g99:.1} ms: **{}**.",
            r.scenario.name(),
            r.pods,
            if same { "as fast" } else { "slower" }
        );
    }
    for line in irrelevant_verdicts(run) {
        let _ = writeln!(o, "{line}");
    }
    for (pods, m) in metrics {
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("reconcile_duration_seconds_sum")
                        || l.contains("reconcile_duration_seconds_count")
                        || l.contains("transactions_total")
                        || l.starts_with("palisade_reconciles_total")
                        || l.starts_with("palisade_node_lock_acquisitions_total")
                        || l.starts_with("palisade_source_changes_total")
                        || l.contains("errors_total")
                        || l.starts_with("palisade_nft")
                        || l.starts_with("palisade_pods")
                        || l.starts_with("palisade_policies"))
            })
            .collect();
        let _ = writeln!(
            o,
            "\nAgent /metrics at the end of the {pods}-pod run:\n\n```\n{}\n```",
            lines.join("\n")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_changes_nothing_the_compiler_sees() {
        let cluster = Cluster::generate_shape(Shape::for_pods(100, 10), 7).unwrap();
        let targets = heartbeat_targets(&cluster, 30);
        assert_eq!(targets.len(), 30);
        for pod in &targets {
            let beat = heartbeat_pod(pod, 12);
            assert_eq!(beat["metadata"]["resourceVersion"], "12");
            assert_ne!(beat, k8s::pod(pod));
            assert_eq!(
                k8s::change(&beat).unwrap(),
                k8s::change(&k8s::pod(pod)).unwrap()
            );
        }
    }

    #[test]
    fn metric_sum_adds_every_labelled_sample_and_absent_is_none() {
        let text = "# TYPE palisade_transactions_total counter\n\
palisade_transactions_total{kind=\"full\"} 2\n\
palisade_transactions_total{kind=\"incremental\"} 40\n\
palisade_transactions_totally 9\n\
palisade_source_changes_total{result=\"unchanged\"} 7\n";
        assert_eq!(metric_sum(text, "palisade_transactions_total"), Some(42.0));
        assert_eq!(
            metric_value(text, "palisade_source_changes_total{result=\"unchanged\"}"),
            Some(7.0)
        );
        assert_eq!(metric_sum(text, "palisade_reconciles_total"), None);
    }
}
