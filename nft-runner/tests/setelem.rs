//! The nfnetlink set element client against a real kernel, each test in a network namespace of its
//! own (unshare on the test thread: the namespace dies with the thread; the host's ruleset is never
//! touched). The table is made and read back with the `nft` binary, so the client is checked against
//! nft's own view. Run as root; without root they fail, never skip.

use palisade_nft::setelem::{self, SetOp};
use palisade_nft::Error;
use std::net::IpAddr;

const FAMILY: &str = "inet";
const TABLE: &str = "palisade";
const V4: &str = "pending_v4";
const V6: &str = "pending_v6";

// Moves this test's thread into a fresh network namespace (children it spawns inherit it).
use palisade_testkit::netns::enter_private_netns as private_netns;
use palisade_testkit::nft::{list_here, load_here as nft};

fn make_table() {
    nft("table inet palisade {\n set pending_v4 { type ipv4_addr; }\n set pending_v6 { type ipv6_addr; }\n}\n");
}

/// The `elem` of a set as `nft -j list set` shows it (`Null` when the set is empty).
fn listed_elem(set: &str) -> serde_json::Value {
    list_here(&["set", FAMILY, TABLE, set])
        .iter()
        .find_map(|i| i.get("set"))
        .expect("a set in the listing")["elem"]
        .clone()
}

