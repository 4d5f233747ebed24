//! The network configuration on stdin: our keys, the IPAM section, `prevResult`, the GC list.
//!
//! Parsed by hand from a `serde_json::Value` so every error names the field path and the bad value
//! (`ipam.ranges[0][0].subnet: "10.0.0.0/33" is not a CIDR`). Unknown keys are tolerated, as the
//! spec asks runtimes to pass them through.

use crate::cni::{validate_id, CniResult};
use crate::error::{Error, Result};
use ipnet::IpNet;
use palisade_contract::netconf::{BuiltinIpamConf, PluginConf, RangeConf};
use palisade_contract::AttachmentKey;
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::PathBuf;

// MTU bounds are the contract's (the agent renders the conflist within them): the IPv4 minimum
// for any network, IPv6's when an IPv6 range is set.
use palisade_contract::cni::{CniVersion, DEFAULT_MTU, MAX_MTU, MIN_MTU, MIN_MTU_V6};

/// GC key listing the attachments still in use (spec 1.1.0).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// Legacy name of the same list, still sent by libcni.
pub const LEGACY_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// One allocation range (host-local's `range`), canonicalised: start, end and gateway are set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip) && ip >= self.start && ip <= self.end
    }
}

/// A list of ranges that together yield one address (one per family, usually).
pub type RangeSet = Vec<Range>;

/// The built-in allocator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinIpam {
    pub data_dir: PathBuf,
    pub range_sets: Vec<RangeSet>,
    /// Extra routes for the pod, via our link-local gateway of the route's family.
    pub routes: Vec<IpNet>,
}

/// `ipam`: the built-in allocator or a delegate plugin from `CNI_PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipam {
    Builtin(BuiltinIpam),
    Delegate { plugin: String },
}

/// The parsed network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub mtu: u32,
    pub state_dir: PathBuf,
    pub fail_open: bool,
    pub ipam: Ipam,
    pub prev_result: Option<CniResult>,
    /// `dns` of the network config, when any of its fields is set (it then overrides IPAM's).
    pub dns: Option<Value>,
    /// Requested addresses from `args.cni.ips` and `runtimeConfig.ips`.
    pub requested_ips: Vec<IpAddr>,
    /// GC: the attachments (container id, ifname) the runtime still uses.
    pub valid_attachments: Option<Vec<AttachmentKey>>,
    /// The bytes we were given, passed unchanged to a delegate (as libcni does).
    pub raw: Vec<u8>,
}

/// Reads just `cniVersion` (for VERSION and for the version of an error object).
pub fn peek_version(raw: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(raw)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(str::to_string)
}

/// `v` as the contract's type `T`; a value of the wrong type is a config error naming its path
/// (`prefix` + serde's path, e.g. `ipam.ranges[0][0].subnet`).
fn typed<T: serde::de::DeserializeOwned>(v: &Value, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            prefix.trim_end_matches('.').to_string()
        } else {
            format!("{prefix}{path}")
        };
        Error::config(path, e.into_inner().to_string())
    })
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<String>> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(Error::config(
            format!("{path}{key}"),
            format!("{v} is not a string"),
        )),
    }
}

fn parse_ip(value: &Option<String>, path: &str, key: &str) -> Result<Option<IpAddr>> {
    value
        .as_deref()
        .map(|s| {
            s.parse().map_err(|_| {
                Error::config(
                    format!("{path}{key}"),
                    format!("{s:?} is not an IP address"),
                )
            })
        })
        .transpose()
}

fn parse_ips(v: Option<&Value>, path: &str) -> Result<Vec<IpAddr>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let arr = v
        .as_array()
        .ok_or_else(|| Error::config(path, format!("{v} is not a list of IP addresses")))?;
    arr.iter()
        .enumerate()
        .map(|(i, ip)| {
            // args.cni.ips may carry a prefix ("10.0.0.5/24"); only the address matters.
            let s = ip.as_str().unwrap_or_default();
            let s = s.split('/').next().unwrap_or_default();
            s.parse().map_err(|_| {
                Error::config(format!("{path}[{i}]"), format!("{ip} is not an IP address"))
            })
        })
        .collect()
}

