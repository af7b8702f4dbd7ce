//! [`Pool`] and [`PoolBuilder`]: Python's `multiprocessing.Pool` API over real processes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use pool_ipc::FrameBuf;
use pool_spawn::protocol::{self, ToWorker};
use pool_spawn::task::{self, FnRef, InitOutput, TaskFn};
use pool_spawn::{LaunchOptions, Launcher, StartMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::driver::{self, Driver, Outcome, Settings, Shared, Sink, TaskRec};
use crate::error::{BuildError, Error, TaskError, TaskErrorKind};
use crate::event::{self, Pins};
use crate::policy::{Policy, PolicyConfig, Refusal};
use crate::result::{AsyncResult, Callbacks, Slot};

/// Tasks in flight per worker before the pool knows how long tasks take, and when they take
/// 20 ms or more: one, so that no task waits behind a long one while another worker
/// idles (as with Python's shared queue). Shorter tasks get more (see `Policy::observe`).
const IN_FLIGHT: usize = 1;
/// ... and when they are tiny.
const MAX_IN_FLIGHT: usize = 16;
/// Consecutive failed worker starts after which the pool stops starting workers.
const START_FAILURE_LIMIT: u32 = 3;

/// A pool of worker processes: Python's `multiprocessing.Pool`.
///
/// Build one with [`Pool::builder`]. Tasks are plain `fn` items or non-capturing closures
/// whose arguments and results are serde types; they run in the workers, which are separate
/// processes: a crash, abort or leak in a task costs one worker, which the pool replaces.
///
/// # Dropping
/// Dropping a pool that was not joined terminates it, like leaving Python's `with Pool()`
/// block: unfinished tasks fail with [`TaskErrorKind::PoolClosed`], workers get SIGTERM and,
/// after a short grace, SIGKILL; every worker is reaped before `drop` returns. To let queued
/// work finish, call [`close`](Pool::close) then [`join`](Pool::join) first.
pub struct Pool {
    shared: Arc<Shared>,
    driver: Mutex<Option<JoinHandle<()>>>,
    finished: flume::Receiver<()>,
    /// Held while a join finishes, so that concurrent joins return together.
    joining: Mutex<()>,
    processes: usize,
    method: StartMethod,
    next_id: Arc<AtomicU64>,
    /// Events among the initializer's arguments: workers started later still open them.
    _init_pins: Pins,
}

/// Settings for a [`Pool`]: Python's `Pool(processes, initializer, initargs,
/// maxtasksperchild, context)`.
#[derive(Default)]
pub struct PoolBuilder {
    processes: Option<usize>,
    max_tasks_per_child: Option<u64>,
    method: StartMethod,
    init: Option<Result<(FnRef, Vec<u8>), String>>,
    allow_fork_with_threads: bool,
    init_pins: Pins,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("processes", &self.processes)
            .field("max_tasks_per_child", &self.max_tasks_per_child)
            .field("start_method", &self.method)
            .field("initializer", &self.init.is_some())
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

    /// How workers start: [`StartMethod::Forkserver`] (default), `Spawn` or `Fork`.
    #[doc(alias = "context")]
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = method;
        self
    }

    /// A function each worker runs once, with `args`, before its first task. A panic (or an
    /// `Err` return) fails that worker's start; after three such failures in a row the pool
    /// stops starting workers and fails pending tasks with
    /// [`TaskErrorKind::InitializerFailed`]. Workers that die while starting (killed, or
    /// crashing in the initializer) are replaced; only many in a row (a crash loop: nine, or
    /// twice `processes`) break the pool the same way.
    #[doc(alias = "initargs")]
    pub fn initializer<F, Args>(mut self, f: F, args: Args) -> Self
    where
        F: TaskFn<Args>,
        F::Output: InitOutput,
        Args: Serialize + DeserializeOwned + 'static,
    {
        let (r, pins) = event::pinning(|| postcard::to_allocvec(&args));
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
    /// # Errors
    /// [`BuildError`] if a setting is out of range, the initializer's arguments cannot be
    /// encoded, or workers cannot be started (for example `procpool::init()` is not called
    /// first in `main`, or `Fork` is refused in a threaded process).
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
        let init = match self.init {
            Some(Err(m)) => return Err(BuildError::invalid(m)),
            Some(Ok(i)) => Some(i),
            None => None,
        };
        let mut opts = LaunchOptions::default();
        opts.allow_fork_with_threads = self.allow_fork_with_threads;
        let launcher = Launcher::new(self.method, opts).map_err(BuildError::start)?;
        let policy = Policy::new(PolicyConfig {
            processes,
            max_tasks: self.max_tasks_per_child,
            in_flight: IN_FLIGHT,
            max_in_flight: MAX_IN_FLIGHT,
            start_failure_limit: START_FAILURE_LIMIT,
        });
        let settings = Settings {
            prefix: self.method.worker_name_prefix(),
            max_tasks: self.max_tasks_per_child,
            init,
            ipc: pool_spawn::protocol::channel_config(),
        };
        let shared = Shared::new(policy, settings)
            .map_err(|e| BuildError::start(pool_spawn::Error::from(e)))?;
        let mut driver = Driver::new(Arc::clone(&shared), launcher);
        shared.act(|p, fx| p.start(fx));
        if let Err(e) = driver.launch_initial() {
            shared.terminate();
            driver.run();
            return Err(BuildError::start(e));
        }
        let (done_tx, finished) = flume::bounded(1);
        let handle = std::thread::Builder::new()
            .name("procpool-driver".into())
            .spawn(move || {
                driver.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| BuildError::start(pool_spawn::Error::from(e)))?;
        Ok(Pool {
            shared,
            driver: Mutex::new(Some(handle)),
            finished,
            joining: Mutex::new(()),
            processes,
            method: self.method,
            next_id: Arc::new(AtomicU64::new(1)),
            _init_pins: self.init_pins,
        })
    }
}

/// A live worker of a pool, as [`Pool::workers`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    name: String,
    pid: u32,
}

