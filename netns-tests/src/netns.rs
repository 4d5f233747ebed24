//! Named network namespaces (`ip netns`), and running things inside them.

use crate::cmd;
use crate::error::{LabError, Result};
use std::path::{Path, PathBuf};

/// Directory where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of a named namespace, as given to CNI in `CNI_NETNS`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates a namespace and brings its loopback up.
pub fn create(name: &str) -> Result<()> {
    cmd::ip(&["netns", "add", name])?;
    cmd::ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Pids of processes living in a namespace (`ip netns pids`).
pub fn pids(name: &str) -> Result<Vec<i32>> {
    let out = cmd::ip(&["netns", "pids", name])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Deletes a namespace after killing whatever still lives in it (all of it was started by the lab:
/// nothing else runs in our namespaces). Missing namespaces are fine.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    if let Ok(pids) = pids(name) {
        for pid in pids {
            crate::process::kill_and_wait(pid);
        }
    }
    cmd::ip(&["netns", "del", name]).map(|_| ())
}

/// Sets sysctls inside a namespace (`ip netns exec NS sysctl -qw k=v ...`).
pub fn sysctl(name: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", name, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    cmd::ip(&args).map(|_| ())
}

/// Packets counted by the rule of `table inet <table>` in a namespace whose listing contains
/// `needle` (a counting table a test or the lab wrote: `... <match> counter` rules).
pub fn counted(name: &str, table: &str, needle: &str) -> Result<u64> {
    let text = cmd::ip(&["netns", "exec", name, "nft", "list", "table", "inet", table])?;
    let parse = |detail: String| LabError::Parse {
        what: format!("table inet {table} in {name}"),
        detail,
    };
    let line = text
        .lines()
        .find(|l| l.contains(needle))
        .ok_or_else(|| parse(format!("no rule with {needle:?}: {text}")))?;
    line.split("packets ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| parse(format!("no packet count in {line:?}")))
}

/// Runs `nft -f -` with `script` inside a namespace.
pub fn nft(name: &str, script: &str) -> Result<()> {
    cmd::run(
        "ip",
        &["netns", "exec", name, "nft", "-f", "-"],
        Some(script.as_bytes()),
    )
    .map(|_| ())
    .map_err(|e| LabError::Command {
        what: format!("nft in {name}"),
        detail: e.to_string(),
    })
}
