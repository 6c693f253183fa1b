use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::explain::{deciding, lineage};
use super::rules::{Facts, analyse, nat_ports};
use super::{Hierarchy, INTERNAL_CHAINS, Live, MapInfo};
use crate::cgroup;
use crate::config::{CgroupRoot, Config, Verdict, match_form};
use crate::error::Error;
use crate::nftables::{self, MapRef};
use crate::options::Options;
use crate::reconcile::{self, Element, FILLED};
use crate::refusal;
use crate::ruleset::MapRole;

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

/// The port `CGTPROXY_PORT` defines in the shipped ruleset; used when the
/// live ruleset cannot say.
const DEFAULT_TPROXY_PORT: u16 = 7893;
/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INIT_CGROUP_NS: u64 = 0xEFFF_FFFB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// How `check` runs: `--strict`, `--config-only`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Warnings fail too (exit 1).
    pub strict: bool,
    /// Only the configuration: no netlink, no cgroupfs, no /proc or /sys,
    /// so a package hook or `ExecStartPre` can run it anywhere.
    pub config_only: bool,
}

/// Where the bridge sysctls of this network namespace live; the directory
/// exists only while `br_netfilter` is loaded.
const BRIDGE_SYSCTLS: &str = "/proc/sys/net/bridge";

/// `cgtproxy check`. Returns the exit status, like `nft -c` or `nginx -t`
/// so it can gate a start: 0 when all holds or only warnings were printed
/// (two are normal on a healthy host: `br_netfilter` under Docker, nothing
/// listening yet at boot), 1 when a check failed (or, with `--strict`, any
/// warning); a config that does not load is an error (exit 2).
pub fn check(opts: &Options, mode: Mode) -> Result<i32, Error> {
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
    if mode.config_only {
        c.add(
            Mark::Skip,
            "the live ruleset, the kernel and cgroupfs (--config-only)",
        );
        return Ok(c.finish(mode));
    }
    let h = match cgroup::resolve_root(&cfg.cgroup_root) {
        Ok(root) => Some(Hierarchy::new(root)),
        Err(e @ Error::Config(_)) => return Err(e),
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            None
        }
    };
    // Walked as deep as the ruleset looks up (as the daemon follows).
    let deepest = super::deepest_level(&cfg).ok().flatten();
    let walk = h.as_ref().map(|h| h.walk(deepest));
    let cgroups: &[(PathBuf, u64)] = walk.as_ref().map_or(&[], |w| &w.cgroups);
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

    if let Some(h) = &h {
        check_rule_counts(&mut c, &cfg, h, cgroups);
    }
    let (facts, els, counter) = check_ruleset(&cfg, &mut c);
    check_kernel(&mut c, facts.as_ref(), counter, &cfg.map);
    check_routing(&mut c, &cfg, facts.as_ref());
    // Only the layout that dispatches verdict numbers puts one in the mark.
    if let Some(f) = &facts
        && f.dispatches
    {
        check_restores(&mut c, &cfg, f);
    }
    if let (Some(h), Some(f)) = (&h, &facts) {
        let cut = walk.as_ref().map_or(&[][..], |w| &w.cut[..]);
        check_depth(&mut c, &cfg, h, cgroups, cut, f);
    }
    if let Some(h) = &h {
        check_delegated(&mut c, &cfg, h, cgroups, els.as_deref());
        check_overridable(&mut c, &cfg, h, cgroups, facts.as_ref());
        if let Some(u) = walk.as_ref().and_then(|w| w.cut_text(h)) {
            c.add(Mark::Skip, u);
        }
    }
    check_namespace(&mut c);
    // Bridged frames only meet cgtproxy's rules through the forward file's
    // prerouting chain; without it the module is someone else's business.
    let forward = facts.is_some()
        && Live::open(&cfg).is_ok_and(|mut l| l.chain(FORWARD_CHAIN).unwrap_or(false));
    if forward {
        check_br_netfilter(&mut c, Path::new(BRIDGE_SYSCTLS));
    }
    if let Some(h) = &h {
        check_self_capture(&mut c, &cfg, h, facts.as_ref(), els.as_deref());
    }
    check_listener_families(&mut c, facts.as_ref());
    check_listener_caps(&mut c, facts.as_ref());
    Ok(c.finish(mode))
}

