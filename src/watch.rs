//! The cgroup tree as inotify shows it: one watch per cgroup directory, a
//! node per cgroup (keyed by cgroup id), and the events turned into
//! [`Change`]s — which cgroup appeared, vanished, or moved.
//!
//! Why it is built this way (each point is a bug the predecessor had, or
//! something a hostile user did to 0.2.0):
//! - a new directory is watched first and scanned second, so children made
//!   before the watch landed are found by the scan and later ones by events;
//! - a child's watch is dropped when its parent reports the deletion, since
//!   kernfs does not reliably send IN_DELETE_SELF / IN_IGNORED;
//! - IN_Q_OVERFLOW is never papered over: the caller rebuilds the tree;
//! - a node stores its parent and its own name, never its full path, so
//!   memory and work are proportional to the number of cgroups, not to the
//!   square of their path length; a path is built on demand (a walk of at
//!   most `limit` parents);
//! - nothing below the deepest level the ruleset looks up is followed: a
//!   cgroup there cannot get an element that takes effect, and a user's
//!   10,000-deep chain then costs nothing. Cgroups at that level are listed
//!   (they are looked up) but not watched or scanned, which also keeps the
//!   watch budget for cgroups that matter; said once per subtree;
//! - running out of watches (ENOSPC) is remembered per cgroup and retried
//!   ([`Tree::retry_watches`], on the caller's backoff timer): a cgroup
//!   whose watch failed is followed once watches are available again, and
//!   only those cgroups are rescanned, never the whole tree;
//! - one call reads a bounded number of events, so a storm in one subtree
//!   is served in slices between everything else the daemon does.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::cgroup::{self, IdHash, IdMap, IdSet};

/// Something that happened to one cgroup. A rename is a removal at the old
/// path and an addition at the new one (same id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added { id: u64, path: Vec<u8> },
    Removed { id: u64, path: Vec<u8> },
}

struct Node {
    parent: Option<u64>,
    /// The last component (empty for the root), shared with the parent's
    /// `children` key.
    name: Rc<[u8]>,
    /// Levels below the cgroup root (the root is 0).
    depth: u32,
    children: HashMap<Rc<[u8]>, u64>,
    /// `None` when not watched: at the depth limit, or the watch failed.
    wd: Option<i32>,
}

pub struct Tree {
    root: PathBuf,
    inotify: OwnedFd,
    nodes: IdMap<Node>,
    /// Watch descriptors (the kernel's small numbers) → cgroup id.
    wds: HashMap<i32, u64, IdHash>,
    root_id: u64,
    /// Deepest depth below the root that is followed; cgroups at it are
    /// listed but not watched. `None`: no limit.
    limit: Option<u32>,
    /// Cgroups whose watch failed for lack of watches (ENOSPC): retried.
    unwatched: BTreeSet<u64>,
    /// Out of inotify watches: said once per shortage, not per cgroup.
    warned_watches: bool,
    /// Parents whose children reached the depth limit, said once each
    /// (up to [`DEEP_SAID`] subtrees, then once that more are not said).
    warned_deep: IdSet,
    /// Events read from the kernel, not handled yet (see `read_events`).
    queue: VecDeque<Event>,
    /// The events being handled by `read_events` (kept for its capacity).
    batch: Vec<(Event, bool)>,
    buf: Vec<MaybeUninit<u8>>,
}

/// One inotify event: the watch, what happened, the name in the directory.
type Event = (i32, ReadFlags, Box<[u8]>);

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

/// Events of busy directories handled per [`Tree::read_events`] call; the
/// rest wait for the next turn of the loop, so one storm cannot hold the
/// loop (and everyone else's events) for long: an event elsewhere waits
/// for at most the turn in progress. The hostile bench measured 64 µs of
/// daemon CPU per listed storm cgroup on a loaded 2-core machine (watch,
/// stat, match, its element in the turn's one transaction), and turns of
/// 1,024 took up to ~200 ms there; 256 make that a quarter. Fewer would
/// pay a transaction's fixed cost too often (a 100,000-mkdir storm is 400
/// turns).
pub const EVENTS_PER_TURN: usize = 256;

/// A directory with at most this many events pending is quiet: its events
/// are handled at once, ahead of busy ones.
const QUIET: usize = 16;

