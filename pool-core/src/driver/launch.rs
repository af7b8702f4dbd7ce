//! Starting a worker: launch the process, send it its Setup and whatever was queued for it
//! meanwhile, and hand its fds to the event loop.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use pool_ipc::{FrameBuf, FramedConn};
use pool_spawn::protocol::{FdRef, ImageId, ToWorker, page};
use pool_spawn::{Launch, Launcher, Progress, Signal, Starting, Worker};
use serde_bytes::ByteBuf;

use super::event_loop::Driver;
use super::shared::Shared;
use crate::policy::{Exit, Origin, WorkerId};

/// What a worker is started with, read under the lock when its launch begins.
pub(crate) struct Plan {
    name: String,
    max_tasks: Option<u64>,
    origin: Option<Origin>,
}

/// A launch under way whose worker has not answered yet (spawn): the driver takes its
/// hello when its channel becomes readable, then wires it up ([`finish_start`]).
pub(crate) struct Start {
    pub(super) starting: Starting,
    prepared: Prepared,
}

/// What was readied for a worker while it started: its plan and progress page.
pub(crate) struct Prepared {
    progress: pool_ipc::shm::Segment,
    plan: Plan,
}

/// How [`begin_one`] went.
pub(crate) enum Begun {
    /// The slot was gone (the pool moved on): nothing was started.
    Gone,
    /// The worker is started and wired up.
    Ready(WatchFds),
    /// The worker is started but has not answered yet.
    Starting(Start),
}

/// Begins starting one worker for slot `wid`: a worker whose start method answers at once
/// is wired up now; a spawned one is handed back to be finished when it answers. Called
/// from `build` (initial workers) and from the driver thread (replacements).
pub(crate) fn begin_one(
    shared: &Shared,
    launcher: &mut Launcher,
    pages: &mut Vec<pool_ipc::shm::Segment>,
    wid: WorkerId,
) -> Result<Begun, pool_spawn::Error> {
    let plan = {
        let g = shared.lock();
        match g.io.get(&wid) {
            Some(w) => Plan {
                name: w.name.to_string(),
                max_tasks: g.policy.max_tasks_of(wid),
                origin: g.policy.origin(wid),
            },
            None => return Ok(Begun::Gone),
        }
    };
    // A page for the worker to count the tasks it begins, keep its results on and find its
    // tasks' cancel marks on. Readied while the fork server (or zygote) forks the worker.
    // Without it (no memory, no descriptors) the pool could neither tell whether a dead
    // worker's task began nor keep a cancelled one from running: the launch fails.
    let mut progress = Err(std::io::Error::other("not made"));
    let launch = launcher.begin_meanwhile(&plan.name, || progress = fresh_page(pages))?;
    let progress = match progress {
        Ok(page) => page,
        Err(e) => {
            match launch {
                Launch::Ready(mut worker) => {
                    let _ = worker.terminate(Duration::ZERO);
                }
                Launch::Starting(starting) => {
                    let _ = starting.expire();
                }
            }
            // The OS error stays the source: running out of descriptors here is told as
            // such, wherever the launch ran out.
            return Err(pool_spawn::Error::io(
                "cannot make the worker's progress page",
                e,
            ));
        }
    };
    match launch {
        Launch::Ready(worker) => Ok(match wire_up(shared, wid, worker, progress, &plan)? {
            Some(fds) => Begun::Ready(fds),
            None => Begun::Gone,
        }),
        Launch::Starting(starting) => Ok(Begun::Starting(Start {
            starting,
            prepared: Prepared { progress, plan },
        })),
    }
}

/// Finishes a launch whose worker answered: wires it up. `None` if its slot is gone (the
/// worker is stopped then).
pub(crate) fn finish_start(
    shared: &Shared,
    wid: WorkerId,
    worker: Worker,
    prepared: Prepared,
) -> Result<Option<WatchFds>, pool_spawn::Error> {
    wire_up(shared, wid, worker, prepared.progress, &prepared.plan)
}

