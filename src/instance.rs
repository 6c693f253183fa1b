//! One daemon per table and map. The claim is an abstract unix socket
//! `@cgtproxy/TABLE/MAP`: abstract names live in the network namespace, the
//! same scope as the table; the kernel releases the name on any death,
//! SIGKILL included, so there is no stale lock file to clean up; and a second
//! instance can connect to it and read the owner's pid (SO_PEERCRED, which
//! the kernel fills in at `listen`) for its message. Whoever holds the claim
//! is the only process that may write the maps and the routes; everyone else
//! touches nothing. The same socket answers queries (`crate::query`): which
//! element decides a cgroup, for `cgtproxy exec` without CAP_NET_ADMIN.
//!
//! Anyone in the network namespace can bind an abstract name, so a holder
//! is believed only when it could be a cgtproxy daemon: root, our own uid,
//! or a process with CAP_NET_ADMIN in our user namespace (a daemon under a
//! uid of its own, systemd's `DynamicUser=`). A squatter that could not
//! write the maps anyway does not keep the daemon from starting — that
//! would leave the maps unfilled after a boot, which is a window, not a
//! guard: the daemon says so once and runs without the claim.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

use crate::error::Error;

/// Room in `sun_path` after the leading NUL of an abstract name.
const NAME_MAX: usize = 107;

/// The claim, held until dropped (or the process dies).
#[derive(Debug)]
pub struct Instance {
    /// None: the name is squatted (see the module comment).
    listener: Option<UnixListener>,
}

/// `cgtproxy/TABLE/MAP`, or a hash of the two when that does not fit (names
/// may be 255 bytes each).
pub fn name(table: &str, map: &str) -> Vec<u8> {
    let full = format!("cgtproxy/{table}/{map}");
    if full.len() <= NAME_MAX {
        return full.into_bytes();
    }
    // FNV-1a over both names, a NUL between them so ("ab","c") != ("a","bc").
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table.bytes().chain([0]).chain(map.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("cgtproxy/#{h:016x}").into_bytes()
}

/// Claims table `table`, map `map` for this process. When another process
/// holds it, the error says "already running (pid N)", then `hint`.
pub fn claim(table: &str, map: &str, hint: &str) -> Result<Instance, Error> {
    let n = name(table, map);
    let what = format!("table inet {table}, map {map}");
    let addr = SocketAddr::from_abstract_name(&n)
        .map_err(|e| Error::Runtime(format!("{what}: instance lock: {e}")))?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => {
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::Runtime(format!("{what}: instance lock: {e}")))?;
            Ok(Instance {
                listener: Some(listener),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let cred = holder(&n);
            if let Some(c) = cred.filter(|c| !could_be_a_daemon(c)) {
                let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.pid))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default();
                crate::warn!(
                    "{what}: the instance lock @{} is held by pid {} ({comm:?}, uid {}), which cannot be a cgtproxy daemon (no CAP_NET_ADMIN here): running without the one-daemon guard",
                    String::from_utf8_lossy(&n),
                    c.pid,
                    c.uid
                );
                return Ok(Instance { listener: None });
            }
            let pid = cred.map_or("pid unknown".to_string(), |c| format!("pid {}", c.pid));
            Err(Error::Runtime(format!(
                "already running ({pid}) for {what}{hint}"
            )))
        }
        Err(e) => Err(Error::Runtime(format!(
            "{what}: instance lock @{}: {}",
            String::from_utf8_lossy(&n),
            crate::error::io(&e)
        ))),
    }
}

/// The pid of whoever listens on the abstract name `n`.
pub fn owner(n: &[u8]) -> Option<i32> {
    holder(n).map(|c| c.pid)
}

/// Whether the holder of the name could be a cgtproxy daemon: root, our own
/// uid, or CAP_NET_ADMIN in our user namespace (see [`privileged_peer`]).
fn could_be_a_daemon(c: &libc::ucred) -> bool {
    c.uid == rustix::process::geteuid().as_raw() || privileged_peer(c)
}

