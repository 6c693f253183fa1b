//! The optional rulesets: DNS hijack (nft/cgtproxy-dns.nft) and TPROXY of
//! forwarded traffic (nft/cgtproxy-forward.nft), with real traffic in
//! private network namespaces (see tests/common/mod.rs). Elements are added
//! with `nft` itself and the policy routing by hand, so these tests check the
//! shipped files independently of the daemon.
//!
//! DNS is spoken for real (RFC 1035 messages over UDP, and over TCP with the
//! length prefix). The client is a forked child that joins its cgroup and
//! then only makes raw system calls, so its socket belongs to that cgroup
//! and can carry a firewall mark (SO_MARK).

pub mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The resolver of nft/cgtproxy-dns.nft (a privileged port: no
/// unprivileged user can take the resolver's place).
const RESOLVER_PORT: u16 = 53;
/// The proxy's own mark (cgtproxy.nft `CGTPROXY_PROXY_MARK`).
const PROXY_MARK: u32 = 6666;
/// DNS client time limit where no answer is expected.
const QUICK: Duration = Duration::from_millis(1500);

const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;

// ---------------------------------------------------------------------------
// The shipped files
// ---------------------------------------------------------------------------

/// A file of `nft/` (next to the main ruleset, which
/// `CGTPROXY_TEST_RULESET` may move).
fn shipped(name: &str) -> PathBuf {
    let main = ruleset_path();
    if name == "cgtproxy.nft" {
        return main;
    }
    main.parent().unwrap().join(name)
}

const MAIN: &str = "cgtproxy.nft";
const DNS: &str = "cgtproxy-dns.nft";
const FORWARD: &str = "cgtproxy-forward.nft";

/// A file that includes `files` in order (as /etc/nftables.conf would).
fn wrapper(env: &Env, files: &[&str]) -> PathBuf {
    let mut text = String::new();
    for f in files {
        let p = shipped(f);
        assert!(p.exists(), "{} does not exist", p.display());
        text.push_str(&format!("include \"{}\"\n", p.display()));
    }
    env.write_file(&format!("wrapper-{}.nft", env.token("w")), &text)
}

/// `nft ARGS -f FILE`; Err(output) when it fails.
fn nft_f(args: &[&str], file: &Path) -> Result<(), String> {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["-f", file.to_str().unwrap()]);
    let f = run("nft", &a);
    if f.status.success() {
        Ok(())
    } else {
        Err(f.describe())
    }
}

/// Loads `files` in one `nft -f` run.
fn load(env: &Env, files: &[&str]) {
    let w = wrapper(env, files);
    if let Err(e) = nft_f(&[], &w) {
        panic!("nft -f of {files:?}: {e}");
    }
}

/// The rules of a chain of `inet cgtproxy`, as `nft` prints them (None when
/// the chain does not exist).
fn chain_rules(chain: &str) -> Option<Vec<String>> {
    let f = run("nft", &["list", "chain", "inet", "cgtproxy", chain]);
    if !f.status.success() {
        return None;
    }
    Some(
        f.stdout
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("table ")
                    && !l.starts_with("chain ")
                    && !l.starts_with("type ")
                    && *l != "}"
            })
            .map(str::to_string)
            .collect(),
    )
}

fn ifaces_in_set() -> String {
    run_ok("nft", &["list", "set", "inet", "cgtproxy", "proxy_ifaces"])
}

