use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::rules::{Facts, analyse};
use super::table;
use super::{Hierarchy, Live, load};
use crate::cgroup;
use crate::config::{Config, Verdict, match_form};
use crate::error::Error;
use crate::options::Options;
use crate::reconcile::Element;

// ---------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------

/// One level of a cgroup's lineage, as the ruleset looks it up.
pub(super) struct Step {
    pub(super) dir: PathBuf,
    pub(super) level: Option<usize>,
    pub(super) id: Option<u64>,
    /// The rule matching this cgroup's own path (`None` above the root or
    /// when none matches).
    pub(super) rule: Option<usize>,
    under_root: bool,
}

pub(super) fn lineage(h: &Hierarchy, cfg: &Config, dir: &Path) -> Vec<Step> {
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

/// The deepest cgroup from step `from` up (below the hierarchy's root)
/// whose `cgroup.procs` a user other than root owns: a delegated subtree.
/// That user may move its processes anywhere below it, so out of a verdict
/// set on a cgroup below it (contract §3: a verdict confines only processes
/// that cannot write the cgroupfs above them). Callers pass the step just
/// above the element's cgroup: owning that cgroup itself moves nothing out.
pub(super) fn delegated_above(steps: &[Step], from: usize) -> Option<(&Step, u32)> {
    use std::os::unix::fs::MetadataExt;
    steps
        .iter()
        .skip(from)
        .filter(|s| s.level != Some(0))
        .find_map(|s| {
            let uid = std::fs::metadata(s.dir.join("cgroup.procs")).ok()?.uid();
            (uid != 0).then_some((s, uid))
        })
}

/// A user who can make cgroups where rule `rule` decides, and the more
/// permissive rule such a cgroup could match (see [`overridable_by`]).
pub(super) struct Override<'s> {
    /// The deepest cgroup of the rule's subtree in the lineage whose
    /// directory a user other than root owns.
    pub(super) owned: &'s Step,
    pub(super) uid: u32,
    /// The rule that decides the cgroup (its nearest listed cgroup's).
    pub(super) rule: usize,
    /// A rule with a more permissive target.
    pub(super) wider: usize,
}

/// Whether a user can give the cgroup of `steps[0]` (or cgroups below it)
/// a more permissive verdict than the rule that decides it: creating a
/// cgroup needs write access to its parent's directory, so the owner of a
/// directory from the cgroup up to the cgroup the deciding rule lists can
/// `mkdir` a child whose name a more permissive rule matches (say
/// `cgtproxy-direct.slice`) and move its processes there. Nothing to say
/// when the rule is final (the daemon refuses such a child its element),
/// when a final verdict above already decides, or when no rule is more
/// permissive. Levels the ruleset does not look up decide nothing.
pub(super) fn overridable_by<'s>(
    cfg: &Config,
    h: &Hierarchy,
    steps: &'s [Step],
    facts: &Facts,
) -> Option<Override<'s>> {
    use std::os::unix::fs::MetadataExt;
    let (k, rule) = steps
        .iter()
        .enumerate()
        .filter(|(_, st)| st.under_root && facts.looks_up(st.level))
        .find_map(|(k, st)| st.rule.map(|i| (k, i)))?;
    let wider = cfg.overridable(rule)?;
    let listed = h.rules_path(&steps[k].dir)?;
    let listed = match_form(&listed);
    if cfg.final_above(&listed, &cfg.rules[rule].target).is_some() {
        return None;
    }
    steps[..=k].iter().find_map(|st| {
        let uid = std::fs::metadata(&st.dir).ok()?.uid();
        (uid != 0).then_some(Override {
            owned: st,
            uid,
            rule,
            wider,
        })
    })
}

/// Which step's element the kernel uses now (deepest looked-up level that
/// has one).
pub(super) fn deciding<'s, 'e>(
    steps: &'s [Step],
    map: &HashMap<u64, &'e Element>,
    facts: &Facts,
) -> Option<(&'s Step, &'e Verdict)> {
    steps.iter().find_map(|s| {
        let el: &'e Element = s.id.and_then(|id| map.get(&id).copied())?;
        facts.looks_up(s.level).then_some((s, &el.verdict))
    })
}

