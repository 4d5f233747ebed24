//! The classification on byte fixtures laid out as the kernel sends them (no root, no kernel).

use super::*;

const INET: u8 = 1;
const IP: u8 = 2;
const OURS: u32 = 4242;
const NFT: u32 = 777;

// nf_tables message kinds
const NEWTABLE: u8 = 0;
const DELTABLE: u8 = 2;
const NEWCHAIN: u8 = 3;
const NEWRULE: u8 = 6;
const DELRULE: u8 = 8;
const NEWSETELEM: u8 = 12;
const DELSETELEM: u8 = 14;
const NEWGEN: u8 = 15;

fn attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(buf, ty, &v);
}

/// One notification: nlmsghdr (portid = committer), nfgenmsg, attributes.
fn msg(kind: u8, family: u8, portid: u32, attrs: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut body = vec![family, 0, 0, 0];
    attrs(&mut body);
    let mut m = Vec::new();
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&((10u16 << 8) | kind as u16).to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&portid.to_ne_bytes());
    m.extend_from_slice(&body);
    m
}

fn table(kind: u8, family: u8, portid: u32, name: &str) -> Vec<u8> {
    msg(kind, family, portid, |b| strz(b, 1, name))
}

fn rule(kind: u8, portid: u32, table: &str, chain: &str) -> Vec<u8> {
    msg(kind, INET, portid, |b| {
        strz(b, 1, table);
        strz(b, 2, chain);
        attr(b, 3, &7u64.to_be_bytes());
    })
}

fn chain(kind: u8, portid: u32, table: &str, name: &str) -> Vec<u8> {
    msg(kind, INET, portid, |b| {
        strz(b, 1, table);
        strz(b, 3, name);
    })
}

fn element(kind: u8, portid: u32, table: &str, set: &str) -> Vec<u8> {
    msg(kind, INET, portid, |b| {
        strz(b, 1, table);
        strz(b, 2, set);
        // NFTA_SET_ELEM_LIST_ELEMENTS > NFTA_LIST_ELEM > NFTA_SET_ELEM_KEY > NFTA_DATA_VALUE
        let mut value = Vec::new();
        attr(&mut value, 1, &[10, 0, 0, 9]);
        let mut key = Vec::new();
        attr(&mut key, 1 | 0x8000, &value);
        let mut elem = Vec::new();
        attr(&mut elem, 1 | 0x8000, &key);
        attr(b, 3 | 0x8000, &elem);
    })
}

fn gen(portid: u32, name: &str, pid: u32) -> Vec<u8> {
    msg(NEWGEN, 0, portid, |b| {
        attr(b, 1, &9u32.to_be_bytes());
        attr(b, 2, &pid.to_be_bytes());
        strz(b, 3, name);
    })
}

fn classify(datagrams: &[Vec<u8>]) -> (Vec<Drift>, usize) {
    let mut c =
        Classifier::new(Scope::new("inet", "palisade", &["pending_v4", "pending_v6"]).unwrap());
    let mut asked = 0;
    let mut out = Vec::new();
    for d in datagrams {
        out.extend(c.feed(d, &mut |p| p == OURS, &mut |p| {
            asked += 1;
            p == OURS
        }));
    }
    (out, asked)
}

#[test]
fn a_flushed_chain_by_a_foreign_process_is_one_drift_naming_chain_and_process() {
    let (d, _) = classify(&[[
        rule(DELRULE, NFT, "palisade", "postrouting"),
        rule(DELRULE, NFT, "palisade", "postrouting"),
        gen(NFT, "nft", 31337),
    ]
    .concat()]);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].changes, vec!["delete rule in chain postrouting"]);
    assert_eq!(d[0].more, 1);
    assert_eq!(
        (d[0].portid, d[0].process.as_deref(), d[0].pid),
        (NFT, Some("nft"), Some(31337))
    );
    assert!(d[0].to_string().contains("by nft"), "{}", d[0]);
}

