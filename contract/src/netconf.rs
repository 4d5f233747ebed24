//! Palisade's entry in the conflist: the agent serializes it, the runtime hands it to the plugin
//! (adding `name`, `cniVersion`, `prevResult`, `runtimeConfig` and `args`), and the plugin
//! deserializes it. One set of serde types for both sides, so a key cannot be renamed on one side
//! only. The values stay as the conflist writes them (strings for addresses and paths): the
//! plugin validates them and names the field of a bad one.

use serde::{Deserialize, Serialize};

/// The plugin's own keys. `I` is the `ipam` section: [`BuiltinIpamConf`] where the agent writes it,
/// any JSON where the plugin reads it (a delegate IPAM plugin's section has keys of its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConf<I> {
    #[serde(rename = "type", default)]
    pub kind: String,
    /// What the runtime passes as `runtimeConfig` (libcni only passes declared capabilities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// MTU of both veth ends ([`crate::cni::DEFAULT_MTU`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The node's state directory ([`crate::DEFAULT_STATE_DIR`] when absent; absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Wire pods even when the agent's table is missing, instead of failing ADD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<I>,
}

/// Capabilities the plugin declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// A pod's requested addresses (`runtimeConfig.ips`).
    #[serde(default)]
    pub ips: bool,
}

/// The built-in allocator's `ipam` section (host-local's keys, so either can read the other's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinIpamConf {
    /// [`crate::BUILTIN_IPAM_TYPE`].
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Where the store lives ([`crate::DEFAULT_IPAM_DATA_DIR`] when absent; absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// Range sets: each yields one address (one set per family, usually).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<Vec<RangeConf>>>,
    /// Extra routes for the pod, via the link-local gateway of their family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteConf>>,
    /// host-local's legacy single range, written in the section itself (no flatten: serde would
    /// then lose the field path of an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl BuiltinIpamConf {
    /// host-local's legacy single range, when the section has a `subnet` of its own.
    pub fn legacy_range(&self) -> Option<RangeConf> {
        self.subnet.as_ref().map(|_| RangeConf {
            subnet: self.subnet.clone(),
            range_start: self.range_start.clone(),
            range_end: self.range_end.clone(),
            gateway: self.gateway.clone(),
        })
    }
}

/// One range of a range set: a CIDR, optionally its first and last address and its gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// An extra route (destination only: the pod always routes via our link-local gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConf {
    #[serde(default)]
    pub dst: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_agents_entry_reads_back_as_the_plugin_reads_it() {
        let written = PluginConf {
            kind: crate::PLUGIN_TYPE.into(),
            capabilities: Some(Capabilities { ips: true }),
            mtu: Some(1450),
            state_dir: Some("/var/lib/palisade".into()),
            fail_open: Some(false),
            ipam: Some(BuiltinIpamConf {
                kind: crate::BUILTIN_IPAM_TYPE.into(),
                data_dir: Some("/var/lib/cni/networks".into()),
                ranges: Some(vec![vec![RangeConf {
                    subnet: Some("10.244.1.0/24".into()),
                    ..RangeConf::default()
                }]]),
                ..BuiltinIpamConf::default()
            }),
        };
        let text = serde_json::to_string(&written).expect("serialize");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            json!({"type": "palisade", "capabilities": {"ips": true}, "mtu": 1450,
                   "stateDir": "/var/lib/palisade", "failOpen": false,
                   "ipam": {"type": "palisade", "dataDir": "/var/lib/cni/networks",
                            "ranges": [[{"subnet": "10.244.1.0/24"}]]}})
        );
        let read: PluginConf<BuiltinIpamConf> = serde_json::from_str(&text).expect("read back");
        assert_eq!(read, written);
    }

    #[test]
    fn host_locals_legacy_single_range_is_read_from_the_section() {
        let ipam: BuiltinIpamConf = serde_json::from_value(
            json!({"type": "palisade", "subnet": "10.0.0.0/24", "gateway": "10.0.0.9"}),
        )
        .expect("legacy form");
        let legacy = ipam.legacy_range().expect("a legacy range");
        assert_eq!(legacy.subnet.as_deref(), Some("10.0.0.0/24"));
        assert_eq!(legacy.gateway.as_deref(), Some("10.0.0.9"));
        assert_eq!(ipam.ranges, None);
    }
}
