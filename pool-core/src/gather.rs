//! `map`'s chunks gathered into one result: every chunk's per-item results, in item order,
//! or the first failing item's error.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use crate::chunk::auto_chunksize;
use crate::driver::{Group, Shared, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::items::Items;
use crate::options::Options;
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Done, Slot};
use crate::submit::{Onto, Submission, complete};
use crate::task::Task;

/// A batch of a `map`'s chunks holding this many items goes to the pool at once, without
/// waiting for more chunks: its workers have enough to begin with.
const SUBMIT_ITEMS: usize = 4096;

/// ... and a batch of at most this many chunks: the pool's lock is held while a batch is
/// handed to the policy, and the driver, which hands out the next tasks as answers come,
/// waits for it meanwhile (4096 tasks of one item held it for about 1 ms, longer than the
/// work each worker has queued).
const SUBMIT_TASKS: usize = 256;

/// A map of at least this many chunks makes room for their records in the policy first.
const RESERVE_MIN_CHUNKS: usize = 256;

/// A map whose caller waits for its result (`map`, `starmap`) stops making chunks once this
/// many tasks wait in the queue, and goes on once no more than [`PACE_LOW`] do: the
/// workers have far more than a round trip's work waiting meanwhile, and the records of
/// the chunks in flight are few enough to reuse the memory of those done (a map of
/// 20 000 one-item chunks made all at once faulted in some 8 MB of fresh records, a
/// sixth of its time).
const PACE_HIGH: usize = 1024;
/// See [`PACE_HIGH`].
const PACE_LOW: usize = 512;

/// Chunks of at least this many items decode their values straight onto the map's result
/// (see [`ChunkOnto`]).
const ONTO_MIN_ITEMS: usize = 64;

impl Pool {
    /// Sends `items` in chunks as tasks calling `f`; the result holds every item's result
    /// in order, or the first failing item's error.
    ///
    /// Each chunk is encoded from the items as they come (through one chunk-sized buffer,
    /// not a copy of the whole input) and submitted soon after, so workers begin the first
    /// chunks while the later ones are encoded. `paced`: the caller waits for the result
    /// anyway, so it makes the chunks as the queue has room for them (see [`PACE_HIGH`]),
    /// not all before it returns.
    pub(crate) fn gather<F, A>(
        &self,
        f: F,
        items: impl IntoIterator<Item = A>,
        opts: Options<Vec<F::Output>>,
        paced: bool,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<A>,
    {
        let items = items.into_iter();
        match items.size_hint() {
            (n, Some(m)) if n == m => self.gather_known(f, n, items, opts, paced),
            // The chunk size depends on the count: count them first.
            _ => {
                let items: Vec<A> = items.collect();
                self.gather_known(f, items.len(), items.into_iter(), opts, paced)
            }
        }
    }

    /// [`gather`](Pool::gather) of `items`, which says it holds `n` items (their chunk
    /// size and the result's capacity depend on it; an iterator that holds more or fewer
    /// still gets every item's result).
    fn gather_known<F, A>(
        &self,
        f: F,
        n: usize,
        mut items: impl Iterator<Item = A>,
        opts: Options<Vec<F::Output>>,
        paced: bool,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<A>,
    {
        let (out, plan) = self.plan_gather(f, n, opts, paced);
        let Some(plan) = plan else { return out };
        // A map of fewer chunks than the window never waits: made all at once, as before.
        let paced = paced && n.div_ceil(plan.size) > PACE_HIGH;
        // A paced map sends chunks long after it began: like an imap, it goes on after a
        // `close` (from another thread) until `join` or `terminate` (a feed), rather than
        // fail the chunks it had not made yet. Not beside `max_queued`, whose waits for
        // room a feed would skip.
        let feed = (paced && self.shared.max_queued().is_none())
            .then(|| Feed::open(self))
            .flatten();
        let fed = feed.is_some();
        let mut chunk = Vec::with_capacity(plan.size.min(n.max(1)));
        // Submitted in batches that double (one policy step and one write per worker for
        // each), and at once whatever their number when they hold many items.
        let mut batch = Vec::with_capacity(SUBMIT_TASKS.min(n.div_ceil(plan.size)));
        let (mut batch_items, mut next_batch) = (0, 1);
        // The records of a batch count as handed to the pool when the batch began (one
        // reading of the clock for all; they wait for each other from then on).
        let mut batch_at = Instant::now();
        for c in 0.. {
            chunk.extend(items.by_ref().take(plan.size));
            if chunk.is_empty() {
                break;
            }
            let task = plan.chunk(self, c, batch_at, |sub, id| {
                sub.encode_owned::<F, A>(id, &mut chunk)
            });
            batch_items += chunk.len();
            // The chunk's bytes are in its frame: the items go (their events stay pinned).
            chunk.clear();
            batch.extend(task);
            if batch.len() >= next_batch || batch_items >= SUBMIT_ITEMS {
                let queued = self.submit_drain(&mut batch, fed).map_or(0, |h| h.queued);
                if paced && queued >= PACE_HIGH {
                    self.shared.wait_queue(PACE_LOW, fed);
                }
                batch_at = Instant::now();
                batch_items = 0;
                next_batch = next_batch.saturating_mul(2).min(SUBMIT_TASKS);
            }
        }
        if !batch.is_empty() {
            self.submit_all(batch, fed);
        }
        drop(feed);
        plan.seal();
        out
    }

    /// As [`gather`](Pool::gather) of a slice if the queue has room for every chunk under
    /// `max`; `None` (nothing submitted) otherwise.
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
        let (out, plan) = self.plan_gather(f, items.len(), opts, false);
        let Some(plan) = plan else {
            return Some(out);
        };
        let tasks: Vec<(u64, TaskRec)> = items
            .chunks(plan.size)
            .enumerate()
            .filter_map(|(c, chunk)| {
                plan.chunk(self, c, Instant::now(), |sub, id| {
                    sub.encode::<F, A>(id, chunk)
                })
            })
            .collect();
        plan.seal();
        self.try_submit_all(tasks, max).then_some(out)
    }

    /// The result of a `map` of `n` items, and the plan its chunks are made by; no plan
    /// when there is no item (the result is settled already). `paced`: as
    /// [`gather`](Pool::gather).
    fn plan_gather<F, A>(
        &self,
        f: F,
        n: usize,
        opts: Options<Vec<F::Output>>,
        paced: bool,
    ) -> Planned<F::Output>
    where
        F: Task<A>,
    {
        let Options {
            chunksize,
            timeout,
            callbacks,
        } = opts;
        let mut sub = Submission::new(f, self.timeout_of(timeout));
        if paced {
            // Its caller waits for the result: nobody holds the handle to cancel it.
            sub.group = Arc::new(Group::unseen());
        }
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
            return (out, None);
        }
        let size = chunksize
            .unwrap_or_else(|| auto_chunksize(n, self.processes()))
            .max(1);
        // Every chunk is submitted at once (up to the queue's limit, if it has one; a paced
        // map's records, about the queue's window beside those in flight).
        let chunks = n
            .div_ceil(size)
            .min(self.shared.max_queued().unwrap_or(usize::MAX))
            .min(if paced { 2 * PACE_HIGH } else { usize::MAX });
        if chunks >= RESERVE_MIN_CHUNKS {
            self.shared.act(|p, _| p.reserve(chunks));
        }
        let state = Arc::new(Mutex::new(Gather {
            out: Vec::with_capacity(n),
            next: 0,
            early: VecDeque::new(),
            lent_to: None,
            spare: Vec::new(),
            err: None,
            remaining: 0,
            sealed: false,
            slot: Some(slot),
            callbacks: Some(callbacks),
            shared: Arc::downgrade(&self.shared),
        }));
        let plan = Plan {
            sub,
            size,
            state,
            done,
        };
        (out, Some(plan))
    }
}

