//! Reading our table back after commits, and judging what is found: the fingerprint the resync
//! compares, and the counts a snapshot checks. The engine asks; this room lists (on a thread of its
//! own when it can) and answers with a [`Verdict`].

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::nft::{Nft, TableSummary};
use crate::reconcile::Msg;
use palisade_policy::ruleset::RulesetStats;
use tokio::sync::mpsc::Sender;
use tracing::{debug, warn};

/// Niceness of the snapshot thread and its `nft` processes (the lowest priority).
const SNAPSHOT_NICE: libc::c_int = 19;

/// What a listing that found no table says.
const TABLE_REMOVED: &str = "table inet palisade was removed (nft flush ruleset?)";

/// What a look at our table found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// As committed (or nothing to judge: no commit yet, a listing failed, an answer is pending).
    Fine,
    /// Changed or removed behind our back: restore it (says what was found).
    Restore(String),
    /// The listing was taken before the newest commit: take another one later.
    Stale,
}

/// What a listing of our table found: its summary, `None` without the table.
pub type Listing = std::result::Result<Option<TableSummary>, ListingError>;

/// Why a listing of our table gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingError {
    pub message: String,
    /// The ruleset kept changing while it was listed (commits came in between every try):
    /// nothing is wrong, a later listing may settle.
    pub unsettled: bool,
}

impl From<crate::error::Error> for ListingError {
    fn from(e: crate::error::Error) -> Self {
        let unsettled = matches!(&e, crate::error::Error::NftRun(n) if n.is_unsettled());
        ListingError {
            message: e.to_string(),
            unsettled,
        }
    }
}

/// Summarises our table (the one way every listing here is taken).
fn list() -> Listing {
    Nft::summarize_table().map_err(ListingError::from)
}

/// A listing asked of the reader thread: for commit `generation`, and whether it is the resync's
/// check (judged by fingerprint) rather than a post-commit snapshot (judged by counts).
#[derive(Debug, Clone, Copy)]
struct Request {
    generation: u64,
    check: bool,
}

/// What we committed last, and what our table looked like after it.
#[derive(Default)]
pub struct TableWatch {
    /// Lists our table off the reconcile thread, so a read-back of a large table never delays a
    /// commit. Without it (tests of the engine alone) snapshots are taken inline.
    reader: Option<std::sync::mpsc::Sender<Request>>,
    /// Counts commits; a snapshot listed for an older generation is stale and dropped.
    generation: u64,
    /// Sizes of the ruleset last committed (the compiler may hold changes staged since, not yet
    /// committed): what a snapshot's counts are judged against.
    committed: Option<RulesetStats>,
    /// What our table looked like after the last commits; `None` while unknown.
    expected: Option<TableSummary>,
}

