//! Representative cluster states, small enough to read: the golden rulesets (`tests/golden/`) and
//! the kernel tests (palisade-tests) compile these. Test support (feature `testkit`), not the
//! compiler: a malformed scenario panics with a message, as a test would.

use crate::model::cluster_policy_from_api;
use crate::model::{
    Change, ClusterState, EgressNat, FlowLog, LabelSelector, Labels, Namespace, Node, Peer, Pod,
    PodPhase, Policy, Rule,
};
use crate::policy_from_k8s;
use palisade_contract::Attachment;
use serde_json::{json, Value};
use std::net::IpAddr;

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

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario {
    /// Two nodes (`n1`, `n2`) and nothing else.
    pub fn new() -> Self {
        let mut st = ClusterState::default();
        for (n, a) in [("n1", "192.168.0.1"), ("n2", "192.168.0.2")] {
            st.apply(Change::UpsertNode(Node {
                name: n.into(),
                pod_cidrs: vec![],
                internal_ips: vec![a.parse().expect("a well-formed scenario")],
                addresses: vec![a.parse().expect("a well-formed scenario")],
                ..Node::default()
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
        let (ns, name) = key.split_once('/').expect("a well-formed scenario");
        self.st.apply(Change::UpsertPod(
            Pod {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{name}").into(),
                labels: labels(l),
                node_name: Some(node.into()),
                ips: ips
                    .iter()
                    .map(|s| s.parse::<IpAddr>().expect("a well-formed scenario"))
                    .collect(),
                ports: ports
                    .iter()
                    .map(|(n, p, proto)| crate::model::ContainerPort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        protocol: crate::model::Protocol::from_api(proto)
                            .expect("a well-formed scenario"),
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
        .expect("a well-formed scenario");
        self.st.apply(Change::UpsertPolicy(
            policy_from_k8s(&np).expect("a well-formed scenario"),
        ));
        self
    }
    /// A NetworkPolicy in audit mode (its annotation).
    pub fn audit_policy(mut self, ns: &str, name: &str, spec: Value) -> Self {
        let np = serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name,
            "annotations": {crate::model::AUDIT_ANNOTATION: "true"}}, "spec": spec}))
        .expect("a well-formed scenario");
        self.st.apply(Change::UpsertPolicy(
            policy_from_k8s(&np).expect("a well-formed scenario"),
        ));
        self
    }
    /// A policy that skipped validation (the ruleset must stay safe even then).
    /// A ClusterNetworkPolicy from its API spec.
    pub fn cnp(mut self, name: &str, spec: Value) -> Self {
        let o = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))
            .expect("a well-formed scenario");
        self.st.apply(Change::UpsertClusterPolicy(
            cluster_policy_from_api(&o).expect("a well-formed scenario"),
        ));
        self
    }

    pub fn policy_unchecked(mut self, p: Policy) -> Self {
        self.st.apply(Change::UpsertPolicy(p));
        self
    }
    /// This node's egress NAT, as the agent would set it.
    pub fn egress_nat(mut self, sources: &[&str], exempt: &[&str]) -> Self {
        let nets = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().expect("a well-formed scenario"))
                .collect()
        };
        self.st.apply(Change::SetEgressNat(Some(EgressNat {
            sources: nets(sources),
            exempt: nets(exempt),
        })));
        self
    }
    /// This node's flow log, as the agent would set it.
    pub fn flow_log(mut self, allowed: bool) -> Self {
        self.st.apply(Change::SetFlowLog(Some(FlowLog {
            group: 2411,
            rate: 100,
            burst: 200,
            allowed,
        })));
        self
    }
    pub fn attachment(mut self, key: &str, ips: &[&str], pending: bool) -> Self {
        let (ns, name) = key.split_once('/').expect("a well-formed scenario");
        let mut a = self.st.attachments.clone();
        a.push(Attachment {
            container_id: format!("c{}", a.len()),
            ifname: "eth0".into(),
            netns: String::new(),
            host_veth: palisade_contract::host_veth_name(&format!("c{}", a.len()), "eth0"),
            ips: ips
                .iter()
                .map(|s| s.parse().expect("a well-formed scenario"))
                .collect(),
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
                    audit: false,
                })
                .attachment("a/x", &["10.244.1.2"], false)
                .attachment("a/not-yet-known", &["10.244.1.9", "fd00:10:244:1::9"], true)
                .st,
        ),
        (
            "cluster_tiers_dual_stack",
            Scenario::new()
                .pod("a/web", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[("app", "web")], &[("http", 8080, "TCP")])
                .pod("a/db", "n1", &["10.244.1.3", "fd00:10:244:1::3"], &[("app", "db")], &[])
                .pod("b/mon", "n2", &["10.244.2.2", "fd00:10:244:2::2"], &[("app", "mon")], &[])
                .policy("a", "web", json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "http"}]}]}))
                .cnp("sensitive", json!({"tier": "Admin", "priority": 10,
                    "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                    "ingress": [{"name": "monitoring", "action": "Accept", "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "mon"}}}}]},
                                {"name": "own-team", "action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": "a"}}}]},
                                {"name": "everyone-else", "action": "Deny", "from": [{"namespaces": {}}]}],
                    "egress": [{"name": "dns-and-nodes", "action": "Accept", "to": [{"nodes": {}}, {"networks": ["10.96.0.10/32", "fd00:96::a/128"]}],
                                "protocols": [{"udp": {"destinationPort": {"number": 53}}}, {"tcp": {"destinationPort": {"range": {"start": 10250, "end": 10255}}}}]}]}))
                .cnp("default-deny", json!({"tier": "Baseline", "priority": 100,
                    "subject": {"namespaces": {}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
                    "egress": [{"action": "Accept", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}}],
                                "protocols": [{"destinationNamedPort": "http"}]}]}))
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
        (
            "flow_log_dual_stack",
            Scenario::new()
                .pod("a/x", "n1", &["10.244.1.2", "fd00:10:244:1::2"], &[("app", "x")], &[])
                .policy("a", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))
                .pod("c/w", "n1", &["10.244.1.3", "fd00:10:244:1::3"], &[("app", "w")], &[])
                .audit_policy("c", "would-allow-x", json!({"podSelector": {}, "ingress": [
                    {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}}], "ports": [{"port": 80}]}]}))
                .cnp("no-egress-to-b", json!({"tier": "Admin", "priority": 5,
                    "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "a"}}},
                    "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}]}))
                .flow_log(true)
                .st,
        ),
    ]
}
