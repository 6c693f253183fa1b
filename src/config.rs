//! The configuration file and its rules: JSON read by miniserde into a
//! generic value, then checked key by key so every error names its place
//! (`rules[2].match`), or its line and column for a syntax error.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use miniserde::json::{self, Number, Object, Value};
use regex_lite::Regex;

use crate::error::Error;
pub use crate::selector::Form;

pub const DEFAULT_PATH: &str = "/etc/cgtproxy/config.json";

/// Applies when no `--config` is given and [`DEFAULT_PATH`] does not exist.
/// Elements go on the slice itself; everything below it inherits the slice's
/// verdict through the ruleset's level lookups, so a `cgtproxy-direct.slice`
/// nested in a `cgtproxy-proxy.slice` gets its own, nearer, verdict.
pub const EMBEDDED_DEFAULT: &str = r#"{
  "rules": [
    { "match": ".*/cgtproxy-proxy\\.slice", "target": "proxy" },
    { "match": ".*/cgtproxy-drop\\.slice", "target": "drop" },
    { "match": ".*/cgtproxy-direct\\.slice", "target": "direct" }
  ]
}"#;

/// What a matched cgroup's element stands for: the plain verdict `drop`, or
/// `goto CHAIN` (`proxy`, `direct`, or a chain of the user's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Drop,
    Goto(String),
    /// Anything else found in the kernel's `verdicts` map (written by
    /// someone else).
    Other(i32, Option<String>),
    /// A `cgroups` element whose number `verdicts` does not have (the
    /// ruleset sends such packets direct).
    Unbound(u32),
}

