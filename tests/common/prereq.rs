//! Prerequisites: root, the tools, a cgroup2 mount. A missing one skips
//! the test with a printed reason, or fails it under `CI=true`.

use super::netns::test_name;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The cgroup2 mount point, from `/proc/self/mountinfo` (unified or hybrid).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let mount_point = left.split(' ').nth(4)?;
        return Some(PathBuf::from(unescape_mountinfo(mount_point)));
    }
    None
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tool_works(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn prerequisites() -> Result<PathBuf, String> {
    static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not running as root".into());
            }
            for (tool, arg) in [
                ("nft", "--version"),
                ("ip", "-V"),
                ("unshare", "--version"),
                ("bash", "--version"),
                ("timeout", "--version"),
            ] {
                if !tool_works(tool, arg) {
                    return Err(format!("`{tool}` is missing or does not run"));
                }
            }
            let mount = cgroup2_mount().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
            if !mount.join("cgroup.procs").exists() {
                return Err(format!("{} is not a usable cgroup2 mount", mount.display()));
            }
            Ok(mount)
        })
        .clone()
}

/// Skips the running test ([`test_name`]) for `why` (printed), or, with
/// `CI=true`, fails it: every skip goes through here, so none passes under
/// CI.
pub fn skip(why: &str) {
    let test = test_name();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run here (CI=true makes this a failure): {why}");
    }
    eprintln!("SKIP {test}: {why}");
}

/// Checks the prerequisites: `Some(cgroup2 mount)` to go on, `None` to skip
/// (with a printed reason). With `CI=true` a missing prerequisite panics.
pub fn gate() -> Option<PathBuf> {
    match prerequisites() {
        Ok(mount) => Some(mount),
        Err(why) => {
            skip(&format!("missing prerequisite: {why}"));
            None
        }
    }
}

/// Prerequisite tools this file needs beyond the harness's: skip with a
/// reason, or fail with CI=true.
pub fn need(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(&format!("`{tool}` is missing"));
    }
    ok
}

/// A tool that a non-kernel test needs, found in PATH: `false` means skip
/// (printed), and with `CI=true` a missing tool fails the test.
pub fn have(tool: &str) -> bool {
    let ok = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| {
        fs::metadata(d.join(tool)).is_ok_and(|m| {
            m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
        })
    });
    if !ok {
        skip(&format!("`{tool}` is missing"));
    }
    ok
}
