//! The state shared by the pool handle, the driver thread and submitting threads, behind one
//! lock; [`Shared::act`] runs a policy step under it and delivers outcomes after it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pool_ipc::Config as IpcConfig;
use pool_spawn::protocol::Limits;
use pool_spawn::task::FnRef;
use rustix::event::EventfdFlags;

use super::callbacks::CallbackThread;
use super::effects::Fx;
use super::worker_io::WorkerIo;
use super::{Delivery, TaskRec};
use crate::policy::{Cancelled, Policy, WorkerId};
use crate::result::CancelOutcome;

/// How long a terminated worker has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);

/// Static settings the driver needs for every worker it starts.
pub(crate) struct Settings {
    pub(crate) prefix: &'static str,
    pub(crate) max_tasks: Option<u64>,
    pub(crate) init: Option<(FnRef, Vec<u8>)>,
    pub(crate) ipc: IpcConfig,
    /// Memory limits each worker applies to itself.
    pub(crate) limits: Limits,
    /// How long a worker stopped because of its task has between SIGTERM and SIGKILL.
    pub(crate) stop_grace: Duration,
    /// Where task ids come from (shared with the pool handle).
    pub(crate) next_id: Arc<AtomicU64>,
}

/// Everything behind the pool's lock.
pub(crate) struct Inner {
    pub(crate) policy: Policy<TaskRec>,
    pub(super) io: HashMap<WorkerId, WorkerIo>,
    pub(super) launches: Vec<WorkerId>,
    pub(super) done: Vec<Delivery>,
    pub(super) term_deadline: Option<Instant>,
    pub(super) terminating: bool,
    pub(super) wake_driver: bool,
    /// When the driver next looks at the running tasks' clocks (if it does): a task with a
    /// time limit that may run out before then wakes it.
    pub(super) timer_at: Option<Instant>,
}

/// Shared between the pool handle, the driver thread and submitting threads.
pub(crate) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) wake: OwnedFd,
    pub(super) settings: Settings,
    pub(super) callbacks: Mutex<Option<CallbackThread>>,
    /// Some task had a time limit: the driver watches the running tasks' clocks.
    pub(super) timeouts: AtomicBool,
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
                timer_at: None,
            }),
            wake,
            settings,
            callbacks: Mutex::new(None),
            timeouts: AtomicBool::new(false),
        }))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn wake(&self) {
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
                timer_at: inner.timer_at,
                dirty: Vec::new(),
            };
            // Time reaches the policy here, before every step: starts it held back happen
            // once due.
            inner.policy.advance(Instant::now(), &mut fx);
            let r = step(&mut inner.policy, &mut fx);
            let timer_at = fx.timer_at;
            // Write what the step queued, one write per worker, from this thread; the driver
            // finishes what a socket refuses.
            let mut dirty = std::mem::take(&mut fx.dirty);
            inner.timer_at = timer_at;
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
}

/// Hands each finished task (or piece of one) its outcome.
fn deliver(done: Vec<Delivery>) {
    for d in done {
        // Sinks catch the panics of user code they run; this is the last line of defence,
        // so that one result can never stop the delivery of the others (or the driver).
        let Delivery {
            sink,
            first,
            count,
            outcome,
        } = d;
        let run = move || sink(first, count, outcome);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
            tracing::error!("delivering a task's result panicked; the pool goes on");
        }
    }
}
