//! Every item of docs/netpol-semantics.md, pinned by a test named after its number.
//!
//! `W::can` answers through `explain` (the semantic model) and checks that the rulesets of the
//! nodes involved give the same answer for the same packet, so each test covers both.

use super::*;
use crate::explain::{explain, Endpoint};
use crate::model::*;
use crate::ruleset::eval::Packet;
use crate::ruleset::names::{self, *};
use crate::ruleset::{AddrField, Elem, Family, SetKey, Stmt};
use palisade_contract::Attachment;
use serde_json::{json, Value};
use std::net::IpAddr;

const N1: &str = "n1";
const N2: &str = "n2";
const N1_IP: &str = "192.168.0.1";
const N2_IP: &str = "192.168.0.2";
const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) struct W {
    pub st: ClusterState,
}

impl W {
    pub fn new() -> Self {
        let mut st = ClusterState::default();
        for (n, a) in [(N1, N1_IP), (N2, N2_IP)] {
            st.apply(Change::UpsertNode(Node {
                name: n.into(),
                pod_cidrs: vec![],
                internal_ips: vec![ip(a)],
                addresses: vec![ip(a)],
                ..Node::default()
            }));
        }
        let mut w = W { st };
        w.ns("a", &[("team", "a")]);
        w.ns("b", &[("team", "b")]);
        w
    }
    pub fn ns(&mut self, name: &str, l: &[(&str, &str)]) {
        self.st
            .apply(Change::UpsertNamespace(Namespace::new(name, labels(l))));
    }
    pub fn pod(&mut self, key: &str, node: &str, ips: &[&str], l: &[(&str, &str)]) {
        self.pod_labelled(key, node, ips, labels(l));
    }
    /// A pod holding `labels` as given (a clone shares its pairs, as the sources share them).
    pub fn pod_labelled(&mut self, key: &str, node: &str, ips: &[&str], labels: Labels) {
        let (ns, name) = key.split_once('/').unwrap();
        self.st.apply(Change::UpsertPod(
            Pod {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{key}").into(),
                labels,
                node_name: Some(node.into()),
                ips: ips.iter().map(|s| ip(s)).collect(),
                ports: vec![].into(),
                host_network: false,
                phase: PodPhase::Running,
            }
            .into(),
        ));
    }
    pub fn ports(&mut self, key: &str, ports: &[(&str, u16, Protocol)]) {
        let p = std::sync::Arc::make_mut(self.st.pods.get_mut(key).unwrap());
        p.ports = ports
            .iter()
            .map(|(n, port, protocol)| ContainerPort {
                name: (!n.is_empty()).then(|| n.to_string()),
                port: *port,
                protocol: *protocol,
            })
            .collect();
    }
    pub fn policy(&mut self, key: &str, spec: Value) {
        let (ns, name) = key.split_once('/').unwrap();
        let np = serde_json::from_value(
            json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}),
        )
        .unwrap();
        self.st
            .apply(Change::UpsertPolicy(policy_from_k8s(&np).unwrap()));
    }
    /// A NetworkPolicy in audit mode (its annotation), converted as the agent's sources do.
    pub fn audit_policy(&mut self, key: &str, spec: Value) {
        let (ns, name) = key.split_once('/').unwrap();
        let np = serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name,
            "annotations": {AUDIT_ANNOTATION: "true"}}, "spec": spec}))
        .unwrap();
        self.st
            .apply(Change::UpsertPolicy(policy_from_k8s(&np).unwrap()));
    }
    /// A ClusterNetworkPolicy from its API spec, converted as the agent's sources do.
    pub fn cnp(&mut self, name: &str, spec: Value) {
        let o = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        let cp = cluster_policy_from_api(&o).unwrap_or_else(|e| panic!("{e}"));
        self.st.apply(Change::UpsertClusterPolicy(cp));
    }
    pub fn del_cnp(&mut self, name: &str) {
        self.st
            .apply(Change::DeleteClusterPolicy { name: name.into() });
    }
    pub fn del_policy(&mut self, key: &str) {
        let (ns, name) = key.split_once('/').unwrap();
        self.st.apply(Change::DeletePolicy {
            namespace: ns.into(),
            name: name.into(),
        });
    }

    fn endpoint_ip(&self, e: &Endpoint, v6: bool) -> IpAddr {
        match e {
            Endpoint::Ip(i) => *i,
            Endpoint::Pod { namespace, name } => *self.st.pods[pod_key(namespace, name).as_str()]
                .ips
                .iter()
                .find(|i| i.is_ipv6() == v6)
                .unwrap(),
        }
    }

    /// What explain says of `from` → `to` on port/proto, from node n1's model.
    pub fn why(&self, from: &str, to: &str, port: u16, proto: Protocol) -> crate::Explanation {
        let c = compile(&self.st, N1);
        explain(
            &self.st,
            &c,
            &from.parse().unwrap(),
            &to.parse().unwrap(),
            port,
            proto,
        )
        .unwrap()
    }

    /// May `from` open a connection to `to` on port/proto? Explain and the rulesets must agree.
    pub fn can(&self, from: &str, to: &str, port: u16, proto: Protocol) -> bool {
        self.can_fam(from, to, port, proto, false)
    }

    pub fn can_fam(&self, from: &str, to: &str, port: u16, proto: Protocol, v6: bool) -> bool {
        let f: Endpoint = from.parse().unwrap();
        let t: Endpoint = to.parse().unwrap();
        let c = compile(&self.st, N1);
        let x = explain(&self.st, &c, &f, &t, port, proto).unwrap();
        if v6 {
            // explain picks the first common family; check the v6 pair through the rulesets only.
            assert!(x.from_ip.is_ipv4());
        }
        let (sip, dip) = (self.endpoint_ip(&f, v6), self.endpoint_ip(&t, v6));
        let by_rules = [N1, N2].iter().all(|n| {
            let rs = compile(&self.st, n).ruleset;
            let from_this_node = self.st.nodes[*n].internal_ips.contains(&sip);
            rs.eval_forward(&Packet {
                saddr: sip,
                daddr: dip,
                proto: Some(proto),
                dport: port,
                from_this_node,
            })
        });
        if !v6 {
            assert_eq!(x.allowed, by_rules, "explain and ruleset disagree:\n{x}");
        }
        if v6 {
            by_rules
        } else {
            x.allowed
        }
    }
}

