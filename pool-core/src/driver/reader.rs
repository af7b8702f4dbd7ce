//! Reading a worker's answers: by the driver thread, or by a caller waiting for its own.
//!
//! The driver reads every worker's socket as its epoll set reports it. A caller blocked on
//! the result of one task (`apply`, `AsyncResult::get`) can instead *borrow* the socket of
//! the worker that runs it: the socket leaves the driver's set, the caller polls it and the
//! worker's pidfd itself, reads what arrives with the same code the driver uses (under the
//! pool's lock, so every check and every policy step is the same), and hands the socket
//! back. The answer then wakes only the caller: two wakeups per round trip (the worker's
//! and the caller's) where the driver made three.
//!
//! A caller borrows only what it can finish alone: a worker whose oldest task is its own,
//! with nothing left to write to it and no frame half read, that is ready or still setting
//! up (a pool's first task goes to a worker that has not said `Ready` yet: the caller reads
//! the `Ready`, then its answer, with the same code); otherwise it waits on its result as
//! usual. If the worker dies meanwhile, the caller wakes (the pidfd), reads what
//! is left and gives the rest to the driver, which reaps the worker as always; if the
//! driver reaps first, the borrow ends there and the caller waits on its result.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pool_spawn::protocol::{self, FromWorker};
use rustix::event::{PollFd, PollFlags};

use super::effects::Fx;
use super::shared::{Shared, note_started};
use super::worker_io::WorkerIo;
use super::{Batch, Batches, Delivery, Outcome, TaskRec, WorkerName};
use crate::ids::IdMap;
use crate::policy::{Effects, Policy, WorkerId};

/// How a read of a worker's socket ended.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ReadEnd {
    /// The worker sent something it may not: it is killed.
    pub(super) broken: bool,
    /// Its channel reached its end: it is dying or dead.
    pub(super) eof: bool,
}

impl ReadEnd {
    pub(super) fn closed(self) -> bool {
        self.broken || self.eof
    }
}

/// Worker `w` sent a message about a task it may not speak of now (`note` says which, for
/// the error of the task it was running): it is faulty, and is killed.
fn faulty(w: &mut WorkerIo, end: &mut ReadEnd, note: String) {
    w.exit_note = Some(note);
    end.broken = true;
}

/// A message the worker may not send: it is killed (see [`faulty`]).
struct Faulty;

/// The state of worker `wid`, about to take results of task `id`, which it may send only
/// while it runs it (the oldest task it holds); `Ok(None)` if it is gone; `Err` if it is
/// not running that task (then it is faulty, and `end` says so).
fn running_io<'a>(
    policy: &Policy<TaskRec>,
    io: &'a mut IdMap<WorkerIo>,
    wid: WorkerId,
    id: u64,
    end: &mut ReadEnd,
) -> Result<Option<&'a mut WorkerIo>, Faulty> {
    let running = policy.oldest(wid).map(|(t, _)| t);
    let Some(w) = io.get_mut(&wid) else {
        return Ok(None);
    };
    if running != Some(id) {
        faulty(
            w,
            end,
            format!("it sent results for task {id}, which it was not running"),
        );
        return Err(Faulty);
    }
    Ok(Some(w))
}

/// Keeps `batch`, results of task `id` (which worker `w` runs) that came before its `Done`.
fn add_part(w: &mut WorkerIo, id: u64, batch: Batch) {
    if w.parts_task != id {
        w.parts.clear();
        w.parts_task = id;
    }
    w.parts.push(batch);
}

