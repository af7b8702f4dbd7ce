//! The crate's error type: one opaque [`Error`] with an [`ErrorKind`].

use std::fmt;
use std::io;

/// What went wrong while starting, signalling or reaping a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A system call failed; the source is the [`io::Error`].
    Io,
    /// A pool-ipc channel failed; the source is the `pool_ipc::Error`.
    Ipc,
    /// The started process never ran `procpool::init()`: its `main` does not call it first,
    /// or the test binary lacks `enable_test_support!()`. The child was killed and reaped.
    InitNotCalled,
    /// [`StartMethod::Fork`](crate::StartMethod::Fork) was refused because the process runs
    /// other threads. The message says why; the remedies are the caller's to name (a pool
    /// names its own option): [`StartMethod::Forkserver`](crate::StartMethod::Forkserver),
    /// or [`LaunchOptions::allow_fork_with_threads`](crate::LaunchOptions::allow_fork_with_threads).
    ForkUnsafe,
    /// The fork server died or stopped answering.
    ServerLost,
    /// The started process answered the start-up handshake with something unexpected.
    Handshake,
    /// A bounded wait ran out (a process that does not die even after `SIGKILL`).
    TimedOut,
    /// The worker has exited, but how is unknown: the kernel reaped it because this process
    /// ignores `SIGCHLD`, on a kernel too old (before 6.15) to keep the status for its
    /// pidfd.
    StatusLost,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "i/o error",
            ErrorKind::Ipc => "ipc error",
            ErrorKind::InitNotCalled => {
                "the started process did not run procpool's entry hook: call procpool::init() \
                 first in main, or enable_test_support!() in test binaries"
            }
            ErrorKind::ForkUnsafe => "refusing to fork",
            ErrorKind::ServerLost => "the fork server is gone",
            ErrorKind::Handshake => "unexpected start-up handshake from the started process",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::StatusLost => "exit status lost",
        }
    }
}

#[derive(Debug)]
enum Source {
    Io(io::Error),
    Ipc(pool_ipc::Error),
}

/// The error of every fallible pool-spawn operation.
///
/// Inspect it with [`Error::kind`]; the underlying system or channel error, if any, is its
/// [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    detail: Option<String>,
    source: Option<Source>,
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: Some(detail.into()),
            source: None,
        }
    }

    /// An i/o error with a short note of what was being done (the note is the detail; `e`,
    /// with its OS error code, the source).
    pub fn io(what: &str, e: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            detail: Some(what.to_owned()),
            source: Some(Source::Io(e)),
        }
    }

    /// The same error with another kind (keeps detail and source).
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            Some(Source::Io(e)) => Some(e),
            Some(Source::Ipc(e)) => Some(e),
            None => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            detail: None,
            source: Some(Source::Io(e)),
        }
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Self {
        Error::from(io::Error::from(e))
    }
}

impl From<pool_ipc::Error> for Error {
    fn from(e: pool_ipc::Error) -> Self {
        Error {
            kind: ErrorKind::Ipc,
            detail: None,
            source: Some(Source::Ipc(e)),
        }
    }
}

/// An error and its causes on one line, `error: cause: cause`, for the places that keep an
/// error as text (a task's message, a protocol failure). Shared with the crates above this
/// one (re-exported as `pool_spawn::Chain`); not part of the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Chain<'a>(
    /// The error whose chain is written.
    pub &'a (dyn std::error::Error + 'static),
);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
