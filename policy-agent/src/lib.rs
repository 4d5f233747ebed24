//! palisade-agent: the node agent's edges around the pure core in `palisade-policy`.
//!
//! Rooms: `source` (kube watchers, manifest directory) feeds `reconcile`, which compiles with
//! `palisade_policy` (through `compiled`), commits through `nft` while holding the node `lock`, converges
//! `routes`, writes the conflist with `cniconf` once the first sync succeeded, and reports through
//! `server` and `metrics`. `attachments` watches the plugin's records. `cli` holds the clap subcommands,
//! `commands` what they do.

pub mod attachments;
pub mod cli;
pub mod cniconf;
pub mod commands;
pub mod compiled;
pub mod conntrack;
pub mod egress_nat;
pub mod error;
pub mod lock;
pub mod metrics;
pub mod nft;
pub mod overlay;
pub mod reconcile;
pub mod routes;
pub mod server;
pub mod source;
pub mod state;
