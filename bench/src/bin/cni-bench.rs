//! cni-bench: ADD+DEL latency of `palisade` beside the reference `ptp` + `host-local` plugins,
//! measured on the same machine in one run, sequentially and with 20 attachments in parallel.
//!
//! Everything happens in a node network namespace the bench creates (this process enters it with
//! `setns` before it starts any thread or plugin) and in pod namespaces it creates; all of them and
//! the temporary directories are removed at the end, also on error. Run as root:
//!
//! ```text
//! cargo build --release -p palisade-cni
//! cargo run -p palisade-bench --bin cni-bench -- --palisade target/release/palisade
//! ```
//!
//! Both plugins get an IPv4-only network and the same MTU. palisade runs as on a node: the runtime
//! passes the pod identity, so every ADD also takes the node lock, marks the pod pending in
//! `table inet palisade` and writes the attachment record; the node's palisade-agent (started here
//! on a manifest directory holding every bench pod's Pod object) compiles the pod and clears its
//! mark, and the bench waits for that before the DEL (untimed), as a pod lives a while before it is
//! deleted. `--no-agent` creates the table's pending sets by hand instead, so every DEL finds its
//! mark. A second palisade row without the pod identity (no mark) shows what the mark costs. The
//! last row (ptp) is the baseline of every ratio.
//!
//! palisade's DEL answers once the pod is off the network and its resources are released; a reaper
//! deletes the veth pair right after. So that this deferred kernel work never lands on the next
//! measurement, the bench waits (untimed) after every DEL until the node has no link left, and the
//! sequential phase also reports when the pair was gone.

use clap::Parser;
use palisade_bench::datapath::run::enter_netns;
use palisade_bench::{io_err_pub, Error, Result};
use palisade_testkit::Netns;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Where Debian's containernetworking-plugins live.
const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Parser, Debug)]
#[command(
    about = "ADD/DEL latency of palisade vs ptp+host-local, in namespaces this bench creates"
)]
struct Args {
    /// The palisade plugin binary (default: `palisade` next to this executable).
    #[arg(long)]
    palisade: Option<PathBuf>,
    /// Directory of the reference plugins (ptp, host-local).
    #[arg(long, default_value = REFERENCE_DIR)]
    reference_dir: PathBuf,
    /// Sequential ADD+DEL pairs per plugin.
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Attachments added (then deleted) at the same time in the parallel phase.
    #[arg(long, default_value_t = 20)]
    parallel: usize,
    /// Parallel rounds per plugin.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The palisade-agent binary (default: `palisade-agent` next to the plugin).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Run without an agent: the pending sets are created by hand and every DEL finds its mark.
    #[arg(long)]
    no_agent: bool,
}

/// Namespace of the bench pods (their Pod objects, for the agent).
const POD_NS: &str = "bench";
/// palisade's pod range in this bench (its IPAM range, and the agent's Node's podCIDR).
const POD_CIDR: &str = "10.210.0.0/16";
/// Longest wait for the agent to clear a new pod's pending mark.
const MARK_WAIT: Duration = Duration::from_secs(10);

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One plugin under test.
struct Subject {
    label: &'static str,
    bin: PathBuf,
    cni_path: String,
    conf: String,
    /// `CNI_ARGS` (the pod identity for palisade).
    pod_args: bool,
}

impl Subject {
    /// Runs one command for (container, netns); returns the wall time.
    fn exec(&self, command: &str, container: &str, netns: &Path) -> Result<Duration> {
        self.exec_out(command, container, netns)
            .map(|(took, _)| took)
    }

    /// ADD, then (with the agent) waits untimed until the agent cleared the pod's pending mark.
    fn add(&self, container: &str, netns: &Path, agent: bool) -> Result<Duration> {
        let (took, out) = self.exec_out("ADD", container, netns)?;
        if agent && self.pod_args {
            wait_unmarked(container, &out)?;
        }
        Ok(took)
    }

