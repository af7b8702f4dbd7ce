//! [`Pool`]: the handle of a pool of worker processes, what it reports about itself, and its
//! end (`close`, `terminate`, `join`, drop). Submitting work is in `submit`, `gather` and
//! `imap`; settings are in `builder`.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use pool_spawn::StartMethod;

use crate::builder::PoolBuilder;
use crate::driver::Shared;
use crate::error::{BuildError, Error};
use crate::metrics::Metrics;
use serde::Serialize;

/// A pool of worker processes: Python's `multiprocessing.Pool`.
///
/// Build one with [`Pool::builder`]. Tasks are plain `fn` items or non-capturing closures
/// whose arguments and results are serde types; they run in the workers, which are separate
/// processes: a crash, abort or leak in a task costs one worker, which the pool replaces.
///
/// # Dropping
/// Dropping a pool that was not joined terminates it, like leaving Python's `with Pool()`
/// block: unfinished tasks fail with [`TaskErrorKind::PoolClosed`](crate::TaskErrorKind::PoolClosed), workers get SIGTERM and,
/// after a short grace, SIGKILL; every worker is reaped before `drop` returns. To let queued
/// work finish, call [`close`](Pool::close) then [`join`](Pool::join) first.
pub struct Pool {
    pub(crate) shared: Arc<Shared>,
    pub(crate) driver: Mutex<Option<JoinHandle<()>>>,
    pub(crate) finished: flume::Receiver<()>,
    /// Held while a join finishes, so that concurrent joins return together.
    pub(crate) joining: Mutex<()>,
    /// The number of workers it keeps (changed by `resize`).
    pub(crate) processes: AtomicUsize,
    pub(crate) method: StartMethod,
    pub(crate) next_id: Arc<AtomicU64>,
    /// The time limit of tasks whose call sets none.
    pub(crate) task_timeout: Option<Duration>,
}

/// A live worker of a pool, as [`Pool::workers`] lists it.
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// fn pid() -> u32 {
///     std::process::id()
/// }
///
/// fn main() -> Result<(), procpool::Error> {
///     procpool::init(); // first line of main: workers start here
///     let pool = procpool::Pool::builder().processes(1).build()?;
///     let worker = &pool.workers()[0];
///     assert!(worker.name().starts_with("ForkserverPoolWorker-"));
///     assert_eq!(pool.apply(pid, ())?, worker.pid()); // the task ran in that process
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    name: String,
    pid: u32,
    ready: bool,
    tasks_done: u64,
    current_task: Option<u64>,
    running_for: Option<Duration>,
    rss: Option<u64>,
}

impl WorkerInfo {
    /// Whether it has finished starting (its initializer ran) and takes tasks.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The tasks it has answered (a `map` chunk is one task; a cancelled task it skipped
    /// counts too).
    pub fn tasks_done(&self) -> u64 {
        self.tasks_done
    }

    /// The id of the task it is running now, if it is running one. Ids count up from 1
    /// across the pool; a `map` chunk is one task.
    pub fn current_task(&self) -> Option<u64> {
        self.current_task
    }

    /// How long it has been running its current task (for a chunk of a `map` with a time
    /// limit, its current item), if it is running one.
    pub fn running_for(&self) -> Option<Duration> {
        self.running_for
    }

    /// Its resident memory (RSS) in bytes when [`Pool::workers`] looked, read from
    /// `/proc/<pid>/statm`; `None` if it could not be read (it just exited, say).
    pub fn rss(&self) -> Option<u64> {
        self.rss
    }

    /// Its name, `ForkserverPoolWorker-N` (`N` counts up across replacements).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
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

    /// The number of workers the pool keeps: as built, or as last [resized](Pool::resize).
    pub fn processes(&self) -> usize {
        self.processes.load(Ordering::Relaxed)
    }

    /// Grows or shrinks the pool to `processes` workers while tasks run.
    ///
    /// Growing starts the new workers at once; they take queued tasks as soon as they are
    /// ready. Starts still go through the pool's restart breaker (see
    /// [`PoolBuilder::initializer`](crate::PoolBuilder::initializer)): a pool whose workers
    /// keep failing to start backs off and trips instead of forking without end.
    ///
    /// Shrinking retires idle workers first; if too few are idle, busy workers are chosen
    /// (the least loaded first), take no new task, and leave once the tasks they hold are
    /// done: no running task is interrupted, and no task runs twice. Retired workers count
    /// as recycles ([`Recycles::shrink`](crate::Recycles::shrink)).
    ///
    /// A closed or terminated pool only records the number. Chunk sizes and `imap`'s
    /// window chosen after the call follow the new number.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(1).build()?;
    ///     let pending = pool.map_async(square, 0..1000u64);
    ///     pool.resize(3); // two more workers join the map
    ///     assert_eq!(pending.get()?.len(), 1000);
    ///     pool.resize(1);
    ///     assert_eq!(pool.processes(), 1);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Panics
    /// If `processes` is 0.
    pub fn resize(&self, processes: usize) {
        assert!(processes > 0, "a pool needs at least one process");
        if processes > self.processes() {
            crate::builder::raise_fd_limit(processes);
        }
        self.processes.store(processes, Ordering::Relaxed);
        self.shared.span.record("processes", processes);
        tracing::debug!(parent: &self.shared.span, processes, "pool resized");
        self.shared.act(|p, fx| p.resize(processes, fx));
    }

