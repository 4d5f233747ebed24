//! ClusterNetworkPolicy semantics (docs/cluster-network-policy.md), one test per point. `W::can`
//! asks explain and the rulesets of both nodes, which must agree.

use super::*;

/// x (ns a, node 1) and y (ns b, node 2), both dual-stack; z in a on node 2.
fn world() -> W {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1", "fd00::1:1"], &[("app", "x")]);
    w.pod("b/y", N2, &["10.0.2.1", "fd00::2:1"], &[("app", "y")]);
    w.pod("a/z", N2, &["10.0.2.2", "fd00::2:2"], &[("app", "z")]);
    w
}

fn deny_from_b(tier: &str, priority: u32) -> Value {
    json!({"tier": tier, "priority": priority,
           "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
           "ingress": [{"name": "no-b", "action": "Deny",
                        "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}]})
}

#[test]
fn cnp_admin_deny_overrides_a_networkpolicy_allow() {
    let mut w = world();
    w.policy("a/allow-all", json!({"podSelector": {}, "ingress": [{}]}));
    assert!(w.can("b/y", "a/x", 80, TCP));
    w.cnp("deny-b", deny_from_b("Admin", 10));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can_fam("b/y", "a/x", 80, TCP, true), "IPv6 too");
    assert!(
        w.can("a/z", "a/x", 80, TCP),
        "other peers still meet the NetworkPolicy"
    );
    let text = w.why("b/y", "a/x", 80, TCP).to_string();
    assert!(
        text.contains(
            "DENIED by Admin tier clusternetworkpolicy deny-b (priority 10) rule no-b: Deny"
        ),
        "explain names tier, policy, rule and action: {text}"
    );
}

#[test]
fn cnp_admin_accept_overrides_a_networkpolicy_deny() {
    let mut w = world();
    w.policy("a/deny-all", json!({"podSelector": {}}));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    w.cnp(
        "monitoring",
        json!({"tier": "Admin", "priority": 5,
               "subject": {"namespaces": {}},
               "ingress": [{"action": "Accept",
                            "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "b"}},
                                               "podSelector": {"matchLabels": {"app": "y"}}}}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(w.can_fam("b/y", "a/x", 80, TCP, true));
    assert!(
        !w.can("a/z", "a/x", 80, TCP),
        "a peer the rule does not name"
    );
}

#[test]
fn cnp_admin_pass_hands_over_to_networkpolicies_then_baseline() {
    let mut w = world();
    w.cnp(
        "pass-b",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}]}),
    );
    // A later Admin Deny for the same traffic is skipped by the Pass.
    w.cnp("deny-b", deny_from_b("Admin", 20));
    assert!(
        w.can("b/y", "a/x", 80, TCP),
        "passed: no NetworkPolicy, no baseline"
    );
    let text = w.why("b/y", "a/x", 80, TCP).to_string();
    assert!(
        text.contains("allowed, passed on by Admin tier clusternetworkpolicy pass-b (priority 1) rule #0: Pass"),
        "explain names the Pass: {text}"
    );
    w.cnp("baseline-deny-b", deny_from_b("Baseline", 0));
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "passed on to the Baseline tier, which denies"
    );
    w.policy("a/allow-all", json!({"podSelector": {}, "ingress": [{}]}));
    assert!(
        w.can("b/y", "a/x", 80, TCP),
        "a NetworkPolicy selects x: it decides, Baseline never runs"
    );
}

#[test]
fn cnp_baseline_only_applies_where_no_networkpolicy_selects_the_pod_for_that_direction() {
    let mut w = world();
    w.cnp("baseline-deny-b", deny_from_b("Baseline", 0));
    assert!(!w.can("b/y", "a/x", 80, TCP));
    // An egress-only NetworkPolicy does not select x for ingress: Baseline still decides ingress.
    w.policy(
        "a/egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    );
    assert!(!w.can("b/y", "a/x", 80, TCP));
    w.policy(
        "a/allow-b",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    assert!(
        w.can("b/y", "a/x", 80, TCP),
        "the NetworkPolicy overrides the baseline"
    );
}

#[test]
fn cnp_lower_priority_first_then_name_and_rules_in_order() {
    let mut w = world();
    let accept_b = |p: u32| {
        json!({"tier": "Admin", "priority": p,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}]})
    };
    w.cnp("m-deny", deny_from_b("Admin", 50));
    w.cnp("z-accept", accept_b(60));
    assert!(!w.can("b/y", "a/x", 80, TCP), "50 before 60");
    w.cnp("z-accept", accept_b(40));
    assert!(w.can("b/y", "a/x", 80, TCP), "a priority change reorders");
    w.cnp("z-accept", accept_b(50));
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "same priority: by name, m before z"
    );
    let c = compiled(&w);
    assert!(
        c.warnings
            .iter()
            .any(|m| m.contains("m-deny and z-accept (Admin tier, priority 50)")),
        "a tie is reported: {:?}",
        c.warnings
    );
    // Inside one policy the first matching rule decides.
    w.del_cnp("m-deny");
    w.cnp(
        "z-accept",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "y"}}}}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 22}}}]},
                           {"action": "Accept", "from": [{"namespaces": {}}]},
                           {"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(!w.can("b/y", "a/x", 22, TCP));
    assert!(w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn cnp_egress_accept_still_meets_the_destinations_ingress() {
    let mut w = world();
    w.cnp(
        "egress-accept",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "b"}}},
               "egress": [{"action": "Accept", "to": [{"namespaces": {}}]}]}),
    );
    w.policy("a/deny-all", json!({"podSelector": {}}));
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "x's NetworkPolicy still denies ingress"
    );
    w.del_policy("a/deny-all");
    w.cnp("deny-b", deny_from_b("Admin", 9));
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "x's Admin ingress Deny still applies"
    );
    w.del_cnp("deny-b");
    assert!(w.can("b/y", "a/x", 80, TCP));
}

