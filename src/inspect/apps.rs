//! `cgtproxy apps`: every app instance, service and container that has
//! processes now, named as a user knows it, with the verdict the kernel
//! applies to it and what decides that. Read-only, like the other
//! inspect commands: cgroupfs, /proc and a dump of the maps.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::explain::{Step, deciding, lineage};
use super::rules::{Facts, analyse};
use super::status::json_str;
use super::table::{self, Align};
use super::{Hierarchy, Live, load};
use crate::config::{Config, Verdict, match_form};
use crate::error::Error;
use crate::options::Options;
use crate::reconcile::Element;
use crate::selector::{Named, name_of, user_of};

/// How often `--watch` refreshes.
const INTERVAL: Duration = Duration::from_secs(1);
/// PIDs listed per cgroup in JSON (the count is always exact).
const MAX_PIDS: usize = 64;

/// What a populated cgroup is, for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Named(Named),
    /// Not named by any launcher or manager: its path.
    Cgroup,
}

#[derive(Debug, Clone)]
struct Row {
    kind: Kind,
    /// The path rules see, in the match form (`cgroup::escape`).
    path: String,
    id: u64,
    pids: Vec<u32>,
    npids: usize,
    /// /proc/PID/comm of the first process.
    process: String,
    /// The element the kernel uses: its cgroup's path and id, whether it
    /// is the cgroup's own, and its verdict and counters.
    decider: Option<Decider>,
    /// The map cannot be read: the verdict is unknown.
    unknown: bool,
}

#[derive(Debug, Clone)]
struct Decider {
    path: String,
    id: u64,
    own: bool,
    verdict: Verdict,
    counter: Option<(u64, u64)>,
    /// The rule that lists the deciding cgroup now.
    rule: Option<usize>,
}

/// What a cgroup is called: a container anywhere on its lineage wins (the
/// container's own units are part of it); otherwise the deepest app or
/// non-slice unit; otherwise the deepest slice.
fn classify(path: &str) -> Kind {
    let user = user_of(path);
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let named: Vec<Named> = comps.iter().filter_map(|c| name_of(c, user)).collect();
    // Docker's cgroupfs driver: /docker/<id>, no scope.
    if let Some(w) = comps.windows(2).find(|w| {
        w[0] == "docker" && w[1].len() == 64 && w[1].bytes().all(|b| b.is_ascii_hexdigit())
    }) {
        return Kind::Named(Named::Container {
            id: w[1].to_string(),
            manager: "docker",
        });
    }
    if let Some(c) = named.iter().find(|n| matches!(n, Named::Container { .. })) {
        return Kind::Named(c.clone());
    }
    let is_slice = |n: &Named| matches!(n, Named::Unit { name, .. } if name.ends_with(".slice"));
    // The user's manager (user@UID.service) is the parent of its units,
    // not their name.
    let is_manager = |n: &Named| matches!(n, Named::Unit { name, .. } if name.starts_with("user@") && name.ends_with(".service"));
    let leaf = comps.last().and_then(|c| name_of(c, user));
    if let Some(n) = named
        .iter()
        .rev()
        .find(|n| !(is_slice(n) || (is_manager(n) && leaf.as_ref() != Some(*n))))
    {
        return Kind::Named(n.clone());
    }
    match named.last() {
        Some(n) => Kind::Named(n.clone()),
        None => Kind::Cgroup,
    }
}

/// PIDs of a cgroup's own processes (none: not listed).
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

struct Snapshot {
    rows: Vec<Row>,
    map_error: Option<String>,
    /// What the walk did not read (cgroups below the deepest level).
    unwalked: Option<String>,
}

