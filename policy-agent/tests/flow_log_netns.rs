//! The flow log on a real node (issue 16), in namespaces we create (root; never the host's own):
//! with `--flow-log-allowed`, an admitted connection is one `allowed` line naming the policy that
//! admitted it, a denied one one `dropped` line naming the isolating policy, a connection no
//! policy governs none; `palisade-agent flows` serves the same lines from the agent's socket.

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

#[test]
fn admitted_and_dropped_connections_are_one_line_each_naming_the_policy_and_the_default_is_not_logged(
) {
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
            "{}{}{}{}{}{ALLOW_CLIENT}",
            node_yaml(NODE, &["10.244.1.0/24"], &["192.168.78.1"]),
            namespace_yaml("demo"),
            pod_yaml("demo", "client", "client", NODE, Some(CLIENT)),
            pod_yaml("demo", "target", "target", NODE, Some(TARGET)),
            pod_yaml("demo", "other", "other", NODE, Some(OTHER)),
        ),
    );
    let log = t.path().join("flows.jsonl");
    let agent = Agent::start(
        &n1,
        NODE,
        &d,
        &["--flow-log", log.to_str().unwrap(), "--flow-log-allowed"],
    );
    assert!(
        agent.wait_ready(&n1, Duration::from_secs(10)),
        "agent never became ready"
    );
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
            &n1,
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
    drop(agent);
}

fn assert_socket_is_owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the flow log names pods and addresses");
}
