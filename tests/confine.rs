//! What a verdict confines (issue 12): a program that runs as an
//! unprivileged uid in a cgroup that uid owns can make a child cgroup that a
//! more permissive rule lists and move into it. Here the uid is real (the
//! processes run as uid 1000 through `setpriv`), the ownership is what
//! systemd's `Delegate=yes` makes (a chowned directory and cgroup.procs
//! below a root-owned slice), and where the traffic arrives is what counts:
//! with the shipped default rules the program's TCP and UDP (IPv4 and IPv6)
//! go out direct, and `check` and `explain` say so; with `"final": true` on
//! the proxy rule the daemon refuses the child its element and the same
//! traffic reaches the TPROXY listener; a root-owned cgroup refuses the
//! uid's `mkdir` outright, and a root-owned slice above keeps it from
//! moving out.

pub mod common;

use common::*;
use std::net::SocketAddr;
use std::os::unix::fs::chown;
use std::path::Path;
use std::thread;
use std::time::Duration;

/// The unprivileged user of these tests (no passwd entry needed).
const UID: u32 = 1000;

/// The proxied service as `Delegate=yes` lays it out: a root-owned slice
/// the rule lists, and the service's own cgroup owned by its user.
const SLICE: &str = "system.slice/cgtproxy-proxy.slice";
const SERVICE: &str = "system.slice/cgtproxy-proxy.slice/app.service";
/// What the program makes inside its own cgroup.
const ESCAPE: &str = "system.slice/cgtproxy-proxy.slice/app.service/cgtproxy-direct.slice";

fn rules_json(proxy_final: bool) -> String {
    let f = if proxy_final { ", \"final\": true" } else { "" };
    format!(
        r#"{{"rules": [
  {{"match": ".*/cgtproxy-proxy\\.slice", "target": "proxy"{f}}},
  {{"match": ".*/cgtproxy-drop\\.slice", "target": "drop"}},
  {{"match": ".*/cgtproxy-direct\\.slice", "target": "direct"}}
]}}"#
    )
}

/// chown the cgroup's directory and the files systemd delegates.
fn delegate(dir: &Path, uid: u32) {
    for f in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        let p = if f.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(f)
        };
        chown(&p, Some(uid), Some(uid)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    }
}

