//! Conversion of k8s-openapi objects into the trimmed model, with the API server's validation.
//!
//! Every error names the object (kind and namespace/name) and the field, so the agent can log it
//! and skip that object without disturbing others (semantics 42).

use super::{
    ContainerPort, LabelSelector, Labels, Namespace, Node, Peer, Pod, PodPhase, PodUid, Policy,
    PortMatch, PortSpec, Protocol, Requirement, Rule,
};
use crate::error::ModelError;
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeSet;
use std::net::IpAddr;

const KIND_POD: &str = "Pod";
const KIND_NAMESPACE: &str = "Namespace";
const KIND_POLICY: &str = "NetworkPolicy";
const KIND_NODE: &str = "Node";

fn object_key(
    kind: &'static str,
    m: &meta::ObjectMeta,
    namespaced: bool,
) -> Result<String, ModelError> {
    let name = m
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ModelError::new(kind, "<unnamed>", "metadata.name", "missing"))?;
    if !namespaced {
        return Ok(name);
    }
    let ns = m
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ModelError::new(kind, &name, "metadata.namespace", "missing"))?;
    Ok(format!("{ns}/{name}"))
}

fn parse_ip(kind: &'static str, key: &str, field: &str, s: &str) -> Result<IpAddr, ModelError> {
    s.trim()
        .parse::<IpAddr>()
        .map_err(|e| ModelError::new(kind, key, field, format!("{s:?} is not an IP address: {e}")))
}

/// An object's labels, copied out of its metadata.
fn labels_of(labels: &Option<std::collections::BTreeMap<String, String>>) -> Labels {
    labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Converts a Namespace; `kubernetes.io/metadata.name` is added when missing.
pub fn namespace_from_k8s(ns: &core::Namespace) -> Result<Namespace, ModelError> {
    let name = object_key(KIND_NAMESPACE, &ns.metadata, false)?;
    let labels: Labels = labels_of(&ns.metadata.labels);
    Ok(Namespace::new(name, labels))
}

/// Converts a Node: pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`) and InternalIP addresses.
pub fn node_from_k8s(node: &core::Node) -> Result<Node, ModelError> {
    let name = object_key(KIND_NODE, &node.metadata, false)?;
    let spec = node.spec.clone().unwrap_or_default();
    let mut cidr_strings = spec.pod_cidrs.unwrap_or_default();
    if cidr_strings.is_empty() {
        cidr_strings.extend(spec.pod_cidr);
    }
    let mut pod_cidrs = Vec::new();
    for (i, c) in cidr_strings.iter().enumerate() {
        let net: IpNet = c.parse().map_err(|e| {
            ModelError::new(
                KIND_NODE,
                &name,
                format!("spec.podCIDRs[{i}]"),
                format!("{c:?}: {e}"),
            )
        })?;
        pod_cidrs.push(net.trunc());
    }
    let mut internal_ips = Vec::new();
    let mut addresses = Vec::new();
    for (i, a) in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("status.addresses[{i}]");
        match a.type_.as_str() {
            "InternalIP" | "ExternalIP" => {
                let ip = parse_ip(KIND_NODE, &name, &field, &a.address)?;
                if a.type_ == "InternalIP" {
                    internal_ips.push(ip);
                }
                addresses.push(ip);
            }
            // Hostname, InternalDNS, ExternalDNS: an address only when it is one.
            _ => addresses.extend(a.address.trim().parse::<IpAddr>().ok()),
        }
    }
    addresses.sort();
    addresses.dedup();
    Ok(Node {
        name,
        pod_cidrs,
        internal_ips,
        labels: labels_of(&node.metadata.labels),
        addresses,
    })
}

