//! The lab: two "node" namespaces joined by an underlay veth, a client pod on node 1 and a server pod
//! on node 2, wired the way palisade wires pods (a /32 on the pod side, a link-local gateway owned by
//! the host veth, a /32 route on the node). Forwarding is switched on inside the node namespaces only.
//! Every object is created inside namespaces we create; dropping the [`Lab`] deletes them all.

use super::cmd::run;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU32, Ordering};

/// Address of the client pod (on node 1, pod CIDR 10.244.1.0/24).
pub const CLIENT_IP: &str = "10.244.1.10";
/// Address of the server pod (on node 2, pod CIDR 10.244.2.0/24).
pub const SERVER_IP: &str = "10.244.2.10";
/// Pod CIDRs of the two lab nodes.
pub const NODE1_POD_CIDR: &str = "10.244.1.0/24";
pub const NODE2_POD_CIDR: &str = "10.244.2.0/24";
/// Underlay addresses of the two nodes.
pub const NODE1_UNDERLAY: &str = "10.250.0.1";
pub const NODE2_UNDERLAY: &str = "10.250.0.2";
/// Link-local gateway every pod routes through (the contract's).
pub const GATEWAY: std::net::Ipv4Addr = palisade_contract::GATEWAY_V4;
/// Host-side veth name of a measured pod (`client`, `server`) inside its node namespace: the name
/// the plugin derives from the container id `bench-<pod>` (the attachment records that palisade's
/// source guard reads say so, `rulesets::palisade_real`).
pub fn host_veth(pod: &str) -> String {
    palisade_contract::host_veth_name(&container_id(pod), POD_IFNAME)
}

/// Container id of a measured pod's (simulated) attachment record.
pub fn container_id(pod: &str) -> String {
    format!("bench-{pod}")
}

/// Interface name of every pod.
pub const POD_IFNAME: &str = "eth0";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The four namespaces of one lab. Deleted on drop.
#[derive(Debug)]
pub struct Lab {
    pub node1: String,
    pub node2: String,
    pub client: String,
    pub server: String,
    created: Vec<String>,
}

/// How the two nodes reach each other's pods (see [`Lab::create_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Underlay {
    /// One link between the nodes, routes via the other node's address (the default bench lab).
    Flat,
    /// The nodes on two subnets behind a router namespace that routes the pod CIDRs too (as a
    /// cloud route table would): direct routes, one routed hop.
    RoutedDirect,
    /// The same subnets and router, which knows node addresses only: pod traffic rides the agent's
    /// VXLAN devices (`vxlan.palisade`, VNI 5259596, UDP 4796, configured as the agent does),
    /// pods at MTU 1450 (what the agent writes into the conflist over a 1500 uplink).
    RoutedOverlay,
}

impl Underlay {
    pub fn parse(s: &str) -> Option<Underlay> {
        match s {
            "flat" => Some(Underlay::Flat),
            "routed-direct" => Some(Underlay::RoutedDirect),
            "overlay" => Some(Underlay::RoutedOverlay),
            _ => None,
        }
    }

    /// Appended to the system's name in samples (`palisade+overlay`); empty for the flat lab.
    pub fn suffix(self) -> &'static str {
        match self {
            Underlay::Flat => "",
            Underlay::RoutedDirect => "+routed-direct",
            Underlay::RoutedOverlay => "+overlay",
        }
    }
}

/// Agent overlay settings the bench reproduces (policy-agent/src/overlay.rs).
const OVERLAY_DEV: &str = "vxlan.palisade";
const OVERLAY_VNI: &str = "5259596";
/// UDP port of the agent's overlay devices (its tunnel guard admits only the nodes to it).
pub const OVERLAY_UDP_PORT: u16 = 4796;
/// Node underlay addresses in the routed variants (two /24s, the router at .254 of each).
const ROUTED_NODE: [&str; 2] = ["10.250.1.1", "10.250.2.2"];
const ROUTED_GW: [&str; 2] = ["10.250.1.254", "10.250.2.254"];

/// Every underlay address a lab node may have (flat and routed): the peers of the agent's tunnel
/// guard.
pub fn node_underlays() -> Vec<std::net::IpAddr> {
    [
        NODE1_UNDERLAY,
        NODE2_UNDERLAY,
        ROUTED_NODE[0],
        ROUTED_NODE[1],
    ]
    .iter()
    .filter_map(|a| a.parse().ok())
    .collect()
}

