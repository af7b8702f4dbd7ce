//! The seed: a copy of the program made by [`init`](crate::init), from which each
//! Forkserver pool's server is forked instead of executed afresh.
//!
//! A fork server must be a fresh, single-threaded process that has run nothing of the
//! program's but what precedes `init()`. Executing the program again gives one, at the price
//! of an exec and of the C library's and Rust's start-up in it (on a virtual machine, most of
//! that price is the C library asking the processor for its features, an instruction the
//! hypervisor traps). But the program itself is such a process at the moment `init()` runs
//! on the first line of `main`, while it has one thread. So `init()` forks it there, once:
//! the seed. The seed waits; each Forkserver pool asks it for a server, and it forks one
//! (a fork of a process that has done nothing yet), made a child of the program
//! (`CLONE_PARENT`), so the pool waits for, signals and reaps it as it does a server it
//! executed.
//!
//! What an executed server takes from the program when the pool is built, a forked one must
//! take too, although the seed was made earlier:
//!
//! - passed with each request and taken by the new server before it serves: the working
//!   directory, stdout and stderr, as they are now;
//! - compared: the environment (by the program), and whatever else the program may have
//!   changed since `init()` and a child inherits (a [`Context`]: its user and groups,
//!   capabilities, seccomp filters, `no_new_privs`, umask, namespaces, cgroup, root
//!   directory, resource limits, OOM score, nice value and scheduling policy, I/O priority,
//!   CPU and memory placement, speculation controls, security label). The seed reads the
//!   asking thread's in `/proc` itself, and compares it with its own: a program that gave up
//!   a right after `init()` (a user, a capability, a filter) cannot ask the seed, which kept
//!   it, for a server that has it. If any differs, the pool executes its server as before.
//!   Not compared, as `/proc` shows them to another process only with the right to trace it:
//!   the personality, the secure bits and the timer slack.
//!
//! The seed forks the server before it compares, so that the two run at once: the server
//! takes what the request passed and forks its first spare worker, and more up to the
//! workers the pool asks for at once while the verdict has not come, while the seed reads
//! the program's context. Until the seed's verdict, on a pipe, it has read nothing from its
//! control socket and said no hello: the program can have nothing from it. A server refused
//! kills and reaps its spares and exits, and the program, told its pid, reaps it.
//!
//! No seed is made when `init()` finds other threads already running, when `/proc` cannot be
//! read, or when `PROCPOOL_SEED=0` is set; a seed that is gone or fails is reaped and not
//! asked again. Pools then execute their servers.
//!
//! The seed lives as long as the program: it ends at end of file on its socket (the program
//! ended or executed another program) and by its parent-death signal.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::process::Pid;

use crate::child::ChildProc;
use crate::role::Role;
use crate::sys;

/// Set to `0` to make no seed: every Forkserver pool then executes its server.
pub(crate) const SEED_ENV: &str = "PROCPOOL_SEED";

/// A request: a tag, then the id of the program's thread that asks (whose context the seed
/// compares with its own), then how many workers the pool will ask its server for at once
/// (which the server forks ahead while the seed compares, as far as time allows).
const REQUEST_LEN: usize = 6;

/// How long a pool waits for the seed's answer before giving it up.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Descriptors passed with a request: the new server's end of its control socket, the
/// working directory, stdout, stderr.
const REQUEST_FDS: usize = 4;

/// The first byte of a request.
const REQUEST_TAG: u8 = 1;

struct Seed {
    /// The process that made it (a fork of the program does not use its parent's seed).
    owner: Pid,
    sock: OwnedFd,
    child: ChildProc,
    /// The environment when the seed was made.
    env: Vec<(OsString, OsString)>,
}

static SEED: Mutex<Option<Seed>> = Mutex::new(None);

