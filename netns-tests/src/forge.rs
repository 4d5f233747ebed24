//! Packets with a source address that is not the sender's: what an attacker pod with CAP_NET_RAW
//! (containerd grants it by default) can send. `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (which need
//! CAP_NET_RAW, like a raw socket) let a socket bind to any address; the kernel then sends ordinary
//! UDP datagrams and TCP SYNs from it. On the wire they are what a raw socket would forge.

use crate::probe::Protocol;
use socket2::{Domain, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Sends `count` UDP datagrams, or `count` TCP SYNs (one connection attempt each, abandoned before
/// any retransmission), from `src` to `dst`. Returns how many were handed to the kernel.
pub fn send_forged(src: IpAddr, dst: SocketAddr, proto: Protocol, count: u32) -> io::Result<u32> {
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
        s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
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