mod cluster;
mod node;
mod observe;
mod overlay_nat;
mod shape;

fn compiled(w: &W) -> Compiled {
    compile(&w.st, N1)
}

// ---------------------------------------------------------------- isolation and combination

#[test]
fn semantics_01_pod_selected_by_no_policy_is_not_isolated() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/other",
        json!({"podSelector": {"matchLabels": {"app": "nomatch"}}}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can("a/x", "b/y", 80, UDP));
    assert!(w.can("a/x", "8.8.8.8", 53, UDP));
    let c = compiled(&w);
    assert!(
        !c.pods["a/x"].isolated(Direction::Ingress) && !c.pods["a/x"].isolated(Direction::Egress)
    );
}

#[test]
fn semantics_02_ingress_only_policy_never_restricts_egress() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{"ports": [{"port": 1}]}]}));
    assert!(w.can("a/x", "b/y", 80, TCP), "egress untouched");
    assert!(!w.can("b/y", "a/x", 80, TCP), "ingress isolated");
}

#[test]
fn semantics_03_bare_pod_selector_denies_ingress_and_empty_egress_list_does_not_isolate() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "egress": []}));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    assert!(w.can("a/x", "b/y", 80, TCP));
}

#[test]
fn semantics_04_listed_type_without_rules_denies_all_in_that_direction() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "policyTypes": ["Egress"]}));
    assert!(!w.can("a/x", "b/y", 80, TCP));
    assert!(!w.can("a/x", "1.1.1.1", 53, UDP));
    assert!(w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn semantics_05_empty_rule_allows_everything_in_that_direction() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}));
    assert!(w.can("b/y", "a/x", 9999, SCTP));
    assert!(w.can("203.0.113.9", "a/x", 1, UDP));
    assert!(w.can("a/x", "203.0.113.9", 443, TCP));
}

#[test]
fn semantics_06_allows_are_the_union_over_all_selecting_policies() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p80",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    w.policy("a/p443", json!({"podSelector": {"matchLabels": {"app": "x"}}, "ingress": [{"ports": [{"port": 443}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can("b/y", "a/x", 443, TCP));
    assert!(!w.can("b/y", "a/x", 22, TCP));
    assert_eq!(
        compiled(&w).pods["a/x"].ingress,
        vec!["a/p443".to_string(), "a/p80".to_string()]
    );
}

#[test]
fn semantics_07_pod_to_pod_needs_both_egress_and_ingress() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N2, &["10.0.2.1"], &[("app", "y")]);
    w.policy("a/x-egress", json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]}));
    assert!(w.can("a/x", "a/y", 80, TCP));
    w.policy(
        "a/y-deny",
        json!({"podSelector": {"matchLabels": {"app": "y"}}}),
    );
    assert!(
        !w.can("a/x", "a/y", 80, TCP),
        "egress allows but ingress denies"
    );
    w.policy("a/y-allow", json!({"podSelector": {"matchLabels": {"app": "y"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}]}]}));
    assert!(w.can("a/x", "a/y", 80, TCP));
}

#[test]
fn semantics_08_pod_selector_selects_only_in_the_policy_namespace() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/x", N1, &["10.0.1.2"], &[]);
    w.pod("b/z", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {"matchLabels": {}}}));
    assert!(!w.can("b/z", "a/x", 80, TCP));
    assert!(w.can("b/z", "b/x", 80, TCP));
}

