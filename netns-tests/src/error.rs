//! The lab's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command we ran (ip, nft, a palisade binary) could not start or failed.
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    /// Reading or writing a lab file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A YAML or JSON document could not be understood.
    #[error("{what}: {detail}")]
    Parse { what: String, detail: String },
    /// The user asked for something the lab cannot do (bad name, unknown pod, ...).
    #[error("{0}")]
    Invalid(String),
    /// Something did not happen in time (agent conflist, process exit, convergence).
    #[error("timed out: {0}")]
    Timeout(String),
    /// A signal arrived while the lab was being built.
    #[error("interrupted by a signal; the lab was torn down")]
    Interrupted,
    /// Teardown kept going past these errors.
    #[error("teardown finished with {} error(s): {}", .0.len(), .0.join("; "))]
    Teardown(Vec<String>),
}

impl LabError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io { path, source }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
