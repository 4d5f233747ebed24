//! The lockdown table: what the agent commits first when its table was removed or changed in a
//! way a repair cannot name, so that isolation is back long before the full table is (whose
//! commit takes the kernel ~30–90 ms at 10k pods; the lockdown's, a few hundred objects, ~1 ms).
//!
//! It is the base chains every node holds (source guard, established, related, neighbour
//! discovery, the tunnel's guard, egress NAT, the flow log) with every local pod address in the
//! pending sets and no policy at all: what a pod whose policy is not compiled yet meets (dropped,
//! this node may still reach it), for every pod at once. New connections of local pods are
//! dropped until the full table replaces it in one transaction; established ones go on (the
//! revocation sweep after the restore cuts those the policies do not admit); traffic that does
//! not touch a local pod (node to node, the overlay's outer packets) passes as it does in the
//! full table.

use super::{base, Compiled};
use crate::ruleset::Ruleset;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The lockdown table of `c`'s node (see the module's text), with the addresses `also` pending
/// too.
pub(crate) fn lockdown(c: &Compiled, also: impl IntoIterator<Item = IpAddr>) -> Ruleset {
    let pending: BTreeSet<IpAddr> = c
        .pending
        .iter()
        .copied()
        .chain(c.pods.values().flat_map(|p| p.ips.iter().copied()))
        .chain(c.sources.iter().map(|(_, ip)| *ip))
        .chain(also)
        .collect();
    let mut rs = Ruleset::default();
    base(&mut rs, c, &pending);
    rs
}
