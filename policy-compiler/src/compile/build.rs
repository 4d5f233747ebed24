//! From the semantic model to the ruleset (shape: ARCHITECTURE.md "The ruleset").
//!
//! Chains depend only on policy specs and on which combinations of policies select local pods;
//! pods, labels and addresses only ever change set and map elements.

use super::{
    intervals, Compiled, CompiledClusterPolicy, CompiledPolicy, CompiledRule, LocalPod, PriorityTie,
};
use crate::model::{Action, Direction, Protocol, Tier};
use crate::model::{EgressNat, FlowLog, Tunnel};
use crate::ruleset::names::{self, *};
use crate::ruleset::{
    AddrField, BaseHook, Chain, ChainKind, CtDir, Elem, Family, Hook, Rule, Ruleset, Set, SetKey,
    Stmt,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub(crate) fn build(c: &Compiled) -> (Ruleset, Vec<String>, Vec<PriorityTie>) {
    let LocalPart {
        mut rs,
        warnings,
        ties,
        tiers,
    } = local_part(c);
    for (name, t) in &tiers {
        rs.merge(tier_part(c, name, t));
    }
    // Sets named by their content are built once, for the first rule that names them.
    let mut sink = SetSink::new(&mut rs, &|_| false);
    for pol in c.policies.values() {
        policy_part_into(&mut sink, pol);
    }
    for cp in c.cluster_policies.values() {
        cluster_part_into(&mut sink, cp);
    }
    (rs, warnings, ties)
}

/// Where the sets of policies' rules go while their chains are built: into `rs`, except a set
/// named by its content (peer, ports and shared named-port sets: equal wherever they are built)
/// that `rs` holds already, or that `borrow` says the ruleset a part is built for holds up to
/// date: that one is only named (`borrowed`), not built again (at 100k pods, building a landing
/// pod's policy part was ~6.5 of its ~9 ms, nearly all of it four sets of 33k elements its node
/// held already).
pub(crate) struct SetSink<'r> {
    rs: &'r mut Ruleset,
    borrow: &'r dyn Fn(&str) -> bool,
    borrowed: BTreeSet<String>,
}

impl<'r> SetSink<'r> {
    pub fn new(rs: &'r mut Ruleset, borrow: &'r dyn Fn(&str) -> bool) -> Self {
        Self {
            rs,
            borrow,
            borrowed: BTreeSet::new(),
        }
    }

    /// Adds the set `make` builds, named `name`; `by_content`: its name says what it holds.
    fn add(&mut self, name: &str, by_content: bool, make: &dyn Fn() -> Set) {
        if by_content {
            if self.rs.sets.contains_key(name) || self.borrowed.contains(name) {
                return;
            }
            if (self.borrow)(name) {
                self.borrowed.insert(name.to_string());
                return;
            }
        }
        self.rs.add_set(make());
    }
}

/// One policy's part of the ruleset: its chains, counters and the sets it built, and the sets
/// named by their content it holds without building them ([`SetSink`]).
#[derive(Debug, Default)]
pub(crate) struct Part {
    pub rs: Ruleset,
    pub borrowed: BTreeSet<String>,
}

/// A chain a group jumps to that inlines the rules of several policies (so it changes only when
/// one of them does): one tier's ClusterNetworkPolicies in evaluation order, or the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TierChain {
    pub kind: Inlined,
    pub dir: Direction,
    /// Their keys, in evaluation order (audit: sorted).
    pub keys: Vec<String>,
}

/// What a [`TierChain`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inlined {
    /// One tier's ClusterNetworkPolicies.
    Tier(Tier),
    /// The NetworkPolicies in audit mode that would isolate the pods were they enforced: any rule
    /// that matches returns; otherwise the packet would have been dropped: counted, and logged
    /// (through `flow_audit_<dir>`) when the flow log is on.
    Audit,
}

