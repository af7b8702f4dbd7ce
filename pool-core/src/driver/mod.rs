//! The driver: one thread per pool that owns the workers' I/O and turns what happens to them
//! into policy events.
//!
//! Submitting threads lock [`Inner`](shared::Inner), let the policy pick a worker, queue the
//! task's frame on that worker's connection and write it at once (nonblocking): no thread hop
//! on the way in. The driver thread waits on an epoll set of every worker socket, every
//! worker's pidfd and a wake-up eventfd; it reads results, delivers them (outside the lock),
//! flushes what sockets could not take, launches and reaps workers. A worker's death is seen
//! as EOF on its socket or readiness of its pidfd, never by polling on a timer. A caller
//! blocked in `apply` borrows its worker's socket and reads the answer itself (`reader`): no
//! thread hop on the way out either.
//!
//! - `shared`: the state behind the pool's lock and the one way to change it, [`Shared::act`];
//! - `effects`: the policy's [`Effects`](crate::policy::Effects) on real workers;
//! - `worker_io`: one worker's channel, backlog and progress page;
//! - `launch`: starting a worker and wiring up its channel;
//! - `phase`: what a worker may send when, and partial frames that stop arriving;
//! - `event_loop`: the driver thread: epoll, read, reap, timers;
//! - `reader`: reading a worker's answers, by the driver or by the caller waiting for them;
//! - `callbacks`: the thread that runs result callbacks;
//! - `decode`: a task's outcome into per-item results.

mod callbacks;
mod decode;
mod effects;
mod event_loop;
mod launch;
mod phase;
mod reader;
mod shared;
mod spare;
mod worker_io;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pool_ipc::FrameBuf;
use pool_spawn::protocol::ItemSpans;
use pool_spawn::task::{FnRef, ItemError};

use crate::error::TaskError;
use crate::event::Pins;
use crate::ids::IdSet;

pub(crate) use decode::{decode_items, decode_one, decode_onto, drop_payload};
pub(crate) use effects::Fx;
pub(crate) use event_loop::Driver;
pub(crate) use shared::{Settings, Shared};

/// Result bytes of some items of a batch, left in the frame they arrived in (no copy).
pub(crate) struct Batch {
    pub(super) frame: Vec<u8>,
    pub(super) range: std::ops::Range<usize>,
    /// How many items' results the bytes hold.
    pub(super) items: u64,
    /// The rest of the one result's bytes, after `frame[range]`, when they came in a frame
    /// of their own (`FromWorker::PartTail`); empty otherwise.
    pub(super) tail: Vec<u8>,
    /// The descriptors passed with the results (those of shared bytes among them).
    pub(super) fds: Vec<std::os::fd::OwnedFd>,
}

impl Batch {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.frame[self.range.clone()]
    }
}

/// The result batches of (some items of) a task, in order: those that came in parts, then
/// the last. One batch, the usual case, needs no vector.
#[derive(Default)]
pub(crate) struct Batches {
    parts: Vec<Batch>,
    last: Option<Batch>,
}

impl Batches {
    pub(super) fn new(parts: Vec<Batch>, last: Option<Batch>) -> Self {
        Batches { parts, last }
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Batch> {
        self.parts.iter_mut().chain(self.last.as_mut())
    }
}

impl IntoIterator for Batches {
    type Item = Batch;
    type IntoIter = std::iter::Chain<std::vec::IntoIter<Batch>, std::option::IntoIter<Batch>>;

    fn into_iter(self) -> Self::IntoIter {
        self.parts.into_iter().chain(self.last)
    }
}

impl From<Vec<Batch>> for Batches {
    fn from(parts: Vec<Batch>) -> Self {
        Batches::new(parts, None)
    }
}

/// What the driver hands back for (some items of) a task: their result bytes or their
/// failure.
pub(crate) enum Outcome {
    /// The worker sent results: the batches hold one result per item, in order; or the
    /// whole batch failed.
    Done {
        result: Result<Batches, ItemError>,
        /// The worker's name (for errors: every task's outcome names it).
        worker: WorkerName,
        pid: u32,
    },
    /// The items ended without a result.
    Failed(TaskError),
}

/// A worker's name as a task's outcome carries it, for its errors: copied when short (the
/// usual case: every answer carries it, and a count of owners on a shared name, up as the
/// driver reads each answer and down as its results are decoded, cost both), shared
/// otherwise.
#[derive(Clone, Debug)]
pub(crate) enum WorkerName {
    Short { len: u8, bytes: [u8; SHORT_NAME] },
    Shared(Arc<str>),
}

/// The longest name a [`WorkerName`] holds in place.
const SHORT_NAME: usize = 30;

impl WorkerName {
    pub(crate) fn of(name: &Arc<str>) -> Self {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= SHORT_NAME => {
                let mut bytes = [0; SHORT_NAME];
                bytes[..name.len()].copy_from_slice(name.as_bytes());
                WorkerName::Short { len, bytes }
            }
            _ => WorkerName::Shared(Arc::clone(name)),
        }
    }
}

