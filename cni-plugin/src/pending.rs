//! The node contract's plugin side: the lock, the pending mark in `inet palisade`, and the
//! attachment record (ARCHITECTURE.md, "The node contract").
//!
//! The pending mark is added and removed with one nf_tables transaction sent over nfnetlink by
//! `palisade_nft::setelem` (tens of microseconds; addresses travel as bytes of `IpAddr`s, never as
//! text). There is no libnftables or `nft` fallback here: they reach the kernel the same way, so
//! whatever refuses the netlink batch (no privilege, no nf_tables) refuses them too, and loading
//! libnftables alone used to cost a millisecond per ADD. The sockets act on the network namespace
//! of the calling thread: call these from a thread in the node's.

use crate::error::{Error, Result};
use palisade_contract as contract;
use palisade_nft::setelem::{self, ElementOp, ElementWriter, Key, SetOp};
use std::fs;
use std::net::IpAddr;
use std::path::Path;

pub use contract::lock::NodeLock;

/// Blocks until the node lock of `state_dir` is ours (the contract's one implementation), with
/// the attachments directory made for the record written under it.
pub fn lock_node(state_dir: &Path) -> Result<NodeLock> {
    fs::create_dir_all(contract::attachments_dir(state_dir)).map_err(|e| {
        Error::io(
            format!("creating state directory {}", state_dir.display()),
            e,
        )
    })?;
    NodeLock::acquire(state_dir).map_err(|e| Error::io(e.to_string(), e.source))
}

/// Whether a mark could be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Marked,
    /// `table inet palisade` (or its pending sets) does not exist: the agent has not run yet.
    TableAbsent,
}

fn set_for(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        contract::PENDING_SET_V4
    } else {
        contract::PENDING_SET_V6
    }
}

/// The element changes that mark `ips` pending.
pub fn mark_ops(ips: &[IpAddr]) -> Vec<ElementOp<'static>> {
    ips.iter()
        .map(|ip| (SetOp::Add, set_for(ip), Key::Addr(*ip)))
        .collect()
}

/// The element changes that remove the marks of `ips`: add then delete for each, in one batch, so
/// it succeeds whether or not the element is there.
pub fn unmark_ops(ips: &[IpAddr]) -> Vec<ElementOp<'static>> {
    ips.iter()
        .flat_map(|ip| {
            [
                (SetOp::Add, set_for(ip), Key::Addr(*ip)),
                (SetOp::Delete, set_for(ip), Key::Addr(*ip)),
            ]
        })
        .collect()
}

/// Runs one transaction on our table's pending sets; Ok(false) when the table or a set is absent.
fn apply(writer: &mut ElementWriter, ops: &[ElementOp<'_>]) -> Result<bool> {
    match writer.apply(contract::TABLE_FAMILY, contract::TABLE_NAME, ops) {
        Ok(()) => Ok(true),
        Err(e) if e.is_absent() => Ok(false),
        Err(e) => Err(Error::Nft(e.to_string())),
    }
}

/// Marks `ips` pending (call with the [`NodeLock`] held). The table's absence is learnt from the
/// mark itself (ENOENT), so ADD needs no separate probe.
pub fn mark(ips: &[IpAddr]) -> Result<Mark> {
    if ips.is_empty() {
        return Ok(Mark::Marked);
    }
    Ok(if apply(&mut ElementWriter::new(), &mark_ops(ips))? {
        Mark::Marked
    } else {
        Mark::TableAbsent
    })
}

/// Removes the pending marks of `ips` (call with the [`NodeLock`] held). Absent table: nothing to do.
///
/// Each mark is probed first (~0.05 ms) and only the ones still there are removed: the agent usually
/// cleared them long before DEL, and a process that commits to nf_tables waits ~8–16 ms when it
/// closes its netlink socket (the kernel frees the commit's transactions after an RCU grace period
/// first; see palisade-nft's `setelem`), which parallel DELs would otherwise queue for behind the
/// node lock. The probe cannot race: every writer of the
/// pending sets (this plugin, the agent) holds the node lock. Probes and removal share `writer`'s
/// socket; even a socket that only probed waits in its close when others committed just before, so
/// DEL hands it to its reaper ([`ElementWriter::into_fd`]) instead of closing it.
pub fn unmark(writer: &mut ElementWriter, ips: &[IpAddr]) -> Result<()> {
    let mut present = Vec::with_capacity(ips.len());
    for ip in ips {
        let there = writer
            .element_exists(
                contract::TABLE_FAMILY,
                contract::TABLE_NAME,
                set_for(ip),
                *ip,
            )
            .map_err(|e| Error::Nft(e.to_string()))?;
        if there {
            present.push(*ip);
        }
    }
    if present.is_empty() {
        return Ok(());
    }
    if !apply(writer, &unmark_ops(&present))? {
        tracing::debug!(
            ips = ?present,
            "table inet palisade is absent; no pending mark to remove"
        );
    }
    Ok(())
}

/// Whether our table and its pending sets exist (STATUS): one GETSET per set, nothing changed.
pub fn table_ready() -> Result<bool> {
    let exists = |set| {
        setelem::set_exists(contract::TABLE_FAMILY, contract::TABLE_NAME, set)
            .map_err(|e| Error::Nft(e.to_string()))
    };
    Ok(exists(contract::PENDING_SET_V4)? && exists(contract::PENDING_SET_V6)?)
}

/// The message for a node the agent has not programmed.
pub fn agent_absent_message() -> String {
    format!(
        "the palisade-agent has not programmed this node yet: table {} {} with sets {}/{} does not exist; \
         start palisade-agent (or set \"failOpen\": true in the network config to wire pods without policy)",
        contract::TABLE_FAMILY,
        contract::TABLE_NAME,
        contract::PENDING_SET_V4,
        contract::PENDING_SET_V6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_ops_put_each_address_into_the_set_of_its_family() {
        let ips: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        assert_eq!(
            mark_ops(&ips),
            vec![
                (SetOp::Add, contract::PENDING_SET_V4, Key::Addr(ips[0])),
                (SetOp::Add, contract::PENDING_SET_V6, Key::Addr(ips[1])),
            ]
        );
    }

    #[test]
    fn unmark_ops_add_before_they_delete_so_they_never_fail_on_absence() {
        let ip: IpAddr = "10.1.0.2".parse().unwrap();
        assert_eq!(
            unmark_ops(&[ip]),
            vec![
                (SetOp::Add, contract::PENDING_SET_V4, Key::Addr(ip)),
                (SetOp::Delete, contract::PENDING_SET_V4, Key::Addr(ip)),
            ]
        );
    }
}
