//! No flow outlives its deny (issue 11): established connections that a policy change (or a
//! restore of our table) revokes are cut, in namespaces we create (root; never the host's own).
//! Each test keeps one long-lived flow that loses its permission and one the change does not
//! concern, a message per ms on each, and watches where the messages still arrive.

mod agent_support;

use agent_support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const NODE: &str = "n1";
const TARGET: &str = "10.244.1.10";
const CLIENT: &str = "10.244.1.11";
const OTHER: &str = "10.244.1.12";
const PORT: u16 = 7001;

/// A python helper in a pod namespace; killed on drop.
struct Py {
    _process: KillOnDrop,
}

impl Py {
    /// Runs `script` in `ns`; when `wait_ready`, waits for it to print `ready`.
    fn start(ns: &Netns, script: &str, wait_ready: bool) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "python3", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python helper");
        if wait_ready {
            let mut out = child.stdout.take().expect("helper stdout");
            let mut buf = [0u8; 6];
            let _ = std::io::Read::read_exact(&mut out, &mut buf);
            assert_eq!(&buf, b"ready\n", "helper did not start");
        }
        Py {
            _process: child.into(),
        }
    }

    /// A TCP server on `port` that logs the arrival time of every chunk it reads (one line each).
    fn tcp_server(ns: &Netns, port: u16, log: &Path) -> Self {
        let script = format!(
            "import socket,time\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',{port}))\nl.listen(8)\nf=open({log:?},'a',buffering=1)\nprint('ready',flush=True)\nc,a=l.accept()\nwhile True:\n d=c.recv(4096)\n if not d:\n  break\n f.write('%f %d\\n'%(time.time(),len(d)))\n"
        );
        Self::start(ns, &script, true)
    }

    /// A TCP server on `port` that echoes every chunk and logs its arrival time (one line each).
    fn tcp_echo_server(ns: &Netns, port: u16, log: &Path) -> Self {
        let script = format!(
            "import socket,time\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',{port}))\nl.listen(8)\nf=open({log:?},'a',buffering=1)\nprint('ready',flush=True)\nc,a=l.accept()\nc.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nwhile True:\n d=c.recv(4096)\n if not d:\n  break\n f.write('%f %d\\n'%(time.time(),len(d)))\n c.sendall(d)\n"
        );
        Self::start(ns, &script, true)
    }

    /// Like [`Py::tcp_stream`], reading (and dropping) whatever the server sends back.
    fn tcp_stream_reading(ns: &Netns, dst: &str, port: u16) -> Self {
        let script = format!(
            "import socket,time,threading\ns=socket.create_connection(({dst:?},{port}),timeout=5)\ns.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\ns.settimeout(None)\ndef rd():\n while s.recv(4096):\n  pass\nthreading.Thread(target=rd,daemon=True).start()\nprint('ready',flush=True)\ni=0\nwhile True:\n s.sendall(b'%d\\n'%i)\n i+=1\n time.sleep(0.001)\n"
        );
        Self::start(ns, &script, true)
    }

    /// One TCP connection to `dst:port`, a message every ms (Nagle off), until it fails.
    fn tcp_stream(ns: &Netns, dst: &str, port: u16) -> Self {
        let script = format!(
            "import socket,time\ns=socket.create_connection(({dst:?},{port}),timeout=5)\ns.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nprint('ready',flush=True)\ni=0\nwhile True:\n s.sendall(b'%d\\n'%i)\n i+=1\n time.sleep(0.001)\n"
        );
        Self::start(ns, &script, true)
    }

    /// A UDP server on `port` that answers every datagram (its flows are replied, established)
    /// and logs its arrival time (one line each).
    fn udp_echo_server(ns: &Netns, port: u16, log: &Path) -> Self {
        let script = format!(
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',{port}))\nf=open({log:?},'a',buffering=1)\nprint('ready',flush=True)\nwhile True:\n d,a=s.recvfrom(4096)\n f.write('%f %d\\n'%(time.time(),len(d)))\n s.sendto(d,a)\n"
        );
        Self::start(ns, &script, true)
    }

    /// One UDP socket (one conntrack flow) sending to `dst:port` every ms.
    fn udp_stream(ns: &Netns, dst: &str, port: u16) -> Self {
        let script = format!(
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.connect(({dst:?},{port}))\nprint('ready',flush=True)\ni=0\nwhile True:\n try:\n  s.send(str(i).encode())\n except OSError:\n  pass\n i+=1\n time.sleep(0.001)\n"
        );
        Self::start(ns, &script, true)
    }
}

