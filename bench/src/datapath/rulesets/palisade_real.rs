//! palisade's real ruleset: the synthetic cluster converted by palisade-policy's k8s converters,
//! compiled by `palisade_policy::compile` for the node, rendered as the agent's full-replace batch
//! (nft JSON). This is exactly what the agent would commit at start, with the attachment records
//! the plugin would have written for the measured pods wired on this node (so the source guard
//! binds their veths to their addresses).

use super::Rendered;
use crate::datapath::k8s;
use crate::datapath::topo;
use crate::datapath::workload::{Cluster, BENCH_NS};
use crate::Result;
use palisade_contract::Attachment;
use palisade_policy::model::Change;
use palisade_policy::ruleset::names::source_set;
use palisade_policy::ruleset::{Family, Stmt};

/// Whether the source guard stays in (the A/B of `palisade` against `palisade-no-source-guard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceGuard {
    On,
    Off,
}

/// Compiles the node's ruleset and renders it as one `nft -j -f -` transaction.
pub fn render(cluster: &Cluster, node: &str, guard: SourceGuard) -> Result<Rendered> {
    let mut state = k8s::cluster_state(cluster)?;
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
    if guard == SourceGuard::Off {
        for chain in ruleset.chains.values_mut() {
            chain.rules.retain(|r| {
                !r.stmts
                    .iter()
                    .any(|s| matches!(s, Stmt::IifSaddrNotInSet { .. }))
            });
        }
        for fam in Family::BOTH {
            ruleset.sets.remove(source_set(fam));
        }
    }
    let stats = ruleset.stats();
    Ok(Rendered {
        nft_json: Some(ruleset.full_replace().to_json_string()),
        rules: stats.rules,
        elements: stats.elements,
        ..Rendered::default()
    })
}
