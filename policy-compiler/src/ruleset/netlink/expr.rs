//! A rule's statements as nf_tables expressions, the way `nft` lowers them (so that `nft list`
//! shows the rule exactly as if nft had written it): in table `inet`, the first match on an IPv4 or
//! IPv6 header field is preceded by `meta nfproto`, an ICMPv6 field by `meta nfproto` and `meta
//! l4proto` unless the rule already tested them; concatenations load their fields into consecutive
//! registers, each field padded to 4 bytes.

use super::nla::Writer;
use crate::model::Protocol;
use crate::ruleset::{AddrField, CtDir, Family, Stmt};
use std::collections::HashMap;

// linux/netfilter/nf_tables.h
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_00: u32 = 8;

const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;

const NFT_META_IIF: u32 = 4;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;

const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NFT_CT_STATE: u32 = 0;
const NFT_CT_STATUS: u32 = 2;
const NFT_CT_SRC_IP: u32 = 19;
const NFT_CT_SRC_IP6: u32 = 21;
/// `ct state` bits (host order in the register).
const CT_STATE_INVALID: u32 = 1;
const CT_STATE_ESTABLISHED: u32 = 2;
const CT_STATE_RELATED: u32 = 4;
const CT_STATE_NEW: u32 = 8;
/// `IPS_CONFIRMED`
const CT_STATUS_CONFIRMED: u32 = 1 << 3;

const NFTA_FIB_F_SADDR: u32 = 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;

const NFT_LOOKUP_F_INV: u32 = 1;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFT_LIMIT_PKTS: u32 = 0;

/// Verdict codes (`NF_DROP`, `NF_ACCEPT`, `NFT_JUMP`, `NFT_GOTO`, `NFT_RETURN`).
pub(super) const NF_DROP: u32 = 0;
pub(super) const NF_ACCEPT: u32 = 1;
pub(super) const NFT_JUMP: u32 = -3i32 as u32;
pub(super) const NFT_GOTO: u32 = -4i32 as u32;
const NFT_RETURN: u32 = -5i32 as u32;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_ND_FIRST: u8 = 133;
const ICMPV6_ND_LAST: u8 = 137;

/// The IANA number of a protocol.
pub(super) fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// What the rule has tested so far (nft's dependency tracking, as far as our statements need it).
#[derive(Default)]
struct Context {
    nfproto: Option<Family>,
    l4proto: Option<u8>,
}

/// A register at `word` 32-bit words into the concatenation: nft names the 16-byte registers
/// (`NFT_REG_1`..) where a field starts on one, the 4-byte ones (`NFT_REG32_00`..) elsewhere.
fn reg_at(word: u32) -> u32 {
    if word.is_multiple_of(4) {
        NFT_REG_1 + word / 4
    } else {
        NFT_REG32_00 + word
    }
}

/// Writes the expressions of one rule (`stmts`) into an open `NFTA_RULE_EXPRESSIONS` nest.
pub(super) fn lower(w: &mut Writer, stmts: &[Stmt], set_ids: &HashMap<String, u32>) {
    let mut cx = Context::default();
    for s in stmts {
        stmt(w, &mut cx, s, set_ids);
    }
}

fn expr(w: &mut Writer, name: &str, body: impl FnOnce(&mut Writer)) {
    let el = w.begin(NFTA_LIST_ELEM);
    w.strz(NFTA_EXPR_NAME, name);
    let data = w.begin(NFTA_EXPR_DATA);
    body(w);
    w.end(data);
    w.end(el);
}

fn data_value(w: &mut Writer, kind: u16, value: &[u8]) {
    let n = w.begin(kind);
    w.bytes(NFTA_DATA_VALUE, value);
    w.end(n);
}

fn meta(w: &mut Writer, key: u32, dreg: u32) {
    expr(w, "meta", |w| {
        w.u32(2, key); // NFTA_META_KEY
        w.u32(1, dreg); // NFTA_META_DREG
    });
}

fn payload(w: &mut Writer, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(w, "payload", |w| {
        w.u32(1, dreg); // NFTA_PAYLOAD_DREG
        w.u32(2, base); // NFTA_PAYLOAD_BASE
        w.u32(3, offset); // NFTA_PAYLOAD_OFFSET
        w.u32(4, len); // NFTA_PAYLOAD_LEN
    });
}

