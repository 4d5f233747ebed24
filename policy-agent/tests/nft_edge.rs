//! The agent's nft edge (our table, cleanup, summary) against a real kernel, each test in a network
//! namespace of its own (unshare on the test thread: the namespace dies with it; the host's ruleset is
//! never touched). Run as root. The backends' own tests and timings live in palisade-nft.

use palisade_agent::nft::{Backend, Nft};

/// Moves this test's thread into a fresh network namespace. Fails (never skips) without root.
use palisade_testkit::netns::enter_private_netns as private_netns;

const TABLE: &str = r#"{"nftables":[
 {"add":{"table":{"family":"inet","name":"palisade"}}},
 {"delete":{"table":{"family":"inet","name":"palisade"}}},
 {"add":{"table":{"family":"inet","name":"palisade"}}},
 {"add":{"set":{"family":"inet","table":"palisade","name":"pending_v4","type":"ipv4_addr"}}},
 {"add":{"set":{"family":"inet","table":"palisade","name":"peers","type":"ipv4_addr"}}},
 {"add":{"chain":{"family":"inet","table":"palisade","name":"egress","type":"filter","hook":"postrouting","prio":90,"policy":"accept"}}},
 {"add":{"rule":{"family":"inet","table":"palisade","chain":"egress","expr":[
   {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@pending_v4"}},{"counter":null},{"drop":null}]}}}
]}"#;

fn element(op: &str, i: u32) -> String {
    format!(
        r#"{{"nftables":[{{"{op}":{{"element":{{"family":"inet","table":"palisade","name":"peers","elem":["10.{}.{}.{}"]}}}}}}]}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

fn exercise(backend: Backend) {
    private_netns();
    let nft = Nft::new(backend);
    assert_eq!(
        nft.backend(),
        backend,
        "libnftables1 must be installed for the lib backend"
    );
    assert_eq!(
        Nft::summarize_table().unwrap(),
        None,
        "fresh netns has no table"
    );
    nft.apply(TABLE).unwrap();
    let a = Nft::summarize_table().unwrap().expect("table summarised");
    assert_eq!((a.chains, a.rules, a.sets), (1, 1, 2));
    nft.apply(&element("add", 1)).unwrap();
    let b = Nft::summarize_table().unwrap().unwrap();
    assert_ne!(
        a.fingerprint, b.fingerprint,
        "a new element changes the fingerprint"
    );
    assert_eq!(b.elements, 1);
    let err = nft.apply(&element("delete", 99)).unwrap_err();
    assert!(err.to_string().contains("nft apply failed"), "{err}");
    assert!(nft.delete_table().unwrap());
    assert_eq!(Nft::summarize_table().unwrap(), None);
    assert!(
        !nft.delete_table().unwrap(),
        "deleting an absent table is fine"
    );
}

#[test]
fn exec_backend_applies_lists_rejects_and_deletes_our_table() {
    exercise(Backend::Exec);
}

#[test]
fn lib_backend_applies_lists_rejects_and_deletes_our_table() {
    exercise(Backend::Lib);
}

/// A full replace with the drift monitor running goes quiet and never wakes it; a tampering right
/// after it does (the monitor is back in the group); a monitor that could not rejoin is reopened
/// by its thread and reports an unknown change.
#[test]
fn a_quiet_full_replace_wakes_nobody_and_the_monitor_hears_again_after_it() {
    use std::sync::mpsc;
    use std::time::Duration;
    private_netns();
    let nft = Nft::new(Backend::Lib);
    let switch = nft.monitor_switch();
    let (tx, rx) = mpsc::channel();
    palisade_agent::nft::watch_drift(switch.clone(), move |d| tx.send(d.to_string()).is_ok())
        .unwrap();
    let st = palisade_policy::synth::cluster(&palisade_policy::synth::SynthConfig::small(5));
    let rs = palisade_policy::compile(&st, "n0").ruleset;
    for _ in 0..3 {
        let r = nft.replace_table(&rs, None).unwrap();
        assert_eq!(
            r.by,
            palisade_agent::nft::ReplacePath::Netlink { quiet: true },
            "{r:?}"
        );
    }
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(500)).ok(),
        None,
        "our own full replace woke the drift watch"
    );
    let out = std::process::Command::new("nft")
        .args(["add", "chain", "inet", "palisade", "foreign"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let seen = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("a tampering after a quiet replace went unheard");
    assert!(seen.contains("foreign"), "{seen}");
    switch.report_rejoin_failure();
    let seen = rx
        .recv_timeout(Duration::from_secs(3))
        .expect("a monitor that could not rejoin stayed deaf");
    assert!(seen.contains("unknown"), "{seen}");
}

/// An incremental batch large enough to go quiet (here: every batch) commits with the drift
/// monitor out of the group, all heard, and wakes nobody. (What it says when another process
/// commits meanwhile: the unit test beside `Nft::quiet_commit`.)
#[test]
fn a_quiet_incremental_batch_commits_and_wakes_nobody() {
    use palisade_agent::compiled;
    use palisade_agent::nft::Commit;
    use palisade_policy::synth::{self, Rng, SynthConfig};
    use std::sync::mpsc;
    use std::time::Duration;
    private_netns();
    let nft = Nft::new(Backend::Lib).with_quiet_batch_bytes(0);
    let (tx, rx) = mpsc::channel();
    palisade_agent::nft::watch_drift(nft.monitor_switch(), move |d| {
        tx.send(d.to_string()).is_ok()
    })
    .unwrap();
    let cfg = SynthConfig::small(5);
    let mut inc = palisade_policy::IncrementalCompiler::new(synth::cluster(&cfg), "n0");
    nft.replace_table(inc.ruleset(), None).unwrap();
    // A policy in the namespace of a pod of this node selects it: chains and rules to commit.
    let ns = inc
        .compiled()
        .pods
        .keys()
        .next()
        .and_then(|k| k.split_once('/'))
        .map(|(ns, _)| ns.to_string())
        .expect("a pod on n0");
    let mut pol = synth::make_policy(&cfg, &mut Rng::new(9), cfg.policies + 1);
    pol.namespace = ns;
    pol.pod_selector = Default::default();
    compiled::stage(
        &mut inc,
        [palisade_policy::model::Change::UpsertPolicy(pol)],
    )
    .unwrap();
    let batch = compiled::take_batch(&mut inc, &[])
        .unwrap()
        .expect("a batch");
    assert!(
        batch.elements.is_none() && batch.netlink.is_some(),
        "a batch of rules, as messages"
    );
    let before = Nft::summarize_table().unwrap().unwrap();

    assert_eq!(nft.apply_batch(&batch).unwrap(), Commit::Quiet);
    let after = Nft::summarize_table().unwrap().unwrap();
    let want = inc.ruleset().stats();
    assert_ne!(before.fingerprint, after.fingerprint, "the batch went in");
    assert_eq!(
        (after.chains as usize, after.rules as usize),
        (want.chains, want.rules)
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(300)).ok(),
        None,
        "our own quiet batch woke the drift watch"
    );
}
