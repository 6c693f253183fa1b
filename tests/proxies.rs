//! The README's recipes for the proxies people run, for real: Debian's
//! v2ray, and the upstream release binaries of sing-box and mihomo (see
//! tests/common/proxies.rs for where they come from), each started with
//! the configuration text of its README block (read from README.md, with
//! the few edits each test names), behind the shipped ruleset and the real
//! daemon.
//!
//! Each recipe test: an app's TCP and UDP, IPv4 and IPv6, go through the
//! proxy (its log names the original destination, once: its own outbound
//! connection did not come back to it) to a server in another namespace;
//! a `direct` app's go there without the proxy; `cgtproxy check` finds
//! nothing wrong with the running proxy; with the proxy stopped nothing of
//! the proxied app's reaches the server. The fake-IP recipes (mihomo's,
//! sing-box's second) also answer a proxied app's DNS query, hijacked by
//! nft/cgtproxy-dns.nft, with a fake address that then carries TCP and UDP
//! to the real server. Another test runs the proxies wrong on purpose and
//! reads `check`'s warnings; the control runs v2ray among the proxied apps.

pub mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The mark the ruleset knows as the proxy's (`CGTPROXY_PROXY_MARK`).
const PROXY_MARK: u32 = 6666;

/// The four kinds of traffic every recipe must carry.
const TRAFFIC: [(Proto, bool); 4] = [
    (Proto::Tcp, false),
    (Proto::Udp, false),
    (Proto::Tcp, true),
    (Proto::Udp, true),
];

fn server_addr(v6: bool) -> SocketAddr {
    if v6 { Remote::v6() } else { Remote::v4() }
}

/// The cgtproxy rules of the recipe tests: the proxy's own cgroup listed
/// `direct` first (as the recipes say), an app left direct, the apps
/// proxied.
const RULES: &str = r#"{"rules": [
    {"match": "/services", "target": "direct"},
    {"match": "/plain", "target": "direct"},
    {"match": "/apps", "target": "proxy"}]}"#;

/// mihomo's fake-IP range in the tests. Its default, 198.18.0.1/16, holds
/// the addresses the tests use (198.18.0.0/16, see tests/common/mod.rs):
/// mihomo would take the remote server's address for a fake one it never
/// handed out and refuse the connection.
const MIHOMO_FAKE_RANGE: &str = "198.19.0.1/16";

/// sing-box's fake ranges in the tests: IPv4 moved off the addresses the
/// tests use (as mihomo's), IPv6 the recipe's own.
const SING_BOX_FAKE_RANGE4: &str = "198.19.0.0/16";
const SING_BOX_FAKE_RANGE6: &str = "2001:2::/48";