#[test]
fn shipped_files_check_alone_and_combined() {
    sandbox(|env| {
        // Every file alone, and every documented combination, in an empty
        // namespace; nothing is loaded by `-c`.
        let combos: [&[&str]; 8] = [
            &[MAIN],
            &[DNS],
            &[FORWARD],
            &[MAIN, DNS],
            &[MAIN, FORWARD],
            &[MAIN, DNS, FORWARD],
            &[MAIN, FORWARD, DNS],
            &[DNS, FORWARD],
        ];
        for files in combos {
            let w = wrapper(env, files);
            if let Err(e) = nft_f(&["-c"], &w) {
                panic!("nft -c -f of {files:?} (empty namespace): {e}");
            }
        }
        assert!(
            run("nft", &["list", "tables"]).stdout.trim().is_empty(),
            "nft -c loaded something"
        );
        for f in [MAIN, DNS, FORWARD] {
            if let Err(e) = nft_f(&["-c"], &shipped(f)) {
                panic!("nft -c -f {f}: {e}");
            }
        }

        // With everything loaded: each file alone again (a reload).
        load(env, &[MAIN, DNS, FORWARD]);
        for f in [MAIN, DNS, FORWARD] {
            if let Err(e) = nft_f(&["-c"], &shipped(f)) {
                panic!("nft -c -f {f} over the loaded ruleset: {e}");
            }
        }
        let hooks = || {
            (
                chain_rules("pre_bypass").unwrap(),
                chain_rules("pre_proxy").unwrap(),
            )
        };
        let (bypass, proxy) = hooks();
        // DNS needs no rule in pre_bypass: every undecided connection goes
        // to the lookup before the bypass sets.
        assert_eq!(bypass.len(), 0, "pre_bypass: {bypass:?}");
        assert_eq!(proxy.len(), 2, "pre_proxy: {proxy:?}");
        assert_eq!(chain_rules("dns").unwrap().len(), 2);
        assert_eq!(chain_rules("forward").unwrap().len(), 2);

        // Loading an optional file again replaces what it added: no
        // duplicate rules; the forward file empties its set.
        nft_script("add element inet cgtproxy proxy_ifaces { \"cgtx0\" }\n");
        for _ in 0..2 {
            nft_f(&[], &shipped(DNS)).unwrap();
            nft_f(&[], &shipped(FORWARD)).unwrap();
        }
        assert_eq!(hooks(), (bypass.clone(), proxy.clone()));
        assert_eq!(chain_rules("dns").unwrap().len(), 2);
        assert_eq!(chain_rules("forward").unwrap().len(), 2);
        assert_eq!(chain_rules("forward_new").unwrap().len(), 5);
        assert!(!ifaces_in_set().contains("cgtx0"));

        // Loading the main file again deletes the table: the optional
        // parts are gone (documented: load them again after it) ...
        load_ruleset();
        assert_eq!(chain_rules("pre_proxy").unwrap(), Vec::<String>::new());
        assert_eq!(chain_rules("dns"), None);
        assert_eq!(chain_rules("forward"), None);
        // ... and come back with them.
        load(env, &[DNS, FORWARD]);
        assert_eq!(hooks(), (bypass, proxy));

        // The whole set in one run, twice (a firewall reload).
        load(env, &[MAIN, DNS, FORWARD]);
        load(env, &[MAIN, DNS, FORWARD]);
        assert_eq!(chain_rules("pre_proxy").unwrap().len(), 2);

        // The documented /etc/nftables.conf: the includes, then the
        // interfaces (so a reload keeps them).
        let conf = wrapper(env, &[MAIN, DNS, FORWARD]);
        let mut text = fs::read_to_string(&conf).unwrap();
        text.push_str("add element inet cgtproxy proxy_ifaces { \"docker0\", \"veth*\" }\n");
        fs::write(&conf, text).unwrap();
        nft_script("delete table inet cgtproxy\n");
        if let Err(e) = nft_f(&["-c"], &conf) {
            panic!("nft -c -f of the documented nftables.conf (empty namespace): {e}");
        }
        for _ in 0..2 {
            nft_f(&[], &conf).unwrap();
            let set = ifaces_in_set();
            assert!(
                set.contains("\"docker0\"") && set.contains("\"veth*\""),
                "{set}"
            );
        }

        // The daemon takes the combined table as it is.
        env.cg.mkdir(&["/p", "/d"]);
        let rules = Rules::new(&[("/p", "proxy"), ("/d", "direct")]);
        let mut cfg = Config::new(&rules);
        cfg.route = RouteCfg::Off;
        env.once(&cfg);
        env.assert_map(&rules);
        assert_eq!(dump_map().len(), 2);
    });
}

// ---------------------------------------------------------------------------
// DNS messages
// ---------------------------------------------------------------------------

