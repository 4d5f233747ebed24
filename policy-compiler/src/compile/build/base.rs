//! The base chains every node holds, whatever its policies: the hooks, the source guard, the
//! pending and self sets, neighbour discovery, related ICMP, the overlay's tunnel and untrack
//! chains, egress NAT, the flow log, and the verdict-map lookups into the group chains.

use super::super::{intervals, Compiled};
use super::{addr_key, addr_set, flow_audit_chain, from_pod_veth};
use crate::model::{Direction, EgressNat, FlowLog, Protocol, Tunnel};
use crate::ruleset::names::*;
use crate::ruleset::{
    AddrField, BaseHook, Chain, ChainKind, CtDir, Elem, Family, Hook, Rule, Ruleset, Set, SetKey,
    Stmt,
};
use std::collections::BTreeSet;

/// `pending`: the addresses the pending sets hold (the compiled state's pending addresses; every
/// local address in a lockdown, `super::lockdown`).
pub(super) fn base(rs: &mut Ruleset, c: &Compiled, pending: &BTreeSet<std::net::IpAddr>) {
    for fam in Family::BOTH {
        let key = addr_key(fam);
        rs.add_set(addr_set(
            pending_set(fam),
            fam,
            comment(
                "pod addresses wired by the CNI plugin whose policy is not compiled yet: dropped",
            ),
            pending,
        ));
        rs.add_set(Set {
            name: self_set(fam).to_string(),
            key: match fam {
                Family::V4 => SetKey::Ipv4Pair,
                Family::V6 => SetKey::Ipv6Pair,
            },
            interval: false,
            verdict_map: false,
            comment: comment("local pod address twice: a pod can always reach itself"),
            elements: c
                .pods
                .values()
                .flat_map(|p| p.ips.iter())
                .filter(|ip| Family::of(ip) == fam)
                .map(|ip| Elem::addr_pair(*ip, *ip))
                .collect(),
        });
        for dir in Direction::BOTH {
            rs.add_set(Set {
                name: map_name(dir, fam).to_string(),
                key,
                interval: false,
                verdict_map: true,
                comment: comment(&format!(
                    "{dir}-isolated local pod address -> its group chain"
                )),
                elements: BTreeSet::new(),
            });
        }
    }
    rs.add_set(Set {
        name: MAP_EGRESS_LINKS.to_string(),
        key: SetKey::Ifname,
        interval: false,
        verdict_map: true,
        comment: comment(
            "host veth of an egress-isolated local pod -> its group chain (link-local sources)",
        ),
        elements: BTreeSet::new(),
    });
    // Two base chains, one per hook: every packet crosses one of ours per hook, established ones
    // after a single rule. Postrouting checks the egress of the source (a verdict map hit goes to
    // its group; an egress policy's allow continues in the ingress chain), then the ingress of the
    // destination in the regular `ingress` chain; so both directions must allow (semantics 7) without
    // a second base chain on the hook. Input sees pod -> own node: the egress check only (an egress
    // allow goes to `ingress`, whose map lookup misses for a node address and accepts).
    //
    // The base chains hold only what must be decided for every new packet: established/related,
    // invalid, neighbour discovery, and pending addresses (an unknown pod is denied whether or not a
    // policy selects it). What only matters for a packet of an isolated pod (from this node, a pod
    // reaching itself) is in the chains the group chains jump to first (`super::exemptions`), so a
    // new connection of a pod no policy selects costs two map lookups after the pending check, and
    // no FIB lookup.
    let chains = [
        (
            CHAIN_POSTROUTING,
            Hook::Postrouting,
            PRIORITY_POSTROUTING,
            "egress of the source, then ingress of the destination, for local pods",
        ),
        (
            CHAIN_EGRESS_HOST,
            Hook::Input,
            PRIORITY_EGRESS_HOST,
            "egress of local pods to their own node",
        ),
    ];
    for (name, hook, priority, what) in chains {
        let mut rules = source_guard_rules();
        rules.extend([
            Rule::new(vec![Stmt::CtEstablished, Stmt::Accept]),
            Rule::new(vec![Stmt::CtRelated, Stmt::Jump(CHAIN_RELATED.to_string())]),
            Rule::new(vec![Stmt::CtInvalid, Stmt::Drop]),
        ]);
        // A new packet to the overlay port (outer VXLAN, delivered locally): only a node may send
        // it. Here, not before the established accept: a dropped packet is never confirmed, so no
        // flow to the port from another source ever becomes established (and a node's own outer
        // packets are not tracked at all, see `tunnel`: they always walk to here).
        // A verdict as soon as it is known: the outer packets' source port follows the inner
        // flow, so every connection over the overlay opens two new outer flows, which walked the
        // whole chain at both ends to the accept every packet that is neither from nor to a pod
        // meets (A/B runs: ~3 % of the overlay's new connections; BENCHMARKS). Exact: a node
        // address is never a pod's (routes refuse such a Node), and our InternalIP as a source
        // means this node sent it (the kernel drops it as martian from anywhere else).
        if let Some(t) = &c.tunnel {
            let (chain, what) = match hook {
                Hook::Input => (CHAIN_TUNNEL, "overlay port: only nodes may send to it"),
                _ => (
                    CHAIN_TUNNEL_OUT,
                    "overlay port: what this node sends to a node",
                ),
            };
            rules.push(
                Rule::new(vec![
                    Stmt::L4Proto(Protocol::Udp),
                    Stmt::Dport(t.port),
                    Stmt::Jump(chain.to_string()),
                ])
                .with_comment(what),
            );
        }
        // Neighbour discovery is never forwarded: with hop limit 255 only (RFC 4861), which no
        // forwarded packet has here. Without it, a pod under any policy sent its ICMPv6 messages
        // of these types, with any payload, to every pod and past the node (an egress deny-all's
        // way out, an ingress deny-all's way in); forwarded, they meet the policies.
        rules.push(
            Rule::new(vec![
                Stmt::Icmpv6NeighbourDiscovery,
                Stmt::Ip6HopLimit255,
                Stmt::Jump(CHAIN_NEIGHBOUR.to_string()),
            ])
            .with_comment("neighbour discovery on the link (never forwarded)"),
        );
        for fam in Family::BOTH {
            for f in [AddrField::Saddr, AddrField::Daddr] {
                let mut stmts = vec![Stmt::AddrInSet {
                    family: fam,
                    field: f,
                    set: pending_set(fam).to_string(),
                }];
                // This node may reach a pending pod (kubelet probes start as soon as it runs).
                stmts.push(match f {
                    AddrField::Daddr => Stmt::Jump(CHAIN_PENDING_DST.to_string()),
                    AddrField::Saddr => Stmt::Drop,
                });
                rules.push(Rule::new(stmts).with_comment("pending pod"));
            }
        }
        rules.extend(vmap_lookups(Direction::Egress));
        if hook == Hook::Postrouting {
            rules.push(Rule::new(vec![Stmt::Goto(CHAIN_INGRESS.to_string())]));
        } else {
            // What is left from a pod's veth here has a source no address map holds: IPv6
            // link-local or unspecified (the source guard passes only those besides the pod's
            // own addresses; the kernel never forwards them, so only the input hook sees them).
            // A service of the node listening on `::` answers at the veth's `fe80::1`: an
            // egress-isolated pod's packet takes its pod's egress verdict, as from its address.
            rules.push(
                Rule::new(vec![
                    from_pod_veth(),
                    Stmt::IifnameVmap {
                        map: MAP_EGRESS_LINKS.to_string(),
                    },
                ])
                .with_comment("a pod's link-local source: the egress of the pod behind the veth"),
            );
        }
        rs.add_chain(Chain {
            name: name.to_string(),
            base: Some(BaseHook {
                kind: ChainKind::Filter,
                hook,
                priority,
            }),
            comment: what.to_string(),
            rules,
        });
    }
    neighbour(rs);
    rs.add_chain(Chain {
        name: CHAIN_PENDING_DST.to_string(),
        base: None,
        comment: "to a pending pod: from this node only".to_string(),
        rules: vec![
            // Sent by this node, not only claiming its address (see `super::exemptions`).
            Rule::new(vec![
                Stmt::NoInputInterface,
                Stmt::FibSaddrLocal,
                Stmt::Return,
            ])
            .with_comment("this node (kubelet probes start as soon as the pod runs)"),
            Rule::new(vec![Stmt::Drop]).with_comment("pending pod"),
        ],
    });
    source_sets(rs, c);
    rs.add_counter(CNT_FORGED_SOURCE.to_string());
    related(rs);
    if let Some(nat) = &c.egress_nat {
        egress_nat(rs, nat);
    }
    if let Some(log) = &c.flow_log {
        flow_log(rs, log);
    }
    if let Some(t) = &c.tunnel {
        tunnel(rs, t);
    }
    let mut rules = vmap_lookups(Direction::Ingress);
    rules.push(
        Rule::new(vec![Stmt::Accept]).with_comment("egress allowed; destination not isolated"),
    );
    rs.add_chain(Chain {
        name: CHAIN_INGRESS.to_string(),
        base: None,
        comment: "ingress of local pods, after the egress check".to_string(),
        rules,
    });
}

