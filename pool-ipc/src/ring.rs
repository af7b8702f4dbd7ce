//! The shared ring that carries large payloads in shm mode.
//!
//! Each direction of a connection has its own ring, created by the sender as a sealed
//! memfd ([`Segment`]) and passed to the receiver once (a "region" control frame with the
//! fd attached). Layout: a 4 KiB header page, then `cap` data bytes.
//!
//! * word 0 (`u32`): a magic number, so a wrong fd is noticed;
//! * `u64` word 1 (byte 8): `consumed`, the ring position up to which the receiver has
//!   copied payloads out. Only the receiver stores it; the sender only loads it.
//!
//! Positions are `u64` byte counts that only grow; `pos % cap` is the place in the data
//! area. A payload is stored contiguously: if it does not fit before the end of the data
//! area, the sender skips to the start; it does the same whenever the receiver has taken
//! every payload (and the skip keeps the payload's end within `cap` of the last one's), so
//! that a receiver that keeps up has the same first pages used again and again, mapped
//! and warm in a cache, rather than the whole ring touched in turn. The sender never
//! waits for space: if the payload does not fit now, the caller sends it inline.
//! Everything the receiver reads (offsets in frames, the header, the bytes) may have been
//! written by a hostile peer, so every offset is checked and failures are
//! [`ErrorKind::Decode`] errors.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::shm::Segment;

/// Bytes before the data area.
pub(crate) const REGION_HEADER: usize = 4096;
/// Word 0 of a ring.
const MAGIC: u32 = 0x5049_5043;
/// Index (in `u64` words) of the `consumed` counter.
const CONSUMED_WORD: usize = 1;
/// Smallest data area created.
const MIN_RING: usize = 2 << 20;
/// Largest data area created or accepted.
pub(crate) const MAX_RING: usize = 256 << 20;

/// The sender's side of a ring.
pub(crate) struct Tx {
    seg: Option<Segment>,
    cap: u64,
    head: u64,
    /// Everything before this position was taken or skipped when the ring last started
    /// again at its beginning (see [`Tx::place_with`]): the bytes in use are those from
    /// the later of it and the receiver's `consumed` up to `head`.
    floor: u64,
    /// The fd of a region not yet announced to the receiver; it goes out with the first
    /// payload placed in it.
    unannounced: Option<OwnedFd>,
    /// Creating a region failed once; stay inline from now on.
    failed: bool,
    /// When a payload was last placed, if the data area may hold pages since it was last
    /// released.
    dirty_since: Option<Instant>,
}

impl Tx {
    pub(crate) fn new() -> Tx {
        Tx {
            seg: None,
            cap: 0,
            head: 0,
            floor: 0,
            unannounced: None,
            failed: false,
            dirty_since: None,
        }
    }

    /// When a payload was last placed, if the ring holds memory that
    /// [`release_if_drained`](Tx::release_if_drained) could give back.
    pub(crate) fn dirty_since(&self) -> Option<Instant> {
        self.dirty_since
    }

    /// Gives the data area's memory back to the system if the receiver has taken every
    /// payload (nobody reads the area then, and only this side writes it); returns whether
    /// it did. If the receiver has not, the ring counts as used just now. The ring stays, announced and mapped: the next payloads fault fresh pages
    /// in.
    pub(crate) fn release_if_drained(&mut self) -> bool {
        let Some(seg) = &self.seg else {
            return false;
        };
        if self.dirty_since.is_none() {
            return false;
        }
        if seg.atomic_u64(CONSUMED_WORD).load(Ordering::Acquire) != self.head {
            // Still in use: count the idle time from now.
            self.dirty_since = Some(Instant::now());
            return false;
        }
        match seg.discard(REGION_HEADER, self.cap as usize) {
            Ok(()) => {
                self.dirty_since = None;
                // The process's cache of large buffers sits idle too, as a rule: the
                // frames that fill it went through a ring like this one.
                crate::bufs::release();
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot release an idle shared ring");
                self.dirty_since = None;
                false
            }
        }
    }

