//! Admission: would this node's ruleset admit one new packet? Decided on the compiled model, by the
//! same rules `build` renders (base chains: pending addresses; group chains: exemptions, then the
//! policies' rules). `explain` uses the parts ([`judge`], [`exemption`], [`pending_drop`]); the agent
//! uses [`Admitter`] to find established flows the current ruleset would no longer admit as new.

use super::{Compiled, LocalPod, PeerMatch};
use crate::model::{Action, Direction, Protocol, Tier};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

/// One packet of a new connection as this node's postrouting hook sees it: after DNAT (a Service
/// VIP is already its backend), before SNAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None`: a protocol without ports (ICMP and others): only rules without `ports` admit it, as
    /// the ruleset's `meta l4proto . th dport` lookups never match it.
    pub proto: Option<Protocol>,
    /// Destination port (ignored when `proto` is `None`).
    pub port: u16,
    /// The source is an address of this node (`fib saddr type local`).
    pub from_this_node: bool,
}

/// What the rules of the policies isolating a pod in one direction say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    /// No policy selects the pod for this direction (semantics 1).
    NotIsolated,
    /// Allowed by these rules.
    Allowed(Vec<AllowedBy>),
    /// Isolated by these policies and none of their rules matches.
    Denied(Vec<String>),
}

/// One rule that admits the traffic: its policy (`namespace/name`), its index among the
/// direction's rules, and how its peer matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedBy {
    pub policy: String,
    pub rule: usize,
    pub peer: PeerMatch,
}

/// Traffic of an isolated pod that is allowed whatever its policies say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exemption {
    /// A pod reaching itself (semantics 38), in both directions.
    SelfTraffic,
    /// From the pod's own node (semantics 39: kubelet probes, hostNetwork pods), ingress only.
    FromThisNode,
}

impl Exemption {
    /// Why, for an operator.
    pub fn why(self) -> &'static str {
        match self {
            Exemption::SelfTraffic => "a pod can always reach itself (semantics 38)",
            Exemption::FromThisNode => "from the pod's own node (semantics 39)",
        }
    }
}

/// The exemption that applies to a packet of an isolated pod in `dir`, if any (the first rules of
/// its group chain).
pub fn exemption(dir: Direction, self_traffic: bool, from_this_node: bool) -> Option<Exemption> {
    if dir == Direction::Ingress && from_this_node {
        Some(Exemption::FromThisNode)
    } else if self_traffic {
        Some(Exemption::SelfTraffic)
    } else {
        None
    }
}

/// The pending address that drops this packet, if any (base chains): a pending source always, a
/// pending destination unless the source is this node (kubelet probes start as soon as a pod runs).
pub fn pending_drop(
    pending: &BTreeSet<IpAddr>,
    src: IpAddr,
    dst: IpAddr,
    from_this_node: bool,
) -> Option<IpAddr> {
    if pending.contains(&src) {
        Some(src)
    } else if !from_this_node && pending.contains(&dst) {
        Some(dst)
    } else {
        None
    }
}

/// What the policies selecting `lp` for `dir` say about a packet whose peer (destination for
/// egress, source for ingress) is `peer`, going to `dst` on `proto`/`port`.
pub fn judge(
    model: &Compiled,
    lp: &LocalPod,
    dir: Direction,
    peer: IpAddr,
    dst: IpAddr,
    proto: Option<Protocol>,
    port: u16,
) -> RuleVerdict {
    judge_keys(model, lp.policies(dir), dir, peer, dst, proto, port)
}

