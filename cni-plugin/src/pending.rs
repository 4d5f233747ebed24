//! The node contract's plugin side: the lock, the pending mark in `inet palisade`, and the
//! attachment record (ARCHITECTURE.md, "The node contract").
//!
//! The pending mark is added with one `nft -j -f -` transaction whose JSON is built here with
//! serde_json; addresses only ever travel as JSON string values.

use crate::error::{Error, Result};
use palisade_contract::{self as contract, Attachment};
use serde_json::{json, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The nft binary (looked up on PATH, as the nftables crate does).
pub const NFT_BIN: &str = "nft";

/// The exclusive flock on `<stateDir>/nft.lock`; released on drop.
pub struct NodeLock {
    _file: File,
}

impl NodeLock {
    pub fn acquire(state_dir: &Path) -> Result<Self> {
        fs::create_dir_all(contract::attachments_dir(state_dir)).map_err(|e| {
            Error::io(
                format!("creating state directory {}", state_dir.display()),
                e,
            )
        })?;
        let path = contract::lock_path(state_dir);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        file.lock()
            .map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
        Ok(NodeLock { _file: file })
    }
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

fn element(ip: &IpAddr) -> Value {
    json!({ "element": {
        "family": contract::TABLE_FAMILY,
        "table": contract::TABLE_NAME,
        "name": set_for(ip),
        "elem": [ip.to_string()],
    }})
}

/// The batch that marks `ips` pending.
pub fn mark_batch(ips: &[IpAddr]) -> Value {
    let cmds: Vec<Value> = ips.iter().map(|ip| json!({ "add": element(ip) })).collect();
    json!({ "nftables": cmds })
}

/// The batch that removes the marks of `ips`: `add` then `delete` for each, so it succeeds whether
/// or not the element is there.
pub fn unmark_batch(ips: &[IpAddr]) -> Value {
    let mut cmds = Vec::new();
    for ip in ips {
        cmds.push(json!({ "add": element(ip) }));
        cmds.push(json!({ "delete": element(ip) }));
    }
    json!({ "nftables": cmds })
}

/// Whether nft's error says our table or set is missing.
fn is_absent(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

/// An `nft -j -f -` process started ahead of time: it loads while the plugin does other work and
/// touches nothing until it receives its batch on stdin (one atomic transaction). Started early so
/// its start-up (about 4 ms of dynamic loading) is off the critical path; the batch itself is still
/// written only with the node lock held.
pub struct Nft {
    child: Option<Child>,
}

impl Nft {
    /// Starts `nft -j -f -`, waiting for its batch.
    pub fn spawn() -> Result<Self> {
        let child = Command::new(NFT_BIN)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::Nft(format!(
                    "cannot run {NFT_BIN} (is nftables installed on this node?): {e}"
                ))
            })?;
        Ok(Nft { child: Some(child) })
    }

    /// Sends `batch` and waits; Ok(false) when our table or a pending set is absent.
    pub fn apply(mut self, batch: &Value) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Nft("nft process already used".into()));
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(batch.to_string().as_bytes())
                .map_err(|e| Error::Nft(format!("writing the batch to {NFT_BIN}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Nft(format!("waiting for {NFT_BIN}: {e}")))?;
        if out.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if is_absent(&stderr) {
            return Ok(false);
        }
        Err(Error::Nft(format!(
            "{NFT_BIN} -j -f - failed: {}",
            stderr.trim()
        )))
    }
}

/// An [`Nft`] being started on a helper thread, so the caller never waits for the fork/exec.
pub struct NftStarting(Option<std::thread::JoinHandle<Result<Nft>>>);

impl NftStarting {
    /// Starts `nft -j -f -` in the background.
    pub fn start() -> Self {
        NftStarting(
            std::thread::Builder::new()
                .name("nft-spawn".into())
                .spawn(Nft::spawn)
                .ok(),
        )
    }

    /// The started process (or a fresh one if the helper thread could not run).
    pub fn ready(mut self) -> Result<Nft> {
        match self.0.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Nft::spawn(),
        }
    }
}

impl Drop for NftStarting {
    /// Unused: reap the process (it gets EOF and changes nothing).
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Nft {
    /// An unused process gets an empty batch (EOF) and is reaped; it changes nothing.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// Runs one transaction on `nft` (or a fresh one); Ok(false) when our table or a set is absent.
fn apply(nft: Option<NftStarting>, batch: &Value) -> Result<bool> {
    match nft {
        Some(n) => n.ready()?.apply(batch),
        None => Nft::spawn()?.apply(batch),
    }
}

/// Marks `ips` pending (call with the [`NodeLock`] held), on `nft` if one was started early.
pub fn mark(nft: Option<NftStarting>, ips: &[IpAddr]) -> Result<Mark> {
    if ips.is_empty() {
        return Ok(Mark::Marked);
    }
    Ok(if apply(nft, &mark_batch(ips))? {
        Mark::Marked
    } else {
        Mark::TableAbsent
    })
}

/// Removes the pending marks of `ips` (call with the [`NodeLock`] held). Absent table: nothing to do.
pub fn unmark(nft: Option<NftStarting>, ips: &[IpAddr]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    if !apply(nft, &unmark_batch(ips))? {
        tracing::debug!(
            ?ips,
            "table inet palisade is absent; no pending mark to remove"
        );
    }
    Ok(())
}

/// Whether our table and its pending sets exist (STATUS).
pub fn table_ready() -> Result<bool> {
    let out = Command::new(NFT_BIN)
        .args([
            "-j",
            "list",
            "set",
            contract::TABLE_FAMILY,
            contract::TABLE_NAME,
            contract::PENDING_SET_V4,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::Nft(format!("cannot run {NFT_BIN}: {e}")))?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if is_absent(&stderr) {
        Ok(false)
    } else {
        Err(Error::Nft(format!(
            "{NFT_BIN} list set failed: {}",
            stderr.trim()
        )))
    }
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

/// Writes the attachment record atomically (temp file + rename: readers see the old state or the
/// whole new record, never a partial one). No fsync: after a node crash the pod namespaces are
/// gone anyway and the runtime's GC removes what is left.
pub fn write_record(state_dir: &Path, a: &Attachment) -> Result<()> {
    let path = contract::attachment_path(state_dir, &a.container_id, &a.ifname);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(a)
        .map_err(|e| Error::io("encoding the attachment record", e.into()))?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("writing attachment record {}", path.display()), e)
    })
}

/// Reads the record of (container, ifname), if any.
pub fn read_record(
    state_dir: &Path,
    container_id: &str,
    ifname: &str,
) -> Result<Option<Attachment>> {
    let path = contract::attachment_path(state_dir, container_id, ifname);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::io(
                format!("parsing attachment record {}", path.display()),
                e.into(),
            )
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(
            format!("reading attachment record {}", path.display()),
            e,
        )),
    }
}

