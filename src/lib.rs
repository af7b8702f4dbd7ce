//! procpool: a process pool for Rust, with the API of Python's `multiprocessing.Pool`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
