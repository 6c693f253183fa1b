//! End-to-end harness for cgtproxy.
//!
//! Every test runs on a fresh thread that has its own network namespace
//! (`unshare(CLONE_NEWNET)`); whatever it spawns (`nft`, `ip`, the daemon,
//! clients) inherits that namespace. Each test gets its own cgroup subtree
//! `<cgroup2 mount>/cgtproxy-test-<random>`, removed on drop (processes left
//! in it are killed through `cgroup.kill`). Nothing here touches the host's
//! ruleset, routes or cgroups outside that subtree, and every address used
//! lives in the test's own namespaces (loopback, 198.18.0.0/15,
//! 2001:db8::/32 on a veth pair).
//!
//! The maps are read back with the real `nft` (not the daemon's code), in a
//! private mount namespace with an empty tmpfs over `/sys/fs/cgroup`, so that
//! `nft` prints numeric cgroup ids. The ruleset keeps two maps, `cgroups`
//! (cgroup id → verdict number) and `verdicts` (number → verdict); a dump
//! composes them into cgroup id → verdict ("goto proxy"), so a number
//! without a verdict shows and fails a comparison. The expected content
//! ("truth") is computed from a walk of the test subtree and the rules,
//! independently of the daemon.
//!
//! Prerequisites: root, `nft`, `ip`, `unshare`, `bash`, `timeout`, a cgroup2
//! mount. Without them a test prints `SKIP` and passes, except with
//! `CI=true`, where it fails. `CGTPROXY_TEST_RULESET` overrides the ruleset
//! file (default: `nft/cgtproxy.nft` of this crate).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cgtproxy");

/// TPROXY port of the shipped ruleset.
pub const PROXY_PORT: u16 = 7893;
/// Firewall mark and route table of the shipped ruleset (and config default).
pub const ROUTE_MARK: u32 = 9011;
pub const ROUTE_TABLE: u32 = 9011;

/// The "remote" server, in a second namespace behind a veth pair.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const REMOTE_PORT: u16 = 9000;
/// The test namespace's end of the veth pair.
pub const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Bound on how long the map may take to converge after a change.
pub const CONVERGE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

/// The cgroup2 mount point, from `/proc/self/mountinfo` (unified or hybrid).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let mount_point = left.split(' ').nth(4)?;
        return Some(PathBuf::from(unescape_mountinfo(mount_point)));
    }
    None
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tool_works(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn prerequisites() -> Result<PathBuf, String> {
    static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not running as root".into());
            }
            for (tool, arg) in [
                ("nft", "--version"),
                ("ip", "-V"),
                ("unshare", "--version"),
                ("bash", "--version"),
                ("timeout", "--version"),
            ] {
                if !tool_works(tool, arg) {
                    return Err(format!("`{tool}` is missing or does not run"));
                }
            }
            let mount = cgroup2_mount().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
            if !mount.join("cgroup.procs").exists() {
                return Err(format!("{} is not a usable cgroup2 mount", mount.display()));
            }
            Ok(mount)
        })
        .clone()
}

/// Checks the prerequisites: `Some(cgroup2 mount)` to go on, `None` to skip
/// (with a printed reason). With `CI=true` a missing prerequisite panics.
pub fn gate(test: &str) -> Option<PathBuf> {
    match prerequisites() {
        Ok(mount) => Some(mount),
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: missing prerequisite (CI=true makes this a failure): {why}");
            }
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Namespaces and the test entry point
// ---------------------------------------------------------------------------

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
    run_ok("ip", &["link", "set", "lo", "up"]);
    // Addresses the tests add are usable at once.
    for conf in ["all", "default"] {
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0");
    }
}

/// Runs `body` on a fresh thread in its own network namespace with its own
/// cgroup subtree; skips (see [`gate`]) when prerequisites are missing.
/// Panics in `body` fail the test after everything was cleaned up.
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

// ---------------------------------------------------------------------------
// Small process helpers
// ---------------------------------------------------------------------------

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

/// Runs a command to completion with a time limit (SIGKILL past it).
pub fn run_cmd(cmd: &mut Command, limit: Duration) -> Finished {
    let what = format!("{cmd:?}");
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

fn collect<R: Read + Send + 'static>(mut r: R) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

/// Escapes `s` as a JSON string literal (with quotes).
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// nftables and routing, as the kernel sees them
// ---------------------------------------------------------------------------

pub fn ruleset_path() -> PathBuf {
    match std::env::var_os("CGTPROXY_TEST_RULESET") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("nft/cgtproxy.nft"),
    }
}

/// Loads the shipped ruleset into the current network namespace.
pub fn load_ruleset() {
    let path = ruleset_path();
    assert!(path.exists(), "ruleset {} does not exist", path.display());
    run_ok("nft", &["-f", path.to_str().unwrap()]);
}

/// Runs an nft script (stdin) in the current network namespace.
pub fn nft_script(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let st = wait_child(&mut child, Duration::from_secs(10)).expect("nft -f - hangs");
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        st.success(),
        "nft -f - failed: {st:?}\n{out}\n{err}\nscript:\n{script}"
    );
}

/// The name of the second map of the shipped ruleset (config `verdict-map`).
pub const VERDICT_MAP: &str = "verdicts";

/// Adds elements with `nft` itself (not the daemon): cgroup2 is mounted at
/// /sys/fs/cgroup in a private mount namespace so nft can resolve paths.
/// `elems`: (cgroup directory, verdict as nft writes it).
///
/// The ruleset maps a cgroup to a number (`cgroups`) and the number to its
/// verdict (`verdicts`): each distinct verdict gets the number it already
/// has in `verdicts`, or the smallest free one from 1000 up (far from the
/// daemon's 1, 2, …). Both maps are written by one `nft` command, one
/// transaction.
pub fn nft_add_elements(mount: &Path, elems: &[(&Path, &str)]) {
    let mut numbers = try_dump_raw("cgtproxy", "cgroups", VERDICT_MAP)
        .map(|r| r.verdicts)
        .unwrap_or_default();
    let mut fresh: Vec<(u32, String)> = Vec::new();
    let mut number_of = |verdict: &str| -> u32 {
        if let Some((n, _)) = numbers.iter().find(|(_, v)| v.as_str() == verdict) {
            return *n;
        }
        let n = (1000u32..)
            .find(|n| !numbers.contains_key(n))
            .expect("a free number");
        numbers.insert(n, verdict.to_string());
        fresh.push((n, verdict.to_string()));
        n
    };
    let items: Vec<String> = elems
        .iter()
        .map(|(dir, verdict)| {
            let rel = dir.strip_prefix(mount).expect("cgroup below the mount");
            format!(
                "{} : {}",
                json_str(rel.to_str().unwrap()),
                number_of(verdict)
            )
        })
        .collect();
    let mut cmd = String::new();
    if !fresh.is_empty() {
        let v: Vec<String> = fresh.iter().map(|(n, v)| format!("{n} : {v}")).collect();
        let _ = write!(
            cmd,
            "add element inet cgtproxy {VERDICT_MAP} {{ {} }}; ",
            v.join(", ")
        );
    }
    let _ = write!(
        cmd,
        "add element inet cgtproxy cgroups {{ {} }}",
        items.join(", ")
    );
    let f = run_cmd(
        Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            "mount -t cgroup2 none /sys/fs/cgroup && exec nft \"$1\"",
            "sh",
            &cmd,
        ]),
        Duration::from_secs(10),
    );
    assert!(f.status.success(), "nft {cmd}: {}", f.describe());
}

