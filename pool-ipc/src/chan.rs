//! Blocking typed channels: [`Sender`], [`Receiver`], and [`Duplex`] (both over one socket).

use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::frame::{self, FrameBuf, Next, Payload, ReadHalf, WriteHalf};
use crate::os;

/// `feed` flushes by itself once this many bytes are queued.
const FLUSH_AT: usize = 256 * 1024;

/// Blocking, buffered sender of `T` messages over a stream fd (a pipe's write end or a
/// socket).
///
/// Each message is one frame: a 4-byte little-endian length, then the postcard encoding.
/// [`send`](Sender::send) writes at once; [`feed`](Sender::feed) only queues, and a later
/// [`flush`](Sender::flush) writes everything queued with as few `writev` calls as
/// possible, which is how to send many small messages fast. On a socket writes use
/// `MSG_NOSIGNAL`; on a pipe whose reader is gone a write raises `SIGPIPE` unless it is
/// ignored (Rust programs ignore it by default).
///
/// If the fd is nonblocking, the sender waits for writability with `poll`.
///
/// # Examples
///
/// ```
/// let (r, w) = pool_ipc::pipe()?;
/// let mut tx = pool_ipc::Sender::<String>::new(w);
/// let mut rx = pool_ipc::Receiver::<String>::new(r);
/// for word in ["a", "b", "c"] {
///     tx.feed(&word.to_string())?;
/// }
/// tx.flush()?;
/// assert_eq!(rx.recv()?, "a");
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct Sender<T: ?Sized> {
    fd: Arc<OwnedFd>,
    w: WriteHalf,
    /// Called after each write that put bytes on the fd (see [`Sender::on_write`]).
    on_write: Option<Box<dyn FnMut() + Send>>,
    _t: PhantomData<fn(&T)>,
}

impl<T: ?Sized> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("fd", &self.fd)
            .field("pending", &self.w.pending())
            .field("on_write", &self.on_write.is_some())
            .finish()
    }
}

impl<T: ?Sized> Sender<T> {
    /// A sender with the default [`Config`].
    pub fn new(fd: OwnedFd) -> Self {
        Sender::with_config(fd, Config::new())
    }

    /// A sender with the given configuration (see [`Config::shm_threshold`] for shm mode).
    pub fn with_config(fd: OwnedFd, c: Config) -> Self {
        let socket = os::is_socket(fd.as_fd());
        Sender::from_shared(Arc::new(fd), &c, socket)
    }

    /// `socket`: whether `fd` is a socket (the caller has looked).
    pub(crate) fn from_shared(fd: Arc<OwnedFd>, c: &Config, socket: bool) -> Self {
        let w = WriteHalf::new(socket, c);
        Sender {
            fd,
            w,
            on_write: None,
            _t: PhantomData,
        }
    }

    /// Calls `f` after every write that puts bytes on the fd, from then on: for a peer
    /// that waits for this side's messages on something other than the fd (a
    /// [`Bell`](crate::shm::Bell) in memory both share, say), which `f` tells that bytes
    /// are there. Replaces the function set before.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    ///
    /// let (r, w) = pool_ipc::pipe()?;
    /// let mut tx = pool_ipc::Sender::<u8>::new(w);
    /// let writes = Arc::new(AtomicU32::new(0));
    /// let counter = Arc::clone(&writes);
    /// tx.on_write(Box::new(move || {
    ///     counter.fetch_add(1, Ordering::Relaxed);
    /// }));
    /// tx.feed(&1)?;
    /// tx.feed(&2)?;
    /// assert_eq!(writes.load(Ordering::Relaxed), 0);
    /// tx.flush()?;
    /// assert_eq!(writes.load(Ordering::Relaxed), 1);
    /// # drop(r);
    /// # Ok::<(), pool_ipc::Error>(())
    /// ```
    pub fn on_write(&mut self, f: Box<dyn FnMut() + Send>) {
        self.on_write = Some(f);
    }

