//! The agent's nft edge: our table through palisade-nft (which runs the transactions: libnftables
//! in-process, `nft -j -f -` as fallback), the drift watch (nf_tables notifications of changes we
//! did not commit), and the summary the resync compares to notice changes behind our back. Only our table is ever listed (`list table inet palisade`); other tables
//! are never parsed.

use crate::error::{Error, Result};
use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};
use palisade_nft::monitor::{Drift, Membership, Monitor, Scope};
pub use palisade_nft::Backend;
use palisade_policy::ruleset::{ElementChange, Ruleset};
use serde_json::Value;

/// palisade-nft bound to our table, with errors in the agent's type.
pub struct Nft {
    runner: palisade_nft::Nft,
    /// Address element transactions on one socket kept open (see [`Nft::apply_elements`]).
    elements: std::sync::Mutex<palisade_nft::setelem::ElementWriter>,
    /// The drift monitor's subscription switch, while one runs (see [`Nft::replace_table`]).
    monitor: MonitorSwitch,
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

impl Nft {
    /// A runner for `backend`. A `Lib` backend whose library cannot be loaded degrades to exec.
    /// The lib backend acts on the network namespace of the calling thread.
    pub fn new(backend: Backend) -> Self {
        Nft {
            runner: palisade_nft::Nft::new(backend),
            elements: Default::default(),
            monitor: Default::default(),
        }
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
    pub fn apply_batch(&self, batch: &crate::compiled::Batch) -> Result<()> {
        if let Some(changes) = &batch.elements {
            return self.apply_elements(changes);
        }
        if let Some(netlink) = &batch.netlink {
            let mut writer = self.elements.lock().unwrap_or_else(|p| p.into_inner());
            match writer.commit_prepared("incremental batch", TABLE_NAME, &netlink.parts()) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "netlink batch refused; committing its JSON through nft for nft's account of it")
                }
            }
        }
        self.apply(&batch.json)
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
    /// With a drift monitor running, the commit goes quiet ([`Nft::commit_quietly`]): the kernel
    /// builds a notification per rule, element and object of the transaction for every listener,
    /// and ours is usually the only one (at 100k pods that was most of a 5 s commit).
    pub fn replace_table(&self, rs: &Ruleset) -> Result<Replaced> {
        let start = std::time::Instant::now();
        let why = match rs.full_replace_netlink() {
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
        let switch = self
            .monitor
            .0
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = switch.as_ref() {
            for _ in 0..QUIET_REPLACE_TRIES {
                m.leave()?;
                let committed = writer.generation().and_then(|g| {
                    writer
                        .commit_prepared_at("full replace", TABLE_NAME, bytes, Some(g))
                        .map(|()| g)
                });
                // Listening again comes first, whatever happened; a monitor that cannot rejoin
                // is reopened by its thread (and what it missed is restored).
                if let Err(e) = m.join().or_else(|_| m.join()) {
                    self.monitor.report_rejoin_failure();
                    return Err(e.into());
                }
                match committed {
                    Ok(g) => {
                        if writer.generation()? == g.wrapping_add(1) {
                            return Ok(true);
                        }
                        tracing::debug!("another transaction was committed while the drift monitor was out; replacing again with it listening");
                        break;
                    }
                    Err(e) if e.is_generation_moved() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        drop(switch);
        writer.commit_prepared("full replace", TABLE_NAME, bytes)?;
        Ok(false)
    }

    /// Lists our table as nft JSON; `None` when the table does not exist.
    pub fn list_table(&self) -> Result<Option<String>> {
        Ok(self.runner.list_table(TABLE_FAMILY, TABLE_NAME)?)
    }

    /// Lists our table and summarises it as the listing is read (see [`summarize_from`]); `None`
    /// when the table does not exist.
    pub fn summarize_table(&self) -> Result<Option<TableSummary>> {
        self.runner
            .list_table_with(TABLE_FAMILY, TABLE_NAME, |r| summarize_from(r))?
            .transpose()
    }

    /// Packets of each named counter of our table, by name (over nfnetlink, whatever the backend:
    /// `palisade_nft::counters`); empty without the table.
    pub fn counter_packets() -> Result<std::collections::HashMap<String, u64>> {
        Ok(palisade_nft::counters::packets(TABLE_FAMILY, TABLE_NAME)?)
    }

    /// Deletes our table (cleanup). Absent is success.
    pub fn delete_table(&self) -> Result<bool> {
        let batch = serde_json::json!({"nftables": [
            {"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}},
            {"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}}
        ]});
        let existed = self.list_table()?.is_some();
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

/// What we compare to notice our table was changed behind our back, and what the gauges show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableSummary {
    /// Hash of the listing without handles, counter values and pending elements (which the plugin owns).
    pub fingerprint: u64,
    pub chains: u64,
    pub rules: u64,
    /// Named sets and maps.
    pub sets: u64,
    /// Elements of all sets and maps, pending ones included.
    pub elements: u64,
    /// Elements of the pending sets.
    pub pending: u64,
}

/// Summarises a listing of our table (see [`TableSummary`]).
pub fn summarize(listing: &str) -> Result<TableSummary> {
    summarize_from(listing.as_bytes())
}

/// Summarises a listing of our table as it is read (see [`TableSummary`]).
///
/// Item by item, from the stream: each of the listing's objects is parsed, counted, normalized and
/// hashed before the next is read, so a listing of a 100k-pod node's table (~12 MB of JSON) is
/// never held whole, let alone as one tree (~60 MiB). Members of the top-level object other than
/// `nftables` are hashed as they are; anything but an object is an error.
pub fn summarize_from(reader: impl std::io::Read) -> Result<TableSummary> {
    use serde::de::DeserializeSeed;
    let parse_error = |e: serde_json::Error| Error::Nft {
        action: "parse listing",
        message: e.to_string(),
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut acc = Summing::default();
    ListingSeed(&mut acc)
        .deserialize(&mut de)
        .map_err(parse_error)?;
    de.end().map_err(parse_error)?;
    acc.summary.fingerprint = acc.hash.0;
    Ok(acc.summary)
}

/// A summary being made.
#[derive(Default)]
struct Summing {
    summary: TableSummary,
    hash: Fnv1a,
}

impl Summing {
    /// Counts, normalizes and hashes one item of the listing.
    fn item(&mut self, mut item: Value) -> std::result::Result<(), serde_json::Error> {
        if item.get("metainfo").is_some() {
            return Ok(());
        }
        let s = &mut self.summary;
        if let Some(obj) = item.as_object_mut() {
            if obj.contains_key("chain") {
                s.chains += 1;
            } else if obj.contains_key("rule") {
                s.rules += 1;
            }
            for key in ["set", "map"] {
                if let Some(set) = obj.get_mut(key).and_then(Value::as_object_mut) {
                    s.sets += 1;
                    let n = set
                        .get("elem")
                        .and_then(Value::as_array)
                        .map_or(0, |a| a.len() as u64);
                    s.elements += n;
                    let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
                    if name == PENDING_SET_V4 || name == PENDING_SET_V6 {
                        s.pending += n;
                        set.remove("elem");
                    }
                }
            }
        }
        self.hash_value(&mut item)
    }

    /// Hashes `v` normalized, then a delimiter, so moving content between neighbours changes the
    /// hash.
    fn hash_value(&mut self, v: &mut Value) -> std::result::Result<(), serde_json::Error> {
        normalize(v);
        serde_json::to_writer(&mut self.hash, v)?;
        self.hash.feed(b"\n");
        Ok(())
    }
}

/// The listing's top-level object: `nftables` item by item, any other member hashed whole.
struct ListingSeed<'a>(&'a mut Summing);

impl<'de> serde::de::DeserializeSeed<'de> for ListingSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ListingSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an nft JSON listing (an object with an `nftables` array)")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        while let Some(key) = map.next_key::<String>()? {
            if key == "nftables" {
                map.next_value_seed(ItemsSeed(&mut *self.0))?;
            } else {
                let mut other: Value = map.next_value()?;
                self.0.hash.feed(key.as_bytes());
                self.0.hash_value(&mut other).map_err(A::Error::custom)?;
            }
        }
        Ok(())
    }
}

/// The `nftables` array, one item at a time.
struct ItemsSeed<'a>(&'a mut Summing);

impl<'de> serde::de::DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ItemsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the array of a listing's objects")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        while let Some(item) = seq.next_element::<Value>()? {
            self.0.item(item).map_err(A::Error::custom)?;
        }
        Ok(())
    }
}

