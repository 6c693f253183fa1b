//! The operator's commands: `check`, `status` and `explain`. They only
//! read — cgroupfs, `/proc`, and the live ruleset over netlink — and never
//! change the kernel, so they are safe to run next to the daemon.
//!
//! Levels are the kernel's (`socket cgroupv2 level N`): the depth below the
//! root of the cgroup2 hierarchy, whatever directory `cgroup-root` names.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::cgroup;
use crate::config::{CgroupRoot, Config, Verdict, match_form};
use crate::daemon::Options;
use crate::error::Error;
use crate::netlink::NlError;
use crate::nftables::{self, Element, MapRef, Object as NftObject};
use crate::ruleset::{MapRole, Ruleset, nl_error};
use crate::wire::{self, Msg, Writer};

/// Chains of nft/cgtproxy*.nft that are plumbing, never a rule's target.
const INTERNAL_CHAINS: &[&str] = &[
    "output",
    "lookup",
    "dispatch",
    "pass",
    "pre_bypass",
    "pre_proxy",
    "reroute",
    "prerouting",
    "listener",
    "dns",
    "forward",
    "forward_new",
];

/// The port `CGTPROXY_PORT` defines in the shipped ruleset; used when the
/// live ruleset cannot say.
const DEFAULT_TPROXY_PORT: u16 = 7893;
/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INIT_CGROUP_NS: u64 = 0xEFFF_FFFB;

// ---------------------------------------------------------------------------
// The cgroup2 hierarchy as this process sees it
// ---------------------------------------------------------------------------

/// Where cgroup2 is mounted and where the cgroup root (the rules' `/`) is.
struct Hierarchy {
    /// The cgroup2 mount point and the depth of its root below the
    /// hierarchy's root (non-zero when a subtree was mounted), when known.
    mount: Option<(PathBuf, Option<usize>)>,
    root: PathBuf,
}

/// Normal components of `p` (`..` makes it unknowable: `None`).
fn depth(p: &Path) -> Option<usize> {
    let mut n = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => n += 1,
            Component::RootDir | Component::CurDir => {}
            _ => return None,
        }
    }
    Some(n)
}

/// `/` + `rel`, as bytes (the form rules and `/proc/PID/cgroup` use).
fn slash(rel: &Path) -> Vec<u8> {
    let mut v = b"/".to_vec();
    v.extend_from_slice(rel.as_os_str().as_bytes());
    v
}

impl Hierarchy {
    fn new(root: PathBuf) -> Hierarchy {
        let mount = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .as_deref()
            .and_then(cgroup::find_mount_and_root)
            .map(|(r, mp)| (mp, depth(Path::new(OsStr::from_bytes(&r)))));
        Hierarchy { mount, root }
    }

    fn mount_point(&self) -> Option<&Path> {
        self.mount.as_ref().map(|(m, _)| m.as_path())
    }

    /// The kernel's level of the cgroup at `dir`.
    fn level(&self, dir: &Path) -> Option<usize> {
        let (m, base) = self.mount.as_ref()?;
        Some(base.as_ref()? + depth(dir.strip_prefix(m).ok()?)?)
    }

    /// The path rules match for `dir`, when it is at or below the root.
    fn rules_path(&self, dir: &Path) -> Option<Vec<u8>> {
        let rel = dir.strip_prefix(&self.root).ok()?;
        Some(if rel.as_os_str().is_empty() {
            b"/".to_vec()
        } else {
            slash(rel)
        })
    }

    /// How a cgroup is named for people: its rules path, or (above the
    /// cgroup root) its path in the mount, flagged as such.
    fn name(&self, dir: &Path) -> String {
        if let Some(p) = self.rules_path(dir) {
            return cgroup::display(&p);
        }
        match self.mount_point().and_then(|m| dir.strip_prefix(m).ok()) {
            Some(rel) => format!("(above the cgroup root) {}", cgroup::display(&slash(rel))),
            None => cgroup::display(dir.as_os_str().as_bytes()),
        }
    }

    /// The directory of a process's cgroup.
    fn dir_of_pid(&self, pid: u32) -> Result<PathBuf, String> {
        let p = cgroup::path_of_pid(pid)?;
        if p.split(|&c| c == b'/').any(|c| c == b"..") {
            return Err(format!(
                "process {pid} is in cgroup {} outside this cgroup namespace",
                cgroup::display(&p)
            ));
        }
        let m = self
            .mount_point()
            .ok_or("no cgroup2 file system is mounted (see /proc/self/mountinfo)")?;
        Ok(cgroup::fs_path(m, &p))
    }

    /// `dir` and its ancestors down to the mount point (deepest first).
    fn lineage(&self, dir: &Path) -> Vec<PathBuf> {
        let stop = self.mount_point().unwrap_or(&self.root);
        let mut out = vec![dir.to_path_buf()];
        let mut d = dir;
        while d != stop {
            match d.parent() {
                Some(p) if p.starts_with(stop) => {
                    out.push(p.to_path_buf());
                    d = p;
                }
                _ => break,
            }
        }
        out
    }

    /// Every cgroup at and below the root: (directory, id), parents first.
    fn walk(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            // A cgroup removed meanwhile is simply not there.
            let Ok(id) = cgroup::id_of(&d) else { continue };
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            out.push((d, id));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// The live ruleset: what its rules do with the map
// ---------------------------------------------------------------------------

const NFT_MSG_GETRULE: u8 = 7;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_EXPR: u16 = 17;
const NFTA_SET_EXPRESSIONS: u16 = 18;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SOCKET_KEY: u16 = 1;
const NFTA_SOCKET_DREG: u16 = 2;
const NFTA_SOCKET_LEVEL: u16 = 3;
const NFT_SOCKET_MARK: u32 = 1;
const NFT_SOCKET_CGROUPV2: u32 = 3;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_TPROXY_REG_PORT: u16 = 3;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// One expression of a rule: its name and its attributes (raw).
#[derive(Debug, Clone)]
struct Expr {
    name: String,
    attrs: Vec<(u16, Vec<u8>)>,
}

impl Expr {
    fn attr(&self, ty: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, v)| v.as_slice())
    }
    /// nf_tables' NLA_U32 attributes are big-endian.
    fn u32(&self, ty: u16) -> Option<u32> {
        self.attr(ty).and_then(|v| wire::be32(v).ok())
    }
}

#[derive(Debug, Clone)]
struct NftRule {
    chain: String,
    exprs: Vec<Expr>,
}

/// What `nft_data` holds: a value, or a verdict (code, chain).
enum Data {
    Value(Vec<u8>),
    Verdict(i32, Option<String>),
}

fn parse_data(b: &[u8]) -> Option<Data> {
    for a in wire::attrs(b) {
        let (ty, v) = a.ok()?;
        match ty {
            NFTA_DATA_VALUE => return Some(Data::Value(v.to_vec())),
            NFTA_DATA_VERDICT => {
                let (mut code, mut chain) = (None, None);
                for a in wire::attrs(v) {
                    let (ty, v) = a.ok()?;
                    match ty {
                        NFTA_VERDICT_CODE => code = wire::be32(v).ok().map(|c| c as i32),
                        NFTA_VERDICT_CHAIN => chain = Some(wire::string(v)),
                        _ => {}
                    }
                }
                return Some(Data::Verdict(code?, chain));
            }
            _ => {}
        }
    }
    None
}

/// A NEWRULE message of a dump: its chain and expressions.
fn parse_rule(m: &Msg<'_>) -> Result<(String, String, NftRule), wire::Malformed> {
    let body = m
        .payload
        .get(4..)
        .ok_or(wire::Malformed("truncated nfgenmsg"))?;
    let (mut table, mut chain, mut exprs) = (String::new(), String::new(), Vec::new());
    for a in wire::attrs(body) {
        let (ty, v) = a?;
        match ty {
            NFTA_RULE_TABLE => table = wire::string(v),
            NFTA_RULE_CHAIN => chain = wire::string(v),
            NFTA_RULE_EXPRESSIONS => {
                for e in wire::attrs(v) {
                    let (ty, e) = e?;
                    if ty != NFTA_LIST_ELEM {
                        continue;
                    }
                    let mut x = Expr {
                        name: String::new(),
                        attrs: Vec::new(),
                    };
                    for a in wire::attrs(e) {
                        let (ty, v) = a?;
                        match ty {
                            NFTA_EXPR_NAME => x.name = wire::string(v),
                            NFTA_EXPR_DATA => {
                                for a in wire::attrs(v) {
                                    let (ty, v) = a?;
                                    x.attrs.push((ty, v.to_vec()));
                                }
                            }
                            _ => {}
                        }
                    }
                    exprs.push(x);
                }
            }
            _ => {}
        }
    }
    let c = chain.clone();
    Ok((table, c, NftRule { chain, exprs }))
}

