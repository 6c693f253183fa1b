use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::table::{self, Align};
use super::{Live, load};
use crate::cgroup;
use crate::config::{Config, Verdict, match_form};
use crate::daemon::Options;
use crate::error::Error;

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
    let els = Live::open(&cfg)?.elements(&cfg)?;
    let wanted: HashSet<u64> = els.iter().map(|e| e.id).collect();
    let mut paths: HashMap<u64, Vec<u8>> = HashMap::new();
    for (dir, id) in h.walk() {
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
    rows.sort_by(|a, b| (a.path.is_none(), &a.path, a.id).cmp(&(b.path.is_none(), &b.path, b.id)));
    let text = if as_json {
        status_json(&cfg, &rows)
    } else {
        status_table(&rows)
    };
    print!("{text}");
    Ok(0)
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

/// A JSON string literal. Written by hand: the output is small and fixed,
/// and a serializer would cost more binary than this.
pub(super) fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `{"elements":[{"bytes","chain","id","packets","path","verdict"}],"map","table"}`,
/// keys sorted, one line; unknown values are `null`.
fn status_json(cfg: &Config, rows: &[Row]) -> String {
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
        "],\"map\":{},\"table\":{}}}",
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
            status_json(&cfg, &rows),
            concat!(
                r#"{"elements":[{"bytes":180,"chain":"proxy","id":7,"packets":3,"path":"/a b/\\xff","verdict":"goto"},"#,
                r#"{"bytes":null,"chain":null,"id":9,"packets":null,"path":null,"verdict":"drop"}],"map":"cgroups","table":"cgtproxy"}"#,
                "\n"
            )
        );
    }
}