/// FNV-1a over everything written to it.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

impl std::io::Write for Fnv1a {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Drops what changes without anyone changing our rules: handles and counter values.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            if let Some(Value::Object(c)) = m.get_mut("counter") {
                c.remove("packets");
                c.remove("bytes");
            }
            m.values_mut().for_each(normalize);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
      {"table":{"family":"inet","name":"palisade","handle":7}},
      {"set":{"family":"inet","name":"pending_v4","table":"palisade","type":"ipv4_addr","handle":2,"elem":["10.0.0.9"]}},
      {"map":{"family":"inet","name":"egress_v4","table":"palisade","type":"ipv4_addr","map":"verdict","handle":3,"elem":[["10.0.0.2",{"goto":{"target":"eg_1"}}]]}},
      {"chain":{"family":"inet","table":"palisade","name":"egress","handle":1}},
      {"rule":{"family":"inet","table":"palisade","chain":"egress","handle":4,"expr":[{"counter":{"packets":3,"bytes":180}},{"drop":null}]}}]}"#;

    #[test]
    fn summary_ignores_counters_handles_and_pending_elements() {
        let a = summarize(LISTING).unwrap();
        let b = summarize(
            &LISTING
                .replace("\"packets\":3", "\"packets\":99")
                .replace("\"handle\":4", "\"handle\":40")
                .replace("[\"10.0.0.9\"]", "[\"10.0.0.9\",\"10.0.0.10\"]"),
        )
        .unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            (a.chains, a.rules, a.sets, a.elements, a.pending),
            (1, 1, 2, 2, 1)
        );
        assert_eq!(b.pending, 2);
    }

    #[test]
    fn summary_notices_a_removed_rule_or_map_element() {
        let a = summarize(LISTING).unwrap();
        let b = summarize(&LISTING.replace(r#"["10.0.0.2",{"goto":{"target":"eg_1"}}]"#, ""))
            .unwrap_or_default();
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    /// Hands out its text a few bytes per read, as a pipe may.
    struct Trickle<'a>(&'a [u8]);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_listing_read_from_a_stream_sums_up_as_the_text_does() {
        let whole = summarize(LISTING).unwrap();
        assert_eq!(summarize_from(Trickle(LISTING.as_bytes())).unwrap(), whole);
        assert_ne!(whole.fingerprint, TableSummary::default().fingerprint);
        // Another top-level member is part of the fingerprint; a truncated listing is an error.
        let extra = LISTING.replacen('{', r#"{"extra":1,"#, 1);
        assert_ne!(summarize(&extra).unwrap().fingerprint, whole.fingerprint);
        assert!(summarize_from(Trickle(&LISTING.as_bytes()[..LISTING.len() / 2])).is_err());
        assert!(summarize("[1,2]").is_err(), "not an object");
    }

    #[test]
    fn summary_rejects_garbage_with_an_error() {
        assert!(summarize("not json").is_err());
    }
}
