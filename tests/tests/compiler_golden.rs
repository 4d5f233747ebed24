//! Every representative scenario's ruleset (the golden files' source) is accepted by the real
//! `nft -j -f` in a throwaway namespace, twice (a full replace over an existing table), and lists
//! back with our comments verbatim and no other table: no user string became nft syntax.

use palisade_policy::compile;
use palisade_policy::ruleset::NewSetNaming;
use palisade_policy::scenarios::{scenarios, NODE};
use palisade_tests::{Netns, NftNs};

fn rendered() -> Vec<(&'static str, String)> {
    scenarios()
        .into_iter()
        .map(|(name, st)| {
            let rs = compile(&st, NODE).ruleset;
            (
                name,
                serde_json::to_string_pretty(&rs.full_replace().json()).unwrap() + "\n",
            )
        })
        .collect()
}

fn scenario(name: &str) -> palisade_policy::model::ClusterState {
    scenarios()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, st)| st)
        .unwrap()
}

#[test]
fn golden_rulesets_load_into_real_nft_root() {
    for (name, text) in rendered() {
        let ns = Netns::new("pal-cmp-");
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: nft rejected the ruleset: {e}"));
        // Load twice: a full replace must also work over an existing table.
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: second full replace failed: {e}"));
        let listed = ns.list_table();
        let rules: Vec<&serde_json::Value> = listed["rules"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|r| r.as_array().unwrap())
            .collect();
        assert!(
            listed["objects"].as_array().unwrap().len() + rules.len() > 10,
            "{name}: table looks empty"
        );
        // Nothing but our table exists: no user string turned into extra nft syntax.
        assert_eq!(ns.list_tables().trim(), "table inet palisade", "{name}");
        // Every rule comment in the kernel is one of ours, verbatim.
        let ours: Vec<String> = compile(&scenario(name), NODE)
            .ruleset
            .chains
            .values()
            .flat_map(|c| c.rules.iter().filter_map(|r| r.comment.clone()))
            .collect();
        let mut seen = 0;
        for item in rules {
            if let Some(c) = item
                .get("rule")
                .and_then(|r| r.get("comment"))
                .and_then(|c| c.as_str())
            {
                assert!(
                    ours.iter().any(|o| o == c),
                    "{name}: unexpected comment {c:?}"
                );
                seen += 1;
            }
        }
        assert!(seen > 0, "{name}: no rule comments listed");
    }
}

/// Our table as `nft -j list` shows it, normalized as every kernel test compares tables.
fn listed_normalized() -> serde_json::Value {
    let nft = palisade_nft::Nft::new(palisade_nft::Backend::Lib);
    let text = nft
        .list_table("inet", "palisade")
        .unwrap()
        .expect("table listed");
    palisade_testkit::nft::normalized(&text)
}

