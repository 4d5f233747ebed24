//! Reading manifest files: YAML (multi-document) or JSON, `List`s, the kinds we watch; each object
//! checked, defaulted and stripped; and the compact encoding the directory keeps of it.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use tracing::warn;

use super::dir::Encoded;
use crate::source::{Kind, Object};

/// Namespace given to namespaced objects that name none (what `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a manifest file was rejected: the (0-based) document index and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub document: usize,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {}: {}", self.document, self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Parses the content of one manifest file (YAML stream or JSON) into objects, [stripped](Object::strip)
/// and with namespaced objects defaulted to [`DEFAULT_NAMESPACE`]. `file` is used in log lines only.
///
/// Documents of kinds we do not watch are skipped with a warning. Any other problem rejects the file.
pub fn parse_manifests(file: &str, content: &[u8]) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    parse_manifests_with(file, content, &mut |object| {
        objects.push(object);
        Ok(())
    })?;
    Ok(objects)
}

/// [`parse_manifests`], handing each object to `sink` as soon as it is decoded; an error from the sink
/// rejects the file like any other.
pub(super) fn parse_manifests_with(
    file: &str,
    content: &[u8],
    sink: &mut dyn FnMut(Object) -> Result<(), String>,
) -> Result<(), ManifestError> {
    let text = std::str::from_utf8(content).map_err(|e| ManifestError {
        document: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    // JSON is YAML, but serde_yaml holds a document's every event and then its tree: for a large List
    // that is ~50 times the file's size, kept by the allocator afterwards. A file that is one JSON
    // object is read by serde_json (same value, a tenth of the memory); anything else goes through YAML.
    if text.trim_start().starts_with('{') {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            objects_from_value(file, 0, value, &mut *sink).map_err(|message| ManifestError {
                document: 0,
                message,
            })?;
            return Ok(());
        }
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml = serde_yaml::Value::deserialize(document).map_err(|e| ManifestError {
            document: index,
            message: e.to_string(),
        })?;
        if yaml.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let value = serde_json::to_value(&yaml).map_err(|e| ManifestError {
            document: index,
            message: format!("not representable as JSON: {e}"),
        })?;
        // One tree at a time: a large List's YAML tree is many times the size of the file.
        drop(yaml);
        objects_from_value(file, index, value, &mut *sink).map_err(|message| ManifestError {
            document: index,
            message,
        })?;
    }
    Ok(())
}

fn objects_from_value(
    file: &str,
    index: usize,
    mut value: serde_json::Value,
    out: &mut dyn FnMut(Object) -> Result<(), String>,
) -> Result<(), String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let Some(kind) = field("kind") else {
        return Err("no `kind` (not a Kubernetes object, or a half-written one)".into());
    };
    let api_version = field("apiVersion").unwrap_or_default();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            // Taken, not cloned: each item's tree is freed once it is decoded.
            let items = match value.get_mut("items").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(items)) => items,
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => return Err("List `items` is not a list".into()),
            };
            for (item_index, item) in items.into_iter().enumerate() {
                objects_from_value(file, index, item, out)
                    .map_err(|e| format!("items[{item_index}]: {e}"))?;
            }
            return Ok(());
        }
        ("v1", "Pod") => decode::<Pod>(value).map(|o| Object::Pod(Box::new(o))),
        ("v1", "Namespace") => decode::<Namespace>(value).map(|o| Object::Namespace(Box::new(o))),
        ("v1", "Node") => decode::<Node>(value).map(|o| Object::Node(Box::new(o))),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            decode::<NetworkPolicy>(value).map(|o| Object::NetworkPolicy(Box::new(o)))
        }
        _ => {
            warn!(
                file,
                document = index,
                api_version,
                kind,
                "manifest source: kind not watched, document skipped"
            );
            return Ok(());
        }
    }
    .map_err(|e| format!("{api_version} {kind}: {e}"))?;
    out(normalize(object)?)
}

/// The compact JSON of a stripped object (see [`Encoded`]).
pub(super) fn encode(object: &Object) -> Result<Encoded, serde_json::Error> {
    let bytes = match object {
        Object::Pod(o) => serde_json::to_vec(o),
        Object::Namespace(o) => serde_json::to_vec(o),
        Object::NetworkPolicy(o) => serde_json::to_vec(o),
        Object::Node(o) => serde_json::to_vec(o),
    }?;
    Ok(bytes.into())
}

