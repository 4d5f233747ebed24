//! Reads nfnetlink dumps (`NLM_F_DUMP`) about one table to their end: the messages of every
//! datagram handed to the caller one at a time, never the whole answer held. Shared by the
//! readers of a table's named counters ([`crate::counters`]) and of its summary
//! ([`crate::summary`]).

use crate::error::{Error, Result};
use crate::setelem::{
    check_names, each_message, family_number, message, open_socket, query_generation,
    recv_datagram, serialize, Context, FIRST_SEQ, RECV_BUFFER,
};
use netlink_packet_core::{ErrorBuffer, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::nftables::NfTablesMessage;
use std::io;

/// `NLM_F_DUMP_INTR`: the ruleset changed while the dump ran; its parts may not agree.
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;

/// How a dump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Every message was read.
    Complete,
    /// Every message was read, but the ruleset changed meanwhile (`NLM_F_DUMP_INTR`).
    Interrupted,
    /// The kernel answered ENOENT: the table (or set) asked about does not exist.
    Absent,
}

/// One NETLINK_NETFILTER socket for the dumps of one call about `table FAMILY TABLE`: the names
/// checked before anything is sent, errors in the call's context, one receive buffer reused from
/// dump to dump.
pub(crate) struct Dumper<'a> {
    sock: netlink_sys::Socket,
    ctx: Context<'a>,
    nfproto: u8,
    buf: Vec<u8>,
}

impl<'a> Dumper<'a> {
    /// A socket for `action` on `table FAMILY TABLE`, which names `sets` too (all of them must be
    /// plain nft identifiers).
    pub(crate) fn open(
        action: &'static str,
        family: &'a str,
        table: &'a str,
        sets: &[&'a str],
    ) -> Result<Self> {
        let nfproto = family_number(action, family)?;
        check_names(action, std::iter::once(table).chain(sets.iter().copied()))?;
        let ctx = Context {
            action,
            family,
            table,
            sets: Vec::new(),
        };
        let sock = open_socket().map_err(|e| ctx.io(e))?;
        Ok(Dumper {
            sock,
            ctx,
            nfproto,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Sends `request` as a dump of the table's family and hands each answer message to `each`
    /// as its netlink message type and payload (nfgenmsg first), until the dump's `NLMSG_DONE`.
    /// An error `each` returns is a protocol error of the call; an errno other than ENOENT is its
    /// I/O error.
    pub(crate) fn dump(
        &mut self,
        request: NfTablesMessage,
        mut each: impl FnMut(u16, &[u8]) -> std::result::Result<(), String>,
    ) -> Result<End> {
        let ctx = &self.ctx;
        let request = serialize(&[message(
            request,
            NLM_F_REQUEST | NLM_F_DUMP,
            FIRST_SEQ,
            self.nfproto.into(),
            0,
        )]);
        let sent = self.sock.send(&request, 0).map_err(|e| ctx.io(e))?;
        if sent != request.len() {
            return Err(ctx.protocol(format!("sent {sent} of {} bytes", request.len())));
        }
        let mut interrupted = false;
        loop {
            recv_datagram(&self.sock, &mut self.buf, 0).map_err(|e| ctx.io(e))?;
            match step(&self.buf, &mut interrupted, &mut each).map_err(|m| ctx.protocol(m))? {
                Step::More => {}
                Step::Done if interrupted => return Ok(End::Interrupted),
                Step::Done => return Ok(End::Complete),
                Step::Errno(libc::ENOENT) => return Ok(End::Absent),
                Step::Errno(errno) => return Err(ctx.io(io::Error::from_raw_os_error(errno))),
            }
        }
    }

    /// The ruleset's generation now (`NFT_MSG_GETGEN`).
    pub(crate) fn generation(&self) -> Result<u32> {
        query_generation(&self.sock, &self.ctx)
    }

    /// The call gave up after `attempts` tries because the ruleset kept changing under it.
    pub(crate) fn unsettled(&self, attempts: usize) -> Error {
        Error::Unsettled {
            action: self.ctx.action,
            attempts,
        }
    }
}

/// `name` as a NUL-terminated attribute value.
pub(crate) fn nul(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// Where a dump is after one datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    More,
    Done,
    Errno(i32),
}

/// Reads one datagram of a dump: each data message to `each`, `interrupted` set when a message
/// carries `NLM_F_DUMP_INTR`.
pub(crate) fn step(
    data: &[u8],
    interrupted: &mut bool,
    each: &mut impl FnMut(u16, &[u8]) -> std::result::Result<(), String>,
) -> std::result::Result<Step, String> {
    let mut step = Step::More;
    each_message(data, |msg| {
        if msg.flags() & NLM_F_DUMP_INTR != 0 {
            *interrupted = true;
        }
        match msg.message_type() {
            NLMSG_DONE => {
                step = Step::Done;
                return Ok(false);
            }
            NLMSG_ERROR => {
                if let Some(code) = ErrorBuffer::new_checked(msg.payload())
                    .map_err(|e| e.to_string())?
                    .code()
                {
                    step = Step::Errno(-code.get());
                    return Ok(false);
                }
            }
            ty => each(ty, msg.payload())?,
        }
        Ok(true)
    })?;
    Ok(step)
}
