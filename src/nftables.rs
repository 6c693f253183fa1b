//! The nf_tables codec: every nf_tables message cgtproxy sends (element
//! batches, element and rule dumps, existence checks) and the parsers for
//! what comes back (elements, sets, rules and their expressions, `nft_data`,
//! verdict codes, events). Layout only: what a verdict or a number means is
//! `config`'s and `reconcile`'s; the conversation is in `netlink.rs`, the
//! session in `ruleset.rs`. Numbers are from
//! `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`.
//!
//! Byte order: the netlink and attribute headers are host order; nfgenmsg's
//! res_id, verdict codes, counters and set flags are big-endian; the
//! `cgroupsv2` key is the 64-bit cgroup id in host order, and a `mark` (the
//! verdict number: `cgroups` data, `verdicts` key) a 32-bit one in host order.

use crate::error::Error;
use crate::wire::{self, Msg, Writer};

#[cfg(test)]
pub(crate) mod fake;

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// NFPROTO_INET: the `inet` family of `table inet cgtproxy`.
pub const FAMILY_INET: u8 = 1;

pub const NFT_MSG_NEWTABLE: u8 = 0;
pub const NFT_MSG_GETTABLE: u8 = 1;
pub const NFT_MSG_DELTABLE: u8 = 2;
pub const NFT_MSG_NEWCHAIN: u8 = 3;
pub const NFT_MSG_GETCHAIN: u8 = 4;
pub const NFT_MSG_DELCHAIN: u8 = 5;
pub const NFT_MSG_NEWRULE: u8 = 6;
pub const NFT_MSG_GETRULE: u8 = 7;
pub const NFT_MSG_DELRULE: u8 = 8;
pub const NFT_MSG_NEWSET: u8 = 9;
pub const NFT_MSG_GETSET: u8 = 10;
pub const NFT_MSG_DELSET: u8 = 11;
pub const NFT_MSG_NEWSETELEM: u8 = 12;
pub const NFT_MSG_GETSETELEM: u8 = 13;
pub const NFT_MSG_DELSETELEM: u8 = 14;
pub const NFT_MSG_NEWGEN: u8 = 15;
/// Linux 6.3+: delete if present, no ENOENT.
pub const NFT_MSG_DESTROYSETELEM: u8 = 30;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_EXPR: u16 = 17;
const NFTA_SET_EXPRESSIONS: u16 = 18;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
#[cfg(test)]
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;

const NFT_SET_MAP: u32 = 0x8;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// Verdict codes (`NFTA_VERDICT_CODE`, a be32 holding a signed value).
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
pub const NFT_CONTINUE: i32 = -1;
pub const NFT_BREAK: i32 = -2;
pub const NFT_JUMP: i32 = -3;
pub const NFT_GOTO: i32 = -4;
pub const NFT_RETURN: i32 = -5;

/// The attributes of the expressions `inspect` reads (`NFTA_<EXPR>_*`).
pub mod expr {
    pub const SOCKET_KEY: u16 = 1;
    pub const SOCKET_DREG: u16 = 2;
    pub const SOCKET_LEVEL: u16 = 3;
    /// `socket mark` and `socket cgroupv2` (NFT_SOCKET_*).
    pub const SOCKET_MARK: u32 = 1;
    pub const SOCKET_CGROUPV2: u32 = 3;
    pub const LOOKUP_SET: u16 = 1;
    pub const LOOKUP_SREG: u16 = 2;
    pub const LOOKUP_DREG: u16 = 3;
    pub const IMMEDIATE_DREG: u16 = 1;
    pub const IMMEDIATE_DATA: u16 = 2;
    pub const META_DREG: u16 = 1;
    pub const META_KEY: u16 = 2;
    pub const META_SREG: u16 = 3;
    /// `meta mark` (NFT_META_MARK).
    pub const META_MARK: u32 = 3;
    pub const CMP_SREG: u16 = 1;
    pub const CMP_OP: u16 = 2;
    pub const CMP_DATA: u16 = 3;
    pub const CMP_EQ: u32 = 0;
    pub const TPROXY_REG_PORT: u16 = 3;
}

/// Keep each element list well under the 16-bit attribute length: the
/// predecessor put everything in one message and lost it all past 64 KiB.
const ELEMENTS_LIMIT: usize = 60_000;
/// An element is at most ~300 bytes (a `verdicts` element with a 255-byte
/// chain name); start a new message before the list could cross the limit.
const ELEMENT_MAX: usize = 320;

pub const fn msg_type(nft_msg: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | nft_msg as u16
}

/// `struct nfgenmsg { u8 family; u8 version; be16 res_id; }`
fn nfgenmsg(w: &mut Writer, family: u8, res_id: u16) {
    let r = res_id.to_be_bytes();
    w.put(&[family, 0, r[0], r[1]]);
}

/// What an extended ack's offset may point at, so an error can be told as a
/// sentence ("table inet cgtproxy does not exist").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blame {
    Table,
    /// The map a message is about (by name).
    Map(String),
    /// A `cgroups` element being added (this cgroup id).
    Added(u64),
    /// A `cgroups` element being deleted.
    Deleted(u64),
    /// A `verdicts` element being added (its number, or its chain).
    Bound(u32),
    /// A `verdicts` element being deleted.
    Unbound(u32),
}

/// A map in a table: `cgroups` or `verdicts`.
#[derive(Debug, Clone)]
pub struct MapRef {
    pub table: String,
    pub map: String,
}

/// How an element change is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemMsg {
    New,
    /// Deletes; ENOENT if missing, which aborts the whole batch.
    Del,
    /// Deletes if present (Linux 6.3+).
    Destroy,
}

