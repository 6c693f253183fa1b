//! cgroupfs facts: where cgroup v2 is mounted, a cgroup's id, and the path
//! form that rules match. Read-only: cgtproxy never writes cgroupfs.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt::Write as _;
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

/// `(root field, mount point)` of the cgroup2 mount that is visible at its
/// mount point: the root field is the mounted directory within the
/// hierarchy (`/` unless a subtree is mounted).
///
/// Mounts are listed in the order they were made, and a later mount on
/// the same point or on one of its ancestors hides it (a cgroup2 mounted
/// over `/sys/fs/cgroup` in a mount namespace of a hybrid host hides
/// `/sys/fs/cgroup/unified`). So the last cgroup2 line that no later line
/// covers wins.
pub fn find_mount_and_root(mountinfo: &str) -> Option<(Vec<u8>, PathBuf)> {
    // (fs type is cgroup2, root field, mount point)
    let mut mounts: Vec<(bool, Vec<u8>, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut f = left.split(' ').skip(3);
        if let (Some(root), Some(mp)) = (f.next(), f.next()) {
            mounts.push((
                right.split(' ').next() == Some("cgroup2"),
                unescape(root),
                PathBuf::from(OsStr::from_bytes(&unescape(mp))),
            ));
        }
    }
    let mut hiding: Vec<&Path> = Vec::new();
    for (cgroup2, root, mp) in mounts.iter().rev() {
        if *cgroup2 && !hiding.iter().any(|h| mp.starts_with(h)) {
            return Some((root.clone(), mp.clone()));
        }
        hiding.push(mp);
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
                Error::Runtime("no cgroup2 file system is visible in /proc/self/mountinfo; mount one, or name the directory with --cgroup-root (or \"cgroup-root\" in the config)".into())
            })?
        }
    };
    match std::fs::metadata(dir.join("cgroup.procs")) {
        Ok(_) => Ok(dir),
        Err(e) => Err(Error::Config(format!(
            "cgroup root {}: not a cgroup v2 directory ({}: {}); name the right one with --cgroup-root",
            dir.display(),
            dir.join("cgroup.procs").display(),
            crate::error::io(&e)
        ))),
    }
}

/// Normal components of `p`; `None` when a `..` makes the depth unknowable
/// (a mount root outside our cgroup namespace).
fn components(p: &[u8]) -> Option<usize> {
    let mut n = 0;
    for c in p
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        if c == b".." {
            return None;
        }
        n += 1;
    }
    Some(n)
}

/// The kernel's level of the cgroup directory `dir`: its depth below the
/// root of the cgroup2 hierarchy as this process's cgroup namespace sees it,
/// which is what `socket cgroupv2 level N` counts from when the ruleset was
/// loaded in the same cgroup namespace. Found from the visible cgroup2
/// mount (its root field counts too: a mounted subtree starts deeper).
/// `None` when that cannot be known.
pub fn level_of(dir: &Path) -> Option<usize> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mp) = find_mount_and_root(&mi)?;
    let dir = std::fs::canonicalize(dir).ok()?;
    let rel = dir.strip_prefix(&mp).ok()?;
    Some(components(&root)? + components(rel.as_os_str().as_bytes())?)
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

/// Maps and sets keyed by cgroup id. The kernel assigns the ids (kernfs
/// node numbers, allocated in sequence), so a user can only pick which ids
/// to keep by making and removing cgroups: a keyed multiply is enough
/// against that, and SipHash (a tenth of a start with 10,000 cgroups) is
/// not needed. The key is the process's own (random, see `hash_key`), so
/// which ids share a bucket cannot be worked out in advance.
/// Names, which users choose freely, keep the default hasher.
pub type IdMap<V> = std::collections::HashMap<u64, V, IdHash>;
pub type IdSet = std::collections::HashSet<u64, IdHash>;
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// A folded 64×64→128-bit multiply of the keyed id: every bit of the id
/// moves the bits hashbrown uses (the low ones for the bucket, the top
/// seven for the tag).
pub struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> IdHasher {
        IdHasher(hash_key())
    }
}

/// This process's hash key: 8 random bytes from getrandom(2), asked for
/// once. (Not AT_RANDOM: libc makes its stack canary of those.) Should the
/// kernel have none yet (early boot: GRND_NONBLOCK), the key is the pid and
/// the time, which still differs from one start to the next.
fn hash_key() -> u64 {
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut b = [0u8; 8];
        // SAFETY: b is 8 writable bytes.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
        if n == 8 {
            return u64::from_ne_bytes(b);
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    })
}

