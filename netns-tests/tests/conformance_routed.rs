//! Conformance over the overlay: the upstream cases T01-T42 (IPv4), the IPv6 sample of
//! `cases/extra.yaml` (V6-*) and the ClusterNetworkPolicy integration cases of `cases/cluster.yaml`
//! (C12, C14) against ONE two-node lab in the routed topology (`Topology::Routed`:
//! the nodes are on different segments behind a router that knows no pod range), where every
//! cross-node pod packet rides the agents' VXLAN devices; the router must have carried encapsulated
//! traffic (UDP to the overlay port), and the policies must hold exactly as over direct routes.
//!
//! A custom harness (harness = false), like `conformance`:
//! `cargo test -p palisade-netns-tests --test conformance_routed [FILTER]`. Needs root and the
//! binaries (`cargo build --workspace --bins`, or PALISADE_BIN_DIR).

use palisade_netns_tests::cases::{self, Case};
use palisade_netns_tests::lab::{self, Family, Lab, LabOptions, Topology};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The cases run here: T01-T42 and the IPv6 sample.
fn selected(filters: &[&String]) -> Result<Vec<Case>, String> {
    let mut out = Vec::new();
    for c in cases::load(&cases::upstream_cases_path()).map_err(|e| e.to_string())? {
        if c.id.starts_with('T') {
            out.push(c);
        }
    }
    for c in cases::load(&cases::extra_cases_path()).map_err(|e| e.to_string())? {
        if c.family.as_deref() == Some("ipv6") {
            out.push(c);
        }
    }
    for c in cases::load(&cases::cluster_cases_path()).map_err(|e| e.to_string())? {
        if c.id.starts_with("C12") || c.id.starts_with("C14") || c.id.starts_with("C15") {
            out.push(c);
        }
    }
    Ok(out
        .into_iter()
        .filter(|c| {
            let name = format!("routed::{} {}", c.id, c.title);
            filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
        })
        .collect())
}

fn setup(lab: &mut Lab) -> Result<(), String> {
    let nodes: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
    lab.apply(cases::model_objects(&nodes))
        .and_then(|_| lab.wait_pods_ready(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    for (family, what) in [
        (Family::V4, "initial baseline over the overlay (IPv4)"),
        (Family::V6, "initial baseline over the overlay (IPv6)"),
    ] {
        cases::check_baseline_within(lab, family, what, Duration::from_secs(15))?;
    }
    let n = lab.encapsulated_packets().map_err(|e| e.to_string())?;
    if n == 0 {
        return Err(
            "the baseline passed but the router carried no UDP to the overlay port: cross-node pod traffic did not ride the overlay".into(),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let cases = match selected(&filters) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conformance_routed: loading cases: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.iter().any(|a| a == "--list") {
        for c in &cases {
            println!("routed::{} {}: test", c.id, c.title);
        }
        return ExitCode::SUCCESS;
    }
    if cases.is_empty() {
        println!("running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored");
        return ExitCode::SUCCESS;
    }
    println!("running {} tests", cases.len());
    let started = Instant::now();
    let mut opts = LabOptions::new(&lab::unique_name());
    opts.topology = Topology::Routed;
    let mut lab = match Lab::up(&opts) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("conformance_routed: the lab did not come up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = Vec::new();
    let mut passed = 0;
    match setup(&mut lab) {
        Err(e) => {
            eprintln!("conformance_routed: lab setup failed, every test fails:\n{e}");
            failed.extend(
                cases
                    .iter()
                    .map(|c| (format!("routed::{}", c.id), "lab setup failed".to_string())),
            );
        }
        Ok(()) => {
            println!(
                "routed lab {} up with 9 pods on 2 subnets in {:.1}s",
                lab.name(),
                started.elapsed().as_secs_f64()
            );
            for c in &cases {
                let name = format!("routed::{} {}", c.id, c.title);
                let t0 = Instant::now();
                let r = cases::run_case(&mut lab, c);
                let secs = t0.elapsed().as_secs_f64();
                match r {
                    Ok(()) => {
                        passed += 1;
                        println!("test {name} ... ok ({secs:.1}s)");
                    }
                    Err(e) => {
                        println!("test {name} ... FAILED ({secs:.1}s)");
                        failed.push((name, e));
                    }
                }
            }
            match lab.encapsulated_packets() {
                Ok(n) => println!("the router carried {n} encapsulated packets"),
                Err(e) => failed.push(("routed::encapsulation counter".into(), e.to_string())),
            }
        }
    }
    let mut ok = failed.is_empty();
    if let Err(e) = lab.down() {
        println!("teardown: {e}");
        ok = false;
    }
    let leftovers: Vec<String> = std::fs::read_dir(palisade_netns_tests::netns::NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("pl-{}-", opts.name)))
                .collect()
        })
        .unwrap_or_default();
    if !leftovers.is_empty() {
        println!("teardown left namespaces behind: {leftovers:?}");
        ok = false;
    }
    let leftover_pids = palisade_netns_tests::process::lab_pids(&opts.name);
    if !leftover_pids.is_empty() {
        println!("teardown left processes behind: {leftover_pids:?}");
        ok = false;
    }
    if !failed.is_empty() {
        println!("\nfailures:\n");
        for (name, e) in &failed {
            println!("---- {name} ----\n{e}\n");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; finished in {:.1}s",
        if ok { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
