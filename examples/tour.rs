//! A narrated tour of procpool: the README's first command.
//!
//! `cargo run --release --example tour`
use std::time::{Duration, Instant};

use procpool::{CancelOutcome, Event, Options, Pool, StartMethod, TaskErrorKind, current_process};

fn square(x: u64) -> u64 {
    x * x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

fn whoami() -> String {
    let me = current_process();
    format!("{} (pid {})", me.name(), me.pid())
}

fn divide(a: i64, b: i64) -> i64 {
    a / b
}

fn crash() -> u8 {
    std::process::abort()
}

fn wait_for_stop(id: u32, stop: Event) -> String {
    let t = Instant::now();
    while !stop.wait_timeout(Duration::from_millis(10)) {
        if t.elapsed() > Duration::from_secs(30) {
            return format!("task {id} gave up");
        }
    }
    format!(
        "task {id} stopped after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    )
}

fn sleepy(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Starts a child process that ignores SIGTERM, then waits for it.
fn with_stubborn_child() -> u32 {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "trap '' TERM; sleep 600"])
        .spawn()
        .expect("start sh");
    let _ = child.wait();
    0
}

/// Allocates without bound.
fn hog() -> usize {
    let mut keep: Vec<Vec<u8>> = Vec::new();
    loop {
        keep.push(vec![1; 32 << 20]);
        std::hint::black_box(&keep);
    }
}

fn setup(label: String) {
    eprintln!(
        "  [initializer] {} ready: {label}",
        current_process().name()
    );
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn main() -> Result<(), procpool::Error> {
    procpool::init();
    println!("procpool tour: a process pool with the API of Python's multiprocessing.Pool");

    step("A pool of 2 workers, started by the fork server (the default)");
    let t = Instant::now();
    let pool = Pool::builder()
        .processes(2)
        .initializer(setup, ("tour".to_string(),))
        .build()?;
    println!(
        "built in {:.1} ms; workers:",
        t.elapsed().as_secs_f64() * 1e3
    );
    for w in pool.workers() {
        println!("  {} pid={}", w.name(), w.pid());
    }

    step("apply, apply_async, map, starmap");
    println!("apply(square, (7,))        = {}", pool.apply(square, (7,))?);
    println!("apply(whoami, ())          = {}", pool.apply(whoami, ())?);
    let pending = pool.apply_async(add, (40, 2));
    println!("apply_async(add, (40, 2))  = {}", pending.get()?);
    let t = Instant::now();
    let squares = pool.map(square, 0..100_000u64)?;
    println!(
        "map(square, 0..100000)     = [.., {}] in {:.1} ms",
        squares[99_999],
        t.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "starmap(add, [(1,2),(3,4)]) = {:?}",
        pool.starmap(add, vec![(1, 2), (3, 4)])?
    );

    step("imap over an endless iterator (read lazily, bounded memory)");
    let firsts: Vec<u64> = pool
        .imap(square, 1u64..)
        .take(8)
        .collect::<Result<_, _>>()?;
    println!("first 8 squares: {firsts:?}");
    let mut unordered: Vec<u64> = pool
        .imap_unordered(square, 0..10u64)
        .collect::<Result<_, _>>()?;
    unordered.sort_unstable();
    println!("imap_unordered, sorted: {unordered:?}");

    step("Callbacks");
    let r = pool.apply_async_with(
        square,
        (12,),
        Options::new().on_success(|v: &u64| println!("  callback got {v}")),
    );
    r.get()?;

    step("A panic is that task's error; the worker survives");
    let e = pool.apply(divide, (1, 0)).unwrap_err();
    println!("error: {e}");

    step("A crashing worker fails only its task and is replaced at once");
    let before: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    let t = Instant::now();
    let e = pool.apply(crash, ()).unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::WorkerLost);
    println!("error after {:.1} ms: {e}", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    while pool.workers().len() < 2 || pool.workers().iter().all(|w| before.contains(&w.pid())) {
        std::thread::sleep(Duration::from_millis(1));
        if t.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    for w in pool.workers() {
        println!("  {} pid={}", w.name(), w.pid());
    }
    println!(
        "the pool goes on: apply(square, (9,)) = {}",
        pool.apply(square, (9,))?
    );

    step("Stop running tasks safely with a shared Event; the pool stays usable");
    let stop = Event::new().expect("create the event");
    let r = pool.starmap_async(wait_for_stop, (0..2).map(|i| (i, stop.clone())));
    std::thread::sleep(Duration::from_millis(200));
    stop.set();
    for line in r.get()? {
        println!("  {line}");
    }

    step("A time limit stops the task's worker, with the processes it started");
    let t = Instant::now();
    let e = pool
        .apply_with(
            with_stubborn_child,
            (),
            Options::new().timeout(Duration::from_millis(100)),
        )
        .unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::TimedOut);
    println!("after {:.1} ms: {e}", t.elapsed().as_secs_f64() * 1e3);
    let items = pool.map_with(
        sleepy,
        [5, 5, 5, 2_000, 5, 5],
        Options::new()
            .chunksize(6)
            .timeout(Duration::from_millis(300)),
    );
    let e = items.unwrap_err();
    println!(
        "a map with a limit per item: item {:?} failed ({:?}); the others were delivered or ran elsewhere",
        e.item_index(),
        e.kind()
    );

    step("Cancel: a queued task never runs, a running one has its worker stopped");
    let running = pool.apply_async(sleepy, (10_000,));
    let other = pool.apply_async(sleepy, (10_000,));
    let queued = pool.apply_async(sleepy, (10,));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let how = running.cancel();
    assert_eq!(how, CancelOutcome::WhileRunning);
    println!(
        "running task: {how:?}, its error after {:.0} µs: {}",
        t.elapsed().as_secs_f64() * 1e6,
        running.get().unwrap_err()
    );
    println!("other running task: {:?}", other.cancel());
    println!("the queued one ran: {} ms", queued.get()?);
    let finished = pool.apply_async(square, (3,));
    finished.wait();
    println!(
        "a finished one: {:?}, its result stands: {}",
        finished.cancel(),
        finished.get()?
    );
    println!("metrics: {:?}", pool.metrics());
    pool.close();
    pool.join()?;

    step("A hard memory cap: a runaway task fails saying so, not by the OOM killer");
    let capped = Pool::builder()
        .processes(1)
        .memory_limit_per_child(256 << 20)
        .build()?;
    println!("error: {}", capped.apply(hog, ()).unwrap_err());
    println!("the pool goes on: {}", capped.apply(square, (11,))?);
    capped.close();
    capped.join()?;

    step("max_tasks_per_child = 2 under each start method: workers are recycled");
    for method in [
        StartMethod::Forkserver,
        StartMethod::Spawn,
        StartMethod::Fork,
    ] {
        let pool = Pool::builder()
            .processes(2)
            .max_tasks_per_child(2)
            .start_method(method)
            .build()?;
        let names: Vec<String> = (0..6)
            .map(|_| pool.apply_async(whoami, ()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|r| r.get())
            .collect::<Result<_, _>>()?;
        println!("{method:?}: {}", names.join(", "));
        pool.close();
        pool.join()?;
    }

    step("terminate() stops now: pending tasks fail, workers are reaped");
    let pool = Pool::builder().processes(2).build()?;
    let stuck = pool.apply_async(wait_for_stop, (9, Event::new().expect("event")));
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    pool.terminate();
    pool.join()?;
    println!(
        "terminated in {:.1} ms; the pending task: {}",
        t.elapsed().as_secs_f64() * 1e3,
        stuck.get().unwrap_err()
    );
    println!("\ntour done");
    Ok(())
}
