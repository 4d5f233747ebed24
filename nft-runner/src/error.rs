//! The crate's one error type.

/// nft refused or failed a command, or was asked for something that is not an nft name.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command ran (in-process or as `nft`) and failed; `message` is nft's own error text.
    #[error("nft {action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
    /// A family, table or set name that is not a plain nft identifier (never sent to nft).
    #[error("nft {action}: {name:?} is not an nft identifier (letters, digits, `_`, `-`, `.`)")]
    BadName { action: &'static str, name: String },
    /// The kernel answered ENOENT to a set element batch or probe: the table or the set does not
    /// exist, or a deleted element was not there (only from [`crate::setelem`]; nothing was changed).
    #[error(
        "nfnetlink {action}: table {family} {table} or one of the sets {sets:?} does not exist"
    )]
    Absent {
        action: &'static str,
        family: String,
        table: String,
        sets: Vec<String>,
    },
    /// The kernel refused a set element batch or probe for another reason, or the socket failed;
    /// nothing was changed.
    #[error("nfnetlink {action} on table {table} failed: {source}")]
    Netlink {
        action: &'static str,
        table: String,
        #[source]
        source: std::io::Error,
    },
    /// The nf_tables notification socket (see [`crate::monitor`]) could not be opened or read.
    #[error("nf_tables monitor: cannot {action}: {source}")]
    Monitor {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The ruleset changed during every try of a listing that must see one generation (commits
    /// came in between each time); nothing is wrong, a later listing may settle.
    #[error("nfnetlink {action}: the ruleset changed during each of {attempts} tries")]
    Unsettled {
        action: &'static str,
        attempts: usize,
    },
    /// The kernel's answer was not what the protocol promises (truncated or missing acks).
    #[error("nfnetlink {action}: unexpected answer from the kernel: {message}")]
    Protocol {
        action: &'static str,
        message: String,
    },
}

/// What nft says when a command names a table, chain, set or element that does not exist (ENOENT).
pub(crate) const ABSENT_MARKER: &str = "No such file or directory";

impl Error {
    /// Whether nft failed because the command named an object that does not exist (a table, chain,
    /// set, or an element being deleted): for `add element` this means the table or set is absent.
    pub fn is_absent(&self) -> bool {
        match self {
            Error::Failed { message, .. } => message.contains(ABSENT_MARKER),
            Error::Absent { .. } => true,
            Error::BadName { .. }
            | Error::Netlink { .. }
            | Error::Protocol { .. }
            | Error::Unsettled { .. }
            | Error::Monitor { .. } => false,
        }
    }
}

impl Error {
    /// Whether a listing gave up because the ruleset kept changing under it ([`Error::Unsettled`]).
    pub fn is_unsettled(&self) -> bool {
        matches!(self, Error::Unsettled { .. })
    }

    /// Whether the kernel refused a transaction because another one was committed after the
    /// generation it was bound to (`ERESTART`; see `setelem::ElementWriter::commit_prepared_at`).
    pub fn is_generation_moved(&self) -> bool {
        matches!(self, Error::Netlink { source, .. } if source.raw_os_error() == Some(libc::ERESTART))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enoent_from_nft_counts_as_absent_and_other_failures_do_not() {
        let absent = Error::Failed {
            action: "apply",
            message: "Error: Could not process rule: No such file or directory".into(),
        };
        let syntax = Error::Failed {
            action: "apply",
            message: "Error: syntax error, unexpected junk".into(),
        };
        assert!(absent.is_absent());
        assert!(!syntax.is_absent());
        assert!(!Error::BadName {
            action: "list",
            name: "a b".into()
        }
        .is_absent());
        assert!(absent.to_string().starts_with("nft apply failed: "));
        let unsettled = Error::Unsettled {
            action: "summarize table",
            attempts: 8,
        };
        assert!(!unsettled.is_absent() && unsettled.is_unsettled());
        assert!(!absent.is_unsettled());
    }
}
