//! Tampering with our table behind the agent's back, in network namespaces we create (root; never
//! the host's own namespace): every kind of change is restored at once (the drift monitor, not the
//! resync), a denied probe flood gets nothing through after the restore, our own churn never
//! triggers a restore, and another process's commit during our quiet one is caught, not missed.

mod agent_support;

use agent_support::*;
use palisade_testkit::nft::normalized;
use serde_json::Value;
use std::time::{Duration, Instant};

const NODE: &str = "n1";
const PORT: u16 = 7001;
const CLIENT: &str = "10.244.1.11";
const TARGET: &str = "10.244.1.10";

/// A node with a client and a target pod; the target denies all ingress; probes flow client → target.
struct Lab {
    agent: Agent,
    n1: Netns,
    _pods: (Pod, Pod),
    d: AgentDirs,
    t: TempDir,
}

fn lab(extra: &[&str]) -> Lab {
    let n1 = Netns::router("ptn");
    let t = temp_dir("pa-tamper");
    let d = AgentDirs::new(&t);
    let client = Pod::new(CLIENT);
    let target = Pod::new(TARGET);
    client.wire(&n1);
    target.wire(&n1);
    let base = format!(
        "{}{}{}{}",
        node_yaml(NODE, &["10.244.1.0/24"], &["192.168.77.1"]),
        namespace_yaml("demo"),
        pod_yaml("demo", "client", "client", NODE, Some(CLIENT)),
        pod_yaml("demo", "target", "target", NODE, Some(TARGET)),
    );
    manifest(&d.manifests, "base.yaml", &base);
    let agent = Agent::start(&n1, NODE, &d, extra);
    assert!(
        agent.wait_ready(&n1, Duration::from_secs(10)),
        "agent never became ready"
    );
    Lab {
        agent,
        n1,
        _pods: (client, target),
        d,
        t,
    }
}

