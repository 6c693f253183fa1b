//! What the daemon must survive (issue 3, INTERFACE.md section 5), end to
//! end: ruleset reloads, flushes and deletes under it, live config reload,
//! SIGKILL and restart, create/remove storms, inotify queue overflow,
//! running out of inotify watches, a CAP_NET_ADMIN-only run, and hostile
//! cgroup names.
//!
//! Each test runs in its own network namespace with its own cgroup subtree
//! (tests/common/). The map is read back with the real `nft`; the truth is
//! computed from a walk of the subtree through directory fds
//! (tests/common/fdtree.rs: paths longer than PATH_MAX and non-UTF-8 names
//! are seen as they are) and the rules. Transactions are watched with our
//! own NFNLGRP_NFTABLES listener (tests/common/monitor.rs): each
//! transaction's element events, closed by NEWGEN with the committer's pid,
//! are what `nft monitor` prints.
//!
//! They need root; without it they print SKIP (and fail with CI=true).

pub mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Generous bound for convergence after big changes (storms, overflow).
const SLOW_CONVERGE: Duration = Duration::from_secs(30);

/// Linux PATH_MAX, including the terminating NUL.
const PATH_MAX: usize = 4096;

/// A small deterministic PRNG (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// 1. Ruleset reload while running
// ---------------------------------------------------------------------------

#[test]
fn ruleset_reload_refills_2000_elements() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[("/p(/.*)?", "proxy"), ("/d", "direct")]);
        let cgs: Vec<String> = (0..2000).map(|i| format!("/p/g{}/c{i}", i % 40)).collect();
        mkdir_all(env, &cgs);
        env.cg.mkdir(&["/d", "/other/x"]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &["-q"]);
        let expected = converge(env, &rules, CONVERGE, "initial sync");
        assert_eq!(expected.len(), 2000 + 40 + 1 + 1);

        let mon = Monitor::start();
        let mut from_commit = Vec::new();
        for round in 0..3 {
            let before = mon.txns().len();
            let t0 = Instant::now();
            load_ruleset();
            let t1 = Instant::now();
            converge(env, &rules, CONVERGE, "after `nft -f` of the ruleset");
            // No feedback loop: the daemon does not react to its own refill.
            thread::sleep(Duration::from_millis(300));
            mon.assert_complete();
            let txns: Vec<Txn> = mon.txns().split_off(before);
            let reload = txns
                .iter()
                .find(|t| {
                    t.pid != d.pid() as u32
                        && t.others
                            .iter()
                            .any(|(k, n)| *k == NFT_MSG_NEWTABLE && n == "cgtproxy")
                })
                .unwrap_or_else(|| panic!("no NEWTABLE event for the reload: {txns:?}"));
            let mine: Vec<&Txn> = txns.iter().filter(|t| t.pid == d.pid() as u32).collect();
            assert!(
                !mine.is_empty() && mine.iter().all(|t| t.at() >= reload.at()),
                "refill transactions: {mine:?}"
            );
            assert!(mine.iter().all(|t| t.touches_our_map()));
            assert_eq!(
                mine.len(),
                1,
                "the refill is one transaction, and nothing follows it"
            );
            // The reload emptied `verdicts` too: the refill adds the
            // numbers it uses in the same transaction (composed here with
            // nothing else), and exactly what the map now holds.
            let added = mine[0].adds(&VerdictDump::new());
            assert_eq!(added, expected, "the refill adds exactly the truth");
            // ... and the flag that says the maps are filled.
            let mut vadds = mine[0].verdict_adds();
            assert_eq!(
                vadds.remove(&FILLED_FLAG).as_deref(),
                Some("drop"),
                "the refill sets the flag"
            );
            assert_eq!(
                vadds,
                dump_verdicts(),
                "the refill adds exactly the verdict numbers in use"
            );
            let done = mine.last().unwrap().at();
            let since_commit = done - reload.at();
            let since_return = done.checked_duration_since(t1);
            eprintln!(
                "reload→refilled (round {round}): {:.1} ms after the reload's commit event, \
                 {} after `nft -f` returned (nft ran {:.1} ms); {} elements in {} transaction(s)",
                ms(since_commit),
                since_return.map_or("before it".to_string(), |d| format!("{:.1} ms", ms(d))),
                ms(t1 - t0),
                added.len(),
                mine.len()
            );
            assert!(since_commit < Duration::from_secs(5));
            from_commit.push(since_commit);
        }
        from_commit.sort();
        eprintln!(
            "reload→refilled: median {:.1} ms over {} reloads of a 2042-element map",
            ms(from_commit[1]),
            from_commit.len()
        );
        assert_proxied(env, &proxy, &remote, "/p/g7/c7", Proto::Tcp, Remote::v4());
        assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v6());
        assert!(d.running());
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 2. Flush of the map; the table deleted (and the whole ruleset flushed),
//    cgroups changing while it is gone, then re-loaded
// ---------------------------------------------------------------------------

#[test]
fn map_flush_and_table_delete_while_cgroups_change() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[
            ("/p(/.*)?", "proxy"),
            ("/d[0-9]*", "direct"),
            ("/x", "drop"),
        ]);
        let cgs: Vec<String> = (0..300).map(|i| format!("/p/a{}/b{i}", i % 10)).collect();
        mkdir_all(env, &cgs);
        env.cg.mkdir(&["/d", "/x", "/n/o"]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &[]);
        converge(env, &rules, CONVERGE, "initial sync");

        let mon = Monitor::start();
        nft_script("flush map inet cgtproxy cgroups\n");
        let map = converge(env, &rules, CONVERGE, "after `nft flush map`");
        assert!(
            mon.wait_for(CONVERGE, |t| t.iter().any(|t| t.pid == d.pid() as u32)),
            "no refill transaction"
        );
        let refill: Vec<Txn> = mon.by_pid(d.pid());
        assert_eq!(refill.len(), 1, "refill after a flush: one transaction");
        assert_eq!(refill[0].adds(&dump_verdicts()), map);

        // Gone for a while (past the 2 s retry timer), cgroups changing.
        let missing = "table inet cgtproxy does not exist";
        let absences: [(&str, &str); 2] = [
            ("delete table inet cgtproxy\n", "delete table"),
            ("flush ruleset\n", "flush ruleset"),
        ];
        for (round, (script, what)) in absences.iter().enumerate() {
            nft_script(script);
            env.cg.mkdir(&[
                &format!("/p/new{round}/deep/er"),
                &format!("/d{round}"),
                &format!("/q{round}"),
            ]);
            env.cg.rmdir(&format!("/p/a{round}"));
            if round == 0 {
                env.cg.rmdir("/x");
            } else {
                env.cg.mkdir(&["/x"]);
            }
            wait_log(|| d.log(), missing, round + 1, Duration::from_secs(5));
            thread::sleep(Duration::from_millis(2500));
            env.cg.mkdir(&[&format!("/p/late{round}")]);
            thread::sleep(Duration::from_millis(300));
            assert!(d.running(), "died after `{what}`:\n{}", d.log());
            assert_eq!(
                count(&d.log(), missing),
                round + 1,
                "while the table is missing ({what}), say so once:\n{}",
                d.log()
            );
            load_ruleset();
            converge(env, &rules, CONVERGE, &format!("re-load after `{what}`"));
            wait_log(|| d.log(), "is back", round + 1, CONVERGE);
            assert_proxied(
                env,
                &proxy,
                &remote,
                &format!("/p/late{round}"),
                Proto::Tcp,
                Remote::v4(),
            );
            assert_direct(
                env,
                &proxy,
                &remote,
                &format!("/d{round}"),
                Proto::Udp,
                Remote::v4(),
            );
        }
        assert_eq!(count(&d.log(), missing), 2, "{}", d.log());
        mon.assert_complete();
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 3. SIGHUP with changed rules: one transaction, never a missing element
// ---------------------------------------------------------------------------

