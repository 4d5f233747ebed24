//! Links, addresses and routes over one rtnetlink connection, which is bound to the namespace its
//! socket was created in (the node's, or a pod's via `netns::netlink_socket_in`).

use crate::error::{Error, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteVia,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// A route as read back for CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// One rtnetlink connection; its driver runs on the current-thread runtime that created it.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the namespace of the calling thread (the node's).
    pub fn current() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| Error::io("opening a netlink socket in the node namespace", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection over a socket created elsewhere (inside a pod namespace).
    pub fn from_socket(socket: netlink_sys::Socket) -> Result<Self> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the fd comes from a valid, owned, bound, non-blocking netlink socket whose
        // ownership moves into the TokioSocket.
        let socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The link called `name`, or None.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let r = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match r {
            Ok(Some(m)) => Ok(Some(to_link(&m))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = Error::netlink(format!("looking up link {name}"), e);
                if e.is_errno(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Creates a veth pair in one request: `host` here, `peer` directly in the namespace `peer_ns`.
    pub async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        mtu: u32,
        peer_ns: RawFd,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_ns)
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            let e = Error::netlink(format!("creating veth {host} with peer {peer}"), e);
            if e.is_errno(libc::EEXIST) {
                Error::InterfaceExists(format!(
                    "{peer} in the pod namespace or {host} on the node already exists"
                ))
            } else {
                e
            }
        })
    }

    pub async fn set_up(&self, index: u32, what: &str) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("setting {what} up"), e))
    }

    /// Adds `ip/prefix` without duplicate address detection (our addresses are unique by
    /// construction, and DAD would delay IPv6 by a second).
    pub async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8, what: &str) -> Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| Error::netlink(format!("adding {ip}/{prefix} to {what}"), e))
    }

    /// Addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("listing addresses", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds a route to `dst` out of `oif`, via `gw` (or directly on the link when None).
    pub async fn add_route(&self, dst: IpNet, gw: Option<IpAddr>, oif: u32) -> Result<()> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| Error::config("route", e.to_string()))?
            .output_interface(oif);
        b = match gw {
            Some(g) => b
                .gateway(g)
                .map_err(|e| Error::config("route", e.to_string()))?,
            None if dst.addr().is_ipv4() => b.scope(RouteScope::Link),
            None => b,
        };
        self.handle
            .route()
            .add(b.build())
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("adding route {dst} via {gw:?}"), e))
    }

    /// Main-table routes of both families.
    pub async fn routes(&self) -> Result<Vec<RouteEntry>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(|e| Error::netlink("listing routes", e))?;
            out.extend(msgs.iter().filter_map(to_route));
        }
        Ok(out)
    }

    /// Sets the link called `name` down; false when it does not exist.
    pub async fn set_down_by_name(&self, name: &str) -> Result<bool> {
        match self
            .handle
            .link()
            .set(LinkUnspec::new_with_name(name).down().build())
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = Error::netlink(format!("setting link {name} down"), e);
                if e.is_errno(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes the link called `name`; false when it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        match self
            .handle
            .link()
            .del_with_message(LinkUnspec::new_with_name(name).build())
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = Error::netlink(format!("deleting link {name}"), e);
                if e.is_errno(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Names of all links (for GC of orphaned host veths).
    pub async fn link_names(&self) -> Result<Vec<String>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("listing links", e))?;
        Ok(msgs.iter().map(|m| to_link(m).name).collect())
    }
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: String::new(),
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(mac) => {
                l.mac = mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }
            LinkAttribute::Mtu(m) => l.mtu = Some(*m),
            _ => {}
        }
    }
    l
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn to_route(m: &RouteMessage) -> Option<RouteEntry> {
    if m.header.table != rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let v4 = m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet;
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Gateway(g) => gw = route_ip(g),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    Some(RouteEntry {
        dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
        gw,
        oif,
    })
}
