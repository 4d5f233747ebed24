//! The agent's one door into the pure compiler (`palisade-policy`): compile, full replace, diff.
//! TEMPORARY STUB until palisade-policy's compile/ruleset/diff land: renders only the contract's
//! skeleton (pending sets and the base chains that drop pending addresses).

use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};
use palisade_policy::model::ClusterState;
use serde_json::json;

/// A compiled ruleset for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    full: String,
    /// Objects the compiler skipped, each naming the object.
    pub warnings: Vec<String>,
}

/// One incremental transaction.
#[derive(Debug, Clone)]
pub struct Batch {
    pub json: String,
    /// Counts of what the batch touches, for logs.
    pub stats: String,
}

/// Compiles the state for `node`.
pub fn compile(state: &ClusterState, _node: &str) -> Desired {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in state.attachments.iter().filter(|a| a.pending) {
        let known = a.pod_key().is_some_and(|k| state.pods.contains_key(&k));
        if known {
            continue;
        }
        for ip in &a.ips {
            match ip {
                std::net::IpAddr::V4(x) => v4.push(json!(x.to_string())),
                std::net::IpAddr::V6(x) => v6.push(json!(x.to_string())),
            }
        }
    }
    let t = json!({"family": TABLE_FAMILY, "name": TABLE_NAME});
    let mut cmds = vec![
        json!({"add": {"table": t}}),
        json!({"delete": {"table": t}}),
        json!({"add": {"table": t}}),
    ];
    for (name, ty, elems) in [
        (PENDING_SET_V4, "ipv4_addr", v4),
        (PENDING_SET_V6, "ipv6_addr", v6),
    ] {
        let mut set =
            json!({"family": TABLE_FAMILY, "table": TABLE_NAME, "name": name, "type": ty});
        if !elems.is_empty() {
            set["elem"] = json!(elems);
        }
        cmds.push(json!({"add": {"set": set}}));
    }
    for (name, hook, prio) in [
        ("egress", "postrouting", 90),
        ("ingress", "postrouting", 95),
        ("egress_host", "input", 101),
    ] {
        cmds.push(
            json!({"add": {"chain": {"family": TABLE_FAMILY, "table": TABLE_NAME, "name": name,
            "type": "filter", "hook": hook, "prio": prio, "policy": "accept"}}}),
        );
        for (field, proto, set) in [
            ("saddr", "ip", PENDING_SET_V4),
            ("daddr", "ip", PENDING_SET_V4),
            ("saddr", "ip6", PENDING_SET_V6),
            ("daddr", "ip6", PENDING_SET_V6),
        ] {
            cmds.push(json!({"add": {"rule": {"family": TABLE_FAMILY, "table": TABLE_NAME, "chain": name, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}}, "right": format!("@{set}")}},
                {"drop": null}]}}}));
        }
    }
    Desired {
        full: json!({"nftables": cmds}).to_string(),
        warnings: Vec::new(),
    }
}

/// One transaction that replaces our whole table with `d`.
pub fn full_replace(d: &Desired) -> String {
    d.full.clone()
}

/// The transaction from `last` to `next`; `None` when nothing changes.
pub fn diff(last: &Desired, next: &Desired) -> Option<Batch> {
    (last != next).then(|| Batch {
        json: next.full.clone(),
        stats: "full (stub)".into(),
    })
}

/// Explains `from` → `to` on `port` (stub: not available until the compiler's explain lands).
pub fn explain(
    _state: &ClusterState,
    _from: &str,
    _to: &str,
    _port: &str,
) -> crate::error::Result<String> {
    Err(crate::error::Error::Compile(
        "explain is not available yet".into(),
    ))
}
