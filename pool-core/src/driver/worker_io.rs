//! One worker's I/O state: its channel, the frames waiting for it, and what it has begun.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rustix::event::epoll::{self, EventData, EventFlags};

use pool_ipc::{FrameBuf, FramedConn};
use pool_spawn::protocol::{FromWorker, PROGRESS_KEPT, page};
use pool_spawn::{ExitStatus, Worker};

use super::{Batch, Batches};
use crate::event::Pins;
use crate::ids::IdSet;
use crate::policy::TakenUp;

/// One worker's I/O state.
pub(super) struct WorkerIo {
    pub(super) name: Arc<str>,
    pub(super) pid: u32,
    pub(super) conn: Option<FramedConn>,
    /// Frames for a worker still starting (no channel yet), the events whose descriptors
    /// go with them, and whether each is a task.
    pub(super) backlog: Vec<(FrameBuf, Pins, bool)>,
    /// Where each task frame queued on `conn` ends in its stream, oldest first (entries
    /// already written are dropped as they are found): a task whose frame has not left
    /// entirely when the worker dies never reached it.
    pub(super) task_ends: VecDeque<u64>,
    /// The page where the worker counts the tasks it began (see `ToWorker::Setup`); shared
    /// with a caller that borrows the worker's socket (see `reader::Borrow`).
    pub(super) progress: Option<Arc<pool_ipc::shm::Segment>>,
    /// Answers (`Done` and `Skipped` messages) received from the worker.
    pub(super) results: u64,
    /// Results of the running task received in `Part`s, and which task that is.
    pub(super) parts: Vec<Batch>,
    pub(super) parts_task: u64,
    /// The room of the list a read takes the worker's frames into, kept between reads (a
    /// read can bring hundreds of small answers).
    pub(super) read_room: Vec<(Vec<u8>, Vec<std::os::fd::OwnedFd>)>,
    /// A `PartTail` whose tail frame has not been read yet: its task, its frame, where its
    /// head lies in it, and the length its tail must have.
    pub(super) tail_wait: Option<(u64, Vec<u8>, std::ops::Range<usize>, u64)>,
    /// Cancel marks to write once the page exists (the worker is still being launched).
    pub(super) pending_cancels: Vec<u64>,
    /// Tasks marked cancelled on the page that the worker has not passed yet (no answer
    /// and no `Skipped` from it): their slots are taken.
    pub(super) marked: IdSet,
    /// When to SIGKILL a worker stopped with SIGTERM.
    pub(super) kill_at: Option<Instant>,
    pub(super) handle: Option<Worker>,
    pub(super) status: Option<ExitStatus>,
    pub(super) kill_when_launched: bool,
    pub(super) exit_note: Option<String>,
    /// When this worker's last result arrived.
    pub(super) last_done: Option<Instant>,
    /// Answers read together, not yet told to the policy's pace: when the worker could
    /// begin the first of them, and how many there are (see `reader::tell_pace`).
    pub(super) unpaced: Option<(Instant, u32)>,
    /// What it may send next, and whether a frame from it is stuck partway.
    pub(super) guard: super::phase::Guard,
    /// The driver's duplicate of the worker's socket while it watches it: the fd registered
    /// in the driver's epoll set, lent to a caller reading its own answer (see `reader`).
    pub(super) sock_watch: Option<Arc<OwnedFd>>,
    /// The driver's duplicate of the worker's pidfd (for a caller reading its own answer).
    pub(super) exit_watch: Option<Arc<OwnedFd>>,
    /// What `sock_watch` is registered for in the driver's epoll set; `None`: not in it.
    pub(super) armed: Option<EventFlags>,
    /// The ticket of the caller reading the socket instead of the driver, if one does.
    pub(super) borrowed: Option<u64>,
    /// Its channel broke or reached its end: it is read no more.
    pub(super) ended: bool,
    /// Its process ended (a caller saw it, or the driver reaps it): no caller borrows its
    /// socket again.
    pub(super) exited: bool,
    /// When to look at the answers it holds back, if it may hold some (see
    /// `reader::look_held`).
    pub(super) look_at: Option<Instant>,
    /// Tasks whose answers were taken from its page while it lived, oldest first: it
    /// writes them out still, and they are passed over when they arrive (see
    /// [`WorkerIo::passes_over`]).
    pub(super) salvaged: VecDeque<u64>,
    /// An eventfd a caller that borrowed the socket also waits on (made at the first
    /// borrow that needs it): written when the worker is sent a second task meanwhile, as
    /// it may hold the caller's answer back from then on (see `reader::look_held`).
    pub(super) nudge: Option<Arc<OwnedFd>>,
    /// The caller that borrowed the socket waits on `nudge` (and has no look planned).
    pub(super) nudge_armed: bool,
}