/// What [`local_part`] makes.
pub(crate) struct LocalPart {
    /// Base chains, pending, self and source sets, verdict maps, group chains, egress NAT.
    pub rs: Ruleset,
    pub warnings: Vec<String>,
    pub ties: Vec<PriorityTie>,
    /// The tier chains the group chains jump to, by name (built apart, by [`tier_part`]: they
    /// hold the rules of many policies, and change only when one of those does).
    pub tiers: BTreeMap<String, TierChain>,
}

/// The objects that depend on local pods and pending addresses only: base chains, pending and
/// self sets, verdict maps and group chains; with the warnings, the priority ties and the tier
/// chains the groups need.
pub(crate) fn local_part(c: &Compiled) -> LocalPart {
    let mut rs = Ruleset::default();
    let mut tier_chains = BTreeMap::new();
    let mut warnings = Vec::new();
    // A verdict map holds one verdict per address: two local pods claiming one address (a stale
    // status) would make the kernel reject the whole batch. The first pod (by key) keeps it.
    let mut owner: BTreeMap<(Direction, IpAddr), &str> = BTreeMap::new();
    base(&mut rs, c);
    // The host veth of each local address (the attachment records'), and each veth's egress
    // group: the first pod (by key) whose address the veth carries.
    let veth_of: BTreeMap<IpAddr, &str> = c
        .sources
        .iter()
        .map(|(veth, ip)| (*ip, veth.as_str()))
        .collect();
    let mut links: BTreeMap<&str, String> = BTreeMap::new();
    // Group chains and the verdict maps pointing at them.
    let mut ties = BTreeSet::new();
    for pod in c.pods.values() {
        for dir in Direction::BOTH {
            if !pod.governed(dir) {
                continue;
            }
            let keys = pod.policies(dir);
            let group = pod.group_chain(dir);
            if !rs.chains.contains_key(&group) {
                let chain = group_chain_of(&mut tier_chains, c, pod, dir, group.clone());
                rs.add_chain(chain);
                if !keys.is_empty() {
                    rs.add_counter(group_counter(&group));
                    rs.add_counter(group_conn_counter(&group));
                }
            }
            for tier in Tier::BOTH {
                same_priority(c, pod, dir, tier, &mut ties);
            }
            for ip in &pod.ips {
                if let Some(first) = owner.get(&(dir, *ip)) {
                    warnings.push(format!(
                        "pods {first} and {} both claim address {ip}; {dir} of {ip} follows {first}'s policies",
                        pod.key
                    ));
                    continue;
                }
                owner.insert((dir, *ip), pod.key.as_str());
                if let Some(m) = rs.sets.get_mut(map_name(dir, Family::of(ip))) {
                    m.elements
                        .insert(Elem::goto_chain(*ip, group.clone().into()));
                }
                if let (Direction::Egress, Some(veth)) = (dir, veth_of.get(ip)) {
                    links.entry(veth).or_insert_with(|| group.clone());
                }
            }
        }
    }
    if let Some(m) = rs.sets.get_mut(MAP_EGRESS_LINKS) {
        m.elements.extend(
            links
                .into_iter()
                .map(|(veth, group)| Elem::iface_goto(veth.into(), group.into())),
        );
    }
    for p in c.policies.values() {
        if let Some(why) = &p.refused {
            warnings.push(format!(
                "NetworkPolicy {} is refused on this node: {why}; the pods it selects here are isolated in its directions and it allows them nothing (fail closed). Split it into smaller policies, or raise the limit of this node's agent",
                p.key
            ));
        }
    }
    for t in &ties {
        warnings.push(format!(
            "ClusterNetworkPolicies {} and {} ({} tier, priority {}) both select pods of this node for {}; {} is evaluated first (same priority: by name)",
            t.first, t.second, t.tier, t.priority, t.direction, t.first
        ));
    }
    LocalPart {
        rs,
        warnings,
        ties: ties.into_iter().collect(),
        tiers: tier_chains,
    }
}

