//! The agent's nft edge (our table, cleanup, summary) against a real kernel, each test in a network
//! namespace of its own (unshare on the test thread: the namespace dies with it; the host's ruleset is
//! never touched). Run as root. The backends' own tests and timings live in palisade-nft.

use palisade_agent::nft::{summarize, Backend, Nft};

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
    assert_eq!(nft.list_table().unwrap(), None, "fresh netns has no table");
    nft.apply(TABLE).unwrap();
    let listed = nft.list_table().unwrap().expect("table listed after apply");
    let a = summarize(&listed).unwrap();
    assert_eq!((a.chains, a.rules, a.sets), (1, 1, 2));
    nft.apply(&element("add", 1)).unwrap();
    let b = summarize(&nft.list_table().unwrap().unwrap()).unwrap();
    assert_ne!(
        a.fingerprint, b.fingerprint,
        "a new element changes the fingerprint"
    );
    assert_eq!(b.elements, 1);
    let err = nft.apply(&element("delete", 99)).unwrap_err();
    assert!(err.to_string().contains("nft apply failed"), "{err}");
    assert!(nft.delete_table().unwrap());
    assert_eq!(nft.list_table().unwrap(), None);
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
