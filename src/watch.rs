//! The cgroup tree as inotify shows it: one watch per cgroup directory, a
//! node per cgroup (keyed by cgroup id), and the events turned into
//! [`Change`]s — which cgroup appeared, vanished, or moved.
//!
//! Why it is built this way (each point is a bug the predecessor had):
//! - a new directory is watched first and scanned second, so children made
//!   before the watch landed are found by the scan and later ones by events;
//! - a child's watch is dropped when its parent reports the deletion, since
//!   kernfs does not reliably send IN_DELETE_SELF / IN_IGNORED;
//! - IN_Q_OVERFLOW is never papered over: the caller rebuilds the tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::cgroup;

/// Something that happened to one cgroup. A rename is a removal at the old
/// path and an addition at the new one (same id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added { id: u64, path: Vec<u8> },
    Removed { id: u64, path: Vec<u8> },
}

struct Node {
    path: Vec<u8>,
    parent: Option<u64>,
    children: HashMap<Vec<u8>, u64>,
    /// `None` when the watch could not be added (out of watches).
    wd: Option<i32>,
}

pub struct Tree {
    root: PathBuf,
    inotify: OwnedFd,
    nodes: HashMap<u64, Node>,
    wds: HashMap<i32, u64>,
    root_id: u64,
    /// Out of inotify watches: said once, not per cgroup.
    warned_watches: bool,
    buf: Vec<MaybeUninit<u8>>,
}

/// What reading the events found besides changes.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Events were dropped: the tree no longer knows the truth.
    Overflow,
}

const WATCH: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::DONT_FOLLOW);

