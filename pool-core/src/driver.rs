//! The driver: one thread per pool that owns the workers' I/O and turns what happens to them
//! into policy events.
//!
//! Submitting threads lock [`Inner`], let the policy pick a worker, queue the task's frame on
//! that worker's connection and write it at once (nonblocking): no thread hop on the way in.
//! The driver thread polls every worker socket, every worker's pidfd and a wake-up eventfd;
//! it reads results, delivers them (outside the lock), flushes what sockets could not take,
//! launches and reaps workers. A worker's death is seen as EOF on its socket or readiness of
//! its pidfd, never by polling on a timer.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pool_ipc::{Config as IpcConfig, FrameBuf, FramedConn};
use pool_spawn::protocol::{FromWorker, ImageId, ToWorker};
use pool_spawn::task::{FnRef, ItemError};
use pool_spawn::{ExitStatus, Launcher, Signal, Worker};
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use serde_bytes::ByteBuf;

use crate::error::{TaskError, TaskErrorKind};
use crate::policy::{Effects, Exit, Finish, Policy, TaskId, WorkerId};

/// How long a terminated worker has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);
/// How long a worker that closed its channel may take to exit before it is killed.
const EOF_GRACE: Duration = Duration::from_secs(2);

/// A batch's result bytes, left in the frame they arrived in (no copy).
pub(crate) struct Batch {
    frame: Vec<u8>,
    range: std::ops::Range<usize>,
}

impl Batch {
    fn bytes(&self) -> &[u8] {
        &self.frame[self.range.clone()]
    }
}

/// What the driver hands back for a task: its result bytes or its failure.
pub(crate) enum Outcome {
    /// The worker sent a result: postcard `Vec<Result<R, ItemError>>`, or a whole-batch error.
    Done {
        result: Result<Batch, ItemError>,
        worker: String,
        pid: u32,
    },
    /// The task ended without a result.
    Failed(TaskError),
}

/// Receives the one outcome of a task (decodes it and fills the user's slot).
pub(crate) type Sink = Box<dyn FnOnce(Outcome) + Send>;

/// A task as the policy holds it.
pub(crate) struct TaskRec {
    pub(crate) frame: Option<FrameBuf>,
    pub(crate) sink: Sink,
    pub(crate) sent_at: Option<Instant>,
}

/// A worker's message, decoded, with a result as its range in the frame.
enum Msg {
    Ready,
    SetupFailed(String),
    Done {
        id: u64,
        outcome: Result<std::ops::Range<usize>, ItemError>,
    },
}

/// One worker's I/O state.
struct WorkerIo {
    name: String,
    pid: u32,
    conn: Option<FramedConn>,
    /// Frames for a worker still starting (no channel yet), and whether each is a task.
    backlog: Vec<(FrameBuf, bool)>,
    /// Where each task frame queued on `conn` ends in its stream, oldest first (entries
    /// already written are dropped as they are found): a task whose frame has not left
    /// entirely when the worker dies never reached it.
    task_ends: VecDeque<u64>,
    /// The page where the worker counts the tasks it began (see `ToWorker::Setup`).
    progress: Option<pool_ipc::shm::Segment>,
    /// Results (`Done` messages) received from the worker.
    results: u64,
    handle: Option<Worker>,
    status: Option<ExitStatus>,
    kill_when_launched: bool,
    exit_note: Option<String>,
    /// When this worker's last result arrived.
    last_done: Option<Instant>,
}

impl WorkerIo {
    /// Records where the task frame just queued on `conn` ends.
    fn note_task_queued(&mut self) {
        if let Some(conn) = &self.conn {
            let written = conn.bytes_written();
            while self.task_ends.front().is_some_and(|&e| e <= written) {
                self.task_ends.pop_front();
            }
            self.task_ends.push_back(conn.stream_end());
        }
    }

