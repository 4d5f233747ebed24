//! Both backends against a real kernel, each test in a network namespace of its own (unshare on the
//! test thread, before the runner is created: the namespace dies with the thread; the host's ruleset is
//! never touched). Run as root; without root they fail, never skip.

use palisade_nft::{Backend, Nft};
use std::time::{Duration, Instant};

/// Moves this test's thread into a fresh network namespace.
use palisade_testkit::netns::enter_private_netns as private_netns;

const FAMILY: &str = "inet";
const TABLE_NAME: &str = "t";

const TABLE: &str = r#"{"nftables":[
 {"add":{"table":{"family":"inet","name":"t"}}},
 {"add":{"set":{"family":"inet","table":"t","name":"pending_v4","type":"ipv4_addr"}}},
 {"add":{"set":{"family":"inet","table":"t","name":"peers","type":"ipv4_addr"}}},
 {"add":{"chain":{"family":"inet","table":"t","name":"egress","type":"filter","hook":"postrouting","prio":90,"policy":"accept"}}},
 {"add":{"rule":{"family":"inet","table":"t","chain":"egress","expr":[
   {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@pending_v4"}},{"counter":null},{"drop":null}]}}}
]}"#;

fn element(op: &str, set: &str, i: u32) -> String {
    format!(
        r#"{{"nftables":[{{"{op}":{{"element":{{"family":"inet","table":"t","name":"{set}","elem":["10.{}.{}.{}"]}}}}}}]}}"#,
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
    assert_eq!(nft.list_table(FAMILY, TABLE_NAME).unwrap(), None);
    assert_eq!(
        nft.list_set(FAMILY, TABLE_NAME, "pending_v4").unwrap(),
        None
    );
    let err = nft.apply(&element("add", "pending_v4", 1)).unwrap_err();
    assert!(
        err.is_absent(),
        "adding to a missing table is absence: {err}"
    );

    nft.apply(TABLE).unwrap();
    let listed = nft
        .list_table(FAMILY, TABLE_NAME)
        .unwrap()
        .expect("table listed");
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let items = v["nftables"].as_array().unwrap();
    assert_eq!(items.iter().filter(|i| i.get("set").is_some()).count(), 2);
    assert_eq!(items.iter().filter(|i| i.get("rule").is_some()).count(), 1);
    assert!(nft
        .list_set(FAMILY, TABLE_NAME, "pending_v4")
        .unwrap()
        .is_some());
    assert_eq!(nft.list_set(FAMILY, TABLE_NAME, "nope").unwrap(), None);

    nft.apply(&element("add", "pending_v4", 1)).unwrap();
    let set = nft
        .list_set(FAMILY, TABLE_NAME, "pending_v4")
        .unwrap()
        .unwrap();
    assert!(set.contains("10.0.0.1"), "{set}");
    let err = nft.apply(&element("add", "nope", 1)).unwrap_err();
    assert!(err.is_absent(), "a missing set is absence: {err}");
    let err = nft
        .apply(r#"{"nftables":[{"add":{"bogus":{}}}]}"#)
        .unwrap_err();
    assert!(!err.is_absent(), "a malformed batch is not absence: {err}");
    assert!(err.to_string().starts_with("nft apply failed: "), "{err}");

    nft.apply(r#"{"nftables":[{"delete":{"table":{"family":"inet","name":"t"}}}]}"#)
        .unwrap();
    assert_eq!(nft.list_table(FAMILY, TABLE_NAME).unwrap(), None);
}

#[test]
fn exec_backend_applies_lists_and_reports_absence() {
    exercise(Backend::Exec);
}

#[test]
fn lib_backend_applies_lists_and_reports_absence() {
    exercise(Backend::Lib);
}

/// Times N one-element transactions per backend. Prints the numbers; fails only if lib is not faster
/// (the reason it exists).
#[test]
fn lib_backend_is_cheaper_per_small_transaction_than_exec() {
    private_netns();
    const N: u32 = 200;
    let mut per_tx = Vec::new();
    for backend in [Backend::Exec, Backend::Lib] {
        let opened = Instant::now();
        let nft = Nft::new(backend);
        let open = opened.elapsed();
        nft.apply(
            r#"{"nftables":[{"add":{"table":{"family":"inet","name":"t"}}},{"delete":{"table":{"family":"inet","name":"t"}}}]}"#,
        )
        .unwrap();
        nft.apply(TABLE).unwrap();
        let start = Instant::now();
        for i in 0..N {
            nft.apply(&element("add", "peers", i)).unwrap();
        }
        let took = start.elapsed() / N;
        let list_start = Instant::now();
        nft.list_table(FAMILY, TABLE_NAME).unwrap().unwrap();
        let list = list_start.elapsed();
        let big: Vec<String> = (0..5000u32)
            .map(|i| format!("\"10.{}.{}.{}\"", 100 + (i >> 16), (i >> 8) & 255, i & 255))
            .collect();
        let big = format!(
            r#"{{"nftables":[{{"add":{{"element":{{"family":"inet","table":"t","name":"peers","elem":[{}]}}}}}}]}}"#,
            big.join(",")
        );
        let big_start = Instant::now();
        nft.apply(&big).unwrap();
        let big_took = big_start.elapsed();
        eprintln!(
            "nft {backend:?}: open {open:?}, {took:?} per one-element transaction, {big_took:?} for one 5000-element transaction, list table ({N} elements) {list:?}"
        );
        per_tx.push(took);
    }
    assert!(
        per_tx[1] < per_tx[0],
        "lib {:?} not faster than exec {:?}",
        per_tx[1],
        per_tx[0]
    );
    assert!(per_tx[1] < Duration::from_millis(5));
}

/// A transaction large enough to make the lib backend replace its context (to drop libnftables' cache)
/// leaves a runner that still acts on the same namespace: later commits and listings see the table.
#[test]
fn lib_backend_keeps_working_in_its_namespace_after_a_large_transaction() {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    assert_eq!(
        nft.backend(),
        Backend::Lib,
        "libnftables1 must be installed"
    );
    nft.apply(TABLE).unwrap();
    let elems: Vec<String> = (0..8000u32)
        .map(|i| format!("\"10.{}.{}.{}\"", (i >> 16) & 255, (i >> 8) & 255, i & 255))
        .collect();
    let big = format!(
        r#"{{"nftables":[{{"add":{{"element":{{"family":"inet","table":"t","name":"peers","elem":[{}]}}}}}}]}}"#,
        elems.join(",")
    );
    assert!(big.len() > 64 * 1024, "the transaction must be large");
    nft.apply(&big).unwrap();
    let listed = nft
        .list_set(FAMILY, TABLE_NAME, "peers")
        .unwrap()
        .expect("set listed after the large transaction");
    assert!(listed.contains("10.0.31.63"), "last element listed");
    nft.apply(&element("add", "pending_v4", 7)).unwrap();
    let set = nft
        .list_set(FAMILY, TABLE_NAME, "pending_v4")
        .unwrap()
        .unwrap();
    assert!(set.contains("10.0.0.7"), "{set}");
}