#[test]
fn sighup_switches_verdicts_in_one_transaction() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/a", "/b", "/c/k", "/z", "/n"]);
        let old = Rules::new(&[
            ("/a", "proxy"),
            ("/b", "direct"),
            ("/c(/.*)?", "proxy"),
            ("/z", "drop"),
        ]);
        let new = Rules::new(&[
            ("/a", "direct"),
            ("/b", "proxy"),
            ("/c(/.*)?", "proxy"),
            ("/n", "proxy"),
        ]);
        let config = env.write_config(&Config::new(&old));
        let d = start_daemon(env, &config, &[]);
        let before = converge(env, &old, CONVERGE, "initial sync");
        assert_proxied(env, &proxy, &remote, "/a", Proto::Tcp, Remote::v4());

        let verdicts_before = dump_verdicts();
        let drop_number: BTreeSet<u32> = verdicts_before
            .iter()
            .filter(|(_, v)| v.as_str() == "drop")
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(drop_number.len(), 1, "{verdicts_before:?}");
        let mon = Monitor::start();
        fs::write(&config, Config::new(&new).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        let after = converge(env, &new, CONVERGE, "after SIGHUP");
        wait_log(|| d.log(), "configuration reloaded", 1, CONVERGE);
        thread::sleep(Duration::from_millis(300));
        mon.assert_complete();
        let mine = mon.by_pid(d.pid());
        assert_eq!(
            mine.len(),
            1,
            "SIGHUP must change the map in one transaction: {mine:?}"
        );
        let t = &mine[0];
        let (a, b, z, n) = (
            env.cg.id("/a"),
            env.cg.id("/b"),
            env.cg.id("/z"),
            env.cg.id("/n"),
        );
        // The verdict changes are a delete and an add of the same key in
        // one generation: no packet sees the key missing.
        assert_eq!(t.dels(), BTreeSet::from([a, b, z]), "deleted in {t:?}");
        assert_eq!(
            t.adds(&dump_verdicts()),
            BTreeMap::from([
                (a, "goto direct".to_string()),
                (b, "goto proxy".to_string()),
                (n, "goto proxy".to_string()),
            ]),
            "added in {t:?}"
        );
        eprintln!(
            "SIGHUP: generation {} by pid {} ({}): {} deletes, {} adds",
            t.generation,
            t.pid,
            t.name,
            t.dels().len(),
            t.numbers().len()
        );
        assert_eq!(t.name, "cgtproxy");
        // What did not change was not touched.
        assert_eq!(before.get(&env.cg.id("/c")), after.get(&env.cg.id("/c")));
        let c = env.cg.id("/c");
        assert!(t.elems.iter().all(|e| !(e.in_cgroups() && e.key == c)));
        // `drop` is no target any more: its number goes, in the same
        // transaction; the numbers of proxy and direct stay as they were.
        assert_eq!(t.verdict_dels(), drop_number, "verdicts deleted in {t:?}");
        let mut kept = verdicts_before.clone();
        kept.retain(|_, v| v.as_str() != "drop");
        assert_eq!(dump_verdicts(), kept, "verdicts after SIGHUP");
        assert_proxied(env, &proxy, &remote, "/b", Proto::Tcp, Remote::v6());
        assert_proxied(env, &proxy, &remote, "/n", Proto::Tcp, Remote::v4());
        assert_direct(env, &proxy, &remote, "/a", Proto::Udp, Remote::v4());
        d.stop_ok();
    });
}

/// What it proves: SIGHUP moves the policy routing with the config —
/// installs the new rule and route before the old go, keeps a route the new
/// mark shares (same table), removes everything with `route: false` — and
/// a reload whose route the kernel refuses is refused as a whole, the old
/// routing in place. How it can fail: removing the old table's route when
/// only the mark changed leaves marked packets unrouted; installing after
/// removing loses the old routing when the new one fails.
#[test]
fn sighup_moves_the_policy_routing() {
    sandbox(|env| {
        // The config's mark must be the ruleset's: each mark change below
        // reloads the ruleset with the new mark first.
        load_ruleset_with_mark(0x51);
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p(/.*)?", "proxy")]);
        let with = |mark, table| {
            let mut c = Config::new(&rules);
            c.route = RouteCfg::On { mark, table };
            c
        };
        let config = env.write_config(&with(0x51, 151));
        let mut d = start_daemon(env, &config, &[]);
        converge(env, &rules, CONVERGE, "initial sync");
        assert_policy_routing(0x51, 151, true, "at start");

        let reloaded = "configuration reloaded from";
        // The mark changes, the table stays: the table's route must stay.
        load_ruleset_with_mark(0x52);
        fs::write(&config, with(0x52, 151).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), reloaded, 1, CONVERGE);
        assert_policy_routing(0x52, 151, true, "new mark, same table");
        assert_eq!(policy_routing(0x51, 151).map(|(rule, _)| rule), [false; 2]);

        // Another table: the old route goes with the old rule.
        fs::write(&config, with(0x52, 152).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), reloaded, 2, CONVERGE);
        assert_policy_routing(0x52, 152, true, "new table");
        assert_policy_routing(0x52, 151, false, "old table");

        // The kernel refuses the new route (lo down, IPv6): refused whole.
        load_ruleset_with_mark(0x53);
        run_ok("ip", &["link", "set", "lo", "down"]);
        fs::write(&config, with(0x53, 153).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        let refused = "reload refused, keeping the running configuration";
        let log = wait_log(|| d.log(), refused, 1, CONVERGE);
        run_ok("ip", &["link", "set", "lo", "up"]);
        assert!(log.contains("ip link set lo up"), "{log}");
        assert_policy_routing(0x53, 153, false, "refused reload");
        assert_eq!(policy_routing(0x52, 152).map(|(rule, _)| rule), [true; 2]);
        assert!(ip_routes("-4", 152).contains("local default dev lo"));
        assert!(d.running(), "{}", d.log());

        // `route: false`: the daemon's routing goes entirely.
        let mut off = Config::new(&rules);
        off.route = RouteCfg::Off;
        fs::write(&config, off.to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), reloaded, 3, CONVERGE);
        assert_policy_routing(0x52, 152, false, "route: false");
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 4. SIGHUP with a broken config: refused, the running one stays
// ---------------------------------------------------------------------------

#[test]
fn sighup_with_broken_config_keeps_the_old_one() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p", "/d"]);
        let rules = Rules::new(&[("/p(/.*)?", "proxy"), ("/d(/.*)?", "direct")]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &[]);
        converge(env, &rules, CONVERGE, "initial sync");

        let refused = "reload refused, keeping the running configuration";
        let cases: [(&str, Option<String>, &[&str]); 3] = [
            (
                "malformed JSON",
                Some("{\"rules\": [{\"match\": \"/d\" \"target\": \"proxy\"}]}".into()),
                &[],
            ),
            (
                "a rule naming a missing chain",
                Some(
                    Config::new(&Rules::new(&[("/d(/.*)?", "proxy2"), ("/p", "direct")])).to_json(),
                ),
                &["proxy2"],
            ),
            ("the config file removed", None, &[]),
        ];
        for (i, (what, content, needles)) in cases.iter().enumerate() {
            match content {
                Some(c) => fs::write(&config, c).unwrap(),
                None => fs::remove_file(&config).unwrap(),
            }
            d.signal(libc::SIGHUP);
            let log = wait_log(|| d.log(), refused, i + 1, CONVERGE);
            let line = log.lines().filter(|l| l.contains(refused)).nth(i).unwrap();
            assert!(
                line.contains(config.to_str().unwrap()),
                "{what}: the message names the file: {line}"
            );
            for n in *needles {
                assert!(line.contains(n), "{what}: the message names {n:?}: {line}");
            }
            // Cgroups made afterwards get their elements by the old rules.
            let (p, dd) = (format!("/p/after{i}"), format!("/d/after{i}"));
            env.cg.mkdir(&[&p, &dd]);
            converge(env, &rules, CONVERGE, &format!("after SIGHUP with {what}"));
            assert!(d.running(), "{what}: the daemon stopped:\n{}", d.log());
            assert_proxied(env, &proxy, &remote, &p, Proto::Tcp, Remote::v4());
            assert_direct(env, &proxy, &remote, &dd, Proto::Udp, Remote::v4());
        }
        // A ruleset reload now refills by the running (old) rules.
        load_ruleset();
        converge(
            env,
            &rules,
            CONVERGE,
            "ruleset reload after refused reloads",
        );
        assert_eq!(count(&d.log(), "configuration reloaded"), 0);
        // A good config is taken again.
        let good = Rules::new(&[("/d(/.*)?", "proxy")]);
        fs::write(&config, Config::new(&good).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), "configuration reloaded", 1, CONVERGE);
        converge(env, &good, CONVERGE, "after a good SIGHUP");
        assert_proxied(env, &proxy, &remote, "/d/after0", Proto::Tcp, Remote::v4());
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 5. SIGKILL, the tree changes while down, restart
// ---------------------------------------------------------------------------