/// Reads what worker `wid` sent and handles every complete message, under the pool's lock.
///
/// `drain`: read until the socket has nothing more (after the worker's exit, when no
/// readiness will come again); otherwise stop at the first short read (the driver's epoll
/// set and a borrowing caller's poll report the socket again while bytes remain).
pub(super) fn read_worker(
    policy: &mut Policy<TaskRec>,
    fx: &mut Fx<'_>,
    wid: WorkerId,
    drain: bool,
) -> ReadEnd {
    let mut end = ReadEnd::default();
    let Some(w) = fx.io.get_mut(&wid) else {
        return end;
    };
    if w.ended {
        return end;
    }
    let (name, pid) = (w.name.clone(), w.pid);
    let tag = WorkerName::of(&name);
    let Some(conn) = w.conn.as_mut() else {
        return end;
    };
    super::spare::hand_to(conn);
    let filled = if drain {
        conn.fill()
    } else {
        conn.fill_level()
    };
    if let Err(e) = filled {
        tracing::warn!(worker = %name, error = %e, "worker channel failed");
        end.broken = true;
    }
    let mut msgs = std::mem::take(&mut w.read_room);
    loop {
        match conn.next_frame_with_fds() {
            Ok(Some(got)) => msgs.push(got),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "bad frame from worker");
                w.exit_note
                    .get_or_insert_with(|| format!("its channel failed: {e}"));
                end.broken = true;
                break;
            }
        }
    }
    end.eof = conn.is_eof();
    // What one read brought arrived at one moment: one clock reading serves it all.
    let now = Instant::now();
    let partial = conn.has_partial_frame();
    let heard = !msgs.is_empty();
    for (frame, fds) in msgs.drain(..) {
        if let Some(w) = fx.io.get_mut(&wid)
            && let Some((id, head, range, len)) = w.tail_wait.take()
        {
            // The frame after a `PartTail`: the rest of that result's bytes, as they are.
            if frame.len() as u64 != len {
                let got = frame.len();
                faulty(
                    w,
                    &mut end,
                    format!("it announced a result tail of {len} bytes, then sent {got}"),
                );
                break;
            }
            add_part(
                w,
                id,
                Batch {
                    frame: head,
                    range,
                    items: 1,
                    tail: frame,
                    fds,
                },
            );
            continue;
        }
        // Decoded in place: a result's bytes stay where they are in the frame.
        let msg = protocol::decode_reply(&frame);
        if let Ok(m) = &msg
            && super::phase::out_of_phase(fx.io.get_mut(&wid), m)
        {
            end.broken = true;
            break;
        }
        if fx.io.get_mut(&wid).is_some_and(|w| w.passes_over(&msg)) {
            // Delivered already, from its page.
            continue;
        }
        match msg {
            Ok(FromWorker::Ready { .. }) => {
                tracing::debug!(worker = %name, pid, "worker ready");
                policy.ready(wid, fx);
                note_started(policy, fx.io, wid, now);
            }
            Ok(FromWorker::SetupFailed { message, .. }) => {
                tracing::warn!(worker = %name, %message, "worker setup failed");
                policy.setup_failed(wid, &message, fx);
            }
            Ok(FromWorker::Part { id, items, results }) => {
                let w = match running_io(policy, fx.io, wid, id, &mut end) {
                    Ok(Some(w)) => w,
                    Ok(None) => continue,
                    Err(Faulty) => break,
                };
                add_part(
                    w,
                    id,
                    Batch {
                        frame,
                        range: results,
                        items,
                        tail: Vec::new(),
                        fds,
                    },
                );
            }
            Ok(FromWorker::PartTail { id, head, len }) => {
                let w = match running_io(policy, fx.io, wid, id, &mut end) {
                    Ok(Some(w)) => w,
                    Ok(None) => continue,
                    Err(Faulty) => break,
                };
                if len <= protocol::SHM_THRESHOLD as u64 {
                    // Only large results go in two frames: a small "tail" could be a real
                    // message about to be taken for bytes.
                    faulty(
                        w,
                        &mut end,
                        format!("it announced a result tail of {len} bytes"),
                    );
                    break;
                }
                // The next frame holds the rest of this result.
                w.tail_wait = Some((id, frame, head, len));
            }
            Ok(FromWorker::Skipped { id }) => {
                // Only a task that was cancelled (its record is gone) may be
                // skipped, and only the one it holds first: a forged Skipped for a
                // live task left that task without an outcome for ever.
                let oldest = policy.oldest(wid).map(|(t, rec)| (t, rec.is_some()));
                let Some(w) = fx.io.get_mut(&wid) else {
                    continue;
                };
                if oldest != Some((id, false)) {
                    faulty(
                        w,
                        &mut end,
                        format!("it said it skipped task {id}, which it was not asked to skip"),
                    );
                    break;
                }
                w.results += 1;
                w.passed(id);
                // The task was cancelled before it began: only its place is freed.
                let _ = policy.done(wid, id, fx);
                note_started(policy, fx.io, wid, now);
            }
            Ok(FromWorker::Recycling { rss }) => {
                tracing::debug!(worker = %name, rss, "worker over its memory limit, recycling");
                policy.recycling(wid, fx);
                // A worker that recycles exits by itself after its results; one
                // that only said so (a task writing to its channel) would be waited
                // for at join for ever: Exit, after its tasks, makes sure.
                fx.retire(wid);
            }
            Ok(FromWorker::Done { id, items, outcome }) => {
                let answer = Answer {
                    id,
                    items,
                    outcome,
                    frame,
                    fds,
                };
                if !on_done(policy, fx, wid, (&tag, pid), answer, now) {
                    end.broken = true;
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "undecodable message from worker");
                end.broken = true;
            }
        }
    }
    tell_pace(policy, fx, wid, now);
    if let Some(w) = fx.io.get_mut(&wid) {
        w.read_room = msgs;
        // A `PartTail` waiting for its tail frame is a frame stuck partway too.
        let waiting = partial || w.tail_wait.is_some();
        w.guard.after_read(waiting, now);
    }
    if heard
        && !end.closed()
        && let Some(w) = fx.io.get(&wid)
        && w.may_hold()
    {
        // Whatever it held back went out with this (see `look_held`).
        let next = (policy.holding(wid) >= 2).then(|| now + HELD_LOOK);
        fx.plan_look(wid, next);
    }
    if end.broken || end.eof {
        // Dying or dead: no more tasks for it, and its replacement starts now.
        policy.channel_closed(wid, fx);
    }
    if end.closed()
        && let Some(w) = fx.io.get_mut(&wid)
    {
        w.ended = true;
    }
    end
}

