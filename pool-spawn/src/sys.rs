//! Thin wrappers over the few system calls rustix does not offer, and raw descriptor
//! numbers.
//!
//! libc is used only where rustix has no equivalent: `_exit` (rustix exits only through
//! its `runtime` feature, meant for libc-free programs), `signal` (likewise: no public
//! `sigaction`), `close_range(2)` (no wrapper; on x86-64 the `syscall` instruction itself, in
//! `asm!`), and `fcntl` on a descriptor number that may
//! not be open (rustix takes only open, borrowed descriptors). `fork` is in [`crate::fork`], for the
//! same reason: rustix has no public fork. Everything else goes through rustix.
//!
//! # Safety
//!
//! Every function here is safe to call; each unsafe block is a single system call (or raw
//! fd adoption) whose preconditions are stated at the block. Nothing here allocates or takes
//! a lock except [`set_identity`], [`adopt_inherited_fd`], [`set_process_name`],
//! [`program_name`] and [`proc_state`], so the other functions may be used in a freshly
//! forked child of a multi-threaded process (they are async-signal-safe: `_exit`, `signal`,
//! `sigaction`, `sigprocmask`, `close_range`/`close`, `fcntl`).
//!
//! The worker identity is a leaked, never-freed `Box`: the pointer stored in [`IDENTITY`]
//! is either null or points to an `Identity` that lives for the rest of the process.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use rustix::io::Errno;

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

/// Makes this process ignore `sig`.
fn ignore(sig: libc::c_int) {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; it is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_IGN);
    }
}

/// Makes SIGTERM end this worker's whole process group at once: the handler sends SIGKILL
/// to the group (the worker leads it), so processes a task started die with the worker even
/// if they ignore SIGTERM, and the pool need not signal a group whose leader it may already
/// have reaped. A task that installs its own SIGTERM handler replaces this one. Installed
/// only in a process that leads its own process group: anywhere else, the group could be
/// someone else's (the pool's, say). `pid`: this process's id.
///
/// A fork server installs it for its workers before it forks them (see
/// `forkserver`): in the server, which leads its own group too, it ends
/// the server as SIGTERM would (its workers die with it, by their parent-death signal).
pub(crate) fn term_kills_group(pid: rustix::process::Pid) {
    if TERM_KILLS_GROUP.load(Ordering::Relaxed) || rustix::process::getpgrp() != pid {
        return;
    }
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
    TERM_KILLS_GROUP.store(true, Ordering::Relaxed);
}

/// Whether this process's SIGTERM handler is [`term_kills_group`]'s: set where it is
/// installed, and inherited with the handler by a fork, whose child need not install it
/// again: every child `fork` makes leads a group of its own, as the forking process does.
static TERM_KILLS_GROUP: AtomicBool = AtomicBool::new(false);

/// The highest signal number on Linux (`_NSIG - 1`).
const SIG_MAX: libc::c_int = 64;

/// The signals a worker ignores besides `SIGPIPE` (see [`worker_signals`]).
const WORKER_IGNORED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTTOU, libc::SIGTTIN];

/// Undoes what a parent's signal settings would leave behind across fork and exec: every
/// ignored signal but `SIGPIPE` (which Rust programs ignore by convention) and those a
/// worker ignores anyway ([`WORKER_IGNORED`]) gets its default action back. An ignored
/// `SIGCHLD` would have the kernel reap this process's children before anyone reads how
/// they ended; an ignored `SIGTERM` would make a terminate wait for its grace period.
/// Handlers are left alone: exec resets them anyway, and a forked worker keeps its
/// parent's, as Python's do.
///
/// Async-signal-safe: only `sigaction` and `signal`.
fn reset_ignored() {
    for sig in 1..=SIG_MAX {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || WORKER_IGNORED.contains(&sig) {
            continue;
        }
        let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: a null new action only queries; `old` is valid for writing. Signal
        // numbers the C library reserves answer EINVAL, which is ignored.
        let r = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
        // SAFETY: `old` was zeroed, and `sigaction` filled it if it succeeded.
        let action = unsafe { old.assume_init() }.sa_sigaction;
        if r == 0 && action == libc::SIG_IGN && sig != libc::SIGPIPE {
            // SAFETY: `signal` with `SIG_DFL` installs no handler code; async-signal-safe.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// The signal settings of a worker: those of [`reset_ignored`], `SIGINT` ignored (Ctrl-C is
/// the parent's to handle) and `SIGTTOU`/`SIGTTIN` ignored (a worker has a process group
/// of its own, which a terminal treats as a background job: with `stty tostop`, its first
/// print would stop it), then no signal blocked. In that order: a program started by
/// spawn runs with every signal blocked until it gets here (see `fork::spawn_exec`), and
/// a `SIGINT` that arrived meanwhile is held pending; ignoring it before the mask opens
/// discards it.
///
/// Async-signal-safe.
pub(crate) fn worker_signals() {
    reset_ignored();
    for sig in WORKER_IGNORED {
        ignore(sig);
    }
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `set` is valid for writing; `sigemptyset` then `sigprocmask` with it only
    // change this thread's mask (the only thread of a freshly forked or started process).
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
    }
}

/// `struct pidfd_info` of `<linux/pidfd.h>` (its first version, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_EXIT`: ask for (and, in the answer, got) the exit status.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The wait status (as `waitpid` gives it) of the exited process behind `pidfd`, kept by
/// the kernel even once the process has been reaped by someone else, or automatically
/// because its parent ignores `SIGCHLD` (Linux 6.15 and later). `None` if the process has
/// not exited or the kernel does not tell.
pub(crate) fn pidfd_wait_status(pidfd: BorrowedFd<'_>) -> Option<i32> {
    pidfd_exit_info(pidfd).flatten()
}

/// [`pidfd_wait_status`], telling apart a kernel that answers `PIDFD_GET_INFO` but has no
/// exit status (yet) for the process (`Some(None)`) from one that does not answer it at
/// all (`None`: older than 6.13).
pub(crate) fn pidfd_exit_info(pidfd: BorrowedFd<'_>) -> Option<Option<i32>> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: `info` is a live, writable `struct pidfd_info` of the size the request
    // number encodes; the kernel writes at most that many bytes into it.
    let r = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            &mut info as *mut PidfdInfo,
        )
    };
    (r == 0).then(|| (info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code))
}

