//! `explain`: why traffic between two endpoints is allowed or denied, read from the same
//! compiled model the ruleset is built from (never separate logic).

use crate::compile::admit::{self, AllowedBy, ClusterMatch, Exemption, RuleVerdict, TierVerdict};
use crate::compile::{compile, Compiled, PeerMatch};
use crate::error::PolicyError;
use crate::model::{pod_key, ClusterState, Direction, Protocol};
use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Ip(IpAddr),
}

impl FromStr for Endpoint {
    type Err = String;
    /// `namespace/name` or an IP address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is neither an IP address nor namespace/name")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// What decided one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint is not a pod NetworkPolicy applies to (external, node, hostNetwork, ...).
    NotApplicable(String),
    /// Always allowed, whatever the policies say (semantics 38, 39).
    AlwaysAllowed(String),
    /// No policy of any tier selects the pod for this direction (semantics 1).
    NotIsolated,
    /// A ClusterNetworkPolicy rule decided (Accept or Deny).
    Cluster(ClusterMatch),
    /// ClusterNetworkPolicies select the pod, but no tier decided: allowed (the Kubernetes
    /// default); `passed`: the Admin-tier Pass rule that handed it on, if one did.
    Default { passed: Option<ClusterMatch> },
    /// Allowed by these (policy, rule index, how the peer matched).
    Allowed(Vec<AllowedBy>),
    /// Isolated by these policies and no rule of theirs matched.
    Denied(Vec<String>),
    /// The address is still pending (wired, policy not compiled yet): all traffic dropped.
    Pending,
}

impl Outcome {
    pub fn allows(&self) -> bool {
        match self {
            Self::Denied(_) | Self::Pending => false,
            Self::Cluster(m) => m.action == crate::model::Action::Accept,
            _ => true,
        }
    }

    /// The policies that decided, each once: `namespace/name` of NetworkPolicies,
    /// `clusternetworkpolicy <name>` of a ClusterNetworkPolicy (the one that passed it on, too).
    pub fn policies(&self) -> Vec<String> {
        let cnp = |m: &ClusterMatch| format!("clusternetworkpolicy {}", m.policy);
        let mut out: Vec<String> = match self {
            Self::Denied(pols) => pols.clone(),
            Self::Allowed(by) => by.iter().map(|b| b.policy.clone()).collect(),
            Self::Cluster(m) => vec![cnp(m)],
            Self::Default { passed } => passed.iter().map(cnp).collect(),
            Self::NotApplicable(_) | Self::AlwaysAllowed(_) | Self::NotIsolated | Self::Pending => {
                Vec::new()
            }
        };
        out.dedup();
        out
    }
}

impl From<TierVerdict> for Outcome {
    fn from(v: TierVerdict) -> Self {
        match v {
            TierVerdict::Cluster(m) => Outcome::Cluster(m),
            TierVerdict::NetworkPolicy(RuleVerdict::NotIsolated) => Outcome::NotIsolated,
            TierVerdict::NetworkPolicy(RuleVerdict::Allowed(by)) => Outcome::Allowed(by),
            TierVerdict::NetworkPolicy(RuleVerdict::Denied(policies)) => Outcome::Denied(policies),
            TierVerdict::Default { passed } => Outcome::Default { passed },
        }
    }
}

/// The verdict of one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub direction: Direction,
    /// The pod whose policies apply (source for egress, destination for ingress).
    pub pod: Option<String>,
    /// The node enforcing it.
    pub node: Option<String>,
    pub outcome: Outcome,
    /// What the NetworkPolicies in audit mode selecting the pod would say, were they enforced
    /// (`Denied` or `Allowed`); `None` when none would have a say.
    pub audit: Option<Outcome>,
    /// The NetworkPolicies selecting the pod in this direction that the node refused for their
    /// size (they isolate it and allow nothing), each with why.
    pub refused: Vec<String>,
}

/// The answer of [`explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub from: Endpoint,
    pub to: Endpoint,
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
    /// Both directions allow (semantics 7).
    pub allowed: bool,
}

struct Resolved {
    /// Policy-subject pod key, if the endpoint is one.
    pod: Option<String>,
    node: Option<String>,
    ips: Vec<IpAddr>,
    host_network: bool,
}

