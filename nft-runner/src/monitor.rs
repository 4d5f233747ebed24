//! Watches one nf_tables table for changes this process did not commit: a NETLINK_NETFILTER socket
//! joined to the multicast group `NFNLGRP_NFTABLES`, whose notifications are grouped per transaction
//! (each ends with `NFT_MSG_NEWGEN`). Table and object names are read raw to filter (other tables
//! cost no decoding); what touched our table is decoded with `netlink-packet-netfilter` for the
//! report, as is `NEWGEN`.
//!
//! A transaction is **drift** when it touched the watched table (family and name) in any way other
//! than adding or deleting elements of the ignored sets (the CNI plugin's pending marks) and was not
//! committed by this process. The kernel stamps every notification with the netlink portid of the
//! socket that committed the batch (`nlmsg_pid`; checked in tests/monitor_kernel.rs), so "ours" is: a portid
//! of a NETLINK_NETFILTER socket this process holds (found by `getsockname` on the sockets in
//! `/proc/self/fd`, cached, rescanned before a portid is called foreign), or one registered with
//! [`remember_portid`]: libnftables contexts about to be freed ([`remember_own_sockets`]) and `nft`
//! children of the exec backend (an autobound socket's portid is the process id). `NEWGEN` also
//! carries the committer's pid and name, but that pid is the kernel's global one, meaningless in a
//! container's pid namespace; it is only used for the log. A receive overrun (`ENOBUFS`) loses
//! notifications: it is reported as drift of unknown content (restoring is always safe).

use crate::error::{Error, Result};
use crate::sockopt::{get_int, set_int};
use netlink_packet_core::NetlinkBuffer;
use netlink_packet_core::ParseableParametrized;
use netlink_packet_netfilter::nftables::{
    ChainAttribute, GenAttribute, NfTablesMessage, RuleAttribute, SetAttribute, SetElementList,
    TableAttribute,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// linux/netfilter/nfnetlink.h: the multicast group of nf_tables notifications.
pub const NFNLGRP_NFTABLES: u32 = 7;
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u8 = 15;
const NFGENMSG_LEN: usize = 4;
const NLMSG_HDRLEN: usize = 16;

/// Receive buffer asked for (SO_RCVBUFFORCE, so above `rmem_max`): notifications of one full replace
/// of a 10k-pod table (~100k elements, coalesced into pages by the kernel) must fit while we parse.
/// Memory is only charged for what is queued.
pub const RECEIVE_BUFFER_BYTES: usize = 256 << 20;

/// How long the portid of a closed socket of ours (a freed libnftables context, an exited `nft`
/// child) still counts as ours: long enough for its notifications, already queued on our socket when
/// the commit returned, to be read; short enough that a foreign process reusing the number later is
/// not taken for us.
pub const RETIRED_PORTID_TTL: Duration = Duration::from_secs(10);

/// Which table to watch, and which of its sets belong to someone else (changes to their elements are
/// legitimate, from any process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `NFPROTO_*` number of the table's family (1 = inet).
    pub family: u8,
    pub table: String,
    pub ignored_sets: Vec<String>,
}

