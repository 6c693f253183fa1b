//! Just enough nf_tables netlink for the benchmark: a socket subscribed to
//! NFNLGRP_NFTABLES (element commit events) and a map dump. Independent of
//! the daemon's own code, so the suite observes the kernel, not the daemon.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NEWSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 12;
const GETSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 13;
pub const DELSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 14;
const NFNLGRP_NFTABLES: u32 = 7;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NFPROTO_INET: u8 = 1;

/// One element committed to (or removed from) the map: its cgroup id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ev {
    Add(u64),
    Del(u64),
}

pub struct Sock {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Sock {
    /// A NETLINK_NETFILTER socket in the calling thread's network
    /// namespace; subscribed to nf_tables events when `events`.
    pub fn new(events: bool) -> io::Result<Sock> {
        // SAFETY: plain socket/bind/setsockopt calls on a fresh fd.
        unsafe {
            let fd = cvt(libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            ))?;
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            cvt(libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ))?;
            let size: libc::c_int = 128 << 20;
            cvt(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                4,
            ))?;
            if events {
                let g = NFNLGRP_NFTABLES;
                cvt(libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    (&g as *const u32).cast(),
                    4,
                ))?;
            }
            Ok(Sock {
                fd,
                buf: vec![0; 1 << 20],
                seq: 1,
            })
        }
    }

    /// Receives once: `Ok(None)` when nothing is queued (`nonblock`) or the
    /// receive timeout passed. ENOBUFS (events lost) is an error.
    pub fn recv_events(
        &mut self,
        nonblock: bool,
        table: &str,
        map: &str,
        out: &mut Vec<Ev>,
    ) -> io::Result<Option<Instant>> {
        let flags = if nonblock { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: receiving into our own buffer.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                flags,
            )
        };
        let t = Instant::now();
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        parse(&self.buf[..n as usize], table, map, out);
        Ok(Some(t))
    }

    /// Blocking receives give up after `ms` milliseconds.
    pub fn set_timeout_ms(&self, ms: i64) {
        let tv = libc::timeval {
            tv_sec: ms / 1000,
            tv_usec: (ms % 1000) * 1000,
        };
        // SAFETY: setsockopt with a valid timeval.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
    }

    /// Discards everything queued.
    pub fn drain(&mut self) {
        let mut v = Vec::new();
        while let Ok(Some(_)) = self.recv_events(true, "", "", &mut v) {
            v.clear();
        }
    }

    /// The keys in the map; `None` when the table or map does not exist.
    ///
    /// A dump read while the kernel resizes the set's hash table (deferred
    /// work after a large commit: rhashtable grows and shrinks on its own)
    /// walks it in another order from one part to the next, and the parts
    /// resume by count: it can list an element twice and skip another,
    /// with no NLM_F_DUMP_INTR (no generation changed). A key listed twice
    /// says that happened: the dump is read again (the set's content is
    /// the same, so one without a repeat is whole). A "map WRONG" of the
    /// suite's cold start (9,782 of 10,001 found right after a 10,000-
    /// element commit, none extra) looked like that.
    pub fn dump(&mut self, table: &str, map: &str) -> io::Result<Option<HashSet<u64>>> {
        let mut attempts = 0;
        'again: loop {
            attempts += 1;
            self.seq += 1;
            let mut m = Vec::new();
            m.extend_from_slice(&0u32.to_ne_bytes()); // length, below
            m.extend_from_slice(&GETSETELEM.to_ne_bytes());
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
            m.extend_from_slice(&flags.to_ne_bytes());
            m.extend_from_slice(&self.seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
            for (ty, s) in [(1u16, table), (2u16, map)] {
                let len = 4 + s.len() + 1;
                m.extend_from_slice(&(len as u16).to_ne_bytes());
                m.extend_from_slice(&ty.to_ne_bytes());
                m.extend_from_slice(s.as_bytes());
                m.push(0);
                while m.len() % 4 != 0 {
                    m.push(0);
                }
            }
            let len = m.len() as u32;
            m[..4].copy_from_slice(&len.to_ne_bytes());
            // SAFETY: sending our own buffer.
            let r = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut keys = HashSet::new();
            let mut repeated = false;
            loop {
                // SAFETY: receiving into our own buffer.
                let n = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        self.buf.as_mut_ptr().cast(),
                        self.buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e);
                }
                let b = &self.buf[..n as usize];
                for (ty, flags, seq, payload) in messages(b) {
                    if seq != self.seq {
                        continue;
                    }
                    if flags & NLM_F_DUMP_INTR != 0 {
                        continue 'again;
                    }
                    match ty {
                        NLMSG_DONE if repeated && attempts < 10 => continue 'again,
                        NLMSG_DONE if repeated => {
                            return Err(io::Error::other(
                                "dump listed a key twice 10 times in a row",
                            ));
                        }
                        NLMSG_DONE => return Ok(Some(keys)),
                        NLMSG_ERROR => {
                            let err = payload
                                .get(..4)
                                .map(|e| i32::from_ne_bytes(e.try_into().unwrap()))
                                .unwrap_or(0);
                            if err == -libc::ENOENT {
                                return Ok(None);
                            }
                            return Err(io::Error::from_raw_os_error(-err));
                        }
                        NEWSETELEM => {
                            if let Some(p) = payload.get(4..) {
                                for (_, _, k) in elements(p) {
                                    repeated |= !keys.insert(k);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// (type, flags, seq, payload) of each netlink message in a datagram.
fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > b.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
        let flags = u16::from_ne_bytes(b[6..8].try_into().unwrap());
        let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap());
        let payload = &b[16..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, flags, seq, payload))
    })
}

/// (type without flags, payload) of each attribute.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(b[0..2].try_into().unwrap()) as usize;
        if len < 4 || len > b.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(b[2..4].try_into().unwrap()) & 0x3fff;
        let p = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, p))
    })
}

fn cstr(p: &[u8]) -> &[u8] {
    p.split(|&c| c == 0).next().unwrap_or_default()
}

/// (table, set, key) of each element in a NEWSETELEM/DELSETELEM body
/// (after the nfgenmsg).
fn elements(body: &[u8]) -> Vec<(&[u8], &[u8], u64)> {
    let (mut table, mut set, mut list): (&[u8], &[u8], &[u8]) = (b"", b"", b"");
    for (ty, p) in attrs(body) {
        match ty {
            1 => table = cstr(p),
            2 => set = cstr(p),
            3 => list = p,
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (ty, elem) in attrs(list) {
        if ty != 1 {
            continue;
        }
        for (ty, key) in attrs(elem) {
            if ty != 1 {
                continue;
            }
            for (ty, v) in attrs(key) {
                if ty == 1 && v.len() == 8 {
                    out.push((table, set, u64::from_ne_bytes(v.try_into().unwrap())));
                }
            }
        }
    }
    out
}

/// Element events for `table`/`map` in a datagram (empty names: any).
fn parse(b: &[u8], table: &str, map: &str, out: &mut Vec<Ev>) {
    for (ty, _, _, payload) in messages(b) {
        if ty != NEWSETELEM && ty != DELSETELEM {
            continue;
        }
        let Some(body) = payload.get(4..) else {
            continue;
        };
        for (t, s, k) in elements(body) {
            if (!table.is_empty() && t != table.as_bytes())
                || (!map.is_empty() && s != map.as_bytes())
            {
                continue;
            }
            out.push(if ty == NEWSETELEM {
                Ev::Add(k)
            } else {
                Ev::Del(k)
            });
        }
    }
}