#[test]
fn pending_marks_from_any_process_are_not_drift_but_other_elements_are() {
    let (d, asked) = classify(&[
        [
            element(NEWSETELEM, NFT, "palisade", "pending_v4"),
            gen(NFT, "palisade", 1),
        ]
        .concat(),
        [
            element(DELSETELEM, NFT, "palisade", "pending_v6"),
            gen(NFT, "palisade", 1),
        ]
        .concat(),
    ]);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        asked, 0,
        "a transaction that did not touch the table needs no ownership check"
    );
    let (d, _) = classify(&[[
        element(DELSETELEM, NFT, "palisade", "ingress_v4"),
        element(NEWSETELEM, NFT, "palisade", "pending_v4"),
        gen(NFT, "nft", 1),
    ]
    .concat()]);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].changes, vec!["delete element from set ingress_v4"]);
}

#[test]
fn our_own_transactions_are_never_drift_even_a_table_delete() {
    let (d, _) = classify(&[[
        table(NEWTABLE, INET, OURS, "palisade"),
        table(DELTABLE, INET, OURS, "palisade"),
        table(NEWTABLE, INET, OURS, "palisade"),
        chain(NEWCHAIN, OURS, "palisade", "postrouting"),
        rule(NEWRULE, OURS, "palisade", "postrouting"),
        gen(OURS, "palisade-agent", 1),
    ]
    .concat()]);
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn other_tables_and_families_are_not_drift() {
    let (d, asked) = classify(&[[
        table(DELTABLE, IP, NFT, "palisade"),
        table(DELTABLE, INET, NFT, "filter"),
        rule(NEWRULE, NFT, "kube-proxy", "services"),
        gen(NFT, "nft", 1),
    ]
    .concat()]);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(asked, 0);
}

#[test]
fn flush_ruleset_reports_the_table_delete_among_its_changes() {
    let (d, _) = classify(&[[
        rule(DELRULE, NFT, "palisade", "postrouting"),
        chain(5, NFT, "palisade", "postrouting"),
        table(DELTABLE, INET, NFT, "filter"),
        table(DELTABLE, INET, NFT, "palisade"),
        gen(NFT, "nft", 1),
    ]
    .concat()]);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].changes,
        vec![
            "delete rule in chain postrouting",
            "delete chain postrouting",
            "delete table"
        ]
    );
}

#[test]
fn transactions_split_across_datagrams_and_packed_in_one_are_judged_each() {
    let foreign = rule(NEWRULE, NFT, "palisade", "ingress");
    let (d, _) = classify(&[
        foreign.clone(),
        [
            gen(NFT, "nft", 1),
            rule(NEWRULE, OURS, "palisade", "x"),
            gen(OURS, "a", 2),
        ]
        .concat(),
        [foreign, gen(NFT, "nft", 1)].concat(),
    ]);
    assert_eq!(d.len(), 2, "{d:?}");
}

#[test]
fn a_message_the_crate_cannot_decode_is_read_raw_and_still_counts() {
    // A rule whose expression list is truncated garbage: the table and chain are still read.
    let broken = msg(NEWRULE, INET, NFT, |b| {
        strz(b, 1, "palisade");
        strz(b, 2, "postrouting");
        attr(b, 4 | 0x8000, &[200, 0, 1, 0, 1, 2]);
    });
    let (d, _) = classify(&[[broken, gen(NFT, "nft", 1)].concat()]);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].changes, vec!["add rule in chain postrouting"]);
    // An object message type the crate does not model (NFT_MSG_DESTROYRULE).
    let (d, _) = classify(&[[rule(28, NFT, "palisade", "in_1"), gen(NFT, "nft", 1)].concat()]);
    assert_eq!(d[0].changes, vec!["delete rule in chain in_1"]);
}

#[test]
fn a_transaction_cut_short_by_another_committer_is_still_judged() {
    let (d, _) = classify(&[[
        rule(DELRULE, NFT, "palisade", "postrouting"),
        rule(NEWRULE, OURS, "palisade", "postrouting"),
        gen(OURS, "a", 1),
    ]
    .concat()]);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].portid, NFT);
}