/// Runs `script` with bash as uid [`UID`] (no groups, no capabilities),
/// started by root in cgroup `start`. Returns the exit code and output.
fn as_user(start: &Path, script: &str, env: &[(&str, String)], limit: Duration) -> Finished {
    let mut cmd = std::process::Command::new("timeout");
    cmd.args(["-s", "KILL"])
        .arg(format!("{:.3}", limit.as_secs_f64()))
        .args([
            "bash",
            "-c",
            "echo $$ > \"$START/cgroup.procs\" || exit 20\nexec setpriv --reuid=\"$U\" --regid=\"$U\" --clear-groups --inh-caps=-all --bounding-set=-all -- bash -c \"$SCRIPT\"",
        ])
        .env("START", start)
        .env("U", UID.to_string())
        .env("SCRIPT", script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_cmd(&mut cmd, limit + Duration::from_secs(5))
}

/// As the user, from its service's cgroup: move itself into `sub` (a child
/// it owns; "" stays), connect to `dst`, send `msg`, print the one-line reply.
fn user_exchange(
    start: &Path,
    sub: &str,
    proto: Proto,
    dst: SocketAddr,
    msg: &str,
    limit: Duration,
) -> Result<String, String> {
    let script = r#"
[ "$(id -u)" = "$U" ] || exit 21
if [ -n "$SUB" ]; then echo $$ > "$START/$SUB/cgroup.procs" || exit 22; fi
exec 3<>"/dev/$PROTO/$HOST/$PORT" || exit 11
printf '%s\n' "$MSG" >&3 || exit 12
R=$(timeout 3 head -n 1 <&3) || exit 13
[ -n "$R" ] || exit 13
printf '%s\n' "$R"
"#;
    let f = as_user(
        start,
        script,
        &[
            ("SUB", sub.to_string()),
            ("PROTO", proto.name().to_string()),
            ("HOST", dst.ip().to_string()),
            ("PORT", dst.port().to_string()),
            ("MSG", msg.to_string()),
        ],
        limit,
    );
    if f.code() == Some(0) {
        Ok(f.stdout.trim_end().to_string())
    } else {
        Err(f.describe())
    }
}

enum Arrives {
    Proxy,
    Remote,
}

/// Sends a fresh token as the user from `sub` and asserts where it arrived
/// (and that the other server got nothing).
fn assert_arrives(
    env: &Env,
    proxy: &Server,
    remote: &Remote,
    sub: &str,
    want: Arrives,
    what: &str,
) {
    let start = env.cg.path(SERVICE);
    for proto in [Proto::Tcp, Proto::Udp] {
        for dst in [Remote::v4(), Remote::v6()] {
            let msg = env.token("user");
            let r = user_exchange(&start, sub, proto, dst, &msg, Duration::from_secs(6));
            let (tag, hit, miss) = match want {
                Arrives::Proxy => ("proxy", &proxy.got(&msg), &remote.server.got(&msg)),
                Arrives::Remote => ("remote", &remote.server.got(&msg), &proxy.got(&msg)),
            };
            assert_eq!(
                r,
                Ok(format!("{tag}:{msg}")),
                "{what}: {proto:?} to {dst} from {SERVICE}/{sub} as uid {UID}"
            );
            assert_eq!(hit.len(), 1, "{what}: {tag} events for {msg}: {hit:?}");
            assert!(
                miss.is_empty(),
                "{what}: {msg} also reached the other server"
            );
        }
    }
}

/// `cgtproxy CMD -c CFG --cgroup-root ROOT ARGS...`.
fn cli(env: &Env, cfg: &Path, cmd: &str, args: &[&str]) -> Finished {
    let root = env.cg.root.to_str().unwrap().to_string();
    let mut a = vec![cmd, "-c", cfg.to_str().unwrap(), "--cgroup-root", &root];
    a.extend_from_slice(args);
    run(BIN, &a)
}

#[test]
fn a_delegated_cgroup_under_proxy_can_go_direct_unless_the_rule_is_final() {
    sandbox(|env| {
        load_ruleset();
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&[SERVICE]);
        let service = env.cg.path(SERVICE);

        // Root-owned: the uid can neither make a child nor leave.
        let cfg = env.write_file("default.json", &rules_json(false));
        let mut args = env.run_args(&cfg);
        args.push("-v".into());
        let d = Daemon::start(&args);
        let slice = env.cg.id(SLICE);
        let want: MapDump = [(slice, "goto proxy".to_string())].into_iter().collect();
        env.wait_map_eq(|| want.clone(), "the proxy slice's element");
        let f = as_user(
            &service,
            "mkdir \"$START/cgtproxy-direct.slice\"",
            &[],
            Duration::from_secs(5),
        );
        assert_ne!(
            f.code(),
            Some(0),
            "mkdir in a root-owned cgroup as uid {UID}: {}",
            f.describe()
        );
        assert!(f.stderr.contains("Permission denied"), "{}", f.describe());
        let check = cli(env, &cfg, "check", &[]);
        assert!(
            !check.stdout.contains("more permissive verdict"),
            "root-owned: no override warning:\n{}",
            check.stdout
        );
        assert_arrives(
            env,
            &proxy,
            &remote,
            "",
            Arrives::Proxy,
            "root-owned service",
        );

        // Delegated (Delegate=yes): the uid makes cgtproxy-direct.slice in
        // its own cgroup, the default rules give it direct.
        delegate(&service, UID);
        let f = as_user(
            &service,
            "mkdir \"$START/cgtproxy-direct.slice\"",
            &[],
            Duration::from_secs(5),
        );
        assert_eq!(f.code(), Some(0), "mkdir as the owner: {}", f.describe());
        let escape = env.cg.id(ESCAPE);
        let mut with_escape = want.clone();
        with_escape.insert(escape, "goto direct".to_string());
        env.wait_map_eq(|| with_escape.clone(), "the nested direct element");
        assert_arrives(
            env,
            &proxy,
            &remote,
            "cgtproxy-direct.slice",
            Arrives::Remote,
            "default rules: the owner's nested direct",
        );
        // It cannot leave the proxied slice: its parent is root's.
        let f = as_user(
            &service,
            "echo $$ > \"$START/../../cgroup.procs\"",
            &[],
            Duration::from_secs(5),
        );
        assert_ne!(
            f.code(),
            Some(0),
            "moving out as uid {UID}: {}",
            f.describe()
        );
        // check and explain say what the owner can do, and what helps.
        let check = cli(env, &cfg, "check", &[]);
        let want_line = format!(
            "uid {UID} owns 1 cgroup that rules[0] \".*/cgtproxy-proxy\\\\.slice\" -> goto proxy decides (/{SERVICE}) and can give it a more permissive verdict (a cgroup it creates there that rules[2] lists gets goto direct): add \"final\": true to rules[0], or run it in a root-owned cgroup"
        );
        assert!(
            check.stdout.contains(&want_line),
            "check warns about the override:\n{}{}\nwanted: {want_line}",
            check.stdout,
            check.stderr
        );
        assert_eq!(check.code(), Some(0), "only warnings: {}", check.describe());
        assert_eq!(
            cli(env, &cfg, "check", &["--strict"]).code(),
            Some(1),
            "--strict fails on it"
        );
        assert!(
            !check.stdout.contains("delegated to uid"),
            "the slice above is root's: no escape warning:\n{}",
            check.stdout
        );
        let e = cli(env, &cfg, "explain", &[&format!("/{SERVICE}")]);
        assert!(
            e.stdout.contains(&format!(
                "override   uid {UID} owns /{SERVICE} and can give this subtree a more permissive verdict (a cgroup it creates there that rules[2] lists gets goto direct): add \"final\": true to rules[0], or run it in a root-owned cgroup"
            )),
            "explain warns:\n{}{}",
            e.stdout,
            e.stderr
        );
        drop(d.stop());

        // "final": true on the proxy rule: the same child gets no element
        // and its traffic is proxied; check has nothing to say.
        let cfg = env.write_file("final.json", &rules_json(true));
        let mut args = env.run_args(&cfg);
        args.push("-v".into());
        let d = Daemon::start(&args);
        env.wait_map_eq(
            || want.clone(),
            "the slice only: the nested direct is refused",
        );
        // Give a wrong add time to land, then look again.
        thread::sleep(Duration::from_millis(300));
        env.wait_map_eq(|| want.clone(), "the slice only, still");
        assert!(
            d.log().contains("has the final verdict goto proxy"),
            "{}",
            d.log()
        );
        // A fresh child made while it runs is refused too.
        let f = as_user(
            &service,
            "mkdir \"$START/x\" \"$START/x/cgtproxy-direct.slice\"",
            &[],
            Duration::from_secs(5),
        );
        assert_eq!(f.code(), Some(0), "{}", f.describe());
        thread::sleep(Duration::from_millis(300));
        env.wait_map_eq(|| want.clone(), "a new nested direct is refused");
        assert_arrives(
            env,
            &proxy,
            &remote,
            "cgtproxy-direct.slice",
            Arrives::Proxy,
            "final proxy: the owner's nested direct",
        );
        assert_arrives(
            env,
            &proxy,
            &remote,
            "x/cgtproxy-direct.slice",
            Arrives::Proxy,
            "final proxy: a nested direct made while it runs",
        );
        let check = cli(env, &cfg, "check", &[]);
        assert!(
            !check.stdout.contains("more permissive verdict"),
            "final: no override warning:\n{}",
            check.stdout
        );
        drop(d.stop());
    });
}

