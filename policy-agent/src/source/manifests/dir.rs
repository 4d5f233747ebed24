//! The manifest directory's bookkeeping: which files are manifests, what each file last defined
//! (kept as compact JSON), which file wins for an object, and what downstream has been told; from a
//! batch of changes to the events to emit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::AddWatchFlags;
use smallvec::SmallVec;
use tracing::{debug, warn};

use super::parse::{decode_encoded, encode, object_at, parse_manifests_with, Span};
use crate::source::{ObjectRef, SourceEvent};
use std::hash::BuildHasher;

/// The periodic rescan leaves files modified more recently than this to inotify (they may be mid-write).
pub const RESCAN_SETTLE: Duration = Duration::from_secs(2);

/// File name extensions read as manifests.
pub const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// What one batch of inotify events asks for.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Manifest files to re-read, in the order first seen.
    files: Vec<OsString>,
    /// The queue overflowed or a `..data`-style symlink swap (ConfigMap volume) happened: rescan all.
    rescan: bool,
    /// The directory itself was removed or moved away.
    pub(super) watch_lost: bool,
}

impl Changes {
    pub(super) fn from_events(events: Vec<nix::sys::inotify::InotifyEvent>) -> Self {
        let mut changes = Changes::default();
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                changes.rescan = true;
            }
            if event.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_IGNORED,
            ) {
                changes.watch_lost = true;
            }
            let Some(name) = event.name else { continue };
            if is_manifest_name(&name) {
                if !changes.files.contains(&name) {
                    changes.files.push(name);
                }
            } else if name.as_encoded_bytes().starts_with(b"..") {
                changes.rescan = true;
            }
        }
        changes
    }
}

/// Whether a directory entry is read as a manifest: a known extension and not a dotfile.
pub fn is_manifest_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) => !stem.is_empty() && MANIFEST_EXTENSIONS.contains(&ext),
        None => false,
    }
}

/// Identity of a file's content as seen by `stat`: a change of any of these means re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// An object's compact JSON (the stripped object serialized): what is emitted, and what its
/// [`Kept::digest`] is taken of.
pub(super) type Encoded = Arc<[u8]>;

/// An object as a file defines it: a digest of its encoding, enough to tell whether it changed, and
/// how to have the object again without reading the whole file when it must be emitted from a file
/// not read in this batch (the file that defined it last dropped it, and this one, a big List say,
/// still defines it; re-parsing the List per change of a small overriding file took a core at 100
/// changes/s). A JSON file's object is found again at its byte span while the file's fingerprint is
/// unchanged (12 bytes kept instead of ~300); a YAML file's keeps its encoding.
#[derive(Debug, Clone)]
struct Kept {
    /// Keyed SipHash (this process's random keys, so no manifest can be written to collide) of the
    /// encoding.
    digest: u64,
    again: Again,
}

#[derive(Debug, Clone)]
enum Again {
    Encoded(Encoded),
    Span { offset: u64, len: u32 },
}

/// A file name, shared by every object the file defines.
type FileName = Arc<OsStr>;

/// An object's identity, shared by the maps below.
type Key = Arc<ObjectRef>;

#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    objects: BTreeMap<Key, Kept>,
}

/// The files of the directory, their last good objects, and what downstream has been told.
#[derive(Debug)]
pub(super) struct DirState {
    dir: PathBuf,
    files: BTreeMap<FileName, FileState>,
    /// For each object, the files defining it, sorted; the last one wins. Nearly always one file,
    /// held inline (a `Vec` allocated room for four at the first push: 64 bytes per object, 7 MB at
    /// 100k; a `BTreeSet` ten times that).
    owners: HashMap<Key, SmallVec<[FileName; 1]>>,
    /// The digest of the object last emitted as `Applied` for each key still present downstream.
    emitted: HashMap<Key, u64>,
    /// The encodings read in the batch being processed, by file, with their digests: what `emit`
    /// sends. Empty between batches.
    fresh: HashMap<FileName, BTreeMap<Key, (Encoded, u64)>>,
    hasher: std::collections::hash_map::RandomState,
    /// Files read so far (a test holds the directory to reading only what changed).
    reads: std::cell::Cell<u64>,
}

/// A file as read: its fingerprint and its objects' encodings, with their spans in a JSON file.
type FileRead = (Fingerprint, BTreeMap<Key, (Encoded, Option<Span>)>);

