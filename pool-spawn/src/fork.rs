//! `fork(2)` and the code that runs between fork and exec (or the worker loop).
//!
//! # Safety
//!
//! This module holds the crate's only `libc::fork` call (rustix has no public `fork`) and
//! its only `pre_exec` hook. After `fork` in a process that has other threads, the child is
//! a copy with a single thread: any lock another thread held (in the allocator, in
//! `stdout`, in a logger, in a runtime) stays held forever. POSIX therefore allows only
//! async-signal-safe calls until `exec`.
//!
//! Post-fork checklist, followed by every child path here:
//!
//! - **No locks held by other threads.** Until the child hands over to the worker loop (or
//!   execs) it calls only raw system calls through rustix's `linux_raw` backend and the
//!   async-signal-safe libc calls in [`crate::sys`]; nothing takes a lock.
//! - **No allocation before the handoff.** Paths are `&CStr` literals, errors are errno
//!   values; `pre_exec` captures only integers.
//! - **Reseed randomness if it matters.** The child shares the parent's RNG state and
//!   `HashMap` keys; pool-spawn keeps none that matter, task code that needs fresh
//!   randomness must reseed.
//! - **No `MAP_SHARED` assumptions.** Private mappings are copied on write; shared mappings
//!   stay shared with the parent.
//! - **Only async-signal-safe calls until exec or the worker loop.** On any setup error the
//!   child calls `_exit`, never unwinds or returns into the parent's code, and never runs
//!   the parent's destructors or `atexit` handlers.
//!
//! The worker loop itself allocates and runs user code. That is sound when the parent has
//! only one thread (checked by [`Launcher::new`](crate::Launcher::new) for
//! [`StartMethod::Fork`](crate::StartMethod::Fork), and always true in the fork server, a
//! freshly executed single-threaded process); with other threads it is the documented risk
//! a user opts into with `LaunchOptions::allow_fork_with_threads`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, Signal};

use crate::sys;

/// Exit code of a forked child whose setup failed before the worker loop.
const EXIT_CHILD_SETUP: i32 = 126;
/// Exit code of a forked child whose worker loop unwound (it never should).
const EXIT_CHILD_UNWOUND: i32 = 101;

/// Forks a worker that serves `chan`; returns its pid in the parent. Called only by a fork
/// server (see `forkserver::serve`), which has already taken a worker's signal settings
/// (`sys::worker_signals`: nothing ignored or blocked that should not be, `SIGINT`,
/// `SIGTTOU` and `SIGTTIN` ignored), reads stdin from `/dev/null` and never changes either
/// afterwards: the child inherits both as they are and does not set them again.
///
/// The child moves into its own process group, gets `SIGKILL` when the forking thread
/// dies, checks that its parent is still the forking process, closes every descriptor but
/// 0, 1, 2 and `chan`, then runs the worker loop and exits; it never returns here.
///
/// # Errors
///
/// The `fork` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_worker(chan: OwnedFd) -> io::Result<Pid> {
    fork_serving(chan, Prepare::Inherited, crate::runner::run)
}

/// Forks the zygote of a [`StartMethod::Fork`](crate::StartMethod::Fork) launcher: a fork
/// server without exec, serving `ctl` (see `forkserver`). Forked once, when the launcher is
/// made (while the process is still single-threaded, or the user allowed the risk), it is
/// single-threaded for good, so the workers it forks later never inherit a lock that another
/// thread of the parent held at that moment (a `println!` in `main`, say). Returns its pid
/// in the parent. The child is prepared as a worker is (see [`fork_worker`]).
///
/// # Errors
///
/// The `fork` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_zygote(ctl: OwnedFd) -> io::Result<Pid> {
    fork_serving(ctl, Prepare::Full, crate::forkserver::serve_prepared)
}

/// How much of a worker's setup a forked child does itself.
#[derive(Clone, Copy)]
enum Prepare {
    /// Everything: its parent may have any signal settings and any stdin.
    Full,
    /// Its parent is a fork server, whose signal settings and stdin are a worker's
    /// already: only what is the child's own (group, parent-death signal, descriptors).
    Inherited,
}