/// `cgtproxy explain PATH|PID|APP|UNIT...`. Returns the exit status.
pub fn explain(opts: &Options, targets: &[OsString]) -> Result<i32, Error> {
    if targets.is_empty() {
        return Err(Error::Usage(
            "explain needs a cgroup PATH, a PID, an app ID or a unit name (try --help)".into(),
        ));
    }
    let (cfg, h) = load(opts)?;
    // One netlink socket for the elements and the rules.
    let mut live = Live::open(&cfg);
    let (els, map_error) = match live
        .as_mut()
        .map_err(|e| e.to_string())
        .and_then(|l| l.elements(&cfg).map_err(|e| e.to_string()))
    {
        Ok(e) => (e, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let facts = live
        .ok()
        .and_then(|mut l| l.rules().ok())
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
                let _ = writeln!(out, "{}: {e}", cgroup::display(t.as_bytes()));
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
        let dir = h.dir_of_pid(pid).map_err(|e| e.to_string())?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let _ = writeln!(
            s,
            "process {pid} ({})",
            super::status::shown(comm.trim_end())
        );
        dir
    } else {
        let p = Path::new(target);
        let under_mount = h.mount_point().is_some_and(|m| p.starts_with(m));
        if (p.starts_with(&h.root) || under_mount) && p.is_dir() {
            p.to_path_buf()
        } else {
            let dir = cgroup::fs_path(&h.root, bytes);
            // Not a path below the root: an app ID, unit or container.
            if !bytes.contains(&b'/')
                && !dir.join("cgroup.procs").exists()
                && let Some(name) = target.to_str()
            {
                return explain_named(cfg, h, name, map, map_error, facts);
            }
            dir
        }
    };
    explain_dir(cfg, h, &dir, s, map, map_error, facts)
}

/// Every cgroup an app ID, unit name or container ID names, explained.
fn explain_named(
    cfg: &Config,
    h: &Hierarchy,
    name: &str,
    map: &HashMap<u64, &Element>,
    map_error: Option<&str>,
    facts: &Facts,
) -> Result<String, String> {
    let dirs = super::apps::find_named(h, name, facts.levels.last().copied());
    if dirs.is_empty() {
        return Err(format!(
            "no cgroup below {} is named so now: not a cgroup path, nor a running app ID, unit or container (`cgtproxy apps` lists what runs)",
            h.root.display()
        ));
    }
    let mut out = String::new();
    for (i, d) in dirs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let head = format!(
            "{}: cgroup {} of {}\n",
            cgroup::display(name.as_bytes()),
            i + 1,
            dirs.len()
        );
        out.push_str(&explain_dir(cfg, h, d, head, map, map_error, facts)?);
    }
    Ok(out)
}

fn explain_dir(
    cfg: &Config,
    h: &Hierarchy,
    dir: &Path,
    mut s: String,
    map: &HashMap<u64, &Element>,
    map_error: Option<&str>,
    facts: &Facts,
) -> Result<String, String> {
    let dir = dir.to_path_buf();
    if !dir.join("cgroup.procs").exists() {
        return Err(format!(
            "no such cgroup ({} does not exist)",
            cgroup::display(dir.as_os_str().as_bytes())
        ));
    }
    let steps = lineage(h, cfg, &dir);
    let me = &steps[0];
    let lvl = |l: Option<usize>| l.map_or("?".to_string(), |l| l.to_string());
    let id = |i: Option<u64>| i.map_or("?".to_string(), |i| i.to_string());
    let _ = writeln!(s, "cgroup     {}", h.name(&dir));
    let _ = writeln!(
        s,
        "directory  {}",
        cgroup::display(dir.as_os_str().as_bytes())
    );
    let _ = writeln!(s, "id         {}", id(me.id));
    let _ = writeln!(s, "level      {}", lvl(me.level));
    let rule_text = |i: usize| cfg.rules[i].describe(i);
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
    let rows: Vec<Vec<String>> = steps
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
            vec![lvl(st.level), id(st.id), rule, el, name]
        })
        .collect();
    let _ = writeln!(s, "lookups    deepest first, as the ruleset does them:");
    s.push_str(&table::render(
        "  ",
        &["LEVEL", "ID", "RULE", "ELEMENT", "CGROUP"],
        &[],
        &rows,
    ));
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
    if let Some((d, _)) = decider
        && let Some(i) = steps.iter().position(|st| st.dir == d.dir)
        && let Some((a, uid)) = delegated_above(&steps, i + 1)
    {
        let _ = writeln!(
            s,
            "escape     uid {uid} owns {}/cgroup.procs (a delegated subtree): its processes can move themselves out of this verdict",
            h.name(&a.dir)
        );
    }
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
    if let Some(o) = overridable_by(cfg, h, &steps, facts) {
        let _ = writeln!(
            s,
            "override   uid {} owns {} and can give this subtree a more permissive verdict (a cgroup it creates there that rules[{}] lists gets {}): add \"final\": true to rules[{}], or run it in a root-owned cgroup",
            o.uid,
            h.name(&o.owned.dir),
            o.wider,
            cfg.rules[o.wider].target,
            o.rule
        );
    }
    final_note(&mut s, cfg, h, &dir, me.rule.filter(|_| me.under_root));
    Ok(s)
}

/// A more permissive rule refused under a final verdict (a user-owned
/// subtree is said by the `escape` line).
fn final_note(s: &mut String, cfg: &Config, h: &Hierarchy, dir: &Path, rule: Option<usize>) {
    if let (Some(i), Some(p)) = (rule, h.rules_path(dir)) {
        let form = match_form(&p);
        if let Some((above, n)) = cfg.final_above(&form, &cfg.rules[i].target) {
            let _ = writeln!(
                s,
                "final      refused: {above} has the final verdict {} (rules[{n}]), so this cgroup gets no element of its own and keeps that verdict",
                cfg.rules[n].target
            );
        }
    }
}

fn counter_text(c: Option<(u64, u64)>) -> String {
    c.map_or(String::new(), |(p, b)| format!(" ({p} packets, {b} bytes)"))
}