impl WorkerInfo {
    /// Its name, `ForkserverPoolWorker-N` (`N` counts up across replacements).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Counters of a pool's work so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Tasks (apply calls, map chunks) accepted.
    pub submitted: u64,
    /// Tasks whose worker sent a result (which may be a panic).
    pub completed: u64,
    /// Tasks failed because their worker died.
    pub lost: u64,
    /// Tasks failed because the pool was terminated.
    pub terminated: u64,
    /// Tasks failed because workers could not start.
    pub init_failed: u64,
    /// Worker processes started, replacements included.
    pub workers_started: u64,
    /// Workers that exited after `max_tasks_per_child` tasks, or on close.
    pub recycled: u64,
    /// Workers that died unexpectedly (and were replaced).
    pub died: u64,
    /// Worker starts that failed (initializer, image mismatch, early death).
    pub start_failures: u64,
    /// Tasks waiting for a worker now.
    pub queued: usize,
    /// Tasks handed to workers now.
    pub running: usize,
    /// How many tasks each worker may hold now: 1 for tasks of 20 ms or more (or of
    /// unknown length), up to 16 when tasks are so short that round trips would leave
    /// workers idle.
    pub in_flight_per_worker: usize,
}

/// A chunk of items, encoded as the Run message of task `id`, with the items that could not
/// be encoded set aside.
struct Encoded {
    id: u64,
    /// The Run frame, or why it could not be built.
    frame: Result<FrameBuf, TaskError>,
    /// Relative index of each encoded item, in order.
    sent: Vec<usize>,
    /// Items that failed to encode, by relative index.
    failed: Vec<(usize, TaskError)>,
    len: usize,
    /// Events among the items, kept open until the task is done.
    pins: Pins,
}

fn frame_error(e: pool_ipc::Error) -> TaskError {
    TaskError::new(TaskErrorKind::Encode, format!("the task message: {e}"))
}

