//! When the reconcile thread does what: the debounce of changes, the periodic resync, retry
//! backoff, the post-commit snapshot, the conntrack sweep, the route retry and the attachment poll.
//!
//! Pure: every method takes the current time (`now`), nothing here reads a clock, sleeps or does
//! I/O, so the whole schedule is unit-tested with made-up instants (a fake clock). The engine asks
//! [`Schedule::next_wake`] how long it may block, then [`Schedule::fire`] what is due, and does it.
//!
//! Invariants:
//! - Changes within one debounce window share one reconcile: the first change sets the time, later
//!   ones never push it back (a steady stream cannot starve the reconcile).
//! - A failed reconcile is retried after a backoff that doubles from [`MIN_BACKOFF`] up to
//!   [`MAX_BACKOFF`]; a success resets it. Routes have a backoff of their own, so a bad Node never
//!   delays a policy commit.
//! - Nothing schedules a reconcile for an event that changed nothing (the engine only calls
//!   [`Schedule::changed`] when the model changed).
//! - The snapshot waits while a reconcile is due (it would read a table about to change) and comes
//!   only once commits paused for [`SNAPSHOT_DELAY`]: under churn a listing of a large table is
//!   restarted by nft at every commit and stale when it is read, and the drift monitor, not the
//!   read-back, is what sees tampering at once.

use std::time::{Duration, Instant};

/// First retry delay after a failed commit or route sync; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long after the last commit our table is read back (each commit pushes it back). At 10k
/// pods a listing takes ~80 ms, and nft restarts it whenever a commit changes the ruleset during
/// it: under 100 changes/s, a read-back 200 ms after the first of a run of commits kept an `nft`
/// child busy for seconds per listing.
pub const SNAPSHOT_DELAY: Duration = Duration::from_millis(200);

/// A retry delay that doubles on each failure, up to a cap, and resets on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The delay before the next retry; the one after it is twice as long (capped).
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }

    /// What the next failure will wait.
    pub fn peek(&self) -> Duration {
        self.next
    }

    pub fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

/// Share of the reconcile thread's time conntrack sweeps may take under churn: a sweep costs ~10 ms
/// (the kernel walks its whole conntrack hash table) to ~50 ms (10k pods, thousands of entries).
/// After a quiet period a commit's sweep runs at once; under churn, commits that come while the
/// credit is spent share one sweep when it is back.
pub const SWEEP_SHARE: f64 = 0.25;
/// Most sweep time saved up in quiet periods (seconds).
pub const SWEEP_CREDIT_MAX: f64 = 0.1;

/// The time conntrack sweeps may still take: earns [`SWEEP_SHARE`] of the wall time up to
/// [`SWEEP_CREDIT_MAX`], is spent by each sweep, and may go negative (then sweeps wait).
#[derive(Debug, Clone, Copy)]
pub struct SweepCredit {
    seconds: f64,
    at: Instant,
}

impl SweepCredit {
    pub fn new(now: Instant) -> Self {
        SweepCredit {
            seconds: SWEEP_CREDIT_MAX,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * SWEEP_SHARE;
        self.seconds = (self.seconds + earned).min(SWEEP_CREDIT_MAX);
        self.at = now;
    }

    /// How long a commit's sweep must wait for the credit to be back (zero when there is some).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.seconds >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.seconds / SWEEP_SHARE)
        }
    }

    /// A sweep that ended at `now` took `took`.
    pub fn spend(&mut self, now: Instant, took: Duration) {
        self.refill(now);
        self.seconds -= took.as_secs_f64();
    }
}

/// What is due now (see [`Schedule::fire`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Due {
    /// The periodic resync: verify the table (and, every `FULL_RESYNC_EVERY`th time, replace it in
    /// full; the engine counts).
    pub resync: bool,
    /// Retry (or re-check) the routes.
    pub routes: bool,
    /// Read our table back.
    pub snapshot: bool,
    /// Reconcile (compile and commit).
    pub reconcile: bool,
    /// Sweep conntrack for flows the committed ruleset no longer admits.
    pub sweep: bool,
}

/// The reconcile thread's timers.
#[derive(Debug, Clone)]
pub struct Schedule {
    debounce: Duration,
    resync: Duration,
    /// Attachment poll interval, when inotify is not available.
    poll: Option<Duration>,
    reconcile: Option<Instant>,
    next_resync: Instant,
    next_poll: Option<Instant>,
    snapshot: Option<Instant>,
    routes: Option<Instant>,
    sweep: Option<Instant>,
    backoff: Backoff,
    route_backoff: Backoff,
}