/// One nf_tables transaction, encoded into one buffer for one `send()`.
pub struct Batch {
    w: Writer,
    pub begin_seq: u32,
    next_seq: u32,
    /// Sequence numbers of messages that asked for an ack.
    pub acked: Vec<u32>,
    /// Per message: (seq, [(offset, what)]) for turning ext-ack offsets into words.
    pub blame: Vec<(u32, Vec<(usize, Blame)>)>,
    /// Which kind of element message each sequence number carries.
    pub kinds: Vec<(u32, ElemMsg)>,
}

impl Batch {
    /// `BEGIN` (NFNL_MSG_BATCH_BEGIN, res_id = the nf_tables subsystem).
    /// BEGIN and END get no ack flag: kernels before 6.10 never ack them.
    pub fn new(first_seq: u32) -> Batch {
        let mut w = Writer::new();
        w.begin_msg(NFNL_MSG_BATCH_BEGIN, wire::NLM_F_REQUEST, first_seq);
        nfgenmsg(&mut w, 0, NFNL_SUBSYS_NFTABLES);
        w.end_msg();
        Batch {
            w,
            begin_seq: first_seq,
            next_seq: first_seq + 1,
            acked: Vec::new(),
            blame: Vec::new(),
            kinds: Vec::new(),
        }
    }

    fn begin(&mut self, nft_msg: u8, flags: u16, family: u8) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.w.begin_msg(
            msg_type(nft_msg),
            flags | wire::NLM_F_REQUEST | wire::NLM_F_ACK,
            seq,
        );
        nfgenmsg(&mut self.w, family, 0);
        self.acked.push(seq);
        self.blame.push((seq, Vec::new()));
        seq
    }

    fn note(&mut self, what: Blame) {
        let off = self.w.msg_offset();
        if let Some((_, v)) = self.blame.last_mut() {
            v.push((off, what));
        }
    }

    /// `{add|delete|destroy} element inet TABLE cgroups { ID [: NUMBER], ... }`
    ///
    /// Split into as many messages as the 64 KiB limit needs, all in this
    /// batch. The number is ignored for deletes.
    pub fn elements(
        &mut self,
        kind: ElemMsg,
        map: &MapRef,
        elems: impl IntoIterator<Item = (u64, Option<u32>)>,
    ) {
        let blame = if kind == ElemMsg::New {
            Blame::Added
        } else {
            Blame::Deleted
        };
        self.list(kind, map, elems, blame, |w, id, number| {
            w.attr(NFTA_DATA_VALUE, &id.to_ne_bytes());
            number.map(|n| move |w: &mut Writer| w.attr(NFTA_DATA_VALUE, &n.to_ne_bytes()))
        });
    }

    /// `{add|delete|destroy} element inet TABLE verdicts { NUMBER [: VERDICT], ... }`
    pub fn verdicts(
        &mut self,
        kind: ElemMsg,
        map: &MapRef,
        elems: impl IntoIterator<Item = (u32, Option<NftVerdict>)>,
    ) {
        let blame = if kind == ElemMsg::New {
            Blame::Bound
        } else {
            Blame::Unbound
        };
        self.list(kind, map, elems, blame, |w, number, verdict| {
            w.attr(NFTA_DATA_VALUE, &number.to_ne_bytes());
            verdict.map(|v| move |w: &mut Writer| verdict_attr(w, &v))
        });
    }

    /// The element-list messages of one kind. `key` writes an element's key
    /// and returns what writes its data, if it has any.
    fn list<K: Copy, D, F: FnOnce(&mut Writer)>(
        &mut self,
        kind: ElemMsg,
        map: &MapRef,
        elems: impl IntoIterator<Item = (K, D)>,
        blame: fn(K) -> Blame,
        mut key: impl FnMut(&mut Writer, K, D) -> Option<F>,
    ) {
        let ty = match kind {
            ElemMsg::New => NFT_MSG_NEWSETELEM,
            ElemMsg::Del => NFT_MSG_DELSETELEM,
            ElemMsg::Destroy => NFT_MSG_DESTROYSETELEM,
        };
        let flags = if kind == ElemMsg::New {
            wire::NLM_F_CREATE
        } else {
            0
        };
        let mut list: Option<usize> = None;
        for (k, d) in elems {
            if let Some(start) = list
                && self.w.buf.len() - start > ELEMENTS_LIMIT - ELEMENT_MAX
            {
                self.close_list(start);
                list = None;
            }
            if list.is_none() {
                list = Some(self.open_list(kind, ty, flags, map));
            }
            // The kernel's ext-ack offset points at the NFTA_LIST_ELEM.
            self.note(blame(k));
            let e = self.w.nest_begin(NFTA_LIST_ELEM);
            let kn = self.w.nest_begin(NFTA_SET_ELEM_KEY);
            let data = key(&mut self.w, k, d);
            self.w.nest_end(kn); // NFTA_SET_ELEM_KEY
            if kind == ElemMsg::New
                && let Some(write) = data
            {
                let dn = self.w.nest_begin(NFTA_SET_ELEM_DATA);
                write(&mut self.w);
                self.w.nest_end(dn); // NFTA_SET_ELEM_DATA
            }
            self.w.nest_end(e); // NFTA_LIST_ELEM
        }
        if let Some(start) = list {
            self.close_list(start);
        }
    }

    fn open_list(&mut self, kind: ElemMsg, ty: u8, flags: u16, map: &MapRef) -> usize {
        let seq = self.begin(ty, flags, FAMILY_INET);
        self.kinds.push((seq, kind));
        self.note(Blame::Table);
        self.w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &map.table);
        self.note(Blame::Map(map.map.clone()));
        self.w.attr_str(NFTA_SET_ELEM_LIST_SET, &map.map);
        self.w.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS)
    }

    fn close_list(&mut self, start: usize) {
        self.w.nest_end(start); // NFTA_SET_ELEM_LIST_ELEMENTS
        self.w.end_msg();
    }

    /// `flush map inet TABLE MAP`: DELSETELEM without an element list.
    pub fn flush(&mut self, map: &MapRef) {
        self.begin(NFT_MSG_DELSETELEM, 0, FAMILY_INET);
        self.note(Blame::Table);
        self.w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &map.table);
        self.note(Blame::Map(map.map.clone()));
        self.w.attr_str(NFTA_SET_ELEM_LIST_SET, &map.map);
        self.w.end_msg();
    }

    /// `END`; returns the bytes to send.
    pub fn finish(mut self) -> Result<(Vec<u8>, BatchInfo), Error> {
        let end_seq = self.next_seq;
        self.w
            .begin_msg(NFNL_MSG_BATCH_END, wire::NLM_F_REQUEST, end_seq);
        nfgenmsg(&mut self.w, 0, NFNL_SUBSYS_NFTABLES);
        self.w.end_msg();
        let info = BatchInfo {
            begin_seq: self.begin_seq,
            end_seq,
            acked: self.acked,
            blame: self.blame,
            kinds: self.kinds,
        };
        Ok((self.w.finish()?, info))
    }
}

