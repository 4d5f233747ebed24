//! Forged source addresses (issue 11, item 1): a pod that sends with an address not its own is
//! dropped at its veth, before any policy, whatever address it borrows; the owner of an address
//! still gets through where policy allows it.

use super::{apply, expect_reach, pod_ip, run_in as run, target, with_cleanup, TestResult};
use palisade_netns_tests::lab::{self, Family, Lab, PodState};
use palisade_netns_tests::probe::{Protocol, Target};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Datagrams, and SYNs, per forged source and family.
const COUNT: u32 = 20;
const VICTIM: &str = "x/a";
/// Isolated for egress (deny all) and forging: it must not get out under another pod's address.
const ATTACKER: &str = "z/b";
/// Counting table in the victim pod's own namespace (the lab's pods are ours to instrument).
const COUNT_TABLE: &str = "forgecount";

/// Sends COUNT UDP datagrams to port 81 and COUNT TCP SYNs to port 80 of `to` from `source`.
fn forge(lab: &Lab, netns: &str, source: IpAddr, to: IpAddr) -> Result<(), String> {
    let probe = lab.state().bins.probe();
    let probe = probe.to_string_lossy();
    for (proto, port) in [("udp", 81), ("tcp", 80)] {
        let t = format!("{proto}:{}", SocketAddr::new(to, port));
        run(
            netns,
            &[
                &probe,
                "forge",
                "--source",
                &source.to_string(),
                "--count",
                &COUNT.to_string(),
                &t,
            ],
        )?;
    }
    Ok(())
}

/// Where a pod's namespace counts: as packets arrive, before its own stack.
const COUNT_AT_ARRIVAL: &str = "prerouting priority -500";
/// Where a node's namespace counts what reaches its sockets: input, after our chain (101).
const COUNT_PAST_OUR_INPUT: &str = "input priority 200";

/// (Re)installs the counting table in `netns`, before its own stack: one counter per source
/// address, on what `matched` says of that source's packets, commented with the address.
fn install_count_table(
    netns: &str,
    sources: &[IpAddr],
    matched: impl Fn(IpAddr) -> &'static str,
) -> Result<(), String> {
    install_count_table_at(netns, COUNT_AT_ARRIVAL, sources, matched)
}

/// [`install_count_table`] at another hook and priority (`hook`: "input priority 200").
fn install_count_table_at(
    netns: &str,
    hook: &str,
    sources: &[IpAddr],
    matched: impl Fn(IpAddr) -> &'static str,
) -> Result<(), String> {
    remove_count_table(netns);
    let mut rules = String::new();
    for s in sources {
        let fam = if s.is_ipv4() { "ip" } else { "ip6" };
        rules.push_str(&format!(
            "    {fam} saddr {s} {} counter comment \"{s}\"\n",
            matched(*s)
        ));
    }
    let text = format!(
        "table inet {COUNT_TABLE} {{\n  chain count {{\n    type filter hook {hook}; policy accept;\n{rules}  }}\n}}\n"
    );
    palisade_netns_tests::netns::nft(netns, &text)
        .map_err(|e| format!("counting table in {netns}: {e}"))
}

/// Counts, per source address, TCP and UDP to ports 80 and 81 arriving in `netns`.
fn install_counters(netns: &str, sources: &[IpAddr]) -> Result<(), String> {
    install_count_table(netns, sources, |_| "th dport { 80, 81 }")
}

/// Packets counted so far per comment (source address) in a chain's rules.
fn counters(netns: &str, args: &[&str]) -> Result<Vec<(String, u64)>, String> {
    let mut cmd = vec!["nft", "-j", "list"];
    cmd.extend_from_slice(args);
    let text = run(netns, &cmd)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("nft listing in {netns}: {e}"))?;
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("counter"))
            .filter_map(|c| c["packets"].as_u64())
            .sum();
        let comment = rule["comment"].as_str().unwrap_or_default().to_string();
        out.push((comment, packets));
    }
    Ok(out)
}

fn delivered(netns: &str, source: IpAddr) -> Result<u64, String> {
    Ok(counters(netns, &["chain", "inet", COUNT_TABLE, "count"])?
        .into_iter()
        .filter(|(c, _)| *c == source.to_string())
        .map(|(_, n)| n)
        .sum())
}

