//! The measured changes (policy create/delete, label change, pod create/delete) and what each trial
//! records.

use super::*;

/// The changes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scenario {
    /// grant: create a policy admitting the client; revoke: delete it.
    Policy,
    /// grant: the client pod gains the label the policy selects; revoke: loses it.
    Label,
    /// grant: a new (remote) pod matching the policy's peers appears; revoke: it is deleted.
    Pod,
    /// grant: create an Admin-tier ClusterNetworkPolicy accepting the client (over the server's
    /// NetworkPolicy deny); revoke: delete it.
    ClusterPolicy,
    /// An Admin-tier Deny of the client at priority 50 and an Accept at 60. grant: the Accept's
    /// priority becomes 40 (before the Deny); revoke: back to 60.
    ClusterPriority,
}

impl Scenario {
    /// The NetworkPolicy scenarios (the default of a run).
    pub const ALL: [Scenario; 3] = [Scenario::Policy, Scenario::Label, Scenario::Pod];
    /// Every scenario (`--scenarios all`).
    pub const EVERY: [Scenario; 5] = [
        Scenario::Policy,
        Scenario::Label,
        Scenario::Pod,
        Scenario::ClusterPolicy,
        Scenario::ClusterPriority,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Policy => "policy create/delete",
            Scenario::Label => "label change",
            Scenario::Pod => "new/deleted pod",
            Scenario::ClusterPolicy => "cnp create/delete",
            Scenario::ClusterPriority => "cnp priority change",
        }
    }

    /// The `--scenarios` spelling.
    pub fn arg(self) -> &'static str {
        match self {
            Scenario::Policy => "policy",
            Scenario::Label => "label",
            Scenario::Pod => "pod",
            Scenario::ClusterPolicy => "cnp",
            Scenario::ClusterPriority => "cnp-priority",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::EVERY.into_iter().find(|sc| sc.arg() == s)
    }

    /// Puts the directory in this scenario's starting (blocked) state.
    pub(super) fn setup(self, store: &Store) -> Result<()> {
        store.clear(F_ALLOW);
        store.clear(F_ALLOW_LABEL);
        store.clear(F_CNP_ACCEPT);
        store.clear(F_CNP_DENY);
        match self {
            Scenario::ClusterPolicy => {
                store.put(F_CLIENT, &client_pod(false))?;
            }
            Scenario::ClusterPriority => {
                store.put(F_CLIENT, &client_pod(false))?;
                store.put(F_CNP_DENY, &admin_client_policy("deny-client", "Deny", 50))?;
                store.put(
                    F_CNP_ACCEPT,
                    &admin_client_policy("accept-client", "Accept", 60),
                )?;
            }
            Scenario::Policy => {
                store.put(F_CLIENT, &client_pod(false))?;
            }
            Scenario::Label => {
                store.put(F_CLIENT, &client_pod(false))?;
                store.put(
                    F_ALLOW_LABEL,
                    &allow_policy("allow-access", json!({"access": "yes"})),
                )?;
            }
            Scenario::Pod => {
                store.clear(F_CLIENT);
                store.put(
                    F_ALLOW,
                    &allow_policy("allow-client", json!({"app": "client"})),
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn grant(self, store: &Store) -> Result<u64> {
        match self {
            Scenario::Policy => store.put(
                F_ALLOW,
                &allow_policy("allow-client", json!({"app": "client"})),
            ),
            Scenario::Label => store.put(F_CLIENT, &client_pod(true)),
            Scenario::Pod => store.put(F_CLIENT, &client_pod(false)),
            Scenario::ClusterPolicy => store.put(
                F_CNP_ACCEPT,
                &admin_client_policy("accept-client", "Accept", 10),
            ),
            Scenario::ClusterPriority => store.put(
                F_CNP_ACCEPT,
                &admin_client_policy("accept-client", "Accept", 40),
            ),
        }
    }

    pub(super) fn revoke(self, store: &Store) -> Result<u64> {
        match self {
            Scenario::Policy => store.remove(F_ALLOW),
            Scenario::Label => store.put(F_CLIENT, &client_pod(false)),
            Scenario::Pod => store.remove(F_CLIENT),
            Scenario::ClusterPolicy => store.remove(F_CNP_ACCEPT),
            Scenario::ClusterPriority => store.put(
                F_CNP_ACCEPT,
                &admin_client_policy("accept-client", "Accept", 60),
            ),
        }
    }
}

/// Latencies of one scenario at one size, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub pods: usize,
    pub policies: usize,
    pub churn_per_second: u32,
    pub scenario: Scenario,
    pub grant_ms: Vec<f64>,
    pub revoke_ms: Vec<f64>,
    pub failures: usize,
    pub agent_before: ProcStats,
    pub agent_after: ProcStats,
    pub wall_seconds: f64,
    pub churn_writes: u64,
    /// Measured while the client flooded the server with denied SYNs.
    #[serde(default)]
    pub flood: bool,
    /// Packets the kernel handed to the agent's flow log meanwhile (`--flood` runs).
    #[serde(default)]
    pub flow_log_packets: f64,
    /// Packets the policies dropped meanwhile (the agent's per-policy counters; the probe's own
    /// SYNs while blocked are among them).
    #[serde(default)]
    pub dropped_packets: f64,
}

impl ScenarioResult {
    pub fn summary(v: &[f64]) -> (f64, f64, f64) {
        (
            median(v).unwrap_or(f64::NAN),
            quantile(v, 0.99).unwrap_or(f64::NAN),
            max(v).unwrap_or(f64::NAN),
        )
    }
}
