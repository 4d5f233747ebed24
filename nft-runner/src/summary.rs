//! What one table holds, summarised as the kernel dumps it over nfnetlink: counts of its chains,
//! rules, sets and elements, and a fingerprint that changes when anything in it changes except
//! what changes by itself (counter and quota values, element expirations, handles) and the
//! elements of sets another process owns (the CNI plugin's pending marks).
//!
//! Why not `nft -j list table`: at 100k pods and 10k policies the `nft` process that lists the
//! table for a summary reached ~240 MB of resident memory (its cache of the whole table, then the
//! JSON text) for ~0.8 s, in the agent's cgroup; a DaemonSet memory limit sized for the agent
//! would have it killed. Here each dump datagram (64 KiB) is hashed and dropped as it arrives: the
//! summary costs a receive buffer, the set names and the kernel's own dump work.
//!
//! The fingerprint compares a table with itself at another time, by the same code and kernel; it
//! is not stable across kernels (attributes a newer kernel adds change it) or builds.

use crate::dump::{self, Dumper, End};
use crate::error::Result;
use netlink_packet_core::{DefaultNla, NlasIterator};
use netlink_packet_netfilter::nftables::{
    ChainMessage, NfTablesMessage, RuleAttribute, RuleMessage, SetAttribute, SetElementList,
    SetElementMessage, SetMessage, TableMessage,
};
use std::hash::{DefaultHasher, Hasher};

/// What a summary found in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableSummary {
    /// Hash of the table, its chains, rules, sets, objects and elements, without handles, counter
    /// and quota values, element expirations and the unhashed sets' elements.
    pub fingerprint: u64,
    pub chains: u64,
    pub rules: u64,
    /// Named sets and maps.
    pub sets: u64,
    /// Elements of all sets and maps, the unhashed sets' included (an interval counts once).
    pub elements: u64,
    /// Elements of the unhashed sets.
    pub pending: u64,
}

/// Listings started again when the ruleset changed while one was read (a commit every ~20 ms
/// leaves a 60 ms listing about one chance in twenty per try).
const ATTEMPTS: usize = 8;

/// `NFT_MSG_NEW*` message types as the kernel answers dumps (low byte of the netlink type).
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_NEWOBJ: u8 = 18;

/// Attribute 1 of every nf_tables object message is its table's name (a table's own name too);
/// 2 is a set's or object's name.
const ATTR_TABLE: u16 = 1;
const ATTR_NAME: u16 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
/// `NFT_SET_ELEM_INTERVAL_END`: the closing element of an interval.
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// `NFT_OBJECT_COUNTER`, `NFT_OBJECT_QUOTA`: objects whose data counts traffic.
const STATEFUL_OBJECTS: [u32; 2] = [1, 2];
/// Expressions whose data counts traffic or remembers when it last saw a packet.
const STATEFUL_EXPRESSIONS: [&[u8]; 3] = [b"counter", b"quota", b"last"];

/// Attributes left out of the fingerprint, by message: handles and positions (renumbered by a
/// replace that changes nothing), padding, a chain's packet counters, an element's expiration
/// (it counts down), and what newer kernels (6.18 here) add to a set: its backend's identity and
/// its element count (attributes 19 and 20, after `NFTA_SET_EXPRESSIONS`; the count of an
/// unhashed set changes with its elements, and the elements are hashed themselves).
const SKIP_TABLE: &[u16] = &[4, 5]; // HANDLE, PAD
const SKIP_CHAIN: &[u16] = &[2, 8, 9]; // HANDLE, COUNTERS, PAD
const SKIP_RULE: &[u16] = &[3, 6, 8]; // HANDLE, POSITION, PAD
const SKIP_SET: &[u16] = &[14, 16, 19, 20]; // PAD, HANDLE, backend, count
const SKIP_OBJECT: &[u16] = &[6, 7]; // HANDLE, PAD
const SKIP_ELEMENT: &[u16] = &[5, 8]; // EXPIRATION, PAD

/// Summarises `table FAMILY TABLE` (see [`TableSummary`]); the elements of `unhashed_sets` are
/// counted, not hashed. `None` when the table does not exist. The listing is consistent: the
/// ruleset generation is read before and after it, and a listing a commit came between is read
/// again (up to eight times; then [`Error::Unsettled`](crate::Error::Unsettled)).
pub fn table(family: &str, table: &str, unhashed_sets: &[&str]) -> Result<Option<TableSummary>> {
    let mut reader = Reader {
        dumper: Dumper::open("summarize table", family, table, unhashed_sets)?,
        table,
        unhashed: unhashed_sets,
    };
    for _ in 0..ATTEMPTS {
        let before = reader.dumper.generation()?;
        let read = reader.read()?;
        if reader.dumper.generation()? != before {
            continue;
        }
        match read {
            Read::Complete(summary) => return Ok(Some(summary)),
            Read::Absent => return Ok(None),
            Read::Interrupted => continue,
        }
    }
    Err(reader.dumper.unsettled(ATTEMPTS))
}

