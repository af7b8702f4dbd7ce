//! `fork(2)` and the code that runs between fork and exec (or the worker loop).
//!
//! # Safety
//!
//! This module holds the crate's only `libc::fork` call (rustix has no public `fork`) and
//! its only `libc::clone` (the spawn of a program, `spawn_exec`). After `fork` in a process that has other threads, the child is
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
//!   values; a spawned program's path, arguments and environment are made ready as C
//!   strings by the parent before the clone.
//! - **Nothing of the parent's runs in a child that shares its memory.** The child of
//!   `spawn_exec` (cloned with `CLONE_VM | CLONE_VFORK`, its parent suspended until the
//!   exec) starts with every signal blocked and keeps them blocked through the exec (so
//!   no handler of the parent's can run in it), runs on a stack of its own and writes
//!   nothing of the parent's but its error word.
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

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, Ordering};

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
/// dies, checks that its parent is still the forking process (`parent`, this process's id,
/// which the server knows already), closes every descriptor but 0, 1, 2 and `chan`, then
/// runs the worker loop and exits; it never returns here.
///
/// # Errors
///
/// The `fork` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_worker(chan: OwnedFd, parent: Pid) -> io::Result<Pid> {
    fork_serving(chan, parent, Prepare::Inherited, crate::runner::run)
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
pub(crate) fn fork_zygote(ctl: OwnedFd, hold_spare: bool) -> io::Result<Pid> {
    let serve = if hold_spare {
        crate::forkserver::serve_prepared_holding
    } else {
        crate::forkserver::serve_prepared
    };
    fork_serving(ctl, rustix::process::getpid(), Prepare::Full, serve)
}

/// Forks a worker of this process's own that serves `chan`: one of a
/// [`StartMethod::Fork`](crate::StartMethod::Fork) launcher's initial workers, forked beside
/// its zygote when the launcher is made (see
/// [`LaunchOptions::fork_initial_here`](crate::LaunchOptions::fork_initial_here)). Returns
/// its pid in the parent. The child is prepared as the zygote is (its parent may have any
/// signal settings and any stdin), then runs the worker loop, as a worker of the zygote
/// does (see [`fork_worker`]).
///
/// # Errors
///
/// The `fork` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_own_worker(chan: OwnedFd) -> io::Result<Pid> {
    fork_serving(
        chan,
        rustix::process::getpid(),
        Prepare::Full,
        crate::runner::run,
    )
}

/// Forks the seed (see `crate::seed`): a copy of this process, made by `init()` while it is
/// single-threaded, prepared as a worker is (its parent may have any signal settings and
/// any stdin), that serves `ctl` with `serve`. The servers it forks inherit that
/// preparation. Returns its pid.
///
/// # Errors
///
/// The `fork` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_seed(ctl: OwnedFd, serve: fn(OwnedFd) -> !) -> io::Result<Pid> {
    fork_serving(ctl, rustix::process::getpid(), Prepare::Full, serve)
}

/// Forks this process into a sibling: the child's parent is this process's parent
/// (`CLONE_PARENT`), which can wait for it, open its pidfd and signal its group as it does
/// its own children's. Only for a single-threaded process (the seed): the child runs on as
/// a `fork` child would, with glibc's record of the thread's id and robust-mutex list made
/// the child's, as glibc's `fork` does; glibc's fork handlers are not run (with one thread,
/// no lock of the C library can be held at this moment). Returns `None` in the child, the
/// child's pid in this process.
///
/// # Errors
///
/// `ENOSYS` if the kernel cannot tell where glibc keeps the thread's id (it needs
/// `PR_GET_TID_ADDRESS`) or lacks `clone3`; the `clone3` error (`EAGAIN`, `ENOMEM`).
pub(crate) fn fork_sibling() -> io::Result<Option<Pid>> {
    let mut tid_at: *mut libc::c_int = std::ptr::null_mut();
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer to the address given, a local.
    let r = unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut tid_at as *mut _, 0, 0, 0) };
    if r != 0 || tid_at.is_null() {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    let mut head: *mut libc::c_void = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list for this thread (pid 0) writes the list head and its length to
    // the two locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut *mut libc::c_void,
            &mut len as *mut libc::size_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let args = CloneArgs {
        flags: (libc::CLONE_PARENT | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64,
        child_tid: tid_at as u64,
        // With CLONE_PARENT the kernel wants none: the child ends with the signal this
        // process ends with (SIGCHLD, as it was forked), sent to the common parent.
        ..CloneArgs::default()
    };
    // The kernel writes the child's thread id to `tid_at`, which is where glibc reads it
    // (the address `set_tid_address` registered at start-up, as glibc's own `fork` passes).
    // SAFETY: a fork (no new stack: the child runs on a copy of this memory) of a
    // single-threaded process, the caller's duty; `args` outlives the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // The kernel does not carry the robust-mutex list over to a new process.
            // SAFETY: registers the list head glibc keeps for this thread, copied with the
            // rest of the memory, as glibc's `fork` does in its child.
            unsafe { libc::syscall(libc::SYS_set_robust_list, head, len) };
            Ok(None)
        }
        pid => Ok(Some(
            Pid::from_raw(pid as i32).expect("clone3 returned a positive pid"),
        )),
    }
}

