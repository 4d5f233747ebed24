//! The operations: ADD, DEL, CHECK, STATUS, GC. Each takes the validated environment and
//! configuration and returns what main prints.
//!
//! ADD order (ARCHITECTURE.md): IPAM → under the node lock: pending mark + attachment record →
//! links up, routes → result. The veth pair is created and addressed (both links down, no routes)
//! while the mark is written; nothing can reach the pod before the mark is in. A failure after IPAM
//! tears down everything done so far, in DEL's order (link, then mark and record, then the address), so the address is never free while
//! a mark for it could still be removed by us.

use crate::cni::{CniResult, Env, Interface, IpConfig, Route};
use crate::config::NetConf;
use crate::error::{Error, Errors, Result};
use crate::ipam::{self, Allocation, DelegateTarget};
use crate::netlink::Netlink;
use crate::netns;
use crate::pending::{self, Mark};
use crate::reaper::{self, Reaper};
use crate::veth::{self, Plan};
use palisade_contract::{self as contract, Attachment, AttachmentKey};
use palisade_nft::setelem::ElementWriter;
use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// Forwarding sysctls of the node namespace (the plugin runs in it).
const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
/// Set by test harnesses to allow CNI_NETNS to be the plugin's own namespace.
const NETNS_OVERRIDE_ENV: &str = "CNI_NETNS_OVERRIDE";

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

fn netns_path(env: &Env) -> Result<&str> {
    env.netns
        .as_deref()
        .ok_or_else(|| Error::env("CNI_NETNS", "not set"))
}

fn open_pod_netns(env: &Env) -> Result<File> {
    let path = netns_path(env)?;
    let ns = netns::open(path)?;
    if netns::is_current(&ns)? && std::env::var(NETNS_OVERRIDE_ENV).as_deref() != Ok("1") {
        return Err(Error::env(
            "CNI_NETNS",
            format!("{path:?} is the plugin's own (node) network namespace"),
        ));
    }
    Ok(ns)
}

/// ADD.
pub fn add(env: &Env, conf: &NetConf) -> Result<CniResult> {
    let t0 = std::time::Instant::now();
    let ns = open_pod_netns(env)?;
    let host_veth = contract::host_veth_name(&env.container_id, &env.ifname);
    runtime()?.block_on(async {
        let node = Netlink::current()?;
        let pod = Netlink::from_socket(netns::netlink_socket_in(&ns)?)?;
        if node.link_by_name(&host_veth).await?.is_some() {
            if contract::records::read(&conf.state_dir, &env.container_id, &env.ifname)?.is_some() {
                return Err(Error::InterfaceExists(format!(
                    "host veth {host_veth} of {}/{} already exists on the node (DEL the old attachment first)",
                    env.container_id, env.ifname
                )));
            }
            // No record: a DEL of this attachment answered and its reaper has not deleted the
            // pair yet (or never ran). The name is ours (derived); nothing routes to it.
            tracing::info!(link = %host_veth, "deleting the down host veth a DEL of this attachment left to its reaper");
            node.delete_link(&host_veth).await?;
        }
        if pod.link_by_name(&env.ifname).await?.is_some() {
            return Err(Error::InterfaceExists(format!(
                "interface {} already exists in {}",
                env.ifname,
                netns_path(env)?
            )));
        }
        let t_checked = t0.elapsed();
        let alloc = ipam::add(conf, env)?;
        let t_ipam = t0.elapsed();
        match setup(env, conf, &ns, (&node, &pod), &host_veth, &alloc).await {
            Ok(r) => {
                tracing::debug!(checks = ?t_checked, ipam = ?t_ipam, total = ?t0.elapsed(), "ADD timings (cumulative)");
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, container = %env.container_id, ifname = %env.ifname, "ADD failed; rolling back");
                if let Err(re) = teardown(&node, conf, env, &DelegateTarget::from_env(env), &host_veth, None).await {
                    tracing::error!(error = %re, "rollback after a failed ADD was incomplete; DEL will finish it");
                }
                Err(e)
            }
        }
    })
}

