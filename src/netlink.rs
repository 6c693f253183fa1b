//! The netlink transport, in two layers:
//!
//! - [`Transport`]: moves datagrams — send one, receive one, join a
//!   multicast group. [`Kernel`] is the real socket (neli's `NlSocket`:
//!   plain, since neli's router sends one message per `send()` and a batch
//!   must go in one); [`fake::Fake`] records what is sent and answers from a
//!   script, so the failure paths can be tested without root (google/nftables'
//!   nftest style).
//! - [`Conn`]: the conversation over any transport and any netlink protocol
//!   (nfnetlink, rtnetlink): strictly increasing sequence numbers, replies
//!   matched to what was sent, a dump's end, an interrupted dump and lost
//!   messages told apart as `crate::error::Error` variants.
//!
//! `Socket` (a `Conn` over the kernel) is what the daemon, `route` and the
//! inspectors hold.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use neli::consts::socket::{Msg as MsgFlags, NlFamily};
use neli::socket::NlSocket;
use neli::utils::Groups;

use crate::error::Error;
use crate::wire::{self, ErrorMsg, Msg};

/// Room for a dump part or a burst of acks.
const RECV_BUF: usize = 256 * 1024;
/// A reply to a request that the kernel answers synchronously. Exceeding it
/// means something is badly wrong; say so instead of hanging.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What moves netlink datagrams. Everything above it (sequence numbers,
/// reply matching, dumps, batches) is in [`Conn`] and works on any of them.
pub trait Transport {
    /// Sends one datagram (a whole batch goes in one).
    fn send(&mut self, bytes: &[u8]) -> Result<(), Error>;
    /// Receives one datagram into `buf`: its length, or `None` when nothing
    /// is queued (`block` false). Blocking waits a bounded time, then
    /// fails with [`Error::Timeout`].
    fn recv(&mut self, buf: &mut [u8], block: bool) -> Result<Option<usize>, Error>;
    /// Joins a multicast group (nf_tables or rtnetlink events).
    fn subscribe(&mut self, group: u32) -> Result<(), Error>;
    /// Makes room for `bytes` of queued replies or events, so bursts are
    /// not lost (ENOBUFS).
    fn reserve(&mut self, bytes: usize);
}

/// The kernel, through a netlink socket.
pub struct Kernel {
    sock: NlSocket,
    /// The buffer sizes asked for so far; they only grow.
    rcvbuf: usize,
    sndbuf: usize,
}