fn resolve(
    state: &ClusterState,
    compiled: &Compiled,
    e: &Endpoint,
) -> Result<Resolved, PolicyError> {
    match e {
        Endpoint::Pod { namespace, name } => {
            let key = pod_key(namespace, name);
            let pod = state
                .pods
                .get(key.as_str())
                .ok_or_else(|| PolicyError::UnknownPod(key.clone()))?;
            let mut ips: Vec<IpAddr> = match compiled.pods.get(&key) {
                Some(lp) => lp.ips.iter().copied().collect(),
                None => pod.ips.to_vec(),
            };
            ips.sort();
            ips.dedup();
            Ok(Resolved {
                pod: pod.is_policy_subject().then_some(key),
                node: pod.node_name.as_deref().map(str::to_string),
                ips,
                host_network: pod.host_network,
            })
        }
        Endpoint::Ip(ip) => {
            if let Some(lp) = compiled.local_pod_by_ip(*ip) {
                return Ok(Resolved {
                    pod: Some(lp.key.clone()),
                    node: Some(compiled.node.clone()),
                    ips: vec![*ip],
                    host_network: false,
                });
            }
            let found = state
                .pods
                .values()
                .find(|p| p.is_policy_subject() && p.ips.contains(ip));
            Ok(match found {
                Some(p) => Resolved {
                    pod: Some(p.key()),
                    node: p.node_name.as_deref().map(str::to_string),
                    ips: vec![*ip],
                    host_network: false,
                },
                None => Resolved {
                    pod: None,
                    node: None,
                    ips: vec![*ip],
                    host_network: false,
                },
            })
        }
    }
}

/// Explains whether `from` may open a connection to `to` on `proto`/`port`.
///
/// Each direction is judged by the compiled model of the node hosting the pod it concerns: the
/// given `compiled` when that is its node, otherwise the state is compiled for that node with the
/// same [`compile`] function.
pub fn explain(
    state: &ClusterState,
    compiled: &Compiled,
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    proto: Protocol,
) -> Result<Explanation, PolicyError> {
    let f = resolve(state, compiled, from)?;
    let t = resolve(state, compiled, to)?;
    let pair = f
        .ips
        .iter()
        .flat_map(|a| t.ips.iter().map(move |b| (*a, *b)))
        .find(|(a, b)| a.is_ipv4() == b.is_ipv4())
        .ok_or_else(|| PolicyError::NoCommonFamily(format!("{from} and {to}")))?;
    let (from_ip, to_ip) = pair;

    let same_pod = f.pod.is_some() && f.pod == t.pod;
    // Whether the source is an address of `node` (`fib saddr type local` there).
    let from_node = |node: &str| {
        state
            .nodes
            .get(node)
            .is_some_and(|n| n.internal_ips.contains(&from_ip))
    };
    // `own` is the address of the endpoint this direction is about (source for egress).
    let verdict = |dir: Direction, r: &Resolved, own: IpAddr, peer: IpAddr| -> DirectionVerdict {
        let mut v = DirectionVerdict {
            direction: dir,
            pod: r.pod.clone(),
            node: r.node.clone(),
            outcome: Outcome::NotIsolated,
            audit: None,
            refused: Vec::new(),
        };
        if same_pod {
            v.outcome = Outcome::AlwaysAllowed(Exemption::SelfTraffic.why().into());
            return v;
        }
        // A pending address of this node (wired, pod not known yet): dropped, unless this node
        // reaches it.
        if compiled.pending.contains(&own) {
            v.node = Some(compiled.node.clone());
            v.outcome = match admit::pending_drop(
                &compiled.pending,
                from_ip,
                to_ip,
                from_node(&compiled.node),
            ) {
                Some(_) => Outcome::Pending,
                None => Outcome::AlwaysAllowed(Exemption::FromThisNode.why().into()),
            };
            return v;
        }
        let Some(key) = &r.pod else {
            v.outcome = Outcome::NotApplicable(if r.host_network {
                "hostNetwork pod: outside NetworkPolicy".into()
            } else {
                "not a pod address: no policy applies on this side".into()
            });
            return v;
        };
        let Some(node) = &r.node else {
            v.outcome = Outcome::NotApplicable("pod is not scheduled to a node".into());
            return v;
        };
        let model: Cow<'_, Compiled> = if &compiled.node == node {
            Cow::Borrowed(compiled)
        } else {
            // The attachment records in the state are this node's: another node has none here.
            Cow::Owned(compile(&foreign_state(state), node))
        };
        let from_this_node = from_node(node);
        if admit::pending_drop(&model.pending, from_ip, to_ip, from_this_node).is_some() {
            v.outcome = Outcome::Pending;
            return v;
        }
        // `same_pod` was answered above: only the node exemption is left.
        if let Some(e) = admit::exemption(dir, false, from_this_node) {
            v.outcome = Outcome::AlwaysAllowed(e.why().into());
            return v;
        }
        let Some(lp) = model.pods.get(key) else {
            v.outcome = Outcome::NotIsolated;
            return v;
        };
        if !lp.governed(dir) {
            v.outcome = Outcome::NotIsolated;
            return v;
        }
        v.outcome = admit::decide(&model, lp, dir, peer, to_ip, Some(proto), port).into();
        v.refused = model.refusals(key, dir);
        // Policies in audit mode are judged where NetworkPolicies would be: after the Admin tier.
        let admin_decided =
            matches!(&v.outcome, Outcome::Cluster(m) if m.tier == crate::model::Tier::Admin);
        if !lp.audited(dir).is_empty() && !admin_decided {
            let keys = lp.audited(dir);
            v.audit = Some(
                match admit::judge_keys(&model, keys, dir, peer, to_ip, Some(proto), port) {
                    RuleVerdict::Allowed(by) => Outcome::Allowed(by),
                    _ => Outcome::Denied(keys.to_vec()),
                },
            );
        }
        v
    };
    let egress = verdict(Direction::Egress, &f, from_ip, to_ip);
    let ingress = verdict(Direction::Ingress, &t, to_ip, from_ip);
    let allowed = egress.outcome.allows() && ingress.outcome.allows();
    Ok(Explanation {
        from: from.clone(),
        to: to.clone(),
        from_ip,
        to_ip,
        protocol: proto,
        port,
        egress,
        ingress,
        allowed,
    })
}

