//! [`Imap`]: `imap` and `imap_unordered`, which read their input only as workers free up
//! and yield results as they come.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::builder::{IMAP_BYTES_PER_WORKER, IMAP_WINDOW_MAX_PER_WORKER, IMAP_WINDOW_PER_WORKER};
use crate::chunk::auto_chunksize;
use crate::driver::{Group, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::options::Options;
use crate::pool::Pool;
use crate::submit::Submission;
use crate::task::Task;

/// A refill sends its chunks in batches of at most this many (one policy step and one write
/// per worker for each)...
const FILL_BATCH: usize = 256;

/// ... and waits until the window has room for an eighth of it (or nothing is in flight):
/// the chunks still queued keep the workers busy meanwhile.
const FILL_FRACTION: usize = 8;

/// What reading the next chunk of input came to.
enum Fed {
    /// A chunk was made (its arguments' bytes): it is in the batch to send, or settled
    /// already if it could not be encoded.
    Sent(usize),
    /// The input has ended.
    Ended,
    /// The input panicked: the items read before it in this chunk were made into one
    /// (`sent`, its bytes: there were some); the panic resumes on the consumer's thread at
    /// the place it happened.
    Panicked {
        sent: Option<usize>,
        payload: Box<dyn Any + Send>,
    },
}

impl Pool {
    /// Applies `f` to each item lazily and yields results in order as they come: Python's
    /// `imap`. The input is read only as workers free up (a bounded window of chunks in
    /// flight, the first ones sent at once: 32 per worker, up to 64 while the tasks are
    /// brief and their arguments small), so an endless iterator works and memory stays
    /// bounded. Chunk size: automatic when the iterator knows its length, else 1.
    ///
    /// As in Python, an imap made before [`close`](Pool::close) still gets all its results
    /// after it: it goes on sending its items as you consume it. [`join`](Pool::join) ends
    /// that (join cannot wait for a consumer that may be the joining thread): the next chunk
    /// it tries to send fails with [`TaskErrorKind::PoolClosed`] and the iterator ends
    /// there, reading no more input. Consume an imap before `join`.
    ///
    /// If the input iterator panics, the results of the items read before are still
    /// yielded, then the panic resumes on the consuming thread at that place (Python yields
    /// the computed results, then raises). Dropping the iterator before its end cancels the
    /// items it sent that have not begun. It is also a [`Stream`](futures_core::Stream),
    /// for async code.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init();
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     // An endless input: only a bounded window of it is ever read ahead.
    ///     let firsts: Vec<u64> = pool.imap(square, 1u64..).take(3).collect::<Result<_, _>>()?;
    ///     assert_eq!(firsts, vec![1, 4, 9]);
    ///     let mut any_order: Vec<u64> = pool.imap_unordered(square, 0..4u64).collect::<Result<_, _>>()?;
    ///     any_order.sort_unstable();
    ///     assert_eq!(any_order, vec![0, 1, 4, 9]);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn imap<'p, F, A, I>(&'p self, f: F, items: I) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        A: Send + 'p,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'p,
    {
        self.imap_inner(f, items, Options::new(), true)
    }

    /// [`imap`](Pool::imap) with per-call [`Options`]: a chunk size, a time limit for each
    /// item. (Its callbacks are not used: take each result from the iterator.)
    #[doc(alias = "chunksize")]
    pub fn imap_with<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        opts: Options<()>,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        A: Send + 'p,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'p,
    {
        self.imap_inner(f, items, opts, true)
    }

    /// Like [`imap`](Pool::imap), but yields results in the order they finish: Python's
    /// `imap_unordered`.
    pub fn imap_unordered<'p, F, A, I>(&'p self, f: F, items: I) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        A: Send + 'p,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'p,
    {
        self.imap_inner(f, items, Options::new(), false)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with per-call [`Options`].
    pub fn imap_unordered_with<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        opts: Options<()>,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        A: Send + 'p,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'p,
    {
        self.imap_inner(f, items, opts, false)
    }

    fn imap_inner<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        opts: Options<()>,
        ordered: bool,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        A: Send + 'p,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'p,
    {
        let sub = Submission::new(f, self.timeout_of(opts.timeout));
        let group = Arc::clone(&sub.group);
        let mut iter = items.into_iter();
        let size = opts
            .chunksize
            .unwrap_or_else(|| match iter.size_hint() {
                (lo, Some(hi)) if lo == hi => auto_chunksize(hi, self.processes()),
                _ => 1,
            })
            .max(1);
        let (tx, rx) = flume::unbounded();
        let mut next_chunk = 0usize;
        let mut next_item = 0usize;
        let pool: &'p Pool = self;
        // Opened while the pool runs, this imap goes on sending items after close().
        let (fed, depth) = self.shared.act(|p, _| (p.open_feed(), p.depth()));
        let feed = Box::new(move |batch: &mut Vec<(u64, TaskRec)>| -> Fed {
            // One-tuples: the task's arguments, the same bytes as the items themselves. An
            // input that panics keeps the items it gave before.
            let mut chunk: Vec<(A,)> = Vec::with_capacity(size.min(1024));
            let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
                while chunk.len() < size {
                    match iter.next() {
                        Some(a) => chunk.push((a,)),
                        None => break,
                    }
                }
            }));
            let panicked = read.err();
            if chunk.is_empty() {
                return match panicked {
                    Some(payload) => Fed::Panicked {
                        sent: None,
                        payload,
                    },
                    None => Fed::Ended,
                };
            }
            let (c, base) = (next_chunk, next_item);
            next_chunk += 1;
            next_item += chunk.len();
            let tx = tx.clone();
            let enc = sub.encode::<F, (A,)>(pool.new_id(), &chunk);
            let bytes = enc.frame.as_ref().map_or(0, |f| f.payload_len())
                + enc.tail.as_ref().map_or(0, |t| t.bytes().len());
            let at = Instant::now();
            let task = pool.prepare_batch::<F::Output>(&sub, enc, Some(base), at, move |r| {
                let _ = tx.send((c, bytes, r.into_results()));
            });
            batch.extend(task);
            match panicked {
                Some(payload) => Fed::Panicked {
                    sent: Some(bytes),
                    payload,
                },
                None => Fed::Sent(bytes),
            }
        });
        let mut imap = Imap {
            feed,
            pool: fed.then_some(self),
            shared: self,
            group,
            rx,
            stream: None,
            processes: self.processes(),
            depth,
            batch: Vec::new(),
            sent: 0,
            in_flight: 0,
            bytes: 0,
            exhausted: false,
            panic: None,
            ordered,
            next_yield: 0,
            parked: BTreeMap::new(),
            current: VecDeque::new(),
        };
        // Work starts now, as in Python, not at the first `next`.
        imap.fill();
        imap
    }
}

