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

// ---------------------------------------------------------------- node contract and shape

fn attachment(key: &str, ips: &[&str], pending: bool) -> Attachment {
    let (ns, name) = key.split_once('/').unwrap();
    Attachment {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        netns: String::new(),
        host_veth: palisade_contract::host_veth_name(&format!("c-{name}"), "eth0"),
        ips: ips.iter().map(|s| ip(s)).collect(),
        pod_namespace: Some(ns.into()),
        pod_name: Some(name.into()),
        pod_uid: None,
        pending,
    }
}

#[test]
fn a_pending_pod_is_reached_only_by_its_own_node_and_reaches_nothing() {
    let mut w = W::new();
    w.pod("a/y", N1, &["10.0.1.2"], &[]);
    w.st.apply(Change::SetAttachments(vec![attachment(
        "a/x",
        &["10.0.1.1"],
        true,
    )]));
    let rs = compiled(&w).ruleset;
    let packet = |saddr: &str, daddr: &str, from_this_node: bool| Packet {
        saddr: ip(saddr),
        daddr: ip(daddr),
        proto: Some(TCP),
        dport: 8080,
        from_this_node,
    };
    assert!(
        rs.eval_forward(&packet(N1_IP, "10.0.1.1", true)),
        "kubelet probe to a pending pod"
    );
    assert!(!rs.eval_forward(&packet("10.0.1.2", "10.0.1.1", false)));
    assert!(!rs.eval_forward(&packet(N2_IP, "10.0.1.1", false)));
    assert!(!rs.eval_forward(&packet("10.0.1.1", "10.0.1.2", false)));
    assert!(!rs.eval_to_host(&packet("10.0.1.1", N1_IP, false)));
}

#[test]
fn attachment_ips_count_for_local_pods_before_the_api_knows_them_and_pending_clears() {
    let mut w = W::new();
    w.policy("a/p", json!({"podSelector": {}}));
    w.st.apply(Change::SetAttachments(vec![attachment(
        "a/x",
        &["10.0.1.1", "fd00:1::1"],
        true,
    )]));
    let c = compiled(&w);
    assert_eq!(
        c.pending,
        [ip("10.0.1.1"), ip("fd00:1::1")].into(),
        "pod unknown: pending"
    );
    assert!(c.ruleset.sets[PENDING_SET_V4]
        .elements
        .contains(&Elem::Addr(ip("10.0.1.1"))));
    assert!(c.ruleset.sets[PENDING_SET_V6]
        .elements
        .contains(&Elem::Addr(ip("fd00:1::1"))));
    // The pod object arrives without IPs: attachment IPs are used, pending clears.
    w.pod("a/x", N1, &[], &[]);
    let c = compiled(&w);
    assert!(c.pending.is_empty());
    assert_eq!(c.pods["a/x"].ips, [ip("10.0.1.1"), ip("fd00:1::1")].into());
    let group = group_chain(&["a/p".to_string()], &[], &[], &[], Direction::Ingress);
    assert!(c.ruleset.sets[MAP_INGRESS_V4]
        .elements
        .contains(&Elem::goto_chain(ip("10.0.1.1"), group.clone().into())));
    assert!(c.ruleset.sets[MAP_INGRESS_V6]
        .elements
        .contains(&Elem::goto_chain(ip("fd00:1::1"), group.into())));
}

#[test]
fn source_guard_binds_each_records_addresses_to_its_own_veth_only() {
    let mut w = W::new();
    let x = attachment("a/x", &["10.0.1.1", "fd00:1::1"], false);
    let y = attachment("a/y", &["10.0.1.2"], true);
    let vx = x.host_veth.clone();
    let vy = y.host_veth.clone();
    w.st.apply(Change::SetAttachments(vec![x, y]));
    let c = compiled(&w);
    assert_eq!(
        c.ruleset.sets[SOURCE_SET_V4].elements,
        [
            Elem::iface_addr(vx.clone().into(), ip("10.0.1.1")),
            Elem::iface_addr(vy.into(), ip("10.0.1.2")),
        ]
        .into(),
        "a pending pod's binding is there before its pod is known: pending drops it anyway"
    );
    assert_eq!(
        c.ruleset.sets[SOURCE_SET_V6].elements,
        [Elem::iface_addr(vx.into(), ip("fd00:1::1"))].into()
    );
    assert_eq!(c.ruleset.sets[SOURCE_SET_V4].key, SetKey::IfnameIpv4);
}

#[test]
fn link_local_sources_of_an_egress_isolated_pod_take_its_egress_verdict() {
    // A node service on `::` answers at the veth's fe80::1; the pod's link-local source is in no
    // address map, so the veth's name leads to the pod's egress group.
    let mut w = W::new();
    let x = attachment("a/x", &["10.0.1.1", "fd00:1::1"], false);
    let y = attachment("a/y", &["10.0.1.2"], false);
    let vx = x.host_veth.clone();
    w.st.apply(Change::SetAttachments(vec![x, y]));
    w.pod("a/x", N1, &["10.0.1.1", "fd00:1::1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    w.policy(
        "a/x-no-egress",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Egress"]}),
    );
    w.policy(
        "a/y-no-ingress",
        json!({"podSelector": {"matchLabels": {"app": "y"}}, "policyTypes": ["Ingress"]}),
    );
    let c = compiled(&w);
    let group = group_chain(
        &["a/x-no-egress".to_string()],
        &[],
        &[],
        &[],
        Direction::Egress,
    );
    assert_eq!(
        c.ruleset.sets[MAP_EGRESS_LINKS].elements,
        [Elem::iface_goto(vx.into(), group.into())].into(),
        "x's veth (once for both its addresses); not y's: y's egress is not isolated"
    );
    assert!(c.ruleset.sets[MAP_EGRESS_LINKS].verdict_map);
    assert_eq!(c.ruleset.sets[MAP_EGRESS_LINKS].key, SetKey::Ifname);
    // The policy goes: the element goes with it.
    w.st.apply(delete_policy("a/x-no-egress"));
    assert!(compiled(&w).ruleset.sets[MAP_EGRESS_LINKS]
        .elements
        .is_empty());
}

#[test]
fn source_guard_refuses_a_record_whose_veth_is_not_the_derived_name() {
    let mut w = W::new();
    let mut a = attachment("a/x", &["10.0.1.1"], false);
    a.host_veth = "eth0".into();
    w.st.apply(Change::SetAttachments(vec![a]));
    let c = compiled(&w);
    assert!(c.ruleset.sets[SOURCE_SET_V4].elements.is_empty());
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("c-x_eth0") && w.contains("\"eth0\"")),
        "the warning names the record and the veth: {:?}",
        c.warnings
    );
}

