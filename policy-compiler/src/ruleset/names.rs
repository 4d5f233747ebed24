//! Every name of our table: fixed names as constants, derived names from stable hashes.
//!
//! Derived names never contain user strings, so no namespace, policy or label can reach nft
//! syntax through a name.

use crate::model::{Action, Direction, Tier};
use crate::ruleset::Family;
pub use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};

/// Base chain checking forwarded and locally sent traffic of local pods (postrouting): the egress of
/// its source, then (through [`CHAIN_INGRESS`]) the ingress of its destination.
pub const CHAIN_POSTROUTING: &str = "postrouting";
/// Regular chain checking traffic entering local pods: where the base chain goes after the egress
/// check, and where an egress policy's allow goes (semantics 7: both directions must allow).
pub const CHAIN_INGRESS: &str = "ingress";
/// Base chain checking traffic from local pods to their own node (input).
pub const CHAIN_EGRESS_HOST: &str = "egress_host";
/// `host veth . address` of every local pod interface (from the attachment records).
pub const SOURCE_SET_V4: &str = "sources_v4";
pub const SOURCE_SET_V6: &str = "sources_v6";
/// Base chain (type nat) masquerading pod traffic that leaves the cluster (postrouting).
pub const CHAIN_EGRESS_NAT: &str = "egress_nat";
/// srcnat: after our filter chain (90), so policies see the pod's own address.
pub const PRIORITY_EGRESS_NAT: i32 = 100;
/// Pod networks of the cluster (egress NAT sources), interval sets.
pub const NAT_SOURCES_V4: &str = "nat_sources_v4";
pub const NAT_SOURCES_V6: &str = "nat_sources_v6";
/// Destinations egress NAT leaves alone, interval sets.
pub const NAT_EXEMPT_V4: &str = "nat_exempt_v4";
pub const NAT_EXEMPT_V6: &str = "nat_exempt_v6";

/// Egress NAT source set of a family.
pub fn nat_sources_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => NAT_SOURCES_V4,
        Family::V6 => NAT_SOURCES_V6,
    }
}

/// Egress NAT exempt set of a family.
pub fn nat_exempt_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => NAT_EXEMPT_V4,
        Family::V6 => NAT_EXEMPT_V6,
    }
}

/// Named counters of what a node drops before any policy because its sender lied: the source
/// guard (a pod's packet not from its own address), the overlay port's guard (a datagram from a
/// host that is not a node), the related chain (a pod's related packet about a connection it is
/// not part of). `/metrics`: `palisade_forged_packets_total{kind}`.
pub const CNT_FORGED_SOURCE: &str = "cnt_forged_source";
pub const CNT_FORGED_OVERLAY: &str = "cnt_forged_overlay";
pub const CNT_FORGED_RELATED: &str = "cnt_forged_related";
/// Router advertisements and redirects from a pod's veth, dropped in `neighbour`.
pub const CNT_FORGED_ROUTER: &str = "cnt_forged_router";
/// Those four, with the `kind` label `/metrics` gives each.
pub const FORGED_KINDS: [(&str, &str); 4] = [
    (CNT_FORGED_SOURCE, "source"),
    (CNT_FORGED_OVERLAY, "overlay"),
    (CNT_FORGED_RELATED, "related"),
    (CNT_FORGED_ROUTER, "router"),
];

/// Regular chain both base chains jump to for neighbour discovery on the link: a pod may solicit
/// and answer, never advertise itself as the node's router nor redirect it.
pub const CHAIN_NEIGHBOUR: &str = "neighbour";

/// Regular chain both base chains jump to for a related packet (an ICMP error about a tracked
/// connection): from a pod's veth it passes only when that pod is an endpoint of the connection.
pub const CHAIN_RELATED: &str = "related";
/// Regular chain both base chains jump to for a new packet to a pending pod: this node may reach
/// it (kubelet probes start as soon as it runs), nothing else.
pub const CHAIN_PENDING_DST: &str = "pending_dst";
/// Regular chains every group chain of a direction jumps to first: what is allowed whatever the
/// policies say (from this node, ingress only; a pod reaching itself). One copy of these rules
/// for every group rather than one per group: the kernel parses and validates each expression of
/// a table at a full restore (~a quarter of a 10k-pod node's expressions were these copies).
pub const CHAIN_EXEMPT_IN: &str = "exempt_in";
pub const CHAIN_EXEMPT_EG: &str = "exempt_eg";

/// The exemption chain of a direction.
pub fn exempt_chain(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => CHAIN_EXEMPT_IN,
        Direction::Egress => CHAIN_EXEMPT_EG,
    }
}

