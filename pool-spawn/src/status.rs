//! How a worker process ended: [`ExitStatus`], decoded from `waitid`.

use std::fmt;

use rustix::process::Signal;
use serde::{Deserialize, Serialize};

/// How a process ended: an exit code, or the signal that killed it.
///
/// # Examples
///
/// ```
/// use pool_spawn::ExitStatus;
///
/// let s = ExitStatus::from_signal(9, false);
/// assert_eq!(s.signal(), Some(9));
/// assert_eq!(s.signal_name(), Some("SIGKILL"));
/// assert_eq!(s.to_string(), "signal 9 (SIGKILL)");
/// assert_eq!(ExitStatus::from_code(3).to_string(), "exit code 3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitStatus {
    repr: Repr,
    /// The signal that ended the process had been sent through its [`Worker`] handle.
    ///
    /// [`Worker`]: crate::Worker
    #[serde(skip)]
    sent_by_pool: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum Repr {
    Code(i32),
    Signal { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// A process that exited with `code` (from `exit(code)` or returning from `main`).
    pub fn from_code(code: i32) -> Self {
        ExitStatus {
            repr: Repr::Code(code),
            sent_by_pool: false,
        }
    }

    /// A process killed by signal number `signal`.
    pub fn from_signal(signal: i32, core_dumped: bool) -> Self {
        ExitStatus {
            repr: Repr::Signal {
                signal,
                core_dumped,
            },
            sent_by_pool: false,
        }
    }

    /// Whether the signal that ended the process is one its [`Worker`] handle had sent
    /// ([`signal`], [`signal_group`], [`terminate`], or dropping the handle): the pool
    /// ended it, not the out-of-memory killer or an operator. Always `false` for an exit
    /// code.
    ///
    /// [`Worker`]: crate::Worker
    /// [`signal`]: crate::Worker::signal
    /// [`signal_group`]: crate::Worker::signal_group
    /// [`terminate`]: crate::Worker::terminate
    pub fn sent_by_pool(&self) -> bool {
        self.sent_by_pool
    }

    /// This status, marked as ended by a signal the worker's handle sent.
    pub(crate) fn with_sent_by_pool(mut self) -> Self {
        self.sent_by_pool = self.signal().is_some();
        self
    }

    /// Decodes a `waitid` result; `None` if it does not describe a terminated process.
    pub(crate) fn from_waitid(s: &rustix::process::WaitIdStatus) -> Option<Self> {
        if let Some(code) = s.exit_status() {
            return Some(Self::from_code(code));
        }
        s.terminating_signal()
            .map(|sig| Self::from_signal(sig, s.dumped()))
    }

    /// Decodes a `waitpid`-style wait status; `None` if it does not describe a terminated
    /// process.
    pub(crate) fn from_wait_status(raw: i32) -> Option<Self> {
        if libc::WIFEXITED(raw) {
            Some(Self::from_code(libc::WEXITSTATUS(raw)))
        } else if libc::WIFSIGNALED(raw) {
            Some(Self::from_signal(libc::WTERMSIG(raw), libc::WCOREDUMP(raw)))
        } else {
            None
        }
    }

    /// The status of the exited process behind `pidfd`, read from the pidfd itself: the
    /// kernel keeps it even when the process was reaped without us (its parent ignores
    /// `SIGCHLD`, say). `None` if it has not exited, or the kernel is older than 6.15.
    pub(crate) fn from_pidfd(pidfd: std::os::fd::BorrowedFd<'_>) -> Option<Self> {
        crate::sys::pidfd_wait_status(pidfd).and_then(Self::from_wait_status)
    }

    /// [`ExitStatus::from_pidfd`], telling apart a kernel that keeps no status for pidfds
    /// (`Err(())`) from a status not there (yet) (`Ok(None)`).
    pub(crate) fn try_from_pidfd(pidfd: std::os::fd::BorrowedFd<'_>) -> Result<Option<Self>, ()> {
        match crate::sys::pidfd_exit_info(pidfd) {
            None => Err(()),
            Some(raw) => Ok(raw.and_then(Self::from_wait_status)),
        }
    }

    /// The exit code, if the process exited normally.
    pub fn code(&self) -> Option<i32> {
        match self.repr {
            Repr::Code(c) => Some(c),
            Repr::Signal { .. } => None,
        }
    }

    /// The number of the signal that killed the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.repr {
            Repr::Code(_) => None,
            Repr::Signal { signal, .. } => Some(signal),
        }
    }

    /// The name of the signal that killed the process (`"SIGKILL"`), if one did and it has a
    /// name.
    pub fn signal_name(&self) -> Option<&'static str> {
        self.signal().and_then(signal_name)
    }

    /// Whether the process dumped core when the signal killed it.
    pub fn core_dumped(&self) -> bool {
        matches!(
            self.repr,
            Repr::Signal {
                core_dumped: true,
                ..
            }
        )
    }

    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.repr {
            Repr::Code(c) => write!(f, "exit code {c}"),
            Repr::Signal {
                signal,
                core_dumped,
            } => {
                write!(f, "signal {signal}")?;
                if let Some(name) = signal_name(signal) {
                    write!(f, " ({name})")?;
                }
                if core_dumped {
                    f.write_str(", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// The conventional name of signal number `sig` on Linux (`9` → `"SIGKILL"`).
///
/// Real-time signals have no fixed name and give `None`.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match Signal::from_named_raw(sig)? {
        Signal::HUP => "SIGHUP",
        Signal::INT => "SIGINT",
        Signal::QUIT => "SIGQUIT",
        Signal::ILL => "SIGILL",
        Signal::TRAP => "SIGTRAP",
        Signal::ABORT => "SIGABRT",
        Signal::BUS => "SIGBUS",
        Signal::FPE => "SIGFPE",
        Signal::KILL => "SIGKILL",
        Signal::USR1 => "SIGUSR1",
        Signal::SEGV => "SIGSEGV",
        Signal::USR2 => "SIGUSR2",
        Signal::PIPE => "SIGPIPE",
        Signal::ALARM => "SIGALRM",
        Signal::TERM => "SIGTERM",
        Signal::STKFLT => "SIGSTKFLT",
        Signal::CHILD => "SIGCHLD",
        Signal::CONT => "SIGCONT",
        Signal::STOP => "SIGSTOP",
        Signal::TSTP => "SIGTSTP",
        Signal::TTIN => "SIGTTIN",
        Signal::TTOU => "SIGTTOU",
        Signal::URG => "SIGURG",
        Signal::XCPU => "SIGXCPU",
        Signal::XFSZ => "SIGXFSZ",
        Signal::VTALARM => "SIGVTALRM",
        Signal::PROF => "SIGPROF",
        Signal::WINCH => "SIGWINCH",
        Signal::IO => "SIGIO",
        Signal::POWER => "SIGPWR",
        Signal::SYS => "SIGSYS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        assert_eq!(ExitStatus::from_code(0).to_string(), "exit code 0");
        assert!(ExitStatus::from_code(0).success());
        assert!(!ExitStatus::from_code(3).success());
        assert_eq!(
            ExitStatus::from_signal(11, true).to_string(),
            "signal 11 (SIGSEGV), core dumped"
        );
        assert_eq!(ExitStatus::from_signal(40, false).to_string(), "signal 40");
        assert!(ExitStatus::from_signal(6, true).core_dumped());
        assert_eq!(
            ExitStatus::from_signal(6, false).signal_name(),
            Some("SIGABRT")
        );
    }

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(
            ExitStatus::from_wait_status(3 << 8),
            Some(ExitStatus::from_code(3))
        );
        assert_eq!(
            ExitStatus::from_wait_status(6 | 0x80),
            Some(ExitStatus::from_signal(6, true))
        );
        assert_eq!(
            ExitStatus::from_wait_status(9),
            Some(ExitStatus::from_signal(9, false))
        );
        // Stopped by SIGSTOP: not an end.
        assert_eq!(ExitStatus::from_wait_status((19 << 8) | 0x7f), None);
    }

    #[test]
    fn roundtrips_through_postcard() {
        for s in [ExitStatus::from_code(-1), ExitStatus::from_signal(9, false)] {
            let bytes = postcard::to_allocvec(&s).unwrap();
            assert_eq!(postcard::from_bytes::<ExitStatus>(&bytes).unwrap(), s);
        }
    }
}
