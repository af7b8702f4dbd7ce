//! Frames whose results have been decoded, handed back to a worker's connection to hold
//! a later frame: a map of tiny items gets one large frame per chunk, and a fresh buffer
//! for each costs page faults, zeroing and an `munmap` on the driver thread.
//!
//! Results are decoded on the driver thread (deliveries run there), so the spares live in
//! a thread-local list that the driver drains into the connection it reads next. A few
//! MiB at most are kept; any other thread that decodes keeps at most as much.

use std::cell::RefCell;

use pool_ipc::FramedConn;

/// Spare frames kept at most (a read can bring hundreds of small answers: a map of tiny
/// tasks, each worker holding hundreds)...
const KEEP: usize = 1024;
/// ... and bytes of capacity in all.
const KEEP_BYTES: usize = 16 << 20;

thread_local! {
    static SPARE: RefCell<Spares> = const { RefCell::new(Spares { bufs: Vec::new(), bytes: 0 }) };
}

/// The kept buffers and their capacity in all.
struct Spares {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

/// Keeps `frame`'s buffer for a later frame (or frees it if enough are kept).
pub(crate) fn give(frame: Vec<u8>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.bufs.len() < KEEP && s.bytes + frame.capacity() <= KEEP_BYTES {
            s.bytes += frame.capacity();
            s.bufs.push(frame);
        }
    });
}

/// A kept buffer, emptied, with room for `n` bytes if one has it (the first that has
/// enough, else a fresh one): an answer copied out of a worker's page (`page::ANSWER`,
/// taken on the waiting caller's thread, whose deliveries give the buffer back here) then
/// costs no allocation.
pub(crate) fn take(n: usize) -> Vec<u8> {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        match s.bufs.iter().rposition(|b| b.capacity() >= n) {
            Some(i) => {
                let mut b = s.bufs.swap_remove(i);
                s.bytes -= b.capacity();
                b.clear();
                b
            }
            None => Vec::with_capacity(n),
        }
    })
}

/// Hands the kept buffers to `conn`, which reuses them for the frames it reads next.
pub(crate) fn hand_to(conn: &mut FramedConn) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        s.bytes = 0;
        for v in s.bufs.drain(..) {
            conn.recycle(v);
        }
    });
}