    /// Copies `payload` into the ring. See [`Tx::place_with`].
    pub(crate) fn place(&mut self, payload: &[u8]) -> Option<(u64, Option<OwnedFd>)> {
        self.place_with(payload.len(), |seg, at| {
            seg.write_at(at, payload);
            true
        })
    }

    /// Reserves `len` contiguous bytes of the ring and lets `write(segment, byte offset)`
    /// fill them (it returns whether it wrote exactly `len` bytes). Returns the payload's
    /// ring position, plus the fd of a new region to announce first (when the ring was
    /// created or grown). `None`: no room now (or `write` failed): send it inline.
    pub(crate) fn place_with(
        &mut self,
        len: usize,
        write: impl FnOnce(&Segment, usize) -> bool,
    ) -> Option<(u64, Option<OwnedFd>)> {
        if len > MAX_RING / 2 {
            return None;
        }
        if self.seg.is_none() || (len as u64) * 2 > self.cap {
            if self.failed {
                return None;
            }
            let cap = len
                .saturating_mul(4)
                .next_power_of_two()
                .clamp(MIN_RING, MAX_RING);
            let made = Segment::create("pool-ipc-ring", REGION_HEADER + cap).and_then(|s| {
                let fd = s.as_fd().try_clone_to_owned()?;
                Ok((s, fd))
            });
            match made {
                Ok((seg, fd)) => {
                    seg.atomic_u32(0).store(MAGIC, Ordering::Relaxed);
                    self.seg = Some(seg);
                    self.cap = cap as u64;
                    self.head = 0;
                    self.floor = 0;
                    self.unannounced = Some(fd);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot create a shared ring; sending inline");
                    self.failed = true;
                    return None;
                }
            }
        }
        let seg = self.seg.as_ref()?;
        let len = len as u64;
        let consumed = seg.atomic_u64(CONSUMED_WORD).load(Ordering::Acquire);
        // A receiver that reports nonsense only gets inline frames.
        let used = self
            .head
            .checked_sub(consumed.max(self.floor))
            .filter(|&u| u <= self.cap)?;
        let pos = self.head % self.cap;
        // A payload that does not fit before the end of the data area goes at its start.
        // So does one the receiver has left the whole ring free for (everything taken) and
        // whose end stays within `cap` of the receiver's last position (`len <= pos`, which
        // its checks ask): the pages at the start are in memory and likely still in a CPU
        // cache, where those further on may not have been mapped yet (each first touch of
        // a page costs a fault). A receiver that keeps up thus has the ring's first pages
        // used over and over. The bytes skipped then are free at once (`floor`): the ring
        // was empty.
        let restart = used == 0 && pos != 0 && len <= pos;
        let skip = if pos + len > self.cap || restart {
            self.cap - pos
        } else {
            0
        };
        if used + skip + len > self.cap {
            return None;
        }
        let off = self.head + skip;
        if !write(seg, REGION_HEADER + (off % self.cap) as usize) {
            return None;
        }
        if restart {
            self.floor = off;
        }
        self.head = off + len;
        self.dirty_since = Some(Instant::now());
        Some((off, self.unannounced.take()))
    }
}

/// The receiver's side of a ring.
pub(crate) struct Rx {
    seg: Option<Segment>,
    cap: u64,
    /// End of the last payload taken.
    next: u64,
}

fn bad(msg: &'static str) -> Error {
    Error::msg(ErrorKind::Decode, msg)
}

impl Rx {
    pub(crate) fn new() -> Rx {
        Rx {
            seg: None,
            cap: 0,
            next: 0,
        }
    }

