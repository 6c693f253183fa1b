//! Rules by app ID, unit and container, `cgtproxy apps`, `explain` by name,
//! and `cgtproxy exec`: real cgroups named as launchers and managers name
//! them on real systems, the shipped ruleset, the real binary, real traffic.

pub mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

fn cli(env: &Env, config: &Path, args: &[&str]) -> Finished {
    env.cli(config, args, LIMIT)
}

const U1000: &str = "/user.slice/user-1000.slice/user@1000.service";
const U1001: &str = "/user.slice/user-1001.slice/user@1001.service";
const DOCKER: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
const PODMAN: &str = "9a8b7c6d5e4f30112233445566778899aabbccddeeff00112233445566778899";
const CRI: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A tree as systemd, GNOME, KDE, Flatpak, snapd, Docker, Podman and
/// containerd lay it out (names copied from real systems), with the verdict
/// each cgroup must get from `RULES` — written out by hand, not computed
/// by the daemon's matcher.
fn realistic_tree() -> Vec<(String, Option<&'static str>)> {
    let mut t: Vec<(String, Option<&'static str>)> = Vec::new();
    let mut add = |p: String, v: Option<&'static str>| t.push((p, v));
    // user 1000's manager
    add(format!("{U1000}/init.scope"), None);
    add(format!("{U1000}/app.slice"), None);
    let a = format!("{U1000}/app.slice");
    add(
        format!("{a}/app-gnome-org.telegram.desktop-4242.scope"),
        Some("goto proxy"),
    );
    add(
        format!("{a}/app-flatpak-org.telegram.desktop-12345.scope"),
        Some("goto proxy"),
    );
    // a service of the app, and a child cgroup of it (helpers, renderers)
    add(
        format!("{a}/app-org.telegram.desktop@0a1b2c3d4e5f.service"),
        Some("goto proxy"),
    );
    add(
        format!("{a}/app-org.telegram.desktop@0a1b2c3d4e5f.service/helper"),
        Some("goto proxy"),
    );
    // systemd escapes `-` in the ID
    add(
        format!("{a}/app-gnome-code\\x2doss-77.scope"),
        Some("goto proxy"),
    );
    // KDE Plasma
    add(
        format!("{a}/app-org.kde.konsole@9f8e7d6c5b4a.service"),
        Some("drop"),
    );
    add(format!("{a}/app-org.kde.dolphin-0a1b2c3d4e5f.scope"), None);
    // Snap
    add(
        format!("{a}/snap.firefox.firefox-8c2a3b94-3d3e-4c3f-9d8e-3b0f8a1c2d3e.scope"),
        Some("goto proxy"),
    );
    // systemd-run --user --scope, and a user service
    add(format!("{a}/run-p2001-i2002.scope"), None);
    add(format!("{U1000}/session.slice"), None);
    add(
        format!("{U1000}/session.slice/pipewire.service"),
        Some("goto direct"),
    );
    add("/user.slice/user-1000.slice/session-2.scope".into(), None);
    // user 1001: the user-limited rule does not reach it, the other does
    add(
        format!("{U1001}/app.slice/app-gnome-org.telegram.desktop-99.scope"),
        None,
    );
    add(
        format!("{U1001}/app.slice/app-gnome-code\\x2doss-78.scope"),
        Some("goto proxy"),
    );
    add(format!("{U1001}/session.slice/pipewire.service"), None);
    // system services, templates
    add("/system.slice/mihomo.service".into(), Some("goto direct"));
    add(
        "/system.slice/mihomo.service/sub".into(),
        Some("goto direct"),
    );
    add("/system.slice/xmihomo.service".into(), None);
    add("/system.slice/system-openvpn\\x2dclient.slice".into(), None);
    add(
        "/system.slice/system-openvpn\\x2dclient.slice/openvpn-client@work.service".into(),
        Some("goto direct"),
    );
    add(
        "/system.slice/system-getty.slice/getty@tty1.service".into(),
        None,
    );
    add(
        "/system.slice/snap.firefox.daemon.service".into(),
        Some("goto proxy"),
    );
    // containers
    add(format!("/system.slice/docker-{DOCKER}.scope"), Some("drop"));
    add(
        format!("/machine.slice/libpod-{PODMAN}.scope"),
        Some("goto proxy"),
    );
    add(
        format!("/machine.slice/libpod-{PODMAN}.scope/container"),
        Some("goto proxy"),
    );
    add(format!("/machine.slice/libpod-conmon-{PODMAN}.scope"), None);
    add(
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e.slice/cri-containerd-{CRI}.scope"
        ),
        Some("goto direct"),
    );
    t
}