/// The populated cgroups below the walk (below `cut`, the walked cgroups
/// at `limit` levels under the root that have children), found from the
/// processes' side: one read of `/proc/PID/cgroup` per process, grouped by
/// cgroup, so a chain thousands deep costs nothing unless processes run
/// in it, and then one stat each (its id: 0 when its path is longer than
/// PATH_MAX). Only cgroups whose ancestor at the limit is in `cut` count.
fn below_the_walk(h: &Hierarchy, cut: &[PathBuf], limit: usize) -> Vec<(PathBuf, u64, Vec<u32>)> {
    let Some(base) = h.level(&h.root) else {
        return Vec::new();
    };
    let cut: std::collections::HashSet<&Path> = cut.iter().map(PathBuf::as_path).collect();
    let mut by_dir: std::collections::BTreeMap<PathBuf, Vec<u32>> = Default::default();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process that ended meanwhile is simply not there.
        let Ok(dir) = h.dir_of_pid(pid) else { continue };
        let Some(below) = h.level(&dir).and_then(|l| l.checked_sub(base + limit)) else {
            continue;
        };
        if below > 0 && dir.ancestors().nth(below).is_some_and(|a| cut.contains(a)) {
            by_dir.entry(dir).or_default().push(pid);
        }
    }
    by_dir
        .into_iter()
        .map(|(d, mut pids)| {
            pids.sort_unstable();
            let id = crate::cgroup::id_of(&d).unwrap_or(0);
            (d, id, pids)
        })
        .collect()
}

/// The deepest level `deciding` can pick (the ruleset's deepest lookup,
/// or the contract's 16 when the ruleset could not be read).
fn deepest(facts: &Facts) -> usize {
    facts.levels.last().map_or(16, |&l| l as usize)
}

/// How many cgroups a snapshot reads between looks at `stop`.
const STOP_EVERY: usize = 256;

/// One frame. Per populated cgroup the work is bounded: its lineage is
/// taken from its ancestor at the deepest looked-up level (a deeper
/// element is never used by the kernel), so a hostile chain thousands deep
/// costs no more per cgroup than one 16 deep. `stop` is asked every
/// [`STOP_EVERY`] cgroups; when it says so the frame ends early (`None`).
fn snapshot(
    cfg: &Config,
    h: &Hierarchy,
    live: Option<&mut Live>,
    facts: &Facts,
    stop: &dyn Fn() -> bool,
) -> Option<Snapshot> {
    let (els, map_error) = match live.map(|l| l.elements(cfg)) {
        Some(Ok(e)) => (e, None),
        Some(Err(e)) => (Vec::new(), Some(e.to_string())),
        None => (Vec::new(), Some("the map cannot be read".to_string())),
    };
    let by_id: HashMap<u64, &Element> = els.iter().map(|e| (e.id, e)).collect();
    let mut rows = Vec::new();
    let deepest = deepest(facts);
    let mut walk = h.walk(facts.levels.last().copied());
    let unwalked = walk.cut_text(h);
    let mut populated: Vec<(PathBuf, u64, Vec<u32>)> = Vec::new();
    for (n, (dir, id)) in std::mem::take(&mut walk.cgroups).into_iter().enumerate() {
        if n % STOP_EVERY == STOP_EVERY - 1 && stop() {
            return None;
        }
        let pids = procs(&dir);
        if !pids.is_empty() {
            populated.push((dir, id, pids));
        }
    }
    if !walk.cut.is_empty() {
        populated.extend(below_the_walk(h, &walk.cut, walk.limit));
    }
    for (dir, id, pids) in populated {
        let Some(p) = h.rules_path(&dir) else {
            continue;
        };
        // Named from the raw name (systemd's `\x2d` is one backslash there);
        // shown and matched in the match form (where it is `\\x2d`).
        let raw = String::from_utf8_lossy(&p).into_owned();
        let path = match_form(&p).into_owned();
        let decider = if map_error.is_none() {
            let below = h.level(&dir).map_or(0, |l| l.saturating_sub(deepest));
            let anchor = dir.ancestors().nth(below).unwrap_or(&dir);
            let steps: Vec<Step> = lineage(h, cfg, anchor);
            deciding(&steps, &by_id, facts).map(|(st, v)| {
                let el = st.id.and_then(|i| by_id.get(&i));
                Decider {
                    path: h
                        .rules_path(&st.dir)
                        .map(|p| match_form(&p).into_owned())
                        .unwrap_or_else(|| h.name(&st.dir)),
                    id: st.id.unwrap_or(0),
                    own: st.dir == dir,
                    verdict: v.clone(),
                    counter: el.and_then(|e| e.counter),
                    rule: st.rule,
                }
            })
        } else {
            None
        };
        let npids = pids.len();
        rows.push(Row {
            kind: classify(&raw),
            process: comm(pids[0]),
            pids: pids.into_iter().take(MAX_PIDS).collect(),
            npids,
            path,
            id,
            decider,
            unknown: map_error.is_some(),
        });
    }
    rows.sort_unstable_by(|a, b| {
        (kind_order(&a.kind), &a.path).cmp(&(kind_order(&b.kind), &b.path))
    });
    Some(Snapshot {
        rows,
        map_error,
        unwalked,
    })
}

