//! What the agent's conflist and the plugin agree on about the CNI spec: the versions palisade
//! speaks (one typed list, compared as versions, never as strings) and the MTU bounds the agent
//! renders into the conflist and the plugin checks again on stdin.

use std::fmt;

/// A CNI spec version palisade speaks; ordered oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V1_0_0,
    /// Adds STATUS, GC and `interfaces[].mtu`.
    V1_1_0,
}

impl CniVersion {
    /// Every version we accept in a network configuration and advertise, oldest first.
    pub const ALL: [CniVersion; 2] = [CniVersion::V1_0_0, CniVersion::V1_1_0];
    /// What VERSION answers when the runtime sent no configuration.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version's text as the spec writes it (`cniVersion`).
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// `s` exactly as one of [`CniVersion::ALL`] is written; `None` for any other text.
    pub fn parse(s: &str) -> Option<CniVersion> {
        CniVersion::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// STATUS and GC exist in this version.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// A result's `interfaces[].mtu` exists in this version.
    pub fn has_interface_mtu(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// The texts of [`CniVersion::ALL`] (`supportedVersions`, the conflist's `cniVersions`).
    pub fn all_strs() -> [&'static str; 2] {
        CniVersion::ALL.map(CniVersion::as_str)
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Top-level version of the conflist: 1.0.0, for runtimes whose libcni predates `cniVersions`
/// (containerd 1.6/1.7 vendor libcni 1.1.x) and so hand this version to every plugin of the chain,
/// including a `portmap` too old for 1.1.0 (Debian 12 ships 1.1.1, which rejects it and would fail
/// every pod's ADD). libcni >= 1.2 reads `cniVersions` and picks 1.1.0 (GC, STATUS).
pub const CONFLIST_VERSION: CniVersion = CniVersion::V1_0_0;

/// MTU of both veth ends when the configuration names none.
pub const DEFAULT_MTU: u32 = 1500;
/// Smallest MTU we accept (the IPv4 minimum datagram every host must take).
pub const MIN_MTU: u32 = 576;
/// Smallest MTU of a link that carries IPv6 (RFC 8200).
pub const MIN_MTU_V6: u32 = 1280;
/// Largest MTU a Linux veth takes.
pub const MAX_MTU: u32 = 65535;

/// The smallest MTU a pod network may have: IPv6's minimum when it carries IPv6.
pub fn min_mtu(carries_ipv6: bool) -> u32 {
    if carries_ipv6 {
        MIN_MTU_V6
    } else {
        MIN_MTU
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_versions_and_parse_only_their_exact_text() {
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
        assert_eq!(CniVersion::parse("1.1.0"), Some(CniVersion::V1_1_0));
        for other in ["1.1", "0.4.0", "1.10.0", " 1.0.0", ""] {
            assert_eq!(CniVersion::parse(other), None, "{other:?}");
        }
        assert_eq!(CniVersion::all_strs(), ["1.0.0", "1.1.0"]);
        assert!(!CniVersion::V1_0_0.has_status_and_gc() && CniVersion::V1_1_0.has_status_and_gc());
    }

    #[test]
    fn an_ipv6_network_needs_the_ipv6_minimum_mtu() {
        assert_eq!(min_mtu(false), MIN_MTU);
        assert_eq!(min_mtu(true), MIN_MTU_V6);
    }
}
