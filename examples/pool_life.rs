//! A pool's life as `tracing` tells it: its span, each task's span with the events of its
//! life (queued, sent, started, finished or failed, with its queue wait and run time), the
//! workers' starts, deaths and recycles; then `workers()`, a resize, and the `Metrics`
//! snapshot as JSON, as a status endpoint would export it.
//!
//! `cargo run --example pool_life` (set `RUST_LOG`-style levels with the first argument:
//! `cargo run --example pool_life -- trace` shows every event).
use std::time::Duration;

use procpool::Pool;

fn square(x: u64) -> u64 {
    x * x
}

fn boom(x: u64) -> u64 {
    panic!("boom at {x}")
}

fn killed() -> u64 {
    let me = rustix::process::getpid();
    let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_secs(10));
    0
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let level = std::env::args()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::DEBUG);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_thread_names(true)
        .init();
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(3)
        .build()?;
    println!("-- a task that succeeds");
    pool.apply(square, (7,))?;
    println!("-- one that panics");
    let _ = pool.apply(boom, (1,));
    println!("-- one whose worker is killed");
    let _ = pool.apply(killed, ());
    println!("-- a map, workers recycled after three tasks, the pool grown to 3");
    pool.resize(3);
    pool.map_with(square, 0..12u64, procpool::Options::new().chunksize(2))?;
    for w in pool.workers() {
        println!(
            "{} pid={} tasks_done={} rss={:?}",
            w.name(),
            w.pid(),
            w.tasks_done(),
            w.rss()
        );
    }
    pool.close();
    pool.join()?;
    let metrics = serde_json::to_string_pretty(&pool.metrics()).expect("metrics serialize");
    println!("-- metrics\n{metrics}");
    Ok(())
}