/// A ruleset with every statement, every set key, interval sets (from address zero, open to the
/// last address, in both families), a protocol . port interval set, a verdict map and counters.
fn every_statement() -> palisade_policy::ruleset::Ruleset {
    use palisade_policy::model::Protocol;
    use palisade_policy::ruleset::*;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let mut rs = Ruleset::default();
    let set = |name: &str, key: SetKey, interval: bool, elements: Vec<Elem>| Set {
        name: name.into(),
        key,
        interval,
        verdict_map: false,
        comment: "c".into(),
        elements: elements.into_iter().collect(),
    };
    rs.add_set(set(
        "a4",
        SetKey::Ipv4,
        false,
        vec![Elem::Addr(ip("10.0.0.1"))],
    ));
    rs.add_set(set(
        "a6",
        SetKey::Ipv6,
        false,
        vec![Elem::Addr(ip("fd00::1"))],
    ));
    rs.add_set(set(
        "i4",
        SetKey::Ipv4,
        true,
        vec![
            Elem::range(ip("10.0.0.0"), ip("10.0.0.255")),
            Elem::Addr(ip("10.1.0.5")),
            Elem::range(ip("10.2.0.0"), ip("255.255.255.255")),
        ],
    ));
    rs.add_set(set(
        "i6",
        SetKey::Ipv6,
        true,
        vec![Elem::range(ip("::"), ip("fd00::ff"))],
    ));
    rs.add_set(set(
        "pp",
        SetKey::ProtoPort,
        false,
        vec![
            Elem::ProtoPort(Protocol::Tcp, 80, 80),
            Elem::ProtoPort(Protocol::Sctp, 9, 9),
        ],
    ));
    rs.add_set(set(
        "ppi",
        SetKey::ProtoPort,
        true,
        vec![
            Elem::ProtoPort(Protocol::Tcp, 8000, 9000),
            Elem::ProtoPort(Protocol::Udp, 53, 53),
        ],
    ));
    rs.add_set(set(
        "d4",
        SetKey::Ipv4ProtoPort,
        false,
        vec![Elem::AddrProtoPort(ip("10.0.0.1"), Protocol::Udp, 53)],
    ));
    rs.add_set(set(
        "d6",
        SetKey::Ipv6ProtoPort,
        false,
        vec![Elem::AddrProtoPort(ip("fd00::1"), Protocol::Tcp, 443)],
    ));
    rs.add_set(set(
        "s4",
        SetKey::Ipv4Pair,
        false,
        vec![Elem::addr_pair(ip("10.0.0.1"), ip("10.0.0.1"))],
    ));
    rs.add_set(set(
        "s6",
        SetKey::Ipv6Pair,
        false,
        vec![Elem::addr_pair(ip("fd00::1"), ip("fd00::1"))],
    ));
    rs.add_set(set(
        "f4",
        SetKey::IfnameIpv4,
        false,
        vec![Elem::iface_addr("pal0123456789ab".into(), ip("10.0.0.1"))],
    ));
    rs.add_set(set(
        "f6",
        SetKey::IfnameIpv6,
        false,
        vec![Elem::iface_addr("pal1".into(), ip("fd00::1"))],
    ));
    let mut vm = set(
        "vm",
        SetKey::Ipv4,
        false,
        vec![Elem::goto_chain(ip("10.0.0.1"), "target".into())],
    );
    vm.verdict_map = true;
    rs.add_set(vm);
    let mut vm6 = set("vm6", SetKey::Ipv6, false, vec![]);
    vm6.verdict_map = true;
    rs.add_set(vm6);
    let mut vml = set(
        "vml",
        SetKey::Ifname,
        false,
        vec![Elem::iface_goto("pal0123456789ab".into(), "target".into())],
    );
    vml.verdict_map = true;
    rs.add_set(vml);
    rs.add_counter("cnt".into());
    let s = |v: Vec<Stmt>| Rule::new(v);
    let (v4, v6) = (Family::V4, Family::V6);
    let rules = vec![
        s(vec![Stmt::CtEstablished, Stmt::Accept]).with_comment("q\"uote'; } { #"),
        s(vec![Stmt::CtRelated, Stmt::Jump("target".into())]),
        s(vec![
            Stmt::IifCtSaddrInSet {
                family: v4,
                dir: CtDir::Original,
                set: "f4".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::IifCtSaddrInSet {
                family: v6,
                dir: CtDir::Reply,
                set: "f6".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![Stmt::CtInvalid, Stmt::Counter, Stmt::Drop]),
        s(vec![Stmt::CtNew, Stmt::CtNotConfirmed, Stmt::Return]),
        s(vec![Stmt::FibSaddrLocal, Stmt::Jump("target".into())]),
        s(vec![Stmt::FibSaddrNotLocal, Stmt::Goto("target".into())]),
        s(vec![
            Stmt::Icmpv6NeighbourDiscovery,
            Stmt::Ip6HopLimit255,
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::NoInputInterface,
            Stmt::FibSaddrLocal,
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::IifnamePrefix("pal".into()),
            Stmt::Icmpv6Type(134),
            Stmt::Drop,
        ]),
        s(vec![
            Stmt::IifnamePrefix("pal".into()),
            Stmt::IifSaddrNotInSet {
                family: v4,
                set: "f4".into(),
            },
            Stmt::Drop,
        ]),
        s(vec![
            Stmt::IifnamePrefix("pal".into()),
            Stmt::IifSaddrNotInSet {
                family: v6,
                set: "f6".into(),
            },
            Stmt::Ip6SaddrNotLinkLocal,
            Stmt::Drop,
        ]),
        s(vec![
            Stmt::AddrInSet {
                family: v4,
                field: AddrField::Saddr,
                set: "a4".into(),
            },
            Stmt::AddrNotInSet {
                family: v4,
                field: AddrField::Daddr,
                set: "i4".into(),
            },
            Stmt::L4Proto(Protocol::Tcp),
            Stmt::Dport(80),
            Stmt::CounterNamed("cnt".into()),
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::AddrInSet {
                family: v6,
                field: AddrField::Daddr,
                set: "a6".into(),
            },
            Stmt::AddrNotInSet {
                family: v6,
                field: AddrField::Saddr,
                set: "i6".into(),
            },
            Stmt::ProtoPortInSet { set: "ppi".into() },
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::ProtoPortInSet { set: "pp".into() },
            Stmt::Masquerade,
        ]),
        s(vec![
            Stmt::DaddrProtoPortInSet {
                family: v4,
                set: "d4".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::DaddrProtoPortInSet {
                family: v6,
                set: "d6".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::SelfTraffic {
                family: v4,
                set: "s4".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![
            Stmt::SelfTraffic {
                family: v6,
                set: "s6".into(),
            },
            Stmt::Accept,
        ]),
        s(vec![Stmt::VmapLookup {
            family: v4,
            field: AddrField::Daddr,
            map: "vm".into(),
        }]),
        s(vec![Stmt::VmapLookup {
            family: v6,
            field: AddrField::Saddr,
            map: "vm6".into(),
        }]),
        s(vec![
            Stmt::IifnamePrefix("pal".into()),
            Stmt::IifnameVmap { map: "vml".into() },
        ]),
        s(vec![
            Stmt::Limit { rate: 10, burst: 5 },
            Stmt::Log {
                group: 7,
                prefix: "palisade drop".into(),
                snaplen: 128,
            },
            Stmt::Drop,
        ]),
    ];
    rs.add_chain(Chain {
        name: "nat".into(),
        base: Some(BaseHook {
            kind: ChainKind::Nat,
            hook: Hook::Postrouting,
            priority: 100,
        }),
        comment: "n".into(),
        rules: vec![s(vec![
            Stmt::AddrInSet {
                family: v4,
                field: AddrField::Saddr,
                set: "a4".into(),
            },
            Stmt::Masquerade,
        ])],
    });
    rs.add_chain(Chain {
        name: "pre".into(),
        base: Some(BaseHook {
            kind: ChainKind::Filter,
            hook: Hook::Prerouting,
            priority: -150,
        }),
        comment: "p".into(),
        rules: vec![s(vec![Stmt::Counter])],
    });
    rs.add_chain(Chain {
        name: "in".into(),
        base: Some(BaseHook {
            kind: ChainKind::Filter,
            hook: Hook::Input,
            priority: 0,
        }),
        comment: "i".into(),
        rules: vec![],
    });
    rs.add_chain(Chain {
        name: "raw_out".into(),
        base: Some(BaseHook {
            kind: ChainKind::Filter,
            hook: Hook::Output,
            priority: -300,
        }),
        comment: "r".into(),
        rules: vec![s(vec![
            Stmt::L4Proto(Protocol::Udp),
            Stmt::Dport(4796),
            Stmt::Notrack,
        ])],
    });
    rs.add_chain(Chain {
        name: "main".into(),
        base: Some(BaseHook {
            kind: ChainKind::Filter,
            hook: Hook::Postrouting,
            priority: 90,
        }),
        comment: "m".into(),
        rules: rules
            .into_iter()
            .filter(|r| !r.stmts.contains(&Stmt::Masquerade))
            .collect(),
    });
    rs.add_chain(Chain {
        name: "target".into(),
        base: None,
        comment: "t".into(),
        rules: vec![],
    });
    rs
}

/// The netlink full replace (what the agent commits) lists exactly as the JSON one (what nft
/// writes) for every scenario and for a ruleset with every statement: the same rules, sets,
/// elements, types and comments. Fails when a statement is lowered differently from nft, an
/// element is encoded for the wrong key, or an interval set's ends are off by one.
#[test]
fn netlink_full_replace_lists_as_the_json_one_root() {
    palisade_testkit::netns::enter_private_netns();
    let nft = palisade_nft::Nft::new(palisade_nft::Backend::Lib);
    let mut writer = palisade_nft::setelem::ElementWriter::new();
    let mut cases: Vec<(&str, palisade_policy::ruleset::Ruleset)> = scenarios()
        .into_iter()
        .map(|(name, st)| (name, compile(&st, NODE).ruleset))
        .collect();
    cases.push(("every_statement", every_statement()));
    for (name, rs) in cases {
        nft.apply(&rs.full_replace_text())
            .unwrap_or_else(|e| panic!("{name}: JSON load: {e}"));
        let by_json = listed_normalized();
        // New sets' elements named as nft names them, and by ID alone (the agent's choice on
        // Linux 6.12 and later; any kernel takes it).
        for naming in [NewSetNaming::NameAndId, NewSetNaming::IdOnly] {
            let batch = rs
                .full_replace_netlink_naming(naming)
                .unwrap_or_else(|e| panic!("{name}: not encoded: {e}"));
            // Over the table the JSON load (or the last commit) left, and over no table.
            for over in ["existing table", "no table"] {
                if over == "no table" {
                    nft.apply(
                        r#"{"nftables":[{"delete":{"table":{"family":"inet","name":"palisade"}}}]}"#,
                    )
                    .unwrap();
                }
                writer
                    .commit_prepared("full replace", "palisade", &batch.parts())
                    .unwrap_or_else(|e| {
                        panic!("{name}, {naming:?}, over {over}: kernel refused: {e}")
                    });
                let by_netlink = listed_normalized();
                assert!(
                    by_json == by_netlink,
                    "{name}, {naming:?}, over {over}: listings differ\nJSON:    {}\nnetlink: {}",
                    serde_json::to_string(&by_json).unwrap(),
                    serde_json::to_string(&by_netlink).unwrap()
                );
            }
        }
    }
}
