//! The agent's metrics: a `prometheus-client` registry, rendered by `server` in the Prometheus text
//! format (version 0.0.4).

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the reconcile duration histogram.
pub const RECONCILE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// What a source change did to the model; each always shown.
const SOURCE_RESULTS: [&str; 3] = ["changed", "unchanged", "rejected"];

/// What became of a packet the flow log was handed; each always shown.
const FLOW_LOG_RESULTS: [&str; 8] = [
    "dropped",
    "allowed",
    "would_drop",
    "repeat",
    "default_allowed",
    "lost",
    "unreadable",
    "kernel_overflow",
];

/// Sizes shown as gauges after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    pub pods: u64,
    pub policies: u64,
    pub chains: u64,
    pub rules: u64,
    pub sets: u64,
    pub set_elements: u64,
    pub pending: u64,
    pub cluster_policies: u64,
    /// Same-tier, same-priority ClusterNetworkPolicy pairs selecting one local pod.
    pub priority_ties: u64,
    /// NetworkPolicies refused on this node for their size (`--max-policy-*`).
    pub refused_policies: u64,
}

/// One label, `name="value"`.
type Label = [(&'static str, &'static str); 1];
type Count = Counter<u64, AtomicU64>;
type Level = Gauge<u64, AtomicU64>;

