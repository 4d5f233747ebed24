//! A netlink attribute writer: type-length-value records appended to one buffer, nests closed by
//! patching their length. Hand-written rather than netlink-packet-netfilter's typed attributes:
//! that crate has 6 of the 13 expression kinds a ruleset needs and no object messages, and a
//! 10k-pod table is ~12k messages that must encode in a few milliseconds (one buffer, no per-object
//! allocation).

/// `NLA_F_NESTED`: the attribute holds attributes.
const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute header bytes (`struct nlattr`).
const NLA_HDRLEN: usize = 4;

/// Bytes appended to one buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

/// An open nest: where its header sits.
#[must_use = "a nest must be closed with `end`"]
pub(crate) struct Nest(usize);

/// Zero bytes up to the next multiple of 4 (netlink attributes and nf_tables register fields).
pub(crate) fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

impl Writer {
    pub(crate) fn bytes(&mut self, kind: u16, value: &[u8]) {
        let len = NLA_HDRLEN + value.len();
        // Every value here is far below 64 KiB (a set element message is chunked before that).
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        pad(&mut self.buf);
    }
    /// A string with its terminating NUL (what the kernel's `NLA_STRING` policies accept either way).
    pub(crate) fn strz(&mut self, kind: u16, s: &str) {
        let len = NLA_HDRLEN + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        pad(&mut self.buf);
    }
    /// nf_tables integers are big endian.
    pub(crate) fn u32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, kind: u16, v: u64) {
        self.bytes(kind, &v.to_be_bytes());
    }
    pub(crate) fn begin(&mut self, kind: u16) -> Nest {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        Nest(at)
    }
    pub(crate) fn end(&mut self, nest: Nest) {
        let len = (self.buf.len() - nest.0) as u16;
        self.buf[nest.0..nest.0 + 2].copy_from_slice(&len.to_ne_bytes());
    }
    /// Bytes written since `nest` opened (to keep a nest under the 64 KiB an attribute can hold).
    pub(crate) fn nest_len(&self, nest: &Nest) -> usize {
        self.buf.len() - nest.0
    }
}

/// User data records (`libnftnl`'s udata): type, length, value, no padding.
pub(crate) fn udata(records: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, value) in records {
        out.push(*kind);
        // Comments are capped at MAX_COMMENT_BYTES; every other record is a few bytes.
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_carry_their_length() {
        let mut w = Writer::default();
        let n = w.begin(4);
        w.strz(1, "ab");
        w.u32(2, 7);
        w.end(n);
        assert_eq!(
            w.buf,
            [
                20, 0, 4, 0x80, // nest, 20 bytes
                7, 0, 1, 0, b'a', b'b', 0, 0, // "ab\0" padded
                8, 0, 2, 0, 0, 0, 0, 7, // big-endian 7
            ]
        );
    }
}