impl WorkerIo {
    /// A worker about to be launched: no process, no channel yet.
    pub(super) fn new(name: String) -> Self {
        WorkerIo {
            name: name.into(),
            pid: 0,
            conn: None,
            backlog: Vec::new(),
            task_ends: VecDeque::new(),
            progress: None,
            results: 0,
            parts: Vec::new(),
            parts_task: 0,
            read_room: Vec::new(),
            tail_wait: None,
            pending_cancels: Vec::new(),
            marked: IdSet::default(),
            kill_at: None,
            handle: None,
            status: None,
            kill_when_launched: false,
            exit_note: None,
            last_done: None,
            unpaced: None,
            guard: Default::default(),
            sock_watch: None,
            exit_watch: None,
            armed: None,
            borrowed: None,
            ended: false,
            exited: false,
            look_at: None,
            salvaged: VecDeque::new(),
            nudge: None,
            nudge_armed: false,
        }
    }

    /// Brings the socket's registration in the driver's epoll set `ep` in line with the
    /// worker's state: read for (and, while frames wait, written to) while the driver
    /// watches it and no caller has borrowed it; out of the set otherwise (a borrowed
    /// socket is not even in the set: the set would still report its hang-up).
    pub(super) fn arm(&mut self, ep: &OwnedFd, wid: u64, busy: bool) {
        let want = match (&self.sock_watch, self.borrowed, self.ended) {
            (Some(_), None, false) => {
                let out = self.conn.as_ref().is_some_and(|c| c.wants_write());
                if out {
                    Some(EventFlags::IN | EventFlags::OUT)
                } else if busy || !self.guard.is_ready() || self.cut_short() {
                    Some(EventFlags::IN)
                } else {
                    None
                }
            }
            _ => None,
        };
        if want == self.armed {
            return;
        }
        let Some(fd) = &self.sock_watch else {
            self.armed = None;
            return;
        };
        let data = EventData::new_u64(sock_token(wid));
        // Failures leave `armed` as the kernel has it: the next look tries again.
        let ok = match (self.armed, want) {
            (None, Some(f)) => epoll::add(ep, fd, data, f).is_ok(),
            (Some(_), Some(f)) => epoll::modify(ep, fd, data, f).is_ok(),
            (Some(_), None) => epoll::delete(ep, fd).is_ok(),
            (None, None) => true,
        };
        if ok {
            self.armed = want;
        }
    }

    /// A message from the worker waits for the rest of it: part of a frame, or a large
    /// result's head (`PartTail`) for its tail frame.
    pub(super) fn cut_short(&self) -> bool {
        self.tail_wait.is_some() || self.conn.as_ref().is_some_and(|c| c.has_partial_frame())
    }

    /// The driver stops watching the socket (its channel ended): out of the set, and no
    /// caller may borrow it.
    pub(super) fn unwatch_sock(&mut self, ep: &OwnedFd, wid: u64) {
        self.ended = true;
        self.arm(ep, wid, false);
        if self.armed.is_none() {
            self.sock_watch = None;
        }
    }

    /// After a write to the worker's channel: stores in its page how much has been
    /// written, then wakes the worker if it sleeps on its doorbell (see `page::DOOR`: in
    /// this order, so that a worker going to sleep meanwhile either sees the bytes or is
    /// woken). A busy worker costs a load and a compare.
    pub(super) fn ring(&self) {
        let (Some(conn), Some(page)) = (&self.conn, &self.progress) else {
            return;
        };
        let sent = page.atomic_u64(page::SENT);
        let written = conn.bytes_written();
        // Only the pool stores it.
        if sent.load(Ordering::Relaxed) == written {
            return;
        }
        sent.store(written, Ordering::SeqCst);
        page::wake_sleeper(page.atomic_u32(page::DOOR));
    }