/// A standard query for `name` (dotted, no trailing dot needed).
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(id.to_be_bytes());
    m.extend(0x0100u16.to_be_bytes()); // RD
    m.extend([0, 1, 0, 0, 0, 0, 0, 0]); // QD=1
    for label in name.trim_end_matches('.').split('.') {
        assert!(!label.is_empty() && label.len() < 64, "label {label:?}");
        m.push(label.len() as u8);
        m.extend(label.as_bytes());
    }
    m.push(0);
    m.extend(qtype.to_be_bytes());
    m.extend(1u16.to_be_bytes()); // IN
    m
}

/// (id, name, qtype, end of the question) of a query.
fn parse_question(m: &[u8]) -> Option<(u16, String, u16, usize)> {
    if m.len() < 12 || u16::from_be_bytes([m[4], m[5]]) != 1 {
        return None;
    }
    let id = u16::from_be_bytes([m[0], m[1]]);
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let n = *m.get(i)? as usize;
        i += 1;
        if n == 0 {
            break;
        }
        if n > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(m.get(i..i + n)?).into_owned());
        i += n;
    }
    let qtype = u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]);
    m.get(i + 3)?;
    Some((id, labels.join("."), qtype, i + 4))
}

/// The answer to `query`: one A or AAAA record, or None for other queries.
fn dns_answer(query: &[u8], a: Ipv4Addr, aaaa: Ipv6Addr) -> Option<Vec<u8>> {
    let (_, _, qtype, end) = parse_question(query)?;
    let rdata: Vec<u8> = match qtype {
        QTYPE_A => a.octets().to_vec(),
        QTYPE_AAAA => aaaa.octets().to_vec(),
        _ => return None,
    };
    let mut m = query[..end].to_vec();
    m[2] = 0x81; // QR, RD
    m[3] = 0x80; // RA
    m[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // AN=1
    m.extend([0xc0, 12]); // name: the question's
    m.extend(qtype.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m.extend(60u32.to_be_bytes());
    m.extend((rdata.len() as u16).to_be_bytes());
    m.extend(rdata);
    Some(m)
}

/// The address in the first answer of a response to query `id`.
fn parse_answer(m: &[u8], id: u16) -> Result<IpAddr, String> {
    let (rid, _, qtype, end) = parse_question(m).ok_or("malformed response")?;
    if rid != id || m[2] & 0x80 == 0 {
        return Err(format!("not the response to query {id}"));
    }
    if u16::from_be_bytes([m[6], m[7]]) != 1 {
        return Err("no answer record".into());
    }
    let rr = m.get(end..).ok_or("truncated")?;
    if rr.len() < 12 || rr[..2] != [0xc0, 12] || u16::from_be_bytes([rr[2], rr[3]]) != qtype {
        return Err("unexpected answer record".into());
    }
    let len = u16::from_be_bytes([rr[10], rr[11]]) as usize;
    let data = rr.get(12..12 + len).ok_or("truncated rdata")?;
    match (qtype, len) {
        (QTYPE_A, 4) => Ok(IpAddr::from(<[u8; 4]>::try_from(data).unwrap())),
        (QTYPE_AAAA, 16) => Ok(IpAddr::from(<[u8; 16]>::try_from(data).unwrap())),
        _ => Err("bad rdata".into()),
    }
}

// ---------------------------------------------------------------------------
// A DNS server (UDP and TCP) that answers every A/AAAA query with fixed
// addresses and records what it got.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DnsEvent {
    proto: Proto,
    local: SocketAddr,
    peer: SocketAddr,
    name: String,
}

struct DnsServer {
    a: Ipv4Addr,
    aaaa: Ipv6Addr,
    events: Arc<Mutex<Vec<DnsEvent>>>,
    stop: Arc<AtomicBool>,
    main: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on each address, in the calling thread's netns.
    fn start(tag: &str, addrs: &[SocketAddr], a: Ipv4Addr, aaaa: Ipv6Addr) -> DnsServer {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in addrs {
            let u = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("{tag}: udp {addr}: {e}"));
            let t = TcpListener::bind(addr).unwrap_or_else(|e| panic!("{tag}: tcp {addr}: {e}"));
            u.set_nonblocking(true).unwrap();
            t.set_nonblocking(true).unwrap();
            udp.push(u);
            tcp.push(t);
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let main = {
            let (events, stop) = (events.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("{tag}-dns"))
                .spawn(move || dns_serve(udp, tcp, a, aaaa, &events, &stop))
                .unwrap()
        };
        DnsServer {
            a,
            aaaa,
            events,
            stop,
            main: Some(main),
        }
    }

    /// The queries for `name` it received.
    fn got(&self, name: &str) -> Vec<DnsEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.name == name)
            .cloned()
            .collect()
    }

    /// Its answer for a query of `qtype`.
    fn answer(&self, qtype: u16) -> IpAddr {
        if qtype == QTYPE_A {
            self.a.into()
        } else {
            self.aaaa.into()
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.main.take() {
            let _ = m.join();
        }
    }
}

