//! Seeded synthetic clusters and change streams: deterministic and pure, for property tests and
//! the compile benchmark.

use crate::model::{
    pod_key, Action, Change, ClusterPolicy, ClusterRule, ClusterState, ClusterSubject,
    ContainerPort, LabelSelector, Labels, Namespace, Node, Peer, Pod, PodPhase, Policy, PortMatch,
    PortSpec, Protocol, Requirement, Rule, Tier,
};
use palisade_contract::Attachment;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A small, fast, seeded generator (splitmix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % (n.max(1) as u64)) as usize
    }
    /// True with probability `pct`/100.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.next_u64() % 100 < pct
    }
}

/// Size and seed of a synthetic cluster.
#[derive(Debug, Clone, Copy)]
pub struct SynthConfig {
    pub nodes: usize,
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
    /// ClusterNetworkPolicies (Admin and Baseline).
    pub cluster_policies: usize,
    pub seed: u64,
    /// Give every pod an IPv6 address too.
    pub dual_stack: bool,
    /// Every n-th policy is in audit mode (0: none).
    pub audit_every: usize,
}

impl SynthConfig {
    /// 10k pods on 100 nodes, 500 namespaces, 1k policies of mixed shapes.
    pub fn large(seed: u64) -> Self {
        Self {
            nodes: 100,
            namespaces: 500,
            pods: 10_000,
            policies: 1_000,
            cluster_policies: 0,
            seed,
            dual_stack: true,
            audit_every: 0,
        }
    }
    /// Ten times [`SynthConfig::large`]: 100k pods on 1,000 nodes, 5,000 namespaces, 10k policies.
    pub fn huge(seed: u64) -> Self {
        Self {
            nodes: 1_000,
            namespaces: 5_000,
            pods: 100_000,
            policies: 10_000,
            ..Self::large(seed)
        }
    }
    /// A small cluster where most things touch node `n0` (property tests).
    pub fn small(seed: u64) -> Self {
        Self {
            nodes: 3,
            namespaces: 4,
            pods: 24,
            policies: 8,
            cluster_policies: 4,
            seed,
            dual_stack: true,
            audit_every: 5,
        }
    }
}

const APPS: usize = 12;
const TIERS: [&str; 3] = ["web", "api", "db"];
const TEAMS: usize = 8;

/// Name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Name of namespace `i`.
pub fn ns_name(i: usize) -> String {
    format!("ns{i}")
}

fn pod_ips(i: usize, dual: bool) -> Vec<IpAddr> {
    let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
    let mut v = vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + n))];
    if dual {
        v.push(IpAddr::V6(Ipv6Addr::from(
            0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(n),
        )));
    }
    v
}

fn pod_labels(rng: &mut Rng) -> Labels {
    let mut l = Labels::new();
    l.insert("app".into(), format!("app{}", rng.below(APPS)));
    l.insert("tier".into(), TIERS[rng.below(TIERS.len())].into());
    if rng.chance(50) {
        l.insert(
            "env".into(),
            if rng.chance(50) { "prod" } else { "dev" }.into(),
        );
    }
    l
}

fn pod_ports(rng: &mut Rng) -> Vec<ContainerPort> {
    let mut v = vec![ContainerPort {
        name: Some("http".into()),
        port: 8080 + rng.below(3) as u16,
        protocol: Protocol::Tcp,
    }];
    if rng.chance(40) {
        v.push(ContainerPort {
            name: Some("metrics".into()),
            port: 9100,
            protocol: Protocol::Tcp,
        });
    }
    if rng.chance(20) {
        v.push(ContainerPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Udp,
        });
    }
    v
}

/// Pod number `i` of a cluster.
pub fn make_pod(cfg: &SynthConfig, rng: &mut Rng, i: usize) -> Pod {
    Pod {
        namespace: ns_name(rng.below(cfg.namespaces)).into(),
        name: format!("pod{i}").into(),
        uid: format!("uid-{i}-{}", rng.next_u64() % 1000).into(),
        labels: pod_labels(rng),
        node_name: Some(node_name(rng.below(cfg.nodes)).into()),
        ips: pod_ips(i, cfg.dual_stack).into(),
        ports: pod_ports(rng).into(),
        host_network: false,
        phase: PodPhase::Running,
    }
}

fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        expressions: vec![],
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse()
        .unwrap_or(ipnet::IpNet::V4(ipnet::Ipv4Net::default()))
}

fn port(p: Protocol, m: PortMatch) -> PortSpec {
    PortSpec {
        protocol: p,
        port: m,
    }
}

