//! The reconciler: what the map should hold (cgroups × rules) against what
//! it holds (a kernel dump, or the verdicts the tree implied before an
//! event), reduced to the element changes that close the gap. It speaks of
//! verdicts; which number stands for which is `Ruleset`'s business.

use std::collections::HashMap;

use crate::config::{Config, Verdict, match_form};
use crate::nftables::Element;
use crate::watch::Change;

/// Element changes for one transaction. Deletes go first, so a verdict
/// change (delete + add of the same key) lands as one atomic replacement.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ops<'a> {
    pub del: Vec<u64>,
    pub add: Vec<(u64, &'a Verdict)>,
    /// After a full reconcile: every verdict the map's elements stand for
    /// once this transaction is in. Numbers of other verdicts can go.
    pub in_use: Option<Vec<&'a Verdict>>,
}

impl Ops<'_> {
    /// No element changes (`Ruleset::apply` may still drop unused numbers).
    pub fn is_empty(&self) -> bool {
        self.del.is_empty() && self.add.is_empty()
    }
}

pub fn verdict_of<'a>(cfg: &'a Config, path: &[u8]) -> Option<&'a Verdict> {
    cfg.verdict(&match_form(path))
}

/// Full reconcile: every cgroup in `tree` against every element in `actual`.
pub fn full<'a, 'p>(
    cfg: &'a Config,
    cgroups: impl Iterator<Item = (u64, &'p [u8])>,
    actual: &[Element],
) -> Ops<'a> {
    let mut want: HashMap<u64, &'a Verdict> = HashMap::new();
    for (id, path) in cgroups {
        if let Some(v) = verdict_of(cfg, path) {
            want.insert(id, v);
        }
    }
    let mut in_use: Vec<&'a Verdict> = Vec::new();
    for v in want.values() {
        if !in_use.contains(v) {
            in_use.push(v);
        }
    }
    let mut ops = Ops {
        in_use: Some(in_use),
        ..Ops::default()
    };
    let mut have: HashMap<u64, &Verdict> = HashMap::with_capacity(actual.len());
    for e in actual {
        have.insert(e.id, &e.verdict);
        match want.get(&e.id) {
            Some(v) if *v == &e.verdict => {}
            Some(v) => {
                ops.del.push(e.id);
                ops.add.push((e.id, v));
            }
            None => ops.del.push(e.id),
        }
    }
    for (id, v) in want {
        if !have.contains_key(&id) {
            ops.add.push((id, v));
        }
    }
    ops.del.sort_unstable();
    ops.add.sort_unstable_by_key(|(id, _)| *id);
    ops
}

/// Incremental: the verdict each touched cgroup had before this batch of
/// events (its first old path) against the one it has after (its last new
/// path). Assumes the map matched the tree before; if it did not, the
/// transaction fails (ENOENT / EEXIST) and the caller falls back to `full`.
pub fn incremental<'a>(cfg: &'a Config, changes: &[Change]) -> Ops<'a> {
    // id → (verdict before, verdict after), in order of first appearance.
    let mut order: Vec<u64> = Vec::new();
    let mut seen: HashMap<u64, (Option<&'a Verdict>, Option<&'a Verdict>)> = HashMap::new();
    for c in changes {
        let (id, before, after) = match c {
            Change::Added { id, path } => (*id, None, verdict_of(cfg, path)),
            Change::Removed { id, path } => (*id, verdict_of(cfg, path), None),
        };
        match seen.get_mut(&id) {
            Some(e) => e.1 = after,
            None => {
                order.push(id);
                seen.insert(id, (before, after));
            }
        }
    }
    let mut ops = Ops::default();
    for id in order {
        match seen[&id] {
            (None, None) => {}
            (Some(a), Some(b)) if a == b => {}
            (Some(_), None) => ops.del.push(id),
            (None, Some(b)) => ops.add.push((id, b)),
            (Some(_), Some(b)) => {
                ops.del.push(id);
                ops.add.push((id, b));
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            "t",
            r#"{"rules":[{"match":"/p(/.*)?","target":"proxy"},{"match":"/x","target":"drop"}]}"#,
        )
        .unwrap()
    }

    fn el(id: u64, v: Verdict) -> Element {
        Element {
            id,
            verdict: v,
            counter: None,
        }
    }

    #[test]
    fn full_replaces_adds_and_removes() {
        let c = cfg();
        let proxy = Verdict::Goto("proxy".into());
        let tree: Vec<(u64, &[u8])> = vec![
            (1, b"/"),
            (2, b"/p"),
            (3, b"/p/q"),
            (4, b"/x"),
            (5, b"/other"),
        ];
        let actual = vec![
            el(2, proxy.clone()),
            el(4, proxy.clone()),
            el(99, Verdict::Drop),
        ];
        let ops = full(&c, tree.into_iter(), &actual);
        assert_eq!(ops.del, vec![4, 99]);
        assert_eq!(ops.add, vec![(3, &proxy), (4, &Verdict::Drop)]);
        let mut in_use = ops.in_use.unwrap();
        in_use.sort_by_key(|v| v.to_string());
        assert_eq!(in_use, vec![&Verdict::Drop, &proxy]);
    }

    #[test]
    fn incremental_coalesces_per_cgroup() {
        let c = cfg();
        let proxy = Verdict::Goto("proxy".into());
        let ch = |add: bool, id, p: &str| {
            if add {
                Change::Added { id, path: p.into() }
            } else {
                Change::Removed { id, path: p.into() }
            }
        };
        let changes = vec![
            ch(true, 10, "/p/a"), // new, proxied
            ch(true, 11, "/zz"),  // new, no rule
            ch(true, 12, "/p/b"), // made and removed in one batch: nothing
            ch(false, 12, "/p/b"),
            ch(false, 13, "/x"), // removed
            ch(false, 14, "/x"), // renamed /x → /p/c: verdict change
            ch(true, 14, "/p/c"),
            ch(false, 15, "/p/d"), // renamed within proxy: nothing
            ch(true, 15, "/p/e"),
        ];
        let ops = incremental(&c, &changes);
        assert_eq!(ops.del, vec![13, 14]);
        assert_eq!(ops.add, vec![(10, &proxy), (14, &proxy)]);
    }
}