/// What the transport needs to match replies to a sent batch.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    pub begin_seq: u32,
    pub end_seq: u32,
    pub acked: Vec<u32>,
    pub blame: Vec<(u32, Vec<(usize, Blame)>)>,
    pub kinds: Vec<(u32, ElemMsg)>,
}

impl BatchInfo {
    pub fn kind(&self, seq: u32) -> Option<ElemMsg> {
        self.kinds.iter().find(|(s, _)| *s == seq).map(|(_, k)| *k)
    }

    /// The element, map or table an ext-ack offset in message `seq` points into.
    pub fn blame(&self, seq: u32, offset: Option<u32>) -> Option<&Blame> {
        let offset = offset? as usize;
        let (_, notes) = self.blame.iter().find(|(s, _)| *s == seq)?;
        notes
            .iter()
            .rev()
            .find(|(o, _)| *o <= offset)
            .map(|(_, b)| b)
    }
}

/// A verdict as nf_tables encodes it: a code, and the chain of a jump or
/// goto. What it means for an application is `config::Verdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftVerdict {
    pub code: i32,
    pub chain: Option<String>,
}

/// `NFTA_DATA_VERDICT { NFTA_VERDICT_CODE be32 [, NFTA_VERDICT_CHAIN "name"] }`
fn verdict_attr(w: &mut Writer, v: &NftVerdict) {
    let n = w.nest_begin(NFTA_DATA_VERDICT);
    w.attr_be32(NFTA_VERDICT_CODE, v.code as u32);
    if let Some(c) = &v.chain {
        w.attr_str(NFTA_VERDICT_CHAIN, c);
    }
    w.nest_end(n); // NFTA_DATA_VERDICT
}

/// `nft_data` written on its own: `NFTA_DATA_VALUE bytes` or a verdict
/// (for tests and fixtures that build rule expressions).
pub fn data_attr(w: &mut Writer, d: &Data<'_>) {
    match d {
        Data::Value(v) => w.attr(NFTA_DATA_VALUE, v),
        Data::Verdict(v) => verdict_attr(w, v),
    }
}

/// `list map inet TABLE MAP`, as a dump request (not part of a batch).
pub fn dump_elements_request(seq: u32, map: &MapRef) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(
        msg_type(NFT_MSG_GETSETELEM),
        wire::NLM_F_REQUEST | wire::NLM_F_DUMP,
        seq,
    );
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &map.table);
    w.attr_str(NFTA_SET_ELEM_LIST_SET, &map.map);
    w.end_msg();
    w.buf
}

/// What an existence check asks for.
pub enum Object<'a> {
    /// `list table inet NAME`
    Table(&'a str),
    /// `list set inet TABLE NAME`
    Set(&'a str, &'a str),
    /// `list chain inet TABLE NAME`
    Chain(&'a str, &'a str),
}

/// A GET for one object; the kernel answers with the object or ENOENT.
pub fn get_request(seq: u32, obj: &Object<'_>) -> Vec<u8> {
    let mut w = Writer::new();
    let ty = match obj {
        Object::Table(_) => NFT_MSG_GETTABLE,
        Object::Set(..) => NFT_MSG_GETSET,
        Object::Chain(..) => NFT_MSG_GETCHAIN,
    };
    w.begin_msg(msg_type(ty), wire::NLM_F_REQUEST | wire::NLM_F_ACK, seq);
    nfgenmsg(&mut w, FAMILY_INET, 0);
    match obj {
        Object::Table(t) => w.attr_str(NFTA_TABLE_NAME, t),
        Object::Set(t, s) => {
            w.attr_str(NFTA_SET_TABLE, t);
            w.attr_str(NFTA_SET_NAME, s);
        }
        Object::Chain(t, c) => {
            w.attr_str(NFTA_CHAIN_TABLE, t);
            w.attr_str(NFTA_CHAIN_NAME, c);
        }
    }
    w.end_msg();
    w.buf
}

/// The parts of a NEWSET reply that say whether it can be one of our maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetInfo {
    pub is_map: bool,
    pub key_len: u32,
    pub verdict_data: bool,
    pub data_len: u32,
    /// Its elements carry a `counter` expression.
    pub counter: bool,
}