    /// Runs one command for (container, netns); returns the wall time and the plugin's stdout.
    fn exec_out(&self, command: &str, container: &str, netns: &Path) -> Result<(Duration, String)> {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env("PALISADE_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.pod_args {
            cmd.env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NS};K8S_POD_NAME={container};K8S_POD_UID=uid-{container}"),
            );
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.conf.as_bytes())
                .map_err(io_err_pub("writing plugin stdin"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(io_err_pub("waiting for the plugin"))?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("{} {command} {container}", self.label),
                status: out.status.to_string(),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// Waits until no pending set holds an address of the ADD result `result` (the agent compiled the
/// pod `container`).
fn wait_unmarked(container: &str, result: &str) -> Result<()> {
    let parsed: serde_json::Value = serde_json::from_str(result).map_err(|e| Error::Parse {
        what: format!("ADD result of {container}"),
        detail: e.to_string(),
    })?;
    let ips: Vec<std::net::IpAddr> = parsed["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let started = Instant::now();
    for ip in ips {
        let set = if ip.is_ipv4() {
            palisade_contract::PENDING_SET_V4
        } else {
            palisade_contract::PENDING_SET_V6
        };
        loop {
            let marked = palisade_nft::setelem::element_exists(
                palisade_contract::TABLE_FAMILY,
                palisade_contract::TABLE_NAME,
                set,
                ip,
            )
            .map_err(|e| Error::Invalid(format!("probing the mark of {ip}: {e}")))?;
            if !marked {
                break;
            }
            if started.elapsed() > MARK_WAIT {
                return Err(Error::Invalid(format!(
                    "the agent did not clear the pending mark of {container} ({ip}) in {MARK_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// The Pod objects of every container id the bench uses, for the agent's manifest source.
fn pod_objects(ids: &[String], node: &str) -> serde_json::Value {
    let mut items = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": POD_NS, "labels": {"kubernetes.io/metadata.name": POD_NS}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.2"}]}}),
    ];
    items.extend(ids.iter().map(|id| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": id, "namespace": POD_NS, "uid": format!("uid-{id}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}})
    }));
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// Sequential phase: from DEL's start until the pair is gone from the node and the kernel is
    /// done with it (palisade's DEL answers before its reaper has deleted the pair; ptp's after).
    gone: Vec<Duration>,
}

/// Links of the node namespace besides `lo` (`/proc/self/net/dev` is this thread's namespace's).
fn node_links() -> Result<usize> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")
        .map_err(io_err_pub("reading /proc/self/net/dev"))?;
    Ok(dev
        .lines()
        .skip(2)
        .filter(|l| l.trim_start().split(':').next() != Some("lo"))
        .count())
}

/// palisade's reapers still running (this bench is their subreaper: they are its children once
/// their plugin exited); the finished ones are reaped here.
fn reapers_running() -> Result<usize> {
    let me = std::process::id().to_string();
    let mut running = 0;
    for entry in std::fs::read_dir("/proc").map_err(io_err_pub("listing /proc"))? {
        let Ok(entry) = entry else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid != Some(me.as_str()) || !head.ends_with("(palisade") {
            continue;
        }
        match state {
            Some("Z") => {
                if let Some(Ok(pid)) = head.split_whitespace().next().map(str::parse::<i32>) {
                    // SAFETY: reaps one exited child of this process.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                }
            }
            _ => running += 1,
        }
    }
    Ok(running)
}

/// Waits (untimed, up to 5 s) until the node has no link but `lo` and no reaper of palisade runs:
/// a plugin's background work must not land on the next measurement. Returns when it got there.
fn settle() -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if node_links()? == 0 && reapers_running()? == 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(Error::Teardown(format!(
                "{} links still in the node namespace 5 s after DEL",
                node_links()?
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sequential(
    subjects: &[Subject],
    pod: &Netns,
    iterations: usize,
    agent: bool,
) -> Result<Vec<Samples>> {
    let mut out: Vec<Samples> = subjects.iter().map(|_| Samples::default()).collect();
    for i in 0..iterations {
        // Interleaved, so drift on a shared machine hits both plugins alike.
        for (s, samples) in subjects.iter().zip(out.iter_mut()) {
            let cid = format!("seq-{i}");
            samples.add.push(s.add(&cid, &pod.path(), agent)?);
            let start = Instant::now();
            samples.del.push(s.exec("DEL", &cid, &pod.path())?);
            samples.gone.push(settle()? - start);
        }
    }
    Ok(out)
}

fn parallel_round(
    s: &Subject,
    pods: &[Netns],
    round: usize,
    agent: bool,
    samples: &mut Samples,
) -> Result<()> {
    for command in ["ADD", "DEL"] {
        let barrier = Arc::new(Barrier::new(pods.len()));
        let results: Vec<Result<Duration>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let barrier = Arc::clone(&barrier);
                    scope.spawn(move || {
                        let cid = format!("par-{round}-{i}");
                        barrier.wait();
                        if command == "ADD" {
                            // The wait for the agent comes after the ADD's time is taken.
                            s.add(&cid, &pod.path(), agent)
                        } else {
                            s.exec(command, &cid, &pod.path())
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Invalid("bench thread panicked".into())))
                })
                .collect()
        });
        for r in results {
            let d = r?;
            if command == "ADD" {
                samples.add.push(d);
            } else {
                samples.del.push(d);
            }
        }
    }
    Ok(())
}

fn parallel(
    subjects: &[Subject],
    pods: &[Netns],
    rounds: usize,
    agent: bool,
) -> Result<Vec<Samples>> {
    let mut out: Vec<Samples> = subjects.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        for (s, samples) in subjects.iter().zip(out.iter_mut()) {
            parallel_round(s, pods, round, agent, samples)?;
            settle()?;
        }
    }
    Ok(out)
}

