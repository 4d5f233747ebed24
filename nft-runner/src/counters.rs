//! The packet counts of a table's named counters, read over nfnetlink (`NFT_MSG_GETOBJ` dump,
//! counters of one table only).
//!
//! Why not `nft -j list counters table ...`: nft 1.0.6 fills its cache with the whole table first,
//! every set with every element, to list a few counters. At 100k pods and 10k policies (185k set
//! elements) one such listing took the agent's resident memory from 163 to 296 MiB for the length
//! of a `/metrics` scrape; the dump holds only the counters (~100 bytes each on the wire).

use crate::dump;
use crate::error::Result;
use netlink_packet_core::{DefaultNla, NlasIterator};
use netlink_packet_netfilter::nftables::NfTablesMessage;
use std::collections::HashMap;

/// `NFTA_OBJ_*` (linux/netfilter/nf_tables.h).
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
/// `NFT_OBJECT_COUNTER`.
const NFT_OBJECT_COUNTER: u32 = 1;
/// `NFTA_COUNTER_PACKETS`.
const NFTA_COUNTER_PACKETS: u16 = 2;
/// Dumps interrupted by a commit are started again this many times before giving up.
const ATTEMPTS: usize = 5;

/// Reads one table's named counters over a socket it keeps. Closing an nfnetlink socket makes the
/// kernel flush nf_tables' pending destroy work under its commit mutex before it returns: right
/// after a large deletion (our table flushed or deleted behind our back: ~1k chains, ~3k rules at
/// 10k pods) that close took 7-16 ms, which a restore paid before its commit. A reader read at every
/// full replace and every scrape keeps its socket instead; after an error it opens a new one (the
/// old one may hold the rest of a broken dump).
pub struct CounterReader {
    family: &'static str,
    table: &'static str,
    dumper: Option<dump::Dumper<'static>>,
}

impl CounterReader {
    /// No socket yet: the first read opens it.
    pub fn new(family: &'static str, table: &'static str) -> Self {
        CounterReader {
            family,
            table,
            dumper: None,
        }
    }

    /// Packets counted by each named counter of the table, by name; empty when the table does
    /// not exist (or has no counter). Over the kept socket.
    pub fn packets(&mut self) -> Result<HashMap<String, u64>> {
        let mut dumper = match self.dumper.take() {
            Some(d) => d,
            None => dump::Dumper::open("list counters", self.family, self.table, &[])?,
        };
        let read = read(&mut dumper, self.table);
        if read.is_ok() {
            self.dumper = Some(dumper);
        }
        read
    }
}

fn read(dumper: &mut dump::Dumper<'_>, table: &str) -> Result<HashMap<String, u64>> {
    let request = NfTablesMessage::GetObject(vec![
        DefaultNla::new(NFTA_OBJ_TABLE, dump::nul(table)),
        DefaultNla::new(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER.to_be_bytes().to_vec()),
    ]);
    for _ in 0..ATTEMPTS {
        let mut counts = HashMap::new();
        let end = dumper.dump(request.clone(), |_, payload| {
            if let Some((name, packets)) = counter_of(payload)? {
                counts.insert(name, packets);
            }
            Ok(())
        })?;
        match end {
            dump::End::Complete => return Ok(counts),
            // The dump of a table that does not exist is empty; should a kernel answer ENOENT
            // instead, that means the same: no counters.
            dump::End::Absent => return Ok(HashMap::new()),
            dump::End::Interrupted => continue,
        }
    }
    Err(dumper.unsettled(ATTEMPTS))
}

