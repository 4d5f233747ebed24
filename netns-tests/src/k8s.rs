//! Plain Kubernetes YAML: reading documents from files and directories, the few fields the lab
//! reads and fills, and the shared manifest directory the agents watch (one file per object,
//! written atomically).

use crate::error::{LabError, Result};
use serde_json::Value;

/// A JSON object (a YAML mapping of string keys).
pub type Mapping = serde_json::Map<String, Value>;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The label the API server puts on every namespace; upstream tests select namespaces by it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Identity of one object.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjKey {
    pub kind: String,
    /// Empty for cluster-scoped kinds (Namespace, Node).
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// File name in the manifest directory: `<kind>_<namespace>_<name>.yaml` (lowercase kind).
    pub fn file_name(&self) -> String {
        let kind = self.kind.to_ascii_lowercase();
        if self.namespace.is_empty() {
            format!("{kind}_{}.yaml", self.name)
        } else {
            format!("{kind}_{}_{}.yaml", self.namespace, self.name)
        }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Kinds that live in a namespace (the others the lab knows are cluster-scoped).
fn is_namespaced(kind: &str) -> bool {
    !matches!(kind, "Namespace" | "Node" | "ClusterNetworkPolicy")
}

/// A DNS-1123 name check: lowercase alphanumerics, `-` and `.`, starting and ending alphanumeric.
/// Names end up in file names and namespace names, so this is a safety check too.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Key of an object; objects without a namespace default to `default` when their kind is namespaced.
pub fn key_of(obj: &Value) -> Result<ObjKey> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| LabError::Invalid("object without kind".to_string()))?;
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| LabError::Invalid(format!("{kind} without metadata.name")))?;
    if !valid_name(name) {
        return Err(LabError::Invalid(format!(
            "{kind} {name:?}: not a valid DNS-1123 name"
        )));
    }
    let namespace = if is_namespaced(kind) {
        let ns = obj
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if !valid_name(ns) {
            return Err(LabError::Invalid(format!(
                "{kind} {name}: namespace {ns:?} is not a valid name"
            )));
        }
        ns.to_string()
    } else {
        String::new()
    };
    Ok(ObjKey::new(kind, &namespace, name))
}

/// Parses every document of a YAML text (skipping empty ones; `kind: List` is flattened).
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for v in crate::yaml::documents::<Value>(text, origin)? {
        push_flattened(v, &mut out);
    }
    Ok(out)
}

fn push_flattened(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Null => {}
        Value::Object(_) if v.get("kind").and_then(Value::as_str) == Some("List") => {
            if let Some(Value::Array(items)) = v.get("items") {
                for i in items.clone() {
                    push_flattened(i, out);
                }
            }
        }
        other => out.push(other),
    }
}

/// Reads a YAML file, or every `*.yaml`/`*.yml`/`*.json` file of a directory (sorted by name).
pub fn read_path(path: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(LabError::io(path))? {
            let p = entry.map_err(LabError::io(path))?.path();
            if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(LabError::io(&f))?;
        out.extend(parse_documents(&text, &f.display().to_string())?);
    }
    Ok(out)
}

/// Mutable access to `metadata.labels`, creating it.
pub fn labels_mut(obj: &mut Value) -> Result<&mut Mapping> {
    let meta = obj
        .as_object_mut()
        .ok_or_else(|| LabError::Invalid("object is not a mapping".to_string()))?
        .entry("metadata")
        .or_insert_with(|| Value::Object(Mapping::new()));
    let labels = meta
        .as_object_mut()
        .ok_or_else(|| LabError::Invalid("metadata is not a mapping".to_string()))?
        .entry("labels")
        .or_insert_with(|| Value::Object(Mapping::new()));
    if labels.is_null() {
        *labels = Value::Object(Mapping::new());
    }
    labels
        .as_object_mut()
        .ok_or_else(|| LabError::Invalid("metadata.labels is not a mapping".to_string()))
}