/// `palisade_forged_packets_total{kind}` of a node's agent, what an operator sees (0 while the
/// series is absent).
fn forged(lab: &Lab, node: &str, kind: &str) -> Result<u64, String> {
    let text = lab.agent_metrics(node)?;
    let prefix = format!("palisade_forged_packets_total{{kind=\"{kind}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// Packets the source guard of a node dropped so far.
fn guard_drops(lab: &Lab, node: &str) -> Result<u64, String> {
    forged(lab, node, "source")
}

pub fn forged_sources_are_dropped_at_the_pods_veth(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "forged sources", |lab| {
        let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
        let attacker = lab.pod(ATTACKER).map_err(|e| e.to_string())?.clone();
        let nodes = lab.state().nodes.clone();
        let attacker_node = lab
            .node_state(&attacker.node)
            .map_err(|e| e.to_string())?
            .clone();
        let other_node = nodes
            .iter()
            .find(|n| n.name != attacker.node)
            .ok_or("a second node is needed")?
            .clone();
        // The peers x/a admits: every pod of namespace y, on both nodes.
        let peers: Vec<_> = lab.pods().filter(|p| p.namespace == "y").cloned().collect();
        let same = peers.iter().find(|p| p.node == attacker.node);
        let other = peers.iter().find(|p| p.node != attacker.node);
        let (Some(same), Some(other)) = (same.cloned(), other.cloned()) else {
            return Err("the model must place pods of y on both nodes".into());
        };
        let mut cidrs_v4 = Vec::new();
        let mut cidrs_v6 = Vec::new();
        for n in &nodes {
            cidrs_v4.push(n.pod_cidr_v4.clone());
            cidrs_v6.push(n.pod_cidr_v6.clone());
        }
        // x/a admits y's pods, and any address outside the pod networks (so a forged node or
        // external address would be admitted too, if it got that far); z/b may send nothing.
        apply(lab, vec![super::yaml(&format!(
            "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: admit-y-and-outside, namespace: x}}, spec: {{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}}}, {{ipBlock: {{cidr: 0.0.0.0/0, except: [{}]}}}}, {{ipBlock: {{cidr: '::/0', except: [{}]}}}}]}}]}}}}",
            cidrs_v4.join(", "),
            cidrs_v6.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ")
        )), super::yaml(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-egress, namespace: z}, spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Egress]}}",
        )])?;
        let victim4 = pod_ip(lab, VICTIM, Family::V4)?;
        expect_reach(
            lab,
            &[
                (
                    same.key().as_str(),
                    target(VICTIM, victim4, 80, Protocol::Tcp),
                    true,
                ),
                (ATTACKER, target(VICTIM, victim4, 80, Protocol::Tcp), false),
            ],
        )?;
        let mut report = Vec::new();
        for fam in [Family::V4, Family::V6] {
            let pick = |ips: &[IpAddr]| fam.pick(ips).ok_or(format!("no {fam:?} address"));
            let to = pick(&victim.ips)?;
            let (own_node, far_node, outside) = match fam {
                Family::V4 => (
                    IpAddr::V4(lab::node_underlay_v4(attacker_node.index)),
                    IpAddr::V4(lab::node_underlay_v4(other_node.index)),
                    IpAddr::V4(lab::EXTERNAL_V4),
                ),
                Family::V6 => (
                    IpAddr::V6(lab::node_underlay_v6(attacker_node.index)),
                    IpAddr::V6(lab::node_underlay_v6(other_node.index)),
                    IpAddr::V6(lab::EXTERNAL_V6),
                ),
            };
            let forged = [
                ("a pod of the same node", pick(&same.ips)?),
                ("a pod of the other node", pick(&other.ips)?),
                ("its own node", own_node),
                ("the other node", far_node),
                ("an external address", outside),
            ];
            let sources: Vec<IpAddr> = forged.iter().map(|(_, s)| *s).collect();
            install_counters(&victim.netns, &sources)?;
            let sent = 2 * u64::from(COUNT);
            for (what, s) in &forged {
                let drops_before = guard_drops(lab, &attacker_node.name)?;
                forge(lab, &attacker.netns, *s, to)?;
                std::thread::sleep(std::time::Duration::from_millis(100));
                let dropped = guard_drops(lab, &attacker_node.name)? - drops_before;
                let n = delivered(&victim.netns, *s)?;
                if n != 0 {
                    return Err(format!(
                        "{ATTACKER} forging {what} ({s}) reached {VICTIM}: {n} packets of {sent}"
                    ));
                }
                // Its own node's IPv4 address never reaches the guard: the kernel's martian-source
                // check (a local address arriving on a non-loopback link) drops it while routing,
                // before the forward and input hooks. Every other forgery is the guard's to drop.
                let kernel_drops_it = fam == Family::V4 && *s == own_node;
                let by = if kernel_drops_it {
                    if dropped != 0 {
                        return Err(format!(
                            "{fam:?} forging {what} ({s}): the guard counted {dropped}, but the kernel's martian-source check should have dropped all {sent} before it"
                        ));
                    }
                    "the kernel's martian-source check"
                } else {
                    if dropped < sent {
                        return Err(format!(
                            "{fam:?} forging {what} ({s}): {sent} packets sent, the source guard of {} counted {dropped}",
                            attacker_node.name
                        ));
                    }
                    "the source guard"
                };
                report.push(format!(
                    "{fam:?} {what} ({s}): 0 delivered, dropped by {by}"
                ));
            }
            // The owners of those addresses get through: the policy would have admitted them
            // (the node that is not the victim's is admitted by the ipBlock alone).
            let far = nodes
                .iter()
                .find(|n| n.name != victim.node)
                .ok_or("a second node is needed")?;
            let far_ip = match fam {
                Family::V4 => IpAddr::V4(lab::node_underlay_v4(far.index)),
                Family::V6 => IpAddr::V6(lab::node_underlay_v6(far.index)),
            };
            for (who, netns, s) in [
                (same.key(), same.netns.clone(), pick(&same.ips)?),
                (other.key(), other.netns.clone(), pick(&other.ips)?),
                (far.name.clone(), far.netns.clone(), far_ip),
            ] {
                let before = delivered(&victim.netns, s)?;
                forge(lab, &netns, s, to)?;
                std::thread::sleep(std::time::Duration::from_millis(200));
                let n = delivered(&victim.netns, s)? - before;
                if n < 2 * u64::from(COUNT) {
                    return Err(format!(
                        "{who} sending from its own address {s}: {n} of {} delivered",
                        2 * COUNT
                    ));
                }
            }
            remove_count_table(&victim.netns);
        }
        println!("  forged sources: {}", report.join("; "));
        Ok(())
    })
}

