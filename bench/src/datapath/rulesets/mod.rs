//! The rulesets of every compared system, rendered from the same [`NodeView`](crate::datapath::workload::NodeView), and how each is loaded
//! into (and removed from) a node namespace.
//!
//! - `none`: no policy at all (a).
//! - `iptables`: a MODEL of the kube-router / Calico iptables layout (b): a chain per pod and a chain
//!   per policy, evaluated in order, peers in ipsets; a change is a full `ipset restore` +
//!   `iptables-restore`.
//! - `naive-nft`: a MODEL of a naive nftables programmer (c): one rule per (pod, policy, peer) in one
//!   chain per direction; a change is a full `nft -f` of the table.
//! - `palisade`: the ruleset palisade-policy compiles for the node (the agent's full-replace batch).
//! - `palisade-no-source-guard`: the same without the source guard rules and sets (its cost).
//! - `palisade-no-counters`: the same without the named counters of the per-policy metrics.
//! - `palisade-no-cnp`: palisade for the same cluster without its ClusterNetworkPolicies (their cost,
//!   with `--cluster-policies`).
//! - `palisade-ingress-guard`: an experiment, the source guard moved to per-veth ingress chains.
//! - `palisade-sized-sets`: an experiment, sets declared with a size (fixed-size hash in the kernel).
//! - `palisade-after`: an experiment, palisade's table and then the `nft -f` commands of
//!   `$PALISADE_BENCH_AFTER/<node>.nft` (a hand-written change measured against `palisade`).
//! - `palisade-lean-prologue`: an experiment, the base chains' guard and ct state rules in fewer
//!   expressions (a jump to a guard chain, one `ct state vmap`).
//! - `palisade-rpfilter`: an experiment, the guard's IPv4 rule replaced by the kernel's strict
//!   reverse-path filter (`rp_filter=1`) on the measured pods' host veths.
//!
//! Every system, `none` included, runs with connection tracking on in the node namespaces (the
//! `bench_base` table below), as it is on any node that runs kube-proxy: so "no policy" differs from
//! the others only by the policy rules.

pub mod iptables;
pub mod naive_nft;
pub mod palisade_real;

use super::cmd::timed_in;
use super::topo::Underlay;
use super::workload::Cluster;
use crate::{Error, Result};
use std::time::Duration;

/// The compared systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    None,
    Iptables,
    NaiveNft,
    /// palisade's real compiler (palisade-policy).
    Palisade,
    /// The same without the source guard (its cost is the difference).
    PalisadeNoGuard,
    /// palisade for the cluster without its ClusterNetworkPolicies.
    PalisadeNoCnp,
    /// The same without the per-policy counters (their cost is the difference).
    PalisadeNoCounters,
    /// EXPERIMENT (not what the agent does): the source guard as one ingress-hook chain per
    /// measured pod's host veth (a constant compare of the source, no set, before conntrack),
    /// the base chains without it. Whether moving the guard off the base chains pays.
    PalisadeIngressGuard,
    /// EXPERIMENT: `palisade-ingress-guard` with what would keep it fail-closed for a veth whose
    /// chain the agent has not made yet: the plugin would create host veths in a device group of
    /// their own, the agent move each out of it once its chain is in, and each base chain open
    /// with `meta iifgroup <that group> drop` (here no veth is in the group: its cost, not its use).
    PalisadeIngressGuardGroup,
    /// EXPERIMENT: the base chains' prologue leaner: `iifname "pal*" jump` to a guard chain that
    /// returns for a bound source, and one `ct state vmap` for established, related and invalid.
    PalisadeLeanPrologue,
    /// EXPERIMENT: sets declared with a `size` (the kernel then picks its fixed-size hash over the
    /// resizable rhashtable): the source guard's sets, or every set and map with
    /// `PALISADE_BENCH_SIZED_SETS=all`.
    PalisadeSizedSets,
    /// EXPERIMENT: palisade's table, then the `nft -f` commands in `$PALISADE_BENCH_AFTER/<node>.nft`.
    PalisadeAfter,
    /// EXPERIMENT: the IPv4 source guard as the kernel's strict reverse-path filter on the measured
    /// pods' host veths instead of the guard's IPv4 rule.
    PalisadeRpFilter,
    /// EXPERIMENT: the source guard outside nftables: a tc BPF classifier (direct action) on the
    /// measured pods' host veths, `$PALISADE_BENCH_TC_GUARD/guard-<pod IPv4>.o` (the pod's
    /// address passes, any other IPv4 source is dropped; IPv6 only from fe80::/10 or ::), no
    /// guard rule in the base chains. The objects: `bench/results/alternate-20261207/tc-guard/`.
    PalisadeTcGuard,
}

