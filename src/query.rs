//! The daemon's query side: anyone in its network namespace may ask "which
//! element decides cgroup X now?" on the instance socket
//! `@cgtproxy/TABLE/MAP` ([`crate::instance`]), so that `cgtproxy exec`
//! without CAP_NET_ADMIN (nfnetlink refuses every request of an
//! unprivileged process) waits for the element instead of for a fixed
//! delay.
//!
//! The protocol, one line each way (ASCII, `\n`-terminated):
//!
//! ```text
//! request: verdict ID [ID...]        the cgroup's id, then its ancestors'
//!                                    (deepest first, at most MAX_IDS)
//! answer:  listed ID NUMBER VERDICT PATH   the element that decides it
//!          unlisted ID PATH          no element for it or above it
//!          unknown ROOT              no ID is a cgroup the daemon follows
//!          pending                   cgroup events not handled yet: ask again
//!          not-in-step REASON        the maps may not be the truth (failing,
//!                                    waiting for the table): ask again
//!          error REASON              a request it does not understand
//! ```
//!
//! `ID` is the cgroup id the kernel matches (the directory's inode number);
//! `VERDICT` is `drop` or `goto:CHAIN`; `PATH` is the escaped path below the
//! daemon's cgroup root (the rest of the line). The answer says what is
//! committed to the kernel: it is computed from the tree and the rules only
//! while the maps are in step (then the map holds exactly an element per
//! followed cgroup the rules list), and after the events read so far were
//! applied; when the first id is not known and cgroup events are still
//! unread, the answer is `pending`, since the mkdir the caller made before
//! asking may be among them.
//!
//! Why the ancestors travel in the request: the daemon cannot find a
//! cgroup by id (that needs open_by_handle_at, CAP_DAC_READ_SEARCH), and a
//! cgroup below the depth the ruleset looks up is never followed; the first
//! id it knows is then the deepest one that can have an element.
//!
//! The daemon is single-threaded: accepted sockets are non-blocking, at
//! most [`MAX_CLIENTS`] wait for their request (the oldest is dropped for a
//! new one), at most [`ACCEPTS_PER_TURN`] are accepted per turn of the
//! loop, a request is at most [`REQUEST_MAX`] bytes, a client is dropped
//! after [`CLIENT_TIMEOUT`] or at any error, and an answer that does not fit
//! in the socket at once is dropped. So a client that sends nothing, or
//! floods, costs bounded memory and bounded work per turn, and the cgroup
//! events of everyone else are still handled every turn.
//!
//! Trust, on the asking side: anyone can bind an abstract name, so an
//! answer is believed only from a peer that could be the daemon (root, or
//! CAP_NET_ADMIN in our user namespace; [`crate::instance::privileged_peer`]).
//! A false "listed ... goto:proxy" from a squatter would be a silent leak.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup;
use crate::config::{Config, Verdict};
use crate::instance;
use crate::reconcile::{self, FILLED};
use crate::watch::Tree;

/// Cgroup ids in one request: deeper than this, no ruleset looks up.
pub const MAX_IDS: usize = 64;
/// Bytes in one request line, newline included (64 ids of 20 digits).
pub const REQUEST_MAX: usize = 2048;
/// Clients waiting for their request to arrive, at most.
pub const MAX_CLIENTS: usize = 64;
/// Connections accepted per turn of the daemon's loop, at most.
pub const ACCEPTS_PER_TURN: usize = 64;
/// A client that has not sent its whole request by then is dropped.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the asking side waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// A verdict as the protocol writes it: `drop` or `goto:CHAIN`.
fn verdict_word(v: &Verdict) -> String {
    match v {
        Verdict::Drop => "drop".into(),
        Verdict::Goto(c) => format!("goto:{c}"),
        other => format!("other:{}", other.to_string().replace(' ', "_")),
    }
}

fn parse_verdict(w: &str) -> Option<Verdict> {
    match w {
        "drop" => Some(Verdict::Drop),
        _ => w
            .strip_prefix("goto:")
            .filter(|c| !c.is_empty())
            .map(|c| Verdict::Goto(c.to_string())),
    }
}