fn rules_json() -> String {
    format!(
        r#"{{ "route": false, "rules": [
  {{ "app": "org.telegram.desktop", "user": 1000, "target": "proxy" }},
  {{ "app": "code-oss", "target": "proxy" }},
  {{ "app": "org.kde.konsole", "target": "drop" }},
  {{ "app": "firefox", "target": "proxy" }},
  {{ "unit": "mihomo.service", "target": "direct" }},
  {{ "unit": "openvpn-client@.service", "target": "direct" }},
  {{ "unit": "pipewire.service", "user": 1000, "target": "direct" }},
  {{ "container": "{}", "target": "drop" }},
  {{ "container": "{}", "target": "proxy" }},
  {{ "container": "{CRI}", "target": "direct" }},
  {{ "app": "org.example.NotInstalled", "target": "proxy" }}
]}}"#,
        &DOCKER[..12],
        PODMAN.to_uppercase()
    )
}

fn make_tree(env: &Env, tree: &[(String, Option<&str>)]) -> BTreeMap<u64, String> {
    let rels: Vec<&str> = tree.iter().map(|(p, _)| p.as_str()).collect();
    env.cg.mkdir(&rels);
    tree.iter()
        .filter_map(|(p, v)| v.map(|v| (env.cg.id(p), v.to_string())))
        .collect()
}

#[test]
fn rule_forms_select_real_trees() {
    sandbox(|env| {
        load_ruleset();
        let tree = realistic_tree();
        let expected = make_tree(env, &tree);
        let config = env.write_file("forms.json", &rules_json());
        let mut args = env.run_args(&config);
        args.push("--once".into());
        let f = run_daemon_to_exit(&args, LIMIT);
        assert_eq!(f.code(), Some(0), "{}", f.describe());
        let map = dump_map();
        let names: BTreeMap<u64, &str> = tree
            .iter()
            .map(|(p, _)| (env.cg.id(p), p.as_str()))
            .collect();
        let mut diff = String::new();
        for id in expected.keys().chain(map.keys()) {
            if expected.get(id) != map.get(id) {
                diff.push_str(&format!(
                    "  {}: expected {:?}, map has {:?}\n",
                    names.get(id).unwrap_or(&"?"),
                    expected.get(id),
                    map.get(id)
                ));
            }
        }
        assert!(diff.is_empty(), "map differs:\n{diff}");

        // apps names what runs there as users know it, with the verdict.
        let a = format!("{U1000}/app.slice");
        let running = [
            (
                format!("{a}/app-gnome-code\\x2doss-77.scope"),
                "app",
                "code-oss",
                Some("gnome"),
                Some("goto"),
            ),
            (
                format!("{a}/app-org.kde.konsole@9f8e7d6c5b4a.service"),
                "app",
                "org.kde.konsole",
                None,
                Some("drop"),
            ),
            (
                format!("{a}/app-org.kde.dolphin-0a1b2c3d4e5f.scope"),
                "app",
                "org.kde.dolphin",
                None,
                None,
            ),
            (
                format!("{a}/snap.firefox.firefox-8c2a3b94-3d3e-4c3f-9d8e-3b0f8a1c2d3e.scope"),
                "app",
                "snap.firefox.firefox",
                Some("snap"),
                Some("goto"),
            ),
            (
                format!("{a}/run-p2001-i2002.scope"),
                "unit",
                "run-p2001-i2002.scope",
                None,
                None,
            ),
            (
                "/system.slice/system-openvpn\\x2dclient.slice/openvpn-client@work.service"
                    .to_string(),
                "unit",
                "openvpn-client@work.service",
                None,
                Some("goto"),
            ),
            (
                format!("/machine.slice/libpod-{PODMAN}.scope/container"),
                "container",
                PODMAN,
                Some("podman"),
                Some("goto"),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e.slice/cri-containerd-{CRI}.scope"
                ),
                "container",
                CRI,
                Some("containerd"),
                Some("goto"),
            ),
        ];
        let _sleepers: Vec<Sleeper> = running
            .iter()
            .map(|(p, ..)| Sleeper::start(&env.cg.path(p)))
            .collect();
        let out = expect(cli(env, &config, &["apps", "-j"]), 0, "apps -j");
        let rows = parse_apps(out.trim_end(), false);
        assert_eq!(rows.len(), running.len(), "{out}");
        for (path, kind, name, launcher, verdict) in &running {
            let r = app_at(&rows, path);
            assert_eq!(
                (
                    r.s("kind").as_deref(),
                    r.s("name").as_deref(),
                    r.s("launcher").as_deref(),
                    r.s("verdict").as_deref()
                ),
                (Some(*kind), Some(*name), *launcher, *verdict),
                "{path}: {out}"
            );
        }

        // check: per rule, the live cgroups it decides; none is a warning.
        // Only warnings: check passes (contract §4); --strict fails.
        let out = expect(cli(env, &config, &["check"]), 0, "check");
        expect(
            cli(env, &config, &["check", "--strict"]),
            1,
            "check --strict",
        );
        for want in [
            "ok    rules[0] app \"org.telegram.desktop\" user 1000 -> goto proxy: 4 live cgroups",
            "ok    rules[1] app \"code-oss\" -> goto proxy: 2 live cgroups",
            "ok    rules[4] unit \"mihomo.service\" -> goto direct: 2 live cgroups",
            "ok    rules[7] container \"4f3c2b1a0e9d\" -> drop: 1 live cgroup",
            "WARN  rules[10] app \"org.example.NotInstalled\" -> goto proxy: 0 live cgroups: it selects no cgroup now",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    });
}

