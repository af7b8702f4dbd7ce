//! `map`'s chunks gathered into one result: every chunk's per-item results, in item order,
//! or the first failing item's error.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use crate::chunk::{Encoded, auto_chunksize};
use crate::driver::{self, Deliver, Group, Outcome, Piece, Shared, Sink, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::items::Items;
use crate::observe::Tally;
use crate::options::Options;
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Done, Slot};
use crate::submit::{Share, Submission, complete};
use crate::task::Task;

/// A batch of a `map`'s chunks holding this many items goes to the pool at once, without
/// waiting for more chunks: its workers have enough to begin with.
const SUBMIT_ITEMS: usize = 4096;

/// ... and a batch of at most this many chunks: the pool's lock is held while a batch is
/// handed to the policy, and the driver, which hands out the next tasks as answers come,
/// waits for it meanwhile (4096 tasks of one item held it for about 1 ms, longer than the
/// work each worker has queued).
const SUBMIT_TASKS: usize = 256;

/// ... unless the pool's lock is busy when the batch is due: then more chunks are made,
/// up to this many in the batch (a paced map: within its window, see [`PACE_HIGH`]),
/// before it waits for the lock.
const SUBMIT_DEFERRED: usize = 1024;

/// A map of at least this many chunks makes room for their records in the policy first.
const RESERVE_MIN_CHUNKS: usize = 256;

/// Items that come back early this many or more at a time wait whole (in `Gather::runs`),
/// not item by item in the window: moved into the result in one piece.
const RUN_MIN_ITEMS: usize = 64;

