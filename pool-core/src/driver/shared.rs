//! The state shared by the pool handle, the driver thread and submitting threads, behind one
//! lock; [`Shared::act`] runs a policy step under it and delivers outcomes after it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pool_ipc::Config as IpcConfig;
use pool_spawn::protocol::Limits;
use pool_spawn::task::FnRef;
use rustix::event::{EventfdFlags, epoll};

use super::callbacks::CallbackThread;
use super::effects::Fx;
use super::worker_io::WorkerIo;
use super::{Delivery, TaskRec};
use crate::event::Pins;
use crate::ids::IdMap;
use crate::metrics::Summary;
use crate::observe::{Tally, Timings};
use crate::policy::{Cancelled, Policy, WorkerId};
use crate::result::CancelOutcome;

/// How long a terminated worker has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);

/// Static settings the driver needs for every worker it starts.
pub(crate) struct Settings {
    pub(crate) prefix: &'static str,
    pub(crate) max_tasks: Option<u64>,
    pub(crate) init: Option<(FnRef, Vec<u8>)>,
    /// The events among the initializer's arguments: every worker, those started later
    /// too, opens them (their descriptors go with its Setup).
    pub(crate) init_pins: Pins,
    pub(crate) ipc: IpcConfig,
    /// Memory limits each worker applies to itself.
    pub(crate) limits: Limits,
    /// How long a worker stopped because of its task has between SIGTERM and SIGKILL.
    pub(crate) stop_grace: Duration,
    /// Where task ids come from (shared with the pool handle).
    pub(crate) next_id: Arc<AtomicU64>,
    /// Submissions wait while this many tasks wait in the queue (`PoolBuilder::max_queued`).
    pub(crate) max_queued: Option<usize>,
    /// This process's id (the pool's workers are its children, or its fork server's),
    /// asked once rather than at every launch.
    pub(crate) pid: u32,
}

/// Everything behind the pool's lock.
pub(crate) struct Inner {
    pub(crate) policy: Policy<TaskRec>,
    pub(super) io: IdMap<WorkerIo>,
    pub(super) launches: Vec<WorkerId>,
    pub(super) done: Vec<Delivery>,
    pub(super) term_deadline: Option<Instant>,
    pub(super) terminating: bool,
    pub(super) wake_driver: bool,
    /// When the driver next looks at the running tasks' clocks (if it does): a task with a
    /// time limit that may run out before then wakes it.
    pub(super) timer_at: Option<Instant>,
    /// Queue-wait and run-time summaries.
    pub(super) timings: Timings,
    /// Submitters waiting for room in the queue.
    pub(super) waiting: usize,
    /// The longest queue some submitter in [`Shared::wait_queue`] waits for, while one does.
    pub(super) room_at: Option<usize>,
    /// Workers whose channel a caller reading its own answer found closed or broken: the
    /// driver stops watching them (see `reader`).
    pub(super) reader_ended: Vec<(WorkerId, super::reader::ReadEnd)>,
    /// The earliest look at a worker's held answers the driver sleeps until, if any (see
    /// `reader::look_held`): a step on another thread that plans one sooner wakes it.
    pub(super) looks_planned: Option<Instant>,
    /// The frames of tasks done, for the next submitter to make its next frames in (see
    /// [`Fx::take_spent_frames`]).
    pub(super) spent_frames: Vec<pool_ipc::FrameBuf>,
    /// The room of the list of workers a step queued frames for, kept empty between steps
    /// (see [`Shared::act`]): a step that sends a task allocates none.
    pub(super) dirty: Vec<WorkerId>,
}