/// Makes the seed, if this process can have one (called by `init()` in a process that
/// entered no role, on its main thread). Failures only mean no seed.
pub(crate) fn plant() {
    if std::env::var_os(SEED_ENV).is_some_and(|v| v == "0") {
        return;
    }
    // One thread: another could hold a lock the copy would inherit held.
    if crate::launcher::num_threads() != Some(1) {
        return;
    }
    let env = std::env::vars_os().collect();
    let Ok((ours, theirs)) = crate::forkserver::control_socketpair() else {
        return;
    };
    // Read once here, rather than in each server and worker (each puts it in its name).
    sys::program_name();
    // The program goes on (to build its first pool, often) while the seed readies itself:
    // the seed is moved to another CPU to do it (see `sys::Spread`), and puts its affinity
    // back at its first request.
    let spread = sys::Spread::before_fork();
    *AFFINITY.lock().unwrap_or_else(PoisonError::into_inner) =
        spread.as_ref().map(sys::Spread::allowed);
    let forked = crate::fork::fork_seed(theirs, serve);
    AFFINITY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match forked {
        Ok(pid) => {
            if let Some(spread) = &spread {
                spread.move_child(pid);
            }
            let seed = Seed {
                owner: rustix::process::getpid(),
                sock: ours,
                child: ChildProc::adopt(pid),
                env,
            };
            *SEED.lock().unwrap_or_else(PoisonError::into_inner) = Some(seed);
        }
        Err(e) => tracing::debug!(error = %e, "no seed: the fork failed"),
    }
}

/// The seed's pid, if this process made one (see [`crate::seed_pid`]).
pub(crate) fn pid() -> Option<Pid> {
    let g = SEED.lock().unwrap_or_else(PoisonError::into_inner);
    let seed = g.as_ref()?;
    (seed.owner == rustix::process::getpid()).then(|| seed.child.pid())
}