    /// How the pool starts workers.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// The live workers, oldest first: Python's `active_children()`. A worker about to be
    /// recycled and its already started replacement may both be listed.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     let workers = pool.workers();
    ///     assert_eq!(workers.len(), 2);
    ///     assert_ne!(workers[0].pid(), workers[1].pid());
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    #[doc(alias = "active_children")]
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let now = pool_spawn::protocol::monotonic_ns();
        // Read outside the pool's lock: /proc takes a few microseconds a worker.
        self.shared
            .workers()
            .into_iter()
            .map(|w| WorkerInfo {
                rss: resident_bytes(w.pid),
                name: w.name,
                pid: w.pid,
                ready: w.ready,
                tasks_done: w.answers,
                current_task: w.running.map(|(id, _)| id),
                running_for: w.running.map(|(_, since)| {
                    Duration::from_nanos(if since == 0 {
                        0
                    } else {
                        now.saturating_sub(since)
                    })
                }),
            })
            .collect()
    }

    /// Counters of the pool's work so far.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     assert_eq!(pool.metrics().submitted, 0);
    ///     pool.close();
    ///     pool.join()?;
    ///     assert_eq!(pool.metrics().workers_started, 2);
    ///     Ok(())
    /// }
    /// ```
    pub fn metrics(&self) -> Metrics {
        let (c, queued, running, depth, processes, workers, timings) = self.shared.snapshot();
        Metrics {
            submitted: c.submitted,
            completed: c.completed,
            lost: c.lost,
            terminated: c.terminated,
            init_failed: c.init_failed,
            workers_started: c.launched,
            recycled: c.recycled,
            recycled_memory: c.recycled_memory,
            died: c.died,
            stopped: c.stopped,
            timed_out: c.timed_out,
            cancelled: c.cancelled,
            start_failures: c.start_failures,
            queued,
            running,
            in_flight_per_worker: depth,
            processes,
            workers,
            items: self.shared.tally.outcomes(),
            recycles: crate::metrics::Recycles {
                max_tasks: c.recycled_max_tasks,
                memory: c.recycled_memory,
                closing: c.recycled_closing,
                shrink: c.recycled_shrink,
            },
            queue_wait: timings.0,
            run_time: timings.1,
        }
    }

    /// What cancelling the tasks of a submission in `group` reaches.
    pub(crate) fn canceller(&self, group: Arc<crate::driver::Group>) -> crate::result::Canceller {
        crate::result::Canceller {
            shared: Arc::downgrade(&self.shared),
            group,
        }
    }

    /// Stops accepting tasks; workers exit once the queued ones are done: Python's `close`.
    /// Iterators from [`imap`](Pool::imap) made before it go on sending their items, as
    /// does a [`map`](Pool::map) still sending its chunks in another thread.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     let pending = pool.apply_async(square, (4,));
    ///     pool.close();
    ///     // Work already queued still runs; new work is refused.
    ///     assert_eq!(pending.get()?, 16);
    ///     let refused = pool.apply(square, (5,)).unwrap_err();
    ///     assert_eq!(refused.kind(), procpool::TaskErrorKind::PoolClosed);
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn close(&self) {
        self.shared.act(|p, fx| p.close(fx));
    }

    /// Stops now: unfinished tasks fail with [`TaskErrorKind::PoolClosed`](crate::TaskErrorKind::PoolClosed), workers get
    /// SIGTERM then, after a short grace, SIGKILL: Python's `terminate`.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// use std::time::Duration;
    ///
    /// fn sleep_ms(ms: u64) {
    ///     std::thread::sleep(Duration::from_millis(ms));
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(1).build()?;
    ///     let long = pool.apply_async(sleep_ms, (60_000,));
    ///     pool.terminate();
    ///     pool.join()?; // returns once the workers are reaped, well before the minute is up
    ///     assert_eq!(long.get().unwrap_err().kind(), procpool::TaskErrorKind::PoolClosed);
    ///     Ok(())
    /// }
    /// ```
    pub fn terminate(&self) {
        self.shared.terminate();
    }

    /// Waits until every worker has exited and been reaped: Python's `join`. A
    /// [`map`](Pool::map) begun before [`close`](Pool::close) (in another thread) that is
    /// still sending its chunks sends them all first; items an unfinished
    /// [`imap`](Pool::imap) has not sent yet will not be sent.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    ///     assert!(pool.join().is_err()); // not closed: the wait would never end
    ///     pool.close();
    ///     pool.join()?;
    ///     assert!(pool.workers().is_empty());
    ///     for pid in pids {
    ///         assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists()); // reaped
    ///     }
    ///     Ok(())
    /// }
    /// ```
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
        // A map begun before close (in another thread) still handing its chunks over
        // finishes first, as it would in Python; then the imaps' feeds end.
        self.shared.wait_waited_feeds(None);
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
        let deadline = crate::result::deadline_after(timeout);
        // As `join`: maps still handing their chunks over finish first, within the time.
        if self.shared.wait_waited_feeds(Some(deadline)) {
            self.shared.act(|p, fx| p.revoke_feeds(fx));
        }
        match self.finished.recv_deadline(deadline) {
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

/// The resident memory of process `pid`, in bytes, from `/proc/<pid>/statm`.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
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
            .field("processes", &self.processes())
            .field("start_method", &self.method)
            .finish_non_exhaustive()
    }
}
