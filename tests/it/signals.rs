//! A program holding a busy pool gets SIGINT or SIGTERM: with the default handlers it dies
//! and its workers and fork server die with it (parent-death signal); with a handler that
//! drops the pool, the drop terminates and reaps every worker and the fork server before
//! the program exits.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use procpool::StartMethod;

use crate::util::{METHODS, builder, sleep_ms, wait_child, wait_for};

/// The processes descended from `root` (not `root` itself).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: the fields follow the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// True while `pid` is a live process (a zombie waiting for init to reap it is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Helper run in a child process: a pool with two busy workers; prints the pids of every
/// process it started, then waits for a signal. With `PROCPOOL_TEST_HANDLER=drop` a
/// SIGTERM handler sets a flag, and the main thread drops the pool and reports.
#[test]
#[ignore = "helper: run via re-exec"]
fn busy_pool_child() {
    let method = match std::env::var("PROCPOOL_TEST_METHOD").as_deref() {
        Ok("Spawn") => StartMethod::Spawn,
        Ok("Fork") => StartMethod::Fork,
        _ => StartMethod::Forkserver,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if std::env::var("PROCPOOL_TEST_HANDLER").as_deref() == Ok("drop") {
        signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
    }
    let pool = builder(method).processes(2).build().unwrap();
    let busy: Vec<_> = (0..2)
        .map(|_| pool.apply_async(sleep_ms, (60_000,)))
        .collect();
    wait_for("both workers busy", Duration::from_secs(10), || {
        pool.metrics().running == 2
    });
    let mine = descendants(std::process::id());
    let list: Vec<String> = mine.iter().map(u32::to_string).collect();
    println!("PIDS {}", list.join(" "));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no signal came");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    drop(pool);
    let took = t.elapsed();
    let left = mine.iter().filter(|&&p| running(p)).count();
    println!("DROPPED {} us, {left} left", took.as_micros());
    assert!(busy.into_iter().all(|r| r.get().is_err()));
}

/// Runs the helper under `method`, sends it `signal` once its pool is busy; returns the
/// helper's processes, its exit status, what it printed after the signal, and how long
/// after the signal its last process was gone.
fn signal_busy_child(
    method: StartMethod,
    signal: rustix::process::Signal,
    handler: bool,
) -> (Vec<u32>, std::process::ExitStatus, String, Duration) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "signals::busy_pool_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PROCPOOL_TEST_METHOD", format!("{method:?}"))
        .env(
            "PROCPOOL_TEST_HANDLER",
            if handler { "drop" } else { "default" },
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its lines come through a thread, so that each wait for one has a deadline.
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let pids: Vec<u32> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{method:?}: the child ended or hung before its pool was busy");
        };
        // libtest may have written "test NAME ... " before it on the line.
        if let Some((_, list)) = line.trim().split_once("PIDS ") {
            break list
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        }
    };
    // Two workers, and under Forkserver and Fork the fork server (and its spare).
    assert!(pids.len() >= 2, "{method:?}: got {pids:?}");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let sent = Instant::now();
    rustix::process::kill_process(pid, signal).unwrap();
    let what = format!("{method:?}: the child, sent {signal:?},");
    let status = wait_child(&mut child, Duration::from_secs(10), &what);
    wait_for(
        "every process of the child to be gone",
        Duration::from_secs(5),
        || pids.iter().all(|&p| !running(p)),
    );
    let gone = sent.elapsed();
    let mut rest = String::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        rest.push_str(&line);
        rest.push('\n');
    }
    (pids, status, rest, gone)
}

/// With the default handlers, SIGTERM and SIGINT end the program at once, and every worker
/// and the fork server die with it: none is left behind.
#[test]
fn a_program_killed_by_sigterm_or_sigint_leaves_no_process_behind() {
    use std::os::unix::process::ExitStatusExt;
    for method in METHODS {
        for signal in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
            let (pids, status, _, gone) = signal_busy_child(method, signal, false);
            assert_eq!(
                status.signal(),
                Some(signal.as_raw()),
                "{method:?}: {status:?}"
            );
            println!(
                "{method:?} {signal:?}: {} processes gone {:.1} ms after the signal",
                pids.len(),
                gone.as_secs_f64() * 1e3
            );
        }
    }
}

/// With a SIGTERM handler that drops the pool, the drop fails the running tasks, stops and
/// reaps both workers and the fork server, and the program exits normally.
#[test]
fn a_sigterm_handler_that_drops_the_pool_stops_it_in_order() {
    for method in METHODS {
        let (pids, status, rest, gone) =
            signal_busy_child(method, rustix::process::Signal::TERM, true);
        assert!(status.success(), "{method:?}: {status:?}: {rest}");
        let report = rest
            .lines()
            .find_map(|l| l.split_once("DROPPED ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("{method:?}: the child did not drop its pool: {rest}"));
        assert!(report.ends_with(", 0 left"), "{method:?}: {report}");
        println!(
            "{method:?}: drop took {report}; {} processes gone {:.1} ms after the signal",
            pids.len(),
            gone.as_secs_f64() * 1e3
        );
    }
}