fn cmp(w: &mut Writer, op: u32, value: &[u8]) {
    expr(w, "cmp", |w| {
        w.u32(1, NFT_REG_1); // NFTA_CMP_SREG
        w.u32(2, op); // NFTA_CMP_OP
        data_value(w, 3, value); // NFTA_CMP_DATA
    });
}

fn bitwise(w: &mut Writer, mask: &[u8]) {
    expr(w, "bitwise", |w| {
        w.u32(1, NFT_REG_1); // NFTA_BITWISE_SREG
        w.u32(2, NFT_REG_1); // NFTA_BITWISE_DREG
        w.u32(3, mask.len() as u32); // NFTA_BITWISE_LEN
        data_value(w, 4, mask); // NFTA_BITWISE_MASK
        data_value(w, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
    });
}

/// A lookup in `set`, by name, and by id too when the set is created in the same transaction (as
/// nft does; the kernel finds it by name either way).
fn lookup(w: &mut Writer, set: &str, set_ids: &HashMap<String, u32>, invert: bool, verdict: bool) {
    let id = set_ids.get(set).copied();
    expr(w, "lookup", |w| {
        w.u32(2, NFT_REG_1); // NFTA_LOOKUP_SREG
        if verdict {
            w.u32(3, NFT_REG_VERDICT); // NFTA_LOOKUP_DREG
        }
        w.strz(1, set); // NFTA_LOOKUP_SET
        if let Some(id) = id {
            w.u32(4, id); // NFTA_LOOKUP_SET_ID
        }
        if invert {
            w.u32(5, NFT_LOOKUP_F_INV); // NFTA_LOOKUP_FLAGS
        }
    });
}

/// `ct <key>` & mask, compared with 0 (`op`: NEQ for "any of these bits", EQ for "none").
fn ct_bits(w: &mut Writer, key: u32, mask: u32, op: u32) {
    expr(w, "ct", |w| {
        w.u32(2, key); // NFTA_CT_KEY
        w.u32(1, NFT_REG_1); // NFTA_CT_DREG
    });
    bitwise(w, &mask.to_ne_bytes());
    cmp(w, op, &[0; 4]);
}

/// The ICMPv6 type into register 1, after the family and protocol checks the rule has not made yet.
fn load_icmpv6_type(w: &mut Writer, cx: &mut Context) {
    need_family(w, cx, Family::V6);
    if cx.l4proto != Some(IPPROTO_ICMPV6) {
        meta(w, NFT_META_L4PROTO, NFT_REG_1);
        cmp(w, NFT_CMP_EQ, &[IPPROTO_ICMPV6]);
        cx.l4proto = Some(IPPROTO_ICMPV6);
    }
    payload(w, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
}

fn fib_saddr_type(w: &mut Writer, op: u32) {
    expr(w, "fib", |w| {
        w.u32(3, NFTA_FIB_F_SADDR); // NFTA_FIB_FLAGS
        w.u32(2, NFT_FIB_RESULT_ADDRTYPE); // NFTA_FIB_RESULT
        w.u32(1, NFT_REG_1); // NFTA_FIB_DREG
    });
    cmp(w, op, &RTN_LOCAL.to_ne_bytes());
}

fn verdict(w: &mut Writer, code: u32, chain: Option<&str>) {
    expr(w, "immediate", |w| {
        w.u32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
        let data = w.begin(2); // NFTA_IMMEDIATE_DATA
        let v = w.begin(NFTA_DATA_VERDICT);
        w.u32(NFTA_VERDICT_CODE, code);
        if let Some(c) = chain {
            w.strz(NFTA_VERDICT_CHAIN, c);
        }
        w.end(v);
        w.end(data);
    });
}

/// `meta nfproto <family>` unless the rule tested it already.
fn need_family(w: &mut Writer, cx: &mut Context, f: Family) {
    if cx.nfproto != Some(f) {
        meta(w, NFT_META_NFPROTO, NFT_REG_1);
        cmp(
            w,
            NFT_CMP_EQ,
            &[match f {
                Family::V4 => NFPROTO_IPV4,
                Family::V6 => NFPROTO_IPV6,
            }],
        );
        cx.nfproto = Some(f);
    }
}

/// (offset, length) of an address field in the network header.
fn addr_field(f: Family, field: AddrField) -> (u32, u32) {
    match (f, field) {
        (Family::V4, AddrField::Saddr) => (12, 4),
        (Family::V4, AddrField::Daddr) => (16, 4),
        (Family::V6, AddrField::Saddr) => (8, 16),
        (Family::V6, AddrField::Daddr) => (24, 16),
    }
}

/// Loads an address field into the register at `word` words; returns the words it took.
fn load_addr(w: &mut Writer, f: Family, field: AddrField, word: u32) -> u32 {
    let (offset, len) = addr_field(f, field);
    payload(w, NFT_PAYLOAD_NETWORK_HEADER, offset, len, reg_at(word));
    len / 4
}

fn load_l4proto(w: &mut Writer, word: u32) -> u32 {
    meta(w, NFT_META_L4PROTO, reg_at(word));
    1
}

fn load_dport(w: &mut Writer, word: u32) -> u32 {
    payload(w, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg_at(word));
    1
}

fn stmt(w: &mut Writer, cx: &mut Context, s: &Stmt, set_ids: &HashMap<String, u32>) {
    match s {
        Stmt::CtEstablished => ct_bits(w, NFT_CT_STATE, CT_STATE_ESTABLISHED, NFT_CMP_NEQ),
        Stmt::CtRelated => ct_bits(w, NFT_CT_STATE, CT_STATE_RELATED, NFT_CMP_NEQ),
        Stmt::IifCtSaddrInSet { family, dir, set } => {
            meta(w, NFT_META_IIFNAME, reg_at(0));
            expr(w, "ct", |w| {
                w.u32(
                    2,
                    match family {
                        Family::V4 => NFT_CT_SRC_IP,
                        Family::V6 => NFT_CT_SRC_IP6,
                    },
                ); // NFTA_CT_KEY
                w.u32(1, reg_at(4)); // NFTA_CT_DREG
                w.bytes(
                    3,
                    &[match dir {
                        CtDir::Original => 0,
                        CtDir::Reply => 1,
                    }],
                ); // NFTA_CT_DIRECTION (u8)
            });
            lookup(w, set, set_ids, false, false);
        }
        Stmt::CtInvalid => ct_bits(w, NFT_CT_STATE, CT_STATE_INVALID, NFT_CMP_NEQ),
        Stmt::CtNew => ct_bits(w, NFT_CT_STATE, CT_STATE_NEW, NFT_CMP_NEQ),
        Stmt::CtNotConfirmed => ct_bits(w, NFT_CT_STATUS, CT_STATUS_CONFIRMED, NFT_CMP_EQ),
        Stmt::FibSaddrLocal => fib_saddr_type(w, NFT_CMP_EQ),
        Stmt::FibSaddrNotLocal => fib_saddr_type(w, NFT_CMP_NEQ),
        Stmt::Icmpv6NeighbourDiscovery => {
            load_icmpv6_type(w, cx);
            cmp(w, NFT_CMP_GTE, &[ICMPV6_ND_FIRST]);
            cmp(w, NFT_CMP_LTE, &[ICMPV6_ND_LAST]);
        }
        Stmt::NoInputInterface => {
            meta(w, NFT_META_IIF, NFT_REG_1);
            cmp(w, NFT_CMP_EQ, &[0; 4]);
        }
        Stmt::Ip6HopLimit255 => {
            need_family(w, cx, Family::V6);
            payload(w, NFT_PAYLOAD_NETWORK_HEADER, 7, 1, NFT_REG_1);
            cmp(w, NFT_CMP_EQ, &[255]);
        }
        Stmt::Icmpv6Type(t) => {
            load_icmpv6_type(w, cx);
            cmp(w, NFT_CMP_EQ, &[*t]);
        }
        Stmt::IifnamePrefix(prefix) => {
            meta(w, NFT_META_IIFNAME, NFT_REG_1);
            cmp(w, NFT_CMP_EQ, prefix.as_bytes());
        }
        Stmt::IifSaddrNotInSet { family, set } => {
            need_family(w, cx, *family);
            meta(w, NFT_META_IIFNAME, reg_at(0));
            load_addr(w, *family, AddrField::Saddr, 4);
            lookup(w, set, set_ids, true, false);
        }
        Stmt::Ip6SaddrNotLinkLocal => {
            need_family(w, cx, Family::V6);
            let (offset, len) = addr_field(Family::V6, AddrField::Saddr);
            payload(w, NFT_PAYLOAD_NETWORK_HEADER, offset, len, NFT_REG_1);
            cmp(w, NFT_CMP_NEQ, &[0; 16]);
            payload(w, NFT_PAYLOAD_NETWORK_HEADER, offset, len, NFT_REG_1);
            let mut mask = [0u8; 16];
            mask[0] = 0xff;
            mask[1] = 0xc0;
            bitwise(w, &mask);
            let mut fe80 = [0u8; 16];
            fe80[0] = 0xfe;
            fe80[1] = 0x80;
            cmp(w, NFT_CMP_NEQ, &fe80);
        }
        Stmt::AddrInSet { family, field, set } | Stmt::AddrNotInSet { family, field, set } => {
            need_family(w, cx, *family);
            load_addr(w, *family, *field, 0);
            let invert = matches!(s, Stmt::AddrNotInSet { .. });
            lookup(w, set, set_ids, invert, false);
        }
        Stmt::Masquerade => expr(w, "masq", |_| {}),
        Stmt::Notrack => expr(w, "notrack", |_| {}),
        Stmt::SelfTraffic { family, set } => {
            need_family(w, cx, *family);
            let used = load_addr(w, *family, AddrField::Saddr, 0);
            load_addr(w, *family, AddrField::Daddr, used);
            lookup(w, set, set_ids, false, false);
        }
        Stmt::L4Proto(p) => {
            let n = proto_number(*p);
            meta(w, NFT_META_L4PROTO, NFT_REG_1);
            cmp(w, NFT_CMP_EQ, &[n]);
            cx.l4proto = Some(n);
        }
        Stmt::Dport(port) => {
            payload(w, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1);
            cmp(w, NFT_CMP_EQ, &port.to_be_bytes());
        }
        Stmt::ProtoPortInSet { set } => {
            let used = load_l4proto(w, 0);
            load_dport(w, used);
            lookup(w, set, set_ids, false, false);
        }
        Stmt::DaddrProtoPortInSet { family, set } => {
            need_family(w, cx, *family);
            let mut word = load_addr(w, *family, AddrField::Daddr, 0);
            word += load_l4proto(w, word);
            load_dport(w, word);
            lookup(w, set, set_ids, false, false);
        }
        Stmt::VmapLookup { family, field, map } => {
            need_family(w, cx, *family);
            load_addr(w, *family, *field, 0);
            lookup(w, map, set_ids, false, true);
        }
        Stmt::IifnameVmap { map } => {
            meta(w, NFT_META_IIFNAME, NFT_REG_1);
            lookup(w, map, set_ids, false, true);
        }
        Stmt::Counter => expr(w, "counter", |_| {}),
        Stmt::CounterNamed(name) => expr(w, "objref", |w| {
            w.u32(1, NFT_OBJECT_COUNTER); // NFTA_OBJREF_IMM_TYPE
            w.strz(2, name); // NFTA_OBJREF_IMM_NAME
        }),
        Stmt::Limit { rate, burst } => expr(w, "limit", |w| {
            w.u64(1, u64::from(*rate)); // NFTA_LIMIT_RATE
            w.u64(2, 1); // NFTA_LIMIT_UNIT: seconds
            w.u32(3, *burst); // NFTA_LIMIT_BURST
            w.u32(4, NFT_LIMIT_PKTS); // NFTA_LIMIT_TYPE
            w.u32(5, 0); // NFTA_LIMIT_FLAGS
        }),
        Stmt::Log {
            group,
            prefix,
            snaplen,
        } => expr(w, "log", |w| {
            w.strz(2, prefix); // NFTA_LOG_PREFIX
            w.bytes(1, &group.to_be_bytes()); // NFTA_LOG_GROUP (u16)
            w.u32(3, *snaplen); // NFTA_LOG_SNAPLEN
        }),
        Stmt::Accept => verdict(w, NF_ACCEPT, None),
        Stmt::Drop => verdict(w, NF_DROP, None),
        Stmt::Jump(target) => verdict(w, NFT_JUMP, Some(target)),
        Stmt::Goto(target) => verdict(w, NFT_GOTO, Some(target)),
        Stmt::Return => verdict(w, NFT_RETURN, None),
    }
}