/// What the live ruleset does with the map, read from its rules.
#[derive(Debug, Default, PartialEq, Eq)]
struct Facts {
    /// Levels of the `socket cgroupv2 level N vmap @MAP` lookups.
    levels: BTreeSet<u32>,
    /// Chains that hold those lookups.
    lookup_chains: BTreeSet<String>,
    /// A rule looks the packet mark up in the verdicts map.
    dispatches: bool,
    /// Chains known to exist (those with rules; `check` adds the empty
    /// ones the config names), and those whose first rule is `meta mark set
    /// socket mark`.
    chains: BTreeSet<String>,
    restores: BTreeSet<String>,
    /// `tproxy ... to :PORT` ports.
    tproxy_ports: BTreeSet<u16>,
    /// The packet mark the TPROXY rules match (`meta mark X ... tproxy`).
    tproxy_mark: Option<u32>,
    /// `meta mark X accept` in a lookup chain: the proxy's own mark.
    proxy_mark: Option<u32>,
    /// Chains that send what reaches them to the TPROXY listener: those
    /// setting the TPROXY mark, and those that go to or jump to one.
    capturing: BTreeSet<String>,
}

impl Facts {
    fn levels_text(&self) -> String {
        let v: Vec<u32> = self.levels.iter().copied().collect();
        let contiguous = v.windows(2).all(|w| w[1] == w[0] + 1);
        match (v.first(), v.last()) {
            (Some(a), Some(b)) if a == b => format!("level {a}"),
            (Some(a), Some(b)) if contiguous => format!("levels {a}-{b}"),
            _ => format!(
                "levels {}",
                v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }

    /// Whether the ruleset looks up the element of a cgroup at `level`.
    fn looks_up(&self, level: Option<usize>) -> bool {
        match level {
            Some(0) => false,
            Some(l) => self.levels.is_empty() || self.levels.contains(&(l as u32)),
            None => true,
        }
    }
}

/// Chains from which one of `seed` is reached through goto or jump.
fn reaching(seed: BTreeSet<String>, edges: &[(String, String)]) -> BTreeSet<String> {
    let mut set = seed;
    loop {
        let before = set.len();
        for (from, to) in edges {
            if set.contains(to) {
                set.insert(from.clone());
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// Reads what the rules do, register by register: which levels feed a
/// lookup in `map`, whether the mark feeds one in `verdicts`, where TPROXY
/// sends to, and which marks steer it.
fn analyse(rules: &[NftRule], map: &str, verdicts: &str) -> Facts {
    #[derive(Clone)]
    enum Reg {
        Cgroup(u32),
        Value(Vec<u8>),
        Mark,
    }
    /// One rule, reduced to what matters here.
    #[derive(Default)]
    struct Summary {
        mark_eq: Option<u32>,
        sets_mark: Vec<u32>,
        tproxy: bool,
        /// `meta mark X accept`: an exemption.
        exempt: bool,
    }
    let mut f = Facts::default();
    let mut edges: Vec<(String, String)> = Vec::new();
    let mut summaries: Vec<(&str, Summary)> = Vec::new();
    for r in rules {
        let mut regs: HashMap<u32, Reg> = HashMap::new();
        let mut sum = Summary::default();
        let mut accept = false;
        for e in &r.exprs {
            match e.name.as_str() {
                "socket" if e.u32(NFTA_SOCKET_KEY) == Some(NFT_SOCKET_CGROUPV2) => {
                    if let (Some(d), Some(l)) = (e.u32(NFTA_SOCKET_DREG), e.u32(NFTA_SOCKET_LEVEL))
                    {
                        regs.insert(d, Reg::Cgroup(l));
                    }
                }
                "immediate" => match e.attr(NFTA_IMMEDIATE_DATA).and_then(parse_data) {
                    Some(Data::Value(v)) => {
                        if let Some(d) = e.u32(NFTA_IMMEDIATE_DREG) {
                            regs.insert(d, Reg::Value(v));
                        }
                    }
                    Some(Data::Verdict(code, chain)) => {
                        accept = code == NF_ACCEPT;
                        if let (NFT_JUMP | NFT_GOTO, Some(c)) = (code, chain) {
                            edges.push((r.chain.clone(), c));
                        }
                    }
                    None => {}
                },
                "meta" if e.u32(NFTA_META_KEY) == Some(NFT_META_MARK) => {
                    if let Some(d) = e.u32(NFTA_META_DREG) {
                        regs.insert(d, Reg::Mark);
                    } else if let Some(Reg::Value(v)) =
                        e.u32(NFTA_META_SREG).and_then(|s| regs.get(&s))
                        && let Ok(b) = <[u8; 4]>::try_from(v.as_slice())
                    {
                        // The mark is a host-order u32 in the register.
                        sum.sets_mark.push(u32::from_ne_bytes(b));
                    }
                }
                "meta" => {
                    // Any other load overwrites its register.
                    if let Some(d) = e.u32(NFTA_META_DREG) {
                        regs.remove(&d);
                    }
                }
                "cmp" => {
                    if let (Some(Reg::Mark), Some(NFT_CMP_EQ), Some(Data::Value(v))) = (
                        e.u32(NFTA_CMP_SREG).and_then(|s| regs.get(&s)),
                        e.u32(NFTA_CMP_OP),
                        e.attr(NFTA_CMP_DATA).and_then(parse_data),
                    ) && let Ok(b) = <[u8; 4]>::try_from(v.as_slice())
                    {
                        sum.mark_eq = Some(u32::from_ne_bytes(b));
                    }
                }
                "lookup" => {
                    let set = e.attr(NFTA_LOOKUP_SET).map(wire::string);
                    match e.u32(NFTA_LOOKUP_SREG).and_then(|s| regs.get(&s)) {
                        Some(Reg::Cgroup(l)) if set.as_deref() == Some(map) => {
                            f.levels.insert(*l);
                            f.lookup_chains.insert(r.chain.clone());
                        }
                        Some(Reg::Mark) if set.as_deref() == Some(verdicts) => f.dispatches = true,
                        _ => {}
                    }
                    // A map lookup writes what it found over its register.
                    if let Some(d) = e.u32(NFTA_LOOKUP_DREG) {
                        regs.remove(&d);
                    }
                }
                "tproxy" => {
                    sum.tproxy = true;
                    if let Some(Reg::Value(v)) =
                        e.u32(NFTA_TPROXY_REG_PORT).and_then(|s| regs.get(&s))
                        && let Ok(b) = <[u8; 2]>::try_from(v.as_slice())
                    {
                        f.tproxy_ports.insert(u16::from_be_bytes(b));
                    }
                }
                _ => {}
            }
        }
        let names: Vec<&str> = r.exprs.iter().map(|e| e.name.as_str()).collect();
        sum.exempt = names == ["meta", "cmp", "immediate"] && accept && sum.mark_eq.is_some();
        if f.chains.insert(r.chain.clone()) && restores_mark(&r.exprs) {
            f.restores.insert(r.chain.clone());
        }
        summaries.push((&r.chain, sum));
    }
    // The mark TPROXY takes: matched by a rule that does TPROXY itself or
    // goes to a chain that does.
    let tproxy_chains = reaching(
        summaries
            .iter()
            .filter(|(_, s)| s.tproxy)
            .map(|(c, _)| c.to_string())
            .collect(),
        &edges,
    );
    f.tproxy_mark = rules.iter().zip(&summaries).find_map(|(r, (_, s))| {
        let goes = r.exprs.iter().any(|e| {
            e.attr(NFTA_IMMEDIATE_DATA).and_then(parse_data).is_some_and(|d| {
                matches!(d, Data::Verdict(NFT_JUMP | NFT_GOTO, Some(c)) if tproxy_chains.contains(&c))
            })
        });
        s.mark_eq.filter(|_| s.tproxy || goes)
    });
    // The proxy's exemption: `meta mark X accept` on the way to a lookup.
    let upstream = reaching(f.lookup_chains.clone(), &edges);
    f.proxy_mark = summaries
        .iter()
        .find(|(c, s)| s.exempt && upstream.contains(*c))
        .and_then(|(_, s)| s.mark_eq);
    // Chains that hand what reaches them to the listener: those that set
    // the TPROXY mark, and those that go to one of them.
    f.capturing = reaching(
        summaries
            .iter()
            .filter(|(_, s)| {
                s.sets_mark
                    .iter()
                    .any(|m| f.tproxy_mark.is_none_or(|t| t == *m))
            })
            .map(|(c, _)| c.to_string())
            .collect(),
        &edges,
    );
    f
}

/// `meta mark set socket mark`: socket mark into a register, the packet
/// mark from it.
fn restores_mark(exprs: &[Expr]) -> bool {
    let [sock, meta] = exprs else { return false };
    let reg = sock.u32(NFTA_SOCKET_DREG);
    sock.name == "socket"
        && sock.u32(NFTA_SOCKET_KEY) == Some(NFT_SOCKET_MARK)
        && meta.name == "meta"
        && meta.u32(NFTA_META_KEY) == Some(NFT_META_MARK)
        && reg.is_some()
        && meta.u32(NFTA_META_SREG) == reg
}

/// The table as the kernel has it, read through the daemon's own `Ruleset`.
struct Live {
    rs: Ruleset,
}

/// The parts of a NEWSET reply `check` reports.
#[derive(Debug, Default)]
struct MapInfo {
    set: Option<nftables::SetInfo>,
    counter: bool,
}

impl Live {
    fn open(cfg: &Config) -> Result<Live, Error> {
        Ok(Live {
            rs: Ruleset::open(cfg)?,
        })
    }

    fn table(&mut self) -> Result<bool, Error> {
        let t = self.rs.map.table.clone();
        self.rs.get(&NftObject::Table(&t), |_| Ok(()))
    }

    fn map_info(&mut self, map: &str) -> Result<Option<MapInfo>, Error> {
        let (t, m) = (self.rs.map.table.clone(), map.to_string());
        let mut info = MapInfo::default();
        let found = self.rs.get(&NftObject::Set(&t, &m), |m| {
            info.set = Some(nftables::parse_set(m)?);
            info.counter = set_has_counter(m);
            Ok(())
        })?;
        Ok(found.then_some(info))
    }

    fn chain(&mut self, chain: &str) -> Result<bool, Error> {
        let t = self.rs.map.table.clone();
        self.rs.get(&NftObject::Chain(&t, chain), |_| Ok(()))
    }

    /// Every rule of the table, in chain order.
    fn rules(&mut self) -> Result<Vec<NftRule>, Error> {
        for _ in 0..10 {
            let table = self.rs.map.table.clone();
            let nl = self.rs.socket();
            let seq = nl.seq();
            let mut w = Writer::new();
            // nft list table inet TABLE (its rules)
            w.begin_msg(
                nftables::msg_type(NFT_MSG_GETRULE),
                wire::NLM_F_REQUEST | wire::NLM_F_DUMP,
                seq,
            );
            w.put(&[nftables::FAMILY_INET, 0, 0, 0]); // nfgenmsg: family, v0, res_id 0
            w.attr_str(NFTA_RULE_TABLE, &table);
            w.end_msg();
            let mut out = Vec::new();
            let r = nl.request(&w.buf, seq, true, |m| {
                let (t, _, rule) = parse_rule(m)?;
                if t == table {
                    out.push(rule);
                }
                Ok(())
            });
            match r {
                Ok(()) => return Ok(out),
                Err(NlError::Unknown("interrupted dump")) => continue,
                Err(e) => return Err(nl_error("dump of the rules", e)),
            }
        }
        Err(Error::Runtime(
            "dump of the rules: interrupted ten times in a row".into(),
        ))
    }
}

/// Whether a NEWSET carries a `counter` expression for its elements.
fn set_has_counter(m: &Msg<'_>) -> bool {
    fn named_counter(expr: &[u8]) -> bool {
        wire::attrs(expr)
            .flatten()
            .any(|(ty, v)| ty == NFTA_EXPR_NAME && wire::string(v) == "counter")
    }
    let Some(body) = m.payload.get(4..) else {
        return false;
    };
    wire::attrs(body).flatten().any(|(ty, v)| match ty {
        NFTA_SET_EXPR => named_counter(v),
        NFTA_SET_EXPRESSIONS => wire::attrs(v)
            .flatten()
            .any(|(t, e)| t == NFTA_LIST_ELEM && named_counter(e)),
        _ => false,
    })
}

/// The map's elements by id, or why there are none to show.
fn elements(cfg: &Config) -> Result<Vec<Element>, Error> {
    let mut rs = Ruleset::open(cfg)?;
    match rs.dump()? {
        Some(e) => Ok(e),
        None => Err(Error::Runtime(format!(
            "table inet {} or its map '{}' or '{}' does not exist — load nft/cgtproxy.nft first",
            cfg.table, cfg.map, cfg.verdict_map
        ))),
    }
}

/// Loads the config and resolves the cgroup root (`--cgroup-root` first).
fn load(opts: &Options) -> Result<(Config, Hierarchy), Error> {
    let (cfg, root) = crate::daemon::load(opts)?;
    Ok((cfg, Hierarchy::new(root)))
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

struct Row {
    id: u64,
    path: Option<Vec<u8>>,
    verdict: Verdict,
    counter: Option<(u64, u64)>,
}

/// `cgtproxy status [--json]`: every element of the map with its cgroup
/// and counters. Returns the exit status.
pub fn status(opts: &Options, as_json: bool) -> Result<i32, Error> {
    let (cfg, h) = load(opts)?;
    let els = elements(&cfg)?;
    let wanted: HashSet<u64> = els.iter().map(|e| e.id).collect();
    let mut paths: HashMap<u64, Vec<u8>> = HashMap::new();
    for (dir, id) in h.walk() {
        if wanted.contains(&id)
            && let Some(p) = h.rules_path(&dir)
        {
            paths.insert(id, p);
        }
    }
    let mut rows: Vec<Row> = els
        .into_iter()
        .map(|e| Row {
            id: e.id,
            path: paths.remove(&e.id),
            verdict: e.verdict,
            counter: e.counter,
        })
        .collect();
    // Cgroups by path, then the gone ones by id.
    rows.sort_by(|a, b| (a.path.is_none(), &a.path, a.id).cmp(&(b.path.is_none(), &b.path, b.id)));
    let text = if as_json {
        status_json(&cfg, &rows)
    } else {
        status_table(&rows)
    };
    print!("{text}");
    Ok(0)
}

fn status_table(rows: &[Row]) -> String {
    let num = |c: Option<(u64, u64)>, bytes: bool| match c {
        Some((p, b)) => (if bytes { b } else { p }).to_string(),
        None => "-".into(),
    };
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.verdict.to_string(),
                num(r.counter, false),
                num(r.counter, true),
                match &r.path {
                    Some(p) => cgroup::display(p),
                    None => r.id.to_string(),
                },
            ]
        })
        .collect();
    let head = ["VERDICT", "PACKETS", "BYTES", "CGROUP"];
    let w = |i: usize| {
        cells
            .iter()
            .map(|c| c[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w0$}  {:>w1$}  {:>w2$}  {}",
        head[0], head[1], head[2], head[3]
    );
    for c in &cells {
        let _ = writeln!(s, "{:<w0$}  {:>w1$}  {:>w2$}  {}", c[0], c[1], c[2], c[3]);
    }
    s
}

/// A JSON string literal. Written by hand: the output is small and fixed,
/// and a serializer would cost more binary than this.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `{"elements":[{"bytes","chain","id","packets","path","verdict"}],"map","table"}`,
/// keys sorted, one line; unknown values are `null`.
fn status_json(cfg: &Config, rows: &[Row]) -> String {
    let num = |x: Option<u64>| x.map_or("null".to_string(), |x| x.to_string());
    let mut out = String::from("{\"elements\":[");
    for (i, r) in rows.iter().enumerate() {
        let (verdict, chain) = match &r.verdict {
            Verdict::Drop => ("drop".to_string(), None),
            Verdict::Goto(c) => ("goto".to_string(), Some(c.as_str())),
            other => (other.to_string(), None),
        };
        let _ = write!(
            out,
            "{}{{\"bytes\":{},\"chain\":{},\"id\":{},\"packets\":{},\"path\":{},\"verdict\":{}}}",
            if i == 0 { "" } else { "," },
            num(r.counter.map(|c| c.1)),
            chain.map_or("null".to_string(), json_str),
            r.id,
            num(r.counter.map(|c| c.0)),
            r.path
                .as_ref()
                .map_or("null".to_string(), |p| json_str(&match_form(p))),
            json_str(&verdict),
        );
    }
    let _ = writeln!(
        out,
        "],\"map\":{},\"table\":{}}}",
        json_str(&cfg.map),
        json_str(&cfg.table)
    );
    out
}

// ---------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------

/// One level of a cgroup's lineage, as the ruleset looks it up.
struct Step {
    dir: PathBuf,
    level: Option<usize>,
    id: Option<u64>,
    /// The rule matching this cgroup's own path (`None` above the root or
    /// when none matches).
    rule: Option<usize>,
    under_root: bool,
}

fn lineage(h: &Hierarchy, cfg: &Config, dir: &Path) -> Vec<Step> {
    h.lineage(dir)
        .into_iter()
        .map(|d| {
            let rp = h.rules_path(&d);
            Step {
                level: h.level(&d),
                id: cgroup::id_of(&d).ok(),
                rule: rp
                    .as_deref()
                    .and_then(|p| cfg.matching_rule(&match_form(p)).map(|(i, _)| i)),
                under_root: rp.is_some(),
                dir: d,
            }
        })
        .collect()
}

/// Which step's element the kernel uses now (deepest looked-up level that
/// has one).
fn deciding<'s, 'e>(
    steps: &'s [Step],
    map: &HashMap<u64, &'e Element>,
    facts: &Facts,
) -> Option<(&'s Step, &'e Verdict)> {
    steps.iter().find_map(|s| {
        let el: &'e Element = s.id.and_then(|id| map.get(&id).copied())?;
        facts.looks_up(s.level).then_some((s, &el.verdict))
    })
}

/// `cgtproxy explain PATH|PID...`. Returns the exit status.
pub fn explain(opts: &Options, targets: &[OsString]) -> Result<i32, Error> {
    if targets.is_empty() {
        return Err(Error::Usage(
            "explain needs a cgroup PATH or a PID (try --help)".into(),
        ));
    }
    let (cfg, h) = load(opts)?;
    let (els, map_error) = match elements(&cfg) {
        Ok(e) => (e, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let facts = Live::open(&cfg)
        .and_then(|mut l| l.rules())
        .map(|r| analyse(&r, &cfg.map, &cfg.verdict_map))
        .unwrap_or_default();
    let by_id: HashMap<u64, &Element> = els.iter().map(|e| (e.id, e)).collect();
    let mut code = i32::from(map_error.is_some());
    let mut out = String::new();
    for (n, t) in targets.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        match explain_one(&cfg, &h, t, &by_id, map_error.as_deref(), &facts) {
            Ok(s) => out.push_str(&s),
            Err(e) => {
                let _ = writeln!(out, "{}: {e}", t.to_string_lossy());
                code = 1;
            }
        }
    }
    print!("{out}");
    Ok(code)
}

fn explain_one(
    cfg: &Config,
    h: &Hierarchy,
    target: &OsStr,
    map: &HashMap<u64, &Element>,
    map_error: Option<&str>,
    facts: &Facts,
) -> Result<String, String> {
    let bytes = target.as_bytes();
    let mut s = String::new();
    let dir = if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
        let pid: u32 = target
            .to_str()
            .and_then(|t| t.parse().ok())
            .ok_or("not a process id")?;
        let dir = h.dir_of_pid(pid)?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let _ = writeln!(s, "process {pid} ({})", comm.trim_end());
        dir
    } else {
        let p = Path::new(target);
        let under_mount = h.mount_point().is_some_and(|m| p.starts_with(m));
        if (p.starts_with(&h.root) || under_mount) && p.is_dir() {
            p.to_path_buf()
        } else {
            cgroup::fs_path(&h.root, bytes)
        }
    };
    if !dir.join("cgroup.procs").exists() {
        return Err(format!("no such cgroup ({} does not exist)", dir.display()));
    }
    let steps = lineage(h, cfg, &dir);
    let me = &steps[0];
    let lvl = |l: Option<usize>| l.map_or("?".to_string(), |l| l.to_string());
    let id = |i: Option<u64>| i.map_or("?".to_string(), |i| i.to_string());
    let _ = writeln!(s, "cgroup     {}", h.name(&dir));
    let _ = writeln!(s, "directory  {}", dir.display());
    let _ = writeln!(s, "id         {}", id(me.id));
    let _ = writeln!(s, "level      {}", lvl(me.level));
    let rule_text = |i: usize| {
        let r = &cfg.rules[i];
        format!("rules[{i}] {:?} -> {}", r.pattern, r.target)
    };
    match (me.under_root, me.rule) {
        (false, _) => {
            let _ = writeln!(
                s,
                "rule       none: outside the cgroup root {}, which cgtproxy does not list",
                h.root.display()
            );
        }
        (true, Some(i)) => {
            let _ = writeln!(s, "rule       {}", rule_text(i));
        }
        (true, None) => {
            let _ = writeln!(
                s,
                "rule       none matches {:?}",
                match_form(&h.rules_path(&dir).unwrap_or_default())
            );
        }
    }
    let own = me.id.and_then(|i| map.get(&i));
    let _ = writeln!(
        s,
        "element    {}",
        match (map_error, own) {
            (Some(_), _) => "unknown (the map cannot be read)".to_string(),
            (None, Some(e)) => format!("{}{}", e.verdict, counter_text(e.counter)),
            (None, None) => "none".to_string(),
        }
    );
    // The lookups, deepest first, as the ruleset does them.
    let decider = if map_error.is_none() {
        deciding(&steps, map, facts)
    } else {
        None
    };
    let rows: Vec<[String; 5]> = steps
        .iter()
        .filter(|st| st.level != Some(0))
        .map(|st| {
            let el = match (map_error, st.id.and_then(|i| map.get(&i))) {
                (Some(_), _) => "?".to_string(),
                (None, Some(e)) => e.verdict.to_string(),
                (None, None) => "-".to_string(),
            };
            let mut name = h.name(&st.dir);
            if decider.is_some_and(|(d, _)| d.dir == st.dir) {
                name.push_str("   <- decides");
            } else if !facts.looks_up(st.level) {
                name.push_str("   (level not looked up by the ruleset)");
            }
            let rule = match (st.under_root, st.rule) {
                (true, Some(i)) => format!("rules[{i}]"),
                _ => "-".to_string(),
            };
            [lvl(st.level), id(st.id), rule, el, name]
        })
        .collect();
    let head = ["LEVEL", "ID", "RULE", "ELEMENT", "CGROUP"];
    let w = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
    let _ = writeln!(s, "lookups    deepest first, as the ruleset does them:");
    for r in std::iter::once(&head.map(String::from)).chain(&rows) {
        let _ = writeln!(
            s,
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0], r[1], r[2], r[3], r[4]
        );
    }
    if rows.is_empty() {
        let _ = writeln!(s, "  (none: the root cgroup is never looked up)");
    }
    let verdict = match (map_error, decider) {
        (Some(e), _) => format!("unknown: {e}"),
        (None, Some((d, v))) if d.dir == dir => format!("{v}, from its own element"),
        (None, Some((d, v))) => format!(
            "{v}, inherited from the element of {} (level {})",
            h.name(&d.dir),
            lvl(d.level)
        ),
        (None, None) => "no element at any level: the ruleset's fallthrough applies (direct in the shipped ruleset)".to_string(),
    };
    let _ = writeln!(s, "verdict    {verdict}");
    // What the daemon makes of it: the nearest listed cgroup decides.
    let by_rules = steps
        .iter()
        .filter(|st| facts.looks_up(st.level))
        .find_map(|st| st.rule.map(|i| (st, i)));
    let _ = writeln!(
        s,
        "by rules   {}",
        match by_rules {
            Some((st, i)) if st.dir == dir => format!("{} (its own rule)", rule_text(i)),
            Some((st, i)) => format!("{}, inherited from {}", rule_text(i), h.name(&st.dir)),
            None => "no rule lists it or an ancestor below the cgroup root".to_string(),
        }
    );
    Ok(s)
}

fn counter_text(c: Option<(u64, u64)>) -> String {
    c.map_or(String::new(), |(p, b)| format!(" ({p} packets, {b} bytes)"))
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    Ok,
    Skip,
    Warn,
    Fail,
}

struct Checklist {
    lines: String,
    worst: Mark,
    warnings: usize,
    failures: usize,
}

impl Checklist {
    fn add(&mut self, m: Mark, text: impl AsRef<str>) {
        let tag = match m {
            Mark::Ok => "ok",
            Mark::Skip => "skip",
            Mark::Warn => "WARN",
            Mark::Fail => "FAIL",
        };
        // Continuation lines are indented under the text.
        let text = text.as_ref().replace('\n', "\n      ");
        let _ = writeln!(self.lines, "{tag:<4}  {text}");
        self.worst = self.worst.max(m);
        match m {
            Mark::Warn => self.warnings += 1,
            Mark::Fail => self.failures += 1,
            _ => {}
        }
    }
}

/// `cgtproxy check`. Returns the exit status: 0 all well, 1 a check failed
/// or warned; a config that does not load is an error (exit 2).
pub fn check(opts: &Options) -> Result<i32, Error> {
    let mut cfg = Config::load(opts.config.as_deref())?;
    if let Some(d) = &opts.cgroup_root {
        cfg.cgroup_root = CgroupRoot::Dir(d.clone());
    }
    let mut c = Checklist {
        lines: String::new(),
        worst: Mark::Ok,
        warnings: 0,
        failures: 0,
    };
    c.add(
        Mark::Ok,
        format!("config {}: {} rules", cfg.source, cfg.rules.len()),
    );
    for (i, r) in cfg.rules.iter().enumerate() {
        match &r.target {
            Verdict::Goto(c2) if c2 == "pass" => c.add(
                Mark::Warn,
                format!(
                    "rules[{i}].target is \"pass\", the ruleset's internal helper: it leaves the verdict number in the packet mark; use \"direct\""
                ),
            ),
            Verdict::Goto(c2) if c2 == "reroute" => c.add(
                Mark::Warn,
                format!(
                    "rules[{i}].target is \"reroute\", the ruleset's internal helper: it marks packets without recording the verdict on the connection; use \"proxy\""
                ),
            ),
            Verdict::Goto(c2) if INTERNAL_CHAINS.contains(&c2.as_str()) => c.add(
                Mark::Warn,
                format!(
                    "rules[{i}].target is \"{c2}\", a chain internal to the shipped rulesets (a loop or a base chain, which the kernel refuses as a verdict); use proxy, direct, drop or a chain of your own"
                ),
            ),
            _ => {}
        }
    }
    let h = match cgroup::resolve_root(&cfg.cgroup_root) {
        Ok(root) => Some(Hierarchy::new(root)),
        Err(e @ Error::Config(_)) => return Err(e),
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            None
        }
    };
    let cgroups = h.as_ref().map(|h| h.walk()).unwrap_or_default();
    if let Some(h) = &h {
        let mount = match h.mount_point() {
            Some(m) => format!("cgroup2 mounted at {}", m.display()),
            None => "no cgroup2 mount found".to_string(),
        };
        c.add(
            if h.mount.is_some() {
                Mark::Ok
            } else {
                Mark::Warn
            },
            format!(
                "{mount}; cgroup root {} ({} cgroups)",
                h.root.display(),
                cgroups.len()
            ),
        );
    }

    let (facts, els, counter) = check_ruleset(&cfg, &mut c);
    check_kernel(&mut c, facts.as_ref(), counter, &cfg.map);
    if let (Some(f), Some(route)) = (&facts, &cfg.route)
        && let Some(m) = f.tproxy_mark
    {
        if m == route.mark {
            c.add(
                Mark::Ok,
                format!(
                    "route.mark {} is the mark the TPROXY rules match",
                    route.mark
                ),
            );
        } else {
            c.add(
                Mark::Fail,
                format!(
                    "route.mark {} differs from the mark the ruleset's TPROXY rules match ({m}): make CGTPROXY_MARK and route.mark equal",
                    route.mark
                ),
            );
        }
    }
    // Only the layout that dispatches verdict numbers puts one in the mark.
    if let Some(f) = &facts
        && f.dispatches
    {
        check_restores(&mut c, &cfg, f);
    }
    if let (Some(h), Some(f)) = (&h, &facts) {
        check_depth(&mut c, &cfg, h, &cgroups, f);
    }
    check_namespace(&mut c);
    check_br_netfilter(&mut c);
    if let Some(h) = &h {
        check_self_capture(&mut c, &cfg, h, facts.as_ref(), els.as_deref());
    }
    let summary = match (c.failures, c.warnings) {
        (0, 0) => "all checks passed".to_string(),
        (f, w) => format!(
            "{f} failure{}, {w} warning{}",
            if f == 1 { "" } else { "s" },
            if w == 1 { "" } else { "s" }
        ),
    };
    println!("{}{summary}", c.lines);
    Ok(if c.worst >= Mark::Warn { 1 } else { 0 })
}

/// Table, map and chains; returns what the rules do, the elements, and
/// whether the map has counters.
fn check_ruleset(
    cfg: &Config,
    c: &mut Checklist,
) -> (Option<Facts>, Option<Vec<Element>>, Option<bool>) {
    let mut live = match Live::open(cfg) {
        Ok(l) => l,
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            return (None, None, None);
        }
    };
    match live.table() {
        Ok(true) => c.add(Mark::Ok, format!("table inet {}", cfg.table)),
        Ok(false) => {
            c.add(
                Mark::Fail,
                format!(
                    "table inet {} does not exist: load nft/cgtproxy.nft (nft -f /usr/share/cgtproxy/cgtproxy.nft)",
                    cfg.table
                ),
            );
            return (None, None, None);
        }
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            return (None, None, None);
        }
    }
    let (mut els, mut counter) = (None, None);
    let misfit = |role: MapRole, name: &str, i: &nftables::SetInfo| {
        let map = MapRef {
            table: cfg.table.clone(),
            map: name.to_string(),
        };
        role.misfit(&map, i)
    };
    match live.map_info(&cfg.map) {
        Ok(Some(MapInfo { set: Some(i), .. }))
            if let Some(p) = misfit(MapRole::Cgroups, &cfg.map, &i) =>
        {
            c.add(Mark::Fail, p);
        }
        Ok(Some(info)) => {
            counter = Some(info.counter);
            els = live.rs.dump().ok().flatten();
            let n = els
                .as_ref()
                .map_or("? elements".to_string(), |e| format!("{} elements", e.len()));
            if info.counter {
                c.add(
                    Mark::Ok,
                    format!("map {}: cgroupsv2 : mark, with counters; {n}", cfg.map),
                );
            } else {
                c.add(
                    Mark::Warn,
                    format!(
                        "map {} has no per-element counters (declare it with `counter`): status shows no packets or bytes; {n}",
                        cfg.map
                    ),
                );
            }
        }
        Ok(None) => c.add(
            Mark::Fail,
            format!(
                "map '{}' does not exist in table inet {} — load nft/cgtproxy.nft, or fix \"map\" in {}",
                cfg.map, cfg.table, cfg.source
            ),
        ),
        Err(e) => c.add(Mark::Fail, e.to_string()),
    }
    match live.map_info(&cfg.verdict_map) {
        Ok(Some(MapInfo { set: Some(i), .. })) => {
            match misfit(MapRole::Verdicts, &cfg.verdict_map, &i) {
                Some(p) => c.add(Mark::Fail, p),
                None => c.add(Mark::Ok, format!("map {}: mark : verdict", cfg.verdict_map)),
            }
        }
        Ok(Some(_)) => c.add(
            Mark::Fail,
            format!("map {}: the kernel's answer had no set", cfg.verdict_map),
        ),
        Ok(None) => c.add(
            Mark::Fail,
            format!(
                "map '{}' does not exist in table inet {} — load nft/cgtproxy.nft, or fix \"verdict-map\" in {}",
                cfg.verdict_map, cfg.table, cfg.source
            ),
        ),
        Err(e) => c.add(Mark::Fail, e.to_string()),
    }
    let mut present = Vec::new();
    for (chain, rule) in cfg.chains() {
        match live.chain(chain) {
            Ok(true) => present.push(chain),
            Ok(false) => c.add(
                Mark::Fail,
                format!(
                    "chain '{chain}' named by rules[{rule}].target does not exist in table inet {}",
                    cfg.table
                ),
            ),
            Err(e) => c.add(Mark::Fail, e.to_string()),
        }
    }
    if !present.is_empty() {
        c.add(
            Mark::Ok,
            format!("chains the rules name: {}", present.join(", ")),
        );
    }
    match live.rules() {
        Ok(rules) => {
            let mut f = analyse(&rules, &cfg.map, &cfg.verdict_map);
            f.chains.extend(present.iter().map(|c| c.to_string()));
            if f.levels.is_empty() {
                c.add(
                    Mark::Fail,
                    format!(
                        "no rule of table inet {} looks up map {} by `socket cgroupv2 level N`: its elements have no effect",
                        cfg.table, cfg.map
                    ),
                );
            } else if !f.dispatches {
                c.add(
                    Mark::Fail,
                    format!(
                        "no rule of table inet {} looks up the packet mark in map {} (`meta mark vmap @{}`): verdict numbers lead nowhere",
                        cfg.table, cfg.verdict_map, cfg.verdict_map
                    ),
                );
            }
            (Some(f), els, counter)
        }
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            (None, els, counter)
        }
    }
}

