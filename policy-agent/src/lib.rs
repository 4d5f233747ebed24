//! palisade-agent: the node agent's edges around the pure core in `palisade-policy`.
//!
//! Rooms: `source` (kube watchers, manifest directory) feeds `reconcile`, which compiles with
//! `palisade_policy`, commits through `nft`, converges `routes`, writes the conflist with `cniconf` once the
//! first sync succeeded, and reports through `server`. `cli` holds the clap subcommands.

pub mod cniconf;
pub mod source;