#[test]
fn semantics_09_replies_pass_through_conntrack_before_any_policy() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let rs = compiled(&w).ruleset;
    for chain in [CHAIN_POSTROUTING, CHAIN_EGRESS_HOST] {
        // Only the source guard (what a pod sends from another's address) comes first.
        let rules = &rs.chains[chain].rules[2..];
        assert_eq!(
            rules[0].stmts,
            vec![Stmt::CtEstablished, Stmt::Accept],
            "{chain}"
        );
        assert_eq!(
            rules[1].stmts,
            vec![Stmt::CtRelated, Stmt::Jump(CHAIN_RELATED.to_string())],
            "{chain}"
        );
        assert_eq!(rules[2].stmts, vec![Stmt::CtInvalid, Stmt::Drop], "{chain}");
    }
}

#[test]
fn semantics_10_policy_update_replaces_the_whole_spec() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}),
    );
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "no leftover from the old spec"
    );
    assert!(w.can("b/y", "a/x", 81, TCP));
}

#[test]
fn semantics_11_deleting_the_last_policy_removes_isolation() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}}));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    w.del_policy("a/p");
    assert!(w.can("b/y", "a/x", 80, TCP));
    let rs = compiled(&w).ruleset;
    assert!(rs.sets[MAP_INGRESS_V4].elements.is_empty());
    assert_eq!(
        rs.chains.keys().collect::<Vec<_>>(),
        [
            CHAIN_EGRESS_HOST,
            CHAIN_EXEMPT_EG,
            CHAIN_EXEMPT_IN,
            CHAIN_INGRESS,
            CHAIN_NEIGHBOUR,
            CHAIN_PENDING_DST,
            CHAIN_POSTROUTING,
            CHAIN_RELATED
        ],
        "only the base chains and what they always use remain"
    );
}

// ---------------------------------------------------------------- peers

#[test]
fn semantics_12_absent_or_empty_from_means_any_peer_including_external() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [], "ports": [{"port": 80}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can("198.51.100.7", "a/x", 80, TCP));
}

#[test]
fn semantics_13_pod_selector_peer_means_pods_of_the_policy_namespace_only() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("a/y", N2, &["10.0.2.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.2"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    assert!(w.can("a/y", "a/x", 80, TCP));
    assert!(!w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn semantics_14_namespace_selector_peer_means_all_pods_of_matching_namespaces() {
    let mut w = W::new();
    w.ns("c", &[]);
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.pod("c/z", N2, &["10.0.2.2"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("c/z", "a/x", 80, TCP));
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    assert!(w.can("c/z", "a/x", 80, TCP));
}

#[test]
fn semantics_15_selectors_in_one_peer_are_anded_separate_peers_are_ored() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/web", N2, &["10.0.2.1"], &[("app", "web")]);
    w.pod("b/db", N2, &["10.0.2.2"], &[("app", "db")]);
    w.pod("a/web", N2, &["10.0.2.3"], &[("app", "web")]);
    w.policy("a/and", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "web"}}}]}]}));
    assert!(w.can("b/web", "a/x", 80, TCP));
    assert!(!w.can("b/db", "a/x", 80, TCP));
    assert!(!w.can("a/web", "a/x", 80, TCP));
    w.policy("a/and", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}, {"podSelector": {"matchLabels": {"app": "web"}}}]}]}));
    assert!(w.can("b/db", "a/x", 80, TCP));
    assert!(w.can("a/web", "a/x", 80, TCP));
}

/// A NetworkPolicy over the node's limits is refused: it still isolates the pods it selects (its
/// direction allows nothing, not everything), other policies still allow what they allow, and the
/// compile says why. At the limit it is compiled as usual.
#[test]
fn a_policy_over_its_limits_isolates_its_pods_and_allows_nothing() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("b/web", N2, &["10.0.2.1"], &[("app", "web")]);
    w.pod("b/db", N2, &["10.0.2.2"], &[("app", "db")]);
    // Three pod peers, selecting 1 + 1 + 2 = 4 pods (b/web twice).
    let spec = json!({"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "web"}}}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "db"}}},
                  {"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": 5432}]}]});
    w.policy("a/big", spec);
    let at = |w: &mut W, pod_peers, peer_pods| {
        w.st.apply(Change::SetPolicyLimits(PolicyLimits {
            pod_peers,
            peer_pods,
        }));
        compiled(w).policies["a/big"].refused
    };
    assert_eq!(at(&mut w, 3, 4), None);
    assert_eq!(compiled(&w).policies["a/big"].peer_pods(), 4);
    assert!(w.can("b/web", "a/x", 80, TCP));
    assert!(w.can("b/db", "a/x", 5432, TCP));
    assert_eq!(
        at(&mut w, 3, 3),
        Some(Refusal::PeerPods { found: 4, limit: 3 })
    );
    assert!(!w.can("b/web", "a/x", 80, TCP), "refused: nothing allowed");
    assert!(!w.can("b/db", "a/x", 5432, TCP));
    let why = w.why("b/web", "a/x", 80, TCP).to_string();
    assert!(
        why.contains("refused on this node, allowing nothing: a/big (its pod peers select 4 pods"),
        "{why}"
    );
    assert!(w.can("a/x", "b/web", 80, TCP), "egress: not its direction");
    let c = compiled(&w);
    assert!(
        c.warnings.iter().any(|m| m.contains("a/big is refused")
            && m.contains("select 4 pods")
            && m.contains("--max-policy-peer-pods")),
        "{:?}",
        c.warnings
    );
    assert_eq!(
        at(&mut w, 2, 100),
        Some(Refusal::PodPeers { found: 3, limit: 2 })
    );
    assert!(!w.can("b/web", "a/x", 80, TCP));
    // Another policy's allows still hold for the pods the refused one isolates.
    w.policy("a/web", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}]}]}));
    assert!(w.can("b/web", "a/x", 80, TCP));
    assert!(!w.can("b/db", "a/x", 5432, TCP));
}