/// The node's own sockets (the input path, where the guard is the first rule of our input chain):
/// a pod no policy isolates sends to its node's address under the address of another pod of the
/// same node, and nothing gets past our chain; the owner of that address, sending the same, does.
/// (Where the kernel's reverse-path filter would not even look: a datagram that UDP early demux
/// hands to a connected socket skips routing.)
pub fn a_pod_reaches_no_socket_of_its_node_under_another_pods_address(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "forged sources to the node", |lab| {
        let attacker = lab.pod(ATTACKER).map_err(|e| e.to_string())?.clone();
        let owner = lab
            .pods()
            .find(|p| p.node == attacker.node && p.key() != attacker.key())
            .cloned()
            .ok_or("the model must place two pods on the attacker's node")?;
        let node = lab
            .node_state(&attacker.node)
            .map_err(|e| e.to_string())?
            .clone();
        let mut report = Vec::new();
        for fam in [Family::V4, Family::V6] {
            let pick = |ips: &[IpAddr]| fam.pick(ips).ok_or(format!("no {fam:?} address"));
            let borrowed = pick(&owner.ips)?;
            let to = match fam {
                Family::V4 => IpAddr::V4(lab::node_underlay_v4(node.index)),
                Family::V6 => IpAddr::V6(lab::node_underlay_v6(node.index)),
            };
            install_count_table_at(&node.netns, COUNT_PAST_OUR_INPUT, &[borrowed], |_| {
                "th dport { 80, 81 }"
            })?;
            let sent = 2 * u64::from(COUNT);
            let drops_before = guard_drops(lab, &node.name)?;
            forge(lab, &attacker.netns, borrowed, to)?;
            std::thread::sleep(Duration::from_millis(100));
            let dropped = guard_drops(lab, &node.name)? - drops_before;
            let n = delivered(&node.netns, borrowed)?;
            if n != 0 || dropped < sent {
                remove_count_table(&node.netns);
                return Err(format!(
                    "{fam:?}: {ATTACKER} sending to its node {to} as {} ({borrowed}): {n} of {sent} got past our input chain, the source guard counted {dropped}",
                    owner.key()
                ));
            }
            forge(lab, &owner.netns, borrowed, to)?;
            std::thread::sleep(Duration::from_millis(200));
            let n = delivered(&node.netns, borrowed)?;
            remove_count_table(&node.netns);
            if n < sent {
                return Err(format!(
                    "{fam:?}: {} sending to its node {to} from its own address {borrowed}: {n} of {sent} got past our input chain",
                    owner.key()
                ));
            }
            report.push(format!(
                "{fam:?}: as {borrowed} 0 of {sent} reached the node (the guard dropped them), the owner's {n} did"
            ));
        }
        println!("  forged sources to the node: {}", report.join("; "));
        Ok(())
    })
}

/// Makes x/a (the victim) admit the pods of y only; returns the pods of z, its attackers (on both
/// nodes, none admitted, none isolated).
fn admit_only_y(lab: &mut Lab, victim: &PodState) -> Result<Vec<PodState>, String> {
    let attackers: Vec<_> = lab.pods().filter(|p| p.namespace == "z").cloned().collect();
    if !attackers.iter().any(|p| p.node == victim.node)
        || !attackers.iter().any(|p| p.node != victim.node)
    {
        return Err("the model must place pods of z on both nodes".into());
    }
    apply(lab, vec![super::yaml(
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: admit-y, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}}",
    )])?;
    Ok(attackers)
}