impl NetConf {
    pub fn parse(raw: &[u8]) -> Result<Self> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| Error::Decode(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Decode(format!("expected a JSON object, got {v}")))?;
        let cni_version =
            string(obj, "", "cniVersion")?.ok_or_else(|| Error::config("cniVersion", "missing"))?;
        let cni_version = crate::cni::supported_version(&cni_version)?;
        let name = string(obj, "", "name")?.ok_or_else(|| Error::config("name", "missing"))?;
        validate_id(&name).map_err(|r| Error::config("name", r))?;
        // Our own keys (the contract's types, which the agent's conflist is written from); a key
        // of the wrong type is an error naming its path.
        let ours: PluginConf<Value> = typed(&v, "")?;
        let mtu = match ours.mtu {
            None => DEFAULT_MTU,
            Some(m) if (MIN_MTU..=MAX_MTU).contains(&m) => m,
            Some(m) => {
                return Err(Error::config(
                    "mtu",
                    format!("{m} is not an integer between {MIN_MTU} and {MAX_MTU}"),
                ))
            }
        };
        let state_dir = ours
            .state_dir
            .unwrap_or_else(|| palisade_contract::DEFAULT_STATE_DIR.to_string());
        if !state_dir.starts_with('/') {
            return Err(Error::config(
                "stateDir",
                format!("{state_dir:?} is not an absolute path"),
            ));
        }
        let fail_open = ours.fail_open.unwrap_or(false);
        let ipam_value = match ours.ipam {
            Some(v @ Value::Object(_)) => v,
            Some(v) => return Err(Error::config("ipam", format!("{v} is not an object"))),
            None => {
                return Err(Error::config(
                    "ipam",
                    "missing (palisade needs an IPAM section)",
                ))
            }
        };
        let ipam_type = match ipam_value.get("type").filter(|t| !t.is_null()) {
            Some(Value::String(t)) => t.clone(),
            Some(t) => return Err(Error::config("ipam.type", format!("{t} is not a string"))),
            None => return Err(Error::config("ipam.type", "missing")),
        };
        let ipam = if ipam_type == palisade_contract::BUILTIN_IPAM_TYPE {
            Ipam::Builtin(parse_builtin(&typed(&ipam_value, "ipam.")?)?)
        } else {
            if ipam_type.is_empty() || ipam_type.contains('/') || ipam_type.starts_with('.') {
                return Err(Error::config(
                    "ipam.type",
                    format!("{ipam_type:?} is not a plugin name"),
                ));
            }
            Ipam::Delegate { plugin: ipam_type }
        };
        if let Ipam::Builtin(b) = &ipam {
            let has_v6 = b
                .range_sets
                .iter()
                .flatten()
                .any(|r| r.subnet.addr().is_ipv6());
            if has_v6 && mtu < MIN_MTU_V6 {
                return Err(Error::config(
                    "mtu",
                    format!("{mtu} is below {MIN_MTU_V6}, the IPv6 minimum"),
                ));
            }
        }
        let prev_result = match field(obj, "prevResult") {
            None => None,
            Some(p) => Some(
                serde_json::from_value(p.clone())
                    .map_err(|e| Error::config("prevResult", e.to_string()))?,
            ),
        };
        let dns = match field(obj, "dns") {
            None => None,
            Some(Value::Object(d)) => {
                let set = d.values().any(|v| match v {
                    Value::String(s) => !s.is_empty(),
                    Value::Array(a) => !a.is_empty(),
                    Value::Null => false,
                    _ => true,
                });
                set.then(|| Value::Object(d.clone()))
            }
            Some(v) => return Err(Error::config("dns", format!("{v} is not an object"))),
        };
        let mut requested_ips = parse_ips(v.pointer("/args/cni/ips"), "args.cni.ips")?;
        requested_ips.extend(parse_ips(
            v.pointer("/runtimeConfig/ips"),
            "runtimeConfig.ips",
        )?);
        let valid_attachments = match field(obj, VALID_ATTACHMENTS_KEY)
            .map(|v| (VALID_ATTACHMENTS_KEY, v))
            .or_else(|| field(obj, LEGACY_ATTACHMENTS_KEY).map(|v| (LEGACY_ATTACHMENTS_KEY, v)))
        {
            None => None,
            Some((key, v)) => Some(parse_attachments(key, v)?),
        };
        Ok(NetConf {
            cni_version,
            name,
            mtu,
            state_dir: PathBuf::from(state_dir),
            fail_open,
            ipam,
            prev_result,
            dns,
            requested_ips,
            valid_attachments,
            raw: raw.to_vec(),
        })
    }
}