impl System {
    pub const ALL: [System; 14] = [
        System::None,
        System::Iptables,
        System::NaiveNft,
        System::Palisade,
        System::PalisadeNoGuard,
        System::PalisadeNoCnp,
        System::PalisadeNoCounters,
        System::PalisadeIngressGuard,
        System::PalisadeIngressGuardGroup,
        System::PalisadeLeanPrologue,
        System::PalisadeSizedSets,
        System::PalisadeAfter,
        System::PalisadeRpFilter,
        System::PalisadeTcGuard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::None => "none",
            System::Iptables => "iptables-model",
            System::NaiveNft => "naive-nft-model",
            System::Palisade => "palisade",
            System::PalisadeNoGuard => "palisade-no-source-guard",
            System::PalisadeNoCnp => "palisade-no-cnp",
            System::PalisadeNoCounters => "palisade-no-counters",
            System::PalisadeIngressGuard => "palisade-ingress-guard",
            System::PalisadeIngressGuardGroup => "palisade-ingress-guard-group",
            System::PalisadeLeanPrologue => "palisade-lean-prologue",
            System::PalisadeSizedSets => "palisade-sized-sets",
            System::PalisadeAfter => "palisade-after",
            System::PalisadeRpFilter => "palisade-rpfilter",
            System::PalisadeTcGuard => "palisade-tc-guard",
        }
    }

    pub fn parse(s: &str) -> Option<System> {
        System::ALL
            .into_iter()
            .find(|sys| sys.name() == s)
            .or_else(|| {
                System::ALL
                    .into_iter()
                    .find(|sys| sys.name().starts_with(s))
            })
    }
}

/// The directory of `palisade-tc-guard`'s BPF objects, `guard-<pod IPv4>.o`.
pub const TC_GUARD_ENV: &str = "PALISADE_BENCH_TC_GUARD";

/// The directory of `palisade-after`'s `<node>.nft` files.
pub const AFTER_ENV: &str = "PALISADE_BENCH_AFTER";

/// Conntrack on in every run: a kube-proxy stand-in that only reads the ct state.
pub const BASE_TABLE: &str = "table inet bench_base {
  chain prerouting {
    type filter hook prerouting priority -150; policy accept;
    ct state new counter
  }
}
";

/// A ruleset rendered for one node, ready to load.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// `nft -f` input (naive nft model).
    pub nft: Option<String>,
    /// `nft -j -f` input (palisade compiled by palisade-policy).
    pub nft_json: Option<String>,
    /// `nft -f` input loaded after `nft_json` (an experiment's changes to palisade's table).
    pub nft_after: Option<String>,
    /// Interfaces that get `rp_filter=1` at load and `0` at clear (`palisade-rpfilter`).
    pub rp_filter: Vec<String>,
    /// (host veth, the pod's IPv4 address) that get `palisade-tc-guard`'s tc filters at load.
    pub tc_guard: Vec<(String, String)>,
    /// `ipset restore` input (iptables model).
    pub ipset: Option<String>,
    /// `iptables-restore` input (iptables model).
    pub iptables: Option<String>,
    /// Rules (iptables rules, or nft rules incl. chain statements) and set elements, for the report.
    pub rules: usize,
    pub elements: usize,
}