/// Closes every file descriptor from 3 up except those in `keep` (in ascending order).
///
/// Uses `close_range(2)`; on kernels without it, closes one by one up to the fd limit.
/// Async-signal-safe (no allocation).
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let mut first = 3;
    for &k in keep {
        let k = k as u32;
        if k > first {
            close_range(first, k - 1, 0);
        }
        first = first.max(k + 1);
    }
    close_range(first, u32::MAX, 0);
}

/// Marks every file descriptor from 3 up close-on-exec (best effort; async-signal-safe).
pub(crate) fn cloexec_from_3() {
    let _ = try_close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32);
}

fn close_range(first: u32, last: u32, flags: i32) {
    if try_close_range(first, last, flags).is_ok() {
        return;
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 16)
        .min(1 << 20) as u32;
    for fd in first..=last.min(limit) {
        // SAFETY: closing a descriptor number has no memory-safety preconditions; in this
        // process nothing will use the closed descriptors again (see callers).
        unsafe { rustix::io::close(fd as RawFd) };
    }
}

fn try_close_range(first: u32, last: u32, flags: i32) -> io::Result<()> {
    match raw_close_range(first, last, flags) {
        0 => Ok(()),
        r if r < 0 => Err(io::Error::from_raw_os_error(-r as i32)),
        _ => Err(io::Error::from(io::ErrorKind::Other)),
    }
}

/// The raw `close_range` system call: 0, or minus the errno.
///
/// On x86-64 Linux, the `syscall` instruction itself rather than the C library's
/// `syscall()`: a worker forked by a fork server calls this first thing, and the C
/// library's function lies on a page of code that nothing else of a worker's short life
/// needs, which it would fault in (with the pages around it) for this one call.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn raw_close_range(first: u32, last: u32, flags: i32) -> isize {
    let ret: isize;
    // SAFETY: `close_range` takes three integers and touches no memory; `syscall` clobbers
    // only `rcx` and `r11` (declared) and restores the flags.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") libc::SYS_close_range as isize => ret,
            in("rdi") first as usize,
            in("rsi") last as usize,
            in("rdx") flags as usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags),
        );
    }
    ret
}

/// The raw `close_range` system call: 0, or minus the errno.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn raw_close_range(first: u32, last: u32, flags: i32) -> isize {
    // SAFETY: the raw `close_range` system call takes three integers and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if r == -1 {
        -(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOSYS) as isize)
    } else {
        r as isize
    }
}

