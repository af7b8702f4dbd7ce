//! Framed postcard messages over pipes and socketpairs, shared memory and fd passing.
//!
//! pool-ipc is the transport under procpool. It knows nothing of tasks, workers or pools:
//! it moves typed messages and raw frames between two processes, and nothing else. It
//! sits directly on rustix, serde and postcard.
//!
//! * [`socketpair`] and [`pipe`] create close-on-exec channels.
//! * [`Sender`] and [`Receiver`] are blocking, buffered, typed ends; [`Duplex`] is both
//!   over one socket ([`duplex`] makes a connected pair).
//! * [`FramedConn`] is a nonblocking framed connection for event loops; its peer can be a
//!   blocking [`Duplex`].
//! * [`FrameBuf`] builds a frame once so it can be queued without copying.
//! * [`fdpass`] passes file descriptors over a socket (`SCM_RIGHTS`).
//! * [`shm`] has sealed shared-memory segments and process-shared futexes.
//!
//! # Wire format
//!
//! A frame is a `u32` little-endian payload length followed by the payload (a postcard
//! encoding for typed channels). A header above [`Config::max_frame_len`] is rejected
//! before anything is allocated. Headers with the top bit set are control frames of the
//! optional shared-memory mode ([`Config::shm_threshold`]), in which large payloads travel
//! through a shared ring and the socket carries a 20-byte reference.
//!
//! # Examples
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! enum Request {
//!     Square(u64),
//!     Stop,
//! }
//!
//! let (mut client, mut server) = pool_ipc::duplex::<Request, u64>()?;
//! client.send(&Request::Square(12))?;
//! match server.recv()? {
//!     Request::Square(n) => server.send(&(n * n))?,
//!     Request::Stop => unreachable!(),
//! }
//! assert_eq!(client.recv()?, 144);
//!
//! client.send(&Request::Stop)?;
//! assert_eq!(server.recv()?, Request::Stop);
//! drop(client);
//! assert_eq!(server.recv().unwrap_err().kind(), pool_ipc::ErrorKind::Closed);
//! # Ok::<(), pool_ipc::Error>(())
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "pool-ipc (procpool's transport) runs on Linux only: its shared memory is memfd, its \
     waits are futexes, and peers find each other's descriptors through /proc"
);

mod bufs;
mod chan;
mod config;
mod conn;
mod error;
pub mod fdpass;
mod frame;
mod os;
mod ring;
pub mod shm;
#[cfg(feature = "proptest")]
pub mod strategies;
mod why;

pub use bufs::{SMALL_FRAME_MAX, SMALL_FRAMES_KEPT, keep_buffer, keep_small_frames, reuse_buffer};
pub use chan::{Duplex, Receiver, Sender, duplex, duplex_with_config};
pub use config::Config;
pub use conn::FramedConn;
pub use error::{Error, ErrorKind, Result};
pub use frame::{FrameAppender, FrameBuf, encode_append, encode_seq_len, encoded_len};
pub use os::{pipe, socketpair};