impl Scope {
    /// A scope for family name `family` (`inet`, `ip`, `ip6`, ...).
    pub fn new(family: &str, table: &str, ignored_sets: &[&str]) -> Result<Self> {
        Ok(Scope {
            family: crate::setelem::family_number("monitor", family)?,
            table: table.to_string(),
            ignored_sets: ignored_sets.iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// One transaction (or an unknown number of them, see `overrun`) that changed the watched table
/// behind this process's back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drift {
    /// What was changed, deduplicated, in order of first appearance, e.g. `delete rule in chain
    /// postrouting`, `delete element from map ingress_v4`, `delete table`. At most [`MAX_CHANGES`].
    pub changes: Vec<String>,
    /// Notifications beyond those described in `changes`.
    pub more: usize,
    /// The committing socket's netlink portid (`nlmsg_pid`).
    pub portid: u32,
    /// The committing process as the kernel named it (`NFTA_GEN_PROC_NAME`), e.g. `nft`.
    pub process: Option<String>,
    /// Its pid in the kernel's initial pid namespace (`NFTA_GEN_PROC_PID`); for logs only.
    pub pid: Option<u32>,
    /// Notifications were lost (ENOBUFS): what changed is unknown.
    pub overrun: bool,
    /// When the transaction's first notification was read (the kernel sends them once the new
    /// ruleset is live, so this is close to the commit); `None` from a bare [`Classifier`].
    pub first_seen: Option<Instant>,
    /// What it touched, for a repair of only those objects (the whole table when unknown).
    pub touched: Touched,
}

/// Distinct changes kept per drift report.
pub const MAX_CHANGES: usize = 8;

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.overrun {
            return write!(
                f,
                "notifications lost (receive buffer overrun): unknown changes"
            );
        }
        write!(f, "{}", self.changes.join(", "))?;
        if self.more > 0 {
            write!(f, " and {} more", self.more)?;
        }
        match (&self.process, self.pid) {
            (Some(name), Some(pid)) => write!(
                f,
                " by {name} (pid {pid} in the initial namespace, portid {})",
                self.portid
            ),
            (Some(name), None) => write!(f, " by {name} (portid {})", self.portid),
            _ => write!(f, " by portid {}", self.portid),
        }
    }
}

/// The transaction being read.
#[derive(Debug, Default)]
struct Txn {
    portid: u32,
    first_seen: Option<Instant>,
    changes: Vec<String>,
    more: usize,
    touched: Touched,
}

/// Groups notifications into transactions and judges them; no I/O (the caller says which portids are
/// ours), so it is tested on byte fixtures.
#[derive(Debug)]
pub struct Classifier {
    scope: Scope,
    txn: Option<Txn>,
    /// When the datagram being fed was read (set by [`Monitor`]).
    received: Option<Instant>,
}

impl Classifier {
    pub fn new(scope: Scope) -> Self {
        Classifier {
            scope,
            txn: None,
            received: None,
        }
    }

    /// Feeds one datagram (one or more netlink messages). `known_own(portid)` answers from a cache (it
    /// lets us skip parsing our own notifications); `is_own(portid)` may rescan and is asked once per
    /// transaction that touched the table. Returns the drifts of the transactions this datagram ended.
    pub fn feed(
        &mut self,
        datagram: &[u8],
        known_own: &mut dyn FnMut(u32) -> bool,
        is_own: &mut dyn FnMut(u32) -> bool,
    ) -> Vec<Drift> {
        let mut out = Vec::new();
        let mut rest = datagram;
        while rest.len() >= NLMSG_HDRLEN {
            let Ok(msg) = NetlinkBuffer::new_checked(rest) else {
                break;
            };
            let len = (msg.length() as usize).max(NLMSG_HDRLEN);
            let ty = msg.message_type();
            let portid = msg.port_number();
            let payload = msg.payload();
            if ty >> 8 == NFNL_SUBSYS_NFTABLES {
                self.message(ty, portid, payload, known_own, is_own, &mut out);
            }
            let next = (len + 3) & !3;
            if next >= rest.len() {
                break;
            }
            rest = &rest[next..];
        }
        out
    }

    /// Notifications were lost: whatever was being read is unknown; report it.
    pub fn overrun(&mut self) -> Drift {
        self.txn = None;
        Drift {
            overrun: true,
            ..Drift::default()
        }
    }

