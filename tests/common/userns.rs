//! A user namespace of the test's own, owning a network namespace: its
//! per-namespace limits (`/proc/sys/user/max_inotify_*`, the ucounts) can
//! be set low without touching the host's, and a daemon run in it is
//! charged against them. Root of the namespace is root outside (uid map
//! `0 0 1`), so cgroupfs and the scratch files read as before; the network
//! namespace belongs to it, so the daemon has CAP_NET_ADMIN there.

use super::netns::join_net;
use super::process::KillOnDrop;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The namespaces, held by a `sleep` that lives in them.
pub struct UserNs {
    holder: KillOnDrop,
}

impl UserNs {
    /// A new user namespace with a new network namespace, the limits
    /// `/proc/sys/user/NAME = VALUE` set inside it.
    pub fn new(limits: &[(&str, u64)]) -> UserNs {
        let mut script = String::new();
        for (name, value) in limits {
            script.push_str(&format!(
                "echo {value} > /proc/sys/user/{name} || exit 90\n\
                 [ \"$(cat /proc/sys/user/{name})\" = {value} ] || exit 91\n"
            ));
        }
        script.push_str("echo ready\nexec sleep 600\n");
        let mut child = Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unshare --user --net");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let holder = KillOnDrop(child);
        if line.trim() != "ready" {
            let mut c = holder;
            let st = c.0.wait();
            panic!("user namespace with {limits:?}: the holder ended: {st:?}");
        }
        UserNs { holder }
    }

    pub fn pid(&self) -> u32 {
        self.holder.0.id()
    }

    /// Moves the calling thread into the namespace's network namespace
    /// (with `lo` up); what it spawns from now on runs there.
    pub fn join_net(&self) {
        join_net(&format!("/proc/{}/ns/net", self.pid()));
    }

    /// A [`Launch::wrap`](super::Launch::wrap) that runs the daemon in both
    /// namespaces, as the namespace's root.
    pub fn wrap(&self) -> Vec<OsString> {
        let t = self.pid().to_string();
        ["nsenter", "--target", &t, "--user", "--net", "--"]
            .map(OsString::from)
            .to_vec()
    }
}