/// Events read and held at most (beyond these the kernel's own queue,
/// `fs.inotify.max_queued_events`, holds them): about 300 bytes each at
/// worst, so a few MiB.
const QUEUED: usize = 32768;

/// Cgroups whose watch is retried per [`Tree::retry_watches`] call.
const RETRIES_PER_TURN: usize = 4096;

/// Subtrees reaching the depth limit that are each said in the log.
const DEEP_SAID: usize = 16;

/// A directory still to add: its parent, its name, the parent's path (in
/// the rules' form) and the parent's open directory, to name it relative to.
struct Pending {
    parent: u64,
    name: Rc<[u8]>,
    parent_path: Rc<[u8]>,
    dir: Option<Rc<OwnedFd>>,
}

impl Tree {
    /// Watches and scans the whole tree under `root`, following at most
    /// `limit` levels below it (see the module doc). What it found is the
    /// tree itself ([`Tree::paths`]); no changes are reported.
    pub fn scan(root: &Path, limit: Option<u32>) -> std::io::Result<Tree> {
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        // Absolute: the scan changes directory, and a relative root would
        // then name something else.
        let root = std::path::absolute(root)?;
        let mut t = Tree {
            root,
            inotify,
            nodes: IdMap::default(),
            wds: HashMap::default(),
            root_id: 0,
            limit,
            unwatched: BTreeSet::new(),
            warned_watches: false,
            warned_deep: IdSet::default(),
            queue: VecDeque::new(),
            batch: Vec::new(),
            buf: vec![MaybeUninit::uninit(); 64 * 1024],
        };
        t.fill()?;
        Ok(t)
    }

    /// Forgets everything and scans again (after the queue overflowed).
    /// The old inotify instance is closed first, so its watches are given
    /// back before the new ones are taken (both at once could run out).
    pub fn rescan(&mut self) -> std::io::Result<()> {
        let fresh = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        drop(std::mem::replace(&mut self.inotify, fresh));
        self.nodes.clear();
        self.wds.clear();
        self.unwatched.clear();
        self.warned_deep.clear();
        self.queue.clear();
        self.fill()
    }

    /// Watches and adds the root, then everything below it.
    fn fill(&mut self) -> std::io::Result<()> {
        let root = self.root.clone();
        let limit = self.limit;
        let cannot = || {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: cannot watch the cgroup root", root.display()),
            )
        };
        let wd = if limit == Some(0) {
            None
        } else {
            match inotify::add_watch(&self.inotify, &root, WATCH) {
                Ok(wd) => Some(wd),
                Err(Errno::NOSPC) => {
                    self.out_of_watches(b"/");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        };
        let (id, has_children) = cgroup::id_and_children(&root).map_err(|_| cannot())?;
        self.root_id = id;
        if let Some(wd) = wd {
            self.wds.insert(wd, id);
        } else if limit != Some(0) {
            self.unwatched.insert(id);
        }
        self.nodes.insert(
            id,
            Node {
                parent: None,
                name: Rc::from(&b""[..]),
                depth: 0,
                children: HashMap::new(),
                wd,
            },
        );
        if has_children && limit != Some(0) {
            self.scan_children(id, None);
        }
        Ok(())
    }

    /// The directory watched (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn limit(&self) -> Option<u32> {
        self.limit
    }

