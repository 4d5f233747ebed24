//! The agent's one error type. Every variant says which edge failed and carries the context an operator
//! needs to act (the path, the command, the object).

use std::path::PathBuf;

/// Everything that can go wrong in the agent's edges.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read, written or locked.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `nft` (exec or libnftables) refused or failed a transaction or a listing.
    #[error(transparent)]
    NftRun(#[from] palisade_nft::Error),
    /// nft's output could not be understood.
    #[error("nft {action} failed: {message}")]
    Nft {
        action: &'static str,
        message: String,
    },
    /// A netlink request (routes) failed.
    #[error("netlink {action}: {message}")]
    Netlink {
        action: &'static str,
        message: String,
    },
    /// The flow log's NFLOG socket failed.
    #[error("flow log: {action}: {source}")]
    FlowLog {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be built or a request failed.
    #[error("kubernetes {action}: {message}")]
    Kube {
        action: &'static str,
        message: String,
    },
    /// A source (kube watch, manifest directory) could not start or failed.
    #[error("source: {0}")]
    Source(#[from] crate::source::SourceError),
    /// A source stopped although nothing asked it to (`when` says at which point).
    #[error("source ended {when}; restart the agent (the rules stay in the kernel meanwhile)")]
    SourceEnded { when: &'static str },
    /// The source's task panicked or was cancelled.
    #[error("source task: {0}")]
    SourceTask(#[from] tokio::task::JoinError),
    /// The compiler panicked (a bug): the payload, and the last committed rules stay enforced.
    #[error("compiler panicked (a bug; please report it with the objects involved): {0}")]
    CompilerPanic(String),
    /// `explain` could not resolve what it was asked about.
    #[error("explain: {0}")]
    Explain(#[from] palisade_policy::PolicyError),
    /// The conflist could not be rendered or written.
    #[error("conflist of node {node}: {source}")]
    Conflist {
        node: String,
        #[source]
        source: crate::cniconf::CniConfError,
    },
    /// The command line or its arguments are wrong.
    #[error("{0}")]
    Usage(String),
    /// The HTTP server could not bind or serve.
    #[error("http server on {addr}: {source}")]
    Server {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A short, stable label for the `palisade_errors_total{kind=...}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Nft { .. } | Error::NftRun(_) => "nft",
            Error::Netlink { .. } => "netlink",
            Error::FlowLog { .. } => "flow_log",
            Error::Kube { .. } => "kube",
            Error::Source(_) | Error::SourceEnded { .. } | Error::SourceTask(_) => "source",
            Error::CompilerPanic(_) | Error::Explain(_) => "compile",
            Error::Conflist { .. } => "conflist",
            Error::Usage(_) => "usage",
            Error::Server { .. } => "server",
        }
    }

    /// Shorthand for an [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result with the agent's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
