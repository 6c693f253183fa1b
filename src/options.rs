//! What every command takes from the command line, and the config it names:
//! shared by `run`, `down` and the read-only commands in `inspect`, so that
//! none of them depends on another.

use std::path::PathBuf;

use crate::cgroup;
use crate::config::{CgroupRoot, Config};
use crate::error::Error;

#[derive(Debug, Default, Clone)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub once: bool,
    pub dry_run: bool,
    pub ready_fd: Option<i32>,
}

/// Loads the config, with `--cgroup-root` taking precedence over the file.
pub fn load(opts: &Options) -> Result<(Config, PathBuf), Error> {
    let mut cfg = Config::load(opts.config.as_deref())?;
    if let Some(d) = &opts.cgroup_root {
        cfg.cgroup_root = CgroupRoot::Dir(d.clone());
    }
    let root = cgroup::resolve_root(&cfg.cgroup_root)?;
    Ok((cfg, root))
}