/// Tells the policy how long worker `wid` took per task over the answers read together
/// (at `now`). A worker writes the answers of brief tasks in batches, so they arrive at one
/// moment: the time since it could begin the first of them, shared among them, is each
/// one's time; timed one by one, all but the first would seem to take none.
fn tell_pace(policy: &mut Policy<TaskRec>, fx: &mut Fx<'_>, wid: WorkerId, now: Instant) {
    let Some((each, n)) = fx.io.get_mut(&wid).and_then(|w| w.pace(now)) else {
        return;
    };
    for _ in 0..n {
        policy.observe(each, fx);
    }
}

/// A worker's `Done`, as read from its channel or taken from its page.
struct Answer {
    /// The task it answers.
    id: u64,
    /// How many items' results it carries (after those sent in parts).
    items: u64,
    /// Where the results lie in `frame`, or why the task failed as a whole.
    outcome: Result<std::ops::Range<usize>, pool_spawn::task::ItemError>,
    frame: Vec<u8>,
    /// The descriptors that came with it.
    fds: Vec<OwnedFd>,
}

/// Handles worker `wid`'s `answer`: `false` if the worker may not send it (it is not the
/// oldest task the worker holds).
fn on_done(
    policy: &mut Policy<TaskRec>,
    fx: &mut Fx<'_>,
    wid: WorkerId,
    (name, pid): (&WorkerName, u32),
    answer: Answer,
    now: Instant,
) -> bool {
    let Answer {
        id,
        items,
        outcome,
        frame,
        fds,
    } = answer;
    // A worker runs its tasks in the order sent: a result for another than the first it
    // holds is forged (it would be delivered as that task's, a task still queued behind
    // the running one).
    let oldest = policy.oldest(wid).map(|(t, _)| t);
    let Some(w) = fx.io.get_mut(&wid) else {
        return true;
    };
    if oldest != Some(id) {
        w.exit_note = Some(format!(
            "it sent a result for task {id}, which it was not running"
        ));
        return false;
    }
    w.results += 1;
    w.passed(id);
    let mut parts = Vec::new();
    if w.parts_task == id {
        parts = std::mem::take(&mut w.parts);
    }
    if let Some(mut rec) = policy.done(wid, id, fx) {
        rec.leave_group(id);
        // The worker could start this task once it was sent and its previous one was
        // done: the time since is what it took.
        if let Some(w) = fx.io.get_mut(&wid) {
            let began = match (rec.sent_at, w.last_done) {
                (Some(s), Some(l)) => Some(s.max(l)),
                (s, l) => s.or(l),
            };
            w.last_done = Some(now);
            if let Some(b) = began {
                // Told to the policy once the read's answers are all in (`tell_pace`).
                w.answered(b);
            }
            let start = rec.started_at.or(began).unwrap_or(now);
            fx.timings.record(
                rec.span(),
                start.saturating_duration_since(rec.queued_at),
                now.saturating_duration_since(start),
            );
        }
        let result = outcome.map(|range| {
            let last = Batch {
                frame,
                range,
                items,
                tail: Vec::new(),
                fds,
            };
            Batches::new(parts, Some(last))
        });
        fx.keep_spent(rec.frame.take());
        fx.done.push(Delivery::of(
            rec,
            Outcome::Done {
                result,
                worker: name.clone(),
                pid,
            },
        ));
    }
    note_started(policy, fx.io, wid, now);
    true
}

