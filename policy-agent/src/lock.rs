//! The node lock (ARCHITECTURE.md, "Lock"): an exclusive flock on `<stateDir>/nft.lock`, held by the
//! plugin while it adds a pending mark and writes a record, and by the agent while it reads the records
//! and commits. Released when the guard drops.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::path::Path;

/// Holds the lock until dropped.
pub struct NodeLock {
    file: File,
}

impl NodeLock {
    /// Blocks until the exclusive lock on `contract::lock_path(state_dir)` is ours. Creates the state
    /// directory and the lock file when missing.
    pub fn acquire(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io("create state dir", state_dir, e))?;
        let path = palisade_contract::lock_path(state_dir);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        file.lock().map_err(|e| Error::io("lock", &path, e))?;
        Ok(NodeLock { file })
    }
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_second_holder_waits_until_the_first_releases() {
        let dir = std::env::temp_dir().join(format!("palisade-agent-lock-{}", std::process::id()));
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
}
