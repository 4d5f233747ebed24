//! The attachment records on disk, read and written in one place (the I/O part of the contract,
//! beside `lock`): the plugin writes a record under the node lock before the pod's veth exists and
//! removes it on DEL or GC; the agent reads them all. A record is replaced atomically (a temp file
//! in the same directory, then rename), so a reader sees the old record or the whole new one.

use crate::file_error::FileError;
use crate::{attachment_path, attachments_dir, Attachment};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Why a record could not be written, read or removed (a record that is not valid JSON is the
/// OS error `InvalidData`).
pub type RecordError = FileError;

/// Writes (or replaces) the record of `a` atomically. No fsync: after a node crash the pod
/// namespaces are gone anyway and the runtime's GC removes what is left.
pub fn write(state_dir: &Path, a: &Attachment) -> Result<(), RecordError> {
    let path = attachment_path(state_dir, &a.container_id, &a.ifname);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(a)
        .map_err(|e| FileError::of("encoding attachment record", &path)(e.into()))?;
    let attempt = || -> std::io::Result<()> {
        fs::create_dir_all(attachments_dir(state_dir))?;
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        fs::rename(&tmp, &path)
    };
    attempt().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        FileError::of("writing attachment record", &path)(e)
    })
}

/// The record of (container, ifname), if there is one.
pub fn read(
    state_dir: &Path,
    container_id: &str,
    ifname: &str,
) -> Result<Option<Attachment>, RecordError> {
    let path = attachment_path(state_dir, container_id, ifname);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| FileError::of("parsing attachment record", &path)(e.into())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError::of("reading attachment record", &path)(e)),
    }
}

/// Removes the record of (container, ifname); a missing one is fine.
pub fn remove(state_dir: &Path, container_id: &str, ifname: &str) -> Result<(), RecordError> {
    let path = attachment_path(state_dir, container_id, ifname);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FileError::of("removing attachment record", &path)(e)),
    }
}

/// Reads every attachment record of a state directory; unreadable records are returned as errors
/// beside the good ones so one bad file never hides the others.
pub fn read_attachments(state_dir: &Path) -> (Vec<Attachment>, Vec<(PathBuf, String)>) {
    let (good, bad) = read_attachment_files(state_dir);
    (good.into_iter().map(|(_, a)| a).collect(), bad)
}

/// Records with the file each was read from.
pub type RecordFiles = Vec<(PathBuf, Attachment)>;

/// [`read_attachments`] with the file each record was read from (sorted by container id, ifname).
pub fn read_attachment_files(state_dir: &Path) -> (RecordFiles, Vec<(PathBuf, String)>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let dir = attachments_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return (good, bad),
        Err(e) => {
            bad.push((dir, e.to_string()));
            return (good, bad);
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Deleted between listing and reading (a CNI DEL or GC meanwhile): gone, not bad.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                bad.push((path, e.to_string()));
                continue;
            }
        };
        match serde_json::from_slice::<Attachment>(&bytes) {
            Ok(a) => good.push((path, a)),
            Err(e) => bad.push((path, e.to_string())),
        }
    }
    good.sort_by(|(_, a), (_, b)| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(container_id: &str) -> Attachment {
        Attachment {
            container_id: container_id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            host_veth: crate::host_veth_name(container_id, "eth0"),
            ips: vec!["10.1.0.2".parse().expect("ip")],
            pod_namespace: Some("ns".into()),
            pod_name: Some("p".into()),
            pod_uid: Some("u".into()),
            pending: true,
        }
    }

    #[test]
    fn a_record_is_written_read_back_listed_and_removed_twice() {
        let dir = std::env::temp_dir().join(format!("palisade-records-{}", std::process::id()));
        let a = record("c1");
        write(&dir, &a).expect("write");
        assert_eq!(read(&dir, "c1", "eth0").expect("read"), Some(a.clone()));
        assert_eq!(read_attachments(&dir), (vec![a], vec![]));
        remove(&dir, "c1", "eth0").expect("remove");
        remove(&dir, "c1", "eth0").expect("removing a missing record is fine");
        assert_eq!(read(&dir, "c1", "eth0").expect("read"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broken_record_is_an_error_naming_its_file_and_does_not_hide_the_others() {
        let dir = std::env::temp_dir().join(format!("palisade-records-bad-{}", std::process::id()));
        write(&dir, &record("good")).expect("write");
        let bad = attachment_path(&dir, "bad", "eth0");
        fs::write(&bad, "{not json").expect("write broken record");
        let e = read(&dir, "bad", "eth0").expect_err("broken record");
        assert!(e.to_string().contains("parsing attachment record"), "{e}");
        assert!(e.to_string().contains("bad_eth0.json"), "{e}");
        let (good, broken) = read_attachments(&dir);
        assert_eq!(good.len(), 1);
        assert_eq!(broken.len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }
}