/// The elements of an address set as `nft -j list set` shows them, sorted.
fn listed(set: &str) -> Vec<IpAddr> {
    let mut elems: Vec<IpAddr> = listed_elem(set)
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| x.as_str().unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    elems.sort();
    elems
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn adds_and_deletes_v4_and_v6_elements_in_one_batch() {
    private_netns();
    make_table();
    setelem::apply(
        FAMILY,
        TABLE,
        &[
            (SetOp::Add, V4, ip("10.1.0.2").into()),
            (SetOp::Add, V4, ip("10.1.0.3").into()),
            (SetOp::Add, V6, ip("fd00::2").into()),
        ],
    )
    .unwrap();
    assert_eq!(listed(V4), vec![ip("10.1.0.2"), ip("10.1.0.3")]);
    assert_eq!(listed(V6), vec![ip("fd00::2")]);

    // Adding what is there is fine; delete one of each.
    setelem::apply(
        FAMILY,
        TABLE,
        &[
            (SetOp::Add, V4, ip("10.1.0.2").into()),
            (SetOp::Delete, V4, ip("10.1.0.3").into()),
            (SetOp::Delete, V6, ip("fd00::2").into()),
        ],
    )
    .unwrap();
    assert_eq!(listed(V4), vec![ip("10.1.0.2")]);
    assert_eq!(listed(V6), Vec::<IpAddr>::new());
}

#[test]
fn add_then_delete_removes_an_element_whether_or_not_it_was_there() {
    private_netns();
    make_table();
    setelem::apply(FAMILY, TABLE, &[(SetOp::Add, V4, ip("10.1.0.2").into())]).unwrap();
    for _ in 0..2 {
        setelem::apply(
            FAMILY,
            TABLE,
            &[
                (SetOp::Add, V4, ip("10.1.0.2").into()),
                (SetOp::Delete, V4, ip("10.1.0.2").into()),
            ],
        )
        .unwrap();
        assert_eq!(listed(V4), Vec::<IpAddr>::new());
    }
}

#[test]
fn concatenated_keys_land_as_the_elements_nft_lists() {
    use palisade_nft::setelem::Key;
    private_netns();
    nft("table inet palisade {\n set sources_v4 { type ifname . ipv4_addr; }\n set sources_v6 { type ifname . ipv6_addr; }\n set self_v4 { type ipv4_addr . ipv4_addr; }\n set self_v6 { type ipv6_addr . ipv6_addr; }\n}\n");
    setelem::apply(
        FAMILY,
        TABLE,
        &[
            (
                SetOp::Add,
                "sources_v4",
                Key::IfnameAddr("palab12", ip("10.1.0.2")),
            ),
            (
                SetOp::Add,
                "sources_v6",
                Key::IfnameAddr("palab12", ip("fd00::2")),
            ),
            (
                SetOp::Add,
                "self_v4",
                Key::AddrPair(ip("10.1.0.2"), ip("10.1.0.2")),
            ),
            (
                SetOp::Add,
                "self_v6",
                Key::AddrPair(ip("fd00::2"), ip("fd00::2")),
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        listed_elem("sources_v4"),
        serde_json::json!([{"concat": ["palab12", "10.1.0.2"]}])
    );
    assert_eq!(
        listed_elem("sources_v6"),
        serde_json::json!([{"concat": ["palab12", "fd00::2"]}])
    );
    assert_eq!(
        listed_elem("self_v4"),
        serde_json::json!([{"concat": ["10.1.0.2", "10.1.0.2"]}])
    );
    assert_eq!(
        listed_elem("self_v6"),
        serde_json::json!([{"concat": ["fd00::2", "fd00::2"]}])
    );
    // And they go again by the same keys.
    setelem::apply(
        FAMILY,
        TABLE,
        &[
            (
                SetOp::Delete,
                "sources_v4",
                Key::IfnameAddr("palab12", ip("10.1.0.2")),
            ),
            (
                SetOp::Delete,
                "self_v6",
                Key::AddrPair(ip("fd00::2"), ip("fd00::2")),
            ),
        ],
    )
    .unwrap();
    assert_eq!(listed_elem("sources_v4"), serde_json::Value::Null);
    assert_eq!(listed_elem("self_v6"), serde_json::Value::Null);
}

#[test]
fn a_missing_table_or_set_is_the_absent_error_and_the_probe_says_false() {
    private_netns();
    let err =
        setelem::apply(FAMILY, TABLE, &[(SetOp::Add, V4, ip("10.1.0.2").into())]).unwrap_err();
    assert!(matches!(err, Error::Absent { .. }), "{err}");
    assert!(err.is_absent());
    assert!(!setelem::set_exists(FAMILY, TABLE, V4).unwrap());

    make_table();
    assert!(setelem::set_exists(FAMILY, TABLE, V4).unwrap());
    assert!(setelem::set_exists(FAMILY, TABLE, V6).unwrap());
    assert!(!setelem::set_exists(FAMILY, TABLE, "nope").unwrap());
    let err = setelem::apply(
        FAMILY,
        TABLE,
        &[(SetOp::Add, "nope", ip("10.1.0.2").into())],
    )
    .unwrap_err();
    assert!(matches!(err, Error::Absent { .. }), "{err}");
}

#[test]
fn a_batch_whose_second_op_fails_leaves_the_first_undone() {
    private_netns();
    make_table();
    let err = setelem::apply(
        FAMILY,
        TABLE,
        &[
            (SetOp::Add, V4, ip("10.1.0.2").into()),
            (SetOp::Add, "nope", ip("10.1.0.3").into()),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, Error::Absent { .. }), "{err}");
    assert_eq!(
        listed(V4),
        Vec::<IpAddr>::new(),
        "the first add must have been rolled back"
    );

    // Another reason to fail: deleting an element that is not there, after a valid add.
    let err = setelem::apply(
        FAMILY,
        TABLE,
        &[
            (SetOp::Add, V6, ip("fd00::2").into()),
            (SetOp::Delete, V4, ip("10.9.9.9").into()),
        ],
    )
    .unwrap_err();
    assert!(err.is_absent(), "{err}");
    assert_eq!(listed(V6), Vec::<IpAddr>::new());
}

#[test]
fn a_key_of_the_wrong_length_is_a_netlink_error_with_the_errno_text() {
    private_netns();
    make_table();
    let err = setelem::apply(FAMILY, TABLE, &[(SetOp::Add, V4, ip("fd00::2").into())]).unwrap_err();
    assert!(matches!(err, Error::Netlink { .. }), "{err}");
    assert!(!err.is_absent());
    eprintln!("{err}");
    assert!(err.to_string().contains("os error"), "{err}");
    assert_eq!(listed(V4), Vec::<IpAddr>::new());
}

#[test]
fn the_element_probe_sees_exactly_the_elements_nft_lists_and_false_without_table() {
    private_netns();
    assert!(!setelem::element_exists(FAMILY, TABLE, V4, ip("10.1.0.2")).unwrap());
    make_table();
    setelem::apply(
        FAMILY,
        TABLE,
        &[
            (SetOp::Add, V4, ip("10.1.0.2").into()),
            (SetOp::Add, V6, ip("fd00::2").into()),
        ],
    )
    .unwrap();
    assert_eq!(listed(V4), vec![ip("10.1.0.2")]);
    assert!(setelem::element_exists(FAMILY, TABLE, V4, ip("10.1.0.2")).unwrap());
    assert!(setelem::element_exists(FAMILY, TABLE, V6, ip("fd00::2")).unwrap());
    assert!(!setelem::element_exists(FAMILY, TABLE, V4, ip("10.1.0.3")).unwrap());
    assert!(!setelem::element_exists(FAMILY, TABLE, V6, ip("fd00::3")).unwrap());
    assert!(!setelem::element_exists(FAMILY, TABLE, "nope", ip("10.1.0.2")).unwrap());
    setelem::apply(FAMILY, TABLE, &[(SetOp::Delete, V4, ip("10.1.0.2").into())]).unwrap();
    assert!(!setelem::element_exists(FAMILY, TABLE, V4, ip("10.1.0.2")).unwrap());
}
