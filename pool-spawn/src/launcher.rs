//! [`Launcher`], [`StartMethod`] and [`LaunchOptions`]: how workers are started.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::forkserver::{OwnForked, ServerLink, StartingServer};
use crate::role::Role;
use crate::worker::Worker;

/// How worker processes are started (Python's `multiprocessing` start methods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum StartMethod {
    /// Fork the calling process, once, when the [`Launcher`] is made: that copy (the
    /// zygote) stays single-threaded and forks every worker, so each starts with a copy of
    /// the parent's memory *as it was when the launcher was made* (later changes in the
    /// parent are not inherited, replacements included). (With
    /// [`LaunchOptions::fork_initial_here`], the first initial workers are forked at that
    /// same moment, just after the zygote, and the zygote forks every other.) Forking the
    /// parent
    /// is unsafe when it runs other threads (see the crate docs): refused then unless
    /// [`LaunchOptions::allow_fork_with_threads`] is set. Later launches never fork the
    /// parent again, however many threads it runs by then.
    Fork,
    /// Re-execute the current executable; `procpool::init()` turns the new process into a
    /// worker. Slowest, but nothing is inherited.
    Spawn,
    /// A single-threaded fork server, started once, forks each worker (the default):
    /// fork-fast starts with spawn's clean, single-threaded origin. The server is forked
    /// from the seed `init()` made (a copy of the program as it started) when the program has
    /// not changed since in what a child inherits, else started by spawn (see the crate
    /// docs).
    #[default]
    Forkserver,
}

impl StartMethod {
    /// The worker name prefix Python uses for this method: `"ForkPoolWorker"`,
    /// `"SpawnPoolWorker"` or `"ForkserverPoolWorker"`.
    pub fn worker_name_prefix(self) -> &'static str {
        match self {
            StartMethod::Fork => "ForkPoolWorker",
            StartMethod::Spawn => "SpawnPoolWorker",
            StartMethod::Forkserver => "ForkserverPoolWorker",
        }
    }
}

/// Options for a [`Launcher`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use pool_spawn::LaunchOptions;
///
/// let opts = LaunchOptions::new().handshake_timeout(Duration::from_secs(30));
/// assert!(!opts.allow_fork_with_threads);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LaunchOptions {
    /// Allow [`StartMethod::Fork`] although the process runs other threads. Forking copies
    /// only the calling thread: a lock another thread holds (allocator, stdout, a logger)
    /// stays locked forever in the child. Default `false`.
    pub allow_fork_with_threads: bool,
    /// How long a re-executed child (spawn worker, fork server) may take to answer before
    /// it is considered not to call `procpool::init()`, killed and reaped. Default 15 s.
    pub handshake_timeout: Duration,
    /// The libtest filter passed to a re-executed *test* binary (one whose process never
    /// called `init()`), so that it runs only the `enable_test_support!()` entry. Default
    /// `"procpool_worker_entry"`.
    pub test_entry: String,
    /// How many workers the first launches ask for (a pool's initial workers). With
    /// [`StartMethod::Forkserver`] and [`StartMethod::Fork`], that many fork requests are
    /// sent with the fork server's (or zygote's) start, so that it forks them as soon as it
    /// is up rather than one round trip after another; the first launches take their
    /// replies. With [`StartMethod::Spawn`], the first of them (two at most) are begun
    /// (executed) when the launcher is made, so that they load while the caller readies
    /// the rest; the first launches take them. Launching fewer is harmless (the others are stopped with the
    /// server, or killed and reaped with the launcher). Default 0.
    pub initial_workers: usize,
    /// How many workers to keep asked for ahead, when workers will be launched one after
    /// another, about one per task (a pool that recycles its workers after a task or a
    /// few): the fork server (or zygote) is asked for the next worker as soon as one is
    /// launched, so that each launch finds its worker forked and its answer waiting rather
    /// than waiting for them. Nothing changes for [`StartMethod::Spawn`]. Default 0 (none).
    pub ask_ahead: usize,
    /// With [`StartMethod::Fork`]: how many of the
    /// [`initial_workers`](LaunchOptions::initial_workers) (the first ones) this process
    /// forks itself when the launcher is made, just after the zygote (from the same
    /// memory, and under the same check of this process's threads), rather than ask them
    /// of the zygote, so that the first launches take them at once instead of waiting for
    /// the zygote to start up and fork them one after the other. They are this process's
    /// own children, reaped through their pidfds as spawned workers are; the zygote is
    /// asked for the other initial workers with its start and forks every later one (asked
    /// for none at its start, it holds its first spare back until no worker has been asked
    /// of it for a moment, as after the last of a batch: see [`Launcher::last_of_batch`]).
    /// This process forks them one after the other, and each holds its descriptors here
    /// from then on: a few, not a large pool's worth. Launching fewer is harmless (the
    /// others are stopped and reaped with the launcher). Nothing changes for the other
    /// methods. Default 0.
    pub fork_initial_here: usize,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            allow_fork_with_threads: false,
            handshake_timeout: Duration::from_secs(15),
            test_entry: crate::TEST_ENTRY.to_owned(),
            initial_workers: 0,
            ask_ahead: 0,
            fork_initial_here: 0,
        }
    }
}