    fn message(
        &mut self,
        ty: u16,
        portid: u32,
        payload: &[u8],
        known_own: &mut dyn FnMut(u32) -> bool,
        is_own: &mut dyn FnMut(u32) -> bool,
        out: &mut Vec<Drift>,
    ) {
        let kind = (ty & 0xff) as u8;
        if self.txn.as_ref().is_some_and(|t| t.portid != portid) {
            // Transactions are notified one after another under the kernel's commit mutex, each closed
            // by NEWGEN; a new portid before it means we missed the end: judge what we have.
            if let Some(d) = self.finish(None, is_own) {
                out.push(d);
            }
        }
        if kind == NFT_MSG_NEWGEN {
            let gen = match NetfilterMessage::parse_with_param(payload, ty) {
                Ok(NetfilterMessage {
                    inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewGen(g)),
                    ..
                }) => Some(g.attributes),
                _ => None,
            };
            if let Some(d) = self.finish(gen.as_deref(), is_own) {
                out.push(d);
            }
            return;
        }
        let received = self.received;
        let txn = self.txn.get_or_insert_with(|| Txn {
            portid,
            first_seen: received,
            touched: Touched::nothing(),
            ..Txn::default()
        });
        if known_own(portid) {
            return;
        }
        let detailed = txn.changes.len() < MAX_CHANGES;
        if let Some((change, touched)) = describe(&self.scope, ty, payload, detailed) {
            txn.touched.add(touched);
            if txn.changes.contains(&change) {
                txn.more += 1;
            } else if txn.changes.len() < MAX_CHANGES {
                txn.changes.push(change);
            } else {
                txn.more += 1;
            }
        }
    }

    /// Ends the current transaction: a drift when it touched the table and is not ours.
    fn finish(
        &mut self,
        gen: Option<&[GenAttribute]>,
        is_own: &mut dyn FnMut(u32) -> bool,
    ) -> Option<Drift> {
        let txn = self.txn.take()?;
        if txn.changes.is_empty() || is_own(txn.portid) {
            return None;
        }
        let mut d = Drift {
            changes: txn.changes,
            more: txn.more,
            portid: txn.portid,
            first_seen: txn.first_seen,
            touched: txn.touched,
            ..Drift::default()
        };
        for a in gen.unwrap_or_default() {
            match a {
                GenAttribute::ProcPid(p) => d.pid = Some(*p),
                GenAttribute::ProcName(n) => d.process = Some(n.clone()),
                _ => {}
            }
        }
        Some(d)
    }
}

/// What one notification did to the watched table, or `None` when it did not touch it (another
/// table, or elements of an ignored set). The family, table and object names are read raw first
/// (attribute 1 is the table name and attribute 2 the object's name in every nf_tables object
/// message), so notifications about other tables (kube-proxy's, say) cost no decoding. While
/// `detailed`, a message about our table is decoded with netlink-packet-netfilter for the report;
/// one it cannot decode keeps the raw reading, so an exotic rule expression cannot hide a change.
fn describe(scope: &Scope, ty: u16, payload: &[u8], detailed: bool) -> Option<(String, Touched)> {
    let family = *payload.first()?;
    if family != scope.family {
        return None;
    }
    let kind = (ty & 0xff) as u8;
    let (table, what) = raw(kind, payload)?;
    if table != scope.table {
        return None;
    }
    if let What::Element { set, .. } = &what {
        if scope.ignored_sets.iter().any(|s| s == set) {
            return None;
        }
    }
    let touched = what.touched();
    if detailed {
        if let Ok(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(m),
            ..
        }) = NetfilterMessage::parse_with_param(payload, ty)
        {
            if let Some((table, decoded)) = parsed(&m) {
                if table == scope.table {
                    return Some((decoded.to_string(), touched));
                }
            }
        }
    }
    Some((what.to_string(), touched))
}

/// Which objects of the watched table a drift touched: the chains (a rule added or deleted counts
/// for its chain) and sets or maps (an element counts for its set) by name, or the whole table (the
/// table itself, its flags, an object of another kind, lost notifications), which only a full
/// replace can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    Objects {
        chains: BTreeSet<String>,
        sets: BTreeSet<String>,
    },
    Table,
}

impl Default for Touched {
    /// Unknown: assume the whole table.
    fn default() -> Self {
        Touched::Table
    }
}

