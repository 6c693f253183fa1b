//! The README's v2ray recipe, for real: Debian's v2ray (dokodemo-door with
//! `followRedirect` and `sockopt.tproxy`, one inbound per family, freedom
//! outbound with `sockopt.mark`) behind the shipped ruleset and the real
//! daemon; an app's TCP and UDP, IPv4 and IPv6, go through v2ray to a
//! server in another namespace. v2ray runs, as the recipe says, in a
//! cgroup a `direct` rule lists (first), with its outbound mark set; the
//! control shows what happens when it runs among the proxied apps.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// The mark the ruleset exempts (`CGTPROXY_PROXY_MARK` in nft/cgtproxy.nft).
const PROXY_MARK: u32 = 6666;

/// The recipe's configuration (README, "v2ray / xray"), with an access log.
fn v2ray_config(access_log: &Path) -> String {
    let inbound = |listen: &str, tag: &str| {
        format!(
            r#"{{ "tag": "{tag}", "listen": "{listen}", "port": {PROXY_PORT},
      "protocol": "dokodemo-door",
      "settings": {{ "network": "tcp,udp", "followRedirect": true }},
      "streamSettings": {{ "sockopt": {{ "tproxy": "tproxy" }} }},
      "sniffing": {{ "enabled": false }} }}"#
        )
    };
    format!(
        r#"{{
  "log": {{ "loglevel": "warning", "access": "{}" }},
  "inbounds": [
    {},
    {}
  ],
  "outbounds": [
    {{ "protocol": "freedom", "settings": {{ "domainStrategy": "AsIs" }},
      "streamSettings": {{ "sockopt": {{ "mark": {PROXY_MARK} }} }} }}
  ]
}}"#,
        access_log.display(),
        inbound("127.0.0.1", "tproxy4"),
        inbound("::1", "tproxy6"),
    )
}

struct V2ray {
    child: Child,
}

impl V2ray {
    /// Starts v2ray in cgroup `dir`; waits until both listeners are up.
    fn start(dir: &Path, config: &Path) -> V2ray {
        let child = Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$CG/cgroup.procs\" && exec v2ray -config \"$CONF\"",
            ])
            .env("CG", dir)
            .env("CONF", config)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn v2ray");
        let ok = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            let tcp = |f: &str| {
                std::fs::read_to_string(f).is_ok_and(|t| {
                    t.lines().skip(1).any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() > 3
                            && f[1].ends_with(&format!(":{:04X}", PROXY_PORT))
                            && f[3] == "0A"
                    })
                })
            };
            tcp("/proc/thread-self/net/tcp") && tcp("/proc/thread-self/net/tcp6")
        });
        assert!(
            ok,
            "v2ray did not listen on 127.0.0.1 and ::1 port {PROXY_PORT}"
        );
        V2ray { child }
    }
}

impl Drop for V2ray {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn v2ray_recipe_carries_tcp_and_udp_both_families() {
    if !need("v2ray", "-version") {
        return;
    }
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        // The apps are proxied; v2ray's own cgroup is listed direct.
        env.cg.mkdir(&["/apps/client", "/services/v2ray"]);
        let cfg = env.write_file(
            "cgtproxy.json",
            r#"{"rules": [
                {"match": "/services/v2ray", "target": "direct"},
                {"match": "/apps", "target": "proxy"}]}"#,
        );
        let mut daemon = Daemon::start(&env.run_args(&cfg));
        let apps = env.cg.id("/apps");
        assert!(wait_until(CONVERGE, Duration::from_millis(20), || {
            dump_map().get(&apps).is_some_and(|v| v == "goto proxy")
        }));
        let log = env.tmp.join("access.log");
        let conf = env.write_file("v2ray.json", &v2ray_config(&log));
        let v2ray = V2ray::start(&env.cg.path("/services/v2ray"), &conf);

        for (proto, dst) in [
            (Proto::Tcp, Remote::v4()),
            (Proto::Udp, Remote::v4()),
            (Proto::Tcp, Remote::v6()),
            (Proto::Udp, Remote::v6()),
        ] {
            let tag = env.token("v2ray");
            let r = exchange(&env.cg.path("/apps/client"), proto, dst, &tag);
            assert_eq!(
                r,
                Ok(format!("remote:{tag}")),
                "{proto:?} to {dst} through v2ray"
            );
            assert_eq!(
                remote.server.got(&tag).len(),
                1,
                "{proto:?} {dst}: at the server once"
            );
            // v2ray logged the connection to the original destination: it
            // went through v2ray, not around it.
            let net = match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let want = format!("accepted {net}:{dst}");
            assert!(
                wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
                    std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&want))
                }),
                "no {want:?} in v2ray's access log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        // Without v2ray, the proxied app has no way out: nothing reaches the
        // server (fail closed), and nothing loops.
        drop(v2ray);
        let tag = env.token("down");
        let r = exchange_within(
            &env.cg.path("/apps/client"),
            Proto::Tcp,
            Remote::v4(),
            &tag,
            Duration::from_secs(3),
        );
        assert!(r.is_err(), "with v2ray down: {r:?}");
        assert!(
            remote.server.got(&tag).is_empty(),
            "went direct with v2ray down"
        );
        assert!(daemon.running());
        daemon.stop();
    });
}

#[test]
fn v2ray_among_the_proxied_apps_never_reaches_out() {
    // The control: v2ray in the proxied cgroup, without its mark, captures
    // its own connections; nothing reaches the server (and check says why).
    if !need("v2ray", "-version") {
        return;
    }
    sandbox(|env| {
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
        let log = env.tmp.join("access.log");
        let text = v2ray_config(&log).replace(&format!(r#""mark": {PROXY_MARK}"#), r#""mark": 0"#);
        let conf = env.write_file("v2ray.json", &text);
        let _v2ray = V2ray::start(&env.cg.path("/apps/v2ray"), &conf);
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
        let f = run_cmd(
            Command::new(BIN)
                .arg("check")
                .arg("-c")
                .arg(&cfg)
                .arg("--cgroup-root")
                .arg(&env.cg.root),
            Duration::from_secs(20),
        );
        assert!(
            f.stdout
                .contains("v2ray, listening on port 7893) runs in cgroup /apps/v2ray"),
            "{}",
            f.describe()
        );
        assert!(daemon.running());
        daemon.stop();
    });
}
