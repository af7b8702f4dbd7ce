//! The messages between a pool and one worker, and the image identity check.
//!
//! One socket per worker. The parent drives it with a nonblocking `pool_ipc::FramedConn`
//! (or any pool-ipc type), the worker with a blocking `pool_ipc::Duplex<FromWorker,
//! ToWorker>`; both speak postcard frames, configured by [`channel_config`] (the parent's
//! end must use it too: large payloads travel through shared memory).
//!
//! Worker lifecycle: started → receives [`ToWorker::Setup`] → maps its progress page and
//! checks the [`ImageId`] (mismatch: [`FromWorker::SetupFailed`] with
//! [`SetupFailure::ImageMismatch`], exit code [`EXIT_IMAGE_MISMATCH`]) → takes its limits and
//! runs the initializer (a page, a limit or an initializer that fails: `SetupFailed` with
//! [`SetupFailure::Initializer`], exit code [`EXIT_INIT_FAILED`]) → sends
//! [`FromWorker::Ready`] → loop: [`ToWorker::Run`] → [`FromWorker::Done`]; after
//! `max_tasks` runs it sends the last `Done`, flushes and exits 0. End of file on its
//! channel, or [`ToWorker::Exit`], also ends it with exit code 0.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

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
/// Exit code of a worker whose own setup failed (see [`SetupFailure::Initializer`]).
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
pub(crate) const PROTOCOL_VERSION: u32 = 3;

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

/// Whether a worker may hold back the answer of a brief task while more requests wait, to
/// write it with the next ones (see `page::HELD_OFFSET`). The pool reads it too: while it is
/// off, it plans no looks at held answers and no waiting caller watches for a nudge; a
/// worker that holds nothing behaves as one without a held area.
pub const HOLD_ANSWERS: bool = true;

/// The layout of a worker's progress page: the words (`u64`, by index) the worker and the
/// pool share, and the result area that follows them.
///
/// The worker writes every word except the cancel slots, which only the pool writes. The
/// pool reads the task and area words when the worker is gone (or stopped), so they need
/// no protocol between the two beyond their order; [`CURRENT`](page::CURRENT) and the
/// cancel slots form a store-then-load handshake on each side (sequentially consistent),
/// so that a task is either seen cancelled by the worker or seen begun by the pool. The
/// held area is also read while the worker lives: [`HELD_GEN`](page::HELD_GEN) tells a
/// reader whether what it copied was overwritten meanwhile.
pub mod page {
    /// Tasks the worker has begun (skipped ones included).
    pub const BEGUN: usize = 0;
    /// [`PROGRESS_KEPT`](super::PROGRESS_KEPT) once the worker keeps this page.
    pub const KEPT: usize = 1;
    /// The id of the task the worker took up last (stored before it checks the cancel
    /// slots), with [`ENDED`] set once it has ended it (its answer written, or held in the
    /// held area) and [`SKIPPED`] too if it skipped it as cancelled. Every task that ended
    /// before it did so in the order the pool sent them.
    pub const CURRENT: usize = 2;
    /// In [`CURRENT`]: the task has ended.
    pub const ENDED: u64 = 1 << 63;
    /// In [`CURRENT`]: the task was skipped, being cancelled (with [`ENDED`]).
    pub const SKIPPED: u64 = 1 << 62;
    /// `CLOCK_MONOTONIC` nanoseconds when the running task began; for a task sent with
    /// `timed`, when its running item began.
    pub const STARTED_NS: usize = 3;
    /// The task whose results the area holds.
    pub const AREA_TASK: usize = 4;
    /// The index, within its task, of the first item in the area.
    pub const AREA_BASE: usize = 5;
    /// How many items' results the area holds (each complete).
    pub const AREA_ITEMS: usize = 6;
    /// How many bytes of the area they fill.
    pub const AREA_BYTES: usize = 7;
    /// The answer of a task a caller waits for, passed through the page rather than the
    /// channel. A caller that borrowed the worker's socket to wait for task `id` (the
    /// oldest the worker holds) stores `id | `[`WAITING`] here before the task is sent,
    /// and takes it back (compare-and-swap to 0) before it sleeps in a poll of the socket
    /// (while it sleeps on the worker's [`BELL`] only, it still waits). A worker that ends task
    /// `id` with its results all in the result area, nothing sent in parts and no answer
    /// held back, swaps `id | WAITING` for `id | `[`POSTED`] instead of writing its
    /// `Done`: the caller, awake, takes the answer from the area (copy, then swap
    /// `id | POSTED` for 0). Before it takes up another request (or exits when asked
    /// to), the worker swaps an answer nobody took for 0 and writes it after all. So
    /// whichever side's swap succeeds owns the answer: it is delivered once, and the area
    /// is not written over while it is copied. A worker that dies leaves it for the pool,
    /// which takes it with the answers it held back. All the worker wrote to the channel
    /// before the answer is there whole when it posts it: the pool reads it first, and a
    /// message still cut short then is not the worker's (a task wrote to the channel), a
    /// fault that closes the worker with the task unanswered.
    pub const ANSWER: usize = 8;
    /// In [`ANSWER`]: a caller waits for the task, awake or on the worker's [`BELL`].
    pub const WAITING: u64 = 1 << 62;
    /// In [`ANSWER`]: the worker ended the task; its answer is the result area.
    pub const POSTED: u64 = 1 << 63;
    /// The doorbell: a `u32` word (an index for `atomic_u32`, in word 10) that says how the
    /// worker waits for its next request, for a futex wait and wake. [`AWAKE`]: it is
    /// running or about to look for a request. [`SLEEPING`]: it found nothing to read
    /// and sleeps on this word (for at most [`DOOR_WAIT_NS`]); whoever writes to its
    /// channel then swaps it to [`AWAKE`] and wakes it (after storing [`SENT`]).
    /// [`RUNG`]: the pool left a task in the task area ([`TASK_OFFSET`]) for it.
    /// [`RECEIVING`]: it blocks reading its channel (the task area is not looked at).
    /// Only the worker leaves [`RUNG`] and [`RECEIVING`]; the pool leaves a task only to a
    /// worker [`AWAKE`] or [`SLEEPING`] (compare-and-swap to [`RUNG`]), so a task it leaves
    /// in the area is taken, or it knows to send it on the channel instead.
    pub const DOOR: usize = 20;
    /// In [`DOOR`]: see there.
    pub const AWAKE: u32 = 0;
    /// In [`DOOR`]: see there.
    pub const SLEEPING: u32 = 1;
    /// In [`DOOR`]: see there.
    pub const RUNG: u32 = 2;
    /// In [`DOOR`]: see there.
    pub const RECEIVING: u32 = 3;
    /// How many bytes the pool has written to the worker's channel since its start,
    /// stored (sequentially consistent) after each write, before the pool loads [`DOOR`];
    /// the worker stores [`SLEEPING`] then loads this: either it sees the bytes the pool
    /// wrote (more than it read: it reads them instead of sleeping), or the pool sees it
    /// asleep and wakes it.
    pub const SENT: usize = 11;
    /// The worker's bell: a `u32` word (an index for `atomic_u32`, in word 14) for a
    /// [`Bell`](pool_ipc::shm::Bell), rung after every write to the worker's channel,
    /// after it posts an answer in [`ANSWER`], and by the pool when the worker is gone or
    /// is sent another task while a caller waits for its answer (so that the caller
    /// looks at what it holds back). A caller that borrowed the worker's socket reads its
    /// count before its task is sent and sleeps on it for a while, awake in the sense of
    /// [`ANSWER`] (the worker may post the answer to it), rather than polling the socket:
    /// a wait and a wake instead of a write, a poll and a read.
    pub const BELL: usize = 28;
    /// The length of the task frame in the task area (see [`DOOR`]).
    pub const TASK_LEN: usize = 12;
    /// The CPU the worker ran on when it last went to sleep on [`DOOR`], plus one (0: not
    /// known yet). Only a hint, for a caller that rang it: a caller on that same CPU
    /// gives it the CPU, so that it runs the task before the caller goes to sleep.
    pub const DOOR_CPU: usize = 13;
    /// Where the task area starts, in bytes: the payload of one `Run` message without
    /// descriptors, of at most [`TASK_MAX`] bytes, left by the pool, which rang [`RUNG`].
    pub const TASK_OFFSET: usize = 512;
    /// The most bytes a task in the task area may have.
    pub const TASK_MAX: usize = AREA_OFFSET - TASK_OFFSET;
    /// How long a worker sleeps on [`DOOR`] before it blocks reading its channel instead
    /// (so that a pool that closed the channel without ringing, or that died, is noticed
    /// by then at the latest). Not for a worker whose channel a thread watches (one that
    /// has run a few dozen tasks): it sleeps without a time limit, woken at the close.
    pub const DOOR_WAIT_NS: u64 = 50_000_000;
    /// The first of the cancel slots (a word index, past the held area): ids of tasks the
    /// worker must not begin. Task `id`'s mark goes in one of [`CANCEL_PROBES`] slots
    /// from `id % CANCEL_SLOTS` on ([`cancel_slot`]), the first whose mark is no longer
    /// needed, so the worker checks a few slots before each task however many tasks it
    /// holds: once [`MARKED`] says that the pool marked any. (Words 15 to 39 are unused.)
    pub const CANCEL_FIRST: usize = (HELD_OFFSET + HELD_LEN) / 8;
    /// Nonzero once the pool has marked a task cancelled on this page, stored after the
    /// mark (sequentially consistent, as the marks are): a worker that loads it after
    /// storing [`CURRENT`] and finds it zero knows that no mark is there to see, or that
    /// the pool will see the task taken up, without reading the slots. Reading them would
    /// give the page's memory for them (a page of the shared file), which a worker
    /// recycled after every task paid for every task.
    pub const MARKED: usize = 9;
    /// How many cancel slots there are: four times as many as tasks a worker may hold.
    pub const CANCEL_SLOTS: usize = 4096;
    /// How many slots a task's mark may go in.
    pub const CANCEL_PROBES: usize = 4;
    /// How many answers the held area holds (each complete; see [`HELD_OFFSET`]).
    pub const HELD_COUNT: usize = 40;
    /// How many bytes of the held area they fill.
    pub const HELD_BYTES: usize = HELD_COUNT + 1;
    /// How many times the held area was emptied (its answers written to the channel). The
    /// worker bumps it before it writes anything over what the area held; a reader of the
    /// area while the worker lives loads it before and after its copy (with an acquire
    /// fence before the second load) and trusts the copy only if both loads agree.
    pub const HELD_GEN: usize = HELD_COUNT + 2;
    /// For a task sent with `timed` (whose [`STARTED_NS`] follows its items): when the
    /// worker took it up, stored with [`STARTED_NS`] before [`CURRENT`].
    pub const TAKEN_NS: usize = HELD_COUNT + 3;
    /// Where the result area starts, in bytes.
    pub const AREA_OFFSET: usize = 4096;
    /// Where the result area ends and the held area starts, in bytes. The held area keeps
    /// the `Done` messages of tasks the worker finished but has not written to its channel
    /// yet (it writes several at once while more requests wait), each as a little-endian
    /// `u32` length then the message's postcard bytes, so that they survive the worker:
    /// whatever `HELD_COUNT` says is held may have been written already, or not. Answers
    /// are held back only behind brief tasks: the worker writes them before it takes up a
    /// task once the first of their tasks began [`HOLD_AGE_NS`] ago or more, so only a
    /// long task begun right after brief ones keeps them waiting, and the pool then takes
    /// them from here (see `HELD_GEN`).
    pub const HELD_OFFSET: usize = AREA_OFFSET + (1 << 20);
    /// The size of the held area.
    pub const HELD_LEN: usize = 64 << 10;
    /// Answers held back go out before the worker takes up another task once this long
    /// (ns) has passed since the first of their tasks began (see [`HELD_OFFSET`]).
    pub const HOLD_AGE_NS: u64 = 100_000;
    /// The size of the whole page the pool makes: the words, a 1 MiB result area, the
    /// held area and the cancel slots.
    pub const LEN: usize = HELD_OFFSET + HELD_LEN + CANCEL_SLOTS * 8;

