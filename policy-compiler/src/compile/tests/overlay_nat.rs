//! The overlay's chains (outer packets' verdicts, untracking, who may send to its port) and
//! egress NAT.

use super::*;

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
