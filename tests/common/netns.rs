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

/// The name of the running test: libtest runs each test on a thread named
/// for it (the test's path, `proxy_cgroup_works`), and [`sandbox`] names
/// its own thread the same, so the name is the function's, spelled once,
/// also when a helper asks. Anywhere else (a thread without a name, or
/// `main`) it fails loudly rather than naming a test wrong.
pub fn test_name() -> String {
    let thread = thread::current();
    match thread.name() {
        Some(name) if name != "main" => name.to_string(),
        other => panic!("test_name() outside a test's thread (thread {other:?})"),
    }
}

/// Runs `body` on a fresh thread in its own network namespace with its own
/// cgroup subtree; skips (see [`gate`]) when prerequisites are missing.
/// Panics in `body` fail the test after everything was cleaned up. The
/// test's name (`env.name`) is [`test_name`], that of the test function
/// this runs in (also through a helper).
pub fn sandbox<F>(body: F)
where
    F: FnOnce(&mut Env) + Send + 'static,
{
    let Some(mount) = gate() else { return };
    let name = test_name();
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