/// The README's sing-box recipe with fake-IP DNS, with the tests' edits.
fn sing_box_dns_recipe(_: &Path) -> String {
    edited(
        &readme_block("sing-box with fake-IP DNS"),
        &[
            (
                r#""inet4_range": "198.18.0.0/15""#,
                &format!(r#""inet4_range": "{SING_BOX_FAKE_RANGE4}""#),
            ),
            (
                r#""server": "1.1.1.1""#,
                &format!(r#""server": "{REMOTE_V4}""#),
            ),
        ],
    )
}

/// The recipe as the README writes it, with the edits a test needs (each
/// `from` must be in it once).
fn recipe(kind: ProxyKind, dir: &Path) -> String {
    match kind {
        ProxyKind::V2ray => edited(
            &readme_block("**v2ray / xray**"),
            &[(
                "/var/log/v2ray/access.log",
                dir.join("access.log").to_str().unwrap(),
            )],
        ),
        ProxyKind::SingBox => readme_block("**sing-box**"),
        ProxyKind::Mihomo => edited(
            &readme_block("**mihomo**"),
            &[
                (
                    "  enhanced-mode: fake-ip\n",
                    &format!("  enhanced-mode: fake-ip\n  fake-ip-range: {MIHOMO_FAKE_RANGE}\n"),
                ),
                // The upstream of the tests, in the remote namespace.
                ("[https://1.1.1.1/dns-query]", &format!("[{REMOTE_V4}]")),
            ],
        ),
    }
}

/// How a test starts a proxy.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// As the recipe says; ready when it takes both families.
    Recipe,
    /// Ready when it takes IPv4 (a recipe broken on purpose).
    V4Only,
    /// Without CAP_NET_ADMIN and CAP_NET_RAW (the setpriv of util-linux),
    /// not waited for.
    NoCaps,
}

/// Starts the proxy from the configuration `text` in the cgroup `cg`,
/// with its files in `dir`.
fn start_proxy_from(
    kind: ProxyKind,
    bin: &Path,
    text: &str,
    cg: &Path,
    dir: &Path,
    how: Start,
) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join("proxy.log");
    let (file, args): (&str, Vec<String>) = match kind {
        ProxyKind::V2ray => ("config.json", vec!["-config".into()]),
        ProxyKind::SingBox => ("config.json", vec!["run".into(), "-c".into()]),
        ProxyKind::Mihomo => ("config.yaml", vec![]),
    };
    let conf = dir.join(file);
    std::fs::write(&conf, text).unwrap();
    let mut args = args;
    match kind {
        ProxyKind::Mihomo => args.extend(["-d".into(), dir.display().to_string()]),
        ProxyKind::SingBox => args.extend([
            conf.display().to_string(),
            "-D".into(),
            dir.display().to_string(),
        ]),
        ProxyKind::V2ray => args.push(conf.display().to_string()),
    }
    let (bin, args): (PathBuf, Vec<String>) = if how == Start::NoCaps {
        let mut a: Vec<String> = [
            "--inh-caps=-net_admin,-net_raw",
            "--bounding-set=-net_admin,-net_raw",
        ]
        .map(String::from)
        .to_vec();
        a.push(bin.display().to_string());
        a.extend(args);
        (PathBuf::from("setpriv"), a)
    } else {
        (bin.to_path_buf(), args)
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Proxy::spawn(kind, cg, &bin, &args, &log);
    match how {
        Start::Recipe => p.wait_listening(true),
        Start::V4Only => p.wait_listening(false),
        Start::NoCaps => {}
    }
    if kind == ProxyKind::V2ray {
        // v2ray writes connections to its access log, not to stderr.
        p.log = dir.join("access.log");
    }
    p
}

/// `cgtproxy check` of the running setup: its stdout.
fn check(env: &Env, cfg: &Path) -> String {
    let f = run_cmd(
        Command::new(BIN)
            .arg("check")
            .arg("-c")
            .arg(cfg)
            .arg("--cgroup-root")
            .arg(&env.cg.root),
        Duration::from_secs(30),
    );
    f.stdout + &f.stderr
}

/// The whole recipe test for one proxy (see the file's header).
/// The fake addresses a recipe's DNS hands out: (query type, range), each
/// range "ADDRESS/BITS".
type FakeRanges = &'static [(u16, &'static str)];