impl Kernel {
    /// `family` is `NlFamily::Netfilter` or `NlFamily::Route`.
    pub fn open(family: NlFamily) -> io::Result<Kernel> {
        let sock = NlSocket::connect(family, None, Groups::empty())?;
        // Errors say which attribute they blame; acks don't echo our
        // (possibly 60 KiB) messages back.
        let _ = sock.enable_ext_ack(true);
        setsockopt_int(borrow(&sock), libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = sock.enable_strict_checking(true);
        Ok(Kernel {
            sock,
            rcvbuf: 0,
            sndbuf: 160 * 1024,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        borrow(&self.sock)
    }

    /// Waits up to `timeout` for something to read; false on timeout.
    fn wait(&self, timeout: Duration) -> Result<bool, Error> {
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
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
    }
}

impl Transport for Kernel {
    fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        // A batch goes out in one send(), which netlink refuses with
        // EMSGSIZE past the send buffer (~200 KiB by default: ~4,000
        // elements). Grow it to fit; it only ever grows.
        let need = bytes.len() + 4096;
        if need > self.sndbuf {
            grow_buf(self.fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, need);
            self.sndbuf = need;
        }
        let n = self.sock.send(bytes, MsgFlags::empty())?;
        if n != bytes.len() {
            return Err(Error::Overrun);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], block: bool) -> Result<Option<usize>, Error> {
        loop {
            match self.sock.recv(&mut *buf, MsgFlags::DONTWAIT) {
                // A datagram larger than the buffer is truncated; the message
                // iterator then stops at the cut header, reported as malformed.
                Ok((n, _)) => return Ok(Some(n.min(buf.len()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(Error::Lost),
                Err(e) => return Err(Error::Io(e)),
            }
            if !block {
                return Ok(None);
            }
            if !self.wait(REPLY_TIMEOUT)? {
                return Err(Error::Timeout);
            }
        }
    }

    fn subscribe(&mut self, group: u32) -> Result<(), Error> {
        self.sock
            .add_mcast_membership(Groups::new_groups(&[group]))?;
        Ok(())
    }

    /// Grows the receive buffer to at least `bytes` (one setsockopt, and
    /// only when it must grow).
    fn reserve(&mut self, bytes: usize) {
        if bytes > self.rcvbuf {
            grow_buf(self.fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes);
            self.rcvbuf = bytes;
        }
    }
}

/// One conversation with the kernel (or a fake) over transport `T`.
pub struct Conn<T: Transport = Kernel> {
    t: T,
    seq: u32,
    buf: Vec<u8>,
}

/// The real thing: a conversation over a netlink socket.
pub type Socket = Conn<Kernel>;

impl Conn<Kernel> {
    /// `family` is `NlFamily::Netfilter` or `NlFamily::Route`.
    pub fn open(family: NlFamily) -> io::Result<Socket> {
        // Start from the clock so a restarted daemon never reuses the
        // sequence numbers of a previous run's late replies.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32 & 0x3fff_ffff)
            | 1;
        Ok(Conn::with_seq(Kernel::open(family)?, seq))
    }

    /// Subscribes to a multicast group (events); the receive buffer is made
    /// large so bursts of events fit, since a lost event means a full resync.
    pub fn subscribe(family: NlFamily, group: u32, rcvbuf: usize) -> io::Result<Socket> {
        let mut s = Socket::open(family)?;
        s.join(group, rcvbuf).map_err(|e| match e {
            Error::Io(e) => e,
            e => io::Error::other(e.to_string()),
        })?;
        s.t.sock.nonblock()?;
        Ok(s)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.t.fd()
    }
}

impl<T: Transport> Conn<T> {
    /// A conversation whose first sequence number is `seq`.
    pub fn with_seq(t: T, seq: u32) -> Conn<T> {
        Conn {
            t,
            seq: seq.max(1),
            buf: vec![0; RECV_BUF],
        }
    }

    /// The transport (a fake's record, for tests).
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// Joins a multicast group, with room for `rcvbuf` bytes of events.
    pub fn join(&mut self, group: u32, rcvbuf: usize) -> Result<(), Error> {
        self.t.subscribe(group)?;
        self.t.reserve(rcvbuf);
        Ok(())
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

    /// Grows the receive buffer to at least `bytes`.
    pub fn reserve(&mut self, bytes: usize) {
        self.t.reserve(bytes);
    }

    /// Calls `f` for every message queued now; never blocks. For event sockets.
    pub fn drain(&mut self, mut f: impl FnMut(&Msg<'_>)) -> Result<(), Error> {
        while let Some(n) = self.t.recv(&mut self.buf, false)? {
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
    ) -> Result<Vec<ErrorMsg>, Error> {
        // About 1 KiB per answer, or acks get lost (ENOBUFS).
        self.t.reserve((acked.len() + 16) * 1024);
        self.t.send(bytes)?;
        // A batch has a few dozen messages at most (each carries up to
        // 60 KB of elements): a list is enough, and no hash table of its
        // own in the binary.
        let mut pending: Vec<u32> = acked.to_vec();
        let mut errors = Vec::new();
        while !pending.is_empty() {
            let Some(n) = self.t.recv(&mut self.buf, true)? else {
                break;
            };
            for m in wire::messages(&self.buf[..n]) {
                let m = m?;
                if m.ty != wire::NLMSG_ERROR {
                    continue;
                }
                let e = wire::parse_error(&m)?;
                // A failed commit is reported against BEGIN, which asked for no ack.
                let acked = pending.iter().position(|s| *s == e.seq);
                if let Some(i) = acked {
                    pending.swap_remove(i);
                }
                let ours = acked.is_some() || e.seq == begin_seq;
                if ours && e.errno != 0 {
                    errors.push(e);
                }
            }
        }
        Ok(errors)
    }

    /// Sends one request and feeds every reply message to `f` until the ack
    /// (or, for a dump, NLMSG_DONE). A kernel error ends it with `Kernel`,
    /// a dump that changed while read with `Interrupted`.
    pub fn request(
        &mut self,
        bytes: &[u8],
        seq: u32,
        dump: bool,
        mut f: impl FnMut(&Msg<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.request_dyn(bytes, seq, dump, &mut f)
    }

    /// `request`, once in the binary however many callers it has.
    fn request_dyn(
        &mut self,
        bytes: &[u8],
        seq: u32,
        dump: bool,
        f: &mut dyn FnMut(&Msg<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.t.send(bytes)?;
        loop {
            let Some(n) = self.t.recv(&mut self.buf, true)? else {
                return Err(Error::Timeout);
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
                            return Err(Error::Kernel(Box::new(e)));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    wire::NLMSG_DONE => return Ok(()),
                    wire::NLMSG_OVERRUN => return Err(Error::Overrun),
                    _ if m.flags & wire::NLM_F_DUMP_INTR != 0 => return Err(Error::Interrupted),
                    _ if m.ty >= wire::NLMSG_MIN_TYPE => f(&m)?,
                    _ => {}
                }
            }
        }
    }

    /// A dump, asked again while the kernel says it was interrupted (the
    /// object changed under it). `request` encodes it for a sequence number;
    /// `f` sees each reply message, and `None` before each attempt: it
    /// forgets what the attempt before gave, so only a consistent dump
    /// counts.
    pub fn dump(
        &mut self,
        request: &dyn Fn(u32) -> Vec<u8>,
        f: &mut dyn FnMut(Option<&Msg<'_>>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            f(None)?;
            let seq = self.seq();
            match self.request_dyn(&request(seq), seq, true, &mut |m| f(Some(m))) {
                Err(Error::Interrupted) if attempt < DUMP_ATTEMPTS => attempt += 1,
                r => return r,
            }
        }
    }
}

/// Tries of a dump that keeps being interrupted before giving up (each try
/// is a full dump; a map that changes this often is being fought over).
pub const DUMP_ATTEMPTS: usize = 10;

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

pub mod fake {
    //! A transport for tests: it records every datagram sent and answers
    //! each with what a script returns, as the kernel answers inside
    //! `send()`. Works for any netlink protocol; see `ruleset`'s tests for
    //! an nf_tables script and `wire::reply` for building answers.

    use std::collections::VecDeque;

    use super::{Error, Transport};
    use crate::wire::{self, Writer};

    /// `NLMSG_ERROR` answering the message `seq` of type `ty`: an ack
    /// (`errno` 0) or a refusal, with an extended ack's offset (of the
    /// attribute blamed, from the start of that message) when given. The
    /// original message is not echoed (NETLINK_CAP_ACK), as on a real socket.
    pub fn error(seq: u32, ty: u16, errno: i32, offset: Option<u32>) -> Vec<u8> {
        let mut w = Writer::new();
        let flags = wire::NLM_F_CAPPED
            | if offset.is_some() {
                wire::NLM_F_ACK_TLVS
            } else {
                0
            };
        w.begin_msg(wire::NLMSG_ERROR, flags, seq);
        w.put(&(-errno).to_ne_bytes());
        // struct nlmsghdr of the original: len, type, flags, seq, pid
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&16u32.to_ne_bytes());
        h.extend_from_slice(&ty.to_ne_bytes());
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        w.put(&h);
        if let Some(off) = offset {
            w.attr_u32(wire::NLMSGERR_ATTR_OFFS, off);
        }
        w.end_msg();
        w.buf
    }

    /// `NLMSG_DONE`: the end of the dump `seq`.
    pub fn done(seq: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_msg(wire::NLMSG_DONE, wire::NLM_F_MULTI, seq);
        w.put(&0u32.to_ne_bytes());
        w.end_msg();
        w.buf
    }

    type Script = Box<dyn FnMut(&[u8]) -> Result<Vec<Vec<u8>>, Error>>;

    pub struct Fake {
        /// Every datagram sent, in order.
        pub sent: Vec<Vec<u8>>,
        /// Multicast groups joined.
        pub groups: Vec<u32>,
        /// The largest `reserve` asked for.
        pub reserved: usize,
        queue: VecDeque<Result<Vec<u8>, Error>>,
        script: Script,
    }

    impl Fake {
        /// `script` answers one sent datagram with the datagrams the kernel
        /// would queue (or refuses it, as `send()` would).
        pub fn new(script: impl FnMut(&[u8]) -> Result<Vec<Vec<u8>>, Error> + 'static) -> Fake {
            Fake {
                sent: Vec::new(),
                groups: Vec::new(),
                reserved: 0,
                queue: VecDeque::new(),
                script: Box::new(script),
            }
        }

        /// Queues a datagram as if the kernel had sent it unasked (an event).
        pub fn push(&mut self, datagram: Vec<u8>) {
            self.queue.push_back(Ok(datagram));
        }

        /// Queues a failure of `recv()` (ENOBUFS: `Error::Lost`) as if
        /// the kernel had dropped what came here.
        pub fn push_error(&mut self, e: Error) {
            self.queue.push_back(Err(e));
        }
    }

    impl Transport for Fake {
        fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
            self.sent.push(bytes.to_vec());
            let replies = (self.script)(bytes)?;
            self.queue.extend(replies.into_iter().map(Ok));
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8], block: bool) -> Result<Option<usize>, Error> {
            match self.queue.pop_front() {
                Some(Err(e)) => Err(e),
                Some(Ok(d)) => {
                    // Truncated like a real socket's datagram.
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    Ok(Some(n))
                }
                None if block => Err(Error::Timeout),
                None => Ok(None),
            }
        }

        fn subscribe(&mut self, group: u32) -> Result<(), Error> {
            self.groups.push(group);
            Ok(())
        }

        fn reserve(&mut self, bytes: usize) {
            self.reserved = self.reserved.max(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Fake, done, error};
    use super::*;
    use crate::wire::Writer;

    /// `ip rule show` as rtnetlink asks it: RTM_GETRULE, a dump.
    fn getrule(seq: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_msg(34, wire::NLM_F_REQUEST | wire::NLM_F_DUMP, seq);
        w.put(&[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        w.end_msg();
        w.buf
    }

    /// A reply message of type `ty` with a 4-byte payload `v`.
    fn part(ty: u16, flags: u16, seq: u32, v: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_msg(ty, flags, seq);
        w.put(&v.to_ne_bytes());
        w.end_msg();
        w.buf
    }

    /// The conversation over any protocol: a dump's parts until DONE, a
    /// late reply to an earlier request skipped, a refusal as
    /// `Error::Kernel`, silence as `Timeout`, events drained, groups
    /// joined. rtnetlink here (route.rs can move onto `Conn<impl
    /// Transport>` as it is).
    #[test]
    fn conn_matches_replies_over_any_transport() {
        let fake = Fake::new(|sent| {
            let m = wire::messages(sent).next().unwrap().unwrap();
            Ok(match m.seq {
                // A late part of seq 6's dump, then this dump in two datagrams.
                7 => vec![
                    [
                        part(32, wire::NLM_F_MULTI, 6, 99),
                        part(32, wire::NLM_F_MULTI, 7, 1),
                    ]
                    .concat(),
                    [part(32, wire::NLM_F_MULTI, 7, 2), done(7)].concat(),
                ],
                8 => vec![error(8, 34, libc::EPERM, None)],
                _ => vec![],
            })
        });
        let mut c = Conn::with_seq(fake, 7);
        let mut got = Vec::new();
        let seq = c.seq();
        c.request(&getrule(seq), seq, true, |m| {
            got.push(wire::ne32(m.payload).unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![1, 2]);
        let seq = c.seq();
        let e = c.request(&getrule(seq), seq, true, |_| Ok(())).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
        let seq = c.seq();
        let e = c.request(&getrule(seq), seq, true, |_| Ok(())).unwrap_err();
        assert!(matches!(e, Error::Timeout) && e.outcome_unknown());
        assert_eq!(c.transport().sent, vec![getrule(7), getrule(8), getrule(9)]);
        c.join(5, 1 << 20).unwrap();
        assert_eq!(
            (c.transport().groups.clone(), c.transport().reserved),
            (vec![5], 1 << 20)
        );
        c.transport().push(part(20, 0, 0, 3));
        let mut events = Vec::new();
        c.drain(|m| events.push(m.ty)).unwrap();
        assert_eq!(events, vec![20]);
    }

    /// A batch's answers: errors in order, acks consumed, a failure
    /// reported against BEGIN (which asked for no ack) kept.
    #[test]
    fn commit_collects_the_errors_of_a_batch() {
        let fake = Fake::new(|_| {
            Ok(vec![
                [
                    error(11, 0x0a0c, 0, None),
                    error(12, 0x0a0c, libc::ENOENT, Some(44)),
                    error(10, 0x10, libc::EINVAL, None),
                ]
                .concat(),
            ])
        });
        let mut c = Conn::with_seq(fake, 10);
        let errors = c.commit(b"batch", &[11, 12], 10).unwrap();
        let got: Vec<(u32, i32, Option<u32>)> =
            errors.iter().map(|e| (e.seq, e.errno, e.offset)).collect();
        assert_eq!(
            got,
            vec![(12, libc::ENOENT, Some(44)), (10, libc::EINVAL, None)]
        );
        assert!(c.transport().reserved >= 18 * 1024);
    }
}
