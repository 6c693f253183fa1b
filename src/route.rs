//! Policy routing for the proxy chain's mark, over rtnetlink:
//!
//! ```text
//! ip rule add priority PRIO fwmark MARK lookup TABLE   (and ip -6 rule)
//! ip route add local default dev lo table TABLE        (and ip -6 route)
//! ```
//!
//! A marked packet is routed to `lo`, comes back in through prerouting, and
//! the ruleset's TPROXY rule hands it to the proxy. The rule has an explicit
//! priority, ahead of the rules VPN clients add (tailscale 5210–5270,
//! wg-quick 32764–32765), so none of them can route a marked packet into a
//! tunnel. Adding is idempotent (an identical rule found in place, or EEXIST
//! for the route, is adopted: a crashed run's leftovers are ours), and so is
//! removing. While the daemon runs, [`Watch`] hears every rule and route
//! deletion, and the daemon puts back what someone else took away
//! (systemd-networkd's foreign-rule cleanup, `ip rule flush`, a VPN client).

use std::os::fd::BorrowedFd;

use neli::consts::socket::NlFamily;

use crate::error::Error;
use crate::netlink::{Conn, Socket, Transport};
use crate::wire::{self, Msg, Writer};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const FRA_SRC: u16 = 2;
const FRA_DST: u16 = 1;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_OIFNAME: u16 = 17;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 2;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_STATIC: u8 = 4;
/// rtnetlink multicast groups (linux/rtnetlink.h, enum rtnetlink_groups).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
/// Rule and route events are small; a flush of a big routing table is not.
const EVENT_RCVBUF: usize = 4 << 20;

const FAMILIES: [(u8, &str); 2] = [
    (libc::AF_INET as u8, "IPv4"),
    (libc::AF_INET6 as u8, "IPv6"),
];

/// The rule priority when the config names none: ahead of every VPN client
/// we know (tailscale 5210–5270, wg-quick 32764–32765) and of the main
/// table (32766); behind only the kernel's `lookup local` (0) and whatever
/// an administrator puts in 1–99 on purpose.
pub const DEFAULT_PRIORITY: u32 = 100;

/// The policy routing the daemon keeps, resolved: the mark is the live
/// ruleset's (or the config's, when that agrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rule priority {} fwmark {} lookup {}, route local default dev lo table {}",
            self.priority, self.mark, self.table, self.table
        )
    }
}

/// `ip [-6] rule {add|del} priority PRIO fwmark MARK/0xffffffff lookup TABLE`
fn rule_msg(seq: u32, add: bool, family: u8, r: &Policy) -> Vec<u8> {
    let mut w = Writer::new();
    let (ty, flags) = if add {
        (RTM_NEWRULE, wire::NLM_F_CREATE | wire::NLM_F_EXCL)
    } else {
        (RTM_DELRULE, 0)
    };
    w.begin_msg(ty, wire::NLM_F_REQUEST | wire::NLM_F_ACK | flags, seq);
    // struct fib_rule_hdr { family, dst_len, src_len, tos, table, res1, res2, action; u32 flags }
    w.put(&[family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0]);
    w.attr_u32(FRA_PRIORITY, r.priority);
    w.attr_u32(FRA_FWMARK, r.mark);
    w.attr_u32(FRA_FWMASK, u32::MAX);
    w.attr_u32(FRA_TABLE, r.table);
    w.end_msg();
    w.buf
}

/// `ip [-6] route {add|del} local default dev lo table TABLE`
fn route_msg(seq: u32, add: bool, family: u8, r: &Policy, lo: u32) -> Vec<u8> {
    let mut w = Writer::new();
    let (ty, flags, proto) = if add {
        (
            RTM_NEWROUTE,
            wire::NLM_F_CREATE | wire::NLM_F_EXCL,
            RTPROT_STATIC,
        )
    } else {
        (RTM_DELROUTE, 0, 0)
    };
    w.begin_msg(ty, wire::NLM_F_REQUEST | wire::NLM_F_ACK | flags, seq);
    // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags }
    w.put(&[
        family,
        0,
        0,
        0,
        0,
        proto,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ]);
    w.attr_u32(RTA_TABLE, r.table);
    w.attr_u32(RTA_OIF, lo);
    w.end_msg();
    w.buf
}

