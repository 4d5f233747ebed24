//! Rendering and atomic writing of the conflist (see ARCHITECTURE.md, "Conflist").
//!
//! [`render`] is pure: the node's podCIDRs and a few settings in, the conflist text out. [`write()`]
//! puts that text at `<cniConfDir>/10-palisade.conflist` atomically (temp file in the same directory,
//! fsync, rename, fsync of the directory) and leaves the file alone when its content is already what
//! we want, so the runtime never sees a half-written file nor a pointless change. [`remove`] is for
//! `palisade-agent cleanup`.

use ipnet::IpNet;
use palisade_contract::cni::{min_mtu, CniVersion, CONFLIST_VERSION, MAX_MTU};
use palisade_contract::netconf::{BuiltinIpamConf, Capabilities, PluginConf, RangeConf};
use palisade_contract::{BUILTIN_IPAM_TYPE, CONFLIST_FILE, NETWORK_NAME, PLUGIN_TYPE};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Type of the chained plugin that implements `hostPort`.
pub const PORTMAP_TYPE: &str = "portmap";
/// Mode of the written conflist: the runtime reads it as root; nothing in it is secret.
const CONFLIST_MODE: u32 = 0o644;

/// Everything wrong that can happen while rendering, writing or removing the conflist.
#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error(
        "the node has no podCIDR: set --pod-network-cidr (kubeadm) or the node's spec.podCIDRs"
    )]
    NoPodCidr,
    #[error("podCIDR {0:?} is not a CIDR (want e.g. 10.244.1.0/24 or fd00:10:244:1::/64)")]
    BadPodCidr(String),
    #[error(
        "podCIDR {cidr} has host bits set; its network is {network} (host-local IPAM rejects it)"
    )]
    HostBitsSet { cidr: IpNet, network: IpNet },
    #[error("podCIDR {0} is too small to allocate pod addresses from")]
    PodCidrTooSmall(IpNet),
    #[error(
        "podCIDRs {0} and {1} are of the same address family; a node has at most one per family"
    )]
    SameFamilyTwice(IpNet, IpNet),
    #[error("mtu {mtu} is out of range {min}..={max}")]
    BadMtu { mtu: u32, min: u32, max: u32 },
    #[error("{what} {path:?} must be an absolute UTF-8 path")]
    BadPath { what: &'static str, path: PathBuf },
    #[error("cannot serialize the conflist: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("cannot {action} {path:?}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CniConfError {
    let path = path.to_path_buf();
    move |source| CniConfError::Io {
        action,
        path,
        source,
    }
}

