//! The reconcile engine: one thread that owns the cluster state and the last committed ruleset.
//!
//! - Events are coalesced for `debounce` after the first one; then one reconcile runs: read the
//!   attachment records and compile (outside the lock), take the node lock, re-read the records
//!   (a change of them is one more change to compile), teach the compiler the pending marks the plugin
//!   added, and commit ONE nft transaction: a full replace (after a full compile) at start, at every
//!   resync, after a failure and when our table was changed behind our back; otherwise the batch of the
//!   incremental compiler, which applies the changes since the last commit to what they can affect only
//!   (~1 ms at 10k pods, where a full compile + diff takes ~90 ms) and equals the diff against the last
//!   committed ruleset.
//! - A rejected incremental batch falls back to a full replace; any failure is retried with backoff while
//!   the last committed rules stay in the kernel.
//! - 200 ms after commits our table is read back once, on a thread of its own (a commit never waits for
//!   it): its chain/rule/set counts must match the ruleset, and its fingerprint is what later checks
//!   compare, at resync. A change to our table by any other process
//!   (seen by the drift monitor, nf_tables notifications) is restored at once with a full replace.
//! - The conflist (once) and routes follow each commit.
//! - Nothing is enforced before the source reported `Synced`: until then the rules of a previous run stay
//!   in the kernel and new pods stay pending (fail closed).

use crate::cniconf;
use crate::compiled;
use crate::error::{Error, Result};
use crate::lock::NodeLock;
use crate::metrics::{Metrics, Sizes};
use crate::nft::{self, Nft, TableSummary};
use crate::routes::{self, PodRoute, Routes};
use crate::source::SourceEvent;
use crate::state::{self, Applied};
use palisade_policy::model::{Change, ClusterState};
use palisade_policy::{IncrementalCompiler, Ruleset};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// First retry delay after a failed commit or route sync; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Attachment directory poll interval when inotify is unavailable.
pub const ATTACHMENT_POLL: Duration = Duration::from_millis(200);

/// What the engine needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub ipam_data_dir: PathBuf,
    /// `--mtu`; `None`: detected from our uplink (see `overlay::pod_mtu`).
    pub mtu: Option<u32>,
    /// `--encapsulation`: which other nodes are reached through our VXLAN device.
    pub encapsulation: crate::overlay::Mode,
    pub fail_open: bool,
    pub resync: Duration,
    pub debounce: Duration,
    pub routes: bool,
    /// Cluster pod CIDRs (`--cluster-cidr`, at most one per family): other Nodes' podCIDRs outside
    /// them get no route.
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// Egress NAT (`--masquerade`, `--no-masquerade-cidr`; the cluster CIDRs are the field above).
    pub masquerade: bool,
    pub no_masquerade_cidrs: Vec<ipnet::IpNet>,
    /// Poll the attachments dir (set when the inotify watch could not start).
    pub poll_attachments: bool,
}

/// Messages into the engine.
#[derive(Debug)]
pub enum Msg {
    Source(SourceEvent),
    /// Attachment records changed.
    AttachmentsChanged,
    /// Our table was changed by another process (seen by the drift monitor; says what and by whom):
    /// restore it now.
    Drift(String),
    /// The snapshot reader listed our table for the commit generation `generation`.
    Snapshot {
        generation: u64,
        listing: std::result::Result<Option<TableSummary>, String>,
    },
    /// Leave the loop (rules stay in the kernel).
    Stop,
}

