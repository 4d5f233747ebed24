//! What the `palisade` CNI plugin and `palisade-agent` agree on, on one node.
//!
//! Both binaries run on the same node and meet in three places: the nftables table the agent owns
//! (the plugin only adds elements to its `pending_*` sets), the attachment records the plugin writes
//! and the agent reads, and the conflist the agent writes and the runtime hands to the plugin.
//! Everything either side needs to find the other lives here, so the two can never drift apart.

pub mod cni;
pub mod file_error;
pub mod lock;
pub mod netconf;
pub mod records;

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// nftables family of our one table.
pub const TABLE_FAMILY: &str = "inet";
/// Name of our one table. Nothing else of ours exists in the kernel's ruleset.
pub const TABLE_NAME: &str = "palisade";
/// Pod IPv4 addresses that are wired but whose policy is not compiled yet: all their traffic is dropped.
pub const PENDING_SET_V4: &str = "pending_v4";
/// Pod IPv6 addresses that are wired but whose policy is not compiled yet: all their traffic is dropped.
pub const PENDING_SET_V6: &str = "pending_v6";

/// Default directory for palisade's node state (attachment records).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/palisade";
/// Sub-directory of the state directory holding one attachment record per (container, ifname).
pub const ATTACHMENTS_SUBDIR: &str = "attachments";
/// Lock file in the state directory. The plugin holds it (flock, exclusive) while it adds or removes
/// pending elements and writes or removes attachment records; the agent holds it while it reads the
/// records and commits a transaction. So a full replace of our table can never lose a pending mark.
pub const LOCK_FILE: &str = "nft.lock";
/// Default host-local compatible IPAM data directory.
pub const DEFAULT_IPAM_DATA_DIR: &str = "/var/lib/cni/networks";
/// Default CNI configuration directory that the runtime reads.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// File name of the conflist the agent writes.
pub const CONFLIST_FILE: &str = "10-palisade.conflist";
/// Network name used in the conflist.
pub const NETWORK_NAME: &str = "palisade";
/// CNI plugin `type` of palisade itself.
pub const PLUGIN_TYPE: &str = "palisade";
/// `ipam.type` that selects palisade's built-in (host-local compatible) allocator.
pub const BUILTIN_IPAM_TYPE: &str = "palisade";
/// Link-local gateway every pod routes through (Calico's choice; the host veth answers ARP by proxy).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Link-local IPv6 gateway every pod routes through (the host veth owns it).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Prefix of host-side veth names; the rest derives from the container id and ifname.
pub const HOST_VETH_PREFIX: &str = "pal";

/// One pod interface wired by the plugin, as recorded on disk for the agent, DEL and GC.
///
/// Written atomically (temp file + rename) by ADD before the interface is up; removed by DEL/GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// Path of the pod's network namespace as given in `CNI_NETNS`.
    pub netns: String,
    /// Host-side veth name.
    pub host_veth: String,
    /// Addresses of the pod, without prefix length.
    pub ips: Vec<std::net::IpAddr>,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`, if the runtime is a Kubernetes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// `K8S_POD_UID` from `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Whether ADD marked the pod's IPs pending in our table (false when the pod has no identity or
    /// the network is configured to fail open).
    #[serde(default)]
    pub pending: bool,
}

/// What identifies an attachment for the runtime and for GC: (container id, interface name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// The (container id, ifname) this record is for.
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// Whether this record, read from `path`, names only what the plugin could have made: its file
    /// is the one of its (container id, ifname), and its `hostVeth` is the name derived from them
    /// ([`host_veth_name`], our prefix). DEL and GC delete the host veth of a record, so a record
    /// naming any other link (`eth0`, `lo`, another pod's veth) is refused: `Err` says what differs.
    pub fn verify_own(&self, path: &Path) -> Result<(), String> {
        let file = attachment_path(Path::new(""), &self.container_id, &self.ifname);
        if path.file_name() != file.file_name() {
            return Err(format!(
                "its containerId {:?} and ifname {:?} do not match its file name",
                self.container_id, self.ifname
            ));
        }
        let derived = host_veth_name(&self.container_id, &self.ifname);
        if self.host_veth != derived {
            return Err(format!(
                "its hostVeth {:?} is not {derived:?}, the name derived from its containerId and ifname",
                self.host_veth
            ));
        }
        Ok(())
    }

    /// `namespace/name` of the pod, when the runtime told us.
    pub fn pod_key(&self) -> Option<String> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        }
    }
}