/// The chain `cgtproxy-forward.nft` adds (a prerouting hook for the
/// interfaces in `proxy_ifaces`).
const FORWARD_CHAIN: &str = "forward";

impl Checklist {
    /// Prints the list and its summary; returns the exit status.
    fn finish(self, mode: Mode) -> i32 {
        let summary = match (self.failures, self.warnings) {
            (0, 0) => "all checks passed".to_string(),
            (f, w) => format!(
                "{f} failure{}, {w} warning{}",
                if f == 1 { "" } else { "s" },
                if w == 1 { "" } else { "s" }
            ),
        };
        println!("{}{summary}", self.lines);
        exit_status(self.worst, mode.strict)
    }
}

/// A failure fails; a warning only with `--strict`.
fn exit_status(worst: Mark, strict: bool) -> i32 {
    match worst {
        Mark::Fail => 1,
        Mark::Warn if strict => 1,
        _ => 0,
    }
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
                    "{}: load nft/cgtproxy.nft (nft -f /usr/share/cgtproxy/cgtproxy.nft)",
                    refusal::table_missing(&cfg.table)
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
            let dump = live.rs.dump().ok().flatten();
            if let Some(d) = &dump {
                check_filled(c, &live.rs.verdicts.map, reconcile::filled(&d.numbers));
            }
            els = dump.map(|d| d.elements);
            let n = els.as_ref().map_or("? elements".to_string(), |e| {
                format!("{} elements", e.len())
            });
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
                "{} — load nft/cgtproxy.nft, or fix \"map\" in {}",
                refusal::map_missing(&MapRef {
                    table: cfg.table.clone(),
                    map: cfg.map.clone(),
                }),
                cfg.source
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
                "{} — load nft/cgtproxy.nft, or fix \"verdict-map\" in {}",
                refusal::map_missing(&MapRef {
                    table: cfg.table.clone(),
                    map: cfg.verdict_map.clone(),
                }),
                cfg.source
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
                refusal::chain_missing(
                    chain,
                    &format!("named by rules[{rule}].target"),
                    &cfg.table,
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
            check_resolver(c, &rules);
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

/// The flag `0 : drop` in `verdicts`: until a daemon's full sync has
/// written it, the ruleset records no connection `direct` (and in strict
/// mode drops new ones). Normal before the first start; not while a daemon
/// runs.
fn check_filled(c: &mut Checklist, verdicts: &str, filled: bool) {
    if filled {
        c.add(
            Mark::Ok,
            format!("maps filled (map {verdicts} holds the flag {FILLED} : drop)"),
        );
    } else {
        c.add(
            Mark::Ok,
            format!(
                "maps not yet filled (map {verdicts} has no flag {FILLED} : drop): no daemon has synced them since the ruleset was loaded; connections opened until then are decided again, and in strict mode new ones are dropped"
            ),
        );
    }
}

/// The DNS hijack (nft/cgtproxy-dns.nft) sends proxied programs' queries
/// to a local port. One that any user may bind lets whoever binds it while
/// the resolver is down answer other users' queries.
fn check_resolver(c: &mut Checklist, rules: &[nftables::Rule]) {
    let ports = nat_ports(rules, "dns");
    if ports.is_empty() {
        return;
    }
    let start: Option<u16> =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok());
    let Some(start) = start else {
        c.add(
            Mark::Skip,
            "net.ipv4.ip_unprivileged_port_start: unreadable; cannot tell who may bind the DNS resolver's port",
        );
        return;
    };
    for p in ports {
        if p >= start {
            c.add(
                Mark::Warn,
                format!(
                    "the DNS hijack sends queries to port {p}, which any user may bind (net.ipv4.ip_unprivileged_port_start = {start}): while the resolver is down, a local user could answer other users' proxied queries; use a port below {start} (CGTPROXY_RESOLVER_PORT, default 53)"
                ),
            );
        } else {
            c.add(
                Mark::Ok,
                format!("the DNS hijack's resolver port {p} is privileged (below {start})"),
            );
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

/// Per rule, how many live cgroups it decides now (the first matching rule
/// decides). A rule that decides none is a warning: a typo in an app ID or
/// unit name, an app not running, or an earlier rule that takes them all.
fn check_rule_counts(c: &mut Checklist, cfg: &Config, h: &Hierarchy, cgroups: &[(PathBuf, u64)]) {
    let mut decides = vec![0usize; cfg.rules.len()];
    // Per rule, the earlier rule that took the most of its cgroups.
    let mut shadowed: Vec<BTreeMap<usize, usize>> = vec![BTreeMap::new(); cfg.rules.len()];
    for (dir, _) in cgroups {
        let Some(p) = h.rules_path(dir) else { continue };
        let p = match_form(&p);
        let Some((first, _)) = cfg.matching_rule(&p) else {
            continue;
        };
        decides[first] += 1;
        for (later, s) in shadowed.iter_mut().enumerate().skip(first + 1) {
            if decides[later] == 0 && cfg.selects(later, &p) {
                *s.entry(first).or_default() += 1;
            }
        }
    }
    for (i, r) in cfg.rules.iter().enumerate() {
        let n = decides[i];
        let what = r.describe(i);
        if n > 0 {
            let s = if n == 1 { "" } else { "s" };
            c.add(Mark::Ok, format!("{what}: {n} live cgroup{s}"));
            continue;
        }
        let why = match shadowed[i].iter().max_by_key(|(_, n)| **n) {
            Some((j, _)) => format!("every cgroup it selects is taken by rules[{j}] before it; move it up"),
            None => "it selects no cgroup now (is the app running? is the name right? `cgtproxy apps` lists what runs)".to_string(),
        };
        c.add(Mark::Warn, format!("{what}: 0 live cgroups: {why}"));
    }
}

/// Elements with a confining verdict (drop, or a chain other than direct)
/// on cgroups at or below a subtree delegated to a user: that user's
/// processes can move themselves out of the verdict (contract §3).
fn check_delegated(
    c: &mut Checklist,
    cfg: &Config,
    h: &Hierarchy,
    cgroups: &[(PathBuf, u64)],
    els: Option<&[Element]>,
) {
    let Some(els) = els else { return };
    let confining: HashMap<u64, &Verdict> = els
        .iter()
        .filter(|e| !matches!(&e.verdict, Verdict::Goto(ch) if ch == "direct"))
        .map(|e| (e.id, &e.verdict))
        .collect();
    // uid -> (count, an example)
    let mut by_uid: BTreeMap<u32, (usize, String)> = BTreeMap::new();
    for (dir, id) in cgroups {
        if !confining.contains_key(id) {
            continue;
        }
        let steps = lineage(h, cfg, dir);
        if let Some((a, uid)) = super::explain::delegated_above(&steps, 1) {
            let e = by_uid.entry(uid).or_insert((0, h.name(&a.dir)));
            e.0 += 1;
        }
    }
    for (uid, (n, example)) in by_uid {
        c.add(
            Mark::Warn,
            format!(
                "{n} listed cgroup{} with a drop or proxy verdict {} in a subtree delegated to uid {uid} ({example}): that user's processes can move themselves out of the verdict",
                if n == 1 { "" } else { "s" },
                if n == 1 { "is" } else { "are" }
            ),
        );
    }
}

/// The levels the contract has the shipped ruleset look up (16 to 1), for
/// when the live ruleset cannot be read.
const MAX_LEVELS: usize = 16;

/// User-owned cgroups where a rule that is not final decides: their owner
/// can create a child that a more permissive rule lists (a
/// `cgtproxy-direct.slice` inside a proxied scope) and move into it. One
/// warning per uid and rule. Only cgroups above the deepest level the
/// ruleset looks up count (a child below it gets no lookup of its own),
/// which also bounds each lineage.
fn check_overridable(
    c: &mut Checklist,
    cfg: &Config,
    h: &Hierarchy,
    cgroups: &[(PathBuf, u64)],
    facts: Option<&Facts>,
) {
    if !(0..cfg.rules.len()).any(|i| cfg.overridable(i).is_some()) {
        return;
    }
    let none = Facts::default();
    let f = facts.unwrap_or(&none);
    let deepest = f.levels.last().map_or(MAX_LEVELS, |&l| l as usize);
    // (uid, rule) -> (count, an example, the wider rule)
    let mut found: BTreeMap<(u32, usize), (usize, String, usize)> = BTreeMap::new();
    for (dir, _) in cgroups {
        if h.level(dir).is_none_or(|l| l >= deepest) {
            continue;
        }
        // A cgroup removed meanwhile is simply not there.
        match std::fs::metadata(dir) {
            Ok(m) if m.uid() != 0 => {}
            _ => continue,
        }
        let steps = lineage(h, cfg, dir);
        if let Some(o) = super::explain::overridable_by(cfg, h, &steps, f) {
            let e = found
                .entry((o.uid, o.rule))
                .or_insert((0, h.name(dir), o.wider));
            e.0 += 1;
        }
    }
    for ((uid, rule), (n, example, wider)) in found {
        c.add(
            Mark::Warn,
            format!(
                "uid {uid} owns {n} cgroup{} that {} decides ({example}{}) and can give {} a more permissive verdict (a cgroup it creates there that rules[{wider}] lists gets {}): add \"final\": true to rules[{rule}], or run it in a root-owned cgroup",
                if n == 1 { "" } else { "s" },
                cfg.rules[rule].describe(rule),
                if n == 1 { "" } else { ", ..." },
                if n == 1 { "it" } else { "them" },
                cfg.rules[wider].target,
            ),
        );
    }
}

/// How many cgroups `check` looks at one level below the walk (the
/// cgroups there are named by readdir alone, no stat each).
const DEPTH_PROBE: usize = 4096;

/// Cgroups a rule lists deeper than the deepest level the ruleset looks up
/// never get their own element used. The walk stops at that level, so the
/// cgroups one level below it (children of `cut`, the walked cgroups that
/// have any) are probed by name, at most [`DEPTH_PROBE`] of them; deeper
/// ones are not looked at.
fn check_depth(
    c: &mut Checklist,
    cfg: &Config,
    h: &Hierarchy,
    cgroups: &[(PathBuf, u64)],
    cut: &[PathBuf],
    f: &Facts,
) {
    let Some(&max) = f.levels.last() else { return };
    let mut deep: Vec<String> = Vec::new();
    let mut listed = |dir: &Path| {
        if let Some(p) = h.rules_path(dir)
            && cfg.verdict(&match_form(&p)).is_some()
        {
            deep.push(cgroup::display(&p));
        }
    };
    for (dir, _) in cgroups {
        if h.level(dir).is_some_and(|l| l > max as usize) {
            listed(dir);
        }
    }
    let mut probed = 0;
    'probe: for d in cut {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if probed == DEPTH_PROBE {
                break 'probe;
            }
            probed += 1;
            listed(&e.path());
        }
    }
    if !deep.is_empty() {
        deep.sort_unstable();
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

/// The bridge sysctls that are on, read from `dir` (the namespace's
/// `/proc/sys/net/bridge`); `None` when the directory does not exist, i.e.
/// `br_netfilter` is not loaded.
fn bridge_calls(dir: &Path) -> Option<Vec<&'static str>> {
    if !dir.is_dir() {
        return None;
    }
    Some(
        ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"]
            .into_iter()
            .filter(|f| std::fs::read_to_string(dir.join(f)).is_ok_and(|s| s.trim() == "1"))
            .collect(),
    )
}

fn check_br_netfilter(c: &mut Checklist, dir: &Path) {
    match bridge_calls(dir) {
        None => c.add(Mark::Ok, "br_netfilter: not loaded"),
        Some(on) if on.is_empty() => c.add(
            Mark::Ok,
            "br_netfilter: loaded, bridge-nf-call-ip(6)tables off",
        ),
        Some(on) => c.add(
            Mark::Warn,
            format!(
                "br_netfilter: net.bridge.{} = 1: bridged frames (containers, VMs) pass the IP hooks and conntrack, where the forward chain can take them for the proxy by interface; cgtproxy never steers them by cgroup. Set to 0 unless something needs it",
                on.join(" and ")
            ),
        ),
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
            out.insert(pid, super::status::shown(comm.trim_end()));
        }
    }
    out
}

/// The TPROXY port of the live ruleset, or the shipped default.
fn tproxy_port(facts: Option<&Facts>) -> u16 {
    facts
        .and_then(|f| f.tproxy_ports.iter().next().copied())
        .unwrap_or(DEFAULT_TPROXY_PORT)
}

/// Local addresses of `/proc/net/{tcp,udp}{,6}` entries on `port` that
/// listen (TCP) or are bound (UDP): (hex address, inode).
fn bound_on(text: &str, port: u16, tcp: bool) -> Vec<(String, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.rsplit_once(':')?;
            let p = u16::from_str_radix(p, 16).ok()?;
            let listening = !tcp || *f.get(3)? == "0A";
            let inode: u64 = f.get(9)?.parse().ok()?;
            (p == port && listening && inode != 0).then(|| (addr.to_string(), inode))
        })
        .collect()
}