    /// The worker's bell on its page `page` (see [`BELL`]).
    pub fn bell(page: &pool_ipc::shm::Segment) -> pool_ipc::shm::Bell<'_> {
        pool_ipc::shm::Bell::new(page.atomic_u32(BELL))
    }

    /// The word index of the `k`th slot (`k < CANCEL_PROBES`) where task `id`'s cancel
    /// mark may go.
    pub fn cancel_slot(id: u64, k: usize) -> usize {
        // The remainder is below CANCEL_SLOTS, so it fits.
        CANCEL_FIRST + (id as usize).wrapping_add(k) % CANCEL_SLOTS
    }

    /// Wakes a worker asleep on its doorbell `door` (the page's [`DOOR`] word), moving
    /// it from [`SLEEPING`] to [`AWAKE`] first: whatever the caller stored before (the bytes
    /// it wrote, a closed channel) is then seen by the worker, whether it was asleep or
    /// only about to sleep. A worker not asleep costs a load.
    pub fn wake_sleeper(door: &std::sync::atomic::AtomicU32) {
        use std::sync::atomic::Ordering::SeqCst;
        if door.load(SeqCst) == SLEEPING
            && door
                .compare_exchange(SLEEPING, AWAKE, SeqCst, SeqCst)
                .is_ok()
        {
            // A failure (none expected on a mapped word) leaves the worker to its wait's
            // end, if it has one, when it reads the channel.
            let _ = pool_ipc::shm::futex_wake(door, 1);
        }
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`page::STARTED_NS`] (the same clock
/// as `std::time::Instant`, shared by every process of the machine).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// A memfd of the pool's process, for a worker to map: passed with the message that refers
/// to it (`SCM_RIGHTS`, in slot `slot` of that message's descriptors), and reachable as
/// `/proc/<pid>/fd/<fd>` too, for when it was not passed. That path opens only for a
/// process allowed to trace the pool's (not when the pool's process is not dumpable, a
/// setuid program's or a hardened service's, say), so a passed descriptor comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRef {
    /// The process that holds the descriptor.
    pub pid: u32,
    /// Its number in that process.
    pub fd: i32,
    /// Its place among the descriptors passed with the message, if it was passed.
    pub slot: Option<u32>,
}

impl FdRef {
    /// Maps the segment: the descriptor passed with the message a worker is decoding, if
    /// there is one, else the `/proc` path.
    ///
    /// # Errors
    ///
    /// As for [`Segment::open_in_process`](pool_ipc::shm::Segment::open_in_process).
    pub fn open(&self) -> std::io::Result<pool_ipc::shm::Segment> {
        self.open_with(
            pool_ipc::shm::Segment::from_fd,
            pool_ipc::shm::Segment::open_in_process,
        )
    }