/// A map as the kernel has it, composed: cgroup id → verdict ("goto proxy",
/// "drop", …) through its number in `verdicts`; a number without a verdict
/// shows as "number N (no verdict)".
pub type MapDump = BTreeMap<u64, String>;

/// `verdicts` as the kernel has it: number → verdict ("goto proxy", "drop").
pub type VerdictDump = BTreeMap<u32, String>;

/// One element of `cgroups` as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawElem {
    /// The verdict number (the element's data).
    pub number: u32,
    /// Its counter, when the map has counters.
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// Both maps as the kernel has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawDump {
    /// `cgroups`: cgroup id → element.
    pub elems: BTreeMap<u64, RawElem>,
    /// `verdicts`: number → verdict; empty when that map does not exist.
    pub verdicts: VerdictDump,
    /// Whether the table has the verdict map at all.
    pub has_verdict_map: bool,
}

impl RawDump {
    /// cgroup id → number.
    pub fn numbers(&self) -> BTreeMap<u64, u32> {
        self.elems.iter().map(|(id, e)| (*id, e.number)).collect()
    }

    /// cgroup id → verdict, through `verdicts`.
    pub fn compose(&self) -> MapDump {
        self.elems
            .iter()
            .map(|(id, e)| (*id, verdict_of_number(&self.verdicts, e.number)))
            .collect()
    }
}

/// What number `n` stands for in `verdicts`, or "number N (no verdict)".
pub fn verdict_of_number(verdicts: &VerdictDump, n: u32) -> String {
    verdicts
        .get(&n)
        .cloned()
        .unwrap_or_else(|| format!("number {n} (no verdict)"))
}

/// The number `verdicts` gives `verdict` (exactly one), from a dump.
pub fn number_of(verdicts: &VerdictDump, verdict: &str) -> u32 {
    let ns: Vec<u32> = verdicts
        .iter()
        .filter(|(_, v)| v.as_str() == verdict)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(ns.len(), 1, "one number for {verdict:?} in {verdicts:?}");
    ns[0]
}

/// Dumps `inet TABLE` with one `nft -j list table` and returns the maps
/// `map` (cgroup id → number) and `vmap` (number → verdict). `nft` runs in a
/// private mount namespace with an empty tmpfs on /sys/fs/cgroup, so it
/// prints ids. Err when the table or `map` does not exist.
pub fn try_dump_raw(table: &str, map: &str, vmap: &str) -> Result<RawDump, String> {
    let f = run_cmd(
        Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs none /sys/fs/cgroup && exec nft -j list table inet \"$1\"",
            "sh",
            table,
        ]),
        Duration::from_secs(10),
    );
    if !f.status.success() {
        return Err(format!("nft list table inet {table}: {}", f.describe()));
    }
    parse_table_json(&f.stdout, map, vmap)
}

/// Dumps `inet TABLE MAP`, composed with the map `verdicts` of the same
/// table (see [`MapDump`]).
pub fn try_dump_map(table: &str, map: &str) -> Result<MapDump, String> {
    try_dump_raw(table, map, VERDICT_MAP).map(|r| r.compose())
}

/// Dumps the map `inet cgtproxy cgroups`, composed; panics when it cannot.
pub fn dump_map() -> MapDump {
    try_dump_map("cgtproxy", "cgroups").unwrap_or_else(|e| panic!("{e}"))
}

/// Both maps of `inet cgtproxy`, raw; panics when it cannot.
pub fn dump_raw() -> RawDump {
    try_dump_raw("cgtproxy", "cgroups", VERDICT_MAP).unwrap_or_else(|e| panic!("{e}"))
}

/// The map `inet cgtproxy verdicts`: number → verdict; panics when the
/// table cannot be listed.
pub fn dump_verdicts() -> VerdictDump {
    dump_raw().verdicts
}

/// A mark as `nft -j` prints it: a number, or a string in decimal or hex
/// ("0x00000001").
fn json_mark(v: &miniserde::json::Value) -> Option<u32> {
    use miniserde::json::{Number, Value};
    match v {
        Value::Number(Number::U64(n)) => u32::try_from(*n).ok(),
        Value::Number(Number::I64(n)) => u32::try_from(*n).ok(),
        Value::String(s) => match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => s.parse().ok(),
        },
        _ => None,
    }
}

/// Parses `nft -j list table` output: the maps `map` and `vmap`.
pub fn parse_table_json(text: &str, map: &str, vmap: &str) -> Result<RawDump, String> {
    use miniserde::json::{Number, Object, Value};
    let bad = |what: &str| format!("unexpected nft JSON ({what}): {text}");
    let v: Value = miniserde::json::from_str(text).map_err(|_| bad("not JSON"))?;
    let Value::Object(top) = v else {
        return Err(bad("top"));
    };
    let Some(Value::Array(items)) = top.get("nftables") else {
        return Err(bad("no nftables array"));
    };
    let find = |name: &str| -> Option<&Object> {
        items.iter().find_map(|i| match i {
            Value::Object(o) => match o.get("map") {
                Some(Value::Object(m))
                    if matches!(m.get("name"), Some(Value::String(n)) if n == name) =>
                {
                    Some(m)
                }
                _ => None,
            },
            _ => None,
        })
    };
    let elems_of = |m: &Object| -> Result<Vec<(Value, Value)>, String> {
        let Some(elems) = m.get("elem") else {
            return Ok(Vec::new());
        };
        let Value::Array(elems) = elems else {
            return Err(bad("elem"));
        };
        elems
            .iter()
            .map(|e| match e {
                Value::Array(pair) if pair.len() == 2 => Ok((pair[0].clone(), pair[1].clone())),
                _ => Err(bad("element pair")),
            })
            .collect()
    };
    fn num(v: Option<&Value>) -> Option<u64> {
        match v {
            Some(Value::Number(Number::U64(n))) => Some(*n),
            _ => None,
        }
    }
    // A key is the id itself, or {"elem": {"val": id, "counter": {...}}}.
    fn key_of(v: &Value) -> Option<(u64, Option<u64>, Option<u64>)> {
        match v {
            Value::Number(Number::U64(n)) => Some((*n, None, None)),
            Value::String(s) => s.parse().ok().map(|n| (n, None, None)),
            Value::Object(o) => {
                let inner = match o.get("elem") {
                    Some(Value::Object(e)) => e,
                    _ => o,
                };
                let (id, _, _) = key_of(inner.get("val")?)?;
                let (p, b) = match inner.get("counter") {
                    Some(Value::Object(c)) => (num(c.get("packets")), num(c.get("bytes"))),
                    _ => (None, None),
                };
                Some((id, p, b))
            }
            _ => None,
        }
    }
    fn verdict_of(v: &Value) -> Option<String> {
        let Value::Object(o) = v else { return None };
        let (k, inner) = o.iter().next()?;
        match inner {
            Value::Object(t) => match t.get("target") {
                Some(Value::String(c)) => Some(format!("{k} {c}")),
                _ => None,
            },
            _ => Some(k.clone()),
        }
    }
    let cg = find(map).ok_or_else(|| bad(&format!("no map {map}")))?;
    let mut dump = RawDump::default();
    for (k, d) in elems_of(cg)? {
        let (id, packets, bytes) = key_of(&k).ok_or_else(|| bad("element key"))?;
        let number = json_mark(&d).ok_or_else(|| bad("element number"))?;
        dump.elems.insert(
            id,
            RawElem {
                number,
                packets,
                bytes,
            },
        );
    }
    if let Some(vm) = find(vmap) {
        dump.has_verdict_map = true;
        for (k, d) in elems_of(vm)? {
            // A key with a counter would come as {"elem": {"val": N, ...}}.
            let n = match &k {
                Value::Object(o) => match o.get("elem") {
                    Some(Value::Object(e)) => e.get("val").and_then(json_mark),
                    _ => o.get("val").and_then(json_mark),
                },
                other => json_mark(other),
            }
            .ok_or_else(|| bad("verdict key"))?;
            let verdict = verdict_of(&d).ok_or_else(|| bad("verdict"))?;
            dump.verdicts.insert(n, verdict);
        }
    }
    Ok(dump)
}