    /// Hands a task's `frame`, queued last on the channel and not written yet, to the
    /// worker through its page instead (see `page::DOOR`), if the worker is awake or
    /// asleep on its doorbell (not blocked reading its channel) and keeps its page, and
    /// the frame is all that is queued, carries no descriptors and fits the task area:
    /// `true` if so (the frame is taken off the channel and counts as delivered, as a
    /// written one does). The caller knows that the worker holds no other task.
    pub(super) fn hand_through_page(&mut self, frame: &FrameBuf) -> bool {
        let payload = frame.payload();
        if payload.len() > page::TASK_MAX || !self.guard.is_ready() {
            return false;
        }
        // Borrowed from its field (`conn` is borrowed beside it below), not shared.
        let Some(page) = kept(self.progress.as_ref()) else {
            return false;
        };
        let door = page.atomic_u32(page::DOOR);
        let mut before = door.load(Ordering::SeqCst);
        if before != page::AWAKE && before != page::SLEEPING {
            return false;
        }
        // Off the channel first (all that is queued must be this frame, unwritten, plain):
        // once the worker is rung, the frame must not reach it a second time.
        if !self
            .conn
            .as_mut()
            .is_some_and(|c| c.take_back_unwritten(payload))
        {
            return false;
        }
        // The worker reads the area only once it sees RUNG, stored after it (release); it
        // stored AWAKE or SLEEPING only once done with the area's last task.
        page.write_at(page::TASK_OFFSET, payload);
        page.atomic_u64(page::TASK_LEN)
            .store(payload.len() as u64, Ordering::Relaxed);
        loop {
            match door.compare_exchange(before, page::RUNG, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                // It went to sleep, or woke, meanwhile: ring again.
                Err(now) if now == page::AWAKE || now == page::SLEEPING => before = now,
                Err(_) => {
                    // It went to read its channel meanwhile: the frame goes there after
                    // all, queued again as it was.
                    if let Some(c) = self.conn.as_mut() {
                        c.queue_copy_with_fds(frame, Vec::new());
                    }
                    return false;
                }
            }
        }
        // Delivered: not a frame that may still be cut short on the channel.
        self.task_ends.pop_back();
        if before == page::SLEEPING {
            // A failure (none expected on a mapped word) leaves the worker to its wait's
            // end: it finds the task then.
            let _ = pool_ipc::shm::futex_wake(door, 1);
        }
        true
    }

    /// Records where the task frame just queued on `conn` ends.
    pub(super) fn note_task_queued(&mut self) {
        if let Some(conn) = &self.conn {
            let written = conn.bytes_written();
            while self.task_ends.front().is_some_and(|&e| e <= written) {
                self.task_ends.pop_front();
            }
            self.task_ends.push_back(conn.stream_end());
        }
    }

    /// The progress page, once the worker keeps it (it has not opened it until its setup,
    /// and a worker that cannot open it fails its setup).
    fn page(&self) -> Option<&pool_ipc::shm::Segment> {
        self.kept_page().map(|p| &**p)
    }

    /// [`WorkerIo::page`], to share.
    pub(super) fn kept_page(&self) -> Option<&Arc<pool_ipc::shm::Segment>> {
        kept(self.progress.as_ref())
    }

    /// Whether the worker keeps its progress page (it may then hold answers back).
    pub(super) fn keeps_page(&self) -> bool {
        self.page().is_some()
    }

    /// Whether the worker may hold answers back: it keeps its page, and workers hold
    /// answers at all (`protocol::HOLD_ANSWERS`). Looks at held answers, and a waiting
    /// caller's nudge, are for such a worker only.
    pub(super) fn may_hold(&self) -> bool {
        pool_spawn::protocol::HOLD_ANSWERS && self.keeps_page()
    }

    /// Makes the eventfd that nudges a caller waiting on this worker's socket (see
    /// `nudge`), if need be: `false` if it cannot be made.
    pub(super) fn make_nudge(&mut self) -> bool {
        if self.nudge.is_none() {
            let flags =
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
            self.nudge = rustix::event::eventfd(0, flags).ok().map(Arc::new);
        }
        self.nudge.is_some()
    }

    /// Wakes the caller waiting on this worker's socket without a look planned, if one
    /// does: the worker was sent another task.
    pub(super) fn nudge_caller(&mut self) {
        if self.nudge_armed && self.borrowed.is_some() {
            self.nudge_armed = false;
            if let Some(fd) = &self.nudge {
                let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
            }
            // It may sleep on the bell before it polls the eventfd.
            self.ring_bell();
        }
    }

    /// Rings the worker's bell (see `page::BELL`), for a caller that may sleep on it: the
    /// worker is gone, or the caller has something to look at.
    pub(super) fn ring_bell(&self) {
        if let Some(p) = self.page() {
            page::bell(p).ring();
        }
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.page().map(|p| p.atomic_u64(i))
    }

    /// How many tasks the worker began that no result of it counted for: `None` if it has
    /// no progress page. (Exact once the worker is gone and its held answers are counted.)
    pub(super) fn begun_unanswered(&self) -> Option<u64> {
        let begun = self.word(page::BEGUN)?.load(Ordering::Acquire);
        Some(begun.saturating_sub(self.results))
    }

    /// The task the worker runs now, as its page says: `None` if it runs none (it is
    /// between tasks), or has no page.
    pub(super) fn running(&self) -> Option<u64> {
        let current = self.word(page::CURRENT)?.load(Ordering::SeqCst);
        (current & page::ENDED == 0).then_some(current)
    }