/// Regular chain the input chain jumps to for a new packet to the overlay's UDP port: accepts a
/// node's underlay address, drops (counted) the rest before the VXLAN socket decapsulates it.
pub const CHAIN_TUNNEL: &str = "tunnel_in";
/// Regular chain the postrouting chain jumps to for a new packet to the overlay's UDP port:
/// accepts an outer packet this node sends to a node, returns for the rest.
pub const CHAIN_TUNNEL_OUT: &str = "tunnel_out";
/// Base chain before conntrack (priority raw) on prerouting: the overlay's outer packets a node
/// sends to our InternalIP are not tracked.
pub const CHAIN_UNTRACK_IN: &str = "tunnel_untrack_in";
/// Base chain before conntrack (priority raw) on output: the overlay's outer packets this node
/// sends to a node are not tracked.
pub const CHAIN_UNTRACK_OUT: &str = "tunnel_untrack_out";
/// raw: before conntrack (-200) looks at a packet.
pub const PRIORITY_UNTRACK: i32 = -300;
const _: () = assert!(PRIORITY_UNTRACK < -200);
/// Underlay addresses of the nodes (who may send to the overlay port).
pub const TUNNEL_PEERS_V4: &str = "tunnel_peers_v4";
pub const TUNNEL_PEERS_V6: &str = "tunnel_peers_v6";

/// This node's InternalIPs (the only destinations of the overlay's packets).
pub const TUNNEL_LOCAL_V4: &str = "tunnel_local_v4";
pub const TUNNEL_LOCAL_V6: &str = "tunnel_local_v6";

/// Overlay local address set of a family.
pub fn tunnel_local_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => TUNNEL_LOCAL_V4,
        Family::V6 => TUNNEL_LOCAL_V6,
    }
}

/// Overlay peer set of a family.
pub fn tunnel_peers_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => TUNNEL_PEERS_V4,
        Family::V6 => TUNNEL_PEERS_V6,
    }
}

/// srcnat - 10: after DNAT (and IPVS), before SNAT.
pub const PRIORITY_POSTROUTING: i32 = 90;
/// srcnat + 1 on input: after IPVS's LOCAL_IN (98).
pub const PRIORITY_EGRESS_HOST: i32 = 101;
/// The flow log's drop: every policy drop goes here (`counter goto flow_drop`), which hands the
/// packet to NFLOG within the rate limit, then drops it.
pub const CHAIN_FLOW_DROP: &str = "flow_drop";
/// The flow log of admitted connections (only with `allowed`): a base chain after ours on each hook,
/// so only what we accepted reaches it.
pub const CHAIN_FLOW_ALLOW: &str = "flow_allow";
pub const CHAIN_FLOW_ALLOW_HOST: &str = "flow_allow_host";
/// After our postrouting chain (90), before egress NAT (100).
pub const PRIORITY_FLOW_ALLOW: i32 = 95;
/// After our input chain (101).
pub const PRIORITY_FLOW_ALLOW_HOST: i32 = 102;
// The admitted-connection log sees only what our chains accepted, and pod addresses before NAT.
const _: () = assert!(
    PRIORITY_FLOW_ALLOW > PRIORITY_POSTROUTING && PRIORITY_FLOW_ALLOW < PRIORITY_EGRESS_NAT
);
const _: () = assert!(PRIORITY_FLOW_ALLOW_HOST > PRIORITY_EGRESS_HOST);
/// NFLOG prefixes: what the agent reads to tell a drop from an admitted connection.
pub const FLOW_PREFIX_DROP: &str = "palisade drop";
pub const FLOW_PREFIX_ALLOW: &str = "palisade allow";
/// What a policy in audit mode would have dropped, by direction.
pub const FLOW_PREFIX_AUDIT_INGRESS: &str = "palisade audit ingress";
pub const FLOW_PREFIX_AUDIT_EGRESS: &str = "palisade audit egress";
/// The audit log's chains (one rate budget per direction): `jump`ed to by the audit chains.
pub const CHAIN_FLOW_AUDIT_INGRESS: &str = "flow_audit_in";
pub const CHAIN_FLOW_AUDIT_EGRESS: &str = "flow_audit_eg";
/// Bytes of each logged packet handed to the agent: IP header (with options) and L4 ports.
pub const FLOW_SNAPLEN: u32 = 128;
/// Verdict maps: local pod IP → goto its group chain.
pub const MAP_EGRESS_V4: &str = "egress_v4";
pub const MAP_EGRESS_V6: &str = "egress_v6";
pub const MAP_INGRESS_V4: &str = "ingress_v4";
pub const MAP_INGRESS_V6: &str = "ingress_v6";
/// Prefix of a policy's chain.
pub const POLICY_CHAIN_PREFIX: &str = "pol_";
/// Prefixes of per-rule sets (and of the shared peer and port sets, [`peer_set`], [`ports_set`]).
pub const PEER_SET_PREFIX: &str = "peer_";
pub const CIDR_SET_PREFIX: &str = "cidr_";
pub const PORTS_SET_PREFIX: &str = "ports_";
pub const NAMED_SET_PREFIX: &str = "named_";
/// Longest comment we hand to nft (the kernel keeps at most 256 bytes of rule userdata).
pub const MAX_COMMENT_BYTES: usize = 120;