/// Converts a Pod: labels, node, IPs, declared container ports, hostNetwork, phase.
pub fn pod_from_k8s(pod: &core::Pod) -> Result<Pod, ModelError> {
    let key = object_key(KIND_POD, &pod.metadata, true)?;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    // Borrowed, not cloned: a Pod's spec is most of its size, and a source may convert thousands of
    // (mostly unchanged) pods a second.
    let no_spec = core::PodSpec::default();
    let no_status = core::PodStatus::default();
    let spec = pod.spec.as_ref().unwrap_or(&no_spec);
    let status = pod.status.as_ref().unwrap_or(&no_status);
    let mut ips = Vec::new();
    match &status.pod_ips {
        Some(list) if !list.is_empty() => {
            for (i, p) in list.iter().enumerate() {
                ips.push(parse_ip(
                    KIND_POD,
                    &key,
                    &format!("status.podIPs[{i}]"),
                    &p.ip,
                )?);
            }
        }
        _ => {
            if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                ips.push(parse_ip(KIND_POD, &key, "status.podIP", ip)?);
            }
        }
    }
    let mut ports = Vec::new();
    let containers = spec
        .containers
        .iter()
        .map(|c| ("spec.containers", c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| ("spec.initContainers", c)),
        );
    for (ci, (field, c)) in containers.enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let f = format!("{field}[{ci}].ports[{pi}]");
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ModelError::new(
                        KIND_POD,
                        &key,
                        format!("{f}.containerPort"),
                        format!("{} is not in 1-65535", p.container_port),
                    )
                })?;
            let protocol = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => Protocol::from_api(s).ok_or_else(|| {
                    ModelError::new(
                        KIND_POD,
                        &key,
                        format!("{f}.protocol"),
                        format!("unknown protocol {s:?}"),
                    )
                })?,
            };
            ports.push(ContainerPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol,
            });
        }
    }
    ports.sort();
    ports.dedup();
    // Kept for the pod's life as boxed slices: exactly as long as they are (a pushed-to Vec holds
    // four addresses, 68 bytes, for one or two: ~5 MB at 100k pods).
    Ok(Pod {
        namespace: namespace.into(),
        name: name.into(),
        uid: PodUid::of(pod.metadata.uid.as_deref().unwrap_or_default()),
        labels: labels_of(&pod.metadata.labels),
        node_name: spec
            .node_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(Into::into),
        ips: ips.into(),
        ports: ports.into(),
        host_network: spec.host_network.unwrap_or(false),
        phase: PodPhase::from_api(status.phase.as_deref()),
    })
}

/// Converts and validates a NetworkPolicy exactly as the API server would; policyTypes are
/// defaulted from the raw object (semantics 3). An empty list is defaulted like an omitted one, as
/// the API server's `SetDefaults_NetworkPolicySpec` does (`len(policyTypes) == 0`): objects from a
/// manifest directory are never defaulted by an API server, and `policyTypes: []` isolated nothing.
pub fn policy_from_k8s(np: &net::NetworkPolicy) -> Result<Policy, ModelError> {
    let key = object_key(KIND_POLICY, &np.metadata, true)?;
    let v = Validator {
        kind: KIND_POLICY,
        key: &key,
    };
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        Some(s) => v.selector(s, "spec.podSelector")?,
        None => LabelSelector::everything(),
    };
    let egress_nonempty = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (want_in, want_eg) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, egress_nonempty),
        Some(types) => {
            if types.len() > 2 {
                return Err(v.err("spec.policyTypes", "may list at most 2 types"));
            }
            let mut seen = BTreeSet::new();
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    return Err(v.err(
                        format!("spec.policyTypes[{i}]"),
                        format!("unsupported value {t:?} (Ingress, Egress)"),
                    ));
                }
                if !seen.insert(t.as_str()) {
                    return Err(v.err(format!("spec.policyTypes[{i}]"), format!("duplicate {t:?}")));
                }
            }
            (seen.contains("Ingress"), seen.contains("Egress"))
        }
    };
    // Validate every rule even of a direction that is not listed: the API server does too.
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(v.rule(
            r.from.as_deref(),
            r.ports.as_deref(),
            &format!("spec.ingress[{i}]"),
            "from",
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(v.rule(
            r.to.as_deref(),
            r.ports.as_deref(),
            &format!("spec.egress[{i}]"),
            "to",
        )?);
    }
    let audit = match np
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::AUDIT_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(v.err(
                format!("metadata.annotations[{}]", super::AUDIT_ANNOTATION),
                format!("{other:?} is neither \"true\" nor \"false\""),
            ))
        }
    };
    Ok(Policy {
        namespace: np.metadata.namespace.clone().unwrap_or_default(),
        name: np.metadata.name.clone().unwrap_or_default(),
        pod_selector,
        ingress: want_in.then_some(ingress),
        egress: want_eg.then_some(egress),
        audit,
    })
}