/// Waits until x/a's policy is in force at its address `v` (TCP 80): `blocked` pods cannot reach
/// it, `admitted` ones can.
fn expect_victim_reach(
    lab: &Lab,
    v: IpAddr,
    blocked: &[PodState],
    admitted: &[&PodState],
) -> TestResult {
    let keys: Vec<(String, bool)> = blocked
        .iter()
        .map(|p| (p.key(), false))
        .chain(admitted.iter().map(|p| (p.key(), true)))
        .collect();
    let checks: Vec<(&str, Target, bool)> = keys
        .iter()
        .map(|(k, want)| (k.as_str(), target(VICTIM, v, 80, Protocol::Tcp), *want))
        .collect();
    expect_reach(lab, &checks)
}

/// Polls `count` for up to 3 s until it reaches COUNT: the last count, or `short(count)` as the
/// error once the time is up.
fn reaches_count(
    mut count: impl FnMut() -> Result<u64, String>,
    short: impl Fn(u64) -> String,
) -> Result<u64, String> {
    let mut n = 0;
    super::poll(Duration::from_secs(3), || {
        n = count()?;
        if n < u64::from(COUNT) {
            return Err(short(n));
        }
        Ok(())
    })?;
    Ok(n)
}

/// Removes the counting table from `netns` (gone with the lab anyway).
fn remove_count_table(netns: &str) {
    let _ = run(netns, &["nft", "delete", "table", "inet", COUNT_TABLE]);
}

/// VNI of the agent's overlay devices (`palisade_agent::overlay::VNI`).
const OVERLAY_VNI: u32 = 0x50_41_4c;

/// MAC of a node's overlay device (what the inner frame must be addressed to).
fn device_mac(node_netns: &str, device: &str) -> Result<String, String> {
    let out = run(node_netns, &["ip", "-j", "link", "show", device])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("ip -j link in {node_netns}: {e}"))?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .ok_or(format!("{device} in {node_netns} has no MAC: {out}"))
}

/// Packets the tunnel guard of a node dropped so far.
fn tunnel_drops(lab: &Lab, node: &str) -> Result<u64, String> {
    forged(lab, node, "overlay")
}

/// Sends COUNT VXLAN datagrams from `netns` to `node`'s overlay port, each a SYN from `source` to
/// `to`:80 for that node's device (over its IPv4 or IPv6 underlay address).
fn vxlan(
    lab: &Lab,
    netns: &str,
    underlay: IpAddr,
    mac: &str,
    source: IpAddr,
    to: IpAddr,
) -> Result<(), String> {
    let (IpAddr::V4(source), IpAddr::V4(to)) = (source, to) else {
        return Err("the inner packet is IPv4".into());
    };
    let probe = lab.state().bins.probe();
    run(
        netns,
        &[
            &probe.to_string_lossy(),
            "vxlan",
            "--to",
            &SocketAddr::new(underlay, lab::OVERLAY_UDP_PORT).to_string(),
            "--vni",
            &OVERLAY_VNI.to_string(),
            "--mac",
            mac,
            "--source",
            &source.to_string(),
            "--count",
            &COUNT.to_string(),
            &SocketAddr::new(to.into(), 80).to_string(),
        ],
    )?;
    Ok(())
}