/// [`judge`] by the NetworkPolicies `keys` (e.g. those in audit mode: what they would say).
pub fn judge_keys(
    model: &Compiled,
    keys: &[String],
    dir: Direction,
    peer: IpAddr,
    dst: IpAddr,
    proto: Option<Protocol>,
    port: u16,
) -> RuleVerdict {
    if keys.is_empty() {
        return RuleVerdict::NotIsolated;
    }
    let mut by = Vec::new();
    for k in keys {
        for r in model
            .policies
            .get(k)
            .and_then(|p| p.rules(dir))
            .into_iter()
            .flatten()
        {
            let ports = match proto {
                Some(proto) => r.ports.matches(dst, proto, port),
                None => r.ports.any,
            };
            if let (Some(m), true) = (r.peers.matches(peer), ports) {
                by.push(AllowedBy {
                    policy: k.clone(),
                    rule: r.index,
                    peer: m,
                });
            }
        }
    }
    if by.is_empty() {
        RuleVerdict::Denied(keys.to_vec())
    } else {
        RuleVerdict::Allowed(by)
    }
}

/// The ClusterNetworkPolicy rule that decided a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMatch {
    pub tier: Tier,
    /// The policy's name.
    pub policy: String,
    pub priority: u32,
    /// The rule's `name`, or `#<index>`.
    pub rule: String,
    /// Accept or Deny (a Pass goes on to the next tier).
    pub action: Action,
    pub peer: PeerMatch,
}

/// What the tiers say about one direction of a packet of a local pod, in evaluation order: Admin
/// tier, NetworkPolicies (when one selects the pod), Baseline tier, the Kubernetes default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierVerdict {
    /// A ClusterNetworkPolicy rule accepted or denied it.
    Cluster(ClusterMatch),
    /// NetworkPolicies select the pod: they decided (`Allowed` or `Denied`).
    NetworkPolicy(RuleVerdict),
    /// No tier decided: allowed. `passed`: the Admin-tier Pass rule that handed it on, if any.
    Default { passed: Option<ClusterMatch> },
}

impl TierVerdict {
    pub fn allows(&self) -> bool {
        match self {
            TierVerdict::Cluster(m) => m.action == Action::Accept,
            TierVerdict::NetworkPolicy(v) => !matches!(v, RuleVerdict::Denied(_)),
            TierVerdict::Default { .. } => true,
        }
    }
}

/// Evaluates one direction of a packet of `lp` through every tier, as its group chain does (the
/// exemptions are the caller's: they come first).
pub fn decide(
    model: &Compiled,
    lp: &LocalPod,
    dir: Direction,
    peer: IpAddr,
    dst: IpAddr,
    proto: Option<Protocol>,
    port: u16,
) -> TierVerdict {
    let mut passed = None;
    match tier_match(model, lp, Tier::Admin, dir, peer, dst, proto, port) {
        Some(m) if m.action == Action::Pass => passed = Some(m),
        Some(m) => return TierVerdict::Cluster(m),
        None => {}
    }
    if lp.isolated(dir) {
        return TierVerdict::NetworkPolicy(judge(model, lp, dir, peer, dst, proto, port));
    }
    match tier_match(model, lp, Tier::Baseline, dir, peer, dst, proto, port) {
        Some(m) if m.action != Action::Pass => TierVerdict::Cluster(m),
        _ => TierVerdict::Default { passed },
    }
}

/// The first rule of one tier's ClusterNetworkPolicies of `lp` that matches, in order.
#[allow(clippy::too_many_arguments)]
fn tier_match(
    model: &Compiled,
    lp: &LocalPod,
    tier: Tier,
    dir: Direction,
    peer: IpAddr,
    dst: IpAddr,
    proto: Option<Protocol>,
    port: u16,
) -> Option<ClusterMatch> {
    for key in lp.cluster(dir).tier(tier) {
        let Some(cp) = model.cluster_policies.get(key) else {
            continue;
        };
        for r in cp.rules(dir) {
            if let Some(m) = r.matches(peer, dst, proto, port) {
                return Some(ClusterMatch {
                    tier,
                    policy: cp.name.clone(),
                    priority: cp.priority,
                    rule: r.label(),
                    action: r.action,
                    peer: m,
                });
            }
        }
    }
    None
}