impl Tree {
    /// Watches and scans the whole tree under `root`. What it found is the
    /// tree itself ([`Tree::iter`]); no changes are reported.
    pub fn scan(root: &Path) -> std::io::Result<Tree> {
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        let mut t = Tree {
            root: root.to_path_buf(),
            inotify,
            nodes: HashMap::new(),
            wds: HashMap::new(),
            root_id: 0,
            warned_watches: false,
            buf: vec![MaybeUninit::uninit(); 64 * 1024],
        };
        match t.add(None, b"/".to_vec(), None) {
            Some(id) => t.root_id = id,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{}: cannot watch the cgroup root", root.display()),
                ));
            }
        }
        Ok(t)
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every cgroup: (id, path).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.nodes.iter().map(|(id, n)| (*id, n.path.as_slice()))
    }

    pub fn path(&self, id: u64) -> Option<&[u8]> {
        self.nodes.get(&id).map(|n| n.path.as_slice())
    }

    /// Watches `path` first, then reads its id and scans its children,
    /// iteratively (a deep tree must not exhaust the stack). Returns the id,
    /// or `None` when the directory vanished meanwhile.
    /// Reports each cgroup added in `out`, when given.
    ///
    /// Children found by a scan are named relative to their parent: the
    /// process changes into the parent directory (as `find` does) and hands
    /// inotify_add_watch and stat a single component. Resolving the absolute
    /// path twice per cgroup was the largest cost of a start with thousands
    /// of cgroups, and it also removes any PATH_MAX limit for them. The
    /// working directory is restored before returning.
    fn add(
        &mut self,
        parent: Option<u64>,
        path: Vec<u8>,
        mut out: Option<&mut Vec<Change>>,
    ) -> Option<u64> {
        let mut stack: Vec<Pending> = vec![(parent, path, None)];
        let mut first = None;
        let mut cwd = Cwd::default();
        while let Some((parent, path, base)) = stack.pop() {
            let name = path
                .rsplit(|&c| c == b'/')
                .next()
                .unwrap_or_default()
                .to_vec();
            // How to name it: one component inside the parent, or in full.
            let full;
            let (target, flags): (&Path, WatchFlags) = match &base {
                Some(fd) if cwd.enter(fd) => (Path::new(OsStr::from_bytes(&name)), WATCH),
                _ => {
                    full = match cgroup::dir(&self.root, &path) {
                        Ok(d) => d,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            crate::warn!("{}: cannot open: {e}", cgroup::display(&path));
                            continue;
                        }
                    };
                    // A /proc/self/fd name is a link that must be followed.
                    let flags = if full.via_fd() {
                        WATCH.difference(WatchFlags::DONT_FOLLOW)
                    } else {
                        WATCH
                    };
                    (full.path.as_path(), flags)
                }
            };
            let wd = match inotify::add_watch(&self.inotify, target, flags) {
                Ok(wd) => Some(wd),
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => continue, // gone already
                Err(Errno::NOSPC) => {
                    if !self.warned_watches {
                        self.warned_watches = true;
                        crate::warn!(
                            "out of inotify watches at {} (raise fs.inotify.max_user_watches): cgroups created below it are not followed until a rescan",
                            cgroup::display(&path)
                        );
                    }
                    None
                }
                Err(e) => {
                    crate::warn!("{}: cannot watch: {e}", cgroup::display(&path));
                    None
                }
            };
            let (id, has_children) = match cgroup::id_and_children(target) {
                Ok(x) => x,
                Err(_) => {
                    // Vanished between the watch and the stat. Drop the
                    // watch only if it is not some live node's.
                    if let Some(wd) = wd
                        && !self.wds.contains_key(&wd)
                    {
                        let _ = inotify::remove_watch(&self.inotify, wd);
                    }
                    continue;
                }
            };
            if let Some(existing) = self.nodes.get(&id) {
                // Seen already: the scan and an IN_CREATE raced for it.
                if existing.path == path {
                    first.get_or_insert(id);
                    continue;
                }
            }
            if let Some(wd) = wd {
                self.wds.insert(wd, id);
            }
            if let Some(p) = parent.and_then(|p| self.nodes.get_mut(&p)) {
                p.children.insert(name.clone(), id);
            }
            if let Some(out) = out.as_deref_mut() {
                out.push(Change::Added {
                    id,
                    path: path.clone(),
                });
            }
            first.get_or_insert(id);
            // Children that exist now; later ones arrive as events (the
            // watch is already in place). Leaves need no readdir.
            if has_children
                && let Ok(fd) = rustix::fs::open(
                    target,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                && let Ok(entries) = rustix::fs::Dir::read_from(&fd)
            {
                let fd = Rc::new(fd);
                for e in entries.flatten() {
                    let n = e.file_name().to_bytes();
                    if e.file_type() == rustix::fs::FileType::Directory && n != b"." && n != b".." {
                        stack.push((Some(id), cgroup::child_path(&path, n), Some(fd.clone())));
                    }
                }
            }
            self.nodes.insert(
                id,
                Node {
                    path,
                    parent,
                    children: HashMap::new(),
                    wd,
                },
            );
        }
        cwd.restore();
        first
    }

    /// Removes a cgroup and everything below it from the tree.
    fn remove(&mut self, id: u64, out: &mut Vec<Change>) {
        // Unlink from the parent by name: a burst of removals must not cost
        // a scan of the siblings each.
        if let Some(n) = self.nodes.get(&id)
            && let Some(parent) = n.parent
        {
            let name = n
                .path
                .rsplit(|&c| c == b'/')
                .next()
                .unwrap_or_default()
                .to_vec();
            if let Some(p) = self.nodes.get_mut(&parent)
                && p.children.get(&name) == Some(&id)
            {
                p.children.remove(&name);
            }
        }
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let Some(n) = self.nodes.remove(&id) else {
                continue;
            };
            if let Some(wd) = n.wd {
                self.wds.remove(&wd);
                // EINVAL when the kernel already dropped it: fine.
                let _ = inotify::remove_watch(&self.inotify, wd);
            }
            stack.extend(n.children.values());
            out.push(Change::Removed { id, path: n.path });
        }
    }

    /// Reads every queued event (never blocks) and applies it to the tree.
    pub fn read_events(&mut self, out: &mut Vec<Change>) -> std::io::Result<Status> {
        let mut events: Vec<(i32, ReadFlags, Vec<u8>)> = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            let mut reader = inotify::Reader::new(&self.inotify, &mut buf);
            loop {
                match reader.next() {
                    Ok(e) => {
                        let name = e
                            .file_name()
                            .map(|n| n.to_bytes().to_vec())
                            .unwrap_or_default();
                        events.push((e.wd(), e.events(), name));
                    }
                    Err(Errno::AGAIN) => return Ok(()),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(std::io::Error::from(e)),
                }
            }
        })();
        self.buf = buf;
        result?;
        for (wd, flags, name) in events {
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                return Ok(Status::Overflow);
            }
            if flags.contains(ReadFlags::IGNORED) {
                if let Some(id) = self.wds.remove(&wd)
                    && let Some(n) = self.nodes.get_mut(&id)
                {
                    n.wd = None;
                }
                continue;
            }
            if !flags.contains(ReadFlags::ISDIR) {
                continue;
            }
            let Some(&parent) = self.wds.get(&wd) else {
                continue;
            };
            if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                let Some(ppath) = self.nodes.get(&parent).map(|n| n.path.clone()) else {
                    continue;
                };
                // A rename onto an existing name replaced nothing (cgroup
                // rename needs a free name), but be safe: drop the old one.
                if let Some(old) = self
                    .nodes
                    .get(&parent)
                    .and_then(|n| n.children.get(&name))
                    .copied()
                {
                    self.remove(old, out);
                }
                self.add(Some(parent), cgroup::child_path(&ppath, &name), Some(out));
            } else if flags.intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM) {
                if let Some(child) = self
                    .nodes
                    .get(&parent)
                    .and_then(|n| n.children.get(&name))
                    .copied()
                {
                    self.remove(child, out);
                }
            }
        }
        Ok(Status::Ok)
    }
}