impl Start {
    /// Takes the worker's hello if it has come; `Err(self)` while it has not.
    pub(crate) fn poll(self) -> Result<Result<(Worker, Prepared), Start>, pool_spawn::Error> {
        let Start { starting, prepared } = self;
        Ok(match starting.poll()? {
            Progress::Done(w) => Ok((w, prepared)),
            Progress::Waiting(starting) => Err(Start { starting, prepared }),
        })
    }

    /// Its deadline passed without a hello: the worker is killed and reaped; the error.
    pub(crate) fn expire(self) -> pool_spawn::Error {
        self.starting.expire()
    }

    /// Waits for the worker's hello (until its deadline).
    pub(crate) fn wait(self) -> Result<(Worker, Prepared), pool_spawn::Error> {
        let Start { starting, prepared } = self;
        Ok((starting.wait()?, prepared))
    }
}

/// Hands a started worker its Setup and whatever was queued for it meanwhile, and lets
/// the driver read it.
fn wire_up(
    shared: &Shared,
    wid: WorkerId,
    mut worker: Worker,
    progress: pool_ipc::shm::Segment,
    plan: &Plan,
) -> Result<Option<WatchFds>, pool_spawn::Error> {
    let Plan {
        name,
        max_tasks,
        origin,
    } = plan;
    let sock = worker
        .take_channel()
        .expect("a freshly launched worker has its channel");
    let watch_sock = Arc::new(sock.try_clone().map_err(pool_spawn::Error::from)?);
    let watch_exit = match worker.exit_fd() {
        Some(fd) => Some(Arc::new(
            fd.try_clone_to_owned().map_err(pool_spawn::Error::from)?,
        )),
        None => None,
    };
    let mut conn =
        FramedConn::new(sock, shared.settings.ipc.clone()).map_err(pool_spawn::Error::from)?;
    let s = &shared.settings;
    // Passed with the Setup: the initializer's events (their slots), then the page. The
    // worker opens what is missing through /proc (which fails if this process is not
    // dumpable).
    let mut fds = s.init_pins.fds();
    let page_slot = if fds.len() < pool_ipc::fdpass::MAX_FDS {
        progress.as_fd().try_clone_to_owned().ok().map(|fd| {
            fds.push(fd);
            (fds.len() - 1) as u32
        })
    } else {
        None
    };
    let setup = ToWorker::Setup {
        name: name.clone(),
        max_tasks: max_tasks.or(s.max_tasks),
        limits: s.limits,
        image: ImageId::current(),
        init: s
            .init
            .as_ref()
            .map(|(f, args)| (*f, ByteBuf::from(args.clone()))),
        progress: Some(FdRef {
            pid: s.pid,
            fd: std::os::fd::AsRawFd::as_raw_fd(&progress.as_fd()),
            slot: page_slot,
        }),
    };
    let mut frame = FrameBuf::new();
    frame.encode(&setup).map_err(pool_spawn::Error::from)?;
    conn.queue_with_fds(frame, fds);
    let pid = worker.pid();
    let mut g = shared.lock();
    let Some(w) = g.io.get_mut(&wid) else {
        drop(g);
        let _ = worker.terminate(Duration::ZERO);
        return Ok(None);
    };
    let backlog = std::mem::take(&mut w.backlog);
    w.conn = Some(conn);
    w.progress = Some(Arc::new(progress));
    w.write_pending_cancels();
    for (f, pins, is_task) in backlog {
        if let Some(conn) = w.conn.as_mut() {
            conn.queue_with_fds(f, pins.fds());
        }
        if is_task {
            w.note_task_queued();
        }
    }
    if let Some(conn) = w.conn.as_mut() {
        let _ = conn.flush();
    }
    w.ring();
    // The driver reads the socket from now on (and knows to write what is left).
    w.sock_watch = Some(Arc::clone(&watch_sock));
    w.exit_watch = watch_exit.clone();
    // Not ready yet: watched whether or not it holds tasks.
    w.arm(&shared.epoll, wid, true);
    if w.kill_when_launched {
        let _ = worker.signal_group(Signal::KILL);
    }
    w.pid = pid;
    w.handle = Some(worker);
    match origin {
        Some(Origin::Replacement) => tracing::debug!(worker = %name, pid, "worker replaced"),
        Some(Origin::Grow) => tracing::debug!(worker = %name, pid, "worker added"),
        _ => tracing::debug!(worker = %name, pid, "worker started"),
    }
    Ok(Some(WatchFds { exit: watch_exit }))
}

