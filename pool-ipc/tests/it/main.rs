//! Integration tests of pool-ipc: one test binary, one module per area.

mod channels;
mod conn;
mod fdpass;
mod helpers;
mod procs;
mod props;
mod shm;
mod stray;
