//! What an operator sees: the flow log's drops and allows, and policies in audit mode.

use super::*;

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