impl LaunchOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`LaunchOptions::allow_fork_with_threads`].
    pub fn allow_fork_with_threads(mut self, allow: bool) -> Self {
        self.allow_fork_with_threads = allow;
        self
    }

    /// Sets [`LaunchOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`LaunchOptions::test_entry`].
    pub fn test_entry(mut self, name: impl Into<String>) -> Self {
        self.test_entry = name.into();
        self
    }

    /// Sets [`LaunchOptions::initial_workers`].
    pub fn initial_workers(mut self, n: usize) -> Self {
        self.initial_workers = n;
        self
    }

    /// Sets [`LaunchOptions::ask_ahead`].
    pub fn ask_ahead(mut self, ahead: usize) -> Self {
        self.ask_ahead = ahead;
        self
    }

    /// Sets [`LaunchOptions::fork_initial_here`].
    pub fn fork_initial_here(mut self, here: usize) -> Self {
        self.fork_initial_here = here;
        self
    }
}

/// Starts workers by one [`StartMethod`]; one per pool. Owns the fork server when the
/// method is [`StartMethod::Forkserver`].
///
/// # Examples
///
/// ```no_run
/// use pool_spawn::{Launcher, LaunchOptions, StartMethod};
///
/// pool_spawn::init(); // first line of main
/// let mut launcher = Launcher::new(StartMethod::Forkserver, LaunchOptions::default())?;
/// let mut worker = launcher.launch("ForkserverPoolWorker-1")?;
/// let channel = worker.take_channel().unwrap(); // wrap in a pool_ipc::Duplex, send Setup…
/// # drop(channel);
/// worker.terminate(std::time::Duration::from_secs(1))?;
/// launcher.shutdown()?;
/// # Ok::<(), pool_spawn::Error>(())
/// ```
#[derive(Debug)]
pub struct Launcher {
    method: StartMethod,
    opts: LaunchOptions,
    link: Option<Arc<ServerLink>>,
    /// The fork server begun by [`Launcher::begin`], until [`Launcher::ready`] reads its
    /// hello.
    starting: Option<StartingServer>,
    /// The initial workers this process forked itself (see
    /// [`LaunchOptions::fork_initial_here`]), or the errors of their fork, for the first
    /// launches, in order.
    own: VecDeque<std::io::Result<OwnForked>>,
    /// With [`StartMethod::Spawn`], the initial workers begun when the launcher was made
    /// (see [`LaunchOptions::initial_workers`]), or the error that stopped their beginning,
    /// for the first launches, in order. (In a mutex only so that the launcher is `Sync`:
    /// a begun spawn's channel from the spawner thread is not; every use has `&mut self`.)
    spawned: std::sync::Mutex<VecDeque<Result<crate::spawn::Pending>>>,
    /// The next launch ends a batch (see [`Launcher::last_of_batch`]).
    last_of_batch: bool,
}

/// A launch begun by [`Launcher::begin_meanwhile`].
#[derive(Debug)]
pub enum Launch {
    /// The worker is started: it waits for its `Setup`.
    Ready(Worker),
    /// A spawned worker that has not answered its start-up handshake yet.
    Starting(Starting),
}

/// A spawned worker whose start-up hello has not arrived yet (see
/// [`Launcher::begin_meanwhile`]). Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct Starting {
    name: String,
    pending: crate::spawn::Pending,
}

