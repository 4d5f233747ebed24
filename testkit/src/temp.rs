//! Temporary directories for tests (`tempfile`, removed on drop, also on panic) and files written
//! the way a careful editor or kubectl writes them.

use crate::names::unique;
use std::path::{Path, PathBuf};
pub use tempfile::TempDir;

/// A new directory under the system temp dir, named `<prefix>…`; removed when the guard drops.
pub fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir {prefix}…: {e}"))
}

/// `dir/name`, created (with parents) if missing.
pub fn sub_dir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
    p
}

/// Writes `path` atomically (a temp file beside it, then rename), so a watcher never reads half.
pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", unique("w")));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("cannot rename {} into place: {e}", tmp.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_dir_is_removed_when_its_guard_drops() {
        let d = temp_dir("palisade-testkit-");
        let sub = sub_dir(d.path(), "a/b");
        write_atomic(&sub.join("f"), "x");
        assert_eq!(std::fs::read_to_string(sub.join("f")).unwrap(), "x");
        let path = d.path().to_path_buf();
        drop(d);
        assert!(!path.exists());
    }
}