impl Verdict {
    /// How much a verdict lets through, for final verdicts: `drop` (0) is
    /// the most restrictive, then `proxy` and the user's own chains (1),
    /// then `direct` (2), which sends traffic out unchanged. A final
    /// verdict refuses a more permissive one below it.
    pub fn rank(&self) -> u8 {
        match self {
            Verdict::Drop => 0,
            Verdict::Goto(c) if c == "direct" => 2,
            Verdict::Goto(_) => 1,
            // Not from a config; never compared in practice.
            Verdict::Other(..) | Verdict::Unbound(_) => 2,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Drop => f.write_str("drop"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Other(1, _) => f.write_str("accept"),
            Verdict::Other(-3, Some(c)) => write!(f, "jump {c}"),
            Verdict::Other(-5, _) => f.write_str("return"),
            Verdict::Other(code, Some(c)) => write!(f, "verdict {code} {c}"),
            Verdict::Other(code, None) => write!(f, "verdict {code}"),
            Verdict::Unbound(n) => write!(f, "number {n}, which has no verdict"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRoot {
    Auto,
    Dir(PathBuf),
}

/// `route`: what the daemon's policy routing should be. The mark, when not
/// given, is the live ruleset's (the daemon reads it at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub mark: Option<u32>,
    pub table: u32,
    pub priority: u32,
}

/// The shipped ruleset's mark (CGTPROXY_MARK), for when the live one sets
/// none that `inspect` recognises.
pub const DEFAULT_MARK: u32 = 9011;

pub const DEFAULT_ROUTE: Route = Route {
    mark: None,
    table: 9011,
    priority: crate::route::DEFAULT_PRIORITY,
};

#[derive(Debug, Clone)]
pub struct Rule {
    /// How the rule selects cgroups, as written.
    pub form: Form,
    /// The regular expression `form` stands for (unanchored).
    pub pattern: String,
    regex: Regex,
    pub target: Verdict,
    /// The verdict is final for the subtree: nothing below the cgroups this
    /// rule lists gets a more permissive element (see [`Verdict::rank`]).
    /// Key `final`; true by default for `drop`, false otherwise.
    pub is_final: bool,
    /// Text every path this rule matches starts and ends with, read from
    /// the pattern: checked before the regex, which costs tens of µs per
    /// path (regex-lite has no literal optimisations of its own), so the
    /// cgroups of a storm that no rule lists cost next to nothing.
    literal: Literal,
}

/// See [`Rule::literal`]. Empty strings when nothing is known.
#[derive(Debug, Clone, Default)]
struct Literal {
    prefix: String,
    suffix: String,
}

impl Literal {
    /// The literal start and end of an anchored pattern; conservative:
    /// nothing for a pattern with an alternation or a flag group, and a
    /// character only when no quantifier applies to it.
    fn of(pattern: &str) -> Literal {
        if pattern.contains('|') || pattern.contains("(?") {
            return Literal::default();
        }
        let c: Vec<char> = pattern.chars().collect();
        let meta = |x: char| "\\.+*?()[]{}^$".contains(x);
        let quant = |x: Option<&char>| x.is_some_and(|q| "*+?{".contains(*q));
        // Forward: `x`, or `\` + punctuation, not followed by a quantifier.
        let mut prefix = String::new();
        let mut i = 0;
        while i < c.len() {
            let (lit, len) = match c[i] {
                '\\' => match c.get(i + 1) {
                    Some(&e) if e.is_ascii_punctuation() => (e, 2),
                    _ => break,
                },
                x if meta(x) => break,
                x => (x, 1),
            };
            if quant(c.get(i + len)) {
                break;
            }
            prefix.push(lit);
            i += len;
        }
        // Backward: a character is escaped when an odd number of
        // backslashes precede it.
        let mut suffix: Vec<char> = Vec::new();
        let mut j = c.len();
        while j > 0 {
            let x = c[j - 1];
            let slashes = c[..j - 1].iter().rev().take_while(|&&b| b == '\\').count();
            if slashes % 2 == 1 {
                if !x.is_ascii_punctuation() {
                    break; // `\d`, `\w`, …: a class
                }
                suffix.push(x);
                j -= 2;
            } else if meta(x) {
                break;
            } else {
                suffix.push(x);
                j -= 1;
            }
        }
        Literal {
            prefix,
            suffix: suffix.into_iter().rev().collect(),
        }
    }

    fn admits(&self, path: &str) -> bool {
        // The two may overlap (a pattern that is all literal).
        path.starts_with(&self.prefix) && path.ends_with(&self.suffix)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, or `<built-in default>`.
    pub source: String,
    pub cgroup_root: CgroupRoot,
    pub table: String,
    pub map: String,
    pub verdict_map: String,
    pub route: Option<Route>,
    /// Obsolete since stopping never removes anything: accepted, and the
    /// daemon warns that it means nothing now.
    pub keep_on_exit: Option<bool>,
    pub rules: Vec<Rule>,
}

impl Rule {
    /// `rules[I] "/a" -> goto proxy`, `rules[I] app "org.x" -> drop`, for messages.
    pub fn describe(&self, i: usize) -> String {
        format!("rules[{i}] {} -> {}", self.form, self.target)
    }
}

impl Config {
    /// Reads `path`, or the default path, or the embedded default when no
    /// path was given and the default file does not exist.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        match read_config(path) {
            Ok(bytes) => {
                let name = path.display().to_string();
                let text = String::from_utf8(bytes).map_err(|e| {
                    Error::Config(format!(
                        "{name}: not UTF-8 (byte {})",
                        e.utf8_error().valid_up_to()
                    ))
                })?;
                Config::parse(&name, &text)
            }
            Err(ReadError::Io(e)) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                Config::parse("<built-in default>", EMBEDDED_DEFAULT)
            }
            Err(ReadError::Io(e)) => Err(Error::Config(format!(
                "{}: {}",
                path.display(),
                crate::error::io(&e)
            ))),
            Err(ReadError::Bad(what)) => Err(Error::Config(format!("{}: {what}", path.display()))),
        }
    }

    pub fn parse(source: &str, text: &str) -> Result<Config, Error> {
        let err = |place: &str, what: String| Error::Config(format!("{source}: {place}: {what}"));
        if let Err((line, col, what)) = syntax::check(text) {
            return Err(Error::Config(format!("{source}:{line}:{col}: {what}")));
        }
        let value: Value =
            json::from_str(text).map_err(|_| Error::Config(format!("{source}: not valid JSON")))?;
        let Value::Object(top) = value else {
            return Err(err("top level", "expected an object".into()));
        };
        let mut cfg = Config {
            source: source.to_string(),
            cgroup_root: CgroupRoot::Auto,
            table: "cgtproxy".into(),
            map: "cgroups".into(),
            verdict_map: "verdicts".into(),
            route: Some(DEFAULT_ROUTE),
            keep_on_exit: None,
            rules: Vec::new(),
        };
        let mut have_rules = false;
        for (key, v) in top.iter() {
            match key.as_str() {
                "cgroup-root" => {
                    let s = string(v).map_err(|w| err(key, w))?;
                    cfg.cgroup_root = match s {
                        "auto" => CgroupRoot::Auto,
                        d if d.starts_with('/') => CgroupRoot::Dir(PathBuf::from(d)),
                        _ => {
                            return Err(err(
                                key,
                                format!("expected \"auto\" or an absolute directory, got {s:?}"),
                            ));
                        }
                    };
                }
                "table" => cfg.table = name(v).map_err(|w| err(key, w))?,
                "map" => cfg.map = name(v).map_err(|w| err(key, w))?,
                "verdict-map" => cfg.verdict_map = name(v).map_err(|w| err(key, w))?,
                "keep-on-exit" => match v {
                    Value::Bool(b) => cfg.keep_on_exit = Some(*b),
                    _ => return Err(err(key, format!("expected true or false, got {}", kind(v)))),
                },
                "route" => {
                    cfg.route = route(v).map_err(|(place, w)| err(&format!("route{place}"), w))?
                }
                "rules" => {
                    have_rules = true;
                    let Value::Array(list) = v else {
                        return Err(err(key, format!("expected an array, got {}", kind(v))));
                    };
                    for (i, r) in list.iter().enumerate() {
                        let rule = self::rule(r)
                            .map_err(|(place, w)| err(&format!("rules[{i}]{place}"), w))?;
                        cfg.rules.push(rule);
                    }
                }
                _ => {
                    return Err(err(
                        key,
                        "unknown key (expected cgroup-root, table, map, verdict-map, route, keep-on-exit or rules)".into(),
                    ));
                }
            }
        }
        if !have_rules {
            return Err(err("top level", "missing key \"rules\"".into()));
        }
        if cfg.verdict_map == cfg.map {
            return Err(err(
                "verdict-map",
                format!(
                    "{:?} is also \"map\"; the two maps need different names",
                    cfg.map
                ),
            ));
        }
        Ok(cfg)
    }

    /// The first rule whose pattern matches the whole path, if any.
    pub fn matching_rule(&self, path: &str) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.literal.admits(path) && r.regex.is_match(path))
    }