/// Forks a child that prepares as a worker, then runs `serve` on `fd` (the worker loop or
/// the fork server's); returns its pid in the parent.
fn fork_serving(fd: OwnedFd, prepare: Prepare, serve: fn(OwnedFd) -> !) -> io::Result<Pid> {
    let parent = rustix::process::getpid();
    // In the child (return value 0) we follow the module's post-fork checklist: `child`
    // makes only async-signal-safe calls until `serve`, and never returns.
    // SAFETY: `fork` has no memory-safety preconditions; the child path is described above.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => child(fd, parent, prepare, serve),
        pid => {
            drop(fd);
            let pid = Pid::from_raw(pid).expect("fork returned a positive pid");
            // Also set the group from this side, so that signalling it right after we
            // return cannot race with the child's own `setpgid`.
            let _ = rustix::process::setpgid(Some(pid), Some(pid));
            Ok(pid)
        }
    }
}

/// The forked child: prepare, then serve; never returns.
fn child(fd: OwnedFd, parent: Pid, prepare: Prepare, serve: fn(OwnedFd) -> !) -> ! {
    if prepare_worker(fd.as_raw_fd(), parent, prepare).is_err() {
        sys::exit_now(EXIT_CHILD_SETUP);
    }
    // The handoff: from here on the worker loop (or the server loop) may allocate (see the
    // module docs).
    let _ = panic::catch_unwind(AssertUnwindSafe(move || serve(fd)));
    sys::exit_now(EXIT_CHILD_UNWOUND)
}

/// Async-signal-safe setup of a freshly forked worker.
fn prepare_worker(chan: RawFd, parent: Pid, prepare: Prepare) -> rustix::io::Result<()> {
    rustix::process::setpgid(None, None)?;
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    // The parent may have died before the line above: then nobody will send the signal.
    if rustix::process::getppid() != Some(parent) {
        return Err(rustix::io::Errno::SRCH);
    }
    if let Prepare::Full = prepare {
        sys::worker_signals();
        stdin_from_null()?;
    }
    sys::close_fds_except(chan);
    Ok(())
}

/// Points stdin at `/dev/null`. Async-signal-safe (`open`, `dup2`, `close`).
fn stdin_from_null() -> rustix::io::Result<()> {
    let null = rustix::fs::open(
        c"/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(())
}

/// Arranges for a spawned child to keep exactly `keep` across exec (all other descriptors
/// from 3 up are marked close-on-exec), to start with a worker's signal settings
/// (`sys::worker_signals`), to get `SIGKILL` when the spawning thread dies, and
/// to fail the spawn if `parent` is no longer its parent by then.
pub(crate) fn prepare_exec(cmd: &mut Command, keep: RawFd, parent: Pid) {
    let hook = move || -> io::Result<()> {
        // An ignored signal stays ignored across exec: the child starts with a worker's
        // settings (also `SIGTTOU` ignored, so that its first print, before it even reaches
        // `init()`, does not stop it on a terminal with `tostop`).
        sys::worker_signals();
        sys::cloexec_from_3();
        sys::clear_cloexec(keep)?;
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        if rustix::process::getppid() != Some(parent) {
            return Err(io::Error::from(rustix::io::Errno::SRCH));
        }
        Ok(())
    };
    // The hook runs between fork and exec; it captures two integers, allocates nothing and
    // makes only async-signal-safe system calls (`sigaction`, `sigprocmask`, `close_range`,
    // `fcntl`, `prctl`, `getppid`).
    // SAFETY: as just described; its errors are plain errno values (no allocation).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Forks a child that only calls `_exit(0)`, and waits for it: the bare cost of a process
/// (no exec, no setup), the floor that `procpool bench` sets beside recycling. Not part of
/// the API.
///
/// # Errors
///
/// The `fork` or `waitpid` error, or an error if the child did not exit with status 0.
pub(crate) fn bare_fork_exit_wait() -> io::Result<()> {
    // SAFETY: `fork` has no memory-safety preconditions; the child makes one
    // async-signal-safe call, `_exit`, and never returns (the module's checklist).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: `_exit` is async-signal-safe and skips the parent's destructors.
        0 => unsafe { libc::_exit(0) },
        pid => {
            let pid = Pid::from_raw(pid).expect("fork returned a positive pid");
            let (_, status) =
                rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())?
                    .ok_or_else(|| io::Error::other("waitpid returned no status"))?;
            if status.exit_status() == Some(0) {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "the forked child ended with {status:?}"
                )))
            }
        }
    }
}
