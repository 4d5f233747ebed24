//! The reconcile engine: one thread that owns the cluster state (inside the incremental compiler)
//! and decides when the kernel changes. The schedule is `schedule` (pure, fake-clock tested); the
//! routes are `route_sync`; the conflist is `cniconf`; this room holds the loop and the commit.
//!
//! Invariants:
//! - One cluster state: the incremental compiler's. Sources send model changes (converted at the
//!   edge); a change that leaves the state as it was (a status heartbeat, a field we do not compile)
//!   schedules nothing, reads no record and takes no lock.
//! - Changes are coalesced for `debounce` after the first one; then one reconcile runs: read the
//!   attachment records and stage them (outside the lock, so the plugin waits only for the commit),
//!   take the node lock, re-read the records (a change of them is one more change to stage), teach
//!   the compiler the pending marks the plugin added, and commit ONE nft transaction: a full replace
//!   when the compiler is stale (at start, at every [`FULL_RESYNC_EVERY`]th resync, after a
//!   failure, when our table was changed behind our back); otherwise the incremental compiler's batch, which applies the changes
//!   since the last commit to what they can affect only (~1 ms at 10k pods, where a full compile +
//!   diff takes ~90 ms) and equals the diff against the last committed ruleset.
//! - A rejected incremental batch falls back to a full replace; any failure leaves the compiler
//!   stale and is retried with backoff while the last committed rules stay in the kernel.
//! - 200 ms after commits our table is read back once, on a thread of its own (a commit never waits
//!   for it): its chain/rule/set counts must match the ruleset, and its fingerprint is what the
//!   resync compares (listed on that thread too; a difference is restored). A change to our table
//!   by any other process (seen by the drift monitor, nf_tables notifications) is restored at once.
//! - The conflist (once) and routes follow each commit; routes retry on their own schedule.
//! - Nothing is enforced before the source reported `Synced`: until then the rules of a previous run
//!   stay in the kernel and new pods stay pending (fail closed).

mod drift;
mod revoke;

use crate::cniconf;
use crate::compiled;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Sizes};
use crate::nft::{Commit, Nft};
use crate::route_sync::RouteSync;
use crate::schedule::{Schedule, SweepCredit};
use crate::source::SourceEvent;
use crate::table_watch::TableWatch;
use palisade_policy::model::Change;
use palisade_policy::ruleset::netlink::NetlinkBatch;
use palisade_policy::IncrementalCompiler;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{Receiver, Sender};
use tracing::{debug, error, info, warn};

/// Attachment directory poll interval when inotify is unavailable.
pub const ATTACHMENT_POLL: Duration = Duration::from_millis(200);

/// Messages already waiting that are handled before the timers run (see `Engine::run`).
const DRAIN: usize = 256;

/// Every this many resyncs the table is compiled and replaced in full (at the default 30 s, every
/// 5 minutes); the others list it off the reconcile thread and restore it only when its fingerprint
/// differs from the one taken after our last commit. At 100k pods a full resync held the reconcile
/// thread ~1.7 s (the listing 0.8 s, the compile and the kernel's commit 0.9 s): at every 30 s,
/// about one change in twenty waited up to ~2 s (BENCHMARKS.md, "The periodic resync").
pub const FULL_RESYNC_EVERY: u32 = 10;

/// Capacity of the engine's channel. Sources wait when it is full (backpressure on a burst of
/// watch events); a list page of the API (500) fits.
pub const CHANNEL: usize = 512;

/// How long a full conntrack sweep gives way to waiting messages (a change to stage and commit
/// first) after it first started; then it runs to its end whatever waits, so churn cannot put off
/// the cuts for longer.
pub const SWEEP_GIVES_WAY: Duration = Duration::from_secs(1);

/// What the engine needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub ipam_data_dir: PathBuf,
    /// `--mtu`; `None`: detected from our uplink (see `overlay::pod_mtu`).
    pub mtu: Option<u32>,
    pub fail_open: bool,
    pub resync: Duration,
    pub debounce: Duration,
    /// Cluster pod CIDRs (`--cluster-cidr`, at most one per family).
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// Egress NAT (`--masquerade`, `--no-masquerade-cidr`; the cluster CIDRs are the field above).
    pub masquerade: bool,
    pub no_masquerade_cidrs: Vec<ipnet::IpNet>,
    /// Poll the attachments dir (set when the inotify watch could not start).
    pub poll_attachments: bool,
}

