//! cgtproxy: keeps two nftables maps — cgroup v2 id → verdict number, and
//! number → verdict — in step with cgroupfs, so each application's traffic
//! is proxied, dropped or left alone.
//!
//! Modules, in the order data flows through them:
//! - `cli`: the command line (lexopt);
//! - `config`: the JSON configuration and its rules;
//! - `cgroup`, `watch`: the cgroup tree and its inotify watcher;
//! - `reconcile`: cgroups × rules against the kernel maps → element and
//!   verdict-number changes;
//! - `ruleset`, `nftables`: the live ruleset and the nf_tables wire format;
//! - `netlink`, `wire`: the netlink transport and framing;
//! - `route`: the policy routing of the proxy mark;
//! - `daemon`: the single-threaded loop that joins them;
//! - `inspect`: `check`, `status` and `explain` (read-only).

pub mod log;

pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod inspect;
pub mod netlink;
pub mod nftables;
pub mod reconcile;
pub mod route;
pub mod ruleset;
pub mod selector;
pub mod signals;
pub mod watch;
pub mod wire;