    /// Maps the frozen segment it names (see [`pool_ipc::shm::FrozenSegment`]): the
    /// descriptor passed with the message this thread is decoding, if there is one, else
    /// the `/proc` path (opened read-only).
    ///
    /// # Errors
    ///
    /// As for [`FrozenSegment::from_fd`](pool_ipc::shm::FrozenSegment::from_fd), and the
    /// errors of opening the `/proc` path.
    pub fn open_frozen(&self) -> std::io::Result<pool_ipc::shm::FrozenSegment> {
        use pool_ipc::shm::FrozenSegment;
        self.open_with(FrozenSegment::from_fd, |pid, fd| {
            let f = rustix::fs::open(
                format!("/proc/{pid}/fd/{fd}"),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            FrozenSegment::from_fd(f)
        })
    }

    /// [`FdRef::open`] for a segment that nothing else opens from the same message (a
    /// worker's progress page): the passed descriptor is taken, not duplicated (a later
    /// `open` of this `FdRef` opens the `/proc` path).
    ///
    /// # Errors
    ///
    /// As for [`FdRef::open`].
    pub fn open_taken(&self) -> std::io::Result<pool_ipc::shm::Segment> {
        let passed = self.slot.and_then(|slot| {
            PASSED.with(|p| p.borrow_mut().get_mut(usize::try_from(slot).ok()?)?.take())
        });
        match passed.map(pool_ipc::shm::Segment::from_fd) {
            Some(Ok(seg)) => Ok(seg),
            _ => pool_ipc::shm::Segment::open_in_process(self.pid, self.fd),
        }
    }

    fn open_with<S>(
        &self,
        from_fd: impl Fn(std::os::fd::OwnedFd) -> std::io::Result<S>,
        from_proc: impl FnOnce(u32, i32) -> std::io::Result<S>,
    ) -> std::io::Result<S> {
        let passed = self.slot.and_then(|slot| {
            PASSED.with(|p| {
                let p = p.borrow();
                let fd = p.get(usize::try_from(slot).ok()?)?.as_ref()?;
                fd.try_clone().ok()
            })
        });
        match passed.map(from_fd) {
            Some(Ok(seg)) => Ok(seg),
            _ => from_proc(self.pid, self.fd),
        }
    }
}

thread_local! {
    /// The descriptors passed with the message this thread is handling (see [`passing`]);
    /// `None` once taken (see [`FdRef::open_taken`]).
    static PASSED: std::cell::RefCell<Vec<Option<std::os::fd::OwnedFd>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Makes `fds`, the descriptors passed with a message, what [`FdRef::open`] looks in on this
/// thread until the guard is dropped; it closes them then.
pub fn passing(fds: Vec<std::os::fd::OwnedFd>) -> Passing {
    // (Collected in place: an `Option<OwnedFd>` is the size of an `OwnedFd`.)
    PASSED.with(|p| *p.borrow_mut() = fds.into_iter().map(Some).collect());
    Passing(())
}

/// See [`passing`].
#[derive(Debug)]
pub struct Passing(());

thread_local! {
    /// Whether values serialized on this thread now pass their descriptors with the
    /// message (a worker encoding a task's result: [`pass_fd`]), and how many they passed:
    /// the worker's check after each item costs two plain reads when none passes any.
    static COLLECTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static COLLECTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The descriptors themselves.
    static OUTGOING: std::cell::RefCell<Vec<std::os::fd::OwnedFd>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The descriptors collected so far, leaving none.
fn take_outgoing() -> Vec<std::os::fd::OwnedFd> {
    if COLLECTED.replace(0) == 0 {
        return Vec::new();
    }
    OUTGOING.with(|o| std::mem::take(&mut *o.borrow_mut()))
}

/// Starts collecting the descriptors that values serialized on this thread pass
/// ([`pass_fd`]), until [`take_collected`].
pub(crate) fn start_collecting() {
    COLLECTING.set(true);
    drop(take_outgoing());
}

/// Whether values serialized since [`start_collecting`] (or the last
/// [`take_collected_so_far`]) passed descriptors.
#[inline]
pub(crate) fn collected_any() -> bool {
    COLLECTED.get() != 0
}

/// The descriptors collected since [`start_collecting`] (or the last call), collecting on.
pub(crate) fn take_collected_so_far() -> Vec<std::os::fd::OwnedFd> {
    take_outgoing()
}

/// Ends what [`start_collecting`] began: the descriptors collected since.
pub(crate) fn take_collected() -> Vec<std::os::fd::OwnedFd> {
    COLLECTING.set(false);
    take_outgoing()
}

/// For a value being serialized as part of a worker's result (a task's result is encoded
/// while the worker collects): passes a duplicate of `fd` with the message that carries
/// the result and returns its slot among the message's descriptors (for [`FdRef::slot`]).
/// `None` anywhere else, past the most one message carries, or when `fd` cannot be
/// duplicated.
pub fn pass_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    if !COLLECTING.get() {
        return None;
    }
    OUTGOING.with(|o| {
        let mut v = o.borrow_mut();
        if v.len() >= pool_ipc::fdpass::MAX_FDS {
            return None;
        }
        v.push(fd.try_clone_to_owned().ok()?);
        COLLECTED.set(v.len());
        u32::try_from(v.len() - 1).ok()
    })
}

impl Drop for Passing {
    fn drop(&mut self) {
        let fds = PASSED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        drop(fds);
    }
}

/// Limits a worker applies to itself (see [`ToWorker::Setup`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// A hard cap on the worker's private memory (`RLIMIT_DATA`), set before the
    /// initializer runs: an allocation beyond it fails, and Rust aborts the process.
    pub memory_cap: Option<u64>,
    /// After a task, a worker whose resident memory is above this many bytes sends its
    /// result, then [`FromWorker::Recycling`], and exits.
    pub max_rss: Option<u64>,
}

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
        /// A shared-memory page (a memfd: see [`FdRef`]) whose first `u64` the worker
        /// increments as it begins each [`ToWorker::Run`]: when the worker dies, the pool
        /// compares it with the results it received to tell whether a task was running.
        /// The worker stores [`PROGRESS_KEPT`] in the second `u64` once it has the page;
        /// until then the count means nothing. A worker that cannot open the page it is
        /// given fails its setup (the pool may have marked tasks cancelled on it already).
        progress: Option<FdRef>,
        /// Limits the worker applies to itself.
        limits: Limits,
    },
    /// Run a batch.
    Run {
        /// The pool's id for this batch, echoed in [`FromWorker::Done`].
        id: u64,
        /// The batch trampoline ([`task::batch_ref`](crate::task::batch_ref)).
        func: FnRef,
        /// The task has a time limit: the worker stamps the start of each item on its
        /// progress page ([`page::STARTED_NS`]), not only the start of the task.
        timed: bool,
        /// The postcard `Vec<Args>`.
        payload: B,
    },
    /// Finish what was sent before, then exit with code 0.
    Exit,
    /// A [`ToWorker::Run`] whose payload is `head` followed by the whole payload of the
    /// frame right after this one (raw bytes, not a message): a task of one large byte
    /// string, whose bytes the pool sends from where they lie and the worker receives in
    /// a buffer that becomes the argument as it is.
    RunTail {
        /// As in [`ToWorker::Run`].
        id: u64,
        /// As in [`ToWorker::Run`].
        func: FnRef,
        /// As in [`ToWorker::Run`].
        timed: bool,
        /// The payload's bytes before the tail frame's.
        head: B,
    },
}

impl<B> ToWorker<B> {
    /// The [`ToWorker::Setup`] of worker `name` with nothing else to set: no task limit,
    /// no initializer, no progress page, default [`Limits`], this process's [`ImageId`].
    /// For tests and benchmarks that drive a worker by hand; not part of the API.
    #[doc(hidden)]
    pub fn bare_setup(name: String) -> Self {
        ToWorker::Setup {
            name,
            max_tasks: None,
            image: ImageId::current(),
            init: None,
            progress: None,
            limits: Limits::default(),
        }
    }
}

/// The fields of [`ToWorker::Run`] before its payload bytes, as postcard lays them out:
/// the variant index, `id`, `func`, then the payload's length.
#[derive(Serialize)]
struct RunHead {
    variant: u32,
    id: u64,
    func: FnRef,
    timed: bool,
    len: usize,
}

/// Index of `Run` among [`ToWorker`]'s variants.
const RUN_VARIANT: u32 = 1;

/// The [`ToWorker::RunTail`] of a task whose arguments are one byte string of `len` bytes
/// (a `(ByteBuf,)` or `(Vec<u8>,)`), sent as the frame after it: the head holds the item
/// count (1) and the string's length, as postcard lays out a `Vec` of that one item.
pub fn encode_run_tail(
    id: u64,
    func: FnRef,
    timed: bool,
    len: usize,
) -> pool_ipc::Result<pool_ipc::FrameBuf> {
    let mut head = vec![1];
    pool_ipc::encode_seq_len(&mut head, len);
    let mut frame = pool_ipc::FrameBuf::new();
    frame.encode(&ToWorker::<&serde_bytes::Bytes>::RunTail {
        id,
        func,
        timed,
        head: serde_bytes::Bytes::new(&head),
    })?;
    Ok(frame)
}