/// How many progress pages of reaped workers the driver keeps for later launches.
pub(super) const KEEP_PAGES: usize = 4;

/// A progress page for a new worker, all zeros: one a reaped worker left (`pages`), wiped,
/// or else a new one.
///
/// Reusing a page spares each launch creating, sealing and mapping a memfd, and later
/// unmapping it and freeing its inode (a quarter of the driver's time when every task gets
/// a fresh worker). A kept page is zeroed whole (it reads as a new one does), so nothing of
/// the worker that had it reaches the next one's count, cancel marks or results; it was
/// kept only once that worker had been reaped.
fn fresh_page(pages: &mut Vec<pool_ipc::shm::Segment>) -> std::io::Result<pool_ipc::shm::Segment> {
    while let Some(page) = pages.pop() {
        if page.zero().is_ok() {
            return Ok(page);
        }
    }
    // Sparse: a worker touches only the pages its results need (allocating the whole
    // result area up front for every worker made each start several times slower).
    pool_ipc::shm::Segment::create_sparse("procpool-progress", page::LEN)
}

/// What the driver watches for a newly started worker besides its socket (registered in
/// its epoll set by `launch_one`): its pidfd, where the start method gives one.
pub(crate) struct WatchFds {
    pub(super) exit: Option<Arc<OwnedFd>>,
}

impl Driver {
    /// Starts the initial workers: every one is begun before any is waited for, so that
    /// spawned workers load and answer in parallel. The first failure is returned with the
    /// number of workers begun before the one that failed; the pool is then terminated, and
    /// the slot that failed, those still starting and those never launched are settled as
    /// launch failures, so that the driver can run to its end (they stayed in the policy
    /// forever, and `build` hung).
    pub(crate) fn launch_initial(&mut self) -> Result<(), (pool_spawn::Error, usize)> {
        // Each launch's place in the order (0 for the first), which the error names.
        let mut begun = 0;
        let mut waiting: Vec<(WorkerId, Start, usize)> = Vec::new();
        let mut failure = None;
        while let Some(wid) = self.next_launch() {
            let place = begun;
            begun += 1;
            if self.shared.lock().launches.is_empty() {
                // The new workers' first tasks come next, not more launches.
                self.launcher.last_of_batch();
            }
            match begin_one(&self.shared, &mut self.launcher, &mut self.pages, wid) {
                Ok(Begun::Ready(fds)) => self.watch(wid, fds),
                Ok(Begun::Gone) => {}
                Ok(Begun::Starting(s)) => waiting.push((wid, s, place)),
                Err(e) => {
                    failure = Some((wid, e, place));
                    break;
                }
            }
        }
        // Those begun after a failure are stopped (dropping a start kills and reaps it).
        let mut abandoned = Vec::new();
        for (wid, start, place) in waiting {
            if failure.is_some() {
                abandoned.push(wid);
                continue;
            }
            let (worker, prepared) = match start.wait() {
                Ok(w) => w,
                Err(e) => {
                    failure = Some((wid, e, place));
                    continue;
                }
            };
            match finish_start(&self.shared, wid, worker, prepared) {
                Ok(Some(fds)) => self.watch(wid, fds),
                Ok(None) => {}
                Err(e) => failure = Some((wid, e, place)),
            }
        }
        let Some((wid, e, place)) = failure else {
            return Ok(());
        };
        self.shared.terminate();
        let msg = e.to_string();
        self.shared.act(|p, fx| {
            let pending = std::mem::take(fx.launches);
            for w in std::iter::once(wid).chain(abandoned).chain(pending) {
                p.exited(w, Exit::LaunchFailed(msg.clone()), fx);
                fx.io.remove(&w);
            }
        });
        Err((e, place))
    }

