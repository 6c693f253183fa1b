//! `cgtproxy run`: one loop, one thread. Data flows one way:
//!
//! ```text
//! inotify events ─▶ Tree (Changes) ─▶ reconcile (Ops) ─▶ one netlink batch
//! nf_tables events / overflow / SIGHUP ─▶ dump + full reconcile ─▶ one batch
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use neli::consts::socket::NlFamily;
use rustix::event::{PollFd, PollFlags, poll};

use crate::cgroup;
use crate::config::{Config, Route};
use crate::error::Error;
use crate::netlink::Socket;
use crate::nftables::{self, NFNL_SUBSYS_NFTABLES};
use crate::reconcile::{self, Numbers, Ops, Renumber};
use crate::route;
use crate::ruleset::{ApplyError, Ruleset};
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

#[derive(Debug, Default, Clone)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub once: bool,
    pub dry_run: bool,
    pub ready_fd: Option<i32>,
}

/// Loads the config, with `--cgroup-root` taking precedence over the file.
pub fn load(opts: &Options) -> Result<(Config, PathBuf), Error> {
    let mut cfg = Config::load(opts.config.as_deref())?;
    if let Some(d) = &opts.cgroup_root {
        cfg.cgroup_root = crate::config::CgroupRoot::Dir(d.clone());
    }
    let root = cgroup::resolve_root(&cfg.cgroup_root)?;
    Ok((cfg, root))
}

struct Daemon {
    opts: Options,
    cfg: Config,
    root: PathBuf,
    tree: Tree,
    rs: Ruleset,
    /// `verdicts` as last dumped, with this process's commits since. Any
    /// other writer's change to it makes the daemon dump again.
    numbers: Numbers,
    events: Option<Socket>,
    routes: Option<Route>,
    /// The map may not match the tree: dump and reconcile at the next turn.
    resync: bool,
    /// The table or map is gone; said once, until it is back.
    missing: bool,
    /// Consecutive failed attempts; past one, wait for an event or RETRY.
    failures: u32,
    /// The last failure logged: a persistent one is said once, not every RETRY.
    last_failure: Option<String>,
}

pub fn run(opts: Options) -> Result<(), Error> {
    // Block the signals first: a SIGTERM during start-up is then handled
    // by the loop (clean-up included), never by the default action.
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
    let mut rs = Ruleset::open(&cfg)?;
    rs.check(&cfg)?;
    // Subscribe before the first dump, so no change after it goes unseen.
    let events = if opts.once || opts.dry_run {
        None
    } else {
        Some(
            Socket::subscribe(NlFamily::Netfilter, NFNLGRP_NFTABLES, EVENT_RCVBUF)
                .map_err(|e| Error::Runtime(format!("nf_tables event socket: {e}")))?,
        )
    };
    let tree = Tree::scan(&root)
        .map_err(|e| Error::Runtime(format!("{}: {}", root.display(), crate::error::io(&e))))?;
    let dump = rs
        .dump()?
        .ok_or_else(|| Error::Config(rs.table_missing()))?;
    let (actual, mut numbers) = (dump.elements, dump.numbers);
    let ops = reconcile::full(&cfg, tree.iter(), &actual, &numbers);

    if opts.dry_run {
        let numbers = reconcile::plan(&numbers, &ops).renumbered(&numbers);
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
        return Ok(());
    }

    // Routes before elements: a proxied packet must never be marked while
    // its mark still routes normally.
    let routes = cfg.route;
    let created = match &routes {
        Some(r) => route::install(r)?,
        None => false,
    };
    let renumbered = match commit(&mut rs, &mut numbers, &ops, &|id| {
        name(&tree, &HashMap::new(), id)
    }) {
        Ok(n) => n,
        Err(e) => {
            // Leave the kernel as it was: remove only routes this run created.
            if let (Some(r), true) = (&routes, created) {
                route::remove(r, None);
            }
            return Err(Error::Runtime(format!(
                "initial sync of map {}: {e}",
                cfg.map
            )));
        }
    };
    let tree_gone = (&tree, &HashMap::new());
    crate::log::write_lines(&describe(
        &renumbered,
        &cfg.verdict_map,
        &ops,
        tree_gone,
        "",
    ));
    info!(
        "watching {} cgroups under {}; map {} holds {} elements{}",
        tree.len(),
        root.display(),
        cfg.map,
        actual.len() + ops.add.len() - ops.del.len(),
        if opts.once { "" } else { "; ready" }
    );
    notify_ready(
        opts.ready_fd,
        &format!("STATUS=watching {} cgroups", tree.len()),
    );
    if opts.once {
        return Ok(());
    }

    // The initial sync's temporaries (a path per cgroup, the dump) would
    // otherwise stay resident for the daemon's whole life.
    drop(ops);
    drop(actual);
    let mut d = Daemon {
        opts,
        cfg,
        root,
        tree,
        rs,
        numbers,
        events,
        routes,
        resync: false,
        missing: false,
        failures: 0,
        last_failure: None,
    };
    let code = d.serve(&signals);
    d.shutdown();
    code
}

