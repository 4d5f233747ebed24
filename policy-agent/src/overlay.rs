//! The overlay: how other nodes' pod ranges are reached when their InternalIP is not on a directly
//! connected subnet of ours (`--encapsulation cross-subnet`, the default), or always (`always`).
//!
//! One VXLAN device per address family, [`DEVICE_V4`] / [`DEVICE_V6`] (`vxlan.palisade`, `vxlan6.palisade`), VNI [`VNI`], UDP port [`PORT`],
//! local address = our InternalIP of that family, learning off; the inner family is the outer family
//! (IPv4 pods over the IPv4 underlay, IPv6 over IPv6). For another node reached through it:
//! - its VTEP MAC is derived from its InternalIP ([`mac_of`]), so a node's device MAC is known to
//!   every other node from the Node object alone (no annotation, no extra API object);
//! - its VTEP address is the first address of its podCIDR ([`vtep_of`], flannel's choice): only
//!   used as the route's gateway and a permanent neighbour entry on our device, never assigned;
//! - FDB entry `mac dst <InternalIP>` (permanent, self), neighbour `vtep lladdr mac` (permanent),
//!   route `podCIDR via vtep dev vxlan.palisade onlink proto 140`.
//!
//! [`plan`] (pure) decides which node goes direct and which over the overlay and what entries result;
//! [`Overlay`] is the netlink edge that converges devices, FDB and neighbour entries to it.

use crate::error::{Error, Result};
use crate::routes::{Hop, PodRoute};
use futures::TryStreamExt;
use ipnet::IpNet;
use palisade_policy::model::Node;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// When another node's pod range is reached through the overlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Only nodes whose InternalIP is not on a directly connected subnet of ours (Calico's name).
    #[default]
    CrossSubnet,
    /// Every other node.
    Always,
    /// Never: routes go via the other node's InternalIP, which must be on-link.
    Never,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::CrossSubnet => "cross-subnet",
            Mode::Always => "always",
            Mode::Never => "never",
        }
    }
}

/// VXLAN network identifier of our devices: 0x50414c, "PAL" in ASCII. Not Calico's (4096) nor
/// flannel's (1): a stray packet of another overlay is never decapsulated into ours.
pub const VNI: u32 = 0x50_41_4c;
/// UDP port of our devices. Not the IANA VXLAN port 4789 (Calico's default), 4790 (VXLAN-GPE) nor
/// 8472 (flannel's and Cilium's, the Linux default): our device never shares (or fails to bind) a
/// UDP socket with a device another CNI left behind, e.g. during a migration. Node firewalls must
/// let UDP 4796 pass between nodes.
pub const PORT: u16 = 4796;
/// Device carrying IPv4 pod traffic over the IPv4 underlay. Its name must not start with
/// `palisade_contract::HOST_VETH_PREFIX` ("pal"): the source guard treats every such interface as a
/// pod's veth and drops what it did not bind (all decapsulated traffic).
pub const DEVICE_V4: &str = "vxlan.palisade";
/// Device carrying IPv6 pod traffic over the IPv6 underlay.
pub const DEVICE_V6: &str = "vxlan6.palisade";
/// Bytes the encapsulation adds over an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner
/// Ethernet 14).
pub const OVERHEAD_V4: u32 = 50;
/// Same over an IPv6 underlay (outer IPv6 40).
pub const OVERHEAD_V6: u32 = 70;
/// Underlay MTU assumed when the interface of our InternalIP cannot be found.
pub const DEFAULT_UPLINK_MTU: u32 = 1500;

fn device_of(v4: bool) -> &'static str {
    if v4 {
        DEVICE_V4
    } else {
        DEVICE_V6
    }
}

fn overhead_of(v4: bool) -> u32 {
    if v4 {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    }
}

/// The VTEP MAC of the node with this InternalIP: locally administered unicast `0e:70` followed by
/// the IPv4 address, or `0e:76` and a 32-bit FNV-1a hash of the IPv6 address.
pub fn mac_of(underlay: IpAddr) -> [u8; 6] {
    match underlay {
        IpAddr::V4(a) => {
            let o = a.octets();
            [0x0e, 0x70, o[0], o[1], o[2], o[3]]
        }
        IpAddr::V6(a) => {
            let mut h: u32 = 0x811c_9dc5;
            for b in a.octets() {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
            let o = h.to_be_bytes();
            [0x0e, 0x76, o[0], o[1], o[2], o[3]]
        }
    }
}

/// The VTEP address of a node's podCIDR: its first address.
pub fn vtep_of(cidr: &IpNet) -> IpAddr {
    cidr.network()
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One address of this node (not on a pod veth, loopback or our devices) and its link's MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddr {
    /// Address with the prefix length of its subnet.
    pub net: IpNet,
    pub link: String,
    pub mtu: u32,
}

/// What this node's own links look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    pub addrs: Vec<LocalAddr>,
}

