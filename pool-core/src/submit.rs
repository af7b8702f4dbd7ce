//! Submitting tasks: `apply` and `map`/`starmap` and their async forms, down to the task
//! records handed to the policy, and `complete`, which fills a result's slot after its
//! callbacks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use pool_spawn::task::FnRef;
use serde::de::DeserializeOwned;

use crate::chunk::{Encoded, encode_chunk};
use crate::driver::{self, Fx, Group, Outcome, Shared, Sink, TaskRec};
use crate::error::{QueueFull, TaskError, TaskErrorKind};
use crate::event::Pins;
use crate::items::Items;
use crate::observe::Tally;
use crate::options::Options;
use crate::policy::{Effects, Policy, Refusal};
use crate::pool::Pool;
use crate::result::{AsyncResult, Callbacks, Slot};
use crate::task::Task;

thread_local! {
    /// The vector a submitting thread takes the frames of tasks done into (see
    /// `Fx::take_spent_frames`), kept with its room from one batch to the next.
    static SPENT: std::cell::RefCell<Vec<pool_ipc::FrameBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

/// What a submission's tasks share: the function, its name, the time limit and the group
/// that cancelling the submission cancels.
#[derive(Clone)]
pub(crate) struct Submission {
    pub(crate) func: FnRef,
    pub(crate) name: &'static str,
    pub(crate) timeout: Option<Duration>,
    pub(crate) group: Arc<Group>,
}

impl Submission {
    pub(crate) fn new<F: Task<Args>, Args>(f: F, timeout: Option<Duration>) -> Self {
        Self::in_group(f, timeout, Arc::default())
    }

    /// [`new`](Submission::new), its tasks in `group`.
    pub(crate) fn in_group<F: Task<Args>, Args>(
        f: F,
        timeout: Option<Duration>,
        group: Arc<crate::driver::Group>,
    ) -> Self {
        Submission {
            func: f.batch_ref(),
            name: F::name(),
            timeout,
            group,
        }
    }

    /// Encodes `items` as the chunk of task `id`.
    pub(crate) fn encode<F: Task<Args>, Args>(&self, id: u64, items: &[Args]) -> Encoded {
        encode_chunk::<F, Args>(id, self.func, self.timeout.is_some(), items)
    }

    /// [`encode`](Submission::encode) of items the caller gives up: one large byte-string
    /// argument is taken out and sent from where it lies (see `chunk::take_tail`).
    pub(crate) fn encode_owned<F: Task<Args>, Args>(
        &self,
        id: u64,
        items: &mut Vec<Args>,
    ) -> Encoded {
        match F::take_tail(items) {
            Some(tail) => crate::chunk::encode_tail(id, self.func, self.timeout.is_some(), tail),
            None => self.encode::<F, Args>(id, items),
        }
    }

    /// [`encode_owned`](Submission::encode_owned) of one item (an `apply`'s arguments):
    /// put in a `Vec` only when they may be a byte string to send as a tail, so that other
    /// arguments cost no allocation of their own.
    pub(crate) fn encode_one<F: Task<Args>, Args>(&self, id: u64, args: Args) -> Encoded {
        if F::may_have_tail() {
            self.encode_owned::<F, Args>(id, &mut vec![args])
        } else {
            self.encode::<F, Args>(id, std::slice::from_ref(&args))
        }
    }
}

/// A chunk's per-item results as they arrive, in pieces when a worker dies or a time limit
/// strikes part way through it; `done` runs once every item has one. (`D`, the closure,
/// is held in place: one allocation per chunk for the sink and all.)
struct Pieces<R, D> {
    n: usize,
    state: Mutex<PiecesState<R, D>>,
    /// The task's span, told how each piece ended.
    span: tracing::Span,
    tally: Arc<Tally>,
}

struct PiecesState<R, D> {
    got: Vec<Option<Result<R, TaskError>>>,
    missing: usize,
    done: Option<D>,
}

impl<R, D> Pieces<R, D>
where
    R: DeserializeOwned + Send + 'static,
    D: FnOnce(Items<R>) + Send + 'static,
{
    fn sink(n: usize, done: D, span: tracing::Span, tally: Arc<Tally>) -> Sink {
        let pieces = Pieces {
            n,
            span,
            tally,
            state: Mutex::new(PiecesState {
                got: Vec::new(),
                missing: n,
                done: Some(done),
            }),
        };
        Arc::new(move |first, count, outcome| pieces.deliver(first, count, outcome))
    }

    fn deliver(&self, first: usize, count: usize, outcome: Outcome) {
        // Decoded before the lock: it is user code, and may take long.
        let items = driver::decode_items::<R>(outcome, count);
        self.tally.count(&self.span, first, &items);
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let finished = if g.missing == self.n && first == 0 && count == self.n {
            // The whole chunk at once (the usual case).
            g.missing = 0;
            Some(items)
        } else {
            if g.got.is_empty() {
                g.got = (0..self.n).map(|_| None).collect();
            }
            for (i, r) in (first..).zip(items.into_results()) {
                if let Some(place) = g.got.get_mut(i)
                    && place.is_none()
                {
                    *place = Some(r);
                    g.missing -= 1;
                }
            }
            (g.missing == 0).then(|| {
                Items::Mixed(
                    std::mem::take(&mut g.got)
                        .into_iter()
                        .map(|r| r.expect("every item has its result"))
                        .collect(),
                )
            })
        };
        let done = finished.and_then(|items| g.done.take().map(|d| (d, items)));
        drop(g);
        if let Some((done, items)) = done {
            done(items);
        }
    }
}

impl Pool {
    /// A fresh task id.
    pub(crate) fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The time limit of a call with `opts`.
    pub(crate) fn timeout_of(&self, requested: Option<Duration>) -> Option<Duration> {
        requested.or(self.task_timeout)
    }

    /// Turns an encoded batch into a task record for the policy, or settles it at once
    /// (nothing to send, or the frame cannot be built): `None` then. `queued_at`: when it
    /// is handed to the pool (now, or when the batch it goes with began).
    pub(crate) fn prepare_batch<R>(
        &self,
        sub: &Submission,
        enc: Encoded,
        base: Option<usize>,
        queued_at: Instant,
        done: impl FnOnce(Items<R>) + Send + 'static,
    ) -> Option<(u64, TaskRec)>
    where
        R: DeserializeOwned + Send + 'static,
    {
        self.prepare_spanned(sub, enc, base, queued_at, None, done)
    }

    /// [`prepare_batch`](Pool::prepare_batch) with the task's span made already (by
    /// [`may_share`](Pool::may_share)), if it was.
    pub(crate) fn prepare_spanned<R>(
        &self,
        sub: &Submission,
        enc: Encoded,
        base: Option<usize>,
        queued_at: Instant,
        span: Option<tracing::Span>,
        done: impl FnOnce(Items<R>) + Send + 'static,
    ) -> Option<(u64, TaskRec)>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let Encoded {
            id,
            frame,
            spans,
            placement,
            pins,
            tail,
        } = enc;
        let n_sent = placement.sent();
        let task_pins = pins.clone();
        let span = span.unwrap_or_else(|| {
            crate::observe::task_span(&self.shared.span, id, sub.name, base, n_sent)
        });
        if n_sent == 0 {
            done(placement.merge(Items::Ok(Vec::new()), base));
            return None;
        }
        let sink = Pieces::sink(
            n_sent,
            move |got: Items<R>| {
                // The worker has decoded the arguments (or never will): release their events.
                drop(pins);
                done(placement.merge(got, base));
            },
            span.clone(),
            Arc::clone(&self.shared.tally),
        );
        let extra = crate::driver::TaskExtra::boxed(tail, task_pins, spans);
        self.task_rec(sub, id, frame, extra, (sink, 0, n_sent), queued_at, span)
    }

    /// Whether chunk `enc` of a `map` (its items `first..` among the map's) may deliver
    /// to the map's one sink ([`prepare_shared`](Pool::prepare_shared)): every item was
    /// encoded, it holds no event, and nobody traces its task (the map's sink tells no task
    /// span how it ended). The task's span comes with the answer when it was made (no
    /// task has two).
    pub(crate) fn may_share(&self, sub: &Submission, enc: &Encoded, first: usize) -> Share {
        let n = enc.placement.sent();
        if !enc.placement.all_sent() || !enc.pins.is_empty() || n == 0 {
            return Share::No(None);
        }
        let span = crate::observe::task_span(&self.shared.span, enc.id, sub.name, Some(first), n);
        if span.is_disabled() {
            Share::Yes(span)
        } else {
            Share::No(Some(span))
        }
    }

    /// As [`prepare_batch`](Pool::prepare_batch), for a chunk of a `map` that
    /// [`may_share`](Pool::may_share) the map's one `sink` (with `span`, the one that gave):
    /// the chunk's items are `first..` among the sink's, and no sink is made for it alone.
    pub(crate) fn prepare_shared(
        &self,
        sub: &Submission,
        enc: Encoded,
        (first, sink): (usize, &Sink),
        queued_at: Instant,
        span: tracing::Span,
    ) -> Option<(u64, TaskRec)> {
        let n = enc.placement.sent();
        let Encoded {
            id,
            frame,
            spans,
            tail,
            ..
        } = enc;
        let extra = crate::driver::TaskExtra::boxed(tail, Pins::default(), spans);
        let sink = Arc::clone(sink);
        self.task_rec(sub, id, frame, extra, (sink, first, n), queued_at, span)
    }

    /// The record of task `id` (its items `first..first + count` among those of `sink`),
    /// or `None` when its frame cannot be sent (its items fail through `sink` then).
    #[allow(clippy::too_many_arguments)] // reason: the parts of one record, named
    fn task_rec(
        &self,
        sub: &Submission,
        id: u64,
        frame: Result<pool_ipc::FrameBuf, TaskError>,
        extra: Option<Box<crate::driver::TaskExtra>>,
        (sink, first, count): (Sink, usize, usize),
        queued_at: Instant,
        span: tracing::Span,
    ) -> Option<(u64, TaskRec)> {
        let limit = self.shared.frame_limit();
        let fail =
            |e: TaskError| sink.deliver(first, count, Outcome::Failed(e.with_function(sub.name)));
        let frame = match frame {
            Ok(f) if f.payload_len() > limit => {
                fail(TaskError::new(
                    TaskErrorKind::Encode,
                    format!(
                        "the task's arguments encode to {} bytes, over the limit of {limit} \
                         bytes for one message",
                        f.payload_len()
                    ),
                ));
                return None;
            }
            Ok(f) => f,
            Err(e) => {
                fail(e);
                return None;
            }
        };
        sub.group.add(id);
        let extra = match extra {
            Some(mut x) => {
                x.span = span;
                Some(x)
            }
            None if span.is_disabled() => None,
            None => Some(Box::new(crate::driver::TaskExtra {
                span,
                ..Default::default()
            })),
        };
        let rec = TaskRec {
            frame: Some(frame),
            extra,
            sink,
            first,
            count,
            func: sub.func,
            name: sub.name,
            timeout: sub.timeout,
            group: (!sub.group.is_unseen()).then(|| Arc::clone(&sub.group)),
            sent_at: None,
            sent_to: None,
            queued_at,
            started_at: None,
        };
        Some((id, rec))
    }

    /// Hands tasks to the policy under one lock (their frames go out in one write per
    /// worker); a refused task fails with the reason.
    pub(crate) fn submit_all(&self, tasks: Vec<(u64, TaskRec)>, fed: bool) {
        let _ = self.submit_then(tasks, fed, None, |_, _| None::<()>, |_, _, r| Some(r));
    }

    /// [`submit_all`](Pool::submit_all) of the tasks `tasks` holds (from a feed, if `fed`),
    /// leaving it empty with its room, for the next batch: a batch of records moves into
    /// the policy once, not into a fresh vector that grows as it fills first. Returns what
    /// the pool holds after the step; `None` under backpressure (`max_queued`, which a
    /// feed skips), whose tasks each wait for room in a step of their own.
    pub(crate) fn submit_drain(&self, tasks: &mut Vec<(u64, TaskRec)>, fed: bool) -> Option<Held> {
        if self.shared.max_queued().is_some() && !fed {
            self.submit_all(std::mem::take(tasks), fed);
            return None;
        }
        if tasks.iter().any(|(_, t)| t.timeout.is_some()) {
            self.shared.note_timeouts();
        }
        let mut spent = SPENT.take();
        let (refused, held) = self.shared.act(|p, fx| {
            let refused = submit_each(p, fx, tasks.drain(..), fed);
            let held = Held {
                queued: p.queued(),
                depth: p.depth(),
            };
            fx.take_spent_frames(&mut spent);
            (refused, held)
        });
        // Out of the lock: this thread's next frames are made in their buffers.
        pool_ipc::keep_small_frames(spent.drain(..));
        SPENT.set(spent);
        self.fail_refused(refused, fed);
        Some(held)
    }

    /// [`submit_all`](Pool::submit_all), then `then` in the same locked step once every
    /// task was taken (before their frames are written); its answer. Under backpressure
    /// (`max_queued`) each task waits for room in a step of its own, and `then` does not run.
    ///
    /// The frames of tasks done come back to this thread (as in
    /// [`submit_drain`](Pool::submit_drain)): an `apply` makes its next frame in the buffer
    /// of its last. `made_at`: when the tasks were made, if just now (the time an apply
    /// reads for its task: the step's time too, if it takes the lock at once).
    ///
    /// `after` runs with `then`'s answer in the same locked step once the step's frames
    /// were written (and their workers rung); its answer is returned.
    fn submit_then<R, S, T>(
        &self,
        tasks: T,
        fed: bool,
        made_at: Option<Instant>,
        then: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> Option<R>,
        after: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>, R) -> Option<S>,
    ) -> Option<S>
    where
        T: AsRef<[(u64, TaskRec)]> + IntoIterator<Item = (u64, TaskRec)>,
    {
        if tasks.as_ref().iter().any(|(_, t)| t.timeout.is_some()) {
            self.shared.note_timeouts();
        }
        // Backpressure: one task at a time, each once the queue has room (imap's feeds
        // are bounded by their window instead).
        let (refused, r) = match self.shared.max_queued().filter(|_| !fed) {
            None => {
                let mut spent = SPENT.take();
                let (refused, r) = self.shared.act_then(
                    made_at,
                    |p, fx| {
                        let refused = submit_each(p, fx, tasks, fed);
                        let r = if refused.is_empty() {
                            then(p, fx)
                        } else {
                            None
                        };
                        fx.take_spent_frames(&mut spent);
                        (refused, r)
                    },
                    |p, fx, (refused, r)| (refused, r.and_then(|r| after(p, fx, r))),
                );
                // Out of the lock, as in `submit_drain`.
                pool_ipc::keep_small_frames(spent.drain(..));
                SPENT.set(spent);
                (refused, r)
            }
            Some(max) => {
                let mut refused = Vec::new();
                for (id, rec) in tasks {
                    tracing::trace!(parent: rec.span(), "task queued");
                    let r = self
                        .shared
                        .act_with_room(max, 1, true, |p, fx| p.submit_from(id, rec, fed, fx).err());
                    if let Some(Some((rec, why))) = r {
                        rec.leave_group(id);
                        refused.push((rec, why));
                    }
                }
                (refused, None)
            }
        };
        self.fail_refused(refused, fed);
        r
    }

    /// Submits tasks (a whole `map`'s chunks, or one `apply`) only if the queue has room for
    /// all of them under `max`: `false` (nothing submitted, the tasks dropped unrun)
    /// otherwise.
    pub(crate) fn try_submit_all(&self, tasks: Vec<(u64, TaskRec)>, max: usize) -> bool {
        if tasks.iter().any(|(_, t)| t.timeout.is_some()) {
            self.shared.note_timeouts();
        }
        let need = tasks.len();
        match self
            .shared
            .act_with_room(max, need, false, |p, fx| submit_each(p, fx, tasks, false))
        {
            Some(refused) => {
                self.fail_refused(refused, false);
                true
            }
            None => false,
        }
    }

    /// Fails tasks the policy refused, with the reason.
    fn fail_refused(&self, refused: Vec<(TaskRec, Refusal)>, fed: bool) {
        for (rec, why) in refused {
            let e = match why {
                Refusal::Closed if fed => TaskError::new(
                    TaskErrorKind::PoolClosed,
                    "the pool was joined or terminated before this item was sent: imap sends \
                     items as their results are consumed, so let it finish before join() (a \
                     long map sends them as the workers take them: join waits for it, \
                     terminate stops it)",
                ),
                Refusal::Closed => TaskError::new(
                    TaskErrorKind::PoolClosed,
                    "the pool is closed: it accepts no new tasks",
                ),
                Refusal::Broken(m) => TaskError::with_report(TaskErrorKind::InitializerFailed, m),
                Refusal::CannotStart(m) => TaskError::new(TaskErrorKind::StartFailed, m),
            };
            rec.sink.deliver(rec.first, rec.count, Outcome::Failed(e));
        }
    }

    /// Runs `f(args...)` in a worker and waits for its result: Python's `apply`.
    ///
    /// `args` is a tuple: `pool.apply(add, (1, 2))`.
    ///
    /// # Errors
    /// The task's [`TaskError`]: it panicked, its worker died, it ran past the pool's
    /// [`task_timeout`](crate::PoolBuilder::task_timeout), it could not be encoded or
    /// decoded, or the pool is closed.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(1).build()?;
    ///     assert_eq!(pool.apply(add, (2, 3))?, 5);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn apply<F, Args>(&self, f: F, args: Args) -> Result<F::Output, TaskError>
    where
        F: Task<Args>,
    {
        self.apply_and_wait(f, args, Options::new())
    }

    /// [`apply`](Pool::apply) with per-call [`Options`] (a time limit, say).
    ///
    /// # Errors
    /// As [`apply`](Pool::apply).
    pub fn apply_with<F, Args>(
        &self,
        f: F,
        args: Args,
        opts: Options<F::Output>,
    ) -> Result<F::Output, TaskError>
    where
        F: Task<Args>,
    {
        self.apply_and_wait(f, args, opts)
    }

    /// Submits `f(args...)` and returns at once: Python's `apply_async`.
    pub fn apply_async<F, Args>(&self, f: F, args: Args) -> AsyncResult<F::Output>
    where
        F: Task<Args>,
    {
        self.apply_async_with(f, args, Options::new())
    }

    /// Like [`apply_async`](Pool::apply_async), but never blocks: when the pool was built
    /// with [`max_queued(n)`](crate::PoolBuilder::max_queued) and `n` tasks already wait,
    /// the arguments come back in [`QueueFull`], as crossbeam's `try_send` returns the
    /// value. Without `max_queued` it always submits.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn slow_square(x: u64) -> u64 {
    ///     std::thread::sleep(std::time::Duration::from_millis(200));
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init(); // first line of main: workers start here
    ///     let pool = procpool::Pool::builder().processes(1).max_queued(1).build()?;
    ///     let running = pool.apply_async(slow_square, (1,));
    ///     while pool.metrics().running == 0 {
    ///         std::thread::yield_now();
    ///     }
    ///     let queued = pool.try_apply_async(slow_square, (2,)).expect("room for one");
    ///     let full = pool.try_apply_async(slow_square, (3,)).unwrap_err();
    ///     assert_eq!(full.into_inner(), (3,)); // the arguments, back
    ///     assert_eq!((running.get()?, queued.get()?), (1, 4));
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    /// [`QueueFull`] with `args`, when the queue is full.
    pub fn try_apply_async<F, Args>(
        &self,
        f: F,
        args: Args,
    ) -> Result<AsyncResult<F::Output>, QueueFull<Args>>
    where
        F: Task<Args>,
    {
        let Some(max) = self.shared.max_queued() else {
            return Ok(self.apply_async(f, args));
        };
        let slot = Slot::new();
        let sub = Submission::new(f, self.timeout_of(None));
        let id = self.new_id();
        let out =
            AsyncResult::new(Arc::clone(&slot), self.canceller(Arc::clone(&sub.group))).of_task(id);
        let weak = Arc::downgrade(&self.shared);
        let enc = sub.encode::<F, Args>(id, std::slice::from_ref(&args));
        let task = self.prepare_batch::<F::Output>(&sub, enc, None, Instant::now(), move |items| {
            let r = items
                .into_last()
                .unwrap_or_else(|| Err(TaskError::new(TaskErrorKind::Decode, "no result")));
            complete(&weak, slot, r, Callbacks::new());
        });
        // Settled already (it could not be encoded, say): its result says so.
        let Some(task) = task else {
            return Ok(out);
        };
        if self.try_submit_all(vec![task], max) {
            Ok(out)
        } else {
            Err(QueueFull(args))
        }
    }

    /// [`apply_async`](Pool::apply_async) with per-call [`Options`]: Python's `callback` and
    /// `error_callback`, and a time limit.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// use std::sync::mpsc;
    /// use procpool::Options;
    ///
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init();
    ///     let pool = procpool::Pool::builder().processes(1).build()?;
    ///     let (tx, rx) = mpsc::channel();
    ///     let opts = Options::new().on_success(move |v: &u64| tx.send(*v).unwrap());
    ///     let r = pool.apply_async_with(square, (9,), opts);
    ///     assert_eq!(r.get()?, 81);
    ///     assert_eq!(rx.recv().unwrap(), 81); // the callback ran before `get` returned
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn apply_async_with<F, Args>(
        &self,
        f: F,
        args: Args,
        opts: Options<F::Output>,
    ) -> AsyncResult<F::Output>
    where
        F: Task<Args>,
    {
        let (slot, group, id, task) = self.prepare_apply(f, args, opts, false);
        let out = self.handle(slot, group, id);
        if let Some(task) = task {
            self.submit_all(vec![task], false);
        }
        out
    }

    /// One task for `f(args...)`, and what makes the handle to its result (see
    /// [`Pool::handle`]): its slot, its group (`None` if `unseen`) and its id; `None` for
    /// the task if it was settled at once (its arguments could not be encoded, say).
    /// `unseen`: the handle stays with the pool (its caller waits for the result, and
    /// makes the handle only if it must wait), so the task joins no group that keeps its
    /// id for a cancel.
    #[allow(
        clippy::type_complexity,
        reason = "the parts of one handle, taken apart at once"
    )]
    fn prepare_apply<F, Args>(
        &self,
        f: F,
        args: Args,
        opts: Options<F::Output>,
        unseen: bool,
    ) -> (
        Arc<Slot<F::Output>>,
        Option<Arc<crate::driver::Group>>,
        u64,
        Option<(u64, TaskRec)>,
    )
    where
        F: Task<Args>,
    {
        let Options {
            timeout, callbacks, ..
        } = opts;
        let group = if unseen {
            crate::driver::Group::unseen()
        } else {
            Arc::default()
        };
        let sub = Submission::in_group(f, self.timeout_of(timeout), group);
        let id = self.new_id();
        let enc = sub.encode_one::<F, Args>(id, args);
        if callbacks.is_empty()
            && enc.placement.all_sent()
            && enc.placement.sent() == 1
            && enc.pins.is_empty()
        {
            // The usual apply: its result's slot is its sink (see `Slot::single`).
            let Encoded {
                frame, spans, tail, ..
            } = enc;
            let span = crate::observe::task_span(&self.shared.span, id, sub.name, None, 1);
            let slot = Slot::single(Arc::clone(&self.shared.tally), span.clone());
            let group = (!unseen).then(|| Arc::clone(&sub.group));
            let out = Arc::clone(&slot);
            let extra = crate::driver::TaskExtra::boxed(tail, Pins::default(), spans);
            let task = self.task_rec(&sub, id, frame, extra, (slot, 0, 1), Instant::now(), span);
            return (out, group, id, task);
        }
        let slot = Slot::new();
        let group = (!unseen).then(|| Arc::clone(&sub.group));
        let out = Arc::clone(&slot);
        let weak = Arc::downgrade(&self.shared);
        let task = self.prepare_batch::<F::Output>(&sub, enc, None, Instant::now(), move |items| {
            let r = items
                .into_last()
                .unwrap_or_else(|| Err(TaskError::new(TaskErrorKind::Decode, "no result")));
            complete(&weak, slot, r, callbacks);
        });
        (out, group, id, task)
    }

    /// The handle to the result of task `id`, whose slot is `slot`, of `group` (`None`:
    /// of a submission nobody can cancel, see [`Group::unseen`](crate::driver::Group::unseen)).
    fn handle<T>(
        &self,
        slot: Arc<Slot<T>>,
        group: Option<Arc<crate::driver::Group>>,
        id: u64,
    ) -> AsyncResult<T> {
        let cancel = self.canceller(group.unwrap_or_else(crate::driver::Group::unseen));
        AsyncResult::new(slot, cancel).of_task(id)
    }

    /// `apply`: submits the task and, in the same step, borrows the socket of the worker it
    /// went to (before its frame is written, so the answer wakes only this thread), then
    /// waits for the answer reading that socket itself (see `driver::reader`).
    fn apply_and_wait<F, Args>(
        &self,
        f: F,
        args: Args,
        opts: Options<F::Output>,
    ) -> Result<F::Output, TaskError>
    where
        F: Task<Args>,
    {
        // The handle never leaves this call: nobody can cancel the task. It is made only
        // if the result is not in once the caller's own wait ends.
        let (slot, _, id, task) = self.prepare_apply(f, args, opts, true);
        let Some(task) = task else {
            return self.handle(slot, None, id).get();
        };
        let made_at = task.1.queued_at;
        // The answer is taken in the same step when the worker posted it before the step
        // ended (see `take_early_answer`).
        let lent = self.submit_then(
            [task],
            false,
            Some(made_at),
            |p, fx| fx.lend(p, id, true),
            |p, fx, b| fx.take_early_answer(p, b),
        );
        if let Some(b) = lent {
            self.shared.await_answer(b, None);
        }
        match slot.take_ready() {
            Some(r) => r,
            None => self.handle(slot, None, id).get(),
        }
    }

    /// Applies `f` to every item, in parallel, and returns the results in order: Python's
    /// `map`. Items are sent in chunks of an automatic size (about four per worker, and
    /// at most 8192 items each: see [`Options::chunksize`]), each chunk as soon as it is encoded:
    /// workers begin on the first while the input is still read (a `close` from another
    /// thread meanwhile fails the chunks not yet sent with
    /// [`PoolClosed`](crate::TaskErrorKind::PoolClosed)). As it waits for the result
    /// anyway, a map of more than about a thousand chunks stops reading while that many
    /// wait for a worker, and reads on once half of them are taken: it keeps no more than
    /// that many in memory. Like an [`imap`](Pool::imap), it then goes on sending its
    /// chunks after a `close`; a [`join`](Pool::join) waits for it to send them all (as
    /// Python's join does for a map begun before close), a `terminate` stops it.
    /// ([`map_async`](Pool::map_async) makes every chunk before it returns.)
    ///
    /// # Errors
    /// The error of the first failing item (by index); [`TaskError::item_index`] says which.
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
    ///     assert_eq!(pool.map(square, 1..=4u64)?, vec![1, 4, 9, 16]);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn map<F, A, I>(&self, f: F, items: I) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_with(f, items, Options::new())
    }

    /// [`map`](Pool::map) with per-call [`Options`]: a chunk size (Python's `chunksize`), a
    /// time limit for each item.
    ///
    /// # Errors
    /// As [`map`](Pool::map).
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// use std::time::Duration;
    /// use procpool::{Options, TaskErrorKind};
    ///
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init();
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     let opts = Options::new().chunksize(2).timeout(Duration::from_millis(200));
    ///     let e = pool.map_with(nap, vec![1, 2, 5_000, 3], opts).unwrap_err();
    ///     assert_eq!((e.kind(), e.item_index()), (TaskErrorKind::TimedOut, Some(2)));
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    #[doc(alias = "chunksize")]
    pub fn map_with<F, A, I>(
        &self,
        f: F,
        items: I,
        opts: Options<Vec<F::Output>>,
    ) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        // The caller waits for the result: the chunks are made as the queue has room.
        self.gather::<F, _>(f, items.into_iter().map(|a| (a,)), opts, true)
            .get()
    }

    /// Submits a `map` and returns at once: Python's `map_async`.
    pub fn map_async<F, A, I>(&self, f: F, items: I) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, Options::new())
    }

    /// [`map_async`](Pool::map_async) with per-call [`Options`] (chunk size, callbacks, time
    /// limit).
    pub fn map_async_with<F, A, I>(
        &self,
        f: F,
        items: I,
        opts: Options<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        // One-tuples: the task's arguments, the same bytes as the items themselves.
        self.gather::<F, _>(f, items.into_iter().map(|a| (a,)), opts, false)
    }

    /// [`map_async_with`](Pool::map_async_with) that never waits: with
    /// [`max_queued(n)`](crate::PoolBuilder::max_queued), the whole map is submitted only if
    /// all its chunks fit in the queue beside the tasks already waiting there; otherwise the
    /// items come back in [`QueueFull`], and nothing of the map was submitted. A map of more
    /// chunks than `n` never fits: give it a larger
    /// [`chunksize`](crate::Options::chunksize). Without `max_queued` it always submits.
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// use procpool::Options;
    ///
    /// fn slow_square(x: u64) -> u64 {
    ///     std::thread::sleep(std::time::Duration::from_millis(50));
    ///     x * x
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init();
    ///     let pool = procpool::Pool::builder().processes(1).max_queued(3).build()?;
    ///     let by_two = || Options::new().chunksize(2);
    ///     // Six items in three chunks: they fit.
    ///     let first = pool.try_map_async_with(slow_square, 0..6, by_two()).expect("room");
    ///     // Four more in two chunks: with three (or two, once one began) waiting, they do
    ///     // not fit, so the map comes back whole.
    ///     let full = pool.try_map_async_with(slow_square, 6..10, by_two()).unwrap_err();
    ///     assert_eq!(full.into_inner(), vec![6, 7, 8, 9]);
    ///     assert_eq!(first.get()?, vec![0, 1, 4, 9, 16, 25]);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    /// [`QueueFull`] with the items, when the queue cannot take the whole map.
    pub fn try_map_async_with<F, A, I>(
        &self,
        f: F,
        items: I,
        opts: Options<Vec<F::Output>>,
    ) -> Result<AsyncResult<Vec<F::Output>>, QueueFull<Vec<A>>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        let Some(max) = self.shared.max_queued() else {
            return Ok(self.gather::<F, _>(f, items.into_iter().map(|a| (a,)), opts, false));
        };
        let items: Vec<(A,)> = items.into_iter().map(|a| (a,)).collect();
        self.try_gather::<F, _>(f, &items, opts, max)
            .ok_or_else(|| QueueFull(items.into_iter().map(|(a,)| a).collect()))
    }

    /// [`try_map_async_with`](Pool::try_map_async_with) with the default options.
    ///
    /// # Errors
    /// [`QueueFull`] with the items, when the queue cannot take the whole map.
    pub fn try_map_async<F, A, I>(
        &self,
        f: F,
        items: I,
    ) -> Result<AsyncResult<Vec<F::Output>>, QueueFull<Vec<A>>>
    where
        F: Task<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.try_map_async_with(f, items, Options::new())
    }

    /// Like [`map`](Pool::map) for functions of several arguments: each item is a tuple of
    /// arguments. Python's `starmap`.
    ///
    /// # Errors
    /// The error of the first failing item (by index).
    ///
    /// ```
    /// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    ///
    /// fn main() -> Result<(), procpool::Error> {
    ///     procpool::init();
    ///     let pool = procpool::Pool::builder().processes(2).build()?;
    ///     assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)])?, vec![3, 7]);
    ///     pool.close();
    ///     pool.join()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn starmap<F, Args, I>(&self, f: F, items: I) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_with(f, items, Options::new())
    }

    /// [`starmap`](Pool::starmap) with per-call [`Options`].
    ///
    /// # Errors
    /// As [`starmap`](Pool::starmap).
    pub fn starmap_with<F, Args, I>(
        &self,
        f: F,
        items: I,
        opts: Options<Vec<F::Output>>,
    ) -> Result<Vec<F::Output>, TaskError>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.gather::<F, _>(f, items, opts, true).get()
    }

    /// Submits a `starmap` and returns at once: Python's `starmap_async`.
    pub fn starmap_async<F, Args, I>(&self, f: F, items: I) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.starmap_async_with(f, items, Options::new())
    }

    /// [`starmap_async`](Pool::starmap_async) with per-call [`Options`].
    pub fn starmap_async_with<F, Args, I>(
        &self,
        f: F,
        items: I,
        opts: Options<Vec<F::Output>>,
    ) -> AsyncResult<Vec<F::Output>>
    where
        F: Task<Args>,
        I: IntoIterator<Item = Args>,
    {
        self.gather::<F, _>(f, items, opts, false)
    }
}

