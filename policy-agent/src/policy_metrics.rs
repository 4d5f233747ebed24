//! Per-policy counters in `/metrics`: `palisade_policy_packets_total{kind, namespace, policy,
//! direction, verdict}`, read from the kernel's named counters of our table at each scrape and
//! labelled with what the compiled model says each counts (`Compiled::policy_counters`, asked of
//! the engine, which owns the model; a scrape never waits long on a busy engine and takes its last
//! answer instead). Only policies that have a counter now are shown: a deleted policy's series
//! disappear with its counters. A full replace of our table starts the kernel's
//! counters from zero again; the engine reads them just before and carries what they held
//! ([`Carried`]), so the series keep counting up (a restarted agent finds the counters in the
//! table it left and carries them too). A table deleted from outside takes what its counters held
//! since the last replace with it (a counter reset). The same read feeds `forged_metrics`.

use crate::nft::Counters;
use crate::reconcile::Msg;
use palisade_policy::compile::counters::{PolicyCounter, Unit};
use palisade_policy::model::CLUSTER_KEY_PREFIX;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a scrape waits for the engine's answer before it uses the last one it had: an idle
/// engine answers in microseconds; a busy one (a long compile or commit) must not hold a scrape
/// (Prometheus gives up after its scrape timeout, and a probe after its own).
const ASK_TIMEOUT: Duration = Duration::from_millis(200);

/// What the engine answers a scrape: what each counter counts, and what the counters held
/// before the engine's full replaces since they were created.
#[derive(Debug, Default)]
pub struct CounterReport {
    pub described: Vec<PolicyCounter>,
    pub carried: HashMap<String, u64>,
}

/// What the kernel's named counters held when the engine replaced our table (which starts them
/// from zero), summed over its replaces, by counter name.
#[derive(Debug, Default, Clone)]
pub struct Carried(HashMap<String, u64>);

impl Carried {
    /// Takes the counts read just before a full replace that then committed.
    pub fn replaced(&mut self, read: HashMap<String, u64>) {
        for (name, n) in read {
            let c = self.0.entry(name).or_insert(0);
            *c = c.saturating_add(n);
        }
    }

    /// Forgets counters the ruleset no longer has: one created again later starts from zero.
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        if !self.0.is_empty() {
            self.0.retain(|name, _| exists(name));
        }
    }

    pub fn values(&self) -> &HashMap<String, u64> {
        &self.0
    }
}

/// The kernel's counts with what was carried over the engine's replaces added.
pub fn with_carried(
    mut kernel: HashMap<String, u64>,
    carried: &HashMap<String, u64>,
) -> HashMap<String, u64> {
    for (name, n) in carried {
        let c = kernel.entry(name.clone()).or_insert(0);
        *c = c.saturating_add(*n);
    }
    kernel
}

/// The scrape's half: asks the engine, reads the kernel.
pub struct PolicyMetrics {
    reports: Reports,
    counters: Counters,
}

impl PolicyMetrics {
    pub fn new(engine: mpsc::Sender<Msg>, counters: Counters) -> Self {
        PolicyMetrics {
            reports: Reports::new(engine, ASK_TIMEOUT),
            counters,
        }
    }

    /// The family's text (empty when neither the engine nor the kernel can answer now; logged at
    /// debug).
    pub async fn render(&self) -> String {
        let Some(report) = self.reports.latest().await else {
            return String::new();
        };
        let counters = self.counters.clone();
        match tokio::task::spawn_blocking(move || counters.packets()).await {
            Ok(Ok(values)) => {
                let values = with_carried(values, &report.carried);
                // An answer from before the engine's last commit may name counters deleted since.
                let described = still_counting(&report.described, &values);
                render(&described, &values) + &crate::forged_metrics::render(&values)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "per-policy counters left out: cannot read them");
                String::new()
            }
            Err(_) => String::new(),
        }
    }
}

/// The engine's answers to scrapes: a scrape asks and waits up to `wait`; when the engine is
/// busy, the scrape takes the last answer and the question stays asked, so the next scrape finds
/// the engine's answer as soon as it gave one (never more than one question in its queue).
struct Reports {
    engine: mpsc::Sender<Msg>,
    wait: Duration,
    state: tokio::sync::Mutex<Asked>,
}

#[derive(Default)]
struct Asked {
    last: Option<std::sync::Arc<CounterReport>>,
    pending: Option<oneshot::Receiver<CounterReport>>,
}

impl Reports {
    fn new(engine: mpsc::Sender<Msg>, wait: Duration) -> Self {
        Reports {
            engine,
            wait,
            state: tokio::sync::Mutex::new(Asked::default()),
        }
    }