/// The chunks an imap keeps in a pool of `processes` workers that may each hold `depth`
/// tasks, with `bytes` of arguments in flight: 32 per worker, and up to 64 when its chunks
/// are brief enough that each worker may hold that many (so that the workers never wait for
/// the consumer to read more input) while their arguments stay small (under 4 MiB in flight
/// per worker).
fn window(processes: usize, depth: usize, bytes: usize) -> usize {
    let processes = processes.max(1);
    let per_worker = if bytes >= processes * IMAP_BYTES_PER_WORKER {
        IMAP_WINDOW_PER_WORKER
    } else {
        depth.clamp(IMAP_WINDOW_PER_WORKER, IMAP_WINDOW_MAX_PER_WORKER)
    };
    processes * per_worker
}

/// Reads the next chunk of input and makes it into a task, put in the batch to send.
type Feed<'p> = dyn FnMut(&mut Vec<(u64, TaskRec)>) -> Fed + Send + 'p;

/// A chunk's index, its arguments' bytes and its results.
type ChunkResults<R> = (usize, usize, Vec<Result<R, TaskError>>);

/// The iterator (and [`Stream`](futures_core::Stream)) of [`Pool::imap`] and
/// [`Pool::imap_unordered`]: one `Result` per item it sent. Once the pool refuses its items
/// (joined or terminated), it yields the [`TaskErrorKind::PoolClosed`] errors of the
/// refused chunk and the results of chunks already sent, then ends without reading more
/// input (which may be endless).
pub struct Imap<'p, R> {
    feed: Box<Feed<'p>>,
    /// The pool, while this imap holds an open feed there (until its input is exhausted).
    pool: Option<&'p Pool>,
    shared: &'p Pool,
    /// The tasks it sent, to cancel those not begun when it is dropped.
    group: Arc<Group>,
    rx: flume::Receiver<ChunkResults<R>>,
    /// For async consumers: the receiver as a stream (made on the first poll).
    stream: Option<Pin<Box<flume::r#async::RecvStream<'p, ChunkResults<R>>>>>,
    /// The pool's workers when this imap was made: its window is per worker.
    processes: usize,
    /// The tasks each worker may hold, as the pool said at the last refill.
    depth: usize,
    /// Chunks made and not yet handed to the pool (empty between refills).
    batch: Vec<(u64, TaskRec)>,
    /// Chunks sent so far.
    sent: usize,
    in_flight: usize,
    /// The bytes of the arguments of the chunks in flight.
    bytes: usize,
    exhausted: bool,
    /// The input's panic, and the number of chunks sent before it: it resumes once their
    /// results are yielded.
    panic: Option<(usize, Box<dyn Any + Send>)>,
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
    /// The chunks this imap keeps in the pool (and parked here): see [`window`].
    fn window(&self) -> usize {
        window(self.processes, self.depth, self.bytes)
    }

    /// Sends chunks until the window is full or the input ends, once it has room for an
    /// eighth of itself (or nothing is in flight). Chunks parked out of order count against
    /// the window too, so one slow chunk cannot let the input run ahead without bound.
    ///
    /// The chunks go in batches: when nothing is in flight, of 1, 2, 4... (the workers
    /// begin on the first chunk while the next are read), otherwise of up to 256.
    fn fill(&mut self) {
        let held = self.in_flight + self.parked.len();
        let window = self.window();
        if self.exhausted
            || held >= window
            || (self.in_flight > 0 && window - held < window / FILL_FRACTION)
        {
            return;
        }
        let mut next_batch = if self.in_flight == 0 { 1 } else { FILL_BATCH };
        let mut ended = false;
        while !ended && self.in_flight + self.parked.len() < self.window() {
            match (self.feed)(&mut self.batch) {
                Fed::Sent(bytes) => self.made(bytes),
                Fed::Ended => ended = true,
                Fed::Panicked { sent, payload } => {
                    if let Some(bytes) = sent {
                        self.made(bytes);
                    }
                    self.panic = Some((self.sent, payload));
                    ended = true;
                }
            }
            if self.batch.len() >= next_batch {
                self.send_batch();
                next_batch = next_batch.saturating_mul(2).min(FILL_BATCH);
            }
        }
        // Sent before the feed closes: an imap's chunks are taken after close() only
        // while its feed is open.
        self.send_batch();
        if ended {
            self.set_exhausted();
        }
    }

    /// A chunk of `bytes` of arguments was made.
    fn made(&mut self, bytes: usize) {
        self.in_flight += 1;
        self.sent += 1;
        self.bytes += bytes;
    }

    /// Hands the chunks made to the pool.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let fed = self.pool.is_some();
        if let Some(held) = self.shared.submit_drain(&mut self.batch, fed) {
            self.depth = held.depth;
        }
    }

    /// No more input will be sent: the feed closes.
    fn set_exhausted(&mut self) {
        self.exhausted = true;
        if let Some(pool) = self.pool.take() {
            pool.shared.act(|p, fx| p.close_feed(fx));
        }
    }

    /// The next result already here, or the input's panic once every result before it is
    /// out; `None` when a chunk must be waited for (or nothing is left: `in_flight == 0`).
    fn ready(&mut self) -> Option<Result<R, TaskError>> {
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
                if self
                    .panic
                    .as_ref()
                    .is_some_and(|(at, _)| *at == self.next_yield)
                {
                    self.resume_panic();
                }
            } else {
                if let Some((_, v)) = self.parked.pop_first() {
                    self.current.extend(v);
                    continue;
                }
                if self.in_flight == 0 && self.panic.is_some() {
                    self.resume_panic();
                }
            }
            return None;
        }
    }

    fn resume_panic(&mut self) {
        if let Some((_, payload)) = self.panic.take() {
            std::panic::resume_unwind(payload);
        }
    }

    /// Takes in a chunk's results.
    fn arrived(&mut self, (c, bytes, v): ChunkResults<R>) {
        self.in_flight -= 1;
        self.bytes = self.bytes.saturating_sub(bytes);
        if v.iter()
            .all(|r| matches!(r, Err(e) if e.kind() == TaskErrorKind::PoolClosed))
        {
            // The pool is closed: report this chunk, read no more input.
            self.set_exhausted();
        }
        self.parked.insert(c, v);
    }
}