impl Local {
    /// Whether `ip` lies on a directly connected subnet (a /32 or /128 is no subnet: nothing else
    /// is on-link through it).
    pub fn on_link(&self, ip: IpAddr) -> bool {
        self.addrs
            .iter()
            .any(|a| a.net.prefix_len() < a.net.max_prefix_len() && a.net.trunc().contains(&ip))
    }

    /// Whether `ip` is one of our own addresses.
    pub fn is_ours(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.net.addr() == ip)
    }

    /// MTU of the link holding `ip`.
    pub fn mtu_of(&self, ip: IpAddr) -> Option<u32> {
        self.addrs
            .iter()
            .find(|a| a.net.addr() == ip)
            .map(|a| a.mtu)
    }
}

/// Another node as seen by one of our devices.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Gateway of the overlay routes to this node's podCIDR (neighbour entry).
    pub vtep: IpAddr,
    pub mac: [u8; 6],
    /// Its InternalIP (FDB entry's destination).
    pub underlay: IpAddr,
}

/// One device we want, with its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceWant {
    pub name: &'static str,
    pub local: IpAddr,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub peers: BTreeSet<Peer>,
}

impl DeviceWant {
    pub fn v4(&self) -> bool {
        self.local.is_ipv4()
    }

    /// The FDB entries (a peer's MAC → its underlay address) and neighbour entries (a peer's VTEP
    /// address → its MAC) the device should hold: one of each per peer.
    fn wanted_entries(&self) -> (BTreeSet<FdbEntry>, BTreeSet<NeighEntry>) {
        let fdb = self.peers.iter().map(|p| (p.mac.to_vec(), p.underlay));
        let neigh = self.peers.iter().map(|p| (p.vtep, p.mac.to_vec()));
        (fdb.collect(), neigh.collect())
    }
}

/// An FDB entry of the device: (MAC, underlay destination).
type FdbEntry = (Vec<u8>, IpAddr);
/// A neighbour entry of the device: (VTEP address, MAC).
type NeighEntry = (IpAddr, Vec<u8>);

/// Everything the routes edge and the overlay edge converge to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Direct routes (via the InternalIP) and overlay routes (via the VTEP address, onlink).
    pub routes: BTreeSet<PodRoute>,
    /// At most one per family, IPv4 first. A device is absent from here only when the overlay is
    /// off (`never`) or we have no InternalIP and podCIDR of that family; such a device is removed.
    pub devices: Vec<DeviceWant>,
    pub warnings: Vec<String>,
}

