//! From the semantic model to the ruleset (shape: ARCHITECTURE.md "The ruleset").
//!
//! Chains depend only on policy specs and on which combinations of policies select local pods;
//! pods, labels and addresses only ever change set and map elements.
//!
//! This module builds the parts (the node's local part with its group and tier chains, one part
//! per policy); `base` writes the base chains every node holds, `rules` a policy rule's matches.

mod base;
mod lockdown;
mod rules;

use base::base;
#[cfg(test)]
pub(crate) use base::source_guard_rules;
pub(crate) use lockdown::lockdown;
use rules::{policy, rule_matches};

use super::{Compiled, CompiledClusterPolicy, CompiledPolicy, LocalPod, PriorityTie};
use crate::model::{Action, Direction, Tier};
use crate::ruleset::names::{self, *};
use crate::ruleset::{Chain, Elem, Family, Rule, Ruleset, Set, SetKey, Stmt};
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
    base(&mut rs, c, &c.pending);
    exemptions(&mut rs);
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
    // What no policy decides (from this node, a pod reaching itself): one shared chain.
    let mut rules = vec![Rule::new(vec![Stmt::Jump(exempt_chain(dir).to_string())])
        .with_comment("always allowed: from this node (ingress), a pod reaching itself")];
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
    part(borrow, |sink| cluster_part_into(sink, cp))
}

/// A part of its own, filled by `fill` (`borrow`: see [`SetSink`]).
fn part(borrow: &dyn Fn(&str) -> bool, fill: impl FnOnce(&mut SetSink<'_>)) -> Part {
    let mut rs = Ruleset::default();
    let mut sink = SetSink::new(&mut rs, borrow);
    fill(&mut sink);
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
    part(borrow, |sink| policy_part_into(sink, pol))
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

/// The exemption chains every group chain of a direction jumps to first (the packet belongs to a
/// pod some policy isolates): traffic from this node to the pod (kubelet probes, hostNetwork pods;
/// ingress) and a pod reaching itself (semantics 38) are always allowed. Reached from the group
/// chains rather than the base chains, so that only packets of isolated pods pay for these checks;
/// one chain for all groups, so that the table holds these rules once. A pod reaching itself comes
/// in through a pod's veth (the source guard then says it is the pod's own): source and
/// destination alone are what any host that routes to the pod can write, and were a way into every
/// isolated pod.
fn exemptions(rs: &mut Ruleset) {
    for dir in Direction::BOTH {
        let mut rules = Vec::new();
        if dir == Direction::Ingress {
            // Sent by this node: no input interface, and its own source. The source alone is what
            // any host routing to the pod can write (the kernel drops IPv4 from outside claiming
            // an address of ours; IPv6 it forwards). A forwarded packet stops at the first
            // compare: no FIB lookup for it.
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
        rs.add_chain(Chain {
            name: exempt_chain(dir).to_string(),
            base: None,
            comment: format!("{dir} of an isolated pod allowed whatever the policies say"),
            rules,
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

/// What a policy rule that matches does: an ingress allow is final; an egress allow goes on to the
/// destination's ingress check (semantics 7), which ends in a verdict of its own.
fn allow(dir: Direction) -> Stmt {
    match dir {
        Direction::Ingress => Stmt::Accept,
        Direction::Egress => Stmt::Goto(CHAIN_INGRESS.to_string()),
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
