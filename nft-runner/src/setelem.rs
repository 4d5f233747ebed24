//! Adds and deletes elements of named address sets in one atomic nf_tables transaction by speaking
//! nfnetlink (NETLINK_NETFILTER) directly: no libnftables to load, no nft process, no ruleset cache.
//! An add batch takes about 0.03 ms and a GETSET probe 0.05 ms in a fresh process, where libnftables
//! costs over a millisecond to load. A batch that deletes an element took about 16 ms on Linux 6.18
//! (in the kernel's commit, the same with `nft`): keep deletes out of latency-critical paths.
//!
//! One batch is `NFNL_MSG_BATCH_BEGIN`, one `NFT_MSG_NEWSETELEM`/`NFT_MSG_DELSETELEM` per element,
//! `NFNL_MSG_BATCH_END`; the kernel commits all of it or none of it. Elements are encoded from
//! [`IpAddr`] values only; the only strings that reach the kernel are the table and set names, which
//! must be plain identifiers. Layouts and numbers come from `linux/netlink.h`,
//! `linux/netfilter/nfnetlink.h` and `linux/netfilter/nf_tables.h`.
//!
//! The socket is opened per call in the network namespace of the calling thread.

use crate::error::{Error, Result};
use crate::is_identifier;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/netlink.h
const NETLINK_NETFILTER: libc::c_int = 12;
const NLM_F_REQUEST: u16 = 0x0001;
const NLM_F_ACK: u16 = 0x0004;
const NLM_F_CREATE: u16 = 0x0400;
const NLMSG_ERROR: u16 = 0x0002;
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_ALIGNTO: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNETLINK_V0: u8 = 0;

// linux/netfilter.h
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// linux/netfilter/nf_tables.h: enum nf_tables_msg_types
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
// enum nft_set_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;

/// How long one call waits for the kernel's first answer (it answers while we send, so this only
/// bounds a broken kernel).
const RECV_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 5,
    tv_usec: 0,
};
/// Receive buffer: an error answer echoes the failed message, ours are a few hundred bytes.
const RECV_BUFFER: usize = 64 * 1024;
/// First sequence number of a call (any value works: the socket is ours alone).
const FIRST_SEQ: u32 = 1;

/// What to do with one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOp {
    /// Add the element; an element that is already there is fine (no `NLM_F_EXCL`).
    Add,
    /// Delete the element; one that is not there fails the batch with ENOENT (add it first in the
    /// same batch to delete it whether or not it is there).
    Delete,
}

/// One element change: the operation, the set's name, the address (4 bytes for an `ipv4_addr` set,
/// 16 for an `ipv6_addr` set).
pub type ElementOp<'a> = (SetOp, &'a str, IpAddr);

/// nfnetlink's number for an nft family name (`inet`, `ip`, `ip6`).
pub(crate) fn family_number(action: &'static str, family: &str) -> Result<u8> {
    match family {
        "inet" => Ok(NFPROTO_INET),
        "ip" => Ok(NFPROTO_IPV4),
        "ip6" => Ok(NFPROTO_IPV6),
        other => Err(Error::BadName {
            action,
            name: other.to_string(),
        }),
    }
}

fn check_names<'a>(action: &'static str, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
    match names.into_iter().find(|n| !is_identifier(n)) {
        Some(bad) => Err(Error::BadName {
            action,
            name: bad.to_string(),
        }),
        None => Ok(()),
    }
}

