//! The live ruleset, over netlink: does it have what the config names, what
//! does the map hold, and the transactions that change it. Kernel errors
//! become sentences that name the table, map, chain or cgroup.
//!
//! Two maps carry the state (see nft/cgtproxy.nft for why): `cgroups`, cgroup
//! id → verdict number, and `verdicts`, number → verdict. A dump reads each
//! element through `verdicts` ("element → number → verdict" is what the
//! kernel does with its packets); a transaction is a `reconcile::Plan`,
//! both maps in one batch.

use std::io;

use neli::consts::socket::NlFamily;

use crate::config::{Config, Verdict};
use crate::error::Error;
use crate::netlink::{NlError, Socket};
use crate::nftables::{self, Batch, Blame, Data, ElemMsg, Element, Entry, MapRef, Object};
use crate::reconcile::{self, Ops, Renumber};
use crate::wire::ErrorMsg;

pub struct Ruleset {
    nl: Socket,
    /// `cgroups`: cgroup id → verdict number.
    pub map: MapRef,
    /// `verdicts`: verdict number → verdict.
    pub verdicts: MapRef,
    /// DESTROYSETELEM (Linux 6.3+): deletes that never fail on a missing key.
    pub destroy: bool,
    /// `verdicts` as last dumped, with this process's commits since. Any
    /// other writer's change to it makes the daemon dump again.
    numbers: Vec<(u32, Verdict)>,
}

/// The two maps cgtproxy writes, for checking what the kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapRole {
    /// `cgroups`: cgroup id → verdict number, with counters.
    Cgroups,
    /// `verdicts`: verdict number → verdict.
    Verdicts,
}

impl MapRole {
    /// The config key that names it.
    pub fn key(self) -> &'static str {
        match self {
            MapRole::Cgroups => "map",
            MapRole::Verdicts => "verdict-map",
        }
    }

    /// What is wrong with the type of `map`, as a sentence, if anything.
    pub fn misfit(self, map: &MapRef, info: &nftables::SetInfo) -> Option<String> {
        let (fits, want) = match self {
            MapRole::Cgroups => (info.is_number_map(), "type cgroupsv2 : mark; counter;"),
            MapRole::Verdicts => (info.is_verdict_map(), "type mark : verdict;"),
        };
        let old = self == MapRole::Cgroups && info.verdict_data;
        (!fits).then(|| {
            format!(
                "'{}' in table inet {} is not a map of the type cgtproxy writes (want: map {} {{ {want} }}){}",
                map.map,
                map.table,
                map.map,
                if old {
                    "; it is a verdict map, the layout of cgtproxy 0.1: load this version's nft/cgtproxy.nft"
                } else {
                    ""
                }
            )
        })
    }
}