/// What a tenant can write into one policy within the API's size limit, against the default
/// limits: thousands of pod peers that each select every pod, or thousands of rules of one peer
/// each. Each is refused before it holds more than the limit (a 600 KB policy of the first kind
/// took a 10k-pod compile 14 s and 1.7 GB; of the second, 40 million set elements), and the
/// node's table holds no peer set for it.
#[test]
fn hostile_policies_are_refused_before_they_cost_the_node() {
    let mut w = W::new();
    for i in 0..400 {
        let node = if i % 2 == 0 { N1 } else { N2 };
        let ip = format!("10.1.{}.{}", i / 200, i % 200 + 1);
        w.pod(&format!("b/p{i}"), node, &[&ip], &[("app", "web")]);
    }
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    // A distinct peer each (no two resolve as one) that selects every pod.
    let every_pod = |i: usize| json!({"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": format!("x{i}"), "operator": "DoesNotExist"}]}});
    let many_peers: Vec<Value> = (0..1000).map(every_pod).collect();
    w.policy(
        "a/peers",
        json!({"podSelector": {}, "ingress": [{"from": many_peers}]}),
    );
    let many_rules: Vec<Value> = (0..3000)
        .map(|i| json!({"from": [every_pod(i)], "ports": [{"port": i % 60000 + 1}]}))
        .collect();
    w.policy("a/rules", json!({"podSelector": {}, "ingress": many_rules}));
    w.st.apply(Change::SetPolicyLimits(PolicyLimits {
        pod_peers: PolicyLimits::DEFAULT.pod_peers,
        peer_pods: 10_000,
    }));
    let c = compiled(&w);
    assert_eq!(
        c.policies["a/peers"].refused,
        Some(Refusal::PodPeers {
            found: 1000,
            limit: 256
        })
    );
    // 250 peers would pass the first limit: the pods they select stop it.
    let some_peers: Vec<Value> = (0..250).map(every_pod).collect();
    w.policy(
        "a/peers",
        json!({"podSelector": {}, "ingress": [{"from": some_peers}]}),
    );
    let c = compiled(&w);
    assert_eq!(
        c.policies["a/peers"].refused,
        Some(Refusal::PeerPods {
            found: 250 * 401,
            limit: 10_000
        })
    );
    assert_eq!(
        c.policies["a/rules"].refused,
        Some(Refusal::PodPeers {
            found: 3000,
            limit: 256
        })
    );
    let peer_sets: Vec<&String> = c
        .ruleset
        .sets
        .keys()
        .filter(|n| n.starts_with(PEER_SET_PREFIX))
        .collect();
    assert!(peer_sets.is_empty(), "{peer_sets:?}");
    assert!(!w.can("b/p1", "a/x", 80, TCP));
}

/// The resolver matches a selector once per shared label set: pods sharing one set, pods with an
/// equal set of their own and pods with another set are each selected exactly as their labels say.
#[test]
fn pods_sharing_a_label_set_are_selected_as_pods_with_their_own_copy() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    let web = labels(&[("app", "web")]);
    let db = labels(&[("app", "db")]);
    w.pod_labelled("b/web1", N2, &["10.0.2.1"], web.clone());
    w.pod_labelled("a/web2", N2, &["10.0.2.2"], web.clone());
    w.pod_labelled("b/db1", N2, &["10.0.2.3"], db.clone());
    w.pod_labelled("a/db2", N2, &["10.0.2.4"], db.clone());
    w.pod("b/web3", N2, &["10.0.2.5"], &[("app", "web")]);
    assert!(w.st.pods["b/web1"]
        .labels
        .is_shared_with(&w.st.pods["a/web2"].labels));
    assert!(!w.st.pods["b/web1"]
        .labels
        .is_shared_with(&w.st.pods["b/web3"].labels));
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}]}]}));
    for from in ["b/web1", "a/web2", "b/web3"] {
        assert!(w.can(from, "a/x", 80, TCP), "{from}");
    }
    for from in ["b/db1", "a/db2"] {
        assert!(!w.can(from, "a/x", 80, TCP), "{from}");
    }
}

