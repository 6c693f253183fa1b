//! The daemon's side of "never fail open" (issue 11): policy routing kept
//! true while it runs, one daemon per table and map, a stop that changes no
//! verdict, `down` as the way off, the mark agreeing with the ruleset, and
//! the rule's explicit priority. Real ruleset, real daemon, real cgroups,
//! real TCP and UDP over IPv4 and IPv6, in private namespaces.

pub mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];

fn dsts() -> [SocketAddr; 2] {
    [Remote::v4(), Remote::v6()]
}

/// TCP and UDP, IPv4 and IPv6, from `cg`: each answered by the TPROXY
/// listener, with the original destination, and none reached the remote.
fn assert_proxied_all(env: &Env, proxy: &Server, remote: &Remote, cg: &Path, when: &str) {
    for proto in PROTOS {
        for dst in dsts() {
            eprintln!("{when}: {proto:?} to {dst}");
            assert_proxied(env, proxy, remote, cg, proto, dst);
        }
    }
}

/// `ip ARGS` in the test's namespace.
fn ip(args: &[&str]) {
    run_ok("ip", args);
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Everything the kernel holds that a second instance must not touch.
fn kernel_state() -> (RawDump, String, String, String, String) {
    (
        dump_raw(),
        ip_rules("-4"),
        ip_rules("-6"),
        ip_routes("-4", ROUTE_TABLE),
        ip_routes("-6", ROUTE_TABLE),
    )
}

/// What it proves: under a running daemon, each way the policy routing
/// disappears — `ip rule del` (v4, v6), `ip route flush table` (v4, v6),
/// `ip rule flush` (v4, v6) — is put back within 0.5 s, logged once
/// naming the family (the fight with a flush's later rounds included), and proxied TCP and UDP over IPv4 and IPv6
/// reach the TPROXY listener again (and not the remote); a proxied app
/// flooding new UDP flows all along gets nothing out to the remote (the
/// ruleset's guard holds the moments in between). How it can fail:
/// without the rtnetlink watch nothing comes back (today's code: the wait
/// times out); a log per event per family or none fails the count.
#[test]
fn removed_routing_is_put_back() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let mut d = env.start(&Config::new(&rules));
        env.wait_map(&rules);
        let p = env.cg.path("/p");
        assert_proxied_all(env, &proxy, &remote, &p, "at start");

        let mark = ROUTE_MARK.to_string();
        let table = ROUTE_TABLE.to_string();
        let cases: [(&str, Vec<&str>, &str); 6] = [
            (
                "ip rule del",
                vec!["-4", "rule", "del", "fwmark", &mark, "lookup", &table],
                "IPv4",
            ),
            (
                "ip -6 rule del",
                vec!["-6", "rule", "del", "fwmark", &mark, "lookup", &table],
                "IPv6",
            ),
            (
                "ip route flush table",
                vec!["-4", "route", "flush", "table", &table],
                "IPv4",
            ),
            (
                "ip -6 route flush table",
                vec!["-6", "route", "flush", "table", &table],
                "IPv6",
            ),
            ("ip rule flush", vec!["-4", "rule", "flush"], "IPv4"),
            ("ip -6 rule flush", vec!["-6", "rule", "flush"], "IPv6"),
        ];
        let restored = "removed by someone else: restored";
        // A proxied app opening a new UDP flow every millisecond all along:
        // in the moments the routing is gone, the ruleset's guard (a marked
        // packet leaves by lo or not at all) must keep it in.
        let flood = Flood::start(&p, &dsts(), &env.token("flood"));
        for (what, args, family) in cases {
            // The daemon says "restored" at most once a second (a flush
            // deletes again what it put back, for up to ten rounds).
            thread::sleep(Duration::from_millis(1100));
            let before = d.log();
            let t0 = Instant::now();
            ip(&args);
            let back = wait_until(Duration::from_millis(500), Duration::from_millis(2), || {
                policy_routing(ROUTE_MARK, ROUTE_TABLE) == [(true, true); 2]
            });
            let took = t0.elapsed();
            assert!(
                back,
                "{what}: routing not back within 0.5 s: {:?}\n{}",
                policy_routing(ROUTE_MARK, ROUTE_TABLE),
                d.log()
            );
            eprintln!("{what}: routing back after {took:?}");
            // Logged once, naming the family.
            let line = format!("policy routing for {family} {restored}");
            assert!(
                wait_until(CONVERGE, Duration::from_millis(10), || {
                    count(&d.log(), &line) == count(&before, &line) + 1
                }),
                "{what}: expected one `{line}`:\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(100));
            let log = d.log();
            assert_eq!(
                count(&log, restored),
                count(&before, restored) + 1,
                "{what}: logged more than once:\n{log}"
            );
            if what.ends_with("rule flush") {
                // A flush also took the main and default tables' rules:
                // give them back, as the admin would.
                let fam = if family == "IPv4" { "-4" } else { "-6" };
                ip(&[fam, "rule", "add", "priority", "32766", "lookup", "main"]);
            }
            assert_proxied_all(env, &proxy, &remote, &p, what);
            assert!(d.running(), "{what}: the daemon stopped:\n{}", d.log());
        }
        let mut flood = flood;
        flood.stop();
        let leaked = remote
            .server
            .events()
            .into_iter()
            .filter(|e| flood.is_mine(&e.data))
            .count();
        let caught = proxy
            .events()
            .into_iter()
            .filter(|e| flood.is_mine(&e.data))
            .count();
        eprintln!("flood: {caught} datagrams reached the listener, {leaked} the remote");
        assert!(caught > 100, "the flood was not proxied: {caught}");
        assert_eq!(
            leaked, 0,
            "proxied datagrams reached the remote while routing was gone"
        );
        d.stop_ok();
    });
}

