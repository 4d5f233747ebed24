//! Rendering of the typed ruleset to nft JSON (`{"nftables": [...]}`, as `nft -j -f -` reads it).

use super::names::{TABLE_FAMILY, TABLE_NAME};
use super::{AddrField, Chain, CtDir, Elem, Family, Rule, Ruleset, Set, SetKey, Stmt};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// One nft transaction: its commands, rendered to nft JSON when asked ([`Batch::json`],
/// [`Batch::to_json_string`]), and the same transaction as nfnetlink messages when the compiler
/// could encode it. The agent commits the messages; the JSON is for nft (a fallback, `compile`,
/// tests), so a batch's element lists, most of its bulk, are kept as elements and rendered only
/// then (rendering and measuring them was ~80 % of an incremental compile whose policies bring
/// 100k peer addresses).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    commands: Vec<Command>,
    /// The same transaction as nfnetlink messages, when `diff` could encode every step of it
    /// (`None` for other batches, or one that is empty).
    pub netlink: Option<super::NetlinkBatch>,
}

/// One command of a batch: rendered when the batch is built, or elements of a named set added
/// or deleted (deleted map elements by key only), rendered when the JSON is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    Rendered(Value),
    Elements {
        add: bool,
        set: String,
        elems: Vec<Elem>,
    },
}

impl Command {
    /// `add` (or `delete`, map elements by key only) of `elems` in set `s`.
    pub(crate) fn elements<'a>(
        add: bool,
        s: &Set,
        elems: impl IntoIterator<Item = &'a Elem>,
    ) -> Self {
        Command::Elements {
            add,
            set: s.name.clone(),
            elems: elems.into_iter().cloned().collect(),
        }
    }

    /// The command as nft JSON, handed to `f` (a rendered one by reference, elements rendered
    /// for the call and dropped after it).
    fn with_json<T>(&self, f: impl FnOnce(&Value) -> T) -> T {
        match self {
            Command::Rendered(v) => f(v),
            Command::Elements { add, set, elems } => {
                let verb = if *add { "add" } else { "delete" };
                f(&cmd(verb, element_obj(set, elems, !add)))
            }
        }
    }
}

impl From<Value> for Command {
    fn from(v: Value) -> Self {
        Command::Rendered(v)
    }
}

impl Batch {
    pub(crate) fn from_commands(commands: Vec<Command>) -> Self {
        Self {
            commands,
            netlink: None,
        }
    }

    pub(crate) fn from_values(cmds: Vec<Value>) -> Self {
        Self::from_commands(cmds.into_iter().map(Command::Rendered).collect())
    }

    /// Number of commands in it.
    pub fn commands(&self) -> usize {
        self.commands.len()
    }

    /// `{"nftables": [...]}`
    pub fn json(&self) -> Value {
        let cmds = self.commands.iter().map(|c| c.with_json(Value::clone));
        json!({ "nftables": cmds.collect::<Vec<_>>() })
    }

    /// Writes the JSON text one command at a time (a whole document's tree is never held).
    fn write_json<W: std::io::Write>(&self, out: W) -> serde_json::Result<W> {
        let mut doc = Document::new(out)?;
        for c in &self.commands {
            c.with_json(|v| doc.command(v))?;
        }
        doc.finish()
    }

    /// Length of the JSON text in bytes (counted, not held).
    pub fn bytes(&self) -> usize {
        // A Value always serializes and the counter never fails; the size is informative.
        self.write_json(ByteCounter(0)).map_or(0, |c| c.0)
    }

    /// The sets and maps the batch deletes and adds again (recreated at a new size).
    #[cfg(any(test, feature = "testkit"))]
    pub fn recreated_sets(&self) -> std::collections::BTreeSet<String> {
        let named = |verb: &str| -> std::collections::BTreeSet<String> {
            self.commands
                .iter()
                .filter_map(|c| match c {
                    Command::Rendered(v) => v.get(verb).cloned(),
                    Command::Elements { .. } => None,
                })
                .filter_map(|o| o.get("set").or_else(|| o.get("map")).cloned())
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        };
        named("delete")
            .intersection(&named("add"))
            .cloned()
            .collect()
    }

