//! `cgtproxy exec [--verdict V] -- CMD...`: run one command under a
//! verdict, moving no other process. The daemon never writes cgroupfs;
//! this launcher, run by a user, may create one cgroup with that user's
//! own rights.
//!
//! Under a systemd user session systemd creates the scope (`systemd-run
//! --user --scope --slice=cgtproxy-V.slice`), so it stays the single writer
//! of its tree; the command systemd starts is this binary again (stage
//! `wait`, by environment), which waits for the verdict, then executes CMD.
//! Without systemd it creates `cgtproxy-V.slice/exec-PID` where the caller
//! may write, moves itself in, waits, and executes CMD.
//!
//! The wait: the verdict applies from the first socket only once the
//! element that decides the new cgroup (the slice's, under the default
//! rules) is in the map. With CAP_NET_ADMIN exec reads the map until it
//! is. Without (nfnetlink refuses every request of an unprivileged process)
//! it asks the daemon on its instance socket ([`crate::query`]), which
//! handles the cgroup events it has not read yet before it answers, and
//! answers from what it committed; the answer is believed only from a peer
//! that could be the daemon (root, or CAP_NET_ADMIN). Either way the wait
//! is bounded (`WAIT`), and CMD never runs on a timeout, a refusal or a
//! wrong verdict: there is no fixed delay that stands in for the check.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup;
use crate::config::{Config, Verdict, match_form};
use crate::error::Error;
use crate::options::Options;
use crate::query::{self, Answer, AskError};
use crate::ruleset::Ruleset;

/// How long exec waits for the element.
const WAIT: Duration = Duration::from_secs(5);
/// How often the map is read, or the daemon asked, while waiting.
const POLL: Duration = Duration::from_millis(10);
/// Set for the command systemd-run starts: this binary, in its new scope.
const STAGE_ENV: &str = "CGTPROXY_EXEC_STAGE";
/// `systemd`, `cgroupfs`, or unset (systemd when a user session is there).
const MODE_ENV: &str = "CGTPROXY_EXEC";

/// The slice the embedded default rules list for a verdict.
pub fn slice_name(verdict: &str) -> String {
    format!("cgtproxy-{verdict}.slice")
}

fn wanted(verdict: &str) -> Verdict {
    match verdict {
        "drop" => Verdict::Drop,
        c => Verdict::Goto(c.to_string()),
    }
}

/// A verdict word that can be part of a unit name and a chain name.
fn check_verdict(v: &str) -> Result<(), Error> {
    let ok =
        !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(Error::Usage(format!(
            "--verdict {v:?}: expected proxy, direct, drop or the name of a chain (letters, digits, '_')"
        )));
    }
    if matches!(v, "accept" | "reject" | "return") {
        return Err(Error::Usage(format!(
            "--verdict {v:?} is not a verdict of cgtproxy; did you mean {}?",
            if v == "reject" { "drop" } else { "direct" }
        )));
    }
    Ok(())
}

/// `cgtproxy exec`. Returns only on failure (or with CMD's status when it
/// could not be executed).
pub fn exec(opts: &Options, verdict: Option<&str>, cmd: &[OsString]) -> Result<i32, Error> {
    let verdict = verdict.unwrap_or("proxy");
    check_verdict(verdict)?;
    if cmd.is_empty() {
        return Err(Error::Usage(
            "exec needs a command: cgtproxy exec [--verdict V] -- CMD...".into(),
        ));
    }
    let (cfg, root) = crate::options::load(opts)?;
    if std::env::var_os(STAGE_ENV).is_some_and(|v| v == "wait") {
        // SAFETY: single-threaded here; nothing else reads the environment.
        unsafe { std::env::remove_var(STAGE_ENV) };
        let here = own_cgroup_dir()?;
        ancestor_named(&here, &slice_name(verdict)).ok_or_else(|| {
            Error::Runtime(format!(
                "exec: systemd put the command in {}, not below {}",
                here.display(),
                slice_name(verdict)
            ))
        })?;
        wait_for_verdict(&cfg, &root, &here, verdict)?;
        return Ok(execvp(cmd));
    }
    let mode = std::env::var(MODE_ENV).unwrap_or_default();
    let use_systemd = match mode.as_str() {
        "systemd" => true,
        "cgroupfs" => false,
        "" => user_session(),
        other => {
            return Err(Error::Usage(format!(
                "{MODE_ENV}={other:?}: expected systemd or cgroupfs"
            )));
        }
    };
    if use_systemd {
        return via_systemd(opts, verdict, cmd);
    }
    via_cgroupfs(&cfg, &root, verdict, cmd)
}