fn dns_serve(
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    a: Ipv4Addr,
    aaaa: Ipv6Addr,
    events: &Mutex<Vec<DnsEvent>>,
    stop: &AtomicBool,
) {
    let fds: Vec<RawFd> = udp
        .iter()
        .map(|s| s.as_raw_fd())
        .chain(tcp.iter().map(|s| s.as_raw_fd()))
        .collect();
    let record = |proto, local, peer, query: &[u8]| {
        if let Some((_, name, _, _)) = parse_question(query) {
            events.lock().unwrap().push(DnsEvent {
                proto,
                local,
                peer,
                name,
            });
        }
    };
    let mut buf = [0u8; 4096];
    serve_until(stop, &fds, |i| {
        if i < udp.len() {
            let s = &udp[i];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let q = &buf[..n];
                record(Proto::Udp, s.local_addr().unwrap(), peer, q);
                if let Some(ans) = dns_answer(q, a, aaaa) {
                    let _ = s.send_to(&ans, peer);
                }
            }
        } else {
            let l = &tcp[i - udp.len()];
            while let Ok((mut c, peer)) = l.accept() {
                // One query per connection is all the tests send.
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if c.read_exact(&mut q).is_err() {
                    continue;
                }
                record(Proto::Tcp, c.local_addr().unwrap(), peer, &q);
                if let Some(ans) = dns_answer(&q, a, aaaa) {
                    let mut out = (ans.len() as u16).to_be_bytes().to_vec();
                    out.extend(ans);
                    let _ = c.write_all(&out);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------
// The DNS client: a forked child in a cgroup
// ---------------------------------------------------------------------------

/// From a new process in `cgroup`: a DNS query for `name` (`qtype`) to
/// `dst` (over UDP: twice, on one socket), optionally with SO_MARK;
/// Ok(address answered) or Err(why).
fn resolve(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    name: &str,
    qtype: u16,
    mark: Option<u32>,
    limit: Duration,
) -> Result<IpAddr, String> {
    let id = (name.len() as u16).wrapping_mul(7919) ^ 0x5a5a;
    let query = dns_query(id, name, qtype);
    let tcp = proto == Proto::Tcp;
    let out = if tcp {
        let mut o = (query.len() as u16).to_be_bytes().to_vec();
        o.extend(&query);
        o
    } else {
        query
    };
    let client = ForkedClient {
        cgroup,
        proto,
        dst,
        mark,
        out: &out,
        framing: Framing::LengthPrefixed,
        // Two queries on one socket: the second answer counts.
        udp_twice: true,
        limit,
    };
    let ClientFailure { stage, code } = match client.run() {
        Ok(answer) => return parse_answer(&answer, id),
        Err(f) => f,
    };
    let stage = match stage {
        ClientStage::TimeLimit => return Err(format!("no answer within {limit:?}")),
        ClientStage::Cgroup => "joining the cgroup",
        // (SO_MARK is set right after the socket is made.)
        ClientStage::Socket | ClientStage::Mark => "socket",
        ClientStage::Connect => "connect",
        ClientStage::Send => "send",
        ClientStage::Recv => "no answer (timeout or refused)",
        ClientStage::Other => "killed",
    };
    Err(format!("{stage} (exit {code})"))
}

// ---------------------------------------------------------------------------
// DNS hijack
// ---------------------------------------------------------------------------

/// What answers a query: which server, or nobody.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Fake,
    Real,
    Local,
    Nobody,
}

#[test]
fn dns_of_proxy_cgroups_goes_to_the_resolver() {
    sandbox(|env| {
        // The documented way: everything in one run (the forward file's
        // set stays empty, so it changes nothing here).
        load(env, &[MAIN, DNS, FORWARD]);
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let remote = Remote::start();
        let proxy = start_proxy();

        // The proxy's resolver on the configured address and port.
        let fake = DnsServer::start(
            "fake",
            &[
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), RESOLVER_PORT),
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), RESOLVER_PORT),
            ],
            Ipv4Addr::new(198, 18, 53, 1),
            "2001:db8:53::1".parse().unwrap(),
        );
        // The resolvers programs are configured with: a remote one (not in
        // the bypass sets), and a local stub (127.0.0.53, in them).
        let real_v4 = SocketAddr::new(REMOTE_V4.into(), 53);
        let real_v6 = SocketAddr::new(REMOTE_V6.into(), 53);
        let real = remote.ns.run(move || {
            DnsServer::start(
                "real",
                &[real_v4, real_v6],
                Ipv4Addr::new(198, 18, 54, 1),
                "2001:db8:54::1".parse().unwrap(),
            )
        });
        let stub = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 53).into(), 53);
        let local = DnsServer::start(
            "local",
            &[stub],
            Ipv4Addr::new(198, 18, 55, 1),
            "2001:db8:55::1".parse().unwrap(),
        );
        // Addresses nobody serves (routed to the remote namespace).
        let unserved_v4: SocketAddr = "198.18.1.7:53".parse().unwrap();
        let unserved_v6: SocketAddr = "[2001:db8:1::7]:53".parse().unwrap();

        env.cg.mkdir(&["/p/child", "/d", "/x", "/other"]);
        env.fill(&[("/p", "goto proxy"), ("/d", "goto direct"), ("/x", "drop")]);
        let c = &env.cg;

        let servers = [(Who::Fake, &fake), (Who::Real, &real), (Who::Local, &local)];
        let check = |cg: &str, proto: Proto, dst: SocketAddr, qtype: u16, mark, want: Who| {
            let name = format!("{}.q{qtype}.test", env.token("n").replace('_', "-"));
            let limit = if want == Who::Nobody {
                QUICK
            } else {
                Duration::from_secs(6)
            };
            let got = resolve(&c.path(cg), proto, dst, &name, qtype, mark, limit);
            let what = format!("{cg} {proto:?} qtype {qtype} to {dst} (mark {mark:?})");
            for (who, server) in servers {
                let ev = server.got(&name);
                if who == want {
                    assert_eq!(got, Ok(server.answer(qtype)), "{what}: answered by");
                    // UDP: two queries on one socket (see client_child).
                    let n = if proto == Proto::Udp { 2 } else { 1 };
                    assert_eq!(ev.len(), n, "{what}: {who:?} got {ev:?}");
                    assert_eq!(ev[0].proto, proto, "{what}");
                    if who == Who::Fake {
                        assert_eq!(ev[0].local.port(), RESOLVER_PORT, "{what}");
                        assert_eq!(ev[0].local.is_ipv4(), dst.is_ipv4(), "{what}: same family");
                    } else {
                        assert_eq!(ev[0].local, dst, "{what}: untouched destination");
                    }
                    if who == Who::Real {
                        let src: IpAddr = if dst.is_ipv4() {
                            LOCAL_V4.into()
                        } else {
                            LOCAL_V6.into()
                        };
                        assert_eq!(ev[0].peer.ip(), src, "{what}: untouched source");
                    }
                } else {
                    assert!(ev.is_empty(), "{what}: {who:?} must not see it: {ev:?}");
                }
            }
            if want == Who::Nobody {
                assert!(got.is_err(), "{what}: expected no answer, got {got:?}");
            }
            // The TPROXY listener never sees DNS that the resolver gets.
            assert!(
                proxy.events().iter().all(|e| e.local.port() != 53),
                "{what}: DNS reached the TPROXY listener: {:?}",
                proxy.events()
            );
        };

        for proto in [Proto::Udp, Proto::Tcp] {
            for qtype in [QTYPE_A, QTYPE_AAAA] {
                for dst in [unserved_v4, unserved_v6, real_v4, real_v6, stub] {
                    // `proxy` (own element or inherited): the resolver
                    // answers, whatever the destination.
                    for cg in ["/p", "/p/child"] {
                        check(cg, proto, dst, qtype, None, Who::Fake);
                    }
                    // `direct` and unlisted: untouched.
                    let served = if dst == stub {
                        Who::Local
                    } else if dst == real_v4 || dst == real_v6 {
                        Who::Real
                    } else {
                        Who::Nobody
                    };
                    for cg in ["/d", "/other"] {
                        check(cg, proto, dst, qtype, None, served);
                    }
                    // `drop`: dropped, also towards the local stub.
                    if qtype == QTYPE_A {
                        check("/x", proto, dst, qtype, None, Who::Nobody);
                    }
                }
                // The proxy's mark exempts nothing: from a proxy cgroup
                // such queries are dropped (neither hijacked nor sent
                // direct); the resolver's own queries leave from its
                // `direct` cgroup, untouched.
                for dst in [real_v4, real_v6] {
                    check("/p", proto, dst, qtype, Some(PROXY_MARK), Who::Nobody);
                    check("/d", proto, dst, qtype, Some(PROXY_MARK), Who::Real);
                }
            }
        }

        // Everything else of a proxy cgroup still goes to the TPROXY
        // listener; of a direct one, to the remote.
        for proto in [Proto::Tcp, Proto::Udp] {
            for dst in [Remote::v4(), Remote::v6()] {
                let msg = env.token("p");
                assert_eq!(
                    exchange(&c.path("/p"), proto, dst, &msg),
                    Ok(format!("proxy:{msg}"))
                );
                assert_eq!(proxy.got(&msg).len(), 1);
                let msg = env.token("d");
                assert_eq!(
                    exchange(&c.path("/d"), proto, dst, &msg),
                    Ok(format!("remote:{msg}"))
                );
                assert_eq!(remote.server.got(&msg).len(), 1);
            }
        }
    });
}

