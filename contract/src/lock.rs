//! The locks the plugin and the agent share, in one place (the I/O part of the contract; the pure
//! types above it are what the compiler may use). An exclusive `flock` on a file, released when the
//! guard drops: the node lock on `<stateDir>/nft.lock` (the plugin while it adds a pending mark and
//! writes a record, the agent while it reads the records and commits), and any store lock (the IPAM
//! store's).

use crate::file_error::FileError;
use std::fs::{File, OpenOptions};
use std::path::Path;

/// Why a lock could not be taken.
pub type LockError = FileError;

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` is ours. Creates the file's directory and the file
    /// when missing (the file's content is never touched).
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(FileError::of("create the directory of", path))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(FileError::of("open lock file", path))?;
        file.lock().map_err(FileError::of("lock", path))?;
        Ok(FileLock { file })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The node lock: [`FileLock`] on [`crate::lock_path`] of the state directory.
#[derive(Debug)]
pub struct NodeLock {
    _lock: FileLock,
}

impl NodeLock {
    /// Blocks until the node lock of `state_dir` is ours (creating the directory and the file).
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        Ok(NodeLock {
            _lock: FileLock::acquire(&crate::lock_path(state_dir))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_second_holder_waits_until_the_first_releases() {
        let dir = std::env::temp_dir().join(format!("palisade-lock-{}", std::process::id()));
        let first = NodeLock::acquire(&dir).unwrap();
        let d2 = dir.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let _second = NodeLock::acquire(&d2).unwrap();
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(first);
        let waited = t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            waited >= Duration::from_millis(90),
            "second lock did not wait: {waited:?}"
        );
    }

    #[test]
    fn a_lock_that_cannot_be_opened_names_the_path_and_what_failed() {
        let e = FileLock::acquire(Path::new("/proc/palisade-no-such-dir/x.lock")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/proc/palisade-no-such-dir"), "{text}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
