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
use palisade_netns_tests::suite::CaseSuite;
use std::process::ExitCode;
use std::time::Duration;

/// The cases run here: T01-T42, the IPv6 sample and the cluster integration cases.
fn selected() -> Result<Vec<Case>, String> {
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
    Ok(out)
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
    let cases = match selected() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conformance_routed: loading cases: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut opts = LabOptions::for_tests(&lab::unique_name());
    opts.topology = Topology::Routed;
    CaseSuite {
        prefix: "routed",
        opts,
        cases,
    }
    .main(
        &args,
        |lab, _| setup(lab),
        |lab| {
            let n = lab.encapsulated_packets().map_err(|e| e.to_string())?;
            println!("the router carried {n} encapsulated packets");
            Ok(())
        },
    )
}
