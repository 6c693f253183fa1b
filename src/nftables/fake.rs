//! A fake nf_tables for tests without root: a model of one table, its
//! sets, chains and rules, answering what cgtproxy sends the way the
//! kernel does (existence checks, element and rule dumps, batches applied
//! all or nothing, errors with extended-ack offsets), plus the failures
//! only a real kernel gave before: no DESTROYSETELEM (before 6.3),
//! interrupted dumps, a table or map removed. Decodes with the codec's own
//! parsers and encodes with its layout, so a test of the session checks
//! both directions. Behind [`crate::netlink::fake::Fake`].

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::*;
use crate::netlink::fake::{Fake, done, error};

/// A set (or map) of the table.
#[derive(Debug, Clone, Default)]
pub struct FakeSet {
    pub info: Option<SetInfo>,
    pub elems: BTreeMap<u64, ElemData>,
}

/// The kernel's state and its knobs.
#[derive(Debug, Default)]
pub struct FakeNft {
    /// The table, when it exists.
    pub table: Option<String>,
    pub sets: BTreeMap<String, FakeSet>,
    pub chains: BTreeSet<String>,
    pub rules: Vec<Rule>,
    /// A kernel before 6.3: DESTROYSETELEM is an unknown message (EINVAL).
    pub no_destroy: bool,
    /// How many element dumps still come back interrupted.
    pub interrupt: usize,
    /// How many element dumps still list their first element twice (read
    /// across a resize of the kernel's hash table: no NLM_F_DUMP_INTR).
    pub repeat: usize,
    /// Committed transactions.
    pub commits: usize,
    /// Element message types seen in batches, in order.
    pub elem_msgs: Vec<u8>,
}

impl FakeNft {
    /// `table inet T { map cgroups {…}; map verdicts {…}; chain C … }`,
    /// as nft/cgtproxy.nft declares them, empty.
    pub fn cgtproxy(table: &str, chains: &[&str]) -> FakeNft {
        let set = |key_len, verdict_data, data_len, counter| FakeSet {
            info: Some(SetInfo {
                is_map: true,
                key_len,
                verdict_data,
                data_len,
                counter,
            }),
            elems: BTreeMap::new(),
        };
        FakeNft {
            table: Some(table.into()),
            sets: BTreeMap::from([
                ("cgroups".to_string(), set(8, false, 4, true)),
                ("verdicts".to_string(), set(4, true, 16, false)),
            ]),
            chains: chains.iter().map(|c| c.to_string()).collect(),
            ..FakeNft::default()
        }
    }

    /// A transport answering from `k`.
    pub fn transport(k: &Rc<RefCell<FakeNft>>) -> Fake {
        let k = k.clone();
        Fake::new(move |bytes| k.borrow_mut().answer(bytes))
    }

    fn answer(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        let msgs: Vec<Msg<'_>> = wire::messages(bytes).collect::<Result<_, _>>()?;
        let Some(first) = msgs.first() else {
            return Ok(Vec::new());
        };
        if first.ty == NFNL_MSG_BATCH_BEGIN {
            return Ok(vec![self.batch(bytes, &msgs)]);
        }
        let m = first;
        let ty = (m.ty & 0xff) as u8;
        let names = parse_names(m)?;
        let mut out = Vec::new();
        let here = self.table.as_deref() == Some(names.0.as_str());
        match ty {
            NFT_MSG_GETTABLE if here => out.push(error(m.seq, m.ty, 0, None)),
            NFT_MSG_GETCHAIN if here && self.chains.contains(&chain_name(m)?) => {
                out.push(error(m.seq, m.ty, 0, None))
            }
            NFT_MSG_GETSET if here && self.sets.contains_key(&names.1) => {
                let info = self.sets[&names.1].info.clone().unwrap_or(SetInfo {
                    is_map: false,
                    key_len: 0,
                    verdict_data: false,
                    data_len: 0,
                    counter: false,
                });
                out.push(set_msg(m.seq, &names.0, &names.1, &info));
                out.push(error(m.seq, m.ty, 0, None));
            }
            NFT_MSG_GETSETELEM if here && self.sets.contains_key(&names.1) => {
                let intr = if self.interrupt > 0 {
                    self.interrupt -= 1;
                    wire::NLM_F_DUMP_INTR
                } else {
                    0
                };
                // One element per message, as a dump of a big map comes in parts.
                let set = &self.sets[&names.1];
                let counter = set.info.as_ref().is_some_and(|i| i.counter);
                let again = self.repeat > 0 && !set.elems.is_empty();
                if again {
                    self.repeat -= 1;
                }
                let first = set.elems.iter().take(usize::from(again));
                for (k, d) in set.elems.iter().chain(first) {
                    let c = counter.then_some((0, 0));
                    out.push(elements_msg(m.seq, intr, (&names.0, &names.1), *k, d, c));
                }
                out.push(done(m.seq));
            }
            NFT_MSG_GETRULE if here => {
                for r in &self.rules {
                    out.push(rule_msg(m.seq, r));
                }
                out.push(done(m.seq));
            }
            _ => out.push(error(m.seq, m.ty, libc::ENOENT, None)),
        }
        Ok(out)
    }