/// Which of the four (protocol, family) pairs the ruleset sends to the
/// listener (TCP and UDP to 127.0.0.1 and ::1) something takes: a socket
/// on the loopback address or the wildcard; for IPv4 also an IPv6
/// wildcard socket when `bindv6only` is 0 (dual-stack, as most proxies
/// open `::`; whether one set IPV6_V6ONLY cannot be seen from /proc).
fn families_taken(net: &dyn Fn(&str) -> String, port: u16, dual_default: bool) -> [[bool; 2]; 2] {
    const V4: [&str; 2] = ["0100007F", "00000000"];
    const V6_LO: &str = "00000000000000000000000001000000";
    const V6_ANY: &str = "00000000000000000000000000000000";
    let mut out = [[false; 2]; 2];
    for (i, (v4, v6, tcp)) in [("tcp", "tcp6", true), ("udp", "udp6", false)]
        .into_iter()
        .enumerate()
    {
        let four = bound_on(&net(v4), port, tcp);
        let six = bound_on(&net(v6), port, tcp);
        out[i][0] = four.iter().any(|(a, _)| V4.contains(&a.as_str()))
            || (dual_default && six.iter().any(|(a, _)| a == V6_ANY));
        out[i][1] = six.iter().any(|(a, _)| a == V6_LO || a == V6_ANY);
    }
    out
}