/// A directory still to add: its parent, its path, and the parent's open
/// directory when it is to be named relative to it.
type Pending = (Option<u64>, Vec<u8>, Option<Rc<OwnedFd>>);

/// The working directory during a scan: which parent we are in, and the
/// directory to return to.
#[derive(Default)]
struct Cwd {
    here: Option<Rc<OwnedFd>>,
    original: Option<OwnedFd>,
}

impl Cwd {
    /// Changes into `dir` unless already there; false if that failed (the
    /// caller then names the cgroup in full).
    fn enter(&mut self, dir: &Rc<OwnedFd>) -> bool {
        if self.here.as_ref().is_some_and(|h| Rc::ptr_eq(h, dir)) {
            return true;
        }
        if self.original.is_none() {
            match rustix::fs::open(
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => self.original = Some(fd),
                Err(_) => return false, // could not come back: don't leave
            }
        }
        if rustix::process::fchdir(dir.as_ref()).is_err() {
            return false;
        }
        self.here = Some(dir.clone());
        true
    }

    fn restore(&mut self) {
        if let Some(o) = self.original.take() {
            let _ = rustix::process::fchdir(&o);
        }
        self.here = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real inotify on a plain directory tree (cgroupfs behaves the same for
    /// mkdir/rmdir/rename; the root tests cover cgroupfs itself).
    #[test]
    fn follows_mkdir_rename_rmdir_in_a_plain_directory() {
        let base = std::env::temp_dir().join(format!("cgtproxy-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        let mut t = Tree::scan(&base).unwrap();
        let mut paths: Vec<_> = t.iter().map(|(_, p)| p.to_vec()).collect();
        paths.sort();
        assert_eq!(paths, vec![b"/".to_vec(), b"/a".to_vec(), b"/a/b".to_vec()]);

        std::fs::create_dir_all(base.join("c/d/e")).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.read_events(&mut out).unwrap(), Status::Ok);
        let added: Vec<_> = out
            .iter()
            .filter_map(|c| match c {
                Change::Added { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        assert!(
            added.contains(&b"/c/d/e".to_vec()),
            "nested mkdir -p found: {added:?}"
        );
        assert_eq!(t.len(), 6);

        let id_b = std::fs::metadata(base.join("a/b"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        std::fs::rename(base.join("a/b"), base.join("a/b2")).unwrap();
        std::fs::remove_dir(base.join("c/d/e")).unwrap();
        let mut out = Vec::new();
        t.read_events(&mut out).unwrap();
        assert!(out.contains(&Change::Removed {
            id: id_b,
            path: b"/a/b".to_vec()
        }));
        assert!(out.contains(&Change::Added {
            id: id_b,
            path: b"/a/b2".to_vec()
        }));
        assert!(
            out.iter()
                .any(|c| matches!(c, Change::Removed { path, .. } if path == b"/c/d/e"))
        );
        assert_eq!(t.path(id_b), Some(&b"/a/b2"[..]));
        assert_eq!(t.len(), 5);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