/// The fields of [`FromWorker::Part`] before its result bytes, as postcard lays them out:
/// the variant index, `id`, `items`, then the length of the bytes.
#[derive(Serialize)]
struct PartHead {
    variant: u32,
    id: u64,
    items: u64,
    len: usize,
}

/// Index of `Part` among [`FromWorker`]'s variants.
const PART_VARIANT: u32 = 3;

/// The bytes of a [`FromWorker::Part`] message up to its results: followed by `len` bytes
/// of results, it is the message (sent in pieces, the results taken from where they lie).
pub(crate) fn part_head(id: u64, items: u64, len: usize) -> Vec<u8> {
    let head = PartHead {
        variant: PART_VARIANT,
        id,
        items,
        len,
    };
    postcard::to_allocvec(&head).expect("integers always encode")
}

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
    timed: bool,
    args: &T,
) -> pool_ipc::Result<()> {
    let len = pool_ipc::encoded_len(args)?;
    let start = frame.payload_len();
    let head = RunHead {
        variant: RUN_VARIANT,
        id,
        func,
        timed,
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
    /// The index of each item the message carries, in order, when some item was left out;
    /// empty when the message carries every item.
    pub sent: Vec<usize>,
    /// The items left out because they cannot be encoded, by index, with why.
    pub failed: Vec<(usize, pool_ipc::Error)>,
    /// Where each item sent lies in the message, for a batch of more than one item: what
    /// [`encode_run_rest`] needs to send the items after one that failed.
    pub spans: Option<ItemSpans>,
}

/// Where the items of a [`ToWorker::Run`] message lie in its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemSpans {
    /// The offset of the first item in the message.
    start: usize,
    /// How many items.
    count: usize,
    /// The length of each item in bytes, one varint after the other: a byte per item of
    /// under 128 bytes, which a large map's chunks keep until they are done.
    sizes: Vec<u8>,
}

impl ItemSpans {
    /// How many items.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Where item `k` starts, from the first item, and where its length lies in `sizes`;
    /// `None` if `sizes` is cut short.
    fn offset_of(&self, k: usize) -> Option<(usize, usize)> {
        let (mut offset, mut rest) = (0usize, &self.sizes[..]);
        for _ in 0..k {
            let (len, after) = postcard::take_from_bytes::<usize>(rest).ok()?;
            offset = offset.checked_add(len)?;
            rest = after;
        }
        Some((offset, self.sizes.len() - rest.len()))
    }
}

/// Room left before a batch's items for the head of its [`ToWorker::Run`] message: the
/// variant, the id, the function, `timed`, the payload's length and the item count, each a
/// varint of at most 10 bytes (the variant and `timed` 1, the function 11).
const RUN_HEAD_ROOM: usize = 48;

/// Encodes `items` as the [`ToWorker::Run`] message of batch `id`, leaving out any item
/// that cannot be encoded: the others still go, and the worker's `Vec<Args>` holds only
/// them (in order, so result `k` belongs to item `sent[k]`, or to item `k` when `sent` is
/// empty).
///
/// A single item is encoded straight into the frame ([`encode_run`]); a batch of several
/// is encoded item by item in one pass straight into the frame, after room for the head
/// (noting each item's length, see [`RunItems::spans`]); the head, known once the items
/// are, then takes the room's place.
pub fn encode_run_items<T: Serialize + 'static>(
    id: u64,
    func: FnRef,
    timed: bool,
    items: &[T],
) -> RunItems {
    if items.len() > 1
        && crate::plain::is_plain::<T>()
        && let Some(run) = encode_plain_items(id, func, timed, items)
    {
        return run;
    }
    if items.len() == 1 {
        // Room for the head and a small item: a small task's frame is one allocation.
        let mut frame = pool_ipc::FrameBuf::with_capacity(RUN_HEAD_ROOM + 32);
        if encode_run(&mut frame, id, func, timed, items).is_ok() {
            return RunItems {
                frame: Ok(frame),
                sent: Vec::new(),
                failed: Vec::new(),
                spans: None,
            };
        }
    }
    let mut frame = pool_ipc::FrameBuf::with_capacity(RUN_HEAD_ROOM + items.len() * 4);
    frame.extend_from_slice(&[0; RUN_HEAD_ROOM]);
    let mut sent = Vec::new();
    let mut sizes = Vec::with_capacity(items.len());
    let mut failed = Vec::new();
    let mut count = 0;
    // One serializer for every item, each noted as it is written: a single pass.
    let mut out = frame.appender();
    for (i, item) in items.iter().enumerate() {
        // On error the frame is left as it was.
        match out.encode(item) {
            Ok(len) => {
                if !failed.is_empty() {
                    sent.push(i);
                }
                count += 1;
                match u8::try_from(len) {
                    Ok(b) if b < 0x80 => sizes.push(b),
                    _ => pool_ipc::encode_seq_len(&mut sizes, len),
                }
            }
            Err(e) => {
                if failed.is_empty() {
                    sent.extend(0..i);
                }
                failed.push((i, e));
            }
        }
    }
    let body = frame.payload_len() - RUN_HEAD_ROOM;
    let frame = match run_head(id, func, timed, count, body) {
        Ok(head) => {
            frame.replace_payload_prefix(RUN_HEAD_ROOM, &head);
            let spans = (count > 1).then_some(ItemSpans {
                start: head.len(),
                count,
                sizes,
            });
            return RunItems {
                frame: Ok(frame),
                sent,
                failed,
                spans,
            };
        }
        Err(e) => Err(e),
    };
    RunItems {
        frame,
        sent,
        failed,
        spans: None,
    }
}

/// Items of plain numbers encoded together: see [`PLAIN_BLOCK`].
const PLAIN_BLOCK: usize = 256;

/// [`encode_run_items`] of several items of a plain number type (see `crate::plain`):
/// the same message, written by a loop made for them rather than by postcard's serializer,
/// a block of [`PLAIN_BLOCK`] items at a time. Such items always encode. `None` if the
/// items are not plain after all, or so many that the frame could reach the wire's limit
/// (the usual path then says so per item).
fn encode_plain_items<T: 'static>(
    id: u64,
    func: FnRef,
    timed: bool,
    items: &[T],
) -> Option<RunItems> {
    use crate::plain::{self, MAX_LEN};
    if items.len() > (1 << 30) / MAX_LEN {
        return None;
    }
    let mut frame = pool_ipc::FrameBuf::with_capacity(RUN_HEAD_ROOM + items.len() * 4);
    frame.extend_from_slice(&[0; RUN_HEAD_ROOM]);
    // Each item's length, below 128: one byte each, as `ItemSpans` keeps them.
    let mut sizes = Vec::with_capacity(items.len());
    for block in items.chunks(PLAIN_BLOCK) {
        let mut plain = true;
        frame.append_with(block.len() * MAX_LEN, |out| {
            let mut n = 0;
            for item in block {
                let room: &mut [u8; MAX_LEN] = (&mut out[n..n + MAX_LEN]).try_into().ok()?;
                let Some(len) = plain::write(item, room) else {
                    plain = false;
                    return None;
                };
                sizes.push(len as u8);
                n += len;
            }
            Some(n)
        });
        if !plain {
            return None;
        }
    }
    let body = frame.payload_len() - RUN_HEAD_ROOM;
    let count = items.len();
    let head = match run_head(id, func, timed, count, body) {
        Ok(head) => head,
        Err(_) => return None,
    };
    frame.replace_payload_prefix(RUN_HEAD_ROOM, &head);
    Some(RunItems {
        frame: Ok(frame),
        sent: Vec::new(),
        failed: Vec::new(),
        spans: Some(ItemSpans {
            start: head.len(),
            count,
            sizes,
        }),
    })
}