/// Installs, for both families, what `route` in the config makes the
/// daemon install: `fwmark MARK lookup TABLE`, `local default dev lo table TABLE`.
pub fn add_policy_routing(mark: u32, table: u32) {
    let (mark, table) = (mark.to_string(), table.to_string());
    for fam in ["-4", "-6"] {
        run_ok(
            "ip",
            &[fam, "rule", "add", "fwmark", &mark, "lookup", &table],
        );
        run_ok(
            "ip",
            &[
                fam, "route", "add", "local", "default", "dev", "lo", "table", &table,
            ],
        );
    }
}

/// `ip -4|-6 rule show` in the current network namespace.
pub fn ip_rules(family: &str) -> String {
    run_ok("ip", &[family, "rule", "show"])
}

/// `ip -4|-6 route show table T` in the current network namespace; empty
/// for a table the namespace never had (ip fails on it).
pub fn ip_routes(family: &str, table: u32) -> String {
    let args = [family, "route", "show", "table", &table.to_string()];
    let f = run("ip", &args);
    if !f.status.success() && f.stderr.contains("FIB table does not exist") {
        return String::new();
    }
    assert!(f.status.success(), "ip {args:?} failed: {}", f.describe());
    f.stdout
}

/// Whether the policy rule and local route of `route` are in place, per
/// family (v4, v6).
pub fn policy_routing(mark: u32, table: u32) -> [(bool, bool); 2] {
    let mark_hex = format!("fwmark {mark:#x}");
    let lookup = format!("lookup {table}");
    ["-4", "-6"].map(|fam| {
        let rules = ip_rules(fam);
        let rule = rules
            .lines()
            .any(|l| l.contains(&mark_hex) && l.contains(&lookup));
        let route = ip_routes(fam, table).contains("local default dev lo");
        (rule, route)
    })
}

/// Asserts that the policy rule and the local route of (mark, table) are
/// both present (`present`) or both absent, for IPv4 and IPv6.
pub fn assert_policy_routing(mark: u32, table: u32, present: bool, when: &str) {
    let got = policy_routing(mark, table);
    assert!(
        got == [(present, present); 2],
        "{when}: expected fwmark {mark:#x} lookup {table} and `local default dev lo table {table}` {}, \
         found (rule, route) for (v4, v6) = {got:?}\n\
         ip -4 rule:\n{}ip -6 rule:\n{}ip -4 route table {table}:\n{}ip -6 route table {table}:\n{}",
        if present { "present" } else { "absent" },
        ip_rules("-4"),
        ip_rules("-6"),
        ip_routes("-4", table),
        ip_routes("-6", table),
    );
}

// ---------------------------------------------------------------------------
// Rules, configuration and the truth
// ---------------------------------------------------------------------------

/// Config rules: (match, target). Also computes, independently of the
/// daemon, which verdict a path gets.
#[derive(Clone, Debug)]
pub struct Rules(pub Vec<(String, String)>);

impl Rules {
    pub fn new(rules: &[(&str, &str)]) -> Rules {
        Rules(
            rules
                .iter()
                .map(|(m, t)| (m.to_string(), t.to_string()))
                .collect(),
        )
    }

    /// The embedded default: the slices `cgtproxy-proxy.slice`,
    /// `cgtproxy-drop.slice`, `cgtproxy-direct.slice` (at any depth) are
    /// listed; what is below a slice inherits its verdict in the ruleset, so
    /// a nested slice's own verdict is the nearer one.
    pub fn embedded_default() -> Rules {
        Rules::new(&[
            (".*/cgtproxy-proxy\\.slice", "proxy"),
            (".*/cgtproxy-drop\\.slice", "drop"),
            (".*/cgtproxy-direct\\.slice", "direct"),
        ])
    }

    pub fn json(&self) -> String {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(m, t)| {
                format!(
                    "{{\"match\": {}, \"target\": {}}}",
                    json_str(m),
                    json_str(t)
                )
            })
            .collect();
        format!("[{}]", items.join(", "))
    }

    /// Every verdict (as `nft` prints it) the rules name.
    pub fn targets(&self) -> BTreeSet<String> {
        self.0
            .iter()
            .map(|(_, t)| {
                if t == "drop" {
                    "drop".to_string()
                } else {
                    format!("goto {t}")
                }
            })
            .collect()
    }

    /// Asserts that `verdicts` holds no verdict these rules do not name
    /// (what a full sync leaves), and no verdict twice.
    pub fn assert_verdicts_clean(&self, verdicts: &VerdictDump, when: &str) {
        let targets = self.targets();
        let values: Vec<&String> = verdicts.values().collect();
        let distinct: BTreeSet<&String> = values.iter().copied().collect();
        assert!(
            distinct.len() == values.len() && values.iter().all(|v| targets.contains(*v)),
            "{when}: `verdicts` should hold at most one number for each of {targets:?} and nothing else; it holds {verdicts:?}"
        );
    }

    /// The verdict (as `nft` prints it) for a cgroup path, first match wins,
    /// the match anchored to the whole path.
    pub fn verdict(&self, path: &str) -> Option<String> {
        for (m, t) in &self.0 {
            let re = regex_lite::Regex::new(&format!("^(?:{m})$")).expect("test rule regex");
            if re.is_match(path) {
                return Some(if t == "drop" {
                    "drop".to_string()
                } else {
                    format!("goto {t}")
                });
            }
        }
        None
    }
}

