//! Root test: a sequence of diffs applied to the real kernel leaves exactly the table a full
//! replace produces (compared via `nft -j list table`), in throwaway netns.

use palisade_policy::ruleset::{Batch, Ruleset};
use palisade_policy::synth::{self, Rng, SynthConfig};
use palisade_policy::{compile, diff};
use palisade_tests::{Netns, NftNs};
use serde_json::Value;

/// Seeded random change sequences on small synthetic clusters (node `n0`, 25 steps of 1–3
/// changes each): `start` gets each seed's first ruleset, `step` each step's seed, index, next
/// ruleset and the diff from the last one.
fn diff_sequences(
    seeds: &[u64],
    mut start: impl FnMut(&Ruleset),
    mut step: impl FnMut(u64, usize, &Ruleset, &Batch),
) {
    for &seed in seeds {
        let cfg = SynthConfig::small(seed);
        let mut st = synth::cluster(&cfg);
        let mut rng = Rng::new(seed);
        let mut last = compile(&st, "n0").ruleset;
        start(&last);
        for i in 0..25 {
            for j in 0..=rng.below(2) {
                let ch = synth::random_change(&cfg, &st, &mut rng, i * 4 + j);
                st.apply(ch);
            }
            let next = compile(&st, "n0").ruleset;
            let b = diff(&last, &next);
            step(seed, i, &next, &b);
            last = next;
        }
    }
}

/// This test thread in a network namespace of its own: a libnftables runner and a netlink writer
/// (the agent's kept socket) in it.
fn private_kernel() -> (palisade_nft::Nft, palisade_nft::setelem::ElementWriter) {
    palisade_testkit::netns::enter_private_netns();
    (
        palisade_nft::Nft::new(palisade_nft::Backend::Lib),
        palisade_nft::setelem::ElementWriter::new(),
    )
}

/// Commits `b` as its nfnetlink messages, as the agent does; panics naming `what` (and showing the
/// batch) when it has none or the kernel refuses them.
fn commit_as_netlink(writer: &mut palisade_nft::setelem::ElementWriter, what: &str, b: &Batch) {
    let nl = b
        .netlink
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: not encoded as netlink messages"));
    writer
        .commit_prepared("diff", "palisade", &nl.parts())
        .unwrap_or_else(|e| panic!("{what}: the kernel refused it: {e}\n{}", b.to_json_string()));
}

/// Our table as listed there, normalized by `palisade_testkit::nft`.
fn listed(nft: &palisade_nft::Nft) -> Value {
    palisade_testkit::nft::normalized(&nft.list_table("inet", "palisade").unwrap().unwrap())
}

/// What only `got` and only `want` hold, two listings normalized by `palisade_testkit::nft`
/// (objects, and each chain's rules in order).
fn differences(got: &Value, want: &Value) -> (Vec<String>, Vec<String>) {
    let items = |v: &Value| -> Vec<String> {
        let mut out: Vec<String> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .collect();
        out.extend(
            v["rules"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(c, r)| format!("{c}: {r}")),
        );
        out
    };
    let (g, w) = (items(got), items(want));
    let only = |a: &[String], b: &[String]| a.iter().filter(|x| !b.contains(x)).cloned().collect();
    (only(&g, &w), only(&w, &g))
}

#[test]
fn incremental_diffs_equal_full_replace_in_the_kernel_root() {
    let incremental = Netns::new("pal-cmp-");
    let mut changed_steps = 0;
    diff_sequences(
        &[3, 11],
        |first| {
            incremental
                .nft_load(&first.full_replace().to_json_string())
                .unwrap()
        },
        |seed, step, next, b| {
            if !b.is_empty() {
                changed_steps += 1;
                incremental
                    .nft_load(&b.to_json_string())
                    .unwrap_or_else(|e| {
                        panic!(
                            "seed {seed} step {step}: kernel rejected the diff: {e}\n{}",
                            b.to_json_string()
                        )
                    });
            }
            let fresh = Netns::new("pal-cmp-");
            fresh
                .nft_load(&next.full_replace().to_json_string())
                .unwrap();
            let (got, want) = (incremental.list_table(), fresh.list_table());
            if got != want {
                let (extra, missing) = differences(&got, &want);
                panic!("seed {seed} step {step}: kernel differs\nonly incremental: {extra:#?}\nonly full: {missing:#?}");
            }
        },
    );
    assert!(
        changed_steps > 10,
        "only {changed_steps} steps changed anything"
    );
}