/// One answer (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Listed {
        id: u64,
        number: u32,
        verdict: Verdict,
        path: String,
    },
    Unlisted {
        id: u64,
        path: String,
    },
    Unknown {
        root: String,
    },
    Pending,
    NotInStep(String),
    Error(String),
}

impl Answer {
    /// The answer's line, newline included.
    pub fn line(&self) -> String {
        let one = |s: &str| s.replace('\n', " ");
        match self {
            Answer::Listed {
                id,
                number,
                verdict,
                path,
            } => format!(
                "listed {id} {number} {} {}\n",
                verdict_word(verdict),
                one(path)
            ),
            Answer::Unlisted { id, path } => format!("unlisted {id} {}\n", one(path)),
            Answer::Unknown { root } => format!("unknown {}\n", one(root)),
            Answer::Pending => "pending\n".into(),
            Answer::NotInStep(r) => format!("not-in-step {}\n", one(r)),
            Answer::Error(r) => format!("error {}\n", one(r)),
        }
    }

    /// Reads an answer line (without its newline).
    pub fn parse(line: &str) -> Option<Answer> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Some(match word {
            "listed" => {
                let mut f = rest.splitn(4, ' ');
                let id = f.next()?.parse().ok()?;
                let number = f.next()?.parse().ok()?;
                let verdict = parse_verdict(f.next()?)?;
                let path = f.next()?.to_string();
                Answer::Listed {
                    id,
                    number,
                    verdict,
                    path,
                }
            }
            "unlisted" => {
                let (id, path) = rest.split_once(' ')?;
                Answer::Unlisted {
                    id: id.parse().ok()?,
                    path: path.to_string(),
                }
            }
            "unknown" => Answer::Unknown {
                root: rest.to_string(),
            },
            "pending" if rest.is_empty() => Answer::Pending,
            "not-in-step" => Answer::NotInStep(rest.to_string()),
            "error" => Answer::Error(rest.to_string()),
            _ => return None,
        })
    }
}

/// The request line for a cgroup and its ancestors (deepest first).
pub fn request(ids: &[u64]) -> String {
    let mut s = String::from("verdict");
    for id in ids.iter().take(MAX_IDS) {
        s.push(' ');
        s.push_str(&id.to_string());
    }
    s.push('\n');
    s
}

/// The ids of a request line (without its newline).
fn parse_request(line: &[u8]) -> Result<Vec<u64>, String> {
    let line = std::str::from_utf8(line).map_err(|_| "the request is not ASCII".to_string())?;
    let mut words = line.split(' ');
    match words.next() {
        Some("verdict") => {}
        _ => return Err("unknown request (expected: verdict ID [ID...])".into()),
    }
    let ids: Vec<u64> = words
        .map(|w| {
            w.parse::<u64>()
                .map_err(|_| format!("{w:?} is not a cgroup id"))
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(format!("expected 1 to {MAX_IDS} cgroup ids"));
    }
    Ok(ids)
}

/// What the daemon knows, for one answer.
pub struct View<'a> {
    pub cfg: &'a Config,
    pub tree: &'a Tree,
    /// `verdicts` as committed.
    pub numbers: &'a [(u32, Verdict)],
    /// `Some(reason)` when the maps are not in step.
    pub not_in_step: Option<String>,
    /// Level of the tree's root in the hierarchy (0 at the cgroup2 root,
    /// which no rule of the ruleset looks up).
    pub root_level: usize,
}

impl View<'_> {
    /// The answer for a cgroup and its ancestors (deepest first).
    pub fn answer(&self, ids: &[u64]) -> Answer {
        if let Some(r) = &self.not_in_step {
            return Answer::NotInStep(r.clone());
        }
        let Some((i, first)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| self.tree.path(**id).is_some())
        else {
            if unread(self.tree) {
                return Answer::Pending;
            }
            return Answer::Unknown {
                root: self.tree.root().display().to_string(),
            };
        };
        // A deeper one the tree does not know yet may be in the events
        // still unread (the caller's own mkdir).
        if i > 0 && unread(self.tree) {
            return Answer::Pending;
        }
        let mut at = Some(*first);
        while let Some(id) = at {
            at = self.tree.parent(id);
            // The root of the hierarchy is at level 0: never looked up.
            if at.is_none() && self.root_level == 0 {
                break;
            }
            let Some(path) = self.tree.path(id) else {
                break;
            };
            if let Some(v) = reconcile::verdict_of(self.cfg, &path) {
                let number = self
                    .numbers
                    .iter()
                    .find(|(n, w)| *n != FILLED && w == v)
                    .map(|(n, _)| *n);
                let Some(number) = number else {
                    return Answer::NotInStep(format!("no number in verdicts for {v}"));
                };
                return Answer::Listed {
                    id,
                    number,
                    verdict: v.clone(),
                    path: cgroup::display(&path),
                };
            }
        }
        Answer::Unlisted {
            id: *first,
            path: cgroup::display(&self.tree.path(*first).unwrap_or_default()),
        }
    }
}

