//! The daemon's configuration as the tests write it, and the rules'
//! verdicts computed independently of the daemon.

use super::nft::VerdictDump;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Config rules: (match, target). Also computes, independently of the
/// daemon, which verdict a path gets.
#[derive(Clone, Debug)]
pub struct Rules(pub Vec<(String, String)>);

impl Rules {
    pub fn new(rules: &[(&str, &str)]) -> Rules {
        Rules(
            rules
                .iter()
                .map(|(m, t)| (m.to_string(), t.to_string()))
                .collect(),
        )
    }

    /// The embedded default: the slices `cgtproxy-proxy.slice`,
    /// `cgtproxy-drop.slice`, `cgtproxy-direct.slice` (at any depth) are
    /// listed; what is below a slice inherits its verdict in the ruleset, so
    /// a nested slice's own verdict is the nearer one.
    pub fn embedded_default() -> Rules {
        Rules::new(&[
            (".*/cgtproxy-proxy\\.slice", "proxy"),
            (".*/cgtproxy-drop\\.slice", "drop"),
            (".*/cgtproxy-direct\\.slice", "direct"),
        ])
    }

    pub fn json(&self) -> String {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(m, t)| {
                format!(
                    "{{\"match\": {}, \"target\": {}}}",
                    json_str(m),
                    json_str(t)
                )
            })
            .collect();
        format!("[{}]", items.join(", "))
    }

    /// Every verdict (as `nft` prints it) the rules name.
    pub fn targets(&self) -> BTreeSet<String> {
        self.0
            .iter()
            .map(|(_, t)| {
                if t == "drop" {
                    "drop".to_string()
                } else {
                    format!("goto {t}")
                }
            })
            .collect()
    }

    /// Asserts that `verdicts` holds no verdict these rules do not name
    /// (what a full sync leaves), and no verdict twice.
    pub fn assert_verdicts_clean(&self, verdicts: &VerdictDump, when: &str) {
        let targets = self.targets();
        let values: Vec<&String> = verdicts.values().collect();
        let distinct: BTreeSet<&String> = values.iter().copied().collect();
        assert!(
            distinct.len() == values.len() && values.iter().all(|v| targets.contains(*v)),
            "{when}: `verdicts` should hold at most one number for each of {targets:?} and nothing else; it holds {verdicts:?}"
        );
    }

    /// The verdict (as `nft` prints it) for a cgroup path, first match wins,
    /// the match anchored to the whole path; what the daemon gives an
    /// element. Two things refuse one: a cgroup below the deepest level the
    /// shipped ruleset looks up (16; the test root is at level 1) is not
    /// followed, and `drop` is final (the default of the `final` key), so
    /// nothing below a cgroup listed `drop` gets anything else.
    pub fn verdict(&self, path: &str) -> Option<String> {
        let own = self.first_match(path)?;
        if path.split('/').filter(|c| !c.is_empty()).count() > DEEPEST_BELOW_TEST_ROOT {
            return None;
        }
        if own != "drop" {
            for (i, _) in path.match_indices('/') {
                let above = if i == 0 { "/" } else { &path[..i] };
                if above != path && self.first_match(above).as_deref() == Some("drop") {
                    return None;
                }
            }
        }
        Some(own)
    }

    fn first_match(&self, path: &str) -> Option<String> {
        thread_local! {
            static COMPILED: std::cell::RefCell<std::collections::BTreeMap<String, regex_lite::Regex>> =
                Default::default();
        }
        for (m, t) in &self.0 {
            let hit = COMPILED.with(|c| {
                let mut c = c.borrow_mut();
                let re = c.entry(m.clone()).or_insert_with(|| {
                    regex_lite::Regex::new(&format!("^(?:{m})$")).expect("test rule regex")
                });
                re.is_match(path)
            });
            if hit {
                return Some(if t == "drop" {
                    "drop".to_string()
                } else {
                    format!("goto {t}")
                });
            }
        }
        None
    }
}

/// Levels below the test root the daemon follows: the shipped ruleset looks
/// up levels 1 to 16, and the test root (`<mount>/cgtproxy-test-X`) is at 1.
pub const DEEPEST_BELOW_TEST_ROOT: usize = 15;

/// `route` in the config.
#[derive(Clone, Debug)]
pub enum RouteCfg {
    /// Key omitted: the daemon's default (the ruleset's mark, table 9011, priority 100).
    Default,
    Off,
    On {
        mark: u32,
        table: u32,
    },
    /// `{"priority": N}`: the ruleset's mark, the default table.
    Priority(u32),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub rules: Rules,
    pub cgroup_root: Option<PathBuf>,
    pub table: Option<String>,
    pub map: Option<String>,
    /// `verdict-map` (default "verdicts").
    pub verdict_map: Option<String>,
    pub route: RouteCfg,
    pub keep_on_exit: Option<bool>,
}

impl Config {
    pub fn new(rules: &Rules) -> Config {
        Config {
            rules: rules.clone(),
            cgroup_root: None,
            table: None,
            map: None,
            verdict_map: None,
            route: RouteCfg::Default,
            keep_on_exit: None,
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = String::from("{\n");
        if let Some(r) = &self.cgroup_root {
            let _ = writeln!(s, "  \"cgroup-root\": {},", json_str(r.to_str().unwrap()));
        }
        if let Some(t) = &self.table {
            let _ = writeln!(s, "  \"table\": {},", json_str(t));
        }
        if let Some(m) = &self.map {
            let _ = writeln!(s, "  \"map\": {},", json_str(m));
        }
        if let Some(m) = &self.verdict_map {
            let _ = writeln!(s, "  \"verdict-map\": {},", json_str(m));
        }
        match self.route {
            RouteCfg::Default => {}
            RouteCfg::Off => s.push_str("  \"route\": false,\n"),
            RouteCfg::On { mark, table } => {
                let _ = writeln!(s, "  \"route\": {{\"mark\": {mark}, \"table\": {table}}},");
            }
            RouteCfg::Priority(p) => {
                let _ = writeln!(s, "  \"route\": {{\"priority\": {p}}},");
            }
        }
        if let Some(k) = self.keep_on_exit {
            let _ = writeln!(s, "  \"keep-on-exit\": {k},");
        }
        let _ = writeln!(s, "  \"rules\": {}\n}}", self.rules.json());
        s
    }
}

/// Escapes `s` as a JSON string literal (with quotes).
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
