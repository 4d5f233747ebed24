//! Pods a cluster has and a plain lab pod is not (issue 12, "a lab that behaves like a cluster"):
//! a `hostPort` served through the conflist's chained `portmap`, a `hostNetwork` pod (semantics 40
//! and 39), and a terminated pod whose address a new pod reuses (semantics 21).

use super::{apply, expect_reach, pod_ip, policy, poll, target, yaml, TestResult};
use palisade_netns_tests::cases;
use palisade_netns_tests::k8s::{self, ObjKey, PodPhase};
use palisade_netns_tests::lab::{self, Family, Lab};
use palisade_netns_tests::probe::{Protocol, Target};
use std::net::IpAddr;

/// Host ports of the hostPort pod (TCP and UDP), mapped to its container ports 80 and 81.
const HOST_PORT_TCP: u16 = 18080;
const HOST_PORT_UDP: u16 = 18081;

/// Node 1's InternalIPs (the external host reaches them through the router).
fn node1_ips(lab: &Lab) -> Result<(IpAddr, IpAddr), String> {
    let n = lab.node_state("node1").map_err(|e| e.to_string())?;
    Ok((
        IpAddr::V4(lab::node_underlay_v4(n.index)),
        IpAddr::V6(lab::node_underlay_v6(n.index)),
    ))
}

/// Probes `targets` from the external host until each answers as expected: `Some(name)`
/// connected and answered by that pod, `None` blocked (bounded by CONVERGENCE).
fn expect_from_external(lab: &Lab, checks: &[(Target, Option<&str>)]) -> TestResult {
    let ext = lab
        .state()
        .external
        .as_ref()
        .ok_or("the lab has no external network")?
        .netns
        .clone();
    let targets: Vec<Target> = checks.iter().map(|(t, _)| t.clone()).collect();
    poll(cases::CONVERGENCE, || {
        let out = lab
            .probe_from_netns(&ext, &targets, lab::DEFAULT_PROBE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut wrong = Vec::new();
        for ((t, want), o) in checks.iter().zip(&out) {
            let got = o.connected.then(|| o.reply.clone().unwrap_or_default());
            if got.as_deref() != *want {
                wrong.push(format!(
                    "external -> {} {} ({}): expected {}, observed {} ({:?})",
                    t.addr,
                    t.protocol,
                    t.id,
                    want.map_or("blocked".to_string(), |w| format!("an answer from {w}")),
                    got.map_or("blocked".to_string(), |g| format!("an answer from {g:?}")),
                    o.error
                ));
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("\n"))
        }
    })
}

/// Removes the test's pods (whatever phase they reached) and every policy, then checks the
/// baseline of the model pods: what every test here leaves behind.
fn cleanup(lab: &mut Lab, what: &str, pods: &[(&str, &str)], r: TestResult) -> TestResult {
    let mut errors = Vec::new();
    for (ns, name) in pods {
        let key = ObjKey::new("Pod", ns, name);
        if lab.read_object(&key).is_ok() {
            if let Err(e) = lab.delete_key(&key) {
                errors.push(format!("deleting {ns}/{name}: {e}"));
            }
        }
    }
    if let Err(e) = lab.delete_all_policies() {
        errors.push(format!("deleting policies: {e}"));
    }
    let c = if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{what} cleanup: {}", errors.join("; ")))
    };
    let b = cases::check_baseline(lab, Family::V4, &format!("{what}: baseline after cleanup"));
    r.and(c).and(b)
}

/// The NAT table of a node namespace, as iptables-save prints it (where portmap writes).
fn nat_rules(lab: &Lab, node: &str, tool: &str) -> Result<String, String> {
    let n = lab.node_state(node).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &n.netns, tool, "-t", "nat"])
        .output()
        .map_err(|e| format!("{tool} in {}: {e}", n.netns))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} in {}: {}",
            n.netns,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `hostPort` works only when the runtime runs the agent's whole conflist (palisade, then
