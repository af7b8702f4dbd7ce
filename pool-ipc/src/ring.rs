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
//! area, the sender skips to the start. The sender never waits for space: if the payload
//! does not fit now, the caller sends it inline. Everything the receiver reads (offsets in
//! frames, the header, the bytes) may have been written by a hostile peer, so every offset
//! is checked and failures are [`ErrorKind::Decode`] errors.

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
        let used = self.head.checked_sub(consumed).filter(|&u| u <= self.cap)?;
        let pos = self.head % self.cap;
        let skip = if pos + len > self.cap {
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
