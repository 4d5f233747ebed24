//! The markdown report of a run: latencies per scenario and size, churn and heartbeat windows, and
//! the verdicts against the issue's targets.

use super::*;

/// The irrelevant-events target, one line per size with both windows, judged from the figures, with
/// the same run's enforcement p99 (no churn) and RSS beside it.
pub(super) fn irrelevant_verdicts(run: &RunResults) -> Vec<String> {
    let mut out = Vec::new();
    let mut sizes: Vec<usize> = run.irrelevant.iter().map(|w| w.pods).collect();
    sizes.dedup();
    for pods in sizes {
        let at = |busy: bool| {
            run.irrelevant
                .iter()
                .find(|w| w.pods == pods && (w.rate > 0) == busy)
        };
        let (Some(idle), Some(busy)) = (at(false), at(true)) else {
            continue;
        };
        let cpu_above = busy.cpu_percent() - idle.cpu_percent();
        let cpu_ok = cpu_above <= 5.0;
        let count = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}"));
        // No work for them: not one reconcile or lock acquisition more than in the idle window.
        let work_ok = match (
            busy.reconciles,
            idle.reconciles,
            busy.lock_acquisitions,
            idle.lock_acquisitions,
        ) {
            (Some(br), Some(ir), Some(bl), Some(il)) => Some(br <= ir && bl <= il),
            _ => None,
        };
        let verdict = match work_ok {
            Some(true) if cpu_ok => "met",
            Some(_) => "NOT met",
            None if cpu_ok => "not judged (reconcile/lock counters absent; CPU part met)",
            None => "NOT met (CPU; reconcile/lock counters absent)",
        };
        let short = if busy.writes_per_second() < 0.9 * f64::from(busy.rate) {
            format!(
                " (the writer fell short of {}/s: judged at the rate achieved)",
                busy.rate
            )
        } else {
            String::new()
        };
        out.push(format!(
            "- Irrelevant events at {pods} pods / {} policies: {:.0} Pod status writes/s achieved{short}, {} reached the agent as unchanged changes ({} changed); reconciles {} (idle window {}), node-lock acquisitions {} (idle {}), agent CPU {:.1} % of a core vs {:.1} % idle (**{cpu_above:+.1} %**); target no reconcile and no lock for them, CPU ≤ 5 % of a core above idle: **{verdict}**.",
            busy.policies,
            busy.writes_per_second(),
            count(busy.unchanged),
            count(busy.changed),
            count(busy.reconciles),
            count(idle.reconciles),
            count(busy.lock_acquisitions),
            count(idle.lock_acquisitions),
            busy.cpu_percent(),
            idle.cpu_percent(),
        ));
        // The same run's latency and memory, beside BENCHMARKS.md's figures.
        let quiet: Vec<&ScenarioResult> = run
            .scenarios
            .iter()
            .filter(|r| r.pods == pods && r.churn_per_second == 0)
            .collect();
        let worst_p99 = quiet
            .iter()
            .flat_map(|r| {
                [
                    ScenarioResult::summary(&r.grant_ms).1,
                    ScenarioResult::summary(&r.revoke_ms).1,
                ]
            })
            .fold(f64::NAN, f64::max);
        let best_p99 = quiet
            .iter()
            .flat_map(|r| {
                [
                    ScenarioResult::summary(&r.grant_ms).1,
                    ScenarioResult::summary(&r.revoke_ms).1,
                ]
            })
            .fold(f64::NAN, f64::min);
        let trial_rss = quiet
            .iter()
            .map(|r| r.agent_after.rss_kib)
            .max()
            .unwrap_or(0) as f64
            / 1024.0;
        let (was_p99, was_rss) = if pods >= 10_000 {
            (
                " (BENCHMARKS.md, old/new pair of 2026-12-04 at load 2–4: p99 37–67 ms old engine, 37–59 ms new; 17–22 ms before flow revocation at load 1.3)",
                " (BENCHMARKS.md: 51–53 MiB old engine, 47.5–49 MiB new)",
            )
        } else {
            ("", "")
        };
        out.push(format!(
            "- Same run at {pods} pods: enforcement p99 (no churn, every change) {best_p99:.1}–{worst_p99:.1} ms{was_p99}; agent RSS {:.1} MiB idle, {:.1} MiB under the heartbeats, {trial_rss:.1} MiB after the trials{was_rss}.",
            idle.rss_kib as f64 / 1024.0,
            busy.rss_kib as f64 / 1024.0,
        ));
    }
    out
}

