//! [`PoolBuilder`]: a pool's settings, and `build`, which starts its workers and driver.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_spawn::protocol;
use pool_spawn::task::{self, FnRef, InitOutput, TaskFn};
use pool_spawn::{LaunchOptions, Launcher, StartMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::driver::{Driver, Settings, Shared};
use crate::error::{BuildError, FdLimit};
use crate::event::{self, Pins};
use crate::policy::{Policy, PolicyConfig};
use crate::pool::Pool;

/// Tasks in flight per worker before the pool knows how long tasks take, and when they take
/// 20 ms or more: one, so that no task waits behind a long one while another worker
/// idles (as with Python's shared queue). Shorter tasks get more (see `Policy::observe`).
pub(crate) const IN_FLIGHT: usize = 1;
/// ... and when they are tiny: enough that a worker answering brief tasks in batches (it
/// holds answers back while more requests wait) always has the next batch waiting.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;
/// Chunks an `imap` keeps in the pool per worker (read ahead of what was consumed) at
/// least...
pub(crate) const IMAP_WINDOW_PER_WORKER: usize = 32;
/// ... and at most, when its chunks are so brief that each worker may hold more of them
/// (see `Policy::observe`) and their arguments are small (see [`IMAP_BYTES_PER_WORKER`]).
pub(crate) const IMAP_WINDOW_MAX_PER_WORKER: usize = 64;
/// The arguments in flight, per worker, past which an `imap`'s window grows no further than
/// [`IMAP_WINDOW_PER_WORKER`] chunks: a deep window is for small items.
pub(crate) const IMAP_BYTES_PER_WORKER: usize = 4 << 20;
/// Consecutive failed worker starts after which the pool stops starting workers.
pub(crate) const START_FAILURE_LIMIT: u32 = 3;
/// How long a worker stopped because of its task (time limit, cancellation) has between
/// SIGTERM and SIGKILL, unless set.
pub(crate) const STOP_GRACE: Duration = Duration::from_millis(100);
/// File descriptors the pool holds in this process per worker: its channel and pidfd, the
/// driver's duplicates of both, and its progress page (payloads over 256 KiB add a
/// shared ring).
pub(crate) const FDS_PER_WORKER: u64 = 5;
/// File descriptors left free beside the pool's when `build` raises the soft limit.
const FD_SLACK: u64 = 64;

/// How many of a `Fork` pool's initial workers `build` forks itself, beside the zygote
/// (`LaunchOptions::fork_initial_here`); the zygote forks the others meanwhile. This
/// process forks them one after the other (a tenth of a millisecond each, on a virtual
/// machine), so only the first few.
const FORK_HERE: usize = 2;

/// A pool whose workers retire after this many tasks or fewer asks its fork server (or
/// zygote) for each next worker ahead (`LaunchOptions::ask_ahead`): it replaces workers
/// about as often as their tasks end, and a launch that waits for the fork server's answer
/// holds up the driver, which dispatches every task.
const ASK_AHEAD_TASKS: u64 = 100;

/// At most this many fork requests are sent ahead (one per worker up to this).
const ASK_AHEAD_MAX: usize = 4;

/// Raises the soft open-file limit (RLIMIT_NOFILE) toward the hard one when this process
/// would otherwise run out with `processes` more workers, as servers commonly do at start;
/// never lowers it, never beyond what the pool needs plus some slack. Returns the limit now
/// in force, if it can be read.
pub(crate) fn raise_fd_limit(processes: usize) -> Option<FdLimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let (soft, hard) = (lim.current?, lim.maximum.unwrap_or(u64::MAX));
    if soft >= hard {
        // Nothing to raise: no need to count what is open.
        return Some(FdLimit { soft, hard });
    }
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64);
    let need = open + processes as u64 * FDS_PER_WORKER + FD_SLACK;
    if need > soft && soft < hard {
        let target = need.min(hard);
        let raised = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        );
        tracing::debug!(
            from = soft,
            to = target,
            ok = raised.is_ok(),
            "raised RLIMIT_NOFILE"
        );
        if raised.is_ok() {
            return Some(FdLimit { soft: target, hard });
        }
    }
    Some(FdLimit { soft, hard })
}