/// Whether a chunk may deliver to its map's one sink ([`Pool::may_share`]), with its task's
/// span if it was made.
pub(crate) enum Share {
    /// It may; its task's span (a disabled one).
    Yes(tracing::Span),
    /// It needs a sink of its own; its task's span, if it was made already.
    No(Option<tracing::Span>),
}

/// What the pool holds after a batch was handed to it ([`Pool::submit_drain`]).
pub(crate) struct Held {
    /// Tasks waiting in the queue for a worker.
    pub(crate) queued: usize,
    /// The tasks each worker may hold now ([`Policy::depth`]).
    pub(crate) depth: usize,
}

/// Hands `tasks` to the policy in one step; returns those it refused, with the reason.
fn submit_each(
    p: &mut Policy<TaskRec>,
    fx: &mut impl Effects<TaskRec>,
    tasks: impl IntoIterator<Item = (u64, TaskRec)>,
    fed: bool,
) -> Vec<(TaskRec, Refusal)> {
    let mut refused = Vec::new();
    for (id, rec) in tasks {
        tracing::trace!(parent: rec.span(), "task queued");
        if let Err((rec, why)) = p.submit_from(id, rec, fed, fx) {
            rec.leave_group(id);
            refused.push((rec, why));
        }
    }
    refused
}
