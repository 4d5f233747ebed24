//! One policy rule as nft matches: peers (pods, namespaces, ipBlocks) and ports, families kept
//! apart, with the sets they name; and a NetworkPolicy's chain of them.

use super::super::{CompiledPolicy, CompiledRule};
use super::{addr_key, addr_set, allow, fam_word, SetSink};
use crate::model::{Direction, Protocol};
use crate::ruleset::names::{self, *};
use crate::ruleset::{AddrField, Chain, Elem, Family, Rule, Set, SetKey, Stmt};
use std::collections::BTreeSet;

pub(super) fn policy(
    sink: &mut SetSink<'_>,
    pol: &CompiledPolicy,
    dir: Direction,
    rules: &[CompiledRule],
) {
    let key = &pol.key;
    let accept = accept_chain(key, dir);
    let mut out = Vec::new();
    for r in rules {
        let what = format!("{key} {dir} rule {}", r.index);
        for mut stmts in rule_matches(Some(&mut *sink), key, dir, r) {
            stmts.push(Stmt::Goto(accept.clone()));
            out.push(Rule::new(stmts).with_comment(comment(&what)));
        }
    }
    let rs = &mut *sink.rs;
    if !out.is_empty() {
        // Every matching rule ends here: the connections (first packets) and the packets the
        // policy admitted are counted without repeating any rule's matches.
        let (packets, connections) = (policy_counter(key, dir), policy_conn_counter(key, dir));
        rs.add_chain(Chain {
            name: accept.clone(),
            base: None,
            comment: comment(&format!("policy {key} {dir}: admitted, counted")),
            rules: vec![
                Rule::new(vec![
                    Stmt::CtNotConfirmed,
                    Stmt::CounterNamed(connections.clone()),
                ]),
                Rule::new(vec![Stmt::CounterNamed(packets.clone()), allow(dir)]),
            ],
        });
        rs.add_counter(packets);
        rs.add_counter(connections);
    }
    rs.add_chain(Chain {
        name: policy_chain(key, dir),
        base: None,
        comment: comment(&format!("policy {key} {dir}")),
        rules: out,
    });
}

