//! The conformance cases as data (`netns-tests/cases/*.yaml`) and the runner that drives a lab
//! through them: apply policies and label changes, check the full matrix after every step with
//! bounded convergence, then clean up (delete policies, revert labels) and check the baseline.

use crate::error::{LabError, Result};
use crate::k8s::{self, LabelEdit, ObjKey};
use crate::lab::{Family, Lab};
use crate::matrix::{Matrix, PortProto};
use crate::model::Model;
use crate::probe::Protocol;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a step may take to show its expected matrix (the bound).
pub const CONVERGENCE: Duration = Duration::from_secs(2);

/// The 3x3 model: namespaces x, y, z; pods a, b, c.
pub const MODEL_NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const MODEL_PODS: [&str; 3] = ["a", "b", "c"];
/// Ports and protocols every model pod serves.
pub const MODEL_PORTS: [(u16, Protocol); 4] = [
    (80, Protocol::Tcp),
    (81, Protocol::Tcp),
    (80, Protocol::Udp),
    (81, Protocol::Udp),
];

/// One case: an id (T01, U2, ...), the upstream title and its steps.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub family: Option<String>,
    /// The pods it runs on (`crate::model`): absent for the 3x3 model.
    #[serde(default)]
    pub model: Option<String>,
    pub steps: Vec<Step>,
}

impl Case {
    pub fn model(&self) -> Result<Model> {
        Model::named(self.model.as_deref())
    }
}

/// One step: actions, then the expected matrix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step is (for a transcribed case: the upstream subtest).
    #[serde(default)]
    pub title: Option<String>,
    /// Objects to apply (policies; `{{ip ns/pod}}` and `{{cidr4 ns/pod}}` are replaced).
    #[serde(default)]
    pub apply: Vec<Value>,
    /// Objects to delete, as `Kind ns/name`.
    #[serde(default)]
    pub delete: Vec<String>,
    /// Delete every NetworkPolicy and ClusterNetworkPolicy.
    #[serde(default)]
    pub delete_all_policies: bool,
    /// Label edits: `pod ns/name k=v`, `ns name k=v` (`k-` removes).
    #[serde(default)]
    pub label: Vec<String>,
    /// Expected matrix: default allowed; `all` rules apply to every port/protocol, then the rules
    /// under a `tcp/80`-style key apply to that one. Rules: `deny FROM -> TO` / `allow FROM -> TO`
    /// with `*`, `x/*`, `*/a` or `x/a` patterns; later rules override earlier ones.
    #[serde(default)]
    pub expect: BTreeMap<String, Vec<String>>,
    /// A transcribed case's upstream probes, `ns/pod -> ns/pod proto/port allow|deny`: each must
    /// agree with `expect` ([`check_pokes`]), so a hand-derived matrix is held to the upstream's own
    /// assertions before it meets the kernel.
    #[serde(default)]
    pub pokes: Vec<String>,
}

/// Checks that every poke of `step` agrees with its expected matrix over `model`.
pub fn check_pokes(step: &Step, model: Model) -> Result<()> {
    let m = expected_matrix(&step.expect, &model.pods(), model.ports())?;
    for poke in &step.pokes {
        let bad = || {
            LabError::Invalid(format!(
                "poke {poke:?}: expected `ns/pod -> ns/pod proto/port allow|deny`"
            ))
        };
        let (from, rest) = poke.split_once("->").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let [to, pp, verdict] = parts.as_slice() else {
            return Err(bad());
        };
        let allow = match *verdict {
            "allow" => true,
            "deny" => false,
            _ => return Err(bad()),
        };
        let pp = parse_port_proto(pp)?;
        let from = from.trim();
        let got = m.get(&pp, from, to).ok_or_else(|| {
            LabError::Invalid(format!("poke {poke:?}: no such cell in the model's matrix"))
        })?;
        if got != allow {
            return Err(LabError::Invalid(format!(
                "poke {poke:?} disagrees with the step's expected matrix ({})",
                if got { "allow" } else { "deny" }
            )));
        }
    }
    Ok(())
}

/// The network-policy-api conformance suite's cases, transcribed (`cases/network-policy-api/*.yaml`,
/// and the node-peer tests on their own model in `cases/network-policy-api-nodes/*.yaml`).
pub fn network_policy_api_cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for sub in ["cases/network-policy-api", "cases/network-policy-api-nodes"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(sub);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map_err(LabError::io(&dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            out.extend(load(&f)?);
        }
    }
    Ok(out)
}