fn kind_order(k: &Kind) -> u8 {
    match k {
        Kind::Named(Named::App { .. }) => 0,
        Kind::Named(Named::Container { .. }) => 1,
        Kind::Named(Named::Unit { .. }) => 2,
        Kind::Cgroup => 3,
    }
}

fn name_text(r: &Row) -> String {
    match &r.kind {
        Kind::Named(n) => {
            let mut s = n.label();
            if let Named::App { user: Some(u), .. } | Named::Unit { user: Some(u), .. } = n {
                let _ = write!(s, " user {u}");
            }
            s
        }
        Kind::Cgroup => format!("cgroup {}", r.path),
    }
}

fn verdict_text(r: &Row) -> String {
    match (&r.decider, r.unknown) {
        (_, true) => "?".into(),
        (Some(d), _) => d.verdict.to_string(),
        (None, _) => "none".into(),
    }
}

fn by_text(r: &Row) -> String {
    match &r.decider {
        None if r.unknown => "?".into(),
        None => "-".into(),
        Some(d) => {
            let rule = d
                .rule
                .map_or("element".to_string(), |i| format!("rules[{i}]"));
            if d.own {
                rule
            } else {
                format!("{rule} on {}", d.path)
            }
        }
    }
}

fn process_text(r: &Row) -> String {
    let first = r.pids.first().copied().unwrap_or(0);
    let comm = super::status::shown(&r.process);
    match r.npids {
        0 | 1 => format!("{first} {comm}"),
        n => format!("{first} {comm} +{}", n - 1),
    }
}

/// Per second, from a difference over `dt`, as an integer (no float
/// printing in the binary).
fn per_second(delta: u64, dt: Duration) -> u64 {
    let ms = dt.as_millis().max(1) as u64;
    delta.saturating_mul(1000) / ms
}

fn rate_text(bps: u64) -> String {
    match bps {
        0..10_000 => format!("{bps} B/s"),
        10_000..10_000_000 => format!("{} kB/s", bps / 1000),
        _ => format!("{} MB/s", bps / 1_000_000),
    }
}

/// The rates of each deciding element since the last frame.
type Rates = HashMap<u64, (u64, u64)>;

fn num(x: Option<u64>) -> String {
    x.map_or("-".into(), |x| x.to_string())
}