async fn setup(
    env: &Env,
    conf: &NetConf,
    ns: &File,
    (node, pod): (&Netlink, &Netlink),
    host_veth: &str,
    alloc: &Allocation,
) -> Result<CniResult> {
    // The pending mark and the record (a netlink batch and a file) proceed on their own thread
    // while the veth is created and addressed with both links down; only when both are done do the
    // links go up.
    let (env_c, conf_c, veth_c, ips_c) = (
        env.clone(),
        conf.clone(),
        host_veth.to_string(),
        alloc.ips.clone(),
    );
    let marking = std::thread::Builder::new()
        .name("pending".into())
        .spawn(move || mark_and_record(&env_c, &conf_c, &veth_c, &ips_c))
        .map_err(|e| Error::io("spawning the pending-mark thread", e))?;
    let plan = Plan {
        host_veth,
        ifname: &env.ifname,
        mtu: conf.mtu,
        ips: &alloc.ips,
        routes: &alloc.routes,
    };
    let prepared = veth::prepare(node, pod, ns.as_raw_fd(), &plan).await;
    marking
        .join()
        .map_err(|_| Error::io("pending-mark thread", std::io::Error::other("panicked")))??;
    let wired = prepared?;
    ensure_forwarding(&alloc.ips)?;
    veth::activate(node, pod, &plan, &wired).await?;
    tracing::info!(
        container = %env.container_id, ifname = %env.ifname, host_veth, ips = ?alloc.ips,
        pod = ?env.args.pod_namespace.as_deref().zip(env.args.pod_name.as_deref()),
        "attachment wired"
    );
    // `interfaces[].mtu` exists since spec 1.1.0.
    let mtu = conf.cni_version.has_interface_mtu().then_some(conf.mtu);
    Ok(CniResult {
        cni_version: conf.cni_version.as_str().to_string(),
        interfaces: vec![
            Interface {
                name: host_veth.to_string(),
                mac: wired.host.mac,
                mtu,
                sandbox: String::new(),
            },
            Interface {
                name: env.ifname.clone(),
                mac: wired.pod.mac,
                mtu,
                sandbox: netns_path(env)?.to_string(),
            },
        ],
        ips: alloc
            .ips
            .iter()
            .map(|ip| IpConfig {
                address: veth::host_prefix(*ip),
                gateway: Some(veth::gateway_for(ip)),
                interface: Some(1),
            })
            .collect(),
        routes: plan
            .pod_routes()
            .into_iter()
            .map(|(dst, gw)| Route { dst, gw: Some(gw) })
            .collect(),
        dns: conf.dns.clone().or_else(|| alloc.dns.clone()),
    })
}

/// Under the node lock: the pending mark (for pods), then the record. If the record cannot be
/// written the mark is taken back, so a mark never exists without its record.
fn mark_and_record(env: &Env, conf: &NetConf, host_veth: &str, ips: &[IpAddr]) -> Result<()> {
    let is_pod = env.args.is_pod();
    let _lock = pending::lock_node(&conf.state_dir)?;
    let pending = if is_pod {
        match pending::mark(ips)? {
            Mark::Marked => true,
            Mark::TableAbsent if conf.fail_open => {
                tracing::warn!(container = %env.container_id, "{}; failOpen is set, so the pod is wired without a pending mark", pending::agent_absent_message());
                false
            }
            Mark::TableAbsent => return Err(Error::TryAgainLater(pending::agent_absent_message())),
        }
    } else {
        false
    };
    let record = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: netns_path(env)?.to_string(),
        host_veth: host_veth.to_string(),
        ips: ips.to_vec(),
        pod_namespace: env.args.pod_namespace.clone(),
        pod_name: env.args.pod_name.clone(),
        pod_uid: env.args.pod_uid.clone(),
        pending,
    };
    if let Err(e) = contract::records::write(&conf.state_dir, &record) {
        if pending {
            let _ = pending::unmark(&mut ElementWriter::new(), ips);
        }
        return Err(e.into());
    }
    Ok(())
}

fn ensure_forwarding(ips: &[IpAddr]) -> Result<()> {
    let mut files = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        files.push(IPV4_FORWARD);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        files.push(IPV6_FORWARD);
    }
    for f in files {
        let cur = std::fs::read_to_string(f).map_err(|e| Error::io(format!("reading {f}"), e))?;
        if cur.trim() != "1" {
            std::fs::write(f, "1")
                .map_err(|e| Error::io(format!("enabling forwarding in {f}"), e))?;
        }
    }
    Ok(())
}

