//! Where a kernel refusal becomes a sentence. Pure functions: the errno an
//! nf_tables batch was refused with, the part of the message the kernel's
//! extended ack pointed at (`nftables::Blame`) and the plan that was sent,
//! in; what the operator reads, and what the daemon does next
//! (`Error::Refused` with a `Next`), out. Every "does not exist" the program says is built
//! here, so the wording is the same everywhere.

use crate::config::Verdict;
use crate::error::errno_text;
pub use crate::error::{Error, NO_CAP, Next};
use crate::nftables::{Blame, ElemMsg, MapRef};
use crate::reconcile::Plan;

/// A refusal that means the table or a map is gone.
fn missing(m: String) -> Error {
    Error::Refused(Next::WaitForTable, m)
}

/// A refusal that means the maps are not what we thought.
fn diverged(m: String) -> Error {
    Error::Refused(Next::Resync, m)
}

/// Any other refusal: logged.
fn failed(m: String) -> Error {
    Error::Refused(Next::Log, m)
}

/// `table inet T does not exist`
pub fn table_missing(table: &str) -> String {
    format!("table inet {table} does not exist")
}

/// The table is missing, with what to do about it.
pub fn load_table(table: &str) -> String {
    format!("{} — load nft/cgtproxy.nft first", table_missing(table))
}

/// `map 'M' does not exist in table inet T`
pub fn map_missing(map: &MapRef) -> String {
    format!(
        "map '{}' does not exist in table inet {}",
        map.map, map.table
    )
}

/// The table or one of the maps is missing (a dump or a batch cannot tell
/// which).
pub fn table_or_maps_missing(map: &MapRef, verdicts: &MapRef) -> String {
    format!(
        "table inet {} or its map '{}' or '{}' does not exist — load nft/cgtproxy.nft first",
        map.table, map.map, verdicts.map
    )
}

/// `chain 'C' WHY does not exist in table inet T`; `why` says who names it.
pub fn chain_missing(chain: &str, why: &str, table: &str) -> String {
    format!("chain '{chain}' {why} does not exist in table inet {table}")
}

/// A kernel older than 6.3 (or a backport without it) refuses
/// DESTROYSETELEM as an unknown message type.
pub fn destroy_unsupported(errno: i32, kind: Option<ElemMsg>) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::EINVAL) && kind == Some(ElemMsg::Destroy)
}

/// One refusal of a batch, as the kernel gave it.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    pub errno: i32,
    /// The extended ack's message, if any.
    pub ext_msg: Option<&'a str>,
    /// What the extended ack's offset points at.
    pub blame: Option<&'a Blame>,
    /// The kind of element message refused.
    pub kind: Option<ElemMsg>,
}

/// What the daemon must do about a refused transaction, and the sentence
/// it logs. `map` and `verdicts` are the two maps; `plan` is what was sent;
/// `name` turns a cgroup id into words.
pub fn explain(
    e: &Refused<'_>,
    map: &MapRef,
    verdicts: &MapRef,
    plan: &Plan,
    name: &dyn Fn(u64) -> String,
) -> Error {
    let what = errno_text(e.errno);
    // The verdict a number was being bound to, and a cgroup that needs it.
    let bound = |n: &u32| {
        let v = plan.bind.iter().find(|(m, _)| m == n).map(|(_, v)| v);
        let id = plan.add.iter().find(|(_, m)| m == n).map(|(id, _)| *id);
        (v, id)
    };
    let (table, vmap) = (&map.table, &verdicts.map);
    match (e.errno, e.blame) {
        (libc::EPERM, _) => failed(NO_CAP.into()),
        _ if destroy_unsupported(e.errno, e.kind) => {
            diverged("this kernel has no DESTROYSETELEM; deleting known elements only".into())
        }
        (libc::ENOENT, Some(Blame::Table)) => missing(load_table(table)),
        (libc::ENOENT, Some(Blame::Map(m))) => missing(map_missing(&MapRef {
            table: table.clone(),
            map: m.clone(),
        })),
        // A number fails to bind with ENOENT only when its goto names a
        // missing chain.
        (libc::ENOENT, Some(Blame::Bound(n))) => {
            let (v, id) = bound(n);
            let chain = match v {
                Some(Verdict::Goto(c)) => c.as_str(),
                _ => "?",
            };
            let cgroup = id.map_or_else(|| "?".into(), name);
            failed(chain_missing(
                chain,
                &format!("(the verdict for cgroup {cgroup})"),
                table,
            ))
        }
        (libc::EEXIST | libc::EBUSY, Some(Blame::Bound(n))) => diverged(format!(
            "map {vmap} already holds number {n} for another verdict"
        )),
        (libc::ENOENT, Some(Blame::Unbound(n))) => {
            diverged(format!("map {vmap} has no number {n}"))
        }
        (_, Some(Blame::Bound(n) | Blame::Unbound(n))) => {
            let v = bound(n).0.map(|v| format!(" ({v})")).unwrap_or_default();
            failed(format!("map {vmap}, number {n}{v}: {what}"))
        }
        (libc::ENOENT, Some(Blame::Deleted(id))) => diverged(format!(
            "cgroup {}: no such element in map {}",
            name(*id),
            map.map
        )),
        (libc::EEXIST | libc::EBUSY, Some(Blame::Added(id))) => diverged(format!(
            "cgroup {}: map {} already holds another verdict for it",
            name(*id),
            map.map
        )),
        (_, Some(Blame::Added(id) | Blame::Deleted(id))) => {
            failed(format!("cgroup {}: {what}", name(*id)))
        }
        (libc::ENOENT, _) => missing(format!(
            "{} (or its map '{}' or '{vmap}' is missing)",
            load_table(table),
            map.map
        )),
        _ => failed(format!(
            "transaction on map {}: {what}{}",
            map.map,
            e.ext_msg.map(|m| format!(" ({m})")).unwrap_or_default()
        )),
    }
}