/// The same sequences with each diff committed as its nfnetlink messages (as the agent commits
/// it when `Batch::netlink` is there): after every step the table lists exactly as a JSON full
/// replace of the next ruleset. Fails when a diff's netlink steps differ from its JSON ones (an
/// element left behind, a flush that misses, a rule in the wrong place).
#[test]
fn incremental_netlink_diffs_equal_full_replace_in_the_kernel_root() {
    let (nft, mut writer) = private_kernel();
    let (mut by_netlink, mut by_json) = (0, 0);
    diff_sequences(
        &[3, 11, 29],
        |first| nft.apply(&first.full_replace_text()).unwrap(),
        |seed, step, next, b| {
            match &b.netlink {
                Some(nl) => {
                    by_netlink += 1;
                    writer
                        .commit_prepared("diff", "palisade", &nl.parts())
                        .unwrap_or_else(|e| {
                            panic!(
                                "seed {seed} step {step}: kernel rejected the netlink diff: {e}\n{}",
                                b.to_json_string()
                            )
                        });
                }
                None if !b.is_empty() => {
                    by_json += 1;
                    nft.apply(&b.to_json_string()).unwrap();
                }
                None => {}
            }
            let got = listed(&nft);
            nft.apply(&next.full_replace_text()).unwrap();
            let want = listed(&nft);
            if got != want {
                let (extra, missing) = differences(&got, &want);
                panic!(
                    "seed {seed} step {step}: the netlink diff left another table\nbatch: {}\nonly netlink: {extra:#?}\nonly full: {missing:#?}",
                    b.to_json_string()
                );
            }
        },
    );
    // Every diff of these sequences can be encoded (interval sets changed in place included:
    // they are flushed and written whole).
    assert!(
        by_netlink > 20 && by_json == 0,
        "{by_netlink} diffs went as netlink messages, {by_json} as JSON"
    );
}

/// A repair of touched chains and sets (`Ruleset::repair`), committed as its nfnetlink messages as
/// the agent commits it, puts the table back as a full replace lists it, whatever was done to
/// them: a chain flushed, a foreign rule inserted, sets emptied, a foreign element added.
#[test]
fn a_repair_committed_as_netlink_messages_restores_what_was_tampered_with_root() {
    let (nft, mut writer) = private_kernel();
    let cfg = SynthConfig::small(7);
    let rs = compile(&synth::cluster(&cfg), "n0").ruleset;
    nft.apply(&rs.full_replace_text()).unwrap();
    let want = listed(&nft);
    let chain = rs
        .chains
        .values()
        .find(|c| c.rules.len() > 1)
        .expect("a chain with rules");
    let set = rs
        .sets
        .values()
        .find(|s| {
            s.key == palisade_policy::ruleset::SetKey::Ipv4
                && !s.interval
                && !s.verdict_map
                && s.elements.len() > 1
        })
        .expect("a plain IPv4 set with elements");
    let interval = rs
        .sets
        .values()
        .find(|s| s.interval && !s.elements.is_empty())
        .expect("an interval set with elements");
    let tamper = [
        format!("flush chain inet palisade {}", chain.name),
        format!("insert rule inet palisade {} accept", chain.name),
        format!("flush set inet palisade {}", set.name),
        format!("add element inet palisade {} {{ 203.0.113.99 }}", set.name),
        format!("flush set inet palisade {}", interval.name),
    ];
    for t in &tamper {
        palisade_testkit::nft::load_here(t);
    }
    assert_ne!(
        listed(&nft),
        want,
        "control: the tampering changed the table"
    );
    let chains = [chain.name.clone()].into();
    let sets = [set.name.clone(), interval.name.clone()].into();
    let repair = rs.repair(&chains, &sets).expect("our own objects");
    commit_as_netlink(&mut writer, "the repair", &repair);
    let got = listed(&nft);
    if got != want {
        let (extra, missing) = differences(&got, &want);
        panic!("the repair left another table\nonly repaired: {extra:#?}\nonly full: {missing:#?}");
    }
}