    /// Switches to a new region announced by the peer.
    pub(crate) fn adopt(&mut self, fd: OwnedFd) -> Result<()> {
        let seg = Segment::from_fd(fd).map_err(|e| {
            tracing::debug!(error = %e, "peer's shared region refused");
            bad("peer's shared-memory region is not a sealed memfd")
        })?;
        let len = seg.len();
        if len <= REGION_HEADER || len > REGION_HEADER + MAX_RING {
            return Err(bad("peer's shared-memory region has a bad size"));
        }
        if seg.atomic_u32(0).load(Ordering::Relaxed) != MAGIC {
            return Err(bad("peer's shared-memory region has a bad header"));
        }
        self.cap = (len - REGION_HEADER) as u64;
        self.next = 0;
        self.seg = Some(seg);
        Ok(())
    }

    /// Copies out the payload at ring position `off` (appending to the empty `v`) and
    /// frees its space.
    pub(crate) fn take(&mut self, off: u64, len: usize, mut v: Vec<u8>) -> Result<Vec<u8>> {
        let seg = self
            .seg
            .as_ref()
            .ok_or_else(|| bad("shared-memory reference before any region"))?;
        let len64 = len as u64;
        let end = off
            .checked_add(len64)
            .ok_or_else(|| bad("shared-memory reference overflows"))?;
        if off < self.next || end - self.next > self.cap || (off % self.cap) + len64 > self.cap {
            return Err(bad("shared-memory reference out of bounds"));
        }
        v.clear();
        seg.read_to_vec(REGION_HEADER + (off % self.cap) as usize, len, &mut v);
        seg.atomic_u64(CONSUMED_WORD).store(end, Ordering::Release);
        self.next = end;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Places `payload` in `tx`; the receiver `rx` adopts the ring it announces, if any.
    fn place(tx: &mut Tx, rx: &mut Rx, payload: &[u8]) -> u64 {
        let (off, fd) = tx.place(payload).expect("room");
        if let Some(fd) = fd {
            rx.adopt(fd.as_fd().try_clone_to_owned().unwrap()).unwrap();
        }
        off
    }

    #[test]
    fn a_drained_ring_starts_again_at_its_beginning() {
        let (mut tx, mut rx) = (Tx::new(), Rx::new());
        let a = vec![1u8; 300 << 10];
        assert_eq!(place(&mut tx, &mut rx, &a), 0);
        let cap = tx.cap;
        assert_eq!(rx.take(0, a.len(), Vec::new()).unwrap(), a);
        // Taken: each next payload goes at the start again, and the receiver takes it.
        for round in 1..10u64 {
            let b = vec![round as u8; a.len()];
            let off = place(&mut tx, &mut rx, &b);
            assert_eq!(off, round * cap, "round {round}");
            assert_eq!(rx.take(off, b.len(), Vec::new()).unwrap(), b);
        }
        // Not taken yet: the next go after it, as before, as many as the ring holds (the
        // bytes skipped to start again are free).
        let off = place(&mut tx, &mut rx, &a);
        assert_eq!(off % cap, 0);
        let mut at = vec![off];
        while let Some((next, _)) = tx.place(&a) {
            assert_eq!(next, at[at.len() - 1] + a.len() as u64);
            at.push(next);
        }
        assert_eq!(at.len() as u64, cap / a.len() as u64);
        for at in at {
            assert_eq!(rx.take(at, a.len(), Vec::new()).unwrap(), a);
        }
        // Drained, but a payload longer than the bytes before the ring's end position
        // would end too far from the receiver's last one: it goes on after it.
        let (mut tx, mut rx) = (Tx::new(), Rx::new());
        let small = vec![2u8; 64 << 10];
        assert_eq!(place(&mut tx, &mut rx, &small), 0);
        assert_eq!(rx.take(0, small.len(), Vec::new()).unwrap(), small);
        let off = place(&mut tx, &mut rx, &a);
        assert_eq!(off, small.len() as u64);
        assert_eq!(rx.take(off, a.len(), Vec::new()).unwrap(), a);
    }
}