    /// Whether the worker had begun a task it sent no result for: `None` if it has no
    /// progress page.
    fn was_running(&self) -> Option<bool> {
        let page = self.progress.as_ref()?;
        // The worker may not have opened the page (it then keeps no count).
        if page
            .atomic_u64(1)
            .load(std::sync::atomic::Ordering::Acquire)
            != pool_spawn::protocol::PROGRESS_KEPT
        {
            return None;
        }
        Some(
            page.atomic_u64(0)
                .load(std::sync::atomic::Ordering::Acquire)
                > self.results,
        )
    }

    /// Task frames that have not entirely left for the worker (all of them while it has no
    /// channel yet).
    fn undelivered_tasks(&self) -> usize {
        let queued = self.backlog.iter().filter(|(_, is_task)| *is_task).count();
        match &self.conn {
            Some(conn) => {
                let written = conn.bytes_written();
                queued + self.task_ends.iter().filter(|&&e| e > written).count()
            }
            None => queued,
        }
    }
}

/// Static settings the driver needs for every worker it starts.
pub(crate) struct Settings {
    pub(crate) prefix: &'static str,
    pub(crate) max_tasks: Option<u64>,
    pub(crate) init: Option<(FnRef, Vec<u8>)>,
    pub(crate) ipc: IpcConfig,
}

/// Everything behind the pool's lock.
pub(crate) struct Inner {
    pub(crate) policy: Policy<TaskRec>,
    io: HashMap<WorkerId, WorkerIo>,
    launches: Vec<WorkerId>,
    done: Vec<(TaskRec, Outcome)>,
    term_deadline: Option<Instant>,
    terminating: bool,
    wake_driver: bool,
}

/// Shared between the pool handle, the driver thread and submitting threads.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    wake: OwnedFd,
    settings: Settings,
    callbacks: Mutex<Option<CallbackThread>>,
}

struct CallbackThread {
    tx: flume::Sender<Box<dyn FnOnce() + Send>>,
    handle: JoinHandle<()>,
}

/// The policy's effects on the real world, while the lock is held.
pub(crate) struct Fx<'a> {
    io: &'a mut HashMap<WorkerId, WorkerIo>,
    launches: &'a mut Vec<WorkerId>,
    done: &'a mut Vec<(TaskRec, Outcome)>,
    wake_driver: &'a mut bool,
    settings: &'a Settings,
    terminating: bool,
    /// Workers with frames queued by this step, written once when the step ends.
    dirty: Vec<WorkerId>,
}

impl Effects<TaskRec> for Fx<'_> {
    fn launch(&mut self, wid: WorkerId) {
        self.io.insert(
            wid,
            WorkerIo {
                name: format!("{}-{wid}", self.settings.prefix),
                pid: 0,
                conn: None,
                backlog: Vec::new(),
                task_ends: VecDeque::new(),
                progress: None,
                results: 0,
                handle: None,
                status: None,
                kill_when_launched: false,
                exit_note: None,
                last_done: None,
            },
        );
        self.launches.push(wid);
        *self.wake_driver = true;
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
        task.sent_at = Some(Instant::now());
        match w.conn.as_mut() {
            Some(conn) => {
                conn.queue_copy(frame);
                w.note_task_queued();
                if self.dirty.last() != Some(&wid) {
                    self.dirty.push(wid);
                }
            }
            None => w.backlog.push((frame.clone(), true)),
        }
    }

    fn finish(&mut self, _id: TaskId, task: TaskRec, why: Finish) {
        let err = match why {
            Finish::Lost(wid) => match self.io.get(&wid) {
                Some(w) => {
                    let mut e = TaskError::worker_lost(
                        &w.name,
                        w.pid,
                        w.status,
                        task.sent_at.map(|t| t.elapsed()),
                    );
                    if let Some(note) = &w.exit_note {
                        e = e.with_note(note);
                    }
                    e
                }
                None => TaskError::new(TaskErrorKind::WorkerLost, "worker state missing"),
            },
            Finish::Orphaned(wid, times) => match self.io.get(&wid) {
                Some(w) => TaskError::never_started(&w.name, w.pid, w.status, times),
                None => TaskError::new(TaskErrorKind::WorkerLost, "worker state missing"),
            },
            Finish::Terminated => TaskError::new(
                TaskErrorKind::PoolClosed,
                "the pool was terminated before this task finished",
            ),
            Finish::InitFailed(m) => TaskError::with_report(TaskErrorKind::InitializerFailed, m),
        };
        self.done.push((task, Outcome::Failed(err)));
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
            }
            None => w.backlog.push((frame, false)),
        }
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

