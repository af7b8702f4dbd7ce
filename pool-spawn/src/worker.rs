//! [`Worker`]: the parent's handle to one worker process.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::StartMethod;
use crate::child::{ChildProc, poll_readable};
use crate::error::{Error, ErrorKind, Result};
use crate::forkserver::{Forked, ServerLink};
use crate::status::ExitStatus;

/// How long a killed worker may take to die before [`Worker::terminate`] gives up.
const KILL_BOUND: Duration = Duration::from_secs(5);
/// How long the fork server may take to report a worker it has seen exit.
const REPORT_GRACE: Duration = Duration::from_secs(2);

/// A handle to one worker process, from [`Launcher::launch`](crate::Launcher::launch).
///
/// The worker runs in its own process group. Its exit status is read through a pidfd
/// (`waitid(P_PIDFD)`), so a recycled pid can never be waited for or signalled by mistake;
/// a fork-server worker's status comes from the server, which is its parent.
///
/// Dropping a handle whose worker is still alive kills the worker's process group with
/// `SIGKILL` and reaps it (waiting at most a few seconds). The group is signalled only while
/// the worker still holds its pid (its group id): a direct child until it is reaped, a
/// fork-server worker until its pidfd reports its exit. After that, group signals answer
/// `ESRCH` rather than reach whoever has the number now.
#[derive(Debug)]
pub struct Worker {
    pid: u32,
    name: String,
    method: StartMethod,
    channel: Option<OwnedFd>,
    proc_: Proc,
    /// The signals sent through this handle (bit `n - 1` for signal `n`).
    sent: AtomicU64,
}

/// The bit of signal `n` in [`Worker`]'s set of signals sent (bit `n - 1`); `None` for a
/// number outside `1..=64`.
fn signal_bit(n: i32) -> Option<u64> {
    (1..=64).contains(&n).then(|| 1 << (n - 1))
}

#[derive(Debug)]
enum Proc {
    /// Our own child (spawn, fork).
    Direct(ChildProc),
    /// A child of the fork server.
    Served {
        serial: u64,
        pid: Pid,
        pidfd: Option<OwnedFd>,
        link: Arc<ServerLink>,
        status: Option<ExitStatus>,
    },
}

impl Worker {
    pub(crate) fn direct(name: &str, method: StartMethod, chan: OwnedFd, child: ChildProc) -> Self {
        Worker {
            pid: child.pid().as_raw_nonzero().get() as u32,
            name: name.to_owned(),
            method,
            channel: Some(chan),
            proc_: Proc::Direct(child),
            sent: AtomicU64::new(0),
        }
    }

    pub(crate) fn served(
        name: &str,
        method: StartMethod,
        f: Forked,
        link: Arc<ServerLink>,
    ) -> Self {
        Worker {
            pid: f.pid.as_raw_nonzero().get() as u32,
            name: name.to_owned(),
            method,
            channel: Some(f.chan),
            proc_: Proc::Served {
                serial: f.serial,
                pid: f.pid,
                pidfd: f.pidfd,
                link,
                status: None,
            },
            sent: AtomicU64::new(0),
        }
    }

    /// Notes that `sig` was sent through this handle. A worker answers SIGTERM by killing
    /// its process group, itself included, with SIGKILL (see `runner`): that SIGKILL counts
    /// as sent too.
    fn note_sent(&self, sig: Signal) {
        if let Some(bit) = signal_bit(sig.as_raw()) {
            self.sent.fetch_or(bit, Ordering::Relaxed);
        }
        if sig == Signal::TERM {
            self.note_sent(Signal::KILL);
        }
    }