/// Shared between the pool handle, the driver thread and submitting threads.
pub(crate) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) wake: OwnedFd,
    /// The driver's epoll set: the wake-up eventfd, every worker's pidfd, and every
    /// worker's socket that no caller has borrowed.
    pub(super) epoll: OwnedFd,
    pub(super) settings: Settings,
    pub(super) callbacks: Mutex<Option<CallbackThread>>,
    /// Some task had a time limit: the driver watches the running tasks' clocks.
    pub(super) timeouts: AtomicBool,
    /// The pool's span: the parent of its tasks' spans; the driver thread runs in it.
    pub(crate) span: tracing::Span,
    /// Item outcomes by kind.
    pub(crate) tally: Arc<Tally>,
    /// Signalled when the queue shrinks below `max_queued` or to a waiting map's `room_at`
    /// (or the pool closes), with submitters waiting.
    room: Condvar,
    /// Signalled when a waiting map's feed closes (or the pool is terminated), for `join`.
    feeds: Condvar,
}

impl Shared {
    pub(crate) fn new(
        policy: Policy<TaskRec>,
        settings: Settings,
        span: tracing::Span,
    ) -> std::io::Result<Arc<Self>> {
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &ep,
            &wake,
            epoll::EventData::new_u64(super::worker_io::WAKE_TOKEN),
            epoll::EventFlags::IN,
        )?;
        Ok(Arc::new(Shared {
            inner: Mutex::new(Inner {
                policy,
                io: IdMap::default(),
                launches: Vec::new(),
                done: Vec::new(),
                term_deadline: None,
                terminating: false,
                wake_driver: false,
                timer_at: None,
                timings: Timings::default(),
                waiting: 0,
                room_at: None,
                reader_ended: Vec::new(),
                looks_planned: None,
                spent_frames: Vec::new(),
                dirty: Vec::new(),
            }),
            wake,
            epoll: ep,
            settings,
            callbacks: Mutex::new(None),
            timeouts: AtomicBool::new(false),
            span,
            tally: Arc::default(),
            room: Condvar::new(),
            feeds: Condvar::new(),
        }))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether another thread holds the pool's lock now (it may be let go at once: a hint,
    /// for a submitter that has other work to do before it needs the lock).
    pub(crate) fn is_busy(&self) -> bool {
        matches!(
            self.inner.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        )
    }

    pub(super) fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Applies one policy step under the lock; delivers outcomes after unlocking.
    pub(crate) fn act<R>(&self, step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R) -> R {
        self.act_locked(self.lock(), step)
    }

    /// As [`Shared::act`], once `need` more tasks fit in the queue without more than `max`
    /// waiting there (or the pool is closed, which refuses the step's submissions);
    /// `block: false` returns `None` at once instead of waiting (callers that block ask for
    /// room for one task, which always comes).
    pub(crate) fn act_with_room<R>(
        &self,
        max: usize,
        need: usize,
        block: bool,
        step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R,
    ) -> Option<R> {
        let mut g = self.lock();
        while g.policy.queued() + need > max && !g.policy.is_closed() {
            if !block {
                return None;
            }
            g.waiting += 1;
            g = self.room.wait(g).unwrap_or_else(PoisonError::into_inner);
            g.waiting -= 1;
        }
        Some(self.act_locked(g, step))
    }

    /// Waits until no more than `low` tasks wait in the queue, or the pool takes no more
    /// tasks from the caller (from a feed, if `fed`; its next submissions are then
    /// refused). The queue drains by the workers alone (or fails, when the pool cannot
    /// start them), so the wait ends. Not with `max_queued` (whose waits are its own).
    pub(crate) fn wait_queue(&self, low: usize, fed: bool) {
        let mut g = self.lock();
        while g.policy.queued() > low && g.policy.takes(fed) {
            g.waiting += 1;
            g.room_at = Some(g.room_at.map_or(low, |r| r.max(low)));
            g = self.room.wait(g).unwrap_or_else(PoisonError::into_inner);
            g.waiting -= 1;
            if g.waiting == 0 {
                g.room_at = None;
            }
        }
    }

    fn act_locked<R>(
        &self,
        mut g: MutexGuard<'_, Inner>,
        step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R,
    ) -> R {
        let r = self.step_and_write(&mut g, step, Some(Instant::now()));
        self.end_act(g, r)
    }

