//! What the policies do, seen on a real node (issue 16), in namespaces we create (root; never the
//! host's own): the flow log (with `--flow-log-allowed`, an admitted connection is one `allowed`
//! line naming the policy that admitted it, a denied one one `dropped` line naming the isolating
//! policy, a connection no policy governs none; `palisade-agent flows` serves the same lines from
//! the agent's socket), and the per-policy counters in `/metrics`.

mod agent_support;

use agent_support::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const NODE: &str = "n1";
const TARGET: &str = "10.244.1.20";
const CLIENT: &str = "10.244.1.21";
const OTHER: &str = "10.244.1.22";
const PORT: u16 = 7002;

const ALLOW_CLIENT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: demo}\nspec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n";

/// Three datagrams from one socket (one flow) to `dst:PORT`.
fn udp_flow(ns: &Netns, dst: &str) {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(3):\n s.sendto(b'x',({dst:?},{PORT}))\n time.sleep(0.05)\n"
    );
    let ok = Command::new("ip")
        .args(["netns", "exec", ns.name(), "python3", "-c", &script])
        .status()
        .expect("python3 runs")
        .success();
    assert!(ok, "sending to {dst} failed");
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow log line {l:?}: {e}")))
        .collect()
}

fn between<'a>(lines: &'a [Value], from: &str, to: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["source"]["ip"] == from && l["destination"]["ip"] == to)
        .collect()
}

fn metric(ns: &Netns, sample: &str) -> f64 {
    let (_, body) = ns.http(AGENT_PORT, "/metrics").unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(sample))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One node with three pods (client, target, other) and `ALLOW_CLIENT`, the agent ready.
struct World {
    // Dropped first: the agent stops before its directories and namespaces go.
    agent: Option<Agent>,
    n1: Netns,
    client: Pod,
    target: Pod,
    other: Pod,
    d: AgentDirs,
    t: TempDir,
}

/// `ALLOW_CLIENT` in audit mode's place: a deny-all of the target's ingress, audited.
const AUDIT_DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: audit-deny, namespace: demo, annotations: {palisade.dev/audit: \"true\"}}\nspec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress]}\n";

impl World {
    fn new(extra: &[&str]) -> Self {
        Self::with_policy(ALLOW_CLIENT, extra)
    }

    fn with_policy(policy: &str, extra: &[&str]) -> Self {
        let n1 = Netns::router("pfl");
        let t = temp_dir("pa-flowlog");
        let d = AgentDirs::new(&t);
        let (client, target, other) = (Pod::new(CLIENT), Pod::new(TARGET), Pod::new(OTHER));
        for p in [&client, &target, &other] {
            p.wire(&n1);
        }
        manifest(
            &d.manifests,
            "base.yaml",
            &format!(
                "{}{}{}{}{}",
                node_yaml(NODE, &["10.244.1.0/24"], &["192.168.78.1"]),
                namespace_yaml("demo"),
                pod_yaml("demo", "client", "client", NODE, Some(CLIENT)),
                pod_yaml("demo", "target", "target", NODE, Some(TARGET)),
                pod_yaml("demo", "other", "other", NODE, Some(OTHER)),
            ),
        );
        manifest(&d.manifests, "policy.yaml", policy);
        let agent = Agent::start(&n1, NODE, &d, extra);
        assert!(
            agent.wait_ready(&n1, Duration::from_secs(10)),
            "agent never became ready"
        );
        World {
            agent: Some(agent),
            n1,
            client,
            target,
            other,
            d,
            t,
        }
    }
}

#[test]
fn admitted_and_dropped_connections_are_one_line_each_naming_the_policy_and_the_default_is_not_logged(
) {
    let log_dir = temp_dir("pa-flowlog-out");
    let log = log_dir.path().join("flows.jsonl");
    let w = World::new(&["--flow-log", log.to_str().unwrap(), "--flow-log-allowed"]);
    let (n1, t, d) = (&w.n1, &w.t, &w.d);
    let (client, target, other) = (&w.client, &w.target, &w.other);
    let (at_target, at_other) = (t.path().join("target.log"), t.path().join("other.log"));
    let _r1 = Receiver::start(&target.ns, PORT, &at_target);
    let _r2 = Receiver::start(&other.ns, PORT, &at_other);

    udp_flow(&client.ns, TARGET); // admitted by demo/allow-client
    udp_flow(&other.ns, TARGET); // dropped: target is isolated, other is not allowed
    udp_flow(&client.ns, OTHER); // admitted by default: no policy governs either end
    assert!(
        wait_until(Duration::from_secs(5), || !arrivals(&at_other).is_empty()
            && !arrivals(&at_target).is_empty()),
        "control: the admitted datagrams did not arrive"
    );
    assert!(
        wait_until(Duration::from_secs(5), || lines(
            &std::fs::read_to_string(&log).unwrap_or_default()
        )
        .len()
            >= 2),
        "the flow log did not get its lines"
    );
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&log).unwrap();
    let all = lines(&text);

    let admitted = between(&all, CLIENT, TARGET);
    assert_eq!(admitted.len(), 1, "one line per flow: {all:?}");
    let a = admitted[0];
    assert_eq!(a["verdict"], "allowed", "{a}");
    assert_eq!(a["direction"], "ingress", "{a}");
    assert_eq!(a["protocol"], "UDP", "{a}");
    assert_eq!(a["source"]["pod"], "demo/client", "{a}");
    assert_eq!(a["destination"]["pod"], "demo/target", "{a}");
    assert_eq!(a["destination"]["port"], PORT, "{a}");
    assert_eq!(
        a["policies"],
        serde_json::json!(["demo/allow-client"]),
        "{a}"
    );

    let dropped = between(&all, OTHER, TARGET);
    assert_eq!(
        dropped.len(),
        1,
        "three datagrams of one flow are one line: {all:?}"
    );
    let x = dropped[0];
    assert_eq!(x["verdict"], "dropped", "{x}");
    assert_eq!(x["source"]["pod"], "demo/other", "{x}");
    assert_eq!(
        x["policies"],
        serde_json::json!(["demo/allow-client"]),
        "{x}"
    );
    assert!(x["reason"].as_str().unwrap().contains("DENIED"), "{x}");

    assert!(
        between(&all, CLIENT, OTHER).is_empty(),
        "a connection no policy governs is not logged: {all:?}"
    );
    assert!(
        metric(
            n1,
            "palisade_flow_log_packets_total{result=\"default_allowed\"} "
        ) >= 1.0,
        "the kernel handed it over and the agent left it out"
    );

    // The same lines through the agent's socket, as an operator reads them on the node.
    let state = d.state.to_str().unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            n1.name(),
            env!("CARGO_BIN_EXE_palisade-agent"),
        ])
        .args(["flows", "--state-dir", state])
        .output()
        .expect("palisade-agent flows runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    assert_socket_is_owner_only(&d.state.join("flows.sock"));
}