#[test]
fn semantics_16_all_pods_everywhere_peer_still_excludes_external_ips() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("203.0.113.1", "a/x", 80, TCP));
}

#[test]
fn semantics_17_selector_peers_never_match_node_ips() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    assert!(
        !w.can(N2_IP, "a/x", 80, TCP),
        "another node's address is not a pod"
    );
}

#[test]
fn semantics_18_metadata_name_label_selects_namespaces() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.pod("unlisted/z", N2, &["10.0.2.9"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("unlisted/z", "a/x", 80, TCP));
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["b"]}]}}]}]}));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    assert!(
        w.can("unlisted/z", "a/x", 80, TCP),
        "a namespace never seen still has its name label"
    );
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["unlisted"]}]}}]}]}));
    assert!(w.can("unlisted/z", "a/x", 80, TCP));
}

#[test]
fn semantics_19_notin_peer_matches_pods_without_the_label() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("a/nolabel", N2, &["10.0.2.1"], &[]);
    w.pod("a/bad", N2, &["10.0.2.2"], &[("tier", "bad")]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["bad"]}]}}]}]}));
    assert!(w.can("a/nolabel", "a/x", 80, TCP));
    assert!(!w.can("a/bad", "a/x", 80, TCP));
}

/// A rule gets a peer set per family only while some peer pod has an address of that family (an
/// empty set matched nothing, and every set costs the kernel's commit a walk of the table's sets):
/// single-stack peers give no IPv6 set, the last peer leaving removes the set and its rule, the
/// first coming back (or the first IPv6 address) brings them back, and the verdicts follow.
#[test]
fn a_rule_has_a_peer_set_per_family_only_while_a_peer_has_an_address_of_it() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1", "fd00::1:1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[("role", "client")]);
    w.ns("b", &[("team", "b")]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}));
    let peer_sets = |w: &W| -> Vec<String> {
        compiled(w)
            .ruleset
            .sets
            .keys()
            .filter(|n| n.starts_with(crate::ruleset::names::PEER_SET_PREFIX))
            .cloned()
            .collect()
    };
    let sets = peer_sets(&w);
    assert_eq!(
        sets.len(),
        1,
        "one IPv4 peer set, no empty IPv6 one: {sets:?}"
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    assert!(peer_sets(&w).is_empty(), "the last peer left: no set");
    assert!(!w.can("b/y", "a/x", 80, TCP));
    w.pod("b/y", N2, &["10.0.2.1", "fd00::2:1"], &[("role", "client")]);
    assert_eq!(peer_sets(&w).len(), 2, "a dual-stack peer: both families");
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can_fam("b/y", "a/x", 80, TCP, true));
}

#[test]
fn semantics_20_label_changes_reevaluate_targets_peers_and_namespaces_by_elements_only() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("role", "db")]);
    w.pod("a/x2", N1, &["10.0.1.2"], &[]);
    w.pod("a/x3", N1, &["10.0.1.3"], &[]); // keeps the group of pods selected by q alone alive
    w.pod("b/y", N2, &["10.0.2.1"], &[("role", "client")]);
    // a second peer keeps the peer sets from going empty (an empty one goes, with its rule)
    w.pod("b/y2", N2, &["10.0.2.2"], &[("role", "client")]);
    w.policy("a/p", json!({"podSelector": {"matchLabels": {"role": "db"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}));
    w.policy("a/q", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    let before = compiled(&w).ruleset;
    // peer label removed: revoked, with only set elements changing
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    assert!(!w.can("b/y", "a/x", 80, TCP));
    let after = compiled(&w).ruleset;
    assert_eq!(
        before.chains, after.chains,
        "a peer label change touches no chain"
    );
    // namespace label removed: revoked
    w.pod("b/y", N2, &["10.0.2.1"], &[("role", "client")]);
    w.ns("b", &[]);
    assert!(!w.can("b/y", "a/x", 80, TCP));
    w.ns("b", &[("team", "b")]);
    assert!(w.can("b/y", "a/x", 80, TCP));
    // target label change: a/x2 joins an existing group (same policies as a/x): only elements
    let before = compiled(&w).ruleset;
    w.pod("a/x2", N1, &["10.0.1.2"], &[("role", "db")]);
    let after = compiled(&w).ruleset;
    assert_eq!(before.chains, after.chains);
    assert_ne!(before.sets[MAP_INGRESS_V4], after.sets[MAP_INGRESS_V4]);
    // target label removed: a/x leaves policy p, still isolated by q
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    assert_eq!(compiled(&w).pods["a/x"].ingress, vec!["a/q".to_string()]);
}

#[test]
fn semantics_21_new_pods_are_covered_and_deleted_pod_ips_leave_every_set() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}]}));
    w.pod("a/c", N2, &["10.0.2.1"], &[("app", "c")]);
    assert!(
        w.can("a/c", "a/x", 80, TCP),
        "a pod created after the policy is covered"
    );
    w.st.apply(Change::DeletePod {
        namespace: "a".into(),
        name: "c".into(),
    });
    let rs = compiled(&w).ruleset;
    for s in rs.sets.values() {
        assert!(
            !s.elements
                .iter()
                .any(|e| matches!(e, Elem::Addr(a) if *a == ip("10.0.2.1"))),
            "{} still holds the old IP",
            s.name
        );
    }
    // IP reuse by a pod with other labels inherits nothing
    w.pod("a/other", N2, &["10.0.2.1"], &[("app", "other")]);
    assert!(!w.can("a/other", "a/x", 80, TCP));
}

