//! The state shared by the pool handle, the driver thread and submitting threads, behind one
//! lock; [`Shared::act`] runs a policy step under it and delivers outcomes after it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pool_ipc::Config as IpcConfig;
use pool_spawn::task::FnRef;
use rustix::event::EventfdFlags;

use super::callbacks::CallbackThread;
use super::effects::Fx;
use super::worker_io::WorkerIo;
use super::{Outcome, TaskRec};
use crate::policy::{Policy, WorkerId};

/// How long a terminated worker has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);

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
    pub(super) io: HashMap<WorkerId, WorkerIo>,
    pub(super) launches: Vec<WorkerId>,
    pub(super) done: Vec<(TaskRec, Outcome)>,
    pub(super) term_deadline: Option<Instant>,
    pub(super) terminating: bool,
    pub(super) wake_driver: bool,
}

/// Shared between the pool handle, the driver thread and submitting threads.
pub(crate) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) wake: OwnedFd,
    pub(super) settings: Settings,
    pub(super) callbacks: Mutex<Option<CallbackThread>>,
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
                dirty: Vec::new(),
            };
            // Time reaches the policy here, before every step: starts it held back happen
            // once due.
            inner.policy.advance(Instant::now(), &mut fx);
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
}

/// Hands each finished task its outcome.
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
