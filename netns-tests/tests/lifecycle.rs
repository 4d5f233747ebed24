//! The lab's own behaviour: the CLI round trip (up, probe --json, apply, label, delete, down), the
//! demo, and that nothing is left behind after a normal run, a panic, a signal or a crash.
//! Needs root and the binaries: run `cargo build --workspace --bins` first (or set PALISADE_BIN_DIR).

use palisade_netns_tests::lab::{self, Bins, Lab, LabOptions};
use palisade_netns_tests::{netns, process};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cli(name: &str) -> Command {
    let bin = Bins::from_env().dir.join("palisade-lab");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let mut c = Command::new(bin);
    c.args(["--name", name]).current_dir(repo());
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("palisade-lab runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}\nstdout: {}",
        c,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces of a lab still present.
fn leftover_netns(name: &str) -> Vec<String> {
    std::fs::read_dir(netns::NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("pl-{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_nothing_left(name: &str) {
    assert_eq!(
        leftover_netns(name),
        Vec::<String>::new(),
        "namespaces of lab {name} left behind"
    );
    assert_eq!(
        process::lab_pids(name),
        Vec::<u32>::new(),
        "processes of lab {name} left behind"
    );
    assert!(
        !Path::new(lab::RUN_ROOT).join(name).exists(),
        "run dir of lab {name} left behind"
    );
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Record {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    connected: bool,
}

fn probe_json(name: &str) -> Vec<Record> {
    let mut c = cli(name);
    c.args(["probe", "--json", "--ports", "80", "--protocols", "tcp"]);
    run_ok(c)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("probe --json line {l:?}: {e}")))
        .collect()
}

fn connected(records: &[Record], from: &str, to: &str) -> bool {
    records
        .iter()
        .find(|r| r.from == from && r.to == to)
        .unwrap_or_else(|| panic!("no probe {from} -> {to}"))
        .connected
}

/// Polls the CLI's JSON until `check` holds (2 s, the convergence bound).
fn eventually(name: &str, what: &str, check: impl Fn(&[Record]) -> bool) {
    let start = Instant::now();
    loop {
        let r = probe_json(name);
        if check(&r) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: not observed within 2 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct DownOnDrop(String);
impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = lab::down_run_dir(&Path::new(lab::RUN_ROOT).join(&self.0));
    }
}

#[test]
fn cli_round_trip_up_probe_apply_label_delete_down_leaves_nothing() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let mut up = cli(&name);
    up.args(["up", "examples/demo"]);
    let out = run_ok(up);
    assert!(out.contains("shop/frontend"), "{out}");

    let records = probe_json(&name);
    assert_eq!(records.len(), 12, "4 pods: 12 ordered pairs");
    assert!(
        records
            .iter()
            .all(|r| r.connected && r.port == 80 && r.protocol == "TCP"),
        "{records:?}"
    );

    let mut apply = cli(&name);
    apply.args(["apply", "-f", "examples/demo/policies"]);
    run_ok(apply);
    eventually(&name, "policies in force", |r| {
        connected(r, "shop/frontend", "shop/backend")
            && !connected(r, "guest/visitor", "shop/backend")
            && !connected(r, "shop/frontend", "shop/db")
            && connected(r, "shop/db", "guest/visitor")
    });

    // A label on the namespace plus the pod grants access through a policy we add, and removing it revokes.
    let dir = std::env::temp_dir().join(format!("palisade-lab-test-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let pol = dir.join("trusted.yaml");
    std::fs::write(
        &pol,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-from-trusted, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {trust: 'yes'}}\n      podSelector: {matchLabels: {role: trusted}}\n",
    )
    .unwrap();
    let mut apply = cli(&name);
    apply.arg("apply").arg("-f").arg(&pol);
    run_ok(apply);
    let mut label = cli(&name);
    label.args(["label", "pod", "guest/visitor", "role=trusted"]);
    run_ok(label);
    let mut label = cli(&name);
    label.args(["label", "ns", "guest", "trust=yes"]);
    run_ok(label);
    eventually(&name, "labels grant visitor -> db", |r| {
        connected(r, "guest/visitor", "shop/db")
    });
    let mut label = cli(&name);
    label.args(["label", "ns", "guest", "trust-"]);
    run_ok(label);
    eventually(&name, "removing the namespace label revokes", |r| {
        !connected(r, "guest/visitor", "shop/db")
    });

    let mut bad = cli(&name);
    bad.args(["label", "ns", "guest", "kubernetes.io/metadata.name=other"]);
    assert!(
        !bad.output().unwrap().status.success(),
        "the API server's namespace name label is immutable"
    );

    let mut delete = cli(&name);
    delete.args(["delete", "-f", "examples/demo/policies"]);
    run_ok(delete);
    let mut delete = cli(&name);
    delete.arg("delete").arg("-f").arg(&pol);
    run_ok(delete);
    eventually(&name, "all allowed after deleting the policies", |r| {
        r.iter().all(|r| r.connected)
    });

    let mut down = cli(&name);
    down.arg("down");
    run_ok(down);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_nothing_left(&name);
}

#[test]
fn demo_explains_the_change_and_leaves_nothing() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let mut demo = cli(&name);
    demo.args(["demo", "examples/demo"]);
    let out = run_ok(demo);
    assert!(
        out.contains("guest/visitor -> shop/backend TCP/80: connected -> blocked"),
        "{out}"
    );
    assert!(
        out.contains("shop/frontend -> shop/backend TCP/80"),
        "{out}"
    );
    assert!(
        !out.contains("shop/frontend -> shop/backend TCP/80: connected -> blocked"),
        "{out}"
    );
    assert!(out.contains("X!"), "changed cells are marked: {out}");
    // It ends with the flow log: each blocked connection with the policies that isolate its target.
    assert!(
        out.contains("guest/visitor -> shop/backend TCP/80: dropped at ingress by shop/allow-frontend-to-backend, shop/default-deny-ingress"),
        "{out}"
    );
    assert!(
        !out.contains("shop/frontend -> shop/backend TCP/80: dropped"),
        "an allowed connection is not in the flow log: {out}"
    );
    assert_nothing_left(&name);
}

#[test]
fn cluster_tiers_demo_enforces_admin_networkpolicy_and_baseline_tiers() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let mut demo = cli(&name);
    demo.args(["demo", "examples/cluster-tiers"]);
    let out = run_ok(demo);
    for blocked in [
        // Admin tier Deny: another namespace into payments.
        "shop/frontend -> payments/api TCP/80: connected -> blocked",
        // Baseline tier Deny: guests.
        "guest/visitor -> monitoring/prometheus TCP/80: connected -> blocked",
    ] {
        assert!(out.contains(blocked), "{blocked}: {out}");
    }
    for kept in [
        // Admin tier Accept.
        "monitoring/prometheus -> payments/api TCP/80",
        // Admin tier Pass, then nothing denies.
        "payments/ledger -> payments/api TCP/80",
    ] {
        assert!(out.contains(kept), "{kept}: {out}");
        assert!(
            !out.contains(&format!("{kept}: connected -> blocked")),
            "{out}"
        );
    }
    // The NetworkPolicy overrides the baseline for the frontend.
    assert!(
        !out.contains("guest/visitor -> shop/frontend TCP/80: connected -> blocked"),
        "{out}"
    );
    assert!(
        out.contains("5 of 20 pod-to-pod connections are now blocked"),
        "{out}"
    );
    assert_nothing_left(&name);
}

/// Starts `up` and waits until the lab has pods (so there is plenty to leave behind). Its stderr
/// goes to a file in the returned directory (removed when it is dropped).
fn start_up_and_wait_for_pods(
    name: &str,
) -> (std::process::Child, palisade_testkit::temp::TempDir) {
    let mut up = cli(name);
    let dir = palisade_testkit::temp::temp_dir("palisade-lab-up");
    let log = dir.path().join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    up.args(["up", "examples/demo"])
        .stdout(Stdio::null())
        .stderr(file);
    let mut child = up.spawn().unwrap();
    let start = Instant::now();
    while !netns::exists(&format!("pl-{name}-p1")) {
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "up exited ({status}) before lab {name} got a pod: {}",
                log_text()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "lab {name} never got a pod: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, dir)
}

#[test]
fn down_after_a_crash_removes_everything() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let (mut child, _log) = start_up_and_wait_for_pods(&name);
    child.kill().unwrap(); // SIGKILL: no handler runs, like a crash.
    child.wait().unwrap();
    assert!(
        !leftover_netns(&name).is_empty(),
        "the crash left nothing to clean: the test proves nothing"
    );
    assert!(
        !process::lab_pids(&name).is_empty(),
        "agents should still be running after the crash"
    );
    let mut down = cli(&name);
    down.arg("down");
    run_ok(down);
    assert_nothing_left(&name);
}

#[test]
fn sigint_during_up_tears_the_lab_down() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let (child, _log) = start_up_and_wait_for_pods(&name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "an interrupted up must not report success"
    );
    assert_nothing_left(&name);
}