    /// Sends a pre-built frame (its payload should be the encoding of a `T`, or whatever
    /// the receiver expects) and flushes.
    ///
    /// The frame's buffer is queued as is (large frames are not copied; in shm mode a
    /// large payload is copied once into the shared ring).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) if the payload exceeds
    /// `max_frame_len`; otherwise as for [`flush`](Sender::flush).
    pub fn send_frame(&mut self, f: FrameBuf) -> Result<()> {
        self.feed_frame(f)?;
        self.flush()
    }

    /// Queues a pre-built frame without flushing (flushes by itself when much is queued).
    ///
    /// # Errors
    ///
    /// As for [`send_frame`](Sender::send_frame).
    pub fn feed_frame(&mut self, f: FrameBuf) -> Result<()> {
        if f.payload_len() > self.w.max {
            return Err(Error::too_large(f.payload_len(), self.w.max));
        }
        self.w.push_frame(f);
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.w.pending() >= FLUSH_AT {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Writes everything queued, blocking until the fd has taken it all.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed) if the peer is gone (`EPIPE`,
    /// `ECONNRESET`), [`ErrorKind::Io`](crate::ErrorKind::Io) for other write errors. What
    /// was not written stays queued.
    pub fn flush(&mut self) -> Result<()> {
        while !self.w.is_empty() {
            match self.w.write_some(self.fd.as_fd()) {
                Ok(n) => {
                    if n > 0
                        && let Some(f) = &mut self.on_write
                    {
                        f();
                    }
                }
                Err(Errno::AGAIN) => {
                    os::poll_one(self.fd.as_fd(), true, None)?;
                }
                Err(e) => return Err(Error::from_write(e.into())),
            }
        }
        Ok(())
    }

    /// Since when the shared ring this side writes large payloads into holds memory:
    /// `Some(time of the last payload placed)` until
    /// [`release_idle_ring`](Sender::release_idle_ring) gives it back, `None` otherwise (no
    /// ring, or nothing placed since). For a caller that releases rings idle for a while.
    pub fn ring_dirty_since(&self) -> Option<std::time::Instant> {
        self.w.ring_dirty_since()
    }

    /// Gives the memory of this side's shared ring back to the system if the peer has
    /// taken every payload placed in it; true if it did (if the peer has not, the ring
    /// counts as used just now: see `ring_dirty_since`). The ring stays set up: later
    /// large payloads go through it as before (their first pages are faulted in afresh).
    /// A ring holds up to 256 MiB after large payloads: a long-lived connection that went
    /// quiet calls this to hand that memory back.
    pub fn release_idle_ring(&mut self) -> bool {
        self.w.release_drained_ring()
    }

    /// Flushes, then gives back the fd.
    ///
    /// Anything that cannot be flushed (the peer is gone) is dropped; call
    /// [`flush`](Sender::flush) first to see such errors.
    pub fn into_fd(mut self) -> OwnedFd {
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "Sender::into_fd dropped unsent data");
        }
        Arc::into_inner(self.fd).expect("a Sender's fd is only shared inside a Duplex")
    }

    /// Encodes `msg`, a value of another type with `T`'s wire format (a borrowed form of
    /// `T`, say), as one frame and writes it.
    ///
    /// # Errors
    ///
    /// As for [`send`](Sender::send).
    pub fn send_frame_of<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<()> {
        self.w.encode(msg)?;
        self.flush()
    }

    /// Like [`send_frame_of`](Sender::send_frame_of), without flushing (flushes by itself
    /// when much is queued): for a message that goes out with the next one.
    ///
    /// # Errors
    ///
    /// As for [`feed`](Sender::feed).
    pub fn feed_frame_of<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<()> {
        self.w.encode(msg)?;
        self.maybe_flush()
    }

    /// Sends one frame whose payload is `pieces` one after the other, and flushes: a
    /// message put together from parts held in different places (an encoded header and a
    /// large byte string, say) without first copying them into one buffer. In shm mode a
    /// large payload is copied piece by piece straight into the shared ring.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) if the payload exceeds
    /// `max_frame_len` (nothing is queued); otherwise as for [`flush`](Sender::flush).
    ///
    /// # Examples
    ///
    /// ```
    /// let (mut tx, mut rx) = pool_ipc::duplex::<(u8, String), (u8, String)>()?;
    /// // postcard of (7, "hi"): 7, the length 2, then the bytes.
    /// tx.sender().send_pieces(&[&[7, 2], b"hi"])?;
    /// assert_eq!(rx.recv()?, (7, "hi".to_string()));
    /// # Ok::<(), pool_ipc::Error>(())
    /// ```
    pub fn send_pieces(&mut self, pieces: &[&[u8]]) -> Result<()> {
        self.w.push_pieces(pieces)?;
        self.flush()
    }

