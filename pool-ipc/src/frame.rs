//! The wire format, [`FrameBuf`], and the buffered read and write halves that every
//! channel type is built from.
//!
//! A frame is a little-endian `u32` header followed by the payload. A header below 2³¹ is
//! the payload length. A header with the top bit set is a *control frame* of shm mode:
//! the low bits give the length of a small body (at most [`CONTROL_MAX`] bytes) whose
//! first byte says what it is:
//!
//! * `1` (region): a new shared ring, whose memfd arrives with this frame as `SCM_RIGHTS`;
//! * `2` (shm reference): `[2, 0, 0, 0, offset: u64 LE, len: u32 LE]`, a payload of `len`
//!   bytes stored in the sender's ring at ring position `offset`;
//! * `3` (announcement): `[3, 0, 0, 0, len: u32 LE, len ^ ANNOUNCE_CHECK: u32 LE]`: the next
//!   frame is a plain frame of `len` bytes. Sent before every frame above
//!   [`Config::announce_above`]; a receiver with that setting refuses larger plain headers
//!   that were not announced, so stray bytes cannot pass for a huge frame.
//! * `4` (descriptors): `[4, 0, 0, 0, count: u32 LE]`: `count` descriptors arrive with this
//!   frame as `SCM_RIGHTS`, for the next payload frame (see [`Config::accept_fds`]; not
//!   tied to shm mode).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use postcard::ser_flavors::Flavor;
use rustix::io::Errno;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::{os, ring};

/// Bytes in a frame header.
pub(crate) const HEADER_LEN: usize = 4;
/// Top bit of a header: the frame is a control frame.
pub(crate) const CONTROL_FLAG: u32 = 1 << 31;
/// The largest payload the header can describe.
pub(crate) const MAX_WIRE_LEN: usize = (1 << 31) - 1;
/// The largest control body.
pub(crate) const CONTROL_MAX: usize = 64;
/// Control kind: a new shared ring (fd attached).
pub(crate) const KIND_REGION: u8 = 1;
/// Control kind: a payload stored in the ring.
pub(crate) const KIND_SHM_REF: u8 = 2;
/// Control kind: the announcement of a large plain frame.
pub(crate) const KIND_ANNOUNCE: u8 = 3;
/// Control kind: descriptors for the next payload frame (fds attached).
pub(crate) const KIND_FDS: u8 = 4;
/// Mixed into an announcement's length to make its check word ("PROC").
const ANNOUNCE_CHECK: u32 = 0x434f_5250;
/// Bytes of an announcement frame (header and body).
const ANNOUNCE_LEN: usize = HEADER_LEN + 12;
/// The smallest `announce_above` setting (small frames are coalesced by copying, unannounced).
pub(crate) const ANNOUNCE_MIN: usize = COPY_LIMIT;

/// Largest size of the read buffer; frames that do not fit are read straight into their
/// own `Vec`.
const READ_BUF_LEN: usize = 128 * 1024;
/// First size of the read buffer. It doubles (up to [`READ_BUF_LEN`]) when a read fills it
/// or a frame needs the room, so a connection that carries a few small messages (a
/// short-lived worker's) never pays for zeroing the full size.
const READ_BUF_START: usize = 8 * 1024;
/// First size of the read buffer with [`Config::small_read_buffer`].
const READ_BUF_SMALL: usize = 512;
/// Small frames are coalesced into write buffers of about this size.
const AGG_LIMIT: usize = 64 * 1024;
/// A queued [`FrameBuf`] this small is copied into the write buffer instead of being
/// queued on its own (a copy is cheaper than an extra iovec).
const COPY_LIMIT: usize = 4096;
/// A drained write buffer up to this capacity is kept for reuse.
const KEEP_LIMIT: usize = 2 << 20;
/// A receiver keeps payload buffers of up to this capacity in all for reuse...
const SCRATCH_KEEP: usize = 8 << 20;
/// ... and at most this many of them.
const SCRATCH_COUNT: usize = 8;
/// At most this many iovecs per `writev`.
const MAX_IOV: usize = 64;
/// Passed fds kept waiting for their control frame; a peer sending more loses the oldest.
const MAX_PENDING_FDS: usize = 16;
/// The same on a channel that accepts passed descriptors: room for a full message's worth
/// beyond what a read may bring ahead of its control frame.
const MAX_PENDING_FDS_ACCEPTING: usize = MAX_PENDING_FDS + 2 * crate::fdpass::MAX_FDS;

/// A complete frame (header + payload), built once and then queued or sent without
/// copying.
///
/// The header space is reserved up front and filled in when the frame is sent. Use it to
/// encode a message once and send it to several peers, or to assemble a payload from
/// pieces (e.g. a pre-encoded header struct followed by raw bytes). The receiver sees the
/// payload exactly as appended here.
///
/// # Examples
///
/// ```
/// use pool_ipc::FrameBuf;
///
/// let mut f = FrameBuf::new();
/// f.encode(&(1u32, "two"))?;
/// assert_eq!(f.payload_len(), 5);
/// f.extend_from_slice(&[9, 9]);
/// f.truncate_payload(5);
/// assert_eq!(f.payload(), &[1, 3, b't', b'w', b'o']);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct FrameBuf {
    buf: Vec<u8>,
    /// The payload was copied into a shared ring: when the frame is dropped, its buffer
    /// goes to the process's cache of large buffers (see [`crate::reuse_buffer`]).
    in_ring: AtomicBool,
}

impl Clone for FrameBuf {
    fn clone(&self) -> Self {
        FrameBuf {
            buf: self.buf.clone(),
            in_ring: AtomicBool::new(false),
        }
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        if *self.in_ring.get_mut() {
            crate::bufs::give(std::mem::take(&mut self.buf));
        }
    }
}

impl std::fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuf")
            .field("payload_len", &self.payload_len())
            .finish()
    }
}

