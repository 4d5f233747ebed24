//! Shared by the integration tests: representative scenarios and a throwaway network namespace.
#![allow(dead_code)]

use palisade_contract::Attachment;
use palisade_policy::model::{
    Change, ClusterState, EgressNat, LabelSelector, Labels, Namespace, Node, Peer, Pod, PodPhase,
    Policy, Rule,
};
use palisade_policy::policy_from_k8s;
use serde_json::{json, Value};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const NODE: &str = "n1";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub struct Scenario {
    pub st: ClusterState,
}

impl Scenario {
    pub fn new() -> Self {
        let mut st = ClusterState::default();
        for (n, a) in [("n1", "192.168.0.1"), ("n2", "192.168.0.2")] {
            st.apply(Change::UpsertNode(Node {
                name: n.into(),
                pod_cidrs: vec![],
                internal_ips: vec![a.parse().unwrap()],
            }));
        }
        st.apply(Change::UpsertNamespace(Namespace::new(
            "a",
            labels(&[("team", "a")]),
        )));
        st.apply(Change::UpsertNamespace(Namespace::new(
            "b",
            labels(&[("team", "b")]),
        )));
        Scenario { st }
    }
    pub fn pod(
        mut self,
        key: &str,
        node: &str,
        ips: &[&str],
        l: &[(&str, &str)],
        ports: &[(&str, u16, &str)],
    ) -> Self {
        let (ns, name) = key.split_once('/').unwrap();
        self.st.apply(Change::UpsertPod(
            Pod {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{name}"),
                labels: labels(l),
                node_name: Some(node.into()),
                ips: ips.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect(),
                ports: ports
                    .iter()
                    .map(|(n, p, proto)| palisade_policy::model::ContainerPort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        protocol: palisade_policy::model::Protocol::from_api(proto).unwrap(),
                    })
                    .collect(),
                host_network: false,
                phase: PodPhase::Running,
            }
            .into(),
        ));
        self
    }
    pub fn policy(mut self, ns: &str, name: &str, spec: Value) -> Self {
        let np = serde_json::from_value(
            json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}),
        )
        .unwrap();
        self.st
            .apply(Change::UpsertPolicy(policy_from_k8s(&np).unwrap()));
        self
    }
    /// A policy that skipped validation (the ruleset must stay safe even then).
    pub fn policy_unchecked(mut self, p: Policy) -> Self {
        self.st.apply(Change::UpsertPolicy(p));
        self
    }
    /// This node's egress NAT, as the agent would set it.
    pub fn egress_nat(mut self, sources: &[&str], exempt: &[&str]) -> Self {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        self.st.apply(Change::SetEgressNat(Some(EgressNat {
            sources: nets(sources),
            exempt: nets(exempt),
        })));
        self
    }
    pub fn attachment(mut self, key: &str, ips: &[&str], pending: bool) -> Self {
        let (ns, name) = key.split_once('/').unwrap();
        let mut a = self.st.attachments.clone();
        a.push(Attachment {
            container_id: format!("c{}", a.len()),
            ifname: "eth0".into(),
            netns: String::new(),
            host_veth: palisade_contract::host_veth_name(&format!("c{}", a.len()), "eth0"),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pod_namespace: Some(ns.into()),
            pod_name: Some(name.into()),
            pod_uid: None,
            pending,
        });
        self.st.apply(Change::SetAttachments(a));
        self
    }
}

