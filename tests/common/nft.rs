//! nftables as the kernel sees it, read and written with the real `nft`
//! (never the daemon's code).

use super::config::json_str;
use super::process::{collect, run_cmd, run_ok, wait_child};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn ruleset_path() -> PathBuf {
    match std::env::var_os("CGTPROXY_TEST_RULESET") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("nft/cgtproxy.nft"),
    }
}

/// Loads the shipped ruleset into the current network namespace.
pub fn load_ruleset() {
    let path = ruleset_path();
    assert!(path.exists(), "ruleset {} does not exist", path.display());
    run_ok("nft", &["-f", path.to_str().unwrap()]);
}

/// Runs an nft script (stdin) in the current network namespace.
pub fn nft_script(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let st = wait_child(&mut child, Duration::from_secs(10)).expect("nft -f - hangs");
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        st.success(),
        "nft -f - failed: {st:?}\n{out}\n{err}\nscript:\n{script}"
    );
}

/// The name of the second map of the shipped ruleset (config `verdict-map`).
pub const VERDICT_MAP: &str = "verdicts";

/// The key of `verdicts` that, holding `drop`, tells the ruleset that the
/// maps are filled (nft/cgtproxy.nft, "Fail closed").
pub const FILLED_FLAG: u32 = 0;

/// Adds elements with `nft` itself (not the daemon): cgroup2 is mounted at
/// /sys/fs/cgroup in a private mount namespace so nft can resolve paths.
/// `elems`: (cgroup directory, verdict as nft writes it).
///
/// The ruleset maps a cgroup to a number (`cgroups`) and the number to its
/// verdict (`verdicts`): each distinct verdict gets the number it already
/// has in `verdicts`, or the smallest free one from 1000 up (far from the
/// daemon's 1, 2, …). Both maps are written by one `nft` command, one
/// transaction, with the flag `0 : drop` that says the maps are filled (as
/// the daemon's full sync writes it).
pub fn nft_add_elements(mount: &Path, elems: &[(&Path, &str)]) {
    let mut numbers = try_dump_raw("cgtproxy", "cgroups", VERDICT_MAP)
        .map(|r| r.verdicts)
        .unwrap_or_default();
    let mut fresh: Vec<(u32, String)> = Vec::new();
    let mut number_of = |verdict: &str| -> u32 {
        if let Some((n, _)) = numbers.iter().find(|(_, v)| v.as_str() == verdict) {
            return *n;
        }
        let n = (1000u32..)
            .find(|n| !numbers.contains_key(n))
            .expect("a free number");
        numbers.insert(n, verdict.to_string());
        fresh.push((n, verdict.to_string()));
        n
    };
    let items: Vec<String> = elems
        .iter()
        .map(|(dir, verdict)| {
            let rel = dir.strip_prefix(mount).expect("cgroup below the mount");
            format!(
                "{} : {}",
                json_str(rel.to_str().unwrap()),
                number_of(verdict)
            )
        })
        .collect();
    let mut cmd = String::new();
    let mut v: Vec<String> = fresh.iter().map(|(n, v)| format!("{n} : {v}")).collect();
    v.push(format!("{FILLED_FLAG} : drop"));
    let _ = write!(
        cmd,
        "add element inet cgtproxy {VERDICT_MAP} {{ {} }}; ",
        v.join(", ")
    );
    let _ = write!(
        cmd,
        "add element inet cgtproxy cgroups {{ {} }}",
        items.join(", ")
    );
    let f = run_cmd(
        Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            "mount -t cgroup2 none /sys/fs/cgroup && exec nft \"$1\"",
            "sh",
            &cmd,
        ]),
        Duration::from_secs(10),
    );
    assert!(f.status.success(), "nft {cmd}: {}", f.describe());
}

/// A map as the kernel has it, composed: cgroup id → verdict ("goto proxy",
/// "drop", …) through its number in `verdicts`; a number without a verdict
/// shows as "number N (no verdict)".
pub type MapDump = BTreeMap<u64, String>;

/// `verdicts` as the kernel has it: number → verdict ("goto proxy", "drop").
pub type VerdictDump = BTreeMap<u32, String>;