/// Target chains are entered with the verdict number in the packet mark;
/// one that does not put the socket's mark back first lets it out with it.
fn check_restores(c: &mut Checklist, cfg: &Config, f: &Facts) {
    for (chain, rule) in cfg.chains() {
        // Missing chains fail elsewhere.
        if f.chains.contains(chain)
            && !f.restores.contains(chain)
            && !INTERNAL_CHAINS.contains(&chain)
        {
            c.add(
                Mark::Warn,
                format!(
                    "chain '{chain}' (rules[{rule}].target) does not start with `meta mark set socket mark`: packets it lets through keep cgtproxy's verdict number as their mark; start it like the ruleset's proxy and direct"
                ),
            );
        }
    }
}

/// What the kernel supports: proven by the loaded ruleset when it uses the
/// feature (the kernel refuses a ruleset whose expressions it lacks), else
/// looked up in the module and config files, else unknown.
fn check_kernel(c: &mut Checklist, facts: Option<&Facts>, counter: Option<bool>, map: &str) {
    let proven = |what: &str, f: &dyn Fn(&Facts) -> Option<String>| {
        facts.and_then(f).map(|d| format!("kernel: {what} ({d})"))
    };
    let items: [(&str, &[&str], &str, Option<String>); 2] = [
        (
            "socket cgroupv2",
            &["nft_socket"],
            "CONFIG_NFT_SOCKET",
            proven("socket cgroupv2", &|f| {
                (!f.levels.is_empty()).then(|| {
                    format!(
                        "the ruleset looks up {} in chain {}",
                        f.levels_text(),
                        f.lookup_chains
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            }),
        ),
        (
            "TPROXY",
            &["nft_tproxy", "nf_tproxy_ipv4", "nf_tproxy_ipv6"],
            "CONFIG_NFT_TPROXY",
            proven("TPROXY", &|f| {
                (!f.tproxy_ports.is_empty()).then(|| {
                    let ports: Vec<String> = f.tproxy_ports.iter().map(u16::to_string).collect();
                    match f.tproxy_mark {
                        Some(m) => format!("to port {}, for mark {m}", ports.join(",")),
                        None => format!("to port {}", ports.join(",")),
                    }
                })
            }),
        ),
    ];
    for (what, modules, symbol, proof) in items {
        match proof {
            Some(p) => c.add(Mark::Ok, p),
            None => match kernel_evidence(modules, symbol) {
                Some(e) => c.add(Mark::Ok, format!("kernel: {what} ({e}; not used by a loaded ruleset)")),
                None => c.add(
                    Mark::Warn,
                    format!(
                        "kernel: {what}: cannot tell ({} not found in /sys/module, modules.builtin, modules.dep, /boot/config-* or /proc/config.gz, and no loaded ruleset uses it)",
                        modules.join(", ")
                    ),
                ),
            },
        }
    }
    // The kernel refuses a set declared with `counter` that it cannot
    // count per element, so a map that has them proves it.
    match counter {
        Some(true) => c.add(
            Mark::Ok,
            format!("kernel: set element counters (map {map} has them)"),
        ),
        Some(false) => c.add(
            Mark::Skip,
            format!("kernel: set element counters: map {map} is declared without them"),
        ),
        None => c.add(
            Mark::Skip,
            "kernel: set element counters: cannot tell without the map",
        ),
    }
}

/// Where a kernel feature shows: a loaded module, a built-in or loadable
/// one, or the kernel config.
fn kernel_evidence(modules: &[&str], symbol: &str) -> Option<String> {
    let rel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    for m in modules {
        if Path::new("/sys/module").join(m).exists() {
            return Some(format!("module {m} is loaded"));
        }
    }
    let lib = Path::new("/lib/modules").join(&rel);
    for (file, how) in [
        ("modules.builtin", "built in"),
        ("modules.dep", "available as a module"),
    ] {
        if let Ok(text) = std::fs::read_to_string(lib.join(file)) {
            for m in modules {
                let ko = format!("/{m}.ko");
                if text.lines().any(|l| {
                    let name = l.split(':').next().unwrap_or("");
                    name.ends_with(&ko) || name.contains(&format!("{ko}."))
                }) {
                    return Some(format!("{m} {how}"));
                }
            }
        }
    }
    // /proc/config.gz would need a decompressor; the ruleset itself is the
    // better evidence anyway, and is consulted first.
    let boot = format!("/boot/config-{rel}");
    let configs = [(boot.clone(), std::fs::read_to_string(&boot).ok())];
    for (file, text) in configs {
        for l in text.as_deref().unwrap_or("").lines() {
            if let Some(v) = l.strip_prefix(symbol).and_then(|r| r.strip_prefix('='))
                && (v == "y" || v == "m")
            {
                return Some(format!("{symbol}={v} in {file}"));
            }
        }
    }
    None
}

/// Cgroups a rule lists deeper than the deepest level the ruleset looks up
/// never get their own element used.
fn check_depth(
    c: &mut Checklist,
    cfg: &Config,
    h: &Hierarchy,
    cgroups: &[(PathBuf, u64)],
    f: &Facts,
) {
    let Some(&max) = f.levels.last() else { return };
    let mut deep: Vec<String> = Vec::new();
    for (dir, _) in cgroups {
        if h.level(dir).is_some_and(|l| l > max as usize)
            && let Some(p) = h.rules_path(dir)
            && cfg.verdict(&match_form(&p)).is_some()
        {
            deep.push(cgroup::display(&p));
        }
    }
    if !deep.is_empty() {
        deep.sort();
        c.add(
            Mark::Warn,
            format!(
                "{} listed cgroups are deeper than level {max}, the deepest the ruleset looks up; their own elements never match (they follow their level-{max} ancestor), e.g. {}",
                deep.len(),
                deep[0]
            ),
        );
    }
}

fn check_namespace(c: &mut Checklist) {
    match std::fs::metadata("/proc/self/ns/cgroup") {
        Ok(m) if m.ino() == INIT_CGROUP_NS => {
            c.add(Mark::Ok, "cgroup namespace: the initial one");
        }
        Ok(_) => c.add(
            Mark::Warn,
            "running in a non-root cgroup namespace: cgroup paths (and so rules) are relative to the namespace's root, cgroups outside it are invisible, and levels shown are not the kernel's; run cgtproxy in the initial cgroup namespace",
        ),
        Err(e) => c.add(Mark::Skip, format!("cgroup namespace: /proc/self/ns/cgroup: {e}")),
    }
}

fn check_br_netfilter(c: &mut Checklist) {
    let sysctl = |f: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/bridge/{f}"))
            .ok()
            .map(|s| s.trim() == "1")
    };
    let loaded = Path::new("/sys/module/br_netfilter").exists()
        || Path::new("/proc/sys/net/bridge").exists();
    if !loaded {
        c.add(Mark::Ok, "br_netfilter: not loaded");
        return;
    }
    let on: Vec<&str> = ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"]
        .into_iter()
        .filter(|f| sysctl(f) == Some(true))
        .collect();
    if on.is_empty() {
        c.add(
            Mark::Ok,
            "br_netfilter: loaded, bridge-nf-call-ip(6)tables off",
        );
    } else {
        c.add(
            Mark::Warn,
            format!(
                "br_netfilter: net.bridge.{} = 1: bridged frames (containers, VMs) pass the IP hooks and conntrack, where they can pick up cgtproxy's marks; cgtproxy never steers them by cgroup. Set to 0 unless something needs it",
                on.join(" and ")
            ),
        );
    }
}

/// Socket inodes listening on `port` (TCP LISTEN, or UDP bound), from
/// `/proc/net/{tcp,tcp6,udp,udp6}` of this network namespace.
fn listeners(port: u16) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (f, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/net/{f}")) {
            out.extend(parse_proc_net(&text, port, tcp));
        }
    }
    out
}