#[test]
fn source_guard_opens_every_base_chain_before_the_established_accept() {
    let rs = compiled(&W::new()).ruleset;
    let guard = super::build::source_guard_rules();
    for name in [CHAIN_POSTROUTING, CHAIN_EGRESS_HOST] {
        let rules = &rs.chains[name].rules;
        assert_eq!(
            rules[..2],
            guard[..],
            "{name}: a forged packet neither opens nor rides a connection"
        );
        assert_eq!(rules[2].stmts, vec![Stmt::CtEstablished, Stmt::Accept]);
    }
    assert_eq!(
        guard[0].stmts,
        vec![
            Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.into()),
            Stmt::IifSaddrNotInSet {
                family: Family::V4,
                set: SOURCE_SET_V4.into()
            },
            Stmt::CounterNamed(CNT_FORGED_SOURCE.into()),
            Stmt::Drop
        ]
    );
    assert_eq!(guard[1].stmts[1], Stmt::Ip6SaddrNotLinkLocal);
    // Rendering: the wildcard and the concatenation are what nft expects.
    let json = rs.to_json().to_string();
    assert!(json.contains(r#""right":"pal*""#), "{json}");
    assert!(json.contains(r#""type":["ifname","ipv4_addr"]"#), "{json}");
}

#[test]
fn a_related_packet_from_a_pod_passes_only_about_that_pods_own_connections() {
    let rs = compiled(&W::new()).ruleset;
    let rules = &rs.chains[CHAIN_RELATED].rules;
    let mut endpoint_checks = Vec::new();
    for fam in [Family::V4, Family::V6] {
        for dir in [
            crate::ruleset::CtDir::Original,
            crate::ruleset::CtDir::Reply,
        ] {
            endpoint_checks.push(vec![
                Stmt::IifCtSaddrInSet {
                    family: fam,
                    dir,
                    set: source_set(fam).into(),
                },
                Stmt::Accept,
            ]);
        }
    }
    let got: Vec<_> = rules.iter().map(|r| r.stmts.clone()).collect();
    assert_eq!(
        got[..4],
        endpoint_checks[..],
        "an endpoint (either direction) passes"
    );
    assert_eq!(
        got[4],
        vec![
            Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.into()),
            Stmt::CounterNamed(CNT_FORGED_RELATED.into()),
            Stmt::Drop
        ],
        "any other pod's is dropped, counted"
    );
    assert!(rs.counters.contains(CNT_FORGED_RELATED));
    assert_eq!(got[5], vec![Stmt::Accept], "a router's or a node's passes");
    assert_eq!(got.len(), 6);
    let json = rs.to_json().to_string();
    assert!(
        json.contains(r#"{"ct":{"dir":"reply","key":"ip6 saddr"}}"#),
        "{json}"
    );
}

#[test]
fn router_messages_from_a_pods_veth_are_counted_and_dropped() {
    let rs = compiled(&W::new()).ruleset;
    let nb = &rs.chains[CHAIN_NEIGHBOUR].rules;
    for (i, t) in [134u8, 137].into_iter().enumerate() {
        assert_eq!(
            nb[i].stmts,
            vec![
                Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.to_string()),
                Stmt::Icmpv6Type(t),
                Stmt::CounterNamed(CNT_FORGED_ROUTER.into()),
                Stmt::Drop
            ],
            "ICMPv6 type {t} from a pod"
        );
    }
    assert_eq!(
        nb[2].stmts,
        vec![Stmt::Accept],
        "solicitations and answers pass, and a router's messages on the uplink"
    );
    assert!(rs.counters.contains(CNT_FORGED_ROUTER));
    assert!(names::FORGED_KINDS.contains(&(CNT_FORGED_ROUTER, "router")));
}

/// The outer packets this node sends (their source port follows the inner flow: two new outer
/// flows per connection) are accepted right after the ct rules, where the walk would end in the
/// same accept; a pod's datagram to a node's overlay port still meets the pod's egress policy.
#[test]
fn the_overlay_packets_this_node_sends_get_their_verdict_after_the_ct_rules() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.244.1.2"], &[("app", "x")]);
    w.policy(
        "a/deny",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let jump_out = |rs: &Ruleset| -> Vec<usize> {
        rs.chains[CHAIN_POSTROUTING]
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.stmts.contains(&Stmt::Jump(CHAIN_TUNNEL_OUT.to_string())))
            .map(|(i, _)| i)
            .collect()
    };
    let rs = compiled(&w).ruleset;
    assert!(
        jump_out(&rs).is_empty() && !rs.chains.contains_key(CHAIN_TUNNEL_OUT),
        "no overlay, no rule"
    );
    w.st.apply(Change::SetTunnel(Some(Tunnel {
        port: 4796,
        peers: vec![
            ip("172.31.0.1"),
            ip("172.31.1.2"),
            ip("fd00:172:31::1"),
            ip("fd00:172:31::2"),
        ],
        local: vec![ip("172.31.0.1"), ip("fd00:172:31::1")],
        carries_routes: true,
    })));
    let rs = compiled(&w).ruleset;
    let post = &rs.chains[CHAIN_POSTROUTING].rules;
    let invalid = post
        .iter()
        .position(|r| r.stmts == [Stmt::CtInvalid, Stmt::Drop])
        .unwrap();
    assert_eq!(
        jump_out(&rs),
        vec![invalid + 1],
        "new outer flows only, before the walk"
    );
    assert_eq!(
        rs.chains[CHAIN_TUNNEL_OUT]
            .rules
            .iter()
            .filter(|r| r.stmts.last() == Some(&Stmt::Accept))
            .count(),
        2,
        "one accept per family"
    );
    let udp = |saddr: &str, daddr: &str, from_this_node: bool| Packet {
        saddr: ip(saddr),
        daddr: ip(daddr),
        proto: Some(Protocol::Udp),
        dport: 4796,
        from_this_node,
    };
    assert!(
        rs.eval_forward(&udp("172.31.0.1", "172.31.1.2", true)),
        "our outer packet"
    );
    assert!(
        rs.eval_forward(&udp("fd00:172:31::1", "fd00:172:31::2", true)),
        "over IPv6"
    );
    assert!(
        !rs.eval_forward(&udp("10.244.1.2", "172.31.1.2", false)),
        "an egress-isolated pod's datagram to a node's overlay port meets its policy"
    );
}

/// The outer packets between nodes are not tracked (their hashed source ports leave unreplied
/// entries behind): before conntrack, on prerouting (a node to our InternalIP) and output (ours to
/// a node), and only those: a packet to the port from anyone else stays tracked for the guard.
#[test]
fn only_the_overlay_packets_between_nodes_go_untracked() {
    use crate::ruleset::{BaseHook, ChainKind, Hook};
    let rs = compiled(&W::new()).ruleset;
    assert!(
        !rs.chains.contains_key(CHAIN_UNTRACK_IN) && !rs.chains.contains_key(CHAIN_UNTRACK_OUT),
        "no overlay, nothing untracked"
    );
    let mut w = W::new();
    let mut tunnel = Tunnel {
        port: 4796,
        peers: vec![ip("172.31.0.1"), ip("172.31.1.2")],
        local: vec![ip("172.31.0.1")],
        carries_routes: false,
    };
    w.st.apply(Change::SetTunnel(Some(tunnel.clone())));
    let rs = compiled(&w).ruleset;
    assert!(
        !rs.chains.contains_key(CHAIN_UNTRACK_IN) && !rs.chains.contains_key(CHAIN_UNTRACK_OUT),
        "every node reached directly: no outer packet to untrack, no hook to enter for it"
    );
    assert!(
        rs.chains.contains_key(CHAIN_TUNNEL),
        "the device listens all the same: its port keeps its guard"
    );
    tunnel.carries_routes = true;
    w.st.apply(Change::SetTunnel(Some(tunnel)));
    let rs = compiled(&w).ruleset;
    for (chain, hook, from, to) in [
        (
            CHAIN_UNTRACK_IN,
            Hook::Prerouting,
            TUNNEL_PEERS_V4,
            TUNNEL_LOCAL_V4,
        ),
        (
            CHAIN_UNTRACK_OUT,
            Hook::Output,
            TUNNEL_LOCAL_V4,
            TUNNEL_PEERS_V4,
        ),
    ] {
        let c = &rs.chains[chain];
        assert_eq!(
            c.base,
            Some(BaseHook {
                kind: ChainKind::Filter,
                hook,
                priority: PRIORITY_UNTRACK
            })
        );
        assert_eq!(c.rules.len(), 2, "one rule per family");
        assert_eq!(
            c.rules[0].stmts,
            vec![
                Stmt::L4Proto(Protocol::Udp),
                Stmt::Dport(4796),
                Stmt::AddrInSet {
                    family: Family::V4,
                    field: AddrField::Saddr,
                    set: from.into()
                },
                Stmt::AddrInSet {
                    family: Family::V4,
                    field: AddrField::Daddr,
                    set: to.into()
                },
                Stmt::Notrack,
            ],
            "{chain}"
        );
    }
    let untracking: Vec<&str> = rs
        .chains
        .values()
        .filter(|c| c.rules.iter().any(|r| r.stmts.contains(&Stmt::Notrack)))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(untracking.len(), 2, "notrack nowhere else: {untracking:?}");
}

#[test]
fn only_a_node_may_send_to_the_overlay_port() {
    let rs = compiled(&W::new()).ruleset;
    assert!(
        !rs.chains.contains_key(CHAIN_TUNNEL) && !rs.sets.contains_key(TUNNEL_PEERS_V4),
        "no overlay, no rule"
    );
    let mut w = W::new();
    w.st.apply(Change::SetTunnel(Some(Tunnel {
        port: 4796,
        peers: vec![ip("172.31.0.1"), ip("172.31.1.2"), ip("fd00:172:31::1")],
        local: vec![ip("172.31.0.1"), ip("fd00:172:31::1")],
        carries_routes: true,
    })));
    let rs = compiled(&w).ruleset;
    let vxlan = |saddr: &str, daddr: &str, dport: u16| Packet {
        saddr: ip(saddr),
        daddr: ip(daddr),
        proto: Some(Protocol::Udp),
        dport,
        from_this_node: false,
    };
    for (saddr, daddr, passes, what) in [
        ("172.31.1.2", "172.31.0.1", true, "another node"),
        ("fd00:172:31::1", "fd00:172:31::1", true, "a node over IPv6"),
        (
            "10.244.1.2",
            "172.31.0.1",
            false,
            "a pod (forged inner packets)",
        ),
        ("192.168.77.2", "172.31.0.1", false, "an outside host"),
        (
            "172.31.1.2",
            "172.31.9.1",
            false,
            "a node to an address of ours not an InternalIP (a pod's datagram masqueraded there)",
        ),
        (
            "fd00:10:244:1::2",
            "fd00:172:31::1",
            false,
            "a pod over IPv6",
        ),
    ] {
        assert_eq!(
            rs.eval_to_host(&vxlan(saddr, daddr, 4796)),
            passes,
            "{what} ({saddr}) sending to the overlay port"
        );
    }
    assert!(
        rs.eval_to_host(&vxlan("10.244.1.2", "172.31.0.1", 4797)),
        "another port is not the tunnel's business"
    );
    let input = &rs.chains[CHAIN_EGRESS_HOST].rules;
    let at = input
        .iter()
        .position(|r| r.stmts.contains(&Stmt::Jump(CHAIN_TUNNEL.to_string())))
        .expect("the input chain jumps to the tunnel chain");
    let invalid = input
        .iter()
        .position(|r| r.stmts == [Stmt::CtInvalid, Stmt::Drop])
        .unwrap();
    assert!(
        at > invalid,
        "only new packets meet it: established ones pay nothing"
    );
    assert!(
        !rs.chains[CHAIN_POSTROUTING]
            .rules
            .iter()
            .any(|r| r.stmts.contains(&Stmt::Jump(CHAIN_TUNNEL.to_string()))),
        "the outer packets we send are not checked"
    );
    assert_eq!(
        rs.chains[CHAIN_TUNNEL].rules.last().unwrap().stmts,
        vec![Stmt::CounterNamed(CNT_FORGED_OVERLAY.into()), Stmt::Drop]
    );
    assert!(rs.counters.contains(CNT_FORGED_OVERLAY));
    assert_eq!(
        rs.sets[TUNNEL_PEERS_V4].elements,
        [Elem::Addr(ip("172.31.0.1")), Elem::Addr(ip("172.31.1.2"))].into()
    );
    assert_eq!(
        rs.sets[TUNNEL_PEERS_V6].elements,
        [Elem::Addr(ip("fd00:172:31::1"))].into()
    );
    assert_eq!(
        rs.sets[TUNNEL_LOCAL_V4].elements,
        [Elem::Addr(ip("172.31.0.1"))].into()
    );
}

#[test]
fn egress_nat_is_absent_until_the_agent_sets_it() {
    let rs = compiled(&W::new()).ruleset;
    assert!(!rs.chains.contains_key(CHAIN_EGRESS_NAT));
    assert!(!rs.sets.contains_key(NAT_SOURCES_V4));
}

#[test]
fn egress_nat_masquerades_pod_sources_to_destinations_outside_the_exempt_ranges() {
    let mut w = W::new();
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    w.st.apply(Change::SetEgressNat(Some(EgressNat {
        sources: vec![net("10.244.0.0/16"), net("fd00:10:244::/48")],
        exempt: vec![
            net("10.244.0.0/16"),
            net("172.31.0.1/32"),
            net("172.31.0.2/32"),
            net("fd00:10:244::/48"),
        ],
    })));
    let rs = compiled(&w).ruleset;
    let chain = &rs.chains[CHAIN_EGRESS_NAT];
    let base = chain.base.unwrap();
    assert_eq!(base.kind, crate::ruleset::ChainKind::Nat);
    assert_eq!(base.hook, crate::ruleset::Hook::Postrouting);
    assert!(
        base.priority > PRIORITY_POSTROUTING,
        "after the policy checks, so they see the pod's own address"
    );
    assert_eq!(
        rs.sets[NAT_SOURCES_V4].elements,
        [Elem::range(ip("10.244.0.0"), ip("10.244.255.255"))].into()
    );
    assert_eq!(
        rs.sets[NAT_EXEMPT_V4].elements,
        [
            Elem::range(ip("10.244.0.0"), ip("10.244.255.255")),
            Elem::range(ip("172.31.0.1"), ip("172.31.0.2")),
        ]
        .into(),
        "adjacent node addresses merge into one interval"
    );
    assert!(rs.sets[NAT_EXEMPT_V6].interval);
    assert_eq!(
        chain.rules[0].stmts,
        vec![
            Stmt::AddrInSet {
                family: Family::V4,
                field: AddrField::Saddr,
                set: NAT_SOURCES_V4.into()
            },
            Stmt::AddrNotInSet {
                family: Family::V4,
                field: AddrField::Daddr,
                set: NAT_EXEMPT_V4.into()
            },
            Stmt::Masquerade,
        ]
    );
    let json = rs.to_json().to_string();
    assert!(
        json.contains(
            r#""name":"egress_nat","policy":"accept","prio":100,"table":"palisade","type":"nat""#
        ),
        "{json}"
    );
    // Turned off again: everything of it goes.
    w.st.apply(Change::SetEgressNat(None));
    assert!(!compiled(&w).ruleset.chains.contains_key(CHAIN_EGRESS_NAT));
}

fn flow_log(allowed: bool) -> Option<FlowLog> {
    Some(FlowLog {
        group: 7,
        rate: 50,
        burst: 60,
        allowed,
    })
}

fn gotos_to(rs: &crate::ruleset::Ruleset, target: &str) -> usize {
    rs.chains
        .values()
        .flat_map(|c| &c.rules)
        .filter(|r| r.stmts.last() == Some(&Stmt::Goto(target.to_string())))
        .count()
}

#[test]
fn flow_log_sends_every_policy_drop_through_one_rate_limited_log_and_changes_no_verdict() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("b/y", N1, &["10.0.1.2"], &[]);
    w.policy("a/deny-all", json!({"podSelector": {}}));
    w.cnp("no-b", json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}},
        "egress": [{"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}]}]}));
    let off = compiled(&w).ruleset;
    assert!(!off.chains.contains_key(CHAIN_FLOW_DROP));
    assert_eq!(gotos_to(&off, CHAIN_FLOW_DROP), 0);
    assert!(!w.can("b/y", "a/x", 80, TCP));

    w.st.apply(Change::SetFlowLog(flow_log(false)));
    let on = compiled(&w).ruleset;
    let drop = &on.chains[CHAIN_FLOW_DROP];
    assert_eq!(
        drop.rules[0].stmts,
        vec![
            Stmt::Limit {
                rate: 50,
                burst: 60
            },
            Stmt::Log {
                group: 7,
                prefix: FLOW_PREFIX_DROP.to_string(),
                snaplen: FLOW_SNAPLEN
            }
        ]
    );
    assert_eq!(drop.rules[1].stmts, vec![Stmt::Drop]);
    // The NetworkPolicy group's drop and the Admin tier's Deny both end there; no plain drop is
    // left in a group or tier chain (the related and pending chains', like the source guard's, are
    // no policy's).
    assert_eq!(gotos_to(&on, CHAIN_FLOW_DROP), 2);
    assert!(on
        .chains
        .values()
        .filter(|c| {
            c.base.is_none()
                && ![
                    CHAIN_FLOW_DROP,
                    CHAIN_RELATED,
                    CHAIN_PENDING_DST,
                    CHAIN_NEIGHBOUR,
                ]
                .contains(&c.name.as_str())
        })
        .flat_map(|c| &c.rules)
        .all(|r| r.stmts.last() != Some(&Stmt::Drop)));
    assert!(!on.chains.contains_key(CHAIN_FLOW_ALLOW));
    // Verdicts are the same (the model and the ruleset agree through `can`).
    assert!(!w.can("b/y", "a/x", 80, TCP));

    w.st.apply(Change::SetFlowLog(flow_log(true)));
    let all = compiled(&w).ruleset;
    for (name, prio) in [
        (CHAIN_FLOW_ALLOW, PRIORITY_FLOW_ALLOW),
        (CHAIN_FLOW_ALLOW_HOST, PRIORITY_FLOW_ALLOW_HOST),
    ] {
        let c = &all.chains[name];
        assert_eq!(c.base.unwrap().priority, prio);
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.rules[0].stmts[0], Stmt::CtNew);
        assert!(
            !c.rules[0]
                .stmts
                .iter()
                .any(|s| matches!(s, Stmt::Accept | Stmt::Drop)),
            "logging admitted connections decides nothing"
        );
    }
}

