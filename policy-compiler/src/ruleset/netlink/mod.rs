//! The typed ruleset as one nf_tables transaction of nfnetlink messages: what `nft -j -f -` would
//! send for [`Ruleset::full_replace`], built here without JSON, without libnftables and without
//! its cache. At 10k pods a full replace through libnftables spends about as long in userspace
//! (JSON parsing, evaluation, allocation) as the kernel spends committing it; this builds the same
//! messages in a few milliseconds. Pure: bytes in, bytes out; palisade-nft sends them.
//!
//! The messages are the ones nft sends (captured from nft 1.1 and matched field by field, including
//! the set user data `nft list` reads key types from), so a table written either way lists the
//! same; a kernel test holds both paths to that. Chain and set comments are not sent: nft's JSON
//! input drops them too. Whatever this module cannot encode is [`Unsupported`], and the caller
//! falls back to the JSON path.

mod expr;
mod nla;

use super::names::{TABLE_FAMILY, TABLE_NAME};
use super::{Chain, ChainKind, Elem, Hook, Rule, Ruleset, Set, SetKey, Stmt};
use nla::Writer;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Why a ruleset was not encoded (the JSON path takes it instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("set {set:?}: {what}")]
    Set { set: String, what: &'static str },
    #[error("table family {0:?} is not inet")]
    Family(&'static str),
    #[error("comment of {0} bytes (user data holds at most 255)")]
    Comment(usize),
}

/// One nf_tables transaction: `NFNL_MSG_BATCH_BEGIN`, the messages, `NFNL_MSG_BATCH_END`, as one
/// datagram. Only the last message asks for an acknowledgement: the kernel answers a failed
/// message with its error whether asked or not, and commits all or nothing.
///
/// The bytes are held in parts of about [`PART_BYTES`], each ending at a message's end, and sent
/// as one datagram from all of them (`sendmsg` with one iovec per part): one buffer grown by
/// doubling held up to twice a full replace's bytes, and both copies while it grew (at 100k pods
/// a 16 MB buffer on top of the agent's steady state when it commits its first sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetlinkBatch {
    parts: Vec<Vec<u8>>,
    /// Messages between begin and end.
    pub messages: usize,
}

/// A batch part is closed at the first message end past this many bytes.
pub const PART_BYTES: usize = 1 << 20;

/// A part's room: [`PART_BYTES`] and the message that crosses it (one is at most ~64 KiB), so a
/// part is never regrown once it has its room.
const PART_ROOM: usize = PART_BYTES + PART_BYTES / 8;

impl NetlinkBatch {
    /// The datagram, in order: the first part begins with `NFNL_MSG_BATCH_BEGIN`, the last ends
    /// with `NFNL_MSG_BATCH_END`.
    pub fn parts(&self) -> Vec<&[u8]> {
        self.parts.iter().map(Vec::as_slice).collect()
    }
    /// Bytes of the whole datagram.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }
    /// Never true: a batch holds at least its begin and end messages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The datagram as one buffer (tests, and a reader that wants the messages in one piece).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

// linux/netfilter/nfnetlink.h, nf_tables.h, netlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_DELOBJ: u16 = 20;
const NFT_OBJECT_COUNTER: u32 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NFPROTO_INET: u8 = 1;
const NFPROTO_UNSPEC: u8 = 0;

const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// nft's data type numbers (`enum datatypes`), combined for a concatenation 6 bits per part.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const TYPE_BITS: u32 = 6;

/// Bytes of an interface name in a key (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;
/// A set element message stays under this many bytes of elements (an attribute's length is 16
/// bits; nft cuts its element messages at the same boundary).
const ELEMENTS_PER_MESSAGE_BYTES: usize = 60 * 1024;

/// The parts of a key: nft type number and length in bytes (unpadded).
fn key_parts(k: SetKey) -> &'static [(u32, u32)] {
    match k {
        SetKey::Ipv4 => &[(TYPE_IPADDR, 4)],
        SetKey::Ipv6 => &[(TYPE_IP6ADDR, 16)],
        SetKey::ProtoPort => &[(TYPE_INET_PROTOCOL, 1), (TYPE_INET_SERVICE, 2)],
        SetKey::Ipv4ProtoPort => &[
            (TYPE_IPADDR, 4),
            (TYPE_INET_PROTOCOL, 1),
            (TYPE_INET_SERVICE, 2),
        ],
        SetKey::Ipv6ProtoPort => &[
            (TYPE_IP6ADDR, 16),
            (TYPE_INET_PROTOCOL, 1),
            (TYPE_INET_SERVICE, 2),
        ],
        SetKey::Ipv4Pair => &[(TYPE_IPADDR, 4), (TYPE_IPADDR, 4)],
        SetKey::Ipv6Pair => &[(TYPE_IP6ADDR, 16), (TYPE_IP6ADDR, 16)],
        SetKey::IfnameIpv4 => &[(TYPE_IFNAME, IFNAMSIZ as u32), (TYPE_IPADDR, 4)],
        SetKey::IfnameIpv6 => &[(TYPE_IFNAME, IFNAMSIZ as u32), (TYPE_IP6ADDR, 16)],
        SetKey::Ifname => &[(TYPE_IFNAME, IFNAMSIZ as u32)],
    }
}

fn padded(len: u32) -> u32 {
    len.div_ceil(4) * 4
}

