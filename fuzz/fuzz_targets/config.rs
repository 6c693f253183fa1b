//! The config parser on arbitrary text: it must return Ok or a config error,
//! never panic, and an error must name the source.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match cgtproxy::config::Config::parse("f.json", text) {
        Ok(cfg) => {
            // Matching never panics either, whatever the regexes.
            let _ = cfg.verdict("/user.slice/a b/\u{1F600}");
            let _ = cfg.verdict(&cgtproxy::config::match_form(data));
        }
        Err(e) => assert!(e.to_string().starts_with("f.json")),
    }
});