/// Renders `system`'s ruleset for one node of `cluster` on `underlay` (palisade's table holds
/// what the agent's would there: the overlay's rules only where it runs the overlay).
pub fn render(
    system: System,
    cluster: &Cluster,
    node: &str,
    underlay: Underlay,
) -> Result<Rendered> {
    let view = cluster.node_view(node);
    Ok(match system {
        System::None => Rendered::default(),
        System::Iptables => iptables::render(&view),
        System::NaiveNft => naive_nft::render(&view),
        System::Palisade => {
            palisade_real::render(cluster, node, palisade_real::Variant::Whole, underlay)?
        }
        System::PalisadeNoGuard => palisade_real::render(
            cluster,
            node,
            palisade_real::Variant::NoSourceGuard,
            underlay,
        )?,
        System::PalisadeNoCounters => {
            palisade_real::render(cluster, node, palisade_real::Variant::NoCounters, underlay)?
        }
        System::PalisadeIngressGuard => palisade_real::render(
            cluster,
            node,
            palisade_real::Variant::IngressGuard,
            underlay,
        )?,
        System::PalisadeIngressGuardGroup => palisade_real::render(
            cluster,
            node,
            palisade_real::Variant::IngressGuardGroup,
            underlay,
        )?,
        System::PalisadeLeanPrologue => palisade_real::render(
            cluster,
            node,
            palisade_real::Variant::LeanPrologue,
            underlay,
        )?,
        System::PalisadeSizedSets => {
            palisade_real::render(cluster, node, palisade_real::Variant::SizedSets, underlay)?
        }
        System::PalisadeTcGuard => {
            palisade_real::render(cluster, node, palisade_real::Variant::TcGuard, underlay)?
        }
        System::PalisadeRpFilter => {
            palisade_real::render(cluster, node, palisade_real::Variant::RpFilter, underlay)?
        }
        System::PalisadeAfter => {
            let mut r =
                palisade_real::render(cluster, node, palisade_real::Variant::Whole, underlay)?;
            let dir = std::env::var(AFTER_ENV).map_err(|_| {
                crate::Error::Invalid(format!(
                    "palisade-after needs {AFTER_ENV}=<dir with <node>.nft>"
                ))
            })?;
            let path = std::path::Path::new(&dir).join(format!("{node}.nft"));
            r.nft_after = Some(
                std::fs::read_to_string(&path)
                    .map_err(crate::io_err(format!("reading {}", path.display())))?,
            );
            r
        }
        System::PalisadeNoCnp => {
            let mut without = cluster.clone();
            without.cluster_policies.clear();
            palisade_real::render(&without, node, palisade_real::Variant::Whole, underlay)?
        }
    })
}

/// Loads a rendered ruleset into `ns`; returns the wall time of the load (the "full reload" cost).
pub fn load(ns: &str, rendered: &Rendered) -> Result<Duration> {
    let mut total = Duration::ZERO;
    if let Some(ipset) = &rendered.ipset {
        total += timed_in(ns, "ipset", &["restore"], Some(ipset.as_bytes()))?.1;
    }
    if let Some(ipt) = &rendered.iptables {
        total += timed_in(ns, "iptables-restore", &[], Some(ipt.as_bytes()))?.1;
    }
    if let Some(nft) = &rendered.nft {
        total += timed_in(ns, "nft", &["-f", "-"], Some(nft.as_bytes()))?.1;
    }
    if let Some(json) = &rendered.nft_json {
        total += timed_in(ns, "nft", &["-j", "-f", "-"], Some(json.as_bytes()))?.1;
    }
    if let Some(nft) = &rendered.nft_after {
        total += timed_in(ns, "nft", &["-f", "-"], Some(nft.as_bytes()))?.1;
    }
    for (dev, ip) in &rendered.tc_guard {
        let dir = std::env::var(TC_GUARD_ENV).map_err(|_| {
            Error::Invalid(format!(
                "palisade-tc-guard needs ${TC_GUARD_ENV}: a directory of guard-<pod IPv4>.o"
            ))
        })?;
        let obj = format!("{dir}/guard-{ip}.o");
        total += timed_in(ns, "tc", &["qdisc", "add", "dev", dev, "clsact"], None)?.1;
        let args = [
            "filter",
            "add",
            "dev",
            dev,
            "ingress",
            "bpf",
            "da",
            "obj",
            &obj,
            "sec",
            "classifier",
        ];
        total += timed_in(ns, "tc", &args, None)?.1;
    }
    for dev in &rendered.rp_filter {
        let key = format!("net.ipv4.conf.{dev}.rp_filter=1");
        total += timed_in(ns, "sysctl", &["-qw", &key], None)?.1;
    }
    Ok(total)
}

