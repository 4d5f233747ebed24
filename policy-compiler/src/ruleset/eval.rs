//! A reference evaluator of our typed ruleset: what the kernel would decide for one new packet.
//!
//! Used by tests to check that the ruleset implements the compiled model (the same answers as
//! `explain`), without root. It models only the statements we emit.

use super::names::{self_set, CHAIN_EGRESS_HOST, CHAIN_POSTROUTING};
use super::{AddrField, Elem, Family, Ruleset, Stmt};
use crate::model::Protocol;
use std::net::IpAddr;

/// One packet of a new connection (conntrack state `new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    /// `None` for a non-port protocol (e.g. ICMP).
    pub proto: Option<Protocol>,
    pub dport: u16,
    /// The source is an address of this node (`fib saddr type local`).
    pub from_this_node: bool,
}

/// Verdict of a chain walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// Fell off the end of a non-base chain.
    Return,
}

const MAX_DEPTH: usize = 16;

impl Ruleset {
    /// Runs a base chain (its policy is accept): `true` if the packet passes it.
    pub fn eval_base(&self, chain: &str, p: &Packet) -> bool {
        !matches!(self.eval_chain(chain, p, 0), Verdict::Drop)
    }

    /// Whether a forwarded packet passes this node's postrouting check (egress, then ingress).
    pub fn eval_forward(&self, p: &Packet) -> bool {
        self.eval_base(CHAIN_POSTROUTING, p)
    }

    /// Whether a packet to this node itself passes the input check.
    pub fn eval_to_host(&self, p: &Packet) -> bool {
        self.eval_base(CHAIN_EGRESS_HOST, p)
    }

    fn eval_chain(&self, name: &str, p: &Packet, depth: usize) -> Verdict {
        let Some(chain) = self.chains.get(name) else {
            return Verdict::Drop;
        };
        if depth > MAX_DEPTH {
            return Verdict::Drop;
        }
        'rules: for rule in &chain.rules {
            for s in &rule.stmts {
                match s {
                    Stmt::CtEstablished
                    | Stmt::CtRelated
                    | Stmt::CtInvalid
                    | Stmt::Icmpv6NeighbourDiscovery
                    | Stmt::Icmpv6Type(_)
                    | Stmt::Ip6HopLimit255 => continue 'rules,
                    // The model's packets are a connection's first; the flow log's rate limit and
                    // log statement never change a verdict.
                    // `notrack` only decides what conntrack sees, never a verdict.
                    Stmt::CtNew
                    | Stmt::CtNotConfirmed
                    | Stmt::Limit { .. }
                    | Stmt::Log { .. }
                    | Stmt::Notrack => {}
                    // The packet model has no input interface (it models what passed the source
                    // guard, which the kernel tests check): a packet with a local pod's source
                    // came in through a pod's veth, and the guard's rules never match here.
                    Stmt::IifnamePrefix(_) => {
                        let own = Elem::addr_pair(p.saddr, p.saddr);
                        if p.from_this_node
                            || !self
                                .sets
                                .get(self_set(Family::of(&p.saddr)))
                                .is_some_and(|s| s.elements.contains(&own))
                        {
                            continue 'rules;
                        }
                    }
                    Stmt::IifSaddrNotInSet { .. }
                    | Stmt::IifCtSaddrInSet { .. }
                    | Stmt::IifnameVmap { .. }
                    | Stmt::Ip6SaddrNotLinkLocal => continue 'rules,
                    Stmt::FibSaddrLocal | Stmt::NoInputInterface => {
                        if !p.from_this_node {
                            continue 'rules;
                        }
                    }
                    Stmt::FibSaddrNotLocal => {
                        if p.from_this_node {
                            continue 'rules;
                        }
                    }
                    Stmt::Masquerade => return Verdict::Accept,
                    Stmt::AddrNotInSet { family, field, set } => {
                        let ip = addr(p, *field);
                        if Family::of(&ip) != *family || self.set_has_addr(set, ip) {
                            continue 'rules;
                        }
                    }
                    Stmt::AddrInSet { family, field, set } => {
                        let ip = addr(p, *field);
                        if Family::of(&ip) != *family || !self.set_has_addr(set, ip) {
                            continue 'rules;
                        }
                    }
                    Stmt::SelfTraffic { family, set } => {
                        let want = Elem::addr_pair(p.saddr, p.daddr);
                        if Family::of(&p.saddr) != *family
                            || !self
                                .sets
                                .get(set)
                                .is_some_and(|s| s.elements.contains(&want))
                        {
                            continue 'rules;
                        }
                    }
                    Stmt::L4Proto(want) => {
                        if p.proto != Some(*want) {
                            continue 'rules;
                        }
                    }
                    Stmt::Dport(port) => {
                        if p.proto.is_none() || p.dport != *port {
                            continue 'rules;
                        }
                    }
                    Stmt::ProtoPortInSet { set } => {
                        let Some(proto) = p.proto else {
                            continue 'rules;
                        };
                        let hit = self.sets.get(set).is_some_and(|s| {
                            s.elements.iter().any(|e| matches!(e, Elem::ProtoPort(q, a, b) if *q == proto && *a <= p.dport && p.dport <= *b))
                        });
                        if !hit {
                            continue 'rules;
                        }
                    }
                    Stmt::DaddrProtoPortInSet { family, set } => {
                        let Some(proto) = p.proto else {
                            continue 'rules;
                        };
                        if Family::of(&p.daddr) != *family {
                            continue 'rules;
                        }
                        let want = Elem::AddrProtoPort(p.daddr, proto, p.dport);
                        if !self
                            .sets
                            .get(set)
                            .is_some_and(|s| s.elements.contains(&want))
                        {
                            continue 'rules;
                        }
                    }
                    Stmt::VmapLookup { family, field, map } => {
                        let ip = addr(p, *field);
                        if Family::of(&ip) != *family {
                            continue 'rules;
                        }
                        let target = self.sets.get(map).and_then(|m| {
                            m.elements.iter().find_map(|e| match e {
                                Elem::GotoChain(g) if g.0 == ip => Some(g.1.clone()),
                                _ => None,
                            })
                        });
                        match target {
                            // goto: the target's end is this chain's end.
                            Some(t) => return self.eval_chain(&t, p, depth + 1),
                            None => continue 'rules,
                        }
                    }
                    Stmt::Counter | Stmt::CounterNamed(_) => {}
                    Stmt::Accept => return Verdict::Accept,
                    Stmt::Drop => return Verdict::Drop,
                    Stmt::Return => return Verdict::Return,
                    // The goto'd chain's end is this chain's end.
                    Stmt::Goto(t) => return self.eval_chain(t, p, depth + 1),
                    Stmt::Jump(t) => match self.eval_chain(t, p, depth + 1) {
                        Verdict::Return => continue 'rules,
                        v => return v,
                    },
                }
            }
        }
        Verdict::Return
    }

    fn set_has_addr(&self, set: &str, ip: IpAddr) -> bool {
        self.sets.get(set).is_some_and(|s| {
            s.elements.iter().any(|e| match e {
                Elem::Addr(a) => *a == ip,
                Elem::Range(r) => {
                    let (a, b) = **r;
                    Family::of(&a) == Family::of(&ip) && a <= ip && ip <= b
                }
                _ => false,
            })
        })
    }
}

fn addr(p: &Packet, f: AddrField) -> IpAddr {
    match f {
        AddrField::Saddr => p.saddr,
        AddrField::Daddr => p.daddr,
    }
}
