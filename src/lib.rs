//! cgtproxy: keeps two nftables maps — cgroup v2 id → verdict number, and
//! number → verdict — in step with cgroupfs, so each application's traffic
//! is proxied, dropped or left alone.
//!
//! Modules, in the order data flows through them (a cgroup event becomes
//! a netlink batch top to bottom; a kernel refusal comes back up through
//! `refusal`):
//! - `cli`, `config`: the command line (lexopt) and the JSON configuration
//!   and its rules (`selector`: the rule forms as regexes);
//! - `cgroup`, `watch`: the cgroup tree and its inotify watcher (→ `Change`s);
//! - `reconcile`: cgroups × rules against what the maps hold → `Ops`, and
//!   with the caller's number table → a `Plan` (every element change and
//!   verdict number decided);
//! - `ruleset`: the session with the live ruleset: checks it, dumps it,
//!   commits a `Plan` as one transaction;
//! - `refusal`: a kernel refusal → a sentence and the daemon's next move;
//! - `nftables`: the nf_tables codec (batches, dumps, rules, `nft_data`);
//! - `netlink`: the transport (`Transport`: the kernel's socket or a fake)
//!   and the conversation over it (`Conn`: sequence numbers, acks, dumps);
//! - `wire`: netlink framing (headers, attributes);
//! - `route`: the policy routing of the proxy mark (rtnetlink), and its
//!   watch;
//! - `options`, `instance`: what every command takes, and the claim that
//!   keeps one daemon per table and map; `query`: on the claim's socket,
//!   which element decides a cgroup (what `exec` waits for);
//! - `daemon`: the single-threaded loop that joins them; `down`: turning
//!   cgtproxy off;
//! - `inspect`: `check`, `status` and `explain` (read-only);
//! - `error`: the one `Error` every layer returns (typed variants for what
//!   code branches on, a context chain, the daemon's `Next` move).

pub mod log;

// Input: the command line, the configuration, the cgroup tree.
pub mod cli;
pub mod config;
pub mod selector;

pub mod cgroup;
pub mod watch;

// Decision: what the maps must hold.
pub mod reconcile;

// The kernel side, from the session down to the bytes.
pub mod ruleset;

pub mod refusal;

pub mod nftables;

pub mod netlink;

pub mod wire;

pub mod route;

// The loop, and the read-only commands.
pub mod daemon;
pub mod down;
pub mod instance;
pub mod options;
pub mod query;
pub mod signals;

pub mod error;
pub mod exec;
pub mod inspect;
