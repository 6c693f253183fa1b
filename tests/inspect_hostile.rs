//! The read-only commands on a hostile tree (issue 12): a user's chain of
//! cgroups thousands deep costs `status`, `check`, `apps` and `explain` no
//! more than the cgroups above the deepest level the ruleset looks up,
//! because nothing below that level is ever looked up by the kernel and so
//! is never walked. Counted in syscalls (strace), not in time, and the
//! answers about the normal cgroups are the same as without the chains.

pub mod common;

use common::*;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A chain of one-byte names `name` below `top`, `depth` deep, removed
/// bottom-up on drop (also when the test fails). Its paths pass PATH_MAX,
/// so each parent is opened relative to a checkpoint fd kept every
/// `STRIDE` levels: few fds, and each relative path stays short.
struct Chain {
    top: PathBuf,
    name: u8,
    depth: usize,
}

const STRIDE: usize = 512;

impl Chain {
    fn build(top: &Path, name: u8, depth: usize) -> Chain {
        let names: Vec<Vec<u8>> = (0..depth).map(|_| vec![name]).collect();
        let (made, err) = mkdir_chain(top, &names);
        // What was made is removed, also when the assertion fails.
        let c = Chain {
            top: top.to_path_buf(),
            name,
            depth: made,
        };
        assert_eq!(
            (made, err.map(|e| e.to_string())),
            (depth, None),
            "mkdir of the chain"
        );
        c
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let n = self.name as char;
        // checkpoints[k]: the directory k * STRIDE levels down.
        let mut checkpoints = vec![open_dir(&self.top)];
        while checkpoints.len() * STRIDE < self.depth {
            let rel: Vec<u8> = format!("{n}/").repeat(STRIDE).into_bytes();
            let last = checkpoints.last().unwrap().as_raw_fd();
            match open_dir_at(last, &rel[..rel.len() - 1]) {
                Ok(d) => checkpoints.push(d),
                Err(e) => {
                    eprintln!("cleanup of the chain in {}: {e}", self.top.display());
                    return;
                }
            }
        }
        let name = CString::new(vec![self.name]).unwrap();
        let one = [self.name];
        // Segment by segment from the deepest: the fds of one segment's
        // directories (each opened from the one above), then its
        // directories removed bottom-up: O(depth) opens in all.
        for k in (0..checkpoints.len()).rev() {
            let first = k * STRIDE + 1;
            let last = ((k + 1) * STRIDE).min(self.depth);
            // dirs[i]: the directory first + i - 1 levels down (dirs[0]
            // is the checkpoint, the parent of level `first`).
            let mut dirs: Vec<std::fs::File> = Vec::new();
            for _ in first..last {
                let from = dirs.last().unwrap_or(&checkpoints[k]).as_raw_fd();
                match open_dir_at(from, &one) {
                    Ok(d) => dirs.push(d),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        eprintln!("cleanup of the chain in {}: {e}", self.top.display());
                        return;
                    }
                }
            }
            for level in (first..=last).rev() {
                let i = level - first;
                let parent = if i == 0 {
                    checkpoints[k].as_raw_fd()
                } else {
                    match dirs.get(i - 1) {
                        Some(d) => d.as_raw_fd(),
                        None => continue,
                    }
                };
                // SAFETY: a valid C string and an open directory fd.
                if unsafe { libc::unlinkat(parent, name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("cleanup at level {level}: {e}");
                        return;
                    }
                }
            }
        }
    }
}

fn sleeper(env: &Env, cg: &Path, comm: &str) -> std::process::Child {
    let link = env.tmp.join(comm);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1/cgroup.procs\" && exec \"$2\" 3600",
            "sh",
        ])
        .arg(cg)
        .arg(&link)
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let procs = cg.join("cgroup.procs");
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            std::fs::read_to_string(&procs).is_ok_and(|s| s.lines().any(|l| l == pid))
        }),
        "the sleeper never reached {}",
        procs.display()
    );
    child
}