/// Whether a peer could write the maps: root, or CAP_NET_ADMIN in our user
/// namespace. (SO_PEERCRED translates the uid into our namespace, so root
/// of a user's own namespace reads as that user.) Unlike the claim, a
/// query's answer is not believed from our own uid alone: any program of
/// the user could have bound the name, and a false "proxied" is a leak.
pub fn privileged_peer(c: &libc::ucred) -> bool {
    c.uid == 0 || (net_admin(c.pid) && same_userns(c.pid))
}

/// Whether `pid` is in our user namespace. Reading another uid's
/// `ns/user` needs ptrace access, which an unprivileged asker lacks toward
/// a daemon under a uid of its own; then the id maps decide, which anyone
/// may read: a child namespace shows its own (`0 1000 1`), and one that
/// maps every id as ours does takes CAP_SETUID here to create.
fn same_userns(pid: i32) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    if let (Some(me), Some(it)) = (ns("self"), ns(&pid.to_string())) {
        return me == it;
    }
    let maps = |p: &str| {
        let u = std::fs::read(format!("/proc/{p}/uid_map")).ok()?;
        let g = std::fs::read(format!("/proc/{p}/gid_map")).ok()?;
        Some((u, g))
    };
    maps("self").is_some_and(|m| Some(m) == maps(&pid.to_string()))
}

/// CAP_NET_ADMIN (bit 12) in the effective set of `pid`.
fn net_admin(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// A connection to whoever listens on the abstract name `n`. The connect
/// does not block (a full backlog is EAGAIN), so asking never hangs; the
/// socket returned is non-blocking.
pub fn connect(n: &[u8]) -> io::Result<OwnedFd> {
    if n.len() > NAME_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    // SAFETY: plain syscalls on a descriptor we own; sockaddr_un is plain
    // data, filled within its bounds.
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sa.sun_path[1..].iter_mut().zip(n) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n.len();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        if libc::connect(raw, (&raw const sa).cast(), len as libc::socklen_t) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// The credentials the kernel recorded for the other end of a connected
/// unix socket (the listener's at its `listen`).
pub fn peer_cred(fd: BorrowedFd<'_>) -> Option<libc::ucred> {
    // SAFETY: getsockopt fills a plain struct within the length given.
    unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        if libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut clen,
        ) != 0
            || cred.pid <= 0
        {
            return None;
        }
        Some(cred)
    }
}

/// The credentials of whoever listens on the abstract name `n`.
fn holder(n: &[u8]) -> Option<libc::ucred> {
    let fd = connect(n).ok()?;
    peer_cred(fd.as_fd())
}

impl Instance {
    /// Polled by the daemon: someone connecting, to read who holds the
    /// claim or to ask a query ([`crate::query`]); none when the name is
    /// squatted.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.listener.as_ref().map(|l| l.as_fd())
    }

    /// The listener, for [`crate::query::Queries::serve`].
    pub fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_stay_distinct() {
        assert_eq!(name("cgtproxy", "cgroups"), b"cgtproxy/cgtproxy/cgroups");
        let long = "t".repeat(255);
        let a = name(&long, "m");
        assert!(a.len() <= NAME_MAX);
        assert!(a.starts_with(b"cgtproxy/#"));
        assert_ne!(a, name(&long, "n"));
        assert_ne!(name(&"a".repeat(100), "bc"), name(&"a".repeat(101), "c"));
    }

    /// What it proves: a second claim of the same table and map is refused
    /// with the holder's pid (read through SO_PEERCRED), another map is
    /// free, and the name is released with the claim. How it can fail: a
    /// claim that does not exclude, or a pid that is not the holder's.
    #[test]
    fn a_claim_excludes_and_names_its_holder() {
        // A name of its own (abstract names are per network namespace).
        let table = format!(
            "unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let first = claim(&table, "m", "").unwrap();
        let e = claim(&table, "m", "; hint").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "already running (pid {}) for table inet {table}, map m; hint",
                std::process::id()
            )),
            "{e}"
        );
        let other = claim(&table, "n", "").unwrap();
        drop(first);
        drop(other);
        claim(&table, "m", "").unwrap();
    }
}