/// `route` in the config.
#[derive(Clone, Debug)]
pub enum RouteCfg {
    /// Key omitted: the daemon's default (mark 9011, table 9011).
    Default,
    Off,
    On {
        mark: u32,
        table: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub rules: Rules,
    pub cgroup_root: Option<PathBuf>,
    pub table: Option<String>,
    pub map: Option<String>,
    /// `verdict-map` (default "verdicts").
    pub verdict_map: Option<String>,
    pub route: RouteCfg,
    pub keep_on_exit: Option<bool>,
}

impl Config {
    pub fn new(rules: &Rules) -> Config {
        Config {
            rules: rules.clone(),
            cgroup_root: None,
            table: None,
            map: None,
            verdict_map: None,
            route: RouteCfg::Default,
            keep_on_exit: None,
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = String::from("{\n");
        if let Some(r) = &self.cgroup_root {
            let _ = writeln!(s, "  \"cgroup-root\": {},", json_str(r.to_str().unwrap()));
        }
        if let Some(t) = &self.table {
            let _ = writeln!(s, "  \"table\": {},", json_str(t));
        }
        if let Some(m) = &self.map {
            let _ = writeln!(s, "  \"map\": {},", json_str(m));
        }
        if let Some(m) = &self.verdict_map {
            let _ = writeln!(s, "  \"verdict-map\": {},", json_str(m));
        }
        match self.route {
            RouteCfg::Default => {}
            RouteCfg::Off => s.push_str("  \"route\": false,\n"),
            RouteCfg::On { mark, table } => {
                let _ = writeln!(s, "  \"route\": {{\"mark\": {mark}, \"table\": {table}}},");
            }
        }
        if let Some(k) = self.keep_on_exit {
            let _ = writeln!(s, "  \"keep-on-exit\": {k},");
        }
        let _ = writeln!(s, "  \"rules\": {}\n}}", self.rules.json());
        s
    }
}

// ---------------------------------------------------------------------------
// The test's cgroup subtree
// ---------------------------------------------------------------------------

pub struct CgroupTree {
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn new(mount: &Path, suffix: &str) -> CgroupTree {
        let root = mount.join(format!("cgtproxy-test-{suffix}"));
        fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        CgroupTree { root }
    }

    /// Directory of the cgroup with path `rel` ("/a/b" or "a/b").
    pub fn path(&self, rel: &str) -> PathBuf {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// `mkdir -p` of each path, with the real `mkdir` (one process, fast).
    pub fn mkdir(&self, rels: &[&str]) {
        let mut cmd = Command::new("mkdir");
        cmd.arg("-p").arg("--");
        for r in rels {
            cmd.arg(self.path(r));
        }
        let f = run_cmd(&mut cmd, Duration::from_secs(10));
        assert!(f.status.success(), "mkdir -p {rels:?}: {}", f.describe());
    }

    /// Removes the cgroup `rel` and everything below it (must hold no
    /// processes).
    pub fn rmdir(&self, rel: &str) {
        let top = self.path(rel);
        let mut dirs = walk_dirs(&top);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            fs::remove_dir(&d).unwrap_or_else(|e| panic!("rmdir {}: {e}", d.display()));
        }
    }

    /// The cgroup id (the directory's inode number).
    pub fn id(&self, rel: &str) -> u64 {
        let p = self.path(rel);
        fs::metadata(&p)
            .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
            .ino()
    }

    /// Every cgroup below the root (not the root itself): (path, id), where
    /// path is "/" plus the path below the root.
    pub fn walk(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for d in walk_dirs(&self.root) {
            if d == self.root {
                continue;
            }
            let rel = d.strip_prefix(&self.root).unwrap();
            let Ok(md) = fs::metadata(&d) else { continue };
            out.push((format!("/{}", rel.to_string_lossy()), md.ino()));
        }
        out
    }

    /// What the map should hold for these rules: id → verdict.
    pub fn truth(&self, rules: &Rules) -> MapDump {
        self.walk()
            .into_iter()
            .filter_map(|(path, id)| rules.verdict(&path).map(|v| (id, v)))
            .collect()
    }

    fn names(&self) -> BTreeMap<u64, String> {
        self.walk().into_iter().map(|(p, id)| (id, p)).collect()
    }

    /// A readable diff between a dump and the truth.
    pub fn diff(&self, expected: &MapDump, actual: &MapDump) -> String {
        let names = self.names();
        let ids: BTreeSet<u64> = expected.keys().chain(actual.keys()).copied().collect();
        let mut s = String::new();
        for id in ids {
            let (e, a) = (expected.get(&id), actual.get(&id));
            if e != a {
                let _ = writeln!(
                    s,
                    "  id {id} {:?}: expected {:?}, map has {:?}",
                    names
                        .get(&id)
                        .map(String::as_str)
                        .unwrap_or("<not in subtree>"),
                    e,
                    a
                );
            }
        }
        s
    }

