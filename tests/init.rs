//! The service files and the install step: the shell of every OpenRC and
//! runit file parses; `openrc-run`'s functions, called in its order with
//! stubs, gate the start and the reload on the real `check --config-only`;
//! the OpenRC service, installed by `make install INIT=openrc` into a
//! Debian 12 root file system, runs under Debian's real OpenRC
//! (`rc-service` in a systemd-nspawn container) as the system user with
//! CAP_NET_ADMIN only, fills the map, refuses a bad config, respawns and
//! stops keeping the verdicts; the runit service runs the real daemon
//! under the real `runsv` as an unprivileged user with CAP_NET_ADMIN only,
//! and stops respawning on a bad config; the systemd units verify and keep `systemd-analyze security`
//! within 1.5; `make install DESTDIR=…` lays out exactly the paths that
//! cgtproxy(8) FILES and the README list. (tests/installed.rs boots the
//! Debian package under a real systemd.)

pub mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory that goes away with the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cgtproxy-{what}-{}", random_hex()));
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A service file with the binary under test where it names the installed
/// one (what `make install BINDIR=…` does).
fn with_bin(file: &str) -> String {
    fs::read_to_string(manifest().join(file))
        .unwrap()
        .replace("/usr/bin/cgtproxy", BIN)
}

// ---------------------------------------------------------------------------
// Shell
// ---------------------------------------------------------------------------

const SHELL_FILES: [&str; 6] = [
    "init/openrc/cgtproxy.initd",
    "init/openrc/cgtproxy.confd",
    "init/runit/cgtproxy/run",
    "init/runit/cgtproxy/finish",
    "init/runit/cgtproxy/log/run",
    "init/runit/cgtproxy/conf",
];

