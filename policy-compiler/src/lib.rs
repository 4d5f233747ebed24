//! The pure core of palisade: the trimmed cluster model, the NetworkPolicy compiler, the typed nft
//! ruleset with its JSON rendering, the diff between two rulesets, and explain.
//!
//! Nothing here does I/O: no processes, no files, no sockets. Every test of this crate runs
//! without root; the rulesets meet the real kernel in palisade-tests (`tests/tests/compiler_*`).
//!
//! The agent's loop, in short:
//!
//! ```
//! use palisade_policy::model::{Change, ClusterState, Namespace};
//! use palisade_policy::{compile, diff, explain, Endpoint};
//!
//! let mut state = ClusterState::default();
//! // Sources turn watch events into changes (`pod_from_k8s`, `policy_from_k8s`, ... convert and
//! // validate k8s-openapi objects; a bad object is an error naming it, to log and skip).
//! state.apply(Change::UpsertNamespace(Namespace::new("default", Default::default())));
//! let first = compile(&state, "node-1");
//! let start = first.ruleset.full_replace(); // at start and on resync: `nft -j -f -` this
//! assert!(start.commands() > 0);
//! let next = compile(&state, "node-1");
//! let batch = diff(&first.ruleset, &next.ruleset); // afterwards: one transaction per change
//! assert!(batch.is_empty());
//! let why = explain(&state, &next, &"10.0.0.1".parse::<Endpoint>().unwrap(),
//!                   &"10.0.0.2".parse().unwrap(), 80, palisade_policy::model::Protocol::Tcp);
//! assert!(why.unwrap().allowed);
//! ```

pub mod error;
pub mod model;

pub use error::{ModelError, PolicyError};
pub use model::{
    namespace_from_k8s, node_from_k8s, pod_from_k8s, policy_from_k8s, Change, ClusterState,
};
pub mod compile;
pub mod diff;
pub mod explain;
#[cfg(any(test, feature = "testkit"))]
pub mod kernel_sim;
pub mod ruleset;
#[cfg(any(test, feature = "testkit"))]
pub mod scenarios;
#[cfg(any(test, feature = "testkit"))]
pub mod synth;

pub use compile::incremental::IncrementalCompiler;
pub use compile::{compile, Compiled};
pub use diff::{diff, diff_holding, DeclaredSizes};
pub use explain::{explain, with_placeholders, Endpoint, Explanation, Placeholder};
pub use ruleset::{Batch, Ruleset};
