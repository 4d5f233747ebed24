//! What our postrouting hook saw of one conntrack entry's first packet: the flow a sweep judges,
//! read from the entry's tuples (source = original source; destination, port = reply source, i.e.
//! after DNAT). Pure: no socket, no policy.

use super::Entry;
use palisade_policy::compile::admit::Flow;
use palisade_policy::model::Protocol;

/// ICMPv6 neighbour discovery types (router solicit .. redirect): accepted by our base chains before
/// any policy, whatever the addresses.
const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

/// What the postrouting hook saw of one conntrack entry's first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Judge it as this (new) packet; `from_this_node` is still to be filled in.
    Judge(Flow),
    /// Accepted by our base chains whatever the policies (neighbour discovery).
    AlwaysAdmitted,
    /// A TCP connection already closed (TIME_WAIT, CLOSE): it carries nothing more, and a new SYN on
    /// its tuple starts a new entry that the rules judge. Left alone.
    Closed,
}

/// Conntrack TCP states of a closed connection (`TCP_CONNTRACK_TIME_WAIT`, `TCP_CONNTRACK_CLOSE`).
const TCP_CLOSED_STATES: [u8; 2] = [7, 8];

/// Why an entry could not be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unjudged {
    NoOriginalSource,
    NoReplySource,
    NoProtocol,
    NoReplyPort,
}

/// IP protocol numbers of the protocols a policy names, and ICMPv6.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;

/// Maps one entry to the packet our postrouting hook judged: source = original-tuple source
/// (before SNAT), destination = reply-tuple source (after DNAT, e.g. a Service VIP's backend),
/// port = reply-tuple source port; ICMP and other protocols without ports are judged as the
/// ruleset does (only rules without `ports` admit them).
pub fn seen(e: &Entry<'_>) -> std::result::Result<Seen, Unjudged> {
    if e.tcp_state()
        .is_some_and(|s| TCP_CLOSED_STATES.contains(&s))
    {
        return Ok(Seen::Closed);
    }
    let (orig, reply) = (e.orig(), e.reply());
    let src = orig.src.ok_or(Unjudged::NoOriginalSource)?;
    let dst = reply.src.ok_or(Unjudged::NoReplySource)?;
    let proto = match orig.proto.ok_or(Unjudged::NoProtocol)? {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        IPPROTO_ICMPV6 if orig.icmpv6_type.is_some_and(|t| ND_TYPES.contains(&t)) => {
            return Ok(Seen::AlwaysAdmitted)
        }
        _ => None,
    };
    let port = match proto {
        Some(_) => reply.src_port.ok_or(Unjudged::NoReplyPort)?,
        None => 0,
    };
    Ok(Seen::Judge(Flow {
        src,
        dst,
        proto,
        port,
        from_this_node: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::entry::CTA_PROTO_ICMPV6_TYPE;
    use crate::conntrack::fixtures::{emitted, entry, flow, seen_of, tuple};
    use netlink_packet_core::DefaultNla;
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol as CtProto, Tuple,
    };
    use netlink_packet_netfilter::NetfilterProtoFamily;

    #[test]
    fn a_plain_tcp_entry_is_judged_as_its_first_packet() {
        let e = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, Some((40000, 80))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((80, 40000))),
        );
        assert_eq!(
            seen_of(&e),
            Ok(flow("10.0.1.2", "10.0.1.1", Some(Protocol::Tcp), 80))
        );
    }

    #[test]
    fn a_service_flow_is_judged_by_its_backend_and_target_port() {
        // 10.0.1.2 -> VIP 10.96.0.10:53, DNAT to the backend pod 10.0.1.1:5353.
        let e = entry(
            tuple("10.0.1.2", "10.96.0.10", CtProto::Udp, Some((40000, 53))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Udp, Some((5353, 40000))),
        );
        assert_eq!(
            seen_of(&e),
            Ok(flow("10.0.1.2", "10.0.1.1", Some(Protocol::Udp), 5353))
        );
    }

    #[test]
    fn a_masqueraded_flow_keeps_the_pod_source_our_hook_saw() {
        // The pod's egress is SNATed to the node after our hook: the reply goes to the node address.
        let e = entry(
            tuple("10.0.1.2", "8.8.8.8", CtProto::Sctp, Some((40000, 9))),
            tuple("8.8.8.8", "192.168.0.1", CtProto::Sctp, Some((9, 61000))),
        );
        assert_eq!(
            seen_of(&e),
            Ok(flow("10.0.1.2", "8.8.8.8", Some(Protocol::Sctp), 9))
        );
    }

    #[test]
    fn icmp_is_judged_without_ports_like_the_ruleset_does() {
        let e = entry(
            tuple("fd00::1:2", "fd00::1:1", CtProto::Ipv6Icmp, None),
            tuple("fd00::1:1", "fd00::1:2", CtProto::Ipv6Icmp, None),
        );
        assert_eq!(seen_of(&e), Ok(flow("fd00::1:2", "fd00::1:1", None, 0)));
        let e = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Icmp, None),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Icmp, None),
        );
        assert_eq!(seen_of(&e), Ok(flow("10.0.1.2", "10.0.1.1", None, 0)));
    }

    /// An entry cut short anywhere (a kernel or a reader bug) is read without a panic and judged
    /// by what it still says, or not judged; never as another flow.
    #[test]
    fn an_entry_cut_short_is_never_misread() {
        let e = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, Some((40000, 80))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((80, 40000))),
        );
        let whole = emitted(&e);
        let right = seen_of(&e).unwrap();
        for len in 0..whole.len() {
            if let Ok(s) = seen(&Entry::new(NetfilterProtoFamily::IPv4, &whole[..len])) {
                assert_eq!(s, right, "cut at {len}");
            }
        }
    }

    #[test]
    fn a_closed_tcp_connection_is_left_alone() {
        let mut e = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, Some((40000, 80))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((80, 40000))),
        );
        e.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(
            vec![ProtoInfoTCP::State(7)],
        )]));
        assert_eq!(seen_of(&e), Ok(Seen::Closed));
        e.pop();
        e.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(
            vec![ProtoInfoTCP::State(3)],
        )]));
        assert_eq!(
            seen_of(&e),
            Ok(flow("10.0.1.2", "10.0.1.1", Some(Protocol::Tcp), 80))
        );
    }

    #[test]
    fn neighbour_discovery_is_always_admitted() {
        let mut orig = tuple("fe80::1", "fe80::2", CtProto::Ipv6Icmp, None);
        if let Tuple::Proto(p) = &mut orig[1] {
            p.push(ProtoTuple::Other(DefaultNla::new(
                CTA_PROTO_ICMPV6_TYPE,
                vec![135],
            )));
        }
        let e = entry(orig, tuple("fe80::2", "fe80::1", CtProto::Ipv6Icmp, None));
        assert_eq!(seen_of(&e), Ok(Seen::AlwaysAdmitted));
    }

    #[test]
    fn an_entry_missing_what_the_hook_saw_is_not_judged() {
        let orig = tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, Some((40000, 80)));
        assert_eq!(
            seen_of(&[ConntrackAttribute::CtaTupleOrig(orig.clone())]),
            Err(Unjudged::NoReplySource)
        );
        let e = entry(orig, tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, None));
        assert_eq!(seen_of(&e), Err(Unjudged::NoReplyPort));
        assert_eq!(seen_of(&[]), Err(Unjudged::NoOriginalSource));
    }
}
