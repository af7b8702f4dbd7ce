//! The driver thread's loop: wait on its epoll set (every worker socket no caller has
//! borrowed, every pidfd, the wake-up eventfd); read results, flush, reap, and enforce the
//! kill deadlines.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_spawn::protocol;
use pool_spawn::{Launcher, Signal};
use rustix::event::epoll::{self, EventData, EventFlags};

use super::launch::{Start, WatchFds, finish_start};
use super::phase::{kill_stalled, stall_deadline};
use super::reader::{ReadEnd, look_held, read_worker, salvage_held};
use super::shared::{Inner, Shared};
use super::worker_io::{WAKE_TOKEN, exit_token, sock_token};
use crate::policy::{Departure, Exit, WorkerId};

/// How long after the last launch the workers forked ahead for the next ones are let go.
const AHEAD_IDLE: Duration = Duration::from_secs(1);

/// How long a worker that closed its channel may take to exit before it is killed.
const EOF_GRACE: Duration = Duration::from_secs(2);

/// How long the ring that carries large arguments to a worker may sit unused before its
/// memory is given back.
const RING_IDLE: Duration = Duration::from_secs(1);

/// How close a clock's deadline (a task's time limit, a stopped worker's SIGKILL) must be for
/// the driver to wait for it on its timer (to the microsecond) rather than with `epoll_wait`'s
/// own timeout, which counts whole milliseconds and so wakes up to one late. A deadline
/// further off is waited for with the timeout, to this close (one wakeup more per deadline),
/// so that the timer is set only in a deadline's last moments.
const PRECISE_WITHIN: Duration = Duration::from_millis(2);

/// The driver's timer (a `timerfd` in its epoll set): wakes it at the next clock's deadline
/// to the microsecond.
struct ClockTimer {
    fd: OwnedFd,
    /// The deadline it is set for, if any (until it fires).
    set_for: Option<Instant>,
}

impl ClockTimer {
    /// A timer in `epoll`'s set under `TIMER_TOKEN`; `None` if the system gives none (the
    /// driver then waits with `epoll_wait`'s timeout alone).
    fn new(ep: &OwnedFd) -> Option<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )
        .ok()?;
        epoll::add(ep, &fd, EventData::new_u64(TIMER_TOKEN), EventFlags::IN).ok()?;
        Some(ClockTimer { fd, set_for: None })
    }

    /// Sets the timer for `at` (or stops it, with `None`); `false` if it could not be set.
    fn set(&mut self, at: Option<Instant>) -> bool {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if at == self.set_for {
            return true;
        }
        let value = match at {
            // `Instant` counts on CLOCK_MONOTONIC, the timer's clock. A microsecond late
            // rather than early: a wakeup just before the deadline would find it not due.
            Some(t) => {
                let ns = protocol::monotonic_ns()
                    .saturating_add(t.saturating_duration_since(Instant::now()).as_nanos() as u64)
                    .saturating_add(1_000);
                Timespec {
                    tv_sec: (ns / 1_000_000_000) as i64,
                    tv_nsec: (ns % 1_000_000_000) as i64,
                }
            }
            // All zeros: stopped.
            None => Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        let ok = timerfd_settime(&self.fd, TimerfdTimerFlags::ABSTIME, &spec).is_ok();
        self.set_for = if ok { at } else { None };
        ok
    }

    /// It fired: read, so that it is no longer readable.
    fn fired(&mut self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
        self.set_for = None;
    }
}

/// The epoll token of the driver's timer.
const TIMER_TOKEN: u64 = u64::MAX - 1;

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

