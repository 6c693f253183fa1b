//! The session with the live ruleset: does it have what the config names,
//! what do the maps and rules hold (dumps), and committing a
//! `reconcile::Plan` as one transaction. It decides nothing: the plan,
//! verdict numbers included, is reconcile's, and the caller holds the
//! number table between transactions; a refusal becomes a sentence in
//! `refusal`.
//!
//! Two maps carry the state (see nft/cgtproxy.nft for why): `cgroups`, cgroup
//! id → verdict number, and `verdicts`, number → verdict. A dump reads each
//! element through `verdicts` ("element → number → verdict" is what the
//! kernel does with its packets).

use neli::consts::socket::NlFamily;

use crate::config::{Config, Verdict};
use crate::error::{Context, Error, Next};
use crate::netlink::{Conn, Kernel, Transport};
use crate::nftables::{
    self, Batch, ElemData, ElemMsg, Entry, MapRef, NF_DROP, NFT_CONTINUE, NFT_GOTO, NftVerdict,
    Object, Rule,
};
use crate::reconcile::{Element, FILLED, Numbers, Plan};
use crate::refusal::{self, Refused};
use crate::wire::Msg;

pub struct Ruleset<T: Transport = Kernel> {
    nl: Conn<T>,
    /// `cgroups`: cgroup id → verdict number.
    pub map: MapRef,
    /// `verdicts`: verdict number → verdict.
    pub verdicts: MapRef,
    /// DESTROYSETELEM (Linux 6.3+): deletes that never fail on a missing key.
    pub destroy: bool,
}

/// What the two maps hold: the `cgroups` elements, each read through
/// `verdicts`, and `verdicts` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub elements: Vec<Element>,
    pub numbers: Numbers,
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

/// A verdict as nf_tables encodes it.
pub fn to_wire(v: &Verdict) -> NftVerdict {
    let (code, chain) = match v {
        Verdict::Drop => (NF_DROP, None),
        Verdict::Goto(c) => (NFT_GOTO, Some(c.clone())),
        Verdict::Other(code, chain) => (*code, chain.clone()),
        // Never a rule's target; `continue` does what the ruleset does
        // with a number that has no verdict (on to `dispatch`'s drop).
        Verdict::Unbound(_) => (NFT_CONTINUE, None),
    };
    NftVerdict { code, chain }
}

/// What an nf_tables verdict means here.
pub fn from_wire(v: NftVerdict) -> Verdict {
    match (v.code, v.chain) {
        (NF_DROP, None) => Verdict::Drop,
        (NFT_GOTO, Some(c)) => Verdict::Goto(c),
        (code, chain) => Verdict::Other(code, chain),
    }
}

/// A netlink failure as an error: EPERM means the missing capability,
/// anything else is said with `what` was being done.
pub fn nl_error(what: &str, e: Error) -> Error {
    match e.errno() {
        Some(libc::EPERM) => Error::NoCapability,
        _ => e.context(what),
    }
}

impl Ruleset<Kernel> {
    /// The table and the two maps `cfg` names, over a new netlink socket.
    pub fn open(cfg: &Config) -> Result<Ruleset, Error> {
        let nl = Conn::open(NlFamily::Netfilter).context("netlink socket")?;
        Ok(Ruleset::on(nl, cfg, destroy_supported()))
    }
}

impl<T: Transport> Ruleset<T> {
    /// The table and maps `cfg` names, over `nl`; `destroy`: whether
    /// deletes may use DESTROYSETELEM.
    pub fn on(nl: Conn<T>, cfg: &Config, destroy: bool) -> Ruleset<T> {
        let map = |name: &str| MapRef {
            table: cfg.table.clone(),
            map: name.into(),
        };
        Ruleset {
            nl,
            map: map(&cfg.map),
            verdicts: map(&cfg.verdict_map),
            destroy,
        }
    }

    /// The conversation, for requests of other kinds and for tests.
    pub fn conn(&mut self) -> &mut Conn<T> {
        &mut self.nl
    }

    pub fn table_missing(&self) -> String {
        refusal::load_table(&self.map.table)
    }

