//! A task's outcome into per-item results: the worker's result bytes decoded as the caller's
//! type, item errors and panics turned into [`TaskError`]s.

use pool_spawn::protocol;
use pool_spawn::task::ItemError;

use super::Outcome;
use crate::error::{TaskError, TaskErrorKind};
use crate::items::Items;

/// Turns a worker's result bytes into per-item results.
pub(crate) fn decode_items<R: serde::de::DeserializeOwned + 'static>(
    outcome: Outcome,
    count: usize,
) -> Items<R> {
    let mut oks = Vec::with_capacity(count);
    match decode_onto(outcome, count, &mut oks) {
        None => Items::Ok(oks),
        Some(items) => items,
    }
}

/// The result of the one item of a task (an `apply`'s): as [`decode_items`] would give
/// it, decoded with no vector when the item succeeded.
pub(crate) fn decode_one<R: serde::de::DeserializeOwned + 'static>(
    outcome: Outcome,
    count: usize,
) -> Result<R, TaskError> {
    // The usual answer with its one result a success: decoded as it is. Anything else goes
    // the general way.
    let quick = try_usual(outcome, |items, bytes| {
        if count != 1 || items != 1 {
            return None;
        }
        protocol::decode_ok_one::<R>(bytes).ok().flatten()
    });
    match quick {
        Usual::Decoded(v) => Ok(v),
        Usual::Panicked(e) => Err(e),
        Usual::Other(outcome) => decode_items::<R>(outcome, count)
            .into_last()
            .unwrap_or_else(|| Err(TaskError::new(TaskErrorKind::Decode, "no result"))),
    }
}

/// [`decode_items`], the values appended to `onto` while every item succeeds: `None` when
/// all `count` of them did (they are the last `count` elements of `onto`); otherwise the
/// per-item results, `onto` cut back to what it held.
pub(crate) fn decode_onto<R: serde::de::DeserializeOwned + 'static>(
    outcome: Outcome,
    count: usize,
    onto: &mut Vec<R>,
) -> Option<Items<R>> {
    let base = onto.len();
    // The usual answer with every item a success: decoded onto `onto` with nothing else to
    // set up. Anything else (or a decode that stops short, or panics) goes the general way
    // below, from the start.
    let quick = try_usual(outcome, |items, bytes| {
        match protocol::decode_ok_results(items, bytes, onto) {
            Ok(None) if onto.len() - base == count => Some(()),
            _ => {
                cut_back(onto, base);
                None
            }
        }
    });
    let outcome = match quick {
        Usual::Decoded(()) => return None,
        Usual::Panicked(e) => {
            cut_back(onto, base);
            return Some(all_err(e, count));
        }
        Usual::Other(outcome) => outcome,
    };
    match outcome {
        Outcome::Failed(e) => Some(all_err(e, count)),
        Outcome::Done {
            result,
            worker,
            pid,
        } => {
            let batches = match result {
                Ok(b) => b,
                Err(e) => return Some(all_err(item_error(e, &worker, pid), count)),
            };
            // The result type's `Deserialize` is user code: a panic in it fails these
            // items, never the thread that delivers results.
            // Decoded straight into the caller's type: an item error becomes a TaskError
            // as it is read, with no list of the worker's results in between.
            let mut batches = batches;
            // A note left by an earlier failure on this thread is not this one's.
            let _stale = pool_spawn::task::take_decode_note();
            let oks = &mut *onto;
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // The values alone while every item succeeded (onto `oks`, after its first
                // `base`); a result per item from the first that failed.
                let mut mixed: Option<Vec<Result<R, TaskError>>> = None;
                let err = |e| Err(item_error(e, &worker, pid));
                for b in batches.iter_mut() {
                    // Shared bytes among the results map the descriptors passed with them.
                    let _passed = protocol::passing(std::mem::take(&mut b.fds));
                    // A large result's bytes in a buffer of their own: it becomes the value
                    // as it is.
                    let tail = std::mem::take(&mut b.tail);
                    let Some(m) = &mut mixed else {
                        // Every item so far succeeded.
                        if tail.is_empty() {
                            let stop = protocol::decode_ok_results(b.items, b.bytes(), oks)
                                .map_err(why)?;
                            let Some((i, rest)) = stop else { continue };
                            let m = mixed.insert(Vec::with_capacity(count));
                            m.extend(oks.drain(base..).map(Ok));
                            protocol::decode_item_results(b.items - i, rest, m, Ok, err)
                                .map_err(why)?;
                        } else {
                            let mut one = Vec::with_capacity(1);
                            protocol::decode_item_result_tail(b.bytes(), tail, &mut one, Ok, err)
                                .map_err(why)?;
                            match one.pop() {
                                Some(Ok(v)) if one.is_empty() => oks.push(v),
                                last => {
                                    let m = mixed.insert(Vec::with_capacity(count));
                                    m.extend(oks.drain(base..).map(Ok));
                                    m.extend(one);
                                    m.extend(last);
                                }
                            }
                        }
                        continue;
                    };
                    if tail.is_empty() {
                        protocol::decode_item_results(b.items, b.bytes(), m, Ok, err)
                    } else {
                        protocol::decode_item_result_tail(b.bytes(), tail, m, Ok, err)
                    }
                    .map_err(why)?;
                }
                Ok::<_, String>(mixed)
            }));
            // The frames are done with: their buffers hold later frames.
            for b in batches {
                super::spare::give(b.frame);
            }
            let decoded = match decoded {
                Ok(d) => d,
                Err(payload) => {
                    cut_back(onto, base);
                    return Some(all_err(decode_panicked(payload, &worker, pid), count));
                }
            };
            let got = match &decoded {
                Ok(Some(m)) => m.len(),
                Ok(None) => onto.len() - base,
                Err(_) => 0,
            };
            match decoded {
                Ok(None) if got == count => None,
                Ok(Some(m)) if got == count => Some(Items::Mixed(m)),
                Ok(_) => {
                    cut_back(onto, base);
                    let e = TaskError::new(
                        TaskErrorKind::Decode,
                        format!("expected {count} results from the worker, got {got}"),
                    )
                    .with_worker(&worker, pid);
                    Some(all_err(e, count))
                }
                Err(e) => {
                    cut_back(onto, base);
                    let e = TaskError::new(TaskErrorKind::Decode, e).with_worker(&worker, pid);
                    Some(all_err(e, count))
                }
            }
        }
    }
}