#[test]
fn a_deny_all_in_audit_mode_drops_nothing_and_logs_every_connection_it_would_drop() {
    let log_dir = temp_dir("pa-flowlog-out");
    let log = log_dir.path().join("flows.jsonl");
    let w = World::with_policy(AUDIT_DENY, &["--flow-log", log.to_str().unwrap()]);
    let at_target = w.t.path().join("target.log");
    let _r = Receiver::start(&w.target.ns, PORT, &at_target);
    udp_flow(&w.client.ns, TARGET);
    udp_flow(&w.other.ns, TARGET);
    assert!(
        wait_until(Duration::from_secs(5), || arrivals(&at_target).len() == 6),
        "the audited deny-all dropped something: {} of 6 datagrams arrived",
        arrivals(&at_target).len()
    );
    let read = || lines(&std::fs::read_to_string(&log).unwrap_or_default());
    assert!(
        wait_until(Duration::from_secs(5), || read().len() >= 2),
        "no audit lines: {:?}",
        read()
    );
    std::thread::sleep(Duration::from_millis(300));
    let all = read();
    for from in [CLIENT, OTHER] {
        let l = between(&all, from, TARGET);
        assert_eq!(l.len(), 1, "one line per flow from {from}: {all:?}");
        assert_eq!(l[0]["verdict"], "would_drop", "{}", l[0]);
        assert_eq!(
            l[0]["policies"],
            serde_json::json!(["demo/audit-deny"]),
            "{}",
            l[0]
        );
        assert_eq!(l[0]["destination"]["pod"], "demo/target", "{}", l[0]);
    }
    assert!(
        all.iter().all(|l| l["verdict"] == "would_drop"),
        "nothing was dropped: {all:?}"
    );
    // Counted in the kernel: every datagram the audited policy would have dropped.
    assert_eq!(policy_packets(&w.n1, "audit-deny", "would_drop").0, 6.0);
}

/// `palisade_policy_packets_total` of one series (0 when absent), and whether the policy has any.
fn policy_packets(ns: &Netns, policy: &str, verdict: &str) -> (f64, bool) {
    policy_series(ns, "palisade_policy_packets_total", policy, verdict)
}

