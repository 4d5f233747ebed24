//! Irrelevant events: status heartbeats of pods (a new resourceVersion and probe times, nothing
//! compiled changes) at a given rate beside an idle window, and what the agent spent on them.

use super::*;

/// Threads writing the status heartbeats: a rename into the manifest directory can wait on the disk
/// (~0.4–0.6 ms on ext4 here), so one thread alone falls short of 1,000 writes/s on a busy machine.
pub(super) const HEARTBEAT_WRITERS: usize = 2;

/// Override file `i` of the status heartbeats (sorted before the churn files, which win over them).
pub(super) fn heartbeat_name(i: usize) -> String {
    format!("65-status-{i:04}.json")
}

/// `pod` as the API server shows it after its `n`-th status heartbeat: a new `resourceVersion` and
/// fresh `lastProbeTime`/`lastTransitionTime` of its conditions; labels, IPs, phase, node and ports
/// as in the cluster list. Nothing the agent compiles changes.
pub(super) fn heartbeat_pod(pod: &Pod, n: u64) -> Value {
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
pub(super) fn heartbeat_targets(cluster: &Cluster, count: usize) -> Vec<Pod> {
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

/// One window of the irrelevant-events measurement: `rate` heartbeat writes per second (0: none)
/// for `secs`, then 300 ms for the last ones to land; the agent's CPU, memory and counters over it.
pub(super) fn irrelevant_window(
    obs: &Observed<'_>,
    cluster: &Cluster,
    targets: &Arc<Vec<Pod>>,
    rate: u32,
    secs: u64,
    first: u64,
) -> Result<IrrelevantResult> {
    let w = obs.window(secs, |store| {
        Churn::heartbeats(store, targets.clone(), rate, first)
    })?;
    let delta = |get: &dyn Fn(&str) -> Option<f64>| Some(get(&w.m1)? - get(&w.m0)?);
    Ok(IrrelevantResult {
        pods: cluster.pods.len(),
        policies: cluster.policies.len(),
        rate,
        files: targets.len(),
        writes: w.writes,
        write_seconds: w.write_seconds,
        wall_seconds: w.wall_seconds,
        agent_cpu_seconds: w.after.cpu_seconds - w.before.cpu_seconds,
        rss_kib: w.after.rss_kib,
        hwm_kib: w.after.hwm_kib,
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
pub(super) fn irrelevant_windows(
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
