//! The scheduling and worker-lifetime policy: a state machine with no syscalls.
//!
//! The policy decides which worker runs which task, when a worker is launched, retired or
//! replaced, and how each task ends when it does not come back with a result. It knows
//! workers only by [`WorkerId`] and tasks only by [`TaskId`] plus an opaque record `T`, and
//! acts on the world through the [`Effects`] trait. The driver implements `Effects` with real
//! processes; the tests below implement it with fakes and drive random event sequences.
//!
//! The central invariant: every task record handed to [`Policy::submit`] leaves the policy
//! exactly once, either returned by [`Policy::done`] or passed to [`Effects::finish`] (or
//! handed back by `submit` itself when refused).

#[cfg(debug_assertions)]
use std::collections::BTreeSet;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::{IdMap, IdTable};

mod ranking;
mod restarts;

use ranking::Ranking;
use restarts::{Cause, Restarts, Trip};

/// Identifies a task inside one pool.
pub(crate) type TaskId = u64;
/// Identifies a worker slot inside one pool; also the `N` in `ForkserverPoolWorker-N`.
pub(crate) type WorkerId = u64;

/// How the policy acts on the world.
pub(crate) trait Effects<T> {
    /// Start a new worker process for slot `wid`.
    fn launch(&mut self, wid: WorkerId);
    /// Hand `task` to worker `wid` (which may still be starting: the channel buffers it).
    fn send(&mut self, wid: WorkerId, id: TaskId, task: &mut T);
    /// The one outcome of a task that did not come back with a result. For a task of
    /// several items that failed part way ([`Finish::Lost`], [`Finish::TimedOut`]), the
    /// items after the one that failed may come back as a new task to run (with its id):
    /// the policy queues it first.
    fn finish(&mut self, id: TaskId, task: T, why: Finish) -> Option<(TaskId, T)>;
    /// Ask an idle worker to exit (the pool is closing).
    fn retire(&mut self, wid: WorkerId);
    /// Kill a worker now (the pool is terminating).
    fn kill(&mut self, wid: WorkerId);
    /// Stop a worker whose task must not go on (it ran out of time, or was cancelled):
    /// SIGTERM to its process group, SIGKILL after a grace.
    fn stop(&mut self, wid: WorkerId);
    /// Mark task `id`, handed to worker `wid`, as cancelled, so that the worker skips it
    /// if it has not begun it; returns what the worker had taken up when the mark was made.
    fn cancel_sent(&mut self, wid: WorkerId, id: TaskId) -> TakenUp;
}

/// What a worker had taken up when the pool marked one of its tasks cancelled (see
/// [`Effects::cancel_sent`]). A worker takes up its tasks in the order they were sent, and
/// may end several before their answers arrive (it holds brief tasks' answers back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TakenUp {
    /// Nothing the mark comes too late for: the worker skips the task.
    Nothing,
    /// The last task it took up is `id` (and no other since): running it, or `ended`.
    Task { id: TaskId, ended: bool },
    /// The mark could not be made: every slot it may go in holds the mark of another task
    /// the worker has not passed yet (it holds many cancelled tasks whose ids collide). The
    /// worker may run the task, so it is taken for running.
    NoRoom,
}

/// Why a task ended without a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Its worker died while holding it.
    Lost(WorkerId),
    /// This many workers in a row died holding it before starting it; the last was this one.
    Orphaned(WorkerId, u32),
    /// The pool was terminated before the task finished.
    Terminated,
    /// Workers cannot start: the initializer failed too often.
    InitFailed(String),
    /// Workers cannot start for another reason (killed while starting, launch failed).
    CannotStart(String),
    /// It ran past its time limit; its worker was stopped.
    TimedOut(WorkerId),
    /// It was cancelled; `true` if it had begun (its worker is stopped).
    Cancelled(bool),
    /// Its worker ran it to the end, but its answer never counted: the worker died or broke
    /// the protocol before the pool believed it. It fails whole (it ran: none of its items
    /// runs again).
    Unanswered(WorkerId),
}

/// What [`Policy::cancel`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// The task had not begun: it never runs.
    Queued,
    /// The task was running: its worker is stopped and replaced.
    Running,
    /// The task had already ended (or is unknown): nothing changed.
    Finished,
}

/// Why a submission was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `close` or `terminate` was called.
    Closed,
    /// Workers cannot start: the initializer keeps failing; the message says how.
    Broken(String),
    /// Workers cannot start for another reason; the message says which.
    CannotStart(String),
}

/// How a worker ended, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The process ended (any status); the driver has already delivered every result it sent.
    Ended,
    /// The process could not be started at all.
    LaunchFailed(String),
}

/// Why a worker left without dying: a recycle, counted by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recycle {
    /// It ran `max_tasks_per_child` tasks.
    MaxTasks,
    /// Its resident memory grew past `max_memory_per_child`.
    Memory,
    /// The pool closed and it was idle.
    Closing,
    /// The pool was resized below its number of workers.
    Shrink,
}

impl Recycle {
    /// The reason's name, for events.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Recycle::MaxTasks => "max_tasks",
            Recycle::Memory => "memory",
            Recycle::Closing => "closing",
            Recycle::Shrink => "shrink",
        }
    }
}

/// How a worker left, as [`Policy::exited_with`] classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Departure {
    /// It left as asked, for this reason.
    Recycled(Recycle),
    /// It died unexpectedly (it is replaced).
    Died,
    /// The pool stopped it because of its task (time limit, cancellation).
    Stopped,
    /// It never became ready.
    StartFailed,
    /// The pool was terminated.
    Terminated,
}

/// Why a worker was launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// One of the pool's first workers.
    Initial,
    /// It replaces a worker that left (or will).
    Replacement,
    /// The pool was resized above its number of workers.
    Grow,
}

/// Settings the policy needs.
#[derive(Clone, Debug)]
pub(crate) struct PolicyConfig {
    /// Target number of workers able to take tasks.
    pub(crate) processes: usize,
    /// Tasks a worker runs before it is replaced.
    pub(crate) max_tasks: Option<u64>,
    /// Tasks handed to one worker before earlier ones come back while the pace of tasks is
    /// unknown, and when tasks take 20 ms or more.
    pub(crate) in_flight: usize,
    /// The deepest the policy goes when tasks are so short that round trips would otherwise
    /// leave workers idle.
    pub(crate) max_in_flight: usize,
    /// Initializer failures in a row that trip the restart breaker; three times as many
    /// (or twice `processes`) start failures of any kind within `restarts::PERIOD` do too.
    pub(crate) start_failure_limit: u32,
    /// Each worker's `max_tasks` is raised by a random amount up to this, so that workers
    /// started together do not all retire together.
    pub(crate) max_tasks_jitter: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Launched, not yet ready: tasks may be queued to it; if it dies they never ran.
    Starting,
    /// Ready and taking tasks.
    Ready,
    /// Has been sent all the tasks it may run (max_tasks reached); will exit by itself.
    Retiring,
    /// Told to exit (closing), or its setup failed, or it is being killed.
    Leaving,
}

#[derive(Debug)]
struct Slot {
    phase: Phase,
    ever_ready: bool,
    in_flight: VecDeque<TaskId>,
    assigned: u64,
    /// Holds one of the pool's `processes` seats: only seated workers are handed tasks, so
    /// no more than `processes` workers ever hold tasks at once. A replacement starts as
    /// soon as the worker it replaces has been sent its last task, and takes that worker's
    /// seat when the last result is back.
    seated: bool,
    /// Its channel is closed (the process is dying or dead; its exit is not processed yet):
    /// it gets no more tasks and gives up its seat.
    closed: bool,
    /// Tasks it runs before it is replaced.
    max_tasks: Option<u64>,
    /// The pool is stopping it: the task it was running ran out of time (that task), or
    /// was cancelled (`None`: the task has had its outcome already).
    stopping: Option<Option<TaskId>>,
    /// Why it is leaving, once it was asked to (or will leave by itself).
    leaving_for: Option<Recycle>,
    /// Why it was launched.
    origin: Origin,
    /// Where [`Index`] has it: its key among the workers that may be handed a task, whether
    /// it counts as active, and what its seat depended on when last synced.
    indexed: Indexed,
}

/// A slot's entry in the [`Index`], as last synced.
#[derive(Debug, Default)]
struct Indexed {
    /// `(tasks in hand, not ready)` while it may be handed a task.
    key: Option<(usize, bool)>,
    /// Where the ranking last found this worker (see [`Ranking::set`]).
    place: usize,
    /// Counted in [`Index::active`].
    active: bool,
    /// Whether `reseat` would change its seat (give up the seat it holds, or take one if
    /// one is free), as last synced.
    reseat: bool,
}

/// What `dispatch`, `reseat` and `active` would otherwise find by scanning every worker,
/// kept up to date as slots change (every change to a slot's phase, `closed`, `seated` or
/// tasks in hand is followed by [`Index::sync`]), so that a task's cost does not grow with
/// the number of workers.
#[derive(Debug, Default)]
struct Index {
    /// The workers that may be handed a task (seated, open, starting or ready), ordered by
    /// the choice rule: fewest tasks in hand, ready before starting, lowest id.
    eligible: Ranking,
    /// Workers open and starting or ready (see `Policy::active`).
    active: usize,
    /// Something `reseat` reads changed since it last ran (it is a no-op otherwise).
    reseat: bool,
}

impl Index {
    /// Brings worker `wid`'s entry in line with its slot.
    fn sync(&mut self, wid: WorkerId, slot: &mut Slot) {
        let open = !slot.closed && matches!(slot.phase, Phase::Starting | Phase::Ready);
        let key = (slot.seated && open).then(|| (slot.in_flight.len(), slot.phase != Phase::Ready));
        if key != slot.indexed.key {
            self.eligible
                .set(wid, &mut slot.indexed.place, slot.indexed.key, key);
            slot.indexed.key = key;
        }
        if open != slot.indexed.active {
            if open {
                self.active += 1;
            } else {
                self.active -= 1;
            }
            slot.indexed.active = open;
        }
        // `reseat` runs when a worker comes to want a change of seat; not for every change
        // of phase (a seated worker that becomes ready, say), which would make it scan every
        // worker as each of a large pool's workers starts.
        let reseat = if slot.seated {
            slot.closed
                || matches!(slot.phase, Phase::Retiring | Phase::Leaving)
                    && slot.in_flight.is_empty()
        } else {
            open
        };
        if reseat != slot.indexed.reseat {
            slot.indexed.reseat = reseat;
            self.reseat |= reseat;
        }
    }

    /// Forgets worker `wid`, whose slot is gone.
    fn remove(&mut self, wid: WorkerId, slot: &Slot) {
        if slot.indexed.key.is_some() {
            let mut place = slot.indexed.place;
            self.eligible.set(wid, &mut place, slot.indexed.key, None);
        }
        if slot.indexed.active {
            self.active -= 1;
        }
        self.reseat = true;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Closed,
    Terminated,
}

/// Counters kept by the policy; the driver adds timings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) submitted: u64,
    pub(crate) completed: u64,
    pub(crate) lost: u64,
    pub(crate) terminated: u64,
    pub(crate) init_failed: u64,
    pub(crate) launched: u64,
    pub(crate) recycled: u64,
    /// Of `recycled`: workers that left because their memory grew past the limit.
    pub(crate) recycled_memory: u64,
    /// Of `recycled`: after `max_tasks`, on close, after a shrink.
    pub(crate) recycled_max_tasks: u64,
    pub(crate) recycled_closing: u64,
    pub(crate) recycled_shrink: u64,
    pub(crate) died: u64,
    pub(crate) start_failures: u64,
    pub(crate) timed_out: u64,
    pub(crate) cancelled: u64,
    /// Workers the pool stopped because of their task (time limit, cancellation).
    pub(crate) stopped: u64,
}