/// Clears close-on-exec on `fd`, so that exactly this descriptor survives the next exec.
pub(crate) fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` is only named for this one `fcntl(F_SETFD)`, which touches no memory
    // and is async-signal-safe; the borrow ends with the call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?)
}

/// Takes ownership of the descriptor a parent passed across exec, after checking that it
/// is open and a socket, and marks it close-on-exec again.
///
/// # Errors
///
/// `EBADF` if `fd` is not open; `ENOTSOCK` if it is not a socket.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(Errno::BADF.into());
    }
    // libc, not rustix: rustix takes a `BorrowedFd`, which must be open, and whether this
    // number is open is the question.
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
        return Err(Errno::NOTSOCK.into());
    }
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// Sets this process's short name (`comm`, at most 15 bytes: what `ps -e`, `top` and
/// `pgrep` show) to the program's name and `tail` (the concatenation of its parts), e.g.
/// `myprog:w3`: a spawned worker would otherwise be `exe` (it runs `/proc/self/exe`), a
/// forked one its parent's name. The program's name is cut to fit; `tail` is kept. `pid`:
/// this process's id. Best effort.
///
/// Put together in a buffer on the stack, without `format!`: a worker recycled after every
/// task would otherwise fault in the formatting code's pages for this alone.
pub(crate) fn set_process_name(tail: &[&str], pid: rustix::process::Pid) {
    const COMM_MAX: usize = 15;
    let prog = program_name();
    let tail_len: usize = tail.iter().map(|t| t.len()).sum();
    let room = COMM_MAX.saturating_sub(tail_len);
    let mut cut = prog.len().min(room);
    while !prog.is_char_boundary(cut) {
        cut -= 1;
    }
    // The name and its terminating NUL.
    let mut buf = [0u8; COMM_MAX + 1];
    let mut len = 0;
    for part in std::iter::once(&prog[..cut]).chain(tail.iter().copied()) {
        for &b in part.as_bytes() {
            if len < COMM_MAX && b != 0 {
                buf[len] = b;
                len += 1;
            }
        }
    }
    let name = &buf[..len];
    // The process's name is its main thread's; a role entered on another thread (libtest
    // runs tests on one) names the main thread through /proc, then itself. On the main
    // thread (every forked worker: a fork's only thread is its main thread) naming itself
    // is enough, and spares a path lookup in /proc.
    if rustix::thread::gettid() != pid {
        let _ = std::fs::write("/proc/self/comm", name);
    }
    if let Ok(name) = std::ffi::CStr::from_bytes_until_nul(&buf) {
        let _ = rustix::thread::set_name(name);
    }
}

/// The file name of the program (from `argv[0]`), read once: a fork server reads it before
/// it forks, so that its workers find it read.
pub(crate) fn program_name() -> &'static str {
    static PROG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PROG.get_or_init(|| {
        let arg0 = std::env::args_os().next().unwrap_or_default();
        std::path::Path::new(&arg0)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

/// The state letter of a process or thread (`R`, `S`, `T`, `Z`...) from its
/// `/proc/.../stat` file at `path`; `None` if that cannot be read (it is gone, say).
pub(crate) fn proc_state(path: impl AsRef<std::path::Path>) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name, in parentheses, may hold anything: the state follows its last `)`.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The worker's name and pid, once `Setup` arrived.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) name: String,
}

/// Null, or a leaked `Identity` (see the module's safety notes).
static IDENTITY: AtomicPtr<Identity> = AtomicPtr::new(std::ptr::null_mut());

/// Records this process's worker identity (`pid`: this process's id). A previous one is
/// leaked, never freed.
pub(crate) fn set_identity(name: String, pid: rustix::process::Pid) {
    let pid = pid.as_raw_nonzero().get() as u32;
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

/// Thread `tid`'s scheduling, which a child it makes inherits, as bytes to compare: nice
/// value, policy and priority, I/O priority. A call that fails counts as its error.
pub(crate) fn scheduling(tid: rustix::process::Pid) -> Vec<u8> {
    let tid = tid.as_raw_nonzero().get();
    let mut b = Vec::with_capacity(48);
    let mut put = |v: i64| b.extend_from_slice(&v.to_le_bytes());
    // SAFETY: each call below only reads a setting of thread `tid`; the one that writes
    // (sched_getparam) writes to a local.
    unsafe {
        *libc::__errno_location() = 0;
        put(i64::from(libc::getpriority(
            libc::PRIO_PROCESS,
            tid as libc::id_t,
        )));
        put(i64::from(*libc::__errno_location()));
        put(i64::from(libc::sched_getscheduler(tid)));
        let mut p = libc::sched_param { sched_priority: 0 };
        put(i64::from(libc::sched_getparam(tid, &mut p)));
        put(i64::from(p.sched_priority));
        put(libc::syscall(libc::SYS_ioprio_get, 1, tid));
    }
    b
}

/// A child forked to work beside its parent, started on another CPU. A kernel may place a
/// forked child on its parent's CPU and leave it waiting there, while another CPU idles,
/// until the parent blocks or the load balancer's next tick (milliseconds): on a small
/// virtual machine that is most forks. A child that starts beside a parent that goes on
/// working (the seed, made by `init()` while the program goes on to build its first pool) is
/// moved by its parent right after the fork, onto the CPUs this thread may run on other than
/// its own, and puts its affinity back itself ([`Spread::allowed`]) before it does anything
/// a later process could inherit, at a moment ordered after that move.
pub(crate) struct Spread {
    /// This thread's affinity when it forked: the child's, to put back.
    allowed: rustix::thread::CpuSet,
    /// The CPU this thread ran on just before the fork.
    here: usize,
}

impl Spread {
    /// Read just before the fork; `None` when this thread may run on one CPU only (or its
    /// affinity cannot be read).
    pub(crate) fn before_fork() -> Option<Spread> {
        let allowed = rustix::thread::sched_getaffinity(None).ok()?;
        let here = rustix::thread::sched_getcpu();
        (allowed.count() > 1 && allowed.is_set(here)).then_some(Spread { allowed, here })
    }

    /// Moves `child` off the CPU this thread ran on. A failure leaves it where the kernel
    /// put it.
    pub(crate) fn move_child(&self, child: rustix::process::Pid) {
        let mut others = self.allowed;
        others.unset(self.here);
        let _ = rustix::thread::sched_setaffinity(Some(child), &others);
    }

    /// The affinity the child puts back.
    pub(crate) fn allowed(&self) -> rustix::thread::CpuSet {
        self.allowed
    }
}
