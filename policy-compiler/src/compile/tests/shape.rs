//! The ruleset's shape: base and group chains as documented, names and comments, explain agreeing
//! with the rulesets, and the sets rules share.

use super::*;

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
fn group_chains_start_with_the_node_and_self_exemptions_held_once() {
    let mut w = W::new();
    w.pod("a/x", N1, &["10.0.1.1"], &[("app", "x")]);
    w.pod("a/y", N1, &["10.0.1.2"], &[("app", "y")]);
    w.policy(
        "a/p",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress", "Egress"]}),
    );
    w.policy(
        "a/q",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let rs = compiled(&w).ruleset;
    // From a pod's veth only: the source guard says a source there is the pod's own, where any
    // host that routes to the pod can write source and destination.
    let is_self = |r: &crate::ruleset::Rule, fam: Family| {
        r.stmts[0] == Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.to_string())
            && matches!(&r.stmts[1], Stmt::SelfTraffic { family, .. } if *family == fam)
    };
    let ing = &rs.chains[CHAIN_EXEMPT_IN].rules;
    assert_eq!(ing.len(), 3);
    assert_eq!(
        ing[0].stmts,
        vec![Stmt::NoInputInterface, Stmt::FibSaddrLocal, Stmt::Accept],
        "from this node: sent by it, not only claiming its address"
    );
    assert!(is_self(&ing[1], Family::V4));
    assert!(is_self(&ing[2], Family::V6));
    let eg = &rs.chains[CHAIN_EXEMPT_EG].rules;
    assert_eq!(eg.len(), 2);
    assert!(is_self(&eg[0], Family::V4));
    assert!(is_self(&eg[1], Family::V6));
    // Every group chain (two groups here: x is selected by both policies, y by one) jumps there
    // first, then to its policies; none holds a copy of the exemptions.
    for (keys, dir) in [
        (
            vec!["a/p".to_string(), "a/q".to_string()],
            Direction::Ingress,
        ),
        (vec!["a/q".to_string()], Direction::Ingress),
        (
            vec!["a/p".to_string(), "a/q".to_string()],
            Direction::Egress,
        ),
        (vec!["a/q".to_string()], Direction::Egress),
    ] {
        let group = &rs.chains[&group_chain(&keys, &[], &[], &[], dir)].rules;
        assert_eq!(
            group[0].stmts,
            vec![Stmt::Jump(exempt_chain(dir).to_string())]
        );
        assert_eq!(
            group[1].stmts,
            vec![Stmt::Jump(policy_chain(&keys[0], dir))]
        );
    }
    let copies = rs
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .filter(|r| {
            r.stmts
                .iter()
                .any(|s| matches!(s, Stmt::SelfTraffic { .. }))
        })
        .count();
    assert_eq!(
        copies, 4,
        "the self rules are in the two exemption chains only"
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