    /// [`send_pieces`](Sender::send_pieces), passing `fds` with the frame (`SCM_RIGHTS`, at
    /// most [`MAX_FDS`](crate::fdpass::MAX_FDS): the rest are dropped). The peer must accept
    /// them ([`Config::accept_fds`](crate::Config::accept_fds)); it gets them with the frame
    /// from [`Receiver::recv_with_fds`] or
    /// [`FramedConn::next_frame_with_fds`](crate::FramedConn::next_frame_with_fds). The
    /// descriptors are closed here once sent.
    ///
    /// # Errors
    ///
    /// As for [`send_pieces`](Sender::send_pieces); nothing is queued (and the descriptors
    /// are closed) when the frame is too large.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::fd::AsFd;
    ///
    /// let cfg = pool_ipc::Config::new().accept_fds(true);
    /// let (mut tx, mut rx) = pool_ipc::duplex_with_config::<u8, u8>(cfg)?;
    /// let (r, _w) = pool_ipc::pipe()?;
    /// tx.sender().send_pieces_with_fds(&[&[7]], vec![r])?;
    /// let (v, fds) = rx.recv_with_fds(|b, fds| (b.to_vec(), fds))?;
    /// assert_eq!((v, fds.len()), (vec![7], 1));
    /// # Ok::<(), pool_ipc::Error>(())
    /// ```
    pub fn send_pieces_with_fds(&mut self, pieces: &[&[u8]], fds: Vec<OwnedFd>) -> Result<()> {
        self.w.push_pieces_with_fds(pieces, fds)?;
        self.flush()
    }

    /// Queues one frame whose payload is `pieces` one after the other, as
    /// [`send_pieces`](Sender::send_pieces) does, but writes nothing: the frame leaves with
    /// the next [`flush`](Sender::flush) or send. A peer that answers several requests in a
    /// row queues its answers this way and writes them together.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) if the payload exceeds
    /// `max_frame_len` (nothing is queued).
    ///
    /// # Examples
    ///
    /// ```
    /// let (mut tx, mut rx) = pool_ipc::duplex::<u8, u8>()?;
    /// tx.sender().queue_pieces(&[&[7]])?;
    /// tx.sender().queue_pieces(&[&[9]])?;
    /// tx.sender().flush()?;
    /// assert_eq!((rx.recv()?, rx.recv()?), (7, 9));
    /// # Ok::<(), pool_ipc::Error>(())
    /// ```
    pub fn queue_pieces(&mut self, pieces: &[&[u8]]) -> Result<()> {
        self.w.push_pieces(pieces)
    }
}

impl<T: Serialize + ?Sized> Sender<T> {
    /// Encodes `msg` as one frame and writes it (with anything queued before).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`](crate::ErrorKind::Encode) if postcard cannot encode it,
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) if the encoding
    /// exceeds `max_frame_len` (nothing is queued in both cases); otherwise as for
    /// [`flush`](Sender::flush).
    pub fn send(&mut self, msg: &T) -> Result<()> {
        self.w.encode(msg)?;
        self.flush()
    }

    /// Encodes `msg` as one frame and queues it; writes only once about 256 KiB are
    /// queued. Call [`flush`](Sender::flush) to write the rest.
    ///
    /// # Errors
    ///
    /// As for [`send`](Sender::send).
    pub fn feed(&mut self, msg: &T) -> Result<()> {
        self.w.encode(msg)?;
        self.maybe_flush()
    }
}

impl<T: ?Sized> AsFd for Sender<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// How long a receive may wait.
#[derive(Clone, Copy)]
enum Wait {
    Forever,
    Never,
    /// Only what is already buffered: no system call at all.
    Buffered,
    Until(Instant),
}

