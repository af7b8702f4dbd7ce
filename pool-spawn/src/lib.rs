//! Start methods for procpool workers: fork, spawn and forkserver.
//!
//! pool-spawn starts, signals and reaps one worker and hands back its pool-ipc channel.
//! It never schedules tasks: that is pool-core's work.
#![deny(unsafe_code)]
#![deny(missing_docs)]
