//! `cgtproxy run`: one loop, one thread. Data flows one way:
//!
//! ```text
//! inotify events ─▶ Tree (Changes) ─▶ reconcile (Ops) ─▶ one netlink batch
//! nf_tables events / overflow / SIGHUP ─▶ dump + full reconcile ─▶ one batch
//! rtnetlink rule/route deletions ─▶ route::install (puts back what is gone)
//! ```
//!
//! What the daemon knows about the kernel is one [`State`]: where the maps
//! stand ([`Maps`]) and where the policy routing stands ([`Routing`]); every
//! transition is a named method, and the loop only asks it what to do next.
//! Stopping changes nothing in the kernel: elements, verdicts and routes
//! stay, so a restart or an upgrade opens no window (`cgtproxy down` is the
//! deliberate way off).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use neli::consts::socket::NlFamily;
use rustix::event::{PollFd, PollFlags, poll};

use crate::cgroup;
use crate::config::Config;
use crate::error::Error;
use crate::error::Next;
use crate::instance::{self, Instance};
use crate::netlink::Socket;
use crate::options::{Options, load};
use crate::query::{self, Queries};
use crate::reconcile::{self, Numbers, Ops, Renumber};
use crate::route::{self, Policy};
use crate::ruleset::{Monitor, Ruleset};
use crate::signals::{Signal, Signals};
use crate::watch::{Change, Status, Tree};
use crate::{info, warn};

/// NFNLGRP_NFTABLES: ruleset change notifications.
const NFNLGRP_NFTABLES: u32 = 7;
/// Room for the events of a 10,000-element transaction (one skb each).
const EVENT_RCVBUF: usize = 32 << 20;
/// While the table is missing or a transaction keeps failing, try again
/// this often even without an event saying it might work now.
const RETRY: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 2,
    tv_nsec: 0,
};

/// Where the maps stand against cgroupfs × rules.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Maps {
    /// They hold exactly the truth; inotify changes apply incrementally.
    InStep,
    /// They may not (someone else's transaction, a rescan, a reload, a
    /// batch the kernel found diverged): dump and reconcile at the next turn.
    ResyncDue,
    /// The table or a map is gone (said once). `retry`: an event or the
    /// timer says it may be back.
    WaitingForTable { retry: bool },
    /// Transactions fail, with `error` (said once) since `since`; retried
    /// at the timer or at an event.
    Failing {
        since: Instant,
        error: String,
        retry: bool,
    },
}

/// Where the policy routing stands (only when the config asks for it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Routing {
    /// In place as far as we know.
    InPlace,
    /// A rule or route of ours was deleted (or events were lost): check
    /// and put back at the next turn.
    Missing,
    /// Putting it back failed with `error` (said once) since `since`;
    /// `retry`: the timer or an event says try again.
    Failing {
        since: Instant,
        error: String,
        retry: bool,
    },
}

#[derive(Debug)]
struct State {
    maps: Maps,
    routing: Routing,
    /// When "restored" was last said, and how often it was not said since:
    /// `ip route flush` deletes again what we put back, for up to ten
    /// rounds, and a fight like that must not flood the log.
    said_restored: Option<(Instant, u32)>,
}

/// After a "restored", the next one is said only after this much time (and
/// counts what it did not say); a flush's rounds come within milliseconds.
const RESTORED_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

impl State {
    /// Whether a full sync should run now.
    fn sync_now(&self) -> bool {
        matches!(
            self.maps,
            Maps::ResyncDue
                | Maps::WaitingForTable { retry: true }
                | Maps::Failing { retry: true, .. }
        )
    }

    /// Whether inotify changes can be applied as they come.
    fn in_step(&self) -> bool {
        self.maps == Maps::InStep
    }

    /// Whether the routing should be checked and repaired now.
    fn repair_now(&self) -> bool {
        matches!(
            self.routing,
            Routing::Missing | Routing::Failing { retry: true, .. }
        )
    }

    /// Whether the loop needs the retry timer.
    fn needs_timer(&self) -> bool {
        self.maps != Maps::InStep || matches!(self.routing, Routing::Failing { .. })
    }

    /// Something says the maps may be wrong now: resync at the next turn
    /// (a failing or waiting one too, at once rather than at the timer).
    fn resync_due(&mut self) {
        match &mut self.maps {
            Maps::InStep => self.maps = Maps::ResyncDue,
            Maps::WaitingForTable { retry } | Maps::Failing { retry, .. } => *retry = true,
            Maps::ResyncDue => {}
        }
    }

    /// The retry timer fired: try whatever is failing again.
    fn timer(&mut self) {
        if self.maps != Maps::InStep {
            self.resync_due();
        }
        if let Routing::Failing { retry, .. } = &mut self.routing {
            *retry = true;
        }
    }