    /// Whether rule `i` selects `path` (whether or not an earlier rule does).
    pub fn selects(&self, i: usize, path: &str) -> bool {
        self.rules.get(i).is_some_and(|r| r.regex.is_match(path))
    }

    /// For a cgroup no rule lists, what it gets instead (for `-v`): the
    /// verdict of its nearest listed ancestor through the ruleset's level
    /// lookups, or none. `None` when a rule lists it.
    pub fn unlisted(&self, path: &str) -> Option<String> {
        if self.matching_rule(path).is_some() {
            return None;
        }
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            let anc = if p.is_empty() { "/" } else { p };
            if let Some((i, r)) = self.matching_rule(anc) {
                return Some(format!(
                    "no rule, inherits {} from {anc} (rules[{i}])",
                    r.target
                ));
            }
            if p.is_empty() {
                break;
            }
        }
        Some("no rule, no listed ancestor: no element (the ruleset's fall-through, direct)".into())
    }

    pub fn verdict(&self, path: &str) -> Option<&Verdict> {
        self.matching_rule(path).map(|(_, r)| &r.target)
    }

    /// The final verdict above `path` (match form) that refuses the
    /// verdict `v` at `path`: the nearest ancestor below the cgroup root
    /// (the root included) whose rule is final with a more restrictive
    /// verdict, as (ancestor path, rule index). A cgroup refused this way
    /// gets no element and so inherits that verdict through the ruleset's
    /// level lookups (the ancestor has its own element).
    ///
    /// Costs nothing for a verdict no final rule outranks; otherwise one
    /// match per ancestor, and the tree is never followed deeper than the
    /// ruleset's levels.
    pub fn final_above<'p>(&self, path: &'p str, v: &Verdict) -> Option<(&'p str, usize)> {
        let rank = v.rank();
        if !self
            .rules
            .iter()
            .any(|r| r.is_final && r.target.rank() < rank)
        {
            return None;
        }
        let mut best: Option<(&str, usize)> = None;
        for (i, _) in path.match_indices('/') {
            let prefix = if i == 0 { "/" } else { &path[..i] };
            if prefix == path {
                break;
            }
            if let Some((n, r)) = self.matching_rule(prefix)
                && r.is_final
                && r.target.rank() < rank
            {
                best = Some((prefix, n));
            }
        }
        best
    }

    /// Whether whoever can create cgroups below a cgroup that rule `i`
    /// decides can give them a more permissive verdict than rule `i`'s:
    /// the rule is not final and another rule names a more permissive
    /// target (one that may list the new cgroup: whether it does depends on
    /// the name, which the creator picks). The first such rule, or `None`.
    pub fn overridable(&self, i: usize) -> Option<usize> {
        let r = self.rules.get(i)?;
        if r.is_final {
            return None;
        }
        let rank = r.target.rank();
        self.rules.iter().position(|o| o.target.rank() > rank)
    }

    /// Chains the rules name, each with the first rule that names it.
    pub fn chains(&self) -> Vec<(&str, usize)> {
        let mut out: Vec<(&str, usize)> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if let Verdict::Goto(c) = &r.target
                && !out.iter().any(|(n, _)| n == c)
            {
                out.push((c, i));
            }
        }
        out
    }
}

/// The largest config file read: far above any real one (a rule is a
/// line), and small enough that `-c /dev/zero` or a runaway file cannot
/// grow the daemon.
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

enum ReadError {
    Io(std::io::Error),
    /// Not something a config can be read from; the message says why.
    Bad(String),
}

/// Reads the config file safely: opened non-blocking (a FIFO put in its
/// place never blocks the daemon, which must keep answering SIGTERM), then
/// refused unless it is a regular file of at most [`MAX_CONFIG_SIZE`]
/// bytes — checked on the open file, and the read itself is capped, so a
/// file that grows meanwhile cannot get past the check.
fn read_config(path: &Path) -> Result<Vec<u8>, ReadError> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::io::Read;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| ReadError::Io(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| ReadError::Io(e.into()))?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => None,
        FileType::Fifo => Some("a FIFO"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        FileType::Socket => Some("a socket"),
        FileType::Directory => Some("a directory"),
        _ => Some("of an unknown type"),
    };
    if let Some(kind) = kind {
        return Err(ReadError::Bad(format!("not a regular file ({kind})")));
    }
    let too_big = || ReadError::Bad(format!("larger than 1 MiB ({MAX_CONFIG_SIZE} bytes)"));
    if st.st_size as u64 > MAX_CONFIG_SIZE {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(st.st_size as usize);
    std::fs::File::from(fd)
        .take(MAX_CONFIG_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_CONFIG_SIZE {
        return Err(too_big());
    }
    Ok(bytes)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(v: &Value) -> Result<&str, String> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(format!("expected a string, got {}", kind(v))),
    }
}

/// A table, set or chain name as nf_tables takes it (NFT_NAME_MAXLEN 256,
/// NUL included).
fn name(v: &Value) -> Result<String, String> {
    let s = string(v)?;
    if s.is_empty() || s.len() > 255 || s.contains('\0') {
        return Err(format!(
            "{s:?} is not a valid nftables name (1 to 255 bytes, no NUL)"
        ));
    }
    Ok(s.to_string())
}