#[test]
fn dns_hijack_comes_with_the_dns_file_and_survives_reload() {
    sandbox(|env| {
        load(env, &[MAIN]);
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let _remote = Remote::start();
        let proxy = start_proxy();
        let fake = DnsServer::start(
            "fake",
            &[SocketAddr::new(Ipv4Addr::LOCALHOST.into(), RESOLVER_PORT)],
            Ipv4Addr::new(198, 18, 53, 1),
            "2001:db8:53::1".parse().unwrap(),
        );
        env.cg.mkdir(&["/p"]);
        env.fill(&[("/p", "goto proxy")]);
        let p = env.cg.path("/p");
        let dst: SocketAddr = "198.18.1.7:53".parse().unwrap();

        // Without the DNS file, DNS of a proxy cgroup is proxied like
        // anything else: the TPROXY listener gets it.
        let name = "before.load.test";
        let r = resolve(&p, Proto::Udp, dst, name, QTYPE_A, None, QUICK);
        assert!(r.is_err(), "the line server does not speak DNS: {r:?}");
        assert!(fake.got(name).is_empty());
        assert!(
            proxy.events().iter().any(|e| e.local == dst),
            "DNS without the DNS file should reach the TPROXY listener"
        );

        // With it, the resolver; loading it again changes nothing.
        load(env, &[DNS]);
        load(env, &[DNS]);
        let r = resolve(
            &p,
            Proto::Tcp,
            dst,
            "after.load.test",
            QTYPE_A,
            None,
            QUICK * 4,
        );
        assert_eq!(r, Ok(IpAddr::from(Ipv4Addr::new(198, 18, 53, 1))));

        // A firewall reload (main file, then the DNS file, one run).
        load(env, &[MAIN, DNS]);
        nft_add_elements(&env.mount, &[(&p, "goto proxy")]);
        let r = resolve(
            &p,
            Proto::Udp,
            dst,
            "after.reload.test",
            QTYPE_A,
            None,
            QUICK * 4,
        );
        assert_eq!(r, Ok(IpAddr::from(Ipv4Addr::new(198, 18, 53, 1))));
        assert_eq!(fake.got("after.reload.test").len(), 2);
    });
}