/// Removes everything of one attachment, keeping going on errors. First the host veth goes down,
/// which takes the pod off the network (its routes die with the link state); then the slow kernel
/// deletion of the pair runs (in DEL's reaper, or here on a thread beside) while, under the lock,
/// the pending mark and the record are removed, and after them the IPAM reservation. So an address
/// is never free while our mark for it could still be removed, and a pod is never reachable without
/// its mark. The reaper is let go only once the link is down; otherwise the pair is deleted here.
async fn teardown(
    node: &Netlink,
    conf: &NetConf,
    env: &Env,
    target: &DelegateTarget,
    host_veth: &str,
    reaper: Option<Reaper>,
) -> Result<()> {
    let mut errors = Errors::default();
    let down = errors.keep(node.set_down_by_name(host_veth).await);
    if let (Some(reaper), Some(_)) = (reaper, down) {
        if let Err(e) = reaper.delete_link_now() {
            tracing::warn!(error = %e, link = %host_veth, "the reaper is gone; deleting the host veth before DEL answers");
            errors.keep(node.delete_link(host_veth).await);
        }
        let mut writer = ElementWriter::new();
        errors.keep(release(&mut writer, conf, env, target));
        // Our nf_tables socket's close may wait for others' commits; the reaper closes it.
        if let Some(sock) = writer.into_fd() {
            if let Err(e) = reaper.adopt(sock) {
                tracing::debug!(error = %e, "the reaper did not take our nf_tables socket; closing it here");
            }
        }
        return errors.into_result();
    }
    let exists = down.unwrap_or(true);
    let (conf_c, env_c, target_c) = (conf.clone(), env.clone(), target.clone());
    let records = std::thread::Builder::new()
        .name("teardown".into())
        .spawn(move || release(&mut ElementWriter::new(), &conf_c, &env_c, &target_c))
        .map_err(|e| Error::io("spawning the teardown thread", e));
    if exists {
        errors.keep(node.delete_link(host_veth).await);
    }
    match records {
        Ok(handle) => {
            errors.keep(
                handle
                    .join()
                    .map_err(|_| Error::io("teardown thread", std::io::Error::other("panicked")))
                    .and_then(|r| r),
            );
        }
        Err(e) => {
            errors.keep::<()>(Err(e));
        }
    }
    errors.into_result()
}

/// What an attachment holds besides its link: under the lock its pending mark and record, then
/// its address (in that order: an address is never free while our mark for it could still go).
fn release(
    writer: &mut ElementWriter,
    conf: &NetConf,
    env: &Env,
    target: &DelegateTarget,
) -> Result<()> {
    let mut errors = Errors::default();
    errors.keep(unmark_and_unrecord(
        writer,
        conf,
        &target.container_id,
        &target.ifname,
    ));
    errors.keep(ipam::release(conf, env, target));
    errors.into_result()
}

fn unmark_and_unrecord(
    writer: &mut ElementWriter,
    conf: &NetConf,
    container_id: &str,
    ifname: &str,
) -> Result<()> {
    let _lock = pending::lock_node(&conf.state_dir)?;
    let record = match contract::records::read(&conf.state_dir, container_id, ifname) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable attachment record; removing it");
            None
        }
    };
    if let Some(r) = record.as_ref().filter(|r| r.pending) {
        pending::unmark(writer, &r.ips)?;
    }
    contract::records::remove(&conf.state_dir, container_id, ifname)?;
    Ok(())
}

/// Refuses a record that names a link the plugin could not have made (see
/// [`Attachment::verify_own`]): DEL and GC then delete nothing for it.
fn verify_record(path: &std::path::Path, record: &Attachment) -> Result<()> {
    record
        .verify_own(path)
        .map_err(|reason| Error::ForeignRecord {
            path: path.to_path_buf(),
            reason,
        })
}

/// DEL: idempotent; works with the netns gone or unset (nothing here needs it). A record of this
/// attachment that names a foreign link is refused before anything is touched. DEL answers once
/// the pod is off the network and its mark, record and address are released; the veth pair's
/// deletion (the kernel's slow part) finishes in the reaper (`reaper`) right after.
pub fn del(env: &Env, conf: &NetConf) -> Result<()> {
    let host_veth = contract::host_veth_name(&env.container_id, &env.ifname);
    // An unreadable record is the teardown's business (it warns and removes it).
    if let Ok(Some(record)) =
        contract::records::read(&conf.state_dir, &env.container_id, &env.ifname)
    {
        let path = contract::attachment_path(&conf.state_dir, &env.container_id, &env.ifname);
        verify_record(&path, &record)?;
    }
    // Forked before the runtime exists (one thread); it deletes the pair after we let it go.
    let reaper = reaper::fork_for(&host_veth).unwrap_or_else(|e| {
        tracing::warn!(error = %e, link = %host_veth, "no reaper for the host veth; deleting it before DEL answers");
        None
    });
    runtime()?.block_on(async {
        let node = Netlink::current()?;
        teardown(
            &node,
            conf,
            env,
            &DelegateTarget::from_env(env),
            &host_veth,
            reaper,
        )
        .await
    })
}