/// Messages into the engine: one channel, read by the engine directly.
#[derive(Debug)]
pub enum Msg {
    /// A model change (or a rejected object, or the end of the initial list) from the source.
    Source(SourceEvent),
    /// Attachment records changed.
    AttachmentsChanged,
    /// The attachment watch stopped: poll the records from now on.
    AttachmentWatchLost,
    /// Our table was changed by another process (seen by the drift monitor; `what` says what and by
    /// whom): repair the touched chains and sets now, or replace the table when that is unknown.
    Drift {
        what: String,
        touched: palisade_nft::monitor::Touched,
    },
    /// The snapshot reader listed our table for the commit generation `generation` (`check`: for
    /// the resync's check, judged by fingerprint).
    Snapshot {
        generation: u64,
        listing: crate::table_watch::Listing,
        check: bool,
    },
    /// What the flow log's NFLOG reader got: attributed with the model, then written.
    Flows(crate::flow_log::nflog::Read),
    /// A scrape asks what each named counter of our table counts (`policy_metrics`).
    PolicyCounters(tokio::sync::oneshot::Sender<crate::policy_metrics::CounterReport>),
    /// Leave the loop (rules stay in the kernel).
    Stop,
}

impl Msg {
    /// Whether handling it may stage a change or a repair to commit, or stops the loop (a conntrack
    /// sweep gives way to such a message); read-backs, flow log reads and scrapes do not.
    fn calls_for_commit(&self) -> bool {
        match self {
            Msg::Source(_)
            | Msg::AttachmentsChanged
            | Msg::AttachmentWatchLost
            | Msg::Drift { .. }
            | Msg::Stop => true,
            Msg::Snapshot { .. } | Msg::Flows(_) | Msg::PolicyCounters(_) => false,
        }
    }
}

/// Takes the messages waiting on `rx` into `held` (up to [`CHANNEL`] held): whether one of them
/// calls for a commit, or the engine is that far behind.
fn hold_waiting(rx: &mut Receiver<Msg>, held: &mut VecDeque<Msg>) -> bool {
    while held.len() < CHANNEL {
        match rx.try_recv() {
            Ok(m) => held.push_back(m),
            Err(_) => break,
        }
    }
    held.len() >= CHANNEL || held.iter().any(Msg::calls_for_commit)
}

impl From<SourceEvent> for Msg {
    fn from(ev: SourceEvent) -> Self {
        Msg::Source(ev)
    }
}

/// What one reconcile committed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Committed {
    Nothing,
    /// One incremental transaction that only added or deleted these addresses in address sets.
    Addresses(BTreeSet<std::net::IpAddr>),
    /// Anything else: rules, chains, maps, a full replace, a repair.
    Rules,
}

/// The engine's state between reconciles.
pub struct Engine {
    cfg: Config,
    nft: Nft,
    metrics: Arc<Metrics>,
    /// The one cluster state, inside the compiler that holds the last committed ruleset. Stale:
    /// compile and replace in full at the next reconcile.
    inc: IncrementalCompiler,
    synced: bool,
    sched: Schedule,
    /// Routes and overlay; `None` with `--no-routes`.
    routes: Option<RouteSync>,
    /// Reads our table back after commits and judges it.
    table: TableWatch,
    conflist: cniconf::Once,
    /// The next full replace is the periodic one (logged at debug).
    quiet_full: bool,
    /// Resyncs so far: every [`FULL_RESYNC_EVERY`]th compiles and replaces the table in full.
    resyncs: u32,
    /// Cuts established flows the committed ruleset no longer admits, and flushes those of
    /// released addresses (`None`: conntrack could not be opened).
    revoker: Option<crate::conntrack::Revoker>,
    /// Whether flows a policy change revokes are cut (off with `--keep-established-flows`; the
    /// flows of a released address are flushed either way).
    policy_sweeps: bool,
    /// Which pod veth held each local pod address at the last commit (`None` before the first,
    /// unless an earlier agent's table held bindings: see [`Engine::with_bindings_left`]).
    owners: Option<BTreeMap<std::net::IpAddr, String>>,
    sweep_credit: SweepCredit,
    /// When the full sweep now owed first started (cleared once one runs to its end; see
    /// [`SWEEP_GIVES_WAY`]).
    sweep_owed_since: Option<Instant>,
    /// Chains and sets another process touched, to put back at the next reconcile.
    repair: Option<(BTreeSet<String>, BTreeSet<String>)>,
    /// The kernel's copy of our table is lost or unknown (deleted, flushed, changed in ways a
    /// repair cannot name): the next reconcile replaces it with the compiler's ruleset, which is
    /// still right (no recompile: at 10k pods that alone is ~90 ms of the restore).
    replace: bool,
    /// That replace restores a drift: the lockdown table goes first (see [`Engine::lock_down`]).
    lockdown: bool,
    /// Whether a restore commits the lockdown table first (`--restore-lockdown`, default on).
    restore_lockdown: bool,
    /// Compile warnings logged so far: each is logged once while it holds (an incremental commit
    /// would otherwise repeat all of them, up to hundreds per second under churn).
    warned: BTreeSet<String>,
    /// Attributes and writes what the kernel logged (`--flow-log`).
    flow_log: Option<crate::flow_log::FlowLog>,
    /// What the named counters held before our full replaces (which start them from zero).
    carried: crate::policy_metrics::Carried,
    /// The route plan of the Nodes as they were when it was derived; `None` once a Node event
    /// came (derived again when next asked). At 1,000 Nodes deriving it took ~0.9 ms, which
    /// every reconcile paid though Nodes rarely change.
    plan: Option<crate::routes::RoutePlan>,
}