// ---------------------------------------------------------------- ipBlock

#[test]
fn semantics_22_ipblock_matches_pod_ips_too() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.2.0/24"}}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn semantics_23_except_carves_out_of_the_cidr() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "172.16.0.0/16", "except": ["172.16.1.0/24"]}}]}]}));
    assert!(w.can("172.16.0.5", "a/x", 80, TCP));
    assert!(!w.can("172.16.1.5", "a/x", 80, TCP));
    assert!(w.can("172.16.2.0", "a/x", 80, TCP));
    let c = compiled(&w);
    let set = c
        .ruleset
        .sets
        .values()
        .find(|s| s.name.starts_with(CIDR_SET_PREFIX))
        .unwrap();
    assert!(set.interval);
    assert_eq!(set.elements.len(), 2);
}

#[test]
fn semantics_24_ip_excepted_by_one_peer_is_allowed_by_another() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[("app", "y")]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.2.0/24"]}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "y"}}}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP), "deny by IP + allow by pod");
    assert!(!w.can("10.0.2.77", "a/x", 80, TCP));
}

#[test]
fn semantics_25_address_families_never_cross() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1", "fd00:1::1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1", "fd00:2::1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}),
    );
    assert!(w.can_fam("b/y", "a/x", 80, TCP, false));
    assert!(
        !w.can_fam("b/y", "a/x", 80, TCP, true),
        "0.0.0.0/0 matches no IPv6"
    );
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:2::1/128"}}]}]}),
    );
    assert!(
        w.can_fam("b/y", "a/x", 80, TCP, true),
        "a /128 matches one host"
    );
    assert!(!w.can_fam("b/y", "a/x", 80, TCP, false));
}

#[test]
fn semantics_26_host_bits_in_cidr_mean_the_masked_network() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "172.16.5.77/24"}}]}]}));
    assert!(w.can("172.16.5.1", "a/x", 80, TCP));
    assert!(!w.can("172.16.6.1", "a/x", 80, TCP));
}

#[test]
fn semantics_27_checks_run_in_postrouting_after_dnat_before_snat() {
    let w = W::new();
    let rs = compiled(&w).ruleset;
    let b = rs.chains[CHAIN_POSTROUTING].base.unwrap();
    assert_eq!(
        (b.hook, b.priority),
        (crate::ruleset::Hook::Postrouting, PRIORITY_POSTROUTING)
    );
    assert!(
        b.priority > -100 && b.priority < 100,
        "after dstnat (-100), before srcnat (100)"
    );
    // Egress first, then ingress, in the one base chain; the ingress part is a regular chain.
    let rules = &rs.chains[CHAIN_POSTROUTING].rules;
    assert!(matches!(
        &rules[rules.len() - 3].stmts[0],
        Stmt::VmapLookup { map, .. } if map == MAP_EGRESS_V4
    ));
    assert_eq!(
        rules.last().unwrap().stmts,
        vec![Stmt::Goto(CHAIN_INGRESS.to_string())]
    );
    assert!(rs.chains[CHAIN_INGRESS].base.is_none());
    assert_eq!(
        rs.chains.values().filter(|c| c.base.is_some()).count(),
        2,
        "one base chain per hook"
    );
}