#[test]
fn cnp_without_rules_of_a_direction_does_not_isolate_it() {
    let mut w = world();
    w.cnp(
        "egress-only",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "egress": [{"action": "Deny", "to": [{"networks": ["203.0.113.0/24"]}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP), "ingress untouched");
    assert!(!w.can("a/x", "203.0.113.9", 443, TCP));
    assert!(w.can("a/x", "198.51.100.1", 443, TCP));
    let c = compiled(&w);
    assert!(c.pods["a/x"].cluster(Direction::Ingress).is_empty());
}

#[test]
fn cnp_subject_by_pods_needs_both_selectors_and_skips_host_network_pods() {
    let mut w = world();
    w.pod("a/hn", N1, &[N1_IP], &[("app", "x")]);
    std::sync::Arc::make_mut(w.st.pods.get_mut("a/hn").unwrap()).host_network = true;
    w.pod("b/x2", N2, &["10.0.2.9"], &[("app", "x")]);
    w.cnp(
        "deny-x-in-a",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                    "podSelector": {"matchLabels": {"app": "x"}}}},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(!w.can("b/y", "a/x", 80, TCP));
    assert!(
        w.can("a/x", "b/x2", 80, TCP),
        "app=x in namespace b is not a subject"
    );
    assert!(w.can("b/y", "a/z", 80, TCP), "z in a is not app=x");
    let c = compiled(&w);
    assert!(!c.pods.contains_key("a/hn"));
    assert_eq!(
        c.cluster_policies["cnp:deny-x-in-a"].selected,
        ["a/x".to_string()].into()
    );
}

#[test]
fn cnp_peers_namespaces_pods_nodes_and_networks_the_last_covering_pods() {
    let mut w = world();
    let mut n2 = w.st.nodes[N2].clone();
    n2.labels = labels(&[("role", "infra")]);
    n2.addresses.push(ip("203.0.113.50"));
    w.st.apply(Change::UpsertNode(n2));
    w.cnp(
        "x-egress",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}}},
               "egress": [{"action": "Accept", "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]},
                          {"action": "Deny", "to": [{"networks": ["10.0.2.0/24", "fd00::2:0/112"]}]},
                          {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}),
    );
    assert!(w.can("a/x", N2_IP, 10250, TCP), "node peer: InternalIP");
    assert!(
        w.can("a/x", "203.0.113.50", 443, TCP),
        "node peer: another status address"
    );
    assert!(
        !w.can("a/x", "b/y", 80, TCP),
        "networks match pod addresses"
    );
    assert!(!w.can_fam("a/x", "b/y", 80, TCP, true), "IPv6 network");
    assert!(!w.can("a/x", "8.8.8.8", 53, UDP));
    // Node label changes move the node's addresses in or out.
    let mut n2 = w.st.nodes[N2].clone();
    n2.labels = Labels::new();
    w.st.apply(Change::UpsertNode(n2));
    assert!(!w.can("a/x", N2_IP, 10250, TCP));
}

