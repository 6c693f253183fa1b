//! The netlink transport: a neli `NlSocket` (plain socket; neli's router
//! sends one message per `send()`, and a batch must go in one), strictly
//! increasing sequence numbers, and replies matched to what was sent.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use neli::consts::socket::{Msg as MsgFlags, NlFamily};
use neli::socket::NlSocket;
use neli::utils::Groups;

use crate::wire::{self, ErrorMsg, Msg};

/// Room for a dump part or a burst of acks.
const RECV_BUF: usize = 256 * 1024;
/// A reply to a request that the kernel answers synchronously. Exceeding it
/// means something is badly wrong; say so instead of hanging.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum NlError {
    /// The kernel refused a message: its errno, and where, if it said.
    Kernel(ErrorMsg),
    Io(io::Error),
    Malformed(wire::Malformed),
    /// No answer in time, or answers were lost (ENOBUFS): outcome unknown.
    Unknown(&'static str),
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NlError::Kernel(e) => {
                write!(f, "{}", io::Error::from_raw_os_error(e.errno))?;
                if let Some(m) = &e.ext_msg {
                    write!(f, " ({m})")?;
                }
                Ok(())
            }
            NlError::Io(e) => write!(f, "{e}"),
            NlError::Malformed(m) => write!(f, "{m}"),
            NlError::Unknown(w) => f.write_str(w),
        }
    }
}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> Self {
        NlError::Io(e)
    }
}

impl From<wire::Malformed> for NlError {
    fn from(e: wire::Malformed) -> Self {
        NlError::Malformed(e)
    }
}

pub struct Socket {
    sock: NlSocket,
    seq: u32,
    buf: Vec<u8>,
    /// The buffer sizes asked for so far; they only grow.
    rcvbuf: std::cell::Cell<usize>,
    sndbuf: std::cell::Cell<usize>,
}

