//! IP address management: the built-in allocator (host-local's on-disk layout and semantics) and
//! delegation to another IPAM plugin found in `CNI_PATH`, executed as libcni would.
//!
//! On-disk layout under `<dataDir>/<network>/` (identical to host-local, so either can read the
//! other's store): one file per reserved address named by the address and holding
//! `"<containerID>\r\n<ifname>"`, `last_reserved_ip.<rangeSetIndex>` for round robin, and `lock`,
//! flock'd exclusively around every allocation and release.

use crate::cni::{CniResult, Env};
use crate::config::{BuiltinIpam, Ipam, NetConf};
use crate::error::{Error, Result};
use ipnet::IpNet;
use palisade_contract::AttachmentKey;
use std::collections::HashSet;
use std::net::IpAddr;

mod delegate;
mod store;

pub use delegate::{exec_delegate, find_plugin, DelegateTarget};
pub use store::{RangeIter, Reservation, Store, LAST_RESERVED_PREFIX, LINE_BREAK, LOCK_FILE};

/// What IPAM gave one attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub ips: Vec<IpAddr>,
    /// Extra routes (destinations only: the pod always routes via our link-local gateway).
    pub routes: Vec<IpNet>,
    pub dns: Option<serde_json::Value>,
}

/// Runs IPAM ADD for an attachment.
pub fn add(conf: &NetConf, env: &Env) -> Result<Allocation> {
    match &conf.ipam {
        Ipam::Builtin(b) => {
            let store = Store::open(&b.data_dir, &conf.name)?;
            let mut requested = env.args.ips.clone();
            requested.extend(conf.requested_ips.iter().copied());
            let ips = store.allocate(&b.range_sets, &env.container_id, &env.ifname, &requested)?;
            Ok(Allocation {
                ips,
                routes: b.routes.clone(),
                dns: None,
            })
        }
        Ipam::Delegate { plugin } => {
            let r = exec_delegate(
                plugin,
                "ADD",
                env,
                &DelegateTarget::from_env(env),
                &conf.raw,
            )?
            .ok_or_else(|| Error::Delegate {
                plugin: plugin.clone(),
                code: crate::error::code::IO,
                msg: "ADD printed no result".into(),
                details: String::new(),
            })?;
            if r.ips.is_empty() {
                return Err(Error::Delegate {
                    plugin: plugin.clone(),
                    code: crate::error::code::IO,
                    msg: "ADD returned no IP address".into(),
                    details: String::new(),
                });
            }
            Ok(Allocation {
                ips: r.ips.iter().map(|i| i.address.addr()).collect(),
                routes: r.routes.iter().map(|r| r.dst).collect(),
                dns: r
                    .dns
                    .filter(|d| d.as_object().is_some_and(|o| !o.is_empty())),
            })
        }
    }
}

/// Releases what (container, ifname) holds. Unknown attachments are fine.
pub fn release(conf: &NetConf, env: &Env, target: &DelegateTarget) -> Result<()> {
    match &conf.ipam {
        Ipam::Builtin(b) => {
            let store = Store::open(&b.data_dir, &conf.name)?;
            let ips = store.release_by_id(&target.container_id, &target.ifname)?;
            tracing::debug!(container = %target.container_id, ifname = %target.ifname, ?ips, "released addresses");
            Ok(())
        }
        Ipam::Delegate { plugin } => {
            exec_delegate(plugin, "DEL", env, target, &conf.raw).map(|_| ())
        }
    }
}

/// Verifies the reservation of (container, ifname) holds `expected`.
pub fn check(conf: &NetConf, env: &Env, expected: &[IpAddr]) -> Result<()> {
    match &conf.ipam {
        Ipam::Builtin(b) => {
            let store = Store::open(&b.data_dir, &conf.name)?;
            let held = store.by_id(&env.container_id, &env.ifname)?;
            for ip in expected {
                if !held.contains(ip) {
                    return Err(Error::CheckFailed(format!(
                        "{ip} is not reserved for {}/{} in IPAM store {}",
                        env.container_id,
                        env.ifname,
                        b.data_dir.join(&conf.name).display()
                    )));
                }
            }
            Ok(())
        }
        Ipam::Delegate { plugin } => exec_delegate(
            plugin,
            "CHECK",
            env,
            &DelegateTarget::from_env(env),
            &conf.raw,
        )
        .map(|_| ()),
    }
}

/// Releases every reservation not in `valid`; forwards GC to a delegate.
pub fn gc(conf: &NetConf, env: &Env, valid: &HashSet<AttachmentKey>) -> Result<()> {
    match &conf.ipam {
        Ipam::Builtin(b) => gc_builtin(b, &conf.name, valid),
        Ipam::Delegate { plugin } => tolerate_unsupported(
            plugin,
            exec_delegate(plugin, "GC", env, &DelegateTarget::from_env(env), &conf.raw),
        ),
    }
}

fn gc_builtin(b: &BuiltinIpam, network: &str, valid: &HashSet<AttachmentKey>) -> Result<()> {
    let store = Store::open(&b.data_dir, network)?;
    let mut errors = crate::error::Errors::default();
    for r in store.reservations()? {
        let keep = valid
            .iter()
            .any(|k| Store::matches(&r, &k.container_id, &k.ifname));
        if !keep {
            tracing::info!(ip = %r.ip, container = %r.container_id, ifname = %r.ifname, "GC: releasing stale reservation");
            errors.keep(store.remove(r.ip));
        }
    }
    errors.into_result()
}

/// STATUS: the store can be opened (built-in) or the delegate says it is ready.
pub fn status(conf: &NetConf, env: &Env) -> Result<()> {
    match &conf.ipam {
        Ipam::Builtin(b) => Store::open(&b.data_dir, &conf.name)
            .map(|_| ())
            .map_err(|e| {
                Error::NotAvailable(format!(
                    "IPAM store {} is not usable: {e}",
                    b.data_dir.display()
                ))
            }),
        Ipam::Delegate { plugin } => tolerate_unsupported(
            plugin,
            exec_delegate(
                plugin,
                "STATUS",
                env,
                &DelegateTarget::from_env(env),
                &conf.raw,
            ),
        ),
    }
}

/// A delegate older than spec 1.1.0 answers GC/STATUS with "incompatible version" or "unknown
/// command": it has nothing to collect and no status to report, so that is not a failure.
fn tolerate_unsupported(plugin: &str, r: Result<Option<CniResult>>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(Error::Delegate { code, msg, .. })
            if code == crate::error::code::INCOMPATIBLE_VERSION
                || code == crate::error::code::INVALID_ENV =>
        {
            tracing::info!(
                plugin,
                code,
                msg,
                "delegate does not support this command; skipped"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}
