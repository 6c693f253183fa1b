//! The reconciler: what the maps should hold (cgroups × rules) against what
//! they hold (a kernel dump, or the verdicts the tree implied before an
//! event), reduced to the changes that close the gap.
//!
//! `full` and `incremental` speak of verdicts (`Ops`); `plan` then gives
//! each added element the number of its verdict in `verdicts`, binding a
//! new number the first time a verdict is needed (`Plan`). A full reconcile
//! also looks at the numbers themselves: a number whose elements all want
//! one verdict is (re)bound to it rather than its elements rewritten (after
//! someone emptied or edited `verdicts`), and numbers no element carries
//! any more are removed. Number [`FILLED`] is no verdict's: it is the flag
//! that tells the ruleset the maps are filled, which every full plan wants
//! and no plan removes.

use std::collections::{BTreeMap, BTreeSet};

use crate::cgroup::{IdMap, IdSet};
use crate::config::{Config, Verdict, match_form};
use crate::watch::{Change, Tree};

/// A `cgroups` element as the kernel holds it, read through `verdicts`:
/// the verdict its number stands for (see `Ruleset::dump`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub id: u64,
    /// The number it carries (None: a verdict, from a ruleset of 0.1).
    pub number: Option<u32>,
    pub verdict: Verdict,
    /// (packets, bytes) from the per-element counter.
    pub counter: Option<(u64, u64)>,
}

/// `verdicts` as the kernel holds it, number → verdict, sorted by number.
/// The caller (the daemon) holds it between transactions: read from a dump,
/// replaced by each committed `Plan::numbers`.
pub type Numbers = Vec<(u32, Verdict)>;

/// The key of `verdicts` that, holding `drop`, says "the maps are filled":
/// the shipped ruleset records no connection `direct` without it
/// (nft/cgtproxy.nft, "Fail closed"). Every full plan writes it in the same
/// transaction as the elements and nothing removes it; verdict numbers
/// start at 1, and an element someone points at 0 is dropped.
pub const FILLED: u32 = 0;

/// Whether `numbers` holds the flag `FILLED : drop`.
pub fn filled(numbers: &[(u32, Verdict)]) -> bool {
    numbers.contains(&(FILLED, Verdict::Drop))
}

/// Element changes for one transaction, in verdicts. Deletes go first, so
/// a verdict change (delete + add of the same key) lands as one atomic
/// replacement.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ops<'a> {
    pub del: Vec<u64>,
    pub add: Vec<(u64, &'a Verdict)>,
    /// Full reconcile: numbers to point at the verdict their elements want.
    pub rebind: Vec<(u32, &'a Verdict)>,
    /// Full reconcile: the numbers of the elements that stay. Numbers
    /// neither these nor the added elements carry are removed.
    pub kept: Option<Vec<u32>>,
}

impl Ops<'_> {
    /// No element changes (the numbers may still change: see `Plan`).
    pub fn is_empty(&self) -> bool {
        self.del.is_empty() && self.add.is_empty()
    }
}

/// The verdict the cgroup at `path` gets an element for: its rule's,
/// unless a final verdict above it is more restrictive (then none, and it
/// inherits that one through the level lookups).
pub fn verdict_of<'a>(cfg: &'a Config, path: &[u8]) -> Option<&'a Verdict> {
    wanted(cfg, path, false)
}

/// [`verdict_of`], saying why when a final verdict refuses the element.
fn wanted<'a>(cfg: &'a Config, path: &[u8], say: bool) -> Option<&'a Verdict> {
    let form = match_form(path);
    let v = cfg.verdict(&form)?;
    let Some((above, rule)) = cfg.final_above(&form, v) else {
        return Some(v);
    };
    if say {
        refused(&form, v, above, &cfg.rules[rule].target, rule);
    }
    None
}

/// Refusals logged so far: the first few are each said, then one line says
/// that more are not (one user making 100,000 of them must not flood the
/// log).
static REFUSALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const REFUSALS_SAID: usize = 16;

