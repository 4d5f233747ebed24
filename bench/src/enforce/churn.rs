//! Background churn while trials run: writers that rewrite pod labels at a paced rate, and the
//! agent's CPU and memory over a churn window.

use super::*;

/// Background churn: every 1/rate seconds, one random background pod gets another `role` label
/// (one of 200 churn files, each overriding one pod; rewriting a file moves its override to another
/// pod, so a write is one or two pod changes).
pub(super) struct Churn {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Churn {
    pub(super) fn start(store: &Store, cluster: &Cluster, rate: u32, seed: u64) -> Churn {
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
    pub(super) fn heartbeats(store: &Store, pods: Arc<Vec<Pod>>, rate: u32, first: u64) -> Churn {
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
    pub(super) fn paced(
        rate: u32,
        max_lag: Duration,
        step: impl FnMut() -> bool + Send + 'static,
    ) -> Churn {
        Churn::paced_each(max_lag, vec![(rate, Box::new(step))])
    }

    /// [`Churn::paced`] with one thread per `(rate, step)`, counted together.
    pub(super) fn paced_each(max_lag: Duration, writers: Vec<(u32, Step)>) -> Churn {
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

    pub(super) fn finish(mut self) -> u64 {
        self.stop_writers();
        self.writes.load(Ordering::Relaxed)
    }

    fn stop_writers(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A scenario that fails returns with `?` before [`Churn::finish`]: its writers must stop then too,
/// or they go on writing pod files into the work directory after the run removed it (six
/// `palisade-enforce-<pid>/…/manifests` directories were left in /tmp so).
impl Drop for Churn {
    fn drop(&mut self) {
        self.stop_writers();
    }
}

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

/// The agent under observation: its node's lab, the bench binary, its manifest directory and pid.
pub(super) struct Observed<'a> {
    pub(super) lab: &'a Lab,
    pub(super) exe: &'a str,
    pub(super) store: &'a Store,
    pub(super) pid: u32,
}

/// What one observation window saw: the agent's CPU/memory and its metrics text before and after,
/// how many writes the writer made, and how long it wrote and the whole window lasted.
pub(super) struct Window {
    pub(super) before: ProcStats,
    pub(super) after: ProcStats,
    pub(super) m0: String,
    pub(super) m1: String,
    pub(super) writes: u64,
    pub(super) write_seconds: f64,
    pub(super) wall_seconds: f64,
}

impl Observed<'_> {
    /// Runs the writer `start` makes for `secs`, then 300 ms for the last writes to land before the
    /// counters are read; measures the agent over the whole window.
    pub(super) fn window(&self, secs: u64, start: impl FnOnce(&Store) -> Churn) -> Result<Window> {
        let m0 = fetch_metrics(self.lab, self.exe);
        let before = proc_stats(self.pid)?;
        let t = Instant::now();
        let writer = start(self.store);
        std::thread::sleep(Duration::from_secs(secs));
        let writes = writer.finish();
        let write_seconds = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let wall_seconds = t.elapsed().as_secs_f64();
        let after = proc_stats(self.pid)?;
        let m1 = fetch_metrics(self.lab, self.exe);
        Ok(Window {
            before,
            after,
            m0,
            m1,
            writes,
            write_seconds,
            wall_seconds,
        })
    }
}

pub(super) fn churn_window(
    obs: &Observed<'_>,
    cluster: &Cluster,
    rate: u32,
    secs: u64,
    seed: u64,
) -> Result<ChurnResult> {
    const SUM: &str = "palisade_reconcile_duration_seconds_sum";
    const COUNT: &str = "palisade_reconcile_duration_seconds_count";
    let w = obs.window(secs, |store| Churn::start(store, cluster, rate, seed))?;
    let d = |name: &str| {
        metric_value(&w.m1, name).unwrap_or(f64::NAN)
            - metric_value(&w.m0, name).unwrap_or(f64::NAN)
    };
    let reconciles = d(COUNT);
    Ok(ChurnResult {
        pods: cluster.pods.len(),
        policies: cluster.policies.len(),
        rate,
        writes: w.writes,
        wall_seconds: w.wall_seconds,
        agent_cpu_seconds: w.after.cpu_seconds - w.before.cpu_seconds,
        rss_kib: w.after.rss_kib,
        hwm_kib: w.after.hwm_kib,
        reconciles,
        reconcile_mean_ms: if reconciles > 0.0 {
            d(SUM) * 1e3 / reconciles
        } else {
            f64::NAN
        },
    })
}