#[test]
fn an_app_rule_proxies_its_traffic() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let proxy = start_proxy();
        let remote = Remote::start();
        let scope = format!("{U1000}/app.slice/app-flatpak-org.telegram.desktop-777.scope");
        let other = format!("{U1000}/app.slice/app-gnome-org.gnome.Maps-778.scope");
        env.cg.mkdir(&[&scope, &other]);
        let config = env.write_file(
            "app.json",
            r#"{"route": false, "rules": [{"app": "org.telegram.desktop", "target": "proxy"}]}"#,
        );
        let mut daemon = Daemon::start(&env.run_args(&config));
        let id = env.cg.id(&scope);
        assert!(
            wait_until(CONVERGE, Duration::from_millis(20), || dump_map()
                .get(&id)
                .is_some_and(|v| v == "goto proxy")),
            "no element for the Flatpak scope: {:?}\n{}",
            dump_map(),
            daemon.log()
        );
        for (proto, dst) in [
            (Proto::Tcp, Remote::v4()),
            (Proto::Udp, Remote::v4()),
            (Proto::Tcp, Remote::v6()),
            (Proto::Udp, Remote::v6()),
        ] {
            let tag = env.token("tg");
            let r = exchange(&env.cg.path(&scope), proto, dst, &tag);
            assert_eq!(r, Ok(format!("proxy:{tag}")), "{proto:?} {dst}");
            assert!(
                !proxy.got(&tag).is_empty(),
                "{proto:?} {dst}: not at the proxy"
            );
            assert!(
                remote.server.got(&tag).is_empty(),
                "{proto:?} {dst}: went direct"
            );
            // Another app goes direct.
            let tag = env.token("maps");
            let r = exchange(&env.cg.path(&other), proto, dst, &tag);
            assert_eq!(r, Ok(format!("remote:{tag}")), "{proto:?} {dst}");
            assert!(
                proxy.got(&tag).is_empty(),
                "{proto:?} {dst}: Maps at the proxy"
            );
            assert!(
                !remote.server.got(&tag).is_empty(),
                "{proto:?} {dst}: Maps not direct"
            );
        }
        assert!(daemon.running());
        daemon.stop();
    });
}

/// A `sleep` moved into a cgroup before it runs; killed on drop.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start(dir: &Path) -> Sleeper {
        let child = Command::new("sh")
            .args(["-c", "echo $$ > \"$CG/cgroup.procs\" && exec sleep 1000"])
            .env("CG", dir)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleeper");
        let pid = child.id().to_string();
        let procs = dir.join("cgroup.procs");
        assert!(
            wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                std::fs::read_to_string(&procs).is_ok_and(|p| p.lines().any(|l| l == pid))
                    && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
            }),
            "sleeper did not get into {}",
            dir.display()
        );
        Sleeper(child)
    }

    fn pid(&self) -> u64 {
        u64::from(self.0.id())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One app of `apps --json`.
#[derive(Debug, Clone)]
struct AppRow {
    o: BTreeMap<String, miniserde::json::Value>,
}

const APP_KEYS: [&str; 18] = [
    "bytes",
    "cgroup",
    "chain",
    "decided_by",
    "id",
    "inherited",
    "kind",
    "launcher",
    "name",
    "packets",
    "pids",
    "processes",
    "process",
    "rule",
    "select",
    "user",
    "verdict",
    "",
];

impl AppRow {
    fn s(&self, k: &str) -> Option<String> {
        use miniserde::json::Value;
        match self.o.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) => None,
            other => panic!("{k}: not a string or null: {other:?}"),
        }
    }
    fn n(&self, k: &str) -> Option<u64> {
        use miniserde::json::{Number, Value};
        match self.o.get(k) {
            Some(Value::Number(Number::U64(n))) => Some(*n),
            Some(Value::Null) => None,
            other => panic!("{k}: not a number or null: {other:?}"),
        }
    }
    fn b(&self, k: &str) -> Option<bool> {
        use miniserde::json::Value;
        match self.o.get(k) {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::Null) => None,
            other => panic!("{k}: not a bool or null: {other:?}"),
        }
    }
    fn pids(&self) -> Vec<u64> {
        use miniserde::json::{Number, Value};
        match self.o.get("pids") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Number(Number::U64(n)) => *n,
                    _ => panic!("pid {v:?}"),
                })
                .collect(),
            other => panic!("pids: {other:?}"),
        }
    }
    fn select(&self) -> String {
        miniserde::json::to_string(self.o.get("select").expect("select"))
    }
}