/// The answer of [`Admitter::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Dropped because this address is pending (wired, its pod not compiled yet).
    Pending(IpAddr),
    /// Dropped by the policies isolating `pod` in `direction`, or by the ClusterNetworkPolicy
    /// rule named in `policies` (`clusternetworkpolicy <name> rule <rule>`).
    Denied {
        direction: Direction,
        pod: String,
        policies: Vec<String>,
    },
}

impl Admission {
    pub fn admitted(&self) -> bool {
        matches!(self, Admission::Admitted)
    }
}

/// The compiled model indexed by address, to judge many packets (one per conntrack entry) in
/// O(rules of the pods concerned) each.
pub struct Admitter<'a> {
    model: &'a Compiled,
    /// Address → the pod whose egress policies apply to it. As in the verdict maps, the first
    /// isolated pod (by key) owning an address keeps it.
    egress: HashMap<IpAddr, &'a LocalPod>,
    ingress: HashMap<IpAddr, &'a LocalPod>,
    /// Addresses of local pods (the `self` sets).
    local: HashSet<IpAddr>,
}

impl<'a> Admitter<'a> {
    pub fn new(model: &'a Compiled) -> Self {
        let mut egress = HashMap::new();
        let mut ingress = HashMap::new();
        let mut local = HashSet::new();
        for pod in model.pods.values() {
            for ip in &pod.ips {
                local.insert(*ip);
                if pod.governed(Direction::Egress) {
                    egress.entry(*ip).or_insert(pod);
                }
                if pod.governed(Direction::Ingress) {
                    ingress.entry(*ip).or_insert(pod);
                }
            }
        }
        Admitter {
            model,
            egress,
            ingress,
            local,
        }
    }

    /// The local pod owning `ip` whose `dir` policies (of any kind) apply to it, if any.
    pub fn governed_pod(&self, dir: Direction, ip: IpAddr) -> Option<&'a LocalPod> {
        match dir {
            Direction::Egress => self.egress.get(&ip).copied(),
            Direction::Ingress => self.ingress.get(&ip).copied(),
        }
    }

    /// [`Compiled::refusals`] of the local pod `pod` (a key) in `dir`.
    pub fn refusals(&self, pod: &str, dir: Direction) -> Vec<String> {
        self.model.refusals(pod, dir)
    }

    /// Whether the address is a local pod's or a pending one: only packets from or to such an
    /// address can be dropped by this node's ruleset.
    pub fn concerns(&self, ip: IpAddr) -> bool {
        self.local.contains(&ip) || self.model.pending.contains(&ip)
    }

    /// Whether this node's ruleset admits `f` as a new packet: pending addresses, then the egress
    /// of the source, then the ingress of the destination (both must allow, semantics 7).
    pub fn admit(&self, f: &Flow) -> Admission {
        let j = self.judge(f);
        if let Some(ip) = j.pending {
            return Admission::Pending(ip);
        }
        for (dir, verdict) in [
            (Direction::Egress, &j.egress),
            (Direction::Ingress, &j.ingress),
        ] {
            let Some((pod, v)) = verdict else { continue };
            let policies = match v {
                TierVerdict::NetworkPolicy(RuleVerdict::Denied(policies)) => policies.clone(),
                TierVerdict::Cluster(m) if m.action == Action::Deny => {
                    vec![format!("clusternetworkpolicy {} rule {}", m.policy, m.rule)]
                }
                _ => continue,
            };
            return Admission::Denied {
                direction: dir,
                pod: pod.to_string(),
                policies,
            };
        }
        Admission::Admitted
    }

    /// What decided each direction of `f` on this node, in the order the ruleset evaluates them: a
    /// pending address, else the egress of the source (if a local pod some tier governs), then the
    /// ingress of the destination; evaluation stops where the ruleset's does (a drop, an
    /// exemption, an ingress decision). For the flow log: which policies dropped or admitted it.
    pub fn judge(&self, f: &Flow) -> Judgement<'a> {
        let mut j = Judgement::default();
        if let Some(ip) = pending_drop(&self.model.pending, f.src, f.dst, f.from_this_node) {
            j.pending = Some(ip);
            return j;
        }
        let self_traffic = f.src == f.dst && self.local.contains(&f.src);
        for (dir, own, peer) in [
            (Direction::Egress, f.src, f.dst),
            (Direction::Ingress, f.dst, f.src),
        ] {
            let owners = match dir {
                Direction::Egress => &self.egress,
                Direction::Ingress => &self.ingress,
            };
            let Some(lp) = owners.get(&own) else { continue };
            if let Some(e) = exemption(dir, self_traffic, f.from_this_node) {
                // An exemption accepts: the packet's verdict is final in either group chain.
                j.exempt = Some((dir, lp.key.as_str(), e));
                return j;
            }
            let v = decide(self.model, lp, dir, peer, f.dst, f.proto, f.port);
            // A drop is final; an ingress decision is the last; an egress Accept goes on to the
            // destination's ingress, as any other egress allow.
            let last = !v.allows() || dir == Direction::Ingress;
            let slot = match dir {
                Direction::Egress => &mut j.egress,
                Direction::Ingress => &mut j.ingress,
            };
            *slot = Some((lp.key.as_str(), v));
            if last {
                break;
            }
        }
        j
    }
}