/// How long a worker that holds two tasks or more may go without a word before the pool
/// looks at the answers it holds back (see `page::HELD_OFFSET`) and delivers them from its
/// page: a task that runs long keeps the answers of the brief ones before it no longer
/// than about this.
pub(super) const HELD_LOOK: Duration = Duration::from_millis(1);

/// How long a caller sleeps on the bell of the worker it waits for before it polls the
/// worker's socket instead (see [`Borrow::sleep_on_bell`]): what a wake the bell misses
/// (none expected) may cost, and, for a task running longer, one wakeup more.
const BELL_SLEEP: Duration = Duration::from_millis(10);

/// Delivers the answers worker `wid` holds back (see `page::HELD_OFFSET`), as if they had
/// arrived: a task it finished is delivered, and never run again. Those that did arrive are
/// no longer among the tasks it holds, and are passed over; those delivered here are
/// passed over when they arrive (`WorkerIo::salvaged`). Called while the worker lives (see
/// [`look_held`]), and once it is gone and its channel read to the end, before its tasks
/// are settled. `false` if the worker wrote over them while they were copied.
pub(super) fn salvage_held(policy: &mut Policy<TaskRec>, fx: &mut Fx<'_>, wid: WorkerId) -> bool {
    let Some(w) = fx.io.get(&wid) else {
        return true;
    };
    let Some(answers) = w.held_answers() else {
        return false;
    };
    if answers.is_empty() {
        return true;
    }
    let (name, pid) = (w.name.clone(), w.pid);
    let now = Instant::now();
    for frame in answers {
        let Ok(FromWorker::Done { id, items, outcome }) = protocol::decode_reply(&frame) else {
            continue;
        };
        if policy.oldest(wid).map(|(t, _)| t) != Some(id) {
            // Arrived already (or never the worker's to send).
            continue;
        }
        let answer = Answer {
            id,
            items,
            outcome,
            frame,
            fds: Vec::new(),
        };
        on_done(policy, fx, wid, (&WorkerName::of(&name), pid), answer, now);
        if let Some(w) = fx.io.get_mut(&wid) {
            w.salvaged.push_back(id);
        }
    }
    tell_pace(policy, fx, wid, now);
    true
}

/// Delivers the answer worker `wid` left in its page for a caller (see `page::ANSWER`), if
/// it left one and has not taken it back: `false` if that answer is not one it may give
/// (not the results of the oldest task it holds), the worker then being faulty.
pub(super) fn deliver_posted(policy: &mut Policy<TaskRec>, fx: &mut Fx<'_>, wid: WorkerId) -> bool {
    let Some(w) = fx.io.get_mut(&wid) else {
        return true;
    };
    let Some((id, items, bytes)) = w.take_posted() else {
        return true;
    };
    let Some(frame) = bytes else {
        w.exit_note = Some(format!(
            "it left an answer to task {id} in its page without its results"
        ));
        return false;
    };
    let (name, pid) = (WorkerName::of(&w.name), w.pid);
    let now = Instant::now();
    let answer = Answer {
        id,
        items,
        outcome: Ok(0..frame.len()),
        frame,
        fds: Vec::new(),
    };
    let given = on_done(policy, fx, wid, (&name, pid), answer, now);
    tell_pace(policy, fx, wid, now);
    given
}

/// Looks at the answers worker `wid` holds back and delivers them (see [`salvage_held`]);
/// returns when to look again, if ever before it next says something.
///
/// A worker holds answers back only while it has more requests waiting, and writes them
/// before it takes up a task once the first of their tasks began `HOLD_AGE_NS` ago: so a
/// task it has been running for that long ends with every answer before it, and its own,
/// written out. Until the worker runs such a task, it is looked at every [`HELD_LOOK`]
/// while it holds two tasks or more.
pub(super) fn look_held(
    policy: &mut Policy<TaskRec>,
    fx: &mut Fx<'_>,
    wid: WorkerId,
    now: Instant,
) -> Option<Instant> {
    let w = fx.io.get(&wid)?;
    if w.ended {
        // Its death settles what it held.
        return None;
    }
    // What it runs first, then what it holds: an answer held after this look at the
    // running task is that task's, or one behind it.
    let running = w.running();
    let timed = running
        .and_then(|id| policy.task(id))
        .is_some_and(|rec| rec.timeout.is_some());
    let taken = running.and_then(|id| w.taken(id, timed));
    if !salvage_held(policy, fx, wid) {
        // Written out while copied: what it holds now is young.
        return Some(now + HELD_LOOK);
    }
    if policy.holding(wid) < 2 {
        return None;
    }
    if let (Some(id), Some(ns)) = (running, taken)
        && policy.holds(wid, id)
        && protocol::monotonic_ns().saturating_sub(ns) >= protocol::page::HOLD_AGE_NS
    {
        return None;
    }
    Some(now + HELD_LOOK)
}

