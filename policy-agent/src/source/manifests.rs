//! The manifest-directory source: a directory of Kubernetes YAML/JSON files, for standalone use and the
//! lab.
//!
//! - Files: `*.yaml`, `*.yml` (multi-document) and `*.json` directly in the directory (not recursive).
//!   Dotfiles and other names (editor temp files, `*.tmp`, `*~`) are ignored.
//! - Kinds: `v1` Pod, Namespace, Node; `networking.k8s.io/v1` NetworkPolicy; `v1` List of those. A
//!   namespaced object without a namespace gets `default`, as `kubectl apply` does.
//! - Changes are seen through inotify on the directory (close after write, rename in or out, delete), so a
//!   write becomes a [`SourceEvent`] within milliseconds; a slow periodic rescan catches anything missed
//!   (re-reading only files whose inode, size or mtime changed).
//! - Each file's objects are tracked. When a file changes, objects new or changed are `Applied` and
//!   objects no longer defined by any file are `Deleted`. An object defined by several files takes the
//!   definition of the file whose name sorts last (so moving an object between files, new file first,
//!   emits no `Deleted`).
//! - A file that does not parse, or holds a document of a known kind that is invalid (no name, wrong
//!   field types) or a document without `kind`, is logged with its name and document index and skipped
//!   as a whole: its last good objects stay (a half-written file never deletes objects). A document of a
//!   kind we do not watch (a Deployment, say) is skipped with a warning and the rest of the file applies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::Deserialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Kind, Object, ObjectRef, SourceError, SourceEvent};

/// How often the directory is rescanned as a safety net behind inotify.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(30);

/// The periodic rescan leaves files modified more recently than this to inotify (they may be mid-write).
pub const RESCAN_SETTLE: Duration = Duration::from_secs(2);

/// Namespace given to namespaced objects that name none (what `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// File name extensions read as manifests.
pub const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Watches a directory of manifests and emits [`SourceEvent`]s. See the module documentation for the
/// rules; drive it with [`ManifestSource::run`].
#[derive(Debug, Clone)]
pub struct ManifestSource {
    dir: PathBuf,
    rescan_interval: Duration,
}

impl ManifestSource {
    /// A source for the manifests in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
        }
    }

    /// Sets the safety-net rescan interval (default [`DEFAULT_RESCAN_INTERVAL`]; at least 100 ms).
    pub fn with_rescan_interval(mut self, interval: Duration) -> Self {
        self.rescan_interval = interval.max(Duration::from_millis(100));
        self
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scans the directory, emits `Applied` for every object and then `Synced`, and from then on emits
    /// `Applied`/`Deleted` as files change. Returns `Ok(())` when the receiver of `tx` is dropped.
    ///
    /// Fails at start if the directory cannot be watched or listed; later I/O errors are logged and the
    /// last good objects kept.
    pub async fn run<T: From<SourceEvent>>(self, tx: mpsc::Sender<T>) -> Result<(), SourceError> {
        let dir_error = |action: &'static str, source: io::Error| SourceError::ManifestDir {
            path: self.dir.clone(),
            action,
            source,
        };
        // Watch first, then scan: a change between the two is seen twice, never missed.
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| dir_error("create inotify instance", e.into()))?;
        inotify
            .add_watch(&self.dir, watch_flags())
            .map_err(|e| dir_error("watch with inotify", e.into()))?;
        // SAFETY: `InotifyFd` owns the inotify descriptor, so it stays open and the same file for as long
        // as the `AsyncFd` that owns the `InotifyFd` lives.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(|e| dir_error("register inotify with tokio", e.into()))?;

        let mut state = DirState::new(self.dir.clone());
        let initial = state.rescan(true).map_err(|e| dir_error("list", e))?;
        info!(dir = %self.dir.display(), objects = state.emitted.len(), "manifest source: initial scan done");
        if !send_all(&tx, initial).await || tx.send(SourceEvent::Synced.into()).await.is_err() {
            return Ok(());
        }

        let mut rescan = tokio::time::interval_at(
            tokio::time::Instant::now() + self.rescan_interval,
            self.rescan_interval,
        );
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watching = true;
        loop {
            let out = tokio::select! {
                ready = inotify.readable() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            return Err(dir_error("wait for inotify events", e));
                        }
                    };
                    match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                        Ok(Ok(events)) => {
                            let changes = Changes::from_events(events);
                            if changes.watch_lost {
                                warn!(dir = %self.dir.display(), "manifest directory removed or moved; recreate it, the rescan re-watches it");
                                watching = false;
                            }
                            state.apply_changes(changes)
                        }
                        Ok(Err(e)) => {
                            warn!(dir = %self.dir.display(), error = %e, "manifest source: reading inotify events failed; rescanning");
                            state.rescan_logged(true)
                        }
                        Err(_would_block) => continue,
                    }
                }
                _ = rescan.tick() => {
                    if !watching {
                        match inotify.get_ref().0.add_watch(&self.dir, watch_flags()) {
                            Ok(_) => {
                                info!(dir = %self.dir.display(), "manifest directory is back; watching it again");
                                watching = true;
                            }
                            Err(e) => debug!(dir = %self.dir.display(), error = %e, "manifest directory still missing"),
                        }
                    }
                    state.rescan_logged(false)
                }
                _ = tx.closed() => return Ok(()),
            };
            if !send_all(&tx, out).await {
                return Ok(());
            }
        }
    }
}

fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Sends events in order, decoding each applied object only when the channel has room for it; false
/// when the receiver is gone.
async fn send_all<T: From<SourceEvent>>(tx: &mpsc::Sender<T>, events: Vec<Emit>) -> bool {
    for event in events {
        let Ok(permit) = tx.reserve().await else {
            debug!("manifest source: receiver dropped, stopping");
            return false;
        };
        if let Some(event) = event.decode() {
            permit.send(event.into());
        }
    }
    true
}

/// nix's `Inotify` is `AsFd` only; tokio's `AsyncFd` wants `AsRawFd`.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// What one batch of inotify events asks for.
#[derive(Debug, Default)]
struct Changes {
    /// Manifest files to re-read, in the order first seen.
    files: Vec<OsString>,
    /// The queue overflowed or a `..data`-style symlink swap (ConfigMap volume) happened: rescan all.
    rescan: bool,
    /// The directory itself was removed or moved away.
    watch_lost: bool,
}

impl Changes {
    fn from_events(events: Vec<nix::sys::inotify::InotifyEvent>) -> Self {
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

/// An object as a file defines it, kept as its compact JSON (the stripped object serialized): a tenth of
/// the parsed k8s-openapi object's size, enough to tell whether it changed, and parsed again in the rare
/// case it must be emitted without its file being re-read (the file that defined it last dropped it).
type Encoded = Arc<[u8]>;

#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    objects: BTreeMap<ObjectRef, Encoded>,
}

/// The files of the directory, their last good objects, and what downstream has been told.
#[derive(Debug)]
struct DirState {
    dir: PathBuf,
    files: BTreeMap<OsString, FileState>,
    /// For each object, the files defining it, sorted; the last one wins. Nearly always one file: a
    /// vector is a tenth of a `BTreeSet`'s size, which at 10k objects is ~3 MB.
    owners: HashMap<ObjectRef, Vec<OsString>>,
    /// The encoding of the object last emitted as `Applied` for each key still present downstream
    /// (shared with the defining file's map).
    emitted: HashMap<ObjectRef, Encoded>,
}

/// An event as the directory state decides it. An applied object stays encoded until it is sent
/// ([`Emit::decode`]): a 10k-object initial scan then never holds its objects decoded all at once
/// (that peak, ~28 MB of k8s-openapi structs, was most of the agent's start-up high-water mark).
#[derive(Debug)]
enum Emit {
    Applied(ObjectRef, Encoded),
    Deleted(ObjectRef),
}

impl Emit {
    /// The source event; `None` (logged) if a kept encoding no longer decodes, which would be a bug.
    fn decode(self) -> Option<SourceEvent> {
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
    fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            emitted: HashMap::new(),
        }
    }

