//! Reading manifest files: YAML (multi-document) or JSON, `List`s, the kinds we watch; each object
//! checked, defaulted and stripped; and the compact encoding the directory keeps of it.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tracing::warn;

use super::dir::Encoded;
use crate::source::{cluster_policy, ClusterNetworkPolicy, Kind, Object};

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
    parse_manifests_with(file, content, &mut |object, _| {
        objects.push(object);
        Ok(())
    })?;
    Ok(objects)
}

/// Where an object of a JSON file is in it: the byte range of its JSON object (a List's item, or
/// the whole file); [`object_at`] decodes it again from those bytes alone.
pub(super) type Span = std::ops::Range<usize>;

/// What [`parse_manifests_with`] hands each object to, with its [`Span`] in a JSON file (`None` in
/// a YAML file).
pub(super) type Sink<'a> = dyn FnMut(Object, Option<Span>) -> Result<(), String> + 'a;

/// [`parse_manifests`], handing each object to `sink` as soon as it is decoded; an error from the sink
/// rejects the file like any other.
pub(super) fn parse_manifests_with(
    file: &str,
    content: &[u8],
    sink: &mut Sink<'_>,
) -> Result<(), ManifestError> {
    let text = std::str::from_utf8(content).map_err(|e| ManifestError {
        document: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    // JSON is YAML, but a file that is one JSON object is read by serde_json directly (the YAML
    // parser's events for a large List cost several times the file's size on the way), and a List's
    // items are decoded one by one straight from the text into their types (no tree of the whole
    // file: a 33 MB List of 100k pods took 2.7 s and ~300 MiB through `serde_json::Value`).
    if text.trim_start().starts_with('{') {
        // The head parses only if the whole text is one JSON value; otherwise it is YAML.
        if let Ok(head) = serde_json::from_str::<JsonHead<'_>>(text) {
            objects_from_json(file, 0, head, text, text, &mut *sink).map_err(|message| {
                ManifestError {
                    document: 0,
                    message,
                }
            })?;
            return Ok(());
        }
    }
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| {
            ManifestError {
                document: e
                    .location()
                    .map_or(0, |at| document_at_line(text, at.line())),
                message: e.to_string(),
            }
        })?;
    // Completely empty documents (a trailing `---`) are not among them.
    for (index, value) in documents.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        objects_from_value(file, index, value, &mut *sink).map_err(|message| ManifestError {
            document: index,
            message,
        })?;
    }
    Ok(())
}

/// YAML 1.2's core schema, as serde_yaml read it before: only `true`/`false` are booleans, so a
/// name or label value `n`, `y`, `on` or `no` stays a string (the API server's decoder, guided by
/// the field's type, keeps them strings too). serde-saphyr's limits (they turn an alias bomb or a
/// runaway file into an error) are raised to what a cluster's worth of objects in one YAML file
/// needs: ~30 nodes per Pod, 10k pods and more.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        // One line per error (line and column are in it), not a multi-line source snippet.
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_nodes: 20_000_000,
            max_events: 50_000_000,
            max_documents: 100_000,
        },
    }
}

/// The 0-based document a 1-based line of `text` is in (documents start after a `---` line).
fn document_at_line(text: &str, line: u64) -> usize {
    text.lines()
        .take(usize::try_from(line.saturating_sub(1)).unwrap_or(usize::MAX))
        .enumerate()
        .filter(|(i, l)| *i > 0 && (l.trim_end() == "---" || l.starts_with("--- ")))
        .count()
}

const NO_KIND: &str = "no `kind` (not a Kubernetes object, or a half-written one)";

/// A JSON object's kind, and (for a `List`) its items as unparsed text borrowed from the file.
#[derive(serde::Deserialize)]
struct JsonHead<'a> {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    items: Option<&'a serde_json::value::RawValue>,
}

/// The one object whose JSON text is `text` (a [`Span`] of a file read again), checked, defaulted
/// and stripped as when the file was read.
pub(super) fn object_at(file: &str, text: &str) -> Result<Object, String> {
    let head = serde_json::from_str::<JsonHead<'_>>(text).map_err(|e| e.to_string())?;
    let mut found = None;
    objects_from_json(file, 0, head, text, text, &mut |object, _| {
        found = Some(object);
        Ok(())
    })?;
    found.ok_or_else(|| "no object of a watched kind there".to_string())
}