fn table_text(s: &Snapshot, rates: Option<&Rates>) -> String {
    let mut head = vec!["VERDICT", "BY", "PACKETS", "BYTES"];
    let mut align = vec![Align::Left, Align::Left, Align::Right, Align::Right];
    if rates.is_some() {
        head.push("RATE");
        align.push(Align::Right);
    }
    head.extend(["PROCESS", "NAME"]);
    align.extend([Align::Left, Align::Left]);
    let rows: Vec<Vec<String>> = s
        .rows
        .iter()
        .map(|r| {
            let c = r.decider.as_ref().and_then(|d| d.counter);
            let mut v = vec![
                verdict_text(r),
                by_text(r),
                num(c.map(|c| c.0)),
                num(c.map(|c| c.1)),
            ];
            if let Some(rates) = rates {
                v.push(
                    r.decider
                        .as_ref()
                        .and_then(|d| rates.get(&d.id))
                        .map_or("-".into(), |(_, b)| rate_text(*b)),
                );
            }
            v.push(process_text(r));
            v.push(name_text(r));
            v
        })
        .collect();
    let mut out = table::render("", &head, &align, &rows);
    if let Some(e) = &s.map_error {
        let _ = writeln!(out, "verdicts unknown: {e}");
    }
    if s.rows.is_empty() {
        out.push_str("(no cgroup below the cgroup root has processes)\n");
    }
    if let Some(u) = &s.unwalked {
        let _ = writeln!(out, "{u}; their processes are listed from /proc");
    }
    out
}

fn opt_json(s: Option<&str>) -> String {
    s.map_or("null".into(), json_str)
}

fn opt_num(x: Option<u64>) -> String {
    x.map_or("null".into(), |x| x.to_string())
}

/// The rule form that selects the row, as a JSON object.
fn select_json(k: &Kind, path: &str) -> String {
    match k {
        Kind::Named(Named::App { id, user, .. }) => match user {
            Some(u) => format!("{{\"app\":{},\"user\":{u}}}", json_str(id)),
            None => format!("{{\"app\":{}}}", json_str(id)),
        },
        Kind::Named(Named::Unit { name, user }) => match user {
            Some(u) => format!("{{\"unit\":{},\"user\":{u}}}", json_str(name)),
            None => format!("{{\"unit\":{}}}", json_str(name)),
        },
        Kind::Named(Named::Container { id, .. }) => {
            format!("{{\"container\":{}}}", json_str(id))
        }
        Kind::Cgroup => format!("{{\"match\":{}}}", json_str(&regex_lite::escape(path))),
    }
}

/// One line: `{"apps":[...],"map","table"}`, keys sorted. With rates
/// (`--watch --json`), each app also has `bytes_per_s` and `packets_per_s`.
fn json_text(cfg: &Config, s: &Snapshot, rates: Option<&Rates>) -> String {
    let mut out = String::from("{\"apps\":[");
    for (i, r) in s.rows.iter().enumerate() {
        let (kind, name, launcher, user) = match &r.kind {
            Kind::Named(Named::App { id, launcher, user }) => {
                ("app", id.clone(), launcher.as_deref(), *user)
            }
            Kind::Named(Named::Unit { name, user }) => ("unit", name.clone(), None, *user),
            Kind::Named(Named::Container { id, manager }) => {
                ("container", id.clone(), Some(*manager), None)
            }
            Kind::Cgroup => ("cgroup", r.path.clone(), None, None),
        };
        let d = r.decider.as_ref();
        let (verdict, chain) = match d.map(|d| &d.verdict) {
            None => (None, None),
            Some(Verdict::Drop) => (Some("drop".to_string()), None),
            Some(Verdict::Goto(c)) => (Some("goto".to_string()), Some(c.as_str())),
            Some(v) => (Some(v.to_string()), None),
        };
        let c = d.and_then(|d| d.counter);
        let pids: Vec<String> = r.pids.iter().map(|p| p.to_string()).collect();
        let _ = write!(
            out,
            "{}{{\"bytes\":{},",
            if i == 0 { "" } else { "," },
            opt_num(c.map(|c| c.1))
        );
        if let Some(rates) = rates {
            let rt = d.and_then(|d| rates.get(&d.id));
            let _ = write!(out, "\"bytes_per_s\":{},", opt_num(rt.map(|r| r.1)));
        }
        let _ = write!(
            out,
            "\"cgroup\":{},\"chain\":{},\"decided_by\":{},\"id\":{},\"inherited\":{},\"kind\":{},\"launcher\":{},\"name\":{},\"packets\":{},",
            json_str(&r.path),
            opt_json(chain),
            opt_json(d.map(|d| d.path.as_str())),
            r.id,
            d.map_or("null".into(), |d| (!d.own).to_string()),
            json_str(kind),
            opt_json(launcher),
            json_str(&name),
            opt_num(c.map(|c| c.0)),
        );
        if let Some(rates) = rates {
            let rt = d.and_then(|d| rates.get(&d.id));
            let _ = write!(out, "\"packets_per_s\":{},", opt_num(rt.map(|r| r.0)));
        }
        let _ = write!(
            out,
            "\"pids\":[{}],\"processes\":{},\"process\":{},\"rule\":{},\"select\":{},\"user\":{},\"verdict\":{}}}",
            pids.join(","),
            r.npids,
            json_str(&r.process),
            opt_num(d.and_then(|d| d.rule).map(|i| i as u64)),
            select_json(&r.kind, &r.path),
            opt_num(user.map(u64::from)),
            opt_json(verdict.as_deref()),
        );
    }
    let _ = writeln!(
        out,
        "],\"error\":{},\"map\":{},\"table\":{}}}",
        opt_json(s.map_error.as_deref()),
        json_str(&cfg.map),
        json_str(&cfg.table)
    );
    out
}

