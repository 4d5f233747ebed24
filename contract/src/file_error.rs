//! The one error of the contract's file I/O (`lock`, `records`): what was being done, on which
//! path, and the OS error. Displayed as `<action> <path>: <error>`.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FileError {
    /// What was being done, worded to precede the path (`lock`, `writing attachment record`).
    pub action: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl FileError {
    /// A mapper for `map_err`: the OS error of `action` on `path`.
    pub(crate) fn of(
        action: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError {
            action,
            path,
            source,
        }
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