/// The set's user data as nft writes it: the key's byte order (big endian for one address, host
/// for an interface name, none for a concatenation, which carries its own record), a map's data
/// byte order and interval flag.
/// `nft list` reads the key type back from it.
fn set_udata(s: &Set) -> Vec<u8> {
    const KEYBYTEORDER: u8 = 0;
    const DATABYTEORDER: u8 = 1;
    const CONCAT_RECORD: u8 = 3;
    const DATA_INTERVAL: u8 = 6;
    const HOST_ENDIAN: u32 = 1;
    const BIG_ENDIAN: u32 = 2;
    let concat = key_parts(s.key).len() > 1;
    let mut records: Vec<(u8, Vec<u8>)> = Vec::new();
    if concat {
        records.push((KEYBYTEORDER, 0u32.to_ne_bytes().to_vec()));
        records.push((
            CONCAT_RECORD,
            vec![0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00],
        ));
    } else if s.key == SetKey::Ifname {
        records.push((KEYBYTEORDER, HOST_ENDIAN.to_ne_bytes().to_vec()));
    } else {
        records.push((KEYBYTEORDER, BIG_ENDIAN.to_ne_bytes().to_vec()));
    }
    if s.verdict_map {
        records.push((DATABYTEORDER, 0u32.to_ne_bytes().to_vec()));
        records.push((DATA_INTERVAL, 0u32.to_ne_bytes().to_vec()));
    }
    let refs: Vec<(u8, &[u8])> = records.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    nla::udata(&refs)
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One key part padded to 4 bytes.
fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(part);
    nla::pad(out);
}

/// The key (and, for a concatenation's range, the key's end) of an element in a set of `key`.
fn elem_key(set: &Set, e: &Elem) -> Result<(Vec<u8>, Option<Vec<u8>>), Unsupported> {
    let bad = |what| Unsupported::Set {
        set: set.name.clone(),
        what,
    };
    let fam_ok = |ip: &IpAddr, v4: bool| ip.is_ipv4() == v4;
    let mut k = Vec::new();
    let mut end = None;
    match (set.key, e) {
        (SetKey::Ipv4 | SetKey::Ipv6, Elem::Addr(ip)) if fam_ok(ip, set.key == SetKey::Ipv4) => {
            push_part(&mut k, &addr_bytes(ip))
        }
        (SetKey::Ipv4 | SetKey::Ipv6, Elem::GotoChain(g))
            if fam_ok(&g.0, set.key == SetKey::Ipv4) =>
        {
            push_part(&mut k, &addr_bytes(&g.0))
        }
        (SetKey::ProtoPort, Elem::ProtoPort(p, lo, hi)) => {
            push_part(&mut k, &[expr::proto_number(*p)]);
            push_part(&mut k, &lo.to_be_bytes());
            if set.interval {
                let mut e = Vec::new();
                push_part(&mut e, &[expr::proto_number(*p)]);
                push_part(&mut e, &hi.to_be_bytes());
                end = Some(e);
            } else if lo != hi {
                return Err(bad("a port range in a set without the interval flag"));
            }
        }
        (SetKey::Ipv4ProtoPort | SetKey::Ipv6ProtoPort, Elem::AddrProtoPort(ip, p, port))
            if fam_ok(ip, set.key == SetKey::Ipv4ProtoPort) =>
        {
            push_part(&mut k, &addr_bytes(ip));
            push_part(&mut k, &[expr::proto_number(*p)]);
            push_part(&mut k, &port.to_be_bytes());
        }
        (SetKey::Ipv4Pair | SetKey::Ipv6Pair, Elem::AddrPair(pair))
            if fam_ok(&pair.0, set.key == SetKey::Ipv4Pair)
                && fam_ok(&pair.1, set.key == SetKey::Ipv4Pair) =>
        {
            push_part(&mut k, &addr_bytes(&pair.0));
            push_part(&mut k, &addr_bytes(&pair.1));
        }
        (SetKey::IfnameIpv4 | SetKey::IfnameIpv6, Elem::IfaceAddr(pair))
            if fam_ok(&pair.1, set.key == SetKey::IfnameIpv4) && pair.0.len() < IFNAMSIZ =>
        {
            let mut n = pair.0.as_bytes().to_vec();
            n.resize(IFNAMSIZ, 0);
            push_part(&mut k, &n);
            push_part(&mut k, &addr_bytes(&pair.1));
        }
        (SetKey::Ifname, Elem::IfaceGoto(g)) if g.0.len() < IFNAMSIZ => {
            let mut n = g.0.as_bytes().to_vec();
            n.resize(IFNAMSIZ, 0);
            push_part(&mut k, &n);
        }
        _ => return Err(bad("an element that does not fit the set's key")),
    }
    Ok((k, end))
}

