//! Network namespaces: the test entry point and threads that live in a
//! namespace of their own.

use super::env::Env;
use super::prereq::gate;
use super::process::run_ok;
use std::fs;
use std::io;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Moves the calling thread into a fresh network namespace with `lo` up.
pub fn unshare_net() {
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }
    net_setup();
}

/// Moves the calling thread into the network namespace at `path`
/// (`/proc/PID/ns/net`), with `lo` up.
pub fn join_net(path: &str) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on an fd we hold open; it changes only this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        panic!("setns({path}): {}", io::Error::last_os_error());
    }
    net_setup();
}

/// What a fresh network namespace needs before a test uses it.
fn net_setup() {
    run_ok("ip", &["link", "set", "lo", "up"]);
    // Addresses the tests add are usable at once.
    for conf in ["all", "default"] {
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0");
    }
}

/// The test's name from the type name of an item defined in it: the last
/// path segment that is not a closure (`e2e::proxy_cgroup_works::{{closure}}`
/// gives `proxy_cgroup_works`). `std::any::type_name` promises no format,
/// so a name it cannot find fails loudly rather than naming a test wrong.
pub fn name_from_type(type_name: &'static str, item: &str) -> &'static str {
    let path = type_name.strip_suffix(item).unwrap_or(type_name);
    let name = path
        .rsplit("::")
        .find(|s| !s.is_empty() && !s.starts_with('{'))
        .unwrap_or_else(|| panic!("no test name in the type name {type_name:?}"));
    assert!(
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "no test name in the type name {type_name:?}"
    );
    name
}

/// The name of the test function this is written in (for messages and
/// skips outside [`sandbox`]).
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        $crate::common::name_from_type(std::any::type_name_of_val(&here), "::here")
    }};
}

/// Runs `body` on a fresh thread in its own network namespace with its own
/// cgroup subtree; skips (see [`gate`]) when prerequisites are missing.
/// Panics in `body` fail the test after everything was cleaned up. The
/// test's name (`env.name`) is that of the function the closure is written
/// in, so it is spelled once.
pub fn sandbox<F>(body: F)
where
    F: FnOnce(&mut Env) + Send + 'static,
{
    let name = name_from_type(std::any::type_name::<F>(), "");
    e2e(name, body)
}

/// As [`sandbox`], with the test's name given (prefer [`sandbox`]).
pub fn e2e<F>(name: &str, body: F)
where
    F: FnOnce(&mut Env) + Send + 'static,
{
    let Some(mount) = gate(name) else { return };
    let name = name.to_string();
    let handle = thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            unshare_net();
            let mut env = Env::new(&name, &mount);
            body(&mut env);
        })
        .expect("spawn test thread");
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A thread living in its own network namespace, running jobs sent to it.
/// Sockets created by a job stay in that namespace.
pub struct NsThread {
    tx: Option<mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    handle: Option<JoinHandle<()>>,
    pub tid: i32,
}

impl NsThread {
    pub fn new(name: &str) -> NsThread {
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                unshare_net();
                tid_tx.send(gettid()).unwrap();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawn namespace thread");
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("namespace thread did not start");
        NsThread {
            tx: Some(tx),
            handle: Some(handle),
            tid,
        }
    }

    /// Runs `f` inside the namespace and returns its result.
    pub fn run<R, F>(&self, f: F) -> R
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (rtx, rrx) = mpsc::channel();
        let job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = rtx.send(r);
        });
        self.tx
            .as_ref()
            .unwrap()
            .send(job)
            .expect("namespace thread gone");
        match rrx.recv().expect("namespace thread gone") {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