/// Why a file was not loaded.
enum ReadError {
    /// It could not be read (kept objects stay; the next rescan tries again).
    Io(String),
    /// It was read but is not a valid manifest file (kept objects stay until the file changes).
    Invalid {
        fingerprint: Fingerprint,
        document: usize,
        message: String,
    },
}

/// An event as the directory state decides it. An applied object stays encoded until it is sent
/// ([`Emit::decode`]): a 10k-object initial scan then never holds its objects decoded all at once
/// (that peak, ~28 MB of k8s-openapi structs, was most of the agent's start-up high-water mark).
#[derive(Debug)]
pub(super) enum Emit {
    Applied(ObjectRef, Encoded),
    Deleted(ObjectRef),
}

impl Emit {
    /// The source event; `None` (logged) if a kept encoding no longer decodes, which would be a bug.
    pub(super) fn decode(self) -> Option<SourceEvent> {
        match self {
            Emit::Deleted(key) => Some(SourceEvent::deleted(key)),
            Emit::Applied(key, encoded) => match decode_encoded(key.kind, &encoded) {
                Ok(object) => Some(SourceEvent::applied(object)),
                Err(e) => {
                    warn!(object = %key, error = %e, "manifest source: kept object cannot be decoded; not emitted");
                    None
                }
            },
        }
    }
}

impl DirState {
    /// Objects downstream has been told about.
    pub(super) fn emitted_len(&self) -> usize {
        self.emitted.len()
    }

