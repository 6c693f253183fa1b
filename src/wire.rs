//! Netlink framing: the message header and the attribute (TLV) layout shared by
//! nfnetlink and rtnetlink. A writer that patches lengths when a message or a
//! nest closes, and length-checked readers that never panic on hostile input.
//!
//! Layout (host byte order, everything padded to 4 bytes):
//!
//! ```text
//! nlmsghdr  { len u32, type u16, flags u16, seq u32, pid u32 }   16 bytes
//! nlattr    { len u16, type u16 } payload                          4 + n bytes
//! ```

pub use crate::error::Error;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLA_HDRLEN: usize = 4;
/// Set on nested attributes; the kernel's strict validation wants it.
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// On an NLMSG_ERROR: the original message was not echoed (NETLINK_CAP_ACK).
pub const NLM_F_CAPPED: u16 = 0x100;
/// On an NLMSG_ERROR: extended-ack TLVs follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
/// Types below this are netlink control messages.
pub const NLMSG_MIN_TYPE: u16 = 0x10;

pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one or more netlink messages into a single buffer, so a whole
/// nf_tables batch goes out in one `send()`.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
    msg_start: usize,
    too_long: Option<usize>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a message; close it with [`Writer::end_msg`].
    pub fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32) {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // len, patched in end_msg
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel is 0
    }

    pub fn end_msg(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Bytes written so far in the current message: the offset an extended
    /// ack reports when it blames the next attribute.
    pub fn msg_offset(&self) -> usize {
        self.buf.len() - self.msg_start
    }

    /// Raw fixed header bytes (nfgenmsg, rtmsg, fib_rule_hdr …).
    pub fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }

    pub fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        if len > u16::MAX as usize {
            self.too_long.get_or_insert(len);
        }
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    /// A NUL-terminated string, as nf_tables' NLA_STRING policy expects.
    pub fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    pub fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub fn attr_be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; returns its start for [`Writer::nest_end`].
    pub fn nest_begin(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) {
        let len = self.buf.len() - start;
        if len > u16::MAX as usize {
            self.too_long.get_or_insert(len);
        }
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    /// The finished buffer, or the first attribute that overflowed.
    pub fn finish(self) -> Result<Vec<u8>, Error> {
        match self.too_long {
            Some(n) => Err(Error::TooLong(n)),
            None => Ok(self.buf),
        }
    }
}

/// One message of a received buffer; `payload` excludes the header.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Iterates over the messages in one datagram. Stops with an error at the
/// first header whose length does not fit.
pub struct Msgs<'a> {
    rest: &'a [u8],
}

pub fn messages(buf: &[u8]) -> Msgs<'_> {
    Msgs { rest: buf }
}

impl<'a> Iterator for Msgs<'a> {
    type Item = Result<Msg<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let b = self.rest;
        let (Some(len), Some(ty), Some(flags), Some(seq), Some(pid)) = (
            u32_at(b, 0),
            u16_at(b, 4),
            u16_at(b, 6),
            u32_at(b, 8),
            u32_at(b, 12),
        ) else {
            self.rest = &[];
            return Some(Err(Error::Malformed("truncated message header")));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            self.rest = &[];
            return Some(Err(Error::Malformed("message length out of bounds")));
        }
        self.rest = b.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(Msg {
            ty,
            flags,
            seq,
            pid,
            payload: &b[NLMSG_HDRLEN..len],
        }))
    }
}

/// Iterates over the attributes of a payload (after any fixed header).
/// Yields `(type without flags, payload)`.
#[derive(Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        // Trailing padding shorter than a header is not an attribute.
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let b = self.rest;
        let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) else {
            self.rest = &[];
            return Some(Err(Error::Malformed("truncated attribute header")));
        };
        let len = len as usize;
        if len < NLA_HDRLEN || len > b.len() {
            self.rest = &[];
            return Some(Err(Error::Malformed("attribute length out of bounds")));
        }
        self.rest = b.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty & NLA_TYPE_MASK, &b[NLA_HDRLEN..len])))
    }
}

pub fn be32(p: &[u8]) -> Result<u32, Error> {
    Ok(u32::from_be_bytes(
        p.try_into()
            .map_err(|_| Error::Malformed("expected 4-byte value"))?,
    ))
}