/// The engine's state between reconciles.
pub struct Engine {
    cfg: Config,
    nft: Nft,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    routes: Option<Routes>,
    /// The overlay edge (VXLAN devices, FDB, neighbours); `None` without routes.
    overlay: Option<crate::overlay::Overlay>,
    state: ClusterState,
    synced: bool,
    /// The compiler holding the last committed ruleset; `None` before the first commit and after a
    /// failure (the next reconcile compiles in full).
    inc: Option<IncrementalCompiler>,
    /// Changes applied to `state` since `inc` last saw it (kept only while there is an `inc`).
    queued: Vec<Change>,
    /// What our table looked like after the last commits (see [`SNAPSHOT_DELAY`]); `None` while stale.
    expected: Option<TableSummary>,
    /// Lists our table off the reconcile thread (its own nft context), so a read-back of a large table
    /// never delays a commit. Without it (tests of the engine alone) snapshots are taken inline.
    reader: Option<std::sync::mpsc::Sender<u64>>,
    /// Counts commits; a snapshot listed for an older generation is stale and dropped.
    generation: u64,
    /// When to take the next snapshot of our table.
    snapshot_due: Option<Instant>,
    need_full: bool,
    applied_routes: Option<crate::overlay::Desired>,
    /// When routes are synced next on their own (a retry after a failure, or a check found them
    /// different). Route work never delays or fails a policy commit.
    route_due: Option<Instant>,
    /// The routes the last failed sync tried to reach: while they are still what we want, only
    /// `route_due` retries them (with `route_backoff`); a different want is tried at once.
    route_attempted: Option<crate::overlay::Desired>,
    route_backoff: Duration,
    /// The podCIDRs refused last time (logged when they change).
    refused: Vec<routes::Refused>,
    conflist_written: bool,
    /// The reason for not writing the conflist was logged once already.
    conflist_warned: bool,
    /// The next full replace is the periodic one (logged at debug).
    quiet_full: bool,
    backoff: Duration,
    /// Cuts established flows the committed ruleset no longer admits (`None`: they are kept,
    /// `--keep-established-flows`).
    revoker: Option<crate::conntrack::Revoker>,
    /// When the next conntrack sweep runs (set by every commit).
    revoke_due: Option<Instant>,
    /// Time the reconcile thread may still spend sweeping before sweeps wait (seconds; grows by
    /// [`SWEEP_SHARE`] of the wall time up to [`SWEEP_CREDIT_MAX`], may go negative).
    sweep_credit: f64,
    sweep_credit_at: Instant,
}

/// Share of the reconcile thread's time conntrack sweeps may take under churn: a sweep costs ~10 ms
/// (the kernel walks its whole conntrack hash table) to ~50 ms (10k pods, thousands of entries).
/// After a quiet period a commit's sweep runs at once; under churn, commits that come while the
/// credit is spent share one sweep when it is back.
pub const SWEEP_SHARE: f64 = 0.25;
/// Most sweep time saved up in quiet periods (seconds).
pub const SWEEP_CREDIT_MAX: f64 = 0.1;

/// Niceness of the snapshot thread and its `nft` processes (the lowest priority).
const SNAPSHOT_NICE: libc::c_int = 19;