impl From<&str> for WorkerName {
    fn from(name: &str) -> Self {
        WorkerName::of(&Arc::from(name))
    }
}

impl std::ops::Deref for WorkerName {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            // Copied whole from a `str`: always valid.
            WorkerName::Short { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            WorkerName::Shared(name) => name,
        }
    }
}

/// Receives a task's outcome, possibly in pieces: `sink.deliver(first, count, outcome)`
/// covers `count` items from item `first` on (indices among the items the sink was made
/// for). Every item gets exactly one outcome.
pub(crate) type Sink = Arc<dyn Deliver>;

/// One piece of outcome for a sink: items `first..first + count` have `outcome`.
pub(crate) type Piece = (usize, usize, Outcome);

/// What a [`Sink`] does with the outcomes handed to it (any `Fn(first, count, outcome)`).
pub(crate) trait Deliver: Send + Sync {
    /// Items `first..first + count` have `outcome`.
    fn deliver(&self, first: usize, count: usize, outcome: Outcome);

    /// Pieces that came together (the answers of one read), in order: a sink that takes
    /// several at a time for less than one by one (one lock, one count) does so. The
    /// pieces it has not taken when it panics stay in `pieces`, to be handed on.
    fn deliver_run(&self, pieces: &mut dyn Iterator<Item = Piece>) {
        for (first, count, outcome) in pieces {
            self.deliver(first, count, outcome);
        }
    }
}

impl<F: Fn(usize, usize, Outcome) + Send + Sync> Deliver for F {
    fn deliver(&self, first: usize, count: usize, outcome: Outcome) {
        self(first, count, outcome)
    }
}

/// The tasks a submission became (its chunks, and the rests of chunks split after an item
/// failed) that have no outcome yet: what cancelling the submission cancels. A task leaves
/// it when its record leaves the policy, so an endless `imap` keeps only its window here.
#[derive(Debug, Default)]
pub(crate) struct Group {
    ids: Mutex<IdSet>,
    /// Nobody can cancel the submission (a `map` whose caller waits for its result: its
    /// handle never leaves the pool): no ids are kept, and no lock taken for each task.
    unseen: bool,
}

impl Group {
    /// The group of a submission nobody can cancel (see `unseen`).
    pub(crate) fn unseen() -> Arc<Self> {
        // It keeps nothing: one for every such submission, shared, costs no allocation.
        static UNSEEN: std::sync::LazyLock<Arc<Group>> = std::sync::LazyLock::new(|| {
            Arc::new(Group {
                ids: Mutex::default(),
                unseen: true,
            })
        });
        Arc::clone(&UNSEEN)
    }

    pub(crate) fn add(&self, id: u64) {
        if !self.unseen {
            self.lock().insert(id);
        }
    }

    pub(crate) fn remove(&self, id: u64) {
        if !self.unseen {
            self.lock().remove(&id);
        }
    }

    /// Whether nobody can cancel the submission (see [`Group::unseen`]).
    pub(crate) fn is_unseen(&self) -> bool {
        self.unseen
    }

