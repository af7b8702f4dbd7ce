//! A long-lived worker's channel watcher: a thread that sleeps until the pool's end of the
//! channel closes, then wakes the worker if it sleeps on its page's doorbell.
//!
//! An idle worker sleeps on the doorbell (see `runner::door_wait`), where nothing tells it
//! that the pool closed the channel without ringing, or that its process ended without the
//! parent-death signal firing (a parent that called `exec`). Without a watcher, the
//! worker's wait is therefore limited in time ([`crate::protocol::page::DOOR_WAIT_NS`]), after which
//! it blocks reading the channel, where a close shows. That time limit arms a kernel timer
//! at every wait: on a round trip of a few microseconds, a measurable part of it. A worker
//! that has run [`WATCH_AFTER`] tasks starts the watcher once and waits without a limit
//! from then on: the watcher's `poll` on the channel ends when the pool's end closes, and
//! the watcher moves the doorbell from `SLEEPING` to `AWAKE` (waking the worker) after
//! marking the channel closed, which the worker checks before each sleep.
//!
//! The watcher blocks every signal (signals for the process go to the worker's own thread
//! as before), holds no lock once started, and is not counted as a thread a fork must fear
//! (see `launcher::thread_count`): [`start`] returns only once it is about to `poll`.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::protocol::page;

/// Tasks a worker runs before it starts its watcher: a worker recycled sooner (or one that
/// runs few tasks) never pays for a thread.
pub(crate) const WATCH_AFTER: u64 = 64;

/// No watcher (none started in this process, or it could not be).
const NONE: u32 = 0;
/// Started, not yet about to wait.
const STARTING: u32 = 1;
/// Waiting for the channel to close.
const WATCHING: u32 = 2;
/// The channel's other end closed (or the watch failed): the worker reads its channel.
const CLOSED: u32 = 3;

/// This process's watcher state; put back to [`NONE`] as a worker begins ([`reset`]), so
/// that a worker forked from a process that had a watcher (a worker's own nested pool) does
/// not believe it has one.
static STATE: AtomicU32 = AtomicU32::new(NONE);
/// The process that started the watcher (its pid), for [`parked`].
static OWNER: AtomicU32 = AtomicU32::new(0);

/// Forgets a watcher this process inherited (it has no such thread): called as a worker
/// begins to serve.
pub(crate) fn reset() {
    STATE.store(NONE, Ordering::SeqCst);
}

/// Whether this process's doorbell waits may go without a time limit: a watcher is
/// waiting for the channel to close, or saw it close.
pub(crate) fn watching() -> bool {
    STATE.load(Ordering::SeqCst) >= WATCHING
}

/// Whether the watcher saw the pool's end of the channel close: the worker reads its
/// channel (where the close shows) instead of sleeping on the doorbell.
pub(crate) fn closed() -> bool {
    STATE.load(Ordering::SeqCst) == CLOSED
}

/// Whether this process has a watcher thread parked in its `poll` (it holds no lock): a
/// fork from another thread is then as safe as with that thread absent.
pub(crate) fn parked() -> bool {
    STATE.load(Ordering::SeqCst) == WATCHING && OWNER.load(Ordering::SeqCst) == own_pid()
}

fn own_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Starts the watcher of `chan` for the worker whose doorbell is `door` (both live as long
/// as the worker serves); `true` once it waits. Started at most once per process; `false`
/// if it could not be (no thread could be made: the worker keeps its timed waits).
pub(crate) fn start(chan: BorrowedFd<'_>, door: &'static AtomicU32) -> bool {
    if STATE
        .compare_exchange(NONE, STARTING, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return watching();
    }
    OWNER.store(own_pid(), Ordering::SeqCst);
    let fd = chan.as_raw_fd();
    // Every signal blocked while the thread is made: it starts with this mask and keeps it.
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both sets are valid for writing; only this thread's mask changes, and it is
    // put back below.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
    }
    let made = std::thread::Builder::new()
        .name("procpool-watch".to_owned())
        .stack_size(64 * 1024)
        .spawn(move || watch(fd, door));
    // SAFETY: restores this thread's own mask, saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
    }
    if made.is_err() {
        // Left at STARTING: never tried again, and `watching` stays false.
        return false;
    }
    // Until it is about to poll (so that it holds no lock a fork could copy).
    while STATE.load(Ordering::SeqCst) == STARTING {
        let _ = pool_ipc::shm::futex_wait(&STATE, STARTING, Some(Duration::from_millis(100)));
    }
    true
}

/// The watcher thread's body.
fn watch(fd: RawFd, door: &'static AtomicU32) {
    // The worker closes its channel only as its process ends (`runner::run` exits right
    // after). A `poll` begun holds the socket itself; one begun after the close fails, and
    // then, as after a close, the worker is only told to read its channel.
    // SAFETY: `fd` is the worker's channel, open for as long as the worker serves (above).
    let chan = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [rustix::event::PollFd::new(
        &chan,
        rustix::event::PollFlags::RDHUP,
    )];
    STATE.store(WATCHING, Ordering::SeqCst);
    let _ = pool_ipc::shm::futex_wake(&STATE, 1);
    // Until the other end closes (POLLHUP and POLLRDHUP) or the descriptor fails; bytes
    // arriving are not asked for (no POLLIN) and do not end it. Signals are blocked here.
    while let Ok(0) | Err(rustix::io::Errno::INTR) = rustix::event::poll(&mut fds, None) {}
    STATE.store(CLOSED, Ordering::SeqCst);
    // After the store: a worker that stores SLEEPING later sees CLOSED before it sleeps;
    // one asleep already is woken, as the pool wakes it when it writes.
    page::wake_sleeper(door);
}