/// The address after `ip`, `None` after the last one.
fn next_addr(ip: &IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(a) => u32::from(*a).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(a) => u128::from(*a).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// An interval set of one address field as the kernel's rbtree holds it, which is how nft writes
/// it: each range `[a, b]` as a start element `a` and an end element `b + 1` flagged
/// `INTERVAL_END` (none after the last address: the range stays open, marked so in the element's
/// user data), and an end element at address zero first when the first range starts later.
/// `ranges` are disjoint, not adjacent, sorted (the compiler merges them).
fn interval_elements(set: &Set) -> Result<Vec<ElemMsg>, Unsupported> {
    let v4 = set.key == SetKey::Ipv4;
    let mut ranges = Vec::new();
    for e in &set.elements {
        let (a, b) = match e {
            Elem::Range(r) => **r,
            Elem::Addr(a) => (*a, *a),
            _ => {
                return Err(Unsupported::Set {
                    set: set.name.clone(),
                    what: "an element that is not an address or a range in an interval set",
                })
            }
        };
        if a.is_ipv4() != v4 || b.is_ipv4() != v4 || a > b {
            return Err(Unsupported::Set {
                set: set.name.clone(),
                what: "a range of the wrong family or reversed",
            });
        }
        ranges.push((a, b));
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if next_addr(&pair[0].1).is_none_or(|n| n >= pair[1].0) {
            return Err(Unsupported::Set {
                set: set.name.clone(),
                what: "overlapping or adjacent ranges",
            });
        }
    }
    let zero = if v4 {
        IpAddr::V4(0.into())
    } else {
        IpAddr::V6(0.into())
    };
    let mut out = Vec::new();
    if ranges.first().is_some_and(|(a, _)| *a != zero) {
        out.push(ElemMsg::end(addr_bytes(&zero)));
    }
    for (a, b) in ranges {
        out.push(ElemMsg::key(addr_bytes(&a)));
        match next_addr(&b) {
            Some(n) => out.push(ElemMsg::end(addr_bytes(&n))),
            None => {
                if let Some(last) = out.last_mut() {
                    last.open = true;
                }
            }
        }
    }
    Ok(out)
}

/// One element as the messages carry it.
struct ElemMsg {
    key: Vec<u8>,
    key_end: Option<Vec<u8>>,
    interval_end: bool,
    /// The last range runs to the last address (`NFTNL_SET_ELEM_F_INTERVAL_OPEN` in user data).
    open: bool,
    goto: Option<String>,
}

impl ElemMsg {
    fn key(key: Vec<u8>) -> Self {
        ElemMsg {
            key,
            key_end: None,
            interval_end: false,
            open: false,
            goto: None,
        }
    }
    fn end(key: Vec<u8>) -> Self {
        ElemMsg {
            interval_end: true,
            ..ElemMsg::key(key)
        }
    }
}

/// Builds the messages of one batch.
struct Messages {
    /// The part being written; `done` the parts before it.
    w: Writer,
    done: Vec<Vec<u8>>,
    seq: u32,
    messages: usize,
    /// Where the last nf_tables message begins in `w` (a part is closed only before one).
    last_header: usize,
}

impl Messages {
    fn new() -> Self {
        let mut b = Messages {
            w: Writer::default(),
            done: Vec::new(),
            seq: 0,
            messages: 0,
            last_header: 0,
        };
        b.control(NFNL_MSG_BATCH_BEGIN);
        b
    }

    /// Opens a message (netlink header, nfgenmsg); the attributes follow; `close` sets its length.
    fn open(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.w.buf.len();
        self.seq += 1;
        self.w.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched
        self.w.buf.extend_from_slice(&ty.to_ne_bytes());
        self.w.buf.extend_from_slice(&flags.to_ne_bytes());
        self.w.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.w.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        self.w.buf.push(family);
        self.w.buf.push(0); // NFNETLINK_V0
        self.w.buf.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn close(&mut self, at: usize) {
        let len = (self.w.buf.len() - at) as u32;
        self.w.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn control(&mut self, ty: u16) {
        let at = self.open(ty, NLM_F_REQUEST, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
        self.close(at);
    }

    /// An nf_tables message whose attributes `body` writes.
    fn msg(&mut self, ty: u16, flags: u16, body: impl FnOnce(&mut Writer)) {
        let len = self.w.buf.len();
        if len >= PART_BYTES {
            let next = Vec::with_capacity(PART_ROOM);
            self.done.push(std::mem::replace(&mut self.w.buf, next));
        } else if len >= PART_BYTES / 4 && self.w.buf.capacity() < PART_ROOM {
            // The first part grows by doubling (most batches are small); one past a quarter of a
            // part gets its room at once instead of doubling on to 2 MiB, half of it unused.
            self.w.buf.reserve_exact(PART_ROOM - len);
        }
        let at = self.open(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
        );
        body(&mut self.w);
        self.close(at);
        self.messages += 1;
        self.last_header = at;
    }

    fn finish(mut self) -> NetlinkBatch {
        // The last message asks for the acknowledgement that tells the sender the batch is done.
        let flags_at = self.last_header + 6;
        let flags =
            u16::from_ne_bytes([self.w.buf[flags_at], self.w.buf[flags_at + 1]]) | NLM_F_ACK;
        self.w.buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());
        self.control(NFNL_MSG_BATCH_END);
        self.done.push(self.w.buf);
        NetlinkBatch {
            parts: self.done,
            messages: self.messages,
        }
    }
}

fn hook_number(h: Hook) -> u32 {
    match h {
        Hook::Prerouting => 0,
        Hook::Input => 1,
        Hook::Output => 3,
        Hook::Postrouting => 4,
    }
}

/// The elements of `s` as messages carry them: all of an interval set of one field at once (its
/// ranges become start and end elements together), else each element on its own.
fn element_msgs<'a>(
    s: &Set,
    elements: impl IntoIterator<Item = &'a Elem>,
) -> Result<Vec<ElemMsg>, Unsupported> {
    let concat = key_parts(s.key).len() > 1;
    elements
        .into_iter()
        .map(|e| {
            let (key, end) = elem_key(s, e)?;
            let mut m = ElemMsg::key(key);
            m.key_end = if s.interval && concat {
                Some(end.unwrap_or_else(|| m.key.clone()))
            } else {
                None
            };
            match e {
                Elem::GotoChain(g) => m.goto = Some(g.1.to_string()),
                Elem::IfaceGoto(g) => m.goto = Some(g.1.to_string()),
                _ => {}
            }
            Ok(m)
        })
        .collect()
}

/// How element messages name a set created in the same transaction.
///
/// The kernel finds the set an element message names by walking the table's sets from the first
/// created, comparing names, and tries the set ID only when no name matched: a full replace of
/// ~450 sets spent ~7 % of its commit in those walks (10k pods, `perf`). Since Linux 6.12
/// (c1aa38866b9c, "store new sets in dedicated list") a lookup by ID walks only the
/// transaction's new sets, the last created first: one step for the set just created. Before,
/// it walked the whole transaction from its first message, far slower than the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewSetNaming {
    /// By name and by ID, as nft does (any kernel).
    #[default]
    NameAndId,
    /// By ID alone (a kernel that finds new sets by ID at once: 6.12 and later).
    IdOnly,
}

/// One nf_tables transaction on our table, built step by step (what `diff` emits, in its order;
/// a full replace is the same steps over an emptied table). A step it cannot encode is remembered
/// and [`Transaction::finish`] returns it.
pub struct Transaction {
    msgs: Messages,
    /// Sets created in this transaction: rules and elements name them by id too, as nft does.
    set_ids: HashMap<String, u32>,
    /// How element messages name those sets.
    naming: NewSetNaming,
    failed: Option<Unsupported>,
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

impl Transaction {
    pub fn new() -> Self {
        Self::naming_new_sets(NewSetNaming::default())
    }

    /// A transaction whose element messages name the sets it creates as `naming` says.
    pub fn naming_new_sets(naming: NewSetNaming) -> Self {
        Transaction {
            msgs: Messages::new(),
            set_ids: HashMap::new(),
            naming,
            failed: None,
        }
    }

    fn fail(&mut self, e: Unsupported) {
        self.failed.get_or_insert(e);
    }

    /// `add table; delete table; add table`: whatever the kernel held, an empty table.
    fn empty_table(&mut self) {
        let table = |w: &mut Writer| w.strz(1, TABLE_NAME); // NFTA_TABLE_NAME
        self.msgs.msg(NFT_MSG_NEWTABLE, 0, |w| {
            table(w);
            w.u32(2, 0); // NFTA_TABLE_FLAGS
        });
        self.msgs.msg(NFT_MSG_DELTABLE, 0, table);
        self.msgs.msg(NFT_MSG_NEWTABLE, 0, |w| {
            table(w);
            w.u32(2, 0);
        });
    }

    /// `add chain` with its hook, if a base chain.
    pub fn add_chain(&mut self, c: &Chain) {
        self.msgs.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |w| {
            w.strz(1, TABLE_NAME); // NFTA_CHAIN_TABLE
            w.strz(3, &c.name); // NFTA_CHAIN_NAME
            if let Some(base) = c.base {
                w.strz(
                    7, // NFTA_CHAIN_TYPE
                    match base.kind {
                        ChainKind::Filter => "filter",
                        ChainKind::Nat => "nat",
                    },
                );
                w.u32(5, expr::NF_ACCEPT); // NFTA_CHAIN_POLICY
                let hook = w.begin(4); // NFTA_CHAIN_HOOK
                w.u32(1, hook_number(base.hook)); // NFTA_HOOK_HOOKNUM
                w.u32(2, base.priority as u32); // NFTA_HOOK_PRIORITY
                w.end(hook);
            }
        });
    }

    /// `flush chain`: all its rules go.
    pub fn flush_chain(&mut self, name: &str) {
        self.msgs.msg(NFT_MSG_DELRULE, 0, |w| {
            w.strz(1, TABLE_NAME); // NFTA_RULE_TABLE
            w.strz(2, name); // NFTA_RULE_CHAIN
        });
    }

    /// `delete chain` (empty, not jumped to).
    pub fn delete_chain(&mut self, name: &str) {
        self.msgs.msg(NFT_MSG_DELCHAIN, 0, |w| {
            w.strz(1, TABLE_NAME); // NFTA_CHAIN_TABLE
            w.strz(3, name); // NFTA_CHAIN_NAME
        });
    }

    /// `add set` (its definition; elements go with [`Transaction::add_elements`]).
    pub fn add_set(&mut self, s: &Set) {
        let parts = key_parts(s.key);
        let concat = parts.len() > 1;
        if s.verdict_map && (concat || s.interval) {
            return self.fail(Unsupported::Set {
                set: s.name.clone(),
                what: "a verdict map keyed by more than one address",
            });
        }
        if s.interval && concat && s.key != SetKey::ProtoPort {
            return self.fail(Unsupported::Set {
                set: s.name.clone(),
                what: "an interval set of a concatenation other than protocol . port",
            });
        }
        let id = self.set_ids.len() as u32 + 1;
        self.set_ids.insert(s.name.clone(), id);
        let key_type = parts.iter().fold(0, |t, (ty, _)| (t << TYPE_BITS) | ty);
        let key_len: u32 = parts.iter().map(|(_, l)| padded(*l)).sum();
        let mut flags = 0;
        if s.interval {
            flags |= NFT_SET_INTERVAL;
            if concat {
                flags |= NFT_SET_CONCAT;
            }
        }
        if s.verdict_map {
            flags |= NFT_SET_MAP;
        }
        let udata = set_udata(s);
        self.msgs.msg(NFT_MSG_NEWSET, NLM_F_CREATE, |w| {
            w.strz(1, TABLE_NAME); // NFTA_SET_TABLE
            w.strz(2, &s.name); // NFTA_SET_NAME
            w.u32(3, flags); // NFTA_SET_FLAGS
            w.u32(4, key_type); // NFTA_SET_KEY_TYPE
            w.u32(5, key_len); // NFTA_SET_KEY_LEN
            if s.verdict_map {
                w.u32(6, NFT_DATA_VERDICT); // NFTA_SET_DATA_TYPE
                w.u32(7, 0); // NFTA_SET_DATA_LEN
            }
            w.u32(10, id); // NFTA_SET_ID
            if s.interval && concat {
                let desc = w.begin(9); // NFTA_SET_DESC
                let fields = w.begin(2); // NFTA_SET_DESC_CONCAT
                for (_, len) in parts {
                    let f = w.begin(1); // NFTA_LIST_ELEM
                    w.u32(1, *len); // NFTA_SET_FIELD_LEN
                    w.end(f);
                }
                w.end(fields);
                w.end(desc);
            } else if let Some(size) = s.size() {
                let desc = w.begin(9); // NFTA_SET_DESC
                w.u32(1, size); // NFTA_SET_DESC_SIZE
                w.end(desc);
            }
            w.bytes(13, &udata); // NFTA_SET_USERDATA
        });
    }

    /// `delete set`.
    pub fn delete_set(&mut self, name: &str) {
        self.msgs.msg(NFT_MSG_DELSET, 0, |w| {
            w.strz(1, TABLE_NAME); // NFTA_SET_TABLE
            w.strz(2, name); // NFTA_SET_NAME
        });
    }

    /// All elements of `s`, written whole: into a set created in this transaction, or
    /// (`existing`) into the kernel's set after a flush. How an interval set changes in place:
    /// its ranges' end elements depend on their neighbours, so the set is written as a full
    /// replace writes it.
    pub fn refill_set(&mut self, s: &Set, existing: bool) {
        if existing {
            // `flush set`: a DELSETELEM without an element list.
            self.msgs.msg(NFT_MSG_DELSETELEM, 0, |w| {
                w.strz(1, TABLE_NAME); // NFTA_SET_ELEM_LIST_TABLE
                w.strz(2, &s.name); // NFTA_SET_ELEM_LIST_SET
            });
        }
        self.fill_set(s);
    }

    /// All elements of `s`, into the set just created for it.
    fn fill_set(&mut self, s: &Set) {
        let msgs = if s.interval && key_parts(s.key).len() == 1 {
            interval_elements(s)
        } else {
            element_msgs(s, &s.elements)
        };
        match msgs {
            Ok(m) => self.elements(s, &m, false),
            Err(e) => self.fail(e),
        }
    }

    /// `add element` of some elements to `s` (a set of the kernel or of this transaction). Not for
    /// an interval set: its ranges' end elements depend on its neighbours in the kernel
    /// ([`Transaction::refill_set`] writes one whole).
    pub fn add_elements<'a>(&mut self, s: &Set, elements: impl IntoIterator<Item = &'a Elem>) {
        self.some_elements(s, elements, false)
    }

    /// `delete element` (by key) of some elements of `s`; not for an interval set.
    pub fn delete_elements<'a>(&mut self, s: &Set, elements: impl IntoIterator<Item = &'a Elem>) {
        self.some_elements(s, elements, true)
    }

    fn some_elements<'a>(
        &mut self,
        s: &Set,
        elements: impl IntoIterator<Item = &'a Elem>,
        delete: bool,
    ) {
        if s.interval {
            return self.fail(Unsupported::Set {
                set: s.name.clone(),
                what: "elements added to or deleted from an interval set",
            });
        }
        match element_msgs(s, elements) {
            Ok(mut m) => {
                if delete {
                    m.iter_mut().for_each(|e| e.goto = None);
                }
                self.elements(s, &m, delete)
            }
            Err(e) => self.fail(e),
        }
    }

    fn elements(&mut self, s: &Set, elems: &[ElemMsg], delete: bool) {
        if s.verdict_map && !delete && elems.iter().any(|e| e.goto.is_none()) {
            return self.fail(Unsupported::Set {
                set: s.name.clone(),
                what: "a verdict map element without a verdict",
            });
        }
        let id = self.set_ids.get(&s.name).copied();
        let naming = self.naming;
        let (ty, flags) = if delete {
            (NFT_MSG_DELSETELEM, 0)
        } else {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
        };
        let mut rest = elems;
        while !rest.is_empty() {
            self.msgs.msg(ty, flags, |w| {
                w.strz(1, TABLE_NAME); // NFTA_SET_ELEM_LIST_TABLE
                if id.is_none() || naming == NewSetNaming::NameAndId {
                    w.strz(2, &s.name); // NFTA_SET_ELEM_LIST_SET
                }
                if let Some(id) = id {
                    w.u32(4, id); // NFTA_SET_ELEM_LIST_SET_ID
                }
                let list = w.begin(3); // NFTA_SET_ELEM_LIST_ELEMENTS
                let mut index: u16 = 0;
                while let Some((e, tail)) = rest.split_first() {
                    if w.nest_len(&list) > ELEMENTS_PER_MESSAGE_BYTES {
                        break;
                    }
                    index += 1;
                    elem(w, index, e);
                    rest = tail;
                }
                w.end(list);
            });
        }
    }

    /// `add counter` (a named counter object).
    pub fn add_counter(&mut self, name: &str) {
        self.msgs.msg(NFT_MSG_NEWOBJ, NLM_F_CREATE, |w| {
            w.strz(1, TABLE_NAME); // NFTA_OBJ_TABLE
            w.strz(2, name); // NFTA_OBJ_NAME
            w.u32(3, NFT_OBJECT_COUNTER); // NFTA_OBJ_TYPE
            let data = w.begin(4); // NFTA_OBJ_DATA
            w.u64(1, 0); // NFTA_COUNTER_BYTES
            w.u64(2, 0); // NFTA_COUNTER_PACKETS
            w.end(data);
        });
    }

    /// `delete counter`.
    pub fn delete_counter(&mut self, name: &str) {
        self.msgs.msg(NFT_MSG_DELOBJ, 0, |w| {
            w.strz(1, TABLE_NAME); // NFTA_OBJ_TABLE
            w.strz(2, name); // NFTA_OBJ_NAME
            w.u32(3, NFT_OBJECT_COUNTER); // NFTA_OBJ_TYPE
        });
    }

    /// `add rule` at the end of `chain`.
    pub fn add_rule(&mut self, chain: &str, r: &Rule) {
        let udata = match &r.comment {
            Some(text) => {
                let mut z = text.as_bytes().to_vec();
                z.push(0);
                if z.len() > usize::from(u8::MAX) {
                    return self.fail(Unsupported::Comment(text.len()));
                }
                Some(nla::udata(&[(0, &z)])) // NFTNL_UDATA_RULE_COMMENT
            }
            None => None,
        };
        let set_ids = &self.set_ids;
        self.msgs
            .msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |w| {
                w.strz(1, TABLE_NAME); // NFTA_RULE_TABLE
                w.strz(2, chain); // NFTA_RULE_CHAIN
                let exprs = w.begin(4); // NFTA_RULE_EXPRESSIONS
                expr::lower(w, &r.stmts, set_ids);
                w.end(exprs);
                if let Some(u) = &udata {
                    w.bytes(7, u); // NFTA_RULE_USERDATA
                }
            });
    }

    /// The transaction (`None` when it holds no step), or the first step it could not encode.
    pub fn finish(self) -> Result<Option<NetlinkBatch>, Unsupported> {
        if self.msgs.messages == 0 && self.failed.is_none() {
            return Ok(None);
        }
        self.into_batch().map(Some)
    }

    /// The transaction, or the first step it could not encode.
    fn into_batch(self) -> Result<NetlinkBatch, Unsupported> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.msgs.finish()),
        }
    }
}

