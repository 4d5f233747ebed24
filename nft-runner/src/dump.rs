//! Reads one nfnetlink dump (`NLM_F_DUMP`) to its end: the messages of every datagram handed to
//! the caller one at a time, never the whole answer held. Shared by the readers of a table's named
//! counters ([`crate::counters`]) and of its summary ([`crate::summary`]).

use crate::error::Result;
use crate::setelem::{each_message, recv_datagram, Context, RECV_BUFFER};
use netlink_packet_core::{ErrorBuffer, NLMSG_DONE, NLMSG_ERROR};
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

/// A receive buffer for dumps, reused from one dump to the next.
pub(crate) fn buffer() -> Vec<u8> {
    Vec::with_capacity(RECV_BUFFER)
}

/// Sends `request` (one dump request) and hands each answer message to `each` as its netlink
/// message type and payload (nfgenmsg first), until the dump's `NLMSG_DONE`. An error `each`
/// returns is a protocol error of `ctx`; an errno other than ENOENT is `ctx`'s I/O error.
pub(crate) fn dump(
    sock: &netlink_sys::Socket,
    ctx: &Context<'_>,
    request: &[u8],
    buf: &mut Vec<u8>,
    mut each: impl FnMut(u16, &[u8]) -> std::result::Result<(), String>,
) -> Result<End> {
    let sent = sock.send(request, 0).map_err(|e| ctx.io(e))?;
    if sent != request.len() {
        return Err(ctx.protocol(format!("sent {sent} of {} bytes", request.len())));
    }
    let mut interrupted = false;
    loop {
        recv_datagram(sock, buf, 0).map_err(|e| ctx.io(e))?;
        match step(buf, &mut interrupted, &mut each).map_err(|m| ctx.protocol(m))? {
            Step::More => {}
            Step::Done if interrupted => return Ok(End::Interrupted),
            Step::Done => return Ok(End::Complete),
            Step::Errno(libc::ENOENT) => return Ok(End::Absent),
            Step::Errno(errno) => return Err(ctx.io(io::Error::from_raw_os_error(errno))),
        }
    }
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
