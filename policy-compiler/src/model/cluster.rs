//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2), trimmed: the cluster administrator's
//! tiers around NetworkPolicy (docs/cluster-network-policy.md has the evaluation order).
//!
//! A rule's peers and ports are the same [`Rule`] a NetworkPolicy rule is, so they resolve through
//! the one resolution path: `namespaces` is a pod peer with a namespace selector and no pod
//! selector, `pods` one with both, `networks` ipBlocks without excepts, `nodes` the one peer kind
//! only a ClusterNetworkPolicy has ([`Peer::Nodes`]).

use super::{LabelSelector, Rule};
use std::fmt;

/// Key prefix of a ClusterNetworkPolicy among the compiler's policy keys: a NetworkPolicy's key is
/// `namespace/name` (one `/`), a ClusterNetworkPolicy's `cnp:name` (no `/`), so they never collide.
pub const CLUSTER_KEY_PREFIX: &str = "cnp:";

/// The tier a ClusterNetworkPolicy lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Before NetworkPolicies: namespace owners cannot override it.
    Admin,
    /// After NetworkPolicies, only for pods no NetworkPolicy selects in that direction.
    Baseline,
}

impl Tier {
    pub const BOTH: [Tier; 2] = [Tier::Admin, Tier::Baseline];
    /// The API spelling.
    pub fn as_api(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
    /// Short tag used in derived names.
    pub fn tag(self) -> &'static str {
        match self {
            Tier::Admin => "adm",
            Tier::Baseline => "bl",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api())
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Final for this direction (egress still meets the destination's ingress evaluation).
    Accept,
    /// Dropped; final.
    Deny,
    /// The rest of this tier is skipped; evaluation goes on in the next tier.
    Pass,
}

impl Action {
    pub fn as_api(self) -> &'static str {
        match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api())
    }
}

/// The pods a ClusterNetworkPolicy applies to (never hostNetwork pods).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClusterSubject {
    /// Every pod of the namespaces whose labels match.
    Namespaces(LabelSelector),
    /// Pods matching `pod_selector` in namespaces matching `namespace_selector`.
    Pods {
        namespace_selector: LabelSelector,
        pod_selector: LabelSelector,
    },
}

/// One ingress or egress rule of a ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRule {
    /// `name` (optional, for observability).
    pub name: Option<String>,
    pub action: Action,
    /// Peers and ports. Peers are never empty for a rule that matches anything: a rule whose peers
    /// all had no known field is either [`ClusterRule::inert`] (Accept) or was turned into a deny of
    /// everything (Deny, Pass), as the API asks ("fail closed"); then `peers` and `ports` are empty,
    /// which means any peer and any port.
    pub rule: Rule,
    /// Matches nothing: an Accept rule whose every peer had no known field.
    pub inert: bool,
}

impl ClusterRule {
    /// `name`, or `#<index>` when it has none.
    pub fn label(&self, index: usize) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("#{index}"),
        }
    }
}

/// A validated ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0..=1000; lower first.
    pub priority: u32,
    pub subject: ClusterSubject,
    /// Empty: the policy does not affect ingress (no implicit isolation).
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// The compiler's key: [`CLUSTER_KEY_PREFIX`] and the name.
    pub fn key(&self) -> String {
        cluster_key(&self.name)
    }
    pub fn rules(&self, dir: super::Direction) -> &[ClusterRule] {
        match dir {
            super::Direction::Ingress => &self.ingress,
            super::Direction::Egress => &self.egress,
        }
    }
    /// The evaluation order inside a tier: priority, then name (the API leaves ties to the
    /// implementation; by name on every node).
    pub fn order(&self) -> (u32, &str) {
        (self.priority, &self.name)
    }
}

/// The compiler's key of the ClusterNetworkPolicy `name`.
pub fn cluster_key(name: &str) -> String {
    format!("{CLUSTER_KEY_PREFIX}{name}")
}
