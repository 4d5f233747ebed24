//! The CNI protocol (spec 1.1.0): commands, environment, `CNI_ARGS`, versions and the result object.
//!
//! Pure: nothing here touches the system, so all of it is unit tested without root.

use crate::error::{Error, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;

pub use palisade_contract::cni::CniVersion;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(Error::env(
                    "CNI_COMMAND",
                    format!(
                        "unknown command {other:?} (want ADD, DEL, CHECK, STATUS, GC or VERSION)"
                    ),
                ))
            }
        })
    }

    /// Operations that need a container (`CNI_CONTAINERID`, `CNI_IFNAME`).
    pub fn needs_container(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Operations that need `CNI_NETNS` (it is optional on DEL).
    pub fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

/// The pod identity and requested addresses a runtime passes in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// `IP=a,b` (host-local's requested addresses).
    pub ips: Vec<IpAddr>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Unknown keys are ignored (runtimes send `IgnoreUnknown=1` and others);
    /// a pair without `=` or a bad `IP=` value is an error naming `CNI_ARGS`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| Error::env("CNI_ARGS", format!("{pair:?} is not KEY=VALUE")))?;
            let value = || (!v.is_empty()).then(|| v.to_string());
            match k {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value(),
                "K8S_POD_NAME" => args.pod_name = value(),
                "K8S_POD_UID" => args.pod_uid = value(),
                "IP" => {
                    for ip in v.split(',').filter(|s| !s.is_empty()) {
                        args.ips.push(ip.trim().parse().map_err(|_| {
                            Error::env("CNI_ARGS", format!("IP={ip:?} is not an IP address"))
                        })?);
                    }
                }
                _ => {}
            }
        }
        Ok(args)
    }

    /// Whether the runtime named a Pod (both namespace and name): only then is there something
    /// for a policy to select, so only then does ADD set the pending mark.
    pub fn is_pod(&self) -> bool {
        self.pod_namespace.is_some() && self.pod_name.is_some()
    }
}

/// The `CNI_*` environment of one invocation, validated for its command.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH` split on `:`, used to find delegates.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads and validates the environment; `get` is `std::env::var` in the binary, a map in tests.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let command = Command::parse(
            &get("CNI_COMMAND").ok_or_else(|| Error::env("CNI_COMMAND", "not set"))?,
        )?;
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: nonempty("CNI_NETNS"),
            ifname: String::new(),
            args: CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?,
            path: get("CNI_PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        };
        if command.needs_container() {
            let cid = nonempty("CNI_CONTAINERID")
                .ok_or_else(|| Error::env("CNI_CONTAINERID", "not set"))?;
            validate_id(&cid).map_err(|r| Error::env("CNI_CONTAINERID", r))?;
            let ifname =
                nonempty("CNI_IFNAME").ok_or_else(|| Error::env("CNI_IFNAME", "not set"))?;
            validate_ifname(&ifname).map_err(|r| Error::env("CNI_IFNAME", r))?;
            env.container_id = cid;
            env.ifname = ifname;
        }
        if command.needs_netns() && env.netns.is_none() {
            return Err(Error::env("CNI_NETNS", "not set"));
        }
        Ok(env)
    }
}

/// Container ids and network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (libcni `utils.ValidateContainerID`).
pub fn validate_id(id: &str) -> std::result::Result<(), String> {
    let mut chars = id.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok_first && ok_rest {
        Ok(())
    } else {
        Err(format!("{id:?} must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"))
    }
}

/// Interface names: 1–15 bytes, not `.`/`..`, no `/`, `:` or whitespace (libcni `ValidateInterfaceName`).
pub fn validate_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 bytes long"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} must not contain '/', ':' or whitespace"));
    }
    Ok(())
}

/// Checks the configuration's `cniVersion` against what we support and what the command needs.
/// The configuration's `cniVersion` as one we speak, or an incompatible-version error (code 1).
pub fn supported_version(version: &str) -> Result<CniVersion> {
    CniVersion::parse(version).ok_or_else(|| {
        Error::IncompatibleVersion(format!(
            "cniVersion {version:?} is not supported (supported: {})",
            CniVersion::all_strs().join(", ")
        ))
    })
}

/// Refuses a command the configuration's version does not have (STATUS and GC before 1.1.0).
pub fn check_version(version: CniVersion, command: Command) -> Result<()> {
    if matches!(command, Command::Status | Command::Gc) && !version.has_status_and_gc() {
        return Err(Error::IncompatibleVersion(format!(
            "{command:?} needs cniVersion {}, the configuration says {:?}",
            CniVersion::V1_1_0,
            version.as_str()
        )));
    }
    Ok(())
}

/// The VERSION answer.
pub fn version_result(requested: &str) -> serde_json::Value {
    serde_json::json!({ "cniVersion": requested, "supportedVersions": CniVersion::all_strs() })
}

/// `interfaces[]` of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// `ips[]` of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// `routes[]` of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// The ADD result (and the shortened IPAM result of a delegate, which has no interfaces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Env> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn add_env_is_parsed_with_pod_identity_and_path() {
        let e = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u1;K8S_POD_INFRA_CONTAINER_ID=abc"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert!(e.args.is_pod());
        assert_eq!(e.args.pod_uid.as_deref(), Some("u1"));
    }

    #[test]
    fn missing_or_bad_env_names_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "FROB")], "CNI_COMMAND"),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "-bad"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "a-very-long-ifname"),
                ],
                "CNI_IFNAME",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "eth/0"),
                ],
                "CNI_IFNAME",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "junk"),
                ],
                "CNI_ARGS",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "IP=1.2.3"),
                ],
                "CNI_ARGS",
            ),
        ];
        for (pairs, var) in cases {
            let err = env_of(pairs).unwrap_err();
            assert_eq!(err.code(), 4, "{pairs:?}");
            assert!(err.to_string().contains(var), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn del_without_netns_and_version_without_container_are_valid() {
        assert!(env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok());
        assert!(env_of(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy")
        ])
        .is_ok());
        assert!(env_of(&[("CNI_COMMAND", "GC")]).is_ok());
    }

    #[test]
    fn version_negotiation_accepts_1_0_and_1_1_and_gates_gc_and_status() {
        let v1_0 = supported_version("1.0.0").unwrap();
        let v1_1 = supported_version("1.1.0").unwrap();
        assert!(check_version(v1_0, Command::Add).is_ok());
        assert!(check_version(v1_1, Command::Gc).is_ok());
        assert_eq!(supported_version("0.4.0").unwrap_err().code(), 1);
        assert_eq!(supported_version("1.10.0").unwrap_err().code(), 1);
        assert_eq!(check_version(v1_0, Command::Status).unwrap_err().code(), 1);
        assert_eq!(check_version(v1_0, Command::Gc).unwrap_err().code(), 1);
        let v = version_result("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn result_json_matches_the_spec_shape() {
        let r = CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "palx".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1500),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:00".into(),
                    mtu: Some(1500),
                    sandbox: "/run/netns/x".into(),
                },
            ],
            ips: vec![IpConfig {
                address: "10.1.0.2/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0].get("sandbox"), None);
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(v["ips"][0]["address"], "10.1.0.2/32");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
        assert!(v.get("dns").is_none());
        let back: CniResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn ipam_result_without_interfaces_parses() {
        let s = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.2.0.5/24","gateway":"10.2.0.1"}],"dns":{}}"#;
        let r: CniResult = serde_json::from_str(s).unwrap();
        assert_eq!(r.ips[0].address.addr().to_string(), "10.2.0.5");
        assert!(r.interfaces.is_empty());
    }
}