impl Schedule {
    pub fn new(now: Instant, debounce: Duration, resync: Duration, poll: Option<Duration>) -> Self {
        Schedule {
            debounce,
            resync,
            poll,
            reconcile: None,
            next_resync: now + resync,
            next_poll: poll.map(|p| now + p),
            snapshot: None,
            routes: None,
            sweep: None,
            backoff: Backoff::default(),
            route_backoff: Backoff::default(),
        }
    }

    /// The model changed (or the attachment records may have): reconcile after the debounce,
    /// together with whatever else comes meanwhile.
    pub fn changed(&mut self, now: Instant) {
        self.reconcile.get_or_insert(now + self.debounce);
    }

    /// Reconcile at once (our table was changed behind our back, or the source just synced).
    pub fn reconcile_now(&mut self, now: Instant) {
        self.reconcile = Some(now);
    }

    /// Whether a reconcile is scheduled.
    pub fn reconcile_pending(&self) -> bool {
        self.reconcile.is_some()
    }

    /// Forget a scheduled reconcile (nothing is enforced before the source synced).
    pub fn cancel_reconcile(&mut self) {
        self.reconcile = None;
    }

    /// The reconcile committed: no retry, backoff reset; read the table back [`SNAPSHOT_DELAY`]
    /// after it (unless another commit comes first) and, when flows are revoked, sweep after
    /// `sweep_after`.
    pub fn reconciled(&mut self, now: Instant, committed: bool, sweep_after: Option<Duration>) {
        self.reconcile = None;
        self.backoff.reset();
        if committed {
            self.schedule_snapshot(now);
            if let Some(wait) = sweep_after {
                // A sweep already due sooner covers this commit too; one due later is brought
                // forward (a targeted sweep's follow-up waits longer than a rule change's sweep).
                let at = now + wait;
                self.sweep = Some(self.sweep.map_or(at, |d| d.min(at)));
            }
        }
    }

    /// The reconcile failed: retry after the backoff, which is returned.
    pub fn reconcile_failed(&mut self, now: Instant) -> Duration {
        let wait = self.backoff.failed();
        self.reconcile = Some(now + wait);
        wait
    }

    /// A snapshot was taken for an older commit: take another one later.
    pub fn snapshot_later(&mut self, now: Instant) {
        self.schedule_snapshot(now);
    }

    /// The read-back comes once the table has been quiet for [`SNAPSHOT_DELAY`]: each commit
    /// pushes it back.
    fn schedule_snapshot(&mut self, now: Instant) {
        self.snapshot = Some(now + SNAPSHOT_DELAY);
    }

    /// Routes converged: no retry, backoff reset.
    pub fn routes_converged(&mut self) {
        self.routes = None;
        self.route_backoff.reset();
    }

    /// A route sync failed (or found routes it could not place): retry after the routes' own
    /// backoff, which is returned.
    pub fn routes_failed(&mut self, now: Instant) -> Duration {
        let wait = self.route_backoff.failed();
        self.routes = Some(now + wait);
        wait
    }

    /// Poll the attachment records every `interval` from now on (their watch stopped).
    pub fn poll_attachments(&mut self, now: Instant, interval: Duration) {
        self.poll = Some(interval);
        self.next_poll.get_or_insert(now + interval);
    }

    /// Whether a route retry is scheduled.
    pub fn routes_retry_pending(&self) -> bool {
        self.routes.is_some()
    }

    /// What the next route failure will wait (for logs).
    pub fn route_backoff(&self) -> Duration {
        self.route_backoff.peek()
    }

    /// Re-check routes soon (a resync found them different); keeps an earlier retry.
    pub fn routes_soon(&mut self, now: Instant) {
        self.routes.get_or_insert(now);
    }

    /// Until when the thread may block waiting for messages; `extra` is another deadline of the
    /// engine's (the revoked-flow recheck).
    pub fn next_wake(&self, extra: Option<Instant>) -> Instant {
        // The snapshot and the sweep wait for a scheduled reconcile (see `fire`): waking for them
        // before it would find nothing due.
        let after_reconcile =
            |t: Option<Instant>| t.map(|t| self.reconcile.map_or(t, |r| t.max(r)));
        [
            self.reconcile,
            self.next_poll,
            after_reconcile(self.snapshot),
            self.routes,
            after_reconcile(self.sweep),
            extra,
        ]
        .into_iter()
        .flatten()
        .fold(self.next_resync, Instant::min)
    }