// ---------------------------------------------------------------------------
// Forwarded traffic
// ---------------------------------------------------------------------------

/// The client's (a container's, a LAN host's) addresses, behind cgtf0.
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// A destination in the bypass sets, served in the remote namespace.
const BYPASS_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const BYPASS_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
/// A service of the gateway itself, on its address towards the client.
const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const SERVICE_PORT: u16 = 9100;

/// A second namespace, joined to the test's by the veth pair cgtf0/cgtf1,
/// that uses the test namespace as its default gateway. Also routes the
/// client's and the bypass prefixes between the test and remote namespaces.
fn start_client(remote: &Remote) -> NsThread {
    let ns = behind_gateway(
        "client-ns",
        ("cgtf0", "cgtf1"),
        "198.18.2",
        "2001:db8:2",
        remote,
    );
    // The bypass prefixes live in the remote namespace.
    route_add("10.99.0.0/24", "198.18.0.2");
    route_add("fd99::/64", "2001:db8::2");
    remote.ns.run(|| {
        addr_add("lo", "10.99.0.2/32");
        addr_add("lo", "fd99::2/128");
    });
    ns
}

fn set_ifaces(op: &str, names: &[&str]) {
    let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    nft_script(&format!(
        "{op} element inet cgtproxy proxy_ifaces {{ {} }}\n",
        list.join(", ")
    ));
}