/// A map whose caller waits for its result (`map`, `starmap`) stops making chunks once this
/// many tasks wait in the queue, and goes on once no more than [`PACE_LOW`] do: the
/// workers have far more than a round trip's work waiting meanwhile, and the records of
/// the chunks in flight are few enough to reuse the memory of those done (a map of
/// 20 000 one-item chunks made all at once faulted in some 8 MB of fresh records, a
/// sixth of its time).
const PACE_HIGH: usize = 1024;
/// See [`PACE_HIGH`].
const PACE_LOW: usize = 512;

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
        let Some(mut plan) = plan else { return out };
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
        let mut made = 0;
        // The tasks waiting in the queue when this map last handed it a batch, at most.
        let mut queued = 0;
        for c in 0.. {
            chunk.extend(items.by_ref().take(plan.size));
            if chunk.is_empty() {
                break;
            }
            made += chunk.len();
            let task = plan.chunk(self, c, batch_at, |sub, id| {
                sub.encode_owned::<F, A>(id, &mut chunk)
            });
            batch_items += chunk.len();
            // The chunk's bytes are in its frame: the items go (their events stay pinned).
            chunk.clear();
            batch.extend(task);
            // While the driver holds the lock (handling a read of answers), the chunks
            // after the batch are made meanwhile, rather than waited with: a submitter
            // asleep on the lock costs a wake-up when it is let go. A paced map defers
            // only while the queue stays within its window with the batch.
            let most = match paced {
                true => PACE_HIGH.saturating_sub(queued).min(SUBMIT_DEFERRED),
                false => SUBMIT_DEFERRED,
            };
            let due = batch.len() >= next_batch && (batch.len() >= most || !self.shared.is_busy());
            if due || batch_items >= SUBMIT_ITEMS {
                queued = self.submit_drain(&mut batch, fed).map_or(0, |h| h.queued);
                plan.renew_sink();
                if paced && queued >= PACE_HIGH {
                    self.shared.wait_queue(PACE_LOW, fed);
                    // At most this many wait now (the queue only shrinks but for this map).
                    queued = PACE_LOW;
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
        plan.seal(made);
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
        plan.seal(items.len());
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
        // Paced, its caller waits for the result: nobody holds the handle to cancel it.
        let group = if paced {
            Group::unseen()
        } else {
            Arc::default()
        };
        let sub = Submission::in_group(f, self.timeout_of(timeout), group);
        let slot = Slot::new();
        let done = Done::new(n);
        let out = AsyncResult::new(Arc::clone(&slot), self.canceller(Arc::clone(&sub.group)))
            .counting(Arc::clone(&done));
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
        let state = Arc::new(Mutex::new(Gather::new(
            n,
            slot,
            callbacks,
            Arc::downgrade(&self.shared),
        )));
        let tally = Arc::clone(&self.shared.tally);
        let sink = MapSink::sink(Arc::clone(&state), Arc::clone(&done), Arc::clone(&tally));
        let plan = Plan {
            sub,
            size,
            state,
            done,
            tally,
            sink,
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
    tally: Arc<Tally>,
    /// The sink every chunk that can delivers to (see [`Pool::prepare_shared`]): one for
    /// each batch of chunks submitted together (see [`Plan::renew_sink`]).
    sink: Sink,
}

impl<R: serde::de::DeserializeOwned + Send + 'static> Plan<R> {
    /// Chunk `c` (of items `c * size..`) as a task ready to submit; `None` if it is settled
    /// already (its items could not be encoded).
    fn chunk(
        &self,
        pool: &Pool,
        c: usize,
        queued_at: Instant,
        encode: impl FnOnce(&Submission, u64) -> Encoded,
    ) -> Option<(u64, TaskRec)> {
        let first = c * self.size;
        let enc = encode(&self.sub, pool.new_id());
        // Its results go to the map's sink, with nothing made for the chunk alone...
        let span = match pool.may_share(&self.sub, &enc, first) {
            Share::Yes(span) => {
                return pool.prepare_shared(&self.sub, enc, (first, &self.sink), queued_at, span);
            }
            Share::No(span) => span,
        };
        // ... or, when it needs more (items that could not be encoded, events to release,
        // a task span to tell), through a sink of its own that hands them on whole.
        let state = Arc::clone(&self.state);
        let done = Arc::clone(&self.done);
        let base = Some(first);
        pool.prepare_spanned::<R>(&self.sub, enc, base, queued_at, span, move |results| {
            done.add(results.len());
            let mut g = lock(&state);
            g.arrive(first, results);
            g.finish_if_done();
        })
    }

    /// The chunks made from now on deliver to a sink of their own (the same map's): each
    /// chunk's record holds its sink, which counts its owners, up as the caller makes the
    /// records, down as the driver drops them; a sink per batch is counted down long after
    /// the caller has counted it up, where one for the whole map had its count go back and
    /// forth between the two threads' caches, record by record.
    fn renew_sink(&mut self) {
        self.sink = MapSink::sink(
            Arc::clone(&self.state),
            Arc::clone(&self.done),
            Arc::clone(&self.tally),
        );
    }

    /// Every chunk has been made, holding `items` items in all: the result is complete
    /// once they are all back.
    fn seal(&self, items: usize) {
        let mut g = lock(&self.state);
        g.total = Some(items);
        g.finish_if_done();
    }
}

fn lock<R>(state: &Mutex<Gather<R>>) -> std::sync::MutexGuard<'_, Gather<R>> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The one sink of a `map`'s chunks (those that need no sink of their own): each piece of
/// results is decoded under the map's lock, straight onto the result when it is the piece
/// due next (the usual case for the chunk a worker runs first), else into a reused vector
/// and from there into the window of items that came early. No allocation per chunk, on
/// the caller's side or the driver's, and none freed on another thread.
struct MapSink<R> {
    state: Arc<Mutex<Gather<R>>>,
    done: Arc<Done>,
    tally: Arc<Tally>,
}

impl<R: serde::de::DeserializeOwned + Send + 'static> MapSink<R> {
    fn sink(state: Arc<Mutex<Gather<R>>>, done: Arc<Done>, tally: Arc<Tally>) -> Sink {
        Arc::new(MapSink { state, done, tally })
    }

    /// Items `first..first + count` of the map have `outcome`, under the map's lock (`g`):
    /// how many of them succeeded, if all did and went straight onto the result (counted
    /// by the caller, once for the pieces it hands over together).
    fn take(&self, g: &mut Gather<R>, first: usize, count: usize, outcome: Outcome) -> usize {
        let items = if first == g.next && g.err.is_none() {
            match driver::decode_onto::<R>(outcome, count, &mut g.out) {
                None => {
                    g.placed += count;
                    g.appended(count);
                    return count;
                }
                Some(items) => items,
            }
        } else {
            let mut v = std::mem::take(&mut g.scratch);
            match driver::decode_onto::<R>(outcome, count, &mut v) {
                None => Items::Ok(v),
                Some(items) => {
                    g.keep_scratch(v);
                    items
                }
            }
        };
        // An error names its item's index in the map.
        let items = match items {
            Items::Ok(v) => Items::Ok(v),
            Items::Mixed(v) => Items::Mixed(
                v.into_iter()
                    .enumerate()
                    .map(|(i, r)| r.map_err(|e| e.with_item(first + i)))
                    .collect(),
            ),
        };
        self.tally.count_untraced(&items);
        self.done.add(items.len());
        g.arrive(first, items);
        0
    }
}

impl<R: serde::de::DeserializeOwned + Send + 'static> Deliver for MapSink<R> {
    /// Items `first..first + count` of the map have `outcome`. Decoded under the map's lock
    /// (only this map's other deliveries wait for it; the decoder's panics are caught).
    fn deliver(&self, first: usize, count: usize, outcome: Outcome) {
        self.deliver_run(&mut std::iter::once((first, count, outcome)));
    }

    /// The pieces of one read under one lock, the items that went straight onto the
    /// result counted once.
    fn deliver_run(&self, pieces: &mut dyn Iterator<Item = Piece>) {
        /// Items that went onto the result, counted when it drops (if a piece panics too).
        struct Count<'a>(&'a Tally, &'a Done, usize);
        impl Drop for Count<'_> {
            fn drop(&mut self) {
                if self.2 > 0 {
                    self.0.add_ok(self.2);
                    self.1.add(self.2);
                }
            }
        }
        let mut g = lock(&self.state);
        let mut count = Count(&self.tally, &self.done, 0);
        for (first, n, outcome) in pieces {
            count.2 += self.take(&mut g, first, n, outcome);
        }
        drop(count);
        g.finish_if_done();
    }
}

