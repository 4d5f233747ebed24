//! What every node's base chains hold for its pods: pending pods, the attachment records'
//! addresses, the source guard, related packets and router messages from a pod's veth.

use super::*;

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

/// A TCP packet to port 8080.
fn packet(saddr: &str, daddr: &str, from_this_node: bool) -> Packet {
    Packet {
        saddr: ip(saddr),
        daddr: ip(daddr),
        proto: Some(TCP),
        dport: 8080,
        from_this_node,
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

#[test]
fn a_lockdown_drops_every_new_connection_of_a_local_pod_and_lets_its_node_and_other_traffic_pass() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1", "fd00:1::1"], &[]);
    w.pod("a/y", N1, &["10.0.1.2"], &[]);
    w.pod("a/r", N2, &["10.0.2.1"], &[]);
    // An isolated pod: the full table holds its group chain and its policy's.
    w.pod("b/q", N1, &["10.0.1.4"], &[]);
    w.policy("b/p", json!({"podSelector": {}}));
    // A pod the API does not know yet, and the source binding of a known one.
    w.st.apply(Change::SetAttachments(vec![
        attachment("a/z", &["10.0.1.3"], true),
        attachment("a/x", &["10.0.1.1", "fd00:1::1"], false),
    ]));
    let c = compiled(&w);
    let full = &c.ruleset;
    // An address of a record newer than the compiled state.
    let lock = c.lockdown([ip("10.0.1.5")]);
    // No policy: the full table lets these through; the lockdown none of them.
    for (s, d) in [
        ("10.0.1.1", "10.0.1.2"),
        ("10.0.2.1", "10.0.1.1"),
        ("10.0.1.2", "10.0.2.1"),
        ("10.0.1.1", "203.0.113.9"),
        ("203.0.113.9", "10.0.1.2"),
    ] {
        assert!(full.eval_forward(&packet(s, d, false)), "{s} -> {d} (full)");
        assert!(
            !lock.eval_forward(&packet(s, d, false)),
            "{s} -> {d} (lockdown)"
        );
    }
    assert!(
        !lock.eval_forward(&packet("fd00:2::1", "fd00:1::1", false)),
        "IPv6 too"
    );
    assert!(
        !lock.eval_to_host(&packet("10.0.1.1", N1_IP, false)),
        "pod to its node"
    );
    assert!(
        lock.eval_forward(&packet(N1_IP, "10.0.1.1", true)),
        "this node still reaches its pods (kubelet probes)"
    );
    assert!(
        lock.eval_forward(&packet("203.0.113.9", "10.0.2.1", false)),
        "what touches no local pod passes as in the full table"
    );
    // Every local address pending, the guard's bindings kept, no policy's or group's chain.
    for a in ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.5"] {
        assert!(
            lock.sets[PENDING_SET_V4]
                .elements
                .contains(&Elem::Addr(ip(a))),
            "{a}"
        );
    }
    assert!(lock.sets[PENDING_SET_V6]
        .elements
        .contains(&Elem::Addr(ip("fd00:1::1"))));
    assert!(!lock.sets[PENDING_SET_V4]
        .elements
        .contains(&Elem::Addr(ip("10.0.2.1"))));
    assert_eq!(
        lock.sets[SOURCE_SET_V4].elements,
        full.sets[SOURCE_SET_V4].elements
    );
    assert!(lock.chains.keys().all(|k| full.chains.contains_key(k)));
    assert!(lock.chains.len() < full.chains.len());
    // No policy, so no group chain, nor the exemptions only group chains jump to.
    assert!(Direction::BOTH
        .iter()
        .all(|d| !lock.chains.contains_key(exempt_chain(*d))));
    // Each replaces the other in one transaction, whatever the kernel held.
    let mut k = crate::kernel_sim::KernelTable::default();
    for rs in [full, &lock, full] {
        k.apply(&rs.full_replace().json())
            .expect("full replace applies");
    }
}
