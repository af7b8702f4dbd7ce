//! Fork pools built one right after another in a single-threaded process: each build must
//! pass the fork-safety check although the previous pool's threads were joined only a
//! moment before (a joined thread can linger in `/proc/self/task` for a while).
//!
//! `harness = false`: libtest would run the test on a thread of its own, and a process with
//! two threads is refused `Fork` by design. This runs on the main thread (libtest's command
//! line: `no_harness`).

use std::time::{Duration, Instant};

use procpool::{Pool, StartMethod};

const NAME: &str = "fork_pools_rebuilt_at_once";

fn square(x: u64) -> u64 {
    x * x
}

mod no_harness;

fn main() {
    procpool::init();
    no_harness::run(NAME, rebuild);
}

fn rebuild() -> String {
    let started = Instant::now();
    // The race itself, many times: a thread just joined, then the check. Each round costs
    // about 1.5 ms in release and more in debug (a thread's start and join, and the
    // launcher's zygote): at least 3 000 rounds, then more while under 10 s.
    let mut i = 0;
    while i < 3_000 || (i < 20_000 && started.elapsed() < Duration::from_secs(10)) {
        std::thread::spawn(|| {}).join().unwrap();
        if let Err(e) = pool_spawn::Launcher::new(StartMethod::Fork, Default::default()) {
            panic!("launcher {i}, right after a thread was joined: {e}");
        }
        i += 1;
    }
    let launchers = i;
    // Whole pools, built and dropped in a row.
    let pools_started = Instant::now();
    let mut i = 0;
    while i < 300 || (i < 2000 && pools_started.elapsed() < Duration::from_secs(5)) {
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::Fork)
            .build()
            .unwrap_or_else(|e| panic!("pool {i}, right after the last was dropped: {e}"));
        assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
        drop(pool);
        i += 1;
    }
    format!("{launchers} launchers, {i} pools")
}