/// One element of a message's list; nft numbers them 1, 2, ... in each message (the kernel reads
/// any number).
fn elem(w: &mut Writer, index: u16, e: &ElemMsg) {
    const NFTNL_UDATA_SET_ELEM_FLAGS: u8 = 1;
    const NFTNL_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
    let el = w.begin(index);
    if e.interval_end {
        w.u32(3, NFT_SET_ELEM_INTERVAL_END); // NFTA_SET_ELEM_FLAGS
    }
    let k = w.begin(1); // NFTA_SET_ELEM_KEY
    w.bytes(1, &e.key); // NFTA_DATA_VALUE
    w.end(k);
    if let Some(end) = &e.key_end {
        let k = w.begin(10); // NFTA_SET_ELEM_KEY_END
        w.bytes(1, end);
        w.end(k);
    }
    if let Some(chain) = &e.goto {
        let d = w.begin(2); // NFTA_SET_ELEM_DATA
        let v = w.begin(2); // NFTA_DATA_VERDICT
        w.u32(1, expr::NFT_GOTO); // NFTA_VERDICT_CODE
        w.strz(2, chain); // NFTA_VERDICT_CHAIN
        w.end(v);
        w.end(d);
    }
    if e.open {
        let flags = NFTNL_SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes();
        w.bytes(6, &nla::udata(&[(NFTNL_UDATA_SET_ELEM_FLAGS, &flags)])); // NFTA_SET_ELEM_USERDATA
    }
    w.end(el);
}

