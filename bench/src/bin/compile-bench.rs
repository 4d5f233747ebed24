//! Compile benchmark on a synthetic cluster: 10k pods on 100 nodes, 500 namespaces, 1k policies.
//!
//! `cargo run --release -p palisade-bench --bin compile-bench [seed] [cluster network policies] [huge]`
//!
//! `huge`: ten times the cluster (100k pods on 1,000 nodes, 5,000 namespaces, 10k policies).
//!
//! Prints compile time and ruleset size for one node, then for each kind of single change the
//! cost from change to batch two ways in one run: the incremental compiler beside the old path
//! (full compile + diff of the whole ruleset), checking both give the same ruleset. Then, when
//! run as root, commits the full table and every change's batch into a throwaway network
//! namespace through palisade-nft's lib backend and prints the wall times (the host namespace is
//! never touched; without root this part says so and is skipped).

use palisade_bench::datapath::run::in_netns;
use palisade_contract::Attachment;
use palisade_policy::model::{
    Change, ClusterState, Peer, Pod, PortMatch, PortSpec, Protocol, Rule,
};
use palisade_policy::synth::{self, Rng, SynthConfig};
use palisade_policy::{compile, diff, Batch, IncrementalCompiler};
use palisade_testkit::Netns;
use std::time::{Duration, Instant};