/// The policy state machine. See the module docs.
#[derive(Debug)]
pub(crate) struct Policy<T> {
    cfg: PolicyConfig,
    state: State,
    tasks: IdTable<T>,
    queue: VecDeque<TaskId>,
    workers: BTreeMap<WorkerId, Slot>,
    next_wid: WorkerId,
    /// When workers may start after failures (backoff, restart intensity, crash pacing).
    restarts: Restarts,
    counts: Counts,
    /// Current tasks-in-flight limit per worker, between the configured bounds.
    depth: usize,
    /// Moving average of how long a worker spends on one task, in nanoseconds.
    pace_ns: Option<u64>,
    /// Lazy submitters (imap iterators) opened while the pool ran: after `close` they may
    /// still submit, and the workers stay for them.
    feeds: usize,
    /// Of `feeds`: those of maps whose callers wait for their results (`join` waits for
    /// them to close before it revokes the others).
    waited_feeds: usize,
    /// `join` or `terminate` ended every feed's right to submit.
    feeds_revoked: bool,
    /// Tasks handed back by workers that died without starting them, and how often.
    orphaned: IdMap<u32>,
    /// State of the generator behind `max_tasks_jitter`.
    rng: u64,
    /// Why the workers launched now are launched (see [`Origin`]).
    launching: Origin,
    /// The workers by what dispatch looks for (see [`Index`]).
    index: Index,
}

/// Queued work worth keeping in front of each worker: the depth is chosen so that the
/// tasks in flight take about this long, which hides a round trip many times over, even
/// on a machine whose wakeups take tens of microseconds (a worker that runs out of work
/// waits a whole round trip for more). It is also about the most a map's last tasks can
/// keep one worker busy while another has nothing left.
const DEPTH_TARGET_NS: u64 = 500_000;
/// Workers that may die holding a task without starting it before the task fails.
const ORPHAN_LIMIT: u32 = 3;
/// Tasks at least this long run one at a time per worker (`PolicyConfig::in_flight`);
/// below it, a second task waits in the worker so that sending it (a large payload, say)
/// overlaps the first.
const LONG_TASK_NS: u64 = 20_000_000;

impl<T> Policy<T> {
    pub(crate) fn new(cfg: PolicyConfig) -> Self {
        assert!(cfg.processes > 0, "a pool needs at least one process");
        assert!(cfg.in_flight > 0, "in_flight must be at least one");
        assert!(
            cfg.max_in_flight >= cfg.in_flight,
            "max_in_flight below in_flight"
        );
        let restarts = Restarts::new(
            cfg.processes,
            cfg.start_failure_limit,
            (cfg.start_failure_limit * 3).max(2 * cfg.processes as u32),
        );
        Policy {
            depth: cfg.in_flight,
            pace_ns: None,
            feeds: 0,
            waited_feeds: 0,
            feeds_revoked: false,
            orphaned: IdMap::default(),
            rng: 0x9E37_79B9_7F4A_7C15,
            launching: Origin::Initial,
            index: Index::default(),
            cfg,
            state: State::Running,
            tasks: IdTable::default(),
            queue: VecDeque::new(),
            workers: BTreeMap::new(),
            next_wid: 1,
            restarts,
            counts: Counts::default(),
        }
    }

    /// Launches the initial workers.
    pub(crate) fn start(&mut self, fx: &mut impl Effects<T>) {
        self.ensure_capacity(fx);
        self.launching = Origin::Replacement;
    }

    /// Changes the number of workers to `processes` while tasks run. Growing launches
    /// workers at once (as far as the restart breaker allows: a crash loop cannot turn a
    /// resize into a fork bomb). Shrinking retires idle workers first, then, if it must,
    /// busy ones, which get no new task and leave once the tasks they hold are done: no
    /// running task is interrupted.
    ///
    /// # Panics
    /// If `processes` is 0.
    pub(crate) fn resize(&mut self, processes: usize, fx: &mut impl Effects<T>) {
        assert!(processes > 0, "a pool needs at least one process");
        self.cfg.processes = processes;
        self.index.reseat = true;
        if self.state == State::Terminated {
            return;
        }
        let mut excess = self.active().saturating_sub(processes);
        if excess > 0 {
            // Idle workers first (starting ones before ready ones), then the least loaded,
            // newest first among equals.
            let mut order: Vec<(usize, bool, std::cmp::Reverse<WorkerId>)> = self
                .workers
                .iter()
                .filter(|(_, s)| !s.closed && matches!(s.phase, Phase::Starting | Phase::Ready))
                .map(|(&w, s)| {
                    (
                        s.in_flight.len(),
                        s.phase == Phase::Ready,
                        std::cmp::Reverse(w),
                    )
                })
                .collect();
            order.sort_unstable();
            for (_, _, std::cmp::Reverse(wid)) in order {
                if excess == 0 {
                    break;
                }
                let slot = self.workers.get_mut(&wid).expect("listed worker exists");
                slot.phase = Phase::Leaving;
                slot.leaving_for = Some(Recycle::Shrink);
                self.index.sync(wid, slot);
                // Queued behind the tasks it holds: it finishes them, then exits.
                fx.retire(wid);
                excess -= 1;
            }
        }
        self.launching = Origin::Grow;
        self.ensure_capacity(fx);
        self.launching = Origin::Replacement;
        self.dispatch(fx);
    }

    /// The number of workers the pool keeps.
    pub(crate) fn processes(&self) -> usize {
        self.cfg.processes
    }

    /// Why worker `wid` was launched.
    pub(crate) fn origin(&self, wid: WorkerId) -> Option<Origin> {
        self.workers.get(&wid).map(|s| s.origin)
    }

    /// Accepts a task, or hands it back with the reason it was refused.
    pub(crate) fn submit(
        &mut self,
        id: TaskId,
        task: T,
        fx: &mut impl Effects<T>,
    ) -> Result<(), (T, Refusal)> {
        self.submit_from(id, task, false, fx)
    }

    /// As [`Policy::submit`], for a task from a feed opened with [`Policy::open_feed`]: it
    /// is accepted after `close` too, until the feeds are revoked.
    pub(crate) fn submit_from(
        &mut self,
        id: TaskId,
        task: T,
        fed: bool,
        fx: &mut impl Effects<T>,
    ) -> Result<(), (T, Refusal)> {
        if !self.takes(fed) {
            return Err((task, Refusal::Closed));
        }
        if let Some(trip) = self.restarts.tripped() {
            let why = trip.why.clone();
            let refusal = if trip.initializer {
                Refusal::Broken(why)
            } else {
                Refusal::CannotStart(why)
            };
            return Err((task, refusal));
        }
        self.counts.submitted += 1;
        let previous = self.tasks.insert(id, task);
        assert!(previous.is_none(), "task id {id} submitted twice");
        self.queue.push_back(id);
        self.dispatch(fx);
        Ok(())
    }

    /// Whether the pool's state lets a task in (one from a feed, if `fed`: after `close`
    /// too, until the feeds are revoked).
    pub(crate) fn takes(&self, fed: bool) -> bool {
        match self.state {
            State::Running => true,
            State::Closed => fed && self.feeds > 0 && !self.feeds_revoked,
            State::Terminated => false,
        }
    }

    /// A worker finished its setup and is ready.
    pub(crate) fn ready(&mut self, wid: WorkerId, fx: &mut impl Effects<T>) {
        if let Some(slot) = self.workers.get_mut(&wid) {
            slot.ever_ready = true;
            if slot.phase == Phase::Starting {
                slot.phase = Phase::Ready;
            }
            self.index.sync(wid, slot);
            self.restarts.started();
        }
        self.dispatch(fx);
    }

    /// A worker sent the result of task `id`: the record goes back to the caller, which
    /// delivers the result. `None` if the policy does not know the pair (a confused worker).
    pub(crate) fn done(
        &mut self,
        wid: WorkerId,
        id: TaskId,
        fx: &mut impl Effects<T>,
    ) -> Option<T> {
        let slot = self.workers.get_mut(&wid)?;
        let pos = slot.in_flight.iter().position(|&t| t == id)?;
        slot.in_flight.remove(pos);
        self.index.sync(wid, slot);
        // A result proves the worker started, whatever messages came before it.
        slot.ever_ready = true;
        // A cancelled task's record is gone already: the worker's answer (it skipped the
        // task) only frees its place.
        let task = self.tasks.remove(&id);
        if task.is_some() {
            self.orphaned.remove(&id);
            self.counts.completed += 1;
        }
        self.dispatch(fx);
        self.retire_idle(fx);
        task
    }

    /// Cancels task `id`: a queued task never runs; a running one's worker is stopped (and
    /// replaced) if `stop_running`, else the task is left to finish. A task cancelled ends
    /// now with [`Finish::Cancelled`].
    pub(crate) fn cancel(
        &mut self,
        id: TaskId,
        stop_running: bool,
        fx: &mut impl Effects<T>,
    ) -> Cancelled {
        if !self.tasks.contains_key(&id) {
            return Cancelled::Finished;
        }
        if let Some(pos) = self.queue.iter().position(|&t| t == id) {
            self.queue.remove(pos);
            self.end_cancelled(id, false, fx);
            return Cancelled::Queued;
        }
        let holder = self
            .workers
            .iter()
            .find(|(_, s)| s.in_flight.contains(&id))
            .map(|(&wid, _)| wid);
        let Some(wid) = holder else {
            // Handed back, not queued: cannot happen; end it all the same.
            self.end_cancelled(id, false, fx);
            return Cancelled::Queued;
        };
        // What the worker says it took up decides: the task it runs (or may be about to
        // skip) began; a task it took up after this one means this one ended (its answer is
        // on its way, and is delivered); otherwise the worker has not reached it and skips
        // it once marked, the task keeping its place until it says so.
        let in_flight = &self.workers[&wid].in_flight;
        let pos = in_flight.iter().position(|&t| t == id);
        let began = match fx.cancel_sent(wid, id) {
            TakenUp::Nothing => false,
            TakenUp::NoRoom => true,
            TakenUp::Task { id: last, ended } if last == id => {
                if ended {
                    return Cancelled::Finished;
                }
                true
            }
            TakenUp::Task { id: last, .. } => {
                let last_pos = in_flight.iter().position(|&t| t == last);
                if last_pos.is_some() && last_pos > pos {
                    return Cancelled::Finished;
                }
                false
            }
        };
        if began && !stop_running {
            // Left to finish (the mark is too late to matter).
            return Cancelled::Finished;
        }
        if began {
            let slot = self.workers.get_mut(&wid).expect("holder exists");
            slot.stopping = Some(None);
            slot.phase = Phase::Leaving;
            self.index.sync(wid, slot);
            fx.stop(wid);
        }
        self.end_cancelled(id, began, fx);
        self.ensure_capacity(fx);
        self.dispatch(fx);
        if began {
            Cancelled::Running
        } else {
            Cancelled::Queued
        }
    }

