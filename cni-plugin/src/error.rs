//! The plugin's one error type and its mapping to CNI error codes (spec 1.1.0 "Error").
//!
//! Every error carries the code the runtime sees and a message that names the bad field, variable
//! or value. `Error::to_json` renders the `{cniVersion, code, msg, details}` object printed on stdout.

use serde_json::json;

/// CNI error codes (spec 1.1.0, "Well-known Error Codes") and ours (>= 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// A netlink request (link, address, route) failed.
    pub const NETLINK: u32 = 100;
    /// No free address left in a range set.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// `CNI_IFNAME` (or our host veth) already exists.
    pub const INTERFACE_EXISTS: u32 = 102;
    /// Changing or probing our nft table failed for another reason than its being absent.
    pub const NFT: u32 = 103;
    /// CHECK found the attachment differs from what ADD set up.
    pub const CHECK_FAILED: u32 = 104;
    /// An address requested by the runtime is taken or outside every range.
    pub const IPAM_REQUEST: u32 = 105;
    /// An address is already allocated to this (container, ifname).
    pub const IPAM_DUPLICATE: u32 = 106;
    /// An attachment record names a link the plugin could not have made; DEL and GC refuse it.
    pub const FOREIGN_RECORD: u32 = 107;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    #[error("unsupported field {field}: {reason}")]
    UnsupportedField { field: String, reason: String },
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode network configuration from stdin: {0}")]
    Decode(String),
    #[error("invalid network configuration: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("{0}")]
    TryAgainLater(String),
    #[error("{0}")]
    NotAvailable(String),
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    IpamExhausted(String),
    #[error("{0}")]
    IpamRequest(String),
    #[error("{0}")]
    IpamDuplicate(String),
    #[error("{0}")]
    InterfaceExists(String),
    #[error("{0}")]
    Nft(String),
    #[error("CHECK failed: {0}")]
    CheckFailed(String),
    /// An attachment record read from disk names a link the plugin could not have made (its
    /// `hostVeth` is not the name derived from its container id and ifname): nothing is deleted.
    #[error("attachment record {}: {reason}; refusing to delete any link for it: check who wrote it, then remove the record by hand", .path.display())]
    ForeignRecord {
        path: std::path::PathBuf,
        reason: String,
    },
    /// An error returned by a delegated plugin (IPAM); its code and message pass through.
    #[error("{plugin}: {msg}")]
    Delegate {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
    /// Several independent steps of DEL or GC failed; all of them are reported.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<palisade_contract::records::RecordError> for Error {
    fn from(e: palisade_contract::records::RecordError) -> Self {
        Error::io(format!("{} {}", e.action, e.path.display()), e.source)
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        Error::Netlink {
            context: context.into(),
            source,
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn env(var: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidEnv {
            var,
            reason: reason.into(),
        }
    }

    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Error::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            Error::InvalidEnv { .. } => code::INVALID_ENV,
            Error::Io { .. } => code::IO,
            Error::Decode(_) => code::DECODE,
            Error::InvalidConfig { .. } => code::INVALID_CONFIG,
            Error::TryAgainLater(_) => code::TRY_AGAIN_LATER,
            Error::NotAvailable(_) => code::NOT_AVAILABLE,
            Error::Netlink { .. } => code::NETLINK,
            Error::IpamExhausted(_) => code::IPAM_EXHAUSTED,
            Error::IpamRequest(_) => code::IPAM_REQUEST,
            Error::IpamDuplicate(_) => code::IPAM_DUPLICATE,
            Error::InterfaceExists(_) => code::INTERFACE_EXISTS,
            Error::Nft(_) => code::NFT,
            Error::CheckFailed(_) => code::CHECK_FAILED,
            Error::ForeignRecord { .. } => code::FOREIGN_RECORD,
            Error::Delegate { code, .. } => *code,
            Error::Many(errs) => errs.first().map_or(code::IO, Error::code),
        }
    }

    /// Whether the netlink error is the given errno (e.g. `libc::ENODEV`).
    pub fn is_errno(&self, errno: i32) -> bool {
        match self {
            Error::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.raw_code().abs() == errno,
            _ => false,
        }
    }

    /// The CNI error object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let details = match self {
            Error::Delegate { details, .. } => details.clone(),
            Error::Io { source, .. } => source.to_string(),
            Error::Netlink { source, .. } => source.to_string(),
            _ => String::new(),
        };
        let mut v =
            json!({ "cniVersion": cni_version, "code": self.code(), "msg": self.to_string() });
        if !details.is_empty() {
            v["details"] = json!(details);
        }
        v
    }
}

/// Collects the errors of independent teardown steps so one failure never stops the others.
#[derive(Default)]
pub struct Errors(Vec<Error>);

impl Errors {
    pub fn keep<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "teardown step failed; continuing with the others");
                self.0.push(e);
                None
            }
        }
    }

    pub fn into_result(mut self) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            _ => Err(Error::Many(self.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_table() {
        assert_eq!(Error::IncompatibleVersion("9.9.9".into()).code(), 1);
        assert_eq!(Error::env("CNI_COMMAND", "missing").code(), 4);
        assert_eq!(Error::Decode("x".into()).code(), 6);
        assert_eq!(Error::config("mtu", "x").code(), 7);
        assert_eq!(Error::TryAgainLater("x".into()).code(), 11);
        assert_eq!(Error::NotAvailable("x".into()).code(), 50);
        assert!(Error::IpamExhausted("x".into()).code() >= 100);
    }

    #[test]
    fn error_json_names_the_variable_and_keeps_the_version() {
        let v = Error::env("CNI_IFNAME", "missing").to_json("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"), "{v}");
    }

    #[test]
    fn delegate_errors_pass_their_code_through() {
        let e = Error::Delegate {
            plugin: "host-local".into(),
            code: 7,
            msg: "bad".into(),
            details: "d".into(),
        };
        let v = e.to_json("1.1.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["details"], "d");
    }
}