fn parse_attachments(key: &str, v: &Value) -> Result<Vec<AttachmentKey>> {
    let arr = v
        .as_array()
        .ok_or_else(|| Error::config(key, format!("{v} is not a list")))?;
    arr.iter()
        .enumerate()
        .map(|(i, a)| {
            let o = a.as_object().ok_or_else(|| {
                Error::config(format!("{key}[{i}]"), format!("{a} is not an object"))
            })?;
            let p = format!("{key}[{i}].");
            let cid = string(o, &p, "containerID")?
                .ok_or_else(|| Error::config(format!("{p}containerID"), "missing"))?;
            let ifname = string(o, &p, "ifname")?
                .ok_or_else(|| Error::config(format!("{p}ifname"), "missing"))?;
            Ok(AttachmentKey {
                container_id: cid,
                ifname,
            })
        })
        .collect()
}

fn parse_builtin(ipam: &BuiltinIpamConf) -> Result<BuiltinIpam> {
    let data_dir = ipam
        .data_dir
        .clone()
        .unwrap_or_else(|| palisade_contract::DEFAULT_IPAM_DATA_DIR.to_string());
    if !data_dir.starts_with('/') {
        return Err(Error::config(
            "ipam.dataDir",
            format!("{data_dir:?} is not an absolute path"),
        ));
    }
    let mut range_sets = Vec::new();
    match (&ipam.ranges, ipam.legacy_range()) {
        (Some(sets), _) => {
            for (i, ranges) in sets.iter().enumerate() {
                if ranges.is_empty() {
                    return Err(Error::config(format!("ipam.ranges[{i}]"), "is empty"));
                }
                let mut parsed = Vec::new();
                for (j, r) in ranges.iter().enumerate() {
                    parsed.push(parse_range(r, &format!("ipam.ranges[{i}][{j}]."))?);
                }
                range_sets.push(parsed);
            }
        }
        // host-local's legacy single-range form: subnet/rangeStart/rangeEnd/gateway in ipam.
        (None, Some(legacy)) => range_sets.push(vec![parse_range(&legacy, "ipam.")?]),
        (None, None) => {
            return Err(Error::config(
                "ipam.ranges",
                "missing (give at least one range set)",
            ))
        }
    }
    if range_sets.is_empty() {
        return Err(Error::config("ipam.ranges", "is empty"));
    }
    let all: Vec<(String, &Range)> = range_sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.iter()
                .enumerate()
                .map(move |(j, r)| (format!("ipam.ranges[{i}][{j}]"), r))
        })
        .collect();
    for (i, set) in range_sets.iter().enumerate() {
        if set
            .iter()
            .any(|r| r.subnet.addr().is_ipv4() != set[0].subnet.addr().is_ipv4())
        {
            return Err(Error::config(
                format!("ipam.ranges[{i}]"),
                "mixes IPv4 and IPv6 ranges",
            ));
        }
    }
    for (a, (pa, ra)) in all.iter().enumerate() {
        for (pb, rb) in all.iter().skip(a + 1) {
            if ra.start <= rb.end && rb.start <= ra.end {
                return Err(Error::config(pb, format!("overlaps {pa} ({})", ra.subnet)));
            }
        }
    }
    let routes = ipam
        .routes
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let p = format!("ipam.routes[{i}].");
            let dst = r
                .dst
                .as_deref()
                .ok_or_else(|| Error::config(format!("{p}dst"), "missing"))?;
            dst.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| Error::config(format!("{p}dst"), format!("{dst:?} is not a CIDR")))
        })
        .collect::<Result<_>>()?;
    Ok(BuiltinIpam {
        data_dir: PathBuf::from(data_dir),
        range_sets,
        routes,
    })
}

