//! `cargo xtask`: the project's own tasks (test, bench).
#![forbid(unsafe_code)]
fn main() {}
