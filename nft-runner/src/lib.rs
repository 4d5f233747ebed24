//! Runs one nftables JSON transaction and lists one table or set: libnftables in-process
//! (`libnftables.so.1` loaded at run time with libloading, no build-time link; about 0.1 ms per small
//! transaction) with `nft -j -f -` as fallback (one process per command, about 4 ms). [`setelem`]
//! adds and deletes elements of named address sets over nfnetlink directly (messages from
//! netlink-packet-netfilter, no C library to load; an add batch takes about 0.03 ms).
//!
//! Shared by the agent (which owns `table inet palisade`) and the CNI plugin (which only adds and
//! removes pending marks in it). This crate knows no table layout: callers pass the batch and the
//! names. Only what is asked for is listed; other tables are never parsed. [`monitor`] reports
//! changes to one table that this process did not commit (nf_tables notifications); [`summary`]
//! counts and fingerprints one table from nfnetlink dumps, [`counters`] reads its named counters;
//! [`kernel`] says what the running kernel's nf_tables does that decides how a batch is written.

pub mod counters;
mod dump;
mod error;
mod exec;
pub mod kernel;
mod libnftables;
pub mod monitor;
pub mod setelem;
mod sockopt;
pub mod summary;

pub use error::{Error, Result};
pub use exec::NFT_BINARY;
pub use libnftables::LIBNFTABLES_SONAME;
pub use setelem::{ElementOp, SetOp};

use std::sync::Mutex;

/// Which way commands reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Backend {
    /// `nft -j -f -`, one process per transaction.
    Exec,
    /// libnftables in-process (falls back to exec when the library is missing).
    Lib,
}

/// Runs transactions and lists tables and sets.
///
/// With the lib backend the context acts on the network namespace of the thread that called
/// [`Nft::new`]; the exec backend acts on the namespace of the thread that runs each command.
pub struct Nft {
    lib: Option<Mutex<libnftables::LibNft>>,
}

impl Nft {
    /// A runner for `backend`. A `Lib` backend whose library cannot be loaded degrades to exec.
    pub fn new(backend: Backend) -> Self {
        let lib = match backend {
            Backend::Exec => None,
            Backend::Lib => match libnftables::LibNft::open() {
                Ok(l) => Some(Mutex::new(l)),
                Err(e) => {
                    tracing::warn!(error = %e, "libnftables unavailable, using `nft -j -f -` instead");
                    None
                }
            },
        };
        Nft { lib }
    }

    /// The backend actually in use.
    pub fn backend(&self) -> Backend {
        if self.lib.is_some() {
            Backend::Lib
        } else {
            Backend::Exec
        }
    }

    /// Applies one JSON batch (`{"nftables":[...]}`) as one atomic transaction.
    /// [`Error::is_absent`] tells whether it named a table, set or element that does not exist.
    pub fn apply(&self, batch: &str) -> Result<()> {
        self.run("apply", batch, &["-j", "-f", "-"], Some(batch))
            .map(|_| ())
    }

    /// Lists `table FAMILY NAME` as nft JSON; `None` when the table does not exist.
    pub fn list_table(&self, family: &str, table: &str) -> Result<Option<String>> {
        self.list("list table", &["table", family, table])
    }

    /// Lists `set FAMILY TABLE SET` as nft JSON; `None` when the table or the set does not exist.
    pub fn list_set(&self, family: &str, table: &str, set: &str) -> Result<Option<String>> {
        self.list("list set", &["set", family, table, set])
    }

    /// `list WORDS...`, with absence as `None`. The words are checked to be plain identifiers, so the
    /// command text and the argv are the same command.
    fn list(&self, action: &'static str, words: &[&str]) -> Result<Option<String>> {
        let command = checked_list_command(action, words)?;
        let mut args = vec!["-j", "list"];
        args.extend_from_slice(words);
        absent_as_none(self.run(action, &command, &args, None))
    }

    /// Runs `command` in-process, or `nft ARGS` (fed `stdin`) on the exec backend.
    fn run(
        &self,
        action: &'static str,
        command: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        let out = match &self.lib {
            Some(l) => match l.lock() {
                Ok(mut l) => l.run(command),
                Err(_) => Err("libnftables context poisoned (an earlier call panicked)".into()),
            },
            None => exec::run(args, stdin),
        };
        out.map_err(|message| Error::Failed { action, message })
    }
}

/// A listing's outcome with a missing table or set as `None`.
fn absent_as_none<T>(out: Result<T>) -> Result<Option<T>> {
    match out {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_absent() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `list WORDS...` once every word is a plain identifier (so the command text and the argv are the
/// same command).
fn checked_list_command(action: &'static str, words: &[&str]) -> Result<String> {
    if let Some(bad) = words.iter().find(|w| !is_identifier(w)) {
        return Err(Error::BadName {
            action,
            name: (*bad).to_string(),
        });
    }
    Ok(format!("list {}", words.join(" ")))
}

/// An nft identifier as we use them: ASCII letters, digits, `_`, `-`, `.`; not empty, not a flag.
fn is_identifier(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with('-')
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_accepted_as_names() {
        for ok in ["inet", "palisade", "pending_v4", "a-b.c"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "-j", "a b", "x;y", "t\n", "set{}", "\"q\""] {
            assert!(!is_identifier(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_name_is_refused_before_nft_runs() {
        let nft = Nft::new(Backend::Exec);
        let err = nft.list_table("inet", "x; flush ruleset").unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
        let err = nft.list_set("inet", "palisade", "-f").unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
    }
}
