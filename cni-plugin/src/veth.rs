//! The routed wiring (Calico/kindnet style): one veth pair per attachment, the pod end holds the
//! pod's /32 and /128 and routes everything via link-local gateways owned by the host end, and the
//! node routes each pod address to its host veth. So every pod packet crosses the node's IP stack,
//! where the policy table sees it.
//!
//! Gateway choice: the host veth *owns* 169.254.1.1/32 and fe80::1/64 (as ptp does), rather than
//! answering by proxy ARP, so the gateway works whatever routes the node has.

use crate::error::Result;
use crate::netlink::{Link, Netlink};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// Pod-side IPv4 gateway (contract::GATEWAY_V4).
pub fn gateway_v4() -> Ipv4Addr {
    palisade_contract::GATEWAY_V4
}

/// Pod-side IPv6 gateway (contract::GATEWAY_V6).
pub fn gateway_v6() -> Ipv6Addr {
    palisade_contract::GATEWAY_V6
}

/// The gateway for an address of the given family.
pub fn gateway_for(ip: &IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        IpAddr::V4(gateway_v4())
    } else {
        IpAddr::V6(gateway_v6())
    }
}

/// Host route / pod address of one pod IP: /32 or /128.
pub fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Prefix length of the IPv6 link-local gateway on the host veth.
const GATEWAY_V6_PREFIX: u8 = 64;

/// What to build for one attachment.
pub struct Plan<'a> {
    pub host_veth: &'a str,
    pub ifname: &'a str,
    pub mtu: u32,
    pub ips: &'a [IpAddr],
    /// Extra pod routes (destinations) beside the default routes.
    pub routes: &'a [IpNet],
}

impl Plan<'_> {
    fn has_v4(&self) -> bool {
        self.ips.iter().any(IpAddr::is_ipv4)
    }
    fn has_v6(&self) -> bool {
        self.ips.iter().any(IpAddr::is_ipv6)
    }

    /// Every route the pod gets: default per family present plus the extra ones, all via the
    /// family's gateway.
    pub fn pod_routes(&self) -> Vec<(IpNet, IpAddr)> {
        let mut out = Vec::new();
        if self.has_v4() {
            out.push((
                IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
                IpAddr::V4(gateway_v4()),
            ));
        }
        if self.has_v6() {
            out.push((
                IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).unwrap_or_default(),
                IpAddr::V6(gateway_v6()),
            ));
        }
        for r in self.routes {
            let fam_ok = if r.addr().is_ipv4() {
                self.has_v4()
            } else {
                self.has_v6()
            };
            if fam_ok && r.prefix_len() != 0 {
                out.push((*r, gateway_for(&r.addr())));
            }
        }
        out
    }
}

/// Both ends as built.
pub struct Wired {
    pub host: Link,
    pub pod: Link,
}

/// Phase 1: creates the pair and puts the addresses on both ends, leaving both links down, so
/// nothing can reach the pod yet (it runs while the pending mark is being written).
pub async fn prepare(
    node: &Netlink,
    pod: &Netlink,
    pod_ns: RawFd,
    plan: &Plan<'_>,
) -> Result<Wired> {
    node.create_veth(plan.host_veth, plan.ifname, plan.mtu, pod_ns)
        .await?;
    let (host, podl) = futures::try_join!(address_host(node, plan), address_pod(pod, plan))?;
    Ok(Wired { host, pod: podl })
}

/// Phase 2 (only once the pod is marked pending): links up, pod routes, node routes.
pub async fn activate(node: &Netlink, pod: &Netlink, plan: &Plan<'_>, wired: &Wired) -> Result<()> {
    futures::try_join!(
        activate_host(node, plan, &wired.host),
        activate_pod(pod, plan, &wired.pod)
    )?;
    Ok(())
}

async fn must_link(nl: &Netlink, name: &str, side: &str) -> Result<Link> {
    nl.link_by_name(name).await?.ok_or_else(|| {
        crate::error::Error::InterfaceExists(format!(
            "{side} link {name} vanished right after it was created"
        ))
    })
}

async fn address_host(node: &Netlink, plan: &Plan<'_>) -> Result<Link> {
    let host = must_link(node, plan.host_veth, "host").await?;
    let what = format!("host veth {}", plan.host_veth);
    if plan.has_v4() {
        node.add_address(host.index, IpAddr::V4(gateway_v4()), 32, &what)
            .await?;
    }
    if plan.has_v6() {
        node.add_address(
            host.index,
            IpAddr::V6(gateway_v6()),
            GATEWAY_V6_PREFIX,
            &what,
        )
        .await?;
    }
    Ok(host)
}

async fn activate_host(node: &Netlink, plan: &Plan<'_>, host: &Link) -> Result<()> {
    node.set_up(host.index, &format!("host veth {}", plan.host_veth))
        .await?;
    for ip in plan.ips {
        node.add_route(host_prefix(*ip), None, host.index).await?;
    }
    Ok(())
}

async fn address_pod(pod: &Netlink, plan: &Plan<'_>) -> Result<Link> {
    let link = must_link(pod, plan.ifname, "pod").await?;
    let what = format!("pod interface {}", plan.ifname);
    for ip in plan.ips {
        let p = host_prefix(*ip);
        pod.add_address(link.index, *ip, p.prefix_len(), &what)
            .await?;
    }
    Ok(link)
}

async fn activate_pod(pod: &Netlink, plan: &Plan<'_>, link: &Link) -> Result<()> {
    pod.set_up(link.index, &format!("pod interface {}", plan.ifname))
        .await?;
    if plan.has_v4() {
        pod.add_route(host_prefix(IpAddr::V4(gateway_v4())), None, link.index)
            .await?;
    }
    for (dst, gw) in plan.pod_routes() {
        pod.add_route(dst, Some(gw), link.index).await?;
    }
    Ok(())
}
