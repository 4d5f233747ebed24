//! The flow log: which connections the policies dropped (and, when asked, admitted), one JSON line
//! each, with the pods' names and the policies that decided.
//!
//! The kernel does the counting and the rate limit: every policy drop goes through one `limit` +
//! `log group` rule (`flow_drop`), and with `allowed` a base chain after ours logs the first packet
//! of each connection we let through (see ARCHITECTURE.md "The ruleset"). [`nflog`] reads the group
//! on a thread of its own and sends what it read to the engine, which owns the model: [`FlowLog`]
//! attributes each packet there ([`record`], the same `Admitter` the conntrack sweep uses, no
//! per-packet rule walk of the ruleset), keeps one line per flow ([`dedup`]) and hands the lines to
//! the writer task ([`writer`]): stdout or a file, and a unix socket that `palisade-agent flows`
//! reads (recent lines, or `--follow`). Nothing here blocks the engine: a full writer queue drops
//! the line and counts it.

pub mod dedup;
pub mod nflog;
pub mod packet;
pub mod record;
pub mod writer;

use crate::metrics::Metrics;
use dedup::Dedup;
use palisade_policy::compile::admit::Admitter;
use palisade_policy::model::ClusterState;
use palisade_policy::Compiled;
use record::Names;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Default NFLOG group (`--flow-log-group`).
pub const DEFAULT_GROUP: u16 = 2411;
/// Lines waiting for the writer; beyond, new lines are dropped and counted.
pub const QUEUE: usize = 4096;

/// The engine's half of the flow log.
pub struct FlowLog {
    node: String,
    dedup: Dedup,
    /// Names of addresses, built from the state on first use after it changed.
    names: Option<Names>,
    out: mpsc::Sender<Arc<str>>,
    metrics: Arc<Metrics>,
}

impl FlowLog {
    pub fn new(node: &str, out: mpsc::Sender<Arc<str>>, metrics: Arc<Metrics>) -> Self {
        FlowLog {
            node: node.to_string(),
            dedup: Dedup::default(),
            names: None,
            out,
            metrics,
        }
    }

    /// The model changed: names are looked up afresh at the next record.
    pub fn state_changed(&mut self) {
        self.names = None;
    }

    /// Attributes what NFLOG gave with the current model and queues the lines.
    pub fn record(&mut self, read: nflog::Read, state: &ClusterState, model: &Compiled) {
        let m = &self.metrics;
        m.flow_log("unreadable", read.unreadable);
        if read.overflowed {
            m.flow_log("kernel_overflow", 1);
        }
        if read.packets.is_empty() {
            return;
        }
        let now = Instant::now();
        let names = self.names.get_or_insert_with(|| Names::of(state));
        let adm = Admitter::new(model);
        let time = jiff::Timestamp::now().to_string();
        for l in read.packets {
            if !self.dedup.first(l.kind, l.facts, now) {
                m.flow_log("repeat", 1);
                continue;
            }
            let Some(r) = record::attribute(&l, &adm, names, &self.node, time.clone()) else {
                m.flow_log("default_allowed", 1);
                continue;
            };
            let line = match serde_json::to_string(&r) {
                Ok(s) => s,
                Err(_) => continue, // unreachable: a record always serializes
            };
            match self.out.try_send(line.into()) {
                Ok(()) => m.flow_log(r.verdict, 1),
                Err(_) => m.flow_log("lost", 1),
            }
        }
    }
}
