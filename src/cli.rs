//! The command line: one `match` in one loop (lexopt), then the command.

use std::path::PathBuf;

use lexopt::prelude::*;

use crate::daemon;
use crate::error::Error;
use crate::inspect;
use crate::options::Options;

pub const USAGE: &str = "\
usage: cgtproxy [run] [-c FILE] [--cgroup-root DIR] [--once] [--dry-run]
                      [--ready-fd N] [-v|-q]
       cgtproxy check   [-c FILE] [--cgroup-root DIR] [--strict] [--config-only]
       cgtproxy status  [-c FILE] [--cgroup-root DIR] [-j|--json]
       cgtproxy apps    [-c FILE] [--cgroup-root DIR] [-j|--json] [--watch]
       cgtproxy explain [-c FILE] [--cgroup-root DIR] PATH|PID|APP|UNIT...
       cgtproxy exec    [-c FILE] [--cgroup-root DIR] [--verdict V] -- CMD...
       cgtproxy down    [-c FILE]
       cgtproxy help [COMMAND] | --help | --version

Keeps the nftables maps `cgroups` and `verdicts` (table inet cgtproxy, loaded
from cgtproxy.nft) in step with cgroupfs: each cgroup whose path matches a rule
gets that rule's verdict (goto proxy, goto direct, drop, goto CHAIN).

commands:
  run (default)        sync the maps in one transaction, then follow cgroupfs
  check                check the config, the live ruleset, the kernel and
                       known traps; print a checklist (exit 0 when all holds
                       or only warnings were printed, 1 when a check failed)
  status               each element of the map: verdict, packets, bytes, cgroup
  apps                 every app, service and container with processes: its
                       name, a process, the verdict the kernel applies, what
                       decides it, the element's packets and bytes
  explain PATH|PID|APP|UNIT...
                       for a cgroup (path as rules see it, or its directory),
                       a process, an app ID or a unit name: id, levels, the
                       matching rule, and the verdict the kernel holds now
  exec -- CMD...       run CMD under a verdict (default proxy), in a fresh
                       cgroup the embedded default rules list
  down                 turn cgtproxy off: empty both maps and remove the
                       policy routing (refused while a daemon runs)
  help [COMMAND]       this text, or one command's

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
  -j, --json           (status, apps) one JSON object instead of a table
      --watch          (apps) refresh every second, with rates, until
                       SIGINT or SIGTERM
      --verdict V      (exec) proxy (default), direct, drop or a chain name
      --strict         (check) warnings fail too (exit 1)
      --config-only    (check) only load and check the config: no kernel,
                       no cgroupfs (for package hooks and ExecStartPre)
  -v, --verbose        log more
  -q, --quiet          log only warnings and errors
  -h, --help           this text
  -V, --version        the version

One daemon per table and map: a second `run` (or `--once`, or `down`) says
\"already running (pid N)\" and exits 1, touching nothing.
signals: SIGHUP reloads the config; SIGTERM and SIGINT exit 0 and change no
verdict: elements and routes stay (a restart opens no window; `down` is the
way off). While running, policy routing someone removes is put back.
exit status: 0 success, 1 runtime failure (check: a check failed, or with
--strict warned; explain: a cgroup or process not found), 2 usage or
configuration error; exec: the command's own status (127: not found, 126:
not executable).
See cgtproxy(8) and cgtproxy.json(5).
";