/// Whether `ip` is in `range` ("ADDRESS/BITS", same family).
fn in_range(ip: IpAddr, range: &str) -> bool {
    let (net, bits) = range.split_once('/').unwrap();
    let bits: u32 = bits.parse().unwrap();
    match (ip, net.parse::<IpAddr>().unwrap()) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

/// The whole recipe test for one proxy (see the file's header), with the
/// configuration `text`; `dns`: the recipe answers DNS with fake
/// addresses from these ranges, through nft/cgtproxy-dns.nft.
fn recipe_end_to_end(
    env: &mut Env,
    kind: ProxyKind,
    bin: PathBuf,
    text: fn(&Path) -> String,
    dns: Option<FakeRanges>,
) {
    load_ruleset();
    if dns.is_some() {
        run_ok(
            "nft",
            &[
                "-f",
                ruleset_path()
                    .with_file_name("cgtproxy-dns.nft")
                    .to_str()
                    .unwrap(),
            ],
        );
    }
    let remote = Remote::start();
    // The upstream resolver mihomo is given, and default routes as a real
    // machine has (a fake IP is routed like any address).
    let upstream = dns.map(|_| {
        run_ok("ip", &["route", "add", "default", "via", "198.18.0.2"]);
        run_ok(
            "ip",
            &["-6", "route", "add", "default", "via", "2001:db8::2"],
        );
        let addrs = [
            SocketAddr::new(REMOTE_V4.into(), 53),
            SocketAddr::new(REMOTE_V6.into(), 53),
        ];
        remote
            .ns
            .run(move || Upstream::start(&addrs, REMOTE_V4, REMOTE_V6))
    });
    let home = format!("/services/{}", kind.name());
    env.cg.mkdir(&["/apps/client", "/plain", &home]);
    let cfg = env.write_file("cgtproxy.json", RULES);
    let mut daemon = Daemon::start(&env.run_args(&cfg));
    let apps = env.cg.id("/apps");
    assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
        dump_map().get(&apps).is_some_and(|v| v == "goto proxy")
    }));
    let dir = env.tmp.join(kind.name());
    std::fs::create_dir_all(&dir).unwrap();
    let text = text(&dir);
    let proxy = start_proxy_from(kind, &bin, &text, &env.cg.path(&home), &dir, Start::Recipe);
    let version = kind.version(&bin);
    // The README says which versions its recipes were tested with.
    let number = version_number(&version).unwrap_or_else(|| panic!("no version in {version:?}"));
    let tested = format!("{} {number}", kind.name());
    assert!(
        readme_section("## Recipes for the proxies people run").contains(&tested),
        "README.md's recipes do not say they were tested with {tested:?} (this is {version}): run this test, then update the README"
    );
    // Listening is not ready: mihomo opens its listeners, then loads the
    // rest of its configuration, and closes what arrives meanwhile. Ready
    // is when one proxied connection got through.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            let tag = env.token("ready");
            exchange_within(
                &env.cg.path("/apps/client"),
                Proto::Tcp,
                Remote::v4(),
                &tag,
                QUICK,
            )
            .is_ok()
        }),
        "{version}: nothing got through within 10 s; log:\n{}",
        proxy.log_text()
    );

    for (proto, v6) in TRAFFIC {
        let dst = server_addr(v6);
        let before = proxy.connections(proto, dst);
        let tag = env.token("via");
        let r = exchange(&env.cg.path("/apps/client"), proto, dst, &tag);
        assert_eq!(
            r,
            Ok(format!("remote:{tag}")),
            "{version}: {proto:?} to {dst} through the proxy; log:\n{}",
            proxy.log_text()
        );
        assert_eq!(
            remote.server.got(&tag).len(),
            1,
            "{proto:?} {dst}: at the server once"
        );
        // The proxy logged the connection to the original destination: it
        // went through the proxy, not around it; and once: the proxy's own
        // connection to the server did not come back into it.
        assert!(
            wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
                proxy.connections(proto, dst) > before
            }),
            "{version}: no {proto:?} connection to {dst} in its log:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            proxy.connections(proto, dst),
            before + 1,
            "{version}: {proto:?} to {dst} handled more than once (a loop?); log:\n{}",
            proxy.log_text()
        );
    }

    // A `direct` app reaches the server without the proxy.
    for (proto, v6) in TRAFFIC {
        let dst = server_addr(v6);
        let before = proxy.connections(proto, dst);
        let tag = env.token("plain");
        let r = exchange(&env.cg.path("/plain"), proto, dst, &tag);
        assert_eq!(r, Ok(format!("remote:{tag}")), "direct {proto:?} to {dst}");
        assert_eq!(remote.server.got(&tag).len(), 1);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            proxy.connections(proto, dst),
            before,
            "{version}: the direct app's {proto:?} to {dst} went through the proxy; log:\n{}",
            proxy.log_text()
        );
    }

    // check finds the running proxy as the recipe makes it.
    let out = check(env, &cfg);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", proxy.pid())).unwrap();
    let comm = comm.trim_end();
    for want in [
        "ok    the listener on port 7893 takes TCP and UDP, IPv4 and IPv6".to_string(),
        format!(
            "ok    the proxy (pid {} {comm}, port 7893) has CAP_NET_ADMIN or CAP_NET_RAW for IP_TRANSPARENT",
            proxy.pid()
        ),
        format!(
            "ok    the proxy (pid {} {comm}, listening on port 7893) runs in cgroup {home}, which is not proxied",
            proxy.pid()
        ),
    ] {
        assert!(
            out.contains(&want),
            "{version}: check lacks {want:?}:\n{out}"
        );
    }

    if let (Some(upstream), Some(ranges)) = (&upstream, dns) {
        fake_ip_round_trip(env, &proxy, &remote, upstream, ranges);
    }

    // Without the proxy, the proxied app reaches nothing: fail closed.
    drop(proxy);
    let mut leaks = Vec::new();
    for (proto, v6) in TRAFFIC {
        let dst = server_addr(v6);
        let tag = env.token("down");
        let r = exchange_within(&env.cg.path("/apps/client"), proto, dst, &tag, QUICK);
        if r.is_ok() || !remote.server.got(&tag).is_empty() {
            leaks.push(format!("{proto:?} to {dst}: {r:?}"));
        }
    }
    assert_eq!(leaks, Vec::<String>::new(), "with {version} down");
    assert!(daemon.running());
    daemon.stop();
}

