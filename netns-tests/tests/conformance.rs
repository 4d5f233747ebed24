//! Conformance: every connectivity case of the upstream NetworkPolicy e2e suite (T01-T42, U1-U3,
//! from `cases/upstream.yaml`), our own cases of the same shape (`cases/extra.yaml`: label grant and
//! revoke, IPv6) and the cases that need lab actions of their own (node probes, a ClusterIP
//! stand-in, an external network reached by ipBlock, pods created after the policy, SCTP at rule
//! level), all against ONE two-node lab holding the 3x3 model.
//!
//! A custom harness (harness = false) so one lab serves every case and is torn down at the end:
//! `cargo test -p palisade-netns-tests --test conformance [FILTER]`. Needs root and the binaries:
//! run `cargo build --workspace --bins` first (or point PALISADE_BIN_DIR at them).

use palisade_netns_tests::cases::{self, Case, MODEL_PORTS};
use palisade_netns_tests::k8s;
use palisade_netns_tests::lab::{self, Family, Lab, LabOptions};
use palisade_netns_tests::probe::{Protocol, Target};
use palisade_netns_tests::suite;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "conformance/cluster_pods.rs"]
mod cluster_pods;
#[path = "conformance/flow_log.rs"]
mod flow_log;
#[path = "conformance/forged.rs"]
mod forged;
#[path = "conformance/overlay.rs"]
mod overlay;
#[path = "conformance/pod_range.rs"]
mod pod_range;

type TestResult = Result<(), String>;
type LabTest = fn(&mut Lab) -> TestResult;

struct Test {
    name: String,
    run: Box<dyn Fn(&mut Lab) -> TestResult>,
}

fn yaml(text: &str) -> Value {
    palisade_netns_tests::yaml::from_str(text, "test YAML").expect("test YAML parses")
}

