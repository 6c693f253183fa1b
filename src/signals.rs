//! SIGTERM, SIGINT and SIGHUP as a file descriptor (signalfd), so the
//! single-threaded loop polls them like any other event and no handler runs
//! in the middle of a transaction.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

pub struct Signals {
    fd: OwnedFd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop(i32),
    Reload,
}

impl Signals {
    /// Blocks the signals (so their default action never runs) and opens a
    /// signalfd for them. Call first, before anything worth cleaning up.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; the libc calls get valid pointers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Every pending signal, without blocking.
    pub fn pending(&self) -> Vec<Signal> {
        let mut out = Vec::new();
        let mut info = [0u8; 128]; // struct signalfd_siginfo
        while let Ok(n) = rustix::io::read(&self.fd, &mut info) {
            if n < 4 {
                break;
            }
            let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
            out.push(if signo == libc::SIGHUP {
                Signal::Reload
            } else {
                Signal::Stop(signo)
            });
        }
        out
    }
}