/// portmap with `runtimeConfig.portMappings`): the external host reaches the pod at node1's
/// address:hostPort over TCP and UDP, IPv4 and IPv6; the pod's ingress policy applies after
/// portmap's DNAT (semantics 27); DEL in reverse order removes portmap's rules.
pub fn host_port_reaches_the_pod_through_the_chained_portmap(lab: &mut Lab) -> TestResult {
    let pod = yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hp, namespace: x, labels: {{pod: hp}}}}\nspec:\n  nodeName: node1\n  containers:\n  - name: web\n    ports:\n    - {{containerPort: 80, hostPort: {HOST_PORT_TCP}}}\n    - {{containerPort: 81, protocol: UDP, hostPort: {HOST_PORT_UDP}}}\n"
    ));
    let r = (|| {
        let (n4, n6) = node1_ips(lab)?;
        apply(lab, vec![pod])?;
        lab.wait_pods_ready(cases::CONVERGENCE)
            .map_err(|e| e.to_string())?;
        let tcp4 = target("hostPort", n4, HOST_PORT_TCP, Protocol::Tcp);
        let tcp6 = target("hostPort", n6, HOST_PORT_TCP, Protocol::Tcp);
        let udp4 = target("hostPort", n4, HOST_PORT_UDP, Protocol::Udp);
        expect_from_external(
            lab,
            &[
                (tcp4.clone(), Some("x/hp")),
                (tcp6.clone(), Some("x/hp")),
                (udp4.clone(), Some("x/hp")),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: hp-deny, namespace: x}, spec: {podSelector: {matchLabels: {pod: hp}}, policyTypes: [Ingress]}}",
        ))?;
        expect_from_external(lab, &[(tcp4.clone(), None), (udp4.clone(), None)])?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: hp-external, namespace: x}, spec: {podSelector: {matchLabels: {pod: hp}}, policyTypes: [Ingress], ingress: [{from: [{ipBlock: {cidr: 192.168.77.0/24}}]}]}}",
        ))?;
        expect_from_external(lab, &[(tcp4, Some("x/hp")), (tcp6, None)])?;
        let (p4, p6) = (
            pod_ip(lab, "x/hp", Family::V4)?,
            pod_ip(lab, "x/hp", Family::V6)?,
        );
        let dnat4 = format!("--to-destination {p4}:80");
        let dnat6 = format!("--to-destination [{p6}]:80");
        if !nat_rules(lab, "node1", "iptables-save")?.contains(&dnat4) {
            return Err(format!("node1 has no portmap DNAT {dnat4} while x/hp runs"));
        }
        lab.delete_key(&ObjKey::new("Pod", "x", "hp"))
            .map_err(|e| format!("deleting x/hp (CNI DEL of the chain): {e}"))?;
        let v4 = nat_rules(lab, "node1", "iptables-save")?;
        let v6 = nat_rules(lab, "node1", "ip6tables-save")?;
        if v4.contains(&dnat4) || v6.contains(&dnat6) {
            return Err(format!(
                "portmap's DNAT to x/hp outlived its DEL:\n{v4}\n{v6}"
            ));
        }
        Ok(())
    })();
    cleanup(lab, "hostPort", &[("x", "hp")], r)
}