// ---------------------------------------------------------------------------
// The cgroup root (issue 12 item 6): errors say where to look instead.
// ---------------------------------------------------------------------------

/// A `--cgroup-root` that is no cgroup2 directory is a usage error (exit 2)
/// for every command that reads cgroupfs, and the message names the file it
/// looked for and the option; with `auto` and no cgroup2 mount visible (all
/// unmounted in a private mount namespace) the daemon fails (exit 1) with a
/// message that suggests `--cgroup-root`, and nothing reaches the map.
#[test]
fn cgroup_root_errors_name_the_place_and_suggest_the_option() {
    sandbox(|env| {
        load_ruleset();
        let cfg = env.write_file(
            "root.json",
            r#"{"route": false, "rules": [{"match": ".*", "target": "drop"}]}"#,
        );
        let bogus = env.tmp.join("not-cgroupfs");
        std::fs::create_dir_all(&bogus).unwrap();
        let want = format!(
            "cgroup root {b}: not a cgroup v2 directory ({b}/cgroup.procs: No such file or directory); name the right one with --cgroup-root",
            b = bogus.display()
        );
        for cmd in [
            &["run", "--once"][..],
            &["run", "--dry-run"],
            &["check"],
            &["status"],
            &["apps"],
            &["explain", "/"],
        ] {
            let mut a: Vec<&str> = cmd.to_vec();
            a.extend([
                "-c",
                cfg.to_str().unwrap(),
                "--cgroup-root",
                bogus.to_str().unwrap(),
            ]);
            let f = run(BIN, &a);
            assert_eq!(f.code(), Some(2), "{a:?}: {}", f.describe());
            assert!(
                f.stderr.contains(&want),
                "{a:?}: wanted {want:?}\n{}",
                f.describe()
            );
        }
        let f = run_cmd(
            std::process::Command::new("unshare")
                .args(["-m", "--propagation", "private", "bash", "-c"])
                .arg(
                    "set -e; for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts | sort -r); do umount -l \"$m\"; done; \
                     ! grep -q ' - cgroup2 ' /proc/self/mountinfo; exec \"$BIN\" run --once -c \"$CFG\"",
                )
                .env("BIN", BIN)
                .env("CFG", &cfg),
            Duration::from_secs(30),
        );
        assert_eq!(
            f.code(),
            Some(1),
            "auto without a cgroup2 mount: {}",
            f.describe()
        );
        assert!(
            f.stderr.contains(
                "no cgroup2 file system is visible in /proc/self/mountinfo; mount one, or name the directory with --cgroup-root (or \"cgroup-root\" in the config)"
            ),
            "{}",
            f.describe()
        );
        assert_eq!(dump_map(), MapDump::new(), "nothing reached the map");
    });
}

