//! Start methods for procpool workers: fork, spawn and forkserver.
//!
//! pool-spawn starts, signals and reaps one worker and hands back its pool-ipc channel. It
//! never schedules tasks: that is pool-core's work, above it. Below it, pool-ipc carries
//! the frames. This crate also defines what crosses the process boundary: the
//! [`task`] functions (a zero-sized fn item or closure, named on the wire by an
//! [`FnRef`](task::FnRef)) and the [`protocol`] messages a worker understands.
//!
//! # Start methods
//!
//! - [`StartMethod::Forkserver`] (the default): [`Launcher::new`] starts one fork server; it
//!   is a fresh, single-threaded process, and forks every worker on request. It passes back
//!   the worker's channel and a pidfd, reaps its workers and reports their exit status. The
//!   server is forked from the program's *seed* (below) when it can be, else spawned.
//! - [`StartMethod::Spawn`]: re-execute the current executable (`/proc/self/exe`) for each
//!   worker.
//! - [`StartMethod::Fork`]: fork the calling process.
//!
//! Every worker runs in its own process group (so a group signal reaches what it started),
//! gets `SIGKILL` when its parent dies (`PR_SET_PDEATHSIG`, then a recheck of the parent
//! pid; end of file on its channel is the backstop), ignores `SIGINT` (Ctrl-C is the
//! parent's to handle) and `SIGTTOU`/`SIGTTIN` (so that printing to a terminal with `stty
//! tostop` does not stop it), inherits no other ignored or blocked signal, reads stdin from
//! `/dev/null`, and holds no descriptor but its channel and stdio. [`current_process`] tells a worker its name and pid.
//!
//! # `init()` and test binaries
//!
//! Spawn (and the fork server, which spawn starts) re-executes the program, so the program
//! must recognise its role before doing anything else: call [`init`] on the first line of
//! `main`. In a worker it never returns; in the parent it returns at once. Whatever `main`
//! does before `init()` also happens in every spawned process.
//!
//! In the parent, `init()` also makes the *seed*: a copy of the program forked there and
//! then, while the program has one thread and has done nothing yet, that waits for the
//! program's Forkserver pools and forks each one's server (a child of the program, given the
//! program's present working directory, stdout and stderr). A fork of the seed spares the
//! server's exec and start-up, most of a Forkserver pool's start. Before each, the program
//! and the seed are compared in everything else a child inherits: the environment, user
//! and groups, capabilities, seccomp filters and `no_new_privs`, umask, namespaces, cgroup,
//! root directory, resource limits, scheduling, CPU and memory placement, security label
//! (the seed reads the program's in `/proc`). Where the program changed any since `init()`,
//! the server is spawned, as it is when there is no seed: `init()` found other threads
//! running, `/proc` is unreadable, or the environment says `PROCPOOL_SEED=0`. The seed is
//! one more child process for the whole life of the program (named `<program>:seed`; it
//! ends with the program): a program that waits for all its children to end should set
//! `PROCPOOL_SEED=0`.
//!
//! The re-executed child finds `__PROCPOOL_ROLE=<role>:<parent pid>:<fd>` in its
//! environment, and acts on it only if its parent pid matches (a grandchild inheriting the
//! variable ignores it). If a child never answers (its `main` does not call `init()`), the
//! launch fails with [`ErrorKind::InitNotCalled`] after
//! [`LaunchOptions::handshake_timeout`], and the child is killed and reaped; a child that
//! reaches [`Launcher::new`] without having entered its role exits at once.
//!
//! Test binaries have no `main` of their own: libtest offers no hook before it dispatches
//! tests. Put [`enable_test_support!()`] at the root of the test crate. It defines a test
//! named `procpool_worker_entry` that enters the role. When the parent process never called
//! `init()` on its main thread (as in a test binary), pool-spawn re-executes it with the
//! libtest arguments `procpool_worker_entry --nocapture --test-threads=1 -q
//! --include-ignored`, so the child runs that one test (a substring filter; the name is
//! [`LaunchOptions::test_entry`]), which never returns. This works under
//! `cargo test` and `cargo nextest run` (which runs each test in its own process, and
//! whose processes re-execute the binary the same way). Each child prints libtest's
//! "running 1 test" line on its stdout.
//!
//! # Fork safety
//!
//! Forking copies only the calling thread. If another thread holds a lock at that moment
//! (in the allocator, in `stdout`, in a logger), it stays locked forever in the child. The
//! rule here:
//!
//! - The fork server is spawned, or forked from the seed, which `init()` forks only while
//!   the program has one thread: it is single-threaded whatever the parent is; forkserver
//!   workers are always forked from a single-threaded process. (In a test binary
//!   the server runs on libtest's test thread while libtest's main thread waits, parked,
//!   for that test to end.)
//! - [`Launcher::new`] with [`StartMethod::Fork`] counts the threads in `/proc/self/task`
//!   and refuses with [`ErrorKind::ForkUnsafe`] if there is more than one, unless
//!   [`LaunchOptions::allow_fork_with_threads`] is set. procpool's own spawner thread (below)
//!   is not counted while it is parked waiting for work, since it holds no lock then; nor
//!   is a worker's channel watcher (a worker's own pool), parked in its `poll`.
//! - Later launches (a pool starts replacements from its own thread, so by then the
//!   process has threads) carry that risk; a warning is logged once when other threads
//!   exist.
//! - The forked child makes only async-signal-safe system calls until it enters the worker
//!   loop, and on a setup error it calls `_exit`: it never unwinds into the parent's code.
//!   It closes every descriptor but stdio and its channel, including descriptors that
//!   the parent's statics own.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked a child exits. Workers and the fork
//! server are therefore forked from the main thread when it is the one launching, and
//! otherwise from a dedicated, never-ending thread of the parent ("procpool-spawner"). A
//! `Fork` worker then runs on a copy of that thread. (A launch from another thread means the
//! process is multi-threaded anyway, so this adds no fork risk.)
//!
//! # Example
//!
//! ```no_run
//! use pool_ipc::Duplex;
//! use pool_spawn::protocol::{self, channel_config, FromWorker, ImageId, ToWorker};
//! use pool_spawn::task::{self, ItemError};
//! use pool_spawn::{Launcher, LaunchOptions, StartMethod};
//! use serde_bytes::ByteBuf;
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     pool_spawn::init(); // a worker never gets past this line
//!
//!     let mut launcher = Launcher::new(StartMethod::Forkserver, LaunchOptions::default())?;
//!     let mut worker = launcher.launch("ForkserverPoolWorker-1")?;
//!     let mut chan: Duplex<ToWorker, FromWorker> = Duplex::with_config(worker.take_channel().unwrap(), channel_config())?;
//!     let image = ImageId::current();
//!     chan.send(&ToWorker::Setup { name: worker.name().into(), max_tasks: None, image, init: None, progress: None, limits: Default::default() })?;
//!     assert!(matches!(chan.recv()?, FromWorker::Ready { .. }));
//!
//!     let args: Vec<(u64,)> = vec![(3,), (4,)];
//!     let payload = ByteBuf::from(postcard::to_allocvec(&args)?);
//!     chan.send(&ToWorker::Run { id: 1, func: task::batch_ref(square), timed: false, payload })?;
//!     if let FromWorker::Done { id: 1, items, outcome: Ok(bytes) } = chan.recv()? {
//!         let mut results: Vec<Result<u64, ItemError>> = Vec::new();
//!         protocol::decode_results(items, &bytes, &mut results)?;
//!         assert_eq!(results, vec![Ok(9), Ok(16)]);
//!     }
//!
//!     chan.send(&ToWorker::Exit)?;
//!     assert!(worker.wait()?.success());
//!     launcher.shutdown()?;
//!     Ok(())
//! }
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "pool-spawn (procpool's start methods) runs on Linux only: it watches workers through \
     pidfds, ties their lives to the parent with PR_SET_PDEATHSIG, and re-executes \
     /proc/self/exe"
);