/// What a caller saw of the worker whose socket it borrowed, before it gives it back.
#[derive(Clone, Copy)]
struct Seen {
    /// The socket has bytes to read (or the worker's end came).
    readable: bool,
    /// It was read because an answer was posted in the page behind bytes on the socket:
    /// read to the end.
    before_post: bool,
    /// The worker left the answer in its page.
    posted: bool,
    /// The worker's process ended.
    exited: bool,
    /// The worker's held answers are due a look.
    look: bool,
}

/// Reads what the caller that borrowed `b` saw come (`seen`), takes an answer left in the
/// page, and gives the socket back to the driver, under the pool's lock. `sock`: the
/// socket as the caller holds it, if it holds it (see [`Lent`]).
fn settle(
    policy: &mut Policy<TaskRec>,
    fx: &mut Fx<'_>,
    b: &Lent,
    sock: Option<&OwnedFd>,
    seen: Seen,
) {
    let Seen {
        readable,
        before_post,
        posted,
        exited,
        look,
    } = seen;
    let (wid, ticket) = (b.wid, b.ticket);
    let Some(w) = fx.io.get_mut(&wid) else { return };
    if w.borrowed != Some(ticket) {
        // The driver took the socket back (it reaps the worker), or it was given
        // back when the task's frame could not be written at once.
        return;
    }
    let mut end = ReadEnd::default();
    if readable {
        end = read_worker(policy, fx, wid, before_post);
    }
    // A worker leaves an answer in its page only once all it wrote before is on the
    // socket, whole: a message cut short with nothing more to read was not the
    // worker's (a task wrote to the channel by mistake), and the channel cannot be
    // trusted after it. One with more to read is read on the caller's next call. A
    // result's head (`PartTail`) whose tail has not come is a message cut short too: left
    // waiting, it took the next task's answer for its tail, and that task was blamed.
    let cut_short = posted && !end.closed() && fx.io.get(&wid).is_some_and(WorkerIo::cut_short);
    let stray = cut_short && {
        let sock = sock.or_else(|| fx.io.get(&wid).and_then(|w| w.sock_watch.as_deref()));
        sock.is_some_and(|s| rustix::io::ioctl_fionread(s).is_ok_and(|n| n == 0))
    };
    if stray && let Some(w) = fx.io.get_mut(&wid) {
        w.exit_note = Some(format!(
            "it answered task {id} in its page while a message on its channel \
                 was cut short: something besides the worker wrote to the channel",
            id = b.id
        ));
    }
    if posted && !end.closed() && (stray || (!cut_short && !deliver_posted(policy, fx, wid))) {
        end.broken = true;
        policy.channel_closed(wid, fx);
        if let Some(w) = fx.io.get_mut(&wid) {
            w.ended = true;
        }
    }
    if look && !end.closed() {
        let next = look_held(policy, fx, wid, Instant::now());
        fx.plan_look(wid, next);
    }
    let busy = policy.oldest(wid).is_some();
    let Some(w) = fx.io.get_mut(&wid) else { return };
    w.borrowed = None;
    w.nudge_armed = false;
    w.exited |= exited;
    w.arm(fx.epoll, wid, busy);
    let partial = w.cut_short();
    // A ring the task's arguments went through gives its memory back once idle, on
    // the driver's timer: the driver must know to set it.
    let ring = w
        .conn
        .as_ref()
        .is_some_and(|c| c.ring_dirty_since().is_some());
    if end.closed() {
        // The driver stops watching it and kills it if it broke the protocol.
        fx.reader_ended.push((wid, end));
        *fx.wake_driver = true;
    } else if partial || ring || (busy && w.armed.is_none()) {
        // A frame half read has a stall deadline the driver keeps, a used ring a
        // release; a socket the kernel would not take back needs its next look.
        *fx.wake_driver = true;
    }
}

/// Where borrow tickets come from.
static TICKETS: AtomicU64 = AtomicU64::new(1);