/// The flow log's chains: `flow_drop`, where every policy drop ends (a copy to NFLOG within the
/// rate, then drop), and with `allowed` a base chain after ours on each hook that logs the first
/// packet of every connection we let through (the agent keeps those some policy admitted). Each
/// logging rule has its own budget: a flood of drops cannot hide admitted connections, nor the other
/// way round. Packets over the rate are still dropped (or admitted), only not logged.
fn flow_log(rs: &mut Ruleset, log: &FlowLog) {
    let logged = |prefix: &str| {
        [
            Stmt::Limit {
                rate: log.rate,
                burst: log.burst,
            },
            Stmt::Log {
                group: log.group,
                prefix: prefix.to_string(),
                snaplen: FLOW_SNAPLEN,
            },
        ]
    };
    rs.add_chain(Chain {
        name: CHAIN_FLOW_DROP.to_string(),
        base: None,
        comment: "policy drops: to the flow log (rate-limited), then dropped".to_string(),
        rules: vec![
            Rule::new(logged(FLOW_PREFIX_DROP).to_vec()),
            Rule::new(vec![Stmt::Drop]),
        ],
    });
    for (dir, prefix) in [
        (Direction::Ingress, FLOW_PREFIX_AUDIT_INGRESS),
        (Direction::Egress, FLOW_PREFIX_AUDIT_EGRESS),
    ] {
        rs.add_chain(Chain {
            name: flow_audit_chain(dir).to_string(),
            base: None,
            comment: "what policies in audit mode would drop: to the flow log (rate-limited)"
                .to_string(),
            rules: vec![Rule::new(logged(prefix).to_vec())],
        });
    }
    if !log.allowed {
        return;
    }
    for (name, hook, priority) in [
        (CHAIN_FLOW_ALLOW, Hook::Postrouting, PRIORITY_FLOW_ALLOW),
        (CHAIN_FLOW_ALLOW_HOST, Hook::Input, PRIORITY_FLOW_ALLOW_HOST),
    ] {
        let mut stmts = vec![Stmt::CtNew];
        stmts.extend(logged(FLOW_PREFIX_ALLOW));
        rs.add_chain(Chain {
            name: name.to_string(),
            base: Some(BaseHook {
                kind: ChainKind::Filter,
                hook,
                priority,
            }),
            comment: "connections we admitted: to the flow log (rate-limited)".to_string(),
            rules: vec![Rule::new(stmts)],
        });
    }
}