/// The fake-IP round trip. A proxied app's DNS query, sent to a resolver
/// that does not exist, is taken by nft/cgtproxy-dns.nft to the proxy's
/// resolver (127.0.0.1:53), which answers with an address from its fake
/// range; the app's TCP and UDP to that address go to the proxy, which
/// knows the name behind it, asks its upstream (in the remote namespace)
/// only then, and reaches the server there. For each query type of
/// `ranges`.
fn fake_ip_round_trip(
    env: &Env,
    proxy: &Proxy,
    remote: &Remote,
    upstream: &Upstream,
    ranges: FakeRanges,
) {
    let nowhere = SocketAddr::new(REMOTE_V4.into(), 53);
    let client = env.cg.path("/apps/client");
    for &(qtype, range) in ranges {
        let name = format!("{}.example", env.token("q").replace('_', "-"));
        let got = resolve(&client, nowhere, &name, qtype, Duration::from_secs(6));
        let fake = match got {
            Ok(a) if in_range(a, range) => a,
            other => panic!(
                "query type {qtype} for {name} from a proxied app: {other:?}, not an address of {range}; log:\n{}",
                proxy.log_text()
            ),
        };
        assert!(
            !upstream.asked().contains(&name),
            "the proxy asked its upstream for {name} before anyone connected (not fake-IP?)"
        );
        let dst = SocketAddr::new(fake, REMOTE_PORT);
        for proto in [Proto::Tcp, Proto::Udp] {
            let tag = env.token("fake");
            let r = exchange(&client, proto, dst, &tag);
            assert_eq!(
                r,
                Ok(format!("remote:{tag}")),
                "{proto:?} to {dst} ({name}); log:\n{}",
                proxy.log_text()
            );
            assert_eq!(remote.server.got(&tag).len(), 1);
            assert!(
                wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
                    proxy.by_name(proto, &name, REMOTE_PORT) > 0
                }),
                "no {proto:?} connection to {name}:{REMOTE_PORT} in the log:\n{}",
                proxy.log_text()
            );
        }
        assert!(
            upstream.asked().contains(&name),
            "the proxy reached the server without asking its upstream for {name}: {:?}",
            upstream.asked()
        );
    }
    // The recipes' resolvers listen on 127.0.0.1 only: a proxied app's
    // query over IPv6, hijacked to [::1]:53, is refused there, and does
    // not reach the real resolver it was sent to (the upstream listens on
    // that address too) by another way.
    let name = format!("{}.example", env.token("q6").replace('_', "-"));
    let sent_to = SocketAddr::new(REMOTE_V6.into(), 53);
    let r = resolve(&client, sent_to, &name, QTYPE_A, QUICK);
    assert!(r.is_err(), "query over IPv6 to {sent_to} answered: {r:?}");
    assert!(
        !upstream.asked().contains(&name),
        "a proxied app's query over IPv6 reached {sent_to}"
    );
}

