//! The test's own cgroup subtree, by path.

use super::config::Rules;
use super::env::Env;
use super::nft::MapDump;
use super::process::{run_cmd, wait_until};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct CgroupTree {
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn new(mount: &Path, suffix: &str) -> CgroupTree {
        let root = mount.join(format!("cgtproxy-test-{suffix}"));
        fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        CgroupTree { root }
    }

    /// Directory of the cgroup with path `rel` ("/a/b" or "a/b").
    pub fn path(&self, rel: &str) -> PathBuf {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// `mkdir -p` of each path, with the real `mkdir` (one process, fast).
    /// The limit only guards against a hang: thousands of mkdirs wait for
    /// the kernel's cgroup lock, which another test building a deep chain
    /// can hold for seconds on a loaded machine.
    pub fn mkdir(&self, rels: &[&str]) {
        let mut cmd = Command::new("mkdir");
        cmd.arg("-p").arg("--");
        for r in rels {
            cmd.arg(self.path(r));
        }
        let f = run_cmd(&mut cmd, Duration::from_secs(120));
        assert!(f.status.success(), "mkdir -p {rels:?}: {}", f.describe());
    }

    /// Removes the cgroup `rel` and everything below it (must hold no
    /// processes).
    pub fn rmdir(&self, rel: &str) {
        let top = self.path(rel);
        let mut dirs = walk_dirs(&top);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            fs::remove_dir(&d).unwrap_or_else(|e| panic!("rmdir {}: {e}", d.display()));
        }
    }

    /// The cgroup id (the directory's inode number).
    pub fn id(&self, rel: &str) -> u64 {
        let p = self.path(rel);
        fs::metadata(&p)
            .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
            .ino()
    }

    /// Every cgroup below the root (not the root itself): (path, id), where
    /// path is "/" plus the path below the root.
    pub fn walk(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for d in walk_dirs(&self.root) {
            if d == self.root {
                continue;
            }
            let rel = d.strip_prefix(&self.root).unwrap();
            let Ok(md) = fs::metadata(&d) else { continue };
            out.push((format!("/{}", rel.to_string_lossy()), md.ino()));
        }
        out
    }

    /// What the map should hold for these rules: id → verdict.
    pub fn truth(&self, rules: &Rules) -> MapDump {
        self.walk()
            .into_iter()
            .filter_map(|(path, id)| rules.verdict(&path).map(|v| (id, v)))
            .collect()
    }

    fn names(&self) -> BTreeMap<u64, String> {
        self.walk().into_iter().map(|(p, id)| (id, p)).collect()
    }

    /// A readable diff between a dump and the truth.
    pub fn diff(&self, expected: &MapDump, actual: &MapDump) -> String {
        let names = self.names();
        let ids: BTreeSet<u64> = expected.keys().chain(actual.keys()).copied().collect();
        let mut s = String::new();
        for id in ids {
            let (e, a) = (expected.get(&id), actual.get(&id));
            if e != a {
                let _ = writeln!(
                    s,
                    "  id {id} {:?}: expected {:?}, map has {:?}",
                    names
                        .get(&id)
                        .map(String::as_str)
                        .unwrap_or("<not in subtree>"),
                    e,
                    a
                );
            }
        }
        s
    }

    /// Kills every process in the subtree and waits until it is empty.
    pub fn kill_all(&self) {
        let kill = self.root.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        } else {
            for d in walk_dirs(&self.root) {
                if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                        // SAFETY: plain kill(2) of a pid read from cgroupfs.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            fs::read_to_string(self.root.join("cgroup.events"))
                .map(|e| e.contains("populated 0"))
                .unwrap_or(true)
        });
    }
}

/// Directories at and below `top` (cgroupfs holds only cgroup dirs).
fn walk_dirs(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        out.push(d);
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        self.kill_all();
        let mut dirs = walk_dirs(&self.root);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let ok = wait_until(Duration::from_secs(3), Duration::from_millis(10), || {
                match fs::remove_dir(&d) {
                    Ok(()) => true,
                    Err(e) => e.kind() == io::ErrorKind::NotFound,
                }
            });
            if !ok {
                eprintln!("cleanup: could not rmdir {}", d.display());
            }
        }
    }
}

pub fn mkdir_all(env: &Env, rels: &[String]) {
    for chunk in rels.chunks(2000) {
        env.cg
            .mkdir(&chunk.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