    /// When (`CLOCK_MONOTONIC` ns) the worker began task `id` (its running item, for a
    /// timed task), if it is running it now; `None` if it is not (not begun, or ended), or
    /// has no page.
    pub(super) fn started(&self, id: u64) -> Option<u64> {
        (self.running()? == id).then(|| {
            self.word(page::STARTED_NS)
                .map_or(0, |w| w.load(Ordering::Acquire))
        })
    }

    /// When (`CLOCK_MONOTONIC` ns) the worker took up task `id` (sent `timed` or not), if
    /// it is running it now: that moment or a later one (never an earlier one: a task
    /// looks no older than it is).
    pub(super) fn taken(&self, id: u64, timed: bool) -> Option<u64> {
        if !timed {
            return self.started(id);
        }
        // CURRENT first: the word read after it is this task's (stored before it), or a
        // later one's.
        (self.running()? == id).then(|| {
            self.word(page::TAKEN_NS)
                .map_or(0, |w| w.load(Ordering::Acquire))
        })
    }

    /// Marks task `id` cancelled for the worker (it skips it unless it took it up), and
    /// says what the worker had taken up then.
    pub(super) fn mark_cancelled(&mut self, id: u64) -> TakenUp {
        // The page as made, kept by the worker or not yet: a worker opens its page before
        // it takes up any task, or fails its setup and runs none, so a mark made before it
        // opened the page is seen all the same. (Its CURRENT is zero until then, no task's
        // id.)
        let Some(page) = self.progress.as_deref() else {
            // Not launched yet: the mark is written with the page, before any task is sent.
            self.pending_cancels.push(id);
            return TakenUp::Nothing;
        };
        let Some(slot) = free_cancel_slot(page, &self.marked, id) else {
            return TakenUp::NoRoom;
        };
        self.marked.insert(id);
        // Store, then load: the worker stores CURRENT, then loads MARKED and the slots (see
        // `page`).
        page.atomic_u64(slot).store(id, Ordering::SeqCst);
        page.atomic_u64(page::MARKED).store(1, Ordering::SeqCst);
        let current = page.atomic_u64(page::CURRENT).load(Ordering::SeqCst);
        let last = current & !(page::ENDED | page::SKIPPED);
        if last == id && current & page::SKIPPED != 0 {
            // It saw the mark.
            return TakenUp::Nothing;
        }
        TakenUp::Task {
            id: last,
            ended: current & page::ENDED != 0,
        }
    }

    /// The worker has passed task `id` (answered or skipped it): a cancel mark it had is
    /// no longer needed.
    pub(super) fn passed(&mut self, id: u64) {
        if !self.marked.is_empty() {
            self.marked.remove(&id);
        }
    }

    /// Writes the cancel marks made before the page existed.
    pub(super) fn write_pending_cancels(&mut self) {
        let Some(page) = self.progress.as_ref() else {
            return;
        };
        for id in std::mem::take(&mut self.pending_cancels) {
            // A fresh page, so a slot is free unless the pool marked more tasks than a
            // worker can hold; the task is never sent then anyway (it ended cancelled).
            if let Some(slot) = free_cancel_slot(page, &self.marked, id) {
                page.atomic_u64(slot).store(id, Ordering::SeqCst);
                page.atomic_u64(page::MARKED).store(1, Ordering::SeqCst);
                self.marked.insert(id);
            }
        }
    }

    /// An answer arrived for a task the worker could begin at `began`; its time is told
    /// with the others read at the same moment ([`pace`](WorkerIo::pace)).
    pub(super) fn answered(&mut self, began: Instant) {
        self.unpaced = match self.unpaced {
            Some((first, n)) => Some((first.min(began), n.saturating_add(1))),
            None => Some((began, 1)),
        };
    }

    /// The time each answer read since the last call took, and how many there were: the
    /// time from when the worker could begin the first of them to `now`, shared among them
    /// (the answers of brief tasks arrive in batches, all but the first as if they took no
    /// time).
    pub(super) fn pace(&mut self, now: Instant) -> Option<(std::time::Duration, u32)> {
        let (first, n) = self.unpaced.take()?;
        Some((now.saturating_duration_since(first) / n.max(1), n))
    }

    /// The results of task `id` (the one the worker was running when it died) that survive
    /// it: those received in parts, then those on its page's result area. Returns how many
    /// items they cover. Read only once the worker is gone.
    pub(super) fn salvage(&mut self, id: u64) -> (u64, Batches) {
        let mut parts = Vec::new();
        let mut items = 0;
        if self.parts_task == id {
            parts = std::mem::take(&mut self.parts);
            items = parts.iter().map(|b| b.items).sum();
        }
        let mut last = None;
        if let Some((n, frame)) = self.page().and_then(|p| result_area(p, id, items))
            && n > 0
        {
            last = Some(Batch {
                range: 0..frame.len(),
                frame,
                items: n,
                tail: Vec::new(),
                fds: Vec::new(),
            });
            items += n;
        }
        (items, Batches::new(parts, last))
    }