#[test]
fn a_panic_while_a_lab_is_up_leaves_nothing_behind() {
    let name = lab::unique_name();
    let n = name.clone();
    let r = std::panic::catch_unwind(move || {
        let lab = Lab::up(&LabOptions::new(&n)).unwrap();
        assert!(!leftover_netns(lab.name()).is_empty());
        panic!("test panic while the lab is up");
    });
    assert!(r.is_err());
    assert_nothing_left(&name);
}

#[test]
fn up_refuses_a_second_lab_of_the_same_name_and_bad_names() {
    let name = lab::unique_name();
    let lab = Lab::up(&LabOptions::new(&name)).unwrap();
    let again = Lab::up(&LabOptions::new(&name));
    assert!(
        again.is_err(),
        "a second lab with the same name must be refused"
    );
    drop(again);
    assert!(
        !leftover_netns(&name).is_empty(),
        "refusing must not tear down the running lab"
    );
    assert!(Lab::up(&LabOptions::new("Bad/Name")).is_err());
    lab.down().unwrap();
    assert_nothing_left(&name);
}

/// Links, addresses, routes (v4 and v6) and sysctls of the host's own namespace.
fn host_snapshot() -> String {
    let mut s = String::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        let out = Command::new("ip").args(args).output().expect("ip runs");
        // Counters and timers change on their own; keep names, flags, addresses and routes.
        let text = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(" valid_lft").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        s.push_str(&text);
    }
    for f in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        s.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    // nftables (and iptables-nft, which the chained portmap uses): read only; counters change on
    // their own.
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft runs");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        s.push_str(line.split(" counter packets").next().unwrap_or(line));
        s.push('\n');
    }
    s
}