#[test]
fn v2ray_recipe_end_to_end() {
    let Some(bin) = ProxyKind::V2ray.find() else {
        return;
    };
    sandbox(move |env| {
        recipe_end_to_end(
            env,
            ProxyKind::V2ray,
            bin,
            |d| recipe(ProxyKind::V2ray, d),
            None,
        )
    });
}

#[test]
fn sing_box_recipe_end_to_end() {
    let Some(bin) = ProxyKind::SingBox.find() else {
        return;
    };
    sandbox(move |env| {
        recipe_end_to_end(
            env,
            ProxyKind::SingBox,
            bin,
            |d| recipe(ProxyKind::SingBox, d),
            None,
        )
    });
}

#[test]
fn mihomo_recipe_end_to_end_with_dns() {
    let Some(bin) = ProxyKind::Mihomo.find() else {
        return;
    };
    sandbox(move |env| {
        recipe_end_to_end(
            env,
            ProxyKind::Mihomo,
            bin,
            |d| recipe(ProxyKind::Mihomo, d),
            Some(&[(QTYPE_A, MIHOMO_FAKE_RANGE)]),
        )
    });
}

#[test]
fn sing_box_recipe_with_fake_ip_dns_end_to_end() {
    let Some(bin) = ProxyKind::SingBox.find() else {
        return;
    };
    sandbox(move |env| {
        recipe_end_to_end(
            env,
            ProxyKind::SingBox,
            bin,
            sing_box_dns_recipe,
            Some(&[
                (QTYPE_A, SING_BOX_FAKE_RANGE4),
                (QTYPE_AAAA, SING_BOX_FAKE_RANGE6),
            ]),
        )
    });
}

#[test]
fn v2ray_among_the_proxied_apps_never_reaches_out() {
    // The control: v2ray in the proxied cgroup, without its mark, captures
    // its own connections; nothing reaches the server (and check says why).
    let Some(bin) = ProxyKind::V2ray.find() else {
        return;
    };
    sandbox(move |env| {
        load_ruleset();
        let remote = Remote::start();
        env.cg.mkdir(&["/apps/client", "/apps/v2ray"]);
        let cfg = env.write_file(
            "cgtproxy.json",
            r#"{"rules": [{"match": "/apps", "target": "proxy"}]}"#,
        );
        let mut daemon = Daemon::start(&env.run_args(&cfg));
        let apps = env.cg.id("/apps");
        assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
            dump_map().get(&apps).is_some_and(|v| v == "goto proxy")
        }));
        let dir = env.tmp.join("v2ray");
        std::fs::create_dir_all(&dir).unwrap();
        let text = edited(
            &recipe(ProxyKind::V2ray, &dir),
            &[(&format!(r#""mark": {PROXY_MARK}"#), r#""mark": 0"#)],
        );
        let _v2ray = start_proxy_from(
            ProxyKind::V2ray,
            &bin,
            &text,
            &env.cg.path("/apps/v2ray"),
            &dir,
            Start::Recipe,
        );
        let tag = env.token("loop");
        let r = exchange_within(
            &env.cg.path("/apps/client"),
            Proto::Tcp,
            Remote::v4(),
            &tag,
            Duration::from_secs(2),
        );
        assert!(
            remote.server.got(&tag).is_empty(),
            "reached the server from a proxied cgroup: {r:?}"
        );
        let out = check(env, &cfg);
        assert!(
            out.contains("v2ray, listening on port 7893) runs in cgroup /apps/v2ray"),
            "{out}"
        );
        assert!(daemon.running());
        daemon.stop();
    });
}