/// What [`Starting::poll`] found.
#[derive(Debug)]
pub enum Progress {
    /// The worker answered: it waits for its `Setup`.
    Done(Worker),
    /// Not yet: poll again when its channel or its pidfd becomes readable, or expire it at
    /// its deadline.
    Waiting(Starting),
}

impl Starting {
    /// The worker's process id, once the process exists (it is forked on another thread
    /// when the launch was begun off the main thread); `None` before, or if the spawn
    /// failed (which [`Starting::poll`] tells).
    pub fn pid(&mut self) -> Option<u32> {
        self.pending.pid()
    }

    /// The parent's end of the worker's channel: readable once (more of) the hello has
    /// come, or the worker has ended.
    pub fn channel_fd(&self) -> BorrowedFd<'_> {
        self.pending.sock()
    }

    /// The worker's pidfd, readable once it has exited (`None` without pidfds: poll again
    /// now and then).
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pending.exit_fd()
    }

    /// When its silence becomes an error: [`Starting::expire`] then.
    pub fn deadline(&self) -> Instant {
        self.pending.deadline()
    }

    /// Takes what has arrived of the hello, without waiting.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InitNotCalled`] if the process ended before answering,
    /// [`ErrorKind::Handshake`] if it said something unexpected, [`ErrorKind::Io`]: the
    /// process is killed and reaped.
    pub fn poll(mut self) -> Result<Progress> {
        if !self.pending.read_hello()? {
            return Ok(Progress::Waiting(self));
        }
        Ok(Progress::Done(self.into_worker()?))
    }

    /// Waits for the hello, until the deadline.
    ///
    /// # Errors
    ///
    /// As [`Starting::poll`]; [`ErrorKind::InitNotCalled`] at the deadline.
    pub fn wait(mut self) -> Result<Worker> {
        self.pending.wait()?;
        self.into_worker()
    }

    /// The deadline passed without an answer: the process is killed and reaped, and this
    /// is the error ([`ErrorKind::InitNotCalled`]).
    pub fn expire(mut self) -> Error {
        self.pending.expire()
    }

    fn into_worker(self) -> Result<Worker> {
        let s = self.pending.into_started()?;
        let w = Worker::direct(&self.name, StartMethod::Spawn, s.sock, s.child);
        tracing::debug!(worker = %self.name, pid = w.pid(), method = ?StartMethod::Spawn, "worker launched");
        Ok(w)
    }
}

/// How many of the initial workers [`Launcher::begin`] spawns at once with
/// [`StartMethod::Spawn`] (see [`LaunchOptions::initial_workers`]).
const SPAWN_AT_BEGIN: usize = 2;

/// Whether the "forking with threads" warning was emitted.
static WARNED_THREADS: AtomicBool = AtomicBool::new(false);

impl Launcher {
    /// Prepares to start workers by `method`; for [`StartMethod::Forkserver`], starts the
    /// fork server.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::ForkUnsafe`] for `Fork` when this process runs other threads (or they
    /// cannot be counted) and the options do not allow it. For `Forkserver`, the errors of
    /// starting it: [`ErrorKind::InitNotCalled`] when the re-executed program does not call
    /// `procpool::init()` first, [`ErrorKind::Io`], [`ErrorKind::Handshake`].
    pub fn new(method: StartMethod, opts: LaunchOptions) -> Result<Launcher> {
        let mut launcher = Launcher::begin(method, opts)?;
        launcher.ready()?;
        Ok(launcher)
    }