#[test]
fn a_lab_never_touches_the_host_network_namespace() {
    let before = host_snapshot();
    let name = lab::unique_name();
    let mut opts = LabOptions::new(&name);
    opts.external = true;
    let mut lab = Lab::up(&opts).unwrap();
    let mut pods = palisade_netns_tests::k8s::read_path(&repo().join("examples/demo")).unwrap();
    // A hostPort: the chained portmap writes iptables rules, in the node's namespace only.
    pods.extend(
        palisade_netns_tests::k8s::parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: hostport, namespace: shop}\nspec:\n  nodeName: node1\n  containers:\n  - {name: c, ports: [{containerPort: 80, hostPort: 18080}]}\n",
            "hostPort pod",
        )
        .unwrap(),
    );
    lab.apply(pods).unwrap();
    lab.wait_pods_ready(Duration::from_secs(30)).unwrap();
    let during = host_snapshot();
    lab.down().unwrap();
    let after = host_snapshot();
    assert_eq!(
        before, during,
        "the host namespace changed while the lab was up"
    );
    assert_eq!(
        before, after,
        "the host namespace changed after the lab was removed"
    );
    assert_nothing_left(&name);
}

/// Issue 11 item 7: `palisade-lab` could not restart a node's agent, and `status` did not show a
/// dead one.
#[test]
fn status_shows_a_dead_agent_and_restart_agent_brings_it_back_with_the_same_args() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let mut up = cli(&name);
    up.args(["up", "examples/demo"]);
    run_ok(up);

    let out = run_ok({
        let mut c = cli(&name);
        c.arg("status");
        c
    });
    assert_eq!(out.matches("running  /healthz 200").count(), 2, "{out}");

    let lab = Lab::open(Path::new(lab::RUN_ROOT), &name).unwrap();
    let node2 = lab.state().nodes[1].clone();
    let old_pid = node2.agent_pid.expect("node2 has an agent");
    let old_args = node2.agent_args.clone();
    assert!(!old_args.is_empty(), "the agent's args were not recorded");
    // The agent dies (as a crash would): status says so and fails.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = Instant::now();
    while process::alive(old_pid as i32) && gone.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = cli(&name).arg("status").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "status succeeded with a dead agent: {stdout}"
    );
    assert!(
        stdout.contains("node2")
            && stdout.contains("DEAD")
            && stdout.contains("restart-agent node2"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run_ok({
        let mut c = cli(&name);
        c.args(["restart-agent", "node2"]);
        c
    });
    assert!(out.contains("node2: agent restarted"), "{out}");
    let lab = Lab::open(Path::new(lab::RUN_ROOT), &name).unwrap();
    let node2 = &lab.state().nodes[1];
    let new_pid = node2.agent_pid.expect("node2 has an agent again");
    assert_ne!(new_pid, old_pid);
    assert_eq!(node2.agent_args, old_args, "restarted with other args");
    assert!(lab.agent_health("node2").unwrap().healthy());

    // A live agent restarts too (stopped by its pid, not by name).
    let out = run_ok({
        let mut c = cli(&name);
        c.args(["restart-agent", "node1"]);
        c
    });
    assert!(out.contains("node1: agent restarted"), "{out}");
    let out = run_ok({
        let mut c = cli(&name);
        c.arg("status");
        c
    });
    assert_eq!(out.matches("running  /healthz 200").count(), 2, "{out}");
    // Both agents still enforce nothing in the demo: every pair connects.
    assert!(probe_json(&name).iter().all(|r| r.connected));

    let mut down = cli(&name);
    down.arg("down");
    run_ok(down);
    assert_nothing_left(&name);
}

/// Writes `files` into a fresh directory for one test; returns it.
fn yaml_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-lab-test-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

fn status(name: &str) -> String {
    let mut c = cli(name);
    c.arg("status");
    run_ok(c)
}

/// The CLI for the pods a plain lab could not make: `up` takes a hostNetwork pod (run in its
/// node with the node's addresses) and a pod starting Pending (an object without an address);
/// `phase` starts it, terminates another (its object keeps the address, `status` lists it), a new
/// pod asks for that address with `palisade-lab/ips` and gets it; phases never move back.
#[test]
fn cli_host_network_pods_phases_and_requested_ips() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let dir = yaml_dir(
        &name,
        &[(
            "pods.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: app, labels: {app: web}}\nspec:\n  nodeName: node1\n  containers:\n  - {name: c, ports: [{containerPort: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: hn, namespace: app}\nspec:\n  nodeName: node2\n  hostNetwork: true\n  containers:\n  - {name: c, ports: [{containerPort: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: later, namespace: app, annotations: {palisade-lab/phase: Pending}}\nspec:\n  nodeName: node1\n  containers:\n  - {name: c, ports: [{containerPort: 80}]}\n",
        )],
    );
    let mut up = cli(&name);
    up.arg("up").arg(&dir);
    let out = run_ok(up);
    assert!(out.contains("app/web") && out.contains("app/hn"), "{out}");
    let lab = Lab::open(Path::new(lab::RUN_ROOT), &name).unwrap();
    let node2 = lab.node_state("node2").unwrap();
    let hn = lab.pod("app/hn").unwrap();
    assert_eq!(hn.netns, node2.netns, "a hostNetwork pod runs in its node");
    assert!(hn
        .ips
        .contains(&IpAddr::V4(lab::node_underlay_v4(node2.index))));
    let web_ip = lab.pod("app/web").unwrap().ips[0];
    assert!(
        lab.pod("app/later").is_err(),
        "a Pending pod has no sandbox"
    );
    let s = status(&name);
    assert!(
        s.lines()
            .any(|l| l.contains("app/later") && l.contains("Pending")),
        "{s}"
    );
    // The hostNetwork pod is probed at its node's address, from its node's namespace.
    let r = probe_json(&name);
    assert!(connected(&r, "app/hn", "app/web") && connected(&r, "app/web", "app/hn"));

    run_ok({
        let mut c = cli(&name);
        c.args(["phase", "app/web", "Succeeded"]);
        c
    });
    let s = status(&name);
    assert!(
        s.lines().any(|l| l.contains("app/web")
            && l.contains("Succeeded")
            && l.contains(&web_ip.to_string())),
        "a terminated pod keeps its address: {s}"
    );
    let back = cli(&name)
        .args(["phase", "app/web", "Running"])
        .output()
        .unwrap();
    assert!(!back.status.success(), "a Succeeded pod ran again");

    let reuse = dir.join("reuse.yaml");
    std::fs::write(
        &reuse,
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: reuse, namespace: app, annotations: {{palisade-lab/ips: '{web_ip}'}}}}\nspec:\n  nodeName: node1\n  containers:\n  - {{name: c, ports: [{{containerPort: 80}}]}}\n"),
    )
    .unwrap();
    let mut apply = cli(&name);
    apply.arg("apply").arg("-f").arg(&reuse);
    run_ok(apply);
    run_ok({
        let mut c = cli(&name);
        c.args(["phase", "app/later", "Running"]);
        c
    });
    let lab = Lab::open(Path::new(lab::RUN_ROOT), &name).unwrap();
    assert_eq!(lab.pod("app/reuse").unwrap().ips[0], web_ip);
    assert!(!lab.pod("app/later").unwrap().ips.is_empty());
    let r = probe_json(&name);
    assert!(connected(&r, "app/later", "app/reuse") && connected(&r, "app/hn", "app/later"));

    let mut down = cli(&name);
    down.arg("down");
    run_ok(down);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_nothing_left(&name);
}

