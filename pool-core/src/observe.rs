//! What the pool tells about itself as it works: its `tracing` spans (one per pool, one per
//! task) and the counters behind [`Metrics`](crate::Metrics) that are kept outside the
//! policy (outcomes by kind, queue-wait and run-time summaries).
//!
//! Spans and events are at `debug` and `trace` level except the pool's own span (`info`):
//! with no subscriber listening, or one that does not want them, a disabled span is a
//! `Span::none()` (no allocation) and every event costs one check of a cached flag.
//!
//! The life of a task, as events in its span (`task{task function item items worker pid}`):
//! `task queued` (trace), `task sent` (trace, once its worker is known), `task started`
//! (debug: the worker holds it and nothing before it), then `task finished` or
//! `task failed` (debug, with the error's kind), with the queue wait and run time recorded
//! on the span and in the event. A worker's life, as events in the pool's span:
//! `worker started` (or `worker replaced`, `worker added` after a resize), `worker ready`,
//! then `worker recycled` (with the reason), `worker stopped`, `worker died` (with the exit
//! status), `worker failed to start` or `worker terminated`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pool_spawn::StartMethod;
use tracing::Span;
use tracing::field::Empty;

use crate::error::{TaskError, TaskErrorKind};
use crate::items::Items;
use crate::metrics::{Outcomes, Summary};

/// The span of a new pool: its id (counting pools built in this process), start method and
/// number of workers.
pub(crate) fn pool_span(method: StartMethod, processes: usize) -> Span {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    tracing::info_span!("pool", id, start_method = ?method, processes)
}

/// The span of task `id` calling `function` on `items` items, the first being item `item`
/// of its map (`None` for an `apply`). Its worker and pid are recorded once it is sent, its
/// queue wait and run time once it is done.
pub(crate) fn task_span(
    pool: &Span,
    id: u64,
    function: &'static str,
    item: Option<usize>,
    items: usize,
) -> Span {
    let span = tracing::debug_span!(
        parent: pool,
        "task",
        task = id,
        function,
        item = Empty,
        items,
        worker = Empty,
        pid = Empty,
        queue_wait = Empty,
        run_time = Empty,
    );
    if let Some(i) = item {
        span.record("item", i);
    }
    span
}

/// Item outcomes by kind, counted as results are delivered (outside the pool's lock).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    ok: AtomicU64,
    by_kind: [AtomicU64; KINDS],
}

/// The number of [`TaskErrorKind`]s counted apart (the last index holds any kind added
/// later).
const KINDS: usize = 11;

fn kind_index(kind: TaskErrorKind) -> usize {
    match kind {
        TaskErrorKind::Panicked => 0,
        TaskErrorKind::WorkerLost => 1,
        TaskErrorKind::Encode => 2,
        TaskErrorKind::Decode => 3,
        TaskErrorKind::PoolClosed => 4,
        TaskErrorKind::InitializerFailed => 5,
        TaskErrorKind::TimedOut => 6,
        TaskErrorKind::Cancelled => 7,
        TaskErrorKind::MemoryLimit => 8,
        TaskErrorKind::StartFailed => 9,
        #[allow(unreachable_patterns, reason = "TaskErrorKind is non-exhaustive")]
        _ => 10,
    }
}

impl Tally {
    /// Counts `n` items of task `span` that succeeded, and tells the span so.
    pub(crate) fn count_ok(&self, span: &Span, n: usize) {
        self.ok.fetch_add(n as u64, Ordering::Relaxed);
        tracing::debug!(parent: span, items = n, "task finished");
    }

    /// Counts `n` items that succeeded, of a task nobody traces.
    pub(crate) fn add_ok(&self, n: usize) {
        self.ok.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts the outcomes of some items of a task nobody traces.
    pub(crate) fn count_untraced<R>(&self, items: &Items<R>) {
        let items = match items {
            Items::Ok(v) => return self.add_ok(v.len()),
            Items::Mixed(items) => items,
        };
        for r in items {
            match r {
                Ok(_) => self.add_ok(1),
                Err(e) => {
                    self.by_kind[kind_index(e.kind())].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Counts the outcomes of some items of task `span`, and tells the span how they ended.
    pub(crate) fn count<R>(&self, span: &Span, first: usize, items: &Items<R>) {
        let items = match items {
            Items::Ok(v) => return self.count_ok(span, v.len()),
            Items::Mixed(items) => items,
        };
        let mut ok = 0;
        let mut first_err: Option<(usize, &TaskError)> = None;
        let mut failed = 0;
        for (i, r) in items.iter().enumerate() {
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    self.by_kind[kind_index(e.kind())].fetch_add(1, Ordering::Relaxed);
                    first_err.get_or_insert((first + i, e));
                }
            }
        }
        self.ok.fetch_add(ok, Ordering::Relaxed);
        match first_err {
            None => tracing::debug!(parent: span, items = ok, "task finished"),
            Some((index, e)) => tracing::debug!(
                parent: span,
                kind = ?e.kind(),
                index,
                failed,
                ok,
                error = %e,
                "task failed"
            ),
        }
    }

    pub(crate) fn outcomes(&self) -> Outcomes {
        let k = |i: usize| self.by_kind[i].load(Ordering::Relaxed);
        Outcomes {
            ok: self.ok.load(Ordering::Relaxed),
            panicked: k(0),
            worker_lost: k(1),
            encode: k(2),
            decode: k(3),
            pool_closed: k(4),
            initializer_failed: k(5),
            timed_out: k(6),
            cancelled: k(7),
            memory_limit: k(8),
            start_failed: k(9),
            other: k(10),
        }
    }
}

/// The queue-wait and run-time summaries, kept by the driver (under the pool's lock).
#[derive(Debug, Default)]
pub(crate) struct Timings {
    pub(crate) queue_wait: Summary,
    pub(crate) run_time: Summary,
}

impl Timings {
    /// A task waited `wait` from its submission until its worker could begin it, and ran
    /// for `ran`; its span records both.
    pub(crate) fn record(&mut self, span: &Span, wait: Duration, ran: Duration) {
        self.queue_wait.add(wait);
        self.run_time.add(ran);
        span.record("queue_wait", tracing::field::debug(wait));
        span.record("run_time", tracing::field::debug(ran));
    }
}