/// Blocking, buffered receiver of `T` messages from a stream fd (a pipe's read end or a
/// socket).
///
/// It reads in 128 KiB chunks and parses every frame out of a chunk before reading again;
/// a frame larger than that is read straight into a buffer of its exact size once its
/// header is known (after checking it against `max_frame_len`). When decoding a large
/// message, that buffer is kept and reused for the next large payload.
///
/// End of stream is [`ErrorKind::Closed`](crate::ErrorKind::Closed) at a frame boundary
/// and [`ErrorKind::Truncated`](crate::ErrorKind::Truncated) inside a frame. A peer that
/// died with unread data in its socket (`ECONNRESET`) counts as end of stream. A frame
/// that does not decode as `T` is consumed ([`ErrorKind::Decode`](crate::ErrorKind::Decode))
/// and the next receive goes on with the next frame; an oversized frame header
/// ([`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge)) is not consumed, so the
/// channel is unusable afterwards.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let (r, w) = pool_ipc::pipe()?;
/// let mut tx = pool_ipc::Sender::<u64>::new(w);
/// let mut rx = pool_ipc::Receiver::<u64>::new(r);
/// assert_eq!(rx.try_recv()?, None);
/// tx.send(&42)?;
/// assert_eq!(rx.recv_timeout(Duration::from_secs(5))?, Some(42));
/// drop(tx);
/// assert_eq!(rx.recv().unwrap_err().kind(), pool_ipc::ErrorKind::Closed);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct Receiver<T> {
    fd: Arc<OwnedFd>,
    r: ReadHalf,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("fd", &self.fd)
            .field("eof", &self.r.eof)
            .finish()
    }
}

impl<T> Receiver<T> {
    /// A receiver with the default [`Config`].
    pub fn new(fd: OwnedFd) -> Self {
        Receiver::with_config(fd, Config::new())
    }

    /// A receiver with the given configuration.
    pub fn with_config(fd: OwnedFd, c: Config) -> Self {
        let socket = os::is_socket(fd.as_fd());
        Receiver::from_shared(Arc::new(fd), &c, socket)
    }

    /// `socket`: whether `fd` is a socket (the caller has looked).
    pub(crate) fn from_shared(fd: Arc<OwnedFd>, c: &Config, socket: bool) -> Self {
        let r = ReadHalf::new(socket, c);
        Receiver {
            fd,
            r,
            _t: PhantomData,
        }
    }

    /// Receives the next frame's raw payload, undecoded. Blocks until one is complete.
    ///
    /// # Errors
    ///
    /// As for [`recv`](Receiver::recv), minus decoding.
    pub fn recv_frame(&mut self) -> Result<Vec<u8>> {
        self.next_with(Wait::Forever, true, |p, _| Ok(p.into_vec()))
            .map(|v| v.expect("a blocking receive returns a frame or an error"))
    }

    /// Like [`recv_frame`](Receiver::recv_frame) but never blocks: `Ok(None)` when no
    /// complete frame is available now.
    ///
    /// # Errors
    ///
    /// As for [`recv`](Receiver::recv), minus decoding.
    pub fn try_recv_frame(&mut self) -> Result<Option<Vec<u8>>> {
        self.next_with(Wait::Never, true, |p, _| Ok(p.into_vec()))
    }

    /// Whether part of a frame has been read but not yet returned.
    pub fn has_partial_frame(&self) -> bool {
        self.r.has_partial()
    }

    /// Bytes read from the descriptor since the start (buffered ones included): equal to
    /// what the peer wrote, once it has all been read.
    pub fn bytes_read(&self) -> u64 {
        self.r.total
    }

    /// Gives back the fd. Data already read into the buffer is lost.
    pub fn into_fd(self) -> OwnedFd {
        Arc::into_inner(self.fd).expect("a Receiver's fd is only shared inside a Duplex")
    }

