//! The lab's network: namespaces, the underlay (flat bridge or routed segments) with its router,
//! the nodes and their links, the external network behind the router, and the overlay counters in
//! the underlay.

use super::{check_interrupted, cmd_ip, ExternalState, Lab, LabOptions, NodeState};
use crate::error::{LabError, Result};
use crate::netns;
use crate::process;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};

/// UDP conntrack timeouts in lab nodes (seconds): short, so a probe reusing an earlier probe's source
/// port does not ride that probe's entry across a policy change (see where they are set).
const LAB_UDP_CT_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout=1";
const LAB_UDP_CT_STREAM_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout_stream=1";

/// Bridge joining the nodes, inside the underlay namespace.
const UNDERLAY_BRIDGE: &str = "br0";
/// Name of a node's underlay interface inside its namespace.
pub const NODE_UPLINK: &str = "eth0";
/// The router's interface toward the external network, in the underlay namespace.
const ROUTER_EXTERNAL_LINK: &str = "ext0";

/// The external network behind the underlay's router (an address outside every pod CIDR,
/// reached via ipBlock).
pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const EXTERNAL_GW_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x77, 0, 0, 0, 2);
const EXTERNAL_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x77, 0, 0, 0, 1);
/// Name the external server answers with.
pub const EXTERNAL_NAME: &str = "external";

/// Node `n` (1-based) underlay IPv4 address.
pub fn node_underlay_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, n as u8)
}

/// Node `n` underlay IPv6 address.
pub fn node_underlay_v6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, n as u16)
}

/// How the nodes' underlay is laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One L2 segment: every node's address is on-link (172.31.0.0/24, fd00:172:31::/64), the
    /// router at .254 (::fe) the nodes' default gateway.
    #[default]
    Flat,
    /// Two L2 segments (odd nodes, even nodes) behind a router namespace (the underlay namespace),
    /// each node with a /32 and /128 address and a route to the router, as cloud VMs often have:
    /// no node's address is on-link to another's, and the router knows only node addresses (no pod
    /// range), so cross-node pod traffic needs the overlay.
    Routed,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::Flat => "flat",
            Topology::Routed => "routed",
        })
    }
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flat" => Ok(Topology::Flat),
            "routed" => Ok(Topology::Routed),
            _ => Err(format!("topology {s:?}: want flat or routed")),
        }
    }
}

/// UDP port of the agent's VXLAN devices (`palisade_agent::overlay::PORT`).
pub const OVERLAY_UDP_PORT: u16 = 4796;
/// Second underlay bridge (even nodes) of the routed topology.
const UNDERLAY_BRIDGE_B: &str = "br1";
/// The router's addresses on the flat topology's one segment: the nodes' default gateway.
const FLAT_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 254);
const FLAT_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 0xfe);
/// The router's IPv4 address on each segment of the routed topology (a /32, reached `onlink`).
const ROUTER_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(172, 31, 255, 1),
    Ipv4Addr::new(172, 31, 255, 2),
];
/// The router's IPv6 gateway on both segments (link-local).
const ROUTER_V6: &str = "fe80::1";
/// Counters of UDP to [`OVERLAY_UDP_PORT`] in the underlay namespace: `routed` (forwarded between
/// segments) and `bridged` (within one segment).
const COUNT_TABLE: &str = "pallab_count";

impl Lab {
    pub(super) fn new_netns(&mut self, role: &str) -> Result<String> {
        check_interrupted()?;
        let name = format!("pl-{}-{role}", self.state.name);
        self.state.netns.push(name.clone());
        self.state.save()?;
        netns::create(&name)?;
        Ok(name)
    }

