//! What a sweep did: the flows it cut and why, its counts; logged and counted in the metrics.

use crate::metrics::Metrics;
use palisade_policy::compile::admit::{Admission, Flow};
use std::time::Duration;

/// One flow cut, with what denied it (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub flow: Flow,
    pub why: Admission,
}

/// What one [`super::Revoker::sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries in the dumps.
    pub scanned: u64,
    /// Entries involving a local pod or pending address (judged).
    pub judged: u64,
    /// Entries deleted.
    pub cut: Vec<Cut>,
    /// Entries to delete that were already gone.
    pub gone: u64,
    /// Entries left alone because they could not be judged (or a delete failed).
    pub unjudged: u64,
    pub took: Duration,
    pub kind: SweepKind,
    /// A full sweep that gave way to waiting work before its end (the entries after that point
    /// not judged; the sweep is owed again).
    pub yielded: bool,
}

/// What a sweep looked at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SweepKind {
    /// A dump of the whole conntrack table.
    #[default]
    Full,
    /// The known flows of the addresses a commit moved ([`super::Revoker::sweep_targeted`]).
    Targeted,
    /// The comebacks of flows cut earlier ([`super::Revoker::recheck`]).
    Recheck,
}

impl SweepReport {
    /// `full`, `targeted` or `recheck`, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            SweepKind::Full => "full",
            SweepKind::Targeted => "targeted",
            SweepKind::Recheck => "recheck",
        }
    }
}

/// At most this many cut flows are logged one by one per sweep (the rest are counted).
const LOG_FLOWS_MAX: usize = 20;

/// Logs a sweep (each cut flow with the pod and policies that denied it, at info) and counts it.
pub fn log_report(report: &SweepReport, metrics: &Metrics) {
    metrics.flows_revoked(report.kind(), report.cut.len() as u64, report.unjudged);
    metrics.sweep_cost(report.kind(), report.took, report.scanned);
    let took_ms = report.took.as_secs_f64() * 1e3;
    if report.cut.is_empty() {
        tracing::debug!(
            took_ms,
            scanned = report.scanned,
            judged = report.judged,
            unjudged = report.unjudged,
            sweep = report.kind(),
            gave_way = report.yielded,
            "conntrack sweep: no established flow lost its permission"
        );
        return;
    }
    for c in report.cut.iter().take(LOG_FLOWS_MAX) {
        let proto = c.flow.proto.map_or("other", |p| p.as_api());
        let (src, dst, port) = (c.flow.src, c.flow.dst, c.flow.port);
        match &c.why {
            Admission::Denied {
                direction,
                pod,
                policies,
            } => tracing::info!(
                %src, %dst, proto, port, %pod, direction = %direction, policies = %policies.join(","),
                "established flow cut: the policies isolating the pod no longer allow it"
            ),
            Admission::Pending(ip) => tracing::info!(
                %src, %dst, proto, port, pending = %ip,
                "established flow cut: the address is pending (its pod is not known to the agent)"
            ),
            Admission::Admitted => {}
        }
    }
    tracing::info!(
        cut = report.cut.len(),
        not_logged = report.cut.len().saturating_sub(LOG_FLOWS_MAX),
        already_gone = report.gone,
        unjudged = report.unjudged,
        scanned = report.scanned,
        took_ms,
        sweep = report.kind(),
        gave_way = report.yielded,
        "established flows that lost their permission were cut; their next packets meet the rules"
    );
}