#[test]
fn forwarded_traffic_from_listed_interfaces_is_proxied() {
    sandbox(|env| {
        // Loaded one after the other (each file on its own).
        load(env, &[MAIN]);
        load(env, &[FORWARD]);
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let remote = Remote::start();
        let proxy = start_proxy();
        let client = start_client(&remote);
        let bypass = remote.ns.run(|| {
            Server::start(
                "bypass",
                &[
                    SocketAddr::new(BYPASS_V4.into(), SERVICE_PORT),
                    SocketAddr::new(BYPASS_V6.into(), SERVICE_PORT),
                ],
                false,
            )
        });
        let gateway = Server::start(
            "gateway",
            &[
                SocketAddr::new(GATEWAY_V4.into(), SERVICE_PORT),
                SocketAddr::new(GATEWAY_V6.into(), SERVICE_PORT),
            ],
            false,
        );
        // The client's processes need some cgroup; the gateway's own
        // traffic comes from an unlisted one (so: direct).
        env.cg.mkdir(&["/client", "/host"]);
        let client_cg = env.cg.path("/client");
        let host_cg = env.cg.path("/host");

        let from_client = |proto: Proto, dst: SocketAddr, msg: &str| {
            let (cg, msg) = (client_cg.clone(), msg.to_string());
            client.run(move || exchange(&cg, proto, dst, &msg))
        };
        let client_ip = |dst: SocketAddr| -> IpAddr {
            match dst {
                SocketAddr::V4(_) => CLIENT_V4.into(),
                SocketAddr::V6(_) => CLIENT_V6.into(),
            }
        };
        let forwarded = |proto, dst: SocketAddr, server: &Server, tag: &str| {
            let msg = env.token("fwd");
            let r = from_client(proto, dst, &msg);
            assert_eq!(
                r,
                Ok(format!("{tag}:{msg}")),
                "{proto:?} to {dst}: forwarded"
            );
            let ev = server.got(&msg);
            assert_eq!(ev.len(), 1, "{ev:?}");
            assert_eq!(ev[0].peer.ip(), client_ip(dst), "not NATed");
            assert!(proxy.got(&msg).is_empty(), "{proto:?} to {dst}: proxied");
        };
        let proxied = |proto, dst: SocketAddr| {
            let msg = env.token("tp");
            let r = from_client(proto, dst, &msg);
            assert_eq!(r, Ok(format!("proxy:{msg}")), "{proto:?} to {dst}: proxied");
            let ev = proxy.got(&msg);
            assert_eq!(ev.len(), 1, "{ev:?}");
            assert_eq!(ev[0].local, dst, "original destination");
            assert_eq!(ev[0].peer.ip(), client_ip(dst), "client address");
            assert!(remote.server.got(&msg).is_empty());
        };
        let remotes = [Remote::v4(), Remote::v6()];
        let bypasses = [
            SocketAddr::new(BYPASS_V4.into(), SERVICE_PORT),
            SocketAddr::new(BYPASS_V6.into(), SERVICE_PORT),
        ];
        let gateways = [
            SocketAddr::new(GATEWAY_V4.into(), SERVICE_PORT),
            SocketAddr::new(GATEWAY_V6.into(), SERVICE_PORT),
        ];
        let all_protos = [Proto::Tcp, Proto::Udp];

        // Not in the set: forwarded untouched.
        for proto in all_protos {
            for dst in remotes {
                forwarded(proto, dst, &remote.server, "remote");
            }
        }
        // Connections opened now stay forwarded after the interface joins.
        let mut early: Vec<(Proto, SocketAddr, Session)> = Vec::new();
        for proto in all_protos {
            for dst in remotes {
                let cg = client_cg.clone();
                let mut s = client.run(move || Session::open(&cg, proto, dst));
                // (A UDP flow exists only once something was sent.)
                let msg = env.token("early");
                assert_eq!(s.send(&msg), Ok(format!("remote:{msg}")));
                early.push((proto, dst, s));
            }
        }

        for names in [&["cgtf0"][..], &["cgtf*"][..]] {
            set_ifaces("add", names);
            // In the set: TCP and UDP reach the TPROXY listener with their
            // original destination ...
            for proto in all_protos {
                for dst in remotes {
                    proxied(proto, dst);
                }
                // ... except to bypass destinations and to the gateway.
                for dst in bypasses {
                    forwarded(proto, dst, &bypass, "bypass");
                }
                for dst in gateways {
                    let msg = env.token("gw");
                    assert_eq!(from_client(proto, dst, &msg), Ok(format!("gateway:{msg}")));
                    assert_eq!(gateway.got(&msg).len(), 1);
                    assert!(proxy.got(&msg).is_empty());
                }
                // The gateway's own traffic is untouched.
                for dst in remotes {
                    let msg = env.token("host");
                    assert_eq!(
                        exchange(&host_cg, proto, dst, &msg),
                        Ok(format!("remote:{msg}"))
                    );
                    assert!(proxy.got(&msg).is_empty());
                }
            }
            for (proto, dst, s) in early.iter_mut() {
                let msg = env.token("early");
                assert_eq!(
                    s.send(&msg),
                    Ok(format!("remote:{msg}")),
                    "{proto:?} to {dst}: an existing connection was taken over"
                );
            }
            // (nft 1.0.6 cannot delete a wildcard element: "element does
            // not exist"; flushing the set works.)
            nft_script("flush set inet cgtproxy proxy_ifaces\n");
        }

        // Connections proxied while the interface was in the set stay
        // proxied after it left; new ones are forwarded again.
        set_ifaces("add", &["cgtf0"]);
        let mut late: Vec<(Proto, SocketAddr, Session)> = Vec::new();
        for proto in all_protos {
            for dst in remotes {
                let cg = client_cg.clone();
                let s = client.run(move || Session::open(&cg, proto, dst));
                late.push((proto, dst, s));
            }
        }
        for (_, _, s) in late.iter_mut() {
            let msg = env.token("late");
            assert_eq!(s.send(&msg), Ok(format!("proxy:{msg}")));
        }
        set_ifaces("delete", &["cgtf0"]);
        for (proto, dst, s) in late.iter_mut() {
            let msg = env.token("late");
            assert_eq!(
                s.send(&msg),
                Ok(format!("proxy:{msg}")),
                "{proto:?} to {dst}: a proxied connection moved"
            );
        }
        for proto in all_protos {
            for dst in remotes {
                forwarded(proto, dst, &remote.server, "remote");
            }
        }

        // Together with the DNS file, forwarded traffic is unchanged; the
        // forward file loaded again empties the set.
        load(env, &[DNS]);
        set_ifaces("add", &["cgtf0"]);
        for proto in all_protos {
            proxied(proto, Remote::v4());
        }
        load(env, &[FORWARD]);
        forwarded(Proto::Tcp, Remote::v4(), &remote.server, "remote");
        drop(early);
        drop(late);
    });
}