/// The group chain of pods that the policies `keys` (NetworkPolicies) and `tiers`
/// (ClusterNetworkPolicies) select in `dir`: exemptions, the Admin tier, then the NetworkPolicies
/// (which decide) or else the Baseline tier, then the Kubernetes default (allowed). The tier
/// chains it jumps to are noted in `tiers`.
fn group_chain_of(
    tiers_needed: &mut BTreeMap<String, TierChain>,
    c: &Compiled,
    pod: &LocalPod,
    dir: Direction,
    name: String,
) -> Chain {
    let keys = pod.policies(dir);
    let tiers = pod.cluster(dir);
    let mut rules = group_exemptions(dir);
    let mut what = Vec::new();
    if !tiers.admin.is_empty() {
        rules.push(tier_jump(tiers_needed, c, &tiers.admin, Tier::Admin, dir));
        what.push(format!("Admin tier {}", tiers.admin.join(", ")));
    }
    // Where NetworkPolicies would be evaluated: what the audited ones would drop is judged here
    // (only for a pod no enforced NetworkPolicy isolates: see `LocalPod::audited`).
    if !pod.audited(dir).is_empty() {
        let keys = pod.audited(dir).to_vec();
        let name = names::audit_chain(&keys, dir);
        tiers_needed
            .entry(name.clone())
            .or_insert_with(|| TierChain {
                kind: Inlined::Audit,
                dir,
                keys,
            });
        rules.push(Rule::new(vec![Stmt::Jump(name)]).with_comment("audit mode"));
        what.push(format!("audit {}", pod.audited(dir).join(", ")));
    }
    if !keys.is_empty() {
        rules.extend(keys.iter().map(|k| {
            Rule::new(vec![Stmt::Jump(policy_chain(k, dir))])
                .with_comment(comment(&format!("policy {k}")))
        }));
        let why = format!(
            "{dir} of pods selected by {}: nothing allowed it",
            keys.join(", ")
        );
        rules.push(Rule::new(vec![
            Stmt::CtNotConfirmed,
            Stmt::CounterNamed(group_conn_counter(&name)),
        ]));
        rules.push(Rule::new(deny(c, group_counter(&name)).to_vec()).with_comment(comment(&why)));
        what.push(format!("policies {}", keys.join(", ")));
    } else {
        if !tiers.baseline.is_empty() {
            rules.push(tier_jump(
                tiers_needed,
                c,
                &tiers.baseline,
                Tier::Baseline,
                dir,
            ));
            what.push(format!("Baseline tier {}", tiers.baseline.join(", ")));
        }
        rules.push(
            Rule::new(vec![allow(dir)])
                .with_comment("no tier decided: allowed (the Kubernetes default)"),
        );
    }
    let text = if tiers.is_empty() && pod.audited(dir).is_empty() {
        format!("{dir} of pods selected by {}", keys.join(", "))
    } else {
        format!("{dir}: {}", what.join("; then "))
    };
    Chain {
        name,
        base: None,
        comment: comment(&text),
        rules,
    }
}

/// `jump` to the chain of one tier's ClusterNetworkPolicies `keys` (in evaluation order), noted in
/// `tiers_needed` (see [`tier_part`]).
fn tier_jump(
    tiers_needed: &mut BTreeMap<String, TierChain>,
    c: &Compiled,
    keys: &[String],
    tier: Tier,
    dir: Direction,
) -> Rule {
    let ordered: Vec<(String, u32)> = keys
        .iter()
        .filter_map(|k| c.cluster_policies.get(k))
        .map(|cp| (cp.key.clone(), cp.priority))
        .collect();
    let name = names::tier_chain(&ordered, tier, dir);
    tiers_needed
        .entry(name.clone())
        .or_insert_with(|| TierChain {
            kind: Inlined::Tier(tier),
            dir,
            keys: keys.to_vec(),
        });
    Rule::new(vec![Stmt::Jump(name)]).with_comment(comment(&format!("{tier} tier")))
}