thread_local! {
    /// This thread is a pool's driver.
    static DRIVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is a pool's driver (which looks at every timer before it sleeps
/// again, and needs no wake-up).
pub(super) fn on_driver_thread() -> bool {
    DRIVER.with(|d| d.get())
}

/// What the driver watches for one worker: its socket (registered by `WorkerIo::arm`) until
/// its channel ends, and its pidfd (its own duplicate, registered here) until it is reaped.
struct Watch {
    sock: bool,
    exit: Option<Arc<OwnedFd>>,
    eof_at: Option<Instant>,
}

/// The driver thread's state.
pub(crate) struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) launcher: Launcher,
    watches: BTreeMap<WorkerId, Watch>,
    /// When the timers next need a look (a task's time limit, a stopped worker's SIGKILL).
    next_timer: Option<Instant>,
    /// Progress pages of reaped workers, for the next launches (see `launch::fresh_page`).
    pub(super) pages: Vec<pool_ipc::shm::Segment>,
    /// Workers started that have not answered yet (spawn), their channel and pidfd in the
    /// epoll set under the tokens they keep once wired up.
    starting: BTreeMap<WorkerId, Start>,
    /// When the last worker was launched, while the workers the launcher forked ahead for
    /// the next launches (`LaunchOptions::ask_ahead`) may wait: they go once none has been
    /// launched for [`AHEAD_IDLE`].
    pub(super) launched_at: Option<Instant>,
}

impl Driver {
    pub(crate) fn new(shared: Arc<Shared>, launcher: Launcher) -> Self {
        Driver {
            shared,
            launcher,
            watches: BTreeMap::new(),
            next_timer: None,
            pages: Vec::new(),
            starting: BTreeMap::new(),
            launched_at: None,
        }
    }

    /// Watches a worker that has not answered yet: its channel (for the hello, or the end
    /// of file of a worker that died) and its pidfd.
    pub(super) fn watch_start(&mut self, wid: WorkerId, start: Start) {
        let ep = &self.shared.epoll;
        let sock = epoll::add(
            ep,
            start.starting.channel_fd(),
            EventData::new_u64(sock_token(wid)),
            EventFlags::IN,
        );
        if let Some(fd) = start.starting.exit_fd() {
            // Without it, the end of file on the channel tells of an early death.
            let _ = epoll::add(ep, fd, EventData::new_u64(exit_token(wid)), EventFlags::IN);
        }
        self.starting.insert(wid, start);
        if let Err(e) = sock {
            // Unwatched: its hello is waited for here and now.
            tracing::warn!(error = %e, "cannot watch a starting worker's channel");
            self.finish_waiting(wid);
        }
    }

    /// Takes the hello of starting worker `wid` if it has come (its channel or pidfd became
    /// readable): wires it up, or settles its slot as a launch failure if it died or said
    /// something wrong.
    fn advance_start(&mut self, wid: WorkerId) {
        let Some(start) = self.starting.remove(&wid) else {
            return;
        };
        self.unwatch_start(&start);
        match start.poll() {
            Ok(Ok((worker, prepared))) => self.started(wid, worker, prepared),
            Ok(Err(start)) => self.watch_start(wid, start),
            Err(e) => self.launch_failed(wid, &e),
        }
    }

    /// Waits for the hello of starting worker `wid` (until its deadline), then as
    /// [`Driver::advance_start`].
    fn finish_waiting(&mut self, wid: WorkerId) {
        let Some(start) = self.starting.remove(&wid) else {
            return;
        };
        self.unwatch_start(&start);
        match start.wait() {
            Ok((worker, prepared)) => self.started(wid, worker, prepared),
            Err(e) => self.launch_failed(wid, &e),
        }
    }

    fn unwatch_start(&self, start: &Start) {
        let ep = &self.shared.epoll;
        let _ = epoll::delete(ep, start.starting.channel_fd());
        if let Some(fd) = start.starting.exit_fd() {
            let _ = epoll::delete(ep, fd);
        }
    }

    fn started(
        &mut self,
        wid: WorkerId,
        worker: pool_spawn::Worker,
        prepared: super::launch::Prepared,
    ) {
        match finish_start(&self.shared, wid, worker, prepared) {
            Ok(Some(fds)) => self.watch(wid, fds),
            Ok(None) => {}
            Err(e) => self.launch_failed(wid, &e),
        }
    }