fn report(phase: &str, subjects: &[Subject], samples: &[Samples]) {
    println!("\n{phase}");
    println!(
        "{:<28} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "plugin", "n", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for (s, v) in subjects.iter().zip(samples) {
        println!(
            "{:<28} {:>6} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            s.label,
            v.add.len(),
            ms(percentile(&v.add, 50.0)),
            ms(percentile(&v.add, 99.0)),
            ms(percentile(&v.del, 50.0)),
            ms(percentile(&v.del, 99.0))
        );
    }
    if samples.iter().any(|v| !v.gone.is_empty()) {
        for (s, v) in subjects.iter().zip(samples) {
            println!(
                "{:<28} pair deleted after DEL's start: p50 {:.2}ms  p99 {:.2}ms",
                s.label,
                ms(percentile(&v.gone, 50.0)),
                ms(percentile(&v.gone, 99.0))
            );
        }
    }
    // The last subject is the baseline; every other one is compared with it.
    let (Some(base), Some(base_subject)) = (samples.last(), subjects.last()) else {
        return;
    };
    for (s, v) in subjects.iter().zip(samples).take(samples.len() - 1) {
        let r = |f: fn(&Samples) -> &Vec<Duration>, p: f64| {
            ms(percentile(f(v), p)) / ms(percentile(f(base), p)).max(f64::EPSILON)
        };
        println!(
            "ratio {} / {}: ADD p50 {:.2}  ADD p99 {:.2}  DEL p50 {:.2}  DEL p99 {:.2}",
            s.label,
            base_subject.label,
            r(|s| &s.add, 50.0),
            r(|s| &s.add, 99.0),
            r(|s| &s.del, 50.0),
            r(|s| &s.del, 99.0)
        );
    }
}