#[test]
fn turning_the_flow_log_on_makes_the_incremental_compiler_compile_in_full() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.policy("a/deny-all", json!({"podSelector": {}}));
    let mut inc = crate::IncrementalCompiler::new(w.st.clone(), N1);
    assert!(inc.stage(Change::SetFlowLog(flow_log(false))));
    assert!(inc.is_stale());
    inc.recompile();
    w.st.apply(Change::SetFlowLog(flow_log(false)));
    assert_eq!(inc.ruleset(), &compiled(&w).ruleset);
    assert!(
        !inc.stage(Change::SetFlowLog(flow_log(false))),
        "the same setting is no change"
    );
}

#[test]
fn a_policy_in_audit_mode_enforces_nothing_and_counts_what_it_would_drop_where_no_policy_isolates()
{
    use crate::compile::counters::Counted;
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    w.pod("b/z", N2, &["10.0.2.1"], &[]);
    w.audit_policy("a/deny-all", json!({"podSelector": {}}));
    // Nothing is isolated: everything still flows (model and ruleset agree through `can`).
    assert!(w.can("b/z", "a/x", 80, TCP));
    assert!(w.can("a/y", "a/x", 80, TCP));
    let c = compiled(&w);
    assert!(!c.pods["a/x"].isolated(Direction::Ingress));
    assert_eq!(c.pods["a/x"].audited(Direction::Ingress), ["a/deny-all"]);
    let audit = names::audit_chain(&["a/deny-all".to_string()], Direction::Ingress);
    let chain = &c.ruleset.chains[&audit];
    // deny-all has no rules: every packet reaching the chain would be dropped, and is counted.
    assert_eq!(
        chain.rules.last().unwrap().stmts,
        vec![Stmt::CounterNamed(names::group_counter(&audit))]
    );
    let group = &c.ruleset.chains[&c.pods["a/x"].group_chain(Direction::Ingress)];
    assert!(group
        .rules
        .iter()
        .any(|r| r.stmts == vec![Stmt::Jump(audit.clone())]));
    assert!(
        !c.ruleset
            .chains
            .contains_key(&policy_chain("a/deny-all", Direction::Ingress)),
        "an audited policy has no chain of its own"
    );
    let would: Vec<_> = c
        .policy_counters()
        .into_iter()
        .filter(|p| p.verdict == Counted::WouldDrop)
        .collect();
    assert_eq!(would.len(), 1);
    assert_eq!(would[0].policies, ["a/deny-all"]);
    // Explain says what it would do, beside what is enforced.
    let x = explain(
        &w.st,
        &c,
        &"b/z".parse::<Endpoint>().unwrap(),
        &"a/x".parse::<Endpoint>().unwrap(),
        80,
        TCP,
    )
    .unwrap();
    assert!(x.allowed);
    let text = x.to_string();
    assert!(
        text.contains("in audit mode a/deny-all would DENY it (not enforced)"),
        "{text}"
    );

    // Where an enforced policy isolates the pod, an audited one could only allow more: no audit.
    w.policy(
        "a/only-y",
        json!({"podSelector": {"matchLabels": {"app": "x"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]}),
    );
    assert!(!w.can("b/z", "a/x", 80, TCP));
    assert!(w.can("a/y", "a/x", 80, TCP));
    let c = compiled(&w);
    assert!(c.pods["a/x"].audited(Direction::Ingress).is_empty());
    assert!(!c.pods["a/y"].audited(Direction::Ingress).is_empty());

    // With the flow log on, what it would drop goes to the audit log's chain of its direction.
    w.st.apply(Change::SetFlowLog(flow_log(false)));
    let c = compiled(&w);
    let audit = names::audit_chain(&["a/deny-all".to_string()], Direction::Ingress);
    assert_eq!(
        c.ruleset.chains[&audit].rules.last().unwrap().stmts,
        vec![
            Stmt::CounterNamed(names::group_counter(&audit)),
            Stmt::Jump(CHAIN_FLOW_AUDIT_INGRESS.to_string())
        ]
    );
    assert!(w.can("b/z", "a/y", 80, TCP));
}

#[test]
fn base_chains_have_the_documented_shape() {
    let w = W::new();
    let rs = compiled(&w).ruleset;
    // After the two source guard rules (their own test).
    let eg = &rs.chains[CHAIN_POSTROUTING].rules[2..];
    assert_eq!(eg[0].stmts, vec![Stmt::CtEstablished, Stmt::Accept]);
    assert_eq!(
        eg[1].stmts,
        vec![Stmt::CtRelated, Stmt::Jump(CHAIN_RELATED.to_string())]
    );
    assert_eq!(eg[2].stmts, vec![Stmt::CtInvalid, Stmt::Drop]);
    assert_eq!(
        eg[3].stmts,
        vec![
            Stmt::Icmpv6NeighbourDiscovery,
            Stmt::Ip6HopLimit255,
            Stmt::Jump(CHAIN_NEIGHBOUR.to_string())
        ]
    );
    // Pending destinations are dropped unless this node sends (kubelet probes).
    assert!(eg[4..8]
        .iter()
        .step_by(2)
        .all(|r| r.stmts.last() == Some(&Stmt::Drop)));
    assert_eq!(eg[5].stmts[1], Stmt::Jump(CHAIN_PENDING_DST.to_string()));
    assert_eq!(
        rs.chains[CHAIN_PENDING_DST].rules[0].stmts,
        vec![Stmt::NoInputInterface, Stmt::FibSaddrLocal, Stmt::Return],
        "sent by this node, not only claiming its address"
    );
    assert_eq!(
        rs.chains[CHAIN_PENDING_DST].rules[1].stmts,
        vec![Stmt::Drop]
    );
    assert!(
        matches!(&eg[8].stmts[0], Stmt::VmapLookup { family: Family::V4, map, .. } if map == MAP_EGRESS_V4)
    );
    assert_eq!(eg[10].stmts, vec![Stmt::Goto(CHAIN_INGRESS.to_string())]);
    assert_eq!(eg.len(), 11);
    let ing = &rs.chains[CHAIN_INGRESS].rules;
    assert!(
        matches!(&ing[0].stmts[0], Stmt::VmapLookup { family: Family::V4, map, .. } if map == MAP_INGRESS_V4)
    );
    assert_eq!(ing[2].stmts, vec![Stmt::Accept]);
    let host = &rs.chains[CHAIN_EGRESS_HOST].rules[2..];
    assert_eq!(host.len(), 11, "input: the egress check only");
    // Last, a pod's link-local source: the egress of the pod behind the veth.
    assert_eq!(
        host[10].stmts,
        vec![
            Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.to_string()),
            Stmt::IifnameVmap {
                map: MAP_EGRESS_LINKS.to_string()
            }
        ]
    );
    // No FIB lookup and no self check for a packet no policy isolates.
    assert!(!eg.iter().any(|r| r
        .stmts
        .iter()
        .any(|s| matches!(s, Stmt::FibSaddrLocal | Stmt::SelfTraffic { .. }))));
    let host = rs.chains[CHAIN_EGRESS_HOST].base.unwrap();
    assert_eq!(
        (host.hook, host.priority),
        (crate::ruleset::Hook::Input, PRIORITY_EGRESS_HOST)
    );
}