    /// Whether the batch changes nothing (the agent can skip running nft).
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The batch as address element changes, in order, when that is all it is: every command adds
    /// or deletes elements of a set of `rs` keyed by addresses (`ipv4_addr`/`ipv6_addr`, `ifname .
    /// addr`, `addr . addr`; no interval set, no map), every address of the set's family, every
    /// interface name a plain name of at most 15 bytes, at most [`MAX_ELEMENT_CHANGES`] of them.
    /// Such a batch (peer pods coming and going, pending marks, a new pod's source binding and
    /// self pair) can be written as nfnetlink set element messages directly; anything else
    /// returns `None`.
    pub fn address_element_changes(&self, rs: &Ruleset) -> Option<Vec<ElementChange>> {
        let mut out = Vec::new();
        for c in &self.commands {
            let Command::Elements {
                add,
                set: name,
                elems,
            } = c
            else {
                return None;
            };
            let set = rs.sets.get(name)?;
            let (shape, v4) = match set.key {
                SetKey::Ipv4 => (KeyShape::Addr, true),
                SetKey::Ipv6 => (KeyShape::Addr, false),
                SetKey::IfnameIpv4 => (KeyShape::IfaceAddr, true),
                SetKey::IfnameIpv6 => (KeyShape::IfaceAddr, false),
                SetKey::Ipv4Pair => (KeyShape::AddrPair, true),
                SetKey::Ipv6Pair => (KeyShape::AddrPair, false),
                _ => return None,
            };
            if set.interval || set.verdict_map {
                return None;
            }
            for e in elems {
                let key = shape.key(e)?;
                if key.addrs().any(|a| a.is_ipv4() != v4) || out.len() == MAX_ELEMENT_CHANGES {
                    return None;
                }
                out.push(ElementChange {
                    add: *add,
                    set: name.clone(),
                    key,
                });
            }
        }
        Some(out)
    }

    /// The JSON text to feed to `nft -j -f -`, written one command at a time.
    pub fn to_json_string(&self) -> String {
        // Writing Values into a Vec cannot fail.
        let out = self.write_json(Vec::new()).unwrap_or_default();
        String::from_utf8(out).unwrap_or_else(|_| self.json().to_string())
    }
}

/// Most element changes [`Batch::address_element_changes`] returns (one netlink message each);
/// a larger batch goes through nft.
pub const MAX_ELEMENT_CHANGES: usize = 1024;

/// One element added to or deleted from a named set of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementChange {
    pub add: bool,
    pub set: String,
    pub key: ElementKey,
}

/// The key of an element of a set keyed by addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ElementKey {
    Addr(IpAddr),
    /// `ifname . addr`: a host veth and an address it may send from.
    IfaceAddr(String, IpAddr),
    /// `addr . addr`
    AddrPair(IpAddr, IpAddr),
}

impl ElementKey {
    /// The addresses in the key.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        let (a, b) = match self {
            ElementKey::Addr(a) | ElementKey::IfaceAddr(_, a) => (*a, None),
            ElementKey::AddrPair(a, b) => (*a, Some(*b)),
        };
        std::iter::once(a).chain(b)
    }
}

/// How the elements of an address-keyed set are keyed.
#[derive(Debug, Clone, Copy)]
enum KeyShape {
    Addr,
    IfaceAddr,
    AddrPair,
}

impl KeyShape {
    /// One element as a key of this shape (`None`: not of this shape, or an interface name that
    /// is not a plain name of at most 15 bytes).
    fn key(self, e: &Elem) -> Option<ElementKey> {
        match (self, e) {
            (KeyShape::Addr, Elem::Addr(a)) => Some(ElementKey::Addr(*a)),
            (KeyShape::Addr, Elem::Range(r)) if r.0 == r.1 => Some(ElementKey::Addr(r.0)),
            (KeyShape::IfaceAddr, Elem::IfaceAddr(pair)) => {
                let (name, a) = &**pair;
                let plain = !name.is_empty()
                    && name.len() < 16
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
                plain.then(|| ElementKey::IfaceAddr(name.to_string(), *a))
            }
            (KeyShape::AddrPair, Elem::AddrPair(pair)) => {
                Some(ElementKey::AddrPair(pair.0, pair.1))
            }
            _ => None,
        }
    }
}