/// One policy rule as a dump shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleInfo {
    pub priority: u32,
    pub action: u8,
    pub table: u32,
    pub mark: Option<u32>,
    pub mask: u32,
    pub invert: bool,
    pub src: Option<(Vec<u8>, u8)>,
    pub dst: Option<(Vec<u8>, u8)>,
    pub iif: Option<String>,
    pub oif: Option<String>,
}

impl RuleInfo {
    fn is(&self, r: &Policy) -> bool {
        self.action == FR_ACT_TO_TBL
            && !self.invert
            && self.mark == Some(r.mark)
            && self.mask == u32::MAX
            && self.table == r.table
            && self.src.is_none()
            && self.dst.is_none()
            && self.iif.is_none()
            && self.oif.is_none()
    }

    /// The kernel's own `lookup local` at priority 0, which precedes every
    /// rule by design and is not worth listing.
    fn is_local(&self) -> bool {
        self.priority == 0 && self.action == FR_ACT_TO_TBL && self.table == 255
    }
}

/// Like `ip rule show` prints it.
impl std::fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn addr(a: &[u8], len: u8) -> String {
            format!("{}/{len}", ip_text(a))
        }
        write!(f, "{}:", self.priority)?;
        if self.invert {
            f.write_str(" not")?;
        }
        match &self.src {
            Some((a, l)) => write!(f, " from {}", addr(a, *l))?,
            None => f.write_str(" from all")?,
        }
        if let Some((a, l)) = &self.dst {
            write!(f, " to {}", addr(a, *l))?;
        }
        if let Some(m) = self.mark {
            write!(f, " fwmark {m:#x}")?;
            if self.mask != u32::MAX {
                write!(f, "/{:#x}", self.mask)?;
            }
        }
        if let Some(i) = &self.iif {
            write!(f, " iif {i}")?;
        }
        if let Some(o) = &self.oif {
            write!(f, " oif {o}")?;
        }
        match self.action {
            FR_ACT_TO_TBL => write!(f, " lookup {}", self.table),
            2 => f.write_str(" goto"),
            3 => f.write_str(" nop"),
            6 => f.write_str(" blackhole"),
            7 => f.write_str(" unreachable"),
            8 => f.write_str(" prohibit"),
            a => write!(f, " action {a}"),
        }
    }
}