    pub(super) fn build(&mut self, opts: &LabOptions) -> Result<()> {
        let ul = self.new_netns("ul")?;
        cmd_ip(&["-n", &ul, "link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        cmd_ip(&["-n", &ul, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        // The underlay namespace is also the nodes' router (their default gateway, as a cloud
        // network or a kind host is), routing node addresses only: it knows no pod range.
        netns::sysctl(
            &ul,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        for i in 1..=opts.nodes {
            self.add_node(&ul, i)?;
        }
        self.count_encapsulation(&ul)?;
        match opts.topology {
            Topology::Flat => self.route_flat(&ul)?,
            Topology::Routed => self.route_underlay(&ul)?,
        }
        if opts.external {
            self.add_external(&ul)?;
        }
        for i in 0..self.state.nodes.len() {
            self.start_agent(i)?;
        }
        for i in 0..self.state.nodes.len() {
            self.wait_conflist(i)?;
        }
        Ok(())
    }

    fn add_node(&mut self, ul: &str, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let ns = self.new_netns(&name)?;
        let ul_port = format!("n{i}");
        cmd_ip(&[
            "-n",
            ul,
            "link",
            "add",
            &ul_port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_UPLINK,
            "netns",
            &ns,
        ])?;
        cmd_ip(&[
            "-n",
            ul,
            "link",
            "set",
            &ul_port,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ])?;
        cmd_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node_underlay_v4(i)),
            "dev",
            NODE_UPLINK,
        ])?;
        cmd_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", node_underlay_v6(i)),
            "dev",
            NODE_UPLINK,
            "nodad",
        ])?;
        cmd_ip(&["-n", &ns, "link", "set", NODE_UPLINK, "up"])?;
        netns::sysctl(
            &ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                // Probes are new sockets, but one may reuse an ephemeral UDP source port and so the
                // 5-tuple of an earlier probe whose conntrack entry (30 s, 120 s once answered) is
                // still ESTABLISHED: that flow predates a policy change and rides the entry, which is
                // conntrack's (implementation-defined) behaviour, not what a matrix means to check.
                // Seen once in CI: z/c -> y/a UDP/80 connected under deny-all. Node namespaces only.
                LAB_UDP_CT_TIMEOUT,
                LAB_UDP_CT_STREAM_TIMEOUT,
            ],
        )?;
        let dir = self.state.run_dir.join("nodes").join(&name);
        for sub in ["state", "net.d", "ipam"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(LabError::io(dir.join(sub)))?;
        }
        let node = NodeState {
            name: name.clone(),
            index: i,
            netns: ns,
            dir,
            pod_cidr_v4: format!("10.244.{i}.0/24"),
            pod_cidr_v6: format!("fd00:10:244:{i:x}::/64"),
            agent_pid: None,
            agent_args: Vec::new(),
        };
        let obj = node_object(&node);
        self.manifests.write(&obj)?;
        self.state.nodes.push(node);
        self.state.save()
    }

    /// The external network: a namespace with a server on a link of its own to the underlay's
    /// router.
    fn add_external(&mut self, ul: &str) -> Result<()> {
        let ext = self.new_netns("ext")?;
        cmd_ip(&[
            "-n",
            ul,
            "link",
            "add",
            ROUTER_EXTERNAL_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ext,
        ])?;
        cmd_ip(&[
            "-n",
            ul,
            "addr",
            "add",
            &format!("{EXTERNAL_GW_V4}/24"),
            "dev",
            ROUTER_EXTERNAL_LINK,
        ])?;
        cmd_ip(&[
            "-n",
            ul,
            "addr",
            "add",
            &format!("{EXTERNAL_GW_V6}/64"),
            "dev",
            ROUTER_EXTERNAL_LINK,
            "nodad",
        ])?;
        cmd_ip(&["-n", ul, "link", "set", ROUTER_EXTERNAL_LINK, "up"])?;
        cmd_ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{EXTERNAL_V4}/24"),
            "dev",
            "eth0",
        ])?;
        cmd_ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{EXTERNAL_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        cmd_ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        // As the internet: it knows the nodes' addresses and no pod network, so a pod reaches it
        // only through the node's egress NAT (and its replies find the node, then conntrack).
        for n in &self.state.nodes {
            cmd_ip(&[
                "-n",
                &ext,
                "route",
                "add",
                &node_underlay_v4(n.index).to_string(),
                "via",
                &EXTERNAL_GW_V4.to_string(),
            ])?;
            cmd_ip(&[
                "-n",
                &ext,
                "-6",
                "route",
                "add",
                &node_underlay_v6(n.index).to_string(),
                "via",
                &EXTERNAL_GW_V6.to_string(),
            ])?;
        }
        let log = self.state.run_dir.join("external.log");
        let pid = process::spawn_in_netns(
            &self.state.name,
            &ext,
            &self.state.bins.probe(),
            &[
                "serve".into(),
                "--name".into(),
                EXTERNAL_NAME.into(),
                "--tcp".into(),
                "80,81".into(),
                "--udp".into(),
                "80,81".into(),
            ],
            &log,
        )?;
        self.state.external = Some(ExternalState {
            netns: ext,
            server_pid: Some(pid),
        });
        self.state.save()
    }

    /// The underlay namespace: the bridges of the segments, and the router between them and the
    /// external network.
    pub fn underlay_netns(&self) -> String {
        format!("pl-{}-ul", self.state.name)
    }

    /// Counts UDP to the overlay port crossing the underlay, routed or bridged.
    fn count_encapsulation(&mut self, ul: &str) -> Result<()> {
        let script = format!(
            "table inet {COUNT_TABLE} {{\n chain routed {{ type filter hook forward priority 0; udp dport {OVERLAY_UDP_PORT} counter; }}\n}}\ntable bridge {COUNT_TABLE} {{\n chain bridged {{ type filter hook forward priority 0; udp dport {OVERLAY_UDP_PORT} counter; }}\n}}\n"
        );
        netns::nft(ul, &script)
    }

    /// Packets to the overlay's UDP port the underlay has carried so far (both counters).
    pub fn encapsulated_packets(&self) -> Result<u64> {
        let ul = self.underlay_netns();
        let mut total = 0;
        for family in ["inet", "bridge"] {
            let out = cmd_ip(&[
                "netns",
                "exec",
                &ul,
                "nft",
                "list",
                "table",
                family,
                COUNT_TABLE,
            ])?;
            for part in out.split("packets ").skip(1) {
                total += part
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// The flat underlay's router: an address on the one segment, every node's default route.
    fn route_flat(&mut self, ul: &str) -> Result<()> {
        cmd_ip(&[
            "-n",
            ul,
            "addr",
            "add",
            &format!("{FLAT_ROUTER_V4}/24"),
            "dev",
            UNDERLAY_BRIDGE,
        ])?;
        cmd_ip(&[
            "-n",
            ul,
            "addr",
            "add",
            &format!("{FLAT_ROUTER_V6}/64"),
            "dev",
            UNDERLAY_BRIDGE,
            "nodad",
        ])?;
        for node in &self.state.nodes {
            default_routes(
                &node.netns,
                &FLAT_ROUTER_V4.to_string(),
                &FLAT_ROUTER_V6.to_string(),
            )?;
        }
        Ok(())
    }

    /// Turns the flat underlay built by `add_node` into the routed one: even nodes move to a second
    /// bridge, every node's address becomes a /32 (/128) with its default route via the router,
    /// and the underlay namespace routes between the segments (node addresses only).
    fn route_underlay(&mut self, ul: &str) -> Result<()> {
        cmd_ip(&["-n", ul, "link", "add", UNDERLAY_BRIDGE_B, "type", "bridge"])?;
        cmd_ip(&["-n", ul, "link", "set", UNDERLAY_BRIDGE_B, "up"])?;
        for (seg, bridge) in [UNDERLAY_BRIDGE, UNDERLAY_BRIDGE_B].iter().enumerate() {
            cmd_ip(&[
                "-n",
                ul,
                "addr",
                "add",
                &format!("{}/32", ROUTER_V4[seg]),
                "dev",
                bridge,
            ])?;
            cmd_ip(&[
                "-n",
                ul,
                "addr",
                "add",
                &format!("{ROUTER_V6}/64"),
                "dev",
                bridge,
                "nodad",
            ])?;
        }
        for node in self.state.nodes.clone() {
            let i = node.index;
            let seg = (i + 1) % 2;
            let bridge = [UNDERLAY_BRIDGE, UNDERLAY_BRIDGE_B][seg];
            if seg == 1 {
                cmd_ip(&["-n", ul, "link", "set", &format!("n{i}"), "master", bridge])?;
            }
            let (v4, v6) = (node_underlay_v4(i), node_underlay_v6(i));
            let ns = node.netns.as_str();
            for (old, new, v6opt) in [
                (format!("{v4}/24"), format!("{v4}/32"), false),
                (format!("{v6}/64"), format!("{v6}/128"), true),
            ] {
                cmd_ip(&["-n", ns, "addr", "del", &old, "dev", NODE_UPLINK])?;
                let mut add = vec!["-n", ns, "addr", "add", &new, "dev", NODE_UPLINK];
                if v6opt {
                    add.push("nodad");
                }
                cmd_ip(&add)?;
            }
            default_routes(ns, &ROUTER_V4[seg].to_string(), ROUTER_V6)?;
            cmd_ip(&["-n", ul, "route", "add", &format!("{v4}/32"), "dev", bridge])?;
            cmd_ip(&[
                "-n",
                ul,
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                bridge,
            ])?;
        }
        Ok(())
    }
}

/// A node's default routes, IPv4 and IPv6, via the router's addresses on its segment, out of its
/// uplink (the IPv4 gateway `onlink`: in the routed topology the node holds a /32).
fn default_routes(ns: &str, gw4: &str, gw6: &str) -> Result<()> {
    cmd_ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        gw4,
        "dev",
        NODE_UPLINK,
        "onlink",
    ])?;
    cmd_ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        gw6,
        "dev",
        NODE_UPLINK,
    ])
    .map(|_| ())
}

fn node_object(node: &NodeState) -> Value {
    let text = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\nspec:\n  podCIDR: {v4}\n  podCIDRs: [\"{v4}\", \"{v6}\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{a4}\"}}\n  - {{type: InternalIP, address: \"{a6}\"}}\n  - {{type: Hostname, address: {name}}}\n",
        name = node.name,
        v4 = node.pod_cidr_v4,
        v6 = node.pod_cidr_v6,
        a4 = node_underlay_v4(node.index),
        a6 = node_underlay_v6(node.index),
    );
    crate::yaml::from_str(&text, "node object").unwrap_or(Value::Null)
}