impl std::hash::Hasher for IdHasher {
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, id: u64) {
        let m = u128::from(self.0 ^ id) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    /// Not used for ids (they hash as one u64); any other key still works.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
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
pub fn path_of_pid(pid: u32) -> Result<Vec<u8>, Error> {
    use crate::error::Context as _;
    let f = format!("/proc/{pid}/cgroup");
    let data = std::fs::read(&f).context(&f)?;
    for line in data.split(|&c| c == b'\n') {
        if let Some(p) = line.strip_prefix(b"0::") {
            return Ok(p.to_vec());
        }
    }
    Err(Error::Runtime(format!("{f}: no cgroup v2 entry")))
}

/// The one form in which rules match a cgroup path and logs, `status
/// --json` and `explain` show it. Injective, so two different names never
/// look or match alike:
/// - a backslash is written `\\`;
/// - a byte that is not part of valid UTF-8 is written `\xNN` (lowercase);
/// - control characters, format characters (bidi overrides such as U+202E,
///   zero-width characters) and line/paragraph separators are written
///   `\u{NNNN}` (lowercase), so nothing in a name can reorder, hide or
///   split what a terminal or a journal shows;
/// - everything else is itself.
///
/// Every backslash in the result starts one of these escapes, which is what
/// makes the form injective. Borrowed (no copy) when nothing needs escaping,
/// as for nearly every real cgroup.
pub fn escape(path: &[u8]) -> Cow<'_, str> {
    // Printable ASCII without a backslash is itself: one pass over the
    // bytes, no character decoding (every match and every start with
    // 10,000 cgroups goes through here).
    if path
        .iter()
        .all(|&b| (b' '..=b'~').contains(&b) && b != b'\\')
        && let Ok(s) = std::str::from_utf8(path)
    {
        return Cow::Borrowed(s);
    }
    if let Ok(s) = std::str::from_utf8(path)
        && !s.chars().any(needs_escape)
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if needs_escape(c) {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_format(c)
}

/// Unicode general category Cf (format), plus the line and paragraph
/// separators: characters that change how text around them is shown.
pub(crate) fn is_format(c: char) -> bool {
    matches!(c as u32,
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2
        | 0x180e | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2064
        | 0x2066..=0x206f | 0xfeff | 0xfff9..=0xfffb | 0x110bd | 0x110cd
        | 0x13430..=0x1343f | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a
        | 0xe0001 | 0xe0020..=0xe007f)
}

/// Printable form of a path for logs and JSON: [`escape`], owned.
pub fn display(path: &[u8]) -> String {
    escape(path).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_is_keyed_and_stable_within_the_process() {
        use std::hash::{BuildHasher, Hasher};
        let key = hash_key();
        // 0 has odds of 2^-64 with a random key; the fallback is never 0.
        assert_ne!(key, 0);
        assert_eq!(key, hash_key());
        let (a, b) = (
            IdHash::default().hash_one(4242u64),
            IdHash::default().hash_one(4242u64),
        );
        assert_eq!(a, b);
        let mut unkeyed = IdHasher(0);
        unkeyed.write_u64(4242);
        assert_ne!(a, unkeyed.finish());
        let mut m: IdMap<u32> = IdMap::default();
        m.extend((0..1000u64).map(|i| (i, i as u32)));
        assert!((0..1000u64).all(|i| m[&i] == i as u32));
    }

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

    /// The last mount on a point wins, and a mount on an ancestor hides
    /// what was mounted below it before.
    #[test]
    fn a_hidden_cgroup2_mount_is_not_taken() {
        let over = "30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs ro\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                    40 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(over), Some(PathBuf::from("/sys/fs/cgroup")));
        let hidden = "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                      40 30 0:29 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        assert_eq!(find_mount(hidden), None);
        let same_point = "31 30 0:27 / /cg rw - cgroup2 cgroup2 rw\n\
                          32 31 0:27 /sub /cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount_and_root(same_point),
            Some((b"/sub".to_vec(), PathBuf::from("/cg")))
        );
        // A sibling mounted later hides nothing.
        let sibling = "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                       32 30 0:28 / /sys/fs/cgroup/unifiedx rw - tmpfs tmpfs rw\n";
        assert_eq!(
            find_mount(sibling),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(components(b"/"), Some(0));
        assert_eq!(components(b"/a/b"), Some(2));
        assert_eq!(components(b"/../a"), None);
    }

    /// One form, injective: a literal backslash and an invalid byte never
    /// look alike, and nothing can reorder what a terminal shows.
    #[test]
    fn escape_is_injective_and_shows_no_format_characters() {
        // The collision of issue 12: byte 0xE9 against a literal `\xe9`.
        assert_eq!(escape(b"/caf\xe9.slice"), r"/caf\xe9.slice");
        assert_eq!(escape(br"/caf\xe9.slice"), r"/caf\\xe9.slice");
        assert_eq!(escape(br"/a\b"), r"/a\\b");
        assert_eq!(escape("/a\u{202e}b".as_bytes()), "/a\\u{202e}b");
        assert_eq!(escape("/\u{200b}\u{7f}".as_bytes()), "/\\u{200b}\\u{7f}");
        assert!(matches!(escape("/é ok".as_bytes()), Cow::Borrowed(_)));
        // Round trip over every short byte string: distinct in, distinct out.
        let mut seen = std::collections::HashMap::new();
        for a in 0..=255u8 {
            for b in [b'\\', b'x', b'e', b'9', 0xe9, 0xc3, 0x80, b'u', b'{'] {
                let v = vec![a, b];
                let e = escape(&v).into_owned();
                if let Some(prev) = seen.insert(e.clone(), v.clone()) {
                    assert_eq!(prev, v, "{e:?} from two inputs");
                }
            }
        }
    }

    #[test]
    fn paths() {
        assert_eq!(child_path(b"/", b"a"), b"/a");
        assert_eq!(child_path(b"/a", b"b c"), b"/a/b c");
        assert_eq!(fs_path(Path::new("/r"), b"/"), PathBuf::from("/r"));
        assert_eq!(fs_path(Path::new("/r"), b"/a/b"), PathBuf::from("/r/a/b"));
        assert_eq!(display(b"/a\nb/\xff"), "/a\\u{a}b/\\xff");
    }
}