fn parse_range(r: &RangeConf, path: &str) -> Result<Range> {
    let s = r
        .subnet
        .as_deref()
        .ok_or_else(|| Error::config(format!("{path}subnet"), "missing"))?;
    let subnet: IpNet = s
        .parse()
        .map_err(|_| Error::config(format!("{path}subnet"), format!("{s:?} is not a CIDR")))?;
    if subnet.trunc() != subnet {
        return Err(Error::config(
            format!("{path}subnet"),
            format!(
                "{s:?} has host bits set (the network address is {})",
                subnet.trunc()
            ),
        ));
    }
    if subnet.prefix_len() + 1 >= subnet.max_prefix_len() {
        return Err(Error::config(
            format!("{path}subnet"),
            format!("{s:?} is too small to allocate from"),
        ));
    }
    let in_subnet = |key: &str, ip: Option<IpAddr>| -> Result<Option<IpAddr>> {
        match ip {
            Some(ip) if !subnet.contains(&ip) => Err(Error::config(
                format!("{path}{key}"),
                format!("{ip} is not in {subnet}"),
            )),
            other => Ok(other),
        }
    };
    let first = next_ip(subnet.network());
    let last = match subnet {
        IpNet::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(n.broadcast()) - 1)),
        IpNet::V6(n) => IpAddr::V6(n.broadcast()),
    };
    let gateway = in_subnet("gateway", parse_ip(&r.gateway, path, "gateway")?)?.unwrap_or(first);
    let start =
        in_subnet("rangeStart", parse_ip(&r.range_start, path, "rangeStart")?)?.unwrap_or(first);
    let end = in_subnet("rangeEnd", parse_ip(&r.range_end, path, "rangeEnd")?)?.unwrap_or(last);
    if start > end {
        return Err(Error::config(
            format!("{path}rangeStart"),
            format!("{start} is after rangeEnd {end}"),
        ));
    }
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