/// Whether the tree has cgroup events not handled yet: read and queued, or
/// still in the kernel's inotify queue.
fn unread(tree: &Tree) -> bool {
    tree.pending() > 0 || readable(tree.fd())
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut p = [PollFd::new(&fd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut p, Some(&zero)), Ok(n) if n > 0)
}

struct Client {
    sock: UnixStream,
    buf: Vec<u8>,
    since: Instant,
}

/// The daemon's clients, between turns of its loop.
#[derive(Default)]
pub struct Queries {
    clients: Vec<Client>,
    /// The listener or a client was readable: serve at the next turn.
    due: bool,
    /// The cgroup root's level, found once per root.
    level: Option<(PathBuf, usize)>,
}

impl Queries {
    /// The clients' sockets, for the poll set.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.clients.iter().map(|c| c.sock.as_fd())
    }

    /// Something was readable: serve at the next turn, after the state
    /// settled (events applied, a due sync done).
    pub fn wake(&mut self, ready: bool) {
        self.due |= ready;
    }

    pub fn due(&self) -> bool {
        self.due
    }

    /// How many clients wait for their request (for tests and bounds).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The level of `root` in the hierarchy (cached: it reads mountinfo).
    pub fn root_level(&mut self, root: &Path) -> usize {
        match &self.level {
            Some((r, l)) if r == root => *l,
            _ => {
                let l = cgroup::level_of(root).unwrap_or(0);
                self.level = Some((root.to_path_buf(), l));
                l
            }
        }
    }

    /// Accepts new clients (bounded), reads what they sent, answers every
    /// complete request with `view` and closes it; drops clients that
    /// failed, sent too much or waited too long.
    pub fn serve(&mut self, listener: Option<&UnixListener>, view: &View<'_>) {
        self.due = false;
        self.clients.retain_mut(|c| serve_one(c, view));
        let Some(l) = listener else { return };
        for _ in 0..ACCEPTS_PER_TURN {
            // EAGAIN: none left; any other error is the client's (gone
            // before it was accepted), and the next poll says if more wait.
            let Ok((sock, _)) = l.accept() else { return };
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            let mut c = Client {
                sock,
                buf: Vec::new(),
                since: Instant::now(),
            };
            // A client writes its request right after connecting: most are
            // answered here, and only those still silent are kept (the
            // oldest of them make room for new ones).
            if serve_one(&mut c, view) {
                if self.clients.len() >= MAX_CLIENTS {
                    self.clients.remove(0);
                }
                self.clients.push(c);
            }
        }
        // The cap was reached: the rest at the next turn, after everything
        // else the loop does (poll wakes it: the listener is readable).
    }
}