    /// Asks the kernel for one object; `f` sees its reply. False when it
    /// does not exist.
    pub fn get(
        &mut self,
        obj: &Object<'_>,
        mut f: impl FnMut(&Msg<'_>) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let seq = self.nl.seq();
        match self
            .nl
            .request(&nftables::get_request(seq, obj), seq, false, |m| f(m))
        {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(nl_error("nf_tables", e)),
        }
    }

    /// The table, the two maps (of the right types) and every chain a rule
    /// names must exist. Missing ones are configuration errors (exit 2),
    /// reported all at once.
    pub fn check(&mut self, cfg: &Config) -> Result<(), Error> {
        let table = self.map.table.clone();
        if !self.get(&Object::Table(&table), |_| Ok(()))? {
            return Err(Error::Config(self.table_missing()).context(&cfg.source));
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
                    refusal::map_missing(&map),
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
                let why = format!("named by rules[{rule}].target");
                problems.push(refusal::chain_missing(chain, &why, &table));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")).context(&cfg.source));
        }
        Ok(())
    }

    /// A dump (asked again while interrupted: `each` sees `None` before
    /// each attempt); false when what it reads (table, map) is missing.
    fn dump_of(
        &mut self,
        what: &str,
        request: &dyn Fn(u32) -> Vec<u8>,
        each: &mut dyn FnMut(Option<&Msg<'_>>) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        match self.nl.dump(request, each) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(Error::Interrupted) => Err(Error::Runtime(format!(
                "interrupted {} times in a row",
                crate::netlink::DUMP_ATTEMPTS
            ))
            .context(what)),
            Err(e) => Err(nl_error(what, e)),
        }
    }

    /// Every element of `map`. `Ok(None)` when the table or map is missing.
    ///
    /// A dump read while the kernel resizes the set's hash table (deferred
    /// work after a large commit) walks it in another order from one part
    /// to the next, and parts resume by count: an element can come twice
    /// and another not at all, with no NLM_F_DUMP_INTR (no generation
    /// changed). A key seen twice says so: the dump is asked again, as an
    /// interrupted one is.
    fn dump_map(&mut self, map: &MapRef) -> Result<Option<Vec<Entry>>, Error> {
        let mut out = Vec::new();
        let mut seen = crate::cgroup::IdSet::default();
        let found = self.dump_of(
            &format!("dump of map {}", map.map),
            &|seq| nftables::dump_elements_request(seq, map),
            &mut |m| {
                let Some(m) = m else {
                    out.clear();
                    seen.clear();
                    return Ok(());
                };
                let (t, s, els) = nftables::parse_elements(m)?;
                if t == map.table && s == map.map {
                    for e in els {
                        if !seen.insert(e.key) {
                            return Err(Error::Interrupted);
                        }
                        out.push(e);
                    }
                }
                Ok(())
            },
        )?;
        Ok(found.then_some(out))
    }

    /// What the maps hold now, each element with the verdict its number
    /// stands for. `Ok(None)` when the table or either map is missing.
    pub fn dump(&mut self) -> Result<Option<Dump>, Error> {
        let verdicts = self.verdicts.clone();
        let Some(bound) = self.dump_map(&verdicts)? else {
            return Ok(None);
        };
        let numbers: Numbers = bound
            .into_iter()
            .filter_map(|e| match (u32::try_from(e.key), e.data) {
                (Ok(n), ElemData::Verdict(v)) => Some((n, from_wire(v))),
                _ => None,
            })
            .collect();
        let map = self.map.clone();
        let Some(entries) = self.dump_map(&map)? else {
            return Ok(None);
        };
        let verdict_of = |n: u32| {
            numbers
                .iter()
                .find(|(m, _)| *m == n)
                .map_or(Verdict::Unbound(n), |(_, v)| v.clone())
        };
        let elements = entries
            .into_iter()
            .map(|e| {
                let (number, verdict) = match e.data {
                    ElemData::Mark(n) => (Some(n), verdict_of(n)),
                    // Not our layout; reported, and replaced on write.
                    ElemData::Verdict(v) => (None, from_wire(v)),
                };
                Element {
                    id: e.key,
                    number,
                    verdict,
                    counter: e.counter,
                }
            })
            .collect();
        Ok(Some(Dump { elements, numbers }))
    }

    /// Every rule of the table, in chain order (none when it is missing).
    pub fn rules(&mut self) -> Result<Vec<Rule>, Error> {
        let table = self.map.table.clone();
        let mut out = Vec::new();
        self.dump_of(
            "dump of the rules",
            &|seq| nftables::dump_rules_request(seq, &table),
            &mut |m| {
                let Some(m) = m else {
                    out.clear();
                    return Ok(());
                };
                let rule = nftables::parse_rule(m)?;
                if rule.table == table {
                    out.push(rule);
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Sends `plan` as one transaction on both maps. `name` turns a cgroup
    /// id into words for error messages.
    pub fn commit(&mut self, plan: &Plan, name: &dyn Fn(u64) -> String) -> Result<(), Error> {
        if plan.is_empty() {
            return Ok(());
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
            plan.bind.iter().map(|(n, v)| (*n, Some(to_wire(v)))),
        );
        b.elements(kind, &self.map, plan.del.iter().map(|id| (*id, None)));
        b.elements(
            ElemMsg::New,
            &self.map,
            plan.add.iter().map(|(id, n)| (*id, Some(*n))),
        );
        let (bytes, info) = b.finish().context("encoding")?;
        self.nl.used_up_to(info.end_seq);
        let errors = match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(e) => e,
            // Dump and reconcile: whatever happened, the dump says.
            Err(e) if e.outcome_unknown() => {
                return Err(Error::Refused(
                    Next::Resync,
                    format!("transaction outcome unknown: {e}"),
                ));
            }
            Err(e) => return Err(e.context("transaction")),
        };
        let Some(e) = errors.first() else {
            return Ok(());
        };
        let refused = Refused {
            errno: e.errno,
            ext_msg: e.ext_msg.as_deref(),
            blame: info.blame(e.seq, e.offset),
            kind: info.kind(e.seq),
        };
        if refusal::destroy_unsupported(refused.errno, refused.kind) {
            self.destroy = false;
        }
        Err(refusal::explain(
            &refused,
            &self.map,
            &self.verdicts,
            plan,
            name,
        ))
    }

    /// `flush map inet TABLE cgroups; flush map inet TABLE verdicts`, as one
    /// transaction of its own, which puts the flag `FILLED : drop` back:
    /// emptied on purpose, the maps still say what holds (nothing is
    /// listed), so the ruleset records connections `direct` again, in strict
    /// mode too.
    pub fn flush(&mut self) -> Result<(), Error> {
        let mut b = Batch::new(self.nl.next_seq());
        b.flush(&self.map);
        b.flush(&self.verdicts);
        b.verdicts(
            ElemMsg::New,
            &self.verdicts,
            [(FILLED, Some(to_wire(&Verdict::Drop)))],
        );
        let (bytes, info) = b.finish().context("encoding")?;
        self.nl.used_up_to(info.end_seq);
        match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(errors) => match errors.first() {
                None => Ok(()),
                Some(e) => Err(refusal::explain_flush(e.errno, &self.map, &self.verdicts)),
            },
            Err(e) => Err(e.context(format_args!(
                "flush of maps {} and {}",
                self.map.map, self.verdicts.map
            ))),
        }
    }
}

/// Someone else's transactions on our table, read from the nf_tables
/// events: a transaction that touched the table, either map or their
/// elements means the maps may be wrong now. The kernel sends one event
/// per object changed, then NEWGEN with the committer's pid; a big
/// transaction (`flush ruleset` + include, as nftables.service does)
/// arrives over several reads, so whether it touched ours is kept until
/// its NEWGEN, not per read.
#[derive(Debug, Default)]
pub struct Monitor {
    /// The transaction being read touched our table or maps.
    touched: bool,
    /// The transaction being read added or removed our table, or a chain
    /// or rule of it (which may change the levels it looks up).
    rules_touched: bool,
    /// A transaction that did so ended since [`Monitor::rules_changed`] was
    /// last asked (or events were lost).
    rules_changed: bool,
}

impl Monitor {
    /// One event message: true when it ends (NEWGEN) a transaction of a
    /// process other than `me` that touched `map`'s table or either map.
    pub fn feed(&mut self, m: &Msg<'_>, map: &MapRef, verdicts: &MapRef, me: u32) -> bool {
        if m.ty >> 8 != nftables::NFNL_SUBSYS_NFTABLES {
            return false;
        }
        let kind = (m.ty & 0xff) as u8;
        if kind == nftables::NFT_MSG_NEWGEN {
            self.rules_changed |= std::mem::take(&mut self.rules_touched);
            let theirs = nftables::parse_newgen_pid(m).ok().flatten() != Some(me);
            return std::mem::take(&mut self.touched) && theirs;
        }
        let Ok((a, b)) = nftables::parse_names(m) else {
            return false;
        };
        // NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE} are all 1.
        self.rules_touched |= a == map.table
            && matches!(
                kind,
                nftables::NFT_MSG_NEWTABLE
                    | nftables::NFT_MSG_DELTABLE
                    | nftables::NFT_MSG_NEWCHAIN
                    | nftables::NFT_MSG_DELCHAIN
                    | nftables::NFT_MSG_NEWRULE
                    | nftables::NFT_MSG_DELRULE
            );
        self.touched |= match kind {
            nftables::NFT_MSG_NEWTABLE | nftables::NFT_MSG_DELTABLE => a == map.table,
            nftables::NFT_MSG_NEWSET
            | nftables::NFT_MSG_DELSET
            | nftables::NFT_MSG_NEWSETELEM
            | nftables::NFT_MSG_DELSETELEM
            | nftables::NFT_MSG_DESTROYSETELEM => {
                a == map.table && (b == map.map || b == verdicts.map)
            }
            _ => false,
        };
        false
    }

    /// Events were lost (ENOBUFS): the transaction read so far is
    /// forgotten; the caller resyncs, which covers it.
    pub fn lost(&mut self) {
        self.touched = false;
        self.rules_touched = false;
        self.rules_changed = true;
    }

    /// Whether a committed transaction changed our table's chains or rules
    /// (or events were lost, so it may have) since the last call: the
    /// levels the ruleset looks up are to be read again.
    pub fn rules_changed(&mut self) -> bool {
        std::mem::take(&mut self.rules_changed)
    }

    /// Every event queued on `events` now, never blocking: true when a
    /// resync is due. An error (lost events) forgets the transaction read
    /// so far; the caller resyncs.
    pub fn read<T: Transport>(
        &mut self,
        events: &mut Conn<T>,
        map: &MapRef,
        verdicts: &MapRef,
        me: u32,
    ) -> Result<bool, Error> {
        let mut resync = false;
        let r = events.drain(|m| resync |= self.feed(m, map, verdicts, me));
        if r.is_err() {
            self.lost();
        }
        r.map(|()| resync)
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
    kernel_has_destroy(&u.release().to_string_lossy())
}

/// Whether a kernel release string ("6.1.0-18-amd64") is 6.3 or later.
fn kernel_has_destroy(release: &str) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 3)
}

