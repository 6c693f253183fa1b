//! The Debian package under a real systemd, as a user installs it: the
//! `.deb` is built by `dpkg-buildpackage` from the Makefile's install step
//! and checked with lintian; a Debian 12 root file system (mmdebstrap,
//! cached as a tarball in /var/tmp between runs on one machine) boots under
//! `systemd-nspawn` with systemd as PID 1 in a private network namespace,
//! in a cgroup of the test's own; the package is installed with apt and
//! checked under that systemd: enable --now, the ruleset included from
//! /etc/nftables.conf (whose Debian default starts with `flush ruleset`),
//! the TPROXY port set in /etc/cgtproxy/cgtproxy.nft.d,
//! a reboot in which the unit starts after nftables.service and before
//! network-pre.target, `Type=notify` readiness, `systemctl reload` applying
//! a changed config, `systemctl restart` changing no element, the daemon
//! running as an unprivileged user with CAP_NET_ADMIN only, a real user
//! manager's `systemd-run --user --scope --slice=cgtproxy-proxy.slice`
//! whose TCP (IPv4 and IPv6) reaches a TPROXY listener while the same
//! connection from elsewhere does not, `cgtproxy exec` under that manager
//! and, as an ordinary user without capabilities, under the user's own
//! manager with the slice not there yet (exec asks the daemon, src/query.rs), `journalctl -u cgtproxy`, and
//! `apt remove`/`purge` leaving no table, rule or route, and only the
//! admin's own file in /etc/cgtproxy.
//! See /work/shared/notes/real-systemd.md for how the boot works here.

pub mod common;

use common::*;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
/// The TPROXY port, set in /etc/cgtproxy/cgtproxy.nft.d (not the default).
const PORT: u16 = 7894;
/// A fresh machine builds the release binary and the root file system.
const BUILD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The root file system: what systemd, a user manager, `kill` (procps, for
/// ExecReload) and the package's dependencies need. Change the cache's
/// name when this list changes.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,libpam-systemd,procps,nftables,iproute2";
const ROOTFS_CACHE: &str = "/var/tmp/cgtproxy-rootfs-bookworm-v1.tar";
const MIRRORS: [&str; 3] = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ok(f: Finished, what: &str) -> String {
    assert_eq!(f.code(), Some(0), "{what}: {}", f.describe());
    f.stdout
}

/// A directory removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the package from a copy of the checkout's files (tracked and
/// untracked, not ignored), as `make deb` does; returns the `.deb`.
fn build_deb(scratch: &Path) -> PathBuf {
    let src = scratch.join("src/cgtproxy");
    fs::create_dir_all(&src).unwrap();
    ok(
        run_cmd(
            Command::new("sh")
                .args([
                    "-c",
                    "git -C \"$1\" ls-files -z -co --exclude-standard | (cd \"$1\" && tar --null -cf - -T -) | tar -xf - -C \"$2\"",
                    "sh",
                ])
                .arg(manifest())
                .arg(&src),
            LIMIT,
        ),
        "copy the checkout",
    );
    ok(
        run_cmd(
            Command::new("dpkg-buildpackage")
                .args(["-b", "-us", "-uc", "-d"])
                .current_dir(&src)
                // Its own cargo output directory: `cargo test` holds the lock
                // of the default one while this runs.
                .env("CARGO_TARGET_DIR", manifest().join("target/installed-deb")),
            BUILD_LIMIT,
        ),
        "dpkg-buildpackage",
    );
    let version = env!("CARGO_PKG_VERSION");
    let deb = scratch.join(format!("src/cgtproxy_{version}-1_amd64.deb"));
    assert!(deb.exists(), "{} was not built", deb.display());
    deb
}

/// The cached root file system, built once per machine.
fn rootfs(dir: &Path) {
    let cache = Path::new(ROOTFS_CACHE);
    if !cache.exists() {
        let part = cache.with_extension("tar.part");
        let _ = fs::remove_file(&part);
        ok(
            run_cmd(
                Command::new("mmdebstrap")
                    .args(["--variant=apt", "--format=tar", "--quiet"])
                    .arg(format!("--include={INCLUDE}"))
                    .arg("bookworm")
                    .arg(&part)
                    .args(MIRRORS),
                BUILD_LIMIT,
            ),
            "mmdebstrap",
        );
        fs::rename(&part, cache).unwrap();
    }
    fs::create_dir_all(dir).unwrap();
    ok(
        run_cmd(
            Command::new("tar").arg("-xf").arg(cache).arg("-C").arg(dir),
            LIMIT,
        ),
        "unpack the root file system",
    );
}

/// A container booted with systemd as PID 1.
struct Container {
    nspawn: Child,
    /// Its systemd, as the host sees it.
    pid: i32,
    /// The cgroup nspawn runs in (the test's own).
    cgroup: PathBuf,
    log: PathBuf,
}

/// The processes below `pid`, depth first, with their comm.
fn descendants(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in kids
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                out.push((c, comm.trim().to_string()));
                stack.push(c);
            }
        }
    }
    out
}

