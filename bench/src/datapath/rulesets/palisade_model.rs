//! palisade's ruleset layout (ARCHITECTURE.md, "The ruleset"), rendered by the bench from its own
//! workload view. This is the stand-in used until `palisade-policy`'s compiler is wired in; it follows
//! the documented shape: per direction one base chain (postrouting, priorities 90 and 95) with
//! ct/ND/pending prologue and ONE verdict-map lookup of the local pod IP; a chain per group (distinct
//! set of policies of a pod) that lets this node's traffic in (ingress), jumps to each policy chain,
//! then drops; a chain per policy whose rule matches peer and port sets and accepts. (The self set of
//! the real layout is left out: the bench has no pod reaching itself.)

use super::{join, Rendered};
use crate::datapath::rng::fnv1a;
use crate::datapath::workload::{Direction, NodeView};
use std::collections::BTreeMap;
use std::fmt::Write;

pub const TABLE: &str = palisade_contract::TABLE_NAME;

fn h(key: &str) -> String {
    format!("{:012x}", fnv1a(key) & 0xFFFF_FFFF_FFFF)
}

const PROLOGUE: &str = "    ct state established,related accept
    ct state invalid drop
    icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept
    ip saddr @pending_v4 drop
    ip daddr @pending_v4 fib saddr type != local drop
    ip6 saddr @pending_v6 drop
    ip6 daddr @pending_v6 fib saddr type != local drop
";

pub fn render(view: &NodeView) -> Rendered {
    let mut out = String::new();
    let mut n_rules = 0usize;
    let mut n_elements = 0usize;
    let _ = writeln!(
        out,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    out.push_str("  set pending_v4 { type ipv4_addr; }\n  set pending_v6 { type ipv6_addr; }\n");
    let mut chains = String::new();
    let mut sets = String::new();
    for (direction, dir, map, base, prio, me, them) in [
        (
            Direction::Egress,
            "eg",
            "egress_v4",
            "egress",
            90,
            "saddr",
            "daddr",
        ),
        (
            Direction::Ingress,
            "in",
            "ingress_v4",
            "ingress",
            95,
            "daddr",
            "saddr",
        ),
    ] {
        // Group local pods by the exact list of their policies.
        let mut groups: BTreeMap<Vec<String>, Vec<std::net::Ipv4Addr>> = BTreeMap::new();
        for pod in &view.local_pods {
            let pols: Vec<String> = view
                .policies_of(pod.ip, direction)
                .map(|p| p.key.clone())
                .collect();
            if !pols.is_empty() {
                groups.entry(pols).or_default().push(pod.ip);
            }
        }
        let mut elements = Vec::new();
        for (pols, pods) in &groups {
            let g = h(&pols.join(","));
            let _ = writeln!(chains, "  chain {dir}_{g} {{");
            if direction == Direction::Ingress {
                chains.push_str("    fib saddr type local accept\n");
                n_rules += 1;
            }
            for key in pols {
                let _ = writeln!(chains, "    jump pol_{}_{dir}", h(key));
            }
            chains.push_str("    counter drop\n  }\n");
            n_rules += pols.len() + 1;
            for pod in pods {
                elements.push(format!("{pod} : goto {dir}_{g}"));
            }
        }
        n_elements += elements.len();
        if elements.is_empty() {
            let _ = writeln!(out, "  map {map} {{ type ipv4_addr : verdict; }}");
        } else {
            let _ = writeln!(
                out,
                "  map {map} {{ type ipv4_addr : verdict; elements = {{ {} }} }}",
                elements.join(", ")
            );
        }
        let _ = writeln!(
            chains,
            "  chain {base} {{\n    type filter hook postrouting priority {prio}; policy accept;\n{PROLOGUE}    ip {me} vmap @{map}\n  }}"
        );
        n_rules += PROLOGUE.lines().count() + 1;
        for p in view.policies.iter().filter(|p| p.direction == direction) {
            let ph = h(&p.key);
            let _ = writeln!(
                sets,
                "  set peer_{ph} {{ type ipv4_addr; elements = {{ {} }} }}",
                join(&p.peers, ", ")
            );
            n_elements += p.peers.len();
            let _ = writeln!(
                chains,
                "  chain pol_{ph}_{dir} {{\n    ip {them} @peer_{ph} tcp dport {{ {} }} accept comment \"{}\"\n  }}",
                join(&p.ports, ", "),
                p.key
            );
            n_rules += 1;
        }
    }
    out.push_str(&sets);
    out.push_str(&chains);
    out.push_str("}\n");
    Rendered {
        nft: Some(out),
        ipset: None,
        iptables: None,
        rules: n_rules,
        elements: n_elements,
        nft_json: None,
    }
}