    /// A new depth limit, which takes effect at the next [`Tree::rescan`].
    pub fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }

    /// Events read but not handled yet: the caller comes back for them at
    /// once (without waiting in poll).
    pub fn pending(&self) -> usize {
        self.queue.len()
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

    /// Cgroups whose watch failed for lack of watches, to retry.
    pub fn unwatched(&self) -> usize {
        self.unwatched.len()
    }

    /// Every cgroup: (id, path), parents before children.
    pub fn paths(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        self.walk(|id, path| out.push((id, path.to_vec())));
        out
    }

    /// Calls `f` with every cgroup's id and path, parents before children.
    /// One walk over one buffer: each path is its parent's plus one name,
    /// and none is allocated (a full sync with 10,000 cgroups walks them
    /// all).
    pub fn walk(&self, mut f: impl FnMut(u64, &[u8])) {
        let mut path: Vec<u8> = Vec::new();
        // (cgroup, length of its parent's path in `path`)
        let mut stack = vec![(self.root_id, 0usize)];
        while let Some((id, len)) = stack.pop() {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            path.truncate(len);
            if n.parent.is_some() {
                path.push(b'/');
                path.extend_from_slice(&n.name);
            }
            f(id, if path.is_empty() { b"/" } else { &path });
            stack.extend(n.children.values().map(|c| (*c, path.len())));
        }
    }

    /// The parent of a cgroup (None for the root and unknown ids).
    pub fn parent(&self, id: u64) -> Option<u64> {
        self.nodes.get(&id)?.parent
    }

    /// The path of a cgroup, in the rules' form (`/a/b`): its length
    /// first, then the names from the end, so one allocation (this runs
    /// for every event's parent and every logged element).
    pub fn path(&self, id: u64) -> Option<Vec<u8>> {
        let node = self.nodes.get(&id)?;
        let (mut len, mut at) = (0, node);
        while let Some(p) = at.parent {
            len += at.name.len() + 1;
            at = self.nodes.get(&p)?;
        }
        if len == 0 {
            return Some(b"/".to_vec());
        }
        let mut path = vec![b'/'; len];
        let (mut end, mut at) = (len, node);
        while let Some(p) = at.parent {
            path[end - at.name.len()..end].copy_from_slice(&at.name);
            end -= at.name.len() + 1;
            at = self.nodes.get(&p)?;
        }
        Some(path)
    }

    fn out_of_watches(&mut self, path: &[u8]) {
        if !self.warned_watches {
            self.warned_watches = true;
            crate::warn!(
                "out of inotify watches at {} (fs.inotify.max_user_watches, counted per uid): cgroups created below it are followed once watches are free again (retried with a backoff)",
                cgroup::display(path)
            );
        }
    }

    /// Says, once per subtree, that the depth limit stops following it.
    fn at_limit(&mut self, parent: u64, path: &[u8]) {
        if self.warned_deep.len() > DEEP_SAID || self.warned_deep.contains(&parent) {
            return;
        }
        self.warned_deep.insert(parent);
        if self.warned_deep.len() > DEEP_SAID {
            crate::warn!("more subtrees reach the ruleset's deepest level; not saying each");
            return;
        }
        crate::warn!(
            "{} is at the deepest level the ruleset looks up: cgroups below it are not followed and get no element (they inherit its verdict)",
            cgroup::display(path)
        );
    }

    /// Adds the cgroup `name` in `parent` (an event), with what is below it.
    /// `busy`: the parent has many events in this call, so it is opened once
    /// and each is named inside it; a lone event is named by its full path
    /// (two syscalls, not the six of opening and entering the parent).
    fn add_child(
        &mut self,
        parent: u64,
        name: &[u8],
        busy: bool,
        out: &mut Vec<Change>,
        cwd: &mut Cwd,
    ) {
        let (dir, parent_path) = if busy {
            // Gone parent: its DELETE follows.
            let Some((dir, parent_path)) = cwd.parent_dir(self, parent) else {
                return;
            };
            (Some(dir), parent_path)
        } else {
            let Some(path) = self.path(parent) else {
                return;
            };
            (None, path.into())
        };
        let p = Pending {
            parent,
            name: name.into(),
            parent_path,
            dir,
        };
        self.add(vec![p], Some(out), cwd);
    }

    /// Adds the current children of `id` (a fresh node, or one whose watch
    /// was missing), reporting them in `out` when given.
    fn scan_children(&mut self, id: u64, out: Option<&mut Vec<Change>>) {
        let Some(path) = self.path(id) else {
            return;
        };
        let mut cwd = Cwd::default();
        let fd = cgroup::dir(&self.root, &path)
            .ok()
            .and_then(|d| open_dir(&d.path).ok());
        let stack = match fd {
            Some(fd) => children_of(id, &path.into(), fd),
            None => Vec::new(),
        };
        self.add(stack, out, &mut cwd);
        cwd.restore();
    }

    /// Watches each pending directory first, then reads its id and queues
    /// its children, iteratively (a deep tree must not exhaust the stack).
    ///
    /// Every directory is named relative to its parent: the process changes
    /// into the parent (as `find` does) and hands inotify_add_watch and
    /// stat a single component. That was the largest cost of a start with
    /// thousands of cgroups, and it removes any PATH_MAX limit.
    fn add(&mut self, mut stack: Vec<Pending>, mut out: Option<&mut Vec<Change>>, cwd: &mut Cwd) {
        while let Some(p) = stack.pop() {
            let Some(depth) = self.nodes.get(&p.parent).map(|n| n.depth + 1) else {
                continue;
            };
            if self.limit.is_some_and(|l| depth > l) {
                continue;
            }
            // The path is built only when something needs it (a change to
            // report, children to queue, a message): a start adds
            // thousands of leaves that need none.
            let mut path: Option<Vec<u8>> = None;
            let full;
            let (target, flags): (&Path, WatchFlags) = match &p.dir {
                Some(fd) if cwd.enter(fd) => (Path::new(OsStr::from_bytes(&p.name)), WATCH),
                _ => {
                    let at = path_of(&mut path, &p);
                    full = match cgroup::dir(&self.root, at) {
                        Ok(d) => d,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            crate::warn!("{}: cannot open: {e}", cgroup::display(at));
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
            let at_limit = self.limit == Some(depth);
            let mut short = false;
            let wd = if at_limit {
                None
            } else {
                match inotify::add_watch(&self.inotify, target, flags) {
                    Ok(wd) => Some(wd),
                    Err(Errno::NOENT) | Err(Errno::NOTDIR) => continue, // gone already
                    Err(Errno::NOSPC) => {
                        self.out_of_watches(path_of(&mut path, &p));
                        short = true;
                        None
                    }
                    Err(e) => {
                        let at = path_of(&mut path, &p);
                        crate::warn!("{}: cannot watch: {e}", cgroup::display(at));
                        None
                    }
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
            if self.nodes.contains_key(&id) {
                // Seen already: the scan and an IN_CREATE raced for it.
                continue;
            }
            if let Some(wd) = wd {
                self.wds.insert(wd, id);
            }
            if short {
                self.unwatched.insert(id);
            }
            if let Some(n) = self.nodes.get_mut(&p.parent) {
                n.children.insert(p.name.clone(), id);
            }
            if at_limit {
                self.at_limit(p.parent, path_of(&mut path, &p));
            }
            // Children that exist now; later ones arrive as events (the
            // watch is already in place). Leaves need no readdir, and
            // nothing below the limit is followed.
            if has_children
                && !at_limit
                && let Ok(fd) = open_dir(target)
            {
                let pp: Rc<[u8]> = path_of(&mut path, &p).into();
                stack.extend(children_of(id, &pp, fd));
            }
            if let Some(out) = out.as_deref_mut() {
                let path = path.unwrap_or_else(|| cgroup::child_path(&p.parent_path, &p.name));
                out.push(Change::Added { id, path });
            }
            self.nodes.insert(
                id,
                Node {
                    parent: Some(p.parent),
                    name: p.name,
                    depth,
                    children: HashMap::new(),
                    wd,
                },
            );
        }
    }

    /// Removes a cgroup and everything below it from the tree.
    fn remove(&mut self, id: u64, out: &mut Vec<Change>) {
        let Some(top) = self.path(id) else {
            return;
        };
        // Unlink from the parent by name: a burst of removals must not cost
        // a scan of the siblings each.
        if let Some(n) = self.nodes.get(&id)
            && let Some(parent) = n.parent
        {
            let name = n.name.clone();
            if let Some(p) = self.nodes.get_mut(&parent)
                && p.children.get(&name) == Some(&id)
            {
                p.children.remove(&name);
            }
        }
        let mut stack = vec![(id, top)];
        while let Some((id, path)) = stack.pop() {
            let Some(n) = self.nodes.remove(&id) else {
                continue;
            };
            self.unwatched.remove(&id);
            self.warned_deep.remove(&id);
            if let Some(wd) = n.wd {
                self.wds.remove(&wd);
                // EINVAL when the kernel already dropped it: fine.
                let _ = inotify::remove_watch(&self.inotify, wd);
            }
            for (name, c) in &n.children {
                stack.push((*c, cgroup::child_path(&path, name)));
            }
            out.push(Change::Removed { id, path });
        }
    }

    /// Tries again to watch the cgroups whose watch failed for lack of
    /// watches; for each that now has one, what changed below it meanwhile
    /// goes to `out` (children added and removed). Bounded per call.
    /// Returns whether any remain unwatched (the caller backs off).
    pub fn retry_watches(&mut self, out: &mut Vec<Change>) -> bool {
        let ids: Vec<u64> = self
            .unwatched
            .iter()
            .take(RETRIES_PER_TURN)
            .copied()
            .collect();
        for id in ids {
            let Some(path) = self.path(id) else {
                self.unwatched.remove(&id);
                continue;
            };
            let d = match cgroup::dir(&self.root, &path) {
                Ok(d) => d,
                Err(_) => continue, // gone: its parent's DELETE removes it
            };
            let flags = if d.via_fd() {
                WATCH.difference(WatchFlags::DONT_FOLLOW)
            } else {
                WATCH
            };
            let wd = match inotify::add_watch(&self.inotify, &d.path, flags) {
                Ok(wd) => wd,
                Err(Errno::NOSPC) => break,
                Err(_) => {
                    self.unwatched.remove(&id);
                    continue;
                }
            };
            self.unwatched.remove(&id);
            if let Some(n) = self.nodes.get_mut(&id) {
                n.wd = Some(wd);
            }
            self.wds.insert(wd, id);
            // Children that vanished while unwatched, then those that came.
            let now: HashSet<Vec<u8>> = read_children(&d.path).into_iter().collect();
            let gone: Vec<u64> = self.nodes[&id]
                .children
                .iter()
                .filter(|(n, _)| !now.contains(&n[..]))
                .map(|(_, c)| *c)
                .collect();
            for c in gone {
                self.remove(c, out);
            }
            let known: HashSet<Rc<[u8]>> = self.nodes[&id].children.keys().cloned().collect();
            let pp: Rc<[u8]> = path.into();
            let stack: Vec<Pending> = now
                .into_iter()
                .filter(|n| !known.contains(&n[..]))
                .map(|name| Pending {
                    parent: id,
                    name: name.into(),
                    parent_path: pp.clone(),
                    dir: None,
                })
                .collect();
            let mut cwd = Cwd::default();
            self.add(stack, Some(out), &mut cwd);
            cwd.restore();
        }
        if self.unwatched.is_empty() && self.warned_watches {
            self.warned_watches = false;
            crate::info!("inotify watches are available again: every cgroup is followed");
        }
        !self.unwatched.is_empty()
    }

    /// Reads the queued events (never blocks) and applies some of them to
    /// the tree: fair to every directory, bounded per call.
    ///
    /// The kernel queues the events of all watches in one FIFO, so a storm
    /// of mkdirs in one directory would put everyone else's behind it. So
    /// everything queued is read first (cheap: a copy, up to [`QUEUED`]
    /// held here besides the kernel's own queue), and then the events of
    /// directories with only a few pending ([`QUIET`]) are handled at once,
    /// and those of busy ones up to [`EVENTS_PER_TURN`] per call, oldest
    /// first. Events of one directory stay in order; across directories,
    /// order does not matter (each is checked against cgroupfs as it is
    /// applied, and a directory's events can only follow its creation).
    /// What is left waits for the next call ([`Tree::pending`]).
    pub fn read_events(&mut self, out: &mut Vec<Change>) -> std::io::Result<Status> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut queue = std::mem::take(&mut self.queue);
        let result = (|| {
            let mut reader = inotify::Reader::new(&self.inotify, &mut buf);
            loop {
                // Stop at a read boundary once enough are in hand: the
                // reader holds no partial events between reads.
                if queue.len() >= QUEUED && reader.is_buffer_empty() {
                    return Ok(());
                }
                match reader.next() {
                    Ok(e) => {
                        let name = e
                            .file_name()
                            .map(|n| n.to_bytes().into())
                            .unwrap_or_default();
                        queue.push_back((e.wd(), e.events(), name));
                    }
                    Err(Errno::AGAIN) => return Ok(()),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(std::io::Error::from(e)),
                }
            }
        })();
        self.buf = buf;
        if let Err(e) = result {
            self.queue = queue;
            return Err(e);
        }
        // Few pending (the usual case: one mkdir): all of them, in order,
        // each directory quiet. Otherwise quiet directories go first, then
        // the oldest events of busy ones.
        // (Reused from call to call: no allocation per event.)
        let mut events = std::mem::take(&mut self.batch);
        events.clear();
        if queue.len() <= QUIET {
            events.extend(queue.drain(..).map(|e| (e, false)));
        } else {
            let mut per_wd: HashMap<i32, usize, IdHash> = HashMap::default();
            for (wd, _, _) in &queue {
                *per_wd.entry(*wd).or_default() += 1;
            }
            let mut busy = 0usize;
            let mut rest = VecDeque::with_capacity(queue.len());
            for e in queue.drain(..) {
                let quiet = per_wd[&e.0] <= QUIET;
                if quiet || busy < EVENTS_PER_TURN {
                    busy += usize::from(!quiet);
                    events.push((e, !quiet));
                } else {
                    rest.push_back(e);
                }
            }
            queue = rest;
        }
        self.queue = queue;
        let mut cwd = Cwd::default();
        let status = self.apply_events(&mut events, out, &mut cwd);
        cwd.restore();
        self.batch = events;
        Ok(status)
    }

    /// Applies `events` (each with whether its directory is busy) in order.
    fn apply_events(
        &mut self,
        events: &mut Vec<(Event, bool)>,
        out: &mut Vec<Change>,
        cwd: &mut Cwd,
    ) -> Status {
        for ((wd, flags, name), busy) in events.drain(..) {
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                return Status::Overflow;
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
            let child = self
                .nodes
                .get(&parent)
                .and_then(|n| n.children.get(&name[..]))
                .copied();
            if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                // A rename onto an existing name replaced nothing (cgroup
                // rename needs a free name), but be safe: drop the old one.
                if let Some(old) = child {
                    self.remove(old, out);
                }
                self.add_child(parent, &name, busy, out, cwd);
            } else if flags.intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM)
                && let Some(child) = child
            {
                self.remove(child, out);
            }
        }
        Status::Ok
    }
}

/// The path of the pending directory `p`, built the first time it is asked.
fn path_of<'a>(path: &'a mut Option<Vec<u8>>, p: &Pending) -> &'a [u8] {
    path.get_or_insert_with(|| cgroup::child_path(&p.parent_path, &p.name))
}