/// `cgtproxy apps [--json] [--watch]`. Returns the exit status: 1 when the
/// map cannot be read (the verdicts are then unknown).
pub fn apps(opts: &Options, as_json: bool, watch: bool) -> Result<i32, Error> {
    let (cfg, h) = load(opts)?;
    // Blocked before anything is drawn, so SIGINT ends the loop cleanly.
    let signals = if watch {
        Some(
            crate::signals::Signals::block()
                .map_err(|e| Error::Runtime(format!("signals: {}", crate::error::io(&e))))?,
        )
    } else {
        None
    };
    let mut live = Live::open(&cfg).ok();
    let facts = live
        .as_mut()
        .and_then(|l| l.rules().ok())
        .map(|r| analyse(&r, &cfg.map, &cfg.verdict_map))
        .unwrap_or_default();
    let Some(signals) = signals else {
        // Nothing stops this one, so it always has a frame.
        let Some(s) = snapshot(&cfg, &h, live.as_mut(), &facts, &|| false) else {
            return Ok(0);
        };
        print!(
            "{}",
            if as_json {
                json_text(&cfg, &s, None)
            } else {
                table_text(&s, None)
            }
        );
        return Ok(i32::from(s.map_error.is_some()));
    };
    // SAFETY: isatty only reads the fd's state.
    let tty = !as_json && unsafe { libc::isatty(1) } == 1;
    let mut prev: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut last = Instant::now();
    let start = last;
    let mut first = true;
    loop {
        // A socket that could not be opened (no table yet) is tried again
        // each frame, so a watch started early shows verdicts once it can.
        if live.is_none() {
            live = Live::open(&cfg).ok();
        }
        let began = Instant::now();
        // Ctrl-C is heard within a few hundred cgroups, however big the
        // tree.
        let Some(s) = snapshot(&cfg, &h, live.as_mut(), &facts, &|| {
            !signals.pending().is_empty()
        }) else {
            return Ok(0);
        };
        let now = Instant::now();
        let dt = now - last;
        last = now;
        // Rates since the previous frame, per deciding element; only the
        // elements seen now are kept, so this never grows past the tree.
        let mut counters: HashMap<u64, (u64, u64)> = HashMap::new();
        for d in s.rows.iter().filter_map(|r| r.decider.as_ref()) {
            if let Some(c) = d.counter {
                counters.insert(d.id, c);
            }
        }
        let rates: Rates = counters
            .iter()
            .map(|(id, (p, b))| {
                let (pp, pb) = if first {
                    (*p, *b)
                } else {
                    prev.get(id).copied().unwrap_or((0, 0))
                };
                (
                    *id,
                    (
                        per_second(p.saturating_sub(pp), dt),
                        per_second(b.saturating_sub(pb), dt),
                    ),
                )
            })
            .collect();
        prev = counters;
        let frame = if as_json {
            json_text(&cfg, &s, Some(&rates))
        } else {
            table_text(&s, Some(&rates))
        };
        let text = if tty {
            // Redraw in place: home, each line cleared to its end, then the
            // rest of the screen cleared; one write, so nothing flickers.
            let mut t = String::from(if first { "\x1b[H\x1b[2J" } else { "\x1b[H" });
            let _ = writeln!(
                t,
                "cgtproxy apps: every {}s, rates per second; Ctrl-C ends\x1b[K",
                INTERVAL.as_secs()
            );
            for l in frame.lines() {
                let _ = writeln!(t, "{l}\x1b[K");
            }
            t.push_str("\x1b[J");
            t
        } else if as_json {
            frame
        } else {
            format!("--- {}s\n{frame}", (now - start).as_secs())
        };
        first = false;
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (a closed pipe): done.
            return Ok(0);
        }
        drop(out);
        let sigfd = signals.fd();
        let mut fds = [rustix::event::PollFd::new(
            &sigfd,
            rustix::event::PollFlags::IN,
        )];
        // At least as long as the frame took: on a tree so big that a
        // frame takes longer than the interval, the watch still takes at
        // most half a CPU.
        let wait = INTERVAL.max(began.elapsed());
        let ts = rustix::time::Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Runtime(format!("poll: {e}"))),
        }
        if !signals.pending().is_empty() {
            return Ok(0);
        }
    }
}