impl Container {
    fn boot(env: &Env, rootfs: &Path, name: &str, boot: usize) -> Container {
        let rel = format!("/{name}-{boot}");
        env.cg.mkdir(&[&rel]);
        let cgroup = env.cg.path(&rel);
        let log = env.tmp.join(format!("nspawn-{boot}.log"));
        let out = fs::File::create(&log).unwrap();
        let nspawn = Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$CG/cgroup.procs\" && exec systemd-nspawn -D \"$1\" -b --private-network --register=no --keep-unit --console=read-only -M \"$2\"",
                "sh",
            ])
            .arg(rootfs)
            .arg(name)
            .env("CG", &cgroup)
            // Without it the container gets the hybrid layout and nft cannot
            // resolve cgroup paths inside it.
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("systemd-nspawn");
        let mut c = Container {
            pid: 0,
            nspawn,
            cgroup,
            log,
        };
        let root = nspawn_pid(&c);
        let found =
            wait_until(
                Duration::from_secs(30),
                Duration::from_millis(20),
                || match descendants(root)
                    .into_iter()
                    .find(|(_, comm)| comm == "systemd")
                {
                    Some((p, _)) => {
                        c.pid = p;
                        Path::new(&format!("/proc/{p}/root/run/systemd/private")).exists()
                    }
                    None => false,
                },
            );
        assert!(
            found,
            "the container's systemd did not come up\n{}",
            c.console()
        );
        let state = c.sh("systemctl is-system-running --wait");
        assert!(
            matches!(state.stdout.trim(), "running" | "degraded"),
            "system state: {}\n{}",
            state.describe(),
            c.diag()
        );
        c
    }

    /// `sh -c SCRIPT` in every namespace of the container.
    fn sh(&self, script: &str) -> Finished {
        run_cmd(
            Command::new("nsenter")
                .arg("-t")
                .arg(self.pid.to_string())
                .args([
                    "-a",
                    "env",
                    "DEBIAN_FRONTEND=noninteractive",
                    "sh",
                    "-c",
                    script,
                ]),
            Duration::from_secs(120),
        )
    }

    /// As [`sh`], asserting exit 0; returns stdout.
    fn ok(&self, script: &str) -> String {
        let f = self.sh(script);
        if f.code() != Some(0) {
            panic!(
                "in the container: {script}\n{}\n{}",
                f.describe(),
                self.diag()
            );
        }
        f.stdout
    }

    /// Waits until `script` exits 0.
    fn until(&self, what: &str, limit: Duration, script: &str) {
        if !wait_until(limit, Duration::from_millis(50), || {
            self.sh(script).code() == Some(0)
        }) {
            panic!("{what}: `{script}` never held\n{}", self.diag());
        }
    }

    fn console(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What to read when something failed.
    fn diag(&self) -> String {
        let f = self.sh(
            "systemctl --no-pager --failed; systemctl --no-pager status cgtproxy cgtproxy-ruleset nftables; journalctl -b --no-pager | tail -n 60; nft list ruleset",
        );
        format!("--- container ---\n{}{}", f.stdout, f.stderr)
    }

    /// `systemctl poweroff` and wait for nspawn to exit.
    fn poweroff(mut self) {
        let _ = self.sh("systemctl poweroff");
        let done = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            self.nspawn.try_wait().ok().flatten().is_some()
        });
        assert!(done, "poweroff did not finish\n{}", self.console());
    }
}

