//! The daemon under test: spawned (as root, or as an unprivileged user with
//! only CAP_NET_ADMIN), its log collected, its readiness awaited.

use super::BIN;
use super::env::Env;
use super::nft::dump_map;
use super::process::{Finished, pipe, wait_child, wait_until};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How the daemon is started.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `--ready-fd 3`, and the read end kept for [`Daemon::wait_ready`].
    pub ready: bool,
    /// Run as this (uid, gid) through `setpriv`, with no supplementary
    /// groups and CAP_NET_ADMIN the only capability left (inheritable,
    /// ambient, bounding set). None: as the test (root).
    pub user: Option<(u32, u32)>,
    /// A command line the daemon's (with `setpriv`, if any) is appended
    /// to, which must exec it in the end: `unshare -m sh -c '...; exec "$@"' sh`.
    pub wrap: Vec<OsString>,
}

/// A running `cgtproxy`; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    ready: Option<OwnedFd>,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    pub args: Vec<OsString>,
}

/// The fd number the daemon gets for `--ready-fd`.
const READY_FD: RawFd = 3;

/// Collects the lines of `r` into `log`, echoing each to stderr with the
/// daemon's pid.
fn log_reader<R: Read + Send + 'static>(r: R, log: Arc<Mutex<String>>, pid: u32) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = io::BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match io::BufRead::read_until(&mut r, b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let l = String::from_utf8_lossy(&line);
                    eprint!("[cgtproxy {pid}] {l}");
                    log.lock().unwrap().push_str(&l);
                }
            }
        }
    })
}

impl Daemon {
    /// Spawns `cgtproxy ARGS` (plus `--ready-fd 3` when `ready`).
    pub fn spawn(args: &[OsString], ready: bool) -> Daemon {
        Daemon::launch(
            args,
            &Launch {
                ready,
                ..Launch::default()
            },
        )
    }

    /// As `spawn`, with extra environment variables.
    pub fn spawn_env(args: &[OsString], ready: bool, env: &[(&str, &str)]) -> Daemon {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Daemon::launch(
            args,
            &Launch {
                env,
                ready,
                ..Launch::default()
            },
        )
    }