fn u32_value(v: &Value) -> Result<u32, String> {
    match v {
        Value::Number(Number::U64(n)) => {
            u32::try_from(*n).map_err(|_| format!("{n} does not fit in 32 bits"))
        }
        // No float formatting here: it would pull a float printer into the binary.
        Value::Number(Number::I64(n)) => {
            Err(format!("expected an integer from 1 to 4294967295, got {n}"))
        }
        Value::Number(_) => Err("expected an integer from 1 to 4294967295, got a fraction".into()),
        _ => Err(format!("expected an integer, got {}", kind(v))),
    }
}

fn route(v: &Value) -> Result<Option<Route>, (String, String)> {
    let obj = match v {
        Value::Bool(false) => return Ok(None),
        Value::Bool(true) => return Ok(Some(DEFAULT_ROUTE)),
        Value::Object(o) => o,
        _ => {
            return Err((
                String::new(),
                format!("expected an object or false, got {}", kind(v)),
            ));
        }
    };
    let mut r = DEFAULT_ROUTE;
    for (key, v) in obj.iter() {
        let place = format!(".{key}");
        match key.as_str() {
            "mark" => {
                let m = u32_value(v).map_err(|w| (place.clone(), w))?;
                if m == 0 {
                    return Err((place, "the mark must not be 0".into()));
                }
                r.mark = Some(m);
            }
            "priority" => {
                r.priority = u32_value(v).map_err(|w| (place.clone(), w))?;
                // 0 is the kernel's `lookup local`; from 32766 on, the main
                // table would be looked up first.
                if r.priority == 0 || r.priority > 32765 {
                    return Err((
                        place,
                        format!(
                            "rule priority {} is out of range: pick one from 1 to 32765 (ahead of the main table)",
                            r.priority
                        ),
                    ));
                }
            }
            "table" => {
                r.table = u32_value(v).map_err(|w| (place.clone(), w))?;
                // 0 is unspec; 253–255 are the kernel's default, main and local tables.
                if r.table == 0 || (253..=255).contains(&r.table) {
                    return Err((
                        place,
                        format!("route table {} is reserved; pick another", r.table),
                    ));
                }
            }
            _ => {
                return Err((
                    place,
                    "unknown key (expected mark, table or priority)".into(),
                ));
            }
        }
    }
    Ok(Some(r))
}

fn rule(v: &Value) -> Result<Rule, (String, String)> {
    let Value::Object(obj) = v else {
        return Err((
            String::new(),
            format!("expected an object, got {}", kind(v)),
        ));
    };
    let obj: &Object = obj;
    const KEYS: &[&str] = &[
        "match",
        "app",
        "unit",
        "container",
        "user",
        "target",
        "final",
    ];
    for key in obj.keys() {
        if !KEYS.contains(&key.as_str()) {
            return Err((
                format!(".{key}"),
                "unknown key (expected match, app, unit or container, with target; final; user with app or unit)".into(),
            ));
        }
    }
    let forms: Vec<&str> = ["match", "app", "unit", "container"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let key = match forms.as_slice() {
        [k] => *k,
        [] => {
            return Err((
                String::new(),
                "missing key: a rule selects cgroups with one of \"match\", \"app\", \"unit\" or \"container\"".into(),
            ));
        }
        [a, b, ..] => {
            return Err((
                format!(".{b}"),
                format!(
                    "a rule has exactly one of match, app, unit and container; this one also has {a} (split it into two rules)"
                ),
            ));
        }
    };
    let place = format!(".{key}");
    let value = string(&obj[key])
        .map_err(|w| (place.clone(), w))?
        .to_string();
    let user = match obj.get("user") {
        None => None,
        Some(_) if !matches!(key, "app" | "unit") => {
            return Err((
                ".user".into(),
                format!("\"user\" goes with \"app\" or \"unit\", not with \"{key}\""),
            ));
        }
        Some(Value::Number(Number::U64(n))) => Some(
            u32::try_from(*n)
                .ok()
                .filter(|&u| u != u32::MAX)
                .ok_or((".user".to_string(), format!("{n} is not a user ID")))?,
        ),
        Some(v) => {
            return Err((
                ".user".into(),
                format!(
                    "expected a numeric user ID (as `id -u` prints it), got {}",
                    kind(v)
                ),
            ));
        }
    };
    let form = match key {
        "match" => Form::Match(value),
        "app" => Form::App { id: value, user },
        "unit" => Form::Unit { name: value, user },
        _ => Form::Container(value),
    };
    let regex = form.compile().map_err(|e| (place.clone(), e))?;
    let target = obj
        .get("target")
        .ok_or((String::new(), "missing key \"target\"".into()))?;
    let target = match name(target)
        .map_err(|w| (".target".to_string(), w))?
        .as_str()
    {
        "drop" => Verdict::Drop,
        chain => {
            if let Some(hint) = target_hint(chain) {
                return Err((".target".into(), hint));
            }
            Verdict::Goto(chain.to_string())
        }
    };
    let is_final = match obj.get("final") {
        None => target == Verdict::Drop,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err((
                ".final".into(),
                format!("expected true or false, got {}", kind(v)),
            ));
        }
    };
    let pattern = form.pattern().unwrap_or_default();
    Ok(Rule {
        literal: Literal::of(&pattern),
        pattern,
        form,
        regex,
        target,
        is_final,
    })
}