    /// [`Launcher::new`], without waiting for the fork server to answer: the caller goes on
    /// while the server's program loads, and [`Launcher::ready`] (or the first launch)
    /// waits for it and gives the errors of its start.
    ///
    /// # Errors
    ///
    /// Those of [`Launcher::new`] that come before the server answers: for `Fork`, all of
    /// them; for `Forkserver`, [`ErrorKind::Io`] if it cannot be started at all.
    pub fn begin(method: StartMethod, opts: LaunchOptions) -> Result<Launcher> {
        crate::refuse_unentered_worker();
        let mut starting = None;
        let mut link = None;
        let mut own = VecDeque::new();
        let mut spawned = VecDeque::new();
        // The first initial workers are forked here beside the zygote, which is asked for
        // the others.
        let here = opts.fork_initial_here.min(opts.initial_workers);
        let ahead = opts.initial_workers - here;
        let mut start_zygote = || -> Result<()> {
            let (l, forked) = ServerLink::start_zygote(opts.handshake_timeout, ahead, here)?;
            link = Some(l);
            own = forked.into();
            Ok(())
        };
        match method {
            StartMethod::Fork if opts.allow_fork_with_threads => {
                start_zygote()?;
                // Only to warn (once, where a warning is recorded), and so not before the
                // forks: the count is the same.
                if !WARNED_THREADS.load(Ordering::Relaxed)
                    && tracing::enabled!(tracing::Level::WARN)
                    && let n @ (None | Some(2..)) = thread_count(Duration::ZERO)
                {
                    warn_threads(n);
                }
            }
            StartMethod::Fork => match thread_count(THREADS_SETTLE) {
                Some(1) => start_zygote()?,
                Some(n) => {
                    return Err(Error::new(
                        ErrorKind::ForkUnsafe,
                        format!(
                            "this process runs {n} threads, and a lock one of them holds \
                             at the fork stays locked forever in the worker"
                        ),
                    ));
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::ForkUnsafe,
                        "this process's threads cannot be counted (/proc/self/task)",
                    ));
                }
            },
            StartMethod::Spawn => {
                // Begun now, before the caller's own preparations (its threads, the
                // workers' pages): a spawned worker takes a millisecond or so to load, and
                // the pool's first tasks wait for it. A few only: each holds descriptors
                // here until it is launched, before the caller has opened its own. Not past
                // the first failure.
                for _ in 0..opts.initial_workers.min(SPAWN_AT_BEGIN) {
                    let p =
                        crate::spawn::begin(Role::Worker, opts.handshake_timeout, &opts.test_entry);
                    let failed = p.is_err();
                    spawned.push_back(p);
                    if failed {
                        break;
                    }
                }
            }
            StartMethod::Forkserver => {
                starting = Some(ServerLink::begin(
                    opts.handshake_timeout,
                    &opts.test_entry,
                    opts.initial_workers,
                )?);
            }
        }
        Ok(Launcher {
            method,
            opts,
            link,
            starting,
            own,
            spawned: std::sync::Mutex::new(spawned),
            last_of_batch: false,
        })
    }

    /// Waits for the fork server begun by [`Launcher::begin`] to answer; at once for the
    /// other methods, or once it has.
    ///
    /// # Errors
    ///
    /// Those of starting the fork server, as for [`Launcher::new`]: it is killed and
    /// reaped then, and a launch starts a new one.
    pub fn ready(&mut self) -> Result<()> {
        if let Some(s) = self.starting.take() {
            self.link = Some(s.finish()?);
        }
        Ok(())
    }

    /// Says that the next launch is the last of a batch started together (a pool's initial
    /// workers), after which no other is expected soon: the fork server (or zygote) then
    /// forks its next spare worker only once it has had no request for a moment, rather
    /// than at once, so that the fork does not compete for the CPU with the new workers'
    /// first tasks. Nothing changes for [`StartMethod::Spawn`].
    pub fn last_of_batch(&mut self) {
        self.last_of_batch = true;
    }

    /// Lets the workers forked ahead for the next launches go (see
    /// [`LaunchOptions::ask_ahead`]): for a pool that has launched none for a while, so that
    /// it keeps no idle process for good. The next launch asks afresh. Whether there were
    /// any.
    pub fn let_ahead_go(&mut self) -> bool {
        self.link.as_ref().is_some_and(|l| l.let_ahead_go())
    }

    /// Whether launches ask ahead ([`LaunchOptions::ask_ahead`] and a method that forks).
    pub fn asks_ahead(&self) -> bool {
        self.opts.ask_ahead > 0 && self.method != StartMethod::Spawn
    }

    /// The start method.
    pub fn method(&self) -> StartMethod {
        self.method
    }

    /// The fork server's pid, for [`StartMethod::Forkserver`] once started.
    pub fn server_pid(&self) -> Option<u32> {
        self.link.as_ref().map(|l| l.server_pid())
    }

    /// Starts one worker named `name` (by convention
    /// `format!("{}-{n}", method.worker_name_prefix())`).
    ///
    /// Synchronous: returns once the process exists (for spawn, once it has answered the
    /// start-up handshake). The worker then waits for
    /// [`ToWorker::Setup`](crate::protocol::ToWorker::Setup) on its channel.
    ///
    /// For [`StartMethod::Fork`], workers are forked by the zygote forked when the launcher
    /// was made, never by this (possibly multi-threaded) process.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] (`fork` or `socketpair` failed, for example `EAGAIN`),
    /// [`ErrorKind::InitNotCalled`] / [`ErrorKind::Handshake`] for spawn,
    /// [`ErrorKind::ServerLost`] if the fork server died and could not be restarted.
    pub fn launch(&mut self, name: &str) -> Result<Worker> {
        self.launch_meanwhile(name, || ())
    }

    /// [`Launcher::launch`], running `meanwhile` during the launch, where the launch waits
    /// for another process (the fork server or zygote forking the worker): the caller's own
    /// preparations for the worker overlap its fork. `meanwhile` runs once, whatever the
    /// outcome (before the launch, for [`StartMethod::Spawn`]).
    ///
    /// # Errors
    ///
    /// Those of [`Launcher::launch`].
    pub fn launch_meanwhile(&mut self, name: &str, meanwhile: impl FnOnce()) -> Result<Worker> {
        let mut meanwhile = Some(meanwhile);
        let w = self.launch_inner(name, &mut meanwhile);
        if let Some(f) = meanwhile.take() {
            f();
        }
        w
    }

    /// Begins starting one worker named `name`, without waiting for a spawned worker's
    /// start-up handshake: for [`StartMethod::Spawn`] this returns once the new process has
    /// been executed, as [`Launch::Starting`], whose hello the caller takes when the
    /// worker's channel becomes readable ([`Starting::poll`]), so that an event loop goes on
    /// meanwhile (a spawned worker takes milliseconds to load and answer). The other methods
    /// return [`Launch::Ready`], as [`Launcher::launch_meanwhile`] would. `meanwhile` runs
    /// once, whatever the outcome, as for [`Launcher::launch_meanwhile`], except that for
    /// [`StartMethod::Spawn`] it runs once the new process has been executed, while it loads.
    ///
    /// # Errors
    ///
    /// Those of [`Launcher::launch`] that come before the handshake; the handshake's own
    /// come from [`Starting::poll`], [`Starting::wait`] or [`Starting::expire`].
    pub fn begin_meanwhile(&mut self, name: &str, meanwhile: impl FnOnce()) -> Result<Launch> {
        if self.method != StartMethod::Spawn {
            return self.launch_meanwhile(name, meanwhile).map(Launch::Ready);
        }
        self.last_of_batch = false;
        let pending = self.begin_spawn();
        meanwhile();
        let pending = pending?;
        Ok(Launch::Starting(Starting {
            name: name.to_owned(),
            pending,
        }))
    }

    fn launch_inner(
        &mut self,
        name: &str,
        meanwhile: &mut Option<impl FnOnce()>,
    ) -> Result<Worker> {
        let quiet = std::mem::take(&mut self.last_of_batch);
        let w = match self.method {
            StartMethod::Spawn => {
                if let Some(f) = meanwhile.take() {
                    f();
                }
                let s = self.begin_spawn()?.finish()?;
                Worker::direct(name, StartMethod::Spawn, s.sock, s.child)
            }
            StartMethod::Fork if !self.own.is_empty() => {
                // One of those forked with the zygote: here already.
                if let Some(f) = meanwhile.take() {
                    f();
                }
                let (chan, child) = self
                    .own
                    .pop_front()
                    .expect("not empty")
                    .map_err(|e| Error::io("forking a worker", e))?;
                Worker::direct(name, StartMethod::Fork, chan, child)
            }
            StartMethod::Fork => {
                // Never fork this process again (it may run threads by now): the zygote
                // forks; if it is gone, no Fork worker can start.
                let link = match &self.link {
                    Some(l) if !l.is_lost() => Arc::clone(l),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::ServerLost,
                            "the Fork pool's zygote (the copy of this process made when the \
                             pool was built, which forks its workers) is gone; forking this \
                             process again could deadlock, so no worker can start",
                        ));
                    }
                };
                let f = link.fork(meanwhile, quiet, self.opts.ask_ahead)?;
                Worker::served(name, StartMethod::Fork, f, link)
            }
            StartMethod::Forkserver => {
                self.ready()?;
                let link = self.server()?;
                let ahead = self.opts.ask_ahead;
                let forked = match link.fork(meanwhile, quiet, ahead) {
                    Ok(f) => (f, link),
                    Err(e) if e.kind() == ErrorKind::ServerLost => {
                        tracing::warn!(error = %e, "the fork server is gone; starting a new one");
                        self.link = None;
                        let link = self.server()?;
                        (link.fork(meanwhile, quiet, ahead)?, link)
                    }
                    Err(e) => return Err(e),
                };
                Worker::served(name, StartMethod::Forkserver, forked.0, forked.1)
            }
        };
        tracing::debug!(worker = name, pid = w.pid(), method = ?self.method, "worker launched");
        Ok(w)
    }

    /// A spawned worker begun: one begun with the launcher, else one begun now.
    fn begin_spawn(&mut self) -> Result<crate::spawn::Pending> {
        let spawned = self
            .spawned
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match spawned.pop_front() {
            Some(p) => p,
            None => crate::spawn::begin(
                Role::Worker,
                self.opts.handshake_timeout,
                &self.opts.test_entry,
            ),
        }
    }

    /// The live fork server, started again if it was lost.
    fn server(&mut self) -> Result<Arc<ServerLink>> {
        if let Some(l) = &self.link
            && !l.is_lost()
        {
            return Ok(Arc::clone(l));
        }
        let l = ServerLink::start(self.opts.handshake_timeout, &self.opts.test_entry)
            .map_err(|e| e.with_kind(ErrorKind::ServerLost))?;
        self.link = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Stops the fork server (which kills and reaps any worker still running) and reaps
    /// it. Nothing to do for the other methods.
    ///
    /// # Errors
    /// [`ErrorKind::Io`] or [`ErrorKind::TimedOut`] if the server cannot be reaped.
    pub fn shutdown(mut self) -> Result<()> {
        match self.link.take() {
            Some(l) => l.shutdown(),
            None => Ok(()),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Some(l) = self.link.take() {
            let _ = l.shutdown();
        }
    }
}

/// How long [`Launcher::new`] lets the thread count settle before refusing `Fork`.
const THREADS_SETTLE: Duration = Duration::from_millis(100);

/// The threads of this process that could hold a lock at a fork, if `/proc` tells: all of
/// them but an idle spawner thread and a worker's channel watcher (which procpool itself
/// keeps parked; see the crate's fork-safety notes) and threads already dead.
///
/// A thread joined a moment ago (the driver of a pool just dropped) can stay listed in
/// `/proc/self/task` a little longer: while more than one thread is counted, this looks
/// again for up to `settle`.
pub(crate) fn thread_count(settle: Duration) -> Option<usize> {
    // The common case in one small read: a process with one thread is done counting.
    if num_threads() == Some(1) {
        return Some(1);
    }
    let deadline = Instant::now() + settle;
    loop {
        let all = live_threads()?;
        let parked =
            usize::from(crate::spawn::spawner_is_idle()) + usize::from(crate::watch::parked());
        let n = all.saturating_sub(parked).max(1);
        if n == 1 || Instant::now() >= deadline {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The thread count in `/proc/self/stat` (its 20th field), if it can be read.
pub(crate) fn num_threads() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold anything: the fields after its last `)`
    // start with the 3rd (the state); the thread count is the 20th.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(17)?
        .parse()
        .ok()
}

/// The entries of `/proc/self/task` that are not dead or zombie threads.
fn live_threads() -> Option<usize> {
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(e) = e else { continue };
        match crate::sys::proc_state(e.path().join("stat")) {
            // Gone between the listing and now.
            None => {}
            Some('Z' | 'X' | 'x') => {}
            Some(_) => n += 1,
        }
    }
    Some(n)
}

fn warn_threads(n: Option<usize>) {
    if !WARNED_THREADS.swap(true, Ordering::Relaxed) {
        let threads = n.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string());
        tracing::warn!(
            "forking a worker from a process with {threads} threads: a lock held by another \
             thread at that moment stays locked in the worker (allowed by \
             LaunchOptions::allow_fork_with_threads)"
        );
    }
}
