//! palisade-lab: a multi-node Kubernetes-like lab in network namespaces that drives the real
//! `palisade` CNI plugin and `palisade-agent`, plus the probe protocol and the conformance cases.
//!
//! Modules: `lab` (nodes, underlay, pods, run directory, teardown), `k8s` (plain YAML objects and
//! the shared manifest directory), `cni` (exec'ing the plugin as a runtime does), `probe` (servers
//! and batch probes run inside pods), `matrix` (truth tables), `model` (the pod populations a lab holds), `cases` (the upstream conformance
//! cases as data), `netns`/`process`/`cmd` (the edges), `signals` (teardown on signals).

pub mod cases;
pub mod cmd;
pub mod cni;
pub mod demo;
pub mod error;
pub mod forge;
pub mod k8s;
pub mod lab;
pub mod matrix;
pub mod model;
pub mod netns;
pub mod probe;
pub mod process;
pub mod signals;
pub mod suite;
pub mod yaml;

pub use error::{LabError, Result};