/// Whether `table FAMILY TABLE` exists: one dump of the family's tables (names and flags only,
/// nothing of their contents).
pub fn exists(family: &str, table: &str) -> Result<bool> {
    let mut dumper = Dumper::open("look for table", family, table, &[])?;
    let mut found = false;
    dumper.dump(
        NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
        |ty, payload| {
            if (ty & 0xff) as u8 == NFT_MSG_NEWTABLE
                && string_attr(attributes(payload)?, ATTR_TABLE)? == Some(table.as_bytes())
            {
                found = true;
            }
            Ok(())
        },
    )?;
    Ok(found)
}

/// What one listing found.
enum Read {
    Complete(TableSummary),
    Absent,
    Interrupted,
}

struct Reader<'a> {
    dumper: Dumper<'a>,
    table: &'a str,
    unhashed: &'a [&'a str],
}

impl Reader<'_> {
    /// One listing: the table, its chains, rules, sets and objects, then each set's elements.
    fn read(&mut self) -> Result<Read> {
        let mut s = Summing::default();
        let table = self.table.to_string();
        let dumps = [
            NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
            NfTablesMessage::GetChain(ChainMessage { attributes: vec![] }),
            NfTablesMessage::GetRule(RuleMessage {
                attributes: vec![RuleAttribute::Table(table.clone())],
            }),
            NfTablesMessage::GetSet(SetMessage {
                attributes: vec![SetAttribute::Table(table.clone())],
            }),
            NfTablesMessage::GetObject(vec![DefaultNla::new(NFTA_OBJ_TABLE, dump::nul(&table))]),
        ];
        let mut sets = Vec::new();
        for request in dumps {
            let table = self.table.as_bytes();
            let end = self.dumper.dump(request, |ty, payload| {
                s.object(table, ty, payload, &mut sets)
            })?;
            match end {
                End::Complete => {}
                End::Interrupted => return Ok(Read::Interrupted),
                End::Absent => return Ok(Read::Absent),
            }
            if !s.table_seen {
                // Tables come first: without ours there is nothing else to list.
                return Ok(Read::Absent);
            }
        }
        for set in sets {
            let unhashed = self.unhashed.iter().any(|u| u.as_bytes() == &set[..]);
            let name = String::from_utf8_lossy(&set).into_owned();
            let request = NfTablesMessage::GetSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.clone()),
                    SetElementList::Set(name),
                ],
            });
            let mut elements = Elements::default();
            let end = self.dumper.dump(request, |ty, payload| {
                elements.message(ty, payload, unhashed)
            })?;
            match end {
                End::Complete => s.elements(&set, &elements, unhashed),
                // A set gone since the set dump: the generation moved; the caller reads again.
                End::Interrupted | End::Absent => return Ok(Read::Interrupted),
            }
        }
        Ok(Read::Complete(s.finish()))
    }
}

/// A summary being made.
#[derive(Default)]
struct Summing {
    summary: TableSummary,
    hash: DefaultHasher,
    table_seen: bool,
}

impl Summing {
    /// Counts and hashes one message of the table, chain, rule, set or object dumps, if it belongs
    /// to `table`; a set's name goes to `sets`.
    fn object(
        &mut self,
        table: &[u8],
        ty: u16,
        payload: &[u8],
        sets: &mut Vec<Vec<u8>>,
    ) -> std::result::Result<(), String> {
        let attrs = attributes(payload)?;
        let kind = (ty & 0xff) as u8;
        if string_attr(attrs, ATTR_TABLE)? != Some(table) {
            return Ok(());
        }
        let skip = match kind {
            NFT_MSG_NEWTABLE => {
                self.table_seen = true;
                SKIP_TABLE
            }
            NFT_MSG_NEWCHAIN => {
                self.summary.chains += 1;
                SKIP_CHAIN
            }
            NFT_MSG_NEWRULE => {
                self.summary.rules += 1;
                SKIP_RULE
            }
            NFT_MSG_NEWSET => {
                self.summary.sets += 1;
                let name = string_attr(attrs, ATTR_NAME)?.ok_or("a set without a name")?;
                sets.push(name.to_vec());
                SKIP_SET
            }
            NFT_MSG_NEWOBJ => SKIP_OBJECT,
            _ => return Ok(()),
        };
        self.hash.write_u8(kind);
        hash_attributes(&mut self.hash, kind, attrs, skip)?;
        self.hash.write_u8(b'\n');
        Ok(())
    }