impl Touched {
    fn nothing() -> Self {
        Touched::Objects {
            chains: BTreeSet::new(),
            sets: BTreeSet::new(),
        }
    }

    /// Adds what another notification touched.
    fn add(&mut self, other: Touched) {
        match (&mut *self, other) {
            (Touched::Table, _) => {}
            (_, Touched::Table) => *self = Touched::Table,
            (Touched::Objects { chains, sets }, Touched::Objects { chains: c, sets: s }) => {
                chains.extend(c);
                sets.extend(s);
            }
        }
    }
}

/// A rule's anonymous set, named by the kernel (`__set0`, `__map1`, ...).
fn is_anonymous(name: &str) -> bool {
    name.starts_with("__")
}

impl What {
    fn touched(&self) -> Touched {
        let one = |chain: Option<&String>, set: Option<&String>| Touched::Objects {
            chains: chain.into_iter().cloned().collect(),
            sets: set.into_iter().cloned().collect(),
        };
        match self {
            What::Chain { name, .. } => one(Some(name), None),
            What::Rule { chain, .. } => one(Some(chain), None),
            // Anonymous sets (`__set%d`) belong to a rule: they come and go with it, and its
            // chain is among the touched ones (the kernel refuses any other change to them).
            What::Set { name, .. } | What::Element { set: name, .. } if is_anonymous(name) => {
                one(None, None)
            }
            What::Set { name, .. } => one(None, Some(name)),
            What::Element { set, .. } => one(None, Some(set)),
            What::Table { .. } | What::Other { .. } => Touched::Table,
        }
    }
}

enum What {
    Table { added: bool },
    Chain { added: bool, name: String },
    Rule { added: bool, chain: String },
    Set { added: bool, name: String },
    Element { added: bool, set: String },
    Other { kind: u8, name: String },
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = |added: &bool| if *added { "add" } else { "delete" };
        match self {
            What::Table { added } => {
                write!(f, "{} table", if *added { "change" } else { "delete" })
            }
            What::Chain { added, name } => write!(f, "{} chain {name}", verb(added)),
            What::Rule { added, chain } => write!(f, "{} rule in chain {chain}", verb(added)),
            What::Set { added, name } => write!(f, "{} set {name}", verb(added)),
            What::Element { added: true, set } => write!(f, "add element to set {set}"),
            What::Element { added: false, set } => write!(f, "delete element from set {set}"),
            What::Other { kind, name } if name.is_empty() => write!(f, "nf_tables message {kind}"),
            What::Other { kind, name } => write!(f, "nf_tables message {kind} on {name}"),
        }
    }
}