impl TableWatch {
    /// Takes post-commit snapshots on a thread of their own, answering on `reply`. Listing a
    /// table of 100k elements takes tens of ms at 10k pods: on the reconcile thread that delayed
    /// any change arriving meanwhile (the enforcement-latency tail).
    pub fn with_reader(reply: Sender<Msg>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Lowest CPU priority for this thread (Linux niceness is per thread; the kernel's
                // dump work runs in its syscalls): on a busy node the read-back must not compete
                // with commits.
                // SAFETY: setpriority on the calling thread (who 0) with a constant value.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SNAPSHOT_NICE) } != 0 {
                    debug!(
                        "cannot lower the snapshot thread's priority; it runs at normal priority"
                    );
                }
                while let Ok(mut req) = rx.recv() {
                    // Only the newest generation matters; one listing answers a check and a
                    // snapshot asked meanwhile alike.
                    while let Ok(r) = rx.try_recv() {
                        req = Request {
                            generation: r.generation,
                            check: req.check || r.check,
                        };
                    }
                    let listing = list();
                    if reply
                        .blocking_send(Msg::Snapshot {
                            generation: req.generation,
                            listing,
                            check: req.check,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("spawn snapshot thread", "reconcile", e))?;
        Ok(TableWatch {
            reader: Some(tx),
            ..TableWatch::default()
        })
    }

    /// A transaction of ruleset `stats` was committed: what the table looked like is unknown until
    /// the next snapshot.
    pub fn committed(&mut self, stats: RulesetStats) {
        self.generation += 1;
        self.expected = None;
        self.committed = Some(stats);
    }

    /// The table is about to be replaced: forget what it looked like.
    pub fn forget(&mut self) {
        self.expected = None;
    }

    /// Reads our table back: asks the reader when there is one (the answer arrives as
    /// [`Msg::Snapshot`], then [`Self::listed`] judges it), else lists inline and judges at once.
    pub fn snapshot(&mut self, metrics: &Metrics) -> Verdict {
        if self.ask_reader(false) {
            return Verdict::Fine;
        }
        let listing = Self::list_inline(metrics);
        self.listed(self.generation, listing)
    }

    /// Lists our table on the calling thread, a failure counted.
    fn list_inline(metrics: &Metrics) -> Listing {
        list().inspect_err(|e| {
            if !e.unsettled {
                metrics.error("nft");
            }
        })
    }

    /// Judges a listing of our table taken for commit `generation`. Chains, rules and sets map one
    /// to one from our ruleset, so a count that differs already means someone changed the table.
    pub fn listed(&mut self, generation: u64, listing: Listing) -> Verdict {
        if generation != self.generation {
            return Verdict::Stale;
        }
        let Some(stats) = self.committed else {
            return Verdict::Fine;
        };
        match listing {
            Ok(Some(s))
                if (s.chains, s.rules, s.sets)
                    == (stats.chains as u64, stats.rules as u64, stats.sets as u64) =>
            {
                self.expected = Some(s);
                Verdict::Fine
            }
            Ok(Some(s)) => Verdict::Restore(format!(
                "found {} chains, {} rules, {} sets where we committed {}, {}, {}",
                s.chains, s.rules, s.sets, stats.chains, stats.rules, stats.sets
            )),
            Ok(None) => Verdict::Restore(TABLE_REMOVED.into()),
            Err(e) if e.unsettled => {
                debug!(error = %e.message, "our table kept changing while it was read back; the next commit's read-back tries again");
                Verdict::Fine
            }
            Err(e) => {
                warn!(error = %e.message, "cannot read back our table");
                Verdict::Fine
            }
        }
    }

    /// Asks the reader thread for a listing; false when there is none (or it is gone: from then
    /// on listings are taken inline).
    fn ask_reader(&mut self, check: bool) -> bool {
        if let Some(reader) = &self.reader {
            let generation = self.generation;
            if reader.send(Request { generation, check }).is_ok() {
                return true;
            }
            self.reader = None;
        }
        false
    }

    /// At resync, without waiting: asks the reader thread to list our table for the check (the
    /// answer arrives as [`Msg::Snapshot`] with `check`, then [`Self::checked`] judges it); false
    /// when there is no reader, and the caller checks inline ([`Self::check`]). At 100k pods the
    /// listing takes ~0.8 s, which on the reconcile thread every change arriving meanwhile waited
    /// for.
    pub fn request_check(&mut self) -> bool {
        self.ask_reader(true)
    }

    /// At resync, inline: lists our table and judges it as [`Self::checked`] does.
    pub fn check(&mut self, metrics: &Metrics) -> Verdict {
        let listing = Self::list_inline(metrics);
        self.checked(self.generation, listing)
    }

    /// Judges the resync's listing of our table, taken for commit `generation`: its fingerprint
    /// against the one taken after the last commits; when no snapshot has been taken since, by
    /// the counts, as a snapshot is (and its fingerprint is kept). A listing from before a later
    /// commit is stale (the next resync checks again).
    pub fn checked(&mut self, generation: u64, listing: Listing) -> Verdict {
        if generation != self.generation {
            return Verdict::Stale;
        }
        let found = match listing {
            Ok(Some(s)) => s,
            Ok(None) => return Verdict::Restore(TABLE_REMOVED.into()),
            Err(e) if e.unsettled => {
                debug!(error = %e.message, "our table kept changing while it was listed (commits under churn); checked again at the next resync");
                return Verdict::Fine;
            }
            Err(e) => {
                warn!(error = %e.message, "cannot list or parse our table to verify it; checked again at the next resync");
                return Verdict::Fine;
            }
        };
        match self.expected {
            None => self.listed(generation, Ok(Some(found))),
            Some(exp) if exp.fingerprint != found.fingerprint => Verdict::Restore(format!(
                "found {} chains, {} rules, {} elements where we had {}, {}, {} (pending excluded)",
                found.chains,
                found.rules,
                found.elements - found.pending,
                exp.chains,
                exp.rules,
                exp.elements - exp.pending
            )),
            _ => Verdict::Fine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> ListingError {
        ListingError {
            message: "nft failed".into(),
            unsettled: false,
        }
    }

    #[test]
    fn a_listing_given_up_under_churn_is_unsettled_and_other_failures_are_not() {
        let unsettled = ListingError::from(crate::error::Error::NftRun(
            palisade_nft::Error::Unsettled {
                action: "summarize table",
                attempts: 8,
            },
        ));
        assert!(unsettled.unsettled, "{unsettled:?}");
        let other =
            ListingError::from(crate::error::Error::NftRun(palisade_nft::Error::Protocol {
                action: "summarize table",
                message: "truncated".into(),
            }));
        assert!(!other.unsettled);
        let mut w = TableWatch::default();
        w.committed(palisade_policy::ruleset::RulesetStats::default());
        assert_eq!(w.checked(1, Err(unsettled)), Verdict::Fine);
    }

    fn summary(chains: u64, rules: u64, sets: u64, fingerprint: u64) -> TableSummary {
        TableSummary {
            fingerprint,
            chains,
            rules,
            sets,
            ..TableSummary::default()
        }
    }

    fn stats(chains: usize, rules: usize, sets: usize) -> RulesetStats {
        RulesetStats {
            chains,
            rules,
            sets,
            ..RulesetStats::default()
        }
    }

    #[test]
    fn a_snapshot_is_judged_by_the_counts_of_the_last_commit_and_an_old_one_is_stale() {
        let mut w = TableWatch::default();
        assert_eq!(
            w.listed(0, Ok(Some(summary(1, 1, 1, 7)))),
            Verdict::Fine,
            "nothing committed"
        );
        w.committed(stats(3, 10, 2));
        assert_eq!(w.listed(0, Ok(Some(summary(3, 10, 2, 7)))), Verdict::Stale);
        assert_eq!(w.listed(1, Ok(Some(summary(3, 10, 2, 7)))), Verdict::Fine);
        assert!(
            matches!(w.listed(1, Ok(Some(summary(3, 9, 2, 7)))), Verdict::Restore(m) if m.contains("9 rules"))
        );
        assert!(matches!(w.listed(1, Ok(None)), Verdict::Restore(_)));
        assert_eq!(w.listed(1, Err(failed())), Verdict::Fine, "cannot judge");
    }

    #[test]
    fn the_resync_check_compares_fingerprints_and_falls_back_to_counts_before_a_snapshot() {
        let mut w = TableWatch::default();
        w.committed(stats(3, 10, 2));
        // No snapshot since the commit: judged by the counts, and its fingerprint kept.
        assert!(matches!(
            w.checked(1, Ok(Some(summary(3, 9, 2, 7)))),
            Verdict::Restore(_)
        ));
        assert_eq!(w.checked(1, Ok(Some(summary(3, 10, 2, 7)))), Verdict::Fine);
        // Then by the fingerprint: equal counts with another fingerprint are a drift.
        assert_eq!(w.checked(1, Ok(Some(summary(3, 10, 2, 7)))), Verdict::Fine);
        assert!(
            matches!(w.checked(1, Ok(Some(summary(3, 10, 2, 8)))), Verdict::Restore(m) if m.contains("where we had"))
        );
        assert!(matches!(w.checked(1, Ok(None)), Verdict::Restore(m) if m.contains("removed")));
        assert_eq!(w.checked(1, Err(failed())), Verdict::Fine);
        // A listing taken before a later commit says nothing about it.
        w.committed(stats(3, 11, 2));
        assert_eq!(w.checked(1, Ok(Some(summary(3, 10, 2, 8)))), Verdict::Stale);
    }
}
