//! The agent's one door into the pure compiler (`palisade-policy`): compile, full replace, diff,
//! the incremental compiler, explain. Nothing else in the agent calls the compiler.

use crate::error::{Error, Result};
use palisade_policy::model::{pod_key, Change, ClusterState, Protocol};
use palisade_policy::Endpoint;
use palisade_policy::{Compiled, IncrementalCompiler, Ruleset};

/// A compiled ruleset for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub compiled: Compiled,
}

impl Desired {
    /// The ruleset to enforce.
    pub fn ruleset(&self) -> &Ruleset {
        &self.compiled.ruleset
    }

    /// Objects the compiler skipped, each naming the object.
    pub fn warnings(&self) -> &[String] {
        &self.compiled.warnings
    }
}

/// One transaction, ready for the kernel.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The compiler's batch (its netlink messages moved to `netlink`): its nft JSON is rendered
    /// only when nft must run it ([`Batch::json_text`]).
    pub compiled: palisade_policy::Batch,
    /// The same batch as address element changes, when that is all it is (see
    /// `palisade_policy::Batch::address_element_changes`): committed without nft.
    pub elements: Option<Vec<palisade_policy::ruleset::ElementChange>>,
    /// The same batch as nfnetlink messages (`palisade_policy::Batch::netlink`), when the compiler
    /// could encode each of its steps: committed without nft and without its cache of our table.
    pub netlink: Option<palisade_policy::ruleset::NetlinkBatch>,
    /// What the batch touches, for logs.
    pub stats: String,
}

/// The warnings of `now` not in `seen` (to log), remembering `now` as seen: a warning is logged
/// once while it holds, and again should it come back after it went away.
pub fn new_warnings(seen: &mut std::collections::BTreeSet<String>, now: &[String]) -> Vec<String> {
    let now: std::collections::BTreeSet<String> = now.iter().cloned().collect();
    let fresh = now.difference(seen).cloned().collect();
    *seen = now;
    fresh
}

/// Compiles the state for `node`. The compiler is pure and must not panic; should it anyway, the
/// panic is caught and returned as an error so the last committed rules stay enforced.
pub fn compile(state: &ClusterState, node: &str) -> Result<Desired> {
    guarded(|| palisade_policy::compile(state, node)).map(|compiled| Desired { compiled })
}

/// Applies changes to the incremental compiler (to its state only while it is stale); true when
/// any of them changed the state. After an error (a compiler panic) the compiler may be
/// inconsistent: invalidate it, and the next [`recompile`] starts again from its state.
pub fn stage(
    inc: &mut IncrementalCompiler,
    changes: impl IntoIterator<Item = Change>,
) -> Result<bool> {
    guarded(|| changes.into_iter().fold(false, |any, c| inc.stage(c) | any))
}

/// Compiles the compiler's state in full when it is stale.
pub fn recompile(inc: &mut IncrementalCompiler) -> Result<()> {
    guarded(|| inc.recompile())
}

/// The transaction from the last taken batch to the compiler's current ruleset, with the
/// plugin's pending marks (from the attachment records read under the node lock) taken as
/// committed, so it removes those whose pod is known now; `None` when nothing changes.
pub fn take_batch(
    inc: &mut IncrementalCompiler,
    attachments: &[palisade_contract::Attachment],
) -> Result<Option<Batch>> {
    let b = guarded(|| {
        inc.note_plugin_pending(attachments);
        inc.take_batch()
    })?;
    Ok(batch(b, inc.ruleset()))
}

/// Runs the compiler, turning a panic into an error.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Error::CompilerPanic(msg)
    })
}

/// One transaction that replaces our whole table with `d`.
pub fn full_replace(d: &Desired) -> String {
    d.ruleset().full_replace_text()
}

fn batch(mut b: palisade_policy::Batch, next: &Ruleset) -> Option<Batch> {
    if b.is_empty() {
        return None;
    }
    let s = next.stats();
    let size = b
        .netlink
        .as_ref()
        .map_or_else(String::new, |n| format!(", {} bytes of netlink", n.len()));
    Some(Batch {
        elements: b.address_element_changes(next),
        netlink: b.netlink.take(),
        stats: format!(
            "{} commands{size}; target {} chains, {} rules, {} sets, {} elements",
            b.commands(),
            s.chains,
            s.rules,
            s.sets,
            s.elements
        ),
        compiled: b,
    })
}

impl Batch {
    /// The batch as nft JSON text, rendered now (nft runs it only when the netlink messages
    /// could not be built or were refused).
    pub fn json_text(&self) -> String {
        self.compiled.to_json_string()
    }
}