    /// `s`, marked if the signal that ended the worker was sent through this handle.
    fn mark(&self, s: ExitStatus) -> ExitStatus {
        match s.signal().and_then(signal_bit) {
            Some(bit) if self.sent.load(Ordering::Relaxed) & bit != 0 => s.with_sent_by_pool(),
            _ => s,
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker's name, as given to `launch` (`ForkserverPoolWorker-3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the worker was started.
    pub fn method(&self) -> StartMethod {
        self.method
    }

    /// Takes the parent's end of the worker's channel (a close-on-exec, blocking-mode
    /// socket); `None` the second time. Wrap it in a pool-ipc type.
    pub fn take_channel(&mut self) -> Option<OwnedFd> {
        self.channel.take()
    }

    /// A pidfd of the worker, readable (`POLLIN`) once the process has exited. `None` if
    /// the kernel lacks pidfds.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.proc_ {
            Proc::Direct(c) => c.pidfd(),
            Proc::Served { pidfd, .. } => pidfd.as_ref().map(|p| p.as_fd()),
        }
    }

    fn status(&self) -> Option<ExitStatus> {
        match &self.proc_ {
            Proc::Direct(c) => c.status(),
            Proc::Served { status, .. } => *status,
        }
    }

    /// Sends `sig` to the worker process (through its pidfd where possible, so never to a
    /// process that reused its pid).
    ///
    /// # Errors
    /// `ESRCH` once the worker has been reaped; other `kill` errors.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        let r = self.signal_unnoted(sig);
        if r.is_ok() {
            self.note_sent(sig);
        }
        r
    }

    fn signal_unnoted(&self, sig: Signal) -> io::Result<()> {
        match &self.proc_ {
            Proc::Direct(c) => c.signal(sig),
            Proc::Served {
                status: Some(_), ..
            } => Err(io::Error::from(rustix::io::Errno::SRCH)),
            Proc::Served {
                pidfd: Some(fd), ..
            } => Ok(rustix::process::pidfd_send_signal(fd, sig)?),
            Proc::Served { pid, .. } if self.holds_its_pid() => {
                Ok(rustix::process::kill_process(*pid, sig)?)
            }
            Proc::Served { .. } => Err(io::Error::from(rustix::io::Errno::SRCH)),
        }
    }

    /// Sends `sig` to the worker's process group: the worker and every process it started
    /// that did not leave the group.
    ///
    /// # Errors
    /// `ESRCH` if the group no longer exists.
    pub fn signal_group(&self, sig: Signal) -> io::Result<()> {
        if !self.holds_its_pid() {
            // The group id is the worker's pid, which may belong to someone else by now.
            return Err(io::Error::from(rustix::io::Errno::SRCH));
        }
        let pgid = Pid::from_raw(self.pid as i32).ok_or(io::ErrorKind::InvalidInput)?;
        rustix::process::kill_process_group(pgid, sig)?;
        self.note_sent(sig);
        Ok(())
    }

    /// Whether the worker's pid (and so its group id) is still the worker's: a direct child
    /// holds it until we reap it; a fork-server worker until it exits (the server reaps it
    /// at once), which its pidfd tells.
    fn holds_its_pid(&self) -> bool {
        match &self.proc_ {
            Proc::Direct(c) => c.holds_its_pid(),
            Proc::Served {
                status: Some(_), ..
            } => false,
            Proc::Served {
                pidfd: Some(fd), ..
            } => !poll_readable(fd.as_fd(), Some(Duration::ZERO)).unwrap_or(true),
            // No pidfd (old kernels): alive unless the server has reported it.
            Proc::Served { serial, link, .. } => !matches!(
                link.wait_report(*serial, Duration::ZERO),
                Ok(Some(_)) | Err(_)
            ),
        }
    }

    /// Reaps the worker if its exit status can be had without waiting at all: a direct
    /// child's if it has exited, a fork-server worker's if the server's report of it has
    /// come ([`Worker::try_wait`] waits for that report once the worker has ended).
    ///
    /// # Errors
    /// As [`Worker::try_wait`].
    pub fn try_wait_now(&mut self) -> Result<Option<ExitStatus>> {
        let s = match &mut self.proc_ {
            Proc::Direct(c) => c.wait_timeout(Duration::ZERO)?,
            Proc::Served {
                status: Some(s), ..
            } => Some(*s),
            Proc::Served {
                serial,
                link,
                status,
                ..
            } => {
                *status = link.wait_report(*serial, Duration::ZERO)?;
                *status
            }
        };
        Ok(s.map(|s| self.mark(s)))
    }

    /// Whether the worker has ended, whether or not its exit status is known yet (a
    /// fork-server worker's pidfd tells as soon as it exits; the server's report of its
    /// status follows). A worker that has ended runs no more code: whatever it shared with
    /// the pool (its progress page) is written no more.
    pub fn has_ended(&self) -> bool {
        !self.holds_its_pid()
    }

    /// Reaps the worker if it has exited; never blocks (beyond reading a pending report
    /// from the fork server).
    ///
    /// # Errors
    /// [`ErrorKind::Io`] if `waitid` fails; [`ErrorKind::ServerLost`] for a fork-server
    /// worker whose server died without reporting it.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.wait_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` for the worker to exit, and reaps it.
    ///
    /// # Errors
    /// As [`Worker::try_wait`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let s = self.wait_timeout_unmarked(timeout)?;
        Ok(s.map(|s| self.mark(s)))
    }

    fn wait_timeout_unmarked(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        match &mut self.proc_ {
            Proc::Direct(c) => c.wait_timeout(timeout),
            Proc::Served {
                status: Some(s), ..
            } => Ok(Some(*s)),
            Proc::Served {
                serial,
                pidfd,
                link,
                status,
                ..
            } => {
                let deadline = crate::child::deadline_after(timeout);
                let r = match pidfd {
                    Some(fd) => {
                        let ended = poll_readable(fd.as_fd(), Some(timeout))
                            .map_err(|e| Error::io("polling a pidfd", e))?;
                        if ended {
                            // The report follows as soon as the server has reaped it.
                            let left = deadline.saturating_duration_since(Instant::now());
                            link.wait_report(*serial, left.max(REPORT_GRACE))?
                        } else {
                            link.wait_report(*serial, Duration::ZERO)?
                        }
                    }
                    None => link.wait_report(*serial, timeout)?,
                };
                *status = r;
                Ok(r)
            }
        }
    }

    /// Waits for the worker to exit, and reaps it.
    ///
    /// # Errors
    /// As [`Worker::try_wait`].
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Proc::Direct(c) = &mut self.proc_ {
            let s = c.wait()?;
            return Ok(self.mark(s));
        }
        loop {
            if let Some(s) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(s);
            }
        }
    }

    /// Stops the worker: `SIGTERM` to its process group, up to `grace` to exit, then
    /// `SIGKILL`; reaps it.
    ///
    /// # Errors
    /// [`ErrorKind::TimedOut`] if it survives `SIGKILL` for seconds (uninterruptible sleep);
    /// otherwise as [`Worker::try_wait`].
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status() {
            return Ok(self.mark(s));
        }
        let _ = self.signal_group(Signal::TERM);
        let _ = self.signal(Signal::TERM);
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        let _ = self.signal_group(Signal::KILL);
        let _ = self.signal(Signal::KILL);
        match self.wait_timeout(KILL_BOUND)? {
            Some(s) => Ok(s),
            None => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "worker {} (pid {}) survived SIGKILL for {KILL_BOUND:?}",
                    self.name, self.pid
                ),
            )),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Direct children: `ChildProc`'s own drop kills the group and reaps.
        let alive = self.holds_its_pid();
        if let Proc::Served {
            serial,
            pidfd,
            link,
            status: None,
            pid,
        } = &self.proc_
        {
            if alive {
                let _ = rustix::process::kill_process_group(*pid, Signal::KILL);
                match pidfd {
                    Some(fd) => {
                        let _ = rustix::process::pidfd_send_signal(fd, Signal::KILL);
                    }
                    None => {
                        let _ = rustix::process::kill_process(*pid, Signal::KILL);
                    }
                }
            }
            // The server reaps it; forget its report.
            link.abandon(*serial);
        }
    }
}
