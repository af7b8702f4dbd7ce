//! The driver thread's loop: poll every worker socket, pidfd and the wake-up eventfd; read
//! results, flush, reap, and enforce the kill deadlines.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_spawn::protocol::{self, FromWorker};
use pool_spawn::{Launcher, Signal};
use rustix::event::{PollFd, PollFlags};

use super::launch::WatchFds;
use super::phase::{kill_stalled, stall_deadline};
use super::shared::{Inner, Shared, note_started};
use super::{Batch, Delivery, Outcome};
use crate::policy::{Departure, Effects, Exit, WorkerId};

/// How long a worker that closed its channel may take to exit before it is killed.
const EOF_GRACE: Duration = Duration::from_secs(2);

/// How long the ring that carries large arguments to a worker may sit unused before its
/// memory is given back.
const RING_IDLE: Duration = Duration::from_secs(1);

/// Gives back the memory of the rings to workers that have sat unused for [`RING_IDLE`]
/// (up to 256 MiB each after large payloads); returns when the next one is due for a look.
fn release_idle_rings(g: &mut Inner, now: Instant) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    for io in g.io.values_mut() {
        let Some(conn) = io.conn.as_mut() else {
            continue;
        };
        let Some(mut since) = conn.ring_dirty_since() else {
            continue;
        };
        if now >= since + RING_IDLE {
            if conn.release_idle_ring() {
                continue;
            }
            match conn.ring_dirty_since() {
                Some(t) => since = t,
                None => continue,
            }
        }
        let due = since + RING_IDLE;
        next = Some(next.map_or(due, |n| n.min(due)));
    }
    next
}

/// What the driver polls for one worker (its own duplicates of the fds).
struct Watch {
    wid: WorkerId,
    sock: Option<OwnedFd>,
    exit: Option<OwnedFd>,
    eof_at: Option<Instant>,
}

/// The driver thread's state.
pub(crate) struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) launcher: Launcher,
    watches: Vec<Watch>,
    /// When the timers next need a look (a task's time limit, a stopped worker's SIGKILL).
    next_timer: Option<Instant>,
}

impl Driver {
    pub(crate) fn new(shared: Arc<Shared>, launcher: Launcher) -> Self {
        Driver {
            shared,
            launcher,
            watches: Vec::new(),
            next_timer: None,
        }
    }

    /// Registers a worker started before the driver thread ran.
    pub(crate) fn watch(&mut self, wid: WorkerId, fds: WatchFds) {
        self.watches.push(Watch {
            wid,
            sock: Some(fds.sock),
            exit: fds.exit,
            eof_at: None,
        });
    }