/// The ruleset sends TCP and UDP of both families to the listener and drops
/// what it cannot take there: a listener on one family (or protocol) only
/// means apps lose the other, silently. Warn, naming what is missing.
fn check_listener_families(c: &mut Checklist, facts: Option<&Facts>) {
    let port = tproxy_port(facts);
    let net = |f: &str| std::fs::read_to_string(format!("/proc/net/{f}")).unwrap_or_default();
    if listeners(port).is_empty() {
        return; // check_self_capture says nothing listens
    }
    let dual =
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "0");
    let t = families_taken(&net, port, dual);
    let mut missing = Vec::new();
    for (i, proto) in ["TCP", "UDP"].iter().enumerate() {
        for (j, fam) in [("IPv4", "127.0.0.1"), ("IPv6", "::1")].iter().enumerate() {
            if !t[i][j] {
                missing.push(format!("{proto} {} ({})", fam.0, fam.1));
            }
        }
    }
    if missing.is_empty() {
        c.add(
            Mark::Ok,
            format!("the listener on port {port} takes TCP and UDP, IPv4 and IPv6"),
        );
    } else {
        c.add(
            Mark::Warn,
            format!(
                "nothing on port {port} takes {}: the ruleset drops what the listener cannot take, so proxied apps lose it; let the proxy listen on 127.0.0.1 and ::1 (or ::), TCP and UDP",
                missing.join(", ")
            ),
        );
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

/// `CapEff` of a `/proc/PID/status`.
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// TPROXY hands packets only to sockets with IP_TRANSPARENT, which takes
/// CAP_NET_ADMIN (or CAP_NET_RAW) to set; a proxy without it usually goes
/// on without the option and every proxied packet is black-holed. The
/// capabilities now are a proxy for what it had when it set the option.
fn check_listener_caps(c: &mut Checklist, facts: Option<&Facts>) {
    let port = tproxy_port(facts);
    for (pid, comm) in holders(&listeners(port)) {
        let Some(eff) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .as_deref()
            .and_then(cap_eff)
        else {
            continue; // gone meanwhile
        };
        let has = |cap: u32| eff & (1u64 << cap) != 0;
        if has(CAP_NET_ADMIN) || has(CAP_NET_RAW) {
            c.add(
                Mark::Ok,
                format!("the proxy (pid {pid} {comm}, port {port}) has CAP_NET_ADMIN or CAP_NET_RAW for IP_TRANSPARENT"),
            );
        } else {
            c.add(
                Mark::Warn,
                format!(
                    "the proxy (pid {pid} {comm}, port {port}) has neither CAP_NET_ADMIN nor CAP_NET_RAW (CapEff {eff:x}): without IP_TRANSPARENT, which needs one, TPROXY finds no socket and proxied traffic vanishes; give it AmbientCapabilities=CAP_NET_ADMIN (systemd) or setcap cap_net_admin+ep"
                ),
            );
        }
    }
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
    // Rulesets before 0.3 exempted the proxy's mark; the shipped one
    // exempts nothing (a process with CAP_NET_RAW could use it to escape)
    // and drops what carries it from a `proxy` cgroup.
    let exempt = match f.proxy_mark {
        Some(m) => format!("unless it marks them with {m} (SO_MARK; CGTPROXY_PROXY_MARK)"),
        None => {
            "(or are dropped, when they carry the proxy mark: the ruleset exempts no mark from `proxy`)".into()
        }
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
                "rules[{i}] {} sends {} to {}",
                cfg.rules[i].form,
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

/// The mark the config routes against the ruleset's, and the policy
/// routing as the kernel has it now, per family: the rule at our priority,
/// the route, and every rule that precedes ours (each could take a marked
/// packet first, a VPN client's for instance).
fn check_routing(c: &mut Checklist, cfg: &Config, facts: Option<&Facts>) {
    let live = facts.and_then(|f| f.tproxy_mark);
    let Some(route) = cfg.route else {
        if let Some(m) = live {
            match crate::route::routes_mark(m) {
                Ok(true) => c.add(
                    Mark::Ok,
                    format!("route is false; a policy rule of someone else routes mark {m}"),
                ),
                Ok(false) => c.add(
                    Mark::Warn,
                    format!("route is false and no policy rule routes mark {m}: proxied traffic is dropped until one does"),
                ),
                Err(e) => c.add(Mark::Fail, e.to_string()),
            }
        }
        return;
    };
    let mark = match (route.mark, live) {
        (Some(r), Some(m)) if r != m => {
            c.add(
                Mark::Fail,
                format!(
                    "route.mark {r} differs from the mark the ruleset's TPROXY rules match ({m}): the daemon refuses to start; make CGTPROXY_MARK and route.mark equal, or drop route.mark"
                ),
            );
            return;
        }
        (Some(m), Some(_)) => {
            c.add(
                Mark::Ok,
                format!("route.mark {m} is the mark the TPROXY rules match"),
            );
            m
        }
        (None, Some(m)) => {
            c.add(
                Mark::Ok,
                format!("routing mark {m}, taken from the ruleset's TPROXY rules"),
            );
            m
        }
        (m, None) => {
            let m = m.unwrap_or(crate::config::DEFAULT_MARK);
            if facts.is_some() {
                c.add(
                    Mark::Warn,
                    format!("no TPROXY mark recognised in the ruleset; routing mark {m}"),
                );
            }
            m
        }
    };
    let p = crate::route::Policy {
        mark,
        table: route.table,
        priority: route.priority,
    };
    let daemon = crate::instance::owner(&crate::instance::name(&cfg.table, &cfg.map));
    let states = match crate::route::state(&p) {
        Ok(s) => s,
        Err(e) => {
            c.add(Mark::Fail, e.to_string());
            return;
        }
    };
    for s in states {
        let name = s.name;
        if s.disabled {
            c.add(
                Mark::Ok,
                format!("{name} is disabled: no {name} routing needed"),
            );
            continue;
        }
        let what = format!(
            "{name} rule priority {} fwmark {} lookup {} and route local default dev lo table {}",
            p.priority, p.mark, p.table, p.table
        );
        match (s.rule, s.route) {
            (true, true) => c.add(Mark::Ok, format!("{what}: in place")),
            // Never started here (a stop leaves them): the daemon installs them.
            (false, false) if daemon.is_none() => c.add(
                Mark::Skip,
                format!("{what}: not installed yet (no daemon runs; it installs them at start)"),
            ),
            (rule, route) => c.add(
                Mark::Fail,
                format!(
                    "{what}: {} missing (the daemon puts it back while it runs; proxied traffic is dropped meanwhile)",
                    match (rule, route) {
                        (false, false) => "both",
                        (false, true) => "the rule",
                        _ => "the route",
                    }
                ),
            ),
        }
        for r in &s.ahead {
            c.add(
                Mark::Warn,
                format!("{name} rule {r} precedes ours (priority {}): it may route marked packets elsewhere", p.priority),
            );
        }
        for r in &s.others {
            c.add(
                Mark::Warn,
                format!("{name} rule {r} routes our mark at another priority (left by an older version or by hand?)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checklist() -> Checklist {
        Checklist {
            lines: String::new(),
            worst: Mark::Ok,
            warnings: 0,
            failures: 0,
        }
    }

    #[test]
    fn warnings_pass_unless_strict() {
        for (worst, plain, strict) in [
            (Mark::Ok, 0, 0),
            (Mark::Skip, 0, 0),
            (Mark::Warn, 0, 1),
            (Mark::Fail, 1, 1),
        ] {
            assert_eq!(exit_status(worst, false), plain, "{worst:?}");
            assert_eq!(exit_status(worst, true), strict, "{worst:?} --strict");
        }
    }

    /// Both branches of the br_netfilter detection, from a directory that
    /// stands in for /proc/sys/net/bridge.
    #[test]
    fn br_netfilter_detection() {
        let dir = std::env::temp_dir().join(format!(
            "cgtproxy-bridge-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = checklist();
        check_br_netfilter(&mut c, &dir);
        assert_eq!(c.lines, "ok    br_netfilter: not loaded\n");
        assert_eq!(c.worst, Mark::Ok);

        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bridge-nf-call-iptables"), "0\n").unwrap();
        std::fs::write(dir.join("bridge-nf-call-ip6tables"), "0\n").unwrap();
        let mut c = checklist();
        check_br_netfilter(&mut c, &dir);
        assert_eq!(
            c.lines,
            "ok    br_netfilter: loaded, bridge-nf-call-ip(6)tables off\n"
        );

        std::fs::write(dir.join("bridge-nf-call-ip6tables"), "1\n").unwrap();
        let mut c = checklist();
        check_br_netfilter(&mut c, &dir);
        assert!(
            c.lines
                .starts_with("WARN  br_netfilter: net.bridge.bridge-nf-call-ip6tables = 1:"),
            "{}",
            c.lines
        );
        assert_eq!((c.worst, c.warnings), (Mark::Warn, 1));

        std::fs::write(dir.join("bridge-nf-call-iptables"), "1\n").unwrap();
        let mut c = checklist();
        check_br_netfilter(&mut c, &dir);
        assert!(
            c.lines.starts_with(
                "WARN  br_netfilter: net.bridge.bridge-nf-call-iptables and bridge-nf-call-ip6tables = 1:"
            ),
            "{}",
            c.lines
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listener_families_and_caps() {
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let tcp4 = format!(
            "{head}   0: 0100007F:1ED5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1\n"
        );
        let udp4 = format!(
            "{head}   0: 0100007F:1ED5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12 2\n"
        );
        let tcp6_any = format!(
            "{head}   0: 00000000000000000000000000000000:1ED5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13 1\n"
        );
        let tcp6_lo = format!(
            "{head}   0: 00000000000000000000000001000000:1ED5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 14 1\n"
        );
        let files = |t4: &str, t6: &str, u4: &str, u6: &str| {
            let (t4, t6, u4, u6) = (
                t4.to_string(),
                t6.to_string(),
                u4.to_string(),
                u6.to_string(),
            );
            move |f: &str| match f {
                "tcp" => t4.clone(),
                "tcp6" => t6.clone(),
                "udp" => u4.clone(),
                _ => u6.clone(),
            }
        };
        // v4 only, TCP and UDP
        let n = files(&tcp4, head, &udp4, head);
        assert_eq!(
            families_taken(&n, 7893, true),
            [[true, false], [true, false]]
        );
        // TCP on :: (dual-stack by default), no UDP
        let n = files(head, &tcp6_any, head, head);
        assert_eq!(
            families_taken(&n, 7893, true),
            [[true, true], [false, false]]
        );
        assert_eq!(
            families_taken(&n, 7893, false),
            [[false, true], [false, false]]
        );
        // ::1 alone does not take IPv4; another port takes nothing
        let n = files(head, &tcp6_lo, head, head);
        assert_eq!(
            families_taken(&n, 7893, true),
            [[false, true], [false, false]]
        );
        assert_eq!(
            families_taken(&n, 80, true),
            [[false, false], [false, false]]
        );
        assert_eq!(
            cap_eff("Name:\tx\nCapEff:\t0000000000001000\n"),
            Some(1 << CAP_NET_ADMIN)
        );
        assert_eq!(cap_eff("CapEff:\tzz\n"), None);
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
}
