//! palisade's real ruleset: the synthetic cluster converted by palisade-policy's k8s converters,
//! compiled by `palisade_policy::compile` for the node, rendered as the agent's full-replace batch
//! (nft JSON). This is exactly what the agent would commit at start (the overlay in use, as with the
//! default `--encapsulation cross-subnet`), with the attachment records
//! the plugin would have written for the measured pods wired on this node (so the source guard
//! binds their veths to their addresses).

use super::Rendered;
use crate::datapath::k8s;
use crate::datapath::topo::{self, Underlay};
use crate::datapath::workload::{Cluster, BENCH_NS};
use crate::Result;
use palisade_contract::Attachment;
use palisade_policy::model::{Change, Tunnel};
use palisade_policy::ruleset::Stmt;

/// Which part of the ruleset is left out, for an A/B against `palisade` of what that part costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The ruleset as compiled.
    Whole,
    /// Without the source guard (`palisade-no-source-guard`).
    NoSourceGuard,
    /// Without the named counters of the per-policy metrics and the policies' `acc_` chains that
    /// count connections (`palisade-no-counters`).
    NoCounters,
    /// EXPERIMENT: without the inline guard; instead one ingress chain per measured pod's host veth
    /// in [`GUARD_TABLE`], comparing the source with the pod's address.
    IngressGuard,
    /// EXPERIMENT: [`Variant::IngressGuard`], and each base chain that held the inline guard opens
    /// with `meta iifgroup` [`PENDING_GROUP`] `drop` (the fail-closed rule for veths whose ingress
    /// chain is not made yet; no bench veth is in the group).
    IngressGuardGroup,
    /// EXPERIMENT: the base chains open with `iifname "pal*" jump guard` (a chain that returns for
    /// a bound source and drops the rest) and one `ct state vmap`, instead of two guard rules and
    /// the two ct state rules.
    LeanPrologue,
    /// EXPERIMENT: the source guard's sets (or, with `PALISADE_BENCH_SIZED_SETS=all`, every set and
    /// map without intervals) declared with a `size`: four times their elements, at least 1,024.
    SizedSets,
    /// EXPERIMENT: the IPv4 guard rule left to the kernel's strict reverse-path filter on the
    /// measured pods' host veths (`rp_filter=1`, set at load by [`super::load`]); IPv6 keeps its
    /// rule (IPv6 has no reverse-path filter).
    RpFilter,
    /// EXPERIMENT: no guard rule; tc filters on the measured pods' host veths instead
    /// ([`Rendered::tc_guard`]).
    TcGuard,
}

/// The device group of [`Variant::IngressGuardGroup`]'s fail-closed rule.
pub const PENDING_GROUP: u32 = 5259597;

/// The table of [`Variant::IngressGuard`]'s chains.
pub const GUARD_TABLE: &str = "palisade_guard";

/// `PALISADE_BENCH_GUARD_COPIES=<n>`: the source guard's rules n times over at the top of each base
/// chain (an experiment: whether the guard's cost grows with its rules, i.e. is the per-packet
/// evaluation of its expressions). Unset or unparsable: 1.
pub const GUARD_COPIES_ENV: &str = "PALISADE_BENCH_GUARD_COPIES";

