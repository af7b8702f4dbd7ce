//! Small safe wrappers over rustix: creating pipes and socketpairs, polling one fd, and
//! reading/writing with the `EINTR`/`EAGAIN` handling the channels need.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Creates a connected pair of Unix stream sockets, both ends close-on-exec.
///
/// Either end can be wrapped in a [`Duplex`](crate::Duplex), a [`FramedConn`](crate::FramedConn),
/// or split into a [`Sender`](crate::Sender) and a [`Receiver`](crate::Receiver) on
/// different ends. Sockets (unlike pipes) can carry file descriptors, which the
/// shared-memory mode needs.
///
/// # Examples
///
/// ```
/// let (a, b) = pool_ipc::socketpair()?;
/// # drop((a, b));
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The `socketpair(2)` error, e.g. when the process is out of file descriptors.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Creates a pipe, returning `(read end, write end)`, both close-on-exec.
///
/// # Examples
///
/// ```
/// let (r, w) = pool_ipc::pipe()?;
/// let mut tx = pool_ipc::Sender::<u32>::new(w);
/// let mut rx = pool_ipc::Receiver::<u32>::new(r);
/// tx.send(&7)?;
/// assert_eq!(rx.recv()?, 7);
/// # Ok::<(), pool_ipc::Error>(())
/// ```
///
/// # Errors
///
/// The `pipe2(2)` error, e.g. when the process is out of file descriptors.
#[doc(alias = "pipe2")]
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Whether `fd` refers to a socket.
pub(crate) fn is_socket(fd: BorrowedFd<'_>) -> bool {
    match rustix::fs::fstat(fd) {
        Ok(st) => rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket,
        Err(_) => false,
    }
}

/// Sets `O_NONBLOCK` on the open file description of `fd` (`FIONBIO`: one system call,
/// where reading the flags first and writing them back took two).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, true)?)
}

/// Waits until `fd` is readable (or writable with `write`), at most `timeout`
/// (`None` = forever). Returns whether it became ready. Retries on `EINTR`.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    write: bool,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let events = if write { PollFlags::OUT } else { PollFlags::IN };
    let deadline = timeout.map(deadline_after);
    loop {
        let ts = match deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                Some(Timespec {
                    tv_sec: left.as_secs().min(i64::MAX as u64) as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                })
            }
        };
        let mut fds = [PollFd::from_borrowed_fd(fd, events)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Most fds accepted in one `recvmsg` by default (extra ones are closed by the kernel).
pub(crate) const MAX_FDS_PER_READ: usize = 8;

/// Reads into `dst` once. With `fds` given, uses `recvmsg` and collects any passed fds
/// (close-on-exec, at most `max_fds`) into it. `EINTR` is retried; `EAGAIN` is returned as
/// `Errno::AGAIN`.
/// `ECONNRESET` (the peer died with unread data) is reported as end of stream.
pub(crate) fn read_once(
    fd: BorrowedFd<'_>,
    dst: &mut [u8],
    mut fds: Option<&mut VecDeque<OwnedFd>>,
    max_fds: usize,
) -> Result<usize, Errno> {
    loop {
        let r = match fds.as_deref_mut() {
            None => rustix::io::read(fd, &mut *dst),
            Some(q) => recv_with_fds(fd, dst, max_fds).map(|(n, got, _)| {
                q.extend(got);
                n
            }),
        };
        match r {
            Err(Errno::INTR) => continue,
            Err(Errno::CONNRESET) => return Ok(0),
            other => return other,
        }
    }
}

/// Bytes of ancillary data for the most descriptors one message carries
/// ([`MAX_FDS`](crate::fdpass::MAX_FDS)): about 1 KiB, kept on the stack by every
/// `recvmsg`/`sendmsg` here rather than allocated per call.
const ANCILLARY_MAX: usize = rustix::cmsg_space!(ScmRights(crate::fdpass::MAX_FDS));

/// One `recvmsg` with room for `max_fds` passed fds (at most
/// [`MAX_FDS`](crate::fdpass::MAX_FDS), all a message can carry), received close-on-exec.
/// Returns the byte count, the fds, and whether control data was truncated.
pub(crate) fn recv_with_fds(
    fd: BorrowedFd<'_>,
    dst: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>, bool), Errno> {
    recv_with_fds_flags(fd, dst, max_fds, RecvFlags::empty())
}

/// [`recv_with_fds`] with extra `recvmsg` flags (`MSG_DONTWAIT`, say).
pub(crate) fn recv_with_fds_flags(
    fd: BorrowedFd<'_>,
    dst: &mut [u8],
    max_fds: usize,
    flags: RecvFlags,
) -> Result<(usize, Vec<OwnedFd>, bool), Errno> {
    let mut space = [MaybeUninit::<u8>::uninit(); ANCILLARY_MAX];
    let len = rustix::cmsg_space!(ScmRights(max_fds.clamp(1, crate::fdpass::MAX_FDS)));
    let mut anc = RecvAncillaryBuffer::new(&mut space[..len]);
    let mut iov = [IoSliceMut::new(dst)];
    let r = rustix::net::recvmsg(fd, &mut iov, &mut anc, RecvFlags::CMSG_CLOEXEC | flags)?;
    let mut got = Vec::new();
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(iter) = msg {
            got.extend(iter);
        }
    }
    Ok((r.bytes, got, r.flags.contains(ReturnFlags::CTRUNC)))
}

/// Writes `bufs` once (a single `writev`, or `sendmsg` with `MSG_NOSIGNAL` on a socket,
/// carrying `fds` as `SCM_RIGHTS` when non-empty). `EINTR` is retried.
pub(crate) fn write_once(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    socket: bool,
    fds: &[BorrowedFd<'_>],
) -> Result<usize, Errno> {
    loop {
        let r = if socket {
            if fds.is_empty() {
                let mut anc = SendAncillaryBuffer::new(&mut []);
                rustix::net::sendmsg(fd, bufs, &mut anc, SendFlags::NOSIGNAL)
            } else {
                // More than MAX_FDS do not fit: EINVAL, as the kernel would answer.
                let mut space = [MaybeUninit::<u8>::uninit(); ANCILLARY_MAX];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                if !anc.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(Errno::INVAL);
                }
                rustix::net::sendmsg(fd, bufs, &mut anc, SendFlags::NOSIGNAL)
            }
        } else {
            rustix::io::writev(fd, bufs)
        };
        match r {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// The instant `timeout` from now; a timeout too long to represent (`Duration::MAX`, say)
/// means a century, which is to say never.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