/// Targets people write by analogy with nft or iptables, which name no
/// chain of the ruleset: what they probably mean.
fn target_hint(t: &str) -> Option<String> {
    let mean = match t.to_ascii_lowercase().as_str() {
        "accept" | "allow" | "return" | "bypass" | "none" | "continue" => "direct",
        "reject" | "deny" | "block" => "drop",
        "tproxy" | "redirect" | "proxied" => "proxy",
        "direct" | "proxy" | "drop" => {
            // The right word in the wrong case: chain names are case-sensitive.
            return (t != t.to_ascii_lowercase()).then(|| {
                format!(
                    "{t:?}: targets are case-sensitive; write {:?}",
                    t.to_ascii_lowercase()
                )
            });
        }
        _ => return None,
    };
    Some(format!(
        "{t:?} is not a target; did you mean \"{mean}\"? (targets are drop or the name of a chain: proxy, direct, or one of yours)"
    ))
}

/// The form a cgroup path is matched in: [`crate::cgroup::escape`], the
/// same injective form logs and `status` show (a backslash is `\\`, a
/// byte that is not UTF-8 `\xNN`, a control or format character
/// `\u{NNNN}`), so a rule matches those literally (`\\xff`).
pub fn match_form(path: &[u8]) -> Cow<'_, str> {
    crate::cgroup::escape(path)
}

/// A JSON syntax checker that reports line and column, which miniserde does
/// not. It also refuses duplicate keys, which a map would silently collapse.
mod syntax {
    use std::collections::HashSet;

    type Fail = (usize, usize, String);

    const MAX_DEPTH: usize = 128;

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    pub fn check(text: &str) -> Result<(), Fail> {
        let mut p = P {
            s: text.as_bytes(),
            i: 0,
        };
        p.ws();
        p.value(0)?;
        p.ws();
        if p.i < p.s.len() {
            return Err(p.fail("trailing characters after the JSON value"));
        }
        Ok(())
    }

    impl P<'_> {
        fn fail(&self, what: &str) -> Fail {
            let upto = &self.s[..self.i.min(self.s.len())];
            let line = upto.iter().filter(|&&c| c == b'\n').count() + 1;
            let line_start = upto.iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
            let col = String::from_utf8_lossy(&upto[line_start..]).chars().count() + 1;
            let what = if self.i >= self.s.len() {
                format!("{what} (unexpected end of file)")
            } else {
                what.to_string()
            };
            (line, col, what)
        }