/// A systemd user manager this process can talk to.
fn user_session() -> bool {
    let private = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| Path::new(&d).join("systemd/private"))
        .is_some_and(|p| p.exists());
    (private || std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some()) && in_path("systemd-run")
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(prog)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// `systemd-run --user --scope --slice=cgtproxy-V.slice -- cgtproxy exec
/// ... -- CMD`, with the stage set: systemd creates the scope, this binary
/// waits inside it for the verdict and executes CMD.
fn via_systemd(opts: &Options, verdict: &str, cmd: &[OsString]) -> Result<i32, Error> {
    let me = std::env::current_exe()
        .map_err(|e| Error::Runtime(format!("exec: own path: {}", crate::error::io(&e))))?;
    let argv = systemd_argv(&me, opts, verdict, cmd);
    // `--scope` runs the command in this process's environment (a service
    // would get the user manager's); systemd-run puts the variable in too,
    // for versions that ignore --setenv with --scope.
    // SAFETY: single-threaded here.
    unsafe { std::env::set_var(STAGE_ENV, "wait") };
    Ok(execvp(&argv))
}

fn systemd_argv(me: &Path, opts: &Options, verdict: &str, cmd: &[OsString]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "systemd-run".into(),
        "--user".into(),
        "--scope".into(),
        "--quiet".into(),
        format!("--slice={}", slice_name(verdict)).into(),
        format!("--setenv={STAGE_ENV}=wait").into(),
        "--".into(),
        me.into(),
        "exec".into(),
        "--verdict".into(),
        verdict.into(),
    ];
    if let Some(c) = &opts.config {
        argv.extend(["-c".into(), c.clone().into_os_string()]);
    }
    if let Some(r) = &opts.cgroup_root {
        argv.extend(["--cgroup-root".into(), r.clone().into_os_string()]);
    }
    argv.push("--".into());
    argv.extend(cmd.iter().cloned());
    argv
}

/// The directory of this process's cgroup.
fn own_cgroup_dir() -> Result<PathBuf, Error> {
    let p = cgroup::path_of_pid(std::process::id())?;
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::Runtime(format!("/proc/self/mountinfo: {}", crate::error::io(&e))))?;
    let mount = cgroup::find_mount(&mi)
        .ok_or_else(|| Error::Runtime("exec: no cgroup2 file system is mounted".into()))?;
    if p.split(|&c| c == b'/').any(|c| c == b"..") {
        return Err(Error::Runtime(format!(
            "exec: this process's cgroup {} is outside its cgroup namespace",
            cgroup::display(&p)
        )));
    }
    Ok(cgroup::fs_path(&mount, &p))
}

fn ancestor_named(dir: &Path, name: &str) -> Option<PathBuf> {
    dir.ancestors()
        .find(|a| a.file_name() == Some(OsStr::new(name)))
        .map(Path::to_path_buf)
}

/// Whether this process may create a cgroup in `dir` and move itself
/// from its cgroup into it (write access to `dir` and its `cgroup.procs`;
/// the kernel checks the common ancestor's `cgroup.procs`, which is `dir`
/// when `dir` is our own cgroup or an ancestor of it).
fn writable(dir: &Path) -> bool {
    let ok = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok();
    ok(dir) && ok(&dir.join("cgroup.procs"))
}

fn via_cgroupfs(cfg: &Config, root: &Path, verdict: &str, cmd: &[OsString]) -> Result<i32, Error> {
    let here = own_cgroup_dir()?;
    // Below our own cgroup when we may write it (a delegated subtree, or
    // root); else, as root only, below the cgroup root.
    let base = if writable(&here) && here.starts_with(root) {
        here.clone()
    } else if writable(root) {
        root.to_path_buf()
    } else {
        return Err(Error::Runtime(format!(
            "exec: may not create a cgroup: this process's cgroup {} is not writable by uid {} (not a delegated subtree) and neither is the cgroup root {}; run it under a systemd user session (systemd-run --user --scope --slice={} CMD), or ask for a delegated cgroup",
            here.display(),
            rustix::process::getuid().as_raw(),
            root.display(),
            slice_name(verdict)
        )));
    };
    let slice = base.join(slice_name(verdict));
    // Rules must list the slice with that verdict, or the daemon never
    // gives it an element.
    let rel = slice.strip_prefix(root).unwrap_or(&slice);
    let rules_path = cgroup_rules_path(rel);
    match cfg.verdict(&match_form(&rules_path)) {
        Some(v) if *v == wanted(verdict) => {}
        other => {
            let has = other.map_or("no rule".to_string(), |v| format!("the verdict {v}"));
            return Err(Error::Usage(format!(
                "exec: {} gives {} {has}, not {}; add {{\"unit\": \"{}\", \"target\": \"{verdict}\"}} (the built-in default lists cgtproxy-proxy.slice, cgtproxy-direct.slice and cgtproxy-drop.slice)",
                cfg.source,
                cgroup::display(&rules_path),
                wanted(verdict),
                slice_name(verdict),
            )));
        }
    }
    match std::fs::create_dir(&slice) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Runtime(format!(
                "exec: mkdir {}: {}",
                slice.display(),
                crate::error::io(&e)
            )));
        }
    }
    collect_leftovers(&slice);
    let pid = std::process::id();
    let mine = slice.join(format!("exec-{pid}"));
    std::fs::create_dir(&mine).map_err(|e| {
        Error::Runtime(format!(
            "exec: mkdir {}: {}",
            mine.display(),
            crate::error::io(&e)
        ))
    })?;
    let moved = std::fs::write(mine.join("cgroup.procs"), pid.to_string());
    if let Err(e) = moved {
        let _ = std::fs::remove_dir(&mine);
        return Err(Error::Runtime(format!(
            "exec: moving into {}: {} (the kernel wants write access to cgroup.procs of the common ancestor of {} and it)",
            mine.display(),
            crate::error::io(&e),
            here.display()
        )));
    }
    wait_for_verdict(cfg, root, &mine, verdict)?;
    Ok(execvp(cmd))
}