fn nspawn_pid(c: &Container) -> i32 {
    c.nspawn.id() as i32
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_none() {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
    }
}

/// `systemctl show -p PROP --value UNIT` as a number.
fn show_num(c: &Container, unit: &str, prop: &str) -> u64 {
    let v = c.ok(&format!("systemctl show -p {prop} --value {unit}"));
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{unit} {prop}: {v:?}"))
}

/// The elements of map `cgroups`, as `nft` prints them (paths relative to
/// the container's cgroup root).
fn elements(c: &Container) -> Vec<String> {
    let text = c.ok("nft list map inet cgtproxy cgroups");
    let Some(body) = text.split("elements = {").nth(1) else {
        return Vec::new();
    };
    let body = body.split('}').next().unwrap_or("");
    let mut out: Vec<String> = body
        .split(',')
        .filter_map(|e| e.split('"').nth(1).map(str::to_string))
        .collect();
    out.sort();
    out
}

fn phase(start: &mut Instant, what: &str) {
    eprintln!("installed: {what}: {:.1} s", start.elapsed().as_secs_f64());
    *start = Instant::now();
}

#[test]
fn debian_package_under_real_systemd() {
    for tool in [
        "mmdebstrap",
        "systemd-nspawn",
        "nsenter",
        "dpkg-buildpackage",
        "dh",
        "lintian",
        "git",
        "tar",
    ] {
        if !have(tool) {
            return;
        }
    }
    // Built here, before the sandbox: mmdebstrap (and cargo, should a crate
    // be missing from its cache) need the host's network, the sandbox has
    // only loopback.
    if gate().is_none() {
        return;
    }
    let total = Instant::now();
    let mut t = Instant::now();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("cgtproxy-installed-{}", random_hex())));
    fs::create_dir_all(&scratch.0).unwrap();

    // The package: built, and lintian-clean (the overrides say why).
    let deb = build_deb(&scratch.0);
    phase(&mut t, "dpkg-buildpackage");
    let lint = run_cmd(
        Command::new("lintian")
            .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
            .arg(&deb),
        Duration::from_secs(300),
    );
    let tags: Vec<&str> = lint
        .stdout
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        lint.code() == Some(0) && tags.is_empty(),
        "lintian: {}",
        lint.describe()
    );
    phase(&mut t, "lintian");

    let root = scratch.0.join("rootfs");
    rootfs(&root);
    fs::copy(&deb, root.join("root/cgtproxy.deb")).unwrap();
    phase(&mut t, "root file system");

    sandbox(move |env| {
        let _scratch = scratch;
        let mut t = t;
        // ---- Boot 1: install, enable, include the ruleset from nftables.conf.
        let name = format!("cgt{}", &random_hex()[..8]);
        let c = Container::boot(env, &root, &name, 1);
        phase(&mut t, "boot 1");
        c.ok("apt-get install -y -q /root/cgtproxy.deb");
        // The package enabled and started both units.
        c.ok("systemctl is-enabled cgtproxy.service cgtproxy-ruleset.service");
        c.ok("systemctl is-active cgtproxy.service");
        assert_eq!(
            c.ok("dpkg-query -W -f '${Conffiles}' cgtproxy")
                .split_whitespace()
                .next(),
            Some("/etc/cgtproxy/config.json"),
            "conffiles"
        );
        // A listed cgroup, so that there is something to refill.
        c.ok("mkdir /sys/fs/cgroup/cgtproxy-drop.slice");
        c.until(
            "the element of a new cgroup",
            CONVERGE,
            "nft list map inet cgtproxy cgroups | grep -q '\"cgtproxy-drop.slice\"'",
        );
        // The way Debian's firewall loads it: include it from
        // /etc/nftables.conf (which starts with `flush ruleset`), enable
        // nftables.service, and let the ruleset service go.
        let conf = c.ok("cat /etc/nftables.conf");
        assert!(conf.contains("\nflush ruleset\n"), "{conf}");
        // An admin's setting, in the directory the package ships for it:
        // the TPROXY port (the traffic below goes there).
        c.ok(&format!(
            "test -d /etc/cgtproxy/cgtproxy.nft.d && echo 'redefine CGTPROXY_PORT = {PORT}' > /etc/cgtproxy/cgtproxy.nft.d/local.nft"
        ));
        c.ok(
            "echo 'include \"/usr/share/cgtproxy/cgtproxy.nft\"' >> /etc/nftables.conf && systemctl disable cgtproxy-ruleset.service && systemctl enable --now nftables.service cgtproxy.service",
        );
        // The flush took the table away (nftables.conf's own table is
        // there now) and the include put it back empty; the daemon refills
        // it by itself.
        c.ok("nft list table inet filter >/dev/null");
        c.until(
            "the map refilled after nftables.service",
            CONVERGE,
            "nft list map inet cgtproxy cgroups | grep -q '\"cgtproxy-drop.slice\"'",
        );
        c.ok("systemctl is-active cgtproxy.service");
        c.poweroff();
        phase(&mut t, "install, enable, poweroff");

        // ---- Boot 2: the boot order, then everything else.
        let c = Container::boot(env, &root, &name, 2);
        phase(&mut t, "boot 2");
        c.ok("systemctl is-active cgtproxy.service nftables.service");
        assert_ne!(
            c.sh("systemctl is-active cgtproxy-ruleset.service")
                .stdout
                .trim(),
            "active",
            "cgtproxy-ruleset.service was disabled"
        );
        assert_eq!(show_num(&c, "cgtproxy", "NRestarts"), 0, "{}", c.diag());
        // After the ruleset was loaded, ready before the network.
        let nft_done = show_num(&c, "nftables", "ExecMainExitTimestampMonotonic");
        let started = show_num(&c, "cgtproxy", "ExecMainStartTimestampMonotonic");
        let ready = show_num(&c, "cgtproxy", "ActiveEnterTimestampMonotonic");
        let net_pre = show_num(&c, "network-pre.target", "ActiveEnterTimestampMonotonic");
        assert!(
            nft_done > 0 && nft_done <= started,
            "nftables {nft_done}, cgtproxy {started}"
        );
        assert!(
            ready > 0 && ready <= net_pre,
            "cgtproxy ready {ready}, network-pre {net_pre}"
        );
        c.ok("nft list table inet filter >/dev/null && nft list table inet cgtproxy >/dev/null");

        // Unprivileged, CAP_NET_ADMIN (bit 12) only.
        let status = c.ok("cat /proc/$(systemctl show -p MainPID --value cgtproxy)/status");
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        let uid = field("Uid:");
        assert!(
            uid.len() == 4 && uid.iter().all(|u| *u == uid[0] && *u != "0"),
            "{status}"
        );
        for k in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(k), ["0000000000001000"], "{k}\n{status}");
        }
        assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");

        // Type=notify: `systemctl start` returns once the initial sync has
        // committed, so a cgroup made while it was stopped has its element
        // the moment start returns.
        c.ok("systemctl stop cgtproxy && mkdir /sys/fs/cgroup/cgtproxy-drop.slice");
        c.ok(
            "systemctl start cgtproxy && nft list map inet cgtproxy cgroups | grep -q '\"cgtproxy-drop.slice\"'",
        );

        // reload applies a changed config.
        c.ok("mkdir /sys/fs/cgroup/reload.slice");
        c.ok(
            r#"sed -i 's|"rules": \[|"rules": [\n    { "match": "/reload\\\\.slice", "target": "drop" },|' /etc/cgtproxy/config.json && grep -q reload /etc/cgtproxy/config.json"#,
        );
        assert!(!elements(&c).contains(&"reload.slice".to_string()));
        c.ok("systemctl reload cgtproxy");
        c.until(
            "reload applied the new rule",
            CONVERGE,
            "nft list map inet cgtproxy cgroups | grep -q '\"reload.slice\"'",
        );

        // restart changes no element: watched on the kernel's own monitor.
        let before = elements(&c);
        let pid_before = c.ok("systemctl show -p MainPID --value cgtproxy");
        c.ok("setsid nft monitor elements > /root/monitor.log 2>&1 < /dev/null & echo $! > /root/monitor.pid; sleep 0.3");
        c.ok("systemctl restart cgtproxy");
        std::thread::sleep(Duration::from_millis(300));
        c.ok("kill $(cat /root/monitor.pid)");
        let monitor = c.ok("cat /root/monitor.log");
        assert!(
            !monitor.contains("delete element"),
            "restart deleted elements:\n{monitor}"
        );
        assert_eq!(elements(&c), before, "elements changed across restart");
        assert_ne!(
            c.ok("systemctl show -p MainPID --value cgtproxy"),
            pid_before,
            "no new process"
        );
        phase(&mut t, "notify, reload, restart");

        // A real user manager: systemd-run --user --scope in
        // cgtproxy-proxy.slice gets its element, and its traffic reaches the
        // TPROXY listener; the same connection from elsewhere does not.
        c.ok("systemctl start user@0.service");
        c.ok(
            "ip link add cgt0 type veth peer name cgt1 && ip addr add 198.18.0.1/15 dev cgt0 && ip -6 addr add 2001:db8::1/32 dev cgt0 nodad && ip link set cgt0 up && ip link set cgt1 up",
        );
        let netns = fs::File::open(format!("/proc/{}/ns/net", c.pid)).unwrap();
        let proxy = std::thread::spawn(move || {
            // SAFETY: setns(2) on this short-lived thread only.
            let r = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            Server::start(
                "proxy",
                &[
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT),
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PORT),
                ],
                true,
            )
        })
        .join()
        .expect("listener in the container's namespace");
        let script = |tag: &str| {
            format!(
                "exec 3<>/dev/tcp/198.18.1.2/9000 && echo {tag}-v4 >&3 && head -n 1 <&3 && exec 4<>/dev/tcp/2001:db8:1::2/9000 && echo {tag}-v6 >&4 && head -n 1 <&4"
            )
        };
        let out = c.ok(&format!(
            "XDG_RUNTIME_DIR=/run/user/0 timeout 20 systemd-run --user --scope --quiet --slice=cgtproxy-proxy.slice bash -c '{}'",
            script("scoped")
        ));
        assert_eq!(out, "proxy:scoped-v4\nproxy:scoped-v6\n", "{}", c.diag());
        for (tag, dst) in [
            ("scoped-v4", "198.18.1.2:9000"),
            ("scoped-v6", "[2001:db8:1::2]:9000"),
        ] {
            let got = proxy.got(tag);
            assert_eq!(got.len(), 1, "{tag}: {got:?}");
            assert_eq!(got[0].local.to_string(), dst, "{tag}: original destination");
        }
        let els = elements(&c);
        assert!(
            els.iter()
                .any(|e| e.starts_with("user.slice/user-0.slice/user@0.service/")
                    && e.ends_with("/cgtproxy-proxy.slice")),
            "{els:?}"
        );
        // cgtproxy exec under the user manager: systemd-run creates the
        // scope, cgtproxy waits in it for the slice's verdict, then the
        // command's first connections are proxied (both families).
        let out = c.ok(&format!(
            "XDG_RUNTIME_DIR=/run/user/0 timeout 20 cgtproxy exec -- bash -c '{} && grep ^0:: /proc/self/cgroup'",
            script("exec")
        ));
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("proxy:exec-v4"), "{out}\n{}", c.diag());
        assert_eq!(lines.next(), Some("proxy:exec-v6"), "{out}");
        let cg = lines.next().unwrap_or_default();
        assert!(
            cg.starts_with(
                "0::/user.slice/user-0.slice/user@0.service/cgtproxy.slice/cgtproxy-proxy.slice/"
            ) && cg.ends_with(".scope"),
            "exec ran in {cg}, not in a scope of cgtproxy-proxy.slice"
        );
        assert_eq!(proxy.got("exec-v4").len(), 1, "{:?}", proxy.events());
        // cgtproxy exec as an ordinary user (uid 1000, no capabilities)
        // under that user's own manager, with cgtproxy-proxy.slice not
        // there yet: systemd creates slice and scope, the daemon (its own
        // DynamicUser uid, CAP_NET_ADMIN) adds the slice's element, exec
        // cannot read the map and asks the daemon on its socket until the
        // element is there, and only then runs the command, whose first
        // connections are proxied.
        c.ok(
            // (pam_unix's account check wants the shadow entry too.)
            "grep -q '^u1000:' /etc/passwd || { echo 'u1000:x:1000:1000::/tmp:/bin/sh' >> /etc/passwd && echo 'u1000:x:1000:' >> /etc/group && echo 'u1000:*:19000:0:99999:7:::' >> /etc/shadow; }",
        );
        c.ok("systemctl start user@1000.service");
        c.until(
            "user 1000's manager",
            CONVERGE,
            "test -S /run/user/1000/systemd/private",
        );
        let slice = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice";
        c.ok(&format!("test ! -e {slice}"));
        let user = c.sh(&format!(
            "cd /tmp && setpriv --reuid 1000 --regid 1000 --clear-groups env XDG_RUNTIME_DIR=/run/user/1000 HOME=/tmp timeout 20 cgtproxy exec -- bash -c '{} && grep ^0:: /proc/self/cgroup && grep ^CapEff: /proc/self/status'",
            script("user")
        ));
        assert_eq!(user.code(), Some(0), "{}\n{}", user.describe(), c.diag());
        let mut lines = user.stdout.lines();
        assert_eq!(lines.next(), Some("proxy:user-v4"), "{}", user.describe());
        assert_eq!(lines.next(), Some("proxy:user-v6"), "{}", user.describe());
        let cg = lines.next().unwrap_or_default();
        assert!(
            cg.starts_with(
                "0::/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice/"
            ) && cg.ends_with(".scope"),
            "exec ran in {cg}"
        );
        assert_eq!(
            lines.next(),
            Some("CapEff:\t0000000000000000"),
            "{}",
            user.describe()
        );
        for tag in ["user-v4", "user-v6"] {
            assert_eq!(proxy.got(tag).len(), 1, "{tag}: {:?}", proxy.events());
        }
        c.ok(&format!("test -d {slice}"));
        let journal = c.ok("journalctl -u cgtproxy --no-pager -o cat");
        assert!(
            journal.contains("add /user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice"),
            "{journal}"
        );
        // Control: from the root shell's cgroup (unlisted) it goes direct,
        // to nobody.
        let direct = c.sh(&format!("timeout 3 bash -c '{}'", script("direct")));
        assert_ne!(direct.code(), Some(0), "{}", direct.describe());
        assert!(proxy.got("direct-v4").is_empty(), "{:?}", proxy.events());
        drop(proxy);

        let journal = c.ok("journalctl -u cgtproxy --no-pager -o cat");
        assert!(journal.contains("cgtproxy-proxy.slice"), "{journal}");
        phase(&mut t, "user manager, traffic, journal");

        // remove: no table, no rule, no route; purge: no conffile.
        c.ok("sed -i '/cgtproxy.nft/d' /etc/nftables.conf");
        c.ok("apt-get remove -y -q cgtproxy");
        let left = c.ok(
            "nft list tables; ip rule; ip -6 rule; ip route show table 9011; ip -6 route show table 9011; pgrep -x cgtproxy || true",
        );
        assert!(!left.contains("cgtproxy"), "after apt remove:\n{left}");
        assert!(!left.contains("9011"), "after apt remove:\n{left}");
        assert!(!left.contains("local default"), "after apt remove:\n{left}");
        c.ok("test -e /etc/cgtproxy/config.json");
        c.ok("apt-get purge -y -q cgtproxy");
        // dpkg deletes the conffile and the package's directories; the
        // admin's own file (and so its directory) stays.
        let left = c.ok("find /etc/cgtproxy | sort; dpkg-query -W cgtproxy 2>&1 || true");
        assert_eq!(
            left.lines().take(3).collect::<Vec<_>>(),
            [
                "/etc/cgtproxy",
                "/etc/cgtproxy/cgtproxy.nft.d",
                "/etc/cgtproxy/cgtproxy.nft.d/local.nft"
            ],
            "after apt purge:\n{left}"
        );
        assert!(
            left.contains("no packages found matching cgtproxy"),
            "after apt purge:\n{left}"
        );
        c.poweroff();
        phase(&mut t, "remove, purge, poweroff");
        eprintln!("installed: total {:.1} s", total.elapsed().as_secs_f64());
    });
}