/// A pod (a plain UDP socket is enough) sending VXLAN to a node's overlay port, the inner packet
/// under an address the victim admits, over either underlay family: the node's input chain drops
/// it before the VXLAN socket decapsulates it, and counts it. The same datagram from a node's own
/// address is decapsulated and delivered, so the packet is well formed and only its sender
/// decides. (Every node runs the overlay device, with or without peers: its socket listens.)
pub fn forged_overlay_packets_are_dropped_before_decapsulation(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "forged overlay packets", |lab| {
        let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
        let nodes = lab.state().nodes.clone();
        let victim_node = lab
            .node_state(&victim.node)
            .map_err(|e| e.to_string())?
            .clone();
        let other_node = nodes
            .iter()
            .find(|n| n.name != victim.node)
            .ok_or("a second node is needed")?
            .clone();
        let admitted = lab
            .pods()
            .find(|p| p.namespace == "y")
            .cloned()
            .ok_or("the model has pods in y")?;
        let attackers = admit_only_y(lab, &victim)?;
        let victim4 = pod_ip(lab, VICTIM, Family::V4)?;
        let source = pod_ip(lab, &admitted.key(), Family::V4)?;
        expect_victim_reach(lab, victim4, &attackers, &[&admitted])?;
        install_counters(&victim.netns, &[source])?;
        let mut report = Vec::new();
        for (underlay, device) in [
            (
                IpAddr::V4(lab::node_underlay_v4(victim_node.index)),
                "vxlan.palisade",
            ),
            (
                IpAddr::V6(lab::node_underlay_v6(victim_node.index)),
                "vxlan6.palisade",
            ),
        ] {
            let mac = device_mac(&victim_node.netns, device)?;
            for a in &attackers {
                let drops = tunnel_drops(lab, &victim_node.name)?;
                let before = delivered(&victim.netns, source)?;
                vxlan(lab, &a.netns, underlay, &mac, source, victim4)?;
                // Every datagram counted as dropped: none is still on its way.
                let counted = reaches_count(
                    || Ok(tunnel_drops(lab, &victim_node.name)? - drops),
                    |dropped| {
                        format!(
                            "{} sent {COUNT} VXLAN datagrams to {underlay}: the tunnel guard of {} counted {dropped}",
                            a.key(),
                            victim_node.name
                        )
                    },
                );
                let n = delivered(&victim.netns, source)? - before;
                if n != 0 {
                    return Err(format!(
                        "{} sent VXLAN to {underlay} ({device}) carrying SYNs from {source}: {n} of {COUNT} reached {VICTIM}",
                        a.key()
                    ));
                }
                counted?;
            }
            // The other node may: its datagram is decapsulated and the SYN meets x/a's policy,
            // which admits y.
            let before = delivered(&victim.netns, source)?;
            let from_node = match underlay {
                IpAddr::V4(_) => IpAddr::V4(lab::node_underlay_v4(other_node.index)),
                IpAddr::V6(_) => IpAddr::V6(lab::node_underlay_v6(other_node.index)),
            };
            vxlan(lab, &other_node.netns, underlay, &mac, source, victim4)?;
            reaches_count(
                || Ok(delivered(&victim.netns, source)? - before),
                |n| {
                    format!(
                        "{} ({from_node}) sent VXLAN to {underlay} ({device}): {n} of {COUNT} inner SYNs delivered; the crafted datagram must be what a node sends",
                        other_node.name
                    )
                },
            )?;
            report.push(format!(
                "{device} at {underlay}: {} pods' datagrams dropped, {}'s delivered",
                attackers.len(),
                other_node.name
            ));
        }
        // An address of the victim's node that is not an InternalIP: egress NAT masquerades a
        // pod's datagram to it, which then arrives from the pod's node, a peer. Only datagrams to
        // our InternalIP are the overlay's.
        let extra = IpAddr::V4(lab::node_underlay_v4(201));
        let extra_cidr = format!("{extra}/32");
        run(
            &victim_node.netns,
            &["ip", "addr", "add", &extra_cidr, "dev", "eth0"],
        )?;
        let masqueraded = (|| {
            let mac = device_mac(&victim_node.netns, "vxlan.palisade")?;
            let remote: Vec<&PodState> =
                attackers.iter().filter(|a| a.node != victim.node).collect();
            if remote.is_empty() {
                return Err("the model must place a pod of z on the other node".to_string());
            }
            for a in &remote {
                let drops = tunnel_drops(lab, &victim_node.name)?;
                let before = delivered(&victim.netns, source)?;
                vxlan(lab, &a.netns, extra, &mac, source, victim4)?;
                let counted = reaches_count(
                    || Ok(tunnel_drops(lab, &victim_node.name)? - drops),
                    |dropped| {
                        format!(
                            "{} sent {COUNT} VXLAN datagrams to {extra} (an address of {}, not its InternalIP; masqueraded by {}): the tunnel guard counted {dropped}",
                            a.key(),
                            victim_node.name,
                            a.node
                        )
                    },
                );
                let n = delivered(&victim.netns, source)? - before;
                if n != 0 {
                    return Err(format!(
                        "{} sent VXLAN to {extra} (an address of {}, not its InternalIP; masqueraded by {} to its own address) carrying SYNs from {source}: {n} of {COUNT} reached {VICTIM}",
                        a.key(),
                        victim_node.name,
                        a.node
                    ));
                }
                counted?;
            }
            Ok(format!(
                "to {extra} (not an InternalIP): {} masqueraded pods' datagrams dropped",
                remote.len()
            ))
        })();
        let removed = run(
            &victim_node.netns,
            &["ip", "addr", "del", &extra_cidr, "dev", "eth0"],
        );
        report.push(masqueraded?);
        removed?;
        remove_count_table(&victim.netns);
        println!("  forged overlay packets: {}", report.join("; "));
        Ok(())
    })
}

/// Counts, per source address, ICMP (ICMPv6) destination-unreachable errors arriving in `netns`.
fn install_icmp_counters(netns: &str, sources: &[IpAddr]) -> Result<(), String> {
    install_count_table(netns, sources, |s| {
        if s.is_ipv4() {
            "icmp type destination-unreachable"
        } else {
            "icmpv6 type destination-unreachable"
        }
    })
}