impl Default for FrameBuf {
    fn default() -> Self {
        FrameBuf::new()
    }
}

impl FrameBuf {
    /// An empty frame (the header space is reserved).
    pub fn new() -> Self {
        FrameBuf::with_capacity(0)
    }

    /// An empty frame with room for `n` payload bytes.
    ///
    /// A large frame (hundreds of KiB) reuses a buffer of an earlier large frame when the
    /// process keeps one (see [`reuse_buffer`](crate::reuse_buffer)).
    pub fn with_capacity(n: usize) -> Self {
        let len = HEADER_LEN.saturating_add(n);
        let mut buf = match crate::bufs::take_small(len) {
            Some(v) => v,
            None => crate::bufs::reuse_buffer(len),
        };
        buf.extend_from_slice(&[0; HEADER_LEN]);
        FrameBuf {
            buf,
            in_ring: AtomicBool::new(false),
        }
    }

    /// The frame's buffer, for [`keep_small_frames`](crate::keep_small_frames).
    pub(crate) fn into_buf(mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Makes room for at least `additional` more payload bytes (reusing a kept buffer, as
    /// [`with_capacity`](FrameBuf::with_capacity) does, while the frame is empty).
    pub fn reserve(&mut self, additional: usize) {
        if self.payload_len() == 0 && self.buf.capacity() - HEADER_LEN < additional {
            let mut buf = crate::bufs::reuse_buffer(HEADER_LEN.saturating_add(additional));
            buf.extend_from_slice(&[0; HEADER_LEN]);
            self.buf = buf;
            return;
        }
        self.buf.reserve(additional);
    }

    /// Appends raw bytes to the payload.
    ///
    /// # Panics
    ///
    /// If the payload would exceed the wire format's limit of 2³¹ − 1 bytes.
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        assert!(
            self.payload_len() + b.len() <= MAX_WIRE_LEN,
            "FrameBuf payload would exceed the 2 GiB wire limit"
        );
        self.buf.extend_from_slice(b);
    }

    /// Appends the postcard encoding of `v` to the payload.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] if postcard cannot encode `v`, [`ErrorKind::FrameTooLarge`] if
    /// the payload would exceed 2³¹ − 1 bytes. On error the frame is left unchanged.
    pub fn encode<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        let at = self.buf.len();
        encode_into(&mut self.buf, v)?;
        if self.payload_len() > MAX_WIRE_LEN {
            let len = self.payload_len();
            self.buf.truncate(at);
            return Err(Error::too_large(len, MAX_WIRE_LEN));
        }
        Ok(())
    }

    /// Appends up to `max` bytes that `fill` writes into the front of the slice it is given
    /// (`max` bytes long, zeroed): `fill` answers how many it wrote, and the payload keeps
    /// those (`None` from `fill`: none, the frame left as it was). For values encoded
    /// by hand, many at once, without a check of room per byte.
    ///
    /// # Panics
    ///
    /// If the payload would exceed the wire format's limit of 2³¹ − 1 bytes, or `fill`
    /// answers more than `max`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut f = pool_ipc::FrameBuf::new();
    /// f.append_with(8, |out| {
    ///     out[..2].copy_from_slice(&[7, 9]);
    ///     Some(2)
    /// });
    /// assert_eq!(f.payload(), &[7, 9]);
    /// ```
    pub fn append_with(&mut self, max: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        assert!(
            self.payload_len() + max <= MAX_WIRE_LEN,
            "FrameBuf payload would exceed the 2 GiB wire limit"
        );
        let at = self.buf.len();
        self.buf.resize(at + max, 0);
        let n = fill(&mut self.buf[at..]).unwrap_or(0);
        assert!(n <= max, "FrameBuf::append_with wrote past its room");
        self.buf.truncate(at + n);
    }

    /// An encoder of values one after another onto the payload (see [`FrameAppender`]).
    pub fn appender(&mut self) -> FrameAppender<'_> {
        FrameAppender {
            ser: postcard::Serializer {
                output: VecFlavor(&mut self.buf),
            },
        }
    }

    /// The bytes the frame's buffer holds room for, its header included.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADER_LEN..]
    }

    /// Shortens the payload to `len` bytes (no effect if it is already shorter).
    pub fn truncate_payload(&mut self, len: usize) {
        self.buf.truncate(HEADER_LEN + len);
    }

    /// Replaces the first `n` payload bytes by `with`; the bytes after them move to follow
    /// it. For a message whose head is known only once its body is written: the body goes
    /// after a gap, the head into the gap.
    ///
    /// # Panics
    ///
    /// If `n` is more than the payload's length, or the payload would exceed the wire
    /// format's limit of 2³¹ − 1 bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut f = pool_ipc::FrameBuf::new();
    /// f.extend_from_slice(&[0, 0, 0, 7, 8]);
    /// f.replace_payload_prefix(3, &[1]);
    /// assert_eq!(f.payload(), &[1, 7, 8]);
    /// ```
    pub fn replace_payload_prefix(&mut self, n: usize, with: &[u8]) {
        assert!(n <= self.payload_len(), "FrameBuf prefix past the payload");
        assert!(
            self.payload_len() - n + with.len() <= MAX_WIRE_LEN,
            "FrameBuf payload would exceed the 2 GiB wire limit"
        );
        self.buf
            .splice(HEADER_LEN..HEADER_LEN + n, with.iter().copied());
    }

    /// Removes the whole payload, keeping the allocation.
    pub fn clear(&mut self) {
        self.truncate_payload(0);
    }

    /// The frame's bytes on the wire, header filled in.
    pub(crate) fn into_wire(mut self) -> Vec<u8> {
        let len = self.payload_len() as u32;
        let mut buf = std::mem::take(&mut self.buf);
        buf[..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
        buf
    }
}