use std::sync::atomic::{AtomicBool, Ordering};

mod child;
mod error;
mod fork;
mod forkserver;
mod launcher;
mod plain;
pub mod protocol;
mod role;
mod runner;
mod seed;
mod spawn;
mod status;
mod sys;
pub mod task;
mod watch;
mod worker;

/// Helpers for `procpool bench`'s floors (the machine's own costs, measured beside the
/// pool). Not part of the API.
#[doc(hidden)]
pub mod bench_support {
    /// Forks a child that only calls `_exit(0)` and waits for it (bare fork, no exec).
    ///
    /// # Errors
    ///
    /// The `fork` or `waitpid` error, or an error if the child did not exit with 0.
    pub fn bare_fork_exit_wait() -> std::io::Result<()> {
        crate::fork::bare_fork_exit_wait()
    }
}

#[doc(hidden)]
pub use error::Chain;
pub use error::{Error, ErrorKind, Result};
pub use launcher::{Launch, LaunchOptions, Launcher, Progress, StartMethod, Starting};
pub use rustix::process::Signal;
pub use status::{ExitStatus, signal_name};
pub use worker::Worker;

use role::{Marker, Role};

/// The name of the test [`enable_test_support!`] defines.
pub(crate) const TEST_ENTRY: &str = "procpool_worker_entry";

/// Exit code of a child started for a role whose `main` reached [`Launcher::new`] without
/// calling [`init`] first.
pub const EXIT_INIT_NOT_CALLED: i32 = 5;

/// Set by [`init`] on the main thread: this program's `main` calls it, so re-executed
/// children need no libtest arguments.
static INIT_CALLED: AtomicBool = AtomicBool::new(false);
/// Set when this process entered a role (worker, fork server) from its marker.
static ROLE_ENTERED: AtomicBool = AtomicBool::new(false);