/// FNV-1a 64: stable across processes and releases (std's hasher is randomised).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff; // never a UTF-8 byte: separates parts unambiguously
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Verdict map `ifname : goto eg_<group>`: the host veth of every egress-isolated local pod. A
/// pod's IPv6 link-local and unspecified sources (which the source guard lets through for
/// neighbour discovery, and which no address map holds) reach its node with the egress verdict
/// of the pod behind the veth.
pub const MAP_EGRESS_LINKS: &str = "egress_links";

/// Verdict map of a direction and family.
pub fn map_name(dir: Direction, fam: Family) -> &'static str {
    match (dir, fam) {
        (Direction::Ingress, Family::V4) => MAP_INGRESS_V4,
        (Direction::Ingress, Family::V6) => MAP_INGRESS_V6,
        (Direction::Egress, Family::V4) => MAP_EGRESS_V4,
        (Direction::Egress, Family::V6) => MAP_EGRESS_V6,
    }
}

/// Sets of `addr . addr` pairs, one per local pod address: a pod reaching itself (e.g. through
/// a Service that DNATs back to it) is always allowed (semantics 38).
pub const SELF_SET_V4: &str = "self_v4";
pub const SELF_SET_V6: &str = "self_v6";

/// Self-traffic set of a family.
pub fn self_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => SELF_SET_V4,
        Family::V6 => SELF_SET_V6,
    }
}

/// Source-guard set of a family.
pub fn source_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => SOURCE_SET_V4,
        Family::V6 => SOURCE_SET_V6,
    }
}

/// Pending set of a family.
pub fn pending_set(fam: Family) -> &'static str {
    match fam {
        Family::V4 => PENDING_SET_V4,
        Family::V6 => PENDING_SET_V6,
    }
}

/// Whether `name` is one of the pending sets (the CNI plugin writes into them between our commits).
pub fn is_pending_set(name: &str) -> bool {
    name == PENDING_SET_V4 || name == PENDING_SET_V6
}

/// Stable id of a policy (`namespace/name`), 16 hex digits.
pub fn policy_id(policy_key: &str) -> String {
    format!("{:016x}", stable_hash(&["policy", policy_key]))
}

/// `pol_<id>_<in|eg>`
pub fn policy_chain(policy_key: &str, dir: Direction) -> String {
    format!(
        "{POLICY_CHAIN_PREFIX}{}_{}",
        policy_id(policy_key),
        dir.tag()
    )
}

/// Prefix of our named counters.
pub const COUNTER_PREFIX: &str = "cnt_";

/// `cnt_<policy id>_<in|eg>`: what a NetworkPolicy admitted in one direction (every rule of its
/// chain counts here).
pub fn policy_counter(policy_key: &str, dir: Direction) -> String {
    format!("{COUNTER_PREFIX}{}_{}", policy_id(policy_key), dir.tag())
}

/// `cnt_<policy id>_<in|eg>_conn`: the connections a NetworkPolicy admitted (their first packet).
pub fn policy_conn_counter(policy_key: &str, dir: Direction) -> String {
    format!("{}_conn", policy_counter(policy_key, dir))
}

/// `acc_<policy id>_<in|eg>`: where a NetworkPolicy's matching rules go: count, then allow.
pub fn accept_chain(policy_key: &str, dir: Direction) -> String {
    format!("acc_{}_{}", policy_id(policy_key), dir.tag())
}

/// `cnt_<group chain>_conn`: the connection attempts a group chain dropped (each first packet; a
/// retransmitted SYN of a dropped connection is an attempt again).
pub fn group_conn_counter(group_chain: &str) -> String {
    format!("{}_conn", group_counter(group_chain))
}

/// `cnt_<group chain>`: what a group chain dropped (no rule of its NetworkPolicies allowed it).
pub fn group_counter(group_chain: &str) -> String {
    format!("{COUNTER_PREFIX}{group_chain}")
}

/// `cnt_<policy id>_<in|eg>_<accept|deny|pass>`: what a ClusterNetworkPolicy's rules of one action
/// matched in one direction.
pub fn cluster_counter(policy_key: &str, dir: Direction, action: Action) -> String {
    let a = match action {
        Action::Accept => "accept",
        Action::Deny => "deny",
        Action::Pass => "pass",
    };
    format!(
        "{COUNTER_PREFIX}{}_{}_{a}",
        policy_id(policy_key),
        dir.tag()
    )
}

