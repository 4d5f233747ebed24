//! The synthetic cluster every compared system consumes, and its node-local view.
//!
//! Shape (seeded, reproducible):
//! - 100 nodes `node-1..node-100`, pod CIDR `10.244.<n>.0/24`; the lab's nodes are `node-1` (client)
//!   and `node-2` (server).
//! - 100 namespaces `ns-0..ns-99` (labels `team=t<k mod 10>`), 100 pods each, one per node:
//!   pod `ns-k/p-m` on `node-(m+1)`, IP `10.244.(m+1).(20+k)`, labels `app=a<m mod 10>`,
//!   `role=r<(m+k) mod 20>`. So 10,000 "other" pods exist as IPs, 100 of them on each lab node.
//! - Namespace `bench` (`team=bench`) holds the two measured pods: `client` (10.244.1.10, node-1) and
//!   `server` (10.244.2.10, node-2).
//! - With P policies (P = 0 or P >= 8): 4 ingress policies select the server and 4 egress policies
//!   select the client, each with a large peer set (all pods of one role across all namespaces: 500
//!   peers); only the last of each four also lists the other measured pod, so the first three are
//!   evaluated and miss. The other P-8 policies live in `ns-*`, each selects `app=a0` or `app=a1` of
//!   its namespace (one local pod on node-1 or node-2 respectively: every policy is loaded on a lab
//!   node), one direction, a peer set of 5 (same namespace, one role) or 50 (one role across the
//!   10 namespaces of a team), one or two TCP ports. The measured policies sit at evenly spread
//!   positions of the creation order.

use super::fnv1a;
use palisade_policy::synth::Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Number of nodes of the synthetic cluster.
pub const NODES: u32 = 100;
/// Number of `ns-*` namespaces (each holds one pod per node).
pub const NAMESPACES: u32 = 100;
/// Namespace of the measured pods.
pub const BENCH_NS: &str = "bench";
/// Ports the measured traffic uses (iperf3, connect/close server, request/response server).
pub const MEASURED_PORTS: [u16; 3] = [5201, 7000, 7001];
/// Policies that select a measured pod: 4 ingress on the server, 4 egress on the client.
pub const MEASURED_POLICIES: usize = 8;

pub type Labels = BTreeMap<String, String>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: Labels,
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// One peer of a rule: `namespaceSelector` (None: the policy's namespace; Some(empty): all) and
/// `podSelector` (matchLabels).
#[derive(Debug, Clone)]
pub struct Peer {
    pub namespace_selector: Option<Labels>,
    pub pod_selector: Labels,
}

/// A NetworkPolicy with one rule in one direction, TCP ports only (what the bench needs).
#[derive(Debug, Clone)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Labels,
    pub direction: Direction,
    pub peers: Vec<Peer>,
    pub ports: Vec<u16>,
    /// Selects a measured pod.
    pub measured: bool,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    /// Nodes `node-1..node-<nodes>`.
    pub nodes: u32,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    /// In creation order.
    pub policies: Vec<Policy>,
    /// ClusterNetworkPolicies (as API objects; only palisade reads them, the models are of
    /// NetworkPolicy only). See [`Cluster::with_cluster_policies`].
    pub cluster_policies: Vec<serde_json::Value>,
}

fn matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Most namespaces of background pods: 1,000 × [`NODES`] = 100k pods.
pub const MAX_NAMESPACES: u32 = 1_000;

/// Address of the background pod of namespace `k` on node `m` (0-based): `10.244.<m+1>.<20+k>`
/// for the first 200 namespaces (inside the node's podCIDR, as every run before 100k pods had
/// it); past them `10.<128+m>.<j/250>.<j%250+1>` (j = k - 200), outside every podCIDR, the lab
/// and the Service range: policies only match these addresses, nothing routes to them.
fn background_ip(m: u32, k: u32) -> Ipv4Addr {
    if k < 200 {
        let [a, b, c] = node_pod_net(m + 1);
        Ipv4Addr::new(a, b, c, (20 + k) as u8)
    } else {
        let j = k - 200;
        Ipv4Addr::new(10, (128 + m) as u8, (j / 250) as u8, (j % 250 + 1) as u8)
    }
}