fn default_palisade() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io_err_pub("locating this executable"))?;
    Ok(exe.with_file_name("palisade"))
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cni-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Invalid(
            "run as root: the bench creates network namespaces".into(),
        ));
    }
    let palisade = match args.palisade {
        Some(p) => p,
        None => default_palisade()?,
    };
    for bin in [
        palisade.clone(),
        args.reference_dir.join("ptp"),
        args.reference_dir.join("host-local"),
    ] {
        if !bin.is_file() {
            return Err(Error::Invalid(format!(
                "{} not found (build palisade, install containernetworking-plugins)",
                bin.display()
            )));
        }
    }
    let palisade =
        std::fs::canonicalize(&palisade).map_err(io_err_pub("resolving the palisade path"))?;
    // palisade's DEL leaves a reaper behind (double-forked); as their subreaper the bench sees
    // when they are done (`settle`) and reaps them.
    // SAFETY: prctl with an integer argument; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(Error::Invalid(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        )));
    }
    let pid = std::process::id();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("palisade-cni-bench-{pid}-"))
        .tempdir()
        .map_err(io_err_pub("creating the temp dir"))?;
    let node = Netns::create("pcbn").map_err(io_err_pub("creating the node namespace"))?;
    let seq_pod = Netns::create("pcbs").map_err(io_err_pub("creating a pod namespace"))?;
    let pods: Vec<Netns> = (0..args.parallel)
        .map(|_| Netns::create("pcbp").map_err(io_err_pub("creating a pod namespace")))
        .collect::<Result<_>>()?;
    let agent_dirs = palisade_bench::enforce::AgentDirs::create(&tmp.path().join("agent"))?;
    // The node's agent, on a manifest directory with every bench pod's Pod object (it clears a
    // new pod's pending mark once it compiled the pod), or the pending sets alone.
    let _agent = if args.no_agent {
        run(Command::new("ip").args([
            "netns", "exec", node.name(), "nft",
            "add table inet palisade; add set inet palisade pending_v4 { type ipv4_addr; }; add set inet palisade pending_v6 { type ipv6_addr; }",
        ]))?;
        None
    } else {
        let agent = match &args.agent {
            Some(a) => a.clone(),
            None => palisade.with_file_name("palisade-agent"),
        };
        let mut ids: Vec<String> = vec!["warmup".into()];
        ids.extend((0..args.iterations).map(|i| format!("seq-{i}")));
        for round in 0..args.rounds {
            ids.extend((0..args.parallel).map(|i| format!("par-{round}-{i}")));
        }
        palisade_bench::enforce::write_manifest(
            &agent_dirs.manifests,
            "pods.json",
            &pod_objects(&ids, palisade_bench::enforce::AGENT_NODE),
        )?;
        let source = [
            "--manifests".to_string(),
            palisade_bench::enforce::path_str(&agent_dirs.manifests)?.to_string(),
        ];
        let agent_args = agent_dirs.run_args(&source, palisade_bench::enforce::NO_RESYNC)?;
        let log = tmp.path().join("agent.log");
        let guard = palisade_bench::datapath::cmd::ChildGuard::spawn_in_logged(
            node.name(),
            palisade_bench::enforce::path_str(&agent)?,
            &agent_args.iter().map(String::as_str).collect::<Vec<_>>(),
            &log,
        )?;
        agent_dirs.wait_conflist(&log)?;
        Some(guard)
    };
    let with_agent = !args.no_agent;
    // Before this process starts any other thread, so every thread and child inherits the node
    // namespace (the host's own is never modified).
    enter_netns(node.name())?;

    let cni_path = format!(
        "{}:{}",
        palisade.parent().unwrap_or(Path::new("/")).display(),
        args.reference_dir.display()
    );
    let palisade_conf = json!({
        "cniVersion": "1.0.0", "name": "benchpal", "type": "palisade", "mtu": 1500,
        "stateDir": agent_dirs.state,
        "ipam": {"type": "palisade", "dataDir": agent_dirs.ipam, "ranges": [[{"subnet": POD_CIDR}]]}
    })
    .to_string();
    let subjects = [
        Subject {
            label: "palisade (builtin IPAM)",
            bin: palisade.clone(),
            cni_path: cni_path.clone(),
            conf: palisade_conf.clone(),
            pod_args: true,
        },
        Subject {
            label: "palisade, no pod identity",
            bin: palisade.clone(),
            cni_path: cni_path.clone(),
            conf: palisade_conf,
            pod_args: false,
        },
        Subject {
            label: "ptp + host-local",
            bin: args.reference_dir.join("ptp"),
            cni_path,
            conf: json!({
                "cniVersion": "1.0.0", "name": "benchptp", "type": "ptp", "mtu": 1500, "ipMasq": false,
                "ipam": {"type": "host-local", "dataDir": tmp.path().join("ipam"), "ranges": [[{"subnet": "10.211.0.0/16"}]],
                         "routes": [{"dst": "0.0.0.0/0"}]}
            })
            .to_string(),
            pod_args: true,
        },
    ];
    println!("cni-bench: {} sequential ADD+DEL per plugin, {} rounds of {} parallel ADDs then DELs; node netns {}", args.iterations, args.rounds, args.parallel, node.name());
    // Warm-up (page cache, first nft run) outside the figures.
    for s in &subjects {
        s.add("warmup", &seq_pod.path(), with_agent)?;
        s.exec("DEL", "warmup", &seq_pod.path())?;
    }
    println!(
        "{}",
        if with_agent {
            "with the node's palisade-agent running (each DEL after the agent cleared the pod's mark)"
        } else {
            "without an agent (--no-agent: every DEL finds its pod's mark)"
        }
    );
    let seq = sequential(&subjects, &seq_pod, args.iterations, with_agent)?;
    report("sequential (one attachment at a time)", &subjects, &seq);
    let par = parallel(&subjects, &pods, args.rounds, with_agent)?;
    report(
        &format!(
            "parallel ({} attachments at once; latency of each)",
            args.parallel
        ),
        &subjects,
        &par,
    );
    // palisade's DEL answers before its reaper has deleted the pair; give the reapers a moment.
    let links_left = || -> Result<(usize, String)> {
        let all = run(Command::new("ip").args(["-o", "link", "show"]))?;
        Ok((all.lines().filter(|l| !l.contains(": lo:")).count(), all))
    };
    palisade_testkit::wait::wait_until(Duration::from_secs(5), || {
        links_left().is_ok_and(|(n, _)| n == 0)
    });
    let (left, leftovers) = links_left()?;
    if left > 0 {
        return Err(Error::Teardown(format!(
            "{left} links left in the node namespace:\n{leftovers}"
        )));
    }
    Ok(())
}