#[test]
fn service_scripts_parse_and_are_executable() {
    for f in SHELL_FILES {
        let r = run_cmd(Command::new("sh").arg("-n").arg(manifest().join(f)), LIMIT);
        assert!(r.status.success(), "sh -n {f}: {}", r.describe());
    }
    for f in [
        "init/openrc/cgtproxy.initd",
        "init/runit/cgtproxy/run",
        "init/runit/cgtproxy/finish",
        "init/runit/cgtproxy/log/run",
    ] {
        let mode = fs::metadata(manifest().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{f} is not executable");
    }
}

#[test]
fn example_config_is_the_built_in_default() {
    // /etc/cgtproxy/config.json as installed behaves as no file at all.
    let shipped = fs::read_to_string(manifest().join("init/config.json")).unwrap();
    assert_eq!(
        shipped.trim(),
        cgtproxy::config::EMBEDDED_DEFAULT.trim(),
        "init/config.json differs from config::EMBEDDED_DEFAULT"
    );
}

// ---------------------------------------------------------------------------
// OpenRC
// ---------------------------------------------------------------------------

/// What `openrc-run` does for `start` and then `reload`, in its order:
/// depend (for the dependency cache), start_pre, the supervisor's start,
/// then the `reload` function. Every OpenRC helper is a stub that logs its
/// call; `cgtproxy` is the binary under test.
const OPENRC_DRIVER: &str = r#"
log() { echo "$*" >> "$LOG"; }
need() { log "need $*"; }; want() { log "want $*"; }; after() { log "after $*"; }
before() { log "before $*"; }; use() { log "use $*"; }
ebegin() { log "ebegin $*"; }; eend() { log "eend $1"; return "$1"; }
eerror() { log "eerror $*"; }; checkpath() { log "checkpath $*"; }
supervise_daemon() { log "supervise-daemon $*"; }
. "$CONFD"
. "$INITD"
# dash takes no `-` in function names: the script's calls go to a stub
# command written by this shell (see STUBS).
log "user=$command_user caps=$capabilities nnp=${no_new_privs:-}"
log "respawn=$respawn_delay/$respawn_max/$respawn_period log=$output_log"
depend
if start_pre; then
	supervise-daemon "$RC_SVCNAME" --start --user "$command_user" \
		--capabilities "$capabilities" "$command" -- $command_args
else
	log "start_pre failed"
fi
if reload; then log "reload ok"; else log "reload failed"; fi
"#;

fn openrc(scratch: &Path, opts: &str) -> Vec<String> {
    let log = scratch.join(format!("openrc-{}.log", random_hex()));
    let stubs = scratch.join("stubs");
    let confd = scratch.join("confd");
    fs::write(
        &confd,
        fs::read_to_string(manifest().join("init/openrc/cgtproxy.confd"))
            .unwrap()
            .replace(
                "\nCGTPROXY_OPTS=\"\"\n",
                &format!("\nCGTPROXY_OPTS=\"{opts}\"\n"),
            ),
    )
    .unwrap();
    let initd = scratch.join("initd");
    fs::write(&initd, with_bin("init/openrc/cgtproxy.initd")).unwrap();
    let f = run_cmd(
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "mkdir -p \"$STUBS\" && printf '#!/bin/sh\\necho \"supervise-daemon $*\" >> \"$LOG\"\\n' > \"$STUBS/supervise-daemon\" && chmod +x \"$STUBS/supervise-daemon\" && PATH=\"$STUBS:$PATH\" || exit 9\n{OPENRC_DRIVER}"
                ),
            ])
            .env("RC_SVCNAME", "cgtproxy")
            .env("STUBS", &stubs)
            .env("LOG", &log)
            .env("CONFD", &confd)
            .env("INITD", &initd),
        LIMIT,
    );
    expect(f, 0, "openrc driver");
    fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn openrc_functions_run_in_order_and_checkconfig_gates_start_and_reload() {
    let scratch = Scratch::new("openrc");
    let good = scratch.0.join("good.json");
    fs::write(&good, cgtproxy::config::EMBEDDED_DEFAULT).unwrap();
    let calls = openrc(&scratch.0, &format!("-c {}", good.display()));
    let setpriv = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v setpriv"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(!setpriv.is_empty(), "setpriv (util-linux) is missing");
    let want = [
        "user= caps= nnp=".to_string(),
        "respawn=2/5/60 log=/var/log/cgtproxy.log".to_string(),
        "use localmount mountall".to_string(),
        "after localmount mountall".to_string(),
        "want firewall".to_string(),
        "after firewall".to_string(),
        "before net".to_string(),
        "use logger".to_string(),
        "checkpath -f -m 0640 -o cgtproxy:cgtproxy /var/log/cgtproxy.log".to_string(),
        format!(
            "supervise-daemon cgtproxy --start --user  --capabilities  {setpriv} -- --reuid=cgtproxy --regid=cgtproxy --clear-groups --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin --no-new-privs -- {BIN} run -c {}",
            good.display()
        ),
        "ebegin Reloading cgtproxy".to_string(),
        "supervise-daemon cgtproxy --signal HUP".to_string(),
        "eend 0".to_string(),
        "reload ok".to_string(),
    ];
    assert_eq!(calls, want, "openrc-run's calls, in order");

    // A config that does not load: start_pre (the real `check
    // --config-only`) stops the start, and reload sends no SIGHUP.
    let bad = scratch.0.join("bad.json");
    fs::write(
        &bad,
        "{ \"rules\": [ { \"match\": \"(\", \"target\": \"proxy\" } ] }",
    )
    .unwrap();
    let calls = openrc(&scratch.0, &format!("-c {}", bad.display()));
    let after_deps: Vec<&str> = calls[8..].iter().map(String::as_str).collect();
    assert_eq!(
        after_deps,
        [
            "eerror cgtproxy: the configuration does not load (see above)",
            "start_pre failed",
            "eerror cgtproxy: the configuration does not load (see above)",
            "reload failed",
        ],
        "{calls:?}"
    );
    // CGTPROXY_SYSLOG=yes: loggers instead of a file (OpenRC 0.51).
    let f = run_cmd(
        Command::new("sh")
            .args([
                "-c",
                "CGTPROXY_SYSLOG=yes; . \"$1\"; echo \"$output_logger|$error_logger|${output_log:-}\"",
                "sh",
            ])
            .arg(manifest().join("init/openrc/cgtproxy.initd")),
        LIMIT,
    );
    assert_eq!(
        expect(f, 0, "openrc syslog").trim(),
        "logger -t cgtproxy -p daemon.info|logger -t cgtproxy -p daemon.notice|"
    );
}