    /// The engine's answer to this scrape (or to an earlier one it answered late), or the last
    /// one when it is busy (`None`: it never answered yet).
    async fn latest(&self) -> Option<std::sync::Arc<CounterReport>> {
        let mut asked = self.state.lock().await;
        let mut rx = match asked.pending.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = oneshot::channel();
                if self.engine.try_send(Msg::PolicyCounters(tx)).is_err() {
                    tracing::debug!(
                        "per-policy counters: the engine's queue is full; the last answer is used"
                    );
                    return asked.last.clone();
                }
                rx
            }
        };
        match tokio::time::timeout(self.wait, &mut rx).await {
            Ok(Ok(report)) => {
                let report = std::sync::Arc::new(report);
                asked.last = Some(report.clone());
                Some(report)
            }
            // The engine stopped: nothing more will come.
            Ok(Err(_)) => asked.last.clone(),
            Err(_elapsed) => {
                tracing::debug!("per-policy counters: the engine is busy; the last answer is used");
                asked.pending = Some(rx);
                asked.last.clone()
            }
        }
    }
}

/// The counters of `described` the kernel has now (a series shows only while its counter exists).
fn still_counting(
    described: &[PolicyCounter],
    values: &HashMap<String, u64>,
) -> Vec<PolicyCounter> {
    described
        .iter()
        .filter(|c| values.contains_key(&c.counter))
        .cloned()
        .collect()
}