/// The match statements of one resolved rule of the policy `key` (a NetworkPolicy or a
/// ClusterNetworkPolicy), one list per nft rule (peer kinds × port kinds, families kept apart),
/// without a verdict; the rule's named sets are added to `rs`.
pub(super) fn rule_matches(
    mut sets: Option<&mut SetSink<'_>>,
    key: &str,
    dir: Direction,
    r: &CompiledRule,
) -> Vec<Vec<Stmt>> {
    let peer_field = match dir {
        Direction::Ingress => AddrField::Saddr,
        Direction::Egress => AddrField::Daddr,
    };
    let what = || format!("{key} {dir} rule {}", r.index);
    let mk = |prefix: &str, fam: Option<Family>| names::rule_set(prefix, key, dir, r.index, fam);
    // A set goes into `sets` when asked for (the policy's part); the tier chains, which only name
    // them, build no elements.
    let mut add = |name: &str, by_content: bool, make: &dyn Fn() -> Set| {
        if let Some(sink) = sets.as_deref_mut() {
            sink.add(name, by_content, make);
        }
    };
    // Peer conditions, each with the family it implies. A rule whose ports are all named
    // egress ports never looks its peers up (below): it keeps their families, not their sets.
    let lookup = r.looks_peers_up(dir);
    let mut peer_conds: Vec<(Option<Family>, Option<Stmt>)> = Vec::new();
    // The peer's address (source for ingress, destination for egress) in the named set.
    let in_set = |fam: Family, set: String| {
        let field = peer_field;
        (
            Some(fam),
            Some(Stmt::AddrInSet {
                family: fam,
                field,
                set,
            }),
        )
    };
    if r.peers.any {
        peer_conds.push((None, None));
    }
    if r.peers.uses_pods {
        for fam in Family::BOTH {
            // No set (and no rule) for a family no peer pod has an address of: a rule naming
            // an empty set matches nothing, and every set is a name the kernel looks up by
            // walking the table's sets (single-stack clusters had half their sets empty; the
            // commit of a full replace is quadratic in sets). The incremental compiler
            // recompiles the policy when a family's first address comes or its last goes.
            if r.peers.pod_ips_of_family_upto_two(fam) == 0 {
                continue;
            }
            if !lookup {
                peer_conds.push((Some(fam), None));
                continue;
            }
            // Shared by every rule with the same pod peers: the comment says whose pods it
            // holds, not which rule names it.
            let name = names::peer_set(&r.peers.pod_key, fam);
            add(&name, true, &|| {
                addr_set(
                    &name,
                    fam,
                    comment(&format!(
                        "peer pods ({}): {}",
                        fam_word(fam),
                        r.peers.pod_label
                    )),
                    r.peers.pod_ips.iter(),
                )
            });
            peer_conds.push(in_set(fam, name));
        }
    }
    for (fam, has) in [
        (Family::V4, r.peers.has_v4_blocks),
        (Family::V6, r.peers.has_v6_blocks),
    ] {
        if !has {
            continue;
        }
        if !lookup {
            peer_conds.push((Some(fam), None));
            continue;
        }
        let name = mk(CIDR_SET_PREFIX, Some(fam));
        add(&name, false, &|| Set {
            name: name.clone(),
            key: addr_key(fam),
            interval: true,
            verdict_map: false,
            comment: comment(&format!(
                "{}: ipBlocks minus excepts ({})",
                what(),
                fam_word(fam)
            )),
            elements: r
                .peers
                .blocks
                .iter()
                .filter(|(a, _)| Family::of(a) == fam)
                .map(|(a, b)| Elem::range(*a, *b))
                .collect(),
        });
        peer_conds.push(in_set(fam, name));
    }
    // Port conditions.
    let mut port_conds: Vec<(Option<Family>, Vec<Stmt>)> = Vec::new();
    if r.ports.any {
        port_conds.push((None, Vec::new()));
    }
    match r.ports.ranges[..] {
        [] => {}
        // One port: compared in place, no set (see `Stmt::L4Proto`).
        [(proto, port, end)] if port == end => {
            port_conds.push((None, vec![Stmt::L4Proto(proto), Stmt::Dport(port)]));
        }
        _ => {
            // Shared by every rule with the same ports (named by its content): the comment
            // says what it holds, not whose it is.
            let name = names::ports_set(&r.ports.ranges);
            add(&name, true, &|| {
                let (interval, elements) = port_elements(&r.ports.ranges);
                let held: Vec<String> = r
                    .ports
                    .ranges
                    .iter()
                    .map(|(p, lo, hi)| {
                        if lo == hi {
                            format!("{}/{lo}", p.as_api())
                        } else {
                            format!("{}/{lo}-{hi}", p.as_api())
                        }
                    })
                    .collect();
                Set {
                    name: name.clone(),
                    key: SetKey::ProtoPort,
                    interval,
                    verdict_map: false,
                    comment: comment(&format!("protocols and ports: {}", held.join(" "))),
                    elements,
                }
            });
            port_conds.push((None, vec![Stmt::ProtoPortInSet { set: name }]));
        }
    }
    if r.ports.uses_named {
        for fam in Family::BOTH {
            let name = r.named_set(key, dir, fam);
            add(&name, r.shares_named(dir), &|| Set {
                name: name.clone(),
                key: match fam {
                    Family::V4 => SetKey::Ipv4ProtoPort,
                    Family::V6 => SetKey::Ipv6ProtoPort,
                },
                interval: false,
                verdict_map: false,
                // A shared set's comment says what it holds, not which rule names it: the port
                // names as written (the identity quotes them so distinct lists never meet; a
                // port name, an IANA service name, holds no quote or space to confuse here).
                comment: comment(&if r.shares_named(dir) {
                    format!(
                        "named ports {} of peer pods ({}): {}",
                        r.ports.named_key.replace('"', ""),
                        fam_word(fam),
                        r.peers.pod_label
                    )
                } else {
                    format!(
                        "{}: named ports per destination pod ({})",
                        what(),
                        fam_word(fam)
                    )
                }),
                elements: r
                    .ports
                    .named
                    .iter()
                    .filter(|(ip, _, _)| Family::of(ip) == fam)
                    .map(|(ip, p, port)| Elem::AddrProtoPort(*ip, *p, *port))
                    .collect(),
            });
            port_conds.push((
                Some(fam),
                vec![Stmt::DaddrProtoPortInSet {
                    family: fam,
                    set: name,
                }],
            ));
        }
    }
    let mut out = Vec::new();
    for (pf, pc) in &peer_conds {
        for (qf, qc) in &port_conds {
            if let (Some(a), Some(b)) = (pf, qf) {
                if a != b {
                    continue; // an IPv4 peer never meets an IPv6 destination
                }
            }
            // A single port is two compares, a peer a set lookup: when the port is one
            // value, it goes first, so a rule for another port or protocol (a tier's "deny
            // TCP 22 from ...") costs a new connection two compares and no lookup. A ports
            // set is a lookup too: the peer stays first.
            let cheap_port = matches!(qc[..], [Stmt::L4Proto(_), Stmt::Dport(_)]);
            // An egress rule's named-port entries are addresses its peers match, by
            // construction (`NamedPortScope`): looking the destination up with its port there
            // implies the peer lookup, which goes (one lookup less on a connection's first
            // packet; every peer condition of the family then gives the same rule, once).
            let implies_peer =
                dir == Direction::Egress && matches!(qc[..], [Stmt::DaddrProtoPortInSet { .. }]);
            debug_assert!(
                lookup || implies_peer,
                "a rule that builds no peer set never looks peers up"
            );
            let stmts: Vec<Stmt> = if implies_peer {
                qc.clone()
            } else if cheap_port {
                qc.iter().chain(pc.iter()).cloned().collect()
            } else {
                pc.iter().chain(qc.iter()).cloned().collect()
            };
            if implies_peer && out.contains(&stmts) {
                continue;
            }
            out.push(stmts);
        }
    }
    out
}

/// Ranges of at most this many ports are listed port by port in a rule's ports set.
const EXPAND_PORT_RANGE_MAX: u32 = 16;

/// The elements of a rule's ports set, and whether it needs the interval flag. A concatenation with
/// intervals is a pipapo set in the kernel, whose lookup costs measurably more than a hash lookup on
/// the first packet of every connection (×0.931–0.934 against ×0.942–0.957 of no policy, CRR at 1k
/// policies, paired runs); most rules name single ports or short `endPort` ranges, so those become
/// exact elements of a hash set. A long range (or "every port of a protocol") keeps the interval set.
fn port_elements(ranges: &[(Protocol, u16, u16)]) -> (bool, BTreeSet<Elem>) {
    let short = ranges
        .iter()
        .all(|(_, lo, hi)| u32::from(*hi) - u32::from(*lo) < EXPAND_PORT_RANGE_MAX);
    if short {
        let exact = ranges
            .iter()
            .flat_map(|(p, lo, hi)| (*lo..=*hi).map(move |port| Elem::ProtoPort(*p, port, port)))
            .collect();
        (false, exact)
    } else {
        let spans = ranges
            .iter()
            .map(|(p, lo, hi)| Elem::ProtoPort(*p, *lo, *hi))
            .collect();
        (true, spans)
    }
}