/// A flush of both maps refused.
pub fn explain_flush(errno: i32, map: &MapRef, verdicts: &MapRef) -> Error {
    match errno {
        libc::ENOENT => missing(load_table(&map.table)),
        libc::EPERM => failed(NO_CAP.into()),
        _ => failed(format!(
            "flush of maps {} and {}: {}",
            map.map,
            verdicts.map,
            errno_text(errno)
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn maps() -> (MapRef, MapRef) {
        let m = |n: &str| MapRef {
            table: "cgtproxy".into(),
            map: n.into(),
        };
        (m("cgroups"), m("verdicts"))
    }

    fn refused(errno: i32, blame: Option<&Blame>, kind: Option<ElemMsg>) -> Refused<'_> {
        Refused {
            errno,
            ext_msg: None,
            blame,
            kind,
        }
    }

    fn name(id: u64) -> String {
        format!("/app (id {id})")
    }

    /// What a refusal comes to: the next move and the sentence.
    pub(crate) fn said(e: &Error) -> (Next, String) {
        (e.next(), e.to_string())
    }

    #[test]
    fn each_refusal_is_one_sentence_and_one_next_move() {
        let (map, vmap) = maps();
        let plan = Plan {
            bind: vec![(3, Verdict::Goto("proxy".into()))],
            add: vec![(42, 3)],
            ..Plan::default()
        };
        let say = |errno, blame: Option<Blame>, kind| {
            explain(
                &refused(errno, blame.as_ref(), kind),
                &map,
                &vmap,
                &plan,
                &name,
            )
        };
        let cases = [
            (
                say(libc::ENOENT, Some(Blame::Table), None),
                (Next::WaitForTable,
                    "table inet cgtproxy does not exist — load nft/cgtproxy.nft first".into(),
                ),
            ),
            (
                say(libc::ENOENT, Some(Blame::Map("verdicts".into())), None),
                (Next::WaitForTable,
                    "map 'verdicts' does not exist in table inet cgtproxy".into(),
                ),
            ),
            (
                say(libc::ENOENT, Some(Blame::Bound(3)), Some(ElemMsg::New)),
                (Next::Log,
                    "chain 'proxy' (the verdict for cgroup /app (id 42)) does not exist in table inet cgtproxy".into(),
                ),
            ),
            (
                say(libc::EEXIST, Some(Blame::Bound(3)), Some(ElemMsg::New)),
                (Next::Resync,
                    "map verdicts already holds number 3 for another verdict".into(),
                ),
            ),
            (
                say(libc::ENOENT, Some(Blame::Unbound(4)), Some(ElemMsg::Del)),
                (Next::Resync, "map verdicts has no number 4".into()),
            ),
            (
                say(libc::ENOENT, Some(Blame::Deleted(42)), Some(ElemMsg::Del)),
                (Next::Resync,
                    "cgroup /app (id 42): no such element in map cgroups".into(),
                ),
            ),
            (
                say(libc::EEXIST, Some(Blame::Added(42)), Some(ElemMsg::New)),
                (Next::Resync,
                    "cgroup /app (id 42): map cgroups already holds another verdict for it".into(),
                ),
            ),
            (
                say(libc::ENOMEM, Some(Blame::Added(42)), Some(ElemMsg::New)),
                (Next::Log, "cgroup /app (id 42): Cannot allocate memory".into()),
            ),
            (
                say(libc::EPERM, Some(Blame::Table), None),
                (Next::Log, NO_CAP.into()),
            ),
            (
                say(libc::EOPNOTSUPP, Some(Blame::Deleted(42)), Some(ElemMsg::Destroy)),
                (Next::Resync,
                    "this kernel has no DESTROYSETELEM; deleting known elements only".into(),
                ),
            ),
            (
                say(libc::ENOENT, None, None),
                (Next::WaitForTable, "table inet cgtproxy does not exist — load nft/cgtproxy.nft first (or its map 'cgroups' or 'verdicts' is missing)".into()),
            ),
            (
                say(libc::E2BIG, None, None),
                (Next::Log, "transaction on map cgroups: Argument list too long".into()),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(said(&got), want);
        }
        // The extended ack's own words are kept when nothing else says more.
        let r = Refused {
            ext_msg: Some("set is full"),
            ..refused(libc::ENFILE, None, None)
        };
        assert_eq!(
            explain(&r, &map, &vmap, &plan, &name).to_string(),
            "transaction on map cgroups: Too many open files in system (set is full)"
        );
        // Destroy is the only message whose refusal means "old kernel".
        assert!(destroy_unsupported(
            libc::EOPNOTSUPP,
            Some(ElemMsg::Destroy)
        ));
        assert!(!destroy_unsupported(libc::EOPNOTSUPP, Some(ElemMsg::Del)));
        assert_eq!(
            said(&explain_flush(libc::ENOENT, &map, &vmap)),
            (Next::WaitForTable, load_table("cgtproxy"))
        );
    }
}