/// What [`Admitter::judge`] found: each field is what the ruleset met on the way, `None` where it
/// met nothing (an address of no governed local pod, or evaluation ended before).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Judgement<'a> {
    /// Dropped: this address is pending.
    pub pending: Option<IpAddr>,
    /// Accepted whatever the policies say, in this direction of this pod.
    pub exempt: Option<(Direction, &'a str, Exemption)>,
    /// The source pod and what its egress tiers said.
    pub egress: Option<(&'a str, TierVerdict)>,
    /// The destination pod and what its ingress tiers said.
    pub ingress: Option<(&'a str, TierVerdict)>,
}

/// [`Admitter::admit`] for one packet (builds the index: for many, keep an [`Admitter`]).
pub fn admit(model: &Compiled, f: &Flow) -> Admission {
    Admitter::new(model).admit(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::compile::tests::W;
    use crate::ruleset::eval::Packet;
    use crate::synth::{self, Rng, SynthConfig};
    use serde_json::json;

    const N1: &str = "n1";
    const N1_IP: &str = "192.168.0.1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn packet(f: &Flow) -> Packet {
        Packet {
            saddr: f.src,
            daddr: f.dst,
            proto: f.proto,
            dport: f.port,
            from_this_node: f.from_this_node,
        }
    }

    /// A world with every kind of decision: isolated in each direction, named ports, ipBlocks,
    /// a pending address, two pods on one node and one on the other.
    fn world() -> W {
        let mut w = W::new();
        w.pod("a/web", N1, &["10.0.1.1", "fd00::1:1"], &[("app", "web")]);
        w.pod("a/cli", N1, &["10.0.1.2", "fd00::1:2"], &[("app", "cli")]);
        w.pod("a/out", N1, &["10.0.1.3"], &[("app", "out")]);
        w.pod("b/db", "n2", &["10.0.2.1"], &[("app", "db")]);
        w.ports("a/web", &[("http", 8080, Protocol::Tcp)]);
        // web: ingress from cli on tcp/80 and the named port, from 172.16/16 on udp/53.
        w.policy(
            "a/web-in",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                 "ports": [{"port": 80}, {"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": "172.16.0.0/16", "except": ["172.16.9.0/24"]}}],
                 "ports": [{"protocol": "UDP", "port": 53}]}]}),
        );
        // out: egress to the db pods only, any port; ICMP too.
        w.policy(
            "a/out-eg",
            json!({"podSelector": {"matchLabels": {"app": "out"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
        );
        w.st.apply(crate::model::Change::SetAttachments(vec![
            palisade_contract::Attachment {
                container_id: "pend".into(),
                ifname: "eth0".into(),
                netns: "/x".into(),
                host_veth: "palx".into(),
                ips: vec![ip("10.0.1.9")],
                pod_namespace: Some("a".into()),
                pod_name: Some("pend".into()),
                pod_uid: Some("u".into()),
                pending: true,
            },
        ]));
        w
    }

    #[test]
    fn admission_of_new_packets_matches_the_ruleset_case_by_case() {
        let w = world();
        let c = compile(&w.st, N1);
        assert!(
            c.pending.contains(&ip("10.0.1.9")),
            "the world has a pending address"
        );
        let adm = Admitter::new(&c);
        let tcp = Some(Protocol::Tcp);
        let udp = Some(Protocol::Udp);
        let deny_in = |pod: &str, pol: &str| Admission::Denied {
            direction: Direction::Ingress,
            pod: pod.into(),
            policies: vec![pol.into()],
        };
        let deny_eg = |pod: &str, pol: &str| Admission::Denied {
            direction: Direction::Egress,
            pod: pod.into(),
            policies: vec![pol.into()],
        };
        // (what, source, destination, protocol, port, from this node, expected)
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            Option<Protocol>,
            u16,
            bool,
            Admission,
        );
        let cases: Vec<Case> = vec![
            (
                "allowed by pod peer and port",
                "10.0.1.2",
                "10.0.1.1",
                tcp,
                80,
                false,
                Admission::Admitted,
            ),
            (
                "allowed by named port",
                "10.0.1.2",
                "10.0.1.1",
                tcp,
                8080,
                false,
                Admission::Admitted,
            ),
            (
                "named port is tcp only",
                "10.0.1.2",
                "10.0.1.1",
                udp,
                8080,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "wrong port",
                "10.0.1.2",
                "10.0.1.1",
                tcp,
                81,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "remote pod not a peer",
                "10.0.2.1",
                "10.0.1.1",
                tcp,
                80,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "ipBlock on udp/53",
                "172.16.3.3",
                "10.0.1.1",
                udp,
                53,
                false,
                Admission::Admitted,
            ),
            (
                "ipBlock except",
                "172.16.9.3",
                "10.0.1.1",
                udp,
                53,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "ICMP meets no ports rule",
                "10.0.1.2",
                "10.0.1.1",
                None,
                0,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "from this node exempt",
                N1_IP,
                "10.0.1.1",
                tcp,
                9999,
                true,
                Admission::Admitted,
            ),
            (
                "self exempt",
                "10.0.1.1",
                "10.0.1.1",
                tcp,
                9999,
                false,
                Admission::Admitted,
            ),
            (
                "IPv6 peer pod",
                "fd00::1:2",
                "fd00::1:1",
                tcp,
                80,
                false,
                Admission::Admitted,
            ),
            (
                "IPv6 wrong port",
                "fd00::1:2",
                "fd00::1:1",
                tcp,
                22,
                false,
                deny_in("a/web", "a/web-in"),
            ),
            (
                "egress to selected namespace",
                "10.0.1.3",
                "10.0.2.1",
                tcp,
                5432,
                false,
                Admission::Admitted,
            ),
            (
                "egress ICMP by any-port rule",
                "10.0.1.3",
                "10.0.2.1",
                None,
                0,
                false,
                Admission::Admitted,
            ),
            (
                "egress elsewhere",
                "10.0.1.3",
                "8.8.8.8",
                udp,
                53,
                false,
                deny_eg("a/out", "a/out-eg"),
            ),
            (
                "egress then ingress",
                "10.0.1.3",
                "10.0.1.1",
                tcp,
                80,
                false,
                deny_eg("a/out", "a/out-eg"),
            ),
            (
                "not isolated both ways",
                "10.0.1.2",
                "8.8.8.8",
                tcp,
                443,
                false,
                Admission::Admitted,
            ),
            (
                "pending source",
                "10.0.1.9",
                "10.0.1.2",
                tcp,
                80,
                false,
                Admission::Pending(ip("10.0.1.9")),
            ),
            (
                "pending destination",
                "10.0.1.2",
                "10.0.1.9",
                tcp,
                80,
                false,
                Admission::Pending(ip("10.0.1.9")),
            ),
            (
                "pending destination from this node",
                N1_IP,
                "10.0.1.9",
                tcp,
                80,
                true,
                Admission::Admitted,
            ),
            (
                "node to isolated pod is not a pod peer",
                N1_IP,
                "10.0.1.1",
                tcp,
                22,
                true,
                Admission::Admitted,
            ),
        ];
        for (what, src, dst, proto, port, from_this_node, want) in cases {
            let f = Flow {
                src: ip(src),
                dst: ip(dst),
                proto,
                port,
                from_this_node,
            };
            let got = adm.admit(&f);
            assert_eq!(got, want, "{what}");
            assert_eq!(
                got.admitted(),
                c.ruleset.eval_forward(&packet(&f)),
                "{what}: admission and ruleset disagree"
            );
        }
        assert!(adm.concerns(ip("10.0.1.9")) && adm.concerns(ip("10.0.1.1")));
        assert!(!adm.concerns(ip("10.0.2.1")) && !adm.concerns(ip(N1_IP)));
    }

    #[test]
    fn admission_agrees_with_the_ruleset_over_generated_states() {
        let (mut checked, mut denied, mut by_cluster) = (0usize, 0usize, 0usize);
        let mut audit_chains = 0;
        for seed in 0..10u64 {
            let cfg = SynthConfig {
                nodes: 3,
                namespaces: 4,
                pods: 30,
                policies: 12,
                cluster_policies: 6,
                seed,
                dual_stack: seed % 2 == 1,
                audit_every: 4,
            };
            let mut st = synth::cluster(&cfg);
            let mut rng = Rng::new(seed + 7);
            for i in 0..8 {
                let ch = synth::random_change(&cfg, &st, &mut rng, i);
                st.apply(ch);
            }
            let c = compile(&st, "n0");
            audit_chains += c
                .ruleset
                .chains
                .keys()
                .filter(|n| n.contains("_au_"))
                .count();
            let adm = Admitter::new(&c);
            let node_ips: Vec<IpAddr> = st
                .nodes
                .get("n0")
                .map(|n| n.internal_ips.clone())
                .unwrap_or_default();
            let mut addrs: Vec<IpAddr> = st.pods.values().flat_map(|p| p.ips.clone()).collect();
            addrs.extend(c.pending.iter().copied());
            addrs.extend(node_ips.iter().copied());
            addrs.push(ip("192.168.77.5"));
            addrs.push(ip("fd77::5"));
            for _ in 0..600 {
                let src = addrs[rng.below(addrs.len())];
                let dst = if rng.chance(5) {
                    src
                } else {
                    addrs[rng.below(addrs.len())]
                };
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                let proto = if rng.chance(10) {
                    None
                } else {
                    Some(Protocol::ALL[rng.below(3)])
                };
                let port = [53u16, 80, 443, 8000, 8050, 8080, 9000, 22][rng.below(8)];
                let f = Flow {
                    src,
                    dst,
                    proto,
                    port,
                    from_this_node: node_ips.contains(&src),
                };
                let got = adm.admit(&f);
                let want = c.ruleset.eval_forward(&packet(&f));
                assert_eq!(got.admitted(), want, "seed {seed}: {f:?} -> {got:?}");
                checked += 1;
                denied += usize::from(!want);
                if let Admission::Denied { policies, .. } = &got {
                    by_cluster += usize::from(policies[0].starts_with("clusternetworkpolicy"));
                }
            }
        }
        assert!(
            denied > checked / 20 && denied < checked * 19 / 20,
            "{denied} of {checked} denied: not a useful mix"
        );
        // The tiers must decide a fair share, or this proves nothing about them.
        assert!(
            by_cluster > 10,
            "only {by_cluster} of {denied} denials by a ClusterNetworkPolicy"
        );
        // Policies in audit mode were evaluated (and changed no verdict, as checked above).
        assert!(audit_chains > 3, "only {audit_chains} audit chains");
    }
}