/// Loads cases from a YAML file (a sequence of cases).
pub fn load(path: &Path) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).map_err(LabError::io(path))?;
    crate::yaml::from_str(&text, &path.display().to_string())
}

/// The upstream cases shipped with the crate (`cases/upstream.yaml`).
pub fn upstream_cases_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/upstream.yaml")
}

/// ClusterNetworkPolicy cases (`cases/cluster.yaml`): the upstream network-policy-api conformance
/// suite's scenarios, on the same 3x3 model.
pub fn cluster_cases_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/cluster.yaml")
}

/// Our own cases of the same shape (`cases/extra.yaml`).
pub fn extra_cases_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/extra.yaml")
}

fn pattern_matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pns, pname) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (ns, name) = pod.split_once('/').unwrap_or((pod, ""));
    (pns == "*" || pns == ns) && (pname == "*" || pname == name)
}

/// One expectation rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub from: String,
    pub to: String,
}

impl std::str::FromStr for Rule {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            LabError::Invalid(format!(
                "expectation {s:?}: expected `allow|deny FROM -> TO`"
            ))
        };
        let (verb, rest) = s.trim().split_once(' ').ok_or_else(bad)?;
        let allow = match verb {
            "allow" => true,
            "deny" => false,
            _ => return Err(bad()),
        };
        let (from, to) = rest.split_once("->").ok_or_else(bad)?;
        Ok(Rule {
            allow,
            from: from.trim().to_string(),
            to: to.trim().to_string(),
        })
    }
}

/// `tcp/80` → `(80, "TCP")`.
pub fn parse_port_proto(s: &str) -> Result<PortProto> {
    let (proto, port) = s
        .split_once('/')
        .ok_or_else(|| LabError::Invalid(format!("{s:?}: expected proto/port")))?;
    let proto: Protocol = proto.parse().map_err(LabError::Invalid)?;
    let port: u16 = port
        .parse()
        .map_err(|_| LabError::Invalid(format!("{s:?}: bad port")))?;
    Ok((port, proto.to_string()))
}

/// The expected matrix of a step over `pods` and `ports` (loopback not included).
pub fn expected_matrix(
    expect: &BTreeMap<String, Vec<String>>,
    pods: &[String],
    ports: &[(u16, Protocol)],
) -> Result<Matrix> {
    let all: Vec<Rule> = expect
        .get("all")
        .into_iter()
        .flatten()
        .map(|r| r.parse())
        .collect::<Result<_>>()?;
    let mut per: BTreeMap<PortProto, Vec<Rule>> = BTreeMap::new();
    for (k, rules) in expect.iter().filter(|(k, _)| k.as_str() != "all") {
        let pp = parse_port_proto(k)?;
        per.insert(pp, rules.iter().map(|r| r.parse()).collect::<Result<_>>()?);
    }
    let wanted: BTreeSet<PortProto> = ports.iter().map(|(p, pr)| (*p, pr.to_string())).collect();
    if let Some(extra) = per.keys().find(|k| !wanted.contains(*k)) {
        return Err(LabError::Invalid(format!(
            "expectation for {}/{} which is not probed",
            extra.1, extra.0
        )));
    }
    let mut m = Matrix::new(pods.to_vec());
    for pp in &wanted {
        let rules: Vec<&Rule> = all
            .iter()
            .chain(per.get(pp).into_iter().flatten())
            .collect();
        for from in pods {
            for to in pods.iter().filter(|t| *t != from) {
                let mut v = true;
                for r in &rules {
                    if pattern_matches(&r.from, from) && pattern_matches(&r.to, to) {
                        v = r.allow;
                    }
                }
                m.set(pp, from, to, v);
            }
        }
    }
    Ok(m)
}

/// The 3x3 model's namespaces and pods (`Model::ThreeByThree`), spread over `nodes` round-robin.
pub fn model_objects(nodes: &[String]) -> Vec<Value> {
    Model::ThreeByThree.objects(nodes)
}

/// Probes the lab's pods and returns the observed matrix.
pub fn observe(lab: &Lab, ports: &[(u16, Protocol)], family: Family) -> Result<Matrix> {
    let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
    let records = lab.probe_matrix(ports, family, crate::lab::DEFAULT_PROBE_TIMEOUT)?;
    Ok(Matrix::from_records(pods, &records))
}

