use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::table::{self, Align};
use super::{Live, load};
use crate::cgroup;
use crate::config::{Config, Verdict, match_form};
use crate::error::Error;
use crate::options::Options;
use crate::route::{self, FamilyState, Policy};

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

struct Row {
    id: u64,
    path: Option<Vec<u8>>,
    verdict: Verdict,
    counter: Option<(u64, u64)>,
}

/// `cgtproxy status [--json]`: every element of the map with its cgroup
/// and counters. Returns the exit status.
pub fn status(opts: &Options, as_json: bool) -> Result<i32, Error> {
    let (cfg, h) = load(opts)?;
    let mut live = Live::open(&cfg)?;
    let dump = live.dump(&cfg)?;
    // The cgroups walked are those the ruleset looks up; an element below
    // them (none the daemon writes) shows as a cgroup that is gone.
    let deepest = live.rules().ok().and_then(|r| {
        super::rules::analyse(&r, &cfg.map, &cfg.verdict_map)
            .levels
            .last()
            .copied()
    });
    let filled = crate::reconcile::filled(&dump.numbers);
    let els = dump.elements;
    let wanted: HashSet<u64> = els.iter().map(|e| e.id).collect();
    let mut paths: HashMap<u64, Vec<u8>> = HashMap::new();
    for (dir, id) in h.walk(deepest).cgroups {
        if wanted.contains(&id)
            && let Some(p) = h.rules_path(&dir)
        {
            paths.insert(id, p);
        }
    }
    let mut rows: Vec<Row> = els
        .into_iter()
        .map(|e| Row {
            id: e.id,
            path: paths.remove(&e.id),
            verdict: e.verdict,
            counter: e.counter,
        })
        .collect();
    // Cgroups by path, then the gone ones by id.
    rows.sort_unstable_by(|a, b| {
        (a.path.is_none(), &a.path, a.id).cmp(&(b.path.is_none(), &b.path, b.id))
    });
    let routing = routing(&cfg);
    let text = if as_json {
        status_json(&cfg, &rows, &routing_json(&routing))
    } else {
        let mut t = status_table(&rows);
        if !filled {
            // The ruleset records nothing `direct` until a full sync.
            t.push_str(
                "maps not yet filled: no daemon has synced them since the ruleset was loaded\n",
            );
        }
        t.push_str(&routing_text(&routing));
        t
    };
    print!("{text}");
    Ok(0)
}

/// The policy routing the config names, as the kernel has it now, per
/// family; `None` when the config leaves routing to the user.
type Routing = Option<(Policy, Result<Vec<FamilyState>, String>)>;

fn routing(cfg: &Config) -> Routing {
    let r = cfg.route?;
    let live = super::ruleset_mark(cfg).ok().flatten();
    let p = Policy {
        mark: r.mark.or(live).unwrap_or(crate::config::DEFAULT_MARK),
        table: r.table,
        priority: r.priority,
    };
    Some((p, route::state(&p).map_err(|e| e.to_string())))
}

/// After the table, a blank line, then one line per family (and one per
/// rule that precedes ours).
fn routing_text(routing: &Routing) -> String {
    let Some((p, states)) = routing else {
        return "\nrouting: left to the user (\"route\": false)\n".into();
    };
    let mut s = format!("\nrouting: {p}\n");
    let states = match states {
        Ok(x) => x,
        Err(e) => {
            let _ = writeln!(s, "  unknown: {e}");
            return s;
        }
    };
    let word = |b: bool| if b { "in place" } else { "MISSING" };
    for f in states {
        if f.disabled {
            let _ = writeln!(s, "  {}: disabled", f.name);
            continue;
        }
        let _ = writeln!(
            s,
            "  {}: rule {}, route {}",
            f.name,
            word(f.rule),
            word(f.route)
        );
        for r in &f.ahead {
            let _ = writeln!(s, "  {}: ahead of ours: {r}", f.name);
        }
    }
    s
}