/// A worker's socket lent to the caller waiting for the answer to one task, as the step
/// that lent it knows it: the worker's descriptors and page stay in its `WorkerIo`, shared
/// with the caller (a [`Borrow`]) only if it waits, not when it takes the answer in that
/// same step (see [`Fx::take_early_answer`]).
pub(crate) struct Lent {
    ticket: u64,
    wid: WorkerId,
    /// The task whose answer the caller waits for.
    id: u64,
    /// When to look at the answers the worker holds back, if the caller's may be among
    /// them one day (see [`look_held`]).
    look: Option<Instant>,
    /// The caller is nudged when the worker is sent another task (see `WorkerIo::nudge`).
    nudged: bool,
    /// If the worker keeps its progress page (see [`Borrow::answered`] and
    /// [`Borrow::posted`]): the count of its bell before the task was sent (see
    /// [`Borrow::sleep_on_bell`]).
    paged_bell: Option<u32>,
}

/// A worker's socket lent to the caller waiting for the answer to one task, with what the
/// caller waits on.
pub(crate) struct Borrow {
    lent: Lent,
    sock: Arc<OwnedFd>,
    exit: Arc<OwnedFd>,
    /// Readable once the worker is sent another task (see `WorkerIo::nudge`).
    nudge: Option<Arc<OwnedFd>>,
    /// The worker's progress page, if it keeps one.
    page: Option<Arc<pool_ipc::shm::Segment>>,
}

impl Borrow {
    /// Before the caller sleeps: takes back its word that it waits awake (see
    /// `page::ANSWER`); `true` if the worker answered in the page meanwhile (the answer is
    /// then the caller's to take, and it must not sleep: nothing more comes on the
    /// socket for it).
    fn posted(&self) -> bool {
        let Some(page) = &self.page else {
            return false;
        };
        let word = page.atomic_u64(protocol::page::ANSWER);
        match word.compare_exchange(
            self.lent.id | protocol::page::WAITING,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => false,
            Err(now) => now & protocol::page::POSTED != 0,
        }
    }

    /// Before the caller looks for the answer: if the worker has not yet taken the task
    /// it was handed through its page (its doorbell still says `RUNG`) and slept on this
    /// caller's CPU (`page::DOOR_CPU`), gives up the CPU once (`sched_yield`). On the CPU
    /// the caller and the worker share, the caller's wake of the worker does not always
    /// hand it the CPU at once; the worker then runs only once the caller sleeps, and the
    /// caller, awake, would take back its word that it waits (`posted`) and sleep in
    /// poll, the answer coming on the socket: a poll, a write and a read more than a wake
    /// and a wait. Yielding instead lets the worker run the task and leave the answer in
    /// the page first. A worker that runs it already, or that wakes on another CPU, is not
    /// yielded to.
    fn yield_to_worker(&self) {
        let Some(page) = &self.page else {
            return;
        };
        let rung = page
            .atomic_u32(protocol::page::DOOR)
            .load(Ordering::Relaxed)
            == protocol::page::RUNG;
        if rung
            && page
                .atomic_u64(protocol::page::DOOR_CPU)
                .load(Ordering::Relaxed)
                == rustix::thread::sched_getcpu() as u64 + 1
        {
            rustix::thread::sched_yield();
        }
    }

    /// Before the caller polls the socket: sleeps on the worker's bell (until `until`, for
    /// at most [`BELL_SLEEP`]) unless it rang since the task was sent. Meanwhile the
    /// worker's answer word still says that the caller waits, awake: the worker may post
    /// the answer to it. The worker rings after it posts the answer or writes to its
    /// channel, the pool when the worker is gone or is sent another task: the caller wakes
    /// to the answer in the page without the worker writing it, nor the caller polling and
    /// reading the socket. Anything else the poll would see (a socket closed by a task,
    /// say) waits for the sleep's end.
    fn sleep_on_bell(&self, until: Option<Instant>) {
        let (Some(page), Some(seen)) = (&self.page, self.lent.paged_bell) else {
            return;
        };
        let left = until.map_or(BELL_SLEEP, |u| {
            u.saturating_duration_since(Instant::now()).min(BELL_SLEEP)
        });
        // A failed wait (none expected on a mapped word) leaves the poll to wait.
        let _ = protocol::page::bell(page).wait_past(seen, left);
    }

    /// Whether the worker's answer to the caller's task is on its socket already, as its
    /// page says: it ended the task (neither skipped nor running it) with no answer held
    /// back (a held answer counts until it is written; the worker marks a task ended only
    /// once its answer is written or held). Then poll has nothing to wait for: the caller
    /// reads at once. On a CPU the caller and the worker share, the caller's write of the
    /// task wakes the worker, which runs before the caller goes on; the answer is then
    /// there as soon as the caller looks, and the poll was a system call of its own.
    fn answered(&self) -> bool {
        let Some(page) = &self.page else {
            return false;
        };
        // CURRENT first: a count of held answers loaded after it is the count once the
        // task ended, or a later one (reaching 0 only once they were written).
        let current = page
            .atomic_u64(protocol::page::CURRENT)
            .load(Ordering::Acquire);
        current == self.lent.id | protocol::page::ENDED
            && page
                .atomic_u64(protocol::page::HELD_COUNT)
                .load(Ordering::Acquire)
                == 0
    }
}

