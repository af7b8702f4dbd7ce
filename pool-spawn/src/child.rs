//! A direct child process: waited for through its pidfd, so a pid is never reused under us.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

use crate::error::{Error, ErrorKind, Result};
use crate::status::ExitStatus;

/// A child of this process, until reaped.
#[derive(Debug)]
pub(crate) struct ChildProc {
    pid: Pid,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// Reaped without us (this process ignores `SIGCHLD`) and its status could not be
    /// read: its pid may belong to another process already.
    vanished: bool,
    /// Given up on: dropping it neither kills nor waits.
    detached: bool,
}

impl ChildProc {
    /// Takes charge of child `pid` (not yet reaped), opening a pidfd where the kernel can.
    pub(crate) fn adopt(pid: Pid) -> ChildProc {
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
        ChildProc::from_parts(pid, pidfd)
    }

    /// Takes charge of child `pid` with an already opened pidfd (or none).
    pub(crate) fn from_parts(pid: Pid, pidfd: Option<OwnedFd>) -> ChildProc {
        ChildProc {
            pid,
            pidfd,
            status: None,
            vanished: false,
            detached: false,
        }
    }

    /// Gives up on the child: dropping the handle will neither kill nor wait for it.
    pub(crate) fn forget(mut self) {
        self.detached = true;
    }

    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    pub(crate) fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Whether the child still holds its pid (and so its process group id): until we
    /// reap it, unless the kernel reaped it for us.
    pub(crate) fn holds_its_pid(&self) -> bool {
        self.status.is_none() && !self.vanished
    }

    /// Reaps the child if it has exited.
    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        self.waitid(WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
    }

    fn waitid(&mut self, opts: WaitIdOptions) -> Result<Option<ExitStatus>> {
        loop {
            let r = match &self.pidfd {
                Some(fd) => rustix::process::waitid(WaitId::PidFd(fd.as_fd()), opts),
                None => rustix::process::waitid(WaitId::Pid(self.pid), opts),
            };
            match r {
                Ok(Some(st)) => {
                    if let Some(s) = ExitStatus::from_waitid(&st) {
                        self.status = Some(s);
                        return Ok(Some(s));
                    }
                    // Stopped/continued reports are not requested; treat as "still running".
                    return Ok(None);
                }
                Ok(None) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CHILD) => return self.reaped_without_us(),
                Err(e) => return Err(Error::io("waiting for a child process", e.into())),
            }
        }
    }

    /// `waitid` says the child is not ours to wait for: the kernel reaped it as it exited,
    /// because this process ignores `SIGCHLD` (or set `SA_NOCLDWAIT`). Its pidfd still
    /// tells how it ended on Linux 6.15 and later.
    ///
    /// The kernel marks such a child dead (its pidfd readable, `waitid` no longer sees it)
    /// a moment before it records the status for the pidfd, as it releases the process: a
    /// status not there yet is asked again for a short, bounded while (backing off from
    /// 20 µs to 2 ms, 100 ms in all) before it counts as lost. A kernel that keeps no
    /// status for pidfds (older than 6.13) is not asked again.
    fn reaped_without_us(&mut self) -> Result<Option<ExitStatus>> {
        const LOOK_FOR: Duration = Duration::from_millis(100);
        if let Some(fd) = self.pidfd.as_ref() {
            let deadline = Instant::now() + LOOK_FOR;
            let mut pause = Duration::from_micros(20);
            loop {
                match ExitStatus::try_from_pidfd(fd.as_fd()) {
                    Ok(Some(s)) => {
                        self.status = Some(s);
                        return Ok(Some(s));
                    }
                    Ok(None) => {}
                    // This kernel keeps no status for pidfds: nothing to wait for.
                    Err(()) => break,
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(2));
            }
        }
        self.vanished = true;
        Err(Error::new(
            ErrorKind::StatusLost,
            format!(
                "process {} was reaped by the kernel before its exit status could be read \
                 (this process ignores SIGCHLD; Linux 6.15 or later keeps the status for \
                 its pidfd)",
                self.pid.as_raw_nonzero()
            ),
        ))
    }

    /// Waits until the child exits or `timeout` passes; reaps it if it exited.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = deadline_after(timeout);
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match &self.pidfd {
                Some(fd) => {
                    poll_readable(fd.as_fd(), Some(left))
                        .map_err(|e| Error::io("polling a pidfd", e))?;
                }
                // No pidfd: poll the status with a short back-off.
                None => std::thread::sleep(left.min(Duration::from_millis(5))),
            }
        }
    }

    /// Waits for the child to exit and reaps it.
    pub(crate) fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        loop {
            if let Some(s) = self.waitid(WaitIdOptions::EXITED)? {
                return Ok(s);
            }
        }
    }

    /// Sends `sig` to the child (through its pidfd where possible). Errors with `ESRCH`
    /// once the child has been reaped.
    pub(crate) fn signal(&self, sig: Signal) -> io::Result<()> {
        if !self.holds_its_pid() {
            return Err(io::Error::from(rustix::io::Errno::SRCH));
        }
        match &self.pidfd {
            Some(fd) => rustix::process::pidfd_send_signal(fd, sig)?,
            None => rustix::process::kill_process(self.pid, sig)?,
        }
        Ok(())
    }

    /// `SIGKILL` to the child's process group and the child, then reap (bounded).
    ///
    /// # Errors
    /// [`ErrorKind::TimedOut`] if it is still not gone after `bound`.
    pub(crate) fn kill_and_reap(&mut self, bound: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        if self.holds_its_pid() {
            let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
        }
        let _ = self.signal(Signal::KILL);
        match self.wait_timeout(bound)? {
            Some(s) => Ok(s),
            None => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "process {} survived SIGKILL for {bound:?}",
                    self.pid.as_raw_nonzero()
                ),
            )),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if self.holds_its_pid()
            && !self.detached
            && let Err(e) = self.kill_and_reap(Duration::from_secs(2))
        {
            tracing::warn!(pid = self.pid.as_raw_nonzero().get(), error = %e, "could not reap a child process");
        }
    }
}

/// Polls one fd for readability; `Ok(true)` if readable (or hung up) before `timeout`.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    poll(&mut fds, timeout)?;
    Ok(!fds[0].revents().is_empty())
}

/// `poll(2)` with a `Duration` timeout (`None`: forever); retries on `EINTR` with the time
/// left.
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.map(deadline_after);
    loop {
        let ts = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            rustix::event::Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            }
        });
        match rustix::event::poll(fds, ts.as_ref()) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The instant `timeout` from now; a timeout too long to represent (`Duration::MAX`, say)
/// means a century, which is to say never.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
