//! The messages between a pool and one worker, and the image identity check.
//!
//! One socket per worker. The parent drives it with a nonblocking `pool_ipc::FramedConn`
//! (or any pool-ipc type), the worker with a blocking `pool_ipc::Duplex<FromWorker,
//! ToWorker>`; both speak postcard frames, configured by [`channel_config`] (the parent's
//! end must use it too: large payloads travel through shared memory).
//!
//! Worker lifecycle: started → receives [`ToWorker::Setup`] → checks the [`ImageId`]
//! (mismatch: [`FromWorker::SetupFailed`] with [`SetupFailure::ImageMismatch`], exit code
//! [`EXIT_IMAGE_MISMATCH`]) → runs the initializer (failure: `SetupFailed` with
//! [`SetupFailure::Initializer`], exit code [`EXIT_INIT_FAILED`]) → sends
//! [`FromWorker::Ready`] → loop: [`ToWorker::Run`] → [`FromWorker::Done`]; after
//! `max_tasks` runs it sends the last `Done`, flushes and exits 0. End of file on its
//! channel, or [`ToWorker::Exit`], also ends it with exit code 0.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::task::{FnRef, ItemError};

/// Payloads larger than this travel through a shared-memory ring instead of the socket.
pub const SHM_THRESHOLD: usize = 256 * 1024;

/// Frames larger than this are announced on a worker's channel: a header that claims more
/// without an announcement is refused at once (see
/// [`pool_ipc::Config::announce_above`]).
pub const ANNOUNCE_ABOVE: usize = 64 * 1024;

/// The configuration of a worker's channel, which both ends must use: frames up to 1 GiB,
/// payloads above [`SHM_THRESHOLD`] through shared memory (one copy each way instead of a
/// trip through the kernel's socket buffers), and frames above [`ANNOUNCE_ABOVE`]
/// announced, so that bytes a task writes to the channel's descriptor by mistake are
/// refused at once rather than read as the header of a frame of hundreds of megabytes.
pub fn channel_config() -> pool_ipc::Config {
    pool_ipc::Config::new()
        .shm_threshold(Some(SHM_THRESHOLD))
        .announce_above(Some(ANNOUNCE_ABOVE))
}

/// How long a frame from a worker may stay unfinished before the pool gives up on the
/// worker: a worker writes each message whole, so a frame that stops half-way means the
/// worker is stuck or wrote bytes that do not belong on the channel. Compare with
/// [`pool_ipc::FramedConn::partial_frame_since`].
pub const PARTIAL_FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit code of a worker whose parent runs a different executable image.
pub const EXIT_IMAGE_MISMATCH: i32 = 3;
/// Exit code of a worker whose initializer failed.
pub const EXIT_INIT_FAILED: i32 = 4;
/// Exit code of a worker that received a message it could not decode or did not expect.
pub const EXIT_PROTOCOL: i32 = 2;

/// Identifies the executable image a process runs, to check that an [`FnRef`] made in the
/// parent means the same function in the worker.
///
/// It combines the device, inode, size and modification time of `/proc/self/exe` (as
/// found when first asked, which `init()` does at start-up) with a link-time property: the
/// distance between two functions of this crate. Two processes with equal `ImageId`s run
/// the same build of the same program.
///
/// # Examples
///
/// ```
/// use pool_spawn::protocol::ImageId;
///
/// assert_eq!(ImageId::current(), ImageId::current());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    link: i64,
    protocol: u32,
}

/// Proof that the parent's image identity matched ours; needed to resolve an [`FnRef`].
#[derive(Debug)]
pub(crate) struct SameImage(());

/// The version of this message protocol; part of [`ImageId`].
pub(crate) const PROTOCOL_VERSION: u32 = 2;

impl ImageId {
    /// The identity of the running executable image (computed once, then cached).
    pub fn current() -> ImageId {
        static CURRENT: OnceLock<ImageId> = OnceLock::new();
        *CURRENT.get_or_init(Self::compute)
    }