#[test]
fn cnp_protocols_ports_ranges_and_named_ports_of_the_destination() {
    let mut w = world();
    w.ports("a/x", &[("web", 8080, TCP), ("dns", 5353, UDP)]);
    w.cnp(
        "ports",
        json!({"tier": "Baseline", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                                          {"udp": {"destinationPort": {"range": {"start": 1000, "end": 1010}}}},
                                          {"sctp": {"destinationPort": {"range": {"start": 1, "end": 65535}}}},
                                          {"destinationNamedPort": "web"},
                                          {"destinationNamedPort": "dns"}]},
                           {"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(w.can("b/y", "a/x", 80, TCP));
    assert!(!w.can("b/y", "a/x", 81, TCP));
    assert!(w.can("b/y", "a/x", 1005, UDP));
    assert!(!w.can("b/y", "a/x", 1011, UDP));
    assert!(
        w.can("b/y", "a/x", 4242, SCTP),
        "a range over every port of a protocol"
    );
    assert!(
        w.can("b/y", "a/x", 8080, TCP),
        "named port with its own protocol"
    );
    assert!(w.can("b/y", "a/x", 5353, UDP));
    assert!(
        !w.can("b/y", "a/x", 8080, UDP),
        "named port, other protocol"
    );
    assert!(
        !w.can("b/y", "a/z", 8080, TCP),
        "z declares no port named web"
    );
}

#[test]
fn cnp_peers_with_no_known_field_fail_closed() {
    let mut w = world();
    w.cnp(
        "future-accept",
        json!({"tier": "Admin", "priority": 1,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"name": "unknown-peer", "action": "Accept", "from": [{"someFutureField": {}}]}]}),
    );
    w.policy("a/deny-all", json!({"podSelector": {}}));
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "an Accept with an unknown peer matches nothing"
    );
    w.del_policy("a/deny-all");
    w.cnp(
        "future-pass",
        json!({"tier": "Admin", "priority": 2,
               "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
               "ingress": [{"action": "Pass", "from": [{"someFutureField": {}}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 1}}}]}]}),
    );
    assert!(
        !w.can("b/y", "a/x", 80, TCP),
        "a Pass with an unknown peer denies everything"
    );
    assert!(!w.can("a/z", "a/x", 443, UDP));
}

#[test]
fn cnp_objects_the_crd_would_refuse_are_refused_naming_the_field() {
    let bad = |spec: Value| {
        let o = serde_json::from_value(json!({"metadata": {"name": "c"}, "spec": spec})).unwrap();
        cluster_policy_from_api(&o).unwrap_err().to_string()
    };
    let base = |extra: Value| {
        let mut s = json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let cases = [
        (json!({"tier": "Middle"}), "spec.tier"),
        (json!({"priority": 1001}), "spec.priority"),
        (json!({"subject": {}}), "spec.subject"),
        (
            json!({"egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]}),
            "spec.egress[0].to[0].domainNames",
        ),
        (
            json!({"ingress": [{"action": "Accept", "from": [{"networks": ["10.0.0.0/8"]}]}]}),
            "spec.ingress[0].from[0].networks",
        ),
        (
            json!({"egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}],
                               "protocols": [{"destinationNamedPort": "web"}]}]}),
            "spec.egress[0].protocols[0].destinationNamedPort",
        ),
        (
            json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                                "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]}]}),
            "spec.ingress[0].protocols[0].tcp.destinationPort.range",
        ),
        (
            json!({"ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]}),
            "spec.ingress[0].action",
        ),
        (
            json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                                "protocols": [{"udp": {}}]}]}),
            "spec.ingress[0].protocols[0].udp.destinationPort",
        ),
        (
            json!({"ingress": [{"action": "Deny", "from": []}]}),
            "spec.ingress[0].from",
        ),
        (
            json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}, "pods": {"podSelector": {}}}]}]}),
            "spec.ingress[0].from[0]",
        ),
    ];
    for (extra, field) in cases {
        let msg = bad(base(extra.clone()));
        assert!(
            msg.starts_with(&format!("ClusterNetworkPolicy c: {field}: ")),
            "{extra}: {msg}"
        );
    }
}

#[test]
fn cnp_pods_no_cnp_selects_pay_nothing_for_them() {
    let mut w = world();
    w.cnp("deny-b", deny_from_b("Admin", 10));
    let c = compile(&w.st, N2);
    // y (ns b) is selected by nothing: no verdict-map entry, so its packets cost a map miss.
    for m in [MAP_INGRESS_V4, MAP_EGRESS_V4, MAP_INGRESS_V6, MAP_EGRESS_V6] {
        assert!(
            !c.ruleset.sets[m]
                .elements
                .iter()
                .any(|e| matches!(e, Elem::GotoChain(g) if g.0 == self::ip("10.0.2.1") || g.0 == self::ip("fd00::2:1"))),
            "{m}"
        );
    }
    // z (ns a) is: its ingress goes through its group chain.
    assert!(c.ruleset.sets[MAP_INGRESS_V4]
        .elements
        .iter()
        .any(|e| matches!(e, Elem::GotoChain(g) if g.0 == self::ip("10.0.2.2"))));
}

#[test]
fn cnp_readable_ruleset_names_tiers_and_priorities() {
    let mut w = world();
    w.cnp("deny-b", deny_from_b("Admin", 10));
    w.cnp("baseline-deny-b", deny_from_b("Baseline", 3));
    let rs = compiled(&w).ruleset;
    let comments: Vec<&str> = rs.chains.values().map(|c| c.comment.as_str()).collect();
    assert!(
        comments.contains(&"Admin tier, ingress, by priority: deny-b (10)"),
        "{comments:?}"
    );
    assert!(comments.contains(&"Baseline tier, ingress, by priority: baseline-deny-b (3)"));
}
