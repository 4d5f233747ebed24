//! The agent's nft edge: our table through palisade-nft (which runs the transactions: libnftables
//! in-process, `nft -j -f -` as fallback), the drift watch (nf_tables notifications of changes we
//! did not commit), and the summary the resync compares to notice changes behind our back (read
//! over nfnetlink by palisade-nft). Only our table is ever listed; other tables are never parsed.

use crate::error::{Error, Result};
use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};
use palisade_nft::monitor::{Drift, Membership, Monitor, Scope};
pub use palisade_nft::Backend;
use palisade_policy::ruleset::netlink::NetlinkBatch;
use palisade_policy::ruleset::{ElementChange, NewSetNaming, Ruleset, Unsupported};

/// palisade-nft bound to our table, with errors in the agent's type.
pub struct Nft {
    runner: palisade_nft::Nft,
    /// Address element transactions on one socket kept open (see [`Nft::apply_elements`]).
    elements: std::sync::Mutex<palisade_nft::setelem::ElementWriter>,
    /// The drift monitor's subscription switch, while one runs (see [`Nft::replace_table`]).
    monitor: MonitorSwitch,
    /// Our named counters, read before each full replace and at each scrape.
    counters: Counters,
    /// Incremental batches this large or larger go quiet ([`QUIET_BATCH_BYTES`] by default).
    quiet_batch_bytes: usize,
    /// How a full replace's element messages name the sets it creates: by ID alone on a kernel
    /// that finds them so at once (`palisade_nft::kernel`), else as nft does.
    naming: NewSetNaming,
}

/// Our table's named counters over one kept nfnetlink socket
/// ([`palisade_nft::counters::CounterReader`]), shared by the engine (before each full replace)
/// and the metrics scrape: a socket opened and closed per read waited, at its close, for the
/// kernel to free what a large deletion left (7-16 ms at 10k pods after our table was flushed
/// behind our back, paid by the restore before its commit).
#[derive(Clone)]
pub struct Counters(std::sync::Arc<std::sync::Mutex<palisade_nft::counters::CounterReader>>);

impl Default for Counters {
    fn default() -> Self {
        Counters(std::sync::Arc::new(std::sync::Mutex::new(
            palisade_nft::counters::CounterReader::new(TABLE_FAMILY, TABLE_NAME),
        )))
    }
}

impl Counters {
    /// Packets of each named counter of our table, by name (over nfnetlink, whatever the
    /// backend); empty without the table.
    pub fn packets(&self) -> Result<std::collections::HashMap<String, u64>> {
        let mut reader = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(reader.packets()?)
    }
}

/// Where the drift monitor's thread leaves its [`Membership`] switch (a new one when it reopens),
/// and how a quiet full replace that could not make it listen again tells the thread to reopen.
#[derive(Clone, Default)]
pub struct MonitorSwitch(std::sync::Arc<SwitchState>);

#[derive(Default)]
struct SwitchState {
    membership: std::sync::Mutex<Option<Membership>>,
    /// Set when rejoining the group failed: the monitor hears nothing until it reopens.
    deaf: std::sync::atomic::AtomicBool,
}

