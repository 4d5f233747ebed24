//! palisade-agent: the node agent's edges around the pure core in `palisade-policy`.
//!
//! Rooms: `source` (kube watchers, manifest directory) converts objects into model changes and
//! sends them to `reconcile`, whose loop keeps the one cluster state inside the incremental compiler
//! (through `compiled`), runs on the pure timers of `schedule`, commits through `nft` while holding
//! the node `lock`, converges routes and the overlay with `route_sync` (`routes`, `overlay`), writes
//! the conflist with `cniconf` once the first sync succeeded, cuts revoked flows with `conntrack`, logs what the policies decided with `flow_log`,
//! reads its table back with `table_watch`, and reports through `server` and `metrics`. `attachments` watches the plugin's records. `cli`
//! holds the clap subcommands, `commands` what they do.

pub mod attachments;
pub mod cli;
pub mod cniconf;
pub mod commands;
pub mod compiled;
pub mod conntrack;
pub mod egress_nat;
pub mod error;
pub mod flow_log;
pub mod forged_metrics;
pub mod lock;
pub mod metrics;
pub mod nft;
pub mod overlay;
pub mod policy_metrics;
pub mod reconcile;
pub mod route_sync;
pub mod routes;
pub mod schedule;
pub mod server;
pub mod source;
pub mod table_watch;
pub mod tunnel_guard;