    /// A whole batch, all or nothing; one datagram of answers.
    fn batch(&mut self, bytes: &[u8], msgs: &[Msg<'_>]) -> Vec<u8> {
        let mut sets = self.sets.clone();
        let mut answers = Vec::new();
        let mut failed = false;
        for m in &msgs[1..msgs.len().saturating_sub(1)] {
            let start = m.payload.as_ptr() as usize - bytes.as_ptr() as usize - wire::NLMSG_HDRLEN;
            let r = self.elem_msg(&mut sets, m, &bytes[start..]);
            match r {
                Ok(()) if m.flags & wire::NLM_F_ACK != 0 => {
                    answers.extend(error(m.seq, m.ty, 0, None))
                }
                Ok(()) => {}
                Err((errno, offset)) => {
                    failed = true;
                    answers.extend(error(m.seq, m.ty, errno, offset));
                }
            }
        }
        if !failed {
            self.sets = sets;
            self.commits += 1;
        }
        answers
    }

    /// One element message of a batch; `msg` starts at its header. An
    /// error is (errno, offset of the attribute blamed).
    fn elem_msg(
        &mut self,
        sets: &mut BTreeMap<String, FakeSet>,
        m: &Msg<'_>,
        msg: &[u8],
    ) -> Result<(), (i32, Option<u32>)> {
        let ty = (m.ty & 0xff) as u8;
        self.elem_msgs.push(ty);
        let at = |p: &[u8]| Some((p.as_ptr() as usize - msg.as_ptr() as usize - 4) as u32);
        let (mut table, mut set, mut list) = (None, None, None);
        for a in wire::attrs(body(m).map_err(|_| (libc::EINVAL, None))?) {
            let (t, v) = a.map_err(|_| (libc::EINVAL, None))?;
            match t {
                NFTA_SET_ELEM_LIST_TABLE => table = Some(v),
                NFTA_SET_ELEM_LIST_SET => set = Some(v),
                NFTA_SET_ELEM_LIST_ELEMENTS => list = Some(v),
                _ => {}
            }
        }
        if ty == NFT_MSG_DESTROYSETELEM && self.no_destroy {
            return Err((libc::EINVAL, None));
        }
        let table = table.ok_or((libc::EINVAL, None))?;
        if self.table.as_deref() != Some(wire::string(table).as_str()) {
            return Err((libc::ENOENT, at(table)));
        }
        let set_name = set.ok_or((libc::EINVAL, None))?;
        let s = sets
            .get_mut(&wire::string(set_name))
            .ok_or((libc::ENOENT, at(set_name)))?;
        let Some(list) = list else {
            // `flush map`
            s.elems.clear();
            return Ok(());
        };
        for e in wire::attrs(list) {
            let (_, e) = e.map_err(|_| (libc::EINVAL, None))?;
            let blame = at(e);
            let (mut key, mut data) = (None, None);
            for a in wire::attrs(e) {
                let (t, v) = a.map_err(|_| (libc::EINVAL, blame))?;
                match t {
                    NFTA_SET_ELEM_KEY => {
                        if let Ok(Data::Value(k)) = parse_data(v) {
                            key = Some(match k.len() {
                                8 => u64::from_ne_bytes(k.try_into().unwrap()),
                                4 => u64::from(u32::from_ne_bytes(k.try_into().unwrap())),
                                _ => return Err((libc::EINVAL, blame)),
                            });
                        }
                    }
                    NFTA_SET_ELEM_DATA => {
                        data = Some(parse_elem_data(v).map_err(|_| (libc::EINVAL, blame))?)
                    }
                    _ => {}
                }
            }
            let key = key.ok_or((libc::EINVAL, blame))?;
            match ty {
                NFT_MSG_NEWSETELEM => {
                    let data = data.ok_or((libc::EINVAL, blame))?;
                    if let ElemData::Verdict(NftVerdict { chain: Some(c), .. }) = &data
                        && !self.chains.contains(c)
                    {
                        return Err((libc::ENOENT, blame));
                    }
                    match s.elems.get(&key) {
                        Some(d) if *d != data => return Err((libc::EEXIST, blame)),
                        _ => {
                            s.elems.insert(key, data);
                        }
                    }
                }
                NFT_MSG_DELSETELEM => {
                    s.elems.remove(&key).ok_or((libc::ENOENT, blame))?;
                }
                NFT_MSG_DESTROYSETELEM => {
                    s.elems.remove(&key);
                }
                _ => return Err((libc::EOPNOTSUPP, None)),
            }
        }
        Ok(())
    }
}

fn chain_name(m: &Msg<'_>) -> Result<String, Error> {
    for a in wire::attrs(body(m)?) {
        let (t, v) = a?;
        if t == NFTA_CHAIN_NAME {
            return Ok(wire::string(v));
        }
    }
    Ok(String::new())
}

/// A NEWSET as `nft list set` gets it: the parts `parse_set` reads.
fn set_msg(seq: u32, table: &str, set: &str, i: &SetInfo) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(msg_type(NFT_MSG_NEWSET), 0, seq);
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_SET_TABLE, table);
    w.attr_str(NFTA_SET_NAME, set);
    w.attr_be32(NFTA_SET_FLAGS, if i.is_map { NFT_SET_MAP } else { 0 });
    w.attr_be32(NFTA_SET_KEY_LEN, i.key_len);
    if i.is_map {
        let ty = if i.verdict_data {
            NFT_DATA_VERDICT
        } else {
            0x13
        };
        w.attr_be32(NFTA_SET_DATA_TYPE, ty);
        w.attr_be32(NFTA_SET_DATA_LEN, i.data_len);
    }
    if i.counter {
        let x = w.nest_begin(NFTA_SET_EXPR);
        w.attr_str(NFTA_EXPR_NAME, "counter");
        w.nest_end(x);
    }
    w.end_msg();
    w.buf
}