    fn end_cancelled(&mut self, id: TaskId, began: bool, fx: &mut impl Effects<T>) {
        if let Some(task) = self.tasks.remove(&id) {
            self.counts.cancelled += 1;
            self.orphaned.remove(&id);
            self.end(id, task, Finish::Cancelled(began), fx);
        }
    }

    /// Task `id`, running on worker `wid`, ran past its time limit: the worker is stopped
    /// and replaced; the task ends with [`Finish::TimedOut`] once the worker is gone (what
    /// it finished before is delivered then). `false` if `wid` does not hold `id` first.
    pub(crate) fn time_out(&mut self, wid: WorkerId, id: TaskId, fx: &mut impl Effects<T>) -> bool {
        let Some(slot) = self.workers.get_mut(&wid) else {
            return false;
        };
        if slot.in_flight.front() != Some(&id) || slot.stopping.is_some() {
            return false;
        }
        slot.stopping = Some(Some(id));
        slot.phase = Phase::Leaving;
        self.index.sync(wid, slot);
        fx.stop(wid);
        self.ensure_capacity(fx);
        self.dispatch(fx);
        true
    }

    /// A worker is leaving after the result it just sent, its memory being over the limit:
    /// it gets no more tasks and is replaced now.
    pub(crate) fn recycling(&mut self, wid: WorkerId, fx: &mut impl Effects<T>) {
        if let Some(slot) = self.workers.get_mut(&wid)
            && matches!(slot.phase, Phase::Starting | Phase::Ready)
        {
            slot.phase = Phase::Retiring;
            slot.leaving_for = Some(Recycle::Memory);
            self.index.sync(wid, slot);
            self.counts.recycled_memory += 1;
        }
        self.ensure_capacity(fx);
        self.dispatch(fx);
    }

    /// Ends a task that has no result; a part still to run (see [`Effects::finish`]) is
    /// queued first.
    fn end(&mut self, id: TaskId, task: T, why: Finish, fx: &mut impl Effects<T>) {
        if let Some((next, rest)) = fx.finish(id, task, why) {
            let previous = self.tasks.insert(next, rest);
            assert!(previous.is_none(), "task id {next} handed back twice");
            self.queue.push_front(next);
        }
    }

    /// How long a worker spent on one task (from when it could start it to its result):
    /// short tasks deepen the per-worker queue, so tiny tasks do not wait on round trips;
    /// long ones keep it shallow, so work stays spread and a death fails little.
    pub(crate) fn observe(&mut self, service: Duration, fx: &mut impl Effects<T>) {
        let ns = u64::try_from(service.as_nanos()).unwrap_or(u64::MAX).max(1);
        let pace = match self.pace_ns {
            Some(p) => (p.saturating_mul(7) / 8).saturating_add(ns / 8).max(1),
            None => ns,
        };
        self.pace_ns = Some(pace);
        let depth = if pace >= LONG_TASK_NS {
            // A round trip is noise beside such a task; holding one task at a time keeps
            // short ones from waiting behind it.
            self.cfg.in_flight
        } else {
            usize::try_from(DEPTH_TARGET_NS.div_ceil(pace))
                .unwrap_or(usize::MAX)
                .clamp(
                    self.cfg.in_flight.max(2).min(self.cfg.max_in_flight),
                    self.cfg.max_in_flight,
                )
        };
        if depth != self.depth {
            let deeper = depth > self.depth;
            self.depth = depth;
            if deeper {
                self.dispatch(fx);
            }
        }
    }

    /// The tasks worker `wid` runs before it is replaced (`max_tasks` with its jitter).
    pub(crate) fn max_tasks_of(&self, wid: WorkerId) -> Option<u64> {
        self.workers.get(&wid).and_then(|s| s.max_tasks)
    }

    /// The oldest task worker `wid` holds (the one it runs, once it has begun), with its
    /// record if the task has not had its outcome yet.
    pub(crate) fn oldest(&self, wid: WorkerId) -> Option<(TaskId, Option<&T>)> {
        let id = *self.workers.get(&wid)?.in_flight.front()?;
        Some((id, self.tasks.get(&id)))
    }

    /// Whether worker `wid` holds task `id`.
    pub(crate) fn holds(&self, wid: WorkerId, id: TaskId) -> bool {
        self.workers
            .get(&wid)
            .is_some_and(|s| s.in_flight.contains(&id))
    }