/// Encodes `items` straight into the Run frame of task `id`.
fn encode_chunk<A: Serialize>(id: u64, func: FnRef, items: &[A]) -> Encoded {
    let mut frame = FrameBuf::new();
    let (whole, pins) = event::pinning(|| protocol::encode_run(&mut frame, id, func, items));
    if whole.is_ok() {
        return Encoded {
            id,
            frame: Ok(frame),
            sent: (0..items.len()).collect(),
            failed: Vec::new(),
            len: items.len(),
            pins,
        };
    }
    // Some item does not encode: find which, and send the others.
    let mut body = Vec::new();
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match pool_ipc::encode_append(&mut body, item) {
            Ok(()) => sent.push(i),
            Err(e) => failed.push((
                i,
                TaskError::new(
                    TaskErrorKind::Encode,
                    format!("the task's arguments cannot be encoded: {e}"),
                ),
            )),
        }
    }
    // postcard encodes a sequence as its varint length followed by the elements.
    let mut payload = Vec::with_capacity(body.len() + 10);
    pool_ipc::encode_seq_len(&mut payload, sent.len());
    payload.extend_from_slice(&body);
    let mut frame = FrameBuf::with_capacity(payload.len() + 32);
    let built = frame
        .encode(&ToWorker::<&serde_bytes::Bytes>::Run {
            id,
            func,
            payload: serde_bytes::Bytes::new(&payload),
        })
        .map(|()| frame)
        .map_err(frame_error);
    Encoded {
        id,
        frame: built,
        sent,
        failed,
        len: items.len(),
        pins,
    }
}

/// Python's default chunk size: about four chunks per worker.
fn auto_chunksize(len: usize, processes: usize) -> usize {
    if len == 0 {
        return 1;
    }
    let per = processes * 4;
    let (q, r) = (len / per, len % per);
    (q + usize::from(r > 0)).max(1)
}

/// Delivers a result to its slot, running callbacks first (on the callback thread).
fn complete<T: Send + 'static>(
    shared: &Weak<Shared>,
    slot: Arc<Slot<T>>,
    result: Result<T, TaskError>,
    callbacks: Callbacks<T>,
) {
    if callbacks.is_empty() {
        slot.fill(result);
        return;
    }
    let job: Box<dyn FnOnce() + Send> = Box::new(move || {
        let Callbacks {
            on_success,
            on_error,
        } = callbacks;
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &result {
            Ok(v) => {
                if let Some(f) = on_success {
                    f(v)
                }
            }
            Err(e) => {
                if let Some(f) = on_error {
                    f(e)
                }
            }
        }));
        if let Err(payload) = ran {
            tracing::error!("a result callback panicked; the pool goes on");
            driver::drop_payload(payload);
        }
        slot.fill(result);
    });
    match shared.upgrade() {
        Some(s) => s.run_callback(job),
        None => job(),
    }
}

impl Pool {
    /// Settings for a new pool.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// A pool with the default settings: one worker per usable CPU, forkserver start.
    ///
    /// # Errors
    /// As [`PoolBuilder::build`].
    pub fn new() -> Result<Pool, BuildError> {
        PoolBuilder::default().build()
    }

