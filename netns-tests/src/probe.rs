//! The probe protocol and its two halves: `serve` (TCP and UDP servers that answer with the pod's
//! name) and `connect` (many probes from one network namespace, in parallel, with short timeouts).
//!
//! Both run inside pod namespaces via `palisade-probe`, so a pod needs no tool of its own and a whole
//! matrix row costs one process.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Transport protocol of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// One probe to run: an opaque id (echoed back), an address and a protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub id: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub connected: bool,
    /// What the server answered (its pod name), when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Why the probe failed (timeout, refused, ...), when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub millis: u64,
}

/// The message a UDP probe sends; servers answer any datagram, this one just makes captures readable.
pub const UDP_PROBE_PAYLOAD: &[u8] = b"hostname\n";

/// Probes one target. TCP: connected once the handshake completes and the server's name is read
/// (a server that accepted but sent nothing still counts: the handshake is what policy gates).
/// UDP: connected only if a non-empty reply arrives, as upstream's `agnhost connect` requires.
pub fn probe_one(target: &Target, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let result = match target.protocol {
        Protocol::Tcp => probe_tcp(target.addr, timeout),
        Protocol::Udp => probe_udp(target.addr, timeout),
    };
    let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (connected, reply, error) = match result {
        Ok(reply) => (true, Some(reply), None),
        Err(e) => (false, None, Some(e)),
    };
    Outcome {
        id: target.id.clone(),
        addr: target.addr,
        protocol: target.protocol,
        connected,
        reply,
        error,
        millis,
    }
}

fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| describe(&e))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| describe(&e))?;
    let mut buf = Vec::new();
    // The server writes its name and closes; a read error after the handshake is still a connection.
    let _ = stream.take(256).read_to_end(&mut buf);
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

fn probe_udp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).map_err(|e| describe(&e))?;
    sock.connect(addr).map_err(|e| describe(&e))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| describe(&e))?;
    sock.send(UDP_PROBE_PAYLOAD).map_err(|e| describe(&e))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).map_err(|e| describe(&e))?;
    if n == 0 {
        return Err("empty reply".to_string());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout".to_string(),
        std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
        _ => e.to_string(),
    }
}

/// Runs every probe in parallel (one thread each; targets are few dozen) and returns outcomes in
/// target order.
pub fn probe_all(targets: &[Target], timeout: Duration) -> Vec<Outcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || probe_one(t, timeout)))
            .collect();
        handles
            .into_iter()
            .zip(targets)
            .map(|(h, t)| {
                h.join().unwrap_or_else(|_| Outcome {
                    id: t.id.clone(),
                    addr: t.addr,
                    protocol: t.protocol,
                    connected: false,
                    reply: None,
                    error: Some("probe thread panicked".to_string()),
                    millis: 0,
                })
            })
            .collect()
    })
}

/// Serves TCP and UDP on the given ports (all addresses, v4 and v6; UDP on `udp_listen` only when
/// given) until the process is killed. Each TCP connection gets `name\n` and is closed; each UDP
/// datagram is answered with `name\n`.
pub fn serve(
    name: &str,
    tcp_ports: &[u16],
    udp_ports: &[u16],
    udp_listen: &[std::net::IpAddr],
) -> std::io::Result<()> {
    let reply = format!("{name}\n");
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &port in tcp_ports {
        // `[::]` with the default bindv6only=0 accepts IPv4 too.
        tcp.push(TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?);
    }
    for &port in udp_ports {
        if udp_listen.is_empty() {
            udp.push(UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))?);
        }
        for addr in udp_listen {
            udp.push(UdpSocket::bind(SocketAddr::new(*addr, port))?);
        }
    }
    std::thread::scope(|s| {
        for listener in &tcp {
            let reply = reply.as_bytes();
            s.spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let _ = stream.write_all(reply);
                }
            });
        }
        for sock in &udp {
            let reply = reply.as_bytes();
            s.spawn(move || {
                let mut buf = [0u8; 1500];
                loop {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(reply, peer);
                    }
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reaches_a_local_server_over_tcp_and_udp_and_reports_a_closed_port() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        std::thread::spawn(move || {
            for mut s in tcp.incoming().flatten() {
                let _ = s.write_all(b"x/a\n");
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if let Ok((_, p)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(b"x/a\n", p);
            }
        });
        let targets = vec![
            Target {
                id: "t".into(),
                addr: format!("127.0.0.1:{port}").parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            Target {
                id: "u".into(),
                addr: format!("127.0.0.1:{uport}").parse().unwrap(),
                protocol: Protocol::Udp,
            },
            Target {
                id: "c".into(),
                addr: format!("127.0.0.1:{closed}").parse().unwrap(),
                protocol: Protocol::Tcp,
            },
        ];
        let out = probe_all(&targets, Duration::from_millis(500));
        assert!(out[0].connected, "{:?}", out[0]);
        assert_eq!(out[0].reply.as_deref(), Some("x/a"));
        assert!(out[1].connected, "{:?}", out[1]);
        assert_eq!(out[1].reply.as_deref(), Some("x/a"));
        assert!(!out[2].connected);
        assert_eq!(out[2].error.as_deref(), Some("refused"));
    }

    #[test]
    fn udp_probe_without_reply_is_not_connected() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let t = Target {
            id: "s".into(),
            addr,
            protocol: Protocol::Udp,
        };
        let out = probe_one(&t, Duration::from_millis(200));
        assert!(!out.connected);
        assert_eq!(out.error.as_deref(), Some("timeout"));
    }
}