    /// The tasks worker `wid` holds, oldest first.
    pub(crate) fn held_by(&self, wid: WorkerId) -> impl Iterator<Item = TaskId> + '_ {
        self.workers
            .get(&wid)
            .into_iter()
            .flat_map(|s| s.in_flight.iter().copied())
    }

    /// How many tasks worker `wid` holds.
    pub(crate) fn holding(&self, wid: WorkerId) -> usize {
        self.workers.get(&wid).map_or(0, |s| s.in_flight.len())
    }

    /// The record of task `id`, if it has not had its outcome.
    pub(crate) fn task(&self, id: TaskId) -> Option<&T> {
        self.tasks.get(&id)
    }

    /// The oldest task worker `wid` holds and its record, if it has not had its outcome.
    pub(crate) fn oldest_mut(&mut self, wid: WorkerId) -> Option<(TaskId, &mut T)> {
        let id = *self.workers.get(&wid)?.in_flight.front()?;
        Some((id, self.tasks.get_mut(&id)?))
    }

    /// The current tasks-in-flight limit per worker.
    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// A worker's setup failed (initializer panicked, image mismatch). It will exit by itself;
    /// the tasks queued to it never ran and go back to the queue.
    pub(crate) fn setup_failed(&mut self, wid: WorkerId, message: &str, fx: &mut impl Effects<T>) {
        let Some(slot) = self.workers.get_mut(&wid) else {
            return;
        };
        slot.phase = Phase::Leaving;
        let back: Vec<TaskId> = slot.in_flight.drain(..).collect();
        self.index.sync(wid, slot);
        for id in back.into_iter().rev() {
            // A task cancelled meanwhile has had its outcome.
            if self.tasks.contains_key(&id) {
                self.queue.push_front(id);
            }
        }
        self.start_failed(Cause::Initializer(message.to_owned()), fx);
    }

    /// A worker's channel closed: it is dying or dead. It takes no more tasks; what it
    /// holds is settled when its exit is processed ([`Policy::exited`]).
    pub(crate) fn channel_closed(&mut self, wid: WorkerId, fx: &mut impl Effects<T>) {
        if let Some(slot) = self.workers.get_mut(&wid) {
            slot.closed = true;
            self.index.sync(wid, slot);
        }
        self.ensure_capacity(fx);
        self.dispatch(fx);
    }

    /// A worker is gone (its process was reaped, or could not be started).
    pub(crate) fn exited(&mut self, wid: WorkerId, how: Exit, fx: &mut impl Effects<T>) {
        let _ = self.exited_with(wid, how, 0, None, fx);
    }

    /// The tasks the queue holds now (waiting for a worker).
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Makes room for `n` more task records at once: a `map` about to submit that many
    /// chunks spares the table its growth (each step a copy of every record held, and fresh
    /// pages to fault in).
    pub(crate) fn reserve(&mut self, n: usize) {
        self.tasks.reserve(n);
    }

    /// As [`Policy::exited`], knowing more of how the worker went: the last `undelivered`
    /// tasks sent to it never fully left for it (the writes failed or were still queued), so
    /// they never started; and `begun`, when known, says how many tasks it began that no
    /// result came for (`Some(0)`: it died between tasks, and none it held started; more
    /// than one: the answers of all but the last were lost on the way).
    /// Returns how the worker left (`None` if the policy did not know it).
    pub(crate) fn exited_with(
        &mut self,
        wid: WorkerId,
        how: Exit,
        undelivered: usize,
        begun: Option<u64>,
        fx: &mut impl Effects<T>,
    ) -> Option<Departure> {
        let mut slot = self.workers.remove(&wid)?;
        self.index.remove(wid, &slot);
        let never_started = !slot.ever_ready;
        let departure;
        if never_started && slot.phase == Phase::Leaving {
            // Setup failure (already counted, tasks already requeued), a retired idle worker,
            // or a terminated one: nothing it held is left to account for.
            // A worker retired by a shrink before it was ready may hold tasks: none ran.
            for id in slot.in_flight.drain(..).rev() {
                if self.tasks.contains_key(&id) {
                    self.queue.push_front(id);
                }
            }
            departure = if self.state == State::Terminated {
                Departure::Terminated
            } else if let Some(r) = slot.leaving_for {
                if r == Recycle::Shrink {
                    self.counts.recycled += 1;
                    self.counts.recycled_shrink += 1;
                }
                Departure::Recycled(r)
            } else if slot.stopping.is_some() {
                Departure::Stopped
            } else {
                Departure::StartFailed
            };
        } else if never_started {
            departure = if self.state == State::Terminated {
                Departure::Terminated
            } else {
                Departure::StartFailed
            };
            // Nothing it held ever ran: give it to the next worker.
            for id in slot.in_flight.into_iter().rev() {
                if self.tasks.contains_key(&id) {
                    self.queue.push_front(id);
                }
            }
            if self.state != State::Terminated {
                match how {
                    Exit::LaunchFailed(m) => self.start_failed(Cause::Launch(m), fx),
                    Exit::Ended => self.start_failed(Cause::Died, fx),
                }
            }
        } else {
            if self.state == State::Terminated {
                departure = Departure::Terminated;
            } else if slot.stopping.is_some() {
                self.counts.stopped += 1;
                departure = Departure::Stopped;
            } else if matches!(slot.phase, Phase::Retiring | Phase::Leaving)
                && (slot.in_flight.is_empty() || begun == Some(0))
            {
                self.counts.recycled += 1;
                let why = slot.leaving_for.unwrap_or(Recycle::MaxTasks);
                match why {
                    Recycle::MaxTasks => self.counts.recycled_max_tasks += 1,
                    Recycle::Closing => self.counts.recycled_closing += 1,
                    Recycle::Shrink => self.counts.recycled_shrink += 1,
                    // Counted when the worker said so.
                    Recycle::Memory => {}
                }
                departure = Departure::Recycled(why);
            } else {
                self.counts.died += 1;
                self.restarts.crashed();
                departure = Departure::Died;
            }
            // A worker runs its tasks in the order they were sent, so the tasks it began are
            // the oldest it still holds: `begun` of them (the oldest alone when that is not
            // known), among those that left for it. The last of them was running: it fails.
            // Any before it ended, but their answers never counted (the worker broke the
            // protocol, and nothing it sent after was believed): they fail whole, since they
            // ran. The others never started; they go back to the front of the queue for the
            // other workers (at most once each, never run twice).
            let sent = slot.in_flight.len().saturating_sub(undelivered);
            let keep = begun.map_or(1, |b| usize::try_from(b).unwrap_or(usize::MAX));
            let unstarted: Vec<TaskId> = slot.in_flight.drain(keep.min(sent)..).collect();
            let mut began: Vec<TaskId> = slot.in_flight.into_iter().collect();
            let running = began.pop();
            // A worker that died running a task died of that task: the ones waiting behind
            // it are not suspected of killing it. Only a worker that died between tasks (as
            // one does when a payload kills it on delivery) counts against what it held.
            self.requeue_unstarted(unstarted, wid, begun == Some(0), fx);
            for id in began {
                if let Some(task) = self.tasks.remove(&id) {
                    self.orphaned.remove(&id);
                    self.counts.lost += 1;
                    self.end(id, task, Finish::Unanswered(wid), fx);
                }
            }
            // After the requeue: the rest of a chunk that failed part way goes first.
            if let Some(id) = running
                && let Some(task) = self.tasks.remove(&id)
            {
                self.orphaned.remove(&id);
                let why = if slot.stopping == Some(Some(id)) {
                    self.counts.timed_out += 1;
                    Finish::TimedOut(wid)
                } else {
                    self.counts.lost += 1;
                    Finish::Lost(wid)
                };
                self.end(id, task, why, fx);
            }
        }
        self.ensure_capacity(fx);
        self.dispatch(fx);
        self.fail_queue_if_broken(fx);
        self.retire_idle(fx);
        Some(departure)
    }

    /// Opens a feed (a lazy submitter, accepted while the pool runs): its tasks are still
    /// accepted after `close`. `false` if the pool no longer runs.
    pub(crate) fn open_feed(&mut self) -> bool {
        if self.state == State::Running {
            self.feeds += 1;
            true
        } else {
            false
        }
    }

    /// A feed has submitted everything it will.
    pub(crate) fn close_feed(&mut self, fx: &mut impl Effects<T>) {
        self.feeds = self.feeds.saturating_sub(1);
        self.retire_idle(fx);
    }

    /// As [`open_feed`](Policy::open_feed), for a map whose caller waits for its result:
    /// `join` waits for it to close (it sends its chunks by itself; an imap's consumer may
    /// be the joining thread).
    pub(crate) fn open_waited_feed(&mut self) -> bool {
        let opened = self.open_feed();
        if opened {
            self.waited_feeds += 1;
        }
        opened
    }

    /// A feed opened by [`open_waited_feed`](Policy::open_waited_feed) has submitted
    /// everything it will.
    pub(crate) fn close_waited_feed(&mut self, fx: &mut impl Effects<T>) {
        if self.waited_feeds > 0 {
            self.waited_feeds -= 1;
            self.close_feed(fx);
        }
    }

    /// The feeds of maps whose callers wait, still open.
    pub(crate) fn waited_feeds(&self) -> usize {
        self.waited_feeds
    }

    /// Ends every feed's right to submit (`join`): workers exit once the queue drains.
    pub(crate) fn revoke_feeds(&mut self, fx: &mut impl Effects<T>) {
        self.feeds = 0;
        self.waited_feeds = 0;
        self.feeds_revoked = true;
        self.retire_idle(fx);
    }

    /// No more submissions; workers exit once the queue drains.
    pub(crate) fn close(&mut self, fx: &mut impl Effects<T>) {
        if self.state == State::Running {
            self.state = State::Closed;
        }
        self.retire_idle(fx);
    }

    /// Stop now: every unfinished task ends as terminated, every worker is killed.
    pub(crate) fn terminate(&mut self, fx: &mut impl Effects<T>) {
        self.state = State::Terminated;
        self.feeds = 0;
        self.waited_feeds = 0;
        self.feeds_revoked = true;
        self.queue.clear();
        let mut ids: Vec<TaskId> = self.tasks.keys().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(task) = self.tasks.remove(&id) {
                self.counts.terminated += 1;
                self.orphaned.remove(&id);
                // Terminating: whatever part might come back fails with the rest.
                if let Some((_, rest)) = fx.finish(id, task, Finish::Terminated) {
                    let _ = fx.finish(id, rest, Finish::Terminated);
                }
            }
        }
        for (&wid, slot) in self.workers.iter_mut() {
            slot.in_flight.clear();
            if slot.phase != Phase::Leaving {
                slot.phase = Phase::Leaving;
            }
            self.index.sync(wid, slot);
            fx.kill(wid);
        }
    }

    /// True once the pool is closed or terminated, every task has its outcome and every
    /// worker is gone.
    pub(crate) fn is_finished(&self) -> bool {
        self.state != State::Running && self.tasks.is_empty() && self.workers.is_empty()
    }

    /// True once `close` or `terminate` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.state != State::Running
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// Tasks waiting for a worker, and tasks handed to workers.
    pub(crate) fn load(&self) -> (usize, usize) {
        let running = self.workers.values().map(|s| s.in_flight.len()).sum();
        (self.queue.len(), running)
    }

    /// A worker could not start: the restart breaker counts it, and may trip (see
    /// `restarts`).
    fn start_failed(&mut self, cause: Cause, fx: &mut impl Effects<T>) {
        self.counts.start_failures += 1;
        self.restarts.failed(&cause);
        self.fail_queue_if_broken(fx);
    }

    /// Puts tasks a dead worker held but never started back at the front of the queue, in
    /// order, except a task that has now been held by [`ORPHAN_LIMIT`] workers that died
    /// without starting it: something about sending it may be what kills them (a payload
    /// too large for a worker's memory, say), so it fails rather than go round forever.
    fn requeue_unstarted(
        &mut self,
        ids: Vec<TaskId>,
        wid: WorkerId,
        suspect: bool,
        fx: &mut impl Effects<T>,
    ) {
        for id in ids.into_iter().rev() {
            if !self.tasks.contains_key(&id) {
                continue;
            }
            if !suspect {
                self.queue.push_front(id);
                continue;
            }
            let times = self.orphaned.entry(id).or_insert(0);
            *times += 1;
            if *times >= ORPHAN_LIMIT {
                let times = *times;
                self.orphaned.remove(&id);
                if let Some(task) = self.tasks.remove(&id) {
                    self.counts.lost += 1;
                    self.end(id, task, Finish::Orphaned(wid, times), fx);
                }
            } else {
                self.queue.push_front(id);
            }
        }
    }

    /// A broken pool starts no worker: whatever waits in the queue (including tasks handed
    /// back by workers that failed after the pool broke) fails now.
    fn fail_queue_if_broken(&mut self, fx: &mut impl Effects<T>) {
        let Some(Trip { why, initializer }) = self.restarts.tripped() else {
            return;
        };
        let (why, initializer) = (why.clone(), *initializer);
        for id in std::mem::take(&mut self.queue) {
            if let Some(task) = self.tasks.remove(&id) {
                self.counts.init_failed += 1;
                self.orphaned.remove(&id);
                let why = why.clone();
                let finish = if initializer {
                    Finish::InitFailed(why)
                } else {
                    Finish::CannotStart(why)
                };
                // Nothing of it ran: no part comes back.
                let _ = fx.finish(id, task, finish);
            }
        }
    }

    /// The time is now `now`: starts held back (backoff after failed starts, the pause of a
    /// tripped restart breaker, crash pacing) happen once due. The driver calls it before
    /// every step; without it the policy holds nothing back.
    pub(crate) fn advance(&mut self, now: Instant, fx: &mut impl Effects<T>) {
        let due = self.restarts.wakeup().is_some_and(|t| t <= now);
        self.restarts.advance(now);
        if due {
            self.dispatch(fx);
        }
    }

    /// When [`Policy::advance`] should next be called, if a start is held back.
    pub(crate) fn wakeup(&self) -> Option<Instant> {
        self.restarts.wakeup()
    }

    /// Workers that can still be handed tasks.
    fn active(&self) -> usize {
        self.index.active
    }

    fn ensure_capacity(&mut self, fx: &mut impl Effects<T>) {
        let wanted = match self.state {
            State::Running => self.cfg.processes,
            State::Closed if self.feeds > 0 => self.cfg.processes,
            State::Closed if !self.queue.is_empty() => self.cfg.processes.min(self.queue.len()),
            _ => 0,
        };
        while self.active() < wanted {
            if !self.restarts.may_launch() {
                break;
            }
            let wid = self.next_wid;
            self.next_wid += 1;
            let max_tasks = self.cfg.max_tasks.map(|m| {
                if self.cfg.max_tasks_jitter == 0 {
                    return m;
                }
                let spread = crate::rng::xorshift(&mut self.rng);
                m.saturating_add(spread % (self.cfg.max_tasks_jitter + 1))
            });
            self.workers.insert(
                wid,
                Slot {
                    phase: Phase::Starting,
                    ever_ready: false,
                    in_flight: VecDeque::new(),
                    assigned: 0,
                    seated: false,
                    closed: false,
                    stopping: None,
                    leaving_for: None,
                    origin: self.launching,
                    max_tasks,
                    indexed: Indexed::default(),
                },
            );
            let slot = self.workers.get_mut(&wid).expect("just inserted");
            self.index.sync(wid, slot);
            self.counts.launched += 1;
            fx.launch(wid);
        }
    }

    /// Frees the seats of workers that will take no more tasks and hold none, and gives
    /// free seats to waiting workers, oldest first.
    /// Does nothing unless something it reads changed since it last ran (see [`Index`]).
    fn reseat(&mut self) {
        if !self.index.reseat {
            return;
        }
        self.index.reseat = false;
        let mut taken = 0;
        for (&wid, slot) in self.workers.iter_mut() {
            if slot.seated
                && (slot.closed
                    || matches!(slot.phase, Phase::Retiring | Phase::Leaving)
                        && slot.in_flight.is_empty())
            {
                slot.seated = false;
                self.index.sync(wid, slot);
            }
            taken += usize::from(slot.seated);
        }
        for (&wid, slot) in self.workers.iter_mut() {
            if taken >= self.cfg.processes {
                break;
            }
            if !slot.seated && !slot.closed && matches!(slot.phase, Phase::Starting | Phase::Ready)
            {
                slot.seated = true;
                self.index.sync(wid, slot);
                taken += 1;
            }
        }
    }

    /// Checks the [`Index`] against a scan of every worker (tests and debug builds).
    #[cfg(debug_assertions)]
    fn check_index(&self) {
        let eligible: BTreeSet<(usize, bool, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, s)| {
                s.seated && !s.closed && matches!(s.phase, Phase::Starting | Phase::Ready)
            })
            .map(|(&w, s)| (s.in_flight.len(), s.phase != Phase::Ready, w))
            .collect();
        let ranked: BTreeSet<(usize, bool, WorkerId)> =
            self.index.eligible.keys().into_iter().collect();
        assert_eq!(eligible, ranked, "index out of step");
        let active = self
            .workers
            .values()
            .filter(|s| !s.closed && matches!(s.phase, Phase::Starting | Phase::Ready))
            .count();
        assert_eq!(active, self.index.active, "active count out of step");
        if !self.index.reseat {
            // reseat would change nothing.
            let mut taken = 0;
            for s in self.workers.values() {
                assert!(
                    !(s.seated
                        && (s.closed
                            || matches!(s.phase, Phase::Retiring | Phase::Leaving)
                                && s.in_flight.is_empty())),
                    "a seat to free was missed"
                );
                taken += usize::from(s.seated);
            }
            assert!(
                taken >= self.cfg.processes
                    || !self.workers.values().any(|s| !s.seated
                        && !s.closed
                        && matches!(s.phase, Phase::Starting | Phase::Ready)),
                "a seat to give was missed"
            );
        }
    }

    fn dispatch(&mut self, fx: &mut impl Effects<T>) {
        self.reseat();
        while !self.queue.is_empty() {
            #[cfg(debug_assertions)]
            self.check_index();
            // The worker with the fewest tasks in hand; ready workers before starting ones;
            // the lowest id among equals. The first in the index, if it has room: no other
            // has more.
            let pick = self
                .index
                .eligible
                .first()
                .filter(|&(n, _, _)| n < self.depth)
                .map(|(_, _, wid)| wid);
            let Some(wid) = pick else { break };
            let id = self.queue.pop_front().expect("queue is not empty");
            let task = self.tasks.get_mut(&id).expect("queued task has a record");
            let slot = self.workers.get_mut(&wid).expect("picked worker exists");
            slot.in_flight.push_back(id);
            slot.assigned += 1;
            self.index.sync(wid, slot);
            fx.send(wid, id, task);
            if slot.max_tasks.is_some_and(|m| slot.assigned >= m) {
                slot.phase = Phase::Retiring;
                slot.leaving_for = Some(Recycle::MaxTasks);
                self.index.sync(wid, slot);
                self.ensure_capacity(fx);
                self.reseat();
            }
        }
        self.ensure_capacity(fx);
    }

    fn retire_idle(&mut self, fx: &mut impl Effects<T>) {
        if self.state != State::Closed || !self.queue.is_empty() || self.feeds > 0 {
            return;
        }
        for (&wid, slot) in self.workers.iter_mut() {
            if slot.in_flight.is_empty()
                && !slot.closed
                && matches!(slot.phase, Phase::Starting | Phase::Ready)
            {
                slot.phase = Phase::Leaving;
                slot.leaving_for = Some(Recycle::Closing);
                self.index.sync(wid, slot);
                fx.retire(wid);
            }
        }
    }
}