/// The address after `ip` (wrapping at the top of the family's space).
pub fn next_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> String {
        format!(r#"{{"cniVersion":"1.1.0","name":"net1","type":"palisade"{extra}}}"#)
    }

    const IPAM: &str = r#","ipam":{"type":"palisade","dataDir":"/tmp/d","ranges":[[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd00::/64"}]]}"#;

    #[test]
    fn defaults_are_applied() {
        let c = NetConf::parse(conf(IPAM).as_bytes()).unwrap();
        assert_eq!(c.mtu, 1500);
        assert_eq!(
            c.state_dir,
            PathBuf::from(palisade_contract::DEFAULT_STATE_DIR)
        );
        assert!(!c.fail_open);
        let Ipam::Builtin(b) = c.ipam else {
            panic!("builtin expected")
        };
        let r = &b.range_sets[0][0];
        assert_eq!(r.start.to_string(), "10.1.0.1");
        assert_eq!(r.end.to_string(), "10.1.0.254");
        assert_eq!(r.gateway.to_string(), "10.1.0.1");
        assert_eq!(
            b.range_sets[1][0].end.to_string(),
            "fd00::ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn other_ipam_types_are_delegated() {
        let c = NetConf::parse(
            conf(r#","ipam":{"type":"host-local","subnet":"10.0.0.0/24"}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.ipam,
            Ipam::Delegate {
                plugin: "host-local".into()
            }
        );
    }

    #[test]
    fn malformed_json_is_a_decode_error() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code(), 6);
        assert_eq!(NetConf::parse(b"[1]").unwrap_err().code(), 6);
    }

    #[test]
    fn bad_config_names_the_field_and_value() {
        let cases = [
            (conf(&format!(r#","mtu":"big"{IPAM}"#)), "mtu"),
            (conf(&format!(r#","mtu":70000{IPAM}"#)), "mtu"),
            (conf(&format!(r#","failOpen":"yes"{IPAM}"#)), "failOpen"),
            (conf(&format!(r#","stateDir":"rel"{IPAM}"#)), "stateDir"),
            (conf(""), "ipam"),
            (
                conf(r#","ipam":{"type":"palisade","ranges":[[{"subnet":"10.0.0.0/33"}]]}"#),
                "ipam.ranges[0][0].subnet",
            ),
            (
                conf(r#","ipam":{"type":"palisade","ranges":[[{"subnet":"10.0.0.5/24"}]]}"#),
                "host bits",
            ),
            (
                conf(r#","ipam":{"type":"palisade","ranges":[[{"subnet":"10.0.0.0/31"}]]}"#),
                "too small",
            ),
            (
                conf(
                    r#","ipam":{"type":"palisade","ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.1"}]]}"#,
                ),
                "rangeStart",
            ),
            (
                conf(
                    r#","ipam":{"type":"palisade","ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"10.0.0.0/25"}]]}"#,
                ),
                "overlaps",
            ),
            (
                conf(r#","ipam":{"type":"palisade","ranges":[]}"#),
                "ipam.ranges",
            ),
            (conf(r#","ipam":{"type":"../x"}"#), "ipam.type"),
            // A value of the wrong type names its path through the contract's types.
            (
                conf(r#","ipam":{"type":"palisade","ranges":[[{"subnet":5}]]}"#),
                "ipam.ranges[0][0].subnet: invalid type: integer `5`",
            ),
            (
                conf(r#","ipam":{"type":"palisade","ranges":{"a":1}}"#),
                "ipam.ranges: invalid type: map",
            ),
            (
                conf(
                    r#","ipam":{"type":"palisade","dataDir":"/d","routes":[{"dst":"1.2.3.0/33"}],"ranges":[[{"subnet":"10.0.0.0/24"}]]}"#,
                ),
                "ipam.routes[0].dst",
            ),
            (conf(r#","ipam":{"type":7}"#), "ipam.type"),
            (
                r#"{"cniVersion":"1.1.0","name":"bad name","ipam":{"type":"x"}}"#.to_string(),
                "name",
            ),
        ];
        for (json, needle) in cases {
            let err = NetConf::parse(json.as_bytes()).unwrap_err();
            assert_eq!(err.code(), 7, "{json}: {err}");
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn dns_is_kept_only_when_a_field_is_set() {
        let c = NetConf::parse(
            conf(&format!(r#"{IPAM},"dns":{{"nameservers":["10.96.0.10"]}}"#)).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.dns,
            Some(serde_json::json!({"nameservers":["10.96.0.10"]}))
        );
        let c = NetConf::parse(conf(&format!(r#"{IPAM},"dns":{{"nameservers":[]}}"#)).as_bytes())
            .unwrap();
        assert_eq!(c.dns, None);
    }

    #[test]
    fn gc_list_is_read_from_the_new_and_the_legacy_key() {
        for key in [VALID_ATTACHMENTS_KEY, LEGACY_ATTACHMENTS_KEY] {
            let c = NetConf::parse(
                conf(&format!(
                    r#"{IPAM},"{key}":[{{"containerID":"c1","ifname":"eth0"}}]"#
                ))
                .as_bytes(),
            )
            .unwrap();
            assert_eq!(
                c.valid_attachments,
                Some(vec![AttachmentKey {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }])
            );
        }
    }

    #[test]
    fn requested_ips_come_from_args_and_runtime_config() {
        let c = NetConf::parse(
            conf(&format!(r#"{IPAM},"args":{{"cni":{{"ips":["10.1.0.9/24"]}}}},"runtimeConfig":{{"ips":["fd00::9"]}}"#))
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.requested_ips,
            vec![
                "10.1.0.9".parse::<IpAddr>().unwrap(),
                "fd00::9".parse().unwrap()
            ]
        );
    }
}