    /// A sync failed; `full` when it was a full sync (so a diverged
    /// answer waits for the timer instead of looping). Logs what is new.
    fn sync_failed(&mut self, e: Error, full: bool) {
        let m = e.to_string();
        self.maps = match (e.next(), std::mem::replace(&mut self.maps, Maps::ResyncDue)) {
            (Next::WaitForTable, was) => {
                if !matches!(was, Maps::WaitingForTable { .. }) {
                    warn!("{m}; waiting for it (cgroups are still followed)");
                }
                Maps::WaitingForTable { retry: false }
            }
            (Next::Resync, was) => {
                info!("{m}; reconciling the whole map");
                match was {
                    _ if !full => Maps::ResyncDue,
                    Maps::Failing { since, error, .. } => Maps::Failing {
                        since,
                        error,
                        retry: false,
                    },
                    _ => Maps::Failing {
                        since: Instant::now(),
                        error: m,
                        retry: false,
                    },
                }
            }
            (Next::Log, was) => {
                let since = match was {
                    Maps::Failing { since, error, .. } if error == m => since,
                    Maps::Failing { since, .. } => {
                        warn!("{m}; retrying every {} s", RETRY.tv_sec);
                        since
                    }
                    _ => {
                        warn!("{m}; retrying every {} s", RETRY.tv_sec);
                        Instant::now()
                    }
                };
                Maps::Failing {
                    since,
                    error: m,
                    retry: false,
                }
            }
        };
    }

    /// A full sync committed: the maps are the truth again.
    fn synced(&mut self, cfg: &Config, s: &Synced) {
        match &self.maps {
            Maps::WaitingForTable { .. } => info!(
                "table inet {} is back; map {} refilled ({} elements)",
                cfg.table, cfg.map, s.elements
            ),
            _ if s.deleted + s.added > 0 => info!(
                "map {} reconciled: {} deleted, {} added",
                cfg.map, s.deleted, s.added
            ),
            _ => {}
        }
        if let Maps::Failing { since, .. } = &self.maps {
            info!(
                "map {} is right again (after {} s of failures)",
                cfg.map,
                since.elapsed().as_secs()
            );
        }
        self.maps = Maps::InStep;
    }

    /// A rule or route of ours was deleted, or we may have missed it.
    fn routing_missing(&mut self) {
        match &mut self.routing {
            Routing::InPlace => self.routing = Routing::Missing,
            Routing::Failing { retry, .. } => *retry = true,
            Routing::Missing => {}
        }
    }

    fn routing_restored(&mut self, made: &route::Made) {
        if !made.is_empty() {
            match &mut self.said_restored {
                Some((at, more)) if at.elapsed() < RESTORED_QUIET => *more += 1,
                said => {
                    let again = match said {
                        Some((_, n)) if *n > 0 => format!(
                            " (and {n} more times in the {} s before)",
                            RESTORED_QUIET.as_secs()
                        ),
                        _ => String::new(),
                    };
                    warn!(
                        "policy routing for {} removed by someone else: restored{again}",
                        made.families().join(" and ")
                    );
                    *said = Some((Instant::now(), 0));
                }
            }
        }
        if let Routing::Failing { since, .. } = &self.routing {
            info!(
                "policy routing is in place again (after {} s)",
                since.elapsed().as_secs()
            );
        }
        self.routing = Routing::InPlace;
    }

    fn routing_failed(&mut self, e: Error) {
        let m = e.to_string();
        let since = match std::mem::replace(&mut self.routing, Routing::Missing) {
            Routing::Failing { since, error, .. } if error == m => since,
            Routing::Failing { since, .. } => {
                warn!(
                    "policy routing removed by someone else; putting it back: {m}; retrying every {} s",
                    RETRY.tv_sec
                );
                since
            }
            _ => {
                warn!(
                    "policy routing removed by someone else; putting it back: {m}; retrying every {} s",
                    RETRY.tv_sec
                );
                Instant::now()
            }
        };
        self.routing = Routing::Failing {
            since,
            error: m,
            retry: false,
        };
    }
}

/// What a full sync did.
struct Synced {
    deleted: usize,
    added: usize,
    /// Elements in the map after it.
    elements: usize,
}

struct Daemon {
    opts: Options,
    cfg: Config,
    root: PathBuf,
    /// Levels below `root` that are followed (see `follow_limit`).
    limit: Option<u32>,
    /// Out of inotify watches: when to try again, and the backoff after.
    watch_retry: Option<(std::time::Instant, std::time::Duration)>,
    tree: Tree,
    rs: Ruleset,
    /// `verdicts` as last dumped, with this process's commits since. Any
    /// other writer's change to it makes the daemon dump again.
    numbers: Numbers,
    events: Option<Socket>,
    routes: Option<Policy>,
    watch: Option<route::Watch>,
    instance: Instance,
    /// Clients asking which element decides a cgroup (`cgtproxy exec`).
    queries: Queries,
    state: State,
    /// Other processes' transactions on our table, across reads.
    monitor: Monitor,
}