/// Parses `80/TCP`, `53/udp` or `443` (TCP) into a port and protocol.
pub fn parse_port(s: &str) -> std::result::Result<(u16, Protocol), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 =
        port.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            format!("port {port:?} is not a number in 1..=65535 (want e.g. 80/TCP)")
        })?;
    let proto = Protocol::from_api(&proto.trim().to_ascii_uppercase())
        .ok_or_else(|| format!("protocol {proto:?} is not TCP, UDP or SCTP"))?;
    Ok((port, proto))
}

/// Explains `from` → `to` on `port`: compiles for the destination's node (else the source's), and
/// the compiler's explain compiles any other node it needs. Pods without an address or a node yet
/// (manifests not applied) get placeholders (`palisade_policy::with_placeholders`), and the answer
/// says so: it is then by labels, namespaces and ports.
pub fn explain(state: &ClusterState, from: &str, to: &str, port: &str) -> Result<String> {
    let (placeheld, given) = palisade_policy::with_placeholders(state);
    let state = &placeheld;
    let from: Endpoint = from
        .parse()
        .map_err(|e| Error::Usage(format!("--from: {e}")))?;
    let to: Endpoint = to.parse().map_err(|e| Error::Usage(format!("--to: {e}")))?;
    let (port, proto) = parse_port(port).map_err(|e| Error::Usage(format!("--port: {e}")))?;
    let node_of = |e: &Endpoint| match e {
        Endpoint::Pod { namespace, name } => state
            .pods
            .get(pod_key(namespace, name).as_str())
            .and_then(|p| p.node_name.as_deref().map(str::to_string)),
        Endpoint::Ip(ip) => state
            .pods
            .values()
            .find(|p| p.ips.contains(ip))
            .and_then(|p| p.node_name.as_deref().map(str::to_string)),
    };
    let node = node_of(&to).or_else(|| node_of(&from)).unwrap_or_default();
    let compiled = compile(state, &node)?.compiled;
    let x = palisade_policy::explain(state, &compiled, &from, &to, port, proto)?;
    let mut text = x.to_string();
    let concerned = |p: &palisade_policy::Placeholder| {
        [&from, &to].iter().any(
            |e| matches!(e, Endpoint::Pod { namespace, name } if pod_key(namespace, name) == p.pod),
        )
    };
    for p in given.iter().filter(|p| concerned(p)) {
        text.push_str(&format!(
            "\n  note: {p}; the answer is by labels, namespaces and ports (rules matching addresses, ipBlocks and networks, may answer otherwise once it has its own)"
        ));
    }
    Ok(text)
}

/// `explain --matrix`: every pod of some namespaces to every other on one port.
#[derive(Debug, Clone)]
pub struct ExplainMatrix {
    pub port: u16,
    pub protocol: Protocol,
    /// `namespace/name`, sorted.
    pub pods: Vec<String>,
    /// (from, to) → the explanation.
    pub cells: std::collections::BTreeMap<(String, String), palisade_policy::Explanation>,
    /// Pods judged with placeholder addresses or node (no status yet).
    pub placeholders: Vec<palisade_policy::Placeholder>,
}

/// Explains every ordered pair of the pods (policy subjects) of `namespaces` on `port`.
pub fn explain_matrix(
    state: &ClusterState,
    namespaces: &[String],
    port: &str,
) -> Result<ExplainMatrix> {
    let (port, proto) = parse_port(port).map_err(|e| Error::Usage(format!("--port: {e}")))?;
    let (state, given) = palisade_policy::with_placeholders(state);
    let pods: Vec<String> = state
        .pods
        .iter()
        .filter(|(_, p)| p.is_policy_subject() && namespaces.iter().any(|n| **n == *p.namespace))
        .map(|(k, _)| k.to_string())
        .collect();
    if pods.is_empty() {
        return Err(Error::Usage(format!(
            "--matrix {}: no pods there",
            namespaces.join(",")
        )));
    }
    // One compile per node, reused for every pair whose destination lives there.
    let mut models: std::collections::BTreeMap<String, Compiled> = Default::default();
    let mut cells = std::collections::BTreeMap::new();
    for to in &pods {
        let node = state.pods[to.as_str()]
            .node_name
            .as_deref()
            .unwrap_or_default()
            .to_string();
        if !models.contains_key(&node) {
            models.insert(node.clone(), compile(&state, &node)?.compiled);
        }
        let model = &models[&node];
        let to_e: Endpoint = to.parse().map_err(Error::Usage)?;
        for from in pods.iter().filter(|f| *f != to) {
            let from_e: Endpoint = from.parse().map_err(Error::Usage)?;
            let x = palisade_policy::explain(&state, model, &from_e, &to_e, port, proto)?;
            cells.insert((from.clone(), to.clone()), x);
        }
    }
    let placeholders = given
        .into_iter()
        .filter(|p| pods.contains(&p.pod))
        .collect();
    Ok(ExplainMatrix {
        port,
        protocol: proto,
        pods,
        cells,
        placeholders,
    })
}

