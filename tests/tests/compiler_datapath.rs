//! Root test: the compiled ruleset enforces in the real kernel datapath, not just loads.
//!
//! A "node" netns forwards between two "pod" netns (Calico-style /32 + link-local gateway);
//! our table is loaded into the node; python3 opens TCP connections. Checks: a named-port
//! ingress rule (vmap goto, concat sets), denial of other ports, node-originated traffic
//! (`fib saddr type local`), replies to an ingress-isolated client (conntrack), and egress
//! isolation changed through `diff` batches, and the lockdown table a restore commits first.

use palisade_policy::model::Change;
use palisade_policy::scenarios::Scenario;
use palisade_policy::{compile, diff};
use palisade_testkit::process::KillOnDrop;
use palisade_tests::{Netns, NftNs};
use serde_json::json;
use std::process::{Command, Stdio};

const CLIENT_IP: &str = "10.244.1.2";
const SERVER_IP: &str = "10.244.1.3";
const GATEWAY: &str = "169.254.1.1";
const NODE_IP: &str = "192.168.0.1";
const CLIENT_IP6: &str = "fd00:10:244:1::2";
const SERVER_IP6: &str = "fd00:10:244:1::3";
const GATEWAY6: &str = "fe80::1";

const LISTENER: &str = r#"
import socket, select, sys
ss = []
for p in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p))); s.listen(16); ss.append(s)
    s6 = socket.socket(socket.AF_INET6); s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.bind(("::", int(p))); s6.listen(16); ss.append(s6)
print("ready", flush=True)
while True:
    r, _, _ = select.select(ss, [], [])
    for s in r:
        c, _ = s.accept(); c.close()
"#;

/// Sends UDP datagrams from any source address (IP_TRANSPARENT / IPV6_TRANSPARENT, what a pod with
/// CAP_NET_RAW can do): argv src dst port count.
const FORGE: &str = r#"
import socket, sys
src, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET6:
    s.setsockopt(41, 75, 1)
else:
    s.setsockopt(0, 19, 1)
s.bind((src, 0))
for _ in range(n):
    s.sendto(b"x", (dst, port))
"#;

const CONNECT: &str = r#"
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
"#;

fn connects(ns: &str, ip: &str, port: u16) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            CONNECT,
            ip,
            &port.to_string(),
        ])
        .stderr(Stdio::null())
        .status()
        .expect("run python3 (needed by this test)")
        .success()
}

/// Sends `n` UDP datagrams from `src` (not necessarily the pod's address) to `dst`:`port`.
fn forge(ns: &Netns, src: &str, dst: &str, port: u16, n: u32) {
    ns.exec(&[
        "python3",
        "-c",
        FORGE,
        src,
        dst,
        &port.to_string(),
        &n.to_string(),
    ]);
}

/// Packets the source guard dropped so far (its named counter, shared by its rules in every base
/// chain).
fn guard_drops(node: &Netns) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            node.name(),
            "nft",
            "-j",
            "list",
            "counter",
            "inet",
            "palisade",
            palisade_policy::ruleset::names::CNT_FORGED_SOURCE,
        ])
        .output()
        .expect("list the source guard's counter");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("counter"))
        .map(|c| c["packets"].as_u64().unwrap())
        .sum()
}

fn wire(node: &Netns, pod: &Netns, host_if: &str, ip: &str, ip6: &str) {
    node.veth_to(host_if, pod, "eth0");
    node.exec(&["ip", "link", "set", host_if, "up"]);
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{GATEWAY}/32"),
        "dev",
        host_if,
    ]);
    node.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", host_if]);
    pod.exec(&["ip", "link", "set", "lo", "up"]);
    pod.exec(&["ip", "link", "set", "eth0", "up"]);
    pod.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.exec(&[
        "ip", "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
    ]);
    pod.exec(&[
        "ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0",
    ]);
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{GATEWAY6}/64"),
        "dev",
        host_if,
        "nodad",
    ]);
    node.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{ip6}/128"),
        "dev",
        host_if,
    ]);
    pod.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.exec(&[
        "ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
    ]);
}