/// The routing the daemon keeps for `cfg`: the mark is the live ruleset's;
/// a `route.mark` that differs from it is refused (exit 2), since routing
/// one mark while the ruleset sets another sends proxied traffic nowhere.
pub fn policy(cfg: &Config) -> Result<Option<Policy>, Error> {
    let live = crate::inspect::ruleset_mark(cfg)?;
    let Some(r) = cfg.route else {
        if let Some(m) = live
            && !route::routes_mark(m)?
        {
            warn!(
                "\"route\" is false and no policy rule routes mark {m}: traffic of proxied cgroups is dropped until routing for it exists (ip rule add fwmark {m} lookup T; ip route add local default dev lo table T)"
            );
        }
        return Ok(None);
    };
    let mark = match (r.mark, live) {
        (Some(c), Some(l)) if c != l => {
            return Err(Error::Config(format!(
                "{}: route.mark {c} differs from the mark the ruleset's TPROXY rules match ({l}): make them equal (CGTPROXY_MARK in the ruleset, or drop route.mark to use the ruleset's)",
                cfg.source
            )));
        }
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => {
            let m = crate::config::DEFAULT_MARK;
            warn!(
                "no TPROXY mark found in table inet {}; routing mark {m} (set route.mark to choose)",
                cfg.table
            );
            m
        }
    };
    Ok(Some(Policy {
        mark,
        table: r.table,
        priority: r.priority,
    }))
}

fn warn_obsolete(cfg: &Config) {
    if cfg.keep_on_exit.is_some() {
        warn!(
            "{}: keep-on-exit is obsolete and ignored: stopping never removes elements or routes (`cgtproxy down` does)",
            cfg.source
        );
    }
}

pub fn run(opts: Options) -> Result<(), Error> {
    // Block the signals first: a SIGTERM during start-up is then handled
    // by the loop, never by the default action.
    let signals = Signals::block().map_err(|e| Error::Runtime(format!("signalfd: {e}")))?;
    let (cfg, root) = load(&opts)?;
    if let Some(fd) = opts.ready_fd {
        // SAFETY: F_GETFD only inspects the descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::Usage(format!(
                "--ready-fd {fd}: not an open file descriptor"
            )));
        }
    }
    if opts.dry_run {
        return dry_run(&cfg, &root);
    }
    // Before anything else in the kernel: a second instance touches nothing.
    let instance = instance::claim(&cfg.table, &cfg.map, "")?;
    warn_obsolete(&cfg);
    let mut rs = Ruleset::open(&cfg)?;
    rs.check(&cfg)?;
    let routes = policy(&cfg)?;
    // Subscribe before the first dump, so no change after it goes unseen.
    let (events, watch) = if opts.once {
        (None, None)
    } else {
        let events = Socket::subscribe(NlFamily::Netfilter, NFNLGRP_NFTABLES, EVENT_RCVBUF)
            .map_err(|e| Error::Runtime(format!("nf_tables event socket: {e}")))?;
        let watch = match routes {
            Some(_) => Some(route::Watch::open()?),
            None => None,
        };
        (Some(events), watch)
    };
    let limit = follow_limit(&cfg, &root)?;
    let tree = Tree::scan(&root, limit)
        .map_err(|e| Error::Runtime(format!("{}: {}", root.display(), crate::error::io(&e))))?;

    // Routes before elements: a proxied packet must never be marked while
    // its mark still routes normally.
    let created = match &routes {
        Some(r) => route::install(r)?,
        None => route::Made::default(),
    };
    let mut d = Daemon {
        opts,
        cfg,
        root,
        limit,
        watch_retry: None,
        tree,
        rs,
        numbers: Numbers::new(),
        events,
        routes,
        watch,
        instance,
        queries: Queries::default(),
        state: State {
            maps: Maps::ResyncDue,
            routing: Routing::InPlace,
            said_restored: None,
        },
        monitor: Monitor::default(),
    };
    // The initial sync is the full sync; only its failure is fatal.
    let synced = match d.sync() {
        Ok(s) => s,
        Err(e) => {
            // Leave the kernel as it was: remove only what this run added.
            if let Some(r) = &d.routes {
                route::take_back(r, &created);
            }
            return Err(match e.next() {
                Next::WaitForTable => Error::Config(e.to_string()),
                _ => Error::Runtime(format!("initial sync of map {}: {e}", d.cfg.map)),
            });
        }
    };
    d.state.maps = Maps::InStep;
    // Cgroups made while the tree was scanned are events by now: applied
    // before "ready", so ready means the map holds what cgroupfs held when
    // it was said, not when the scan began.
    let elements = if d.opts.once {
        Some(synced.elements)
    } else {
        d.settle(synced.elements)
    };
    let elements = match elements {
        Some(n) => format!("holds {n} elements"),
        None => "is resynced at the next turn".to_string(),
    };
    // Out of watches: cgroups made below an unwatched one are followed
    // only once the retry finds them; ready says so rather than be exact
    // by luck.
    let unwatched = match d.tree.unwatched() {
        0 => String::new(),
        n => format!(", {n} not watched for lack of inotify watches (retried)"),
    };
    info!(
        "watching {} cgroups under {}{unwatched}; map {} {elements}{}",
        d.tree.len(),
        d.root.display(),
        d.cfg.map,
        if d.opts.once { "" } else { "; ready" }
    );
    notify_ready(
        d.opts.ready_fd,
        &format!("STATUS=watching {} cgroups{unwatched}", d.tree.len()),
    );
    if d.opts.once {
        return Ok(());
    }
    let code = d.serve(&signals);
    notify("STOPPING=1");
    code
}