const NODE: &str = "n0";

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// With `PALISADE_BENCH_DUMP=<dir>`, each batch is also written there, to time `nft -j -f` on it.
fn dump(file: &str, json: &str) {
    if let Some(dir) = std::env::var_os("PALISADE_BENCH_DUMP") {
        let path = std::path::Path::new(&dir).join(file);
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}

struct Bench {
    st: ClusterState,
    inc: IncrementalCompiler,
    last: palisade_policy::Ruleset,
    batches: Vec<(String, Batch)>,
}

impl Bench {
    /// Applies one change both ways and prints both costs.
    fn change(&mut self, name: &str, ch: Change) {
        let t = Instant::now();
        self.st.apply(ch.clone());
        let next = compile(&self.st, NODE).ruleset;
        let compile_t = t.elapsed();
        let t = Instant::now();
        let old_batch = diff(&self.last, &next);
        let diff_t = t.elapsed();
        let t = Instant::now();
        let batch = self.inc.apply(ch);
        let inc_t = t.elapsed();
        let same = self.inc.ruleset() == &next && batch == old_batch;
        println!(
            "{name:<26} incremental {:>10} | full compile + diff {:>10} ({} + {}) | {:>3} cmds, {:>6} bytes | {}",
            ms(inc_t),
            ms(compile_t + diff_t),
            ms(compile_t),
            ms(diff_t),
            batch.commands(),
            batch.bytes(),
            if same { "same result" } else { "DIFFERENT RESULT" }
        );
        if !same {
            std::process::exit(1);
        }
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        dump(&format!("diff_{slug}.json"), &batch.to_json_string());
        self.last = next;
        self.batches.push((name.to_string(), batch));
    }
}

fn attachment(p: &Pod, pending: bool) -> Attachment {
    let cid = format!("c-{}-{}", p.namespace, p.name);
    Attachment {
        host_veth: palisade_contract::host_veth_name(&cid, "eth0"),
        container_id: cid,
        ifname: "eth0".into(),
        netns: String::new(),
        ips: p.ips.to_vec(),
        pod_namespace: Some(p.namespace.to_string()),
        pod_name: Some(p.name.to_string()),
        // The model keeps a UID as 16 bytes, not its text; a record without one names the pod by
        // namespace and name alone, as the compiler's cost is the same.
        pod_uid: None,
        pending,
    }
}

fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    // Second argument: ClusterNetworkPolicies added to the cluster (default none).
    let cluster_policies = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let huge = std::env::args().nth(3).as_deref() == Some("huge");
    let cfg = SynthConfig {
        cluster_policies,
        ..if huge {
            SynthConfig::huge(seed)
        } else {
            SynthConfig::large(seed)
        }
    };
    let t = Instant::now();
    let st = synth::cluster(&cfg);
    println!(
        "synthetic cluster (seed {seed}): {} pods, {} nodes, {} namespaces, {} policies, {} cluster network policies, dual stack; generated in {}",
        st.pods.len(),
        st.nodes.len(),
        st.namespaces.len(),
        st.policies.len(),
        st.cluster_policies.len(),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let c = compile(&st, NODE);
    let compile_t = t.elapsed();
    let s = c.ruleset.stats();
    let t = Instant::now();
    let full = c.ruleset.full_replace();
    let render_t = t.elapsed();
    let t = Instant::now();
    let full_netlink = c.ruleset.full_replace_netlink();
    let netlink_t = t.elapsed();
    // Built after the timing above: "built in" is one full replace's messages.
    let full_by_id = c
        .ruleset
        .full_replace_netlink_naming(palisade_policy::ruleset::NewSetNaming::IdOnly)
        .ok();
    dump("full.json", &full.to_json_string());
    println!(
        "node {NODE}: {} local pods, {} policies select them; full compile {}",
        c.pods.len(),
        c.policies.len(),
        ms(compile_t)
    );
    println!(
        "ruleset: {} chains, {} rules, {} sets/maps, {} elements; full replace {} cmds, {} bytes JSON, rendered in {}",
        s.chains,
        s.rules,
        s.sets,
        s.elements,
        full.commands(),
        full.bytes(),
        ms(render_t)
    );
    let copy = st.clone();
    let t = Instant::now();
    let inc = IncrementalCompiler::new(copy, NODE);
    println!(
        "incremental compiler built from state (full compile + indexes) in {}",
        ms(t.elapsed())
    );
    println!();
    let mut b = Bench {
        st,
        inc,
        last: c.ruleset.clone(),
        batches: Vec::new(),
    };
    let mut rng = Rng::new(seed + 1);

    // Pods.
    let mut p = synth::make_pod(&cfg, &mut rng, cfg.pods + 1);
    p.node_name = Some(NODE.into());
    // CNI ADD: the plugin's attachment record arrives first (pending), then the Pod object.
    let mut atts = b.st.attachments.clone();
    atts.push(attachment(&p, true));
    b.change("attachment (CNI ADD)", Change::SetAttachments(atts));
    b.change("pod add, this node", Change::UpsertPod(p.clone().into()));
    let mut q = synth::make_pod(&cfg, &mut rng, cfg.pods + 2);
    q.node_name = Some("n7".into());
    b.change("pod add, other node", Change::UpsertPod(q.clone().into()));
    let key = c
        .pods
        .values()
        .find(|lp| !lp.ingress.is_empty())
        .map(|lp| lp.key.clone())
        .unwrap_or(p.key());
    let mut pod = Pod::clone(&b.st.pods[key.as_str()]);
    pod.labels.insert("tier".into(), "db".into());
    pod.labels.insert("env".into(), "prod".into());
    b.change("label change, this node", Change::UpsertPod(pod.into()));
    let mut q2 = q.clone();
    q2.labels.insert("tier".into(), "web".into());
    q2.labels.insert("app".into(), "app3".into());
    b.change("label change, other node", Change::UpsertPod(q2.into()));
    b.change(
        "pod delete, other node",
        Change::DeletePod {
            namespace: q.namespace.to_string(),
            name: q.name.to_string(),
        },
    );
    b.change(
        "pod delete, this node",
        Change::DeletePod {
            namespace: p.namespace.to_string(),
            name: p.name.to_string(),
        },
    );
    b.change(
        "attachment (CNI DEL)",
        Change::SetAttachments(
            b.st.attachments
                .iter()
                .filter(|a| a.pod_name.as_deref() != Some(p.name.as_ref()))
                .cloned()
                .collect(),
        ),
    );
    land_in_kubernetes_order(&mut b, &cfg, &mut rng, &p);

    // A namespace's labels (namespace selectors of every policy see its pods come or go).
    let ns_of_local = key.split_once('/').map(|(n, _)| n).unwrap_or_default();
    if let Some(mut ns) = b.st.namespaces.get(ns_of_local).cloned() {
        let team = ns
            .labels
            .get("team")
            .map(str::to_string)
            .unwrap_or_default();
        let other = if team == "t1" { "t2" } else { "t1" };
        ns.labels.insert("team".into(), other.into());
        ns.labels.insert("env".into(), "prod".into());
        b.change("namespace label change", Change::UpsertNamespace(ns));
    }

    // Policies.
    let pkey = c.policies.keys().next().cloned().unwrap_or_default();
    if let Some(mut pol) = b.st.policies.get(&pkey).cloned() {
        let rules = pol.ingress.get_or_insert_with(Vec::new);
        if rules.is_empty() {
            rules.push(Rule {
                peers: vec![],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(80, 80),
                }],
            });
        }
        rules[0].ports.push(PortSpec {
            protocol: Protocol::Tcp,
            port: PortMatch::Range(8443, 8443),
        });
        b.change("policy update: +port", Change::UpsertPolicy(pol.clone()));
        pol.ingress.get_or_insert_with(Vec::new).push(Rule {
            peers: vec![Peer::IpBlock {
                cidr: "203.0.113.0/24".parse().unwrap_or_default(),
                except: vec![],
            }],
            ports: vec![PortSpec {
                protocol: Protocol::Udp,
                port: PortMatch::Range(5000, 5010),
            }],
        });
        b.change("policy update: +rule", Change::UpsertPolicy(pol));
    }
    // A new policy in the namespace of a local pod, selecting it among others.
    let mut np = synth::make_policy(&cfg, &mut rng, cfg.policies + 1);
    np.namespace = ns_of_local.to_string();
    np.pod_selector = Default::default();
    b.change("policy create", Change::UpsertPolicy(np.clone()));
    b.change(
        "policy delete",
        Change::DeletePolicy {
            namespace: np.namespace.clone(),
            name: np.name.clone(),
        },
    );

    println!();
    match &full_netlink {
        Ok(n) => println!(
            "full table as netlink messages: built in {} ({} messages, {} bytes)",
            ms(netlink_t),
            n.messages,
            n.len()
        ),
        Err(e) => println!("full table as netlink messages: not encoded: {e}"),
    }
    commit_in_throwaway_netns(&full, full_netlink.ok(), full_by_id, &b.batches);
}