impl Fx<'_> {
    /// After the step that lent `b` wrote its task and rang its worker: takes the answer
    /// in this same step if the worker left it in its page already, and gives the socket
    /// back (`None` then); otherwise `Some(b)`, to wait on. On a CPU the caller shares with
    /// the worker, the ring hands the worker the CPU, and it has often run the task and
    /// posted its answer before the caller goes on: the answer costs no second step. As
    /// when the caller wakes to it (see [`Shared::await_answer`]), it is taken only with
    /// nothing on the socket before it and no message from the worker cut short: the
    /// rarer cases are left to the wait, which handles them.
    pub(crate) fn take_early_answer(
        &mut self,
        policy: &mut Policy<TaskRec>,
        b: Lent,
    ) -> Option<Borrow> {
        let posted = self.io.get(&b.wid).is_some_and(|w| {
            w.borrowed == Some(b.ticket)
                && w.conn.is_some()
                && !w.cut_short()
                && b.paged_bell.is_some()
                && w.progress.as_ref().is_some_and(|p| {
                    p.atomic_u64(protocol::page::ANSWER).load(Ordering::Acquire)
                        == b.id | protocol::page::POSTED
                })
                && w.sock_watch
                    .as_deref()
                    .is_some_and(|s| rustix::io::ioctl_fionread(s).is_ok_and(|n| n == 0))
        });
        if !posted {
            return self.hand_over(policy, b);
        }
        let seen = Seen {
            readable: false,
            before_post: false,
            posted: true,
            exited: false,
            look: false,
        };
        settle(policy, self, &b, None, seen);
        None
    }

    /// What the caller lent `b` waits on: the worker's descriptors and page, shared. `None`
    /// if the worker has none any more: the socket is given back then (the caller waits
    /// on the task's result instead).
    pub(crate) fn hand_over(&mut self, policy: &mut Policy<TaskRec>, b: Lent) -> Option<Borrow> {
        let shared = self.io.get(&b.wid).and_then(|w| {
            let (Some(sock), Some(exit)) = (&w.sock_watch, &w.exit_watch) else {
                return None;
            };
            Some((
                Arc::clone(sock),
                Arc::clone(exit),
                w.nudge.clone().filter(|_| b.nudged),
                w.progress.clone().filter(|_| b.paged_bell.is_some()),
            ))
        });
        let Some((sock, exit, nudge, page)) = shared else {
            let seen = Seen {
                readable: false,
                before_post: false,
                posted: false,
                exited: false,
                look: false,
            };
            settle(policy, self, &b, None, seen);
            return None;
        };
        Some(Borrow {
            lent: b,
            sock,
            exit,
            nudge,
            page,
        })
    }

    /// Lends the socket of the worker that runs task `id` next to the caller waiting for
    /// it, if the caller can finish alone: the worker is ready (or still setting up; its
    /// setup did not fail), `id` is the oldest task it
    /// holds, nothing half read waits on its socket, and nothing waits to be written to it
    /// (`unflushed_ok`: except what this step queued, which `Shared::act` writes before
    /// unlocking and gives the socket back if it cannot).
    pub(crate) fn lend(
        &mut self,
        policy: &Policy<TaskRec>,
        id: u64,
        unflushed_ok: bool,
    ) -> Option<Lent> {
        // The worker it was last sent to, if that worker is to run it next.
        let wid = policy.task(id).and_then(|rec| rec.sent_to)?;
        if policy.oldest(wid).map(|(t, _)| t) != Some(id) {
            return None;
        }
        let w = self.io.get_mut(&wid)?;
        let free = w.borrowed.is_none()
            && !w.ended
            && !w.exited
            && w.kill_at.is_none()
            && w.guard.may_answer()
            && !w.cut_short()
            && w.conn
                .as_ref()
                .is_some_and(|c| unflushed_ok || !c.wants_write());
        if !free {
            return None;
        }
        if w.sock_watch.is_none() || w.exit_watch.is_none() {
            return None;
        }
        // Its answer may be held back (see `look_held`), unless the worker keeps no page or
        // has been running it long enough to write it out when it ends. While it holds no
        // other task, it holds nothing back: the step that sends it another nudges the
        // caller, which then looks at its held answers every HELD_LOOK.
        // A worker not ready yet has not said whether it keeps its page: it may.
        let timed = policy.task(id).is_some_and(|rec| rec.timeout.is_some());
        let settled = w.guard.is_ready()
            && (!w.may_hold()
                || w.taken(id, timed).is_some_and(|ns| {
                    protocol::monotonic_ns().saturating_sub(ns) >= protocol::page::HOLD_AGE_NS
                }));
        let (look, nudged) = if settled {
            (None, false)
        } else if policy.holding(wid) < 2 && w.make_nudge() {
            (None, true)
        } else {
            (Some(Instant::now() + HELD_LOOK), false)
        };
        w.nudge_armed = nudged;
        let page = w.kept_page();
        let b = Lent {
            ticket: TICKETS.fetch_add(1, Ordering::Relaxed),
            wid,
            id,
            look,
            nudged,
            // Read before the task goes out (the step writes it after this).
            paged_bell: page.map(|p| protocol::page::bell(p).count()),
        };
        w.borrowed = Some(b.ticket);
        w.arm(self.epoll, wid, true);
        if w.armed.is_some() {
            // Still in the driver's set (the kernel refused): left to the driver.
            w.borrowed = None;
            return None;
        }
        // Until the caller sleeps, the worker may leave its answer in its page; not before
        // its `Ready` is read, which the answer must not overtake.
        if w.guard.is_ready() {
            w.await_in_page(id);
        }
        Some(b)
    }
}

