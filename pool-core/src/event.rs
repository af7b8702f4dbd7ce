//! [`Event`]: a flag shared between processes, that tasks poll to stop early.

use std::cell::RefCell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool_ipc::shm::{self, FrozenSegment, Segment};
use pool_spawn::protocol::FdRef;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const STATE: usize = 0;
const TOKEN: usize = 1;
const LEN: usize = 64;

/// A process-shared event: Python's `multiprocessing.Event`, usable as a task argument.
///
/// The flag lives in a small anonymous shared-memory segment (a memfd, never a `/dev/shm`
/// file), so setting it in one process is seen at once in every other; waiters sleep on a
/// futex. Unlike Python's, it can be passed straight to a task as an argument under every
/// start method: it serializes as a reference to its owner's segment, which the worker maps
/// when it decodes the argument (the pool passes the segment's descriptor along with the
/// task, so this works in a process that is not dumpable too). A pool keeps the segment
/// open until every task (or initializer) it was passed to is done, so the caller may drop
/// its `Event` right after submitting; the process that called [`Event::new`] must outlive
/// those tasks.
///
/// The typical use is a safe stop of running tasks, leaving the pool usable: tasks poll
/// [`is_set`](Event::is_set) and return early once it is set.
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// use std::time::Duration;
///
/// use procpool::{Event, Pool};
///
/// /// Works until told to stop; returns the rounds it did.
/// fn work(stop: Event) -> u32 {
///     let mut rounds = 0;
///     while !stop.wait_timeout(Duration::from_millis(5)) {
///         rounds += 1;
///     }
///     rounds
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     procpool::init(); // first line of main: workers start here
///     let stop = Event::new()?;
///     let pool = Pool::builder().processes(2).build()?;
///     let running = pool.apply_async(work, (stop.clone(),));
///     std::thread::sleep(Duration::from_millis(50));
///     stop.set(); // seen at once by the task in its worker
///     let _rounds: u32 = running.get()?;
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Event {
    seg: Arc<Segment>,
}

impl Event {
    /// A new event, not set.
    ///
    /// # Errors
    /// If the shared segment cannot be created (out of memory or file descriptors).
    pub fn new() -> io::Result<Event> {
        let seg = Segment::create("procpool-event", LEN)?;
        let token = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        seg.atomic_u64(TOKEN).store(token, Ordering::SeqCst);
        Ok(Event { seg: Arc::new(seg) })
    }

    /// Sets the flag and wakes every waiter, in every process.
    pub fn set(&self) {
        let word = self.seg.atomic_u32(STATE);
        word.store(1, Ordering::SeqCst);
        let _ = shm::futex_wake(word, u32::MAX);
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.seg.atomic_u32(STATE).store(0, Ordering::SeqCst);
    }

    /// True if the flag is set.
    pub fn is_set(&self) -> bool {
        self.seg.atomic_u32(STATE).load(Ordering::SeqCst) != 0
    }

    /// Blocks until the flag is set.
    pub fn wait(&self) {
        let word = self.seg.atomic_u32(STATE);
        while word.load(Ordering::SeqCst) == 0 {
            let _ = shm::futex_wait(word, 0, None);
        }
    }

    /// Blocks until the flag is set or `timeout` passes; true if it is set.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = crate::result::deadline_after(timeout);
        let word = self.seg.atomic_u32(STATE);
        loop {
            if word.load(Ordering::SeqCst) != 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = shm::futex_wait(word, 0, Some(deadline - now));
        }
    }

    fn token(&self) -> u64 {
        self.seg.atomic_u64(TOKEN).load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("set", &self.is_set())
            .finish()
    }
}

thread_local! {
    /// The segments of the events (and shared bytes) serialized since [`pinning`] began on
    /// this thread.
    static PINS: RefCell<Option<Vec<Pin>>> = const { RefCell::new(None) };
}

/// A shared segment a task's arguments refer to.
#[derive(Clone)]
pub(crate) enum Pin {
    /// An [`Event`]'s.
    Event(Arc<Segment>),
    /// A [`SharedBytes`](crate::SharedBytes)'.
    Bytes(Arc<FrozenSegment>),
}

impl Pin {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Pin::Event(s) => s.as_fd(),
            Pin::Bytes(s) => s.as_fd(),
        }
    }

    fn same(&self, other: &Pin) -> bool {
        match (self, other) {
            (Pin::Event(a), Pin::Event(b)) => Arc::ptr_eq(a, b),
            (Pin::Bytes(a), Pin::Bytes(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Keeps the segments of serialized events and shared bytes open while a task that refers
/// to them is pending.
///
/// A value's wire form names its place in this list (its slot), so that the descriptors
/// passed with the message, in this order, tell the worker which is which.
#[derive(Default, Clone)]
pub(crate) struct Pins(Vec<Pin>);

impl Pins {
    /// Whether it holds no event.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Duplicates of the segments' descriptors, in slot order, to pass with a message that
    /// carries the encoding: at most as many as one message carries, and only up to the
    /// first that cannot be duplicated (the values after it are opened through `/proc`).
    pub(crate) fn fds(&self) -> Vec<OwnedFd> {
        self.0
            .iter()
            .take(pool_ipc::fdpass::MAX_FDS)
            .map_while(|seg| seg.as_fd().try_clone_to_owned().ok())
            .collect()
    }
}

/// While [`pinning`] runs on this thread: keeps `pin` for the message being encoded and
/// returns its slot (the same segment many times over, in every item of a map say, takes
/// one slot). `None` outside `pinning`.
pub(crate) fn pin(pin: Pin) -> Option<u32> {
    PINS.with(|p| {
        let mut p = p.borrow_mut();
        let v = p.as_mut()?;
        let recent = v.len().saturating_sub(8);
        let i = match v[recent..].iter().position(|s| s.same(&pin)) {
            Some(i) => recent + i,
            None => {
                v.push(pin);
                v.len() - 1
            }
        };
        u32::try_from(i).ok()
    })
}

/// Runs `encode`, collecting the events it serializes, so the caller can keep them open
/// until a worker has decoded the bytes.
pub(crate) fn pinning<T>(encode: impl FnOnce() -> T) -> (T, Pins) {
    let outer = PINS.with(|p| p.borrow_mut().replace(Vec::new()));
    let out = encode();
    let pins = PINS.with(|p| std::mem::replace(&mut *p.borrow_mut(), outer));
    (out, Pins(pins.unwrap_or_default()))
}

#[derive(Serialize, Deserialize)]
struct Wire {
    seg: FdRef,
    token: u64,
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let slot = pin(Pin::Event(Arc::clone(&self.seg)));
        Wire {
            seg: FdRef {
                pid: std::process::id(),
                fd: self.seg.as_fd().as_raw_fd(),
                slot,
            },
            token: self.token(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fail = pool_spawn::task::noted_decode_error::<D::Error>;
        let w = Wire::deserialize(d)?;
        let seg = w.seg.open().map_err(|e| {
            fail(format!(
                "cannot open the Event shared by process {} (has it exited, or dropped the \
                 Event?): {e}",
                w.seg.pid
            ))
        })?;
        if seg.len() < LEN {
            return Err(fail("the Event's shared segment is too small".to_owned()));
        }
        let ev = Event { seg: Arc::new(seg) };
        if ev.token() != w.token {
            return Err(fail(format!(
                "process {} no longer holds this Event (it was dropped and its descriptor \
                 reused)",
                w.seg.pid
            )));
        }
        Ok(ev)
    }
}