/// The same pod (namespace and labels of `like`) landing on this node in the order a cluster
/// delivers it: the scheduler's binding (the Pod on this node, no address yet: the policies that
/// select it bring their peer sets now, before the kubelet has made its sandbox), the plugin's
/// record at CNI ADD (its addresses: the change its traffic waits for, as it is pending until
/// committed), then the kubelet's status with the IPs. The one-step "pod add, this node" above is
/// what the agent sees only when it hears of the binding after the CNI ADD. Then both go again.
fn land_in_kubernetes_order(b: &mut Bench, cfg: &SynthConfig, rng: &mut Rng, like: &Pod) {
    let mut pod = synth::make_pod(cfg, rng, cfg.pods + 3);
    pod.namespace = like.namespace.clone();
    pod.labels = like.labels.clone();
    pod.node_name = Some(NODE.into());
    let running = pod.clone();
    pod.ips = Box::new([]);
    pod.phase = palisade_policy::model::PodPhase::Pending;
    b.change("bound here, no address", Change::UpsertPod(pod.into()));
    let mut atts = b.st.attachments.clone();
    atts.push(attachment(&running, true));
    b.change("then its CNI ADD record", Change::SetAttachments(atts));
    b.change(
        "then its status IPs",
        Change::UpsertPod(running.clone().into()),
    );
    b.change(
        "its delete, this node",
        Change::DeletePod {
            namespace: running.namespace.to_string(),
            name: running.name.to_string(),
        },
    );
    b.change(
        "then its CNI DEL record",
        Change::SetAttachments(
            b.st.attachments
                .iter()
                .filter(|a| a.pod_name.as_deref() != Some(running.name.as_ref()))
                .cloned()
                .collect(),
        ),
    );
}