/// Related packets dropped so far by a node's related chain.
fn related_drops(lab: &Lab, node: &str) -> Result<u64, String> {
    forged(lab, node, "related")
}

/// Sends COUNT port-unreachable errors from `netns` to `to`, quoting `quoted_src` → `quoted_dst`.
fn icmp_error(
    lab: &Lab,
    netns: &str,
    to: IpAddr,
    quoted_src: SocketAddr,
    quoted_dst: SocketAddr,
) -> Result<(), String> {
    let probe = lab.state().bins.probe();
    run(
        netns,
        &[
            &probe.to_string_lossy(),
            "icmp-error",
            "--quoted-src",
            &quoted_src.to_string(),
            "--quoted-dst",
            &quoted_dst.to_string(),
            "--count",
            &COUNT.to_string(),
            &to.to_string(),
        ],
    )?;
    Ok(())
}

/// Conntrack marks an ICMP error related to the connection it quotes, whoever sends it: a pod the
/// victim's policy denies (the pods of z) quoting the victim's own UDP flow to an admitted peer
/// gets its errors, and whatever bytes follow the quote, dropped on its node and counted; the
/// peer, an endpoint of that flow, still gets the same error through. Both families.
pub fn icmp_errors_pass_only_from_an_endpoint_of_their_connection(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "ICMP errors", |lab| {
        let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
        let nodes = lab.state().nodes.clone();
        // The admitted peer on the other node, so both nodes track the victim's flow.
        let peer = lab
            .pods()
            .find(|p| p.namespace == "y" && p.node != victim.node)
            .cloned()
            .ok_or("the model must place a pod of y on a second node")?;
        let attackers = admit_only_y(lab, &victim)?;
        let drops_of_nodes = |lab: &Lab| -> Result<u64, String> {
            nodes.iter().map(|n| related_drops(lab, &n.name)).sum()
        };
        let probe = lab.state().bins.probe();
        let mut report = Vec::new();
        for (i, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
            let pick = |ips: &[IpAddr]| fam.pick(ips).ok_or(format!("no {fam:?} address"));
            let v = pick(&victim.ips)?;
            let y = pick(&peer.ips)?;
            expect_victim_reach(lab, v, &attackers, &[&peer])?;
            // The victim's flow: one datagram from a known port to the peer's UDP 81.
            let quoted_src = SocketAddr::new(v, 5555 + i as u16);
            let quoted_dst = SocketAddr::new(y, 81);
            // Lab nodes expire a UDP entry 1 s after its last packet (`LAB_UDP_CT_TIMEOUT`) and
            // an ICMP error does not refresh it, so the flow is sent again before each sender's
            // errors: once per family, a slow run (a debug-built agent sweeping its conntrack
            // table at the same time) let the entry expire before the last attacker's turn, and
            // the errors were dropped as invalid instead of by the related chain.
            let refresh_flow = || -> TestResult {
                run(
                    &victim.netns,
                    &[
                        &probe.to_string_lossy(),
                        "forge",
                        "--source",
                        &v.to_string(),
                        "--source-port",
                        &quoted_src.port().to_string(),
                        "--count",
                        "1",
                        &format!("udp:{quoted_dst}"),
                    ],
                )?;
                std::thread::sleep(std::time::Duration::from_millis(100));
                Ok(())
            };
            let mut sources: Vec<IpAddr> = attackers
                .iter()
                .map(|a| pick(&a.ips))
                .collect::<Result<_, _>>()?;
            sources.push(y);
            install_icmp_counters(&victim.netns, &sources)?;
            for a in &attackers {
                let s = pick(&a.ips)?;
                let drops = drops_of_nodes(lab)?;
                refresh_flow()?;
                icmp_error(lab, &a.netns, v, quoted_src, quoted_dst)?;
                // Every error counted as dropped: none is still on its way.
                let counted = reaches_count(
                    || Ok(drops_of_nodes(lab)? - drops),
                    |dropped| {
                        format!(
                            "{} ({fam:?}, on {}; {VICTIM} on {}) sent {COUNT} ICMP errors quoting {VICTIM}'s flow {quoted_src} -> {quoted_dst}: the related chains counted {dropped}",
                            a.key(),
                            a.node,
                            victim.node
                        )
                    },
                );
                let n = delivered(&victim.netns, s)?;
                if n != 0 {
                    return Err(format!(
                        "{} ({s}) quoting {VICTIM}'s flow {quoted_src} -> {quoted_dst}: {n} of {COUNT} ICMP errors reached {VICTIM}, whose policy denies it",
                        a.key()
                    ));
                }
                counted?;
            }
            refresh_flow()?;
            icmp_error(lab, &peer.netns, v, quoted_src, quoted_dst)?;
            let n = reaches_count(
                || delivered(&victim.netns, y),
                |n| {
                    format!(
                        "{} ({y}), the other end of {quoted_src} -> {quoted_dst}: {n} of {COUNT} of its ICMP errors delivered",
                        peer.key()
                    )
                },
            )?;
            report.push(format!(
                "{fam:?}: {} attackers' errors dropped, the peer's {n} delivered",
                attackers.len()
            ));
        }
        remove_count_table(&victim.netns);
        println!("  ICMP errors: {}", report.join("; "));
        Ok(())
    })
}