/// `/` + `rel`, as rules see it.
fn cgroup_rules_path(rel: &Path) -> Vec<u8> {
    let mut v = b"/".to_vec();
    v.extend_from_slice(rel.as_os_str().as_bytes());
    if v.len() > 1 && v.ends_with(b"/") {
        v.pop();
    }
    v
}

/// Removes the empty `exec-*` cgroups earlier runs left (the kernel refuses
/// to remove one that has processes or children, so this never takes a
/// live one). Bounded by the directory's size.
fn collect_leftovers(slice: &Path) {
    let Ok(rd) = std::fs::read_dir(slice) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().as_bytes().starts_with(b"exec-")
            && std::fs::read(e.path().join("cgroup.procs")).is_ok_and(|p| p.is_empty())
        {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Whether netlink refused for want of CAP_NET_ADMIN.
fn denied(e: &Error) -> bool {
    e.denied()
}

/// The ids of `dir` and of its ancestors in the hierarchy, deepest first;
/// when there are more than `query::MAX_IDS`, the shallowest ones (no
/// ruleset looks up deeper).
fn lineage_ids(dir: &Path) -> Result<Vec<u64>, Error> {
    let mut ids = Vec::new();
    for a in dir.ancestors() {
        // Above the cgroup2 mount there is no cgroup.
        if !a.join("cgroup.procs").exists() {
            break;
        }
        ids.push(cgroup::id_of(a).map_err(|e| {
            Error::Runtime(format!("exec: {}: {}", a.display(), crate::error::io(&e)))
        })?);
    }
    let skip = ids.len().saturating_sub(query::MAX_IDS);
    Ok(ids.split_off(skip))
}

/// Waits (at most `WAIT`) until the element that decides `dir` (its own
/// or its nearest listed ancestor's) has `verdict` in the map. With
/// CAP_NET_ADMIN it reads the map; without (nfnetlink refuses every
/// request of an unprivileged process) it asks the daemon (`query`), and
/// believes only a peer that could be the daemon.
fn wait_for_verdict(cfg: &Config, root: &Path, dir: &Path, verdict: &str) -> Result<(), Error> {
    let deadline = Instant::now() + WAIT;
    match Ruleset::open(cfg) {
        Ok(rs) => match read_map(cfg, rs, root, dir, verdict, deadline) {
            Err(e) if denied(&e) => {}
            r => return r,
        },
        Err(e) if denied(&e) => {}
        Err(e) => return Err(e.context("exec")),
    }
    ask_daemon(cfg, dir, verdict, deadline)
}

/// The timeout's error: what the last look found.
fn timed_out(dir: &Path, verdict: &str, got: &str) -> Error {
    Error::Runtime(format!(
        "exec: after {} s, the verdict of {} is still not {}: {got}; is `cgtproxy run` running with rules that list {}?",
        WAIT.as_secs(),
        dir.display(),
        wanted(verdict),
        slice_name(verdict)
    ))
}

/// With CAP_NET_ADMIN: reads the map until the deciding element of `dir`
/// has the verdict.
fn read_map(
    cfg: &Config,
    mut rs: Ruleset,
    root: &Path,
    dir: &Path,
    verdict: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let want = wanted(verdict);
    let lineage: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| a.starts_with(root))
        .map(Path::to_path_buf)
        .collect();
    loop {
        let got = match rs.dump() {
            Ok(Some(els)) => {
                let deciding = lineage.iter().find_map(|d| {
                    let id = cgroup::id_of(d).ok()?;
                    els.elements
                        .iter()
                        .find(|e| e.id == id)
                        .map(|e| (d, &e.verdict))
                });
                match deciding {
                    Some((_, v)) if *v == want => return Ok(()),
                    Some((d, v)) => format!("the element of {} says {v}", d.display()),
                    None => format!("no element for {} or above yet", dir.display()),
                }
            }
            Ok(None) => format!(
                "table inet {} or its maps do not exist (load nft/cgtproxy.nft, start cgtproxy)",
                cfg.table
            ),
            Err(e) if denied(&e) => return Err(e),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(timed_out(dir, verdict, &got));
        }
        std::thread::sleep(POLL);
    }
}

/// Without CAP_NET_ADMIN: asks the daemon until its answer says the
/// deciding element has the verdict. An answer that cannot change while
/// the daemon is in step (another verdict decides, nothing does, the
/// daemon does not follow this cgroup) fails at once; a daemon not there
/// yet, not in step, or with events still to read is asked again.
fn ask_daemon(cfg: &Config, dir: &Path, verdict: &str, deadline: Instant) -> Result<(), Error> {
    let want = wanted(verdict);
    let ids = lineage_ids(dir)?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = match query::ask(&cfg.table, &cfg.map, &ids, left) {
            Ok(Answer::Listed { verdict: v, .. }) if v == want => return Ok(()),
            Ok(Answer::Listed {
                verdict: v, path, ..
            }) => {
                return Err(Error::Runtime(format!(
                    "exec: the daemon says the element of {path} decides {}, and it is {v}, not {want}",
                    dir.display()
                )));
            }
            Ok(Answer::Unlisted { path, .. }) => {
                return Err(Error::Runtime(format!(
                    "exec: the daemon says no element decides {path} ({}): its rules do not list {}",
                    dir.display(),
                    slice_name(verdict)
                )));
            }
            Ok(Answer::Unknown { root }) => {
                return Err(Error::Runtime(format!(
                    "exec: the daemon does not follow {} (it watches {root})",
                    dir.display()
                )));
            }
            Ok(Answer::Error(e)) => {
                return Err(Error::Runtime(format!(
                    "exec: the daemon did not understand the query: {e}"
                )));
            }
            Ok(Answer::Pending) => "the daemon has cgroup events still to handle".to_string(),
            Ok(Answer::NotInStep(r)) => format!("the daemon's maps are not in step: {r}"),
            Err(AskError::Untrusted(m)) => return Err(Error::Runtime(format!("exec: {m}"))),
            Err(AskError::NoDaemon(m) | AskError::Failed(m)) => m,
        };
        if Instant::now() >= deadline {
            return Err(timed_out(dir, verdict, &got));
        }
        std::thread::sleep(POLL);
    }
}