        fn ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8, what: &str) -> Result<(), Fail> {
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(self.fail(what))
            }
        }

        fn value(&mut self, depth: usize) -> Result<(), Fail> {
            if depth > MAX_DEPTH {
                return Err(self.fail("nested too deeply"));
            }
            match self.s.get(self.i) {
                Some(b'{') => self.object(depth),
                Some(b'[') => self.array(depth),
                Some(b'"') => self.string().map(|_| ()),
                Some(b'-' | b'0'..=b'9') => self.number(),
                Some(b't') => self.word("true"),
                Some(b'f') => self.word("false"),
                Some(b'n') => self.word("null"),
                _ => Err(self.fail("expected a value")),
            }
        }

        fn word(&mut self, w: &str) -> Result<(), Fail> {
            if self.s[self.i..].starts_with(w.as_bytes()) {
                self.i += w.len();
                Ok(())
            } else {
                Err(self.fail("expected a value"))
            }
        }

        fn number(&mut self) -> Result<(), Fail> {
            let start = self.i;
            if self.s.get(self.i) == Some(&b'-') {
                self.i += 1;
            }
            let digits = |p: &mut Self| {
                let s = p.i;
                while let Some(b'0'..=b'9') = p.s.get(p.i) {
                    p.i += 1;
                }
                p.i > s
            };
            if !digits(self) {
                return Err(self.fail("expected digits"));
            }
            if self.s.get(self.i) == Some(&b'.') {
                self.i += 1;
                if !digits(self) {
                    return Err(self.fail("expected digits after '.'"));
                }
            }
            if let Some(b'e' | b'E') = self.s.get(self.i) {
                self.i += 1;
                if let Some(b'+' | b'-') = self.s.get(self.i) {
                    self.i += 1;
                }
                if !digits(self) {
                    return Err(self.fail("expected digits in exponent"));
                }
            }
            let _ = start;
            Ok(())
        }

        fn string(&mut self) -> Result<Vec<u8>, Fail> {
            self.eat(b'"', "expected '\"'")?;
            let mut out = Vec::new();
            loop {
                match self.s.get(self.i) {
                    None => return Err(self.fail("unterminated string")),
                    Some(b'"') => {
                        self.i += 1;
                        return Ok(out);
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        match self.s.get(self.i) {
                            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                                out.push(self.s[self.i]);
                                self.i += 1;
                            }
                            Some(b'u') => {
                                let hex = self.s.get(self.i + 1..self.i + 5);
                                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                    return Err(self.fail("bad \\u escape"));
                                }
                                out.extend_from_slice(&self.s[self.i..self.i + 5]);
                                self.i += 5;
                            }
                            Some(&c) if c.is_ascii_graphic() => {
                                let c = c as char;
                                return Err(self.fail(&format!(
                                    "bad escape \\{c} in string: JSON knows only \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u; a regular expression's backslash is written twice in JSON (\"\\\\{c}\" for \\{c})"
                                )));
                            }
                            _ => return Err(self.fail("bad escape in string")),
                        }
                    }
                    Some(&c) if c < 0x20 => return Err(self.fail("control character in string")),
                    Some(&c) => {
                        out.push(c);
                        self.i += 1;
                    }
                }
            }
        }

        fn object(&mut self, depth: usize) -> Result<(), Fail> {
            self.i += 1;
            self.ws();
            if self.s.get(self.i) == Some(&b'}') {
                self.i += 1;
                return Ok(());
            }
            let mut keys = HashSet::new();
            loop {
                self.ws();
                let at = self.i;
                let key = self.string()?;
                if !keys.insert(key) {
                    self.i = at;
                    return Err(self.fail("duplicate key"));
                }
                self.ws();
                self.eat(b':', "expected ':' after key")?;
                self.ws();
                self.value(depth + 1)?;
                self.ws();
                match self.s.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        return Ok(());
                    }
                    _ => return Err(self.fail("expected ',' or '}'")),
                }
            }
        }

        fn array(&mut self, depth: usize) -> Result<(), Fail> {
            self.i += 1;
            self.ws();
            if self.s.get(self.i) == Some(&b']') {
                self.i += 1;
                return Ok(());
            }
            loop {
                self.ws();
                self.value(depth + 1)?;
                self.ws();
                match self.s.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        return Ok(());
                    }
                    _ => return Err(self.fail("expected ',' or ']'")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> String {
        match Config::parse("c.json", text) {
            Err(Error::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_parses_and_matches_slices() {
        let c = Config::parse("d", EMBEDDED_DEFAULT).unwrap();
        let p = "/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice";
        assert_eq!(c.verdict(p), Some(&Verdict::Goto("proxy".into())));
        assert_eq!(c.verdict("/cgtproxy-drop.slice"), Some(&Verdict::Drop));
        assert_eq!(
            c.verdict("/a/cgtproxy-direct.slice"),
            Some(&Verdict::Goto("direct".into()))
        );
        assert_eq!(c.verdict("/a/xcgtproxy-proxy.slice"), None);
        assert_eq!(c.verdict("/"), None);
        assert_eq!(c.route, Some(DEFAULT_ROUTE));
        assert_eq!(c.cgroup_root, CgroupRoot::Auto);
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            "c",
            r#"{ "cgroup-root": "auto", "table": "t", "map": "m", "verdict-map": "v", "keep-on-exit": true,
                 "route": { "mark": 1, "table": 100, "priority": 7 },
                 "rules": [ { "match": "/a", "target": "direct" }, { "match": "/.*", "target": "drop" } ] }"#,
        )
        .unwrap();
        assert_eq!(
            (
                c.table.as_str(),
                c.map.as_str(),
                c.verdict_map.as_str(),
                c.keep_on_exit
            ),
            ("t", "m", "v", Some(true))
        );
        assert_eq!(
            c.route,
            Some(Route {
                mark: Some(1),
                table: 100,
                priority: 7,
            })
        );
        assert_eq!(c.verdict("/a"), Some(&Verdict::Goto("direct".into())));
        assert_eq!(c.verdict("/a/b"), Some(&Verdict::Drop));
        assert_eq!(
            c.verdict("/x\ny"),
            Some(&Verdict::Drop),
            "dot matches newline"
        );
        assert_eq!(c.chains(), vec![("direct", 0)]);
    }

    #[test]
    fn anchored_whole_path() {
        let c = Config::parse("c", r#"{"rules":[{"match":"/a","target":"proxy"}]}"#).unwrap();
        assert!(c.verdict("/a").is_some());
        assert!(c.verdict("/a/b").is_none());
        assert!(c.verdict("/xa").is_none());
        let c = Config::parse("c", r#"{"rules":[{"match":"/a|/b","target":"proxy"}]}"#).unwrap();
        assert!(c.verdict("/b").is_some() && c.verdict("/ab").is_none());
    }

    #[test]
    fn errors_name_the_place() {
        assert_eq!(
            msg("{\n  \"rules\": [\n    {\"match\": \"/a\" \"target\": \"x\"}]}"),
            "c.json:3:20: expected ',' or '}'"
        );
        assert!(msg("{\"rules\": [").starts_with("c.json:1:12: expected a value"));
        assert_eq!(
            msg(r#"{"rules":[],"bogus":1}"#),
            "c.json: bogus: unknown key (expected cgroup-root, table, map, verdict-map, route, keep-on-exit or rules)"
        );
        assert_eq!(
            msg(r#"{"rules":[{"match":"/a","target":"x"},{"match":"(","target":"x"}]}"#)
                .split(": invalid")
                .next()
                .unwrap(),
            "c.json: rules[1].match"
        );
        assert_eq!(
            msg(r#"{"rules":[{"match":1,"target":"x"}]}"#),
            "c.json: rules[0].match: expected a string, got a number"
        );
        assert_eq!(
            msg(r#"{"rules":[{"match":"/a"}]}"#),
            "c.json: rules[0]: missing key \"target\""
        );
        assert_eq!(
            msg(r#"{"rules":[{"match":"/a","target":"x","x":1}]}"#),
            "c.json: rules[0].x: unknown key (expected match, app, unit or container, with target; final; user with app or unit)"
        );
        assert_eq!(
            msg(r#"{"rules":{}}"#),
            "c.json: rules: expected an array, got an object"
        );
        assert_eq!(
            msg(r#"{"rules":[],"route":{"mark":-1}}"#),
            "c.json: route.mark: expected an integer from 1 to 4294967295, got -1"
        );
        assert_eq!(
            msg(r#"{"rules":[],"route":{"table":254}}"#),
            "c.json: route.table: route table 254 is reserved; pick another"
        );
        assert_eq!(
            msg(r#"{"rules":[],"route":{"mark":4294967296}}"#),
            "c.json: route.mark: 4294967296 does not fit in 32 bits"
        );
        assert_eq!(
            msg(r#"{"rules":[],"route":{"priority":0}}"#),
            "c.json: route.priority: rule priority 0 is out of range: pick one from 1 to 32765 (ahead of the main table)"
        );
        assert_eq!(
            msg(r#"{"rules":[],"route":{"priority":32766}}"#),
            "c.json: route.priority: rule priority 32766 is out of range: pick one from 1 to 32765 (ahead of the main table)"
        );
        assert_eq!(
            msg(r#"{"rules":[],"rules":[]}"#),
            "c.json:1:13: duplicate key"
        );
        assert_eq!(msg(r#"{}"#), "c.json: top level: missing key \"rules\"");
        assert_eq!(msg(r#"[]"#), "c.json: top level: expected an object");
        assert_eq!(
            msg(r#"{"rules":[],"cgroup-root":"rel"}"#),
            "c.json: cgroup-root: expected \"auto\" or an absolute directory, got \"rel\""
        );
        assert_eq!(
            msg(r#"{"rules":[],"table":""}"#),
            "c.json: table: \"\" is not a valid nftables name (1 to 255 bytes, no NUL)"
        );
        assert_eq!(msg(&"[".repeat(100_000)), "c.json:1:130: nested too deeply");
    }

    #[test]
    fn final_verdicts_refuse_more_permissive_ones_below() {
        let c = Config::parse("t", EMBEDDED_DEFAULT).unwrap();
        assert!(c.rules[1].is_final && !c.rules[0].is_final && !c.rules[2].is_final);
        let direct = Verdict::Goto("direct".into());
        let proxy = Verdict::Goto("proxy".into());
        let d = "/u/cgtproxy-drop.slice/run-u7.scope/cgtproxy-direct.slice";
        assert_eq!(
            c.final_above(d, &direct),
            Some(("/u/cgtproxy-drop.slice", 1))
        );
        assert!(
            c.final_above("/u/cgtproxy-drop.slice/x/cgtproxy-proxy.slice", &proxy)
                .is_some()
        );
        // As restrictive or more: allowed; nothing final above: allowed.
        assert_eq!(
            c.final_above("/u/cgtproxy-drop.slice/cgtproxy-drop.slice", &Verdict::Drop),
            None
        );
        assert_eq!(
            c.final_above("/u/cgtproxy-proxy.slice/cgtproxy-direct.slice", &direct),
            None
        );
        assert_eq!(c.final_above("/cgtproxy-direct.slice", &direct), None);
        // Opt-out and opt-in.
        let c = Config::parse(
            "t",
            r#"{"rules":[{"match":".*/d","target":"drop","final":false},{"match":".*/p","target":"proxy","final":true},{"match":".*/x","target":"direct"}]}"#,
        )
        .unwrap();
        assert_eq!(c.final_above("/d/x", &direct), None);
        assert_eq!(c.final_above("/p/x", &direct), Some(("/p", 1)));
        assert_eq!(c.final_above("/p/d", &Verdict::Drop), None);
        assert_eq!(
            Config::parse(
                "c",
                r#"{"rules":[{"match":"/a","target":"drop","final":1}]}"#
            )
            .unwrap_err()
            .to_string(),
            "c: rules[0].final: expected true or false, got a number"
        );
        assert!(Verdict::Drop.rank() < proxy.rank() && proxy.rank() < direct.rank());
    }

    #[test]
    fn overridable_names_a_more_permissive_rule_unless_final() {
        let c = Config::parse("t", EMBEDDED_DEFAULT).unwrap();
        // proxy (not final) -> direct; drop (final); direct (nothing wider).
        assert_eq!(c.overridable(0), Some(2));
        assert_eq!(c.overridable(1), None);
        assert_eq!(c.overridable(2), None);
        assert_eq!(c.overridable(3), None);
        let c = Config::parse(
            "t",
            r#"{"rules":[{"match":"/d","target":"drop","final":false},{"match":"/p","target":"proxy","final":true},{"match":"/q","target":"proxy"}]}"#,
        )
        .unwrap();
        assert_eq!(c.overridable(0), Some(1));
        assert_eq!(c.overridable(1), None);
        // Only as permissive as itself: nothing to gain.
        assert_eq!(c.overridable(2), None);
    }

    #[test]
    fn literal_prefilter_is_conservative() {
        let l = |p: &str| {
            let x = Literal::of(p);
            (x.prefix, x.suffix)
        };
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(l(r".*/cgtproxy-drop\.slice"), s("", "/cgtproxy-drop.slice"));
        assert_eq!(
            l(r"/system\.slice/x\.service"),
            s("/system.slice/x.service", "/system.slice/x.service")
        );
        assert_eq!(l(r"/user\.slice/.*"), s("/user.slice/", ""));
        assert_eq!(l(r"/p(/.*)?"), s("/p", ""));
        assert_eq!(l(r"/ab*c"), s("/a", "c"));
        assert_eq!(l(r"/a{2}"), s("/", ""));
        assert_eq!(l(r"/a|/b"), s("", ""));
        assert_eq!(l(r"(?i)/abc"), s("", ""));
        assert_eq!(l(r"\d+x\d"), s("", ""));
        assert_eq!(l(r"a\\.z"), s("a\\", "z"));
        assert_eq!(l(r"a\\"), s("a\\", "a\\"));
        assert_eq!(l(r"[ab]c$"), s("", ""));
        // The filter never refuses what the regex would take.
        let c = Config::parse(
            "t",
            r#"{"rules":[{"match":"/a\\.b+\\\\x[0-9]/.*\\.slice","target":"drop"}]}"#,
        )
        .unwrap();
        assert!(c.verdict(r"/a.bb\x1/q.slice").is_some());
        assert!(c.verdict(r"/a.bb\x1/q.slicex").is_none());
    }

    #[test]
    fn non_utf8_paths_have_a_lossless_match_form() {
        assert_eq!(match_form(b"/a b/\"q\""), "/a b/\"q\"");
        assert_eq!(match_form(b"/x\xffy\xc3"), "/x\\xffy\\xc3");
        let c = Config::parse(
            "c",
            r#"{"rules":[{"match":"/x\\\\xffy.*","target":"drop"}]}"#,
        )
        .unwrap();
        assert_eq!(c.verdict(&match_form(b"/x\xffy\xc3")), Some(&Verdict::Drop));
    }

    #[test]
    fn rule_forms_and_their_errors() {
        let c = Config::parse(
            "c",
            r#"{"rules":[
                {"app":"org.telegram.desktop","target":"proxy"},
                {"unit":"mihomo.service","target":"direct"},
                {"unit":"pipewire.service","user":1000,"target":"direct"},
                {"container":"4f3c2b1a0e9d","target":"drop"}]}"#,
        )
        .unwrap();
        let u = "/user.slice/user-1000.slice/user@1000.service";
        assert_eq!(
            c.verdict(&format!(
                "{u}/app.slice/app-flatpak-org.telegram.desktop-77.scope"
            )),
            Some(&Verdict::Goto("proxy".into()))
        );
        assert_eq!(
            c.verdict("/system.slice/mihomo.service"),
            Some(&Verdict::Goto("direct".into()))
        );
        assert_eq!(c.verdict("/system.slice/pipewire.service"), None);
        assert_eq!(
            c.verdict(&format!(
                "/system.slice/docker-4f3c2b1a0e9d{}.scope",
                "0".repeat(52)
            )),
            Some(&Verdict::Drop)
        );
        assert_eq!(
            c.rules[2].describe(2),
            "rules[2] unit \"pipewire.service\" user 1000 -> goto direct"
        );
        assert_eq!(
            msg(r#"{"rules":[{"app":"a.b","unit":"x.service","target":"proxy"}]}"#),
            "c.json: rules[0].unit: a rule has exactly one of match, app, unit and container; this one also has app (split it into two rules)"
        );
        assert!(
            msg(r#"{"rules":[{"target":"proxy"}]}"#)
                .starts_with("c.json: rules[0]: missing key: a rule selects")
        );
        assert_eq!(
            msg(r#"{"rules":[{"match":"/a","user":1,"target":"proxy"}]}"#),
            "c.json: rules[0].user: \"user\" goes with \"app\" or \"unit\", not with \"match\""
        );
        assert_eq!(
            msg(r#"{"rules":[{"app":"a.b","user":"me","target":"proxy"}]}"#),
            "c.json: rules[0].user: expected a numeric user ID (as `id -u` prints it), got a string"
        );
        assert!(
            msg(r#"{"rules":[{"unit":"mihomo","target":"proxy"}]}"#).starts_with(
                "c.json: rules[0].unit: \"mihomo\" has no unit type; write \"mihomo.service\""
            )
        );
        assert!(
            msg(r#"{"rules":[{"container":"web","target":"proxy"}]}"#).starts_with(
                "c.json: rules[0].container: \"web\": a container ID is 12 to 64 hex digits"
            )
        );
    }

    #[test]
    fn unlisted_cgroups_say_what_they_inherit() {
        let c = Config::parse("d", EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.unlisted("/u/cgtproxy-proxy.slice"), None);
        assert_eq!(
            c.unlisted("/u/cgtproxy-proxy.slice/run-1.scope/x"),
            Some("no rule, inherits goto proxy from /u/cgtproxy-proxy.slice (rules[0])".into())
        );
        assert!(
            c.unlisted("/a/b")
                .unwrap()
                .starts_with("no rule, no listed ancestor")
        );
        let c = Config::parse("d", r#"{"rules":[{"match":"/","target":"drop"}]}"#).unwrap();
        assert_eq!(
            c.unlisted("/a"),
            Some("no rule, inherits drop from / (rules[0])".into())
        );
    }

    #[test]
    fn errors_hint_at_the_fix() {
        let m = msg(r#"{"rules":[{"match":"/a\d+","target":"proxy"}]}"#);
        assert!(
            m.starts_with("c.json:1:24: bad escape \\d in string"),
            "{m}"
        );
        assert!(m.contains(r#"("\\d" for \d)"#), "{m}");
        assert_eq!(
            msg(r#"{"rules":[{"match":"/a","target":"accept"}]}"#),
            "c.json: rules[0].target: \"accept\" is not a target; did you mean \"direct\"? (targets are drop or the name of a chain: proxy, direct, or one of yours)"
        );
        assert!(
            msg(r#"{"rules":[{"match":"/a","target":"reject"}]}"#)
                .contains("did you mean \"drop\"")
        );
        assert!(msg(r#"{"rules":[{"match":"/a","target":"Proxy"}]}"#).contains("write \"proxy\""));
    }
}
