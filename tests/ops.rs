//! The operator's side: `check`, `status`, `explain`, readiness, the man
//! pages and the service files. The kernel tests run as root, each in its
//! own network namespace and cgroup subtree (tests/common/mod.rs); the file
//! tests need `mandoc`, `systemd-analyze` and `sh`. A missing prerequisite
//! prints SKIP and passes, except with `CI=true`, where it fails.

pub mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cli(env: &Env, config: &Path, args: &[&str]) -> Finished {
    env.cli(config, args, LIMIT)
}

/// Sets net.bridge.bridge-nf-call-ip(6)tables in this network namespace;
/// false when br_netfilter is not there.
fn bridge_nf(on: bool) -> bool {
    let v = if on { "1" } else { "0" };
    ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"]
        .iter()
        .all(|f| fs::write(format!("/proc/sys/net/bridge/{f}"), v).is_ok())
}

/// The level of a cgroup directory as the kernel counts it.
fn level(env: &Env, dir: &Path) -> usize {
    dir.strip_prefix(&env.mount).unwrap().components().count()
}

/// The line of `text` that starts with `prefix`.
fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct StatusRow {
    id: u64,
    path: Option<String>,
    verdict: String,
    chain: Option<String>,
    packets: Option<u64>,
    bytes: Option<u64>,
}

/// The keys `status --json` promises (cgtproxy(8), STATUS JSON).
const TOP_KEYS: [&str; 4] = ["elements", "map", "routing", "table"];
const ELEMENT_KEYS: [&str; 6] = ["bytes", "chain", "id", "packets", "path", "verdict"];

fn status_json(env: &Env, config: &Path) -> Vec<StatusRow> {
    use miniserde::json::{Number, Value};
    let out = expect(cli(env, config, &["status", "--json"]), 0, "status --json");
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    let v: Value = miniserde::json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}"));
    let Value::Object(top) = v else {
        panic!("not an object: {out}")
    };
    assert_eq!(top.keys().map(String::as_str).collect::<Vec<_>>(), TOP_KEYS);
    assert!(matches!(top.get("table"), Some(Value::String(t)) if t == "cgtproxy"));
    assert!(matches!(top.get("map"), Some(Value::String(m)) if m == "cgroups"));
    let Some(Value::Array(els)) = top.get("elements") else {
        panic!("no elements array: {out}")
    };
    let num = |v: Option<&Value>| match v {
        Some(Value::Number(Number::U64(n))) => Some(*n),
        Some(Value::Null) => None,
        other => panic!("not a number or null: {other:?} in {out}"),
    };
    let string = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) => None,
        other => panic!("not a string or null: {other:?} in {out}"),
    };
    els.iter()
        .map(|e| {
            let Value::Object(o) = e else {
                panic!("element not an object: {out}")
            };
            assert_eq!(
                o.keys().map(String::as_str).collect::<Vec<_>>(),
                ELEMENT_KEYS
            );
            StatusRow {
                id: num(o.get("id")).expect("id"),
                path: string(o.get("path")),
                verdict: string(o.get("verdict")).expect("verdict"),
                chain: string(o.get("chain")),
                packets: num(o.get("packets")),
                bytes: num(o.get("bytes")),
            }
        })
        .collect()
}

fn row<'a>(rows: &'a [StatusRow], path: &str) -> &'a StatusRow {
    rows.iter()
        .find(|r| r.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no element for {path} in {rows:?}"))
}