impl Engine {
    pub fn new(cfg: Config, nft: Nft, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        let poll = cfg.poll_attachments.then_some(ATTACHMENT_POLL);
        Engine {
            inc: IncrementalCompiler::empty(&cfg.node_name),
            sched: Schedule::new(now, cfg.debounce, cfg.resync, poll),
            conflist: cniconf::Once::default(),
            cfg,
            nft,
            metrics,
            synced: false,
            routes: None,
            table: TableWatch::default(),
            quiet_full: false,
            resyncs: 0,
            revoker: None,
            policy_sweeps: true,
            owners: None,
            sweep_credit: SweepCredit::new(now),
            sweep_owed_since: None,
            warned: BTreeSet::new(),
            repair: None,
            replace: false,
            lockdown: false,
            restore_lockdown: true,
            flow_log: None,
            carried: Default::default(),
            plan: None,
        }
    }

    /// Log policy drops (and with `cfg.allowed`, admitted connections) through NFLOG group
    /// `cfg.group`, attributed here and written by `log`'s writer.
    pub fn with_flow_log(
        mut self,
        cfg: palisade_policy::model::FlowLog,
        log: crate::flow_log::FlowLog,
    ) -> Self {
        // While the compiler is stale (at start) this only sets the state; the first commit is a
        // full replace with the log rules in it.
        let _ = compiled::stage(&mut self.inc, [Change::SetFlowLog(Some(cfg))]);
        self.flow_log = Some(log);
        self
    }

    /// What one NetworkPolicy may cost this node (`--max-policy-pod-peers`,
    /// `--max-policy-peer-pods`).
    pub fn with_policy_limits(mut self, limits: palisade_policy::model::PolicyLimits) -> Self {
        // While the compiler is stale (at start) this only sets the state.
        let _ = compiled::stage(&mut self.inc, [Change::SetPolicyLimits(limits)]);
        self
    }

    /// Converge routes and the overlay after commits (without: `--no-routes`).
    pub fn with_routes(mut self, routes: RouteSync) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Reads our table back on a thread of its own, answering on `reply` (see [`TableWatch`]).
    pub fn with_snapshot_reader(mut self, reply: Sender<Msg>) -> Result<Self> {
        self.table = TableWatch::with_reader(reply)?;
        Ok(self)
    }

    /// After every commit, cut the established flows the new ruleset would not admit as new, and
    /// flush the flows of addresses whose pod went away.
    pub fn with_revoker(mut self, revoker: crate::conntrack::Revoker) -> Self {
        self.revoker = Some(revoker);
        self
    }

    /// `--keep-established-flows`: flows a policy change revokes stay up; the flows of an address
    /// whose pod went away are still flushed (they were never the next pod's).
    pub fn keep_established_flows(mut self) -> Self {
        self.policy_sweeps = false;
        self
    }

    /// A full restore after drift commits the full table only, no lockdown table first
    /// (`--restore-lockdown=false`).
    pub fn without_restore_lockdown(mut self) -> Self {
        self.restore_lockdown = false;
        self
    }

