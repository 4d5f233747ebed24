//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as the API serves it: serde types with
//! the upstream field names, which the agent's sources decode and `convert::cluster` validates.
//!
//! With the feature `schema` they also describe the CRD (JSON Schema through schemars, with the
//! upstream CRD's validation: enums, bounds, list sizes, one-of objects, CEL rules); the agent's test
//! `crd_manifest` generates `deploy/05-clusternetworkpolicy-crd.yaml` from them and fails when the
//! file differs. Every field is an `Option` in Rust (a peer with no known field must be seen to fail
//! closed, and a manifest is refused with the field's name rather than by a decoding error: serde
//! reads a missing `Option` as `None`); the schema marks what the API requires (`required`, without
//! `serde(default)`, which would take it out of the schema's `required`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde::{Deserialize, Serialize};

/// `spec.priority` bounds.
pub const PRIORITY_MAX: i64 = 1000;
/// Rules per direction, peers and protocols per rule, CIDRs or names per peer.
pub const MAX_ITEMS: usize = 25;
/// Longest rule `name`.
pub const RULE_NAME_MAX: usize = 100;

/// A ClusterNetworkPolicy object: metadata and spec (its status is not read).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyApi {
    #[serde(default)]
    pub metadata: meta::ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
}

/// The desired behaviour of a ClusterNetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Admin: evaluated before NetworkPolicies, which cannot override it. Baseline: evaluated after
    /// them, only for pods no NetworkPolicy selects in that direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, extend("enum" = ["Admin", "Baseline"])))]
    pub tier: Option<String>,
    /// 0 to 1000: lower first within the tier. Policies of the same tier and priority are evaluated
    /// by name (Palisade's choice; the API leaves it open).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, range(min = 0, max = PRIORITY_MAX), extend("format" = "int32")))]
    pub priority: Option<i64>,
    /// The pods the policy applies to (never hostNetwork pods).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required))]
    pub subject: Option<Subject>,
    /// Ingress rules, in order: the first that matches decides. None: ingress is not affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_ITEMS)))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Egress rules, in order: the first that matches decides. None: egress is not affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_ITEMS)))]
    pub egress: Option<Vec<EgressRule>>,
}

/// Exactly one of `namespaces` and `pods`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("minProperties" = 1, "maxProperties" = 1)))]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Every pod of the namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<meta::LabelSelector>,
    /// Pods matching `podSelector` in namespaces matching `namespaceSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods chosen by namespace AND pod selectors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Namespaces whose labels match; empty selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<meta::LabelSelector>,
    /// Pods whose labels match, in those namespaces; empty selects every pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required))]
    pub pod_selector: Option<meta::LabelSelector>,
}

/// What a rule does to the traffic it matches.
#[cfg(feature = "schema")]
fn action_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["Accept", "Deny", "Pass"],
        "description": "Accept: allowed (final for this direction; egress still meets the destination's ingress). Deny: dropped. Pass: the rest of this tier is skipped; evaluation goes on in the next tier."
    })
}

/// An ingress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// An identifier of the rule, shown by explain and in the ruleset's comments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = RULE_NAME_MAX)))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, schema_with = "action_schema"))]
    pub action: Option<String>,
    /// Sources: the rule applies when any of them matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, length(min = 1, max = MAX_ITEMS), with = "Vec<IngressPeerSchema>"))]
    pub from: Option<Vec<PeerApi>>,
    /// Protocols and destination ports; none: every protocol and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_ITEMS)))]
    pub protocols: Option<Vec<ProtocolApi>>,
}

/// An egress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(self.to.exists(peer, has(peer.networks) || has(peer.nodes) || has(peer.domainNames)) && has(self.protocols) && self.protocols.exists(protocol, has(protocol.destinationNamedPort)))",
    "message": "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames"
}])))]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// An identifier of the rule, shown by explain and in the ruleset's comments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = RULE_NAME_MAX)))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, schema_with = "action_schema"))]
    pub action: Option<String>,
    /// Destinations: the rule applies when any of them matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required, length(min = 1, max = MAX_ITEMS)))]
    pub to: Option<Vec<PeerApi>>,
    /// Protocols and destination ports; none: every protocol and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_ITEMS)))]
    pub protocols: Option<Vec<ProtocolApi>>,
}

// One Rust type for both directions, so that a manifest's ingress peer naming an egress-only kind is
// refused by name rather than read as a peer with no known field; the CRD's ingress peer is
// `IngressPeerSchema`.
/// A destination: exactly one of its fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("minProperties" = 1, "maxProperties" = 1)))]
#[serde(rename_all = "camelCase")]
pub struct PeerApi {
    /// Every pod of the namespaces whose labels match (never hostNetwork pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<meta::LabelSelector>,
    /// Pods matching `podSelector` in namespaces matching `namespaceSelector` (never hostNetwork
    /// pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// The addresses in `status.addresses` of the Nodes whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<meta::LabelSelector>,
    /// CIDRs, IPv4 or IPv6; they match pod addresses too (`0.0.0.0/0` covers every IPv4 pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(
        length(min = 1, max = MAX_ITEMS),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "set")
    ))]
    #[cfg_attr(feature = "schema", schemars(transform = cidr_items))]
    pub networks: Option<Vec<String>>,
    /// Domain names (Accept rules only). Palisade refuses policies that use them, for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(
        length(min = 1, max = MAX_ITEMS),
        inner(regex(pattern = r"^(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$")),
        extend("x-kubernetes-list-type" = "set")
    ))]
    pub domain_names: Option<Vec<String>>,
}

/// The CEL check of every CIDR of a `networks` list.
#[cfg(feature = "schema")]
fn cidr_items(schema: &mut schemars::Schema) {
    if let Some(items) = schema.get_mut("items").and_then(|i| i.as_object_mut()) {
        items.insert(
            "x-kubernetes-validations".into(),
            serde_json::json!([{"rule": "isCIDR(self)", "message": "Invalid CIDR format provided"}]),
        );
    }
}

// Schema only: decoded as `PeerApi`.
/// A source: exactly one of `namespaces` and `pods`.
#[cfg(feature = "schema")]
#[derive(schemars::JsonSchema)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct IngressPeerSchema {
    /// Every pod of the namespaces whose labels match (never hostNetwork pods).
    namespaces: Option<meta::LabelSelector>,
    /// Pods matching `podSelector` in namespaces matching `namespaceSelector` (never hostNetwork
    /// pods).
    pods: Option<NamespacedPod>,
}

/// Exactly one of `tcp`, `udp`, `sctp`, `destinationNamedPort`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("minProperties" = 1, "maxProperties" = 1)))]
#[serde(rename_all = "camelCase")]
pub struct ProtocolApi {
    /// TCP to a destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    /// UDP to a destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    /// SCTP to a destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    /// A containerPort name of the destination pod, with that port's protocol (never nodes or
    /// networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// The destination port of one protocol.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("minProperties" = 1)))]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<PortApi>,
}

/// A port number or a range: exactly one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("minProperties" = 1, "maxProperties" = 1)))]
#[serde(rename_all = "camelCase")]
pub struct PortApi {
    /// One port, 1 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535), extend("format" = "int32")))]
    pub number: Option<i64>,
    /// An inclusive range, `start` < `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRangeApi>,
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.start < self.end", "message": "Start port must be less than End port"
}])))]
#[serde(rename_all = "camelCase")]
pub struct PortRangeApi {
    /// The first port of the range.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535), extend("format" = "int32")))]
    pub start: i64,
    /// The last port of the range.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535), extend("format" = "int32")))]
    pub end: i64,
}