    /// Takes what is due at `now` and re-arms the periodic timers. A due poll schedules a
    /// reconcile at once (the attachment records may have changed); a due resync is a reconcile
    /// too (in full); the snapshot waits while a reconcile is due (it would read a table about to
    /// change).
    pub fn fire(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if self.next_poll.is_some_and(|p| now >= p) {
            self.next_poll = self.poll.map(|p| now + p);
            self.reconcile.get_or_insert(now);
        }
        if now >= self.next_resync {
            self.next_resync = now + self.resync;
            due.resync = true;
        }
        if self.routes.is_some_and(|d| now >= d) {
            self.routes = None;
            due.routes = true;
        }
        if self.snapshot.is_some_and(|d| now >= d) && !due.resync && self.reconcile.is_none() {
            self.snapshot = None;
            due.snapshot = true;
        }
        due.reconcile = due.resync || self.reconcile.is_some_and(|d| now >= d);
        // A sweep waits for a scheduled reconcile (a change is staged): the commit comes first,
        // and the sweep then judges the flows against it.
        if self.sweep.is_some_and(|d| now >= d) && (due.reconcile || self.reconcile.is_none()) {
            self.sweep = None;
            due.sweep = true;
        }
        due
    }

    /// A sweep gave way to waiting messages before its end: due again at once (after the
    /// reconcile they may schedule).
    pub fn sweep_yielded(&mut self, now: Instant) {
        self.sweep = Some(self.sweep.map_or(now, |d| d.min(now)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBOUNCE: Duration = Duration::from_millis(10);
    const RESYNC: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The fake clock: a fixed origin and offsets from it.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, offset_ms: u64) -> Instant {
            self.0 + ms(offset_ms)
        }
    }

    fn schedule() -> (Clock, Schedule) {
        let c = Clock(Instant::now());
        let s = Schedule::new(c.at(0), DEBOUNCE, RESYNC, None);
        (c, s)
    }

    #[test]
    fn with_nothing_to_do_the_thread_sleeps_until_the_resync_and_nothing_fires_before() {
        let (c, mut s) = schedule();
        assert_eq!(s.next_wake(None), c.at(30_000));
        assert_eq!(s.fire(c.at(29_999)), Due::default());
        assert!(!s.reconcile_pending());
    }

    #[test]
    fn changes_within_one_debounce_share_one_reconcile_and_never_push_it_back() {
        let (c, mut s) = schedule();
        s.changed(c.at(0));
        s.changed(c.at(5));
        s.changed(c.at(9));
        assert_eq!(s.next_wake(None), c.at(10));
        assert!(!s.fire(c.at(9)).reconcile);
        assert!(s.fire(c.at(10)).reconcile);
        s.reconciled(c.at(11), true, None);
        assert!(
            !s.fire(c.at(12)).reconcile,
            "one reconcile for the three changes"
        );
    }

    #[test]
    fn a_failed_reconcile_retries_with_a_doubling_capped_backoff_reset_by_success() {
        let (c, mut s) = schedule();
        s.changed(c.at(0));
        let mut waits = Vec::new();
        let mut t = 10;
        for _ in 0..9 {
            assert!(s.fire(c.at(t)).reconcile);
            let w = s.reconcile_failed(c.at(t));
            waits.push(w.as_millis() as u64);
            t += w.as_millis() as u64;
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert!(s.fire(c.at(t)).reconcile);
        s.reconciled(c.at(t), true, None);
        s.changed(c.at(t));
        assert!(s.fire(c.at(t + 10)).reconcile);
        assert_eq!(s.reconcile_failed(c.at(t + 10)), MIN_BACKOFF);
    }

    #[test]
    fn the_resync_fires_every_period_and_asks_for_a_reconcile() {
        let (c, mut s) = schedule();
        let d = s.fire(c.at(30_000));
        assert!(d.resync && d.reconcile);
        assert_eq!(s.next_wake(None), c.at(60_000));
        assert!(!s.fire(c.at(30_001)).resync);
        assert!(s.fire(c.at(60_000)).resync);
    }

    #[test]
    fn a_commit_schedules_one_snapshot_which_waits_while_a_reconcile_is_due() {
        let (c, mut s) = schedule();
        s.reconciled(c.at(0), true, None);
        s.reconciled(c.at(50), true, None); // one read-back, 200 ms after the last commit
        assert_eq!(s.next_wake(None), c.at(250));
        s.changed(c.at(245));
        let d = s.fire(c.at(250));
        assert!(!d.snapshot, "a reconcile is due at 255");
        assert!(s.fire(c.at(255)).reconcile);
        s.reconciled(c.at(256), false, None); // nothing to commit: the read-back stays due
        assert!(s.fire(c.at(256)).snapshot);
        assert!(!s.fire(c.at(5_000)).snapshot, "taken once");
    }

    #[test]
    fn under_churn_no_snapshot_and_a_commit_after_a_pause_gets_one_soon() {
        let (c, mut s) = schedule();
        // Commits every `every` ms over `span`, the reconcile thread firing every millisecond:
        // the times a read-back fired.
        fn commit_every(
            s: &mut Schedule,
            c: &Clock,
            span: std::ops::Range<u64>,
            every: u64,
        ) -> Vec<u64> {
            let mut fired = Vec::new();
            for t in span {
                if t % every == 0 {
                    s.reconciled(c.at(t), true, None);
                }
                if s.fire(c.at(t)).snapshot {
                    fired.push(t);
                }
            }
            fired
        }
        // A commit every 15 ms for 10 s (100 changes/s under the debounce): no read-back while
        // commits keep coming.
        let fired = commit_every(&mut s, &c, 0..10_000, 15);
        assert_eq!(fired, Vec::<u64>::new(), "a listing under churn is stale");
        // The churn stops (last commit at 9_990): read back 200 ms after it.
        assert!(!s.fire(c.at(10_189)).snapshot);
        assert!(s.fire(c.at(10_190)).snapshot);
        // Commits a second apart: one read-back after each.
        let fired = commit_every(&mut s, &c, 20_000..25_000, 1_000);
        assert_eq!(fired, vec![20_200, 21_200, 22_200, 23_200, 24_200]);
    }

    #[test]
    fn nothing_committed_means_no_snapshot_and_no_sweep() {
        let (c, mut s) = schedule();
        s.reconciled(c.at(0), false, Some(Duration::ZERO));
        assert_eq!(s.fire(c.at(1_000)), Due::default());
    }

    #[test]
    fn a_sweep_follows_a_commit_after_the_wait_it_was_given() {
        let (c, mut s) = schedule();
        s.reconciled(c.at(0), true, Some(ms(40)));
        s.reconciled(c.at(10), true, Some(ms(50))); // the sweep due at 40 covers it
        assert!(!s.fire(c.at(39)).sweep);
        assert!(s.fire(c.at(40)).sweep);
        assert!(!s.fire(c.at(61)).sweep);
    }

    #[test]
    fn a_commit_that_needs_its_sweep_sooner_brings_the_due_one_forward() {
        let (c, mut s) = schedule();
        s.reconciled(c.at(0), true, Some(ms(250))); // a targeted sweep's follow-up
        s.reconciled(c.at(10), true, Some(Duration::ZERO)); // a rule change: at once
        assert!(s.fire(c.at(10)).sweep);
        assert!(!s.fire(c.at(250)).sweep, "one sweep covers both commits");
    }

    #[test]
    fn a_due_sweep_waits_for_the_reconcile_of_a_staged_change() {
        let (c, mut s) = schedule();
        s.reconciled(c.at(0), true, Some(Duration::ZERO));
        s.changed(c.at(0)); // due at the debounce
        let debounce = s.reconcile.expect("a reconcile is scheduled");
        assert!(debounce > c.at(0), "the test needs a debounce");
        assert!(
            !s.fire(c.at(0)).sweep,
            "the sweep ran before the staged change's commit"
        );
        assert_eq!(
            s.next_wake(None),
            debounce,
            "the thread wakes for a sweep that cannot run yet"
        );
        let due = s.fire(debounce);
        assert!(
            due.reconcile && due.sweep,
            "the sweep follows the reconcile: {due:?}"
        );
        s.reconciled(debounce, true, None);
        assert!(!s.fire(debounce + ms(1)).sweep, "one sweep");
    }

    #[test]
    fn a_sweep_that_gave_way_is_due_again_once_the_commit_it_gave_way_to_is_made() {
        let (c, mut s) = schedule();
        s.sweep_yielded(c.at(100));
        s.changed(c.at(100)); // the message it gave way to
        let debounce = s.reconcile.expect("a reconcile is scheduled");
        assert!(!s.fire(c.at(100)).sweep);
        // The commit asks for no sweep of its own (it only widened): the one owed still runs.
        let due = s.fire(debounce);
        assert!(due.reconcile && due.sweep, "{due:?}");
        // A message that schedules nothing: the sweep is due at once.
        s.reconciled(debounce, true, None);
        s.sweep_yielded(debounce + ms(5));
        assert!(s.fire(debounce + ms(5)).sweep);
    }

    #[test]
    fn sweeps_under_churn_take_at_most_their_share_of_the_thread() {
        let c = Clock(Instant::now());
        let mut credit = SweepCredit::new(c.at(0));
        assert_eq!(
            credit.wait(c.at(0)),
            Duration::ZERO,
            "after a quiet period: at once"
        );
        // Back-to-back sweeps of 50 ms: each earns 12.5 ms (a quarter) and spends 50.
        credit.spend(c.at(50), ms(50)); // 0.1 (capped) - 0.05 = 0.05
        credit.spend(c.at(100), ms(50)); // 0.05 + 0.0125 - 0.05 = 0.0125
        assert_eq!(credit.wait(c.at(100)), Duration::ZERO);
        credit.spend(c.at(150), ms(50)); // 0.0125 + 0.0125 - 0.05 = -0.025
        let wait = credit.wait(c.at(150));
        assert!(
            wait > ms(99) && wait < ms(101),
            "{wait:?}: 25 ms owed, earned at a quarter"
        );
        assert_eq!(credit.wait(c.at(150) + wait + ms(1)), Duration::ZERO);
        // Saved-up credit is capped: a long quiet period allows one sweep's worth, not more.
        assert_eq!(credit.wait(c.at(3_600_000)), Duration::ZERO);
        credit.spend(c.at(3_600_000), ms(150));
        assert!(credit.wait(c.at(3_600_000)) > ms(150));
    }

    #[test]
    fn routes_retry_on_their_own_backoff_without_touching_the_reconcile() {
        let (c, mut s) = schedule();
        assert_eq!(s.routes_failed(c.at(0)), ms(100));
        assert_eq!(s.route_backoff(), ms(200));
        let d = s.fire(c.at(100));
        assert!(d.routes && !d.reconcile);
        assert_eq!(s.routes_failed(c.at(100)), ms(200));
        s.routes_converged();
        assert_eq!(s.route_backoff(), MIN_BACKOFF);
        assert!(!s.fire(c.at(1_000)).routes);
    }

    #[test]
    fn the_attachment_poll_asks_for_a_reconcile_each_interval_when_inotify_is_missing() {
        let c = Clock(Instant::now());
        let mut s = Schedule::new(c.at(0), DEBOUNCE, RESYNC, Some(ms(200)));
        assert_eq!(s.next_wake(None), c.at(200));
        assert!(s.fire(c.at(200)).reconcile);
        s.reconciled(c.at(201), false, None);
        assert_eq!(s.next_wake(None), c.at(400));
    }

    #[test]
    fn a_watch_lost_later_turns_the_poll_on() {
        let (c, mut s) = schedule();
        assert_eq!(s.next_wake(None), c.at(30_000));
        s.poll_attachments(c.at(1_000), ms(200));
        assert_eq!(s.next_wake(None), c.at(1_200));
        assert!(s.fire(c.at(1_200)).reconcile);
    }

    #[test]
    fn before_the_source_synced_a_cancelled_reconcile_stays_cancelled() {
        let (c, mut s) = schedule();
        s.changed(c.at(0));
        s.cancel_reconcile();
        assert!(!s.fire(c.at(100)).reconcile);
        s.reconcile_now(c.at(100));
        assert!(s.fire(c.at(100)).reconcile);
    }

    #[test]
    fn the_wake_time_is_the_earliest_deadline_including_the_engines_own() {
        let (c, mut s) = schedule();
        s.changed(c.at(0));
        assert_eq!(s.next_wake(Some(c.at(5))), c.at(5));
        assert_eq!(s.next_wake(Some(c.at(50))), c.at(10));
    }
}
