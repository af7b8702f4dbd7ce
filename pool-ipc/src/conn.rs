//! [`FramedConn`]: a nonblocking framed connection for event loops.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use rustix::io::Errno;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::frame::{FrameBuf, Next, ReadHalf, WriteHalf};
use crate::os;

/// [`FramedConn::fill`] returns after reading this much, so that one busy peer cannot
/// starve the others in an event loop.
const FILL_BUDGET: usize = 4 << 20;
/// Small-frame buffers kept by [`FramedConn::recycle`]...
const SPARE_SMALL: usize = 4;
/// ... each of at most this capacity (larger ones go to the read half's payload spares);
const SPARE_SMALL_MAX: usize = 128 * 1024;
/// and, besides them, buffers of at most this capacity (a peer that answers many small
/// messages in one write gets that many frames from one read: a pool's worker that ran a
/// few hundred brief tasks while its answers were read sends a few hundred)...
const SPARE_TINY_MAX: usize = 1024;
/// ... at most this many...
const SPARE_TINY: usize = 1024;
/// ... and this many bytes of capacity in all.
const SPARE_TINY_BYTES: usize = 64 << 10;

/// A nonblocking framed connection, for the side of a channel that runs an event loop.
///
/// It sets `O_NONBLOCK` on its fd and never blocks: [`queue`](FramedConn::queue) frames
/// (no syscall), [`flush`](FramedConn::flush) when the fd is writable (one `writev` per
/// call covers many frames), [`fill`](FramedConn::fill) when it is readable, then take
/// payloads with [`next_frame`](FramedConn::next_frame). The wire format, including shm
/// mode, is that of [`Sender`](crate::Sender)/[`Receiver`](crate::Receiver)/
/// [`Duplex`](crate::Duplex), so the peer can be a plain blocking `Duplex`.
///
/// Register the fd for readability always, and for writability while
/// [`wants_write`](FramedConn::wants_write) is true. Readiness is expected to be
/// level-triggered (`poll`, or `epoll` without `EPOLLET`): `fill` may stop before the
/// socket is drained (after 4 MiB).
///
/// # Examples
///
/// ```
/// use pool_ipc::{Config, Duplex, FramedConn};
///
/// let (a, b) = pool_ipc::socketpair()?;
/// let mut conn = FramedConn::new(a, Config::new())?;
/// let mut peer = Duplex::<u32, String>::new(b)?;
///
/// conn.queue_msg(&"job".to_string())?;
/// while !conn.flush()? {}
/// assert_eq!(peer.recv()?, "job");
///
/// peer.send(&3)?;
/// let payload = loop {
///     conn.fill()?;
///     if let Some(p) = conn.next_frame()? {
///         break p;
///     }
/// };
/// assert_eq!(postcard::from_bytes::<u32>(&payload).unwrap(), 3);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct FramedConn {
    fd: OwnedFd,
    r: ReadHalf,
    w: WriteHalf,
    /// Complete frames, each with the descriptors passed with it.
    ready: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
    /// Buffers of small frames handed back by [`recycle`](FramedConn::recycle), reused for
    /// the next small frames (at most [`SPARE_SMALL`]).
    spare: Vec<Vec<u8>>,
    /// The same for tiny frames (at most [`SPARE_TINY`], of [`SPARE_TINY_MAX`] bytes, and
    /// [`SPARE_TINY_BYTES`] in all).
    tiny: Vec<Vec<u8>>,
    /// The capacity of the buffers in `tiny`, in all.
    tiny_bytes: usize,
    /// A parse error found by `fill`, reported by `next_frame` after the frames before it.
    err: Option<Error>,
    /// While an incomplete frame is buffered: when bytes last arrived.
    partial_since: Option<Instant>,
}

impl std::fmt::Debug for FramedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedConn")
            .field("fd", &self.fd)
            .field("queued", &self.w.pending())
            .field("ready", &self.ready.len())
            .field("eof", &self.r.eof)
            .finish()
    }
}