/// Neighbour discovery is link-local: a message of its types (router solicitation to redirect)
/// addressed to another pod is forwarded by the node, and was accepted before any policy. The
/// pods of z, which x/a's policy denies, send 20 neighbour solicitations and 20 router
/// advertisements each (hop limit 255, bytes after the target) to x/a's IPv6 address: none
/// arrive. A pod of y, which the policy admits, sends the same and they do (the messages are
/// forwarded and meet the policy as any packet does). IPv6 between the pods still works (its
/// own neighbour discovery on each link).
pub fn neighbour_discovery_messages_are_never_forwarded_past_policy(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "neighbour discovery", |lab| {
        let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
        let attackers = admit_only_y(lab, &victim)?;
        let admitted = lab
            .pods()
            .find(|p| p.namespace == "y")
            .cloned()
            .ok_or("the model must have a pod of y")?;
        let pick = |ips: &[IpAddr]| Family::V6.pick(ips).ok_or("no IPv6 address".to_string());
        let v = pick(&victim.ips)?;
        let IpAddr::V6(v6) = v else {
            return Err(format!("{v} is not IPv6"));
        };
        expect_victim_reach(lab, v, &attackers, &[&admitted])?;
        let mut sources: Vec<IpAddr> = attackers
            .iter()
            .map(|a| pick(&a.ips))
            .collect::<Result<_, _>>()?;
        let y = pick(&admitted.ips)?;
        sources.push(y);
        install_count_table(&victim.netns, &sources, |_| "icmpv6 type { 134, 135 }")?;
        let probe = lab.state().bins.probe();
        let send = |netns: &str| -> Result<(), String> {
            for icmp_type in ["134", "135"] {
                run(
                    netns,
                    &[
                        &probe.to_string_lossy(),
                        "nd",
                        "--type",
                        icmp_type,
                        "--count",
                        &COUNT.to_string(),
                        &v6.to_string(),
                    ],
                )?;
            }
            Ok(())
        };
        for a in &attackers {
            send(&a.netns)?;
        }
        send(&admitted.netns)?;
        // The admitted pod's messages arrive: once they have, the attackers' had their time.
        let mut n = 0;
        super::poll(Duration::from_secs(3), || {
            n = delivered(&victim.netns, y)?;
            if n < u64::from(2 * COUNT) {
                return Err(format!(
                    "{} ({y}), admitted by {VICTIM}'s policy: {n} of {} of its neighbour discovery messages arrived",
                    admitted.key(),
                    2 * COUNT
                ));
            }
            Ok(())
        })?;
        for a in &attackers {
            let s = pick(&a.ips)?;
            let got = delivered(&victim.netns, s)?;
            if got != 0 {
                return Err(format!(
                    "{} ({s}, on {}; {VICTIM} on {}): {got} of {} neighbour discovery messages with a payload reached {VICTIM}, whose policy denies it",
                    a.key(),
                    a.node,
                    victim.node,
                    2 * COUNT
                ));
            }
        }
        remove_count_table(&victim.netns);
        println!(
            "  neighbour discovery: {} attackers' messages dropped, the admitted pod's {n} delivered",
            attackers.len()
        );
        Ok(())
    })
}