/// The head of a [`ToWorker::Run`] message whose payload is `count` items in `body` bytes:
/// the fields before the items, and their count (postcard encodes a sequence as its varint
/// length followed by the elements).
fn run_head(
    id: u64,
    func: FnRef,
    timed: bool,
    count: usize,
    body: usize,
) -> pool_ipc::Result<Vec<u8>> {
    let mut seq_len = Vec::with_capacity(10);
    pool_ipc::encode_seq_len(&mut seq_len, count);
    let head = RunHead {
        variant: RUN_VARIANT,
        id,
        func,
        timed,
        len: seq_len.len() + body,
    };
    let mut out = Vec::with_capacity(RUN_HEAD_ROOM);
    pool_ipc::encode_append(&mut out, &head)?;
    out.extend_from_slice(&seq_len);
    Ok(out)
}

/// Frames `count` encoded items (`body`) as a `Run` message; also returns where the first
/// item starts in it.
fn frame_items(
    id: u64,
    func: FnRef,
    timed: bool,
    count: usize,
    body: &[u8],
) -> (pool_ipc::Result<pool_ipc::FrameBuf>, usize) {
    let head = match run_head(id, func, timed, count, body.len()) {
        Ok(head) => head,
        Err(e) => return (Err(e), 0),
    };
    let mut frame = pool_ipc::FrameBuf::with_capacity(head.len() + body.len());
    frame.extend_from_slice(&head);
    frame.extend_from_slice(body);
    (Ok(frame), head.len())
}

/// The `Run` message of batch `id` for the items of `frame` (a message built by
/// [`encode_run_items`], whose items lie at `spans`) from item `from` on: the rest of a
/// batch whose item `from - 1` failed. `None` if no item is left (or `from` is past them).
pub fn encode_run_rest(
    frame: &pool_ipc::FrameBuf,
    spans: &ItemSpans,
    from: usize,
    id: u64,
    func: FnRef,
    timed: bool,
) -> Option<(pool_ipc::FrameBuf, ItemSpans)> {
    if from >= spans.count {
        return None;
    }
    let (offset, at) = spans.offset_of(from)?;
    // The items run to the end of the payload.
    let body = frame.payload().get(spans.start.checked_add(offset)?..)?;
    let count = spans.count - from;
    let (frame, start) = frame_items(id, func, timed, count, body);
    let sizes = spans.sizes[at..].to_vec();
    Some((
        frame.ok()?,
        ItemSpans {
            start,
            count,
            sizes,
        },
    ))
}

/// Encodes an initializer's arguments for [`ToWorker::Setup`]'s `init`.
///
/// # Errors
/// If `args` cannot be encoded.
pub fn encode_init_args<T: Serialize + ?Sized>(args: &T) -> postcard::Result<Vec<u8>> {
    postcard::to_allocvec(args)
}

/// Decodes a worker's message in place: result bytes ([`FromWorker::Done`],
/// [`FromWorker::Part`]) are given as their range inside `frame` (no copy; decode them with
/// [`decode_results`]).
///
/// # Errors
/// If `frame` is not a `FromWorker` message.
pub fn decode_reply(frame: &[u8]) -> postcard::Result<FromWorker<Range<usize>>> {
    let msg = postcard::from_bytes::<FromWorker<&serde_bytes::Bytes>>(frame)?;
    // A borrowed slice lies inside `frame`: its offset is a difference of addresses.
    let range = |b: &serde_bytes::Bytes| {
        let start = b.as_ptr() as usize - frame.as_ptr() as usize;
        start..start + b.len()
    };
    Ok(match msg {
        FromWorker::Ready { pid } => FromWorker::Ready { pid },
        FromWorker::SetupFailed { reason, message } => FromWorker::SetupFailed { reason, message },
        FromWorker::Done { id, items, outcome } => FromWorker::Done {
            id,
            items,
            outcome: outcome.map(range),
        },
        FromWorker::Part { id, items, results } => FromWorker::Part {
            id,
            items,
            results: range(results),
        },
        FromWorker::Skipped { id } => FromWorker::Skipped { id },
        FromWorker::Recycling { rss } => FromWorker::Recycling { rss },
        FromWorker::PartTail { id, head, len } => FromWorker::PartTail {
            id,
            head: range(head),
            len,
        },
    })
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
        /// How many items' results `outcome` holds: those not sent before in
        /// [`FromWorker::Part`]s.
        items: u64,
        /// `Ok`: the results, one postcard `Result<R, ItemError>` after the other. `Err`:
        /// the whole batch failed (its arguments did not decode).
        outcome: Result<B, ItemError>,
    },
    /// The first results of a batch still running (its results outgrew the result area).
    Part {
        /// The `id` of the [`ToWorker::Run`].
        id: u64,
        /// How many items' results `results` holds.
        items: u64,
        /// One postcard `Result<R, ItemError>` after the other.
        results: B,
    },
    /// A batch the pool cancelled before the worker began it: it did not run.
    Skipped {
        /// The `id` of the [`ToWorker::Run`].
        id: u64,
    },
    /// The worker exits after the result it just sent: its resident memory is above
    /// [`Limits::max_rss`].
    Recycling {
        /// Its resident memory, in bytes.
        rss: u64,
    },
    /// The next result of a batch still running, one item's, in two frames: `head` (the
    /// result's first bytes) here, and the rest of its bytes as the whole payload of the
    /// frame right after this one (raw bytes, not a message). A large byte-string result
    /// goes this way: its bytes arrive in a buffer of their own, which becomes the
    /// caller's value as is, without another copy.
    PartTail {
        /// The `id` of the [`ToWorker::Run`].
        id: u64,
        /// The result's bytes before the tail frame's.
        head: B,
        /// The length of the tail frame's payload: more than [`SHM_THRESHOLD`]. A frame of
        /// any other length after it is not its tail, and the worker is faulty.
        len: u64,
    },
}

/// Decodes `items` results laid one after the other (as in [`FromWorker::Done`] and
/// [`FromWorker::Part`]), appending them to `out`.
///
/// # Errors
///
/// postcard's error if the bytes do not hold `items` values of `T` (then `out` holds the
/// ones before), or if bytes are left over.
pub fn decode_results<T: serde::de::DeserializeOwned + 'static>(
    items: u64,
    bytes: &[u8],
    out: &mut Vec<T>,
) -> Result<(), postcard::Error> {
    decode_results_with(items, bytes, out, |v| v)
}

/// [`decode_results`], each value passed through `f` on its way into `out` (to decode
/// straight into the caller's type, with no list of `T`s in between).
///
/// A successful result that is a byte string ([`ByteBuf`] or `Vec<u8>`) is copied in one
/// piece into a buffer of its own, a large one reused from an earlier large payload when
/// the process keeps one ([`pool_ipc::reuse_buffer`]): no fresh pages to fault in and
/// zero, and no byte-by-byte decoding of a `Vec<u8>`.
///
/// # Errors
///
/// As for [`decode_results`].
pub fn decode_results_with<T: serde::de::DeserializeOwned + 'static, U>(
    items: u64,
    bytes: &[u8],
    out: &mut Vec<U>,
    mut f: impl FnMut(T) -> U,
) -> Result<(), postcard::Error> {
    decode_each(items, bytes, out, |bytes| {
        let (v, rest) = match take_byte_string_result::<T>(bytes) {
            Some(got) => got,
            None => postcard::take_from_bytes::<T>(bytes)?,
        };
        Ok((f(v), rest))
    })
}

