//! End-to-end tests of the facade: real worker processes under every start method.

procpool::enable_test_support!();

mod api;
mod failures;
mod fuzz;
mod held;
mod hostile;
mod hostile_driver;
mod lifetime;
mod observe;
mod shared_bytes;
mod shared_event;
mod signals;
mod task_control;
mod torture;
mod util;