impl<R> Drop for Imap<'_, R> {
    fn drop(&mut self) {
        self.set_exhausted();
        if self.in_flight > 0 {
            // Nobody will read them: what has not begun never runs.
            let _ = self.shared.shared.cancel(&self.group.ids(), false);
        }
    }
}

impl<R> Iterator for Imap<'_, R> {
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.ready() {
                return Some(r);
            }
            if self.in_flight == 0 {
                return None;
            }
            // Every chunk in flight resolves (result, failure, or pool shutdown), so this
            // wait ends.
            let got = self.rx.recv().ok()?;
            self.arrived(got);
            // Whatever came with it is taken too: the window refills once for them all.
            while let Ok(got) = self.rx.try_recv() {
                self.arrived(got);
            }
        }
    }
}

// Nothing in an `Imap` is pinned structurally: moving it never invalidates a poll.
impl<R> Unpin for Imap<'_, R> {}

impl<R: Send> futures_core::Stream for Imap<'_, R> {
    type Item = Result<R, TaskError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(r) = this.ready() {
                return Poll::Ready(Some(r));
            }
            if this.in_flight == 0 {
                return Poll::Ready(None);
            }
            let stream = this
                .stream
                .get_or_insert_with(|| Box::pin(this.rx.clone().into_stream()));
            match stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(got)) => {
                    this.arrived(got);
                    // As `next` does: whatever came with it is taken too.
                    while let Ok(got) = this.rx.try_recv() {
                        this.arrived(got);
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_deepens_with_the_pools_depth_for_small_arguments_only() {
        // Long or unknown tasks (depth 1): the least window.
        assert_eq!(window(2, 1, 0), 2 * IMAP_WINDOW_PER_WORKER);
        // Brief tasks: as deep as each worker may hold, within the most.
        assert_eq!(window(2, 50, 0), 100);
        assert_eq!(window(2, 1024, 0), 2 * IMAP_WINDOW_MAX_PER_WORKER);
        // Large arguments in flight: back to the least, however brief the tasks.
        assert_eq!(
            window(2, 1024, 2 * IMAP_BYTES_PER_WORKER),
            2 * IMAP_WINDOW_PER_WORKER
        );
        assert_eq!(
            window(2, 1024, 2 * IMAP_BYTES_PER_WORKER - 1),
            2 * IMAP_WINDOW_MAX_PER_WORKER
        );
        // A pool with no worker yet still sends.
        assert_eq!(window(0, 1, 0), IMAP_WINDOW_PER_WORKER);
    }
}
