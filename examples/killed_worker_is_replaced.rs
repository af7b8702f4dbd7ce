//! A killed worker is replaced at once by a new process; the pool goes on.
//!
//! `cargo run --example killed_worker_is_replaced`
use std::time::{Duration, Instant};

use procpool::Pool;
use rustix::process::{Pid, Signal, kill_process};

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let pool = Pool::builder().processes(4).build()?;
    let before = pool.workers();
    for w in &before {
        println!("{} pid={} started", w.name(), w.pid());
    }
    let victim = before[0].clone();
    let pid = Pid::from_raw(victim.pid() as i32).expect("a worker pid is positive");
    kill_process(pid, Signal::KILL).expect("kill the worker");
    println!("killed {} pid={}", victim.name(), victim.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = pool.workers();
        if now.len() == 4 && now.iter().all(|w| w.pid() != victim.pid()) {
            break now;
        }
        assert!(Instant::now() < deadline, "no replacement within 10s");
        std::thread::sleep(Duration::from_millis(5));
    };
    for w in &after {
        println!("{} pid={} started", w.name(), w.pid());
    }
    println!("restarts so far: {}", pool.metrics().died);
    pool.close();
    pool.join()?;
    Ok(())
}
