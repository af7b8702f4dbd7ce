//! Submitting tasks: `apply` and `map`/`starmap` and their async forms, down to the task
//! records handed to the policy, and `complete`, which fills a result's slot after its
//! callbacks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use serde::de::DeserializeOwned;

use crate::chunk::{Encoded, encode_chunk};
use crate::driver::{self, Outcome, Shared, Sink, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::policy::Refusal;
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Slot};
use crate::task::Task;

/// Delivers a result to its slot, running callbacks first (on the callback thread).
pub(crate) fn complete<T: Send + 'static>(
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
    /// A fresh task id.
    pub(crate) fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one encoded batch; `done` receives exactly one per-item result vector.
    pub(crate) fn submit_batch<R>(
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
    pub(crate) fn prepare_batch<R>(
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
            placement,
            pins,
        } = enc;
        let n_sent = placement.sent();
        if n_sent == 0 {
            done(placement.merge(Vec::new(), base));
            return None;
        }
        let sink: Sink = Box::new(move |outcome: Outcome| {
            // The worker has decoded the arguments (or never will): release their events.
            drop(pins);
            let got = driver::decode_items::<R>(outcome, n_sent);
            done(placement.merge(got, base));
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
    pub(crate) fn submit_all(&self, tasks: Vec<(u64, TaskRec)>, fed: bool) {
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
                Refusal::CannotStart(m) => TaskError::new(TaskErrorKind::StartFailed, m),
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
    pub fn apply<F, Args>(&self, f: F, args: Args) -> Result<F::Output, TaskError>
    where
        F: Task<Args>,
    {
        self.apply_async(f, args).get()
    }

    /// Submits `f(args...)` and returns at once: Python's `apply_async`.
    pub fn apply_async<F, Args>(&self, f: F, args: Args) -> AsyncResult<F::Output>
    where
        F: Task<Args>,
    {
        self.apply_async_with(f, args, Callbacks::new())
    }

    /// [`apply_async`](Pool::apply_async) with Python's `callback` and `error_callback`.
    pub fn apply_async_with<F, Args>(
        &self,
        f: F,
        args: Args,
        callbacks: Callbacks<F::Output>,
    ) -> AsyncResult<F::Output>
    where
        F: Task<Args>,
    {
        let slot = Slot::new();
        let out = AsyncResult::new(Arc::clone(&slot));
        let weak = Arc::downgrade(&self.shared);
        let func = f.batch_ref();
        let enc = encode_chunk::<F, Args>(self.new_id(), func, std::slice::from_ref(&args));
        self.submit_batch::<F::Output>(enc, None, false, move |mut items| {
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
    pub fn map<F, A, I>(&self, f: F, items: I) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, None, Callbacks::new()).get()
    }

    /// [`map`](Pool::map) with an explicit chunk size (Python's `chunksize`).
    #[doc(alias = "chunksize")]
    pub fn map_chunked<F, A, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, Some(chunksize), Callbacks::new())
            .get()
    }

    /// Submits a `map` and returns at once: Python's `map_async`.
    pub fn map_async<F, A, I>(&self, f: F, items: I) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, None, Callbacks::new())
    }

    /// [`map_async`](Pool::map_async) with a chunk size (`None`: automatic) and callbacks.
    pub fn map_async_with<F, A, I>(
        &self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        callbacks: Callbacks<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        let func = f.batch_ref();
        // One-tuples: the task's arguments, the same bytes as the items themselves.
        let items: Vec<(A,)> = items.into_iter().map(|a| (a,)).collect();
        self.gather::<F, _>(func, &items, chunksize, callbacks)
    }

    /// Like [`map`](Pool::map) for functions of several arguments: each item is a tuple of
    /// arguments. Python's `starmap`.
    ///
    /// # Errors
    /// The error of the first failing item (by index).
    pub fn starmap<F, Args, I>(&self, f: F, items: I) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_async_with(f, items, None, Callbacks::new())
            .get()
    }

    /// Submits a `starmap` and returns at once: Python's `starmap_async`.
    pub fn starmap_async<F, Args, I>(&self, f: F, items: I) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_async_with(f, items, None, Callbacks::new())
    }

    /// [`starmap_async`](Pool::starmap_async) with a chunk size (`None`: automatic) and
    /// callbacks.
    pub fn starmap_async_with<F, Args, I>(
        &self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        callbacks: Callbacks<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        let func = f.batch_ref();
        let items: Vec<Args> = items.into_iter().collect();
        self.gather::<F, _>(func, &items, chunksize, callbacks)
    }
}
