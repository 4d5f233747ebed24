//! `palisade-probe`: the server and client that run inside lab pods.
//!
//! `palisade-probe serve --name x/a --tcp 80,81 --udp 80,81` answers every TCP connection and UDP
//! datagram with `x/a`. `palisade-probe connect --timeout-ms 500` reads a JSON array of targets
//! (`[{"id":..,"addr":"10.244.1.2:80","protocol":"tcp"}]`) on stdin, probes them all in parallel and
//! prints a JSON array of outcomes (`{id, addr, protocol, connected, reply?, error?, millis}`).

use clap::{Parser, Subcommand};
use palisade_netns_tests::probe::{self, Protocol, Target};
use std::io::Read;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "palisade-probe",
    about = "TCP/UDP servers and batch probes for palisade-lab pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TCP and UDP on the given ports, answering with NAME.
    Serve {
        #[arg(long)]
        name: String,
        /// TCP ports, comma separated.
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        /// UDP ports, comma separated.
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        /// Addresses the UDP sockets bind to, comma separated (default: all). A server in a node's
        /// namespace (a hostNetwork pod) binds its node's addresses, as agnhost's
        /// `--udp-listen-addresses` does upstream: a socket on the wildcard address answers from
        /// whatever source the route back picks, which a connected client does not take as the
        /// answer.
        #[arg(long, value_delimiter = ',')]
        udp_listen: Vec<std::net::IpAddr>,
    },
    /// Probe targets read as JSON from stdin (or given as PROTO:ADDR:PORT arguments), print JSON.
    Connect {
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Targets like `tcp:10.0.0.1:80` or `udp:[fd00::1]:81`; when none, a JSON array on stdin.
        targets: Vec<String>,
    },
    /// Send COUNT UDP datagrams or TCP SYNs to a target from SOURCE, an address that need not be
    /// ours (as an attacker pod with CAP_NET_RAW can); prints how many left.
    Forge {
        /// The source address to put on the packets.
        #[arg(long)]
        source: std::net::IpAddr,
        /// The source port (0: any).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// PROTO:ADDR:PORT, e.g. udp:10.244.1.5:81.
        target: String,
    },
    /// Send COUNT ICMP (ICMPv6) port-unreachable errors to ADDR from a raw socket, quoting a UDP
    /// datagram from `--quoted-src` to `--quoted-dst`; prints how many left.
    IcmpError {
        #[arg(long)]
        quoted_src: std::net::SocketAddr,
        #[arg(long)]
        quoted_dst: std::net::SocketAddr,
        #[arg(long, default_value_t = 20)]
        count: u32,
        to: std::net::IpAddr,
    },
    /// Send COUNT ICMPv6 neighbour discovery messages of TYPE (133-137) to ADDR from a raw socket,
    /// hop limit 255; prints how many left.
    Nd {
        #[arg(long = "type")]
        icmp_type: u8,
        #[arg(long, default_value_t = 20)]
        count: u32,
        to: std::net::Ipv6Addr,
    },
    /// Send COUNT ICMPv6 router advertisements (router lifetime 1800 s) to ADDR through DEV (a
    /// link-local ADDR needs it), from a raw socket, hop limit 255; prints how many left.
    RouterAdvert {
        #[arg(long)]
        dev: String,
        #[arg(long, default_value_t = 20)]
        count: u32,
        to: std::net::Ipv6Addr,
    },
    /// Send COUNT VXLAN datagrams (a plain UDP socket: no capability needed) to a node's overlay
    /// port, each carrying a TCP SYN from SOURCE to TARGET for the device with MAC `--mac`; prints
    /// how many left.
    Vxlan {
        /// ADDR:PORT of the node's overlay socket, e.g. 172.31.0.2:4796.
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        vni: u32,
        /// MAC of the overlay device that should take the inner frame, e.g. 0e:70:ac:1f:00:02.
        #[arg(long)]
        mac: String,
        /// The inner packet's (forged) IPv4 source.
        #[arg(long)]
        source: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// IPv4 ADDR:PORT the inner SYN goes to.
        target: std::net::SocketAddrV4,
    },
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("MAC {s:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("MAC {s:?}: expected six bytes"))
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (proto, addr) = s
        .split_once(':')
        .ok_or_else(|| format!("target {s:?}: expected PROTO:ADDR:PORT"))?;
    let protocol: Protocol = proto.parse()?;
    let addr = addr
        .parse()
        .map_err(|e| format!("target {s:?}: bad address: {e}"))?;
    Ok(Target {
        id: s.to_string(),
        addr,
        protocol,
    })
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve {
            name,
            tcp,
            udp,
            udp_listen,
        } => probe::serve(&name, &tcp, &udp, &udp_listen).map_err(|e| format!("serve {name}: {e}")),
        Command::Connect {
            timeout_ms,
            targets,
        } => {
            let targets: Vec<Target> = if targets.is_empty() {
                let mut input = String::new();
                std::io::stdin()
                    .read_to_string(&mut input)
                    .map_err(|e| format!("reading targets from stdin: {e}"))?;
                serde_json::from_str(&input).map_err(|e| format!("targets on stdin: {e}"))?
            } else {
                targets
                    .iter()
                    .map(|t| parse_target(t))
                    .collect::<Result<_, _>>()?
            };
            let out = probe::probe_all(&targets, Duration::from_millis(timeout_ms));
            let json = serde_json::to_string(&out).map_err(|e| format!("encoding results: {e}"))?;
            println!("{json}");
            Ok(())
        }
        Command::IcmpError {
            quoted_src,
            quoted_dst,
            count,
            to,
        } => {
            let sent =
                palisade_netns_tests::forge::send_icmp_errors(to, quoted_src, quoted_dst, count)
                    .map_err(|e| format!("sending ICMP errors to {to}: {e}"))?;
            println!("{sent}");
            Ok(())
        }
        Command::Forge {
            source,
            source_port,
            count,
            target,
        } => {
            let t = parse_target(&target)?;
            let sent = palisade_netns_tests::forge::send_forged(
                SocketAddr::new(source, source_port),
                t.addr,
                t.protocol,
                count,
            )
            .map_err(|e| format!("forging {} from {source} to {}: {e}", t.protocol, t.addr))?;
            println!("{sent}");
            Ok(())
        }
        Command::Nd {
            icmp_type,
            count,
            to,
        } => {
            let sent = palisade_netns_tests::forge::send_neighbour_discovery(to, icmp_type, count)
                .map_err(|e| format!("sending ICMPv6 type {icmp_type} to {to}: {e}"))?;
            println!("{sent}");
            Ok(())
        }
        Command::RouterAdvert { dev, count, to } => {
            let path = format!("/sys/class/net/{dev}/ifindex");
            let scope: u32 = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {path}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{path}: {e}"))?;
            let sent = palisade_netns_tests::forge::send_router_advertisements(to, scope, count)
                .map_err(|e| format!("sending router advertisements to {to}%{dev}: {e}"))?;
            println!("{sent}");
            Ok(())
        }
        Command::Vxlan {
            to,
            vni,
            mac,
            source,
            count,
            target,
        } => {
            let datagram =
                palisade_netns_tests::forge::vxlan_syn(vni, parse_mac(&mac)?, source, target);
            let sent = palisade_netns_tests::forge::send_datagrams(to, &datagram, count)
                .map_err(|e| format!("sending VXLAN to {to}: {e}"))?;
            println!("{sent}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