#[test]
fn group_chains_start_with_the_node_and_self_exemptions() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.policy(
        "a/p",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let rs = compiled(&w).ruleset;
    let keys = ["a/p".to_string()];
    // From a pod's veth only: the source guard says a source there is the pod's own, where any
    // host that routes to the pod can write source and destination.
    let is_self = |r: &crate::ruleset::Rule, fam: Family| {
        r.stmts[0] == Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.to_string())
            && matches!(&r.stmts[1], Stmt::SelfTraffic { family, .. } if *family == fam)
    };
    let ing = &rs.chains[&group_chain(&keys, &[], &[], &[], Direction::Ingress)].rules;
    assert_eq!(
        ing[0].stmts,
        vec![Stmt::NoInputInterface, Stmt::FibSaddrLocal, Stmt::Accept],
        "from this node: sent by it, not only claiming its address"
    );
    assert!(is_self(&ing[1], Family::V4));
    assert!(is_self(&ing[2], Family::V6));
    assert_eq!(
        ing[3].stmts,
        vec![Stmt::Jump(policy_chain("a/p", Direction::Ingress))]
    );
    let eg = &rs.chains[&group_chain(&keys, &[], &[], &[], Direction::Egress)].rules;
    assert!(is_self(&eg[0], Family::V4));
    assert!(is_self(&eg[1], Family::V6));
    assert_eq!(
        eg[2].stmts,
        vec![Stmt::Jump(policy_chain("a/p", Direction::Egress))]
    );
}