/// Semantics 40 and 39: a hostNetwork pod is its node to policy. Selected by a namespace-wide
/// deny-all it is still not isolated either way; it reaches an isolated pod on its own node (from
/// this node) but one on another node only where an ipBlock admits the node's address, never
/// through a pod selector matching its labels.
pub fn host_network_pod_is_never_isolated_and_meets_policies_as_its_node(
    lab: &mut Lab,
) -> TestResult {
    let pod = yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hn, namespace: x, labels: {pod: hn}}\nspec:\n  nodeName: node1\n  hostNetwork: true\n  containers:\n  - name: agent\n    ports: [{containerPort: 80}]\n",
    );
    let r = (|| {
        let (n4, n6) = node1_ips(lab)?;
        apply(lab, vec![pod])?;
        let hn = lab.pod("x/hn").map_err(|e| e.to_string())?;
        let node1 = lab.node_state("node1").map_err(|e| e.to_string())?;
        if hn.netns != node1.netns || hn.ips != [n4, n6] {
            return Err(format!(
                "x/hn runs in {} with {:?}; a hostNetwork pod runs in its node's namespace ({}) with its addresses",
                hn.netns, hn.ips, node1.netns
            ));
        }
        let obj = lab
            .read_object(&ObjKey::new("Pod", "x", "hn"))
            .map_err(|e| e.to_string())?;
        if k8s::get_str(&obj, &["status", "podIP"]) != Some(n4.to_string().as_str()) {
            return Err(format!(
                "x/hn's status.podIP is not node1's address: {obj:?}"
            ));
        }
        let (xa, xb) = (
            pod_ip(lab, "x/a", Family::V4)?,
            pod_ip(lab, "x/b", Family::V4)?,
        );
        let ya = pod_ip(lab, "y/a", Family::V4)?;
        let xb6 = pod_ip(lab, "x/b", Family::V6)?;
        let to_xa = target("x/a", xa, 80, Protocol::Tcp);
        let to_xb = target("x/b", xb, 80, Protocol::Tcp);
        let to_xb6 = target("x/b", xb6, 80, Protocol::Tcp);
        let to_hn = target("x/hn", n4, 80, Protocol::Tcp);
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-all, namespace: x}, spec: {podSelector: {}, policyTypes: [Ingress, Egress]}}",
        ))?;
        expect_reach(
            lab,
            &[
                ("x/hn", to_xa.clone(), true),
                ("x/hn", to_xb.clone(), false),
                ("y/a", to_hn, true),
                ("x/hn", target("y/a", ya, 80, Protocol::Tcp), true),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: b-from-labels, namespace: x}, spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: hn}}}, {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: a}}}]}]}}",
        ))?;
        expect_reach(
            lab,
            &[("y/a", to_xb.clone(), true), ("x/hn", to_xb.clone(), false)],
        )?;
        apply(lab, policy(&format!(
            "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: b-from-node1, namespace: x}}, spec: {{podSelector: {{matchLabels: {{pod: b}}}}, policyTypes: [Ingress], ingress: [{{from: [{{ipBlock: {{cidr: {n4}/32}}}}]}}]}}}}"
        )))?;
        expect_reach(
            lab,
            &[
                ("x/hn", to_xb, true),
                ("x/hn", to_xb6, false),
                ("x/hn", to_xa, true),
            ],
        )?;
        Ok(())
    })();
    cleanup(lab, "hostNetwork", &[("x", "hn")], r)
}

/// Semantics 21 with a terminated pod: a Succeeded pod keeps its address in `status.podIPs`
/// while its sandbox is gone; a new pod asking for that address gets it, and only the new pod's
/// policies and peer rules apply to it, never the old one's.
pub fn terminated_pods_address_reused_carries_only_the_new_pods_policies(
    lab: &mut Lab,
) -> TestResult {
    let pod = |name: &str, annotations: &str| {
        yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{pod: {name}}}, annotations: {{{annotations}}}}}\nspec:\n  nodeName: node1\n  containers:\n  - name: c\n    ports: [{{containerPort: 80}}, {{containerPort: 81}}]\n"
        ))
    };
    let r = (|| {
        apply(lab, vec![pod("old", "")])?;
        lab.wait_pods_ready(cases::CONVERGENCE)
            .map_err(|e| e.to_string())?;
        let old = pod_ip(lab, "x/old", Family::V4)?;
        let xb = pod_ip(lab, "x/b", Family::V4)?;
        apply(lab, vec![
            yaml("{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: old-no-egress, namespace: x}, spec: {podSelector: {matchLabels: {pod: old}}, policyTypes: [Egress]}}"),
            yaml("{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: new-no-ingress, namespace: x}, spec: {podSelector: {matchLabels: {pod: new}}, policyTypes: [Ingress]}}"),
            yaml("{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: b-allow, namespace: x}, spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: new}}}], ports: [{port: 80}]}, {from: [{podSelector: {matchLabels: {pod: old}}}], ports: [{port: 81}]}]}}"),
        ])?;
        let to_reused = |port| target("reused address", old, port, Protocol::Tcp);
        let to_xb = |port| target("x/b", xb, port, Protocol::Tcp);
        expect_reach(
            lab,
            &[
                ("y/a", to_reused(80), true),
                ("x/old", to_xb(81), false),
                ("y/a", to_xb(80), false),
            ],
        )?;
        lab.set_pod_phase("x", "old", PodPhase::Succeeded)
            .map_err(|e| format!("x/old -> Succeeded: {e}"))?;
        let obj = lab
            .read_object(&ObjKey::new("Pod", "x", "old"))
            .map_err(|e| e.to_string())?;
        if k8s::phase(&obj) != Some(PodPhase::Succeeded)
            || k8s::get_str(&obj, &["status", "podIP"]) != Some(old.to_string().as_str())
        {
            return Err(format!(
                "x/old should be Succeeded and keep podIP {old}: {:?}",
                obj.get("status")
            ));
        }
        if lab.pod("x/old").is_ok() {
            return Err("x/old still has a sandbox after it terminated".into());
        }
        // The new pod is created Pending (no sandbox, no address), then started asking for the
        // terminated pod's address.
        apply(
            lab,
            vec![pod(
                "new",
                &format!(
                    "{}: Pending, {}: '{old}'",
                    k8s::PHASE_ANNOTATION,
                    k8s::IPS_ANNOTATION
                ),
            )],
        )?;
        let obj = lab
            .read_object(&ObjKey::new("Pod", "x", "new"))
            .map_err(|e| e.to_string())?;
        if k8s::phase(&obj) != Some(PodPhase::Pending)
            || k8s::get_str(&obj, &["status", "podIP"]).is_some()
        {
            return Err(format!(
                "x/new should be Pending without an IP: {:?}",
                obj.get("status")
            ));
        }
        lab.set_pod_phase("x", "new", PodPhase::Running)
            .map_err(|e| format!("x/new -> Running: {e}"))?;
        lab.wait_pods_ready(cases::CONVERGENCE)
            .map_err(|e| e.to_string())?;
        let new = pod_ip(lab, "x/new", Family::V4)?;
        if new != old {
            return Err(format!("x/new asked for {old} and got {new}"));
        }
        expect_reach(
            lab,
            &[
                ("y/a", to_reused(80), false),
                ("x/new", to_xb(80), true),
                ("x/new", to_xb(81), false),
            ],
        )
    })();
    cleanup(lab, "terminated pod", &[("x", "new"), ("x", "old")], r)
}