/// Reads from one client and answers it when its request is complete.
/// Returns whether it is still waiting.
fn serve_one(c: &mut Client, view: &View<'_>) -> bool {
    let mut chunk = [0u8; 512];
    loop {
        match c.sock.read(&mut chunk) {
            // Closed before a whole request (a second instance reading our
            // pid does that).
            Ok(0) => return false,
            Ok(n) => {
                let room = REQUEST_MAX - c.buf.len();
                c.buf.extend_from_slice(&chunk[..n.min(room)]);
                if let Some(end) = c.buf.iter().position(|&b| b == b'\n') {
                    let answer = match parse_request(&c.buf[..end]) {
                        Ok(ids) => view.answer(&ids),
                        Err(e) => Answer::Error(e),
                    };
                    send(&c.sock, &answer);
                    return false;
                }
                if c.buf.len() >= REQUEST_MAX {
                    let e = Answer::Error(format!("request longer than {REQUEST_MAX} bytes"));
                    send(&c.sock, &e);
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return c.since.elapsed() < CLIENT_TIMEOUT;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// One short line fits an empty socket buffer; if it does not, the client
/// loses its answer, never the daemon its turn (and a client gone is no
/// SIGPIPE).
fn send(sock: &UnixStream, a: &Answer) {
    use std::os::fd::AsRawFd;
    let line = a.line();
    // SAFETY: send(2) reads `line` within its length.
    let _ = unsafe {
        libc::send(
            sock.as_raw_fd(),
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// Why asking failed.
#[derive(Debug)]
pub enum AskError {
    /// Nobody listens on the name (no daemon for this table and map in
    /// this network namespace), or its backlog is full: ask again.
    NoDaemon(String),
    /// The peer cannot be a cgtproxy daemon: its answer is not believed.
    Untrusted(String),
    /// Anything else (a timeout, a garbled answer): ask again.
    Failed(String),
}

/// Asks the daemon of `table`/`map` which element decides the cgroup
/// `ids[0]` (its ancestors after it), believing only a privileged peer;
/// waits at most `limit` (and at most a second) for the answer.
pub fn ask(table: &str, map: &str, ids: &[u64], limit: Duration) -> Result<Answer, AskError> {
    let name = instance::name(table, map);
    let shown = format!("@{}", String::from_utf8_lossy(&name));
    let fd = instance::connect(&name).map_err(|e| {
        AskError::NoDaemon(format!(
            "no cgtproxy daemon answers on {shown} in this network namespace ({})",
            crate::error::io(&e)
        ))
    })?;
    let cred = instance::peer_cred(fd.as_fd())
        .ok_or_else(|| AskError::Failed(format!("{shown}: SO_PEERCRED failed")))?;
    if !instance::privileged_peer(&cred) {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", cred.pid))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        return Err(AskError::Untrusted(format!(
            "{shown} is held by pid {} ({comm:?}, uid {}), which cannot be a cgtproxy daemon (neither root nor CAP_NET_ADMIN in this user namespace): its answer is not believed",
            cred.pid, cred.uid
        )));
    }
    let mut sock = UnixStream::from(fd);
    let failed = |what: &str, e: io::Error| {
        AskError::Failed(format!("{shown}: {what}: {}", crate::error::io(&e)))
    };
    // A zero timeout would mean none.
    let limit = limit.clamp(Duration::from_millis(1), ANSWER_TIMEOUT);
    sock.set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(limit)))
        .and_then(|()| sock.set_write_timeout(Some(limit)))
        .map_err(|e| failed("socket", e))?;
    sock.write_all(request(ids).as_bytes())
        .map_err(|e| failed("sending the request", e))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.contains(&b'\n') && got.len() < 8192 {
        match sock.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed("reading the answer", e)),
        }
    }
    let line = got.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    Answer::parse(&line).ok_or_else(|| {
        AskError::Failed(format!(
            "{shown}: no answer, or one not understood: {line:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What it proves: every answer survives its line (a path with spaces
    /// included), and lines that are not answers are refused. How it can
    /// fail: a field lost or shifted, a verdict misread.
    #[test]
    fn answers_round_trip() {
        for a in [
            Answer::Listed {
                id: 7,
                number: 3,
                verdict: Verdict::Goto("proxy".into()),
                path: "/a b/cgtproxy-proxy.slice".into(),
            },
            Answer::Listed {
                id: u64::MAX,
                number: 1,
                verdict: Verdict::Drop,
                path: "/x".into(),
            },
            Answer::Unlisted {
                id: 9,
                path: "/u v".into(),
            },
            Answer::Unknown {
                root: "/sys/fs/cgroup".into(),
            },
            Answer::Pending,
            Answer::NotInStep("table inet t is missing".into()),
            Answer::Error("no".into()),
        ] {
            let line = a.line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(Answer::parse(line.trim_end_matches('\n')), Some(a));
        }
        for bad in [
            "",
            "listed 1 2",
            "listed x 2 drop /p",
            "listed 1 2 goto: /p",
            "listed 1 2 accept /p",
            "pending now",
            "yes",
        ] {
            assert_eq!(Answer::parse(bad), None, "{bad:?}");
        }
    }

    /// What it proves: a request carries at most MAX_IDS ids and the
    /// daemon reads back exactly them; anything else is an error. How it
    /// can fail: an id lost, a garbled request taken as one.
    #[test]
    fn requests_are_bounded_and_strict() {
        let ids: Vec<u64> = (1..=100).collect();
        let r = request(&ids);
        assert!(r.len() <= REQUEST_MAX);
        let got = parse_request(r.trim_end().as_bytes()).unwrap();
        assert_eq!(got, (1..=MAX_IDS as u64).collect::<Vec<_>>());
        assert!(parse_request(b"verdict").is_err());
        assert!(parse_request(b"verdict 1 x").is_err());
        assert!(parse_request(b"verdict  1").is_err());
        assert!(parse_request(b"status 1").is_err());
        assert!(parse_request(b"verdict \xff").is_err());
        let many = format!("verdict{}", " 1".repeat(MAX_IDS + 1));
        assert!(parse_request(many.as_bytes()).is_err());
    }

    /// What it proves: the answer is the deciding element as the tree and
    /// rules make it — the cgroup's own, else its nearest listed
    /// ancestor's, never the hierarchy's root (level 0, not looked up) —
    /// with the committed number; "pending" while the caller's mkdir is
    /// still unread (its parent known, it not); "not in step" and
    /// "unknown" as such. How it can fail: an ancestor answered for a
    /// cgroup whose own mkdir is unread (exec would trust a verdict the
    /// cgroup may not get), or a wrong element or number.
    #[test]
    fn the_deciding_element_and_pending_events() {
        let base = std::env::temp_dir().join(format!("cgtproxy-query-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("top/p.slice/q")).unwrap();
        let cfg = Config::parse(
            "t",
            r#"{"rules": [{"match": "/top/p\\.slice", "target": "proxy"},
                          {"match": "/", "target": "direct"}]}"#,
        )
        .unwrap();
        let mut tree = Tree::scan(&base, None).unwrap();
        let numbers = vec![(FILLED, Verdict::Drop), (4, Verdict::Goto("proxy".into()))];
        let id = |p: &str| cgroup::id_of(&base.join(p)).unwrap();
        let (slice, q, top, root) = (id("top/p.slice"), id("top/p.slice/q"), id("top"), id(""));
        let view = |tree: &Tree, not_in_step: Option<String>| {
            View {
                cfg: &cfg,
                tree,
                numbers: &numbers,
                not_in_step,
                root_level: 0,
            }
            .answer(&[q, slice, top, root])
        };
        let listed = Answer::Listed {
            id: slice,
            number: 4,
            verdict: Verdict::Goto("proxy".into()),
            path: "/top/p.slice".into(),
        };
        assert_eq!(view(&tree, None), listed);
        assert_eq!(
            view(&tree, Some("failing".into())),
            Answer::NotInStep("failing".into())
        );
        // The root matches "/" (direct) but is never looked up.
        let only_top = View {
            cfg: &cfg,
            tree: &tree,
            numbers: &numbers,
            not_in_step: None,
            root_level: 0,
        }
        .answer(&[top, root]);
        assert_eq!(
            only_top,
            Answer::Unlisted {
                id: top,
                path: "/top".into()
            }
        );
        // A cgroup made just now: its parent is known, its mkdir unread.
        std::fs::create_dir(base.join("top/p.slice/q/new")).unwrap();
        let new = id("top/p.slice/q/new");
        let ask = |tree: &Tree| {
            View {
                cfg: &cfg,
                tree,
                numbers: &numbers,
                not_in_step: None,
                root_level: 0,
            }
            .answer(&[new, q, slice, top, root])
        };
        assert_eq!(ask(&tree), Answer::Pending);
        let mut changes = Vec::new();
        tree.read_events(&mut changes).unwrap();
        assert_eq!(ask(&tree), listed);
        // Ids the daemon does not follow, nothing unread.
        let other = View {
            cfg: &cfg,
            tree: &tree,
            numbers: &numbers,
            not_in_step: None,
            root_level: 0,
        }
        .answer(&[u64::MAX - 1]);
        assert!(matches!(other, Answer::Unknown { .. }), "{other:?}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