fn refused(path: &str, v: &Verdict, above: &str, final_v: &Verdict, rule: usize) {
    let n = REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n < REFUSALS_SAID {
        crate::warn!(
            "{path}: no element {v}: {above} has the final verdict {final_v} (rules[{rule}]), so it keeps {final_v}"
        );
    } else if n == REFUSALS_SAID {
        crate::warn!("more cgroups below final verdicts were refused; not logging each");
    }
}

/// Full reconcile: every cgroup in `tree` against every element in `actual`
/// (as dumped, with `numbers`, the `verdicts` map, it was read through).
pub fn full<'a, 'p>(
    cfg: &'a Config,
    cgroups: impl Iterator<Item = (u64, &'p [u8])>,
    actual: &[Element],
    numbers: &[(u32, Verdict)],
) -> Ops<'a> {
    let mut want: IdMap<&'a Verdict> = IdMap::default();
    for (id, path) in cgroups {
        if let Some(v) = wanted(cfg, path, true) {
            want.insert(id, v);
        }
    }
    diff(want, actual, numbers)
}

/// [`full`] over every cgroup of `tree`, walked in place (no path is
/// copied).
pub fn full_of_tree<'a>(
    cfg: &'a Config,
    tree: &Tree,
    actual: &[Element],
    numbers: &[(u32, Verdict)],
) -> Ops<'a> {
    let mut want: IdMap<&'a Verdict> =
        IdMap::with_capacity_and_hasher(tree.len(), Default::default());
    tree.walk(|id, path| {
        if let Some(v) = wanted(cfg, path, true) {
            want.insert(id, v);
        }
    });
    diff(want, actual, numbers)
}

/// `full` once the wanted verdict of each cgroup is known.
fn diff<'a>(want: IdMap<&'a Verdict>, actual: &[Element], numbers: &[(u32, Verdict)]) -> Ops<'a> {
    // Per number that elements carry: how many of them want each verdict.
    let mut votes: BTreeMap<u32, Vec<(&'a Verdict, usize)>> = BTreeMap::new();
    for e in actual {
        // The flag is no verdict's number: never re-pointed for elements.
        if let (Some(n), Some(v)) = (e.number.filter(|n| *n != FILLED), want.get(&e.id)) {
            let tally = votes.entry(n).or_default();
            match tally.iter_mut().find(|(w, _)| w == v) {
                Some((_, c)) => *c += 1,
                None => tally.push((v, 1)),
            }
        }
    }
    // A number keeps its verdict while one of its elements wants it.
    // Otherwise, when the verdict most of its elements want has no number,
    // the number is pointed at it (after someone emptied or edited
    // `verdicts`); when it has one, the elements move there, so a verdict
    // never has two numbers because of us.
    let mut rebind: Vec<(u32, &'a Verdict)> = Vec::new();
    for (n, tally) in votes {
        let bound = numbers.iter().find(|(m, _)| *m == n).map(|(_, v)| v);
        if bound.is_some_and(|b| tally.iter().any(|(v, _)| *v == b)) {
            continue;
        }
        let mut best = tally[0];
        for t in &tally[1..] {
            if t.1 > best.1 {
                best = *t;
            }
        }
        let numbered = numbers.iter().any(|(m, v)| *m != FILLED && v == best.0)
            || rebind.iter().any(|(_, v)| *v == best.0);
        if !numbered {
            rebind.push((n, best.0));
        }
    }
    let mut ops = Ops::default();
    // A few distinct numbers, however many elements carry them.
    let mut kept: BTreeSet<u32> = BTreeSet::new();
    let mut have: IdSet = IdSet::with_capacity_and_hasher(actual.len(), Default::default());
    for e in actual {
        have.insert(e.id);
        let now = match e.number.and_then(|n| rebind.iter().find(|(m, _)| *m == n)) {
            Some((_, v)) => *v,
            None => &e.verdict,
        };
        match want.get(&e.id) {
            // An element on the flag's number is rewritten onto a
            // verdict's own (the flag is re-pointed at drop).
            Some(v) if *v == now && e.number != Some(FILLED) => kept.extend(e.number),
            Some(v) => {
                ops.del.push(e.id);
                ops.add.push((e.id, v));
            }
            None => ops.del.push(e.id),
        }
    }
    for (id, v) in want {
        if !have.contains(&id) {
            ops.add.push((id, v));
        }
    }
    ops.del.sort_unstable();
    ops.add.sort_unstable_by_key(|(id, _)| *id);
    ops.rebind = rebind;
    ops.kept = Some(kept.into_iter().collect());
    ops
}

/// One transaction on both maps, every number decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `verdicts` numbers to delete; a number being re-pointed is deleted
    /// here and bound again in `bind`.
    pub unbind: Vec<u32>,
    pub bind: Vec<(u32, Verdict)>,
    /// `cgroups` elements to delete, and to add with their number.
    pub del: Vec<u64>,
    pub add: Vec<(u64, u32)>,
    /// `verdicts` once the transaction is in.
    pub numbers: Vec<(u32, Verdict)>,
}