/// `--dry-run`: the initial sync's plan, printed; nothing is claimed or
/// changed.
fn dry_run(cfg: &Config, root: &std::path::Path) -> Result<(), Error> {
    let mut rs = Ruleset::open(cfg)?;
    rs.check(cfg)?;
    let tree = Tree::scan(root, follow_limit(cfg, root)?)
        .map_err(|e| Error::Runtime(format!("{}: {}", root.display(), crate::error::io(&e))))?;
    let dump = rs
        .dump()?
        .ok_or_else(|| Error::Config(rs.table_missing()))?;
    let ops = reconcile::full_of_tree(cfg, &tree, &dump.elements, &dump.numbers);
    let numbers = reconcile::plan(&dump.numbers, &ops).renumbered(&dump.numbers);
    let tree_gone = (&tree, &HashMap::new());
    print!(
        "{}",
        describe(&numbers, &cfg.verdict_map, &ops, tree_gone, "would ")
    );
    println!(
        "dry run: {} to delete, {} to add; nothing was changed",
        ops.del.len(),
        ops.add.len()
    );
    Ok(())
}

impl Daemon {
    fn serve(&mut self, signals: &Signals) -> Result<(), Error> {
        let mut changes = Vec::new();
        loop {
            if self.state.repair_now() {
                self.restore_routing();
            }
            if self.state.sync_now() {
                self.full_sync();
            }
            // Answered after this turn's events and any due sync, so an
            // answer says what is committed now.
            if self.queries.due() {
                self.answer_queries();
            }
            let (sig_ready, tree_ready, nft_ready, route_ready, asked) = {
                let (sfd, tfd, ifd) = (signals.fd(), self.tree.fd(), self.instance.fd());
                let efd = self.events.as_ref().map(|e| e.fd());
                let rfd = self.watch.as_ref().map(|w| w.fd());
                let mut fds = vec![
                    PollFd::new(&sfd, PollFlags::IN),
                    PollFd::new(&tfd, PollFlags::IN),
                ];
                let (mut ii, mut ei, mut ri) = (None, None, None);
                if let Some(ifd) = &ifd {
                    ii = Some(fds.len());
                    fds.push(PollFd::new(ifd, PollFlags::IN));
                }
                if let Some(efd) = &efd {
                    ei = Some(fds.len());
                    fds.push(PollFd::new(efd, PollFlags::IN));
                }
                if let Some(rfd) = &rfd {
                    ri = Some(fds.len());
                    fds.push(PollFd::new(rfd, PollFlags::IN));
                }
                let qi = fds.len();
                let qfds: Vec<_> = self.queries.fds().collect();
                fds.extend(qfds.iter().map(|q| PollFd::new(q, PollFlags::IN)));
                // Out of watches: the retry of the missing ones is due then.
                let watch_wait = self.watch_retry.map(|(at, _)| {
                    let left = at.saturating_duration_since(std::time::Instant::now());
                    rustix::time::Timespec {
                        tv_sec: left.as_secs() as i64,
                        tv_nsec: i64::from(left.subsec_nanos()),
                    }
                });
                let zero = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let (timeout, retry_timer) = match (self.state.needs_timer(), &watch_wait) {
                    // Events read and not handled yet: look at the fds, don't wait.
                    _ if self.tree.pending() > 0 => (Some(&zero), false),
                    (true, Some(w)) if w.tv_sec < RETRY.tv_sec => (watch_wait.as_ref(), false),
                    (true, _) => (Some(&RETRY), true),
                    (false, w) => (w.as_ref(), false),
                };
                let n = match poll(&mut fds, timeout) {
                    Ok(n) => n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(Error::Runtime(format!("poll: {e}"))),
                };
                if n == 0 && retry_timer {
                    // The retry timer: try again.
                    self.state.timer();
                }
                let ready = |i: Option<usize>| {
                    i.and_then(|i| fds.get(i))
                        .is_some_and(|f| !f.revents().is_empty())
                };
                (
                    ready(Some(0)),
                    ready(Some(1)),
                    ready(ei),
                    ready(ri),
                    ready(ii) || fds[qi..].iter().any(|f| !f.revents().is_empty()),
                )
            };
            self.queries.wake(asked);
            if sig_ready {
                for s in signals.pending() {
                    match s {
                        Signal::Stop(n) => {
                            info!(
                                "signal {n}: stopping; maps {} and {} and the routes stay (`cgtproxy down` removes them)",
                                self.cfg.map, self.cfg.verdict_map
                            );
                            return Ok(());
                        }
                        Signal::Reload => self.reload(),
                    }
                }
            }
            let failing = matches!(self.state.routing, Routing::Failing { .. });
            if route_ready
                && let (Some(w), Some(p)) = (&mut self.watch, &self.routes)
                && w.removed(p, failing)
            {
                self.state.routing_missing();
                // Before the next batch of anything else: the routing is
                // what keeps proxied traffic flowing.
                self.restore_routing();
            }
            if tree_ready || self.tree.pending() > 0 {
                changes.clear();
                match self.tree.read_events(&mut changes) {
                    Ok(Status::Ok) => {
                        self.apply_changes(&changes);
                    }
                    Ok(Status::Overflow) => {
                        warn!(
                            "inotify queue overflowed; rescanning {}",
                            self.root.display()
                        );
                        self.rescan();
                    }
                    Err(e) => return Err(Error::Runtime(format!("inotify: {e}"))),
                }
            }
            if nft_ready {
                self.ruleset_events();
            }
            self.watches();
        }
    }

