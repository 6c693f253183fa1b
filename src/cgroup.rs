//! cgroupfs facts: where cgroup v2 is mounted, a cgroup's id, and the path
//! form that rules match. Read-only: cgtproxy never writes cgroupfs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::CgroupRoot;
use crate::error::Error;

/// The cgroup2 mount point, from `/proc/self/mountinfo` (unified layout at
/// /sys/fs/cgroup, hybrid at /sys/fs/cgroup/unified, or anywhere else).
pub fn find_mount(mountinfo: &str) -> Option<PathBuf> {
    find_mount_and_root(mountinfo).map(|(_, mp)| mp)
}

/// `(root field, mount point)` of the first cgroup2 line: the root field is
/// the mounted directory within the hierarchy (`/` unless a subtree is mounted).
pub fn find_mount_and_root(mountinfo: &str) -> Option<(Vec<u8>, PathBuf)> {
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let mut f = left.split(' ').skip(3);
        if let (Some(root), Some(mp)) = (f.next(), f.next()) {
            return Some((
                unescape(root),
                PathBuf::from(OsStr::from_bytes(&unescape(mp))),
            ));
        }
    }
    None
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The directory cgtproxy watches, from `--cgroup-root`, the config, or the
/// mount table.
pub fn resolve_root(root: &CgroupRoot) -> Result<PathBuf, Error> {
    let dir = match root {
        CgroupRoot::Dir(d) => d.clone(),
        CgroupRoot::Auto => {
            let mi = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| Error::Runtime(format!("/proc/self/mountinfo: {e}")))?;
            find_mount(&mi).ok_or_else(|| {
                Error::Runtime("no cgroup2 file system is mounted (see /proc/self/mountinfo); mount one or set cgroup-root".into())
            })?
        }
    };
    match std::fs::metadata(dir.join("cgroup.procs")) {
        Ok(_) => Ok(dir),
        Err(e) => Err(Error::Config(format!(
            "cgroup root {}: not a cgroup v2 directory ({}: {})",
            dir.display(),
            dir.join("cgroup.procs").display(),
            crate::error::io(&e)
        ))),
    }
}

/// The cgroup id the kernel matches (`socket cgroupv2`): the kernfs node id,
/// which is the directory's inode number on 64-bit.
pub fn id_of(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// The cgroup id and whether the directory has subdirectories: on kernfs,
/// as on most file systems, a directory's link count is 2 plus its number
/// of subdirectories, so a leaf (nearly every cgroup) needs no readdir.
pub fn id_and_children(dir: &Path) -> std::io::Result<(u64, bool)> {
    let m = std::fs::metadata(dir)?;
    Ok((m.ino(), m.nlink() != 2))
}

/// `root` + `/a/b` (a path as rules see it, always starting with `/`).
pub fn fs_path(root: &Path, path: &[u8]) -> PathBuf {
    let rel = path.strip_prefix(b"/").unwrap_or(path);
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// A cgroup directory to hand to a syscall. Paths longer than PATH_MAX
/// (deep trees of 255-byte names) cannot be named directly: those are opened
/// one component at a time and named through `/proc/self/fd/N`.
pub struct Dir {
    pub path: PathBuf,
    /// Keeps the `/proc/self/fd/N` name valid.
    fd: Option<std::os::fd::OwnedFd>,
}

impl Dir {
    /// Whether `path` is a `/proc/self/fd` link (which must be followed).
    pub fn via_fd(&self) -> bool {
        self.fd.is_some()
    }
}

/// Leaves room below PATH_MAX (4096, NUL included).
const SHORT_PATH: usize = 4000;

pub fn dir(root: &Path, path: &[u8]) -> std::io::Result<Dir> {
    let full = fs_path(root, path);
    if full.as_os_str().len() < SHORT_PATH {
        return Ok(Dir {
            path: full,
            fd: None,
        });
    }
    use rustix::fs::{Mode, OFlags, open, openat};
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut fd = open(root, flags, Mode::empty())?;
    for comp in path.split(|&c| c == b'/').filter(|c| !c.is_empty()) {
        fd = openat(&fd, OsStr::from_bytes(comp), flags, Mode::empty())?;
    }
    use std::os::fd::AsRawFd;
    Ok(Dir {
        path: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        fd: Some(fd),
    })
}

/// `parent` + `/` + `name`, in the rules' path form.
pub fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    if !parent.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A process's cgroup v2 path, from the `0::` line of `/proc/PID/cgroup`,
/// as seen from our cgroup namespace.
pub fn path_of_pid(pid: u32) -> Result<Vec<u8>, String> {
    let f = format!("/proc/{pid}/cgroup");
    let data = std::fs::read(&f).map_err(|e| format!("{f}: {}", crate::error::io(&e)))?;
    for line in data.split(|&c| c == b'\n') {
        if let Some(p) = line.strip_prefix(b"0::") {
            return Ok(p.to_vec());
        }
    }
    Err(format!("{f}: no cgroup v2 entry"))
}

/// Printable form of a path for logs: UTF-8 as is, other bytes and control
/// characters (a newline in a name would split a log line) escaped.
pub fn display(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            find_mount("1 0 0:1 / /a\\040b rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(find_mount("1 0 0:1 / /x rw - cgroup none rw\n"), None);
        assert_eq!(find_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn paths() {
        assert_eq!(child_path(b"/", b"a"), b"/a");
        assert_eq!(child_path(b"/a", b"b c"), b"/a/b c");
        assert_eq!(fs_path(Path::new("/r"), b"/"), PathBuf::from("/r"));
        assert_eq!(fs_path(Path::new("/r"), b"/a/b"), PathBuf::from("/r/a/b"));
        assert_eq!(display(b"/a\nb/\xff"), "/a\\nb/\\xff");
    }
}