impl Ruleset {
    /// The sets, the ones most rules look up first. The kernel finds a set by name by walking the
    /// table's list of sets in the order they were created, for every rule that names one (and
    /// for each set's own creation and elements): at 10k pods a group chain's self exemption names
    /// `self_v4` and `self_v6` from ~190 chains each, which walked past ~450 peer sets created
    /// before them (name order) every time.
    fn sets_by_references(&self) -> Vec<&Set> {
        let mut refs: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.chains.values().flat_map(|c| &c.rules) {
            for name in r.stmts.iter().filter_map(Stmt::set_name) {
                *refs.entry(name).or_default() += 1;
            }
        }
        let mut sets: Vec<&Set> = self.sets.values().collect();
        // Stable: equal counts keep name order (a batch is the same bytes for the same ruleset).
        sets.sort_by_key(|s| std::cmp::Reverse(refs.get(s.name.as_str()).copied().unwrap_or(0)));
        sets
    }

    /// [`Ruleset::full_replace`] as nfnetlink messages: `add table; delete table; add table`,
    /// chains, sets with their elements, counters, rules, in one transaction; the sets
    /// in `Self::sets_by_references` order. Element messages name their sets as nft does
    /// ([`NewSetNaming::NameAndId`]).
    pub fn full_replace_netlink(&self) -> Result<NetlinkBatch, Unsupported> {
        self.full_replace_netlink_naming(NewSetNaming::default())
    }

