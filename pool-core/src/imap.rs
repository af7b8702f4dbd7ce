//! [`Imap`]: `imap` and `imap_unordered`, which read their input only as workers free up
//! and yield results as they come.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::builder::MAX_IN_FLIGHT;
use crate::chunk::{auto_chunksize, encode_chunk};
use crate::error::{TaskError, TaskErrorKind};
use crate::pool::Pool;
use crate::task::Task;

impl Pool {
    /// Applies `f` to each item lazily and yields results in order as they come: Python's
    /// `imap`. The input is read only as workers free up (a bounded window of chunks in
    /// flight, the first ones sent at once), so an endless iterator works and memory stays
    /// bounded. Chunk size: automatic when the iterator knows its length, else 1.
    ///
    /// As in Python, an imap made before [`close`](Pool::close) still gets all its results
    /// after it: it goes on sending its items as you consume it. [`join`](Pool::join) ends
    /// that (join cannot wait for a consumer that may be the joining thread): the next chunk
    /// it tries to send fails with [`TaskErrorKind::PoolClosed`] and the iterator ends
    /// there, reading no more input. Consume an imap before `join`.
    pub fn imap<'p, F, A, I>(&'p self, f: F, items: I) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, None, true)
    }

    /// [`imap`](Pool::imap) with an explicit chunk size.
    #[doc(alias = "chunksize")]
    pub fn imap_chunked<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, Some(chunksize), true)
    }

    /// Like [`imap`](Pool::imap), but yields results in the order they finish: Python's
    /// `imap_unordered`.
    pub fn imap_unordered<'p, F, A, I>(&'p self, f: F, items: I) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, None, false)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with an explicit chunk size.
    pub fn imap_unordered_chunked<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        self.imap_inner(f, items, Some(chunksize), false)
    }

    fn imap_inner<'p, F, A, I>(
        &'p self,
        f: F,
        items: I,
        chunksize: Option<usize>,
        ordered: bool,
    ) -> Imap<'p, F::Output>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'p,
    {
        let func = f.batch_ref();
        let mut iter = items.into_iter();
        let size = chunksize
            .unwrap_or_else(|| match iter.size_hint() {
                (lo, Some(hi)) if lo == hi => auto_chunksize(hi, self.processes),
                _ => 1,
            })
            .max(1);
        let (tx, rx) = flume::unbounded();
        let mut next_chunk = 0usize;
        let mut next_item = 0usize;
        let pool: &'p Pool = self;
        // Opened while the pool runs, this imap goes on sending items after close().
        let fed = self.shared.act(|p, _| p.open_feed());
        let feed = Box::new(move || -> bool {
            // One-tuples: the task's arguments, the same bytes as the items themselves.
            let chunk: Vec<(A,)> = iter.by_ref().take(size).map(|a| (a,)).collect();
            if chunk.is_empty() {
                return false;
            }
            let (c, base) = (next_chunk, next_item);
            next_chunk += 1;
            next_item += chunk.len();
            let tx = tx.clone();
            let enc = encode_chunk::<F, (A,)>(pool.new_id(), func, &chunk);
            pool.submit_batch::<F::Output>(enc, Some(base), fed, move |results| {
                let _ = tx.send((c, results));
            });
            true
        });
        let mut imap = Imap {
            feed,
            pool: fed.then_some(self),
            rx,
            window: self.processes * MAX_IN_FLIGHT * 2,
            in_flight: 0,
            exhausted: false,
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

type ChunkResults<R> = (usize, Vec<Result<R, TaskError>>);

/// The iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: one `Result` per item it
/// sent. Once the pool refuses its items (joined or terminated), it yields the
/// [`TaskErrorKind::PoolClosed`] errors of the refused chunk and the results of chunks
/// already sent, then ends without reading more input (which may be endless).
pub struct Imap<'p, R> {
    feed: Box<dyn FnMut() -> bool + 'p>,
    /// The pool, while this imap holds an open feed there (until its input is exhausted).
    pool: Option<&'p Pool>,
    rx: flume::Receiver<ChunkResults<R>>,
    window: usize,
    in_flight: usize,
    exhausted: bool,
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
    /// Sends chunks until the window is full or the input ends. Chunks parked out of order
    /// count against the window too, so one slow chunk cannot let the input run ahead
    /// without bound.
    fn fill(&mut self) {
        while !self.exhausted && self.in_flight + self.parked.len() < self.window {
            if (self.feed)() {
                self.in_flight += 1;
            } else {
                self.set_exhausted();
            }
        }
    }

    /// No more input will be sent: the feed closes.
    fn set_exhausted(&mut self) {
        self.exhausted = true;
        if let Some(pool) = self.pool.take() {
            pool.shared.act(|p, fx| p.close_feed(fx));
        }
    }
}

impl<R> Drop for Imap<'_, R> {
    fn drop(&mut self) {
        self.set_exhausted();
    }
}

impl<R> Iterator for Imap<'_, R> {
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
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
            } else if let Some((_, v)) = self.parked.pop_first() {
                self.current.extend(v);
                continue;
            }
            if self.in_flight == 0 {
                return None;
            }
            // Every chunk in flight resolves (result, failure, or pool shutdown), so this
            // wait ends.
            let (c, v) = self.rx.recv().ok()?;
            self.in_flight -= 1;
            if v.iter()
                .all(|r| matches!(r, Err(e) if e.kind() == TaskErrorKind::PoolClosed))
            {
                // The pool is closed: report this chunk, read no more input.
                self.set_exhausted();
            }
            self.parked.insert(c, v);
        }
    }
}