impl Shared {
    /// For a caller blocked on task `id`'s result: borrows the socket of the worker running
    /// it and waits on it (see [`Shared::await_answer`]). `false` if it could not borrow it
    /// (wait on the result instead).
    pub(crate) fn read_own_answer(&self, id: u64, deadline: Option<Instant>) -> bool {
        match self.act(|p, fx| fx.lend(p, id, false).and_then(|b| fx.hand_over(p, b))) {
            Some(b) => self.await_answer(b, deadline),
            None => false,
        }
    }

    /// Waits (until `deadline`) on a borrowed socket for the worker to answer or die, reads
    /// what came and gives the socket back. `true` if it waited on the worker (the result
    /// may be in, or something else came first: call again); `false` once the deadline
    /// passed. A worker silent past the borrow's look has its held answers looked at.
    pub(crate) fn await_answer(&self, b: Borrow, deadline: Option<Instant>) -> bool {
        let nudge = b.nudge.as_deref().unwrap_or(&*b.sock);
        let mut fds = [
            PollFd::new(&*b.sock, PollFlags::IN),
            PollFd::new(&*b.exit, PollFlags::IN),
            PollFd::new(nudge, PollFlags::IN),
        ];
        let n = if b.nudge.is_some() { 3 } else { 2 };
        let until = match (deadline, b.lent.look) {
            (Some(d), Some(l)) => Some(d.min(l)),
            (d, l) => d.or(l),
        };
        // Answered in the page, or on the socket already: taken, or read, without polling.
        // A worker that has not run yet may first be let run (see `yield_to_worker`), or
        // waited for on its bell.
        b.yield_to_worker();
        b.sleep_on_bell(until);
        let timeout = until.map(|d| {
            let d = d.saturating_duration_since(Instant::now());
            rustix::time::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            }
        });
        let posted = b.posted();
        let answered = posted || b.answered();
        let woke = answered
            || match rustix::event::poll(&mut fds[..n], timeout.as_ref()) {
                Ok(n) => n > 0,
                // Interrupted: look, then call again.
                Err(_) => true,
            };
        let exited = !fds[1].revents().is_empty();
        // An answer in the page comes after all the worker wrote before it: bytes still on
        // the socket are read first (see `deliver_posted`).
        let before_post = posted && rustix::io::ioctl_fionread(&*b.sock).map_or(true, |n| n > 0);
        let readable =
            (answered && !posted) || before_post || !fds[0].revents().is_empty() || exited;
        if let Some(fd) = &b.nudge
            && !fds[2].revents().is_empty()
        {
            // Nudged: lent again, the socket comes with a look (`lend`).
            let _ = rustix::io::read(fd, &mut [0u8; 8]);
        }
        let look = !woke && b.lent.look.is_some_and(|l| Instant::now() >= l);
        let seen = Seen {
            readable,
            before_post,
            posted,
            exited,
            look,
        };
        self.act(|policy, fx| settle(policy, fx, &b.lent, Some(&b.sock), seen));
        woke || look
    }
}
