//! The policy's effects on real workers: [`Fx`] implements [`Effects`] while the lock is held.

use std::collections::HashMap;
use std::time::Instant;

use pool_ipc::FrameBuf;
use pool_spawn::Signal;
use pool_spawn::protocol::ToWorker;
use serde_bytes::ByteBuf;

use super::shared::Settings;
use super::worker_io::WorkerIo;
use super::{Outcome, TaskRec};
use crate::error::{TaskError, TaskErrorKind};
use crate::policy::{Effects, Finish, TaskId, WorkerId};

/// The policy's effects on the real world, while the lock is held.
pub(crate) struct Fx<'a> {
    pub(super) io: &'a mut HashMap<WorkerId, WorkerIo>,
    pub(super) launches: &'a mut Vec<WorkerId>,
    pub(super) done: &'a mut Vec<(TaskRec, Outcome)>,
    pub(super) wake_driver: &'a mut bool,
    pub(super) settings: &'a Settings,
    pub(super) terminating: bool,
    /// Workers with frames queued by this step, written once when the step ends.
    pub(super) dirty: Vec<WorkerId>,
}

impl Effects<TaskRec> for Fx<'_> {
    fn launch(&mut self, wid: WorkerId) {
        let name = format!("{}-{wid}", self.settings.prefix);
        self.io.insert(wid, WorkerIo::new(name));
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
            Finish::CannotStart(m) => TaskError::new(TaskErrorKind::StartFailed, m),
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