/// A map's result as its items come back: the values of the items due next are moved
/// into the final vector as they come (they mostly come back in order), those that come
/// early wait in a window until the items before them are in; so a large map holds its
/// results once, not a vector per chunk and then the final one.
struct Gather<R> {
    /// The values of items `0..next`, in order (dropped once an item failed).
    out: Vec<R>,
    /// The first item not yet in `out`.
    next: usize,
    /// Items that came back before their turn, a few at a time: `window[i]` is item
    /// `next + i`'s result, if it came.
    window: VecDeque<Option<Result<R, TaskError>>>,
    /// Runs of at least [`RUN_MIN_ITEMS`] items that came back before their turn, by their
    /// first item.
    runs: BTreeMap<usize, Items<R>>,
    /// An empty vector that items coming early are decoded into, on their way to `window`.
    scratch: Vec<R>,
    /// The first failing item's error, in item order (`out` is dropped then).
    err: Option<TaskError>,
    /// Items back so far (each comes back once).
    placed: usize,
    /// The items in all the map's chunks, once every chunk has been made.
    total: Option<usize>,
    slot: Option<Arc<Slot<Vec<R>>>>,
    callbacks: Option<Callbacks<Vec<R>>>,
    shared: Weak<Shared>,
}

impl<R: Send + 'static> Gather<R> {
    /// The result of a map of `n` items, nothing back yet.
    fn new(
        n: usize,
        slot: Arc<Slot<Vec<R>>>,
        callbacks: Callbacks<Vec<R>>,
        shared: Weak<Shared>,
    ) -> Gather<R> {
        Gather {
            out: Vec::with_capacity(n),
            next: 0,
            window: VecDeque::new(),
            runs: BTreeMap::new(),
            scratch: Vec::new(),
            err: None,
            placed: 0,
            total: None,
            slot: Some(slot),
            callbacks: Some(callbacks),
            shared,
        }
    }

    /// Items `first..` are back with `results`.
    fn arrive(&mut self, first: usize, results: Items<R>) {
        let n = results.len();
        self.placed += n;
        if self.err.is_some() {
            return;
        }
        let results = match results {
            Items::Ok(mut v) if first == self.next => {
                // Moved in one piece (the first, into a vector with no room reserved, is
                // taken as it is).
                if self.out.is_empty() && self.out.capacity() < v.len() {
                    self.out = v;
                } else {
                    self.out.append(&mut v);
                    self.keep_scratch(v);
                }
                self.appended(n);
                return;
            }
            r => r,
        };
        // Items before `next` have all come back (each once): these are after it.
        let Some(at) = first.checked_sub(self.next) else {
            debug_assert!(false, "items from {first} came back twice");
            return;
        };
        if n >= RUN_MIN_ITEMS {
            // Kept whole, to be moved in one piece once its turn comes (its places in the
            // window, if the window reaches past it, stay empty).
            self.runs.insert(first, results);
            if at == 0 {
                self.take_early();
            }
            return;
        }
        if self.window.len() < at + n {
            self.window.resize_with(at + n, || None);
        }
        let places = self.window.range_mut(at..at + n);
        match results {
            Items::Ok(mut v) => {
                for (place, x) in places.zip(v.drain(..)) {
                    *place = Some(Ok(x));
                }
                self.keep_scratch(v);
            }
            Items::Mixed(v) => {
                for (place, r) in places.zip(v) {
                    *place = Some(r);
                }
            }
        }
        self.take_early();
    }

    /// The `n` items due next have just been appended to `out`: those that came early
    /// and are due now follow.
    fn appended(&mut self, n: usize) {
        self.next += n;
        self.window.drain(..n.min(self.window.len()));
        self.take_early();
    }

    /// Moves the items that came early and are now due into `out`, up to the first that
    /// has not come, or keeps the first error.
    fn take_early(&mut self) {
        while self.err.is_none() {
            if matches!(self.window.front(), Some(Some(_))) {
                let Some(Some(r)) = self.window.pop_front() else {
                    break;
                };
                self.take_one(r);
                continue;
            }
            let Some(run) = self.runs.remove(&self.next) else {
                break;
            };
            // Its places in the window are empty: they go with it.
            self.window.drain(..run.len().min(self.window.len()));
            match run {
                Items::Ok(mut v) => {
                    self.next += v.len();
                    self.out.append(&mut v);
                    self.keep_scratch(v);
                }
                Items::Mixed(v) => {
                    for r in v {
                        self.take_one(r);
                    }
                }
            }
        }
    }

    /// Item `next`'s result, in its turn.
    fn take_one(&mut self, r: Result<R, TaskError>) {
        self.next += 1;
        if self.err.is_some() {
            return;
        }
        match r {
            Ok(v) => self.out.push(v),
            Err(e) => {
                self.err = Some(e);
                self.out = Vec::new();
                self.window = VecDeque::new();
                self.runs = BTreeMap::new();
            }
        }
    }

    /// Keeps `v` (empty) for the next items that come back early, if it is larger than
    /// the one kept.
    fn keep_scratch(&mut self, v: Vec<R>) {
        if v.is_empty() && v.capacity() > self.scratch.capacity() {
            self.scratch = v;
        }
    }

    /// Settles the map's result once every chunk has been made and every item is back.
    fn finish_if_done(&mut self) {
        if self.total.is_some_and(|t| self.placed >= t) {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.scratch = Vec::new();
        let result = match self.err.take() {
            Some(e) => Err(e),
            // Every item came back, so every one has been moved in order.
            None if self.window.is_empty() && self.runs.is_empty() => {
                Ok(std::mem::take(&mut self.out))
            }
            None => Err(TaskError::new(TaskErrorKind::Decode, "missing result")),
        };
        if let (Some(slot), Some(cb)) = (self.slot.take(), self.callbacks.take()) {
            complete(&self.shared, slot, result, cb);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::result::Canceller;

    fn gather(n: usize) -> (Gather<u64>, AsyncResult<Vec<u64>>) {
        let slot = Slot::new();
        let canceller = Canceller {
            shared: Weak::new(),
            group: Arc::default(),
        };
        let out = AsyncResult::new(Arc::clone(&slot), canceller);
        let g = Gather::new(n, slot, Callbacks::new(), Weak::new());
        (g, out)
    }

    /// Pieces of a map's results of every size (one item, a few, runs kept whole), back in
    /// a scrambled order, some failing: the result holds every value in item order, or the
    /// error of the lowest failing item, and it is settled only by the last piece (or the
    /// seal, whichever comes last).
    #[test]
    fn pieces_in_any_order_settle_in_item_order() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |m: usize| (crate::rng::xorshift(&mut rng) % m as u64) as usize;
        for round in 0..300 {
            let n = 1 + next(700);
            let mut pieces = Vec::new();
            let mut first = 0;
            while first < n {
                let len = [1, 1, 2, 3, 63, 64, 100][next(7)].min(n - first);
                pieces.push((first, len));
                first += len;
            }
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, next(i + 1));
            }
            let failing: Vec<usize> = (0..next(3)).map(|_| next(n)).collect();
            let seal_after = next(pieces.len() + 1);
            let (mut g, out) = gather(n);
            for (k, &(first, len)) in pieces.iter().enumerate() {
                if k == seal_after {
                    g.total = Some(n);
                    g.finish_if_done();
                }
                assert!(
                    g.slot.is_some(),
                    "round {round}: settled before every piece was in"
                );
                let items = if (first..first + len).any(|i| failing.contains(&i)) {
                    Items::Mixed(
                        (first..first + len)
                            .map(|i| {
                                if failing.contains(&i) {
                                    Err(TaskError::new(TaskErrorKind::Panicked, "no").with_item(i))
                                } else {
                                    Ok(i as u64 * 3)
                                }
                            })
                            .collect(),
                    )
                } else {
                    Items::Ok((first..first + len).map(|i| i as u64 * 3).collect())
                };
                g.arrive(first, items);
                g.finish_if_done();
            }
            if seal_after == pieces.len() {
                assert!(g.slot.is_some(), "round {round}: settled before the seal");
                g.total = Some(n);
                g.finish_if_done();
            }
            let got = out.get_timeout(Duration::ZERO).expect("settled");
            match failing.iter().min() {
                None => assert_eq!(got, Ok((0..n as u64).map(|i| i * 3).collect())),
                Some(&i) => {
                    let e = got.unwrap_err();
                    assert_eq!(e.item_index(), Some(i), "round {round}: {e}");
                }
            }
        }
    }
}
