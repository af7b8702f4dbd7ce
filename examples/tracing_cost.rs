//! What tracing costs a pool of tiny tasks: `procpool bench`'s `map_tiny_chunk1` workload
//! (20 000 tasks of one item on two workers) run with no subscriber, then under a
//! subscriber that formats every span and event, `trace` level included, and discards the
//! text. Prints tasks per second of each and their ratio.
//!
//! `cargo run --release --example tracing_cost`
use std::time::Instant;

use procpool::{Options, Pool};

fn square(x: u64) -> u64 {
    x * x
}

/// Tasks per second of one run, the median of `runs`.
fn measure(runs: usize) -> Result<f64, procpool::Error> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let pool = Pool::builder().processes(2).build()?;
        pool.map(square, 0..100u64)?;
        let t = Instant::now();
        let n = pool
            .map_with(square, 0..20_000u64, Options::new().chunksize(1))?
            .len();
        rates.push(n as f64 / t.elapsed().as_secs_f64());
        pool.close();
        pool.join()?;
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[runs / 2])
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let quiet = measure(7)?;
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::sink)
        .init();
    let discarding = measure(7)?;
    println!("no subscriber:         {quiet:.0} tasks/s");
    println!(
        "discarding subscriber: {discarding:.0} tasks/s ({:.2}x)",
        discarding / quiet
    );
    Ok(())
}