/// What it proves: while a daemon runs, a second `run`, a `--once` and a
/// `down` for the same table and map each exit 1 with "already running
/// (pid N)" naming the running daemon, and change nothing: maps, rules and
/// routes as they were, no nf_tables change at all, the first daemon still
/// serving; once it is gone (SIGTERM or SIGKILL) the claim is free again.
/// How it can fail: today the second instance syncs and, on exit, takes the
/// routing with it (the state comparison fails), or says nothing.
#[test]
fn a_second_instance_touches_nothing() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p", "/d"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/d", "drop")]);
        let config = env.write_config(&Config::new(&rules));
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let mut d = Daemon::start(&args);
        env.wait_map(&rules);
        let before = kernel_state();
        let monitor = Monitor::start();
        let running = format!("already running (pid {})", d.pid());
        let once: Vec<std::ffi::OsString> = env
            .run_args(&config)
            .into_iter()
            .chain(["--once".into()])
            .collect();
        let down: Vec<std::ffi::OsString> = vec!["down".into(), "-c".into(), config.clone().into()];
        for (what, a) in [("run", &args), ("--once", &once), ("down", &down)] {
            let f = run_daemon_to_exit(a, Duration::from_secs(20));
            assert_eq!(f.code(), Some(1), "second {what}: {}", f.describe());
            assert!(
                f.stderr.contains(&running),
                "second {what}: expected `{running}`: {}",
                f.describe()
            );
            assert_eq!(kernel_state(), before, "second {what} changed the kernel");
        }
        let txns = monitor.txns();
        assert!(txns.is_empty(), "nf_tables transactions: {txns:?}");
        assert!(d.running(), "the first daemon stopped:\n{}", d.log());
        assert_proxied_all(
            env,
            &proxy,
            &remote,
            &env.cg.path("/p"),
            "after the second instances",
        );
        // The first one still follows cgroupfs.
        env.cg.mkdir(&["/p2"]);
        let more = Rules::new(&[("/p", "proxy"), ("/d", "drop")]);
        env.wait_map(&more);

        // Gone by SIGTERM, then by SIGKILL: the claim goes with it.
        d.stop_ok();
        env.once(&Config::new(&rules));
        let mut d = Daemon::start(&args);
        d.kill();
        env.once(&Config::new(&rules));
    });
}

