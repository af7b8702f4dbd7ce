//! One worker's I/O state: its channel, the frames waiting for it, and what it has begun.

use std::collections::VecDeque;
use std::time::Instant;

use pool_ipc::{FrameBuf, FramedConn};
use pool_spawn::{ExitStatus, Worker};

/// One worker's I/O state.
pub(super) struct WorkerIo {
    pub(super) name: String,
    pub(super) pid: u32,
    pub(super) conn: Option<FramedConn>,
    /// Frames for a worker still starting (no channel yet), and whether each is a task.
    pub(super) backlog: Vec<(FrameBuf, bool)>,
    /// Where each task frame queued on `conn` ends in its stream, oldest first (entries
    /// already written are dropped as they are found): a task whose frame has not left
    /// entirely when the worker dies never reached it.
    pub(super) task_ends: VecDeque<u64>,
    /// The page where the worker counts the tasks it began (see `ToWorker::Setup`).
    pub(super) progress: Option<pool_ipc::shm::Segment>,
    /// Results (`Done` messages) received from the worker.
    pub(super) results: u64,
    pub(super) handle: Option<Worker>,
    pub(super) status: Option<ExitStatus>,
    pub(super) kill_when_launched: bool,
    pub(super) exit_note: Option<String>,
    /// When this worker's last result arrived.
    pub(super) last_done: Option<Instant>,
    /// What it may send next, and whether a frame from it is stuck partway.
    pub(super) guard: super::phase::Guard,
}

impl WorkerIo {
    /// A worker about to be launched: no process, no channel yet.
    pub(super) fn new(name: String) -> Self {
        WorkerIo {
            name,
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
            guard: Default::default(),
        }
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

    /// Whether the worker had begun a task it sent no result for: `None` if it has no
    /// progress page.
    pub(super) fn was_running(&self) -> Option<bool> {
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
    pub(super) fn undelivered_tasks(&self) -> usize {
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
