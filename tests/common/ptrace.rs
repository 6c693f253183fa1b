//! Holding the daemon at a syscall: a race the kernel alone cannot be
//! made to lose on cue (someone else's change between the daemon's dump
//! and its commit) is made certain by stopping the daemon as it enters
//! the `send` of its next nf_tables batch, changing the ruleset, and
//! letting the send go on. The kernel then answers the batch for real.
//!
//! ptrace is thread-bound: the thread that holds must release, and nothing
//! else may wait for the daemon meanwhile (its stops would be taken for
//! exits), so [`Held`] is used in one stretch of the test thread.

use std::io;
use std::time::{Duration, Instant};

const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const PTRACE_O_TRACESYSGOOD: libc::c_ulong = 1;
const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
/// nfnetlink's batch start message type (NFNL_MSG_BATCH_BEGIN).
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;

/// `struct ptrace_syscall_info` (Linux 5.3+), as far as a syscall entry.
#[repr(C)]
#[derive(Default)]
struct SyscallInfo {
    op: u8,
    pad: [u8; 3],
    arch: u32,
    instruction_pointer: u64,
    stack_pointer: u64,
    nr: u64,
    args: [u64; 6],
    rest: [u64; 2],
}

fn ptrace(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: ptrace requests on a tracee of ours; `addr`/`data` are either
    // plain values or point to live buffers of the size the request needs.
    let r = unsafe { libc::ptrace(req as _, pid, addr as *mut libc::c_void, data) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Reads `len` bytes at `addr` in `pid`'s memory.
fn peek(pid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: one local iovec over `buf`, one remote one; the kernel checks
    // the remote range.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Waits (polling, up to `deadline`) for a ptrace stop or the end of `pid`.
fn wait_stop(pid: i32, deadline: Instant) -> Result<i32, String> {
    loop {
        let mut st = 0;
        // SAFETY: waiting for a tracee of ours.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                return Err(format!("pid {pid} ended while traced (status {st:#x})"));
            }
            return Ok(st);
        }
        if r < 0 {
            return Err(format!("waitpid {pid}: {}", io::Error::last_os_error()));
        }
        if Instant::now() >= deadline {
            return Err(format!("pid {pid}: no ptrace stop in time"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A daemon stopped as it enters the send of an nf_tables batch (the
/// syscall not yet made). Released (the send goes on) by
/// [`release`](Held::release) or on drop.
pub struct Held {
    pid: i32,
    /// The batch it was about to send.
    pub batch: Vec<u8>,
    released: bool,
}

impl Held {
    /// Traces `pid` (a child of this process) until it enters the send
    /// (`sendto`/`sendmsg`) of a buffer that starts an nfnetlink batch,
    /// within `limit`; `go` runs once tracing has begun (to send the
    /// signal that starts the work, say). Other syscalls, and signals
    /// (passed on), go through untouched.
    pub fn next_batch(pid: i32, limit: Duration, go: impl FnOnce()) -> Result<Held, String> {
        let deadline = Instant::now() + limit;
        ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD as usize)
            .map_err(|e| format!("PTRACE_SEIZE {pid}: {e}"))?;
        let mut held = Held {
            pid,
            batch: Vec::new(),
            released: false,
        };
        ptrace(PTRACE_INTERRUPT, pid, 0, 0).map_err(|e| format!("PTRACE_INTERRUPT: {e}"))?;
        wait_stop(pid, deadline)?;
        go();
        let mut signal = 0usize;
        loop {
            ptrace(libc::PTRACE_SYSCALL as _, pid, 0, signal)
                .map_err(|e| format!("PTRACE_SYSCALL: {e}"))?;
            signal = 0;
            let st = wait_stop(pid, deadline)?;
            let sig = libc::WSTOPSIG(st);
            if sig != (libc::SIGTRAP | 0x80) {
                // A signal for the tracee (pass it on), or a group or
                // event stop (nothing to pass).
                if st >> 16 == 0 && sig != libc::SIGTRAP {
                    signal = sig as usize;
                }
                continue;
            }
            let mut info = SyscallInfo::default();
            ptrace(
                PTRACE_GET_SYSCALL_INFO,
                pid,
                std::mem::size_of::<SyscallInfo>(),
                &mut info as *mut SyscallInfo as usize,
            )
            .map_err(|e| format!("PTRACE_GET_SYSCALL_INFO: {e}"))?;
            if info.op != PTRACE_SYSCALL_INFO_ENTRY {
                continue;
            }
            let buf = match info.nr as libc::c_long {
                libc::SYS_sendto => (info.args[1], info.args[2] as usize),
                libc::SYS_sendmsg => {
                    // The first iovec of the msghdr.
                    let mh = peek(pid, info.args[1], std::mem::size_of::<libc::msghdr>())
                        .map_err(|e| format!("reading the msghdr: {e}"))?;
                    let iov_at = std::mem::offset_of!(libc::msghdr, msg_iov);
                    let iov = u64::from_ne_bytes(mh[iov_at..iov_at + 8].try_into().unwrap());
                    let v = peek(pid, iov, 16).map_err(|e| format!("reading the iovec: {e}"))?;
                    (
                        u64::from_ne_bytes(v[0..8].try_into().unwrap()),
                        u64::from_ne_bytes(v[8..16].try_into().unwrap()) as usize,
                    )
                }
                _ => continue,
            };
            let head = peek(pid, buf.0, buf.1.min(16)).map_err(|e| format!("peek: {e}"))?;
            if head.len() == 16 && u16::from_ne_bytes([head[4], head[5]]) == NFNL_MSG_BATCH_BEGIN {
                held.batch = peek(pid, buf.0, buf.1).map_err(|e| format!("peek: {e}"))?;
                return Ok(held);
            }
        }
    }

    /// Lets the send go on and stops tracing.
    pub fn release(mut self) {
        self.detach();
    }

    fn detach(&mut self) {
        if !self.released {
            self.released = true;
            let _ = ptrace(libc::PTRACE_DETACH as _, self.pid, 0, 0);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.detach();
    }
}