// ---------------------------------------------------------------------------
// Hostile names and trees in the inspect commands (issue 12 item 4)
// ---------------------------------------------------------------------------

/// A process in `cg` whose comm is `comm` (the name of a symlink to
/// sleep), for `secs` seconds.
fn sleeper(env: &Env, cg: &Path, comm: &str, secs: u32) -> std::process::Child {
    let link = env.tmp.join(comm);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1/cgroup.procs\" && exec \"$2\" \"$3\"",
            "sh",
        ])
        .arg(cg)
        .arg(&link)
        .arg(secs.to_string())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            std::fs::read_to_string(cg.join("cgroup.procs"))
                .is_ok_and(|p| p.lines().any(|l| l == pid))
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == comm)
        }),
        "sleeper {comm} in {}",
        cg.display()
    );
    child
}

/// Names a user picks (a unit with a raw ESC, an app ID whose systemd
/// escaping decodes to ESC, one with U+202E) and a process name with an
/// escape sequence: `apps`, `apps --json`, `explain PID`, `status` and
/// `check` print none of those characters, only their escaped forms.
#[test]
fn inspect_output_carries_no_control_or_bidi_characters() {
    sandbox(|env| {
        load_ruleset();
        let unit = "system.slice/a\u{1b}[2Jb.service";
        let app = "user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-ev\\x1b[31m\u{202e}il-7.scope";
        let listed = "system.slice/x\u{202e}y.slice/cgtproxy-drop.slice";
        env.cg.mkdir(&[unit, app, listed]);
        let comm = "ev\u{1b}[2Jl";
        let mut kids = vec![
            sleeper(env, &env.cg.path(unit), comm, 30),
            sleeper(env, &env.cg.path(app), "plain", 30),
            sleeper(env, &env.cg.path(listed), "p\u{202e}q", 30),
        ];
        let cfg = env.write_file("names.json", &rules_json(false));
        let mut args = env.run_args(&cfg);
        args.push("--once".into());
        let once = run_daemon_to_exit(&args, Duration::from_secs(20));
        assert_eq!(once.code(), Some(0), "{}", once.describe());
        let pid = kids[0].id().to_string();
        let outputs = [
            ("apps", cli(env, &cfg, "apps", &[])),
            ("apps --json", cli(env, &cfg, "apps", &["--json"])),
            ("explain PID", cli(env, &cfg, "explain", &[&pid])),
            (
                "explain PATH",
                cli(env, &cfg, "explain", &[&format!("/{listed}")]),
            ),
            (
                "explain a bad name",
                cli(env, &cfg, "explain", &["no\u{1b}[2Jsuch"]),
            ),
            ("status", cli(env, &cfg, "status", &[])),
            ("status --json", cli(env, &cfg, "status", &["--json"])),
            ("check", cli(env, &cfg, "check", &[])),
        ];
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        for (what, f) in &outputs {
            let text = format!("{}{}", f.stdout, f.stderr);
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{202e}'),
                "{what} printed a raw ESC or U+202E:\n{}",
                text.escape_debug()
            );
        }
        let apps = &outputs[0].1.stdout;
        for want in [
            "ev\\u{1b}[2Jl",
            "unit a\\u{1b}[2Jb.service",
            "app ev\\u{1b}[31m\\u{202e}il (gnome)",
        ] {
            assert!(apps.contains(want), "apps shows {want}:\n{apps}");
        }
        let json = &outputs[1].1.stdout;
        for want in [
            r#""process":"ev\u001b[2Jl""#,
            r#""name":"ev\u001b[31m\u202eil""#,
        ] {
            assert!(json.contains(want), "apps --json has {want}:\n{json}");
        }
        assert!(
            outputs[2]
                .1
                .stdout
                .contains(&format!("process {pid} (ev\\u{{1b}}[2Jl)")),
            "{}",
            outputs[2].1.stdout
        );
        assert!(
            outputs[6]
                .1
                .stdout
                .contains(r#"x\\u{202e}y.slice/cgtproxy-drop.slice""#),
            "status --json: the path in its match form:\n{}",
            outputs[6].1.stdout
        );
    });
}

