//! The cgroup subtree by directory fds: names that are not UTF-8, paths
//! longer than PATH_MAX, and the truth computed from such a walk.

use super::config::Rules;
use super::env::Env;
use super::nft::{MapDump, dump_map, try_dump_map};
use super::process::wait_until;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// The documented match form of a cgroup path: UTF-8 as is; when the path
/// is not UTF-8, each invalid byte becomes the four characters `\xHH`.
pub fn match_form(path: &[u8]) -> String {
    match std::str::from_utf8(path) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut out = String::new();
            for chunk in path.utf8_chunks() {
                out.push_str(chunk.valid());
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            out
        }
    }
}

pub fn cstr(b: &[u8]) -> CString {
    CString::new(b).expect("no NUL in a file name")
}

/// openat(dir, name, O_DIRECTORY|O_NOFOLLOW).
pub fn open_dir_at(dir: RawFd, name: &[u8]) -> io::Result<fs::File> {
    let c = cstr(name);
    // SAFETY: a valid C string and a caller-supplied directory fd.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we now own.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

pub fn open_dir(path: &Path) -> fs::File {
    let c = cstr(path.as_os_str().as_bytes());
    // SAFETY: a valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "open {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that we now own.
    unsafe { fs::File::from_raw_fd(fd) }
}

/// Subdirectory names of an open directory. `/proc/self/fd/N` follows the
/// fd itself, so this works however long the directory's path is.
pub fn subdirs(dir: &fs::File) -> Vec<Vec<u8>> {
    let Ok(rd) = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().as_bytes().to_vec())
        .collect()
}

/// Every cgroup below `root` (not `root` itself): (path bytes "/a/b", id).
pub fn walk_fd(root: &Path) -> Vec<(Vec<u8>, u64)> {
    let top = Rc::new(open_dir(root));
    let mut stack: Vec<(Rc<fs::File>, Vec<u8>, Vec<u8>)> = subdirs(&top)
        .into_iter()
        .map(|n| (top.clone(), n.clone(), [b"/".as_slice(), &n].concat()))
        .collect();
    let mut out = Vec::new();
    while let Some((parent, name, path)) = stack.pop() {
        let Ok(dir) = open_dir_at(parent.as_raw_fd(), &name) else {
            continue; // removed meanwhile
        };
        let Ok(md) = dir.metadata() else { continue };
        out.push((path.clone(), std::os::unix::fs::MetadataExt::ino(&md)));
        let dir = Rc::new(dir);
        for n in subdirs(&dir) {
            let p = [path.as_slice(), b"/", &n].concat();
            stack.push((dir.clone(), n, p));
        }
    }
    out
}

/// What the map should hold: id → verdict, from the walk and the rules.
pub fn truth(root: &Path, rules: &Rules) -> MapDump {
    walk_fd(root)
        .into_iter()
        .filter_map(|(p, id)| rules.verdict(&match_form(&p)).map(|v| (id, v)))
        .collect()
}

fn fd_names(root: &Path) -> HashMap<u64, String> {
    walk_fd(root)
        .into_iter()
        .map(|(p, id)| {
            let mut s = match_form(&p);
            if s.len() > 120 {
                s = format!("{}…[{} bytes]", &s[..60], p.len());
            }
            (id, s)
        })
        .collect()
}

fn fd_diff(root: &Path, expected: &MapDump, actual: &MapDump) -> String {
    let names = fd_names(root);
    let ids: BTreeSet<u64> = expected.keys().chain(actual.keys()).copied().collect();
    let mut s = String::new();
    let mut n = 0;
    for id in ids {
        let (e, a) = (expected.get(&id), actual.get(&id));
        if e != a {
            n += 1;
            if n <= 40 {
                s.push_str(&format!(
                    "  id {id} {:?}: expected {e:?}, map has {a:?}\n",
                    names.get(&id).map(String::as_str).unwrap_or("<gone>")
                ));
            }
        }
    }
    if n > 40 {
        s.push_str(&format!("  … {n} differences in all\n"));
    }
    s
}

/// Waits (up to `limit`) until the map equals the truth; panics with a diff.
pub fn converge(env: &Env, rules: &Rules, limit: Duration, what: &str) -> MapDump {
    let mut last = (MapDump::new(), MapDump::new());
    let ok = wait_until(limit, Duration::from_millis(25), || {
        let e = truth(&env.cg.root, rules);
        let a = match try_dump_map("cgtproxy", "cgroups") {
            Ok(a) => a,
            Err(_) => return false,
        };
        let same = e == a;
        last = (e, a);
        same
    });
    assert!(
        ok,
        "{what}: map did not converge to the truth within {limit:?}; {} expected, {} in the map:\n{}",
        last.0.len(),
        last.1.len(),
        fd_diff(&env.cg.root, &last.0, &last.1)
    );
    last.1
}

/// Asserts now that the map equals the truth.
pub fn assert_truth(env: &Env, rules: &Rules, what: &str) -> MapDump {
    let (e, a) = (truth(&env.cg.root, rules), dump_map());
    assert!(
        e == a,
        "{what}: map differs from the truth:\n{}",
        fd_diff(&env.cg.root, &e, &a)
    );
    a
}

// ---------------------------------------------------------------------------
// Directories by fd: names that are not UTF-8, paths past PATH_MAX
// ---------------------------------------------------------------------------

/// `mkdir` of a chain of names below `base`, each inside the previous one,
/// through directory fds (the absolute path may exceed PATH_MAX). Returns
/// how many were made, and the error that stopped it, if any.
pub fn mkdir_chain(base: &Path, names: &[Vec<u8>]) -> (usize, Option<io::Error>) {
    let mut dir = open_dir(base);
    for (i, n) in names.iter().enumerate() {
        let c = cstr(n);
        // SAFETY: a valid C string and an open directory fd.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return (i, Some(e));
            }
        }
        dir = match open_dir_at(dir.as_raw_fd(), n) {
            Ok(d) => d,
            Err(e) => return (i + 1, Some(e)),
        };
    }
    (names.len(), None)
}

/// Removes `name` in `dir` and everything below it, bottom-up, by fds.
pub fn remove_tree_at(dir: RawFd, name: &[u8]) -> io::Result<()> {
    let sub = open_dir_at(dir, name)?;
    for n in subdirs(&sub) {
        remove_tree_at(sub.as_raw_fd(), &n)?;
    }
    drop(sub);
    let c = cstr(name);
    // SAFETY: a valid C string and an open directory fd.
    if unsafe { libc::unlinkat(dir, c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes, on drop (also when a test fails), subtrees the harness cannot
/// remove by path (longer than PATH_MAX).
pub struct DeepCleanup(pub Vec<PathBuf>);

impl Drop for DeepCleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let parent = open_dir(p.parent().unwrap());
            let name = p.file_name().unwrap().as_bytes();
            match remove_tree_at(parent.as_raw_fd(), name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("cleanup of {}: {e}", p.display()),
            }
        }
    }
}