fn guard_copies() -> usize {
    std::env::var(GUARD_COPIES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Puts `copies - 1` more copies of each chain's guard rules in front of them.
fn repeat_guard(ruleset: &mut palisade_policy::Ruleset, copies: usize) {
    for chain in ruleset.chains.values_mut() {
        let guard: Vec<_> = chain
            .rules
            .iter()
            .filter(|r| is_guard(r))
            .cloned()
            .collect();
        for _ in 1..copies {
            chain.rules.splice(0..0, guard.iter().cloned());
        }
    }
}

fn is_guard(rule: &palisade_policy::ruleset::Rule) -> bool {
    rule.stmts
        .iter()
        .any(|s| matches!(s, Stmt::IifSaddrNotInSet { .. }))
}

/// [`Variant::SizedSets`]: a `size` on the chosen sets of a rendered batch.
fn sized_sets(json: &str) -> Result<String> {
    let all = std::env::var("PALISADE_BENCH_SIZED_SETS").is_ok_and(|v| v == "all");
    let mut batch: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| crate::Error::Invalid(format!("rendered batch: {e}")))?;
    for item in batch["nftables"].as_array_mut().into_iter().flatten() {
        for kind in ["set", "map"] {
            let Some(set) = item
                .get_mut("add")
                .and_then(|a| a.get_mut(kind))
                .and_then(|s| s.as_object_mut())
            else {
                continue;
            };
            let name = set.get("name").and_then(|n| n.as_str()).unwrap_or_default();
            let interval = set
                .get("flags")
                .is_some_and(|f| f.to_string().contains("interval"));
            if interval || !(all || name.starts_with("sources_")) {
                continue;
            }
            let n = set
                .get("elem")
                .and_then(|e| e.as_array())
                .map_or(0, |e| e.len());
            set.insert("size".into(), (4 * n).max(1024).into());
        }
    }
    Ok(batch.to_string())
}

/// Compiles the node's ruleset and renders it as one `nft -j -f -` transaction.
pub fn render(
    cluster: &Cluster,
    node: &str,
    variant: Variant,
    underlay: Underlay,
) -> Result<Rendered> {
    let mut state = k8s::cluster_state(cluster)?;
    // What the agent's table holds on this underlay: on one subnet (kind; `--encapsulation
    // cross-subnet`, the default) the device exists and its port is guarded, but every route is
    // direct; on two subnets whose router routes the pod ranges (a cloud route table) the operator
    // runs `--encapsulation never`: no device, no rule; over the overlay, the guard and the outer
    // packets untracked.
    let tunnel = |carries_routes| Tunnel {
        port: topo::OVERLAY_UDP_PORT,
        peers: topo::node_underlays(),
        // Every node's: the bench measures the rule's cost, not whom it admits.
        local: topo::node_underlays(),
        carries_routes,
    };
    state.apply(Change::SetTunnel(match underlay {
        Underlay::Flat => Some(tunnel(false)),
        Underlay::RoutedDirect => None,
        Underlay::RoutedOverlay => Some(tunnel(true)),
    }));
    state.apply(Change::SetAttachments(
        cluster
            .pods
            .iter()
            .filter(|p| p.namespace == BENCH_NS && p.node == node)
            .map(|p| Attachment {
                container_id: topo::container_id(&p.name),
                ifname: topo::POD_IFNAME.into(),
                netns: String::new(),
                host_veth: topo::host_veth(&p.name),
                ips: vec![p.ip.into()],
                pod_namespace: Some(p.namespace.clone()),
                pod_name: Some(p.name.clone()),
                pod_uid: None,
                pending: false,
            })
            .collect(),
    ));
    let mut ruleset = palisade_policy::compile(&state, node).ruleset;
    let mut extra = None;
    let mut after = None;
    let mut rp_filter = Vec::new();
    let mut tc_guard = Vec::new();
    match variant {
        Variant::LeanPrologue => {
            let base: Vec<String> = ruleset
                .chains
                .iter()
                .filter(|(_, c)| c.base.is_some() && c.rules.iter().any(is_guard))
                .map(|(n, _)| n.clone())
                .collect();
            for name in &base {
                if let Some(chain) = ruleset.chains.get_mut(name) {
                    chain.rules.retain(|r| {
                        !is_guard(r)
                            && r.stmts != [Stmt::CtEstablished, Stmt::Accept]
                            && r.stmts != [Stmt::CtRelated, Stmt::Jump("related".into())]
                            && r.stmts != [Stmt::CtInvalid, Stmt::Drop]
                    });
                }
            }
            let t = palisade_contract::TABLE_NAME;
            let mut text = format!(
                "add chain inet {t} guard\n\
                 add rule inet {t} guard meta nfproto ipv4 iifname . ip saddr @sources_v4 return\n\
                 add rule inet {t} guard meta nfproto ipv4 counter drop comment \"forged source\"\n\
                 add rule inet {t} guard ip6 saddr != :: ip6 saddr != fe80::/10 iifname . ip6 saddr != @sources_v6 counter drop comment \"forged source\"\n"
            );
            for name in &base {
                text.push_str(&format!(
                    "insert rule inet {t} {name} ct state vmap {{ established : accept, related : jump related, invalid : drop }}\n\
                     insert rule inet {t} {name} iifname \"pal*\" jump guard\n"
                ));
            }
            after = Some(text);
        }
        Variant::IngressGuard | Variant::IngressGuardGroup => {
            if variant == Variant::IngressGuardGroup {
                let t = palisade_contract::TABLE_NAME;
                after = Some(
                    ruleset
                        .chains
                        .iter()
                        .filter(|(_, c)| c.base.is_some() && c.rules.iter().any(is_guard))
                        .map(|(name, _)| {
                            format!(
                                "insert rule inet {t} {name} meta iifgroup {PENDING_GROUP} drop\n"
                            )
                        })
                        .collect(),
                );
            }
            for chain in ruleset.chains.values_mut() {
                chain.rules.retain(|r| !is_guard(r));
            }
            // The source sets stay: the related chain also reads them (and a set costs a packet
            // nothing unless a rule looks it up).
            let mut t = format!("table inet {GUARD_TABLE} {{\n");
            for (i, p) in cluster
                .pods
                .iter()
                .filter(|p| p.namespace == BENCH_NS && p.node == node)
                .enumerate()
            {
                t.push_str(&format!(
                    "  chain g{i} {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n    meta nfproto ipv4 ip saddr != {} counter drop\n    meta nfproto ipv6 ip6 saddr != {{ fe80::/10, :: }} counter drop\n  }}\n",
                    topo::host_veth(&p.name),
                    p.ip
                ));
            }
            t.push_str("}\n");
            extra = Some(t);
        }
        Variant::NoSourceGuard => {
            for chain in ruleset.chains.values_mut() {
                chain.rules.retain(|r| !is_guard(r));
            }
            // The source sets stay: the related chain also reads them (and a set costs a packet
            // nothing unless a rule looks it up).
        }
        Variant::NoCounters => {
            // A policy's matching rules go to its `acc_` chain only to be counted: they allow
            // directly instead, and the rules that only count go.
            let verdicts: std::collections::BTreeMap<String, Stmt> = ruleset
                .chains
                .iter()
                .filter(|(n, _)| n.starts_with("acc_"))
                .filter_map(|(n, c)| Some((n.clone(), c.rules.last()?.stmts.last()?.clone())))
                .collect();
            ruleset.chains.retain(|n, _| !verdicts.contains_key(n));
            for chain in ruleset.chains.values_mut() {
                for r in &mut chain.rules {
                    r.stmts.retain(|s| !matches!(s, Stmt::CounterNamed(_)));
                    let direct = match r.stmts.last() {
                        Some(Stmt::Goto(t)) => verdicts.get(t).cloned(),
                        _ => None,
                    };
                    if let (Some(v), Some(last)) = (direct, r.stmts.last_mut()) {
                        *last = v;
                    }
                }
                chain
                    .rules
                    .retain(|r| !(r.stmts.is_empty() || r.stmts == [Stmt::CtNotConfirmed]));
            }
            ruleset.counters.clear();
        }
        Variant::RpFilter => {
            for chain in ruleset.chains.values_mut() {
                chain.rules.retain(|r| {
                    !r.stmts.iter().any(|s| {
                        matches!(
                            s,
                            Stmt::IifSaddrNotInSet {
                                family: palisade_policy::ruleset::Family::V4,
                                ..
                            }
                        )
                    })
                });
            }
            rp_filter = cluster
                .pods
                .iter()
                .filter(|p| p.namespace == BENCH_NS && p.node == node)
                .map(|p| topo::host_veth(&p.name))
                .collect();
        }
        Variant::TcGuard => {
            for chain in ruleset.chains.values_mut() {
                chain.rules.retain(|r| !is_guard(r));
            }
            tc_guard = cluster
                .pods
                .iter()
                .filter(|p| p.namespace == BENCH_NS && p.node == node)
                .map(|p| (topo::host_veth(&p.name), p.ip.to_string()))
                .collect();
        }
        Variant::Whole => repeat_guard(&mut ruleset, guard_copies()),
        Variant::SizedSets => {}
    }
    let stats = ruleset.stats();
    let mut json = ruleset.full_replace().to_json_string();
    if variant == Variant::SizedSets {
        json = sized_sets(&json)?;
    }
    Ok(Rendered {
        nft_json: Some(json),
        nft: extra,
        nft_after: after,
        rp_filter,
        tc_guard,
        rules: stats.rules,
        elements: stats.elements,
        ..Rendered::default()
    })
}