/// One JSON object (`text`, a slice of `file_text`, whose head is `head`): a List's items one by
/// one, or the object itself, with its span in `file_text`.
fn objects_from_json(
    file: &str,
    index: usize,
    head: JsonHead<'_>,
    text: &str,
    file_text: &str,
    out: &mut Sink<'_>,
) -> Result<(), String> {
    let kind = head.kind.ok_or_else(|| NO_KIND.to_string())?;
    let api_version = head.api_version.unwrap_or_default();
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        let items: Vec<&serde_json::value::RawValue> = match head.items {
            None => Vec::new(),
            Some(raw) => serde_json::from_str::<Option<Vec<_>>>(raw.get())
                .map_err(|_| "List `items` is not a list".to_string())?
                .unwrap_or_default(),
        };
        for (item_index, item) in items.into_iter().enumerate() {
            let item_head = serde_json::from_str::<JsonHead<'_>>(item.get())
                .map_err(|e| format!("items[{item_index}]: {e}"))?;
            objects_from_json(file, index, item_head, item.get(), file_text, out)
                .map_err(|e| format!("items[{item_index}]: {e}"))?;
        }
        return Ok(());
    }
    let start = (text.as_ptr() as usize).wrapping_sub(file_text.as_ptr() as usize);
    let span = (start + text.len() <= file_text.len()).then(|| start..start + text.len());
    match typed(file, index, &api_version, &kind, text)? {
        Some(object) => out(normalize(object)?, span),
        None => Ok(()),
    }
}

fn objects_from_value(
    file: &str,
    index: usize,
    mut value: serde_json::Value,
    out: &mut Sink<'_>,
) -> Result<(), String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let Some(kind) = field("kind") else {
        return Err(NO_KIND.into());
    };
    let api_version = field("apiVersion").unwrap_or_default();
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
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
    match typed(file, index, &api_version, &kind, value)? {
        Some(object) => out(normalize(object)?, None),
        None => Ok(()),
    }
}

/// What a document is decoded from: a YAML document's tree, or a JSON object's text.
trait Document {
    fn decode<K: serde::de::DeserializeOwned>(self) -> Result<K, serde_json::Error>;
}

impl Document for serde_json::Value {
    fn decode<K: serde::de::DeserializeOwned>(self) -> Result<K, serde_json::Error> {
        serde_json::from_value(self)
    }
}

impl Document for &str {
    fn decode<K: serde::de::DeserializeOwned>(self) -> Result<K, serde_json::Error> {
        serde_json::from_str(self)
    }
}

/// The object of a watched kind (None: a kind we do not watch, skipped with a warning).
fn typed(
    file: &str,
    index: usize,
    api_version: &str,
    kind: &str,
    doc: impl Document,
) -> Result<Option<Object>, String> {
    let object = match (api_version, kind) {
        ("v1", "Pod") => doc.decode::<Pod>().map(|o| Object::Pod(Box::new(o))),
        ("v1", "Namespace") => doc
            .decode::<Namespace>()
            .map(|o| Object::Namespace(Box::new(o))),
        ("v1", "Node") => doc.decode::<Node>().map(|o| Object::Node(Box::new(o))),
        ("networking.k8s.io/v1", "NetworkPolicy") => doc
            .decode::<NetworkPolicy>()
            .map(|o| Object::NetworkPolicy(Box::new(o))),
        (cluster_policy::API_VERSION, cluster_policy::KIND) => doc
            .decode::<ClusterNetworkPolicy>()
            .map(|o| Object::ClusterNetworkPolicy(Box::new(o))),
        _ => {
            warn!(
                file,
                document = index,
                api_version,
                kind,
                "manifest source: kind not watched, document skipped"
            );
            return Ok(None);
        }
    }
    .map_err(|e| format!("{api_version} {kind}: {e}"))?;
    Ok(Some(object))
}