/// The Debian 12 root file system with OpenRC (and the sysvinit and
/// initscripts it runs on in Debian), cached as a tarball between runs on
/// one machine. Change the cache's name when this list changes.
const OPENRC_INCLUDE: &str = "sysvinit-core,initscripts,openrc,mount,nftables,procps,iproute2";
const OPENRC_ROOTFS_CACHE: &str = "/var/tmp/cgtproxy-rootfs-bookworm-openrc-v1.tar";
const MIRRORS: [&str; 3] = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

fn openrc_rootfs(dir: &Path) {
    let cache = Path::new(OPENRC_ROOTFS_CACHE);
    if !cache.exists() {
        let part = cache.with_extension("tar.part");
        let _ = fs::remove_file(&part);
        expect(
            run_cmd(
                Command::new("mmdebstrap")
                    .args(["--variant=apt", "--format=tar", "--quiet"])
                    .arg(format!("--include={OPENRC_INCLUDE}"))
                    .arg("bookworm")
                    .arg(&part)
                    .args(MIRRORS),
                Duration::from_secs(15 * 60),
            ),
            0,
            "mmdebstrap",
        );
        fs::rename(&part, cache).unwrap();
    }
    fs::create_dir_all(dir).unwrap();
    expect(
        run_cmd(
            Command::new("tar").arg("-xf").arg(cache).arg("-C").arg(dir),
            LIMIT,
        ),
        0,
        "unpack the root file system",
    );
}

/// What runs inside the container, as PID 2 of systemd-nspawn (no init of
/// its own: `openrc sysinit` sets up OpenRC's state the way a boot does,
/// and leaves what a container must not run to OpenRC's keywords). It
/// prints `@KEY VALUE` lines for the test to check, and the logs.
const OPENRC_SCRIPT: &str = r#"
say() { echo "@$*"; }
pid() { pgrep -x cgtproxy | head -n 1; }
status() { grep "^$2:" "/proc/$1/status" | cut -f2- | tr -d ' \t'; }
# The map's cgroup ids, sorted: nft prints ids for cgroups it cannot
# resolve, so hide cgroupfs from it (an empty tmpfs over /sys/fs/cgroup).
elements() { unshare -m sh -c 'mount -t tmpfs none /sys/fs/cgroup && nft list map inet cgtproxy cgroups' | tr -d '\n\t' | sed -n 's/.*elements = {\(.*\)}.*/\1/p' | tr ',' '\n' | awk '{print $1}' | sort -n | tr '\n' ' '; }
ids() { for d in "$@"; do stat -c %i "$CG/$d"; done | sort -n | tr '\n' ' '; }
# The packager's step (README): the system user.
useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin cgtproxy || exit 3
openrc sysinit >/dev/null 2>&1
nft -f /usr/share/cgtproxy/cgtproxy.nft || exit 4
CG=$(awk '$3 == "cgroup2" {print $2}' /proc/self/mounts | tail -n 1)
mkdir "$CG/cgtproxy-proxy.slice" "$CG/cgtproxy-drop.slice" || exit 5
rc-service cgtproxy start; say start $?
for i in $(seq 100); do grep -q ready /var/log/cgtproxy.log 2>/dev/null && break; sleep 0.1; done
P=$(pid); say pid "$P"
say user "$(ps -o user= -p "$P")"
for k in Uid Gid Groups CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs; do say "$k" "$(status "$P" $k)"; done
say elements "$(elements)"
say ids "$(ids cgtproxy-proxy.slice cgtproxy-drop.slice)"
# It follows cgroupfs.
mkdir "$CG/cgtproxy-direct.slice"
D=$(stat -c %i "$CG/cgtproxy-direct.slice")
for i in $(seq 50); do elements | grep -qw "$D" && break; sleep 0.1; done
say followed "$(elements)"
say allids "$(ids cgtproxy-proxy.slice cgtproxy-drop.slice cgtproxy-direct.slice)"
# A bad config: reload refuses it (checkconfig), the daemon stays.
cp /etc/cgtproxy/config.json /root/good.json
echo '{"rules": [{"match": "(", "target": "proxy"}]}' > /etc/cgtproxy/config.json
rc-service cgtproxy reload; say badreload $?
say samepid "$(pid)"
cp /root/good.json /etc/cgtproxy/config.json
rc-service cgtproxy reload; say reload $?
for i in $(seq 50); do grep -q "configuration reloaded" /var/log/cgtproxy.log && break; sleep 0.1; done
say reloaded "$(grep -c 'configuration reloaded' /var/log/cgtproxy.log)"
# A crash: supervise-daemon starts it again (respawn_delay 2 s).
kill -KILL "$P"
for i in $(seq 100); do N=$(pid); [ -n "$N" ] && [ "$N" != "$P" ] && break; sleep 0.1; done
N=$(pid); say respawned "$N"
say respawnedcaps "$(status "$N" CapEff) $(ps -o user= -p "$N")"
# stop: the daemon goes, the verdicts stay (contract: SIGTERM changes no verdict).
rc-service cgtproxy stop; say stop $?
sleep 0.5
say after "$(pid)"
say kept "$(elements)"
# A config that does not load: the start fails before the daemon runs.
echo '{"rules": [{"match": "(", "target": "proxy"}]}' > /etc/cgtproxy/config.json
rc-service cgtproxy start; say badstart $?
sleep 0.5
say badpid "$(pid)"
echo "--- /var/log/cgtproxy.log"; cat /var/log/cgtproxy.log
"#;