#[test]
fn semantics_7_an_egress_allow_goes_on_to_the_ingress_check() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    w.policy(
        "a/x-out",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]}),
    );
    let rs = compiled(&w).ruleset;
    // Every matching rule goes to the policy's accept chain, which counts and goes on to ingress.
    let accept = accept_chain("a/x-out", Direction::Egress);
    let pol = &rs.chains[&policy_chain("a/x-out", Direction::Egress)].rules;
    assert!(pol
        .iter()
        .all(|r| r.stmts.last() == Some(&Stmt::Goto(accept.clone()))));
    let acc = &rs.chains[&accept].rules;
    assert_eq!(
        acc.last().unwrap().stmts.last(),
        Some(&Stmt::Goto(CHAIN_INGRESS.to_string()))
    );
    assert!(
        acc.iter().all(|r| !r.stmts.contains(&Stmt::Accept)),
        "an egress allow never accepts"
    );
    assert!(
        w.can("a/x", "a/y", 80, TCP),
        "y is not isolated for ingress"
    );
    w.policy(
        "a/y-in",
        json!({"podSelector": {"matchLabels": {"app": "y"}}, "policyTypes": ["Ingress"]}),
    );
    assert!(
        !w.can("a/x", "a/y", 80, TCP),
        "x's egress allows, y's ingress does not"
    );
}

#[test]
fn semantics_28_ipblock_is_source_for_ingress_and_destination_for_egress() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}),
    );
    assert!(w.can("198.51.100.1", "a/x", 80, TCP));
    assert!(!w.can("203.0.113.1", "a/x", 80, TCP));
    assert!(w.can("a/x", "203.0.113.1", 80, TCP));
    assert!(
        !w.can("a/x", "198.51.100.1", 80, TCP),
        "external destinations need an ipBlock once egress-isolated"
    );
}

// ---------------------------------------------------------------- ports and protocols

#[test]
fn semantics_29_no_ports_means_all_ports_and_protocols() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": []}]}),
    );
    for proto in Protocol::ALL {
        assert!(w.can("b/y", "a/x", 5000, proto), "{proto}");
    }
}

#[test]
fn semantics_30_protocol_defaults_to_tcp() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("b/y", "a/x", 80, UDP));
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{}]}]}),
    );
    assert!(
        w.can("b/y", "a/x", 12345, TCP),
        "ports: [{{}}] opens all TCP ports"
    );
    assert!(!w.can("b/y", "a/x", 12345, UDP), "... and only TCP");
}

#[test]
fn semantics_31_protocol_without_port_opens_every_port_of_it() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
    );
    assert!(w.can("b/y", "a/x", 1, UDP));
    assert!(w.can("b/y", "a/x", 65535, UDP));
    assert!(!w.can("b/y", "a/x", 53, TCP));
}

#[test]
fn semantics_32_ports_match_the_destination_port_for_egress_too() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 5432}]}]}));
    assert!(w.can("a/x", "203.0.113.5", 5432, TCP));
    assert!(!w.can("a/x", "203.0.113.5", 80, TCP));
    let rs = compiled(&w).ruleset;
    let pol = rs
        .chains
        .values()
        .find(|c| c.name.starts_with(POLICY_CHAIN_PREFIX))
        .unwrap();
    assert!(pol.rules.iter().all(|r| r
        .stmts
        .iter()
        .any(|s| matches!(s, Stmt::ProtoPortInSet { .. } | Stmt::Dport(5432)))));
}

#[test]
fn semantics_33_udp_or_sctp_rules_never_open_tcp_and_sctp_still_isolates() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, SCTP));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("b/y", "a/x", 80, UDP));
    assert!(compiled(&w).pods["a/x"].isolated(Direction::Ingress));
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP", "port": 80}]}]}),
    );
    assert!(!w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn semantics_34_named_ports_resolve_per_destination_pod() {
    let mut w = W::new();
    w.pod("a/x1", N1, &["10.0.1.1"], &[("app", "srv")]);
    w.pod("a/x2", N1, &["10.0.1.2"], &[("app", "srv")]);
    w.ports("a/x1", &[("web", 8080, TCP)]);
    w.ports("a/x2", &[("web", 9090, TCP)]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/in", json!({"podSelector": {"matchLabels": {"app": "srv"}}, "ingress": [{"ports": [{"port": "web"}]}]}));
    assert!(w.can("b/y", "a/x1", 8080, TCP));
    assert!(!w.can("b/y", "a/x1", 9090, TCP));
    assert!(w.can("b/y", "a/x2", 9090, TCP));
    assert!(!w.can("b/y", "a/x2", 8080, TCP));
    // egress: the peer pod's ports
    w.pod("a/c", N1, &["10.0.1.3"], &[("app", "client")]);
    w.pod("b/s1", N2, &["10.0.2.5"], &[("app", "s")]);
    w.pod("b/s2", N2, &["10.0.2.6"], &[("app", "s")]);
    w.ports("b/s1", &[("api", 7001, TCP)]);
    w.ports("b/s2", &[("api", 7002, TCP)]);
    w.policy("a/out", json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "s"}}}], "ports": [{"port": "api"}]}]}));
    assert!(w.can("a/c", "b/s1", 7001, TCP));
    assert!(!w.can("a/c", "b/s1", 7002, TCP));
    assert!(w.can("a/c", "b/s2", 7002, TCP));
}

