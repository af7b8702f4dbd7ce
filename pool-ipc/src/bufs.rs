//! A small process-wide cache of large byte buffers, so that a payload's memory is reused
//! instead of freshly allocated: a new buffer of a megabyte costs hundreds of page faults
//! and the zeroing of every page, often more than the copy that fills it.
//!
//! What goes in: the buffer of a [`FrameBuf`](crate::FrameBuf) whose payload was copied
//! into a shared ring (shm mode), when the frame is dropped. What takes from it:
//! [`reuse_buffer`] (a receiver that decodes a large byte string into a buffer of its own,
//! say) and a `FrameBuf` that reserves room for a large payload. The cache holds at most
//! [`MAX_COUNT`] buffers and [`MAX_BYTES`] bytes; a buffer unused for [`IDLE`] is freed at
//! the next use of the cache, and every kept buffer is freed when a shared ring gives its
//! memory back for being idle (see [`Sender::release_idle_ring`](crate::Sender::release_idle_ring)).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Smaller buffers are neither kept nor looked for: the allocator recycles them well.
pub(crate) const MIN_KEEP: usize = 256 * 1024;
/// Larger buffers are not kept: a payload of many megabytes is rare enough, and keeping
/// it would hold that much memory for nothing most of the time.
const MAX_KEEP: usize = 2 << 20;
/// At most this many buffers are kept...
const MAX_COUNT: usize = 8;
/// ... holding at most this many bytes in all.
const MAX_BYTES: usize = 8 << 20;
/// A buffer unused this long is freed.
const IDLE: Duration = Duration::from_secs(1);

/// Kept buffers (empty), each with when it was put there.
struct Cache {
    bufs: Vec<(Vec<u8>, Instant)>,
}

impl Cache {
    const fn new() -> Cache {
        Cache { bufs: Vec::new() }
    }

    /// Keeps `v` if it is large and there is room; otherwise hands it back to be freed.
    /// Buffers idle since before `now - IDLE` are moved to `stale`.
    fn give(&mut self, mut v: Vec<u8>, now: Instant, stale: &mut Vec<Vec<u8>>) {
        self.take_stale(now, stale);
        if v.capacity() < MIN_KEEP || v.capacity() > MAX_KEEP {
            stale.push(v);
            return;
        }
        v.clear();
        let kept: usize = self.bufs.iter().map(|(b, _)| b.capacity()).sum();
        if self.bufs.len() < MAX_COUNT && kept + v.capacity() <= MAX_BYTES {
            self.bufs.push((v, now));
        } else {
            stale.push(v);
        }
    }

    /// A kept buffer that holds `len` bytes, if any: the one given last among those at
    /// most twice that size (its bytes are the likeliest to be in a CPU cache still), else
    /// the smallest.
    fn take(&mut self, len: usize, now: Instant, stale: &mut Vec<Vec<u8>>) -> Option<Vec<u8>> {
        self.take_stale(now, stale);
        let fits = |b: &Vec<u8>| b.capacity() >= len;
        let best = self
            .bufs
            .iter()
            .rposition(|(b, _)| fits(b) && b.capacity() / 2 <= len)
            .or_else(|| {
                self.bufs
                    .iter()
                    .enumerate()
                    .filter(|(_, (b, _))| fits(b))
                    .min_by_key(|(_, (b, _))| b.capacity())
                    .map(|(i, _)| i)
            })?;
        Some(self.bufs.remove(best).0)
    }

    /// Moves the buffers idle for [`IDLE`] to `out`.
    fn take_stale(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        // Oldest first: the idle ones are a prefix.
        let idle = self
            .bufs
            .iter()
            .take_while(|(_, t)| now.saturating_duration_since(*t) >= IDLE)
            .count();
        out.extend(self.bufs.drain(..idle).map(|(b, _)| b));
    }

    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.bufs.iter().map(|(b, _)| b.capacity()).sum()
    }
}

/// The process's cache.
static CACHE: Mutex<Cache> = Mutex::new(Cache::new());

/// Runs `f` on the process's cache; frees what it set aside after the lock is released.
fn with_cache<R>(f: impl FnOnce(&mut Cache, &mut Vec<Vec<u8>>) -> R) -> R {
    let mut freed = Vec::new();
    let r = f(
        &mut CACHE.lock().unwrap_or_else(PoisonError::into_inner),
        &mut freed,
    );
    drop(freed);
    r
}