    /// The number of workers the pool keeps.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// How the pool starts workers.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// The live workers, oldest first: Python's `active_children()`. A worker about to be
    /// recycled and its already started replacement may both be listed.
    #[doc(alias = "active_children")]
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared
            .workers()
            .into_iter()
            .map(|(name, pid)| WorkerInfo { name, pid })
            .collect()
    }

    /// Counters of the pool's work so far.
    pub fn metrics(&self) -> Metrics {
        let c = self.shared.counts();
        let (queued, running) = self.shared.load();
        Metrics {
            submitted: c.submitted,
            completed: c.completed,
            lost: c.lost,
            terminated: c.terminated,
            init_failed: c.init_failed,
            workers_started: c.launched,
            recycled: c.recycled,
            died: c.died,
            start_failures: c.start_failures,
            queued,
            running,
            in_flight_per_worker: self.shared.depth(),
        }
    }

    /// A fresh task id.
    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one encoded batch; `done` receives exactly one per-item result vector.
    fn submit_batch<R>(
        &self,
        enc: Encoded,
        base: Option<usize>,
        fed: bool,
        done: impl FnOnce(Vec<Result<R, TaskError>>) + Send + 'static,
    ) where
        R: DeserializeOwned + Send + 'static,
    {
        if let Some(task) = self.prepare_batch(enc, base, done) {
            self.submit_all(vec![task], fed);
        }
    }

    /// Turns an encoded batch into a task record for the policy, or settles it at once
    /// (nothing to send, or the frame cannot be built): `None` then.
    fn prepare_batch<R>(
        &self,
        enc: Encoded,
        base: Option<usize>,
        done: impl FnOnce(Vec<Result<R, TaskError>>) + Send + 'static,
    ) -> Option<(u64, TaskRec)>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let Encoded {
            id,
            frame,
            sent,
            failed,
            len,
            pins,
        } = enc;
        let n_sent = sent.len();
        let index = move |i: usize, e: TaskError| match base {
            Some(b) => e.with_item(b + i),
            None => e,
        };
        let merge = move |got: Vec<Result<R, TaskError>>| -> Vec<Result<R, TaskError>> {
            if failed.is_empty() && got.len() == len {
                // Every item was sent and answered: only errors need their index.
                return got
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| r.map_err(|e| index(i, e)))
                    .collect();
            }
            let mut out: Vec<Option<Result<R, TaskError>>> = (0..len).map(|_| None).collect();
            for (i, e) in failed {
                out[i] = Some(Err(index(i, e)));
            }
            for (&i, r) in sent.iter().zip(got) {
                out[i] = Some(r.map_err(|e| index(i, e)));
            }
            out.into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| {
                        Err(TaskError::new(TaskErrorKind::Decode, "missing result"))
                    })
                })
                .collect()
        };
        if n_sent == 0 {
            done(merge(Vec::new()));
            return None;
        }
        let sink: Sink = Box::new(move |outcome: Outcome| {
            // The worker has decoded the arguments (or never will): release their events.
            drop(pins);
            let got = driver::decode_items::<R>(outcome, n_sent);
            done(merge(got));
        });
        let limit = self.shared.frame_limit();
        let frame = match frame {
            Ok(f) if f.payload_len() > limit => {
                sink(Outcome::Failed(TaskError::new(
                    TaskErrorKind::Encode,
                    format!(
                        "the task's arguments encode to {} bytes, over the limit of {limit} \
                         bytes for one message",
                        f.payload_len()
                    ),
                )));
                return None;
            }
            Ok(f) => f,
            Err(e) => {
                sink(Outcome::Failed(e));
                return None;
            }
        };
        let rec = TaskRec {
            frame: Some(frame),
            sink,
            sent_at: None,
        };
        Some((id, rec))
    }

    /// Hands tasks to the policy under one lock (their frames go out in one write per
    /// worker); a refused task fails with the reason.
    fn submit_all(&self, tasks: Vec<(u64, TaskRec)>, fed: bool) {
        let refused = self.shared.act(|p, fx| {
            let mut refused = Vec::new();
            for (id, rec) in tasks {
                if let Err(r) = p.submit_from(id, rec, fed, fx) {
                    refused.push(r);
                }
            }
            refused
        });
        for (rec, why) in refused {
            let e = match why {
                Refusal::Closed if fed => TaskError::new(
                    TaskErrorKind::PoolClosed,
                    "the pool was joined or terminated before this item was sent: imap sends \
                     items as their results are consumed, so consume it before join()",
                ),
                Refusal::Closed => TaskError::new(
                    TaskErrorKind::PoolClosed,
                    "the pool is closed: it accepts no new tasks",
                ),
                Refusal::Broken(m) => TaskError::with_report(TaskErrorKind::InitializerFailed, m),
            };
            (rec.sink)(Outcome::Failed(e));
        }
    }

    /// Runs `f(args...)` in a worker and waits for its result: Python's `apply`.
    ///
    /// `args` is a tuple: `pool.apply(add, (1, 2))`.
    ///
    /// # Errors
    /// The task's [`TaskError`]: it panicked, its worker died, it could not be encoded or
    /// decoded, or the pool is closed.
    pub fn apply<F, Args, R>(&self, f: F, args: Args) -> Result<R, TaskError>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        self.apply_async(f, args).get()
    }

    /// Submits `f(args...)` and returns at once: Python's `apply_async`.
    pub fn apply_async<F, Args, R>(&self, f: F, args: Args) -> AsyncResult<R>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        self.apply_async_with(f, args, Callbacks::new())
    }

    /// [`apply_async`](Pool::apply_async) with Python's `callback` and `error_callback`.
    pub fn apply_async_with<F, Args, R>(
        &self,
        f: F,
        args: Args,
        callbacks: Callbacks<R>,
    ) -> AsyncResult<R>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let slot = Slot::new();
        let out = AsyncResult::new(Arc::clone(&slot));
        let weak = Arc::downgrade(&self.shared);
        let func = task::batch_ref::<F, Args, R>(f);
        let enc = encode_chunk(self.new_id(), func, std::slice::from_ref(&args));
        self.submit_batch::<R>(enc, None, false, move |mut items| {
            let r = items
                .pop()
                .unwrap_or_else(|| Err(TaskError::new(TaskErrorKind::Decode, "no result")));
            complete(&weak, slot, r, callbacks);
        });
        out
    }

    /// Applies `f` to every item, in parallel, and returns the results in order: Python's
    /// `map`. Items are sent in chunks of an automatic size (about four per worker).
    ///
    /// # Errors
    /// The error of the first failing item (by index); [`TaskError::item_index`] says which.
    pub fn map<F, A, R, I>(&self, f: F, items: I) -> Result<Vec<R>, TaskError>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, None, Callbacks::new()).get()
    }

    /// [`map`](Pool::map) with an explicit chunk size (Python's `chunksize`).
    #[doc(alias = "chunksize")]
    pub fn map_chunked<F, A, R, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<R>, TaskError>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, Some(chunksize), Callbacks::new())
            .get()
    }

    /// Submits a `map` and returns at once: Python's `map_async`.
    pub fn map_async<F, A, R, I>(&self, f: F, items: I) -> AsyncResult<Vec<R>>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, None, Callbacks::new())
    }

    /// [`map_async`](Pool::map_async) with a chunk size (`None`: automatic) and callbacks.
    pub fn map_async_with<F, A, R, I>(
        &self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        callbacks: Callbacks<Vec<R>>,
    ) -> AsyncResult<Vec<R>>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        let func = task::batch_ref::<F, (A,), R>(f);
        let items: Vec<A> = items.into_iter().collect();
        self.gather(func, &items, chunksize, callbacks)
    }

    /// Like [`map`](Pool::map) for functions of several arguments: each item is a tuple of
    /// arguments. Python's `starmap`.
    ///
    /// # Errors
    /// The error of the first failing item (by index).
    pub fn starmap<F, Args, R, I>(&self, f: F, items: I) -> Result<Vec<R>, TaskError>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_async_with(f, items, None, Callbacks::new())
            .get()
    }

    /// Submits a `starmap` and returns at once: Python's `starmap_async`.
    pub fn starmap_async<F, Args, R, I>(&self, f: F, items: I) -> AsyncResult<Vec<R>>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_async_with(f, items, None, Callbacks::new())
    }

    /// [`starmap_async`](Pool::starmap_async) with a chunk size (`None`: automatic) and
    /// callbacks.
    pub fn starmap_async_with<F, Args, R, I>(
        &self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        callbacks: Callbacks<Vec<R>>,
    ) -> AsyncResult<Vec<R>>
    where
        F: TaskFn<Args, Output = R>,
        Args: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = Args>,
    {
        let func = task::batch_ref::<F, Args, R>(f);
        let items: Vec<Args> = items.into_iter().collect();
        self.gather(func, &items, chunksize, callbacks)
    }

    fn gather<A, R>(
        &self,
        func: FnRef,
        items: &[A],
        chunksize: Option<usize>,
        callbacks: Callbacks<Vec<R>>,
    ) -> AsyncResult<Vec<R>>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        let slot = Slot::new();
        let out = AsyncResult::new(Arc::clone(&slot));
        let n = items.len();
        if n == 0 {
            complete(
                &Arc::downgrade(&self.shared),
                slot,
                Ok(Vec::new()),
                callbacks,
            );
            return out;
        }
        let size = chunksize
            .unwrap_or_else(|| auto_chunksize(n, self.processes))
            .max(1);
        let chunks = n.div_ceil(size);
        let state = Arc::new(Mutex::new(Gather {
            chunks: (0..chunks).map(|_| None).collect(),
            len: n,
            remaining: chunks,
            slot: Some(slot),
            callbacks: Some(callbacks),
            shared: Arc::downgrade(&self.shared),
        }));
        let mut tasks = Vec::with_capacity(chunks);
        for (c, chunk) in items.chunks(size).enumerate() {
            let base = c * size;
            let state = Arc::clone(&state);
            let task = self.prepare_batch::<R>(
                encode_chunk(self.new_id(), func, chunk),
                Some(base),
                move |results| {
                    let mut g = state.lock().unwrap_or_else(PoisonError::into_inner);
                    g.chunks[c] = Some(results);
                    g.remaining -= 1;
                    if g.remaining == 0 {
                        g.finish();
                    }
                },
            );
            tasks.extend(task);
        }
        self.submit_all(tasks, false);
        out
    }

    /// Applies `f` to each item lazily and yields results in order as they come: Python's
    /// `imap`. The input is read only as workers free up (a bounded window of chunks in
    /// flight, the first ones sent at once), so an endless iterator works and memory stays
    /// bounded. Chunk size: automatic when the iterator knows its length, else 1.
    ///
    /// As in Python, an imap made before [`close`](Pool::close) still gets all its results
    /// after it: it goes on sending its items as you consume it. [`join`](Pool::join) ends
    /// that (join cannot wait for a consumer that may be the joining thread): the next chunk
    /// it tries to send fails with [`TaskErrorKind::PoolClosed`] and the iterator ends
    /// there, reading no more input. Consume an imap before `join`.
    pub fn imap<'p, F, A, R, I>(&'p self, f: F, items: I) -> Imap<'p, R>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, None, true)
    }

    /// [`imap`](Pool::imap) with an explicit chunk size.
    #[doc(alias = "chunksize")]
    pub fn imap_chunked<'p, F, A, R, I>(&'p self, f: F, items: I, chunksize: usize) -> Imap<'p, R>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, Some(chunksize), true)
    }

    /// Like [`imap`](Pool::imap), but yields results in the order they finish: Python's
    /// `imap_unordered`.
    pub fn imap_unordered<'p, F, A, R, I>(&'p self, f: F, items: I) -> Imap<'p, R>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, None, false)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with an explicit chunk size.
    pub fn imap_unordered_chunked<'p, F, A, R, I>(
        &'p self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Imap<'p, R>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, Some(chunksize), false)
    }

    fn imap_inner<'p, F, A, R, I>(
        &'p self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        ordered: bool,
    ) -> Imap<'p, R>
    where
        F: TaskFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        let func = task::batch_ref::<F, (A,), R>(f);
        let mut iter = items.into_iter();
        let size = chunksize
            .unwrap_or_else(|| match iter.size_hint() {
                (lo, Some(hi)) if lo == hi => auto_chunksize(hi, self.processes),
                _ => 1,
            })
            .max(1);
        let (tx, rx) = flume::unbounded();
        let mut next_chunk = 0usize;
        let mut next_item = 0usize;
        let pool: &'p Pool = self;
        // Opened while the pool runs, this imap goes on sending items after close().
        let fed = self.shared.act(|p, _| p.open_feed());
        let feed = Box::new(move || -> bool {
            let chunk: Vec<A> = iter.by_ref().take(size).collect();
            if chunk.is_empty() {
                return false;
            }
            let (c, base) = (next_chunk, next_item);
            next_chunk += 1;
            next_item += chunk.len();
            let tx = tx.clone();
            let enc = encode_chunk(pool.new_id(), func, &chunk);
            pool.submit_batch::<R>(enc, Some(base), fed, move |results| {
                let _ = tx.send((c, results));
            });
            true
        });
        let mut imap = Imap {
            feed,
            pool: fed.then_some(self),
            rx,
            window: self.processes * MAX_IN_FLIGHT * 2,
            in_flight: 0,
            exhausted: false,
            ordered,
            next_yield: 0,
            parked: BTreeMap::new(),
            current: VecDeque::new(),
        };
        // Work starts now, as in Python, not at the first `next`.
        imap.fill();
        imap
    }

    /// Stops accepting tasks; workers exit once the queued ones are done: Python's `close`.
    /// Iterators from [`imap`](Pool::imap) made before it go on sending their items.
    pub fn close(&self) {
        self.shared.act(|p, fx| p.close(fx));
    }

    /// Stops now: unfinished tasks fail with [`TaskErrorKind::PoolClosed`], workers get
    /// SIGTERM then, after a short grace, SIGKILL: Python's `terminate`.
    pub fn terminate(&self) {
        self.shared.terminate();
    }

    /// Waits until every worker has exited and been reaped: Python's `join`. Items an
    /// unfinished [`imap`](Pool::imap) has not sent yet will not be sent.
    ///
    /// # Errors
    /// If neither [`close`](Pool::close) nor [`terminate`](Pool::terminate) was called
    /// (the wait would never end).
    pub fn join(&self) -> Result<(), Error> {
        if !self.shared.is_closed() {
            return Err(Error::join(
                "join() waits for the workers to exit: call close() or terminate() first",
            ));
        }
        self.shared.act(|p, fx| p.revoke_feeds(fx));
        let _ = self.finished.recv();
        self.finish_join();
        Ok(())
    }

    /// Like [`join`](Pool::join), but waits at most `timeout`; past it, the pool is
    /// terminated (SIGTERM, then SIGKILL) and the wait ends once the workers are reaped.
    ///
    /// # Errors
    /// If the pool was not closed first, or the deadline passed (the pool was terminated).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), Error> {
        if !self.shared.is_closed() {
            return Err(Error::join(
                "join() waits for the workers to exit: call close() or terminate() first",
            ));
        }
        self.shared.act(|p, fx| p.revoke_feeds(fx));
        match self
            .finished
            .recv_deadline(crate::result::deadline_after(timeout))
        {
            // Disconnected: another join already took the signal; the pool is finished.
            Ok(()) | Err(flume::RecvTimeoutError::Disconnected) => {
                self.finish_join();
                return Ok(());
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
        }
        self.terminate();
        let _ = self.finished.recv();
        self.finish_join();
        Err(Error::join(format!(
            "join timed out after {:.3}s: the pool was terminated",
            timeout.as_secs_f64()
        )))
    }

    fn finish_join(&self) {
        // Concurrent joins return together, once the driver has ended and the callbacks
        // have run; a join from a callback cannot wait for its own thread, so it goes on.
        let _serial = (!Shared::on_callback_thread())
            .then(|| self.joining.lock().unwrap_or_else(PoisonError::into_inner));
        let handle = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.shared.stop_callbacks();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let running = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if running {
            self.shared.terminate();
            let _ = self.finished.recv();
            self.finish_join();
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.processes)
            .field("start_method", &self.method)
            .finish_non_exhaustive()
    }
}

