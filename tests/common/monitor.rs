//! nf_tables events: our own `nft monitor`. A NFNLGRP_NFTABLES listener
//! records each committed transaction: its element events, closed by NEWGEN
//! with the committer's pid.

use super::nft::{MapDump, VERDICT_MAP, VerdictDump, verdict_of_number};
use super::process::wait_until;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFT_MSG_NEWTABLE: u8 = 0;
pub const NFT_MSG_NEWSETELEM: u8 = 12;
pub const NFT_MSG_DELSETELEM: u8 = 14;
pub const NFT_MSG_NEWGEN: u8 = 15;
pub const NFT_MSG_DESTROYSETELEM: u8 = 30;
const NFNLGRP_NFTABLES: libc::c_int = 7;

/// The data of an element event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElemData {
    /// NFTA_DATA_VERDICT, as `nft` prints it: "goto proxy", "drop", … (the
    /// `verdicts` map).
    Verdict(String),
    /// NFTA_DATA_VALUE of 4 bytes, host order: a verdict number (the
    /// `cgroups` map).
    Number(u32),
}

/// One element event.
#[derive(Clone, Debug)]
pub struct ElemEvent {
    /// The message: NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM or
    /// NFT_MSG_DESTROYSETELEM.
    pub kind: u8,
    /// A delete (either kind).
    pub del: bool,
    pub table: String,
    pub set: String,
    /// The key: a cgroup id (8 bytes, `cgroups`) or a verdict number (4
    /// bytes, `verdicts`), host order.
    pub key: u64,
    pub data: Option<ElemData>,
}

impl ElemEvent {
    pub fn in_cgroups(&self) -> bool {
        self.table == "cgtproxy" && self.set == "cgroups"
    }
    pub fn in_verdicts(&self) -> bool {
        self.table == "cgtproxy" && self.set == VERDICT_MAP
    }
}

/// One committed transaction, as the kernel announced it.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    /// When its NEWGEN was received.
    pub at: Option<Instant>,
    pub generation: u32,
    pub pid: u32,
    /// The committer's comm.
    pub name: String,
    pub elems: Vec<ElemEvent>,
    /// Other messages: (kind, first name attribute).
    pub others: Vec<(u8, String)>,
}

impl Txn {
    pub fn at(&self) -> Instant {
        self.at.unwrap()
    }
    /// Cgroup ids deleted from `cgroups`.
    pub fn dels(&self) -> BTreeSet<u64> {
        self.elems
            .iter()
            .filter(|e| e.del && e.in_cgroups())
            .map(|e| e.key)
            .collect()
    }
    /// `cgroups` elements added: cgroup id → number.
    pub fn numbers(&self) -> BTreeMap<u64, u32> {
        self.elems
            .iter()
            .filter(|e| !e.del && e.in_cgroups())
            .map(|e| {
                let n = match &e.data {
                    Some(ElemData::Number(n)) => *n,
                    other => panic!("a cgroups element without a number: {other:?}"),
                };
                (e.key, n)
            })
            .collect()
    }
    /// `verdicts` elements added: number → verdict.
    pub fn verdict_adds(&self) -> VerdictDump {
        self.elems
            .iter()
            .filter(|e| !e.del && e.in_verdicts())
            .map(|e| {
                let v = match &e.data {
                    Some(ElemData::Verdict(v)) => v.clone(),
                    other => format!("not a verdict: {other:?}"),
                };
                (e.key as u32, v)
            })
            .collect()
    }
    /// Numbers deleted from `verdicts`.
    pub fn verdict_dels(&self) -> BTreeSet<u32> {
        self.elems
            .iter()
            .filter(|e| e.del && e.in_verdicts())
            .map(|e| e.key as u32)
            .collect()
    }
    /// `cgroups` elements added, composed: cgroup id → verdict, through this
    /// transaction's own `verdicts` additions, else `known` (a dump of
    /// `verdicts` taken since: a number in use is never re-pointed).
    pub fn adds(&self, known: &VerdictDump) -> MapDump {
        let mut verdicts = known.clone();
        verdicts.extend(self.verdict_adds());
        self.numbers()
            .into_iter()
            .map(|(id, n)| (id, verdict_of_number(&verdicts, n)))
            .collect()
    }
    /// Whether every element event is in one of the daemon's two maps.
    pub fn touches_our_map(&self) -> bool {
        self.elems.iter().all(|e| e.in_cgroups() || e.in_verdicts())
    }
}

/// A NFNLGRP_NFTABLES listener in the calling thread's network namespace,
/// read by a thread of its own, recording every transaction.
pub struct Monitor {
    txns: Arc<Mutex<Vec<Txn>>>,
    lost: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: &T, what: &str) {
    // SAFETY: a pointer to a live value with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{what}: {}", io::Error::last_os_error());
}

impl Monitor {
    pub fn start() -> Monitor {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        assert!(fd >= 0, "netlink socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: binding our socket to a valid sockaddr_nl.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "bind netlink: {}", io::Error::last_os_error());
        let raw = fd.as_raw_fd();
        setsockopt(
            raw,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            &NFNLGRP_NFTABLES,
            "NETLINK_ADD_MEMBERSHIP 7",
        );
        let size: libc::c_int = 64 << 20;
        setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size,
            "SO_RCVBUFFORCE",
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO");
        let txns = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (txns, lost, stop) = (txns.clone(), lost.clone(), stop.clone());
            thread::Builder::new()
                .name("nft-monitor".into())
                .spawn(move || monitor_loop(fd, &txns, &lost, &stop))
                .unwrap()
        };
        Monitor {
            txns,
            lost,
            stop,
            handle: Some(handle),
        }
    }