/// The tier chain `name`: the rules of its ClusterNetworkPolicies inlined in evaluation order, so a
/// Pass (`return`) skips the rest of the tier; Accept and Deny end the direction's evaluation. It
/// only names the policies' sets (their parts hold them).
pub(crate) fn tier_part(c: &Compiled, name: &str, t: &TierChain) -> Ruleset {
    let tier = match t.kind {
        Inlined::Tier(tier) => tier,
        Inlined::Audit => return audit_part(c, name, t),
    };
    let dir = t.dir;
    let mut rules = Vec::new();
    let mut listed = Vec::new();
    for k in &t.keys {
        let Some(cp) = c.cluster_policies.get(k) else {
            continue;
        };
        listed.push(format!("{} ({})", cp.name, cp.priority));
        for r in cp.rules(dir).iter().filter(|r| !r.inert) {
            let what = format!("cnp {} {dir} rule {}: {}", cp.name, r.label(), r.action);
            let counter = cluster_counter(k, dir, r.action);
            for mut stmts in rule_matches(None, k, dir, &r.rule) {
                match r.action {
                    Action::Accept => {
                        stmts.extend([Stmt::CounterNamed(counter.clone()), allow(dir)])
                    }
                    Action::Deny => stmts.extend(deny(c, counter.clone())),
                    Action::Pass => {
                        stmts.extend([Stmt::CounterNamed(counter.clone()), Stmt::Return])
                    }
                }
                rules.push(Rule::new(stmts).with_comment(comment(&what)));
            }
        }
    }
    let mut rs = Ruleset::default();
    rs.add_chain(Chain {
        name: name.to_string(),
        base: None,
        comment: comment(&format!(
            "{} tier, {dir}, by priority: {}",
            tier,
            listed.join(", ")
        )),
        rules,
    });
    rs
}

/// The audit chain `name`: every rule of the NetworkPolicies in audit mode `t.keys` in turn, a
/// match returning to the group chain; past them all, the packet would have been dropped were they
/// enforced: counted (`cnt_<name>`) and handed to the audit log. It names
/// the policies' sets (their parts hold them).
fn audit_part(c: &Compiled, name: &str, t: &TierChain) -> Ruleset {
    let dir = t.dir;
    let mut rules = Vec::new();
    for k in &t.keys {
        let Some(pol) = c.policies.get(k) else {
            continue;
        };
        for r in pol.rules(dir).into_iter().flatten() {
            let what = format!("{k} {dir} rule {}", r.index);
            for mut stmts in rule_matches(None, k, dir, r) {
                stmts.push(Stmt::Return);
                rules.push(Rule::new(stmts).with_comment(comment(&what)));
            }
        }
    }
    let counter = group_counter(name);
    let mut last = vec![Stmt::CounterNamed(counter.clone())];
    if c.flow_log.is_some() {
        last.push(Stmt::Jump(flow_audit_chain(dir).to_string()));
    }
    rules.push(Rule::new(last).with_comment("no rule allows it: would be dropped"));
    let mut rs = Ruleset::default();
    rs.add_chain(Chain {
        name: name.to_string(),
        base: None,
        comment: comment(&format!(
            "audit, {dir}: would {} isolate it? ({})",
            if t.keys.len() == 1 {
                "this policy"
            } else {
                "these policies"
            },
            t.keys.join(", ")
        )),
        rules,
    });
    rs.add_counter(counter);
    rs
}

fn flow_audit_chain(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => CHAIN_FLOW_AUDIT_INGRESS,
        Direction::Egress => CHAIN_FLOW_AUDIT_EGRESS,
    }
}