/// An address as `ip` prints it: dotted IPv4, or IPv6 groups with the
/// longest run of zero groups (two or more) as `::`. By hand: std's
/// formatter for IpAddr is several KiB of a static binary for one line of
/// `check`.
fn ip_text(a: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    match a.len() {
        4 => {
            let _ = write!(s, "{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
        }
        16 => {
            let g: Vec<u16> = a
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            // The longest run of zero groups, the first of equals.
            let (mut best, mut run) = ((0, 0), (0, 0));
            for (i, &x) in g.iter().enumerate() {
                run = if x == 0 {
                    (run.0, run.1 + 1)
                } else {
                    (i + 1, 0)
                };
                if run.1 > best.1 {
                    best = run;
                }
            }
            let hex = |s: &mut String, gs: &[u16]| {
                for (i, x) in gs.iter().enumerate() {
                    let _ = write!(s, "{}{x:x}", if i == 0 { "" } else { ":" });
                }
            };
            if best.1 >= 2 {
                hex(&mut s, &g[..best.0]);
                s.push_str("::");
                hex(&mut s, &g[best.0 + best.1..]);
            } else {
                hex(&mut s, &g);
            }
        }
        _ => s.push('?'),
    }
    s
}

/// One RTM_NEWRULE of a dump (or an event).
fn parse_rule(m: &Msg<'_>) -> Result<RuleInfo, Error> {
    let hdr = m
        .payload
        .get(..12)
        .ok_or(Error::Malformed("truncated fib_rule_hdr"))?;
    let flags = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let mut r = RuleInfo {
        action: hdr[7],
        table: u32::from(hdr[4]),
        mask: u32::MAX,
        invert: flags & FIB_RULE_INVERT != 0,
        ..RuleInfo::default()
    };
    for a in wire::attrs(&m.payload[12..]) {
        let (ty, v) = a?;
        match ty {
            FRA_PRIORITY => r.priority = wire::ne32(v)?,
            FRA_FWMARK => r.mark = Some(wire::ne32(v)?),
            FRA_FWMASK => r.mask = wire::ne32(v)?,
            FRA_TABLE => r.table = wire::ne32(v)?,
            FRA_SRC => r.src = Some((v.to_vec(), hdr[2])),
            FRA_DST => r.dst = Some((v.to_vec(), hdr[1])),
            FRA_IIFNAME => r.iif = Some(wire::string(v).to_string()),
            FRA_OIFNAME => r.oif = Some(wire::string(v).to_string()),
            _ => {}
        }
    }
    // A mark of 0 with no mask is how some tools say "no fwmark".
    if r.mark == Some(0) && r.mask == 0 {
        r.mark = None;
    }
    Ok(r)
}

/// `ip [-6] rule show`
fn rules<T: Transport>(nl: &mut Conn<T>, family: u8) -> Result<Vec<RuleInfo>, Error> {
    let seq = nl.seq();
    let mut w = Writer::new();
    w.begin_msg(RTM_GETRULE, wire::NLM_F_REQUEST | wire::NLM_F_DUMP, seq);
    w.put(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.end_msg();
    let mut out = Vec::new();
    nl.request(&w.buf, seq, true, |m| {
        out.push(parse_rule(m)?);
        Ok(())
    })?;
    Ok(out)
}

/// `ip [-6] route show table TABLE`: is `local default dev lo` there?
fn route_exists<T: Transport>(
    nl: &mut Conn<T>,
    family: u8,
    r: &Policy,
    lo: u32,
) -> Result<bool, Error> {
    let seq = nl.seq();
    let mut w = Writer::new();
    w.begin_msg(RTM_GETROUTE, wire::NLM_F_REQUEST | wire::NLM_F_DUMP, seq);
    w.put(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.attr_u32(RTA_TABLE, r.table);
    w.end_msg();
    let mut found = false;
    nl.request(&w.buf, seq, true, |m| {
        let hdr = m
            .payload
            .get(..12)
            .ok_or(Error::Malformed("truncated rtmsg"))?;
        let (mut table, mut oif, mut dst) = (u32::from(hdr[4]), None, false);
        for a in wire::attrs(&m.payload[12..]) {
            let (ty, v) = a?;
            match ty {
                RTA_TABLE => table = wire::ne32(v)?,
                RTA_OIF => oif = Some(wire::ne32(v)?),
                RTA_DST => dst = true,
                _ => {}
            }
        }
        found |= table == r.table && hdr[1] == 0 && !dst && hdr[7] == RTN_LOCAL && oif == Some(lo);
        Ok(())
    })?;
    Ok(found)
}

fn loopback_index() -> u32 {
    // SAFETY: a NUL-terminated literal.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => 1, // lo is ifindex 1 in every network namespace
        i => i,
    }
}

fn errno(e: &Error) -> Option<i32> {
    e.errno()
}

fn socket() -> Result<Socket, Error> {
    Socket::open(NlFamily::Route).map_err(|e| Error::Runtime(format!("rtnetlink socket: {e}")))
}

/// What an install added: (family, the rule rather than the route).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Made(Vec<(u8, bool)>);

impl Made {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The families something was added for ("IPv4", "IPv6").
    pub fn families(&self) -> Vec<&'static str> {
        FAMILIES
            .iter()
            .filter(|(f, _)| self.0.iter().any(|(g, _)| g == f))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Installs the rule and the route for both families. IPv6 being disabled
/// is not an error (said once); anything else is, and then whatever this
/// call added is taken away again, so a failed start leaves routing as it
/// was. Returns what was created (rather than found in place).
pub fn install(r: &Policy) -> Result<Made, Error> {
    let mut nl = socket()?;
    install_on(&mut nl, r, loopback_index(), false)
}

/// Puts back whatever part of the routing is gone, while running: quiet
/// about a disabled family (said at start), and keeping what it could put
/// back when another part fails (half the routing beats none).
pub fn repair(r: &Policy) -> Result<Made, Error> {
    let mut nl = socket()?;
    install_on(&mut nl, r, loopback_index(), true)
}

/// Whether any IPv4 rule routes packets with fwmark `mark` (for `"route":
/// false`, where someone else must).
pub fn routes_mark(mark: u32) -> Result<bool, Error> {
    let mut nl = socket()?;
    let list = rules(&mut nl, libc::AF_INET as u8)
        .map_err(|e| Error::Runtime(format!("IPv4 rules: {e}")))?;
    Ok(list
        .iter()
        .any(|x| !x.invert && x.mark.is_some_and(|m| m & x.mask == mark & x.mask)))
}

/// `repair` leaves what it made; `install` (`!repair`) rolls it back on failure.
fn install_on<T: Transport>(
    nl: &mut Conn<T>,
    r: &Policy,
    lo: u32,
    repair: bool,
) -> Result<Made, Error> {
    let mut made = Made::default();
    let quiet = repair;
    let result = install_each(nl, r, lo, quiet, &mut made);
    if result.is_err() && !repair {
        undo(nl, r, lo, &made);
    }
    result.map(|()| made)
}

/// Deletes exactly what `made` says was added, newest first.
fn undo<T: Transport>(nl: &mut Conn<T>, r: &Policy, lo: u32, made: &Made) {
    for (family, rule) in made.0.iter().rev() {
        let seq = nl.seq();
        let msg = if *rule {
            rule_msg(seq, false, *family, r)
        } else {
            route_msg(seq, false, *family, r, lo)
        };
        let _ = nl.request(&msg, seq, false, |_| Ok(()));
    }
}

/// Takes back what an `install` added (and only that: a rule or route
/// found in place was someone's before us), when the start fails later.
pub fn take_back(r: &Policy, made: &Made) {
    if made.is_empty() {
        return;
    }
    if let Ok(mut nl) = socket() {
        undo(&mut nl, r, loopback_index(), made);
    }
}

fn install_each<T: Transport>(
    nl: &mut Conn<T>,
    r: &Policy,
    lo: u32,
    quiet: bool,
    made: &mut Made,
) -> Result<(), Error> {
    for (family, name) in FAMILIES {
        let disabled = || {
            if !quiet {
                crate::info!("{name} is disabled; no {name} policy routing installed");
            }
        };
        // The kernel's duplicate check (NLM_F_EXCL) is loose for rules (an
        // identical rule is refused, a similar one stacked), so look first.
        let exists = match rules(nl, family) {
            Ok(list) => list.iter().any(|x| x.is(r) && x.priority == r.priority),
            Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {
                disabled();
                continue;
            }
            Err(e) => return Err(Error::Runtime(format!("{name} rules: {e}"))),
        };
        let added = if exists {
            Ok(())
        } else {
            let seq = nl.seq();
            nl.request(&rule_msg(seq, true, family, r), seq, false, |_| Ok(()))
        };
        match added {
            Ok(()) if !exists => made.0.push((family, true)),
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {
                disabled();
                continue;
            }
            Err(e) => {
                return Err(Error::Runtime(format!(
                    "{name} rule priority {} fwmark {} lookup {}: {e}",
                    r.priority, r.mark, r.table
                )));
            }
        }
        let seq = nl.seq();
        match nl.request(&route_msg(seq, true, family, r, lo), seq, false, |_| Ok(())) {
            Ok(()) => made.0.push((family, false)),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                // IPv6 refuses a route through a device that is down.
                let hint = if errno(&e) == Some(libc::ENETDOWN) {
                    " (the loopback interface is down: `ip link set lo up`)"
                } else {
                    ""
                };
                return Err(Error::Runtime(format!(
                    "{name} route local default dev lo table {}: {e}{hint}",
                    r.table
                )));
            }
        }
    }
    Ok(())
}

/// Removes both; already-absent ones are fine. Returns what could not be
/// removed. Only the rule at our priority goes (a process removes only what
/// it owns). A route that `keep` (the routing replacing this one) needs too
/// stays: the route is per table, and two marks may share a table.
pub fn remove(r: &Policy, keep: Option<&Policy>) -> Vec<String> {
    let keep_route = keep.is_some_and(|k| k.table == r.table);
    let keep_rule = keep.is_some_and(|k| k == r);
    let mut failures = Vec::new();
    let Ok(mut nl) = Socket::open(NlFamily::Route) else {
        return vec!["rtnetlink socket".into()];
    };
    let lo = loopback_index();
    let gone = |e: &Error| {
        matches!(
            errno(e),
            Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
        )
    };
    for (family, name) in FAMILIES {
        let seq = nl.seq();
        if !keep_rule
            && let Err(e) = nl.request(&rule_msg(seq, false, family, r), seq, false, |_| Ok(()))
            && !gone(&e)
        {
            failures.push(format!(
                "{name} rule priority {} fwmark {} lookup {}: {e}",
                r.priority, r.mark, r.table
            ));
        }
        if keep_route {
            continue;
        }
        let seq = nl.seq();
        if let Err(e) = nl.request(
            &route_msg(seq, false, family, r, lo),
            seq,
            false,
            |_| Ok(()),
        ) && !gone(&e)
        {
            failures.push(format!("{name} route table {}: {e}", r.table));
        }
    }
    failures
}

/// What `check` and `status` show for one family.
#[derive(Debug, Default)]
pub struct FamilyState {
    pub name: &'static str,
    /// The family is disabled in this kernel (or namespace).
    pub disabled: bool,
    pub rule: bool,
    pub route: bool,
    /// Rules at a lower priority than ours (the kernel's `lookup local`
    /// left out): each may take a marked packet before ours sees it.
    pub ahead: Vec<RuleInfo>,
    /// Rules with our mark and table at another priority (an older
    /// version's, or someone else's).
    pub others: Vec<RuleInfo>,
}

/// The rule and route of `r` as the kernel has them now, for both families.
/// Read-only.
pub fn state(r: &Policy) -> Result<Vec<FamilyState>, Error> {
    let mut nl = socket()?;
    let lo = loopback_index();
    let mut out = Vec::new();
    for (family, name) in FAMILIES {
        let mut s = FamilyState {
            name,
            ..FamilyState::default()
        };
        match rules(&mut nl, family) {
            Ok(list) => {
                for x in list {
                    if x.is(r) && x.priority == r.priority {
                        s.rule = true;
                    } else if x.is(r) {
                        s.others.push(x);
                    } else if x.priority < r.priority && !x.is_local() {
                        s.ahead.push(x);
                    }
                }
            }
            Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {
                s.disabled = true;
                out.push(s);
                continue;
            }
            Err(e) => return Err(Error::Runtime(format!("{name} rules: {e}"))),
        }
        s.route = route_exists(&mut nl, family, r, lo)
            .map_err(|e| Error::Runtime(format!("{name} routes of table {}: {e}", r.table)))?;
        out.push(s);
    }
    Ok(out)
}

/// Rule and route deletions, as they happen: RTNLGRP_IPV{4,6}_{RULE,ROUTE}
/// on a socket of their own (the nf_tables events have theirs).
pub struct Watch {
    sock: Socket,
}

impl Watch {
    pub fn open() -> Result<Watch, Error> {
        let mut sock = Socket::subscribe(NlFamily::Route, RTNLGRP_IPV4_RULE, EVENT_RCVBUF)
            .map_err(|e| Error::Runtime(format!("rtnetlink event socket: {e}")))?;
        // The link group: IPv6 refuses a route through a `lo` that is down
        // (and deletes ours when it goes down), so a repair that failed for
        // that is tried again the moment `lo` is up.
        for g in [
            RTNLGRP_IPV6_RULE,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_LINK,
        ] {
            // An IPv6-less kernel has no IPv6 groups to join; the IPv4 ones
            // still count.
            let _ = sock.join(g, EVENT_RCVBUF);
        }
        Ok(Watch { sock })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }

    /// Reads every queued event. True when one of them removed a rule
    /// with our mark or table, or a route of our table, or events were lost
    /// (ENOBUFS), or (`failing`: a repair failed) `lo` is up: then the
    /// routing must be checked.
    pub fn removed(&mut self, r: &Policy, failing: bool) -> bool {
        let mut hit = false;
        let lo = loopback_index();
        let res = self.sock.drain(|m| {
            hit |= match m.ty {
                RTM_DELRULE => parse_rule(m)
                    .map(|x| x.table == r.table || x.mark == Some(r.mark))
                    .unwrap_or(true),
                RTM_DELROUTE => route_table(m).is_none_or(|t| t == r.table),
                RTM_NEWLINK => failing && link_up(m, lo),
                _ => false,
            };
        });
        hit | res.is_err()
    }
}

/// RTM_NEWLINK of interface `index` with IFF_UP set (struct ifinfomsg:
/// family, pad, type u16, index i32, flags u32, change u32).
fn link_up(m: &Msg<'_>, index: u32) -> bool {
    let Some(h) = m.payload.get(..16) else {
        return false;
    };
    let ifindex = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
    let flags = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
    ifindex == index && flags & libc::IFF_UP as u32 != 0
}

fn route_table(m: &Msg<'_>) -> Option<u32> {
    let hdr = m.payload.get(..12)?;
    let mut table = u32::from(hdr[4]);
    for (ty, v) in wire::attrs(&m.payload[12..]).flatten() {
        if ty == RTA_TABLE {
            table = wire::ne32(v).ok()?;
        }
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::fake::{Fake, done, error};

    const P: Policy = Policy {
        mark: 9011,
        table: 9011,
        priority: 100,
    };
    const V4: u8 = libc::AF_INET as u8;
    const V6: u8 = libc::AF_INET6 as u8;

    /// (type, family) of each message sent.
    fn sent(c: &mut Conn<Fake>) -> Vec<(u16, u8)> {
        c.transport()
            .sent
            .iter()
            .map(|d| {
                let m = wire::messages(d).next().unwrap().unwrap();
                (m.ty, m.payload[0])
            })
            .collect()
    }

    /// A kernel with no rule of ours, that takes everything but the IPv6
    /// route (lo down: ENETDOWN), and with `have_v4_rule` already holds our
    /// IPv4 rule.
    fn kernel(have_v4_rule: bool) -> Conn<Fake> {
        let fake = Fake::new(move |d| {
            let m = wire::messages(d).next().unwrap().unwrap();
            let family = m.payload[0];
            Ok(match m.ty {
                RTM_GETRULE if have_v4_rule && family == V4 => {
                    vec![[rule_msg(m.seq, true, V4, &P), done(m.seq)].concat()]
                }
                RTM_GETRULE => vec![done(m.seq)],
                RTM_NEWROUTE if family == V6 => {
                    vec![error(m.seq, m.ty, libc::ENETDOWN, None)]
                }
                _ => vec![error(m.seq, m.ty, 0, None)],
            })
        });
        Conn::with_seq(fake, 1)
    }

    /// What it proves: a start that fails half-way (the IPv6 route refused)
    /// takes back exactly what it added, newest first, and says why with
    /// the way out; a rule it found in place is not its to remove. How it
    /// can fail: no rollback, a rollback in the wrong order or of the wrong
    /// messages, or removing the adopted rule.
    #[test]
    fn a_failed_install_takes_back_what_it_added() {
        let mut c = kernel(false);
        let e = install_on(&mut c, &P, 1, false).unwrap_err().to_string();
        assert!(
            e.contains("IPv6 route local default dev lo table 9011")
                && e.contains("ip link set lo up"),
            "{e}"
        );
        assert_eq!(
            sent(&mut c),
            [
                (RTM_GETRULE, V4),
                (RTM_NEWRULE, V4),
                (RTM_NEWROUTE, V4),
                (RTM_GETRULE, V6),
                (RTM_NEWRULE, V6),
                (RTM_NEWROUTE, V6),
                // The rollback, newest first.
                (RTM_DELRULE, V6),
                (RTM_DELROUTE, V4),
                (RTM_DELRULE, V4),
            ]
        );
        // Each delete is the exact inverse of its add (same priority, so
        // only our rule goes).
        let d = &c.transport().sent;
        let seq = |i: usize| wire::messages(&d[i]).next().unwrap().unwrap().seq;
        assert_eq!(d[6], rule_msg(seq(6), false, V6, &P));
        assert_eq!(d[7], route_msg(seq(7), false, V4, &P, 1));
        assert_eq!(d[8], rule_msg(seq(8), false, V4, &P));

        // Our IPv4 rule was there already: adopted, not added, not removed.
        let mut c = kernel(true);
        assert!(install_on(&mut c, &P, 1, false).is_err());
        let kinds = sent(&mut c);
        assert!(!kinds.contains(&(RTM_NEWRULE, V4)), "{kinds:?}");
        assert!(!kinds.contains(&(RTM_DELRULE, V4)), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&(RTM_DELROUTE, V4)));

        // A repair while running keeps what it could put back.
        let mut c = kernel(false);
        assert!(install_on(&mut c, &P, 1, true).is_err());
        let kinds = sent(&mut c);
        assert!(
            kinds
                .iter()
                .all(|(t, _)| *t != RTM_DELRULE && *t != RTM_DELROUTE),
            "{kinds:?}"
        );
    }

    /// What it proves: addresses print as `ip` prints them. How it can
    /// fail: a wrong zero-run compression.
    #[test]
    fn addresses_as_ip_prints_them() {
        let v6 = |s: &str| ip_text(&s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        for want in [
            "2001:db8::1",
            "::",
            "::1",
            "fe80::",
            "1:0:2::3",
            "1::2:0:0:3",
            "1:2:3:4:5:6:7:8",
            "1:0:2:3:4:5:6:7",
        ] {
            assert_eq!(v6(want), want);
        }
        assert_eq!(ip_text(&[198, 18, 0, 1]), "198.18.0.1");
        assert_eq!(ip_text(&[1, 2, 3]), "?");
    }

    /// What it proves: the dump of `ip rule` is read back into what `check`
    /// and `status` print, ours recognised by mark, mask, table and
    /// priority. How it can fail: a field read from the wrong attribute.
    #[test]
    fn rules_read_back_as_ip_prints_them() {
        let msg = rule_msg(1, true, V4, &P);
        let m = wire::messages(&msg).next().unwrap().unwrap();
        let r = parse_rule(&m).unwrap();
        assert!(r.is(&P) && r.priority == 100);
        assert_eq!(r.to_string(), "100: from all fwmark 0x2333 lookup 9011");
        assert!(!r.is(&Policy { table: 9012, ..P }));
    }

    #[test]
    fn rule_bytes() {
        let b = rule_msg(
            7,
            true,
            libc::AF_INET as u8,
            &Policy {
                mark: 9011,
                table: 9011,
                priority: 100,
            },
        );
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[60, 0, 0, 0, 32, 0, 0x05, 0x06, 7, 0, 0, 0, 0, 0, 0, 0][..], // RTM_NEWRULE, REQUEST|ACK|EXCL|CREATE
            &[2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],                        // fib_rule_hdr: AF_INET, FR_ACT_TO_TBL
            &[8, 0, 6, 0, 100, 0, 0, 0],                                   // FRA_PRIORITY 100
            &[8, 0, 10, 0, 0x33, 0x23, 0, 0],                              // FRA_FWMARK 9011
            &[8, 0, 16, 0, 0xff, 0xff, 0xff, 0xff],                        // FRA_FWMASK
            &[8, 0, 15, 0, 0x33, 0x23, 0, 0],                              // FRA_TABLE 9011
        ]
        .concat();
        assert_eq!(b, want);
    }
}