/// One sample of the agent's /metrics by its name with labels (`None`: not exported yet).
fn sample(ns: &Netns, name: &str) -> Option<u64> {
    let (_, m) = ns.http(AGENT_PORT, "/metrics").expect("metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A gauge or counter the agent always exports.
fn metric(ns: &Netns, name: &str) -> u64 {
    sample(ns, name).unwrap_or_else(|| panic!("{name} in /metrics"))
}

fn restores(ns: &Netns) -> u64 {
    metric(ns, "palisade_resync_restores_total")
}

/// The handle of the `counter drop` that ends the target's ingress group chain (`in_<group>`).
fn drop_rule_handle(ns: &Netns) -> (String, String) {
    let o = ns.try_exec(&["nft", "-a", "-j", "list", "table", "inet", "palisade"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("listing");
    for item in v["nftables"].as_array().expect("items") {
        let r = &item["rule"];
        let chain = r["chain"].as_str().unwrap_or_default();
        let drops = r["expr"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x.get("drop").is_some()));
        if chain.starts_with("in_") && drops {
            return (chain.to_string(), r["handle"].to_string());
        }
    }
    panic!("no drop rule in an in_ chain: {v}");
}

/// The tamperings of issue 11, as `nft` argument lists run in the node namespace.
fn tamperings(ns: &Netns) -> Vec<(&'static str, Vec<String>)> {
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let (chain, handle) = drop_rule_handle(ns);
    vec![
        (
            "flush chain",
            words("flush chain inet palisade postrouting"),
        ),
        ("flush map", words("flush map inet palisade ingress_v4")),
        (
            "delete element",
            words(&format!(
                "delete element inet palisade ingress_v4 {{ {TARGET} }}"
            )),
        ),
        (
            "add element",
            words("add element inet palisade ingress_v4 { 10.244.1.99 : accept }"),
        ),
        (
            "insert accept",
            words("insert rule inet palisade postrouting accept"),
        ),
        (
            "delete rule",
            words(&format!(
                "delete rule inet palisade {chain} handle {handle}"
            )),
        ),
        ("flush ruleset", words("flush ruleset")),
        ("delete table", words("delete table inet palisade")),
    ]
}

#[test]
fn every_kind_of_tampering_is_restored_at_once_and_no_denied_probe_passes_after() {
    tamper_and_check(&[]);
}

#[test]
fn on_the_exec_backend_too_every_tampering_is_restored_once_and_its_own_nft_is_not_taken_for_one() {
    tamper_and_check(&["--nft-backend", "exec"]);
}

#[test]
fn without_the_lockdown_a_table_gone_is_restored_in_full_with_no_lockdown_first() {
    tamper_and_check(&["--restore-lockdown=false"]);
}

fn tamper_and_check(extra: &[&str]) {
    let lockdown_on = !extra.contains(&"--restore-lockdown=false");
    // Default resync (30 s): every restore below must come from the drift monitor.
    let s = lab(extra);
    let log = s.t.path().join("arrivals.log");
    let _rx = Receiver::start(&s._pods.1.ns, PORT, &log);
    let _tx = Sender::start(&s._pods.0.ns, TARGET, PORT, 2);
    assert!(
        wait_until(Duration::from_secs(10), || arrivals(&log).len() > 5),
        "control: probes do not arrive without policy"
    );
    manifest(
        &s.d.manifests,
        "deny.yaml",
        &deny_ingress_yaml("demo", "deny", "target"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || arrivals(&log)
            .last()
            .is_some_and(|l| now() - l > 0.3)),
        "probes still arrive after the deny policy"
    );
    std::thread::sleep(Duration::from_millis(300)); // past the post-commit read-back
    let before = normalized(&s.n1.table().expect("our table"));
    let mut restored = 0;
    let mut lockdowns = 0;
    for k in 0..tamperings(&s.n1).len() {
        // Listed anew each time: a restore gives our rules new handles.
        let (kind, args) = tamperings(&s.n1).swap_remove(k);
        let mut cmd = vec!["nft"];
        cmd.extend(args.iter().map(String::as_str));
        let t0 = Instant::now();
        let t_wall = now();
        let out = s.n1.try_exec(&cmd);
        assert!(
            out.status.success(),
            "{kind}: nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let back = wait_until(Duration::from_secs(5), || {
            s.n1.table().is_some_and(|l| normalized(&l) == before)
        });
        let took = t0.elapsed();
        if !back {
            let now_listing = s.n1.table().map(|l| normalized(&l));
            let b = before.to_string();
            let n = now_listing.map(|v| v.to_string()).unwrap_or_default();
            let at = b.bytes().zip(n.bytes()).take_while(|(x, y)| x == y).count();
            panic!(
                "{kind}: table not restored within 5 s; first difference at byte {at}:\nbefore: {}\nnow:    {}",
                &b[at.saturating_sub(200)..(at + 300).min(b.len())],
                &n[at.saturating_sub(200)..(at + 300).min(n.len())]
            );
        }
        let t_back = now();
        restored += 1;
        std::thread::sleep(Duration::from_millis(300));
        let a = arrivals(&log);
        let gap = a.iter().filter(|x| **x >= t_wall && **x <= t_back).count();
        let after = a.iter().filter(|x| **x > t_back + 0.05).count();
        eprintln!(
            "{kind:>14}: restored within {:.0} ms (polled, including nft's own run); {gap} probes in the gap, {after} after",
            took.as_secs_f64() * 1e3
        );
        assert_eq!(after, 0, "{kind}: probes got through after the restore");
        assert!(
            took < Duration::from_secs(2),
            "{kind}: restore took {took:?}: the resync did it, not the monitor"
        );
        assert_eq!(
            restores(&s.n1),
            restored,
            "{kind}: one tampering, one restore"
        );
        // A table gone is restored in full, the lockdown table first; what a repair can name
        // is put back without one.
        lockdowns += u64::from(lockdown_on && matches!(kind, "flush ruleset" | "delete table"));
        assert_eq!(
            metric(&s.n1, "palisade_restore_lockdowns_total"),
            lockdowns,
            "{kind}: a lockdown ahead of each full restore, and only then"
        );
    }
    // No restore loop: the count stays where it is.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        restores(&s.n1),
        restored,
        "restores went on without tampering"
    );
    let _ = &s.agent;
}

#[test]
fn our_own_churn_of_policies_pods_and_pending_marks_never_triggers_a_restore() {
    for backend in ["lib", "exec"] {
        // A 1 s resync: periodic full replaces (ours) happen during the churn too.
        let s = lab(&[
            "--nft-backend",
            backend,
            "--resync-seconds",
            "1",
            "--debounce-ms",
            "5",
        ]);
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_secs(4) {
            // Policies come and go, pods change labels and appear: incremental commits.
            manifest(
                &s.d.manifests,
                "deny.yaml",
                &deny_ingress_yaml("demo", &format!("deny{}", i % 3), "target"),
            );
            let label = if i.is_multiple_of(2) {
                "target"
            } else {
                "other"
            };
            let extra = format!(
                "{}{}",
                pod_yaml("demo", "target", label, NODE, Some(TARGET)),
                pod_yaml(
                    "demo",
                    &format!("p{i}"),
                    "client",
                    NODE,
                    Some(&format!("10.244.1.{}", 20 + i % 200))
                ),
            );
            manifest(&s.d.manifests, "churn.yaml", &extra);
            // The plugin's pending marks, from another process: legitimate.
            let mark = format!("10.244.1.{}", 100 + i % 100);
            let out = s.n1.try_exec(&[
                "nft",
                "add",
                "element",
                "inet",
                "palisade",
                "pending_v4",
                "{",
                &mark,
                "}",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // (A periodic full replace may have removed the mark already: it has no record.)
            let _ = s.n1.try_exec(&[
                "nft",
                "delete",
                "element",
                "inet",
                "palisade",
                "pending_v4",
                "{",
                &mark,
                "}",
            ]);
            std::thread::sleep(Duration::from_millis(20));
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(1500));
        let (_, m) = s.n1.http(AGENT_PORT, "/metrics").expect("metrics");
        let commits: u64 = m
            .lines()
            .filter(|l| l.starts_with("palisade_reconcile_duration_seconds_count"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        eprintln!("{backend}: {i} churn rounds, {commits} commits, 0 restores expected");
        assert!(commits > 5, "{backend}: the churn was not committed: {m}");
        assert_eq!(
            restores(&s.n1),
            0,
            "{backend}: our own commits woke a restore: {m}"
        );
        let _ = &s.agent;
    }
}

/// Another process committing all the time (kube-proxy does, to tables of its own) while the agent
/// commits large batches with its drift monitor out of the notification group (a policy that
/// brings 20k peer addresses: ~400 KB of set elements): a transaction landing unseen in that window
/// is caught by the generation check (`Commit::Unheard`) and our table replaced in full, counted
/// as such and not as a restore; the table then is what the agent builds from the same inputs from
/// scratch. The end-to-end side of `nft::Nft::commit_batch_quietly`'s edge tests.
#[test]
fn a_commit_by_another_process_during_our_quiet_commit_is_caught_and_our_table_replaced() {
    const PEERS: usize = 20_000;
    let s = lab(&[]);
    let mut peers = namespace_yaml("peers");
    for i in 0..PEERS {
        let ip = format!("10.245.{}.{}", i / 250, 1 + i % 250);
        peers.push_str(&pod_yaml(
            "peers",
            &format!("p{i}"),
            "peer",
            "n2",
            Some(&ip),
        ));
    }
    manifest(&s.d.manifests, "peers.yaml", &peers);
    assert!(
        wait_until(Duration::from_secs(30), || metric(&s.n1, "palisade_pods")
            as usize
            > PEERS),
        "the agent never held the peer pods"
    );
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-peers, namespace: demo}\nspec: {podSelector: {matchLabels: {app: target}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: peer}}}]}]}\n";
    // kube-proxy's stand-in: a table of its own added and deleted without pause.
    let committer = std::process::Command::new("ip")
        .args(["netns", "exec", s.n1.name(), "sh", "-c"])
        .arg("while :; do nft add table inet kp && nft delete table inet kp; done")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the committer");
    let committer = palisade_testkit::process::KillOnDrop::from(committer);
    let mut rounds = 0;
    while metric(&s.n1, "palisade_unheard_commits_total") == 0 && rounds < 10 {
        rounds += 1;
        manifest(&s.d.manifests, "policy.yaml", policy);
        assert!(
            wait_until(
                Duration::from_secs(20),
                || metric(&s.n1, "palisade_nft_set_elements") as usize > PEERS
            ),
            "round {rounds}: the peer set never came"
        );
        std::fs::remove_file(s.d.manifests.join("policy.yaml")).unwrap();
        assert!(
            wait_until(
                Duration::from_secs(20),
                || (metric(&s.n1, "palisade_nft_set_elements") as usize) < PEERS
            ),
            "round {rounds}: the peer set never went"
        );
    }
    drop(committer);
    let unheard = metric(&s.n1, "palisade_unheard_commits_total");
    eprintln!("{unheard} unheard commits in {rounds} rounds");
    assert!(
        unheard > 0,
        "no quiet commit of {rounds} met another process's transaction"
    );
    assert_eq!(restores(&s.n1), 0, "a collision was counted as tampering");
    // The table is the one a fresh agent builds from the same inputs.
    manifest(&s.d.manifests, "policy.yaml", policy);
    assert!(wait_until(
        Duration::from_secs(20),
        || metric(&s.n1, "palisade_nft_set_elements") as usize > PEERS
    ));
    std::thread::sleep(Duration::from_millis(500));
    let ours = normalized(&s.n1.table().expect("our table"));
    let Lab { agent, n1, d, .. } = s;
    drop(agent);
    let fresh = Agent::start(&n1, NODE, &d, &[]);
    assert!(fresh.wait_ready(&n1, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ours == normalized(&n1.table().expect("our table")),
        "the table after the collisions differs from a fresh agent's"
    );
}

