//! `map`'s chunks gathered into one result: every chunk's per-item results, in item order,
//! or the first failing item's error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::chunk::auto_chunksize;
use crate::driver::{Shared, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::options::Options;
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Done, Slot};
use crate::submit::{Submission, complete};
use crate::task::Task;

/// A map's chunks as tasks, by id, ready to submit.
type Tasks = Vec<(u64, TaskRec)>;

impl Pool {
    /// Sends `items` in chunks as tasks calling `f`; the result holds every item's result
    /// in order, or the first failing item's error.
    ///
    /// Each chunk's items are dropped as soon as the chunk is encoded: the map holds its
    /// arguments once (as items, then as encoded chunks), not twice, and the memory of a
    /// large item is free again for the next chunk's frame.
    pub(crate) fn gather<F, A>(
        &self,
        f: F,
        items: Vec<A>,
        opts: Options<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<A>,
    {
        let n = items.len();
        let (out, tasks) = self.prepare_gather(f, n, opts, |size, each| {
            let mut it = items.into_iter();
            let mut chunk = Vec::with_capacity(size.min(n));
            loop {
                chunk.extend(it.by_ref().take(size));
                if chunk.is_empty() {
                    break;
                }
                each(&chunk);
                chunk.clear();
            }
        });
        self.submit_all(tasks, false);
        out
    }

    /// As [`gather`](Pool::gather) if the queue has room for every chunk under `max`;
    /// `None` (nothing submitted) otherwise.
    pub(crate) fn try_gather<F, A>(
        &self,
        f: F,
        items: &[A],
        opts: Options<Vec<F::Output>>,
        max: usize,
    ) -> Option<AsyncResult<Vec<F::Output>>>
    where
        F: Task<A>,
    {
        let (out, tasks) = self.prepare_gather(f, items.len(), opts, |size, each| {
            for chunk in items.chunks(size) {
                each(chunk);
            }
        });
        self.try_submit_all(tasks, max).then_some(out)
    }

    /// The result of a `map` of `n` items and its chunks' tasks, ready to submit (chunks
    /// that could not be encoded are settled already). `chunks(size, each)` calls `each` on
    /// the items in chunks of `size`, in order.
    fn prepare_gather<F, A>(
        &self,
        f: F,
        n: usize,
        opts: Options<Vec<F::Output>>,
        chunks: impl FnOnce(usize, &mut dyn FnMut(&[A])),
    ) -> (AsyncResult<Vec<F::Output>>, Tasks)
    where
        F: Task<A>,
    {
        let Options {
            chunksize,
            timeout,
            callbacks,
        } = opts;
        let sub = Submission::new(f, self.timeout_of(timeout));
        let slot = Slot::new();
        let done = Done::new(n);
        let out =
            AsyncResult::new(Arc::clone(&slot), self.canceller(&sub)).counting(Arc::clone(&done));
        if n == 0 {
            complete(
                &Arc::downgrade(&self.shared),
                slot,
                Ok(Vec::new()),
                callbacks,
            );
            return (out, Vec::new());
        }
        let size = chunksize
            .unwrap_or_else(|| auto_chunksize(n, self.processes()))
            .max(1);
        let count = n.div_ceil(size);
        let state = Arc::new(Mutex::new(Gather {
            out: Vec::with_capacity(n),
            next: 0,
            early: BTreeMap::new(),
            err: None,
            remaining: count,
            slot: Some(slot),
            callbacks: Some(callbacks),
            shared: Arc::downgrade(&self.shared),
        }));
        let mut tasks = Vec::with_capacity(count);
        let mut c = 0;
        chunks(size, &mut |chunk| {
            let base = c * size;
            let state = Arc::clone(&state);
            let done = Arc::clone(&done);
            let task = self.prepare_batch::<F::Output>(
                &sub,
                sub.encode::<F, A>(self.new_id(), chunk),
                Some(base),
                move |results| {
                    done.add(results.len());
                    let mut g = state.lock().unwrap_or_else(PoisonError::into_inner);
                    g.arrived(c, results);
                    g.remaining -= 1;
                    if g.remaining == 0 {
                        g.finish();
                    }
                },
            );
            tasks.extend(task);
            c += 1;
        });
        (out, tasks)
    }
}

/// A map's result as its chunks come back: each chunk's results are moved into the final
/// vector as soon as the chunks before it are in (they mostly come back in order), so a
/// large map holds its results once, not a chunk vector of them and then the final one.
struct Gather<R> {
    /// The results of chunks `0..next`, in item order.
    out: Vec<R>,
    /// The next chunk to move into `out`.
    next: usize,
    /// Chunks that came back before their turn, by index.
    early: BTreeMap<usize, Vec<Result<R, TaskError>>>,
    /// The first failing item's error, in item order (`out` is dropped then).
    err: Option<TaskError>,
    remaining: usize,
    slot: Option<Arc<Slot<Vec<R>>>>,
    callbacks: Option<Callbacks<Vec<R>>>,
    shared: Weak<Shared>,
}

impl<R: Send + 'static> Gather<R> {
    /// Chunk `c` is back with `results`.
    fn arrived(&mut self, c: usize, results: Vec<Result<R, TaskError>>) {
        if c != self.next {
            self.early.insert(c, results);
            return;
        }
        self.take(results);
        while let Some(results) = self.early.remove(&self.next) {
            self.take(results);
        }
    }

    /// Moves the next chunk's results into `out`, or keeps its first error.
    fn take(&mut self, results: Vec<Result<R, TaskError>>) {
        self.next += 1;
        if self.err.is_some() {
            return;
        }
        for r in results {
            match r {
                Ok(v) => self.out.push(v),
                Err(e) => {
                    self.err = Some(e);
                    self.out = Vec::new();
                    return;
                }
            }
        }
    }

    fn finish(&mut self) {
        let result = match self.err.take() {
            Some(e) => Err(e),
            // Every chunk arrived, so every one has been moved in order.
            None if self.early.is_empty() => Ok(std::mem::take(&mut self.out)),
            None => Err(TaskError::new(TaskErrorKind::Decode, "missing result")),
        };
        if let (Some(slot), Some(cb)) = (self.slot.take(), self.callbacks.take()) {
            complete(&self.shared, slot, result, cb);
        }
    }
}