/// `<in|eg>_<hash>`: the group chain of pods selected by exactly these NetworkPolicies (sorted
/// keys), these ClusterNetworkPolicies of each tier (in evaluation order) and these NetworkPolicies
/// in audit mode (sorted). Without the latter two the hash is of the NetworkPolicy keys alone.
pub fn group_chain(
    policy_keys: &[String],
    admin: &[String],
    baseline: &[String],
    audit: &[String],
    dir: Direction,
) -> String {
    let mut parts: Vec<&str> = vec!["group"];
    parts.extend(policy_keys.iter().map(String::as_str));
    if !admin.is_empty() || !baseline.is_empty() {
        // `|` never starts a policy key.
        parts.push("|admin");
        parts.extend(admin.iter().map(String::as_str));
        parts.push("|baseline");
        parts.extend(baseline.iter().map(String::as_str));
    }
    if !audit.is_empty() {
        parts.push("|audit");
        parts.extend(audit.iter().map(String::as_str));
    }
    format!("{}_{:016x}", dir.tag(), stable_hash(&parts))
}

/// `<in|eg>_au_<hash of the keys>`: the audit chain of pods that these NetworkPolicies in audit
/// mode (sorted) would isolate were they enforced.
pub fn audit_chain(keys: &[String], dir: Direction) -> String {
    let mut parts: Vec<&str> = vec!["audit"];
    parts.extend(keys.iter().map(String::as_str));
    format!("{}_au_{:016x}", dir.tag(), stable_hash(&parts))
}

/// `<in|eg>_<adm|bl>_<hash of the keys and priorities in order>`: the chain of one tier's
/// ClusterNetworkPolicies for pods selected by exactly these, their rules inlined in evaluation
/// order. The priorities are in the name because they are in the chain's comment, which nft cannot
/// change in place.
pub fn tier_chain(keys: &[(String, u32)], tier: Tier, dir: Direction) -> String {
    let priorities: Vec<String> = keys.iter().map(|(_, p)| p.to_string()).collect();
    let mut parts: Vec<&str> = vec!["tier", tier.tag()];
    for ((k, _), p) in keys.iter().zip(&priorities) {
        parts.push(k);
        parts.push(p);
    }
    format!("{}_{}_{:016x}", dir.tag(), tier.tag(), stable_hash(&parts))
}

/// Name of the set of protocols and ports `ranges` (merged per protocol, as a rule holds them):
/// `ports_<hash of the ranges>`. Named by its content, so every rule with the same ports shares one
/// set: it never changes, and the kernel's commit walks the table's sets by name (at 10k policies
/// 1,234 port sets held 2 distinct contents).
pub fn ports_set(ranges: &[(crate::model::Protocol, u16, u16)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(p, lo, hi)| format!("{}/{lo}-{hi}", p.as_api()))
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    format!("{PORTS_SET_PREFIX}{:016x}", stable_hash(&parts))
}

/// Name of the peer set of a family of every rule whose pod peers are `pod_key`
/// (`PeerSet::pod_key`): `peer_<hash of the peers>_<v4|v6>`. Its content follows from the peers
/// alone, so rules with the same peers share it (10k policies held 5,060 per-rule peer sets of
/// 1,928 distinct contents).
pub fn peer_set(pod_key: &str, fam: Family) -> String {
    format!(
        "{PEER_SET_PREFIX}{:016x}_{}",
        stable_hash(&[pod_key]),
        fam.tag()
    )
}

/// Name of the named-port set of a family of every egress rule whose pod peers are `pod_key` and
/// whose named ports are `named_key` (`PortSet::named_key`): `named_<hash>_<v4|v6>`. Its content
/// (the peers' addresses with their ports of those names) follows from the two alone; rules of
/// one template in many namespaces' policies are common, and each held its own copy of the peers'
/// entries (at 100k pods a landing pod's policy brought 66k elements the node held three times).
pub fn shared_named_set(pod_key: &str, named_key: &str, fam: Family) -> String {
    format!(
        "{NAMED_SET_PREFIX}{:016x}_{}",
        stable_hash(&["named", pod_key, named_key]),
        fam.tag()
    )
}

/// Name of a per-rule set: `<prefix><policy id>_<in|eg>_<rule>[_<v4|v6>]`.
pub fn rule_set(
    prefix: &str,
    policy_key: &str,
    dir: Direction,
    rule: usize,
    fam: Option<Family>,
) -> String {
    match fam {
        Some(f) => format!(
            "{prefix}{}_{}_{rule}_{}",
            policy_id(policy_key),
            dir.tag(),
            f.tag()
        ),
        None => format!("{prefix}{}_{}_{rule}", policy_id(policy_key), dir.tag()),
    }
}

/// A comment safe to hand to nft as a JSON string: control characters become spaces and it is
/// cut (on a character boundary) to [`MAX_COMMENT_BYTES`].
pub fn comment(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_COMMENT_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_COMMENT_BYTES {
            break;
        }
        out.push(c);
    }
    out
}
