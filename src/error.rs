//! One error type; the variant decides the exit status (contract §4):
//! 1 runtime failure, 2 usage or configuration error.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Bad command line.
    Usage(String),
    /// Bad configuration, or a ruleset that does not have what it names.
    Config(String),
    /// Anything that went wrong while running.
    Runtime(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Runtime(_) => 1,
            Error::Usage(_) | Error::Config(_) => 2,
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: &str) -> Error {
        match self {
            Error::Usage(m) => Error::Usage(format!("{what}: {m}")),
            Error::Config(m) => Error::Config(format!("{what}: {m}")),
            Error::Runtime(m) => Error::Runtime(format!("{what}: {m}")),
        }
    }
}

/// An I/O error as words: "No such file or directory", without Rust's
/// " (os error 2)" suffix, which means nothing to an operator.
pub fn io(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An errno as words, the way [`io`] says it.
pub fn errno_text(errno: i32) -> String {
    io(&std::io::Error::from_raw_os_error(errno))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Config(m) | Error::Runtime(m) => f.write_str(m),
        }
    }
}

impl From<lexopt::Error> for Error {
    fn from(e: lexopt::Error) -> Self {
        Error::Usage(e.to_string())
    }
}