impl Daemon {
    fn serve(&mut self, signals: &Signals) -> Result<(), Error> {
        let mut changes = Vec::new();
        loop {
            if self.resync && self.failures == 0 {
                self.full_sync();
            }
            let (sig_ready, tree_ready, nft_ready) = {
                let (sfd, tfd) = (signals.fd(), self.tree.fd());
                let efd = self.events.as_ref().map(|e| e.fd());
                let mut fds = vec![
                    PollFd::new(&sfd, PollFlags::IN),
                    PollFd::new(&tfd, PollFlags::IN),
                ];
                if let Some(efd) = &efd {
                    fds.push(PollFd::new(efd, PollFlags::IN));
                }
                let timeout = if self.resync { Some(&RETRY) } else { None };
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(Error::Runtime(format!("poll: {e}"))),
                }
                let ready = |i: usize| fds.get(i).is_some_and(|f| !f.revents().is_empty());
                (ready(0), ready(1), ready(2))
            };
            if !sig_ready && !tree_ready && !nft_ready && self.resync {
                // The retry timer: try again.
                self.failures = 0;
            }
            if sig_ready {
                for s in signals.pending() {
                    match s {
                        Signal::Stop(n) => {
                            info!("signal {n}: stopping");
                            return Ok(());
                        }
                        Signal::Reload => self.reload(),
                    }
                }
            }
            if tree_ready {
                changes.clear();
                match self.tree.read_events(&mut changes) {
                    Ok(Status::Ok) => self.apply_changes(&changes),
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
        }
    }

    /// One batch of inotify events → one transaction.
    fn apply_changes(&mut self, changes: &[Change]) {
        if changes.is_empty() {
            return;
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
        if self.resync {
            return; // a full sync is due anyway, and will include these
        }
        let ops = reconcile::incremental(&self.cfg, changes);
        if ops.is_empty() {
            return;
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
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: ApplyError) {
        match &e {
            ApplyError::Missing(m) => {
                if !self.missing {
                    warn!("{m}; waiting for it (cgroups are still followed)");
                }
                self.missing = true;
                self.failures += 1;
            }
            ApplyError::Diverged(m) => {
                info!("{m}; reconciling the whole map");
                // Immediately once; if that fails too, wait for the timer.
                self.failures = u32::from(self.resync);
            }
            ApplyError::Failed(m) => {
                if self.last_failure.as_ref() != Some(m) {
                    warn!("{m}; retrying every {} s", RETRY.tv_sec);
                    self.last_failure = Some(m.clone());
                }
                self.failures += 1;
            }
        }
        self.resync = true;
    }

    /// Dump the map and make it exactly right in one transaction.
    fn full_sync(&mut self) {
        let actual = match self.rs.dump() {
            Ok(Some(d)) => {
                self.numbers = d.numbers;
                d.elements
            }
            Ok(None) => {
                self.failed(ApplyError::Missing(self.rs.table_missing()));
                return;
            }
            Err(e) => {
                self.failed(ApplyError::Failed(e.to_string()));
                return;
            }
        };
        let ops = reconcile::full(&self.cfg, self.tree.iter(), &actual, &self.numbers);
        let empty = HashMap::new();
        let name = |id| name(&self.tree, &empty, id);
        match commit(&mut self.rs, &mut self.numbers, &ops, &name) {
            Ok(numbers) => {
                let map = &self.cfg.verdict_map;
                crate::log::write_lines(&describe(&numbers, map, &ops, (&self.tree, &empty), ""));
                if self.missing {
                    info!(
                        "table inet {} is back; map {} refilled ({} elements)",
                        self.cfg.table,
                        self.cfg.map,
                        actual.len() + ops.add.len() - ops.del.len()
                    );
                } else if !ops.is_empty() {
                    info!(
                        "map {} reconciled: {} deleted, {} added",
                        self.cfg.map,
                        ops.del.len(),
                        ops.add.len()
                    );
                }
                if self.last_failure.take().is_some() {
                    info!("map {} is right again", self.cfg.map);
                }
                self.missing = false;
                self.resync = false;
                self.failures = 0;
            }
            Err(e) => self.failed(e),
        }
    }

    fn rescan(&mut self) {
        match Tree::scan(&self.root) {
            Ok(t) => self.tree = t,
            Err(e) => warn!("rescan of {}: {e}", self.root.display()),
        }
        self.resync = true;
        self.failures = 0;
    }

    /// nf_tables events: someone else's transaction that touched our table,
    /// either map or their elements means the map may be wrong now.
    fn ruleset_events(&mut self) {
        let Some(ev) = &mut self.events else { return };
        let me = std::process::id();
        let (table, map, verdicts) = (
            self.cfg.table.as_str(),
            self.cfg.map.as_str(),
            self.cfg.verdict_map.as_str(),
        );
        let mut touched = false;
        let mut resync = false;
        let r = ev.drain(|m| {
            if m.ty >> 8 != NFNL_SUBSYS_NFTABLES {
                return;
            }
            let kind = (m.ty & 0xff) as u8;
            if kind == nftables::NFT_MSG_NEWGEN {
                // The end of one transaction; its committer's pid.
                if touched && nftables::parse_newgen_pid(m).ok().flatten() != Some(me) {
                    resync = true;
                }
                touched = false;
                return;
            }
            let Ok((a, b)) = nftables::parse_names(m) else {
                return;
            };
            touched |= match kind {
                nftables::NFT_MSG_NEWTABLE | nftables::NFT_MSG_DELTABLE => a == table,
                nftables::NFT_MSG_NEWSET
                | nftables::NFT_MSG_DELSET
                | nftables::NFT_MSG_NEWSETELEM
                | nftables::NFT_MSG_DELSETELEM
                | nftables::NFT_MSG_DESTROYSETELEM => a == table && (b == map || b == verdicts),
                _ => false,
            };
        });
        if let Err(e) = r {
            // Lost events (ENOBUFS): we can't know what changed.
            if !e.outcome_unknown() {
                warn!("nf_tables events: {e}");
            }
            resync = true;
        }
        if resync {
            self.resync = true;
            self.failures = 0;
        }
    }

    /// SIGHUP: the new config replaces the old only if it is valid and the
    /// ruleset has everything it names; then one transaction applies the
    /// difference.
    fn reload(&mut self) {
        notify("RELOADING=1");
        let result = (|| {
            let (cfg, root) = load(&self.opts)?;
            let mut rs = Ruleset::open(&cfg)?;
            rs.check(&cfg)?;
            Ok::<_, Error>((cfg, root, rs))
        })();
        let (cfg, root, rs) = match result {
            Ok(x) => x,
            Err(e) => {
                warn!("reload refused, keeping the running configuration: {e}");
                notify("READY=1");
                return;
            }
        };
        // Routes before elements, as at start; a route the kernel refuses
        // refuses the reload (install takes back what it added).
        if cfg.route != self.routes {
            if let Some(r) = &cfg.route
                && let Err(e) = route::install(r)
            {
                warn!("reload refused, keeping the running configuration: {e}");
                notify("READY=1");
                return;
            }
            if let Some(old) = &self.routes {
                for f in route::remove(old, cfg.route.as_ref()) {
                    warn!("removing old route: {f}");
                }
            }
            self.routes = cfg.route;
        }
        if cfg.table != self.cfg.table
            || cfg.map != self.cfg.map
            || cfg.verdict_map != self.cfg.verdict_map
        {
            if let Err(e) = self.rs.flush() {
                warn!(
                    "emptying the old maps {} and {}: {e}",
                    self.cfg.map, self.cfg.verdict_map
                );
            }
            self.rs = rs;
        }
        let root_changed = root != self.root;
        self.cfg = cfg;
        self.root = root;
        if root_changed {
            self.rescan();
        }
        info!("configuration reloaded from {}", self.cfg.source);
        self.resync = true;
        self.failures = 0;
        self.full_sync();
        notify("READY=1");
    }

    /// SIGTERM/SIGINT: take back what we added, unless told to keep it.
    fn shutdown(&mut self) {
        notify("STOPPING=1");
        if self.cfg.keep_on_exit {
            info!(
                "keep-on-exit: leaving maps {} and {} and the routes in place",
                self.cfg.map, self.cfg.verdict_map
            );
            return;
        }
        match self.rs.flush() {
            Ok(()) | Err(ApplyError::Missing(_)) => {}
            Err(e) => warn!("{e}"),
        }
        if let Some(r) = &self.routes {
            for f in route::remove(r, None) {
                warn!("removing {f}");
            }
        }
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
) -> Result<Vec<Renumber>, ApplyError> {
    let plan = reconcile::plan(numbers, ops);
    rs.commit(&plan, name)?;
    let changed = plan.renumbered(numbers);
    *numbers = plan.numbers;
    Ok(changed)
}

/// A cgroup for messages: its path (escaped), or that it is gone.
fn name(tree: &Tree, gone: &HashMap<u64, &[u8]>, id: u64) -> String {
    match tree.path(id).or_else(|| gone.get(&id).copied()) {
        Some(p) => format!("{} (id {id})", cgroup::display(p)),
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
