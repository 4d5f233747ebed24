//! Watching the attachment records: the plugin writes one per pod interface (with its pending mark)
//! before the interface is up; the agent must notice within milliseconds, so a pod whose Pod object is
//! known gets its policy and loses its pending mark at once. inotify on the directory; when it cannot
//! start, or stops later, the engine polls the records instead (`schedule`).

use crate::error::{Error, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::path::Path;

/// Starts a thread that calls `wake` whenever a record is created, replaced or removed, and `lost`
/// once should the watch stop (the engine then polls). Creates the attachments directory when
/// missing (the plugin would create it too).
pub fn watch(
    state_dir: &Path,
    wake: impl Fn() -> bool + Send + 'static,
    lost: impl FnOnce() + Send + 'static,
) -> Result<()> {
    let dir = palisade_contract::attachments_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create attachments dir", &dir, e))?;
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|e| Error::io("inotify init", &dir, std::io::Error::from(e)))?;
    ino.add_watch(
        &dir,
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM,
    )
    .map_err(|e| Error::io("inotify watch", &dir, std::io::Error::from(e)))?;
    std::thread::Builder::new()
        .name("attachments-watch".into())
        .spawn(move || loop {
            match ino.read_events() {
                Ok(events) => {
                    let relevant = events
                        .iter()
                        .any(|e| e.name.as_ref().is_some_and(|n| n.to_string_lossy().ends_with(".json")));
                    if relevant && !wake() {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "attachment watch stopped; the agent polls the records from now on");
                    lost();
                    return;
                }
            }
        })
        .map_err(|e| Error::io("spawn attachments watcher", &dir, e))?;
    Ok(())
}