/// `{"nftables":[...]}` written one command at a time (a whole document's tree is never held).
struct Document<W> {
    out: W,
    first: bool,
}

impl<W: std::io::Write> Document<W> {
    fn new(mut out: W) -> serde_json::Result<Self> {
        out.write_all(br#"{"nftables":["#)
            .map_err(serde_json::Error::io)?;
        Ok(Document { out, first: true })
    }

    fn command(&mut self, v: &Value) -> serde_json::Result<()> {
        if !std::mem::take(&mut self.first) {
            self.out.write_all(b",").map_err(serde_json::Error::io)?;
        }
        serde_json::to_writer(&mut self.out, v)
    }

    fn finish(mut self) -> serde_json::Result<W> {
        self.out.write_all(b"]}").map_err(serde_json::Error::io)?;
        Ok(self.out)
    }
}

/// An `io::Write` that only counts bytes.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) fn table_obj() -> Value {
    json!({"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}})
}

pub(crate) fn cmd(verb: &str, obj: Value) -> Value {
    let mut m = Map::new();
    m.insert(verb.to_string(), obj);
    Value::Object(m)
}

/// `{"chain": {...}}` with the definition (hook etc.) when `full`.
pub(crate) fn chain_obj(c: &Chain, full: bool) -> Value {
    let mut o = Map::new();
    o.insert("family".into(), json!(TABLE_FAMILY));
    o.insert("table".into(), json!(TABLE_NAME));
    o.insert("name".into(), json!(c.name));
    if full {
        if let Some(b) = c.base {
            o.insert("type".into(), json!(b.kind.as_str()));
            o.insert("hook".into(), json!(b.hook.as_str()));
            o.insert("prio".into(), json!(b.priority));
            o.insert("policy".into(), json!("accept"));
        }
        o.insert("comment".into(), json!(c.comment));
    }
    json!({ "chain": Value::Object(o) })
}

fn set_kind(s: &Set) -> &'static str {
    if s.verdict_map {
        "map"
    } else {
        "set"
    }
}

fn key_type(k: SetKey) -> Value {
    match k {
        SetKey::Ipv4 => json!("ipv4_addr"),
        SetKey::Ipv6 => json!("ipv6_addr"),
        SetKey::ProtoPort => json!(["inet_proto", "inet_service"]),
        SetKey::Ipv4ProtoPort => json!(["ipv4_addr", "inet_proto", "inet_service"]),
        SetKey::Ipv6ProtoPort => json!(["ipv6_addr", "inet_proto", "inet_service"]),
        SetKey::Ipv4Pair => json!(["ipv4_addr", "ipv4_addr"]),
        SetKey::Ipv6Pair => json!(["ipv6_addr", "ipv6_addr"]),
        SetKey::IfnameIpv4 => json!(["ifname", "ipv4_addr"]),
        SetKey::IfnameIpv6 => json!(["ifname", "ipv6_addr"]),
        SetKey::Ifname => json!("ifname"),
    }
}

/// `{"set"|"map": {...}}`: the definition, plus `elem` when given.
pub(crate) fn set_obj(s: &Set, elems: Option<Vec<Value>>) -> Value {
    let mut o = Map::new();
    o.insert("family".into(), json!(TABLE_FAMILY));
    o.insert("table".into(), json!(TABLE_NAME));
    o.insert("name".into(), json!(s.name));
    o.insert("type".into(), key_type(s.key));
    if s.verdict_map {
        o.insert("map".into(), json!("verdict"));
    }
    if s.interval {
        o.insert("flags".into(), json!(["interval"]));
    }
    if let Some(size) = s.size() {
        o.insert("size".into(), json!(size));
    }
    o.insert("comment".into(), json!(s.comment));
    if let Some(e) = elems.filter(|e| !e.is_empty()) {
        o.insert("elem".into(), Value::Array(e));
    }
    let mut w = Map::new();
    w.insert(set_kind(s).into(), Value::Object(o));
    Value::Object(w)
}

/// A bare reference to a set (for `delete`).
pub(crate) fn set_ref(s: &Set) -> Value {
    let mut w = Map::new();
    w.insert(
        set_kind(s).into(),
        json!({"family": TABLE_FAMILY, "table": TABLE_NAME, "name": s.name}),
    );
    Value::Object(w)
}

/// `{"element": {...}}` of set `name` for adding (`key_only` false) or deleting (map elements by
/// key only).
pub(crate) fn element_obj<'a>(
    name: &str,
    elems: impl IntoIterator<Item = &'a Elem>,
    key_only: bool,
) -> Value {
    let e: Vec<Value> = elems.into_iter().map(|e| elem_json(e, key_only)).collect();
    json!({"element": {"family": TABLE_FAMILY, "table": TABLE_NAME, "name": name, "elem": e}})
}