    /// As [`Shared::act`], then `after` with the step's answer in the same locked step, once
    /// what the step queued was written (and its workers rung); delivers outcomes after
    /// unlocking. `just_now`: a reading of the clock taken just before the call, the
    /// step's time if the lock is free (it is read again if the call waits for the lock).
    pub(crate) fn act_then<R, S>(
        &self,
        just_now: Option<Instant>,
        step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R,
        after: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>, R) -> S,
    ) -> S {
        let (mut g, waited) = match self.inner.try_lock() {
            Ok(g) => (g, false),
            Err(std::sync::TryLockError::Poisoned(p)) => (p.into_inner(), false),
            Err(std::sync::TryLockError::WouldBlock) => (self.lock(), true),
        };
        let now = just_now.filter(|_| !waited).unwrap_or_else(Instant::now);
        let r = self.step_and_write(&mut g, step, Some(now));
        let s = self.step_and_write(&mut g, |p, fx| after(p, fx, r), None);
        self.end_act(g, s)
    }

    /// Runs `step` (after telling the policy the time, `now`, if given) and writes what it
    /// queued, one write per worker, from this thread.
    fn step_and_write<R>(
        &self,
        inner: &mut Inner,
        step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R,
        now: Option<Instant>,
    ) -> R {
        let terminating = inner.terminating;
        let mut fx = Fx {
            io: &mut inner.io,
            launches: &mut inner.launches,
            done: &mut inner.done,
            wake_driver: &mut inner.wake_driver,
            settings: &self.settings,
            terminating,
            timer_at: inner.timer_at,
            dirty: std::mem::take(&mut inner.dirty),
            timings: &mut inner.timings,
            reader_ended: &mut inner.reader_ended,
            epoll: &self.epoll,
            look_min: None,
            sent_at: None,
            spent_frames: &mut inner.spent_frames,
        };
        // Time reaches the policy here, before every step: starts it held back happen
        // once due. That reading of the clock is also when the step's tasks count as sent
        // (see `Fx::sent_at`: their frames go out as the step ends).
        if let Some(now) = now {
            fx.sent_at = Some(now);
            inner.policy.advance(now, &mut fx);
        }
        let held_until = inner.policy.wakeup();
        let r = step(&mut inner.policy, &mut fx);
        if inner
            .policy
            .wakeup()
            .is_some_and(|t| held_until.is_none_or(|h| t < h))
        {
            // A start held back until sooner than the driver knew: its timer changes
            // (the driver may sleep on, its workers answering their callers directly).
            *fx.wake_driver = true;
        }
        let timer_at = fx.timer_at;
        let mut look_min = fx.look_min;
        // Write what the step queued, one write per worker, from this thread; the driver
        // finishes what a socket refuses.
        let mut dirty = std::mem::take(&mut fx.dirty);
        let sent_at = fx.sent_at;
        inner.timer_at = timer_at;
        dirty.sort_unstable();
        dirty.dedup();
        // Only a step that queued something starts tasks (a caller taking its answer,
        // say, queues nothing): they start when they count as sent, the clock read once
        // for the step.
        if !dirty.is_empty() {
            let now = sent_at.unwrap_or_else(Instant::now);
            for &wid in &dirty {
                note_started(&mut inner.policy, &inner.io, wid, now);
                // A worker sent a task while it holds another may hold answers back from
                // now on: looked at unless it says something first.
                if inner.policy.holding(wid) >= 2
                    && let Some(w) = inner.io.get_mut(&wid)
                    && w.may_hold()
                {
                    w.nudge_caller();
                    if w.look_at.is_none() {
                        let t = now + super::reader::HELD_LOOK;
                        w.look_at = Some(t);
                        look_min = Some(look_min.map_or(t, |m: Instant| m.min(t)));
                    }
                }
            }
        }
        if let Some(t) = look_min
            && inner.looks_planned.is_none_or(|p| t < p)
        {
            inner.looks_planned = Some(t);
            if !super::event_loop::on_driver_thread() {
                inner.wake_driver = true;
            }
        }
        for &wid in &dirty {
            let Some(w) = inner.io.get_mut(&wid) else {
                continue;
            };
            // The one task a worker holds, just queued, goes through its page instead
            // if the worker does not read its channel (see `WorkerIo::hand_through_page`).
            if inner.policy.holding(wid) == 1
                && let Some((_, Some(rec))) = inner.policy.oldest(wid)
                && rec.extra.is_none()
                && let Some(frame) = rec.frame.as_ref()
            {
                w.hand_through_page(frame);
            }
            if let Some(conn) = w.conn.as_mut()
                && !matches!(conn.flush(), Ok(true))
            {
                inner.wake_driver = true;
                // The driver finishes the write: a caller may not keep the socket, nor
                // wait for the answer in the page (the worker cannot have ended the
                // task: its frame is not all written).
                w.borrowed = None;
                w.stop_awaiting();
            }
            w.ring();
            // A worker given its first task since it was idle is watched again (unless
            // a caller borrowed it to read the answer itself).
            let busy = inner.policy.oldest(wid).is_some();
            w.arm(&self.epoll, wid, busy);
            if w.borrowed.is_none() && w.armed.is_none() && busy {
                // The kernel refused: the driver's next pass tries again.
                inner.wake_driver = true;
            }
        }
        dirty.clear();
        inner.dirty = dirty;
        r
    }

    /// Ends a step: wakes the driver and waiting submitters as need be, unlocks, then
    /// delivers the outcomes the step made.
    fn end_act<R>(&self, mut g: MutexGuard<'_, Inner>, r: R) -> R {
        let (mut done, wake) = {
            let inner = &mut *g;
            // The driver sleeps until a worker or a launch needs it; a step that leaves the
            // pool finished (close() once every worker is gone, say) must wake it to end.
            if inner.policy.is_finished() {
                inner.wake_driver = true;
            }
            let wake = std::mem::take(&mut inner.wake_driver);
            let room = match inner.room_at {
                // Maps waiting in `wait_queue` (never beside `max_queued`'s waits).
                Some(r) => inner.policy.queued() <= r || !inner.policy.takes(true),
                None => {
                    inner.policy.is_closed()
                        || self
                            .settings
                            .max_queued
                            .is_some_and(|m| inner.policy.queued() < m)
                }
            };
            if inner.waiting > 0 && room {
                self.room.notify_all();
            }
            // The list of deliveries goes with its room; a step that delivers nothing leaves
            // that room for the next (one of the driver's reads, which fill it).
            let done = match inner.done.is_empty() {
                true => Vec::new(),
                false => std::mem::replace(&mut inner.done, take_done_room()),
            };
            (done, wake)
        };
        drop(g);
        if wake {
            self.wake();
        }
        if !done.is_empty() {
            deliver(&mut done);
            keep_done_room(done);
        }
        r
    }

    /// `PoolBuilder::max_queued`.
    pub(crate) fn max_queued(&self) -> Option<usize> {
        self.settings.max_queued
    }

    /// A task with a time limit is on its way: the driver starts watching clocks.
    pub(crate) fn note_timeouts(&self) {
        if !self.timeouts.swap(true, Ordering::Relaxed) {
            self.wake();
        }
    }

    /// Cancels tasks `ids` (one submission's); `stop_running`: also those that began, by
    /// stopping their workers (otherwise they are left to finish).
    pub(crate) fn cancel(&self, ids: &[u64], stop_running: bool) -> CancelOutcome {
        let found = self.act(|p, fx| {
            ids.iter()
                .map(|&id| p.cancel(id, stop_running, fx))
                .collect::<Vec<_>>()
        });
        if found.contains(&Cancelled::Running) {
            CancelOutcome::WhileRunning
        } else if found.contains(&Cancelled::Queued) {
            CancelOutcome::BeforeStart
        } else {
            CancelOutcome::AlreadyFinished
        }
    }

    /// True once `close` or `terminate` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().policy.is_closed()
    }

    /// Begins terminating: every pending task fails, workers get SIGTERM then SIGKILL.
    pub(crate) fn terminate(&self) {
        {
            let mut g = self.lock();
            if !g.terminating {
                g.terminating = true;
                g.term_deadline = Some(Instant::now() + TERM_GRACE);
            }
        }
        self.act(|p, fx| p.terminate(fx));
        self.feeds.notify_all();
        self.wake();
    }

    /// A waiting map's feed closed (see [`Shared::wait_waited_feeds`]).
    pub(crate) fn feed_closed(&self) {
        let _g = self.lock();
        self.feeds.notify_all();
    }

    /// Waits (until `deadline`) while maps whose callers wait for their results still hand
    /// their chunks to the pool (`Policy::open_waited_feed`): `join` lets them finish, as a
    /// map begun before `close` does in Python. Each sends its chunks as the workers take
    /// them, so the wait ends with the map's input. `false` if the deadline passed first.
    pub(crate) fn wait_waited_feeds(&self, deadline: Option<Instant>) -> bool {
        let mut g = self.lock();
        while g.policy.waited_feeds() > 0 {
            g = match deadline {
                None => self.feeds.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.feeds
                        .wait_timeout(g, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }

    /// Live workers, oldest first, for `Pool::workers`: (name, pid, ready, answers, the
    /// task it runs and since when on `CLOCK_MONOTONIC`).
    pub(crate) fn workers(&self) -> Vec<WorkerState> {
        let g = self.lock();
        let mut v: Vec<_> =
            g.io.iter()
                .filter(|(_, w)| w.pid != 0 && w.status.is_none())
                .map(|(&wid, w)| {
                    // What its page says it runs (the tasks before may have ended, their
                    // answers held back).
                    let running = w
                        .running()
                        .filter(|&id| g.policy.holds(wid, id))
                        .and_then(|id| w.started(id).map(|ns| (id, ns)));
                    (
                        wid,
                        WorkerState {
                            name: w.name.to_string(),
                            pid: w.pid,
                            ready: w.guard.is_ready(),
                            answers: w.results,
                            running,
                        },
                    )
                })
                .collect();
        v.sort_by_key(|(wid, _)| *wid);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// What `Pool::metrics` reports from behind the lock: the policy's counts, queued and
    /// running tasks, the depth, the target and live numbers of workers, the summaries.
    #[allow(clippy::type_complexity, reason = "one snapshot, taken apart at once")]
    pub(crate) fn snapshot(
        &self,
    ) -> (
        crate::policy::Counts,
        usize,
        usize,
        usize,
        usize,
        usize,
        (Summary, Summary),
    ) {
        let g = self.lock();
        let (queued, running) = g.policy.load();
        let workers =
            g.io.values()
                .filter(|w| w.pid != 0 && w.status.is_none())
                .count();
        (
            g.policy.counts(),
            queued,
            running,
            g.policy.depth(),
            g.policy.processes(),
            workers,
            (g.timings.queue_wait, g.timings.run_time),
        )
    }

    /// The largest message a worker accepts, in bytes.
    pub(crate) fn frame_limit(&self) -> usize {
        self.settings.ipc.frame_limit()
    }
}

/// One live worker as `Shared::workers` sees it.
pub(crate) struct WorkerState {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) ready: bool,
    /// Results (and skips of cancelled tasks) it sent.
    pub(crate) answers: u64,
    /// The task it runs, and when it began it (`CLOCK_MONOTONIC` ns; 0 if unknown).
    pub(crate) running: Option<(u64, u64)>,
}

/// Notes that worker `wid` could begin the oldest task it holds, if it is ready and that
/// task is not noted yet: its queue wait ends now ("task started").
pub(super) fn note_started(
    policy: &mut Policy<TaskRec>,
    io: &IdMap<WorkerIo>,
    wid: WorkerId,
    now: Instant,
) {
    let Some(w) = io.get(&wid).filter(|w| w.guard.is_ready()) else {
        return;
    };
    if let Some((id, rec)) = policy.oldest_mut(wid)
        && rec.started_at.is_none()
    {
        // The worker stamps when it begins a task: when it has begun this one, that is
        // when it started, not now.
        let began = match w.started(id) {
            Some(ns) if ns > 0 => now.checked_sub(Duration::from_nanos(
                pool_spawn::protocol::monotonic_ns().saturating_sub(ns),
            )),
            _ => None,
        };
        let now = began.unwrap_or(now).max(rec.queued_at);
        rec.started_at = Some(now);
        tracing::debug!(
            parent: rec.span(),
            queue_wait = ?now.saturating_duration_since(rec.queued_at),
            "task started"
        );
    }
}

thread_local! {
    /// The room of an emptied list of deliveries, kept for this thread's next step: a read
    /// of hundreds of answers would otherwise grow a fresh list every time.
    static DONE_ROOM: std::cell::Cell<Vec<Delivery>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty list of deliveries, with the room this thread kept (see [`DONE_ROOM`]).
fn take_done_room() -> Vec<Delivery> {
    DONE_ROOM.with(std::cell::Cell::take)
}

/// Keeps the room of `done` (emptied) for this thread's next step, unless it is large.
fn keep_done_room(mut done: Vec<Delivery>) {
    done.clear();
    if done.capacity() > 0 && done.capacity() <= 4096 {
        DONE_ROOM.with(|r| r.set(done));
    }
}

/// Hands each finished task (or piece of one) its outcome: the pieces for one sink in a
/// row (the answers of one read, mostly) in one call. Leaves `done` empty.
fn deliver(done: &mut Vec<Delivery>) {
    let mut done = done.drain(..);
    while let Some(d) = done.next() {
        let Delivery {
            sink,
            first,
            count,
            outcome,
        } = d;
        // The run takes its pieces from `done` as the sink asks for them (looked at in
        // place, moved once): those a panic left there go on, as the next run.
        let mut run = std::iter::once((first, count, outcome)).chain(std::iter::from_fn(|| {
            if !done
                .as_slice()
                .first()
                .is_some_and(|n| Arc::ptr_eq(&n.sink, &sink))
            {
                return None;
            }
            done.next().map(|n| (n.first, n.count, n.outcome))
        }));
        // Sinks catch the panics of user code they run; this is the last line of defence,
        // so that one result can never stop the delivery of the others (or the driver).
        let deliver = || sink.deliver_run(&mut run);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(deliver)).is_err() {
            tracing::error!("delivering a task's result panicked; the pool goes on");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::driver::{Outcome, Sink};
    use crate::error::{TaskError, TaskErrorKind};

    /// Pieces for one sink in a row go in one run; a sink that panics on one piece still
    /// gets every later piece of the run, and the next sink its own: one outcome per item,
    /// whatever a sink does.
    #[test]
    fn a_panicking_sink_loses_no_later_piece() {
        let got: Arc<Mutex<Vec<(u8, usize)>>> = Arc::default();
        let sink = |tag: u8, panics_on: Option<usize>| -> Sink {
            let got = Arc::clone(&got);
            Arc::new(move |first: usize, _count: usize, _outcome: Outcome| {
                if Some(first) == panics_on {
                    panic!("a sink that panics");
                }
                got.lock().unwrap().push((tag, first));
            })
        };
        let (a, b) = (sink(1, Some(1)), sink(2, None));
        let piece = |sink: &Sink, first| Delivery {
            sink: Arc::clone(sink),
            first,
            count: 1,
            outcome: Outcome::Failed(TaskError::new(TaskErrorKind::Cancelled, "test")),
        };
        deliver(&mut vec![
            piece(&a, 0),
            piece(&a, 1),
            piece(&a, 2),
            piece(&a, 3),
            piece(&b, 0),
            piece(&a, 4),
        ]);
        assert_eq!(
            *got.lock().unwrap(),
            [(1, 0), (1, 2), (1, 3), (2, 0), (1, 4)]
        );
    }
}