/// The first three octets of node `n`'s pod /24 (1-based): `10.244.<n>` up to node 255 (the lab's
/// nodes and every run before 1,000 nodes), `100.<64 + n/256>.<n%256>` past it.
pub fn node_pod_net(n: u32) -> [u8; 3] {
    if n <= 255 {
        [10, 244, n as u8]
    } else {
        [100, (64 + n / 256) as u8, (n % 256) as u8]
    }
}

/// Most nodes of a synthetic cluster.
pub const MAX_NODES: u32 = 1_000;

/// Size of a synthetic cluster: `namespaces` × `nodes` other pods, `policies` policies.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Nodes `node-1..node-<nodes>` (one pod of every `ns-*` namespace each).
    pub nodes: u32,
    pub namespaces: u32,
    pub policies: usize,
    /// Whether the 8 policies selecting the measured pods are part of the policy count (datapath
    /// bench); without them, every policy selects other pods (enforcement bench).
    pub measured: bool,
    /// Every background pod also carries a label of its own (`pod=<namespace>.<name>`, as a
    /// StatefulSet's pod-name label): no two pods share a label set (the worst case for sharing
    /// them). Selects nothing more.
    pub unique_labels: bool,
}

impl Shape {
    /// The enforcement bench's cluster of about `pods` pods (rounded to a multiple of 100) with
    /// `policies` policies, none selecting the measured pods.
    pub fn for_pods(pods: usize, policies: usize) -> Shape {
        Shape::for_pods_on(pods, policies, NODES)
    }

    /// The same over `nodes` nodes: about `pods / nodes` pods on each, the agent's node included.
    pub fn for_pods_on(pods: usize, policies: usize, nodes: u32) -> Shape {
        Shape {
            nodes,
            namespaces: (pods / nodes.max(1) as usize).clamp(1, MAX_NAMESPACES as usize) as u32,
            policies,
            measured: false,
            unique_labels: false,
        }
    }
}

impl Cluster {
    /// Generates the datapath cluster (10,000 other pods) with `policies` policies (0 or at least
    /// [`MEASURED_POLICIES`]).
    pub fn generate(policies: usize, seed: u64) -> crate::Result<Cluster> {
        Cluster::generate_shape(
            Shape {
                nodes: NODES,
                namespaces: NAMESPACES,
                policies,
                measured: true,
                unique_labels: false,
            },
            seed,
        )
    }