    /// The answers the worker holds back (see `page::HELD_OFFSET`), oldest first: each may
    /// have reached the channel too, or not. `None` if the worker wrote over them while
    /// they were copied (a living worker that wrote them out meanwhile: look again).
    pub(super) fn held_answers(&self) -> Option<Vec<Vec<u8>>> {
        let mut answers = Vec::new();
        let Some(page) = self.page() else {
            return Some(answers);
        };
        if page.len() < page::HELD_OFFSET + page::HELD_LEN {
            return Some(answers);
        }
        let generation = page.atomic_u64(page::HELD_GEN).load(Ordering::Acquire);
        let count = page.atomic_u64(page::HELD_COUNT).load(Ordering::Acquire);
        if count == 0 {
            return Some(answers);
        }
        let bytes = page.atomic_u64(page::HELD_BYTES).load(Ordering::Acquire);
        // The worker is not trusted to stay in bounds.
        let bytes = usize::try_from(bytes).map_or(0, |b| b.min(page::HELD_LEN));
        let mut area = Vec::new();
        page.read_to_vec(page::HELD_OFFSET, bytes, &mut area);
        std::sync::atomic::fence(Ordering::Acquire);
        if page.atomic_u64(page::HELD_GEN).load(Ordering::Relaxed) != generation {
            return None;
        }
        let mut at = 0;
        for _ in 0..count {
            let Some(len) = area.get(at..at + 4) else {
                break;
            };
            let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(answer) = area.get(at + 4..).and_then(|rest| rest.get(..n)) else {
                break;
            };
            answers.push(answer.to_vec());
            at += 4 + n;
        }
        Some(answers)
    }

