//! The datapath benchmark: lab topology, synthetic workload, rulesets of every compared system,
//! traffic generators and the report.

pub mod cmd;
pub mod enforce;
pub mod k8s;
pub mod report;
pub mod rng;
pub mod rulesets;
pub mod run;
pub mod stats;
pub mod store;
pub mod topo;
pub mod traffic;
pub mod workload;
