//! The conntrack entries of this network namespace, kept from conntrack events, so a sweep after a
//! commit judges them without asking the kernel for a dump.
//!
//! A dump walks the kernel's whole conntrack hash table (every namespace's buckets: 262,144 here,
//! ~10 ms) whatever it returns; under 100 changes/s the sweeps were a quarter of the reconcile
//! thread. Instead, a NETLINK_NETFILTER socket subscribed to the NEW and DESTROY conntrack groups
//! tells us every entry confirmed and every entry gone; [`FlowTable::drain`] reads what is queued
//! before each sweep, which then walks this table.
//!
//! It is only trusted while nothing can have been missed: it starts unsynced (filled by the next
//! dump, [`FlowTable::rebuild`]), and goes back to unsynced when the socket overflowed (ENOBUFS),
//! when the table would outgrow [`MAX_ENTRIES`], or while the namespace's
//! `net.netfilter.nf_conntrack_events` is 0 (no events are sent then). A sweep on an unsynced table
//! dumps, as before, and the dump refills it. Events queued before a rebuild are discarded first,
//! and those that arrive during the dump are applied after it, so a flow created or destroyed
//! meanwhile ends up right either way.

use crate::error::{Error, Result};
use netlink_packet_core::{Emitable, NetlinkMessage, NetlinkPayload, Nla};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::collections::HashMap;
use std::os::fd::AsRawFd;

/// `NFNLGRP_CONNTRACK_NEW` and `NFNLGRP_CONNTRACK_DESTROY` as a bind mask (groups 1 and 3).
const GROUPS: u32 = (1 << 0) | (1 << 2);
/// `CTA_ZONE`: part of an entry's identity beside its original tuple.
const CTA_ZONE: u16 = 18;
/// Receive buffer asked for (SO_RCVBUFFORCE): events queue here between sweeps.
const RECEIVE_BUFFER_BYTES: usize = 64 << 20;
/// Most entries kept; a node with more flows sweeps by dumping.
pub const MAX_ENTRIES: usize = 65_536;
/// Where the namespace says whether conntrack events are sent (0: never).
const EVENTS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_events";

/// One entry as its NEW event (or a dump) carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub family: NetfilterProtoFamily,
    pub attrs: Vec<ConntrackAttribute>,
}

/// What [`FlowTable::apply`] learnt from one datagram of events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub new: u64,
    pub destroyed: u64,
    pub undecodable: u64,
}

/// The entries and whether they can be trusted (see the module's notes).
pub struct FlowTable {
    socket: Socket,
    buf: Vec<u8>,
    entries: HashMap<Vec<u8>, Entry>,
    synced: bool,
}

fn nl(action: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Netlink {
        action,
        message: e.to_string(),
    }
}

/// An entry's identity: its original tuple and zone, as the kernel encodes them.
fn key(attrs: &[ConntrackAttribute]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut has_tuple = false;
    for a in attrs {
        let wanted = match a {
            ConntrackAttribute::CtaTupleOrig(_) => {
                has_tuple = true;
                true
            }
            ConntrackAttribute::Other(n) => n.kind() == CTA_ZONE,
            _ => false,
        };
        if wanted {
            let start = out.len();
            out.resize(start + a.buffer_len(), 0);
            a.emit(&mut out[start..]);
        }
    }
    has_tuple.then_some(out)
}

