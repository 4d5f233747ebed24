//! The typed model of our one nft table and its rendering to nft JSON (`nft -j -f -`).
//!
//! Nothing else in palisade knows nft syntax or nf_tables messages ([`netlink`] writes the same
//! table as nfnetlink messages). Chain and set names are derived from stable hashes
//! (see [`names`]); user strings reach nft only as JSON string values in comments.

#[cfg(any(test, feature = "testkit"))]
pub mod eval;
pub mod names;
pub mod netlink;
pub(crate) mod render;

pub use netlink::{NetlinkBatch, NewSetNaming, Unsupported};
pub use render::{Batch, ElementChange, ElementKey, MAX_ELEMENT_CHANGES};

use crate::model::Protocol;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Postrouting,
    Input,
    Output,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Postrouting => "postrouting",
            Self::Input => "input",
            Self::Output => "output",
        }
    }
}

/// Type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Filter,
    Nat,
}

impl ChainKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Nat => "nat",
        }
    }
}

/// A base chain's attachment: `type <kind> hook <hook> priority <priority>; policy accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseHook {
    pub kind: ChainKind,
    pub hook: Hook,
    pub priority: i32,
}

/// Address family of an address match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
    /// `v4` / `v6`, used in derived names.
    pub fn tag(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// Which address of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrField {
    Saddr,
    Daddr,
}

/// A direction of a conntrack entry (`ct original ...`, `ct reply ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtDir {
    Original,
    Reply,
}

impl CtDir {
    pub const BOTH: [CtDir; 2] = [CtDir::Original, CtDir::Reply];
}

/// A typed statement (match or verdict) of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `ct state established`
    CtEstablished,
    /// `ct state related`: an ICMP error about a tracked connection (its entry is that
    /// connection's), or a connection a helper expected.
    CtRelated,
    /// `ct state invalid`
    CtInvalid,
    /// `ct state new`
    CtNew,
    /// `ct status ! confirmed`: the first packet of a connection (its conntrack entry is confirmed
    /// only after our hooks, at the end of postrouting or input).
    CtNotConfirmed,
    /// `fib saddr type local`: the source is an address of this node.
    FibSaddrLocal,
    /// `meta iif 0`: the packet came in through no interface: this node sent it. (A source
    /// address is what any sender writes; the kernel drops an IPv4 packet from outside claiming
    /// one of ours, not an IPv6 one.)
    NoInputInterface,
    /// `fib saddr type != local`: the source is not an address of this node.
    FibSaddrNotLocal,
    /// `icmpv6 type 133-137` (nd-router-solicit to nd-redirect).
    Icmpv6NeighbourDiscovery,
    /// `icmpv6 type <type>`
    Icmpv6Type(u8),
    /// `ip6 hoplimit 255`: a packet nobody forwarded (neighbour discovery's hop limit, RFC 4861;
    /// a router decrements it before the forward and postrouting hooks see the packet).
    Ip6HopLimit255,
    /// `iifname "<prefix>*"`: the packet came in through a pod's host veth.
    IifnamePrefix(String),
    /// `iifname . ip[6] saddr != @set`: the source address is not one of the pod's behind this veth.
    IifSaddrNotInSet {
        family: Family,
        set: String,
    },
    /// `iifname . ct <dir> ip[6] saddr @set`: the connection's source in that direction is an
    /// address of the pod behind this veth (it is an endpoint of the connection).
    IifCtSaddrInSet {
        family: Family,
        dir: CtDir,
        set: String,
    },
    /// `ip6 saddr != :: ip6 saddr != fe80::/10`: neither unspecified (DAD) nor link-local.
    Ip6SaddrNotLinkLocal,
    /// `ip[6] <field> @set`
    AddrInSet {
        family: Family,
        field: AddrField,
        set: String,
    },
    /// `ip[6] <field> != @set`
    AddrNotInSet {
        family: Family,
        field: AddrField,
        set: String,
    },
    /// `masquerade` (nat chains only): the packet leaves with the address of its output interface.
    Masquerade,
    /// `notrack` (a chain before conntrack, priority raw): conntrack never sees the packet, whose
    /// `ct state` is then `untracked`.
    Notrack,
    /// `ip[6] saddr . ip[6] daddr @set`: source and destination are the same local pod.
    SelfTraffic {
        family: Family,
        set: String,
    },
    /// `meta l4proto <proto>`; with [`Stmt::Dport`], a rule's only port compared in place (a set of
    /// one element would be one more name the kernel looks up by walking the table's sets, and nft
    /// keeps even a one-element anonymous set a set).
    L4Proto(Protocol),
    /// `th dport <port>` (after [`Stmt::L4Proto`] of a protocol with ports).
    Dport(u16),
    /// `meta l4proto . th dport @set`
    ProtoPortInSet {
        set: String,
    },
    /// `ip[6] daddr . meta l4proto . th dport @set`
    DaddrProtoPortInSet {
        family: Family,
        set: String,
    },
    /// `ip[6] <field> vmap @map`
    VmapLookup {
        family: Family,
        field: AddrField,
        map: String,
    },
    /// `iifname vmap @map`: the verdict of the interface the packet came in through.
    IifnameVmap {
        map: String,
    },
    Counter,
    /// `counter name <name>`: a named counter object of our table (read by name for the
    /// per-policy metrics).
    CounterNamed(String),
    /// `limit rate <rate>/second burst <burst> packets`: matches while under the rate (its state is
    /// the rule's own: one rule, one budget).
    Limit {
        rate: u32,
        burst: u32,
    },
    /// `log group <group> prefix <prefix> snaplen <snaplen>`: a copy of the packet to NFLOG.
    Log {
        group: u16,
        prefix: String,
        snaplen: u32,
    },
    Accept,
    Drop,
    Jump(String),
    /// Back to the rule after the `jump` that entered this chain (a ClusterNetworkPolicy's Pass:
    /// the rest of its tier is skipped).
    Return,
    /// Continue in another chain without returning here (its end returns to this chain's caller).
    Goto(String),
}