/// Name and packets of one `NFT_MSG_NEWOBJ` payload (nfgenmsg, then attributes); `None` for a
/// message that is not a counter.
fn counter_of(payload: &[u8]) -> std::result::Result<Option<(String, u64)>, String> {
    let Some(attrs) = payload.get(4..) else {
        return Err("a message shorter than its nfgenmsg".into());
    };
    let (mut name, mut packets) = (None, None);
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| e.to_string())?;
        match nla.kind() {
            NFTA_OBJ_NAME => {
                let v = nla.value();
                let v = v.strip_suffix(&[0]).unwrap_or(v);
                name = Some(String::from_utf8_lossy(v).into_owned());
            }
            NFTA_OBJ_DATA => {
                for inner in NlasIterator::new(nla.value()) {
                    let inner = inner.map_err(|e| e.to_string())?;
                    if inner.kind() == NFTA_COUNTER_PACKETS {
                        let bytes: [u8; 8] = inner
                            .value()
                            .try_into()
                            .map_err(|_| "a counter's packets are not 8 bytes".to_string())?;
                        packets = Some(u64::from_be_bytes(bytes));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(name.zip(packets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use netlink_packet_core::{Emitable, NLMSG_DONE};

    /// A NEWOBJ message as the kernel sends it for counter `name` with `packets`.
    fn newobj(name: &str, packets: u64, flags: u16) -> Vec<u8> {
        let mut nested = vec![0u8; 0];
        for a in [
            DefaultNla::new(1, 99u64.to_be_bytes().to_vec()), // bytes
            DefaultNla::new(NFTA_COUNTER_PACKETS, packets.to_be_bytes().to_vec()),
        ] {
            let mut b = vec![0u8; a.buffer_len()];
            a.emit(&mut b);
            nested.extend(b);
        }
        let mut zname = name.as_bytes().to_vec();
        zname.push(0);
        let attrs = [
            DefaultNla::new(NFTA_OBJ_TABLE, b"palisade\0".to_vec()),
            DefaultNla::new(NFTA_OBJ_NAME, zname),
            DefaultNla::new(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_OBJ_DATA | 0x8000, nested),
        ];
        let mut payload = vec![1u8, 0, 0, 0]; // nfgenmsg: inet, v0, res 0
        for a in attrs {
            let mut b = vec![0u8; a.buffer_len()];
            a.emit(&mut b);
            payload.extend(b);
        }
        let len = 16 + payload.len();
        let mut msg = Vec::new();
        msg.extend((len as u32).to_ne_bytes());
        msg.extend(((10u16 << 8) | 18).to_ne_bytes()); // NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWOBJ
        msg.extend(flags.to_ne_bytes());
        msg.extend(1u32.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(payload);
        msg
    }

    fn done() -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend(20u32.to_ne_bytes());
        msg.extend(NLMSG_DONE.to_ne_bytes());
        msg.extend(0u16.to_ne_bytes());
        msg.extend(1u32.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(0i32.to_ne_bytes());
        msg
    }

    /// What one datagram of a counter dump yields: the counters, whether it was interrupted, and
    /// where the dump is.
    fn read(data: &[u8]) -> std::result::Result<(HashMap<String, u64>, bool, dump::Step), String> {
        let (mut counts, mut intr) = (HashMap::new(), false);
        let step = dump::step(data, &mut intr, &mut |_, payload: &[u8]| {
            if let Some((name, packets)) = counter_of(payload)? {
                counts.insert(name, packets);
            }
            Ok(())
        })?;
        Ok((counts, intr, step))
    }

    #[test]
    fn a_dump_datagram_yields_each_counters_packets_and_its_end() {
        let mut data = newobj("cnt_a", 7, 0x2);
        data.extend(newobj("cnt_b", 0, 0x2));
        data.extend(done());
        let (counts, intr, step) = read(&data).unwrap();
        assert_eq!(step, dump::Step::Done);
        assert!(!intr);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts["cnt_a"], 7);
        assert_eq!(counts["cnt_b"], 0);
    }

    #[test]
    fn a_dump_the_ruleset_changed_under_is_marked_interrupted() {
        let mut data = newobj("cnt_a", 7, 0x2 | dump::NLM_F_DUMP_INTR);
        data.extend(done());
        let (_, intr, step) = read(&data).unwrap();
        assert!(intr);
        assert_eq!(step, dump::Step::Done);
    }

    #[test]
    fn a_truncated_message_is_a_protocol_error_not_a_panic() {
        let data = newobj("cnt_a", 7, 0x2);
        assert!(read(&data[..data.len() - 3]).is_err());
        assert!(counter_of(&[1, 0]).is_err());
    }

    #[test]
    fn names_that_are_not_identifiers_never_reach_the_kernel() {
        assert!(matches!(
            CounterReader::new("inet", "pal isade").packets(),
            Err(Error::BadName { .. })
        ));
        assert!(CounterReader::new("bogus", "palisade").packets().is_err());
    }
}
