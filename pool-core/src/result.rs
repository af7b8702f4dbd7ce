//! [`AsyncResult`]: the handle to a result that is on its way, and [`Callbacks`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::driver::{Deliver, Group, Outcome, Shared};
use crate::error::TaskError;
use crate::items::Items;
use crate::observe::Tally;

enum State<T> {
    Pending,
    Ready(Result<T, TaskError>),
    Taken,
}

/// Where one result lands: filled once by the pool, taken once by the user.
pub(crate) struct Slot<T> {
    /// The result, the waker of a task awaiting it, and how many threads wait on `cond`.
    state: Mutex<(State<T>, Option<Waker>, usize)>,
    cond: Condvar,
    /// For a slot that is its task's sink ([`Slot::single`]): the pool's tally of item
    /// outcomes, and the task's span.
    single: Option<(Arc<Tally>, tracing::Span)>,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new((State::Pending, None, 0)),
            cond: Condvar::new(),
            single: None,
        })
    }

    /// The slot of the result of a task of one item with no callbacks, which is also the
    /// task's sink: the answer is decoded straight into it, counted in `tally` and told to
    /// `span`, with no sink, closure or list of items of its own.
    pub(crate) fn single(tally: Arc<Tally>, span: tracing::Span) -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new((State::Pending, None, 0)),
            cond: Condvar::new(),
            single: Some((tally, span)),
        })
    }

    /// Stores the result and wakes every waiter. A second fill is ignored.
    pub(crate) fn fill(&self, value: Result<T, TaskError>) {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(g.0, State::Pending) {
            g.0 = State::Ready(value);
            if let Some(w) = g.1.take() {
                w.wake();
            }
            if g.2 > 0 {
                self.cond.notify_all();
            }
        }
    }

    fn is_ready(&self) -> bool {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        !matches!(g.0, State::Pending)
    }

    fn successful(&self) -> Result<Option<bool>, WaitError> {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &g.0 {
            State::Pending => Ok(None),
            State::Taken => Err(WaitError::Taken),
            State::Ready(r) => Ok(Some(r.is_ok())),
        }
    }

    /// Waits until filled or until `deadline`; true if filled.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !matches!(g.0, State::Pending) {
                return true;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            g.2 += 1;
            g = match deadline {
                None => self.cond.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    self.cond
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            g.2 -= 1;
        }
    }

    /// The result if it is in, taken in one look (for `apply`, whose own wait on the
    /// worker has usually brought it: an `AsyncResult::get` would look three times);
    /// `None` if it is not in yet (or was taken).
    pub(crate) fn take_ready(&self) -> Option<Result<T, TaskError>> {
        self.take().ok().flatten()
    }

    /// The result, if it is there; `Err(Taken)` if it was taken before.
    fn take(&self) -> Result<Option<Result<T, TaskError>>, WaitError> {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut g.0, State::Taken) {
            State::Ready(r) => Ok(Some(r)),
            State::Taken => Err(WaitError::Taken),
            State::Pending => {
                g.0 = State::Pending;
                Ok(None)
            }
        }
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<T, TaskError>> {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut g.0, State::Taken) {
            State::Ready(r) => Poll::Ready(r),
            State::Taken => panic!("an AsyncResult polled after it returned its result"),
            State::Pending => {
                g.0 = State::Pending;
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Deliver for Slot<T>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    fn deliver(&self, first: usize, count: usize, outcome: Outcome) {
        // Decoded before the lock: it is user code, and may take long.
        let result = crate::driver::decode_one::<T>(outcome, count);
        let result = match (&self.single, result) {
            (Some((tally, span)), Ok(v)) => {
                tally.count_ok(span, 1);
                Ok(v)
            }
            (Some((tally, span)), Err(e)) => {
                let items = Items::Mixed(vec![Err(e)]);
                tally.count(span, first, &items);
                items.into_last().expect("the one item")
            }
            (None, r) => r,
        };
        self.fill(result);
    }
}

/// The handle to a result that is on its way: Python's `AsyncResult`.
///
/// Returned by [`Pool::apply_async`](crate::Pool::apply_async),
/// [`Pool::map_async`](crate::Pool::map_async) and
/// [`Pool::starmap_async`](crate::Pool::starmap_async). Every handle resolves: with the value,
/// or with a [`TaskError`] saying why not (the task panicked, its worker died, the pool was
/// terminated, ...). It is also a [`Future`], for async code.
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// use std::time::Duration;
/// use procpool::{CancelOutcome, WaitError};
///
/// fn nap(ms: u64) -> u64 {
///     std::thread::sleep(Duration::from_millis(ms));
///     ms
/// }
///
/// fn main() -> Result<(), procpool::Error> {
///     procpool::init();
///     let pool = procpool::Pool::builder().processes(1).build()?;
///     let r = pool.apply_async(nap, (300,));
///     // Running out of time to wait is not the task failing.
///     assert_eq!(r.get_timeout(Duration::from_millis(1)), Err(WaitError::TimedOut));
///     assert_eq!(r.get_timeout(Duration::from_secs(10)), Ok(Ok(300)));
///     let long = pool.apply_async(nap, (60_000,));
///     std::thread::sleep(Duration::from_millis(100));
///     assert_eq!(long.cancel(), CancelOutcome::WhileRunning);
///     assert!(long.get().unwrap_err().is_cancelled());
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
pub struct AsyncResult<T> {
    slot: Arc<Slot<T>>,
    cancel: Canceller,
    /// Items done of a `map`'s (`None`: one task).
    done: Option<Arc<Done>>,
    /// The task whose answer is the result, when one task's is (`apply_async`): a caller
    /// waiting for it reads it from its worker itself.
    own: Option<u64>,
}

/// The items of a `map` whose results are in, updated as its chunks come back.
#[derive(Debug)]
pub(crate) struct Done {
    done: AtomicUsize,
    total: usize,
}

impl Done {
    pub(crate) fn new(total: usize) -> Arc<Self> {
        Arc::new(Done {
            done: AtomicUsize::new(0),
            total,
        })
    }

    /// `n` more items have their result.
    pub(crate) fn add(&self, n: usize) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// How far a submission has got: [`AsyncResult::progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Progress {
    /// Items whose result (value or error) is in.
    pub done: usize,
    /// Items submitted.
    pub total: usize,
}

impl Progress {
    /// True once every item has its result.
    pub fn is_complete(&self) -> bool {
        self.done >= self.total
    }
}

/// What cancelling a submission reaches: its tasks in the pool.
#[derive(Clone, Debug)]
pub(crate) struct Canceller {
    pub(crate) shared: Weak<Shared>,
    pub(crate) group: Arc<Group>,
}

/// What [`AsyncResult::cancel`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// Nothing had begun: it never runs.
    BeforeStart,
    /// It was running: its worker (with its process group) was stopped and is replaced.
    /// Of a `map`, at least one chunk was running; the others never run.
    WhileRunning,
    /// It had already finished (or failed): nothing changed, the result stands.
    AlreadyFinished,
}