    /// Generates a cluster of the given shape.
    pub fn generate_shape(shape: Shape, seed: u64) -> crate::Result<Cluster> {
        let Shape {
            nodes,
            namespaces: ns_count,
            policies,
            measured: with_measured,
            unique_labels,
        } = shape;
        if ns_count == 0 || ns_count > MAX_NAMESPACES {
            return Err(crate::Error::Invalid(format!(
                "{ns_count} namespaces: use 1..={MAX_NAMESPACES}"
            )));
        }
        // Past 200 namespaces the addresses leave the nodes' podCIDRs (`background_ip`): that plan
        // holds 128 nodes.
        if !(2..=MAX_NODES).contains(&nodes) || (ns_count > 200 && nodes > 128) {
            return Err(crate::Error::Invalid(format!(
                "{nodes} nodes with {ns_count} namespaces: use 2..={MAX_NODES} nodes, at most 128 past 200 namespaces"
            )));
        }
        if with_measured && policies != 0 && policies < MEASURED_POLICIES {
            return Err(crate::Error::Invalid(format!(
                "policy count {policies}: use 0 or at least {MEASURED_POLICIES}"
            )));
        }
        let mut namespaces = vec![Namespace {
            name: BENCH_NS.into(),
            labels: labels(&[("team", "bench"), ("kubernetes.io/metadata.name", BENCH_NS)]),
        }];
        let mut pods = vec![
            Pod {
                namespace: BENCH_NS.into(),
                name: "client".into(),
                node: "node-1".into(),
                ip: Ipv4Addr::new(10, 244, 1, 10),
                labels: labels(&[("app", "client")]),
            },
            Pod {
                namespace: BENCH_NS.into(),
                name: "server".into(),
                node: "node-2".into(),
                ip: Ipv4Addr::new(10, 244, 2, 10),
                labels: labels(&[("app", "server")]),
            },
        ];
        for k in 0..ns_count {
            let name = format!("ns-{k}");
            namespaces.push(Namespace {
                labels: labels(&[
                    ("team", &format!("t{}", k % 10)),
                    ("kubernetes.io/metadata.name", &name),
                ]),
                name,
            });
            for m in 0..nodes {
                pods.push(Pod {
                    namespace: format!("ns-{k}"),
                    name: format!("p-{m}"),
                    node: format!("node-{}", m + 1),
                    ip: background_ip(m, k),
                    labels: {
                        let mut l = labels(&[
                            ("app", &format!("a{}", m % 10)),
                            ("role", &format!("r{}", (m + k) % 20)),
                        ]);
                        if unique_labels {
                            l.insert("pod".into(), format!("ns-{k}.p-{m}"));
                        }
                        l
                    },
                });
            }
        }
        let mut rng = Rng::new(seed);
        let mut others = Vec::new();
        let n_measured = if with_measured && policies > 0 {
            MEASURED_POLICIES
        } else {
            0
        };
        for j in 0..policies - n_measured {
            let namespace = format!("ns-{}", j % ns_count as usize);
            let role = labels(&[("role", &format!("r{}", rng.below(20)))]);
            let peer = if rng.below(5) == 0 {
                Peer {
                    namespace_selector: Some(labels(&[("team", &format!("t{}", rng.below(10)))])),
                    pod_selector: role,
                }
            } else {
                Peer {
                    namespace_selector: None,
                    pod_selector: role,
                }
            };
            let ports = match rng.below(4) {
                0 => vec![80],
                1 => vec![443],
                2 => vec![8080, 8443],
                _ => vec![9090],
            };
            others.push(Policy {
                namespace,
                name: format!("np-{j}"),
                pod_selector: labels(&[("app", &format!("a{}", rng.below(2)))]),
                direction: if rng.below(2) == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                peers: vec![peer],
                ports,
                measured: false,
            });
        }
        let mut measured = Vec::new();
        if n_measured > 0 {
            for t in 0..4 {
                for direction in [Direction::Ingress, Direction::Egress] {
                    let (me, other, dir, role) = match direction {
                        Direction::Ingress => ("server", "client", "in", t),
                        Direction::Egress => ("client", "server", "eg", t + 4),
                    };
                    let mut peers = vec![Peer {
                        namespace_selector: Some(Labels::new()),
                        pod_selector: labels(&[("role", &format!("r{role}"))]),
                    }];
                    if t == 3 {
                        peers.push(Peer {
                            namespace_selector: None,
                            pod_selector: labels(&[("app", other)]),
                        });
                    }
                    measured.push(Policy {
                        namespace: BENCH_NS.into(),
                        name: format!("{me}-{dir}-{t}"),
                        pod_selector: labels(&[("app", me)]),
                        direction,
                        peers,
                        ports: MEASURED_PORTS.to_vec(),
                        measured: true,
                    });
                }
            }
        }
        // Spread the measured policies evenly through the creation order.
        let mut ordered = Vec::with_capacity(policies);
        let gap = others.len() / (measured.len() + 1).max(1);
        let mut others_iter = others.into_iter();
        for m in measured {
            ordered.extend(others_iter.by_ref().take(gap));
            ordered.push(m);
        }
        ordered.extend(others_iter);
        Ok(Cluster {
            nodes,
            namespaces,
            pods,
            policies: ordered,
            cluster_policies: Vec::new(),
        })
    }