impl MonitorSwitch {
    /// The monitor could not rejoin the notification group: its thread reopens it (a fresh
    /// subscription) and reports an unknown change, so what it missed is restored.
    pub fn report_rejoin_failure(&self) {
        self.0.deaf.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How often the drift monitor's thread looks at [`SwitchState::deaf`] while it hears nothing.
const DEAF_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Tries of a full replace bound to the generation read just before it (another process's commit
/// in between refuses it) before it goes without leaving the notification group.
const QUIET_REPLACE_TRIES: usize = 3;

/// Incremental batches of this many bytes of messages or more are committed with the drift
/// monitor out of the notification group (`Nft::commit_batch_quietly`); smaller ones cost the
/// kernel little to notify, and going quiet costs two generation reads.
pub const QUIET_BATCH_BYTES: usize = 256 << 10;

/// How an incremental batch or a repair went in, and whether the drift monitor heard of every
/// transaction other than ours meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Committed with the monitor listening (small batches; no monitor running).
    Heard,
    /// Committed with the monitor out of the notification group, and nobody else committed.
    Quiet,
    /// Another process committed while the monitor was out for a quiet commit of ours: what
    /// that changed is unknown, so our table must be restored (the batch may not be in).
    Unheard,
}

impl Nft {
    /// A runner for `backend`. A `Lib` backend whose library cannot be loaded degrades to exec.
    /// The lib backend acts on the network namespace of the calling thread.
    pub fn new(backend: Backend) -> Self {
        Nft {
            runner: palisade_nft::Nft::new(backend),
            elements: Default::default(),
            monitor: Default::default(),
            counters: Default::default(),
            quiet_batch_bytes: QUIET_BATCH_BYTES,
            naming: if palisade_nft::kernel::finds_new_sets_by_id() {
                NewSetNaming::IdOnly
            } else {
                NewSetNaming::NameAndId
            },
        }
    }

    /// `rs`'s full replace as nfnetlink messages, written for this kernel (see `naming`).
    pub fn full_replace_netlink(
        &self,
        rs: &Ruleset,
    ) -> std::result::Result<NetlinkBatch, Unsupported> {
        rs.full_replace_netlink_naming(self.naming)
    }

    /// Incremental batches of `bytes` or more go quiet (tests make every batch go quiet).
    pub fn with_quiet_batch_bytes(mut self, bytes: usize) -> Self {
        self.quiet_batch_bytes = bytes;
        self
    }

    /// The backend actually in use.
    pub fn backend(&self) -> Backend {
        self.runner.backend()
    }

    /// Applies one JSON batch (`{"nftables":[...]}`) as one atomic transaction.
    pub fn apply(&self, batch: &str) -> Result<()> {
        Ok(self.runner.apply(batch)?)
    }

    /// Commits an incremental batch: as set element messages when that is all it is
    /// ([`Nft::apply_elements`]), else as the compiler's nfnetlink messages for it on the same
    /// kept socket (libnftables would first refetch its cache of our whole table: at 100k pods
    /// ~50 ms of every change), else (or when the kernel refuses those) its JSON through nft,
    /// whose error says what is wrong.
    ///
    /// A large batch goes quiet ([`QUIET_BATCH_BYTES`], `Nft::commit_batch_quietly`).
    pub fn apply_batch(&self, batch: &crate::compiled::Batch) -> Result<Commit> {
        if let Some(changes) = &batch.elements {
            return self.apply_elements(changes).map(|()| Commit::Heard);
        }
        self.commit("incremental batch", batch.netlink.as_ref(), || {
            batch.json_text()
        })
    }

    /// Commits a repair of touched chains and sets (`Ruleset::repair`) as [`Nft::apply_batch`]
    /// commits a batch that is not only elements.
    pub fn apply_repair(&self, batch: &palisade_policy::Batch) -> Result<Commit> {
        self.commit("repair", batch.netlink.as_ref(), || batch.to_json_string())
    }

    /// Commits a transaction as the compiler's nfnetlink messages on the kept socket when it has
    /// them, else (or when the kernel refuses them) as its JSON through nft, whose error says
    /// what is wrong.
    fn commit(
        &self,
        action: &'static str,
        netlink: Option<&palisade_policy::ruleset::NetlinkBatch>,
        json: impl FnOnce() -> String,
    ) -> Result<Commit> {
        if let Some(netlink) = netlink {
            let mut writer = self.elements.lock().unwrap_or_else(|p| p.into_inner());
            let parts = netlink.parts();
            let committed = if netlink.len() >= self.quiet_batch_bytes {
                self.commit_batch_quietly(&mut writer, action, &parts)
            } else {
                writer
                    .commit_prepared(action, TABLE_NAME, &parts)
                    .map(|()| Commit::Heard)
                    .map_err(Error::from)
            };
            match committed {
                Ok(heard) => return Ok(heard),
                Err(e) => {
                    tracing::debug!(error = %e, action, "netlink transaction refused; committing its JSON through nft for nft's account of it")
                }
            }
        }
        self.apply(&json())?;
        Ok(Commit::Heard)
    }

    /// Commits a large incremental batch with the drift monitor out of the notification group
    /// (the kernel would build a notification per element for it: at 100k pods a binding that
    /// brings 2 MB of peer-set elements took ~180 ms to commit with the monitor listening, ~90
    /// without). The batch is bound to the generation read while still listening, so another
    /// process's commit before ours refuses it, and the generation after rejoining must be the
    /// next one (ours). Either way round, another transaction landed while the monitor was out
    /// and what it changed is unknown: [`Commit::Unheard`], whether the batch went in or not, and
    /// the engine replaces the table at once (which carries the batch). Without a monitor
    /// running, an ordinary commit.
    fn commit_batch_quietly(
        &self,
        writer: &mut palisade_nft::setelem::ElementWriter,
        action: &'static str,
        bytes: &[&[u8]],
    ) -> Result<Commit> {
        self.quiet_commit(writer, |w, generation| {
            w.commit_prepared_at(action, TABLE_NAME, bytes, generation)
        })
    }

    /// The protocol of [`Nft::commit_batch_quietly`] around `commit`, which commits on the writer
    /// bound to the generation it is given (`None`: unbound, no monitor running).
    fn quiet_commit(
        &self,
        writer: &mut palisade_nft::setelem::ElementWriter,
        commit: impl FnOnce(
            &mut palisade_nft::setelem::ElementWriter,
            Option<u32>,
        ) -> palisade_nft::Result<()>,
    ) -> Result<Commit> {
        let before = writer.generation()?;
        let mut commit = Some(commit);
        let outcome = self.out_of_group(|| match commit.take() {
            Some(c) => c(writer, Some(before)),
            None => Ok(()),
        })?;
        let (heard, committed) = match outcome {
            None => {
                if let Some(c) = commit.take() {
                    c(writer, None)?;
                }
                return Ok(Commit::Heard);
            }
            Some((_, false)) => (false, Ok(())),
            Some((Ok(()), true)) => (writer.generation()? == before.wrapping_add(1), Ok(())),
            Some((Err(e), true)) if e.is_generation_moved() => (false, Ok(())),
            // Refused for a reason of its own: nobody else may have committed while we were out.
            Some((Err(e), true)) => (writer.generation()? == before, Err(e)),
        };
        if !heard {
            return Ok(Commit::Unheard);
        }
        committed?;
        Ok(Commit::Quiet)
    }

    /// Runs `commit` with the drift monitor out of the notification group, and has it listen
    /// again whatever happened; `None` (without running it) when no monitor runs. A monitor that
    /// cannot rejoin is reopened by its thread, which has what it missed restored; the second
    /// value says whether it rejoined.
    fn out_of_group<T>(&self, commit: impl FnOnce() -> T) -> Result<Option<(T, bool)>> {
        let switch = self
            .monitor
            .0
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(m) = switch.as_ref() else {
            return Ok(None);
        };
        m.leave()?;
        let out = commit();
        let rejoined = match m.join().or_else(|_| m.join()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the drift monitor could not rejoin the notification group after a quiet commit; reopening it and restoring our table");
                self.monitor.report_rejoin_failure();
                false
            }
        };
        Ok(Some((out, rejoined)))
    }

    /// Adds and deletes elements of our table's address-keyed sets, in order, as one atomic transaction
    /// of nfnetlink set element messages (palisade-nft's `setelem`): no libnftables run, so no
    /// refetch of its cache of our chains, sets and counters, which at 10k pods cost more than
    /// the change. One socket, opened at first use in the calling thread's namespace and kept (a
    /// socket per transaction would wait a grace period at each close); its portid counts as ours
    /// for the drift monitor.
    pub fn apply_elements(&self, changes: &[ElementChange]) -> Result<()> {
        use palisade_nft::setelem::{self, Key, SetOp};
        use palisade_policy::ruleset::ElementKey;
        let ops: Vec<setelem::ElementOp<'_>> = changes
            .iter()
            .map(|c| {
                let op = if c.add { SetOp::Add } else { SetOp::Delete };
                let key = match &c.key {
                    ElementKey::Addr(a) => Key::Addr(*a),
                    ElementKey::IfaceAddr(name, a) => Key::IfnameAddr(name.as_str(), *a),
                    ElementKey::AddrPair(a, b) => Key::AddrPair(*a, *b),
                };
                (op, c.set.as_str(), key)
            })
            .collect();
        let mut writer = self.elements.lock().unwrap_or_else(|p| p.into_inner());
        Ok(writer.apply(TABLE_FAMILY, TABLE_NAME, &ops)?)
    }

    /// The slot the drift monitor's thread keeps its subscription switch in.
    pub fn monitor_switch(&self) -> MonitorSwitch {
        self.monitor.clone()
    }

    /// Replaces our whole table with `rs` in one transaction: as nfnetlink messages built by the
    /// compiler (`Ruleset::full_replace_netlink`), on the element writer's socket (so the drift
    /// monitor counts it as ours), else, when the compiler cannot encode the ruleset or the kernel
    /// refuses the messages, as JSON through nft. Nothing is half applied either way.
    ///
    /// With a drift monitor running, the commit goes quiet (`Nft::commit_quietly`): the kernel
    /// builds a notification per rule, element and object of the transaction for every listener,
    /// and ours is usually the only one (at 100k pods that was most of a 5 s commit).
    ///
    /// `prebuilt`: `rs`'s netlink messages when the caller built them already (from
    /// `Ruleset::full_replace_netlink` of this very ruleset).
    pub fn replace_table(&self, rs: &Ruleset, prebuilt: Option<NetlinkBatch>) -> Result<Replaced> {
        let start = std::time::Instant::now();
        let built = match prebuilt {
            Some(b) => Ok(b),
            None => self.full_replace_netlink(rs),
        };
        let why = match built {
            Ok(batch) => {
                let built = start.elapsed();
                let mut writer = self.elements.lock().unwrap_or_else(|p| p.into_inner());
                match self.commit_quietly(&mut writer, &batch.parts()) {
                    Ok(quiet) => {
                        return Ok(Replaced {
                            by: ReplacePath::Netlink { quiet },
                            prepare: built,
                            commit: start.elapsed() - built,
                            bytes: batch.len(),
                        })
                    }
                    Err(e) => format!("the kernel refused the netlink batch: {e}"),
                }
            }
            Err(e) => format!("the ruleset has what the netlink writer does not encode: {e}"),
        };
        // Said once as a warning (a ruleset or kernel that needs it keeps needing it), then at debug.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(reason = %why, "full replace through nft's JSON instead of netlink messages");
        } else {
            tracing::warn!(reason = %why, "full replace through nft's JSON instead of netlink messages (slower at scale, same table); please report the reason");
        }
        let start = std::time::Instant::now();
        let json = rs.full_replace_text();
        let rendered = start.elapsed();
        self.apply(&json)?;
        Ok(Replaced {
            by: ReplacePath::Json,
            prepare: rendered,
            commit: start.elapsed() - rendered,
            bytes: json.len(),
        })
    }