/// Node name given to pods without one in [`with_placeholders`].
pub const PLACEHOLDER_NODE: &str = "(unscheduled)";

/// What [`with_placeholders`] gave a pod that had no address (or no node) yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// `namespace/name`
    pub pod: String,
    /// The addresses it was given (none when it had its own).
    pub ips: Vec<IpAddr>,
    /// Whether it was given [`PLACEHOLDER_NODE`].
    pub unscheduled: bool,
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut what = Vec::new();
        if !self.ips.is_empty() {
            let ips: Vec<String> = self.ips.iter().map(IpAddr::to_string).collect();
            what.push(format!(
                "has no address yet: placeholder {} used",
                ips.join(", ")
            ));
        }
        if self.unscheduled {
            what.push(format!(
                "is not scheduled: judged as if on node {PLACEHOLDER_NODE}"
            ));
        }
        write!(f, "{} {}", self.pod, what.join("; "))
    }
}

/// The state with every pod NetworkPolicy applies to that has no address yet given one of each
/// family, from ranges no cluster hands out to pods (198.18.0.0/15, RFC 2544; 2001:db8::/32, RFC
/// 3849) and not held by any pod or node, and every pod without a node given
/// [`PLACEHOLDER_NODE`]: so explain answers for manifests not applied yet ("explain before you
/// apply") by labels, namespaces and ports through the same compile. Rules that match addresses
/// (ipBlocks, networks) may answer otherwise once the pod has its real address.
pub fn with_placeholders(state: &ClusterState) -> (ClusterState, Vec<Placeholder>) {
    let mut taken: std::collections::BTreeSet<IpAddr> = state
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .chain(
            state
                .nodes
                .values()
                .flat_map(|n| n.addresses.iter().copied()),
        )
        .collect();
    let mut next = 0u32;
    let mut fresh = |v6: bool| -> IpAddr {
        loop {
            next += 1;
            let ip = if v6 {
                IpAddr::V6(std::net::Ipv6Addr::from(
                    0x2001_0db8_u128 << 96 | u128::from(next),
                ))
            } else {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    0xc612_0000_u32 | (next & 0x1_ffff),
                ))
            };
            if taken.insert(ip) {
                return ip;
            }
        }
    };
    let mut out = state.clone();
    let mut given = Vec::new();
    for (key, pod) in out.pods.iter_mut() {
        if !pod.is_policy_subject() || (!pod.ips.is_empty() && pod.node_name.is_some()) {
            continue;
        }
        let p = std::sync::Arc::make_mut(pod);
        let mut note = Placeholder {
            pod: key.to_string(),
            ips: Vec::new(),
            unscheduled: false,
        };
        if p.ips.is_empty() {
            note.ips = vec![fresh(false), fresh(true)];
            p.ips = note.ips.clone().into();
        }
        if p.node_name.is_none() {
            p.node_name = Some(PLACEHOLDER_NODE.into());
            note.unscheduled = true;
        }
        given.push(note);
    }
    (out, given)
}