/// The shipped OpenRC service under Debian's real OpenRC (0.45, built
/// without libcap, so without `capabilities`): installed with `make install
/// INIT=openrc` into a Debian 12 root file system, started with the real
/// `rc-service` in a systemd-nspawn container (private network, a cgroup
/// namespace below the test's own cgroup): the daemon runs as the system
/// user `cgtproxy` with CAP_NET_ADMIN alone (effective, bounding, ambient;
/// no_new_privs), fills the map and follows cgroupfs; a bad config is
/// refused by reload (the daemon stays) and by start (it never runs);
/// supervise-daemon restarts it after SIGKILL, unprivileged again; stop
/// leaves the elements.
#[test]
fn openrc_runs_the_daemon_unprivileged_under_debians_real_openrc() {
    if !have("systemd-nspawn") || !have("mmdebstrap") || !have("make") {
        return;
    }
    // Outside the sandbox: mmdebstrap needs the host's network.
    let scratch = Scratch::new("openrc-root");
    let root = scratch.0.join("root");
    openrc_rootfs(&root);
    expect(
        make(&root, &["install", "INIT=openrc"]),
        0,
        "make install INIT=openrc",
    );
    // The binary under test is the host's build: it must run there.
    let f = run_cmd(
        Command::new("chroot")
            .arg(&root)
            .args(["/usr/bin/cgtproxy", "--version"]),
        LIMIT,
    );
    expect(
        f,
        0,
        "the host's cgtproxy in the Debian 12 root (same libc?)",
    );
    fs::write(root.join("root/openrc-test.sh"), OPENRC_SCRIPT).unwrap();
    sandbox(move |env| {
        let _scratch = scratch;
        env.cg.mkdir(&["/nspawn"]);
        let f = run_cmd(
            Command::new("sh")
                .args([
                    "-c",
                    "echo $$ > \"$CG/cgroup.procs\" && exec systemd-nspawn -q -D \"$1\" --private-network --register=no --keep-unit --as-pid2 -M \"$2\" sh /root/openrc-test.sh",
                    "sh",
                ])
                .arg(&root)
                .arg(format!("cgtproxy-openrc-{}", random_hex()))
                .env("CG", env.cg.path("/nspawn"))
                .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
                .stdin(Stdio::null()),
            Duration::from_secs(120),
        );
        let out = f.stdout.clone();
        let get = |k: &str| -> String {
            out.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("@{k} "))
                        .or_else(|| (l == format!("@{k}")).then_some(""))
                })
                .unwrap_or_else(|| panic!("no @{k} line\n{}", f.describe()))
                .trim()
                .to_string()
        };
        let all = f.describe();
        assert_eq!(get("start"), "0", "rc-service cgtproxy start\n{all}");
        let pid = get("pid");
        assert!(!pid.is_empty(), "no daemon running\n{all}");
        assert_eq!(get("user"), "cgtproxy", "{all}");
        let uid = get("Uid");
        assert!(
            !uid.starts_with('0')
                && uid
                    .split(|c: char| !c.is_ascii_digit())
                    .all(|u| u.is_empty() || u != "0"),
            "uid {uid}\n{all}"
        );
        assert_eq!(get("Groups"), "", "no supplementary groups\n{all}");
        // CAP_NET_ADMIN is bit 12.
        for k in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(get(k), "0000000000001000", "{k}\n{all}");
        }
        assert_eq!(get("NoNewPrivs"), "1", "{all}");
        let ids = get("ids");
        assert_eq!(ids.split(' ').count(), 2, "{all}");
        assert_eq!(
            get("elements"),
            ids,
            "the map filled from the built-in default\n{all}"
        );
        let all_ids = get("allids");
        assert_eq!(
            get("followed"),
            all_ids,
            "a cgroup made while it runs\n{all}"
        );
        assert_ne!(get("badreload"), "0", "reload with a bad config\n{all}");
        assert_eq!(
            get("samepid"),
            pid,
            "the daemon stays after a refused reload\n{all}"
        );
        assert_eq!(get("reload"), "0", "{all}");
        assert_eq!(get("reloaded"), "1", "one SIGHUP, one reload\n{all}");
        let again = get("respawned");
        assert!(
            !again.is_empty() && again != pid,
            "supervise-daemon restarts it\n{all}"
        );
        assert_eq!(get("respawnedcaps"), "0000000000001000 cgtproxy", "{all}");
        assert_eq!(get("stop"), "0", "{all}");
        assert_eq!(get("after"), "", "stopped\n{all}");
        assert_eq!(get("kept"), all_ids, "stop keeps the verdicts\n{all}");
        assert_ne!(get("badstart"), "0", "start with a bad config\n{all}");
        assert_eq!(get("badpid"), "", "no daemon with a bad config\n{all}");
        assert!(
            out.contains("the configuration does not load"),
            "checkconfig says why\n{all}"
        );
    });
}