impl SetInfo {
    /// `type cgroupsv2 : mark`: an 8-byte key, 4 bytes of data.
    pub fn is_number_map(&self) -> bool {
        self.is_map && self.key_len == 8 && !self.verdict_data && self.data_len == 4
    }

    /// `type mark : verdict`.
    pub fn is_verdict_map(&self) -> bool {
        self.is_map && self.key_len == 4 && self.verdict_data
    }
}

pub fn parse_set(m: &Msg<'_>) -> Result<SetInfo, Error> {
    let mut s = SetInfo {
        is_map: false,
        key_len: 0,
        verdict_data: false,
        data_len: 0,
        counter: false,
    };
    // One expression comes bare, several as a list (nf_tables_fill_set).
    fn named_counter(expr: &[u8]) -> Result<bool, Error> {
        for a in wire::attrs(expr) {
            let (ty, v) = a?;
            if ty == NFTA_EXPR_NAME && wire::string(v) == "counter" {
                return Ok(true);
            }
        }
        Ok(false)
    }
    for a in wire::attrs(body(m)?) {
        let (ty, v) = a?;
        match ty {
            NFTA_SET_FLAGS => s.is_map = wire::be32(v)? & NFT_SET_MAP != 0,
            NFTA_SET_KEY_LEN => s.key_len = wire::be32(v)?,
            NFTA_SET_DATA_TYPE => s.verdict_data = wire::be32(v)? == NFT_DATA_VERDICT,
            NFTA_SET_DATA_LEN => s.data_len = wire::be32(v)?,
            NFTA_SET_EXPR => s.counter |= named_counter(v)?,
            NFTA_SET_EXPRESSIONS => each_listed(v, |e| {
                s.counter |= named_counter(e)?;
                Ok(())
            })?,
            _ => {}
        }
    }
    Ok(s)
}

/// `nft_data` (`NFTA_DATA_VALUE` or `NFTA_DATA_VERDICT`), as found in an
/// element, an `immediate` or a `cmp`; a value is borrowed from the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data<'a> {
    Value(&'a [u8]),
    Verdict(NftVerdict),
}

/// What an element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    /// A 4-byte value: a `mark` (a `cgroups` element's verdict number),
    /// host order.
    Mark(u32),
    /// A verdict (a `verdicts` element's data).
    Verdict(NftVerdict),
}

/// One element of a map, as dumped or announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// A cgroup id (8-byte key) or a verdict number (4-byte key).
    pub key: u64,
    pub data: ElemData,
    /// (packets, bytes) from the per-element counter.
    pub counter: Option<(u64, u64)>,
}

/// The payload after nfgenmsg.
fn body<'a>(m: &Msg<'a>) -> Result<&'a [u8], Error> {
    m.payload
        .get(4..)
        .ok_or(Error::Malformed("truncated nfgenmsg"))
}

/// The `NFTA_LIST_ELEM` entries of a list attribute (elements,
/// expressions), each given to `f`.
fn each_listed(list: &[u8], mut f: impl FnMut(&[u8]) -> Result<(), Error>) -> Result<(), Error> {
    for a in wire::attrs(list) {
        let (ty, v) = a?;
        if ty == NFTA_LIST_ELEM {
            f(v)?;
        }
    }
    Ok(())
}

/// A NEWSETELEM message (a dump part, or an event): its table, set and elements.
pub fn parse_elements(m: &Msg<'_>) -> Result<(String, String, Vec<Entry>), Error> {
    let (mut table, mut set, mut out) = (String::new(), String::new(), Vec::new());
    for a in wire::attrs(body(m)?) {
        let (ty, v) = a?;
        match ty {
            NFTA_SET_ELEM_LIST_TABLE => table = wire::string(v),
            NFTA_SET_ELEM_LIST_SET => set = wire::string(v),
            NFTA_SET_ELEM_LIST_ELEMENTS => each_listed(v, |e| {
                out.push(parse_element(e)?);
                Ok(())
            })?,
            _ => {}
        }
    }
    Ok((table, set, out))
}

fn parse_element(e: &[u8]) -> Result<Entry, Error> {
    let (mut key, mut data, mut counter) = (None, None, None);
    for a in wire::attrs(e) {
        let (ty, v) = a?;
        match ty {
            NFTA_SET_ELEM_KEY => {
                for k in wire::attrs(v) {
                    let (ty, k) = k?;
                    if ty == NFTA_DATA_VALUE {
                        key = Some(match k.len() {
                            8 => u64::from_ne_bytes(
                                k.try_into().map_err(|_| Error::Malformed("key"))?,
                            ),
                            4 => u64::from(u32::from_ne_bytes(
                                k.try_into().map_err(|_| Error::Malformed("key"))?,
                            )),
                            _ => {
                                return Err(Error::Malformed(
                                    "key is neither a cgroup id nor a mark",
                                ));
                            }
                        });
                    }
                }
            }
            NFTA_SET_ELEM_DATA => data = Some(parse_elem_data(v)?),
            // One expression comes bare, several as a list (nft_set_elem_expr_dump).
            NFTA_SET_ELEM_EXPR => counter = counter.or(parse_counter(v)?),
            NFTA_SET_ELEM_EXPRESSIONS => each_listed(v, |x| {
                counter = counter.or(parse_counter(x)?);
                Ok(())
            })?,
            _ => {}
        }
    }
    Ok(Entry {
        key: key.ok_or(Error::Malformed("element without a key"))?,
        data: data.ok_or(Error::Malformed("element without data"))?,
        counter,
    })
}