impl FramedConn {
    /// Wraps a connected stream fd (normally a socket), setting `O_NONBLOCK` on it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the flag cannot be set.
    pub fn new(fd: OwnedFd, c: Config) -> Result<Self> {
        os::set_nonblocking(fd.as_fd())?;
        let socket = os::is_socket(fd.as_fd());
        let r = ReadHalf::new(socket, &c);
        let w = WriteHalf::new(socket, &c);
        Ok(FramedConn {
            fd,
            r,
            w,
            ready: VecDeque::new(),
            spare: Vec::new(),
            tiny: Vec::new(),
            tiny_bytes: 0,
            err: None,
            partial_since: None,
        })
    }

    /// Appends a frame to the outbox. No syscall; small frames are coalesced into one
    /// buffer, large ones are queued without copying (in shm mode, a large payload is
    /// copied once into the shared ring). The frame is not checked against this side's
    /// `max_frame_len`; the receiver enforces its own limit.
    pub fn queue(&mut self, f: FrameBuf) {
        self.w.push_frame(f);
    }

    /// Like [`queue`](FramedConn::queue), but the caller keeps the frame (to send it again
    /// elsewhere, say). Costs nothing extra for small frames (coalesced by copying anyway)
    /// and for payloads that go through the shared ring (copied into it anyway); a frame
    /// in between is copied once.
    pub fn queue_copy(&mut self, f: &FrameBuf) {
        self.w.push_frame_copy(f);
    }

    /// Like [`queue`](FramedConn::queue), passing `fds` with the frame (`SCM_RIGHTS`, at
    /// most [`MAX_FDS`](crate::fdpass::MAX_FDS): the rest are dropped). The peer must
    /// accept them ([`Config::accept_fds`]); it gets them with the frame from
    /// [`Receiver::recv_with_fds`](crate::Receiver::recv_with_fds). The descriptors are
    /// closed here once sent (pass duplicates to keep them).
    pub fn queue_with_fds(&mut self, f: FrameBuf, fds: Vec<OwnedFd>) {
        self.w.push_fds(fds);
        self.w.push_frame(f);
    }

    /// [`queue_copy`](FramedConn::queue_copy) with descriptors, as
    /// [`queue_with_fds`](FramedConn::queue_with_fds).
    pub fn queue_copy_with_fds(&mut self, f: &FrameBuf, fds: Vec<OwnedFd>) {
        self.w.push_fds(fds);
        self.w.push_frame_copy(f);
    }

    /// Appends one frame whose payload is `pieces` one after the other, copying them (into
    /// the shared ring for a large payload in shm mode, into the outbox otherwise): for a
    /// payload the caller keeps, to send it again elsewhere, say. No syscall.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) above `max_frame_len`;
    /// nothing is queued then.
    pub fn queue_pieces(&mut self, pieces: &[&[u8]]) -> Result<()> {
        self.w.push_pieces(pieces)
    }

