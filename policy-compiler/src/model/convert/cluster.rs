//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): the conversion of the API object
//! (`model::cluster_api`) with the validation the upstream CRD's schema and CEL rules make the API
//! server do (an object a manifest directory hands us was never validated).

use super::{object_key, Validator};
use crate::error::ModelError;
use crate::model::cluster_api::{
    ClusterNetworkPolicyApi, NamespacedPod, PeerApi, PortApi, ProtocolApi, Subject, MAX_ITEMS,
    PRIORITY_MAX, RULE_NAME_MAX,
};
use crate::model::{
    Action, ClusterPolicy, ClusterRule, ClusterSubject, LabelSelector, Peer, PortMatch, PortSpec,
    Protocol, Rule, Tier,
};

const KIND: &str = "ClusterNetworkPolicy";

/// Converts and validates a ClusterNetworkPolicy. Refused (an error naming the field): what the
/// upstream CRD's validation refuses, and `domainNames` peers, which Palisade does not implement
/// yet (refusing the object is louder than ignoring the peer). A peer with no known field (a newer
/// CRD's) fails closed as the API says: an Accept rule matches nothing, a Deny or Pass rule becomes
/// a deny of everything.
pub fn cluster_policy_from_api(o: &ClusterNetworkPolicyApi) -> Result<ClusterPolicy, ModelError> {
    let name = object_key(KIND, &o.metadata, false)?;
    let v = Validator {
        kind: KIND,
        key: &name,
    };
    let spec = o.spec.as_ref().ok_or_else(|| v.err("spec", "required"))?;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(t) => {
            return Err(v.err(
                "spec.tier",
                format!("unsupported value {t:?} (Admin, Baseline)"),
            ))
        }
        None => return Err(v.err("spec.tier", "required")),
    };
    let priority = match spec.priority {
        Some(p) if (0..=PRIORITY_MAX).contains(&p) => p as u32,
        Some(p) => {
            return Err(v.err(
                "spec.priority",
                format!("{p} must be between 0 and {PRIORITY_MAX}, inclusive"),
            ))
        }
        None => return Err(v.err("spec.priority", "required")),
    };
    let subject = subject(&v, spec.subject.as_ref())?;
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("spec.ingress[{i}]");
            v.cluster_rule(
                &r.name,
                &r.action,
                r.from.as_deref(),
                &r.protocols,
                &f,
                false,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("spec.egress[{i}]");
            v.cluster_rule(&r.name, &r.action, r.to.as_deref(), &r.protocols, &f, true)
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (dir, n) in [("ingress", ingress.len()), ("egress", egress.len())] {
        if n > MAX_ITEMS {
            return Err(v.err(
                format!("spec.{dir}"),
                format!("{n} rules: at most {MAX_ITEMS}"),
            ));
        }
    }
    Ok(ClusterPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
    })
}

fn subject(v: &Validator, s: Option<&Subject>) -> Result<ClusterSubject, ModelError> {
    let s = s.ok_or_else(|| v.err("spec.subject", "required"))?;
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok(ClusterSubject::Namespaces(
            v.selector(ns, "spec.subject.namespaces")?,
        )),
        (None, Some(p)) => {
            let (namespace_selector, pod_selector) = v.namespaced_pod(p, "spec.subject.pods")?;
            Ok(ClusterSubject::Pods {
                namespace_selector,
                pod_selector,
            })
        }
        _ => Err(v.err(
            "spec.subject",
            "exactly one of `namespaces` and `pods` must be set",
        )),
    }
}

