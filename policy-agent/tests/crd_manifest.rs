//! deploy/05-clusternetworkpolicy-crd.yaml and the Rust API types the agent decodes
//! ClusterNetworkPolicies into (palisade-policy's `ClusterNetworkPolicyApi`) name the same fields:
//! an object with every field the CRD's schema allows survives a round trip through the Rust types
//! unchanged (no field the API server keeps is dropped here), and everything the Rust types write
//! is in the schema (the API server would prune it).

use palisade_agent::source::cluster_policy::{GROUP, KIND, PLURAL, VERSION};
use palisade_agent::source::ClusterNetworkPolicy;
use serde_json::{json, Map, Value};

/// Read at run time, not `include_str!`: the image build copies no `deploy/` into the workspace.
fn crd_text() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/05-clusternetworkpolicy-crd.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
        other => panic!("schema type {other:?} not handled"),
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
fn the_crd_and_the_rust_api_types_name_the_same_fields() {
    let crd: Value = serde_saphyr::from_str(&crd_text()).expect("the CRD is YAML");
    assert_eq!(crd["spec"]["group"], GROUP);
    assert_eq!(crd["spec"]["names"]["kind"], KIND);
    assert_eq!(crd["spec"]["names"]["plural"], PLURAL);
    assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], VERSION);
    let spec_schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
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
    ] {
        assert!(text.contains(needle), "the schema lacks {needle}");
    }
}