/// What it proves: a process that could not be a cgtproxy daemon (uid
/// nobody, no CAP_NET_ADMIN) binding the lock name first does not keep the
/// daemon off — which would leave the maps unfilled, a window without end
/// after a boot — : the daemon says so once and fills the map. How it can
/// fail: a claim that believes any holder (the daemon exits 1 "already
/// running").
#[test]
fn a_squatter_on_the_lock_name_does_not_keep_the_daemon_off() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let config = env.write_config(&Config::new(&rules));
        let name = "cgtproxy/cgtproxy/cgroups";
        let mut squatter = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args([
                "socat",
                &format!("ABSTRACT-LISTEN:{name},fork"),
                "EXEC:/bin/true",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("setpriv socat");
        let bound = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            std::fs::read_to_string("/proc/thread-self/net/unix")
                .is_ok_and(|t| t.lines().any(|l| l.ends_with(&format!(" @{name}"))))
        });
        assert!(bound, "the squatter never bound @{name}");
        let mut d = Daemon::start(&env.run_args(&config));
        env.wait_map(&rules);
        let log = d.log();
        assert!(
            log.contains("cannot be a cgtproxy daemon") && log.contains("uid 65534"),
            "the squat is not logged:\n{log}"
        );
        assert!(d.running(), "the daemon stopped:\n{log}");
        // It still follows cgroupfs.
        env.cg.mkdir(&["/p/child"]);
        env.wait_map(&rules);
        let _ = squatter.kill();
        let _ = squatter.wait();
        d.stop_ok();
    });
}

/// What it proves: stopping (SIGTERM) or killing (SIGKILL) the daemon and
/// starting it again changes no verdict: a `drop` cgroup that opens a new
/// UDP flow every millisecond to the remote (IPv4 and IPv6) gets nothing
/// out, before, during and after, while an unlisted cgroup's flood arrives
/// (the control); nf_tables sees no element deleted and no map flushed.
/// How it can fail: today SIGTERM flushes both maps (keep-on-exit is false
/// by default), so the dropped flood goes direct until the restart refills
/// them, and the monitor sees the flush.
#[test]
fn stop_and_restart_change_no_verdict() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        env.cg.mkdir(&["/d", "/x"]);
        let rules = Rules::new(&[("/d", "drop")]);
        let config = env.write_config(&Config::new(&rules));
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let mut d = Daemon::start(&args);
        let running = env.wait_map(&rules);
        let verdicts = dump_verdicts();
        let monitor = Monitor::start();
        // The control goes to another port: sharing the dropped flood's
        // destination, a reused source port would inherit the control's
        // `direct` conntrack entry (issue 11 item 10, the ruleset's to fix),
        // which is not what this test is about.
        let other: Vec<SocketAddr> = dsts()
            .iter()
            .map(|a| SocketAddr::new(a.ip(), REMOTE_PORT + 1))
            .collect();
        let addrs = other.clone();
        let second = remote
            .ns
            .run(move || Server::start("control", &addrs, false));
        let dropped = Flood::start(&env.cg.path("/d"), &dsts(), &env.token("dropped"));
        let control = Flood::start(&env.cg.path("/x"), &other, &env.token("control"));
        thread::sleep(Duration::from_millis(200));
        for kill in [false, true] {
            if kill {
                d.kill();
            } else {
                d.stop_ok();
            }
            // Down for a while, then up again.
            thread::sleep(Duration::from_millis(300));
            d = Daemon::start(&args);
            thread::sleep(Duration::from_millis(300));
        }
        let (mut dropped, mut control) = (dropped, control);
        dropped.stop();
        control.stop();
        let events = remote.server.events();
        let leaked: Vec<_> = events.iter().filter(|e| dropped.is_mine(&e.data)).collect();
        let arrived = second
            .events()
            .iter()
            .filter(|e| control.is_mine(&e.data))
            .count();
        assert!(arrived > 50, "control: only {arrived} datagrams arrived");
        assert!(
            leaked.is_empty(),
            "{} datagrams of the dropped cgroup reached the remote: {:?}",
            leaked.len(),
            leaked.iter().take(5).collect::<Vec<_>>()
        );
        // In step already: the restarts have nothing to commit.
        let txns = monitor.txns();
        assert!(txns.is_empty(), "the maps were touched: {txns:?}");
        assert_eq!(dump_map(), running, "the map after the restarts");
        assert_eq!(dump_verdicts(), verdicts, "the verdicts after the restarts");
        d.stop_ok();
    });
}