    fn compute() -> ImageId {
        let st = rustix::fs::stat("/proc/self/exe").ok().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            rustix::fs::stat(&exe).ok()
        });
        // The field types vary across targets; on some the casts are no-ops.
        #[allow(clippy::unnecessary_cast)]
        let (dev, ino, size, mtime_sec, mtime_nsec) = match st {
            Some(st) => (
                st.st_dev,
                st.st_ino,
                st.st_size as u64,
                st.st_mtime as i64,
                st.st_mtime_nsec as i64,
            ),
            None => (0, 0, 0, 0, 0),
        };
        ImageId {
            dev,
            ino,
            size,
            mtime_sec,
            mtime_nsec,
            link: crate::task::link_offset(),
            protocol: PROTOCOL_VERSION,
        }
    }

    /// Checks `self` (the parent's identity) against this process's.
    pub(crate) fn verify(&self) -> Result<SameImage, String> {
        let ours = ImageId::current();
        if *self == ours {
            Ok(SameImage(()))
        } else {
            Err(format!(
                "the worker runs a different executable image than its parent (parent {self}, \
                 worker {ours}); was the program rebuilt or replaced while the pool ran?"
            ))
        }
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dev {:#x} inode {} size {} mtime {}.{:09} link {:+#x} protocol {}",
            self.dev,
            self.ino,
            self.size,
            self.mtime_sec,
            self.mtime_nsec,
            self.link,
            self.protocol
        )
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({self})")
    }
}

/// What a worker stores in the second word of its progress page once it keeps the count
/// (see [`ToWorker::Setup`]).
pub const PROGRESS_KEPT: u64 = 0x7072_6f67_7265_7373;

/// A message from the pool to a worker.
///
/// `B` is how byte payloads are held: owned ([`ByteBuf`], the default) to build a message,
/// or borrowed (`&serde_bytes::Bytes`) to decode one in place without copying its payload;
/// both have the same wire format.
#[derive(Serialize, Deserialize, Debug)]
pub enum ToWorker<B = ByteBuf> {
    /// The first message: who the worker is and how it starts.
    Setup {
        /// The worker's name, as [`current_process`](crate::current_process) reports it.
        name: String,
        /// Exit after this many [`ToWorker::Run`]s (Python's `maxtasksperchild`).
        max_tasks: Option<u64>,
        /// The parent's [`ImageId::current`].
        image: ImageId,
        /// An initializer ([`task::init_ref`](crate::task::init_ref)) and its postcard
        /// arguments.
        init: Option<(FnRef, B)>,
        /// A shared-memory page (a memfd, opened as `/proc/<pid>/fd/<fd>`) whose first
        /// `u64` the worker increments as it begins each [`ToWorker::Run`]: when the worker
        /// dies, the pool compares it with the results it received to tell whether a task
        /// was running. The worker stores [`PROGRESS_KEPT`] in the second `u64` once it has
        /// the page; until then the count means nothing.
        progress: Option<(u32, i32)>,
    },
    /// Run a batch.
    Run {
        /// The pool's id for this batch, echoed in [`FromWorker::Done`].
        id: u64,
        /// The batch trampoline ([`task::batch_ref`](crate::task::batch_ref)).
        func: FnRef,
        /// The postcard `Vec<Args>`.
        payload: B,
    },
    /// Finish what was sent before, then exit with code 0.
    Exit,
}

/// The fields of [`ToWorker::Run`] before its payload bytes, as postcard lays them out:
/// the variant index, `id`, `func`, then the payload's length.
#[derive(Serialize)]
struct RunHead {
    variant: u32,
    id: u64,
    func: FnRef,
    len: usize,
}

/// Index of `Run` among [`ToWorker`]'s variants.
const RUN_VARIANT: u32 = 1;

/// Appends a [`ToWorker::Run`] message whose payload is postcard(`args`) to `frame`,
/// encoding `args` straight into the frame: the same bytes as encoding the message with a
/// separately encoded payload, without the intermediate buffer and its copy.
///
/// # Errors
///
/// [`pool_ipc::ErrorKind::Encode`] if `args` cannot be encoded (or encodes to a different
/// length twice); `frame` is then left as it was.
pub fn encode_run<T: Serialize + ?Sized>(
    frame: &mut pool_ipc::FrameBuf,
    id: u64,
    func: FnRef,
    args: &T,
) -> pool_ipc::Result<()> {
    let len = pool_ipc::encoded_len(args)?;
    let start = frame.payload_len();
    let head = RunHead {
        variant: RUN_VARIANT,
        id,
        func,
        len,
    };
    frame.reserve(len + 32);
    frame.encode(&head)?;
    let after_head = frame.payload_len();
    if let Err(e) = frame.encode(args) {
        frame.truncate_payload(start);
        return Err(e);
    }
    if frame.payload_len() - after_head != len {
        frame.truncate_payload(start);
        return Err(pool_ipc::Error::msg(
            pool_ipc::ErrorKind::Encode,
            "the arguments encoded to a different length the second time",
        ));
    }
    Ok(())
}