fn parsed(m: &NfTablesMessage) -> Option<(String, What)> {
    fn find<A, T>(attrs: &[A], pick: impl Fn(&A) -> Option<&T>) -> Option<T>
    where
        T: Clone,
    {
        attrs.iter().find_map(pick).cloned()
    }
    Some(match m {
        NfTablesMessage::NewTable(t) | NfTablesMessage::DeleteTable(t) => {
            let name = find(&t.attributes, |a| match a {
                TableAttribute::Name(n) => Some(n),
                _ => None,
            })?;
            let added = matches!(m, NfTablesMessage::NewTable(_));
            (name, What::Table { added })
        }
        NfTablesMessage::NewChain(c) | NfTablesMessage::DeleteChain(c) => {
            let table = find(&c.attributes, |a| match a {
                ChainAttribute::Table(n) => Some(n),
                _ => None,
            })?;
            let name = find(&c.attributes, |a| match a {
                ChainAttribute::Name(n) => Some(n),
                _ => None,
            })
            .unwrap_or_default();
            let added = matches!(m, NfTablesMessage::NewChain(_));
            (table, What::Chain { added, name })
        }
        NfTablesMessage::NewRule(r) | NfTablesMessage::DeleteRule(r) => {
            let table = find(&r.attributes, |a| match a {
                RuleAttribute::Table(n) => Some(n),
                _ => None,
            })?;
            let chain = find(&r.attributes, |a| match a {
                RuleAttribute::Chain(n) => Some(n),
                _ => None,
            })
            .unwrap_or_default();
            let added = matches!(m, NfTablesMessage::NewRule(_));
            (table, What::Rule { added, chain })
        }
        NfTablesMessage::NewSet(s) | NfTablesMessage::DeleteSet(s) => {
            let table = find(&s.attributes, |a| match a {
                SetAttribute::Table(n) => Some(n),
                _ => None,
            })?;
            let name = find(&s.attributes, |a| match a {
                SetAttribute::Name(n) => Some(n),
                _ => None,
            })
            .unwrap_or_default();
            let added = matches!(m, NfTablesMessage::NewSet(_));
            (table, What::Set { added, name })
        }
        NfTablesMessage::NewSetElement(e) | NfTablesMessage::DeleteSetElement(e) => {
            let table = find(&e.attributes, |a| match a {
                SetElementList::Table(n) => Some(n),
                _ => None,
            })?;
            let set = find(&e.attributes, |a| match a {
                SetElementList::Set(n) => Some(n),
                _ => None,
            })
            .unwrap_or_default();
            let added = matches!(m, NfTablesMessage::NewSetElement(_));
            (table, What::Element { added, set })
        }
        _ => return None,
    })
}

// linux/netfilter/nf_tables.h: enum nf_tables_msg_types (those read raw)
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_DELTABLE: u8 = 2;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_DELCHAIN: u8 = 5;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_DELRULE: u8 = 8;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_DELSET: u8 = 11;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_DELSETELEM: u8 = 14;
const NFT_MSG_DESTROYTABLE: u8 = 26;
const NFT_MSG_DESTROYCHAIN: u8 = 27;
const NFT_MSG_DESTROYRULE: u8 = 28;
const NFT_MSG_DESTROYSET: u8 = 29;
const NFT_MSG_DESTROYSETELEM: u8 = 30;

/// Reads the table name (attribute 1) and the object's name (attribute 2; for a rule its chain) of an
/// nf_tables object message without decoding the rest.
fn raw(kind: u8, payload: &[u8]) -> Option<(String, What)> {
    let mut table = None;
    let mut name = String::new();
    let mut rest = payload.get(NFGENMSG_LEN..)?;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        let value = &rest[4..len];
        let text = || {
            String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default())
                .into_owned()
        };
        match ty {
            1 => table = Some(text()),
            // (For a chain, attribute 2 is its handle and 3 its name.)
            2 if !matches!(
                kind,
                NFT_MSG_NEWTABLE
                    | NFT_MSG_DELTABLE
                    | NFT_MSG_NEWCHAIN
                    | NFT_MSG_DELCHAIN
                    | NFT_MSG_DESTROYCHAIN
            ) =>
            {
                name = text()
            }
            3 if matches!(
                kind,
                NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN
            ) =>
            {
                name = text()
            }
            _ => {}
        }
        let next = (len + 3) & !3;
        if next >= rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    let table = table?;
    let what = match kind {
        NFT_MSG_NEWTABLE => What::Table { added: true },
        NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE => What::Table { added: false },
        NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN => What::Chain {
            added: kind == NFT_MSG_NEWCHAIN,
            name,
        },
        NFT_MSG_NEWRULE | NFT_MSG_DELRULE | NFT_MSG_DESTROYRULE => What::Rule {
            added: kind == NFT_MSG_NEWRULE,
            chain: name,
        },
        NFT_MSG_NEWSET | NFT_MSG_DELSET | NFT_MSG_DESTROYSET => What::Set {
            added: kind == NFT_MSG_NEWSET,
            name,
        },
        NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM | NFT_MSG_DESTROYSETELEM => What::Element {
            added: kind == NFT_MSG_NEWSETELEM,
            set: name,
        },
        _ => What::Other { kind, name },
    };
    Some((table, what))
}

