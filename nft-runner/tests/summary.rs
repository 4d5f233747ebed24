//! `summary::table` against a real kernel, in a network namespace of the test thread's own: what
//! the fingerprint sees (every change to rules, chains, sets, elements, objects, table flags) and
//! what it must not (counter and quota values, handles, the unhashed sets' elements, a hash set
//! refilled in another order). Run as root; without root they fail, never skip.

use palisade_nft::summary::{self, TableSummary};
use palisade_testkit::netns::enter_private_netns;
use palisade_testkit::nft::load_here;

const TABLE: &str = "table inet t {
  counter c_a { packets 5 bytes 300 }
  quota q_a { over 1 mbytes used 10 kbytes }
  set pending_v4 { type ipv4_addr; }
  set peers { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2, 10.0.0.3 } }
  set blocks { type ipv4_addr; flags interval; elements = { 10.1.0.0/16, 10.3.0.0/16 } }
  map dispatch { type ipv4_addr : verdict; elements = { 10.0.0.1 : jump allow } }
  chain allow { counter packets 7 bytes 420 accept; }
  chain egress {
    type filter hook postrouting priority 90; policy accept;
    ip saddr @pending_v4 counter packets 1 bytes 60 drop
    ip daddr vmap @dispatch
    ip daddr @blocks counter name c_a drop
  }
}
";

fn summarize() -> TableSummary {
    summary::table("inet", "t", &["pending_v4"])
        .expect("summary")
        .expect("table present")
}

/// The table loaded afresh after `delete table` (new handles), changed by `then`.
fn fresh(then: &str) -> TableSummary {
    load_here("table inet t\ndelete table inet t\n");
    load_here(TABLE);
    if !then.is_empty() {
        load_here(then);
    }
    summarize()
}

#[test]
fn a_summary_counts_the_table_and_absence_is_none() {
    enter_private_netns();
    assert_eq!(summary::table("inet", "t", &["pending_v4"]).unwrap(), None);
    assert!(!summary::exists("inet", "t").unwrap());
    load_here(TABLE);
    assert!(summary::exists("inet", "t").unwrap());
    assert!(
        !summary::exists("ip", "t").unwrap(),
        "another family's table of that name"
    );
    load_here("add element inet t pending_v4 { 10.9.0.1, 10.9.0.2 }");
    let s = summarize();
    assert_eq!((s.chains, s.rules, s.sets), (2, 4, 4));
    // peers 3, blocks 2 intervals, dispatch 1, pending 2.
    assert_eq!((s.elements, s.pending), (8, 2));
    load_here("delete table inet t");
    assert_eq!(summary::table("inet", "t", &[]).unwrap(), None);
    assert!(!summary::exists("inet", "t").unwrap());
    assert!(summary::table("inet", "t; flush ruleset", &[]).is_err());
}

#[test]
fn the_fingerprint_ignores_counts_handles_pending_marks_and_element_order() {
    enter_private_netns();
    let base = fresh("");
    let same = [
        (
            "counter and quota values",
            "reset counters table inet t\nreset quotas table inet t",
        ),
        (
            "the unhashed set's elements",
            "add element inet t pending_v4 { 10.9.0.1 }",
        ),
        (
            "the same elements added in another order",
            "flush set inet t peers\nadd element inet t peers { 10.0.0.3 }\nadd element inet t peers { 10.0.0.1, 10.0.0.2 }",
        ),
    ];
    for (what, change) in same {
        let s = fresh(change);
        assert_eq!(
            s.fingerprint, base.fingerprint,
            "{what} changed the fingerprint"
        );
    }
}

#[test]
fn the_fingerprint_sees_every_kind_of_change() {
    enter_private_netns();
    let base = fresh("");
    let changes = [
        ("a rule inserted", "insert rule inet t egress accept"),
        ("a rule deleted", "flush chain inet t allow"),
        ("a chain added", "add chain inet t extra"),
        ("a chain's policy", "add chain inet t egress { type filter hook postrouting priority 90; policy drop; }"),
        ("an element added", "add element inet t peers { 10.0.0.9 }"),
        ("an element deleted", "delete element inet t peers { 10.0.0.2 }"),
        ("an interval changed", "delete element inet t blocks { 10.3.0.0/16 }\nadd element inet t blocks { 10.3.0.0/15 }"),
        ("a verdict changed", "delete element inet t dispatch { 10.0.0.1 }\nadd element inet t dispatch { 10.0.0.1 : drop }"),
        ("a set added", "add set inet t more { type ipv4_addr; }"),
        ("an object added", "add counter inet t c_b"),
        ("the table's flags", "add table inet t { flags dormant; }"),
    ];
    for (what, change) in changes {
        let s = fresh(change);
        assert_ne!(s.fingerprint, base.fingerprint, "{what} went unseen");
    }
}