/// The representative scenarios whose rulesets are kept as golden files.
pub fn scenarios() -> Vec<(&'static str, ClusterState)> {
    let evil = "q\"uote'; } { delete table inet filter\n#";
    vec![
        (
            "deny_all",
            Scenario::new()
                .pod("a/x", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[("app", "x")], &[])
                .policy("a", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
                .st,
        ),
        (
            "selectors_and_ports",
            Scenario::new()
                .pod("a/web", "n1", &["10.244.1.2"], &[("app", "web")], &[])
                .pod("b/client", "n2", &["10.244.2.2"], &[("role", "client")], &[])
                .policy("a", "web", json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}, {"port": 8000, "endPort": 8100}, {"protocol": "SCTP"}]},
                    {"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["bad"]}]}}]}]}))
                .st,
        ),
        (
            "ipblock_except_dual_stack",
            Scenario::new()
                .pod("a/x", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[], &[])
                .policy("a", "egress-blocks", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12", "10.244.2.0/24"]}},
                            {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00:10:244:2::/64"]}}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]}]}))
                .st,
        ),
        (
            "named_ports",
            Scenario::new()
                .pod("a/srv", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[("app", "srv")], &[("http", 8080, "TCP"), ("dns", 53, "UDP")])
                .pod("a/cli", "n1", &["10.244.1.3"], &[("app", "cli")], &[])
                .pod("b/api", "n2", &["10.244.2.2"], &[("app", "api")], &[("api", 7000, "TCP")])
                .policy("a", "srv", json!({"podSelector": {"matchLabels": {"app": "srv"}}, "ingress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}))
                .policy("a", "cli", json!({"podSelector": {"matchLabels": {"app": "cli"}}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": "api"}]}]}))
                .st,
        ),
        (
            "hostile_strings_and_pending",
            Scenario::new()
                .pod("a/x", "n1", &["10.244.1.2"], &[("k", evil)], &[])
                .policy_unchecked(Policy {
                    namespace: "a".into(),
                    name: format!("p{evil}"),
                    pod_selector: LabelSelector::from_labels([("k", evil)]),
                    ingress: Some(vec![Rule {
                        peers: vec![Peer::Pods { namespace_selector: None, pod_selector: Some(LabelSelector::from_labels([("k", evil)])) }],
                        ports: vec![],
                    }]),
                    egress: None,
                })
                .attachment("a/x", &["10.244.1.2"], false)
                .attachment("a/not-yet-known", &["10.244.1.9", "fd00:10:244:1::9"], true)
                .st,
        ),
        (
            "egress_nat_dual_stack",
            Scenario::new()
                .pod("a/x", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[("app", "x")], &[])
                .attachment("a/x", &["10.244.1.2", "fd00:10:244:1::2"], false)
                .egress_nat(
                    &["10.244.0.0/16", "fd00:10:244::/48"],
                    &["10.244.0.0/16", "172.31.0.1/32", "172.31.0.2/32", "fd00:10:244::/48", "fd00:172:31::/64"],
                )
                .st,
        ),
    ]
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace created for one test and deleted on drop (also on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `pal-cmp-<pid>-<n>`. Panics (fails the test) if it cannot: root tests must not
    /// silently pass.
    pub fn new() -> Self {
        let name = format!(
            "pal-cmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {} (these tests need root)",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    /// Runs `nft -j -f -` with the document on stdin inside the namespace.
    pub fn nft_load(&self, doc: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(doc.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `nft -j list table inet palisade`, normalised: no handles, no metainfo, set elements sorted.
    pub fn list_table(&self) -> Value {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "-j", "list", "table", "inet", "palisade",
            ])
            .output()
            .expect("run nft list");
        assert!(
            out.status.success(),
            "nft list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
        normalise(&mut v);
        let mut items: Vec<Value> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x.get("metainfo").is_none())
            .cloned()
            .collect();
        // The kernel lists objects in creation order; compare by kind and name instead. The sort is
        // stable, so the rules of one chain keep their order.
        items.sort_by_key(|x| {
            let (kind, body) = x.as_object().unwrap().iter().next().unwrap();
            let name = body
                .get("chain")
                .or_else(|| body.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            (kind.clone(), name)
        });
        Value::Array(items)
    }
}

fn normalise(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("handle");
            if let Some(Value::Array(e)) = o.get_mut("elem") {
                e.sort_by_key(|x| x.to_string());
            }
            o.values_mut().for_each(normalise);
        }
        Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}

impl Netns {
    /// `nft list tables` inside the namespace.
    pub fn list_tables(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "tables"])
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "nft list tables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
