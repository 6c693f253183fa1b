//! Policy routing for the proxy chain's mark, over rtnetlink:
//!
//! ```text
//! ip rule add fwmark MARK lookup TABLE            (and ip -6 rule)
//! ip route add local default dev lo table TABLE   (and ip -6 route)
//! ```
//!
//! A marked packet is routed to `lo`, comes back in through prerouting, and
//! the ruleset's TPROXY rule hands it to the proxy. Adding is idempotent
//! (NLM_F_EXCL turns "already there" into EEXIST, which we accept: a crashed
//! run's leftovers are adopted), and so is removing.

use neli::consts::socket::NlFamily;

use crate::config::Route;
use crate::error::Error;
use crate::netlink::{NlError, Socket};
use crate::wire::{self, ErrorMsg, Writer};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_STATIC: u8 = 4;

const FAMILIES: [(u8, &str); 2] = [
    (libc::AF_INET as u8, "IPv4"),
    (libc::AF_INET6 as u8, "IPv6"),
];

/// `ip [-6] rule {add|del} fwmark MARK/0xffffffff lookup TABLE`
fn rule_msg(seq: u32, add: bool, family: u8, r: &Route) -> Vec<u8> {
    let mut w = Writer::new();
    let (ty, flags) = if add {
        (RTM_NEWRULE, wire::NLM_F_CREATE | wire::NLM_F_EXCL)
    } else {
        (RTM_DELRULE, 0)
    };
    w.begin_msg(ty, wire::NLM_F_REQUEST | wire::NLM_F_ACK | flags, seq);
    // struct fib_rule_hdr { family, dst_len, src_len, tos, table, res1, res2, action; u32 flags }
    w.put(&[family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0]);
    w.attr_u32(FRA_FWMARK, r.mark);
    w.attr_u32(FRA_FWMASK, u32::MAX);
    w.attr_u32(FRA_TABLE, r.table);
    w.end_msg();
    w.buf
}

/// `ip [-6] route {add|del} local default dev lo table TABLE`
fn route_msg(seq: u32, add: bool, family: u8, r: &Route, lo: u32) -> Vec<u8> {
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

/// `ip [-6] rule show`: is there already a rule `fwmark MARK lookup TABLE`?
/// The kernel's own duplicate check (NLM_F_EXCL) compares priorities too, and
/// ours is chosen by the kernel, so a restart would stack a second rule.
fn rule_exists(nl: &mut Socket, family: u8, r: &Route) -> Result<bool, NlError> {
    let seq = nl.seq();
    let mut w = Writer::new();
    w.begin_msg(RTM_GETRULE, wire::NLM_F_REQUEST | wire::NLM_F_DUMP, seq);
    w.put(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.end_msg();
    let mut found = false;
    nl.request(&w.buf, seq, true, |m| {
        let hdr = m
            .payload
            .get(..12)
            .ok_or(wire::Malformed("truncated fib_rule_hdr"))?;
        let (mut mark, mut mask, mut table) = (None, u32::MAX, u32::from(hdr[4]));
        for a in wire::attrs(&m.payload[12..]) {
            let (ty, v) = a?;
            match ty {
                FRA_FWMARK => mark = Some(wire::ne32(v)?),
                FRA_FWMASK => mask = wire::ne32(v)?,
                FRA_TABLE => table = wire::ne32(v)?,
                _ => {}
            }
        }
        found |=
            hdr[7] == FR_ACT_TO_TBL && mark == Some(r.mark) && mask == u32::MAX && table == r.table;
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

fn errno(e: &NlError) -> Option<i32> {
    match e {
        NlError::Kernel(ErrorMsg { errno, .. }) => Some(*errno),
        _ => None,
    }
}

/// Installs the rule and the route for both families. IPv6 being disabled
/// is not an error (said once); anything else is, and then whatever this
/// call added is taken away again, so a failed start leaves routing as it
/// was. Returns whether anything was created (rather than found in place).
pub fn install(r: &Route) -> Result<bool, Error> {
    let mut nl = Socket::open(NlFamily::Route)
        .map_err(|e| Error::Runtime(format!("rtnetlink socket: {e}")))?;
    let lo = loopback_index();
    // What this call added: (family, the rule rather than the route).
    let mut made: Vec<(u8, bool)> = Vec::new();
    let result = install_each(&mut nl, r, lo, &mut made);
    if result.is_err() {
        for (family, rule) in made.iter().rev() {
            let seq = nl.seq();
            let msg = if *rule {
                rule_msg(seq, false, *family, r)
            } else {
                route_msg(seq, false, *family, r, lo)
            };
            let _ = nl.request(&msg, seq, false, |_| Ok(()));
        }
    }
    result.map(|()| !made.is_empty())
}

fn install_each(
    nl: &mut Socket,
    r: &Route,
    lo: u32,
    made: &mut Vec<(u8, bool)>,
) -> Result<(), Error> {
    for (family, name) in FAMILIES {
        let exists = match rule_exists(nl, family, r) {
            Ok(b) => b,
            Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {
                crate::info!("{name} is disabled; no {name} policy routing installed");
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
            Ok(()) if !exists => made.push((family, true)),
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {
                crate::info!("{name} is disabled; no {name} policy routing installed");
                continue;
            }
            Err(e) => {
                return Err(Error::Runtime(format!(
                    "{name} rule fwmark {} lookup {}: {e}",
                    r.mark, r.table
                )));
            }
        }
        let seq = nl.seq();
        match nl.request(&route_msg(seq, true, family, r, lo), seq, false, |_| Ok(())) {
            Ok(()) => made.push((family, false)),
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
/// removed. A route that `keep` (the routing replacing this one) needs too
/// stays: the route is per table, and two marks may share a table.
pub fn remove(r: &Route, keep: Option<&Route>) -> Vec<String> {
    let keep_route = keep.is_some_and(|k| k.table == r.table);
    let mut failures = Vec::new();
    let Ok(mut nl) = Socket::open(NlFamily::Route) else {
        return vec!["rtnetlink socket".into()];
    };
    let lo = loopback_index();
    for (family, name) in FAMILIES {
        let seq = nl.seq();
        if let Err(e) = nl.request(&rule_msg(seq, false, family, r), seq, false, |_| Ok(()))
            && !matches!(
                errno(&e),
                Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
            )
        {
            failures.push(format!(
                "{name} rule fwmark {} lookup {}: {e}",
                r.mark, r.table
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
        ) && !matches!(
            errno(&e),
            Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
        ) {
            failures.push(format!("{name} route table {}: {e}", r.table));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_bytes() {
        let b = rule_msg(
            7,
            true,
            libc::AF_INET as u8,
            &Route {
                mark: 9011,
                table: 9011,
            },
        );
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[52, 0, 0, 0, 32, 0, 0x05, 0x06, 7, 0, 0, 0, 0, 0, 0, 0][..], // RTM_NEWRULE, REQUEST|ACK|EXCL|CREATE
            &[2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],                        // fib_rule_hdr: AF_INET, FR_ACT_TO_TBL
            &[8, 0, 10, 0, 0x33, 0x23, 0, 0],                              // FRA_FWMARK 9011
            &[8, 0, 16, 0, 0xff, 0xff, 0xff, 0xff],                        // FRA_FWMASK
            &[8, 0, 15, 0, 0x33, 0x23, 0, 0],                              // FRA_TABLE 9011
        ]
        .concat();
        assert_eq!(b, want);
    }
}