fn ip_json(ip: &IpAddr) -> Value {
    json!(ip.to_string())
}

fn port_json(lo: u16, hi: u16) -> Value {
    if lo == hi {
        json!(lo)
    } else {
        json!({"range": [lo, hi]})
    }
}

pub(crate) fn elem_json(e: &Elem, key_only: bool) -> Value {
    match e {
        Elem::Addr(ip) => ip_json(ip),
        Elem::Range(r) if r.0 == r.1 => ip_json(&r.0),
        Elem::Range(r) => json!({"range": [r.0.to_string(), r.1.to_string()]}),
        Elem::ProtoPort(p, lo, hi) => json!({"concat": [p.nft_name(), port_json(*lo, *hi)]}),
        Elem::AddrProtoPort(ip, p, port) => json!({"concat": [ip.to_string(), p.nft_name(), port]}),
        Elem::AddrPair(p) => json!({"concat": [p.0.to_string(), p.1.to_string()]}),
        Elem::GotoChain(g) if key_only => ip_json(&g.0),
        Elem::GotoChain(g) => json!([g.0.to_string(), {"goto": {"target": g.1}}]),
        Elem::IfaceAddr(p) => json!({"concat": [p.0, p.1.to_string()]}),
        Elem::IfaceGoto(g) if key_only => json!(g.0),
        Elem::IfaceGoto(g) => json!([g.0, {"goto": {"target": g.1}}]),
    }
}

fn fam_proto(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn field_name(f: AddrField) -> &'static str {
    match f {
        AddrField::Saddr => "saddr",
        AddrField::Daddr => "daddr",
    }
}

fn addr(f: Family, field: AddrField) -> Value {
    json!({"payload": {"protocol": fam_proto(f), "field": field_name(field)}})
}

fn l4proto_dport() -> [Value; 2] {
    [
        json!({"meta": {"key": "l4proto"}}),
        json!({"payload": {"protocol": "th", "field": "dport"}}),
    ]
}