    /// Waits for the next payload and hands it to `f`, with the descriptors passed with it
    /// (closed unless `f` keeps them). With `owned` false, a payload in its own buffer is
    /// lent to `f` and the buffer is kept for reuse.
    fn next_with<U>(
        &mut self,
        wait: Wait,
        owned: bool,
        f: impl FnOnce(Payload<'_>, Vec<OwnedFd>) -> Result<U>,
    ) -> Result<Option<U>> {
        loop {
            match self.r.next()? {
                Next::Inline(s, l) => {
                    let fds = self.r.take_frame_fds();
                    return f(Payload::Borrowed(&self.r.buf()[s..s + l]), fds).map(Some);
                }
                Next::Owned(v) if owned => {
                    return f(Payload::Owned(v), self.r.take_frame_fds()).map(Some);
                }
                Next::Owned(v) => {
                    let r = f(Payload::Borrowed(&v), self.r.take_frame_fds());
                    self.r.recycle(v);
                    return r.map(Some);
                }
                Next::Pending => {}
            }
            if let Wait::Buffered = wait {
                return Ok(None);
            }
            if self.r.eof {
                return Err(self.r.eof_error());
            }
            let fd = self.fd.as_fd();
            match wait {
                Wait::Forever | Wait::Buffered => {}
                Wait::Never => {
                    if !os::poll_one(fd, false, Some(Duration::ZERO))? {
                        return Ok(None);
                    }
                }
                Wait::Until(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if !os::poll_one(fd, false, Some(left))? {
                        return Ok(None);
                    }
                }
            }
            match self.r.read_some(fd) {
                Ok(_) => {}
                Err(Errno::AGAIN) => {
                    if let Wait::Forever = wait {
                        os::poll_one(fd, false, None)?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<T: DeserializeOwned> Receiver<T> {
    /// Receives and decodes the next message, blocking until one is complete.
    ///
    /// # Errors
    ///
    /// * [`ErrorKind::Closed`](crate::ErrorKind::Closed): end of stream at a frame boundary;
    /// * [`ErrorKind::Truncated`](crate::ErrorKind::Truncated): end of stream inside a frame;
    /// * [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge): the header announces
    ///   more than `max_frame_len`;
    /// * [`ErrorKind::Decode`](crate::ErrorKind::Decode): the payload is not a valid `T`, or
    ///   a shm-mode frame is malformed;
    /// * [`ErrorKind::Io`](crate::ErrorKind::Io): a read failed.
    pub fn recv(&mut self) -> Result<T> {
        self.next_with(Wait::Forever, false, |p, _| frame::decode(p.as_slice()))
            .map(|v| v.expect("a blocking receive returns a message or an error"))
    }

    /// Receives a message if one is complete now; never blocks. A partly received frame
    /// stays buffered for the next call.
    ///
    /// # Errors
    ///
    /// As for [`recv`](Receiver::recv).
    pub fn try_recv(&mut self) -> Result<Option<T>> {
        self.next_with(Wait::Never, false, |p, _| frame::decode(p.as_slice()))
    }

    /// Receives the next frame, blocking until one is complete, and lends its payload to
    /// `f` without copying it (decode it borrowed, say). Nothing is decoded here.
    ///
    /// # Errors
    ///
    /// As for [`recv`](Receiver::recv), but no `Decode` error: that is `f`'s business.
    pub fn recv_with<U>(&mut self, f: impl FnOnce(&[u8]) -> U) -> Result<U> {
        self.next_with(Wait::Forever, false, |p, _| Ok(f(p.as_slice())))
            .map(|u| u.expect("a blocking receive yields a frame"))
    }

    /// Like [`recv_with`](Receiver::recv_with), also handing `f` the descriptors passed
    /// with the frame (see [`Config::accept_fds`]; none without it). Those `f` drops are
    /// closed.
    ///
    /// # Errors
    ///
    /// As for [`recv_with`](Receiver::recv_with).
    pub fn recv_with_fds<U>(&mut self, f: impl FnOnce(&[u8], Vec<OwnedFd>) -> U) -> Result<U> {
        self.next_with(Wait::Forever, false, |p, fds| Ok(f(p.as_slice(), fds)))
            .map(|u| u.expect("a blocking receive yields a frame"))
    }

    /// Waits at most `d` for something to receive, consuming nothing: true at once if bytes
    /// are buffered (a frame or part of one) or the end of the stream was seen, else once
    /// the channel is readable; false if `d` passed first. A peer that has chores for its
    /// idle moments waits with it before a blocking receive.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if `poll` fails.
    pub fn wait_timeout(&self, d: Duration) -> Result<bool> {
        if self.r.has_partial() || self.r.eof {
            return Ok(true);
        }
        Ok(os::poll_one(self.fd.as_fd(), false, Some(d))?)
    }

    /// Like [`try_recv_buffered`](Receiver::try_recv_buffered), lending the payload to `f`
    /// as [`recv_with`](Receiver::recv_with) does.
    ///
    /// # Errors
    ///
    /// As for [`recv_with`](Receiver::recv_with).
    pub fn try_recv_buffered_with<U>(&mut self, f: impl FnOnce(&[u8]) -> U) -> Result<Option<U>> {
        self.next_with(Wait::Buffered, false, |p, _| Ok(f(p.as_slice())))
    }

    /// Returns a message only if one is already complete in the read buffer, without any
    /// system call: `Ok(None)` otherwise. A peer answering a stream of requests uses it to
    /// decide whether to flush its replies now (nothing more to do) or later (more work is
    /// already here).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) or
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) for a buffered frame, as
    /// for [`recv`](Receiver::recv). End of stream is left for the next `recv` to report.
    pub fn try_recv_buffered(&mut self) -> Result<Option<T>> {
        self.next_with(Wait::Buffered, false, |p, _| frame::decode(p.as_slice()))
    }

    /// Receives a message, waiting at most `d`; `Ok(None)` on timeout.
    ///
    /// # Errors
    ///
    /// As for [`recv`](Receiver::recv).
    pub fn recv_timeout(&mut self, d: Duration) -> Result<Option<T>> {
        let deadline = Instant::now().checked_add(d);
        let wait = deadline.map_or(Wait::Forever, Wait::Until);
        self.next_with(wait, false, |p, _| frame::decode(p.as_slice()))
    }
}

impl<T> AsFd for Receiver<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A blocking two-way channel over one socket: sends `S`, receives `R`.
///
/// The two halves share the socket (one fd); the peer is typically a `Duplex<R, S>` or a
/// [`FramedConn`](crate::FramedConn) — the wire format is the same.
///
/// # Examples
///
/// ```
/// let (mut a, mut b) = pool_ipc::duplex::<String, usize>()?;
/// a.send(&"hello".to_string())?;
/// let s = b.recv()?;
/// b.send(&s.len())?;
/// assert_eq!(a.recv()?, 5);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
pub struct Duplex<S: ?Sized, R> {
    tx: Sender<S>,
    rx: Receiver<R>,
}

impl<S: ?Sized, R> std::fmt::Debug for Duplex<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duplex")
            .field("tx", &self.tx)
            .field("rx", &self.rx)
            .finish()
    }
}

impl<S: ?Sized, R> Duplex<S, R> {
    /// A duplex over a connected stream socket, with the default [`Config`].
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) (`InvalidInput`) if `fd` is not a socket.
    pub fn new(fd: OwnedFd) -> Result<Self> {
        Duplex::with_config(fd, Config::new())
    }

    /// A duplex with the given configuration (both directions use it).
    ///
    /// # Errors
    ///
    /// As for [`Duplex::new`].
    pub fn with_config(fd: OwnedFd, c: Config) -> Result<Self> {
        if !os::is_socket(fd.as_fd()) {
            return Err(Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a Duplex needs a socket",
            )));
        }
        let fd = Arc::new(fd);
        Ok(Duplex {
            tx: Sender::from_shared(fd.clone(), &c, true),
            rx: Receiver::from_shared(fd, &c, true),
        })
    }

    /// The sending half.
    pub fn sender(&mut self) -> &mut Sender<S> {
        &mut self.tx
    }

    /// The receiving half.
    pub fn receiver(&mut self) -> &mut Receiver<R> {
        &mut self.rx
    }

    /// Both halves at once: a message borrowed from the receive buffer (see
    /// [`Receiver::recv_with`]) can be answered while it is still in use.
    pub fn halves(&mut self) -> (&mut Sender<S>, &mut Receiver<R>) {
        (&mut self.tx, &mut self.rx)
    }

    /// See [`Sender::flush`].
    ///
    /// # Errors
    ///
    /// As for [`Sender::flush`].
    pub fn flush(&mut self) -> Result<()> {
        self.tx.flush()
    }

    /// See [`Sender::send_frame`].
    ///
    /// # Errors
    ///
    /// As for [`Sender::send_frame`].
    pub fn send_frame(&mut self, f: FrameBuf) -> Result<()> {
        self.tx.send_frame(f)
    }

    /// See [`Receiver::recv_frame`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::recv_frame`].
    pub fn recv_frame(&mut self) -> Result<Vec<u8>> {
        self.rx.recv_frame()
    }

    /// Flushes, then gives back the socket (buffered received data is lost).
    pub fn into_fd(self) -> OwnedFd {
        let Duplex { tx, rx } = self;
        drop(rx);
        tx.into_fd()
    }
}

impl<S: Serialize + ?Sized, R> Duplex<S, R> {
    /// See [`Sender::send`].
    ///
    /// # Errors
    ///
    /// As for [`Sender::send`].
    pub fn send(&mut self, msg: &S) -> Result<()> {
        self.tx.send(msg)
    }