/// `{"mark","priority","table","ipv4":{..},"ipv6":{..}}` or `null`.
fn routing_json(routing: &Routing) -> String {
    let Some((p, states)) = routing else {
        return "null".into();
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\"mark\":{},\"priority\":{},\"table\":{}",
        p.mark, p.priority, p.table
    );
    match states {
        Ok(states) => {
            for f in states {
                let ahead: Vec<String> = f.ahead.iter().map(|r| json_str(&r.to_string())).collect();
                let _ = write!(
                    out,
                    ",{}:{{\"ahead\":[{}],\"disabled\":{},\"route\":{},\"rule\":{}}}",
                    json_str(&f.name.to_ascii_lowercase()),
                    ahead.join(","),
                    f.disabled,
                    f.route,
                    f.rule
                );
            }
        }
        Err(e) => {
            let _ = write!(out, ",\"error\":{}", json_str(e));
        }
    }
    out.push('}');
    out
}

fn status_table(rows: &[Row]) -> String {
    let num = |c: Option<(u64, u64)>, bytes: bool| match c {
        Some((p, b)) => (if bytes { b } else { p }).to_string(),
        None => "-".into(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.verdict.to_string(),
                num(r.counter, false),
                num(r.counter, true),
                match &r.path {
                    Some(p) => cgroup::display(p),
                    None => r.id.to_string(),
                },
            ]
        })
        .collect();
    table::render(
        "",
        &["VERDICT", "PACKETS", "BYTES", "CGROUP"],
        &[Align::Left, Align::Right, Align::Right],
        &cells,
    )
}

/// Text from the system (a process's comm, a name) as shown to people: the
/// injective escaped form of [`crate::cgroup::escape`], so a hostile
/// process name carries no control or bidi character to a terminal.
pub(super) fn shown(s: &str) -> String {
    crate::cgroup::display(s.as_bytes())
}

/// A JSON string literal. Written by hand: the output is small and fixed,
/// and a serializer would cost more binary than this.
pub(super) fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            // Control and format (bidi) characters as escapes: the value
            // is the same to a JSON reader, and nothing reaches a terminal
            // that reorders or rewrites what is shown around it.
            c if c.is_control() || crate::cgroup::is_format(c) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(o, "\\u{:04x}", u);
                }
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `{"elements":[{"bytes","chain","id","packets","path","verdict"}],"map","routing","table"}`,
/// keys sorted, one line; unknown values are `null`.
fn status_json(cfg: &Config, rows: &[Row], routing: &str) -> String {
    let num = |x: Option<u64>| x.map_or("null".to_string(), |x| x.to_string());
    let mut out = String::from("{\"elements\":[");
    for (i, r) in rows.iter().enumerate() {
        let (verdict, chain) = match &r.verdict {
            Verdict::Drop => ("drop".to_string(), None),
            Verdict::Goto(c) => ("goto".to_string(), Some(c.as_str())),
            other => (other.to_string(), None),
        };
        let _ = write!(
            out,
            "{}{{\"bytes\":{},\"chain\":{},\"id\":{},\"packets\":{},\"path\":{},\"verdict\":{}}}",
            if i == 0 { "" } else { "," },
            num(r.counter.map(|c| c.1)),
            chain.map_or("null".to_string(), json_str),
            r.id,
            num(r.counter.map(|c| c.0)),
            r.path
                .as_ref()
                .map_or("null".to_string(), |p| json_str(&match_form(p))),
            json_str(&verdict),
        );
    }
    let _ = writeln!(
        out,
        "],\"map\":{},\"routing\":{routing},\"table\":{}}}",
        json_str(&cfg.map),
        json_str(&cfg.table)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_outputs() {
        let rows = vec![
            Row {
                id: 7,
                path: Some(b"/a b/\xff".to_vec()),
                verdict: Verdict::Goto("proxy".into()),
                counter: Some((3, 180)),
            },
            Row {
                id: 9,
                path: None,
                verdict: Verdict::Drop,
                counter: None,
            },
        ];
        assert_eq!(
            status_table(&rows),
            "VERDICT     PACKETS  BYTES  CGROUP\n\
             goto proxy        3    180  /a b/\\xff\n\
             drop              -      -  9\n"
        );
        let cfg = Config::parse("t", r#"{"rules": []}"#).unwrap();
        assert_eq!(
            status_json(&cfg, &rows, "null"),
            concat!(
                r#"{"elements":[{"bytes":180,"chain":"proxy","id":7,"packets":3,"path":"/a b/\\xff","verdict":"goto"},"#,
                r#"{"bytes":null,"chain":null,"id":9,"packets":null,"path":null,"verdict":"drop"}],"map":"cgroups","routing":null,"table":"cgtproxy"}"#,
                "\n"
            )
        );
    }
}