    /// Kills every process in the subtree and waits until it is empty.
    pub fn kill_all(&self) {
        let kill = self.root.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        } else {
            for d in walk_dirs(&self.root) {
                if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                        // SAFETY: plain kill(2) of a pid read from cgroupfs.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            fs::read_to_string(self.root.join("cgroup.events"))
                .map(|e| e.contains("populated 0"))
                .unwrap_or(true)
        });
    }
}

/// Directories at and below `top` (cgroupfs holds only cgroup dirs).
fn walk_dirs(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        out.push(d);
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        self.kill_all();
        let mut dirs = walk_dirs(&self.root);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let ok = wait_until(Duration::from_secs(3), Duration::from_millis(10), || {
                match fs::remove_dir(&d) {
                    Ok(()) => true,
                    Err(e) => e.kind() == io::ErrorKind::NotFound,
                }
            });
            if !ok {
                eprintln!("cleanup: could not rmdir {}", d.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The test environment
// ---------------------------------------------------------------------------

pub struct Env {
    pub name: String,
    /// The cgroup2 mount.
    pub mount: PathBuf,
    pub cg: CgroupTree,
    /// Scratch directory for config files.
    pub tmp: PathBuf,
    counter: AtomicU64,
}

impl Env {
    fn new(name: &str, mount: &Path) -> Env {
        let suffix = random_hex();
        let tmp = std::env::temp_dir().join(format!("cgtproxy-test-{suffix}"));
        fs::create_dir_all(&tmp).unwrap();
        Env {
            name: name.to_string(),
            mount: mount.to_path_buf(),
            cg: CgroupTree::new(mount, &suffix),
            tmp,
            counter: AtomicU64::new(0),
        }
    }

    /// A fresh, unique token (for message payloads and file names).
    pub fn token(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{what}-{n}", self.name)
    }

    /// Writes `text` to a file `name` in the scratch dir.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.tmp.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    pub fn write_config(&self, cfg: &Config) -> PathBuf {
        let name = format!(
            "config-{}.json",
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        self.write_file(&name, &cfg.to_json())
    }

    /// `run -c CONFIG --cgroup-root ROOT`.
    pub fn run_args(&self, config: &Path) -> Vec<OsString> {
        vec![
            "run".into(),
            "-c".into(),
            config.into(),
            "--cgroup-root".into(),
            self.cg.root.clone().into(),
        ]
    }

    /// Starts the daemon with `cfg` and waits for readiness.
    pub fn start(&self, cfg: &Config) -> Daemon {
        let path = self.write_config(cfg);
        let mut args = self.run_args(&path);
        args.push("-v".into());
        Daemon::start(&args)
    }

    /// Runs the daemon with `cfg` and `--once`; asserts exit 0.
    pub fn once(&self, cfg: &Config) -> Finished {
        let path = self.write_config(cfg);
        let mut args = self.run_args(&path);
        args.push("--once".into());
        let f = run_daemon_to_exit(&args, Duration::from_secs(20));
        assert_eq!(f.code(), Some(0), "cgtproxy {args:?}: {}", f.describe());
        f
    }

    /// Waits until the map equals the truth for `rules`; panics with a diff.
    pub fn wait_map(&self, rules: &Rules) -> MapDump {
        self.wait_map_eq(|| self.cg.truth(rules), "truth")
    }

    /// Waits until the map equals `expected()` (re-evaluated each poll).
    pub fn wait_map_eq(&self, expected: impl Fn() -> MapDump, what: &str) -> MapDump {
        let mut last = (MapDump::new(), MapDump::new());
        let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
            let e = expected();
            let a = dump_map();
            let same = e == a;
            last = (e, a);
            same
        });
        if !ok {
            panic!(
                "map did not converge to the {what} within {CONVERGE:?}; differences:\n{}",
                self.cg.diff(&last.0, &last.1)
            );
        }
        last.1
    }

    /// Asserts right now that the map equals the truth for `rules`.
    pub fn assert_map(&self, rules: &Rules) {
        let (e, a) = (self.cg.truth(rules), dump_map());
        assert!(
            e == a,
            "map differs from the truth:\n{}",
            self.cg.diff(&e, &a)
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

pub struct Daemon {
    child: Option<Child>,
    ready: Option<OwnedFd>,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    pub args: Vec<OsString>,
}

/// The fd number the daemon gets for `--ready-fd`.
const READY_FD: RawFd = 3;

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 returned two fresh fds that we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

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
        Daemon::spawn_env(args, ready, &[])
    }

    /// As `spawn`, with extra environment variables.
    pub fn spawn_env(args: &[OsString], ready: bool, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut ready_r = None;
        if ready {
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
            let child = cmd.spawn().expect("spawn cgtproxy");
            drop(w);
            ready_r = Some(r);
            return Daemon::with_child(child, ready_r, args);
        }
        let child = cmd.spawn().expect("spawn cgtproxy");
        Daemon::with_child(child, ready_r, args)
    }

    fn with_child(mut child: Child, ready: Option<OwnedFd>, args: &[OsString]) -> Daemon {
        let log = Arc::new(Mutex::new(String::new()));
        let pid = child.id();
        let readers = vec![
            log_reader(child.stderr.take().unwrap(), log.clone(), pid),
            log_reader(child.stdout.take().unwrap(), log.clone(), pid),
        ];
        Daemon {
            child: Some(child),
            ready,
            log,
            readers,
            args: args.to_vec(),
        }
    }

    /// Spawns with `--ready-fd` and waits (10 s) for the newline.
    pub fn start(args: &[OsString]) -> Daemon {
        let mut d = Daemon::spawn(args, true);
        if let Err(e) = d.wait_ready(Duration::from_secs(10)) {
            let f = d.kill();
            panic!("cgtproxy {:?}: {e}\n{}", args, f.describe());
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
        let st = wait_child(self.child.as_mut().unwrap(), limit)?;
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
            None => {
                let f = self.kill();
                panic!(
                    "cgtproxy did not exit within 10 s of SIGTERM\n{}",
                    f.describe()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Finished {
        if self.child.is_some() {
            self.signal(libc::SIGKILL);
        }
        self.wait(Duration::from_secs(10))
            .unwrap_or_else(|| Finished {
                status: ExitStatus::from_raw(0),
                stdout: String::new(),
                stderr: self.log(),
            })
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
        None => {
            let f = d.kill();
            panic!(
                "cgtproxy {args:?} did not exit within {limit:?}\n{}",
                f.describe()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Servers: the TPROXY listener and the remote server
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One line a server received.
#[derive(Clone, Debug)]
pub struct Event {
    pub proto: Proto,
    /// For the TPROXY listener: the original destination.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub data: String,
}

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: passing a pointer to a local int with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r, what).map(|_| ())
}

pub fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Reads a sockaddr_in/in6 from `p` (at most `len` bytes, any alignment).
fn from_sockaddr(p: *const u8, len: usize) -> Option<SocketAddr> {
    // SAFETY: zeroed storage, then copy at most its size from p.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = len.min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the caller guarantees p points to len readable bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, (&mut ss as *mut libc::sockaddr_storage).cast(), n) };
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: family says sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// A socket bound to `addr`; `transparent` sets IP(V6)_TRANSPARENT, and for
/// UDP the original-destination cmsg is enabled.
pub fn bound_socket(addr: SocketAddr, proto: Proto, transparent: bool) -> io::Result<OwnedFd> {
    let (family, v6) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, false),
        SocketAddr::V6(_) => (libc::AF_INET6, true),
    };
    let ty = match proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(
        unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    if v6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY")?;
    }
    if transparent {
        if v6 {
            setsockopt_int(
                raw,
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                1,
                "IPV6_TRANSPARENT",
            )?;
        } else {
            setsockopt_int(raw, libc::SOL_IP, libc::IP_TRANSPARENT, 1, "IP_TRANSPARENT")?;
        }
    }
    if proto == Proto::Udp {
        if v6 {
            setsockopt_int(
                raw,
                libc::SOL_IPV6,
                libc::IPV6_RECVORIGDSTADDR,
                1,
                "IPV6_RECVORIGDSTADDR",
            )?;
        } else {
            setsockopt_int(
                raw,
                libc::SOL_IP,
                libc::IP_RECVORIGDSTADDR,
                1,
                "IP_RECVORIGDSTADDR",
            )?;
        }
    }
    let (ss, len) = to_sockaddr(&addr);
    // SAFETY: ss/len describe a valid sockaddr.
    cvt(
        unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) },
        &format!("bind {addr}"),
    )?;
    if proto == Proto::Tcp {
        // SAFETY: listen on our socket.
        cvt(unsafe { libc::listen(raw, 64) }, "listen")?;
    }
    Ok(fd)
}

/// recvmsg with the original destination (IP(V6)_ORIGDSTADDR) when present.
fn recv_origdst(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // SAFETY: all-zero is valid for these plain C structs.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 64];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut peer as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points to live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = from_sockaddr(
        (&peer as *const libc::sockaddr_storage).cast(),
        msg.msg_namelen as usize,
    )
    .ok_or_else(|| io::Error::other("recvmsg: no peer address"))?;
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if (h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_ORIGDSTADDR)
                || (h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_ORIGDSTADDR)
            {
                let data_len = h.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                orig = from_sockaddr(libc::CMSG_DATA(c), data_len);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, peer, orig))
}

/// A line server on TCP and UDP: every line received is recorded and
/// answered with `TAG:LINE\n`. As the TPROXY listener (`transparent`) it
/// records the original destination and answers UDP from it.
pub struct Server {
    pub tag: String,
    pub addrs: Vec<SocketAddr>,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    main: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds TCP and UDP on each address (in the calling thread's netns).
    pub fn start(tag: &str, addrs: &[SocketAddr], transparent: bool) -> Server {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for a in addrs {
            let t = bound_socket(*a, Proto::Tcp, transparent)
                .unwrap_or_else(|e| panic!("{tag}: tcp {a}: {e}"));
            let u = bound_socket(*a, Proto::Udp, transparent)
                .unwrap_or_else(|e| panic!("{tag}: udp {a}: {e}"));
            tcp.push(TcpListener::from(t));
            udp.push(UdpSocket::from(u));
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let main = {
            let (events, stop, threads, tag) = (
                events.clone(),
                stop.clone(),
                threads.clone(),
                tag.to_string(),
            );
            thread::Builder::new()
                .name(format!("{tag}-server"))
                .spawn(move || serve(&tag, tcp, udp, transparent, &events, &stop, &threads))
                .unwrap()
        };
        Server {
            tag: tag.to_string(),
            addrs: addrs.to_vec(),
            events,
            stop,
            threads,
            main: Some(main),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The events whose line is `data`.
    pub fn got(&self, data: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.data == data)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.main.take() {
            let _ = m.join();
        }
        let ts: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in ts {
            let _ = t.join();
        }
    }
}

fn serve(
    tag: &str,
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    transparent: bool,
    events: &Arc<Mutex<Vec<Event>>>,
    stop: &Arc<AtomicBool>,
    threads: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut pfds: Vec<libc::pollfd> = tcp
        .iter()
        .map(|l| l.as_raw_fd())
        .chain(udp.iter().map(|u| u.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: pfds is a live array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (i, p) in pfds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            if i < tcp.len() {
                if let Ok((stream, peer)) = tcp[i].accept() {
                    let (events, stop, tag) = (events.clone(), stop.clone(), tag.to_string());
                    let h = thread::spawn(move || serve_tcp(&tag, stream, peer, &events, &stop));
                    threads.lock().unwrap().push(h);
                }
            } else {
                let sock = &udp[i - tcp.len()];
                let Ok((n, peer, orig)) = recv_origdst(sock.as_raw_fd(), &mut buf) else {
                    continue;
                };
                let local = orig.unwrap_or_else(|| sock.local_addr().unwrap());
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply_to = |line: &str| -> io::Result<()> {
                    let reply = format!("{tag}:{line}\n");
                    if transparent {
                        // Answer from the original destination, as a real
                        // TPROXY proxy does.
                        let s = UdpSocket::from(bound_socket(local, Proto::Udp, true)?);
                        s.send_to(reply.as_bytes(), peer)?;
                    } else {
                        sock.send_to(reply.as_bytes(), peer)?;
                    }
                    Ok(())
                };
                for line in text.lines() {
                    events.lock().unwrap().push(Event {
                        proto: Proto::Udp,
                        local,
                        peer,
                        data: line.to_string(),
                    });
                    if let Err(e) = reply_to(line) {
                        eprintln!("{tag}: udp reply to {peer} from {local}: {e}");
                    }
                }
            }
        }
    }
}

fn serve_tcp(
    tag: &str,
    mut stream: TcpStream,
    peer: SocketAddr,
    events: &Arc<Mutex<Vec<Event>>>,
    stop: &Arc<AtomicBool>,
) {
    let local = stream.local_addr().unwrap();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            events.lock().unwrap().push(Event {
                proto: Proto::Tcp,
                local,
                peer,
                data: line.clone(),
            });
            if stream
                .write_all(format!("{tag}:{line}\n").as_bytes())
                .is_err()
            {
                return;
            }
        }
    }
}

/// The TPROXY listener of the ruleset: TCP and UDP on 127.0.0.1 and ::1,
/// port 7893, transparent. Call from the test thread.
pub fn start_proxy() -> Server {
    Server::start(
        "proxy",
        &[
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PROXY_PORT),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PROXY_PORT),
        ],
        true,
    )
}

/// A second network namespace joined to the test's by a veth pair, holding
/// a real server on 198.18.1.2 and 2001:db8:1::2, port 9000, TCP and UDP.
pub struct Remote {
    pub server: Server,
    pub ns: NsThread,
}

impl Remote {
    /// Call from the test thread (its namespace gets the other veth end).
    pub fn start() -> Remote {
        let ns = NsThread::new("remote-ns");
        run_ok(
            "ip",
            &[
                "link", "add", "cgtv0", "type", "veth", "peer", "name", "cgtv1",
            ],
        );
        run_ok(
            "ip",
            &["link", "set", "cgtv1", "netns", &ns.tid.to_string()],
        );
        ns.run(|| {
            run_ok("ip", &["addr", "add", "198.18.0.2/24", "dev", "cgtv1"]);
            run_ok(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    "2001:db8::2/64",
                    "dev",
                    "cgtv1",
                    "nodad",
                ],
            );
            run_ok("ip", &["addr", "add", "198.18.1.2/32", "dev", "lo"]);
            run_ok(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    "2001:db8:1::2/128",
                    "dev",
                    "lo",
                    "nodad",
                ],
            );
            run_ok("ip", &["link", "set", "cgtv1", "up"]);
        });
        run_ok("ip", &["addr", "add", "198.18.0.1/24", "dev", "cgtv0"]);
        run_ok(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                "2001:db8::1/64",
                "dev",
                "cgtv0",
                "nodad",
            ],
        );
        run_ok("ip", &["link", "set", "cgtv0", "up"]);
        run_ok(
            "ip",
            &["route", "add", "198.18.1.0/24", "via", "198.18.0.2"],
        );
        run_ok(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "2001:db8:1::/64",
                "via",
                "2001:db8::2",
            ],
        );
        let server = ns.run(|| {
            Server::start(
                "remote",
                &[
                    SocketAddr::new(REMOTE_V4.into(), REMOTE_PORT),
                    SocketAddr::new(REMOTE_V6.into(), REMOTE_PORT),
                ],
                false,
            )
        });
        Remote { server, ns }
    }

    pub fn v4() -> SocketAddr {
        SocketAddr::new(REMOTE_V4.into(), REMOTE_PORT)
    }

    pub fn v6() -> SocketAddr {
        SocketAddr::new(REMOTE_V6.into(), REMOTE_PORT)
    }
}