/// Takes `items` values from `bytes` with `take` (one value and the bytes after it) into
/// `out`; the bytes must end with the last.
fn decode_each<'b, U>(
    items: u64,
    mut bytes: &'b [u8],
    out: &mut Vec<U>,
    mut take: impl FnMut(&'b [u8]) -> Result<(U, &'b [u8]), postcard::Error>,
) -> Result<(), postcard::Error> {
    // Every encoded result takes at least a byte: a count beyond the bytes is a lie.
    out.reserve(
        usize::try_from(items)
            .unwrap_or(usize::MAX)
            .min(bytes.len()),
    );
    for _ in 0..items {
        let (v, rest) = take(bytes)?;
        out.push(v);
        bytes = rest;
    }
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// Decodes `items` per-item results laid one after the other (postcard
/// `Result<R, ItemError>`s, as in [`FromWorker::Done`] and [`FromWorker::Part`]), each
/// passed through `ok` or `err` on its way into `out`: the same as [`decode_results_with`]
/// on `Result<R, ItemError>`, but each result's variant is read first and its value decoded
/// as `R` (or `ItemError`) directly, which spares a large generic `Result` per item.
///
/// # Errors
///
/// As for [`decode_results`].
pub fn decode_item_results<R: serde::de::DeserializeOwned + 'static, U>(
    items: u64,
    bytes: &[u8],
    out: &mut Vec<U>,
    mut ok: impl FnMut(R) -> U,
    mut err: impl FnMut(ItemError) -> U,
) -> Result<(), postcard::Error> {
    decode_each(items, bytes, out, |bytes| {
        // postcard writes a variant index as a varint: `Ok` is the byte 0, `Err` the byte 1.
        match bytes.split_first() {
            Some((0, rest)) => {
                let (v, rest) = take_ok_value::<R>(rest)?;
                Ok((ok(v), rest))
            }
            Some((1, rest)) => {
                let (e, rest) = postcard::take_from_bytes::<ItemError>(rest)?;
                Ok((err(e), rest))
            }
            Some(_) => Err(postcard::Error::DeserializeBadEnum),
            None => Err(postcard::Error::DeserializeUnexpectedEnd),
        }
    })
}

/// Decodes per-item results laid as for [`decode_item_results`] while they are `Ok`, their
/// values alone into `out`: `Ok(None)` when all `items` were (and the bytes end with the
/// last); `Ok(Some((i, rest)))` at the first item error, item `i`, whose bytes start
/// `rest` (decode from there with [`decode_item_results`], `items - i` results).
///
/// # Errors
///
/// As for [`decode_results`].
pub fn decode_ok_results<'b, R: serde::de::DeserializeOwned + 'static>(
    items: u64,
    mut bytes: &'b [u8],
    out: &mut Vec<R>,
) -> Result<Option<(u64, &'b [u8])>, postcard::Error> {
    // Every encoded result takes at least a byte: a count beyond the bytes is a lie.
    out.reserve(
        usize::try_from(items)
            .unwrap_or(usize::MAX)
            .min(bytes.len()),
    );
    if crate::plain::is_plain::<R>() {
        return decode_ok_plain(items, bytes, out);
    }
    if !is_byte_string::<R>() {
        return decode_ok_run(items, bytes, out);
    }
    for i in 0..items {
        // postcard writes a variant index as a varint: `Ok` is the byte 0, `Err` the byte 1.
        match bytes.split_first() {
            Some((0, rest)) => {
                let (v, rest) = take_ok_value::<R>(rest)?;
                out.push(v);
                bytes = rest;
            }
            Some((1, _)) => return Ok(Some((i, bytes))),
            Some(_) => return Err(postcard::Error::DeserializeBadEnum),
            None => return Err(postcard::Error::DeserializeUnexpectedEnd),
        }
    }
    if bytes.is_empty() {
        Ok(None)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// [`decode_ok_results`] of the one result of a task of one item, with no vector: the
/// value if the item succeeded, `None` if its result is an item error (decode it with
/// [`decode_item_results`]).
///
/// # Errors
///
/// As for [`decode_results`].
pub fn decode_ok_one<R: serde::de::DeserializeOwned + 'static>(
    bytes: &[u8],
) -> Result<Option<R>, postcard::Error> {
    // postcard writes a variant index as a varint: `Ok` is the byte 0, `Err` the byte 1.
    let (v, rest) = match bytes.split_first() {
        Some((0, rest)) => take_ok_value::<R>(rest)?,
        Some((1, _)) => return Ok(None),
        Some(_) => return Err(postcard::Error::DeserializeBadEnum),
        None => return Err(postcard::Error::DeserializeUnexpectedEnd),
    };
    if rest.is_empty() {
        Ok(Some(v))
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// [`decode_ok_results`] of a plain number type (see `crate::plain`): each value read by a
/// loop made for them; a value it does not take (cut short, or out of its type's range)
/// is left to postcard, for its error.
fn decode_ok_plain<'b, R: serde::de::DeserializeOwned + 'static>(
    items: u64,
    bytes: &'b [u8],
    out: &mut Vec<R>,
) -> Result<Option<(u64, &'b [u8])>, postcard::Error> {
    let mut at = 0;
    for i in 0..items {
        // postcard writes a variant index as a varint: `Ok` is the byte 0, `Err` the byte 1.
        match bytes.get(at) {
            Some(0) => {
                let rest = &bytes[at + 1..];
                let (v, n) = match crate::plain::read::<R>(rest) {
                    Some(got) => got,
                    None => {
                        let (v, after) = postcard::take_from_bytes::<R>(rest)?;
                        (v, rest.len() - after.len())
                    }
                };
                out.push(v);
                at += 1 + n;
            }
            Some(1) => return Ok(Some((i, &bytes[at..]))),
            Some(_) => return Err(postcard::Error::DeserializeBadEnum),
            None => return Err(postcard::Error::DeserializeUnexpectedEnd),
        }
    }
    if at == bytes.len() {
        Ok(None)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// [`decode_ok_results`] of a type other than a byte string, through one deserializer
/// kept from one value to the next.
fn decode_ok_run<'b, R: serde::de::DeserializeOwned>(
    items: u64,
    bytes: &'b [u8],
    out: &mut Vec<R>,
) -> Result<Option<(u64, &'b [u8])>, postcard::Error> {
    use serde::Deserialize;
    let mut de = postcard::Deserializer::from_bytes(bytes);
    for i in 0..items {
        // postcard writes a variant index as a varint: `Ok` is the byte 0, `Err` the byte
        // 1 (read as one raw byte, a `u8`).
        match u8::deserialize(&mut de)? {
            0 => out.push(R::deserialize(&mut de)?),
            1 => {
                // From that byte on.
                let after = de.finalize()?;
                let at = bytes.len() - after.len() - 1;
                return Ok(Some((i, &bytes[at..])));
            }
            _ => return Err(postcard::Error::DeserializeBadEnum),
        }
    }
    if de.finalize()?.is_empty() {
        Ok(None)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// Whether `B` is a byte string that [`take_byte_string`] takes.
fn is_byte_string<B: 'static>() -> bool {
    use std::any::TypeId;
    let t = TypeId::of::<B>();
    t == TypeId::of::<ByteBuf>() || t == TypeId::of::<Vec<u8>>()
}

/// Decodes the one result of a [`FromWorker::PartTail`]: its `head`, then the bytes of the
/// frame after it (`tail`), passed through `ok` or `err` on its way into `out`. A
/// successful byte-string result ([`ByteBuf`] or `Vec<u8>`) whose bytes are the whole tail
/// takes the tail's buffer as it is (no copy); anything else is decoded from the two joined
/// (as [`decode_item_results`] does, errors included).
///
/// # Errors
///
/// As for [`decode_results`].
pub fn decode_item_result_tail<R: serde::de::DeserializeOwned + 'static, U>(
    head: &[u8],
    tail: Vec<u8>,
    out: &mut Vec<U>,
    mut ok: impl FnMut(R) -> U,
    err: impl FnMut(ItemError) -> U,
) -> Result<(), postcard::Error> {
    if let Some((&0, rest)) = head.split_first()
        && let Some((len, [])) = take_varint(rest)
        && len == tail.len()
    {
        match byte_string_of_vec::<R>(tail) {
            Ok(v) => {
                out.push(ok(v));
                return Ok(());
            }
            Err(tail) => return decode_joined(head, &tail, out, ok, err),
        }
    }
    decode_joined(head, &tail, out, ok, err)
}

/// [`decode_item_results`] of one result laid out as `head` then `tail`.
fn decode_joined<R: serde::de::DeserializeOwned + 'static, U>(
    head: &[u8],
    tail: &[u8],
    out: &mut Vec<U>,
    ok: impl FnMut(R) -> U,
    err: impl FnMut(ItemError) -> U,
) -> Result<(), postcard::Error> {
    let mut joined = Vec::with_capacity(head.len() + tail.len());
    joined.extend_from_slice(head);
    joined.extend_from_slice(tail);
    decode_item_results(1, &joined, out, ok, err)
}

/// `v` as a value of `B` when `B` is a byte string ([`ByteBuf`] or `Vec<u8>`), without
/// copying; `v` back otherwise.
fn byte_string_of_vec<B: 'static>(v: Vec<u8>) -> Result<B, Vec<u8>> {
    use std::any::{Any, TypeId};
    let t = TypeId::of::<B>();
    let value: Box<dyn Any> = if t == TypeId::of::<ByteBuf>() {
        Box::new(ByteBuf::from(v))
    } else if t == TypeId::of::<Vec<u8>>() {
        Box::new(v)
    } else {
        return Err(v);
    };
    Ok(*value.downcast::<B>().expect("B is the type just checked"))
}

/// The first result of `bytes` when `T` is `Result<B, ItemError>` for a byte string `B`
/// ([`ByteBuf`] or `Vec<u8>`) and the result is `Ok` (the variant index 0, then the byte
/// string: see [`take_byte_string`]); `None` for any other type, an error result, or bytes
/// that do not hold such a result (postcard decodes those, and reports what is wrong).
fn take_byte_string_result<T: 'static>(bytes: &[u8]) -> Option<(T, &[u8])> {
    use std::any::{Any, TypeId};
    let t = TypeId::of::<T>();
    let (&0, rest) = bytes.split_first()? else {
        return None;
    };
    let (value, rest): (Box<dyn Any>, &[u8]) = if t == TypeId::of::<Result<ByteBuf, ItemError>>() {
        let (b, rest) = take_byte_string::<ByteBuf>(rest)?;
        (Box::new(Ok::<ByteBuf, ItemError>(b)), rest)
    } else if t == TypeId::of::<Result<Vec<u8>, ItemError>>() {
        let (v, rest) = take_byte_string::<Vec<u8>>(rest)?;
        (Box::new(Ok::<Vec<u8>, ItemError>(v)), rest)
    } else {
        return None;
    };
    Some((*value.downcast::<T>().ok()?, rest))
}

/// The value of an `Ok` result, whose bytes (after its variant's byte) start `bytes`, and
/// the bytes after it: a byte string copied in one piece ([`take_byte_string`]), any
/// other type decoded by postcard.
fn take_ok_value<R: serde::de::DeserializeOwned + 'static>(
    bytes: &[u8],
) -> Result<(R, &[u8]), postcard::Error> {
    match take_byte_string::<R>(bytes) {
        Some(got) => Ok(got),
        None => postcard::take_from_bytes::<R>(bytes),
    }
}