    /// Applies the inotify events queued during the initial scan (a few
    /// turns at most: a storm at start is served by the loop). Returns how
    /// many elements that added, less those it deleted.
    fn settle(&mut self, elements: usize) -> Option<usize> {
        let mut changes = Vec::new();
        let mut added = 0isize;
        for _ in 0..8 {
            changes.clear();
            match self.tree.read_events(&mut changes) {
                Ok(Status::Ok) if changes.is_empty() && self.tree.pending() == 0 => break,
                Ok(Status::Ok) => added += self.apply_changes(&changes),
                Ok(Status::Overflow) => {
                    self.rescan();
                    break;
                }
                // The loop meets it again and stops with it.
                Err(_) => break,
            }
        }
        // A rescan, or a batch the kernel refused (someone else's change
        // meanwhile): the full sync now, not after ready.
        if self.state.sync_now() {
            return match self.sync() {
                Ok(s) => {
                    let n = s.elements;
                    self.state.synced(&self.cfg, &s);
                    Some(n)
                }
                Err(e) => {
                    self.state.sync_failed(e, true);
                    None
                }
            };
        }
        Some(elements.saturating_add_signed(added))
    }

    /// Out of inotify watches: retries the missing ones on a backoff
    /// (1 s, doubling up to a minute), and applies what they find.
    fn watches(&mut self) {
        use std::time::{Duration, Instant};
        let now = Instant::now();
        match self.watch_retry {
            _ if self.tree.unwatched() == 0 => self.watch_retry = None,
            None => self.watch_retry = Some((now + Duration::from_secs(1), Duration::from_secs(1))),
            Some((at, _)) if at > now => {}
            Some((_, backoff)) => {
                let mut changes = Vec::new();
                let left = self.tree.retry_watches(&mut changes);
                self.apply_changes(&changes);
                self.watch_retry = left.then(|| {
                    let b = (backoff * 2).min(Duration::from_secs(64));
                    (Instant::now() + b, b)
                });
            }
        }
    }

    /// Answers the waiting queries from the tree, the rules and the
    /// committed numbers (see `query`): the truth of the maps while they
    /// are in step, "not in step" otherwise.
    fn answer_queries(&mut self) {
        let not_in_step = match &self.state.maps {
            Maps::InStep => None,
            Maps::ResyncDue => Some("a resync of the maps is due".to_string()),
            Maps::WaitingForTable { .. } => Some(format!(
                "table inet {} or its maps are missing; the daemon waits for them",
                self.cfg.table
            )),
            Maps::Failing { error, .. } => Some(format!("transactions fail: {error}")),
        };
        let view = query::View {
            cfg: &self.cfg,
            tree: &self.tree,
            numbers: &self.numbers,
            not_in_step,
            root_level: self.queries.root_level(&self.root),
        };
        self.queries.serve(self.instance.listener(), &view);
    }

    /// Puts back whatever part of the policy routing is gone.
    fn restore_routing(&mut self) {
        let Some(p) = &self.routes else {
            self.state.routing = Routing::InPlace;
            return;
        };
        match route::repair(p) {
            Ok(made) => self.state.routing_restored(&made),
            Err(e) => self.state.routing_failed(e),
        }
    }

