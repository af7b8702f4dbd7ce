//! [`AsyncResult`]: the handle to a result that is on its way, and [`Callbacks`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{TaskError, TaskErrorKind};

enum State<T> {
    Pending,
    Ready(Result<T, TaskError>),
    Taken,
}

/// Where one result lands: filled once by the pool, taken once by the user.
pub(crate) struct Slot<T> {
    state: Mutex<(State<T>, Option<Waker>)>,
    cond: Condvar,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new((State::Pending, None)),
            cond: Condvar::new(),
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
            self.cond.notify_all();
        }
    }

    fn is_ready(&self) -> bool {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        !matches!(g.0, State::Pending)
    }

    fn successful(&self) -> Option<bool> {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &g.0 {
            State::Pending | State::Taken => None,
            State::Ready(r) => Some(r.is_ok()),
        }
    }

    /// Waits until filled or until `deadline`; true if filled.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !matches!(g.0, State::Pending) {
                return true;
            }
            match deadline {
                None => g = self.cond.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    g = self
                        .cond
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    fn take(&self) -> Option<Result<T, TaskError>> {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut g.0, State::Taken) {
            State::Ready(r) => Some(r),
            State::Taken => Some(Err(TaskError::new(TaskErrorKind::ResultTaken, ""))),
            State::Pending => {
                g.0 = State::Pending;
                None
            }
        }
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<T, TaskError>> {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut g.0, State::Taken) {
            State::Ready(r) => Poll::Ready(r),
            State::Taken => Poll::Ready(Err(TaskError::new(TaskErrorKind::ResultTaken, ""))),
            State::Pending => {
                g.0 = State::Pending;
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The handle to a result that is on its way: Python's `AsyncResult`.
///
/// Returned by [`Pool::apply_async`](crate::Pool::apply_async),
/// [`Pool::map_async`](crate::Pool::map_async) and
/// [`Pool::starmap_async`](crate::Pool::starmap_async). Every handle resolves: with the value,
/// or with a [`TaskError`] saying why not (the task panicked, its worker died, the pool was
/// terminated, ...). It is also a [`Future`], for async code.
pub struct AsyncResult<T> {
    slot: Arc<Slot<T>>,
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(slot: Arc<Slot<T>>) -> Self {
        AsyncResult { slot }
    }

    /// Blocks until the result arrives, and returns it.
    ///
    /// # Errors
    /// The task's [`TaskError`] if it failed.
    pub fn get(self) -> Result<T, TaskError> {
        self.slot.wait_until(None);
        self.slot.take().expect("slot is filled after wait")
    }

    /// Waits at most `timeout` for the result.
    ///
    /// # Errors
    /// [`TaskErrorKind::NotReady`] if the result did not arrive in time: the task goes on, and
    /// a later call can still fetch it. [`TaskErrorKind::ResultTaken`] if an earlier call
    /// already returned it. Otherwise the task's own error.
    #[doc(alias = "get")]
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, TaskError> {
        if !self.slot.wait_until(Some(deadline_after(timeout))) {
            return Err(TaskError::new(
                TaskErrorKind::NotReady,
                format!("still running after {:.3}s", timeout.as_secs_f64()),
            ));
        }
        self.slot.take().expect("slot is filled after wait")
    }

    /// Blocks until the result is available, without taking it.
    pub fn wait(&self) {
        self.slot.wait_until(None);
    }

    /// Waits at most `timeout`; true if the result is available.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.slot.wait_until(Some(deadline_after(timeout)))
    }

    /// True once the result is available (whether success or failure).
    pub fn ready(&self) -> bool {
        self.slot.is_ready()
    }

    /// `Some(true)` if the task succeeded, `Some(false)` if it failed, `None` while it is not
    /// ready (Python raises `ValueError` there) or after the result was taken.
    pub fn successful(&self) -> Option<bool> {
        self.slot.successful()
    }
}

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
pub struct Callbacks<T> {
    pub(crate) on_success: Option<SuccessFn<T>>,
    pub(crate) on_error: Option<ErrorFn>,
}

impl<T> Callbacks<T> {
    /// No callbacks yet.
    pub fn new() -> Self {
        Callbacks {
            on_success: None,
            on_error: None,
        }
    }

    /// Runs `f` with the result when the task succeeds.
    #[doc(alias = "callback")]
    pub fn on_success(mut self, f: impl FnOnce(&T) + Send + 'static) -> Self {
        self.on_success = Some(Box::new(f));
        self
    }

    /// Runs `f` with the error when the task fails.
    #[doc(alias = "error_callback")]
    pub fn on_error(mut self, f: impl FnOnce(&TaskError) + Send + 'static) -> Self {
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