    /// Encodes `m` as a frame at the end of the outbox. No syscall.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`](crate::ErrorKind::Encode) or
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) (over `max_frame_len`);
    /// nothing is queued then.
    pub fn queue_msg<T: Serialize + ?Sized>(&mut self, m: &T) -> Result<()> {
        self.w.encode(m)
    }

    /// Writes as much of the outbox as the socket takes now. `Ok(true)`: the outbox is
    /// empty.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed) if the peer is gone,
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) for other write errors.
    pub fn flush(&mut self) -> Result<bool> {
        while !self.w.is_empty() {
            match self.w.write_some(self.fd.as_fd()) {
                Ok(_) => {}
                Err(Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(Error::from_write(e.into())),
            }
        }
        Ok(true)
    }

    /// As [`Sender::ring_dirty_since`](crate::Sender::ring_dirty_since), for the ring this
    /// side writes large payloads into.
    pub fn ring_dirty_since(&self) -> Option<std::time::Instant> {
        self.w.ring_dirty_since()
    }

    /// As [`Sender::release_idle_ring`](crate::Sender::release_idle_ring): gives the memory
    /// of this side's shared ring back if the peer has taken every payload placed in it.
    pub fn release_idle_ring(&mut self) -> bool {
        self.w.release_drained_ring()
    }

    /// Whether the outbox holds unwritten bytes.
    pub fn wants_write(&self) -> bool {
        !self.w.is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.w.pending()
    }

    /// Bytes written to the fd since the start. With [`stream_end`](FramedConn::stream_end)
    /// taken right after queueing a frame, it tells whether that frame has left entirely
    /// (`bytes_written() >= end`): a frame that has not can never have reached the peer.
    pub fn bytes_written(&self) -> u64 {
        self.w.written()
    }

    /// Takes back the small frame of payload `payload` (queued with
    /// [`queue_copy_with_fds`](FramedConn::queue_copy_with_fds), no descriptors) if it is
    /// all that is queued and none of it has been written: `true` if it was taken back (it
    /// never reaches the peer), `false` if nothing changed. For a frame delivered another
    /// way (through shared memory, say) when the peer turns out to be free to take it.
    pub fn take_back_unwritten(&mut self, payload: &[u8]) -> bool {
        self.w.discard_unwritten(payload)
    }

    /// The stream position just after everything queued so far.
    pub fn stream_end(&self) -> u64 {
        self.w.written() + self.w.pending() as u64
    }

    /// Reads what is available now (up to about 4 MiB per call) and splits it into
    /// frames. `Ok(false)` once end of stream has been seen (then further calls read
    /// nothing); `Ok(true)` otherwise.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if a read fails. Framing errors are
    /// reported by [`next_frame`](FramedConn::next_frame), in order.
    pub fn fill(&mut self) -> Result<bool> {
        self.fill_until(false)
    }

    /// Like [`fill`](FramedConn::fill), but stops at the first read that returns less than
    /// it had room for, instead of reading again to see `EAGAIN`: the descriptor held no
    /// more at that moment. That saves a system call per wakeup, but a short read can also
    /// end where the kernel keeps passed descriptors apart from the bytes after them, so
    /// bytes may remain: only for a caller that learns readiness level-triggered (`poll`,
    /// or epoll without `EPOLLET`), which reports the descriptor again while bytes remain.
    ///
    /// # Errors
    ///
    /// As [`fill`](FramedConn::fill).
    pub fn fill_level(&mut self) -> Result<bool> {
        self.fill_until(true)
    }

    fn fill_until(&mut self, stop_short: bool) -> Result<bool> {
        let mut budget = FILL_BUDGET;
        let mut arrived = false;
        let r = loop {
            self.parse();
            if self.r.eof {
                break Ok(false);
            }
            if self.err.is_some() {
                break Ok(true);
            }
            match self.r.read_some(self.fd.as_fd()) {
                Ok(n) => {
                    arrived |= n > 0;
                    budget = budget.saturating_sub(n);
                    if budget == 0 || (stop_short && n > 0 && self.r.short) {
                        self.parse();
                        break Ok(true);
                    }
                }
                Err(Errno::AGAIN) => break Ok(true),
                Err(e) => break Err(e.into()),
            }
        };
        if !self.r.has_partial() {
            self.partial_since = None;
        } else if arrived || self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
        r
    }

    /// While part of a frame has arrived and the rest has not: when bytes last arrived
    /// (as of the last [`fill`](FramedConn::fill)). `None` when what was read ends at a
    /// frame boundary.
    ///
    /// A peer that writes frames whole never leaves one unfinished for long: an
    /// incomplete frame that gets no further for seconds means the peer stopped in the
    /// middle of a write, or wrote bytes that do not belong on the channel (a header
    /// that promises more than it sends). An event loop gives up on such a peer after a
    /// bound of its choosing, since no readiness event will come to tell it:
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use pool_ipc::{Config, FramedConn};
    ///
    /// let (a, b) = pool_ipc::socketpair()?;
    /// let mut conn = FramedConn::new(a, Config::new())?;
    /// rustix::io::write(&b, &[10, 0, 0, 0, 1, 2])?; // 2 of 10 bytes
    /// conn.fill()?;
    /// assert_eq!(conn.next_frame()?, None);
    /// let since = conn.partial_frame_since().expect("a frame is incomplete");
    /// assert!(since <= Instant::now());
    /// // In the event loop: wake up at `since + bound`, then give up on the peer if
    /// // `partial_frame_since()` is still that old.
    /// # let _ = Duration::from_secs(5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn partial_frame_since(&self) -> Option<Instant> {
        self.partial_since
    }

    /// Moves complete frames from the read buffer to the ready queue.
    fn parse(&mut self) {
        if self.err.is_some() {
            return;
        }
        loop {
            match self.r.next() {
                Ok(Next::Pending) => return,
                Ok(Next::Inline(s, l)) => {
                    let spare = match l <= SPARE_TINY_MAX {
                        true => match self.tiny.pop() {
                            Some(v) => {
                                self.tiny_bytes -= v.capacity();
                                Some(v)
                            }
                            None => self.spare.pop(),
                        },
                        false => self.spare.pop(),
                    };
                    let mut v = spare.unwrap_or_default();
                    v.clear();
                    v.extend_from_slice(&self.r.buf()[s..s + l]);
                    self.ready.push_back((v, self.r.take_frame_fds()));
                }
                Ok(Next::Owned(v)) => self.ready.push_back((v, self.r.take_frame_fds())),
                Err(e) => {
                    self.err = Some(e);
                    return;
                }
            }
        }
    }

    /// The next complete payload read by [`fill`](FramedConn::fill), if any.
    ///
    /// After end of stream: `Ok(None)` (and [`is_eof`](FramedConn::is_eof) is true) when
    /// the stream ended at a frame boundary.
    ///
    /// # Errors
    ///
    /// * [`ErrorKind::Truncated`](crate::ErrorKind::Truncated): the stream ended inside a
    ///   frame;
    /// * [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge): a header announced
    ///   more than `max_frame_len` (repeats: the connection is unusable);
    /// * [`ErrorKind::Decode`](crate::ErrorKind::Decode): a malformed shm-mode frame (it was
    ///   skipped; later frames can still be read).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(self.next_frame_with_fds()?.map(|(v, _)| v))
    }

    /// Like [`next_frame`](FramedConn::next_frame), with the descriptors passed with the
    /// frame (on a connection that accepts them: [`Config::accept_fds`]; none otherwise).
    ///
    /// # Errors
    ///
    /// As for [`next_frame`](FramedConn::next_frame).
    pub fn next_frame_with_fds(&mut self) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        if let Some(v) = self.ready.pop_front() {
            return Ok(Some(v));
        }
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        self.parse();
        if let Some(v) = self.ready.pop_front() {
            return Ok(Some(v));
        }
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        if self.r.eof && self.r.has_partial() {
            return Err(self.r.eof_error());
        }
        Ok(None)
    }

    /// Takes back a payload that [`next_frame`](FramedConn::next_frame) returned and the
    /// caller is done with, to hold a later frame: a reader that hands its payloads back
    /// saves an allocation per frame, and for large payloads the page faults and zeroing
    /// of fresh memory. Buffers beyond a few (a few MiB in all) are freed.
    pub fn recycle(&mut self, v: Vec<u8>) {
        if v.capacity() > SPARE_SMALL_MAX {
            self.r.recycle(v);
        } else if v.capacity() > SPARE_TINY_MAX {
            if self.spare.len() < SPARE_SMALL {
                self.spare.push(v);
            }
        } else if v.capacity() > 0
            && self.tiny.len() < SPARE_TINY
            && self.tiny_bytes + v.capacity() <= SPARE_TINY_BYTES
        {
            self.tiny_bytes += v.capacity();
            self.tiny.push(v);
        }
    }

    /// Whether part of a frame has been read and the rest has not arrived yet (before end
    /// of stream). An event loop can time how long it waits, to tell a peer that stopped
    /// mid-frame.
    pub fn has_partial_frame(&self) -> bool {
        !self.r.eof && self.r.has_partial()
    }

    /// Whether end of stream has been seen and every frame before it has been taken.
    pub fn is_eof(&self) -> bool {
        self.r.eof && self.ready.is_empty()
    }

    /// Gives back the fd (still nonblocking). Queued and buffered data is lost.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for FramedConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