    /// One batch of inotify events → one transaction. Returns the elements
    /// it added less those it deleted (0 when nothing was committed).
    fn apply_changes(&mut self, changes: &[Change]) -> isize {
        if changes.is_empty() {
            return 0;
        }
        // -v: every event, also those that change no element (listed ones
        // are logged with their element below).
        if crate::log::enabled(crate::log::DEBUG) {
            for c in changes {
                let (verb, path) = match c {
                    Change::Added { path, .. } => ("mkdir", path),
                    Change::Removed { path, .. } => ("rmdir", path),
                };
                if let Some(why) = self.cfg.unlisted(&crate::config::match_form(path)) {
                    crate::debug!("{verb} {}: {why}", cgroup::display(path));
                }
            }
        }
        if !self.state.in_step() {
            return 0; // a full sync is due anyway, and will include these
        }
        let ops = reconcile::incremental(&self.cfg, changes);
        if ops.is_empty() {
            return 0;
        }
        let gone: HashMap<u64, &[u8]> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Removed { id, path } => Some((*id, path.as_slice())),
                _ => None,
            })
            .collect();
        let name = |id| name(&self.tree, &gone, id);
        match commit(&mut self.rs, &mut self.numbers, &ops, &name) {
            Ok(numbers) => {
                let map = &self.cfg.verdict_map;
                crate::log::write_lines(&describe(&numbers, map, &ops, (&self.tree, &gone), ""));
                ops.add.len() as isize - ops.del.len() as isize
            }
            Err(e) => {
                self.state.sync_failed(e, false);
                0
            }
        }
    }

    /// Dump the maps and make them exactly right in one transaction (the
    /// map's old content is replaced, never left half-filled): the initial
    /// sync, and every resync after.
    fn sync(&mut self) -> Result<Synced, Error> {
        let actual = match self.rs.dump() {
            Ok(Some(d)) => {
                self.numbers = d.numbers;
                d.elements
            }
            Ok(None) => {
                return Err(Error::Refused(Next::WaitForTable, self.rs.table_missing()));
            }
            Err(e) => return Err(e),
        };
        let ops = reconcile::full_of_tree(&self.cfg, &self.tree, &actual, &self.numbers);
        let empty = HashMap::new();
        let name = |id| name(&self.tree, &empty, id);
        let numbers = commit(&mut self.rs, &mut self.numbers, &ops, &name)?;
        let map = &self.cfg.verdict_map;
        crate::log::write_lines(&describe(&numbers, map, &ops, (&self.tree, &empty), ""));
        Ok(Synced {
            deleted: ops.del.len(),
            added: ops.add.len(),
            elements: actual.len() + ops.add.len() - ops.del.len(),
        })
    }

    fn full_sync(&mut self) {
        match self.sync() {
            Ok(s) => self.state.synced(&self.cfg, &s),
            Err(e) => self.state.sync_failed(e, true),
        }
    }

    fn rescan(&mut self) {
        // A new root or depth is a new tree; otherwise the same one again,
        // its old watches given back first.
        let same_root = std::path::absolute(&self.root).is_ok_and(|r| r == self.tree.root());
        let r = if !same_root {
            Tree::scan(&self.root, self.limit).map(|t| self.tree = t)
        } else {
            self.tree.set_limit(self.limit);
            self.tree.rescan()
        };
        if let Err(e) = r {
            warn!("rescan of {}: {e}", self.root.display());
        }
        self.state.resync_due();
    }

    /// nf_tables events: someone else's transaction that touched our table,
    /// either map or their elements means the map may be wrong now
    /// (`ruleset::Monitor` decides).
    fn ruleset_events(&mut self) {
        let Some(ev) = &mut self.events else { return };
        let me = std::process::id();
        let resync = match self.monitor.read(ev, &self.rs.map, &self.rs.verdicts, me) {
            Ok(resync) => resync,
            Err(e) => {
                // Lost events (ENOBUFS): we can't know what changed.
                if !e.outcome_unknown() {
                    warn!("nf_tables events: {e}");
                }
                true
            }
        };
        if resync {
            self.state.resync_due();
        }
        if self.monitor.rules_changed() {
            self.follow_ruleset();
        }
    }

    /// Someone changed our table's chains or rules (a reload of the
    /// ruleset, an edit): the deepest level it looks up may have moved, so
    /// the tree is followed deeper (or pruned) to match, without a SIGHUP.
    fn follow_ruleset(&mut self) {
        let limit = match follow_limit(&self.cfg, &self.root) {
            Ok(l) => l,
            // The table is gone or unreadable: the sync that follows says
            // so; keep the depth until a ruleset says otherwise.
            Err(_) => return,
        };
        if limit == self.limit {
            return;
        }
        let show = |l: Option<u32>| l.map_or("all".to_string(), |l| l.to_string());
        info!(
            "the ruleset now looks up other levels: following {} levels below {} (was {})",
            show(limit),
            self.root.display(),
            show(self.limit)
        );
        self.limit = limit;
        self.rescan();
    }

    /// SIGHUP: the new config replaces the old only if it is valid and the
    /// ruleset has everything it names; then one transaction applies the
    /// difference.
    fn reload(&mut self) {
        notify("RELOADING=1");
        let moved = |cfg: &Config| cfg.table != self.cfg.table || cfg.map != self.cfg.map;
        let result = (|| {
            let (cfg, root) = load(&self.opts)?;
            // Another table or map is another daemon's unless we can claim it.
            let claim = if moved(&cfg) {
                Some(instance::claim(&cfg.table, &cfg.map, "")?)
            } else {
                None
            };
            let mut rs = Ruleset::open(&cfg)?;
            rs.check(&cfg)?;
            let routes = policy(&cfg)?;
            Ok::<_, Error>((cfg, root, rs, routes, claim))
        })();
        let (cfg, root, rs, routes, claim) = match result {
            Ok(x) => x,
            Err(e) => {
                warn!("reload refused, keeping the running configuration: {e}");
                notify("READY=1");
                return;
            }
        };
        // Routes before elements, as at start; a route the kernel refuses
        // refuses the reload (install takes back what it added).
        if routes != self.routes {
            if let Some(r) = &routes
                && let Err(e) = route::install(r)
            {
                warn!("reload refused, keeping the running configuration: {e}");
                notify("READY=1");
                return;
            }
            if let Some(old) = &self.routes {
                for f in route::remove(old, routes.as_ref()) {
                    warn!("removing old route: {f}");
                }
            }
            if routes.is_some() && self.watch.is_none() {
                match route::Watch::open() {
                    Ok(w) => self.watch = Some(w),
                    Err(e) => warn!("{e}; routing removed by others is not put back"),
                }
            }
            self.routes = routes;
            self.state.routing = Routing::InPlace;
        }
        warn_obsolete(&cfg);
        if cfg.table != self.cfg.table
            || cfg.map != self.cfg.map
            || cfg.verdict_map != self.cfg.verdict_map
        {
            // The old maps are no longer anyone's: the config moved away
            // from them on purpose.
            if let Err(e) = self.rs.flush() {
                warn!(
                    "emptying the old maps {} and {}: {e}",
                    self.cfg.map, self.cfg.verdict_map
                );
            }
            self.rs = rs;
        }
        if let Some(c) = claim {
            self.instance = c;
        }
        // A ruleset that cannot be read now keeps the depth followed so far.
        let limit = follow_limit(&cfg, &root).unwrap_or_else(|e| {
            warn!("{e}; following cgroupfs as deep as before");
            self.limit
        });
        let root_changed = root != self.root || limit != self.limit;
        self.cfg = cfg;
        self.root = root;
        self.limit = limit;
        if root_changed {
            self.rescan();
        }
        info!("configuration reloaded from {}", self.cfg.source);
        self.state.resync_due();
        self.full_sync();
        notify("READY=1");
    }
}