impl ExplainMatrix {
    /// Every cell with its verdict and both directions' reasons.
    pub fn to_json(&self) -> serde_json::Value {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .map(|((from, to), x)| {
                serde_json::json!({
                    "from": from, "to": to, "allowed": x.allowed,
                    "egress": x.egress.to_string(), "ingress": x.ingress.to_string(),
                })
            })
            .collect();
        serde_json::json!({
            "port": self.port,
            "protocol": self.protocol.as_api(),
            "pods": self.pods,
            "cells": cells,
            "placeholders": self.placeholders.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

impl std::fmt::Display for ExplainMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.pods.iter().map(String::len).max().unwrap_or(0).max(4);
        writeln!(
            f,
            "{}/{}   (rows: from, columns: to; . allowed, X denied)",
            self.protocol, self.port
        )?;
        write!(f, "{:width$}", "")?;
        for to in &self.pods {
            write!(f, "  {to:>width$}")?;
        }
        writeln!(f)?;
        for from in &self.pods {
            write!(f, "{from:width$}")?;
            for to in &self.pods {
                let mark = match self.cells.get(&(from.clone(), to.clone())) {
                    None => "-",
                    Some(x) if x.allowed => ".",
                    Some(_) => "X",
                };
                write!(f, "  {mark:>width$}")?;
            }
            writeln!(f)?;
        }
        let denied: Vec<&palisade_policy::Explanation> =
            self.cells.values().filter(|x| !x.allowed).collect();
        if !denied.is_empty() {
            writeln!(f, "\nDenied, and why:")?;
            for x in denied {
                let why = if x.egress.outcome.allows() {
                    &x.ingress
                } else {
                    &x.egress
                };
                writeln!(f, "  {} -> {}: {why}", x.from, x.to)?;
            }
        }
        for p in &self.placeholders {
            writeln!(f, "note: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_a_bad_record() -> ClusterState {
        let mut st = ClusterState::default();
        st.apply(Change::SetAttachments(vec![
            palisade_contract::Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: String::new(),
                host_veth: "not-ours0".into(),
                ips: vec!["10.244.1.9".parse().unwrap()],
                pod_namespace: Some("ns".into()),
                pod_name: Some("p".into()),
                pod_uid: None,
                pending: false,
            },
        ]));
        st
    }

    #[test]
    fn a_compile_carries_the_compilers_warnings_for_the_compile_subcommand_to_print() {
        let d = compile(&state_with_a_bad_record(), "n1").unwrap();
        assert!(
            d.warnings().iter().any(|w| w.contains("not-ours0")),
            "{:?}",
            d.warnings()
        );
    }

    #[test]
    fn each_warning_is_logged_once_while_it_holds_and_again_when_it_returns() {
        let mut seen = std::collections::BTreeSet::new();
        let a = vec!["a".to_string()];
        let ab = vec!["a".to_string(), "b".to_string()];
        assert_eq!(new_warnings(&mut seen, &a), a);
        assert!(
            new_warnings(&mut seen, &a).is_empty(),
            "an incremental commit repeats nothing"
        );
        assert_eq!(new_warnings(&mut seen, &ab), vec!["b".to_string()]);
        assert!(new_warnings(&mut seen, &[]).is_empty());
        assert_eq!(new_warnings(&mut seen, &a), a, "it went away and came back");
    }

    #[test]
    fn ports_parse_with_default_tcp_and_any_case_protocol() {
        assert_eq!(parse_port("80/TCP"), Ok((80, Protocol::Tcp)));
        assert_eq!(parse_port("53/udp"), Ok((53, Protocol::Udp)));
        assert_eq!(parse_port("443"), Ok((443, Protocol::Tcp)));
        assert!(parse_port("0/TCP").is_err());
        assert!(parse_port("80/ICMP").unwrap_err().contains("ICMP"));
        assert!(parse_port("http").is_err());
    }
}