impl FlowTable {
    /// Subscribes to this namespace's conntrack NEW and DESTROY events (the calling thread's
    /// namespace). The table starts unsynced.
    pub fn open() -> Result<Self> {
        let mut socket =
            Socket::new(NETLINK_NETFILTER).map_err(nl("open conntrack event socket"))?;
        socket
            .bind(&SocketAddr::new(0, GROUPS))
            .map_err(nl("subscribe to conntrack events"))?;
        let size = RECEIVE_BUFFER_BYTES as libc::c_int;
        // SAFETY: setsockopt with a pointer to a live c_int and its size. SO_RCVBUFFORCE needs
        // CAP_NET_ADMIN (the agent has it); without it SO_RCVBUF caps at rmem_max.
        unsafe {
            let p = (&size as *const libc::c_int).cast();
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                p,
                len,
            ) != 0
            {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    p,
                    len,
                );
            }
        }
        socket
            .set_non_blocking(true)
            .map_err(nl("conntrack event socket non-blocking"))?;
        Ok(FlowTable {
            socket,
            buf: Vec::with_capacity(1 << 20),
            entries: HashMap::new(),
            synced: false,
        })
    }

    /// Whether a sweep may walk the table instead of dumping: synced, and events are on.
    pub fn usable(&self) -> bool {
        self.synced && events_enabled()
    }

    /// Number of entries kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Reads and applies every queued event. An overflow (events lost) makes the table unsynced.
    pub fn drain(&mut self) -> Result<Applied> {
        let mut total = Applied::default();
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, 0) {
                Ok(_) => {
                    let data = std::mem::take(&mut self.buf);
                    let a = self.apply(&data);
                    self.buf = data;
                    total.new += a.new;
                    total.destroyed += a.destroyed;
                    total.undecodable += a.undecodable;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(total),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        if self.synced {
                            tracing::debug!("conntrack events were lost (receive buffer overrun); the next sweep dumps the table");
                        }
                        self.synced = false;
                    }
                    _ => return Err(nl("read conntrack events")(e)),
                },
            }
        }
    }

    /// Applies one datagram of event messages (pure: no I/O, so tests feed it bytes). While the
    /// table is unsynced nothing is kept (the next rebuild starts from a dump).
    pub fn apply(&mut self, data: &[u8]) -> Applied {
        let mut out = Applied::default();
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            if len < 16 || off + len > data.len() {
                out.undecodable += 1;
                break;
            }
            let bytes = &data[off..off + len];
            off += (len + 3) & !3;
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
                out.undecodable += 1;
                // An event we cannot read may be an entry we would then never judge.
                self.synced = false;
                continue;
            };
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                header,
                inner: NetfilterMessageInner::Conntrack(ct),
                ..
            }) = msg.payload
            else {
                continue;
            };
            match ct {
                ConntrackMessage::New(attrs) => {
                    out.new += 1;
                    self.insert(header.family, attrs);
                }
                ConntrackMessage::Delete(attrs) => {
                    out.destroyed += 1;
                    if let Some(k) = key(&attrs) {
                        self.entries.remove(&k);
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn insert(&mut self, family: NetfilterProtoFamily, attrs: Vec<ConntrackAttribute>) {
        if !self.synced {
            return;
        }
        let Some(k) = key(&attrs) else {
            self.synced = false; // an entry without a tuple: cannot be tracked, so dump next time
            return;
        };
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&k) {
            tracing::debug!(
                max = MAX_ENTRIES,
                "more conntrack entries than the flow table keeps; sweeps dump the table"
            );
            self.synced = false;
            self.entries.clear();
            return;
        }
        self.entries.insert(k, Entry { family, attrs });
    }

    /// Starts a rebuild from a dump: what is queued is stale (the dump will show the kernel's
    /// table), so it is read and dropped, and the entries are forgotten. Call
    /// [`FlowTable::rebuilt`] after the dump, with every entry passed to [`FlowTable::dumped`].
    pub fn begin_rebuild(&mut self) -> Result<()> {
        self.synced = false;
        self.drain()?;
        self.entries.clear();
        self.synced = true; // `dumped` inserts; an overflow meanwhile clears it again
        Ok(())
    }

    /// One entry of the rebuilding dump.
    pub fn dumped(&mut self, family: NetfilterProtoFamily, attrs: &[ConntrackAttribute]) {
        self.insert(family, attrs.to_vec());
    }

    /// The rebuilding dump completed (`ok`) or failed: only a complete one syncs the table.
    pub fn rebuilt(&mut self, ok: bool) {
        if !ok {
            self.synced = false;
            self.entries.clear();
        }
    }
}

/// Whether this namespace sends conntrack events (`nf_conntrack_events` is not 0; 2, the default
/// on recent kernels, sends them while someone listens, as we do).
fn events_enabled() -> bool {
    std::fs::read_to_string(EVENTS_SYSCTL).is_ok_and(|v| v.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_netfilter::conntrack::{IPTuple, ProtoTuple, Protocol as CtProto, Tuple};
    use netlink_packet_netfilter::NetfilterHeader;
    use std::net::IpAddr;

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<Tuple> {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(s),
                IPTuple::DestinationAddress(d),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProto::Tcp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    fn entry(sport: u16) -> Vec<ConntrackAttribute> {
        vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", sport, 80)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.0.2", "10.0.0.1", 80, sport)),
        ]
    }

    fn datagram(msgs: Vec<ConntrackMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut p = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::from(NetfilterMessage::new(
                    NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                    m,
                )),
            );
            p.finalize();
            let start = out.len();
            out.resize(start + p.buffer_len(), 0);
            p.serialize(&mut out[start..]);
        }
        out
    }

    fn table() -> FlowTable {
        let mut t = FlowTable::open().expect("a netlink socket (no privilege needed to open)");
        t.synced = true;
        t
    }

    #[test]
    fn new_events_add_entries_and_destroy_events_remove_them_by_original_tuple() {
        let mut t = table();
        let a = t.apply(&datagram(vec![
            ConntrackMessage::New(entry(1000)),
            ConntrackMessage::New(entry(1001)),
            ConntrackMessage::New(entry(1000)), // the same entry again (dump + event): one
        ]));
        assert_eq!((a.new, a.destroyed, t.len()), (3, 0, 2));
        // A destroy event carries the tuples (and more); the original tuple names the entry.
        let a = t.apply(&datagram(vec![ConntrackMessage::Delete(entry(1000))]));
        assert_eq!((a.destroyed, t.len()), (1, 1));
        assert_eq!(t.entries().next().unwrap().attrs, entry(1001));
    }

    #[test]
    fn an_unsynced_table_keeps_nothing_and_an_unreadable_event_unsyncs_it() {
        let mut t = table();
        t.synced = false;
        t.apply(&datagram(vec![ConntrackMessage::New(entry(1))]));
        assert!(t.is_empty(), "before a dump, events are not enough");
        let mut t = table();
        let mut bad = datagram(vec![ConntrackMessage::New(entry(2))]);
        bad[20] = 0xff; // the first attribute's length, past the message's end
        bad[21] = 0xff;
        t.apply(&bad);
        assert!(
            !t.synced,
            "an event we could not read may be a flow we would miss"
        );
    }

    #[test]
    fn outgrowing_the_cap_unsyncs_the_table_so_sweeps_dump() {
        let mut t = table();
        let msgs: Vec<ConntrackMessage> = (0..=MAX_ENTRIES as u32)
            .map(|i| {
                let src = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                ConntrackMessage::New(vec![ConntrackAttribute::CtaTupleOrig(tuple(
                    &src,
                    "10.255.0.1",
                    1,
                    80,
                ))])
            })
            .collect();
        t.apply(&datagram(msgs));
        assert!(!t.synced && t.is_empty());
    }
}