/// An element's data: a 4-byte value (a verdict number) or a verdict.
fn parse_elem_data(d: &[u8]) -> Result<ElemData, Error> {
    match parse_data(d)? {
        Data::Value(v) => {
            let b: [u8; 4] = v
                .try_into()
                .map_err(|_| Error::Malformed("element data is not a 4-byte mark"))?;
            Ok(ElemData::Mark(u32::from_ne_bytes(b)))
        }
        Data::Verdict(v) => Ok(ElemData::Verdict(v)),
    }
}

/// `nft_data`: `NFTA_DATA_VALUE bytes` or `NFTA_DATA_VERDICT { ... }`.
pub fn parse_data(d: &[u8]) -> Result<Data<'_>, Error> {
    for a in wire::attrs(d) {
        let (ty, v) = a?;
        match ty {
            NFTA_DATA_VALUE => return Ok(Data::Value(v)),
            NFTA_DATA_VERDICT => return parse_verdict(v).map(Data::Verdict),
            _ => {}
        }
    }
    Err(Error::Malformed("data is neither a value nor a verdict"))
}

/// `NFTA_VERDICT_CODE be32 [, NFTA_VERDICT_CHAIN "name"]`
fn parse_verdict(v: &[u8]) -> Result<NftVerdict, Error> {
    let (mut code, mut chain) = (None, None);
    for x in wire::attrs(v) {
        let (ty, x) = x?;
        match ty {
            NFTA_VERDICT_CODE => code = Some(wire::be32(x)? as i32),
            NFTA_VERDICT_CHAIN => chain = Some(wire::string(x)),
            _ => {}
        }
    }
    Ok(NftVerdict {
        code: code.ok_or(Error::Malformed("verdict without a code"))?,
        chain,
    })
}

fn parse_counter(x: &[u8]) -> Result<Option<(u64, u64)>, Error> {
    let (mut name, mut data) = (String::new(), None);
    for a in wire::attrs(x) {
        let (ty, v) = a?;
        match ty {
            NFTA_EXPR_NAME => name = wire::string(v),
            NFTA_EXPR_DATA => data = Some(v),
            _ => {}
        }
    }
    let (true, Some(data)) = (name == "counter", data) else {
        return Ok(None);
    };
    let (mut packets, mut bytes) = (0, 0);
    for a in wire::attrs(data) {
        let (ty, v) = a?;
        match ty {
            NFTA_COUNTER_BYTES => bytes = wire::be64(v)?,
            NFTA_COUNTER_PACKETS => packets = wire::be64(v)?,
            _ => {}
        }
    }
    Ok(Some((packets, bytes)))
}

/// The committing process of a transaction, from its NEWGEN event.
pub fn parse_newgen_pid(m: &Msg<'_>) -> Result<Option<u32>, Error> {
    for a in wire::attrs(body(m)?) {
        let (ty, v) = a?;
        if ty == NFTA_GEN_PROC_PID {
            return Ok(Some(wire::be32(v)?));
        }
    }
    Ok(None)
}

/// The table name of a NEWTABLE/DELTABLE event, or (table, set) of a set event.
pub fn parse_names(m: &Msg<'_>) -> Result<(String, String), Error> {
    // NFTA_TABLE_NAME, NFTA_SET_TABLE and NFTA_SET_ELEM_LIST_TABLE are all 1;
    // NFTA_SET_NAME and NFTA_SET_ELEM_LIST_SET are both 2.
    let (mut a1, mut a2) = (String::new(), String::new());
    for a in wire::attrs(body(m)?) {
        let (ty, v) = a?;
        match ty {
            1 => a1 = wire::string(v),
            2 => a2 = wire::string(v),
            _ => {}
        }
    }
    Ok((a1, a2))
}

/// `list table inet TABLE`, its rules: a GETRULE dump (not part of a batch).
pub fn dump_rules_request(seq: u32, table: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(
        msg_type(NFT_MSG_GETRULE),
        wire::NLM_F_REQUEST | wire::NLM_F_DUMP,
        seq,
    );
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_RULE_TABLE, table);
    w.end_msg();
    w.buf
}

/// One expression of a rule: its name and its attributes, raw (their
/// numbers are in [`expr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    pub name: String,
    pub attrs: Vec<(u16, Vec<u8>)>,
}

impl Expr {
    pub fn attr(&self, ty: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, v)| v.as_slice())
    }

    /// nf_tables' NLA_U32 attributes are big-endian.
    pub fn u32(&self, ty: u16) -> Option<u32> {
        self.attr(ty).and_then(|v| wire::be32(v).ok())
    }

    /// An `nft_data` attribute (`immediate`'s data, `cmp`'s operand).
    pub fn data(&self, ty: u16) -> Option<Data<'_>> {
        self.attr(ty).and_then(|v| parse_data(v).ok())
    }
}

/// A rule as dumped: where it is and what it does, expression by expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: String,
    pub chain: String,
    pub exprs: Vec<Expr>,
}

/// A NEWRULE message of a dump: its table, chain and expressions.
pub fn parse_rule(m: &Msg<'_>) -> Result<Rule, Error> {
    let (mut table, mut chain, mut exprs) = (String::new(), String::new(), Vec::new());
    for a in wire::attrs(body(m)?) {
        let (ty, v) = a?;
        match ty {
            NFTA_RULE_TABLE => table = wire::string(v),
            NFTA_RULE_CHAIN => chain = wire::string(v),
            NFTA_RULE_EXPRESSIONS => each_listed(v, |e| {
                exprs.push(parse_expr(e)?);
                Ok(())
            })?,
            _ => {}
        }
    }
    Ok(Rule {
        table,
        chain,
        exprs,
    })
}

