//! Egress NAT (issue 12): pod traffic that leaves the cluster carries the node's address, and an
//! outside host that knows no pod network can answer it; pod-to-pod traffic keeps the pod's
//! address; `--masquerade=false` turns it off. Namespaces we create (root; never the host's own).

mod agent_support;

use agent_support::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const NODE: &str = "n1";
const NODE_IP: &str = "172.31.0.1";
const POD: &str = "10.244.1.10";
const PEER: &str = "10.244.1.11";
/// The outside host's link to the node: it has no route to 10.244.0.0/16, as the internet has none.
const OUTSIDE: &str = "192.168.77.2";
const OUTSIDE_GW: &str = "192.168.77.1";
const PORT: u16 = 8080;

/// A TCP server that answers every connection with the peer address it saw; killed on drop.
struct EchoPeer {
    _process: KillOnDrop,
}

impl EchoPeer {
    fn start(ns: &Netns) -> Self {
        let script = format!(
            "import socket\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',{PORT}))\nl.listen(16)\nprint('ready',flush=True)\nwhile True:\n c,a=l.accept()\n c.sendall((a[0]+'\\n').encode())\n c.close()\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python (needed by this test)");
        let mut buf = [0u8; 6];
        let mut out = child.stdout.take().expect("stdout");
        let _ = std::io::Read::read_exact(&mut out, &mut buf);
        assert_eq!(&buf, b"ready\n", "echo server did not start");
        EchoPeer {
            _process: child.into(),
        }
    }
}

/// The address `dst` saw for a connection from `ns`, or `None` when nothing came back.
fn seen_by(ns: &Netns, dst: &str) -> Option<String> {
    let script = format!(
        "import socket\ns=socket.create_connection(({dst:?},{PORT}),timeout=1.5)\nprint(s.makefile().readline().strip())\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "python3", "-c", &script])
        .stderr(Stdio::null())
        .output()
        .expect("run python");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

struct World {
    agent: Option<Agent>,
    node: Netns,
    pod: Pod,
    peer: Pod,
    outside: Netns,
    d: AgentDirs,
    _t: TempDir,
}

impl World {
    fn new(extra: &[&str]) -> Self {
        let t = temp_dir("nat");
        let d = AgentDirs::new(&t);
        let node = Netns::router("pan");
        node.ip(&["link", "set", "lo", "up"]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
        node.sysctl("net.ipv4.ip_forward", "1");
        let outside = Netns::router("pao");
        node.veth_to("ext0", &outside, "eth0");
        node.ip(&["addr", "add", &format!("{OUTSIDE_GW}/24"), "dev", "ext0"]);
        node.ip(&["link", "set", "ext0", "up"]);
        outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
        outside.ip(&["link", "set", "eth0", "up"]);
        outside.ip(&["link", "set", "lo", "up"]);
        // The outside knows the node (it could answer the node itself), never the pod network.
        outside.ip(&["route", "add", &format!("{NODE_IP}/32"), "via", OUTSIDE_GW]);
        let pod = Pod::new(POD);
        pod.wire(&node);
        let peer = Pod::new(PEER);
        peer.wire(&node);
        for (name, yaml) in [
            ("node.yaml", node_yaml(NODE, &["10.244.1.0/24"], &[NODE_IP])),
            ("ns.yaml", namespace_yaml("a")),
            ("pod.yaml", pod_yaml("a", "pod", "pod", NODE, Some(POD))),
            ("peer.yaml", pod_yaml("a", "peer", "peer", NODE, Some(PEER))),
        ] {
            manifest(&d.manifests, name, &yaml);
        }
        let agent = Agent::start(&node, NODE, &d, extra);
        assert!(
            agent.wait_ready(&node, Duration::from_secs(20)),
            "agent ready"
        );
        World {
            agent: Some(agent),
            node,
            pod,
            peer,
            outside,
            d,
            _t: t,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.agent.take();
    }
}

#[test]
fn pods_reach_the_outside_with_the_nodes_address_and_each_other_with_their_own() {
    let w = World::new(&[]);
    let _outside = EchoPeer::start(&w.outside);
    let _peer = EchoPeer::start(&w.peer.ns);
    assert!(
        wait_until(Duration::from_secs(10), || seen_by(&w.pod.ns, OUTSIDE)
            .is_some()),
        "the pod reaches the outside (and its answer comes back through conntrack)"
    );
    assert_eq!(
        seen_by(&w.pod.ns, OUTSIDE).as_deref(),
        Some(OUTSIDE_GW),
        "the outside sees the node's address on that link, never the pod's"
    );
    // The pod resolves every destination by the node's proxy ARP, which answers a first request
    // after a random delay of up to `proxy_delay` (0.8 s): one probe of 1.5 s to a destination not
    // yet resolved can time out on a loaded machine (it did once in CI). Probe until it answers,
    // then judge the address.
    assert!(
        wait_until(Duration::from_secs(10), || seen_by(&w.pod.ns, PEER)
            .is_some()),
        "the pod reaches its peer pod"
    );
    assert_eq!(
        seen_by(&w.pod.ns, PEER).as_deref(),
        Some(POD),
        "pod to pod keeps the pod's address"
    );
    let table = w.node.table().expect("our table");
    assert!(table.contains("masquerade"), "{table}");
    let _ = &w.d;
}

#[test]
fn with_masquerade_off_the_outside_cannot_answer_a_pod() {
    let w = World::new(&["--masquerade=false"]);
    let _outside = EchoPeer::start(&w.outside);
    let _peer = EchoPeer::start(&w.peer.ns);
    // The policy path works (pod to pod), so a failure below is the missing NAT alone.
    assert!(
        wait_until(Duration::from_secs(10), || seen_by(&w.pod.ns, PEER)
            .is_some()),
        "pod to pod works"
    );
    assert_eq!(
        seen_by(&w.pod.ns, OUTSIDE),
        None,
        "without NAT the outside has no way back to a pod address"
    );
    assert!(!w.node.table().expect("our table").contains("masquerade"));
}
