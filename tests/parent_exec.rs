//! Workers end when the process that runs their pool replaces itself (`exec`) from the
//! thread that launched them: the parent-death signal follows that thread, which lives on
//! through the exec, so the only sign a worker gets is its channel closing. Checked for a
//! fresh worker and for one that has run many tasks (the latter sleeps on its page's
//! doorbell without a time limit, its channel watched by a thread of its own), under each
//! start method.
//!
//! `harness = false`: the pools must be launched from the main thread, which then execs;
//! libtest would run the test on a thread of its own (whose end at the exec fires the
//! parent-death signal and hides what this checks). libtest's command line: `no_harness`.
//!
//! Three processes: the test (a child subreaper, so that workers left behind come back to
//! it), its child, which builds the pools on its main thread, prints the workers' pids and
//! executes this program again as a reaper, and that reaper, which waits for its children
//! (the workers, zygotes and servers it inherited, and the child's seed) until none is
//! left. The test and the reaper wait for all their children, so they run without a seed
//! of their own (`PROCPOOL_SEED=0`): the test in a child of the process libtest's command
//! line started.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use procpool::{Pool, StartMethod};

const NAME: &str = "workers_end_when_their_pool_process_execs";
/// Which half this process is: unset in the test itself.
const ROLE: &str = "PROCPOOL_TEST_EXEC_ROLE";
/// Tasks run on the long-lived worker: past the point where it starts its watcher.
const TASKS: u64 = 300;
/// How long the workers may take to end once their pool's process executed.
const WITHIN: Duration = Duration::from_secs(20);

fn square(x: u64) -> u64 {
    x * x
}

fn my_pid() -> u32 {
    std::process::id()
}

mod no_harness;

fn main() {
    procpool::init();
    match std::env::var(ROLE).as_deref() {
        Ok("pools") => pools_then_exec(),
        Ok("reaper") => reap_all(),
        Ok("test") => test(),
        _ => no_harness::run(NAME, || {
            let status = Command::new(std::env::current_exe().unwrap())
                .env(ROLE, "test")
                .env("PROCPOOL_SEED", "0")
                .status()
                .unwrap();
            assert!(status.success(), "the test: {status}");
            String::new()
        }),
    }
}

/// The child: a long-lived and a fresh worker per start method, all launched from this
/// (main) thread; their pids printed; then this program again, as the reaper.
fn pools_then_exec() -> ! {
    let mut pids = Vec::new();
    let mut pools = Vec::new();
    for method in [
        StartMethod::Forkserver,
        StartMethod::Spawn,
        StartMethod::Fork,
    ] {
        let build = || {
            Pool::builder()
                .processes(1)
                .start_method(method)
                // The other pools' threads are running: not what this test is about.
                .allow_fork_with_threads(true)
                .build()
                .unwrap_or_else(|e| panic!("{method:?}: {e}"))
        };
        let long_lived = build();
        for x in 0..TASKS {
            assert_eq!(long_lived.apply(square, (x,)).unwrap(), x * x);
        }
        pids.push(long_lived.apply(my_pid, ()).unwrap());
        let fresh = build();
        pids.push(fresh.apply(my_pid, ()).unwrap());
        // Idle now, asleep on their doorbells.
        pools.push(long_lived);
        pools.push(fresh);
    }
    let line: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", line.join(" "));
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let e = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "reaper")
        .env("PROCPOOL_SEED", "0")
        .exec();
    panic!("cannot execute this program again: {e}");
}

/// The reaper: waits for every child it has (those of the process it replaced) to end.
fn reap_all() -> ! {
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(_) => {}
            Err(rustix::io::Errno::CHILD) => std::process::exit(0),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("wait: {e}"),
        }
    }
}

fn test() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "pools")
        .env_remove("PROCPOOL_SEED")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(pids) = line.strip_prefix("PIDS ") {
                let _ = tx.send(pids.to_owned());
            }
        }
    });
    let pids: Vec<u32> = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line.split(' ').map(|p| p.parse().unwrap()).collect(),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child named no workers: {e}");
        }
    };
    assert_eq!(pids.len(), 6, "{pids:?}");
    // The reaper ends once its last child ended: every worker, zygote and fork server of
    // the pools the exec left behind (or handed to this subreaper).
    let until = Instant::now() + WITHIN;
    let mut ended = None;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            ended = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s[s.rfind(')').map_or(0, |i| i + 2)..].starts_with('Z'))
    };
    let until = Instant::now() + WITHIN;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < until {
        reap_orphans();
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &left {
        if let Some(pid) = rustix::process::Pid::from_raw(p as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    if ended.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let until = Instant::now() + WITHIN;
    while Instant::now() < until && reap_orphans() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        left.is_empty(),
        "workers still running {WITHIN:?} after their pool's process executed: {left:?} \
         (of {pids:?}: long-lived and fresh, per method)"
    );
    let status = ended.expect("the reaper outlived its children's ends");
    assert!(status.success(), "the reaper: {status}");
}

/// Reaps the processes handed to this subreaper that have ended; `true` while any is left.
fn reap_orphans() -> bool {
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}