/// The socket mark that routes to the "marked" server.
pub const SOCKET_MARK: u32 = 0x77;
pub const SOCKET_MARK_TABLE: &str = "77";

/// A server reachable only by the socket mark: 198.18.9.2 and
/// 2001:db8:9::2 (port 9000, TCP and UDP) in the remote namespace. In the
/// test namespace the main table black-holes them, and
/// `fwmark 0x77 lookup 77` routes them over the veth pair. Neither range is
/// in the ruleset's bypass sets, so traffic to them goes through the lookup.
pub fn marked_server(remote: &Remote) -> (Server, [SocketAddr; 2]) {
    let v4: SocketAddr = "198.18.9.2:9000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8:9::2]:9000".parse().unwrap();
    let server = remote.ns.run(move || {
        run_ok("ip", &["addr", "add", "198.18.9.2/32", "dev", "lo"]);
        run_ok(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                "2001:db8:9::2/128",
                "dev",
                "lo",
                "nodad",
            ],
        );
        Server::start("marked", &[v4, v6], false)
    });
    // Replies come back from an address the main table black-holes: no
    // reverse-path filter (IPv4 inherits the host's setting).
    for conf in ["all", "default", "cgtv0"] {
        let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter"), "0");
    }
    let mark = format!("{SOCKET_MARK:#x}");
    for (fam, net, via) in [
        ("-4", "198.18.9.0/24", "198.18.0.2"),
        ("-6", "2001:db8:9::/48", "2001:db8::2"),
    ] {
        run_ok("ip", &[fam, "route", "add", "blackhole", net]);
        run_ok(
            "ip",
            &[
                fam,
                "route",
                "add",
                net,
                "via",
                via,
                "table",
                SOCKET_MARK_TABLE,
            ],
        );
        run_ok(
            "ip",
            &[
                fam,
                "rule",
                "add",
                "fwmark",
                &mark,
                "lookup",
                SOCKET_MARK_TABLE,
            ],
        );
    }
    (server, [v4, v6])
}