/// Keeps `v`'s allocation for a later large payload, if it is large and the cache has
/// room; frees it otherwise.
pub(crate) fn give(v: Vec<u8>) {
    if v.capacity() < MIN_KEEP {
        return;
    }
    let now = Instant::now();
    with_cache(|c, freed| c.give(v, now, freed));
}

/// An empty `Vec` with room for at least `len` bytes: for a large `len`, a buffer the
/// process used before (its pages already in memory) when one of that size is kept,
/// otherwise a new allocation.
///
/// Use it for a large payload that is about to be filled, e.g. to decode a byte string
/// received through shared memory into a buffer of its own.
///
/// # Examples
///
/// ```
/// let mut v = pool_ipc::reuse_buffer(1 << 20);
/// assert!(v.is_empty() && v.capacity() >= 1 << 20);
/// v.extend_from_slice(&[7; 1 << 20]);
/// ```
pub fn reuse_buffer(len: usize) -> Vec<u8> {
    if len >= MIN_KEEP {
        let now = Instant::now();
        if let Some(v) = with_cache(|c, freed| c.take(len, now, freed)) {
            return v;
        }
    }
    Vec::with_capacity(len)
}

/// Keeps `v`'s allocation for a later [`reuse_buffer`], if it is large (256 KiB to 2 MiB)
/// and the cache has room (a few MiB); frees it otherwise. For a large payload buffer its
/// owner is done with, so that the next large payload does not fault in fresh memory.
///
/// # Examples
///
/// ```
/// let v = vec![7u8; 1 << 20];
/// let at = v.as_ptr();
/// pool_ipc::keep_buffer(v);
/// let again = pool_ipc::reuse_buffer(1 << 20);
/// assert!(again.is_empty() && again.capacity() >= 1 << 20);
/// # let _ = at;
/// ```
pub fn keep_buffer(v: Vec<u8>) {
    give(v);
}

/// How many small frames' buffers one thread keeps at most (see [`keep_small_frames`]):
/// a holder of frames meant for it need keep no more.
pub const SMALL_FRAMES_KEPT: usize = 1024;
/// The largest buffer, in bytes, that [`keep_small_frames`] keeps: a holder of frames meant
/// for it may free larger ones at once.
pub const SMALL_FRAME_MAX: usize = 1024;

thread_local! {
    /// Buffers of small frames handed to this thread, for the next small frames it makes.
    static SMALL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps the buffers of `frames` (those of a small frame: 1 KiB at most) for the small
/// frames this thread makes next ([`FrameBuf::with_capacity`](crate::FrameBuf::with_capacity)),
/// up to a thousand or so; the others are freed.
///
/// For a thread that makes many small frames which another thread sends and drops: handed
/// back, their buffers hold the next frames, where freeing them on the other thread and
/// allocating afresh on this one costs both threads a trip through the allocator.
///
/// # Examples
///
/// ```
/// let mut f = pool_ipc::FrameBuf::with_capacity(16);
/// f.extend_from_slice(b"done");
/// pool_ipc::keep_small_frames([f]);
/// let again = pool_ipc::FrameBuf::with_capacity(16);
/// assert!(again.payload().is_empty());
/// ```
pub fn keep_small_frames(frames: impl IntoIterator<Item = crate::FrameBuf>) {
    for f in frames {
        let mut v = f.into_buf();
        if !(1..=SMALL_FRAME_MAX).contains(&v.capacity()) {
            continue;
        }
        v.clear();
        // Each alone: the iterator may make frames too.
        let _ = SMALL.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut()
                && kept.len() < SMALL_FRAMES_KEPT
            {
                kept.push(v);
            }
        });
    }
}

/// A kept small buffer (see [`keep_small_frames`]) with room for `len` bytes, if any.
pub(crate) fn take_small(len: usize) -> Option<Vec<u8>> {
    if len > SMALL_FRAME_MAX {
        return None;
    }
    SMALL
        .try_with(|kept| {
            let mut kept = kept.try_borrow_mut().ok()?;
            match kept.last() {
                Some(v) if v.capacity() >= len => kept.pop(),
                _ => None,
            }
        })
        .ok()
        .flatten()
}