    /// Adds one set's elements: counted, and their combined hash unless the set is unhashed.
    fn elements(&mut self, set: &[u8], e: &Elements, unhashed: bool) {
        self.summary.elements += e.count;
        if unhashed {
            self.summary.pending += e.count;
            return;
        }
        self.hash.write_u8(NFT_MSG_NEWSETELEM);
        self.hash.write(set);
        self.hash.write_u64(e.count);
        self.hash.write_u64(e.sum);
        self.hash.write_u8(b'\n');
    }

    fn finish(mut self) -> TableSummary {
        self.summary.fingerprint = self.hash.finish();
        self.summary
    }
}

/// One set's elements as they are dumped: counted, and hashed one by one into a sum (the kernel
/// dumps a hash set in bucket order, which a resize reshuffles: the sum does not depend on it).
#[derive(Default)]
struct Elements {
    count: u64,
    sum: u64,
}

impl Elements {
    fn message(
        &mut self,
        ty: u16,
        payload: &[u8],
        unhashed: bool,
    ) -> std::result::Result<(), String> {
        if (ty & 0xff) as u8 != NFT_MSG_NEWSETELEM {
            return Ok(());
        }
        for list in NlasIterator::new(attributes(payload)?) {
            let list = list.map_err(|e| e.to_string())?;
            if list.kind() != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for elem in NlasIterator::new(list.value()) {
                let elem = elem.map_err(|e| e.to_string())?;
                let attrs = elem.value();
                if !is_interval_end(attrs)? {
                    self.count += 1;
                }
                if !unhashed {
                    let mut h = DefaultHasher::new();
                    hash_attributes(&mut h, NFT_MSG_NEWSETELEM, attrs, SKIP_ELEMENT)?;
                    self.sum = self.sum.wrapping_add(h.finish());
                }
            }
        }
        Ok(())
    }
}

/// Whether an element's attributes mark it as the closing element of an interval.
fn is_interval_end(attrs: &[u8]) -> std::result::Result<bool, String> {
    for a in NlasIterator::new(attrs) {
        let a = a.map_err(|e| e.to_string())?;
        if a.kind() == NFTA_SET_ELEM_FLAGS {
            return Ok(be_u32(a.value()).is_some_and(|f| f & NFT_SET_ELEM_INTERVAL_END != 0));
        }
    }
    Ok(false)
}

/// Hashes the attributes of a message of `kind`, leaving out `skip`; rule expressions and an
/// element's expressions without their traffic counts, an object's data when it counts traffic.
fn hash_attributes(
    h: &mut DefaultHasher,
    kind: u8,
    attrs: &[u8],
    skip: &[u16],
) -> std::result::Result<(), String> {
    let stateful_object = kind == NFT_MSG_NEWOBJ && {
        let ty = NlasIterator::new(attrs)
            .filter_map(|a| a.ok())
            .find(|a| a.kind() == NFTA_OBJ_TYPE)
            .and_then(|a| be_u32(a.value()));
        ty.is_some_and(|t| STATEFUL_OBJECTS.contains(&t))
    };
    for a in NlasIterator::new(attrs) {
        let a = a.map_err(|e| e.to_string())?;
        let k = a.kind();
        if skip.contains(&k) {
            continue;
        }
        h.write_u16(k);
        match (kind, k) {
            (NFT_MSG_NEWRULE, NFTA_RULE_EXPRESSIONS)
            | (NFT_MSG_NEWSETELEM, NFTA_SET_ELEM_EXPRESSIONS) => hash_expressions(h, a.value())?,
            (NFT_MSG_NEWSETELEM, NFTA_SET_ELEM_EXPR) => hash_expression(h, a.value())?,
            (NFT_MSG_NEWOBJ, NFTA_OBJ_DATA) if stateful_object => {}
            _ => {
                h.write_usize(a.value().len());
                h.write(a.value());
            }
        }
    }
    Ok(())
}

/// Hashes a list of expressions (`NFTA_LIST_ELEM`s), each without its traffic counts.
fn hash_expressions(h: &mut DefaultHasher, list: &[u8]) -> std::result::Result<(), String> {
    for e in NlasIterator::new(list) {
        let e = e.map_err(|e| e.to_string())?;
        h.write_u16(e.kind());
        hash_expression(h, e.value())?;
    }
    Ok(())
}