/// The packets counted by the first `counter` of a chain of the table.
pub fn chain_counter(chain: &str) -> u64 {
    let out = run_ok("nft", &["list", "chain", "inet", "cgtproxy", chain]);
    out.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter in chain {chain}:\n{out}"))
}

// ---------------------------------------------------------------------------
// Clients, in a cgroup
// ---------------------------------------------------------------------------

/// bash: join the cgroup, open /dev/PROTO/HOST/PORT as fd 3.
const CLIENT_PRELUDE: &str = r#"
echo $$ > "$CG/cgroup.procs" || exit 10
exec 3<>"/dev/$PROTO/$HOST/$PORT" || exit 11
"#;

fn client_cmd(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    limit: Duration,
    body: &str,
) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("-s")
        .arg("KILL")
        .arg(format!("{:.3}", limit.as_secs_f64()))
        .arg("bash")
        .arg("-c")
        .arg(format!("{CLIENT_PRELUDE}{body}"))
        .env("CG", cgroup)
        .env("PROTO", proto.name())
        .env("HOST", dst.ip().to_string())
        .env("PORT", dst.port().to_string());
    cmd
}

/// From a new process in `cgroup`: connect to `dst`, send `msg` as a line,
/// read one line back (3 s). Ok(reply) or Err(why).
pub fn exchange(cgroup: &Path, proto: Proto, dst: SocketAddr, msg: &str) -> Result<String, String> {
    exchange_within(cgroup, proto, dst, msg, Duration::from_secs(6))
}

/// Reads one answer from fd 3. bash's `read` takes one byte per read(2),
/// which truncates a UDP datagram to its first byte, so use `head`.
const READ_REPLY: &str = r#"R=$(timeout 3 head -n 1 <&3) || exit 13
[ -n "$R" ] || exit 13
printf '%s\n' "$R"
"#;

/// As [`exchange`], with the whole client bounded by `limit` (use a short
/// one where failure is expected: a dropped TCP SYN makes `connect` retry).
pub fn exchange_within(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    msg: &str,
    limit: Duration,
) -> Result<String, String> {
    let body = format!("printf '%s\\n' \"$MSG\" >&3 || exit 12\n{READ_REPLY}");
    let mut cmd = client_cmd(cgroup, proto, dst, limit, &body);
    cmd.env("MSG", msg);
    let f = run_cmd(&mut cmd, limit + Duration::from_secs(5));
    if f.status.success() {
        Ok(f.stdout.trim_end_matches('\n').to_string())
    } else {
        let stage = match f.code() {
            Some(10) => "joining the cgroup",
            Some(11) => "connect",
            Some(12) => "send",
            Some(13) => "no reply within 3 s",
            _ => "killed (time limit) or failed",
        };
        Err(format!("{stage}: exit {:?}: {}", f.code(), f.stderr.trim()))
    }
}

/// How a forked client knows its answer is complete (TCP; over UDP one
/// datagram is the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Up to the first newline (the line servers of this harness).
    Line,
    /// A 2-byte big-endian length, then that many bytes (DNS over TCP);
    /// the answer handed back is without the prefix.
    LengthPrefixed,
}

/// A client in a forked child: it joins `cgroup` before it opens its socket
/// (so the socket is the cgroup's), optionally sets SO_MARK (needs
/// CAP_NET_ADMIN), connects to `dst` (UDP too: the kernel then takes only
/// answers from that address), sends `out`, and reads one answer (3 s).
/// Between fork and `_exit` it makes only raw system calls on memory
/// prepared by the parent.
pub struct ForkedClient<'a> {
    pub cgroup: &'a Path,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub mark: Option<u32>,
    /// The bytes sent, as they go on the wire.
    pub out: &'a [u8],
    pub framing: Framing,
    /// UDP: send `out` again on the same socket (one conntrack flow, as
    /// resolvers do for A and AAAA); the second answer counts.
    pub udp_twice: bool,
    /// The whole child, past which it is killed.
    pub limit: Duration,
}

/// The stage at which a forked client failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStage {
    Cgroup,
    Socket,
    Mark,
    Connect,
    Send,
    /// No answer (timed out, refused, or an empty one).
    Recv,
    /// Still running at the time limit, killed.
    TimeLimit,
    /// Any other exit (a signal).
    Other,
}

/// Why a forked client failed: the stage and the child's exit code (-1:
/// killed by a signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFailure {
    pub stage: ClientStage,
    pub code: i32,
}

/// What the child needs, prepared before the fork (it must not allocate).
struct ChildPlan<'a> {
    procs: std::ffi::CString,
    family: libc::c_int,
    ty: libc::c_int,
    dst: (libc::sockaddr_storage, libc::socklen_t),
    mark: Option<u32>,
    out: &'a [u8],
    tcp: bool,
    framing: Framing,
    udp_twice: bool,
    pipe: RawFd,
}

/// Exit codes of the forked client, by stage.
const C_CGROUP: i32 = 10;
const C_SOCKET: i32 = 11;
const C_MARK: i32 = 12;
const C_CONNECT: i32 = 13;
const C_SEND: i32 = 14;
const C_RECV: i32 = 15;

