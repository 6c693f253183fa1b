//! The one error type every layer returns, netavark style: typed variants
//! for what code branches on, plain sentences for the rest, and a chain of
//! context ([`Error::context`], [`Context::context`] on a `Result`) added
//! where a path or an element is known. The variant at the root of the
//! chain decides the exit status (contract §4): 2 for a bad command line or
//! configuration, 1 for everything that went wrong while running; for a
//! refused transaction, [`Next`] says what the daemon does about it.
//!
//! Control flow matches variants (`errno()`, `next()`, `denied()`,
//! `Error::Interrupted`), never the words.

use std::fmt;
use std::io;

use crate::wire::ErrorMsg;

#[derive(Debug)]
pub enum Error {
    /// Bad command line (exit 2).
    Usage(String),
    /// Bad configuration, or a ruleset that does not have what it names
    /// (exit 2).
    Config(String),
    /// Anything else that went wrong while running, as a sentence.
    Runtime(String),
    /// An I/O failure; the context names the path.
    Io(io::Error),
    /// The kernel refused a netlink message: its errno, and where, if the
    /// extended ack said.
    Kernel(Box<ErrorMsg>),
    /// EPERM from nf_tables: always the missing capability.
    NoCapability,
    /// A netlink reply that does not parse: what was being read.
    Malformed(&'static str),
    /// A netlink attribute grew past the 16-bit length field (a bug,
    /// reported, not a panic): its length.
    TooLong(usize),
    /// A dump whose object changed while it was read (NLM_F_DUMP_INTR):
    /// asking again gives a consistent one.
    Interrupted,
    /// Replies or events were dropped (ENOBUFS): what happened is unknown.
    Lost,
    /// No answer in time: the outcome is unknown.
    Timeout,
    /// The kernel's NLMSG_OVERRUN, or a datagram sent only in part.
    Overrun,
    /// A transaction the kernel refused (or whose outcome is unknown), as
    /// `refusal` words it, and what the daemon does next.
    Refused(Next, String),
    /// What was being done (a path, an element, a step) when the inner
    /// error happened: said "what: inner".
    Context(Box<(String, Error)>),
}

/// What the daemon does about a failed transaction or sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The table or a map is gone: wait for the ruleset to come back.
    WaitForTable,
    /// The maps did not hold what we thought (EEXIST / ENOENT on an
    /// element), or the outcome is unknown: dump and reconcile.
    Resync,
    /// Anything else (a chain went missing, permissions …): log it and
    /// retry on the timer.
    Log,
}

impl Error {
    /// The error at the root of the context chain: the one that happened.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context(c) => c.1.root(),
            e => e,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self.root() {
            Error::Usage(_) | Error::Config(_) => 2,
            _ => 1,
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Error {
        Error::Context(Box::new((what.to_string(), self)))
    }

    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self.root() {
            Error::Kernel(e) => Some(e.errno),
            Error::NoCapability => Some(libc::EPERM),
            _ => None,
        }
    }

    /// Whether the kernel or the system refused for want of privilege
    /// (EPERM, EACCES): from nf_tables, that is CAP_NET_ADMIN.
    pub fn denied(&self) -> bool {
        let errno = match self.root() {
            Error::NoCapability => return true,
            Error::Kernel(e) => Some(e.errno),
            Error::Io(e) => e.raw_os_error(),
            _ => None,
        };
        matches!(errno, Some(libc::EPERM | libc::EACCES))
    }

    /// Whether a change sent may or may not have been applied.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self.root(), Error::Lost | Error::Timeout | Error::Overrun)
    }

    /// What the daemon does next: a refusal says; anything else is logged.
    pub fn next(&self) -> Next {
        match self.root() {
            Error::Refused(n, _) => *n,
            _ => Next::Log,
        }
    }
}

/// `.context(what)` on a `Result`, for any error that becomes an [`Error`].
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T, Error>;
}

impl<T, E: Into<Error>> Context<T> for Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|e| e.into().context(what))
    }
}

/// An I/O error as words: "No such file or directory", without Rust's
/// " (os error 2)" suffix, which means nothing to an operator.
pub fn io(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An errno as words, the way [`io`] says it.
pub fn errno_text(errno: i32) -> String {
    io(&io::Error::from_raw_os_error(errno))
}

/// "nf_tables: permission denied (…)": EPERM always means the capability.
pub const NO_CAP: &str = "nf_tables: permission denied (cgtproxy needs CAP_NET_ADMIN)";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Config(m) | Error::Runtime(m) | Error::Refused(_, m) => {
                f.write_str(m)
            }
            Error::Io(e) => f.write_str(&io(e)),
            Error::Kernel(e) => {
                f.write_str(&errno_text(e.errno))?;
                if let Some(m) = &e.ext_msg {
                    write!(f, " ({m})")?;
                }
                Ok(())
            }
            Error::NoCapability => f.write_str(NO_CAP),
            Error::Malformed(what) => write!(f, "malformed netlink reply: {what}"),
            Error::TooLong(n) => write!(f, "netlink attribute of {n} bytes exceeds 65535"),
            Error::Interrupted => f.write_str("interrupted dump"),
            Error::Lost => f.write_str("netlink messages were lost (ENOBUFS)"),
            Error::Timeout => f.write_str("no answer from the kernel"),
            Error::Overrun => f.write_str("netlink overrun"),
            Error::Context(c) => write!(f, "{}: {}", c.0, c.1),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<lexopt::Error> for Error {
    fn from(e: lexopt::Error) -> Self {
        Error::Usage(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain reads outermost first; the root decides the exit status,
    /// the errno and the next move, however deep it is wrapped.
    #[test]
    fn the_root_of_the_chain_decides() {
        let e = Error::Config("no such map".into())
            .context("config.json")
            .context("reload");
        assert_eq!(e.to_string(), "reload: config.json: no such map");
        assert_eq!(e.exit_code(), 2);
        let e: Result<(), Error> = Err(io::Error::from_raw_os_error(libc::ENOENT)).context("/x");
        let e = e.unwrap_err();
        assert_eq!(e.to_string(), "/x: No such file or directory");
        assert_eq!(e.exit_code(), 1);
        assert!(!e.denied());
        assert!(Error::from(io::Error::from_raw_os_error(libc::EACCES)).denied());
        let e = Error::Kernel(Box::new(ErrorMsg {
            errno: libc::EINVAL,
            seq: 1,
            ext_msg: Some("bad key".into()),
            offset: None,
        }))
        .context("dump of map cgroups");
        assert_eq!(
            e.to_string(),
            "dump of map cgroups: Invalid argument (bad key)"
        );
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert!(!e.outcome_unknown() && e.next() == Next::Log);
        let e = Error::Timeout.context("transaction");
        assert!(e.outcome_unknown());
        let e = Error::Refused(Next::WaitForTable, "gone".into()).context("sync");
        assert_eq!((e.next(), e.exit_code()), (Next::WaitForTable, 1));
        assert_eq!(Error::NoCapability.errno(), Some(libc::EPERM));
        assert!(Error::NoCapability.context("dump of map cgroups").denied());
    }
}
