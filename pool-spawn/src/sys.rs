//! Thin wrappers over the few system calls rustix does not offer safely.
//!
//! # Safety
//!
//! Every function here is safe to call; each unsafe block is a single libc call (or raw fd
//! adoption) whose preconditions are stated at the block. Nothing here allocates or takes
//! a lock except [`set_identity`] and [`adopt_inherited_fd`], so the other functions may be
//! used in a freshly forked child of a multi-threaded process (they are async-signal-safe:
//! `_exit`, `signal`, `close_range`/`close`, `fcntl`).
//!
//! The worker identity is a leaked, never-freed `Box`: the pointer stored in [`IDENTITY`]
//! is either null or points to an `Identity` that lives for the rest of the process.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicPtr, Ordering};

/// Ends the process at once with `code`: no destructors, no `atexit` handlers, no unwinding.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions; it never returns and runs no user code.
    unsafe { libc::_exit(code) }
}

/// Flushes Rust's stdout and stderr, then ends the process with `code` (see [`exit_now`]).
pub(crate) fn flush_and_exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    exit_now(code)
}

/// Makes this process ignore `SIGINT` (Ctrl-C goes to the parent, which shuts down in order).
pub(crate) fn ignore_sigint() {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; it is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// Makes SIGTERM end this worker's whole process group at once: the handler sends SIGKILL
/// to the group (the worker leads it), so processes a task started die with the worker even
/// if they ignore SIGTERM, and the pool need not signal a group whose leader it may already
/// have reaped. A task that installs its own SIGTERM handler replaces this one.
pub(crate) fn term_kills_group() {
    extern "C" fn on_term(_: libc::c_int) {
        // SAFETY: `kill` is async-signal-safe and touches no memory; 0 names our own group.
        unsafe {
            libc::kill(0, libc::SIGKILL);
        }
    }
    let handler = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only calls an async-signal-safe function (above).
    unsafe {
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Closes every file descriptor from 3 up except `keep`.
///
/// Uses `close_range(2)`; on kernels without it, closes one by one up to the fd limit.
/// Async-signal-safe (no allocation).
pub(crate) fn close_fds_except(keep: RawFd) {
    let keep = keep as libc::c_uint;
    if keep > 3 {
        close_range(3, keep - 1, 0);
    }
    close_range(keep.max(2) + 1, libc::c_uint::MAX, 0);
}

/// Marks every file descriptor from 3 up close-on-exec (best effort; async-signal-safe).
pub(crate) fn cloexec_from_3() {
    let _ = try_close_range(
        3,
        libc::c_uint::MAX,
        libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
    );
}

fn close_range(first: libc::c_uint, last: libc::c_uint, flags: libc::c_int) {
    if try_close_range(first, last, flags).is_ok() {
        return;
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 16)
        .min(1 << 20) as libc::c_uint;
    for fd in first..=last.min(limit) {
        // SAFETY: closing a descriptor number has no memory-safety preconditions; in this
        // process nothing will use the closed descriptors again (see callers).
        unsafe {
            libc::close(fd as libc::c_int);
        }
    }
}

fn try_close_range(first: libc::c_uint, last: libc::c_uint, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: the raw `close_range` system call takes three integers and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clears close-on-exec on `fd`, so that exactly this descriptor survives the next exec.
pub(crate) fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fcntl(F_SETFD)` on a descriptor number touches no memory; async-signal-safe.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes ownership of the descriptor a parent passed across exec, after checking that it
/// is open and a socket, and marks it close-on-exec again.
///
/// # Errors
///
/// `EBADF` if `fd` is not open; `ENOTSOCK` if it is not a socket.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fcntl(F_GETFD)` only queries the descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // The marker naming it was addressed to this very process (parent pid checked by the
    // caller): the parent passed it to us and nothing else in this process owns it.
    // SAFETY: the descriptor is open (checked above) and unowned (as just described).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = rustix::fs::fstat(&owned)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        // Not ours after all: give the number back untouched.
        std::mem::forget(owned);
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// The worker's name and pid, once `Setup` arrived.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) name: String,
}

/// Null, or a leaked `Identity` (see the module's safety notes).
static IDENTITY: AtomicPtr<Identity> = AtomicPtr::new(std::ptr::null_mut());

/// Records this process's worker identity. A previous one is leaked, never freed.
pub(crate) fn set_identity(name: String) {
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let p = Box::into_raw(Box::new(Identity { pid, name }));
    IDENTITY.store(p, Ordering::Release);
}

/// This process's worker identity, if it is a worker (a forked child sees its parent's
/// identity with the wrong pid: the caller compares).
pub(crate) fn identity() -> Option<&'static Identity> {
    let p = IDENTITY.load(Ordering::Acquire);
    // SAFETY: `p` is null or came from `Box::into_raw` in `set_identity` and is never freed,
    // so it is valid for `'static`; it is only ever read through shared references.
    unsafe { p.as_ref() }
}
