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

mod dir;
mod parse;

pub use dir::{is_manifest_name, MANIFEST_EXTENSIONS, RESCAN_SETTLE};
pub use parse::{parse_manifests, ManifestError, DEFAULT_NAMESPACE};

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::dir::{Changes, DirState, Emit};
use super::{SourceError, SourceEvent};
use palisade_policy::model::PodSharing;

/// How often the directory is rescanned as a safety net behind inotify.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(30);

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

        let mut sharing = PodSharing::default();
        let Some((mut state, initial)) =
            off_workers(DirState::new(self.dir.clone()), |st| st.rescan(true)).await
        else {
            return Ok(());
        };
        let initial = initial.map_err(|e| dir_error("list", e))?;
        info!(dir = %self.dir.display(), objects = state.emitted_len(), "manifest source: initial scan done");
        if !send_all(&tx, initial, &mut sharing).await
            || tx.send(SourceEvent::Synced.into()).await.is_err()
        {
            return Ok(());
        }

        let mut rescan = tokio::time::interval_at(
            tokio::time::Instant::now() + self.rescan_interval,
            self.rescan_interval,
        );
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watching = true;
        loop {
            let work = tokio::select! {
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
                            Work::Apply(changes)
                        }
                        Ok(Err(e)) => {
                            warn!(dir = %self.dir.display(), error = %e, "manifest source: reading inotify events failed; rescanning");
                            Work::Rescan { include_fresh: true }
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
                    Work::Rescan { include_fresh: false }
                }
                _ = tx.closed() => return Ok(()),
            };
            let Some((next, out)) = off_workers(state, move |st| match work {
                Work::Apply(changes) => st.apply_changes(changes),
                Work::Rescan { include_fresh } => st.rescan_logged(include_fresh),
            })
            .await
            else {
                return Ok(());
            };
            state = next;
            if !send_all(&tx, out, &mut sharing).await {
                return Ok(());
            }
        }
    }
}

/// What the directory's state is asked to do next.
enum Work {
    Apply(Changes),
    Rescan { include_fresh: bool },
}

/// Runs `work` (reading and parsing files) on a blocking thread, off the runtime's few workers: a
/// large manifest takes a while to parse (20k pods: ~5 s in a debug build), and a worker held that
/// long starves the rest of the runtime, the HTTP endpoint's probes and scrapes included (seen
/// unanswered for 5.4 s). A panic in `work` is the parser's bug: it is raised here again. `None`:
/// the runtime is shutting down.
async fn off_workers<R: Send + 'static>(
    mut state: DirState,
    work: impl FnOnce(&mut DirState) -> R + Send + 'static,
) -> Option<(DirState, R)> {
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut state);
        (state, out)
    })
    .await
    {
        Ok(done) => Some(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_cancelled) => None,
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

/// Sends events in order, decoding each applied object only when the channel has room for it (a
/// Pod's labels, namespace and node name shared through `sharing`); false when the receiver is gone.
async fn send_all<T: From<SourceEvent>>(
    tx: &mpsc::Sender<T>,
    events: Vec<Emit>,
    sharing: &mut PodSharing,
) -> bool {
    for event in events {
        let Ok(permit) = tx.reserve().await else {
            debug!("manifest source: receiver dropped, stopping");
            return false;
        };
        if let Some(event) = event.decode() {
            permit.send(event.share(sharing).into());
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
