//! Starting a worker: launch the process, send it its Setup and whatever was queued for it
//! meanwhile, and hand its fds to the event loop.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use pool_ipc::{FrameBuf, FramedConn};
use pool_spawn::protocol::{FdRef, ImageId, ToWorker, page};
use pool_spawn::{Launcher, Signal};
use serde_bytes::ByteBuf;

use super::event_loop::Driver;
use super::shared::Shared;
use crate::policy::{Exit, Origin, WorkerId};

/// Starts one worker for slot `wid` and wires it up. Called from `build` (initial workers)
/// and from the driver thread (replacements).
pub(crate) fn launch_one(
    shared: &Shared,
    launcher: &mut Launcher,
    wid: WorkerId,
) -> Result<Option<WatchFds>, pool_spawn::Error> {
    let (name, max_tasks, origin) = {
        let g = shared.lock();
        match g.io.get(&wid) {
            Some(w) => (
                w.name.to_string(),
                g.policy.max_tasks_of(wid),
                g.policy.origin(wid),
            ),
            None => return Ok(None),
        }
    };
    let mut worker = launcher.launch(&name)?;
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
    // A page for the worker to count the tasks it begins and keep its results on; without
    // it (no memory, say) the pool falls back to assuming the oldest task it sent was
    // running, and cannot cancel tasks it sent.
    // Sparse: a worker touches only the pages its results need (allocating the whole
    // result area up front for every worker made each start several times slower).
    let progress = pool_ipc::shm::Segment::create_sparse("procpool-progress", page::LEN).ok();
    // Passed with the Setup: the initializer's events (their slots), then the page. The
    // worker opens what is missing through /proc (which fails if this process is not
    // dumpable).
    let mut fds = s.init_pins.fds();
    let page_slot = match &progress {
        Some(p) if fds.len() < pool_ipc::fdpass::MAX_FDS => {
            p.as_fd().try_clone_to_owned().ok().map(|fd| {
                fds.push(fd);
                (fds.len() - 1) as u32
            })
        }
        _ => None,
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
        progress: progress.as_ref().map(|p| FdRef {
            pid: std::process::id(),
            fd: std::os::fd::AsRawFd::as_raw_fd(&p.as_fd()),
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
    w.progress = progress;
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
    // The driver reads the socket from now on (and knows to write what is left).
    w.sock_watch = Some(Arc::clone(&watch_sock));
    w.exit_watch = watch_exit.clone();
    w.arm(&shared.epoll, wid);
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

/// What the driver watches for a newly started worker besides its socket (registered in
/// its epoll set by `launch_one`): its pidfd, where the start method gives one.
pub(crate) struct WatchFds {
    pub(super) exit: Option<Arc<OwnedFd>>,
}

impl Driver {
    /// Starts the initial workers. The first failure is returned with the number of
    /// workers started before it; the pool is then terminated, and the slot that failed and
    /// those never launched are settled as launch failures, so that the driver can run to
    /// its end (they stayed in the policy forever, and `build` hung).
    pub(crate) fn launch_initial(&mut self) -> Result<(), (pool_spawn::Error, usize)> {
        let mut started = 0;
        loop {
            let wid = {
                let mut g = self.shared.lock();
                if g.launches.is_empty() {
                    return Ok(());
                }
                g.launches.remove(0)
            };
            match launch_one(&self.shared, &mut self.launcher, wid) {
                Ok(Some(fds)) => {
                    self.watch(wid, fds);
                    started += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    self.shared.terminate();
                    let msg = e.to_string();
                    self.shared.act(|p, fx| {
                        let pending = std::mem::take(fx.launches);
                        for w in std::iter::once(wid).chain(pending) {
                            p.exited(w, Exit::LaunchFailed(msg.clone()), fx);
                            fx.io.remove(&w);
                        }
                    });
                    return Err((e, started));
                }
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
                    let msg = crate::error::Chain(&e).to_string();
                    tracing::warn!(error = %msg, "could not start a worker");
                    self.shared.act(|p, fx| {
                        p.exited(wid, Exit::LaunchFailed(msg), fx);
                        fx.io.remove(&wid);
                    });
                }
            }
        }
    }
}