/// Drives the policy with instant fake workers, for the criterion benchmark of its hot path
/// (not part of the API).
#[doc(hidden)]
pub mod bench_support {
    use std::collections::{HashMap, VecDeque};

    use super::{Effects, Exit, Finish, Policy, PolicyConfig, TakenUp, TaskId, WorkerId};

    #[derive(Default)]
    struct Instant {
        launched: Vec<WorkerId>,
        sent: VecDeque<(WorkerId, TaskId)>,
    }

    impl Effects<()> for Instant {
        fn launch(&mut self, wid: WorkerId) {
            self.launched.push(wid);
        }
        fn send(&mut self, wid: WorkerId, id: TaskId, _: &mut ()) {
            self.sent.push_back((wid, id));
        }
        fn finish(&mut self, _: TaskId, _: (), _: Finish) -> Option<(TaskId, ())> {
            None
        }
        fn retire(&mut self, _: WorkerId) {}
        fn kill(&mut self, _: WorkerId) {}
        fn stop(&mut self, _: WorkerId) {}
        fn cancel_sent(&mut self, _: WorkerId, _: TaskId) -> TakenUp {
            TakenUp::Nothing
        }
    }

    /// Submits `tasks` tasks to a policy of `workers` workers (replaced every `max_tasks`
    /// tasks if set) whose workers start and answer at once; returns how many tasks
    /// completed.
    pub fn run(tasks: u64, workers: usize, max_tasks: Option<u64>) -> u64 {
        let mut p = Policy::<()>::new(PolicyConfig {
            processes: workers,
            max_tasks,
            in_flight: 2,
            max_in_flight: 2,
            start_failure_limit: 3,
            max_tasks_jitter: 0,
        });
        let mut fx = Instant::default();
        let mut done_by: HashMap<WorkerId, u64> = HashMap::new();
        p.start(&mut fx);
        let mut completed = 0;
        for id in 0..tasks {
            if p.submit(id, (), &mut fx).is_err() {
                break;
            }
            loop {
                for wid in std::mem::take(&mut fx.launched) {
                    p.ready(wid, &mut fx);
                }
                let Some((wid, id)) = fx.sent.pop_front() else {
                    break;
                };
                if p.done(wid, id, &mut fx).is_some() {
                    completed += 1;
                }
                let n = done_by.entry(wid).or_default();
                *n += 1;
                if max_tasks == Some(*n) {
                    p.exited(wid, Exit::Ended, &mut fx);
                }
            }
        }
        completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    /// A fake world: records what the policy asked for.
    #[derive(Default, Debug)]
    struct Fake {
        launched: Vec<WorkerId>,
        sent: Vec<(WorkerId, TaskId)>,
        finished: Vec<(TaskId, Finish)>,
        retired: Vec<WorkerId>,
        killed: Vec<WorkerId>,
        stopped: Vec<WorkerId>,
        /// Cancel marks written: (worker, task).
        marked: Vec<(WorkerId, TaskId)>,
        /// Tasks the fake workers have begun.
        begun: Vec<TaskId>,
        /// What `cancel_sent` says the worker took up, if set (else from `begun`).
        taken: Option<TakenUp>,
        /// What the next `finish` hands back as the rest of its task.
        continuations: VecDeque<(TaskId, u64)>,
    }

    impl Effects<u64> for Fake {
        fn launch(&mut self, wid: WorkerId) {
            self.launched.push(wid);
        }
        fn send(&mut self, wid: WorkerId, id: TaskId, task: &mut u64) {
            assert_eq!(*task, id, "record travels with its id");
            self.sent.push((wid, id));
        }
        fn finish(&mut self, id: TaskId, task: u64, why: Finish) -> Option<(TaskId, u64)> {
            assert_eq!(task, id);
            let split = matches!(why, Finish::Lost(_) | Finish::TimedOut(_));
            self.finished.push((id, why));
            if split {
                self.continuations.pop_front()
            } else {
                None
            }
        }
        fn retire(&mut self, wid: WorkerId) {
            self.retired.push(wid);
        }
        fn kill(&mut self, wid: WorkerId) {
            self.killed.push(wid);
        }
        fn stop(&mut self, wid: WorkerId) {
            self.stopped.push(wid);
        }
        fn cancel_sent(&mut self, wid: WorkerId, id: TaskId) -> TakenUp {
            self.marked.push((wid, id));
            self.taken.unwrap_or(if self.begun.contains(&id) {
                TakenUp::Task { id, ended: false }
            } else {
                TakenUp::Nothing
            })
        }
    }

    /// A policy with `config`, started (its first workers launched), and its fake world.
    fn started(config: PolicyConfig) -> (Policy<u64>, Fake) {
        let mut p = Policy::<u64>::new(config);
        let mut fx = Fake::default();
        p.start(&mut fx);
        (p, fx)
    }

    fn cfg(processes: usize, max_tasks: Option<u64>) -> PolicyConfig {
        PolicyConfig {
            processes,
            max_tasks,
            in_flight: 2,
            max_in_flight: 2,
            start_failure_limit: 3,
            max_tasks_jitter: 0,
        }
    }

    #[test]
    fn starts_the_configured_number_of_workers() {
        let (_, fx) = started(cfg(3, None));
        assert_eq!(fx.launched, vec![1, 2, 3]);
    }

    #[test]
    fn spreads_tasks_before_doubling_up() {
        let (mut p, mut fx) = started(cfg(2, None));
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        for id in 0..5 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(fx.sent, vec![(1, 0), (2, 1), (1, 2), (2, 3)]);
        assert_eq!(p.load(), (1, 4));
        assert_eq!(p.done(1, 0, &mut fx), Some(0));
        assert_eq!(fx.sent.last(), Some(&(1, 4)));
    }

    #[test]
    fn max_tasks_retires_and_replaces_at_once() {
        let (mut p, mut fx) = started(cfg(2, Some(3)));
        for id in 0..10 {
            p.submit(id, id, &mut fx).unwrap();
        }
        let per_worker = |fx: &Fake, w| fx.sent.iter().filter(|(x, _)| *x == w).count();
        assert_eq!(per_worker(&fx, 1), 2);
        p.done(1, 0, &mut fx);
        assert_eq!(per_worker(&fx, 1), 3);
        // Worker 1 got its third task: a replacement starts before it exits.
        assert_eq!(fx.launched, vec![1, 2, 3]);
        p.done(1, 2, &mut fx);
        p.done(1, 4, &mut fx);
        p.exited(1, Exit::Ended, &mut fx);
        assert_eq!(p.counts().recycled, 1);
        assert_eq!(p.counts().died, 0);
        assert!(fx.finished.is_empty());
    }

    #[test]
    fn a_replacement_waits_for_the_seat_of_the_worker_it_replaces() {
        let (mut p, mut fx) = started(cfg(2, Some(1)));
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        for id in 0..6 {
            p.submit(id, id, &mut fx).unwrap();
        }
        // Workers 1 and 2 hold their one task each; replacements 3 and 4 are starting but
        // get nothing while 1 and 2 still run.
        assert_eq!(fx.launched, vec![1, 2, 3, 4]);
        assert_eq!(fx.sent, vec![(1, 0), (2, 1)]);
        p.ready(3, &mut fx);
        assert_eq!(fx.sent.len(), 2, "a ready standby still waits for a seat");
        p.done(1, 0, &mut fx);
        assert_eq!(fx.sent[2..], [(3, 2)], "worker 3 takes worker 1's seat");
        assert_eq!(fx.launched, vec![1, 2, 3, 4, 5]);
        p.exited(2, Exit::Ended, &mut fx);
        // Worker 2 died holding task 1: it fails, and worker 4 takes the seat at once.
        assert_eq!(fx.finished, vec![(1, Finish::Lost(2))]);
        assert_eq!(fx.sent[3..], [(4, 3)]);
    }

    #[test]
    fn jitter_spreads_the_retirements_of_workers_started_together() {
        let config = PolicyConfig {
            max_tasks_jitter: 50,
            ..cfg(8, Some(100))
        };
        let (p, _) = started(config);
        let limits: BTreeSet<u64> = (1..=8).filter_map(|w| p.max_tasks_of(w)).collect();
        assert!(limits.iter().all(|m| (100..=150).contains(m)), "{limits:?}");
        assert!(
            limits.len() > 1,
            "every worker got the same limit: {limits:?}"
        );
        let (plain, _) = started(cfg(8, Some(100)));
        assert!((1..=8).all(|w| plain.max_tasks_of(w) == Some(100)));
    }

    #[test]
    fn growing_launches_at_once_and_the_new_workers_take_queued_tasks() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        for id in 0..6 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(p.load(), (4, 2));
        p.resize(3, &mut fx);
        assert_eq!(fx.launched, vec![1, 2, 3]);
        assert_eq!(p.origin(2), Some(Origin::Grow));
        p.ready(2, &mut fx);
        p.ready(3, &mut fx);
        assert_eq!(p.load(), (0, 6));
    }

    #[test]
    fn shrinking_retires_idle_workers_first_and_never_a_running_task() {
        let (mut p, mut fx) = started(cfg(3, None));
        for w in 1..=3 {
            p.ready(w, &mut fx);
        }
        // Worker 1 holds a task, 2 and 3 are idle.
        p.submit(0, 0, &mut fx).unwrap();
        assert_eq!(fx.sent, vec![(1, 0)]);
        p.resize(1, &mut fx);
        assert_eq!(fx.retired, vec![3, 2], "the idle ones, newest first");
        assert!(fx.killed.is_empty() && fx.stopped.is_empty());
        // Shrinking to one while worker 1 is the only one left retires nobody more.
        p.submit(1, 1, &mut fx).unwrap();
        assert_eq!(fx.sent, vec![(1, 0), (1, 1)]);
        p.exited(2, Exit::Ended, &mut fx);
        p.exited(3, Exit::Ended, &mut fx);
        assert_eq!(p.counts().recycled_shrink, 2);
        assert_eq!(p.counts().died, 0);
        assert_eq!(
            fx.launched,
            vec![1, 2, 3],
            "no replacement for a retired worker"
        );
        // A busy worker retired by a shrink finishes what it holds first.
        p.resize(2, &mut fx);
        assert_eq!(fx.launched, vec![1, 2, 3, 4]);
        p.ready(4, &mut fx);
        p.submit(2, 2, &mut fx).unwrap();
        assert_eq!(fx.sent.last(), Some(&(4, 2)));
        p.resize(1, &mut fx);
        assert_eq!(fx.retired.len(), 3);
        let retired = *fx.retired.last().unwrap();
        for id in [0, 1, 2] {
            let holder = if id == 2 { 4 } else { 1 };
            assert_eq!(p.done(holder, id, &mut fx), Some(id));
        }
        p.exited(retired, Exit::Ended, &mut fx);
        assert!(fx.finished.is_empty(), "no task failed: {:?}", fx.finished);
        assert_eq!(p.counts().recycled_shrink, 3);
    }