/// The session against a fake nf_tables (`nftables::fake`): the failure
/// paths that otherwise only a root end-to-end test reaches.
#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::netlink::fake::Fake;
    use crate::nftables::fake::FakeNft;
    use crate::nftables::{NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM, NFT_MSG_NEWSETELEM};
    use crate::reconcile::{self, Ops};
    use crate::refusal::tests::said;
    use crate::wire;

    fn cfg() -> Config {
        Config {
            source: "test.json".into(),
            ..reconcile::tests::cfg()
        }
    }

    fn session(k: &Rc<RefCell<FakeNft>>, destroy: bool) -> Ruleset<Fake> {
        let conn = Conn::with_seq(FakeNft::transport(k), 100);
        Ruleset::on(conn, &cfg(), destroy)
    }

    fn kernel(chains: &[&str]) -> Rc<RefCell<FakeNft>> {
        Rc::new(RefCell::new(FakeNft::cgtproxy("cgtproxy", chains)))
    }

    fn name(id: u64) -> String {
        format!("/app{id} (id {id})")
    }

    fn proxy() -> Verdict {
        Verdict::Goto("proxy".into())
    }

    /// Plans `ops` against `numbers` and commits it, as the daemon does.
    fn commit(rs: &mut Ruleset<Fake>, numbers: &mut Numbers, ops: &Ops<'_>) -> Result<(), Error> {
        let plan = reconcile::plan(numbers, ops);
        rs.commit(&plan, &name)?;
        *numbers = plan.numbers;
        Ok(())
    }

    #[test]
    fn commits_a_plan_and_dumps_it_back() {
        let k = kernel(&["proxy"]);
        let mut rs = session(&k, true);
        rs.check(&cfg()).unwrap();
        let (p, drop) = (proxy(), Verdict::Drop);
        let ops = Ops {
            add: vec![(10, &p), (11, &drop), (12, &p)],
            ..Ops::default()
        };
        let mut numbers = Numbers::new();
        commit(&mut rs, &mut numbers, &ops).unwrap();
        assert_eq!(numbers, vec![(1, proxy()), (2, Verdict::Drop)]);
        let d = rs.dump().unwrap().unwrap();
        assert_eq!(d.numbers, numbers);
        let got: Vec<(u64, Option<u32>, Verdict)> = d
            .elements
            .iter()
            .map(|e| (e.id, e.number, e.verdict.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, Some(1), proxy()),
                (11, Some(2), Verdict::Drop),
                (12, Some(1), proxy())
            ]
        );
        assert_eq!(d.elements[0].counter, Some((0, 0)));
        assert_eq!(k.borrow().commits, 1);
        // One datagram for the transaction: BEGIN, verdicts, cgroups, END.
        let sent = rs.conn().transport().sent.clone();
        let batch = sent.iter().find(|d| d[4] == 0x10).unwrap();
        let types: Vec<u16> = wire::messages(batch).map(|m| m.unwrap().ty).collect();
        assert_eq!(types, vec![0x10, 0x0a0c, 0x0a0c, 0x11]);
    }

    /// A verdict naming a chain the table lacks: the bind is refused with
    /// ENOENT at the `verdicts` element, said as the chain and the cgroup
    /// that needs it, and nothing changes.
    #[test]
    fn enoent_on_a_bind_names_the_chain_and_the_cgroup() {
        let k = kernel(&[]);
        let mut rs = session(&k, true);
        let p = proxy();
        let ops = Ops {
            add: vec![(42, &p)],
            ..Ops::default()
        };
        let mut numbers = Numbers::new();
        let e = commit(&mut rs, &mut numbers, &ops).unwrap_err();
        assert_eq!(
            said(&e),
            (Next::Log, "chain 'proxy' (the verdict for cgroup /app42 (id 42)) does not exist in table inet cgtproxy".to_string())
        );
        assert!(
            numbers.is_empty(),
            "a refused plan does not move the numbers"
        );
        let k = k.borrow();
        assert_eq!(k.commits, 0);
        assert!(k.sets["cgroups"].elems.is_empty() && k.sets["verdicts"].elems.is_empty());
    }

    /// A map removed: `check` says which and where it is configured; a dump
    /// says "missing" (the daemon waits for it); a commit blames the map.
    #[test]
    fn a_missing_map_is_a_config_error_a_missing_dump_and_a_wait() {
        let k = kernel(&["proxy"]);
        k.borrow_mut().sets.remove("verdicts");
        let mut rs = session(&k, true);
        let e = rs.check(&cfg()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "test.json: map 'verdicts' does not exist in table inet cgtproxy — load nft/cgtproxy.nft, or fix \"verdict-map\""
        );
        assert_eq!(rs.dump().unwrap(), None);
        let p = proxy();
        let ops = Ops {
            add: vec![(1, &p)],
            ..Ops::default()
        };
        let e = commit(&mut rs, &mut Numbers::new(), &ops).unwrap_err();
        assert_eq!(
            said(&e),
            (
                Next::WaitForTable,
                "map 'verdicts' does not exist in table inet cgtproxy".to_string()
            )
        );
        // And the table itself.
        k.borrow_mut().table = None;
        let e = rs.check(&cfg()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "test.json: table inet cgtproxy does not exist — load nft/cgtproxy.nft first"
        );
        let e = commit(&mut rs, &mut Numbers::new(), &ops).unwrap_err();
        assert_eq!(said(&e), (Next::WaitForTable, rs.table_missing()));
    }

    /// Before Linux 6.3 DESTROYSETELEM is refused: the session says so once,
    /// falls back to plain deletes (DELSETELEM) for good, and a plain delete
    /// of an element someone else removed is "diverged" (dump and retry).
    #[test]
    fn pre_6_3_kernels_get_plain_deletes() {
        let k = kernel(&["proxy"]);
        k.borrow_mut().no_destroy = true;
        let mut rs = session(&k, true);
        let p = proxy();
        let mut numbers = Numbers::new();
        let add = Ops {
            add: vec![(1, &p), (2, &p)],
            ..Ops::default()
        };
        commit(&mut rs, &mut numbers, &add).unwrap();
        let del = Ops {
            del: vec![1],
            ..Ops::default()
        };
        let e = commit(&mut rs, &mut numbers, &del).unwrap_err();
        assert_eq!(
            said(&e),
            (
                Next::Resync,
                "this kernel has no DESTROYSETELEM; deleting known elements only".to_string()
            )
        );
        assert!(!rs.destroy);
        assert_eq!(k.borrow().sets["cgroups"].elems.len(), 2, "all or nothing");
        k.borrow_mut().elem_msgs.clear();
        commit(&mut rs, &mut numbers, &del).unwrap();
        assert_eq!(k.borrow().elem_msgs, vec![NFT_MSG_DELSETELEM]);
        assert_eq!(
            k.borrow().sets["cgroups"].elems.keys().collect::<Vec<_>>(),
            vec![&2]
        );
        // Someone else deleted 2: a plain delete of it is refused.
        k.borrow_mut()
            .sets
            .get_mut("cgroups")
            .unwrap()
            .elems
            .remove(&2);
        let del2 = Ops {
            del: vec![2],
            ..Ops::default()
        };
        let e = commit(&mut rs, &mut numbers, &del2).unwrap_err();
        assert_eq!(
            said(&e),
            (
                Next::Resync,
                "cgroup /app2 (id 2): no such element in map cgroups".to_string()
            )
        );
        // With DESTROYSETELEM (6.3+) the same delete is fine.
        let k6 = kernel(&["proxy"]);
        let mut rs6 = session(&k6, true);
        commit(&mut rs6, &mut Numbers::new(), &del2).unwrap();
        assert_eq!(k6.borrow().elem_msgs, vec![NFT_MSG_DESTROYSETELEM]);
    }

    /// A session whose map holds cgroups 7 and 8, both `proxy`.
    fn two_proxied() -> (Rc<RefCell<FakeNft>>, Ruleset<Fake>) {
        let k = kernel(&["proxy"]);
        let mut rs = session(&k, true);
        let p = proxy();
        let ops = Ops {
            add: vec![(7, &p), (8, &p)],
            ..Ops::default()
        };
        commit(&mut rs, &mut Numbers::new(), &ops).unwrap();
        (k, rs)
    }

    /// A dump the kernel marks interrupted (the map changed under it) is
    /// asked again, and only the last, consistent attempt counts; one that
    /// never settles is an error that says so.
    #[test]
    fn an_interrupted_dump_is_asked_again() {
        let (k, mut rs) = two_proxied();
        let sent_before = rs.conn().transport().sent.len();
        k.borrow_mut().interrupt = 3;
        let d = rs.dump().unwrap().unwrap();
        assert_eq!(d.elements.len(), 2, "no element counted twice");
        assert_eq!(d.numbers, vec![(1, proxy())]);
        // verdicts: 3 interrupted + 1; cgroups: 1.
        assert_eq!(rs.conn().transport().sent.len() - sent_before, 5);
        k.borrow_mut().interrupt = usize::MAX;
        let e = rs.dump().unwrap_err();
        assert_eq!(
            e.to_string(),
            "dump of map verdicts: interrupted 10 times in a row"
        );
    }

    /// A dump that lists an element twice (read across a resize of the
    /// kernel's hash table, which sets no NLM_F_DUMP_INTR) may have missed
    /// another: it is asked again like an interrupted one, and never
    /// returns the repeat.
    /// How it can fail: a dump taken as it came, counting 3 elements of 2
    /// (and, in the kernel, missing one that is there).
    #[test]
    fn a_dump_that_repeats_an_element_is_asked_again() {
        let (k, mut rs) = two_proxied();
        let sent_before = rs.conn().transport().sent.len();
        k.borrow_mut().repeat = 2;
        let d = rs.dump().unwrap().unwrap();
        let mut ids: Vec<u64> = d.elements.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![7, 8], "each element once");
        // verdicts: 2 repeated + 1; cgroups: 1.
        assert_eq!(rs.conn().transport().sent.len() - sent_before, 4);
        k.borrow_mut().repeat = usize::MAX;
        let e = rs.dump().unwrap_err();
        assert_eq!(
            e.to_string(),
            "dump of map verdicts: interrupted 10 times in a row"
        );
    }

    /// 20,000 elements: one transaction (one datagram, BEGIN … END), split
    /// into element lists that each stay under the 64 KiB attribute limit,
    /// every element landing.
    #[test]
    fn a_large_plan_is_split_below_64k_in_one_transaction() {
        let k = kernel(&["proxy"]);
        let mut rs = session(&k, true);
        let p = proxy();
        let ops = Ops {
            add: (1..=20_000u64).map(|id| (id, &p)).collect(),
            ..Ops::default()
        };
        commit(&mut rs, &mut Numbers::new(), &ops).unwrap();
        let sent = rs.conn().transport().sent.last().unwrap().clone();
        let msgs: Vec<_> = wire::messages(&sent).map(|m| m.unwrap()).collect();
        assert!(msgs.len() > 6, "split: {} messages", msgs.len());
        assert_eq!((msgs[0].ty, msgs[msgs.len() - 1].ty), (0x10, 0x11));
        for m in &msgs {
            assert!(
                m.payload.len() + 16 < 65_536,
                "message of {} bytes",
                m.payload.len()
            );
        }
        assert!(
            rs.conn().transport().reserved >= msgs.len() * 1024,
            "room for every ack"
        );
        let k = k.borrow();
        assert_eq!(k.commits, 1);
        assert_eq!(k.sets["cgroups"].elems.len(), 20_000);
        assert!(k.elem_msgs.iter().all(|t| *t == NFT_MSG_NEWSETELEM));
    }

    #[test]
    fn kernel_release_strings() {
        for (r, has) in [
            ("6.3.0", true),
            ("6.18.44-fc-v669", true),
            ("6.1.0-18-amd64", false),
            ("5.15.0", false),
            ("7.0", true),
            ("garbage", false),
        ] {
            assert_eq!(kernel_has_destroy(r), has, "{r}");
        }
    }

    /// Events of other processes' transactions, as the kernel multicasts
    /// them, fed to a `Monitor` through the fake transport, one wakeup per
    /// `Monitor::read`.
    mod monitor {
        use super::*;
        use crate::nftables::fake::{elements_msg, event, newgen};
        use crate::nftables::{
            NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWTABLE,
        };

        const ME: u32 = 4242;
        const NFT: u32 = 777;

        fn maps() -> (MapRef, MapRef) {
            let rs = Ruleset::on(Conn::with_seq(Fake::new(|_| Ok(vec![])), 1), &cfg(), true);
            (rs.map, rs.verdicts)
        }

        fn events() -> Conn<Fake> {
            Conn::with_seq(Fake::new(|_| Ok(vec![])), 1)
        }

        /// One wakeup: `datagrams` queued, then everything queued read.
        fn wakeup(
            mon: &mut Monitor,
            ev: &mut Conn<Fake>,
            datagrams: Vec<Vec<u8>>,
        ) -> Result<bool, Error> {
            let (map, verdicts) = maps();
            for d in datagrams {
                ev.transport().push(d);
            }
            mon.read(ev, &map, &verdicts, ME)
        }

        /// `flush ruleset` + the ruleset's include, as nftables.service
        /// runs it: its events over two wakeups, the part after the split
        /// naming only another table's set and chains. The refill is due
        /// at NEWGEN all the same (a7411ba); with the flag kept per read it
        /// never came, and the emptied maps stayed empty.
        #[test]
        fn a_transaction_split_over_two_reads_still_resyncs() {
            let mut mon = Monitor::default();
            let mut ev = events();
            let first = [
                event(NFT_MSG_DELTABLE, "cgtproxy", None),
                event(NFT_MSG_NEWTABLE, "cgtproxy", None),
                event(NFT_MSG_NEWSET, "cgtproxy", Some("cgroups")),
                event(NFT_MSG_NEWSET, "cgtproxy", Some("verdicts")),
            ]
            .concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![first]).unwrap());
            let second = [
                event(NFT_MSG_NEWTABLE, "filter", None),
                event(NFT_MSG_NEWSET, "filter", Some("blocked")),
                event(NFT_MSG_NEWCHAIN, "filter", Some("input")),
                newgen(2, Some(NFT)),
            ]
            .concat();
            assert!(wakeup(&mut mon, &mut ev, vec![second]).unwrap());
            // Once: the next transaction starts untouched.
            let other = [
                event(NFT_MSG_NEWSET, "filter", Some("blocked")),
                newgen(3, Some(NFT)),
            ]
            .concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![other]).unwrap());
        }

        /// Two datagrams queued before one wakeup: two recv() calls in one
        /// read, the transaction's touch in the first, its NEWGEN in the
        /// second.
        #[test]
        fn a_transaction_in_two_datagrams_of_one_read_resyncs() {
            let mut mon = Monitor::default();
            let mut ev = events();
            let touch = elements_msg(
                0,
                0,
                ("cgtproxy", "verdicts"),
                1,
                &ElemData::Verdict(to_wire(&Verdict::Drop)),
                None,
            );
            let end = newgen(2, Some(NFT));
            assert!(wakeup(&mut mon, &mut ev, vec![touch, end]).unwrap());
            assert!(
                ev.transport().sent.is_empty(),
                "reading events sends nothing"
            );
        }

        /// What is not a change to our maps by someone else: our own
        /// commits, another table's set of the same name, rules and chains
        /// of our table (the ruleset's business, not the maps'), other
        /// subsystems' messages. A NEWGEN without a pid is someone else's.
        #[test]
        fn our_own_commits_and_other_objects_do_not_resync() {
            let mut mon = Monitor::default();
            let mut ev = events();
            let add =
                |set: &str| elements_msg(0, 0, ("cgtproxy", set), 7, &ElemData::Mark(1), None);
            let ours = [add("cgroups"), newgen(2, Some(ME))].concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![ours]).unwrap());
            let elsewhere = [
                event(NFT_MSG_NEWSET, "other", Some("cgroups")),
                event(NFT_MSG_NEWTABLE, "other", None),
                event(NFT_MSG_NEWSET, "cgtproxy", Some("dns")),
                event(NFT_MSG_NEWCHAIN, "cgtproxy", Some("verdicts")),
                event(NFT_MSG_NEWRULE, "cgtproxy", Some("cgroups")),
                newgen(3, Some(NFT)),
            ]
            .concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![elsewhere]).unwrap());
            let mut foreign = add("cgroups");
            foreign[5] = 6; // NFNL_SUBSYS_IPSET, not nf_tables (10)
            let anonymous = [foreign, newgen(4, None)].concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![anonymous]).unwrap());
            let anonymous = [add("cgroups"), newgen(5, None)].concat();
            assert!(wakeup(&mut mon, &mut ev, vec![anonymous]).unwrap());
        }

        /// Chains and rules of our table (a reload with other levels, an
        /// edit) are not the maps' business but the depth's: once their
        /// transaction ends, `rules_changed` says so, once. Another
        /// table's rules and our own element commits do not; lost events
        /// might have, so they do too.
        #[test]
        fn rule_changes_of_our_table_are_told_once_at_newgen() {
            let mut mon = Monitor::default();
            let mut ev = events();
            let rule = event(NFT_MSG_NEWRULE, "cgtproxy", Some("output"));
            assert!(!wakeup(&mut mon, &mut ev, vec![rule]).unwrap());
            assert!(!mon.rules_changed(), "not before the transaction ends");
            assert!(!wakeup(&mut mon, &mut ev, vec![newgen(2, Some(NFT))]).unwrap());
            assert!(mon.rules_changed());
            assert!(!mon.rules_changed(), "once");
            let others = [
                event(NFT_MSG_NEWRULE, "filter", Some("output")),
                event(NFT_MSG_NEWCHAIN, "filter", Some("output")),
                elements_msg(0, 0, ("cgtproxy", "cgroups"), 7, &ElemData::Mark(1), None),
                newgen(3, Some(ME)),
            ]
            .concat();
            assert!(!wakeup(&mut mon, &mut ev, vec![others]).unwrap());
            assert!(!mon.rules_changed(), "other tables' rules, our elements");
            let reload = [
                event(NFT_MSG_DELTABLE, "cgtproxy", None),
                event(NFT_MSG_NEWTABLE, "cgtproxy", None),
                event(NFT_MSG_NEWCHAIN, "cgtproxy", Some("output")),
                newgen(4, Some(NFT)),
            ]
            .concat();
            assert!(wakeup(&mut mon, &mut ev, vec![reload]).unwrap());
            assert!(mon.rules_changed(), "a reload of the table");
            ev.transport().push_error(Error::Lost);
            let (map, verdicts) = maps();
            assert!(mon.read(&mut ev, &map, &verdicts, ME).is_err());
            assert!(mon.rules_changed(), "lost events may have changed them");
        }

        /// ENOBUFS: the read fails (the caller resyncs), and what was read
        /// of the transaction before it is forgotten, so its NEWGEN after
        /// the loss does not ask for a second resync.
        #[test]
        fn lost_events_fail_the_read_and_forget_the_transaction() {
            let mut mon = Monitor::default();
            let mut ev = events();
            let touch = event(NFT_MSG_NEWSET, "cgtproxy", Some("cgroups"));
            ev.transport().push(touch);
            ev.transport().push_error(Error::Lost);
            let (map, verdicts) = maps();
            let e = mon.read(&mut ev, &map, &verdicts, ME).unwrap_err();
            assert!(matches!(e, Error::Lost) && e.outcome_unknown());
            let end = newgen(2, Some(NFT));
            assert!(!wakeup(&mut mon, &mut ev, vec![end]).unwrap());
        }
    }
}