#[test]
fn an_overrun_is_drift_of_unknown_content() {
    let mut c = Classifier::new(Scope::new("inet", "palisade", &[]).unwrap());
    c.feed(
        &rule(DELRULE, NFT, "palisade", "postrouting"),
        &mut |_| false,
        &mut |_| false,
    );
    let d = c.overrun();
    assert!(d.overrun);
    assert!(d.to_string().contains("unknown"));
    // What was half-read is dropped with it; the next transaction starts clean.
    let out = c.feed(&gen(NFT, "nft", 1), &mut |_| false, &mut |_| false);
    assert!(out.is_empty());
}

#[test]
fn changes_are_deduplicated_and_capped() {
    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.extend(chain(NEWCHAIN, NFT, "palisade", &format!("c{i}")));
    }
    msgs.extend(gen(NFT, "nft", 1));
    let (d, _) = classify(&[msgs]);
    assert_eq!(d[0].changes.len(), MAX_CHANGES);
    assert_eq!(d[0].more, 20 - MAX_CHANGES);
}

#[test]
fn this_process_knows_its_own_netfilter_sockets_and_remembered_portids() {
    // A socket we hold is found by the scan (no root needed to open one).
    let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).unwrap();
    let addr = s.bind_auto().unwrap();
    assert!(is_own(addr.port_number()));
    assert!(!is_own(0x7fff_fff0));
    remember_portid(0x7fff_fff0, Duration::from_secs(60));
    assert!(known_own(0x7fff_fff0));
    assert!(
        is_own(0x7fff_fff0),
        "a remembered portid whose socket is gone stays ours after a rescan"
    );
    remember_portid(0x7fff_fff1, Duration::ZERO);
    assert!(!is_own(0x7fff_fff1), "an expired portid is foreign again");
}

#[test]
fn the_raw_reading_and_the_decoded_one_describe_a_change_alike() {
    let scope = Scope::new("inet", "palisade", &["pending_v4"]).unwrap();
    for m in [
        table(DELTABLE, INET, NFT, "palisade"),
        chain(NEWCHAIN, NFT, "palisade", "in_1"),
        rule(DELRULE, NFT, "palisade", "postrouting"),
        element(DELSETELEM, NFT, "palisade", "ingress_v4"),
    ] {
        let ty = u16::from_ne_bytes([m[4], m[5]]);
        let payload = &m[16..];
        let decoded = describe(&scope, ty, payload, true);
        assert!(decoded.is_some());
        assert_eq!(decoded, describe(&scope, ty, payload, false));
    }
}

#[test]
fn a_drift_names_the_chains_and_sets_it_touched_or_the_whole_table() {
    let (d, _) = classify(&[[
        rule(DELRULE, NFT, "palisade", "postrouting"),
        element(DELSETELEM, NFT, "palisade", "__set3"),
        rule(NEWRULE, NFT, "palisade", "in_g1"),
        element(DELSETELEM, NFT, "palisade", "ingress_v4"),
        element(NEWSETELEM, NFT, "palisade", "pending_v4"),
        chain(NEWCHAIN, NFT, "palisade", "egress_host"),
        gen(NFT, "nft", 7),
    ]
    .concat()]);
    assert_eq!(d.len(), 1);
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        d[0].touched,
        Touched::Objects {
            chains: strs(&["egress_host", "in_g1", "postrouting"]),
            sets: strs(&["ingress_v4"]),
        },
        "the plugin's pending set is not ours to repair; a rule's anonymous set goes with its chain"
    );
    let (d, _) = classify(&[[
        rule(DELRULE, NFT, "palisade", "postrouting"),
        table(DELTABLE, INET, NFT, "palisade"),
        gen(NFT, "nft", 7),
    ]
    .concat()]);
    assert_eq!(
        d[0].touched,
        Touched::Table,
        "a table change needs a full replace"
    );
    let mut c = Classifier::new(Scope::new("inet", "palisade", &[]).unwrap());
    assert_eq!(
        c.overrun().touched,
        Touched::Table,
        "lost notifications: unknown"
    );
}
