//! deploy/05-clusternetworkpolicy-crd.yaml is generated from the Rust API types the agent decodes
//! ClusterNetworkPolicies into (palisade-policy's `model::cluster_api`, JSON Schema through
//! schemars, made structural the way kube-rs' CustomResource derive does): this test fails when the
//! file differs from what the types generate. `UPDATE_CRD=1 cargo test -p palisade-agent --test
//! crd_manifest` rewrites it (review the diff).

use palisade_agent::source::cluster_policy::{GROUP, KIND, PLURAL, VERSION};
use palisade_agent::source::ClusterNetworkPolicy;
use palisade_policy::model::cluster_api::Spec;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

const HEADER: &str = "\
# ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2), the CRD: the upstream API's group,
# names, fields and validation (enums, bounds, list sizes, one-of objects, CEL rules), so a cluster
# that installed network-policy-api's own CRD behaves the same. GENERATED from the Rust API types
# (palisade-policy `model::cluster_api`) by policy-agent/tests/crd_manifest.rs; do not edit by
# hand: change the types, then `UPDATE_CRD=1 cargo test -p palisade-agent --test crd_manifest`.
# Palisade refuses policies with `domainNames` peers (not implemented yet).
";

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/05-clusternetworkpolicy-crd.yaml")
}

/// The spec's schema: openAPI v3, every subschema inline, structural (kube-rs' settings).
fn spec_schema() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .into_generator();
    let mut schema =
        serde_json::to_value(generator.into_root_schema_for::<Spec>()).expect("a schema is JSON");
    if let Some(o) = schema.as_object_mut() {
        o.remove("title");
    }
    schema
}

/// `status.conditions`: metav1.Condition, as every CRD of the project writes it.
fn status_schema() -> Value {
    json!({"type": "object", "properties": {"conditions": {
        "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
        "items": {"type": "object",
                  "required": ["lastTransitionTime", "message", "reason", "status", "type"],
                  "properties": {
                      "lastTransitionTime": {"type": "string", "format": "date-time"},
                      "message": {"type": "string", "maxLength": 32768},
                      "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                      "reason": {"type": "string", "maxLength": 1024, "minLength": 1},
                      "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                      "type": {"type": "string", "maxLength": 316}}}}}})
}

fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{PLURAL}.{GROUP}"),
                     "labels": {"app.kubernetes.io/name": "palisade"}},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {"kind": KIND, "listKind": format!("{KIND}List"), "plural": PLURAL,
                      "singular": KIND.to_ascii_lowercase(), "shortNames": ["cnp"]},
            "versions": [{
                "name": VERSION, "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
                    {"name": "Priority", "type": "string", "jsonPath": ".spec.priority"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "ClusterNetworkPolicy (SIG Network's network-policy-api, v1alpha2): cluster-wide rules in an Admin tier (before NetworkPolicies) and a Baseline tier (after them).",
                    "required": ["metadata", "spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema()}}}}]}})
}

#[test]
fn the_crd_in_deploy_is_what_the_rust_api_types_generate() {
    let want = crd();
    let path = path();
    if std::env::var_os("UPDATE_CRD").is_some() {
        let yaml = serde_saphyr::to_string(&want).expect("YAML");
        std::fs::write(&path, format!("{HEADER}{yaml}")).expect("write the CRD");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let have: Value = serde_saphyr::from_str(&text).expect("the CRD is YAML");
    assert!(
        have == want,
        "{} is not what the types generate; run UPDATE_CRD=1 cargo test -p palisade-agent --test crd_manifest and review the diff",
        path.display()
    );
}

/// A value with every property of `schema` set (one item per array).
fn maximal(schema: &Value) -> Value {
    match schema["type"].as_str() {
        Some("object") => match schema["properties"].as_object() {
            Some(props) => Value::Object(
                props
                    .iter()
                    .map(|(k, s)| (k.clone(), maximal(s)))
                    .collect::<Map<_, _>>(),
            ),
            None if schema.get("additionalProperties").is_some() => json!({"k": "v"}),
            None => json!({}),
        },
        Some("array") => json!([maximal(&schema["items"])]),
        Some("integer") => json!(1),
        Some("string") => json!("x"),
        Some("boolean") => json!(true),
        other => panic!("schema type {other:?} not handled: {schema}"),
    }
}

/// Paths of every key in `v`.
fn paths(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}.{k}");
                out.push(p.clone());
                paths(x, &p, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                paths(x, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_field_the_crd_allows_survives_the_rust_types() {
    let spec_schema =
        &crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let spec = maximal(spec_schema);
    let object: ClusterNetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "all"}, "spec": spec.clone()}))
            .expect("the Rust types read every field of the schema");
    let back = serde_json::to_value(&object).expect("serialize");
    let (mut want, mut got) = (Vec::new(), Vec::new());
    paths(&spec, "spec", &mut want);
    paths(&back["spec"], "spec", &mut got);
    let dropped: Vec<&String> = want.iter().filter(|p| !got.contains(p)).collect();
    let unknown: Vec<&String> = got.iter().filter(|p| !want.contains(p)).collect();
    assert!(
        dropped.is_empty(),
        "in the CRD, not in the Rust types: {dropped:?}"
    );
    assert!(
        unknown.is_empty(),
        "in the Rust types, not in the CRD: {unknown:?}"
    );
    // The validation that matters most is there.
    let text = serde_json::to_string(spec_schema).unwrap();
    for needle in [
        r#""enum":["Admin","Baseline"]"#,
        r#""maximum":1000"#,
        r#""enum":["Accept","Deny","Pass"]"#,
        "self.start < self.end",
        "isCIDR(self)",
        r#""maxProperties":1"#,
    ] {
        assert!(text.contains(needle), "the schema lacks {needle}");
    }
}