/// A number that changed: what it stood for before and after (None: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumber {
    pub number: u32,
    pub before: Option<Verdict>,
    pub after: Option<Verdict>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.unbind.is_empty() && self.bind.is_empty() && self.del.is_empty() && self.add.is_empty()
    }

    /// The numbers this plan changes, against `numbers` (as before it);
    /// not the flag, which is no verdict's.
    pub fn renumbered(&self, numbers: &[(u32, Verdict)]) -> Vec<Renumber> {
        let mut keys: Vec<u32> = self.unbind.clone();
        keys.extend(self.bind.iter().map(|(n, _)| *n));
        keys.retain(|n| *n != FILLED);
        keys.sort_unstable();
        keys.dedup();
        let at = |t: &[(u32, Verdict)], n| t.iter().find(|(m, _)| *m == n).map(|(_, v)| v.clone());
        keys.into_iter()
            .map(|n| Renumber {
                number: n,
                before: at(numbers, n),
                after: at(&self.numbers, n),
            })
            .collect()
    }
}

/// Gives `ops` their numbers, given `numbers` (`verdicts` now): the number
/// of a verdict is the smallest one bound to it, or the smallest free one,
/// bound in the same transaction.
pub fn plan(numbers: &[(u32, Verdict)], ops: &Ops<'_>) -> Plan {
    let mut p = Plan {
        numbers: numbers.to_vec(),
        del: ops.del.clone(),
        ..Plan::default()
    };
    for (n, v) in &ops.rebind {
        if let Some(i) = p.numbers.iter().position(|(m, _)| m == n) {
            p.numbers.remove(i);
            p.unbind.push(*n);
        }
        p.numbers.push((*n, (*v).clone()));
        p.bind.push((*n, (*v).clone()));
    }
    // A full plan makes the maps authoritative: the flag, in the same
    // transaction (re-pointed if someone bound 0 to something else).
    if ops.kept.is_some() && !filled(&p.numbers) {
        if let Some(i) = p.numbers.iter().position(|(m, _)| *m == FILLED) {
            p.numbers.remove(i);
            p.unbind.push(FILLED);
        }
        p.numbers.push((FILLED, Verdict::Drop));
        p.bind.push((FILLED, Verdict::Drop));
    }
    p.numbers.sort_unstable_by_key(|(n, _)| *n);
    let mut fresh = 1u32;
    p.add.reserve(ops.add.len());
    for (id, v) in &ops.add {
        let n = match p.numbers.iter().find(|(m, w)| *m != FILLED && w == *v) {
            Some((n, _)) => *n,
            None => {
                while p.numbers.iter().any(|(m, _)| *m == fresh) {
                    fresh += 1;
                }
                let i = p.numbers.partition_point(|(m, _)| *m < fresh);
                p.numbers.insert(i, (fresh, (*v).clone()));
                p.bind.push((fresh, (*v).clone()));
                fresh
            }
        };
        p.add.push((*id, n));
    }
    if let Some(kept) = &ops.kept {
        let mut used: BTreeSet<u32> = kept.iter().copied().collect();
        used.extend(p.add.iter().map(|(_, n)| *n));
        p.numbers.retain(|(n, _)| {
            let keep = *n == FILLED || used.contains(n);
            if !keep {
                p.unbind.push(*n);
            }
            keep
        });
    }
    p
}