#[test]
fn status_counters_rise_with_traffic() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let _proxy = start_proxy();
        env.cg.mkdir(&["/p/child", "/d"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/d", "direct")]);
        let cfg = Config::new(&rules);
        let config = env.write_config(&cfg);
        let daemon = env.start(&cfg);
        env.wait_map(&rules);

        let before = status_json(env, &config);
        assert_eq!(before.len(), 2, "{before:?}");
        let p0 = row(&before, "/p").clone();
        assert_eq!(p0.id, env.cg.id("/p"));
        assert_eq!(
            (p0.verdict.as_str(), p0.chain.as_deref()),
            ("goto", Some("proxy"))
        );
        let d0 = row(&before, "/d").clone();
        assert_eq!(d0.chain.as_deref(), Some("direct"));

        // A TCP and a UDP connection from /p, one from /p/child (which has
        // no element and inherits /p's), one from /d.
        for (cg, proto) in [
            ("/p", Proto::Tcp),
            ("/p", Proto::Udp),
            ("/p/child", Proto::Tcp),
        ] {
            let msg = env.token("counted");
            let r = exchange(&env.cg.path(cg), proto, Remote::v4(), &msg);
            assert_eq!(r, Ok(format!("proxy:{msg}")), "{proto:?} from {cg}");
        }
        let msg = env.token("direct");
        let r = exchange(&env.cg.path("/d"), Proto::Tcp, Remote::v4(), &msg);
        assert_eq!(r, Ok(format!("remote:{msg}")));
        assert_eq!(remote.server.got(&msg).len(), 1);

        let after = status_json(env, &config);
        let (p1, d1) = (row(&after, "/p"), row(&after, "/d"));
        let n = |r: &StatusRow| (r.packets.expect("counter"), r.bytes.expect("counter"));
        // One lookup per new connection: the verdict sticks to it after.
        assert!(n(p1).0 >= n(&p0).0 + 3, "/p packets: {p0:?} then {p1:?}");
        assert!(n(p1).1 > n(&p0).1, "/p bytes: {p0:?} then {p1:?}");
        assert!(n(d1).0 > n(&d0).0, "/d packets: {d0:?} then {d1:?}");

        // The table says the same.
        let out = expect(cli(env, &config, &["status"]), 0, "status");
        // The table, then a blank line and the policy routing.
        let (table, routing) = out.split_once("\n\n").expect("a routing part");
        assert!(
            routing.starts_with("routing: rule priority 100 fwmark 9011 lookup 9011"),
            "{out}"
        );
        assert!(
            routing.contains("IPv4: rule in place, route in place"),
            "{out}"
        );
        let head = table.lines().next().unwrap();
        assert_eq!(
            head.split_whitespace().collect::<Vec<_>>(),
            ["VERDICT", "PACKETS", "BYTES", "CGROUP"]
        );
        let p_line = table
            .lines()
            .find(|l| l.ends_with("  /p"))
            .unwrap_or_else(|| panic!("no /p row:\n{table}"));
        assert_eq!(
            p_line.split_whitespace().collect::<Vec<_>>(),
            [
                "goto",
                "proxy",
                &n(p1).0.to_string(),
                &n(p1).1.to_string(),
                "/p"
            ],
            "{table}"
        );
        // Columns are aligned: CGROUP starts at the same offset on every line.
        let col = head.find("CGROUP").unwrap();
        for l in table.lines().skip(1) {
            assert_eq!(l.find('/'), Some(col), "misaligned:\n{table}");
        }
        daemon.stop();
    });
}

#[test]
fn status_shows_a_gone_cgroup_by_its_id() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/gone", "/kept"]);
        let rules = Rules::new(&[("/gone|/kept", "drop")]);
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::Off;
        let config = env.write_config(&cfg);
        env.once(&cfg);
        let id = env.cg.id("/gone");
        env.cg.rmdir("/gone");
        let rows = status_json(env, &config);
        let gone = rows.iter().find(|r| r.id == id).expect("element stays");
        assert_eq!(gone.path, None);
        assert_eq!(
            (gone.verdict.as_str(), gone.chain.as_deref()),
            ("drop", None)
        );
        assert_eq!(row(&rows, "/kept").verdict, "drop");
        // Listed after the cgroups that exist, by its bare id.
        let out = expect(cli(env, &config, &["status"]), 0, "status");
        let table = out.split("\n\n").next().unwrap();
        let last = table.lines().last().unwrap();
        assert_eq!(
            last.split_whitespace().last(),
            Some(id.to_string().as_str())
        );
        assert!(last.starts_with("drop"), "{table}");
    });
}

#[test]
fn status_without_the_table_fails() {
    sandbox(|env| {
        let config = env.write_config(&Config::new(&Rules::new(&[("/p", "proxy")])));
        let f = cli(env, &config, &["status"]);
        assert_eq!(f.code(), Some(1), "{}", f.describe());
        assert!(f.stderr.contains("table inet cgtproxy"), "{}", f.stderr);
    });
}

// ---------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------