/// A set is declared with a size (`Set::size`, a limit the kernel cannot change), so one that
/// outgrows it is deleted and added again in the diff's transaction, with every rule naming it
/// (here a policy chain's peer set and the base chains' verdict maps). Clients join one by one, half
/// of them on this node, until the peer set has crossed 12, 24 and 48: each diff commits as its
/// nfnetlink messages and as JSON, and the table then lists as a full replace does. Fails when a
/// set is not recreated (ENFILE) or its rules are not written again (a missing or stale rule).
#[test]
fn sets_that_outgrow_their_size_are_recreated_with_their_rules_root() {
    use palisade_policy::scenarios::Scenario;
    let (nft, mut writer) = private_kernel();
    let by_json = Netns::new("pal-size-");
    let mut sc = Scenario::new()
        .pod("a/server", "n1", &["10.244.1.2"], &[("app", "server")], &[])
        .policy(
            "a",
            "from-clients",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}),
        )
        .policy(
            "a",
            "clients-out",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]}),
        );
    let mut last = compile(&sc.st, "n1").ruleset;
    nft.apply(&last.full_replace_text()).unwrap();
    by_json
        .nft_load(&last.full_replace().to_json_string())
        .unwrap();
    let mut resized = std::collections::BTreeSet::new();
    for i in 0..70u32 {
        let (node, net) = if i % 2 == 0 { ("n1", 1) } else { ("n2", 2) };
        let ip = format!("10.244.{net}.{}", 10 + i);
        sc = sc.pod(
            &format!("a/client{i}"),
            node,
            &[&ip],
            &[("app", "client")],
            &[],
        );
        let next = compile(&sc.st, "n1").ruleset;
        let b = diff(&last, &next);
        for s in b.recreated_sets() {
            resized.insert(format!("{s} at {}", next.sets[&s].elements.len()));
        }
        commit_as_netlink(&mut writer, &format!("client {i}: the diff"), &b);
        by_json.nft_load(&b.to_json_string()).unwrap_or_else(|e| {
            panic!(
                "client {i}: kernel rejected the diff: {e}\n{}",
                b.to_json_string()
            )
        });
        let got = listed(&nft);
        nft.apply(&next.full_replace_text()).unwrap();
        let want = listed(&nft);
        if got != want {
            let (extra, missing) = differences(&got, &want);
            panic!("client {i}: the netlink diff left another table\nonly netlink: {extra:#?}\nonly full: {missing:#?}");
        }
        last = next;
    }
    let fresh = Netns::new("pal-size-");
    fresh
        .nft_load(&last.full_replace().to_json_string())
        .unwrap();
    assert_eq!(
        by_json.list_table(),
        fresh.list_table(),
        "the JSON diffs left another table"
    );
    // The peer sets (12, 24, 48 crossed) and this node's maps (12, 24) at least.
    assert!(resized.len() >= 5, "sets resized: {resized:?}");
}

/// A set keeps the size it was declared with as it shrinks, and the incremental compiler counts on
/// it (`DeclaredSizes`): a peer set whose count moves back and forth across a size boundary (24 |
/// 25) is recreated at the first crossing upward only, each batch committed as nfnetlink messages
/// into the same table, never replaced in full. Fails when the kernel refuses a batch (a set
/// counted on at a size it does not hold fills up: ENFILE), when the table then lists otherwise
/// than a full replace, or when the set is recreated again.
#[test]
fn a_set_moving_back_and_forth_across_its_size_is_recreated_once_root() {
    use palisade_policy::model::Change;
    use palisade_policy::scenarios::Scenario;
    use palisade_policy::IncrementalCompiler;
    let (nft, mut writer) = private_kernel();
    let full = Netns::new("pal-size-");
    let server = serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]});
    let mut sc = Scenario::new()
        .pod("a/server", "n1", &["10.244.1.2"], &[("app", "server")], &[])
        .policy("a", "from-clients", server);
    let client = |sc: Scenario, i: u32| {
        let ip = format!("10.244.2.{}", 10 + i);
        sc.pod(&format!("a/c{i}"), "n2", &[&ip], &[("app", "client")], &[])
    };
    for i in 0..24 {
        sc = client(sc, i);
    }
    let mut inc = IncrementalCompiler::new(sc.st.clone(), "n1");
    nft.apply(&inc.ruleset().full_replace_text()).unwrap();
    let peers = inc
        .ruleset()
        .sets
        .values()
        .find(|s| s.name.starts_with("peer_") && s.elements.len() == 24)
        .map(|s| s.name.clone())
        .expect("the policy's peer set of 24 clients");
    let sc_after = client(sc, 24);
    let c24 = sc_after.st.pods["a/c24"].clone();
    let mut recreated = 0;
    for round in 0..4 {
        for (what, change) in [
            ("25 clients", Change::UpsertPod(c24.clone())),
            (
                "24 clients",
                Change::DeletePod {
                    namespace: "a".into(),
                    name: "c24".into(),
                },
            ),
        ] {
            let what = format!("round {round}, {what}");
            let b = inc.apply(change);
            commit_as_netlink(&mut writer, &what, &b);
            recreated += usize::from(b.recreated_sets().contains(&peers));
            full.nft_load(&inc.ruleset().full_replace().to_json_string())
                .unwrap();
            let (got, want) = (listed(&nft), full.list_table());
            if got != want {
                let (extra, missing) = differences(&got, &want);
                panic!("{what}: the table differs from a full replace\nonly here: {extra:#?}\nonly full: {missing:#?}");
            }
        }
    }
    assert_eq!(recreated, 1, "the peer set was recreated {recreated} times");
    // The kernel holds it at 48: growing to 48 fits, the 49th client recreates it (counting on
    // a larger size than the kernel's would fill it: ENFILE, the commit refused).
    let mut sc = sc_after;
    for i in 24..49 {
        sc = client(sc, i);
        let pod = sc.st.pods[format!("a/c{i}").as_str()].clone();
        let what = format!("{} clients", i + 1);
        let b = inc.apply(Change::UpsertPod(pod));
        commit_as_netlink(&mut writer, &what, &b);
        assert_eq!(b.recreated_sets().contains(&peers), i == 48, "{what}");
    }
    assert_eq!(listed(&nft), {
        full.nft_load(&inc.ruleset().full_replace().to_json_string())
            .unwrap();
        full.list_table()
    });
}