    /// Commits a prepared full replace with the drift monitor out of the notification group, and
    /// proves nobody else committed while it was out: the transaction is bound to the generation
    /// read after leaving (another commit before ours refuses it; we try again), and the
    /// generation read after rejoining must be the next one (ours). When it is not (someone
    /// committed after us, unseen) or the tries run out, the batch is committed again with the
    /// monitor listening, which replaces whatever that was. `Ok(true)` when it went quiet.
    fn commit_quietly(
        &self,
        writer: &mut palisade_nft::setelem::ElementWriter,
        bytes: &[&[u8]],
    ) -> Result<bool> {
        for _ in 0..QUIET_REPLACE_TRIES {
            let committed = self.out_of_group(|| {
                writer.generation().and_then(|g| {
                    writer
                        .commit_prepared_at("full replace", TABLE_NAME, bytes, Some(g))
                        .map(|()| g)
                })
            })?;
            match committed {
                None => break,
                // What the monitor missed is restored once its thread has reopened it.
                Some((Ok(_), false)) => return Ok(true),
                Some((Err(e), false)) => return Err(e.into()),
                Some((Ok(g), true)) => {
                    if writer.generation()? == g.wrapping_add(1) {
                        return Ok(true);
                    }
                    tracing::debug!("another transaction was committed while the drift monitor was out; replacing again with it listening");
                    break;
                }
                Some((Err(e), true)) if e.is_generation_moved() => continue,
                Some((Err(e), true)) => return Err(e.into()),
            }
        }
        writer.commit_prepared("full replace", TABLE_NAME, bytes)?;
        Ok(false)
    }

