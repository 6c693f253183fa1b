//! The live ruleset, over netlink: does it have what the config names, what
//! does the map hold, and the transactions that change it. Kernel errors
//! become sentences that name the table, map, chain or cgroup.

use std::io;

use neli::consts::socket::NlFamily;

use crate::config::{Config, Verdict};
use crate::error::Error;
use crate::netlink::{NlError, Socket};
use crate::nftables::{self, Batch, Blame, ElemMsg, Element, MapRef, Object};
use crate::reconcile::Ops;
use crate::wire::ErrorMsg;

pub struct Ruleset {
    nl: Socket,
    pub map: MapRef,
    /// DESTROYSETELEM (Linux 6.3+): deletes that never fail on a missing key.
    pub destroy: bool,
}

/// Why a transaction failed, as far as the daemon's next move goes.
#[derive(Debug)]
pub enum ApplyError {
    /// The table or the map is gone: wait for the ruleset to come back.
    Missing(String),
    /// The map did not hold what we thought (EEXIST / ENOENT on an
    /// element), or the outcome is unknown: dump and reconcile.
    Diverged(String),
    /// Anything else (a chain went missing, permissions …): logged.
    Failed(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Missing(m) | ApplyError::Diverged(m) | ApplyError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    // "No such file or directory (os error 2)" → "No such file or directory"
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

/// A netlink failure as an error: EPERM means the missing capability,
/// anything else is said with `what` was being done.
pub fn nl_error(what: &str, e: NlError) -> Error {
    match e {
        NlError::Kernel(ErrorMsg {
            errno: libc::EPERM, ..
        }) => Error::Runtime("nf_tables: permission denied (cgtproxy needs CAP_NET_ADMIN)".into()),
        e => Error::Runtime(format!("{what}: {e}")),
    }
}

impl Ruleset {
    pub fn open(table: &str, map: &str) -> Result<Ruleset, Error> {
        let nl = Socket::open(NlFamily::Netfilter)
            .map_err(|e| Error::Runtime(format!("netlink socket: {e}")))?;
        Ok(Ruleset {
            nl,
            map: MapRef {
                table: table.into(),
                map: map.into(),
            },
            destroy: destroy_supported(),
        })
    }

    /// The socket, for read-only requests of other kinds (`check` dumps rules).
    pub fn socket(&mut self) -> &mut Socket {
        &mut self.nl
    }

    pub fn table_missing(&self) -> String {
        format!(
            "table inet {} does not exist — load nft/cgtproxy.nft first",
            self.map.table
        )
    }

    fn map_missing(&self) -> String {
        format!(
            "map '{}' does not exist in table inet {}",
            self.map.map, self.map.table
        )
    }

    /// Asks the kernel for one object; `f` sees its reply. False when it
    /// does not exist.
    pub fn get(
        &mut self,
        obj: &Object<'_>,
        mut f: impl FnMut(&crate::wire::Msg<'_>) -> Result<(), NlError>,
    ) -> Result<bool, Error> {
        let seq = self.nl.seq();
        match self
            .nl
            .request(&nftables::get_request(seq, obj), seq, false, |m| f(m))
        {
            Ok(()) => Ok(true),
            Err(NlError::Kernel(ErrorMsg {
                errno: libc::ENOENT,
                ..
            })) => Ok(false),
            Err(e) => Err(nl_error("nf_tables", e)),
        }
    }

    /// The table, the map (a verdict map keyed by an 8-byte cgroup id) and
    /// every chain a rule names must exist. Missing ones are configuration
    /// errors (exit 2), reported all at once.
    pub fn check(&mut self, cfg: &Config) -> Result<(), Error> {
        let table = self.map.table.clone();
        if !self.get(&Object::Table(&table), |_| Ok(()))? {
            return Err(Error::Config(format!(
                "{}: {}",
                cfg.source,
                self.table_missing()
            )));
        }
        let map = self.map.map.clone();
        let mut info = None;
        if !self.get(&Object::Set(&table, &map), |m| {
            info = Some(nftables::parse_set(m)?);
            Ok(())
        })? {
            return Err(Error::Config(format!(
                "{}: {} — load nft/cgtproxy.nft, or fix \"map\"",
                cfg.source,
                self.map_missing()
            )));
        }
        if let Some(i) = info
            && !(i.is_map && i.verdict_data && i.key_len == 8)
        {
            return Err(Error::Config(format!(
                "{}: '{map}' in table inet {table} is not a verdict map keyed by cgroupsv2 (want: map {map} {{ type cgroupsv2 : verdict; counter; }})",
                cfg.source
            )));
        }
        let mut missing = Vec::new();
        for (chain, rule) in cfg.chains() {
            if !self.get(&Object::Chain(&table, chain), |_| Ok(()))? {
                missing.push(format!("chain '{chain}' named by rules[{rule}].target does not exist in table inet {table}"));
            }
        }
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "{}: {}",
                cfg.source,
                missing.join("; ")
            )));
        }
        Ok(())
    }

    /// What the map holds now. `Ok(None)` when the table or map is missing.
    pub fn dump(&mut self) -> Result<Option<Vec<Element>>, Error> {
        // A dump is interrupted when the map changes under it; try again.
        for _ in 0..10 {
            let seq = self.nl.seq();
            let req = nftables::dump_elements_request(seq, &self.map);
            let mut out = Vec::new();
            let (table, map) = (self.map.table.clone(), self.map.map.clone());
            let r = self.nl.request(&req, seq, true, |m| {
                let (t, s, els) = nftables::parse_elements(m)?;
                if t == table && s == map {
                    out.extend(els);
                }
                Ok(())
            });
            match r {
                Ok(()) => return Ok(Some(out)),
                Err(NlError::Kernel(ErrorMsg {
                    errno: libc::ENOENT,
                    ..
                })) => return Ok(None),
                Err(NlError::Unknown("interrupted dump")) => continue,
                Err(e) => return Err(nl_error(&format!("dump of map {}", self.map.map), e)),
            }
        }
        Err(Error::Runtime(format!(
            "dump of map {}: interrupted ten times in a row",
            self.map.map
        )))
    }

    /// Applies `ops` as one transaction. `name` turns a cgroup id into words
    /// for error messages.
    pub fn apply(&mut self, ops: &Ops<'_>, name: &dyn Fn(u64) -> String) -> Result<(), ApplyError> {
        if ops.is_empty() {
            return Ok(());
        }
        let kind = if self.destroy {
            ElemMsg::Destroy
        } else {
            ElemMsg::Del
        };
        let mut b = Batch::new(self.nl.next_seq());
        b.elements(kind, &self.map, ops.del.iter().map(|id| (*id, None)));
        b.elements(
            ElemMsg::New,
            &self.map,
            ops.add.iter().map(|(id, v)| (*id, Some(*v))),
        );
        let (bytes, info) = b
            .finish()
            .map_err(|e| ApplyError::Failed(format!("encoding: {e}")))?;
        self.nl.used_up_to(info.end_seq);
        let errors = match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(e) => e,
            Err(e @ NlError::Unknown(_)) => {
                return Err(ApplyError::Diverged(format!(
                    "transaction outcome unknown: {e}"
                )));
            }
            Err(e) => return Err(ApplyError::Failed(format!("transaction: {e}"))),
        };
        let Some(e) = errors.first() else {
            return Ok(());
        };
        let what = errno_text(e.errno);
        let chain_of = |id: &u64| match ops.add.iter().find(|(i, _)| i == id) {
            Some((_, Verdict::Goto(c))) => c.clone(),
            _ => String::from("?"),
        };
        Err(match (e.errno, info.blame(e.seq, e.offset)) {
            (libc::EPERM, _) => ApplyError::Failed(
                "nf_tables: permission denied (cgtproxy needs CAP_NET_ADMIN)".into(),
            ),
            (libc::EOPNOTSUPP | libc::EINVAL, _) if info.kind(e.seq) == Some(ElemMsg::Destroy) => {
                // A kernel older than 6.3 (or a backport without it).
                self.destroy = false;
                ApplyError::Diverged(
                    "this kernel has no DESTROYSETELEM; deleting known elements only".into(),
                )
            }
            (libc::ENOENT, Some(Blame::Table)) => ApplyError::Missing(self.table_missing()),
            (libc::ENOENT, Some(Blame::Map)) => ApplyError::Missing(self.map_missing()),
            // A NEW fails with ENOENT only when its goto names a missing chain.
            (libc::ENOENT, Some(Blame::Added(id))) => ApplyError::Failed(format!(
                "chain '{}' (the verdict for cgroup {}) does not exist in table inet {}",
                chain_of(id),
                name(*id),
                self.map.table
            )),
            (libc::ENOENT, Some(Blame::Deleted(id))) => ApplyError::Diverged(format!(
                "cgroup {}: no such element in map {}",
                name(*id),
                self.map.map
            )),
            (libc::EEXIST, Some(Blame::Added(id))) => ApplyError::Diverged(format!(
                "cgroup {}: map {} already holds another verdict for it",
                name(*id),
                self.map.map
            )),
            (_, Some(Blame::Added(id) | Blame::Deleted(id))) => {
                ApplyError::Failed(format!("cgroup {}: {what}", name(*id)))
            }
            (libc::ENOENT, _) => ApplyError::Missing(format!(
                "{} (or its map '{}' is missing)",
                self.table_missing(),
                self.map.map
            )),
            _ => ApplyError::Failed(format!(
                "transaction on map {}: {what}{}",
                self.map.map,
                e.ext_msg
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            )),
        })
    }

    /// `flush map inet TABLE MAP`, as its own transaction.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        let mut b = Batch::new(self.nl.next_seq());
        b.flush(&self.map);
        let (bytes, info) = b
            .finish()
            .map_err(|e| ApplyError::Failed(format!("encoding: {e}")))?;
        self.nl.used_up_to(info.end_seq);
        match self.nl.commit(&bytes, &info.acked, info.begin_seq) {
            Ok(errors) if errors.is_empty() => Ok(()),
            Ok(errors) if errors[0].errno == libc::ENOENT => {
                Err(ApplyError::Missing(self.table_missing()))
            }
            Ok(errors) => Err(ApplyError::Failed(format!(
                "flush of map {}: {}",
                self.map.map,
                errno_text(errors[0].errno)
            ))),
            Err(e) => Err(ApplyError::Failed(format!(
                "flush of map {}: {e}",
                self.map.map
            ))),
        }
    }
}

/// DESTROYSETELEM arrived in Linux 6.3. Older kernels (and odd version
/// strings) get plain deletes of known elements. `CGTPROXY_NO_DESTROY=1`
/// forces the older way, for kernels whose backports misbehave and for
/// testing it on a new kernel.
fn destroy_supported() -> bool {
    if std::env::var_os("CGTPROXY_NO_DESTROY").is_some_and(|v| v == "1") {
        return false;
    }
    let u = rustix::system::uname();
    let rel = u.release().to_string_lossy();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 3)
}