/// A `sleep` running in `dir`; killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn start(dir: &Path, fd3: Option<i32>) -> Sleeper {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo $$ > \"$CG/cgroup.procs\" && exec sleep 60"])
            .env("CG", dir)
            .stdin(Stdio::null());
        if let Some(fd) = fd3 {
            // SAFETY: only dup2/fcntl between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == 3 {
                        let fl = libc::fcntl(3, libc::F_GETFD);
                        libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
                    } else if libc::dup2(fd, 3) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn sh");
        let pid = child.id().to_string();
        let procs = dir.join("cgroup.procs");
        assert!(
            wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                fs::read_to_string(&procs).is_ok_and(|p| p.lines().any(|l| l == pid))
            }),
            "process {pid} did not join {}",
            dir.display()
        );
        // Past `exec`: the comm is the sleeper's.
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        Sleeper(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn explain_names_the_rule_for_a_nested_cgroup() {
    sandbox(|env| {
        load_ruleset();
        let _remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/app/inner/deep", "/app/inner/own"]);
        let rules = Rules::new(&[("/app", "proxy"), ("/app/inner/own", "direct")]);
        let cfg = Config::new(&rules);
        let config = env.write_config(&cfg);
        let daemon = env.start(&cfg);
        env.wait_map(&rules);

        let deep = env.cg.path("/app/inner/deep");
        let l = level(env, &deep);
        let out = expect(
            cli(env, &config, &["explain", "/app/inner/deep"]),
            0,
            "explain",
        );
        assert_eq!(line(&out, "cgroup "), "cgroup     /app/inner/deep");
        assert_eq!(
            line(&out, "id "),
            format!("id         {}", env.cg.id("/app/inner/deep"))
        );
        assert_eq!(line(&out, "level "), format!("level      {l}"));
        assert!(line(&out, "rule ").contains("none matches"), "{out}");
        assert_eq!(line(&out, "element "), "element    none");
        // The lookups: the deep cgroup, /app/inner, then /app decides.
        let app = out
            .lines()
            .find(|x| x.trim_end().ends_with("/app   <- decides"))
            .unwrap_or_else(|| panic!("/app does not decide:\n{out}"));
        assert_eq!(
            app.split_whitespace().take(5).collect::<Vec<_>>(),
            [
                &(l - 2).to_string(),
                &env.cg.id("/app").to_string(),
                "rules[0]",
                "goto",
                "proxy"
            ],
            "{out}"
        );
        for rel in ["/app/inner/deep", "/app/inner"] {
            let r = out
                .lines()
                .filter(|x| x.starts_with("  ") && !x.starts_with("  LEVEL"))
                .find(|x| x.trim_end().ends_with(&format!("  {rel}")))
                .unwrap_or_else(|| panic!("no lookup row for {rel}:\n{out}"));
            assert_eq!(r.split_whitespace().nth(2), Some("-"), "{out}");
            assert_eq!(r.split_whitespace().nth(3), Some("-"), "{out}");
        }
        assert_eq!(
            line(&out, "verdict "),
            format!(
                "verdict    goto proxy, inherited from the element of /app (level {})",
                l - 2
            )
        );
        assert_eq!(
            line(&out, "by rules "),
            "by rules   rules[0] \"/app\" -> goto proxy, inherited from /app"
        );
        // And the kernel agrees: traffic from there is proxied.
        let msg = env.token("deep");
        let r = exchange(&deep, Proto::Tcp, Remote::v4(), &msg);
        assert_eq!(r, Ok(format!("proxy:{msg}")));
        assert_eq!(proxy.got(&msg).len(), 1);

        // By PID, and by directory, and one that does not exist.
        let sleeper = Sleeper::start(&deep, None);
        let own = env.cg.path("/app/inner/own");
        let pid = sleeper.pid().to_string();
        let f = cli(
            env,
            &config,
            &["explain", &pid, own.to_str().unwrap(), "/no/such"],
        );
        let out = expect(f, 1, "explain PID DIR missing");
        assert!(
            out.contains(&format!(
                "process {pid} (sleep)\ncgroup     /app/inner/deep\n"
            )),
            "{out}"
        );
        let verdicts: Vec<&str> = out.lines().filter(|x| x.starts_with("verdict ")).collect();
        assert_eq!(
            verdicts,
            [
                format!(
                    "verdict    goto proxy, inherited from the element of /app (level {})",
                    l - 2
                )
                .as_str(),
                "verdict    goto direct, from its own element",
            ],
            "{out}"
        );
        assert!(out.contains("/no/such: no such cgroup"), "{out}");
        daemon.stop();
    });
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[test]
fn check_passes_then_catches_a_missing_chain() {
    sandbox(|env| {
        load_ruleset();
        bridge_nf(false);
        let _proxy = start_proxy();
        // A target chain of one's own starts by putting the socket's mark back
        // (the verdict number is in the packet mark when it is entered).
        nft_script("add chain inet cgtproxy mine { meta mark set socket mark; accept; }\n");
        env.cg.mkdir(&["/p", "/m"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/m", "mine")]);
        let config = env.write_config(&Config::new(&rules));

        let out = expect(cli(env, &config, &["check"]), 0, "check, all well");
        assert!(out.ends_with("all checks passed\n"), "{out}");
        for want in [
            "ok    table inet cgtproxy",
            "ok    map cgroups: cgroupsv2 : mark, with counters",
            "ok    map verdicts: mark : verdict",
            "ok    chains the rules name: proxy, mine",
            "ok    kernel: socket cgroupv2 (the ruleset looks up levels 1-16",
            "ok    kernel: TPROXY (to port 7893, for mark 9011)",
            "ok    routing mark 9011, taken from the ruleset's TPROXY rules",
            "ok    cgroup namespace: the initial one",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
        assert!(
            out.contains("listening on port 7893) runs in cgroup"),
            "{out}"
        );

        // A chain of one's own that does not restore the mark first: a
        // warning that names it (its packets would leave with the number).
        nft_script(
            "flush chain inet cgtproxy mine\nadd rule inet cgtproxy mine counter\nadd rule inet cgtproxy mine meta mark set socket mark accept\n",
        );
        // A warning does not fail check (exit 0); --strict makes it fail.
        let out = expect(cli(env, &config, &["check"]), 0, "check, no restore");
        let strict = expect(
            cli(env, &config, &["check", "--strict"]),
            1,
            "check --strict, no restore",
        );
        assert_eq!(strict, out);
        assert!(
            out.contains(
                "WARN  chain 'mine' (rules[1].target) does not start with `meta mark set socket mark`"
            ),
            "{out}"
        );
        assert!(out.ends_with("0 failures, 1 warning\n"), "{out}");

        // The chain a rule names disappears from the table.
        nft_script("delete chain inet cgtproxy mine\n");
        let out = expect(cli(env, &config, &["check"]), 1, "check, chain missing");
        assert!(
            out.contains(
                "FAIL  chain 'mine' named by rules[1].target does not exist in table inet cgtproxy"
            ),
            "{out}"
        );
        assert!(out.ends_with("1 failure, 0 warnings\n"), "{out}");
        // `run` refuses the same config as a configuration error.
        let run = cli(env, &config, &["run", "--once"]);
        assert_eq!(run.code(), Some(2), "{}", run.describe());

        // A rule that names the internal helper chain.
        let reroute = env.write_config(&Config::new(&Rules::new(&[("/p", "reroute")])));
        let out = expect(cli(env, &reroute, &["check"]), 0, "check, reroute");
        assert!(
            out.contains("WARN  rules[0].target is \"reroute\""),
            "{out}"
        );
        // Any other internal chain: a loop (lookup) or a base chain (output).
        let internal = env.write_config(&Config::new(&Rules::new(&[
            ("/p", "lookup"),
            ("/q", "output"),
        ])));
        let out = expect(cli(env, &internal, &["check"]), 0, "check, internal chains");
        for (i, c) in [(0, "lookup"), (1, "output")] {
            assert!(
                out.contains(&format!(
                    "WARN  rules[{i}].target is \"{c}\", a chain internal"
                )),
                "{out}"
            );
        }

        // A config that does not load is exit 2, nothing else.
        let bad = env.write_file("bad.json", "{ \"rules\": [ }");
        let f = cli(env, &bad, &["check"]);
        assert_eq!(f.code(), Some(2), "{}", f.describe());
        assert!(f.stderr.contains("bad.json:1:"), "{}", f.stderr);

        // No table at all.
        nft_script("delete table inet cgtproxy\n");
        let out = expect(cli(env, &config, &["check"]), 1, "check, no table");
        assert!(
            out.contains("FAIL  table inet cgtproxy does not exist"),
            "{out}"
        );
    });
}

#[test]
fn check_catches_the_proxy_capturing_itself() {
    sandbox(|env| {
        load_ruleset();
        bridge_nf(false);
        env.cg.mkdir(&["/proxy/svc"]);
        let svc = env.cg.path("/proxy/svc");
        // The "proxy": a process in /proxy/svc holding the listening socket.
        let listener = TcpListener::bind(("127.0.0.1", PROXY_PORT)).expect("bind 7893");
        let sleeper = Sleeper::start(&svc, Some(listener.as_raw_fd()));
        drop(listener);
        let pid = sleeper.pid();
        let who = format!(
            "the proxy (pid {pid} sleep, listening on port 7893) runs in cgroup /proxy/svc"
        );

        let rules = Rules::new(&[("/proxy", "proxy")]);
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::Off;
        // Routing of one's own, as `"route": false` expects (else check
        // warns that proxied traffic is dropped).
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let config = env.write_config(&cfg);
        // Before the daemon ran: the rules would send it to proxy.
        let out = expect(cli(env, &config, &["check"]), 0, "check, by rules");
        let warn = line(&out, &format!("WARN  {who}"));
        assert!(
            warn.contains("rules[0] \"/proxy\" sends its ancestor /proxy to goto proxy"),
            "{out}"
        );
        assert!(
            warn.contains("the ruleset exempts no mark from `proxy`"),
            "{out}"
        );
        assert!(!warn.contains("the map now"), "{out}");
        // The second warning: this listener takes IPv4 TCP only.
        assert!(
            out.contains("WARN  nothing on port 7893 takes TCP IPv6 (::1), UDP IPv4 (127.0.0.1), UDP IPv6 (::1)"),
            "{out}"
        );
        assert!(out.ends_with("0 failures, 2 warnings\n"), "{out}");

        // After it ran: the map does too.
        env.once(&cfg);
        let out = expect(cli(env, &config, &["check"]), 0, "check, by the map");
        let warn = line(&out, &format!("WARN  {who}"));
        let lvl = level(env, &env.cg.path("/proxy"));
        assert!(
            warn.contains(&format!(
                "the map now sends it to goto proxy (element of /proxy, level {lvl})"
            )),
            "{out}"
        );

        // Listing the proxy's own cgroup as direct fixes it.
        let rules = Rules::new(&[("/proxy/svc", "direct"), ("/proxy", "proxy")]);
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::Off;
        let config = env.write_config(&cfg);
        env.once(&cfg);
        let out = expect(cli(env, &config, &["check"]), 0, "check, fixed");
        assert!(
            out.contains(&format!("ok    {who}, which is not proxied")),
            "{out}"
        );
        drop(sleeper);
    });
}

#[test]
fn check_warns_about_br_netfilter_and_cgroup_namespaces() {
    sandbox(|env| {
        load_ruleset();
        let _proxy = start_proxy();
        env.cg.mkdir(&["/p", "/ns"]);
        let config = env.write_config(&Config::new(&Rules::new(&[("/p", "proxy")])));
        // br_netfilter loaded (its sysctls exist in every namespace) and
        // on, in this namespace.
        if !bridge_nf(true) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("br_netfilter is not loaded (CI=true makes this a failure)");
            }
            eprintln!("SKIP br_netfilter is not loaded: that trap is not staged");
            return;
        }
        // Without the forward file bridged frames meet no cgtproxy rule:
        // nothing said.
        let out = expect(cli(env, &config, &["check"]), 0, "check, no forward file");
        assert!(!out.contains("br_netfilter"), "{out}");
        let forward = manifest().join("nft/cgtproxy-forward.nft");
        run_ok("nft", &["-f", forward.to_str().unwrap()]);
        let out = expect(cli(env, &config, &["check"]), 0, "check, br_netfilter");
        assert!(
            out.contains("WARN  br_netfilter: net.bridge.bridge-nf-call-iptables and bridge-nf-call-ip6tables = 1"),
            "{out}"
        );
        expect(
            cli(env, &config, &["check", "--strict"]),
            1,
            "check --strict, br_netfilter",
        );
        bridge_nf(false);
        let out = expect(
            cli(env, &config, &["check", "--strict"]),
            0,
            "check --strict, off",
        );
        assert!(
            out.contains("ok    br_netfilter: loaded, bridge-nf-call-ip(6)tables off"),
            "{out}"
        );
        expect(cli(env, &config, &["check"]), 0, "check, all well");

        // From inside a cgroup namespace rooted at /ns.
        let f = run_cmd(
            Command::new("sh")
                .args([
                    "-c",
                    "echo $$ > \"$CG/cgroup.procs\" && exec unshare -C \"$@\"",
                    "sh",
                    BIN,
                    "check",
                    "-c",
                    config.to_str().unwrap(),
                    "--cgroup-root",
                    env.cg.root.to_str().unwrap(),
                ])
                .env("CG", env.cg.path("/ns")),
            LIMIT,
        );
        let out = expect(f, 0, "check in a cgroup namespace");
        assert!(
            out.contains("WARN  running in a non-root cgroup namespace"),
            "{out}"
        );
    });
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

/// Many cgroups, so a premature "ready" would be caught with the map
/// still (partly) empty.
fn many(env: &Env) -> Rules {
    let dirs: Vec<String> = (0..300).map(|i| format!("/many/c{i}")).collect();
    let refs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    env.cg.mkdir(&refs);
    Rules::new(&[("/many/c[0-9]+", "proxy")])
}

#[test]
fn ready_fd_is_written_after_the_map_is_filled() {
    sandbox(|env| {
        load_ruleset();
        let rules = many(env);
        let config = env.write_config(&Config::new(&rules));
        let mut d = Daemon::spawn(&env.run_args(&config), true);
        if let Err(e) = d.wait_ready(Duration::from_secs(20)) {
            panic!("{e}\n{}", d.kill().describe());
        }
        // Read at once, no waiting: the newline came after the commit.
        env.assert_map(&rules);
        assert_eq!(dump_map().len(), 300);
        d.stop();
    });
}

/// The unit's ExecStart (with the binary under test), and what it says.
fn exec_start() -> Vec<String> {
    let unit = fs::read_to_string(manifest().join("init/systemd/cgtproxy.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    line.split_whitespace()
        .map(|w| w.replace("/usr/bin/cgtproxy", BIN))
        .collect()
}

/// Receives notifications until one contains `want` (10 s).
fn notified(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = m.lines().any(|l| l == want);
                seen.push(m);
                if hit {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no {want} on NOTIFY_SOCKET; got {seen:?}");
}

#[test]
fn notify_socket_gets_ready_after_the_map_is_filled() {
    sandbox(|env| {
        load_ruleset();
        let rules = many(env);
        let config = env.write_config(&Config::new(&rules));
        let path = env.tmp.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // The unit's command line, as systemd would run it.
        let argv = exec_start();
        let log = fs::File::create(env.tmp.join("daemon.log")).unwrap();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("-c")
            .arg(&config)
            .arg("--cgroup-root")
            .arg(&env.cg.root)
            .env("NOTIFY_SOCKET", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut seen = Vec::new();
        notified(&sock, "READY=1", &mut seen);
        env.assert_map(&rules);
        // ExecReload, with $MAINPID as systemd sets it.
        let reload = exec_line("ExecReload=");
        let f = run_cmd(
            Command::new("sh")
                .args(["-c", &reload])
                .env("MAINPID", child.id().to_string()),
            LIMIT,
        );
        assert!(f.status.success(), "{}", f.describe());
        seen.clear();
        notified(&sock, "RELOADING=1", &mut seen);
        notified(&sock, "READY=1", &mut seen);
        // SIGTERM (systemd's stop): STOPPING=1 and exit 0.
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        notified(&sock, "STOPPING=1", &mut seen);
        let st = child.wait().unwrap();
        let log = fs::read_to_string(env.tmp.join("daemon.log")).unwrap();
        assert!(st.success(), "{st:?}\n{log}");
        assert!(log.contains("configuration reloaded"), "{log}");
        assert!(!dump_map().is_empty(), "SIGTERM must leave the elements");
    });
}

fn exec_line(key: &str) -> String {
    let unit = fs::read_to_string(manifest().join("init/systemd/cgtproxy.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in the unit"))
        .to_string()
}

// ---------------------------------------------------------------------------
// Man pages and --help
// ---------------------------------------------------------------------------

const PAGES: [&str; 2] = ["man/cgtproxy.8", "man/cgtproxy.json.5"];

#[test]
fn man_pages_lint_clean() {
    if !have("mandoc") {
        return;
    }
    for page in PAGES {
        let f = run_cmd(
            Command::new("mandoc")
                .args(["-T", "lint"])
                .arg(manifest().join(page)),
            LIMIT,
        );
        // Cross-references to pages this machine has not installed (our
        // own included) and a stale mandoc.db say nothing about the page.
        let complaints: Vec<&str> = f
            .stdout
            .lines()
            .chain(f.stderr.lines())
            .filter(|l| !l.contains("referenced manual not found") && !l.contains("mandoc.db"))
            .collect();
        assert!(
            complaints.is_empty(),
            "mandoc -T lint {page}:\n{}",
            complaints.join("\n")
        );
    }
}

/// A page rendered as plain text.
fn render(page: &str) -> String {
    let f = run_cmd(
        Command::new("mandoc")
            .args(["-T", "utf8", "-O", "width=200"])
            .arg(manifest().join(page)),
        LIMIT,
    );
    assert!(f.status.success(), "{}", f.describe());
    // Drop the overstrike of bold and underline.
    let mut out = String::new();
    for c in f.stdout.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out
}

/// The body of a section of a rendered page (up to the next heading).
fn section<'a>(page: &'a str, name: &str) -> &'a str {
    let start = page
        .find(&format!("\n{name}\n"))
        .unwrap_or_else(|| panic!("no section {name}"))
        + name.len()
        + 2;
    let rest = &page[start..];
    let end = rest
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| rest[i..].starts_with(|c: char| c.is_ascii_uppercase()))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Every `-x`/`--long` option and every command of `--help` in `text`.
/// The block of `--help` that follows the line `name:` (up to a blank
/// line).
fn help_block<'a>(help: &'a str, name: &str) -> &'a str {
    let start = help
        .find(&format!("\n{name}:\n"))
        .unwrap_or_else(|| panic!("no `{name}:` block in --help:\n{help}"))
        + name.len()
        + 3;
    let rest = &help[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The entries of a list: (head, text) for each line indented by exactly
/// `indent` spaces (or up to 4 more for an option: `      --once`), the
/// head being what comes before the first run of two spaces, the text the
/// rest of the entry (its continuation lines too).
fn entries(block: &str, indent: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        let lead = line.len() - line.trim_start().len();
        let body = line.trim();
        let starts = lead == indent || (body.starts_with('-') && lead <= indent + 4);
        if starts && !body.is_empty() {
            let (head, text) = body.split_once("  ").unwrap_or((body, ""));
            out.push((head.trim().to_string(), text.trim().to_string()));
        } else if lead > indent
            && let Some(last) = out.last_mut()
        {
            last.1.push(' ');
            last.1.push_str(body);
        }
    }
    out
}

/// The options an entry's head names ("-c, --config FILE" → -c, --config).
fn option_names(head: &str) -> Vec<String> {
    head.split([' ', ','])
        .filter(|w| w.starts_with('-') && w.len() >= 2 && *w != "--")
        .map(String::from)
        .collect()
}

/// Option → the command it belongs to ("(run) sync once" → run; "" for
/// all commands), from the entries of an options list.
fn option_scopes(
    list: &[(String, String)],
    commands: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (head, text) in list {
        let scope = text
            .trim_start()
            .strip_prefix('(')
            .and_then(|t| t.split_once(')'))
            .map(|(c, _)| c.to_string())
            .filter(|c| commands.contains(c))
            .unwrap_or_default();
        for o in option_names(head) {
            out.insert(o, scope.clone());
        }
    }
    out
}

/// The keys a config error names as expected: "(expected a, b or c, with
/// d; e with f)" → {a, b, c, d, e, f}.
fn expected_keys(error: &str) -> BTreeSet<String> {
    let list = error
        .split_once("(expected ")
        .and_then(|(_, r)| r.rsplit_once(')'))
        .map(|(l, _)| l)
        .unwrap_or_else(|| panic!("no \"(expected ...)\" in {error:?}"));
    list.split(|c: char| !(c.is_ascii_lowercase() || c == '-'))
        .filter(|w| !w.is_empty() && !["or", "with"].contains(w))
        .map(String::from)
        .collect()
}

/// What the binary says the keys are at one level of the config: the
/// "unknown key" refusal of `config` (a JSON text with a key `bogus`).
fn daemon_keys(dir: &Path, config: &str) -> BTreeSet<String> {
    let path = dir.join("keys.json");
    fs::write(&path, config).unwrap();
    let f = run_cmd(
        Command::new(BIN)
            .args(["check", "--config-only", "-c"])
            .arg(&path),
        LIMIT,
    );
    assert_eq!(f.code(), Some(2), "{config}: {}", f.describe());
    assert!(f.stderr.contains("bogus: unknown key"), "{}", f.describe());
    expected_keys(&f.stderr)
}

/// What it proves: `--help` and cgtproxy(8) name the same commands, the
/// same options (each for the same command), the same usage, signals and
/// exit statuses; cgtproxy.json(5) documents exactly the config keys the
/// binary accepts, at the top, in `route` and in a rule. Every side is
/// read from its source: the help text and the binary's own refusals of an
/// unknown key on one side, the rendered pages on the other. How it can
/// fail: an option, command, key (`verdict-map` too) or exit status added
/// to or dropped from one side only; an option documented for another
/// command.
#[test]
fn help_agrees_with_the_man_page() {
    if !have("mandoc") {
        return;
    }
    let help = expect(run_cmd(Command::new(BIN).arg("--help"), LIMIT), 0, "--help");
    let page = render("man/cgtproxy.8");

    // Commands: the `commands:` block against the COMMANDS entries.
    let first_word = |h: &str| h.split_whitespace().next().unwrap_or_default().to_string();
    let help_commands: BTreeSet<String> = entries(help_block(&help, "commands"), 2)
        .iter()
        .map(|(h, _)| first_word(h))
        .collect();
    let page_commands: BTreeSet<String> = entries(section(&page, "COMMANDS"), 5)
        .iter()
        .map(|(h, _)| first_word(h))
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    assert!(
        help_commands.len() >= 4,
        "commands in --help: {help_commands:?}"
    );
    assert_eq!(help_commands, page_commands, "--help commands vs COMMANDS");

    // Options, each with the command it is for.
    let help_options = option_scopes(&entries(help_block(&help, "options"), 2), &help_commands);
    let page_options = option_scopes(&entries(section(&page, "OPTIONS"), 5), &page_commands);
    assert!(help_options.contains_key("--ready-fd"), "{help_options:?}");
    assert_eq!(
        help_options, page_options,
        "--help options vs OPTIONS (option → command)"
    );

    // The usage lines and the synopsis name the same things in the same order.
    let synopsis = section(&page, "SYNOPSIS");
    let usage = help.split("\n\n").next().unwrap();
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| c.is_whitespace() || "[]|".contains(c))
            .filter(|w| w.starts_with('-') || help_commands.contains(*w))
            .map(String::from)
            .collect()
    };
    assert!(words(usage).len() > 10, "usage: {usage}");
    assert_eq!(words(usage), words(synopsis), "--help usage vs SYNOPSIS");

    // Signals and exit statuses.
    let sigs = |s: &str| -> BTreeSet<String> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| w.len() > 3 && w.starts_with("SIG"))
            .map(String::from)
            .collect()
    };
    let help_sigs = sigs(help.split_once("signals:").expect("signals: in --help").1);
    assert!(help_sigs.len() >= 3, "{help_sigs:?}");
    let page_sigs = sigs(section(&page, "SIGNALS"));
    assert!(
        help_sigs.is_subset(&page_sigs),
        "--help signals {help_sigs:?}, SIGNALS {page_sigs:?}"
    );
    let help_exits: BTreeSet<String> = help
        .split_once("exit status:")
        .expect("exit status: in --help")
        .1
        .split(',')
        .filter_map(|p| p.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .map(String::from)
        .collect();
    let page_exits: BTreeSet<String> = entries(section(&page, "EXIT STATUS"), 5)
        .iter()
        .map(|(h, _)| first_word(h))
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert!(help_exits.len() >= 3, "{help_exits:?}");
    assert_eq!(help_exits, page_exits, "--help exit status vs EXIT STATUS");

    // The status JSON keys, readiness.
    for k in TOP_KEYS.iter().chain(&ELEMENT_KEYS) {
        assert!(page.contains(k), "status --json key {k} not in cgtproxy(8)");
    }
    for w in ["NOTIFY_SOCKET", "READY=1"] {
        assert!(page.contains(w), "{w} not in cgtproxy(8)");
    }

    // Config keys: the binary's, from its refusals, against KEYS.
    let dir = std::env::temp_dir().join(format!("cgtproxy-keys-{}", random_hex()));
    fs::create_dir(&dir).unwrap();
    let top = daemon_keys(&dir, r#"{"rules": [], "bogus": 1}"#);
    let route = daemon_keys(&dir, r#"{"route": {"bogus": 1}, "rules": []}"#);
    let rule = daemon_keys(
        &dir,
        r#"{"rules": [{"match": "/a", "target": "proxy", "bogus": 1}]}"#,
    );
    fs::remove_dir_all(&dir).unwrap();
    assert!(top.contains("verdict-map"), "{top:?}");
    let five = render("man/cgtproxy.json.5");
    let keys = entries(section(&five, "KEYS"), 5);
    let page_top: BTreeSet<String> = keys.iter().map(|(h, _)| first_word(h)).collect();
    assert_eq!(
        page_top, top,
        "cgtproxy.json(5) KEYS vs the keys cgtproxy accepts"
    );
    let text_of = |key: &str| -> String {
        keys.iter()
            .find(|(h, _)| first_word(h) == key)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    };
    // The keys of `route` are those its entry writes as JSON: "mark": ...
    let route_text = text_of("route");
    let pieces: Vec<&str> = route_text.split('"').collect();
    let page_route: BTreeSet<String> = (1..pieces.len())
        .step_by(2)
        .filter(|&i| pieces.get(i + 1).is_some_and(|p| p.starts_with(':')))
        .map(|i| pieces[i].to_string())
        .collect();
    assert_eq!(page_route, route, "the keys of route in cgtproxy.json(5)");
    // A rule's keys are the list below `rules` (13 columns in).
    let rules_block = section(&five, "KEYS")
        .split_once("\n     rules ")
        .expect("rules in KEYS")
        .1;
    let page_rule: BTreeSet<String> = entries(rules_block, 13)
        .iter()
        .map(|(h, _)| h.clone())
        .filter(|h| !h.contains(' '))
        .collect();
    assert_eq!(page_rule, rule, "the keys of a rule in cgtproxy.json(5)");
}

// ---------------------------------------------------------------------------
// Service files
// ---------------------------------------------------------------------------

// The service files, their inits and the install step: tests/init.rs
// (and tests/installed.rs under a real systemd).