/// Parses one `apps --json` line; checks the keys.
fn parse_apps(line: &str, rates: bool) -> Vec<AppRow> {
    use miniserde::json::Value;
    let v: Value = miniserde::json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    let Value::Object(top) = v else {
        panic!("not an object: {line}")
    };
    assert_eq!(
        top.keys().map(String::as_str).collect::<Vec<_>>(),
        ["apps", "error", "map", "table"],
        "{line}"
    );
    let Some(Value::Array(apps)) = top.get("apps") else {
        panic!("apps: {line}")
    };
    let mut keys: Vec<&str> = APP_KEYS.iter().copied().filter(|k| !k.is_empty()).collect();
    if rates {
        keys.extend(["bytes_per_s", "packets_per_s"]);
    }
    keys.sort();
    apps.iter()
        .map(|a| {
            let Value::Object(o) = a else {
                panic!("app not an object: {line}")
            };
            let mut have: Vec<&str> = o.keys().map(String::as_str).collect();
            have.sort();
            assert_eq!(have, keys, "{line}");
            AppRow {
                o: o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }
        })
        .collect()
}

/// The row of cgroup `cgroup` (a raw path): `apps` shows paths in the
/// match form, where a backslash is written twice.
fn app_at<'a>(rows: &'a [AppRow], cgroup: &str) -> &'a AppRow {
    let shown = cgroup.replace('\\', "\\\\");
    rows.iter()
        .find(|r| r.s("cgroup").as_deref() == Some(shown.as_str()))
        .unwrap_or_else(|| panic!("no app row for {cgroup} in {rows:?}"))
}

const TG: &str = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.telegram.desktop-777.scope";
const RUN: &str = "/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice/run-p41-i42.scope";
const SLICE: &str =
    "/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice";

fn apps_config(env: &Env) -> std::path::PathBuf {
    env.write_file(
        "apps.json",
        &format!(
            r#"{{"route": false, "rules": [
  {{"app": "org.telegram.desktop", "target": "proxy"}},
  {{"unit": "mihomo.service", "target": "direct"}},
  {{"container": "{}", "target": "drop"}},
  {{"match": ".*/cgtproxy-proxy\\.slice", "target": "proxy"}}
]}}"#,
            &DOCKER[..12]
        ),
    )
}

