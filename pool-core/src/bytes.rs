//! [`SharedBytes`]: bytes in shared memory that cross to and from workers without a copy.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pool_ipc::shm::FrozenSegment;
use pool_spawn::protocol::FdRef;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{Pin, pin};

/// What `/proc/<pid>/fd` listings show for the memory of shared bytes.
const NAME: &str = "procpool-bytes";

/// An immutable byte string in shared memory, which a task takes as an argument or
/// returns as its result without its bytes being copied through the pool's channels.
///
/// A `ByteBuf` argument of a megabyte is copied several times on its way to the worker and
/// back (encoded, through a shared ring, decoded). A `SharedBytes` is made once, in a
/// sealed memfd, and only a reference to it travels: the memfd's descriptor goes along with
/// the task's message (`SCM_RIGHTS`) and the worker maps the same memory. Returned from a
/// task, it goes back the same way. Reading it is reading that memory: [`Deref`] to `[u8]`.
///
/// # Semantics
///
/// * **Immutable.** Its bytes are fixed when it is made ([`copy_from_slice`], or
///   [`with_len`] to write them in place). The memfd is sealed against writing, shrinking
///   and growing before anyone else can see it, so no process, the worker included, can
///   change them afterwards; a worker that wants other bytes makes a new `SharedBytes`.
/// * **Owned by its handles.** A `SharedBytes` is a handle; [`Clone`] makes another one to
///   the same memory (no copy). The memory lives as long as some handle (in any process) or
///   message in flight refers to it, and is freed with the last. A pool keeps the memory of
///   an argument until the task is done, so the caller may drop its handles right after
///   submitting.
/// * **Workers that die.** Nothing is lost in the parent: an argument's memory is the
///   parent's, and a task sent again (its worker died before beginning it) gets the same
///   bytes. A result comes back whole with its message or not at all, like any result.
///   Results of a worker that dies are kept only for results without shared bytes
///   (descriptors do not survive their worker), so a result holding one is sent at once,
///   in a message of its own.
/// * **Cost and limits.** Each `SharedBytes` that is not empty holds one descriptor and one
///   mapping in each process that has it, and its size rounded up to pages of memory (once,
///   however many processes map it). Making one costs a `memfd_create`, a few system calls
///   and the pages' first touch; it pays off for payloads of hundreds of kilobytes and up,
///   not for small ones. One message passes at most 253 descriptors: the arguments of a
///   chunk (or one item's result) past that many are opened through
///   `/proc/<pid>/fd/<n>` instead, which works only while the process holding them keeps
///   them and allows it (same user, dumpable).
/// * **Outside a pool** it serializes as a reference to this process's descriptor, not as
///   its bytes: do not store it.
///
/// # Examples
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// use procpool::{Pool, SharedBytes};
///
/// /// Counts the zero bytes of a payload mapped, not copied, into the worker.
/// fn zeros(data: SharedBytes) -> usize {
///     data.iter().filter(|&&b| b == 0).count()
/// }
///
/// /// Makes a payload in the worker and hands it back without a copy.
/// fn make(len: usize) -> SharedBytes {
///     SharedBytes::with_len(len, |buf| buf.fill(7)).expect("shared memory")
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     procpool::init(); // first line of main: workers start here
///     let pool = Pool::builder().processes(2).build()?;
///     let data = SharedBytes::copy_from_slice(&vec![0u8; 1 << 20])?;
///     assert_eq!(pool.apply(zeros, (data.clone(),))?, 1 << 20);
///     let made = pool.apply(make, (4096,))?;
///     assert!(made.len() == 4096 && made.iter().all(|&b| b == 7));
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
///
/// [`copy_from_slice`]: SharedBytes::copy_from_slice
/// [`with_len`]: SharedBytes::with_len
#[derive(Clone, Default)]
pub struct SharedBytes {
    /// `None` when empty (a memfd cannot be mapped with no bytes).
    seg: Option<Arc<FrozenSegment>>,
}

impl SharedBytes {
    /// An empty byte string (no shared memory, no descriptor).
    pub fn new() -> SharedBytes {
        SharedBytes::default()
    }

    /// Shared bytes holding a copy of `bytes`.
    ///
    /// # Errors
    ///
    /// If the shared memory cannot be made: out of memory or descriptors.
    pub fn copy_from_slice(bytes: &[u8]) -> io::Result<SharedBytes> {
        if bytes.is_empty() {
            return Ok(SharedBytes::new());
        }
        let seg = FrozenSegment::copy_from(NAME, bytes)?;
        Ok(SharedBytes {
            seg: Some(Arc::new(seg)),
        })
    }

    /// Shared bytes of length `len`, written in place by `fill` (they start zeroed), then
    /// frozen: no copy at all.
    ///
    /// # Errors
    ///
    /// If the shared memory cannot be made: out of memory or descriptors.
    ///
    /// # Panics
    ///
    /// If `fill` panics (its memory is freed).
    pub fn with_len(len: usize, fill: impl FnOnce(&mut [u8])) -> io::Result<SharedBytes> {
        if len == 0 {
            fill(&mut []);
            return Ok(SharedBytes::new());
        }
        let seg = FrozenSegment::with_fill(NAME, len, fill)?;
        Ok(SharedBytes {
            seg: Some(Arc::new(seg)),
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.seg {
            Some(s) => s.as_slice(),
            None => &[],
        }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &SharedBytes) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SharedBytes {}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes")
            .field("len", &self.len())
            .finish()
    }
}

/// The wire form: where the memory is, and what to check once it is mapped.
#[derive(Serialize, Deserialize)]
struct Wire {
    seg: FdRef,
    len: u64,
    /// The memfd's inode: a descriptor number reused for another file is refused.
    ino: u64,
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let Some(seg) = &self.seg else {
            return None::<Wire>.serialize(s);
        };
        // Passed with the message: a task's arguments (the pool keeps the memory until the
        // task is done), or a worker's result (a duplicate descriptor goes along).
        let slot =
            pin(Pin::Bytes(Arc::clone(seg))).or_else(|| pool_spawn::protocol::pass_fd(seg.as_fd()));
        let ino = rustix::fs::fstat(seg.as_fd())
            .map_err(|e| S::Error::custom(format!("shared bytes: {e}")))?
            .st_ino;
        Some(Wire {
            seg: FdRef {
                pid: std::process::id(),
                fd: seg.as_fd().as_raw_fd(),
                slot,
            },
            len: seg.len() as u64,
            ino,
        })
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fail = pool_spawn::task::noted_decode_error::<D::Error>;
        let Some(w) = Option::<Wire>::deserialize(d)? else {
            return Ok(SharedBytes::new());
        };
        let seg = w.seg.open_frozen().map_err(|e| {
            fail(format!(
                "cannot map the shared bytes of process {} (has it exited, or dropped them?): \
                 {e}",
                w.seg.pid
            ))
        })?;
        let ino = rustix::fs::fstat(seg.as_fd()).map(|st| st.st_ino).ok();
        if seg.len() as u64 != w.len || ino != Some(w.ino) {
            return Err(fail(format!(
                "process {} no longer holds these shared bytes (they were dropped and the \
                 descriptor reused)",
                w.seg.pid
            )));
        }
        Ok(SharedBytes {
            seg: Some(Arc::new(seg)),
        })
    }
}