/// The same of `palisade_policy_connections_total`.
fn policy_connections(ns: &Netns, policy: &str, verdict: &str) -> (f64, bool) {
    policy_series(ns, "palisade_policy_connections_total", policy, verdict)
}

fn policy_series(ns: &Netns, family: &str, policy: &str, verdict: &str) -> (f64, bool) {
    let (_, body) = ns.http(AGENT_PORT, "/metrics").unwrap_or_default();
    let of_policy: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| l.contains(&format!("policy=\"{policy}\"")))
        .collect();
    let n = of_policy
        .iter()
        .find(|l| l.contains(&format!("direction=\"ingress\",verdict=\"{verdict}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    (n, !of_policy.is_empty())
}

#[test]
fn per_policy_counters_move_with_the_traffic_they_count_and_a_deleted_policys_series_disappear() {
    let w = World::new(&[]);
    assert_eq!(policy_packets(&w.n1, "allow-client", "allow"), (0.0, true));
    assert_eq!(policy_packets(&w.n1, "allow-client", "drop"), (0.0, true));
    let at_target = w.t.path().join("target.log");
    let _r = Receiver::start(&w.target.ns, PORT, &at_target);

    // Three datagrams each, never answered: all three meet the rules (a flow is established only
    // once a reply is seen).
    udp_flow(&w.client.ns, TARGET);
    udp_flow(&w.other.ns, TARGET);
    assert!(
        wait_until(Duration::from_secs(5), || arrivals(&at_target).len() == 3),
        "control: the client's datagrams did not arrive"
    );
    assert_eq!(policy_packets(&w.n1, "allow-client", "allow").0, 3.0);
    // One connection admitted (its first datagram); the dropped flow's entry is never confirmed,
    // so each of its datagrams is an attempt.
    assert_eq!(policy_connections(&w.n1, "allow-client", "allow").0, 1.0);
    let dropped = || policy_packets(&w.n1, "allow-client", "drop").0;
    assert!(
        wait_until(Duration::from_secs(2), || dropped() == 3.0),
        "drops counted: {} of 3\n{}\n{}",
        dropped(),
        w.n1.http(AGENT_PORT, "/metrics").unwrap_or_default().1,
        w.n1.exec(&["nft", "list", "table", "inet", "palisade"])
    );

    assert_eq!(policy_connections(&w.n1, "allow-client", "drop").0, 3.0);

    std::fs::remove_file(w.d.manifests.join("policy.yaml")).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !policy_packets(
            &w.n1,
            "allow-client",
            "allow"
        )
        .1),
        "a deleted policy's series stay"
    );
    drop(w.agent);
}

fn assert_socket_is_owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the flow log names pods and addresses");
}

/// The agent's periodic full replace (every tenth resync; one a second here) starts the kernel's
/// named counters from zero; the per-policy series carry what they held and keep counting up.
#[test]
fn per_policy_counters_keep_counting_across_the_agents_own_full_replace() {
    let w = World::new(&["--resync-seconds", "1"]);
    let at_target = w.t.path().join("target.log");
    let _r = Receiver::start(&w.target.ns, PORT, &at_target);
    udp_flow(&w.client.ns, TARGET);
    assert!(
        wait_until(Duration::from_secs(5), || arrivals(&at_target).len() == 3),
        "control: the client's datagrams did not arrive"
    );
    assert_eq!(policy_packets(&w.n1, "allow-client", "allow").0, 3.0);
    let full_replaces = || {
        let (_, body) = w.n1.http(AGENT_PORT, "/metrics").unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with("palisade_transactions_total{kind=\"full\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = full_replaces();
    assert!(
        wait_until(Duration::from_secs(20), || full_replaces() > before),
        "no periodic full replace within 20 s (one every tenth resync)"
    );
    let kernel =
        w.n1.exec(&["nft", "list", "counters", "table", "inet", "palisade"]);
    let counted: Vec<&str> = kernel
        .split("packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(
        !counted.is_empty() && counted.iter().all(|n| *n == "0"),
        "control: the replace started the kernel's counters from zero\n{kernel}"
    );
    assert_eq!(
        policy_packets(&w.n1, "allow-client", "allow").0,
        3.0,
        "the series lost what the counter held before the replace"
    );
    udp_flow(&w.client.ns, TARGET);
    assert!(
        wait_until(Duration::from_secs(5), || arrivals(&at_target).len() == 6),
        "control: the second flow's datagrams did not arrive"
    );
    assert_eq!(policy_packets(&w.n1, "allow-client", "allow").0, 6.0);
}