    /// See [`Sender::feed`].
    ///
    /// # Errors
    ///
    /// As for [`Sender::feed`].
    pub fn feed(&mut self, msg: &S) -> Result<()> {
        self.tx.feed(msg)
    }
}

impl<S: ?Sized, R: DeserializeOwned> Duplex<S, R> {
    /// See [`Receiver::recv`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::recv`].
    pub fn recv(&mut self) -> Result<R> {
        self.rx.recv()
    }

    /// See [`Receiver::try_recv`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::try_recv`].
    pub fn try_recv(&mut self) -> Result<Option<R>> {
        self.rx.try_recv()
    }

    /// See [`Receiver::try_recv_buffered`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::try_recv_buffered`].
    pub fn try_recv_buffered(&mut self) -> Result<Option<R>> {
        self.rx.try_recv_buffered()
    }

    /// See [`Receiver::recv_with`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::recv_with`].
    pub fn recv_with<U>(&mut self, f: impl FnOnce(&[u8]) -> U) -> Result<U> {
        self.rx.recv_with(f)
    }

    /// See [`Receiver::recv_with_fds`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::recv_with_fds`].
    pub fn recv_with_fds<U>(&mut self, f: impl FnOnce(&[u8], Vec<OwnedFd>) -> U) -> Result<U> {
        self.rx.recv_with_fds(f)
    }