fn set_ref_str(name: &str) -> Value {
    json!(format!("@{name}"))
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

/// The JSON of one statement: one object, but two for [`Stmt::Ip6SaddrNotLinkLocal`] (two
/// comparisons cost less than an anonymous interval set of two elements, and need no set).
pub(crate) fn push_stmt_json(s: &Stmt, out: &mut Vec<Value>) {
    match one_stmt_json(s) {
        Some(v) => out.push(v),
        None => {
            let saddr = addr(Family::V6, AddrField::Saddr);
            out.push(json!({"match": {"op": "!=", "left": saddr, "right": "::"}}));
            out.push(json!({"match": {"op": "!=", "left": saddr, "right": {"prefix": {"addr": "fe80::", "len": 10}}}}));
        }
    }
}

/// The JSON object of a statement that is one (`None`: [`Stmt::Ip6SaddrNotLinkLocal`]).
fn one_stmt_json(s: &Stmt) -> Option<Value> {
    Some(match s {
        Stmt::Ip6SaddrNotLinkLocal => return None,
        Stmt::CtEstablished => {
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}})
        }
        Stmt::CtRelated => {
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "related"}})
        }
        Stmt::IifCtSaddrInSet { family, dir, set } => {
            let dir = match dir {
                CtDir::Original => "original",
                CtDir::Reply => "reply",
            };
            let key = format!("{} saddr", fam_proto(*family));
            matches(
                json!({"concat": [{"meta": {"key": "iifname"}}, {"ct": {"key": key, "dir": dir}}]}),
                set_ref_str(set),
            )
        }
        Stmt::CtInvalid => {
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}})
        }
        Stmt::CtNotConfirmed => {
            json!({"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "confirmed"}})
        }
        Stmt::CtNew => {
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}})
        }
        Stmt::NoInputInterface => matches(json!({"meta": {"key": "iif"}}), json!(0)),
        Stmt::Ip6HopLimit255 => matches(
            json!({"payload": {"protocol": "ip6", "field": "hoplimit"}}),
            json!(255),
        ),
        Stmt::FibSaddrLocal => matches(
            json!({"fib": {"result": "type", "flags": ["saddr"]}}),
            json!("local"),
        ),
        Stmt::FibSaddrNotLocal => {
            json!({"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}})
        }
        // nd-router-solicit (133) to nd-redirect (137): a range is two comparisons, where a set
        // of the five would be an anonymous set to create and look up.
        Stmt::Icmpv6NeighbourDiscovery => matches(
            json!({"payload": {"protocol": "icmpv6", "field": "type"}}),
            json!({"range": [133, 137]}),
        ),
        Stmt::Icmpv6Type(t) => matches(
            json!({"payload": {"protocol": "icmpv6", "field": "type"}}),
            json!(t),
        ),
        Stmt::IifnamePrefix(prefix) => matches(
            json!({"meta": {"key": "iifname"}}),
            json!(format!("{prefix}*")),
        ),
        Stmt::IifSaddrNotInSet { family, set } => {
            json!({"match": {"op": "!=", "left": {"concat": [{"meta": {"key": "iifname"}}, addr(*family, AddrField::Saddr)]}, "right": set_ref_str(set)}})
        }
        Stmt::AddrInSet { family, field, set } => matches(addr(*family, *field), set_ref_str(set)),
        Stmt::AddrNotInSet { family, field, set } => {
            json!({"match": {"op": "!=", "left": addr(*family, *field), "right": set_ref_str(set)}})
        }
        Stmt::Masquerade => json!({"masquerade": null}),
        Stmt::Notrack => json!({"notrack": null}),
        Stmt::SelfTraffic { family, set } => matches(
            json!({"concat": [addr(*family, AddrField::Saddr), addr(*family, AddrField::Daddr)]}),
            set_ref_str(set),
        ),
        Stmt::L4Proto(p) => matches(json!({"meta": {"key": "l4proto"}}), json!(p.nft_name())),
        Stmt::Dport(port) => matches(
            json!({"payload": {"protocol": "th", "field": "dport"}}),
            json!(port),
        ),
        Stmt::ProtoPortInSet { set } => {
            matches(json!({"concat": l4proto_dport()}), set_ref_str(set))
        }
        Stmt::DaddrProtoPortInSet { family, set } => {
            let [p, d] = l4proto_dport();
            matches(
                json!({"concat": [addr(*family, AddrField::Daddr), p, d]}),
                set_ref_str(set),
            )
        }
        Stmt::VmapLookup { family, field, map } => {
            json!({"vmap": {"key": addr(*family, *field), "data": set_ref_str(map)}})
        }
        Stmt::IifnameVmap { map } => {
            json!({"vmap": {"key": {"meta": {"key": "iifname"}}, "data": set_ref_str(map)}})
        }
        Stmt::Counter => json!({"counter": null}),
        Stmt::CounterNamed(name) => json!({"counter": name}),
        Stmt::Limit { rate, burst } => {
            json!({"limit": {"rate": rate, "per": "second", "burst": burst}})
        }
        Stmt::Log {
            group,
            prefix,
            snaplen,
        } => json!({"log": {"prefix": prefix, "group": group, "snaplen": snaplen}}),
        Stmt::Accept => json!({"accept": null}),
        Stmt::Drop => json!({"drop": null}),
        Stmt::Jump(target) => json!({"jump": {"target": target}}),
        Stmt::Goto(target) => json!({"goto": {"target": target}}),
        Stmt::Return => json!({"return": null}),
    })
}

