//! The shipped ruleset on its own: elements are added with `nft` itself, the
//! policy routing by hand, so these tests check nft/cgtproxy.nft and the
//! harness independently of the daemon.

mod common;

use common::*;
use std::time::Duration;

const QUICK: Duration = Duration::from_millis(1500);

#[test]
fn ruleset_loads_and_reloads() {
    e2e("ruleset_loads_and_reloads", |env| {
        load_ruleset();
        env.cg.mkdir(&["/p"]);
        nft_add_elements(&env.mount, &[(&env.cg.path("/p"), "goto proxy")]);
        assert_eq!(dump_map().len(), 1);
        // A firewall reload replaces the table (and empties the map).
        load_ruleset();
        assert_eq!(
            dump_map(),
            MapDump::new(),
            "reloading the ruleset must replace the table"
        );
    });
}

#[test]
fn ruleset_steers_by_cgroup() {
    e2e("ruleset_steers_by_cgroup", |env| {
        load_ruleset();
        add_policy_routing(ROUTE_MARK, ROUTE_TABLE);
        let remote = Remote::start();
        let proxy = start_proxy();
        env.cg.mkdir(&["/p/child", "/d", "/x/child", "/other"]);
        let c = &env.cg;
        nft_add_elements(
            &env.mount,
            &[
                (&c.path("/p"), "goto proxy"),
                (&c.path("/d"), "goto direct"),
                (&c.path("/x"), "drop"),
            ],
        );
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
