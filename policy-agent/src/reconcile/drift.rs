//! The engine's answer to drift: what the drift monitor or a look at our table found changed
//! behind our back is repaired (the touched chains and sets) or restored (the whole table) by the
//! next commit.

use super::Engine;
use crate::table_watch::Verdict;
use std::time::Instant;
use tracing::{info, warn};

impl Engine {
    /// Acts on what a look at our table found.
    pub(super) fn judged(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Fine => {}
            Verdict::Stale => self.sched.snapshot_later(Instant::now()),
            Verdict::Restore(what) => {
                self.restore_needed(&what);
                self.sched.reconcile_now(Instant::now());
            }
        }
    }

    /// A drift touched `touched`: when those are chains and sets of ours, the next reconcile puts
    /// just them back (milliseconds, where a full replace takes ~0.3 s at 10k pods); anything else
    /// (the table, a foreign object, lost notifications) is a full replace.
    pub(super) fn repair_needed(&mut self, what: &str, touched: palisade_nft::monitor::Touched) {
        use palisade_nft::monitor::Touched;
        let rs = self.inc.ruleset();
        match touched {
            Touched::Objects { chains, sets }
                if chains.iter().all(|c| rs.chains.contains_key(c))
                    && sets.iter().all(|s| rs.sets.contains_key(s)) =>
            {
                self.metrics.restored();
                warn!(change = %what, chains = chains.len(), sets = sets.len(), "table inet palisade was changed behind our back; repairing what was touched");
                let (c, s) = self.repair.get_or_insert_with(Default::default);
                c.extend(chains);
                s.extend(sets);
            }
            _ => self.restore_needed(what),
        }
    }

    pub(super) fn restore_needed(&mut self, what: &str) {
        self.metrics.restored();
        warn!(change = %what, "table inet palisade was changed behind our back; restoring it");
        self.replace_all();
        self.lockdown = self.restore_lockdown;
    }

    /// Commits the lockdown table (`Compiled::lockdown`: the base chains, every local pod
    /// address pending, no policy) before the full restore: a full table takes the kernel 30–90
    /// ms to commit at 10k pods, the lockdown about a millisecond, and until the full table is
    /// back every new connection of this node's pods is dropped instead of let through
    /// unchecked. Under the node lock, with the attachment records' addresses as they are now
    /// pending too. The full table's messages are built meanwhile (the kernel holds its commit
    /// mutex for the tamperer's exit then) and returned with those records, for the restore to
    /// use when nothing changed since. A failure is logged and the restore goes on.
    pub(super) fn lock_down(
        &mut self,
    ) -> Option<(Vec<palisade_contract::Attachment>, super::NetlinkBatch)> {
        use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6};
        let start = Instant::now();
        let lock = match crate::lock::acquire(&self.cfg.state_dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot take the node lock for the lockdown; restoring the full table directly");
                return None;
            }
        };
        let records = self.read_attachments();
        let rs = self
            .inc
            .compiled()
            .lockdown(records.iter().flat_map(|a| a.ips.iter().copied()));
        // The full table's messages are built on a thread of their own while the lockdown
        // commits: neither waits for the other (the lockdown's commit mostly waits for the
        // kernel's commit mutex; when that is free at once, the building would delay it).
        let (inc, nft, carried) = (&self.inc, &self.nft, &mut self.carried);
        let (full, prepare_ms, done) = std::thread::scope(|s| {
            let building = s.spawn(|| {
                let t = Instant::now();
                let full = nft.full_replace_netlink(inc.ruleset()).ok();
                (full, t.elapsed().as_secs_f64() * 1e3)
            });
            let done = super::replace_carrying(nft, carried, &rs, None);
            let (full, prepare_ms) = building.join().unwrap_or((None, f64::NAN));
            (full, prepare_ms, done)
        });
        drop(lock);
        let took_ms = start.elapsed().as_secs_f64() * 1e3;
        match done {
            Ok(r) => {
                self.metrics.locked_down();
                let pending: usize = [PENDING_SET_V4, PENDING_SET_V6]
                    .iter()
                    .filter_map(|n| rs.sets.get(*n))
                    .map(|s| s.elements.len())
                    .sum();
                info!(
                    took_ms,
                    commit_ms = r.commit.as_secs_f64() * 1e3,
                    full_prepared_ms = prepare_ms,
                    pending,
                    "table locked down until the restore commits: new connections of this node's pods are dropped, established ones go on"
                );
            }
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, took_ms, "could not commit the lockdown table; restoring the full table directly");
            }
        }
        full.map(|b| (records, b))
    }

    /// Another process committed while the drift monitor was out for a large commit of ours
    /// ([`Commit::Unheard`]): what it changed is unknown, so our table is replaced in full. Counted
    /// apart from restores: on a node where kube-proxy commits often this is a collision of
    /// timing, not tampering.
    pub(super) fn unheard(&mut self) {
        self.metrics.unheard();
        info!("another process committed nf_tables while the drift monitor was out for a large commit of ours; replacing our table in full, as what it changed went unseen (palisade_unheard_commits_total counts this; nothing to do unless it grows with every change)");
        self.replace_all();
    }

    /// The next commit replaces the whole table; nothing known of the committed one is kept.
    pub(super) fn replace_all(&mut self) {
        self.replace = true;
        self.repair = None;
        self.table.forget();
    }

    /// Compares our table with what we committed, inline; true (after logging and counting) when
    /// it was changed or removed behind our back and must be restored. When it matches, our routes
    /// are checked too (a difference schedules a route sync).
    pub(super) fn check_table(&mut self) -> bool {
        if self.replacing() {
            return true;
        }
        let verdict = self.table.check(&self.metrics);
        self.checked(verdict)
    }

    /// Acts on the resync's check: a drift is restored by the next reconcile (scheduled now);
    /// a table as committed has our routes checked too. True when a restore is due.
    pub(super) fn checked(&mut self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Restore(what) => {
                self.restore_needed(&what);
                self.sched.reconcile_now(Instant::now());
                true
            }
            Verdict::Fine => {
                // No plan to derive when routes are not ours (`--no-routes`).
                if self.routes.is_some() {
                    let plan = self.route_plan();
                    if let Some(r) = self.routes.as_mut() {
                        r.check(&self.inc.state().nodes, &plan, &mut self.sched);
                    }
                    self.follow_overlay_use();
                }
                false
            }
            // Taken before a later commit: the next resync checks again.
            Verdict::Stale => false,
        }
    }
}
