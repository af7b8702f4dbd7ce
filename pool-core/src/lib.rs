//! Scheduling and worker-lifetime policy for procpool: `Pool`, `AsyncResult`, `TaskError`.
//!
//! pool-core sits between the facade (`procpool`) and pool-spawn (the start methods), which in
//! turn sits on pool-ipc (the transport).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
