//! The lab's own behaviour: the CLI round trip (up, probe --json, apply, label, delete, down), the
//! demo, and that nothing is left behind after a normal run, a panic, a signal or a crash.
//! Needs root and the binaries: run `cargo build --workspace --bins` first (or set PALISADE_BIN_DIR).

use palisade_netns_tests::lab::{self, Bins, Lab, LabOptions};
use palisade_netns_tests::{netns, process};
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
    assert_nothing_left(&name);
}

/// Starts `up` and waits until the lab has pods (so there is plenty to leave behind).
fn start_up_and_wait_for_pods(name: &str) -> std::process::Child {
    let mut up = cli(name);
    let log = std::env::temp_dir().join(format!("palisade-lab-{name}.log"));
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
    child
}

#[test]
fn down_after_a_crash_removes_everything() {
    let name = lab::unique_name();
    let _guard = DownOnDrop(name.clone());
    let mut child = start_up_and_wait_for_pods(&name);
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
    let child = start_up_and_wait_for_pods(&name);
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
    s
}

#[test]
fn a_lab_never_touches_the_host_network_namespace() {
    let before = host_snapshot();
    let name = lab::unique_name();
    let mut opts = LabOptions::new(&name);
    opts.external = true;
    let mut lab = Lab::up(&opts).unwrap();
    let pods = palisade_netns_tests::k8s::read_path(&repo().join("examples/demo")).unwrap();
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
