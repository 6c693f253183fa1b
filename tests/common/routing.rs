//! Policy routing as the kernel sees it (`ip rule`, `ip route`).

use std::fs;

use super::nft::{nft_script, ruleset_path};
use super::process::{run, run_ok};
use super::{ROUTE_MARK, ROUTE_TABLE};

/// Installs, for both families, what `route` in the config makes the
/// daemon install: `fwmark MARK lookup TABLE`, `local default dev lo table TABLE`.
pub fn add_policy_routing(mark: u32, table: u32) {
    let (mark, table) = (mark.to_string(), table.to_string());
    for fam in ["-4", "-6"] {
        run_ok(
            "ip",
            &[fam, "rule", "add", "fwmark", &mark, "lookup", &table],
        );
        run_ok(
            "ip",
            &[
                fam, "route", "add", "local", "default", "dev", "lo", "table", &table,
            ],
        );
    }
}

/// `ip -4|-6 rule show` in the current network namespace.
pub fn ip_rules(family: &str) -> String {
    run_ok("ip", &[family, "rule", "show"])
}

/// `ip -4|-6 route show table T` in the current network namespace; empty
/// for a table the namespace never had (ip fails on it).
pub fn ip_routes(family: &str, table: u32) -> String {
    let args = [family, "route", "show", "table", &table.to_string()];
    let f = run("ip", &args);
    if !f.status.success() && f.stderr.contains("FIB table does not exist") {
        return String::new();
    }
    assert!(f.status.success(), "ip {args:?} failed: {}", f.describe());
    f.stdout
}

/// Whether the policy rule and local route of `route` are in place, per
/// family (v4, v6).
pub fn policy_routing(mark: u32, table: u32) -> [(bool, bool); 2] {
    let mark_hex = format!("fwmark {mark:#x}");
    let lookup = format!("lookup {table}");
    ["-4", "-6"].map(|fam| {
        let rules = ip_rules(fam);
        let rule = rules
            .lines()
            .any(|l| l.contains(&mark_hex) && l.contains(&lookup));
        let route = ip_routes(fam, table).contains("local default dev lo");
        (rule, route)
    })
}

/// Asserts that the policy rule and the local route of (mark, table) are
/// both present (`present`) or both absent, for IPv4 and IPv6.
pub fn assert_policy_routing(mark: u32, table: u32, present: bool, when: &str) {
    let got = policy_routing(mark, table);
    assert!(
        got == [(present, present); 2],
        "{when}: expected fwmark {mark:#x} lookup {table} and `local default dev lo table {table}` {}, \
         found (rule, route) for (v4, v6) = {got:?}\n\
         ip -4 rule:\n{}ip -6 rule:\n{}ip -4 route table {table}:\n{}ip -6 route table {table}:\n{}",
        if present { "present" } else { "absent" },
        ip_rules("-4"),
        ip_rules("-6"),
        ip_routes("-4", table),
        ip_routes("-6", table),
    );
}

/// `ip -4|-6 rule` lines for (mark, table).
pub fn policy_rule_lines(family: &str, mark: u32, table: u32) -> usize {
    let (m, t) = (format!("fwmark {mark:#x}"), format!("lookup {table}"));
    ip_rules(family)
        .lines()
        .filter(|l| l.contains(&m) && l.contains(&t))
        .count()
}

pub fn local_route_lines(family: &str, table: u32) -> usize {
    ip_routes(family, table)
        .lines()
        .filter(|l| l.contains("local default dev lo"))
        .count()
}

pub fn assert_single_policy_routing(when: &str) {
    for fam in ["-4", "-6"] {
        assert_eq!(
            (
                policy_rule_lines(fam, ROUTE_MARK, ROUTE_TABLE),
                local_route_lines(fam, ROUTE_TABLE)
            ),
            (1, 1),
            "{when}: expected exactly one `fwmark {ROUTE_MARK:#x} lookup {ROUTE_TABLE}` rule and \
             one `local default dev lo table {ROUTE_TABLE}` route ({fam}); rules:\n{}\nroutes:\n{}",
            ip_rules(fam),
            ip_routes(fam, ROUTE_TABLE)
        );
    }
}

/// Loads the shipped ruleset with `define CGTPROXY_MARK` set to `mark`
/// (the daemon refuses a `route.mark` that differs from the ruleset's).
pub fn load_ruleset_with_mark(mark: u32) {
    let path = ruleset_path();
    let text = fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("define CGTPROXY_MARK "))
        .unwrap_or_else(|| panic!("{}: no `define CGTPROXY_MARK`", path.display()));
    let changed = text.replacen(line, &format!("define CGTPROXY_MARK = {mark}"), 1);
    // Relative includes resolve against the shipped directory.
    let dir = path.parent().unwrap();
    let script = changed.replace("include \"./", &format!("include \"{}/", dir.display()));
    nft_script(&script);
}
