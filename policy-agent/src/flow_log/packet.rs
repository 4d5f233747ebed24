//! The facts of one logged packet, read from the first bytes NFLOG copies (the IP header and the
//! transport ports). Pure: no socket here, so every shape is unit-tested.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers we name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// What a flow-log line needs of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketFacts {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (after IPv6 extension headers we can walk).
    pub proto: u8,
    /// Source and destination port (TCP, UDP, SCTP); `None` for other protocols or a packet cut
    /// before its ports.
    pub ports: Option<(u16, u16)>,
}

impl PacketFacts {
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or the number.
    pub fn protocol_name(&self) -> String {
        match self.proto {
            TCP => "TCP".into(),
            UDP => "UDP".into(),
            SCTP => "SCTP".into(),
            ICMP => "ICMP".into(),
            ICMPV6 => "ICMPv6".into(),
            n => n.to_string(),
        }
    }
}

/// Why a payload is not a packet we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("logged packet of {0} bytes is too short for its IP header")]
    Short(usize),
    #[error("logged packet has IP version {0}")]
    Version(u8),
}

/// Reads addresses, protocol and ports from the start of an IP packet (as NFLOG hands it over:
/// from the network header on).
pub fn parse(p: &[u8]) -> Result<PacketFacts, PacketError> {
    let first = *p.first().ok_or(PacketError::Short(0))?;
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if p.len() < 20 || ihl < 20 {
                return Err(PacketError::Short(p.len()));
            }
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let proto = p[9];
            // A fragment after the first has no transport header.
            let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let ports = if frag_offset == 0 {
                ports(proto, p.get(ihl..))
            } else {
                None
            };
            Ok(PacketFacts {
                src: src.into(),
                dst: dst.into(),
                proto,
                ports,
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(PacketError::Short(p.len()));
            }
            let addr = |at: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&p[at..at + 16]);
                Ipv6Addr::from(b)
            };
            let (proto, at) = skip_extensions(p, p[6], 40);
            Ok(PacketFacts {
                src: addr(8).into(),
                dst: addr(24).into(),
                proto,
                ports: at.and_then(|at| ports(proto, p.get(at..))),
            })
        }
        v => Err(PacketError::Version(v)),
    }
}

/// Walks IPv6 extension headers (hop-by-hop, routing, destination options, fragment) to the
/// transport header: its protocol and offset (`None` when cut off or in a later fragment).
fn skip_extensions(p: &[u8], mut next: u8, mut at: usize) -> (u8, Option<usize>) {
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let (Some(&n), Some(&len)) = (p.get(at), p.get(at + 1)) else {
                    return (next, None);
                };
                next = n;
                at += (usize::from(len) + 1) * 8;
            }
            44 => {
                let (Some(&n), Some(off)) = (p.get(at), p.get(at + 2..at + 4)) else {
                    return (next, None);
                };
                if u16::from_be_bytes([off[0], off[1]]) >> 3 != 0 {
                    return (n, None);
                }
                next = n;
                at += 8;
            }
            _ => return (next, Some(at)),
        }
    }
    (next, None)
}

fn ports(proto: u8, l4: Option<&[u8]>) -> Option<(u16, u16)> {
    match (proto, l4) {
        (TCP | UDP | SCTP, Some(h)) if h.len() >= 4 => Some((
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0];
        p.extend(frag.to_be_bytes());
        p.extend([64, proto, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3]);
        p.extend(l4);
        p
    }

    #[test]
    fn an_ipv4_tcp_syn_gives_addresses_protocol_and_ports() {
        let f = parse(&v4(TCP, 0, &[0xa0, 0x00, 0x00, 0x50, 1, 2, 3, 4])).unwrap();
        assert_eq!(f.src, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(f.dst, "10.244.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(f.protocol_name(), "TCP");
        assert_eq!(f.ports, Some((40960, 80)));
    }

    #[test]
    fn ipv4_options_and_later_fragments_are_read_right() {
        let mut p = v4(UDP, 0, &[]);
        p[0] = 0x46; // 24-byte header: 4 bytes of options before UDP
        p.extend([1, 1, 1, 1, 0x13, 0x88, 0x00, 0x35]);
        assert_eq!(parse(&p).unwrap().ports, Some((5000, 53)));
        let later = v4(UDP, 0x00b9, &[0x13, 0x88, 0x00, 0x35]);
        assert_eq!(parse(&later).unwrap().ports, None);
        assert_eq!(parse(&v4(ICMP, 0, &[8, 0, 0, 0])).unwrap().ports, None);
    }

    fn v6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        p.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend(rest);
        p
    }

    #[test]
    fn ipv6_with_and_without_extension_headers() {
        let f = parse(&v6(UDP, &[0x13, 0x88, 0x00, 0x35])).unwrap();
        assert_eq!(f.dst, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!((f.proto, f.ports), (UDP, Some((5000, 53))));
        // Hop-by-hop (8 bytes) then TCP.
        let f = parse(&v6(0, &[TCP, 0, 1, 4, 0, 0, 0, 0, 0x30, 0x39, 0x1f, 0x90])).unwrap();
        assert_eq!((f.proto, f.ports), (TCP, Some((12345, 8080))));
        // A first fragment has ports; a later one does not.
        let first = parse(&v6(44, &[UDP, 0, 0, 1, 0, 0, 0, 7, 0x13, 0x88, 0x00, 0x35])).unwrap();
        assert_eq!(first.ports, Some((5000, 53)));
        let later = parse(&v6(44, &[UDP, 0, 0x05, 0x01, 0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
        assert_eq!((later.proto, later.ports), (UDP, None));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(parse(&[]), Err(PacketError::Short(0)));
        assert_eq!(parse(&[0x45, 0, 0]), Err(PacketError::Short(3)));
        assert_eq!(parse(&[0x60; 20]), Err(PacketError::Short(20)));
        assert_eq!(parse(&[0x20; 40]), Err(PacketError::Version(2)));
        // Cut before the ports: facts without ports.
        assert_eq!(parse(&v4(TCP, 0, &[0xa0])).unwrap().ports, None);
        assert_eq!(parse(&v6(0, &[TCP, 9])).unwrap().ports, None);
    }
}