    /// Adds `n` ClusterNetworkPolicies of an administrator's kind, alternately Admin and Baseline,
    /// priorities spread over 0..1000. Policy `i` selects the namespaces of team `t<i mod 10>`, or
    /// every namespace (the measured pods' included) when `i mod 10` is 0 or 5: so 1 in 5 of them
    /// (half Admin, half Baseline) are evaluated for the measured pods. Ingress: Deny TCP 22 from
    /// another team, Pass from one role of a third; egress: Accept DNS to 10.96.0.0/12, Deny the
    /// kubelet port of every node. None matches the measured traffic (TCP 5201/7000/7001 between
    /// the two bench pods), so their cost is what a connection pays to be evaluated by them and
    /// then decided by the NetworkPolicies.
    pub fn with_cluster_policies(mut self, n: usize) -> Cluster {
        self.cluster_policies = (0..n)
            .map(|i| {
                let team = |k: usize| json!({"matchLabels": {"team": format!("t{}", k % 10)}});
                let subject = if i % 10 == 0 || i % 10 == 5 {
                    json!({"namespaces": {}})
                } else {
                    json!({"namespaces": team(i)})
                };
                json!({
                    "apiVersion": "policy.networking.k8s.io/v1alpha2",
                    "kind": "ClusterNetworkPolicy",
                    "metadata": {"name": format!("cnp-{i}")},
                    "spec": {
                        "tier": if i % 2 == 0 { "Admin" } else { "Baseline" },
                        "priority": (i * 7) % 1000,
                        "subject": subject,
                        "ingress": [
                            {"name": "no-ssh", "action": "Deny", "from": [{"namespaces": team(i + 3)}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 22}}}]},
                            {"name": "pass-role", "action": "Pass",
                             "from": [{"pods": {"namespaceSelector": team(i + 5),
                                                "podSelector": {"matchLabels": {"role": format!("r{}", i % 20)}}}}]}
                        ],
                        "egress": [
                            {"name": "dns", "action": "Accept", "to": [{"networks": ["10.96.0.0/12"]}],
                             "protocols": [{"udp": {"destinationPort": {"number": 53}}}]},
                            {"name": "no-kubelet", "action": "Deny", "to": [{"nodes": {}}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]}
                        ]
                    }
                })
            })
            .collect();
        self
    }

    /// Indices of the pods of each namespace.
    fn pods_by_namespace(&self) -> BTreeMap<&str, Vec<usize>> {
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.pods.iter().enumerate() {
            by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
        by_ns
    }

    /// Pods a policy selects.
    pub fn selected<'a>(&'a self, policy: &'a Policy) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| {
            p.namespace == policy.namespace && matches(&policy.pod_selector, &p.labels)
        })
    }

    /// Peer IPs of a policy's rule (union over its peers), sorted and deduplicated.
    fn peer_ips_indexed(
        &self,
        policy: &Policy,
        by_ns: &BTreeMap<&str, Vec<usize>>,
    ) -> Vec<Ipv4Addr> {
        let mut ips = Vec::new();
        for peer in &policy.peers {
            let namespaces: Vec<&str> = match &peer.namespace_selector {
                None => vec![policy.namespace.as_str()],
                Some(sel) => self
                    .namespaces
                    .iter()
                    .filter(|n| matches(sel, &n.labels))
                    .map(|n| n.name.as_str())
                    .collect(),
            };
            for ns in namespaces {
                for &i in by_ns.get(ns).map(Vec::as_slice).unwrap_or_default() {
                    if matches(&peer.pod_selector, &self.pods[i].labels) {
                        ips.push(self.pods[i].ip);
                    }
                }
            }
        }
        ips.sort();
        ips.dedup();
        ips
    }

    /// Peer IPs of a policy's rule (union over its peers), sorted and deduplicated.
    pub fn peer_ips(&self, policy: &Policy) -> Vec<Ipv4Addr> {
        self.peer_ips_indexed(policy, &self.pods_by_namespace())
    }

    /// What one node must enforce: its local pods and the policies selecting any of them.
    pub fn node_view(&self, node: &str) -> NodeView {
        let by_ns = self.pods_by_namespace();
        let mut local_pods: Vec<LocalPod> = self
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| LocalPod {
                key: p.key(),
                ip: p.ip,
            })
            .collect();
        // Dispatch order in the iptables model: kube-router iterates a Go map, so order by a hash.
        local_pods.sort_by_key(|p| fnv1a(&p.key));
        let mut policies = Vec::new();
        for (index, policy) in self.policies.iter().enumerate() {
            let selected: Vec<Ipv4Addr> = by_ns
                .get(policy.namespace.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|&i| &self.pods[i])
                .filter(|p| p.node == node && matches(&policy.pod_selector, &p.labels))
                .map(|p| p.ip)
                .collect();
            if selected.is_empty() {
                continue;
            }
            policies.push(PolicyView {
                index,
                key: policy.key(),
                direction: policy.direction,
                selected,
                peers: self.peer_ips_indexed(policy, &by_ns),
                ports: policy.ports.clone(),
            });
        }
        NodeView {
            node: node.to_string(),
            local_pods,
            policies,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalPod {
    pub key: String,
    pub ip: Ipv4Addr,
}

/// A policy as one node sees it: the local pods it selects and the peer IPs of its rule.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// Position in the cluster's creation order.
    pub index: usize,
    pub key: String,
    pub direction: Direction,
    pub selected: Vec<Ipv4Addr>,
    pub peers: Vec<Ipv4Addr>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: String,
    /// In the iptables model's dispatch order.
    pub local_pods: Vec<LocalPod>,
    /// In creation order.
    pub policies: Vec<PolicyView>,
}

