//! Conntrack entries as the kernel sends them, for the tests of this module's parts.

use super::entry::{CTA_ID, CTA_ZONE};
use super::seen::{seen, Seen, Unjudged};
use super::Entry;
use netlink_packet_core::{DefaultNla, Emitable};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, IPTuple, ProtoTuple, Protocol as CtProto, Tuple,
};
use netlink_packet_netfilter::NetfilterProtoFamily;
use palisade_policy::compile::admit::Flow;
use palisade_policy::model::Protocol;
use std::net::IpAddr;

/// The attributes as the kernel sends them (the crate's emitter), read as a sweep reads them.
pub(super) fn emitted(attrs: &[ConntrackAttribute]) -> Vec<u8> {
    let mut out = vec![0; attrs.buffer_len()];
    attrs.emit(&mut out);
    out
}

pub(super) fn seen_of(attrs: &[ConntrackAttribute]) -> std::result::Result<Seen, Unjudged> {
    seen(&Entry::new(NetfilterProtoFamily::IPv4, &emitted(attrs)))
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn tuple(src: &str, dst: &str, proto: CtProto, ports: Option<(u16, u16)>) -> Vec<Tuple> {
    let mut p = vec![ProtoTuple::Protocol(proto)];
    if let Some((s, d)) = ports {
        p.push(ProtoTuple::SourcePort(s));
        p.push(ProtoTuple::DestinationPort(d));
    }
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(ip(src)),
            IPTuple::DestinationAddress(ip(dst)),
        ]),
        Tuple::Proto(p),
    ]
}

pub(super) fn entry(orig: Vec<Tuple>, reply: Vec<Tuple>) -> Vec<ConntrackAttribute> {
    vec![
        ConntrackAttribute::CtaTupleOrig(orig),
        ConntrackAttribute::CtaTupleReply(reply),
        ConntrackAttribute::CtaTimeout(120),
        ConntrackAttribute::Other(DefaultNla::new(CTA_ID, vec![0, 0, 0, 7])),
        ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 3])),
    ]
}

pub(super) fn flow(src: &str, dst: &str, proto: Option<Protocol>, port: u16) -> Seen {
    Seen::Judge(Flow {
        src: ip(src),
        dst: ip(dst),
        proto,
        port,
        from_this_node: false,
    })
}