/// `NFTA_EXPR_NAME "name", NFTA_EXPR_DATA { attributes }`
fn parse_expr(e: &[u8]) -> Result<Expr, Error> {
    let mut x = Expr {
        name: String::new(),
        attrs: Vec::new(),
    };
    for a in wire::attrs(e) {
        let (ty, v) = a?;
        match ty {
            NFTA_EXPR_NAME => x.name = wire::string(v),
            NFTA_EXPR_DATA => {
                for a in wire::attrs(v) {
                    let (ty, v) = a?;
                    x.attrs.push((ty, v.to_vec()));
                }
            }
            _ => {}
        }
    }
    Ok(x)
}

/// A rule's expressions encoded as the kernel dumps them (`NFTA_RULE_*`),
/// for tests and fixtures: the exact mirror of [`parse_rule`].
pub fn rule_msg(seq: u32, rule: &Rule) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_msg(msg_type(NFT_MSG_NEWRULE), wire::NLM_F_MULTI, seq);
    nfgenmsg(&mut w, FAMILY_INET, 0);
    w.attr_str(NFTA_RULE_TABLE, &rule.table);
    w.attr_str(NFTA_RULE_CHAIN, &rule.chain);
    let l = w.nest_begin(NFTA_RULE_EXPRESSIONS);
    for x in &rule.exprs {
        let e = w.nest_begin(NFTA_LIST_ELEM);
        w.attr_str(NFTA_EXPR_NAME, &x.name);
        let d = w.nest_begin(NFTA_EXPR_DATA);
        for (ty, v) in &x.attrs {
            w.attr(*ty, v);
        }
        w.nest_end(d); // NFTA_EXPR_DATA
        w.nest_end(e); // NFTA_LIST_ELEM
    }
    w.nest_end(l); // NFTA_RULE_EXPRESSIONS
    w.end_msg();
    w.buf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn map() -> MapRef {
        MapRef {
            table: "aes".into(),
            map: "m".into(),
        }
    }

    /// `add element inet aes m { 139 : 1 }` (a `cgroups` element: cgroup id
    /// 139, verdict number 1), seqs 100..102. The layout is the one the
    /// kernel accepted in the notes, with a 4-byte value as data.
    #[test]
    fn golden_add_element_batch() {
        let mut b = Batch::new(100);
        b.elements(ElemMsg::New, &map(), [(139u64, Some(1u32))]);
        let (bytes, info) = b.finish().unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // BEGIN: len 20, type 0x10, flags REQUEST, seq 100, pid 0, nfgenmsg {0, 0, htons(10)}
            &[20, 0, 0, 0, 0x10, 0, 1, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10][..],
            // NEWSETELEM: len 72, type 0x0a0c, flags REQUEST|ACK|CREATE, seq 101, nfgenmsg {inet, 0, 0}
            &[72, 0, 0, 0, 0x0c, 0x0a, 0x05, 0x04, 101, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[8, 0, 1, 0, b'a', b'e', b's', 0],          // NFTA_SET_ELEM_LIST_TABLE "aes"
            &[6, 0, 2, 0, b'm', 0, 0, 0],                // NFTA_SET_ELEM_LIST_SET "m"
            &[36, 0, 3, 0x80],                           // NFTA_SET_ELEM_LIST_ELEMENTS
            &[32, 0, 1, 0x80],                           //  NFTA_LIST_ELEM
            &[16, 0, 1, 0x80],                           //   NFTA_SET_ELEM_KEY
            &[12, 0, 1, 0, 139, 0, 0, 0, 0, 0, 0, 0],    //    NFTA_DATA_VALUE u64 139
            &[12, 0, 2, 0x80],                           //   NFTA_SET_ELEM_DATA
            &[8, 0, 1, 0, 1, 0, 0, 0],                   //    NFTA_DATA_VALUE u32 1
            // END: seq 102
            &[20, 0, 0, 0, 0x11, 0, 1, 0, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
        ]
        .concat();
        assert_eq!(bytes, want);
        assert_eq!(
            (info.begin_seq, info.end_seq, info.acked.clone()),
            (100, 102, vec![101])
        );
        // An ext-ack offset at the element blames the element; at the set
        // name, the map; at the table name, the table.
        assert_eq!(info.blame(101, Some(40)), Some(&Blame::Added(139)));
        assert_eq!(info.blame(101, Some(48)), Some(&Blame::Added(139)));
        assert_eq!(info.blame(101, Some(28)), Some(&Blame::Map("m".into())));
        assert_eq!(info.blame(101, Some(20)), Some(&Blame::Table));
    }

    /// `add element inet aes m { 7 : goto proxy }` in the `verdicts` layout.
    #[test]
    fn golden_verdict_element() {
        let mut b = Batch::new(1);
        let proxy = NftVerdict {
            code: NFT_GOTO,
            chain: Some("proxy".into()),
        };
        b.verdicts(ElemMsg::New, &map(), [(7u32, Some(proxy.clone()))]);
        let (bytes, info) = b.finish().unwrap();
        let msgs: Vec<_> = wire::messages(&bytes).map(|m| m.unwrap()).collect();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[8, 0, 1, 0, b'a', b'e', b's', 0][..],      // NFTA_SET_ELEM_LIST_TABLE "aes"
            &[6, 0, 2, 0, b'm', 0, 0, 0],                // NFTA_SET_ELEM_LIST_SET "m"
            &[48, 0, 3, 0x80],                           // NFTA_SET_ELEM_LIST_ELEMENTS
            &[44, 0, 1, 0x80],                           //  NFTA_LIST_ELEM
            &[12, 0, 1, 0x80],                           //   NFTA_SET_ELEM_KEY
            &[8, 0, 1, 0, 7, 0, 0, 0],                   //    NFTA_DATA_VALUE u32 7
            &[28, 0, 2, 0x80],                           //   NFTA_SET_ELEM_DATA
            &[24, 0, 2, 0x80],                           //    NFTA_DATA_VERDICT
            &[8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfc],       //     NFTA_VERDICT_CODE be32 -4 (goto)
            &[10, 0, 2, 0, b'p', b'r', b'o', b'x', b'y', 0, 0, 0], // NFTA_VERDICT_CHAIN "proxy"
        ]
        .concat();
        assert_eq!(&msgs[1].payload[4..], &want[..]);
        assert_eq!(info.blame(2, Some(40)), Some(&Blame::Bound(7)));
        // Round trip through the parser.
        let (_, _, e) = parse_elements(&msgs[1]).unwrap();
        assert_eq!(
            e,
            vec![Entry {
                key: 7,
                data: ElemData::Verdict(proxy),
                counter: None
            }]
        );
    }

    #[test]
    fn number_and_destroy_encoding() {
        let mut b = Batch::new(1);
        b.elements(ElemMsg::Destroy, &map(), [(7u64, None)]);
        b.elements(ElemMsg::New, &map(), [(7u64, Some(3))]);
        b.verdicts(ElemMsg::Destroy, &map(), [(3u32, None)]);
        let (bytes, info) = b.finish().unwrap();
        let msgs: Vec<_> = wire::messages(&bytes).map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), 5);
        assert_eq!(msgs[1].ty, msg_type(NFT_MSG_DESTROYSETELEM));
        assert_eq!(msgs[1].flags, wire::NLM_F_REQUEST | wire::NLM_F_ACK);
        assert_eq!(info.kind(3), Some(ElemMsg::New));
        // Round trip through the parser: the new element reads back as written.
        let (t, s, e) = parse_elements(&msgs[2]).unwrap();
        assert_eq!((t.as_str(), s.as_str()), ("aes", "m"));
        assert_eq!(
            e,
            vec![Entry {
                key: 7,
                data: ElemData::Mark(3),
                counter: None
            }]
        );
        assert_eq!(msgs[3].ty, msg_type(NFT_MSG_DESTROYSETELEM));
        // A delete carries the key only: NFTA_LIST_ELEM { KEY { u32 3 } }.
        #[rustfmt::skip]
        let tail = [20, 0, 3, 0x80, 16, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 3, 0, 0, 0];
        assert!(msgs[3].payload.ends_with(&tail));
    }

    #[test]
    fn large_lists_split_under_64k_in_one_batch() {
        let mut b = Batch::new(1);
        b.elements(ElemMsg::New, &map(), (0..20_000u64).map(|i| (i, Some(1))));
        let v = NftVerdict {
            code: NFT_GOTO,
            chain: Some("c".repeat(250)),
        };
        b.verdicts(
            ElemMsg::New,
            &map(),
            (0..1_000u32).map(|i| (i, Some(v.clone()))),
        );
        let (bytes, info) = b.finish().unwrap();
        let msgs: Vec<_> = wire::messages(&bytes).map(|m| m.unwrap()).collect();
        assert!(msgs.len() > 4, "split into several messages");
        assert_eq!(info.acked.len(), msgs.len() - 2);
        let mut total = 0;
        for m in &msgs[1..msgs.len() - 1] {
            assert!(m.payload.len() < 65_000);
            total += parse_elements(m).unwrap().2.len();
        }
        assert_eq!(total, 21_000);
    }

    #[test]
    fn parses_dumped_element_with_counter() {
        // As the kernel dumps it: key, data, and one bare counter expression.
        let bytes = fake::elements_msg(
            5,
            0,
            ("cgtproxy", "cgroups"),
            4242,
            &ElemData::Mark(2),
            Some((3, 1500)),
        );
        let m = wire::messages(&bytes).next().unwrap().unwrap();
        let (_, _, els) = parse_elements(&m).unwrap();
        assert_eq!(
            els,
            vec![Entry {
                key: 4242,
                data: ElemData::Mark(2),
                counter: Some((3, 1500))
            }]
        );
        // Every truncation (the length field rewritten to the cut, so the
        // parser itself meets it) fails or yields no element: only a cut
        // before the element list parses. Header and nfgenmsg, table
        // "cgtproxy", set "cgroups"; trailing bytes shorter than an
        // attribute header are padding.
        let list_at = 20 + 16 + 12 + 3;
        for cut in wire::NLMSG_HDRLEN..bytes.len() {
            let t = wire::truncated(&bytes, cut);
            let m = wire::messages(&t).next().unwrap().unwrap();
            if let Ok((_, _, e)) = parse_elements(&m) {
                assert!(cut <= list_at && e.is_empty(), "cut {cut}: {e:?}");
            }
            // With the enclosing attributes cut too, the element parser
            // itself meets the cut: no element comes out before its key and
            // data are whole (byte 84), and none with a cut key or data.
            let t = wire::truncated_nested(&bytes, cut, 4);
            let m = wire::messages(&t).next().unwrap().unwrap();
            if let Ok((_, _, e)) = parse_elements(&m) {
                assert!(e.is_empty() || cut >= 84, "cut {cut}: {e:?}");
                for x in e {
                    assert_eq!((x.key, &x.data), (4242, &ElemData::Mark(2)), "cut {cut}");
                }
            }
        }
        // And every single-byte corruption parses or fails, never panics.
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                for m in wire::messages(&b).flatten() {
                    let _ = parse_elements(&m);
                    let _ = parse_set(&m);
                    let _ = parse_newgen_pid(&m);
                    let _ = parse_names(&m);
                }
            }
        }
    }

    /// What the kernel (6.18, nft 1.0.6) answered to `nft list table inet
    /// cgtproxy` for the shipped ruleset with two elements in each map:
    /// every datagram, concatenated (fixtures/capture.sh).
    pub(crate) const KERNEL_DUMP: &[u8] = include_bytes!("nftables/fixtures/kernel-dump.bin");

    #[test]
    fn parses_a_kernel_dump() {
        let (mut sets, mut elems, mut rules) = (Vec::new(), Vec::new(), Vec::new());
        for m in wire::messages(KERNEL_DUMP) {
            let m = m.unwrap();
            if m.ty >> 8 != NFNL_SUBSYS_NFTABLES {
                continue;
            }
            match (m.ty & 0xff) as u8 {
                NFT_MSG_NEWSET => sets.push((parse_names(&m).unwrap().1, parse_set(&m).unwrap())),
                // The maps; the bypass sets' elements have no data.
                NFT_MSG_NEWSETELEM => {
                    let (_, s) = parse_names(&m).unwrap();
                    if s == "cgroups" || s == "verdicts" {
                        elems.push(parse_elements(&m).unwrap());
                    }
                }
                NFT_MSG_NEWRULE => rules.push(parse_rule(&m).unwrap()),
                _ => {}
            }
        }
        let set = |n: &str| sets.iter().find(|(s, _)| s == n).map(|(_, i)| i.clone());
        let cgroups = set("cgroups").unwrap();
        assert!(cgroups.is_number_map() && cgroups.counter, "{cgroups:?}");
        let verdicts = set("verdicts").unwrap();
        assert!(
            verdicts.is_verdict_map() && !verdicts.counter,
            "{verdicts:?}"
        );
        let of = |n: &str| -> Vec<Entry> {
            elems
                .iter()
                .filter(|(t, s, _)| t == "cgtproxy" && s == n)
                .flat_map(|(_, _, e)| e.clone())
                .collect()
        };
        let goto = |c: &str| NftVerdict {
            code: NFT_GOTO,
            chain: Some(c.into()),
        };
        let drop = NftVerdict {
            code: NF_DROP,
            chain: None,
        };
        let mut v: Vec<(u64, ElemData)> = of("verdicts")
            .into_iter()
            .map(|e| (e.key, e.data))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        assert_eq!(
            v,
            vec![
                (1, ElemData::Verdict(goto("proxy"))),
                (2, ElemData::Verdict(drop))
            ]
        );
        let mut c: Vec<(ElemData, Option<(u64, u64)>)> = of("cgroups")
            .into_iter()
            .map(|e| {
                assert!(e.key > 1, "a cgroup id: {}", e.key);
                (e.data, e.counter)
            })
            .collect();
        c.sort_by_key(|(d, _)| format!("{d:?}"));
        assert_eq!(
            c,
            vec![
                (ElemData::Mark(1), Some((0, 0))),
                (ElemData::Mark(2), Some((0, 0)))
            ]
        );
        // The rules: one per level in `lookup`, and others elsewhere.
        assert!(rules.iter().all(|r| r.table == "cgtproxy"));
        let lookups = rules.iter().filter(|r| r.chain == "lookup").count();
        assert!(lookups >= 16, "{lookups} rules in lookup");
    }

    /// Every message the kernel sent, cut at every length (the length field
    /// rewritten to the cut): each parser sees each truncation, none panics,
    /// a truncated element or rule message never yields more than the whole
    /// one, and each kind has cuts that are refused.
    #[test]
    fn every_truncation_of_kernel_replies_fails_cleanly() {
        let mut whole = Vec::new();
        let mut rest = KERNEL_DUMP;
        while rest.len() >= wire::NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            whole.push(&rest[..len]);
            rest = &rest[wire::align4(len)..];
        }
        assert!(whole.len() > 40, "{} messages", whole.len());
        let (mut cuts, mut refused) = (0, [0usize; 3]);
        for msg in whole {
            let m = wire::messages(msg).next().unwrap().unwrap();
            let full = (
                parse_elements(&m).map(|e| e.2.len()).unwrap_or(0),
                parse_rule(&m).map(|r| r.exprs.len()).unwrap_or(0),
            );
            let kind = (m.ty & 0xff) as u8;
            for cut in (wire::NLMSG_HDRLEN..msg.len()).flat_map(|c| [(c, false), (c, true)]) {
                let (cut, nested) = cut;
                let t = if nested {
                    wire::truncated_nested(msg, cut, 4)
                } else {
                    wire::truncated(msg, cut)
                };
                let m = wire::messages(&t).next().unwrap().unwrap();
                cuts += 1;
                let els = parse_elements(&m);
                let rule = parse_rule(&m);
                let set = parse_set(&m);
                let _ = (parse_names(&m), parse_newgen_pid(&m), wire::parse_error(&m));
                if let Ok(r) = &rule {
                    for e in &r.exprs {
                        for (ty, _) in &e.attrs {
                            let _ = (e.u32(*ty), e.data(*ty));
                        }
                    }
                }
                match kind {
                    NFT_MSG_NEWSETELEM => match els {
                        Ok(e) => assert!(e.2.len() <= full.0),
                        Err(_) => refused[0] += 1,
                    },
                    NFT_MSG_NEWRULE => match rule {
                        Ok(r) => assert!(r.exprs.len() <= full.1),
                        Err(_) => refused[1] += 1,
                    },
                    NFT_MSG_NEWSET => refused[2] += usize::from(set.is_err()),
                    _ => {}
                }
            }
        }
        assert!(cuts > 20_000, "{cuts} cuts");
        assert!(
            refused.iter().all(|n| *n > 20),
            "refused per kind: {refused:?}"
        );
    }
}
