//! The agent's metrics, rendered in the Prometheus text format by `server`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds (seconds) of the reconcile duration histogram.
pub const RECONCILE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Sizes shown as gauges after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    pub pods: u64,
    pub policies: u64,
    pub chains: u64,
    pub rules: u64,
    pub set_elements: u64,
    pub pending: u64,
}

#[derive(Default)]
struct Inner {
    buckets: [u64; RECONCILE_BUCKETS.len()],
    count: u64,
    sum: f64,
    last_sync: Option<f64>,
    errors: BTreeMap<&'static str, u64>,
    restores: u64,
    flows_cut: u64,
    flows_unjudged: u64,
    full_replaces: u64,
    incremental: u64,
    sizes: Sizes,
    /// Other Nodes' podCIDRs refused as routes, by reason (see `routes::RefusalReason::label`).
    refused_pod_cidrs: BTreeMap<&'static str, u64>,
    /// Pod routes that failed at the last route sync.
    route_failures: u64,
    /// Source changes by what they did to the model: changed, unchanged, rejected.
    source_changes: BTreeMap<&'static str, u64>,
    /// Reconciles started (successful or not).
    reconciles: u64,
    /// Times the reconcile took the node lock.
    lock_acquisitions: u64,
}

/// Shared between the reconcile thread and the HTTP server.
#[derive(Default)]
pub struct Metrics {
    ready: AtomicBool,
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        // A poisoned lock only means a panic elsewhere; metrics stay usable.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    /// True once the first sync has been committed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// A successful commit: duration, kind, sizes, timestamp; marks the agent ready.
    pub fn commit_ok(&self, took: Duration, full: bool, sizes: Sizes) {
        let secs = took.as_secs_f64();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.with(|m| {
            for (i, le) in RECONCILE_BUCKETS.iter().enumerate() {
                if secs <= *le {
                    m.buckets[i] += 1;
                }
            }
            m.count += 1;
            m.sum += secs;
            m.last_sync = Some(now);
            m.sizes = sizes;
            if full {
                m.full_replaces += 1;
            } else {
                m.incremental += 1;
            }
        });
        self.ready.store(true, Ordering::Relaxed);
    }

    /// One error of `kind` (see `Error::kind`, plus `bad_object`, `nft_rejected`).
    pub fn error(&self, kind: &'static str) {
        self.with(|m| *m.errors.entry(kind).or_default() += 1);
    }

    /// Our table was found changed or removed and was restored.
    pub fn restored(&self) {
        self.with(|m| m.restores += 1);
    }

    /// The podCIDRs of other Nodes that get no route now, by reason.
    pub fn refused_pod_cidrs(&self, by_reason: BTreeMap<&'static str, u64>) {
        self.with(|m| m.refused_pod_cidrs = by_reason);
    }

    /// Pod routes that could not be added or removed at the last route sync (retried with backoff).
    pub fn route_failures(&self, n: u64) {
        self.with(|m| m.route_failures = n);
    }

    /// One change from a source: `changed`, `unchanged` (nothing we compile differs: no work
    /// follows) or `rejected` (invalid object).
    pub fn source_change(&self, result: &'static str) {
        self.with(|m| *m.source_changes.entry(result).or_default() += 1);
    }

    /// A reconcile started.
    pub fn reconcile_started(&self) {
        self.with(|m| m.reconciles += 1);
    }

    /// The reconcile took the node lock.
    pub fn lock_acquired(&self) {
        self.with(|m| m.lock_acquisitions += 1);
    }