/// One element of `cgroups` as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawElem {
    /// The verdict number (the element's data).
    pub number: u32,
    /// Its counter, when the map has counters.
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// Both maps as the kernel has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawDump {
    /// `cgroups`: cgroup id → element.
    pub elems: BTreeMap<u64, RawElem>,
    /// `verdicts`: number → verdict; empty when that map does not exist.
    pub verdicts: VerdictDump,
    /// Whether the table has the verdict map at all.
    pub has_verdict_map: bool,
    /// What `verdicts` holds at key 0, the "maps are filled" flag (the
    /// daemon writes `0 : drop`); not in `verdicts`.
    pub flag: Option<String>,
}

impl RawDump {
    /// cgroup id → verdict, through `verdicts`.
    pub fn compose(&self) -> MapDump {
        self.elems
            .iter()
            .map(|(id, e)| (*id, verdict_of_number(&self.verdicts, e.number)))
            .collect()
    }
}

/// What number `n` stands for in `verdicts`, or "number N (no verdict)".
pub fn verdict_of_number(verdicts: &VerdictDump, n: u32) -> String {
    verdicts
        .get(&n)
        .cloned()
        .unwrap_or_else(|| format!("number {n} (no verdict)"))
}

/// The number `verdicts` gives `verdict` (exactly one), from a dump.
pub fn number_of(verdicts: &VerdictDump, verdict: &str) -> u32 {
    let ns: Vec<u32> = verdicts
        .iter()
        .filter(|(_, v)| v.as_str() == verdict)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(ns.len(), 1, "one number for {verdict:?} in {verdicts:?}");
    ns[0]
}

/// Dumps `inet TABLE` with one `nft -j list table` and returns the maps
/// `map` (cgroup id → number) and `vmap` (number → verdict). `nft` runs in a
/// private mount namespace with an empty tmpfs on /sys/fs/cgroup, so it
/// prints ids. Err when the table or `map` does not exist.
pub fn try_dump_raw(table: &str, map: &str, vmap: &str) -> Result<RawDump, String> {
    let f = run_cmd(
        Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs none /sys/fs/cgroup && exec nft -j list table inet \"$1\"",
            "sh",
            table,
        ]),
        Duration::from_secs(10),
    );
    if !f.status.success() {
        return Err(format!("nft list table inet {table}: {}", f.describe()));
    }
    parse_table_json(&f.stdout, map, vmap)
}

/// Dumps `inet TABLE MAP`, composed with the map `verdicts` of the same
/// table (see [`MapDump`]).
pub fn try_dump_map(table: &str, map: &str) -> Result<MapDump, String> {
    try_dump_raw(table, map, VERDICT_MAP).map(|r| r.compose())
}

/// Dumps the map `inet cgtproxy cgroups`, composed; panics when it cannot.
pub fn dump_map() -> MapDump {
    try_dump_map("cgtproxy", "cgroups").unwrap_or_else(|e| panic!("{e}"))
}

/// Both maps of `inet cgtproxy`, raw; panics when it cannot.
pub fn dump_raw() -> RawDump {
    try_dump_raw("cgtproxy", "cgroups", VERDICT_MAP).unwrap_or_else(|e| panic!("{e}"))
}

/// The map `inet cgtproxy verdicts`: number → verdict; panics when the
/// table cannot be listed.
pub fn dump_verdicts() -> VerdictDump {
    dump_raw().verdicts
}

/// A mark as `nft -j` prints it: a number, or a string in decimal or hex
/// ("0x00000001").
fn json_mark(v: &miniserde::json::Value) -> Option<u32> {
    use miniserde::json::{Number, Value};
    match v {
        Value::Number(Number::U64(n)) => u32::try_from(*n).ok(),
        Value::Number(Number::I64(n)) => u32::try_from(*n).ok(),
        Value::String(s) => match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => s.parse().ok(),
        },
        _ => None,
    }
}

