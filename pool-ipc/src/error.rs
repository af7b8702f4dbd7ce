//! The crate's error type: one opaque [`Error`] with a non-exhaustive [`ErrorKind`].

use std::error::Error as StdError;
use std::fmt;
use std::io;

/// The result type of this crate's channel operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, in broad strokes; see [`Error::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A system call failed; [`Error::source`](std::error::Error::source) holds the
    /// [`io::Error`].
    Io,
    /// The peer closed the channel at a frame boundary (clean end of stream), or, when
    /// sending, the peer has gone away (`EPIPE`/`ECONNRESET`).
    Closed,
    /// The stream ended in the middle of a frame: the peer died or closed while writing.
    Truncated,
    /// A frame's announced length exceeds the configured `max_frame_len` (checked before
    /// anything is allocated), or a message to send is too large for the wire format. On a
    /// channel with [`Config::announce_above`](crate::Config::announce_above), also a
    /// header above that size that no announcement preceded, or one that differs from its
    /// announcement: bytes that do not belong on the channel.
    FrameTooLarge,
    /// A frame could not be decoded: malformed postcard data, a malformed control frame,
    /// or a shared-memory reference that does not fit the shared region.
    Decode,
    /// A message could not be encoded by postcard.
    Encode,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "i/o error",
            ErrorKind::Closed => "channel closed by peer",
            ErrorKind::Truncated => "channel closed in the middle of a frame",
            ErrorKind::FrameTooLarge => "frame too large",
            ErrorKind::Decode => "cannot decode frame",
            ErrorKind::Encode => "cannot encode message",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[derive(Debug)]
enum Detail {
    None,
    Io(io::Error),
    Postcard(postcard::Error),
    /// The message a `Serialize` implementation gave, which postcard drops.
    Custom(String),
    Msg(&'static str),
    TooLarge {
        len: u64,
        max: u64,
    },
    Unannounced {
        len: u64,
        limit: u64,
    },
    Mismatch {
        len: u64,
        announced: u64,
    },
}

/// The error type of pool-ipc's channels.
///
/// Inspect it with [`Error::kind`]; the underlying [`io::Error`] or postcard error, when
/// there is one, is available through [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    detail: Detail,
}

impl Error {
    /// The broad category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn new(kind: ErrorKind) -> Error {
        Error {
            kind,
            detail: Detail::None,
        }
    }

    /// An error of `kind` described by `msg`, for code that builds on pool-ipc's framing
    /// and reports its own failures in the same terms.
    pub fn msg(kind: ErrorKind, msg: &'static str) -> Error {
        Error {
            kind,
            detail: Detail::Msg(msg),
        }
    }

    pub(crate) fn too_large(len: usize, max: usize) -> Error {
        Error {
            kind: ErrorKind::FrameTooLarge,
            detail: Detail::TooLarge {
                len: len as u64,
                max: max as u64,
            },
        }
    }

    pub(crate) fn unannounced(len: usize, limit: usize) -> Error {
        Error {
            kind: ErrorKind::FrameTooLarge,
            detail: Detail::Unannounced {
                len: len as u64,
                limit: limit as u64,
            },
        }
    }

    pub(crate) fn mismatch(len: usize, announced: usize) -> Error {
        Error {
            kind: ErrorKind::FrameTooLarge,
            detail: Detail::Mismatch {
                len: len as u64,
                announced: announced as u64,
            },
        }
    }

    pub(crate) fn decode(e: postcard::Error) -> Error {
        Error {
            kind: ErrorKind::Decode,
            detail: Detail::Postcard(e),
        }
    }

    /// postcard's error encoding `v`; when `v`'s own `Serialize` refused with a message,
    /// that message (postcard keeps only that there was one).
    pub(crate) fn encode<T: serde::Serialize + ?Sized>(e: postcard::Error, v: &T) -> Error {
        let detail = match e {
            postcard::Error::SerdeSerCustom => {
                crate::why::custom_message(v).map_or(Detail::Postcard(e), Detail::Custom)
            }
            e => Detail::Postcard(e),
        };
        Error {
            kind: ErrorKind::Encode,
            detail,
        }
    }

    /// Maps a write-side I/O error: a vanished peer is [`ErrorKind::Closed`].
    pub(crate) fn from_write(e: io::Error) -> Error {
        if matches!(e.raw_os_error(), Some(code) if code == libc_epipe() || code == libc_econnreset())
        {
            Error {
                kind: ErrorKind::Closed,
                detail: Detail::Io(e),
            }
        } else {
            Error::from(e)
        }
    }
}

fn libc_epipe() -> i32 {
    rustix::io::Errno::PIPE.raw_os_error()
}

fn libc_econnreset() -> i32 {
    rustix::io::Errno::CONNRESET.raw_os_error()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Detail::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
            Detail::Unannounced { len, limit } => write!(
                f,
                "a frame header gives {len} bytes, but frames above {limit} bytes are \
                 announced first and this one was not (stray bytes on the channel?)"
            ),
            Detail::Mismatch { len, announced } => write!(
                f,
                "a frame header gives {len} bytes after an announcement of {announced} bytes \
                 (stray bytes on the channel?)"
            ),
            Detail::Msg(m) => write!(f, "{}: {m}", self.kind.describe()),
            Detail::Custom(m) => write!(f, "{}: {m}", self.kind.describe()),
            Detail::None | Detail::Io(_) | Detail::Postcard(_) => f.write_str(self.kind.describe()),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.detail {
            Detail::Io(e) => Some(e),
            Detail::Postcard(e) => Some(e),
            Detail::None
            | Detail::Msg(_)
            | Detail::Custom(_)
            | Detail::TooLarge { .. }
            | Detail::Unannounced { .. }
            | Detail::Mismatch { .. } => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error {
            kind: ErrorKind::Io,
            detail: Detail::Io(e),
        }
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Error {
        Error::from(io::Error::from(e))
    }
}

impl From<Error> for io::Error {
    /// Converts to an [`io::Error`]: the original one for [`ErrorKind::Io`], otherwise an
    /// error of a fitting [`io::ErrorKind`] that wraps this one.
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::Io => {
                if let Detail::Io(inner) = e.detail {
                    return inner;
                }
                io::ErrorKind::Other
            }
            ErrorKind::Closed => io::ErrorKind::BrokenPipe,
            ErrorKind::Truncated => io::ErrorKind::UnexpectedEof,
            ErrorKind::FrameTooLarge | ErrorKind::Decode | ErrorKind::Encode => {
                io::ErrorKind::InvalidData
            }
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase_without_period() {
        let errs = [
            Error::new(ErrorKind::Closed),
            Error::new(ErrorKind::Truncated),
            Error::too_large(10, 5),
            Error::msg(ErrorKind::Decode, "bad control frame"),
            Error::from(io::Error::from_raw_os_error(9)),
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.ends_with('.'), "{s}");
            assert!(s.chars().next().unwrap().is_lowercase(), "{s}");
        }
        assert_eq!(
            Error::too_large(10, 5).to_string(),
            "frame of 10 bytes exceeds the limit of 5 bytes"
        );
    }

    #[test]
    fn write_errors_map_to_closed() {
        let e = Error::from_write(io::Error::from_raw_os_error(libc_epipe()));
        assert_eq!(e.kind(), ErrorKind::Closed);
        assert!(e.source().is_some());
    }
}
