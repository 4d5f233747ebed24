//! Results: the machine, the command, medians and ratios to the no-policy run, and charts.

use super::run::Sample;
use super::stats::median;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// What the machine looked like: CPUs, kernel, tool versions, load.
pub fn machine() -> String {
    let cmd = |p: &str, a: &[&str]| {
        super::cmd::run(p, a)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("({e})"))
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "- nproc: {}\n- CPU: {}\n- kernel: {}\n- nft: {}\n- iptables: {}\n- ipset: {}\n- iperf3: {}\n- load average (1/5/15 min, running/total): {}\n",
        cmd("nproc", &[]),
        cpu,
        cmd("uname", &["-r"]),
        cmd("nft", &["--version"]),
        cmd("iptables", &["--version"]),
        cmd("ipset", &["--version"]),
        cmd("iperf3", &["--version"]).lines().next().unwrap_or_default(),
        loadavg.trim()
    )
}

type Metric = fn(&Sample) -> Option<f64>;

fn crr_rate(s: &Sample) -> Option<f64> {
    s.crr.as_ref().map(|c| c.per_second)
}
fn crr_p99(s: &Sample) -> Option<f64> {
    s.crr.as_ref().map(|c| c.p99_us)
}
fn rr_p50(s: &Sample) -> Option<f64> {
    s.rr.as_ref().map(|r| r.p50_us)
}
fn rr_p99(s: &Sample) -> Option<f64> {
    s.rr.as_ref().map(|r| r.p99_us)
}
fn rr_rate(s: &Sample) -> Option<f64> {
    s.rr.as_ref().map(|r| r.per_second)
}
/// Bulk throughput: iperf3's, or with `--alternate` the acknowledged stream's (one per sample).
fn bulk(s: &Sample) -> Option<f64> {
    s.iperf_gbps.or(s.stream.as_ref().map(|r| r.gbps))
}
fn load_ms(s: &Sample) -> Option<f64> {
    Some(s.load_ms)
}

/// Valid samples only (gates passed).
fn valid(samples: &[Sample]) -> impl Iterator<Item = &Sample> {
    samples.iter().filter(|s| s.error.is_none())
}