pub fn be64(p: &[u8]) -> Result<u64, Error> {
    Ok(u64::from_be_bytes(
        p.try_into()
            .map_err(|_| Error::Malformed("expected 8-byte value"))?,
    ))
}

pub fn ne32(p: &[u8]) -> Result<u32, Error> {
    Ok(u32::from_ne_bytes(
        p.try_into()
            .map_err(|_| Error::Malformed("expected 4-byte value"))?,
    ))
}

/// A NUL-terminated (or not) string attribute; invalid UTF-8 is replaced.
pub fn string(p: &[u8]) -> String {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

/// The content of an NLMSG_ERROR: errno (0 for an ack), the sequence number
/// of the message it answers, and extended-ack details when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub errno: i32,
    pub seq: u32,
    pub ext_msg: Option<String>,
    /// Byte offset of the offending attribute within the original message.
    pub offset: Option<u32>,
}

pub fn parse_error(m: &Msg<'_>) -> Result<ErrorMsg, Error> {
    let p = m.payload;
    let error = u32_at(p, 0).ok_or(Error::Malformed("truncated error message"))? as i32;
    let orig_len = u32_at(p, 4).ok_or(Error::Malformed("truncated error message"))? as usize;
    let seq = u32_at(p, 12).ok_or(Error::Malformed("truncated error message"))?;
    // The echoed original message is there unless capped, or for acks.
    let echoed = if m.flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        orig_len.max(NLMSG_HDRLEN)
    };
    let mut e = ErrorMsg {
        // wrapping: i32::MIN from a hostile peer must not overflow (found by fuzzing).
        errno: error.wrapping_neg(),
        seq,
        ext_msg: None,
        offset: None,
    };
    if m.flags & NLM_F_ACK_TLVS != 0 {
        let tlvs = p.get(4 + align4(echoed)..).unwrap_or(&[]);
        for a in attrs(tlvs) {
            let (ty, v) = a?;
            match ty {
                NLMSGERR_ATTR_MSG => e.ext_msg = Some(string(v)),
                NLMSGERR_ATTR_OFFS => e.offset = Some(ne32(v)?),
                _ => {}
            }
        }
    }
    Ok(e)
}