/// Polls `check` until it returns Ok or `bound` has passed; returns the last error.
fn poll(bound: Duration, mut check: impl FnMut() -> TestResult) -> TestResult {
    let start = Instant::now();
    loop {
        let r = check();
        if r.is_ok() || start.elapsed() >= bound {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `args` inside `netns` (`ip netns exec`); its stdout, or an error with its stderr.
fn run_in(netns: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .map_err(|e| format!("{args:?} in {netns}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod_ip(lab: &Lab, pod: &str, family: Family) -> Result<IpAddr, String> {
    let p = lab.pod(pod).map_err(|e| e.to_string())?;
    family
        .pick(&p.ips)
        .ok_or_else(|| format!("pod {pod} has no {family:?} address"))
}

/// Probes `targets` from a pod; returns (id, connected, reply).
fn probe_from(
    lab: &Lab,
    from: &str,
    targets: &[Target],
) -> Result<Vec<(String, bool, Option<String>)>, String> {
    let netns = lab.pod(from).map_err(|e| e.to_string())?.netns.clone();
    let out = lab
        .probe_from_netns(&netns, targets, lab::DEFAULT_PROBE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    Ok(out
        .into_iter()
        .map(|o| (o.id, o.connected, o.reply))
        .collect())
}

fn target(id: &str, ip: IpAddr, port: u16, protocol: Protocol) -> Target {
    Target {
        id: id.to_string(),
        addr: SocketAddr::new(ip, port),
        protocol,
    }
}

/// Expectation `(from pod, target, connected)` checked until it holds (bounded by CONVERGENCE).
fn expect_reach(lab: &Lab, checks: &[(&str, Target, bool)]) -> TestResult {
    poll(cases::CONVERGENCE, || {
        let mut wrong = Vec::new();
        for (from, t, want) in checks {
            let got = probe_from(lab, from, std::slice::from_ref(t))?;
            let (_, connected, reply) = &got[0];
            if connected != want {
                wrong.push(format!(
                    "{from} -> {} {}/{} ({}): expected {}, observed {} (reply {reply:?})",
                    t.id,
                    t.protocol,
                    t.addr.port(),
                    t.addr.ip(),
                    if *want { "connected" } else { "blocked" },
                    if *connected { "connected" } else { "blocked" }
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

fn policy(text: &str) -> Vec<Value> {
    vec![yaml(text)]
}

fn apply(lab: &mut Lab, objs: Vec<Value>) -> TestResult {
    lab.apply(objs).map_err(|e| e.to_string())
}

/// Runs `body`, then always deletes every policy and checks the baseline again.
fn with_cleanup(
    lab: &mut Lab,
    what: &str,
    body: impl FnOnce(&mut Lab) -> TestResult,
) -> TestResult {
    let r = body(lab);
    let c = lab
        .delete_all_policies()
        .map_err(|e| format!("cleanup: {e}"));
    let b = cases::check_baseline(lab, Family::V4, &format!("{what}: baseline after cleanup"));
    r.and(c).and(b)
}

/// Semantics 39: the node hosting a pod reaches it even under deny-all (kubelet probes); another
/// node does not (its address is just an IP outside every policy).
fn node_reaches_its_own_pods_under_deny_all(lab: &mut Lab) -> TestResult {
    with_cleanup(lab, "node probes", |lab| {
        for ns in ["x", "y", "z"] {
            apply(lab, policy(&format!(
                "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: deny-all, namespace: {ns}}}, spec: {{podSelector: {{}}, policyTypes: [Ingress, Egress], ingress: [], egress: []}}}}"
            )))?;
        }
        // Pod-to-pod first, so we know the policies are in force.
        let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
        let mut e = std::collections::BTreeMap::new();
        e.insert("all".to_string(), vec!["deny * -> *".to_string()]);
        let expected =
            cases::expected_matrix(&e, &pods, &MODEL_PORTS).map_err(|e| e.to_string())?;
        if let Err(observed) =
            cases::converge(lab, &expected, &MODEL_PORTS, Family::V4, cases::CONVERGENCE)
                .map_err(|e| e.to_string())?
        {
            return Err(cases::explain_mismatch(
                "deny-all everywhere",
                &expected,
                &observed,
            ));
        }
        for family in [Family::V4, Family::V6] {
            for node in ["node1", "node2"] {
                let records = lab
                    .probe_from_node(node, &MODEL_PORTS, family, lab::DEFAULT_PROBE_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                let mut wrong = Vec::new();
                for r in &records {
                    let local = lab.pod(&r.to).map_err(|e| e.to_string())?.node == node;
                    if r.connected != local {
                        wrong.push(format!(
                            "{node} -> {} {}/{} ({family:?}): expected {}, observed {}",
                            r.to,
                            r.protocol,
                            r.port,
                            if local {
                                "connected (own node, semantics 39)"
                            } else {
                                "blocked (another node's address)"
                            },
                            if r.connected { "connected" } else { "blocked" }
                        ));
                    }
                }
                if !wrong.is_empty() {
                    return Err(wrong.join("\n"));
                }
            }
        }
        Ok(())
    })
}

/// Semantics 27: a ClusterIP stand-in (DNAT in the client's node namespace, as kube-proxy does)
/// with policy enforced on the backend pod's real IP.
fn cluster_ip_traffic_is_policed_at_the_backend(lab: &mut Lab) -> TestResult {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    for node in ["node1", "node2"] {
        lab.add_cluster_ip(node, vip, 80, Protocol::Tcp, "x/a")
            .map_err(|e| e.to_string())?;
    }
    with_cleanup(lab, "ClusterIP", |lab| {
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: allow-y-to-a, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}}",
        ))?;
        let clients: Vec<String> = lab.pods().map(|p| p.key()).collect();
        let mut checks = Vec::new();
        for c in &clients {
            // x/a through the VIP reaches itself: always allowed (semantics 38).
            let want = c.starts_with("y/") || c == "x/a";
            checks.push((
                c.as_str(),
                target("svc x/a", IpAddr::V4(vip), 80, Protocol::Tcp),
                want,
            ));
        }
        expect_reach(lab, &checks)?;
        // The allowed ones really reached the backend through the VIP.
        let got = probe_from(
            lab,
            "y/a",
            &[target("svc", IpAddr::V4(vip), 80, Protocol::Tcp)],
        )?;
        if got[0].2.as_deref() != Some("x/a") {
            return Err(format!(
                "y/a -> {vip}:80 answered by {:?}, expected the backend x/a",
                got[0].2
            ));
        }
        Ok(())
    })
}

/// Semantics 28 and 25: once egress-isolated, an address outside the cluster (a namespace behind
/// node1) is reachable only through an ipBlock, and a v4 block does not open v6.
fn external_address_is_reachable_only_by_ipblock(lab: &mut Lab) -> TestResult {
    let ext4 = IpAddr::V4(lab::EXTERNAL_V4);
    let ext6 = IpAddr::V6(lab::EXTERNAL_V6);
    let ext = |ip| target("external", ip, 80, Protocol::Tcp);
    let ext_udp = |ip| target("external", ip, 81, Protocol::Udp);
    with_cleanup(lab, "external", |lab| {
        // Baseline: pods on both nodes reach it (through their node's NAT and the router).
        expect_reach(
            lab,
            &[
                ("x/a", ext(ext4), true),
                ("x/b", ext(ext4), true),
                ("x/b", ext(ext6), true),
                ("y/a", ext_udp(ext4), true),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: egress, namespace: x}, spec: {podSelector: {}, policyTypes: [Egress], egress: []}}",
        ))?;
        expect_reach(
            lab,
            &[
                ("x/a", ext(ext4), false),
                ("x/b", ext(ext4), false),
                ("y/a", ext(ext4), true),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: egress, namespace: x}, spec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.168.77.0/24}}]}]}}",
        ))?;
        let yb = pod_ip(lab, "y/b", Family::V4)?;
        expect_reach(
            lab,
            &[
                ("x/a", ext(ext4), true),
                ("x/b", ext(ext4), true),
                ("x/b", ext_udp(ext4), true),
                ("x/a", ext(ext6), false),
                ("x/a", target("y/b", yb, 80, Protocol::Tcp), false),
            ],
        )?;
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: egress, namespace: x}, spec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.168.77.0/24, except: [192.168.77.2/32]}}]}]}}",
        ))?;
        expect_reach(lab, &[("x/a", ext(ext4), false), ("x/b", ext(ext4), false)])
    })
}