#[test]
fn unrelated_policies_and_remote_pods_add_no_chains() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.policy("a/p", json!({"podSelector": {"matchLabels": {"app": "x"}}}));
    let small = compiled(&w).ruleset.stats();
    for i in 0..50 {
        w.pod(
            &format!("b/r{i}"),
            N2,
            &[&format!("10.0.2.{}", i + 1)],
            &[("app", "x")],
        );
        w.policy(
            &format!("b/p{i}"),
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        );
    }
    let big = compiled(&w).ruleset.stats();
    assert_eq!(
        small, big,
        "remote pods and policies selecting no local pod cost nothing here"
    );
}

#[test]
fn names_are_hashes_and_hostile_strings_stay_inside_json_comments() {
    let mut w = W::new();
    let evil = "x\"; } delete table inet filter; { \"\n\u{0}";
    // The API would reject most of this; the ruleset must stay safe even if something slips by.
    let ev_ns = format!("ns{evil}");
    w.ns(&ev_ns, &[("team", evil)]);
    w.pod(&format!("{ev_ns}/x"), N1, &["10.0.1.1"], &[("k", evil)]);
    w.st.apply(Change::UpsertPolicy(Policy {
        namespace: ev_ns.clone(),
        name: format!("p{evil}"),
        pod_selector: LabelSelector::from_labels([("k", evil)]),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: Some(LabelSelector::from_labels([("team", evil)])),
                pod_selector: None,
            }],
            ports: vec![PortSpec {
                protocol: TCP,
                port: PortMatch::Named(evil.to_string()),
            }],
        }]),
        egress: None,
        audit: false,
    }));
    let rs = compiled(&w).ruleset;
    assert!(rs.chains.len() > 3);
    for name in rs.chains.keys().chain(rs.sets.keys()) {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}"
        );
    }
    let batch = rs.full_replace();
    let text = batch.to_json_string();
    let back: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(back, batch.json(), "the rendering round-trips");
    let cmds = back["nftables"].as_array().unwrap();
    assert_eq!(cmds.len(), batch.commands());
    // No command but ours: every command is add/delete of table/chain/set/map/rule of our table.
    for c in cmds {
        let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
        assert!(verb == "add" || verb == "delete", "{verb}");
        let (_, body) = obj.as_object().unwrap().iter().next().unwrap();
        let table = body
            .get("table")
            .or_else(|| body.get("name"))
            .and_then(Value::as_str)
            .unwrap();
        assert!(table == TABLE_NAME || body.get("table").is_some(), "{c}");
        if let Some(t) = body.get("table") {
            assert_eq!(t, TABLE_NAME);
        }
    }
    // Comments are cut and cleaned of control characters.
    assert!(rs
        .chains
        .values()
        .all(|c| c.comment.len() <= MAX_COMMENT_BYTES && !c.comment.chars().any(char::is_control)));
}

