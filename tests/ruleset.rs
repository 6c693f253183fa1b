//! The shipped ruleset on its own: elements are added with `nft` itself, the
//! policy routing by hand, so these tests check nft/cgtproxy.nft and the
//! harness independently of the daemon.

pub mod common;

use common::*;
use std::time::Duration;

const QUICK: Duration = Duration::from_millis(1500);

#[test]
fn ruleset_loads_and_reloads() {
    sandbox(|env| {
        // The harness names the test after its function, once (the one
        // place a test spells its own name: to check that).
        assert_eq!(
            env.name, "ruleset_loads_and_reloads",
            "the name sandbox() derived"
        );
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        env.fill(&[("/p", "goto proxy")]);
        assert_eq!(
            dump_map(),
            MapDump::from([(env.cg.id("/p"), "goto proxy".to_string())])
        );
        assert_eq!(dump_verdicts().len(), 1);
        // A firewall reload replaces the table (and empties both maps).
        load_ruleset();
        assert_eq!(
            dump_map(),
            MapDump::new(),
            "reloading the ruleset must replace the table"
        );
        assert_eq!(dump_verdicts(), VerdictDump::new());
    });
}

#[test]
fn ruleset_steers_by_cgroup() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p/child", "/d", "/x/child", "/other"]);
        env.fill(&[("/p", "goto proxy"), ("/d", "goto direct"), ("/x", "drop")]);
        let c = &env.cg;
        let want: MapDump = [
            (c.id("/p"), "goto proxy".to_string()),
            (c.id("/d"), "goto direct".to_string()),
            (c.id("/x"), "drop".to_string()),
        ]
        .into();
        assert_eq!(dump_map(), want);
        for proto in [Proto::Tcp, Proto::Udp] {
            for dst in [Remote::v4(), Remote::v6()] {
                for cg in ["/p", "/p/child"] {
                    let msg = env.token("p");
                    let r = exchange(&c.path(cg), proto, dst, &msg);
                    assert_eq!(r, Ok(format!("proxy:{msg}")), "{cg} {proto:?} {dst}");
                    let ev = proxy.got(&msg);
                    assert_eq!(ev.len(), 1, "{ev:?}");
                    assert_eq!(ev[0].local, dst, "original destination");
                    assert!(remote.server.got(&msg).is_empty());
                }
                for cg in ["/d", "/other"] {
                    let msg = env.token("d");
                    let r = exchange(&c.path(cg), proto, dst, &msg);
                    assert_eq!(r, Ok(format!("remote:{msg}")), "{cg} {proto:?} {dst}");
                    assert_eq!(remote.server.got(&msg).len(), 1);
                    assert!(proxy.got(&msg).is_empty());
                }
                for cg in ["/x", "/x/child"] {
                    let msg = env.token("x");
                    let r = exchange_within(&c.path(cg), proto, dst, &msg, QUICK);
                    assert!(
                        r.is_err(),
                        "{cg} {proto:?} {dst}: dropped traffic got {r:?}"
                    );
                    assert!(remote.server.got(&msg).is_empty());
                    assert!(proxy.got(&msg).is_empty());
                }
            }
        }
    });
}

/// What it proves: the ruleset puts the socket's own mark (SO_MARK) back
/// after the lookup used the packet mark for the verdict number, for
/// `direct` and `proxy`, and leaves it alone for unlisted cgroups and for a
/// number without a verdict gets nothing through (`dispatch` drops it: a
/// verdict the ruleset cannot read fails closed). How it can
/// fail: without the restore the packet leaves with the number as its
/// mark, is routed again by the main table, which black-holes the
/// destination (see [`marked_server`]), and the exchange fails.
#[test]
fn ruleset_keeps_the_socket_mark() {
    sandbox(|env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let remote = Remote::start();
        let proxy = start_proxy();
        let (marked, dsts) = marked_server(&remote);
        env.cg.mkdir(&["/d", "/p", "/lost", "/other"]);
        env.fill(&[("/d", "goto direct"), ("/p", "goto proxy")]);
        let c = &env.cg;
        // A number nobody defined (someone else's edit): dropped.
        let lost = format!(
            "add element inet cgtproxy cgroups {{ {} : 999 }}",
            json_str(
                c.path("/lost")
                    .strip_prefix(&env.mount)
                    .unwrap()
                    .to_str()
                    .unwrap()
            )
        );
        let f = run_cmd(
            std::process::Command::new("unshare").args([
                "-m",
                "sh",
                "-c",
                "mount -t cgroup2 none /sys/fs/cgroup && exec nft \"$1\"",
                "sh",
                &lost,
            ]),
            Duration::from_secs(10),
        );
        assert!(f.status.success(), "{}", f.describe());
        assert_eq!(
            dump_map().get(&c.id("/lost")).map(String::as_str),
            Some("number 999 (no verdict)")
        );
        for proto in [Proto::Tcp, Proto::Udp] {
            for dst in dsts {
                for cg in ["/d", "/other"] {
                    let msg = env.token("m");
                    let r = exchange_marked(
                        &c.path(cg),
                        proto,
                        dst,
                        &msg,
                        Some(SOCKET_MARK),
                        QUICK * 2,
                    );
                    assert_eq!(r, Ok(format!("marked:{msg}")), "{cg} {proto:?} {dst}");
                    assert_eq!(marked.got(&msg).len(), 1);
                }
                let msg = env.token("l");
                let r =
                    exchange_marked(&c.path("/lost"), proto, dst, &msg, Some(SOCKET_MARK), QUICK);
                assert!(r.is_err(), "/lost {proto:?} {dst}: got through: {r:?}");
                assert!(marked.got(&msg).is_empty(), "/lost {proto:?} {dst} arrived");
                let msg = env.token("u");
                let r = exchange_marked(&c.path("/d"), proto, dst, &msg, None, QUICK);
                assert!(
                    r.is_err(),
                    "unmarked {proto:?} {dst}: black-holed, got {r:?}"
                );
                let msg = env.token("p");
                let r = exchange_marked(
                    &c.path("/p"),
                    proto,
                    dst,
                    &msg,
                    Some(SOCKET_MARK),
                    QUICK * 2,
                );
                assert_eq!(r, Ok(format!("proxy:{msg}")), "/p {proto:?} {dst}");
                assert_eq!(proxy.got(&msg)[0].local, dst);
            }
        }
    });
}