/// Removes the record of (container, ifname); a missing one is fine.
pub fn remove_record(state_dir: &Path, container_id: &str, ifname: &str) -> Result<()> {
    let path = contract::attachment_path(state_dir, container_id, ifname);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing attachment record {}", path.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_batch_puts_addresses_only_in_json_values_of_the_right_set() {
        let ips: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let b = mark_batch(&ips);
        assert_eq!(
            b,
            json!({"nftables":[
                {"add":{"element":{"family":"inet","table":"palisade","name":"pending_v4","elem":["10.1.0.2"]}}},
                {"add":{"element":{"family":"inet","table":"palisade","name":"pending_v6","elem":["fd00::2"]}}}
            ]})
        );
    }

    #[test]
    fn unmark_batch_adds_before_it_deletes_so_it_never_fails_on_absence() {
        let b = unmark_batch(&["10.1.0.2".parse().unwrap()]);
        let cmds = b["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2);
        assert!(cmds[0].get("add").is_some());
        assert!(cmds[1].get("delete").is_some());
        assert_eq!(cmds[0]["add"], cmds[1]["delete"]);
    }

    #[test]
    fn records_are_written_atomically_read_back_and_removed() {
        let dir = std::env::temp_dir().join(format!("palisade-rec-{}", std::process::id()));
        let _lock = NodeLock::acquire(&dir).unwrap();
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            host_veth: contract::host_veth_name("c1", "eth0"),
            ips: vec!["10.1.0.2".parse().unwrap()],
            pod_namespace: Some("ns".into()),
            pod_name: Some("p".into()),
            pod_uid: Some("u".into()),
            pending: true,
        };
        write_record(&dir, &a).unwrap();
        assert_eq!(read_record(&dir, "c1", "eth0").unwrap(), Some(a.clone()));
        assert_eq!(contract::read_attachments(&dir).0, vec![a]);
        remove_record(&dir, "c1", "eth0").unwrap();
        remove_record(&dir, "c1", "eth0").unwrap();
        assert_eq!(read_record(&dir, "c1", "eth0").unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