#[test]
fn sigkill_restart_converges_in_one_transaction() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[("/p(/.*)?", "proxy"), ("/d", "direct"), ("/x.*", "drop")]);
        let old: Vec<String> = (0..200).map(|i| format!("/p/s{}/c{i}", i % 10)).collect();
        mkdir_all(env, &old);
        env.cg.mkdir(&["/d", "/x1", "/x2", "/keep"]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &[]);
        let running = converge(env, &rules, CONVERGE, "first run");
        assert_single_policy_routing("first run");
        d.kill();
        assert_eq!(dump_map(), running, "SIGKILL: what was written stays");
        assert_proxied(env, &proxy, &remote, "/p/s1/c1", Proto::Tcp, Remote::v4());

        // While down: matched cgroups removed (whole subtrees, one
        // verdict-bearing leaf), new ones made (nested, matched or not).
        for i in 0..4 {
            env.cg.rmdir(&format!("/p/s{i}"));
        }
        env.cg.rmdir("/p/s5/c5");
        env.cg.rmdir("/x1");
        env.cg
            .mkdir(&["/p/new/a/b", "/x3", "/other/x", "/p/s6/c1000"]);
        let want = truth(&env.cg.root, &rules);
        let stale: BTreeSet<u64> = running
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        let fresh: BTreeMap<u64, String> = want
            .iter()
            .filter(|(k, _)| !running.contains_key(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        assert!(stale.len() > 80 && fresh.len() == 5);

        let mon = Monitor::start();
        let mut d = start_daemon(env, &config, &[]);
        // Converged when it says it is ready, not later.
        assert_truth(env, &rules, "restart, at readiness");
        thread::sleep(Duration::from_millis(300));
        mon.assert_complete();
        let mine = mon.by_pid(d.pid());
        assert_eq!(mine.len(), 1, "restart: one transaction, got {mine:?}");
        assert_eq!(mine[0].dels(), stale, "restart deletes exactly the stale");
        assert_eq!(
            mine[0].adds(&dump_verdicts()),
            fresh,
            "restart adds exactly the new"
        );
        assert_single_policy_routing("restart after SIGKILL");
        assert_proxied(env, &proxy, &remote, "/p/new/a/b", Proto::Tcp, Remote::v6());

        // Killed again in the middle of a burst, restarted while it goes on:
        // the burst runs until 300 mkdirs after the restart's readiness, or
        // for BURST at most, so the restart lands in its middle however
        // slow the machine, unless the restart itself is not ready while
        // cgroups keep coming.
        // The burst's own time is the kernel's: mkdir waits for the cgroup
        // lock, which another suite's deep chain can hold for seconds on a
        // loaded machine. BURST bounds that wait (a hang guard); what is
        // asserted of the daemon keeps CONVERGE.
        const BURST: Duration = Duration::from_secs(60);
        let root = env.cg.root.clone();
        let progress = Arc::new(AtomicU64::new(0));
        let ready_at = Arc::new(AtomicU64::new(u64::MAX));
        let burst = {
            let (progress, ready_at) = (progress.clone(), ready_at.clone());
            let until = Instant::now() + BURST;
            thread::spawn(move || {
                let mut i = 0;
                while i < ready_at.load(Ordering::Relaxed).saturating_add(300) {
                    if Instant::now() >= until {
                        return false;
                    }
                    fs::create_dir_all(root.join(format!("p/burst{}/c{i}", i % 6))).unwrap();
                    i += 1;
                    progress.store(i, Ordering::Relaxed);
                    // Paced, at least 200 µs a mkdir.
                    thread::sleep(Duration::from_micros(200));
                }
                true
            })
        };
        assert!(
            wait_until(BURST, Duration::from_millis(1), || {
                progress.load(Ordering::Relaxed) >= 300
            }),
            "the burst did not reach 300 mkdirs in {BURST:?}"
        );
        d.kill();
        let killed_at = progress.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut d = start_daemon(env, &config, &[]);
        let restart = t.elapsed();
        let at_restart = progress.load(Ordering::Relaxed);
        ready_at.store(at_restart, Ordering::Relaxed);
        let went_on = burst.join().unwrap();
        let total = progress.load(Ordering::Relaxed);
        eprintln!(
            "burst: killed after {killed_at} mkdirs, restarted (ready in {:.0} ms) after \
             {at_restart}, burst ended at {total}",
            ms(restart)
        );
        assert!(
            went_on && killed_at < at_restart,
            "the restart must land in the middle of the burst: killed after {killed_at} \
             mkdirs, ready after {at_restart} ({restart:?}), burst ended at {total}{}",
            if went_on { "" } else { " when its time was up" }
        );
        converge(env, &rules, CONVERGE, "restart during a burst");
        assert_single_policy_routing("second restart");

        // Killed with nothing changed: the restart has nothing to write.
        d.kill();
        let before = mon.txns().len();
        let d = start_daemon(env, &config, &[]);
        assert_truth(env, &rules, "restart without changes");
        thread::sleep(Duration::from_millis(200));
        let mine: Vec<Txn> = mon
            .txns()
            .split_off(before)
            .into_iter()
            .filter(|t| t.pid == d.pid() as u32)
            .collect();
        assert!(mine.is_empty(), "nothing to change, yet: {mine:?}");
        assert_single_policy_routing("third restart");
        assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v4());
        d.stop_ok();
        // A stop changes no verdict: the elements and one rule stay.
        assert_truth(env, &rules, "after SIGTERM");
        assert_single_policy_routing("after SIGTERM");
    });
}

// ---------------------------------------------------------------------------
// 6. A storm of create/remove with random nesting
// ---------------------------------------------------------------------------

struct StormNode {
    path: String,
    depth: usize,
    children: Vec<usize>,
    parent: Option<usize>,
}