/// The first value of `bytes` when `B` is a byte string ([`ByteBuf`] or `Vec<u8>`, which
/// postcard lays out alike: the length as a varint, then the bytes), copied in one piece
/// into a buffer of its own (a large one reused when the process keeps one:
/// [`pool_ipc::reuse_buffer`]); `None` for any other type or bytes that do not hold one.
fn take_byte_string<B: 'static>(bytes: &[u8]) -> Option<(B, &[u8])> {
    use std::any::{Any, TypeId};
    let t = TypeId::of::<B>();
    let is_buf = t == TypeId::of::<ByteBuf>();
    if !is_buf && t != TypeId::of::<Vec<u8>>() {
        return None;
    }
    let (len, rest) = take_varint(bytes)?;
    if len > rest.len() {
        return None;
    }
    let (payload, rest) = rest.split_at(len);
    let mut v = pool_ipc::reuse_buffer(len);
    v.extend_from_slice(payload);
    let value: Box<dyn Any> = if is_buf {
        Box::new(ByteBuf::from(v))
    } else {
        Box::new(v)
    };
    Some((*value.downcast::<B>().ok()?, rest))
}

/// A `usize` varint as postcard writes it (at most ten bytes, canonical or not), and the
/// bytes after it; `None` if it overflows or is cut short.
fn take_varint(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut n: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && b > 1 {
            return None;
        }
        n |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((usize::try_from(n).ok()?, &bytes[i + 1..]));
        }
    }
    None
}