/// Kills the sleepers on drop (also when the test fails).
struct Kids(Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for k in &mut self.0 {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

/// One command's answer and how many file syscalls it made (strace; the
/// lines about /proc left out: `apps` reads it per process, and other
/// processes on the machine come and go).
struct Run {
    code: Option<i32>,
    stdout: String,
    calls: usize,
}

fn traced(env: &Env, what: &str, args: &[&str]) -> Run {
    let trace = env.tmp.join(format!("{what}.strace"));
    let f = run_cmd(
        std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=%file,getdents64", "-o"])
            .arg(&trace)
            .arg(BIN)
            .args(args),
        Duration::from_secs(300),
    );
    let calls = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("\"/proc/"))
        .count();
    Run {
        code: f.code(),
        stdout: f.stdout,
        calls,
    }
}

/// Without the lines that count or mention the chains.
fn normal_part(s: &str) -> String {
    s.lines()
        .filter(|l| {
            !l.contains("cgroups at the deepest looked-up level") && !l.contains(" cgroups)")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A 3,000-deep chain of one-byte names and a 10,000-deep one (both built
/// through directory fds, their paths far past PATH_MAX) next to a proxied
/// service and a dropped slice with processes. Each read-only command
/// makes about as many file syscalls as without the chains: at most
/// `PER_CGROUP` for each chain cgroup above the deepest looked-up level
/// (15 per chain: the test root is at level 1) plus slack; and what it
/// says about the normal cgroups is what it said before.
/// How it fails: a walk that reads the whole tree makes at least one stat
/// per cgroup, 13,000 more calls (try `limit` returning usize::MAX in
/// `Hierarchy::walk`).
#[test]
fn read_only_commands_cost_what_the_looked_up_levels_cost() {
    if !need("strace", "-V") {
        return;
    }
    sandbox(|env| {
        load_ruleset();
        let service = "system.slice/cgtproxy-proxy.slice/app.service";
        let dropped = "cgtproxy-drop.slice";
        env.cg.mkdir(&[service, dropped]);
        let kids = Kids(vec![
            sleeper(env, &env.cg.path(service), "proxied"),
            sleeper(env, &env.cg.path(dropped), "dropped"),
        ]);
        let pid = kids.0[0].id().to_string();
        let cfg = env.write_file(
            "rules.json",
            &Config::new(&Rules::embedded_default()).to_json(),
        );
        let mut args = env.run_args(&cfg);
        args.push("--once".into());
        let once = run_daemon_to_exit(&args, Duration::from_secs(30));
        assert_eq!(once.code(), Some(0), "{}", once.describe());

        let root = env.cg.root.to_str().unwrap().to_string();
        let c = cfg.to_str().unwrap().to_string();
        let commands: Vec<(&str, Vec<&str>)> = vec![
            ("status", vec!["status"]),
            ("status-j", vec!["status", "-j"]),
            ("check", vec!["check"]),
            ("apps", vec!["apps"]),
            ("apps-j", vec!["apps", "-j"]),
            ("explain", vec!["explain", &pid]),
        ];
        let run_all = |tag: &str| -> Vec<Run> {
            commands
                .iter()
                .map(|(what, a)| {
                    let mut v: Vec<&str> = a.clone();
                    v.extend(["-c", &c, "--cgroup-root", &root]);
                    traced(env, &format!("{what}-{tag}"), &v)
                })
                .collect()
        };
        let before = run_all("before");
        for ((what, _), r) in commands.iter().zip(&before) {
            assert!(
                matches!(r.code, Some(0 | 1)),
                "{what} failed before the chains: {:?}\n{}",
                r.code,
                r.stdout
            );
        }
        assert!(before[3].stdout.contains("proxied"), "{}", before[3].stdout);

        let _short = Chain::build(&env.cg.root, b'a', 3000);
        let _long = Chain::build(&env.cg.root, b'b', 10_000);
        let after = run_all("after");
        // Each chain has 15 cgroups above the limit (levels 2..=16).
        const ABOVE: usize = 2 * 15;
        const PER_CGROUP: usize = 12;
        const SLACK: usize = 200;
        for (((what, _), b), a) in commands.iter().zip(&before).zip(&after) {
            eprintln!("{what}: {} calls before, {} after", b.calls, a.calls);
            assert_eq!(a.code, b.code, "{what}: exit status\n{}", a.stdout);
            assert_eq!(
                normal_part(&a.stdout),
                normal_part(&b.stdout),
                "{what}: the same answer about the normal cgroups"
            );
            let bound = b.calls + PER_CGROUP * ABOVE + SLACK;
            assert!(
                a.calls >= b.calls.min(10),
                "{what}: strace counted {} calls (is strace counting?)",
                a.calls
            );
            assert!(
                a.calls <= bound,
                "{what}: {} file syscalls with the chains, {} without (bound {bound})",
                a.calls,
                b.calls
            );
        }
        // What was not walked is said.
        for i in [2, 3] {
            assert!(
                after[i]
                    .stdout
                    .contains("2 cgroups at the deepest looked-up level"),
                "{}: the cut is said:\n{}",
                commands[i].0,
                after[i].stdout
            );
        }
        drop(kids);
    });
}
