//! The flow log (issue 16): a denied connection is one line naming both pods and the policy that
//! isolates the destination; an admitted one is none (the lab's agents log drops only); a flood of
//! denied SYNs reaches the agent at the configured rate at most, and the agent keeps enforcing.

use super::{apply, expect_reach, pod_ip, policy, target, with_cleanup, TestResult};
use palisade_netns_tests::lab::{self, Family, Lab};
use palisade_netns_tests::probe::Protocol;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const DENY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flow-deny, namespace: x}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}";

/// The agent's defaults (`--flow-log-rate`, `--flow-log-burst`), which the lab keeps.
const RATE: f64 = 100.0;
const BURST: f64 = 200.0;

fn flow_log_of(lab: &Lab, pod: &str) -> Result<PathBuf, String> {
    let node = &lab.pod(pod).map_err(|e| e.to_string())?.node;
    let n = lab.node_state(node).map_err(|e| e.to_string())?;
    Ok(n.dir.join(lab::FLOW_LOG))
}

/// The lines of the log after byte `from`.
fn lines_after(path: &PathBuf, from: usize) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(from..)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("flow log line {l:?}: {e}")))
        .collect()
}

fn len(path: &PathBuf) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

fn is(line: &Value, from: &str, to: &str, port: u16) -> bool {
    line["source"]["pod"] == from
        && line["destination"]["pod"] == to
        && line["destination"]["port"] == port
}