/// Portids of this process's NETLINK_NETFILTER sockets: those open at the last scan, and those
/// remembered until a deadline (closed sockets, `nft` children).
#[derive(Default)]
struct Owned {
    live: Vec<u32>,
    remembered: HashMap<u32, Instant>,
}

static OWNED: Mutex<Option<Owned>> = Mutex::new(None);

fn with_owned<T>(f: impl FnOnce(&mut Owned) -> T) -> T {
    let mut g = OWNED.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Owned::default))
}

/// Counts `portid` as this process's until `for_how_long` from now (e.g. an `nft` child: its pid).
pub fn remember_portid(portid: u32, for_how_long: Duration) {
    let until = Instant::now() + for_how_long;
    with_owned(|o| {
        let e = o.remembered.entry(portid).or_insert(until);
        *e = (*e).max(until);
    });
}

/// The socket with `portid` was closed (an `nft` child exited): it stays ours for
/// [`RETIRED_PORTID_TTL`], for its notifications still queued.
pub fn retire_portid(portid: u32) {
    let until = Instant::now() + RETIRED_PORTID_TTL;
    with_owned(|o| {
        o.remembered.insert(portid, until);
    });
}

/// Remembers the portids of every NETLINK_NETFILTER socket this process holds now for
/// [`RETIRED_PORTID_TTL`]: called before a socket is closed whose commits may still be on their way
/// to the monitor (a libnftables context being freed).
pub fn remember_own_sockets() {
    let now = own_portids();
    with_owned(|o| {
        let until = Instant::now() + RETIRED_PORTID_TTL;
        for p in &now {
            o.remembered.insert(*p, until);
        }
        o.live = now;
    });
}

/// From the cache only: true when `portid` is known to be ours.
pub fn known_own(portid: u32) -> bool {
    with_owned(|o| {
        o.live.contains(&portid)
            || o.remembered
                .get(&portid)
                .is_some_and(|t| *t > Instant::now())
    })
}

/// True when `portid` is ours; rescans this process's sockets when the cache does not know it.
pub fn is_own(portid: u32) -> bool {
    if known_own(portid) {
        return true;
    }
    let now = own_portids();
    with_owned(|o| {
        let t = Instant::now();
        o.remembered.retain(|_, until| *until > t);
        o.live = now;
        // Remembered counts too: the socket may have been remembered and closed during the scan
        // (a libnftables context replaced right after its commit).
        o.live.contains(&portid) || o.remembered.contains_key(&portid)
    })
}

/// Portids of this process's NETLINK_NETFILTER sockets: every socket fd in /proc/self/fd, asked for
/// its domain, protocol and bound address. (Simpler than matching inodes in /proc/net/netlink, and
/// it answers for the socket itself whatever namespace the reading thread is in.)
pub fn own_portids() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::c_int>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        if get_int(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK)
            || get_int(fd, libc::SO_PROTOCOL) != Some(NETLINK_NETFILTER)
        {
            continue;
        }
        // SAFETY: sockaddr_nl is plain data; getsockname writes at most `len` bytes into it. The fd
        // may have been closed (and reused) since it was listed: then the call fails or the domain
        // check below rejects it.
        unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) == 0
                && addr.nl_family as libc::c_int == libc::AF_NETLINK
                && addr.nl_pid != 0
            {
                out.push(addr.nl_pid);
            }
        }
    }
    out
}