    /// Begins the launches the policy asked for; a worker that has not answered yet is
    /// watched (its channel and pidfd) until it does ([`Driver::advance_start`]).
    pub(crate) fn launch_pending(&mut self) {
        while let Some(wid) = self.next_launch() {
            match begin_one(&self.shared, &mut self.launcher, &mut self.pages, wid) {
                Ok(Begun::Ready(fds)) => self.watch(wid, fds),
                Ok(Begun::Gone) => {}
                Ok(Begun::Starting(s)) => self.watch_start(wid, s),
                Err(e) => self.launch_failed(wid, &e),
            }
        }
    }

    /// The next slot whose worker the policy asked to start, taken off the list; `None`
    /// once there is none.
    fn next_launch(&mut self) -> Option<WorkerId> {
        let wid = {
            let mut g = self.shared.lock();
            (!g.launches.is_empty()).then(|| g.launches.remove(0))
        }?;
        if self.launcher.asks_ahead() {
            // The workers asked for ahead are kept while launches go on (see `timers`).
            self.launched_at = Some(std::time::Instant::now());
        }
        Some(wid)
    }

    /// Settles slot `wid`, whose worker could not be started, as a launch failure.
    pub(super) fn launch_failed(&mut self, wid: WorkerId, e: &pool_spawn::Error) {
        let msg = crate::error::Chain(e).to_string();
        tracing::warn!(error = %msg, "could not start a worker");
        self.settle_unstarted(wid, msg);
    }

    /// Settles slot `wid`, whose worker never started (for the reason `msg`).
    pub(super) fn settle_unstarted(&mut self, wid: WorkerId, msg: String) {
        self.shared.act(|p, fx| {
            p.exited(wid, Exit::LaunchFailed(msg), fx);
            fx.io.remove(&wid);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use pool_spawn::protocol::{PROGRESS_KEPT, page};

    use super::fresh_page;

    /// A page a reaped worker left is handed to the next one all zeros: its count, kept
    /// mark, running task, cancel marks and results are gone.
    #[test]
    fn a_kept_page_is_wiped_before_reuse() {
        let used = fresh_page(&mut Vec::new()).expect("a new page");
        used.atomic_u64(page::BEGUN).store(3, Ordering::SeqCst);
        used.atomic_u64(page::KEPT)
            .store(PROGRESS_KEPT, Ordering::SeqCst);
        used.atomic_u64(page::CURRENT).store(7, Ordering::SeqCst);
        used.atomic_u64(page::AREA_TASK).store(7, Ordering::SeqCst);
        used.atomic_u64(page::AREA_ITEMS).store(2, Ordering::SeqCst);
        used.atomic_u64(page::CANCEL_FIRST + 5)
            .store(9, Ordering::SeqCst);
        used.write_at(page::AREA_OFFSET, &[0xab; 100]);
        used.write_at(page::LEN - 10, &[0xcd; 10]);
        let mut pages = vec![used];
        let page = fresh_page(&mut pages).expect("the kept page");
        assert!(pages.is_empty(), "the kept page is the one reused");
        let mut words = vec![0u8; page::AREA_OFFSET];
        page.read_at(0, &mut words);
        assert!(words.iter().all(|&b| b == 0), "the words are all zero");
        let mut area = vec![0u8; 100];
        page.read_at(page::AREA_OFFSET, &mut area);
        assert!(area.iter().all(|&b| b == 0), "the result area is zero");
        let mut tail = [0u8; 10];
        page.read_at(page::LEN - 10, &mut tail);
        assert_eq!(tail, [0; 10]);
        assert_eq!(
            page.atomic_u64(page::CANCEL_FIRST + 5)
                .load(Ordering::SeqCst),
            0,
            "the cancel marks are gone"
        );
    }
}
