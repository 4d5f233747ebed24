//! The conntrack socket of a [`super::Revoker`]: GET, DELETE and dump requests over nfnetlink,
//! and the reading of their answers (entries read in place, see [`Entry`]).

use super::Entry;
use crate::error::{Error, Result};
use netlink_packet_core::{
    ErrorMessage, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// Attributes that name one conntrack entry in a GET or DELETE: always an original tuple, with
/// the zone (and, to delete, the id). The kernel takes a DELETE that names no tuple as "flush the
/// whole table", so no request is sent without one: an entry whose tuple the crate cannot parse
/// is left alone (unjudged), never turned into a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EntryKey(pub(super) Vec<ConntrackAttribute>);

impl EntryKey {
    pub(super) fn of(attrs: Vec<ConntrackAttribute>) -> Option<Self> {
        attrs
            .iter()
            .any(|a| matches!(a, ConntrackAttribute::CtaTupleOrig(_)))
            .then_some(EntryKey(attrs))
    }
}

/// Receive buffer: a dump answers in batches of this much at most.
const RECV_BUF: usize = 1 << 20;

pub(super) fn nl(action: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Netlink {
        action,
        message: e.to_string(),
    }
}

/// An nfnetlink socket for conntrack in the calling thread's network namespace.
fn conntrack_socket() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(nl("open conntrack socket"))?;
    socket.bind_auto().map_err(nl("bind conntrack socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(nl("connect conntrack socket"))?;
    Ok(socket)
}

/// What a dump hands each entry to: false to stop reading.
pub(super) type EachEntry<'a> = dyn FnMut(&Entry<'_>) -> bool + 'a;

/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW`: a message that carries one entry.
const CT_NEW: u16 = 1 << 8;
/// Where an entry message's attributes start: after the netlink (16 bytes) and netfilter (4)
/// headers.
const ENTRY_ATTRS: usize = 20;

/// One netlink message of what a read got.
struct Frame<'a> {
    kind: u16,
    seq: u32,
    bytes: &'a [u8],
}

impl Frame<'_> {
    /// The entry it carries, read in place (see [`Entry`]).
    fn entry(&self) -> Option<Entry<'_>> {
        (self.kind == CT_NEW && self.bytes.len() >= ENTRY_ATTRS).then(|| {
            Entry::new(
                NetfilterProtoFamily::from(self.bytes[16]),
                &self.bytes[ENTRY_ATTRS..],
            )
        })
    }

    /// Any other message (a dump's end, an error or acknowledgement), parsed by the crate.
    fn status(&self, action: &'static str) -> Result<NetlinkPayload<NetfilterMessage>> {
        NetlinkMessage::<NetfilterMessage>::deserialize(self.bytes)
            .map(|m| m.payload)
            .map_err(|e| Error::Netlink {
                action,
                message: e.to_string(),
            })
    }
}

/// The messages of one read (`buf`: what it got); a length that overruns it is an error.
fn frames<'a>(buf: &'a [u8], action: &'static str) -> impl Iterator<Item = Result<Frame<'a>>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(off..).filter(|r| r.len() >= 16)?;
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            let e = Error::Netlink {
                action,
                message: format!("truncated message ({len} bytes at {off} of {})", buf.len()),
            };
            off = buf.len();
            return Some(Err(e));
        }
        let bytes = &rest[..len];
        off += (len + 3) & !3;
        Some(Ok(Frame {
            kind: u16::from_ne_bytes([bytes[4], bytes[5]]),
            seq: u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            bytes,
        }))
    })
}

/// The kernel's answer to a GET or DELETE of one entry: true for its acknowledgement, false when
/// there is no such entry (ENOENT), any other error as one naming `action`.
fn acked(e: &ErrorMessage, action: &'static str) -> Result<bool> {
    match e.code {
        None => Ok(true),
        Some(c) if c.get() == -libc::ENOENT => Ok(false),
        Some(_) => Err(Error::Netlink {
            action,
            message: e.to_io().to_string(),
        }),
    }
}

/// The conntrack socket: its requests and the reading of their answers.
pub(super) struct Link {
    socket: Socket,
    seq: u32,
    /// Where answers are read into ([`RECV_BUF`]).
    buf: Vec<u8>,
}

impl Link {
    /// A conntrack socket in the calling thread's network namespace.
    pub(super) fn open() -> Result<Link> {
        Ok(Link {
            socket: conntrack_socket()?,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Ends dump `seq`, whose rest is unread: a fresh socket, since closing this one ends the
    /// kernel's dump at once, where reading its rest would take about as long as judging it did.
    /// Without a new socket, the rest is read.
    pub(super) fn abandon(&mut self, seq: u32) -> Result<()> {
        match conntrack_socket() {
            Ok(fresh) => {
                self.socket = fresh;
                Ok(())
            }
            Err(_) => self.drain(seq),
        }
    }

    /// Sends one conntrack request with the next sequence number, which it returns.
    fn send(
        &mut self,
        family: NetfilterProtoFamily,
        flags: u16,
        msg: ConntrackMessage,
    ) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = flags;
        hdr.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            hdr,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                msg,
            )),
        );
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(nl("send conntrack request"))?;
        Ok(self.seq)
    }

    /// Looks one entry up by original tuple (and zone): its family and attributes (see
    /// [`Entry::new`]); `None` when there is none.
    pub(super) fn get(
        &mut self,
        family: NetfilterProtoFamily,
        key: EntryKey,
    ) -> Result<Option<(NetfilterProtoFamily, Vec<u8>)>> {
        const ACTION: &str = "read conntrack get answer";
        let seq = self.send(
            family,
            NLM_F_REQUEST | NLM_F_ACK,
            ConntrackMessage::Get(key.0),
        )?;
        let mut found = None;
        self.answer(seq, ACTION, |frame| {
            if let Some(e) = frame.entry() {
                found = Some((e.family, frame.bytes[ENTRY_ATTRS..].to_vec()));
                return Ok(None);
            }
            match frame.status(ACTION)? {
                NetlinkPayload::Error(e) => {
                    let there = acked(&e, "look up a conntrack entry")?;
                    Ok(Some(if there { found.take() } else { None }))
                }
                _ => Ok(None),
            }
        })
    }

    /// Deletes one entry; false when it was already gone.
    pub(super) fn delete(&mut self, family: NetfilterProtoFamily, key: EntryKey) -> Result<bool> {
        const ACTION: &str = "read conntrack delete answer";
        let seq = self.send(
            family,
            NLM_F_REQUEST | NLM_F_ACK,
            ConntrackMessage::Delete(key.0),
        )?;
        self.answer(seq, ACTION, |frame| match frame.status(ACTION)? {
            NetlinkPayload::Error(e) => acked(&e, "delete conntrack entry").map(Some),
            _ => Ok(Some(true)),
        })
    }

    pub(super) fn dump(
        &mut self,
        family: NetfilterProtoFamily,
        each: &mut EachEntry<'_>,
    ) -> Result<Option<u32>> {
        let seq = self.ask_dump(family)?;
        self.read(seq, Some(each))
    }

    /// A dump whose entries are received and left unread: what any dump costs at least.
    #[cfg(test)]
    pub(super) fn dump_unread(&mut self, family: NetfilterProtoFamily) -> Result<()> {
        let seq = self.ask_dump(family)?;
        self.drain(seq)
    }

    /// Asks for a dump of `family`'s entries; its sequence number.
    fn ask_dump(&mut self, family: NetfilterProtoFamily) -> Result<u32> {
        self.send(
            family,
            NLM_F_REQUEST | NLM_F_DUMP,
            ConntrackMessage::Get(vec![]),
        )
    }

    /// Reads the rest of dump `seq` without reading its entries, so the socket can dump again.
    fn drain(&mut self, seq: u32) -> Result<()> {
        self.read(seq, None).map(|_| ())
    }

    /// Reads dump `seq`, handing each entry to `each` (none: skipped unread) until its end
    /// (`None`) or until `each` declines (`Some(seq)`: the rest is unread, see [`Link::drain`]).
    fn read(&mut self, seq: u32, mut each: Option<&mut EachEntry<'_>>) -> Result<Option<u32>> {
        const ACTION: &str = "read conntrack dump";
        self.answer(seq, ACTION, |frame| {
            if let Some(e) = frame.entry() {
                let declined = each.as_mut().is_some_and(|each| !each(&e));
                return Ok(declined.then_some(Some(seq)));
            }
            match frame.kind {
                NLMSG_DONE => Ok(Some(None)),
                NLMSG_ERROR => match frame.status(ACTION)? {
                    NetlinkPayload::Error(e) if e.code.is_some() => Err(Error::Netlink {
                        action: "dump conntrack",
                        message: e.to_io().to_string(),
                    }),
                    _ => Ok(None),
                },
                _ => Ok(None),
            }
        })
    }

    /// Reads the answers to request `seq`, handing each of their messages to `on` until it
    /// returns a result (`Some`) or an error.
    fn answer<R>(
        &mut self,
        seq: u32,
        action: &'static str,
        mut on: impl FnMut(&Frame<'_>) -> Result<Option<R>>,
    ) -> Result<R> {
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0).map_err(nl(action))?;
            for frame in frames(&self.buf[..n], action) {
                let frame = frame?;
                if frame.seq == seq {
                    if let Some(r) = on(&frame)? {
                        return Ok(r);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One read holds several messages, each padded to 4 bytes; a length that runs past what was
    /// read is an error (and ends the read), never a slice past the buffer.
    #[test]
    fn a_read_splits_into_its_messages_and_refuses_one_cut_short() {
        fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
            let len = 16 + body.len();
            let mut m = Vec::new();
            m.extend_from_slice(&(len as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(body);
            m.resize((len + 3) & !3, 0);
            m
        }
        let mut buf = message(CT_NEW, 7, &[2, 0, 0, 0, 1]);
        buf.extend(message(NLMSG_DONE, 7, &[0, 0, 0, 0]));
        let got: Vec<(u16, u32, usize)> = frames(&buf, "test")
            .map(|f| f.map(|f| (f.kind, f.seq, f.bytes.len())).unwrap())
            .collect();
        assert_eq!(got, vec![(CT_NEW, 7, 21), (NLMSG_DONE, 7, 20)]);

        let mut cut = message(CT_NEW, 8, &[2, 0, 0, 0]);
        cut[0] = 200; // claims 200 bytes of the 20 read
        let got: Vec<_> = frames(&cut, "test").collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
    }
}