/// One node with three pods (client, target, other), the agent running and ready.
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

fn base_yaml(client_app: &str) -> String {
    format!(
        "{}{}{}{}{}",
        node_yaml(NODE, &["10.244.1.0/24"], &["192.168.77.1"]),
        namespace_yaml("demo"),
        pod_yaml("demo", "client", client_app, NODE, Some(CLIENT)),
        pod_yaml("demo", "target", "target", NODE, Some(TARGET)),
        pod_yaml("demo", "other", "other", NODE, Some(OTHER)),
    )
}

/// Ingress of app=target allowed from app=client only.
const ALLOW_CLIENT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: demo}\nspec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n";

impl World {
    fn new(policies: &[(&str, &str)]) -> Self {
        let n1 = Netns::router("prv");
        let t = temp_dir("pa-revoke");
        let d = AgentDirs::new(&t);
        let (client, target, other) = (Pod::new(CLIENT), Pod::new(TARGET), Pod::new(OTHER));
        for p in [&client, &target, &other] {
            p.wire(&n1);
        }
        manifest(&d.manifests, "base.yaml", &base_yaml("client"));
        for (name, yaml) in policies {
            manifest(&d.manifests, name, yaml);
        }
        let agent = Agent::start(&n1, NODE, &d, &[]);
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

    /// [`World::new`] without policies, its agent restarted with `--keep-established-flows`.
    fn keeping_established_flows() -> Self {
        let mut w = World::new(&[]);
        drop(w.agent.take());
        w.start_agent(&["--keep-established-flows"]);
        w
    }

    /// Kills the agent (SIGKILL: nothing of ours is cleaned up, as after a crash).
    fn kill_agent(&mut self) {
        let agent = self.agent.take().expect("agent");
        agent.signal(nix::sys::signal::Signal::SIGKILL);
        drop(agent);
    }

    /// Starts an agent (none may be running) and waits until it is ready.
    fn start_agent(&mut self, args: &[&str]) {
        let agent = Agent::start(&self.n1, NODE, &self.d, args);
        assert!(
            agent.wait_ready(&self.n1, Duration::from_secs(10)),
            "agent never became ready"
        );
        self.agent = Some(agent);
    }

    /// Writes the target's attachment record as container `container` made it, and waits until
    /// the agent has bound the target's address to that record's veth.
    fn bind_target(&self, container: &str) {
        palisade_contract::records::write(&self.d.state, &target_record(container))
            .expect("write the record");
        assert!(
            wait_until(Duration::from_secs(10), || {
                let out =
                    self.n1
                        .try_exec(&["nft", "list", "set", "inet", "palisade", "sources_v4"]);
                String::from_utf8_lossy(&out.stdout).contains(TARGET)
            }),
            "the agent never committed the record"
        );
    }

    /// A replied (established) UDP flow from the client to the target, then a policy that denies
    /// it: kept, as `--keep-established-flows` asks. The target's echo server (to stop when the
    /// target goes) and the client (to keep).
    fn kept_udp_flow_to_target(&self) -> (Py, Py) {
        let log = self.log("old.log");
        let echo = Py::udp_echo_server(&self.target.ns, PORT, &log);
        let client = Py::udp_stream(&self.client.ns, TARGET, PORT);
        flowing(&log, "client -> old pod");
        self.deny_target_and_see_it_kept(&log, "client -> old pod");
        (echo, client)
    }

    /// The old target is gone: its server, its veth and the record of `container`.
    fn remove_target(&self, echo: Py, container: &str) {
        drop(echo);
        self.n1.ip(&["link", "del", &self.target.host_veth]);
        palisade_contract::records::remove(&self.d.state, container, "eth0")
            .expect("remove the record");
    }

    /// A new pod at the target's address (the Pod object keeps the deny policy over it), with its
    /// record as container `container` made it.
    fn new_target(&self, container: &str) -> Pod {
        let new = Pod::new(TARGET);
        new.wire(&self.n1);
        palisade_contract::records::write(&self.d.state, &target_record(container))
            .expect("write the record");
        new
    }

    /// None of the old target's flow reaches `new`, the pod now at its address.
    fn receives_nothing(&self, new: &Pod) {
        let new_log = self.log("new.log");
        let _r = Receiver::start(&new.ns, PORT, &new_log);
        std::thread::sleep(Duration::from_millis(1500));
        let got = arrivals(&new_log).len();
        assert_eq!(
            got, 0,
            "{got} datagrams of the old pod's flow reached the new pod at its address"
        );
    }

    /// A TCP connection from the client to the target and one to the other pod, a message per ms
    /// each, both flowing; their servers' logs (target, other) and the helpers to keep alive.
    fn two_tcp_flows(&self) -> (PathBuf, PathBuf, [Py; 4]) {
        let (cut_log, keep_log) = (self.log("target.log"), self.log("other.log"));
        let helpers = [
            Py::tcp_server(&self.target.ns, PORT, &cut_log),
            Py::tcp_server(&self.other.ns, PORT, &keep_log),
            Py::tcp_stream(&self.client.ns, TARGET, PORT),
            Py::tcp_stream(&self.client.ns, OTHER, PORT),
        ];
        flowing(&cut_log, "client -> target");
        flowing(&keep_log, "client -> other");
        (cut_log, keep_log, helpers)
    }

    /// Writes a deny-all ingress policy for the target.
    fn deny_target(&self) {
        manifest(
            &self.d.manifests,
            "deny.yaml",
            &deny_ingress_yaml("demo", "deny", "target"),
        );
    }

    /// With `--keep-established-flows`: denies the target, and the flow logged in `log` still
    /// delivers.
    fn deny_target_and_see_it_kept(&self, log: &Path, what: &str) {
        self.deny_target();
        std::thread::sleep(Duration::from_millis(300));
        survives(
            log,
            &format!("{what}, revoked, with --keep-established-flows"),
        );
    }

    fn log(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    /// Flows cut by every kind of sweep.
    fn flows_cut(&self) -> u64 {
        self.metric_sum("palisade_conntrack_flows_cut_total{")
    }

    /// The sum of the samples whose line starts with `prefix` (a name and the `{` of its labels).
    fn metric_sum(&self, prefix: &str) -> u64 {
        let (_, body) = self.n1.http(AGENT_PORT, "/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
            .sum()
    }
}

/// Waits until messages arrive steadily in `log` (the flow is up).
fn flowing(log: &Path, what: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || arrivals(log)
            .last()
            .is_some_and(|l| now() - l < 0.05)
            && arrivals(log).len() > 20),
        "control: {what} does not flow"
    );
}

/// Waits until nothing arrives in `log` for 0.5 s; returns the time of the last arrival after
/// `since` (the cut), in ms after `since`.
fn cut_within(log: &Path, since: f64, what: &str) -> f64 {
    assert!(
        wait_until(Duration::from_secs(10), || arrivals(log)
            .last()
            .is_some_and(|l| now() - l > 0.5)),
        "{what}: the revoked flow still delivers messages"
    );
    let last = arrivals(log).last().copied().unwrap_or(since);
    (last - since).max(0.0) * 1e3
}

/// Messages that arrived in `log` after `since`.
fn arrived_after(log: &Path, since: f64) -> usize {
    arrivals(log).into_iter().filter(|a| *a > since).count()
}

/// The flow the change does not concern still delivers: over 100 messages in the 0.5 s that start
/// 0.3 s from now.
fn survives(log: &Path, what: &str) {
    let t = now();
    std::thread::sleep(Duration::from_millis(800));
    let n = arrived_after(log, t + 0.3);
    assert!(
        n > 100,
        "{what}: only {n} messages in 0.5 s; a flow that kept its permission was cut"
    );
}

#[test]
fn an_established_tcp_connection_is_cut_when_a_new_policy_denies_it_and_others_survive() {
    let w = World::new(&[]);
    let (cut_log, keep_log, _flows) = w.two_tcp_flows();
    let before = w.flows_cut();

    let t_write = now();
    w.deny_target();
    let ms = cut_within(&cut_log, t_write, "deny-all ingress on target");
    eprintln!("tcp: established flow cut {ms:.1} ms after the policy was written");
    survives(&keep_log, "client -> other (not selected)");
    assert!(
        w.flows_cut() > before,
        "palisade_conntrack_flows_cut_total did not count the cut"
    );
    // What the sweeps cost is shown: the full ones read at least the flows set up here.
    assert!(
        w.metric_sum("palisade_conntrack_sweep_entries_total{kind=\"full\"") >= 2,
        "palisade_conntrack_sweep_entries_total did not count the entries a full sweep read"
    );
    // A new connection is refused as well (the rules, not only the sweep).
    let out = w.client.ns.try_exec(&[
        "python3",
        "-c",
        &format!("import socket\nsocket.create_connection(({TARGET:?},{PORT}),timeout=0.5)"),
    ]);
    assert!(
        !out.status.success(),
        "a new connection got through the deny"
    );
}

#[test]
fn a_revoked_flow_whose_server_keeps_answering_does_not_come_back_in_the_reply_direction() {
    // The echo server has unacknowledged data when the flow is cut: its retransmissions (200 ms,
    // 400 ms, ...) find no entry and would be tracked as a new flow from the server, which the
    // rules admit (the client is not isolated); the client's messages would then pass as replies.
    let w = World::new(&[]);
    let log = w.log("target.log");
    let _s = Py::tcp_echo_server(&w.target.ns, PORT, &log);
    let _c = Py::tcp_stream_reading(&w.client.ns, TARGET, PORT);
    flowing(&log, "client -> echoing target");
    let t_write = now();
    w.deny_target();
    let ms = cut_within(&log, t_write, "deny-all ingress on the echoing target");
    eprintln!("tcp echo: flow cut {ms:.1} ms after the policy was written");
    let t_cut = now();
    std::thread::sleep(Duration::from_secs(4));
    let back = arrived_after(&log, t_cut);
    assert_eq!(
        back, 0,
        "{back} messages reached the target after the cut: the flow came back through the server's retransmissions"
    );
}

#[test]
fn a_label_change_that_removes_permission_cuts_the_connection_it_allowed() {
    let w = World::new(&[("allow.yaml", ALLOW_CLIENT)]);
    let (cut_log, keep_log) = (w.log("target.log"), w.log("other.log"));
    let _s1 = Py::tcp_server(&w.target.ns, PORT, &cut_log);
    let _s2 = Py::tcp_server(&w.other.ns, PORT, &keep_log);
    let _c1 = Py::tcp_stream(&w.client.ns, TARGET, PORT);
    let _c2 = Py::tcp_stream(&w.client.ns, OTHER, PORT);
    flowing(&cut_log, "client -> target (allowed by allow-client)");
    flowing(&keep_log, "client -> other");

    let t_write = now();
    manifest(&w.d.manifests, "base.yaml", &base_yaml("intruder"));
    let ms = cut_within(&cut_log, t_write, "client relabelled app=intruder");
    eprintln!("tcp: flow cut {ms:.1} ms after the label change was written");
    survives(&keep_log, "client -> other (not isolated)");
}

#[test]
fn a_peer_label_change_cuts_a_flow_the_last_full_sweep_saw_without_walking_the_table() {
    // Another app=client pod elsewhere keeps allow-client's peer set (and its rule) in place when
    // the client leaves it, so the change is a commit of set elements only.
    let far = pod_yaml("demo", "far", "client", "node-2", Some("10.244.2.9"));
    let w = World::new(&[("allow.yaml", ALLOW_CLIENT), ("far.yaml", &far)]);
    let log = w.log("target.log");
    let _s = Py::tcp_server(&w.target.ns, PORT, &log);
    let _c = Py::tcp_stream(&w.client.ns, TARGET, PORT);
    flowing(&log, "client -> target (allowed by allow-client)");
    // A rule change (a new group for "other"): a full sweep, which sees client -> target.
    let full = || w.metric_sum("palisade_conntrack_sweeps_total{kind=\"full\"");
    let full_before = full();
    manifest(
        &w.d.manifests,
        "deny-other.yaml",
        &deny_ingress_yaml("demo", "deny-other", "other"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || full() > full_before),
        "no full sweep after the rule change"
    );
    let targeted = || w.metric_sum("palisade_conntrack_flows_cut_total{sweep=\"targeted\"");
    let before = targeted();
    // The client leaves the peer set of allow-client: a commit of set elements only.
    let t_write = now();
    manifest(&w.d.manifests, "base.yaml", &base_yaml("intruder"));
    let ms = cut_within(&log, t_write, "client relabelled app=intruder");
    eprintln!("tcp: known flow cut {ms:.1} ms after the label change was written");
    assert_eq!(
        targeted(),
        before + 1,
        "the flow was not cut by the targeted sweep of the moved address"
    );
}

#[test]
fn an_unrelated_change_cuts_no_allowed_long_lived_flow() {
    let w = World::new(&[("allow.yaml", ALLOW_CLIENT)]);
    let log = w.log("target.log");
    let _s = Py::tcp_server(&w.target.ns, PORT, &log);
    let _c = Py::tcp_stream(&w.client.ns, TARGET, PORT);
    flowing(&log, "client -> target (allowed by allow-client)");
    let before = w.flows_cut();
    // Another policy on another pod, then a deny on "other": commits, sweeps, nothing to cut here.
    manifest(
        &w.d.manifests,
        "deny-other.yaml",
        &deny_ingress_yaml("demo", "deny-other", "other"),
    );
    std::thread::sleep(Duration::from_millis(300));
    manifest(
        &w.d.manifests,
        "base.yaml",
        &format!(
            "{}{}",
            base_yaml("client"),
            pod_yaml("demo", "late", "late", NODE, Some("10.244.1.13"))
        ),
    );
    survives(&log, "client -> target (still allowed)");
    assert_eq!(
        w.flows_cut(),
        before,
        "a sweep cut a flow that kept its permission"
    );
}

#[test]
fn an_established_udp_flow_is_cut_when_a_new_policy_denies_it_and_others_survive() {
    let w = World::new(&[]);
    let (cut_log, keep_log) = (w.log("target.log"), w.log("other.log"));
    let _r1 = Receiver::start(&w.target.ns, PORT, &cut_log);
    let _r2 = Receiver::start(&w.other.ns, PORT, &keep_log);
    let _c1 = Py::udp_stream(&w.client.ns, TARGET, PORT);
    let _c2 = Py::udp_stream(&w.client.ns, OTHER, PORT);
    flowing(&cut_log, "udp client -> target");
    flowing(&keep_log, "udp client -> other");

    let t_write = now();
    w.deny_target();
    let ms = cut_within(&cut_log, t_write, "deny-all ingress on target (udp)");
    eprintln!("udp: established flow cut {ms:.1} ms after the policy was written");
    survives(&keep_log, "udp client -> other (not selected)");
}

#[test]
fn a_flow_opened_while_our_table_was_missing_is_cut_when_the_agent_restores_it() {
    let mut w = World::new(&[("deny.yaml", &deny_ingress_yaml("demo", "deny", "target"))]);
    let log = w.log("target.log");
    let _r = Receiver::start(&w.target.ns, PORT, &log);
    // The agent is down and our table is gone: the denied flow gets in.
    w.kill_agent();
    w.n1.exec(&["nft", "delete", "table", "inet", "palisade"]);
    let _c = Py::udp_stream(&w.client.ns, TARGET, PORT);
    flowing(&log, "udp client -> target while our table is missing");

    let t_start = now();
    w.start_agent(&[]);
    let ms = cut_within(&log, t_start, "flow opened in the gap");
    eprintln!(
        "udp: flow opened while the table was missing cut {ms:.1} ms after the agent started"
    );
}

#[test]
fn keep_established_flows_leaves_a_revoked_connection_alone() {
    let w = World::keeping_established_flows();
    let log = w.log("target.log");
    let _s = Py::tcp_server(&w.target.ns, PORT, &log);
    let _c = Py::tcp_stream(&w.client.ns, TARGET, PORT);
    flowing(&log, "client -> target");
    w.deny_target_and_see_it_kept(&log, "client -> target");
    let _ = (&w.other, &w.client);
}

/// A pod's established flows end with the pod, `--keep-established-flows` or not: a peer's flow to
/// a deleted pod's address went on to the next pod given that address, whatever that pod's
/// policies said (in the lab: every datagram of a replied UDP flow delivered to the new pod, which
/// denies all ingress). When the old pod's attachment record goes, the agent flushes the address's
/// conntrack entries; the flow's next datagram is a new one, which the policy drops.
/// The target's attachment record as container `container` made it (the veth its ids derive).
fn target_record(container: &str) -> palisade_contract::Attachment {
    palisade_contract::Attachment {
        container_id: container.into(),
        ifname: "eth0".into(),
        netns: "/var/run/netns/unused".into(),
        host_veth: palisade_contract::host_veth_name(container, "eth0"),
        ips: vec![TARGET.parse().unwrap()],
        pod_namespace: Some("demo".into()),
        pod_name: Some("target".into()),
        pod_uid: None,
        pending: false,
    }
}

#[test]
fn a_new_pod_at_a_deleted_pods_address_receives_none_of_its_flows_even_when_they_are_kept() {
    let w = World::keeping_established_flows();
    w.bind_target("revoke-old");
    let (echo, _client) = w.kept_udp_flow_to_target();

    // The old pod goes (its server, its veth, its record); its flows are flushed.
    let cut_before = w.metric_sum("palisade_conntrack_flows_cut_total{sweep=\"released\"}");
    w.remove_target(echo, "revoke-old");
    assert!(
        wait_until(Duration::from_secs(10), || w.metric_sum(
            "palisade_conntrack_flows_cut_total{sweep=\"released\"}"
        ) > cut_before),
        "the agent never flushed the flows of the released address"
    );
    let new = w.new_target("revoke-new");
    w.receives_nothing(&new);
    let _ = &w.other;
}

/// The same, with the pod deleted and its address given to a new pod while no agent ran (a
/// DaemonSet update, a crash): the restarted agent reads the bindings the old table still holds
/// before its first commit replaces it, and flushes the flows of the address whose pod changed.
/// Before, the first commit only recorded who held what, and the old pod's flow went on into the
/// new pod.
#[test]
fn a_pod_given_an_address_while_no_agent_ran_receives_none_of_its_predecessors_flows() {
    let mut w = World::keeping_established_flows();
    w.bind_target("restart-old");
    let (echo, _client) = w.kept_udp_flow_to_target();

    // No agent: the old pod goes and a new one gets its address (written before the restart,
    // judged after it).
    w.kill_agent();
    w.remove_target(echo, "restart-old");
    let new = w.new_target("restart-new");
    w.start_agent(&["--keep-established-flows"]);
    w.receives_nothing(&new);
    assert!(
        wait_until(Duration::from_secs(10), || w.metric_sum(
            "palisade_conntrack_flows_cut_total{sweep=\"released\"}"
        ) > 0),
        "the restarted agent never counted the flows it flushed for the address whose pod changed"
    );
    let _ = &w.other;
}

/// Benchmark (not in CI: `cargo test --release -p palisade-agent --test revoke_netns --
/// --ignored --nocapture a_change_written_during_a_sweep`): how long a policy change written while
/// a full conntrack sweep runs waits for its commit, beside one written while none runs, same
/// run. The node's conntrack table holds ~`FLOWS` UDP flows (other -> target, refreshed before
/// each pair); each change adds a deny-all on app=client (a rule change: a full sweep follows it
/// that judges every flow and cuts none). A commit is seen when the table lists the policy.
#[test]
#[ignore]
fn a_change_written_during_a_sweep_is_committed_without_waiting_for_it() {
    const FLOWS: u32 = 100_000;
    const PAIRS: usize = 10;
    let w = World::new(&[]);
    // ~FLOWS flows other -> target, one per (source port, destination port): 65,534 ports a socket.
    let fill = || {
        let mut left = FLOWS;
        for src_port in 5000.. {
            if left == 0 {
                break;
            }
            let ports = left.min(65_534);
            left -= ports;
            let script = format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{OTHER}',{src_port}))\nfor p in range(1,{}):\n s.sendto(b'x',('{TARGET}',p))\n",
                ports + 1
            );
            let out = Command::new("ip")
                .args(["netns", "exec", w.other.ns.name(), "python3", "-c", &script])
                .output()
                .expect("python");
            assert!(out.status.success(), "{out:?}");
        }
    };
    // Writes a deny-all on app=client named `name`; the ms until the table lists it.
    let commit_ms = |name: &str| -> f64 {
        let t_write = now();
        manifest(
            &w.d.manifests,
            &format!("{name}.yaml"),
            &deny_ingress_yaml("demo", name, "client"),
        );
        let needle = format!("demo/{name}");
        loop {
            let out = w.n1.try_exec(&["nft", "list", "table", "inet", "palisade"]);
            if String::from_utf8_lossy(&out.stdout).contains(&needle) {
                return (now() - t_write) * 1e3;
            }
            assert!(now() - t_write < 10.0, "{name} never committed");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let (mut idle, mut during) = (Vec::new(), Vec::new());
    for i in 0..PAIRS {
        fill();
        // The sweep credit back; then alone: no sweep runs when it is written.
        std::thread::sleep(Duration::from_millis(2500));
        idle.push(commit_ms(&format!("a{i}")));
        std::thread::sleep(Duration::from_millis(2500));
        // Behind a sweep: b starts one (its commit is ~ms), c comes 50 ms later.
        commit_ms(&format!("b{i}"));
        std::thread::sleep(Duration::from_millis(50));
        during.push(commit_ms(&format!("c{i}")));
    }
    let sweeps = w.metric_sum("palisade_conntrack_sweeps_total{kind=\"full\"");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mi, md) = (med(&mut idle), med(&mut during));
    eprintln!("flows {FLOWS}; full sweeps {sweeps}");
    eprintln!("commit after write, ms, alone: {idle:.1?}");
    eprintln!("commit after write, ms, during a sweep: {during:.1?}");
    eprintln!(
        "median alone {mi:.1} ms, during a sweep {md:.1} ms, ratio {:.2}",
        md / mi
    );
}