/// Appends values one after another to a [`FrameBuf`]'s payload, as
/// [`FrameBuf::encode`] of each would, through one postcard serializer kept from one value
/// to the next: cheaper per value when there are many small ones (a sequence's elements).
///
/// # Examples
///
/// ```
/// let mut f = pool_ipc::FrameBuf::new();
/// let mut items = f.appender();
/// assert_eq!(items.encode(&7u32)?, 1);
/// assert_eq!(items.encode(&300u32)?, 2);
/// assert_eq!(f.payload(), &[7, 0xac, 0x02]);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct FrameAppender<'a> {
    ser: postcard::Serializer<VecFlavor<'a>>,
}

impl std::fmt::Debug for FrameAppender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameAppender")
            .field("payload_len", &(self.ser.output.0.len() - HEADER_LEN))
            .finish()
    }
}

impl FrameAppender<'_> {
    /// Appends the postcard encoding of `v` to the payload: how many bytes it took.
    ///
    /// # Errors
    ///
    /// As for [`FrameBuf::encode`]; on error the payload is left as it was.
    #[inline]
    pub fn encode<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<usize> {
        let at = self.ser.output.0.len();
        if let Err(e) = v.serialize(&mut self.ser) {
            self.ser.output.0.truncate(at);
            return Err(Error::encode(e, v));
        }
        let end = self.ser.output.0.len();
        if end - HEADER_LEN > MAX_WIRE_LEN {
            self.ser.output.0.truncate(at);
            return Err(Error::too_large(end - HEADER_LEN, MAX_WIRE_LEN));
        }
        Ok(end - at)
    }
}

/// A postcard output that appends to a `Vec` it borrows.
struct VecFlavor<'a>(&'a mut Vec<u8>);

impl Flavor for VecFlavor<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // postcard writes each varint (at most 10 bytes) and fixed-size field through
        // here: a loop over the bytes costs less than a call to memcpy for each, and one
        // through `extend` (room made once, the length stored once) less than pushes,
        // each of which stores the length and reloads the vector after its byte.
        if data.len() <= 16 {
            self.0.extend(data.iter().copied());
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A postcard output that writes into a shared segment's `pos..end`.
struct SegFlavor<'a> {
    seg: &'a crate::shm::Segment,
    pos: usize,
    end: usize,
}

impl Flavor for SegFlavor<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() > self.end - self.pos {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.seg.write_at(self.pos, data);
        self.pos += data.len();
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.pos)
    }
}

/// Appends the postcard encoding of `v` to `out`. On error `out` is left as it was.
///
/// With [`encode_seq_len`] this encodes a sequence one element at a time, so that an
/// element that fails to encode can be left out or replaced without losing the others.
///
/// # Errors
///
/// [`ErrorKind::Encode`] if `v`'s `Serialize` implementation fails.
///
/// # Examples
///
/// ```
/// let mut out = Vec::new();
/// pool_ipc::encode_seq_len(&mut out, 2);
/// pool_ipc::encode_append(&mut out, &7u32)?;
/// pool_ipc::encode_append(&mut out, &9u32)?;
/// assert_eq!(postcard::from_bytes::<Vec<u32>>(&out).unwrap(), vec![7, 9]);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub fn encode_append<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<()> {
    encode_into(out, v)
}

/// The length of postcard(v), found without writing it (byte strings are counted, not
/// copied): size a buffer exactly before encoding into it.
///
/// # Errors
///
/// [`ErrorKind::Encode`] if postcard cannot encode `v`.
///
/// # Examples
///
/// ```
/// let v = (7u8, vec![1u32, 300]);
/// assert_eq!(pool_ipc::encoded_len(&v)?, postcard::to_allocvec(&v).unwrap().len());
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub fn encoded_len<T: Serialize + ?Sized>(v: &T) -> Result<usize> {
    postcard::serialize_with_flavor(v, CountFlavor(0)).map_err(|e| Error::encode(e, v))
}

/// A postcard output that only counts bytes.
struct CountFlavor(usize);

impl Flavor for CountFlavor {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }

    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// Appends a sequence length as postcard writes it (a varint), to be followed by that many
/// elements appended with [`encode_append`].
pub fn encode_seq_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends postcard(v) to `out`; on error `out` is truncated back.
fn encode_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<()> {
    let at = out.len();
    match postcard::serialize_with_flavor(v, VecFlavor(out)) {
        Ok(()) => Ok(()),
        Err(e) => {
            out.truncate(at);
            Err(Error::encode(e, v))
        }
    }
}