/// The usual answer to a task: its results in one batch, in the frame they came in, with no
/// parts, tail or descriptors. `quick` decodes them from the batch's item count and bytes
/// (under `catch_unwind`: the result type's `Deserialize` is user code), its frame given
/// back for reuse unless `quick` says `None`.
fn try_usual<T>(outcome: Outcome, quick: impl FnOnce(u64, &[u8]) -> Option<T>) -> Usual<T> {
    match outcome {
        Outcome::Done {
            result: Ok(mut batches),
            worker,
            pid,
        } if batches.parts.is_empty() => {
            if let Some(b) = batches.last.take() {
                if b.tail.is_empty() && b.fds.is_empty() {
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        quick(b.items, b.bytes())
                    }));
                    match got {
                        Ok(Some(v)) => {
                            super::spare::give(b.frame);
                            return Usual::Decoded(v);
                        }
                        Err(payload) => {
                            super::spare::give(b.frame);
                            return Usual::Panicked(decode_panicked(payload, &worker, pid));
                        }
                        Ok(None) => {}
                    }
                }
                batches.last = Some(b);
            }
            Usual::Other(Outcome::Done {
                result: Ok(batches),
                worker,
                pid,
            })
        }
        outcome => Usual::Other(outcome),
    }
}

/// What [`try_usual`] made of an answer.
enum Usual<T> {
    /// Its results, decoded.
    Decoded(T),
    /// The decode panicked: the error of every item.
    Panicked(TaskError),
    /// Not the usual answer, or one the quick decode left: the outcome as it came.
    Other(Outcome),
}

/// The error of items whose result's `Deserialize` panicked with `payload`.
fn decode_panicked(payload: Box<dyn std::any::Any + Send>, worker: &str, pid: u32) -> TaskError {
    let why = panic_text(&*payload);
    drop_payload(payload);
    TaskError::new(
        TaskErrorKind::Decode,
        format!("decoding the result panicked in the pool's process: {why}"),
    )
    .with_worker(worker, pid)
}

/// Cuts `v` back to `len` elements; the values dropped are user code, whose `Drop` may
/// panic: never let that escape.
fn cut_back<R>(v: &mut Vec<R>, len: usize) {
    if v.len() > len {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.truncate(len)));
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

