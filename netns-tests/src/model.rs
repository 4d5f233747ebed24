//! The pod populations the conformance cases run on: which namespaces, pods, labels and ports a
//! lab holds, and which ports its matrix probes. A case names its model (`model:`); a lab holds one.
//!
//! - `3x3` (the default): the upstream NetworkPolicy e2e model. Namespaces x, y, z; pods a, b, c
//!   with label `pod=<name>`; TCP and UDP 80 and 81.
//! - `network-policy-api`: the model of the network-policy-api conformance suite
//!   (`conformance/base/manifests.yaml` upstream): namespaces `network-policy-conformance-<house>`
//!   labelled `conformance-house: <house>`, two pods each (the StatefulSets' `<name>-0`, `<name>-1`)
//!   with the same label; TCP 80 (named `web`), TCP 8080, UDP 53 (named `dns`), UDP 5353. Left out:
//!   the SCTP ports (this kernel has no SCTP) and the hostNetwork `centaur` pods of the
//!   forbidden-forrest namespace (the namespace is there).
//! - `network-policy-api-nodes`: the same, and the suite's two hostNetwork `centaur` pods of
//!   forbidden-forrest (one per node: a process in the node's namespace, with its addresses), every
//!   pod serving the suite's host-network ports 34345/TCP, 34346/TCP, 34347/UDP and 34349/UDP (its
//!   `HostNetworkPorts` 0, 1, 2, 4; the others are HTTP side ports and SCTP): for the node-peer tests.

use crate::error::{LabError, Result};
use crate::probe::Protocol;
use serde_json::{json, Value};

/// A model a lab can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    ThreeByThree,
    NetworkPolicyApi,
    NetworkPolicyApiNodes,
}

/// The 3x3 model's ports.
const THREE_BY_THREE_PORTS: [(u16, Protocol); 4] = [
    (80, Protocol::Tcp),
    (81, Protocol::Tcp),
    (80, Protocol::Udp),
    (81, Protocol::Udp),
];

/// The network-policy-api model's ports, and their names in the pod spec.
const NPA_PORTS: [(u16, Protocol, &str); 4] = [
    (80, Protocol::Tcp, "web"),
    (8080, Protocol::Tcp, "tcp-8080"),
    (53, Protocol::Udp, "dns"),
    (5353, Protocol::Udp, "udp-5353"),
];
const NPA_PORTS_PROBED: [(u16, Protocol); 4] = unnamed(NPA_PORTS);

/// The node-peer model's ports (the suite's `HostNetworkPorts` 0, 1, 2 and 4) and their names.
const NPA_NODE_PORTS: [(u16, Protocol, &str); 4] = [
    (34345, Protocol::Tcp, "web-34345"),
    (34346, Protocol::Tcp, "web-34346"),
    (34347, Protocol::Udp, "dns-34347"),
    (34349, Protocol::Udp, "dns-34349"),
];
const NPA_NODE_PORTS_PROBED: [(u16, Protocol); 4] = unnamed(NPA_NODE_PORTS);

/// The (port, protocol) pairs of a named port list: what the matrix probes.
const fn unnamed<const N: usize>(named: [(u16, Protocol, &str); N]) -> [(u16, Protocol); N] {
    let mut out = [(0, Protocol::Tcp); N];
    let mut i = 0;
    while i < N {
        out[i] = (named[i].0, named[i].1);
        i += 1;
    }
    out
}

/// (house, StatefulSet name) of the network-policy-api model; `forbidden-forrest` has no pods here.
const NPA_HOUSES: [(&str, Option<&str>); 5] = [
    ("gryffindor", Some("harry-potter")),
    ("slytherin", Some("draco-malfoy")),
    ("hufflepuff", Some("cedric-diggory")),
    ("ravenclaw", Some("luna-lovegood")),
    ("forbidden-forrest", None),
];

impl Model {
    /// The model a case names (`None`: the 3x3).
    pub fn named(name: Option<&str>) -> Result<Model> {
        match name {
            None | Some("3x3") => Ok(Model::ThreeByThree),
            Some("network-policy-api") => Ok(Model::NetworkPolicyApi),
            Some("network-policy-api-nodes") => Ok(Model::NetworkPolicyApiNodes),
            Some(other) => Err(LabError::Invalid(format!(
                "unknown model {other:?}: expected 3x3, network-policy-api or network-policy-api-nodes"
            ))),
        }
    }