/// Random synthetic clusters and random connections: the compiled model (via explain) and the
/// rulesets of the nodes involved must always agree.
#[test]
fn explain_and_rulesets_agree_on_random_clusters_and_packets() {
    use crate::synth::{self, Rng, SynthConfig};
    let mut checked = 0;
    let mut denied = 0;
    let mut pending_seen = 0;
    for seed in 0..12u64 {
        let cfg = SynthConfig {
            nodes: 3,
            namespaces: 4,
            pods: 30,
            policies: 12,
            cluster_policies: 5,
            seed,
            dual_stack: false,
            audit_every: 4,
        };
        let mut st = synth::cluster(&cfg);
        let mut rng = Rng::new(seed + 1000);
        // Churn, including attachment records (of node n0) and pending addresses.
        for i in 0..8 {
            let ch = synth::random_change(&cfg, &st, &mut rng, i);
            st.apply(ch);
        }
        let mut foreign = st.clone();
        foreign.attachments.clear();
        let models: std::collections::BTreeMap<String, Compiled> = st
            .nodes
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    if n == "n0" {
                        compile(&st, n)
                    } else {
                        compile(&foreign, n)
                    },
                )
            })
            .collect();
        let pods: Vec<&Pod> = st
            .pods
            .values()
            .map(|p| &**p)
            .filter(|p| !p.ips.is_empty())
            .collect();
        for _ in 0..300 {
            let a = pods[rng.below(pods.len())];
            let b = pods[rng.below(pods.len())];
            if a.key() == b.key() {
                continue;
            }
            let from = if rng.chance(15) {
                Endpoint::Ip(ip("192.168.77.5"))
            } else {
                Endpoint::Pod {
                    namespace: a.namespace.to_string(),
                    name: a.name.to_string(),
                }
            };
            let pending: Vec<IpAddr> = models["n0"]
                .pending
                .iter()
                .filter(|i| i.is_ipv4())
                .copied()
                .collect();
            let to = if !pending.is_empty() && rng.chance(10) {
                Endpoint::Ip(pending[rng.below(pending.len())])
            } else {
                Endpoint::Pod {
                    namespace: b.namespace.to_string(),
                    name: b.name.to_string(),
                }
            };
            let proto = Protocol::ALL[rng.below(3)];
            let port =
                [53u16, 80, 443, 8000, 8050, 8080, 8081, 9000, 9100, 5050, 22][rng.below(11)];
            let x = explain(&st, &models["n0"], &from, &to, port, proto).unwrap();
            let p = Packet {
                saddr: x.from_ip,
                daddr: x.to_ip,
                proto: Some(proto),
                dport: port,
                from_this_node: false,
            };
            let by_rules = models.values().all(|m| m.ruleset.eval_forward(&p));
            assert_eq!(x.allowed, by_rules, "seed {seed}:\n{x}");
            checked += 1;
            denied += usize::from(!by_rules);
            pending_seen += usize::from(matches!(
                x.ingress.outcome,
                crate::explain::Outcome::Pending
            ));
        }
    }
    assert!(pending_seen > 0, "no pending address was ever checked");
    assert!(
        denied > checked / 20 && denied < checked * 19 / 20,
        "{denied} of {checked} denied: not a useful mix"
    );
}