/// `msg` (one message) cut to `cut` bytes with its length field saying
/// so: framing accepts it, and the parsers meet the truncation.
#[cfg(test)]
pub(crate) fn truncated(msg: &[u8], cut: usize) -> Vec<u8> {
    let mut t = msg[..cut].to_vec();
    t[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
    t
}

/// As [`truncated`], and every attribute the cut falls in, at every depth
/// of nesting after a fixed header of `fixed` bytes, gets its length field
/// rewritten to end at the cut too: the innermost parser meets it.
#[cfg(test)]
pub(crate) fn truncated_nested(msg: &[u8], cut: usize, fixed: usize) -> Vec<u8> {
    let mut t = truncated(msg, cut);
    let mut at = NLMSG_HDRLEN + fixed;
    let mut end = cut;
    while at + NLA_HDRLEN <= end {
        let len = u16::from_ne_bytes([t[at], t[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([t[at + 2], t[at + 3]]);
        if len < NLA_HDRLEN {
            break;
        }
        if at + len <= end {
            at += align4(len);
            continue;
        }
        t[at..at + 2].copy_from_slice(&((end - at) as u16).to_ne_bytes());
        if ty & NLA_F_NESTED == 0 {
            break;
        }
        end = cut;
        at += NLA_HDRLEN;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_patches_lengths_and_pads() {
        let mut w = Writer::new();
        w.begin_msg(0x0a0c, NLM_F_REQUEST, 7);
        w.put(&[1, 0, 0, 10]);
        let n = w.nest_begin(3);
        w.attr_str(1, "ab"); // 4 + 3 → padded to 8
        w.nest_end(n);
        w.end_msg();
        let b = w.finish().unwrap();
        assert_eq!(b.len(), 16 + 4 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(b[20..22].try_into().unwrap()), 12);
        assert_eq!(
            u16::from_ne_bytes(b[22..24].try_into().unwrap()),
            3 | NLA_F_NESTED
        );
        assert_eq!(&b[24..32], &[7, 0, 1, 0, b'a', b'b', 0, 0]);
    }

    #[test]
    fn writer_reports_overflowing_attribute() {
        let mut w = Writer::new();
        w.begin_msg(1, 0, 1);
        let n = w.nest_begin(3);
        for _ in 0..20000 {
            w.attr_u32(1, 0);
        }
        w.nest_end(n);
        w.end_msg();
        assert!(matches!(w.finish(), Err(Error::TooLong(_))));
    }

    /// Every cut of an error message with extended-ack TLVs, its length
    /// field rewritten to the cut so framing accepts it and the parser
    /// itself meets the truncation; then garbage with a usable length.
    #[test]
    fn readers_never_panic_on_any_prefix_or_garbage() {
        let mut w = Writer::new();
        w.begin_msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 5);
        w.put(&(-2i32).to_ne_bytes());
        w.put(&[0u8; 16]);
        w.attr_str(NLMSGERR_ATTR_MSG, "nope");
        w.attr_u32(NLMSGERR_ATTR_OFFS, 20);
        w.end_msg();
        let b = w.finish().unwrap();
        let whole = parse_error(&messages(&b).next().unwrap().unwrap()).unwrap();
        assert_eq!(
            (whole.errno, whole.ext_msg.as_deref(), whole.offset),
            (2, Some("nope"), Some(20))
        );
        let (mut parsed, mut refused) = (0, 0);
        for cut in NLMSG_HDRLEN..b.len() {
            let t = truncated(&b, cut);
            let m = messages(&t).next().unwrap().expect("framing takes the cut");
            assert_eq!(m.payload.len(), cut - NLMSG_HDRLEN);
            parsed += 1;
            match parse_error(&m) {
                // Only a cut at an attribute boundary still parses, and
                // then it has lost what was cut.
                Ok(e) => assert!(e.offset.is_none(), "cut {cut}: {e:?}"),
                Err(_) => refused += 1,
            }
            for a in attrs(m.payload).flatten() {
                let _ = (be32(a.1), be64(a.1), string(a.1));
            }
        }
        assert_eq!(parsed, b.len() - NLMSG_HDRLEN);
        // Cuts inside errno and the echoed header (16), inside the message
        // TLV (5) and inside the offset TLV (4).
        assert!(refused >= 16 + 5 + 4, "{refused} of {parsed} cuts refused");
        // Deterministic pseudo-random garbage, each vector given a length
        // field that fits it and flags that make the parser read TLVs.
        let mut x: u32 = 0x1234_5678;
        let mut reached = 0;
        for i in 0..2000 {
            let mut v: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let len = 16 + (i % 49);
            v[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
            v[6..8].copy_from_slice(&(NLM_F_ACK_TLVS | (i as u16 & NLM_F_CAPPED)).to_ne_bytes());
            let m = messages(&v).next().unwrap().expect("a fitting length");
            reached += 1;
            let _ = parse_error(&m);
            for _ in attrs(m.payload) {}
        }
        assert_eq!(reached, 2000);
    }

    /// fuzz/artifacts/netlink_reply/crash-6b57ff51…: an error code of i32::MIN.
    #[test]
    fn error_code_i32_min_does_not_overflow() {
        let b = [
            0x20, 0, 0, 0, 0, 0xa6, 0, 0, 0, 0xc7, 0xd7, 0xb3, 0xc7, 0xc7, 0, 0, //
            0, 0, 0, 0x80, 0, 0, 0, 0x28, 0, 0, 0, 0, 0, 0x38, 0xc7, 0xc7,
        ];
        for m in messages(&b).flatten() {
            let _ = parse_error(&m);
        }
    }

    #[test]
    fn parses_error_with_ext_ack() {
        let mut w = Writer::new();
        w.begin_msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 9);
        w.put(&(-2i32).to_ne_bytes());
        // echoed header only (capped): len 40, type, flags, seq 9, pid
        let mut h = Vec::new();
        h.extend_from_slice(&40u32.to_ne_bytes());
        h.extend_from_slice(&0x0a0cu16.to_ne_bytes());
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&9u32.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        w.put(&h);
        w.attr_str(NLMSGERR_ATTR_MSG, "missing");
        w.attr_u32(NLMSGERR_ATTR_OFFS, 24);
        w.end_msg();
        let b = w.finish().unwrap();
        let m = messages(&b).next().unwrap().unwrap();
        let e = parse_error(&m).unwrap();
        assert_eq!(
            e,
            ErrorMsg {
                errno: 2,
                seq: 9,
                ext_msg: Some("missing".into()),
                offset: Some(24)
            }
        );
    }
}