#[test]
fn apps_lists_what_runs_with_verdicts_and_traffic() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let _proxy = start_proxy();
        let _remote = Remote::start();
        let docker = format!("/system.slice/docker-{DOCKER}.scope");
        env.cg.mkdir(&[
            TG,
            RUN,
            "/system.slice/mihomo.service",
            &docker,
            "/plain",
            "/empty.scope",
        ]);
        let config = apps_config(env);
        let mut daemon = Daemon::start(&env.run_args(&config));
        let sl = [
            Sleeper::start(&env.cg.path(TG)),
            Sleeper::start(&env.cg.path(RUN)),
            Sleeper::start(&env.cg.path("/system.slice/mihomo.service")),
            Sleeper::start(&env.cg.path(&docker)),
            Sleeper::start(&env.cg.path("/plain")),
        ];
        let tg_id = env.cg.id(TG);
        assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
            dump_map().contains_key(&tg_id)
        }));
        // Traffic from the Telegram scope and from the scope that inherits.
        for (cg, proto, dst) in [
            (TG, Proto::Tcp, Remote::v4()),
            (TG, Proto::Udp, Remote::v6()),
            (RUN, Proto::Tcp, Remote::v6()),
        ] {
            let tag = env.token("apps");
            assert_eq!(
                exchange(&env.cg.path(cg), proto, dst, &tag),
                Ok(format!("proxy:{tag}"))
            );
        }
        let out = expect(cli(env, &config, &["apps", "--json"]), 0, "apps --json");
        let rows = parse_apps(out.trim_end(), false);
        assert_eq!(rows.len(), 5, "only the cgroups with processes: {out}");

        let tg = app_at(&rows, TG);
        assert_eq!(tg.s("kind").as_deref(), Some("app"));
        assert_eq!(tg.s("name").as_deref(), Some("org.telegram.desktop"));
        assert_eq!(tg.s("launcher").as_deref(), Some("flatpak"));
        assert_eq!(tg.n("user"), Some(1000));
        assert_eq!(tg.select(), r#"{"app":"org.telegram.desktop","user":1000}"#);
        assert_eq!(
            (tg.s("verdict").as_deref(), tg.s("chain").as_deref()),
            (Some("goto"), Some("proxy"))
        );
        assert_eq!(tg.s("decided_by").as_deref(), Some(TG));
        assert_eq!(tg.b("inherited"), Some(false));
        assert_eq!(tg.n("rule"), Some(0));
        assert_eq!(tg.n("id"), Some(tg_id));
        assert_eq!(tg.pids(), [sl[0].pid()]);
        assert_eq!(tg.s("process").as_deref(), Some("sleep"));
        assert!(tg.n("packets").unwrap() >= 2, "{out}");
        assert!(tg.n("bytes").unwrap() > 0, "{out}");

        let run = app_at(&rows, RUN);
        assert_eq!(run.s("kind").as_deref(), Some("unit"));
        assert_eq!(run.s("name").as_deref(), Some("run-p41-i42.scope"));
        assert_eq!(run.s("decided_by").as_deref(), Some(SLICE));
        assert_eq!(run.b("inherited"), Some(true));
        assert_eq!(run.n("rule"), Some(3));
        assert_eq!(run.s("chain").as_deref(), Some("proxy"));
        assert!(run.n("packets").unwrap() >= 1, "{out}");

        let m = app_at(&rows, "/system.slice/mihomo.service");
        assert_eq!(
            (m.s("kind").as_deref(), m.s("chain").as_deref()),
            (Some("unit"), Some("direct"))
        );
        assert_eq!(m.n("user"), None);
        let d = app_at(&rows, &docker);
        assert_eq!(d.s("kind").as_deref(), Some("container"));
        assert_eq!(d.s("name").as_deref(), Some(DOCKER));
        assert_eq!(d.s("launcher").as_deref(), Some("docker"));
        assert_eq!(d.s("verdict").as_deref(), Some("drop"));
        let p = app_at(&rows, "/plain");
        assert_eq!(p.s("kind").as_deref(), Some("cgroup"));
        assert_eq!(
            (p.s("verdict"), p.s("decided_by"), p.n("rule")),
            (None, None, None)
        );
        assert_eq!(p.n("packets"), None);

        // The table says the same, one line per row.
        let table = expect(cli(env, &config, &["apps"]), 0, "apps");
        let head: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            ["VERDICT", "BY", "PACKETS", "BYTES", "PROCESS", "NAME"]
        );
        let line = |suffix: &str| {
            table
                .lines()
                .find(|l| l.ends_with(suffix))
                .unwrap_or_else(|| panic!("no line ending {suffix:?}:\n{table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        let l = line("app org.telegram.desktop (flatpak) user 1000");
        assert_eq!(&l[..3], ["goto", "proxy", "rules[0]"], "{table}");
        assert_eq!(l[3], tg.n("packets").unwrap().to_string());
        assert_eq!(&l[5..7], [sl[0].pid().to_string().as_str(), "sleep"]);
        let l = line("unit run-p41-i42.scope user 1000");
        assert_eq!(
            &l[..5],
            ["goto", "proxy", "rules[3]", "on", SLICE],
            "{table}"
        );
        let l = line("cgroup /plain");
        assert_eq!(&l[..4], ["none", "-", "-", "-"], "{table}");

        // explain takes the app ID and the unit name.
        let out = expect(
            cli(env, &config, &["explain", "org.telegram.desktop"]),
            0,
            "explain app",
        );
        assert!(
            out.starts_with("org.telegram.desktop: cgroup 1 of 1\n"),
            "{out}"
        );
        assert!(out.contains(&format!("cgroup     {TG}\n")), "{out}");
        assert!(
            out.contains("verdict    goto proxy, from its own element"),
            "{out}"
        );
        assert!(
            out.contains("rules[0] app \"org.telegram.desktop\" -> goto proxy"),
            "{out}"
        );
        let out = expect(
            cli(env, &config, &["explain", "run-p41-i42.scope"]),
            0,
            "explain unit",
        );
        assert!(
            out.contains(&format!(
                "verdict    goto proxy, inherited from the element of {SLICE}"
            )),
            "{out}"
        );
        let f = cli(env, &config, &["explain", "org.example.Nothing"]);
        let out = expect(f, 1, "explain unknown app");
        assert!(
            out.contains("org.example.Nothing: no cgroup below"),
            "{out}"
        );
        assert!(daemon.running());
        drop(sl);
        daemon.stop();
    });
}

