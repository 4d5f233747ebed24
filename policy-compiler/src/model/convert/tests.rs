use super::*;
use crate::model::{Change, ClusterState, NAMESPACE_NAME_LABEL};
use serde_json::json;

fn np(spec: serde_json::Value) -> net::NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    }))
    .unwrap()
}

fn err_of(spec: serde_json::Value) -> ModelError {
    policy_from_k8s(&np(spec)).unwrap_err()
}

#[test]
fn semantics_03_policy_types_default_to_ingress_plus_egress_iff_egress_nonempty() {
    let p = policy_from_k8s(&np(json!({"podSelector": {}}))).unwrap();
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress, None);
    let p = policy_from_k8s(&np(json!({"podSelector": {}, "egress": []}))).unwrap();
    assert_eq!(
        p.egress, None,
        "egress: [] without policyTypes does not isolate egress"
    );
    let p = policy_from_k8s(&np(json!({"podSelector": {}, "egress": [{}]}))).unwrap();
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress, Some(vec![Rule::default()]));
}

#[test]
fn empty_policy_types_default_exactly_like_omitted_ones() {
    // (spec without policyTypes, isolates ingress, isolates egress): the same with `policyTypes: []`.
    let table = [
        (json!({"podSelector": {}}), true, false),
        (json!({"podSelector": {}, "ingress": [{}]}), true, false),
        (json!({"podSelector": {}, "egress": []}), true, false),
        (json!({"podSelector": {}, "egress": [{}]}), true, true),
        (
            json!({"podSelector": {}, "ingress": [{}], "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
            true,
            true,
        ),
    ];
    for (spec, want_in, want_eg) in table {
        let mut empty = spec.clone();
        empty["policyTypes"] = json!([]);
        for s in [&spec, &empty] {
            let p = policy_from_k8s(&np(s.clone())).unwrap();
            assert_eq!(p.ingress.is_some(), want_in, "ingress of {s}");
            assert_eq!(p.egress.is_some(), want_eg, "egress of {s}");
        }
        assert_eq!(
            policy_from_k8s(&np(spec.clone())).unwrap(),
            policy_from_k8s(&np(empty.clone())).unwrap(),
            "{spec} and {empty} differ"
        );
    }
}

#[test]
fn semantics_02_rules_of_an_unlisted_direction_are_dropped() {
    let p = policy_from_k8s(&np(json!({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{"ports": [{"port": 80}]}]}))).unwrap();
    assert_eq!(p.egress, None);
    let p = policy_from_k8s(&np(
        json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
    ))
    .unwrap();
    assert_eq!(p.ingress, None);
    assert_eq!(p.egress, Some(vec![]));
}

#[test]
fn semantics_42_peer_with_nothing_set_is_rejected_naming_the_field() {
    let e = err_of(json!({"podSelector": {}, "ingress": [{"from": [{}]}]}));
    assert_eq!(e.kind, "NetworkPolicy");
    assert_eq!(e.key, "ns/p");
    assert_eq!(e.field, "spec.ingress[0].from[0]");
    assert!(e.to_string().contains("ns/p"), "{e}");
}

#[test]
fn semantics_42_ipblock_with_selector_is_rejected() {
    let e = err_of(
        json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
    );
    assert_eq!(e.field, "spec.egress[0].to[0]");
}

#[test]
fn semantics_42_bad_cidr_is_rejected() {
    let e = err_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}),
    );
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr");
}

#[test]
fn semantics_23_except_must_be_strict_subset_of_cidr() {
    let e = err_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
    );
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.except[0]");
    let e = err_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]}),
    );
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.except[0]");
    let e = err_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}]}]}),
    );
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.except[0]");
}

#[test]
fn semantics_26_cidr_with_host_bits_is_masked() {
    let p = policy_from_k8s(&np(
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1/24"}}]}]}),
    ))
    .unwrap();
    assert_eq!(
        p.ingress.unwrap()[0].peers[0],
        Peer::IpBlock {
            cidr: "10.0.0.0/24".parse().unwrap(),
            except: vec![]
        }
    );
}

#[test]
fn semantics_36_end_port_rules_are_validated() {
    let ok = policy_from_k8s(&np(
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 53, "endPort": 80}]}]}),
    ))
    .unwrap();
    assert_eq!(
        ok.ingress.unwrap()[0].ports[0],
        PortSpec {
            protocol: Protocol::Tcp,
            port: PortMatch::Range(53, 80)
        }
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 53}]}]}))
            .field,
        "spec.ingress[0].ports[0].endPort"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 53}]}]})).field,
        "spec.ingress[0].ports[0].endPort"
    );
    assert_eq!(
        err_of(
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "dns", "endPort": 53}]}]})
        )
        .field,
        "spec.ingress[0].ports[0].endPort"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 1, "endPort": 70000}]}]}))
            .field,
        "spec.ingress[0].ports[0].endPort"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})).field,
        "spec.ingress[0].ports[0].port"
    );
}

#[test]
fn unknown_protocol_and_bad_port_name_are_rejected() {
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]})).field,
        "spec.ingress[0].ports[0].protocol"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "tcp"}]}]})).field,
        "spec.ingress[0].ports[0].protocol"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "Has_Caps"}]}]})).field,
        "spec.ingress[0].ports[0].port"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "123"}]}]})).field,
        "spec.ingress[0].ports[0].port"
    );
}