/// Validation of one object's fields, with errors naming it.
struct Validator<'a> {
    kind: &'static str,
    key: &'a str,
}

impl Validator<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ModelError {
        ModelError::new(self.kind, self.key, field, reason)
    }

    fn selector(&self, s: &meta::LabelSelector, field: &str) -> Result<LabelSelector, ModelError> {
        let mut out = LabelSelector {
            match_labels: s.match_labels.clone().unwrap_or_default().into(),
            expressions: Vec::new(),
        };
        for (k, v) in &out.match_labels {
            if let Err(why) = validate_label_key(k) {
                return Err(self.err(format!("{field}.matchLabels"), format!("key {k:?}: {why}")));
            }
            if let Err(why) = validate_label_value(v) {
                return Err(self.err(
                    format!("{field}.matchLabels"),
                    format!("value {v:?} of {k:?}: {why}"),
                ));
            }
        }
        for (i, r) in s.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            if let Err(why) = validate_label_key(&r.key) {
                return Err(self.err(format!("{f}.key"), format!("{:?}: {why}", r.key)));
            }
            let values: BTreeSet<String> = r.values.iter().flatten().cloned().collect();
            for v in &values {
                if let Err(why) = validate_label_value(v) {
                    return Err(self.err(format!("{f}.values"), format!("{v:?}: {why}")));
                }
            }
            let key = r.key.clone();
            let req = match r.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err(self.err(
                            format!("{f}.values"),
                            format!("must be specified when operator is {}", r.operator),
                        ));
                    }
                    let values = values.into();
                    if r.operator == "In" {
                        Requirement::In { key, values }
                    } else {
                        Requirement::NotIn { key, values }
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(self.err(
                            format!("{f}.values"),
                            format!("may not be specified when operator is {}", r.operator),
                        ));
                    }
                    if r.operator == "Exists" {
                        Requirement::Exists { key }
                    } else {
                        Requirement::DoesNotExist { key }
                    }
                }
                other => {
                    return Err(self.err(
                        format!("{f}.operator"),
                        format!("not a valid selector operator: {other:?}"),
                    ))
                }
            };
            out.expressions.push(req);
        }
        Ok(out)
    }

    fn rule(
        &self,
        peers: Option<&[net::NetworkPolicyPeer]>,
        ports: Option<&[net::NetworkPolicyPort]>,
        field: &str,
        peer_field: &str,
    ) -> Result<Rule, ModelError> {
        let mut rule = Rule::default();
        for (i, p) in ports.into_iter().flatten().enumerate() {
            rule.ports
                .push(self.port(p, &format!("{field}.ports[{i}]"))?);
        }
        for (i, p) in peers.into_iter().flatten().enumerate() {
            rule.peers
                .push(self.peer(p, &format!("{field}.{peer_field}[{i}]"))?);
        }
        Ok(rule)
    }

    /// A CIDR (host bits are cleared, as for ipBlocks: semantics 26).
    fn cidr(&self, s: &str, field: &str) -> Result<IpNet, ModelError> {
        let net: IpNet = s
            .trim()
            .parse()
            .map_err(|e| self.err(field, format!("{s:?} is not a valid CIDR: {e}")))?;
        Ok(net.trunc())
    }

    fn port(&self, p: &net::NetworkPolicyPort, field: &str) -> Result<PortSpec, ModelError> {
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp, // semantics 30
            Some(s) => Protocol::from_api(s).ok_or_else(|| {
                self.err(
                    format!("{field}.protocol"),
                    format!("unsupported value {s:?} (TCP, UDP, SCTP)"),
                )
            })?,
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortMatch::All,
            (None, Some(_)) => {
                return Err(self.err(
                    format!("{field}.endPort"),
                    "may not be specified when `port` is not specified",
                ))
            }
            (Some(IntOrString::Int(n)), end) => {
                let start = valid_port(*n).ok_or_else(|| {
                    self.err(
                        format!("{field}.port"),
                        format!("{n} must be between 1 and 65535, inclusive"),
                    )
                })?;
                let end = match end {
                    None => start,
                    Some(e) => {
                        let e16 = valid_port(e).ok_or_else(|| {
                            self.err(
                                format!("{field}.endPort"),
                                format!("{e} must be between 1 and 65535, inclusive"),
                            )
                        })?;
                        if e16 < start {
                            return Err(self.err(
                                format!("{field}.endPort"),
                                "must be greater than or equal to `port`",
                            ));
                        }
                        e16
                    }
                };
                PortMatch::Range(start, end)
            }
            (Some(IntOrString::String(s)), end) => {
                if end.is_some() {
                    return Err(self.err(
                        format!("{field}.endPort"),
                        "may not be specified when `port` is non-numeric",
                    ));
                }
                // The API accepts a numeric string only as a name check failure; mirror it.
                if let Err(why) = validate_port_name(s) {
                    return Err(self.err(format!("{field}.port"), format!("{s:?}: {why}")));
                }
                PortMatch::Named(s.clone())
            }
        };
        Ok(PortSpec { protocol, port })
    }

    fn peer(&self, p: &net::NetworkPolicyPeer, field: &str) -> Result<Peer, ModelError> {
        let has_selector = p.pod_selector.is_some() || p.namespace_selector.is_some();
        match (&p.ip_block, has_selector) {
            (None, false) => Err(self.err(
                field,
                "must specify a peer (podSelector, namespaceSelector or ipBlock)",
            )),
            (Some(_), true) => Err(self.err(
                field,
                "may not specify more than 1 peer type (ipBlock with selectors)",
            )),
            (None, true) => Ok(Peer::Pods {
                namespace_selector: p
                    .namespace_selector
                    .as_ref()
                    .map(|s| self.selector(s, &format!("{field}.namespaceSelector")))
                    .transpose()?,
                pod_selector: p
                    .pod_selector
                    .as_ref()
                    .map(|s| self.selector(s, &format!("{field}.podSelector")))
                    .transpose()?,
            }),
            (Some(b), false) => {
                let f = format!("{field}.ipBlock");
                if b.cidr.is_empty() {
                    return Err(self.err(format!("{f}.cidr"), "required"));
                }
                let cidr = self.cidr(&b.cidr, &format!("{f}.cidr"))?; // semantics 26
                let mut except = Vec::new();
                for (i, e) in b.except.iter().flatten().enumerate() {
                    let ef = format!("{f}.except[{i}]");
                    let ex = self.cidr(e, &ef)?;
                    // Strict subset (semantics 23).
                    if !cidr.contains(&ex) || ex.prefix_len() <= cidr.prefix_len() {
                        return Err(self.err(
                            &ef,
                            format!("{e:?} must be a strict subset of `cidr` {:?}", b.cidr),
                        ));
                    }
                    except.push(ex);
                }
                Ok(Peer::IpBlock { cidr, except })
            }
        }
    }
}