/// Median over rounds of the per-round ratio metric(system, P) / metric(none, same round, P).
pub fn ratio_table(
    samples: &[Sample],
    metric: Metric,
) -> BTreeMap<(usize, String), (f64, f64, usize)> {
    let mut none: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for s in valid(samples).filter(|s| s.system == "none") {
        if let Some(v) = metric(s) {
            none.insert((s.round, s.policies), v);
        }
    }
    // The reference of a sample: the no-policy run of the same round and policy block (measured in
    // the same minute, in rotated order); `none` itself is then 1 by construction, and its absolute
    // values across policy blocks show the drift of the machine.
    let mut acc: BTreeMap<(usize, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for s in valid(samples) {
        let Some(v) = metric(s) else { continue };
        let reference = none.get(&(s.round, s.policies)).copied();
        let entry = acc.entry((s.policies, s.system.clone())).or_default();
        entry.0.push(v);
        if let Some(r) = reference {
            if r > 0.0 {
                entry.1.push(v / r);
            }
        }
    }
    acc.into_iter()
        .map(|(k, (abs, ratios))| {
            (
                k,
                (
                    median(&abs).unwrap_or(f64::NAN),
                    median(&ratios).unwrap_or(f64::NAN),
                    abs.len(),
                ),
            )
        })
        .collect()
}

fn table(
    out: &mut String,
    title: &str,
    unit: &str,
    samples: &[Sample],
    metric: Metric,
    systems: &[String],
    policies: &[usize],
) {
    let t = ratio_table(samples, metric);
    let _ = writeln!(out, "\n### {title}\n");
    let _ = write!(out, "| policies |");
    for s in systems {
        let _ = write!(out, " {s} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in systems {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    for p in policies {
        let _ = write!(out, "| {p} |");
        for s in systems {
            match t.get(&(*p, s.clone())) {
                Some((abs, ratio, n)) if ratio.is_finite() => {
                    let _ = write!(out, " {abs:.1} {unit} (×{ratio:.3}, n={n}) |");
                }
                Some((abs, _, n)) => {
                    let _ = write!(out, " {abs:.1} {unit} (n={n}) |");
                }
                None => {
                    let _ = write!(out, " – |");
                }
            }
        }
        out.push('\n');
    }
}

/// Renders the markdown report.
pub fn markdown(
    samples: &[Sample],
    command: &str,
    machine_before: &str,
    machine_after: &str,
    started: &str,
    charts: &[String],
) -> String {
    let mut systems: Vec<String> = Vec::new();
    for s in samples {
        if !systems.contains(&s.system) {
            systems.push(s.system.clone());
        }
    }
    let order = [
        "none",
        "iptables-model",
        "naive-nft-model",
        "palisade",
        "palisade-no-source-guard",
        "palisade-no-counters",
        "palisade-ingress-guard",
    ];
    systems.sort_by_key(|s| order.iter().position(|o| o == s).unwrap_or(99));
    let mut policies: Vec<usize> = samples.iter().map(|s| s.policies).collect();
    policies.sort();
    policies.dedup();
    let mut out = String::new();
    let _ = writeln!(out, "# Datapath benchmark (issue 7)\n\nStarted {started} (UTC).\n\nCommand:\n\n```\n{command}\n```\n");
    let _ = writeln!(out, "## Machine\n\nBefore the run:\n\n{machine_before}\nAfter the run (load average shows how busy the 2 shared cores were):\n\n{machine_after}");
    out.push_str(
        "## Method\n\nTwo node namespaces joined by a veth underlay; a client pod (10.244.1.10) on node 1 and a server pod \
(10.244.2.10) on node 2, wired like palisade (pod /32, link-local gateway, /32 route), forwarding on in the node \
namespaces only. Conntrack is on in every system (a `ct state new counter` table stands in for kube-proxy). \
The synthetic cluster (10,000 pods over 100 nodes; `bench/src/datapath/workload.rs`) loads every policy onto one of \
the two lab nodes; 4 ingress policies select the server and 4 egress policies select the client, each with a \
500-IP peer set, and only the last of each four admits the other pod. For each policy count, every system gets its own \
identical lab with its ruleset loaded once (load time reported) and its server started (with `--same-lab`, all \
systems share one lab and each slice first loads its system's ruleset, so no lab-to-lab difference enters the \
ratios; with `--alternate`, two systems' connect/close slices are one slice whose connections alternate between \
their two labs, each system's rate its connections over the time they took, and the labs trade rulesets every \
round, so a lab's bias falls on both systems alike); then each round runs one \
connect/close slice of every system (the systems one after the other, order rotated per round), then one \
request/response slice of every system, and every few rounds one iperf3 run per system (slice lengths in the \
command). Short interleaved slices let every system see the same background load. A run is void (excluded) when allowed connections fail or when a \
SYN to a port no policy admits is not dropped. Ratios are medians over rounds of metric / the `none` \
run of the same round and policy count; `none`'s absolute values across policy counts show the machine's drift.\n\n\
Systems: `none` (a); `iptables-model` (b) = a MODEL of the kube-router/Calico iptables+ipset layout \
(`bench/src/datapath/rulesets/iptables.rs`); `naive-nft-model` (c) = a MODEL of a naive nftables ruleset, one rule \
per (pod, policy, peer), full reload per change (`rulesets/naive_nft.rs`); `palisade` = palisade's layout; \
`palisade-no-source-guard` = the same ruleset without its source guard (the guard's cost is the difference); \
`palisade-no-counters` = the same without the named counters of the per-policy metrics.\n",
    );
    let palisade_source = if samples.iter().any(|s| s.system == "palisade") {
        "The `palisade` ruleset is what palisade-policy compiles for each node from the same synthetic cluster, rendered \
as the agent's full-replace batch (`rulesets/palisade_real.rs`), unless the command line names files with \
`--palisade-from`.\n"
    } else {
        ""
    };
    out.push_str(palisade_source);
    out.push_str("\n## Results (median, ×ratio to no policy, n = valid rounds)\n");
    table(
        &mut out,
        "New connections per second (connect, 1-byte request/response, close; one client thread)",
        "conn/s",
        samples,
        crr_rate,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Connection time p99",
        "µs",
        samples,
        crr_p99,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Request/response transactions per second (one connection)",
        "tx/s",
        samples,
        rr_rate,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Request/response latency p50",
        "µs",
        samples,
        rr_p50,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Request/response latency p99",
        "µs",
        samples,
        rr_p99,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Bulk throughput (iperf3, one stream; with --alternate, one stream per lab in turns of acknowledged 4 MiB chunks)",
        "Gbit/s",
        samples,
        bulk,
        &systems,
        &policies,
    );
    table(
        &mut out,
        "Full ruleset load into one node (the per-change cost of full-reload systems)",
        "ms",
        samples,
        load_ms,
        &systems,
        &policies,
    );
    let _ = writeln!(out, "\n### Ruleset size (both nodes)\n\n| policies | system | rules | set elements |\n|---|---|---|---|");
    let mut seen = std::collections::BTreeSet::new();
    for s in samples {
        if seen.insert((s.policies, s.system.clone())) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                s.policies, s.system, s.rules, s.elements
            );
        }
    }
    out.push_str(&targets(samples));
    let void: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
    if !void.is_empty() {
        let _ = writeln!(out, "\n### Void runs\n");
        for s in void {
            let _ = writeln!(
                out,
                "- round {} {} @ {} policies: {}",
                s.round,
                s.system,
                s.policies,
                s.error.as_deref().unwrap_or("")
            );
        }
    }
    if !charts.is_empty() {
        out.push_str("\n## Charts\n\n");
        for c in charts {
            let _ = writeln!(out, "![{c}]({c})\n");
        }
    }
    out
}