/// Semantics 21: pods created after the policy are covered from their first packet: never
/// reachable while isolated, and they join peer sets.
fn pods_created_after_the_policy_are_covered_immediately(lab: &mut Lab) -> TestResult {
    let pod = |name: &str, node: &str, labels: &str| {
        let mut containers = String::new();
        for (port, proto) in MODEL_PORTS {
            containers.push_str(&format!(
                "  - name: cont-{port}-{p}\n    image: agnhost\n    ports: [{{name: serve-{port}-{p}, containerPort: {port}, protocol: {proto}}}]\n",
                p = proto.as_str()
            ));
        }
        yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {labels}}}\nspec:\n  nodeName: {node}\n  containers:\n{containers}"
        ))
    };
    let r = with_cleanup(lab, "late pods", |lab| {
        apply(lab, policy(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: late-isolated, namespace: x}, spec: {podSelector: {matchLabels: {pod: late}}, policyTypes: [Ingress, Egress], ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}], egress: [{to: [{podSelector: {matchLabels: {role: client}}}]}]}}",
        ))?;
        // Let the agents compile the policy before the pods exist.
        std::thread::sleep(Duration::from_millis(300));
        apply(
            lab,
            vec![
                pod("late", "node2", "{pod: late}"),
                pod("client", "node1", "{pod: client, role: client}"),
            ],
        )?;
        let late = pod_ip(lab, "x/late", Family::V4)?;
        let za = pod_ip(lab, "z/a", Family::V4)?;
        let t_late = target("x/late", late, 80, Protocol::Tcp);
        // From the moment the pod exists until the bound: z/a never gets in, x/late never gets out
        // to z/a; the new client gets in within the bound.
        let start = Instant::now();
        let mut client_ok = false;
        while start.elapsed() < cases::CONVERGENCE {
            let from_z = probe_from(lab, "z/a", std::slice::from_ref(&t_late))?;
            if from_z[0].1 {
                return Err(format!("z/a reached x/late {:?} after creation: a pod created after the policy was not isolated", start.elapsed()));
            }
            let out = probe_from(lab, "x/late", &[target("z/a", za, 80, Protocol::Tcp)])?;
            if out[0].1 {
                return Err(format!(
                    "x/late reached z/a {:?} after creation: egress isolation missing",
                    start.elapsed()
                ));
            }
            if probe_from(lab, "x/client", std::slice::from_ref(&t_late))?[0].1 {
                client_ok = true;
                if start.elapsed() > Duration::from_millis(500) {
                    break;
                }
            }
        }
        if !client_ok {
            return Err(
                "x/client (created after the policy, role=client) never reached x/late within 2 s"
                    .into(),
            );
        }
        Ok(())
    });
    let d1 = lab
        .delete_key(&k8s::ObjKey::new("Pod", "x", "late"))
        .map_err(|e| e.to_string());
    let d2 = lab
        .delete_key(&k8s::ObjKey::new("Pod", "x", "client"))
        .map_err(|e| e.to_string());
    let b = cases::check_baseline(lab, Family::V4, "late pods: baseline after deleting them");
    r.and(d1).and(d2).and(b)
}