impl Stmt {
    /// The named set or map this statement looks up, if any.
    pub fn set_name(&self) -> Option<&str> {
        match self {
            Stmt::IifSaddrNotInSet { set, .. }
            | Stmt::IifCtSaddrInSet { set, .. }
            | Stmt::AddrInSet { set, .. }
            | Stmt::AddrNotInSet { set, .. }
            | Stmt::SelfTraffic { set, .. }
            | Stmt::ProtoPortInSet { set, .. }
            | Stmt::DaddrProtoPortInSet { set, .. } => Some(set),
            Stmt::VmapLookup { map, .. } | Stmt::IifnameVmap { map, .. } => Some(map),
            _ => None,
        }
    }
}

/// One rule: statements in order, and an optional comment (a plain JSON string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(stmts: Vec<Stmt>) -> Self {
        Self {
            stmts,
            comment: None,
        }
    }
    pub fn with_comment(mut self, c: impl Into<String>) -> Self {
        self.comment = Some(c.into());
        self
    }
}

/// A chain of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseHook>,
    pub comment: String,
    pub rules: Vec<Rule>,
}

/// Key type of a set or map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    Ipv4,
    Ipv6,
    /// `inet_proto . inet_service`
    ProtoPort,
    /// `ipv4_addr . inet_proto . inet_service`
    Ipv4ProtoPort,
    /// `ipv6_addr . inet_proto . inet_service`
    Ipv6ProtoPort,
    /// `ipv4_addr . ipv4_addr`
    Ipv4Pair,
    /// `ipv6_addr . ipv6_addr`
    Ipv6Pair,
    /// `ifname . ipv4_addr`
    IfnameIpv4,
    /// `ifname . ipv6_addr`
    IfnameIpv6,
    /// `ifname`
    Ifname,
}

