//! The named-counter dump against a real kernel, each test in a network namespace of its own
//! (unshare on the test thread; the host's ruleset is never touched). The counters are made with
//! the `nft` binary and the dump is checked against nft's own listing. Run as root; without root
//! they fail, never skip.

use palisade_nft::counters;
use std::collections::HashMap;

/// One read by a reader of its own (the agent keeps one; a new socket per read is what it avoids).
fn read_once() -> HashMap<String, u64> {
    counters::CounterReader::new("inet", "palisade")
        .packets()
        .unwrap()
}

use palisade_testkit::netns::enter_private_netns as private_netns;
use palisade_testkit::nft::{list_here, load_here as nft};

/// Packets of each named counter of `table inet palisade`, as `nft -j list counters` shows them.
fn listed() -> HashMap<String, u64> {
    list_here(&["counters", "table", "inet", "palisade"])
        .iter()
        .filter_map(|i| i.get("counter"))
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_dump_reads_every_named_counter_of_our_table_and_only_those() {
    private_netns();
    // Enough counters that the dump spans many datagrams, with packets set at creation; a
    // quota object and another table's counter that must not be read.
    let mut script = String::from("table inet palisade {\n");
    for i in 0..3000 {
        script.push_str(&format!(
            " counter cnt_{i} {{ packets {} bytes {} }}\n",
            i * 7,
            i * 700
        ));
    }
    script.push_str(" quota q { 1000 bytes }\n}\n");
    script.push_str("table inet other {\n counter cnt_0 { packets 99 bytes 1 }\n}\n");
    nft(&script);
    let got = read_once();
    assert_eq!(got.len(), 3000);
    assert_eq!(got["cnt_2999"], 2999 * 7);
    assert_eq!(got, listed());
}

#[test]
fn a_missing_table_has_no_counters() {
    private_netns();
    assert!(read_once().is_empty());
    nft("table ip palisade {\n counter cnt_a { packets 1 bytes 1 }\n}\n");
    assert!(read_once().is_empty());
}

#[test]
fn a_kept_reader_reads_each_state_of_the_table_over_one_socket() {
    private_netns();
    let mut reader = counters::CounterReader::new("inet", "palisade");
    assert!(reader.packets().unwrap().is_empty(), "no table yet");
    nft("table inet palisade {\n counter cnt_a { packets 5 bytes 1 }\n}\n");
    assert_eq!(reader.packets().unwrap()["cnt_a"], 5);
    nft("delete table inet palisade\ntable inet palisade {\n counter cnt_b { packets 7 bytes 1 }\n counter cnt_c { packets 9 bytes 1 }\n}\n");
    let got = reader.packets().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got["cnt_b"], got["cnt_c"]), (7, 9));
    nft("delete table inet palisade\n");
    assert!(reader.packets().unwrap().is_empty(), "table gone");
    assert_eq!(reader.packets().unwrap(), read_once());
}