/// Applies `ops` to sets of `table FAMILY TABLE` as one transaction: all of them or none.
/// [`Error::Absent`] when the table or a set does not exist (or a deleted element is not there).
pub fn apply(family: &str, table: &str, ops: &[ElementOp<'_>]) -> Result<()> {
    const ACTION: &str = "set elements";
    let nfproto = family_number(ACTION, family)?;
    check_names(
        ACTION,
        std::iter::once(table).chain(ops.iter().map(|o| o.1)),
    )?;
    if ops.is_empty() {
        return Ok(());
    }
    let batch = encode_batch(nfproto, table, ops, FIRST_SEQ);
    let ctx = Context {
        action: ACTION,
        family,
        table,
        sets: ops.iter().map(|o| o.1).collect(),
    };
    talk(&ctx, &batch, ops.len())
}

/// Whether `set FAMILY TABLE SET` exists (one `NFT_MSG_GETSET`; absence of table or set is `false`).
pub fn set_exists(family: &str, table: &str, set: &str) -> Result<bool> {
    probe("get set", family, table, set, NFT_MSG_GETSET, |buf| {
        put_strz(buf, NFTA_SET_TABLE, table);
        put_strz(buf, NFTA_SET_NAME, set);
    })
}

/// Whether `addr` is an element of `set FAMILY TABLE SET` (one `NFT_MSG_GETSETELEM`, nothing changed).
/// An absent table or set is `false` too: there is no element to remove either way.
///
/// About 0.05 ms, where any batch containing a delete costs ~16 ms in the kernel (Linux 6.18): callers
/// that would delete an element which is usually gone probe first, under a lock every writer holds.
pub fn element_exists(family: &str, table: &str, set: &str, addr: IpAddr) -> Result<bool> {
    probe(
        "get set element",
        family,
        table,
        set,
        NFT_MSG_GETSETELEM,
        |buf| put_element_list(buf, table, set, &addr),
    )
}

/// Sends one read-only nf_tables request `msg` whose attributes `attrs` writes; true when the kernel
/// answers it, false when it says the object (table, set or element) does not exist.
fn probe(
    action: &'static str,
    family: &str,
    table: &str,
    set: &str,
    msg: u16,
    attrs: impl FnOnce(&mut Vec<u8>),
) -> Result<bool> {
    let nfproto = family_number(action, family)?;
    check_names(action, [table, set])?;
    let mut buf = Vec::with_capacity(128);
    let m = begin_msg(
        &mut buf,
        nft_type(msg),
        NLM_F_REQUEST | NLM_F_ACK,
        FIRST_SEQ,
        nfproto,
        0,
    );
    attrs(&mut buf);
    end_msg(&mut buf, m);
    let ctx = Context {
        action,
        family,
        table,
        sets: vec![set],
    };
    match talk(&ctx, &buf, 1) {
        Ok(()) => Ok(true),
        Err(Error::Absent { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The element-list attributes naming one element of `set` in `table`.
fn put_element_list(buf: &mut Vec<u8>, table: &str, set: &str, addr: &IpAddr) {
    put_strz(buf, NFTA_SET_ELEM_LIST_TABLE, table);
    put_strz(buf, NFTA_SET_ELEM_LIST_SET, set);
    let elements = begin_nest(buf, NFTA_SET_ELEM_LIST_ELEMENTS);
    let elem = begin_nest(buf, NFTA_LIST_ELEM);
    let key = begin_nest(buf, NFTA_SET_ELEM_KEY);
    match addr {
        IpAddr::V4(a) => put_attr(buf, NFTA_DATA_VALUE, &a.octets()),
        IpAddr::V6(a) => put_attr(buf, NFTA_DATA_VALUE, &a.octets()),
    }
    end_nest(buf, key);
    end_nest(buf, elem);
    end_nest(buf, elements);
}

/// The message type of an nf_tables message.
fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The batch for `ops`, sequence numbers from `seq` (pure, so its bytes can be tested).
pub(crate) fn encode_batch(nfproto: u8, table: &str, ops: &[ElementOp<'_>], seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + ops.len() * 96);
    let m = begin_msg(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    end_msg(&mut buf, m);
    for (i, (op, set, addr)) in ops.iter().enumerate() {
        let (msg, flags) = match op {
            SetOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
            SetOp::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let m = begin_msg(
            &mut buf,
            nft_type(msg),
            flags,
            seq.wrapping_add(1 + i as u32),
            nfproto,
            0,
        );
        put_element_list(&mut buf, table, set, addr);
        end_msg(&mut buf, m);
    }
    let m = begin_msg(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(1 + ops.len() as u32),
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    end_msg(&mut buf, m);
    buf
}

/// Starts a message (nlmsghdr + nfgenmsg); returns its offset for [`end_msg`].
fn begin_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, nfproto: u8, res_id: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by end_msg
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
    buf.push(nfproto);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

fn end_msg(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(NLA_ALIGNTO) {
        buf.push(0);
    }
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = (NLA_HDRLEN + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad(buf);
}

/// A NUL-terminated string attribute (NLA_STRING as libnftnl sends it).
fn put_strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    put_attr(buf, ty, &v);
}

fn begin_nest(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

fn end_nest(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// What a call is about, for its errors.
struct Context<'a> {
    action: &'static str,
    family: &'a str,
    table: &'a str,
    sets: Vec<&'a str>,
}

impl Context<'_> {
    fn io(&self, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOENT) {
            let mut sets: Vec<String> = self.sets.iter().map(|s| s.to_string()).collect();
            sets.dedup();
            return Error::Absent {
                action: self.action,
                family: self.family.to_string(),
                table: self.table.to_string(),
                sets,
            };
        }
        Error::Netlink {
            action: self.action,
            table: self.table.to_string(),
            source,
        }
    }

    fn protocol(&self, message: impl Into<String>) -> Error {
        Error::Protocol {
            action: self.action,
            message: message.into(),
        }
    }
}

/// Sends `request` on a fresh NETLINK_NETFILTER socket and reads the answers until `acks`
/// acknowledgements arrived or the kernel reported an error. The kernel processes the request
/// while we send, so every answer is queued when `send` returns.
fn talk(ctx: &Context<'_>, request: &[u8], acks: usize) -> Result<()> {
    let sock = open_socket().map_err(|e| ctx.io(e))?;
    let fd = sock.as_raw_fd();
    // SAFETY: sends `request.len()` bytes from a live slice on a socket we own.
    let sent = unsafe { libc::send(fd, request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(ctx.io(io::Error::last_os_error()));
    }
    if sent as usize != request.len() {
        return Err(ctx.protocol(format!("sent {sent} of {} bytes", request.len())));
    }
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut acked = 0;
    let mut received_any = false;
    loop {
        let flags = if received_any { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: receives into a live buffer of `buf.len()` bytes on a socket we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if received_any => {
                    return Err(
                        ctx.protocol(format!("{acked} of {acks} acknowledgements and no error"))
                    )
                }
                _ => return Err(ctx.io(e)),
            }
        }
        received_any = true;
        match parse_answers(&buf[..n as usize]).map_err(|m| ctx.protocol(m))? {
            Answers::Acks(k) => acked += k,
            Answers::Error(errno) => return Err(ctx.io(io::Error::from_raw_os_error(errno))),
        }
        if acked >= acks {
            return Ok(());
        }
    }
}

/// What one datagram from the kernel says.
#[derive(Debug, PartialEq, Eq)]
enum Answers {
    /// This many successful acknowledgements (other messages, such as a GETSET's reply, are skipped).
    Acks(usize),
    /// The first error (a positive errno).
    Error(i32),
}

fn parse_answers(mut data: &[u8]) -> std::result::Result<Answers, String> {
    let mut acks = 0;
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let ty = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!(
                "message length {len} with {} bytes left",
                data.len()
            ));
        }
        // Anything else (a GETSET's reply, NFT_MSG_NEWSET) is not an acknowledgement.
        if ty == NLMSG_ERROR {
            let body = &data[NLMSG_HDRLEN..len];
            if body.len() < 4 {
                return Err("truncated error message".into());
            }
            let err = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            if err == 0 {
                acks += 1;
            } else {
                return Ok(Answers::Error(-err));
            }
        }
        let aligned = (len + NLA_ALIGNTO - 1) & !(NLA_ALIGNTO - 1);
        data = &data[aligned.min(data.len())..];
    }
    Ok(Answers::Acks(acks))
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: setsockopt with a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&RECV_TIMEOUT as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_batch_is_encoded_byte_for_byte_as_nfnetlink_expects() {
        let ops = [(SetOp::Add, "pending_v4", "10.1.0.2".parse().unwrap())];
        let got = encode_batch(NFPROTO_INET, "palisade", &ops, 7);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // BATCH_BEGIN: len 20, type 0x10, flags REQUEST, seq 7, pid 0; nfgenmsg unspec, v0, res_id htons(10)
            &[20u8, 0, 0, 0, 0x10, 0, 0x01, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10][..],
            // NEWSETELEM: len 72, type 0x0a0c, flags REQUEST|ACK|CREATE (0x405), seq 8; nfgenmsg inet, v0, 0
            &[72, 0, 0, 0, 0x0c, 0x0a, 0x05, 0x04, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            // NFTA_SET_ELEM_LIST_TABLE "palisade\0" (len 13, padded to 16)
            &[13, 0, 1, 0, b'p', b'a', b'l', b'i', b's', b'a', b'd', b'e', 0, 0, 0, 0],
            // NFTA_SET_ELEM_LIST_SET "pending_v4\0" (len 15, padded to 16)
            &[15, 0, 2, 0, b'p', b'e', b'n', b'd', b'i', b'n', b'g', b'_', b'v', b'4', 0, 0],
            // ELEMENTS (nested, len 20) > LIST_ELEM (nested, 16) > KEY (nested, 12) > DATA_VALUE (8): 10.1.0.2
            &[20, 0, 0x03, 0x80, 16, 0, 0x01, 0x80, 12, 0, 0x01, 0x80, 8, 0, 1, 0, 10, 1, 0, 2],
            // BATCH_END: len 20, type 0x11, seq 9
            &[20, 0, 0, 0, 0x11, 0, 0x01, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
        ]
        .concat();
        if cfg!(target_endian = "little") {
            assert_eq!(got, want);
        }
        assert_eq!(got.len(), 20 + 72 + 20);
    }

    #[test]
    fn a_delete_has_no_create_flag_and_a_v6_key_is_16_bytes() {
        let ops = [(SetOp::Delete, "pending_v6", "fd00::2".parse().unwrap())];
        let got = encode_batch(NFPROTO_INET, "palisade", &ops, 1);
        let msg = &got[20..];
        let len = u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            u16::from_ne_bytes([msg[4], msg[5]]),
            nft_type(NFT_MSG_DELSETELEM)
        );
        assert_eq!(
            u16::from_ne_bytes([msg[6], msg[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        // The innermost value attribute: 4 header bytes + 16 address bytes, at the end of the message.
        let value = &msg[len - 20..len];
        assert_eq!(u16::from_ne_bytes([value[0], value[1]]), 20);
        let fd00: IpAddr = "fd00::2".parse().unwrap();
        let IpAddr::V6(a) = fd00 else { unreachable!() };
        assert_eq!(&value[4..], &a.octets());
    }

    #[test]
    fn names_that_are_not_identifiers_and_unknown_families_never_reach_the_kernel() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let err = apply("inet", "palisade", &[(SetOp::Add, "x y", a)]).unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
        let err = apply("inet", "pal;isade", &[(SetOp::Add, "s", a)]).unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
        let err = apply("bogus", "palisade", &[(SetOp::Add, "s", a)]).unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
        let err = set_exists("inet", "palisade", "-x").unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
    }

    fn error_msg(errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn answers_count_acks_and_report_the_first_error() {
        let two = [error_msg(0), error_msg(0)].concat();
        assert_eq!(parse_answers(&two), Ok(Answers::Acks(2)));
        let bad = [error_msg(0), error_msg(libc::ENOENT)].concat();
        assert_eq!(parse_answers(&bad), Ok(Answers::Error(libc::ENOENT)));
        assert!(parse_answers(&two[..20]).is_err());
    }
}
