//! `palisade-lab demo DIR`: a two-node lab from an example directory, the matrix before and after
//! the example's policies (`DIR/policies/`), what changed in words, then a clean teardown.

use crate::error::{LabError, Result};
use crate::k8s::{self, ObjKey};
use crate::lab::{
    Family, Lab, LabOptions, Topology, DEFAULT_PROBE_TIMEOUT, EXTERNAL_V4, EXTERNAL_V6,
};
use crate::matrix::Matrix;
use crate::probe::Protocol;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sub-directory of an example holding the policies the demo applies.
pub const POLICIES_SUBDIR: &str = "policies";
/// How long the demo waits for the new matrix to settle after applying policies.
const SETTLE_BOUND: Duration = Duration::from_secs(5);

/// Nodes and pods of a lab, for people.
pub fn describe_lab(lab: &Lab) -> String {
    let joined = match lab.state().topology {
        Topology::Flat => "on one bridge",
        Topology::Routed => {
            "on two segments behind a router (cross-node pod traffic rides the agents' overlay)"
        }
    };
    let mut s = format!(
        "Nodes (network namespaces {joined}, default route via the underlay's router, each running palisade-agent):\n"
    );
    for n in &lab.state().nodes {
        s.push_str(&format!(
            "  {:<7} underlay {:<12} pod CIDRs {} {}\n",
            n.name,
            crate::lab::node_underlay_v4(n.index),
            n.pod_cidr_v4,
            n.pod_cidr_v6
        ));
    }
    if lab.state().external.is_some() {
        s.push_str(&format!(
            "External host {EXTERNAL_V4} {EXTERNAL_V6} behind the router (it knows node addresses only: pods reach it through their node's egress NAT)\n"
        ));
    }
    s.push_str("Pods (network namespaces wired by the palisade CNI plugin; hostNetwork pods share their node's):\n");
    for p in lab.pods() {
        let labels = lab
            .read_object(&ObjKey::new("Pod", &p.namespace, &p.name))
            .map(|o| {
                k8s::labels(&o)
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
        let host = if p.host_network { " (hostNetwork)" } else { "" };
        s.push_str(&format!(
            "  {:<16} on {:<6} {:<28} labels {}{host}\n",
            p.key(),
            p.node,
            ips.join(" "),
            labels
        ));
    }
    s
}

/// TCP/UDP ports any pod declares (what the demo probes).
fn declared_ports(objects: &[Value]) -> Vec<(u16, Protocol)> {
    let mut set = BTreeSet::new();
    for o in objects
        .iter()
        .filter(|o| o.get("kind").and_then(Value::as_str) == Some("Pod"))
    {
        for (port, proto) in k8s::container_ports(o) {
            if let Ok(p) = proto.parse::<Protocol>() {
                set.insert((p, port));
            }
        }
    }
    set.into_iter().map(|(p, port)| (port, p)).collect()
}

fn describe_policy(o: &Value) -> String {
    let (kind, key) = k8s::key_of(o)
        .map(|k| {
            let key = if k.namespace.is_empty() {
                k.name.clone()
            } else {
                format!("{}/{}", k.namespace, k.name)
            };
            (k.kind, key)
        })
        .unwrap_or_default();
    let what =
        k8s::get_str(o, &["metadata", "annotations", "description"]).unwrap_or("(no description)");
    format!("  {kind} {key}: {what}\n")
}

fn probe(lab: &Lab, ports: &[(u16, Protocol)]) -> Result<Matrix> {
    let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
    Ok(Matrix::from_records(
        pods,
        &lab.probe_matrix(ports, Family::V4, DEFAULT_PROBE_TIMEOUT)?,
    ))
}

/// Runs the demo; the lab is torn down at the end, on error and on Ctrl-C.
pub fn run(opts: &LabOptions, dir: &Path, color: bool) -> Result<()> {
    let cluster = k8s::read_path(dir)?;
    let policies_dir = dir.join(POLICIES_SUBDIR);
    let policies = if policies_dir.is_dir() {
        k8s::read_path(&policies_dir)?
    } else {
        Vec::new()
    };
    if policies.is_empty() {
        return Err(LabError::Invalid(format!(
            "{}: no policies to apply",
            policies_dir.display()
        )));
    }
    let ports = declared_ports(&cluster);
    if ports.is_empty() {
        return Err(LabError::Invalid(format!(
            "{}: no pod declares a TCP or UDP containerPort",
            dir.display()
        )));
    }
    println!("Palisade demo: Kubernetes network policies enforced by palisade, in a two-node lab.");
    println!("Every node and pod below is a Linux network namespace on this machine; the real");
    println!("palisade-agent runs on each node and the real palisade CNI plugin wired each pod.\n");
    let mut o = opts.clone();
    o.nodes = 2;
    let mut lab = Lab::up(&o)?;
    lab.apply(cluster)?;
    lab.wait_pods_ready(Duration::from_secs(20))?;
    print!("{}", describe_lab(&lab));
    println!();

    println!(
        "1) No policy yet. Kubernetes allows all traffic, so every pod reaches every other:\n"
    );
    let before = probe(&lab, &ports)?;
    print!("{}", before.render(None, false));

    println!(
        "2) Applying {} policies from {}:",
        policies.len(),
        policies_dir.display()
    );
    for p in &policies {
        print!("{}", describe_policy(p));
    }
    let start = Instant::now();
    lab.apply(policies)?;
    // Wait until the matrix has changed and two probes in a row agree (bounded).
    let mut after = probe(&lab, &ports)?;
    loop {
        let again = probe(&lab, &ports)?;
        let settled = again == after && again != before;
        after = again;
        if settled || start.elapsed() > SETTLE_BOUND {
            break;
        }
    }
    println!(
        "   Each node's agent compiled them into its own nftables table (table inet palisade);\n   no pod was restarted. The new matrix settled {} ms after the apply (probing included).\n",
        start.elapsed().as_millis()
    );
    println!("3) The same probes again. Cells marked ! changed:\n");
    print!("{}", after.render(Some(&before), color));
    let diffs = before.diff(&after);
    println!("What changed ({} connection(s)):", diffs.len());
    for d in &diffs {
        println!("  {d}");
    }
    // Why the rest still connects: a destination with a blocked cell in its column is isolated now,
    // so what still reaches it is explicitly allowed; the others are not restricted at all.
    let isolated: BTreeSet<&String> = after
        .cells
        .iter()
        .filter(|(_, v)| !**v)
        .map(|((_, _, to), _)| to)
        .collect();
    let mut allowed = Vec::new();
    let mut open = BTreeSet::new();
    for ((pp, from, to), v) in &after.cells {
        if *v && isolated.contains(to) {
            allowed.push(format!("  {from} -> {to} {}/{}", pp.1, pp.0));
        } else if *v {
            open.insert(to.clone());
        }
    }
    if !allowed.is_empty() {
        println!("\nStill connected because a policy allows it (the destination is isolated now):");
        for a in &allowed {
            println!("{a}");
        }
    }
    if !open.is_empty() {
        println!(
            "Still open to everyone: no policy restricts traffic into {}.",
            open.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let total = after.cells.len();
    let blocked = after.cells.values().filter(|v| !**v).count();
    println!(
        "\n{blocked} of {total} pod-to-pod connections are now blocked; everything the policies allow still works,\n\
         and pods no policy selects are untouched.\n"
    );
    print_flow_log(&lab)?;
    let name = lab.name().to_string();
    lab.down()?;
    println!("Lab {name} torn down: its namespaces, processes and files are gone.");
    Ok(())
}

/// The demo's ending: what each node's flow log recorded of the connections it blocked, read the
/// way an operator does on a node (`palisade-agent flows`, from the agent's socket).
fn print_flow_log(lab: &Lab) -> Result<()> {
    println!("4) What the policies dropped, from each node's flow log (`palisade-agent flows`):\n");
    let mut shown = 0;
    let mut example = None;
    // Each probe round is a new connection: the same pair once, with its count.
    let mut seen: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for node in &lab.state().nodes {
        let state_dir = node.dir.join("state");
        let agent = lab.state().bins.agent();
        let args: [&std::ffi::OsStr; 6] = [
            "netns".as_ref(),
            "exec".as_ref(),
            node.netns.as_ref(),
            agent.as_os_str(),
            "flows".as_ref(),
            "--state-dir".as_ref(),
        ];
        let mut args = args.to_vec();
        args.push(state_dir.as_os_str());
        let out = crate::cmd::ip(&args)?;
        for line in out.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["verdict"] != "dropped" {
                continue;
            }
            let end = |e: &Value| {
                e["pod"].as_str().or(e["node"].as_str()).map_or_else(
                    || e["ip"].as_str().unwrap_or("?").to_string(),
                    str::to_string,
                )
            };
            let policies: Vec<&str> = v["policies"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let text = format!(
                "{} -> {} {}/{}: dropped at {} by {}",
                end(&v["source"]),
                end(&v["destination"]),
                v["protocol"].as_str().unwrap_or("?"),
                v["destination"]["port"],
                v["direction"].as_str().unwrap_or("?"),
                if policies.is_empty() {
                    "(a change in flight)".to_string()
                } else {
                    policies.join(", ")
                }
            );
            *seen.entry((node.name.clone(), text)).or_insert(0) += 1;
            shown += 1;
            example.get_or_insert_with(|| line.to_string());
        }
    }
    for ((node, text), n) in &seen {
        let times = if *n > 1 {
            format!(" ({n} attempts)")
        } else {
            String::new()
        };
        println!("  {node:<7} {text}{times}");
    }
    if shown == 0 {
        println!("  (nothing was logged)");
    }
    if let Some(line) = example {
        println!("\nEach is one JSON line on the node (agent flag --flow-log), e.g.:\n  {line}\n");
    }
    Ok(())
}