/// Shared between the reconcile thread and the HTTP server. Every metric updates on its own (atomics;
/// a family or the histogram takes its own short lock), so no lock is held across a commit.
pub struct Metrics {
    registry: Registry,
    ready: Level,
    reconcile_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    /// Seconds the last full replace took.
    last_full: Gauge<f64, AtomicU64>,
    errors: Family<Label, Count>,
    restores: Count,
    lockdowns: Count,
    unheard: Count,
    /// Flows cut, by the kind of sweep that cut them (`full`, `targeted`).
    flows_cut: Family<Label, Count>,
    flows_unjudged: Count,
    /// Conntrack sweeps, by kind.
    sweeps: Family<Label, Count>,
    /// Seconds spent in conntrack sweeps, by kind.
    sweep_seconds: Family<Label, Counter<f64, AtomicU64>>,
    /// Conntrack entries the sweeps read, by kind.
    sweep_entries: Family<Label, Count>,
    transactions: Family<Label, Count>,
    /// Nodes' podCIDRs refused as routes, by reason.
    refused_pod_cidrs: Family<Label, Level>,
    /// Pod routes that failed at the last route sync.
    route_failures: Level,
    /// Source changes by what they did to the model: changed, unchanged, rejected.
    source_changes: Family<Label, Count>,
    /// Reconciles started (successful or not).
    reconciles: Count,
    /// Times the reconcile took the node lock.
    lock_acquisitions: Count,
    /// pods, policies, chains, rules, sets, set elements, pending, cluster policies, priority ties
    /// (in `Sizes` order).
    sizes: [Level; 10],
    http_open: Level,
    http_closed: Family<Label, Count>,
    /// Flow-log packets by what became of them (`FLOW_LOG_RESULTS`).
    flow_log: Family<Label, Count>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` under `name`; `help` is a sentence without its final period (the registry
/// adds it).
fn reg<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: &M) {
    r.register(name, help, metric.clone());
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            ready: Level::default(),
            reconcile_duration: Histogram::new(RECONCILE_BUCKETS),
            last_sync: Gauge::default(),
            last_full: Gauge::default(),
            errors: Family::default(),
            restores: Count::default(),
            lockdowns: Count::default(),
            unheard: Count::default(),
            flows_cut: Family::default(),
            flows_unjudged: Count::default(),
            sweeps: Family::default(),
            sweep_seconds: Family::default(),
            sweep_entries: Family::default(),
            transactions: Family::default(),
            refused_pod_cidrs: Family::default(),
            route_failures: Level::default(),
            source_changes: Family::default(),
            reconciles: Count::default(),
            lock_acquisitions: Count::default(),
            sizes: Default::default(),
            http_open: Level::default(),
            http_closed: Family::default(),
            flow_log: Family::default(),
            registry: Registry::default(),
        };
        // Counters are registered without `_total`: the encoder appends it (to `# HELP`, `# TYPE` and
        // the samples), and registering a name ending in `_total` panics in debug builds.
        reg(
            &mut r,
            "palisade_ready",
            "1 once the first sync was committed",
            &m.ready,
        );
        reg(
            &mut r,
            "palisade_reconcile_duration_seconds",
            "Time from reading state to committed transaction",
            &m.reconcile_duration,
        );
        reg(
            &mut r,
            "palisade_last_successful_sync_timestamp_seconds",
            "Unix time of the last committed transaction",
            &m.last_sync,
        );
        reg(
            &mut r,
            "palisade_last_full_replace_seconds",
            "How long the last full replace of our table took (at start, at a restore, at a periodic resync): what the next one will cost",
            &m.last_full,
        );
        reg(&mut r, "palisade_errors", "Errors by kind", &m.errors);
        reg(
            &mut r,
            "palisade_resync_restores",
            "Times our table was found changed or removed behind our back and restored",
            &m.restores,
        );
        reg(
            &mut r,
            "palisade_restore_lockdowns",
            "Lockdown tables committed ahead of a full restore: from then until the restore committed, every new connection of this node's pods was dropped",
            &m.lockdowns,
        );
        reg(
            &mut r,
            "palisade_unheard_commits",
            "Large commits of ours during which another process's transaction landed unseen (the drift monitor was out of the notification group): our table was replaced in full, as what that transaction changed is unknown. Not by itself a sign of tampering (kube-proxy commits often)",
            &m.unheard,
        );
        reg(
            &mut r,
            "palisade_conntrack_flows_cut",
            "Established flows cut because the ruleset no longer admits them, by the sweep that cut them (full: a walk of the conntrack table; targeted: the known flows of the addresses a commit moved; recheck: a cut flow that came back in its reply direction; released: the flows of an address whose pod went away)",
            &m.flows_cut,
        );
        reg(
            &mut r,
            "palisade_conntrack_sweeps",
            "Conntrack sweeps, by kind (full: a walk of the whole conntrack table; targeted: the known flows of the addresses a commit moved; recheck: lookups of cut flows' comebacks)",
            &m.sweeps,
        );
        reg(
            &mut r,
            "palisade_conntrack_sweep_seconds",
            "Time the conntrack sweeps took, by kind, on the thread that commits (its rate is the share of that thread revocation takes; a full sweep gives way to a change waiting to be committed)",
            &m.sweep_seconds,
        );
        reg(
            &mut r,
            "palisade_conntrack_sweep_entries",
            "Conntrack entries the sweeps read, by kind (full: every entry of the node's table, a pod's or not; targeted and recheck: the entries looked up)",
            &m.sweep_entries,
        );
        reg(
            &mut r,
            "palisade_conntrack_flows_unjudged",
            "Conntrack entries a sweep could not judge and left alone",
            &m.flows_unjudged,
        );
        reg(
            &mut r,
            "palisade_transactions",
            "Committed nft transactions by kind",
            &m.transactions,
        );
        reg(&mut r, "palisade_refused_pod_cidrs", "Nodes' podCIDRs refused as routes (too wide, outside the cluster CIDR, holding a node's address, overlapping, or of a Node that claims a pod's address), by reason", &m.refused_pod_cidrs);
        reg(
            &mut r,
            "palisade_pod_route_failures",
            "Pod routes that failed at the last route sync (retried with backoff)",
            &m.route_failures,
        );
        reg(&mut r, "palisade_source_changes", "Changes from the source by what they did to the model (unchanged: a status heartbeat, an ignored field; no work follows)", &m.source_changes);
        reg(
            &mut r,
            "palisade_reconciles",
            "Reconciles started",
            &m.reconciles,
        );
        reg(
            &mut r,
            "palisade_node_lock_acquisitions",
            "Times the agent took the node lock (the lock CNI ADD and DEL wait for)",
            &m.lock_acquisitions,
        );
        for (gauge, (name, help)) in m.sizes.iter().zip([
            ("palisade_pods", "Pods in the cluster state"),
            ("palisade_policies", "NetworkPolicies in the cluster state"),
            ("palisade_nft_chains", "Chains in our table"),
            ("palisade_nft_rules", "Rules in our table"),
            ("palisade_nft_sets", "Named sets and maps in our table (a full replace's kernel time grows with the square of their number)"),
            ("palisade_nft_set_elements", "Elements of our sets and maps"),
            ("palisade_pending_pods", "Addresses in the pending sets"),
            (
                "palisade_cluster_network_policies",
                "ClusterNetworkPolicies in the cluster state",
            ),
            (
                "palisade_cluster_network_policy_priority_ties",
                "Pairs of ClusterNetworkPolicies of one tier and priority that select the same pod of this node in one direction (evaluated by name; give them distinct priorities)",
            ),
            (
                "palisade_refused_policies",
                "NetworkPolicies refused on this node for their size (over --max-policy-pod-peers or --max-policy-peer-pods): they isolate the pods they select and allow them nothing; the agent's warnings name them",
            ),
        ]) {
            reg(&mut r, name, help, gauge);
        }
        let cap = crate::server::MAX_CONNECTIONS;
        reg(
            &mut r,
            "palisade_http_open_connections",
            &format!("Connections open to this endpoint (at most {cap})"),
            &m.http_open,
        );
        reg(&mut r, "palisade_http_closed_connections", &format!("Connections closed because {cap} were open: the oldest one without a request (evicted), or the new one when all were being answered (refused)"), &m.http_closed);
        reg(&mut r, "palisade_flow_log_packets", "Packets the kernel handed to the flow log, by what became of them: dropped, allowed and would_drop (a line written), repeat (a flow already logged within 10 s), default_allowed (admitted by no policy: not logged), lost (the writer was behind), unreadable, kernel_overflow (times the kernel dropped log messages: the socket was full)", &m.flow_log);
        // Label sets shown from the start, at 0.
        for kind in ["full", "incremental"] {
            let _ = m.transactions.get_or_create(&[("kind", kind)]);
        }
        for reason in crate::routes::RefusalReason::ALL {
            let _ = m
                .refused_pod_cidrs
                .get_or_create(&[("reason", reason.label())]);
        }
        for result in SOURCE_RESULTS {
            let _ = m.source_changes.get_or_create(&[("result", result)]);
        }
        for reason in ["evicted", "refused"] {
            let _ = m.http_closed.get_or_create(&[("reason", reason)]);
        }
        for result in FLOW_LOG_RESULTS {
            let _ = m.flow_log.get_or_create(&[("result", result)]);
        }
        Metrics { registry: r, ..m }
    }

    /// True once the first sync has been committed and the conflist step after it has run.
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// A successful commit: duration, kind, sizes, timestamp.
    pub fn commit_ok(&self, took: Duration, full: bool, sizes: Sizes) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.reconcile_duration.observe(took.as_secs_f64());
        self.last_sync.set(now);
        let Sizes {
            pods,
            policies,
            chains,
            rules,
            sets,
            set_elements,
            pending,
            cluster_policies,
            priority_ties,
            refused_policies,
        } = sizes;
        for (gauge, v) in self.sizes.iter().zip([
            pods,
            policies,
            chains,
            rules,
            sets,
            set_elements,
            pending,
            cluster_policies,
            priority_ties,
            refused_policies,
        ]) {
            gauge.set(v);
        }
        if full {
            self.last_full.set(took.as_secs_f64());
        }
        let kind = if full { "full" } else { "incremental" };
        self.transactions.get_or_create(&[("kind", kind)]).inc();
    }

    /// Marks the agent ready: a commit went in and the conflist was written after it (or cannot be
    /// yet, for a reason the log names: no Node, no podCIDRs), so a 200 from /readyz means pods
    /// can start here as far as the agent goes.
    pub fn set_ready(&self) {
        self.ready.set(1);
    }

    /// One error of `kind` (see `Error::kind`, plus `bad_object`, `nft_rejected`).
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// Our table was found changed or removed and was restored.
    pub fn restored(&self) {
        self.restores.inc();
    }

    /// The lockdown table was committed ahead of a full restore.
    pub fn locked_down(&self) {
        self.lockdowns.inc();
    }

    /// Another process's transaction landed unseen during a quiet commit of ours; the table was
    /// replaced in full to be sure.
    pub fn unheard(&self) {
        self.unheard.inc();
    }

    /// The Nodes' podCIDRs that get no route now, by reason.
    pub fn refused_pod_cidrs(&self, by_reason: BTreeMap<&'static str, u64>) {
        for reason in crate::routes::RefusalReason::ALL.map(|r| r.label()) {
            let n = by_reason.get(reason).copied().unwrap_or(0);
            self.refused_pod_cidrs
                .get_or_create(&[("reason", reason)])
                .set(n);
        }
    }

    /// Pod routes that could not be added or removed at the last route sync (retried with backoff).
    pub fn route_failures(&self, n: u64) {
        self.route_failures.set(n);
    }

    /// One change from a source: `changed`, `unchanged` (nothing we compile differs: no work
    /// follows) or `rejected` (invalid object).
    pub fn source_change(&self, result: &'static str) {
        self.source_changes
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// A reconcile started.
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    /// The reconcile took the node lock.
    pub fn lock_acquired(&self) {
        self.lock_acquisitions.inc();
    }

    /// A conntrack sweep of `kind` (`full`, `targeted`, `recheck`, `released`) deleted `cut` entries and left `unjudged`
    /// alone (could not judge them).
    pub fn flows_revoked(&self, kind: &'static str, cut: u64, unjudged: u64) {
        self.sweeps.get_or_create(&[("kind", kind)]).inc();
        self.flows_cut.get_or_create(&[("sweep", kind)]).inc_by(cut);
        self.flows_unjudged.inc_by(unjudged);
    }

    /// A conntrack sweep of `kind` read `entries` entries in `took`.
    pub fn sweep_cost(&self, kind: &'static str, took: Duration, entries: u64) {
        self.sweep_seconds
            .get_or_create(&[("kind", kind)])
            .inc_by(took.as_secs_f64());
        self.sweep_entries
            .get_or_create(&[("kind", kind)])
            .inc_by(entries);
    }

    /// Connections now open to the HTTP endpoint (`server`).
    pub fn http_open_connections(&self, n: usize) {
        self.http_open.set(n as u64);
    }

    /// A connection to the HTTP endpoint closed to make room: `evicted` or `refused` (`server`).
    pub fn http_connection_closed(&self, reason: &'static str) {
        self.http_closed.get_or_create(&[("reason", reason)]).inc();
    }

    /// `n` flow-log packets had `result` (one of `FLOW_LOG_RESULTS`).
    pub fn flow_log(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.flow_log.get_or_create(&[("result", result)]).inc_by(n);
        }
    }

    /// Prometheus text exposition; its content type is [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut o = String::new();
        if let Err(e) = encode(&mut o, &self.registry) {
            tracing::warn!(error = %e, "cannot render the metrics");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_and_histogram_follow_commits() {
        let m = Metrics::default();
        assert!(!m.is_ready());
        m.commit_ok(
            Duration::from_millis(3),
            true,
            Sizes {
                pods: 2,
                ..Sizes::default()
            },
        );
        assert!(
            !m.is_ready(),
            "a commit alone is not ready: the conflist step comes after it"
        );
        m.set_ready();
        m.error("nft");
        m.restored();
        assert!(m.is_ready());
        let t = m.render();
        assert!(
            t.contains("palisade_reconcile_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("palisade_reconcile_duration_seconds_bucket{le=\"0.001\"} 0"),
            "{t}"
        );
        assert!(t.contains("palisade_errors_total{kind=\"nft\"} 1"), "{t}");
        assert!(t.contains("palisade_resync_restores_total 1"), "{t}");
        assert!(t.contains("palisade_pods 2"), "{t}");
    }

    /// The text as the agent rendered it before prometheus-client (dashboards, tests and the
    /// benchmarks read these names, types, labels and help texts), up to the order of a family's
    /// label sets and the last sync's timestamp.
    const TEXT: &str = r#"# HELP palisade_ready 1 once the first sync was committed.
# TYPE palisade_ready gauge
palisade_ready 1
# HELP palisade_reconcile_duration_seconds Time from reading state to committed transaction.
# TYPE palisade_reconcile_duration_seconds histogram
palisade_reconcile_duration_seconds_bucket{le="0.0005"} 0
palisade_reconcile_duration_seconds_bucket{le="0.001"} 0
palisade_reconcile_duration_seconds_bucket{le="0.0025"} 0
palisade_reconcile_duration_seconds_bucket{le="0.005"} 1
palisade_reconcile_duration_seconds_bucket{le="0.01"} 1
palisade_reconcile_duration_seconds_bucket{le="0.025"} 1
palisade_reconcile_duration_seconds_bucket{le="0.05"} 1
palisade_reconcile_duration_seconds_bucket{le="0.1"} 1
palisade_reconcile_duration_seconds_bucket{le="0.25"} 1
palisade_reconcile_duration_seconds_bucket{le="0.5"} 1
palisade_reconcile_duration_seconds_bucket{le="1"} 2
palisade_reconcile_duration_seconds_bucket{le="5"} 2
palisade_reconcile_duration_seconds_bucket{le="+Inf"} 2
palisade_reconcile_duration_seconds_sum 0.7031999999999999
palisade_reconcile_duration_seconds_count 2
# HELP palisade_last_successful_sync_timestamp_seconds Unix time of the last committed transaction.
# TYPE palisade_last_successful_sync_timestamp_seconds gauge
palisade_last_successful_sync_timestamp_seconds T
# HELP palisade_last_full_replace_seconds How long the last full replace of our table took (at start, at a restore, at a periodic resync): what the next one will cost.
# TYPE palisade_last_full_replace_seconds gauge
palisade_last_full_replace_seconds 0.0032
# HELP palisade_errors_total Errors by kind.
# TYPE palisade_errors_total counter
palisade_errors_total{kind="nft"} 2
palisade_errors_total{kind="bad_object"} 1
# HELP palisade_resync_restores_total Times our table was found changed or removed behind our back and restored.
# TYPE palisade_resync_restores_total counter
palisade_resync_restores_total 1
# HELP palisade_restore_lockdowns_total Lockdown tables committed ahead of a full restore: from then until the restore committed, every new connection of this node's pods was dropped.
# TYPE palisade_restore_lockdowns_total counter
palisade_restore_lockdowns_total 1
# HELP palisade_unheard_commits_total Large commits of ours during which another process's transaction landed unseen (the drift monitor was out of the notification group): our table was replaced in full, as what that transaction changed is unknown. Not by itself a sign of tampering (kube-proxy commits often).
# TYPE palisade_unheard_commits_total counter
palisade_unheard_commits_total 1
# HELP palisade_conntrack_flows_cut_total Established flows cut because the ruleset no longer admits them, by the sweep that cut them (full: a walk of the conntrack table; targeted: the known flows of the addresses a commit moved; recheck: a cut flow that came back in its reply direction; released: the flows of an address whose pod went away).
# TYPE palisade_conntrack_flows_cut_total counter
palisade_conntrack_flows_cut_total{sweep="full"} 5
palisade_conntrack_flows_cut_total{sweep="targeted"} 2
# HELP palisade_conntrack_sweeps_total Conntrack sweeps, by kind (full: a walk of the whole conntrack table; targeted: the known flows of the addresses a commit moved; recheck: lookups of cut flows' comebacks).
# TYPE palisade_conntrack_sweeps_total counter
palisade_conntrack_sweeps_total{kind="full"} 1
palisade_conntrack_sweeps_total{kind="targeted"} 1
# HELP palisade_conntrack_sweep_seconds_total Time the conntrack sweeps took, by kind, on the thread that commits (its rate is the share of that thread revocation takes; a full sweep gives way to a change waiting to be committed).
# TYPE palisade_conntrack_sweep_seconds_total counter
palisade_conntrack_sweep_seconds_total{kind="full"} 0.25
# HELP palisade_conntrack_sweep_entries_total Conntrack entries the sweeps read, by kind (full: every entry of the node's table, a pod's or not; targeted and recheck: the entries looked up).
# TYPE palisade_conntrack_sweep_entries_total counter
palisade_conntrack_sweep_entries_total{kind="full"} 20000
# HELP palisade_conntrack_flows_unjudged_total Conntrack entries a sweep could not judge and left alone.
# TYPE palisade_conntrack_flows_unjudged_total counter
palisade_conntrack_flows_unjudged_total 1
# HELP palisade_transactions_total Committed nft transactions by kind.
# TYPE palisade_transactions_total counter
palisade_transactions_total{kind="incremental"} 1
palisade_transactions_total{kind="full"} 1
# HELP palisade_refused_pod_cidrs Nodes' podCIDRs refused as routes (too wide, outside the cluster CIDR, holding a node's address, overlapping, or of a Node that claims a pod's address), by reason.
# TYPE palisade_refused_pod_cidrs gauge
palisade_refused_pod_cidrs{reason="too_wide"} 2
palisade_refused_pod_cidrs{reason="outside_cluster_cidr"} 0
palisade_refused_pod_cidrs{reason="contains_node_address"} 0
palisade_refused_pod_cidrs{reason="overlaps_own_node"} 1
palisade_refused_pod_cidrs{reason="overlaps_other_node"} 0
palisade_refused_pod_cidrs{reason="node_address_in_pod_network"} 0
# HELP palisade_pod_route_failures Pod routes that failed at the last route sync (retried with backoff).
# TYPE palisade_pod_route_failures gauge
palisade_pod_route_failures 2
# HELP palisade_source_changes_total Changes from the source by what they did to the model (unchanged: a status heartbeat, an ignored field; no work follows).
# TYPE palisade_source_changes_total counter
palisade_source_changes_total{result="changed"} 1
palisade_source_changes_total{result="rejected"} 0
palisade_source_changes_total{result="unchanged"} 2
# HELP palisade_reconciles_total Reconciles started.
# TYPE palisade_reconciles_total counter
palisade_reconciles_total 1
# HELP palisade_node_lock_acquisitions_total Times the agent took the node lock (the lock CNI ADD and DEL wait for).
# TYPE palisade_node_lock_acquisitions_total counter
palisade_node_lock_acquisitions_total 1
# HELP palisade_pods Pods in the cluster state.
# TYPE palisade_pods gauge
palisade_pods 3
# HELP palisade_policies NetworkPolicies in the cluster state.
# TYPE palisade_policies gauge
palisade_policies 2
# HELP palisade_nft_chains Chains in our table.
# TYPE palisade_nft_chains gauge
palisade_nft_chains 4
# HELP palisade_nft_rules Rules in our table.
# TYPE palisade_nft_rules gauge
palisade_nft_rules 28
# HELP palisade_nft_sets Named sets and maps in our table (a full replace's kernel time grows with the square of their number).
# TYPE palisade_nft_sets gauge
palisade_nft_sets 5
# HELP palisade_nft_set_elements Elements of our sets and maps.
# TYPE palisade_nft_set_elements gauge
palisade_nft_set_elements 6
# HELP palisade_pending_pods Addresses in the pending sets.
# TYPE palisade_pending_pods gauge
palisade_pending_pods 1
# HELP palisade_cluster_network_policies ClusterNetworkPolicies in the cluster state.
# TYPE palisade_cluster_network_policies gauge
palisade_cluster_network_policies 2
# HELP palisade_cluster_network_policy_priority_ties Pairs of ClusterNetworkPolicies of one tier and priority that select the same pod of this node in one direction (evaluated by name; give them distinct priorities).
# TYPE palisade_cluster_network_policy_priority_ties gauge
palisade_cluster_network_policy_priority_ties 1
# HELP palisade_refused_policies NetworkPolicies refused on this node for their size (over --max-policy-pod-peers or --max-policy-peer-pods): they isolate the pods they select and allow them nothing; the agent's warnings name them.
# TYPE palisade_refused_policies gauge
palisade_refused_policies 1
# HELP palisade_http_open_connections Connections open to this endpoint (at most 64).
# TYPE palisade_http_open_connections gauge
palisade_http_open_connections 0
# HELP palisade_http_closed_connections_total Connections closed because 64 were open: the oldest one without a request (evicted), or the new one when all were being answered (refused).
# TYPE palisade_http_closed_connections_total counter
palisade_http_closed_connections_total{reason="refused"} 0
palisade_http_closed_connections_total{reason="evicted"} 0
# HELP palisade_flow_log_packets_total Packets the kernel handed to the flow log, by what became of them: dropped, allowed and would_drop (a line written), repeat (a flow already logged within 10 s), default_allowed (admitted by no policy: not logged), lost (the writer was behind), unreadable, kernel_overflow (times the kernel dropped log messages: the socket was full).
# TYPE palisade_flow_log_packets_total counter
palisade_flow_log_packets_total{result="dropped"} 2
palisade_flow_log_packets_total{result="allowed"} 0
palisade_flow_log_packets_total{result="would_drop"} 0
palisade_flow_log_packets_total{result="repeat"} 1
palisade_flow_log_packets_total{result="default_allowed"} 0
palisade_flow_log_packets_total{result="lost"} 0
palisade_flow_log_packets_total{result="unreadable"} 0
palisade_flow_log_packets_total{result="kernel_overflow"} 0
"#;

    #[test]
    fn the_text_keeps_every_name_type_label_and_help() {
        let m = Metrics::default();
        m.reconcile_started();
        m.lock_acquired();
        m.commit_ok(Duration::from_millis(700), false, Sizes::default());
        m.commit_ok(
            Duration::from_micros(3200),
            true,
            Sizes {
                pods: 3,
                policies: 2,
                chains: 4,
                rules: 28,
                sets: 5,
                set_elements: 6,
                pending: 1,
                cluster_policies: 2,
                priority_ties: 1,
                refused_policies: 1,
            },
        );
        m.set_ready();
        m.error("nft");
        m.error("bad_object");
        m.error("nft");
        m.restored();
        m.locked_down();
        m.unheard();
        m.refused_pod_cidrs([("too_wide", 2), ("overlaps_own_node", 1)].into());
        m.route_failures(2);
        m.flows_revoked("full", 5, 1);
        m.flows_revoked("targeted", 2, 0);
        m.sweep_cost("full", Duration::from_millis(250), 20_000);
        m.source_change("changed");
        m.source_change("unchanged");
        m.source_change("unchanged");
        m.flow_log("dropped", 2);
        m.flow_log("repeat", 1);
        m.flow_log("lost", 0);
        let text = m.render();
        let stamp = "palisade_last_successful_sync_timestamp_seconds ";
        let mut got: Vec<&str> = text
            .lines()
            .map(|l| {
                if l.starts_with(stamp) {
                    "palisade_last_successful_sync_timestamp_seconds T"
                } else {
                    l
                }
            })
            .collect();
        let mut want: Vec<&str> = TEXT.lines().collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "{text}");
    }
}