/// A [`ToWorker::Run`] message for a batch of items, as [`encode_run_items`] builds it.
#[derive(Debug)]
pub struct RunItems {
    /// The message, or why it could not be built.
    pub frame: pool_ipc::Result<pool_ipc::FrameBuf>,
    /// The index of each item the message carries, in order.
    pub sent: Vec<usize>,
    /// The items left out because they cannot be encoded, by index, with why.
    pub failed: Vec<(usize, pool_ipc::Error)>,
}

/// Encodes `items` as the [`ToWorker::Run`] message of batch `id`, leaving out any item
/// that cannot be encoded: the others still go, and the worker's `Vec<Args>` holds only
/// them (in order, so result `k` belongs to item `sent[k]`).
///
/// When every item encodes (the usual case), they are encoded straight into the frame
/// ([`encode_run`]); otherwise each is encoded on its own and the payload is assembled from
/// those that succeed.
pub fn encode_run_items<T: Serialize>(id: u64, func: FnRef, items: &[T]) -> RunItems {
    let mut frame = pool_ipc::FrameBuf::new();
    if encode_run(&mut frame, id, func, items).is_ok() {
        return RunItems {
            frame: Ok(frame),
            sent: (0..items.len()).collect(),
            failed: Vec::new(),
        };
    }
    // Some item does not encode: find which, and send the others.
    let mut body = Vec::new();
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match pool_ipc::encode_append(&mut body, item) {
            Ok(()) => sent.push(i),
            Err(e) => failed.push((i, e)),
        }
    }
    // postcard encodes a sequence as its varint length followed by the elements.
    let mut payload = Vec::with_capacity(body.len() + 10);
    pool_ipc::encode_seq_len(&mut payload, sent.len());
    payload.extend_from_slice(&body);
    let mut frame = pool_ipc::FrameBuf::with_capacity(payload.len() + 32);
    let frame = frame
        .encode(&ToWorker::<&serde_bytes::Bytes>::Run {
            id,
            func,
            payload: serde_bytes::Bytes::new(&payload),
        })
        .map(|()| frame);
    RunItems {
        frame,
        sent,
        failed,
    }
}

/// Encodes an initializer's arguments for [`ToWorker::Setup`]'s `init`.
///
/// # Errors
/// If `args` cannot be encoded.
pub fn encode_init_args<T: Serialize + ?Sized>(args: &T) -> postcard::Result<Vec<u8>> {
    postcard::to_allocvec(args)
}

/// Decodes a worker's message in place: a [`FromWorker::Done`] result is given as the range
/// of its bytes inside `frame` (no copy; decode them with [`decode_results`]).
///
/// # Errors
/// If `frame` is not a `FromWorker` message.
pub fn decode_reply(frame: &[u8]) -> postcard::Result<FromWorker<Range<usize>>> {
    let msg = postcard::from_bytes::<FromWorker<&serde_bytes::Bytes>>(frame)?;
    Ok(match msg {
        FromWorker::Ready { pid } => FromWorker::Ready { pid },
        FromWorker::SetupFailed { reason, message } => FromWorker::SetupFailed { reason, message },
        FromWorker::Done { id, outcome } => FromWorker::Done {
            id,
            outcome: outcome.map(|b| {
                // `b` lies inside `frame`: its offset is a difference of addresses.
                let start = b.as_ptr() as usize - frame.as_ptr() as usize;
                start..start + b.len()
            }),
        },
    })
}

/// Decodes the result bytes of a [`FromWorker::Done`]: one result per item of the batch.
///
/// # Errors
/// If `bytes` is not a sequence of `Result<R, ItemError>`.
pub fn decode_results<R: DeserializeOwned>(
    bytes: &[u8],
) -> postcard::Result<Vec<Result<R, ItemError>>> {
    postcard::from_bytes(bytes)
}

/// A message from a worker to the pool. `B` as for [`ToWorker`].
#[derive(Serialize, Deserialize, Debug)]
pub enum FromWorker<B = ByteBuf> {
    /// Setup succeeded; the worker waits for `Run`s.
    Ready {
        /// The worker's process id.
        pid: u32,
    },
    /// Setup failed; the worker exits.
    SetupFailed {
        /// Why.
        reason: SetupFailure,
        /// A human-readable description.
        message: String,
    },
    /// A batch finished.
    Done {
        /// The `id` of the [`ToWorker::Run`].
        id: u64,
        /// `Ok`: a postcard `Vec<Result<R, ItemError>>`, one per item. `Err`: the whole
        /// batch failed (its arguments did not decode, or the results are too large).
        outcome: Result<B, ItemError>,
    },
}

