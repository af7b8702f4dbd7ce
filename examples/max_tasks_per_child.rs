//! Recycling workers: two workers, each limited to three tasks; ten tasks. Worker names
//! change after every three tasks, because each worker is replaced by a fresh process.
//!
//! `cargo run --example max_tasks_per_child`
use std::time::Duration;

use procpool::{Pool, current_process};

fn task(value: u32) {
    let me = current_process();
    println!("Worker is {} with {value}", me.name());
    std::thread::sleep(Duration::from_millis(200));
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(3)
        .build()?;
    let pending: Vec<_> = (0..10).map(|i| pool.apply_async(task, (i,))).collect();
    pool.close();
    pool.join()?;
    for r in pending {
        r.get()?;
    }
    let m = pool.metrics();
    println!(
        "{} tasks ran; {} workers started, {} recycled",
        m.completed, m.workers_started, m.recycled
    );
    Ok(())
}
