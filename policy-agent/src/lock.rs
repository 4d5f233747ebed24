//! The node lock (ARCHITECTURE.md, "Lock") is the contract's: `palisade_contract::lock::NodeLock`,
//! the one implementation the plugin uses too. This room only gives its error the agent's type.

use crate::error::{Error, Result};
use std::path::Path;

pub use palisade_contract::lock::NodeLock;

/// Blocks until the node lock of `state_dir` is ours.
pub fn acquire(state_dir: &Path) -> Result<NodeLock> {
    NodeLock::acquire(state_dir).map_err(|e| Error::io(e.action, e.path, e.source))
}
