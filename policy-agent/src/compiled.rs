//! The agent's one door into the pure compiler (`palisade-policy`): compile, full replace, diff,
//! explain. Nothing else in the agent calls the compiler.

use palisade_policy::model::ClusterState;
use palisade_policy::{Compiled, Ruleset};

/// A compiled ruleset for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub compiled: Compiled,
    /// Objects the compiler skipped, each naming the object.
    pub warnings: Vec<String>,
}

impl Desired {
    /// The ruleset to enforce.
    pub fn ruleset(&self) -> &Ruleset {
        &self.compiled.ruleset
    }
}

impl Desired {
    /// Records pending marks the CNI plugin put into the kernel behind our back (read from the
    /// attachment records under the node lock), so the next diff removes the ones whose pod is now known.
    pub fn note_plugin_pending(&mut self, attachments: &[palisade_contract::Attachment]) {
        use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6};
        for a in attachments.iter().filter(|a| a.pending) {
            for ip in &a.ips {
                let name = if ip.is_ipv4() {
                    PENDING_SET_V4
                } else {
                    PENDING_SET_V6
                };
                if let Some(set) = self.compiled.ruleset.sets.get_mut(name) {
                    set.elements
                        .insert(palisade_policy::ruleset::Elem::Addr(*ip));
                }
            }
        }
    }
}

/// One transaction, ready for `nft`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub json: String,
    /// What the batch touches, for logs.
    pub stats: String,
}

/// Compiles the state for `node`.
pub fn compile(state: &ClusterState, node: &str) -> Desired {
    Desired {
        compiled: palisade_policy::compile(state, node),
        warnings: Vec::new(),
    }
}

/// One transaction that replaces our whole table with `d`.
pub fn full_replace(d: &Desired) -> String {
    d.ruleset().full_replace().to_json_string()
}

/// The transaction from `last` to `next`; `None` when nothing changes.
pub fn diff(last: &Desired, next: &Desired) -> Option<Batch> {
    let b = palisade_policy::diff(last.ruleset(), next.ruleset());
    if b.is_empty() {
        return None;
    }
    let s = next.ruleset().stats();
    Some(Batch {
        json: b.to_json_string(),
        stats: format!(
            "{} commands, {} bytes; target {} chains, {} rules, {} sets, {} elements",
            b.commands, b.bytes, s.chains, s.rules, s.sets, s.elements
        ),
    })
}

/// Explains `from` → `to` on `port` (stub until the compiler's explain lands).
pub fn explain(
    _state: &ClusterState,
    _from: &str,
    _to: &str,
    _port: &str,
) -> crate::error::Result<String> {
    Err(crate::error::Error::Compile(
        "explain is not available yet".into(),
    ))
}