/// One element of a set or map.
///
/// 24 bytes: the variants a large set holds (`Addr`, an address of a peer set; `AddrProtoPort`,
/// a named port's) are inline, and the ones a node has a few of (its pods' bindings, self pairs and
/// verdicts, ipBlock ranges) are boxed. With every variant inline an element was 40 bytes: at 100k
/// pods the peer sets' 185k elements held ~8 MB, about 3 MB more than now, on top of the steady
/// state and of the start-up peak alike. The order is the one the unboxed fields had (variant,
/// then fields), so a set lists and encodes as before.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Elem {
    Addr(IpAddr),
    /// Inclusive address range (interval sets): [`Elem::range`].
    Range(Box<(IpAddr, IpAddr)>),
    /// Protocol and inclusive port range (`tcp . 53-80`).
    ProtoPort(Protocol, u16, u16),
    /// `addr . proto . port`
    AddrProtoPort(IpAddr, Protocol, u16),
    /// `addr . addr`: [`Elem::addr_pair`].
    AddrPair(Box<(IpAddr, IpAddr)>),
    /// Verdict map element: `addr : goto <chain>`: [`Elem::goto_chain`].
    GotoChain(Box<(IpAddr, Box<str>)>),
    /// `ifname . addr`: an address a pod may send from, and the host veth it comes in through:
    /// [`Elem::iface_addr`].
    IfaceAddr(Box<(Box<str>, IpAddr)>),
    /// Verdict map element: `ifname : goto <chain>`: [`Elem::iface_goto`].
    IfaceGoto(Box<(Box<str>, Box<str>)>),
}

impl Elem {
    pub fn range(first: IpAddr, last: IpAddr) -> Self {
        Elem::Range(Box::new((first, last)))
    }
    pub fn addr_pair(a: IpAddr, b: IpAddr) -> Self {
        Elem::AddrPair(Box::new((a, b)))
    }
    pub fn goto_chain(ip: IpAddr, chain: Box<str>) -> Self {
        Elem::GotoChain(Box::new((ip, chain)))
    }
    pub fn iface_addr(ifname: Box<str>, ip: IpAddr) -> Self {
        Elem::IfaceAddr(Box::new((ifname, ip)))
    }
    pub fn iface_goto(ifname: Box<str>, chain: Box<str>) -> Self {
        Elem::IfaceGoto(Box::new((ifname, chain)))
    }
}

/// A named set or verdict map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: SetKey,
    /// `flags interval`
    pub interval: bool,
    /// A verdict map (`type <key> : verdict`) rather than a set.
    pub verdict_map: bool,
    pub comment: String,
    pub elements: BTreeSet<Elem>,
}

/// The fewest elements a hash set or map is declared to hold (see [`Set::size`]).
pub const SET_SIZE_MIN: u32 = 8;

impl Set {
    /// The `size` the set is declared with, or `None` (interval sets, and the pending sets the
    /// CNI plugin writes into between our commits, which must never be full).
    ///
    /// With a size the kernel gives a hash set a table of that capacity at once (its fixed-size
    /// hash) instead of a resizable one grown while the elements go in: at 100k pods the full
    /// replace's commit took 0.26–0.38 s instead of 0.87–1.07 s, and a landing pod's 66k
    /// named-port elements 23–42 ms instead of 89–124. The size is also a limit (`ENFILE` past
    /// it), and a kernel may not let it change, so it depends on the elements alone and a set
    /// that outgrows the size the kernel holds it at (`diff::DeclaredSizes`) is recreated by
    /// `diff` with its new size (its rules rewritten in the same transaction). The
    /// kernel gives a set of size `s` a table of `s * 4 / 3` buckets rounded up to a power of
    /// two: the size is three quarters of the power of two that holds the elements (at least
    /// [`SET_SIZE_MIN`]) at that load, so no bucket is paid for that the size does not use
    /// (11 to 21 bytes of buckets per element; at 100k pods the node's sets take 9.5 MiB of
    /// buckets where a power-of-two size took 18).
    pub fn size(&self) -> Option<u32> {
        self.size_holding(self.elements.len())
    }