    fn apply_changes(&mut self, changes: Changes) -> Vec<Emit> {
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

    fn rescan_logged(&mut self, include_fresh: bool) -> Vec<Emit> {
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
    fn rescan(&mut self, include_fresh: bool) -> io::Result<Vec<Emit>> {
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
        let gone: Vec<OsString> = self
            .files
            .keys()
            .filter(|n| !present.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            affected.extend(self.reload(&name, false));
        }
        let now = std::time::SystemTime::now();
        for (name, (fingerprint, modified)) in present {
            let known = self.files.get(&name).and_then(|f| f.fingerprint);
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

    /// Reads one file again and returns the events its change causes. `from_inotify` only affects logs.
    fn reload(&mut self, name: &OsStr, from_inotify: bool) -> BTreeSet<ObjectRef> {
        let path = self.dir.join(name);
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                debug!(file = %shown, "manifest source: not a regular file, ignored");
                return self.replace(name, None);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(file = %shown, "manifest source: file removed");
                return self.replace(name, None);
            }
            Err(e) => {
                warn!(file = %shown, error = %e, "manifest source: cannot stat file; keeping its last objects");
                return BTreeSet::new();
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.replace(name, None),
            Err(e) => {
                warn!(file = %shown, error = %e, "manifest source: cannot read file; keeping its last objects");
                return BTreeSet::new();
            }
        };
        // Each object is encoded as it is parsed and dropped: only the compact encodings are kept.
        let mut map = BTreeMap::new();
        let parsed = parse_manifests_with(&shown, &text, &mut |object| {
            let key = object.reference();
            let encoded = encode(&object).map_err(|e| format!("{key} cannot be encoded: {e}"))?;
            if map.insert(key.clone(), encoded).is_some() {
                warn!(file = %shown, object = %key, "manifest source: object defined twice in one file; the later document wins");
            }
            Ok(())
        });
        drop(text);
        match parsed {
            Ok(()) => {
                debug!(file = %shown, objects = map.len(), from_inotify, "manifest source: file loaded");
                self.replace(name, Some((fingerprint, map)))
            }
            Err(e) => {
                warn!(file = %shown, document = e.document, error = %e.message, "manifest source: invalid manifest file skipped; its last good objects stay until it is fixed");
                // Remember the fingerprint so the rescan does not re-read (and re-log) it until it changes.
                self.files
                    .entry(name.to_os_string())
                    .or_default()
                    .fingerprint = Some(fingerprint);
                BTreeSet::new()
            }
        }
    }

    /// Replaces a file's objects (None: the file is gone) and returns the keys it defined before or now.
    fn replace(
        &mut self,
        name: &OsStr,
        new: Option<(Fingerprint, BTreeMap<ObjectRef, Encoded>)>,
    ) -> BTreeSet<ObjectRef> {
        let old = match new {
            Some((fingerprint, objects)) => {
                let file = self.files.entry(name.to_os_string()).or_default();
                file.fingerprint = Some(fingerprint);
                std::mem::replace(&mut file.objects, objects)
            }
            None => self
                .files
                .remove(name)
                .map(|f| f.objects)
                .unwrap_or_default(),
        };
        let new_keys: Vec<ObjectRef> = self
            .files
            .get(name)
            .map(|f| f.objects.keys().cloned().collect())
            .unwrap_or_default();
        let mut affected: BTreeSet<ObjectRef> = old.into_keys().collect();
        for key in &affected {
            if let Some(owners) = self.owners.get_mut(key) {
                owners.retain(|o| o.as_os_str() != name);
            }
        }
        for key in new_keys {
            let owners = self.owners.entry(key.clone()).or_default();
            if let Err(at) = owners.binary_search_by(|o| o.as_os_str().cmp(name)) {
                owners.insert(at, name.to_os_string());
            }
            affected.insert(key);
        }
        affected
    }

    /// Compares the effective definition of each key with what was emitted, and emits the difference.
    fn emit(&mut self, affected: BTreeSet<ObjectRef>) -> Vec<Emit> {
        let mut out = Vec::new();
        for key in affected {
            let effective = self
                .owners
                .get(&key)
                .and_then(|owners| owners.last())
                .and_then(|owner| self.files.get(owner)?.objects.get(&key));
            match effective {
                Some(encoded) => {
                    if self.emitted.get(&key) == Some(encoded) {
                        continue;
                    }
                    self.emitted.insert(key.clone(), encoded.clone());
                    out.push(Emit::Applied(key, encoded.clone()));
                }
                None => {
                    self.owners.remove(&key);
                    if self.emitted.remove(&key).is_some() {
                        out.push(Emit::Deleted(key));
                    }
                }
            }
        }
        out
    }
}

/// Why a manifest file was rejected: the (0-based) document index and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub document: usize,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {}: {}", self.document, self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Parses the content of one manifest file (YAML stream or JSON) into objects, [stripped](Object::strip)
/// and with namespaced objects defaulted to [`DEFAULT_NAMESPACE`]. `file` is used in log lines only.
///
/// Documents of kinds we do not watch are skipped with a warning. Any other problem rejects the file.
pub fn parse_manifests(file: &str, content: &[u8]) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    parse_manifests_with(file, content, &mut |object| {
        objects.push(object);
        Ok(())
    })?;
    Ok(objects)
}

/// [`parse_manifests`], handing each object to `sink` as soon as it is decoded; an error from the sink
/// rejects the file like any other.
fn parse_manifests_with(
    file: &str,
    content: &[u8],
    sink: &mut dyn FnMut(Object) -> Result<(), String>,
) -> Result<(), ManifestError> {
    let text = std::str::from_utf8(content).map_err(|e| ManifestError {
        document: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    // JSON is YAML, but serde_yaml holds a document's every event and then its tree: for a large List
    // that is ~50 times the file's size, kept by the allocator afterwards. A file that is one JSON
    // object is read by serde_json (same value, a tenth of the memory); anything else goes through YAML.
    if text.trim_start().starts_with('{') {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            objects_from_value(file, 0, value, &mut *sink).map_err(|message| ManifestError {
                document: 0,
                message,
            })?;
            return Ok(());
        }
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml = serde_yaml::Value::deserialize(document).map_err(|e| ManifestError {
            document: index,
            message: e.to_string(),
        })?;
        if yaml.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let value = serde_json::to_value(&yaml).map_err(|e| ManifestError {
            document: index,
            message: format!("not representable as JSON: {e}"),
        })?;
        // One tree at a time: a large List's YAML tree is many times the size of the file.
        drop(yaml);
        objects_from_value(file, index, value, &mut *sink).map_err(|message| ManifestError {
            document: index,
            message,
        })?;
    }
    Ok(())
}

fn objects_from_value(
    file: &str,
    index: usize,
    mut value: serde_json::Value,
    out: &mut dyn FnMut(Object) -> Result<(), String>,
) -> Result<(), String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let Some(kind) = field("kind") else {
        return Err("no `kind` (not a Kubernetes object, or a half-written one)".into());
    };
    let api_version = field("apiVersion").unwrap_or_default();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            // Taken, not cloned: each item's tree is freed once it is decoded.
            let items = match value.get_mut("items").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(items)) => items,
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => return Err("List `items` is not a list".into()),
            };
            for (item_index, item) in items.into_iter().enumerate() {
                objects_from_value(file, index, item, out)
                    .map_err(|e| format!("items[{item_index}]: {e}"))?;
            }
            return Ok(());
        }
        ("v1", "Pod") => decode::<Pod>(value).map(|o| Object::Pod(Box::new(o))),
        ("v1", "Namespace") => decode::<Namespace>(value).map(|o| Object::Namespace(Box::new(o))),
        ("v1", "Node") => decode::<Node>(value).map(|o| Object::Node(Box::new(o))),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            decode::<NetworkPolicy>(value).map(|o| Object::NetworkPolicy(Box::new(o)))
        }
        _ => {
            warn!(
                file,
                document = index,
                api_version,
                kind,
                "manifest source: kind not watched, document skipped"
            );
            return Ok(());
        }
    }
    .map_err(|e| format!("{api_version} {kind}: {e}"))?;
    out(normalize(object)?)
}

