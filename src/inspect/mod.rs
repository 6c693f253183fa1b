//! The operator's commands: `check`, `status` and `explain`. They only
//! read — cgroupfs, `/proc`, and the live ruleset over netlink — and never
//! change the kernel, so they are safe to run next to the daemon.
//!
//! Levels are the kernel's (`socket cgroupv2 level N`): the depth below the
//! root of the cgroup2 hierarchy, whatever directory `cgroup-root` names.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::cgroup;
use crate::config::Config;
use crate::error::Error;
use crate::nftables::{self, Object as NftObject, Rule};
use crate::options::Options;
use crate::reconcile::Element;
use crate::refusal;
use crate::ruleset::{Dump, Ruleset};

mod apps;
mod check;
mod explain;
mod rules;
mod status;
mod table;

pub use apps::apps;
pub use check::{Mode as CheckMode, check};
pub use explain::explain;
pub use status::status;

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
    // Fail closed (nft/cgtproxy.nft).
    "recorded_direct",
    "unfilled",
    "cut",
    "input",
    "refused",
    "guard_out",
];

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
    fn dir_of_pid(&self, pid: u32) -> Result<PathBuf, Error> {
        let p = cgroup::path_of_pid(pid)?;
        if p.split(|&c| c == b'/').any(|c| c == b"..") {
            return Err(Error::Runtime(format!(
                "process {pid} is in cgroup {} outside this cgroup namespace",
                cgroup::display(&p)
            )));
        }
        let m = self.mount_point().ok_or_else(|| {
            Error::Runtime("no cgroup2 file system is mounted (see /proc/self/mountinfo)".into())
        })?;
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

    /// How many levels below the cgroup root the walk goes: down to the
    /// deepest level `deepest` the ruleset looks up (16, the contract's
    /// ruleset, when it is unknown), as the daemon follows cgroupfs.
    fn limit(&self, deepest: Option<u32>) -> usize {
        levels_below(deepest, self.level(&self.root)) as usize
    }

    /// Every cgroup at and below the root down to the deepest level the
    /// ruleset looks up (`deepest`; see [`levels_below`]), parents first.
    /// Nothing below that level is ever looked up by the kernel, so nothing
    /// there is read: a user's chain thousands deep costs what its first
    /// levels cost. Per cgroup one stat (the link count says whether it has
    /// children: a leaf needs no readdir); every path is at most the
    /// limit's depth long, so its path walk is bounded too.
    fn walk(&self, deepest: Option<u32>) -> Walk {
        let limit = self.limit(deepest);
        let mut w = Walk {
            cgroups: Vec::new(),
            cut: Vec::new(),
            limit,
        };
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((d, n)) = stack.pop() {
            // A cgroup removed meanwhile is simply not there.
            let Ok((id, kids)) = cgroup::id_and_children(&d) else {
                continue;
            };
            if kids && n >= limit {
                w.cut.push(d.clone());
            } else if kids && let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push((e.path(), n + 1));
                    }
                }
            }
            w.cgroups.push((d, id));
        }
        w
    }
}

/// What [`Hierarchy::walk`] saw.
struct Walk {
    /// (directory, id) of every cgroup down to the limit, parents first.
    cgroups: Vec<(PathBuf, u64)>,
    /// Cgroups at the limit that have cgroups below them (not walked).
    cut: Vec<PathBuf>,
    /// Levels below the cgroup root that were walked.
    limit: usize,
}

impl Walk {
    /// One line for people about what was not walked, if anything was not.
    fn cut_text(&self, h: &Hierarchy) -> Option<String> {
        let first = self.cut.iter().min()?;
        Some(format!(
            "{} cgroup{} at the deepest looked-up level ({} below the cgroup root) {} cgroups below {} that were not read (the kernel never looks them up: they follow it), e.g. {}",
            self.cut.len(),
            if self.cut.len() == 1 { "" } else { "s" },
            self.limit,
            if self.cut.len() == 1 { "has" } else { "have" },
            if self.cut.len() == 1 { "it" } else { "them" },
            h.name(first)
        ))
    }
}