#[test]
fn storm_of_20000_nested_creates_and_removes() {
    sandbox(|env| {
        load_ruleset();
        let rules = Rules::new(&[
            ("/p[0-9]+(/.*)?", "proxy"),
            (".*/d[0-9]+", "direct"),
            (".*/x[0-9]+", "drop"),
            ("/q[0-9]+/p[0-9]+(/.*)?", "proxy"),
        ]);
        let config = env.write_config(&Config::new(&rules));
        let d = start_daemon(env, &config, &["-q"]);
        let root = env.cg.root.clone();

        const OPS: usize = 22_000;
        const MAX_DEPTH: usize = 6;
        let mut rng = Rng(0x5eed_cafe_f00d_0003);
        let mut nodes: Vec<StormNode> = Vec::new();
        // Live node indices, and each one's position in `live`.
        let mut live: Vec<usize> = Vec::new();
        let mut pos: HashMap<usize, usize> = HashMap::new();
        let (mut made, mut removed, mut max_depth) = (0usize, 0usize, 0usize);
        let start = Instant::now();
        while made + removed < OPS {
            let create = live.is_empty() || rng.below(100) < 56;
            if create {
                let parent = if live.is_empty() || rng.below(5) == 0 {
                    None
                } else {
                    let p = live[rng.below(live.len())];
                    (nodes[p].depth < MAX_DEPTH).then_some(p)
                };
                let prefix = ["p", "d", "x", "q"][rng.below(4)];
                let name = format!("{prefix}{}", nodes.len());
                let (path, depth) = match parent {
                    Some(p) => (format!("{}/{name}", nodes[p].path), nodes[p].depth + 1),
                    None => (format!("/{name}"), 1),
                };
                fs::create_dir(root.join(&path[1..]))
                    .unwrap_or_else(|e| panic!("mkdir {path}: {e}"));
                let id = nodes.len();
                nodes.push(StormNode {
                    path,
                    depth,
                    children: Vec::new(),
                    parent,
                });
                if let Some(p) = parent {
                    nodes[p].children.push(id);
                }
                pos.insert(id, live.len());
                live.push(id);
                made += 1;
                max_depth = max_depth.max(depth);
            } else {
                let mut victim = live[rng.below(live.len())];
                let whole = rng.below(10) == 0;
                if !whole {
                    while !nodes[victim].children.is_empty() {
                        let c = &nodes[victim].children;
                        victim = c[rng.below(c.len())];
                    }
                }
                // Post-order: children before parents.
                let mut order = Vec::new();
                let mut stack = vec![(victim, false)];
                while let Some((n, done)) = stack.pop() {
                    if done {
                        order.push(n);
                    } else {
                        stack.push((n, true));
                        stack.extend(nodes[n].children.iter().map(|&c| (c, false)));
                    }
                }
                for n in order {
                    fs::remove_dir(root.join(&nodes[n].path[1..]))
                        .unwrap_or_else(|e| panic!("rmdir {}: {e}", nodes[n].path));
                    removed += 1;
                    let at = pos.remove(&n).unwrap();
                    let last = live.pop().unwrap();
                    if last != n {
                        live[at] = last;
                        pos.insert(last, at);
                    }
                }
                if let Some(p) = nodes[victim].parent {
                    nodes[p].children.retain(|&c| c != victim);
                }
            }
        }
        let storm = start.elapsed();
        let t = Instant::now();
        let map = converge(env, &rules, SLOW_CONVERGE, "after the storm");
        eprintln!(
            "storm: {made} mkdir + {removed} rmdir in {:.0} ms ({} live cgroups, depth up to {max_depth}); \
             map equal to the truth ({} elements) {:.0} ms after the last rmdir",
            ms(storm),
            live.len(),
            map.len(),
            ms(t.elapsed())
        );
        assert!(max_depth >= 5);
        assert!(
            map.len() > 200,
            "the storm left too few matches to mean anything"
        );
        let log = d.log();
        eprintln!(
            "storm: the daemon logged {} overflow(s)",
            count(&log, "overflow")
        );
        d.stop_keeps_map();
    });
}

// ---------------------------------------------------------------------------
// 7. inotify queue overflow while stopped with SIGSTOP
// ---------------------------------------------------------------------------

#[test]
fn inotify_overflow_while_sigstopped_converges() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let max_queued: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // fs.inotify.max_queued_events is global (not per user namespace),
        // so a test may not lower it: past 100,000 the overflow would take
        // too many cgroups, and under CI that is a failure, not a skip.
        if max_queued > 100_000 {
            skip(&format!(
                "max_queued_events is {max_queued}; too many cgroups to make"
            ));
            return;
        }
        let rules = Rules::new(&[("/p(/.*)?", "proxy"), ("/d", "direct"), ("/x", "drop")]);
        let pre: Vec<String> = (0..100).map(|i| format!("/p/pre{i}")).collect();
        mkdir_all(env, &pre);
        env.cg.mkdir(&["/d", "/x", "/p/gone/deep"]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &["-q"]);
        converge(env, &rules, CONVERGE, "initial sync");

        let mon = Monitor::start();
        d.signal(libc::SIGSTOP);
        // Each mkdir and rmdir is one event on /p's watch; more than the
        // queue holds, leaving a known final set.
        let total = max_queued + max_queued / 4;
        let creates = total / 2 + 500;
        let root = env.cg.root.clone();
        for i in 0..creates {
            fs::create_dir(root.join(format!("p/n{i}"))).unwrap();
        }
        let mut events = creates;
        for i in 0..creates {
            if i % 5 != 0 {
                fs::remove_dir(root.join(format!("p/n{i}"))).unwrap();
                events += 1;
            }
        }
        for i in 0..50 {
            fs::remove_dir(root.join(format!("p/pre{i}"))).unwrap();
        }
        env.cg.rmdir("/p/gone");
        env.cg.rmdir("/x");
        env.cg.mkdir(&["/x", "/p/late/a/b"]);
        assert!(events > max_queued);
        let t0 = Instant::now();
        d.signal(libc::SIGCONT);
        let map = converge(env, &rules, SLOW_CONVERGE, "after SIGCONT");
        thread::sleep(Duration::from_millis(300));
        mon.assert_complete();
        let mine = mon.by_pid(d.pid());
        let last = mine
            .iter()
            .map(|t| t.at())
            .max()
            .expect("no transaction after SIGCONT");
        eprintln!(
            "overflow→converged: {:.1} ms from SIGCONT to the last of {} transaction(s); \
             {events} events against max_queued_events {max_queued}; map {} elements (seen by dump {:.0} ms after SIGCONT)",
            ms(last - t0),
            mine.len(),
            map.len(),
            ms(t0.elapsed())
        );
        let log = d.log();
        assert!(
            count(&log, "overflow") >= 1 && log.contains("rescan"),
            "the log must mention the overflow and the rescan:\n{log}"
        );
        assert!(d.running());
        assert_proxied(
            env,
            &proxy,
            &remote,
            "/p/late/a/b",
            Proto::Tcp,
            Remote::v4(),
        );
        assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v4());
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 8. Out of inotify watches
// ---------------------------------------------------------------------------

