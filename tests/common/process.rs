//! Processes: run a command with a time limit, wait for a condition.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The outcome of a finished process.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn describe(&self) -> String {
        format!(
            "status {:?} (signal {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status.code(),
            self.status.signal(),
            self.stdout,
            self.stderr
        )
    }
}

/// Asserts that `f` (the outcome of `what`) exited with `code`; its stdout.
pub fn expect(f: Finished, code: i32, what: &str) -> String {
    assert_eq!(f.code(), Some(code), "{what}: {}", f.describe());
    f.stdout
}

/// Runs a command to completion with a time limit (SIGKILL past it).
pub fn run_cmd(cmd: &mut Command, limit: Duration) -> Finished {
    let mut what = format!("{cmd:?}");
    // A command with thousands of arguments is named by its start.
    if what.len() > 600 {
        let cut = (0..=600)
            .rev()
            .find(|&i| what.is_char_boundary(i))
            .unwrap_or(0);
        what = format!("{} … ({} arguments)", &what[..cut], cmd.get_args().len());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let status = wait_child(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {limit:?}");
    });
    Finished {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub(super) fn collect<R: Read + Send + 'static>(mut r: R) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

pub(super) fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `prog args` (10 s limit) and returns the result, whatever it is.
pub fn run(prog: &str, args: &[&str]) -> Finished {
    run_cmd(Command::new(prog).args(args), Duration::from_secs(10))
}

/// Runs `prog args` and panics unless it succeeds; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let f = run(prog, args);
    assert!(
        f.status.success(),
        "{prog} {args:?} failed: {}",
        f.describe()
    );
    f.stdout
}

/// Polls `f` every `poll` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(poll);
    }
}

pub fn random_hex() -> String {
    let mut b = [0u8; 6];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let x = t ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
        b.copy_from_slice(&x.to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A pipe, both ends close-on-exec: (read, write).
pub(super) fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 returned two fresh fds that we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A child process killed on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
