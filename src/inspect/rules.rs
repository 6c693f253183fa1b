//! What the live ruleset's rules do with the maps: read, register by
//! register, from a rule dump (`nftables::parse_rule`). Meaning only; the
//! layout of rules and expressions is the codec's.

use std::collections::BTreeSet;

use crate::nftables::expr::*;
use crate::nftables::{Data, Expr, NF_ACCEPT, NFT_GOTO, NFT_JUMP, NftVerdict, Rule};
use crate::wire;

/// What the live ruleset does with the map, read from its rules.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// Levels of the `socket cgroupv2 level N vmap @MAP` lookups.
    pub(super) levels: BTreeSet<u32>,
    /// Chains that hold those lookups.
    pub(super) lookup_chains: BTreeSet<String>,
    /// A rule looks the packet mark up in the verdicts map.
    pub(super) dispatches: bool,
    /// Chains known to exist (those with rules; `check` adds the empty
    /// ones the config names), and those whose first rule is `meta mark set
    /// socket mark`.
    pub(super) chains: BTreeSet<String>,
    pub(super) restores: BTreeSet<String>,
    /// `tproxy ... to :PORT` ports.
    pub(super) tproxy_ports: BTreeSet<u16>,
    /// The packet mark the TPROXY rules match (`meta mark X ... tproxy`).
    pub(super) tproxy_mark: Option<u32>,
    /// `meta mark X accept` in a lookup chain: the proxy's own mark.
    pub(super) proxy_mark: Option<u32>,
    /// Chains that send what reaches them to the TPROXY listener: those
    /// setting the TPROXY mark, and those that go to or jump to one.
    pub(super) capturing: BTreeSet<String>,
}