/// Switches a [`Monitor`]'s subscription to the notification group off and on again, from another
/// thread (a duplicate of its socket: membership belongs to the socket, not the descriptor).
///
/// While nobody in a namespace subscribes, the kernel builds no notification at all; a process
/// whose own large transaction would otherwise make it build (and its monitor read) one message per
/// rule, set element and object, at 100k pods seconds of a full replace, leaves the group for that
/// transaction. Whatever else is committed meanwhile is unseen: the caller must prove nothing was
/// (the transaction generation, see `setelem::ElementWriter::generation`).
pub struct Membership {
    /// The monitor's socket through a descriptor of our own.
    socket: netlink_sys::Socket,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

impl Membership {
    /// Stops the notifications (the monitor hears nothing until [`Membership::join`]).
    pub fn leave(&self) -> Result<()> {
        self.socket
            .drop_membership(NFNLGRP_NFTABLES)
            .map_err(|source| Error::Monitor {
                action: "leave the nf_tables notification group",
                source,
            })
    }
    /// Subscribes again.
    pub fn join(&self) -> Result<()> {
        self.socket
            .add_membership(NFNLGRP_NFTABLES)
            .map_err(|source| Error::Monitor {
                action: "rejoin the nf_tables notification group",
                source,
            })
    }
}

/// The socket and the classifier. Opened in the network namespace of the calling thread.
pub struct Monitor {
    socket: netlink_sys::Socket,
    classifier: Classifier,
    buf: Vec<u8>,
    queued: std::collections::VecDeque<Drift>,
}

impl Monitor {
    /// Subscribes to nf_tables notifications of this thread's network namespace; from here on no
    /// change to the table is missed.
    pub fn open(scope: Scope) -> Result<Self> {
        Self::with_receive_buffer(scope, RECEIVE_BUFFER_BYTES)
    }

    /// [`Monitor::open`] with a receive buffer of `bytes` (tests provoke an overrun with a small one).
    pub fn with_receive_buffer(scope: Scope, bytes: usize) -> Result<Self> {
        let err = |action: &'static str| move |source| Error::Monitor { action, source };
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)
            .map_err(err("open a NETLINK_NETFILTER socket"))?;
        socket
            .bind(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(err("bind the monitor socket"))?;
        let size = bytes.min(i32::MAX as usize) as libc::c_int;
        if set_int(socket.as_raw_fd(), libc::SO_RCVBUFFORCE, size).is_err() {
            // Without CAP_NET_ADMIN: as much as rmem_max allows.
            socket
                .set_rx_buf_sz(bytes)
                .map_err(err("size the monitor socket's receive buffer"))?;
        }
        socket
            .add_membership(NFNLGRP_NFTABLES)
            .map_err(err("join the nf_tables notification group"))?;
        Ok(Monitor {
            socket,
            classifier: Classifier::new(scope),
            buf: vec![0; 1 << 20],
            queued: Default::default(),
        })
    }

    /// A switch for this monitor's subscription, usable from another thread.
    pub fn membership(&self) -> Result<Membership> {
        let fd = self
            .socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Monitor {
                action: "duplicate the monitor socket",
                source,
            })?;
        // SAFETY: the descriptor is ours alone (just duplicated) and a NETLINK_NETFILTER socket;
        // the Socket closes it when dropped.
        let socket = unsafe { netlink_sys::Socket::from_raw_fd(fd.into_raw_fd()) };
        Ok(Membership { socket })
    }

    /// Waits for the next drift; `None` when `timeout` passed first (`None` waits forever).
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Drift>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(d) = self.queued.pop_front() {
                return Ok(Some(d));
            }
            let wait_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Monitor {
                    action: "wait for nf_tables notifications",
                    source: e,
                });
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: recv into our buffer of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        let mut d = self.classifier.overrun();
                        d.first_seen = Some(Instant::now());
                        self.queued.push_back(d);
                    }
                    Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                    _ => {
                        return Err(Error::Monitor {
                            action: "read nf_tables notifications",
                            source: e,
                        })
                    }
                }
                continue;
            }
            let n = n as usize;
            self.classifier.received = Some(Instant::now());
            let drifts = self
                .classifier
                .feed(&self.buf[..n], &mut known_own, &mut is_own);
            self.queued.extend(drifts);
        }
    }
}

#[cfg(test)]
mod tests;