/// Makes `dir` and `files` readable by anyone (the unprivileged daemon
/// reads its config from the scratch dir).
fn world_readable(dir: &Path, files: &[&Path]) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    for f in files {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn out_of_inotify_watches_is_reported_once_and_survived() {
    sandbox(|env| {
        // A user namespace of its own allows its root one inotify watch
        // (the limit is per user namespace, and charged in each one up to
        // the host's: this one is the lower), so the daemon, run in it,
        // gets its root's watch and no more, whatever the host's limits.
        // Its network namespace belongs to it; the test joins that too.
        let ns = UserNs::new(&[("max_inotify_watches", 1)]);
        ns.join_net();
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[("/p[0-9]*(/.*)?", "proxy"), ("/d", "direct")]);
        env.cg
            .mkdir(&["/p/a/b", "/p/c", "/d", "/q/p/x", "/gone/p1"]);
        let config = env.write_config(&Config::new(&rules));
        let mut d = Daemon::start_with(
            &env.run_args(&config),
            &Launch {
                wrap: ns.wrap(),
                ..Launch::default()
            },
        );
        // The scan needs no watches: everything there is served.
        converge(env, &rules, CONVERGE, "initial sync without watches");
        // The warning, which names where: the ready line's count of
        // unwatched cgroups ("out of inotify watches; retried") is not a
        // second one.
        let warning = "out of inotify watches at ";
        let log = wait_log(|| d.log(), warning, 1, CONVERGE);
        // Changes in the watched root are followed; new directories
        // cannot be watched and must not make it say so again.
        env.cg.mkdir(&["/p2", "/p3", "/d2"]);
        env.cg.rmdir("/gone");
        converge(env, &rules, CONVERGE, "changes in the watched root");
        env.cg.rmdir("/p");
        env.cg.mkdir(&["/p", "/p4"]);
        converge(env, &rules, CONVERGE, "more changes in the watched root");
        thread::sleep(Duration::from_millis(200));
        let log2 = d.log();
        assert_eq!(
            count(&log2, warning),
            1,
            "running out of watches is said once:\n{log2}"
        );
        assert!(d.running(), "{log2}");
        eprintln!(
            "out of watches, said once: {}",
            log.lines().find(|l| l.contains(warning)).unwrap()
        );
        assert_proxied(env, &proxy, &remote, "/p4", Proto::Tcp, Remote::v4());
        assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v4());
        d.stop_keeps_map();
    });
}

// ---------------------------------------------------------------------------
// 9. Least privilege: nobody with CAP_NET_ADMIN only
// ---------------------------------------------------------------------------

#[test]
fn runs_as_nobody_with_only_cap_net_admin() {
    sandbox(|env| {
        if !need("setpriv", "--version") {
            return;
        }
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[("/p(/.*)?", "proxy"), ("/d", "direct"), ("/x", "drop")]);
        env.cg.mkdir(&["/p/a", "/d", "/x"]);
        let config = env.write_config(&Config::new(&rules));
        world_readable(&env.tmp, &[&config]);
        let mut d = Daemon::start_unprivileged(65534, 65534, &env.run_args(&config));
        let (uid, caps) = uid_and_caps(d.pid());
        assert_eq!(uid, "65534", "the daemon runs as nobody");
        assert_eq!(
            u64::from_str_radix(&caps, 16).unwrap(),
            1 << 12, // CAP_NET_ADMIN
            "effective capabilities: CAP_NET_ADMIN only"
        );
        converge(env, &rules, CONVERGE, "initial sync as nobody");
        assert_single_policy_routing("as nobody");
        env.cg.mkdir(&["/p/new/deeper"]);
        converge(env, &rules, CONVERGE, "a new cgroup, as nobody");
        assert_proxied(
            env,
            &proxy,
            &remote,
            "/p/new/deeper",
            Proto::Tcp,
            Remote::v4(),
        );
        assert_proxied(env, &proxy, &remote, "/p/a", Proto::Tcp, Remote::v6());
        assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v4());
        // Self-healing works unprivileged too.
        load_ruleset();
        converge(env, &rules, CONVERGE, "ruleset reload, as nobody");
        assert!(d.running());
        d.stop_ok();
        assert_eq!(dump_map(), env.cg.truth(&rules), "SIGTERM keeps the map");
        assert_policy_routing(ROUTE_MARK, ROUTE_TABLE, true, "after SIGTERM as nobody");
    });
}

// ---------------------------------------------------------------------------
// 10. Odd names: non-UTF-8 bytes, paths past PATH_MAX
// ---------------------------------------------------------------------------

#[test]
fn non_utf8_names_match_on_the_escaped_form() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        let rules = Rules::new(&[
            // The documented form: an invalid byte is the 4 characters \xff.
            ("/u/bad\\\\xff[^/]*", "direct"),
            ("/u/\\\\xc3\\\\xa9", "drop"),
            ("/u/mixed é\\\\xfe(/.*)?", "proxy"),
            // Lossy decoding (U+FFFD) must not be what is matched.
            ("/u/bad\u{fffd}.*", "drop"),
            ("/u/.*\u{fffd}.*", "drop"),
            ("/p(/.*)?", "proxy"),
            ("/renamed", "drop"),
            ("(?s)/new.line", "drop"),
        ]);
        let raw = |rel: &[u8]| -> PathBuf {
            env.cg
                .root
                .join(OsStr::from_bytes(rel.strip_prefix(b"/").unwrap()))
        };
        let before: [&[u8]; 3] = [b"/u/bad\xffname", b"/u/mixed \xc3\xa9\xfe", b"/p/\xff\xfe"];
        let after: [&[u8]; 4] = [
            b"/u/bad\xff",
            b"/u/\xc3\xa9", // valid UTF-8: "é", matches nothing
            b"/u/\xc3",     // a truncated sequence: \xc3
            b"/u/mixed \xc3\xa9\xfe/child \x80",
        ];
        fs::create_dir(env.cg.path("/u")).unwrap();
        for p in before {
            fs::create_dir_all(raw(p)).unwrap();
        }
        let config = env.write_config(&Config::new(&rules));
        let d = start_daemon(env, &config, &[]);
        for p in after {
            fs::create_dir_all(raw(p)).unwrap();
        }
        // What cgroupfs allows besides: on 6.18 a newline in a name is
        // refused (EINVAL) and so is rename (EPERM). Should a kernel allow
        // either, the daemon must follow it like any other change.
        match fs::create_dir(env.cg.path("/new\nline")) {
            Ok(()) => eprintln!("cgroupfs allows a newline in a cgroup name"),
            Err(e) => eprintln!("cgroupfs refuses a newline in a cgroup name: {e}"),
        }
        env.cg.mkdir(&["/ren"]);
        converge(env, &rules, CONVERGE, "before a rename");
        match fs::rename(env.cg.path("/ren"), env.cg.path("/renamed")) {
            Ok(()) => eprintln!("cgroupfs allows rename"),
            Err(e) => eprintln!("cgroupfs refuses rename: {e}"),
        }
        let map = converge(env, &rules, CONVERGE, "non-UTF-8 names");
        let id = |p: &[u8]| {
            fs::metadata(raw(p))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap()
        };
        let expect = [
            (&b"/u/bad\xffname"[..], Some("goto direct")),
            (b"/u/bad\xff", Some("goto direct")),
            (b"/u/\xc3\xa9", None),
            (b"/u/\xc3", None),
            (b"/u/mixed \xc3\xa9\xfe", Some("goto proxy")),
            (b"/u/mixed \xc3\xa9\xfe/child \x80", Some("goto proxy")),
            (b"/p/\xff\xfe", Some("goto proxy")),
        ];
        for (p, v) in expect {
            assert_eq!(
                map.get(&id(p)).map(String::as_str),
                v,
                "{} ({})",
                match_form(p),
                String::from_utf8_lossy(p)
            );
        }
        // A process in a non-UTF-8 cgroup is steered by its element.
        assert_proxied(
            env,
            &proxy,
            &remote,
            &raw(b"/p/\xff\xfe"),
            Proto::Tcp,
            Remote::v4(),
        );
        assert_direct(
            env,
            &proxy,
            &remote,
            &raw(b"/u/bad\xff"),
            Proto::Udp,
            Remote::v4(),
        );
        // Removal of non-UTF-8 cgroups is followed too.
        fs::remove_dir(raw(b"/u/bad\xff")).unwrap();
        fs::remove_dir(raw(b"/u/mixed \xc3\xa9\xfe/child \x80")).unwrap();
        converge(env, &rules, CONVERGE, "non-UTF-8 names removed");
        d.stop_ok();
    });
}