/// `(kind, namespace, name)` of a compiler policy key.
fn policy_labels(key: &str) -> (&'static str, &str, &str) {
    match key.strip_prefix(CLUSTER_KEY_PREFIX) {
        Some(name) => ("ClusterNetworkPolicy", "", name),
        None => {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            ("NetworkPolicy", ns, name)
        }
    }
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The families in the Prometheus text format; a counter missing from the kernel counts 0.
pub fn render(described: &[PolicyCounter], values: &HashMap<String, u64>) -> String {
    let mut out = String::new();
    for (unit, name, help) in [
        (
            Unit::Packets,
            "palisade_policy_packets_total",
            "Packets each policy decided on this node, by direction and verdict: allow counts the packets a rule of the policy admitted (only packets of connections not established yet meet policy rules: a TCP SYN, a UDP flow's datagrams until the first reply), drop the packets dropped because the policy isolates the pod and no rule allowed them (a drop isolated by several policies counts for each), a ClusterNetworkPolicy's pass what it handed to the next tier, would_drop what a NetworkPolicy in audit mode would have dropped (nothing was). The agent's own full replaces of our table keep the counts; a table deleted from outside loses what was counted since the last one (a counter reset).",
        ),
        (
            Unit::Connections,
            "palisade_policy_connections_total",
            "New connections each NetworkPolicy decided on this node (each connection's first packet): allow those a rule of the policy admitted, drop the connection attempts dropped because it isolates the pod and no rule allowed them (a retransmitted first packet is an attempt again; one isolated by several policies counts for each). The agent's own full replaces of our table keep the counts; a table deleted from outside loses what was counted since the last one (a counter reset).",
        ),
    ] {
        let mut sums: BTreeMap<(&str, &str, &str, String, &str), u64> = BTreeMap::new();
        for c in described.iter().filter(|c| c.unit == unit) {
            let n = values.get(&c.counter).copied().unwrap_or(0);
            for key in &c.policies {
                let (kind, ns, policy) = policy_labels(key);
                *sums
                    .entry((kind, ns, policy, c.direction.to_string(), c.verdict.label()))
                    .or_insert(0) += n;
            }
        }
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for ((kind, ns, policy, dir, verdict), n) in sums {
            out.push_str(&format!(
                "{name}{{kind=\"{kind}\",namespace=\"{}\",policy=\"{}\",direction=\"{dir}\",verdict=\"{verdict}\"}} {n}\n",
                escape(ns),
                escape(policy)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::compile::counters::Counted;
    use palisade_policy::model::Direction;

    fn values() -> HashMap<String, u64> {
        [("cnt_a".to_string(), 7), ("cnt_g".to_string(), 3)].into()
    }

    fn counter(name: &str, dir: Direction, verdict: Counted, policies: &[&str]) -> PolicyCounter {
        PolicyCounter {
            counter: name.into(),
            direction: dir,
            verdict,
            unit: Unit::Packets,
            policies: policies.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn report(counter: &str) -> CounterReport {
        CounterReport {
            described: vec![PolicyCounter {
                counter: counter.into(),
                direction: Direction::Ingress,
                verdict: Counted::Allow,
                unit: Unit::Packets,
                policies: vec!["ns/p".into()],
            }],
            carried: HashMap::new(),
        }
    }

    /// Answers the engine's next question with `report`.
    async fn answer(rx: &mut mpsc::Receiver<Msg>, report: CounterReport) {
        match rx.recv().await {
            Some(Msg::PolicyCounters(reply)) => {
                let _ = reply.send(report);
            }
            _ => panic!("the scrape asked nothing"),
        }
    }

    #[tokio::test]
    async fn a_scrape_takes_the_engine_s_answer_when_it_comes_in_time() {
        let (tx, mut rx) = mpsc::channel(8);
        let reports = Reports::new(tx, Duration::from_secs(30));
        let engine = tokio::spawn(async move { answer(&mut rx, report("cnt_a")).await });
        let got = reports.latest().await.expect("an answer");
        assert_eq!(got.described[0].counter, "cnt_a");
        engine.await.unwrap();
    }

    /// A busy engine (a long compile) must not hold a scrape past its timeout: the scrape takes
    /// the last answer, leaves its question asked, and the next scrape finds the late answer
    /// without asking twice.
    #[tokio::test]
    async fn a_busy_engine_does_not_hold_a_scrape_which_takes_the_last_answer() {
        let (tx, mut rx) = mpsc::channel(8);
        let reports = Reports::new(tx, Duration::from_millis(20));
        // Nobody answers: no earlier answer either.
        assert!(reports.latest().await.is_none());
        let Some(Msg::PolicyCounters(first)) = rx.try_recv().ok() else {
            panic!("the scrape asked nothing");
        };
        // Still busy: the question stays asked, none is added.
        assert!(reports.latest().await.is_none());
        assert!(
            rx.try_recv().is_err(),
            "a second question while one is pending"
        );
        // The engine answers late: the next scrape has it.
        first.send(report("cnt_a")).unwrap();
        assert_eq!(
            reports.latest().await.unwrap().described[0].counter,
            "cnt_a"
        );
        // Busy again: the last answer serves.
        let got = reports.latest().await.expect("the last answer");
        assert_eq!(got.described[0].counter, "cnt_a");
        assert!(matches!(rx.try_recv(), Ok(Msg::PolicyCounters(_))));
    }

    #[test]
    fn an_earlier_answer_shows_only_the_counters_the_kernel_still_has() {
        let described = vec![
            counter("cnt_a", Direction::Ingress, Counted::Allow, &["ns/p"]),
            counter(
                "cnt_gone",
                Direction::Ingress,
                Counted::Allow,
                &["ns/deleted"],
            ),
        ];
        let text = render(&still_counting(&described, &values()), &values());
        assert!(text.contains("policy=\"p\""), "{text}");
        assert!(!text.contains("policy=\"deleted\""), "{text}");
    }

    #[test]
    fn counters_are_summed_per_policy_and_a_group_drop_counts_for_each_isolating_policy() {
        let described = [
            counter(
                "cnt_a",
                Direction::Ingress,
                Counted::Allow,
                &["shop/allow-fe"],
            ),
            counter(
                "cnt_g",
                Direction::Ingress,
                Counted::Drop,
                &["shop/allow-fe", "shop/deny-all"],
            ),
            counter("cnt_c", Direction::Egress, Counted::Pass, &["cnp:guard"]),
            PolicyCounter {
                unit: Unit::Connections,
                ..counter(
                    "cnt_g",
                    Direction::Ingress,
                    Counted::Drop,
                    &["shop/deny-all"],
                )
            },
        ];
        let text = render(&described, &values());
        for line in [
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="allow-fe",direction="ingress",verdict="allow"} 7"#,
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="allow-fe",direction="ingress",verdict="drop"} 3"#,
            r#"palisade_policy_packets_total{kind="NetworkPolicy",namespace="shop",policy="deny-all",direction="ingress",verdict="drop"} 3"#,
            r#"palisade_policy_packets_total{kind="ClusterNetworkPolicy",namespace="",policy="guard",direction="egress",verdict="pass"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.lines().any(|l| l == r#"palisade_policy_connections_total{kind="NetworkPolicy",namespace="shop",policy="deny-all",direction="ingress",verdict="drop"} 3"#), "{text}");
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 5);
        assert!(text.contains("# TYPE palisade_policy_packets_total counter"));
        assert!(text.contains("# TYPE palisade_policy_connections_total counter"));
    }

    #[test]
    fn counts_carried_over_full_replaces_keep_a_series_counting_up() {
        let described = [counter(
            "cnt_a",
            Direction::Ingress,
            Counted::Allow,
            &["shop/allow-fe"],
        )];
        let line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("palisade_policy_packets_total{"))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        let mut carried = Carried::default();
        // 7 counted, then a replace (the kernel starts from zero), 2 counted since.
        carried.replaced(values());
        let kernel: HashMap<String, u64> = [("cnt_a".to_string(), 2)].into();
        let text = render(&described, &with_carried(kernel.clone(), carried.values()));
        assert_eq!(line(&text).as_deref(), Some("9"), "{text}");
        // Another replace with 2 counted: 7 + 2 carried.
        carried.replaced(kernel);
        assert_eq!(carried.values()["cnt_a"], 9);
        // The policy went: its counter's carried count goes; created again, it starts from zero.
        carried.retain(|n| n != "cnt_a");
        assert!(!carried.values().contains_key("cnt_a"));
        assert_eq!(carried.values()["cnt_g"], 3);
        let text = render(&described, &with_carried(HashMap::new(), carried.values()));
        assert_eq!(line(&text).as_deref(), Some("0"), "{text}");
    }

    #[test]
    fn a_policy_without_a_counter_has_no_series() {
        let text = render(&[], &values());
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 0);
    }
}