/// SCTP S1-S3: this kernel has no SCTP sockets, so they are checked at rule level: the ruleset
/// `palisade-agent compile` produces for node1 (which hosts x/a) isolates x/a and carries an SCTP
/// port rule; live TCP/UDP probes show the isolation too.
fn sctp_cases_at_rule_level(lab: &mut Lab) -> TestResult {
    let node = lab.node_state("node1").map_err(|e| e.to_string())?.clone();
    let manifests = lab.state().run_dir.join("manifests");
    let xa = pod_ip(lab, "x/a", Family::V4)?.to_string();
    let ya = pod_ip(lab, "y/a", Family::V4)?.to_string();
    let cases_: [(&str, &str, Option<u16>); 3] = [
        ("S1", "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-all, namespace: x}, spec: {podSelector: {}, policyTypes: [Ingress], ingress: []}}", None),
        ("S2", "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: allow-ingress-on-port-81-ns-x, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}], ports: [{port: 81, protocol: SCTP}]}]}}", Some(81)),
        ("S3", "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: allow-client-a-via-ns-selector, namespace: x}, spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: a}}}]}]}}", None),
    ];
    let mut problems = Vec::new();
    for (id, text, sctp_port) in cases_ {
        let r = with_cleanup(lab, id, |lab| {
            apply(lab, policy(text))?;
            let out =
                lab::run_agent_compile(lab, &manifests, &node).map_err(|e| format!("{id}: {e}"))?;
            let json: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| format!("{id}: compile output is not JSON: {e}"))?;
            let text = json.to_string();
            if !lab::map_has_element(&json, "ingress_v4", &xa) {
                return Err(format!("{id}: x/a ({xa}) is not in the ingress_v4 map: x/a not isolated by the compiled ruleset"));
            }
            if let Some(port) = sctp_port {
                if !lab::has_sctp_port(&json, port) {
                    return Err(format!(
                        "{id}: the compiled ruleset has no SCTP port {port} rule"
                    ));
                }
            }
            if id == "S3" && !text.contains(&format!("\"{ya}\"")) {
                return Err(format!(
                    "{id}: y/a ({ya}) is in no peer set of the compiled ruleset"
                ));
            }
            // Live: x/a isolated on TCP and UDP (SCTP-only or SCTP-peer rules open nothing else
            // for non-peers).
            let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
            let mut e = std::collections::BTreeMap::new();
            let rules = match id {
                "S1" => vec!["deny * -> x/*".to_string()],
                "S2" => vec!["deny * -> x/a".to_string()],
                _ => vec!["deny * -> x/a".to_string(), "allow y/a -> x/a".to_string()],
            };
            e.insert("all".to_string(), rules);
            let expected =
                cases::expected_matrix(&e, &pods, &MODEL_PORTS).map_err(|e| e.to_string())?;
            match cases::converge(lab, &expected, &MODEL_PORTS, Family::V4, cases::CONVERGENCE)
                .map_err(|e| e.to_string())?
            {
                Ok(_) => Ok(()),
                Err(observed) => Err(cases::explain_mismatch(id, &expected, &observed)),
            }
        });
        if let Err(e) = r {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// The harness itself: a case whose expectation is wrong (T01's policy on x, but the expectation
/// isolates y instead) must fail, and the lab must be back at the baseline afterwards. Without
/// this, a matrix check that passed everything would go unnoticed. The wrong expectation differs
/// from both the state before the policy (all allowed) and the state after it, so the outcome
/// does not depend on whether the first probe round runs before or after the agents commit:
/// "all allowed" as the wrong expectation matched the first round whenever it won that race.
fn harness_detects_a_wrong_expectation(lab: &mut Lab) -> TestResult {
    let wrong: Vec<Case> = palisade_netns_tests::yaml::from_str(
        "- id: SELF\n  title: wrong on purpose\n  steps:\n  - apply:\n    - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-ingress, namespace: x}, spec: {podSelector: {}, policyTypes: [Ingress], ingress: []}}\n    expect: {all: [\"deny * -> y/*\"]}\n",
        "the wrong case",
    )
    .map_err(|e| e.to_string())?;
    match cases::run_case(lab, &wrong[0]) {
        Ok(()) => Err("a deny-all policy on x checked against an expectation that isolates y passed: the matrix check is vacuous".into()),
        Err(report) if report.contains("-> x/") && !report.contains("baseline after cleanup") => Ok(()),
        Err(report) => Err(format!("the wrong expectation failed for another reason:\n{report}")),
    }
}

fn case_test(case: Case, prefix: &str) -> Test {
    Test {
        name: format!("{prefix}::{} {}", case.id, case.title),
        run: Box::new(move |lab: &mut Lab| cases::run_case(lab, &case)),
    }
}

fn all_tests() -> Result<Vec<Test>, String> {
    let mut tests = Vec::new();
    for c in cases::load(&cases::upstream_cases_path()).map_err(|e| e.to_string())? {
        tests.push(case_test(c, "upstream"));
    }
    for c in cases::load(&cases::extra_cases_path()).map_err(|e| e.to_string())? {
        tests.push(case_test(c, "extra"));
    }
    for c in cases::load(&cases::cluster_cases_path()).map_err(|e| e.to_string())? {
        tests.push(case_test(c, "cluster"));
    }
    let named: [(&str, LabTest); 23] = [
        (
            "extra::per_policy_counters_move_with_the_probes_they_count_and_go_with_the_policy",
            flow_log::per_policy_counters_move_with_the_probes_they_count_and_go_with_the_policy,
        ),
        (
            "extra::audit_a_deny_all_in_audit_mode_drops_nothing_and_logs_what_it_would_drop",
            flow_log::a_deny_all_in_audit_mode_drops_nothing_and_logs_what_it_would_drop,
        ),
        (
            "extra::flow_log_a_denied_connection_is_one_line_naming_both_pods_and_the_isolating_policy",
            flow_log::a_denied_connection_is_one_line_naming_both_pods_and_the_isolating_policy,
        ),
        (
            "extra::flow_log_a_flood_of_denied_syns_is_logged_at_the_configured_rate_and_enforcement_goes_on",
            flow_log::a_flood_of_denied_syns_is_logged_at_the_configured_rate_and_enforcement_goes_on,
        ),
        (
            "extra::same_subnet_pod_traffic_is_not_encapsulated",
            overlay::same_subnet_pod_traffic_is_not_encapsulated,
        ),
        (
            "extra::forged_sources_are_dropped_at_the_pods_veth",
            forged::forged_sources_are_dropped_at_the_pods_veth,
        ),
        (
            "extra::forged_overlay_packets_are_dropped_before_decapsulation",
            forged::forged_overlay_packets_are_dropped_before_decapsulation,
        ),
        (
            "extra::a_pod_reaches_no_socket_of_its_node_under_another_pods_address",
            forged::a_pod_reaches_no_socket_of_its_node_under_another_pods_address,
        ),
        (
            "extra::icmp_errors_pass_only_from_an_endpoint_of_their_connection",
            forged::icmp_errors_pass_only_from_an_endpoint_of_their_connection,
        ),
        (
            "extra::neighbour_discovery_messages_are_never_forwarded_past_policy",
            forged::neighbour_discovery_messages_are_never_forwarded_past_policy,
        ),
        (
            "extra::a_pod_is_not_reached_under_its_own_address_from_another_host",
            forged::a_pod_is_not_reached_under_its_own_address_from_another_host,
        ),
        (
            "extra::a_pod_cannot_advertise_itself_as_its_nodes_router",
            forged::a_pod_cannot_advertise_itself_as_its_nodes_router,
        ),
        (
            "extra::harness_detects_a_wrong_expectation",
            harness_detects_a_wrong_expectation,
        ),
        (
            "extra::node_reaches_its_own_pods_under_deny_all",
            node_reaches_its_own_pods_under_deny_all,
        ),
        (
            "extra::cluster_ip_traffic_is_policed_at_the_backend",
            cluster_ip_traffic_is_policed_at_the_backend,
        ),
        (
            "extra::external_address_is_reachable_only_by_ipblock",
            external_address_is_reachable_only_by_ipblock,
        ),
        (
            "extra::sctp_cases_at_rule_level (S1-S3)",
            sctp_cases_at_rule_level,
        ),
        (
            "extra::pods_created_after_the_policy_are_covered_immediately",
            pods_created_after_the_policy_are_covered_immediately,
        ),
        (
            "extra::host_port_reaches_the_pod_through_the_chained_portmap",
            cluster_pods::host_port_reaches_the_pod_through_the_chained_portmap,
        ),
        (
            "extra::host_network_pod_is_never_isolated_and_meets_policies_as_its_node",
            cluster_pods::host_network_pod_is_never_isolated_and_meets_policies_as_its_node,
        ),
        (
            "extra::terminated_pods_address_reused_carries_only_the_new_pods_policies",
            cluster_pods::terminated_pods_address_reused_carries_only_the_new_pods_policies,
        ),
        (
            "extra::an_egress_isolated_pod_reaches_no_node_service_at_its_link_local_gateway",
            cluster_pods::an_egress_isolated_pod_reaches_no_node_service_at_its_link_local_gateway,
        ),
        (
            "extra::an_address_of_a_pod_range_without_a_pod_never_leaves_by_the_default_route",
            pod_range::an_address_of_a_pod_range_without_a_pod_never_leaves_by_the_default_route,
        ),
    ];
    for (name, f) in named {
        tests.push(Test {
            name: name.to_string(),
            run: Box::new(f),
        });
    }
    Ok(tests)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let selection = suite::Selection::of(&args);
    let tests = match all_tests() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("conformance: loading cases: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| selection.selects(&t.name))
        .collect();
    let names: Vec<String> = selected.iter().map(|t| t.name.clone()).collect();
    if let Some(done) = selection.announce(&names) {
        return done;
    }
    let started = Instant::now();
    let mut opts = LabOptions::for_tests(&lab::unique_name());
    opts.external = true;
    let mut lab = match Lab::up(&opts) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("conformance: the lab did not come up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let nodes: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
    let setup = lab
        .apply(cases::model_objects(&nodes))
        .and_then(|_| lab.wait_pods_ready(Duration::from_secs(30)))
        .map_err(|e| e.to_string())
        .and_then(|_| {
            cases::check_baseline_within(
                &lab,
                Family::V4,
                "initial baseline (IPv4)",
                Duration::from_secs(10),
            )
        })
        .and_then(|_| {
            cases::check_baseline_within(
                &lab,
                Family::V6,
                "initial baseline (IPv6)",
                Duration::from_secs(10),
            )
        });
    let setup_secs = started.elapsed().as_secs_f64();
    let mut failed = Vec::new();
    let mut passed = 0;
    if let Err(e) = setup {
        failed = suite::setup_failed("conformance", &e, &names);
    } else {
        println!(
            "lab {} up with 9 pods on 2 nodes in {setup_secs:.1}s",
            lab.name()
        );
        for t in &selected {
            match suite::run_one(&mut lab, t.name.clone(), |lab| (t.run)(lab)) {
                Ok(()) => passed += 1,
                Err(f) => failed.push(f),
            }
        }
    }
    let ok = suite::tear_down(lab, &opts.name);
    suite::report(passed, &failed, ok, started)
}