#[test]
fn semantics_35_named_port_with_other_protocol_or_unknown_name_matches_nothing() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.ports("a/x", &[("dns", 53, UDP)]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "dns"}, {"port": "nosuch", "protocol": "UDP"}]}]}));
    assert!(
        !w.can("b/y", "a/x", 53, TCP),
        "rule protocol TCP, port declared UDP"
    );
    assert!(!w.can("b/y", "a/x", 53, UDP));
    assert!(compiled(&w).pods["a/x"].isolated(Direction::Ingress));
    // named ports never match non-pod destinations
    w.policy("a/e", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]}));
    assert!(!w.can("a/x", "203.0.113.53", 53, UDP));
}

#[test]
fn semantics_36_end_port_range_is_inclusive() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 53, "endPort": 80}]}]}),
    );
    assert!(w.can("b/y", "a/x", 53, TCP));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("b/y", "a/x", 81, TCP));
    assert!(!w.can("b/y", "a/x", 52, TCP));
    assert!(!w.can("b/y", "a/x", 60, UDP));
    w.policy(
        "a/p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 53, "endPort": 84}]}]}),
    );
    assert!(w.can("b/y", "a/x", 81, TCP));
}

#[test]
fn semantics_37_ports_of_one_rule_are_ored() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.ports("a/x", &[("metrics", 9100, TCP)]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}, {"port": "metrics"}]}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can("b/y", "a/x", 53, UDP));
    assert!(w.can("b/y", "a/x", 9100, TCP));
    assert!(!w.can("b/y", "a/x", 53, TCP));
}

// ---------------------------------------------------------------- special traffic

#[test]
fn semantics_38_a_pod_can_always_reach_itself() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy(
        "a/p",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    // `can` checks explain and the ruleset (hairpin through a Service: saddr == daddr).
    assert!(w.can("a/x", "a/x", 80, TCP));
    let c = compiled(&w);
    assert!(c.ruleset.sets[SELF_SET_V4]
        .elements
        .contains(&Elem::addr_pair(ip("10.0.1.1"), ip("10.0.1.1"))));
}

#[test]
fn semantics_39_the_pods_own_node_can_always_reach_it() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.policy("a/p", json!({"podSelector": {}}));
    assert!(w.can(N1_IP, "a/x", 10250, TCP), "kubelet probe");
    assert!(
        !w.can(N2_IP, "a/x", 10250, TCP),
        "another node is just an external address"
    );
}

#[test]
fn semantics_40_host_network_pods_are_not_enforced_and_never_peers() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("a/hn", N2, &[N2_IP], &[("app", "hn")]);
    std::sync::Arc::make_mut(w.st.pods.get_mut("a/hn").unwrap()).host_network = true;
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "hn"}}}]}]}));
    w.policy(
        "a/deny-hn",
        json!({"podSelector": {"matchLabels": {"app": "hn"}}, "policyTypes": ["Egress"]}),
    );
    assert!(
        !w.can(N2_IP, "a/x", 80, TCP),
        "a hostNetwork pod is not a selectable peer"
    );
    let c2 = compile(&w.st, N2);
    assert!(
        !c2.pods.contains_key("a/hn"),
        "hostNetwork pods are not enforced"
    );
    assert!(c2.ruleset.sets[MAP_EGRESS_V4].elements.is_empty());
}

#[test]
fn semantics_41_same_node_and_cross_node_pairs_behave_identically() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/near", N1, &["10.0.1.2"], &[("app", "c")]);
    w.pod("b/far", N2, &["10.0.2.2"], &[("app", "c")]);
    w.pod("b/near-bad", N1, &["10.0.1.3"], &[]);
    w.pod("b/far-bad", N2, &["10.0.2.3"], &[]);
    w.policy("a/p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "c"}}}]}]}));
    w.policy("b/e", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}], "ports": [{"port": 80}]}]}));
    for (src, ok) in [
        ("b/near", true),
        ("b/far", true),
        ("b/near-bad", false),
        ("b/far-bad", false),
    ] {
        assert_eq!(w.can(src, "a/x", 80, TCP), ok, "{src}");
        assert!(!w.can(src, "a/x", 81, TCP), "{src}");
    }
}

#[test]
fn semantics_42_an_invalid_policy_never_disturbs_others() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[]);
    w.pod("b/y", N2, &["10.0.2.1"], &[]);
    w.policy(
        "a/good",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let bad = serde_json::from_value(json!({"metadata": {"namespace": "a", "name": "bad"}, "spec": {"podSelector": {}, "ingress": [{"from": [{}]}]}})).unwrap();
    assert!(
        policy_from_k8s(&bad).is_err(),
        "rejected at conversion; the agent skips it"
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
}

/// The change deleting the policy `ns/name`.
fn delete_policy(key: &str) -> Change {
    let (ns, name) = key.split_once('/').unwrap();
    Change::DeletePolicy {
        namespace: ns.into(),
        name: name.into(),
    }
}
