//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`).
//!
//! Received descriptors are always close-on-exec (`MSG_CMSG_CLOEXEC`).
//!
//! # Examples
//!
//! ```
//! use std::os::fd::AsFd;
//! use pool_ipc::fdpass::{recv_fds, send_fds};
//!
//! let (a, b) = pool_ipc::socketpair()?;
//! let (r, w) = pool_ipc::pipe()?;
//! send_fds(a.as_fd(), b"pipe", &[r.as_fd()])?;
//! let mut buf = [0u8; 16];
//! let (n, fds) = recv_fds(b.as_fd(), &mut buf, 4)?;
//! assert_eq!(&buf[..n], b"pipe");
//! assert_eq!(fds.len(), 1);
//! # drop((w, fds));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::RecvFlags;

use crate::os;

/// Most descriptors the kernel accepts in one message (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends all of `bytes` over the stream socket `sock`, with `fds` attached to the first
/// byte.
///
/// Blocks until everything is written (if `sock` is nonblocking, it waits for
/// writability with `poll`). The descriptors stay open in this process; the receiver gets
/// duplicates. `SIGPIPE` is never raised (`MSG_NOSIGNAL`).
///
/// # Errors
///
/// * [`io::ErrorKind::InvalidInput`] if `bytes` is empty (a stream socket needs at least
///   one byte to carry descriptors) or more than [`MAX_FDS`] descriptors are given;
/// * the `sendmsg(2)` error otherwise (`EPIPE` when the peer is gone, `ENOTSOCK` for a
///   pipe).
///
/// # References
///  - [`sendmsg(2)`](https://man7.org/linux/man-pages/man2/sendmsg.2.html),
///    [`unix(7)`](https://man7.org/linux/man-pages/man7/unix.7.html)
#[doc(alias = "SCM_RIGHTS")]
pub fn send_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if bytes.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_fds needs at least one byte and at most 253 descriptors",
        ));
    }
    let mut sent = 0;
    let mut fds = fds;
    while sent < bytes.len() {
        match os::write_once(sock, &[IoSlice::new(&bytes[sent..])], true, fds) {
            Ok(n) => {
                sent += n;
                fds = &[];
            }
            Err(Errno::AGAIN) => {
                os::poll_one(sock, true, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes from the stream socket `sock`, plus any descriptors
/// that arrived with them (at most `max_fds`), close-on-exec.
///
/// One `recvmsg(2)` call: it returns what is available (blocking on a blocking socket until
/// something is), so the caller reads the rest of a message with further calls. Returns
/// `(0, [])` at end of stream.
///
/// # Errors
///
/// * [`io::ErrorKind::InvalidData`] if more than `max_fds` descriptors were attached (the
///   surplus was closed by the kernel; the ones received are closed too);
/// * `EMFILE` if descriptors were attached but this process could not take them all (it is
///   at its limit of open files; the ones received are closed);
/// * the `recvmsg(2)` error otherwise (`EAGAIN` on an empty nonblocking socket).
///
/// # References
///  - [`recvmsg(2)`](https://man7.org/linux/man-pages/man2/recvmsg.2.html),
///    [`unix(7)`](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn recv_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    match recv_fds_or_short(sock, buf, max_fds)? {
        (_, fds, true) => {
            drop(fds);
            Err(io::Error::from_raw_os_error(Errno::MFILE.raw_os_error()))
        }
        (n, fds, false) => Ok((n, fds)),
    }
}

/// As [`recv_fds`], but when descriptors were attached that this process could not take
/// (it is at its limit of open files: the kernel closes them), the bytes are returned all
/// the same, with the descriptors that did arrive and `true`: the message is not lost, only
/// what it carried.
///
/// # Errors
///
/// As [`recv_fds`], except `EMFILE`.
pub fn recv_fds_or_short(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    recv_fds_flags(sock, buf, max_fds, RecvFlags::empty())
}

/// As [`recv_fds_or_short`], but never waits, even on a blocking socket (`MSG_DONTWAIT`):
/// with nothing to read it fails with [`io::ErrorKind::WouldBlock`]. For a reader that
/// would otherwise poll the socket first, at the cost of one more system call each time
/// something is there to read.
///
/// # Errors
///
/// As [`recv_fds_or_short`]; `EAGAIN` when nothing waits.
pub fn try_recv_fds_or_short(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    recv_fds_flags(sock, buf, max_fds, RecvFlags::DONTWAIT)
}

fn recv_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    flags: RecvFlags,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let room = max_fds.min(MAX_FDS);
    loop {
        match os::recv_with_fds_flags(sock, buf, room, flags) {
            // There was room for more than arrived: the kernel could not give this process
            // the descriptors.
            Ok((n, fds, true)) if fds.len() < room.max(1) => return Ok((n, fds, true)),
            Ok((_, fds, truncated)) if truncated || fds.len() > max_fds => {
                drop(fds);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more file descriptors received than max_fds",
                ));
            }
            Ok((n, fds, _)) => return Ok((n, fds, false)),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