    /// Summarises our table as the kernel dumps it (see [`TableSummary`]); `None` when the table
    /// does not exist. Over nfnetlink whatever the backend: no `nft` process, no listing held.
    pub fn summarize_table() -> Result<Option<TableSummary>> {
        Ok(palisade_nft::summary::table(
            TABLE_FAMILY,
            TABLE_NAME,
            &[PENDING_SET_V4, PENDING_SET_V6],
        )?)
    }

    /// Our named counters' reader (the scrape gets a handle on the same socket).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The source bindings (pod address → host veth) in our table as the kernel holds it now:
    /// before the first commit, what an earlier agent left (empty without a table).
    pub fn bindings(&self) -> Result<std::collections::BTreeMap<std::net::IpAddr, String>> {
        let mut out = std::collections::BTreeMap::new();
        for set in [
            palisade_policy::ruleset::names::SOURCE_SET_V4,
            palisade_policy::ruleset::names::SOURCE_SET_V6,
        ] {
            if let Some(json) = self.runner.list_set(TABLE_FAMILY, TABLE_NAME, set)? {
                out.extend(parse_bindings(&json).map_err(|message| Error::Nft {
                    action: "reading the source bindings",
                    message: format!("set {set}: {message}"),
                })?);
            }
        }
        Ok(out)
    }