/// Removes whatever `system` loaded into `ns`.
pub fn clear(ns: &str, system: System) -> Result<()> {
    match system {
        System::None => Ok(()),
        System::Iptables => {
            timed_in(
                ns,
                "iptables-restore",
                &[],
                Some(iptables::EMPTY.as_bytes()),
            )?;
            timed_in(ns, "ipset", &["destroy"], None)?;
            Ok(())
        }
        System::NaiveNft => {
            timed_in(
                ns,
                "nft",
                &["delete", "table", "inet", naive_nft::TABLE],
                None,
            )?;
            Ok(())
        }
        System::Palisade
        | System::PalisadeNoGuard
        | System::PalisadeNoCnp
        | System::PalisadeNoCounters
        | System::PalisadeIngressGuard
        | System::PalisadeIngressGuardGroup
        | System::PalisadeLeanPrologue
        | System::PalisadeSizedSets
        | System::PalisadeAfter
        | System::PalisadeRpFilter
        | System::PalisadeTcGuard => {
            if system == System::PalisadeTcGuard {
                // Every interface's clsact qdisc (only the tc guard adds one; an interface
                // without one answers an error, which is no error here).
                for dev in interfaces(ns)? {
                    let _ = timed_in(ns, "tc", &["qdisc", "del", "dev", &dev, "clsact"], None);
                }
            }
            if system == System::PalisadeRpFilter {
                // Every interface back to no reverse-path filter (the others' setting).
                for dev in interfaces(ns)?
                    .iter()
                    .map(String::as_str)
                    .chain(["all", "default"])
                {
                    let key = format!("net.ipv4.conf.{dev}.rp_filter=0");
                    timed_in(ns, "sysctl", &["-qw", &key], None)?;
                }
            }
            if matches!(
                system,
                System::PalisadeIngressGuard | System::PalisadeIngressGuardGroup
            ) {
                timed_in(
                    ns,
                    "nft",
                    &["delete", "table", "inet", palisade_real::GUARD_TABLE],
                    None,
                )?;
            }
            timed_in(
                ns,
                "nft",
                &["delete", "table", "inet", palisade_contract::TABLE_NAME],
                None,
            )?;
            Ok(())
        }
    }
}

/// The names of the interfaces in `ns` (`ip -j link show`'s `ifname`s, as testkit's
/// `Netns::links` reads them).
fn interfaces(ns: &str) -> Result<Vec<String>> {
    let out = super::cmd::run_in(ns, "ip", &["-j", "link", "show"], None)?;
    let links: Vec<serde_json::Value> = serde_json::from_str(&out).map_err(|e| Error::Parse {
        what: format!("ip -j link show in {ns}"),
        detail: e.to_string(),
    })?;
    Ok(links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

/// Loads the conntrack-on base table into a node namespace.
pub fn load_base(ns: &str) -> Result<()> {
    timed_in(ns, "nft", &["-f", "-"], Some(BASE_TABLE.as_bytes()))?;
    Ok(())
}

/// Joins ports for `tcp dport { .. }` / multiport.
pub(crate) fn join<T: std::fmt::Display>(items: &[T], sep: &str) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}