struct Gather<R> {
    /// Each chunk's results, by chunk index; `None` until the chunk is done.
    chunks: Vec<Option<Vec<Result<R, TaskError>>>>,
    len: usize,
    remaining: usize,
    slot: Option<Arc<Slot<Vec<R>>>>,
    callbacks: Option<Callbacks<Vec<R>>>,
    shared: Weak<Shared>,
}

impl<R: Send + 'static> Gather<R> {
    fn finish(&mut self) {
        let chunks = std::mem::take(&mut self.chunks);
        let mut out = Vec::with_capacity(self.len);
        let mut err = None;
        // In item order, so the error reported is the first failing item's.
        'chunks: for chunk in chunks {
            let Some(chunk) = chunk else {
                err = Some(TaskError::new(TaskErrorKind::Decode, "missing result"));
                break;
            };
            for r in chunk {
                match r {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        err = Some(e);
                        break 'chunks;
                    }
                }
            }
        }
        let result = match err {
            Some(e) => Err(e),
            None => Ok(out),
        };
        if let (Some(slot), Some(cb)) = (self.slot.take(), self.callbacks.take()) {
            complete(&self.shared, slot, result, cb);
        }
    }
}

type ChunkResults<R> = (usize, Vec<Result<R, TaskError>>);

/// The iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: one `Result` per item it
/// sent. Once the pool refuses its items (joined or terminated), it yields the
/// [`TaskErrorKind::PoolClosed`] errors of the refused chunk and the results of chunks
/// already sent, then ends without reading more input (which may be endless).
pub struct Imap<'p, R> {
    feed: Box<dyn FnMut() -> bool + 'p>,
    /// The pool, while this imap holds an open feed there (until its input is exhausted).
    pool: Option<&'p Pool>,
    rx: flume::Receiver<ChunkResults<R>>,
    window: usize,
    in_flight: usize,
    exhausted: bool,
    ordered: bool,
    next_yield: usize,
    parked: BTreeMap<usize, Vec<Result<R, TaskError>>>,
    current: VecDeque<Result<R, TaskError>>,
}