/// `{"counter": {...}}`: a named counter object of our table.
pub(crate) fn counter_obj(name: &str) -> Value {
    json!({"counter": {"family": TABLE_FAMILY, "table": TABLE_NAME, "name": name}})
}

/// `{"rule": {...}}` appending `r` to chain `chain`.
pub(crate) fn rule_obj(chain: &str, r: &Rule) -> Value {
    let mut o = Map::new();
    o.insert("family".into(), json!(TABLE_FAMILY));
    o.insert("table".into(), json!(TABLE_NAME));
    o.insert("chain".into(), json!(chain));
    o.insert(
        "expr".into(),
        Value::Array({
            let mut out = Vec::with_capacity(r.stmts.len());
            for st in &r.stmts {
                push_stmt_json(st, &mut out);
            }
            out
        }),
    );
    if let Some(c) = &r.comment {
        o.insert("comment".into(), json!(c));
    }
    json!({ "rule": Value::Object(o) })
}

impl Ruleset {
    /// The commands that create everything of this ruleset in an existing, empty table: chains
    /// first (verdict map elements and jumps need them), then sets with their elements, then rules.
    fn each_create_command(&self, mut emit: impl FnMut(Value)) {
        for c in self.chains.values() {
            emit(cmd("add", chain_obj(c, true)));
        }
        for s in self.sets.values() {
            let elems = s.elements.iter().map(|e| elem_json(e, false)).collect();
            emit(cmd("add", set_obj(s, Some(elems))));
        }
        for n in &self.counters {
            emit(cmd("add", counter_obj(n)));
        }
        for c in self.chains.values() {
            for r in &c.rules {
                emit(cmd("add", rule_obj(&c.name, r)));
            }
        }
    }

    /// The commands of [`Ruleset::full_replace`], one at a time.
    fn each_full_replace_command(&self, mut emit: impl FnMut(Value)) {
        emit(cmd("add", table_obj()));
        emit(cmd("delete", table_obj()));
        emit(cmd("add", table_obj()));
        self.each_create_command(emit);
    }

    /// One transaction that replaces our table with this ruleset, whatever the kernel holds:
    /// `add table; delete table; add table; ...everything`. Other tables are never touched.
    pub fn full_replace(&self) -> Batch {
        let mut cmds = Vec::new();
        self.each_full_replace_command(|c| cmds.push(c));
        Batch::from_values(cmds)
    }

    /// The text of [`Ruleset::full_replace`] (byte for byte `full_replace().to_json_string()`), written
    /// one command at a time: the JSON tree of a whole 10k-pod table is ~30 times its ~1 MB of text,
    /// this holds one command's tree besides the text.
    pub fn full_replace_text(&self) -> String {
        // Writing Values into a Vec cannot fail.
        let text = Document::new(Vec::new()).and_then(|mut doc| {
            let mut result = Ok(());
            self.each_full_replace_command(|c| {
                if result.is_ok() {
                    result = doc.command(&c);
                }
            });
            result.and_then(|()| doc.finish())
        });
        text.ok()
            .and_then(|t| String::from_utf8(t).ok())
            .unwrap_or_else(|| self.full_replace().to_json_string())
    }