impl Shared {
    pub(crate) fn new(policy: Policy<TaskRec>, settings: Settings) -> std::io::Result<Arc<Self>> {
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Shared {
            inner: Mutex::new(Inner {
                policy,
                io: HashMap::new(),
                launches: Vec::new(),
                done: Vec::new(),
                term_deadline: None,
                terminating: false,
                wake_driver: false,
            }),
            wake,
            settings,
            callbacks: Mutex::new(None),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Applies one policy step under the lock; delivers outcomes after unlocking.
    pub(crate) fn act<R>(&self, step: impl FnOnce(&mut Policy<TaskRec>, &mut Fx<'_>) -> R) -> R {
        let (r, done, wake) = {
            let mut g = self.lock();
            let inner = &mut *g;
            let terminating = inner.terminating;
            let mut fx = Fx {
                io: &mut inner.io,
                launches: &mut inner.launches,
                done: &mut inner.done,
                wake_driver: &mut inner.wake_driver,
                settings: &self.settings,
                terminating,
                dirty: Vec::new(),
            };
            let r = step(&mut inner.policy, &mut fx);
            // Write what the step queued, one write per worker, from this thread; the driver
            // finishes what a socket refuses.
            let mut dirty = std::mem::take(&mut fx.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for wid in dirty {
                if let Some(conn) = inner.io.get_mut(&wid).and_then(|w| w.conn.as_mut()) {
                    match conn.flush() {
                        Ok(true) => {}
                        Ok(false) | Err(_) => inner.wake_driver = true,
                    }
                }
            }
            // The driver sleeps until a worker or a launch needs it; a step that leaves the
            // pool finished (close() once every worker is gone, say) must wake it to end.
            if inner.policy.is_finished() {
                inner.wake_driver = true;
            }
            let wake = std::mem::take(&mut inner.wake_driver);
            (r, std::mem::take(&mut inner.done), wake)
        };
        if wake {
            self.wake();
        }
        deliver(done);
        r
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
        self.wake();
    }

    /// Live workers: (name, pid), for `Pool::workers`.
    pub(crate) fn workers(&self) -> Vec<(String, u32)> {
        let g = self.lock();
        let mut v: Vec<_> =
            g.io.iter()
                .filter(|(_, w)| w.pid != 0 && w.status.is_none())
                .map(|(id, w)| (*id, w.name.clone(), w.pid))
                .collect();
        v.sort();
        v.into_iter().map(|(_, n, p)| (n, p)).collect()
    }

    pub(crate) fn counts(&self) -> crate::policy::Counts {
        self.lock().policy.counts()
    }

    pub(crate) fn load(&self) -> (usize, usize) {
        self.lock().policy.load()
    }

    /// The largest message a worker accepts, in bytes.
    pub(crate) fn frame_limit(&self) -> usize {
        self.settings.ipc.frame_limit()
    }

    pub(crate) fn depth(&self) -> usize {
        self.lock().policy.depth()
    }

    /// Runs `job` on the pool's callback thread (started on first use).
    pub(crate) fn run_callback(&self, job: Box<dyn FnOnce() + Send>) {
        let mut g = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if g.is_none() {
            let (tx, rx) = flume::unbounded::<Box<dyn FnOnce() + Send>>();
            let handle = std::thread::Builder::new()
                .name("procpool-callbacks".into())
                .spawn(move || {
                    ON_CALLBACK_THREAD.set(true);
                    while let Ok(job) = rx.recv() {
                        // Jobs catch their callbacks' panics; whatever still escapes must
                        // not stop the thread, or the jobs queued behind would never run.
                        if let Err(payload) =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                        {
                            drop_payload(payload);
                        }
                    }
                });
            match handle {
                Ok(handle) => *g = Some(CallbackThread { tx, handle }),
                Err(_) => {
                    drop(g);
                    job();
                    return;
                }
            }
        }
        let cb = g.as_ref().expect("callback thread exists");
        if let Err(e) = cb.tx.send(job) {
            drop(g);
            (e.into_inner())();
        }
    }

    /// True on a pool's callback thread (a callback is running this code).
    pub(crate) fn on_callback_thread() -> bool {
        ON_CALLBACK_THREAD.get()
    }

    /// Waits for queued callbacks to finish and stops the callback thread (called from the
    /// callback thread itself, it only tells it to stop after the queue).
    pub(crate) fn stop_callbacks(&self) {
        let cb = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(cb) = cb {
            drop(cb.tx);
            // A callback may itself join or drop the pool: the callback thread cannot wait
            // for itself; it runs what is queued and ends once this callback returns.
            if cb.handle.thread().id() != std::thread::current().id() {
                let _ = cb.handle.join();
            }
        }
    }
}

thread_local! {
    /// Set on callback threads, which must never wait for themselves.
    static ON_CALLBACK_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn deliver(done: Vec<(TaskRec, Outcome)>) {
    for (rec, outcome) in done {
        // Sinks catch the panics of user code they run; this is the last line of defence,
        // so that one result can never stop the delivery of the others (or the driver).
        let sink = rec.sink;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || sink(outcome))).is_err() {
            tracing::error!("delivering a task's result panicked; the pool goes on");
        }
    }
}

/// What the driver polls for one worker (its own duplicates of the fds).
struct Watch {
    wid: WorkerId,
    sock: Option<OwnedFd>,
    exit: Option<OwnedFd>,
    eof_at: Option<Instant>,
}

/// Starts one worker for slot `wid` and wires it up. Called from `build` (initial workers)
/// and from the driver thread (replacements).
pub(crate) fn launch_one(
    shared: &Shared,
    launcher: &mut Launcher,
    wid: WorkerId,
) -> Result<Option<WatchFds>, pool_spawn::Error> {
    let name = {
        let g = shared.lock();
        match g.io.get(&wid) {
            Some(w) => w.name.clone(),
            None => return Ok(None),
        }
    };
    let mut worker = launcher.launch(&name)?;
    let sock = worker
        .take_channel()
        .expect("a freshly launched worker has its channel");
    let watch_sock = sock.try_clone().map_err(pool_spawn::Error::from)?;
    let watch_exit = match worker.exit_fd() {
        Some(fd) => Some(fd.try_clone_to_owned().map_err(pool_spawn::Error::from)?),
        None => None,
    };
    let mut conn = FramedConn::new(sock, shared.settings.ipc.clone())
        .map_err(|e| pool_spawn::Error::from(std::io::Error::other(e.to_string())))?;
    let s = &shared.settings;
    // A page for the worker to count the tasks it begins; without it (no memory, say) the
    // pool falls back to assuming the oldest task it sent was running.
    let progress = pool_ipc::shm::Segment::create("procpool-progress", 4096).ok();
    let setup = ToWorker::Setup {
        name: name.clone(),
        max_tasks: s.max_tasks,
        image: ImageId::current(),
        init: s
            .init
            .as_ref()
            .map(|(f, args)| (*f, ByteBuf::from(args.clone()))),
        progress: progress.as_ref().map(|p| {
            (
                std::process::id(),
                std::os::fd::AsRawFd::as_raw_fd(&p.as_fd()),
            )
        }),
    };
    let mut frame = FrameBuf::new();
    frame
        .encode(&setup)
        .map_err(|e| pool_spawn::Error::from(std::io::Error::other(e.to_string())))?;
    conn.queue(frame);
    let pid = worker.pid();
    let mut g = shared.lock();
    let Some(w) = g.io.get_mut(&wid) else {
        drop(g);
        let _ = worker.terminate(Duration::ZERO);
        return Ok(None);
    };
    let backlog = std::mem::take(&mut w.backlog);
    w.conn = Some(conn);
    w.progress = progress;
    for (f, is_task) in backlog {
        if let Some(conn) = w.conn.as_mut() {
            conn.queue(f);
        }
        if is_task {
            w.note_task_queued();
        }
    }
    if let Some(conn) = w.conn.as_mut() {
        let _ = conn.flush();
    }
    if w.kill_when_launched {
        let _ = worker.signal_group(Signal::KILL);
    }
    w.pid = pid;
    w.handle = Some(worker);
    tracing::debug!(worker = %name, pid, "worker started");
    Ok(Some(WatchFds {
        sock: watch_sock,
        exit: watch_exit,
    }))
}

/// The fds the driver watches for a newly started worker.
pub(crate) struct WatchFds {
    sock: OwnedFd,
    exit: Option<OwnedFd>,
}

/// The driver thread's state.
pub(crate) struct Driver {
    shared: Arc<Shared>,
    launcher: Launcher,
    watches: Vec<Watch>,
}

impl Driver {
    pub(crate) fn new(shared: Arc<Shared>, launcher: Launcher) -> Self {
        Driver {
            shared,
            launcher,
            watches: Vec::new(),
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

    /// Starts the initial workers; the first failure is returned (and the pool is not built).
    pub(crate) fn launch_initial(&mut self) -> Result<(), pool_spawn::Error> {
        loop {
            let wid = {
                let mut g = self.shared.lock();
                if g.launches.is_empty() {
                    return Ok(());
                }
                g.launches.remove(0)
            };
            if let Some(fds) = launch_one(&self.shared, &mut self.launcher, wid)? {
                self.watch(wid, fds);
            }
        }
    }

    /// Starts the launches the policy asked for.
    pub(crate) fn launch_pending(&mut self) {
        loop {
            let wid = {
                let mut g = self.shared.lock();
                if g.launches.is_empty() {
                    return;
                }
                g.launches.remove(0)
            };
            match launch_one(&self.shared, &mut self.launcher, wid) {
                Ok(Some(fds)) => self.watch(wid, fds),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a worker");
                    let msg = e.to_string();
                    self.shared.act(|p, fx| {
                        p.exited(wid, Exit::LaunchFailed(msg), fx);
                        fx.io.remove(&wid);
                    });
                }
            }
        }
    }

    /// Runs until the pool is finished: closed or terminated, every task done, every worker
    /// reaped. Then stops the launcher (and its fork server).
    pub(crate) fn run(mut self) {
        let mut buf = [0u8; 8];
        loop {
            self.launch_pending();
            let (want_write, deadline, finished) = {
                let g = self.shared.lock();
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
            for w in &self.watches {
                if let Some(t) = w.eof_at {
                    consider(t + EOF_GRACE);
                }
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
                        w.exit_note = Some(format!("its channel failed: {e}"));
                        broken = true;
                        break;
                    }
                }
            }
            eof = conn.is_eof();
            for frame in msgs {
                // Decoded in place: a result's bytes stay where they are in the frame.
                let msg = postcard::from_bytes::<FromWorker<&serde_bytes::Bytes>>(&frame).map(
                    |m| match m {
                        FromWorker::Ready { .. } => Msg::Ready,
                        FromWorker::SetupFailed { message, .. } => Msg::SetupFailed(message),
                        FromWorker::Done { id, outcome } => Msg::Done {
                            id,
                            outcome: outcome.map(|b| {
                                // `b` lies inside `frame`: its offset is a difference of
                                // addresses.
                                let start = b.as_ptr() as usize - frame.as_ptr() as usize;
                                start..start + b.len()
                            }),
                        },
                    },
                );
                match msg {
                    Ok(Msg::Ready) => policy.ready(wid, fx),
                    Ok(Msg::SetupFailed(message)) => {
                        tracing::warn!(worker = %name, %message, "worker setup failed");
                        policy.setup_failed(wid, &message, fx);
                    }
                    Ok(Msg::Done { id, outcome }) => {
                        if let Some(w) = fx.io.get_mut(&wid) {
                            w.results += 1;
                        }
                        if let Some(rec) = policy.done(wid, id, fx) {
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
                            }
                            let result = outcome.map(|range| Batch { frame, range });
                            fx.done.push((
                                rec,
                                Outcome::Done {
                                    result,
                                    worker: name.clone(),
                                    pid,
                                },
                            ));
                        }
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
        let status = handle.and_then(|mut h| match h.wait_timeout(Duration::from_secs(2)) {
            Ok(Some(s)) => Some(s),
            _ => {
                let _ = h.signal_group(Signal::KILL);
                h.wait_timeout(Duration::from_secs(2)).ok().flatten()
            }
        });
        tracing::debug!(wid, ?status, "worker exited");
        self.shared.act(|p, fx| {
            let (mut undelivered, mut running) = (0, None);
            if let Some(w) = fx.io.get_mut(&wid) {
                w.status = status;
                undelivered = w.undelivered_tasks();
                running = w.was_running();
            }
            p.exited_with(wid, Exit::Ended, undelivered, running, fx);
            fx.io.remove(&wid);
        });
        let w = &mut self.watches[idx];
        w.sock = None;
        w.exit = None;
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let mut g = self.shared.lock();
        if g.term_deadline.is_some_and(|d| now >= d) {
            g.term_deadline = None;
            for w in g.io.values() {
                if let Some(h) = &w.handle {
                    let _ = h.signal_group(Signal::KILL);
                }
            }
        }
        drop(g);
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

/// Turns a worker's result bytes into per-item results.
pub(crate) fn decode_items<R: serde::de::DeserializeOwned>(
    outcome: Outcome,
    count: usize,
) -> Vec<Result<R, TaskError>> {
    match outcome {
        Outcome::Failed(e) => all_err(e, count),
        Outcome::Done {
            result,
            worker,
            pid,
        } => {
            let bytes = match result {
                Ok(b) => b,
                Err(e) => return all_err(item_error(e, &worker, pid), count),
            };
            // The result type's `Deserialize` is user code: a panic in it fails these
            // items, never the thread that delivers results.
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                postcard::from_bytes::<Vec<Result<R, ItemError>>>(bytes.bytes())
            }));
            let decoded = match decoded {
                Ok(d) => d,
                Err(payload) => {
                    let why = panic_text(&*payload);
                    drop_payload(payload);
                    let e = TaskError::new(
                        TaskErrorKind::Decode,
                        format!("decoding the result panicked in the pool's process: {why}"),
                    )
                    .with_worker(&worker, pid);
                    return all_err(e, count);
                }
            };
            match decoded {
                Ok(items) if items.len() == count => items
                    .into_iter()
                    .map(|r| r.map_err(|e| item_error(e, &worker, pid)))
                    .collect(),
                Ok(items) => {
                    let e = TaskError::new(
                        TaskErrorKind::Decode,
                        format!(
                            "expected {count} results from the worker, got {}",
                            items.len()
                        ),
                    )
                    .with_worker(&worker, pid);
                    all_err(e, count)
                }
                Err(e) => {
                    let e = TaskError::new(
                        TaskErrorKind::Decode,
                        format!("the result does not decode as the expected type: {e}"),
                    )
                    .with_worker(&worker, pid);
                    all_err(e, count)
                }
            }
        }
    }
}

/// Drops a caught panic's payload, whose `Drop` is user code that may panic again.
pub(crate) fn drop_payload(payload: Box<dyn std::any::Any + Send>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(payload)));
}

/// The message of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

fn all_err<R>(e: TaskError, count: usize) -> Vec<Result<R, TaskError>> {
    (0..count).map(|_| Err(e.clone())).collect()
}

fn item_error(e: ItemError, worker: &str, pid: u32) -> TaskError {
    use pool_spawn::task::ItemErrorKind as K;
    match e.kind {
        K::Panicked => TaskError::panicked(e.message),
        K::Encode => TaskError::new(TaskErrorKind::Encode, e.message),
        // A panic while decoding the arguments brings its report, backtrace and all.
        K::Decode => TaskError::with_report(TaskErrorKind::Decode, e.message),
    }
    .with_worker(worker, pid)
}