/// The issue's targets, checked against the figures: palisade's connection rate with 1k policies at
/// least 0.95 of no policy; its throughput within the no-policy runs' own spread.
pub fn targets(samples: &[Sample]) -> String {
    let mut o = String::from("\n### Targets\n\n");
    let crr = ratio_table(samples, crr_rate);
    match crr.get(&(1000, "palisade".to_string())) {
        Some((_, ratio, n)) => {
            let verdict = if *ratio >= 0.95 { "met" } else { "NOT met" };
            let _ = writeln!(o, "- New connections/s with 1,000 policies: palisade ×{ratio:.3} of no policy (median of {n} rounds); target ≥ 0.95: **{verdict}**.");
        }
        None => o.push_str("- New connections/s with 1,000 policies: not measured in this run.\n"),
    }
    // What a part of the ruleset costs: palisade against itself without it, paired by round.
    for (variant, what, target) in [
        ("palisade-no-source-guard", "Source guard", Some(0.99)),
        ("palisade-no-counters", "Per-policy counters", None),
        (
            "palisade-ingress-guard",
            "Inline guard against the ingress-hook experiment",
            None,
        ),
    ] {
        let mut paired: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut without: BTreeMap<(usize, usize), f64> = BTreeMap::new();
        for s in valid(samples).filter(|s| s.system == variant) {
            if let Some(v) = crr_rate(s) {
                without.insert((s.round, s.policies), v);
            }
        }
        for s in valid(samples).filter(|s| s.system == "palisade") {
            if let (Some(v), Some(w)) = (crr_rate(s), without.get(&(s.round, s.policies))) {
                if *w > 0.0 {
                    paired.entry(s.policies).or_default().push(v / w);
                }
            }
        }
        for (p, ratios) in &paired {
            if let Some(m) = median(ratios) {
                let target = match target {
                    Some(t) if *p == 1000 => {
                        let verdict = if m >= t { "met" } else { "NOT met" };
                        format!("; target ≥ {t}: **{verdict}**")
                    }
                    _ => String::new(),
                };
                let _ = writeln!(o, "- {what} with {p} policies: new connections/s ×{m:.3} of the same ruleset without them (median of {} paired rounds){target}.", ratios.len());
            }
        }
    }
    // Noise band of throughput: spread of the no-policy runs themselves (each divided by the median
    // no-policy throughput of its policy block).
    let mut none_ratios = Vec::new();
    let mut by_block: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for s in valid(samples).filter(|s| s.system == "none") {
        if let Some(v) = bulk(s) {
            by_block.entry(s.policies).or_default().push(v);
        }
    }
    for vs in by_block.values() {
        if let Some(m) = median(vs) {
            none_ratios.extend(vs.iter().map(|v| v / m));
        }
    }
    let lo = none_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = none_ratios
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let thr = ratio_table(samples, bulk);
    let mut any = false;
    for ((p, sys), (_, ratio, _)) in &thr {
        if sys != "palisade" || !ratio.is_finite() {
            continue;
        }
        any = true;
        let within = if lo.is_finite() && *ratio >= lo.min(0.98) && *ratio <= hi.max(1.02) {
            "within"
        } else {
            "OUTSIDE"
        };
        let _ = writeln!(o, "- Throughput with {p} policies: palisade ×{ratio:.3}; no-policy runs spread ×{lo:.3}–×{hi:.3} around their median (band at least ±2 %): **{within} noise**.");
    }
    if !any {
        o.push_str("- Throughput: not measured in this run.\n");
    }
    o
}

const PLOT: &str = include_str!("plot_datapath.py");
const PLOT_ENFORCE: &str = include_str!("plot_enforce.py");