/// A pod reaching itself is always allowed (semantics 38), but only from its own veth: another
/// host that routes to the pod (here the other node, as any host on the underlay or a network
/// that routes the pod CIDRs could) writing the pod's own address as source and destination gets
/// through while the pod is not isolated (the control: the packets are well formed and routed)
/// and not at all once a policy isolates it, in either family. Nor does one writing the pod's
/// node's addresses as source (traffic from the pod's own node is always allowed, semantics 39:
/// from the node itself, not from whoever claims its address).
pub fn a_pod_is_not_reached_under_its_own_address_from_another_host(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "self-addressed packets", |lab| {
        let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
        let other = lab
            .state()
            .nodes
            .iter()
            .find(|n| n.name != victim.node)
            .cloned()
            .ok_or("a second node is needed")?;
        let victim_node = lab
            .node_state(&victim.node)
            .map_err(|e| e.to_string())?
            .clone();
        let node_addrs = [
            IpAddr::V4(lab::node_underlay_v4(victim_node.index)),
            IpAddr::V6(lab::node_underlay_v6(victim_node.index)),
        ];
        let counted: Vec<IpAddr> = victim.ips.iter().chain(&node_addrs).copied().collect();
        // Only what came in from the wire: the pod's answers to itself go through lo.
        install_count_table(&victim.netns, &counted, |_| {
            "iifname \"eth0\" th dport { 80, 81 }"
        })?;
        let mut report = Vec::new();
        for &own in &victim.ips {
            forge(lab, &other.netns, own, own)?;
            let n = reaches_count(
                || delivered(&victim.netns, own),
                |n| {
                    format!(
                        "control: {} sent packets from {own} to {own} ({VICTIM}, not isolated yet): {n} arrived",
                        other.name
                    )
                },
            )?;
            report.push(format!("{own}: {n} arrived while not isolated"));
        }
        let attackers = admit_only_y(lab, &victim)?;
        let v4 = Family::V4.pick(&victim.ips).unwrap_or(victim.ips[0]);
        expect_victim_reach(lab, v4, &attackers, &[])?;
        for &own in &victim.ips {
            let before = delivered(&victim.netns, own)?;
            forge(lab, &other.netns, own, own)?;
            std::thread::sleep(Duration::from_millis(300));
            let n = delivered(&victim.netns, own)? - before;
            if n != 0 {
                return Err(format!(
                    "{} sent packets from {own} to {own}: {n} reached {VICTIM}, whose policy admits only y (a pod reaches itself only from its own veth)",
                    other.name
                ));
            }
            report.push(format!("{own}: none once isolated"));
        }
        for &node_addr in &node_addrs {
            let Some(&own) = victim
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == node_addr.is_ipv4())
            else {
                continue;
            };
            forge(lab, &other.netns, node_addr, own)?;
            std::thread::sleep(Duration::from_millis(300));
            let n = delivered(&victim.netns, node_addr)?;
            if n != 0 {
                return Err(format!(
                    "{} sent packets from {node_addr} ({}'s address) to {own}: {n} reached {VICTIM}, whose policy admits only y",
                    other.name, victim_node.name
                ));
            }
            report.push(format!("from {node_addr} ({}): none", victim_node.name));
        }
        remove_count_table(&victim.netns);
        println!("  self-addressed packets: {}", report.join("; "));
        Ok(())
    })
}

/// The node is its pods' router. A node set to take router advertisements while forwarding
/// (`accept_ra=2`, which new interfaces inherit from `default`) would take a pod's: a default
/// route through the pod, the node's own traffic to it. x/a's host veth gets `accept_ra=2`; x/a
/// sends 20 router advertisements (router lifetime 1800 s) to its gateway `fe80::1`: its node
/// counts them as `router` and has no route through x/a.
pub fn a_pod_cannot_advertise_itself_as_its_nodes_router(lab: &mut Lab) -> TestResult {
    let victim = lab.pod(VICTIM).map_err(|e| e.to_string())?.clone();
    let node = lab
        .node_state(&victim.node)
        .map_err(|e| e.to_string())?
        .clone();
    let veth = palisade_contract::host_veth_name(&victim.container_id, "eth0");
    let key = format!("net.ipv6.conf.{veth}.accept_ra");
    let was = run(&node.netns, &["sysctl", "-n", &key])?;
    run(&node.netns, &["sysctl", "-qw", &format!("{key}=2")])?;
    let r = (|| {
        let before = forged(lab, &node.name, "router")?;
        let probe = lab.state().bins.probe();
        run(
            &victim.netns,
            &[
                &probe.to_string_lossy(),
                "router-advert",
                "--dev",
                "eth0",
                "--count",
                &COUNT.to_string(),
                "fe80::1",
            ],
        )?;
        reaches_count(
            || Ok(forged(lab, &node.name, "router")? - before),
            |n| {
                format!(
                    "{VICTIM} sent {COUNT} router advertisements to its gateway: {} counted {n} as router",
                    node.name
                )
            },
        )?;
        let routes = run(&node.netns, &["ip", "-6", "route", "show", "dev", &veth])?;
        if routes
            .lines()
            .any(|l| l.starts_with("default") || l.contains("proto ra"))
        {
            return Err(format!(
                "{VICTIM}'s router advertisements gave {} routes through it: {routes}",
                node.name
            ));
        }
        println!(
            "  router advertisements: {COUNT} from {VICTIM} counted and dropped, no route through it"
        );
        Ok(())
    })();
    let restored = run(
        &node.netns,
        &["sysctl", "-qw", &format!("{key}={}", was.trim())],
    );
    r.and(restored.map(|_| ()))
}