/// Markdown for the enforcement results.
pub fn markdown(run: &RunResults, costs: &[CompileCost]) -> String {
    use std::fmt::Write;
    let results = &run.scenarios;
    let metrics = &run.metrics;
    let mut o = String::new();
    if run.resync_seconds > 0 && run.resync_seconds < super::NO_RESYNC {
        let _ = writeln!(
            o,
            "The agent ran with `--resync-seconds {}`: its periodic full replaces are in the CPU, latency and peak RSS figures.\n",
            run.resync_seconds
        );
    }
    if !run.first_sync_seconds.is_empty() {
        let _ = writeln!(o, "### Agent start → first sync committed (conflist written)\n\n| pods | seconds |\n|---|---|");
        for (p, s) in &run.first_sync_seconds {
            let _ = writeln!(o, "| {p} | {s:.2} |");
        }
        o.push('\n');
    }
    if !run.churn.is_empty() {
        let _ = writeln!(o, "### Agent under churn alone (no probe trials)\n\n| pods | policies | churn/s | writes | wall s | agent CPU s | CPU share of one core | RSS MiB | peak RSS MiB | reconciles | mean reconcile ms |\n|---|---|---|---|---|---|---|---|---|---|---|");
        for c in &run.churn {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.1} | {:.2} | {:.0} % | {:.1} | {:.1} | {:.0} | {:.1} |",
                c.pods,
                c.policies,
                c.rate,
                c.writes,
                c.wall_seconds,
                c.agent_cpu_seconds,
                100.0 * c.agent_cpu_seconds / c.wall_seconds.max(1e-9),
                c.rss_kib as f64 / 1024.0,
                c.hwm_kib as f64 / 1024.0,
                c.reconciles,
                c.reconcile_mean_ms
            );
        }
        o.push('\n');
    }
    if !run.irrelevant.is_empty() {
        let _ = writeln!(o, "### Irrelevant events: Pod status heartbeats that change nothing compiled (agent counters per second of the window; n/a: the agent does not export the counter)\n\n| pods | policies | window | heartbeat files | writes/s | agent CPU % of one core | RSS MiB | reconciles/s | lock acquisitions/s | unchanged changes/s | changed changes/s | transactions/s | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let rate = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
        for w in &run.irrelevant {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.1} |",
                w.pods,
                w.policies,
                if w.rate == 0 {
                    "idle".to_string()
                } else {
                    format!("{}/s heartbeats", w.rate)
                },
                w.files,
                w.writes_per_second(),
                w.cpu_percent(),
                w.rss_kib as f64 / 1024.0,
                rate(w.per_second(w.reconciles)),
                rate(w.per_second(w.lock_acquisitions)),
                rate(w.per_second(w.unchanged)),
                rate(w.per_second(w.changed)),
                rate(w.per_second(w.transactions)),
                w.wall_seconds
            );
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "### Enforcement latency (ms, change written → probe flips; probe period 1 ms)\n"
    );
    let _ = writeln!(o, "| pods | policies | churn/s | flood | change | grant p50 | grant p99 | grant max | revoke p50 | revoke p99 | revoke max | n (grant/revoke) | failed | denied packets/s | flow-log packets/s |");
    let _ = writeln!(
        o,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in results {
        let (g50, g99, gmax) = ScenarioResult::summary(&r.grant_ms);
        let (r50, r99, rmax) = ScenarioResult::summary(&r.revoke_ms);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {g50:.1} | {g99:.1} | {gmax:.1} | {r50:.1} | {r99:.1} | {rmax:.1} | {}/{} | {} | {} | {:.0} |",
            r.pods, r.policies, r.churn_per_second, if r.flood { "SYN flood" } else { "-" }, r.scenario.name(), r.grant_ms.len(), r.revoke_ms.len(), r.failures,
            // The server's group chain (and its drop counter) is replaced whenever the set of
            // policies selecting it changes: only label and pod changes keep it.
            if matches!(r.scenario, Scenario::Label | Scenario::Pod) {
                format!("{:.0}", r.dropped_packets / r.wall_seconds.max(0.001))
            } else {
                "n/a".to_string()
            },
            r.flow_log_packets / r.wall_seconds.max(0.001)
        );
    }
    if !run.revocations.is_empty() {
        let _ = writeln!(o, "\n### Revocation of an established TCP flow (ms; one message per ms on one connection; revoke = allow policy removed → send time of the first message whose echo never came; grant = the same run's policy create → probe flip, and allow-stream written → stream connected)\n");
        let _ = writeln!(o, "| pods | policies | churn/s | policy grant p50 | policy grant p99 | stream grant p50 | stream grant p99 | flow cut p50 | flow cut p99 | flow cut max | n | not cut / failed |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for v in &run.revocations {
            let (pg50, pg99, _) = results
                .iter()
                .find(|r| {
                    r.pods == v.pods
                        && r.churn_per_second == v.churn_per_second
                        && r.scenario == Scenario::Policy
                })
                .map(|r| ScenarioResult::summary(&r.grant_ms))
                .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
            let (g50, g99, _) = ScenarioResult::summary(&v.grant_ms);
            let (r50, r99, rmax) = ScenarioResult::summary(&v.revoke_ms);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {pg50:.1} | {pg99:.1} | {g50:.1} | {g99:.1} | {r50:.1} | {r99:.1} | {rmax:.1} | {} | {} |",
                v.pods, v.policies, v.churn_per_second, v.revoke_ms.len(), v.failures
            );
        }
    }
    let _ = writeln!(o, "\n### Agent CPU and memory during each scenario\n");
    let _ = writeln!(o, "| pods | churn/s (writes) | change | wall s | agent CPU s | CPU share of one core | RSS MiB | peak RSS MiB |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in results {
        let cpu = r.agent_after.cpu_seconds - r.agent_before.cpu_seconds;
        let _ = writeln!(
            o,
            "| {} | {} ({}) | {} | {:.1} | {:.2} | {:.0} % | {:.1} | {:.1} |",
            r.pods,
            r.churn_per_second,
            r.churn_writes,
            r.scenario.name(),
            r.wall_seconds,
            cpu,
            100.0 * cpu / r.wall_seconds.max(1e-9),
            r.agent_after.rss_kib as f64 / 1024.0,
            r.agent_after.hwm_kib as f64 / 1024.0
        );
    }
    if !costs.is_empty() {
        let _ = writeln!(o, "\n### Compiler cost per change, in process: the agent's incremental compiler (stage + batch, netlink messages built) beside a full compile of the node + diff (same batch, checked by its JSON, rendered outside the timing)\n");
        let _ = writeln!(o, "| pods | policies | initial compile ms | initial batch KiB | incremental p50 ms | p99 ms | max ms | full compile + diff p50 ms | p99 ms | batch bytes p50 | p99 | commands p50 |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for c in costs {
            let (a, b, m) = ScenarioResult::summary(&c.change_ms);
            let (fa, fb, _) = ScenarioResult::summary(&c.full_change_ms);
            let _ = writeln!(
                o,
                "| {} | {} | {:.1} | {:.0} | {a:.2} | {b:.2} | {m:.2} | {fa:.2} | {fb:.2} | {:.0} | {:.0} | {:.0} |",
                c.pods,
                c.policies,
                c.initial_compile_ms,
                c.initial_batch_bytes as f64 / 1024.0,
                median(&c.batch_bytes).unwrap_or(f64::NAN),
                quantile(&c.batch_bytes, 0.99).unwrap_or(f64::NAN),
                median(&c.batch_commands).unwrap_or(f64::NAN)
            );
        }
    }
    let _ = writeln!(o, "\n### Targets\n");
    for r in results
        .iter()
        .filter(|r| r.churn_per_second == 0 && r.pods >= 10_000)
    {
        let (_, g99, _) = ScenarioResult::summary(&r.grant_ms);
        let (_, r99, _) = ScenarioResult::summary(&r.revoke_ms);
        let worst = g99.max(r99);
        let verdict = if worst < 100.0 { "met" } else { "NOT met" };
        let _ = writeln!(o, "- {} at {} pods: p99 grant {g99:.1} ms, revoke {r99:.1} ms; target p99 < 100 ms: **{verdict}**.", r.scenario.name(), r.pods);
    }
    for v in run
        .revocations
        .iter()
        .filter(|v| v.churn_per_second == 0 && v.pods >= 10_000)
    {
        let (_, r99, _) = ScenarioResult::summary(&v.revoke_ms);
        let verdict = if r99 <= 100.0 && v.failures == 0 {
            "met"
        } else {
            "NOT met"
        };
        let _ = writeln!(o, "- Established TCP flow cut at {} pods: p99 {r99:.1} ms, {} not cut; target p99 ≤ 100 ms: **{verdict}**.", v.pods, v.failures);
    }
    for r in results.iter().filter(|r| r.churn_per_second == 0) {
        let (g50, g99, _) = ScenarioResult::summary(&r.grant_ms);
        let (r50, r99, _) = ScenarioResult::summary(&r.revoke_ms);
        let same = r50 <= g50 * 1.2 + 1.0 && r99 <= g99 * 1.2 + 5.0;
        let _ = writeln!(
            o,
            "- Revocation vs grant, {} at {} pods: p50 {r50:.1} vs {g50:.1} ms, p99 {r99:.1} vs {g99:.1} ms: **{}**.",
            r.scenario.name(),
            r.pods,
            if same { "as fast" } else { "slower" }
        );
    }
    for line in irrelevant_verdicts(run) {
        let _ = writeln!(o, "{line}");
    }
    for (pods, m) in metrics {
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("reconcile_duration_seconds_sum")
                        || l.contains("reconcile_duration_seconds_count")
                        || l.contains("transactions_total")
                        || l.starts_with("palisade_reconciles_total")
                        || l.starts_with("palisade_node_lock_acquisitions_total")
                        || l.starts_with("palisade_source_changes_total")
                        || l.contains("errors_total")
                        || l.starts_with("palisade_nft")
                        || l.starts_with("palisade_pods")
                        || l.starts_with("palisade_policies"))
            })
            .collect();
        let _ = writeln!(
            o,
            "\nAgent /metrics at the end of the {pods}-pod run:\n\n```\n{}\n```",
            lines.join("\n")
        );
    }
    o
}
