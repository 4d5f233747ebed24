//! Issue 16's first ask: `palisade-agent explain` on plain manifests whose pods have no status yet
//! (examples/demo as a new user has it), answered by labels, namespaces and ports through the same
//! compile, saying that it used placeholder addresses. No root needed.

mod support;

use palisade_testkit::temp::temp_dir;
use std::path::Path;

/// An example directory (its manifests and its `policies/`) flattened into one manifest directory.
fn example_dir(example: &str) -> palisade_testkit::temp::TempDir {
    let dir = temp_dir("pa-explain-example-");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(example);
    for sub in [demo.clone(), demo.join("policies")] {
        for entry in std::fs::read_dir(&sub).expect("examples/demo") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let name = format!(
                    "{}-{}",
                    sub.file_name().unwrap().to_string_lossy(),
                    path.file_name().unwrap().to_string_lossy()
                );
                std::fs::copy(&path, dir.path().join(name)).expect("copy");
            }
        }
    }
    dir
}

fn explain(dir: &Path, from: &str, to: &str) -> String {
    run(dir, &["--from", from, "--to", to])
}

fn run(dir: &Path, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--port", "80/TCP"]);
    support::explain_manifests(dir, &all)
}

#[test]
fn explain_answers_for_manifests_whose_pods_have_no_address_yet() {
    let dir = example_dir("demo");
    let denied = explain(dir.path(), "guest/visitor", "shop/backend");
    assert!(denied.contains("DENIED"), "{denied}");
    assert!(
        denied.contains("isolated by shop/allow-frontend-to-backend, shop/default-deny-ingress"),
        "names the isolating policies: {denied}"
    );
    assert!(
        denied.contains("note: shop/backend has no address yet: placeholder 198.18.")
            && denied.contains("the answer is by labels, namespaces and ports"),
        "says the answer is by identity: {denied}"
    );
    let allowed = explain(dir.path(), "shop/frontend", "shop/backend");
    assert!(
        allowed.contains("ALLOWED")
            && allowed.contains("allowed by policy shop/allow-frontend-to-backend rule 0"),
        "{allowed}"
    );
}

#[test]
fn explain_matrix_shows_what_the_lab_demo_shows_for_the_cluster_tiers_example() {
    let dir = example_dir("cluster-tiers");
    let json = run(
        dir.path(),
        &[
            "--matrix",
            "payments,monitoring,shop,guest",
            "--output",
            "json",
        ],
    );
    let m: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let denied: Vec<String> = m["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .filter(|c| c["allowed"] == false)
        .map(|c| {
            format!(
                "{} -> {}",
                c["from"].as_str().unwrap(),
                c["to"].as_str().unwrap()
            )
        })
        .collect();
    // The same five the live demo blocks (netns-tests lifecycle test).
    assert_eq!(
        denied,
        [
            "guest/visitor -> monitoring/prometheus",
            "guest/visitor -> payments/api",
            "guest/visitor -> payments/ledger",
            "shop/frontend -> payments/api",
            "shop/frontend -> payments/ledger",
        ],
        "{json}"
    );
    assert_eq!(m["cells"].as_array().unwrap().len(), 20);
    let text = run(dir.path(), &["--matrix", "payments,shop"]);
    assert!(
        text.contains("shop/frontend -> payments/api: ingress of payments/api")
            && text.contains("DENIED by Admin tier clusternetworkpolicy protect-payments"),
        "{text}"
    );
}

/// `palisade-agent compile ... | head -c 100`: the reader goes away (here before the ruleset is
/// written, so the write meets a closed pipe every time). The command ends without an error and
/// without a panic (Rust's `println!` panics on a closed pipe).
#[test]
fn compile_to_a_reader_that_goes_away_ends_quietly() {
    let dir = example_dir("demo");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["compile", "--manifests", dir.path().to_str().unwrap()])
        .args(["--node-name", "node1"])
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run palisade-agent compile");
    // The pipe's only read end, closed before the agent has read its manifests.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "status {:?}: {stderr}",
        out.status
    );
}