/// `struct clone_args` (the first version, 64 bytes), as `clone3(2)` takes it.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// How much of a worker's setup a forked child does itself.
#[derive(Clone, Copy)]
enum Prepare {
    /// Everything: its parent may have any signal settings and any stdin.
    Full,
    /// Its parent is a fork server, whose signal settings and stdin are a worker's
    /// already: only what is the child's own (group, parent-death signal, descriptors).
    Inherited,
    /// As `Inherited`, keeping this descriptor open too.
    InheritedKeeping(RawFd),
}

/// Forks a child that prepares as a worker, then runs `serve` on `fd` (the worker loop or
/// the fork server's); returns its pid in the parent. `parent`: this process's id.
fn fork_serving(
    fd: OwnedFd,
    parent: Pid,
    prepare: Prepare,
    serve: fn(OwnedFd) -> !,
) -> io::Result<Pid> {
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

/// The rest of a child of a fork server's kind (its signal settings and stdin a worker's
/// already) forked without [`fork_serving`] (the seed's `fork_sibling`): prepares as
/// [`Prepare::Inherited`] says, keeping descriptor `keep` open too (the seed's server: the
/// pipe its verdict comes on), then serves `fd`; never returns.
pub(crate) fn serve_inherited(fd: OwnedFd, keep: RawFd, parent: Pid, serve: fn(OwnedFd) -> !) -> ! {
    child(fd, parent, Prepare::InheritedKeeping(keep), serve)
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
    match prepare {
        Prepare::InheritedKeeping(other) => {
            sys::close_fds_except(&[chan.min(other), chan.max(other)])
        }
        Prepare::Full | Prepare::Inherited => sys::close_fds_except(&[chan]),
    }
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

/// A program to execute in a new process: its path, arguments and environment, made
/// ready (as C strings) before the process is made, so that the child allocates nothing.
pub(crate) struct ExecPlan {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl ExecPlan {
    /// `path` run with `argv` (the first is the program's name) and `envp` (`NAME=value`).
    ///
    /// # Errors
    ///
    /// `InvalidInput` if a string holds a NUL byte.
    pub(crate) fn new(
        path: &OsStr,
        argv: impl IntoIterator<Item = OsString>,
        envp: impl IntoIterator<Item = OsString>,
    ) -> io::Result<ExecPlan> {
        let c = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        Ok(ExecPlan {
            path: c(path)?,
            argv: argv.into_iter().map(|a| c(&a)).collect::<io::Result<_>>()?,
            envp: envp.into_iter().map(|e| c(&e)).collect::<io::Result<_>>()?,
        })
    }
}

/// `strings` as `execve` takes them: pointers to each, then a null pointer (valid while
/// `strings` is).
fn c_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// What the child of [`spawn_exec`] reads (and writes its error into), in the parent's
/// memory, which it shares until it executes.
struct ExecChild {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    keep: RawFd,
    null: RawFd,
    parent: libc::pid_t,
    /// The errno of the step that failed, 0 if none did (the exec replaced the child).
    error: AtomicI32,
}

/// The size of the stack [`spawn_exec`]'s child runs on until it executes.
const EXEC_STACK: usize = 64 * 1024;

/// Starts `plan` in a new process, as a worker of `parent` whose channel is `keep`:
/// that descriptor alone (with stdio) survives the exec; the program starts with every
/// signal blocked, and `init()` gives it a worker's signal settings
/// (`sys::worker_signals`) before it opens the mask (a blocked `SIGTTOU` lets a print
/// before `init()` go on, on a terminal with `tostop`, as an ignored one does; a signal
/// sent meanwhile waits for `init()`, `SIGKILL` excepted), in a process group of its own, with stdin from `/dev/null`, gets `SIGKILL` when the spawning
/// thread dies, and fails if `parent` is no longer its parent by then. Returns its pid once
/// it has executed the program.
///
/// The child is cloned with `CLONE_VM | CLONE_VFORK`: it runs in this process's memory, on
/// a stack of its own, while this thread waits, until the exec gives it its own. So this
/// process's page tables are never copied (a fork costs a parent in proportion to the
/// memory it maps, then a page copy for each page either side writes first), which is
/// what `posix_spawn` does too; std's `Command` cannot do it with a hook to run before
/// the exec.
///
/// # Errors
///
/// The `clone` error, or the error of the step of the child's set-up (or of the exec)
/// that failed: that child has exited and is reaped.
pub(crate) fn spawn_exec(plan: &ExecPlan, keep: RawFd, parent: Pid) -> io::Result<Pid> {
    let null = rustix::fs::open(
        c"/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let (argv, envp) = (c_array(&plan.argv), c_array(&plan.envp));
    let child = ExecChild {
        path: plan.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        keep,
        null: null.as_raw_fd(),
        parent: parent.as_raw_nonzero().get(),
        error: AtomicI32::new(0),
    };
    // SAFETY: a fresh private anonymous mapping, unmapped below; nothing else refers to it.
    let stack = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            EXEC_STACK,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::STACK,
        )?
    };
    // Every signal is blocked in this thread while the child shares its memory (the child
    // starts with this mask, and keeps it through the exec: no handler of ours runs there).
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both sets are valid for writing; only this thread's mask changes, and it is
    // put back below.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
    }
    // `exec_child` runs on the fresh stack (its top passed; it grows down) and reads `child`
    // and the strings it points to, which outlive the call: with `CLONE_VFORK` this thread
    // is suspended until the child has executed the program or exited.
    // SAFETY: as just said; the child makes only async-signal-safe calls and never returns
    // into this process's code (see `exec_child`).
    let pid = unsafe {
        libc::clone(
            exec_child,
            stack.cast::<u8>().add(EXEC_STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&child as *const ExecChild).cast_mut().cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores this thread's own mask, saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
    }
    // SAFETY: the child no longer runs on the stack: it has executed or exited (`CLONE_VFORK`),
    // or was never made.
    let _ = unsafe { rustix::mm::munmap(stack, EXEC_STACK) };
    drop(null);
    if pid == -1 {
        return Err(clone_error);
    }
    let pid = Pid::from_raw(pid).expect("clone returned a positive pid");
    match child.error.load(Ordering::SeqCst) {
        0 => Ok(pid),
        errno => {
            // It exited at once: reap it.
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

/// The child of [`spawn_exec`]: sets itself up as a worker and executes the program; on
/// failure, writes the errno where its parent reads it and exits. Runs in the parent's
/// memory, while the parent waits, with every signal blocked: only async-signal-safe calls
/// (raw system calls), no allocation, no lock, no unwinding, and never a return into the
/// parent's code.
extern "C" fn exec_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ExecChild` the parent passed, alive while the parent waits.
    let c = unsafe { &*(arg as *const ExecChild) };
    let errno = match prepare_child(c) {
        Err(e) => e.raw_os_error(),
        Ok(()) => {
            // SAFETY: `path`, `argv` and `envp` are NUL-terminated strings and
            // null-terminated arrays of them, alive while the parent waits.
            unsafe { libc::execve(c.path, c.argv, c.envp) };
            // Only on failure.
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        }
    };
    c.error.store(errno.max(1), Ordering::SeqCst);
    sys::exit_now(EXIT_CHILD_SETUP)
}

/// The set-up of a spawned worker, before its exec (see [`spawn_exec`]).
fn prepare_child(c: &ExecChild) -> rustix::io::Result<()> {
    // Signals stay blocked (the parent's handlers must not run here) through the exec: the
    // program's `init()` sets a worker's signal settings, then opens the mask. Handlers
    // are reset by the exec; dispositions it keeps (ignored signals) are `init()`'s too.
    // So this child makes no `sigaction` call (each would be a system call while the
    // parent waits for the exec).
    rustix::process::setpgid(None, None)?;
    // SAFETY: `null` is the parent's open descriptor of /dev/null, alive while it waits.
    let null = unsafe { BorrowedFd::borrow_raw(c.null) };
    rustix::stdio::dup2_stdin(null)?;
    sys::cloexec_from_3();
    sys::clear_cloexec(c.keep).map_err(|e| {
        rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EBADF))
    })?;
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(c.parent) {
        return Err(rustix::io::Errno::SRCH);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use rustix::process::{WaitOptions, getpid, waitpid};

    use super::{ExecPlan, spawn_exec};

    fn plan(path: &str, args: &[&str]) -> ExecPlan {
        ExecPlan::new(
            path.as_ref(),
            args.iter().map(|a| a.into()),
            std::env::vars_os().map(|(k, v)| {
                let mut e = k;
                e.push("=");
                e.push(v);
                e
            }),
        )
        .unwrap()
    }

    /// A program that runs is started, and ends as it says; one that cannot be executed, or
    /// a child whose parent is not the one named, is an error with the errno of the step
    /// that failed (that child is reaped: `cargo xtask test` checks that no process is left).
    #[test]
    fn spawn_exec_starts_a_program_or_says_why_not_and_reaps_the_child() {
        let (_ours, theirs) = pool_ipc::socketpair().unwrap();
        let keep = theirs.as_raw_fd();
        let pid = spawn_exec(&plan("/bin/sh", &["sh", "-c", "exit 3"]), keep, getpid()).unwrap();
        let (_, status) = waitpid(Some(pid), WaitOptions::empty()).unwrap().unwrap();
        assert_eq!(status.exit_status(), Some(3));

        let e = spawn_exec(&plan("/nonexistent/program", &["x"]), keep, getpid()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let other = rustix::process::Pid::from_raw(1).unwrap();
        let e = spawn_exec(&plan("/bin/sh", &["sh", "-c", "exit 0"]), keep, other).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
    }
}