#[test]
fn apps_watch_shows_rates_and_stops_on_sigterm() {
    sandbox(|env| {
        use std::io::BufRead;
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let _proxy = start_proxy();
        let _remote = Remote::start();
        env.cg.mkdir(&[TG]);
        let config = apps_config(env);
        let daemon = Daemon::start(&env.run_args(&config));
        let _s = Sleeper::start(&env.cg.path(TG));
        let tg_id = env.cg.id(TG);
        assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
            dump_map().contains_key(&tg_id)
        }));
        let mut child = Command::new(BIN)
            .args(["apps", "--watch", "-j", "-c"])
            .arg(&config)
            .arg("--cgroup-root")
            .arg(&env.cg.root)
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn apps --watch");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a frame every second")
        };
        let first = parse_apps(&next(), true);
        assert_eq!(app_at(&first, TG).n("bytes_per_s"), Some(0));
        // Traffic while it watches: a later frame shows a rate.
        let mut seen = false;
        for _ in 0..6 {
            let tag = env.token("watch");
            assert_eq!(
                exchange(&env.cg.path(TG), Proto::Tcp, Remote::v4(), &tag),
                Ok(format!("proxy:{tag}"))
            );
            let rows = parse_apps(&next(), true);
            if app_at(&rows, TG).n("bytes_per_s").unwrap() > 0 {
                seen = true;
                break;
            }
        }
        assert!(seen, "no frame showed a rate");
        // SIGTERM ends it with status 0, promptly.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut status = None;
        wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let Some(status) = status else {
            let _ = child.kill();
            panic!("apps --watch did not stop on SIGTERM");
        };
        assert_eq!(status.code(), Some(0), "{status:?}");
        let _ = reader.join();
        daemon.stop();
    });
}

// ---------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------

/// The client `exec` runs: its first socket, at once; prints the reply
/// and the cgroup it ran in.
const FIRST_SOCKET: &str = r#"exec 3<>"/dev/tcp/$HOST/$PORT" || exit 11
printf '%s\n' "$MSG" >&3
R=$(timeout 3 head -n 1 <&3) || exit 13
printf '%s\n' "$R"
grep '^0::' /proc/self/cgroup
"#;

fn slices_config(env: &Env) -> std::path::PathBuf {
    // The embedded default's rules, plus route off (the test adds its own).
    env.write_file(
        "slices.json",
        r#"{"route": false, "rules": [
  {"match": ".*/cgtproxy-proxy\\.slice", "target": "proxy"},
  {"match": ".*/cgtproxy-drop\\.slice", "target": "drop"},
  {"match": ".*/cgtproxy-direct\\.slice", "target": "direct"}
]}"#,
    )
}

/// `cgtproxy exec ARGS` started from cgroup `from`, as `uid` when given.
fn exec_from(
    env: &Env,
    from: &str,
    uid: Option<u32>,
    config: &Path,
    args: &[&str],
    msg: &str,
) -> Finished {
    let mut cmd = Command::new("sh");
    let mut script = String::from("echo $$ > \"$CG/cgroup.procs\" || exit 10\nexec ");
    if let Some(u) = uid {
        script.push_str(&format!("setpriv --reuid {u} --regid {u} --clear-groups "));
    }
    script.push_str("\"$@\"");
    cmd.arg("-c")
        .arg(script)
        .arg("sh")
        .arg(BIN)
        .arg("exec")
        .arg("-c")
        .arg(config)
        .arg("--cgroup-root")
        .arg(&env.cg.root)
        .args(args)
        .args(["--", "timeout", "4", "bash", "-c", FIRST_SOCKET])
        .env("CG", env.cg.path(from))
        .env("CGTPROXY_EXEC", "cgroupfs")
        .env("HOST", REMOTE_V4.to_string())
        .env("PORT", REMOTE_PORT.to_string())
        .env("MSG", msg);
    run_cmd(&mut cmd, LIMIT)
}