/// CHECK: the attachment still looks as ADD left it (allowing additions by later plugins).
pub fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| Error::config("prevResult", "missing: CHECK needs the cached ADD result"))?;
    let path = netns_path(env)?;
    let pod_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox == path)
        .ok_or_else(|| {
            Error::CheckFailed(format!(
                "prevResult has no interface {} in sandbox {path}",
                env.ifname
            ))
        })?;
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|i| i.interface.is_none_or(|x| x == pod_if))
        .map(|i| i.address.addr())
        .collect();
    let ns = open_pod_netns(env)?;
    let host_veth = contract::host_veth_name(&env.container_id, &env.ifname);
    let record = contract::records::read(&conf.state_dir, &env.container_id, &env.ifname)?
        .ok_or_else(|| {
            Error::CheckFailed(format!(
                "no attachment record for {}/{}",
                env.container_id, env.ifname
            ))
        })?;
    if record.ips != ips {
        return Err(Error::CheckFailed(format!(
            "record has {:?}, prevResult has {ips:?}",
            record.ips
        )));
    }
    runtime()?.block_on(async {
        let node = Netlink::current()?;
        let pod = Netlink::from_socket(netns::netlink_socket_in(&ns)?)?;
        let host = node
            .link_by_name(&host_veth)
            .await?
            .ok_or_else(|| Error::CheckFailed(format!("host veth {host_veth} is missing")))?;
        if !host.up {
            return Err(Error::CheckFailed(format!("host veth {host_veth} is down")));
        }
        let link = pod.link_by_name(&env.ifname).await?.ok_or_else(|| {
            Error::CheckFailed(format!("interface {} is missing in {path}", env.ifname))
        })?;
        if !link.up {
            return Err(Error::CheckFailed(format!(
                "interface {} is down",
                env.ifname
            )));
        }
        let addrs = pod.addresses(link.index).await?;
        let node_routes = node.routes().await?;
        for ip in &ips {
            if !addrs.iter().any(|a| a.addr() == *ip) {
                return Err(Error::CheckFailed(format!(
                    "{ip} is not on {} in {path}",
                    env.ifname
                )));
            }
            let want = veth::host_prefix(*ip);
            if !node_routes
                .iter()
                .any(|r| r.dst == want && r.oif == Some(host.index))
            {
                return Err(Error::CheckFailed(format!(
                    "node route {want} dev {host_veth} is missing"
                )));
            }
        }
        let pod_routes = pod.routes().await?;
        for r in prev.routes.iter() {
            if !pod_routes
                .iter()
                .any(|p| p.dst == r.dst && (r.gw.is_none() || p.gw == r.gw))
            {
                return Err(Error::CheckFailed(format!(
                    "pod route {} via {:?} is missing",
                    r.dst, r.gw
                )));
            }
        }
        Ok(())
    })?;
    ipam::check(conf, env, &ips)
}

/// STATUS: ready when our table exists (or the network fails open) and IPAM is usable.
pub fn status(env: &Env, conf: &NetConf) -> Result<()> {
    if !conf.fail_open && !pending::table_ready()? {
        return Err(Error::NotAvailable(pending::agent_absent_message()));
    }
    ipam::status(conf, env)
}

/// GC: tears down every recorded attachment not in the valid list, then IPAM's leftovers.
pub fn gc(env: &Env, conf: &NetConf) -> Result<()> {
    let valid: HashSet<AttachmentKey> = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| {
            Error::config(
                crate::config::VALID_ATTACHMENTS_KEY,
                "missing: GC needs the list of attachments in use",
            )
        })?
        .into_iter()
        .collect();
    let (records, bad) = contract::read_attachment_files(&conf.state_dir);
    for (path, e) in bad {
        tracing::warn!(path = %path.display(), error = %e, "GC: skipping an unreadable attachment record; remove it by hand if stale");
    }
    let mut errors = Errors::default();
    // A refused record keeps everything, its built-in IPAM reservation too: the address stays taken
    // until someone looks at the record.
    let mut keep = valid.clone();
    runtime()?.block_on(async {
        let node = Netlink::current()?;
        for (path, r) in records.iter().filter(|(_, r)| !valid.contains(&r.key())) {
            if let Err(e) = verify_record(path, r) {
                tracing::error!(error = %e, "GC: refusing a stale attachment record that names a link we could not have made");
                errors.keep::<()>(Err(e));
                keep.insert(r.key());
                continue;
            }
            tracing::info!(container = %r.container_id, ifname = %r.ifname, pod = ?r.pod_key(), "GC: removing stale attachment");
            let target = DelegateTarget { container_id: r.container_id.clone(), ifname: r.ifname.clone(), netns: None };
            errors.keep(teardown(&node, conf, env, &target, &r.host_veth, None).await);
        }
        Ok::<_, Error>(())
    })?;
    errors.keep(ipam::gc(conf, env, &keep));
    errors.into_result()
}
