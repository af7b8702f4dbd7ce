//! The policy's effects on real workers: [`Fx`] implements [`Effects`] while the lock is held.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool_ipc::FrameBuf;
use pool_spawn::Signal;
use pool_spawn::protocol::{self, ToWorker};
use serde_bytes::ByteBuf;

use super::shared::Settings;
use super::worker_io::WorkerIo;
use super::{Delivery, Outcome, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::event::Pins;
use crate::ids::IdMap;
use crate::observe::Timings;
use crate::policy::{Effects, Finish, TakenUp, TaskId, WorkerId};

/// The policy's effects on the real world, while the lock is held.
pub(crate) struct Fx<'a> {
    pub(super) io: &'a mut IdMap<WorkerIo>,
    pub(super) launches: &'a mut Vec<WorkerId>,
    pub(super) done: &'a mut Vec<Delivery>,
    pub(super) wake_driver: &'a mut bool,
    pub(super) settings: &'a Settings,
    pub(super) terminating: bool,
    /// When the driver next looks at the clocks of running tasks.
    pub(super) timer_at: Option<Instant>,
    /// Workers with frames queued by this step, written once when the step ends.
    pub(super) dirty: Vec<WorkerId>,
    /// Queue-wait and run-time summaries.
    pub(super) timings: &'a mut Timings,
    /// Workers whose channel a caller found closed or broken, for the driver to finish.
    pub(super) reader_ended: &'a mut Vec<(WorkerId, super::reader::ReadEnd)>,
    /// The driver's epoll set (a socket lent to a caller leaves it).
    pub(super) epoll: &'a std::os::fd::OwnedFd,
    /// The earliest look at held answers this step planned (see `reader::look_held`).
    pub(super) look_min: Option<Instant>,
    /// When the tasks this step sends count as sent: the clock read once for all of them
    /// (their frames go out together, in one write per worker when the step ends), at the
    /// step's start when the step told the policy the time.
    pub(super) sent_at: Option<Instant>,
    /// The frames of tasks done, kept for a submitter (see [`Fx::take_spent_frames`]).
    pub(super) spent_frames: &'a mut Vec<FrameBuf>,
}

impl Fx<'_> {
    /// Keeps the frame of a task done (answered: it will not be sent again) for the next
    /// submitter, if there is room: as many as, and no larger than, what
    /// `pool_ipc::keep_small_frames` keeps of them (a large frame is freed at once).
    pub(super) fn keep_spent(&mut self, frame: Option<FrameBuf>) {
        if let Some(f) = frame
            && f.capacity() <= pool_ipc::SMALL_FRAME_MAX
            && self.spent_frames.len() < pool_ipc::SMALL_FRAMES_KEPT
        {
            self.spent_frames.push(f);
        }
    }

    /// The frames of tasks done since the last take, into `into` (empty): a thread that
    /// makes tasks' frames makes its next ones in their buffers
    /// (`pool_ipc::keep_small_frames`). A map of tiny tasks makes its frames on its
    /// caller's thread and the driver drops them once answered: freed there, each cost
    /// both threads a trip through the allocator.
    pub(crate) fn take_spent_frames(&mut self, into: &mut Vec<FrameBuf>) {
        if into.is_empty() {
            std::mem::swap(self.spent_frames, into);
        }
    }
}