/// Sum of `palisade_flow_log_packets_total` of a node's agent: packets the kernel handed over.
fn logged_packets(lab: &Lab, node: &str) -> Result<f64, String> {
    Ok(lab
        .agent_metrics(node)?
        .lines()
        .filter(|l| l.starts_with("palisade_flow_log_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub fn a_denied_connection_is_one_line_naming_both_pods_and_the_isolating_policy(
    lab: &mut Lab,
) -> TestResult {
    with_cleanup(lab, "flow log", |lab| {
        apply(lab, policy(DENY))?;
        let xa = pod_ip(lab, "x/a", Family::V4)?;
        let yb = pod_ip(lab, "y/b", Family::V4)?;
        let to_xa = target("x/a", xa, 80, Protocol::Tcp);
        expect_reach(lab, &[("y/a", to_xa.clone(), false)])?;
        // That probe's line is written by now; what follows is the measured probes'.
        std::thread::sleep(Duration::from_millis(300));
        let log = flow_log_of(lab, "x/a")?;
        let from = len(&log);
        let yb_log = flow_log_of(lab, "y/b")?;
        let from_yb = len(&yb_log);
        // One denied connection, one admitted one (x/a may send anywhere).
        expect_reach(lab, &[("y/a", to_xa, false)])?;
        expect_reach(lab, &[("x/a", target("y/b", yb, 80, Protocol::Tcp), true)])?;
        std::thread::sleep(Duration::from_millis(500));
        let mut lines = lines_after(&log, from)?;
        // The admitted connection is judged on y/b's node too (the same file when it is x/a's).
        if yb_log != log {
            lines.extend(lines_after(&yb_log, from_yb)?);
        }
        let denied: Vec<&Value> = lines.iter().filter(|l| is(l, "y/a", "x/a", 80)).collect();
        if denied.len() != 1 {
            return Err(format!(
                "expected one line for y/a -> x/a:80, got {}: {lines:?}",
                denied.len()
            ));
        }
        let d = denied[0];
        let ok = d["verdict"] == "dropped"
            && d["direction"] == "ingress"
            && d["protocol"] == "TCP"
            && d["policies"] == serde_json::json!(["x/flow-deny"])
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("x/flow-deny"));
        if !ok {
            return Err(format!("the line does not say what decided: {d}"));
        }
        if lines.iter().any(|l| is(l, "x/a", "y/b", 80)) {
            return Err(format!(
                "an admitted connection was logged (the lab logs drops only): {lines:?}"
            ));
        }
        Ok(())
    })
}

pub fn a_flood_of_denied_syns_is_logged_at_the_configured_rate_and_enforcement_goes_on(
    lab: &mut Lab,
) -> TestResult {
    with_cleanup(lab, "flow log flood", |lab| {
        apply(lab, policy(DENY))?;
        let xa = pod_ip(lab, "x/a", Family::V4)?;
        let ya = pod_ip(lab, "y/a", Family::V4)?;
        expect_reach(lab, &[("y/a", target("x/a", xa, 80, Protocol::Tcp), false)])?;
        let node = lab.pod("x/a").map_err(|e| e.to_string())?.node.clone();
        let log = flow_log_of(lab, "x/a")?;
        let (lines_before, packets_before) = (len(&log), logged_packets(lab, &node)?);
        let netns = lab.pod("y/a").map_err(|e| e.to_string())?.netns.clone();
        let probe = lab.state().bins.probe();
        let start = Instant::now();
        // 100k SYNs from y/a's own address, each its own connection attempt.
        let out = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(&probe)
            .args(["forge", "--source", &ya.to_string(), "--count", "100000"])
            .arg(format!("tcp:{}", SocketAddr::new(xa, 80)))
            .output()
            .map_err(|e| format!("flood: {e}"))?;
        if !out.status.success() {
            return Err(format!("flood: {}", String::from_utf8_lossy(&out.stderr)));
        }
        // While the kernel still drains it: an unrelated change is enforced as usual.
        let change = Instant::now();
        apply(
            lab,
            policy(
                "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flow-unrelated, namespace: z}
spec: {podSelector: {matchLabels: {pod: c}}, policyTypes: [Ingress]}",
            ),
        )?;
        let zc = pod_ip(lab, "z/c", Family::V4)?;
        expect_reach(lab, &[("y/b", target("z/c", zc, 80, Protocol::Tcp), false)])?;
        let enforced = change.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let elapsed = start.elapsed().as_secs_f64();
        let packets = logged_packets(lab, &node)? - packets_before;
        let lines = lines_after(&log, lines_before)?
            .into_iter()
            .filter(|l| is(l, "y/a", "x/a", 80))
            .count() as f64;
        let bound = BURST + RATE * (elapsed + 1.0);
        println!(
            "    flood: 100k SYNs; the agent was handed {packets} packets and wrote {lines} lines in {elapsed:.1} s (bound {bound:.0}); an unrelated change was enforced {} ms after it was written",
            enforced.as_millis()
        );
        if packets > bound || lines > packets {
            return Err(format!("{packets} packets / {lines} lines reached the agent in {elapsed:.1} s: more than the rate allows ({bound:.0})"));
        }
        if lines < BURST / 2.0 {
            return Err(format!("only {lines} lines for 100k denied SYNs: the flood did not meet the drop, or the log lost them"));
        }
        Ok(())
    })
}

/// `palisade_policy_packets_total` of one policy and verdict on a node (summed over directions), and
/// whether the policy has any series there.
fn policy_packets(
    lab: &Lab,
    node: &str,
    policy: &str,
    verdict: &str,
) -> Result<(f64, bool), String> {
    let metrics = lab.agent_metrics(node)?;
    let of_policy: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("palisade_policy_packets_total{"))
        .filter(|l| l.contains(&format!("policy=\"{policy}\"")))
        .collect();
    let n = of_policy
        .iter()
        .filter(|l| l.contains(&format!("verdict=\"{verdict}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Ok((n, !of_policy.is_empty()))
}

const ALLOW_YA: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flow-allow-ya, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: a}}}]}]";