/// The source guard's sets: (host veth . address) of every local attachment record.
fn source_sets(rs: &mut Ruleset, c: &Compiled) {
    for fam in Family::BOTH {
        rs.add_set(Set {
            name: source_set(fam).to_string(),
            key: match fam {
                Family::V4 => SetKey::IfnameIpv4,
                Family::V6 => SetKey::IfnameIpv6,
            },
            interval: false,
            verdict_map: false,
            comment: comment("host veth . address of local pods: the sources each veth may carry"),
            elements: c
                .sources
                .iter()
                .filter(|(_, ip)| Family::of(ip) == fam)
                .map(|(veth, ip)| Elem::iface_addr(veth.clone().into(), *ip))
                .collect(),
        });
    }
}

/// The source guard, the first rules of every base chain (before the established accept, so a
/// forged packet can neither open a connection nor ride an existing one; a dropped packet's conntrack
/// entry is never confirmed): a packet that came in through a pod's host veth must carry an address
/// the attachment record binds to that veth, or it is counted and dropped before any policy sees it.
/// The pod's IPv6 link-local and unspecified sources (neighbour discovery, DAD) pass: the kernel
/// never forwards them. In the base chains rather than a prerouting chain of its own: a base chain
/// more is a hook invocation more for every packet (measured: x0.94 of new connections).
pub(crate) fn source_guard_rules() -> Vec<Rule> {
    Family::BOTH
        .into_iter()
        .map(|family| {
            let mut stmts = vec![from_pod_veth()];
            if family == Family::V6 {
                stmts.push(Stmt::Ip6SaddrNotLinkLocal);
            }
            stmts.extend([
                Stmt::IifSaddrNotInSet {
                    family,
                    set: source_set(family).to_string(),
                },
                Stmt::CounterNamed(CNT_FORGED_SOURCE.to_string()),
                Stmt::Drop,
            ]);
            Rule::new(stmts)
                .with_comment("forged source: not an address of the pod behind this veth")
        })
        .collect()
}