/// Full commits of each way of naming new sets (in turns) for their medians.
const NAMING_ROUNDS: usize = 15;

/// Our table deleted, for a full commit over none.
const DELETE_TABLE: &str =
    r#"{"nftables":[{"delete":{"table":{"family":"inet","name":"palisade"}}}]}"#;

fn commit_in_throwaway_netns(
    full: &Batch,
    full_netlink: Option<palisade_policy::ruleset::NetlinkBatch>,
    full_by_id: Option<palisade_policy::ruleset::NetlinkBatch>,
    batches: &[(String, Batch)],
) {
    let ns = match Netns::create("palbench") {
        Ok(ns) => ns,
        Err(e) => {
            println!("commit: skipped, cannot create a network namespace (needs root): {e}");
            return;
        }
    };
    let path = ns.path().display().to_string();
    let full_json = full.to_json_string();
    // Each change as the agent commits it: its netlink messages, or its JSON through nft when the
    // compiler could not encode them.
    let batches: Vec<(
        String,
        Result<palisade_policy::ruleset::NetlinkBatch, String>,
    )> = batches
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(n, b)| {
            (
                n.clone(),
                b.netlink.clone().ok_or_else(|| b.to_json_string()),
            )
        })
        .collect();
    // A thread of our own enters the namespace: the main thread stays in the host namespace.
    let res = in_netns(ns.name(), move || -> Result<Vec<String>, String> {
        let t = Instant::now();
        let nft = palisade_nft::Nft::new(palisade_nft::Backend::Lib);
        let load = t.elapsed();
        if nft.backend() != palisade_nft::Backend::Lib {
            return Err("libnftables not available".into());
        }
        let mut out = vec![format!(
            "commit through palisade-nft (libnftables in-process), in netns {path}; library loaded in {}",
            ms(load)
        )];
        let t = Instant::now();
        nft.apply(&full_json)
            .map_err(|e| format!("full table: {e}"))?;
        out.push(format!(
            "{:<26} {:>10}  ({} bytes)",
            "full table, first commit",
            ms(t.elapsed()),
            full_json.len()
        ));
        let t = Instant::now();
        nft.apply(&full_json)
            .map_err(|e| format!("full table again: {e}"))?;
        out.push(format!(
            "{:<26} {:>10}  (resync: replaces the table in place)",
            "full table, replace",
            ms(t.elapsed())
        ));
        // The same table as the agent commits it: nfnetlink messages, no libnftables. Over the
        // table (a resync or a repair's replace), then over none (a restore after `delete table`).
        if let Some(nl) = &full_netlink {
            let mut writer = palisade_nft::setelem::ElementWriter::new();
            for (what, drop_first) in [("replace", false), ("first commit", true)] {
                if drop_first {
                    nft.apply(DELETE_TABLE)
                        .map_err(|e| format!("delete table: {e}"))?;
                }
                let t = Instant::now();
                writer
                    .commit_prepared("full replace", "palisade", &nl.parts())
                    .map_err(|e| format!("netlink full table: {e}"))?;
                out.push(format!(
                    "{:<26} {:>10}  (netlink messages, {} bytes)",
                    format!("full table, {what}"),
                    ms(t.elapsed()),
                    nl.len()
                ));
            }
            // Element messages naming their new set by name and ID (as nft) against by ID alone
            // (the agent's choice on Linux 6.12 and later), each over no table, in turns.
            if let Some(by_id) = &full_by_id {
                let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                for round in 0..2 * NAMING_ROUNDS {
                    let (side, batch) = if round % 2 == 0 { (0, nl) } else { (1, by_id) };
                    nft.apply(DELETE_TABLE)
                        .map_err(|e| format!("delete table: {e}"))?;
                    let t = Instant::now();
                    writer
                        .commit_prepared("full replace", "palisade", &batch.parts())
                        .map_err(|e| {
                            format!("netlink full table ({}): {e}", ["by name", "by id"][side])
                        })?;
                    times[side].push(t.elapsed().as_secs_f64() * 1e3);
                }
                let [by_name, by_id] = times.map(|mut v| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                });
                out.push(format!(
                    "full table, first commit, {NAMING_ROUNDS} in turns: new sets' elements by name and ID {by_name:.3} ms, by ID alone {by_id:.3} ms (medians; by ID / by name x{:.3}; {})",
                    by_id / by_name,
                    if palisade_nft::kernel::finds_new_sets_by_id() {
                        "this kernel finds new sets by ID at once: the agent names them so"
                    } else {
                        "this kernel walks the transaction for an ID: the agent names sets as nft does"
                    }
                ));
            }
        }
        out.extend(read_back_both_ways());
        // With `PALISADE_BENCH_LISTEN=1` the changes are committed with a drift monitor listening,
        // as the agent's is: the kernel then builds a notification per rule and element. With
        // `=quiet`, the monitor leaves the notification group for batches of 256 KiB or more
        // (the agent's `QUIET_BATCH_BYTES`) and joins it again after them, as the agent does.
        let how_listening = std::env::var(LISTEN_ENV).ok();
        let quiet = how_listening.as_deref() == Some("quiet");
        let listener = how_listening.map(|_| Listener::start()).transpose()?;
        if listener.is_some() {
            out.push(format!(
                "changes committed with a drift monitor listening{}",
                if quiet {
                    ", out of the group for batches of 256 KiB or more"
                } else {
                    ""
                }
            ));
        }
        let mut writer = palisade_nft::setelem::ElementWriter::new();
        for (name, batch) in &batches {
            let t = Instant::now();
            let (how, bytes) = match batch {
                Ok(nl) => {
                    let out_of_group = listener
                        .as_ref()
                        .filter(|_| quiet && nl.len() >= 256 << 10)
                        .map(|l| &l.membership);
                    if let Some(m) = out_of_group {
                        m.leave().map_err(|e| format!("leave: {e}"))?;
                    }
                    let committed = writer
                        .commit_prepared("incremental batch", "palisade", &nl.parts())
                        .map_err(|e| format!("{name}: {e}"));
                    if let Some(m) = out_of_group {
                        m.join().map_err(|e| format!("join: {e}"))?;
                    }
                    committed?;
                    ("netlink", nl.len())
                }
                Err(json) => {
                    nft.apply(json).map_err(|e| format!("{name}: {e}"))?;
                    ("JSON through libnftables", json.len())
                }
            };
            out.push(format!(
                "{name:<26} {:>10}  ({how}, {bytes} bytes)",
                ms(t.elapsed())
            ));
        }
        if let Some(l) = listener {
            out.push(format!("the listener read {} drift reports", l.stop()));
        }
        Ok(out)
    });
    match res {
        Ok(Ok(lines)) => lines.iter().for_each(|l| println!("{l}")),
        Ok(Err(e)) => println!("commit: FAILED: {e}"),
        Err(e) => println!("commit: FAILED: {e}"),
    }
    drop(ns);
    println!(
        "peak RSS of this process (cluster state, full compile, incremental compiler, batches): {}",
        peak_rss()
    );
}

