//! A chunk of items as one task: its Run frame (built by `pool_spawn::protocol`), the items
//! set aside because they cannot be encoded, and how the worker's results are put back in
//! item order.

use pool_ipc::FrameBuf;
use pool_spawn::protocol::{ItemSpans, RunItems};
use pool_spawn::task::FnRef;

use crate::error::{Chain, TaskError, TaskErrorKind};
use crate::event::{self, Pins};
use crate::items::Items;
use crate::task::Task;

/// A chunk of items, encoded as the Run message of task `id`, with the items that could not
/// be encoded set aside.
pub(crate) struct Encoded {
    pub(crate) id: u64,
    /// The Run frame, or why it could not be built.
    pub(crate) frame: Result<FrameBuf, TaskError>,
    /// Where its items lie in the frame (several items only).
    pub(crate) spans: Option<ItemSpans>,
    /// Where each of the worker's results belongs among the chunk's items.
    pub(crate) placement: Placement,
    /// Events among the items, kept open until the task is done.
    pub(crate) pins: Pins,
    /// The bytes of a task of one large byte string, sent from here as the frame after
    /// `frame` (a `RunTail`), not copied into it.
    pub(crate) tail: Option<Tail>,
}

/// Byte strings above this many bytes go as a tail (see [`take_tail`]): those that take
/// the shared ring...
const TAIL_MIN: usize = pool_spawn::protocol::SHM_THRESHOLD;
/// ... up to this many (far below the frame limit, which larger ones are checked against
/// on the usual path).
const TAIL_MAX: usize = 64 << 20;

/// The bytes of a large byte-string argument, sent as a frame of their own. Dropped (the
/// task done), its buffer is kept for a later large payload.
pub(crate) struct Tail(Vec<u8>);

impl Tail {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        pool_ipc::keep_buffer(std::mem::take(&mut self.0));
    }
}

/// If `items` is one item whose arguments are one large byte string (`(ByteBuf,)` or
/// `(Vec<u8>,)`), takes the string's bytes out of it: the task is sent as a `RunTail`
/// whose tail they are, without copying them into a Run frame (the pool copies them once,
/// into the worker's shared ring, and the worker's copy out of it is the argument).
pub(crate) fn take_tail<A: 'static>(items: &mut Vec<A>) -> Option<Vec<u8>> {
    use std::any::Any;
    let [one] = items.as_slice() else {
        return None;
    };
    let any: &dyn Any = one;
    let len = if let Some((b,)) = any.downcast_ref::<(serde_bytes::ByteBuf,)>() {
        b.len()
    } else {
        any.downcast_ref::<(Vec<u8>,)>()?.0.len()
    };
    if !(TAIL_MIN + 1..=TAIL_MAX).contains(&len) {
        return None;
    }
    let item: Box<dyn Any> = Box::new(items.pop()?);
    match item.downcast::<(serde_bytes::ByteBuf,)>() {
        Ok(b) => Some(b.0.into_vec()),
        Err(item) => item.downcast::<(Vec<u8>,)>().ok().map(|v| v.0),
    }
}

/// Whether [`take_tail`] may take anything out of items of type `A` (one byte string as
/// the only argument): for any other type it never does, and the items need not be given
/// up in a `Vec` for it.
pub(crate) fn may_have_tail<A: 'static>() -> bool {
    use std::any::TypeId;
    let a = TypeId::of::<A>();
    a == TypeId::of::<(serde_bytes::ByteBuf,)>() || a == TypeId::of::<(Vec<u8>,)>()
}

/// The task `id` of one byte-string argument, `tail` (see [`take_tail`]).
pub(crate) fn encode_tail(id: u64, func: FnRef, timed: bool, tail: Vec<u8>) -> Encoded {
    let frame = pool_spawn::protocol::encode_run_tail(id, func, timed, tail.len());
    let mut enc = Encoded::new(
        id,
        RunItems {
            frame,
            sent: Vec::new(),
            failed: Vec::new(),
            spans: None,
        },
        1,
        Pins::default(),
    );
    enc.tail = Some(Tail(tail));
    enc
}

/// Which of a chunk's items were sent, which failed to encode (and why), and so where each
/// result the worker sends back belongs.
#[derive(Debug)]
pub(crate) struct Placement {
    /// Relative index of each encoded item, in order; `None` when every item was (a large
    /// map's chunks would otherwise keep a `usize` per item until they are done).
    sent: Option<Vec<usize>>,
    /// Items that failed to encode, by relative index.
    failed: Vec<(usize, TaskError)>,
    /// Items in the chunk.
    len: usize,
}