/// One command's help: `cgtproxy help COMMAND`, `cgtproxy COMMAND --help`.
fn command_help(c: &Command) -> &'static str {
    match c {
        Command::Run => {
            "\
usage: cgtproxy [run] [-c FILE] [--cgroup-root DIR] [--once] [--dry-run]
                      [--ready-fd N] [-v|-q]

Syncs the maps in one transaction, then follows cgroupfs until SIGTERM or
SIGINT, which change no verdict (elements and routes stay); SIGHUP reloads
the config. Keeps the policy routing in place (puts back what someone
removes). A second run for the same table and map exits 1: \"already
running (pid N)\".
  --once         sync once and exit (elements and routes stay)
  --dry-run      print the element changes a sync would make; change nothing
  --ready-fd N   write a newline to fd N once the initial sync committed
  -v             log every cgroup event, listed or not
See cgtproxy(8).
"
        }
        Command::Check => {
            "\
usage: cgtproxy check [-c FILE] [--cgroup-root DIR] [--strict] [--config-only]

Checks the config, the live ruleset, the kernel and known traps, and prints
a checklist, with how many live cgroups each rule decides.
  --strict       warnings fail too
  --config-only  only load and check the config: no kernel, no cgroupfs
Exit status: 0 all well or only warnings, 1 a check failed (or, with
--strict, warned), 2 a bad config.
"
        }
        Command::Status => {
            "\
usage: cgtproxy status [-c FILE] [--cgroup-root DIR] [-j|--json]

Each element of the map: verdict, packets, bytes, cgroup.
"
        }
        Command::Apps => {
            "\
usage: cgtproxy apps [-c FILE] [--cgroup-root DIR] [-j|--json] [--watch]

Every app instance, service and container that has processes now: its name
(what an \"app\", \"unit\" or \"container\" rule takes), a process, the
verdict the kernel applies (its own element, or an ancestor's), the rule
or ancestor that decides it, and that element's packets and bytes.
  -j, --json   one JSON object instead of a table
  --watch      refresh every second with rates (per second), until SIGINT
               or SIGTERM; redraws in place on a terminal
"
        }
        Command::Explain => {
            "\
usage: cgtproxy explain [-c FILE] [--cgroup-root DIR] PATH|PID|APP|UNIT...

For each cgroup path (as rules see it, or its directory), process ID, app
ID (org.telegram.desktop) or unit name (mihomo.service, foo@.service): its
id and level, the rule that matches, every lookup the ruleset makes, and
the verdict the kernel holds for it now. An app or unit names every
cgroup of it that exists.
Exit status: 1 when one was not found.
"
        }
        Command::Exec => {
            "\
usage: cgtproxy exec [-c FILE] [--cgroup-root DIR] [--verdict V] -- CMD...

Runs CMD under verdict V (proxy by default; direct, drop, or the name of a
chain), moving no other process. Under a systemd user session it runs
  systemd-run --user --scope --slice=cgtproxy-V.slice -- CMD
(systemd creates the scope; the daemon's embedded default rules list the
slice). Without one it creates a fresh cgroup cgtproxy-V.slice/exec-PID
where the caller may (a delegated subtree it owns, or anywhere as root)
and moves itself in. Either way it waits (5 s at most) until the element
that decides its cgroup has the verdict, then executes CMD, so the verdict
applies from the first socket. With CAP_NET_ADMIN it reads the map; without,
it asks the daemon on @cgtproxy/TABLE/MAP and believes only root or a
process with CAP_NET_ADMIN (cgtproxy(8), QUERY PROTOCOL). No fixed delay.
CGTPROXY_EXEC=cgroupfs skips systemd; CGTPROXY_EXEC=systemd requires it.
Exit status: CMD's; 1 when it cannot (no delegation, no daemon, no element
or another verdict, maps not in step, an answer from a squatter), 2 for a
bad verdict or command line.
"
        }
        Command::Down => {
            "\
usage: cgtproxy down [-c FILE]

Turns cgtproxy off: empties both maps and removes the policy rule and route
the config names (IPv4 and IPv6). Stopping the daemon changes nothing, so
this is the way off (or unloading the table). Refused while a daemon runs
for the same table and map: \"already running (pid N) ...: stop it first\".
Exit status: 0 done, 1 refused or failed, 2 a bad config.
"
        }
        Command::Help | Command::Version => USAGE,
    }
}

