//! Plain lines on stderr, which every supervisor captures (journald, svlogd,
//! s6-log). No timestamps: the supervisor adds its own.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

pub const QUIET: u8 = 0;
pub const INFO: u8 = 1;
pub const DEBUG: u8 = 2;

static LEVEL: AtomicU8 = AtomicU8::new(INFO);

pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    LEVEL.load(Ordering::Relaxed) >= level
}

/// Writes already-formatted lines in one `write()`, so a burst of element
/// changes costs one syscall and lines of concurrent writers never interleave.
pub fn write_lines(text: &str) {
    if !text.is_empty() {
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => {
        if $crate::log::enabled($crate::log::INFO) {
            $crate::log::write_lines(&format!("cgtproxy: {}\n", format_args!($($t)*)));
        }
    };
}

#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::log::enabled($crate::log::DEBUG) {
            $crate::log::write_lines(&format!("cgtproxy: {}\n", format_args!($($t)*)));
        }
    };
}

/// Warnings and errors print even with `-q`.
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => {
        $crate::log::write_lines(&format!("cgtproxy: {}\n", format_args!($($t)*)))
    };
}
