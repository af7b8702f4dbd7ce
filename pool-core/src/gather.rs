//! `map`'s chunks gathered into one result: every chunk's per-item results, in item order,
//! or the first failing item's error.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::chunk::auto_chunksize;
use crate::driver::Shared;
use crate::error::{TaskError, TaskErrorKind};
use crate::options::Options;
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Done, Slot};
use crate::submit::{Submission, complete};
use crate::task::Task;

impl Pool {
    /// Sends `items` in chunks as tasks calling `f`; the result holds every item's result
    /// in order, or the first failing item's error.
    pub(crate) fn gather<F, A>(
        &self,
        f: F,
        items: &[A],
        opts: Options<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
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
        let n = items.len();
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
            return out;
        }
        let size = chunksize
            .unwrap_or_else(|| auto_chunksize(n, self.processes()))
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
            let done = Arc::clone(&done);
            let task = self.prepare_batch::<F::Output>(
                &sub,
                sub.encode::<F, A>(self.new_id(), chunk),
                Some(base),
                move |results| {
                    done.add(results.len());
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