impl Effects<TaskRec> for Fx<'_> {
    fn launch(&mut self, wid: WorkerId) {
        let name = format!("{}-{wid}", self.settings.prefix);
        self.io.insert(wid, WorkerIo::new(name));
        self.launches.push(wid);
        // The driver itself makes the launches asked for on its own thread before it waits
        // again (see `Driver::run`), without a wake-up through its eventfd.
        if !super::event_loop::on_driver_thread() {
            *self.wake_driver = true;
        }
    }

    fn send(&mut self, wid: WorkerId, _id: TaskId, task: &mut TaskRec) {
        let Some(w) = self.io.get_mut(&wid) else {
            return;
        };
        // The record keeps its frame until the task is done: if this worker dies before it
        // starts the task, the policy hands it to another worker and it is sent again.
        let Some(frame) = task.frame.as_ref() else {
            return;
        };
        let now = *self.sent_at.get_or_insert_with(Instant::now);
        task.sent_at = Some(now);
        task.sent_to = Some(wid);
        task.started_at = None;
        let span = task.span();
        if !span.is_disabled() {
            span.record("worker", &*w.name);
            if w.pid != 0 {
                span.record("pid", w.pid);
            }
        }
        tracing::trace!(parent: span, worker = %w.name, "task sent");
        if let Some(limit) = task.timeout
            && self.timer_at.is_none_or(|t| t > now + limit)
        {
            // Its limit may run out before the driver looks: let it look sooner.
            self.timer_at = Some(now + limit);
            *self.wake_driver = true;
        }
        match w.conn.as_mut() {
            Some(conn) => {
                let extra = task.extra.as_deref();
                let fds = extra.map(|x| x.pins.fds()).unwrap_or_default();
                conn.queue_copy_with_fds(frame, fds);
                if let Some(tail) = extra.and_then(|x| x.tail.as_ref()) {
                    // A tail is at most 64 MiB (`chunk::take_tail`), far below the frame
                    // limit: it is always queued.
                    let queued = conn.queue_pieces(&[tail.bytes()]);
                    debug_assert!(queued.is_ok(), "a tail within the frame limit");
                }
                w.note_task_queued();
                if self.dirty.last() != Some(&wid) {
                    self.dirty.push(wid);
                }
            }
            None => {
                let extra = task.extra.as_deref();
                let pins = extra.map(|x| x.pins.clone()).unwrap_or_default();
                w.backlog.push((frame.clone(), pins, true));
                if let Some(tail) = extra.and_then(|x| x.tail.as_ref()) {
                    // Copied: a backlog is only waited for while the worker starts.
                    let mut f = FrameBuf::with_capacity(tail.bytes().len());
                    f.extend_from_slice(tail.bytes());
                    w.backlog.push((f, Pins::default(), false));
                }
            }
        }
    }

    fn finish(&mut self, id: TaskId, task: TaskRec, why: Finish) -> Option<(TaskId, TaskRec)> {
        task.leave_group(id);
        let err = match &why {
            Finish::Lost(wid) | Finish::TimedOut(wid) | Finish::Unanswered(wid) => {
                match self.io.get(wid) {
                    Some(w) => self.lost_error(id, &task, w, &why),
                    None => TaskError::new(TaskErrorKind::WorkerLost, "worker state missing"),
                }
            }
            Finish::Orphaned(wid, times) => match self.io.get(wid) {
                Some(w) => TaskError::never_started(&w.name, w.pid, w.status, *times),
                None => TaskError::new(TaskErrorKind::WorkerLost, "worker state missing"),
            },
            Finish::Terminated => TaskError::new(
                TaskErrorKind::PoolClosed,
                "the pool was terminated before this task finished",
            ),
            Finish::InitFailed(m) => {
                TaskError::with_report(TaskErrorKind::InitializerFailed, m.clone())
            }
            Finish::CannotStart(m) => TaskError::new(TaskErrorKind::StartFailed, m.clone()),
            Finish::Cancelled(began) => TaskError::cancelled(*began),
        }
        .with_function(task.name);
        let wid = match why {
            Finish::Lost(wid) | Finish::TimedOut(wid) => wid,
            _ => {
                self.done.push(Delivery::all(&task, Outcome::Failed(err)));
                return None;
            }
        };
        // The task was running when its worker died or was stopped: the items it finished
        // are delivered, the one it was running fails, the ones after it run again.
        let Some(w) = self.io.get_mut(&wid) else {
            self.done.push(Delivery::all(&task, Outcome::Failed(err)));
            return None;
        };
        let (finished, batches) = w.salvage(id);
        let k = usize::try_from(finished).unwrap_or(usize::MAX);
        if k > task.count || (k == 0 && task.count == 1) {
            self.done.push(Delivery::all(&task, Outcome::Failed(err)));
            return None;
        }
        if k > 0 {
            let (name, pid) = (w.name.clone(), w.pid);
            self.done.push(Delivery {
                sink: Arc::clone(&task.sink),
                first: task.first,
                count: k,
                outcome: Outcome::Done {
                    result: Ok(batches),
                    worker: super::WorkerName::of(&name),
                    pid,
                },
            });
        }
        // (With none finished, the first item was the one running: only it fails.)
        if k == task.count {
            // It had finished every item: nothing failed.
            return None;
        }
        self.done.push(Delivery {
            sink: Arc::clone(&task.sink),
            first: task.first + k,
            count: 1,
            outcome: Outcome::Failed(err),
        });
        self.rest_of(task, k + 1)
    }

    fn retire(&mut self, wid: WorkerId) {
        let Some(w) = self.io.get_mut(&wid) else {
            return;
        };
        let mut frame = FrameBuf::new();
        if frame.encode(&ToWorker::<ByteBuf>::Exit).is_err() {
            return;
        }
        match w.conn.as_mut() {
            Some(conn) => {
                conn.queue(frame);
                if !matches!(conn.flush(), Ok(true)) {
                    *self.wake_driver = true;
                }
                w.ring();
            }
            None => w.backlog.push((frame, Pins::default(), false)),
        }
    }

    fn stop(&mut self, wid: WorkerId) {
        let Some(w) = self.io.get_mut(&wid) else {
            return;
        };
        match &w.handle {
            Some(h) => {
                let _ = h.signal_group(Signal::TERM);
                w.kill_at = Some(Instant::now() + self.settings.stop_grace);
            }
            None => w.kill_when_launched = true,
        }
        *self.wake_driver = true;
    }

    fn cancel_sent(&mut self, wid: WorkerId, id: TaskId) -> TakenUp {
        self.io
            .get_mut(&wid)
            .map_or(TakenUp::Nothing, |w| w.mark_cancelled(id))
    }

    fn kill(&mut self, wid: WorkerId) {
        let Some(w) = self.io.get_mut(&wid) else {
            return;
        };
        let sig = if self.terminating {
            Signal::TERM
        } else {
            Signal::KILL
        };
        match &w.handle {
            Some(h) => {
                let _ = h.signal_group(sig);
            }
            None => w.kill_when_launched = true,
        }
        *self.wake_driver = true;
    }
}

