//! A network namespace a test made (`ip netns add`), deleted when its guard drops (also on panic):
//! the one namespace guard of every test and benchmark. Everything a test runs goes into one of
//! these; the host's own namespace is never touched.

use crate::cmd::{must, require_root, run};
use crate::names::unique;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Directory where `ip netns` keeps its bind mounts (what CNI's `CNI_NETNS` points into).
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace of our own, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix><pid>x<n>` with its loopback up; fails the test (root tests never skip).
    pub fn new(prefix: &str) -> Self {
        require_root();
        Self::create(prefix).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Netns::new`], but an error instead of a panic (for benchmarks, which report and exit).
    pub fn create(prefix: &str) -> std::io::Result<Self> {
        let name = unique(prefix);
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "ip netns add {name}: {} (needs root)",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // From here on the guard owns the namespace: an error below still deletes it.
        let ns = Netns { name };
        let lo = ns.try_exec(&["ip", "link", "set", "lo", "up"]);
        if !lo.status.success() {
            return Err(std::io::Error::other(format!(
                "loopback up in {}: {}",
                ns.name,
                String::from_utf8_lossy(&lo.stderr).trim()
            )));
        }
        Ok(ns)
    }

    /// A namespace that routes like a node: IPv4/IPv6 forwarding on, reverse-path filter off.
    pub fn router(prefix: &str) -> Self {
        let ns = Self::new(prefix);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, as a runtime passes it in `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `argv` inside the namespace; panics unless it succeeds; its stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        must(self.command(argv[0]).args(&argv[1..]))
    }

    /// Runs `argv` inside the namespace and returns its output whatever its status.
    pub fn try_exec(&self, argv: &[&str]) -> Output {
        run(self.command(argv[0]).args(&argv[1..]))
    }

    /// Runs `argv` inside the namespace with `input` on its stdin; its output whatever its status.
    pub fn exec_with_stdin(&self, argv: &[&str], input: &[u8]) -> Output {
        let mut cmd = self.command(argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            // A command that exits early closes its stdin: its status and stderr tell why.
            let _ = stdin.write_all(input);
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"))
    }

    /// `ip -n <name> <args>`; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `GET path` on 127.0.0.1:`port` inside this namespace; `None` when nothing answers.
    pub fn http_get(&self, port: u16, path: &str) -> Option<crate::http::Response> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        crate::http::get_in(&self.path(), addr, path, std::time::Duration::from_secs(2)).ok()
    }

    /// A veth pair: `name` here, its peer moved into `peer` as `peer_name` (both ends down).
    pub fn veth_to(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ]);
    }

    /// Sets one sysctl inside the namespace; panics unless it succeeds.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        json_list(&self.exec(&["ip", "-j", "link", "show"]))
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// The main-table routes of both families, as `ip -j route` prints them.
    pub fn routes(&self) -> Vec<Value> {
        ["-4", "-6"]
            .iter()
            .flat_map(|fam| json_list(&self.exec(&["ip", "-j", fam, "route", "show"])))
            .collect()
    }

    /// Addresses (without prefix length) on `ifname`; none when the link is missing.
    pub fn addresses(&self, ifname: &str) -> Vec<String> {
        let out = self.try_exec(&["ip", "-j", "addr", "show", "dev", ifname]);
        json_list(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["local"].as_str().map(str::to_string))
            .collect()
    }
}

/// Moves the calling thread into a fresh, unnamed network namespace of its own (`unshare`): for a
/// test that talks to the kernel from its own thread (each test runs on a thread of its own). The
/// namespace goes when the thread ends; the host's namespace is never touched. Fails the test when
/// not root.
pub fn enter_private_netns() {
    require_root();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e}"));
}

/// The elements of a JSON array `ip -j` printed (empty for anything else).
fn json_list(text: &str) -> Vec<Value> {
    match serde_json::from_str(text) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("could not delete netns {}: {out:?}", self.name);
        }
    }
}
