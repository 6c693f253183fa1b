//! Where traffic from a cgroup arrives: the TPROXY listener, the remote
//! server, or nowhere. Each check sends a fresh token from a new process in
//! the cgroup and looks at what every server received.

use super::clients::{exchange, exchange_marked, exchange_within};
use super::env::Env;
use super::servers::{Event, Proto, Remote, Server};
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
    let seen = answered_by(
        env,
        cg,
        proto,
        dst,
        ("proxied", "the TPROXY listener", proxy),
        ("the remote", &remote.server),
    );
    assert_eq!(
        seen.peer.ip(),
        local_ip(dst),
        "client address seen by the listener"
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
    answered_by(
        env,
        cg,
        proto,
        dst,
        ("direct", "the remote server", &remote.server),
        ("the proxy", proxy),
    );
}

/// Sends a fresh token (named for `how` the traffic went) from `cg` to
/// `dst` and asserts that the server `by` (called `name`) answered it and
/// received it once, at `dst` (for the TPROXY listener: the original
/// destination), and `other` (called `other_name`) nothing. What `by` saw.
fn answered_by(
    env: &Env,
    cg: impl CgroupDir,
    proto: Proto,
    dst: SocketAddr,
    (how, name, by): (&str, &str, &Server),
    (other_name, other): (&str, &Server),
) -> Event {
    let dir = cg.dir(env);
    let msg = env.token(how);
    let r = exchange(&dir, proto, dst, &msg);
    assert_eq!(
        r,
        Ok(format!("{}:{msg}", by.tag)),
        "{proto:?} to {dst} from cgroup {}: expected {name} to answer",
        dir.display()
    );
    let ev = by.got(&msg);
    assert_eq!(ev.len(), 1, "{} events for {msg}: {ev:?}", by.tag);
    assert_eq!(ev[0].local, dst, "original destination seen by {name}");
    assert!(
        other.got(&msg).is_empty(),
        "{how} traffic also reached {other_name}"
    );
    ev.into_iter().next().unwrap()
}

/// Sends a fresh token from `cg` with the socket mark `mark` (client
/// bounded by twice [`QUICK`]) and asserts that the server tagged `tag`
/// answered it (`what` names the case in the message); the token.
pub fn assert_marked_answer(
    env: &Env,
    cg: impl CgroupDir,
    (proto, dst): (Proto, SocketAddr),
    mark: u32,
    tag: &str,
    what: &str,
) -> String {
    let msg = env.token(tag);
    let r = exchange_marked(&cg.dir(env), proto, dst, &msg, Some(mark), QUICK * 2);
    assert_eq!(r, Ok(format!("{tag}:{msg}")), "{what}");
    msg
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