    /// A conntrack sweep deleted `cut` entries and left `unjudged` alone (could not judge them).
    pub fn flows_revoked(&self, cut: u64, unjudged: u64) {
        self.with(|m| {
            m.flows_cut += cut;
            m.flows_unjudged += unjudged;
        });
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let ready = self.is_ready();
        self.with(|m| {
            let _ = writeln!(o, "# HELP palisade_ready 1 once the first sync was committed.\n# TYPE palisade_ready gauge\npalisade_ready {}", u8::from(ready));
            let _ = writeln!(o, "# HELP palisade_reconcile_duration_seconds Time from reading state to committed transaction.\n# TYPE palisade_reconcile_duration_seconds histogram");
            for (i, le) in RECONCILE_BUCKETS.iter().enumerate() {
                let _ = writeln!(o, "palisade_reconcile_duration_seconds_bucket{{le=\"{le}\"}} {}", m.buckets[i]);
            }
            let _ = writeln!(o, "palisade_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}", m.count);
            let _ = writeln!(o, "palisade_reconcile_duration_seconds_sum {}\npalisade_reconcile_duration_seconds_count {}", m.sum, m.count);
            let _ = writeln!(o, "# HELP palisade_last_successful_sync_timestamp_seconds Unix time of the last committed transaction.\n# TYPE palisade_last_successful_sync_timestamp_seconds gauge");
            let _ = writeln!(o, "palisade_last_successful_sync_timestamp_seconds {}", m.last_sync.unwrap_or(0.0));
            let _ = writeln!(o, "# HELP palisade_errors_total Errors by kind.\n# TYPE palisade_errors_total counter");
            for (k, v) in &m.errors {
                let _ = writeln!(o, "palisade_errors_total{{kind=\"{k}\"}} {v}");
            }
            let _ = writeln!(o, "# HELP palisade_resync_restores_total Times our table was found changed or removed behind our back and restored.\n# TYPE palisade_resync_restores_total counter\npalisade_resync_restores_total {}", m.restores);
            let _ = writeln!(o, "# HELP palisade_conntrack_flows_cut_total Established flows cut because the ruleset no longer admits them.\n# TYPE palisade_conntrack_flows_cut_total counter\npalisade_conntrack_flows_cut_total {}", m.flows_cut);
            let _ = writeln!(o, "# HELP palisade_conntrack_flows_unjudged_total Conntrack entries a sweep could not judge and left alone.\n# TYPE palisade_conntrack_flows_unjudged_total counter\npalisade_conntrack_flows_unjudged_total {}", m.flows_unjudged);
            let _ = writeln!(o, "# HELP palisade_transactions_total Committed nft transactions by kind.\n# TYPE palisade_transactions_total counter");
            let _ = writeln!(o, "palisade_transactions_total{{kind=\"full\"}} {}\npalisade_transactions_total{{kind=\"incremental\"}} {}", m.full_replaces, m.incremental);
            let _ = writeln!(o, "# HELP palisade_refused_pod_cidrs Other Nodes' podCIDRs refused as routes (too wide, outside the cluster CIDR, overlapping), by reason.\n# TYPE palisade_refused_pod_cidrs gauge");
            for reason in ["too_wide", "outside_cluster_cidr", "contains_node_address", "overlaps_own_node", "overlaps_other_node"] {
                let v = m.refused_pod_cidrs.get(reason).copied().unwrap_or(0);
                let _ = writeln!(o, "palisade_refused_pod_cidrs{{reason=\"{reason}\"}} {v}");
            }
            let _ = writeln!(o, "# HELP palisade_pod_route_failures Pod routes that failed at the last route sync (retried with backoff).\n# TYPE palisade_pod_route_failures gauge\npalisade_pod_route_failures {}", m.route_failures);
            let _ = writeln!(o, "# HELP palisade_source_changes_total Changes from the source by what they did to the model (unchanged: a status heartbeat, an ignored field; no work follows).\n# TYPE palisade_source_changes_total counter");
            for result in ["changed", "unchanged", "rejected"] {
                let v = m.source_changes.get(result).copied().unwrap_or(0);
                let _ = writeln!(o, "palisade_source_changes_total{{result=\"{result}\"}} {v}");
            }
            let _ = writeln!(o, "# HELP palisade_reconciles_total Reconciles started.\n# TYPE palisade_reconciles_total counter\npalisade_reconciles_total {}", m.reconciles);
            let _ = writeln!(o, "# HELP palisade_node_lock_acquisitions_total Times the agent took the node lock (the lock CNI ADD and DEL wait for).\n# TYPE palisade_node_lock_acquisitions_total counter\npalisade_node_lock_acquisitions_total {}", m.lock_acquisitions);
            let s = m.sizes;
            for (name, help, v) in [
                ("palisade_pods", "Pods in the cluster state.", s.pods),
                ("palisade_policies", "NetworkPolicies in the cluster state.", s.policies),
                ("palisade_nft_chains", "Chains in our table.", s.chains),
                ("palisade_nft_rules", "Rules in our table.", s.rules),
                ("palisade_nft_set_elements", "Elements of our sets and maps.", s.set_elements),
                ("palisade_pending_pods", "Addresses in the pending sets.", s.pending),
            ] {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
        });
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
}