fn parse_proc_net(text: &str, port: u16, tcp: bool) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let p = u16::from_str_radix(local_port, 16).ok()?;
            let listening = !tcp || *f.get(3)? == TCP_LISTEN;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (p == port && listening && inode != 0).then_some(inode)
        })
        .collect()
}

/// Processes holding any of `inodes` (scan of `/proc/*/fd`).
fn holders(inodes: &BTreeSet<u64>) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).ok().is_some_and(|l| {
                l.to_str()
                    .and_then(|s| s.strip_prefix("socket:["))
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse().ok())
                    .is_some_and(|i: u64| inodes.contains(&i))
            })
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.insert(pid, comm.trim_end().to_string());
        }
    }
    out
}

/// The proxy's own process must not be sent to a chain that captures:
/// find who listens on the TPROXY port and resolve its cgroup's verdict,
/// both as the kernel holds it now and as the rules would make it.
fn check_self_capture(
    c: &mut Checklist,
    cfg: &Config,
    h: &Hierarchy,
    facts: Option<&Facts>,
    els: Option<&[Element]>,
) {
    let port = facts
        .and_then(|f| f.tproxy_ports.iter().next().copied())
        .unwrap_or(DEFAULT_TPROXY_PORT);
    let pids = holders(&listeners(port));
    if pids.is_empty() {
        c.add(
            Mark::Warn,
            format!(
                "nothing listens on port {port} in this network namespace: proxied connections fail until the proxy runs"
            ),
        );
        return;
    }
    let default_facts = Facts::default();
    let f = facts.unwrap_or(&default_facts);
    let captures = |v: &Verdict| match v {
        Verdict::Goto(chain) => {
            if f.capturing.is_empty() {
                chain == "proxy"
            } else {
                f.capturing.contains(chain)
            }
        }
        _ => false,
    };
    let by_id: HashMap<u64, &Element> = els.unwrap_or(&[]).iter().map(|e| (e.id, e)).collect();
    let exempt = match f.proxy_mark {
        Some(m) => format!("unless it marks them with {m} (SO_MARK; CGTPROXY_PROXY_MARK)"),
        None => "unless it marks them with the ruleset's proxy mark (CGTPROXY_PROXY_MARK)".into(),
    };
    let mut seen = HashSet::new();
    for (pid, comm) in pids {
        let dir = match h.dir_of_pid(pid) {
            Ok(d) => d,
            Err(e) => {
                c.add(Mark::Skip, format!("proxy process {pid} ({comm}): {e}"));
                continue;
            }
        };
        if !seen.insert(dir.clone()) {
            continue;
        }
        let steps = lineage(h, cfg, &dir);
        let who = format!(
            "the proxy (pid {pid} {comm}, listening on port {port}) runs in cgroup {}",
            h.name(&dir)
        );
        let mut problems = Vec::new();
        if let Some((st, v)) = deciding(&steps, &by_id, f)
            && captures(v)
        {
            problems.push(format!(
                "the map now sends it to {v} (element of {}, level {})",
                h.name(&st.dir),
                st.level.map_or("?".into(), |l| l.to_string())
            ));
        }
        if let Some((st, i)) = steps
            .iter()
            .filter(|st| f.looks_up(st.level))
            .find_map(|st| st.rule.map(|i| (st, i)))
            && captures(&cfg.rules[i].target)
        {
            problems.push(format!(
                "rules[{i}] {:?} sends {} to {}",
                cfg.rules[i].pattern,
                if st.dir == dir {
                    "it".to_string()
                } else {
                    format!("its ancestor {}", h.name(&st.dir))
                },
                cfg.rules[i].target
            ));
        }
        if problems.is_empty() {
            c.add(Mark::Ok, format!("{who}, which is not proxied"));
        } else {
            c.add(
                Mark::Warn,
                format!(
                    "{who}: {}; its own connections would loop back to itself {exempt}. Put the proxy in a cgroup that a \"direct\" rule lists",
                    problems.join("; ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_root_and_point() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                  41 31 0:38 /../.. /sys/fs/cgroup/uni\\040fied rw - cgroup2 cgroup2 rw\n";
        let (root, mp) = cgroup::find_mount_and_root(mi).unwrap();
        assert_eq!(root, b"/../..");
        assert_eq!(mp, PathBuf::from("/sys/fs/cgroup/uni fied"));
        assert_eq!(depth(Path::new("/")), Some(0));
        assert_eq!(depth(Path::new("/a/b")), Some(2));
        assert_eq!(depth(Path::new("/..")), None);
    }

    #[test]
    fn hierarchy_levels_and_paths() {
        let h = Hierarchy {
            mount: Some((PathBuf::from("/cg"), Some(0))),
            root: PathBuf::from("/cg/test"),
        };
        assert_eq!(h.level(Path::new("/cg")), Some(0));
        assert_eq!(h.level(Path::new("/cg/test/a/b")), Some(3));
        assert_eq!(h.rules_path(Path::new("/cg/test")), Some(b"/".to_vec()));
        assert_eq!(
            h.rules_path(Path::new("/cg/test/a/b")),
            Some(b"/a/b".to_vec())
        );
        assert_eq!(h.rules_path(Path::new("/cg/other")), None);
        assert_eq!(
            h.name(Path::new("/cg/other")),
            "(above the cgroup root) /other"
        );
        let l = h.lineage(Path::new("/cg/test/a"));
        assert_eq!(
            l,
            vec![
                PathBuf::from("/cg/test/a"),
                PathBuf::from("/cg/test"),
                PathBuf::from("/cg")
            ]
        );
    }

    #[test]
    fn proc_net_listeners() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1ED5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1ED5 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_proc_net(tcp, 7893, true), vec![4242]);
        assert_eq!(parse_proc_net(tcp, 7893, false), vec![4242, 4243]);
        assert_eq!(
            parse_proc_net("garbage\nx y\n", 7893, true),
            Vec::<u64>::new()
        );
    }

    fn expr(name: &str, attrs: &[(u16, Vec<u8>)]) -> Expr {
        Expr {
            name: name.into(),
            attrs: attrs.to_vec(),
        }
    }
    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
    fn value(v: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        w.attr(NFTA_DATA_VALUE, v);
        w.buf
    }
    fn verdict(code: i32, chain: Option<&str>) -> Vec<u8> {
        let mut w = Writer::new();
        let n = w.nest_begin(NFTA_DATA_VERDICT);
        w.attr_be32(NFTA_VERDICT_CODE, code as u32);
        if let Some(c) = chain {
            w.attr_str(NFTA_VERDICT_CHAIN, c);
        }
        w.nest_end(n);
        w.buf
    }
    fn rule(chain: &str, exprs: Vec<Expr>) -> NftRule {
        NftRule {
            chain: chain.into(),
            exprs,
        }
    }

    fn meta_mark_load() -> Expr {
        expr("meta", &[(NFTA_META_DREG, be(1)), (NFTA_META_KEY, be(3))])
    }
    fn mark_eq(m: u32) -> Expr {
        expr(
            "cmp",
            &[
                (NFTA_CMP_SREG, be(1)),
                (NFTA_CMP_OP, be(0)),
                (NFTA_CMP_DATA, value(&m.to_ne_bytes())),
            ],
        )
    }
    fn goes(code: i32, chain: Option<&str>) -> Expr {
        expr(
            "immediate",
            &[
                (NFTA_IMMEDIATE_DREG, be(0)),
                (NFTA_IMMEDIATE_DATA, verdict(code, chain)),
            ],
        )
    }
    fn load(reg: u32, v: &[u8]) -> Expr {
        expr(
            "immediate",
            &[
                (NFTA_IMMEDIATE_DREG, be(reg)),
                (NFTA_IMMEDIATE_DATA, value(v)),
            ],
        )
    }
    fn set_name(map: &str) -> Vec<u8> {
        let mut set = map.as_bytes().to_vec();
        set.push(0);
        set
    }
    /// `socket cgroupv2 level L vmap @MAP` (the 0.1 shape).
    fn level(l: u32, map: &str) -> Vec<Expr> {
        vec![
            expr(
                "socket",
                &[
                    (NFTA_SOCKET_KEY, be(3)),
                    (NFTA_SOCKET_DREG, be(1)),
                    (NFTA_SOCKET_LEVEL, be(l)),
                ],
            ),
            expr(
                "lookup",
                &[(NFTA_LOOKUP_SET, set_name(map)), (NFTA_LOOKUP_SREG, be(1))],
            ),
        ]
    }
    /// `meta mark set socket cgroupv2 level L map @MAP goto dispatch`
    fn level_number(l: u32, map: &str) -> Vec<Expr> {
        let mut v = level(l, map);
        v[1].attrs.push((NFTA_LOOKUP_DREG, be(1)));
        v.push(expr(
            "meta",
            &[(NFTA_META_KEY, be(3)), (NFTA_META_SREG, be(1))],
        ));
        v.push(goes(-4, Some("dispatch")));
        v
    }
    /// `meta mark set socket mark`
    fn restore() -> Vec<Expr> {
        vec![
            expr(
                "socket",
                &[(NFTA_SOCKET_KEY, be(1)), (NFTA_SOCKET_DREG, be(1))],
            ),
            expr("meta", &[(NFTA_META_KEY, be(3)), (NFTA_META_SREG, be(1))]),
        ]
    }
    /// `meta mark vmap @MAP`
    fn dispatch(map: &str) -> Vec<Expr> {
        vec![
            meta_mark_load(),
            expr(
                "lookup",
                &[(NFTA_LOOKUP_SET, set_name(map)), (NFTA_LOOKUP_SREG, be(1))],
            ),
        ]
    }
    fn set_mark(m: u32) -> Vec<Expr> {
        vec![
            load(8, &m.to_ne_bytes()),
            expr("meta", &[(NFTA_META_KEY, be(3)), (NFTA_META_SREG, be(8))]),
        ]
    }
    fn tproxy(port: u16) -> Vec<Expr> {
        vec![
            load(9, &port.to_be_bytes()),
            expr("tproxy", &[(NFTA_TPROXY_REG_PORT, be(9))]),
        ]
    }

    /// The shipped ruleset's shape, as the kernel dumps it: the lookups in
    /// their own chain, TPROXY behind a goto.
    #[test]
    fn analyses_the_shipped_shape() {
        let rules = vec![
            // output: meta mark 6666 accept; ...; goto lookup
            rule(
                "output",
                vec![meta_mark_load(), mark_eq(6666), goes(1, None)],
            ),
            rule("output", vec![goes(-4, Some("lookup"))]),
            rule("lookup", level_number(2, "cgroups")),
            rule("lookup", level_number(1, "cgroups")),
            rule("lookup", vec![goes(-4, Some("pass"))]),
            rule("dispatch", dispatch("verdicts")),
            rule("dispatch", vec![goes(-4, Some("direct"))]),
            // proxy: meta mark set socket mark; jump pre_proxy; ... goto reroute
            rule("proxy", restore()),
            rule("proxy", vec![goes(-3, Some("pre_proxy"))]),
            rule("proxy", vec![goes(-4, Some("reroute"))]),
            rule("reroute", [set_mark(9011), vec![goes(1, None)]].concat()),
            rule("direct", restore()),
            rule("direct", vec![goes(-4, Some("pass"))]),
            rule("pass", vec![goes(1, None)]),
            rule("mine", vec![goes(1, None)]),
            rule("mine", restore()),
            // prerouting: meta mark 9011 goto listener
            rule(
                "prerouting",
                vec![meta_mark_load(), mark_eq(9011), goes(-4, Some("listener"))],
            ),
            rule("listener", [set_mark(9011), tproxy(7893)].concat()),
        ];
        let f = analyse(&rules, "cgroups", "verdicts");
        assert_eq!(f.levels, BTreeSet::from([1, 2]));
        assert!(f.dispatches);
        assert_eq!(f.levels_text(), "levels 1-2");
        assert_eq!(f.lookup_chains, BTreeSet::from(["lookup".to_string()]));
        assert_eq!(f.tproxy_ports, BTreeSet::from([7893]));
        assert_eq!(f.tproxy_mark, Some(9011));
        assert_eq!(f.proxy_mark, Some(6666));
        for c in ["proxy", "reroute"] {
            assert!(f.capturing.contains(c), "{c} captures: {:?}", f.capturing);
        }
        for c in [
            "direct",
            "pass",
            "output",
            "lookup",
            "dispatch",
            "pre_proxy",
        ] {
            assert!(!f.capturing.contains(c), "{c} does not capture");
        }
        assert!(f.looks_up(Some(2)) && !f.looks_up(Some(3)) && !f.looks_up(Some(0)));
        // `mine` restores, but too late: not on its first rule.
        assert_eq!(
            f.restores,
            BTreeSet::from(["proxy".to_string(), "direct".to_string()])
        );
        assert!(analyse(&rules, "other", "verdicts").levels.is_empty());
        assert!(!analyse(&rules, "cgroups", "other").dispatches);
    }

    /// An older shape: lookups in the base chain, TPROXY in prerouting.
    #[test]
    fn analyses_a_flat_ruleset() {
        let rules = vec![
            rule("output", vec![meta_mark_load(), mark_eq(1), goes(1, None)]),
            rule("output", level(3, "m")),
            rule("proxy", [set_mark(5), vec![goes(1, None)]].concat()),
            rule("mine", vec![goes(-3, Some("proxy"))]),
            rule(
                "prerouting",
                [vec![meta_mark_load(), mark_eq(5)], tproxy(1234)].concat(),
            ),
        ];
        let f = analyse(&rules, "m", "v");
        assert_eq!(f.levels_text(), "level 3");
        assert_eq!((f.tproxy_mark, f.proxy_mark), (Some(5), Some(1)));
        assert_eq!(f.tproxy_ports, BTreeSet::from([1234]));
        assert_eq!(
            f.capturing,
            BTreeSet::from(["mine".to_string(), "proxy".to_string()])
        );
    }

    #[test]
    fn status_outputs() {
        let rows = vec![
            Row {
                id: 7,
                path: Some(b"/a b/\xff".to_vec()),
                verdict: Verdict::Goto("proxy".into()),
                counter: Some((3, 180)),
            },
            Row {
                id: 9,
                path: None,
                verdict: Verdict::Drop,
                counter: None,
            },
        ];
        assert_eq!(
            status_table(&rows),
            "VERDICT     PACKETS  BYTES  CGROUP\n\
             goto proxy        3    180  /a b/\\xff\n\
             drop              -      -  9\n"
        );
        let cfg = Config::parse("t", r#"{"rules": []}"#).unwrap();
        assert_eq!(
            status_json(&cfg, &rows),
            concat!(
                r#"{"elements":[{"bytes":180,"chain":"proxy","id":7,"packets":3,"path":"/a b/\\xff","verdict":"goto"},"#,
                r#"{"bytes":null,"chain":null,"id":9,"packets":null,"path":null,"verdict":"drop"}],"map":"cgroups","table":"cgtproxy"}"#,
                "\n"
            )
        );
    }
}