/// Why waiting for a result returned without it: never the task's own failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitError {
    /// The time ran out; the task goes on, and a later call can still fetch its result.
    TimedOut,
    /// An earlier call already took the result out of this handle.
    Taken,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut => write!(f, "the result did not arrive in time"),
            WaitError::Taken => write!(f, "the result was already taken from this handle"),
        }
    }
}

impl std::error::Error for WaitError {}

impl<T> AsyncResult<T> {
    pub(crate) fn new(slot: Arc<Slot<T>>, cancel: Canceller) -> Self {
        AsyncResult {
            slot,
            cancel,
            done: None,
            own: None,
        }
    }

    /// A handle whose result is the answer of task `id` alone.
    pub(crate) fn of_task(mut self, id: u64) -> Self {
        self.own = Some(id);
        self
    }

    /// Waits until the result is in or `deadline` passes, reading the answer from the
    /// worker on this thread while it can (see `Shared::read_own_answer`), then on the slot
    /// the pool fills: true if the result is in.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        if let Some(id) = self.own
            && let Some(shared) = self.cancel.shared.upgrade()
        {
            while !self.slot.is_ready() && shared.read_own_answer(id, deadline) {}
        }
        self.slot.wait_until(deadline)
    }

    /// A handle whose progress `done` counts.
    pub(crate) fn counting(mut self, done: Arc<Done>) -> Self {
        self.done = Some(done);
        self
    }

    /// How many items have their result, of how many: for a `map_async` or
    /// `starmap_async`, items count as their chunk comes back, so a caller can draw a
    /// progress bar; an `apply_async` is one item, done once its result is ready. `done`
    /// reaches `total` before the result is ready (the last chunk is still being put in
    /// order).
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
    ///     let pending = pool.map_async(square, 0..1000u64);
    ///     let total = pending.progress().total;
    ///     assert_eq!(total, 1000);
    ///     while !pending.progress().is_complete() {
    ///         std::thread::sleep(std::time::Duration::from_millis(1)); // draw a bar here
    ///     }
    ///     assert_eq!(pending.get()?.len(), 1000);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn progress(&self) -> Progress {
        match &self.done {
            Some(d) => Progress {
                done: d.done.load(Ordering::Relaxed).min(d.total),
                total: d.total,
            },
            None => Progress {
                done: usize::from(self.slot.is_ready()),
                total: 1,
            },
        }
    }

    /// Blocks until the result arrives, and returns it.
    ///
    /// # Errors
    /// The task's [`TaskError`] if it failed.
    pub fn get(self) -> Result<T, TaskError> {
        self.wait_until(None);
        match self.slot.take() {
            Ok(Some(r)) => r,
            // `get` takes the handle: nothing took the result before.
            _ => unreachable!("the slot is filled after the wait, and only `get` empties it"),
        }
    }

    /// Waits at most `timeout` for the result and takes it: `Ok` holds the task's own
    /// outcome; `Err` says why the wait ended without it, which is never the task's
    /// failure (as Python's `TimeoutError`).
    ///
    /// # Errors
    /// [`WaitError::TimedOut`] if the result did not arrive in time: the task goes on, and a
    /// later call can still fetch it. [`WaitError::Taken`] if an earlier call already took
    /// it.
    #[doc(alias = "get")]
    pub fn get_timeout(&self, timeout: Duration) -> Result<Result<T, TaskError>, WaitError> {
        if !self.wait_until(Some(deadline_after(timeout))) {
            return Err(WaitError::TimedOut);
        }
        self.slot.take()?.ok_or(WaitError::TimedOut)
    }

    /// Cancels the task (every chunk of a `map`): what had not begun never runs; what was
    /// running has its worker stopped (SIGTERM to its process group, then SIGKILL) and
    /// replaced; a finished task is left as it is. The result, unless it was already
    /// there, becomes [`TaskErrorKind::Cancelled`](crate::TaskErrorKind::Cancelled) at
    /// once. Says which of these happened.
    pub fn cancel(&self) -> CancelOutcome {
        match self.cancel.shared.upgrade() {
            Some(shared) => shared.cancel(&self.cancel.group.ids(), true),
            None => CancelOutcome::AlreadyFinished,
        }
    }

    /// Blocks until the result is available, without taking it.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout`; true if the result is available.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(deadline_after(timeout)))
    }

    /// True once the result is available (whether success or failure).
    pub fn ready(&self) -> bool {
        self.slot.is_ready()
    }

    /// Whether the task succeeded, once its result is here: `Ok(None)` while it is not ready
    /// (Python raises `ValueError` there).
    ///
    /// # Errors
    /// [`WaitError::Taken`] once the result was taken out of this handle.
    pub fn successful(&self) -> Result<Option<bool>, WaitError> {
        self.slot.successful()
    }
}

