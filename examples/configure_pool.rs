//! Configuring a pool: processes, an initializer with arguments, max tasks per child, and
//! each start method (Python's `context`).
//!
//! `cargo run --example configure_pool`
use std::sync::OnceLock;

use procpool::{Pool, StartMethod, current_process};

static GREETING: OnceLock<String> = OnceLock::new();

fn worker_init(greeting: String, times: u32) {
    let me = current_process();
    println!(
        "Initializing {} (pid {}), greeting x{times}",
        me.name(),
        me.pid()
    );
    let _ = GREETING.set(greeting.repeat(times as usize));
}

fn task(x: u32) -> String {
    let greeting = GREETING
        .get()
        .map(String::as_str)
        .unwrap_or("(no initializer ran)");
    format!("{greeting} from {} with {x}", current_process().name())
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    let default = Pool::new()?;
    println!(
        "default pool: {} processes (usable CPUs), start method {:?}",
        default.processes(),
        default.start_method()
    );
    drop(default);
    for method in [
        StartMethod::Forkserver,
        StartMethod::Spawn,
        StartMethod::Fork,
    ] {
        println!("--- start method {method:?}");
        let pool = Pool::builder()
            .processes(2)
            .initializer(worker_init, ("hi ".to_string(), 2))
            .max_tasks_per_child(5)
            .start_method(method)
            .build()?;
        for line in pool.map(task, 0..4)? {
            println!("{line}");
        }
        pool.close();
        pool.join()?;
    }
    Ok(())
}