/// Two ClusterNetworkPolicies of one tier with the same priority that select the same local pod in
/// `dir`: their order is by name (deterministic on every node), which the operator should know.
fn same_priority(
    c: &Compiled,
    pod: &LocalPod,
    dir: Direction,
    tier: Tier,
    ties: &mut BTreeSet<PriorityTie>,
) {
    let keys = pod.cluster(dir).tier(tier);
    for pair in keys.windows(2) {
        let (Some(a), Some(b)) = (
            c.cluster_policies.get(&pair[0]),
            c.cluster_policies.get(&pair[1]),
        ) else {
            continue;
        };
        if a.priority == b.priority {
            ties.insert(PriorityTie {
                direction: dir,
                tier,
                priority: a.priority,
                first: a.name.clone(),
                second: b.name.clone(),
            });
        }
    }
}

/// The counters and sets of one compiled ClusterNetworkPolicy (its rules are inlined in the tier
/// chains of the local part; `borrow`: see [`SetSink`]).
pub(crate) fn cluster_part(cp: &CompiledClusterPolicy, borrow: &dyn Fn(&str) -> bool) -> Part {
    let mut rs = Ruleset::default();
    let mut sink = SetSink::new(&mut rs, borrow);
    cluster_part_into(&mut sink, cp);
    let borrowed = sink.borrowed;
    Part { rs, borrowed }
}

fn cluster_part_into(sink: &mut SetSink<'_>, cp: &CompiledClusterPolicy) {
    for dir in Direction::BOTH {
        for r in cp.rules(dir).iter().filter(|r| !r.inert) {
            // The tier chains' rules count here (they live in the local part; the counters go
            // with the policy).
            if !rule_matches(Some(&mut *sink), &cp.key, dir, &r.rule).is_empty() {
                sink.rs.add_counter(cluster_counter(&cp.key, dir, r.action));
            }
        }
    }
}

/// The chains, counters and sets of one compiled policy (`borrow`: see [`SetSink`]).
pub(crate) fn policy_part(pol: &CompiledPolicy, borrow: &dyn Fn(&str) -> bool) -> Part {
    let mut rs = Ruleset::default();
    let mut sink = SetSink::new(&mut rs, borrow);
    policy_part_into(&mut sink, pol);
    let borrowed = sink.borrowed;
    Part { rs, borrowed }
}

fn policy_part_into(sink: &mut SetSink<'_>, pol: &CompiledPolicy) {
    for dir in Direction::BOTH {
        let Some(rules) = pol.rules(dir) else {
            continue;
        };
        if pol.audit {
            // Its rules live in the audit chains only; its part holds their sets.
            for r in rules {
                rule_matches(Some(&mut *sink), &pol.key, dir, r);
            }
        } else {
            policy(sink, pol, dir, rules);
        }
    }
}

/// A hash set of the addresses of family `fam` among `ips`.
fn addr_set<'a>(
    name: &str,
    fam: Family,
    comment: String,
    ips: impl IntoIterator<Item = &'a IpAddr>,
) -> Set {
    Set {
        name: name.to_string(),
        key: addr_key(fam),
        interval: false,
        verdict_map: false,
        comment,
        elements: ips
            .into_iter()
            .filter(|ip| Family::of(ip) == fam)
            .map(|ip| Elem::Addr(*ip))
            .collect(),
    }
}

/// `iifname "pal*"`: the packet came in through a pod's host veth (`contract::host_veth_name`).
fn from_pod_veth() -> Stmt {
    Stmt::IifnamePrefix(palisade_contract::HOST_VETH_PREFIX.to_string())
}

