//! Where traffic from a cgroup arrives: the TPROXY listener, the remote
//! server, or nowhere. Each check sends a fresh token from a new process in
//! the cgroup and looks at what every server received.

use super::clients::{exchange, exchange_within};
use super::env::Env;
use super::servers::{Proto, Remote, Server};
use super::{LOCAL_V4, LOCAL_V6};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Client time limit where the connection is expected to fail (a dropped
/// TCP SYN makes `connect` retry).
pub const QUICK: Duration = Duration::from_millis(1500);

/// A cgroup named for a traffic check: a path below the test's subtree
/// ("/p/a", resolved with [`CgroupTree::path`](super::CgroupTree::path)) or
/// the cgroup's directory itself.
pub trait CgroupDir {
    fn dir(&self, env: &Env) -> PathBuf;
}

impl CgroupDir for &str {
    fn dir(&self, env: &Env) -> PathBuf {
        env.cg.path(self)
    }
}

impl CgroupDir for &String {
    fn dir(&self, env: &Env) -> PathBuf {
        env.cg.path(self)
    }
}

impl CgroupDir for &Path {
    fn dir(&self, _: &Env) -> PathBuf {
        self.to_path_buf()
    }
}

impl CgroupDir for &PathBuf {
    fn dir(&self, _: &Env) -> PathBuf {
        self.to_path_buf()
    }
}

/// The address of the test namespace's end of the veth pair, for `dst`'s
/// family: the source a client in the test namespace uses.
pub fn local_ip(dst: SocketAddr) -> IpAddr {
    match dst {
        SocketAddr::V4(_) => LOCAL_V4.into(),
        SocketAddr::V6(_) => LOCAL_V6.into(),
    }
}

/// Sends from `cg` and asserts the TPROXY listener got it with the original
/// destination intact, the remote nothing, and the answer came back.
pub fn assert_proxied(
    env: &Env,
    proxy: &Server,
    remote: &Remote,
    cg: impl CgroupDir,
    proto: Proto,
    dst: SocketAddr,
) {
    let dir = cg.dir(env);
    let msg = env.token("proxied");
    let r = exchange(&dir, proto, dst, &msg);
    assert_eq!(
        r,
        Ok(format!("proxy:{msg}")),
        "{proto:?} to {dst} from cgroup {}: expected the TPROXY listener to answer",
        dir.display()
    );
    let ev = proxy.got(&msg);
    assert_eq!(ev.len(), 1, "proxy events for {msg}: {ev:?}");
    assert_eq!(
        ev[0].local, dst,
        "original destination seen by the listener"
    );
    assert_eq!(
        ev[0].peer.ip(),
        local_ip(dst),
        "client address seen by the listener"
    );
    assert!(
        remote.server.got(&msg).is_empty(),
        "proxied traffic also reached the remote"
    );
}

/// Sends from `cg` and asserts the remote server got it and answered, and
/// the proxy got nothing.
pub fn assert_direct(
    env: &Env,
    proxy: &Server,
    remote: &Remote,
    cg: impl CgroupDir,
    proto: Proto,
    dst: SocketAddr,
) {
    let dir = cg.dir(env);
    let msg = env.token("direct");
    let r = exchange(&dir, proto, dst, &msg);
    assert_eq!(
        r,
        Ok(format!("remote:{msg}")),
        "{proto:?} to {dst} from cgroup {}: expected the remote server to answer",
        dir.display()
    );
    let ev = remote.server.got(&msg);
    assert_eq!(ev.len(), 1, "remote events for {msg}: {ev:?}");
    assert_eq!(ev[0].local, dst);
    assert!(
        proxy.got(&msg).is_empty(),
        "direct traffic also reached the proxy"
    );
}

/// Sends from `cg` (client bounded by [`QUICK`]) and asserts nothing got
/// through: no answer, and neither server received it.
pub fn assert_dropped(
    env: &Env,
    proxy: &Server,
    remote: &Remote,
    cg: impl CgroupDir,
    proto: Proto,
    dst: SocketAddr,
) {
    let dir = cg.dir(env);
    let msg = env.token("dropped");
    let r = exchange_within(&dir, proto, dst, &msg, QUICK);
    assert!(
        r.is_err(),
        "{proto:?} to {dst} from cgroup {} should be dropped, got {r:?}",
        dir.display()
    );
    assert!(
        remote.server.got(&msg).is_empty(),
        "dropped traffic reached the remote"
    );
    assert!(
        proxy.got(&msg).is_empty(),
        "dropped traffic reached the proxy"
    );
}
