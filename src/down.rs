//! `cgtproxy down`: turning cgtproxy off, deliberately. Stopping the daemon
//! changes no verdict (a restart must open no window), so this is the way
//! off: it empties both maps and removes the policy routing the config
//! names, as one act, and refuses while a daemon holds the table and map
//! (that daemon would only put everything back).
//!
//! ```text
//! flush map inet TABLE cgroups; flush map inet TABLE verdicts
//! ip rule del priority PRIO fwmark MARK lookup TABLE; ip route del local default dev lo table TABLE
//! ```

use crate::config::{Config, DEFAULT_MARK};
use crate::error::Error;
use crate::error::Next;
use crate::instance;
use crate::options::Options;
use crate::route::{self, Policy};
use crate::ruleset::Ruleset;

pub fn down(opts: &Options) -> Result<i32, Error> {
    let cfg = Config::load(opts.config.as_deref())?;
    // Held until we are done, so no daemon starts half-way through.
    let _claim = instance::claim(&cfg.table, &cfg.map, ": stop it first")?;
    let mut failed = false;

    let mut rs = Ruleset::open(&cfg)?;
    let elements = rs.dump()?.map(|d| d.elements.len());
    match (elements, rs.flush()) {
        (Some(n), Ok(())) => println!(
            "cgtproxy: maps {} and {} of table inet {} emptied ({n} elements)",
            cfg.map, cfg.verdict_map, cfg.table
        ),
        (Some(_), Err(e)) if e.next() != Next::WaitForTable => {
            crate::warn!("{e}");
            failed = true;
        }
        _ => println!(
            "cgtproxy: table inet {} or its maps {} and {} do not exist: no elements to remove",
            cfg.table, cfg.map, cfg.verdict_map
        ),
    }

    if let Some(r) = cfg.route {
        // The mark the daemon would have routed: the config's, else the
        // live ruleset's (if the table is still there), else the default.
        let live = crate::inspect::ruleset_mark(&cfg).ok().flatten();
        let p = Policy {
            mark: r.mark.or(live).unwrap_or(DEFAULT_MARK),
            table: r.table,
            priority: r.priority,
        };
        let failures = route::remove(&p, None);
        for f in &failures {
            crate::warn!("removing {f}");
        }
        if failures.is_empty() {
            println!("cgtproxy: policy routing removed ({p})");
        }
        failed |= !failures.is_empty();
    }
    Ok(if failed { 1 } else { 0 })
}