/// Encodes `items` as the Run frame of task `id` (see `protocol::encode_run_items`), keeping
/// the events they hold open.
pub(crate) fn encode_chunk<F: Task<Args>, Args>(
    id: u64,
    func: FnRef,
    timed: bool,
    items: &[Args],
) -> Encoded {
    let (run, pins) = event::pinning(|| F::encode_run(id, func, timed, items));
    Encoded::new(id, run, items.len(), pins)
}

impl Encoded {
    fn new(id: u64, run: RunItems, len: usize, pins: Pins) -> Self {
        let RunItems {
            frame,
            sent,
            failed,
            spans,
        } = run;
        let failed: Vec<(usize, TaskError)> = failed
            .into_iter()
            .map(|(i, e)| {
                let e = TaskError::new(
                    TaskErrorKind::Encode,
                    format!("the task's arguments cannot be encoded: {}", Chain(&e)),
                );
                (i, e)
            })
            .collect();
        Encoded {
            id,
            frame: frame.map_err(|e| {
                TaskError::new(
                    TaskErrorKind::Encode,
                    format!("the task message: {}", Chain(&e)),
                )
            }),
            spans,
            placement: Placement {
                sent: (!failed.is_empty()).then_some(sent),
                failed,
                len,
            },
            pins,
            tail: None,
        }
    }
}

impl Placement {
    /// Whether every item was sent (none failed to encode).
    pub(crate) fn all_sent(&self) -> bool {
        self.failed.is_empty()
    }

    /// Items the worker gets (and sends results for).
    pub(crate) fn sent(&self) -> usize {
        self.sent.as_ref().map_or(self.len, Vec::len)
    }

    /// The worker's results for the sent items (`got`, in order) and the encode failures,
    /// one per item of the chunk in item order; errors carry their item's index, `base`
    /// plus the relative one, when the chunk is part of a `map` (`base` is `Some`).
    pub(crate) fn merge<R>(self, got: Items<R>, base: Option<usize>) -> Items<R> {
        let Placement { sent, failed, len } = self;
        let index = move |i: usize, e: TaskError| match base {
            Some(b) => e.with_item(b + i),
            None => e,
        };
        if failed.is_empty() && got.len() == len {
            // Every item was sent and answered: only errors need their index.
            return match got {
                Items::Ok(v) => Items::Ok(v),
                Items::Mixed(v) => Items::Mixed(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, r)| r.map_err(|e| index(i, e)))
                        .collect(),
                ),
            };
        }
        let got = got.into_results();
        let mut out: Vec<Option<Result<R, TaskError>>> = (0..len).map(|_| None).collect();
        for (i, e) in failed {
            out[i] = Some(Err(index(i, e)));
        }
        let sent: Box<dyn Iterator<Item = usize>> = match &sent {
            Some(sent) => Box::new(sent.iter().copied()),
            None => Box::new(0..len),
        };
        for (i, r) in sent.zip(got) {
            out[i] = Some(r.map_err(|e| index(i, e)));
        }
        Items::Mixed(
            out.into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| {
                        Err(TaskError::new(TaskErrorKind::Decode, "missing result"))
                    })
                })
                .collect(),
        )
    }
}

/// The most items an automatic chunk holds (see [`auto_chunksize`]).
pub(crate) const AUTO_CHUNK_MAX: usize = 8192;

/// The default chunk size: Python's, about four chunks per worker, while that makes
/// chunks of at most [`AUTO_CHUNK_MAX`] items; beyond, as many more chunks per worker (a
/// whole number each, so that the workers get equal shares) as keep them within it. Up to
/// that size Python's rule holds (fewer, larger chunks cost less per item when items are
/// tiny); beyond it, larger chunks only cost: each is encoded whole before a worker can
/// begin it and decoded whole once it ends, so the workers start later and the last
/// results come later; its frames outgrow the channel's read buffer and take a buffer of
/// their own; and a huge map keeps megabytes per chunk in flight.
pub(crate) fn auto_chunksize(len: usize, processes: usize) -> usize {
    if len == 0 {
        return 1;
    }
    let processes = processes.max(1);
    let per_worker = len
        .div_ceil(processes.saturating_mul(AUTO_CHUNK_MAX))
        .max(4);
    len.div_ceil(processes.saturating_mul(per_worker)).max(1)
}

#[cfg(test)]
mod tests {
    use pool_spawn::protocol::ToWorker;
    use serde::{Deserialize, Serialize, Serializer};

    use super::*;

    /// An argument that cannot be encoded when it is odd.
    #[derive(Deserialize)]
    struct EvenOnly(u32);

