//! A progress bar for a long map: `AsyncResult::progress` says how many items are done of
//! how many, and indicatif draws it.
//!
//! `cargo run --example map_progress`
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use procpool::{Options, Pool};

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(5));
    x * x
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let pool = Pool::builder().build()?;
    let pending = pool.map_async_with(slow_square, 0..2000u64, Options::new().chunksize(20));
    let bar = ProgressBar::new(pending.progress().total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} items, {per_sec}, eta {eta}")
            .expect("a valid template"),
    );
    while !pending.progress().is_complete() {
        bar.set_position(pending.progress().done as u64);
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish();
    let squares = pending.get()?;
    println!("sum of squares: {}", squares.iter().sum::<u64>());
    pool.close();
    pool.join()?;
    Ok(())
}
