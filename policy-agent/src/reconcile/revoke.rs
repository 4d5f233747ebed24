//! The engine's conntrack sweeps: after a commit that narrows what pods may send or receive, the
//! established flows the committed ruleset would not admit as new are cut (`crate::conntrack`
//! judges and deletes); when, how soon, and how a sweep gives way to a change waiting.

use super::{Committed, Engine, SWEEP_GIVES_WAY};
use std::time::{Duration, Instant};
use tracing::warn;

impl Engine {
    /// After a commit: the wait before the full conntrack sweep it calls for (`None`: no sweep, as
    /// nothing was committed or established flows are kept). A commit that only moved addresses in
    /// or out of address sets first has the flows of those addresses that the last full sweep saw
    /// judged at once; its full sweep (for flows younger than that one) then waits for the credit
    /// and for [`crate::conntrack::YOUNG_FLOWS_GAP`] since the last one.
    pub(super) fn revoke_after(&mut self, commit: &Committed) -> Option<Duration> {
        if !self.policy_sweeps {
            return None;
        }
        let addrs = match commit {
            Committed::Nothing => return None,
            Committed::Rules => {
                self.revoker.as_ref()?;
                return Some(self.sweep_credit.wait(Instant::now()));
            }
            Committed::Addresses(addrs) => addrs,
        };
        let revoker = self.revoker.as_mut()?;
        let swept = revoker.sweep_targeted(self.inc.compiled(), addrs);
        let now = Instant::now();
        let credit = self.sweep_credit.wait(now);
        match swept {
            Ok(Some(report)) => {
                crate::conntrack::log_report(&report, &self.metrics);
                Some(credit.max(revoker.young_flows_wait(now)))
            }
            Ok(None) => Some(credit),
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot re-judge the known flows of the addresses a commit moved; a full sweep follows");
                Some(credit)
            }
        }
    }

    /// Cuts the established flows the committed ruleset would not admit as new (`conntrack`). The
    /// compiler's model may already hold changes staged after that commit (due within the debounce):
    /// a flow they revoke is cut a few milliseconds early, one they grant is kept.
    ///
    /// A change waiting in `waiting`'s messages is committed first: the sweep stops judging, cuts
    /// what it found so far and is due again after that commit, for up to [`SWEEP_GIVES_WAY`].
    pub(super) fn revoke(&mut self, waiting: &mut dyn FnMut() -> bool) {
        if self.inc.is_stale() || !self.policy_sweeps {
            self.sweep_owed_since = None;
            return; // the next commit schedules its own sweep
        }
        let Some(revoker) = self.revoker.as_mut() else {
            return;
        };
        let start = Instant::now();
        let owed = *self.sweep_owed_since.get_or_insert(start);
        let may_give_way = start.saturating_duration_since(owed) < SWEEP_GIVES_WAY;
        let swept = revoker.sweep(self.inc.compiled(), &mut || may_give_way && waiting());
        let now = Instant::now();
        self.sweep_credit.spend(now, now - start);
        match swept {
            Ok(report) => {
                crate::conntrack::log_report(&report, &self.metrics);
                if report.yielded {
                    self.sched.sweep_yielded(now);
                } else {
                    self.sweep_owed_since = None;
                }
            }
            Err(e) => {
                self.sweep_owed_since = None;
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot sweep conntrack; flows that lost permission live on until a later commit's sweep succeeds (the resync commits at least every --resync-seconds)");
            }
        }
    }

    /// Cuts flows cut earlier that came back in their reply direction while still denied.
    pub(super) fn recheck_revoked(&mut self) {
        if self.inc.is_stale() {
            return;
        }
        let Some(revoker) = self.revoker.as_mut() else {
            return;
        };
        if revoker.recheck_due().is_none_or(|d| Instant::now() < d) {
            return;
        }
        match revoker.recheck(self.inc.compiled()) {
            Ok(report) => crate::conntrack::log_report(&report, &self.metrics),
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot recheck revoked flows; one that came back in its reply direction lives on until the next sweep");
            }
        }
    }
}