    /// [`Ruleset::full_replace_netlink`] with each set's elements naming it as `naming` says
    /// (they follow the set's creation at once, so a kernel that finds new sets by ID finds it in
    /// one step).
    pub fn full_replace_netlink_naming(
        &self,
        naming: NewSetNaming,
    ) -> Result<NetlinkBatch, Unsupported> {
        if TABLE_FAMILY != "inet" {
            return Err(Unsupported::Family(TABLE_FAMILY));
        }
        let mut t = Transaction::naming_new_sets(naming);
        t.empty_table();
        for c in self.chains.values() {
            t.add_chain(c);
        }
        for s in self.sets_by_references() {
            t.add_set(s);
            t.fill_set(s);
        }
        for n in &self.counters {
            t.add_counter(n);
        }
        for c in self.chains.values() {
            for r in &c.rules {
                t.add_rule(&c.name, r);
            }
        }
        t.into_batch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use std::collections::BTreeSet;

    /// The messages of a batch as (type, attributes after the first, which names the table).
    fn messages(b: &NetlinkBatch) -> Vec<(u16, Vec<u8>)> {
        let bytes = b.to_bytes();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([bytes[at + 4], bytes[at + 5]]);
            let attrs = &bytes[at + 20..at + len];
            let skip = if attrs.is_empty() {
                0
            } else {
                (usize::from(u16::from_ne_bytes([attrs[0], attrs[1]])) + 3) & !3
            };
            out.push((ty, attrs[skip..].to_vec()));
            at += (len + 3) & !3;
        }
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A plain set of IPv4 addresses.
    fn v4_set(name: &str, elements: impl IntoIterator<Item = Elem>) -> Set {
        Set {
            name: name.into(),
            key: SetKey::Ipv4,
            interval: false,
            verdict_map: false,
            comment: String::new(),
            elements: elements.into_iter().collect(),
        }
    }

    /// A batch past [`PART_BYTES`] is held in parts that each end where a message ends (the
    /// kernel reads one datagram, so a message cut between two parts would still arrive whole;
    /// what matters is that no part is regrown or copied), and the parts together are the same
    /// messages in the same order; no part, the first included, grows past its room.
    #[test]
    fn a_large_batch_is_held_in_parts_that_end_at_message_ends() {
        let mut rs = Ruleset::default();
        let elements: BTreeSet<Elem> = (0..200_000u32)
            .map(|i| Elem::Addr(IpAddr::V4((0x0a00_0000 + i).into())))
            .collect();
        rs.add_set(v4_set("big", elements));
        let b = rs.full_replace_netlink().unwrap();
        for (i, part) in b.parts.iter().enumerate() {
            assert!(part.capacity() <= PART_ROOM, "part {i} was regrown");
        }
        let parts = b.parts();
        assert!(
            parts.len() >= 3,
            "{} bytes in {} parts",
            b.len(),
            parts.len()
        );
        for (i, part) in parts.iter().enumerate() {
            let mut at = 0;
            while at < part.len() {
                let len = u32::from_ne_bytes(part[at..at + 4].try_into().unwrap()) as usize;
                assert!(len >= 20, "part {i}: a message of {len} bytes at {at}");
                at += (len + 3) & !3;
            }
            assert_eq!(at, part.len(), "part {i} ends inside a message");
            if i + 1 < parts.len() {
                assert!(part.len() >= PART_BYTES, "part {i} closed early");
                assert!(part.len() < PART_BYTES + (1 << 16), "part {i} ran on");
            }
        }
        let all = messages(&b);
        assert_eq!(all.len(), b.messages + 2, "begin, the messages, end");
        assert_eq!(all.first().unwrap().0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(all.last().unwrap().0, NFNL_MSG_BATCH_END);
        let elements_sent: usize = all
            .iter()
            .filter(|(ty, _)| *ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM)
            .count();
        assert!(elements_sent > 1, "elements go in messages of < 64 KiB");
    }

    /// The kernel walks the table's sets in creation order to find one by name, for every rule
    /// that names one: the sets most rules look up are created first, the rest in name order.
    #[test]
    fn the_full_replace_creates_the_most_looked_up_sets_first() {
        let mut rs = Ruleset::default();
        for name in ["a_peer", "b_peer", "self_v4", "z_unused"] {
            rs.add_set(v4_set(name, []));
        }
        let lookup = |name: &str| {
            Rule::new(vec![Stmt::AddrInSet {
                family: crate::ruleset::Family::V4,
                field: crate::ruleset::AddrField::Saddr,
                set: name.into(),
            }])
        };
        let mut rules: Vec<Rule> = (0..3).map(|_| lookup("self_v4")).collect();
        rules.push(lookup("b_peer"));
        rules.push(lookup("b_peer"));
        rules.push(lookup("a_peer"));
        rs.add_chain(Chain {
            name: "c".into(),
            base: None,
            comment: String::new(),
            rules,
        });
        let created: Vec<String> = messages(&rs.full_replace_netlink().unwrap())
            .into_iter()
            .filter(|(ty, _)| *ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSET)
            .map(|(_, attrs)| {
                // The set's name is the first attribute after the table's.
                let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                String::from_utf8_lossy(&attrs[4..len])
                    .trim_end_matches('\0')
                    .to_string()
            })
            .collect();
        assert_eq!(created, ["self_v4", "b_peer", "a_peer", "z_unused"]);
    }

    /// What nft 1.1 sent for `set iv4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/24,
    /// 10.1.0.5, 10.2.0.0-255.255.255.255 } }`, `set iv6 { type ipv6_addr; flags interval;
    /// elements = { ::-fd00::ff } }` and `set ppi { type inet_proto . inet_service; flags interval;
    /// elements = { tcp . 80-90, udp . 53 } }` (captured with strace, little-endian host), after
    /// the table name. The kernel test compares listings, which do not show an interval set's
    /// end elements or the zero element before the first range; this holds those to nft's bytes.
    #[test]
    fn interval_sets_are_encoded_byte_for_byte_as_nft_encodes_them() {
        if cfg!(target_endian = "big") {
            return;
        }
        let set = |name: &str, key, elements: Vec<Elem>| Set {
            name: name.into(),
            key,
            interval: true,
            verdict_map: false,
            comment: String::new(),
            elements: elements.into_iter().collect::<BTreeSet<_>>(),
        };
        let mut rs = Ruleset::default();
        rs.add_set(set(
            "iv4",
            SetKey::Ipv4,
            vec![
                Elem::range(ip("10.0.0.0"), ip("10.0.0.255")),
                Elem::Addr(ip("10.1.0.5")),
                Elem::range(ip("10.2.0.0"), ip("255.255.255.255")),
            ],
        ));
        rs.add_set(set(
            "iv6",
            SetKey::Ipv6,
            vec![Elem::range(ip("::"), ip("fd00::ff"))],
        ));
        rs.add_set(set(
            "ppi",
            SetKey::ProtoPort,
            vec![
                Elem::ProtoPort(Protocol::Tcp, 80, 90),
                Elem::ProtoPort(Protocol::Udp, 53, 53),
            ],
        ));
        let got = messages(&rs.full_replace_netlink().unwrap());
        let nft: [(u16, &str); 6] = [
            (0xa09, "080002006976340008000300000000040800040000000007080005000000000408000a00000000010a000d000004020000000000"),
            (0xa0c, "08000200697634000800040000000001880003801800018008000300000000010c0001800800010000000000100002800c000180080001000a0000001800038008000300000000010c000180080001000a000100100004800c000180080001000a0100051800058008000300000000010c000180080001000a0100061c0006800c000180080001000a0200000a0006000104010000000000"),
            (0xa09, "080002006976360008000300000000040800040000000008080005000000001008000a00000000020a000d000004020000000000"),
            (0xa0c, "08000200697636000800040000000002440003801c0001801800018014000100000000000000000000000000000000002400028008000300000000011800018014000100fd000000000000000000000000000100"),
            (0xa09, "08000200707069000800030000000084080004000000030d080005000000000808000a0000000003200009801c0002800c00018008000100000000010c000180080001000000000214000d00000400000000030800040d0000000100"),
            (0xa0c, "080002007070690008000400000000034c00038024000180100001800c000100060000000050000010000a800c00010006000000005a000024000280100001800c000100110000000035000010000a800c0001001100000000350000"),
        ];
        let sets: Vec<&(u16, Vec<u8>)> = got
            .iter()
            .filter(|(t, _)| *t == 0xa09 || *t == 0xa0c)
            .collect();
        assert_eq!(sets.len(), 6);
        for (i, ((want_ty, want), (ty, attrs))) in nft.iter().zip(sets).enumerate() {
            assert_eq!(want_ty, ty, "message {i}");
            assert_eq!(&hex(want), attrs, "message {i}");
        }
    }

    /// With [`NewSetNaming::IdOnly`], elements name a set created in the same transaction by its
    /// ID alone (no name for the kernel to walk the table's sets for) and a set of the kernel's
    /// by its name; with the default, both by name, the new one by its ID too (as nft, above).
    #[test]
    fn elements_name_a_new_set_by_id_alone_when_asked_and_an_existing_one_by_name() {
        let set = |name: &str| v4_set(name, [Elem::Addr(ip("10.0.0.1"))]);
        let (created, existing) = (set("new_set"), set("old_set"));
        let elements = |naming| -> Vec<Vec<u8>> {
            let mut t = Transaction::naming_new_sets(naming);
            t.add_set(&created);
            t.add_elements(&created, &created.elements);
            t.add_elements(&existing, &existing.elements);
            messages(&t.into_batch().unwrap())
                .into_iter()
                .filter(|(ty, _)| *ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM)
                .map(|(_, attrs)| attrs)
                .collect()
        };
        // NFTA_SET_ELEM_LIST_SET (2) = "new_set\0"; NFTA_SET_ELEM_LIST_SET_ID (4) = 1, the
        // first set this transaction created.
        let (name, id): (&[u8], &[u8]) = (b"\x0c\x00\x02\x00new_set\0", &[8, 0, 4, 0, 0, 0, 0, 1]);
        let old_name: &[u8] = b"\x0c\x00\x02\x00old_set\0";
        let by_id = elements(NewSetNaming::IdOnly);
        assert_eq!(by_id.len(), 2);
        assert!(by_id[0].starts_with(id), "{:?}", by_id[0]);
        assert!(!contains(&by_id[0], b"new_set"));
        assert!(by_id[1].starts_with(old_name), "{:?}", by_id[1]);
        let both = elements(NewSetNaming::NameAndId);
        assert!(both[0].starts_with(&[name, id].concat()), "{:?}", both[0]);
        assert!(both[1].starts_with(old_name), "{:?}", both[1]);
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }
}