/// A paced map's feed (see `Policy::open_feed`), open while it makes its chunks; closed
/// when dropped, if its input panics too.
struct Feed<'a>(&'a Pool);

impl<'a> Feed<'a> {
    /// `None` if the pool no longer runs (the map's tasks are refused as any others).
    fn open(pool: &'a Pool) -> Option<Self> {
        pool.shared
            .act(|p, _| p.open_waited_feed())
            .then_some(Feed(pool))
    }
}

impl Drop for Feed<'_> {
    fn drop(&mut self) {
        self.0.shared.act(|p, fx| p.close_waited_feed(fx));
        self.0.shared.feed_closed();
    }
}

/// A `map`'s result and the plan its chunks are made by (none when it has no item).
type Planned<R> = (AsyncResult<Vec<R>>, Option<Plan<R>>);

/// How a `map`'s chunks are made into tasks whose results gather into one.
struct Plan<R> {
    sub: Submission,
    /// Items per chunk.
    size: usize,
    state: Arc<Mutex<Gather<R>>>,
    done: Arc<Done>,
}

impl<R: serde::de::DeserializeOwned + Send + 'static> Plan<R> {
    /// Chunk `c` (of items `c * size..`) as a task ready to submit; `None` if it is settled
    /// already (its items could not be encoded).
    fn chunk(
        &self,
        pool: &Pool,
        c: usize,
        queued_at: Instant,
        encode: impl FnOnce(&Submission, u64) -> crate::chunk::Encoded,
    ) -> Option<(u64, TaskRec)> {
        // Counted before it can come back (a chunk that cannot be encoded comes back at once).
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remaining += 1;
        let state = Arc::clone(&self.state);
        let done = Arc::clone(&self.done);
        // Chunks of a few items gain nothing from it (their values are few to move) and
        // would pay for the lending.
        let onto = (self.size >= ONTO_MIN_ITEMS).then(|| {
            Box::new(ChunkOnto {
                state: Arc::clone(&self.state),
                c,
                done: Arc::clone(&self.done),
            }) as Box<dyn Onto<R>>
        });
        pool.prepare_batch::<R>(
            &self.sub,
            encode(&self.sub, pool.new_id()),
            Some(c * self.size),
            onto,
            queued_at,
            move |results| {
                done.add(results.len());
                let mut g = state.lock().unwrap_or_else(PoisonError::into_inner);
                g.arrived(c, results);
                g.remaining -= 1;
                if g.remaining == 0 && g.sealed {
                    g.finish();
                }
            },
        )
    }

    /// Every chunk has been made: the result is complete once they are all back.
    fn seal(&self) {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        g.sealed = true;
        if g.remaining == 0 {
            g.finish();
        }
    }
}