/// One dumped element as the kernel sends it: key (8 bytes for a `mark`
/// datum's map, 4 for a verdict map's), data, and a bare counter
/// expression when given (packets, bytes).
pub fn elements_msg(
    seq: u32,
    flags: u16,
    (table, set): (&str, &str),
    key: u64,
    d: &ElemData,
    counter: Option<(u64, u64)>,
) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(msg_type(NFT_MSG_NEWSETELEM), wire::NLM_F_MULTI | flags, seq);
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
    w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
    let l = w.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    let e = w.nest_begin(NFTA_LIST_ELEM);
    let k = w.nest_begin(NFTA_SET_ELEM_KEY);
    match d {
        ElemData::Mark(_) => w.attr(NFTA_DATA_VALUE, &key.to_ne_bytes()),
        ElemData::Verdict(_) => w.attr(NFTA_DATA_VALUE, &(key as u32).to_ne_bytes()),
    }
    w.nest_end(k); // NFTA_SET_ELEM_KEY
    let dn = w.nest_begin(NFTA_SET_ELEM_DATA);
    match d {
        ElemData::Mark(n) => w.attr(NFTA_DATA_VALUE, &n.to_ne_bytes()),
        ElemData::Verdict(v) => verdict_attr(&mut w, v),
    }
    w.nest_end(dn); // NFTA_SET_ELEM_DATA
    if let Some((packets, bytes)) = counter {
        let x = w.nest_begin(NFTA_SET_ELEM_EXPR);
        w.attr_str(NFTA_EXPR_NAME, "counter");
        let cd = w.nest_begin(NFTA_EXPR_DATA);
        w.attr(NFTA_COUNTER_BYTES, &bytes.to_be_bytes());
        w.attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes());
        w.nest_end(cd); // NFTA_EXPR_DATA
        w.nest_end(x); // NFTA_SET_ELEM_EXPR
    }
    w.nest_end(e);
    w.nest_end(l);
    w.end_msg();
    w.buf
}

/// An nf_tables event as the kernel multicasts it for a table, chain, set
/// or rule change (`kind`: NFT_MSG_NEWTABLE ...): attribute 1 the table,
/// attribute 2 (a set's, a rule's chain) or 3 (a chain's) the name.
pub fn event(kind: u8, table: &str, name: Option<&str>) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(msg_type(kind), 0, 0);
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_TABLE_NAME, table);
    if let Some(n) = name {
        let ty = if kind == NFT_MSG_NEWCHAIN {
            NFTA_CHAIN_NAME
        } else {
            NFTA_SET_NAME
        };
        w.attr_str(ty, n);
    }
    w.end_msg();
    w.buf
}

/// The NEWGEN event that ends a transaction: generation `id`, committed
/// by `pid` (absent when the kernel does not say).
pub fn newgen(id: u32, pid: Option<u32>) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(msg_type(NFT_MSG_NEWGEN), 0, 0);
    nfgenmsg(&mut w, 0, (id & 0xffff) as u16);
    w.attr_be32(NFTA_GEN_ID, id);
    if let Some(p) = pid {
        w.attr_be32(NFTA_GEN_PROC_PID, p);
    }
    w.end_msg();
    w.buf
}