/// Why a worker's setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SetupFailure {
    /// The worker runs a different executable image than its parent.
    ImageMismatch,
    /// The initializer panicked or returned an error.
    Initializer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_id_roundtrips_and_verifies() {
        let id = ImageId::current();
        let bytes = postcard::to_allocvec(&id).unwrap();
        let back: ImageId = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, id);
        assert!(back.verify().is_ok());
        let mut forged = id;
        forged.ino ^= 1;
        let err = forged.verify().unwrap_err();
        assert!(err.contains("different executable image"), "{err}");
    }

    fn noop(x: u8) -> u8 {
        x
    }

    #[test]
    fn owned_and_borrowed_messages_share_one_wire_format() {
        let payload: Vec<u8> = (0..=255).collect();
        let run = ToWorker::Run {
            id: 7,
            func: crate::task::batch_ref(noop),
            payload: ByteBuf::from(payload.clone()),
        };
        let bytes = postcard::to_allocvec(&run).unwrap();
        match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(&bytes).unwrap() {
            ToWorker::Run { id, payload: p, .. } => {
                assert_eq!(id, 7);
                assert_eq!(&p[..], &payload[..]);
                // Borrowed: the payload lies inside the encoded message.
                let inside = bytes.as_ptr_range();
                assert!(inside.contains(&p.as_ptr()));
            }
            other => panic!("decoded as {other:?}"),
        }
        // Encoding straight into a frame gives the same bytes.
        let args = vec![(1u32, "x".to_string()), (300, "yz".to_string())];
        let run = ToWorker::Run {
            id: 1 << 40,
            func: crate::task::batch_ref(noop),
            payload: ByteBuf::from(postcard::to_allocvec(&args).unwrap()),
        };
        let mut frame = pool_ipc::FrameBuf::new();
        encode_run(&mut frame, 1 << 40, crate::task::batch_ref(noop), &args).unwrap();
        assert_eq!(frame.payload(), &postcard::to_allocvec(&run).unwrap()[..]);
        let done: FromWorker = FromWorker::Done {
            id: 9,
            outcome: Ok(ByteBuf::from(payload.clone())),
        };
        let bytes = postcard::to_allocvec(&done).unwrap();
        match postcard::from_bytes::<FromWorker<&serde_bytes::Bytes>>(&bytes).unwrap() {
            FromWorker::Done { id, outcome } => {
                assert_eq!(id, 9);
                assert_eq!(&outcome.unwrap()[..], &payload[..]);
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_reply_decodes_with_its_result_as_a_range_of_the_frame() {
        let results: Vec<Result<u32, ItemError>> = vec![Ok(5), Ok(300)];
        let bytes = postcard::to_allocvec(&results).unwrap();
        let done: FromWorker = FromWorker::Done {
            id: 3,
            outcome: Ok(ByteBuf::from(bytes.clone())),
        };
        let frame = postcard::to_allocvec(&done).unwrap();
        match decode_reply(&frame).unwrap() {
            FromWorker::Done { id, outcome } => {
                let range = outcome.unwrap();
                assert_eq!(id, 3);
                assert_eq!(&frame[range.clone()], &bytes[..]);
                let back = decode_results::<u32>(&frame[range]).unwrap();
                assert_eq!(
                    back.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
                    [5, 300]
                );
            }
            other => panic!("decoded as {other:?}"),
        }
        let ready = postcard::to_allocvec(&FromWorker::<ByteBuf>::Ready { pid: 9 }).unwrap();
        assert!(matches!(
            decode_reply(&ready),
            Ok(FromWorker::Ready { pid: 9 })
        ));
        assert!(decode_reply(&[0xFF, 0xFF]).is_err());
    }

    #[test]
    fn run_items_leaves_out_what_cannot_be_encoded() {
        struct NoOdd(u32);
        impl Serialize for NoOdd {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if self.0 % 2 == 1 {
                    return Err(serde::ser::Error::custom("odd"));
                }
                s.serialize_u32(self.0)
            }
        }
        let func = crate::task::batch_ref(noop);
        let all = encode_run_items(4, func, &[NoOdd(2), NoOdd(4)]);
        let some = encode_run_items(4, func, &[NoOdd(1), NoOdd(2), NoOdd(3), NoOdd(4)]);
        assert_eq!((all.sent, some.sent.clone()), (vec![0, 1], vec![1, 3]));
        assert_eq!(some.failed.iter().map(|f| f.0).collect::<Vec<_>>(), [0, 2]);
        // Both frames carry the same message: the items that encode, as one `Vec`.
        assert_eq!(
            all.frame.unwrap().payload(),
            some.frame.unwrap().payload(),
            "the partial encode differs from a whole one"
        );
    }
}
