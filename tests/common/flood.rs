//! A process in a cgroup that opens a new UDP flow every millisecond: the
//! load under which a stop, a restart or lost routing must let nothing out.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A command started inside cgroup `cg` (it joins before exec).
pub fn spawn_in(cg: &Path, cmd: &mut Command) -> Child {
    let procs = std::ffi::CString::new(cg.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: between fork and exec only open/write/close, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn in cgroup")
}

/// A process in a cgroup that opens a new UDP flow (a new socket, so a new
/// source port and a new conntrack entry) to each of `dsts` about every
/// millisecond, each datagram `TOKEN-N`. Killed on drop.
pub struct Flood {
    child: Child,
    pub token: String,
}

impl Flood {
    pub fn start(cg: &Path, dsts: &[SocketAddr], token: &str) -> Flood {
        let mut script = String::from("i=0; while :; do i=$((i+1)); ");
        for d in dsts {
            script.push_str(&format!(
                "echo {token}-$i 2>/dev/null > /dev/udp/{}/{}; ",
                d.ip(),
                d.port()
            ));
        }
        script.push_str("sleep 0.001; done");
        let child = spawn_in(cg, Command::new("bash").args(["-c", &script]));
        Flood {
            child,
            token: token.to_string(),
        }
    }

    /// Whether `data` is one of this flood's datagrams.
    pub fn is_mine(&self, data: &str) -> bool {
        data.strip_prefix(&self.token)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop();
    }
}
