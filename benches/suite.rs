//! The cgtproxy benchmark suite: `cargo bench --bench suite` (as root; about
//! five to six minutes on a 2-core machine).
//!
//! Measures the daemon against the obvious alternative, `benches/baseline.sh`
//! (inotifywait + one `nft` per event), on the same workloads in the same
//! run, and prints one Markdown table: figure | cgtproxy | baseline | ratio |
//! target | met?. The targets are those of issue 5. The daemon measured is
//! the static musl release binary, built by the suite itself.
//!
//! 1. event latency: mkdir call → NEWSETELEM seen on an NFNLGRP_NFTABLES
//!    socket (rmdir → DELSETELEM too), with an empty map and again with the
//!    10,000 elements in it;
//! 2. burst: 10,000 mkdirs, then 10,000 rmdirs, in a tight loop: time from the
//!    last op until the map holds all (none) of them; CPU per cgroup;
//! 3. cold start with 10,000 cgroups: exec → ready fd, map checked exact;
//! 4. idle for 60 s with 10,000 and with 100 cgroups: context switches, CPU,
//!    RSS; size of the static binary;
//! 5. packet path over a veth pair into a second netns, client in a `direct`
//!    cgroup five levels deep, 10,000 elements in the map: iperf3 TCP bulk
//!    and 64-byte UDP, and new TCP connections per second, against no table
//!    and against a minimal stateful firewall, interleaved A/B pairs;
//! 6. hostile trees (issue 12): while a 10,000-deep chain of 200-byte names
//!    and then a 100,000-mkdir storm are made in one subtree, the latency
//!    of an element elsewhere, the daemon's CPU and peak RSS, and whether
//!    the storm forced a rescan (BENCH_HOSTILE_DEPTH, BENCH_HOSTILE_STORM).
//!
//! Everything runs in private network namespaces (threads that
//! unshare(CLONE_NEWNET), and processes they spawn) and in a private cgroup
//! subtree `<cgroup2 mount>/cgtproxy-suite-<pid>-<hex>` that is removed at the end;
//! addresses are 198.18.0.1/.2 on a veth pair between two private
//! namespaces. The host's ruleset, routes and cgroups are never touched.
//!
//! Needs: root, Linux ≥ 5.14 with cgroup2 and nf_tables, `nft`, `ip` and `ss`
//! (iproute2), `unshare`, `nsenter` and `mount` (util-linux), `bash`, `file`,
//! `inotifywait` (inotify-tools), `iperf3`, and the musl target
//! (`rustup target add x86_64-unknown-linux-musl`; without it the glibc
//! build is measured and the size row is skipped). Without root or a tool it
//! prints why and exits 0 (CI only builds it).
//!
//! Knobs (environment): BENCH_QUICK=1 (a short smoke run, figures not
//! meaningful), BENCH_PAIRS (A/B pairs, default 5), BENCH_IDLE_SECS (60),
//! BENCH_BASELINE_BURST (cgroups in the baseline's burst, default 10000),
//! BENCH_ONLY=latency,burst,cold,idle,size,packets,hostile (a subset of the phases),
//! BENCH_DAEMON=PATH (measure that cgtproxy binary instead of building the
//! static one, e.g. a candidate fix), BENCH_SPIN=1 (busy-poll the event
//! socket; see spin_for).

#[path = "support/nl.rs"]
mod nl;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nl::Ev;

const BIN: &str = env!("CARGO_BIN_EXE_cgtproxy");
const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
const TABLE: &str = "cgtproxy";
const MAP: &str = "cgroups";
/// The ruleset's second map: verdict number → verdict.
const VMAP: &str = "verdicts";
/// The number baseline.sh (and the fallback fill) gives `goto direct`: far
/// from the daemon's own 1, 2, …, so the two never conflict.
const BASELINE_NUMBER: u32 = 1000;
const CLIENT_V4: &str = "198.18.0.1";
const SERVER_V4: &str = "198.18.0.2";
const IPERF_PORT: &str = "5201";
const CONN_PORT: &str = "9001";

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn progress(msg: &str) {
    static START: OnceLock<Instant> = OnceLock::new();
    let s = START.get_or_init(Instant::now);
    eprintln!("[{:6.1}s] {msg}", s.elapsed().as_secs_f64());
}

/// Runs a command to completion; panics with its output on failure.
fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    if !out.status.success() {
        panic!(
            "{prog} {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next() == Some("cgroup2") {
            let mp = left.split(' ').nth(4)?;
            // Octal escapes (\040 for a space) in mountinfo.
            let mut out = Vec::new();
            let b = mp.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 4 <= b.len() {
                    if let Ok(v) = u8::from_str_radix(&mp[i + 1..i + 4], 8) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            return Some(PathBuf::from(String::from_utf8_lossy(&out).into_owned()));
        }
    }
    None
}

fn netns_ino() -> u64 {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

static HOST_NETNS: OnceLock<u64> = OnceLock::new();

/// Runs `f` on a fresh thread in a new network namespace (lo up). Processes
/// it spawns inherit the namespace.
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            assert_ne!(
                netns_ino(),
                *HOST_NETNS.get().unwrap(),
                "still in the host's network namespace"
            );
            sh("ip", &["link", "set", "lo", "up"]);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Guard for commands that change the ruleset: never in the host netns.
fn assert_private_netns() {
    assert_ne!(netns_ino(), *HOST_NETNS.get().unwrap());
}

fn nft(args: &[&str]) {
    assert_private_netns();
    sh("nft", args);
}

fn load_ruleset() {
    nft(&["-f", &format!("{MANIFEST}/nft/cgtproxy.nft")]);
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.ino()).unwrap_or(0)
}

