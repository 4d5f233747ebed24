//! The pure core of palisade: the trimmed cluster model, the NetworkPolicy compiler, the typed nft
//! ruleset with its JSON rendering, the diff between two rulesets, and explain.
//!
//! Nothing here does I/O: no processes, no files, no sockets. Every test of the library runs
//! without root; only the integration tests under `tests/` load rulesets into throwaway netns.

pub mod error;
pub mod model;

pub use error::{ModelError, PolicyError};
pub use model::{
    namespace_from_k8s, node_from_k8s, pod_from_k8s, policy_from_k8s, Change, ClusterState,
};
pub mod compile;
pub mod diff;
pub mod explain;
pub mod kernel_sim;
pub mod ruleset;
pub mod synth;

pub use compile::{compile, Compiled};
pub use diff::diff;
pub use explain::{explain, Endpoint, Explanation};
pub use ruleset::{Batch, Ruleset};
