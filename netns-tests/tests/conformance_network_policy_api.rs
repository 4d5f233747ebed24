//! The network-policy-api conformance suite (kubernetes-sigs/network-policy-api, `conformance/`),
//! transcribed as data (`cases/network-policy-api*/*.yaml`): its ClusterNetworkPolicy tests, admin
//! and baseline tiers, standard and experimental, on the suite's own model (`Model::NetworkPolicyApi`:
//! the four houses' namespaces and pods, TCP 80/8080 and UDP 53/5353; the node-peer tests on
//! `Model::NetworkPolicyApiNodes`, with the hostNetwork centaurs and the host-network ports, in a lab
//! of their own) spread over two nodes, with the full matrix checked after every step and each
//! upstream probe held against it; a sample again over IPv6 (`IPV6_SAMPLE`). Left out: SCTP (this
//! kernel has none).
//!
//! A custom harness (harness = false), like `conformance`:
//! `cargo test -p palisade-netns-tests --test conformance_network_policy_api [FILTER]`. Needs root
//! and the binaries (`cargo build --workspace --bins`, or PALISADE_BIN_DIR).

use palisade_netns_tests::cases;
use palisade_netns_tests::lab::{self, Family, Lab, LabOptions};
use palisade_netns_tests::model::Model;
use palisade_netns_tests::suite::CaseSuite;
use std::process::ExitCode;
use std::time::Duration;

fn setup(lab: &mut Lab, model: Model) -> Result<(), String> {
    let nodes: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
    lab.apply(model.objects(&nodes))
        .and_then(|_| lab.wait_pods_ready(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    for (family, what) in [
        (Family::V4, "initial baseline (IPv4)"),
        (Family::V6, "initial baseline (IPv6)"),
    ] {
        cases::baseline_within(lab, model.ports(), family, what, Duration::from_secs(15))?;
    }
    Ok(())
}

/// Cases also run over IPv6 (the dual-stack sample): the combined rules of both tiers and the
/// integration of admin, NetworkPolicy and baseline. The others name IPv4 pod addresses or cover
/// the same rules.
const IPV6_SAMPLE: [&str; 4] = [
    "NPA-CNPAdminTierEgressNodePeers",
    "NPA-CNPAdminTierGress",
    "NPA-CNPBaselineTierGress",
    "NPA-CNPAdminTierIntegration",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cases = match cases::network_policy_api_cases() {
        Ok(mut c) => {
            let v6: Vec<cases::Case> = c
                .iter()
                .filter(|c| IPV6_SAMPLE.contains(&c.id.as_str()))
                .map(|c| cases::Case {
                    id: format!("{}-IPv6", c.id),
                    family: Some("ipv6".into()),
                    ..c.clone()
                })
                .collect();
            c.extend(v6);
            c
        }
        Err(e) => {
            eprintln!("conformance_network_policy_api: loading cases: {e}");
            return ExitCode::FAILURE;
        }
    };
    CaseSuite {
        prefix: "network-policy-api",
        opts: LabOptions::for_tests(&lab::unique_name()),
        cases,
    }
    .main(&args, setup, |_| Ok(()))
}