/// Neighbour discovery on the link: solicitations and answers pass; router advertisements and
/// redirects from a pod's veth are counted and dropped. The node is the pods' router: with
/// `accept_ra=2` on a host veth (a node set to take router advertisements while forwarding, which
/// new interfaces inherit), a pod's advertisement would give the node a default route through
/// the pod, and a redirect would move its routes.
fn neighbour(rs: &mut Ruleset) {
    let mut rules = Vec::new();
    for (t, what) in [
        (
            ICMPV6_ROUTER_ADVERT,
            "a pod advertising itself as the node's router",
        ),
        (ICMPV6_REDIRECT, "a pod redirecting the node's routes"),
    ] {
        rules.push(
            Rule::new(vec![
                from_pod_veth(),
                Stmt::Icmpv6Type(t),
                Stmt::CounterNamed(CNT_FORGED_ROUTER.to_string()),
                Stmt::Drop,
            ])
            .with_comment(what),
        );
    }
    rules.push(Rule::new(vec![Stmt::Accept]));
    rs.add_counter(CNT_FORGED_ROUTER.to_string());
    rs.add_chain(Chain {
        name: CHAIN_NEIGHBOUR.to_string(),
        base: None,
        comment: "neighbour discovery on the link: no router messages from a pod".to_string(),
        rules,
    });
}

/// ICMPv6 router advertisement and redirect (RFC 4861).
const ICMPV6_ROUTER_ADVERT: u8 = 134;
const ICMPV6_REDIRECT: u8 = 137;

/// Related packets: conntrack marks an ICMP error related to the connection its quoted header
/// names, whoever sent it, so `ct state related accept` would let any pod send errors, with any
/// payload after the quoted header, to a pod its policies deny (a channel out of an egress deny-all,
/// and a way to cut other pods' connections). From a pod's veth a related packet passes only when
/// that pod is an endpoint of the connection (its source in either direction is an address bound
/// to the veth); from anywhere else (a router, another node, this node) it passes as before.
fn related(rs: &mut Ruleset) {
    let mut rules = Vec::new();
    for fam in Family::BOTH {
        for dir in CtDir::BOTH {
            rules.push(Rule::new(vec![
                Stmt::IifCtSaddrInSet {
                    family: fam,
                    dir,
                    set: source_set(fam).to_string(),
                },
                Stmt::Accept,
            ]));
        }
    }
    rules.push(
        Rule::new(vec![
            from_pod_veth(),
            Stmt::CounterNamed(CNT_FORGED_RELATED.to_string()),
            Stmt::Drop,
        ])
        .with_comment("related to a connection the pod behind this veth is not part of"),
    );
    rules.push(Rule::new(vec![Stmt::Accept]).with_comment("an error from a router or a node"));
    rs.add_counter(CNT_FORGED_RELATED.to_string());
    rs.add_chain(Chain {
        name: CHAIN_RELATED.to_string(),
        base: None,
        comment: "related packets: from a pod, only about its own connections".to_string(),
        rules,
    });
}