    #[test]
    fn a_cancelled_queued_task_never_runs() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        for id in 0..3 {
            p.submit(id, id, &mut fx).unwrap();
        }
        // Two went to the worker; 2 waits in the pool's queue.
        assert_eq!(fx.sent, vec![(1, 0), (1, 1)]);
        assert_eq!(p.cancel(2, true, &mut fx), Cancelled::Queued);
        assert_eq!(fx.finished, vec![(2, Finish::Cancelled(false))]);
        assert!(
            fx.marked.is_empty(),
            "a task in the pool's queue needs no mark"
        );
        p.done(1, 0, &mut fx).unwrap();
        p.done(1, 1, &mut fx).unwrap();
        assert_eq!(fx.sent.len(), 2, "the cancelled task was never sent");
        assert_eq!(p.cancel(2, true, &mut fx), Cancelled::Finished);
        assert_eq!(p.counts().cancelled, 1);
    }

    #[test]
    fn a_cancelled_task_sent_but_not_begun_is_skipped_and_keeps_its_place_until_then() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.submit(1, 1, &mut fx).unwrap();
        p.submit(2, 2, &mut fx).unwrap();
        fx.begun = vec![0];
        assert_eq!(p.cancel(1, true, &mut fx), Cancelled::Queued);
        assert_eq!(fx.marked, vec![(1, 1)]);
        assert_eq!(fx.finished, vec![(1, Finish::Cancelled(false))]);
        assert!(fx.stopped.is_empty(), "the worker goes on");
        // Its place is taken until the worker skips it: 2 still waits.
        assert_eq!(fx.sent, vec![(1, 0), (1, 1)]);
        p.done(1, 0, &mut fx).unwrap();
        assert!(
            p.done(1, 1, &mut fx).is_none(),
            "the skip hands nothing back"
        );
        assert_eq!(fx.sent.last(), Some(&(1, 2)));
        assert_eq!(p.counts().completed, 1);
    }

    #[test]
    fn cancelling_a_running_task_stops_its_worker_and_reruns_what_it_held_unstarted() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.submit(1, 1, &mut fx).unwrap();
        fx.begun = vec![0];
        assert_eq!(p.cancel(0, true, &mut fx), Cancelled::Running);
        // The outcome is at once; the worker is stopped and a replacement starts.
        assert_eq!(fx.finished, vec![(0, Finish::Cancelled(true))]);
        assert_eq!(fx.stopped, vec![1]);
        assert_eq!(fx.launched, vec![1, 2]);
        p.exited_with(1, Exit::Ended, 0, Some(1), &mut fx);
        assert_eq!(fx.finished.len(), 1, "task 1 never began: it is not failed");
        p.ready(2, &mut fx);
        assert_eq!(fx.sent.last(), Some(&(2, 1)));
        let c = p.counts();
        assert_eq!((c.stopped, c.died, c.lost, c.cancelled), (1, 0, 0, 1));
    }

    #[test]
    fn a_cancel_follows_what_the_worker_says_it_took_up_not_the_oldest_task() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        for id in 0..4 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(fx.sent, vec![(1, 0), (1, 1)]);
        // The worker ended 0 (its answer held back) and runs 1.
        fx.taken = Some(TakenUp::Task {
            id: 1,
            ended: false,
        });
        assert_eq!(
            p.cancel(0, true, &mut fx),
            Cancelled::Finished,
            "ended: its answer comes"
        );
        assert!(fx.finished.is_empty() && fx.stopped.is_empty());
        assert_eq!(p.cancel(1, true, &mut fx), Cancelled::Running);
        assert_eq!(fx.finished, vec![(1, Finish::Cancelled(true))]);
        assert_eq!(fx.stopped, vec![1]);
        // The held answer is delivered at the worker's end; 0 is not run again.
        assert_eq!(p.done(1, 0, &mut fx), Some(0));
        p.exited_with(1, Exit::Ended, 0, Some(1), &mut fx);
        assert_eq!(fx.finished.len(), 1);
        p.ready(2, &mut fx);
        assert_eq!(fx.sent[2..], [(2, 2), (2, 3)]);
        // A task the worker has not reached (it runs an older one) is skipped.
        fx.taken = Some(TakenUp::Task {
            id: 2,
            ended: false,
        });
        assert_eq!(p.cancel(3, true, &mut fx), Cancelled::Queued);
        assert_eq!(fx.stopped, vec![1], "the worker goes on");
    }

    #[test]
    fn a_task_past_its_time_limit_fails_once_its_worker_is_gone() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.submit(1, 1, &mut fx).unwrap();
        assert!(
            !p.time_out(1, 1, &mut fx),
            "only the oldest task can be running"
        );
        assert!(p.time_out(1, 0, &mut fx));
        assert!(!p.time_out(1, 0, &mut fx), "once");
        assert_eq!(fx.stopped, vec![1]);
        assert!(
            fx.finished.is_empty(),
            "the outcome waits for the worker's end"
        );
        p.exited_with(1, Exit::Ended, 0, Some(1), &mut fx);
        assert_eq!(fx.finished, vec![(0, Finish::TimedOut(1))]);
        p.ready(2, &mut fx);
        assert_eq!(fx.sent.last(), Some(&(2, 1)));
        let c = p.counts();
        assert_eq!((c.timed_out, c.lost, c.died, c.stopped), (1, 0, 0, 1));
    }

    #[test]
    fn a_dead_worker_that_began_two_unanswered_tasks_fails_both_and_reruns_neither() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        for id in 0..3 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(fx.sent, vec![(1, 0), (1, 1)]);
        // Its page says it began both; no answer counted for either (say the pool stopped
        // believing it before they were read). Task 0 ended, task 1 was running.
        fx.continuations.push_back((100, 100));
        p.exited_with(1, Exit::Ended, 0, Some(2), &mut fx);
        assert_eq!(
            fx.finished,
            vec![(0, Finish::Unanswered(1)), (1, Finish::Lost(1))]
        );
        p.ready(2, &mut fx);
        // The rest of task 1's chunk, then task 2: neither 0 nor 1 runs again.
        assert_eq!(fx.sent[2..], [(2, 100), (2, 2)]);
        assert_eq!(p.counts().lost, 2);
    }

    #[test]
    fn the_rest_of_a_chunk_whose_item_failed_runs_next() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.submit(1, 1, &mut fx).unwrap();
        p.submit(2, 2, &mut fx).unwrap();
        fx.continuations.push_back((100, 100));
        p.exited_with(1, Exit::Ended, 0, Some(1), &mut fx);
        assert_eq!(fx.finished, vec![(0, Finish::Lost(1))]);
        p.ready(2, &mut fx);
        // The rest of task 0 first, then 1, which the dead worker held unstarted.
        assert_eq!(fx.sent[2..], [(2, 100), (2, 1)]);
        p.done(2, 100, &mut fx).unwrap();
        p.done(2, 1, &mut fx).unwrap();
        p.done(2, 2, &mut fx).unwrap();
        p.close(&mut fx);
        assert_eq!(fx.retired, vec![2]);
    }

    #[test]
    fn a_worker_over_its_memory_limit_is_replaced_and_counted_as_recycled() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.submit(1, 1, &mut fx).unwrap();
        p.done(1, 0, &mut fx).unwrap();
        p.recycling(1, &mut fx);
        assert_eq!(fx.launched, vec![1, 2]);
        p.exited_with(1, Exit::Ended, 0, Some(0), &mut fx);
        assert!(fx.finished.is_empty());
        p.ready(2, &mut fx);
        assert_eq!(fx.sent.last(), Some(&(2, 1)));
        let c = p.counts();
        assert_eq!((c.recycled, c.recycled_memory, c.died), (1, 1, 0));
    }

    #[test]
    fn a_dead_worker_fails_only_its_running_task_and_is_replaced() {
        let (mut p, mut fx) = started(cfg(2, None));
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        for id in 0..6 {
            p.submit(id, id, &mut fx).unwrap();
        }
        p.exited(1, Exit::Ended, &mut fx);
        assert_eq!(fx.finished, vec![(0, Finish::Lost(1))]);
        assert_eq!(fx.launched, vec![1, 2, 3]);
        assert_eq!(p.counts().died, 1);
        // Task 2 never started on worker 1: it goes first to the new worker 3, then the
        // queue goes on with 4.
        assert_eq!(fx.sent[4..], [(3, 2), (3, 4)]);
    }

    #[test]
    fn tasks_sent_to_a_worker_already_dead_run_elsewhere() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        // Worker 1 died idle; before the pool noticed, task 7 was sent to it, and the write
        // failed: it never reached the worker.
        p.submit(7, 7, &mut fx).unwrap();
        p.exited_with(1, Exit::Ended, 1, None, &mut fx);
        assert!(
            fx.finished.is_empty(),
            "task 7 never started: {:?}",
            fx.finished
        );
        assert_eq!(fx.sent, vec![(1, 7), (2, 7)]);
        assert_eq!(p.counts().died, 1);
        // Once a worker's channel closes, it gets nothing more; its replacement starts.
        p.ready(2, &mut fx);
        assert_eq!(p.done(2, 7, &mut fx), Some(7));
        p.channel_closed(2, &mut fx);
        assert_eq!(fx.launched, vec![1, 2, 3]);
        p.submit(8, 8, &mut fx).unwrap();
        assert_eq!(fx.sent.last(), Some(&(3, 8)));
    }

    #[test]
    fn a_task_whose_workers_keep_dying_before_starting_it_fails() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.submit(7, 7, &mut fx).unwrap();
        // Each worker becomes ready, is sent task 7, and dies without beginning it.
        for wid in 1..=3 {
            p.ready(wid, &mut fx);
            p.exited_with(wid, Exit::Ended, 0, Some(0), &mut fx);
        }
        assert_eq!(fx.sent, vec![(1, 7), (2, 7), (3, 7)]);
        assert_eq!(fx.finished, vec![(7, Finish::Orphaned(3, ORPHAN_LIMIT))]);
        assert!(p.orphaned.is_empty());
    }

    #[test]
    fn tasks_waiting_behind_a_task_that_kills_its_workers_are_not_blamed() {
        let (mut p, mut fx) = started(PolicyConfig {
            in_flight: 4,
            max_in_flight: 4,
            ..cfg(1, None)
        });
        for id in 0..8 {
            p.submit(id, id, &mut fx).unwrap();
        }
        // Three workers in a row die running their oldest task; task 3 waited behind all
        // three deaths without beginning.
        for wid in 1..=3 {
            p.ready(wid, &mut fx);
            p.exited_with(wid, Exit::Ended, 0, Some(1), &mut fx);
        }
        let failed: Vec<TaskId> = fx.finished.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, vec![0, 1, 2], "only the running tasks fail");
        p.ready(4, &mut fx);
        assert_eq!(p.oldest(4).map(|(id, _)| id), Some(3));
    }

    #[test]
    fn tasks_of_a_worker_that_never_started_are_requeued() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.submit(7, 7, &mut fx).unwrap();
        p.setup_failed(1, "initializer panicked", &mut fx);
        p.exited(1, Exit::Ended, &mut fx);
        assert!(fx.finished.is_empty());
        assert_eq!(fx.launched, vec![1, 2]);
        assert_eq!(fx.sent, vec![(1, 7), (2, 7)]);
    }

    #[test]
    fn repeated_start_failures_break_the_pool() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.submit(1, 1, &mut fx).unwrap();
        for wid in 1..=3 {
            p.setup_failed(wid, "boom", &mut fx);
            p.exited(wid, Exit::Ended, &mut fx);
        }
        assert_eq!(fx.finished.len(), 1);
        assert!(matches!(&fx.finished[0].1, Finish::InitFailed(m) if m.contains("boom")));
        assert_eq!(
            fx.launched.len(),
            3,
            "no fourth start after the breaker tripped"
        );
        assert!(matches!(
            p.submit(2, 2, &mut fx),
            Err((2, Refusal::Broken(_)))
        ));
    }

    #[test]
    fn tasks_handed_back_after_the_pool_broke_fail_too() {
        let (mut p, mut fx) = started(cfg(2, None));
        p.submit(1, 1, &mut fx).unwrap();
        p.submit(2, 2, &mut fx).unwrap();
        assert_eq!(fx.sent, vec![(1, 1), (2, 2)]);
        // Worker 1 fails three times in a row (with replacements); worker 2 still holds task
        // 2 when the pool breaks, and fails afterwards.
        p.setup_failed(1, "boom", &mut fx);
        p.exited(1, Exit::Ended, &mut fx);
        p.setup_failed(3, "boom", &mut fx);
        p.exited(3, Exit::Ended, &mut fx);
        p.setup_failed(4, "boom", &mut fx);
        p.exited(4, Exit::Ended, &mut fx);
        assert_eq!(fx.finished.len(), 1, "task 1 failed when the pool broke");
        p.setup_failed(2, "boom", &mut fx);
        p.exited(2, Exit::Ended, &mut fx);
        let failed: Vec<TaskId> = fx.finished.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, vec![1, 2]);
        assert!(matches!(fx.finished[1].1, Finish::InitFailed(_)));
        p.close(&mut fx);
        assert!(p.is_finished(), "join can return");
    }

    #[test]
    fn a_feed_opened_before_close_submits_after_it_until_revoked() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.ready(1, &mut fx);
        assert!(p.open_feed());
        p.close(&mut fx);
        assert!(!p.open_feed(), "no new feed once closed");
        assert!(fx.retired.is_empty(), "the worker stays for the open feed");
        p.submit_from(1, 1, true, &mut fx).unwrap();
        assert!(matches!(p.submit(2, 2, &mut fx), Err((2, Refusal::Closed))));
        p.done(1, 1, &mut fx);
        assert!(fx.retired.is_empty());
        p.revoke_feeds(&mut fx);
        assert_eq!(fx.retired, vec![1], "revoked: the idle worker retires");
        assert!(matches!(
            p.submit_from(3, 3, true, &mut fx),
            Err((3, Refusal::Closed))
        ));
        p.exited(1, Exit::Ended, &mut fx);
        assert!(p.is_finished());
    }

    #[test]
    fn workers_killed_while_starting_are_replaced_and_only_a_crash_loop_breaks_the_pool() {
        let (mut p, mut fx) = started(cfg(1, None));
        p.submit(1, 1, &mut fx).unwrap();
        // Three workers killed in their initializer: replaced, the task waits for the next.
        for wid in 1..=3 {
            p.exited(wid, Exit::Ended, &mut fx);
        }
        assert!(fx.finished.is_empty());
        p.ready(4, &mut fx);
        assert_eq!(p.done(4, 1, &mut fx), Some(1));
        // Many in a row with none ready between: a crash loop; the pool breaks.
        let mut wid = 4;
        p.exited(wid, Exit::Ended, &mut fx); // worker 4 was ready: a plain death
        p.submit(2, 2, &mut fx).unwrap();
        while fx.finished.is_empty() {
            wid += 1;
            assert!(wid < 20, "the crash loop never broke the pool");
            p.exited(wid, Exit::Ended, &mut fx);
        }
        assert!(
            matches!(&fx.finished[0], (2, Finish::CannotStart(m)) if m.contains("died before")),
            "{:?}",
            fx.finished
        );
    }

    #[test]
    fn close_drains_then_retires() {
        let (mut p, mut fx) = started(cfg(2, None));
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        p.submit(1, 1, &mut fx).unwrap();
        p.close(&mut fx);
        assert_eq!(fx.retired, vec![2]);
        assert!(matches!(p.submit(2, 2, &mut fx), Err((2, Refusal::Closed))));
        p.done(1, 1, &mut fx);
        assert_eq!(fx.retired, vec![2, 1]);
        p.exited(1, Exit::Ended, &mut fx);
        p.exited(2, Exit::Ended, &mut fx);
        assert!(p.is_finished());
    }

    #[test]
    fn terminate_fails_everything_pending() {
        let (mut p, mut fx) = started(cfg(1, None));
        for id in 0..4 {
            p.submit(id, id, &mut fx).unwrap();
        }
        p.terminate(&mut fx);
        assert_eq!(fx.finished.len(), 4);
        assert_eq!(fx.killed, vec![1]);
        p.exited(1, Exit::Ended, &mut fx);
        assert!(p.is_finished());
        assert_eq!(fx.launched, vec![1], "no replacement after terminate");
    }

    #[test]
    fn short_tasks_deepen_the_queue_and_long_ones_make_it_shallow_again() {
        let config = PolicyConfig {
            max_in_flight: 16,
            ..cfg(1, None)
        };
        let (mut p, mut fx) = started(config);
        p.ready(1, &mut fx);
        for id in 0..40 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(fx.sent.len(), 2, "two in flight to begin with");
        for _ in 0..20 {
            p.observe(Duration::from_micros(3), &mut fx);
        }
        assert_eq!(p.depth(), 16);
        assert_eq!(fx.sent.len(), 16, "a deeper queue is filled at once");
        for _ in 0..60 {
            p.observe(Duration::from_millis(5), &mut fx);
        }
        assert_eq!(p.depth(), 2);
    }

    #[test]
    fn one_task_at_a_time_until_tasks_prove_short_and_again_once_they_are_long() {
        let (mut p, mut fx) = started(PolicyConfig {
            in_flight: 1,
            max_in_flight: 16,
            ..cfg(2, None)
        });
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        for id in 0..40 {
            p.submit(id, id, &mut fx).unwrap();
        }
        assert_eq!(
            fx.sent,
            vec![(1, 0), (2, 1)],
            "one each while the pace is unknown"
        );
        // Long enough that two of them fill the depth target.
        p.observe(Duration::from_nanos(DEPTH_TARGET_NS * 3 / 4), &mut fx);
        assert_eq!(p.depth(), 2, "tasks under 20 ms: at least two");
        for _ in 0..40 {
            p.observe(Duration::from_micros(2), &mut fx);
        }
        assert_eq!(p.depth(), 16);
        for _ in 0..40 {
            p.observe(Duration::from_millis(50), &mut fx);
        }
        assert_eq!(p.depth(), 1, "long tasks: one at a time again");
    }

    #[test]
    fn a_fixed_depth_holds_whatever_the_tasks_take() {
        for n in [1, 3] {
            let (mut p, mut fx) = started(PolicyConfig {
                in_flight: n,
                max_in_flight: n,
                ..cfg(1, None)
            });
            p.ready(1, &mut fx);
            for id in 0..10 {
                p.submit(id, id, &mut fx).unwrap();
            }
            assert_eq!(fx.sent.len(), n, "{n} from the first task");
            for service in [Duration::from_micros(1), Duration::from_millis(50)] {
                for _ in 0..40 {
                    p.observe(service, &mut fx);
                }
                assert_eq!(p.depth(), n, "{service:?}");
            }
            assert_eq!(fx.sent.len(), n);
        }
    }

    #[test]
    fn a_dead_worker_fails_the_task_it_was_running_and_its_queue_moves_on() {
        let (mut p, mut fx) = started(PolicyConfig {
            max_in_flight: 4,
            ..cfg(2, None)
        });
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        for _ in 0..20 {
            p.observe(Duration::from_micros(1), &mut fx);
        }
        for id in 0..8 {
            p.submit(id, id, &mut fx).unwrap();
        }
        let held_by_1: Vec<TaskId> = p.workers[&1].in_flight.iter().copied().collect();
        assert_eq!(held_by_1, vec![0, 2, 4, 6]);
        p.exited(1, Exit::Ended, &mut fx);
        // Only task 0 (the one worker 1 was running) fails; 2, 4 and 6 wait, in order, for
        // the next free place.
        assert_eq!(fx.finished, vec![(0, Finish::Lost(1))]);
        assert_eq!(p.counts().lost, 1);
        let resent: Vec<TaskId> = fx.sent[8..].iter().map(|&(_, id)| id).collect();
        assert_eq!(
            resent,
            vec![2, 4, 6],
            "unstarted tasks, in order, to the new worker"
        );
        assert!(fx.sent[8..].iter().all(|&(wid, _)| wid == 3));
    }

    #[test]
    fn a_pool_tripped_by_workers_killed_while_starting_says_so_and_recovers() {
        let t0 = Instant::now();
        let mut p = Policy::<u64>::new(cfg(1, None));
        let mut fx = Fake::default();
        p.advance(t0, &mut fx);
        p.start(&mut fx);
        p.submit(1, 1, &mut fx).unwrap();
        // Each new worker is killed in its initializer, as soon as it is launched.
        let mut now = t0;
        loop {
            assert!(fx.launched.len() < 20, "never tripped");
            let wid = *fx.launched.last().unwrap();
            p.exited(wid, Exit::Ended, &mut fx);
            if !fx.finished.is_empty() {
                break;
            }
            if let Some(t) = p.wakeup() {
                now = now.max(t);
                p.advance(now, &mut fx);
            }
        }
        assert_eq!(fx.launched.len(), 9, "nine start failures in 10 s trip it");
        let (id, why) = &fx.finished[0];
        assert_eq!(*id, 1);
        assert!(
            matches!(why, Finish::CannotStart(m) if m.contains("died before it was ready")
                && m.contains("tries again")),
            "{why:?}"
        );
        assert!(matches!(
            p.submit(2, 2, &mut fx),
            Err((2, Refusal::CannotStart(_)))
        ));
        // The pause: no start until the probe is due, then exactly one.
        let probe = p.wakeup().expect("a probe is planned");
        assert!(probe > now);
        p.advance(probe - Duration::from_millis(1), &mut fx);
        assert_eq!(fx.launched.len(), 9);
        p.advance(probe, &mut fx);
        assert_eq!(fx.launched.len(), 10, "one probe");
        // The killing stopped: the probe starts, the pool takes tasks again.
        p.ready(10, &mut fx);
        p.submit(3, 3, &mut fx).unwrap();
        assert_eq!(fx.sent.last(), Some(&(10, 3)));
        assert_eq!(p.done(10, 3, &mut fx), Some(3));
    }

    #[test]
    fn a_crash_storm_paces_replacements_but_one_death_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut p = Policy::<u64>::new(cfg(2, None));
        let mut fx = Fake::default();
        p.advance(t0, &mut fx);
        p.start(&mut fx);
        p.ready(1, &mut fx);
        p.ready(2, &mut fx);
        p.submit(0, 0, &mut fx).unwrap();
        p.exited(1, Exit::Ended, &mut fx);
        assert_eq!(
            fx.launched,
            vec![1, 2, 3],
            "a single death: replaced at once"
        );
        // Every task kills its worker, for ten seconds of fake time.
        let mut now = t0;
        let mut id = 1;
        while now < t0 + Duration::from_secs(10) {
            let ready: Vec<WorkerId> = p
                .workers
                .iter()
                .filter(|(_, s)| !s.ever_ready)
                .map(|(w, _)| *w)
                .collect();
            for wid in ready {
                p.ready(wid, &mut fx);
            }
            let Some(&wid) = p.workers.keys().next() else {
                now = p.wakeup().expect("held back").max(now);
                p.advance(now, &mut fx);
                continue;
            };
            p.submit(id, id, &mut fx).unwrap();
            id += 1;
            p.exited(wid, Exit::Ended, &mut fx);
            now += Duration::from_micros(400);
            p.advance(now, &mut fx);
        }
        // Without pacing, 25 000 starts; with it, the burst and then four a second.
        let n = fx.launched.len();
        assert!((40..=60).contains(&n), "{n} starts");
        assert!(
            fx.finished
                .iter()
                .all(|(_, f)| matches!(f, Finish::Lost(_)))
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Submit,
        /// `Pool::resize` to this many workers.
        Resize(usize),
        Ready(usize),
        Done(usize),
        SetupFail(usize),
        Die(usize),
        Close,
        Terminate,
        /// A task took this many microseconds.
        Observe(u64),
        /// An imap opens a feed, submits through it, is exhausted; `join` revokes feeds.
        OpenFeed,
        SubmitFed,
        CloseFeed,
        Revoke,
        /// A worker's channel closes; later it dies with some of its newest tasks
        /// undelivered.
        ChannelClosed(usize),
        DieUndelivered(usize, usize, Option<u64>),
        /// The oldest task of a worker begins (the fake world learns it).
        Begin(usize),
        /// Cancel a task by (wrapped) id.
        Cancel(u64),
        /// The oldest task of a worker runs out of time.
        TimeOut(usize),
        /// The next task that fails part way hands back its rest as a new task.
        Split,
        /// Time passes (milliseconds), when the run has a clock.
        Advance(u64),
        /// A launch fails.
        LaunchFail(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Submit),
            2 => (0usize..8).prop_map(Op::Ready),
            5 => (0usize..8).prop_map(Op::Done),
            1 => (0usize..8).prop_map(Op::SetupFail),
            1 => (0usize..8).prop_map(Op::Die),
            1 => Just(Op::Close),
            1 => Just(Op::Terminate),
            2 => (1u64..200).prop_map(Op::Observe),
            1 => Just(Op::OpenFeed),
            3 => Just(Op::SubmitFed),
            1 => Just(Op::CloseFeed),
            1 => Just(Op::Revoke),
            1 => (0usize..8).prop_map(Op::ChannelClosed),
            1 => (0usize..8, 0usize..5, prop::option::of(0u64..4))
                .prop_map(|(i, k, r)| Op::DieUndelivered(i, k, r)),
            2 => (0usize..8).prop_map(Op::Begin),
            2 => (0u64..64).prop_map(Op::Cancel),
            1 => (0usize..8).prop_map(Op::TimeOut),
            1 => Just(Op::Split),
            2 => (0u64..3_000).prop_map(Op::Advance),
            1 => (0usize..8).prop_map(Op::LaunchFail),
            1 => (1usize..5).prop_map(Op::Resize),
        ]
    }

    proptest! {
        /// Any sequence of submits, completions, deaths, setup failures, recycles, close and
        /// terminate gives every task exactly one outcome, and never over-commits a worker.
        #[test]
        fn every_task_gets_exactly_one_outcome(
            processes in 1usize..4,
            max_tasks in prop::option::of(1u64..4),
            ops in prop::collection::vec(op(), 1..200),
            clocked in any::<bool>(),
        ) {
            let config = PolicyConfig { max_in_flight: 4, ..cfg(processes, max_tasks) };
            let mut p = Policy::<u64>::new(config);
            let mut fx = Fake::default();
            let mut now = Instant::now();
            if clocked { p.advance(now, &mut fx); }
            p.start(&mut fx);
            let mut next = 0u64;
            let mut outcomes: HashMap<TaskId, u32> = HashMap::new();
            let mut refused = BTreeSet::new();
            let mut sent_per_worker: HashMap<WorkerId, u64> = HashMap::new();
            let mut feeds = 0usize;
            let live = |p: &Policy<u64>| p.workers.keys().copied().collect::<Vec<_>>();
            // The most workers the pool was ever sized for: a shrink lets busy workers
            // finish what they hold.
            let mut cap = processes;
            for op in ops {
                match op {
                    Op::Resize(n) => {
                        cap = cap.max(n);
                        p.resize(n, &mut fx);
                    }
                    Op::Submit => {
                        let id = next;
                        next += 1;
                        if p.submit(id, id, &mut fx).is_err() {
                            refused.insert(id);
                        }
                    }
                    Op::Ready(i) => {
                        let w = live(&p);
                        if !w.is_empty() { p.ready(w[i % w.len()], &mut fx); }
                    }
                    Op::Done(i) => {
                        let w = live(&p);
                        if w.is_empty() { continue; }
                        let wid = w[i % w.len()];
                        let slot = &p.workers[&wid];
                        if !slot.ever_ready { p.ready(wid, &mut fx); }
                        if let Some(&id) = p.workers[&wid].in_flight.front() {
                            let rec = p.done(wid, id, &mut fx);
                            if rec.is_none() {
                                // Only a cancelled task's answer hands nothing back.
                                prop_assert!(fx.finished.iter().any(|(t, w)| *t == id && matches!(w, Finish::Cancelled(_))), "task {} vanished", id);
                            } else {
                                prop_assert_eq!(rec, Some(id));
                                *outcomes.entry(id).or_default() += 1;
                            }
                        }
                    }
                    Op::SetupFail(i) => {
                        let w: Vec<_> = p.workers.iter().filter(|(_, s)| !s.ever_ready).map(|(w, _)| *w).collect();
                        if !w.is_empty() {
                            let wid = w[i % w.len()];
                            p.setup_failed(wid, "boom", &mut fx);
                            p.exited(wid, Exit::Ended, &mut fx);
                        }
                    }
                    Op::Die(i) => {
                        let w = live(&p);
                        if !w.is_empty() { p.exited(w[i % w.len()], Exit::Ended, &mut fx); }
                    }
                    Op::Close => p.close(&mut fx),
                    Op::Terminate => p.terminate(&mut fx),
                    Op::Observe(us) => p.observe(Duration::from_micros(us), &mut fx),
                    Op::OpenFeed => {
                        if p.open_feed() { feeds += 1; }
                    }
                    Op::SubmitFed => {
                        let id = next;
                        next += 1;
                        if p.submit_from(id, id, feeds > 0, &mut fx).is_err() {
                            refused.insert(id);
                        }
                    }
                    Op::CloseFeed => {
                        if feeds > 0 { feeds -= 1; p.close_feed(&mut fx); }
                    }
                    Op::Revoke => p.revoke_feeds(&mut fx),
                    Op::ChannelClosed(i) => {
                        let w = live(&p);
                        if !w.is_empty() { p.channel_closed(w[i % w.len()], &mut fx); }
                    }
                    Op::DieUndelivered(i, k, begun) => {
                        let w = live(&p);
                        if !w.is_empty() {
                            p.exited_with(w[i % w.len()], Exit::Ended, k, begun, &mut fx);
                        }
                    }
                    Op::Begin(i) => {
                        let w = live(&p);
                        if w.is_empty() { continue; }
                        if let Some(&id) = p.workers[&w[i % w.len()]].in_flight.front() {
                            fx.begun.push(id);
                        }
                    }
                    Op::Cancel(id) => {
                        if next > 0 {
                            let _ = p.cancel(id % next, id % 3 != 0, &mut fx);
                        }
                    }
                    Op::TimeOut(i) => {
                        let w = live(&p);
                        if w.is_empty() { continue; }
                        let wid = w[i % w.len()];
                        if let Some(&id) = p.workers[&wid].in_flight.front() {
                            let _ = p.time_out(wid, id, &mut fx);
                        }
                    }
                    Op::Split => {
                        if fx.continuations.is_empty() {
                            fx.continuations.push_back((next, next));
                            next += 1;
                        }
                    }
                    Op::Advance(ms) => {
                        if clocked {
                            now += Duration::from_millis(ms);
                            p.advance(now, &mut fx);
                        }
                    }
                    Op::LaunchFail(i) => {
                        let w: Vec<_> = p.workers.iter().filter(|(_, s)| !s.ever_ready).map(|(w, _)| *w).collect();
                        if !w.is_empty() {
                            p.exited(w[i % w.len()], Exit::LaunchFailed("EMFILE".into()), &mut fx);
                        }
                    }
                }
                prop_assert!((2..=4).contains(&p.depth()));
                // Workers whose channel closed are dead or dying: they run nothing.
                let holding = p.workers.values().filter(|s| !s.closed && !s.in_flight.is_empty()).count();
                prop_assert!(holding <= cap, "{} workers hold tasks, processes = {}", holding, cap);
                prop_assert!(p.workers.values().filter(|s| s.seated).count() <= cap);
                // A broken pool starts no worker, so nothing may wait in its queue.
                prop_assert!(p.restarts.tripped().is_none() || p.queue.is_empty(), "tasks stranded in a broken pool");
                for (wid, slot) in &p.workers {
                    prop_assert!(slot.in_flight.len() <= 4);
                    if let Some(m) = max_tasks { prop_assert!(slot.assigned <= m); }
                    let _ = sent_per_worker.entry(*wid).or_default();
                }
            }
            // Once workers start again, a running pool recovers from any trip: time passes,
            // the probe (or any worker) becomes ready.
            if clocked && p.state == State::Running {
                now += Duration::from_secs(600);
                p.advance(now, &mut fx);
                for wid in live(&p) { p.ready(wid, &mut fx); }
                prop_assert!(p.restarts.tripped().is_none(), "the pool did not recover");
                prop_assert!(p.active() >= p.cfg.processes, "capacity restored");
            }
            // Wind down: terminate, and reap every worker.
            p.terminate(&mut fx);
            for wid in live(&p) { p.exited(wid, Exit::Ended, &mut fx); }
            prop_assert!(p.is_finished());
            for (id, _) in &fx.finished { *outcomes.entry(*id).or_default() += 1; }
            // A rest never handed back was never a task.
            for (id, _) in std::mem::take(&mut fx.continuations) { refused.insert(id); }
            for id in 0..next {
                let n = outcomes.get(&id).copied().unwrap_or(0);
                if refused.contains(&id) {
                    prop_assert_eq!(n, 0, "refused task {} also got an outcome", id);
                } else {
                    prop_assert_eq!(n, 1, "task {} got {} outcomes", id, n);
                }
            }
        }
    }
}