/// Polls until the observed matrix equals `expected` or `bound` has passed (a round that started
/// within the bound finishes); returns the last observation on failure.
pub fn converge(
    lab: &Lab,
    expected: &Matrix,
    ports: &[(u16, Protocol)],
    family: Family,
    bound: Duration,
) -> Result<std::result::Result<Matrix, Matrix>> {
    let start = Instant::now();
    loop {
        let observed = observe(lab, ports, family)?;
        if observed == *expected {
            return Ok(Ok(observed));
        }
        if start.elapsed() >= bound {
            return Ok(Err(observed));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Formats a mismatch: what differs and both tables.
pub fn explain_mismatch(what: &str, expected: &Matrix, observed: &Matrix) -> String {
    let diffs = expected.diff(observed);
    let mut s = format!(
        "{what}: {} cell(s) differ from the expectation (expected -> observed):\n",
        diffs.len()
    );
    for d in &diffs {
        s.push_str(&format!("  {d}\n"));
    }
    s.push_str("observed (! = differs from expected):\n");
    s.push_str(&observed.render(Some(expected), false));
    s
}

fn substitute(lab: &Lab, obj: &Value) -> Result<Value> {
    // JSON text: placeholders sit inside strings, and JSON writes every string as it is.
    let mut text = serde_json::to_string(obj).map_err(|e| LabError::Parse {
        what: "case object".into(),
        detail: e.to_string(),
    })?;
    while let Some(start) = text.find("{{") {
        let end = text[start..]
            .find("}}")
            .map(|e| start + e)
            .ok_or_else(|| LabError::Invalid("unclosed {{".into()))?;
        let inner = text[start + 2..end].trim().to_string();
        let (func, pod) = inner
            .split_once(' ')
            .ok_or_else(|| LabError::Invalid(format!("placeholder {inner:?}")))?;
        let p = lab.pod(pod.trim())?;
        let ip = Family::V4
            .pick(&p.ips)
            .ok_or_else(|| LabError::Invalid(format!("pod {pod} has no IPv4")))?;
        let value = match func {
            "ip" => ip.to_string(),
            "ip6" => Family::V6
                .pick(&p.ips)
                .ok_or_else(|| LabError::Invalid(format!("pod {pod} has no IPv6")))?
                .to_string(),
            "cidr4" => {
                let net = ipnet::Ipv4Net::new(
                    match ip {
                        std::net::IpAddr::V4(v4) => v4,
                        std::net::IpAddr::V6(_) => {
                            return Err(LabError::Invalid("cidr4 of IPv6".into()))
                        }
                    },
                    4,
                )
                .map_err(|e| LabError::Invalid(e.to_string()))?;
                net.trunc().to_string()
            }
            other => {
                return Err(LabError::Invalid(format!(
                    "unknown placeholder function {other:?}"
                )))
            }
        };
        text.replace_range(start..end + 2, &value);
    }
    serde_json::from_str(&text).map_err(|e| LabError::Parse {
        what: "case object after substitution".into(),
        detail: e.to_string(),
    })
}

/// Runs one case against a lab that holds the model and no policies; always cleans up (deletes
/// policies, reverts labels) and re-checks the all-allowed baseline. Returns a failure report.
pub fn run_case(lab: &mut Lab, case: &Case) -> std::result::Result<(), String> {
    let family = match case.family.as_deref() {
        Some("ipv6") => Family::V6,
        _ => Family::V4,
    };
    let model = case.model().map_err(|e| e.to_string())?;
    let mut original_labels: BTreeMap<ObjKey, Value> = BTreeMap::new();
    let outcome = run_steps(lab, case, model, family, &mut original_labels);
    let cleanup = cleanup(lab, &original_labels);
    let baseline = baseline_within(
        lab,
        model.ports(),
        family,
        &format!("{} baseline after cleanup", case.id),
        CONVERGENCE,
    );
    let mut problems = Vec::new();
    if let Err(e) = outcome {
        problems.push(e);
    }
    if let Err(e) = cleanup {
        problems.push(format!("cleanup: {e}"));
    }
    if let Err(e) = baseline {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn run_steps(
    lab: &mut Lab,
    case: &Case,
    model: Model,
    family: Family,
    original_labels: &mut BTreeMap<ObjKey, Value>,
) -> std::result::Result<(), String> {
    let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
    let ports = model.ports();
    for (i, step) in case.steps.iter().enumerate() {
        let what = match &step.title {
            Some(t) => format!("{} step {} ({t})", case.id, i + 1),
            None => format!("{} step {}", case.id, i + 1),
        };
        check_pokes(step, model).map_err(|e| format!("{what}: {e}"))?;
        do_actions(lab, step, original_labels).map_err(|e| format!("{what}: {e}"))?;
        let expected =
            expected_matrix(&step.expect, &pods, ports).map_err(|e| format!("{what}: {e}"))?;
        match converge(lab, &expected, ports, family, CONVERGENCE)
            .map_err(|e| format!("{what}: {e}"))?
        {
            Ok(_) => {}
            Err(observed) => return Err(explain_mismatch(&what, &expected, &observed)),
        }
    }
    Ok(())
}

fn do_actions(
    lab: &mut Lab,
    step: &Step,
    original_labels: &mut BTreeMap<ObjKey, Value>,
) -> Result<()> {
    for d in &step.delete {
        let (kind, rest) = d
            .split_once(' ')
            .ok_or_else(|| LabError::Invalid(format!("delete {d:?}: expected `Kind ns/name`")))?;
        let (ns, name) = rest.split_once('/').unwrap_or(("", rest));
        lab.delete_key(&ObjKey::new(kind, ns, name))?;
    }
    if step.delete_all_policies {
        lab.delete_all_policies()?;
    }
    let objs: Vec<Value> = step
        .apply
        .iter()
        .map(|o| substitute(lab, o))
        .collect::<Result<_>>()?;
    if !objs.is_empty() {
        lab.apply(objs)?;
    }
    for l in &step.label {
        let parts: Vec<&str> = l.split_whitespace().collect();
        let (kind, target, edits) = match parts.as_slice() {
            [kind, target, edits @ ..] if !edits.is_empty() => (*kind, *target, edits),
            _ => {
                return Err(LabError::Invalid(format!(
                    "label {l:?}: expected `pod ns/name k=v` or `ns name k=v`"
                )))
            }
        };
        let edits: Vec<LabelEdit> = edits.iter().map(|e| e.parse()).collect::<Result<_>>()?;
        let key = match kind {
            "pod" => {
                let (ns, name) = target
                    .split_once('/')
                    .ok_or_else(|| LabError::Invalid(format!("label {l:?}: pod as ns/name")))?;
                ObjKey::new("Pod", ns, name)
            }
            "ns" => ObjKey::new("Namespace", "", target),
            _ => return Err(LabError::Invalid(format!("label {l:?}: kind is pod or ns"))),
        };
        if !original_labels.contains_key(&key) {
            let obj = lab.read_object(&key)?;
            let labels = obj
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .cloned()
                .unwrap_or(Value::Null);
            original_labels.insert(key.clone(), labels);
        }
        if key.kind == "Pod" {
            lab.label_pod(&key.namespace, &key.name, &edits)?;
        } else {
            lab.label_namespace(&key.name, &edits)?;
        }
    }
    Ok(())
}

fn cleanup(lab: &mut Lab, original_labels: &BTreeMap<ObjKey, Value>) -> Result<()> {
    lab.delete_all_policies()?;
    for (key, labels) in original_labels {
        lab.restore_labels(key, labels.clone())?;
    }
    Ok(())
}

/// Checks the all-allowed matrix (bounded by [`CONVERGENCE`]).
pub fn check_baseline(lab: &Lab, family: Family, what: &str) -> std::result::Result<(), String> {
    check_baseline_within(lab, family, what, CONVERGENCE)
}

/// Checks the all-allowed matrix within `bound`.
pub fn check_baseline_within(
    lab: &Lab,
    family: Family,
    what: &str,
    bound: Duration,
) -> std::result::Result<(), String> {
    baseline_within(lab, &MODEL_PORTS, family, what, bound)
}

/// Checks the all-allowed matrix over `ports` within `bound`.
pub fn baseline_within(
    lab: &Lab,
    ports: &[(u16, Protocol)],
    family: Family,
    what: &str,
    bound: Duration,
) -> std::result::Result<(), String> {
    let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
    let expected = expected_matrix(&BTreeMap::new(), &pods, ports).map_err(|e| e.to_string())?;
    match converge(lab, &expected, ports, family, bound).map_err(|e| format!("{what}: {e}"))? {
        Ok(_) => Ok(()),
        Err(observed) => Err(explain_mismatch(what, &expected, &observed)),
    }
}

/// Helper for `k8s` label parsing reuse in tests.
pub fn labels_of(v: &Value) -> BTreeMap<String, String> {
    k8s::labels(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<String> {
        let mut v = Vec::new();
        for ns in MODEL_NAMESPACES {
            for p in MODEL_PODS {
                v.push(format!("{ns}/{p}"));
            }
        }
        v
    }

    #[test]
    fn expectations_default_to_allowed_and_later_rules_override() {
        let mut e = BTreeMap::new();
        e.insert(
            "all".to_string(),
            vec!["deny * -> x/a".to_string(), "allow x/b -> x/a".to_string()],
        );
        e.insert("tcp/81".to_string(), vec!["allow y/* -> x/a".to_string()]);
        let m = expected_matrix(&e, &pods(), &MODEL_PORTS).unwrap();
        let t80 = (80, "TCP".to_string());
        let t81 = (81, "TCP".to_string());
        assert_eq!(m.get(&t80, "x/b", "x/a"), Some(true));
        assert_eq!(m.get(&t80, "x/c", "x/a"), Some(false));
        assert_eq!(m.get(&t80, "y/a", "x/a"), Some(false));
        assert_eq!(m.get(&t81, "y/a", "x/a"), Some(true));
        assert_eq!(m.get(&t80, "x/a", "y/b"), Some(true));
        assert_eq!(
            m.get(&t80, "x/a", "x/a"),
            None,
            "loopback is not part of the matrix"
        );
        assert_eq!(m.cells.len(), 4 * 9 * 8);
    }

    #[test]
    fn bad_expectations_are_errors() {
        assert!("permit * -> *".parse::<Rule>().is_err());
        assert!("deny x/a".parse::<Rule>().is_err());
        let mut e = BTreeMap::new();
        e.insert("sctp/80".to_string(), vec![]);
        assert!(expected_matrix(&e, &pods(), &MODEL_PORTS).is_err());
    }

    #[test]
    fn every_shipped_case_parses_and_its_expectations_are_valid() {
        let cases = load(&upstream_cases_path()).unwrap();
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        for i in 1..=42 {
            assert!(
                ids.contains(&format!("T{i:02}").as_str()),
                "T{i:02} missing"
            );
        }
        for u in ["U1", "U2", "U3"] {
            assert!(ids.contains(&u), "{u} missing");
        }
        let extra = load(&extra_cases_path()).unwrap();
        assert!(extra.iter().any(|c| c.family.as_deref() == Some("ipv6")));
        let cluster = load(&cluster_cases_path()).unwrap();
        assert!(cluster.iter().any(|c| c.family.as_deref() == Some("ipv6")));
        for c in cases.iter().chain(&extra).chain(&cluster) {
            assert!(!c.steps.is_empty(), "{}", c.id);
            for s in &c.steps {
                expected_matrix(&s.expect, &pods(), &MODEL_PORTS).unwrap();
                for o in &s.apply {
                    k8s::key_of(o).unwrap();
                }
            }
        }
    }

    /// Every transcribed network-policy-api case parses, names a known model, and every upstream
    /// poke agrees with its step's hand-derived matrix.
    #[test]
    fn network_policy_api_cases_parse_and_every_poke_agrees_with_its_matrix() {
        let cases = network_policy_api_cases().unwrap();
        let mut problems = Vec::new();
        for c in &cases {
            let model = c.model().unwrap();
            assert!(
                matches!(
                    model,
                    Model::NetworkPolicyApi | Model::NetworkPolicyApiNodes
                ),
                "{}",
                c.id
            );
            for (i, step) in c.steps.iter().enumerate() {
                if let Err(e) = check_pokes(step, model) {
                    problems.push(format!("{} step {}: {e}", c.id, i + 1));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn a_poke_that_disagrees_with_the_matrix_is_refused() {
        let step: Step = serde_json::from_value(serde_json::json!({
            "expect": {"all": ["deny network-policy-conformance-slytherin/* -> network-policy-conformance-gryffindor/*"]},
            "pokes": ["network-policy-conformance-slytherin/draco-malfoy-0 -> network-policy-conformance-gryffindor/harry-potter-0 tcp/80 allow"]
        }))
        .unwrap();
        let e = check_pokes(&step, Model::NetworkPolicyApi).unwrap_err();
        assert!(e.to_string().contains("disagrees"), "{e}");
    }
}