/// The index of `eth0` in a pod's namespace: the scope of its link-local gateway.
fn eth0_index(netns: &str) -> Result<u32, String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "dev", "eth0"])
        .output()
        .map_err(|e| format!("running ip -n {netns} link show: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no eth0 index in {netns}: {text:?}"))
}

/// A node's services listening on `::` (the kubelet does) answer at every address of the node,
/// the pod veth's `fe80::1` too, and a pod reaches that one from its own link-local address,
/// which the source guard lets through (neighbour discovery) and no address map holds. An
/// egress-isolated pod's packet to it takes its pod's egress verdict: a deny-all denies it, an
/// egress rule that covers it (`::/0`) allows it.
pub fn an_egress_isolated_pod_reaches_no_node_service_at_its_link_local_gateway(
    lab: &mut Lab,
) -> TestResult {
    let r = (|| {
        let xa = lab.pod("x/a").map_err(|e| e.to_string())?;
        let (xa_node, xa_netns) = (xa.node.clone(), xa.netns.clone());
        let node = lab.node_state(&xa_node).map_err(|e| e.to_string())?;
        let n6 = IpAddr::V6(lab::node_underlay_v6(node.index));
        apply(
            lab,
            vec![yaml(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: svc, namespace: y, labels: {{pod: svc}}}}\nspec:\n  nodeName: {}\n  hostNetwork: true\n  containers:\n  - name: s\n    ports: [{{containerPort: 80}}]\n",
                xa_node
            ))],
        )?;
        let gateway = std::net::SocketAddrV6::new(
            "fe80::1".parse().map_err(|e| format!("{e}"))?,
            80,
            0,
            eth0_index(&xa_netns)?,
        );
        let to_gateway = Target {
            id: "y/svc at fe80::1".to_string(),
            addr: gateway.into(),
            protocol: Protocol::Tcp,
        };
        let to_node = target("y/svc", n6, 80, Protocol::Tcp);
        expect_reach(
            lab,
            &[
                ("x/a", to_gateway.clone(), true),
                ("x/a", to_node.clone(), true),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: a-no-egress, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}}",
        ))?;
        expect_reach(
            lab,
            &[
                ("x/a", to_node.clone(), false),
                ("x/a", to_gateway.clone(), false),
                ("x/b", to_node.clone(), true),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: a-no-egress, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]}}",
        ))?;
        expect_reach(lab, &[("x/a", to_gateway, true), ("x/a", to_node, true)])
    })();
    cleanup(lab, "link-local gateway", &[("y", "svc")], r)
}