/// `cgtproxy check` against real proxies run from broken variants of
/// their recipes: each warning names what is wrong, and the apps' traffic
/// that the warning is about does not leave direct.
#[test]
fn check_warns_about_real_proxies_run_wrong() {
    let (Some(v2ray), Some(sing_box), Some(mihomo)) = (
        ProxyKind::V2ray.find(),
        ProxyKind::SingBox.find(),
        ProxyKind::Mihomo.find(),
    ) else {
        return;
    };
    sandbox(move |env| {
        load_ruleset();
        let remote = Remote::start();
        env.cg.mkdir(&["/apps/client", "/services"]);
        let cfg = env.write_file("cgtproxy.json", RULES);
        let mut daemon = Daemon::start(&env.run_args(&cfg));
        let apps = env.cg.id("/apps");
        assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
            dump_map().get(&apps).is_some_and(|v| v == "goto proxy")
        }));
        let services = env.cg.path("/services");
        let gets_nowhere = |proto: Proto, dst: SocketAddr, what: &str| {
            let tag = env.token("lost");
            let r = exchange_within(&env.cg.path("/apps/client"), proto, dst, &tag, QUICK);
            assert!(
                r.is_err() && remote.server.got(&tag).is_empty(),
                "{what}: {proto:?} to {dst}: {r:?}"
            );
        };
        let one_family = "WARN  nothing on port 7893 takes TCP IPv6 (::1), UDP IPv6 (::1)";

        // sing-box listening on 127.0.0.1 only: the apps lose IPv6.
        let dir = env.tmp.join("sing-box-v4");
        let text = edited(
            &recipe(ProxyKind::SingBox, &dir),
            &[(r#""listen": "::""#, r#""listen": "127.0.0.1""#)],
        );
        let p = start_proxy_from(
            ProxyKind::SingBox,
            &sing_box,
            &text,
            &services,
            &dir,
            Start::V4Only,
        );
        let out = check(env, &cfg);
        assert!(out.contains(one_family), "sing-box on 127.0.0.1:\n{out}");
        gets_nowhere(Proto::Tcp, Remote::v6(), "sing-box on 127.0.0.1");
        drop(p);

        // mihomo without `allow-lan`: it binds 127.0.0.1 only, as the
        // recipe's comment says.
        let dir = env.tmp.join("mihomo-v4");
        let text = edited(
            &recipe(ProxyKind::Mihomo, &dir),
            &[("allow-lan: true", "allow-lan: false")],
        );
        let p = start_proxy_from(
            ProxyKind::Mihomo,
            &mihomo,
            &text,
            &services,
            &dir,
            Start::V4Only,
        );
        let out = check(env, &cfg);
        assert!(out.contains(one_family), "mihomo without allow-lan:\n{out}");
        gets_nowhere(Proto::Udp, Remote::v6(), "mihomo without allow-lan");
        drop(p);

        // v2ray without CAP_NET_ADMIN: it listens, but without
        // IP_TRANSPARENT, so TPROXY finds no socket: a black hole.
        let dir = env.tmp.join("v2ray-nocaps");
        let text = recipe(ProxyKind::V2ray, &dir);
        let mut p = start_proxy_from(
            ProxyKind::V2ray,
            &v2ray,
            &text,
            &services,
            &dir,
            Start::NoCaps,
        );
        p.wait_listening(true);
        let out = check(env, &cfg);
        let want = format!(
            "WARN  the proxy (pid {} v2ray, port 7893) has neither CAP_NET_ADMIN nor CAP_NET_RAW",
            p.pid()
        );
        assert!(out.contains(&want), "v2ray without CAP_NET_ADMIN:\n{out}");
        for (proto, v6) in TRAFFIC {
            gets_nowhere(proto, server_addr(v6), "v2ray without CAP_NET_ADMIN");
        }
        drop(p);

        // mihomo without CAP_NET_ADMIN: its TPROXY listener fails to open
        // (it goes on without it), and check says nothing listens.
        let dir = env.tmp.join("mihomo-nocaps");
        let text = recipe(ProxyKind::Mihomo, &dir);
        let p = start_proxy_from(
            ProxyKind::Mihomo,
            &mihomo,
            &text,
            &services,
            &dir,
            Start::NoCaps,
        );
        p.wait_log("Start TProxy server error: operation not permitted");
        let out = check(env, &cfg);
        assert!(
            out.contains("WARN  nothing listens on port 7893 in this network namespace"),
            "mihomo without CAP_NET_ADMIN:\n{out}"
        );
        gets_nowhere(Proto::Tcp, Remote::v4(), "mihomo without CAP_NET_ADMIN");
        drop(p);

        assert!(daemon.running());
        daemon.stop();
    });
}