/// Frees every kept buffer.
pub(crate) fn release() {
    with_cache(|c, freed| freed.extend(c.bufs.drain(..).map(|(b, _)| b)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_kept_bounded_reused_and_freed_when_idle() {
        let mut c = Cache::new();
        let mut freed = Vec::new();
        let t0 = Instant::now();
        // Small ones are not kept.
        c.give(Vec::with_capacity(1024), t0, &mut freed);
        assert_eq!(c.kept_bytes(), 0);
        // Large ones are, up to the bounds.
        for _ in 0..2 * MAX_COUNT {
            c.give(Vec::with_capacity(MIN_KEEP), t0, &mut freed);
        }
        assert_eq!(c.bufs.len(), MAX_COUNT);
        c.give(Vec::with_capacity(MAX_KEEP + 1), t0, &mut freed);
        assert!(c.kept_bytes() <= MAX_BYTES);
        assert_eq!(freed.len(), 1 + MAX_COUNT + 1);
        // Not beyond the bytes bound either.
        c.bufs.clear();
        for _ in 0..MAX_COUNT {
            c.give(Vec::with_capacity(MAX_KEEP), t0, &mut freed);
        }
        assert_eq!(c.kept_bytes(), MAX_BYTES);
        // A buffer too small for a request is not handed out.
        c.bufs.clear();
        c.give(Vec::with_capacity(MIN_KEEP), t0, &mut freed);
        assert!(c.take(MIN_KEEP + 1, t0, &mut freed).is_none());
        // The smallest that fits is, emptied.
        let mut v = Vec::with_capacity(4 * MIN_KEEP);
        v.push(1u8);
        let at = v.as_ptr();
        c.bufs.clear();
        c.give(Vec::with_capacity(8 * MIN_KEEP), t0, &mut freed);
        c.give(v, t0, &mut freed);
        let got = c.take(2 * MIN_KEEP, t0, &mut freed).unwrap();
        assert_eq!((got.as_ptr(), got.len()), (at, 0));
        // Of buffers alike, the one given last.
        c.bufs.clear();
        let (a, b) = (Vec::with_capacity(MIN_KEEP), Vec::with_capacity(MIN_KEEP));
        let b_at = b.as_ptr();
        c.give(a, t0, &mut freed);
        c.give(b, t0, &mut freed);
        let got = c.take(MIN_KEEP, t0, &mut freed).unwrap();
        assert_eq!(got.as_ptr(), b_at);
        // What sat unused for IDLE is freed at the next use.
        let later = t0 + IDLE;
        freed.clear();
        assert!(c.take(MIN_KEEP, later, &mut freed).is_none());
        assert_eq!((c.kept_bytes(), freed.len()), (0, 1));
    }

    /// The buffers of small frames handed back hold this thread's next small frames, the
    /// last handed back first; large ones are freed, and no more than `SMALL_FRAMES_KEPT`
    /// are kept.
    #[test]
    fn small_frames_handed_back_hold_the_next_ones() {
        use crate::FrameBuf;
        let mut small = FrameBuf::with_capacity(40);
        small.extend_from_slice(&[1, 2, 3]);
        let at = small.payload().as_ptr();
        let large = FrameBuf::with_capacity(4 * SMALL_FRAME_MAX);
        keep_small_frames([large, small]);
        let again = FrameBuf::with_capacity(40);
        assert_eq!(
            again.payload().as_ptr(),
            at,
            "the small frame's buffer is reused"
        );
        assert!(again.payload().is_empty());
        // Nothing else was kept: the large frame's buffer was freed.
        assert!(take_small(1).is_none());
        // A kept buffer too small for a frame is left for a smaller one.
        keep_small_frames([FrameBuf::with_capacity(8)]);
        assert!(take_small(SMALL_FRAME_MAX).is_none());
        assert!(take_small(4).is_some());
        // An iterator that makes frames as it goes gets the buffers kept meanwhile.
        keep_small_frames((0..3).map(|_| FrameBuf::with_capacity(8)));
        assert_eq!(SMALL.with_borrow(Vec::len), 1);
        // Bounded.
        let many: Vec<FrameBuf> = (0..2 * SMALL_FRAMES_KEPT)
            .map(|_| FrameBuf::with_capacity(8))
            .collect();
        keep_small_frames(many);
        assert_eq!(SMALL.with_borrow(Vec::len), SMALL_FRAMES_KEPT);
        SMALL.with_borrow_mut(Vec::clear);
    }

    #[test]
    fn the_process_cache_hands_out_what_fits() {
        let v = reuse_buffer(MIN_KEEP);
        assert!(v.is_empty() && v.capacity() >= MIN_KEEP);
        let v = reuse_buffer(10);
        assert!(v.is_empty() && v.capacity() >= 10);
    }
}