impl Facts {
    pub(super) fn levels_text(&self) -> String {
        let v: Vec<u32> = self.levels.iter().copied().collect();
        let contiguous = v.windows(2).all(|w| w[1] == w[0] + 1);
        match (v.first(), v.last()) {
            (Some(a), Some(b)) if a == b => format!("level {a}"),
            (Some(a), Some(b)) if contiguous => format!("levels {a}-{b}"),
            _ => format!(
                "levels {}",
                v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }

    /// Whether the ruleset looks up the element of a cgroup at `level`.
    pub(super) fn looks_up(&self, level: Option<usize>) -> bool {
        match level {
            Some(0) => false,
            Some(l) => self.levels.is_empty() || self.levels.contains(&(l as u32)),
            None => true,
        }
    }
}

/// Chains from which one of `seed` is reached through goto or jump.
fn reaching(seed: BTreeSet<String>, edges: &[(String, String)]) -> BTreeSet<String> {
    let mut set = seed;
    loop {
        let before = set.len();
        for (from, to) in edges {
            if set.contains(to) {
                set.insert(from.clone());
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// What each register of a rule holds so far. A rule uses a handful of
/// the kernel's 20: a list, and no hash table of its own in the binary.
struct Regs<R>(Vec<(u32, R)>);

impl<R> Regs<R> {
    fn insert(&mut self, reg: u32, v: R) {
        self.remove(reg);
        self.0.push((reg, v));
    }

    fn get(&self, reg: u32) -> Option<&R> {
        self.0.iter().find(|(r, _)| *r == reg).map(|(_, v)| v)
    }

    fn remove(&mut self, reg: u32) {
        self.0.retain(|(r, _)| *r != reg);
    }
}

/// Reads what the rules do, register by register: which levels feed a
/// lookup in `map`, whether the mark feeds one in `verdicts`, where TPROXY
/// sends to, and which marks steer it.
pub(super) fn analyse(rules: &[Rule], map: &str, verdicts: &str) -> Facts {
    #[derive(Clone)]
    enum Reg {
        Cgroup(u32),
        Value(Vec<u8>),
        Mark,
    }
    /// One rule, reduced to what matters here.
    #[derive(Default)]
    struct Summary {
        mark_eq: Option<u32>,
        sets_mark: Vec<u32>,
        tproxy: bool,
        /// `meta mark X accept`: an exemption.
        exempt: bool,
    }
    let mut f = Facts::default();
    let mut edges: Vec<(String, String)> = Vec::new();
    let mut summaries: Vec<(&str, Summary)> = Vec::new();
    for r in rules {
        let mut regs = Regs(Vec::new());
        let mut sum = Summary::default();
        let mut accept = false;
        for e in &r.exprs {
            match e.name.as_str() {
                "socket" if e.u32(SOCKET_KEY) == Some(SOCKET_CGROUPV2) => {
                    if let (Some(d), Some(l)) = (e.u32(SOCKET_DREG), e.u32(SOCKET_LEVEL)) {
                        regs.insert(d, Reg::Cgroup(l));
                    }
                }
                "immediate" => match e.data(IMMEDIATE_DATA) {
                    Some(Data::Value(v)) => {
                        if let Some(d) = e.u32(IMMEDIATE_DREG) {
                            regs.insert(d, Reg::Value(v.to_vec()));
                        }
                    }
                    Some(Data::Verdict(NftVerdict { code, chain })) => {
                        accept = code == NF_ACCEPT;
                        if let (NFT_JUMP | NFT_GOTO, Some(c)) = (code, chain) {
                            edges.push((r.chain.clone(), c));
                        }
                    }
                    None => {}
                },
                "meta" if e.u32(META_KEY) == Some(META_MARK) => {
                    if let Some(d) = e.u32(META_DREG) {
                        regs.insert(d, Reg::Mark);
                    } else if let Some(Reg::Value(v)) = e.u32(META_SREG).and_then(|s| regs.get(s))
                        && let Ok(b) = <[u8; 4]>::try_from(v.as_slice())
                    {
                        // The mark is a host-order u32 in the register.
                        sum.sets_mark.push(u32::from_ne_bytes(b));
                    }
                }
                "meta" => {
                    // Any other load overwrites its register.
                    if let Some(d) = e.u32(META_DREG) {
                        regs.remove(d);
                    }
                }
                "cmp" => {
                    if let (Some(Reg::Mark), Some(CMP_EQ), Some(Data::Value(v))) = (
                        e.u32(CMP_SREG).and_then(|s| regs.get(s)),
                        e.u32(CMP_OP),
                        e.data(CMP_DATA),
                    ) && let Ok(b) = <[u8; 4]>::try_from(v)
                    {
                        sum.mark_eq = Some(u32::from_ne_bytes(b));
                    }
                }
                "lookup" => {
                    let set = e.attr(LOOKUP_SET).map(wire::string);
                    match e.u32(LOOKUP_SREG).and_then(|s| regs.get(s)) {
                        Some(Reg::Cgroup(l)) if set.as_deref() == Some(map) => {
                            f.levels.insert(*l);
                            f.lookup_chains.insert(r.chain.clone());
                        }
                        Some(Reg::Mark) if set.as_deref() == Some(verdicts) => f.dispatches = true,
                        _ => {}
                    }
                    // A map lookup writes what it found over its register.
                    if let Some(d) = e.u32(LOOKUP_DREG) {
                        regs.remove(d);
                    }
                }
                "tproxy" => {
                    sum.tproxy = true;
                    if let Some(Reg::Value(v)) = e.u32(TPROXY_REG_PORT).and_then(|s| regs.get(s))
                        && let Ok(b) = <[u8; 2]>::try_from(v.as_slice())
                    {
                        f.tproxy_ports.insert(u16::from_be_bytes(b));
                    }
                }
                _ => {}
            }
        }
        let names: Vec<&str> = r.exprs.iter().map(|e| e.name.as_str()).collect();
        sum.exempt = names == ["meta", "cmp", "immediate"] && accept && sum.mark_eq.is_some();
        if f.chains.insert(r.chain.clone()) && restores_mark(&r.exprs) {
            f.restores.insert(r.chain.clone());
        }
        summaries.push((&r.chain, sum));
    }
    // The mark TPROXY takes: matched by a rule that does TPROXY itself or
    // goes to a chain that does.
    let tproxy_chains = reaching(
        summaries
            .iter()
            .filter(|(_, s)| s.tproxy)
            .map(|(c, _)| c.to_string())
            .collect(),
        &edges,
    );
    f.tproxy_mark = rules.iter().zip(&summaries).find_map(|(r, (_, s))| {
        let goes = r.exprs.iter().any(|e| {
            e.data(IMMEDIATE_DATA).is_some_and(|d| {
                matches!(d, Data::Verdict(NftVerdict { code: NFT_JUMP | NFT_GOTO, chain: Some(c) }) if tproxy_chains.contains(&c))
            })
        });
        s.mark_eq.filter(|_| s.tproxy || goes)
    });
    // The proxy's exemption: `meta mark X accept` on the way to a lookup.
    let upstream = reaching(f.lookup_chains.clone(), &edges);
    f.proxy_mark = summaries
        .iter()
        .find(|(c, s)| s.exempt && upstream.contains(*c))
        .and_then(|(_, s)| s.mark_eq);
    // Chains that hand what reaches them to the listener: those that set
    // the TPROXY mark, and those that go to one of them.
    f.capturing = reaching(
        summaries
            .iter()
            .filter(|(_, s)| {
                s.sets_mark
                    .iter()
                    .any(|m| f.tproxy_mark.is_none_or(|t| t == *m))
            })
            .map(|(c, _)| c.to_string())
            .collect(),
        &edges,
    );
    f
}

/// The ports the `nat` rules of `chain` translate to (the DNS hijack's
/// resolver port, nft/cgtproxy-dns.nft chain `dns`): the 2-byte values a
/// rule with a `nat` expression loads into a register.
pub(super) fn nat_ports(rules: &[Rule], chain: &str) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for r in rules.iter().filter(|r| r.chain == chain) {
        if !r.exprs.iter().any(|e| e.name == "nat") {
            continue;
        }
        for e in r.exprs.iter().filter(|e| e.name == "immediate") {
            if let Some(Data::Value(v)) = e.data(IMMEDIATE_DATA)
                && let Ok(b) = <[u8; 2]>::try_from(v)
            {
                ports.insert(u16::from_be_bytes(b));
            }
        }
    }
    ports
}

/// `meta mark set socket mark`: socket mark into a register, the packet
/// mark from it.
fn restores_mark(exprs: &[Expr]) -> bool {
    let [sock, meta] = exprs else { return false };
    let reg = sock.u32(SOCKET_DREG);
    sock.name == "socket"
        && sock.u32(SOCKET_KEY) == Some(SOCKET_MARK)
        && meta.name == "meta"
        && meta.u32(META_KEY) == Some(META_MARK)
        && reg.is_some()
        && meta.u32(META_SREG) == reg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::data_attr;
    use crate::wire::Writer;

    fn expr(name: &str, attrs: &[(u16, Vec<u8>)]) -> Expr {
        Expr {
            name: name.into(),
            attrs: attrs.to_vec(),
        }
    }
    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
    fn value(v: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        data_attr(&mut w, &Data::Value(v));
        w.buf
    }
    fn verdict(code: i32, chain: Option<&str>) -> Vec<u8> {
        let mut w = Writer::new();
        let v = NftVerdict {
            code,
            chain: chain.map(str::to_string),
        };
        data_attr(&mut w, &Data::Verdict(v));
        w.buf
    }
    fn rule(chain: &str, exprs: Vec<Expr>) -> Rule {
        Rule {
            table: "cgtproxy".into(),
            chain: chain.into(),
            exprs,
        }
    }

    fn meta_mark_load() -> Expr {
        expr("meta", &[(META_DREG, be(1)), (META_KEY, be(3))])
    }
    fn mark_eq(m: u32) -> Expr {
        expr(
            "cmp",
            &[
                (CMP_SREG, be(1)),
                (CMP_OP, be(0)),
                (CMP_DATA, value(&m.to_ne_bytes())),
            ],
        )
    }
    fn goes(code: i32, chain: Option<&str>) -> Expr {
        expr(
            "immediate",
            &[
                (IMMEDIATE_DREG, be(0)),
                (IMMEDIATE_DATA, verdict(code, chain)),
            ],
        )
    }
    fn load(reg: u32, v: &[u8]) -> Expr {
        expr(
            "immediate",
            &[(IMMEDIATE_DREG, be(reg)), (IMMEDIATE_DATA, value(v))],
        )
    }
    fn set_name(map: &str) -> Vec<u8> {
        let mut set = map.as_bytes().to_vec();
        set.push(0);
        set
    }
    /// `socket cgroupv2 level L vmap @MAP` (the 0.1 shape).
    fn level(l: u32, map: &str) -> Vec<Expr> {
        vec![
            expr(
                "socket",
                &[
                    (SOCKET_KEY, be(3)),
                    (SOCKET_DREG, be(1)),
                    (SOCKET_LEVEL, be(l)),
                ],
            ),
            expr(
                "lookup",
                &[(LOOKUP_SET, set_name(map)), (LOOKUP_SREG, be(1))],
            ),
        ]
    }
    /// `meta mark set socket cgroupv2 level L map @MAP goto dispatch`
    fn level_number(l: u32, map: &str) -> Vec<Expr> {
        let mut v = level(l, map);
        v[1].attrs.push((LOOKUP_DREG, be(1)));
        v.push(expr("meta", &[(META_KEY, be(3)), (META_SREG, be(1))]));
        v.push(goes(-4, Some("dispatch")));
        v
    }
    /// `meta mark set socket mark`
    fn restore() -> Vec<Expr> {
        vec![
            expr("socket", &[(SOCKET_KEY, be(1)), (SOCKET_DREG, be(1))]),
            expr("meta", &[(META_KEY, be(3)), (META_SREG, be(1))]),
        ]
    }
    /// `meta mark vmap @MAP`
    fn dispatch(map: &str) -> Vec<Expr> {
        vec![
            meta_mark_load(),
            expr(
                "lookup",
                &[(LOOKUP_SET, set_name(map)), (LOOKUP_SREG, be(1))],
            ),
        ]
    }
    fn set_mark(m: u32) -> Vec<Expr> {
        vec![
            load(8, &m.to_ne_bytes()),
            expr("meta", &[(META_KEY, be(3)), (META_SREG, be(8))]),
        ]
    }
    fn tproxy(port: u16) -> Vec<Expr> {
        vec![
            load(9, &port.to_be_bytes()),
            expr("tproxy", &[(TPROXY_REG_PORT, be(9))]),
        ]
    }

    /// What `check` must find in the shipped ruleset: the level lookups,
    /// the dispatch through `verdicts`, the TPROXY port and marks as the
    /// file's defines set them, `proxy` capturing and `direct` not.
    fn assert_shipped(f: &Facts, port: u16, mark: u32, proxy_mark: Option<u32>) {
        assert_eq!(f.levels, (1..=16).collect::<BTreeSet<u32>>());
        assert_eq!(f.levels_text(), "levels 1-16");
        assert!(f.dispatches);
        assert_eq!(f.lookup_chains, BTreeSet::from(["lookup".to_string()]));
        assert_eq!(f.tproxy_ports, BTreeSet::from([port]));
        assert_eq!(f.tproxy_mark, Some(mark));
        assert_eq!(f.proxy_mark, proxy_mark);
        assert!(f.capturing.contains("proxy"), "{:?}", f.capturing);
        for c in ["direct", "lookup", "dispatch"] {
            assert!(!f.capturing.contains(c), "{c} does not capture");
        }
        assert!(f.restores.contains("proxy") && f.restores.contains("direct"));
    }

    /// The shipped nft/cgtproxy.nft as the kernel dumps it: the bytes
    /// captured from Linux 6.18 (src/nftables/fixtures), and the file as it
    /// is now, loaded into a private network namespace and dumped by the
    /// session `check` uses (root; under CI=true a skip is a failure).
    #[test]
    fn analyses_the_shipped_shape() {
        let captured: Vec<Rule> = wire::messages(crate::nftables::tests::KERNEL_DUMP)
            .map(|m| m.unwrap())
            .filter(|m| m.ty == crate::nftables::msg_type(crate::nftables::NFT_MSG_NEWRULE))
            .map(|m| crate::nftables::parse_rule(&m).unwrap())
            .collect();
        // (Captured from the 0.2 ruleset, which still exempted the mark.)
        assert_shipped(
            &analyse(&captured, "cgroups", "verdicts"),
            7893,
            9011,
            // Captured after issue 11: the proxy's mark exempts nothing.
            None,
        );
        assert!(analyse(&captured, "other", "verdicts").levels.is_empty());
        assert!(!analyse(&captured, "cgroups", "other").dispatches);

        if !rustix::process::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "analyses_the_shipped_shape needs root (CI=true makes a skip a failure)"
            );
            eprintln!("SKIP analyses_the_shipped_shape (live half): needs root");
            return;
        }
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/nft/cgtproxy.nft");
        let text = std::fs::read_to_string(file).unwrap();
        let define = |name: &str| -> u32 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("define {name} ")))
                .unwrap_or_else(|| panic!("{file}: no define {name}"));
            let v = line.rsplit('=').next().unwrap().trim();
            v.parse().unwrap_or_else(|_| panic!("{file}: {line}"))
        };
        // A thread of its own, in a network namespace of its own: nft and
        // the netlink socket it opens see only that namespace.
        let live = std::thread::spawn(move || {
            // SAFETY: unshare(2) affects this thread only (CLONE_NEWNET).
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "unshare -n"
            );
            let st = std::process::Command::new("nft")
                .args(["-f", file])
                .status()
                .expect("nft");
            assert!(st.success(), "nft -f {file}");
            let cfg = crate::config::Config::parse("t", r#"{"rules":[]}"#).unwrap();
            crate::ruleset::Ruleset::open(&cfg)
                .unwrap()
                .rules()
                .unwrap()
        })
        .join()
        .unwrap();
        let f = analyse(&live, "cgroups", "verdicts");
        assert_shipped(
            &f,
            define("CGTPROXY_PORT") as u16,
            define("CGTPROXY_MARK"),
            // The proxy's mark exempts nothing any more (issue 11).
            None,
        );
    }