    /// One transaction that puts the named chains and sets (maps too) of this ruleset back as they
    /// are here, whatever another process did to them (flushed, emptied, rules or elements added,
    /// removed or reordered, deleted): each is added if missing (an `add` of an existing object
    /// changes nothing but a base chain's policy), sets are flushed and refilled, then chains are
    /// flushed and refilled (their rules may name the sets). The rest of the table is not touched,
    /// so at 10k pods this costs what the touched objects hold, not the ~0.3 s of a full replace.
    /// `None` when a name is not of this ruleset (a foreign object: only a full replace removes it).
    pub fn repair(&self, chains: &BTreeSet<String>, sets: &BTreeSet<String>) -> Option<Batch> {
        let chains: Vec<&Chain> = chains
            .iter()
            .map(|n| self.chains.get(n))
            .collect::<Option<_>>()?;
        let sets: Vec<&Set> = sets
            .iter()
            .map(|n| self.sets.get(n))
            .collect::<Option<_>>()?;
        let mut cmds: Vec<Command> = Vec::new();
        // The same steps as nfnetlink messages (`Batch::netlink`): an `add` without NLM_F_EXCL
        // of what exists changes nothing, as nft's does; elements and rules name sets by name
        // first, so an existing set is found.
        let mut nl = super::netlink::Transaction::new();
        for c in &chains {
            cmds.push(cmd("add", chain_obj(c, true)).into());
            nl.add_chain(c);
        }
        for s in &sets {
            cmds.push(cmd("add", set_obj(s, None)).into());
            cmds.push(cmd("flush", set_ref(s)).into());
            if !s.elements.is_empty() {
                cmds.push(Command::elements(true, s, &s.elements));
            }
            nl.add_set(s);
            nl.refill_set(s, true);
        }
        // Counters the rules name, in case they went with the rules (an `add` of an existing one
        // keeps its values).
        let counters: BTreeSet<&String> = chains
            .iter()
            .flat_map(|c| &c.rules)
            .flat_map(|r| &r.stmts)
            .filter_map(|s| match s {
                Stmt::CounterNamed(n) => Some(n),
                _ => None,
            })
            .collect();
        for n in counters {
            cmds.push(cmd("add", counter_obj(n)).into());
            nl.add_counter(n);
        }
        for c in &chains {
            cmds.push(cmd("flush", chain_obj(c, false)).into());
            nl.flush_chain(&c.name);
            for r in &c.rules {
                cmds.push(cmd("add", rule_obj(&c.name, r)).into());
                nl.add_rule(&c.name, r);
            }
        }
        let mut b = Batch::from_commands(cmds);
        b.netlink = nl.finish().ok().flatten();
        Some(b)
    }