    /// Says in the page that a caller waits, awake, for the answer to task `id` (see
    /// `page::ANSWER`), unless an answer the worker left there is still to be taken.
    pub(super) fn await_in_page(&self, id: u64) {
        let Some(word) = self.word(page::ANSWER) else {
            return;
        };
        let current = word.load(Ordering::Acquire);
        if current & page::POSTED == 0 {
            // Only the worker changes the word meanwhile, and only from `WAITING`.
            let _ = word.compare_exchange(
                current,
                id | page::WAITING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// Takes back what [`WorkerIo::await_in_page`] said, if the worker has not answered
    /// in the page since.
    pub(super) fn stop_awaiting(&self) {
        if let Some(word) = self.word(page::ANSWER) {
            let current = word.load(Ordering::Acquire);
            if current & page::WAITING != 0 {
                let _ = word.compare_exchange(current, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// The answer the worker left in its page (see `page::ANSWER`), taken: its task, how
    /// many items' results it carries and their bytes (`None` if the area holds no such
    /// answer: the worker broke the protocol). `None` if there is none, or the worker took
    /// it back (it then writes it to its channel).
    pub(super) fn take_posted(&self) -> Option<(u64, u64, Option<Vec<u8>>)> {
        let page = self.page()?;
        let word = page.atomic_u64(page::ANSWER);
        let current = word.load(Ordering::Acquire);
        if current & page::POSTED == 0 {
            return None;
        }
        let id = current & !(page::POSTED | page::WAITING);
        // Copied before the swap: once the swap succeeds, the worker will not write the
        // area again before its next task, so what was copied is the answer.
        let (items, area) = match result_area(page, id, 0) {
            Some((items, area)) => (items, Some(area)),
            None => (
                page.atomic_u64(page::AREA_ITEMS).load(Ordering::Acquire),
                None,
            ),
        };
        word.compare_exchange(current, 0, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        Some((id, items, area))
    }

    /// Whether `msg`, just read from the worker's channel, is the copy of an answer already
    /// taken from its page (see `salvaged`): then it is passed over, not delivered again.
    ///
    /// Those copies come first among its results, in order. Another result means none is
    /// owed any more. A message about no task changes nothing: a worker's `Ready` may still
    /// be on its way when the answers it holds are taken from its page (it is sent its
    /// first tasks before it is ready, and runs them as soon as it is).
    pub(super) fn passes_over<B, E>(&mut self, msg: &Result<FromWorker<B>, E>) -> bool {
        let Some(&first) = self.salvaged.front() else {
            return false;
        };
        match msg {
            Ok(FromWorker::Done { id, .. }) if *id == first => {
                self.salvaged.pop_front();
                true
            }
            Ok(FromWorker::Ready { .. } | FromWorker::SetupFailed { .. }) => false,
            _ => {
                self.salvaged.clear();
                false
            }
        }
    }

    /// Task frames that have not entirely left for the worker (all of them while it has no
    /// channel yet).
    pub(super) fn undelivered_tasks(&self) -> usize {
        let queued = self
            .backlog
            .iter()
            .filter(|(_, _, is_task)| *is_task)
            .count();
        match &self.conn {
            Some(conn) => {
                let written = conn.bytes_written();
                queued + self.task_ends.iter().filter(|&&e| e > written).count()
            }
            None => queued,
        }
    }
}

/// A worker's progress page, once the worker keeps it (see [`WorkerIo::kept_page`]).
fn kept(progress: Option<&Arc<pool_ipc::shm::Segment>>) -> Option<&Arc<pool_ipc::shm::Segment>> {
    let page = progress?;
    (page.atomic_u64(page::KEPT).load(Ordering::Acquire) == PROGRESS_KEPT).then_some(page)
}

/// The epoll token of worker `wid`'s socket.
pub(super) fn sock_token(wid: u64) -> u64 {
    wid << 1
}

/// The epoll token of worker `wid`'s pidfd.
pub(super) fn exit_token(wid: u64) -> u64 {
    (wid << 1) | 1
}

/// The epoll token of the driver's wake-up eventfd (no worker's: ids stay far below).
pub(super) const WAKE_TOKEN: u64 = u64::MAX;

/// A slot of `page` for task `id`'s cancel mark: one of its slots that is empty, holds
/// its mark already, or holds the mark of a task not in `marked` (the worker passed it).
fn free_cancel_slot(page: &pool_ipc::shm::Segment, marked: &IdSet, id: u64) -> Option<usize> {
    (0..page::CANCEL_PROBES)
        .map(|k| page::cancel_slot(id, k))
        .find(|&slot| {
            let held = page.atomic_u64(slot).load(Ordering::Acquire);
            held == 0 || held == id || !marked.contains(&held)
        })
}

/// The results of task `id` in `page`'s result area, if it holds them from item `base`
/// on: how many items, and their bytes. The worker is not trusted to stay in bounds: an
/// area that claims more bytes than it has holds nothing.
fn result_area(page: &pool_ipc::shm::Segment, id: u64, base: u64) -> Option<(u64, Vec<u8>)> {
    if page.atomic_u64(page::AREA_TASK).load(Ordering::Acquire) != id
        || page.atomic_u64(page::AREA_BASE).load(Ordering::Acquire) != base
    {
        return None;
    }
    let items = page.atomic_u64(page::AREA_ITEMS).load(Ordering::Acquire);
    let bytes = page.atomic_u64(page::AREA_BYTES).load(Ordering::Acquire);
    let room = page
        .len()
        .min(page::HELD_OFFSET)
        .saturating_sub(page::AREA_OFFSET);
    let bytes = usize::try_from(bytes).ok().filter(|&b| b <= room)?;
    let mut area = super::spare::take(bytes);
    page.read_to_vec(page::AREA_OFFSET, bytes, &mut area);
    Some((items, area))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: u64) -> Result<FromWorker<()>, ()> {
        Ok(FromWorker::Done {
            id,
            items: 1,
            outcome: Ok(()),
        })
    }

    #[test]
    fn answers_taken_from_the_page_are_passed_over_once_even_after_a_late_ready() {
        let mut w = WorkerIo::new("w".into());
        // Tasks 5 and 6 were delivered from the page before the worker's `Ready` was read.
        w.salvaged.extend([5, 6]);
        assert!(!w.passes_over::<(), ()>(&Ok(FromWorker::Ready { pid: 1 })));
        assert!(w.passes_over(&done(5)));
        assert!(w.passes_over(&done(6)));
        // Task 7's answer is new: delivered.
        assert!(!w.passes_over(&done(7)));
    }

    #[test]
    fn answers_read_together_share_the_time_since_the_first_could_begin() {
        let mut w = WorkerIo::new("w".into());
        let t0 = Instant::now();
        assert_eq!(w.pace(t0), None);
        // Four answers in one read: the first task could begin at t0, the others once the
        // one before them ended (seen as the moment of this read).
        let now = t0 + std::time::Duration::from_micros(40);
        w.answered(t0);
        for _ in 0..3 {
            w.answered(now);
        }
        assert_eq!(w.pace(now), Some((std::time::Duration::from_micros(10), 4)));
        assert_eq!(w.pace(now), None, "told once");
    }

    #[test]
    fn a_cancel_mark_takes_a_slot_no_mark_the_worker_still_needs_holds() {
        let mut w = WorkerIo::new("w".into());
        let page = pool_ipc::shm::Segment::create_sparse("procpool-test-page", page::LEN).unwrap();
        page.atomic_u64(page::KEPT)
            .store(PROGRESS_KEPT, Ordering::SeqCst);
        w.progress = Some(Arc::new(page));
        // Ids that share their slots: as many marks as slots to probe fit; one more does
        // not, until the worker passes a marked task.
        let slots = page::CANCEL_SLOTS as u64;
        let ids: Vec<u64> = (0..=page::CANCEL_PROBES as u64)
            .map(|k| 10 + k * slots)
            .collect();
        for &id in &ids[..page::CANCEL_PROBES] {
            assert_ne!(w.mark_cancelled(id), TakenUp::NoRoom, "{id}");
        }
        let last = ids[page::CANCEL_PROBES];
        assert_eq!(w.mark_cancelled(last), TakenUp::NoRoom);
        w.passed(ids[1]);
        assert_ne!(w.mark_cancelled(last), TakenUp::NoRoom);
        // Every mark the worker still needs is where it looks for it.
        let seen = |id: u64| {
            let page = w.page().unwrap();
            (0..page::CANCEL_PROBES).any(|k| {
                page.atomic_u64(page::cancel_slot(id, k))
                    .load(Ordering::SeqCst)
                    == id
            })
        };
        for &id in ids.iter().filter(|&&id| id != ids[1]) {
            assert!(seen(id), "{id}");
        }
    }

    #[test]
    fn a_mark_made_before_the_worker_opened_its_page_waits_there_for_it() {
        // Launched, its setup not read yet (a loaded machine): the page is not kept yet,
        // and the worker, which opens it before any task, must find the mark.
        let mut w = WorkerIo::new("w".into());
        let page = pool_ipc::shm::Segment::create_sparse("procpool-test-page", page::LEN).unwrap();
        w.progress = Some(Arc::new(page));
        assert!(w.page().is_none(), "not kept yet");
        assert_eq!(
            w.mark_cancelled(7),
            TakenUp::Task {
                id: 0,
                ended: false
            },
            "nothing taken up"
        );
        let page = w.progress.as_deref().unwrap();
        assert_ne!(page.atomic_u64(page::MARKED).load(Ordering::SeqCst), 0);
        assert!((0..page::CANCEL_PROBES).any(|k| {
            page.atomic_u64(page::cancel_slot(7, k))
                .load(Ordering::SeqCst)
                == 7
        }));
    }

    #[test]
    fn another_result_first_means_no_copy_is_owed() {
        let mut w = WorkerIo::new("w".into());
        w.salvaged.extend([5]);
        let skipped: Result<FromWorker<()>, ()> = Ok(FromWorker::Skipped { id: 8 });
        assert!(!w.passes_over(&skipped));
        assert!(!w.passes_over(&done(5)), "nothing is passed over any more");
    }

    /// A worker with a page it keeps, and the page.
    fn keeping() -> WorkerIo {
        let mut w = WorkerIo::new("w".into());
        let page = pool_ipc::shm::Segment::create_sparse("procpool-test-page", page::LEN).unwrap();
        page.atomic_u64(page::KEPT)
            .store(PROGRESS_KEPT, Ordering::SeqCst);
        w.progress = Some(Arc::new(page));
        w
    }

    /// What a worker does to leave task `id`'s `results` (`items` of them) in its page:
    /// `true` if a caller waited for them.
    fn post(w: &WorkerIo, id: u64, items: u64, results: &[u8]) -> bool {
        let page = w.page().unwrap();
        page.atomic_u64(page::AREA_TASK).store(id, Ordering::SeqCst);
        page.atomic_u64(page::AREA_BASE).store(0, Ordering::SeqCst);
        page.write_at(page::AREA_OFFSET, results);
        page.atomic_u64(page::AREA_BYTES)
            .store(results.len() as u64, Ordering::SeqCst);
        page.atomic_u64(page::AREA_ITEMS)
            .store(items, Ordering::SeqCst);
        page.atomic_u64(page::ANSWER)
            .compare_exchange(
                id | page::WAITING,
                id | page::POSTED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    #[test]
    fn a_task_goes_through_the_page_only_while_its_worker_does_not_read_its_channel() {
        let mut w = keeping();
        assert!(w.guard.admit(&FromWorker::<()>::Ready { pid: 1 }).is_ok());
        let (ours, _theirs) = pool_ipc::socketpair().unwrap();
        w.conn = Some(FramedConn::new(ours, pool_ipc::Config::default()).unwrap());
        let page = Arc::clone(w.progress.as_ref().unwrap());
        let door = page.atomic_u32(page::DOOR);
        let mut frame = FrameBuf::new();
        frame.extend_from_slice(b"a task");
        let queue = |w: &mut WorkerIo| {
            w.conn
                .as_mut()
                .unwrap()
                .queue_copy_with_fds(&frame, Vec::new());
            w.note_task_queued();
        };
        // Reading its channel: the frame stays queued for it.
        door.store(page::RECEIVING, Ordering::SeqCst);
        queue(&mut w);
        assert!(!w.hand_through_page(&frame));
        assert_eq!(w.undelivered_tasks(), 1);
        assert!(matches!(w.conn.as_mut().unwrap().flush(), Ok(true)));
        assert_eq!(w.undelivered_tasks(), 0);
        // Written: the page says how much.
        w.ring();
        let written = w.conn.as_ref().unwrap().bytes_written();
        assert_eq!(page.atomic_u64(page::SENT).load(Ordering::SeqCst), written);
        assert_eq!(door.load(Ordering::SeqCst), page::RECEIVING);
        // Asleep on its doorbell: through the page, off the channel, delivered.
        door.store(page::SLEEPING, Ordering::SeqCst);
        queue(&mut w);
        assert!(w.hand_through_page(&frame));
        assert_eq!(door.load(Ordering::SeqCst), page::RUNG);
        assert_eq!(page.atomic_u64(page::TASK_LEN).load(Ordering::SeqCst), 6);
        let mut area = Vec::new();
        page.read_to_vec(page::TASK_OFFSET, 6, &mut area);
        assert_eq!(area, b"a task");
        assert!(!w.conn.as_ref().unwrap().wants_write());
        assert_eq!(w.undelivered_tasks(), 0);
        assert_eq!(w.conn.as_ref().unwrap().bytes_written(), written);
        // Something else queued before it: the channel.
        door.store(page::AWAKE, Ordering::SeqCst);
        queue(&mut w);
        queue(&mut w);
        assert!(!w.hand_through_page(&frame));
        assert_eq!(door.load(Ordering::SeqCst), page::AWAKE);
        assert_eq!(w.undelivered_tasks(), 2);
        // A write to a worker asleep on its doorbell wakes it.
        door.store(page::SLEEPING, Ordering::SeqCst);
        assert!(matches!(w.conn.as_mut().unwrap().flush(), Ok(true)));
        w.ring();
        assert_eq!(door.load(Ordering::SeqCst), page::AWAKE);
        assert_eq!(
            page.atomic_u64(page::SENT).load(Ordering::SeqCst),
            w.conn.as_ref().unwrap().bytes_written()
        );
    }

    #[test]
    fn an_answer_left_in_the_page_is_taken_once_and_only_while_a_caller_waits_for_it() {
        let w = keeping();
        // Nobody waits: the worker writes its answer to its channel.
        assert!(!post(&w, 5, 1, b"\x07"));
        assert_eq!(w.take_posted(), None);
        // A caller waits, then sleeps: the same.
        w.await_in_page(5);
        w.stop_awaiting();
        assert!(!post(&w, 5, 1, b"\x07"));
        // A caller waits, awake: the answer is its to take, once.
        w.await_in_page(6);
        assert!(post(&w, 6, 2, b"\x01\x02"));
        // A later wait does not write over an answer not taken yet.
        w.await_in_page(7);
        w.stop_awaiting();
        assert_eq!(w.take_posted(), Some((6, 2, Some(b"\x01\x02".to_vec()))));
        assert_eq!(w.take_posted(), None);
        // Taken back by the worker first (it writes it to its channel): not taken here.
        w.await_in_page(8);
        assert!(post(&w, 8, 1, b"\x03"));
        let word = w.page().unwrap().atomic_u64(page::ANSWER);
        word.compare_exchange(8 | page::POSTED, 0, Ordering::SeqCst, Ordering::SeqCst)
            .unwrap();
        assert_eq!(w.take_posted(), None);
    }

    #[test]
    fn an_answer_left_in_the_page_without_its_results_is_a_broken_protocol() {
        let w = keeping();
        w.await_in_page(9);
        assert!(post(&w, 9, 1, b"\x03"));
        // The area holds another task's results.
        let page = w.page().unwrap();
        page.atomic_u64(page::AREA_TASK).store(4, Ordering::SeqCst);
        assert_eq!(w.take_posted(), Some((9, 1, None)));
        // Or says it fills more than the area.
        w.await_in_page(10);
        assert!(post(&w, 10, 1, b"\x03"));
        page.atomic_u64(page::AREA_BYTES)
            .store(u64::MAX, Ordering::SeqCst);
        assert_eq!(w.take_posted(), Some((10, 1, None)));
        assert_eq!(w.take_posted(), None);
    }
}