    pub fn txns(&self) -> Vec<Txn> {
        self.txns.lock().unwrap().clone()
    }

    pub fn by_pid(&self, pid: i32) -> Vec<Txn> {
        self.txns()
            .into_iter()
            .filter(|t| t.pid == pid as u32)
            .collect()
    }

    /// Asserts that no event was lost (ENOBUFS) so far.
    pub fn assert_complete(&self) {
        assert_eq!(
            self.lost.load(Ordering::Relaxed),
            0,
            "the test's event listener lost events (ENOBUFS)"
        );
    }

    /// Waits until `f` holds for the transactions recorded so far.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&[Txn]) -> bool) -> bool {
        wait_until(limit, Duration::from_millis(10), || f(&self.txns()))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn monitor_loop(fd: OwnedFd, txns: &Mutex<Vec<Txn>>, lost: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 20];
    let mut cur = Txn::default();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: reading into our own buffer from our own socket.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                _ => return,
            }
        }
        let now = Instant::now();
        let mut b = &buf[..n as usize];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
            if len < 16 || len > b.len() {
                break;
            }
            let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
            if ty >> 8 == NFNL_SUBSYS_NFTABLES && len >= 20 {
                on_message((ty & 0xff) as u8, &b[20..len], &mut cur, now, txns);
            }
            b = &b[align4(len).min(b.len())..];
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Attributes of one level: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let l = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let t = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if l < 4 || l > b.len() {
            break;
        }
        out.push((t, &b[4..l]));
        b = &b[align4(l).min(b.len())..];
    }
    out
}

fn attr<'a>(list: &[(u16, &'a [u8])], t: u16) -> Option<&'a [u8]> {
    list.iter().find(|(k, _)| *k == t).map(|(_, v)| *v)
}

fn attr_str(list: &[(u16, &[u8])], t: u16) -> String {
    let v = attr(list, t).unwrap_or_default();
    let v = v.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(v).into_owned()
}

fn attr_be32(list: &[(u16, &[u8])], t: u16) -> u32 {
    attr(list, t)
        .and_then(|v| v.get(..4))
        .map(|v| u32::from_be_bytes(v.try_into().unwrap()))
        .unwrap_or(0)
}

fn on_message(kind: u8, body: &[u8], cur: &mut Txn, now: Instant, txns: &Mutex<Vec<Txn>>) {
    let top = attrs(body);
    match kind {
        NFT_MSG_NEWGEN => {
            // NFTA_GEN_ID 1, NFTA_GEN_PROC_PID 2, NFTA_GEN_PROC_NAME 3.
            cur.generation = attr_be32(&top, 1);
            cur.pid = attr_be32(&top, 2);
            cur.name = attr_str(&top, 3);
            cur.at = Some(now);
            txns.lock().unwrap().push(std::mem::take(cur));
        }
        NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM | NFT_MSG_DESTROYSETELEM => {
            // NFTA_SET_ELEM_LIST_TABLE 1, _SET 2, _ELEMENTS 3 > NFTA_LIST_ELEM 1.
            let table = attr_str(&top, 1);
            let set = attr_str(&top, 2);
            let elems = attr(&top, 3).map(attrs).unwrap_or_default();
            for (_, e) in elems {
                let e = attrs(e);
                // NFTA_SET_ELEM_KEY 1 > NFTA_DATA_VALUE 1: a cgroup id (8
                // bytes) or a verdict number (4 bytes), host order.
                let key = attr(&e, 1).map(attrs).unwrap_or_default();
                let Some(key) = attr(&key, 1).and_then(|v| match v.len() {
                    8 => Some(u64::from_ne_bytes(v.try_into().unwrap())),
                    4 => Some(u64::from(u32::from_ne_bytes(v.try_into().unwrap()))),
                    _ => None,
                }) else {
                    continue;
                };
                // NFTA_SET_ELEM_DATA 2 > NFTA_DATA_VALUE 1 (a number, host
                // order) or NFTA_DATA_VERDICT 2 > CODE 1, CHAIN 2.
                let data = attr(&e, 2).map(attrs).and_then(|d| {
                    if let Some(v) = attr(&d, 1).and_then(|v| v.get(..4)) {
                        return Some(ElemData::Number(u32::from_ne_bytes(v.try_into().unwrap())));
                    }
                    attr(&d, 2).map(attrs).map(|v| {
                        let code = attr_be32(&v, 1) as i32;
                        let chain = attr_str(&v, 2);
                        ElemData::Verdict(match code {
                            0 => "drop".to_string(),
                            1 => "accept".to_string(),
                            -3 => format!("jump {chain}"),
                            -4 => format!("goto {chain}"),
                            c => format!("verdict {c}"),
                        })
                    })
                });
                cur.elems.push(ElemEvent {
                    kind,
                    del: kind != NFT_MSG_NEWSETELEM,
                    table: table.clone(),
                    set: set.clone(),
                    key,
                    data,
                });
            }
        }
        _ => cur.others.push((kind, attr_str(&top, 1))),
    }
}
