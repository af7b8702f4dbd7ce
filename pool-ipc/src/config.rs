//! Channel configuration: the frame size limit and the shared-memory threshold.

use crate::frame::MAX_WIRE_LEN;

/// Settings shared by every channel type ([`Sender`](crate::Sender),
/// [`Receiver`](crate::Receiver), [`Duplex`](crate::Duplex), [`FramedConn`](crate::FramedConn)).
///
/// Setters take and return `self`, so a configuration reads as one expression.
///
/// # Examples
///
/// ```
/// use pool_ipc::Config;
///
/// let cfg = Config::new().max_frame_len(64 << 20).shm_threshold(Some(256 * 1024));
/// # drop(cfg);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) max_frame_len: usize,
    pub(crate) shm_threshold: Option<usize>,
    pub(crate) announce_above: Option<usize>,
    pub(crate) accept_fds: bool,
    pub(crate) small_read_buffer: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The defaults: frames up to 1 GiB, shared-memory mode off, large frames not
    /// announced.
    pub fn new() -> Self {
        Config {
            max_frame_len: 1 << 30,
            shm_threshold: None,
            announce_above: None,
            accept_fds: false,
            small_read_buffer: false,
        }
    }

    /// Sets the largest payload accepted (and sent), in bytes.
    ///
    /// A received frame whose header announces more is rejected with
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) before any memory is
    /// allocated for it. Values above the wire format's limit (2 GiB − 1) are clamped.
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame_len = n.min(MAX_WIRE_LEN);
        self
    }

    /// The largest payload accepted and sent, in bytes.
    pub fn frame_limit(&self) -> usize {
        self.max_frame_len
    }

    /// Enables shared-memory mode for payloads larger than `n` bytes (`None` disables it).
    ///
    /// In shm mode the sender copies a large payload into a shared ring that it owns (a
    /// sealed memfd, passed to the peer once over the socket with `SCM_RIGHTS`) and sends
    /// only a small reference frame; the receiver copies the payload out and marks the
    /// space free. When the ring has no room at the moment, the payload simply travels
    /// inline through the socket, so a slow receiver never blocks or deadlocks the sender.
    ///
    /// # Caveats
    ///
    /// * Both ends must enable it: a receiver without shm mode rejects shared-memory
    ///   frames with [`ErrorKind::Decode`](crate::ErrorKind::Decode).
    /// * It needs a Unix socket (fds cannot travel through a pipe); on a pipe the setting
    ///   is ignored and everything travels inline.
    /// * Each direction that has carried a large payload holds a ring of 4× its largest
    ///   payload so far, rounded up to a power of two, between 2 MiB and 256 MiB (memory
    ///   allocated up front and kept). Payloads above 128 MiB always travel inline.
    pub fn shm_threshold(mut self, n: Option<usize>) -> Self {
        self.shm_threshold = n;
        self
    }

    /// Announces frames larger than `n` bytes (`None`: no announcements, the default).
    ///
    /// A sender with this setting precedes every frame above `n` bytes with a 16-byte
    /// control frame that repeats its length with a check value. A receiver with this
    /// setting accepts a plain header above `n` bytes only right after the announcement
    /// of exactly that length; otherwise it fails with
    /// [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) before allocating
    /// anything. So bytes that do not belong on the channel (a library writing a line of
    /// text to the wrong descriptor, say) cannot make the receiver wait for, or reserve
    /// room for, a frame of hundreds of megabytes: at most `n` bytes, which a caller
    /// watching [`FramedConn::partial_frame_since`](crate::FramedConn::partial_frame_since)
    /// can give up on.
    ///
    /// Both ends must use it (a receiver without it accepts announcements but does not
    /// require them). Values below 4096 are raised to 4096.
    pub fn announce_above(mut self, n: Option<usize>) -> Self {
        self.announce_above = n.map(|n| n.max(crate::frame::ANNOUNCE_MIN));
        self
    }

    /// Accepts descriptors passed with frames (`false`, the default: refuses them).
    ///
    /// A sender attaches descriptors to a frame with
    /// [`FramedConn::queue_with_fds`](crate::FramedConn::queue_with_fds); they travel as
    /// `SCM_RIGHTS` on a control frame just before it. A receiver with this setting hands
    /// them over with that frame ([`Receiver::recv_with_fds`](crate::Receiver::recv_with_fds));
    /// one without it rejects the control frame with
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode), so a peer that is not trusted
    /// cannot make it hold descriptors. Only for Unix sockets.
    pub fn accept_fds(mut self, yes: bool) -> Self {
        self.accept_fds = yes;
        self
    }

    /// Starts the receive buffer at 512 bytes rather than 8 KiB (`false`, the default). It
    /// grows as reads fill it either way; this is for a receiver that gets a few small
    /// messages in its life: a forked process's first allocation of 8 KiB is a large one for
    /// glibc's allocator, which first merges every small chunk freed before it, writing to
    /// chunks all over the heap the process shares with its parent and so copying their
    /// pages.
    pub fn small_read_buffer(mut self, yes: bool) -> Self {
        self.small_read_buffer = yes;
        self
    }

    /// The size above which frames are announced, if they are.
    pub fn announced_above(&self) -> Option<usize> {
        self.announce_above
    }
}