/// The entry hook: call it on the first line of `main`.
///
/// If this process was started by pool-spawn as a worker or a fork server, it runs that
/// role and exits the process: it never returns. Otherwise it records that `main` calls
/// it, makes the seed (see the crate docs, "`init()` and test binaries") and returns.
///
/// # Examples
///
/// ```no_run
/// // The first line of `main`:
/// pool_spawn::init();
/// // … build pools, do the work …
/// ```
pub fn init() {
    let main_thread = rustix::thread::gettid() == rustix::process::getpid();
    if main_thread {
        INIT_CALLED.store(true, Ordering::Relaxed);
    }
    enter_role();
    // The parent (a process in a role never gets here).
    if main_thread && !SEED_PLANTED.swap(true, Ordering::Relaxed) {
        seed::plant();
    }
}

/// The process id of the seed [`init`] made (see the crate docs), or `None` if this process
/// has none (no `init()` yet, other threads were running then, `PROCPOOL_SEED=0`, or the
/// seed was made by the process this one is a fork of).
///
/// The seed is a child of this process for as long as the process lives. A program that
/// waits for, or ends, its children itself (a `waitpid(-1)` loop, a sweep of whatever
/// children are left before exiting) should leave this one alone: it ends by itself when
/// the program does, and Forkserver pools built after it is gone execute their servers.
///
/// # Examples
///
/// ```no_run
/// pool_spawn::init();
/// if let Some(pid) = pool_spawn::seed_pid() {
///     println!("the seed is process {pid}: not one of ours to reap");
/// }
/// ```
pub fn seed_pid() -> Option<u32> {
    seed::pid().map(|p| p.as_raw_nonzero().get() as u32)
}

/// Whether `init()` has made (or tried to make) the seed; once per process.
static SEED_PLANTED: AtomicBool = AtomicBool::new(false);

/// The body of the test [`enable_test_support!`] defines: like [`init`], but it does not
/// mark the process as one whose `main` calls `init()`.
#[doc(hidden)]
pub fn __test_entry() {
    enter_role();
}

/// Defines the test `procpool_worker_entry`, through which re-executed test binaries
/// become workers or fork servers. Put it once at the root of every test crate that
/// starts workers by spawn or forkserver.
///
/// When run as an ordinary test it does nothing and passes.
///
/// # Examples
///
/// ```ignore
/// // tests/it/main.rs
/// pool_spawn::enable_test_support!();
/// ```
#[macro_export]
macro_rules! enable_test_support {
    () => {
        #[test]
        fn procpool_worker_entry() {
            $crate::__test_entry();
        }
    };
}

/// Whether this program's `main` called [`init`].
pub(crate) fn init_called() -> bool {
    INIT_CALLED.load(Ordering::Relaxed)
}

fn enter_role() {
    // Identify the executable image now, at start-up.
    let _ = protocol::ImageId::current();
    let Some(marker) = Marker::from_env() else {
        return;
    };
    if rustix::process::getppid() != Some(marker.ppid) {
        // Addressed to our parent's generation: we inherited it. Unless we are that child
        // and the parent died a moment ago (the death signal is already on its way).
        if rustix::process::parent_process_death_signal() == Ok(Some(Signal::KILL)) {
            sys::exit_now(0);
        }
        return;
    }
    ROLE_ENTERED.store(true, Ordering::Relaxed);
    let sock = match sys::adopt_inherited_fd(marker.fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "procpool: started as {:?} but fd {} is unusable: {e}",
                marker.role, marker.fd
            );
            sys::flush_and_exit(protocol::EXIT_PROTOCOL)
        }
    };
    if role::send_hello(&sock, marker.role).is_err() {
        // The parent is gone already.
        sys::exit_now(0);
    }
    match marker.role {
        Role::Worker => {
            sys::worker_signals();
            runner::run(sock)
        }
        Role::Forkserver => forkserver::serve(sock),
    }
}

/// Exits at once if this process was started for a role it never entered: its `main`
/// does not call [`init`] first, and must not act as a parent.
pub(crate) fn refuse_unentered_worker() {
    if ROLE_ENTERED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(m) = Marker::for_this_process() {
        eprintln!(
            "procpool: process {} was started as a procpool {:?} but did not call \
             procpool::init() first in main (or lacks enable_test_support!() in a test \
             binary); exiting",
            std::process::id(),
            m.role
        );
        sys::flush_and_exit(EXIT_INIT_NOT_CALLED);
    }
}

/// Who this process is, in pool terms: Python's `multiprocessing.current_process()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    name: &'static str,
    pid: u32,
    worker: bool,
}

impl ProcessInfo {
    /// `"MainProcess"`, or the worker's name (`"SpawnPoolWorker-2"`).
    pub fn name(&self) -> &str {
        self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether this process is a pool worker (its setup arrived).
    pub fn is_worker(&self) -> bool {
        self.worker
    }
}

/// This process's name and pid: in a worker its name from `Setup`, elsewhere
/// `"MainProcess"`.
///
/// # Examples
///
/// ```
/// let me = pool_spawn::current_process();
/// assert_eq!(me.name(), "MainProcess");
/// assert!(!me.is_worker());
/// ```
pub fn current_process() -> ProcessInfo {
    let pid = std::process::id();
    match sys::identity() {
        Some(id) if id.pid == pid => ProcessInfo {
            name: id.name.as_str(),
            pid,
            worker: true,
        },
        _ => ProcessInfo {
            name: "MainProcess",
            pid,
            worker: false,
        },
    }
}