/// A fork server forked by the seed, begun (its hello not read yet), or `None` when there is
/// no seed, this process has changed since it was made in a way a server would inherit, or
/// the seed failed: the caller then executes a server. `ahead`: how many workers the pool
/// asks the server for at once.
pub(crate) fn begin_server(timeout: Duration, ahead: usize) -> Option<crate::spawn::Pending> {
    let mut g = SEED.lock().unwrap_or_else(PoisonError::into_inner);
    let seed = g.as_mut()?;
    if seed.owner != rustix::process::getpid() {
        return None;
    }
    // A server forked from the seed has the environment of `init()`'s time.
    if !std::env::vars_os().eq(seed.env.iter().cloned()) {
        tracing::debug!("the fork server is executed: the environment changed since init()");
        return None;
    }
    // The seed reads this thread's context in /proc itself (it need not trust what it is
    // told) and compares it with its own, the program's when it was made.
    let mut request = [0u8; REQUEST_LEN];
    request[0] = REQUEST_TAG;
    request[1..5].copy_from_slice(
        &rustix::thread::gettid()
            .as_raw_nonzero()
            .get()
            .to_le_bytes(),
    );
    request[5] = u8::try_from(ahead).unwrap_or(u8::MAX);
    let (ours, theirs) = crate::forkserver::control_socketpair().ok()?;
    let cwd = rustix::fs::open(
        c".",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    // Closed stdout or stderr: the executed server would have none either; leave it to that.
    let out = open_fd(rustix::stdio::stdout())?;
    let err = open_fd(rustix::stdio::stderr())?;
    let fds = [theirs.as_fd(), cwd.as_fd(), out, err];
    let answer = pool_ipc::fdpass::send_fds(seed.sock.as_fd(), &request, &fds)
        .ok()
        .and_then(|()| read_answer(seed.sock.as_fd(), timeout.min(ANSWER_WITHIN)));
    drop((theirs, cwd));
    match answer {
        Some(Ok(pid)) => {
            tracing::debug!(
                pid = pid.as_raw_nonzero().get(),
                "fork server forked by the seed"
            );
            Some(crate::spawn::Pending::adopted(
                ours,
                ChildProc::adopt(pid),
                Role::Forkserver,
                timeout,
            ))
        }
        Some(Err(Refused::Changed(part))) => {
            tracing::debug!(
                differs = part,
                "the fork server is executed: this process changed since init()"
            );
            None
        }
        Some(Err(Refused::Errno(errno))) => {
            tracing::debug!(errno, "the seed could not fork a server");
            None
        }
        None => {
            // Gone, stopped or confused: given up for good, reaped.
            let mut seed = g.take().expect("checked above");
            tracing::debug!(
                pid = seed.child.pid().as_raw_nonzero().get(),
                "the seed does not answer; fork servers are executed from now on"
            );
            let _ = seed.child.kill_and_reap(Duration::from_secs(2));
            None
        }
    }
}

/// `fd` if it is open.
fn open_fd(fd: BorrowedFd<'static>) -> Option<BorrowedFd<'static>> {
    rustix::io::fcntl_getfd(fd).ok().map(|_| fd)
}

/// Why the seed forked no server.
enum Refused {
    /// The program's context differs from the seed's in this part.
    Changed(&'static str),
    /// The fork failed with this errno.
    Errno(i32),
}

/// The seed's answer: the new server's pid, or why there is none; `None` if the seed ended,
/// failed or did not answer within `within`. A server forked and then refused is reaped
/// here (it is this process's child; it exits by itself).
fn read_answer(sock: BorrowedFd<'_>, within: Duration) -> Option<Result<Pid, Refused>> {
    if !crate::child::poll_readable(sock, Some(within)).ok()? {
        return None;
    }
    let mut b = [0u8; ANSWER_LEN];
    match rustix::net::recv(sock, &mut b, rustix::net::RecvFlags::DONTWAIT) {
        Ok((ANSWER_LEN, _)) => {
            let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let part = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
            let server = Pid::from_raw(i32::from_le_bytes([b[8], b[9], b[10], b[11]]));
            if v == 0 {
                return server.map(Ok);
            }
            if let Some(server) = server {
                drop(ChildProc::adopt(server));
            }
            if v == -libc::ESTALE {
                Some(Err(Refused::Changed(
                    PART_NAMES.get(part).copied().unwrap_or("?"),
                )))
            } else {
                Some(Err(Refused::Errno(-v)))
            }
        }
        _ => None,
    }
}

/// The seed's answer: an `i32`, `0` if the server may serve, or a negative errno
/// (`-ESTALE`: the program's context differs, in the part whose index follows as a `u32`);
/// then the pid of the server it forked (`0` if none), which the program reaps whatever
/// the verdict.
const ANSWER_LEN: usize = 12;

/// The program's affinity when it made the seed, for the seed to put back (its parent moved
/// it to another CPU to start: see [`plant`]); set only around the fork.
static AFFINITY: Mutex<Option<rustix::thread::CpuSet>> = Mutex::new(None);

/// The seed's loop: a server forked for each request; never returns.
fn serve(ctl: OwnedFd) -> ! {
    let me = rustix::process::getpid();
    sys::set_process_name(&[":seed"], me);
    let mut affinity = AFFINITY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    // The program's as it was at `init()`, which this copy keeps (it never changes): read at
    // the first request, once its server is forked and starting beside it, rather than now,
    // when the seed's start would compete with the program's own (a first pool built soon
    // after `init()` then waited for it).
    let mut ours: Option<Option<Context>> = None;
    let program = rustix::process::getppid();
    let mut buf = [0u8; REQUEST_LEN + 1];
    loop {
        let (n, fds) = match pool_ipc::fdpass::recv_fds(ctl.as_fd(), &mut buf, REQUEST_FDS) {
            // The program ended, or executed another: the seed is of no more use.
            Ok((0, _)) => sys::exit_now(0),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => sys::exit_now(0),
        };
        if rustix::process::getppid() != program {
            sys::exit_now(0);
        }
        let (asker, ahead) = match (&buf[..n], fds.len(), program) {
            (&[REQUEST_TAG, a, b, c, d, ahead], REQUEST_FDS, Some(program)) => (
                Pid::from_raw(i32::from_le_bytes([a, b, c, d])).map(|tid| (program, tid)),
                usize::from(ahead),
            ),
            _ => (None, 0),
        };
        let Some((program, tid)) = asker else {
            answer(&ctl, -libc::EINVAL, 0, None);
            continue;
        };
        // The program's affinity, put back before the seed reads its own context or forks:
        // the program moved the seed before it could send this request. (Not put back, the
        // seed's context differs from the program's, and pools execute their servers.)
        if let Some(set) = affinity.take() {
            let _ = rustix::thread::sched_setaffinity(None, &set);
        }
        // The server is forked first: it readies itself (and forks its first spares) while
        // the seed reads the asking thread's context and compares it with its own (a
        // program that gave up some right since `init()` cannot have it back through the
        // seed, whatever it says). Until the seed's verdict on a pipe, the server has read
        // nothing from its control socket nor said hello; on any verdict but the open gate
        // it exits.
        let Ok((gate_r, gate_w)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) else {
            answer(&ctl, -libc::EMFILE, 0, None);
            continue;
        };
        // Moved to another CPU to start while the seed compares (see `sys::Spread`): it puts
        // its affinity back once the gate opens.
        let spread = sys::Spread::before_fork();
        let server = match crate::fork::fork_sibling() {
            Ok(None) => {
                drop(gate_w);
                become_server(
                    fds,
                    gate_r,
                    program,
                    ahead,
                    spread.as_ref().map(sys::Spread::allowed),
                )
            }
            Ok(Some(pid)) => {
                if let Some(spread) = &spread {
                    spread.move_child(pid);
                }
                pid
            }
            Err(e) => {
                answer(&ctl, -e.raw_os_error().unwrap_or(libc::EIO), 0, None);
                continue;
            }
        };
        drop((fds, gate_r));
        // A context that cannot be read (`/proc` unreadable, or no such thread of the
        // program) cannot be told equal.
        let ours = ours.get_or_insert_with(|| Context::of(me, me));
        let differs = match (Context::of(program, tid), &*ours) {
            (Some(theirs), Some(ours)) => theirs.first_difference(ours),
            _ => Some(0),
        };
        let (value, part) = match differs {
            None => {
                let _ = rustix::io::write(&gate_w, &[crate::forkserver::GATE_OPEN]);
                (0, 0)
            }
            Some(part) => (-libc::ESTALE, part as u32),
        };
        drop(gate_w);
        answer(&ctl, value, part, Some(server));
    }
}

/// Sends the answer to a request (see [`ANSWER_LEN`]); the seed ends if the program is gone.
fn answer(ctl: &OwnedFd, value: i32, part: u32, server: Option<Pid>) {
    let mut b = [0u8; ANSWER_LEN];
    b[..4].copy_from_slice(&value.to_le_bytes());
    b[4..8].copy_from_slice(&part.to_le_bytes());
    b[8..].copy_from_slice(&server.map_or(0, |p| p.as_raw_nonzero().get()).to_le_bytes());
    if rustix::net::send(ctl, &b, rustix::net::SendFlags::NOSIGNAL).is_err() {
        sys::exit_now(0);
    }
}

/// The server's gate, kept for [`serve_forked`] (the server is single-threaded).
static GATE: Mutex<Option<crate::forkserver::Gate>> = Mutex::new(None);

/// The seed's child for one request: takes the program's present working directory, stdout
/// and stderr, is prepared as a fork server's worker is (its own group, the parent-death
/// signal, no other descriptor but `gate`; a worker's signal settings and stdin the seed
/// took when it was made), then serves as a fork server once the seed's verdict on `gate`
/// allows it; never returns.
fn become_server(
    fds: Vec<OwnedFd>,
    gate: OwnedFd,
    program: Pid,
    ahead: usize,
    affinity: Option<rustix::thread::CpuSet>,
) -> ! {
    let [ctl, cwd, out, err]: [OwnedFd; REQUEST_FDS] = match fds.try_into() {
        Ok(a) => a,
        Err(_) => sys::exit_now(crate::protocol::EXIT_PROTOCOL),
    };
    let taken = rustix::stdio::dup2_stdout(&out).is_ok()
        && rustix::stdio::dup2_stderr(&err).is_ok()
        && rustix::process::fchdir(&cwd).is_ok();
    if !taken {
        sys::exit_now(0)
    }
    drop((cwd, out, err));
    let keep = std::os::fd::AsRawFd::as_raw_fd(&gate);
    *GATE.lock().unwrap_or_else(PoisonError::into_inner) = Some((gate, ahead, affinity));
    crate::fork::serve_inherited(ctl, keep, program, serve_forked)
}

/// A fork server forked by the seed, prepared: serves once the seed's verdict allows it.
fn serve_forked(ctl: OwnedFd) -> ! {
    match GATE.lock().unwrap_or_else(PoisonError::into_inner).take() {
        Some(gate) => crate::forkserver::serve_gated(ctl, gate),
        None => sys::exit_now(crate::protocol::EXIT_PROTOCOL),
    }
}

/// What a child inherits from this process (the calling thread) beyond what a request
/// passes: compared between the program when a pool is built and the seed (the program
/// when `init()` made it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Context {
    /// One per [`PART_NAMES`], in order.
    parts: Vec<Vec<u8>>,
}

/// The names of a [`Context`]'s parts, in order.
const PART_NAMES: &[&str] = &[
    "status",
    "cgroup",
    "oom_score_adj",
    "security label",
    "namespaces",
    "resource limits",
    "root directory",
    "scheduling",
];

/// The lines of a thread's `status` in `/proc` that a child inherits.
const STATUS_FIELDS: &[&str] = &[
    "Umask",
    "Uid",
    "Gid",
    "Groups",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "Cpus_allowed_list",
    "Mems_allowed_list",
    "Speculation_Store_Bypass",
    "SpeculationIndirectBranch",
    "THP_enabled",
];

/// The namespaces a child is made in (links in the thread's `ns` directory).
const NAMESPACES: &[&str] = &[
    "ns/cgroup",
    "ns/ipc",
    "ns/mnt",
    "ns/net",
    "ns/pid_for_children",
    "ns/time_for_children",
    "ns/user",
    "ns/uts",
];

impl Context {
    /// Thread `tid` of process `pid`'s, as `/proc` shows it, or `None` if it cannot be read
    /// (or `tid` is not a thread of `pid`). (About 20 system calls: it is read each time a
    /// Forkserver pool is built.)
    pub(crate) fn of(pid: Pid, tid: Pid) -> Option<Context> {
        let dir = format!(
            "/proc/{}/task/{}",
            pid.as_raw_nonzero(),
            tid.as_raw_nonzero()
        );
        let dir = rustix::fs::open(
            dir.as_str(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        let mut parts = Vec::with_capacity(PART_NAMES.len());
        let mut buf = [0u8; 8192];
        let status = read_proc(&dir, c"status", &mut buf)?;
        let mut kept = Vec::with_capacity(512);
        for line in status.split(|&c| c == b'\n') {
            let name = line.split(|&c| c == b':').next().unwrap_or_default();
            if STATUS_FIELDS.iter().any(|f| f.as_bytes() == name) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        parts.push(kept);
        parts.push(read_proc(&dir, c"cgroup", &mut buf)?.to_vec());
        parts.push(read_proc(&dir, c"oom_score_adj", &mut buf)?.to_vec());
        // No security module, or one that shows no label: the same either way.
        parts.push(
            read_proc(&dir, c"attr/current", &mut buf)
                .unwrap_or_default()
                .to_vec(),
        );
        let mut ns = Vec::with_capacity(NAMESPACES.len() * 24);
        for n in NAMESPACES {
            // A kernel without this kind of namespace: the same either way.
            if let Ok(link) = rustix::fs::readlinkat(&dir, *n, Vec::new()) {
                ns.extend_from_slice(link.as_bytes());
            }
            ns.push(0);
        }
        parts.push(ns);
        parts.push(read_proc(&dir, c"limits", &mut buf)?.to_vec());
        let root = rustix::fs::statat(&dir, c"root/", rustix::fs::AtFlags::empty()).ok()?;
        let mut r = root.st_dev.to_le_bytes().to_vec();
        r.extend_from_slice(&root.st_ino.to_le_bytes());
        parts.push(r);
        parts.push(sys::scheduling(tid));
        debug_assert_eq!(parts.len(), PART_NAMES.len());
        Some(Context { parts })
    }

    /// The index of the first part in which `self` differs from `other`, if any.
    fn first_difference(&self, other: &Context) -> Option<usize> {
        self.parts
            .iter()
            .zip(&other.parts)
            .position(|(a, b)| a != b)
    }
}

/// The contents of the small `/proc` file `name` in `dir`, read into `buf` (without
/// allocating).
fn read_proc<'a>(dir: &OwnedFd, name: &std::ffi::CStr, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    let fd = rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let mut n = 0;
    loop {
        match rustix::io::read(&fd, &mut buf[n..]) {
            Ok(0) => return Some(&buf[..n]),
            Ok(k) => {
                n += k;
                if n == buf.len() {
                    // Longer than any of these files should be: not compared.
                    return None;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_is_stable_and_names_what_differs() {
        let me = rustix::process::getpid();
        let tid = rustix::thread::gettid();
        let a = Context::of(me, tid).expect("/proc is readable here");
        assert_eq!(a, Context::of(me, tid).unwrap());
        assert_eq!(a.parts.len(), PART_NAMES.len());
        // Not a thread of this process.
        assert!(Context::of(me, rustix::process::Pid::from_raw(1).unwrap()).is_none());
        let mut c = Context::of(me, tid).unwrap();
        c.parts[4].push(b'!');
        let i = c.first_difference(&a).expect("a part differs");
        assert_eq!(PART_NAMES[i], "namespaces");
    }
}