/// What it proves: a `route.mark` that differs from the mark the live
/// ruleset's TPROXY rules match is refused — `run` and `--once` exit 2
/// naming both numbers — and nothing changed (no element, no rule, no
/// route); with no `route.mark`, the ruleset's mark is routed, whatever it
/// is. How it can fail: today the daemon starts and routes 9012 while the
/// ruleset marks 9011 (proxied traffic goes direct); a default mark of 9011
/// fails the second half (the ruleset marks 4242 there).
#[test]
fn a_mark_other_than_the_rulesets_is_refused() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::On {
            mark: 9012,
            table: ROUTE_TABLE,
        };
        let config = env.write_config(&cfg);
        let before = kernel_state();
        let mut once = env.run_args(&config);
        once.push("--once".into());
        for (what, a) in [("run", env.run_args(&config)), ("--once", once)] {
            let f = run_daemon_to_exit(&a, Duration::from_secs(20));
            assert_eq!(f.code(), Some(2), "{what}: {}", f.describe());
            assert!(
                f.stderr.contains("route.mark 9012") && f.stderr.contains("(9011)"),
                "{what}: both marks in the message: {}",
                f.describe()
            );
            assert_eq!(kernel_state(), before, "{what} changed the kernel");
        }
        assert_eq!(policy_routing(9012, ROUTE_TABLE), [(false, false); 2]);

        // No route.mark: the ruleset's, here 4242.
        load_ruleset_with_mark(4242);
        env.once(&Config::new(&rules));
        assert_policy_routing(4242, ROUTE_TABLE, true, "the ruleset's mark");
        assert_eq!(
            policy_routing(9011, ROUTE_TABLE).map(|(rule, _)| rule),
            [false; 2]
        );
    });
}

/// What it proves: `down` refuses while a daemon runs ("stop it first",
/// exit 1, nothing changed); after a stop (which left everything) it
/// empties both maps and removes the rule and route of both families, exit
/// 0; a second `down` is fine too. How it can fail: `down` does not exist
/// today (exit 2), and a stop that already emptied the maps fails the
/// middle assertion.
#[test]
fn down_removes_elements_and_routes() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p", "/d"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/d", "drop")]);
        let config = env.write_config(&Config::new(&rules));
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let d = Daemon::start(&args);
        let running = env.wait_map(&rules);
        let down: [std::ffi::OsString; 3] = ["down".into(), "-c".into(), config.clone().into()];
        let before = kernel_state();
        let f = run_cmd(
            std::process::Command::new(BIN).args(&down),
            Duration::from_secs(20),
        );
        assert_eq!(f.code(), Some(1), "down beside a daemon: {}", f.describe());
        assert!(f.stderr.contains("stop it first"), "{}", f.describe());
        assert_eq!(kernel_state(), before, "a refused down changed the kernel");
        d.stop_ok();
        assert_eq!(dump_map(), running, "the stop left the elements");
        assert_policy_routing(ROUTE_MARK, ROUTE_TABLE, true, "the stop left the routes");

        for round in ["down", "down again"] {
            let f = run_cmd(
                std::process::Command::new(BIN).args(&down),
                Duration::from_secs(20),
            );
            assert_eq!(f.code(), Some(0), "{round}: {}", f.describe());
            assert_eq!(dump_map(), MapDump::new(), "{round}: elements left");
            assert_eq!(
                dump_verdicts(),
                VerdictDump::new(),
                "{round}: verdicts left"
            );
            assert_policy_routing(ROUTE_MARK, ROUTE_TABLE, false, round);
            assert!(f.stdout.contains("emptied"), "{round}: {}", f.describe());
        }
    });
}