#[derive(Debug, PartialEq, Eq, Clone)]
enum Command {
    Run,
    Check,
    Status,
    Apps,
    Explain,
    Exec,
    Down,
    Help,
    Version,
}

fn command_named(name: &str) -> Option<Command> {
    Some(match name {
        "run" => Command::Run,
        "check" => Command::Check,
        "status" => Command::Status,
        "apps" => Command::Apps,
        "explain" => Command::Explain,
        "exec" => Command::Exec,
        "down" => Command::Down,
        "help" => Command::Help,
        _ => return None,
    })
}

#[derive(Debug)]
struct Args {
    command: Command,
    opts: Options,
    verbosity: u8,
    /// `status --json`, `apps --json`
    json: bool,
    /// `check --strict`, `check --config-only`
    check: inspect::CheckMode,
    /// `apps --watch`
    watch: bool,
    /// `exec --verdict`
    verdict: Option<String>,
    /// `explain` operands (cgroup paths, PIDs, app IDs, unit names), the
    /// `exec` command line, or the command `help` is asked about.
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
    let mut watch = false;
    let mut verdict = None;
    let mut help = false;
    let mut version = false;
    let mut targets = Vec::new();
    while let Some(arg) = p.next()? {
        if let Some(o) = Shared::of(&arg) {
            o.take(&mut p, &mut opts, &mut verdict, &mut help)?;
            continue;
        }
        match arg {
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
            Short('j') | Long("json") => json = true,
            Long("watch") => watch = true,
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
            Short('V') | Long("version") => version = true,
            Value(v) if command.is_none() => {
                command = Some(v.to_str().and_then(command_named).ok_or_else(|| {
                    Error::Usage(format!(
                        "unknown command {:?} (try --help)",
                        v.to_string_lossy()
                    ))
                })?);
                if command == Some(Command::Exec) {
                    // Everything after `exec`'s own options is the command:
                    // `exec -- CMD ARGS...` (or `exec CMD ARGS...`).
                    exec_args(&mut p, &mut opts, &mut verdict, &mut help, &mut targets)?;
                }
            }
            Value(v) if command == Some(Command::Explain) => targets.push(v),
            Value(v) if command == Some(Command::Help) && targets.is_empty() => targets.push(v),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if version && command.is_none() && !help {
        command = Some(Command::Version);
    }
    if help {
        // `COMMAND --help` is that command's help; `--help` alone the whole.
        targets = match &command {
            None | Some(Command::Help | Command::Version) => Vec::new(),
            Some(c) => vec![format!("{c:?}").to_lowercase().into()],
        };
        command = Some(Command::Help);
    }
    let args = Args {
        command: command.unwrap_or(Command::Run),
        opts,
        verbosity,
        json,
        check,
        watch,
        verdict,
        targets,
    };
    if args.command == Command::Help {
        if let Some(t) = args.targets.first()
            && t.to_str().and_then(command_named).is_none()
        {
            return Err(Error::Usage(format!(
                "help: unknown command {:?} (commands: run, check, status, apps, explain, exec, down, help)",
                t.to_string_lossy()
            )));
        }
    } else {
        applies(&args, &restricted, &check_only)?;
    }
    Ok(args)
}

/// Every option given applies to the command, and it has the operands it
/// needs (all but `help`, which takes any option). `restricted` are the
/// `run`-only options given, `check_only` the `check`-only ones.
fn applies(a: &Args, restricted: &[&str], check_only: &[&str]) -> Result<(), Error> {
    let command = &a.command;
    if *command != Command::Run
        && let Some(o) = restricted.first()
    {
        return Err(Error::Usage(format!("{o} only applies to `run`")));
    }
    if let Some(o) = check_only.first()
        && !matches!(command, Command::Check | Command::Version)
    {
        return Err(Error::Usage(format!("{o} only applies to `check`")));
    }
    if a.json && !matches!(command, Command::Status | Command::Apps | Command::Version) {
        return Err(Error::Usage(
            "--json only applies to `status` and `apps`".into(),
        ));
    }
    if a.watch && *command != Command::Apps {
        return Err(Error::Usage("--watch only applies to `apps`".into()));
    }
    if *command == Command::Down && a.opts.cgroup_root.is_some() {
        return Err(Error::Usage(
            "--cgroup-root does not apply to `down`".into(),
        ));
    }
    if a.verdict.is_some() && *command != Command::Exec {
        return Err(Error::Usage("--verdict only applies to `exec`".into()));
    }
    if *command == Command::Explain && a.targets.is_empty() {
        return Err(Error::Usage(
            "explain needs a cgroup PATH, a PID, an app ID or a unit name (try --help)".into(),
        ));
    }
    if *command == Command::Exec && a.targets.is_empty() {
        return Err(Error::Usage(
            "exec needs a command: cgtproxy exec [--verdict V] -- CMD... (try exec --help)".into(),
        ));
    }
    Ok(())
}

/// The options `exec`'s own loop shares with the main one, parsed here
/// once. `Shared::of` only looks at the option (it holds nothing of the
/// parser's), so `take` can then borrow the parser for the value.
#[derive(Clone, Copy)]
enum Shared {
    Config,
    CgroupRoot,
    Verdict,
    Help,
}

impl Shared {
    fn of(arg: &lexopt::Arg<'_>) -> Option<Shared> {
        Some(match arg {
            Short('c') | Long("config") => Shared::Config,
            Long("cgroup-root") => Shared::CgroupRoot,
            Long("verdict") => Shared::Verdict,
            Short('h') | Long("help") => Shared::Help,
            _ => return None,
        })
    }

    /// Reads the option's value (if it takes one) into where it belongs.
    fn take(
        self,
        p: &mut lexopt::Parser,
        opts: &mut Options,
        verdict: &mut Option<String>,
        help: &mut bool,
    ) -> Result<(), Error> {
        match self {
            Shared::Config => opts.config = Some(PathBuf::from(p.value()?)),
            Shared::CgroupRoot => {
                let d = PathBuf::from(p.value()?);
                if !d.is_absolute() {
                    return Err(Error::Usage(format!(
                        "--cgroup-root {}: must be an absolute path",
                        d.display()
                    )));
                }
                opts.cgroup_root = Some(d);
            }
            Shared::Verdict => {
                let v = p.value()?;
                *verdict = Some(v.into_string().map_err(|v| {
                    Error::Usage(format!("--verdict {}: not a verdict", v.to_string_lossy()))
                })?);
            }
            Shared::Help => *help = true,
        }
        Ok(())
    }
}

/// `exec`'s own options, then the command line (raw, never parsed as ours).
fn exec_args(
    p: &mut lexopt::Parser,
    opts: &mut Options,
    verdict: &mut Option<String>,
    help: &mut bool,
    targets: &mut Vec<std::ffi::OsString>,
) -> Result<(), Error> {
    loop {
        // The first word that is not one of exec's options starts CMD.
        if let Some(first) = p
            .try_raw_args()
            .and_then(|r| r.peek().map(|a| a.to_owned()))
            && !first.to_string_lossy().starts_with('-')
        {
            targets.extend(p.raw_args()?);
            return Ok(());
        }
        let Some(arg) = p.next()? else { return Ok(()) };
        if let Some(o) = Shared::of(&arg) {
            o.take(p, opts, verdict, help)?;
            continue;
        }
        match arg {
            Value(v) => {
                // After `--`: the command and its arguments, whatever they are.
                targets.push(v);
                targets.extend(p.raw_args()?);
                return Ok(());
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
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
            match args
                .targets
                .first()
                .and_then(|t| t.to_str())
                .and_then(command_named)
            {
                Some(c) => print!("{}", command_help(&c)),
                None => print!("{USAGE}"),
            }
            Ok(0)
        }
        Command::Version => {
            println!("cgtproxy {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::Run => daemon::run(args.opts).map(|()| 0),
        Command::Check => inspect::check(&args.opts, args.check),
        Command::Status => inspect::status(&args.opts, args.json),
        Command::Apps => inspect::apps(&args.opts, args.json, args.watch),
        Command::Explain => inspect::explain(&args.opts, &args.targets),
        Command::Exec => crate::exec::exec(&args.opts, args.verdict.as_deref(), &args.targets),
        Command::Down => crate::down::down(&args.opts),
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
        assert!(matches!(p(&["status", "--watch"]), Err(Error::Usage(_))));
        assert!(matches!(
            p(&["apps", "--verdict", "x"]),
            Err(Error::Usage(_))
        ));
        assert!(matches!(p(&["exec"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["exec", "--bogus", "x"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["help", "frob"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["down", "--once"]), Err(Error::Usage(_))));
        assert!(matches!(p(&["down", "x"]), Err(Error::Usage(_))));
        assert!(matches!(
            p(&["down", "--cgroup-root", "/x"]),
            Err(Error::Usage(_))
        ));
        assert_eq!(p(&["down", "-c", "f"]).unwrap().command, Command::Down);
    }

    #[test]
    fn help_per_command_and_exec_lines() {
        let h = |args: &[&str]| {
            let a = p(args).unwrap();
            assert_eq!(a.command, Command::Help, "{args:?}");
            a.targets.first().map(|t| t.to_string_lossy().into_owned())
        };
        assert_eq!(h(&["--help"]), None);
        assert_eq!(h(&["help"]), None);
        assert_eq!(h(&["help", "apps"]), Some("apps".into()));
        assert_eq!(h(&["apps", "--help"]), Some("apps".into()));
        assert_eq!(h(&["-h", "explain"]), Some("explain".into()));
        assert_eq!(h(&["run", "-h"]), Some("run".into()));
        assert_eq!(h(&["exec", "--help"]), Some("exec".into()));
        assert!(command_help(&Command::Apps).starts_with("usage: cgtproxy apps"));
        assert!(command_help(&Command::Exec).starts_with("usage: cgtproxy exec"));
        let a = p(&["apps", "-j", "--watch"]).unwrap();
        assert_eq!((a.command, a.json, a.watch), (Command::Apps, true, true));
        // exec: its own options, then the command line untouched
        let a = p(&["exec", "--verdict", "drop", "--", "sh", "-c", "x", "--help"]).unwrap();
        assert_eq!(a.command, Command::Exec);
        assert_eq!(a.verdict.as_deref(), Some("drop"));
        assert_eq!(a.targets, ["sh", "-c", "x", "--help"]);
        let a = p(&["exec", "curl", "-v", "-c", "jar"]).unwrap();
        assert_eq!(a.targets, ["curl", "-v", "-c", "jar"]);
        assert_eq!(a.opts.config, None);
        let a = p(&["exec", "-c", "f.json", "--", "-dash"]).unwrap();
        assert_eq!(a.targets, ["-dash"]);
        assert_eq!(a.opts.config, Some(PathBuf::from("f.json")));
        // exec's loop takes the shared options as the main one does.
        let a = p(&["exec", "--cgroup-root", "/r", "-h"]).unwrap();
        assert_eq!(a.command, Command::Help);
        let a = p(&["--verdict", "direct", "exec", "--cgroup-root", "/r", "x"]).unwrap();
        assert_eq!(a.opts.cgroup_root, Some(PathBuf::from("/r")));
        assert_eq!(a.verdict.as_deref(), Some("direct"));
        let e = p(&["exec", "--cgroup-root", "rel", "x"]).unwrap_err();
        assert_eq!(e.to_string(), "--cgroup-root rel: must be an absolute path");
        let e = p(&["status", "--cgroup-root", "rel"]).unwrap_err();
        assert_eq!(e.to_string(), "--cgroup-root rel: must be an absolute path");
    }
}
