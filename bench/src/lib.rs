//! palisade-bench: benchmarks that print palisade's figures beside baselines measured in the same run.
//!
//! `datapath` builds a two-node lab out of network namespaces, loads one of several rulesets into the
//! node namespaces (no policy, an iptables + ipset model of kube-router/Calico, a naive nftables model,
//! palisade's layout) and drives traffic between a client and a server pod that live on different
//! nodes. Everything runs in namespaces the bench creates; the host's own namespace is never touched.

pub mod datapath;
pub mod enforce;

use std::path::PathBuf;

/// Logs to stderr (stdout carries results), filtered by `RUST_LOG`, `info` by default.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Everything that can go wrong in a bench run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not parse {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid bench input: {0}")]
    Invalid(String),
    #[error("teardown left things behind: {0}")]
    Teardown(String),
    #[error("a result check failed: {0}")]
    Check(String),
}

/// Result alias for the bench crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with what we were doing.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// `io_err` for the binaries.
pub fn io_err_pub(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    io_err(context)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Current UTC time as `YYYY-MM-DD HH:MM:SS` (civil-from-days, no extra crate).
pub fn utc_now() -> String {
    let secs = unix_now() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