/// Directory of attachment records under a state directory.
pub fn attachments_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(ATTACHMENTS_SUBDIR)
}

/// The lock file of a state directory (see [`LOCK_FILE`]).
pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCK_FILE)
}

/// File of the attachment record for one (container id, ifname).
///
/// Container ids and ifnames are validated by the plugin (`[A-Za-z0-9][A-Za-z0-9_.-]*`, no `/`),
/// so the name is always a single path component.
pub fn attachment_path(state_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    attachments_dir(state_dir).join(format!("{container_id}_{ifname}.json"))
}

pub use records::{read_attachment_files, read_attachments, RecordFiles};

/// Host veth name for an attachment: `pal` + 12 hex digits of a stable hash of (container id, ifname).
/// Stable across processes and releases (FNV-1a, not std's randomised hasher), at most 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{HOST_VETH_PREFIX}{:012x}", h & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_is_stable_short_and_distinct_per_ifname() {
        let a = host_veth_name("abc123", "eth0");
        assert_eq!(a, host_veth_name("abc123", "eth0"));
        assert_ne!(a, host_veth_name("abc123", "eth1"));
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with(HOST_VETH_PREFIX));
    }

    #[test]
    fn a_record_naming_a_link_not_derived_from_its_ids_is_not_ours() {
        let dir = Path::new("/s");
        let mut a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            host_veth: host_veth_name("c1", "eth0"),
            ips: vec![],
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
            pending: false,
        };
        let path = attachment_path(dir, "c1", "eth0");
        assert_eq!(a.verify_own(&path), Ok(()));
        for foreign in [
            "eth0",
            "lo",
            "palffffffffffff",
            &host_veth_name("c2", "eth0"),
        ] {
            a.host_veth = foreign.to_string();
            let e = a.verify_own(&path).unwrap_err();
            assert!(e.contains("hostVeth"), "{e}");
        }
        // A record moved to another container's file name is not that container's either.
        a.host_veth = host_veth_name("c1", "eth0");
        assert!(a.verify_own(&attachment_path(dir, "c2", "eth0")).is_err());
    }

    #[test]
    fn attachment_round_trips_and_names_its_pod() {
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_veth: host_veth_name("c1", "eth0"),
            ips: vec!["10.0.0.2".parse().unwrap()],
            pod_namespace: Some("ns".into()),
            pod_name: Some("p".into()),
            pod_uid: None,
            pending: true,
        };
        let s = serde_json::to_string(&a).unwrap();
        assert!(s.contains("\"containerId\":\"c1\""), "{s}");
        let b: Attachment = serde_json::from_str(&s).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.pod_key().as_deref(), Some("ns/p"));
    }

    #[test]
    fn read_attachments_reports_bad_files_beside_good_ones() {
        let dir = std::env::temp_dir().join(format!("palisade-contract-{}", std::process::id()));
        std::fs::create_dir_all(attachments_dir(&dir)).unwrap();
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            host_veth: "palx".into(),
            ips: vec![],
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
            pending: false,
        };
        std::fs::write(
            attachment_path(&dir, "c1", "eth0"),
            serde_json::to_vec(&a).unwrap(),
        )
        .unwrap();
        std::fs::write(attachments_dir(&dir).join("broken.json"), b"{not json").unwrap();
        // A record listed but deleted before it is read (a dangling link reads as NotFound, the
        // same error a record removed by CNI DEL in between gives): gone, not bad.
        std::os::unix::fs::symlink(
            dir.join("deleted-meanwhile"),
            attachments_dir(&dir).join("gone.json"),
        )
        .unwrap();
        let (good, bad) = read_attachments(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(good, vec![a]);
        assert_eq!(bad.len(), 1, "only the broken record is bad: {bad:?}");
    }
}