fn open_dir(p: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The subdirectories of the open directory `fd` (the cgroup `id` at
/// `path`), as pending additions named relative to it.
fn children_of(id: u64, path: &Rc<[u8]>, fd: OwnedFd) -> Vec<Pending> {
    let mut out = Vec::new();
    let Ok(entries) = rustix::fs::Dir::read_from(&fd) else {
        return out;
    };
    let fd = Rc::new(fd);
    for e in entries.flatten() {
        let n = e.file_name().to_bytes();
        if e.file_type() == rustix::fs::FileType::Directory && n != b"." && n != b".." {
            out.push(Pending {
                parent: id,
                name: n.into(),
                parent_path: path.clone(),
                dir: Some(fd.clone()),
            });
        }
    }
    out
}

fn read_children(p: &Path) -> Vec<Vec<u8>> {
    let Ok(fd) = open_dir(p) else {
        return Vec::new();
    };
    let Ok(entries) = rustix::fs::Dir::read_from(&fd) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type() == rustix::fs::FileType::Directory)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect()
}

/// The working directory while adding: which directory we are in, and the
/// one to return to.
#[derive(Default)]
struct Cwd {
    here: Option<Rc<OwnedFd>>,
    /// Directories of cgroups with events: fd and path.
    parents: HashMap<u64, (Rc<OwnedFd>, Rc<[u8]>)>,
    original: Option<OwnedFd>,
}

impl Cwd {
    /// The open directory and the path of the cgroup `id`, opened once per
    /// call for the directories that have events (a few dozen kept open).
    fn parent_dir(&mut self, tree: &Tree, id: u64) -> Option<(Rc<OwnedFd>, Rc<[u8]>)> {
        if let Some(x) = self.parents.get(&id) {
            return Some(x.clone());
        }
        let path: Rc<[u8]> = tree.path(id)?.into();
        let d = cgroup::dir(&tree.root, &path).ok()?;
        let fd = Rc::new(
            rustix::fs::open(
                &d.path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()?,
        );
        if self.parents.len() >= 64 {
            self.parents.clear();
        }
        self.parents.insert(id, (fd.clone(), path.clone()));
        Some((fd, path))
    }

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
        self.parents.clear();
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
        let mut t = Tree::scan(&base, None).unwrap();
        let mut paths: Vec<_> = t.paths().into_iter().map(|(_, p)| p).collect();
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
        assert_eq!(t.path(id_b), Some(b"/a/b2".to_vec()));
        assert_eq!(t.len(), 5);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