/// Cgroups at and below the root whose last component names `target` (an
/// app ID, a unit name, a container ID), for `explain`. Directories,
/// parents first.
pub(super) fn find_named(h: &Hierarchy, target: &str, deepest: Option<u32>) -> Vec<PathBuf> {
    let forms = crate::selector::instance_forms(target);
    let mut out = Vec::new();
    if forms.is_empty() {
        return out;
    }
    for (dir, _) in h.walk(deepest).cgroups {
        let Some(p) = h.rules_path(&dir) else {
            continue;
        };
        let p = match_form(&p);
        if forms.iter().any(|r| r.is_match(&p)) {
            out.push(dir);
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "/user.slice/user-1000.slice/user@1000.service";

    #[test]
    fn cgroups_are_named_as_users_know_them() {
        let label = |p: &str| match classify(p) {
            Kind::Named(n) => n.label(),
            Kind::Cgroup => "cgroup".into(),
        };
        assert_eq!(
            label(&format!(
                "{U}/app.slice/app-flatpak-org.telegram.desktop-1.scope"
            )),
            "app org.telegram.desktop (flatpak)"
        );
        assert_eq!(
            label(&format!("{U}/app.slice/app-org.x@1.service/helper")),
            "app org.x"
        );
        assert_eq!(label(&format!("{U}/init.scope")), "unit init.scope");
        assert_eq!(label(U), "unit user@1000.service");
        let id = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
        assert_eq!(
            label(&format!("/system.slice/docker-{id}.scope/init.scope")),
            "container 4f3c2b1a0e9d (docker)"
        );
        assert_eq!(
            label("/a/cgtproxy-proxy.slice"),
            "unit cgtproxy-proxy.slice"
        );
        assert_eq!(
            label("/a/cgtproxy-proxy.slice/x"),
            "unit cgtproxy-proxy.slice"
        );
        assert_eq!(label("/plain/dir"), "cgroup");
        assert_eq!(
            label(&format!("/docker/{id}/sub")),
            "container 4f3c2b1a0e9d (docker)"
        );
        assert_eq!(rate_text(9_999), "9999 B/s");
        assert_eq!(rate_text(123_456), "123 kB/s");
        assert_eq!(per_second(500, Duration::from_millis(500)), 1000);
    }
}