#[test]
fn semantics_19_in_and_notin_with_empty_values_are_invalid() {
    let e = err_of(
        json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}),
    );
    assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
    let e = err_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn"}]}}]}]}),
    );
    assert_eq!(
        e.field,
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values"
    );
    let e = err_of(
        json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
    );
    assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
    let e = err_of(
        json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}}),
    );
    assert_eq!(e.field, "spec.podSelector.matchExpressions[0].operator");
}

#[test]
fn bad_policy_types_are_rejected() {
    assert_eq!(
        err_of(json!({"podSelector": {}, "policyTypes": ["Sideways"]})).field,
        "spec.policyTypes[0]"
    );
    assert_eq!(
        err_of(json!({"podSelector": {}, "policyTypes": ["Ingress", "Ingress"]})).field,
        "spec.policyTypes[1]"
    );
}

#[test]
fn semantics_18_namespace_always_carries_its_name_label() {
    let ns: core::Namespace =
        serde_json::from_value(json!({"metadata": {"name": "a", "labels": {"x": "y"}}})).unwrap();
    let n = namespace_from_k8s(&ns).unwrap();
    assert_eq!(n.labels.get(NAMESPACE_NAME_LABEL), Some("a"));
    let mut st = ClusterState::default();
    st.apply(Change::UpsertNamespace(crate::model::Namespace {
        name: "b".into(),
        labels: Labels::new(),
    }));
    assert_eq!(
        st.namespaces["b"].labels.get(NAMESPACE_NAME_LABEL),
        Some("b")
    );
}

#[test]
fn pod_conversion_reads_ips_ports_and_phase_and_terminated_pods_leave_the_state() {
    let pod: core::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
    })).unwrap();
    let p = pod_from_k8s(&pod).unwrap();
    assert_eq!(p.key(), "ns/a");
    assert_eq!(p.ips.len(), 2);
    assert!(p.ports.contains(&ContainerPort {
        name: Some("http".into()),
        port: 8080,
        protocol: Protocol::Tcp
    }));
    assert!(p.ports.contains(&ContainerPort {
        name: None,
        port: 53,
        protocol: Protocol::Udp
    }));
    let mut st = ClusterState::default();
    st.apply(Change::UpsertPod(p.clone().into()));
    assert!(st.pods.contains_key("ns/a"));
    st.apply(Change::UpsertPod(
        Pod {
            phase: PodPhase::Succeeded,
            ..p
        }
        .into(),
    ));
    assert!(!st.pods.contains_key("ns/a"), "a Succeeded pod is gone");
}

#[test]
fn pod_with_bad_ip_names_pod_and_field() {
    let pod: core::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "ns"},
        "status": {"podIPs": [{"ip": "nope"}]}
    }))
    .unwrap();
    let e = pod_from_k8s(&pod).unwrap_err();
    assert_eq!(
        (e.kind, e.key.as_str(), e.field.as_str()),
        ("Pod", "ns/a", "status.podIPs[0]")
    );
}

#[test]
fn node_conversion_reads_pod_cidrs_and_internal_ips() {
    let node: core::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname", "address": "n1"}]}
    })).unwrap();
    let n = node_from_k8s(&node).unwrap();
    assert_eq!(n.pod_cidrs.len(), 2);
    assert_eq!(
        n.internal_ips,
        vec!["192.168.1.10".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn invalid_label_keys_and_values_in_selectors_are_rejected() {
    let e = err_of(json!({"podSelector": {"matchLabels": {"bad key": "x"}}}));
    assert_eq!(e.field, "spec.podSelector.matchLabels");
    let e = err_of(json!({"podSelector": {"matchLabels": {"k": "-x"}}}));
    assert_eq!(e.field, "spec.podSelector.matchLabels");
    let e = err_of(
        json!({"podSelector": {"matchExpressions": [{"key": "Example.COM/x", "operator": "Exists"}]}}),
    );
    assert_eq!(e.field, "spec.podSelector.matchExpressions[0].key");
    let e = err_of(
        json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "In", "values": ["a b"]}]}}),
    );
    assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
    assert!(policy_from_k8s(&np(json!({"podSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-1", "app.kubernetes.io/name": "", "A_b.c": "V1"}}}))).is_ok());
}

#[test]
fn the_audit_annotation_puts_a_policy_in_audit_mode_and_another_value_is_refused_by_name() {
    let with = |v: &str| -> net::NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {crate::model::AUDIT_ANNOTATION: v}},
            "spec": {"podSelector": {}},
        }))
        .unwrap()
    };
    assert!(policy_from_k8s(&with("true")).unwrap().audit);
    assert!(!policy_from_k8s(&with("false")).unwrap().audit);
    assert!(
        !policy_from_k8s(&np(json!({"podSelector": {}})))
            .unwrap()
            .audit
    );
    let e = policy_from_k8s(&with("yes")).unwrap_err().to_string();
    assert!(
        e.contains("palisade.dev/audit") && e.contains("\"yes\""),
        "{e}"
    );
}
