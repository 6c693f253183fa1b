//! The test environment: the cgroup subtree, a scratch directory, and the
//! map compared with the truth.

use super::cgroups::CgroupTree;
use super::config::{Config, Rules};
use super::daemon::{Daemon, run_daemon_to_exit};
use super::nft::{MapDump, dump_map, nft_add_elements};
use super::process::{Finished, random_hex, run_cmd, wait_until};
use super::{BIN, CONVERGE};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct Env {
    pub name: String,
    /// The cgroup2 mount.
    pub mount: PathBuf,
    pub cg: CgroupTree,
    /// Scratch directory for config files.
    pub tmp: PathBuf,
    counter: AtomicU64,
}

impl Env {
    pub(super) fn new(name: &str, mount: &Path) -> Env {
        let suffix = random_hex();
        let tmp = std::env::temp_dir().join(format!("cgtproxy-test-{suffix}"));
        fs::create_dir_all(&tmp).unwrap();
        Env {
            name: name.to_string(),
            mount: mount.to_path_buf(),
            cg: CgroupTree::new(mount, &suffix),
            tmp,
            counter: AtomicU64::new(0),
        }
    }

    /// A fresh, unique token (for message payloads and file names).
    pub fn token(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{what}-{n}", self.name)
    }

    /// Writes `text` to a file `name` in the scratch dir.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.tmp.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    pub fn write_config(&self, cfg: &Config) -> PathBuf {
        let name = format!(
            "config-{}.json",
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        self.write_file(&name, &cfg.to_json())
    }

    /// `run -c CONFIG --cgroup-root ROOT`.
    pub fn run_args(&self, config: &Path) -> Vec<OsString> {
        vec![
            "run".into(),
            "-c".into(),
            config.into(),
            "--cgroup-root".into(),
            self.cg.root.clone().into(),
        ]
    }

    /// `cgtproxy ARGS -c CONFIG --cgroup-root ROOT` (options after the
    /// operands, as the contract allows), killed past `limit`.
    pub fn cli(&self, config: &Path, args: &[&str], limit: Duration) -> Finished {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("-c")
            .arg(config)
            .arg("--cgroup-root")
            .arg(&self.cg.root);
        run_cmd(&mut cmd, limit)
    }

    /// Adds elements with the real `nft`, each a cgroup below the subtree
    /// ("/p") and its verdict ("goto proxy"): a map as the daemon would fill it.
    pub fn fill(&self, elems: &[(&str, &str)]) {
        let paths: Vec<(PathBuf, &str)> =
            elems.iter().map(|(c, v)| (self.cg.path(c), *v)).collect();
        let refs: Vec<(&Path, &str)> = paths.iter().map(|(p, v)| (p.as_path(), *v)).collect();
        nft_add_elements(&self.mount, &refs);
    }

    /// Starts the daemon with `cfg` and waits for readiness.
    pub fn start(&self, cfg: &Config) -> Daemon {
        let path = self.write_config(cfg);
        let mut args = self.run_args(&path);
        args.push("-v".into());
        Daemon::start(&args)
    }

    /// Runs the daemon with `cfg` and `--once`; asserts exit 0.
    pub fn once(&self, cfg: &Config) -> Finished {
        let path = self.write_config(cfg);
        let mut args = self.run_args(&path);
        args.push("--once".into());
        let f = run_daemon_to_exit(&args, Duration::from_secs(20));
        assert_eq!(f.code(), Some(0), "cgtproxy {args:?}: {}", f.describe());
        f
    }

    /// Waits until the map equals the truth for `rules`; panics with a diff.
    pub fn wait_map(&self, rules: &Rules) -> MapDump {
        self.wait_map_eq(|| self.cg.truth(rules), "truth")
    }

    /// Waits until the map equals `expected()` (re-evaluated each poll).
    pub fn wait_map_eq(&self, expected: impl Fn() -> MapDump, what: &str) -> MapDump {
        let mut last = (MapDump::new(), MapDump::new());
        let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
            let e = expected();
            let a = dump_map();
            let same = e == a;
            last = (e, a);
            same
        });
        if !ok {
            panic!(
                "map did not converge to the {what} within {CONVERGE:?}; differences:\n{}",
                self.cg.diff(&last.0, &last.1)
            );
        }
        last.1
    }

    /// Asserts right now that the map equals the truth for `rules`.
    pub fn assert_map(&self, rules: &Rules) {
        let (e, a) = (self.cg.truth(rules), dump_map());
        assert!(
            e == a,
            "map differs from the truth:\n{}",
            self.cg.diff(&e, &a)
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}