#[test]
fn explain_names_the_deciding_policies_and_rules_for_an_operator() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("b/y", N2, &["10.0.2.1"], &[("app", "y")]);
    w.policy("a/web", json!({"podSelector": {"matchLabels": {"app": "x"}}, "ingress": [{"ports": [{"port": 80}]}]}));
    w.policy("b/lockdown", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}));
    let c = compile(&w.st, N1);
    let x = explain(
        &w.st,
        &c,
        &"b/y".parse().unwrap(),
        &"a/x".parse().unwrap(),
        80,
        TCP,
    )
    .unwrap();
    assert!(x.allowed);
    let text = x.to_string();
    assert!(text.contains("ALLOWED"), "{text}");
    assert!(
        text.contains(
            "egress of b/y (node n2): allowed by policy b/lockdown rule 0 (peer pod selected)"
        ),
        "{text}"
    );
    assert!(
        text.contains("ingress of a/x (node n1): allowed by policy a/web rule 0 (any peer)"),
        "{text}"
    );
    let x = explain(
        &w.st,
        &c,
        &"b/y".parse().unwrap(),
        &"a/x".parse().unwrap(),
        443,
        TCP,
    )
    .unwrap();
    let text = x.to_string();
    assert!(!x.allowed);
    assert!(
        text.contains(
            "ingress of a/x (node n1): DENIED, isolated by a/web and none of their rules matches"
        ),
        "{text}"
    );
    assert!(explain(
        &w.st,
        &c,
        &"a/nope".parse().unwrap(),
        &"a/x".parse().unwrap(),
        80,
        TCP
    )
    .is_err());
    assert!("not an endpoint".parse::<Endpoint>().is_err());
}

#[test]
fn two_local_pods_claiming_one_address_never_break_the_batch() {
    let mut w = W::new();
    w.pod("a/old", N1, &["10.0.1.1"], &[("app", "old")]);
    w.pod("a/new", N1, &["10.0.1.1"], &[("app", "new")]);
    w.policy(
        "a/p-old",
        json!({"podSelector": {"matchLabels": {"app": "old"}}}),
    );
    w.policy(
        "a/p-new",
        json!({"podSelector": {"matchLabels": {"app": "new"}}, "ingress": [{}]}),
    );
    let c = compiled(&w);
    let keys: Vec<_> = c.ruleset.sets[MAP_INGRESS_V4].elements.iter().collect();
    assert_eq!(keys.len(), 1, "one verdict per address: {keys:?}");
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].contains("a/new") && c.warnings[0].contains("a/old"),
        "{:?}",
        c.warnings
    );
    let mut k = crate::kernel_sim::KernelTable::default();
    k.apply(&c.ruleset.full_replace().json()).unwrap();
}

#[test]
fn semantics_36_short_port_ranges_become_exact_elements_of_a_hash_set() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.policy(
        "a/short",
        json!({"podSelector": {"matchLabels": {"app": "x"}},
               "ingress": [{"ports": [{"port": 80}, {"port": 7000, "endPort": 7002}]}]}),
    );
    w.policy(
        "a/long",
        json!({"podSelector": {"matchLabels": {"app": "x"}},
               "ingress": [{"ports": [{"port": 8000, "endPort": 9000}]}]}),
    );
    let rs = compiled(&w).ruleset;
    let set = |ranges: &[(Protocol, u16, u16)]| &rs.sets[&crate::ruleset::names::ports_set(ranges)];
    let short = set(&[(Protocol::Tcp, 80, 80), (Protocol::Tcp, 7000, 7002)]);
    assert!(!short.interval, "exact ports: a hash set, no pipapo lookup");
    assert_eq!(short.elements.len(), 4, "80 and 7000..=7002");
    assert!(short
        .elements
        .contains(&Elem::ProtoPort(Protocol::Tcp, 7001, 7001)));
    let long = set(&[(Protocol::Tcp, 8000, 9000)]);
    assert!(long.interval);
    assert_eq!(
        long.elements,
        [Elem::ProtoPort(Protocol::Tcp, 8000, 9000)].into()
    );
    assert!(w.can("10.9.9.9", "a/x", 7001, TCP));
    assert!(w.can("10.9.9.9", "a/x", 8500, TCP));
    assert!(!w.can("10.9.9.9", "a/x", 7003, TCP));
}