/// What it proves: the policy rule sits at the configured priority (and at
/// 100 by default), so a VPN-style rule at 5210 that sends our mark to a
/// table of its own never sees a marked packet (proxied traffic still
/// reaches the listener); a rule put ahead of ours is listed by `check`
/// (a warning) and `status`. How it can fail: today the kernel picks the
/// priority (32765, after the VPN's rule): the proxied exchange goes to
/// the VPN table, and the priority assertions fail.
#[test]
fn the_rule_priority_is_honoured() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let mark = format!("fwmark {ROUTE_MARK:#x} lookup {ROUTE_TABLE}");
        let at = |fam: &str, prio: u32| {
            ip_rules(fam)
                .lines()
                .any(|l| l.starts_with(&format!("{prio}:")) && l.contains(&mark))
        };

        // The default: 100, ahead of a VPN rule for the same mark.
        for fam in ["-4", "-6"] {
            ip(&[
                fam,
                "rule",
                "add",
                "priority",
                "5210",
                "fwmark",
                &ROUTE_MARK.to_string(),
                "lookup",
                "52",
            ]);
        }
        ip(&[
            "-4",
            "route",
            "add",
            "default",
            "via",
            "198.18.0.2",
            "table",
            "52",
        ]);
        ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8::2",
            "table",
            "52",
        ]);
        let config = env.write_config(&Config::new(&rules));
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let d = Daemon::start(&args);
        env.wait_map(&rules);
        assert!(
            at("-4", 100) && at("-6", 100),
            "{}{}",
            ip_rules("-4"),
            ip_rules("-6")
        );
        assert_proxied_all(env, &proxy, &remote, &env.cg.path("/p"), "VPN rule at 5210");

        // A rule ahead of ours: check warns, status lists it.
        ip(&[
            "-4",
            "rule",
            "add",
            "priority",
            "50",
            "from",
            "198.18.0.1",
            "lookup",
            "52",
        ]);
        let cmd = |c: &str| {
            run_cmd(
                std::process::Command::new(BIN).args([
                    c,
                    "-c",
                    config.to_str().unwrap(),
                    "--cgroup-root",
                    env.cg.root.to_str().unwrap(),
                ]),
                Duration::from_secs(20),
            )
        };
        let check = cmd("check");
        assert!(
            check.stdout.lines().any(|l| l.starts_with("WARN")
                && l.contains("50: from 198.18.0.1/32 lookup 52 precedes ours")),
            "check: {}",
            check.describe()
        );
        let status = cmd("status");
        assert!(
            status
                .stdout
                .contains("IPv4: ahead of ours: 50: from 198.18.0.1/32 lookup 52"),
            "status: {}",
            status.describe()
        );
        assert!(
            status
                .stdout
                .contains("IPv4: rule in place, route in place"),
            "{}",
            status.describe()
        );
        ip(&["-4", "rule", "del", "priority", "50"]);
        d.stop_ok();

        // A configured priority.
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::Priority(4321);
        let d = env.start(&cfg);
        assert!(
            at("-4", 4321) && at("-6", 4321),
            "{}{}",
            ip_rules("-4"),
            ip_rules("-6")
        );
        d.stop_ok();
    });
}

