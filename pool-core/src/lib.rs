//! Scheduling and worker-lifetime policy for procpool: [`Pool`], [`AsyncResult`],
//! [`TaskError`].
//!
//! pool-core sits between the facade (`procpool`, which re-exports it) and pool-spawn (the
//! start methods), which in turn sits on pool-ipc (the transport). It decides which worker
//! runs which task, replaces workers that die or reach `max_tasks_per_child`, and gives every
//! task exactly one outcome.
//!
//! Its parts:
//! - `policy`: the state machine (no syscalls), tested with fake workers and proptest;
//! - `driver`: one thread per pool that polls worker sockets and pidfds and applies the
//!   policy's decisions to real processes;
//! - [`Pool`], [`PoolBuilder`], [`AsyncResult`], [`Imap`]: the user-facing API, shaped like
//!   Python's (`builder`, `pool`, `submit`, `gather`, `imap`, `result`), over chunks of
//!   items encoded by `chunk`; [`Task`] is what it accepts;
//! - [`Event`]: a process-shared flag for cooperative stops.
//!
//! ```
//! # use pool_core as procpool;
//! fn square(x: u64) -> u64 { x * x }
//!
//! fn main() -> Result<(), procpool::Error> {
//!     pool_spawn::init(); // first line of main: worker entry
//!     let pool = procpool::Pool::builder().processes(2).build()?;
//!     assert_eq!(pool.map(square, 0..10u64)?, (0..10).map(|x| x * x).collect::<Vec<_>>());
//!     pool.close();
//!     pool.join()?;
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "pool-core (procpool's pool) runs on Linux only: its driver sleeps on an eventfd and \
     worker pidfds, and its Event is a futex in a memfd"
);

mod builder;
mod bytes;
mod chunk;
mod driver;
mod error;
mod event;
mod gather;
mod ids;
mod imap;
mod items;
mod metrics;
mod observe;
mod options;
mod policy;
mod pool;
mod result;
mod rng;
mod submit;
mod task;

pub use builder::PoolBuilder;
pub use bytes::SharedBytes;
pub use error::{
    BuildError, BuildErrorKind, Error, ErrorKind, QueueFull, TaskError, TaskErrorKind,
};
pub use event::Event;
pub use imap::Imap;
pub use metrics::{Metrics, Outcomes, Recycles, Summary};
pub use options::Options;
#[doc(hidden)]
pub use policy::bench_support as __bench_policy;
pub use pool::{Pool, WorkerInfo};
pub use result::{AsyncResult, CancelOutcome, Progress, WaitError};
pub use task::Task;