/// The environment variable that puts a drift monitor beside the commits of the changes.
const LISTEN_ENV: &str = "PALISADE_BENCH_LISTEN";

/// A drift monitor of our table, drained by a thread of its own until stopped.
struct Listener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
    membership: palisade_nft::monitor::Membership,
}

impl Listener {
    /// Opens the monitor in the calling thread's network namespace.
    fn start() -> Result<Self, String> {
        use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};
        use palisade_nft::monitor::{Monitor, Scope};
        // The agent's scope (its `nft::watch_drift`): our table, the plugin's marks left out.
        let scope = Scope::new(TABLE_FAMILY, TABLE_NAME, &[PENDING_SET_V4, PENDING_SET_V6])
            .map_err(|e| format!("monitor scope: {e}"))?;
        let mut monitor = Monitor::open(scope).map_err(|e| format!("monitor: {e}"))?;
        let membership = monitor
            .membership()
            .map_err(|e| format!("monitor membership: {e}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut reports = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(_)) = monitor.next(Some(Duration::from_millis(50))) {
                    reports += 1;
                }
            }
            reports
        });
        Ok(Self {
            stop,
            thread,
            membership,
        })
    }

    /// Stops the thread; how many drift reports it read.
    fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// The committed table read back for the agent's check two ways, alternating, three times each:
