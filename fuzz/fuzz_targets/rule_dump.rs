//! The rule-dump parser and its analysis on arbitrary bytes: GETRULE
//! replies as `nftables::parse_rule` reads them, then what
//! `inspect/rules.rs` concludes from them (levels looked up, the chains
//! that dispatch, restore and capture, TPROXY ports and marks) — what
//! `check`, `explain`, `apps` and the daemon's depth limit read from the
//! live ruleset.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The map names the analysis follows come from the config: take them
    // from the input too, so rules naming other maps are reached as well.
    let (names, dump) = data.split_at(data.len().min(2));
    let map = ["cgroups", "verdicts", "", "x"][names.first().map_or(0, |b| *b as usize % 4)];
    let verdicts = ["verdicts", "cgroups", "", "x"][names.get(1).map_or(0, |b| *b as usize % 4)];
    let _ = cgtproxy::inspect::analyse_rule_dump(dump, map, verdicts);
});