    /// Starts from the source bindings an earlier agent left in our table (read before our first
    /// commit replaces them): the first commit then flushes the flows of every address whose pod
    /// changed while no agent ran, as later commits do for changes they see. Without a table (a
    /// node's first start, or after a reboot, when conntrack is empty too) the first commit only
    /// records the owners. An agent restart with no pod changed keeps every flow.
    pub fn with_bindings_left(mut self) -> Self {
        match self.nft.bindings() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => {
                info!(
                    addresses = left.len(),
                    "source bindings found in the table an earlier agent left; flows of the addresses whose pod changed since are flushed at the first commit"
                );
                self.owners = Some(left);
            }
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, "cannot read the source bindings an earlier agent left; flows of pods deleted while no agent ran are not flushed (a pod given such an address may receive its predecessor's established flows until they end)");
            }
        }
        self
    }

    /// Flushes from conntrack the flows of every address whose attachment went away or changed
    /// since the last commit (a deleted pod's, or one a new pod now holds): without it a peer's
    /// established flow to a deleted pod went on to the next pod given its address, whatever that
    /// pod's policies say, with `--keep-established-flows` for as long as the flow lasted. An
    /// attachment is known by the veth its addresses are bound to (the name the record's ids
    /// derive), as our table's source sets bind them.
    fn flush_released(&mut self, attachments: &[palisade_contract::Attachment]) {
        let now: BTreeMap<std::net::IpAddr, String> = attachments
            .iter()
            .flat_map(|a| {
                let veth = palisade_contract::host_veth_name(&a.container_id, &a.ifname);
                a.ips.iter().map(move |ip| (*ip, veth.clone()))
            })
            .collect();
        let released: BTreeSet<std::net::IpAddr> = match &self.owners {
            Some(before) => before
                .iter()
                .filter(|(ip, key)| now.get(*ip) != Some(*key))
                .map(|(ip, _)| *ip)
                .collect(),
            None => BTreeSet::new(),
        };
        self.owners = Some(now);
        let Some(revoker) = self.revoker.as_mut() else {
            return;
        };
        if released.is_empty() {
            return;
        }
        let list = released
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        match revoker.flush_addresses(&released) {
            Ok(0) => debug!(addresses = %list, "released addresses had no flows"),
            Ok(n) => {
                self.metrics.flows_revoked("released", n, 0);
                info!(addresses = %list, flows = n, "flows of addresses whose pod went away flushed from conntrack; a pod given one of them later starts with none");
            }
            Err(e) => {
                self.metrics.error(e.kind());
                warn!(error = %e, addresses = %list, "cannot flush the flows of released addresses; a pod given one of them may receive its predecessor's established flows until they end");
            }
        }
    }

    /// Runs until [`Msg::Stop`] or every sender is gone. `rt` runs the waits for messages.
    pub fn run(mut self, mut rx: Receiver<Msg>, rt: tokio::runtime::Handle) {
        // Messages a sweep took off the channel while asking whether to give way: handled first,
        // in their order.
        let mut held: VecDeque<Msg> = VecDeque::new();
        loop {
            let first = match held.pop_front() {
                Some(m) => Some(m),
                None => {
                    let recheck = self.revoker.as_ref().and_then(|r| r.recheck_due());
                    let wait = self
                        .sched
                        .next_wake(recheck)
                        .saturating_duration_since(Instant::now());
                    // The timer is made inside the block: it needs the runtime's context.
                    match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Ok(None) => Some(Msg::Stop),
                        Ok(Some(m)) => Some(m),
                        Err(_elapsed) => None,
                    }
                }
            };
            if let Some(m) = first {
                if matches!(m, Msg::Stop) {
                    info!("reconcile loop stopping; rules stay in the kernel");
                    return;
                }
                self.on_msg(m);
                // What arrived together is handled together: a Pod and its policy written at once
                // must not be split by a reconcile between them because staging the first took
                // longer than the debounce (a busy node). Bounded, so a flood cannot starve it.
                for _ in 0..DRAIN {
                    let next = match held.pop_front() {
                        Some(m) => Ok(m),
                        None => rx.try_recv(),
                    };
                    match next {
                        Ok(Msg::Stop) => {
                            info!("reconcile loop stopping; rules stay in the kernel");
                            return;
                        }
                        Ok(m) => self.on_msg(m),
                        Err(_) => break,
                    }
                }
            }
            self.on_timers(&mut || hold_waiting(&mut rx, &mut held));
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        let now = Instant::now();
        match msg {
            Msg::Source(ev) => {
                if self.on_event(ev) {
                    // The debounce counts from when the change is in the model.
                    self.sched.changed(Instant::now());
                    if let Some(f) = &mut self.flow_log {
                        f.state_changed();
                    }
                }
            }
            Msg::PolicyCounters(reply) => {
                let _ = reply.send(crate::policy_metrics::CounterReport {
                    described: self.inc.compiled().policy_counters(),
                    carried: self.carried.values().clone(),
                });
            }
            Msg::Flows(read) => {
                if let Some(f) = &mut self.flow_log {
                    f.record(read, self.inc.state(), self.inc.compiled());
                }
            }
            Msg::AttachmentsChanged => self.sched.changed(now),
            Msg::AttachmentWatchLost => {
                warn!(every = ?ATTACHMENT_POLL, "attachment watch stopped; polling the records instead");
                self.sched.poll_attachments(now, ATTACHMENT_POLL);
            }
            Msg::Drift { what, touched } => {
                // Straight to a repair: no listing, no comparison (our own commits never arrive
                // here). Before the first commit the first reconcile replaces the table anyway.
                if self.synced && !self.replacing() {
                    self.repair_needed(&what, touched);
                    self.sched.reconcile_now(now);
                }
            }
            Msg::Snapshot {
                generation,
                listing,
                check,
            } => {
                if !self.replacing() {
                    if check {
                        let verdict = self.table.checked(generation, listing);
                        self.checked(verdict);
                    } else {
                        let verdict = self.table.listed(generation, listing);
                        self.judged(verdict);
                    }
                }
            }
            Msg::Stop => {}
        }
    }

    /// Whether the next reconcile replaces the whole table (the compiler is stale, or the kernel's
    /// copy is lost): until then, looks at the table have nothing to compare.
    fn replacing(&self) -> bool {
        self.inc.is_stale() || self.replace
    }

    /// Does what the schedule says is due. `waiting`: whether a message waits that calls for a
    /// commit (a sweep gives way to it).
    fn on_timers(&mut self, waiting: &mut dyn FnMut() -> bool) {
        let now = Instant::now();
        let due = self.sched.fire(now);
        if due.resync && self.synced {
            self.resyncs = self.resyncs.wrapping_add(1);
            if self.resyncs.is_multiple_of(FULL_RESYNC_EVERY) {
                // The backstop: say whether anything drifted (log, metric), then compile and
                // replace the whole table anyway, so even a change the fingerprint cannot see (or
                // an incremental compile that went astray) is undone.
                let drifted = self.check_table();
                self.quiet_full = !drifted && !self.replacing();
                self.inc.invalidate();
            } else if !self.replacing() && !self.table.request_check() {
                // No reader thread (the engine's own tests): the check inline; a drift it finds
                // is restored by the reconcile the resync asks for.
                self.check_table();
            }
        }
        if due.routes && self.synced {
            let plan = self.route_plan();
            self.sync_routes(plan, true);
            self.follow_overlay_use();
        }
        if due.snapshot && !self.replacing() {
            let verdict = self.table.snapshot(&self.metrics);
            self.judged(verdict);
        }
        if due.reconcile {
            if !self.synced {
                // Nothing is enforced before Synced; Synced schedules the first reconcile.
                self.sched.cancel_reconcile();
            } else {
                match self.reconcile() {
                    Ok(commit) => {
                        let sweep = self.revoke_after(&commit);
                        let committed = !matches!(commit, Committed::Nothing);
                        self.sched.reconciled(Instant::now(), committed, sweep);
                        self.follow_overlay_use();
                    }
                    Err(e) => {
                        self.metrics.error(e.kind());
                        self.inc.invalidate();
                        let retry_in = self.sched.reconcile_failed(Instant::now());
                        error!(error = %e, ?retry_in, "reconcile failed; the last committed rules stay enforced");
                    }
                }
            }
        }
        if due.sweep {
            self.revoke(waiting);
        }
        self.recheck_revoked();
    }

    /// Applies a source event; true when a reconcile is needed. A change that leaves the state as
    /// it was needs none.
    fn on_event(&mut self, ev: SourceEvent) -> bool {
        match ev {
            SourceEvent::Changed { object, change } => {
                let node = matches!(change, Change::UpsertNode(_) | Change::DeleteNode { .. });
                let changed = match compiled::stage(&mut self.inc, [change]) {
                    Ok(changed) => changed,
                    Err(e) => {
                        self.metrics.error(e.kind());
                        error!(%object, error = %e, "compiling the change failed; compiling in full");
                        self.inc.invalidate();
                        true
                    }
                };
                if node && changed {
                    self.plan = None;
                }
                self.metrics
                    .source_change(if changed { "changed" } else { "unchanged" });
                if changed {
                    debug!(%object, "state changed");
                }
                changed && self.synced
            }
            SourceEvent::Rejected { object, error } => {
                self.metrics.source_change("rejected");
                self.metrics.error("bad_object");
                warn!(%object, %error, "skipping invalid object (its previous version, if any, stays); fix it: the API server would have rejected it");
                false
            }
            SourceEvent::Synced => {
                if !self.synced {
                    let st = self.inc.state();
                    info!(
                        pods = st.pods.len(),
                        policies = st.policies.len(),
                        nodes = st.nodes.len(),
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

    /// Logs the compile warnings that are new since the last commit.
    fn log_new_warnings(&mut self) {
        for w in compiled::new_warnings(&mut self.warned, &self.inc.compiled().warnings) {
            warn!("{w}");
        }
    }

    /// One reconcile: stage the attachment records, egress NAT and tunnel guard and compile (outside the lock, so
    /// the plugin waits only for the commit), then under the node lock re-read the records (their
    /// change is one more change to stage) and commit one transaction; then conflist and routes.
    /// Says what was committed.
    fn reconcile(&mut self) -> Result<Committed> {
        self.metrics.reconcile_started();
        let start = Instant::now();
        // The full table's messages, built while the lockdown waited (with the records then).
        let prebuilt = if std::mem::take(&mut self.lockdown) {
            self.lock_down()
        } else {
            None
        };
        let node = self.cfg.node_name.clone();
        let before = self.read_attachments();
        compiled::stage(&mut self.inc, [Change::SetAttachments(before.clone())])?;
        let nat = crate::egress_nat::NatConfig {
            enabled: self.cfg.masquerade,
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            no_masquerade: self.cfg.no_masquerade_cidrs.clone(),
        };
        // One route plan for egress NAT, the tunnel guard and the routes: the Nodes they read are
        // the state's, unchanged until this reconcile ends.
        let plan = self.route_plan();
        if let Some(change) = crate::egress_nat::change(&nat, self.inc.state(), &node, &plan) {
            compiled::stage(&mut self.inc, [change])?;
        }
        let overlay = self.overlay_use();
        if let Some(change) = crate::tunnel_guard::change(overlay, self.inc.state(), &node, &plan) {
            compiled::stage(&mut self.inc, [change])?;
        }
        let stale = self.inc.is_stale();
        let full = stale || self.replace;
        compiled::recompile(&mut self.inc)?;
        let lock = crate::lock::acquire(&self.cfg.state_dir)?;
        self.metrics.lock_acquired();
        let attachments = self.read_attachments();
        if attachments != before {
            compiled::stage(&mut self.inc, [Change::SetAttachments(attachments.clone())])?;
        }
        self.log_new_warnings();
        // The plugin's pending marks are taken as committed (the full replace overwrites them).
        let batch = compiled::take_batch(&mut self.inc, &attachments)?;
        // Built from this very ruleset only if nothing was staged since and the records are the
        // ones it was built with (a pending mark the plugin added since is in the ruleset now).
        let prebuilt = prebuilt
            .filter(|(records, _)| !stale && batch.is_none() && *records == attachments)
            .map(|(_, b)| b);
        let mut full = full;
        let repair = self.repair.take();
        // The addresses the batch moved in or out of address sets, when that is all it did.
        let mut moved: Option<BTreeSet<std::net::IpAddr>> = None;
        let mut committed = if full {
            self.commit_full(prebuilt)?;
            true
        } else {
            match batch {
                None => false,
                Some(batch) => match self.nft.apply_batch(&batch) {
                    Ok(Commit::Unheard) => {
                        self.unheard();
                        self.commit_full(None)?;
                        full = true;
                        true
                    }
                    Ok(Commit::Heard | Commit::Quiet) => {
                        debug!(stats = %batch.stats, "incremental transaction committed");
                        moved = batch
                            .elements
                            .as_ref()
                            .map(|changes| changes.iter().flat_map(|c| c.key.addrs()).collect());
                        true
                    }
                    Err(e) => {
                        self.metrics.error("nft_rejected");
                        error!(error = %e, objects = %batch.stats, "nft rejected the incremental batch; falling back to a full replace");
                        debug!(batch = %batch.json_text(), "rejected batch");
                        self.commit_full(None)?;
                        full = true;
                        true
                    }
                },
            }
        };
        if let (Some((chains, sets)), false) = (repair, full) {
            // After the batch: the repair writes the touched objects as the compiler has them now
            // (chains and sets: not a commit of addresses only).
            moved = None;
            match self.inc.ruleset().repair(&chains, &sets) {
                Some(b) => match self.nft.apply_repair(&b) {
                    Ok(Commit::Unheard) => {
                        self.unheard();
                        self.commit_full(None)?;
                        full = true;
                    }
                    Ok(Commit::Heard | Commit::Quiet) => {
                        self.inc.sets_repaired(&sets);
                        info!(chains = ?chains, sets = ?sets, took_ms = start.elapsed().as_secs_f64() * 1e3, "touched chains and sets repaired");
                    }
                    Err(e) => {
                        self.metrics.error("nft_rejected");
                        error!(error = %e, "nft rejected the repair; replacing the table");
                        self.commit_full(None)?;
                        full = true;
                    }
                },
                None => {
                    self.commit_full(None)?;
                    full = true;
                }
            }
            committed = true;
        }
        drop(lock);
        if full {
            self.replace = false;
        }
        self.flush_released(&attachments);
        let took = start.elapsed();
        let stats = self.inc.ruleset().stats();
        let pending = self.inc.compiled().pending.len();
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
        let st = self.inc.state();
        let sizes = Sizes {
            pods: st.pods.len() as u64,
            policies: st.policies.len() as u64,
            chains: stats.chains as u64,
            rules: stats.rules as u64,
            sets: stats.sets as u64,
            set_elements: stats.elements as u64,
            pending: pending as u64,
            cluster_policies: st.cluster_policies.len() as u64,
            priority_ties: self.inc.compiled().priority_ties.len() as u64,
            refused_policies: self
                .inc
                .compiled()
                .policies
                .values()
                .filter(|p| p.refused.is_some())
                .count() as u64,
        };
        self.metrics.commit_ok(took, full, sizes);
        if committed {
            self.table.committed(stats);
            if !full && moved.is_none() {
                // A policy deleted since carries nothing into one created again later (a batch
                // of address elements only, the common one under churn, deletes no counter).
                self.forget_gone_counters();
            }
        }
        // The conflist first: a route that cannot be added (retried with backoff) must not keep pods
        // from starting on this node. Routes fail and retry on their own schedule: a bad Node never
        // delays a policy commit.
        self.write_conflist()?;
        // Ready only now: /readyz must not say 200 while the runtime still has no conflist.
        self.metrics.set_ready();
        self.sync_routes(plan, false);
        Ok(match (committed, moved) {
            (false, _) => Committed::Nothing,
            (true, Some(addrs)) if !full => Committed::Addresses(addrs),
            (true, _) => Committed::Rules,
        })
    }

    /// Replaces our whole table with the compiler's ruleset; a failure leaves the compiler stale.
    /// The named counters are read first: the replace starts them from zero, and what they
    /// held is carried in the per-policy metrics.
    /// `prebuilt`: the ruleset's netlink messages, when built already (see [`Engine::lock_down`]).
    fn commit_full(&mut self, prebuilt: Option<NetlinkBatch>) -> Result<()> {
        let applied = replace_carrying(&self.nft, &mut self.carried, self.inc.ruleset(), prebuilt);
        match &applied {
            Ok(r) => {
                debug!(
                    by = ?r.by,
                    prepare_ms = r.prepare.as_secs_f64() * 1e3,
                    commit_ms = r.commit.as_secs_f64() * 1e3,
                    bytes = r.bytes,
                    "full replace committed"
                );
                self.inc.table_replaced();
                self.forget_gone_counters();
            }
            Err(_) => self.inc.invalidate(),
        }
        applied.map(|_| ())
    }

    /// Drops what was carried for counters our ruleset no longer has.
    fn forget_gone_counters(&mut self) {
        let counters = &self.inc.ruleset().counters;
        self.carried.retain(|n| counters.contains(n));
    }

    /// The routes the Nodes call for (validated): what route sync converges to, egress NAT
    /// exempts and the tunnel guard admits. Derived again only after a Node event.
    fn route_plan(&mut self) -> crate::routes::RoutePlan {
        let (nodes, name, cidrs) = (
            &self.inc.state().nodes,
            &self.cfg.node_name,
            &self.cfg.cluster_cidrs,
        );
        self.plan
            .get_or_insert_with(|| crate::routes::desired_routes(nodes, name, cidrs))
            .clone()
    }

    fn sync_routes(&mut self, plan: crate::routes::RoutePlan, retry: bool) {
        if let Some(r) = self.routes.as_mut() {
            r.sync(
                &self.inc.state().nodes,
                plan,
                &mut self.sched,
                &self.metrics,
                retry,
            );
        }
    }

    /// What the overlay asks of our table (nothing without managed routes).
    fn overlay_use(&self) -> crate::tunnel_guard::Use {
        self.routes
            .as_ref()
            .map_or(crate::tunnel_guard::Use::NONE, RouteSync::overlay_use)
    }

    /// Route sync plans after the commit: when its plan moved the first route onto the overlay or
    /// the last one off it (a Node joining, leaving or moving, our addresses changing), the tunnel
    /// guard the table holds is no longer the one wanted, and a reconcile brings it.
    fn follow_overlay_use(&mut self) {
        let plan = self.route_plan();
        let unmet = crate::tunnel_guard::unmet(
            self.overlay_use(),
            self.inc.state(),
            &self.cfg.node_name,
            &plan,
        );
        if unmet.is_some() {
            self.sched.changed(Instant::now());
        }
    }

    fn write_conflist(&mut self) -> Result<()> {
        if self.conflist.is_written() {
            return Ok(());
        }
        let Some(me) = self.inc.state().nodes.get(&self.cfg.node_name) else {
            self.conflist.not_yet(&format!("our Node {} is not known (check --node-name); no conflist, so no pods start here, until it is", self.cfg.node_name));
            return Ok(());
        };
        if me.pod_cidrs.is_empty() {
            self.conflist.not_yet(&format!("our Node {} has no spec.podCIDRs (kube-controller-manager --allocate-node-cidrs); no conflist until it has", self.cfg.node_name));
            return Ok(());
        }
        let overlay = self.routes.as_ref().is_some_and(RouteSync::overlay_in_use);
        let local = match (&self.routes, self.cfg.mtu) {
            (Some(r), None) => r.local().unwrap_or_else(|e| {
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
        let conflist = |source| Error::Conflist {
            node: self.cfg.node_name.clone(),
            source,
        };
        let text = cniconf::render(&params).map_err(conflist)?;
        cniconf::write(&self.cfg.cni_conf_dir, &text).map_err(conflist)?;
        let path = cniconf::conflist_path(&self.cfg.cni_conf_dir);
        info!(path = %path.display(), "conflist written; the runtime can start pods on this node");
        self.conflist.written();
        Ok(())
    }
}

/// Replaces our whole table with `rs` (`Nft::replace_table`), carrying what its named
/// counters held into `carried` once the replace committed: they are read first, as the replace
/// starts them from zero. The full replace and the lockdown ahead of a restore both go this way.
fn replace_carrying(
    nft: &Nft,
    carried: &mut crate::policy_metrics::Carried,
    rs: &palisade_policy::ruleset::Ruleset,
    prebuilt: Option<NetlinkBatch>,
) -> Result<crate::nft::Replaced> {
    let counts = nft.counters().packets().map_err(|e| {
        debug!(error = %e, "cannot read the named counters before the full replace; the per-policy counters restart from zero");
    });
    let applied = nft.replace_table(rs, prebuilt);
    if let (Ok(_), Ok(counts)) = (&applied, counts) {
        carried.replaced(counts);
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep asks whether to give way: read-backs, flow log reads and scrapes do not make it
    /// stop, a change to commit does; whatever it took off the channel is kept, in order.
    #[test]
    fn a_sweep_gives_way_only_to_messages_that_call_for_a_commit() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(CHANNEL);
        let mut held = VecDeque::new();
        assert!(!hold_waiting(&mut rx, &mut held), "nothing waits");
        let (scrape, _answer) = tokio::sync::oneshot::channel();
        tx.try_send(Msg::PolicyCounters(scrape)).unwrap();
        assert!(!hold_waiting(&mut rx, &mut held), "a scrape is no change");
        tx.try_send(Msg::AttachmentsChanged).unwrap();
        assert!(hold_waiting(&mut rx, &mut held), "a new pod's record waits");
        assert!(matches!(
            held.iter().collect::<Vec<_>>()[..],
            [Msg::PolicyCounters(_), Msg::AttachmentsChanged]
        ));
        // A full backlog gives way too (the channel's producers wait on us).
        let mut held = VecDeque::new();
        for _ in 0..CHANNEL {
            let (scrape, _) = tokio::sync::oneshot::channel();
            tx.try_send(Msg::PolicyCounters(scrape)).unwrap();
        }
        assert!(hold_waiting(&mut rx, &mut held));
        assert_eq!(held.len(), CHANNEL);
    }
}