#[test]
fn paths_past_path_max_are_followed() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        // First match wins: the drop rule comes first, or the wider deep
        // rule would take every level and the drop rule never decide.
        let rules = Rules::new(&[
            (".*/b{255}/b{255}", "drop"),
            ("/deep[0-9](/.*)?", "proxy"),
            ("/p(/.*)?", "proxy"),
        ]);
        // 20 levels of 255-byte names: about 5 KiB below the test root.
        let chain = |c: u8| -> Vec<Vec<u8>> { (0..20).map(|_| vec![c; 255]).collect() };
        let cleanup = DeepCleanup(vec![env.cg.path("/deep1"), env.cg.path("/deep2")]);
        env.cg.mkdir(&["/deep1", "/deep2", "/p"]);
        // One chain made before the start (found by the scan), one after
        // (found through events).
        let (n, e) = mkdir_chain(&env.cg.path("/deep1"), &chain(b'a'));
        assert!(e.is_none(), "cgroupfs refused level {n}: {e:?}");
        let config = env.write_config(&Config::new(&rules));
        let mut d = start_daemon(env, &config, &[]);
        let (n, e) = mkdir_chain(&env.cg.path("/deep2"), &chain(b'b'));
        assert!(e.is_none(), "cgroupfs refused level {n}: {e:?}");
        env.cg.mkdir(&["/p/after"]);

        let base = env.cg.root.as_os_str().len();
        let all = walk_fd(&env.cg.root);
        let longest = all.iter().map(|(p, _)| base + p.len()).max().unwrap();
        assert!(longest > PATH_MAX + 512, "longest path {longest}");
        let past = all
            .iter()
            .filter(|(p, _)| base + p.len() >= PATH_MAX)
            .count();
        let map = converge(env, &rules, CONVERGE, "chains past PATH_MAX");
        // Each rule decides some: the drop rule levels 2 to 20 of the b
        // chain, past PATH_MAX too, where only the end of the path shows
        // that it matches.
        let verdict = |p: &[u8]| -> Option<&str> {
            let id = all.iter().find(|(q, _)| q == p).map(|(_, id)| *id).unwrap();
            map.get(&id).map(String::as_str)
        };
        let b_chain: Vec<Vec<u8>> = (1..=20)
            .map(|k| {
                let mut p = b"/deep2".to_vec();
                for _ in 0..k {
                    p.push(b'/');
                    p.extend_from_slice(&[b'b'; 255]);
                }
                p
            })
            .collect();
        assert_eq!(
            verdict(&b_chain[0]),
            Some("goto proxy"),
            "level 1 of the b chain"
        );
        // b_chain[k] is k + 2 levels below the test root; below the
        // ruleset's deepest level nothing is followed (issue 12).
        for (k, p) in b_chain.iter().enumerate().skip(1) {
            let followed = k + 2 <= DEEPEST_BELOW_TEST_ROOT;
            assert_eq!(
                verdict(p),
                followed.then_some("drop"),
                "level {} of the b chain ({} bytes)",
                k + 1,
                base + p.len()
            );
        }
        let drops_past = b_chain
            .iter()
            .filter(|p| base + p.len() >= PATH_MAX && verdict(p) == Some("drop"))
            .count();
        // Below a test root at level 1, the 15 levels followed stay under
        // PATH_MAX (15 x 256 bytes); what is past it is deeper than the
        // ruleset looks up, so it is not followed and has no element.
        assert_eq!(drops_past, 0, "drop elements past PATH_MAX");
        eprintln!(
            "PATH_MAX: {} cgroups, {past} of them with paths of {PATH_MAX} bytes or more \
             (longest {longest}); the map holds all {} matching",
            all.len(),
            map.len()
        );
        // Removal deep down the chain is followed too.
        let mut dir = open_dir(&env.cg.path("/deep1"));
        for name in &chain(b'a')[..9] {
            dir = open_dir_at(dir.as_raw_fd(), name).unwrap();
        }
        remove_tree_at(dir.as_raw_fd(), &[b'a'; 255]).unwrap();
        let (n, e) = mkdir_chain(&env.cg.path("/deep1"), &chain(b'c')[..18]);
        assert!(e.is_none(), "cgroupfs refused level {n}: {e:?}");
        converge(
            env,
            &rules,
            CONVERGE,
            "part of a chain removed, another made",
        );
        assert!(d.running(), "the daemon died:\n{}", d.log());
        assert!(!d.log().contains("panicked"), "{}", d.log());
        assert_proxied(env, &proxy, &remote, "/p/after", Proto::Tcp, Remote::v4());
        drop(cleanup);
        env.cg.mkdir(&["/p/last"]);
        converge(env, &rules, CONVERGE, "after the chains were removed");
        d.stop_ok();
    });
}

// ---------------------------------------------------------------------------
// 11. The verdict numbers: `verdicts` tampered with, collected, reused
// ---------------------------------------------------------------------------

/// Packets counted by each `cgroups` element: cgroup id → packets.
fn element_counters() -> BTreeMap<u64, u64> {
    dump_raw()
        .elems
        .into_iter()
        .map(|(id, e)| (id, e.packets.expect("cgroups elements have counters")))
        .collect()
}

/// The lines of the daemon's log about verdict numbers ("bind verdicts …",
/// "unbind verdicts …") past byte `from` of it, sorted.
fn number_lines(log: &str, from: usize) -> Vec<String> {
    let mut v: Vec<String> = log[from..]
        .lines()
        .filter(|l| l.contains(&format!("bind {VERDICT_MAP} ")))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Asserts that the daemon's log past byte `from` has exactly `lines`
/// about numbers, in any order (waiting for them to be read first).
fn assert_number_lines(d: &Daemon, from: usize, lines: &[String], what: &str) {
    let mut want = lines.to_vec();
    want.sort();
    let mut got = Vec::new();
    wait_until(CONVERGE, Duration::from_millis(20), || {
        got = number_lines(&d.log(), from);
        got.len() >= want.len()
    });
    assert_eq!(got, want, "{what}: the daemon's lines about numbers");
}

/// A tampering of `verdicts` made after transaction `since` of `mon` and
/// byte `log_from` of the daemon's log, with `counters` the element
/// counters just before it.
struct Tampered<'a> {
    mon: &'a Monitor,
    since: usize,
    log_from: usize,
    counters: BTreeMap<u64, u64>,
}

impl<'a> Tampered<'a> {
    fn mark(mon: &'a Monitor, d: &Daemon) -> Tampered<'a> {
        Tampered {
            mon,
            since: mon.txns().len(),
            log_from: d.log().len(),
            counters: element_counters(),
        }
    }

    /// Waits until `verdicts` is `want`, gives the daemon 300 ms more, and
    /// returns its transactions since the mark (at least one).
    fn repaired(&self, d: &Daemon, want: &VerdictDump, what: &str) -> Vec<Txn> {
        let mut last = VerdictDump::new();
        let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
            last = dump_verdicts();
            last == *want
        });
        assert!(
            ok,
            "{what}: `verdicts` should be {want:?} again, it is {last:?}\nlog:\n{}",
            d.log()
        );
        thread::sleep(Duration::from_millis(300));
        assert_eq!(dump_verdicts(), *want, "{what}: `verdicts` changed again");
        self.mon.assert_complete();
        let mine: Vec<Txn> = self
            .mon
            .txns()
            .split_off(self.since)
            .into_iter()
            .filter(|t| t.pid == d.pid() as u32)
            .collect();
        assert!(!mine.is_empty(), "{what}: no transaction of the daemon");
        mine
    }

    /// As `repaired`, and: the daemon's transactions changed no `cgroups`
    /// element (none deleted, none added: a rewrite would show here, and
    /// would reset the counters checked next), every element's counter is
    /// where it was or further, and the daemon logged exactly `lines` about
    /// numbers.
    fn repaired_in_verdicts_only(
        &self,
        d: &Daemon,
        want: &VerdictDump,
        lines: &[String],
        what: &str,
    ) {
        let mine = self.repaired(d, want, what);
        let rewritten: Vec<&ElemEvent> = mine
            .iter()
            .flat_map(|t| &t.elems)
            .filter(|e| e.in_cgroups())
            .collect();
        assert!(
            rewritten.is_empty(),
            "{what}: the repair should bind numbers again, not rewrite elements; it changed {rewritten:?}"
        );
        let now = element_counters();
        for (id, c) in &self.counters {
            let after = now.get(id).copied();
            assert!(
                after >= Some(*c),
                "{what}: element {id}'s counter went from {c} to {after:?} (rewritten)"
            );
        }
        self.logged(d, lines, what);
    }

    /// Asserts that the daemon logged exactly `lines` about numbers since
    /// the mark.
    fn logged(&self, d: &Daemon, lines: &[String], what: &str) {
        assert_number_lines(d, self.log_from, lines, what);
    }
}