    /// Starting workers past their deadline fail; those of a pool being terminated are
    /// stopped at once (killed and reaped as their start is dropped), not waited for.
    /// Returns the earliest deadline left.
    fn starting_timers(&mut self, now: Instant) -> Option<Instant> {
        if self.starting.is_empty() {
            return None;
        }
        let doomed: Vec<WorkerId> = {
            let g = self.shared.lock();
            self.starting
                .keys()
                .copied()
                .filter(|wid| g.io.get(wid).is_none_or(|w| w.kill_when_launched))
                .collect()
        };
        for wid in doomed {
            if let Some(start) = self.starting.remove(&wid) {
                self.unwatch_start(&start);
                drop(start);
                self.settle_unstarted(
                    wid,
                    "stopped before it answered its start-up handshake".to_owned(),
                );
            }
        }
        let expired: Vec<WorkerId> = self
            .starting
            .iter()
            .filter(|(_, s)| s.starting.deadline() <= now)
            .map(|(&wid, _)| wid)
            .collect();
        for wid in expired {
            if let Some(start) = self.starting.remove(&wid) {
                self.unwatch_start(&start);
                let e = start.expire();
                self.launch_failed(wid, &e);
            }
        }
        self.starting.values().map(|s| s.starting.deadline()).min()
    }

    /// Watches a worker just started: its socket is in the epoll set already; its pidfd
    /// joins it.
    pub(crate) fn watch(&mut self, wid: WorkerId, fds: WatchFds) {
        if let Some(exit) = &fds.exit
            && let Err(e) = epoll::add(
                &self.shared.epoll,
                &**exit,
                EventData::new_u64(exit_token(wid)),
                EventFlags::IN,
            )
        {
            // Its end is still seen as the end of its channel, then reaped by waiting.
            tracing::warn!(error = %e, "cannot watch a worker's pidfd");
            self.watches.insert(
                wid,
                Watch {
                    sock: true,
                    exit: None,
                    eof_at: None,
                },
            );
            return;
        }
        self.watches.insert(
            wid,
            Watch {
                sock: true,
                exit: fds.exit,
                eof_at: None,
            },
        );
    }