/// Parses `nft -j list table` output: the maps `map` and `vmap`.
pub fn parse_table_json(text: &str, map: &str, vmap: &str) -> Result<RawDump, String> {
    use miniserde::json::{Number, Object, Value};
    let bad = |what: &str| format!("unexpected nft JSON ({what}): {text}");
    let v: Value = miniserde::json::from_str(text).map_err(|_| bad("not JSON"))?;
    let Value::Object(top) = v else {
        return Err(bad("top"));
    };
    let Some(Value::Array(items)) = top.get("nftables") else {
        return Err(bad("no nftables array"));
    };
    let find = |name: &str| -> Option<&Object> {
        items.iter().find_map(|i| match i {
            Value::Object(o) => match o.get("map") {
                Some(Value::Object(m))
                    if matches!(m.get("name"), Some(Value::String(n)) if n == name) =>
                {
                    Some(m)
                }
                _ => None,
            },
            _ => None,
        })
    };
    let elems_of = |m: &Object| -> Result<Vec<(Value, Value)>, String> {
        let Some(elems) = m.get("elem") else {
            return Ok(Vec::new());
        };
        let Value::Array(elems) = elems else {
            return Err(bad("elem"));
        };
        elems
            .iter()
            .map(|e| match e {
                Value::Array(pair) if pair.len() == 2 => Ok((pair[0].clone(), pair[1].clone())),
                _ => Err(bad("element pair")),
            })
            .collect()
    };
    fn num(v: Option<&Value>) -> Option<u64> {
        match v {
            Some(Value::Number(Number::U64(n))) => Some(*n),
            _ => None,
        }
    }
    // A key is the id itself, or {"elem": {"val": id, "counter": {...}}}.
    fn key_of(v: &Value) -> Option<(u64, Option<u64>, Option<u64>)> {
        match v {
            Value::Number(Number::U64(n)) => Some((*n, None, None)),
            Value::String(s) => s.parse().ok().map(|n| (n, None, None)),
            Value::Object(o) => {
                let inner = match o.get("elem") {
                    Some(Value::Object(e)) => e,
                    _ => o,
                };
                let (id, _, _) = key_of(inner.get("val")?)?;
                let (p, b) = match inner.get("counter") {
                    Some(Value::Object(c)) => (num(c.get("packets")), num(c.get("bytes"))),
                    _ => (None, None),
                };
                Some((id, p, b))
            }
            _ => None,
        }
    }
    fn verdict_of(v: &Value) -> Option<String> {
        let Value::Object(o) = v else { return None };
        let (k, inner) = o.iter().next()?;
        match inner {
            Value::Object(t) => match t.get("target") {
                Some(Value::String(c)) => Some(format!("{k} {c}")),
                _ => None,
            },
            _ => Some(k.clone()),
        }
    }
    let cg = find(map).ok_or_else(|| bad(&format!("no map {map}")))?;
    let mut dump = RawDump::default();
    for (k, d) in elems_of(cg)? {
        let (id, packets, bytes) = key_of(&k).ok_or_else(|| bad("element key"))?;
        let number = json_mark(&d).ok_or_else(|| bad("element number"))?;
        dump.elems.insert(
            id,
            RawElem {
                number,
                packets,
                bytes,
            },
        );
    }
    if let Some(vm) = find(vmap) {
        dump.has_verdict_map = true;
        for (k, d) in elems_of(vm)? {
            // A key with a counter would come as {"elem": {"val": N, ...}}.
            let n = match &k {
                Value::Object(o) => match o.get("elem") {
                    Some(Value::Object(e)) => e.get("val").and_then(json_mark),
                    _ => o.get("val").and_then(json_mark),
                },
                other => json_mark(other),
            }
            .ok_or_else(|| bad("verdict key"))?;
            let verdict = verdict_of(&d).ok_or_else(|| bad("verdict"))?;
            if n == FILLED_FLAG {
                dump.flag = Some(verdict);
            } else {
                dump.verdicts.insert(n, verdict);
            }
        }
    }
    Ok(dump)
}

/// The packets counted by the first `counter` of a chain of the table.
/// [`chain_counter`] once it stopped moving: the same in two reads 100 ms
/// apart (for at most 2 s; then the last read).
pub fn quiet_counter(chain: &str) -> u64 {
    let mut last = chain_counter(chain);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        let now = chain_counter(chain);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

pub fn chain_counter(chain: &str) -> u64 {
    let out = run_ok("nft", &["list", "chain", "inet", "cgtproxy", chain]);
    out.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter in chain {chain}:\n{out}"))
}