/// What the conflist depends on: the node's podCIDRs and the agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflistParams {
    /// The node's `spec.podCIDRs` (one IPv4 and/or one IPv6), in the node's order.
    pub pod_cidrs: Vec<IpNet>,
    /// MTU of the pod interfaces.
    pub mtu: u32,
    /// The plugin's state directory (lock, attachment records).
    pub state_dir: PathBuf,
    /// Where the built-in IPAM keeps its host-local layout.
    pub ipam_data_dir: PathBuf,
    /// Wire pods even when our nft table is missing (no pending mark) instead of failing ADD.
    pub fail_open: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist {
    cni_version: &'static str,
    cni_versions: [&'static str; 2],
    name: &'static str,
    /// Palisade's entry (its keys are the contract's, read back by the plugin), then portmap.
    plugins: (PluginConf<BuiltinIpamConf>, PortmapConf),
}

#[derive(Serialize)]
struct PortmapConf {
    #[serde(rename = "type")]
    kind: &'static str,
    capabilities: PortmapCapabilities,
    snat: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortmapCapabilities {
    port_mappings: bool,
}

/// Parses the node's `spec.podCIDRs` strings, naming the first bad one.
pub fn parse_pod_cidrs<S: AsRef<str>>(cidrs: &[S]) -> Result<Vec<IpNet>, CniConfError> {
    cidrs
        .iter()
        .map(|s| {
            let s = s.as_ref();
            s.trim()
                .parse::<IpNet>()
                .map_err(|_| CniConfError::BadPodCidr(s.to_string()))
        })
        .collect()
}

fn check_pod_cidrs(cidrs: &[IpNet]) -> Result<(), CniConfError> {
    if cidrs.is_empty() {
        return Err(CniConfError::NoPodCidr);
    }
    for (i, cidr) in cidrs.iter().enumerate() {
        if cidr.trunc() != *cidr {
            return Err(CniConfError::HostBitsSet {
                cidr: *cidr,
                network: cidr.trunc(),
            });
        }
        // host-local refuses networks without two host bits (/31, /32, /127, /128).
        if cidr.prefix_len() + 2 > cidr.max_prefix_len() {
            return Err(CniConfError::PodCidrTooSmall(*cidr));
        }
        if let Some(other) = cidrs[..i]
            .iter()
            .find(|o| o.addr().is_ipv4() == cidr.addr().is_ipv4())
        {
            return Err(CniConfError::SameFamilyTwice(*other, *cidr));
        }
    }
    Ok(())
}

fn abs_utf8<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, CniConfError> {
    match path.to_str() {
        Some(s) if path.is_absolute() => Ok(s),
        _ => Err(CniConfError::BadPath {
            what,
            path: path.to_path_buf(),
        }),
    }
}

/// Renders the conflist (pretty JSON, trailing newline) exactly as ARCHITECTURE.md shows it.
pub fn render(params: &ConflistParams) -> Result<String, CniConfError> {
    check_pod_cidrs(&params.pod_cidrs)?;
    let has_v6 = params.pod_cidrs.iter().any(|c| c.addr().is_ipv6());
    let min = min_mtu(has_v6);
    if !(min..=MAX_MTU).contains(&params.mtu) {
        return Err(CniConfError::BadMtu {
            mtu: params.mtu,
            min,
            max: MAX_MTU,
        });
    }
    let conflist = Conflist {
        cni_version: CONFLIST_VERSION.as_str(),
        cni_versions: CniVersion::all_strs(),
        name: NETWORK_NAME,
        plugins: (
            PluginConf {
                kind: PLUGIN_TYPE.to_string(),
                // `ips`: a runtime hands a pod's requested addresses to us as
                // `runtimeConfig.ips` (libcni only passes the capabilities a plugin declares).
                capabilities: Some(Capabilities { ips: true }),
                mtu: Some(params.mtu),
                state_dir: Some(abs_utf8("stateDir", &params.state_dir)?.to_string()),
                fail_open: Some(params.fail_open),
                ipam: Some(BuiltinIpamConf {
                    kind: BUILTIN_IPAM_TYPE.to_string(),
                    data_dir: Some(abs_utf8("ipam dataDir", &params.ipam_data_dir)?.to_string()),
                    // One range set per podCIDR, each with one range.
                    ranges: Some(
                        params
                            .pod_cidrs
                            .iter()
                            .map(|c| {
                                vec![RangeConf {
                                    subnet: Some(c.to_string()),
                                    ..RangeConf::default()
                                }]
                            })
                            .collect(),
                    ),
                    ..BuiltinIpamConf::default()
                }),
            },
            PortmapConf {
                kind: PORTMAP_TYPE,
                capabilities: PortmapCapabilities {
                    port_mappings: true,
                },
                snat: true,
            },
        ),
    };
    let mut text = serde_json::to_string_pretty(&conflist)?;
    text.push('\n');
    Ok(text)
}

/// The agent writes the conflist once, after its first commit; until it can, it says why once.
#[derive(Debug, Default)]
pub struct Once {
    written: bool,
    warned: bool,
}

impl Once {
    pub fn is_written(&self) -> bool {
        self.written
    }

    pub fn written(&mut self) {
        self.written = true;
    }

    /// The conflist cannot be written yet: log `why` the first time only.
    pub fn not_yet(&mut self, why: &str) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!("{why}");
        }
    }
}

/// Path of our conflist in `conf_dir`.
pub fn conflist_path(conf_dir: &Path) -> PathBuf {
    conf_dir.join(CONFLIST_FILE)
}

/// What [`write()`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file was created or replaced.
    Written,
    /// The file already held exactly this content; nothing was touched.
    Unchanged,
}

/// Writes `content` to `<conf_dir>/10-palisade.conflist` atomically; skips the write when the file
/// already holds exactly `content`. Creates `conf_dir` when missing.
pub fn write(conf_dir: &Path, content: &str) -> Result<WriteOutcome, CniConfError> {
    let path = conflist_path(conf_dir);
    match fs::read(&path) {
        Ok(current) if current == content.as_bytes() => return Ok(WriteOutcome::Unchanged),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &path)(e)),
    }
    fs::create_dir_all(conf_dir).map_err(io_err("create directory", conf_dir))?;
    // A leading dot and a `.tmp` extension: libcni only loads `.conf`, `.conflist` and `.json`.
    let tmp = conf_dir.join(format!(".{CONFLIST_FILE}.{}.tmp", std::process::id()));
    let result = write_then_rename(&tmp, &path, content.as_bytes());
    if result.is_err() {
        // Best effort: the error that matters is the one we return.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(conf_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", conf_dir))?;
    Ok(WriteOutcome::Written)
}