/// Whether the `nft` binary can be run (the snapshot reader prefers it).
fn nft_binary_runs() -> bool {
    std::process::Command::new(palisade_nft::NFT_BINARY)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// How long after a commit our table is read back to remember what it looks like (the fingerprint the
/// resync compares). Not after every commit: under churn at most one read-back per this interval.
pub const SNAPSHOT_DELAY: Duration = Duration::from_millis(200);

impl Engine {
    pub fn new(
        cfg: Config,
        nft: Nft,
        metrics: Arc<Metrics>,
        rt: tokio::runtime::Handle,
        routes: Option<Routes>,
    ) -> Self {
        Engine {
            cfg,
            nft,
            metrics,
            rt,
            routes,
            overlay: None,
            state: ClusterState::default(),
            synced: false,
            inc: None,
            queued: Vec::new(),
            expected: None,
            reader: None,
            generation: 0,
            snapshot_due: None,
            need_full: true,
            applied_routes: None,
            route_due: None,
            route_attempted: None,
            route_backoff: MIN_BACKOFF,
            refused: Vec::new(),
            conflist_written: false,
            conflist_warned: false,
            quiet_full: false,
            backoff: MIN_BACKOFF,
            revoker: None,
            revoke_due: None,
            sweep_credit: SWEEP_CREDIT_MAX,
            sweep_credit_at: Instant::now(),
        }
    }

    /// Reach other nodes through the overlay edge (`--encapsulation`), in this namespace.
    pub fn with_overlay(mut self, overlay: crate::overlay::Overlay) -> Self {
        self.overlay = Some(overlay);
        self
    }

    /// What routes, devices and peers the Nodes call for: `routes` (validated, via InternalIPs)
    /// split into direct and overlay ones by `--encapsulation` and our links.
    fn route_want(&self, routes: &BTreeSet<PodRoute>) -> Result<crate::overlay::Desired> {
        let mode = if self.overlay.is_some() {
            self.cfg.encapsulation
        } else {
            crate::overlay::Mode::Never
        };
        let local = match &self.overlay {
            Some(o) if mode != crate::overlay::Mode::Never => self.rt.block_on(o.local())?,
            _ => crate::overlay::Local::default(),
        };
        Ok(crate::overlay::plan(
            routes,
            &self.state.nodes,
            &self.cfg.node_name,
            mode,
            &local,
        ))
    }

    /// After every commit, cut the established flows the new ruleset would not admit as new.
    pub fn with_revoker(mut self, revoker: crate::conntrack::Revoker) -> Self {
        self.revoker = Some(revoker);
        self
    }

    /// Takes post-commit snapshots on a thread of their own with its own nft context, answering on
    /// `reply`. Listing a table of 100k elements takes hundreds of ms at 10k pods: on the reconcile
    /// thread that delayed any change arriving meanwhile (the enforcement-latency tail).
    pub fn with_snapshot_reader(mut self, reply: std::sync::mpsc::Sender<Msg>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        // An `nft` process per listing: off the commit path its ~4 ms start costs nothing, and the
        // listing's cache dies with the process instead of living in a second libnftables context.
        let backend = if nft_binary_runs() {
            nft::Backend::Exec
        } else {
            self.nft.backend()
        };
        let nft = Nft::new(backend);
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Lowest CPU priority for this thread and the `nft` it forks (Linux niceness is per
                // thread and inherited): on a busy node the read-back must not compete with commits.
                // SAFETY: setpriority on the calling thread (who 0) with a constant value.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SNAPSHOT_NICE) } != 0 {
                    debug!(
                        "cannot lower the snapshot thread's priority; it runs at normal priority"
                    );
                }
                while let Ok(mut generation) = rx.recv() {
                    // Only the newest request matters.
                    while let Ok(g) = rx.try_recv() {
                        generation = g;
                    }
                    let listing = match nft.list_table() {
                        Ok(Some(l)) => nft::summarize(&l).map(Some).map_err(|e| e.to_string()),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    };
                    if reply
                        .send(Msg::Snapshot {
                            generation,
                            listing,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("spawn snapshot thread", "reconcile", e))?;
        self.reader = Some(tx);
        Ok(self)
    }

    /// Runs until [`Msg::Stop`] or every sender is gone.
    pub fn run(mut self, rx: Receiver<Msg>) {
        let mut due: Option<Instant> = None; // when the next reconcile runs
        let mut next_resync = Instant::now() + self.cfg.resync;
        let mut next_poll = Instant::now() + ATTACHMENT_POLL;
        loop {
            let now = Instant::now();
            let mut wake = next_resync;
            let recheck_due = self.revoker.as_ref().and_then(|r| r.recheck_due());
            for d in [
                due,
                self.snapshot_due,
                self.route_due,
                self.revoke_due,
                recheck_due,
            ]
            .into_iter()
            .flatten()
            {
                wake = wake.min(d);
            }
            if self.cfg.poll_attachments {
                wake = wake.min(next_poll);
            }
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    info!("reconcile loop stopping; rules stay in the kernel");
                    return;
                }
                Ok(Msg::Source(ev)) => {
                    if self.on_event(ev) {
                        due.get_or_insert(Instant::now() + self.cfg.debounce);
                    }
                }
                Ok(Msg::AttachmentsChanged) => {
                    due.get_or_insert(Instant::now() + self.cfg.debounce);
                }
                Ok(Msg::Drift(what)) => {
                    // Straight to a full replace: no listing, no comparison (our own commits never
                    // arrive here). Before the first commit the first reconcile replaces it anyway.
                    if self.synced && self.inc.is_some() {
                        self.restore_needed(&what);
                        due = Some(Instant::now());
                    }
                }
                Ok(Msg::Snapshot {
                    generation,
                    listing,
                }) => {
                    if self.snapshot_listed(generation, listing) {
                        due = Some(Instant::now());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if self.cfg.poll_attachments && now >= next_poll {
                next_poll = now + ATTACHMENT_POLL;
                due.get_or_insert(now);
            }
            if now >= next_resync {
                // Resync: say whether anything drifted (log, metric), then replace the whole table
                // anyway, so even a change the fingerprint cannot see is undone.
                next_resync = now + self.cfg.resync;
                if self.synced {
                    let drifted = self.check_table();
                    self.quiet_full = !drifted && !self.need_full;
                    self.need_full = true;
                    self.applied_routes = None;
                    due = Some(now);
                }
            }
            if self.route_due.is_some_and(|d| now >= d) {
                self.route_due = None;
                if self.synced {
                    self.sync_routes(true);
                }
            }
            if self.snapshot_due.is_some_and(|d| now >= d) && due.is_none() && self.snapshot() {
                due = Some(now);
            }
            if due.is_some_and(|d| now >= d) && self.synced {
                due = match self.reconcile() {
                    Ok(()) => {
                        self.backoff = MIN_BACKOFF;
                        None
                    }
                    Err(e) => {
                        self.metrics.error(e.kind());
                        error!(error = %e, retry_in = ?self.backoff, "reconcile failed; the last committed rules stay enforced");
                        let d = Instant::now() + self.backoff;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        Some(d)
                    }
                };
            } else if due.is_some() && !self.synced {
                due = None; // nothing is enforced before Synced; Synced schedules the first reconcile
            }
            if self.revoke_due.is_some_and(|d| Instant::now() >= d) {
                self.revoke();
            }
            self.recheck_revoked();
        }
    }

    /// Applies a source event; true when a reconcile is needed.
    fn on_event(&mut self, ev: SourceEvent) -> bool {
        let what = describe(&ev);
        let applied = match state::change_for(ev) {
            Ok(Some(c)) => {
                if self.inc.is_some() {
                    self.queued.push(c.clone());
                }
                self.state.apply(c);
                Applied::Changed
            }
            Ok(None) => Applied::Synced,
            Err(e) => Applied::Rejected(e),
        };
        match applied {
            Applied::Changed => {
                debug!(object = %what, "state changed");
                self.synced
            }
            Applied::Rejected(msg) => {
                self.metrics.error("bad_object");
                warn!(object = %what, error = %msg, "skipping invalid object; fix it (the API server would have rejected it)");
                false
            }
            Applied::Synced => {
                if !self.synced {
                    info!(
                        pods = self.state.pods.len(),
                        policies = self.state.policies.len(),
                        nodes = self.state.nodes.len(),
                        "source synced; enforcing"
                    );
                }
                self.synced = true;
                true
            }
        }
    }

    fn read_attachments(&self) -> Vec<palisade_contract::Attachment> {
        let (attachments, bad) = palisade_contract::read_attachments(&self.cfg.state_dir);
        for (path, err) in bad {
            self.metrics.error("bad_attachment");
            warn!(record = %path.display(), error = %err, "skipping unreadable attachment record");
        }
        attachments
    }

    /// One reconcile: compile (outside the lock, so the plugin waits only for the commit), then under
    /// the node lock re-read the attachment records (their change is one more change to compile) and
    /// commit one transaction; then routes and conflist.
    fn reconcile(&mut self) -> Result<()> {
        let start = Instant::now();
        let node = self.cfg.node_name.clone();
        let before = self.read_attachments();
        let attach = Change::SetAttachments(before.clone());
        self.state.apply(attach.clone());
        let mut queued = std::mem::take(&mut self.queued);
        let nat = crate::egress_nat::NatConfig {
            enabled: self.cfg.masquerade,
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            no_masquerade: self.cfg.no_masquerade_cidrs.clone(),
        };
        if let Some(change) = crate::egress_nat::apply(&nat, &mut self.state, &node) {
            queued.push(change);
        }
        // Whatever fails from here on leaves `self.inc` empty: the next reconcile compiles in full.
        let mut full = self.need_full;
        let mut inc = match self.inc.take() {
            Some(mut inc) if !full => {
                compiled::stage(&mut inc, queued.into_iter().chain([attach]))?;
                inc
            }
            _ => {
                full = true;
                compiled::incremental(&self.state, &node)?
            }
        };
        let lock = NodeLock::acquire(&self.cfg.state_dir)?;
        let attachments = self.read_attachments();
        if attachments != before {
            let attach = Change::SetAttachments(attachments.clone());
            self.state.apply(attach.clone());
            compiled::stage(&mut inc, [attach])?;
        }
        for w in &inc.compiled().warnings {
            warn!("{w}");
        }
        // The plugin's pending marks are taken as committed (the full replace overwrites them).
        let batch = compiled::take_batch(&mut inc, &attachments)?;
        let committed = if full {
            self.commit_full(inc.ruleset())?;
            true
        } else {
            match batch {
                None => false,
                Some(batch) => match self.nft.apply(&batch.json) {
                    Ok(()) => {
                        debug!(stats = %batch.stats, "incremental transaction committed");
                        true
                    }
                    Err(e) => {
                        self.metrics.error("nft_rejected");
                        error!(error = %e, objects = %batch.stats, "nft rejected the incremental batch; falling back to a full replace");
                        debug!(batch = %batch.json, "rejected batch");
                        self.commit_full(inc.ruleset())?;
                        full = true;
                        true
                    }
                },
            }
        };
        drop(lock);
        let took = start.elapsed();
        let stats = inc.ruleset().stats();
        let pending = inc.compiled().pending.len();
        if full {
            let took_ms = took.as_secs_f64() * 1e3;
            let (chains, rules, elements) = (stats.chains, stats.rules, stats.elements);
            if self.quiet_full {
                debug!(
                    took_ms,
                    chains, rules, elements, pending, "table replaced (periodic resync)"
                );
            } else {
                info!(took_ms, chains, rules, elements, pending, "table replaced");
            }
        } else if committed {
            debug!(took_us = took.as_micros() as u64, "change committed");
        }
        self.quiet_full = false;
        let sizes = Sizes {
            pods: self.state.pods.len() as u64,
            policies: self.state.policies.len() as u64,
            chains: stats.chains as u64,
            rules: stats.rules as u64,
            set_elements: stats.elements as u64,
            pending: pending as u64,
        };
        self.metrics.commit_ok(took, full, sizes);
        if committed && self.revoker.is_some() {
            let now = Instant::now();
            let credit = self.refill_sweep_credit(now);
            let wait = if credit >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-credit / SWEEP_SHARE)
            };
            self.revoke_due.get_or_insert(now + wait);
        }
        if committed {
            self.generation += 1;
            self.expected = None;
            self.snapshot_due
                .get_or_insert(Instant::now() + SNAPSHOT_DELAY);
        }
        self.inc = Some(inc);
        self.need_full = false;
        // The conflist first: a route that cannot be added (retried with backoff) must not keep pods
        // from starting on this node. Routes fail and retry on their own schedule (`route_due`): a
        // bad Node never delays a policy commit.
        self.write_conflist()?;
        self.sync_routes(false);
        Ok(())
    }

    /// Cuts the established flows the committed ruleset would not admit as new (`conntrack`).
    fn revoke(&mut self) {
        self.revoke_due = None;
        let (Some(revoker), Some(inc)) = (self.revoker.as_mut(), self.inc.as_ref()) else {
            return;
        };
        let start = Instant::now();
        let swept = revoker.sweep(inc.compiled());
        let took = start.elapsed().as_secs_f64();
        self.refill_sweep_credit(Instant::now());
        self.sweep_credit -= took;
        match swept {
            Ok(report) => crate::conntrack::log_report(&report, &self.metrics),
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot sweep conntrack; flows that lost permission live on until a later commit's sweep succeeds (the resync commits at least every --resync-seconds)");
            }
        }
    }

    /// Adds the sweep time earned since the last refill; returns the credit.
    fn refill_sweep_credit(&mut self, now: Instant) -> f64 {
        let earned = now.duration_since(self.sweep_credit_at).as_secs_f64() * SWEEP_SHARE;
        self.sweep_credit = (self.sweep_credit + earned).min(SWEEP_CREDIT_MAX);
        self.sweep_credit_at = now;
        self.sweep_credit
    }

    /// Cuts flows cut earlier that came back in their reply direction while still denied.
    fn recheck_revoked(&mut self) {
        let (Some(revoker), Some(inc)) = (self.revoker.as_mut(), self.inc.as_ref()) else {
            return;
        };
        if revoker.recheck_due().is_none_or(|d| Instant::now() < d) {
            return;
        }
        match revoker.recheck(inc.compiled()) {
            Ok(report) => crate::conntrack::log_report(&report, &self.metrics),
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot recheck revoked flows; one that came back in its reply direction lives on until the next sweep");
            }
        }
    }

    fn commit_full(&mut self, next: &Ruleset) -> Result<()> {
        let json = compiled::full_replace_of(next);
        let applied = self.nft.apply(&json);
        drop(json);
        if let Err(e) = applied {
            self.need_full = true;
            return Err(e);
        }
        Ok(())
    }

    /// Reads our table back and remembers its fingerprint: asks the snapshot reader when there is one
    /// (the answer arrives as [`Msg::Snapshot`]), else lists inline. True when a restore is needed.
    fn snapshot(&mut self) -> bool {
        self.snapshot_due = None;
        if self.inc.is_none() {
            return false;
        }
        if let Some(reader) = &self.reader {
            if reader.send(self.generation).is_ok() {
                return false;
            }
            self.reader = None; // the reader is gone: list inline from now on
        }
        let listing = match self.nft.list_table() {
            Ok(Some(l)) => nft::summarize(&l).map(Some).map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => {
                self.metrics.error(e.kind());
                Err(e.to_string())
            }
        };
        self.snapshot_listed(self.generation, listing)
    }

    /// Judges a listing of our table taken for commit `generation`. Chains, rules and sets map one to
    /// one from our ruleset, so a count that differs already means someone changed the table: true
    /// (restore). A listing from before the newest commit is dropped and a new one scheduled.
    fn snapshot_listed(
        &mut self,
        generation: u64,
        listing: std::result::Result<Option<TableSummary>, String>,
    ) -> bool {
        if generation != self.generation {
            self.snapshot_due
                .get_or_insert(Instant::now() + SNAPSHOT_DELAY);
            return false;
        }
        let Some(last) = &self.inc else { return false };
        let stats = last.ruleset().stats();
        match listing {
            Ok(Some(s))
                if (s.chains, s.rules, s.sets)
                    == (stats.chains as u64, stats.rules as u64, stats.sets as u64) =>
            {
                self.expected = Some(s);
                false
            }
            Ok(Some(s)) => {
                self.restore_needed(&format!(
                    "found {} chains, {} rules, {} sets where we committed {}, {}, {}",
                    s.chains, s.rules, s.sets, stats.chains, stats.rules, stats.sets
                ));
                true
            }
            Ok(None) => {
                self.restore_needed("table inet palisade was removed (nft flush ruleset?)");
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot read back our table");
                false
            }
        }
    }

    fn restore_needed(&mut self, what: &str) {
        self.metrics.restored();
        warn!(change = %what, "table inet palisade was changed behind our back; restoring it");
        self.need_full = true;
        self.expected = None;
    }

    /// Compares our table with what we committed; true (after logging and counting) when it was changed
    /// or removed behind our back and must be restored, or our routes differ.
    fn check_table(&mut self) -> bool {
        if self.inc.is_none() {
            return true;
        }
        let found = match self.nft.list_table() {
            Ok(Some(l)) => match nft::summarize(&l) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot parse our table's listing");
                    return false;
                }
            },
            Ok(None) => {
                self.restore_needed("table inet palisade was removed (nft flush ruleset?)");
                return true;
            }
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot list our table to verify it");
                return false;
            }
        };
        match self.expected {
            Some(exp) if exp.fingerprint != found.fingerprint => {
                self.restore_needed(&format!(
                    "found {} chains, {} rules, {} elements where we had {}, {}, {} (pending excluded)",
                    found.chains,
                    found.rules,
                    found.elements - found.pending,
                    exp.chains,
                    exp.rules,
                    exp.elements - exp.pending
                ));
                true
            }
            // Fingerprint matches, or a snapshot is about to be taken (it checks the counts).
            _ => {
                self.applied_routes = None;
                true_if_routes_differ(self)
            }
        }
    }

    /// Converges our routes to the validated Nodes, route by route. Failures are logged, counted and
    /// retried with a backoff of their own (`route_due`); they never fail the reconcile. Unless
    /// `retry`, a want that already failed is left to its retry time.
    fn sync_routes(&mut self, retry: bool) {
        let Some(r) = &self.routes else { return };
        let plan = routes::desired_routes(
            &self.state.nodes,
            &self.cfg.node_name,
            &self.cfg.cluster_cidrs,
        );
        if plan.refused != self.refused {
            for x in plan.refused.iter().filter(|x| !self.refused.contains(x)) {
                warn!(node = %x.node, cidr = %x.cidr, reason = x.reason.label(), "{x}");
            }
            let mut by_reason = std::collections::BTreeMap::new();
            for x in &plan.refused {
                *by_reason.entry(x.reason.label()).or_insert(0u64) += 1;
            }
            self.metrics.refused_pod_cidrs(by_reason);
            self.refused = plan.refused;
        }
        let want = match self.route_want(&plan.routes) {
            Ok(w) => w,
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, retry_in = ?self.route_backoff, "cannot read our links and addresses to place routes; retrying on the routes' own schedule");
                self.applied_routes = None;
                self.route_due = Some(Instant::now() + self.route_backoff);
                self.route_backoff = (self.route_backoff * 2).min(MAX_BACKOFF);
                return;
            }
        };
        if self.applied_routes.as_ref() == Some(&want) {
            return;
        }
        if !retry && self.route_due.is_some() && self.route_attempted.as_ref() == Some(&want) {
            return; // failed before; its retry is scheduled
        }
        for w in plan.warnings.iter().chain(&want.warnings) {
            warn!("{w}");
        }
        let failed = match self.rt.block_on(crate::overlay::converge(
            r,
            self.overlay.as_ref(),
            &want,
        )) {
            Ok(converged) => {
                for d in &converged.overlay.done {
                    info!("{d}");
                }
                for e in &converged.overlay.failed {
                    self.metrics.error(e.kind());
                    warn!(error = %e, retry_in = ?self.route_backoff,
                        "cannot converge the overlay; retrying on the routes' own schedule, policies are not held up");
                }
                let overlay_failed = converged.overlay.failed.len();
                let changes = converged.routes;
                for a in &changes.added {
                    info!(destination = %a.destination, via = %a.via, "pod route added");
                }
                for d in &changes.removed {
                    info!(destination = %d.destination, via = %d.via, "stale pod route removed");
                }
                for (f, e) in &changes.failed {
                    self.metrics.error(e.kind());
                    warn!(destination = %f.destination, via = %f.via, error = %e, retry_in = ?self.route_backoff,
                        "cannot change pod route; retrying on its own schedule, other routes and policies are not held up");
                }
                changes.failed.len() + overlay_failed
            }
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, retry_in = ?self.route_backoff, "cannot list our routes; retrying");
                1
            }
        };
        self.metrics.route_failures(failed as u64);
        if failed == 0 {
            self.applied_routes = Some(want);
            self.route_attempted = None;
            self.route_due = None;
            self.route_backoff = MIN_BACKOFF;
        } else {
            self.applied_routes = None;
            self.route_attempted = Some(want);
            self.route_due = Some(Instant::now() + self.route_backoff);
            self.route_backoff = (self.route_backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn write_conflist(&mut self) -> Result<()> {
        if self.conflist_written {
            return Ok(());
        }
        let Some(me) = self.state.nodes.get(&self.cfg.node_name) else {
            if !std::mem::replace(&mut self.conflist_warned, true) {
                warn!(node = %self.cfg.node_name, "our Node object is not known (check --node-name); no conflist, so no pods start here, until it is");
            }
            return Ok(());
        };
        if me.pod_cidrs.is_empty() {
            if !std::mem::replace(&mut self.conflist_warned, true) {
                warn!(node = %self.cfg.node_name, "our Node has no spec.podCIDRs (kube-controller-manager --allocate-node-cidrs); no conflist until it has");
            }
            return Ok(());
        }
        let overlay =
            self.overlay.is_some() && self.cfg.encapsulation != crate::overlay::Mode::Never;
        let local = match (&self.overlay, self.cfg.mtu) {
            (Some(o), None) => self.rt.block_on(o.local()).unwrap_or_else(|e| {
                warn!(error = %e, "cannot read our links to detect the uplink MTU; assuming 1500 (set --mtu)");
                crate::overlay::Local::default()
            }),
            _ => crate::overlay::Local::default(),
        };
        let mtu = crate::overlay::pod_mtu(self.cfg.mtu, overlay, me, &local);
        if self.cfg.mtu.is_none() {
            info!(
                mtu,
                overlay, "pod MTU derived from the link of our InternalIP (--mtu overrides)"
            );
        }
        let params = cniconf::ConflistParams {
            pod_cidrs: me.pod_cidrs.clone(),
            mtu,
            state_dir: self.cfg.state_dir.clone(),
            ipam_data_dir: self.cfg.ipam_data_dir.clone(),
            fail_open: self.cfg.fail_open,
        };
        let text = cniconf::render(&params)
            .map_err(|e| Error::Conflist(format!("node {}: {e}", self.cfg.node_name)))?;
        cniconf::write(&self.cfg.cni_conf_dir, &text)
            .map_err(|e| Error::Conflist(e.to_string()))?;
        let path = cniconf::conflist_path(&self.cfg.cni_conf_dir);
        info!(path = %path.display(), "conflist written; the runtime can start pods on this node");
        self.conflist_written = true;
        Ok(())
    }
}

/// Resync also re-checks routes: when ours differ from what we want, a route sync is scheduled (on
/// the routes' own schedule: a failing route keeps its backoff). Never asks for a reconcile: false.
fn true_if_routes_differ(e: &mut Engine) -> bool {
    let Some(r) = &e.routes else { return false };
    let routes =
        routes::desired_routes(&e.state.nodes, &e.cfg.node_name, &e.cfg.cluster_cidrs).routes;
    let want = match e.route_want(&routes) {
        Ok(w) => w,
        Err(err) => {
            warn!(error = %err, "cannot read our links and addresses");
            e.route_due.get_or_insert_with(Instant::now);
            return false;
        }
    };
    let overlay_differs = match &e.overlay {
        Some(o) => e.rt.block_on(o.differs(&want)),
        None => Ok(false),
    };
    let have = e.rt.block_on(r.ours());
    match (have, overlay_differs) {
        (Ok(have), Ok(false)) if have == want.routes => {
            e.applied_routes = Some(want);
        }
        (Ok(_), Ok(_)) => {
            warn!("pod routes or overlay entries differ from the cluster's Nodes; converging");
            e.route_due.get_or_insert_with(Instant::now);
        }
        (Err(err), _) | (_, Err(err)) => {
            warn!(error = %err, "cannot list our routes or overlay entries");
            e.route_due.get_or_insert_with(Instant::now);
        }
    }
    false
}

fn describe(ev: &SourceEvent) -> String {
    match ev {
        SourceEvent::Applied(o) => o.reference().to_string(),
        SourceEvent::Deleted(r) => format!("{r} (deleted)"),
        SourceEvent::Synced => "synced".into(),
    }
}