/// Every directory under `top`, `top` included: the ids the map must hold.
fn walk_ids(top: &Path) -> HashSet<u64> {
    let mut out = HashSet::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        out.insert(ino(&d));
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

fn dump_map() -> Option<HashSet<u64>> {
    nl::Sock::new(false).ok()?.dump(TABLE, MAP).ok()?
}

/// `usage_usec` of a cgroup's cpu.stat (always present on cgroup2): CPU
/// time of every process that ran in it, exited children included.
fn cg_cpu_us(cg: &Path) -> u64 {
    fs::read_to_string(cg.join("cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec ").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

fn cg_pids(cg: &Path) -> Vec<u32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Context switches (voluntary + involuntary) of every thread of `pids`.
fn ctx_switches(pids: &[u32]) -> u64 {
    let mut n = 0;
    for pid in pids {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in rd.flatten() {
            let s = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            n += status_field(&s, "voluntary_ctxt_switches:")
                + status_field(&s, "nonvoluntary_ctxt_switches:");
        }
    }
    n
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            status_field(
                &fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default(),
                "VmRSS:",
            )
        })
        .sum()
}

/// Kills everything in a cgroup subtree and waits until it is empty.
fn cg_kill(cg: &Path) {
    if fs::write(cg.join("cgroup.kill"), "1").is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ev = fs::read_to_string(cg.join("cgroup.events")).unwrap_or_default();
        if !ev.contains("populated 1") {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Removes a cgroup subtree (after killing what runs in it).
fn cg_remove(top: &Path) {
    if !top.exists() {
        return;
    }
    cg_kill(top);
    let mut dirs = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    // Deepest (longest) paths first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
    for d in dirs {
        let _ = fs::remove_dir(&d);
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: two fresh fds we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Makes `cmd` start inside cgroup `cg` (pre-exec write of "0" to its
/// cgroup.procs) and, when given, get `ready` as fd 3.
fn place(cmd: &mut Command, cg: &Path, ready: Option<&OwnedFd>) -> fs::File {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}: {e}", cg.display()));
    let pfd = procs.as_raw_fd();
    let wfd = ready.map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls (write, dup2) after fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(pfd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(w) = wfd {
                if libc::dup2(w, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    procs
}

// ---------------------------------------------------------------------------
// Statistics and the table
// ---------------------------------------------------------------------------

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[i.clamp(1, s.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    pct(v, 50.0)
}

fn us(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 10_000.0 {
        format!("{:.1} ms", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "–".into()
    } else if a / b >= 10.0 {
        format!("{:.0}×", a / b)
    } else if a / b < 0.1 {
        format!("1/{:.0}", b / a)
    } else {
        format!("{:.2}×", a / b)
    }
}

struct Row {
    figure: String,
    cgt: String,
    base: String,
    ratio: String,
    target: String,
    met: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    missed: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        figure: &str,
        cgt: String,
        base: String,
        ratio: String,
        target: &str,
        met: Option<bool>,
    ) {
        let met = match met {
            Some(true) => "yes".to_string(),
            Some(false) => {
                self.missed
                    .push(format!("{figure}: {cgt} (target {target})"));
                "**no**".to_string()
            }
            None => "".to_string(),
        };
        self.rows.push(Row {
            figure: figure.into(),
            cgt,
            base,
            ratio,
            target: target.into(),
            met,
        });
    }
    fn note(&mut self, s: String) {
        progress(&format!("note: {s}"));
        self.notes.push(s);
    }
}

// ---------------------------------------------------------------------------
// The two implementations under test
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Cgt,
    Base,
}

struct Bench {
    /// The daemon under test: the static release binary when it builds.
    daemon: PathBuf,
    root: PathBuf,
    tmp: PathBuf,
    cfg: PathBuf,
    n: usize,
}

struct Inst {
    who: Who,
    child: Child,
    cg: PathBuf,
    ready: OwnedFd,
    t_spawn: Instant,
    log: PathBuf,
}

impl Inst {
    /// Starts cgtproxy or the baseline on `watched`, in runner cgroup
    /// `<root>/run/<name>`, in the calling thread's network namespace.
    fn spawn(b: &Bench, who: Who, watched: &Path, name: &str) -> Inst {
        let cg = b.root.join("run").join(name);
        fs::create_dir_all(&cg).unwrap();
        let log = b.tmp.join(format!("{name}.log"));
        let (r, w) = pipe();
        let mut cmd = match who {
            Who::Cgt => {
                let mut c = Command::new(&b.daemon);
                c.arg("run")
                    .arg("-c")
                    .arg(&b.cfg)
                    .arg("--cgroup-root")
                    .arg(watched)
                    .args(["--ready-fd", "3"]);
                c
            }
            Who::Base => {
                let mut c = Command::new("bash");
                c.arg(format!("{MANIFEST}/benches/baseline.sh"))
                    .arg(watched)
                    .env("READY_FD", "3")
                    .env("TABLE", TABLE)
                    .env("MAP", MAP)
                    .env("VMAP", VMAP)
                    .env("VERDICT", "goto direct")
                    .env("NUMBER", BASELINE_NUMBER.to_string());
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let _procs = place(&mut cmd, &cg, Some(&w));
        let t_spawn = Instant::now();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {who:?}: {e}"));
        drop(w);
        Inst {
            who,
            child,
            cg,
            ready: r,
            t_spawn,
            log,
        }
    }

    /// Waits for the newline on fd 3: the instant it was read.
    fn wait_ready(&self, limit: Duration) -> Instant {
        self.try_ready(limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for the newline on fd 3; on failure, what went wrong and the
    /// instance's log.
    fn try_ready(&self, limit: Duration) -> Result<Instant, String> {
        let mut pfd = libc::pollfd {
            fd: self.ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) };
        let t = Instant::now();
        let mut b = [0u8; 8];
        let got = if n > 0 {
            // SAFETY: reading into a local buffer.
            unsafe { libc::read(pfd.fd, b.as_mut_ptr().cast(), b.len()) }
        } else {
            0
        };
        if got <= 0 || b[0] != b'\n' {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            return Err(format!(
                "{:?} {}: {}",
                self.who,
                if n == 0 {
                    format!("not ready within {limit:?}")
                } else {
                    "exited before it was ready".into()
                },
                log.trim()
            ));
        }
        Ok(t)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pids(&self) -> Vec<u32> {
        cg_pids(&self.cg)
    }

    fn cpu_us(&self) -> u64 {
        cg_cpu_us(&self.cg)
    }

    /// cgtproxy: SIGTERM (it empties its elements) and wait. Baseline: kill
    /// its whole process tree.
    fn stop(mut self) {
        if self.who == Who::Cgt {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = self.child.try_wait() {
                    if !st.success() {
                        progress(&format!(
                            "cgtproxy exited with {st}; log:\n{}",
                            fs::read_to_string(&self.log).unwrap_or_default()
                        ));
                    }
                    let _ = fs::remove_dir(&self.cg);
                    return;
                }
                thread::sleep(Duration::from_millis(2));
            }
            progress("cgtproxy did not exit within 20 s of SIGTERM; killing it");
        }
        cg_kill(&self.cg);
        let _ = self.child.wait();
        let _ = fs::remove_dir(&self.cg);
    }

    /// Waits until the instance's CPU time stops growing (no change over
    /// `quiet`), up to `limit`. Returns when it went quiet (or None).
    fn wait_quiet(&self, quiet: Duration, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        let mut last = self.cpu_us();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            let now = self.cpu_us();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Some(since);
            }
        }
        None
    }
}

/// Background reader of element events, timestamped at receipt.
struct Listener {
    stop: std::sync::Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Result<(), String>>>,
    rx: mpsc::Receiver<(Instant, Ev)>,
}

impl Listener {
    /// Subscribes in the calling thread's netns, reads on a new thread.
    fn start() -> Listener {
        let mut sock = nl::Sock::new(true).expect("nf_tables event socket");
        sock.set_timeout_ms(50);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let st = stop.clone();
        let handle = thread::spawn(move || {
            let mut evs = Vec::new();
            while !st.load(Ordering::Relaxed) {
                evs.clear();
                match sock.recv_events(false, TABLE, MAP, &mut evs) {
                    Ok(Some(t)) => {
                        for e in &evs {
                            let _ = tx.send((t, *e));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("event socket: {e}")),
                }
            }
            Ok(())
        });
        Listener {
            stop,
            handle: Some(handle),
            rx,
        }
    }

    /// Waits until every id in `want` was seen with the given kind; the
    /// instant of the last one, and how many were seen.
    fn wait_all(
        &self,
        want: &HashSet<u64>,
        add: bool,
        limit: Duration,
    ) -> (Option<Instant>, usize) {
        let mut pending = want.clone();
        let deadline = Instant::now() + limit;
        let mut last = None;
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok((t, Ev::Add(k))) if add => {
                    if pending.remove(&k) {
                        last = Some(t);
                    }
                }
                Ok((t, Ev::Del(k))) if !add => {
                    if pending.remove(&k) {
                        last = Some(t);
                    }
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let seen = want.len() - pending.len();
        (if pending.is_empty() { last } else { None }, seen)
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            if let Ok(Err(e)) = h.join() {
                panic!("{e} (events lost: figures would be wrong)");
            }
        }
    }
}

/// Starts `who` watching `dir` with the cgroups already there. If it cannot
/// start on them (a bug, reported in the note), it is started on an empty
/// directory instead and the same number of cgroups is made there while it
/// runs. Returns the instance, the directory it watches, and the note.
fn start_full(b: &Bench, who: Who, dir: &Path, name: &str) -> (Inst, PathBuf, Option<String>) {
    let inst = Inst::spawn(b, who, dir, name);
    let e = match inst.try_ready(Duration::from_secs(60)) {
        Ok(_) => return (inst, dir.to_path_buf(), None),
        Err(e) => e,
    };
    inst.stop();
    let alt = b.root.join(format!("{name}-alt"));
    fs::create_dir_all(&alt).unwrap();
    let inst = Inst::spawn(b, who, &alt, &format!("{name}-alt"));
    inst.wait_ready(Duration::from_secs(60));
    let lst = Listener::start();
    let n = walk_ids(dir).len() - 1;
    let paths: Vec<PathBuf> = (0..n).map(|k| alt.join(format!("c-{k}"))).collect();
    for p in &paths {
        fs::create_dir(p).unwrap();
    }
    let ids: HashSet<u64> = paths.iter().map(|p| ino(p)).collect();
    let (done, seen) = lst.wait_all(&ids, true, Duration::from_secs(120));
    lst.finish();
    let why = e.lines().last().unwrap_or_default().to_string();
    let note = format!(
        "{name}: {who:?} could not start on {n} existing cgroups ({why}); it was started on an empty tree and the {n} cgroups made afterwards ({}).",
        if done.is_some() {
            "all reached the map".to_string()
        } else {
            format!("only {seen} reached the map")
        }
    );
    (inst, alt, Some(note))
}

// ---------------------------------------------------------------------------
// 1. Event latency
// ---------------------------------------------------------------------------

struct Latency {
    /// mkdir call → element add seen.
    add: Vec<f64>,
    /// The element was already committed when mkdir returned.
    before_return: usize,
    /// rmdir call → element delete seen.
    del: Vec<f64>,
    mkdir: Vec<f64>,
}

/// Waits until an event `want` accepts arrives. Blocking receives by
/// default (the timestamp then includes the bench's own wakeup, a few µs);
/// BENCH_SPIN=1 busy-polls instead, which on two cores leaves the daemon
/// one core to share with every kworker and inflates its tail.
fn spin_for(
    sock: &mut nl::Sock,
    want: impl Fn(Ev) -> bool,
    limit: Duration,
) -> Option<(Instant, Ev)> {
    let deadline = Instant::now() + limit;
    let mut evs = Vec::new();
    loop {
        evs.clear();
        let spin = std::env::var("BENCH_SPIN").is_ok_and(|v| v == "1");
        match sock.recv_events(spin, TABLE, MAP, &mut evs) {
            Ok(Some(t)) => {
                if let Some(e) = evs.iter().find(|e| want(**e)) {
                    return Some((t, *e));
                }
            }
            Ok(None) => {
                if Instant::now() > deadline {
                    return None;
                }
            }
            Err(e) => panic!("event socket: {e}"),
        }
    }
}

/// A receive that returns this soon after mkdir returned found the event
/// already queued.
const QUEUED: Duration = Duration::from_micros(3);

fn latency_loop(sock: &mut nl::Sock, w: &Path, n: usize, who: Who) -> Latency {
    let mut l = Latency {
        add: vec![],
        before_return: 0,
        del: vec![],
        mkdir: vec![],
    };
    sock.drain();
    let limit = Duration::from_secs(5);
    for i in 0..n {
        let p = w.join(format!("lat-{i}"));
        let t0 = Instant::now();
        fs::create_dir(&p).unwrap();
        let t1 = Instant::now();
        // The first Add after the mkdir is ours (nothing else runs); the id
        // is checked after the spin so that stat() does not delay it.
        let mut got = spin_for(sock, |e| matches!(e, Ev::Add(_)), limit);
        let id = ino(&p);
        while let Some((_, Ev::Add(k))) = got {
            if k == id {
                break;
            }
            got = spin_for(sock, |e| e == Ev::Add(id), limit);
        }
        let Some((t, _)) = got else {
            panic!("{who:?}: no element for {} within {limit:?}", p.display());
        };
        l.add.push((t - t0).as_secs_f64() * 1e6);
        l.mkdir.push((t1 - t0).as_secs_f64() * 1e6);
        if t - t1 < QUEUED {
            l.before_return += 1;
        }
        thread::sleep(Duration::from_millis(1));
        let t2 = Instant::now();
        fs::remove_dir(&p).unwrap();
        match who {
            Who::Cgt => {
                let Some((t, _)) = spin_for(sock, |e| e == Ev::Del(id), limit) else {
                    panic!(
                        "cgtproxy: element of {} not deleted within {limit:?}",
                        p.display()
                    );
                };
                l.del.push((t - t2).as_secs_f64() * 1e6);
            }
            Who::Base => {
                // Its `nft delete element` fails (see baseline.sh); let it.
                thread::sleep(Duration::from_millis(25));
                sock.drain();
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    l
}

fn phase_latency(b: &Bench, rep: &mut Report) {
    let (n_cgt, n_base) = if quick() { (200, 40) } else { (1000, 300) };
    let w = b.root.join("w");
    let (c, s) = in_netns(|| {
        load_ruleset();
        let mut sock = nl::Sock::new(true).expect("nf_tables event socket");
        sock.set_timeout_ms(100);
        progress(&format!("latency: cgtproxy, {n_cgt} samples"));
        let inst = Inst::spawn(b, Who::Cgt, &w, "lat-cgt");
        inst.wait_ready(Duration::from_secs(10));
        let c = latency_loop(&mut sock, &w, n_cgt, Who::Cgt);
        inst.stop();
        nft(&["flush", "map", "inet", TABLE, MAP]);
        progress(&format!("latency: baseline, {n_base} samples"));
        let inst = Inst::spawn(b, Who::Base, &w, "lat-base");
        inst.wait_ready(Duration::from_secs(30));
        let s = latency_loop(&mut sock, &w, n_base, Who::Base);
        inst.stop();
        (c, s)
    });
    let (c50, c99, s50, s99) = (
        median(&c.add),
        pct(&c.add, 99.0),
        median(&s.add),
        pct(&s.add, 99.0),
    );
    rep.row(
        &format!("event latency, mkdir call → element committed, p50 (n = {n_cgt} / {n_base})"),
        us(c50),
        us(s50),
        ratio(c50, s50),
        "≤ 100 µs",
        Some(c50 <= 100.0),
    );
    rep.row(
        "event latency, mkdir call → element committed, p99",
        us(c99),
        us(s99),
        ratio(c99, s99),
        "≤ 500 µs",
        Some(c99 <= 500.0),
    );
    rep.row(
        "rmdir call → element deleted, p50 / p99",
        format!("{} / {}", us(median(&c.del)), us(pct(&c.del, 99.0))),
        "never (nft cannot name a removed cgroup)".into(),
        "–".into(),
        "",
        None,
    );
    rep.note(format!(
        "event latency: mkdir(2) of a cgroup itself took {} median, {} p99; cgtproxy had committed the element before mkdir returned in {} of {} samples (the inotify event comes early in mkdir; the figure is then bounded below by mkdir's own time). cgtproxy add latency p90 {}, p95 {}, max {}; delete p90 {}, max {}.",
        us(median(&c.mkdir)),
        us(pct(&c.mkdir, 99.0)),
        c.before_return,
        c.add.len(),
        us(pct(&c.add, 90.0)),
        us(pct(&c.add, 95.0)),
        us(pct(&c.add, 100.0)),
        us(pct(&c.del, 90.0)),
        us(pct(&c.del, 100.0)),
    ));
}

/// Event latency again, with the 10,000-cgroup tree watched and its
/// elements in the map (the kernel's cost of a transaction may grow with
/// the map).
fn phase_latency_full(b: &Bench, rep: &mut Report) {
    let (n_cgt, n_base) = if quick() { (100, 20) } else { (500, 100) };
    let w = b.root.join("w");
    let (c, s, notes) = in_netns(|| {
        load_ruleset();
        let mut notes = Vec::new();
        let mut sock = nl::Sock::new(true).expect("nf_tables event socket");
        sock.set_timeout_ms(100);
        let mut run = |who: Who, n: usize| {
            progress(&format!("latency with a full map: {who:?}, {n} samples"));
            let (inst, dir, note) = start_full(b, who, &w, &format!("latfull-{who:?}"));
            notes.extend(note);
            let elements = dump_map().map_or(0, |m| m.len());
            let l = latency_loop(&mut sock, &dir, n, who);
            inst.stop();
            nft(&["flush", "map", "inet", TABLE, MAP]);
            (l, elements)
        };
        let c = run(Who::Cgt, n_cgt);
        let s = run(Who::Base, n_base);
        (c, s, notes)
    });
    for n in notes {
        rep.note(n);
    }
    let ((c, ce), (s, _)) = (c, s);
    let (c50, c99) = (median(&c.add), pct(&c.add, 99.0));
    rep.row(
        &format!("event latency with {ce} elements in the map, p50 / p99 (n = {n_cgt} / {n_base})"),
        format!("{} / {}", us(c50), us(c99)),
        format!("{} / {}", us(median(&s.add)), us(pct(&s.add, 99.0))),
        ratio(c50, median(&s.add)),
        "≤ 100 / 500 µs",
        Some(c50 <= 100.0 && c99 <= 500.0),
    );
    rep.row(
        &format!("rmdir → element deleted with {ce} elements in the map, p50 / p99"),
        format!("{} / {}", us(median(&c.del)), us(pct(&c.del, 99.0))),
        "never".into(),
        "–".into(),
        "",
        None,
    );
}

// ---------------------------------------------------------------------------
// 2. Burst
// ---------------------------------------------------------------------------

struct Burst {
    n: usize,
    add_conv: Option<Duration>,
    add_seen: usize,
    add_cpu_us: f64,
    del_conv: Option<Duration>,
    del_seen: usize,
    del_cpu_us: f64,
    /// Baseline: elements left in the map after it processed every rmdir.
    stale: usize,
    /// Baseline: time from the last rmdir until it stopped working.
    del_busy: Option<Duration>,
    rss_after_kib: u64,
    mkdir_secs: f64,
}

fn burst_one(b: &Bench, who: Who, n: usize) -> Burst {
    let w = b.root.join("w");
    let inst = Inst::spawn(b, who, &w, &format!("burst-{who:?}"));
    inst.wait_ready(Duration::from_secs(30));
    let lst = Listener::start();
    thread::sleep(Duration::from_millis(100));
    let limit = if who == Who::Cgt {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(120).max(Duration::from_millis(20 * n as u64))
    };

    let cpu0 = inst.cpu_us();
    let paths: Vec<PathBuf> = (0..n).map(|i| w.join(format!("b-{i}"))).collect();
    let t0 = Instant::now();
    for p in &paths {
        fs::create_dir(p).unwrap();
    }
    let t_last = Instant::now();
    let mkdir_secs = (t_last - t0).as_secs_f64();
    let ids: HashSet<u64> = paths.iter().map(|p| ino(p)).collect();
    let (conv, add_seen) = lst.wait_all(&ids, true, limit);
    let add_conv = conv.map(|t| t.saturating_duration_since(t_last));
    inst.wait_quiet(Duration::from_millis(300), Duration::from_secs(30));
    let cpu1 = inst.cpu_us();
    let rss_after_kib = rss_kib(&inst.pids());

    for p in &paths {
        fs::remove_dir(p).unwrap();
    }
    let t_last = Instant::now();
    let (mut del_conv, del_seen, mut stale, mut del_busy);
    del_conv = None;
    stale = 0;
    del_busy = None;
    match who {
        Who::Cgt => {
            let (conv, seen) = lst.wait_all(&ids, false, limit);
            del_conv = conv.map(|t| t.saturating_duration_since(t_last));
            del_seen = seen;
            inst.wait_quiet(Duration::from_millis(300), Duration::from_secs(30));
        }
        Who::Base => {
            // Every `nft delete element` fails; wait until it gave up.
            let q = inst.wait_quiet(Duration::from_millis(500), limit);
            del_busy = q.map(|t| t.saturating_duration_since(t_last));
            let left = dump_map().unwrap_or_default();
            stale = ids.iter().filter(|k| left.contains(k)).count();
            del_seen = n - stale;
        }
    }
    let cpu2 = inst.cpu_us();
    lst.finish();
    inst.stop();
    Burst {
        n,
        add_conv,
        add_seen,
        add_cpu_us: (cpu1 - cpu0) as f64 / n as f64,
        del_conv,
        del_seen,
        del_cpu_us: (cpu2 - cpu1) as f64 / n as f64,
        stale,
        del_busy,
        rss_after_kib,
        mkdir_secs,
    }
}

fn phase_burst(b: &Bench, rep: &mut Report) {
    let n = b.n;
    let nb = env_num("BENCH_BASELINE_BURST", n as u64) as usize;
    let (c, s) = in_netns(|| {
        load_ruleset();
        progress(&format!("burst: cgtproxy, {n} cgroups"));
        let c = burst_one(b, Who::Cgt, n);
        nft(&["flush", "map", "inet", TABLE, MAP]);
        progress(&format!("burst: baseline, {nb} cgroups"));
        let s = burst_one(b, Who::Base, nb);
        nft(&["flush", "map", "inet", TABLE, MAP]);
        (c, s)
    });
    let conv = |x: &Burst, d: Option<Duration>, seen: usize| match d {
        Some(d) => us(d.as_secs_f64() * 1e6),
        None => format!("not converged ({seen}/{})", x.n),
    };
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let base_label = if s.n == c.n {
        String::new()
    } else {
        format!(" (baseline: {} cgroups)", s.n)
    };
    rep.row(
        &format!("burst of {n} mkdirs: last mkdir → map holds all{base_label}"),
        conv(&c, c.add_conv, c.add_seen),
        conv(&s, s.add_conv, s.add_seen),
        ratio(ms(c.add_conv), ms(s.add_conv)),
        "≤ 20 ms",
        Some(c.add_conv.is_some_and(|d| d <= Duration::from_millis(20))),
    );
    rep.row(
        "burst mkdirs: CPU per cgroup (daemon; baseline: all its processes)",
        us(c.add_cpu_us),
        us(s.add_cpu_us),
        ratio(c.add_cpu_us, s.add_cpu_us),
        "≤ 20 µs",
        Some(c.add_cpu_us <= 20.0),
    );
    rep.row(
        &format!("burst of {n} rmdirs: last rmdir → map holds none"),
        conv(&c, c.del_conv, c.del_seen),
        format!("never ({} of {} stale)", s.stale, s.n),
        "–".into(),
        "≤ 20 ms",
        Some(c.del_conv.is_some_and(|d| d <= Duration::from_millis(20))),
    );
    rep.row(
        "burst rmdirs: CPU per cgroup",
        us(c.del_cpu_us),
        us(s.del_cpu_us),
        ratio(c.del_cpu_us, s.del_cpu_us),
        "≤ 20 µs",
        Some(c.del_cpu_us <= 20.0),
    );
    rep.note(format!(
        "burst: the loop made {} cgroups in {:.2} s (cgtproxy run) and {} in {:.2} s (baseline run, which competes for the CPU); cgtproxy RSS right after the mkdir burst: {} KiB.",
        c.n, c.mkdir_secs, s.n, s.mkdir_secs, c.rss_after_kib
    ));
    if let Some(d) = s.del_busy {
        rep.note(format!(
            "baseline after the rmdir burst: its failing `nft delete element` calls kept it busy {:.1} s after the last rmdir; {} elements stayed in the map.",
            d.as_secs_f64(),
            s.stale
        ));
    }
}

// ---------------------------------------------------------------------------
// 3. Cold start
// ---------------------------------------------------------------------------

fn make_tree(w: &Path, n: usize) {
    fs::create_dir_all(w.join("l3/l4/l5")).unwrap();
    for i in 0..n {
        let p = w.join(format!("c-{i}"));
        if !p.exists() {
            fs::create_dir(&p).unwrap();
        }
    }
}

fn phase_cold(b: &Bench, rep: &mut Report) {
    let n = b.n;
    let w = b.root.join("w");
    let runs = if quick() { (3, 1) } else { (7, 3) };
    let (c, s, cok, sok, cerr, serr) = in_netns(|| {
        load_ruleset();
        let want = walk_ids(&w);
        let mut out: (
            Vec<f64>,
            Vec<f64>,
            bool,
            bool,
            Option<String>,
            Option<String>,
        ) = (vec![], vec![], true, true, None, None);
        for (who, k) in [(Who::Cgt, runs.0), (Who::Base, runs.1)] {
            progress(&format!(
                "cold start: {who:?}, {} cgroups, {k} runs",
                want.len()
            ));
            for i in 0..k {
                nft(&["flush", "map", "inet", TABLE, MAP]);
                let inst = Inst::spawn(b, who, &w, &format!("cold-{who:?}-{i}"));
                let r = inst.try_ready(Duration::from_secs(60));
                let exact = r.is_ok() && dump_map().is_some_and(|m| m == want);
                let d = r.as_ref().map(|t| (*t - inst.t_spawn).as_secs_f64() * 1e6);
                inst.stop();
                let (times, ok, err) = match who {
                    Who::Cgt => (&mut out.0, &mut out.2, &mut out.4),
                    Who::Base => (&mut out.1, &mut out.3, &mut out.5),
                };
                match d {
                    Ok(d) => times.push(d),
                    Err(e) => {
                        progress(&format!("cold start failed: {e}"));
                        *err = Some(e.clone());
                        *ok = false;
                        break;
                    }
                }
                *ok &= exact;
            }
        }
        nft(&["flush", "map", "inet", TABLE, MAP]);
        out
    });
    let ok = |x: bool| if x { "" } else { ", map WRONG" };
    let cell = |t: &Vec<f64>, good: bool, err: &Option<String>| match err {
        Some(e) => format!("FAILED: {}", e.lines().last().unwrap_or_default()),
        None => format!("{}, {}{}", us(median(t)), us(pct(t, 100.0)), ok(good)),
    };
    rep.row(
        &format!(
            "cold start, {n} cgroups: exec → ready, map exact (median, max of {} / {})",
            runs.0, runs.1
        ),
        cell(&c, cok, &cerr),
        cell(&s, sok, &serr),
        ratio(median(&c), median(&s)),
        "≤ 100 ms",
        Some(cerr.is_none() && median(&c) <= 100_000.0 && cok),
    );
    if let Some(e) = cerr {
        rep.note(format!("cold start: cgtproxy failed: {e}"));
    }
}

// ---------------------------------------------------------------------------
// 4. Idle
// ---------------------------------------------------------------------------

fn phase_idle(b: &Bench, rep: &mut Report) {
    let secs = env_num("BENCH_IDLE_SECS", if quick() { 5 } else { 60 });
    let w = b.root.join("w");
    let w100 = b.root.join("w100");
    fs::create_dir_all(&w100).unwrap();
    for i in 0..99 {
        fs::create_dir_all(w100.join(format!("c-{i}"))).unwrap();
    }
    let n10k = walk_ids(&w).len();
    // Four instances side by side, each in its own netns with its own table.
    let insts: Vec<(Who, usize, Inst)> = [
        (Who::Cgt, &w),
        (Who::Base, &w),
        (Who::Cgt, &w100),
        (Who::Base, &w100),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (who, dir))| {
        let (inst, note) = in_netns(|| {
            load_ruleset();
            let (inst, _, note) = start_full(b, who, dir, &format!("idle-{i}"));
            (inst, note)
        });
        if let Some(n) = note {
            rep.note(n);
        }
        (who, walk_ids(dir).len(), inst)
    })
    .collect();
    thread::sleep(Duration::from_secs(1));
    progress(&format!(
        "idle: 4 instances ({n10k} and 100 cgroups), {secs} s"
    ));
    let before: Vec<(u64, u64)> = insts
        .iter()
        .map(|(_, _, i)| (ctx_switches(&i.pids()), i.cpu_us()))
        .collect();
    thread::sleep(Duration::from_secs(secs));
    let after: Vec<(u64, u64, u64)> = insts
        .iter()
        .map(|(_, _, i)| (ctx_switches(&i.pids()), i.cpu_us(), rss_kib(&i.pids())))
        .collect();
    let procs: Vec<usize> = insts.iter().map(|(_, _, i)| i.pids().len()).collect();
    for (_, _, i) in insts {
        i.stop();
    }
    for (k, n) in [(0usize, n10k), (2, 100)] {
        let (cw, cc, cr) = (
            after[k].0 - before[k].0,
            after[k].1 - before[k].1,
            after[k].2,
        );
        let (sw, sc, sr) = (
            after[k + 1].0 - before[k + 1].0,
            after[k + 1].1 - before[k + 1].1,
            after[k + 1].2,
        );
        rep.row(
            &format!("idle {secs} s, {n} cgroups: context switches"),
            cw.to_string(),
            sw.to_string(),
            "–".into(),
            "0",
            Some(cw == 0),
        );
        rep.row(
            &format!("idle {secs} s, {n} cgroups: CPU time"),
            us(cc as f64),
            us(sc as f64),
            "–".into(),
            "0",
            Some(cc == 0),
        );
        let (t, lim) = if n > 1000 {
            ("≤ 4 MiB", 4096)
        } else {
            ("≤ 1 MiB", 1024)
        };
        rep.row(
            &format!(
                "idle, {n} cgroups: RSS (baseline: sum of its {} processes)",
                procs[k + 1]
            ),
            format!("{:.2} MiB", cr as f64 / 1024.0),
            format!("{:.2} MiB", sr as f64 / 1024.0),
            ratio(cr as f64, sr as f64),
            t,
            Some(cr <= lim),
        );
    }
}

const MUSL: &str = "x86_64-unknown-linux-musl";

/// Builds the release artifact, the static musl binary, with the cargo that
/// runs this suite; `None` when that fails (target not installed).
fn build_static() -> Option<PathBuf> {
    progress(&format!("cargo build --release --target {MUSL}"));
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--target", MUSL])
        .current_dir(MANIFEST)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(MANIFEST).join("target"));
    let bin = dir.join(MUSL).join("release/cgtproxy");
    (built && bin.exists()).then_some(bin)
}

fn phase_size(rep: &mut Report, bin: Option<&Path>) {
    let Some(bin) = bin else {
        rep.note(format!(
            "static binary size not measured: `cargo build --release --target {MUSL}` failed (is the target installed?)"
        ));
        return;
    };
    let len = fs::metadata(bin).map_or(0, |m| m.len());
    let file = sh("file", &[bin.to_str().unwrap()]);
    let stripped = file.contains("stripped") && !file.contains("not stripped");
    let kib = len as f64 / 1024.0;
    rep.row(
        &format!(
            "static binary (musl, {}), size",
            if stripped { "stripped" } else { "NOT stripped" }
        ),
        format!("{kib:.1} KiB ({len} B)"),
        "–".into(),
        "–".into(),
        "≤ 600 KiB",
        Some(len <= 600 * 1024),
    );
}

// ---------------------------------------------------------------------------
// 5. Packet path
// ---------------------------------------------------------------------------

const FW: &str = "table inet benchfw {
    chain input { type filter hook input priority filter; policy accept; ct state established,related accept; }
    chain output { type filter hook output priority filter; policy accept; ct state established,related accept; }
}
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Conf {
    None,
    Ours,
    Fw,
    FwOurs,
}

struct PacketEnv<'a> {
    b: &'a Bench,
    /// Why `cgtproxy run --once` could not fill the map (then nft did).
    fill_failed: Option<String>,
    state: Option<Conf>,
    fw_file: PathBuf,
    client_cg: PathBuf,
}

impl PacketEnv<'_> {
    fn set(&mut self, c: Conf) {
        if self.state == Some(c) {
            return;
        }
        assert_private_netns();
        let _ = sh_ok("nft", &["delete", "table", "inet", TABLE]);
        let _ = sh_ok("nft", &["delete", "table", "inet", "benchfw"]);
        if matches!(c, Conf::Fw | Conf::FwOurs) {
            nft(&["-f", self.fw_file.to_str().unwrap()]);
        }
        if matches!(c, Conf::Ours | Conf::FwOurs) {
            load_ruleset();
            // The daemon's own sync fills the map (elements stay after --once).
            let w = self.b.root.join("w");
            let out = Command::new(&self.b.daemon)
                .args(["run", "--once", "-q", "-c"])
                .arg(&self.b.cfg)
                .arg("--cgroup-root")
                .arg(&w)
                .stdin(Stdio::null())
                .output()
                .expect("cgtproxy --once");
            if !out.status.success() {
                // Fill it the way baseline.sh does its initial sync instead.
                if self.fill_failed.is_none() {
                    self.fill_failed =
                        Some(String::from_utf8_lossy(&out.stderr).trim().to_string());
                }
                let mount = cgroup2_mount().unwrap();
                let mut f = format!(
                    "add element inet {TABLE} {VMAP} {{ {BASELINE_NUMBER} : goto direct }}\n\
                     add element inet {TABLE} {MAP} {{\n"
                );
                let mut stack = vec![w.clone()];
                while let Some(d) = stack.pop() {
                    let rel = d
                        .strip_prefix(&mount)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string();
                    let _ = writeln!(f, "\"{rel}\" : {BASELINE_NUMBER},");
                    for e in fs::read_dir(&d).unwrap().flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(e.path());
                        }
                    }
                }
                f.push_str("}\n");
                let file = self.b.tmp.join("fill.nft");
                fs::write(&file, f).unwrap();
                sh(
                    "unshare",
                    &[
                        "-m",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        &format!(
                            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && nft -f {}",
                            file.display()
                        ),
                    ],
                );
            }
        }
        self.state = Some(c);
    }

    fn client(&self, prog: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).stderr(Stdio::inherit());
        let _procs = place(&mut cmd, &self.client_cg, None);
        let out = cmd.output().unwrap_or_else(|e| panic!("{prog}: {e}"));
        if !out.status.success() {
            panic!(
                "{prog} {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn iperf(&self, udp: bool) -> f64 {
        let mut args = vec![
            "-c", SERVER_V4, "-p", IPERF_PORT, "-t", "2", "-O", "1", "-J",
        ];
        if udp {
            args.extend(["-u", "-b", "0", "-l", "64"]);
        }
        let out = self.client("iperf3", &args);
        let v: miniserde::json::Value = miniserde::json::from_str(&out).expect("iperf3 JSON");
        let get = |v: &miniserde::json::Value, k: &str| -> miniserde::json::Value {
            match v {
                miniserde::json::Value::Object(o) => o.get(k).cloned().unwrap_or_default(),
                _ => miniserde::json::Value::Null,
            }
        };
        let num = |v: miniserde::json::Value| match v {
            miniserde::json::Value::Number(miniserde::json::Number::F64(f)) => f,
            miniserde::json::Value::Number(miniserde::json::Number::U64(u)) => u as f64,
            miniserde::json::Value::Number(miniserde::json::Number::I64(i)) => i as f64,
            _ => f64::NAN,
        };
        let end = get(&v, "end");
        if udp {
            let s = get(&end, "sum_sent");
            num(get(&s, "packets")) / num(get(&s, "seconds"))
        } else {
            num(get(&get(&end, "sum_received"), "bits_per_second"))
        }
    }

    fn conns(&self, secs: f64) -> f64 {
        let exe = std::env::current_exe().unwrap();
        let out = self.client(
            exe.to_str().unwrap(),
            &[
                "__connect",
                &format!("{SERVER_V4}:{CONN_PORT}"),
                &secs.to_string(),
            ],
        );
        let f: Vec<f64> = out
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.get(1).copied().unwrap_or(0.0) > 0.0 {
            progress(&format!("connect loop: {} failed connects", f[1]));
        }
        f[0] / f[2]
    }
}

fn phase_packets(b: &Bench, rep: &mut Report) {
    let pairs = env_num("BENCH_PAIRS", if quick() { 2 } else { 5 }) as usize;
    let conn_secs = if quick() { 0.5 } else { 1.0 };
    let fw_file = b.tmp.join("fw.nft");
    fs::write(&fw_file, FW).unwrap();
    let w = b.root.join("w");
    let client_cg = w.join("l3/l4/l5");
    let servers = b.root.join("run/servers");
    fs::create_dir_all(&servers).unwrap();
    let exe = std::env::current_exe().unwrap();

    let res = in_netns(|| {
        // The server's namespace: held by a sleeping process.
        let mut holder = Command::new("unshare");
        holder.args(["-n", "sleep", "100000"]).stdin(Stdio::null());
        let _p = place(&mut holder, &servers, None);
        let mut holder = holder.spawn().expect("unshare");
        let hp = holder.id().to_string();
        thread::sleep(Duration::from_millis(100));
        sh(
            "ip",
            &[
                "link", "add", "bv0", "type", "veth", "peer", "name", "bv1", "netns", &hp,
            ],
        );
        sh(
            "ip",
            &["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "bv0"],
        );
        sh("ip", &["link", "set", "bv0", "up"]);
        for a in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", "198.18.0.2/24", "dev", "bv1"],
            vec!["ip", "link", "set", "bv1", "up"],
        ] {
            let mut args = vec!["-t", &hp, "-n"];
            args.extend(a);
            sh("nsenter", &args);
        }
        // Client namespace only: more ephemeral ports, and connections
        // closed by RST leave conntrack after 1 s instead of 10 (the
        // connect loop makes ~10^5 of them per run).
        let _ = fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000");
        let _ = fs::write(
            "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close",
            "1",
        );
        let spawn_server = |args: &[&str]| -> Child {
            let mut c = Command::new("nsenter");
            c.args(["-t", &hp, "-n"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            let _p = place(&mut c, &servers, None);
            c.spawn().expect("server")
        };
        let mut iperf_srv = spawn_server(&["iperf3", "-s", "-p", IPERF_PORT]);
        let mut conn_srv = spawn_server(&[
            exe.to_str().unwrap(),
            "__accept",
            &format!("{SERVER_V4}:{CONN_PORT}"),
        ]);
        // Wait for both listeners (without connecting to iperf3: a
        // connection that sends no test parameters upsets it).
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [IPERF_PORT, CONN_PORT] {
            loop {
                let ss = sh(
                    "nsenter",
                    &["-t", &hp, "-n", "ss", "-Hltn", &format!("sport = :{port}")],
                );
                if !ss.trim().is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "server on port {port} did not come up"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }

        let mut env = PacketEnv {
            b,
            fill_failed: None,
            state: None,
            fw_file: fw_file.clone(),
            client_cg: client_cg.clone(),
        };
        // Sanity: the client's traffic hits the element of its own cgroup,
        // and 10,000+ elements are in the map.
        env.set(Conf::Ours);
        let elements = dump_map().map_or(0, |m| m.len());
        env.client("iperf3", &["-c", SERVER_V4, "-p", IPERF_PORT, "-t", "1"]);
        let listing = sh(
            "unshare",
            &[
                "-m",
                "sh",
                "-c",
                "mount --make-rprivate / && mount -t tmpfs none /sys/fs/cgroup && nft list map inet cgtproxy cgroups",
            ],
        );
        let key = format!("{} counter packets ", ino(&client_cg));
        let hits: u64 = listing
            .split(&key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);

        let mut tcp: [Vec<f64>; 4] = Default::default();
        let mut udp: [Vec<f64>; 4] = Default::default();
        let mut conn: [Vec<f64>; 4] = Default::default();
        let confs = [Conf::None, Conf::Ours, Conf::Fw, Conf::FwOurs];
        for round in 0..pairs {
            progress(&format!("packet path: round {}/{pairs}", round + 1));
            // Pairs (None, Ours) and (Fw, FwOurs), alternating which runs first.
            let order: [usize; 4] = if round % 2 == 0 {
                [0, 1, 2, 3]
            } else {
                [1, 0, 3, 2]
            };
            for &i in &order {
                env.set(confs[i]);
                tcp[i].push(env.iperf(false));
                udp[i].push(env.iperf(true));
                conn[i].push(env.conns(conn_secs));
            }
        }
        env.set(Conf::None);
        for c in [&mut iperf_srv, &mut conn_srv, &mut holder] {
            let _ = c.kill();
            let _ = c.wait();
        }
        (tcp, udp, conn, elements, hits, env.fill_failed.take())
    });
    let (tcp, udp, conn, elements, hits, fill_failed) = res;
    if let Some(e) = fill_failed {
        rep.note(format!(
            "packet path: `cgtproxy run --once` could not fill the map ({}); nft filled it instead (same elements).",
            e.lines().last().unwrap_or_default()
        ));
    }
    rep.note(format!(
        "packet path: {elements} elements in the map; the client (cgroup level 5, `direct`) hit its own element: {hits} first packets counted for a 2-connection iperf3 run{}.",
        if hits == 0 { " — CHECK FAILED, the lookups did not match" } else { "" }
    ));
    let med = |v: &Vec<f64>| median(v);
    for (name, unit, v, target, lim) in [
        ("TCP bulk throughput", "Gbit/s", &tcp, "≥ 97 %", 0.97),
        ("UDP 64-byte send rate", "kpps", &udp, "≥ 90 %", 0.90),
        ("new TCP connections per second", "k/s", &conn, "", 0.0),
    ] {
        let scale = if unit == "Gbit/s" { 1e9 } else { 1e3 };
        for (a, bi, what) in [(1usize, 0usize, "no table"), (3, 2, "stateful firewall")] {
            let (ma, mb) = (med(&v[a]), med(&v[bi]));
            let r = ma / mb;
            rep.row(
                &format!(
                    "{name}, {unit}: with our table vs {what} (median of {pairs}{})",
                    if what == "no table" {
                        ""
                    } else {
                        "; both with the firewall"
                    }
                ),
                format!("{:.2}", ma / scale),
                format!("{:.2}", mb / scale),
                format!("{:.1} %", r * 100.0),
                target,
                if target.is_empty() {
                    None
                } else {
                    Some(r >= lim)
                },
            );
        }
    }
    // First-packet cost from the connection rates.
    for (a, bi, what) in [
        (1usize, 0usize, "no table"),
        (3, 2, "the stateful firewall"),
    ] {
        let extra = 1e6 / med(&conn[a]) - 1e6 / med(&conn[bi]);
        rep.note(format!(
            "new connection with our table vs {what}: {extra:+.1} µs per connection (from the medians of the connect/RST loop)."
        ));
    }
    let mut raw = String::new();
    for (i, c) in ["none", "ours", "fw", "fw+ours"].iter().enumerate() {
        let _ = write!(
            raw,
            "{c}: TCP {:?} Gbit/s; UDP {:?} kpps; conn {:?} k/s. ",
            tcp[i]
                .iter()
                .map(|x| (x / 1e8).round() / 10.0)
                .collect::<Vec<_>>(),
            udp[i].iter().map(|x| (x / 1e3).round()).collect::<Vec<_>>(),
            conn[i]
                .iter()
                .map(|x| (x / 1e2).round() / 10.0)
                .collect::<Vec<_>>(),
        );
    }
    rep.note(format!("packet path raw runs (in order): {raw}"));
}

// ---------------------------------------------------------------------------
// Helper modes (the bench re-executes itself as client and server)
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 6. Hostile trees (issue 12)
// ---------------------------------------------------------------------------

/// A directory fd (O_PATH), for *at calls below PATH_MAX's reach.
fn dir_fd(dir: Option<&OwnedFd>, name: &str) -> OwnedFd {
    let c = std::ffi::CString::new(name).unwrap();
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: openat with a valid dirfd (or AT_FDCWD) and a C string.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    assert!(fd >= 0, "openat {name}: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn mkdirat(dir: &OwnedFd, name: &std::ffi::CStr) -> bool {
    // SAFETY: mkdirat with a valid dirfd and a C string.
    unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) == 0 }
}

fn rmdirat(dir: &OwnedFd, name: &std::ffi::CStr) {
    // SAFETY: unlinkat with a valid dirfd and a C string.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
}

/// mkdir of a fresh cgroup `dir`, then the time until its element is
/// committed (µs); `None` past 60 s.
/// µs from the mkdir(2) call to the element, and how much of it the
/// mkdir itself took (it waits for cgroup_mutex, which a chain builder at
/// depth N holds for O(N): the kernel's part, not the daemon's).
fn element_after_mkdir(sock: &mut nl::Sock, dir: &Path) -> Option<(f64, f64)> {
    sock.drain();
    let t0 = Instant::now();
    fs::create_dir(dir).unwrap();
    let made = t0.elapsed().as_secs_f64() * 1e6;
    let id = ino(dir);
    spin_for(sock, |e| e == Ev::Add(id), Duration::from_secs(60))
        .map(|(t, _)| ((t - t0).as_secs_f64() * 1e6, made))
}

fn vm_hwm_kib(pid: u32) -> u64 {
    status_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        "VmHWM:",
    )
}

/// What one user's subtree can do to everyone else: a chain of
/// BENCH_HOSTILE_DEPTH (10,000) nested cgroups with 200-byte names made
/// through directory fds, then a storm of BENCH_HOSTILE_STORM (100,000)
/// mkdirs in one directory, both while the daemon runs; meanwhile a cgroup
/// elsewhere is made every so often and the time to its element measured.
/// The config lists every cgroup (`/.*` → direct), so the storm's cgroups
/// get elements too.
fn phase_hostile(b: &Bench, rep: &mut Report) {
    let depth = env_num("BENCH_HOSTILE_DEPTH", if quick() { 1000 } else { 10_000 }) as usize;
    let storm = env_num(
        "BENCH_HOSTILE_STORM",
        if quick() { 10_000 } else { 100_000 },
    ) as usize;
    let h = b.root.join("h");
    fs::create_dir_all(h.join("other")).unwrap();
    fs::create_dir_all(h.join("user")).unwrap();
    fs::create_dir_all(h.join("storm")).unwrap();
    // SAFETY: raising our own fd limit (the chain holds one per level).
    unsafe {
        let r = libc::rlimit {
            rlim_cur: (depth + 4096) as u64,
            rlim_max: (depth + 4096) as u64,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let r = in_netns(|| {
        load_ruleset();
        let mut sock = nl::Sock::new(true).expect("nf_tables event socket");
        sock.set_timeout_ms(50);
        let inst = Inst::spawn(b, Who::Cgt, &h, "hostile-cgt");
        inst.wait_ready(Duration::from_secs(10));
        let mut k = 0usize;
        let log = inst.log.clone();
        let mut sample = |sock: &mut nl::Sock| {
            k += 1;
            let dir = h.join("other").join(format!("o{k}"));
            element_after_mkdir(sock, &dir).unwrap_or_else(|| {
                panic!(
                    "hostile: no element for {} within 60 s; daemon log:\n{}",
                    dir.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                )
            })
        };

        // The chain.
        progress(&format!(
            "hostile: a chain of {depth} cgroups, 200-byte names"
        ));
        let built = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cpu0 = inst.cpu_us();
        let t0 = Instant::now();
        let builder = {
            let (built, user) = (built.clone(), h.join("user"));
            thread::spawn(move || {
                let name = std::ffi::CString::new("d".repeat(200)).unwrap();
                let mut fds = vec![dir_fd(None, user.to_str().unwrap())];
                for _ in 0..depth {
                    assert!(
                        mkdirat(fds.last().unwrap(), &name),
                        "mkdirat: {}",
                        io::Error::last_os_error()
                    );
                    let fd = dir_fd(fds.last(), name.to_str().unwrap());
                    fds.push(fd);
                    built.fetch_add(1, Ordering::Relaxed);
                }
                (fds, name)
            })
        };
        let mut chain_lat = Vec::new();
        let mut chain_mkdir = Vec::new();
        while !builder.is_finished() {
            thread::sleep(Duration::from_millis(200));
            let (l, m) = sample(&mut sock);
            chain_lat.push(l);
            chain_mkdir.push(m);
        }
        let (mut fds, name) = builder.join().unwrap();
        let chain_time = t0.elapsed();
        let chain_cpu = inst.cpu_us() - cpu0;
        let chain_hwm = vm_hwm_kib(inst.pid());
        // Removed bottom up through the fds (the paths are far past PATH_MAX).
        while fds.len() > 1 {
            drop(fds.pop());
            rmdirat(fds.last().unwrap(), &name);
        }

        // The storm.
        progress(&format!(
            "hostile: a storm of {storm} mkdirs in one directory"
        ));
        let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cpu0 = inst.cpu_us();
        let t0 = Instant::now();
        let maker = {
            let (made, dir) = (made.clone(), h.join("storm"));
            thread::spawn(move || {
                let fd = dir_fd(None, dir.to_str().unwrap());
                for i in 0..storm {
                    let n = std::ffi::CString::new(format!("s{i}")).unwrap();
                    assert!(
                        mkdirat(&fd, &n),
                        "storm mkdirat: {}",
                        io::Error::last_os_error()
                    );
                    made.fetch_add(1, Ordering::Relaxed);
                }
                Instant::now()
            })
        };
        let mut storm_lat = Vec::new();
        let mut storm_mkdir = Vec::new();
        while !maker.is_finished() {
            thread::sleep(Duration::from_millis(200));
            let (l, m) = sample(&mut sock);
            storm_lat.push(l);
            storm_mkdir.push(m);
        }
        let t_last = maker.join().unwrap();
        let storm_time = t_last - t0;
        // Until the map holds every storm cgroup.
        let want = storm + 1 + 1 + 1 + k + 1; // storm, h, other, user, samples, storm dir
        let mut converged = None;
        while t_last.elapsed() < Duration::from_secs(120) {
            if dump_map().is_some_and(|m| m.len() >= want) {
                converged = Some(t_last.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let storm_cpu = inst.cpu_us() - cpu0;
        let storm_hwm = vm_hwm_kib(inst.pid());
        let log = fs::read_to_string(&inst.log).unwrap_or_default();
        let rescans = log.matches("rescanning").count();
        inst.stop();
        nft(&["flush", "map", "inet", TABLE, MAP]);
        (
            (chain_lat, chain_mkdir, chain_time, chain_cpu, chain_hwm),
            (
                storm_lat,
                storm_mkdir,
                storm_time,
                storm_cpu,
                storm_hwm,
                converged,
                rescans,
            ),
        )
    });
    let (
        (chain_lat, chain_mkdir, chain_time, chain_cpu, chain_hwm),
        (storm_lat, storm_mkdir, storm_time, storm_cpu, storm_hwm, converged, rescans),
    ) = r;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    rep.row(
        &format!("hostile: chain of {depth} nested cgroups (200-byte names) being made: element elsewhere, p50 / max (n = {})", chain_lat.len()),
        format!(
            "{} / {} (its mkdir(2) alone: max {})",
            us(median(&chain_lat)),
            us(max(&chain_lat)),
            us(max(&chain_mkdir))
        ),
        "–".into(),
        "–".into(),
        "≤ 100 ms",
        Some(max(&chain_lat) <= 100_000.0),
    );
    rep.row(
        &format!(
            "hostile: chain of {depth}: daemon CPU during its {:.0} s build; peak RSS (VmHWM)",
            chain_time.as_secs_f64()
        ),
        format!(
            "{:.1} ms; {:.2} MiB",
            chain_cpu as f64 / 1000.0,
            chain_hwm as f64 / 1024.0
        ),
        "–".into(),
        "–".into(),
        "",
        None,
    );
    rep.row(
        &format!("hostile: storm of {storm} mkdirs in one directory: element elsewhere, p50 / max (n = {})", storm_lat.len()),
        format!(
            "{} / {} (its mkdir(2) alone: max {})",
            us(median(&storm_lat)),
            us(max(&storm_lat)),
            us(max(&storm_mkdir))
        ),
        "–".into(),
        "–".into(),
        "≤ 100 ms",
        Some(max(&storm_lat) <= 100_000.0),
    );
    rep.row(
        &format!("hostile: storm of {storm} ({:.1} s): last mkdir → map holds all; daemon CPU per cgroup; peak RSS; rescans", storm_time.as_secs_f64()),
        format!(
            "{}; {:.1} µs; {:.2} MiB; {rescans}",
            converged.map_or("not within 120 s".to_string(), |d| us(d.as_secs_f64() * 1e6)),
            storm_cpu as f64 / storm as f64,
            storm_hwm as f64 / 1024.0
        ),
        "–".into(),
        "–".into(),
        "0 rescans",
        Some(rescans == 0 && converged.is_some()),
    );
    rep.note(format!(
        "hostile: the chain is followed only down to the ruleset's deepest level (16), so its cost is the kernel's: mkdir at depth N takes O(N) in the kernel ({:.0} s for the chain here). Storm: the daemon's events are handled quiet directories first, so an element elsewhere waits for at most a slice of the storm.",
        chain_time.as_secs_f64()
    ));
}

fn connect_loop(addr: &str, secs: f64) {
    let a: std::net::SocketAddr = addr.parse().unwrap();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let (mut ok, mut fail) = (0u64, 0u64);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    while Instant::now() < end {
        match std::net::TcpStream::connect(a) {
            Ok(s) => {
                // RST on close: no TIME_WAIT, ports are reused at once.
                // SAFETY: setsockopt on our own socket with a valid linger.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                }
                ok += 1;
            }
            Err(_) => fail += 1,
        }
    }
    println!("{ok} {fail} {}", start.elapsed().as_secs_f64());
}

fn accept_loop(addr: &str) {
    let l = std::net::TcpListener::bind(addr).expect("bind");
    // SAFETY: raising the backlog of our own listening socket.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    loop {
        let _ = l.accept();
    }
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

fn prerequisites() -> Result<PathBuf, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    for (t, a) in [
        ("nft", "--version"),
        ("ip", "-V"),
        ("unshare", "--version"),
        ("nsenter", "--version"),
        ("bash", "--version"),
        ("inotifywait", "--help"),
        ("iperf3", "--version"),
        ("file", "--version"),
        ("ss", "-V"),
    ] {
        let ok = Command::new(t)
            .arg(a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Err(format!("`{t}` is missing"));
        }
    }
    let m = cgroup2_mount().ok_or("no cgroup2 mount")?;
    if !m.join("cgroup.procs").exists() {
        return Err(format!("{}: not a usable cgroup2 mount", m.display()));
    }
    Ok(m)
}

static CLEANUP_ROOT: OnceLock<PathBuf> = OnceLock::new();

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__connect") => return connect_loop(&args[2], args[3].parse().unwrap()),
        Some("__accept") => return accept_loop(&args[2]),
        _ => {}
    }
    // `cargo bench` passes --bench; under `cargo test --all-targets` (no
    // --bench) this is a no-op rather than ten minutes of root-only work.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("cgtproxy bench suite: run it with `cargo bench --bench suite` (as root)");
        return;
    }
    let mount = match prerequisites() {
        Ok(m) => m,
        Err(why) => {
            eprintln!(
                "cgtproxy bench suite: SKIPPED ({why}); it needs root, nft, ip, unshare, nsenter, bash, inotifywait (inotify-tools), iperf3, file and a cgroup2 mount"
            );
            return;
        }
    };
    HOST_NETNS.set(netns_ino()).unwrap();
    progress("start");

    // Leftovers of an interrupted run — not those of a run going on now:
    // the name carries the runner's pid, and on a shared machine another
    // suite may be running (removing its tree kills its daemons). Trees of
    // the old unmarked form (`cgtproxy-bench-<hex>`) are left alone: they
    // may be another, older suite's, running now.
    let leftover = |name: &str| {
        let pid = name
            .strip_prefix("cgtproxy-suite-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            if leftover(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(&mount) {
        for e in rd.flatten() {
            if leftover(&e.file_name().to_string_lossy()) {
                cg_remove(&e.path());
            }
        }
    }
    let hex = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64)
            ^ ((std::process::id() as u64) << 32)
    );
    let me = std::process::id();
    // Not `cgtproxy-bench-`: older suites remove every such tree at start.
    let root = mount.join(format!("cgtproxy-suite-{me}-{hex}"));
    let tmp = std::env::temp_dir().join(format!("cgtproxy-suite-{me}-{hex}"));
    fs::create_dir_all(root.join("w")).unwrap();
    fs::create_dir_all(root.join("run")).unwrap();
    fs::create_dir_all(&tmp).unwrap();
    if !root.join("cgroup.kill").exists() {
        cg_remove(&root);
        eprintln!("cgtproxy bench suite: SKIPPED (no cgroup.kill: Linux >= 5.14 needed)");
        return;
    }
    CLEANUP_ROOT.set(root.clone()).unwrap();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        if let Some(r) = CLEANUP_ROOT.get() {
            cg_remove(r);
            if let Some(name) = r.file_name() {
                let _ = fs::remove_dir_all(std::env::temp_dir().join(name));
            }
        }
    }));
    let cfg = tmp.join("config.json");
    fs::write(
        &cfg,
        r#"{ "route": false, "rules": [ { "match": "/.*", "target": "direct" } ] }"#,
    )
    .unwrap();
    // BENCH_DAEMON=PATH measures another build (e.g. a candidate fix).
    let static_bin = match std::env::var_os("BENCH_DAEMON") {
        Some(p) => Some(PathBuf::from(p)),
        None => build_static(),
    };
    let b = Bench {
        daemon: static_bin.clone().unwrap_or_else(|| PathBuf::from(BIN)),
        root: root.clone(),
        tmp: tmp.clone(),
        cfg,
        n: if quick() { 1000 } else { 10_000 },
    };

    let mut rep = Report::default();
    let t0 = Instant::now();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |p: &str| only.is_empty() || only.split(',').any(|x| x == p);
    if want("latency") {
        phase_latency(&b, &mut rep);
    }
    if want("burst") {
        phase_burst(&b, &mut rep);
    }
    if want("latency") || want("cold") || want("idle") || want("packets") {
        make_tree(&b.root.join("w"), b.n - 3);
    }
    if want("cold") {
        phase_cold(&b, &mut rep);
    }
    if want("latency") {
        phase_latency_full(&b, &mut rep);
    }
    if want("idle") {
        phase_idle(&b, &mut rep);
    }
    if want("size") {
        phase_size(&mut rep, static_bin.as_deref());
    }
    if want("packets") {
        phase_packets(&b, &mut rep);
    }
    if want("hostile") {
        phase_hostile(&b, &mut rep);
    }
    cg_remove(&root);
    let _ = fs::remove_dir_all(&tmp);
    let total = t0.elapsed();

    // The table.
    let kernel = sh("uname", &["-r"]).trim().to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let ncpu = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = status_field(
        &fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        "MemTotal:",
    ) / 1024;
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        .trim()
        .to_string();
    let nftv = sh("nft", &["--version"]).trim().to_string();
    let iperf = sh("iperf3", &["--version"])
        .split(" (")
        .next()
        .unwrap_or("iperf3")
        .replace("iperf ", "iperf3 ");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ncgtproxy {} benchmark — {date}; Linux {kernel}; {ncpu} × {cpu}, {mem} MiB; {nftv}; {iperf}; daemon binary: {}; suite took {:.0} s{}\n",
        env!("CARGO_PKG_VERSION"),
        if std::env::var_os("BENCH_DAEMON").is_some() {
            format!("{} (BENCH_DAEMON)", b.daemon.display())
        } else if static_bin.is_some() {
            "static musl release build".to_string()
        } else {
            "glibc release build (musl target missing)".to_string()
        },
        total.as_secs_f64(),
        if quick() {
            "; BENCH_QUICK (not meaningful)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| figure | cgtproxy | baseline | ratio | target | met? |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in &rep.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.figure, r.cgt, r.base, r.ratio, r.target, r.met
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Baseline: benches/baseline.sh (inotifywait -m -r + one `nft add/delete element` per event), same workload, same run; ratio = cgtproxy / baseline. Packet rows: the \"baseline\" column is the same traffic without our table (the shell baseline would use the same ruleset, so its packet path is identical); ratio = ratio of medians of interleaved A/B runs. CPU = the runner cgroup's cpu.stat usage_usec (all processes, exited `nft` children included); RSS = VmRSS summed over the instance's processes."
    );
    for n in &rep.notes {
        let _ = writeln!(out, "- {n}");
    }
    if rep.missed.is_empty() {
        let _ = writeln!(out, "\nAll targets met.");
    } else {
        let _ = writeln!(out, "\nMissed targets:");
        for m in &rep.missed {
            let _ = writeln!(out, "- {m}");
        }
    }
    print!("{out}");
}