/// Settings for a [`Pool`]: Python's `Pool(processes, initializer, initargs,
/// maxtasksperchild, context)`.
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// use std::sync::OnceLock;
///
/// use procpool::{Pool, StartMethod};
///
/// static GREETING: OnceLock<String> = OnceLock::new();
///
/// /// Runs once in each worker, before its first task.
/// fn setup(greeting: String) {
///     GREETING.set(greeting).expect("one initializer per worker");
/// }
///
/// fn greet(name: String) -> String {
///     format!("{}, {name}", GREETING.get().unwrap())
/// }
///
/// fn main() -> Result<(), procpool::Error> {
///     procpool::init(); // first line of main: workers start here
///     let pool = Pool::builder()
///         .processes(2)
///         .max_tasks_per_child(100) // then a fresh process takes over
///         .initializer(setup, ("hello".to_string(),))
///         .start_method(StartMethod::Spawn)
///         .build()?;
///     assert_eq!(pool.apply(greet, ("Ada".to_string(),))?, "hello, Ada");
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
#[derive(Default)]
pub struct PoolBuilder {
    processes: Option<usize>,
    max_tasks_per_child: Option<u64>,
    method: StartMethod,
    init: Option<Result<(FnRef, Vec<u8>), String>>,
    allow_fork_with_threads: bool,
    init_pins: Pins,
    task_timeout: Option<Duration>,
    stop_grace: Option<Duration>,
    max_memory_per_child: Option<u64>,
    memory_limit_per_child: Option<u64>,
    max_tasks_jitter: u64,
    max_queued: Option<usize>,
    in_flight: Option<(usize, usize)>,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("processes", &self.processes)
            .field("max_tasks_per_child", &self.max_tasks_per_child)
            .field("start_method", &self.method)
            .field("initializer", &self.init.is_some())
            .field("task_timeout", &self.task_timeout)
            .field("stop_grace", &self.stop_grace)
            .field("max_memory_per_child", &self.max_memory_per_child)
            .field("memory_limit_per_child", &self.memory_limit_per_child)
            .field("max_tasks_per_child_jitter", &self.max_tasks_jitter)
            .field("max_queued", &self.max_queued)
            .field("in_flight_per_worker", &self.in_flight)
            .finish()
    }
}

impl PoolBuilder {
    /// The number of workers. Default: the CPUs this process may use (CPU affinity and cgroup
    /// quota), like `os.process_cpu_count()`.
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Tasks a worker completes before it exits and is replaced by a fresh process, freeing
    /// whatever it leaked. A `map` chunk counts as one task, as in Python. Default: unlimited.
    ///
    /// The replacement starts as soon as the worker has been handed its last task, so that
    /// it is ready when that task ends; it takes no task before then. No more than
    /// `processes` workers ever run tasks at once, though for a moment `workers()` may list
    /// a replacement beside the worker it replaces.
    #[doc(alias = "maxtasksperchild")]
    pub fn max_tasks_per_child(mut self, n: u64) -> Self {
        self.max_tasks_per_child = Some(n);
        self
    }

    /// Raises each worker's [`max_tasks_per_child`](PoolBuilder::max_tasks_per_child) by a
    /// random amount from 0 to `jitter`, so that workers started together do not all retire
    /// together (gunicorn's `max_requests_jitter`). Default: 0, Python's exact counts.
    pub fn max_tasks_per_child_jitter(mut self, jitter: u64) -> Self {
        self.max_tasks_jitter = jitter;
        self
    }

    /// The time limit of every task (each item of a `map`), from when it begins running in
    /// its worker, not from when it was submitted. Past it, the worker's process group gets
    /// SIGTERM, then SIGKILL after [`stop_grace`](PoolBuilder::stop_grace); the task fails
    /// with [`TaskErrorKind::TimedOut`](crate::TaskErrorKind::TimedOut), the worker is
    /// replaced at once, processes the task started die with it, and tasks queued to that
    /// worker run elsewhere. In a `map`, the items of the chunk before the one that overran
    /// are delivered and the ones after it run on another worker. A call's
    /// [`Options::timeout`](crate::Options::timeout) overrides it. Default: none.
    pub fn task_timeout(mut self, limit: Duration) -> Self {
        self.task_timeout = Some(limit);
        self
    }

