//! Interval arithmetic for ipBlocks (cidr minus excepts) and port ranges: disjoint, merged,
//! sorted intervals, as nft interval sets need them (overlapping elements are rejected).

use crate::model::Protocol;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn to_u128(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn from_u128(v6: bool, v: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(v))
    } else {
        // Values of the v4 family never exceed u32::MAX by construction.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    }
}

fn net_bounds(n: &IpNet) -> (bool, u128, u128) {
    let (v6, lo) = to_u128(n.network());
    let (_, hi) = to_u128(n.broadcast());
    (v6, lo, hi)
}

/// Merges sorted-or-not inclusive intervals into disjoint, non-adjacent, sorted ones.
pub fn merge<T: Copy + Ord>(mut v: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    v.sort();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        if let Some(last) = out.last_mut() {
            // Overlapping or adjacent: extend.
            if a <= last.1 || next(last.1) == Some(a) {
                if b > last.1 {
                    last.1 = b;
                }
                continue;
            }
        }
        out.push((a, b));
    }
    out
}

/// The addresses matched by a set of ipBlocks (each `cidr` minus its `except`s, semantics 23),
/// as disjoint inclusive ranges, IPv4 first.
pub fn block_ranges<'a>(
    blocks: impl IntoIterator<Item = (&'a IpNet, &'a [IpNet])>,
) -> Vec<(IpAddr, IpAddr)> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (cidr, except) in blocks {
        let (is6, lo, hi) = net_bounds(cidr);
        let mut parts = vec![(lo, hi)];
        for e in except {
            let (e6, elo, ehi) = net_bounds(e);
            if e6 != is6 {
                continue;
            }
            let mut next = Vec::with_capacity(parts.len() + 1);
            for (a, b) in parts {
                if ehi < a || elo > b {
                    next.push((a, b));
                    continue;
                }
                if a < elo {
                    next.push((a, elo - 1));
                }
                if ehi < b {
                    next.push((ehi + 1, b));
                }
            }
            parts = next;
        }
        if is6 {
            v6.extend(parts);
        } else {
            v4.extend(parts);
        }
    }
    let inc = |x: u128| x.checked_add(1);
    let mut out: Vec<(IpAddr, IpAddr)> = merge(v4, inc)
        .into_iter()
        .map(|(a, b)| (from_u128(false, a), from_u128(false, b)))
        .collect();
    out.extend(
        merge(v6, inc)
            .into_iter()
            .map(|(a, b)| (from_u128(true, a), from_u128(true, b))),
    );
    out
}

/// Whether an address lies in one of the ranges.
pub fn ranges_contain(ranges: &[(IpAddr, IpAddr)], ip: IpAddr) -> bool {
    let (v6, x) = to_u128(ip);
    ranges.iter().any(|(a, b)| {
        let (a6, a) = to_u128(*a);
        let (_, b) = to_u128(*b);
        a6 == v6 && a <= x && x <= b
    })
}

/// Merges (protocol, first port, last port) ranges per protocol.
pub fn merge_ports(v: Vec<(Protocol, u16, u16)>) -> Vec<(Protocol, u16, u16)> {
    let mut out = Vec::new();
    for p in Protocol::ALL {
        let of_p: Vec<(u16, u16)> = v
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, a, b)| (*a, *b))
            .collect();
        out.extend(
            merge(of_p, |x: u16| x.checked_add(1))
                .into_iter()
                .map(|(a, b)| (p, a, b)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn semantics_23_cidr_minus_excepts_gives_disjoint_ranges() {
        let cidr: IpNet = "10.0.0.0/24".parse().unwrap();
        let ex: Vec<IpNet> = vec![
            "10.0.0.0/26".parse().unwrap(),
            "10.0.0.128/25".parse().unwrap(),
        ];
        assert_eq!(
            block_ranges([(&cidr, ex.as_slice())]),
            vec![(ip("10.0.0.64"), ip("10.0.0.127"))]
        );
        let ex: Vec<IpNet> = vec!["10.0.0.5/32".parse().unwrap()];
        assert_eq!(
            block_ranges([(&cidr, ex.as_slice())]),
            vec![
                (ip("10.0.0.0"), ip("10.0.0.4")),
                (ip("10.0.0.6"), ip("10.0.0.255"))
            ]
        );
    }

    #[test]
    fn overlapping_and_adjacent_blocks_merge_and_families_stay_apart() {
        let a: IpNet = "10.0.0.0/25".parse().unwrap();
        let b: IpNet = "10.0.0.128/25".parse().unwrap();
        let c: IpNet = "0.0.0.0/0".parse().unwrap();
        let d: IpNet = "::/0".parse().unwrap();
        assert_eq!(
            block_ranges([(&a, &[][..]), (&b, &[][..])]),
            vec![(ip("10.0.0.0"), ip("10.0.0.255"))]
        );
        let all = block_ranges([(&c, &[][..]), (&d, &[][..]), (&a, &[][..])]);
        assert_eq!(
            all,
            vec![
                (ip("0.0.0.0"), ip("255.255.255.255")),
                (ip("::"), ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
            ]
        );
        assert!(ranges_contain(&all[..1], ip("1.2.3.4")));
        assert!(
            !ranges_contain(&all[..1], ip("::1")),
            "semantics 25: 0.0.0.0/0 matches no IPv6"
        );
    }

    #[test]
    fn port_ranges_merge_per_protocol() {
        let m = merge_ports(vec![
            (Protocol::Tcp, 53, 80),
            (Protocol::Tcp, 60, 60),
            (Protocol::Tcp, 81, 90),
            (Protocol::Udp, 53, 53),
        ]);
        assert_eq!(m, vec![(Protocol::Tcp, 53, 90), (Protocol::Udp, 53, 53)]);
        assert_eq!(
            merge_ports(vec![
                (Protocol::Sctp, 0, 65535),
                (Protocol::Sctp, 65535, 65535)
            ]),
            vec![(Protocol::Sctp, 0, 65535)]
        );
    }
}