/// # Panics
/// Polled again after it returned its result, or after
/// [`get_timeout`](AsyncResult::get_timeout) took it.
impl<T> Future for AsyncResult<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.slot.poll_take(cx)
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

type SuccessFn<T> = Box<dyn FnOnce(&T) + Send>;
type ErrorFn = Box<dyn FnOnce(&TaskError) + Send>;

/// Functions run when an asynchronous task finishes: Python's `callback` and `error_callback`.
///
/// They run on the pool's callback thread, before the [`AsyncResult`] becomes ready. A
/// callback that panics is caught and logged; it cannot break the pool, and the result is
/// still delivered.
pub(crate) struct Callbacks<T> {
    pub(crate) on_success: Option<SuccessFn<T>>,
    pub(crate) on_error: Option<ErrorFn>,
}

impl<T> Callbacks<T> {
    /// No callbacks yet.
    pub(crate) fn new() -> Self {
        Callbacks {
            on_success: None,
            on_error: None,
        }
    }

    /// Runs `f` with the result when the task succeeds.
    #[doc(alias = "callback")]
    pub(crate) fn on_success(mut self, f: impl FnOnce(&T) + Send + 'static) -> Self {
        self.on_success = Some(Box::new(f));
        self
    }

    /// Runs `f` with the error when the task fails.
    #[doc(alias = "error_callback")]
    pub(crate) fn on_error(mut self, f: impl FnOnce(&TaskError) + Send + 'static) -> Self {
        self.on_error = Some(Box::new(f));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.on_success.is_none() && self.on_error.is_none()
    }
}

impl<T> Default for Callbacks<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Callbacks<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Callbacks")
            .field("on_success", &self.on_success.is_some())
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

/// The instant `timeout` from now; a timeout too long to represent (`Duration::MAX`, say)
/// means a century, which is to say never.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
