//! Lines for stdout, written so that a reader who went away is an error, not a panic.
//!
//! `println!` panics when stdout is a pipe whose reader has gone. Every line `tube` prints (the
//! contract lines of the servers, the answers of one-shot commands, received messages) goes
//! through [`say!`], which writes and flushes the line at once and reports a failure as a
//! [`StdoutError`]: one-shot commands and startup lines return it (the command fails with
//! `error: writing to stdout: ...`), lines printed while a server runs are logged and dropped.

use std::io::Write;

/// Stdout is gone (a closed pipe, a full disk).
#[derive(Debug)]
pub(crate) struct StdoutError(pub(crate) std::io::Error);

impl std::fmt::Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error: writing to stdout: {}", self.0)
    }
}

impl std::error::Error for StdoutError {}

/// Writes `args` and a newline to stdout and flushes.
pub(crate) fn line(args: std::fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(StdoutError)
}

/// `println!` that returns `Result<(), StdoutError>` instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stdout::line(format_args!($($arg)*))
    };
}
pub(crate) use say;