impl Validator<'_> {
    fn namespaced_pod(
        &self,
        p: &NamespacedPod,
        field: &str,
    ) -> Result<(LabelSelector, LabelSelector), ModelError> {
        let ns = match &p.namespace_selector {
            Some(s) => self.selector(s, &format!("{field}.namespaceSelector"))?,
            None => LabelSelector::everything(),
        };
        let pods = match &p.pod_selector {
            Some(s) => self.selector(s, &format!("{field}.podSelector"))?,
            None => return Err(self.err(format!("{field}.podSelector"), "required")),
        };
        Ok((ns, pods))
    }

    fn cluster_rule(
        &self,
        name: &Option<String>,
        action: &Option<String>,
        peers: Option<&[PeerApi]>,
        protocols: &Option<Vec<ProtocolApi>>,
        field: &str,
        egress: bool,
    ) -> Result<ClusterRule, ModelError> {
        let name = name.clone().filter(|n| !n.is_empty());
        if let Some(n) = &name {
            if n.chars().count() > RULE_NAME_MAX {
                return Err(self.err(
                    format!("{field}.name"),
                    format!("must be no more than {RULE_NAME_MAX} characters"),
                ));
            }
        }
        let action = match action.as_deref() {
            Some("Accept") => Action::Accept,
            Some("Deny") => Action::Deny,
            Some("Pass") => Action::Pass,
            Some(a) => {
                return Err(self.err(
                    format!("{field}.action"),
                    format!("unsupported value {a:?} (Accept, Deny, Pass)"),
                ))
            }
            None => return Err(self.err(format!("{field}.action"), "required")),
        };
        let peer_field = if egress { "to" } else { "from" };
        let peers = peers.unwrap_or_default();
        if peers.is_empty() || peers.len() > MAX_ITEMS {
            return Err(self.err(
                format!("{field}.{peer_field}"),
                format!("must list between 1 and {MAX_ITEMS} peers"),
            ));
        }
        let mut rule = Rule::default();
        let mut unknown = false;
        let mut addresses_only = false;
        for (i, p) in peers.iter().enumerate() {
            let f = format!("{field}.{peer_field}[{i}]");
            match self.cluster_peer(p, &f, egress)? {
                Some(list) => {
                    addresses_only |= list
                        .iter()
                        .any(|p| matches!(p, Peer::IpBlock { .. } | Peer::Nodes(_)));
                    rule.peers.extend(list);
                }
                None => unknown = true,
            }
        }
        if let Some(list) = protocols {
            if list.is_empty() || list.len() > MAX_ITEMS {
                return Err(self.err(
                    format!("{field}.protocols"),
                    format!("must list between 1 and {MAX_ITEMS} protocols"),
                ));
            }
            for (i, p) in list.iter().enumerate() {
                let f = format!("{field}.protocols[{i}]");
                if p.destination_named_port.is_some() && addresses_only {
                    return Err(self.err(
                        format!("{f}.destinationNamedPort"),
                        "networks/nodes peers cannot be set with named ports: they have none",
                    ));
                }
                rule.ports.extend(self.cluster_protocol(p, &f)?);
            }
        }
        if unknown {
            // Fail closed (the API's words): an Accept rule whose peers we cannot read matches
            // nothing it would not have matched anyway; a Deny or Pass rule denies everything.
            return Ok(match action {
                Action::Accept => {
                    let inert = rule.peers.is_empty();
                    ClusterRule {
                        name,
                        action,
                        rule,
                        inert,
                    }
                }
                Action::Deny | Action::Pass => ClusterRule {
                    name,
                    action: Action::Deny,
                    rule: Rule::default(),
                    inert: false,
                },
            });
        }
        Ok(ClusterRule {
            name,
            action,
            rule,
            inert: false,
        })
    }

    /// The model's peers for one API peer; `None`: no field we know is set.
    fn cluster_peer(
        &self,
        p: &PeerApi,
        field: &str,
        egress: bool,
    ) -> Result<Option<Vec<Peer>>, ModelError> {
        let set = [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.nodes.is_some(),
            p.networks.is_some(),
            p.domain_names.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count();
        if set > 1 {
            return Err(self.err(field, "exactly one peer type must be set"));
        }
        if !egress {
            for (what, is) in [
                ("nodes", p.nodes.is_some()),
                ("networks", p.networks.is_some()),
                ("domainNames", p.domain_names.is_some()),
            ] {
                if is {
                    return Err(self.err(
                        format!("{field}.{what}"),
                        "is an egress peer only (ingress peers: namespaces, pods)",
                    ));
                }
            }
        }
        if let Some(ns) = &p.namespaces {
            return Ok(Some(vec![Peer::Pods {
                namespace_selector: Some(self.selector(ns, &format!("{field}.namespaces"))?),
                pod_selector: None,
            }]));
        }
        if let Some(pods) = &p.pods {
            let (ns, pod) = self.namespaced_pod(pods, &format!("{field}.pods"))?;
            return Ok(Some(vec![Peer::Pods {
                namespace_selector: Some(ns),
                pod_selector: Some(pod),
            }]));
        }
        if let Some(nodes) = &p.nodes {
            return Ok(Some(vec![Peer::Nodes(
                self.selector(nodes, &format!("{field}.nodes"))?,
            )]));
        }
        if let Some(nets) = &p.networks {
            if nets.is_empty() || nets.len() > MAX_ITEMS {
                return Err(self.err(
                    format!("{field}.networks"),
                    format!("must list between 1 and {MAX_ITEMS} CIDRs"),
                ));
            }
            let mut out = Vec::new();
            for (i, c) in nets.iter().enumerate() {
                let cidr = self.cidr(c, &format!("{field}.networks[{i}]"))?;
                out.push(Peer::IpBlock {
                    cidr,
                    except: Vec::new(),
                });
            }
            return Ok(Some(out));
        }
        if p.domain_names.is_some() {
            return Err(self.err(
                format!("{field}.domainNames"),
                "domainNames peers are not supported by palisade yet; the policy is not applied (use networks)",
            ));
        }
        Ok(None)
    }

    fn cluster_protocol(&self, p: &ProtocolApi, field: &str) -> Result<Vec<PortSpec>, ModelError> {
        let set = [
            p.tcp.is_some(),
            p.udp.is_some(),
            p.sctp.is_some(),
            p.destination_named_port.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count();
        if set != 1 {
            return Err(self.err(
                field,
                "exactly one of tcp, udp, sctp, destinationNamedPort must be set",
            ));
        }
        if let Some(name) = &p.destination_named_port {
            if let Err(why) = super::validate_port_name(name) {
                return Err(self.err(
                    format!("{field}.destinationNamedPort"),
                    format!("{name:?}: {why}"),
                ));
            }
            // A named port has one protocol on the pod that declares it: matching the name under
            // every protocol is matching the name.
            return Ok(Protocol::ALL
                .into_iter()
                .map(|protocol| PortSpec {
                    protocol,
                    port: PortMatch::Named(name.clone()),
                })
                .collect());
        }
        let Some((protocol, ports, what)) = [
            (Protocol::Tcp, &p.tcp, "tcp"),
            (Protocol::Udp, &p.udp, "udp"),
            (Protocol::Sctp, &p.sctp, "sctp"),
        ]
        .into_iter()
        .find_map(|(proto, ports, what)| ports.as_ref().map(|ports| (proto, ports, what))) else {
            return Err(self.err(field, "no protocol set"));
        };
        let f = format!("{field}.{what}.destinationPort");
        let port = match &ports.destination_port {
            // The CRD requires it (every port of a protocol is the range 1-65535).
            None => return Err(self.err(&f, "required")),
            Some(PortApi {
                number: Some(n),
                range: None,
            }) => {
                let n = port_number(*n).ok_or_else(|| {
                    self.err(
                        format!("{f}.number"),
                        format!("{n} must be between 1 and 65535"),
                    )
                })?;
                PortMatch::Range(n, n)
            }
            Some(PortApi {
                number: None,
                range: Some(r),
            }) => {
                let (Some(a), Some(b)) = (port_number(r.start), port_number(r.end)) else {
                    return Err(self.err(
                        format!("{f}.range"),
                        "start and end must be between 1 and 65535",
                    ));
                };
                if a >= b {
                    return Err(self.err(
                        format!("{f}.range"),
                        "Start port must be less than End port",
                    ));
                }
                PortMatch::Range(a, b)
            }
            Some(_) => {
                return Err(self.err(&f, "exactly one of number and range must be set"));
            }
        };
        Ok(vec![PortSpec { protocol, port }])
    }
}

fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}