    /// The whole ruleset as nft JSON (the same document as [`Ruleset::full_replace`]).
    pub fn to_json(&self) -> Value {
        self.full_replace().json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::diff;

    fn set(name: &str, key: SetKey, interval: bool, elements: &[Elem]) -> Set {
        Set {
            name: name.into(),
            key,
            interval,
            verdict_map: false,
            comment: String::new(),
            elements: elements.iter().cloned().collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(sets: Vec<Set>) -> Ruleset {
        let mut rs = Ruleset::default();
        for s in sets {
            rs.add_set(s);
        }
        rs
    }

    #[test]
    fn a_batch_of_peer_addresses_coming_and_going_is_address_element_changes_in_order() {
        let a = Elem::Addr(ip("10.0.0.1"));
        let b = Elem::Addr(ip("10.0.0.2"));
        let c = Elem::Addr(ip("fd00::3"));
        let last = table(vec![
            set("peer_v4", SetKey::Ipv4, false, std::slice::from_ref(&a)),
            set("peer_v6", SetKey::Ipv6, false, &[]),
        ]);
        let next = table(vec![
            set("peer_v4", SetKey::Ipv4, false, std::slice::from_ref(&b)),
            set("peer_v6", SetKey::Ipv6, false, std::slice::from_ref(&c)),
        ]);
        let batch = diff(&last, &next);
        let mut got = batch
            .address_element_changes(&next)
            .expect("element-only batch");
        got.sort_by(|x, y| (&x.set, &x.key, x.add).cmp(&(&y.set, &y.key, y.add)));
        assert_eq!(
            got,
            vec![
                ElementChange {
                    add: false,
                    set: "peer_v4".into(),
                    key: ElementKey::Addr(ip("10.0.0.1"))
                },
                ElementChange {
                    add: true,
                    set: "peer_v4".into(),
                    key: ElementKey::Addr(ip("10.0.0.2"))
                },
                ElementChange {
                    add: true,
                    set: "peer_v6".into(),
                    key: ElementKey::Addr(ip("fd00::3"))
                },
            ]
        );
    }

    #[test]
    fn a_new_pods_source_binding_and_self_pair_are_address_element_changes_too() {
        let last = table(vec![
            set("sources_v4", SetKey::IfnameIpv4, false, &[]),
            set("self_v6", SetKey::Ipv6Pair, false, &[]),
        ]);
        let next = table(vec![
            set(
                "sources_v4",
                SetKey::IfnameIpv4,
                false,
                &[Elem::iface_addr("palab12".into(), ip("10.0.0.1"))],
            ),
            set(
                "self_v6",
                SetKey::Ipv6Pair,
                false,
                &[Elem::addr_pair(ip("fd00::1"), ip("fd00::1"))],
            ),
        ]);
        let mut got = diff(&last, &next)
            .address_element_changes(&next)
            .expect("element-only batch");
        got.sort_by(|x, y| x.set.cmp(&y.set));
        let keys: Vec<ElementKey> = got.iter().map(|c| c.key.clone()).collect();
        assert_eq!(
            keys,
            vec![
                ElementKey::AddrPair(ip("fd00::1"), ip("fd00::1")),
                ElementKey::IfaceAddr("palab12".into(), ip("10.0.0.1")),
            ]
        );
        assert_eq!(
            got[0].key.addrs().collect::<Vec<_>>(),
            vec![ip("fd00::1"), ip("fd00::1")]
        );
    }

    #[test]
    fn anything_but_address_keyed_elements_goes_through_nft() {
        let one = Elem::Addr(ip("10.0.0.1"));
        // An interval set: its elements need interval ends, which only nft writes.
        let last = table(vec![set("cidr_v4", SetKey::Ipv4, true, &[])]);
        let next = table(vec![set(
            "cidr_v4",
            SetKey::Ipv4,
            true,
            &[Elem::range(ip("10.0.0.1"), ip("10.0.0.1"))],
        )]);
        assert_eq!(diff(&last, &next).address_element_changes(&next), None);
        // A set keyed by protocols and ports.
        let last = table(vec![set("ports_x", SetKey::ProtoPort, false, &[])]);
        let next = table(vec![set(
            "ports_x",
            SetKey::ProtoPort,
            false,
            &[Elem::ProtoPort(crate::model::Protocol::Tcp, 80, 80)],
        )]);
        assert_eq!(diff(&last, &next).address_element_changes(&next), None);
        // An interface name that is not a plain name of at most 15 bytes.
        for bad in ["pal x", "a23456789012345x"] {
            let last = table(vec![set("sources_v4", SetKey::IfnameIpv4, false, &[])]);
            let next = table(vec![set(
                "sources_v4",
                SetKey::IfnameIpv4,
                false,
                &[Elem::iface_addr(bad.into(), ip("10.0.0.1"))],
            )]);
            assert_eq!(
                diff(&last, &next).address_element_changes(&next),
                None,
                "{bad}"
            );
        }
        // A new set, not only its elements.
        let last = table(vec![]);
        let next = table(vec![set(
            "peer_v4",
            SetKey::Ipv4,
            false,
            std::slice::from_ref(&one),
        )]);
        assert_eq!(diff(&last, &next).address_element_changes(&next), None);
        // A set the ruleset does not know.
        let last = table(vec![set("peer_v4", SetKey::Ipv4, false, &[])]);
        let next = table(vec![set(
            "peer_v4",
            SetKey::Ipv4,
            false,
            std::slice::from_ref(&one),
        )]);
        assert_eq!(
            diff(&last, &next).address_element_changes(&Ruleset::default()),
            None
        );
        // More changes than one transaction of messages may carry.
        let many: Vec<Elem> = (0..=MAX_ELEMENT_CHANGES as u32)
            .map(|i| Elem::Addr(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))))
            .collect();
        let next = table(vec![set("peer_v4", SetKey::Ipv4, false, &many)]);
        assert_eq!(diff(&last, &next).address_element_changes(&next), None);
    }
}
