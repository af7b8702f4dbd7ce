//! [`Metrics`]: a snapshot of a pool's counters, with its parts [`Outcomes`],
//! [`Recycles`] and [`Summary`]; serde-serializable, for export.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Counters of a pool's work so far.
///
/// Take one with [`Pool::metrics`](crate::Pool::metrics); a `map` counts as one task per
/// chunk, except in [`items`](Metrics::items), which counts each item's outcome.
///
/// It is a plain snapshot, `serde`-serializable (to JSON, say, for a status endpoint). To
/// export it to Prometheus or OpenTelemetry without either becoming a dependency of the
/// pool, read a snapshot when the exporter collects and hand over its numbers: the `u64`
/// counters are monotonic counters (`procpool_tasks_submitted_total`, ...), `queued`,
/// `running`, `workers` and `processes` are gauges, and each [`Summary`] is a histogram
/// (its [`buckets`](Summary::buckets) are per bucket; a Prometheus histogram wants them
/// summed up to each bound, as [`Summary::cumulative`] gives them, with `sum` and
/// `count`). With the `prometheus` crate, a custom `Collector` whose `collect` takes a
/// snapshot; with OpenTelemetry, observable counters and gauges whose callbacks read one.
///
/// The `examples/pool_life.rs` example prints one as JSON.
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
///     for x in 0..3 {
///         pool.apply(square, (x,))?;
///     }
///     let m = pool.metrics();
///     assert_eq!((m.submitted, m.completed, m.lost), (3, 3, 0));
///     assert_eq!((m.queued, m.running), (0, 0));
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Workers that exited after `max_tasks_per_child` tasks, on close, or over their memory
    /// limit.
    pub recycled: u64,
    /// Of `recycled`: workers whose resident memory grew past `max_memory_per_child`.
    pub recycled_memory: u64,
    /// Workers that died unexpectedly (and were replaced).
    pub died: u64,
    /// Workers the pool stopped because of their task (time limit, cancellation).
    pub stopped: u64,
    /// Tasks failed because they ran past their time limit.
    pub timed_out: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Worker starts that failed (initializer, image mismatch, early death).
    pub start_failures: u64,
    /// Tasks waiting for a worker now.
    pub queued: usize,
    /// Tasks handed to workers now.
    pub running: usize,
    /// The number of workers the pool keeps now (see [`Pool::resize`](crate::Pool::resize)).
    pub processes: usize,
    /// Workers alive now (a worker about to be recycled and its replacement both count).
    pub workers: usize,
    /// The outcome of every item delivered so far (an `apply` is one item, a `map` one per
    /// element), by kind.
    pub items: Outcomes,
    /// Recycled workers, by reason.
    pub recycles: Recycles,
    /// From a task's submission until its worker could begin it (tasks with a result).
    pub queue_wait: Summary,
    /// From when a task's worker could begin it until its result arrived (tasks with a
    /// result; a chunk of a `map` is one task).
    pub run_time: Summary,
    /// How many tasks each worker may hold now: 1 for tasks of 20 ms or more (or of
    /// unknown length), up to 1024 when tasks are so short that round trips would leave
    /// workers idle.
    pub in_flight_per_worker: usize,
}

/// The outcome of every item delivered, by kind: `ok`, or the [`TaskErrorKind`] of its
/// error.
///
/// [`TaskErrorKind`]: crate::TaskErrorKind
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Outcomes {
    /// Items that returned a value.
    pub ok: u64,
    /// [`Panicked`](crate::TaskErrorKind::Panicked).
    pub panicked: u64,
    /// [`WorkerLost`](crate::TaskErrorKind::WorkerLost).
    pub worker_lost: u64,
    /// [`TimedOut`](crate::TaskErrorKind::TimedOut).
    pub timed_out: u64,
    /// [`Cancelled`](crate::TaskErrorKind::Cancelled).
    pub cancelled: u64,
    /// [`MemoryLimit`](crate::TaskErrorKind::MemoryLimit).
    pub memory_limit: u64,
    /// [`Encode`](crate::TaskErrorKind::Encode).
    pub encode: u64,
    /// [`Decode`](crate::TaskErrorKind::Decode).
    pub decode: u64,
    /// [`PoolClosed`](crate::TaskErrorKind::PoolClosed).
    pub pool_closed: u64,
    /// [`InitializerFailed`](crate::TaskErrorKind::InitializerFailed).
    pub initializer_failed: u64,
    /// [`StartFailed`](crate::TaskErrorKind::StartFailed).
    pub start_failed: u64,
    /// Kinds added after these.
    pub other: u64,
}

/// Recycled workers by reason (they left as asked, and were replaced if the pool needed
/// them): never crashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Recycles {
    /// After [`max_tasks_per_child`](crate::PoolBuilder::max_tasks_per_child) tasks.
    pub max_tasks: u64,
    /// Over [`max_memory_per_child`](crate::PoolBuilder::max_memory_per_child).
    pub memory: u64,
    /// Idle when the pool closed.
    pub closing: u64,
    /// Retired by [`Pool::resize`](crate::Pool::resize) to fewer workers.
    pub shrink: u64,
}

/// A summary of durations: how many, their sum and maximum, and a histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Summary {
    /// How many durations.
    pub count: u64,
    /// Their sum, in nanoseconds.
    pub sum_ns: u64,
    /// The longest, in nanoseconds.
    pub max_ns: u64,
    /// How many fell in each bucket: `buckets[i]` counts durations up to
    /// [`Summary::BOUNDS_NS`]`[i]` (and above the bound before it); the last bucket counts
    /// those above every bound.
    pub buckets: [u64; 8],
}

impl Summary {
    /// The upper bounds of the buckets but the last, in nanoseconds: 100 µs, 1 ms, 10 ms,
    /// 100 ms, 1 s, 10 s, 60 s.
    pub const BOUNDS_NS: [u64; 7] = [
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
        1_000_000_000,
        10_000_000_000,
        60_000_000_000,
    ];

    pub(crate) fn add(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
        let i = Self::BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(7);
        self.buckets[i] += 1;
    }

    /// The sum of the durations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }

    /// The longest duration.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The mean duration, if there is any.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.sum_ns / self.count))
    }

    /// The buckets as a Prometheus histogram has them: for each bound (`None`: +Inf), the
    /// number of durations up to it.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        let bounds = Self::BOUNDS_NS
            .iter()
            .map(|&b| Some(Duration::from_nanos(b)));
        bounds
            .chain(std::iter::once(None))
            .zip(self.buckets.iter().scan(0u64, |acc, &n| {
                *acc += n;
                Some(*acc)
            }))
    }
}