fn write_then_rename(tmp: &Path, path: &Path, content: &[u8]) -> Result<(), CniConfError> {
    // A temp file left by a crashed agent with our pid is stale: start afresh.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale temp file", tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(CONFLIST_MODE)
        .open(tmp)
        .map_err(io_err("create", tmp))?;
    file.write_all(content).map_err(io_err("write", tmp))?;
    file.sync_all().map_err(io_err("fsync", tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(io_err("rename into place", path))
}

/// Removes our conflist from `conf_dir`. Returns whether there was one; a missing file is no error.
pub fn remove(conf_dir: &Path) -> Result<bool, CniConfError> {
    let path = conflist_path(conf_dir);
    match fs::remove_file(&path) {
        Ok(()) => {
            File::open(conf_dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync directory", conf_dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_testkit::temp::temp_dir;
    use serde_json::{json, Value};
    use std::os::unix::fs::PermissionsExt;

    fn cidrs(list: &[&str]) -> Vec<IpNet> {
        parse_pod_cidrs(list).expect("valid test cidrs")
    }

    fn params(list: &[&str]) -> ConflistParams {
        ConflistParams {
            pod_cidrs: cidrs(list),
            mtu: 1500,
            state_dir: PathBuf::from("/var/lib/palisade"),
            ipam_data_dir: PathBuf::from("/var/lib/cni/networks"),
            fail_open: false,
        }
    }

    fn dual_stack() -> ConflistParams {
        params(&["10.244.1.0/24", "fd00:10:244:1::/64"])
    }

    fn rendered(p: &ConflistParams) -> Value {
        serde_json::from_str(&render(p).expect("render")).expect("rendered text is JSON")
    }

    #[test]
    fn render_matches_the_architecture_conflist_for_a_dual_stack_node() {
        let want = json!({ "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "palisade",
          "plugins": [
            { "type": "palisade", "capabilities": { "ips": true }, "mtu": 1500, "stateDir": "/var/lib/palisade", "failOpen": false,
              "ipam": { "type": "palisade", "dataDir": "/var/lib/cni/networks",
                        "ranges": [[{ "subnet": "10.244.1.0/24" }], [{ "subnet": "fd00:10:244:1::/64" }]] } },
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true } ] });
        assert_eq!(rendered(&dual_stack()), want);
    }

    #[test]
    fn render_keeps_key_order_readable_and_ends_with_newline() {
        let text = render(&dual_stack()).unwrap();
        assert!(text.ends_with("}\n"));
        let pos = |k: &str| text.find(k).unwrap_or_else(|| panic!("{k} missing"));
        assert!(pos("\"cniVersion\"") < pos("\"cniVersions\""));
        assert!(pos("\"name\"") < pos("\"plugins\""));
        assert!(pos("\"stateDir\"") < pos("\"ipam\""));
    }

    #[test]
    fn render_gives_one_range_set_per_pod_cidr_in_node_order() {
        let v4 = rendered(&params(&["10.244.7.0/24"]));
        assert_eq!(
            v4["plugins"][0]["ipam"]["ranges"],
            json!([[{ "subnet": "10.244.7.0/24" }]])
        );
        let v6_first = rendered(&params(&["fd00:1::/64", "10.1.0.0/16"]));
        assert_eq!(
            v6_first["plugins"][0]["ipam"]["ranges"],
            json!([[{ "subnet": "fd00:1::/64" }], [{ "subnet": "10.1.0.0/16" }]])
        );
    }

    #[test]
    fn render_carries_mtu_paths_and_fail_open() {
        let mut p = params(&["10.0.0.0/24"]);
        p.mtu = 1450;
        p.state_dir = PathBuf::from("/run/pal");
        p.ipam_data_dir = PathBuf::from("/tmp/ipam");
        p.fail_open = true;
        let v = rendered(&p);
        assert_eq!(v["plugins"][0]["mtu"], 1450);
        assert_eq!(v["plugins"][0]["stateDir"], "/run/pal");
        assert_eq!(v["plugins"][0]["failOpen"], true);
        assert_eq!(v["plugins"][0]["ipam"]["dataDir"], "/tmp/ipam");
    }

    #[test]
    fn render_rejects_a_node_without_pod_cidrs() {
        assert!(matches!(render(&params(&[])), Err(CniConfError::NoPodCidr)));
    }

    #[test]
    fn render_rejects_pod_cidrs_with_host_bits() {
        let err = render(&params(&["10.244.1.5/24"])).unwrap_err();
        assert!(matches!(err, CniConfError::HostBitsSet { .. }), "{err}");
        assert!(err.to_string().contains("10.244.1.0/24"), "{err}");
    }

    #[test]
    fn render_rejects_pod_cidrs_too_small_to_allocate_from() {
        for c in ["10.0.0.0/31", "10.0.0.1/32", "fd00::/127"] {
            let err = render(&params(&[c])).unwrap_err();
            assert!(
                matches!(err, CniConfError::PodCidrTooSmall(_)),
                "{c}: {err}"
            );
        }
        assert!(render(&params(&["10.0.0.0/30"])).is_ok());
    }

    #[test]
    fn render_rejects_two_pod_cidrs_of_one_family() {
        let err = render(&params(&["10.0.0.0/24", "10.0.1.0/24"])).unwrap_err();
        assert!(matches!(err, CniConfError::SameFamilyTwice(..)), "{err}");
        let err = render(&params(&["fd00::/64", "10.0.0.0/24", "fd01::/64"])).unwrap_err();
        assert!(matches!(err, CniConfError::SameFamilyTwice(..)), "{err}");
    }

    #[test]
    fn render_rejects_mtu_out_of_range_with_a_stricter_floor_for_ipv6() {
        let mut p = params(&["10.0.0.0/24"]);
        for bad in [0, 575, 65536] {
            p.mtu = bad;
            assert!(
                matches!(render(&p), Err(CniConfError::BadMtu { .. })),
                "{bad}"
            );
        }
        p.mtu = 1000;
        assert!(render(&p).is_ok());
        let mut p6 = dual_stack();
        p6.mtu = 1000;
        assert!(matches!(
            render(&p6),
            Err(CniConfError::BadMtu { min: 1280, .. })
        ));
    }

    #[test]
    fn render_rejects_relative_paths() {
        let mut p = dual_stack();
        p.state_dir = PathBuf::from("var/lib/palisade");
        assert!(matches!(
            render(&p),
            Err(CniConfError::BadPath {
                what: "stateDir",
                ..
            })
        ));
        let mut p = dual_stack();
        p.ipam_data_dir = PathBuf::from("");
        assert!(matches!(render(&p), Err(CniConfError::BadPath { .. })));
    }

    #[test]
    fn parse_pod_cidrs_names_the_bad_entry() {
        let err = parse_pod_cidrs(&["10.0.0.0/24", "not-a-cidr"]).unwrap_err();
        assert!(err.to_string().contains("not-a-cidr"), "{err}");
        assert!(
            parse_pod_cidrs(&["10.0.0.1"]).is_err(),
            "a bare address is not a CIDR"
        );
    }

    #[test]
    fn write_creates_the_file_then_skips_identical_content_then_replaces() {
        let dir = temp_dir("palisade-cniconf-");
        let conf_dir = dir.path().join("net.d");
        let text = render(&dual_stack()).unwrap();
        assert_eq!(write(&conf_dir, &text).unwrap(), WriteOutcome::Written);
        let path = conflist_path(&conf_dir);
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );

        let before = fs::metadata(&path).unwrap();
        assert_eq!(write(&conf_dir, &text).unwrap(), WriteOutcome::Unchanged);
        let after = fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            before.ino(),
            after.ino(),
            "unchanged content must not be rewritten"
        );

        let other = render(&params(&["10.9.0.0/24"])).unwrap();
        assert_eq!(write(&conf_dir, &other).unwrap(), WriteOutcome::Written);
        assert_eq!(fs::read_to_string(&path).unwrap(), other);
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            after.ino(),
            "replaced by rename"
        );
    }

    #[test]
    fn write_leaves_only_the_conflist_even_over_a_stale_temp_file() {
        let dir = temp_dir("palisade-cniconf-");
        let stale = dir
            .path()
            .join(format!(".{CONFLIST_FILE}.{}.tmp", std::process::id()));
        fs::write(&stale, "half written").unwrap();
        write(dir.path(), "{}\n").unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CONFLIST_FILE.to_string()]);
    }

    #[test]
    fn write_reports_the_path_it_could_not_write() {
        let dir = temp_dir("palisade-cniconf-");
        let not_a_dir = dir.path().join("file");
        fs::write(&not_a_dir, "x").unwrap();
        let err = write(&not_a_dir, "{}").unwrap_err();
        assert!(matches!(err, CniConfError::Io { .. }), "{err}");
        assert!(err.to_string().contains("file"), "{err}");
    }

    #[test]
    fn remove_deletes_our_conflist_only_and_tolerates_its_absence() {
        let dir = temp_dir("palisade-cniconf-");
        let neighbour = dir.path().join("05-other.conflist");
        fs::write(&neighbour, "{}").unwrap();
        write(dir.path(), "{}\n").unwrap();
        assert!(remove(dir.path()).unwrap());
        assert!(!conflist_path(dir.path()).exists());
        assert!(neighbour.exists());
        assert!(!remove(dir.path()).unwrap());
    }

    // ---- What libcni (containernetworking/cni, libcni/conf.go and pkg/utils) accepts ----
}