pub fn per_policy_counters_move_with_the_probes_they_count_and_go_with_the_policy(
    lab: &mut Lab,
) -> TestResult {
    with_cleanup(lab, "per-policy counters", |lab| {
        apply(lab, policy(DENY))?;
        let xa = pod_ip(lab, "x/a", Family::V4)?;
        let node = lab.pod("x/a").map_err(|e| e.to_string())?.node.clone();
        expect_reach(lab, &[("y/b", target("x/a", xa, 80, Protocol::Tcp), false)])?;
        // The agent's full replaces (every tenth resync) start the kernel's counters from zero;
        // the series carry what they held, so they only count up.
        let (dropped, _) = policy_packets(lab, &node, "flow-deny", "drop")?;
        for _ in 0..3 {
            expect_reach(lab, &[("y/b", target("x/a", xa, 80, Protocol::Tcp), false)])?;
        }
        // A scrape that finds the agent's engine busy answers with what the engine last said
        // (policy_metrics: it never waits long), so a new policy's series may show a scrape later.
        super::poll(Duration::from_secs(5), || {
            let (now, _) = policy_packets(lab, &node, "flow-deny", "drop")?;
            if now < dropped + 3.0 {
                return Err(format!(
                    "3 denied probes moved flow-deny's drop counter from {dropped} to {now}"
                ));
            }
            Ok(())
        })?;
        apply(lab, policy(ALLOW_YA))?;
        expect_reach(lab, &[("y/a", target("x/a", xa, 80, Protocol::Tcp), true)])?;
        super::poll(Duration::from_secs(5), || {
            let (allowed, _) = policy_packets(lab, &node, "flow-allow-ya", "allow")?;
            if allowed < 1.0 {
                return Err("an admitted probe did not move flow-allow-ya's allow counter".into());
            }
            Ok(())
        })?;
        lab.delete_all_policies().map_err(|e| e.to_string())?;
        super::poll(Duration::from_secs(5), || {
            match policy_packets(lab, &node, "flow-deny", "drop")? {
                (_, false) => Ok(()),
                (_, true) => Err("a deleted policy's series are still in /metrics".into()),
            }
        })
    })
}

const AUDIT_DENY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flow-audit-deny, namespace: x, annotations: {palisade.dev/audit: \"true\"}}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}";

pub fn a_deny_all_in_audit_mode_drops_nothing_and_logs_what_it_would_drop(
    lab: &mut Lab,
) -> TestResult {
    with_cleanup(lab, "audit mode", |lab| {
        apply(lab, policy(AUDIT_DENY))?;
        let xa = pod_ip(lab, "x/a", Family::V4)?;
        let log = flow_log_of(lab, "x/a")?;
        // The policy is compiled (its audit chain exists) before the probe counts.
        let node = lab.pod("x/a").map_err(|e| e.to_string())?.node.clone();
        super::poll(Duration::from_secs(5), || {
            match policy_packets(lab, &node, "flow-audit-deny", "would_drop")? {
                (_, true) => Ok(()),
                _ => Err("the audited policy has no counter yet".into()),
            }
        })?;
        let from = len(&log);
        // Every probe connects (nothing is dropped); the first ones may run before the commit
        // that brings the audit chain, so each source probes until its line is there.
        for src in ["y/a", "z/b"] {
            super::poll(Duration::from_secs(5), || {
                expect_reach(lab, &[(src, target("x/a", xa, 80, Protocol::Tcp), true)])?;
                std::thread::sleep(Duration::from_millis(200));
                let lines = lines_after(&log, from)?;
                let l: Vec<&Value> = lines.iter().filter(|l| is(l, src, "x/a", 80)).collect();
                let ok = !l.is_empty()
                    && l.iter().all(|l| {
                        l["verdict"] == "would_drop"
                            && l["policies"] == serde_json::json!(["x/flow-audit-deny"])
                    });
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "{src} -> x/a: want would_drop lines naming x/flow-audit-deny: {lines:?}"
                    ))
                }
            })?;
        }
        let lines = lines_after(&log, from)?;
        if lines.iter().any(|l| l["verdict"] == "dropped") {
            return Err(format!("audit mode dropped something: {lines:?}"));
        }
        Ok(())
    })
}