    /// See [`Receiver::try_recv_buffered_with`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::try_recv_buffered_with`].
    pub fn try_recv_buffered_with<U>(&mut self, f: impl FnOnce(&[u8]) -> U) -> Result<Option<U>> {
        self.rx.try_recv_buffered_with(f)
    }

    /// See [`Receiver::recv_timeout`].
    ///
    /// # Errors
    ///
    /// As for [`Receiver::recv_timeout`].
    pub fn recv_timeout(&mut self, d: Duration) -> Result<Option<R>> {
        self.rx.recv_timeout(d)
    }
}

impl<S: ?Sized, R> AsFd for Duplex<S, R> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tx.as_fd()
    }
}

/// A connected pair of duplexes over a new [`socketpair`](crate::socketpair), default
/// [`Config`].
///
/// # Examples
///
/// See [`Duplex`].
///
/// # Errors
///
/// [`ErrorKind::Io`](crate::ErrorKind::Io) if the socketpair cannot be created.
pub fn duplex<A, B>() -> Result<(Duplex<A, B>, Duplex<B, A>)> {
    duplex_with_config(Config::new())
}

/// Like [`duplex`], with a configuration for both ends.
///
/// # Errors
///
/// As for [`duplex`].
pub fn duplex_with_config<A, B>(c: Config) -> Result<(Duplex<A, B>, Duplex<B, A>)> {
    let (x, y) = os::socketpair()?;
    Ok((
        Duplex::with_config(x, c.clone())?,
        Duplex::with_config(y, c)?,
    ))
}
