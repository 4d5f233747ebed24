//! The `palisade` CNI plugin: routed pod wiring, host-local compatible IPAM, and the pending mark
//! that keeps a new pod isolated until palisade-agent has compiled its policy.
//!
//! Modules: `cni` (protocol: env, versions, results), `config` (stdin), `error` (codes), `ops`
//! (operations), `netlink` + `veth` (links, addresses, routes), `netns` (entering a namespace from
//! one thread), `ipam` (built-in allocator, delegation), `pending` (node contract: lock, mark, record), `reaper` (DEL's
//! link deletion after the answer).

pub mod cni;
pub mod config;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod ops;
pub mod pending;
pub mod reaper;
pub mod veth;

use cni::{Command, Env};
use config::NetConf;
use error::{Error, Result};

/// Runs one invocation; returns what to print on stdout on success (None: print nothing).
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<serde_json::Value>> {
    if env.command == Command::Version {
        let v = config::peek_version(stdin).unwrap_or_else(|| cni::CniVersion::LATEST.to_string());
        return Ok(Some(cni::version_result(&v)));
    }
    let conf = NetConf::parse(stdin)?;
    cni::check_version(conf.cni_version, env.command)?;
    match env.command {
        Command::Add => {
            let r = ops::add(env, &conf)?;
            Ok(Some(
                serde_json::to_value(r).map_err(|e| Error::io("encoding the result", e.into()))?,
            ))
        }
        Command::Del => ops::del(env, &conf).map(|_| None),
        Command::Check => ops::check(env, &conf).map(|_| None),
        Command::Status => ops::status(env, &conf).map(|_| None),
        Command::Gc => ops::gc(env, &conf).map(|_| None),
        Command::Version => Ok(None),
    }
}
