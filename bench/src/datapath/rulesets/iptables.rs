//! A MODEL of the iptables + ipset layout of kube-router (and, in its essentials, Calico's iptables
//! mode), written for this benchmark. It is not their code; it reproduces the shape that decides the
//! per-packet cost:
//!
//! ```text
//! FORWARD -> KUBE-ROUTER-FORWARD        one `-d pod` and one `-s pod` jump per isolated local pod,
//!                                       linear, in an arbitrary (hash) order
//! KUBE-POD-FW-<pod>                     ct established accept, ct invalid drop, then a jump to every
//!                                       policy chain selecting the pod, in order; unmarked -> DROP;
//!                                       marked -> ACCEPT
//! KUBE-NWPLCY-<policy>                  -m set <peers> -p tcp -m multiport --dports .. -j MARK; RETURN
//! ```
//!
//! A change is applied as kube-router does since v1.2: a full `ipset restore` and `iptables-restore`.

use super::{join, Rendered};
use crate::datapath::fnv1a;
use crate::datapath::workload::{Direction, NodeView};
use std::fmt::Write;

/// Flushes the filter table (and deletes our chains).
pub const EMPTY: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
const MARK: &str = "0x10000/0x10000";

fn short(key: &str) -> String {
    format!("{:012X}", fnv1a(key) & 0xFFFF_FFFF_FFFF)
}

pub fn render(view: &NodeView) -> Rendered {
    let mut ipset = String::new();
    let mut chains = String::new();
    let mut rules = String::new();
    let mut n_rules = 0usize;
    let mut n_elements = 0usize;
    rules.push_str(
        "-A FORWARD -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-FORWARD\n",
    );
    chains.push_str(":KUBE-ROUTER-FORWARD - [0:0]\n");
    n_rules += 1;
    // Policy chains and their ipsets.
    for p in &view.policies {
        let h = short(&p.key);
        let peers = format!("KUBE-SRC-{h}");
        let _ = writeln!(
            ipset,
            "create {peers} hash:ip family inet hashsize 1024 maxelem 1048576"
        );
        for ip in &p.peers {
            let _ = writeln!(ipset, "add {peers} {ip}");
        }
        n_elements += p.peers.len();
        let chain = format!("KUBE-NWPLCY-{h}");
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let dir = match p.direction {
            Direction::Ingress => "src",
            Direction::Egress => "dst",
        };
        let _ = writeln!(
            rules,
            "-A {chain} -m comment --comment \"{}\" -m set --match-set {peers} {dir} -p tcp -m multiport --dports {} -j MARK --set-xmark {MARK}",
            p.key,
            join(&p.ports, ",")
        );
        let _ = writeln!(rules, "-A {chain} -m mark --mark {MARK} -j RETURN");
        n_rules += 2;
    }
    // Per-pod dispatch and firewall chains, for isolated pods only.
    for pod in &view.local_pods {
        let ingress: Vec<_> = view.policies_of(pod.ip, Direction::Ingress).collect();
        let egress: Vec<_> = view.policies_of(pod.ip, Direction::Egress).collect();
        if ingress.is_empty() && egress.is_empty() {
            continue;
        }
        let chain = format!("KUBE-POD-FW-{}", short(&pod.key));
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let ip = pod.ip;
        let _ = writeln!(rules, "-A KUBE-ROUTER-FORWARD -d {ip}/32 -j {chain}");
        let _ = writeln!(rules, "-A KUBE-ROUTER-FORWARD -s {ip}/32 -j {chain}");
        let _ = writeln!(
            rules,
            "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
        let _ = writeln!(rules, "-A {chain} -m conntrack --ctstate INVALID -j DROP");
        n_rules += 4;
        for p in &ingress {
            let _ = writeln!(
                rules,
                "-A {chain} -d {ip}/32 -j KUBE-NWPLCY-{}",
                short(&p.key)
            );
        }
        for p in &egress {
            let _ = writeln!(
                rules,
                "-A {chain} -s {ip}/32 -j KUBE-NWPLCY-{}",
                short(&p.key)
            );
        }
        n_rules += ingress.len() + egress.len();
        if !ingress.is_empty() {
            let _ = writeln!(
                rules,
                "-A {chain} -d {ip}/32 -m mark ! --mark {MARK} -j DROP"
            );
            n_rules += 1;
        }
        if !egress.is_empty() {
            let _ = writeln!(
                rules,
                "-A {chain} -s {ip}/32 -m mark ! --mark {MARK} -j DROP"
            );
            n_rules += 1;
        }
        let _ = writeln!(rules, "-A {chain} -j ACCEPT");
        n_rules += 1;
    }
    let iptables = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{chains}{rules}COMMIT\n"
    );
    Rendered {
        nft: None,
        ipset: Some(ipset),
        iptables: Some(iptables),
        rules: n_rules,
        elements: n_elements,
        nft_json: None,
        nft_after: None,
        rp_filter: Vec::new(),
        tc_guard: Vec::new(),
    }
}
