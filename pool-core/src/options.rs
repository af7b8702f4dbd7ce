//! [`Options`]: the per-call settings of a submission (Python's keyword arguments), in one
//! value.

use std::fmt;
use std::time::Duration;

use crate::error::TaskError;
use crate::result::Callbacks;

/// Per-call settings of an operation: Python's keyword arguments (`chunksize`, `callback`,
/// `error_callback`) and a time limit, for the `*_with` form of each operation
/// ([`Pool::apply_with`](crate::Pool::apply_with),
/// [`Pool::map_async_with`](crate::Pool::map_async_with),
/// [`Pool::imap_with`](crate::Pool::imap_with), ...).
///
/// `T` is what the callbacks see: the task's result for `apply`, the whole `Vec` of results
/// for `map` and `starmap`. `imap` takes no callbacks (it hands each result over as it
/// comes), so its options are `Options<()>`.
///
/// ```
/// use std::time::Duration;
/// use pool_core::Options;
///
/// let opts: Options<Vec<u32>> = Options::new()
///     .chunksize(64)
///     .timeout(Duration::from_secs(5))
///     .on_success(|v: &Vec<u32>| println!("{} results", v.len()))
///     .on_error(|e| eprintln!("failed: {e}"));
/// # let _ = opts;
/// ```
pub struct Options<T> {
    pub(crate) chunksize: Option<usize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) callbacks: Callbacks<T>,
}

impl<T> Options<T> {
    /// No setting: automatic chunks, the pool's time limit, no callback.
    pub fn new() -> Self {
        Options {
            chunksize: None,
            timeout: None,
            callbacks: Callbacks::new(),
        }
    }

    /// Items per task for `map`, `starmap` and `imap` (Python's `chunksize`). Default:
    /// when the number of items is known, about four chunks per worker (Python's rule), or
    /// more, a whole number per worker, when that would make chunks of over 8192 items;
    /// else 1.
    pub fn chunksize(mut self, n: usize) -> Self {
        self.chunksize = Some(n);
        self
    }

    /// The time limit of each task (each item of a `map`), from when it begins running in
    /// its worker: past it, the worker is stopped with its process group and replaced, and
    /// the task fails with [`TaskErrorKind::TimedOut`](crate::TaskErrorKind::TimedOut).
    /// Overrides [`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Runs `f` with the result when the operation succeeds (Python's `callback`), on the
    /// pool's callback thread, before the [`AsyncResult`](crate::AsyncResult) is ready.
    ///
    /// Callbacks run one at a time on that one thread: keep them short, and never wait in
    /// one for another result of the same pool that has callbacks (it becomes ready only
    /// once its own callbacks ran on this thread, so the wait would never end, as in
    /// Python's pool).
    #[doc(alias = "callback")]
    pub fn on_success(mut self, f: impl FnOnce(&T) + Send + 'static) -> Self {
        self.callbacks = self.callbacks.on_success(f);
        self
    }

    /// Runs `f` with the error when the operation fails (Python's `error_callback`), on the
    /// pool's callback thread, as [`on_success`](Options::on_success) runs.
    #[doc(alias = "error_callback")]
    pub fn on_error(mut self, f: impl FnOnce(&TaskError) + Send + 'static) -> Self {
        self.callbacks = self.callbacks.on_error(f);
        self
    }
}

impl<T> Default for Options<T> {
    fn default() -> Self {
        Options::new()
    }
}

impl<T> fmt::Debug for Options<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("chunksize", &self.chunksize)
            .field("timeout", &self.timeout)
            .field("callbacks", &self.callbacks)
            .finish()
    }
}