impl NodeView {
    /// Policies selecting `ip` in `direction`, in creation order.
    pub fn policies_of(
        &self,
        ip: Ipv4Addr,
        direction: Direction,
    ) -> impl Iterator<Item = &PolicyView> {
        self.policies
            .iter()
            .filter(move |p| p.direction == direction && p.selected.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_pods_get_four_policies_each_and_only_the_last_admits_the_other_pod() {
        let cluster = Cluster::generate(100, 1).unwrap();
        assert_eq!(cluster.policies.len(), 100);
        let view = cluster.node_view("node-2");
        let server: Ipv4Addr = "10.244.2.10".parse().unwrap();
        let client: Ipv4Addr = "10.244.1.10".parse().unwrap();
        let mine: Vec<_> = view.policies_of(server, Direction::Ingress).collect();
        assert_eq!(mine.len(), 4);
        let admitting: Vec<_> = mine.iter().filter(|p| p.peers.contains(&client)).collect();
        assert_eq!(admitting.len(), 1);
        assert!(mine.iter().all(|p| p.peers.len() >= 500));
    }

    #[test]
    fn every_policy_is_loaded_on_one_lab_node() {
        let cluster = Cluster::generate(1000, 3).unwrap();
        let n1 = cluster.node_view("node-1").policies.len();
        let n2 = cluster.node_view("node-2").policies.len();
        assert_eq!(n1 + n2, 1000);
        assert!(n1 > 400 && n2 > 400, "{n1} {n2}");
    }

    #[test]
    fn enforcement_shape_scales_pods_and_selects_no_measured_pod() {
        let cluster = Cluster::generate_shape(Shape::for_pods(1000, 100), 1).unwrap();
        assert_eq!(cluster.pods.len(), 1000 + 2);
        assert_eq!(cluster.policies.len(), 100);
        assert!(cluster.policies.iter().all(|p| !p.measured));
    }

    #[test]
    fn background_addresses_are_unique_up_to_100k_pods() {
        let mut seen = std::collections::HashSet::new();
        for m in 0..NODES {
            for k in 0..MAX_NAMESPACES {
                assert!(seen.insert(background_ip(m, k)), "node {m} namespace {k}");
            }
        }
        assert!(
            !seen.contains(&Ipv4Addr::new(10, 244, 1, 10))
                && !seen.contains(&Ipv4Addr::new(10, 244, 2, 10))
        );
    }

    #[test]
    fn a_thousand_nodes_of_a_hundred_pods_have_unique_addresses_in_their_nodes_pod_ranges() {
        let cluster = Cluster::generate_shape(Shape::for_pods_on(100_000, 10, 1000), 1).unwrap();
        assert_eq!(cluster.nodes, 1000);
        assert_eq!(cluster.pods.len(), 100_000 + 2);
        let mut seen = std::collections::HashSet::new();
        for p in &cluster.pods {
            assert!(seen.insert(p.ip), "{} {}", p.key(), p.ip);
            let n: u32 = p.node.trim_start_matches("node-").parse().unwrap();
            let [a, b, c] = node_pod_net(n);
            assert_eq!(&p.ip.octets()[..3], &[a, b, c], "{} on {}", p.key(), p.node);
        }
        assert_eq!(
            cluster.pods.iter().filter(|p| p.node == "node-2").count(),
            100 + 1
        );
        assert!(Cluster::generate_shape(Shape::for_pods_on(100_000, 10, 200), 1).is_err());
    }

    #[test]
    fn too_few_policies_is_an_error() {
        assert!(Cluster::generate(3, 1).is_err());
        assert_eq!(Cluster::generate(0, 1).unwrap().policies.len(), 0);
    }
}