fn foreign_state(state: &ClusterState) -> Cow<'_, ClusterState> {
    if state.attachments.is_empty() {
        Cow::Borrowed(state)
    } else {
        let mut s = state.clone();
        s.attachments.clear();
        Cow::Owned(s)
    }
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerMatch::Any => "any peer",
            PeerMatch::Pod => "peer pod selected",
            PeerMatch::IpBlock => "peer address in ipBlock",
            PeerMatch::Node => "peer is a selected node's address",
        })
    }
}

impl fmt::Display for ClusterMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tier clusternetworkpolicy {} (priority {}) rule {}: {} ({})",
            self.tier, self.policy, self.priority, self.rule, self.action, self.peer
        )
    }
}

impl fmt::Display for DirectionVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match (&self.pod, &self.node) {
            (Some(p), Some(n)) => format!("{} of {p} (node {n})", self.direction),
            (Some(p), None) => format!("{} of {p}", self.direction),
            _ => format!("{}", self.direction),
        };
        (match &self.outcome {
            Outcome::NotApplicable(why) => write!(f, "{who}: allowed, {why}"),
            Outcome::AlwaysAllowed(why) => write!(f, "{who}: allowed, {why}"),
            Outcome::NotIsolated => write!(
                f,
                "{who}: allowed, no policy selects the pod for {}",
                self.direction
            ),
            Outcome::Cluster(m) if m.action == crate::model::Action::Accept => {
                write!(f, "{who}: allowed by {m}")
            }
            Outcome::Cluster(m) => write!(f, "{who}: DENIED by {m}"),
            Outcome::Default { passed: Some(m) } => write!(
                f,
                "{who}: allowed, passed on by {m}; no later tier decided (the Kubernetes default)"
            ),
            Outcome::Default { passed: None } => write!(
                f,
                "{who}: allowed, no rule of the ClusterNetworkPolicies selecting the pod matched and no NetworkPolicy selects it (the Kubernetes default)"
            ),
            Outcome::Pending => write!(
                f,
                "{who}: DENIED, address still pending (pod not known to the agent yet)"
            ),
            Outcome::Allowed(by) => {
                let list: Vec<String> = by
                    .iter()
                    .map(|b| format!("policy {} rule {} ({})", b.policy, b.rule, b.peer))
                    .collect();
                write!(f, "{who}: allowed by {}", list.join("; "))
            }
            Outcome::Denied(pols) => write!(
                f,
                "{who}: DENIED, isolated by {} and none of their rules matches",
                pols.join(", ")
            ),
        })?;
        if !self.refused.is_empty() {
            write!(
                f,
                "; refused on this node, allowing nothing: {}",
                self.refused.join("; ")
            )?;
        }
        match &self.audit {
            Some(Outcome::Denied(pols)) => write!(
                f,
                "; in audit mode {} would DENY it (not enforced)",
                pols.join(", ")
            ),
            Some(Outcome::Allowed(by)) => {
                let list: Vec<String> = by
                    .iter()
                    .map(|b| format!("{} rule {}", b.policy, b.rule))
                    .collect();
                write!(f, "; in audit mode allowed by {}", list.join("; "))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}) -> {} ({}) {}/{}: {}",
            self.from,
            self.from_ip,
            self.to,
            self.to_ip,
            self.protocol,
            self.port,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )?;
        writeln!(f, "  {}", self.egress)?;
        write!(f, "  {}", self.ingress)
    }
}