impl<R> fmt::Debug for Imap<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imap")
            .field("ordered", &self.ordered)
            .field("in_flight", &self.in_flight)
            .field("exhausted", &self.exhausted)
            .finish()
    }
}

impl<R> Imap<'_, R> {
    /// Sends chunks until the window is full or the input ends. Chunks parked out of order
    /// count against the window too, so one slow chunk cannot let the input run ahead
    /// without bound.
    fn fill(&mut self) {
        while !self.exhausted && self.in_flight + self.parked.len() < self.window {
            if (self.feed)() {
                self.in_flight += 1;
            } else {
                self.set_exhausted();
            }
        }
    }

    /// No more input will be sent: the feed closes.
    fn set_exhausted(&mut self) {
        self.exhausted = true;
        if let Some(pool) = self.pool.take() {
            pool.shared.act(|p, fx| p.close_feed(fx));
        }
    }
}

impl<R> Drop for Imap<'_, R> {
    fn drop(&mut self) {
        self.set_exhausted();
    }
}

impl<R> Iterator for Imap<'_, R> {
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.current.pop_front() {
                return Some(r);
            }
            self.fill();
            if self.ordered {
                if let Some(v) = self.parked.remove(&self.next_yield) {
                    self.next_yield += 1;
                    self.current.extend(v);
                    continue;
                }
            } else if let Some((_, v)) = self.parked.pop_first() {
                self.current.extend(v);
                continue;
            }
            if self.in_flight == 0 {
                return None;
            }
            // Every chunk in flight resolves (result, failure, or pool shutdown), so this
            // wait ends.
            let (c, v) = self.rx.recv().ok()?;
            self.in_flight -= 1;
            if v.iter()
                .all(|r| matches!(r, Err(e) if e.kind() == TaskErrorKind::PoolClosed))
            {
                // The pool is closed: report this chunk, read no more input.
                self.set_exhausted();
            }
            self.parked.insert(c, v);
        }
    }
}