    /// [`Set::size`] of this set were it to hold `len` elements.
    pub fn size_holding(&self, len: usize) -> Option<u32> {
        if self.interval || names::is_pending_set(&self.name) {
            return None;
        }
        let n = u64::try_from(len)
            .unwrap_or(u64::MAX)
            .max(u64::from(SET_SIZE_MIN));
        let buckets = n.saturating_mul(4).div_ceil(3).next_power_of_two();
        Some(u32::try_from(buckets / 4 * 3).unwrap_or(u32::MAX))
    }

    /// Whether two sets have the same definition (everything but the elements).
    pub fn same_definition(&self, other: &Set) -> bool {
        self.name == other.name
            && self.key == other.key
            && self.interval == other.interval
            && self.verdict_map == other.verdict_map
            && self.comment == other.comment
    }
}

/// Our whole table: what the kernel should hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
    /// Named counter objects (`counter name` in rules refers to them).
    pub counters: BTreeSet<String>,
}

/// Size figures of a ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RulesetStats {
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    pub elements: usize,
}

impl Ruleset {
    pub fn add_chain(&mut self, c: Chain) {
        self.chains.insert(c.name.clone(), c);
    }
    pub fn add_set(&mut self, s: Set) {
        self.sets.insert(s.name.clone(), s);
    }
    pub fn add_counter(&mut self, name: String) {
        self.counters.insert(name);
    }
    /// Adds every object of `part` (parts share no name but that of a peer or port set, which is
    /// named by what decides its content and so the same in each).
    pub fn merge(&mut self, part: Ruleset) {
        self.chains.extend(part.chains);
        self.sets.extend(part.sets);
        self.counters.extend(part.counters);
    }
    pub fn stats(&self) -> RulesetStats {
        RulesetStats {
            chains: self.chains.len(),
            rules: self.chains.values().map(|c| c.rules.len()).sum(),
            sets: self.sets.len(),
            elements: self.sets.values().map(|s| s.elements.len()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Elem, Set, SetKey};

    #[test]
    fn a_set_element_is_three_words() {
        // Every peer address of every set is an `Elem`: 185k of them at 100k pods.
        assert_eq!(std::mem::size_of::<Elem>(), 24);
    }

    #[test]
    fn a_set_is_sized_to_hold_its_elements_in_a_full_power_of_two_table() {
        let set = |name: &str, interval: bool| Set {
            name: name.into(),
            key: SetKey::Ipv4,
            interval,
            verdict_map: false,
            comment: String::new(),
            elements: Default::default(),
        };
        let s = set("peer_x_v4", false);
        assert_eq!(s.size(), Some(12));
        for len in [
            0, 1, 16, 18, 24, 25, 48, 49, 1000, 33_273, 100_000, 3_000_000,
        ] {
            let size = s.size_holding(len).unwrap();
            // The kernel's table for a size (nft_hash_buckets): what the size pays for.
            let buckets = (u64::from(size) * 4 / 3).next_power_of_two();
            assert!(u64::from(size) >= len as u64, "{len} elements, size {size}");
            assert_eq!(buckets * 3 / 4, u64::from(size), "{len}: buckets {buckets}");
            assert!(
                buckets * 3 <= (len.max(8) as u64) * 8,
                "{len}: {buckets} buckets"
            );
        }
        assert_eq!(s.size_holding(24), Some(24));
        assert_eq!(s.size_holding(25), Some(48));
        // The plugin writes the pending sets between our commits; interval sets are not hashes.
        assert_eq!(set(super::names::PENDING_SET_V4, false).size(), None);
        assert_eq!(set("cidr_x_v4", true).size(), None);
    }
}
