//! The drift monitor against a real kernel, each test in a network namespace of its own (unshare on the
//! test thread; the host's ruleset is never touched). Run as root; without root they fail, never skip.

use palisade_nft::monitor::{Drift, Monitor, Scope};
use palisade_nft::{Backend, Nft, SetOp};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_testkit::netns::enter_private_netns as private_netns;

const TABLE: &str = r#"{"nftables":[
 {"add":{"table":{"family":"inet","name":"t"}}},
 {"add":{"set":{"family":"inet","table":"t","name":"pending_v4","type":"ipv4_addr"}}},
 {"add":{"map":{"family":"inet","table":"t","name":"ingress_v4","type":"ipv4_addr","map":"verdict"}}},
 {"add":{"chain":{"family":"inet","table":"t","name":"in_1"}}},
 {"add":{"chain":{"family":"inet","table":"t","name":"postrouting","type":"filter","hook":"postrouting","prio":90,"policy":"accept"}}},
 {"add":{"rule":{"family":"inet","table":"t","chain":"postrouting","expr":[
   {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@pending_v4"}},{"counter":null},{"drop":null}]}}},
 {"add":{"rule":{"family":"inet","table":"t","chain":"postrouting","expr":[
   {"vmap":{"key":{"payload":{"protocol":"ip","field":"daddr"}},"data":"@ingress_v4"}}]}}},
 {"add":{"element":{"family":"inet","table":"t","name":"ingress_v4","elem":[["10.0.0.2",{"goto":{"target":"in_1"}}]]}}}
]}"#;

fn scope() -> Scope {
    Scope::new("inet", "t", &["pending_v4", "pending_v6"]).unwrap()
}

/// `nft ARGS` as a process of its own (a foreign committer); returns its pid.
fn foreign_nft(args: &str) -> u32 {
    let mut child = Command::new("nft")
        .args(args.split_whitespace())
        .spawn()
        .expect("run nft");
    let pid = child.id();
    let st = child.wait().expect("wait nft");
    assert!(st.success(), "nft {args}: {st}");
    pid
}

fn quiet(m: &mut Monitor, for_how_long: Duration) -> Option<Drift> {
    m.next(Some(for_how_long)).expect("monitor read")
}

#[test]
fn a_foreign_nft_process_is_reported_with_its_portid_as_its_pid_and_its_name() {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    nft.apply(TABLE).unwrap();
    let mut m = Monitor::open(scope()).unwrap();
    let start = Instant::now();
    let pid = foreign_nft("flush chain inet t postrouting");
    let d = quiet(&mut m, Duration::from_secs(2)).expect("a flush chain is drift");
    println!("flush chain seen after {:?}: {d}", start.elapsed());
    assert_eq!(
        d.portid, pid,
        "nlmsg_pid of a notification is the committer's portid (= pid of nft)"
    );
    assert_eq!(d.process.as_deref(), Some("nft"));
    assert_eq!(
        d.changes,
        vec!["delete rule in chain postrouting".to_string()]
    );
    assert_eq!(d.more, 1, "two rules flushed: {d:?}");
}

#[test]
fn every_kind_of_foreign_change_to_the_table_is_drift_and_other_tables_are_not() {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    nft.apply(TABLE).unwrap();
    let mut m = Monitor::open(scope()).unwrap();
    foreign_nft("add table inet other");
    foreign_nft("add set inet other s { type ipv4_addr; }");
    foreign_nft("add element inet t pending_v4 { 10.0.0.9 }");
    foreign_nft("delete element inet t pending_v4 { 10.0.0.9 }");
    assert_eq!(
        quiet(&mut m, Duration::from_millis(300)),
        None,
        "other tables and pending marks are not drift"
    );
    for (cmd, want) in [
        (
            "flush map inet t ingress_v4",
            "delete element from set ingress_v4",
        ),
        (
            "add element inet t ingress_v4 { 10.0.0.3 : accept }",
            "add element to set ingress_v4",
        ),
        (
            "insert rule inet t postrouting accept",
            "add rule in chain postrouting",
        ),
        ("add chain inet t x", "add chain x"),
        ("delete chain inet t x", "delete chain x"),
        ("add table inet t { flags dormant; }", "change table"),
        ("flush ruleset", "delete table"),
    ] {
        foreign_nft(cmd);
        let d = quiet(&mut m, Duration::from_secs(2)).unwrap_or_else(|| panic!("{cmd}: no drift"));
        assert!(d.changes.iter().any(|c| c == want), "{cmd}: {d:?}");
        assert_eq!(
            quiet(&mut m, Duration::from_millis(50)),
            None,
            "{cmd}: one transaction, one report"
        );
    }
}

#[test]
fn our_own_commits_on_both_backends_are_never_drift() {
    private_netns();
    let mut m = Monitor::open(scope()).unwrap();
    for backend in [Backend::Lib, Backend::Exec] {
        let nft = Nft::new(backend);
        assert_eq!(nft.backend(), backend);
        nft.apply(TABLE).unwrap();
        nft.apply(
            r#"{"nftables":[{"flush":{"map":{"family":"inet","table":"t","name":"ingress_v4"}}}]}"#,
        )
        .unwrap();
        // A command this large replaces libnftables' context afterwards (its socket closes).
        let mut big = String::from(
            r#"{"nftables":[{"add":{"element":{"family":"inet","table":"t","name":"ingress_v4","elem":["#,
        );
        for i in 0..3000u32 {
            if i > 0 {
                big.push(',');
            }
            big.push_str(&format!(
                r#"["10.1.{}.{}",{{"goto":{{"target":"in_1"}}}}]"#,
                i / 250,
                i % 250
            ));
        }
        big.push_str("]}}}]}");
        nft.apply(&big).unwrap();
        nft.apply(r#"{"nftables":[{"delete":{"table":{"family":"inet","name":"t"}}}]}"#)
            .unwrap();
        drop(nft);
        let addr: IpAddr = "10.0.0.7".parse().unwrap();
        let nft = Nft::new(backend);
        nft.apply(TABLE).unwrap();
        palisade_nft::setelem::apply("inet", "t", &[(SetOp::Add, "pending_v4", addr.into())])
            .unwrap();
        assert_eq!(
            quiet(&mut m, Duration::from_millis(300)),
            None,
            "{backend:?}"
        );
        // The monitor is awake: the same table changed by someone else is reported.
        foreign_nft("add chain inet t y");
        let d = quiet(&mut m, Duration::from_secs(2)).expect("a foreign chain is drift");
        assert_eq!(d.changes, vec!["add chain y".to_string()], "{backend:?}");
        nft.apply(r#"{"nftables":[{"delete":{"table":{"family":"inet","name":"t"}}}]}"#)
            .unwrap();
    }
    assert_eq!(quiet(&mut m, Duration::from_millis(300)), None);
}

#[test]
fn lost_notifications_are_reported_as_drift_of_unknown_content() {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    nft.apply(TABLE).unwrap();
    // A tiny buffer that nobody reads while other processes commit: the kernel drops notifications.
    let mut m = Monitor::with_receive_buffer(scope(), 4096).unwrap();
    for i in 0..100 {
        foreign_nft(&format!("add chain inet t c{i}"));
    }
    let mut overrun = false;
    while let Some(d) = quiet(&mut m, Duration::from_millis(300)) {
        overrun |= d.overrun;
    }
    assert!(overrun, "an overrun must be reported, not swallowed");
    // The monitor goes on after it (a transaction whose end was lost is judged when the next begins).
    foreign_nft("add chain inet t after");
    let start = Instant::now();
    let mut seen = false;
    while !seen && start.elapsed() < Duration::from_secs(2) {
        if let Some(d) = quiet(&mut m, Duration::from_millis(500)) {
            seen = d.changes.iter().any(|c| c == "add chain after");
        }
    }
    assert!(seen, "no drift for the change after the overrun");
}

#[test]
fn an_element_writers_commits_on_its_kept_socket_are_ours_and_a_foreign_element_is_drift() {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    nft.apply(TABLE).unwrap();
    nft.apply(
        r#"{"nftables":[{"add":{"set":{"family":"inet","table":"t","name":"peer_v4","type":"ipv4_addr"}}}]}"#,
    )
    .unwrap();
    let mut m = Monitor::open(scope()).unwrap();
    let mut w = palisade_nft::setelem::ElementWriter::new();
    let a: IpAddr = "10.0.0.7".parse().unwrap();
    for _ in 0..20 {
        w.apply("inet", "t", &[(SetOp::Add, "peer_v4", a.into())])
            .unwrap();
        w.apply("inet", "t", &[(SetOp::Delete, "peer_v4", a.into())])
            .unwrap();
    }
    assert_eq!(quiet(&mut m, Duration::from_millis(300)), None);
    // A failed batch (the element is gone) drops the socket; the next one opens another.
    let err = w
        .apply("inet", "t", &[(SetOp::Delete, "peer_v4", a.into())])
        .unwrap_err();
    assert!(matches!(err, palisade_nft::Error::Absent { .. }), "{err}");
    w.apply("inet", "t", &[(SetOp::Add, "peer_v4", a.into())])
        .unwrap();
    assert_eq!(quiet(&mut m, Duration::from_millis(300)), None);
    foreign_nft("add element inet t peer_v4 { 10.0.0.8 }");
    let d = quiet(&mut m, Duration::from_secs(2)).expect("a foreign element is drift");
    assert!(
        d.changes.iter().any(|c| c.contains("peer_v4")),
        "{:?}",
        d.changes
    );
}

/// The quiet full replace's parts: a monitor out of the group hears nothing and hears again once
/// back; every commit moves the generation by one; a transaction bound to a generation that moved
/// is refused whole (so a commit bound to the generation read just before it is the next one).
#[test]
fn a_monitor_out_of_the_group_hears_nothing_and_a_transaction_bound_to_an_old_generation_is_refused(
) {
    private_netns();
    let nft = Nft::new(Backend::Lib);
    nft.apply(TABLE).unwrap();
    let mut m = Monitor::open(scope()).unwrap();
    let switch = m.membership().unwrap();
    let mut writer = palisade_nft::setelem::ElementWriter::new();

    switch.leave().unwrap();
    foreign_nft("add chain inet t unheard");
    switch.join().unwrap();
    assert_eq!(
        quiet(&mut m, Duration::from_millis(300)),
        None,
        "heard while out of the group"
    );
    foreign_nft("add chain inet t heard");
    assert!(
        quiet(&mut m, Duration::from_secs(2)).is_some(),
        "deaf after rejoining"
    );

    let g = writer.generation().unwrap();
    foreign_nft("add chain inet t another");
    assert_eq!(
        writer.generation().unwrap(),
        g.wrapping_add(1),
        "one commit, one generation"
    );

    // A prepared batch bound to the generation before that commit: refused, nothing changed.
    let batch = element_batch("10.9.9.9");
    let err = writer
        .commit_prepared_at("test", "t", &[&batch], Some(g))
        .unwrap_err();
    assert!(err.is_generation_moved(), "{err}");
    let listed = nft.list_set("inet", "t", "pending_v4").unwrap().unwrap();
    assert!(
        !listed.contains("10.9.9.9"),
        "a refused batch changed the set: {listed}"
    );
    // Bound to the current generation: committed, and it is the next one. In three parts (the
    // begin message, the element message, the end message), as one datagram.
    let now = writer.generation().unwrap();
    let (begin, rest) = batch.split_at(20);
    let (element, end) = rest.split_at(rest.len() - 20);
    writer
        .commit_prepared_at("test", "t", &[begin, element, end], Some(now))
        .unwrap();
    assert_eq!(writer.generation().unwrap(), now.wrapping_add(1));
    let listed = nft.list_set("inet", "t", "pending_v4").unwrap().unwrap();
    assert!(listed.contains("10.9.9.9"), "{listed}");
}

/// A prepared batch (BATCH_BEGIN, one NEWSETELEM of `addr` into `t`'s pending_v4 asking for an
/// ack, BATCH_END), as a full replace's is laid out.
fn element_batch(addr: &str) -> Vec<u8> {
    let ip: std::net::Ipv4Addr = addr.parse().unwrap();
    let attr = |kind: u16, value: &[u8]| -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    };
    let nest = |kind: u16, inner: Vec<u8>| attr(kind | 0x8000, &inner);
    let msg = |ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: Vec<u8>| {
        let mut m = ((20 + attrs.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, 0]);
        m.extend_from_slice(&res_id.to_be_bytes());
        m.extend(attrs);
        m
    };
    let mut body = attr(1, b"t\0");
    body.extend(attr(2, b"pending_v4\0"));
    body.extend(nest(3, nest(1, nest(1, attr(1, &ip.octets())))));
    [
        msg(0x10, 1, 1, 0, 10, vec![]),
        msg(0x0a0c, 0x405, 2, 1, 0, body),
        msg(0x11, 1, 3, 0, 10, vec![]),
    ]
    .concat()
}