/// Labels of an object as a sorted map.
pub fn labels(obj: &Value) -> BTreeMap<String, String> {
    obj.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), scalar_string(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A label edit as typed on the command line: `k=v` sets, `k-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    Set(String, String),
    Remove(String),
}

impl std::str::FromStr for LabelEdit {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some((k, v)) = s.split_once('=') {
            if k.is_empty() {
                return Err(LabError::Invalid(format!("label {s:?}: empty key")));
            }
            Ok(LabelEdit::Set(k.to_string(), v.to_string()))
        } else if let Some(k) = s.strip_suffix('-') {
            if k.is_empty() {
                return Err(LabError::Invalid(format!("label {s:?}: empty key")));
            }
            Ok(LabelEdit::Remove(k.to_string()))
        } else {
            Err(LabError::Invalid(format!(
                "label {s:?}: expected key=value or key-"
            )))
        }
    }
}

/// Applies label edits to an object.
pub fn edit_labels(obj: &mut Value, edits: &[LabelEdit]) -> Result<()> {
    let labels = labels_mut(obj)?;
    for e in edits {
        match e {
            LabelEdit::Set(k, v) => {
                labels.insert(k.clone(), Value::from(v.as_str()));
            }
            LabelEdit::Remove(k) => {
                labels.remove(k.as_str());
            }
        }
    }
    Ok(())
}

/// Container ports of a Pod: (port, protocol) with protocol defaulting to TCP.
pub fn container_ports(pod: &Value) -> Vec<(u16, String)> {
    let mut out: Vec<(u16, String)> = port_entries(pod)
        .filter_map(|p| {
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())?;
            Some((port, protocol(p).to_ascii_uppercase()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every entry of `ports` of every container of a Pod, in order.
fn port_entries(pod: &Value) -> impl Iterator<Item = &Value> {
    pod.get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
}

/// A port entry's protocol, as written (`TCP` when absent, as the API server defaults it).
fn protocol(port: &Value) -> &str {
    port.get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP")
}

/// Sets `path...` = value in a nested mapping, creating intermediate mappings.
pub fn set_path(obj: &mut Value, path: &[&str], value: Value) -> Result<()> {
    let mut cur = obj;
    for (i, seg) in path.iter().enumerate() {
        let map = cur.as_object_mut().ok_or_else(|| {
            LabError::Invalid(format!("{} is not a mapping", path[..i].join(".")))
        })?;
        if i + 1 == path.len() {
            map.insert((*seg).to_string(), value);
            return Ok(());
        }
        cur = map
            .entry(*seg)
            .or_insert_with(|| Value::Object(Mapping::new()));
        if cur.is_null() {
            *cur = Value::Object(Mapping::new());
        }
    }
    Ok(())
}

/// Reads a string at `path...`.
pub fn get_str<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = obj;
    for seg in path {
        cur = cur.get(*seg)?;
    }
    cur.as_str()
}

/// Annotation a lab Pod asks for given addresses with (comma-separated, at most one per family):
/// the lab's runtime passes them to CNI as the `ips` capability (see netns-tests/README.md).
pub const IPS_ANNOTATION: &str = "palisade-lab/ips";
/// Annotation a lab Pod is created in a phase with; only `Pending` (no sandbox, no IP yet) is
/// accepted at creation; `palisade-lab phase` moves it on.
pub const PHASE_ANNOTATION: &str = "palisade-lab/phase";

/// `status.phase` of a Pod, as the lab sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
        }
    }

    /// Succeeded or Failed: the containers are gone and the sandbox with them, but
    /// `status.podIPs` stays.
    pub fn is_terminated(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

impl std::fmt::Display for PodPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PodPhase {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pending" => Ok(PodPhase::Pending),
            "running" => Ok(PodPhase::Running),
            "succeeded" => Ok(PodPhase::Succeeded),
            "failed" => Ok(PodPhase::Failed),
            _ => Err(LabError::Invalid(format!(
                "phase {s:?}: expected Pending, Running, Succeeded or Failed"
            ))),
        }
    }
}

/// `status.phase` of a Pod object, when it is one of the four.
pub fn phase(pod: &Value) -> Option<PodPhase> {
    get_str(pod, &["status", "phase"]).and_then(|s| s.parse().ok())
}

/// `metadata.annotations[key]`.
pub fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get("annotations")?.get(key)?.as_str()
}

/// Removes `metadata.annotations[key]` (a missing one is fine).
pub fn remove_annotation(obj: &mut Value, key: &str) {
    if let Some(a) = obj
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
        .and_then(Value::as_object_mut)
    {
        a.remove(key);
    }
}

/// `spec.hostNetwork: true`.
pub fn host_network(pod: &Value) -> bool {
    pod.get("spec")
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// The phase a new Pod asks to start in ([`PHASE_ANNOTATION`]): `None` is Running; only `Pending`
/// may be asked for (a terminated pod first ran, which `palisade-lab phase` does).
pub fn requested_phase(pod: &Value) -> Result<Option<PodPhase>> {
    match annotation(pod, PHASE_ANNOTATION) {
        None => Ok(None),
        Some(s) => match s.parse()? {
            PodPhase::Running => Ok(None),
            PodPhase::Pending => Ok(Some(PodPhase::Pending)),
            other => Err(LabError::Invalid(format!(
                "{PHASE_ANNOTATION}: {other}: a pod starts Pending or Running; run it, then `palisade-lab phase NS/NAME {other}`"
            ))),
        },
    }
}

/// Addresses a Pod asks for ([`IPS_ANNOTATION`]), at most one per family.
pub fn requested_ips(pod: &Value) -> Result<Vec<std::net::IpAddr>> {
    let Some(text) = annotation(pod, IPS_ANNOTATION) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<std::net::IpAddr> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ip: std::net::IpAddr = part.parse().map_err(|_| {
            LabError::Invalid(format!(
                "{IPS_ANNOTATION}: {part:?} is not an IP address (write e.g. 10.244.1.9,fd00:10:244:1::9)"
            ))
        })?;
        if out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(LabError::Invalid(format!(
                "{IPS_ANNOTATION}: {text:?} asks for two addresses of one family; a pod has one per family"
            )));
        }
        out.push(ip);
    }
    Ok(out)
}

/// `hostPort`s of a Pod's containers as CNI port mappings (protocol lowercase, as containerd
/// passes them); ports without a `hostPort` are skipped.
pub fn host_ports(pod: &Value) -> Result<Vec<crate::cni::PortMapping>> {
    let mut out = Vec::new();
    for p in port_entries(pod) {
        let Some(host) = p
            .get("hostPort")
            .and_then(Value::as_u64)
            .filter(|n| *n != 0)
        else {
            continue;
        };
        let port = |v: Option<u64>, field: &str| {
            v.and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .ok_or_else(|| LabError::Invalid(format!("{field} {v:?} is not a port (1-65535)")))
        };
        out.push(crate::cni::PortMapping {
            host_port: port(Some(host), "hostPort")?,
            container_port: port(
                p.get("containerPort").and_then(Value::as_u64),
                "containerPort",
            )?,
            protocol: protocol(p).to_ascii_lowercase(),
            host_ip: p
                .get("hostIP")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        });
    }
    Ok(out)
}

/// The shared manifest directory: one YAML file per object, each replaced atomically.
#[derive(Debug, Clone)]
pub struct ManifestDir {
    pub dir: PathBuf,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Writes (or replaces) one object: a hidden temp file in the same directory, then rename.
    pub fn write(&self, obj: &Value) -> Result<ObjKey> {
        let key = key_of(obj)?;
        let text = crate::yaml::to_string(obj, &key.to_string())?;
        let file = self.dir.join(key.file_name());
        let tmp = self.dir.join(format!(".{}.tmp", key.file_name()));
        std::fs::write(&tmp, text).map_err(LabError::io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(LabError::io(&file))?;
        Ok(key)
    }

    /// Removes one object's file; a missing file is fine.
    pub fn remove(&self, key: &ObjKey) -> Result<()> {
        let file = self.dir.join(key.file_name());
        match std::fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LabError::Io {
                path: file,
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_lists_and_defaults_are_read_with_keys() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n---\nkind: List\nitems:\n- kind: Pod\n  metadata: {name: a}\n";
        let docs = parse_documents(text, "t").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(key_of(&docs[0]).unwrap(), ObjKey::new("Namespace", "", "x"));
        assert_eq!(
            key_of(&docs[1]).unwrap(),
            ObjKey::new("Pod", "default", "a")
        );
        assert_eq!(key_of(&docs[1]).unwrap().file_name(), "pod_default_a.yaml");
    }

    #[test]
    fn names_that_could_escape_a_path_are_rejected() {
        let bad = parse_documents("kind: Pod\nmetadata: {name: ../etc}\n", "t").unwrap();
        assert!(key_of(&bad[0]).is_err());
        let bad_ns =
            parse_documents("kind: Pod\nmetadata: {name: a, namespace: A_b}\n", "t").unwrap();
        assert!(key_of(&bad_ns[0]).is_err());
    }

    #[test]
    fn label_edits_set_and_remove() {
        let mut pod = parse_documents("kind: Pod\nmetadata: {name: a, labels: {pod: a}}\n", "t")
            .unwrap()
            .remove(0);
        edit_labels(
            &mut pod,
            &["pod2=updated".parse().unwrap(), "pod-".parse().unwrap()],
        )
        .unwrap();
        let l = labels(&pod);
        assert_eq!(l.get("pod2").map(String::as_str), Some("updated"));
        assert!(!l.contains_key("pod"));
        assert!("=x".parse::<LabelEdit>().is_err());
        assert!("k".parse::<LabelEdit>().is_err());
    }

    #[test]
    fn container_ports_default_to_tcp() {
        let pod = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n    - {containerPort: 80, protocol: UDP}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        assert_eq!(
            container_ports(&pod),
            vec![(80, "TCP".to_string()), (80, "UDP".to_string())]
        );
    }

    #[test]
    fn host_ports_become_lowercase_port_mappings_and_plain_ports_do_not() {
        let pod = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {containerPort: 80, hostPort: 18080}\n    - {containerPort: 81, protocol: UDP, hostPort: 18081, hostIP: 172.31.0.1}\n    - {containerPort: 82}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        let m = host_ports(&pod).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].host_port, m[0].container_port, m[0].protocol.as_str()),
            (18080, 80, "tcp")
        );
        assert_eq!(m[1].protocol, "udp");
        assert_eq!(m[1].host_ip.as_deref(), Some("172.31.0.1"));
        let bad = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 70000, hostPort: 1}]\n",
            "t",
        )
        .unwrap()
        .remove(0);
        assert!(host_ports(&bad).is_err());
    }

    #[test]
    fn lab_annotations_ask_for_addresses_and_a_pending_start_only() {
        let pod = |ann: &str| {
            parse_documents(
                &format!("kind: Pod\nmetadata: {{name: a, annotations: {{{ann}}}}}\n"),
                "t",
            )
            .unwrap()
            .remove(0)
        };
        let ips = requested_ips(&pod("palisade-lab/ips: '10.244.1.9, fd00:10:244:1::9'")).unwrap();
        assert_eq!(ips.len(), 2);
        assert!(requested_ips(&pod("palisade-lab/ips: '10.244.1.9,10.244.1.10'")).is_err());
        assert!(requested_ips(&pod("palisade-lab/ips: nope")).is_err());
        assert!(requested_ips(&pod("x: y")).unwrap().is_empty());
        assert_eq!(
            requested_phase(&pod("palisade-lab/phase: Pending")).unwrap(),
            Some(PodPhase::Pending)
        );
        assert_eq!(
            requested_phase(&pod("palisade-lab/phase: Running")).unwrap(),
            None
        );
        assert!(requested_phase(&pod("palisade-lab/phase: Succeeded")).is_err());
        assert!(requested_phase(&pod("palisade-lab/phase: Done")).is_err());
        let mut p = pod("palisade-lab/phase: Pending");
        remove_annotation(&mut p, PHASE_ANNOTATION);
        assert_eq!(annotation(&p, PHASE_ANNOTATION), None);
    }

    #[test]
    fn host_network_is_read_from_the_spec() {
        let hn = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec: {hostNetwork: true}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        let pod = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec: {hostNetwork: false}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        assert!(host_network(&hn));
        assert!(!host_network(&pod));
    }
}
