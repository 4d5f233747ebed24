//! Shared test code: a bounded event reader for sources and object builders.

#![allow(dead_code)]

use std::time::Duration;

use palisade_agent::source::{Kind, ObjectRef, SourceEvent};
use tokio::sync::mpsc;

/// Upper bound of every wait for an expected event.
pub const WAIT: Duration = Duration::from_secs(5);

/// Logs of the code under test go to the test's output (shown on failure). `RUST_LOG` overrides.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("palisade_agent=debug,kube_runtime=debug")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// One line per event, for assertions and failure messages.
pub fn describe(event: &SourceEvent) -> String {
    match event {
        SourceEvent::Changed { object, change } => {
            if *change == object.delete_change() {
                format!("Deleted {object}")
            } else {
                format!("Applied {object}")
            }
        }
        SourceEvent::Rejected { object, .. } => format!("Rejected {object}"),
        SourceEvent::Synced => "Synced".to_owned(),
    }
}

/// The model pod of the last upsert of pod `name` among `events`.
pub fn applied_pod<'a>(
    events: &'a [SourceEvent],
    name: &str,
) -> Option<&'a palisade_policy::model::Pod> {
    events.iter().rev().find_map(|e| match e {
        SourceEvent::Changed {
            change: palisade_policy::model::Change::UpsertPod(p),
            ..
        } if &*p.name == name => Some(&**p),
        _ => None,
    })
}

/// The `app` label of that pod.
pub fn pod_label(pod: &palisade_policy::model::Pod) -> Option<String> {
    pod.labels.get("app").map(str::to_string)
}

pub fn describe_all(events: &[SourceEvent]) -> Vec<String> {
    events.iter().map(describe).collect()
}

/// The receiving end of a source, read with bounded waits only.
pub struct Events {
    rx: mpsc::Receiver<SourceEvent>,
}

impl Events {
    pub fn new(rx: mpsc::Receiver<SourceEvent>) -> Self {
        Events { rx }
    }

    /// Receives events until one satisfies `pred`; returns all received, the match last. Panics after
    /// `timeout` naming what was awaited and what came instead.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&SourceEvent) -> bool,
    ) -> Vec<SourceEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => {
                    let done = pred(&event);
                    seen.push(event);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => panic!(
                    "source ended while waiting for {what}; got {:?}",
                    describe_all(&seen)
                ),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; got {:?}",
                    describe_all(&seen)
                ),
            }
        }
    }

    /// Receives until every description in `wanted` was seen (any order, others allowed); returns all.
    pub async fn until_all(&mut self, timeout: Duration, wanted: &[&str]) -> Vec<SourceEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen: Vec<SourceEvent> = Vec::new();
        loop {
            let lines = describe_all(&seen);
            if wanted.iter().all(|w| lines.iter().any(|l| l == w)) {
                return seen;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => seen.push(event),
                Ok(None) => panic!("source ended while waiting for {wanted:?}; got {lines:?}"),
                Err(_) => {
                    panic!("timed out after {timeout:?} waiting for {wanted:?}; got {lines:?}")
                }
            }
        }
    }

    /// Events already queued, without waiting.
    pub fn ready(&mut self) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            out.push(event);
        }
        out
    }

    /// Gives the receiver up (the source should then stop).
    pub fn close(self) {}
}

pub fn is(event: &SourceEvent, description: &str) -> bool {
    describe(event) == description
}

pub fn pod_ref(namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Pod,
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// `palisade-agent explain --manifests DIR ARGS...` without a kubeconfig: its stdout. The test fails
/// when explain does.
pub fn explain_manifests(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["explain", "--manifests", dir.to_str().expect("utf-8 path")])
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run palisade-agent explain");
    assert!(
        out.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