/// What it proves: someone else emptying `verdicts`, pointing a number in
/// use at another verdict, or adding a number for a verdict no rule names,
/// is noticed and repaired (the composed map equals the truth again, and
/// traffic goes where the rules say), whether the daemon is running or was
/// stopped meanwhile, and repaired in `verdicts` alone: the numbers the
/// elements carry are bound again (the same numbers as before, no spare
/// one, no `cgroups` element rewritten, counters kept), a stranger's
/// number is removed, and each change of a number is logged at the default
/// level. When the verdict a number's elements want already has another
/// number, the elements move to it and the spare number goes.
/// How it can fail: while the daemon is stopped, the tampering is shown to
/// take effect (a `proxy` cgroup's traffic goes direct, then is dropped); a
/// daemon that did not watch `verdicts`, or repaired only `cgroups`, leaves
/// it so and the waits time out; one that rewrote the elements (fresh
/// numbers) shows `cgroups` events, counters back to 0, and a `verdicts`
/// with other numbers; one that left a spare or foreign number, or bound a
/// second number for a verdict, fails the exact `verdicts` comparisons; a
/// missing or extra "bind"/"unbind" line fails the log comparisons.
#[test]
fn tampered_verdicts_are_repaired() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p/child", "/d", "/x"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/d", "direct"), ("/x", "drop")]);
        let config = env.write_config(&Config::new(&rules));
        // No -v: the number lines are logged at the default level.
        let mut d = start_daemon(env, &config, &[]);
        converge(env, &rules, CONVERGE, "initial sync");
        let p = env.cg.path("/p/child");
        let traffic_is_right = |what: &str| {
            assert_proxied(env, &proxy, &remote, &p, Proto::Tcp, Remote::v4());
            assert_direct(env, &proxy, &remote, "/d", Proto::Udp, Remote::v4());
            eprintln!("traffic check: {what}");
            assert_dropped(env, &proxy, &remote, "/x", Proto::Tcp, Remote::v4());
        };
        traffic_is_right("before");
        // Each element has counted packets: a rewrite (counter back to 0)
        // cannot hide.
        let c = element_counters();
        assert!(
            c.len() == 3 && c.values().all(|n| *n > 0),
            "counters after traffic: {c:?}"
        );
        let numbers = dump_verdicts();
        rules.assert_verdicts_clean(&numbers, "initial sync");
        assert_eq!(numbers.len(), 3, "{numbers:?}");
        let mon = Monitor::start();
        let bind_all: Vec<String> = numbers
            .iter()
            .map(|(n, v)| format!("cgtproxy: bind {VERDICT_MAP} {n}: {v}"))
            .collect();

        // 1. Emptied while the daemon is stopped: every number dangles, so
        //    `dispatch` sends everything direct. The same numbers come back.
        d.signal(libc::SIGSTOP);
        let t = Tampered::mark(&mon, &d);
        nft_script("flush map inet cgtproxy verdicts\n");
        assert_eq!(dump_verdicts(), VerdictDump::new());
        assert_direct(env, &proxy, &remote, &p, Proto::Udp, Remote::v4());
        d.signal(libc::SIGCONT);
        t.repaired_in_verdicts_only(&d, &numbers, &bind_all, "`flush map verdicts` (stopped)");
        assert_truth(env, &rules, "after `flush map verdicts` (stopped)");
        traffic_is_right("after the flush");

        // 2. proxy's number pointed at drop, in one transaction, while
        //    stopped: the proxy cgroups are cut off. proxy has no other
        //    number, so this one is pointed back.
        d.signal(libc::SIGSTOP);
        let np = number_of(&numbers, "goto proxy");
        let t = Tampered::mark(&mon, &d);
        nft_script(&format!(
            "delete element inet cgtproxy verdicts {{ {np} }}\n\
             add element inet cgtproxy verdicts {{ {np} : drop }}\n"
        ));
        assert_eq!(
            dump_map().get(&env.cg.id("/p")).map(String::as_str),
            Some("drop")
        );
        // proxy's number re-pointed at drop: cut off.
        assert_dropped(env, &proxy, &remote, &p, Proto::Tcp, Remote::v4());
        d.signal(libc::SIGCONT);
        t.repaired_in_verdicts_only(
            &d,
            &numbers,
            &[format!(
                "cgtproxy: bind {VERDICT_MAP} {np}: goto proxy (was drop)"
            )],
            "proxy's number re-pointed at drop (stopped)",
        );
        assert_truth(env, &rules, "after re-pointing proxy's number");
        traffic_is_right("after the re-pointing");

        // 3. Both again, with the daemon running: repaired at once, the
        //    same way.
        let t = Tampered::mark(&mon, &d);
        nft_script("flush map inet cgtproxy verdicts\n");
        t.repaired_in_verdicts_only(&d, &numbers, &bind_all, "`flush map verdicts` (running)");
        let nd = number_of(&numbers, "goto direct");
        let t = Tampered::mark(&mon, &d);
        nft_script(&format!(
            "delete element inet cgtproxy verdicts {{ {nd} }}\n\
             add element inet cgtproxy verdicts {{ {nd} : goto proxy }}\n"
        ));
        t.repaired_in_verdicts_only(
            &d,
            &numbers,
            &[format!(
                "cgtproxy: bind {VERDICT_MAP} {nd}: goto direct (was goto proxy)"
            )],
            "direct's number re-pointed at proxy (running)",
        );
        assert_truth(env, &rules, "after re-pointing direct's number");
        traffic_is_right("after tampering while running");

        // 4. proxy's number pointed at drop while someone else gave proxy
        //    another number (4243): the daemon does not bind a second one
        //    for proxy; /p's element moves to 4243 and the spare number
        //    (now a second one for drop) goes.
        let t = Tampered::mark(&mon, &d);
        nft_script(&format!(
            "delete element inet cgtproxy verdicts {{ {np} }}\n\
             add element inet cgtproxy verdicts {{ {np} : drop, 4243 : goto proxy }}\n"
        ));
        let mut moved = numbers.clone();
        moved.remove(&np);
        moved.insert(4243, "goto proxy".to_string());
        let mine = t.repaired(&d, &moved, "proxy has another number");
        let pid = env.cg.id("/p");
        let dels: BTreeSet<u64> = mine.iter().flat_map(Txn::dels).collect();
        let adds: BTreeMap<u64, u32> = mine.iter().flat_map(Txn::numbers).collect();
        assert_eq!(
            dels,
            BTreeSet::from([pid]),
            "only /p's element is rewritten"
        );
        assert_eq!(adds, BTreeMap::from([(pid, 4243)]), "/p moves to 4243");
        t.logged(
            &d,
            &[format!("cgtproxy: unbind {VERDICT_MAP} {np} (was drop)")],
            "proxy has another number",
        );
        let set_p = format!("cgtproxy: set /p (id {pid}): goto proxy");
        assert!(
            d.log()[t.log_from..].lines().any(|l| l == set_p),
            "expected {set_p:?} in the log:\n{}",
            d.log()
        );
        rules.assert_verdicts_clean(&dump_verdicts(), "after the move");
        assert_truth(env, &rules, "after the move to 4243");
        traffic_is_right("after the move to 4243");

        // 5. A number someone else added for a verdict no rule names: a
        //    resync removes it, and only it.
        let t = Tampered::mark(&mon, &d);
        nft_script("add element inet cgtproxy verdicts { 4242 : accept }\n");
        t.repaired_in_verdicts_only(
            &d,
            &moved,
            &[format!("cgtproxy: unbind {VERDICT_MAP} 4242 (was accept)")],
            "a foreign `4242 : accept`",
        );
        assert_truth(env, &rules, "after a foreign number");
        traffic_is_right("after a foreign number");
        assert!(d.running(), "{}", d.log());
        let verdicts = dump_verdicts();
        d.stop_ok();
        assert_eq!(dump_verdicts(), verdicts, "SIGTERM keeps verdicts");
    });
}