    /// Spawns `cgtproxy ARGS` as `how` says (not waiting for readiness).
    pub fn launch(args: &[OsString], how: &Launch) -> Daemon {
        let mut argv: Vec<OsString> = how.wrap.clone();
        if let Some((uid, gid)) = how.user {
            argv.extend(
                [
                    "setpriv".to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--inh-caps=-all,+net_admin".into(),
                    "--ambient-caps=-all,+net_admin".into(),
                    "--bounding-set=-all,+net_admin".into(),
                    "--".into(),
                ]
                .map(OsString::from),
            );
        }
        argv.push(BIN.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.envs(how.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut ready_r = None;
        let mut ready_w = None;
        if how.ready {
            let (r, w) = pipe();
            cmd.arg("--ready-fd").arg(READY_FD.to_string());
            let wfd = w.as_raw_fd();
            // SAFETY: only async-signal-safe calls (dup2, fcntl) after fork.
            unsafe {
                cmd.pre_exec(move || {
                    if wfd == READY_FD {
                        let fl = libc::fcntl(wfd, libc::F_GETFD);
                        if libc::fcntl(wfd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    } else if libc::dup2(wfd, READY_FD) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            ready_r = Some(r);
            ready_w = Some(w);
        }
        let what = if how.user.is_some() {
            "setpriv cgtproxy"
        } else {
            "cgtproxy"
        };
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        // Only the child holds the write end now: EOF means it is gone.
        drop(ready_w);
        let log = Arc::new(Mutex::new(String::new()));
        let pid = child.id();
        let readers = vec![
            log_reader(child.stderr.take().unwrap(), log.clone(), pid),
            log_reader(child.stdout.take().unwrap(), log.clone(), pid),
        ];
        Daemon {
            child: Some(child),
            ready: ready_r,
            log,
            readers,
            args: args.to_vec(),
        }
    }

    /// Spawns with `--ready-fd` and waits (10 s) for the newline.
    pub fn start(args: &[OsString]) -> Daemon {
        Daemon::start_with(
            args,
            &Launch {
                ready: true,
                ..Launch::default()
            },
        )
    }

    /// As [`start`](Daemon::start), as the unprivileged `uid`:`gid` with
    /// only CAP_NET_ADMIN (see [`Launch::user`]).
    pub fn start_unprivileged(uid: u32, gid: u32, args: &[OsString]) -> Daemon {
        Daemon::start_with(
            args,
            &Launch {
                ready: true,
                user: Some((uid, gid)),
                ..Launch::default()
            },
        )
    }

    /// Launches as `how` says, with `--ready-fd`, and waits (10 s) for the
    /// newline; panics with the log if it does not come.
    pub fn start_with(args: &[OsString], how: &Launch) -> Daemon {
        let how = Launch {
            ready: true,
            ..how.clone()
        };
        let mut d = Daemon::launch(args, &how);
        if let Err(e) = d.wait_ready(Duration::from_secs(10)) {
            panic!("cgtproxy {args:?} ({how:?}): {e}\n{}", d.kill_report());
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits for the readiness newline on the --ready-fd pipe.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let fd = self.ready.as_ref().expect("spawned without --ready-fd");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("not ready within {limit:?}"));
            }
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            if n == 0 {
                continue;
            }
            let mut b = [0u8; 16];
            // SAFETY: reading into a local buffer from an fd we own.
            let r = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            return match r {
                0 => Err("the ready fd was closed without a newline (daemon exited?)".into()),
                r if r < 0 => Err(format!("read: {}", io::Error::last_os_error())),
                r if b[..r as usize].contains(&b'\n') => Ok(()),
                r => Err(format!("unexpected readiness bytes {:?}", &b[..r as usize])),
            };
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| c.try_wait().expect("wait").is_none())
            .unwrap_or(false)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// The log so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `limit` for the process to exit; None if it did not.
    pub fn wait(&mut self, limit: Duration) -> Option<Finished> {
        let st = wait_child(self.child.as_mut()?, limit)?;
        self.child = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Some(Finished {
            status: st,
            stdout: String::new(),
            stderr: self.log(),
        })
    }

    /// SIGTERM, then waits (10 s) for the exit.
    pub fn stop(mut self) -> Finished {
        self.signal(libc::SIGTERM);
        match self.wait(Duration::from_secs(10)) {
            Some(f) => f,
            None => panic!(
                "cgtproxy did not exit within 10 s of SIGTERM\n{}",
                self.kill_report()
            ),
        }
    }

    /// [`stop`](Daemon::stop), and asserts exit status 0 (with the log).
    pub fn stop_ok(self) -> Finished {
        let f = self.stop();
        assert_eq!(f.code(), Some(0), "exit after SIGTERM: {}", f.describe());
        f
    }

    /// [`stop_ok`](Daemon::stop_ok), and asserts the map is as it was
    /// before the SIGTERM: a stop changes no verdict.
    pub fn stop_keeps_map(self) -> Finished {
        let running = dump_map();
        let f = self.stop_ok();
        assert!(dump_map() == running, "SIGTERM changes no verdict");
        f
    }

    /// SIGKILL and reap (10 s). None: it did not finish even so (the log
    /// is still in [`log`](Daemon::log)).
    pub fn try_kill(&mut self) -> Option<Finished> {
        if self.child.is_some() {
            self.signal(libc::SIGKILL);
        }
        self.wait(Duration::from_secs(10))
    }

    /// SIGKILL and reap; panics when it did not finish within 10 s.
    pub fn kill(&mut self) -> Finished {
        match self.try_kill() {
            Some(f) => f,
            None => panic!(
                "cgtproxy did not finish within 10 s of SIGKILL\nlog:\n{}",
                self.log()
            ),
        }
    }

    /// SIGKILL and reap, for a message: how it ended, or that it did not.
    fn kill_report(&mut self) -> String {
        match self.try_kill() {
            Some(f) => f.describe(),
            None => format!(
                "did not finish within 10 s of SIGKILL\nlog:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cgtproxy ARGS` to its exit (SIGKILL and panic past `limit`).
pub fn run_daemon_to_exit(args: &[OsString], limit: Duration) -> Finished {
    let mut d = Daemon::spawn(args, false);
    match d.wait(limit) {
        Some(f) => f,
        None => panic!(
            "cgtproxy {args:?} did not exit within {limit:?}\n{}",
            d.kill_report()
        ),
    }
}

/// Lines of `log` that contain `needle`.
pub fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits until `log()` has at least `n` lines containing `needle`.
pub fn wait_log(log: impl Fn() -> String, needle: &str, n: usize, limit: Duration) -> String {
    let mut last = String::new();
    let ok = wait_until(limit, Duration::from_millis(20), || {
        last = log();
        count(&last, needle) >= n
    });
    assert!(
        ok,
        "expected {n} log line(s) containing {needle:?} within {limit:?}; log:\n{last}"
    );
    last
}

/// Starts the daemon with explicit args (no -v: the default log level).
pub fn start_daemon(env: &Env, config: &Path, extra: &[&str]) -> Daemon {
    let mut args = env.run_args(config);
    args.extend(extra.iter().map(OsString::from));
    Daemon::start(&args)
}

/// "Uid:" and "CapEff:" of a process.
pub fn uid_and_caps(pid: i32) -> (String, String) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    (field("Uid:"), field("CapEff:"))
}
