//! Issue 11 item 6: `policyTypes: []` from a manifest directory isolated nothing. The API server
//! defaults an empty list like an omitted one; objects read from files never meet an API server, so
//! the model conversion must. `explain` takes the same path as the lab and the demo. No root needed.

mod support;

use palisade_testkit::temp::temp_dir;

const PODS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: target, namespace: demo, labels: {app: target}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.3, podIPs: [{ip: 10.244.1.3}]}
---
";

fn explain(test: &str, policy: &str) -> String {
    let dir = temp_dir(&format!("pa-ptypes-{test}-"));
    std::fs::write(dir.path().join("all.yaml"), format!("{PODS}{policy}"))
        .expect("write manifests");
    support::explain_manifests(
        dir.path(),
        &[
            "--from",
            "demo/client",
            "--to",
            "demo/target",
            "--port",
            "80/TCP",
        ],
    )
}

#[test]
fn empty_policy_types_in_a_manifest_isolate_ingress_like_omitted_ones() {
    for types in ["policyTypes: [], ", ""] {
        let text = explain(
            if types.is_empty() { "omitted" } else { "empty" },
            &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: demo}}\nspec: {{{types}podSelector: {{matchLabels: {{app: target}}}}}}\n"
            ),
        );
        assert!(
            text.contains("DENIED") && text.contains("demo/deny"),
            "{types:?}: {text}"
        );
    }
}

#[test]
fn empty_policy_types_with_egress_rules_in_a_manifest_isolate_egress_too() {
    let text = explain(
        "egress",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-dns, namespace: demo}\nspec: {podSelector: {matchLabels: {app: client}}, policyTypes: [], egress: [{ports: [{port: 53, protocol: UDP}]}]}\n",
    );
    assert!(
        text.contains("DENIED") && text.contains("demo/only-dns"),
        "{text}"
    );
}