    /// What its matrix probes on every pod.
    pub fn ports(self) -> &'static [(u16, Protocol)] {
        match self {
            Model::ThreeByThree => &THREE_BY_THREE_PORTS,
            Model::NetworkPolicyApi => &NPA_PORTS_PROBED,
            Model::NetworkPolicyApiNodes => &NPA_NODE_PORTS_PROBED,
        }
    }

    /// Its name in a case's `model:`.
    pub fn name(self) -> &'static str {
        match self {
            Model::ThreeByThree => "3x3",
            Model::NetworkPolicyApi => "network-policy-api",
            Model::NetworkPolicyApiNodes => "network-policy-api-nodes",
        }
    }

    /// Its pods as `namespace/name`.
    pub fn pods(self) -> Vec<String> {
        self.pod_specs()
            .into_iter()
            .map(|(ns, name, _)| format!("{ns}/{name}"))
            .collect()
    }

    /// (namespace, pod, value of its one label).
    fn pod_specs(self) -> Vec<(String, String, String)> {
        match self {
            Model::ThreeByThree => crate::cases::MODEL_NAMESPACES
                .iter()
                .flat_map(|ns| {
                    crate::cases::MODEL_PODS
                        .iter()
                        .map(move |p| (ns.to_string(), p.to_string(), p.to_string()))
                })
                .collect(),
            Model::NetworkPolicyApiNodes => {
                let mut pods = Model::NetworkPolicyApi.pod_specs();
                pods.extend((0..2).map(|i| {
                    (
                        "network-policy-conformance-forbidden-forrest".to_string(),
                        format!("centaur-{i}"),
                        "forbidden-forrest".to_string(),
                    )
                }));
                pods
            }
            Model::NetworkPolicyApi => NPA_HOUSES
                .iter()
                .filter_map(|(house, set)| set.map(|s| (house, s)))
                .flat_map(|(house, set)| {
                    (0..2).map(move |i| {
                        (
                            format!("network-policy-conformance-{house}"),
                            format!("{set}-{i}"),
                            house.to_string(),
                        )
                    })
                })
                .collect(),
        }
    }

    /// Its namespaces and pods as API objects, pods spread over `nodes` round-robin.
    pub fn objects(self, nodes: &[String]) -> Vec<Value> {
        let mut out = Vec::new();
        match self {
            Model::ThreeByThree => {
                for ns in crate::cases::MODEL_NAMESPACES {
                    out.push(
                        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                    );
                }
            }
            Model::NetworkPolicyApi | Model::NetworkPolicyApiNodes => {
                for (house, _) in NPA_HOUSES {
                    out.push(
                        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                        "name": format!("network-policy-conformance-{house}"),
                        "labels": {"conformance-house": house}}}),
                    );
                }
            }
        }
        for (i, (ns, name, label)) in self.pod_specs().into_iter().enumerate() {
            // The centaurs are the suite's hostNetwork StatefulSet: one per node.
            let centaur = name
                .strip_prefix("centaur-")
                .and_then(|n| n.parse::<usize>().ok());
            let at = centaur.unwrap_or(i);
            let node = nodes
                .get(at % nodes.len().max(1))
                .cloned()
                .unwrap_or_default();
            let (key, containers): (&str, Vec<Value>) = match self {
                Model::ThreeByThree => (
                    "pod",
                    THREE_BY_THREE_PORTS
                        .iter()
                        .map(|(port, proto)| {
                            container(*port, *proto, &format!("serve-{port}-{}", proto.as_str()))
                        })
                        .collect(),
                ),
                Model::NetworkPolicyApi => (
                    "conformance-house",
                    NPA_PORTS
                        .iter()
                        .map(|(port, proto, pname)| container(*port, *proto, pname))
                        .collect(),
                ),
                Model::NetworkPolicyApiNodes => (
                    "conformance-house",
                    NPA_NODE_PORTS
                        .iter()
                        .map(|(port, proto, pname)| container(*port, *proto, pname))
                        .collect(),
                ),
            };
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {key: label}},
                "spec": {"nodeName": node, "containers": containers}});
            if centaur.is_some() {
                pod["spec"]["hostNetwork"] = json!(true);
            }
            out.push(pod);
        }
        out
    }
}

fn container(port: u16, proto: Protocol, name: &str) -> Value {
    json!({"name": format!("cont-{port}-{}", proto.as_str()),
        "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
        "ports": [{"name": name, "containerPort": port, "protocol": proto.to_string()}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_policy_api_model_has_eight_pods_with_house_labels_and_named_ports() {
        let objs = Model::NetworkPolicyApi.objects(&["n1".into(), "n2".into()]);
        let pods: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "Pod").collect();
        assert_eq!(pods.len(), 8);
        assert_eq!(objs.iter().filter(|o| o["kind"] == "Namespace").count(), 5);
        let harry = pods
            .iter()
            .find(|p| p["metadata"]["name"] == "harry-potter-1")
            .unwrap();
        assert_eq!(
            harry["metadata"]["namespace"],
            "network-policy-conformance-gryffindor"
        );
        assert_eq!(
            harry["metadata"]["labels"]["conformance-house"],
            "gryffindor"
        );
        assert_eq!(harry["spec"]["nodeName"], "n2");
        let names: Vec<&str> = harry["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["ports"][0]["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"web") && names.contains(&"dns"),
            "{names:?}"
        );
        assert_eq!(Model::NetworkPolicyApi.pods().len(), 8);
    }

    #[test]
    fn the_node_peer_model_adds_one_host_network_centaur_per_node() {
        let objs = Model::NetworkPolicyApiNodes.objects(&["n1".into(), "n2".into()]);
        let pods: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "Pod").collect();
        assert_eq!(pods.len(), 10);
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            let c = pods
                .iter()
                .find(|p| p["metadata"]["name"] == format!("centaur-{i}"))
                .unwrap();
            assert_eq!(c["spec"]["hostNetwork"], true);
            assert_eq!(c["spec"]["nodeName"], *node);
        }
        assert_eq!(
            pods.iter()
                .filter(|p| p["spec"]["hostNetwork"] == true)
                .count(),
            2
        );
    }

    #[test]
    fn the_3x3_model_is_what_the_cases_always_ran_on() {
        let objs = Model::ThreeByThree.objects(&["n1".into()]);
        assert_eq!(objs.iter().filter(|o| o["kind"] == "Pod").count(), 9);
        assert_eq!(Model::ThreeByThree.ports(), &crate::cases::MODEL_PORTS);
        assert!(Model::named(Some("nope")).is_err());
    }
}