    /// Runs until the pool is finished: closed or terminated, every task done, every worker
    /// reaped. Then stops the launcher (and its fork server).
    pub(crate) fn run(mut self) {
        DRIVER.with(|d| d.set(true));
        let mut buf = [0u8; 8];
        // What `epoll_wait` returns (local: an event is not `Send`).
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        let mut clock_timer = ClockTimer::new(&self.shared.epoll);
        loop {
            self.launch_pending();
            let start_deadline = self.starting_timers(Instant::now());
            let (deadline, finished, ring_check, stall, wakeup, ended, looks, launch) = {
                let mut g = self.shared.lock();
                let ring_check = release_idle_rings(&mut g, Instant::now());
                // Sockets with frames waiting are watched for room too.
                let ep = &self.shared.epoll;
                let inner = &mut *g;
                let mut looks: Option<Instant> = None;
                for (&wid, w) in inner.io.iter_mut() {
                    w.arm(ep, wid, inner.policy.oldest(wid).is_some());
                    if let Some(t) = w.look_at {
                        looks = Some(looks.map_or(t, |l| l.min(t)));
                    }
                }
                g.looks_planned = looks;
                (
                    g.term_deadline,
                    g.policy.is_finished() && g.launches.is_empty(),
                    ring_check,
                    stall_deadline(&g),
                    g.policy.wakeup(),
                    std::mem::take(&mut g.reader_ended),
                    looks,
                    !g.launches.is_empty(),
                )
            };
            let reaped = !ended.is_empty();
            for (wid, end) in ended {
                self.after_read(wid, end);
            }
            if finished && self.starting.is_empty() {
                break;
            }
            if launch || (reaped && !self.shared.lock().launches.is_empty()) {
                // Asked for on this thread since the launches above (a start that failed, a
                // worker reaped), which wakes no one: made before waiting.
                continue;
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
            // A clock's deadline close by is waited for on the timer; one further off with
            // the timeout, until it is close.
            let mut precise = None;
            if let Some(t) = self.next_timer {
                match &clock_timer {
                    Some(_) if t.saturating_duration_since(now) <= PRECISE_WITHIN => {
                        precise = Some(t);
                    }
                    Some(_) => consider(t.checked_sub(PRECISE_WITHIN / 2).unwrap_or(now)),
                    None => consider(t),
                }
            }
            if let Some(timer) = &mut clock_timer
                && !timer.set(precise)
                && let Some(t) = precise
            {
                consider(t);
            }
            if let Some(t) = ring_check {
                consider(t);
            }
            for w in self.watches.values() {
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
            if let Some(t) = looks {
                consider(t);
            }
            if let Some(t) = start_deadline {
                consider(t);
            }
            if let Some(t) = self.launched_at {
                consider(t + AHEAD_IDLE);
            }
            let ts = timeout.map(|d| rustix::time::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            events.clear();
            match epoll::wait(
                &self.shared.epoll,
                rustix::buffer::spare_capacity(&mut events),
                ts.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed in the pool driver");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            for ev in &events {
                let (token, flags) = (ev.data.u64(), ev.flags);
                if token == WAKE_TOKEN {
                    let _ = rustix::io::read(&self.shared.wake, &mut buf);
                    continue;
                }
                if token == TIMER_TOKEN {
                    // The clocks are looked at below.
                    if let Some(timer) = &mut clock_timer {
                        timer.fired();
                    }
                    continue;
                }
                let wid = token >> 1;
                if self.starting.contains_key(&wid) {
                    self.advance_start(wid);
                    continue;
                }
                let Some(w) = self.watches.get(&wid) else {
                    // Reaped since (an event from before its fds left the set).
                    continue;
                };
                if token & 1 == 1 {
                    if w.exit.is_some() {
                        self.reap(wid);
                    }
                    continue;
                }
                if !w.sock {
                    continue;
                }
                if flags.intersects(EventFlags::OUT) {
                    self.flush(wid);
                }
                if flags.intersects(EventFlags::IN | EventFlags::HUP | EventFlags::ERR) {
                    self.read(wid, false);
                }
            }
            if events.len() == events.capacity() {
                events.reserve(events.capacity());
            }
            self.timers();
            self.watches.retain(|_, w| w.sock || w.exit.is_some());
        }
        let _ = self.launcher.shutdown();
    }

    fn flush(&mut self, wid: WorkerId) {
        let mut g = self.shared.lock();
        if let Some(w) = g.io.get_mut(&wid)
            && let Some(conn) = w.conn.as_mut()
        {
            let _ = conn.flush();
            w.ring();
        }
    }

    /// Reads what the worker sent; handles every complete message (unless a caller has
    /// borrowed its socket: it reads it then).
    /// `drain`: see [`read_worker`].
    fn read(&mut self, wid: WorkerId, drain: bool) {
        let shared = Arc::clone(&self.shared);
        let end = shared.act(|policy, fx| {
            if fx.io.get(&wid).is_some_and(|w| w.borrowed.is_some()) {
                return ReadEnd::default();
            }
            read_worker(policy, fx, wid, drain)
        });
        self.after_read(wid, end);
    }

    /// After a read (by the driver or a caller): a channel that ended is watched no more, a
    /// worker that broke the protocol is killed, and the exit is awaited.
    fn after_read(&mut self, wid: WorkerId, end: ReadEnd) {
        if !end.closed() {
            return;
        }
        let Some(w) = self.watches.get_mut(&wid) else {
            return;
        };
        if !w.sock {
            return;
        }
        // Stop watching the socket (it stays readable at EOF); wait for the exit.
        w.sock = false;
        w.eof_at = Some(Instant::now());
        let no_exit = w.exit.is_none();
        {
            let mut g = self.shared.lock();
            if let Some(io) = g.io.get_mut(&wid) {
                io.unwatch_sock(&self.shared.epoll, wid);
                if end.broken
                    && let Some(h) = &io.handle
                {
                    let _ = h.signal_group(Signal::KILL);
                }
            }
        }
        if no_exit {
            self.reap(wid);
        }
    }

    /// The worker's process ended: deliver its last results, reap it, tell the policy.
    fn reap(&mut self, wid: WorkerId) {
        let lent = self.watches.get(&wid).is_some_and(|w| w.sock);
        if let Some(io) = self.shared.lock().io.get_mut(&wid) {
            // Gone: no caller borrows its socket again. (One that did before the read
            // below would keep the driver from reading what is left, and the task whose
            // answer it is would be counted lost with the worker.)
            io.exited = true;
            // A caller reading the socket gives it back: what is left is read here.
            if lent {
                io.borrowed = None;
            }
            // A caller asleep on its bell wakes to see its socket taken back.
            io.ring_bell();
        }
        if lent {
            self.read(wid, true);
        }
        let (handle, clean) = {
            let mut g = self.shared.lock();
            let clean = g.policy.oldest(wid).is_none();
            let w = g.io.get_mut(&wid);
            let clean = clean
                && w.as_ref().is_some_and(|w| {
                    w.undelivered_tasks() == 0 && w.begun_unanswered().is_none_or(|n| n == 0)
                });
            (w.and_then(|w| w.handle.take()), clean)
        };
        // A worker that ended cleanly (every task it was sent answered, none begun since:
        // a worker recycled after its last answer) leaves no task whose error would tell
        // its exit status: the status is taken if it is known already, not waited for (a
        // fork-server worker's comes in the server's report, a round trip behind the exit
        // this was woken by, which held up the driver for every worker recycled). Its page
        // serves a later worker all the same once it is known to have ended.
        let mut ended = false;
        // Why the status could not be read, when it could not (the fork server that would
        // report it is gone, say): said in the tasks' errors instead of "status unknown".
        let mut lost_status = None;
        let status = handle.and_then(|mut h| match h.try_wait_now() {
            Ok(Some(s)) => Some(s),
            Ok(None) if clean && h.has_ended() => {
                ended = true;
                None
            }
            _ => match h.wait_timeout(Duration::from_secs(2)) {
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
            },
        });
        let page = self.shared.act(|p, fx| {
            // The answers it held back first: the tasks they answer ran, and are delivered.
            // (Gone: nothing writes over them.)
            let _ = super::reader::salvage_held(p, fx, wid);
            // Then an answer it left in its page for a caller that has not taken it yet.
            let _ = super::reader::deliver_posted(p, fx, wid);
            let (mut undelivered, mut begun) = (0, None);
            if let Some(w) = fx.io.get_mut(&wid) {
                w.status = status;
                if let Some(why) = lost_status {
                    w.exit_note
                        .get_or_insert_with(|| format!("its exit status is unknown: {why}"));
                }
                undelivered = w.undelivered_tasks();
                begun = w.begun_unanswered();
            }
            let how = p.exited_with(wid, Exit::Ended, undelivered, begun, fx);
            let mut w = fx.io.remove(&wid)?;
            w.unwatch_sock(&self.shared.epoll, wid);
            departed(&w.name, w.pid, status, how);
            // Its page serves a later worker only once the process is known to be gone (it
            // was reaped, or has ended): nothing writes to it any more. (Whatever the page held was read
            // above, by `exited_with`.)
            // (Not while a caller that borrowed its socket still holds it.)
            (status.is_some() || ended)
                .then(|| w.progress.take())
                .flatten()
                .and_then(|p| Arc::try_unwrap(p).ok())
        });
        if let Some(page) = page
            && self.pages.len() < super::launch::KEEP_PAGES
        {
            self.pages.push(page);
        }
        if let Some(w) = self.watches.get_mut(&wid) {
            w.sock = false;
            if let Some(exit) = w.exit.take() {
                let _ = epoll::delete(&self.shared.epoll, &*exit);
            }
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if self.launched_at.is_some_and(|t| now >= t + AHEAD_IDLE) {
            self.launched_at = None;
            self.launcher.let_ahead_go();
        }
        let mut g = self.shared.lock();
        if g.io.values().any(|w| w.look_at.is_some_and(|t| t <= now)) {
            // Workers silent while they may hold answers back: their pages are looked at.
            drop(g);
            self.shared.act(|p, fx| {
                let due: Vec<WorkerId> = fx
                    .io
                    .iter()
                    .filter(|(_, w)| w.look_at.is_some_and(|t| t <= now))
                    .map(|(&wid, _)| wid)
                    .collect();
                for wid in due {
                    let next = look_held(p, fx, wid, now);
                    fx.plan_look(wid, next);
                }
            });
            g = self.shared.lock();
        }
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
                    // The answers it held back before this task are delivered first: the
                    // task is then the oldest it holds (unless they are still on their way
                    // in its channel: the next look at the clocks stops it).
                    if p.oldest(wid).map(|(t, _)| t) != Some(id) {
                        let _ = salvage_held(p, fx, wid);
                    }
                    p.time_out(wid, id, fx);
                }
            });
        }
        self.next_timer = next;
        let overdue: Vec<WorkerId> = self
            .watches
            .iter()
            .filter(|(_, w)| w.eof_at.is_some_and(|t| now >= t + EOF_GRACE))
            .map(|(&wid, _)| wid)
            .collect();
        for wid in overdue {
            {
                {
                    let g = self.shared.lock();
                    if let Some(h) = g.io.get(&wid).and_then(|w| w.handle.as_ref()) {
                        let _ = h.signal_group(Signal::KILL);
                    }
                }
                let Some(w) = self.watches.get_mut(&wid) else {
                    continue;
                };
                w.eof_at = None;
                if w.exit.is_none() {
                    self.reap(wid);
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
/// a chunk) begins in its worker, which the worker's progress page tells: the task it
/// runs is the one the page names, not the oldest it holds (the tasks before may have
/// ended, their answers on their way). A task that has not begun cannot run out of time
/// before its limit from now, so it is looked at again then; by that time it has begun,
/// or it is looked at again later.
fn clocks(g: &Inner, now: Instant, next: &mut Option<Instant>) -> Vec<(WorkerId, u64)> {
    let now_ns = protocol::monotonic_ns();
    let mut expire = Vec::new();
    let mut wake = |t: Instant| *next = Some(next.map_or(t, |n| n.min(t)));
    for (&wid, w) in &g.io {
        if w.handle.is_none() || w.kill_at.is_some() {
            continue;
        }
        // The page's word, or (without a page) the oldest task it holds.
        let running = match w.running() {
            Some(id) => g.policy.holds(wid, id).then_some(id),
            None => g.policy.oldest(wid).map(|(id, _)| id),
        };
        let mut limited = running.and_then(|id| Some((id, g.policy.task(id)?.timeout?)));
        if let Some((id, limit)) = limited {
            match w.started(id) {
                Some(start) => {
                    let ran = Duration::from_nanos(now_ns.saturating_sub(start));
                    if ran < limit {
                        wake(now + (limit - ran));
                    } else {
                        expire.push((wid, id));
                        // Stopped once the answers before it are in (it may not be the
                        // oldest task its worker holds): looked at again meanwhile.
                        wake(now + Duration::from_millis(1));
                    }
                }
                None => wake(now + limit),
            }
            continue;
        }
        // None running with a limit: the first to begin cannot run out before its limit.
        limited = g
            .policy
            .held_by(wid)
            .filter_map(|id| Some((id, g.policy.task(id)?.timeout?)))
            .min_by_key(|&(_, limit)| limit);
        if let Some((_, limit)) = limited {
            wake(now + limit);
        }
    }
    expire
}