/// A broken link of the conflist chain (here: portmap missing from CNI_PATH) fails the pod as a
/// runtime would, and the lab tears the half-made sandbox down: palisade's DEL ran (no attachment
/// record, no IPAM reservation), no pod namespace and no Pod object are left.
#[test]
fn broken_conflist_chain_fails_the_pod_and_leaves_no_sandbox() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let dir = yaml_dir(
        &name,
        &[
            ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n"),
            (
                "pod.yaml-later",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: app}\nspec:\n  nodeName: node1\n  containers:\n  - {name: c, ports: [{containerPort: 80, hostPort: 18080}]}\n",
            ),
        ],
    );
    let empty = dir.join("no-cni-plugins-here");
    std::fs::create_dir_all(&empty).unwrap();
    let mut up = cli(&name);
    up.arg("up").arg(&dir);
    run_ok(up);
    let mut apply = cli(&name);
    apply
        .env(palisade_netns_tests::cni::CNI_PATH_ENV, &empty)
        .args(["apply", "-f"])
        .arg(dir.join("pod.yaml-later"));
    let out = apply.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ADD without portmap succeeded");
    assert!(
        stderr.contains("plugin portmap (2/2)") && stderr.contains("not found in CNI_PATH"),
        "{stderr}"
    );
    let lab = Lab::open(Path::new(lab::RUN_ROOT), &name).unwrap();
    assert!(
        lab.pod("app/web").is_err(),
        "the failed pod is still in the lab"
    );
    assert!(lab
        .read_object(&palisade_netns_tests::k8s::ObjKey::new("Pod", "app", "web"))
        .is_err());
    let node1 = lab.node_state("node1").unwrap();
    let records: Vec<_> = std::fs::read_dir(node1.dir.join("state/attachments"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(records.is_empty(), "attachment records left: {records:?}");
    let mut reserved = Vec::new();
    for net in std::fs::read_dir(node1.dir.join("ipam")).unwrap().flatten() {
        for f in std::fs::read_dir(net.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.file_name().to_string_lossy().parse::<IpAddr>().is_ok() {
                reserved.push(f.path());
            }
        }
    }
    assert!(reserved.is_empty(), "IPAM reservations left: {reserved:?}");
    let pod_netns: Vec<String> = leftover_netns(&name)
        .into_iter()
        .filter(|n| !n.ends_with("-ul") && !n.contains("-node"))
        .collect();
    assert!(pod_netns.is_empty(), "pod namespaces left: {pod_netns:?}");

    let mut down = cli(&name);
    down.arg("down");
    run_ok(down);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_nothing_left(&name);
}

/// Packets each counted source sent to the external host's port 80 (TCP, both families), from the
/// counting table the test put in the external namespace.
fn counted_sources(ext: &str, sources: &[IpAddr]) -> Vec<(IpAddr, u64)> {
    sources
        .iter()
        .map(|s| {
            let n = netns::counted(ext, "seen", &format!("saddr {s} "))
                .unwrap_or_else(|e| panic!("{e}"));
            (*s, n)
        })
        .collect()
}

/// Issue 12, a lab that behaves like a cluster: in the routed topology (nodes on two segments,
/// the router knows node addresses only) the external host sits behind the nodes' router, their
/// default gateway. A pod on either segment reaches it through its node's egress NAT (the host
/// sees the node's address, never a pod's) while pod to pod across the segments rides the overlay
/// with pod addresses, and the outside cannot reach a pod (no route to any pod range).
#[test]
fn a_routed_lab_s_pods_reach_the_outside_through_their_node_s_nat_over_the_default_route() {
    use palisade_netns_tests::probe::{Protocol, Target};
    use std::net::SocketAddr;
    let name = lab::unique_name();
    let mut opts = LabOptions::new(&name);
    opts.topology = lab::Topology::Routed;
    opts.external = true;
    let mut lab = Lab::up(&opts).unwrap();
    let pods = palisade_netns_tests::k8s::parse_documents(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec:\n  nodeName: node1\n  containers:\n  - {name: c, ports: [{containerPort: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\nspec:\n  nodeName: node2\n  containers:\n  - {name: c, ports: [{containerPort: 80}]}\n",
        "two pods",
    )
    .unwrap();
    lab.apply(pods).unwrap();
    lab.wait_pods_ready(Duration::from_secs(30)).unwrap();
    let ext = lab
        .state()
        .external
        .clone()
        .expect("an external host")
        .netns;
    let (a, b) = (
        lab.pod("x/a").unwrap().clone(),
        lab.pod("x/b").unwrap().clone(),
    );
    let nodes: Vec<IpAddr> = lab
        .state()
        .nodes
        .iter()
        .flat_map(|n| {
            [
                IpAddr::V4(lab::node_underlay_v4(n.index)),
                IpAddr::V6(lab::node_underlay_v6(n.index)),
            ]
        })
        .collect();
    let pod_ips: Vec<IpAddr> = a.ips.iter().chain(&b.ips).copied().collect();
    let mut rules = String::new();
    for s in nodes.iter().chain(&pod_ips) {
        let fam = if s.is_ipv4() { "ip" } else { "ip6" };
        rules.push_str(&format!("    {fam} saddr {s} tcp dport 80 counter\n"));
    }
    netns::nft(
        &ext,
        &format!("table inet seen {{\n  chain pre {{\n    type filter hook prerouting priority -500; policy accept;\n{rules}  }}\n}}\n"),
    )
    .unwrap();
    for n in &lab.state().nodes {
        for six in [false, true] {
            let mut args = vec!["-n", n.netns.as_str()];
            if six {
                args.push("-6");
            }
            args.extend(["route", "show", "default"]);
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("default via"),
                "{} has no default route (IPv6: {six})",
                n.name
            );
        }
    }
    let target = |id: &str, ip: IpAddr, port: u16, protocol: Protocol| Target {
        id: id.to_string(),
        addr: SocketAddr::new(ip, port),
        protocol,
    };
    let outside = [
        target("external", IpAddr::V4(lab::EXTERNAL_V4), 80, Protocol::Tcp),
        target("external", IpAddr::V6(lab::EXTERNAL_V6), 80, Protocol::Tcp),
        target("external", IpAddr::V4(lab::EXTERNAL_V4), 81, Protocol::Udp),
    ];
    let encapsulated = lab.encapsulated_packets().unwrap();
    let mut checks: Vec<(String, Vec<Target>, &str)> = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        checks.push((from.netns.clone(), outside.to_vec(), lab::EXTERNAL_NAME));
        let peers = to
            .ips
            .iter()
            .map(|ip| target(&to.key(), *ip, 80, Protocol::Tcp))
            .collect();
        checks.push((from.netns.clone(), peers, "x/"));
    }
    let start = Instant::now();
    loop {
        let wrong: Vec<String> = checks
            .iter()
            .flat_map(|(netns, targets, want)| {
                lab.probe_from_netns(netns, targets, lab::DEFAULT_PROBE_TIMEOUT)
                    .unwrap()
                    .into_iter()
                    .filter(move |o| {
                        !(o.connected && o.reply.as_deref().is_some_and(|r| r.starts_with(want)))
                    })
                    .map(move |o| format!("{netns} -> {} {}: {o:?}", o.addr, o.protocol))
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not every probe answered: {wrong:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (src, n) in counted_sources(&ext, &nodes) {
        assert!(
            n > 0,
            "the external host saw nothing from node address {src}"
        );
    }
    for (src, n) in counted_sources(&ext, &pod_ips) {
        assert_eq!(n, 0, "the external host saw pod address {src}: no NAT");
    }
    assert!(
        lab.encapsulated_packets().unwrap() > encapsulated,
        "pod to pod across the segments did not ride the overlay"
    );
    // The outside has no route to a pod: it reaches none.
    let to_pods: Vec<Target> = b
        .ips
        .iter()
        .map(|ip| target("x/b", *ip, 80, Protocol::Tcp))
        .collect();
    for o in lab
        .probe_from_netns(&ext, &to_pods, lab::DEFAULT_PROBE_TIMEOUT)
        .unwrap()
    {
        assert!(!o.connected, "the external host reached a pod: {o:?}");
    }
    lab.down().unwrap();
    assert_nothing_left(&name);
}