/// Why a worker's setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SetupFailure {
    /// The worker runs a different executable image than its parent.
    ImageMismatch,
    /// The worker's own setup failed: its initializer panicked or returned an error, or the
    /// worker could not take its memory limit or map its progress page (the message says
    /// which).
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
            timed: true,
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
            timed: false,
            payload: ByteBuf::from(postcard::to_allocvec(&args).unwrap()),
        };
        let mut frame = pool_ipc::FrameBuf::new();
        encode_run(
            &mut frame,
            1 << 40,
            crate::task::batch_ref(noop),
            false,
            &args,
        )
        .unwrap();
        assert_eq!(frame.payload(), &postcard::to_allocvec(&run).unwrap()[..]);
        let done: FromWorker = FromWorker::Done {
            id: 9,
            items: 256,
            outcome: Ok(ByteBuf::from(payload.clone())),
        };
        let bytes = postcard::to_allocvec(&done).unwrap();
        match postcard::from_bytes::<FromWorker<&serde_bytes::Bytes>>(&bytes).unwrap() {
            FromWorker::Done { id, items, outcome } => {
                assert_eq!((id, items), (9, 256));
                assert_eq!(&outcome.unwrap()[..], &payload[..]);
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_reply_decodes_with_its_result_as_a_range_of_the_frame() {
        let results: Vec<Result<u32, ItemError>> = vec![Ok(5), Ok(300)];
        let mut bytes = Vec::new();
        for r in &results {
            pool_ipc::encode_append(&mut bytes, r).unwrap();
        }
        let done: FromWorker = FromWorker::Done {
            id: 3,
            items: 2,
            outcome: Ok(ByteBuf::from(bytes.clone())),
        };
        let frame = postcard::to_allocvec(&done).unwrap();
        match decode_reply(&frame).unwrap() {
            FromWorker::Done { id, items, outcome } => {
                let range = outcome.unwrap();
                assert_eq!((id, items), (3, 2));
                assert_eq!(&frame[range.clone()], &bytes[..]);
                let mut back: Vec<Result<u32, ItemError>> = Vec::new();
                decode_results(items, &frame[range], &mut back).unwrap();
                assert_eq!(back, results);
            }
            other => panic!("decoded as {other:?}"),
        }
        let part = postcard::to_allocvec(&FromWorker::<ByteBuf>::Part {
            id: 3,
            items: 2,
            results: ByteBuf::from(bytes.clone()),
        })
        .unwrap();
        match decode_reply(&part).unwrap() {
            FromWorker::Part { items, results, .. } => {
                assert_eq!((items, &part[results]), (2, &bytes[..]));
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
    fn item_results_decode_by_variant_as_the_generic_result_does() {
        let results: Vec<Result<u64, ItemError>> = vec![
            Ok(5),
            Err(ItemError::new(crate::task::ItemErrorKind::Panicked, "boom")),
            Ok(u64::MAX),
            Ok(300),
        ];
        let mut bytes = Vec::new();
        for r in &results {
            pool_ipc::encode_append(&mut bytes, r).unwrap();
        }
        let mut got: Vec<Result<u64, ItemError>> = Vec::new();
        decode_item_results(4, &bytes, &mut got, Ok, Err).unwrap();
        assert_eq!(got, results);
        // Too few bytes, too many, and a variant that is neither `Ok` nor `Err`.
        let mut v: Vec<Result<u64, ItemError>> = Vec::new();
        assert!(decode_item_results(5, &bytes, &mut v, Ok, Err).is_err());
        assert!(decode_item_results(3, &bytes, &mut v, Ok, Err).is_err());
        assert!(decode_item_results(1, &[2, 0], &mut v, Ok, Err).is_err());
        // While they are Ok, the values alone; at the first error, where it starts, and
        // the rest decode from there as before.
        let mut oks: Vec<u64> = Vec::new();
        let (i, rest) = decode_ok_results(4, &bytes, &mut oks).unwrap().unwrap();
        assert_eq!((i, oks.as_slice()), (1, &[5u64][..]));
        let mut tail: Vec<Result<u64, ItemError>> = Vec::new();
        decode_item_results(4 - i, rest, &mut tail, Ok, Err).unwrap();
        assert_eq!(tail, results[1..]);
        let mut all_ok = Vec::new();
        for r in [Ok::<u64, ItemError>(1), Ok(300)] {
            pool_ipc::encode_append(&mut all_ok, &r).unwrap();
        }
        let mut oks: Vec<u64> = Vec::new();
        assert_eq!(decode_ok_results(2, &all_ok, &mut oks).unwrap(), None);
        assert_eq!(oks, [1, 300]);
        let mut oks: Vec<u64> = Vec::new();
        assert!(decode_ok_results(3, &all_ok, &mut oks).is_err());
        assert!(decode_ok_results(1, &all_ok, &mut oks).is_err());
        assert!(decode_ok_results(1, &[2, 0], &mut oks).is_err());
    }

    #[test]
    fn a_part_sent_in_pieces_is_the_part_message() {
        let results = vec![5u8; 1000];
        let whole = postcard::to_allocvec(&FromWorker::<ByteBuf>::Part {
            id: 1 << 40,
            items: 300,
            results: ByteBuf::from(results.clone()),
        })
        .unwrap();
        let mut pieces = part_head(1 << 40, 300, results.len());
        pieces.extend_from_slice(&results);
        assert_eq!(pieces, whole);
    }

    #[test]
    fn a_result_in_head_and_tail_takes_the_tail_buffer_or_decodes_as_one() {
        let tail = vec![9u8; 1000];
        let at = tail.as_ptr();
        let mut head = vec![0u8];
        pool_ipc::encode_seq_len(&mut head, tail.len());
        // A byte string that is the whole tail: the tail's own buffer, no copy.
        let mut got: Vec<Result<ByteBuf, ItemError>> = Vec::new();
        decode_item_result_tail(&head, tail.clone(), &mut got, Ok, Err).unwrap();
        assert_eq!(got[0].as_ref().unwrap().as_slice(), &tail[..]);
        let mut got: Vec<Result<Vec<u8>, ItemError>> = Vec::new();
        decode_item_result_tail(&head, tail, &mut got, Ok, Err).unwrap();
        assert_eq!(got[0].as_ref().unwrap().as_ptr(), at);
        // Any other type decodes from the two joined, as one result would.
        let mut got: Vec<Result<String, ItemError>> = Vec::new();
        decode_item_result_tail(&[0, 2], b"hi".to_vec(), &mut got, Ok, Err).unwrap();
        assert_eq!(got[0].as_deref().unwrap(), "hi");
        // A head whose length is not the tail's, or an error result, likewise.
        let mut got: Vec<Result<Vec<u8>, ItemError>> = Vec::new();
        assert!(decode_item_result_tail(&[0, 5], vec![1, 2], &mut got, Ok, Err).is_err());
        let e: Result<(), ItemError> =
            Err(ItemError::new(crate::task::ItemErrorKind::Panicked, "x"));
        let e = postcard::to_allocvec(&e).unwrap();
        let (h, t) = e.split_at(2);
        decode_item_result_tail(h, t.to_vec(), &mut got, Ok, Err).unwrap();
        assert!(got[0].is_err());
    }

    #[test]
    fn byte_string_results_decode_as_postcard_decodes_them() {
        let big = vec![7u8; 300 * 1024];
        let results: Vec<Result<Vec<u8>, ItemError>> = vec![
            Ok(vec![1, 2, 3]),
            Err(ItemError::new(crate::task::ItemErrorKind::Panicked, "boom")),
            Ok(big.clone()),
            Ok(Vec::new()),
        ];
        let mut bytes = Vec::new();
        for r in &results {
            pool_ipc::encode_append(&mut bytes, r).unwrap();
        }
        let mut back: Vec<Result<Vec<u8>, ItemError>> = Vec::new();
        decode_results(4, &bytes, &mut back).unwrap();
        assert_eq!(back, results);
        let mut bufs: Vec<Result<ByteBuf, ItemError>> = Vec::new();
        decode_results(4, &bytes, &mut bufs).unwrap();
        let bufs: Vec<_> = bufs.into_iter().map(|r| r.map(ByteBuf::into_vec)).collect();
        assert_eq!(bufs, results);
        // Cut short anywhere, or with a length past the end: an error, as from postcard.
        for cut in [1, 2, 4, 20, bytes.len() - 1] {
            let mut got: Vec<Result<ByteBuf, ItemError>> = Vec::new();
            assert!(
                decode_results(4, &bytes[..cut], &mut got).is_err(),
                "cut {cut}"
            );
        }
        let lie = [0u8, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2];
        let mut got: Vec<Result<Vec<u8>, ItemError>> = Vec::new();
        assert!(decode_results(1, &lie, &mut got).is_err());
        let overflow = [
            0u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ];
        assert!(decode_results(1, &overflow, &mut got).is_err());
        assert_eq!(take_varint(&[0x80, 0x01, 9]), Some((128, &[9u8][..])));
        // The same through decode_item_results, which the pool's driver uses.
        let mut by_variant: Vec<Result<ByteBuf, ItemError>> = Vec::new();
        decode_item_results(4, &bytes, &mut by_variant, Ok, Err).unwrap();
        let by_variant: Vec<_> = by_variant
            .into_iter()
            .map(|r| r.map(ByteBuf::into_vec))
            .collect();
        assert_eq!(by_variant, results);
        let mut got: Vec<Result<Vec<u8>, ItemError>> = Vec::new();
        assert!(decode_item_results(1, &lie, &mut got, Ok, Err).is_err());
    }

    #[test]
    fn the_rest_of_a_batch_is_the_same_message_as_a_batch_of_those_items() {
        let func = crate::task::batch_ref(noop);
        let items: Vec<(u32, String)> = (0..5).map(|i| (i * 100, "x".repeat(i as usize))).collect();
        let all = encode_run_items(1, func, true, &items);
        let frame = all.frame.unwrap();
        let spans = all.spans.unwrap();
        assert_eq!(spans.len(), 5);
        for from in 0..5 {
            let (rest, rest_spans) = encode_run_rest(&frame, &spans, from, 9, func, true).unwrap();
            let direct = encode_run_items(9, func, true, &items[from..]);
            assert_eq!(
                rest.payload(),
                direct.frame.unwrap().payload(),
                "from {from}"
            );
            assert_eq!(rest_spans.len(), 5 - from);
            // Its spans let it be split again.
            if from < 4 {
                let (again, _) = encode_run_rest(&rest, &rest_spans, 1, 9, func, true).unwrap();
                let direct = encode_run_items(9, func, true, &items[from + 1..]);
                assert_eq!(again.payload(), direct.frame.unwrap().payload());
            }
        }
        assert!(encode_run_rest(&frame, &spans, 5, 9, func, true).is_none());
        // The whole message decodes as the worker reads it.
        match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(frame.payload()).unwrap() {
            ToWorker::Run {
                id, timed, payload, ..
            } => {
                assert_eq!((id, timed), (1, true));
                let back: Vec<(u32, String)> = postcard::from_bytes(payload).unwrap();
                assert_eq!(back, items);
            }
            other => panic!("decoded as {other:?}"),
        }
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
        let all = encode_run_items(4, func, false, &[NoOdd(2), NoOdd(4)]);
        let some = encode_run_items(4, func, false, &[NoOdd(1), NoOdd(2), NoOdd(3), NoOdd(4)]);
        assert_eq!((all.sent, some.sent.clone()), (vec![], vec![1, 3]));
        assert_eq!(some.failed.iter().map(|f| f.0).collect::<Vec<_>>(), [0, 2]);
        // Both frames carry the same message: the items that encode, as one `Vec`.
        assert_eq!(
            all.frame.unwrap().payload(),
            some.frame.unwrap().payload(),
            "the partial encode differs from a whole one"
        );
    }
}