#[test]
fn compiled_rules_enforce_in_the_kernel_datapath_root() {
    let node = Netns::new("pal-cmp-");
    let client = Netns::new("pal-cmp-");
    let server = Netns::new("pal-cmp-");
    node.exec(&["ip", "link", "set", "lo", "up"]);
    node.exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    // Host veths named as the plugin names them, for the attachment records below (c0, c1).
    let client_veth = palisade_contract::host_veth_name("c0", "eth0");
    let server_veth = palisade_contract::host_veth_name("c1", "eth0");
    wire(&node, &client, &client_veth, CLIENT_IP, CLIENT_IP6);
    wire(&node, &server, &server_veth, SERVER_IP, SERVER_IP6);

    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.name(),
            "python3",
            "-u",
            "-c",
            LISTENER,
            "8080",
            "8081",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start listener");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let _listener = KillOnDrop::from(child);
    assert_eq!(ready.trim(), "ready");
    assert!(
        connects(client.name(), SERVER_IP, 8081),
        "the topology itself must work before any policy"
    );
    assert!(connects(client.name(), SERVER_IP6, 8081), "IPv6 too");

    let mut st = Scenario::new()
        .pod("a/client", "n1", &[CLIENT_IP, CLIENT_IP6], &[("app", "client")], &[])
        .pod("a/server", "n1", &[SERVER_IP, SERVER_IP6], &[("app", "server")], &[("http", 8080, "TCP")])
        .policy("a", "server-in", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]}))
        .policy("a", "client-no-ingress", json!({"podSelector": {"matchLabels": {"app": "client"}}}))
        .attachment("a/client", &[CLIENT_IP, CLIENT_IP6], false)
        .attachment("a/server", &[SERVER_IP, SERVER_IP6], false)
        .st;
    let mut last = compile(&st, "n1").ruleset;
    node.nft_load(&last.full_replace().to_json_string())
        .unwrap();

    assert!(
        connects(client.name(), SERVER_IP, 8080),
        "named port allowed; replies pass the client's ingress isolation"
    );
    assert!(
        !connects(client.name(), SERVER_IP, 8081),
        "other ports are dropped"
    );
    assert!(
        connects(node.name(), SERVER_IP, 8081),
        "the pod's own node always reaches it (semantics 39)"
    );
    // IPv6: separate sets and maps; neighbour discovery keeps working under isolation.
    node.exec(&["ip", "-6", "neigh", "flush", "all"]);
    client.exec(&["ip", "-6", "neigh", "flush", "all"]);
    assert!(
        connects(client.name(), SERVER_IP6, 8080),
        "IPv6 named port allowed"
    );
    assert!(
        !connects(client.name(), SERVER_IP6, 8081),
        "IPv6 other ports dropped"
    );
    // The source guard: what the client sends from an address not its own never gets past
    // prerouting (counted there), in both families; its own address is not counted.
    let before = guard_drops(&node);
    forge(&client, CLIENT_IP, SERVER_IP, 9, 5);
    forge(&client, CLIENT_IP6, SERVER_IP6, 9, 5);
    assert_eq!(
        guard_drops(&node),
        before,
        "the pod's own addresses pass the guard"
    );
    forge(&client, "10.244.1.9", SERVER_IP, 9, 5);
    forge(&client, SERVER_IP, SERVER_IP, 9, 5);
    forge(&client, "fd00:10:244:1::9", SERVER_IP6, 9, 5);
    assert_eq!(
        guard_drops(&node),
        before + 15,
        "forged sources (unknown, another pod's, IPv6) are dropped and counted"
    );

    let mut step = |st: &palisade_policy::model::ClusterState| {
        let next = compile(st, "n1").ruleset;
        let b = diff(&last, &next);
        node.nft_load(&b.to_json_string()).unwrap();
        last = next;
    };
    let eg = |spec: serde_json::Value| {
        let np = serde_json::from_value(
            json!({"metadata": {"namespace": "a", "name": "client-eg"}, "spec": spec}),
        )
        .unwrap();
        Change::UpsertPolicy(palisade_policy::policy_from_k8s(&np).unwrap())
    };
    st.apply(eg(json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": format!("{SERVER_IP}/32")}}], "ports": [{"protocol": "UDP", "port": 53}]}]})));
    step(&st);
    assert!(
        !connects(client.name(), SERVER_IP, 8080),
        "egress isolation (applied by diff) now drops it"
    );
    st.apply(eg(json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}], "ports": [{"port": 8000, "endPort": 8080}]}]})));
    step(&st);
    assert!(
        connects(client.name(), SERVER_IP, 8080),
        "updated egress (range, ipBlock with except) allows it again"
    );
    st.apply(Change::DeletePolicy {
        namespace: "a".into(),
        name: "server-in".into(),
    });
    step(&st);
    assert!(
        !connects(client.name(), SERVER_IP, 8081),
        "8081 is outside the client's egress range"
    );
    assert!(
        connects(client.name(), SERVER_IP, 8080),
        "server no longer isolated"
    );

    // The lockdown table, what the agent commits ahead of a full restore: no new connection of
    // a local pod gets through, in either family; this node still reaches its pods. The full
    // table back admits what it admitted.
    let c = compile(&st, "n1");
    node.nft_load(&c.lockdown([]).full_replace().to_json_string())
        .unwrap();
    assert!(
        !connects(client.name(), SERVER_IP, 8080),
        "lockdown: a pod's new connection is dropped"
    );
    assert!(
        !connects(client.name(), SERVER_IP6, 8080),
        "lockdown: IPv6 too"
    );
    assert!(
        connects(node.name(), SERVER_IP, 8081),
        "lockdown: the node still reaches its pods (kubelet probes)"
    );
    node.nft_load(&c.ruleset.full_replace().to_json_string())
        .unwrap();
    assert!(
        connects(client.name(), SERVER_IP, 8080),
        "the full table back admits it again"
    );
}