/// The overlay's guard: the input chain jumps here for a new packet to the overlay port; a node's
/// underlay address is accepted (the VXLAN socket decapsulates it; nothing after this in the chain
/// would stop it), anything else is counted and dropped. Without it a pod, or any host that
/// reaches a node, could send a VXLAN datagram whose inner packet carries another pod's address:
/// decapsulated, it would enter through the overlay device, where no source guard looks, and meet
/// the policies as that pod. The postrouting chain jumps to `tunnel_out` for a new packet to the
/// port: our InternalIP to a node's is accepted there (an outer packet this node sends), the rest
/// returns to the walk.
///
/// Outer packets between nodes are not tracked (`tunnel_untrack_in`, `tunnel_untrack_out`, before
/// conntrack): each end sends from a source port hashed from the inner flow, so conntrack never
/// sees an answer; every inner connection left two unreplied entries behind for 30 s (conntrack
/// table room a busy node needs), and every outer packet paid a lookup and met our chains as new.
/// Only the exact node-to-node packets the guard accepts go untracked; anything else sending to
/// the port stays tracked and meets the guard as before (an untracked packet is not
/// `established` either: it always walks to the guard). Only while some route of ours goes over
/// the overlay (`Tunnel::carries_routes`): otherwise no outer packet flows, and the two chains
/// would only cost every packet of the node a hook's entry.
fn tunnel(rs: &mut Ruleset, t: &Tunnel) {
    if t.carries_routes {
        untrack_outer_packets(rs, t);
    }
    let mut rules = Vec::new();
    for fam in Family::BOTH {
        rs.add_set(addr_set(
            tunnel_peers_set(fam),
            fam,
            comment("underlay addresses of the nodes: who may send to the overlay port"),
            &t.peers,
        ));
        rs.add_set(addr_set(
            tunnel_local_set(fam),
            fam,
            comment("this node's InternalIPs: where the nodes send the overlay's packets"),
            &t.local,
        ));
        rules.push(
            accept_between(fam, tunnel_peers_set(fam), tunnel_local_set(fam))
                .with_comment("a node to our InternalIP: the overlay decapsulates it"),
        );
    }
    rules.push(
        Rule::new(vec![
            Stmt::CounterNamed(CNT_FORGED_OVERLAY.to_string()),
            Stmt::Drop,
        ])
        .with_comment("forged overlay packet: not a node, or not to our InternalIP"),
    );
    rs.add_counter(CNT_FORGED_OVERLAY.to_string());
    rs.add_chain(Chain {
        name: CHAIN_TUNNEL.to_string(),
        base: None,
        comment: "new packets to the overlay port: nodes only".to_string(),
        rules,
    });
    let sends = Family::BOTH
        .into_iter()
        .map(|fam| {
            accept_between(fam, tunnel_local_set(fam), tunnel_peers_set(fam))
                .with_comment("our InternalIP to a node: an overlay packet this node sends")
        })
        .collect();
    rs.add_chain(Chain {
        name: CHAIN_TUNNEL_OUT.to_string(),
        base: None,
        comment: "new packets this node sends to the overlay port of a node".to_string(),
        rules: sends,
    });
}

/// `tunnel_untrack_in` and `tunnel_untrack_out`: the node-to-node packets to the overlay port
/// skip conntrack (see `tunnel`).
fn untrack_outer_packets(rs: &mut Ruleset, t: &Tunnel) {
    let untracked = |fam: Family, from: &str, to: &str| {
        let mut stmts = vec![Stmt::L4Proto(Protocol::Udp), Stmt::Dport(t.port)];
        stmts.extend(between(fam, from, to));
        stmts.push(Stmt::Notrack);
        Rule::new(stmts)
    };
    for (name, hook, what, outgoing) in [
        (
            CHAIN_UNTRACK_IN,
            Hook::Prerouting,
            "overlay packets from a node to our InternalIP: not tracked",
            false,
        ),
        (
            CHAIN_UNTRACK_OUT,
            Hook::Output,
            "overlay packets from our InternalIP to a node: not tracked",
            true,
        ),
    ] {
        let rules = Family::BOTH
            .into_iter()
            .map(|fam| {
                let (peers, local) = (tunnel_peers_set(fam), tunnel_local_set(fam));
                if outgoing {
                    untracked(fam, local, peers)
                } else {
                    untracked(fam, peers, local)
                }
            })
            .collect();
        rs.add_chain(Chain {
            name: name.to_string(),
            base: Some(BaseHook {
                kind: ChainKind::Filter,
                hook,
                priority: PRIORITY_UNTRACK,
            }),
            comment: what.to_string(),
            rules,
        });
    }
}