/// Plans `ops` against `numbers` (reconcile decides every number), commits
/// the plan, and moves `numbers` on to what the kernel now holds. Returns
/// the numbers that changed.
fn commit(
    rs: &mut Ruleset,
    numbers: &mut Numbers,
    ops: &Ops<'_>,
    name: &dyn Fn(u64) -> String,
) -> Result<Vec<Renumber>, Error> {
    let plan = reconcile::plan(numbers, ops);
    rs.commit(&plan, name)?;
    let changed = plan.renumbered(numbers);
    *numbers = plan.numbers;
    Ok(changed)
}

/// How many levels below `root` to follow: down to the deepest level the
/// live ruleset looks up, counted from the hierarchy's root (a `--cgroup-root`
/// below it starts deeper). Nothing below can get an element that takes
/// effect. When the root's own level cannot be known, the ruleset's depth
/// is used as is (an upper bound).
fn follow_limit(cfg: &Config, root: &std::path::Path) -> Result<Option<u32>, Error> {
    let deepest = crate::inspect::deepest_level(cfg)?;
    let base = cgroup::level_of(root);
    let below = crate::inspect::levels_below(deepest, base);
    if below == 0 {
        warn!(
            "cgroup root {} is at level {}, but the ruleset looks up levels down to {}: no element the daemon writes takes effect",
            root.display(),
            base.unwrap_or(0),
            deepest.unwrap_or(16)
        );
    }
    Ok(Some(below))
}

/// A cgroup for messages: its path (escaped), or that it is gone.
fn name(tree: &Tree, gone: &HashMap<u64, &[u8]>, id: u64) -> String {
    match tree.path(id).or_else(|| gone.get(&id).map(|p| p.to_vec())) {
        Some(p) => format!("{} (id {id})", cgroup::display(&p)),
        None => format!("id {id} (no such cgroup)"),
    }
}

/// Beyond this many element changes in one transaction the log gets one
/// summary line (each change with `-v`): a start on a big system or a burst
/// must not flood the journal.
const LOG_EACH_UP_TO: usize = 16;

