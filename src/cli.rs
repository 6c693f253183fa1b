//! The command line: one `match` in one loop (lexopt), then the command.

use std::path::PathBuf;

use lexopt::prelude::*;

use crate::daemon::{self, Options};
use crate::error::Error;
use crate::inspect;

pub const USAGE: &str = "\
usage: cgtproxy [run] [-c FILE] [--cgroup-root DIR] [--once] [--dry-run]
                      [--ready-fd N] [-v|-q]
       cgtproxy check   [-c FILE] [--cgroup-root DIR] [--strict] [--config-only]
       cgtproxy status  [-c FILE] [--cgroup-root DIR] [--json]
       cgtproxy explain [-c FILE] [--cgroup-root DIR] PATH|PID...
       cgtproxy --help | --version

Keeps the nftables maps `cgroups` and `verdicts` (table inet cgtproxy, loaded
from cgtproxy.nft) in step with cgroupfs: each cgroup whose path matches a rule
gets that rule's verdict (goto proxy, goto direct, drop, goto CHAIN).

commands:
  run (default)        sync the maps in one transaction, then follow cgroupfs
  check                check the config, the live ruleset, the kernel and
                       known traps; print a checklist (exit 0 when all holds
                       or only warnings were printed, 1 when a check failed)
  status               each element of the map: verdict, packets, bytes, cgroup
  explain PATH|PID...  for a cgroup (path as rules see it, or its directory)
                       or a process: id, levels, the matching rule, and the
                       verdict the kernel holds for it now

options:
  -c, --config FILE    config file (default /etc/cgtproxy/config.json; when it
                       does not exist, a built-in default applies)
      --cgroup-root DIR
                       use DIR instead of the config's cgroup-root
      --once           (run) sync once and exit (elements and routes stay)
      --dry-run        (run) print the element changes a sync would make;
                       change nothing
      --ready-fd N     (run) write a newline to fd N once the initial sync
                       committed
      --json           (status) one JSON object instead of a table
      --strict         (check) warnings fail too (exit 1)
      --config-only    (check) only load and check the config: no kernel,
                       no cgroupfs (for package hooks and ExecStartPre)
  -v, --verbose        log more
  -q, --quiet          log only warnings and errors
  -h, --help           this text
  -V, --version        the version

signals: SIGHUP reloads the config; SIGTERM and SIGINT remove the daemon's
elements and routes (unless keep-on-exit) and exit 0.
exit status: 0 success, 1 runtime failure (check: a check failed, or with
--strict warned; explain: a cgroup or process not found), 2 usage or
configuration error.
See cgtproxy(8) and cgtproxy.json(5).
";

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run,
    Check,
    Status,
    Explain,
    Help,
    Version,
}

#[derive(Debug)]
struct Args {
    command: Command,
    opts: Options,
    verbosity: u8,
    /// `status --json`
    json: bool,
    /// `check --strict`, `check --config-only`
    check: inspect::CheckMode,
    /// `explain` operands: cgroup paths or PIDs.
    targets: Vec<std::ffi::OsString>,
}

fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Args, Error> {
    let mut p = lexopt::Parser::from_args(args);
    let mut command: Option<Command> = None;
    let mut opts = Options::default();
    let mut verbosity = crate::log::INFO;
    let mut restricted: Vec<&'static str> = Vec::new();
    let mut json = false;
    let mut check = inspect::CheckMode::default();
    let mut check_only: Vec<&'static str> = Vec::new();
    let mut targets = Vec::new();
    while let Some(arg) = p.next()? {
        match arg {
            Short('c') | Long("config") => opts.config = Some(PathBuf::from(p.value()?)),
            Long("cgroup-root") => {
                restricted.push("--cgroup-root");
                let d = PathBuf::from(p.value()?);
                if !d.is_absolute() {
                    return Err(Error::Usage(format!(
                        "--cgroup-root {}: must be an absolute path",
                        d.display()
                    )));
                }
                opts.cgroup_root = Some(d);
            }
            Long("once") => {
                restricted.push("--once");
                opts.once = true;
            }
            Long("dry-run") => {
                restricted.push("--dry-run");
                opts.dry_run = true;
            }
            Long("ready-fd") => {
                restricted.push("--ready-fd");
                let v = p.value()?;
                let n: i32 = v.parse().map_err(|_| {
                    Error::Usage(format!(
                        "--ready-fd {}: not a file descriptor number",
                        v.to_string_lossy()
                    ))
                })?;
                if n < 0 {
                    return Err(Error::Usage(format!(
                        "--ready-fd {n}: not a file descriptor number"
                    )));
                }
                opts.ready_fd = Some(n);
            }
            Long("json") => json = true,
            Long("strict") => {
                check_only.push("--strict");
                check.strict = true;
            }
            Long("config-only") => {
                check_only.push("--config-only");
                check.config_only = true;
            }
            Short('v') | Long("verbose") => verbosity = crate::log::DEBUG,
            Short('q') | Long("quiet") => verbosity = crate::log::QUIET,
            Short('h') | Long("help") => command = Some(Command::Help),
            Short('V') | Long("version") => command = Some(Command::Version),
            Value(v) if command.is_none() => {
                command = Some(match v.to_str() {
                    Some("run") => Command::Run,
                    Some("check") => Command::Check,
                    Some("status") => Command::Status,
                    Some("explain") => Command::Explain,
                    _ => {
                        return Err(Error::Usage(format!(
                            "unknown command {:?} (try --help)",
                            v.to_string_lossy()
                        )));
                    }
                });
            }
            Value(v) if command == Some(Command::Explain) => targets.push(v),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let command = command.unwrap_or(Command::Run);
    if matches!(command, Command::Check | Command::Status | Command::Explain)
        && let Some(o) = restricted.iter().find(|o| **o != "--cgroup-root")
    {
        return Err(Error::Usage(format!("{o} only applies to `run`")));
    }
    if let Some(o) = check_only.first()
        && !matches!(command, Command::Check | Command::Help | Command::Version)
    {
        return Err(Error::Usage(format!("{o} only applies to `check`")));
    }
    if json && !matches!(command, Command::Status | Command::Help | Command::Version) {
        return Err(Error::Usage("--json only applies to `status`".into()));
    }
    if command == Command::Explain && targets.is_empty() {
        return Err(Error::Usage(
            "explain needs a cgroup PATH or a PID (try --help)".into(),
        ));
    }
    Ok(Args {
        command,
        opts,
        verbosity,
        json,
        check,
        targets,
    })
}

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "cgtproxy: {e}\n{}",
                USAGE.lines().take(2).collect::<Vec<_>>().join("\n")
            );
            return e.exit_code();
        }
    };
    crate::log::set_level(args.verbosity);
    let result = match args.command {
        Command::Help => {
            print!("{USAGE}");
            Ok(0)
        }
        Command::Version => {
            println!("cgtproxy {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::Run => daemon::run(args.opts).map(|()| 0),
        Command::Check => inspect::check(&args.opts, args.check),
        Command::Status => inspect::status(&args.opts, args.json),
        Command::Explain => inspect::explain(&args.opts, &args.targets),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            crate::warn!("{e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, Error> {
        parse(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn options_anywhere_and_long_forms() {
        let a = p(&[
            "-q",
            "run",
            "--config",
            "x.json",
            "--once",
            "--ready-fd",
            "3",
        ])
        .unwrap();
        assert_eq!(a.command, Command::Run);
        assert_eq!(a.opts.config, Some(PathBuf::from("x.json")));
        assert!(a.opts.once);
        assert_eq!(a.opts.ready_fd, Some(3));
        assert_eq!(a.verbosity, crate::log::QUIET);
        let a = p(&["check", "-c", "y"]).unwrap();
        assert_eq!(a.command, Command::Check);
        assert_eq!(a.check, inspect::CheckMode::default());
        let a = p(&["--strict", "check", "--config-only"]).unwrap();
        assert!(a.check.strict && a.check.config_only);
        assert_eq!(p(&[]).unwrap().command, Command::Run);
        assert_eq!(p(&["-V"]).unwrap().command, Command::Version);
        let a = p(&["status", "--json", "--cgroup-root", "/x"]).unwrap();
        assert_eq!((a.command, a.json), (Command::Status, true));
        let a = p(&["explain", "/a", "-c", "f", "1234", "--", "-odd"]).unwrap();
        assert_eq!(a.command, Command::Explain);
        assert_eq!(a.targets, ["/a", "1234", "-odd"]);
        assert_eq!(a.opts.config, Some(PathBuf::from("f")));
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(p(&["frobnicate"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["--ready-fd", "x"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["--cgroup-root", "rel"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["check", "--once"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["--bogus"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["run", "extra"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["check", "extra"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["status", "--dry-run"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["run", "--json"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["explain"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["run", "--strict"]), Err(Error::Usage(_))));
        assert!(matches!(
            p(&["status", "--config-only"]),
            Err(Error::Usage(_))
        ));
    }
}