    pub(crate) fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().iter().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdSet> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The parts of a [`TaskRec`] that only some tasks have.
pub(crate) struct TaskExtra {
    /// The bytes of a `RunTail`'s tail frame, sent after `frame` each time it is (kept as
    /// long as `frame`).
    pub(crate) tail: Option<crate::chunk::Tail>,
    /// The events its arguments hold, whose descriptors go with each copy of `frame` sent.
    pub(crate) pins: Pins,
    /// Where its items lie in `frame` (several items only): to send the rest of them when
    /// one fails part way.
    pub(crate) spans: Option<ItemSpans>,
    /// Its span (see `observe`), when somebody listens.
    pub(crate) span: tracing::Span,
}

impl Default for TaskExtra {
    fn default() -> Self {
        TaskExtra {
            tail: None,
            pins: Pins::default(),
            spans: None,
            span: tracing::Span::none(),
        }
    }
}

/// The span of a task nobody listens to.
static NO_SPAN: tracing::Span = tracing::Span::none();

impl TaskExtra {
    /// `None` when there is nothing to keep.
    pub(crate) fn boxed(
        tail: Option<crate::chunk::Tail>,
        pins: Pins,
        spans: Option<ItemSpans>,
    ) -> Option<Box<TaskExtra>> {
        (tail.is_some() || !pins.is_empty() || spans.is_some()).then(|| {
            Box::new(TaskExtra {
                tail,
                pins,
                spans,
                span: tracing::Span::none(),
            })
        })
    }
}

/// A task as the policy holds it: a run of items of one submission.
pub(crate) struct TaskRec {
    /// Its `Run` message; kept until the task is done, to be sent again if a worker dies
    /// before beginning it.
    pub(crate) frame: Option<FrameBuf>,
    /// What only some tasks need (a record of a few hundred bytes is moved and kept for
    /// every task of a map: a `map` of tiny items keeps it small).
    pub(crate) extra: Option<Box<TaskExtra>>,
    pub(crate) sink: Sink,
    /// Its items among the sink's: `first .. first + count`.
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub(crate) func: FnRef,
    /// The function's name, for errors.
    pub(crate) name: &'static str,
    /// The time limit of each item.
    pub(crate) timeout: Option<Duration>,
    /// Its submission's group, unless nobody can cancel the submission (see
    /// [`Group::unseen`]): such a group keeps no ids, and a record that held it would count
    /// its owners up on the submitter's thread and down on the driver's, task by task.
    pub(crate) group: Option<Arc<Group>>,
    pub(crate) sent_at: Option<Instant>,
    /// The worker it was last sent to.
    pub(crate) sent_to: Option<crate::policy::WorkerId>,
    /// When it was handed to the pool.
    pub(crate) queued_at: Instant,
    /// When its worker could begin it: it held it and nothing before it (seen by the
    /// driver, so a round trip late at most).
    pub(crate) started_at: Option<Instant>,
}

impl TaskRec {
    /// Its span (see `observe`); `Span::none()` when nobody listens (kept in `extra`
    /// otherwise: a record moves from the submitter's thread to the driver's, and a map of
    /// tiny items makes one per item).
    pub(crate) fn span(&self) -> &tracing::Span {
        self.extra.as_ref().map_or(&NO_SPAN, |x| &x.span)
    }

    /// Task `id` (this one) leaves its submission's group: it has its outcome.
    pub(crate) fn leave_group(&self, id: u64) {
        if let Some(g) = &self.group {
            g.remove(id);
        }
    }
}

/// One piece of a task's outcome, ready to hand to its sink.
pub(crate) struct Delivery {
    pub(crate) sink: Sink,
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub(crate) outcome: Outcome,
}

impl Delivery {
    /// The whole outcome of `rec`.
    pub(crate) fn all(rec: &TaskRec, outcome: Outcome) -> Self {
        Delivery {
            sink: Arc::clone(&rec.sink),
            first: rec.first,
            count: rec.count,
            outcome,
        }
    }

    /// The whole outcome of `rec`, which it takes its sink from (no count of the sink's
    /// owners taken and given back for each task).
    pub(crate) fn of(rec: TaskRec, outcome: Outcome) -> Self {
        Delivery {
            sink: rec.sink,
            first: rec.first,
            count: rec.count,
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's name reads the same whether an outcome holds it in place (short) or
    /// shares it (long), and a short one is a copy: cloning it counts no owner.
    #[test]
    fn a_worker_name_reads_the_same_short_or_long() {
        let short: Arc<str> = Arc::from("ForkPoolWorker-12");
        let name = WorkerName::of(&short);
        assert!(matches!(name, WorkerName::Short { .. }));
        assert_eq!(&*name.clone(), "ForkPoolWorker-12");
        assert_eq!(Arc::strong_count(&short), 1);
        let long: Arc<str> = Arc::from("a-pool-with-a-very-long-name-indeed-7");
        let name = WorkerName::of(&long);
        assert!(matches!(name, WorkerName::Shared(_)));
        assert_eq!(&*name, &*long);
        let edge: Arc<str> = Arc::from("é".repeat(SHORT_NAME / 2));
        assert_eq!(&*WorkerName::of(&edge), &*edge);
        assert_eq!(&*WorkerName::from(""), "");
    }
}