#[test]
fn exec_as_root_applies_the_verdict_from_the_first_packet() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let proxy = start_proxy();
        let remote = Remote::start();
        env.cg.mkdir(&["/session"]);
        let config = slices_config(env);

        // No daemon: exec refuses to run the command without the element.
        let marker = env.tmp.join("ran");
        let f = run_cmd(
            Command::new("sh")
                .arg("-c")
                .arg("echo $$ > \"$CG/cgroup.procs\" && exec \"$@\"")
                .arg("sh")
                .arg(BIN)
                .args(["exec", "-c"])
                .arg(&config)
                .arg("--cgroup-root")
                .arg(&env.cg.root)
                .args(["--", "touch"])
                .arg(&marker)
                .env("CG", env.cg.path("/session"))
                .env("CGTPROXY_EXEC", "cgroupfs"),
            LIMIT,
        );
        assert_eq!(f.code(), Some(1), "{}", f.describe());
        assert!(
            f.stderr.contains("is `cgtproxy run` running"),
            "{}",
            f.describe()
        );
        assert!(!marker.exists(), "the command ran without its verdict");

        let mut daemon = Daemon::start(&env.run_args(&config));
        for (verdict, want) in [("proxy", "proxy"), ("direct", "remote"), ("drop", "")] {
            let msg = env.token(verdict);
            let f = exec_from(
                env,
                "/session",
                None,
                &config,
                &["--verdict", verdict],
                &msg,
            );
            if want.is_empty() {
                assert_ne!(f.code(), Some(0), "drop: {}", f.describe());
                assert!(proxy.got(&msg).is_empty() && remote.server.got(&msg).is_empty());
            } else {
                assert_eq!(f.code(), Some(0), "{verdict}: {}", f.describe());
                let mut lines = f.stdout.lines();
                assert_eq!(
                    lines.next(),
                    Some(format!("{want}:{msg}").as_str()),
                    "{verdict}: {}",
                    f.describe()
                );
                let cg = lines.next().unwrap_or_default();
                let slice = format!("/session/cgtproxy-{verdict}.slice/exec-");
                assert!(
                    cg.contains(&slice),
                    "{verdict}: ran in {cg}, not in {slice}PID"
                );
            }
        }
        // The slice got its element; the exec cgroups inherit it.
        let map = dump_map();
        assert_eq!(
            map.get(&env.cg.id("/session/cgtproxy-proxy.slice"))
                .map(String::as_str),
            Some("goto proxy")
        );
        // A verdict no rule lists, and one that is no word: exit 2.
        let f = exec_from(env, "/session", None, &config, &["--verdict", "mine"], "x");
        assert_eq!(f.code(), Some(2), "{}", f.describe());
        assert!(f.stderr.contains("cgtproxy-mine.slice"), "{}", f.describe());
        let f = exec_from(env, "/session", None, &config, &["--verdict", "a/b"], "x");
        assert_eq!(f.code(), Some(2), "{}", f.describe());
        assert!(daemon.running());
        daemon.stop();
    });
}

#[test]
fn exec_in_a_delegated_subtree_as_an_unprivileged_user() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let proxy = start_proxy();
        let remote = Remote::start();
        const NOBODY: u32 = 65534;
        env.cg.mkdir(&["/delegated", "/not-mine"]);
        // Delegation as systemd does it (Delegate=yes): the directory and
        // its cgroup.procs, cgroup.threads, cgroup.subtree_control.
        let d = env.cg.path("/delegated");
        for p in [
            d.clone(),
            d.join("cgroup.procs"),
            d.join("cgroup.threads"),
            d.join("cgroup.subtree_control"),
        ] {
            std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let config = slices_config(env);
        std::fs::set_permissions(
            &env.tmp,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut daemon = Daemon::start(&env.run_args(&config));
        let msg = env.token("nobody");
        let f = exec_from(env, "/delegated", Some(NOBODY), &config, &[], &msg);
        assert_eq!(f.code(), Some(0), "{}", f.describe());
        let mut lines = f.stdout.lines();
        assert_eq!(
            lines.next(),
            Some(format!("proxy:{msg}").as_str()),
            "{}",
            f.describe()
        );
        assert!(remote.server.got(&msg).is_empty());
        assert_eq!(proxy.got(&msg).len(), 1);
        assert!(
            lines
                .next()
                .unwrap_or_default()
                .contains("/delegated/cgtproxy-proxy.slice/exec-"),
            "{}",
            f.describe()
        );
        // It could not read the map: it asked the daemon (tests/exec.rs
        // proves that this wait is for the element, not a delay).
        let owner = std::fs::metadata(env.cg.path("/delegated/cgtproxy-proxy.slice")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), NOBODY);
        // explain and check say that this user can leave the verdict.
        let out = expect(
            cli(
                env,
                &config,
                &["explain", "/delegated/cgtproxy-proxy.slice"],
            ),
            0,
            "explain",
        );
        assert!(
            out.contains("escape     uid 65534 owns /delegated/cgroup.procs (a delegated subtree)"),
            "{out}"
        );
        let out = expect(cli(env, &config, &["check"]), 0, "check");
        assert!(
                out.contains("WARN  1 listed cgroup with a drop or proxy verdict is in a subtree delegated to uid 65534 (/delegated)"),
                "{out}"
            );

        // Without delegation: a clear refusal, nothing created.
        let f = exec_from(env, "/not-mine", Some(NOBODY), &config, &[], "x");
        assert_eq!(f.code(), Some(1), "{}", f.describe());
        assert!(
            f.stderr.contains("may not create a cgroup"),
            "{}",
            f.describe()
        );
        assert!(!env.cg.path("/not-mine/cgtproxy-proxy.slice").exists());
        assert!(daemon.running());
        daemon.stop();
    });
}

