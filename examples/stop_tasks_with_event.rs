//! Stopping every running task safely with a shared `Event`, then reusing the pool.
//!
//! `cargo run --example stop_tasks_with_event`
use std::time::Duration;

use procpool::{Event, Pool};

fn task(identifier: u32, event: Event) {
    println!("Task {identifier} running");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        if event.is_set() {
            println!("Task {identifier} stopping...");
            break;
        }
    }
    println!("Task {identifier} Done");
}

fn square(x: u32) -> u32 {
    x * x
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let event = Event::new().expect("create a shared event");
    let pool = Pool::builder().processes(4).build()?;
    let items: Vec<(u32, Event)> = (0..4).map(|i| (i, event.clone())).collect();
    let result = pool.starmap_async(task, items);
    std::thread::sleep(Duration::from_millis(500));
    println!("Safely stopping all tasks");
    event.set();
    result.wait();
    println!("All stopped");
    // The pool is still usable: no worker was killed.
    println!("reuse: {:?}", pool.map(square, 0..5)?);
    pool.close();
    pool.join()?;
    Ok(())
}