/// Policy number `i` (shape chosen by the generator).
pub fn make_policy(cfg: &SynthConfig, rng: &mut Rng, i: usize) -> Policy {
    let namespace = ns_name(rng.below(cfg.namespaces));
    let app = |rng: &mut Rng| format!("app{}", rng.below(APPS));
    let target = if rng.chance(20) {
        LabelSelector::everything()
    } else {
        sel(&[("app", app(rng))])
    };
    let mut ingress = None;
    let mut egress = None;
    match rng.below(10) {
        0 => ingress = Some(vec![]),
        1 => {
            ingress = Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: None,
                    pod_selector: Some(sel(&[("app", app(rng))])),
                }],
                ports: vec![port(Protocol::Tcp, PortMatch::Range(80, 80))],
            }])
        }
        2 => {
            ingress = Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: Some(sel(&[("team", format!("t{}", rng.below(TEAMS)))])),
                    pod_selector: None,
                }],
                ports: vec![
                    port(Protocol::Tcp, PortMatch::Range(8000, 8100)),
                    port(Protocol::Udp, PortMatch::All),
                ],
            }])
        }
        3 => {
            egress = Some(vec![Rule {
                peers: vec![Peer::IpBlock {
                    cidr: net("10.0.0.0/8"),
                    except: vec![net(&format!("10.0.{}.0/24", rng.below(40)))],
                }],
                ports: vec![],
            }])
        }
        4 => {
            ingress = Some(vec![Rule {
                peers: vec![],
                ports: vec![
                    port(Protocol::Tcp, PortMatch::Named("http".into())),
                    port(Protocol::Tcp, PortMatch::Named("metrics".into())),
                ],
            }])
        }
        5 => {
            egress = Some(vec![
                Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: Some(LabelSelector::everything()),
                        pod_selector: Some(sel(&[("tier", TIERS[rng.below(3)].to_string())])),
                    }],
                    ports: vec![port(Protocol::Tcp, PortMatch::Named("http".into()))],
                },
                Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: Some(sel(&[(
                            "kubernetes.io/metadata.name",
                            "kube-system".to_string(),
                        )])),
                        pod_selector: None,
                    }],
                    ports: vec![port(Protocol::Udp, PortMatch::Range(53, 53))],
                },
            ])
        }
        6 => ingress = Some(vec![Rule::default()]),
        7 => {
            ingress = Some(vec![Rule {
                peers: vec![],
                ports: vec![
                    port(Protocol::Sctp, PortMatch::Range(9000, 9000)),
                    port(Protocol::Udp, PortMatch::Range(5000, 5100)),
                ],
            }])
        }
        8 => {
            let values: BTreeSet<String> = [format!("t{}", rng.below(TEAMS))].into();
            ingress = Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Default::default(),
                        expressions: vec![Requirement::NotIn {
                            key: "team".into(),
                            values: values.into(),
                        }],
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Default::default(),
                        expressions: vec![Requirement::In {
                            key: "env".into(),
                            values: ["prod".to_string()].into(),
                        }],
                    }),
                }],
                ports: vec![port(Protocol::Tcp, PortMatch::Range(443, 443))],
            }])
        }
        _ => {
            ingress = Some(vec![Rule {
                peers: vec![
                    Peer::Pods {
                        namespace_selector: None,
                        pod_selector: Some(LabelSelector::everything()),
                    },
                    Peer::IpBlock {
                        cidr: net("192.168.0.0/16"),
                        except: vec![],
                    },
                    Peer::IpBlock {
                        cidr: net("fd00::/112"),
                        except: vec![],
                    },
                ],
                ports: vec![],
            }]);
            egress = Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: None,
                    pod_selector: Some(LabelSelector::everything()),
                }],
                ports: vec![port(Protocol::Tcp, PortMatch::Range(1, 1024))],
            }]);
        }
    }
    Policy {
        namespace,
        name: format!("pol{i}"),
        pod_selector: target,
        ingress,
        egress,
        audit: cfg.audit_every > 0 && i % cfg.audit_every == cfg.audit_every - 1,
    }
}