/// Decides, for the validated `routes` (each via the other node's InternalIP), which go direct and
/// which over the overlay, and what devices and peers that takes. With `never`, `routes` unchanged
/// and no device.
pub fn plan(
    routes: &BTreeSet<PodRoute>,
    nodes: &BTreeMap<String, Node>,
    self_name: &str,
    mode: Mode,
    local: &Local,
) -> Desired {
    let mut out = Desired::default();
    if mode == Mode::Never {
        out.routes = routes.clone();
        return out;
    }
    let me = nodes.get(self_name);
    let ours = |v4: bool| {
        me.and_then(|n| n.internal_ips.iter().find(|ip| ip.is_ipv4() == v4))
            .copied()
    };
    let mut devices: BTreeMap<bool, DeviceWant> = BTreeMap::new();
    for v4 in [true, false] {
        let has_cidr = me.is_some_and(|n| n.pod_cidrs.iter().any(|c| c.addr().is_ipv4() == v4));
        if let (Some(ip), true) = (ours(v4), has_cidr) {
            let uplink = local.mtu_of(ip).unwrap_or(DEFAULT_UPLINK_MTU);
            devices.insert(
                v4,
                DeviceWant {
                    name: device_of(v4),
                    local: ip,
                    mac: mac_of(ip),
                    mtu: uplink.saturating_sub(overhead_of(v4)),
                    peers: BTreeSet::new(),
                },
            );
        }
    }
    for r in routes {
        let v4 = r.via.is_ipv4();
        let direct = match mode {
            Mode::Never => true,
            Mode::Always => false,
            Mode::CrossSubnet => local.on_link(r.via),
        };
        if direct {
            out.routes.insert(r.clone());
            continue;
        }
        if local.is_ours(r.via) {
            out.warnings.push(format!(
                "podCIDR {} is claimed by a Node whose InternalIP {} is our own address; no route (it would loop back to us). Check who wrote that Node",
                r.destination, r.via
            ));
            continue;
        }
        let Some(dev) = devices.get_mut(&v4) else {
            out.warnings.push(format!(
                "podCIDR {} via {} is not on a connected subnet, and our Node has no InternalIP and podCIDR of that family to tunnel from; routing it directly (it fails unless {} is on-link)",
                r.destination, r.via, r.via
            ));
            out.routes.insert(r.clone());
            continue;
        };
        let vtep = vtep_of(&r.destination);
        dev.peers.insert(Peer {
            vtep,
            mac: mac_of(r.via),
            underlay: r.via,
        });
        out.routes.insert(PodRoute {
            destination: r.destination,
            via: vtep,
            hop: Hop::Overlay,
        });
    }
    out.devices = devices.into_values().rev().collect();
    out
}

/// The pod MTU for the conflist: `explicit` (`--mtu`) when given; otherwise the MTU of the link of
/// our InternalIP (the smallest over our families), less the encapsulation overhead of that family
/// when the overlay can be used (`overlay`: routes on and a mode other than `never`).
pub fn pod_mtu(explicit: Option<u32>, overlay: bool, me: &Node, local: &Local) -> u32 {
    if let Some(m) = explicit {
        return m;
    }
    let mut best: Option<u32> = None;
    for ip in &me.internal_ips {
        let v4 = ip.is_ipv4();
        if !me.pod_cidrs.iter().any(|c| c.addr().is_ipv4() == v4) {
            continue;
        }
        let uplink = local.mtu_of(*ip).unwrap_or(DEFAULT_UPLINK_MTU);
        let m = if overlay {
            uplink.saturating_sub(overhead_of(v4))
        } else {
            uplink
        };
        best = Some(best.map_or(m, |b| b.min(m)));
    }
    best.unwrap_or(if overlay {
        DEFAULT_UPLINK_MTU - OVERHEAD_V6
    } else {
        DEFAULT_UPLINK_MTU
    })
}

fn nl(action: &'static str) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Netlink {
        action,
        message: e.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
        _ => 0,
    }
}

/// What one [`Overlay::apply`] or [`Overlay::prune`] changed (log lines) and what failed.
#[derive(Debug, Default)]
pub struct OverlayChanges {
    pub done: Vec<String>,
    pub failed: Vec<Error>,
}

/// A device as the kernel has it.
#[derive(Debug, Clone)]
struct Have {
    index: u32,
    vxlan: bool,
    id: Option<u32>,
    port: Option<u16>,
    local: Option<IpAddr>,
    learning: Option<bool>,
    udp_csum: Option<bool>,
    mac: Vec<u8>,
    mtu: Option<u32>,
    up: bool,
}

fn parse_link(m: &LinkMessage) -> Have {
    let mut h = Have {
        index: m.header.index,
        vxlan: false,
        id: None,
        port: None,
        local: None,
        learning: None,
        udp_csum: None,
        mac: Vec::new(),
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(mac) => h.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => h.mtu = Some(*mtu),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => h.vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => h.id = Some(*id),
                                    InfoVxlan::Port(p) => h.port = Some(*p),
                                    InfoVxlan::Local(a) => h.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => h.local = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Learning(l) => h.learning = Some(*l),
                                    InfoVxlan::UDPCsum(c) => h.udp_csum = Some(*c),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    h
}

fn neigh_parts(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Vec<u8>>) {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                dst = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                dst = Some(IpAddr::V6(*a))
            }
            // FDB entries (family AF_BRIDGE) carry the remote address untyped.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = match b.len() {
                    4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.clone()),
            _ => {}
        }
    }
    (dst, mac)
}

/// The netlink edge of the overlay, in the calling thread's network namespace.
pub struct Overlay {
    handle: rtnetlink::Handle,
}