/// The first rules of a group chain (the packet belongs to a pod some policy isolates in `dir`):
/// traffic from this node to the pod (kubelet probes, hostNetwork pods) and a pod reaching itself
/// (semantics 38) are always allowed. In the group chain rather than the base chain, so that only
/// packets of isolated pods pay for these checks. A pod reaching itself comes in through a pod's
/// veth (the source guard then says it is the pod's own): source and destination alone are what
/// any host that routes to the pod can write, and were a way into every isolated pod.
fn group_exemptions(dir: Direction) -> Vec<Rule> {
    let mut rules = Vec::new();
    if dir == Direction::Ingress {
        // Sent by this node: no input interface, and its own source. The source alone is what
        // any host routing to the pod can write (the kernel drops IPv4 from outside claiming an
        // address of ours; IPv6 it forwards). A forwarded packet stops at the first compare: no
        // FIB lookup for it.
        rules.push(
            Rule::new(vec![
                Stmt::NoInputInterface,
                Stmt::FibSaddrLocal,
                Stmt::Accept,
            ])
            .with_comment("from this node (kubelet probes, hostNetwork)"),
        );
    }
    for fam in Family::BOTH {
        rules.push(
            Rule::new(vec![
                from_pod_veth(),
                Stmt::SelfTraffic {
                    family: fam,
                    set: self_set(fam).to_string(),
                },
                Stmt::Accept,
            ])
            .with_comment("a pod reaching itself (semantics 38)"),
        );
    }
    rules
}

fn base(rs: &mut Ruleset, c: &Compiled) {
    for fam in Family::BOTH {
        let key = addr_key(fam);
        rs.add_set(addr_set(
            pending_set(fam),
            fam,
            comment(
                "pod addresses wired by the CNI plugin whose policy is not compiled yet: dropped",
            ),
            &c.pending,
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
    // reaching itself) is in the group chains (`group_exemptions`), so a new connection of a pod no
    // policy selects costs two map lookups after the pending check, and no FIB lookup.
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
            // Sent by this node, not only claiming its address (see `group_exemptions`).
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

/// What a policy drop does: count in `counter`, then drop (through the flow log when it is on).
fn deny(c: &Compiled, counter: String) -> [Stmt; 2] {
    let counted = Stmt::CounterNamed(counter);
    match c.flow_log {
        Some(_) => [counted, Stmt::Goto(CHAIN_FLOW_DROP.to_string())],
        None => [counted, Stmt::Drop],
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
    let what = "forged source: not an address of the pod behind this veth";
    vec![
        Rule::new(vec![
            from_pod_veth(),
            Stmt::IifSaddrNotInSet {
                family: Family::V4,
                set: source_set(Family::V4).to_string(),
            },
            Stmt::CounterNamed(CNT_FORGED_SOURCE.to_string()),
            Stmt::Drop,
        ])
        .with_comment(what),
        Rule::new(vec![
            from_pod_veth(),
            Stmt::Ip6SaddrNotLinkLocal,
            Stmt::IifSaddrNotInSet {
                family: Family::V6,
                set: source_set(Family::V6).to_string(),
            },
            Stmt::CounterNamed(CNT_FORGED_SOURCE.to_string()),
            Stmt::Drop,
        ])
        .with_comment(what),
    ]
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

fn policy(sink: &mut SetSink<'_>, pol: &CompiledPolicy, dir: Direction, rules: &[CompiledRule]) {
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
fn rule_matches(
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
            peer_conds.push((
                Some(fam),
                Some(Stmt::AddrInSet {
                    family: fam,
                    field: peer_field,
                    set: name,
                }),
            ));
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
        peer_conds.push((
            Some(fam),
            Some(Stmt::AddrInSet {
                family: fam,
                field: peer_field,
                set: name,
            }),
        ));
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

/// What a policy rule that matches does: an ingress allow is final; an egress allow goes on to the
/// destination's ingress check (semantics 7), which ends in a verdict of its own.
fn allow(dir: Direction) -> Stmt {
    match dir {
        Direction::Ingress => Stmt::Accept,
        Direction::Egress => Stmt::Goto(CHAIN_INGRESS.to_string()),
    }
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

fn addr_key(fam: Family) -> SetKey {
    match fam {
        Family::V4 => SetKey::Ipv4,
        Family::V6 => SetKey::Ipv6,
    }
}

fn fam_word(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}