/// ClusterNetworkPolicy number `i`: either tier, priorities from a small range (so ties happen),
/// subjects by namespace or by namespace and pod, and rules of every action and peer kind.
pub fn make_cluster_policy(rng: &mut Rng, i: usize) -> ClusterPolicy {
    let team = |rng: &mut Rng| sel(&[("team", format!("t{}", rng.below(TEAMS)))]);
    let app = |rng: &mut Rng| sel(&[("app", format!("app{}", rng.below(APPS)))]);
    let subject = match rng.below(3) {
        0 => ClusterSubject::Namespaces(team(rng)),
        1 => ClusterSubject::Namespaces(LabelSelector::everything()),
        _ => ClusterSubject::Pods {
            namespace_selector: LabelSelector::everything(),
            pod_selector: app(rng),
        },
    };
    let action = |rng: &mut Rng| match rng.below(3) {
        0 => Action::Accept,
        1 => Action::Deny,
        _ => Action::Pass,
    };
    let rule = |rng: &mut Rng, egress: bool| -> ClusterRule {
        let peers = match rng.below(if egress { 5 } else { 3 }) {
            0 => vec![Peer::Pods {
                namespace_selector: Some(team(rng)),
                pod_selector: None,
            }],
            1 => vec![Peer::Pods {
                namespace_selector: Some(LabelSelector::everything()),
                pod_selector: Some(app(rng)),
            }],
            2 => vec![Peer::Pods {
                namespace_selector: Some(sel(&[("env", "prod".to_string())])),
                pod_selector: Some(sel(&[("tier", TIERS[rng.below(3)].to_string())])),
            }],
            3 => vec![Peer::Nodes(sel(&[("zone", format!("z{}", rng.below(3)))]))],
            _ => vec![
                Peer::IpBlock {
                    cidr: net("10.0.0.0/20"),
                    except: vec![],
                },
                Peer::IpBlock {
                    cidr: net("fd00::/120"),
                    except: vec![],
                },
            ],
        };
        let addresses_only = peers
            .iter()
            .all(|p| matches!(p, Peer::IpBlock { .. } | Peer::Nodes(_)));
        let ports = match rng.below(4) {
            0 => vec![],
            1 => vec![port(Protocol::Tcp, PortMatch::Range(80, 80))],
            2 => vec![
                port(Protocol::Tcp, PortMatch::Range(8000, 8100)),
                port(Protocol::Udp, PortMatch::All),
            ],
            _ if addresses_only => vec![port(Protocol::Udp, PortMatch::Range(53, 53))],
            _ => Protocol::ALL
                .into_iter()
                .map(|p| port(p, PortMatch::Named("http".into())))
                .collect(),
        };
        let inert = rng.chance(5);
        ClusterRule {
            name: rng.chance(50).then(|| format!("r{}", rng.below(100))),
            action: action(rng),
            rule: Rule {
                peers: if inert { vec![] } else { peers },
                ports: if inert { vec![] } else { ports },
            },
            inert,
        }
    };
    let ingress = (0..rng.below(4)).map(|_| rule(rng, false)).collect();
    let egress = (0..rng.below(4)).map(|_| rule(rng, true)).collect();
    ClusterPolicy {
        name: format!("cnp{i}"),
        tier: if rng.chance(50) {
            Tier::Admin
        } else {
            Tier::Baseline
        },
        priority: rng.below(4) as u32 * 10,
        subject,
        ingress,
        egress,
    }
}

fn make_namespace(rng: &mut Rng, i: usize) -> Namespace {
    let mut l = Labels::new();
    l.insert("team".into(), format!("t{}", rng.below(TEAMS)));
    if rng.chance(30) {
        l.insert("env".into(), "prod".into());
    }
    Namespace::new(ns_name(i), l)
}

/// A whole synthetic cluster, deterministic for a config.
pub fn cluster(cfg: &SynthConfig) -> ClusterState {
    let mut rng = Rng::new(cfg.seed);
    let mut st = ClusterState::default();
    for i in 0..cfg.nodes {
        st.apply(Change::UpsertNode(make_node(i, i % 3)));
    }
    st.apply(Change::UpsertNamespace(Namespace::new(
        "kube-system",
        Labels::new(),
    )));
    for i in 0..cfg.namespaces {
        st.apply(Change::UpsertNamespace(make_namespace(&mut rng, i)));
    }
    // Label sets, namespaces and node names shared as the agent's sources share them.
    let mut sharing = crate::model::PodSharing::default();
    for i in 0..cfg.pods {
        let mut pod = make_pod(cfg, &mut rng, i);
        sharing.share(&mut pod);
        st.apply(Change::UpsertPod(pod.into()));
    }
    for i in 0..cfg.policies {
        st.apply(Change::UpsertPolicy(make_policy(cfg, &mut rng, i)));
    }
    for i in 0..cfg.cluster_policies {
        st.apply(Change::UpsertClusterPolicy(make_cluster_policy(
            &mut rng, i,
        )));
    }
    st
}

/// Node `i` in zone `z<zone>` (label `zone`), its InternalIP its one address.
fn make_node(i: usize, zone: usize) -> Node {
    let ip = IpAddr::V4(Ipv4Addr::new(
        192,
        168,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ));
    Node {
        name: node_name(i),
        pod_cidrs: vec![],
        internal_ips: vec![ip],
        labels: [("zone".to_string(), format!("z{zone}"))].into(),
        addresses: vec![ip],
    }
}