/// Chunk `c` of a map: while it is the next chunk due, its values are decoded straight
/// onto the map's result (lent by [`Onto::lend`]), with no vector of their own; a chunk
/// that comes back early is decoded into the vector an earlier early chunk left behind
/// (emptied into the result), so that they do not each fault in fresh memory.
struct ChunkOnto<R> {
    state: Arc<Mutex<Gather<R>>>,
    c: usize,
    done: Arc<Done>,
}

impl<R: Send + 'static> Onto<R> for ChunkOnto<R> {
    fn lend(&self) -> Option<Vec<R>> {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if g.err.is_some() {
            return None;
        }
        if g.next == self.c && g.lent_to.is_none() {
            g.lent_to = Some(self.c);
            return Some(std::mem::take(&mut g.out));
        }
        Some(std::mem::take(&mut g.spare))
    }

    fn give_back(&self, mut v: Vec<R>, appended: Option<usize>) {
        if let Some(n) = appended {
            self.done.add(n);
        }
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let g = &mut *g;
        if g.lent_to != Some(self.c) {
            // The spare vector, holding this chunk's values alone if it arrived.
            match appended {
                Some(_) => g.arrived(self.c, Items::Ok(v)),
                None => {
                    v.clear();
                    g.keep_spare(v);
                    return;
                }
            }
        } else {
            g.out = v;
            g.lent_to = None;
            if appended.is_none() {
                return;
            }
            // Chunk `c` has arrived, as `arrived` takes it; those that came early follow.
            g.next += 1;
            g.take_early();
        }
        g.remaining -= 1;
        if g.remaining == 0 && g.sealed {
            g.finish();
        }
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
    /// Chunks that came back before their turn: `early[i]` is chunk `next + 1 + i`, if it
    /// came (a window, not a map: chunks mostly come back close to their turn).
    early: VecDeque<Option<Items<R>>>,
    /// The chunk `out` is lent to (the one due next, see [`ChunkOnto`]), which is decoding
    /// onto it.
    lent_to: Option<usize>,
    /// An empty vector, for a chunk that comes back early to decode into.
    spare: Vec<R>,
    /// The first failing item's error, in item order (`out` is dropped then).
    err: Option<TaskError>,
    /// Chunks made and not yet back.
    remaining: usize,
    /// Every chunk has been made.
    sealed: bool,
    slot: Option<Arc<Slot<Vec<R>>>>,
    callbacks: Option<Callbacks<Vec<R>>>,
    shared: Weak<Shared>,
}

impl<R: Send + 'static> Gather<R> {
    /// Chunk `c` is back with `results`.
    fn arrived(&mut self, c: usize, results: Items<R>) {
        if c != self.next {
            // Chunks before `next` have all come back (each once): this one is after it.
            let Some(i) = c.checked_sub(self.next + 1) else {
                debug_assert!(false, "chunk {c} came back twice");
                return;
            };
            if i >= self.early.len() {
                self.early.resize_with(i + 1, || None);
            }
            self.early[i] = Some(results);
            return;
        }
        self.take(results);
        self.take_early();
    }

    /// `next` has just moved on: takes the chunks from it on that came early, up to the
    /// first that has not come; `early` starts after `next` again.
    fn take_early(&mut self) {
        // Each front slot is chunk `next`'s as it is popped.
        while let Some(Some(results)) = self.early.pop_front() {
            self.take(results);
        }
    }

    /// Moves the next chunk's results into `out`, or keeps its first error.
    fn take(&mut self, results: Items<R>) {
        self.next += 1;
        if self.err.is_some() {
            return;
        }
        let results = match results {
            Items::Ok(mut v) => {
                // Moved in one piece (the first chunk, into a vector with no room reserved,
                // is taken as it is).
                if self.out.is_empty() && self.out.capacity() < v.len() {
                    self.out = v;
                } else {
                    self.out.append(&mut v);
                    self.keep_spare(v);
                }
                return;
            }
            Items::Mixed(results) => results,
        };
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

    /// Keeps `v` (empty) for the next chunk that comes back early, if it is larger than
    /// the one kept.
    fn keep_spare(&mut self, v: Vec<R>) {
        if v.is_empty() && v.capacity() > self.spare.capacity() {
            self.spare = v;
        }
    }

    fn finish(&mut self) {
        self.spare = Vec::new();
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