/// A chain 300 deep (one-byte names) with processes in its 20 deepest
/// cgroups (found from /proc: the walk stops at the deepest looked-up
/// level): `apps` looks each one up from its ancestor at the deepest
/// looked-up level, so its stat calls (counted with strace: a count, not
/// a time) grow with the number of cgroups, not with cgroups times depth,
/// and its answer is the same.
#[test]
fn apps_cost_per_cgroup_stops_at_the_deepest_looked_up_level() {
    if !have("strace") {
        return;
    }
    sandbox(|env| {
        load_ruleset();
        const DEPTH: usize = 300;
        const POPULATED: usize = 20;
        let names: Vec<Vec<u8>> = (0..DEPTH).map(|_| b"a".to_vec()).collect();
        let (made, err) = mkdir_chain(&env.cg.root, &names);
        assert_eq!((made, err.map(|e| e.to_string())), (DEPTH, None));
        env.cg.mkdir(&["cgtproxy-proxy.slice"]);
        let mut kids = Vec::new();
        for d in DEPTH - POPULATED + 1..=DEPTH {
            let rel = "a/".repeat(d);
            kids.push(sleeper(env, &env.cg.path(&rel), "deep", 60));
        }
        let cfg = env.write_file("deep.json", &rules_json(false));
        let mut args = env.run_args(&cfg);
        args.push("--once".into());
        let once = run_daemon_to_exit(&args, Duration::from_secs(20));
        assert_eq!(once.code(), Some(0), "{}", once.describe());
        let trace = env.tmp.join("apps.strace");
        let root = env.cg.root.to_str().unwrap().to_string();
        let f = run_cmd(
            std::process::Command::new("strace")
                .args(["-f", "-qq", "-e", "trace=statx,newfstatat,stat,lstat", "-o"])
                .arg(&trace)
                .arg(BIN)
                .args(["apps", "-c", cfg.to_str().unwrap(), "--cgroup-root", &root]),
            Duration::from_secs(120),
        );
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        assert_eq!(f.code(), Some(0), "{}", f.describe());
        assert_eq!(
            f.stdout.matches(" deep ").count(),
            POPULATED,
            "every populated cgroup listed:\n{}",
            f.stdout
        );
        let stats = std::fs::read_to_string(&trace).unwrap().lines().count();
        // The walk stops at the deepest looked-up level (1 stat each; the
        // populated cgroups below come from /proc), then about 18 per
        // populated cgroup (its id, the lineage of its level-16 ancestor);
        // a lineage of the whole depth per populated cgroup costs 20 x 300.
        let bound = 3 * DEPTH + 40 * POPULATED;
        assert!(
            stats >= POPULATED,
            "strace counted {stats} stat calls: fewer than the populated cgroups ({POPULATED})"
        );
        assert!(
            stats < bound,
            "apps made {stats} stat calls for {DEPTH} cgroups, {POPULATED} populated (bound {bound})"
        );
    });
}
