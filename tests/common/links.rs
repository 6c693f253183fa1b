//! Links between the tests' namespaces: veth pairs, their addresses, the
//! routes over them, and a namespace that uses the test's as its gateway.

use super::netns::NsThread;
use super::process::run_ok;
use super::servers::Remote;
use std::fs;

/// The family flag `ip` needs for `addr` (an address or prefix).
fn family(addr: &str) -> &'static str {
    if addr.contains(':') { "-6" } else { "-4" }
}

/// `ip addr add ADDR dev DEV`, in the calling thread's namespace; an IPv6
/// address without duplicate address detection, so usable at once.
pub fn addr_add(dev: &str, addr: &str) {
    let mut args = vec![family(addr), "addr", "add", addr, "dev", dev];
    if addr.contains(':') {
        args.push("nodad");
    }
    run_ok("ip", &args);
}

/// `ip route add DST via VIA`, in the calling thread's namespace (`DST` may
/// be `default`: the family is `VIA`'s).
pub fn route_add(dst: &str, via: &str) {
    run_ok("ip", &[family(via), "route", "add", dst, "via", via]);
}

/// A veth pair: `here` stays in the calling thread's namespace, `there`
/// moves into `ns`; each end gets its addresses and is up.
pub fn veth(
    ns: &NsThread,
    (here, here_addrs): (&str, &[&str]),
    (there, there_addrs): (&str, &[&str]),
) {
    run_ok(
        "ip",
        &["link", "add", here, "type", "veth", "peer", "name", there],
    );
    run_ok("ip", &["link", "set", there, "netns", &ns.tid.to_string()]);
    let there = there.to_string();
    let there_addrs: Vec<String> = there_addrs.iter().map(|a| a.to_string()).collect();
    ns.run(move || {
        for a in &there_addrs {
            addr_add(&there, a);
        }
        run_ok("ip", &["link", "set", &there, "up"]);
    });
    for a in here_addrs {
        addr_add(here, a);
    }
    run_ok("ip", &["link", "set", here, "up"]);
}

/// A host behind the test namespace (a container, a LAN client): its own
/// namespace `name`, joined by the veth pair `here`/`there` on `v4`.0/24
/// and `v6`::/64 (`"198.18.3"`, `"2001:db8:3"`: the test's end .1 and ::1,
/// the host .2 and ::2), its default routes via the test's end. The test
/// namespace forwards (these sysctls are its own), and the remote routes
/// the host's prefixes back through it.
pub fn behind_gateway(
    name: &str,
    (here, there): (&str, &str),
    v4: &str,
    v6: &str,
    remote: &Remote,
) -> NsThread {
    let ns = NsThread::new(name);
    let (gw4, gw6) = (format!("{v4}.1"), format!("{v6}::1"));
    veth(
        &ns,
        (here, &[&format!("{gw4}/24"), &format!("{gw6}/64")]),
        (there, &[&format!("{v4}.2/24"), &format!("{v6}::2/64")]),
    );
    ns.run(move || {
        route_add("default", &gw4);
        route_add("default", &gw6);
    });
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
    let (net4, net6) = (format!("{v4}.0/24"), format!("{v6}::/64"));
    remote.ns.run(move || {
        route_add(&net4, "198.18.0.1");
        route_add(&net6, "2001:db8::1");
    });
    ns
}
