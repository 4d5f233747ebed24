//! One conntrack entry as the kernel sent it, read in place.
//!
//! A full sweep reads every entry of the node's conntrack table and needs five facts of each
//! (original source, reply source and port, protocol, ICMPv6 type, TCP state) to judge it; most
//! are then left alone. netlink-packet-netfilter's `ConntrackAttribute` parse turns every
//! attribute of every entry into owned values (a `Vec` per tuple, per tuple half, per protocol
//! info, a byte `Vec` per counter, timestamp and id): measured, it was a quarter of a sweep's time
//! (`what_a_full_sweep_spends`: 1.2 µs of 4.3 an entry). [`Entry`] walks the attributes with the
//! crate's borrowing [`NlasIterator`] instead and reads only those facts; the crate still parses
//! (and emits) the few attributes a request names an entry by ([`Entry::attributes`]), for the
//! entries a sweep keeps or deletes.

use netlink_packet_core::{NlaBuffer, NlasIterator, Parseable, NLA_HEADER_SIZE};
use netlink_packet_netfilter::conntrack::ConntrackAttribute;
use netlink_packet_netfilter::NetfilterProtoFamily;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `CTA_*` attributes of an entry (`linux/netfilter/nfnetlink_conntrack.h`).
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_PROTOINFO: u16 = 4;
/// The entry's id; a delete carrying it removes exactly the entry judged.
pub const CTA_ID: u16 = 12;
/// The entry's conntrack zone (u16); a delete must name it.
pub const CTA_ZONE: u16 = 18;

/// Inside a tuple: its IP half and its protocol half.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
/// Inside the IP half.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
/// Inside the protocol half.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
pub(super) const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
/// Inside the protocol info: TCP's, and in it the connection's state.
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// The attributes of one conntrack entry (what follows its netfilter header), borrowed from the
/// buffer the kernel's answer was read into.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub family: NetfilterProtoFamily,
    orig: Option<&'a [u8]>,
    reply: Option<&'a [u8]>,
    protoinfo: Option<&'a [u8]>,
    /// Every attribute's whole bytes (header included), for [`Entry::attributes`].
    all: &'a [u8],
}

/// One half of a tuple, read in place.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TupleFacts {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// `CTA_PROTO_NUM`: the IP protocol number.
    pub proto: Option<u8>,
    pub src_port: Option<u16>,
    pub icmpv6_type: Option<u8>,
}

impl<'a> Entry<'a> {
    /// Reads the attributes `attrs` (those of a conntrack message after its netfilter header). A
    /// malformed attribute ends the walk: what came before it is kept, what it should have said
    /// is missing (the entry is then not judged, see `seen`).
    pub fn new(family: NetfilterProtoFamily, attrs: &'a [u8]) -> Self {
        let mut e = Entry {
            family,
            orig: None,
            reply: None,
            protoinfo: None,
            all: attrs,
        };
        for nla in NlasIterator::new(attrs) {
            let Ok(nla) = nla else { break };
            let kind = nla.kind();
            let value = value_of(nla);
            match kind {
                CTA_TUPLE_ORIG => e.orig = Some(value),
                CTA_TUPLE_REPLY => e.reply = Some(value),
                CTA_PROTOINFO => e.protoinfo = Some(value),
                _ => {}
            }
        }
        e
    }

    /// The original direction's tuple (what the first packet carried before any NAT).
    pub fn orig(&self) -> TupleFacts {
        self.orig.map(tuple_facts).unwrap_or_default()
    }

    /// The reply direction's tuple (what an answer carries: after DNAT and SNAT).
    pub fn reply(&self) -> TupleFacts {
        self.reply.map(tuple_facts).unwrap_or_default()
    }

    /// The TCP connection's conntrack state (`TCP_CONNTRACK_*`), for a TCP entry.
    pub fn tcp_state(&self) -> Option<u8> {
        let tcp = nested(self.protoinfo?, CTA_PROTOINFO_TCP)?;
        let state = nested(tcp, CTA_PROTOINFO_TCP_STATE)?;
        (state.len() == 1).then(|| state[0])
    }

    /// Its attributes' bytes (the benchmark parses them the crate's way).
    #[cfg(test)]
    pub fn bytes(&self) -> &'a [u8] {
        self.all
    }

    /// The entry's attributes of the kinds `kinds`, parsed (and so emitted again) by the crate:
    /// what a GET or DELETE names this entry by.
    pub fn attributes(&self, kinds: &[u16]) -> Vec<ConntrackAttribute> {
        NlasIterator::new(self.all)
            .map_while(Result::ok)
            .filter(|nla| kinds.contains(&nla.kind()))
            .filter_map(|nla| ConntrackAttribute::parse(&nla).ok())
            .collect()
    }
}

impl Entry<'_> {
    /// The whole bytes (headers included) of its attributes of the kinds `kinds`: a compact copy
    /// that [`Entry::new`] reads again (what a sweep remembers a flow by).
    pub fn copy_of(&self, kinds: &[u16]) -> Box<[u8]> {
        let mut out = Vec::new();
        for nla in NlasIterator::new(self.all).map_while(Result::ok) {
            if kinds.contains(&nla.kind()) {
                let len = usize::from(nla.length());
                let bytes = nla.into_inner();
                // The iterator checked `len` against the buffer; the padding to 4 may be cut off
                // at its end.
                let padded = bytes
                    .get(..(len + 3) & !3)
                    .or_else(|| bytes.get(..len))
                    .unwrap_or_default();
                out.extend_from_slice(padded);
                out.resize((out.len() + 3) & !3, 0);
            }
        }
        out.into_boxed_slice()
    }
}

/// The value of the first attribute of `kind` among `attrs`.
fn nested(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    NlasIterator::new(attrs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == kind)
        .map(value_of)
}

/// An attribute's value, borrowed from the buffer it was read from (`NlaBuffer::value` borrows
/// the `NlaBuffer`). The iterator checked its length against that buffer.
fn value_of(nla: NlaBuffer<&[u8]>) -> &[u8] {
    let len = usize::from(nla.length());
    let bytes = nla.into_inner();
    bytes.get(NLA_HEADER_SIZE..len).unwrap_or_default()
}

fn tuple_facts(tuple: &[u8]) -> TupleFacts {
    let mut t = TupleFacts::default();
    for half in NlasIterator::new(tuple).map_while(Result::ok) {
        let kind = half.kind();
        let value = value_of(half);
        match kind {
            CTA_TUPLE_IP => {
                for a in NlasIterator::new(value).map_while(Result::ok) {
                    let v = a.value();
                    let ip = match (a.kind(), v.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => {
                            IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))
                        }
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            let mut b = [0u8; 16];
                            b.copy_from_slice(v);
                            IpAddr::V6(Ipv6Addr::from(b))
                        }
                        _ => continue,
                    };
                    match a.kind() {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => t.src = t.src.or(Some(ip)),
                        _ => t.dst = t.dst.or(Some(ip)),
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in NlasIterator::new(value).map_while(Result::ok) {
                    let v = a.value();
                    match (a.kind(), v.len()) {
                        (CTA_PROTO_NUM, 1) => t.proto = t.proto.or(Some(v[0])),
                        (CTA_PROTO_SRC_PORT, 2) => {
                            t.src_port = t.src_port.or(Some(u16::from_be_bytes([v[0], v[1]])))
                        }
                        (CTA_PROTO_ICMPV6_TYPE, 1) => t.icmpv6_type = t.icmpv6_type.or(Some(v[0])),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}