/// One line per changed verdict number and per element change, for the log
/// or `--dry-run` (which always lists every change).
fn describe(
    numbers: &[Renumber],
    verdict_map: &str,
    ops: &Ops<'_>,
    (tree, gone): (&Tree, &HashMap<u64, &[u8]>),
    would: &str,
) -> String {
    if !crate::log::enabled(crate::log::INFO) && would.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    // Verdict numbers change rarely (a verdict's first use, a repair after
    // someone else edited the maps): always one line each.
    for r in numbers {
        let (map, n) = (verdict_map, r.number);
        let _ = match (&r.before, &r.after) {
            (None, Some(v)) => writeln!(s, "cgtproxy: {would}bind {map} {n}: {v}"),
            (Some(b), Some(v)) => writeln!(s, "cgtproxy: {would}bind {map} {n}: {v} (was {b})"),
            (Some(b), None) => writeln!(s, "cgtproxy: {would}unbind {map} {n} (was {b})"),
            (None, None) => Ok(()),
        };
    }
    let changes = ops.del.len().max(ops.add.len());
    if would.is_empty() && changes > LOG_EACH_UP_TO && !crate::log::enabled(crate::log::DEBUG) {
        let _ = writeln!(
            s,
            "cgtproxy: {} elements deleted, {} added in one transaction (-v lists each)",
            ops.del.len(),
            ops.add.len()
        );
        return s;
    }
    let replaced: std::collections::HashSet<u64> = ops.add.iter().map(|(id, _)| *id).collect();
    for id in &ops.del {
        if !replaced.contains(id) {
            let _ = writeln!(s, "cgtproxy: {would}delete {}", name(tree, gone, *id));
        }
    }
    let deleted: std::collections::HashSet<u64> = ops.del.iter().copied().collect();
    for (id, v) in &ops.add {
        let verb = if deleted.contains(id) { "set" } else { "add" };
        let _ = writeln!(s, "cgtproxy: {would}{verb} {}: {v}", name(tree, gone, *id));
    }
    s
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_bytes();
    let addr = if let Some(abs) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(abs)
    } else {
        SocketAddr::from_pathname(std::path::Path::new(&path))
    };
    if let Ok(addr) = addr
        && let Err(e) = sock.send_to_addr(state.as_bytes(), &addr)
    {
        warn!("NOTIFY_SOCKET: {e}");
    }
}

/// After the initial transaction committed: systemd's READY=1, and a
/// newline on `--ready-fd` (s6, dinit), which is then closed.
fn notify_ready(ready_fd: Option<i32>, status: &str) {
    notify(&format!("READY=1\n{status}"));
    if let Some(fd) = ready_fd {
        // SAFETY: checked open at start; we own it from here and close it.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if let Err(e) = rustix::io::write(&fd, b"\n") {
            warn!("--ready-fd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            maps: Maps::InStep,
            routing: Routing::InPlace,
            said_restored: None,
        }
    }

    fn cfg() -> Config {
        Config::parse("t", r#"{"rules": []}"#).unwrap()
    }

    const SYNCED: Synced = Synced {
        deleted: 0,
        added: 0,
        elements: 0,
    };

    /// What it proves: the transitions of the sync state, one by one —
    /// an event makes a resync due; a failing transaction waits for the
    /// timer (not a busy loop) but an event retries at once; a table that
    /// is gone is waited for; a diverged incremental batch resyncs at once,
    /// a diverged full sync waits; a success is in step again; lost routing
    /// is repaired at the next turn and a failed repair waits for the timer.
    /// How it can fail: any transition to the wrong state (a resync never
    /// tried, or tried in a loop without the timer).
    #[test]
    fn sync_state_transitions() {
        let mut s = state();
        assert!(!s.sync_now() && s.in_step() && !s.needs_timer());
        s.timer();
        assert!(s.in_step(), "the timer alone changes nothing in step");
        s.resync_due();
        assert!(s.sync_now() && !s.in_step());

        s.sync_failed(Error::Refused(Next::Log, "boom".into()), true);
        assert!(matches!(&s.maps, Maps::Failing { error, retry: false, .. } if error == "boom"));
        assert!(!s.sync_now() && s.needs_timer());
        s.timer();
        assert!(s.sync_now(), "the timer retries");
        let since = match &s.maps {
            Maps::Failing { since, .. } => *since,
            m => panic!("{m:?}"),
        };
        s.sync_failed(Error::Refused(Next::Log, "boom".into()), true);
        assert!(matches!(&s.maps, Maps::Failing { since: t, .. } if *t == since));
        s.resync_due();
        assert!(s.sync_now(), "an event retries at once");
        s.synced(&cfg(), &SYNCED);
        assert!(s.in_step());

        s.resync_due();
        s.sync_failed(Error::Refused(Next::WaitForTable, "gone".into()), true);
        assert_eq!(s.maps, Maps::WaitingForTable { retry: false });
        assert!(!s.sync_now() && s.needs_timer());
        s.resync_due();
        assert_eq!(s.maps, Maps::WaitingForTable { retry: true });
        s.synced(&cfg(), &SYNCED);
        assert!(s.in_step());

        s.sync_failed(Error::Refused(Next::Resync, "odd".into()), false);
        assert!(s.sync_now(), "a diverged batch resyncs at once");
        s.sync_failed(Error::Refused(Next::Resync, "odd".into()), true);
        assert!(!s.sync_now(), "a diverged full sync waits for the timer");

        let mut s = state();
        s.routing_missing();
        assert_eq!(s.routing, Routing::Missing);
        assert!(s.repair_now());
        s.routing_failed(Error::Runtime("no".into()));
        assert!(matches!(s.routing, Routing::Failing { retry: false, .. }) && s.needs_timer());
        assert!(!s.repair_now(), "a failed repair waits");
        s.timer();
        assert!(s.repair_now(), "the timer retries the repair");
        s.routing_failed(Error::Runtime("no".into()));
        assert!(matches!(s.routing, Routing::Failing { retry: false, .. }));
        s.routing_missing();
        assert!(s.repair_now(), "an event retries the repair");
        s.routing_restored(&route::Made::default());
        assert_eq!(s.routing, Routing::InPlace);
    }
}