/// Which charts a run's results draw.
#[derive(Debug, Clone, Copy)]
pub enum Charts {
    Datapath,
    Enforce,
}

/// Writes a run's results as `<out>/<stem>.json` (creating `out`) and draws its charts next to it
/// with python3 + matplotlib; returns the PNG file names (none, with a warning, when the charts
/// cannot be drawn: the figures are in the JSON and the report either way).
pub fn write_results(
    out: &Path,
    stem: &str,
    results: &impl serde::Serialize,
    charts: Charts,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(out)
        .map_err(crate::io_err_pub(format!("creating {}", out.display())))?;
    let json = out.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(results).map_err(|e| Error::Parse {
        what: "results".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&json, text).map_err(|source| Error::Write {
        path: json.clone(),
        source,
    })?;
    let script = match charts {
        Charts::Datapath => PLOT,
        Charts::Enforce => PLOT_ENFORCE,
    };
    Ok(charts_with(script, &json).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no charts (python3 with matplotlib needed: pip install matplotlib)");
        Vec::new()
    }))
}

fn charts_with(script: &str, json: &Path) -> Result<Vec<String>> {
    let dir = std::env::temp_dir().join(format!("palisade-bench-plot-{}.py", std::process::id()));
    std::fs::write(&dir, script).map_err(|source| Error::Write {
        path: dir.clone(),
        source,
    })?;
    let json_s = json
        .to_str()
        .ok_or_else(|| Error::Invalid("results path is not UTF-8".into()))?;
    let dir_s = dir
        .to_str()
        .ok_or_else(|| Error::Invalid("temp path is not UTF-8".into()))?;
    let result = super::cmd::run("python3", &[dir_s, json_s]);
    let _ = std::fs::remove_file(&dir);
    Ok(result?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.ends_with(".png"))
        .collect())
}

/// Median over (round, policies) of metric(a) / metric(b), both measured in the same round.
fn paired_ratio(
    samples: &[Sample],
    metric: Metric,
    a: &str,
    b: &str,
    policies: usize,
) -> Option<(f64, usize)> {
    let mut of_b: BTreeMap<usize, f64> = BTreeMap::new();
    for s in valid(samples).filter(|s| s.system == b && s.policies == policies) {
        if let Some(v) = metric(s) {
            of_b.insert(s.round, v);
        }
    }
    let ratios: Vec<f64> = valid(samples)
        .filter(|s| s.system == a && s.policies == policies)
        .filter_map(|s| Some(metric(s)? / of_b.get(&s.round).copied().filter(|r| *r > 0.0)?))
        .collect();
    Some((median(&ratios)?, ratios.len()))
}

/// The overlay figure, when the run measured the routed underlays: overlay against direct routes
/// (same router, same round) with and without policy, and the policy's cost on each underlay.
pub fn underlay_summary(samples: &[Sample]) -> String {
    let has = |name: &str| samples.iter().any(|s| s.system == name);
    if !(has("none+overlay") && has("none+routed-direct")) {
        return String::new();
    }
    let mut policies: Vec<usize> = samples.iter().map(|s| s.policies).collect();
    policies.sort_unstable();
    policies.dedup();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Overlay (VXLAN) against direct routes, routed topology\n\nMedian over rounds of per-round ratios (n = rounds with both samples).\n"
    );
    let _ = writeln!(
        out,
        "| policies | metric | ratio | value |\n|---|---|---|---|"
    );
    let rows: [(&str, &str, &str, Metric); 10] = [
        ("bulk", "none+overlay", "none+routed-direct", bulk),
        ("bulk", "palisade+overlay", "palisade+routed-direct", bulk),
        ("bulk", "palisade+routed-direct", "none+routed-direct", bulk),
        ("bulk", "palisade+overlay", "none+overlay", bulk),
        ("bulk", "palisade", "none", bulk),
        ("conn/s", "none+overlay", "none+routed-direct", crr_rate),
        (
            "conn/s",
            "palisade+overlay",
            "palisade+routed-direct",
            crr_rate,
        ),
        (
            "conn/s",
            "palisade+routed-direct",
            "none+routed-direct",
            crr_rate,
        ),
        ("conn/s", "palisade+overlay", "none+overlay", crr_rate),
        ("conn/s", "palisade", "none", crr_rate),
    ];
    for p in policies {
        for (what, a, b, m) in rows {
            if let Some((r, n)) = paired_ratio(samples, m, a, b, p) {
                let _ = writeln!(out, "| {p} | {what} | {a} / {b} | ×{r:.3} (n={n}) |");
            }
        }
    }
    out
}
