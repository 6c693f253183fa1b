//! End-to-end harness for cgtproxy.
//!
//! Every test runs on a fresh thread that has its own network namespace
//! (`unshare(CLONE_NEWNET)`); whatever it spawns (`nft`, `ip`, the daemon,
//! clients) inherits that namespace. Each test gets its own cgroup subtree
//! `<cgroup2 mount>/cgtproxy-test-<random>`, removed on drop (processes left
//! in it are killed through `cgroup.kill`). Nothing here touches the host's
//! ruleset, routes or cgroups outside that subtree, and every address used
//! lives in the test's own namespaces (loopback, 198.18.0.0/15,
//! 2001:db8::/32 on a veth pair).
//!
//! The maps are read back with the real `nft` (not the daemon's code), in a
//! private mount namespace with an empty tmpfs over `/sys/fs/cgroup`, so that
//! `nft` prints numeric cgroup ids. The ruleset keeps two maps, `cgroups`
//! (cgroup id → verdict number) and `verdicts` (number → verdict); a dump
//! composes them into cgroup id → verdict ("goto proxy"), so a number
//! without a verdict shows and fails a comparison. The expected content
//! ("truth") is computed from a walk of the test subtree and the rules,
//! independently of the daemon.
//!
//! Prerequisites: root, `nft`, `ip`, `unshare`, `bash`, `timeout`, a cgroup2
//! mount. Without them a test prints `SKIP` and passes, except with
//! `CI=true`, where it fails. `CGTPROXY_TEST_RULESET` overrides the ruleset
//! file (default: `nft/cgtproxy.nft` of this crate).
//!
//! A test is `#[test] fn name() { sandbox(|env| { ... }) }`: the name is
//! the function's, from the thread libtest runs the test on
//! ([`test_name`]), also in a helper the test calls; skips and tools
//! (`gate`, `need`, `have`, `skip`) take it from there too.
//!
//! The harness, by concern (each file's items are re-exported here, so a
//! test file reaches all of them as `common::name`):
//! - `prereq.rs`:  root, tools, the cgroup2 mount; skip or fail under CI
//! - `netns.rs`:   the entry point (`sandbox`), threads in namespaces of their own
//! - `process.rs`: running commands with a time limit, waiting for a condition
//! - `nft.rs`:     the ruleset and both maps, read and written by the real `nft`
//! - `monitor.rs`: our own `nft monitor`: each transaction's events and committer
//! - `ptrace.rs`:  holding the daemon at its next batch, to make a race certain
//! - `links.rs`:   veth pairs, addresses, routes; a host behind the test's
//! - `routing.rs`: policy routing as `ip rule` / `ip route` show it
//! - `config.rs`:  config files and the rules' verdicts, computed independently
//! - `cgroups.rs`: the test's cgroup subtree by path, and its truth
//! - `fdtree.rs`:  the subtree by directory fds (non-UTF-8, past PATH_MAX)
//! - `flood.rs`:   a process in a cgroup opening a new UDP flow every millisecond
//! - `env.rs`:     the test environment: subtree, scratch dir, map against truth
//! - `daemon.rs`:  the daemon under test, as root or unprivileged; its log
//! - `sockets.rs`: socket addresses, transparent binds, original destinations
//! - `servers.rs`: the TPROXY listener, the remote server, the marked server
//! - `clients.rs`: clients that join a cgroup before they open their socket
//! - `traffic.rs`: where traffic from a cgroup arrived: proxied, direct, dropped
//! - `userns.rs`:  a user namespace of its own, for limits set low (inotify)
//! - `proxies.rs`: real proxies (v2ray, sing-box, mihomo) run from the README's recipes
//!
//! Each test binary uses only some of the harness. A test file declares it
//! `pub mod common;`: its public items are then the binary's own interface,
//! not dead code, with no `allow` (private items are still checked). A
//! public helper that no test file uses any more shows as the dead-code
//! warning that every binary gives when they declare it `mod common;`
//! (checked for this split across all thirteen: only `RawDump::numbers`,
//! deleted).

pub mod cgroups;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod env;
pub mod fdtree;
pub mod flood;
pub mod links;
pub mod monitor;
pub mod netns;
pub mod nft;
pub mod prereq;
pub mod process;
pub mod proxies;
pub mod ptrace;
pub mod routing;
pub mod servers;
pub mod sockets;
pub mod traffic;
pub mod userns;

// Re-exported flat: every helper is `common::name`, whatever file it is in;
// each test binary uses only some of them.
pub use {
    cgroups::*, clients::*, config::*, daemon::*, env::*, fdtree::*, flood::*, links::*,
    monitor::*, netns::*, nft::*, prereq::*, process::*, proxies::*, ptrace::*, routing::*,
    servers::*, sockets::*, traffic::*, userns::*,
};

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cgtproxy");

/// TPROXY port of the shipped ruleset.
pub const PROXY_PORT: u16 = 7893;
/// Firewall mark and route table of the shipped ruleset (and config default).
pub const ROUTE_MARK: u32 = 9011;
pub const ROUTE_TABLE: u32 = 9011;

/// The "remote" server, in a second namespace behind a veth pair.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const REMOTE_PORT: u16 = 9000;
/// The test namespace's end of the veth pair.
pub const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Bound on how long the map may take to converge after a change.
pub const CONVERGE: Duration = Duration::from_secs(5);