/// Hashes one expression: its name, and its data unless it is a counter, a quota or `last`.
fn hash_expression(h: &mut DefaultHasher, attrs: &[u8]) -> std::result::Result<(), String> {
    let name = string_attr(attrs, NFTA_EXPR_NAME)?.unwrap_or_default();
    let stateful = STATEFUL_EXPRESSIONS.contains(&name);
    for a in NlasIterator::new(attrs) {
        let a = a.map_err(|e| e.to_string())?;
        if a.kind() == NFTA_EXPR_DATA && stateful {
            continue;
        }
        h.write_u16(a.kind());
        h.write_usize(a.value().len());
        h.write(a.value());
    }
    Ok(())
}

/// The attributes of an nf_tables message: what follows its nfgenmsg.
fn attributes(payload: &[u8]) -> std::result::Result<&[u8], String> {
    payload
        .get(4..)
        .ok_or_else(|| "a message shorter than its nfgenmsg".to_string())
}

/// The value of string attribute `kind`, without its NUL; `None` when absent.
fn string_attr(attrs: &[u8], kind: u16) -> std::result::Result<Option<&[u8]>, String> {
    for a in NlasIterator::new(attrs) {
        let a = a.map_err(|e| e.to_string())?;
        if a.kind() == kind {
            let len = a.value_length();
            let v = a.into_inner().get(4..4 + len).unwrap_or_default();
            return Ok(Some(v.strip_suffix(&[0]).unwrap_or(v)));
        }
    }
    Ok(None)
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute as the kernel lays it out: length, type, value, padding to 4 bytes.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        v.extend(kind.to_ne_bytes());
        v.extend(value);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    /// A rule of table `t` whose one expression is `name` with `data`, handle `handle`.
    fn rule(handle: u64, name: &str, data: &[u8]) -> Vec<u8> {
        let expr = [
            nla(NFTA_EXPR_NAME, &dump::nul(name)),
            nla(NFTA_EXPR_DATA, data),
        ]
        .concat();
        let exprs = nla(1, &expr);
        let mut payload = vec![1, 0, 0, 0];
        payload.extend(nla(ATTR_TABLE, b"t\0"));
        payload.extend(nla(2, b"c\0"));
        payload.extend(nla(3, &handle.to_be_bytes()));
        payload.extend(nla(NFTA_RULE_EXPRESSIONS, &exprs));
        payload
    }

    fn fingerprint(payload: &[u8]) -> u64 {
        let mut s = Summing::default();
        let ty = u16::from(NFT_MSG_NEWRULE);
        s.object(b"t", ty, payload, &mut Vec::new()).unwrap();
        assert_eq!(s.summary.rules, 1);
        s.finish().fingerprint
    }

    #[test]
    fn a_rule_hashes_without_its_handle_and_counter_values_but_with_other_data() {
        let base = fingerprint(&rule(1, "counter", &[1, 2, 3, 4]));
        assert_eq!(base, fingerprint(&rule(9, "counter", &[5, 6, 7, 8])));
        let cmp = fingerprint(&rule(1, "cmp", &[1, 2, 3, 4]));
        assert_ne!(cmp, fingerprint(&rule(1, "cmp", &[1, 2, 3, 5])));
        assert_ne!(base, cmp);
    }

    #[test]
    fn another_tables_objects_are_not_counted() {
        let mut s = Summing::default();
        let other = rule(1, "cmp", &[0; 4]);
        s.object(b"u", u16::from(NFT_MSG_NEWRULE), &other, &mut Vec::new())
            .unwrap();
        assert_eq!(s.summary, TableSummary::default());
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let mut s = Summing::default();
        let whole = rule(1, "cmp", &[0; 4]);
        for cut in [0, 3, 5, 9, whole.len() - 2] {
            let r = s.object(
                b"t",
                u16::from(NFT_MSG_NEWRULE),
                &whole[..cut],
                &mut Vec::new(),
            );
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut e = Elements::default();
        assert!(e
            .message(u16::from(NFT_MSG_NEWSETELEM), &[1, 0], false)
            .is_err());
        let list = nla(
            NFTA_SET_ELEM_LIST_ELEMENTS,
            &nla(1, &nla(1, &[10, 0, 0, 1])),
        );
        let payload = [vec![1, 0, 0, 0], list].concat();
        assert!(e
            .message(
                u16::from(NFT_MSG_NEWSETELEM),
                &payload[..payload.len() - 2],
                false
            )
            .is_err());
        e.message(u16::from(NFT_MSG_NEWSETELEM), &payload, false)
            .unwrap();
        assert_eq!(e.count, 1);
    }
}
