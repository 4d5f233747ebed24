//! A node's own pod range: an address of it without a pod (a deleted pod's, one never handed out)
//! is answered at the node (the agent's `unreachable` route under its podCIDR), never sent out by
//! the node's default route (every lab node's goes to the underlay's router), where a cloud network
//! would route it back to the node until its TTL ran out and anything on the way would see pod
//! traffic.

use super::{expect_reach, run_in, target, TestResult};
use palisade_netns_tests::lab::{self, Lab};
use palisade_netns_tests::probe::Protocol;
use std::net::IpAddr;

/// Counting table in the node's namespace, beside the agent's (which never reads another table).
const COUNT_TABLE: &str = "rangecount";

fn ip(netns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run_in(netns, &all)
}

/// Packets to `unused` that left the node through its uplink so far.
fn left(node: &str, unused: IpAddr) -> Result<u64, String> {
    palisade_netns_tests::netns::counted(node, COUNT_TABLE, &format!("daddr {unused} "))
        .map_err(|e| e.to_string())
}

/// An address of `cidr` (`a.b.c.0/24`, `x::/64`) that no pod of the lab holds.
fn unused_in(lab: &Lab, cidr: &str) -> Result<IpAddr, String> {
    let net: ipnet::IpNet = cidr.parse().map_err(|e| format!("{cidr}: {e}"))?;
    let taken: Vec<IpAddr> = lab
        .state()
        .pods
        .values()
        .flat_map(|p| p.ips.clone())
        .collect();
    net.hosts()
        .skip(200)
        .find(|a| !taken.contains(a))
        .ok_or(format!("no free address in {cidr}"))
}

pub fn an_address_of_a_pod_range_without_a_pod_never_leaves_by_the_default_route(
    lab: &mut Lab,
) -> TestResult {
    let node = lab.state().nodes[0].clone();
    let unused = [
        unused_in(lab, &node.pod_cidr_v4)?,
        unused_in(lab, &node.pod_cidr_v6)?,
    ];
    let r = (|| {
        for six in [false, true] {
            let mut args = if six { vec!["-6"] } else { vec![] };
            args.extend(["route", "show", "default"]);
            if !ip(&node.netns, &args)?.contains("default via") {
                return Err(format!("{} has no default route", node.name));
            }
        }
        let mut rules = String::new();
        for u in &unused {
            let fam = if u.is_ipv4() { "ip" } else { "ip6" };
            rules.push_str(&format!(
                "    oifname \"{}\" {fam} daddr {u} counter\n",
                lab::NODE_UPLINK
            ));
        }
        palisade_netns_tests::netns::nft(
            &node.netns,
            &format!("table inet {COUNT_TABLE} {{\n  chain post {{\n    type filter hook postrouting priority 500; policy accept;\n{rules}  }}\n}}\n"),
        )
        .map_err(|e| format!("counting table in {}: {e}", node.netns))?;
        let routes = ip(&node.netns, &["route", "show", "proto", "140"])?
            + &ip(&node.netns, &["-6", "route", "show", "proto", "140"])?;
        for cidr in [&node.pod_cidr_v4, &node.pod_cidr_v6] {
            if !routes.contains(&format!("unreachable {cidr}")) {
                return Err(format!(
                    "{}: no unreachable route under {cidr}: {routes}",
                    node.name
                ));
            }
        }
        // From a pod of this node and from one of the other node, TCP and UDP.
        let from_here = lab
            .state()
            .pods
            .values()
            .find(|p| p.node == node.name && !p.host_network)
            .map(|p| p.key())
            .ok_or("no pod on the first node")?;
        let from_there = lab
            .state()
            .pods
            .values()
            .find(|p| p.node != node.name && !p.host_network)
            .map(|p| p.key())
            .ok_or("no pod on another node")?;
        let mut checks = Vec::new();
        for from in [&from_here, &from_there] {
            for u in unused {
                checks.push((from.as_str(), target("no pod", u, 80, Protocol::Tcp), false));
                checks.push((from.as_str(), target("no pod", u, 81, Protocol::Udp), false));
            }
        }
        expect_reach(lab, &checks)?;
        for u in unused {
            let n = left(&node.netns, u)?;
            if n != 0 {
                return Err(format!(
                    "{n} packets to {u} (no pod holds it) left {} by its default route",
                    node.name
                ));
            }
        }
        // Control: without the route under the range, the same probes do leave (so the check
        // above can fail). The route is put back as the agent writes it.
        for (cidr, six) in [(&node.pod_cidr_v4, false), (&node.pod_cidr_v6, true)] {
            let mut args = if six { vec!["-6"] } else { vec![] };
            args.extend(["route", "del", "unreachable", cidr.as_str(), "proto", "140"]);
            ip(&node.netns, &args)?;
        }
        let left = (|| {
            expect_reach(lab, &checks)?;
            unused
                .iter()
                .map(|u| left(&node.netns, *u).map(|n| (*u, n)))
                .collect::<Result<Vec<_>, String>>()
        })();
        for (cidr, six) in [(&node.pod_cidr_v4, false), (&node.pod_cidr_v6, true)] {
            let mut args = if six { vec!["-6"] } else { vec![] };
            args.extend(["route", "add", "unreachable", cidr.as_str(), "proto", "140"]);
            ip(&node.netns, &args)?;
        }
        for (u, n) in left? {
            if n == 0 {
                return Err(format!(
                    "control: with the unreachable route removed, nothing to {u} left by the default route; the check proves nothing"
                ));
            }
        }
        Ok(())
    })();
    let _ = run_in(
        &node.netns,
        &["nft", "delete", "table", "inet", COUNT_TABLE],
    );
    r
}