    pub(super) fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            emitted: HashMap::new(),
            fresh: HashMap::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            reads: std::cell::Cell::new(0),
        }
    }

    pub(super) fn apply_changes(&mut self, changes: Changes) -> Vec<Emit> {
        if changes.rescan {
            return self.rescan_logged(true);
        }
        // All files of one batch first, then the events: a rename between two manifest names (moved
        // from + moved to in one batch) emits nothing.
        let mut affected = BTreeSet::new();
        for name in changes.files {
            affected.extend(self.reload(&name, true));
        }
        self.emit(affected)
    }

    pub(super) fn rescan_logged(&mut self, include_fresh: bool) -> Vec<Emit> {
        match self.rescan(include_fresh) {
            Ok(out) => out,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "manifest source: cannot list the directory; keeping the last objects");
                Vec::new()
            }
        }
    }

    /// Re-reads files that appeared or changed (by fingerprint) and forgets files that are gone. Unless
    /// `include_fresh` (initial scan, inotify overflow, ConfigMap `..data` swap), files modified less
    /// than [`RESCAN_SETTLE`] ago are left to inotify.
    pub(super) fn rescan(&mut self, include_fresh: bool) -> io::Result<Vec<Emit>> {
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !is_manifest_name(&name) {
                continue;
            }
            // Follow symlinks (ConfigMap volumes are symlinks into `..data`).
            match std::fs::metadata(entry.path()) {
                Ok(meta) if meta.is_file() => {
                    present.insert(name, (Fingerprint::of(&meta), meta.modified().ok()));
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(file = %entry.path().display(), error = %e, "manifest source: stat failed")
                }
            }
        }
        let mut affected = BTreeSet::new();
        let gone: Vec<FileName> = self
            .files
            .keys()
            .filter(|n| !present.contains_key(n.as_ref()))
            .cloned()
            .collect();
        for name in gone {
            affected.extend(self.reload(&name, false));
        }
        let now = std::time::SystemTime::now();
        for (name, (fingerprint, modified)) in present {
            let known = self.files.get(name.as_os_str()).and_then(|f| f.fingerprint);
            if known == Some(fingerprint) {
                continue;
            }
            // A file written to moments ago may still be half-written in place; its close brings an
            // inotify event, and if that is lost the next rescan reads it.
            let fresh = modified
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age < RESCAN_SETTLE);
            if include_fresh || !fresh {
                affected.extend(self.reload(&name, false));
            }
        }
        Ok(self.emit(affected))
    }

    /// Reads a file and parses its objects into their encodings (None: the file is gone).
    fn read_file(&self, name: &OsStr) -> Result<Option<FileRead>, ReadError> {
        let path = self.dir.join(name);
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                debug!(file = %shown, "manifest source: not a regular file, ignored");
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(file = %shown, "manifest source: file removed");
                return Ok(None);
            }
            Err(e) => return Err(ReadError::Io(format!("cannot stat file: {e}"))),
        };
        let fingerprint = Fingerprint::of(&meta);
        self.reads.set(self.reads.get() + 1);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ReadError::Io(format!("cannot read file: {e}"))),
        };
        // Each object is encoded as it is parsed and dropped: only the compact encodings are kept.
        let mut map = BTreeMap::new();
        parse_manifests_with(&shown, &text, &mut |object, span| {
            let key = object.reference();
            let encoded = encode(&object).map_err(|e| format!("{key} cannot be encoded: {e}"))?;
            if map.insert(Arc::new(key.clone()), (encoded, span)).is_some() {
                warn!(file = %shown, object = %key, "manifest source: object defined twice in one file; the later document wins");
            }
            Ok(())
        })
        .map_err(|e| ReadError::Invalid {
            fingerprint,
            document: e.document,
            message: e.message,
        })?;
        Ok(Some((fingerprint, map)))
    }

    /// Reads one file again and returns the events its change causes. `from_inotify` only affects logs.
    fn reload(&mut self, name: &OsStr, from_inotify: bool) -> BTreeSet<Key> {
        let shown = self.dir.join(name).display().to_string();
        match self.read_file(name) {
            Ok(Some((fingerprint, read))) => {
                debug!(file = %shown, objects = read.len(), from_inotify, "manifest source: file loaded");
                // Built in bulk from the (sorted) read: a map filled insert by insert keeps its
                // nodes about half full (at 100k objects that was ~6 MB).
                let mut kept = Vec::with_capacity(read.len());
                let mut encodings = Vec::with_capacity(read.len());
                for (key, (encoded, span)) in read {
                    let digest = self.hasher.hash_one(&encoded[..]);
                    let again = match span.and_then(|s| {
                        Some((u64::try_from(s.start).ok()?, u32::try_from(s.len()).ok()?))
                    }) {
                        Some((offset, len)) => Again::Span { offset, len },
                        None => Again::Encoded(encoded.clone()),
                    };
                    kept.push((key.clone(), Kept { digest, again }));
                    encodings.push((key, (encoded, digest)));
                }
                let name: FileName = Arc::from(name);
                self.fresh
                    .insert(name.clone(), encodings.into_iter().collect());
                self.replace(&name, Some((fingerprint, kept.into_iter().collect())))
            }
            Ok(None) => self.replace(&Arc::from(name), None),
            Err(ReadError::Io(e)) => {
                warn!(file = %shown, error = %e, "manifest source: cannot read the file; keeping its last objects");
                BTreeSet::new()
            }
            Err(ReadError::Invalid {
                fingerprint,
                document,
                message,
            }) => {
                warn!(file = %shown, document, error = %message, "manifest source: invalid manifest file skipped; its last good objects stay until it is fixed");
                // Remember the fingerprint so the rescan does not re-read (and re-log) it until it changes.
                self.files.entry(Arc::from(name)).or_default().fingerprint = Some(fingerprint);
                BTreeSet::new()
            }
        }
    }

    /// Replaces a file's objects (None: the file is gone) and returns the keys it defined before or now.
    fn replace(
        &mut self,
        name: &FileName,
        new: Option<(Fingerprint, BTreeMap<Key, Kept>)>,
    ) -> BTreeSet<Key> {
        let old = match new {
            Some((fingerprint, objects)) => {
                let file = self.files.entry(name.clone()).or_default();
                file.fingerprint = Some(fingerprint);
                std::mem::replace(&mut file.objects, objects)
            }
            None => self
                .files
                .remove(name)
                .map(|f| f.objects)
                .unwrap_or_default(),
        };
        let new_keys: Vec<Key> = self
            .files
            .get(name)
            .map(|f| f.objects.keys().cloned().collect())
            .unwrap_or_default();
        let mut affected: BTreeSet<Key> = old.into_keys().collect();
        for key in &affected {
            if let Some(owners) = self.owners.get_mut(key) {
                owners.retain(|o| o != name);
                // Back inline once one file is left (an override removed).
                owners.shrink_to_fit();
            }
        }
        for key in new_keys {
            let owners = self.owners.entry(key.clone()).or_default();
            if let Err(at) = owners.binary_search(name) {
                owners.insert(at, name.clone());
            }
            affected.insert(key);
        }
        affected
    }

    /// Compares the effective definition of each key with what was emitted, and emits the difference.
    fn emit(&mut self, affected: BTreeSet<Key>) -> Vec<Emit> {
        let mut out = Vec::new();
        for key in affected {
            let effective = self
                .owners
                .get(&key)
                .and_then(|owners| owners.last())
                .and_then(|owner| {
                    Some((
                        owner.clone(),
                        self.files.get(owner)?.objects.get(&key)?.clone(),
                    ))
                });
            match effective {
                Some((owner, kept)) => {
                    if self.emitted.get(&key) == Some(&kept.digest) {
                        continue;
                    }
                    // What goes out (a file read again may hold a newer version than `kept`).
                    let Some((encoded, digest)) = self.encoding(&owner, &key, &kept) else {
                        continue;
                    };
                    self.emitted.insert(key.clone(), digest);
                    out.push(Emit::Applied((*key).clone(), encoded));
                }
                None => {
                    self.owners.remove(&key);
                    if self.emitted.remove(&key).is_some() {
                        out.push(Emit::Deleted((*key).clone()));
                    }
                }
            }
        }
        self.fresh.clear();
        out
    }

    /// The encoding `owner` gives `key`: read in this batch, kept, or decoded again from its span
    /// (while the file is as it was read; otherwise the file is read again: it changed, and its
    /// own event follows).
    /// Returns it with its digest.
    fn encoding(&mut self, owner: &FileName, key: &Key, kept: &Kept) -> Option<(Encoded, u64)> {
        if let Some(e) = self.fresh.get(owner).and_then(|m| m.get(key)) {
            return Some(e.clone());
        }
        let path = self.dir.join(owner.as_ref());
        let shown = path.display().to_string();
        if let Again::Encoded(e) = &kept.again {
            return Some((e.clone(), kept.digest));
        }
        if let Again::Span { offset, len } = kept.again {
            let unchanged = std::fs::metadata(&path).ok().map(|m| Fingerprint::of(&m))
                == self.files.get(owner).and_then(|f| f.fingerprint);
            if unchanged {
                if let Some(e) = self.read_span(&path, offset, len) {
                    if self.hasher.hash_one(&e[..]) == kept.digest {
                        return Some((e, kept.digest));
                    }
                }
            }
        }
        match self.read_file(owner) {
            Ok(Some((_, read))) => {
                let encodings: BTreeMap<Key, (Encoded, u64)> = read
                    .into_iter()
                    .map(|(k, (e, _))| {
                        let digest = self.hasher.hash_one(&e[..]);
                        (k, (e, digest))
                    })
                    .collect();
                let found = encodings.get(key).cloned();
                self.fresh.insert(owner.clone(), encodings);
                if found.is_none() {
                    warn!(file = %shown, object = %key, "manifest source: the file that defines the object no longer does; its next read settles it");
                }
                found
            }
            Ok(None) | Err(_) => {
                warn!(file = %shown, object = %key, "manifest source: cannot re-read the file that now defines the object; it is emitted when the file is read next");
                None
            }
        }
    }

    /// The encoding of the one object at `offset..offset+len` of a JSON file.
    fn read_span(&self, path: &std::path::Path, offset: u64, len: u32) -> Option<Encoded> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).ok()?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).ok()?;
        let text = std::str::from_utf8(&buf).ok()?;
        let object = object_at(&path.display().to_string(), text).ok()?;
        encode(&object).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(name: &str, app: &str) -> String {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"default","labels":{{"app":"{app}"}}}},"spec":{{"containers":[{{"name":"c"}}]}}}}"#
        )
    }

    /// Writes `name` as a JSON List of pods `pods`, labelled `app`.
    fn write_list(dir: &std::path::Path, name: &str, pods: &[&str], app: &str) {
        let items: Vec<String> = pods.iter().map(|n| pod_json(n, app)).collect();
        let list = format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
            items.join(",")
        );
        std::fs::write(dir.join(name), list).unwrap();
    }

    /// Rewrites the override file to pod `pod` and hands its change to the directory.
    fn move_override(st: &mut DirState, dir: &std::path::Path, pod: &str) -> Vec<Emit> {
        std::fs::write(dir.join("70-override.json"), pod_json(pod, "override")).unwrap();
        st.apply_changes(Changes {
            files: vec!["70-override.json".into()],
            ..Changes::default()
        })
    }

    fn describe(out: &[Emit]) -> Vec<String> {
        out.iter()
            .map(|e| match e {
                Emit::Applied(k, enc) => format!(
                    "Applied {} {}",
                    k.name,
                    String::from_utf8_lossy(enc).contains(r#""app":"list""#)
                ),
                Emit::Deleted(k) => format!("Deleted {}", k.name),
            })
            .collect()
    }

    /// A small file overriding pods of a big List: when the override moves to another pod, the
    /// dropped pod's List definition is emitted again from what the directory kept, without
    /// reading the List again (a parse of the whole List per change cost a core under churn).
    #[test]
    fn an_override_moving_to_another_pod_restores_the_list_definition_without_rereading_the_list() {
        let dir = palisade_testkit::temp::temp_dir("pa-manifest-override");
        write_list(dir.path(), "00-list.json", &["a", "b", "c"], "list");
        std::fs::write(
            dir.path().join("70-override.json"),
            pod_json("a", "override"),
        )
        .unwrap();
        let mut st = DirState::new(dir.path().to_path_buf());
        assert_eq!(st.rescan(true).unwrap().len(), 3);
        let reads = st.reads.get();
        let mut got = describe(&move_override(&mut st, dir.path(), "b"));
        got.sort();
        assert_eq!(got, ["Applied a true", "Applied b false"]);
        assert_eq!(
            st.reads.get(),
            reads + 1,
            "only the override file is read again"
        );

        // The List changed on disk (its own event not handled yet): its kept spans no longer hold,
        // so the dropped pod comes from the List read again, as it is now.
        write_list(dir.path(), "00-list.json", &["a", "b", "c"], "list2");
        let out = move_override(&mut st, dir.path(), "c");
        let restored: Vec<String> = out
            .iter()
            .filter_map(|e| match e {
                Emit::Applied(k, enc) if &*k.name == "b" => {
                    Some(String::from_utf8_lossy(enc).into_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(restored.len(), 1, "{:?}", describe(&out));
        assert!(restored[0].contains(r#""app":"list2""#), "{}", restored[0]);
        assert_eq!(st.reads.get(), reads + 3, "the changed List is read again");

        // Owners in order, the last one winning; one owner is held without an allocation.
        let owners = |name: &str| {
            let (_, files) = st.owners.iter().find(|(k, _)| &*k.name == name).unwrap();
            let names: Vec<String> = files.iter().map(|f| f.to_string_lossy().into()).collect();
            (names, files.spilled())
        };
        assert_eq!(owners("a"), (vec!["00-list.json".to_string()], false));
        assert_eq!(
            owners("c"),
            (
                vec!["00-list.json".to_string(), "70-override.json".to_string()],
                true
            )
        );
    }

    /// The same with a YAML List, whose objects keep their encodings (no spans in YAML).
    #[test]
    fn an_override_of_a_yaml_list_restores_from_the_kept_encoding() {
        let dir = palisade_testkit::temp::temp_dir("pa-manifest-override-yaml");
        let items: Vec<String> = ["a", "b"].iter().map(|n| pod_json(n, "list")).collect();
        std::fs::write(
            dir.path().join("00-list.yaml"),
            format!("apiVersion: v1\nkind: List\nitems: [{}]\n", items.join(",")),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("70-override.json"),
            pod_json("a", "override"),
        )
        .unwrap();
        let mut st = DirState::new(dir.path().to_path_buf());
        assert_eq!(st.rescan(true).unwrap().len(), 2);
        let reads = st.reads.get();
        let mut got = describe(&move_override(&mut st, dir.path(), "b"));
        got.sort();
        assert_eq!(got, ["Applied a true", "Applied b false"]);
        assert_eq!(st.reads.get(), reads + 1);
    }

    #[test]
    fn manifest_names_exclude_dotfiles_and_temp_files() {
        for good in ["a.yaml", "b.yml", "c.json", "x.y.yaml"] {
            assert!(is_manifest_name(OsStr::new(good)), "{good}");
        }
        for bad in [
            ".a.yaml",
            ".yaml",
            "a.yaml.tmp",
            "a.yaml~",
            "#a.yaml#",
            "a.yaml.swp",
            "4913",
            "a",
        ] {
            assert!(!is_manifest_name(OsStr::new(bad)), "{bad}");
        }
    }
}