/// The child: join the cgroup, socket, SO_MARK, connect, send, read one
/// answer into the pipe. Only raw system calls on memory prepared by the
/// parent.
fn client_child(p: &ChildPlan<'_>) -> i32 {
    // SAFETY: plain system calls on buffers that live in this frame or in
    // `p`; no allocation, no locks (this runs between fork and _exit).
    unsafe {
        let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return C_CGROUP;
        }
        libc::close(fd);
        let s = libc::socket(p.family, p.ty | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return C_SOCKET;
        }
        if let Some(mark) = p.mark {
            let v = mark as libc::c_int;
            if libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return C_MARK;
            }
        }
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        if libc::connect(
            s,
            (&p.dst.0 as *const libc::sockaddr_storage).cast(),
            p.dst.1,
        ) != 0
        {
            return C_CONNECT;
        }
        if libc::send(s, p.out.as_ptr().cast(), p.out.len(), 0) != p.out.len() as isize {
            return C_SEND;
        }
        let mut buf = [0u8; 4096];
        let mut got = 0usize;
        while got < buf.len() {
            let n = libc::recv(s, buf.as_mut_ptr().add(got).cast(), buf.len() - got, 0);
            if n <= 0 {
                break;
            }
            got += n as usize;
            if !p.tcp {
                break;
            }
            let done = match p.framing {
                Framing::Line => buf[..got].contains(&b'\n'),
                Framing::LengthPrefixed => {
                    got >= 2 && got >= 2 + u16::from_be_bytes([buf[0], buf[1]]) as usize
                }
            };
            if done {
                break;
            }
        }
        let start = if p.tcp && p.framing == Framing::LengthPrefixed {
            2
        } else {
            0
        };
        if got <= start {
            return C_RECV;
        }
        if !p.tcp && p.udp_twice {
            if libc::send(s, p.out.as_ptr().cast(), p.out.len(), 0) != p.out.len() as isize {
                return C_SEND;
            }
            let n = libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                return C_RECV;
            }
            got = n as usize;
        }
        libc::write(p.pipe, buf.as_ptr().add(start).cast(), got - start);
        0
    }
}

impl ForkedClient<'_> {
    /// Forks the client and waits for it (killed past `limit`). Ok(the
    /// answer's bytes) or the stage at which it failed.
    pub fn run(&self) -> Result<Vec<u8>, ClientFailure> {
        use std::os::unix::ffi::OsStrExt;
        let (r, w) = pipe();
        let tcp = self.proto == Proto::Tcp;
        let plan = ChildPlan {
            procs: std::ffi::CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())
                .unwrap(),
            family: if self.dst.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            },
            ty: if tcp {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_DGRAM
            },
            dst: to_sockaddr(&self.dst),
            mark: self.mark,
            out: self.out,
            tcp,
            framing: self.framing,
            udp_twice: self.udp_twice,
            pipe: w.as_raw_fd(),
        };
        // SAFETY: the child runs only `client_child` (raw system calls on
        // memory prepared above) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = client_child(&plan);
            // SAFETY: leaving the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        drop(w);
        let deadline = Instant::now() + self.limit;
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc == pid {
                break;
            }
            if Instant::now() >= deadline {
                // SAFETY: kill and reap our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return Err(ClientFailure {
                    stage: ClientStage::TimeLimit,
                    code: -1,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        let mut answer = Vec::new();
        fs::File::from(r).read_to_end(&mut answer).unwrap();
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        let stage = match code {
            0 => return Ok(answer),
            C_CGROUP => ClientStage::Cgroup,
            C_SOCKET => ClientStage::Socket,
            C_MARK => ClientStage::Mark,
            C_CONNECT => ClientStage::Connect,
            C_SEND => ClientStage::Send,
            C_RECV => ClientStage::Recv,
            _ => ClientStage::Other,
        };
        Err(ClientFailure { stage, code })
    }
}

/// As [`exchange_within`], from a [`ForkedClient`] whose socket carries
/// the firewall mark `mark` (SO_MARK) when given: send `msg` as a line,
/// read one line back (3 s). Ok(reply) or Err(why).
pub fn exchange_marked(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    msg: &str,
    mark: Option<u32>,
    limit: Duration,
) -> Result<String, String> {
    let line = format!("{msg}\n").into_bytes();
    let client = ForkedClient {
        cgroup,
        proto,
        dst,
        mark,
        out: &line,
        framing: Framing::Line,
        udp_twice: false,
        limit,
    };
    let ClientFailure { stage, code } = match client.run() {
        Ok(answer) => {
            let text = String::from_utf8_lossy(&answer);
            return Ok(text.split('\n').next().unwrap_or_default().to_string());
        }
        Err(f) => f,
    };
    let stage = match stage {
        ClientStage::TimeLimit => return Err(format!("killed (time limit {limit:?})")),
        ClientStage::Cgroup => "joining the cgroup",
        ClientStage::Socket => "socket",
        ClientStage::Mark => "setsockopt SO_MARK",
        ClientStage::Connect => "connect",
        ClientStage::Send => "send",
        ClientStage::Recv => "no reply within 3 s",
        ClientStage::Other => "killed or failed",
    };
    Err(format!("{stage} (exit {code})"))
}

/// A long-lived client connection from a process in a cgroup: each `send`
/// writes a line on the same socket and reads one line back.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: JoinHandle<String>,
}

impl Session {
    pub fn open(cgroup: &Path, proto: Proto, dst: SocketAddr) -> Session {
        let body = format!(
            "echo open\nwhile IFS= read -r L; do\nprintf '%s\\n' \"$L\" >&3 || exit 12\n{READ_REPLY}done\n"
        );
        let mut child = client_cmd(cgroup, proto, dst, Duration::from_secs(60), &body)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let stdout = child.stdout.take().unwrap();
        let stderr = collect(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = io::BufReader::new(stdout);
            let mut line = String::new();
            while io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
                if tx.send(line.trim_end_matches('\n').to_string()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let stdin = child.stdin.take();
        let mut s = Session {
            child,
            stdin,
            lines: rx,
            stderr,
        };
        match s.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(l) if l == "open" => s,
            other => {
                let why = s.finish();
                panic!("client session to {dst} ({proto:?}) did not open: {other:?}; {why}");
            }
        }
    }

    /// Sends `msg` and waits (5 s) for the answer line.
    pub fn send(&mut self, msg: &str) -> Result<String, String> {
        let w = self.stdin.as_mut().unwrap();
        if let Err(e) = w
            .write_all(format!("{msg}\n").as_bytes())
            .and_then(|_| w.flush())
        {
            return Err(format!("client gone: {e}; {}", self.finish()));
        }
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => Ok(l),
            Err(_) => Err(format!("no answer; {}", self.finish())),
        }
    }

    fn finish(&mut self) -> String {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let st = self.child.wait();
        let err = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
        format!(
            "client exit {:?}, stderr: {}",
            st.ok().and_then(|s| s.code()),
            err.join().unwrap_or_default().trim()
        )
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
