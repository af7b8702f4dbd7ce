//! Integration tests of pool-spawn: real worker processes for every start method.
//!
//! `enable_test_support!()` lets spawned workers and the fork server re-execute this test
//! binary under libtest and nextest. Helpers that must run in a process of their own are
//! `#[ignore]`d tests run through [`helper::run`].

pool_spawn::enable_test_support!();

mod begin;
mod driver;
mod helper;
mod hygiene;
mod lifecycle;
mod setup;
mod signals;
mod stray;
mod tasks;

/// Defines `mod $name { fn fork(), fn spawn(), fn forkserver() }`, each calling
/// `$body(StartMethod::…)`.
macro_rules! per_method {
    ($name:ident, $body:path) => {
        mod $name {
            use pool_spawn::StartMethod;

            #[test]
            fn fork() {
                $body(StartMethod::Fork);
            }

            #[test]
            fn spawn() {
                $body(StartMethod::Spawn);
            }

            #[test]
            fn forkserver() {
                $body(StartMethod::Forkserver);
            }
        }
    };
}
pub(crate) use per_method;