impl Fx<'_> {
    /// Worker `wid`'s held answers are looked at `at` (never, if `None`).
    pub(super) fn plan_look(&mut self, wid: WorkerId, at: Option<Instant>) {
        if let Some(w) = self.io.get_mut(&wid) {
            w.look_at = at;
        }
        if let Some(t) = at {
            self.look_min = Some(self.look_min.map_or(t, |m| m.min(t)));
        }
    }

    /// The error of task `id`, whose worker `w` died while running it, or was stopped when
    /// it ran out of time.
    fn lost_error(&self, id: TaskId, task: &TaskRec, w: &WorkerIo, why: &Finish) -> TaskError {
        let ran_for = match w.started(id) {
            Some(ns) if ns > 0 => Some(Duration::from_nanos(
                protocol::monotonic_ns().saturating_sub(ns),
            )),
            _ => task.sent_at.map(|t| t.elapsed()),
        };
        if let (Finish::TimedOut(_), Some(limit)) = (why, task.timeout) {
            return TaskError::timed_out(&w.name, w.pid, limit, ran_for);
        }
        let mut e = TaskError::worker_lost(&w.name, w.pid, w.status, ran_for);
        if let Some(note) = &w.exit_note {
            e = e.with_note(note);
        }
        if let Some(cap) = self.settings.limits.memory_cap
            && w.status.and_then(|s| s.signal()) == Some(6)
        {
            e = e.at_memory_cap(cap);
        }
        e
    }

    /// The items of `task` from item `from` on, as a new task (queued first by the policy).
    fn rest_of(&mut self, task: TaskRec, from: usize) -> Option<(TaskId, TaskRec)> {
        if from >= task.count {
            return None;
        }
        let id = self.settings.next_id.fetch_add(1, Ordering::Relaxed);
        let spans = task.extra.as_ref().and_then(|x| x.spans.as_ref());
        let rest = match (&task.frame, spans) {
            (Some(frame), Some(spans)) => {
                protocol::encode_run_rest(frame, spans, from, id, task.func, task.timeout.is_some())
            }
            _ => None,
        };
        let Some((frame, spans)) = rest else {
            let e = TaskError::new(
                TaskErrorKind::WorkerLost,
                "not run: an earlier item of its chunk failed with its worker, and the rest of \
                 the chunk could not be sent again",
            )
            .with_function(task.name);
            self.done.push(Delivery {
                sink: Arc::clone(&task.sink),
                first: task.first + from,
                count: task.count - from,
                outcome: Outcome::Failed(e),
            });
            return None;
        };
        if let Some(g) = &task.group {
            g.add(id);
        }
        let count = task.count - from;
        let spans = (count > 1).then_some(spans);
        // Its events stay pinned and its span goes on, as the task's did.
        let extra = match task.extra {
            Some(x) if !x.span.is_disabled() => Some(Box::new(super::TaskExtra {
                tail: None,
                pins: x.pins,
                spans,
                span: x.span,
            })),
            Some(x) => super::TaskExtra::boxed(None, x.pins, spans),
            None => super::TaskExtra::boxed(None, Pins::default(), spans),
        };
        Some((
            id,
            TaskRec {
                frame: Some(frame),
                extra,
                sink: task.sink,
                first: task.first + from,
                count,
                func: task.func,
                name: task.name,
                timeout: task.timeout,
                group: task.group,
                sent_at: None,
                sent_to: None,
                queued_at: Instant::now(),
                started_at: None,
            },
        ))
    }
}