    /// A hand-built model of the shipped shape, each rule written out: the
    /// lookups in their own chain, TPROXY behind a goto, and a chain that
    /// restores the socket mark too late.
    #[test]
    fn analyses_a_hand_built_model() {
        let rules = vec![
            // output: meta mark 6666 accept; ...; goto lookup
            rule(
                "output",
                vec![meta_mark_load(), mark_eq(6666), goes(1, None)],
            ),
            rule("output", vec![goes(-4, Some("lookup"))]),
            rule("lookup", level_number(2, "cgroups")),
            rule("lookup", level_number(1, "cgroups")),
            rule("lookup", vec![goes(-4, Some("pass"))]),
            rule("dispatch", dispatch("verdicts")),
            rule("dispatch", vec![goes(-4, Some("direct"))]),
            // proxy: meta mark set socket mark; jump pre_proxy; ... goto reroute
            rule("proxy", restore()),
            rule("proxy", vec![goes(-3, Some("pre_proxy"))]),
            rule("proxy", vec![goes(-4, Some("reroute"))]),
            rule("reroute", [set_mark(9011), vec![goes(1, None)]].concat()),
            rule("direct", restore()),
            rule("direct", vec![goes(-4, Some("pass"))]),
            rule("pass", vec![goes(1, None)]),
            rule("mine", vec![goes(1, None)]),
            rule("mine", restore()),
            // prerouting: meta mark 9011 goto listener
            rule(
                "prerouting",
                vec![meta_mark_load(), mark_eq(9011), goes(-4, Some("listener"))],
            ),
            rule("listener", [set_mark(9011), tproxy(7893)].concat()),
        ];
        let f = analyse(&rules, "cgroups", "verdicts");
        assert_eq!(f.levels, BTreeSet::from([1, 2]));
        assert!(f.dispatches);
        assert_eq!(f.levels_text(), "levels 1-2");
        assert_eq!(f.lookup_chains, BTreeSet::from(["lookup".to_string()]));
        assert_eq!(f.tproxy_ports, BTreeSet::from([7893]));
        assert_eq!(f.tproxy_mark, Some(9011));
        assert_eq!(f.proxy_mark, Some(6666));
        for c in ["proxy", "reroute"] {
            assert!(f.capturing.contains(c), "{c} captures: {:?}", f.capturing);
        }
        for c in [
            "direct",
            "pass",
            "output",
            "lookup",
            "dispatch",
            "pre_proxy",
        ] {
            assert!(!f.capturing.contains(c), "{c} does not capture");
        }
        assert!(f.looks_up(Some(2)) && !f.looks_up(Some(3)) && !f.looks_up(Some(0)));
        // `mine` restores, but too late: not on its first rule.
        assert_eq!(
            f.restores,
            BTreeSet::from(["proxy".to_string(), "direct".to_string()])
        );
        assert!(analyse(&rules, "other", "verdicts").levels.is_empty());
        assert!(!analyse(&rules, "cgroups", "other").dispatches);
    }

    /// An older shape: lookups in the base chain, TPROXY in prerouting.
    #[test]
    fn analyses_a_flat_ruleset() {
        let rules = vec![
            rule("output", vec![meta_mark_load(), mark_eq(1), goes(1, None)]),
            rule("output", level(3, "m")),
            rule("proxy", [set_mark(5), vec![goes(1, None)]].concat()),
            rule("mine", vec![goes(-3, Some("proxy"))]),
            rule(
                "prerouting",
                [vec![meta_mark_load(), mark_eq(5)], tproxy(1234)].concat(),
            ),
        ];
        let f = analyse(&rules, "m", "v");
        assert_eq!(f.levels_text(), "level 3");
        assert_eq!((f.tproxy_mark, f.proxy_mark), (Some(5), Some(1)));
        assert_eq!(f.tproxy_ports, BTreeSet::from([1234]));
        assert_eq!(
            f.capturing,
            BTreeSet::from(["mine".to_string(), "proxy".to_string()])
        );
    }
}