/// The object [`encode`] encoded.
pub(super) fn decode_encoded(kind: Kind, encoded: &[u8]) -> Result<Object, serde_json::Error> {
    Ok(match kind {
        Kind::Pod => Object::Pod(Box::new(serde_json::from_slice(encoded)?)),
        Kind::Namespace => Object::Namespace(Box::new(serde_json::from_slice(encoded)?)),
        Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(serde_json::from_slice(encoded)?)),
        Kind::Node => Object::Node(Box::new(serde_json::from_slice(encoded)?)),
    })
}

fn decode<K: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<K, serde_json::Error> {
    serde_json::from_value(value)
}

/// Checks the name, defaults or clears the namespace by scope, and strips the object.
fn normalize(mut object: Object) -> Result<Object, String> {
    let kind: Kind = object.kind();
    let name = object.meta().name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    let meta = object.meta_mut();
    // Nothing here reads it (the Kubernetes source does, for its relists), and a writer that bumps
    // it with each status heartbeat would otherwise make every heartbeat a changed object.
    meta.resource_version = None;
    if kind.is_namespaced() {
        if meta.namespace.as_deref().unwrap_or_default().is_empty() {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
        }
    } else {
        meta.namespace = None;
    }
    Ok(object.strip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_file_parses_like_yaml_and_flow_yaml_falls_back_to_yaml() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","labels":{"app":"web"},
             "annotations":{"x":"y"}},"spec":{"containers":[{"name":"c","ports":[{"containerPort":80}]}]},
             "status":{"podIP":"10.0.0.1"}},
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod","labels":{"team":"a"}}}]}"#;
        let fast = parse_manifests("a.json", json.as_bytes()).expect("json");
        // A trailing document marker is not JSON: the same content goes through the YAML path.
        let via_yaml =
            parse_manifests("a.yaml", format!("{json}\n---\n").as_bytes()).expect("yaml");
        assert_eq!(fast.len(), 2);
        assert_eq!(fast, via_yaml);
        let flow = parse_manifests(
            "f.yaml",
            b"{apiVersion: v1, kind: Namespace, metadata: {name: n}}",
        )
        .expect("flow yaml");
        assert_eq!(flow.len(), 1);
        assert_eq!(flow[0].reference().name, "n");
    }

    #[test]
    fn kept_objects_decode_to_what_was_parsed() {
        let text = docs_of_every_kind();
        for object in parse_manifests("k.yaml", text.as_bytes()).expect("parse") {
            let encoded = encode(&object).expect("encode");
            let decoded = decode_encoded(object.kind(), &encoded).expect("decode");
            assert_eq!(decoded, object);
        }
    }

    fn docs_of_every_kind() -> String {
        [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.1.1, podIPs: [{ip: 10.1.1.1}]}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns, labels: {t: x}}",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: ns}\nspec: {podSelector: {}, policyTypes: [Ingress], ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, protocol: TCP}]}]}",
        ]
        .join("\n---\n")
    }

    #[test]
    fn parse_defaults_namespace_strips_annotations_and_reads_lists() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, annotations: {x: y}}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: ns1, namespace: ignored}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: skipped}
---
"#;
        let objects = parse_manifests("t.yaml", text.as_bytes()).expect("parses");
        let refs: Vec<String> = objects.iter().map(|o| o.reference().to_string()).collect();
        assert_eq!(refs, ["Pod default/a", "Namespace ns1"]);
        assert_eq!(objects[0].meta().annotations, None);
        assert_eq!(objects[1].meta().namespace, None);
    }

    #[test]
    fn parse_rejects_missing_name_and_missing_kind_with_document_index() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {}\n";
        assert_eq!(
            parse_manifests("t.yaml", text.as_bytes())
                .unwrap_err()
                .document,
            1
        );
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\nmetadata: {name: b}\n";
        assert_eq!(
            parse_manifests("t.yaml", text.as_bytes())
                .unwrap_err()
                .document,
            1
        );
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n";
        assert!(parse_manifests("t.yaml", text.as_bytes()).is_err());
    }
}