/// The compact JSON of a stripped object (see [`Encoded`]).
pub(super) fn encode(object: &Object) -> Result<Encoded, serde_json::Error> {
    let bytes = match object {
        Object::Pod(o) => serde_json::to_vec(o),
        Object::Namespace(o) => serde_json::to_vec(o),
        Object::NetworkPolicy(o) => serde_json::to_vec(o),
        Object::Node(o) => serde_json::to_vec(o),
        Object::ClusterNetworkPolicy(o) => serde_json::to_vec(o),
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
        Kind::ClusterNetworkPolicy => {
            Object::ClusterNetworkPolicy(Box::new(serde_json::from_slice(encoded)?))
        }
    })
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
        assert_eq!(&*flow[0].reference().name, "n");
    }

    /// The JSON path decodes a List's items from the text one by one; it must refuse and skip
    /// exactly what the YAML path does, naming the item.
    #[test]
    fn json_list_items_are_refused_and_skipped_as_the_yaml_path_does() {
        let cases = [
            (
                r#"{"apiVersion":"v1","kind":"List","items":{"a":1}}"#,
                Some("List `items` is not a list"),
            ),
            (
                r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}},{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":"x"}}]}"#,
                Some("items[1]: v1 Pod: "),
            ),
            (
                r#"{"apiVersion":"v1","kind":"List","items":[{"metadata":{"name":"a"}}]}"#,
                Some("items[0]: no `kind`"),
            ),
            (
                r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}},{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"n"}}]}]}"#,
                None,
            ),
        ];
        for (json, want) in cases {
            let fast = parse_manifests("a.json", json.as_bytes());
            let slow = parse_manifests("a.yaml", format!("{json}\n---\n").as_bytes());
            match want {
                Some(msg) => {
                    let e = fast.expect_err(json);
                    assert!(e.message.starts_with(msg), "{json}: {e}");
                    assert!(slow.is_err(), "{json}: the YAML path accepted it");
                }
                None => {
                    let objects = fast.expect(json);
                    assert_eq!(objects.len(), 1, "{json}");
                    assert_eq!(objects, slow.expect(json));
                }
            }
        }
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

    /// A syntax error names the document it is in, found from the line the parser reports.
    #[test]
    fn a_yaml_syntax_error_names_its_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\nkind: Pod\nmetadata: {name: [\n";
        let err = parse_manifests("t.yaml", text.as_bytes()).unwrap_err();
        assert_eq!(err.document, 2, "{err}");
        assert_eq!(document_at_line("---\na: 1\n---\nb: 2\n", 4), 1);
        assert_eq!(document_at_line("a: 1\n", 1), 0);
    }

    /// A cluster's worth of objects in one YAML file is within the parser's limits (8k pods are ~300k
    /// YAML nodes, over serde-saphyr's default of 250k).
    #[test]
    fn a_large_yaml_list_parses_within_the_limits() {
        let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..8_000 {
            text.push_str(&format!(
                "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: p{i}, namespace: n, labels: {{app: web, tier: a}}}}\n  spec: {{nodeName: node-1, containers: [{{name: c, image: x, ports: [{{containerPort: 80, name: http}}]}}]}}\n  status: {{phase: Running, podIP: 10.0.{}.{}, podIPs: [{{ip: 10.0.{}.{}}}]}}\n",
                i / 250, i % 250, i / 250, i % 250
            ));
        }
        let objects = parse_manifests("big.yaml", text.as_bytes()).expect("parses");
        assert_eq!(objects.len(), 8_000);
    }

    /// Only `true` and `false` are booleans (YAML 1.2): YAML 1.1's `n`, `yes`, `on` are strings.
    #[test]
    fn yaml_1_1_boolean_words_stay_strings() {
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, labels: {a: yes, b: on, c: N}}\n";
        let objects = parse_manifests("t.yaml", text.as_bytes()).expect("parses");
        let meta = objects[0].meta();
        assert_eq!(meta.name.as_deref(), Some("n"));
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("a").map(String::as_str), Some("yes"));
        assert_eq!(labels.get("b").map(String::as_str), Some("on"));
        assert_eq!(labels.get("c").map(String::as_str), Some("N"));
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