/// The agent's VTEP MAC of a node with IPv4 InternalIP `ip` (`0e:70:` + the address).
fn vtep_mac(ip: &str) -> Result<String> {
    let a: std::net::Ipv4Addr = ip
        .parse()
        .map_err(|e| Error::Invalid(format!("{ip}: {e}")))?;
    let o = a.octets();
    Ok(format!(
        "0e:70:{:02x}:{:02x}:{:02x}:{:02x}",
        o[0], o[1], o[2], o[3]
    ))
}

impl Lab {
    /// Builds the topology. Names carry our pid and a counter, so parallel runs never collide.
    pub fn create() -> Result<Lab> {
        Self::create_with(Underlay::Flat)
    }

    /// Builds the topology with the given underlay.
    pub fn create_with(underlay: Underlay) -> Result<Lab> {
        let id = format!(
            "pbench{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut lab = Lab {
            node1: format!("{id}-node1"),
            node2: format!("{id}-node2"),
            client: format!("{id}-client"),
            server: format!("{id}-server"),
            created: Vec::new(),
        };
        for ns in [&lab.node1, &lab.node2, &lab.client, &lab.server].map(|s| s.clone()) {
            run("ip", &["netns", "add", &ns])?;
            lab.created.push(ns.clone());
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        if underlay == Underlay::Flat {
            lab.wire()?;
        } else {
            let router = format!("{id}-router");
            run("ip", &["netns", "add", &router])?;
            lab.created.push(router.clone());
            run("ip", &["-n", &router, "link", "set", "lo", "up"])?;
            lab.wire_routed(&router, underlay)?;
        }
        Ok(lab)
    }

    /// The routed variants: node i's `eth0` to the router's `n<i>`, each pair its own /24.
    fn wire_routed(&self, router: &str, underlay: Underlay) -> Result<()> {
        let nodes = [&self.node1, &self.node2];
        let cidrs = [NODE1_POD_CIDR, NODE2_POD_CIDR];
        for i in 0..2 {
            let (ns, port) = (nodes[i], format!("n{}", i + 1));
            run(
                "ip",
                &[
                    "-n", router, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
            )?;
            let gw = format!("{}/24", ROUTED_GW[i]);
            run("ip", &["-n", router, "addr", "add", &gw, "dev", &port])?;
            run("ip", &["-n", router, "link", "set", &port, "up"])?;
            let addr = format!("{}/24", ROUTED_NODE[i]);
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &["-n", ns, "route", "add", "default", "via", ROUTED_GW[i]],
            )?;
            if underlay == Underlay::RoutedDirect {
                run(
                    "ip",
                    &[
                        "-n",
                        router,
                        "route",
                        "add",
                        cidrs[i],
                        "via",
                        ROUTED_NODE[i],
                    ],
                )?;
            }
        }
        sysctls(router, &[("net.ipv4.ip_forward", "1")])?;
        if underlay == Underlay::RoutedOverlay {
            for i in 0..2 {
                let (me, peer) = (i, 1 - i);
                let ns = nodes[me];
                let mtu = "1450";
                run(
                    "ip",
                    &[
                        "-n",
                        ns,
                        "link",
                        "add",
                        OVERLAY_DEV,
                        "address",
                        &vtep_mac(ROUTED_NODE[me])?,
                        "mtu",
                        mtu,
                        "type",
                        "vxlan",
                        "id",
                        OVERLAY_VNI,
                        "dstport",
                        &OVERLAY_UDP_PORT.to_string(),
                        "local",
                        ROUTED_NODE[me],
                        "nolearning",
                        "noudpcsum",
                    ],
                )?;
                run("ip", &["-n", ns, "link", "set", OVERLAY_DEV, "up"])?;
                let peer_mac = vtep_mac(ROUTED_NODE[peer])?;
                let vtep = cidrs[peer].trim_end_matches("/24");
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "bridge",
                        "fdb",
                        "append",
                        &peer_mac,
                        "dev",
                        OVERLAY_DEV,
                        "dst",
                        ROUTED_NODE[peer],
                        "self",
                        "permanent",
                    ],
                )?;
                run(
                    "ip",
                    &[
                        "-n",
                        ns,
                        "neigh",
                        "add",
                        vtep,
                        "lladdr",
                        &peer_mac,
                        "dev",
                        OVERLAY_DEV,
                        "nud",
                        "permanent",
                    ],
                )?;
                run(
                    "ip",
                    &[
                        "-n",
                        ns,
                        "route",
                        "add",
                        cidrs[peer],
                        "via",
                        vtep,
                        "dev",
                        OVERLAY_DEV,
                        "onlink",
                    ],
                )?;
            }
        }
        self.wire_pod(&self.node1, &self.client, &host_veth("client"), CLIENT_IP)?;
        self.wire_pod(&self.node2, &self.server, &host_veth("server"), SERVER_IP)?;
        if underlay == Underlay::RoutedOverlay {
            // The pod MTU the agent writes into the conflist (uplink 1500 - 50), on both veth ends.
            for (node, pod, pod_name) in [
                (&self.node1, &self.client, "client"),
                (&self.node2, &self.server, "server"),
            ] {
                run(
                    "ip",
                    &[
                        "-n",
                        node,
                        "link",
                        "set",
                        &host_veth(pod_name),
                        "mtu",
                        "1450",
                    ],
                )?;
                run("ip", &["-n", pod, "link", "set", "eth0", "mtu", "1450"])?;
            }
        }
        self.node_sysctls()
    }

    fn wire(&self) -> Result<()> {
        let (n1, n2, c, s) = (&self.node1, &self.node2, &self.client, &self.server);
        // Underlay between the nodes, created inside node1 with its peer placed straight into node2.
        run(
            "ip",
            &[
                "-n", n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
                n2,
            ],
        )?;
        for (ns, addr) in [(n1, NODE1_UNDERLAY), (n2, NODE2_UNDERLAY)] {
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        }
        run(
            "ip",
            &[
                "-n",
                n1,
                "route",
                "add",
                NODE2_POD_CIDR,
                "via",
                NODE2_UNDERLAY,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                n2,
                "route",
                "add",
                NODE1_POD_CIDR,
                "via",
                NODE1_UNDERLAY,
            ],
        )?;
        self.wire_pod(n1, c, &host_veth("client"), CLIENT_IP)?;
        self.wire_pod(n2, s, &host_veth("server"), SERVER_IP)?;
        self.node_sysctls()
    }

    /// Forwarding and conntrack settings of the nodes, port range of the pods.
    fn node_sysctls(&self) -> Result<()> {
        let (n1, n2, c, s) = (&self.node1, &self.node2, &self.client, &self.server);
        for ns in [n1, n2] {
            sysctls(
                ns,
                &[
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.default.rp_filter", "0"),
                    // Connect/close loops leave many TIME_WAIT entries; keep the per-namespace table small
                    // so every system runs with the same, never-full conntrack table.
                    ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "2"),
                ],
            )?;
        }
        for ns in [c, s] {
            sysctls(
                ns,
                &[
                    ("net.ipv4.ip_local_port_range", "1024 65000"),
                    ("net.ipv4.tcp_tw_reuse", "1"),
                ],
            )?;
        }
        Ok(())
    }

    fn wire_pod(&self, node: &str, pod: &str, host_veth: &str, ip: &str) -> Result<()> {
        run(
            "ip",
            &[
                "-n", node, "link", "add", host_veth, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                node,
                "addr",
                "add",
                &format!("{GATEWAY}/32"),
                "dev",
                host_veth,
            ],
        )?;
        run("ip", &["-n", node, "link", "set", host_veth, "up"])?;
        run(
            "ip",
            &[
                "-n",
                node,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                host_veth,
            ],
        )?;
        run(
            "ip",
            &["-n", pod, "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        )?;
        run("ip", &["-n", pod, "link", "set", "eth0", "up"])?;
        let gateway = GATEWAY.to_string();
        run(
            "ip",
            &[
                "-n", pod, "route", "add", &gateway, "dev", "eth0", "scope", "link",
            ],
        )?;
        run(
            "ip",
            &[
                "-n", pod, "route", "add", "default", "via", &gateway, "dev", "eth0",
            ],
        )?;
        Ok(())
    }

    /// Deletes every namespace we created (which removes their veths), collecting all errors.
    pub fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for ns in self.created.drain(..).rev() {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                errors.push(format!("{ns}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(errors.join("; ")))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(error = %e, "lab teardown failed; delete the namespaces listed by `ip netns list` that start with pbench");
        }
    }
}

/// Sets sysctls inside `ns` (never in the host namespace).
pub fn sysctls(ns: &str, pairs: &[(&str, &str)]) -> Result<()> {
    for (key, value) in pairs {
        let kv = format!("{key}={value}");
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", &kv])?;
    }
    Ok(())
}