    /// Deletes our table (cleanup). Absent is success.
    pub fn delete_table(&self) -> Result<bool> {
        let batch = serde_json::json!({"nftables": [
            {"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}},
            {"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}}
        ]});
        // Asked of the kernel directly: `nft list table` would build a cache of the whole table
        // (hundreds of MB at 100k pods) to answer whether it exists.
        let existed = palisade_nft::summary::exists(TABLE_FAMILY, TABLE_NAME)?;
        self.apply(&batch.to_string())?;
        Ok(existed)
    }
}

/// How a full replace reached the kernel, and what each step took.
#[derive(Debug, Clone, Copy)]
pub struct Replaced {
    pub by: ReplacePath,
    /// Building the messages, or rendering the JSON.
    pub prepare: std::time::Duration,
    pub commit: std::time::Duration,
    /// Size of the messages or of the JSON text.
    pub bytes: usize,
}

/// The way a full replace went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplacePath {
    /// The compiler's nfnetlink messages; `quiet`: with the drift monitor out of the notification
    /// group.
    Netlink { quiet: bool },
    /// Its JSON through nft.
    Json,
}

/// Starts a thread that watches our table through nf_tables notifications (palisade-nft's monitor,
/// opened here, so in the calling thread's network namespace: the node's) and calls `wake` with a
/// description of every change to it that this process did not commit: rules, chains, sets, maps,
/// their elements (except the plugin's pending marks), table flags, the table itself. Our own commits
/// (incremental and full replace, either backend) never call it. Lost notifications (receive buffer
/// overrun) are reported as an unknown change. Stops when `wake` returns false.
///
/// The monitor's subscription switch goes into `switch` (and is replaced when the monitor reopens),
/// for [`Nft::replace_table`].
pub fn watch_drift(
    switch: MonitorSwitch,
    wake: impl Fn(Drift) -> bool + Send + 'static,
) -> Result<()> {
    let scope = Scope::new(TABLE_FAMILY, TABLE_NAME, &[PENDING_SET_V4, PENDING_SET_V6])?;
    let mut monitor = Monitor::open(scope.clone())?;
    let state = switch.0.clone();
    let publish = move |m: &Monitor| {
        let handle = m.membership();
        let mut slot = switch
            .0
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match handle {
            Ok(h) => *slot = Some(h),
            Err(e) => {
                *slot = None;
                tracing::warn!(error = %e, "full replaces keep the drift monitor listening (the kernel then writes a notification per object for it)");
            }
        }
    };
    publish(&monitor);
    std::thread::Builder::new()
        .name("drift-monitor".into())
        .spawn(move || loop {
            let next = if state.deaf.swap(false, std::sync::atomic::Ordering::SeqCst) {
                Err(palisade_nft::Error::Monitor {
                    action: "rejoin the notification group after a quiet full replace",
                    source: std::io::Error::other("setsockopt(NETLINK_ADD_MEMBERSHIP) failed"),
                })
            } else {
                monitor.next(Some(DEAF_CHECK))
            };
            match next {
                Ok(Some(drift)) => {
                    if !wake(drift) {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // Whatever happened meanwhile is unknown: have the table restored, then listen anew.
                    tracing::warn!(error = %e, "drift monitor failed; restoring our table and reopening the monitor");
                    if !wake(Drift {
                        changes: vec![format!("unknown (the drift monitor failed: {e})")],
                        ..Drift::default()
                    }) {
                        return;
                    }
                    loop {
                        std::thread::sleep(MONITOR_REOPEN_DELAY);
                        match Monitor::open(scope.clone()) {
                            Ok(m) => {
                                publish(&m);
                                monitor = m;
                                break;
                            }
                            Err(e) => tracing::warn!(error = %e, retry_in = ?MONITOR_REOPEN_DELAY, "cannot reopen the drift monitor; changes behind our back are repaired at resync only until it is back"),
                        }
                    }
                }
            }
        })
        .map_err(|e| Error::io("spawn drift monitor thread", "drift-monitor", e))?;
    Ok(())
}

/// Wait before reopening a failed drift monitor.
const MONITOR_REOPEN_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// What we compare to notice our table was changed behind our back: counts and a fingerprint
/// without handles, counter values and the pending marks (which the plugin owns).
pub use palisade_nft::summary::TableSummary;

/// The `(address, veth)` elements of a source set as `nft -j list set` prints it (each element a
/// concatenation `[ifname, address]`).
fn parse_bindings(json: &str) -> std::result::Result<Vec<(std::net::IpAddr, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(elems) = item.get("set").and_then(|s| s.get("elem")) else {
            continue;
        };
        for e in elems.as_array().into_iter().flatten() {
            // An element with a comment or a timeout comes wrapped: {"elem": {"val": ...}}.
            let val = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            let parts = val["concat"]
                .as_array()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("element {val} is not an (interface, address) pair"))?;
            let (Some(veth), Some(ip)) = (parts[0].as_str(), parts[1].as_str()) else {
                return Err(format!("element {val} is not an (interface, address) pair"));
            };
            let ip = ip
                .parse()
                .map_err(|_| format!("element {val}: {ip:?} is not an address"))?;
            out.push((ip, veth.to_string()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quiet commit says whether another process's transaction went unheard while the drift
    /// monitor was out: one landing before ours (which is then refused, bound to the generation)
    /// or after it; with none, all was heard. The other process's transaction here is the
    /// plugin's kind (a pending mark added and removed on a socket of its own).
    #[test]
    fn a_quiet_commit_says_when_another_transaction_landed_while_the_monitor_was_out() {
        use palisade_nft::setelem::{ElementWriter, Key, SetOp};
        palisade_testkit::netns::enter_private_netns();
        let nft = Nft::new(Backend::Lib);
        watch_drift(nft.monitor_switch(), |_| true).unwrap();
        let st = palisade_policy::synth::cluster(&palisade_policy::synth::SynthConfig::small(5));
        let rs = palisade_policy::compile(&st, "n0").ruleset;
        nft.replace_table(&rs, None).unwrap();
        let table = rs.full_replace_netlink().unwrap();
        let mut other = ElementWriter::new();
        let mut another_transaction = move || {
            let ip = Key::Addr("10.255.0.1".parse().unwrap());
            other
                .apply(
                    TABLE_FAMILY,
                    TABLE_NAME,
                    &[
                        (SetOp::Add, PENDING_SET_V4, ip),
                        (SetOp::Delete, PENDING_SET_V4, ip),
                    ],
                )
                .unwrap();
        };
        let mut writer = ElementWriter::new();
        let ours = |w: &mut ElementWriter, g: Option<u32>| {
            w.commit_prepared_at("test", TABLE_NAME, &table.parts(), g)
        };
        let heard = nft.quiet_commit(&mut writer, ours).unwrap();
        assert_eq!(heard, Commit::Quiet, "nobody else committed");
        let heard = nft
            .quiet_commit(&mut writer, |w, g| {
                another_transaction();
                let refused = ours(w, g).unwrap_err();
                assert!(refused.is_generation_moved(), "{refused}");
                Err(refused)
            })
            .unwrap();
        assert_eq!(heard, Commit::Unheard, "a transaction before ours");
        let heard = nft
            .quiet_commit(&mut writer, |w, g| {
                ours(w, g)?;
                another_transaction();
                Ok(())
            })
            .unwrap();
        assert_eq!(heard, Commit::Unheard, "a transaction after ours");
        // Without a monitor running: an ordinary commit, unbound.
        let alone = Nft::new(Backend::Lib);
        let heard = alone
            .quiet_commit(&mut writer, |w, g| {
                assert_eq!(g, None, "bound to a generation without a monitor");
                another_transaction();
                ours(w, g)
            })
            .unwrap();
        assert_eq!(heard, Commit::Heard);
    }

    #[test]
    fn source_bindings_are_read_from_the_sets_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"set": {"family": "inet", "name": "sources_v4", "table": "palisade",
             "type": ["ifname", "ipv4_addr"], "handle": 7, "flags": ["constant"],
             "elem": [{"concat": ["pal0123456789ab", "10.244.1.5"]},
                      {"elem": {"val": {"concat": ["pal0000000000ff", "10.244.1.6"]}, "comment": "x"}}]}}]}"#;
        assert_eq!(
            parse_bindings(json).unwrap(),
            vec![
                ("10.244.1.5".parse().unwrap(), "pal0123456789ab".to_string()),
                ("10.244.1.6".parse().unwrap(), "pal0000000000ff".to_string()),
            ]
        );
        let empty = r#"{"nftables": [{"set": {"name": "sources_v6", "table": "palisade"}}]}"#;
        assert!(parse_bindings(empty).unwrap().is_empty());
        let bad = r#"{"nftables": [{"set": {"elem": ["10.244.1.5"]}}]}"#;
        assert!(parse_bindings(bad)
            .unwrap_err()
            .contains("not an (interface, address) pair"));
    }
}
