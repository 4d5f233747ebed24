//! The NFLOG edge: binds our log group on an nfnetlink socket in the node's namespace and turns
//! what the kernel hands over into [`Logged`] packets. The kernel has already rate-limited them
//! (`limit` before `log` in our rules); what the socket cannot hold is dropped by the kernel
//! (ENOBUFS here), never queued without bound.

use super::packet;
use super::record::{Kind, Logged};
use crate::error::{Error, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, PacketNla, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use palisade_policy::model::Direction;
use palisade_policy::ruleset::names::{
    FLOW_PREFIX_ALLOW, FLOW_PREFIX_AUDIT_EGRESS, FLOW_PREFIX_AUDIT_INGRESS, FLOW_PREFIX_DROP,
    FLOW_SNAPLEN,
};

/// Socket receive buffer: ~2 s of the default rate at its burst, with room to spare.
const RCVBUF: usize = 1 << 20;

/// What one read gave.
#[derive(Debug, Default)]
pub struct Read {
    pub packets: Vec<Logged>,
    /// Logged packets we could not read (not IP, cut short, an unknown prefix).
    pub unreadable: u64,
    /// The kernel dropped log messages because the socket was full.
    pub overflowed: bool,
}

/// Our NFLOG group, bound.
pub struct NflogSocket {
    socket: Socket,
    buf: Vec<u8>,
}

fn io(action: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::FlowLog { action, source }
}

impl NflogSocket {
    /// Binds `group` in the calling thread's network namespace, asking for the first
    /// [`FLOW_SNAPLEN`] bytes of each packet, delivered at once (queue threshold 1).
    pub fn bind(group: u16) -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("open NFLOG socket"))?;
        socket.bind_auto().map_err(io("bind NFLOG socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("connect NFLOG socket"))?;
        socket
            .set_rx_buf_sz(RCVBUF)
            .map_err(io("size NFLOG socket buffer"))?;
        let mut s = NflogSocket {
            socket,
            buf: vec![0; 1 << 16],
        };
        s.configure(
            group,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(FLOW_SNAPLEN).into(),
                netlink_packet_netfilter::nflog::ConfigNla::QThresh(1),
            ],
        )?;
        Ok(s)
    }

    /// Sends one config request and waits for its acknowledgement (an EBUSY here: another process
    /// of this namespace has bound the group).
    fn configure(
        &mut self,
        group: u16,
        nlas: Vec<netlink_packet_netfilter::nflog::ConfigNla>,
    ) -> Result<()> {
        let mut req = config_request(NetfilterProtoFamily::Unspec, group, nlas);
        req.finalize();
        let mut out = vec![0; req.header.length as usize];
        req.serialize(&mut out);
        self.socket.send(&out, 0).map_err(io("send NFLOG config"))?;
        let n = self
            .socket
            .recv(&mut &mut self.buf[..], 0)
            .map_err(io("read NFLOG config answer"))?;
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[..n]).map_err(|e| {
            Error::FlowLog {
                action: "decode NFLOG config answer",
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }
        })?;
        match msg.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(code) => Err(Error::FlowLog {
                    action: "bind NFLOG group (is another process of this node logging to it? see --flow-log-group)",
                    source: std::io::Error::from_raw_os_error(-code.get()),
                }),
            },
            _ => Ok(()),
        }
    }

    /// Blocks until the kernel hands over log messages; reads what one datagram holds.
    pub fn read(&mut self) -> Result<Read> {
        let mut out = Read::default();
        let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                out.overflowed = true;
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(out),
            Err(e) => {
                return Err(Error::FlowLog {
                    action: "read NFLOG socket",
                    source: e,
                })
            }
        };
        let mut at = 0;
        while at < n {
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[at..n]) else {
                out.unreadable += 1;
                break;
            };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = &msg.payload
            {
                match logged(nlas) {
                    Some(l) => out.packets.push(l),
                    None => out.unreadable += 1,
                }
            }
            if len == 0 {
                break;
            }
            // Netlink messages are 4-byte aligned in a datagram.
            at += (len + 3) & !3;
        }
        Ok(out)
    }
}

/// One NFLOG packet message: our prefix, the packet's first bytes, and whether it came in through
/// an interface (a packet this node sent has none).
fn logged(nlas: &[PacketNla]) -> Option<Logged> {
    let mut kind = None;
    let mut payload = None;
    let mut from_this_node = true;
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => {
                kind = match p.to_bytes() {
                    b if b == FLOW_PREFIX_DROP.as_bytes() => Some(Kind::Dropped),
                    b if b == FLOW_PREFIX_ALLOW.as_bytes() => Some(Kind::Allowed),
                    b if b == FLOW_PREFIX_AUDIT_INGRESS.as_bytes() => {
                        Some(Kind::WouldDrop(Direction::Ingress))
                    }
                    b if b == FLOW_PREFIX_AUDIT_EGRESS.as_bytes() => {
                        Some(Kind::WouldDrop(Direction::Egress))
                    }
                    _ => None,
                }
            }
            PacketNla::Payload(bytes) => payload = Some(bytes.as_slice()),
            PacketNla::IfIndexInDev(_) => from_this_node = false,
            _ => {}
        }
    }
    Some(Logged {
        kind: kind?,
        facts: packet::parse(payload?).ok()?,
        from_this_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn ipv4_syn() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend([0x9c, 0x40, 0, 80, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn a_packet_message_needs_our_prefix_and_a_readable_payload() {
        let drop = [
            PacketNla::Prefix(CString::new(FLOW_PREFIX_DROP).unwrap()),
            PacketNla::IfIndexInDev(4),
            PacketNla::Payload(ipv4_syn()),
        ];
        let l = logged(&drop).unwrap();
        assert_eq!(l.kind, Kind::Dropped);
        assert!(!l.from_this_node);
        assert_eq!(l.facts.ports, Some((40000, 80)));

        let local = [
            PacketNla::Prefix(CString::new(FLOW_PREFIX_ALLOW).unwrap()),
            PacketNla::Payload(ipv4_syn()),
        ];
        let l = logged(&local).unwrap();
        assert_eq!(l.kind, Kind::Allowed);
        assert!(l.from_this_node, "no input interface: this node sent it");

        let foreign = [
            PacketNla::Prefix(CString::new("someone else").unwrap()),
            PacketNla::Payload(ipv4_syn()),
        ];
        assert_eq!(logged(&foreign), None);
        let cut = [
            PacketNla::Prefix(CString::new(FLOW_PREFIX_DROP).unwrap()),
            PacketNla::Payload(vec![0x45, 0]),
        ];
        assert_eq!(logged(&cut), None);
    }
}