/// How many levels below a cgroup root at level `root_level` (0 when not
/// known) hold cgroups the ruleset can look up, when its deepest lookup is
/// at level `deepest` (16, as the contract's ruleset, when the ruleset has
/// none or cannot be read). The daemon follows cgroupfs this deep and the
/// read-only commands walk this deep: one function, so they agree.
pub fn levels_below(deepest: Option<u32>, root_level: Option<usize>) -> u32 {
    deepest
        .unwrap_or(16)
        .saturating_sub(u32::try_from(root_level.unwrap_or(0)).unwrap_or(u32::MAX))
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
            let set = nftables::parse_set(m)?;
            info.counter = set.counter;
            info.set = Some(set);
            Ok(())
        })?;
        Ok(found.then_some(info))
    }

    fn chain(&mut self, chain: &str) -> Result<bool, Error> {
        let t = self.rs.map.table.clone();
        self.rs.get(&NftObject::Chain(&t, chain), |_| Ok(()))
    }

    /// Every rule of the table, in chain order.
    fn rules(&mut self) -> Result<Vec<Rule>, Error> {
        self.rs.rules()
    }

    /// The map's elements, or why there are none to show.
    fn elements(&mut self, cfg: &Config) -> Result<Vec<Element>, Error> {
        Ok(self.dump(cfg)?.elements)
    }

    /// Both maps, or why there are none to show.
    fn dump(&mut self, _cfg: &Config) -> Result<Dump, Error> {
        match self.rs.dump()? {
            Some(d) => Ok(d),
            None => Err(Error::Runtime(refusal::table_or_maps_missing(
                &self.rs.map,
                &self.rs.verdicts,
            ))),
        }
    }
}

/// A rule dump as the kernel sends it (the replies to GETRULE), read the
/// way `check`, `explain`, `apps` and the daemon read the live ruleset:
/// every message that parses as a rule, then the analysis of them all. For
/// the fuzz target `rule_dump` (fuzz/) and tests; a summary comes back so
/// nothing is optimised away.
#[doc(hidden)]
pub fn analyse_rule_dump(bytes: &[u8], map: &str, verdicts: &str) -> String {
    let rules: Vec<Rule> = crate::wire::messages(bytes)
        .flatten()
        .filter_map(|m| nftables::parse_rule(&m).ok())
        .collect();
    let facts = rules::analyse(&rules, map, verdicts);
    let nat = rules::nat_ports(&rules, "prerouting");
    format!(
        "{} rules; {}; {} levels; {facts:?}; nat {nat:?}; looks up 3: {}",
        rules.len(),
        facts.levels_text(),
        facts.levels.len(),
        facts.looks_up(Some(3))
    )
}

/// The mark the live ruleset's TPROXY rules match, if it has one that can
/// be recognised: the daemon routes this mark unless the config names one.
pub fn ruleset_mark(cfg: &Config) -> Result<Option<u32>, Error> {
    let mut live = Live::open(cfg)?;
    if !live.table()? {
        return Ok(None);
    }
    Ok(rules::analyse(&live.rules()?, &cfg.map, &cfg.verdict_map).tproxy_mark)
}

/// The deepest level at which the live ruleset looks up the map `cfg.map`
/// (`None` when it has no such lookup). The daemon follows cgroupfs down to
/// this level and no further.
pub fn deepest_level(cfg: &Config) -> Result<Option<u32>, Error> {
    let mut live = Live::open(cfg)?;
    let rules = live.rules()?;
    Ok(rules::analyse(&rules, &cfg.map, &cfg.verdict_map)
        .levels
        .last()
        .copied())
}

/// Loads the config and resolves the cgroup root (`--cgroup-root` first).
fn load(opts: &Options) -> Result<(Config, Hierarchy), Error> {
    let (cfg, root) = crate::options::load(opts)?;
    Ok((cfg, Hierarchy::new(root)))
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

    /// The walk's depth is the daemon's: the ruleset's deepest level
    /// counted from the hierarchy's root, 16 when unknown, never negative.
    #[test]
    fn levels_below_the_root() {
        assert_eq!(levels_below(None, Some(1)), 15);
        assert_eq!(levels_below(Some(4), Some(1)), 3);
        assert_eq!(levels_below(Some(16), None), 16);
        assert_eq!(levels_below(Some(2), Some(5)), 0);
        assert_eq!(levels_below(Some(3), Some(usize::MAX)), 0);
    }

    /// The fuzz target's entry reads a real rule dump as `check` does: the
    /// shipped ruleset's 16 levels, captured from the kernel; garbage and
    /// every truncation of it give an answer, not a panic.
    #[test]
    fn analyse_rule_dump_reads_the_captured_dump() {
        let dump = crate::nftables::tests::KERNEL_DUMP;
        let said = analyse_rule_dump(dump, "cgroups", "verdicts");
        assert!(said.contains("levels 1-16; 16 levels"), "{said}");
        assert!(analyse_rule_dump(dump, "other", "maps").contains("0 levels"));
        for cut in (0..dump.len()).step_by(97) {
            analyse_rule_dump(&dump[..cut], "cgroups", "verdicts");
        }
        assert!(
            analyse_rule_dump(b"\xff\x00garbage", "cgroups", "verdicts").starts_with("0 rules")
        );
    }
}
