//! A MODEL of a naive nftables programmer, written for this benchmark: one rule per
//! (selected pod, policy, peer) in one chain per direction, in policy creation order, then a drop per
//! isolated pod; every change rewrites the whole table with one `nft -f` (the knftables full-sync
//! pattern).

use super::{join, Rendered};
use crate::datapath::workload::{Direction, NodeView};
use std::collections::BTreeSet;
use std::fmt::Write;

pub const TABLE: &str = "naive";

pub fn render(view: &NodeView) -> Rendered {
    let mut out = String::new();
    let mut n_rules = 0usize;
    // Recreate atomically: declare, delete, then define in one transaction.
    let _ = writeln!(
        out,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    for (direction, chain, prio) in [
        (Direction::Egress, "egress", 0),
        (Direction::Ingress, "ingress", 1),
    ] {
        let _ = writeln!(
            out,
            "  chain {chain} {{\n    type filter hook forward priority {prio}; policy accept;\n    ct state established,related accept\n    ct state invalid drop"
        );
        n_rules += 2;
        let (me, them) = match direction {
            Direction::Ingress => ("daddr", "saddr"),
            Direction::Egress => ("saddr", "daddr"),
        };
        let mut isolated = BTreeSet::new();
        for p in view.policies.iter().filter(|p| p.direction == direction) {
            let ports = join(&p.ports, ", ");
            for pod in &p.selected {
                isolated.insert(*pod);
                for peer in &p.peers {
                    let _ = writeln!(
                        out,
                        "    ip {me} {pod} ip {them} {peer} tcp dport {{ {ports} }} accept"
                    );
                }
                n_rules += p.peers.len();
            }
        }
        for pod in &isolated {
            let _ = writeln!(out, "    ip {me} {pod} drop");
        }
        n_rules += isolated.len();
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    Rendered {
        nft: Some(out),
        ipset: None,
        iptables: None,
        rules: n_rules,
        elements: 0,
        nft_json: None,
        nft_after: None,
        rp_filter: Vec::new(),
        tc_guard: Vec::new(),
    }
}