/// `ip saddr @from ip daddr @to accept` (or ip6, for `fam`).
fn accept_between(fam: Family, from: &str, to: &str) -> Rule {
    let [s, d] = between(fam, from, to);
    Rule::new(vec![s, d, Stmt::Accept])
}

/// `ip saddr @from ip daddr @to` (or ip6, for `fam`).
fn between(fam: Family, from: &str, to: &str) -> [Stmt; 2] {
    [
        Stmt::AddrInSet {
            family: fam,
            field: AddrField::Saddr,
            set: from.to_string(),
        },
        Stmt::AddrInSet {
            family: fam,
            field: AddrField::Daddr,
            set: to.to_string(),
        },
    ]
}

/// Egress NAT: a nat chain at srcnat, after every policy check (postrouting 90), masquerades what a
/// pod of the cluster sends to an address outside the exempt ranges (pod networks, node addresses,
/// configured exceptions). Only the first packet of a connection meets it (conntrack NATs the rest
/// and the replies), so connections the outside opens to a pod keep the client's address.
fn egress_nat(rs: &mut Ruleset, nat: &EgressNat) {
    let mut rules = Vec::new();
    for fam in Family::BOTH {
        let v6 = fam == Family::V6;
        let ranges = |nets: &[ipnet::IpNet]| -> BTreeSet<Elem> {
            let empty: &[ipnet::IpNet] = &[];
            intervals::block_ranges(
                nets.iter()
                    .filter(|n| n.addr().is_ipv6() == v6)
                    .map(|n| (n, empty)),
            )
            .into_iter()
            .map(|(a, b)| Elem::range(a, b))
            .collect()
        };
        let key = addr_key(fam);
        rs.add_set(Set {
            name: nat_sources_set(fam).to_string(),
            key,
            interval: true,
            verdict_map: false,
            comment: comment("the cluster's pod networks: sources egress NAT applies to"),
            elements: ranges(&nat.sources),
        });
        rs.add_set(Set {
            name: nat_exempt_set(fam).to_string(),
            key,
            interval: true,
            verdict_map: false,
            comment: comment(
                "pod networks, node addresses, exceptions: destinations kept as they are",
            ),
            elements: ranges(&nat.exempt),
        });
        rules.push(
            Rule::new(vec![
                Stmt::AddrInSet {
                    family: fam,
                    field: AddrField::Saddr,
                    set: nat_sources_set(fam).to_string(),
                },
                Stmt::AddrNotInSet {
                    family: fam,
                    field: AddrField::Daddr,
                    set: nat_exempt_set(fam).to_string(),
                },
                Stmt::Masquerade,
            ])
            .with_comment("pod to outside the cluster: the node's address"),
        );
    }
    rs.add_chain(Chain {
        name: CHAIN_EGRESS_NAT.to_string(),
        base: Some(BaseHook {
            kind: ChainKind::Nat,
            hook: Hook::Postrouting,
            priority: PRIORITY_EGRESS_NAT,
        }),
        comment: "masquerade of pod traffic leaving the cluster".to_string(),
        rules,
    });
}

/// The verdict-map lookups of one direction: the local pod's address (source for egress,
/// destination for ingress) to its group chain.
fn vmap_lookups(dir: Direction) -> Vec<Rule> {
    let field = match dir {
        Direction::Egress => AddrField::Saddr,
        Direction::Ingress => AddrField::Daddr,
    };
    Family::BOTH
        .into_iter()
        .map(|fam| {
            Rule::new(vec![Stmt::VmapLookup {
                family: fam,
                field,
                map: map_name(dir, fam).to_string(),
            }])
        })
        .collect()
}