    /// Runs until the pool is finished: closed or terminated, every task done, every worker
    /// reaped. Then stops the launcher (and its fork server).
    pub(crate) fn run(mut self) {
        let mut buf = [0u8; 8];
        loop {
            self.launch_pending();
            let (want_write, deadline, finished, ring_check, stall, wakeup) = {
                let mut g = self.shared.lock();
                let ring_check = release_idle_rings(&mut g, Instant::now());
                let want: Vec<bool> = self
                    .watches
                    .iter()
                    .map(|w| {
                        g.io.get(&w.wid)
                            .and_then(|io| io.conn.as_ref())
                            .is_some_and(|c| c.wants_write())
                    })
                    .collect();
                (
                    want,
                    g.term_deadline,
                    g.policy.is_finished() && g.launches.is_empty(),
                    ring_check,
                    stall_deadline(&g),
                    g.policy.wakeup(),
                )
            };
            if finished {
                break;
            }
            let now = Instant::now();
            let mut timeout: Option<Duration> = None;
            let mut consider = |t: Instant| {
                let d = t.saturating_duration_since(now);
                timeout = Some(timeout.map_or(d, |x: Duration| x.min(d)));
            };
            if let Some(d) = deadline {
                consider(d);
            }
            if let Some(t) = self.next_timer {
                consider(t);
            }
            if let Some(t) = ring_check {
                consider(t);
            }
            for w in &self.watches {
                if let Some(t) = w.eof_at {
                    consider(t + EOF_GRACE);
                }
            }
            if let Some(t) = stall {
                consider(t);
            }
            if let Some(t) = wakeup {
                consider(t);
            }
            let ready = {
                let mut fds = Vec::with_capacity(self.watches.len() * 2 + 1);
                fds.push(PollFd::new(&self.shared.wake, PollFlags::IN));
                for (w, &ww) in self.watches.iter().zip(&want_write) {
                    if let Some(s) = &w.sock {
                        let mut fl = PollFlags::IN;
                        if ww {
                            fl |= PollFlags::OUT;
                        }
                        fds.push(PollFd::new(s, fl));
                    }
                    if let Some(e) = &w.exit {
                        fds.push(PollFd::new(e, PollFlags::IN));
                    }
                }
                let ts = timeout.map(|d| rustix::time::Timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: i64::from(d.subsec_nanos()),
                });
                match rustix::event::poll(&mut fds, ts.as_ref()) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "poll failed in the pool driver");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
                // Map revents back to (watch index, socket events, exit ready).
                let mut out = Vec::new();
                let mut i = 1;
                for (idx, w) in self.watches.iter().enumerate() {
                    let mut sock_ev = PollFlags::empty();
                    let mut exited = false;
                    if w.sock.is_some() {
                        sock_ev = fds[i].revents();
                        i += 1;
                    }
                    if w.exit.is_some() {
                        exited = !fds[i].revents().is_empty();
                        i += 1;
                    }
                    if !sock_ev.is_empty() || exited {
                        out.push((idx, sock_ev, exited));
                    }
                }
                if !fds[0].revents().is_empty() {
                    let _ = rustix::io::read(&self.shared.wake, &mut buf);
                }
                out
            };
            for (idx, ev, exited) in ready {
                if ev.intersects(PollFlags::OUT) {
                    self.flush(idx);
                }
                if ev.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                    self.read(idx);
                }
                if exited {
                    self.reap(idx);
                }
            }
            self.timers();
            self.watches
                .retain(|w| w.sock.is_some() || w.exit.is_some());
        }
        let _ = self.launcher.shutdown();
    }

    fn flush(&mut self, idx: usize) {
        let wid = self.watches[idx].wid;
        let mut g = self.shared.lock();
        if let Some(conn) = g.io.get_mut(&wid).and_then(|w| w.conn.as_mut()) {
            let _ = conn.flush();
        }
    }

    /// Reads what the worker sent; handles every complete message.
    fn read(&mut self, idx: usize) {
        let wid = self.watches[idx].wid;
        let mut broken = false;
        let mut eof = false;
        let shared = Arc::clone(&self.shared);
        shared.act(|policy, fx| {
            let Some(w) = fx.io.get_mut(&wid) else { return };
            let (name, pid) = (w.name.clone(), w.pid);
            let Some(conn) = w.conn.as_mut() else { return };
            super::spare::hand_to(conn);
            if let Err(e) = conn.fill() {
                tracing::warn!(worker = %name, error = %e, "worker channel failed");
                broken = true;
            }
            let mut msgs = Vec::new();
            loop {
                match conn.next_frame() {
                    Ok(Some(bytes)) => msgs.push(bytes),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(worker = %name, error = %e, "bad frame from worker");
                        w.exit_note
                            .get_or_insert_with(|| format!("its channel failed: {e}"));
                        broken = true;
                        break;
                    }
                }
            }
            eof = conn.is_eof();
            w.guard.after_read(conn.has_partial_frame(), Instant::now());
            for frame in msgs {
                // Decoded in place: a result's bytes stay where they are in the frame.
                let msg = protocol::decode_reply(&frame);
                if let Ok(m) = &msg
                    && super::phase::out_of_phase(fx.io.get_mut(&wid), m)
                {
                    broken = true;
                    break;
                }
                match msg {
                    Ok(FromWorker::Ready { .. }) => {
                        tracing::debug!(worker = %name, pid, "worker ready");
                        policy.ready(wid, fx);
                        note_started(policy, fx.io, wid, Instant::now());
                    }
                    Ok(FromWorker::SetupFailed { message, .. }) => {
                        tracing::warn!(worker = %name, %message, "worker setup failed");
                        policy.setup_failed(wid, &message, fx);
                    }
                    Ok(FromWorker::Part { id, items, results }) => {
                        let running = policy.oldest(wid).map(|(t, _)| t);
                        let Some(w) = fx.io.get_mut(&wid) else { continue };
                        if running != Some(id) {
                            w.exit_note = Some(format!(
                                "it sent results for task {id}, which it was not running"
                            ));
                            broken = true;
                            break;
                        }
                        if w.parts_task != id {
                            w.parts.clear();
                            w.parts_task = id;
                        }
                        w.parts.push(Batch {
                            frame,
                            range: results,
                            items,
                        });
                    }
                    Ok(FromWorker::Skipped { id }) => {
                        // Only a task that was cancelled (its record is gone) may be
                        // skipped, and only the one it holds first: a forged Skipped for a
                        // live task left that task without an outcome for ever.
                        let oldest = policy.oldest(wid).map(|(t, rec)| (t, rec.is_some()));
                        let Some(w) = fx.io.get_mut(&wid) else { continue };
                        if oldest != Some((id, false)) {
                            w.exit_note = Some(format!(
                                "it said it skipped task {id}, which it was not asked to skip"
                            ));
                            broken = true;
                            break;
                        }
                        w.results += 1;
                        // The task was cancelled before it began: only its place is freed.
                        let _ = policy.done(wid, id, fx);
                        note_started(policy, fx.io, wid, Instant::now());
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
                        // A worker runs its tasks in the order sent: a result for another
                        // than the first it holds is forged (it would be delivered as that
                        // task's, a task still queued behind the running one).
                        let oldest = policy.oldest(wid).map(|(t, _)| t);
                        let Some(w) = fx.io.get_mut(&wid) else { continue };
                        if oldest != Some(id) {
                            w.exit_note = Some(format!(
                                "it sent a result for task {id}, which it was not running"
                            ));
                            broken = true;
                            break;
                        }
                        w.results += 1;
                        let mut batches = Vec::new();
                        if w.parts_task == id {
                            batches = std::mem::take(&mut w.parts);
                        }
                        if let Some(rec) = policy.done(wid, id, fx) {
                            rec.group.remove(id);
                            // The worker could start this task once it was sent and its
                            // previous one was done: the time since is what it took.
                            let now = Instant::now();
                            if let Some(w) = fx.io.get_mut(&wid) {
                                let began = match (rec.sent_at, w.last_done) {
                                    (Some(s), Some(l)) => Some(s.max(l)),
                                    (s, l) => s.or(l),
                                };
                                w.last_done = Some(now);
                                if let Some(b) = began {
                                    policy.observe(now.saturating_duration_since(b), fx);
                                }
                                let start = rec.started_at.or(began).unwrap_or(now);
                                fx.timings.record(
                                    &rec.span,
                                    start.saturating_duration_since(rec.queued_at),
                                    now.saturating_duration_since(start),
                                );
                            }
                            let result = outcome.map(|range| {
                                batches.push(Batch { frame, range, items });
                                batches
                            });
                            fx.done.push(Delivery::all(
                                &rec,
                                Outcome::Done {
                                    result,
                                    worker: name.clone(),
                                    pid,
                                },
                            ));
                        }
                        note_started(policy, fx.io, wid, Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(worker = %name, error = %e, "undecodable message from worker");
                        broken = true;
                    }
                }
            }
            if broken || eof {
                // Dying or dead: no more tasks for it, and its replacement starts now.
                policy.channel_closed(wid, fx);
            }
        });
        let w = &mut self.watches[idx];
        if broken || eof {
            // Stop polling the socket (it stays readable at EOF); wait for the exit.
            w.sock = None;
            w.eof_at = Some(Instant::now());
            if broken {
                let g = self.shared.lock();
                if let Some(h) = g.io.get(&wid).and_then(|w| w.handle.as_ref()) {
                    let _ = h.signal_group(Signal::KILL);
                }
            }
            if w.exit.is_none() {
                self.reap(idx);
            }
        }
    }

    /// The worker's process ended: deliver its last results, reap it, tell the policy.
    fn reap(&mut self, idx: usize) {
        if self.watches[idx].sock.is_some() {
            self.read(idx);
        }
        let wid = self.watches[idx].wid;
        let handle = {
            let mut g = self.shared.lock();
            g.io.get_mut(&wid).and_then(|w| w.handle.take())
        };
        // Why the status could not be read, when it could not (the fork server that would
        // report it is gone, say): said in the tasks' errors instead of "status unknown".
        let mut lost_status = None;
        let status = handle.and_then(|mut h| match h.wait_timeout(Duration::from_secs(2)) {
            Ok(Some(s)) => Some(s),
            first => {
                let _ = h.signal_group(Signal::KILL);
                match h.wait_timeout(Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(e) => {
                        lost_status = Some(match first {
                            Err(first) => first.to_string(),
                            _ => e.to_string(),
                        });
                        None
                    }
                }
            }
        });
        self.shared.act(|p, fx| {
            let (mut undelivered, mut running) = (0, None);
            if let Some(w) = fx.io.get_mut(&wid) {
                w.status = status;
                if let Some(why) = lost_status {
                    w.exit_note
                        .get_or_insert_with(|| format!("its exit status is unknown: {why}"));
                }
                undelivered = w.undelivered_tasks();
                running = w.was_running();
            }
            let how = p.exited_with(wid, Exit::Ended, undelivered, running, fx);
            if let Some(w) = fx.io.remove(&wid) {
                departed(&w.name, w.pid, status, how);
            }
        });
        let w = &mut self.watches[idx];
        w.sock = None;
        w.exit = None;
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let mut g = self.shared.lock();
        kill_stalled(&mut g, now);
        if g.policy.wakeup().is_some_and(|t| t <= now) {
            // A start the policy held back is due: a step gives it the time.
            drop(g);
            self.shared.act(|_, _| {});
            g = self.shared.lock();
        }
        let mut next: Option<Instant> = None;
        if g.term_deadline.is_some_and(|d| now >= d) {
            g.term_deadline = None;
            for w in g.io.values() {
                if let Some(h) = &w.handle {
                    let _ = h.signal_group(Signal::KILL);
                }
            }
        }
        // Workers stopped with SIGTERM that are still there after their grace.
        for w in g.io.values_mut() {
            if let Some(t) = w.kill_at {
                if now >= t {
                    w.kill_at = None;
                    if let Some(h) = &w.handle {
                        let _ = h.signal_group(Signal::KILL);
                    }
                } else {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        // Under the same lock as the look at the clocks: a task sent after it sees when the
        // driver looks next, and wakes it if that is too late.
        let expire = if self
            .shared
            .timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            clocks(&g, now, &mut next)
        } else {
            Vec::new()
        };
        g.timer_at = next;
        drop(g);
        if !expire.is_empty() {
            self.shared.act(|p, fx| {
                for (wid, id) in expire {
                    p.time_out(wid, id, fx);
                }
            });
        }
        self.next_timer = next;
        for idx in 0..self.watches.len() {
            if self.watches[idx]
                .eof_at
                .is_some_and(|t| now >= t + EOF_GRACE)
            {
                let wid = self.watches[idx].wid;
                {
                    let g = self.shared.lock();
                    if let Some(h) = g.io.get(&wid).and_then(|w| w.handle.as_ref()) {
                        let _ = h.signal_group(Signal::KILL);
                    }
                }
                self.watches[idx].eof_at = None;
                if self.watches[idx].exit.is_none() {
                    self.reap(idx);
                }
            }
        }
    }
}

/// Tells how worker `name` left.
fn departed(name: &str, pid: u32, status: Option<pool_spawn::ExitStatus>, how: Option<Departure>) {
    let status = status.map(tracing::field::display);
    match how {
        Some(Departure::Recycled(why)) => {
            tracing::debug!(worker = %name, pid, reason = why.as_str(), status, "worker recycled");
        }
        Some(Departure::Died) => {
            tracing::warn!(worker = %name, pid, status, "worker died");
        }
        Some(Departure::Stopped) => {
            tracing::debug!(worker = %name, pid, status, "worker stopped");
        }
        Some(Departure::StartFailed) => {
            tracing::warn!(worker = %name, pid, status, "worker failed to start");
        }
        Some(Departure::Terminated) | None => {
            tracing::debug!(worker = %name, pid, status, "worker terminated");
        }
    }
}

/// The running tasks past their time limit, as (worker, task); `next` becomes the
/// earliest moment another may be. A task's clock starts when it (its running item, for
/// a chunk) begins in its worker, which the worker's progress page tells. A task that
/// has not begun cannot run out of time before its limit from now, so it is looked at
/// again then; by that time it has begun, or it is looked at again later.
fn clocks(g: &Inner, now: Instant, next: &mut Option<Instant>) -> Vec<(WorkerId, u64)> {
    let now_ns = protocol::monotonic_ns();
    let mut expire = Vec::new();
    let mut wake = |t: Instant| *next = Some(next.map_or(t, |n| n.min(t)));
    for (&wid, w) in &g.io {
        if w.handle.is_none() || w.kill_at.is_some() {
            continue;
        }
        let Some((id, Some(rec))) = g.policy.oldest(wid) else {
            continue;
        };
        let Some(limit) = rec.timeout else { continue };
        match w.started(id) {
            Some(start) => {
                let ran = Duration::from_nanos(now_ns.saturating_sub(start));
                if ran >= limit {
                    expire.push((wid, id));
                } else {
                    wake(now + (limit - ran));
                }
            }
            None => wake(now + limit),
        }
    }
    expire
}