impl Overlay {
    /// Opens a netlink socket in the current network namespace. Needs a tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Netlink {
            action: "open overlay socket",
            message: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Overlay { handle })
    }

    /// Our addresses with their subnets and link MTUs: not on loopback, pod veths or our devices,
    /// no IPv6 link-local ones.
    pub async fn local(&self) -> Result<Local> {
        let mut links: BTreeMap<u32, (String, u32)> = BTreeMap::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(nl("list links"))? {
            let mut name = String::new();
            let mut mtu = 0;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Mtu(x) => mtu = *x,
                    _ => {}
                }
            }
            links.insert(m.header.index, (name, mtu));
        }
        let mut out = Local::default();
        let mut s = self.handle.address().get().execute();
        while let Some(m) = s.try_next().await.map_err(nl("list addresses"))? {
            let Some((name, mtu)) = links.get(&m.header.index) else {
                continue;
            };
            if name == "lo"
                || name == DEVICE_V4
                || name == DEVICE_V6
                || name.starts_with(palisade_contract::HOST_VETH_PREFIX)
            {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for a in &m.attributes {
                match a {
                    rtnetlink::packet_route::address::AddressAttribute::Local(ip) => {
                        local = Some(*ip)
                    }
                    rtnetlink::packet_route::address::AddressAttribute::Address(ip) => {
                        address = Some(*ip)
                    }
                    _ => {}
                }
            }
            let Some(ip) = local.or(address) else {
                continue;
            };
            if let IpAddr::V6(a) = ip {
                if a.segments()[0] & 0xffc0 == 0xfe80 {
                    continue;
                }
            }
            if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                out.addrs.push(LocalAddr {
                    net,
                    link: name.clone(),
                    mtu: *mtu,
                });
            }
        }
        Ok(out)
    }

    async fn device(&self, name: &str) -> Result<Option<Have>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(parse_link(&m))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == libc::ENODEV => Ok(None),
            Err(e) => Err(nl("look up overlay device")(e)),
        }
    }

    /// Creates or fixes the wanted devices and converges their FDB and neighbour entries. Returns
    /// the device indices by family (true: IPv4) for the overlay routes. Devices not wanted are left
    /// to [`Overlay::prune`] (after the routes through them are gone).
    pub async fn apply(&self, want: &Desired, changes: &mut OverlayChanges) -> BTreeMap<bool, u32> {
        let mut idx = BTreeMap::new();
        for d in &want.devices {
            match self.ensure_device(d, changes).await {
                Ok(i) => {
                    idx.insert(d.v4(), i);
                    if let Err(e) = self.sync_peers(d, i, changes).await {
                        changes.failed.push(e);
                    }
                }
                Err(e) => changes.failed.push(e),
            }
        }
        idx
    }

    async fn create(&self, d: &DeviceWant) -> Result<u32> {
        let b = LinkVxlan::new(d.name, VNI)
            .port(PORT)
            .learning(false)
            .mtu(d.mtu)
            .address(d.mac.to_vec())
            .up();
        // IPv4: outer UDP checksum zero, as RFC 7348 says it SHOULD be (the inner packet carries
        // its own checksums), and no per-packet checksum work on the outer header.
        // IPv6 requires a UDP checksum (RFC 8200), which the kernel computes by default.
        let b = match d.local {
            IpAddr::V4(a) => b.local(a).udp_csum(false),
            IpAddr::V6(a) => b.local6(a),
        };
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl("create overlay device (VXLAN)"))?;
        let h = self.device(d.name).await?.ok_or_else(|| Error::Netlink {
            action: "create overlay device",
            message: format!("{} is gone right after it was created", d.name),
        })?;
        Ok(h.index)
    }

    async fn ensure_device(&self, d: &DeviceWant, changes: &mut OverlayChanges) -> Result<u32> {
        let have = self.device(d.name).await?;
        if let Some(h) = &have {
            let same = h.vxlan
                && h.id == Some(VNI)
                && h.port == Some(PORT)
                && h.local == Some(d.local)
                && h.learning == Some(false)
                && (!d.v4() || h.udp_csum == Some(false));
            if same {
                if h.mac != d.mac || h.mtu != Some(d.mtu) || !h.up {
                    let m = LinkUnspec::new_with_index(h.index)
                        .address(d.mac.to_vec())
                        .mtu(d.mtu)
                        .up()
                        .build();
                    self.handle
                        .link()
                        .set(m)
                        .execute()
                        .await
                        .map_err(nl("set overlay device address, MTU, up"))?;
                    changes.done.push(format!(
                        "overlay device {} set to MAC {}, MTU {}, up",
                        d.name,
                        mac_string(&d.mac),
                        d.mtu
                    ));
                }
                return Ok(h.index);
            }
            // Another local address (our InternalIP changed), VNI or port: a VXLAN device's
            // identity cannot be changed in place on every kernel; recreate it (its routes go with
            // it and are added again by the routes edge right after).
            self.handle
                .link()
                .del(h.index)
                .execute()
                .await
                .map_err(nl("delete outdated overlay device"))?;
            changes
                .done
                .push(format!("outdated overlay device {} removed", d.name));
        }
        let i = self.create(d).await?;
        changes.done.push(format!(
            "overlay device {} created: VNI {VNI}, UDP port {PORT}, local {}, MAC {}, MTU {}",
            d.name,
            d.local,
            mac_string(&d.mac),
            d.mtu
        ));
        Ok(i)
    }

    /// FDB entries (family bridge) and neighbour entries on device `index`, as the kernel has them.
    async fn entries(
        &self,
        index: u32,
        v4: bool,
    ) -> Result<(
        Vec<(NeighbourMessage, Vec<u8>, IpAddr)>,
        Vec<(NeighbourMessage, IpAddr, Vec<u8>)>,
    )> {
        let mut fdb = Vec::new();
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(m) = s.try_next().await.map_err(nl("list FDB entries"))? {
            if m.header.ifindex != index {
                continue;
            }
            if let (Some(dst), Some(mac)) = neigh_parts(&m) {
                fdb.push((m, mac, dst));
            }
        }
        let mut neigh = Vec::new();
        let family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(m) = s.try_next().await.map_err(nl("list neighbour entries"))? {
            if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
                continue;
            }
            if let (Some(dst), Some(mac)) = neigh_parts(&m) {
                neigh.push((m, dst, mac));
            }
        }
        Ok((fdb, neigh))
    }

    async fn sync_peers(
        &self,
        d: &DeviceWant,
        index: u32,
        changes: &mut OverlayChanges,
    ) -> Result<()> {
        let (fdb, neigh) = self.entries(index, d.v4()).await?;
        let (want_fdb, want_neigh) = d.wanted_entries();
        let have_fdb: BTreeSet<FdbEntry> = fdb.iter().map(|(_, m, d)| (m.clone(), *d)).collect();
        let have_neigh: BTreeSet<NeighEntry> =
            neigh.iter().map(|(_, d, m)| (*d, m.clone())).collect();
        for (msg, mac, dst) in &fdb {
            if !want_fdb.contains(&(mac.clone(), *dst)) {
                match self.handle.neighbours().del(msg.clone()).execute().await {
                    Ok(()) => changes.done.push(format!(
                        "stale FDB entry {} dst {dst} on {} removed",
                        mac_string(mac),
                        d.name
                    )),
                    Err(e) => changes.failed.push(nl("delete FDB entry")(e)),
                }
            }
        }
        for (msg, dst, mac) in &neigh {
            if !want_neigh.contains(&(*dst, mac.clone())) {
                match self.handle.neighbours().del(msg.clone()).execute().await {
                    Ok(()) => changes.done.push(format!(
                        "stale neighbour {dst} lladdr {} on {} removed",
                        mac_string(mac),
                        d.name
                    )),
                    Err(e) => changes.failed.push(nl("delete neighbour entry")(e)),
                }
            }
        }
        for p in &d.peers {
            if !have_fdb.contains(&(p.mac.to_vec(), p.underlay)) {
                let r = self
                    .handle
                    .neighbours()
                    .add_bridge(index, &p.mac)
                    .destination(p.underlay)
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await;
                match r {
                    Ok(()) => changes.done.push(format!(
                        "FDB entry {} dst {} on {} added",
                        mac_string(&p.mac),
                        p.underlay,
                        d.name
                    )),
                    Err(e) => changes.failed.push(nl("add FDB entry")(e)),
                }
            }
            if !have_neigh.contains(&(p.vtep, p.mac.to_vec())) {
                let r = self
                    .handle
                    .neighbours()
                    .add(index, p.vtep)
                    .link_layer_address(&p.mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await;
                match r {
                    Ok(()) => changes.done.push(format!(
                        "neighbour {} lladdr {} on {} added",
                        p.vtep,
                        mac_string(&p.mac),
                        d.name
                    )),
                    Err(e) => changes.failed.push(nl("add neighbour entry")(e)),
                }
            }
        }
        Ok(())
    }

    /// Deletes our devices that `want` does not hold.
    pub async fn prune(&self, want: &Desired, changes: &mut OverlayChanges) {
        for name in [DEVICE_V4, DEVICE_V6] {
            if want.devices.iter().any(|d| d.name == name) {
                continue;
            }
            match self.device(name).await {
                Ok(Some(h)) => match self.handle.link().del(h.index).execute().await {
                    Ok(()) => changes
                        .done
                        .push(format!("overlay device {name} removed (not needed)")),
                    Err(e) => changes.failed.push(nl("delete overlay device")(e)),
                },
                Ok(None) => {}
                Err(e) => changes.failed.push(e),
            }
        }
    }

    /// Whether the kernel's devices, FDB and neighbour entries differ from `want`.
    pub async fn differs(&self, want: &Desired) -> Result<bool> {
        for name in [DEVICE_V4, DEVICE_V6] {
            let d = want.devices.iter().find(|d| d.name == name);
            let h = self.device(name).await?;
            let (d, h) = match (d, h) {
                (None, None) => continue,
                (Some(d), Some(h)) => (d, h),
                _ => return Ok(true),
            };
            if !(h.vxlan
                && h.id == Some(VNI)
                && h.port == Some(PORT)
                && h.local == Some(d.local)
                && (!d.v4() || h.udp_csum == Some(false))
                && h.mac == d.mac
                && h.mtu == Some(d.mtu)
                && h.up)
            {
                return Ok(true);
            }
            let (fdb, neigh) = self.entries(h.index, d.v4()).await?;
            let have_fdb: BTreeSet<FdbEntry> = fdb.into_iter().map(|(_, m, d)| (m, d)).collect();
            let have_neigh: BTreeSet<NeighEntry> =
                neigh.into_iter().map(|(_, d, m)| (d, m)).collect();
            if (have_fdb, have_neigh) != d.wanted_entries() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Deletes our devices (cleanup); their FDB, neighbour entries and routes go with them.
    pub async fn remove_all(&self) -> Result<usize> {
        let mut changes = OverlayChanges::default();
        self.prune(&Desired::default(), &mut changes).await;
        match changes.failed.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(changes.done.len()),
        }
    }
}

/// What one [`converge`] did.
#[derive(Debug, Default)]
pub struct Converged {
    pub routes: crate::routes::RouteChanges,
    pub overlay: OverlayChanges,
}

impl Converged {
    pub fn failures(&self) -> usize {
        self.routes.failed.len() + self.overlay.failed.len()
    }
}

/// Devices and peers first (routes through a device need it), then routes, then devices no longer
/// wanted (after the routes through them are gone). Each step is tried on its own; errs only when
/// our routes cannot be listed.
pub async fn converge(
    routes: &crate::routes::Routes,
    overlay: Option<&Overlay>,
    want: &Desired,
) -> Result<Converged> {
    let mut out = Converged::default();
    let idx = match overlay {
        Some(o) => o.apply(want, &mut out.overlay).await,
        None => BTreeMap::new(),
    };
    out.routes = routes.sync_with(&want.routes, &idx).await?;
    if let Some(o) = overlay {
        o.prune(want, &mut out.overlay).await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> (String, Node) {
        let n = Node {
            name: name.to_string(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
            ..Node::default()
        };
        (name.to_string(), n)
    }

    fn local(addrs: &[(&str, u32)]) -> Local {
        Local {
            addrs: addrs
                .iter()
                .map(|(a, mtu)| LocalAddr {
                    net: a.parse().unwrap(),
                    link: "eth0".into(),
                    mtu: *mtu,
                })
                .collect(),
        }
    }

    fn cluster() -> BTreeMap<String, Node> {
        [
            node(
                "a",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &["172.31.1.1", "fd00:172:31:1::1"],
            ),
            // Same subnet as a.
            node(
                "b",
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                &["172.31.1.2", "fd00:172:31:1::2"],
            ),
            // Another subnet.
            node(
                "c",
                &["10.244.3.0/24", "fd00:10:244:3::/64"],
                &["172.31.2.3", "fd00:172:31:2::3"],
            ),
        ]
        .into()
    }

    fn a_local() -> Local {
        local(&[("172.31.1.1/24", 1500), ("fd00:172:31:1::1/64", 9000)])
    }

    fn show(d: &Desired) -> Vec<String> {
        d.routes
            .iter()
            .map(|r| {
                format!(
                    "{} via {}{}",
                    r.destination,
                    r.via,
                    if r.hop == Hop::Overlay {
                        " overlay"
                    } else {
                        ""
                    }
                )
            })
            .collect()
    }

    fn plan_for(mode: Mode, nodes: &BTreeMap<String, Node>, local: &Local) -> Desired {
        let routes = crate::routes::desired_routes(nodes, "a", &[]).routes;
        plan(&routes, nodes, "a", mode, local)
    }

    #[test]
    fn cross_subnet_routes_same_subnet_nodes_directly_and_tunnels_to_the_others() {
        let d = plan_for(Mode::CrossSubnet, &cluster(), &a_local());
        assert_eq!(
            show(&d),
            vec![
                "10.244.2.0/24 via 172.31.1.2",
                "10.244.3.0/24 via 10.244.3.0 overlay",
                "fd00:10:244:2::/64 via fd00:172:31:1::2",
                "fd00:10:244:3::/64 via fd00:10:244:3:: overlay",
            ]
        );
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(d.devices.len(), 2);
        let v4 = &d.devices[0];
        assert_eq!(v4.name, DEVICE_V4);
        assert_eq!(v4.local.to_string(), "172.31.1.1");
        assert_eq!(mac_string(&v4.mac), "0e:70:ac:1f:01:01");
        assert_eq!(v4.mtu, 1450);
        let p: Vec<_> = v4.peers.iter().collect();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].vtep.to_string(), "10.244.3.0");
        assert_eq!(p[0].underlay.to_string(), "172.31.2.3");
        assert_eq!(mac_string(&p[0].mac), "0e:70:ac:1f:02:03");
        let v6 = &d.devices[1];
        assert_eq!(v6.name, DEVICE_V6);
        assert_eq!(v6.mtu, 9000 - 70);
        assert_eq!(v6.peers.len(), 1);
        assert_eq!(
            v6.peers.iter().next().unwrap().underlay.to_string(),
            "fd00:172:31:2::3"
        );
    }

    #[test]
    fn always_tunnels_to_every_node_and_never_routes_every_node_directly() {
        let d = plan_for(Mode::Always, &cluster(), &a_local());
        assert!(
            d.routes.iter().all(|r| r.hop == Hop::Overlay),
            "{:?}",
            show(&d)
        );
        assert_eq!(d.routes.len(), 4);
        assert_eq!(d.devices[0].peers.len(), 2);
        let d = plan_for(Mode::Never, &cluster(), &a_local());
        assert!(
            d.routes.iter().all(|r| r.hop != Hop::Overlay),
            "{:?}",
            show(&d)
        );
        assert!(d.devices.is_empty());
        assert_eq!(
            show(&d)[1],
            "10.244.3.0/24 via 172.31.2.3",
            "never: via the InternalIP even off-subnet"
        );
    }

    #[test]
    fn a_host_address_is_no_subnet_so_every_node_is_off_subnet() {
        // /32 and /128 addresses (as GCP hands out): nothing is on-link through them.
        let l = local(&[("172.31.1.1/32", 1460), ("fd00:172:31:1::1/128", 1460)]);
        let d = plan_for(Mode::CrossSubnet, &cluster(), &l);
        assert!(
            d.routes.iter().all(|r| r.hop == Hop::Overlay),
            "{:?}",
            show(&d)
        );
        assert_eq!(d.devices[0].mtu, 1410);
    }

    #[test]
    fn a_node_changing_address_or_leaving_changes_its_peer_and_route() {
        let mut nodes = cluster();
        let before = plan_for(Mode::CrossSubnet, &nodes, &a_local());
        nodes.get_mut("c").unwrap().internal_ips[0] = "172.31.2.33".parse().unwrap();
        let after = plan_for(Mode::CrossSubnet, &nodes, &a_local());
        let p = after.devices[0].peers.iter().next().unwrap();
        assert_eq!(p.underlay.to_string(), "172.31.2.33");
        assert_eq!(mac_string(&p.mac), "0e:70:ac:1f:02:21");
        assert_ne!(before.devices[0].peers, after.devices[0].peers);
        // c's podCIDR moves: the route and the VTEP address follow.
        nodes.get_mut("c").unwrap().pod_cidrs[0] = "10.244.9.0/24".parse().unwrap();
        let moved = plan_for(Mode::CrossSubnet, &nodes, &a_local());
        assert!(show(&moved).contains(&"10.244.9.0/24 via 10.244.9.0 overlay".to_string()));
        assert_eq!(
            moved.devices[0]
                .peers
                .iter()
                .next()
                .unwrap()
                .vtep
                .to_string(),
            "10.244.9.0"
        );
        nodes.remove("c");
        let gone = plan_for(Mode::CrossSubnet, &nodes, &a_local());
        assert!(gone.devices[0].peers.is_empty());
        assert!(gone.routes.iter().all(|r| r.hop != Hop::Overlay));
        // The device stays (it receives from nodes that tunnel to us) while we have an InternalIP
        // and podCIDR of its family.
        assert_eq!(gone.devices.len(), 2);
    }

    #[test]
    fn no_device_for_a_family_we_have_no_address_or_range_of() {
        let mut nodes = cluster();
        let a = nodes.get_mut("a").unwrap();
        a.internal_ips.retain(|ip| ip.is_ipv4());
        let d = plan_for(Mode::CrossSubnet, &nodes, &a_local());
        assert_eq!(d.devices.len(), 1);
        assert_eq!(d.devices[0].name, DEVICE_V4);
        // c's IPv6 range is off-subnet and cannot be tunnelled: routed directly, with a warning.
        assert!(show(&d).contains(&"fd00:10:244:3::/64 via fd00:172:31:2::3".to_string()));
        assert!(
            d.warnings[0].contains("fd00:10:244:3::/64"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn a_node_claiming_our_own_address_gets_no_overlay_route() {
        let mut nodes = cluster();
        nodes.insert(
            "evil".into(),
            node("evil", &["10.244.7.0/24"], &["172.31.1.1"]).1,
        );
        // The routes edge already refuses nothing here (the range holds no node address), so the
        // overlay must: a tunnel to ourselves loops.
        let routes: BTreeSet<PodRoute> = [PodRoute {
            destination: "10.244.7.0/24".parse().unwrap(),
            via: "172.31.1.1".parse().unwrap(),
            hop: Hop::Gateway,
        }]
        .into();
        let d = plan(&routes, &nodes, "a", Mode::Always, &a_local());
        assert!(d.routes.is_empty());
        assert!(d.warnings[0].contains("our own address"));
    }

    #[test]
    fn device_names_are_not_taken_for_pod_veths_by_the_source_guard() {
        for d in [DEVICE_V4, DEVICE_V6] {
            assert!(!d.starts_with(palisade_contract::HOST_VETH_PREFIX), "{d}");
            assert!(d.len() <= 15, "{d}: IFNAMSIZ");
        }
    }

    #[test]
    fn vtep_macs_are_locally_administered_unicast_and_distinct_per_address() {
        for ip in ["172.31.1.1", "fd00::1", "fd00::2", "10.0.0.1"] {
            let m = mac_of(ip.parse().unwrap());
            assert_eq!(m[0] & 0b11, 0b10, "{ip}");
        }
        assert_ne!(
            mac_of("fd00:1::1".parse().unwrap()),
            mac_of("fd00:2::1".parse().unwrap())
        );
    }

    #[test]
    fn pod_mtu_leaves_room_for_the_encapsulation_unless_given() {
        let (_, a) = node(
            "a",
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
            &["172.31.1.1", "fd00:172:31:1::1"],
        );
        let l = local(&[("172.31.1.1/24", 9000), ("fd00:172:31:1::1/64", 9000)]);
        assert_eq!(pod_mtu(None, true, &a, &l), 9000 - 70);
        assert_eq!(pod_mtu(None, false, &a, &l), 9000);
        assert_eq!(pod_mtu(Some(1400), true, &a, &l), 1400);
        let (_, v4only) = node("a", &["10.244.1.0/24"], &["172.31.1.1"]);
        assert_eq!(pod_mtu(None, true, &v4only, &l), 9000 - 50);
        // Our address not found on any link: 1500 assumed.
        assert_eq!(pod_mtu(None, true, &v4only, &Local::default()), 1450);
    }
}
