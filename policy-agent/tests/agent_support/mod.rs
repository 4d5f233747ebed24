//! Helpers for the agent's root/netns tests: uniquely named namespaces, veths and temp dirs that are
//! removed on drop (also on panic), the agent as a child process killed on drop, UDP probes.
//! Nothing here touches the host's own network namespace: every `ip`/`nft` runs with `-n NS` or
//! `ip netns exec NS`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use palisade_testkit::process::KillOnDrop;
pub use palisade_testkit::temp::{sub_dir, temp_dir, write_atomic, TempDir};
pub use palisade_testkit::{unique, wait_until, Netns};

/// Wall-clock seconds (shared by all namespaces), as the probe receiver stamps packets.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// What the agent's tests ask of a node namespace, beside the shared guard's commands.
pub trait NodeNs {
    /// `nft -j list table inet palisade` in this namespace; None when absent.
    fn table(&self) -> Option<String>;
    /// Routes with palisade's protocol number, both families, as `ip` prints them.
    fn our_routes(&self) -> String;
    /// GET http://127.0.0.1:PORT/PATH from inside the namespace: (status, body), None if unreachable.
    fn http(&self, port: u16, path: &str) -> Option<(u16, String)>;
}

impl NodeNs for Netns {
    fn table(&self) -> Option<String> {
        let o = self.try_exec(&["nft", "-j", "list", "table", "inet", "palisade"]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
    fn our_routes(&self) -> String {
        let v4 = self.ip(&["route", "show", "proto", "140"]);
        let v6 = self.ip(&["-6", "route", "show", "proto", "140"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&v4.stdout),
            String::from_utf8_lossy(&v6.stdout)
        )
    }
    fn http(&self, port: u16, path: &str) -> Option<(u16, String)> {
        self.http_get(port, path).map(|r| (r.status, r.body))
    }
}

/// Port of the agent's HTTP server inside its namespace.
pub const AGENT_PORT: u16 = 9799;

/// The agent running in a node namespace; SIGKILLed on drop.
pub struct Agent {
    pub child: KillOnDrop,
}

pub struct AgentDirs {
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub cni_conf: PathBuf,
    pub ipam: PathBuf,
}

impl AgentDirs {
    pub fn new(t: &TempDir) -> Self {
        AgentDirs {
            manifests: sub_dir(t.path(), "manifests"),
            state: sub_dir(t.path(), "state"),
            cni_conf: sub_dir(t.path(), "net.d"),
            ipam: sub_dir(t.path(), "ipam"),
        }
    }
}

impl Agent {
    /// Starts `palisade-agent run` in `ns` exactly as the lab does, plus `extra` flags.
    pub fn start(ns: &Netns, node: &str, d: &AgentDirs, extra: &[&str]) -> Self {
        let bin = env!("CARGO_BIN_EXE_palisade-agent");
        let listen = format!("127.0.0.1:{AGENT_PORT}");
        let mut args = vec![
            "netns",
            "exec",
            ns.name(),
            bin,
            "run",
            "--node-name",
            node,
            "--manifests",
            d.manifests.to_str().unwrap(),
            "--state-dir",
            d.state.to_str().unwrap(),
            "--cni-conf-dir",
            d.cni_conf.to_str().unwrap(),
            "--ipam-data-dir",
            d.ipam.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("start palisade-agent");
        Agent {
            child: child.into(),
        }
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal agent");
    }
    /// Waits until /readyz answers 200.
    pub fn wait_ready(&self, ns: &Netns, timeout: Duration) -> bool {
        wait_until(timeout, || {
            matches!(ns.http(AGENT_PORT, "/readyz"), Some((200, _)))
        })
    }
}

/// A pod: a namespace wired to the node namespace by a veth, the node routing `ip/32` to it and
/// answering ARP by proxy (the contract's wiring, minus IPv6).
pub struct Pod {
    pub ns: Netns,
    pub ip: String,
    pub host_veth: String,
}

impl Pod {
    /// An unwired pod namespace (wire it later with [`Pod::wire`]).
    pub fn new(ip: &str) -> Self {
        let host_veth = unique("pv");
        Pod {
            ns: Netns::router("pap"),
            ip: ip.to_string(),
            host_veth,
        }
    }
    pub fn wire(&self, node: &Netns) {
        node.veth_to(&self.host_veth, &self.ns, "eth0");
        self.ns
            .ip(&["addr", "add", &format!("{}/32", self.ip), "dev", "eth0"]);
        self.ns.ip(&["link", "set", "eth0", "up"]);
        self.ns.ip(&["route", "add", "default", "dev", "eth0"]);
        node.sysctl(&format!("net.ipv4.conf.{}.proxy_arp", self.host_veth), "1");
        node.ip(&["link", "set", &self.host_veth, "up"]);
        node.ip(&[
            "route",
            "add",
            &format!("{}/32", self.ip),
            "dev",
            &self.host_veth,
        ]);
    }
}

/// UDP probe receiver: records the arrival time of every datagram on `port` in `log` (one line each).
pub struct Receiver(KillOnDrop);

impl Receiver {
    pub fn start(ns: &Netns, port: u16, log: &Path) -> Self {
        Self::start_family(ns, port, log, false)
    }
    /// An IPv6 receiver (`[::]:port`).
    pub fn start6(ns: &Netns, port: u16, log: &Path) -> Self {
        Self::start_family(ns, port, log, true)
    }
    fn start_family(ns: &Netns, port: u16, log: &Path, v6: bool) -> Self {
        let (fam, any) = if v6 {
            ("AF_INET6", "::")
        } else {
            ("AF_INET", "0.0.0.0")
        };
        let script = format!(
            "import socket,time,sys\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\ns.bind(('{any}',{port}))\nf=open({log:?},'a',buffering=1)\nprint('ready',flush=True)\nwhile True:\n d,a=s.recvfrom(100)\n f.write('%f %s\\n'%(time.time(),d.decode()))\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start receiver");
        let mut out = child.stdout.take().expect("receiver stdout");
        let mut buf = [0u8; 6];
        let _ = std::io::Read::read_exact(&mut out, &mut buf);
        assert_eq!(&buf, b"ready\n", "receiver did not start");
        Receiver(child.into())
    }
}

/// Arrival times (wall-clock seconds) logged by a receiver.
pub fn arrivals(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// UDP probe sender: a fresh socket (so a fresh conntrack flow) every `every_ms` to `dst:port`
/// (IPv6 when `dst` is an IPv6 address).
pub struct Sender(KillOnDrop);

impl Sender {
    pub fn start(ns: &Netns, dst: &str, port: u16, every_ms: u32) -> Self {
        let script = format!(
            "import socket,time\ni=0\nwhile True:\n s=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n try:\n  s.sendto(str(i).encode(),({dst:?},{port}))\n except OSError:\n  pass\n s.close()\n i+=1\n time.sleep({})\n",
            f64::from(every_ms) / 1000.0,
            fam = if dst.contains(':') { "AF_INET6" } else { "AF_INET" },
        );
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "python3", "-c", &script])
            .spawn()
            .expect("start sender");
        Sender(child.into())
    }
}

/// Holds the node lock as the plugin does (flock on `<state>/nft.lock`).
pub fn lock_state(state: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(palisade_contract::lock_path(state))
        .expect("open lock");
    f.lock().expect("flock");
    f
}

/// Writes a manifest file.
pub fn manifest(dir: &Path, name: &str, yaml: &str) {
    write_atomic(&dir.join(name), yaml);
}

pub fn node_yaml(name: &str, cidrs: &[&str], ips: &[&str]) -> String {
    let cidrs = cidrs
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let addrs = ips
        .iter()
        .map(|a| format!("{{type: InternalIP, address: \"{a}\"}}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDRs: [{cidrs}]}}\nstatus: {{addresses: [{addrs}]}}\n---\n")
}

pub fn pod_yaml(ns: &str, name: &str, app: &str, node: &str, ip: Option<&str>) -> String {
    let status = match ip {
        Some(ip) => format!("{{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}"),
        None => "{phase: Pending}".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\nstatus: {status}\n---\n"
    )
}

pub fn deny_ingress_yaml(ns: &str, name: &str, app: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{podSelector: {{matchLabels: {{app: {app}}}}}, policyTypes: [Ingress]}}\n---\n"
    )
}

pub fn namespace_yaml(ns: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n")
}

/// Writes an attachment record exactly as the plugin does.
pub fn write_record(state: &Path, a: &palisade_contract::Attachment) {
    palisade_contract::records::write(state, a).expect("write attachment record");
}