#[test]
fn verbose_logs_unlisted_and_inheriting_cgroups() {
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        let config = env.write_file(
            "v.json",
            r#"{"route": false, "rules": [{"match": "/p", "target": "proxy"}]}"#,
        );
        let mut args = env.run_args(&config);
        args.push("-v".into());
        let mut daemon = Daemon::start(&args);
        env.cg.mkdir(&["/p/child", "/other"]);
        let want = [
            "mkdir /p/child: no rule, inherits goto proxy from /p (rules[0])",
            "mkdir /other: no rule, no listed ancestor",
        ];
        let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
            let log = daemon.log();
            want.iter().all(|w| log.contains(w))
        });
        assert!(ok, "missing {want:?} in:\n{}", daemon.log());
        env.cg.rmdir("/other");
        assert!(
            wait_until(CONVERGE, Duration::from_millis(20), || daemon
                .log()
                .contains("rmdir /other: no rule")),
            "{}",
            daemon.log()
        );
        assert!(daemon.running());
        daemon.stop();
    });
}

#[test]
fn check_warns_about_a_one_family_listener_without_capabilities() {
    if !need("socat", "-V") {
        return;
    }
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        let config = env.write_file(
            "c.json",
            r#"{"route": false, "rules": [{"match": "/p", "target": "proxy"}]}"#,
        );
        // A proxy as an unprivileged user, on IPv4 TCP only.
        let mut socat = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "socat",
                "-u",
            ])
            .arg(format!("TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,reuseaddr"))
            .arg("OPEN:/dev/null")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn socat");
        let listening = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            std::fs::read_to_string("/proc/thread-self/net/tcp")
                .is_ok_and(|t| t.contains(&format!("0100007F:{PROXY_PORT:04X} 00000000:0000 0A")))
        });
        assert!(listening, "socat did not listen");
        let out = expect(cli(env, &config, &["check"]), 0, "check");
        let pid = socat.id();
        for want in [
            "WARN  nothing on port 7893 takes TCP IPv6 (::1), UDP IPv4 (127.0.0.1), UDP IPv6 (::1)"
                .to_string(),
            format!(
                "WARN  the proxy (pid {pid} socat, port 7893) has neither CAP_NET_ADMIN nor CAP_NET_RAW"
            ),
        ] {
            assert!(out.contains(&want), "missing {want:?} in:\n{out}");
        }
        let _ = socat.kill();
        let _ = socat.wait();
        // The harness's proxy: root, TCP and UDP on 127.0.0.1 and ::1.
        let _proxy = start_proxy();
        let out = expect(cli(env, &config, &["check"]), 0, "check");
        assert!(
            out.contains("ok    the listener on port 7893 takes TCP and UDP, IPv4 and IPv6"),
            "{out}"
        );
        assert!(
            out.contains("has CAP_NET_ADMIN or CAP_NET_RAW for IP_TRANSPARENT"),
            "{out}"
        );
    });
}

#[test]
fn apps_watch_redraws_with_ansi_on_a_terminal_only() {
    if !need("script", "--version") {
        return;
    }
    sandbox(|env| {
        load_ruleset();
        env.cg.mkdir(&[TG]);
        let config = apps_config(env);
        let _s = Sleeper::start(&env.cg.path(TG));
        let watch = format!(
            "timeout -s TERM 2.5 {BIN} apps --watch -c {} --cgroup-root {}",
            config.display(),
            env.cg.root.display()
        );
        // In a pipe: plain frames, no escape sequences.
        let f = run_cmd(Command::new("sh").args(["-c", &watch]), LIMIT);
        assert_eq!(f.code(), Some(124), "{}", f.describe());
        assert!(!f.stdout.contains('\x1b'), "ANSI in a pipe:\n{}", f.stdout);
        assert!(f.stdout.starts_with("--- 0s\nVERDICT"), "{}", f.stdout);
        assert!(
            f.stdout.matches("\n--- ").count() >= 1,
            "one frame only:\n{}",
            f.stdout
        );
        // On a terminal (script(1) gives it one): cleared once, then each
        // frame drawn from the top, lines cleared to their end.
        let f = run_cmd(
            Command::new("script").args(["-qec", &watch, "/dev/null"]),
            LIMIT,
        );
        let out = &f.stdout;
        assert_eq!(out.matches("\x1b[H\x1b[2J").count(), 1, "{out:?}");
        assert!(out.matches("\x1b[H").count() >= 2, "{out:?}");
        assert!(out.contains("\x1b[K") && out.contains("\x1b[J"), "{out:?}");
        assert!(!out.contains("--- 0s"), "{out:?}");
        assert!(
            out.contains("app org.telegram.desktop (flatpak) user 1000"),
            "{out:?}"
        );
    });
}