impl Socket {
    /// `family` is `NlFamily::Netfilter` or `NlFamily::Route`.
    pub fn open(family: NlFamily) -> io::Result<Socket> {
        let sock = NlSocket::connect(family, None, Groups::empty())?;
        // Errors say which attribute they blame; acks don't echo our
        // (possibly 60 KiB) messages back.
        let _ = sock.enable_ext_ack(true);
        setsockopt_int(borrow(&sock), libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = sock.enable_strict_checking(true);
        // Start from the clock so a restarted daemon never reuses the
        // sequence numbers of a previous run's late replies.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32 & 0x3fff_ffff)
            | 1;
        Ok(Socket {
            sock,
            seq,
            buf: vec![0; RECV_BUF],
            rcvbuf: std::cell::Cell::new(0),
            sndbuf: std::cell::Cell::new(160 * 1024),
        })
    }

    /// Subscribes to a multicast group (events); the receive buffer is made
    /// large so bursts of events fit, since a lost event means a full resync.
    pub fn subscribe(family: NlFamily, group: u32, rcvbuf: usize) -> io::Result<Socket> {
        let s = Socket::open(family)?;
        s.sock.add_mcast_membership(Groups::new_groups(&[group]))?;
        s.reserve(rcvbuf);
        s.sock.nonblock()?;
        Ok(s)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        borrow(&self.sock)
    }

    /// The next unused sequence number.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Marks every sequence number up to `last` as used.
    pub fn used_up_to(&mut self, last: u32) {
        self.seq = last.wrapping_add(1).max(1);
    }

    /// One sequence number for a single request.
    pub fn seq(&mut self) -> u32 {
        let s = self.seq;
        self.used_up_to(s);
        s
    }

    /// Grows the receive buffer to at least `bytes` (one setsockopt, and
    /// only when it must grow).
    pub fn reserve(&self, bytes: usize) {
        if bytes > self.rcvbuf.get() {
            grow_buf(self.fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes);
            self.rcvbuf.set(bytes);
        }
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NlError> {
        // A batch goes out in one send(), which netlink refuses with
        // EMSGSIZE past the send buffer (~200 KiB by default: ~4,000
        // elements). Grow it to fit; it only ever grows.
        let need = bytes.len() + 4096;
        if need > self.sndbuf.get() {
            grow_buf(self.fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, need);
            self.sndbuf.set(need);
        }
        let n = self.sock.send(bytes, MsgFlags::empty())?;
        if n != bytes.len() {
            return Err(NlError::Unknown("short send to netlink"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for something to read; false on timeout.
    fn wait(&self, timeout: Duration) -> Result<bool, NlError> {
        use rustix::event::{PollFd, PollFlags, poll};
        let fd = self.fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        loop {
            match poll(&mut fds, Some(&ts)) {
                Ok(n) => return Ok(n > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(NlError::Io(e.into())),
            }
        }
    }

    /// Receives one datagram into the buffer; its length, or `None` when
    /// nothing is queued (non-blocking) or the wait timed out (blocking).
    fn recv(&mut self, block: bool) -> Result<Option<usize>, NlError> {
        loop {
            match self.sock.recv(&mut self.buf[..], MsgFlags::DONTWAIT) {
                // A datagram larger than the buffer is truncated; the message
                // iterator then stops at the cut header, reported as malformed.
                Ok((n, _)) => return Ok(Some(n.min(RECV_BUF))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NlError::Unknown("netlink messages were lost (ENOBUFS)"));
                }
                Err(e) => return Err(NlError::Io(e)),
            }
            if !block {
                return Ok(None);
            }
            if !self.wait(REPLY_TIMEOUT)? {
                return Err(NlError::Unknown("no answer from the kernel"));
            }
        }
    }

    /// Calls `f` for every message queued now; never blocks. For event sockets.
    pub fn drain(&mut self, mut f: impl FnMut(&Msg<'_>)) -> Result<(), NlError> {
        while let Some(n) = self.recv(false)? {
            for m in wire::messages(&self.buf[..n]) {
                f(&m?);
            }
        }
        Ok(())
    }

    /// Sends a whole nf_tables batch in one `send()` and collects the answer
    /// of every message that asked for one. The kernel processes the batch
    /// inside `send()`, so all answers are queued when it returns. Returns
    /// the errors, in order; empty means committed.
    pub fn commit(
        &mut self,
        bytes: &[u8],
        acked: &[u32],
        begin_seq: u32,
    ) -> Result<Vec<ErrorMsg>, NlError> {
        // About 1 KiB per answer, or acks get lost (ENOBUFS).
        self.reserve((acked.len() + 16) * 1024);
        self.send(bytes)?;
        let mut pending: std::collections::HashSet<u32> = acked.iter().copied().collect();
        let mut errors = Vec::new();
        while !pending.is_empty() {
            let Some(n) = self.recv(true)? else { break };
            for m in wire::messages(&self.buf[..n]) {
                let m = m?;
                if m.ty != wire::NLMSG_ERROR {
                    continue;
                }
                let e = wire::parse_error(&m)?;
                // A failed commit is reported against BEGIN, which asked for no ack.
                let ours = pending.remove(&e.seq) || e.seq == begin_seq;
                if ours && e.errno != 0 {
                    errors.push(e);
                }
            }
        }
        Ok(errors)
    }

    /// Sends one request and feeds every reply message to `f` until the ack
    /// (or, for a dump, NLMSG_DONE). A kernel error ends it with `Kernel`.
    pub fn request(
        &mut self,
        bytes: &[u8],
        seq: u32,
        dump: bool,
        mut f: impl FnMut(&Msg<'_>) -> Result<(), NlError>,
    ) -> Result<(), NlError> {
        self.send(bytes)?;
        loop {
            let Some(n) = self.recv(true)? else {
                return Err(NlError::Unknown("no answer from the kernel"));
            };
            for m in wire::messages(&self.buf[..n]) {
                let m = m?;
                if m.seq != seq {
                    continue; // a late reply to something earlier
                }
                match m.ty {
                    wire::NLMSG_ERROR => {
                        let e = wire::parse_error(&m)?;
                        if e.errno != 0 {
                            return Err(NlError::Kernel(e));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    wire::NLMSG_DONE => return Ok(()),
                    wire::NLMSG_OVERRUN => return Err(NlError::Unknown("netlink overrun")),
                    _ if m.flags & wire::NLM_F_DUMP_INTR != 0 => {
                        return Err(NlError::Unknown("interrupted dump"));
                    }
                    _ if m.ty >= wire::NLMSG_MIN_TYPE => f(&m)?,
                    _ => {}
                }
            }
        }
    }
}

/// neli's socket implements only `AsRawFd`.
fn borrow(sock: &NlSocket) -> BorrowedFd<'_> {
    // SAFETY: the fd is open for as long as `sock` lives, which bounds the borrow.
    unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) }
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, val: i32) -> bool {
    // SAFETY: a valid fd, and a pointer to an int that outlives the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        ) == 0
    }
}

/// The FORCE variants (CAP_NET_ADMIN, which we have) ignore the rmem_max /
/// wmem_max sysctls; fall back to the plain ones, capped by them.
fn grow_buf(fd: BorrowedFd<'_>, force: i32, plain: i32, size: usize) {
    let size = size.min(i32::MAX as usize / 2) as i32;
    if !setsockopt_int(fd, libc::SOL_SOCKET, force, size) {
        setsockopt_int(fd, libc::SOL_SOCKET, plain, size);
    }
}