/// execvp(2); returns the exit status to use when it failed (127 not
/// found, 126 otherwise), after saying why.
fn execvp(argv: &[OsString]) -> i32 {
    let c: Result<Vec<CString>, _> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes().to_vec()))
        .collect();
    let Ok(c) = c else {
        crate::warn!("exec: an argument contains a NUL byte");
        return 2;
    };
    let mut ptrs: Vec<*const libc::c_char> = c.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: ptrs is a NULL-terminated array of valid C strings that
    // outlive the call.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    let e = std::io::Error::last_os_error();
    crate::warn!(
        "exec: {}: {}",
        argv[0].to_string_lossy(),
        crate::error::io(&e)
    );
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_words() {
        assert!(check_verdict("proxy").is_ok());
        assert!(check_verdict("my_proxy2").is_ok());
        assert!(matches!(check_verdict("a/b"), Err(Error::Usage(_))));
        assert!(matches!(check_verdict(""), Err(Error::Usage(_))));
        let Err(Error::Usage(m)) = check_verdict("accept") else {
            panic!()
        };
        assert!(m.contains("did you mean direct"), "{m}");
        assert_eq!(slice_name("drop"), "cgtproxy-drop.slice");
        assert_eq!(cgroup_rules_path(Path::new("a/b")), b"/a/b");
        assert_eq!(cgroup_rules_path(Path::new("")), b"/");
    }

    #[test]
    fn systemd_runs_this_binary_in_the_slice() {
        let opts = Options {
            config: Some(PathBuf::from("/etc/c.json")),
            ..Options::default()
        };
        let argv = systemd_argv(
            Path::new("/usr/bin/cgtproxy"),
            &opts,
            "drop",
            &["curl".into(), "--".into(), "-x".into()],
        );
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "systemd-run",
                "--user",
                "--scope",
                "--quiet",
                "--slice=cgtproxy-drop.slice",
                "--setenv=CGTPROXY_EXEC_STAGE=wait",
                "--",
                "/usr/bin/cgtproxy",
                "exec",
                "--verdict",
                "drop",
                "-c",
                "/etc/c.json",
                "--",
                "curl",
                "--",
                "-x"
            ]
        );
    }
}