/// Appends a complete frame (header + postcard(v)) to `out`, returning the payload length.
/// On error `out` is unchanged.
fn encode_frame<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T, max: usize) -> Result<usize> {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = encode_into(out, v) {
        out.truncate(at);
        return Err(e);
    }
    let len = out.len() - at - HEADER_LEN;
    if len > max {
        out.truncate(at);
        return Err(Error::too_large(len, max));
    }
    out[at..at + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(len)
}

/// The body of a "region" control frame.
fn region_frame() -> [u8; HEADER_LEN + 4] {
    let mut f = [0; HEADER_LEN + 4];
    f[..HEADER_LEN].copy_from_slice(&(CONTROL_FLAG | 4).to_le_bytes());
    f[HEADER_LEN] = KIND_REGION;
    f
}

/// A complete announcement of a plain frame of `len` bytes.
fn announce_frame(len: usize) -> [u8; ANNOUNCE_LEN] {
    let mut f = [0; ANNOUNCE_LEN];
    f[..HEADER_LEN].copy_from_slice(&(CONTROL_FLAG | 12).to_le_bytes());
    f[HEADER_LEN] = KIND_ANNOUNCE;
    let len = len as u32;
    f[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&len.to_le_bytes());
    f[HEADER_LEN + 8..].copy_from_slice(&(len ^ ANNOUNCE_CHECK).to_le_bytes());
    f
}

/// A complete "descriptors" control frame, for `n` descriptors.
fn fds_frame(n: usize) -> [u8; HEADER_LEN + 8] {
    let mut f = [0u8; HEADER_LEN + 8];
    f[..4].copy_from_slice(&(CONTROL_FLAG | 8).to_le_bytes());
    f[4] = KIND_FDS;
    f[8..].copy_from_slice(&(n as u32).to_le_bytes());
    f
}

/// A complete "shm reference" control frame.
fn shm_ref_frame(off: u64, len: usize) -> [u8; HEADER_LEN + 16] {
    let mut f = [0; HEADER_LEN + 16];
    f[..HEADER_LEN].copy_from_slice(&(CONTROL_FLAG | 16).to_le_bytes());
    f[HEADER_LEN] = KIND_SHM_REF;
    f[HEADER_LEN + 4..HEADER_LEN + 12].copy_from_slice(&off.to_le_bytes());
    f[HEADER_LEN + 12..].copy_from_slice(&(len as u32).to_le_bytes());
    f
}

// ---------------------------------------------------------------------------------------
// Write half
// ---------------------------------------------------------------------------------------

/// One queued buffer; `fds`, if any, travel with the buffer's first byte.
struct Chunk {
    data: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Whether small frames may be appended (false for a queued FrameBuf's own Vec).
    appendable: bool,
}

/// The outgoing side: a queue of buffers written with `writev`/`sendmsg`, plus the
/// shared ring when shm mode is on.
pub(crate) struct WriteHalf {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_off: usize,
    /// Bytes queued and not yet written.
    pending: usize,
    /// Bytes written since the start.
    written: u64,
    /// A cleared buffer kept for reuse.
    spare: Vec<u8>,
    socket: bool,
    threshold: Option<usize>,
    ring: Option<ring::Tx>,
    pub(crate) max: usize,
    /// Frames above this size are announced (see [`Config::announce_above`]).
    announce: Option<usize>,
}

impl WriteHalf {
    /// `socket`: whether the descriptor written to is a socket (`os::is_socket`).
    pub(crate) fn new(socket: bool, cfg: &Config) -> WriteHalf {
        WriteHalf {
            chunks: VecDeque::new(),
            front_off: 0,
            pending: 0,
            written: 0,
            spare: Vec::new(),
            socket,
            threshold: if socket { cfg.shm_threshold } else { None },
            ring: None,
            max: cfg.max_frame_len,
            announce: cfg.announce_above,
        }
    }

    /// Whether a frame of `len` payload bytes is announced.
    fn announces(&self, len: usize) -> bool {
        self.announce.is_some_and(|a| len > a)
    }

    /// Queues the announcement of a frame of `len` bytes if it needs one.
    fn announce_if_large(&mut self, len: usize) {
        if self.announces(len) {
            self.agg().extend_from_slice(&announce_frame(len));
            self.pending += ANNOUNCE_LEN;
        }
    }

    /// See [`ring::Tx::dirty_since`].
    pub(crate) fn ring_dirty_since(&self) -> Option<Instant> {
        self.ring.as_ref().and_then(ring::Tx::dirty_since)
    }

    /// See [`ring::Tx::release_if_drained`].
    pub(crate) fn release_drained_ring(&mut self) -> bool {
        self.ring.as_mut().is_some_and(ring::Tx::release_if_drained)
    }

    /// Whether everything queued has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Bytes written since the start.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// The buffer that small frames are appended to.
    fn agg(&mut self) -> &mut Vec<u8> {
        let need_new = match self.chunks.back() {
            Some(c) => !c.appendable || c.data.len() >= AGG_LIMIT,
            None => true,
        };
        if need_new {
            let data = std::mem::take(&mut self.spare);
            self.chunks.push_back(Chunk {
                data,
                fds: Vec::new(),
                appendable: true,
            });
        }
        &mut self
            .chunks
            .back_mut()
            .expect("a chunk was just ensured")
            .data
    }

    /// Encodes `msg` as a frame at the end of the queue.
    pub(crate) fn encode<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<()> {
        let size = if self.threshold.is_some() || self.announce.is_some() {
            postcard::experimental::serialized_size(msg).ok()
        } else {
            None
        };
        if let Some(t) = self.threshold
            && let Some(len) = size
            && len > t
            && len <= self.max
        {
            // Large: encode straight into the shared ring (one copy), if it has room.
            let ring = self.ring.get_or_insert_with(ring::Tx::new);
            let placed = ring.place_with(len, |seg, at| {
                let flavor = SegFlavor {
                    seg,
                    pos: at,
                    end: at + len,
                };
                postcard::serialize_with_flavor(msg, flavor).is_ok_and(|end| end == at + len)
            });
            if let Some((off, announce)) = placed {
                self.push_shm_ref(off, len, announce);
                return Ok(());
            }
        }
        let max = self.max;
        // An announcement goes first when the size is known to need one.
        let known = size.filter(|&len| self.announces(len));
        let agg = self.agg();
        let start = agg.len();
        if let Some(len) = known {
            agg.extend_from_slice(&announce_frame(len));
        }
        let mut at = agg.len();
        let len = match encode_frame(agg, msg, max) {
            Ok(len) => len,
            Err(e) => {
                agg.truncate(start);
                return Err(e);
            }
        };
        if known.is_some_and(|k| k != len) {
            // The size estimate was off: announce what was encoded.
            agg[start..at].copy_from_slice(&announce_frame(len));
        } else if known.is_none() && self.announce.is_some_and(|a| len > a) {
            // Size unknown beforehand: slip the announcement in front (a rare path: only
            // large frames whose size postcard could not count in advance).
            let agg = self.agg();
            agg.splice(at..at, announce_frame(len));
            at += ANNOUNCE_LEN;
        }
        self.pending += at - start + HEADER_LEN + len;
        if self.threshold.is_some_and(|t| len > t) {
            self.divert_tail(start, at);
        }
        Ok(())
    }

    /// The payload length of a frame made of `pieces`, if it is within `max_frame_len`.
    fn pieces_len(&self, pieces: &[&[u8]]) -> Result<usize> {
        pieces
            .iter()
            .try_fold(0usize, |n, p| n.checked_add(p.len()))
            .filter(|&n| n <= self.max)
            .ok_or_else(|| {
                let n = pieces.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
                Error::too_large(n, self.max)
            })
    }

    /// [`push_pieces`](Self::push_pieces), passing `fds` with the frame (see
    /// [`push_fds`](Self::push_fds)); nothing is queued if the frame is too large.
    pub(crate) fn push_pieces_with_fds(
        &mut self,
        pieces: &[&[u8]],
        fds: Vec<OwnedFd>,
    ) -> Result<()> {
        self.pieces_len(pieces)?;
        self.push_fds(fds);
        self.push_pieces(pieces)
    }

    /// Queues one frame whose payload is `pieces` one after the other (in shm mode, a large
    /// one is copied piece by piece into the ring).
    pub(crate) fn push_pieces(&mut self, pieces: &[&[u8]]) -> Result<()> {
        let len = self.pieces_len(pieces)?;
        if self.threshold.is_some_and(|t| len > t) {
            let ring = self.ring.get_or_insert_with(ring::Tx::new);
            let placed = ring.place_with(len, |seg, mut at| {
                for p in pieces {
                    seg.write_at(at, p);
                    at += p.len();
                }
                true
            });
            if let Some((off, announce)) = placed {
                self.push_shm_ref(off, len, announce);
                return Ok(());
            }
        }
        self.announce_if_large(len);
        let agg = self.agg();
        agg.reserve(HEADER_LEN + len);
        agg.extend_from_slice(&(len as u32).to_le_bytes());
        for p in pieces {
            agg.extend_from_slice(p);
        }
        self.pending += HEADER_LEN + len;
        Ok(())
    }

    /// Moves the frame at `at..` of the last chunk into the shared ring, if it fits,
    /// dropping its announcement at `start..at`, if any.
    fn divert_tail(&mut self, start: usize, at: usize) {
        let chunk = self.chunks.back_mut().expect("the frame was just appended");
        let ring = self.ring.get_or_insert_with(ring::Tx::new);
        if let Some((off, announce)) = ring.place(&chunk.data[at + HEADER_LEN..]) {
            let len = chunk.data.len() - at - HEADER_LEN;
            chunk.data.truncate(start);
            self.pending -= at - start + HEADER_LEN + len;
            self.push_shm_ref(off, len, announce);
        }
    }

    /// Queues the control frames for a payload placed in the ring.
    fn push_shm_ref(&mut self, off: u64, len: usize, announce: Option<OwnedFd>) {
        if let Some(fd) = announce {
            let mut data = std::mem::take(&mut self.spare);
            data.extend_from_slice(&region_frame());
            self.pending += data.len();
            self.chunks.push_back(Chunk {
                data,
                fds: vec![fd],
                appendable: true,
            });
        }
        let f = shm_ref_frame(off, len);
        self.agg().extend_from_slice(&f);
        self.pending += f.len();
    }

    /// Queues `fds` (at most [`MAX_FDS`](crate::fdpass::MAX_FDS); more are dropped) for the
    /// next payload frame queued: a control frame that carries them, sent with one
    /// `sendmsg` of its own (later frames may join it, earlier ones do not).
    pub(crate) fn push_fds(&mut self, mut fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        fds.truncate(crate::fdpass::MAX_FDS);
        let mut data = std::mem::take(&mut self.spare);
        data.extend_from_slice(&fds_frame(fds.len()));
        self.pending += data.len();
        self.chunks.push_back(Chunk {
            data,
            fds,
            appendable: true,
        });
    }

    /// Queues a pre-built frame.
    pub(crate) fn push_frame(&mut self, f: FrameBuf) {
        if !self.push_by_copy(&f) {
            self.announce_if_large(f.payload_len());
            self.push_wire(f.into_wire());
        }
    }

    /// Like [`push_frame`](Self::push_frame), leaving `f` to the caller: a frame that would
    /// be queued as is gets copied.
    pub(crate) fn push_frame_copy(&mut self, f: &FrameBuf) {
        if !self.push_by_copy(f) {
            self.announce_if_large(f.payload_len());
            self.push_wire(f.clone().into_wire());
        }
    }

    /// Queues `f` if its bytes are copied anyway (into the shared ring, or into the
    /// coalescing buffer for a small frame); false if it must be queued as a chunk.
    fn push_by_copy(&mut self, f: &FrameBuf) -> bool {
        let len = f.payload_len();
        if self.threshold.is_some_and(|t| len > t) {
            let ring = self.ring.get_or_insert_with(ring::Tx::new);
            if let Some((off, announce)) = ring.place(f.payload()) {
                self.push_shm_ref(off, len, announce);
                f.in_ring.store(true, Ordering::Relaxed);
                return true;
            }
        }
        if HEADER_LEN + len <= COPY_LIMIT {
            // Never announced: `announce_above` is at least `COPY_LIMIT`.
            self.pending += HEADER_LEN + len;
            let agg = self.agg();
            agg.extend_from_slice(&(len as u32).to_le_bytes());
            agg.extend_from_slice(f.payload());
            return true;
        }
        false
    }

    /// Queues a whole frame's wire bytes as a chunk of its own.
    fn push_wire(&mut self, data: Vec<u8>) {
        self.pending += data.len();
        self.chunks.push_back(Chunk {
            data,
            fds: Vec::new(),
            appendable: false,
        });
    }

    /// Drops the front chunk, keeping its buffer for reuse when it is a plain one.
    fn pop_front(&mut self) {
        if let Some(c) = self.chunks.pop_front()
            && c.appendable
            && self.spare.capacity() == 0
            && c.data.capacity() <= KEEP_LIMIT
        {
            let mut data = c.data;
            data.clear();
            self.spare = data;
        }
        self.front_off = 0;
    }

    /// Drops everything queued if none of it has been written yet and it is exactly one
    /// plain frame of payload `payload` (no descriptors, not in the shared ring); `false`
    /// (and nothing dropped) otherwise.
    pub(crate) fn discard_unwritten(&mut self, payload: &[u8]) -> bool {
        let len = payload.len();
        if self.pending != HEADER_LEN + len
            || self.front_off != 0
            || u32::try_from(len).is_err()
            || self
                .chunks
                .iter()
                .any(|c| !c.fds.is_empty() || !c.appendable)
        {
            return false;
        }
        // Compared piece by piece (one chunk, mostly: one memcmp each).
        let header = (len as u32).to_le_bytes();
        let mut want: [&[u8]; 2] = [&header, payload];
        for c in &self.chunks {
            let mut have = &c.data[..];
            while !have.is_empty() {
                let Some(w) = want.iter_mut().find(|w| !w.is_empty()) else {
                    return false;
                };
                let n = have.len().min(w.len());
                if have[..n] != w[..n] {
                    return false;
                }
                have = &have[n..];
                *w = &w[n..];
            }
        }
        if want.iter().any(|w| !w.is_empty()) {
            return false;
        }
        while !self.chunks.is_empty() {
            self.pop_front();
        }
        self.pending = 0;
        true
    }

    /// One `writev`/`sendmsg` of what is queued. Returns bytes written (0 when empty).
    pub(crate) fn write_some(&mut self, fd: BorrowedFd<'_>) -> std::result::Result<usize, Errno> {
        while let Some(c) = self.chunks.front() {
            if c.data.len() == self.front_off && c.fds.is_empty() {
                self.pop_front();
            } else {
                break;
            }
        }
        if self.chunks.is_empty() {
            return Ok(0);
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if n == MAX_IOV || (i > 0 && !c.fds.is_empty()) {
                break;
            }
            let s = if i == 0 {
                &c.data[self.front_off..]
            } else {
                &c.data[..]
            };
            if !s.is_empty() {
                iov[n] = IoSlice::new(s);
                n += 1;
            }
        }
        let fds: Vec<BorrowedFd<'_>> = self.chunks[0].fds.iter().map(AsFd::as_fd).collect();
        let written = os::write_once(fd, &iov[..n], self.socket, &fds)?;
        if written > 0 {
            self.chunks[0].fds.clear();
        }
        self.pending -= written;
        self.written += written as u64;
        let mut left = written;
        while left > 0 {
            let rem = self.chunks[0].data.len() - self.front_off;
            if left >= rem {
                left -= rem;
                self.pop_front();
            } else {
                self.front_off += left;
                left = 0;
            }
        }
        Ok(written)
    }
}

// ---------------------------------------------------------------------------------------
// Read half
// ---------------------------------------------------------------------------------------

/// What [`ReadHalf::next`] found.
pub(crate) enum Next {
    /// No complete frame buffered yet.
    Pending,
    /// A payload at `start..start + len` of [`ReadHalf::buf`] (valid until the next read).
    Inline(usize, usize),
    /// A payload in its own allocation (a large frame, or one copied out of shm).
    Owned(Vec<u8>),
}

/// The incoming side: a large read buffer parsed in place, large frames read straight
/// into an exact-size `Vec`, and the peer's shared ring in shm mode.
pub(crate) struct ReadHalf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A large frame being read: its buffer and how much of it is filled.
    big: Option<(Vec<u8>, usize)>,
    /// End of stream was seen.
    pub(crate) eof: bool,
    /// The last read returned fewer bytes than it had room for: the fd held no more at
    /// that moment.
    pub(crate) short: bool,
    max: usize,
    /// Passed fds waiting for their control frame; `Some` iff shm mode is on or passed
    /// descriptors are accepted.
    fds: Option<VecDeque<OwnedFd>>,
    shm: bool,
    /// Descriptors are accepted (see [`Config::accept_fds`]).
    accept_fds: bool,
    /// The descriptors a "descriptors" frame brought, until the payload frame after it.
    attach: Option<Vec<OwnedFd>>,
    /// The descriptors of the payload frame last returned by [`ReadHalf::next`].
    frame_fds: Vec<OwnedFd>,
    ring: ring::Rx,
    /// Spare buffers for large payloads, handed back by [`ReadHalf::recycle`] (at most
    /// [`SCRATCH_COUNT`], [`SCRATCH_KEEP`] bytes of capacity in all).
    scratch: Vec<Vec<u8>>,
    /// Plain frames above this size must be announced (see [`Config::announce_above`]).
    announce: Option<usize>,
    /// The length the last announcement gave, until its frame is taken.
    announced: Option<usize>,
    /// Bytes read from the descriptor since the start.
    pub(crate) total: u64,
}

impl ReadHalf {
    /// `socket`: whether the descriptor read from is a socket (`os::is_socket`).
    pub(crate) fn new(socket: bool, cfg: &Config) -> ReadHalf {
        let shm = cfg.shm_threshold.is_some() && socket;
        let accept_fds = cfg.accept_fds && socket;
        let start = if cfg.small_read_buffer {
            READ_BUF_SMALL
        } else {
            READ_BUF_START
        };
        ReadHalf {
            buf: vec![0; start].into_boxed_slice(),
            start: 0,
            end: 0,
            big: None,
            eof: false,
            short: false,
            max: cfg.max_frame_len,
            fds: (shm || accept_fds).then(VecDeque::new),
            shm,
            accept_fds,
            attach: None,
            frame_fds: Vec::new(),
            ring: ring::Rx::new(),
            scratch: Vec::new(),
            announce: cfg.announce_above,
            announced: None,
            total: 0,
        }
    }

    /// The read buffer, for slicing [`Next::Inline`] results.
    pub(crate) fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// Takes back a payload buffer that the caller no longer needs, to be reused for a
    /// later large payload (saves an allocation, its page faults and its zeroing).
    pub(crate) fn recycle(&mut self, v: Vec<u8>) {
        let kept: usize = self.scratch.iter().map(Vec::capacity).sum();
        if v.capacity() > 0
            && self.scratch.len() < SCRATCH_COUNT
            && kept + v.capacity() <= SCRATCH_KEEP
        {
            self.scratch.push(v);
        }
    }

    /// An empty buffer for a payload of `len` bytes: a recycled one that holds it, if
    /// any.
    fn take_scratch(&mut self, len: usize) -> Vec<u8> {
        // The one handed back last that holds it: the likeliest to be in a CPU cache.
        match self.scratch.iter().rposition(|v| v.capacity() >= len) {
            Some(i) => {
                let mut v = self.scratch.remove(i);
                v.clear();
                v
            }
            None => Vec::new(),
        }
    }

    /// Whether part of a frame is buffered (an announcement or descriptors count: their
    /// frame is due).
    pub(crate) fn has_partial(&self) -> bool {
        self.big.is_some()
            || self.start != self.end
            || self.announced.is_some()
            || self.attach.is_some()
    }

    /// Takes the descriptors passed with the payload frame last returned by
    /// [`next`](ReadHalf::next) (those not taken are closed with the next frame).
    pub(crate) fn take_frame_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.frame_fds)
    }

    /// A payload frame is being returned: the descriptors declared before it are its own.
    fn attach_fds(&mut self) {
        if self.accept_fds {
            self.frame_fds = self.attach.take().unwrap_or_default();
        }
    }

    /// The error for end of stream in the current state.
    pub(crate) fn eof_error(&self) -> Error {
        if self.has_partial() {
            Error::new(ErrorKind::Truncated)
        } else {
            Error::new(ErrorKind::Closed)
        }
    }

    /// Parses the next complete payload out of what is buffered.
    ///
    /// A frame that fails to decode (bad control frame) is consumed, so the caller may go
    /// on; an oversized header is not, so the error repeats.
    pub(crate) fn next(&mut self) -> Result<Next> {
        if let Some((v, filled)) = &self.big {
            if *filled < v.len() {
                return Ok(Next::Pending);
            }
            let (v, _) = self.big.take().expect("checked above");
            self.attach_fds();
            return Ok(Next::Owned(v));
        }
        loop {
            let avail = self.end - self.start;
            if avail < HEADER_LEN {
                return Ok(Next::Pending);
            }
            let mut h = [0; HEADER_LEN];
            h.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
            let h = u32::from_le_bytes(h);
            if h & CONTROL_FLAG != 0 {
                let blen = (h & !CONTROL_FLAG) as usize;
                if blen > CONTROL_MAX {
                    // Not consumed, like any oversized frame: the stream cannot resync.
                    return Err(Error::too_large(blen, CONTROL_MAX));
                }
                if blen == 0 {
                    self.start += HEADER_LEN;
                    return Err(Error::msg(ErrorKind::Decode, "empty control frame"));
                }
                if avail < HEADER_LEN + blen {
                    return Ok(Next::Pending);
                }
                let mut body = [0; CONTROL_MAX];
                let b0 = self.start + HEADER_LEN;
                body[..blen].copy_from_slice(&self.buf[b0..b0 + blen]);
                if body[0] == KIND_ANNOUNCE {
                    // Consumed even when malformed (the error says the stream is suspect),
                    // so that a reader that goes on makes progress to the end.
                    self.start += HEADER_LEN + blen;
                    let len = announced_len(&body[..blen])?;
                    if self.announced.replace(len).is_some() {
                        return Err(Error::msg(
                            ErrorKind::Decode,
                            "two frame announcements in a row (stray bytes on the channel?)",
                        ));
                    }
                    continue;
                }
                self.start += HEADER_LEN + blen;
                match self.control(&body[..blen])? {
                    Some(v) => {
                        self.attach_fds();
                        return Ok(Next::Owned(v));
                    }
                    None => continue,
                }
            }
            let len = h as usize;
            match self.announced {
                Some(a) if a != len => {
                    return Err(Error::mismatch(len, a));
                }
                None if self.announce.is_some_and(|a| len > a) => {
                    // Not consumed: the stream cannot resync.
                    return Err(Error::unannounced(
                        len,
                        self.announce.expect("checked just above"),
                    ));
                }
                _ => {}
            }
            if len > self.max {
                return Err(Error::too_large(len, self.max));
            }
            if avail - HEADER_LEN >= len {
                let s = self.start + HEADER_LEN;
                self.start = s + len;
                self.announced = None;
                self.attach_fds();
                return Ok(Next::Inline(s, len));
            }
            if HEADER_LEN + len <= READ_BUF_LEN && HEADER_LEN + len > self.buf.len() - self.start {
                // Fits a full-size read buffer but not this one: make room.
                self.grow(HEADER_LEN + len);
            }
            if HEADER_LEN + len > READ_BUF_LEN {
                // Too big for the read buffer: read the rest straight into its own Vec.
                // `len <= max` was checked above, so this allocation is bounded.
                let have = avail - HEADER_LEN;
                let mut v = self.take_scratch(len);
                if v.capacity() >= len {
                    v.resize(len, 0);
                } else {
                    // Zeroed pages come lazily from the allocator: nothing is committed
                    // before the peer actually sends the bytes.
                    v = vec![0u8; len];
                }
                v[..have].copy_from_slice(&self.buf[self.start + HEADER_LEN..self.end]);
                self.start = 0;
                self.end = 0;
                self.big = Some((v, have));
                self.announced = None;
            }
            return Ok(Next::Pending);
        }
    }

    /// Moves the buffered bytes to the front of a buffer of at least `need` bytes (a power
    /// of two, at most [`READ_BUF_LEN`]).
    fn grow(&mut self, need: usize) {
        let len = need
            .max(self.buf.len() * 2)
            .next_power_of_two()
            .min(READ_BUF_LEN);
        if len <= self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
        } else {
            let mut buf = vec![0; len].into_boxed_slice();
            buf[..self.end - self.start].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = buf;
        }
        self.end -= self.start;
        self.start = 0;
    }

    /// Handles a control frame body; returns a payload for a shm reference.
    fn control(&mut self, body: &[u8]) -> Result<Option<Vec<u8>>> {
        if body[0] == KIND_FDS {
            return self.passed_fds(body).map(|()| None);
        }
        let Some(fds) = self.fds.as_mut().filter(|_| self.shm) else {
            return Err(Error::msg(
                ErrorKind::Decode,
                "shared-memory frame received but shm mode is off",
            ));
        };
        match (body[0], body.len()) {
            (KIND_REGION, 4) => {
                let fd = fds.pop_front().ok_or_else(|| {
                    Error::msg(
                        ErrorKind::Decode,
                        "shared-memory region announced without a descriptor",
                    )
                })?;
                self.ring.adopt(fd)?;
                Ok(None)
            }
            (KIND_SHM_REF, 16) => {
                let off = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
                let len = le_u32(body, 12) as usize;
                if len > self.max {
                    return Err(Error::too_large(len, self.max));
                }
                let mut buf = self.take_scratch(len);
                if buf.capacity() < len {
                    // No spare of our own: one the process keeps (a payload's buffer that
                    // the caller kept, a result say, need not be faulted in afresh).
                    buf = crate::bufs::reuse_buffer(len);
                }
                self.ring.take(off, len, buf).map(Some)
            }
            _ => Err(Error::msg(ErrorKind::Decode, "unknown control frame")),
        }
    }

    /// Handles a "descriptors" control frame: the descriptors that came with it wait for
    /// the next payload frame.
    fn passed_fds(&mut self, body: &[u8]) -> Result<()> {
        let Some(q) = self.fds.as_mut().filter(|_| self.accept_fds) else {
            return Err(Error::msg(
                ErrorKind::Decode,
                "descriptors passed on a channel that does not accept them",
            ));
        };
        if body.len() != 8 || body[1..4] != [0, 0, 0] {
            return Err(Error::msg(ErrorKind::Decode, "malformed descriptors frame"));
        }
        let n = (le_u32(body, 4) as usize).min(crate::fdpass::MAX_FDS);
        // Fewer than announced when this process ran out of descriptors as they arrived
        // (the kernel installs a prefix): the frame gets what came.
        let got = n.min(q.len());
        // A second set before any payload frame replaces (closes) the first.
        self.attach = Some(q.drain(..got).collect());
        Ok(())
    }

    /// Most descriptors one read may bring.
    fn fd_room(&self) -> usize {
        if self.accept_fds {
            crate::fdpass::MAX_FDS
        } else {
            os::MAX_FDS_PER_READ
        }
    }

    /// One read from `fd` into the buffer (or the large frame in progress). Returns the
    /// byte count; 0 means end of stream and sets [`ReadHalf::eof`].
    pub(crate) fn read_some(&mut self, fd: BorrowedFd<'_>) -> std::result::Result<usize, Errno> {
        debug_assert!(
            self.big
                .as_ref()
                .is_none_or(|(v, filled)| *filled < v.len()),
            "next() takes a complete large frame before the next read"
        );
        let max_fds = self.fd_room();
        let n = if let Some((v, filled)) = &mut self.big {
            let room = v.len() - *filled;
            let n = os::read_once(fd, &mut v[*filled..], self.fds.as_mut(), max_fds)?;
            *filled += n;
            self.short = n < room;
            n
        } else {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.start > 0 && self.buf.len() - self.end < 16 * 1024 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // Full of one partial frame: next() sizes the buffer to fit it, so this only
                // compacts; never read into an empty slice (that would look like EOF).
                self.grow(self.buf.len() + 1);
            }
            let room = self.buf.len() - self.end;
            debug_assert!(room > 0, "a frame that fits the read buffer leaves room");
            let n = os::read_once(fd, &mut self.buf[self.end..], self.fds.as_mut(), max_fds)?;
            self.end += n;
            self.short = n < room;
            if n == room && self.buf.len() < READ_BUF_LEN {
                // A burst: read in larger chunks from now on.
                self.grow(self.buf.len() * 2);
            }
            n
        };
        let keep = if self.accept_fds {
            MAX_PENDING_FDS_ACCEPTING
        } else {
            MAX_PENDING_FDS
        };
        if let Some(q) = self.fds.as_mut() {
            while q.len() > keep {
                q.pop_front();
            }
        }
        if n == 0 {
            self.eof = true;
        }
        self.total += n as u64;
        Ok(n)
    }
}

/// The length an announcement body gives, after checking it.
fn announced_len(body: &[u8]) -> Result<usize> {
    if body.len() != 12
        || body[1..4] != [0, 0, 0]
        || le_u32(body, 8) != le_u32(body, 4) ^ ANNOUNCE_CHECK
    {
        return Err(Error::msg(
            ErrorKind::Decode,
            "malformed frame announcement (stray bytes on the channel?)",
        ));
    }
    Ok(le_u32(body, 4) as usize)
}

/// The little-endian `u32` at `b[at..at + 4]` (a control frame's word).
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("a slice of 4 bytes"))
}

/// A payload handed to a decoding closure: borrowed from the read buffer or owned.
pub(crate) enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Payload<'_> {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Borrowed(b) => b.to_vec(),
            Payload::Owned(v) => v,
        }
    }
}

/// Decodes a postcard payload.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(Error::decode)
}