/// Why a transaction failed, as far as the daemon's next move goes.
#[derive(Debug)]
pub enum ApplyError {
    /// The table or the map is gone: wait for the ruleset to come back.
    Missing(String),
    /// The map did not hold what we thought (EEXIST / ENOENT on an
    /// element), or the outcome is unknown: dump and reconcile.
    Diverged(String),
    /// Anything else (a chain went missing, permissions …): logged.
    Failed(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Missing(m) | ApplyError::Diverged(m) | ApplyError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    // "No such file or directory (os error 2)" → "No such file or directory"
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

/// A netlink failure as an error: EPERM means the missing capability,
/// anything else is said with `what` was being done.
pub fn nl_error(what: &str, e: NlError) -> Error {
    match e {
        NlError::Kernel(ErrorMsg {
            errno: libc::EPERM, ..
        }) => Error::Runtime("nf_tables: permission denied (cgtproxy needs CAP_NET_ADMIN)".into()),
        e => Error::Runtime(format!("{what}: {e}")),
    }
}

impl Ruleset {
    /// The table and the two maps `cfg` names.
    pub fn open(cfg: &Config) -> Result<Ruleset, Error> {
        let nl = Socket::open(NlFamily::Netfilter)
            .map_err(|e| Error::Runtime(format!("netlink socket: {e}")))?;
        let map = |name: &str| MapRef {
            table: cfg.table.clone(),
            map: name.into(),
        };
        Ok(Ruleset {
            nl,
            map: map(&cfg.map),
            verdicts: map(&cfg.verdict_map),
            destroy: destroy_supported(),
            numbers: Vec::new(),
        })
    }

    /// The socket, for read-only requests of other kinds (`check` dumps rules).
    pub fn socket(&mut self) -> &mut Socket {
        &mut self.nl
    }

    pub fn table_missing(&self) -> String {
        format!(
            "table inet {} does not exist — load nft/cgtproxy.nft first",
            self.map.table
        )
    }

    fn map_missing(&self, map: &MapRef) -> String {
        format!(
            "map '{}' does not exist in table inet {}",
            map.map, map.table
        )
    }

    /// Asks the kernel for one object; `f` sees its reply. False when it
    /// does not exist.
    pub fn get(
        &mut self,
        obj: &Object<'_>,
        mut f: impl FnMut(&crate::wire::Msg<'_>) -> Result<(), NlError>,
    ) -> Result<bool, Error> {
        let seq = self.nl.seq();
        match self
            .nl
            .request(&nftables::get_request(seq, obj), seq, false, |m| f(m))
        {
            Ok(()) => Ok(true),
            Err(NlError::Kernel(ErrorMsg {
                errno: libc::ENOENT,
                ..
            })) => Ok(false),
            Err(e) => Err(nl_error("nf_tables", e)),
        }
    }

    /// The table, the two maps (of the right types) and every chain a rule
    /// names must exist. Missing ones are configuration errors (exit 2),
    /// reported all at once.
    pub fn check(&mut self, cfg: &Config) -> Result<(), Error> {
        let table = self.map.table.clone();
        if !self.get(&Object::Table(&table), |_| Ok(()))? {
            return Err(Error::Config(format!(
                "{}: {}",
                cfg.source,
                self.table_missing()
            )));
        }
        let mut problems = Vec::new();
        for (map, role) in [
            (self.map.clone(), MapRole::Cgroups),
            (self.verdicts.clone(), MapRole::Verdicts),
        ] {
            let mut info = None;
            if !self.get(&Object::Set(&table, &map.map), |m| {
                info = Some(nftables::parse_set(m)?);
                Ok(())
            })? {
                problems.push(format!(
                    "{} — load nft/cgtproxy.nft, or fix \"{}\"",
                    self.map_missing(&map),
                    role.key()
                ));
                continue;
            }
            if let Some(p) = info.and_then(|i| role.misfit(&map, &i)) {
                problems.push(p);
            }
        }
        for (chain, rule) in cfg.chains() {
            if !self.get(&Object::Chain(&table, chain), |_| Ok(()))? {
                problems.push(format!("chain '{chain}' named by rules[{rule}].target does not exist in table inet {table}"));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(format!(
                "{}: {}",
                cfg.source,
                problems.join("; ")
            )));
        }
        Ok(())
    }

    /// Every element of `map`. `Ok(None)` when the table or map is missing.
    fn dump_map(&mut self, map: &MapRef) -> Result<Option<Vec<Entry>>, Error> {
        // A dump is interrupted when the map changes under it; try again.
        for _ in 0..10 {
            let seq = self.nl.seq();
            let req = nftables::dump_elements_request(seq, map);
            let mut out = Vec::new();
            let r = self.nl.request(&req, seq, true, |m| {
                let (t, s, els) = nftables::parse_elements(m)?;
                if t == map.table && s == map.map {
                    out.extend(els);
                }
                Ok(())
            });
            match r {
                Ok(()) => return Ok(Some(out)),
                Err(NlError::Kernel(ErrorMsg {
                    errno: libc::ENOENT,
                    ..
                })) => return Ok(None),
                Err(NlError::Unknown("interrupted dump")) => continue,
                Err(e) => return Err(nl_error(&format!("dump of map {}", map.map), e)),
            }
        }
        Err(Error::Runtime(format!(
            "dump of map {}: interrupted ten times in a row",
            map.map
        )))
    }

    /// What the map holds now, each element with the verdict its number
    /// stands for. `Ok(None)` when the table or either map is missing.
    pub fn dump(&mut self) -> Result<Option<Vec<Element>>, Error> {
        let verdicts = self.verdicts.clone();
        let Some(bound) = self.dump_map(&verdicts)? else {
            return Ok(None);
        };
        self.numbers = bound
            .into_iter()
            .filter_map(|e| match (u32::try_from(e.key), e.data) {
                (Ok(n), Data::Verdict(v)) => Some((n, v)),
                _ => None,
            })
            .collect();
        let map = self.map.clone();
        let Some(entries) = self.dump_map(&map)? else {
            return Ok(None);
        };
        Ok(Some(
            entries
                .into_iter()
                .map(|e| {
                    let (number, verdict) = match e.data {
                        Data::Number(n) => (Some(n), self.verdict_of(n)),
                        // Not our layout; reported, and replaced on write.
                        Data::Verdict(v) => (None, v),
                    };
                    Element {
                        id: e.key,
                        number,
                        verdict,
                        counter: e.counter,
                    }
                })
                .collect(),
        ))
    }

    fn verdict_of(&self, n: u32) -> Verdict {
        self.numbers
            .iter()
            .find(|(m, _)| *m == n)
            .map_or(Verdict::Unbound(n), |(_, v)| v.clone())
    }

    /// `verdicts` as last dumped, with this process's commits since.
    pub fn numbers(&self) -> &[(u32, Verdict)] {
        &self.numbers
    }

    /// Applies `ops` as one transaction on both maps (see `reconcile::plan`
    /// for the numbers). Returns the numbers it changed. `name` turns a
    /// cgroup id into words for error messages.
    pub fn apply(
        &mut self,
        ops: &Ops<'_>,
        name: &dyn Fn(u64) -> String,
    ) -> Result<Vec<Renumber>, ApplyError> {
        let plan = reconcile::plan(&self.numbers, ops);
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let kind = if self.destroy {
            ElemMsg::Destroy
        } else {
            ElemMsg::Del
        };
        let mut b = Batch::new(self.nl.next_seq());
        b.verdicts(kind, &self.verdicts, plan.unbind.iter().map(|n| (*n, None)));
        b.verdicts(
            ElemMsg::New,
            &self.verdicts,
            plan.bind.iter().map(|(n, v)| (*n, Some(v))),
        );
        b.elements(kind, &self.map, plan.del.iter().map(|id| (*id, None)));
        b.elements(
            ElemMsg::New,
            &self.map,
            plan.add.iter().map(|(id, n)| (*id, Some(*n))),
        );
        let (bytes, info) = b
            .finish()
            .map_err(|e| ApplyError::Failed(format!("encoding: {e}")))?;
        self.nl.used_up_to(info.end_seq);
        let errors = match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(e) => e,
            Err(e @ NlError::Unknown(_)) => {
                return Err(ApplyError::Diverged(format!(
                    "transaction outcome unknown: {e}"
                )));
            }
            Err(e) => return Err(ApplyError::Failed(format!("transaction: {e}"))),
        };
        let Some(e) = errors.first() else {
            let changed = plan.renumbered(&self.numbers);
            self.numbers = plan.numbers;
            return Ok(changed);
        };
        let what = errno_text(e.errno);
        // The verdict a number was being bound to, and a cgroup that needs it.
        let bound = |n: &u32| {
            let v = plan.bind.iter().find(|(m, _)| m == n).map(|(_, v)| v);
            let id = plan.add.iter().find(|(_, m)| m == n).map(|(id, _)| *id);
            (v, id)
        };
        let (table, verdicts) = (&self.map.table, &self.verdicts.map);
        Err(match (e.errno, info.blame(e.seq, e.offset)) {
            (libc::EPERM, _) => ApplyError::Failed(
                "nf_tables: permission denied (cgtproxy needs CAP_NET_ADMIN)".into(),
            ),
            (libc::EOPNOTSUPP | libc::EINVAL, _) if info.kind(e.seq) == Some(ElemMsg::Destroy) => {
                // A kernel older than 6.3 (or a backport without it).
                self.destroy = false;
                ApplyError::Diverged(
                    "this kernel has no DESTROYSETELEM; deleting known elements only".into(),
                )
            }
            (libc::ENOENT, Some(Blame::Table)) => ApplyError::Missing(self.table_missing()),
            (libc::ENOENT, Some(Blame::Map(m))) => {
                ApplyError::Missing(format!("map '{m}' does not exist in table inet {table}"))
            }
            // A number fails to bind with ENOENT only when its goto names a
            // missing chain.
            (libc::ENOENT, Some(Blame::Bound(n))) => {
                let (v, id) = bound(n);
                let chain = match v {
                    Some(Verdict::Goto(c)) => c.as_str(),
                    _ => "?",
                };
                ApplyError::Failed(format!(
                    "chain '{chain}' (the verdict for cgroup {}) does not exist in table inet {table}",
                    id.map_or_else(|| "?".into(), name)
                ))
            }
            (libc::EEXIST | libc::EBUSY, Some(Blame::Bound(n))) => ApplyError::Diverged(format!(
                "map {verdicts} already holds number {n} for another verdict"
            )),
            (libc::ENOENT, Some(Blame::Unbound(n))) => {
                ApplyError::Diverged(format!("map {verdicts} has no number {n}"))
            }
            (_, Some(Blame::Bound(n) | Blame::Unbound(n))) => {
                let v = bound(n).0.map(|v| format!(" ({v})")).unwrap_or_default();
                ApplyError::Failed(format!("map {verdicts}, number {n}{v}: {what}"))
            }
            (libc::ENOENT, Some(Blame::Deleted(id))) => ApplyError::Diverged(format!(
                "cgroup {}: no such element in map {}",
                name(*id),
                self.map.map
            )),
            (libc::EEXIST | libc::EBUSY, Some(Blame::Added(id))) => ApplyError::Diverged(format!(
                "cgroup {}: map {} already holds another verdict for it",
                name(*id),
                self.map.map
            )),
            (_, Some(Blame::Added(id) | Blame::Deleted(id))) => {
                ApplyError::Failed(format!("cgroup {}: {what}", name(*id)))
            }
            (libc::ENOENT, _) => ApplyError::Missing(format!(
                "{} (or its map '{}' or '{verdicts}' is missing)",
                self.table_missing(),
                self.map.map
            )),
            _ => ApplyError::Failed(format!(
                "transaction on map {}: {what}{}",
                self.map.map,
                e.ext_msg
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            )),
        })
    }

    /// `flush map inet TABLE cgroups; flush map inet TABLE verdicts`, as one
    /// transaction of its own.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        let mut b = Batch::new(self.nl.next_seq());
        b.flush(&self.map);
        b.flush(&self.verdicts);
        let (bytes, info) = b
            .finish()
            .map_err(|e| ApplyError::Failed(format!("encoding: {e}")))?;
        self.nl.used_up_to(info.end_seq);
        let maps = format!("maps {} and {}", self.map.map, self.verdicts.map);
        match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(errors) if errors.is_empty() => {
                self.numbers.clear();
                Ok(())
            }
            Ok(errors) if errors[0].errno == libc::ENOENT => {
                Err(ApplyError::Missing(self.table_missing()))
            }
            Ok(errors) => Err(ApplyError::Failed(format!(
                "flush of {maps}: {}",
                errno_text(errors[0].errno)
            ))),
            Err(e) => Err(ApplyError::Failed(format!("flush of {maps}: {e}"))),
        }
    }
}

/// DESTROYSETELEM arrived in Linux 6.3. Older kernels (and odd version
/// strings) get plain deletes of known elements. `CGTPROXY_NO_DESTROY=1`
/// forces the older way, for kernels whose backports misbehave and for
/// testing it on a new kernel.
fn destroy_supported() -> bool {
    if std::env::var_os("CGTPROXY_NO_DESTROY").is_some_and(|v| v == "1") {
        return false;
    }
    let u = rustix::system::uname();
    let rel = u.release().to_string_lossy();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 3)
}