    impl Serialize for EvenOnly {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.0 % 2 == 1 {
                return Err(serde::ser::Error::custom("odd"));
            }
            s.serialize_u32(self.0)
        }
    }

    fn halve(x: EvenOnly) -> u32 {
        x.0 / 2
    }

    fn chunk(items: &[u32]) -> Encoded {
        let items: Vec<(EvenOnly,)> = items.iter().map(|&x| (EvenOnly(x),)).collect();
        let func = pool_spawn::task::batch_ref(halve);
        encode_chunk::<fn(EvenOnly) -> u32, (EvenOnly,)>(7, func, false, &items)
    }

    /// The worker's view of a Run frame: its id and its items.
    fn run_items(frame: &FrameBuf) -> (u64, Vec<u32>) {
        match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(frame.payload()).unwrap() {
            ToWorker::Run { id, payload, .. } => (id, postcard::from_bytes(payload).unwrap()),
            _ => panic!("not a Run message"),
        }
    }

    #[test]
    fn a_chunk_sends_the_items_that_encode_and_sets_the_others_aside() {
        let whole = chunk(&[2, 4, 6]);
        assert_eq!(run_items(whole.frame.as_ref().unwrap()), (7, vec![2, 4, 6]));
        assert_eq!(whole.placement.sent(), 3);

        let enc = chunk(&[2, 3, 4, 5]);
        assert_eq!(enc.id, 7);
        assert_eq!(run_items(enc.frame.as_ref().unwrap()), (7, vec![2, 4]));
        assert_eq!(enc.placement.sent(), 2);
        // The worker answers the two items it got; the merge puts every result in place.
        let got = Items::Mixed(vec![Ok(1), Err(TaskError::panicked("boom".into()))]);
        let out = enc.placement.merge(got, Some(100)).into_results();
        assert_eq!(out.len(), 4);
        assert_eq!(*out[0].as_ref().unwrap(), 1);
        let e = out[1].as_ref().unwrap_err();
        assert_eq!(
            (e.kind(), e.item_index()),
            (TaskErrorKind::Encode, Some(101))
        );
        assert!(e.message().contains("cannot be encoded"), "{e}");
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(
            (e.kind(), e.item_index()),
            (TaskErrorKind::Panicked, Some(102))
        );
        assert_eq!(out[3].as_ref().unwrap_err().item_index(), Some(103));
    }

    #[test]
    fn a_chunk_whose_items_all_succeeded_keeps_the_values_alone() {
        let enc = chunk(&[2, 4, 6]);
        let out = enc.placement.merge(Items::Ok(vec![1u32, 2, 3]), Some(100));
        assert!(matches!(out, Items::Ok(v) if v == [1, 2, 3]));
    }

    #[test]
    fn a_result_missing_from_the_worker_fails_its_item_and_apply_errors_have_no_index() {
        let enc = chunk(&[2, 4]);
        let out = enc
            .placement
            .merge(Items::Ok(vec![1u32]), None)
            .into_results();
        assert_eq!(*out[0].as_ref().unwrap(), 1);
        let e = out[1].as_ref().unwrap_err();
        assert_eq!((e.kind(), e.item_index()), (TaskErrorKind::Decode, None));
        assert!(e.message().contains("missing result"), "{e}");
    }

    #[test]
    fn auto_chunksize_is_pythons_four_chunks_per_worker_up_to_a_bound() {
        assert_eq!(auto_chunksize(0, 4), 1);
        assert_eq!(auto_chunksize(3, 4), 1);
        assert_eq!(auto_chunksize(16, 4), 1);
        assert_eq!(auto_chunksize(17, 4), 2);
        assert_eq!(auto_chunksize(100, 4), 7);
        assert_eq!(auto_chunksize(1000, 1), 250);
        assert_eq!(auto_chunksize(8 * AUTO_CHUNK_MAX, 2), AUTO_CHUNK_MAX);
        // Beyond, a whole number of chunks per worker, each within the bound.
        assert_eq!(auto_chunksize(8 * AUTO_CHUNK_MAX + 1, 2), 6554);
        assert_eq!(auto_chunksize(100_000, 2), 7143);
        assert_eq!(auto_chunksize(200_000, 2), 7693);
        for (n, w) in [
            (10_000_000, 2),
            (1 << 40, 3),
            (usize::MAX, 64),
            (123_457, 7),
        ] {
            let size = auto_chunksize(n, w);
            assert!((1..=AUTO_CHUNK_MAX).contains(&size), "{n} {w}: {size}");
        }
        assert_eq!(auto_chunksize(usize::MAX, 1), AUTO_CHUNK_MAX);
    }
}