/// The compact JSON of a stripped object (see [`Encoded`]).
fn encode(object: &Object) -> Result<Encoded, serde_json::Error> {
    let bytes = match object {
        Object::Pod(o) => serde_json::to_vec(o),
        Object::Namespace(o) => serde_json::to_vec(o),
        Object::NetworkPolicy(o) => serde_json::to_vec(o),
        Object::Node(o) => serde_json::to_vec(o),
    }?;
    Ok(bytes.into())
}

/// The object [`encode`] encoded.
fn decode_encoded(kind: Kind, encoded: &[u8]) -> Result<Object, serde_json::Error> {
    Ok(match kind {
        Kind::Pod => Object::Pod(Box::new(serde_json::from_slice(encoded)?)),
        Kind::Namespace => Object::Namespace(Box::new(serde_json::from_slice(encoded)?)),
        Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(serde_json::from_slice(encoded)?)),
        Kind::Node => Object::Node(Box::new(serde_json::from_slice(encoded)?)),
    })
}

fn decode<K: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<K, serde_json::Error> {
    serde_json::from_value(value)
}

/// Checks the name, defaults or clears the namespace by scope, and strips the object.
fn normalize(mut object: Object) -> Result<Object, String> {
    let kind: Kind = object.kind();
    let name = object.meta().name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    let meta = object.meta_mut();
    // Nothing here reads it (the Kubernetes source does, for its relists), and a writer that bumps
    // it with each status heartbeat would otherwise make every heartbeat a changed object.
    meta.resource_version = None;
    if kind.is_namespaced() {
        if meta.namespace.as_deref().unwrap_or_default().is_empty() {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
        }
    } else {
        meta.namespace = None;
    }
    Ok(object.strip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_file_parses_like_yaml_and_flow_yaml_falls_back_to_yaml() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","labels":{"app":"web"},
             "annotations":{"x":"y"}},"spec":{"containers":[{"name":"c","ports":[{"containerPort":80}]}]},
             "status":{"podIP":"10.0.0.1"}},
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod","labels":{"team":"a"}}}]}"#;
        let fast = parse_manifests("a.json", json.as_bytes()).expect("json");
        // A trailing document marker is not JSON: the same content goes through the YAML path.
        let via_yaml =
            parse_manifests("a.yaml", format!("{json}\n---\n").as_bytes()).expect("yaml");
        assert_eq!(fast.len(), 2);
        assert_eq!(fast, via_yaml);
        let flow = parse_manifests(
            "f.yaml",
            b"{apiVersion: v1, kind: Namespace, metadata: {name: n}}",
        )
        .expect("flow yaml");
        assert_eq!(flow.len(), 1);
        assert_eq!(flow[0].reference().name, "n");
    }

    #[test]
    fn kept_objects_decode_to_what_was_parsed() {
        let text = docs_of_every_kind();
        for object in parse_manifests("k.yaml", text.as_bytes()).expect("parse") {
            let encoded = encode(&object).expect("encode");
            let decoded = decode_encoded(object.kind(), &encoded).expect("decode");
            assert_eq!(decoded, object);
        }
    }

    fn docs_of_every_kind() -> String {
        [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.1.1, podIPs: [{ip: 10.1.1.1}]}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns, labels: {t: x}}",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: ns}\nspec: {podSelector: {}, policyTypes: [Ingress], ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, protocol: TCP}]}]}",
        ]
        .join("\n---\n")
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

    #[test]
    fn parse_defaults_namespace_strips_annotations_and_reads_lists() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, annotations: {x: y}}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: ns1, namespace: ignored}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: skipped}
---
"#;
        let objects = parse_manifests("t.yaml", text.as_bytes()).expect("parses");
        let refs: Vec<String> = objects.iter().map(|o| o.reference().to_string()).collect();
        assert_eq!(refs, ["Pod default/a", "Namespace ns1"]);
        assert_eq!(objects[0].meta().annotations, None);
        assert_eq!(objects[1].meta().namespace, None);
    }

    #[test]
    fn parse_rejects_missing_name_and_missing_kind_with_document_index() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {}\n";
        assert_eq!(
            parse_manifests("t.yaml", text.as_bytes())
                .unwrap_err()
                .document,
            1
        );
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\nmetadata: {name: b}\n";
        assert_eq!(
            parse_manifests("t.yaml", text.as_bytes())
                .unwrap_err()
                .document,
            1
        );
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n";
        assert!(parse_manifests("t.yaml", text.as_bytes()).is_err());
    }
}