    /// How long a worker stopped because of its task (it ran out of time, or was
    /// cancelled) has between SIGTERM and SIGKILL. Default: 100 ms.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = Some(grace);
        self
    }

    /// After each task, a worker whose resident memory is above `bytes` exits (after
    /// sending its result) and is replaced: leaks are freed before they grow (billiard's
    /// `max_memory_per_child`). It counts as a recycle, never as a crash. Default: none.
    pub fn max_memory_per_child(mut self, bytes: u64) -> Self {
        self.max_memory_per_child = Some(bytes);
        self
    }

    /// A hard cap on each worker's private memory (`RLIMIT_DATA`: heap and anonymous
    /// mappings), set before the initializer runs. A task that goes over it fails with
    /// [`TaskErrorKind::MemoryLimit`](crate::TaskErrorKind::MemoryLimit) instead of waking
    /// the system's out-of-memory killer (Rust aborts the worker when an allocation fails),
    /// and the worker is replaced. Default: none.
    pub fn memory_limit_per_child(mut self, bytes: u64) -> Self {
        self.memory_limit_per_child = Some(bytes);
        self
    }

    /// Backpressure: while `n` tasks wait in the pool's queue for a worker,
    /// [`apply_async`](Pool::apply_async), [`map_async`](Pool::map_async) and the other
    /// submitting calls block until one is taken (a `map` waits chunk by chunk), and
    /// [`try_apply_async`](Pool::try_apply_async) hands the arguments back
    /// ([`try_map_async`](Pool::try_map_async) the items of a map that does not fit
    /// whole). A pool fed faster than it works then holds at most `n` queued tasks (plus
    /// the few each worker holds) instead of every argument ever submitted. `imap` is bounded by its own
    /// window and does not wait. Default: no limit (Python's behaviour).
    ///
    /// A closed pool never blocks: the submission is refused at once.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = Some(n);
        self
    }

    /// How many tasks each worker may hold at once (the one it runs and those sent ahead of
    /// it), as a range the pool keeps within. The pool holds the least while it does not
    /// know how long tasks take and when they take 20 ms or more, and more as they get
    /// briefer: about half a millisecond of work per worker, so that tiny tasks do not each
    /// wait a round trip ([`Metrics::in_flight_per_worker`](crate::Metrics) shows the
    /// current depth). Default: `1..=1024`, and never more than 1024.
    ///
    /// A fixed depth (`n..=n`) holds `n` from the first task, whatever their length: tasks
    /// queued in a worker wait behind the one it runs even while another worker idles, so
    /// a depth above one suits tasks known to be brief and alike. Whatever the depth, a
    /// worker that dies fails only the task it was running; those it held and had not begun
    /// run elsewhere, and cancelling them keeps them from running.
    ///
    /// ```
    /// # use pool_core as procpool;
    /// use procpool::{BuildErrorKind, Pool};
    ///
    /// let e = Pool::builder().in_flight_per_worker(8..=2).build().unwrap_err();
    /// assert_eq!(e.kind(), BuildErrorKind::InvalidConfig);
    /// assert_eq!(
    ///     e.to_string(),
    ///     "in_flight_per_worker must be a range within 1..=1024, not 8..=2"
    /// );
    /// ```
    pub fn in_flight_per_worker(mut self, range: std::ops::RangeInclusive<usize>) -> Self {
        self.in_flight = Some(range.into_inner());
        self
    }

    /// How workers start: [`StartMethod::Forkserver`] (default), `Spawn` or `Fork`. Under
    /// `Fork`, `build` forks this process into a single-threaded zygote that forks every
    /// worker, replacements included, but the first two, which `build` forks itself at the
    /// same moment: workers inherit the parent's state as it was at `build`, not later
    /// changes.
    #[doc(alias = "context")]
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = method;
        self
    }

    /// A function each worker runs once, with `args`, before its first task. A panic (or an
    /// `Err` return) fails that worker's start; after three such failures in a row the pool
    /// fails pending and new tasks with
    /// [`TaskErrorKind::InitializerFailed`](crate::TaskErrorKind::InitializerFailed).
    ///
    /// Failed starts are retried like a supervisor does: the first at once, then with an
    /// exponential backoff (50 ms doubling to 2 s, with jitter). Workers that die while
    /// starting (killed, or crashing in the initializer) or cannot be launched (out of file
    /// descriptors, say) are replaced the same way; only many within ten seconds (nine, or
    /// twice `processes`) trip the pool, and tasks then fail with
    /// [`TaskErrorKind::StartFailed`](crate::TaskErrorKind::StartFailed) naming the cause.
    /// A tripped pool is not broken for good: after a pause (1 s, doubling to 30 s) it
    /// starts one worker to probe, and once a worker starts it takes tasks again. Workers
    /// that die while running tasks are replaced at once, but a crash storm is paced: after
    /// a burst of replacements (eight, or twice `processes`), about four a second (or
    /// `processes` a second).
    #[doc(alias = "initargs")]
    pub fn initializer<F, Args>(mut self, f: F, args: Args) -> Self
    where
        F: TaskFn<Args>,
        F::Output: InitOutput,
        Args: Serialize + DeserializeOwned + 'static,
    {
        let (r, pins) = event::pinning(|| protocol::encode_init_args(&args));
        let r = r
            .map(|bytes| (task::init_ref::<F, Args>(f), bytes))
            .map_err(|e| format!("the initializer's arguments cannot be encoded: {e}"));
        self.init = Some(r);
        self.init_pins = pins;
        self
    }

    /// Allows [`StartMethod::Fork`] in a process that already runs other threads. Forking
    /// copies only the calling thread: locks other threads hold (in the allocator, stdout,
    /// a logger) stay locked forever in the child. Without this, `build` refuses.
    pub fn allow_fork_with_threads(mut self, allow: bool) -> Self {
        self.allow_fork_with_threads = allow;
        self
    }

    /// Starts the workers and returns the pool.
    ///
    /// Each worker holds about five file descriptors in this process. When the soft
    /// open-file limit (`RLIMIT_NOFILE`, often 1024) is too low for `processes` workers,
    /// `build` raises it, once, toward the hard limit, as far as the pool needs (plus some
    /// slack); it never lowers it. Workers started afterwards inherit the raised limit.
    ///
    /// # Errors
    /// [`BuildError`] if a setting is out of range, the initializer's arguments cannot be
    /// encoded, or workers cannot be started (for example `procpool::init()` is not called
    /// first in `main`, `Fork` is refused in a threaded process, or the process runs out of
    /// file descriptors even at the hard limit: the error says which worker failed, why, and
    /// what a worker costs). A worker that cannot start during `build` is always an error,
    /// never a hang.
    pub fn build(self) -> Result<Pool, BuildError> {
        let processes = match self.processes {
            Some(0) => return Err(BuildError::invalid("processes must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if self.max_tasks_per_child == Some(0) {
            return Err(BuildError::invalid(
                "max_tasks_per_child must be at least 1",
            ));
        }
        if self.max_queued == Some(0) {
            return Err(BuildError::invalid("max_queued must be at least 1"));
        }
        let (in_flight, max_in_flight) = self.in_flight.unwrap_or((IN_FLIGHT, MAX_IN_FLIGHT));
        if in_flight == 0 || in_flight > max_in_flight || max_in_flight > MAX_IN_FLIGHT {
            return Err(BuildError::invalid(format!(
                "in_flight_per_worker must be a range within 1..={MAX_IN_FLIGHT}, not {in_flight}..={max_in_flight}"
            )));
        }
        let init = match self.init {
            Some(Err(m)) => return Err(BuildError::invalid(m)),
            Some(Ok(i)) => Some(i),
            None => None,
        };
        let fds = raise_fd_limit(processes);
        let mut opts = LaunchOptions::default();
        opts.allow_fork_with_threads = self.allow_fork_with_threads;
        // The fork server (or zygote) is asked for the initial workers with its start;
        // `Fork` forks the first few here with its zygote, rather than wait for the zygote
        // to start and fork them.
        opts.initial_workers = processes;
        opts.fork_initial_here = FORK_HERE;
        // A worker retired after a few tasks is replaced about as often as tasks end.
        if self
            .max_tasks_per_child
            .is_some_and(|n| n <= ASK_AHEAD_TASKS)
        {
            opts.ask_ahead = processes.min(ASK_AHEAD_MAX);
        }
        // Not waiting for the fork server's answer yet: what follows is done while its
        // program loads.
        let mut launcher = Launcher::begin(self.method, opts).map_err(BuildError::start)?;
        let span = crate::observe::pool_span(self.method, processes);
        // The driver's thread starts now and waits for its driver, handed over once the
        // initial workers are launched: making a thread (its stack, its first steps) is
        // done while the fork server loads, or the zygote readies and forks them, not
        // after. After the launcher, which for `Fork` forks this process once and counts
        // its threads first.
        let (driver_tx, driver_rx) = std::sync::mpsc::sync_channel::<Driver>(1);
        let (done_tx, finished) = flume::bounded(1);
        let thread_span = span.clone();
        let handle = std::thread::Builder::new()
            .name("procpool-driver".into())
            .spawn(move || {
                // No driver comes if `build` failed: nothing to run.
                if let Ok(driver) = driver_rx.recv() {
                    let _in_pool = thread_span.enter();
                    driver.run();
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| BuildError::start(pool_spawn::Error::from(e)))?;
        // On an error below: the thread gets no driver and ends; it is waited for.
        let stop_thread = |handle: std::thread::JoinHandle<()>,
                           tx: std::sync::mpsc::SyncSender<Driver>| {
            drop(tx);
            let _ = handle.join();
        };
        let policy = Policy::new(PolicyConfig {
            processes,
            max_tasks: self.max_tasks_per_child,
            in_flight,
            max_in_flight,
            start_failure_limit: START_FAILURE_LIMIT,
            max_tasks_jitter: self.max_tasks_jitter,
        });
        let next_id = Arc::new(AtomicU64::new(1));
        let settings = Settings {
            prefix: self.method.worker_name_prefix(),
            max_tasks: self.max_tasks_per_child,
            init,
            init_pins: self.init_pins,
            // A worker passes descriptors with the results that hold some (`SharedBytes`).
            ipc: pool_spawn::protocol::channel_config().accept_fds(true),
            limits: protocol::Limits {
                memory_cap: self.memory_limit_per_child,
                max_rss: self.max_memory_per_child,
            },
            stop_grace: self.stop_grace.unwrap_or(STOP_GRACE),
            next_id: Arc::clone(&next_id),
            max_queued: self.max_queued,
            pid: std::process::id(),
        };
        let shared = match Shared::new(policy, settings, span.clone()) {
            Ok(s) => s,
            Err(e) => {
                stop_thread(handle, driver_tx);
                return Err(BuildError::start(pool_spawn::Error::from(e)));
            }
        };
        if let Err(e) = launcher.ready() {
            stop_thread(handle, driver_tx);
            return Err(BuildError::start(e));
        }
        let mut driver = Driver::new(Arc::clone(&shared), launcher);
        shared.act(|p, fx| p.start(fx));
        if let Err((e, before)) = span.in_scope(|| driver.launch_initial()) {
            stop_thread(handle, driver_tx);
            shared.terminate();
            driver.run();
            return Err(BuildError::start_worker(e, before, processes, fds));
        }
        if let Err(std::sync::mpsc::SendError(driver)) = driver_tx.send(driver) {
            // The thread is gone (it cannot be, short of a panic in `recv`): wind down here.
            let _ = handle.join();
            shared.terminate();
            driver.run();
            return Err(BuildError::start(pool_spawn::Error::from(
                std::io::Error::other("the pool's driver thread ended before it started"),
            )));
        }
        Ok(Pool {
            shared,
            driver: Mutex::new(Some(handle)),
            finished,
            joining: Mutex::new(()),
            processes: AtomicUsize::new(processes),
            method: self.method,
            next_id,
            task_timeout: self.task_timeout,
        })
    }
}
