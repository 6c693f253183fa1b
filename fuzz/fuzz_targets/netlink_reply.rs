//! Everything cgtproxy parses from the kernel, on arbitrary bytes: netlink
//! framing, error/ack messages, nf_tables element and rule dumps (rule
//! expressions and their `nft_data`) and events.
#![no_main]

use cgtproxy::{nftables, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for m in wire::messages(data).flatten() {
        let _ = wire::parse_error(&m);
        let _ = nftables::parse_elements(&m);
        let _ = nftables::parse_set(&m);
        let _ = nftables::parse_newgen_pid(&m);
        let _ = nftables::parse_names(&m);
        if let Ok(rule) = nftables::parse_rule(&m) {
            for e in &rule.exprs {
                for (ty, _) in &e.attrs {
                    let _ = (e.u32(*ty), e.data(*ty));
                }
            }
        }
        for a in wire::attrs(m.payload).flatten() {
            let _ = (wire::be32(a.1), wire::be64(a.1), wire::string(a.1));
        }
    }
});
