//! The part of libtest's command line that a test binary built with `harness = false`
//! speaks, for `cargo test` and nextest: `--list` (one test, never an ignored one),
//! `--ignored` and name filters (which select nothing or this test), `--exact` and the
//! rest (taken as given).

use std::time::Instant;

/// Runs `test`, named `name`, unless the command line selects nothing: a listing, ignored
/// tests only, or a filter that does not match. Prints libtest's line for a passed test,
/// with what `test` returns (a detail, or nothing) and the time it took; a failure is a
/// panic, as in libtest.
pub(crate) fn run(name: &str, test: impl FnOnce() -> String) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ignored = args.iter().any(|a| a == "--ignored");
    if args.iter().any(|a| a == "--list") {
        if !ignored {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if ignored || filters.iter().any(|f| !name.contains(f.as_str())) {
        println!("running 0 tests");
        return;
    }
    let started = Instant::now();
    let detail = test();
    let sep = if detail.is_empty() { "" } else { ", " };
    println!("test {name} ... ok ({detail}{sep}{:?})", started.elapsed());
}