/// Applies `change` to `inc` and to `w`'s state; `inc`'s ruleset must then be the full compile's
/// and its batch the full compile's diff from before.
fn incremental_step(inc: &mut crate::IncrementalCompiler, w: &mut W, what: &str, change: Change) {
    let before = inc.ruleset().clone();
    let batch = inc.apply(change.clone());
    w.st.apply(change);
    let full = compiled(w).ruleset;
    assert_eq!(inc.ruleset(), &full, "after {what}");
    assert_eq!(batch, crate::diff::diff(&before, &full), "after {what}");
}

/// The change deleting the policy `ns/name`.
fn delete_policy(key: &str) -> Change {
    let (ns, name) = key.split_once('/').unwrap();
    Change::DeletePolicy {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn rules_with_the_same_ports_share_one_set_which_goes_with_its_last_rule() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    let web = json!([{"port": 8080}, {"port": 8443}]);
    w.policy(
        "a/one",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "ingress": [{"ports": web}]}),
    );
    w.policy(
        "a/two",
        json!({"podSelector": {"matchLabels": {"app": "y"}}, "ingress": [{"ports": web}]}),
    );
    let name = crate::ruleset::names::ports_set(&[
        (Protocol::Tcp, 8080, 8080),
        (Protocol::Tcp, 8443, 8443),
    ]);
    let ports_sets = |rs: &Ruleset| {
        rs.sets
            .keys()
            .filter(|n| n.starts_with(PORTS_SET_PREFIX))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ports_sets(&compiled(&w).ruleset),
        vec![name.clone()],
        "one set for both rules"
    );
    assert!(w.can("10.9.9.9", "a/y", 8443, TCP));
    // The incremental compiler keeps the set while a rule still names it, and its batches are the
    // full compile's diffs.
    let mut inc = crate::IncrementalCompiler::new(w.st.clone(), N1);
    for key in ["a/one", "a/two"] {
        incremental_step(&mut inc, &mut w, key, delete_policy(key));
    }
    assert!(
        ports_sets(inc.ruleset()).is_empty(),
        "gone with its last rule"
    );
    // And back: the first rule to name it brings it.
    let mut scratch = W::new();
    let spec = json!({"podSelector": {"matchLabels": {"app": "y"}}, "ingress": [{"ports": web}]});
    scratch.policy("a/two", spec);
    let pol = scratch.st.policies.values().next().unwrap().clone();
    incremental_step(&mut inc, &mut w, "a/two back", Change::UpsertPolicy(pol));
    assert_eq!(ports_sets(inc.ruleset()), vec![name]);
}

#[test]
fn rules_with_the_same_pod_peers_share_their_peer_set_which_follows_pods_and_goes_with_its_last_rule(
) {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    w.pod("b/c", N2, &["10.0.2.1"], &[("role", "client")]);
    let from =
        json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]);
    w.policy(
        "a/one",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "ingress": [{"from": from}]}),
    );
    w.policy(
        "a/two",
        json!({"podSelector": {"matchLabels": {"app": "y"}}, "ingress": [{"from": from}]}),
    );
    // Same selectors written in another policy's namespace without namespaceSelector: other peers.
    w.policy(
        "a/own",
        json!({"podSelector": {"matchLabels": {"app": "y"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}),
    );
    let peer_sets = |rs: &Ruleset| {
        rs.sets
            .iter()
            .filter(|(n, _)| n.starts_with(crate::ruleset::names::PEER_SET_PREFIX))
            .map(|(n, s)| (n.clone(), s.elements.len()))
            .collect::<Vec<_>>()
    };
    let full = compiled(&w).ruleset;
    assert_eq!(
        peer_sets(&full).len(),
        1,
        "one set for one/two; own's has no address yet: {:?}",
        peer_sets(&full)
    );
    assert!(w.can("10.0.2.1", "a/y", 80, TCP));
    let mut inc = crate::IncrementalCompiler::new(w.st.clone(), N1);
    // A second client joins: the shared set gets it once, for both rules.
    let mut scratch = W::new();
    scratch.pod("b/c2", N2, &["10.0.2.2"], &[("role", "client")]);
    let c2 = scratch.st.pods["b/c2"].clone();
    incremental_step(&mut inc, &mut w, "a second client", Change::UpsertPod(c2));
    assert_eq!(
        peer_sets(inc.ruleset()),
        vec![(peer_sets(&full)[0].0.clone(), 2)]
    );
    for key in ["a/one", "a/two"] {
        incremental_step(&mut inc, &mut w, key, delete_policy(key));
    }
    assert!(
        peer_sets(inc.ruleset()).is_empty(),
        "gone with its last rule"
    );
}

#[test]
fn explain_before_apply_gives_pods_without_address_or_node_placeholders_nobody_holds() {
    let mut w = W::new();
    w.pod("a/ready", N1, &["198.18.0.1"], &[("app", "ready")]);
    w.pod("a/new", N1, &[], &[("app", "new")]);
    w.pod("b/unscheduled", N2, &[], &[("app", "u")]);
    std::sync::Arc::make_mut(w.st.pods.get_mut("b/unscheduled").unwrap()).node_name = None;
    w.policy(
        "a/only-ready",
        json!({"podSelector": {"matchLabels": {"app": "new"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "ready"}}}]}]}),
    );
    let (st, given) = crate::explain::with_placeholders(&w.st);
    assert_eq!(given.len(), 2, "{given:?}");
    assert_eq!(
        st.pods["a/ready"].ips, w.st.pods["a/ready"].ips,
        "real addresses kept"
    );
    let new = &st.pods["a/new"];
    assert_eq!(new.ips.len(), 2, "one of each family");
    assert!(
        !new.ips.contains(&ip("198.18.0.1")),
        "never an address someone holds"
    );
    assert_eq!(
        st.pods["b/unscheduled"].node_name.as_deref(),
        Some(crate::explain::PLACEHOLDER_NODE)
    );
    // The same compile answers by identity.
    let c = compile(&st, N1);
    let ok = explain(
        &st,
        &c,
        &"a/ready".parse().unwrap(),
        &"a/new".parse().unwrap(),
        80,
        TCP,
    )
    .unwrap();
    assert!(ok.allowed, "{ok}");
    let no = explain(
        &st,
        &c,
        &"b/unscheduled".parse().unwrap(),
        &"a/new".parse().unwrap(),
        80,
        TCP,
    )
    .unwrap();
    assert!(!no.allowed, "{no}");
}