/// Incremental: the verdict each touched cgroup had before this batch of
/// events (its first old path) against the one it has after (its last new
/// path). Assumes the map matched the tree before; if it did not, the
/// transaction fails (ENOENT / EEXIST) and the caller falls back to `full`.
pub fn incremental<'a>(cfg: &'a Config, changes: &[Change]) -> Ops<'a> {
    // id → (verdict before, verdict after), in order of first appearance.
    let mut order: Vec<u64> = Vec::new();
    let mut seen: IdMap<(Option<&'a Verdict>, Option<&'a Verdict>)> = IdMap::default();
    for c in changes {
        let (id, before, after) = match c {
            Change::Added { id, path } => (*id, None, wanted(cfg, path, true)),
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
pub(crate) mod tests {
    use super::*;

    /// `/p` and below proxied, `/x` dropped.
    pub(crate) fn cfg() -> Config {
        Config::parse(
            "t",
            r#"{"rules":[{"match":"/p(/.*)?","target":"proxy"},{"match":"/x","target":"drop"}]}"#,
        )
        .unwrap()
    }

    /// An element carrying `number`, read through `numbers`.
    fn el(id: u64, number: u32, numbers: &[(u32, Verdict)]) -> Element {
        let verdict = numbers
            .iter()
            .find(|(n, _)| *n == number)
            .map_or(Verdict::Unbound(number), |(_, v)| v.clone());
        Element {
            id,
            number: Some(number),
            verdict,
            counter: None,
        }
    }

    fn proxy() -> Verdict {
        Verdict::Goto("proxy".into())
    }

    const TREE: [(u64, &[u8]); 5] = [
        (1, b"/"),
        (2, b"/p"),
        (3, b"/p/q"),
        (4, b"/x"),
        (5, b"/other"),
    ];

    #[test]
    fn full_replaces_adds_and_removes() {
        let c = cfg();
        // Filled: the flag is there (and is not drop's number).
        let numbers = vec![(FILLED, Verdict::Drop), (1, proxy()), (2, Verdict::Drop)];
        let actual = vec![el(2, 1, &numbers), el(4, 1, &numbers), el(99, 2, &numbers)];
        let ops = full(&c, TREE.into_iter(), &actual, &numbers);
        assert_eq!(ops.del, vec![4, 99]);
        assert_eq!(ops.add, vec![(3, &proxy()), (4, &Verdict::Drop)]);
        assert_eq!((ops.rebind.len(), ops.kept.clone()), (0, Some(vec![1])));
        // Numbers: proxy keeps 1; drop keeps 2 (an added element needs it);
        // the flag stays.
        let p = plan(&numbers, &ops);
        assert_eq!(p.add, vec![(3, 1), (4, 2)]);
        assert!(p.bind.is_empty() && p.unbind.is_empty());
        assert_eq!(p.numbers, numbers);
    }

    /// Someone flushed `verdicts`: the numbers are bound again, and not one
    /// element is rewritten (their counters survive).
    #[test]
    fn full_rebinds_numbers_instead_of_rewriting_elements() {
        let c = cfg();
        let before = vec![(3, proxy()), (5, Verdict::Drop)];
        let actual = vec![el(2, 3, &[]), el(3, 3, &[]), el(4, 5, &[])];
        assert_eq!(actual[0].verdict, Verdict::Unbound(3));
        let ops = full(&c, TREE.into_iter(), &actual, &[]);
        assert!(ops.is_empty(), "{ops:?}");
        let p = plan(&[], &ops);
        // The flag went with the flush: bound again in the same transaction
        // (and not reported as a verdict's number).
        let mut bound = before.clone();
        bound.push((FILLED, Verdict::Drop));
        assert_eq!(p.bind, bound);
        let mut after = vec![(FILLED, Verdict::Drop)];
        after.extend(before.clone());
        assert_eq!(p.numbers, after);
        assert!(p.unbind.is_empty() && p.del.is_empty() && p.add.is_empty());
        assert_eq!(
            p.renumbered(&[]),
            vec![
                Renumber {
                    number: 3,
                    before: None,
                    after: Some(proxy())
                },
                Renumber {
                    number: 5,
                    before: None,
                    after: Some(Verdict::Drop)
                },
            ]
        );
    }

    /// Someone pointed drop's number at proxy, and added a number of their
    /// own: drop's number is pointed back, the stranger removed.
    #[test]
    fn full_points_a_tampered_number_back() {
        let c = cfg();
        let tampered = vec![(1, proxy()), (2, proxy()), (7, Verdict::Other(1, None))];
        let actual = vec![
            el(2, 1, &tampered),
            el(3, 1, &tampered),
            el(4, 2, &tampered),
        ];
        let ops = full(&c, TREE.into_iter(), &actual, &tampered);
        assert!(ops.is_empty(), "{ops:?}");
        let p = plan(&tampered, &ops);
        assert_eq!(p.bind, vec![(2, Verdict::Drop), (FILLED, Verdict::Drop)]);
        assert_eq!(p.unbind, vec![2, 7]);
        assert_eq!(
            p.numbers,
            vec![(FILLED, Verdict::Drop), (1, proxy()), (2, Verdict::Drop)]
        );
    }

    /// A config change that sends proxy's elements to drop moves them to
    /// drop's number: a verdict does not get a second number.
    #[test]
    fn full_moves_elements_to_an_existing_number() {
        let c = cfg();
        let numbers = vec![(1, Verdict::Drop), (2, proxy())];
        // /x carries proxy's number; the rules now want drop for it.
        let actual = vec![el(4, 2, &numbers), el(9, 1, &numbers)];
        let ops = full(&c, TREE.into_iter(), &actual, &numbers);
        assert!(ops.rebind.is_empty());
        assert_eq!(
            (ops.del.clone(), ops.add.clone()),
            (
                vec![4, 9],
                vec![(2, &proxy()), (3, &proxy()), (4, &Verdict::Drop)]
            )
        );
        let p = plan(&numbers, &ops);
        assert_eq!(p.add, vec![(2, 2), (3, 2), (4, 1)]);
        assert!(p.unbind.is_empty(), "both numbers still carried");
    }

    /// Random maps (numbers missing, duplicated, pointing anywhere; elements
    /// carrying any number) against random wants: once the plan is applied
    /// the way the kernel applies a batch, every cgroup's element stands for
    /// the verdict it wants, every number left is carried, no verdict gains
    /// a second number, no number is bound twice, and elements that were
    /// right and whose number did not move were left alone.
    #[test]
    fn full_then_plan_reaches_the_wanted_state_from_anywhere() {
        let verdicts = [
            proxy(),
            Verdict::Goto("direct".into()),
            Verdict::Drop,
            Verdict::Goto("mine".into()),
            Verdict::Other(1, None),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..3000 {
            // Number 0 too: the flag, present, missing or tampered with.
            let mut numbers: Vec<(u32, Verdict)> = Vec::new();
            for n in 0..=6u32 {
                if rnd(3) > 0 {
                    numbers.push((n, verdicts[rnd(5) as usize].clone()));
                }
            }
            let mut actual: Vec<Element> = Vec::new();
            for id in 1..=12u64 {
                if rnd(4) > 0 {
                    actual.push(el(id, rnd(8) as u32, &numbers));
                }
            }
            let mut want: IdMap<&Verdict> = IdMap::default();
            for id in 1..=16u64 {
                if rnd(5) > 0 {
                    want.insert(id, &verdicts[rnd(4) as usize]);
                }
            }
            let ops = diff(want.clone(), &actual, &numbers);
            let p = plan(&numbers, &ops);
            let ctx = format!("round {round}: {numbers:?} {actual:?} {want:?} -> {p:?}");

            // The kernel's view after the batch: unbind, bind, del, add.
            let mut table: BTreeMap<u32, Verdict> = numbers.iter().cloned().collect();
            for n in &p.unbind {
                assert!(table.remove(n).is_some(), "unbinds a missing number: {ctx}");
            }
            for (n, v) in &p.bind {
                assert!(table.insert(*n, v.clone()).is_none(), "binds twice: {ctx}");
            }
            assert_eq!(table, p.numbers.iter().cloned().collect(), "{ctx}");
            let mut carried: BTreeMap<u64, u32> =
                actual.iter().map(|e| (e.id, e.number.unwrap())).collect();
            for id in &p.del {
                assert!(
                    carried.remove(id).is_some(),
                    "deletes a missing element: {ctx}"
                );
            }
            for (id, n) in &p.add {
                assert!(carried.insert(*id, *n).is_none(), "adds twice: {ctx}");
            }
            let now: BTreeMap<u64, &Verdict> = carried
                .iter()
                .filter_map(|(id, n)| Some((*id, table.get(n)?)))
                .collect();
            let wanted: BTreeMap<u64, &Verdict> = want.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(now, wanted, "{ctx}");
            assert_eq!(
                carried.len(),
                want.len(),
                "an element without a verdict: {ctx}"
            );
            assert_eq!(table.get(&FILLED), Some(&Verdict::Drop), "the flag: {ctx}");
            for n in table.keys().filter(|n| **n != FILLED) {
                assert!(
                    carried.values().any(|m| m == n),
                    "number {n} not carried: {ctx}"
                );
            }
            for v in &verdicts {
                let before = numbers
                    .iter()
                    .filter(|(m, w)| *m != FILLED && w == v)
                    .count();
                let after = table
                    .iter()
                    .filter(|(m, w)| **m != FILLED && *w == v)
                    .count();
                assert!(after <= before.max(1), "{v} gained a number: {ctx}");
            }
            for e in &actual {
                // (An element on the flag's number is never right.)
                let moved = e.number == Some(FILLED) || p.unbind.contains(&e.number.unwrap());
                if want.get(&e.id) == Some(&&e.verdict) && !moved {
                    assert!(!p.del.contains(&e.id), "rewrote a right element: {ctx}");
                }
            }
        }
    }

    /// Numbers are the smallest free ones; a verdict nothing stands for any
    /// more loses its number in a full reconcile, never in an incremental one.
    #[test]
    fn plan_binds_smallest_free_numbers_and_collects_unused() {
        let numbers = vec![(1, Verdict::Drop), (3, Verdict::Goto("direct".into()))];
        let p = proxy();
        let ops = Ops {
            add: vec![(10, &p), (11, &p)],
            ..Ops::default()
        };
        let got = plan(&numbers, &ops);
        assert_eq!(got.bind, vec![(2, proxy())]);
        assert_eq!(got.add, vec![(10, 2), (11, 2)]);
        assert!(got.unbind.is_empty());
        let ops = Ops {
            add: vec![(10, &p)],
            kept: Some(vec![3]),
            ..Ops::default()
        };
        let got = plan(&numbers, &ops);
        assert_eq!(got.unbind, vec![1]);
        // A full plan also writes the flag.
        assert_eq!(
            got.numbers,
            vec![
                (FILLED, Verdict::Drop),
                (2, proxy()),
                (3, Verdict::Goto("direct".into()))
            ]
        );
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
