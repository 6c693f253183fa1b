//! Rules by app ID, unit and container, `cgtproxy apps`, `explain` by name,
//! and `cgtproxy exec`: real cgroups named as launchers and managers name
//! them on real systems, the shipped ruleset, the real binary, real traffic.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

/// `cgtproxy ARGS -c CONFIG --cgroup-root ROOT`.
fn cli(env: &Env, config: &Path, args: &[&str]) -> Finished {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("-c")
        .arg(config)
        .arg("--cgroup-root")
        .arg(&env.cg.root);
    run_cmd(&mut cmd, LIMIT)
}

fn expect(f: Finished, code: i32, what: &str) -> String {
    assert_eq!(f.code(), Some(code), "{what}: {}", f.describe());
    f.stdout
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
    e2e("rule_forms_select_real_trees", |env| {
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
    e2e("an_app_rule_proxies_its_traffic", |env| {
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