/// What it proves: the numbers are the kernel's, not the daemon's memory.
/// A number already in `verdicts` for a verdict is taken over (a seeded
/// `7 : goto proxy`); a target dropped by a reload loses its number, and
/// only it; a restart after SIGKILL rewrites nothing (no transaction at
/// all, and the elements keep their counters, which a delete and re-add
/// would reset); a restart with fewer targets collects the stale number.
/// Each number bound or removed is logged at the default level, and only
/// those. How it can fail: a daemon that numbered from 1 regardless would
/// rewrite every element on each start (counters back to 0, events seen),
/// one that never collected would leave `drop`'s number behind, one that
/// collected it in a later transaction than the reload's fails the
/// comparison right after the map converged, and a number change not
/// logged (or one logged that did not happen, such as binding 7 again)
/// fails the log comparisons.
#[test]
fn verdict_numbers_are_collected_and_reused() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p/a", "/x"]);
        // As a previous run might have left it.
        nft_script("add element inet cgtproxy verdicts { 7 : goto proxy }\n");
        let both = Rules::new(&[("/p(/.*)?", "proxy"), ("/x", "drop")]);
        let only_proxy = Rules::new(&[("/p(/.*)?", "proxy")]);
        let config = env.write_config(&Config::new(&both));
        let mut d = start_daemon(env, &config, &[]);
        converge(env, &both, CONVERGE, "first run");
        let v = dump_verdicts();
        both.assert_verdicts_clean(&v, "first run");
        assert_eq!(
            number_of(&v, "goto proxy"),
            7,
            "the number in the kernel is reused: {v:?}"
        );
        let drop_n = number_of(&v, "drop");
        let p = env.cg.id("/p");
        assert!(dump_raw().elems.values().filter(|e| e.number == 7).count() == 2);
        // 7 is taken over, not bound again; drop's number is new.
        assert_number_lines(
            &d,
            0,
            &[format!("cgtproxy: bind {VERDICT_MAP} {drop_n}: drop")],
            "first run",
        );

        // Counted traffic on /p's element.
        assert_proxied(env, &proxy, &remote, "/p", Proto::Tcp, Remote::v4());
        let counted = |when: &str| -> u64 {
            let raw = dump_raw();
            let e = raw
                .elems
                .get(&p)
                .unwrap_or_else(|| panic!("{when}: no element for /p"));
            assert_eq!(e.number, 7, "{when}: /p's number");
            e.packets
                .unwrap_or_else(|| panic!("{when}: no counter on /p's element"))
        };
        let c0 = counted("after traffic");
        assert!(c0 >= 1, "the lookup counted /p's connection: {c0}");

        // Reload without drop: its number goes, proxy's stays, in the
        // reload's transaction (so as soon as the map converged).
        let from = d.log().len();
        fs::write(&config, Config::new(&only_proxy).to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), "configuration reloaded", 1, CONVERGE);
        converge(env, &only_proxy, CONVERGE, "after SIGHUP");
        assert_eq!(
            dump_verdicts(),
            VerdictDump::from([(7, "goto proxy".to_string())]),
            "after SIGHUP; drop was {drop_n}"
        );
        assert_number_lines(
            &d,
            from,
            &[format!(
                "cgtproxy: unbind {VERDICT_MAP} {drop_n} (was drop)"
            )],
            "after SIGHUP",
        );
        assert!(
            counted("after SIGHUP") >= c0,
            "/p's element was rewritten by the reload"
        );

        // SIGKILL, restart unchanged: nothing written at all.
        d.kill();
        let mon = Monitor::start();
        let d2 = start_daemon(env, &config, &[]);
        assert_truth(env, &only_proxy, "restart, at readiness");
        thread::sleep(Duration::from_millis(300));
        mon.assert_complete();
        let mine = mon.by_pid(d2.pid());
        assert!(
            mine.is_empty(),
            "restart with nothing to change wrote: {mine:?}"
        );
        assert_number_lines(&d2, 0, &[], "restart with nothing to change");
        assert_eq!(
            dump_verdicts(),
            VerdictDump::from([(7, "goto proxy".to_string())])
        );
        assert!(
            counted("after the restart") >= c0,
            "/p's element was rewritten"
        );

        // drop back (a number of its own), SIGKILL, restart without it:
        // the stale number is collected at start, nothing else changes.
        let mut d2 = d2;
        let from = d2.log().len();
        fs::write(&config, Config::new(&both).to_json()).unwrap();
        d2.signal(libc::SIGHUP);
        converge(env, &both, CONVERGE, "drop back");
        let v = dump_verdicts();
        both.assert_verdicts_clean(&v, "drop back");
        assert_eq!(number_of(&v, "goto proxy"), 7);
        let drop_n = number_of(&v, "drop");
        assert_number_lines(
            &d2,
            from,
            &[format!("cgtproxy: bind {VERDICT_MAP} {drop_n}: drop")],
            "drop back",
        );
        d2.kill();
        fs::write(&config, Config::new(&only_proxy).to_json()).unwrap();
        let before = mon.txns().len();
        let d3 = start_daemon(env, &config, &[]);
        assert_truth(env, &only_proxy, "restart with fewer targets, at readiness");
        assert_eq!(
            dump_verdicts(),
            VerdictDump::from([(7, "goto proxy".to_string())]),
            "restart with fewer targets: drop's number {drop_n} collected"
        );
        thread::sleep(Duration::from_millis(300));
        let mine: Vec<Txn> = mon
            .txns()
            .split_off(before)
            .into_iter()
            .filter(|t| t.pid == d3.pid() as u32)
            .collect();
        assert_eq!(mine.len(), 1, "one transaction at start: {mine:?}");
        assert_eq!(mine[0].dels(), BTreeSet::from([env.cg.id("/x")]));
        assert_eq!(mine[0].verdict_dels(), BTreeSet::from([drop_n]));
        assert!(
            mine[0].numbers().is_empty() && mine[0].verdict_adds().is_empty(),
            "{mine:?}"
        );
        assert!(counted("after the restart with fewer targets") >= c0);
        assert_number_lines(
            &d3,
            0,
            &[format!(
                "cgtproxy: unbind {VERDICT_MAP} {drop_n} (was drop)"
            )],
            "restart with fewer targets",
        );
        let raw = dump_raw();
        d3.stop_ok();
        assert_eq!(dump_raw().verdicts, raw.verdicts, "SIGTERM keeps verdicts");
        assert_eq!(dump_map(), raw.compose(), "SIGTERM keeps the map");
    });
}
