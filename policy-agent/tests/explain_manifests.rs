//! Issue 16's first ask: `palisade-agent explain` on plain manifests whose pods have no status yet
//! (examples/demo as a new user has it), answered by labels, namespaces and ports through the same
//! compile, saying that it used placeholder addresses. No root needed.

use palisade_testkit::temp::temp_dir;
use std::path::Path;
use std::process::Command;

fn demo_dir() -> palisade_testkit::temp::TempDir {
    let dir = temp_dir("pa-explain-demo-");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
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
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["explain", "--manifests", dir.to_str().expect("utf-8 path")])
        .args(["--from", from, "--to", to, "--port", "80/TCP"])
        .env_remove("KUBECONFIG")
        .output()
        .expect("run palisade-agent explain");
    assert!(
        out.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn explain_answers_for_manifests_whose_pods_have_no_address_yet() {
    let dir = demo_dir();
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