/// A random change to a synthetic cluster, as a watch stream would deliver. `serial` makes new
/// names unique.
pub fn random_change(cfg: &SynthConfig, st: &ClusterState, rng: &mut Rng, serial: usize) -> Change {
    let pick = |rng: &mut Rng, n: usize| rng.below(n);
    // ClusterNetworkPolicy and Node changes only where the config has ClusterNetworkPolicies: the
    // streams of configs without them stay what they were.
    if cfg.cluster_policies > 0 && rng.chance(25) {
        return match rng.below(4) {
            0 => {
                Change::UpsertClusterPolicy(make_cluster_policy(rng, cfg.cluster_policies + serial))
            }
            1 => match st
                .cluster_policies
                .values()
                .nth(pick(rng, st.cluster_policies.len()))
            {
                Some(p) => {
                    let mut np = make_cluster_policy(rng, 0);
                    np.name = p.name.clone();
                    Change::UpsertClusterPolicy(np)
                }
                None => Change::SetAttachments(vec![]),
            },
            2 => match st
                .cluster_policies
                .values()
                .nth(pick(rng, st.cluster_policies.len()))
            {
                Some(p) => Change::DeleteClusterPolicy {
                    name: p.name.clone(),
                },
                None => Change::SetAttachments(vec![]),
            },
            _ => {
                let i = pick(rng, cfg.nodes);
                Change::UpsertNode(make_node(i, rng.below(3)))
            }
        };
    }
    match rng.below(11) {
        0 | 1 => {
            let mut p = make_pod(cfg, rng, cfg.pods + serial);
            if rng.chance(50) {
                p.node_name = Some(node_name(0).into());
            }
            Change::UpsertPod(p.into())
        }
        2 => match st.pods.values().nth(pick(rng, st.pods.len())) {
            Some(p) => Change::DeletePod {
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
            },
            None => Change::SetAttachments(vec![]),
        },
        3 | 4 => match st.pods.values().nth(pick(rng, st.pods.len())) {
            Some(p) => {
                let mut p = Pod::clone(p);
                p.labels = pod_labels(rng);
                Change::UpsertPod(p.into())
            }
            None => Change::SetAttachments(vec![]),
        },
        5 => {
            let i = pick(rng, cfg.namespaces);
            Change::UpsertNamespace(make_namespace(rng, i))
        }
        6 => Change::UpsertPolicy(make_policy(cfg, rng, cfg.policies + serial)),
        7 => match st.policies.values().nth(pick(rng, st.policies.len())) {
            Some(p) => {
                let mut np = make_policy(cfg, rng, 0);
                np.namespace = p.namespace.clone();
                np.name = p.name.clone();
                Change::UpsertPolicy(np)
            }
            None => Change::SetAttachments(vec![]),
        },
        8 => match st.policies.values().nth(pick(rng, st.policies.len())) {
            Some(p) => Change::DeletePolicy {
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
            },
            None => Change::SetAttachments(vec![]),
        },
        _ => {
            // Attachments on node n0: some for known pods, some pending for pods not known yet.
            let mut v = Vec::new();
            for (k, p) in st
                .pods
                .iter()
                .filter(|(_, p)| p.node_name.as_deref() == Some("n0"))
            {
                if rng.chance(50) {
                    let (ns, name) = k.split_once('/').unwrap_or_default();
                    v.push(attachment(ns, name, &p.ips, rng.chance(50)));
                }
            }
            for j in 0..rng.below(3) {
                let i = cfg.pods + 10_000 + serial * 4 + j;
                v.push(attachment(
                    &ns_name(0),
                    &format!("new{i}"),
                    &pod_ips(i, cfg.dual_stack),
                    true,
                ));
            }
            Change::SetAttachments(v)
        }
    }
}

fn attachment(ns: &str, name: &str, ips: &[IpAddr], pending: bool) -> Attachment {
    let cid = format!("c-{}", pod_key(ns, name).replace('/', "-"));
    Attachment {
        host_veth: palisade_contract::host_veth_name(&cid, "eth0"),
        container_id: cid,
        ifname: "eth0".into(),
        netns: String::new(),
        ips: ips.to_vec(),
        pod_namespace: Some(ns.into()),
        pod_name: Some(name.into()),
        pod_uid: None,
        pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_sequence_and_different_seeds_differ() {
        let run = |seed| {
            let mut r = Rng::new(seed);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn below_stays_below_its_bound() {
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0, "a zero bound is treated as one");
    }
}