const LABEL_NAME_MAX: usize = 63;
const DNS_SUBDOMAIN_MAX: usize = 253;

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters (empty allowed for values).
fn validate_label_value(v: &str) -> Result<(), &'static str> {
    if v.len() > LABEL_NAME_MAX {
        return Err("must be no more than 63 characters");
    }
    let ok_inner = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
    let bytes = v.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) => Ok(()),
        (Some(f), Some(l)) if f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric() && bytes.iter().all(|b| ok_inner(*b)) => Ok(()),
        _ => Err("must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric"),
    }
}

/// A qualified name: optional DNS-subdomain prefix and `/`, then a non-empty label name.
fn validate_label_key(k: &str) -> Result<(), &'static str> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if name.is_empty() {
        return Err("name part must not be empty");
    }
    validate_label_value(name)?;
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= DNS_SUBDOMAIN_MAX
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err("prefix part must be a lowercase DNS subdomain");
        }
    }
    Ok(())
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// IANA_SVC_NAME as the API server checks it: 1-15 chars of [a-z0-9-], at least one letter,
/// no leading/trailing or double hyphen.
fn validate_port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be no more than 15 characters and not empty");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only lowercase alphanumeric characters or '-'");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not begin or end with '-' nor contain '--'");
    }
    Ok(())
}

mod cluster;
pub use cluster::cluster_policy_from_api;

#[cfg(test)]
mod tests;