// ---------------------------------------------------------------------------
// runit
// ---------------------------------------------------------------------------

/// `sv CMD DIR` (runit's control tool).
fn sv(cmd: &str, dir: &Path) -> Finished {
    run_cmd(Command::new("sv").arg(cmd).arg(dir), LIMIT)
}

/// The daemon's pid, from runsv's supervise/pid, once it is up.
fn supervised_pid(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join("supervise/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
}

fn status_field(pid: i32, key: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The shipped run script under the real runsv, as `nobody` (the system
/// user of a real install is created by the packager; nobody has no other
/// rights either): the daemon fills the map, holds CAP_NET_ADMIN and
/// nothing else, `sv hup` applies a changed config; a config that does not
/// load (exit 2) is started once and the service then stays down.
#[test]
fn runit_runs_the_daemon_unprivileged_and_stops_respawning_on_exit_2() {
    if !have("runsv") || !have("sv") || !have("setpriv") {
        return;
    }
    sandbox(|env| {
        // No ruleset loaded: the run script loads it.
        env.cg.mkdir(&["/p", "/q"]);
        let rules = Rules::new(&[("/p", "proxy")]);
        let config = env.write_config(&Config::new(&rules));
        let sv_dir = env.tmp.join("sv/cgtproxy");
        fs::create_dir_all(&sv_dir).unwrap();
        for f in ["run", "finish"] {
            fs::copy(
                manifest().join("init/runit/cgtproxy").join(f),
                sv_dir.join(f),
            )
            .unwrap();
        }
        let conf = fs::read_to_string(manifest().join("init/runit/cgtproxy/conf")).unwrap();
        assert!(conf.contains("\nRUN_AS=cgtproxy\n"), "{conf}");
        let conf = format!(
            "{conf}\nOPTS=\"-c {} --cgroup-root {}\"\nRULESET={}\nRUN_AS=nobody\nRUN_AS_GROUP=nogroup\n",
            config.display(),
            env.cg.root.display(),
            ruleset_path().display()
        );
        fs::write(sv_dir.join("conf"), conf).unwrap();
        let log_path = env.tmp.join("runsv.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut path = std::ffi::OsString::from(Path::new(BIN).parent().unwrap());
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let runsv = Command::new("runsv")
            .arg(&sv_dir)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("runsv");
        let runsv = Runsv {
            child: runsv,
            dir: sv_dir.clone(),
        };
        let log = || fs::read_to_string(&log_path).unwrap_or_default();

        let filled = wait_until(CONVERGE, Duration::from_millis(20), || {
            try_dump_map("cgtproxy", "cgroups").is_ok_and(|m| m == env.cg.truth(&rules))
        });
        assert!(filled, "under runsv: the map did not fill\n{}", log());
        let pid = supervised_pid(&sv_dir).expect("supervise/pid");
        assert_eq!(
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap()
                .trim(),
            "cgtproxy"
        );
        // uid and gid nobody (real, effective, saved, fs); CAP_NET_ADMIN
        // (bit 12) and nothing else, in every set; no way back.
        for (key, want) in [
            ("Uid:", "65534\t65534\t65534\t65534"),
            ("Gid:", "65534\t65534\t65534\t65534"),
            ("Groups:", ""),
            ("CapInh:", "0000000000001000"),
            ("CapPrm:", "0000000000001000"),
            ("CapEff:", "0000000000001000"),
            ("CapBnd:", "0000000000001000"),
            ("CapAmb:", "0000000000001000"),
            ("NoNewPrivs:", "1"),
        ] {
            assert_eq!(
                status_field(pid, key),
                want,
                "{key} of the daemon\n{}",
                log()
            );
        }

        // `sv hup`: a changed config is applied.
        let rules2 = Rules::new(&[("/p", "proxy"), ("/q", "drop")]);
        fs::write(&config, Config::new(&rules2).to_json()).unwrap();
        expect(sv("hup", &sv_dir), 0, "sv hup");
        env.wait_map(&rules2);

        // A config that does not load: exit 2, finish takes the service
        // down; runsv would otherwise start ./run again every second.
        expect(sv("down", &sv_dir), 0, "sv down");
        assert!(
            wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                supervised_pid(&sv_dir).is_none()
            }),
            "the daemon did not stop\n{}",
            log()
        );
        fs::write(&config, "{ \"rules\": [ }").unwrap();
        let before = log().len();
        expect(sv("up", &sv_dir), 0, "sv up");
        let refused = "cgtproxy exited 2 (usage or configuration error): not restarting it";
        assert!(
            wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
                log()[before..].contains(refused)
            }),
            "finish did not see exit 2\n{}",
            log()
        );
        // Without finish's `sv down`, runsv starts ./run again a second
        // later: the status would say `run`.
        std::thread::sleep(Duration::from_secs(3));
        let status = sv("status", &sv_dir);
        let new = log()[before..].to_string();
        drop(runsv);
        assert!(
            status.stdout.starts_with("down: "),
            "{}\n{new}",
            status.describe()
        );
        let starts = new.matches(&format!("{}:1:", config.display())).count();
        assert_eq!(starts, 1, "started {starts} times:\n{new}");
    });
}

