//! palisade's real ruleset: the synthetic cluster converted by palisade-policy's k8s converters,
//! compiled by `palisade_policy::compile` for the node, rendered as the agent's full-replace batch
//! (nft JSON). This is exactly what the agent would commit at start.

use super::Rendered;
use crate::datapath::k8s;
use crate::datapath::workload::Cluster;
use crate::Result;

/// Compiles the node's ruleset and renders it as one `nft -j -f -` transaction.
pub fn render(cluster: &Cluster, node: &str) -> Result<Rendered> {
    let state = k8s::cluster_state(cluster)?;
    let compiled = palisade_policy::compile(&state, node);
    let stats = compiled.ruleset.stats();
    Ok(Rendered {
        nft_json: Some(compiled.ruleset.full_replace().to_json_string()),
        rules: stats.rules,
        elements: stats.elements,
        ..Rendered::default()
    })
}