/// The peer set of `n` elements in our table (name), and the chains whose rules name it.
fn peer_set_of(ns: &Netns, n: usize) -> Option<(String, Vec<String>)> {
    let v: Value = serde_json::from_str(&ns.table()?).ok()?;
    let items = v["nftables"].as_array()?;
    let set = items.iter().find_map(|i| {
        let s = &i["set"];
        let name = s["name"].as_str()?;
        let len = s["elem"].as_array().map_or(0, Vec::len);
        (name.starts_with("peer_") && len == n).then(|| name.to_string())
    })?;
    let mut chains: Vec<String> = items
        .iter()
        .filter_map(|i| {
            let r = &i["rule"];
            r["expr"]
                .to_string()
                .contains(&format!("\"@{set}\""))
                .then(|| r["chain"].as_str().map(str::to_string))?
        })
        .collect();
    chains.dedup();
    Some((set, chains))
}

/// Errors of a kind counted in /metrics (0 when none was).
fn errors(ns: &Netns, kind: &str) -> u64 {
    sample(ns, &format!("palisade_errors_total{{kind=\"{kind}\"}}")).unwrap_or(0)
}

/// A set that shrank is held by the kernel at the larger size it was declared with, and the
/// agent counts on that size (`DeclaredSizes`), so it is not recreated when it grows back. A set
/// deleted behind our back and put back by a repair is declared anew at its elements' size: the
/// agent must then forget the larger size, or the next growth fills the set past the size the
/// kernel holds (ENFILE), the batch is refused and the table replaced in full.
#[test]
fn a_set_put_back_by_a_repair_is_not_counted_on_at_the_larger_size_it_had() {
    let s = lab(&[]);
    let peers = |n: usize| {
        let mut y = namespace_yaml("peers");
        for i in 0..n {
            y.push_str(&pod_yaml(
                "peers",
                &format!("p{i}"),
                "peer",
                "n2",
                Some(&format!("10.245.0.{}", 10 + i)),
            ));
        }
        y
    };
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-peers, namespace: demo}\nspec: {podSelector: {matchLabels: {app: target}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: peer}}}]}]}\n";
    manifest(&s.d.manifests, "policy.yaml", policy);
    // 12 peers (size 12), 13 (recreated at 24), 12 again: held at 24.
    for n in [12, 13, 12] {
        manifest(&s.d.manifests, "peers.yaml", &peers(n));
        assert!(
            wait_until(Duration::from_secs(10), || peer_set_of(&s.n1, n).is_some()),
            "the peer set never held {n}"
        );
    }
    let (set, chains) = peer_set_of(&s.n1, 12).unwrap();
    assert!(!chains.is_empty(), "no rule names {set}");
    // Deleted behind our back (its rules first), then put back by the repair at size 12.
    let mut script = String::new();
    for c in &chains {
        script.push_str(&format!("flush chain inet palisade {c}\n"));
    }
    script.push_str(&format!("delete set inet palisade {set}\n"));
    let path = s.t.path().join("tamper.nft");
    std::fs::write(&path, script).unwrap();
    let out = s.n1.try_exec(&["nft", "-f", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || restores(&s.n1) == 1
            && peer_set_of(&s.n1, 12).is_some()),
        "the set was not put back"
    );
    // 13 peers: the set must be recreated at 24, not filled past the 12 the kernel holds.
    manifest(&s.d.manifests, "peers.yaml", &peers(13));
    assert!(
        wait_until(Duration::from_secs(10), || peer_set_of(&s.n1, 13).is_some()),
        "the peer set never held 13 again"
    );
    assert_eq!(
        errors(&s.n1, "nft_rejected"),
        0,
        "a batch was refused: the repaired set was counted on at its old size"
    );
    let _ = &s.agent;
}