/// runsv and what it supervises, stopped however the test ends.
struct Runsv {
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for Runsv {
    fn drop(&mut self) {
        let _ = sv("exit", &self.dir);
        if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            if let Some(pid) = supervised_pid(&self.dir) {
                // SAFETY: kill(2) of the daemon our runsv started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

const UNITS: [&str; 2] = ["cgtproxy.service", "cgtproxy-ruleset.service"];

#[test]
fn systemd_units_verify_order_before_the_network_and_are_hardened() {
    let unit = fs::read_to_string(manifest().join("init/systemd/cgtproxy.service")).unwrap();
    let lines: BTreeSet<&str> = unit.lines().collect();
    for want in [
        "Type=notify",
        "ExecStartPre=/usr/bin/cgtproxy check --config-only -q",
        "ExecStart=/usr/bin/cgtproxy run",
        "ExecReload=kill -HUP $MAINPID",
        "DefaultDependencies=no",
        "Wants=network-pre.target",
        "Before=network-pre.target shutdown.target",
        "After=nftables.service cgtproxy-ruleset.service",
        "DynamicUser=yes",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_NETLINK AF_UNIX",
        "RestartPreventExitStatus=2",
    ] {
        assert!(
            lines.contains(want),
            "{want:?} missing from cgtproxy.service"
        );
    }
    // Pulling nftables.service in would run Debian's `flush ruleset` on a
    // host that never enabled it (Docker's and firewalld's rules gone).
    assert!(
        !unit
            .lines()
            .any(|l| l.starts_with("Wants=") && l.contains("nftables")),
        "cgtproxy.service must order after nftables.service, not want it"
    );
    let ruleset =
        fs::read_to_string(manifest().join("init/systemd/cgtproxy-ruleset.service")).unwrap();
    for want in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        "Before=network-pre.target shutdown.target cgtproxy.service",
        "After=local-fs.target nftables.service",
    ] {
        assert!(
            ruleset.lines().any(|l| l == want),
            "{want:?} missing from cgtproxy-ruleset.service"
        );
    }
    if !have("systemd-analyze") {
        return;
    }
    let scratch = Scratch::new("units");
    let mut paths = Vec::new();
    for u in UNITS {
        let p = scratch.0.join(u);
        fs::write(&p, with_bin(&format!("init/systemd/{u}"))).unwrap();
        paths.push(p);
    }
    let f = run_cmd(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&paths),
        LIMIT,
    );
    assert!(
        f.status.success() && f.stderr.trim().is_empty(),
        "systemd-analyze verify: {}",
        f.describe()
    );
    let f = run_cmd(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&paths[0]),
        LIMIT,
    );
    let out = format!("{}{}", f.stdout, f.stderr);
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cgtproxy.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(
        level <= 1.5,
        "systemd-analyze security: {level} > 1.5\n{out}"
    );
}

// ---------------------------------------------------------------------------
// make install
// ---------------------------------------------------------------------------

/// Every file and empty directory under `root`, as the absolute path it
/// would have installed, with its mode.
fn tree(root: &Path) -> Vec<(String, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32)>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let empty = m.is_dir() && fs::read_dir(&p).unwrap().next().is_none();
            if m.is_dir() && !empty {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap();
                out.push((
                    format!("/{}", rel.display()),
                    m.permissions().mode() & 0o7777,
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The paths cgtproxy(8) lists in FILES (`.It Pa A , B`), installed ones
/// only (not /proc).
fn man_files() -> BTreeSet<String> {
    let page = fs::read_to_string(manifest().join("man/cgtproxy.8")).unwrap();
    let files = page
        .split("\n.Sh FILES\n")
        .nth(1)
        .expect("cgtproxy(8) has a FILES section");
    let files = files.split("\n.Sh ").next().unwrap();
    let mut out = BTreeSet::new();
    for l in files.lines() {
        if let Some(rest) = l.strip_prefix(".It Pa ") {
            for p in rest.split(" , ") {
                let p = p.trim().trim_end_matches(" ,");
                if p.starts_with('/') && !p.starts_with("/proc/") {
                    out.insert(p.to_string());
                }
            }
        }
    }
    out
}

fn make(dest: &Path, args: &[&str]) -> Finished {
    run_cmd(
        Command::new("make")
            .arg("-C")
            .arg(manifest())
            .arg("--no-print-directory")
            .arg(format!("DESTDIR={}", dest.display()))
            .arg(format!("BIN={BIN}"))
            .args(args),
        LIMIT,
    )
}

#[test]
fn make_install_lays_out_the_documented_paths() {
    if !have("make") {
        return;
    }
    let scratch = Scratch::new("install");
    let dest = scratch.0.join("root");
    for init in ["systemd", "openrc", "runit"] {
        expect(
            make(&dest, &["install", &format!("INIT={init}")]),
            0,
            &format!("make install INIT={init}"),
        );
    }
    let installed = tree(&dest);
    let modes: std::collections::BTreeMap<&str, u32> =
        installed.iter().map(|(p, m)| (p.as_str(), *m)).collect();
    let want: std::collections::BTreeMap<&str, u32> = [
        ("/usr/bin/cgtproxy", 0o755),
        ("/usr/share/cgtproxy/cgtproxy.nft", 0o755),
        ("/usr/share/cgtproxy/cgtproxy-dns.nft", 0o755),
        ("/usr/share/cgtproxy/cgtproxy-forward.nft", 0o755),
        ("/usr/share/man/man8/cgtproxy.8", 0o644),
        ("/usr/share/man/man5/cgtproxy.json.5", 0o644),
        ("/etc/cgtproxy/config.json", 0o644),
        ("/etc/cgtproxy/cgtproxy.nft.d", 0o755),
        ("/etc/cgtproxy/cgtproxy-dns.nft.d", 0o755),
        ("/etc/cgtproxy/cgtproxy-forward.nft.d", 0o755),
        ("/usr/lib/systemd/system/cgtproxy.service", 0o644),
        ("/usr/lib/systemd/system/cgtproxy-ruleset.service", 0o644),
        ("/etc/init.d/cgtproxy", 0o755),
        ("/etc/conf.d/cgtproxy", 0o644),
        ("/etc/sv/cgtproxy/run", 0o755),
        ("/etc/sv/cgtproxy/finish", 0o755),
        ("/etc/sv/cgtproxy/log/run", 0o755),
        ("/etc/sv/cgtproxy/conf", 0o644),
    ]
    .into_iter()
    .collect();
    assert_eq!(modes, want, "make install's files and modes");

    // The man page's FILES section names exactly these (but itself), and
    // each was installed from the checkout.
    let documented = man_files();
    let files: BTreeSet<String> = modes
        .keys()
        .filter(|p| !p.starts_with("/usr/share/man/"))
        .map(|p| p.to_string())
        .collect();
    assert_eq!(documented, files, "cgtproxy(8) FILES vs make install");
    for (p, _) in &installed {
        if p.ends_with(".nft.d") {
            continue;
        }
        let text = fs::read(dest.join(&p[1..])).unwrap();
        assert!(!text.is_empty(), "{p} is empty");
    }
    assert_eq!(
        fs::read(dest.join("usr/share/cgtproxy/cgtproxy.nft")).unwrap(),
        fs::read(manifest().join("nft/cgtproxy.nft")).unwrap()
    );
    // Default paths: the service files go in as they are in init/.
    for (inst, src) in [
        (
            "usr/lib/systemd/system/cgtproxy.service",
            "init/systemd/cgtproxy.service",
        ),
        ("etc/init.d/cgtproxy", "init/openrc/cgtproxy.initd"),
        ("etc/sv/cgtproxy/run", "init/runit/cgtproxy/run"),
    ] {
        assert_eq!(
            fs::read_to_string(dest.join(inst)).unwrap(),
            fs::read_to_string(manifest().join(src)).unwrap(),
            "{inst}"
        );
    }
    // The README's Install section names every installed path.
    let readme = fs::read_to_string(manifest().join("README.md")).unwrap();
    let install = readme
        .split("\n## Install\n")
        .nth(1)
        .expect("README has an Install section")
        .split("\n## ")
        .next()
        .unwrap();
    for p in modes.keys() {
        assert!(install.contains(p), "README Install does not name {p}");
    }

    // A second install keeps the admin's settings.
    fs::write(dest.join("etc/cgtproxy/config.json"), "{\"rules\": []}\n").unwrap();
    expect(
        make(&dest, &["install", "INIT=openrc"]),
        0,
        "make install again",
    );
    assert_eq!(
        fs::read_to_string(dest.join("etc/cgtproxy/config.json")).unwrap(),
        "{\"rules\": []}\n"
    );

    // uninstall leaves only the admin's files.
    expect(make(&dest, &["uninstall"]), 0, "make uninstall");
    // (Empty standard directories such as /usr/bin may stay.)
    let left: Vec<String> = tree(&dest)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| dest.join(&p[1..]).is_file() || p.starts_with("/etc/cgtproxy/"))
        .collect();
    assert_eq!(
        left,
        [
            "/etc/cgtproxy/config.json",
            "/etc/conf.d/cgtproxy",
            "/etc/sv/cgtproxy/conf"
        ],
        "after make uninstall"
    );

    // Elsewhere: the service files name the installed binary and ruleset.
    let dest2 = scratch.0.join("local");
    expect(
        make(&dest2, &["install", "PREFIX=/usr/local", "INIT=systemd"]),
        0,
        "make install PREFIX=/usr/local",
    );
    let unit =
        fs::read_to_string(dest2.join("usr/local/lib/systemd/system/cgtproxy.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/cgtproxy run\n"),
        "{unit}"
    );
    let ruleset =
        fs::read_to_string(dest2.join("usr/local/lib/systemd/system/cgtproxy-ruleset.service"))
            .unwrap();
    assert!(
        ruleset.contains("nft -f /usr/local/share/cgtproxy/cgtproxy.nft"),
        "{ruleset}"
    );
}
