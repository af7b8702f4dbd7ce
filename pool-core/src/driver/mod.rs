//! The driver: one thread per pool that owns the workers' I/O and turns what happens to them
//! into policy events.
//!
//! Submitting threads lock [`Inner`](shared::Inner), let the policy pick a worker, queue the
//! task's frame on that worker's connection and write it at once (nonblocking): no thread hop
//! on the way in. The driver thread polls every worker socket, every worker's pidfd and a
//! wake-up eventfd; it reads results, delivers them (outside the lock), flushes what sockets
//! could not take, launches and reaps workers. A worker's death is seen as EOF on its socket
//! or readiness of its pidfd, never by polling on a timer.
//!
//! - `shared`: the state behind the pool's lock and the one way to change it, [`Shared::act`];
//! - `effects`: the policy's [`Effects`](crate::policy::Effects) on real workers;
//! - `worker_io`: one worker's channel, backlog and progress page;
//! - `launch`: starting a worker and wiring up its channel;
//! - `phase`: what a worker may send when, and partial frames that stop arriving;
//! - `event_loop`: the driver thread: poll, read, reap, timers;
//! - `callbacks`: the thread that runs result callbacks;
//! - `decode`: a task's outcome into per-item results.

mod callbacks;
mod decode;
mod effects;
mod event_loop;
mod launch;
mod phase;
mod shared;
mod worker_io;

use std::time::Instant;

use pool_ipc::FrameBuf;
use pool_spawn::task::ItemError;

use crate::error::TaskError;

pub(crate) use decode::{decode_items, drop_payload};
pub(crate) use event_loop::Driver;
pub(crate) use shared::{Settings, Shared};

/// A batch's result bytes, left in the frame they arrived in (no copy).
pub(crate) struct Batch {
    pub(super) frame: Vec<u8>,
    pub(super) range: std::ops::Range<usize>,
}

impl Batch {
    pub(super) fn bytes(&self) -> &[u8] {
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