fn all_err<R>(e: TaskError, count: usize) -> Items<R> {
    Items::Mixed((0..count).map(|_| Err(e.clone())).collect())
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

/// Why a result did not decode: the note its `Deserialize` left (shared bytes that cannot
/// be mapped, say), else the decoder's error `e`.
fn why(e: impl std::fmt::Display) -> String {
    match pool_spawn::task::take_decode_note() {
        Some(note) => format!("the result cannot be decoded: {note}"),
        None => format!("the result does not decode as the expected type: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use pool_spawn::task::ItemErrorKind;
    use serde::de::{Deserialize, Deserializer};

    use super::super::{Batch, Batches};
    use super::*;

    /// A `Done` outcome whose result bytes sit in the middle of a larger frame, as they
    /// arrive from a worker.
    fn done<T: serde::Serialize>(items: &[Result<T, ItemError>]) -> Outcome {
        Outcome::Done {
            result: Ok(vec![batch(items)].into()),
            worker: "W-1".into(),
            pid: 42,
        }
    }

    /// The results of `items`, one after the other, in the middle of a larger frame.
    fn batch<T: serde::Serialize>(items: &[Result<T, ItemError>]) -> Batch {
        let mut bytes = Vec::new();
        for item in items {
            bytes.extend(postcard::to_allocvec(item).unwrap());
        }
        let mut frame = vec![0xAA; 5];
        frame.extend_from_slice(&bytes);
        frame.extend_from_slice(&[0xBB; 3]);
        Batch {
            tail: Vec::new(),
            fds: Vec::new(),
            frame,
            range: 5..5 + bytes.len(),
            items: items.len() as u64,
        }
    }

    #[test]
    fn results_sent_in_several_parts_decode_as_one_run() {
        let outcome = Outcome::Done {
            result: Ok(Batches::new(
                vec![batch(&[Ok::<u32, ItemError>(1), Ok(2)]), batch::<u32>(&[])],
                Some(batch(&[Ok::<u32, ItemError>(3)])),
            )),
            worker: "W-1".into(),
            pid: 42,
        };
        // Every item succeeded: the values alone.
        assert!(matches!(decode_items::<u32>(outcome, 3), Items::Ok(v) if v == [1, 2, 3]));
        // An item failed in a later part: a result per item, in order, the values decoded
        // before it included.
        let panicked = ItemError::new(ItemErrorKind::Panicked, "boom");
        let outcome = Outcome::Done {
            result: Ok(vec![
                batch(&[Ok::<u32, ItemError>(1), Ok(2)]),
                batch(&[Ok::<u32, ItemError>(3), Err(panicked), Ok(5)]),
                batch(&[Ok::<u32, ItemError>(6)]),
            ]
            .into()),
            worker: "W-1".into(),
            pid: 42,
        };
        let got = decode_items::<u32>(outcome, 6);
        assert!(matches!(got, Items::Mixed(_)));
        let got = got.into_results();
        let oks: Vec<Option<u32>> = got.iter().map(|r| r.as_ref().ok().copied()).collect();
        assert_eq!(oks, [Some(1), Some(2), Some(3), None, Some(5), Some(6)]);
        assert_eq!(got[3].as_ref().unwrap_err().kind(), TaskErrorKind::Panicked);
    }

    #[test]
    fn results_decode_in_place_and_item_errors_keep_their_kind_and_worker() {
        let items = [
            Ok(7u32),
            Err(ItemError::new(
                ItemErrorKind::Panicked,
                "boom at src/x.rs:1",
            )),
            Err(ItemError::new(ItemErrorKind::Decode, "bad argument")),
            Ok(9),
        ];
        let got = decode_items::<u32>(done(&items), 4).into_results();
        assert_eq!(got[0].as_ref().unwrap(), &7);
        assert_eq!(got[3].as_ref().unwrap(), &9);
        let panic = got[1].as_ref().unwrap_err();
        assert_eq!(panic.kind(), TaskErrorKind::Panicked);
        assert_eq!(panic.panic_message(), Some("boom at src/x.rs:1"));
        assert_eq!((panic.worker_name(), panic.pid()), (Some("W-1"), Some(42)));
        assert_eq!(got[2].as_ref().unwrap_err().kind(), TaskErrorKind::Decode);
    }

    #[test]
    fn a_wrong_count_a_wrong_type_or_a_failed_batch_fails_every_item() {
        let wrong_count = decode_items::<u32>(done(&[Ok::<u32, ItemError>(1)]), 2).into_results();
        assert_eq!(wrong_count.len(), 2);
        for r in &wrong_count {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.kind(), TaskErrorKind::Decode);
            assert!(e.message().contains("expected 2 results"), "{e}");
        }
        let wrong_type =
            decode_items::<String>(done(&[Ok::<u8, ItemError>(0xFF)]), 1).into_results();
        let e = wrong_type[0].as_ref().unwrap_err();
        assert!(
            e.message().contains("does not decode as the expected type"),
            "{e}"
        );
        let whole = Outcome::Done {
            result: Err(ItemError::new(ItemErrorKind::Encode, "too large")),
            worker: "W-2".into(),
            pid: 7,
        };
        let got = decode_items::<u32>(whole, 3).into_results();
        assert_eq!(got.len(), 3);
        assert!(
            got.iter()
                .all(|r| r.as_ref().unwrap_err().kind() == TaskErrorKind::Encode)
        );
        let failed = decode_items::<u32>(
            Outcome::Failed(TaskError::new(TaskErrorKind::PoolClosed, "closed")),
            2,
        )
        .into_results();
        assert!(
            failed
                .iter()
                .all(|r| r.as_ref().unwrap_err().kind() == TaskErrorKind::PoolClosed)
        );
    }

    /// A result type that never decodes, and says why.
    #[derive(Debug)]
    struct Gone;

    impl<'de> Deserialize<'de> for Gone {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            use serde::de::Error as _;
            u8::deserialize(d)?;
            pool_spawn::task::note_decode_failure("the resource it names is gone");
            Err(D::Error::custom("the resource it names is gone"))
        }
    }

    #[test]
    fn a_result_that_cannot_be_decoded_says_why_in_its_types_words() {
        let got = decode_items::<Gone>(done(&[Ok::<u8, ItemError>(1)]), 1).into_results();
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::Decode);
        assert!(
            e.message()
                .contains("cannot be decoded: the resource it names is gone"),
            "{e}"
        );
        // A note left by an earlier failure does not stick to a later one.
        pool_spawn::task::note_decode_failure("stale");
        let got = decode_items::<String>(done(&[Ok::<u8, ItemError>(0xFF)]), 1).into_results();
        let e = got[0].as_ref().unwrap_err();
        assert!(!e.message().contains("stale"), "{e}");
    }

    /// A result type whose `Deserialize` panics.
    #[derive(Debug)]
    struct Grumpy;

    impl<'de> Deserialize<'de> for Grumpy {
        fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            panic!("grumpy today")
        }
    }

    /// Calls of [`Counted`]'s `Deserialize`.
    static COUNTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A result type whose `Deserialize` counts its calls and panics.
    #[derive(Debug)]
    struct Counted;

    impl<'de> Deserialize<'de> for Counted {
        fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            COUNTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            panic!("counted")
        }
    }

    /// The usual answer (one batch, every item a success) decodes the quick way; a panic
    /// there is its items' error at once, not a second run of the user's `Deserialize`.
    #[test]
    fn a_result_that_panics_is_decoded_once() {
        let got = decode_items::<Counted>(done(&[Ok::<u8, ItemError>(1)]), 1).into_results();
        let e = got[0].as_ref().unwrap_err();
        assert!(
            e.message()
                .contains("panicked in the pool's process: counted"),
            "{e}"
        );
        assert_eq!(COUNTED.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The quick way and the general one agree on plain values.
        let ok = [Ok::<u64, ItemError>(3), Ok(u64::MAX), Ok(0)];
        assert!(matches!(decode_items::<u64>(done(&ok), 3), Items::Ok(v) if v == [3, u64::MAX, 0]));
    }

    #[test]
    fn a_panicking_deserialize_fails_the_items_not_the_caller() {
        let got = decode_items::<Grumpy>(done(&[Ok::<u8, ItemError>(1)]), 1).into_results();
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::Decode);
        assert!(
            e.message()
                .contains("panicked in the pool's process: grumpy today"),
            "{e}"
        );
        assert_eq!(e.pid(), Some(42));
    }
}
