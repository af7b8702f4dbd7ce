//! The `procpool` command.
#![forbid(unsafe_code)]
fn main() {}