/// `nft -j list table` (what the agent ran until the summary moved to nfnetlink; wall time and
/// the `nft` process's peak RSS) and `palisade_nft::summary::table` (wall time; it holds one
/// 64 KiB receive buffer and the set names).
fn read_back_both_ways() -> Vec<String> {
    let mut out = Vec::new();
    let (mut listing, mut summary) = (Vec::new(), Vec::new());
    let mut listed_bytes = 0;
    let mut nft_rss_kib: Option<u64> = None;
    let mut found = None;
    // The `nft` process's own peak comes from GNU time (a small parent): a child started from this
    // process inherits its high-water mark at exec, whatever nft itself used.
    let timed = std::path::Path::new("/usr/bin/time").exists();
    for _ in 0..3 {
        let mut cmd = if timed {
            let mut c = std::process::Command::new("/usr/bin/time");
            c.args(["-f", "%M", "nft"]);
            c
        } else {
            std::process::Command::new("nft")
        };
        let t = Instant::now();
        match cmd
            .args(["-j", "list", "table", "inet", "palisade"])
            .output()
        {
            Ok(o) if o.status.success() => {
                listing.push(t.elapsed());
                listed_bytes = o.stdout.len();
                let last = String::from_utf8_lossy(&o.stderr);
                if let Some(kib) = last
                    .lines()
                    .last()
                    .and_then(|l| l.trim().parse::<u64>().ok())
                {
                    nft_rss_kib = Some(nft_rss_kib.unwrap_or(0).max(kib));
                }
            }
            Ok(o) => {
                out.push(format!(
                    "read back: nft failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
                return out;
            }
            Err(e) => {
                out.push(format!("read back: cannot run nft: {e}"));
                return out;
            }
        }
        let t = Instant::now();
        match palisade_nft::summary::table("inet", "palisade", &["pending_v4", "pending_v6"]) {
            Ok(s) => {
                summary.push(t.elapsed());
                found = s;
            }
            Err(e) => {
                out.push(format!("read back: summary failed: {e}"));
                return out;
            }
        }
    }
    let child_rss = nft_rss_kib.map_or_else(
        || "unknown (no /usr/bin/time)".to_string(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    );
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let all = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
    out.push(format!(
        "read back, nft -j list table:    {} (best of {}; {listed_bytes} bytes of JSON; nft peak RSS {child_rss})",
        all(&listing),
        listing.len()
    ));
    out.push(format!(
        "read back, nfnetlink summary:    {} (best of {}; {:?})",
        all(&summary),
        summary.len(),
        found
    ));
    out.push(format!(
        "read back, summary / listing:    {:.3}x of the time (best against best)",
        best(&summary).as_secs_f64() / best(&listing).as_secs_f64().max(1e-9)
    ));
    out
}

/// This process's peak resident set (getrusage), for the scale it ran at.
fn peak_rss() -> String {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return "unknown".into();
    }
    format!("{:.1} MiB", ru.ru_maxrss as f64 / 1024.0)
}