/// What it proves: the claim follows the config: after a SIGHUP that moves
/// the daemon to another map, a `--once` for the new map is refused
/// ("already running (pid N)", nothing written there by it) and one for the
/// old map may run. How it can fail: a reload that keeps the old claim
/// lets a second daemon write the new map; one that drops it without
/// taking the new one does too.
#[test]
fn a_reload_to_another_map_moves_the_claim() {
    sandbox(|env| {
        load_ruleset();
        nft_script(
            "add map inet cgtproxy cgroups2 { type cgroupsv2 : mark; counter; }\n\
             add map inet cgtproxy verdicts2 { type mark : verdict; }\n",
        );
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let first = Config::new(&rules);
        let mut second = Config::new(&rules);
        second.map = Some("cgroups2".into());
        second.verdict_map = Some("verdicts2".into());
        let config = env.write_config(&first);
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let mut d = Daemon::start(&args);
        env.wait_map(&rules);
        std::fs::write(&config, second.to_json()).unwrap();
        d.signal(libc::SIGHUP);
        wait_log(|| d.log(), "configuration reloaded from", 1, CONVERGE);

        let once = |cfg: &Config| {
            let path = env.write_config(cfg);
            let mut a = env.run_args(&path);
            a.push("--once".into());
            run_daemon_to_exit(&a, Duration::from_secs(20))
        };
        let new_map = try_dump_raw("cgtproxy", "cgroups2", "verdicts2").unwrap();
        let f = once(&second);
        assert_eq!(
            f.code(),
            Some(1),
            "--once for the new map: {}",
            f.describe()
        );
        assert!(
            f.stderr
                .contains(&format!("already running (pid {})", d.pid())),
            "{}",
            f.describe()
        );
        assert_eq!(
            try_dump_raw("cgtproxy", "cgroups2", "verdicts2")
                .unwrap()
                .compose(),
            new_map.compose(),
            "the refused --once wrote the new map"
        );
        let f = once(&first);
        assert_eq!(
            f.code(),
            Some(0),
            "--once for the old map: {}",
            f.describe()
        );
        assert!(d.running(), "{}", d.log());
        d.stop_ok();
    });
}

/// What it proves: `lo` going down takes our IPv6 route with it (the kernel
/// deletes it and refuses it back: ENETDOWN, said once); the moment `lo` is
/// up again the daemon puts it back (within 0.5 s, not at its 2 s retry
/// timer), and says the routing is in place again. How it can fail:
/// without the link watch the repair waits for the timer, which every
/// event restarts (well past 0.5 s), or a failure said at every retry.
#[test]
fn routing_lost_with_lo_comes_back_with_lo() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let mut d = env.start(&Config::new(&rules));
        env.wait_map(&rules);
        ip(&["link", "set", "lo", "down"]);
        let failing = "putting it back";
        wait_log(|| d.log(), failing, 1, CONVERGE);
        assert_eq!(policy_routing(ROUTE_MARK, ROUTE_TABLE)[1], (true, false));
        // Longer than the retry timer: the failure is said once.
        thread::sleep(Duration::from_millis(2500));
        assert_eq!(count(&d.log(), failing), 1, "{}", d.log());
        let t0 = Instant::now();
        ip(&["link", "set", "lo", "up"]);
        let back = wait_until(Duration::from_millis(500), Duration::from_millis(2), || {
            policy_routing(ROUTE_MARK, ROUTE_TABLE) == [(true, true); 2]
        });
        assert!(
            back,
            "not back within 0.5 s of lo up: {:?}\n{}",
            policy_routing(ROUTE_MARK, ROUTE_TABLE),
            d.log()
        );
        eprintln!("lo up: routing back after {:?}", t0.elapsed());
        wait_log(|| d.log(), "policy routing is in place again", 1, CONVERGE);
        assert!(d.running(), "{}", d.log());
        d.stop_ok();
    });
}
