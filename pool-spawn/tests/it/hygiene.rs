//! What a worker inherits, what it leaves behind, and who dies with whom.

use std::time::{Duration, Instant};

use pool_spawn::task;
use pool_spawn::{ErrorKind, LaunchOptions, Launcher, Signal, StartMethod};

use crate::driver::{self, WAIT, alive, assert_dies, assert_gone, launch, launcher, opts};
use crate::tasks;
use crate::{helper, per_method};

fn worker_fds(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 1);
    w.setup();
    let fds: Vec<(i32, String)> = w.call(task::batch_ref(tasks::open_fds), ());
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(fds.len(), 4, "{method:?} worker has fds {fds:?}");
    assert_eq!(&numbers[..3], &[0, 1, 2], "{fds:?}");
    assert_eq!(fds[0].1, "/dev/null", "stdin: {fds:?}");
    assert!(fds[3].1.starts_with("socket:"), "channel: {fds:?}");
    w.exit();
}
per_method!(worker_fds, super::worker_fds);

#[test]
fn fork_refused_with_threads() {
    // libtest runs this on its own thread: the process has at least two.
    let e = Launcher::new(StartMethod::Fork, LaunchOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ForkUnsafe);
    assert!(e.to_string().contains("threads"), "{e}");
    // The explicit opt-in works.
    let l = Launcher::new(StartMethod::Fork, opts()).unwrap();
    assert_eq!(l.method(), StartMethod::Fork);
}

#[test]
fn init_not_called_child_exits() {
    // The re-executed test binary finds no such test, runs nothing and exits.
    let o = opts().test_entry("no_such_entry_in_this_binary");
    let t = Instant::now();
    let mut l = Launcher::new(StartMethod::Spawn, o.clone()).unwrap();
    let e = l.launch("SpawnPoolWorker-1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled);
    let msg = e.to_string();
    assert!(msg.contains("call procpool::init() first in main"), "{msg}");
    assert!(msg.contains("exit code 0"), "{msg}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    // The fork server is refused the same way, at Launcher::new...
    let e = Launcher::new(StartMethod::Forkserver, o.clone()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled);
    // ... or at `ready` when begun (with workers asked for ahead), and a launch tries a
    // new server, which is refused too.
    let mut l = Launcher::begin(StartMethod::Forkserver, o.initial_workers(2)).unwrap();
    let e = l.ready().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled, "{e}");
    assert!(l.launch("ForkserverPoolWorker-1").is_err());
}

#[test]
fn init_not_called_child_silent() {
    // The child runs a test that never answers: the handshake times out and the child is
    // killed and reaped.
    let o = opts()
        .test_entry("hygiene::helper_sleeps_without_init")
        .handshake_timeout(Duration::from_secs(2));
    let mut l = Launcher::new(StartMethod::Spawn, o).unwrap();
    let t = Instant::now();
    let e = l.launch("SpawnPoolWorker-1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(msg.contains("signal 9 (SIGKILL)"), "{msg}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let pid: u32 = msg
        .split("process ")
        .find_map(|s| s.split(' ').next().and_then(|n| n.parse().ok()))
        .expect("a pid in the message");
    assert_gone(pid);
}

#[test]
fn init_not_called_child_builds_a_pool() {
    // The child runs a test that, like a `main` without `init()`, goes on to start workers
    // itself: it must not act as a parent, and exits with EXIT_INIT_NOT_CALLED.
    let o = opts().test_entry("hygiene::helper_builds_launcher_without_init");
    let mut l = Launcher::new(StartMethod::Spawn, o).unwrap();
    let e = l.launch("SpawnPoolWorker-1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled, "{e}");
    let code = format!("exit code {}", pool_spawn::EXIT_INIT_NOT_CALLED);
    assert!(e.to_string().contains(&code), "{e}");
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_builds_launcher_without_init() {
    let r = Launcher::new(StartMethod::Spawn, opts());
    panic!("Launcher::new returned in a child that never entered its role: {r:?}");
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_sleeps_without_init() {
    std::thread::sleep(Duration::from_secs(90));
}

fn parent_killed(method: StartMethod) {
    let name = format!("{method:?}");
    let mut child = helper::spawn(
        "hygiene::helper_parent_dies",
        &[("POOL_SPAWN_HELPER_METHOD", &name)],
    );
    let rx = helper::lines(child.stdout.take().unwrap());
    let server = (method == StartMethod::Forkserver).then(|| {
        helper::expect_line(&rx, "SERVER ", WAIT)
            .parse::<u32>()
            .unwrap()
    });
    let worker: u32 = helper::expect_line(&rx, "WORKER ", WAIT).parse().unwrap();
    assert!(alive(worker));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_dies(worker, Duration::from_secs(10));
    if let Some(server) = server {
        assert_dies(server, Duration::from_secs(10));
    }
}
per_method!(parent_killed, super::parent_killed);

fn method_from_env() -> StartMethod {
    match std::env::var("POOL_SPAWN_HELPER_METHOD").as_deref() {
        Ok("Fork") => StartMethod::Fork,
        Ok("Spawn") => StartMethod::Spawn,
        Ok("Forkserver") => StartMethod::Forkserver,
        other => panic!("POOL_SPAWN_HELPER_METHOD = {other:?}"),
    }
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_parent_dies() {
    use std::io::Write;
    let mut l = launcher(method_from_env());
    let mut w = launch(&mut l, 1);
    w.setup();
    // Busy in a long task: only the parent-death signal can end it, not end of file.
    w.send_run(1, task::batch_ref(tasks::sleep_ms), &[(60_000u64,)]);
    if let Some(p) = l.server_pid() {
        println!("SERVER {p}");
    }
    println!("WORKER {}", w.worker.pid());
    std::io::stdout().flush().unwrap();
    // Killed by the test long before this ends.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn no_fd_leaks() {
    let mut child = helper::spawn("hygiene::helper_fd_leak", &[]);
    let rx = helper::lines(child.stdout.take().unwrap());
    helper::expect_line(&rx, "FDS OK", Duration::from_secs(120));
    assert!(helper::wait(&mut child, WAIT).success());
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_fd_leak() {
    use std::io::Write;
    let before = tasks::open_fds();
    for method in [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::Forkserver,
    ] {
        let mut l = launcher(method);
        let mut w = launch(&mut l, 1);
        w.setup();
        assert_eq!(
            w.call::<_, u64>(task::batch_ref(tasks::square), (4u64,)),
            16
        );
        w.exit();
        let mut w = launch(&mut l, 2);
        w.setup();
        w.worker.signal(Signal::KILL).unwrap();
        let pid = w.worker.pid();
        assert_eq!(w.wait().signal(), Some(9));
        drop(w);
        assert_gone(pid);
        let w = launch(&mut l, 3);
        let pid = w.worker.pid();
        drop(w);
        assert_gone(pid);
        l.shutdown().unwrap();
        let now = tasks::open_fds();
        assert_eq!(before, now, "{method:?} leaked descriptors");
    }
    println!("FDS OK");
    std::io::stdout().flush().unwrap();
}

#[test]
fn forkserver_restarts_after_losing_its_server() {
    let mut l = launcher(StartMethod::Forkserver);
    let server = l.server_pid().unwrap();
    let mut w = launch(&mut l, 1);
    w.setup();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(server as i32).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    // Its worker dies with it (PR_SET_PDEATHSIG); the status is lost with the server.
    assert_dies(w.worker.pid(), Duration::from_secs(10));
    let e = w.worker.wait_timeout(WAIT).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ServerLost, "{e}");
    // The lost server is reaped at once, not when the last handle to its workers goes.
    assert_gone(server);
    drop(w);
    // The next launch starts a new server.
    let mut w = launch(&mut l, 2);
    w.setup();
    assert_ne!(l.server_pid(), Some(server));
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(tasks::square), (6u64,)),
        36
    );
    w.exit();
    l.shutdown().unwrap();
    assert_gone(server);
}

#[test]
fn shutdown_kills_remaining_forkserver_workers() {
    let mut l = launcher(StartMethod::Forkserver);
    let server = l.server_pid().unwrap();
    let mut w = launch(&mut l, 1);
    w.setup();
    l.shutdown().unwrap();
    assert_gone(server);
    // The report arrived during shutdown.
    let s = w.wait();
    assert_eq!(s.signal(), Some(9), "{s}");
    assert_gone(w.worker.pid());
}

/// A process's children, from `/proc` (each thread lists those it forked).
fn children_of(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Waits (bounded) until the fork server has exactly one child besides `handed`: its spare.
fn the_spare(server: u32, handed: &[u32]) -> u32 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let kids: Vec<u32> = children_of(server)
            .into_iter()
            .filter(|p| !handed.contains(p))
            .collect();
        if let [spare] = kids[..] {
            return spare;
        }
        assert!(std::time::Instant::now() < deadline, "no spare: {kids:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forkserver_spare_is_handed_out_and_a_dead_spare_is_replaced() {
    let mut l = launcher(StartMethod::Forkserver);
    let server = l.server_pid().unwrap();
    let mut w1 = launch(&mut l, 1);
    w1.setup();
    // After answering, the server forks a spare for the next request.
    let spare = the_spare(server, &[w1.worker.pid()]);
    let mut w2 = launch(&mut l, 2);
    assert_eq!(w2.worker.pid(), spare, "the spare answers the next request");
    w2.setup();
    assert_eq!(
        w2.call::<_, u64>(task::batch_ref(tasks::square), (7u64,)),
        49
    );
    // Kill the next spare before anyone asks for it: the server reaps it without a
    // report, and the next request gets a working worker.
    let doomed = the_spare(server, &[w1.worker.pid(), w2.worker.pid()]);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(doomed as i32).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    assert_gone(doomed);
    let mut w3 = launch(&mut l, 3);
    w3.setup();
    assert_ne!(w3.worker.pid(), doomed);
    assert_eq!(
        w3.call::<_, u64>(task::batch_ref(tasks::square), (8u64,)),
        64
    );
    for w in [w1, w2, w3] {
        w.exit();
    }
    l.shutdown().unwrap();
    assert_gone(server);
}

/// Workers asked for with the fork server's (or zygote's) start (`initial_workers`): the
/// first launches take them in order, a launch after them asks afresh, and those never
/// taken end with the server.
#[test]
fn workers_asked_for_with_the_start_are_taken_in_order_and_the_rest_end_with_the_server() {
    for method in [StartMethod::Forkserver, StartMethod::Fork] {
        // Two asked for, three launched.
        let (mut l, server) = begun(method, 2);
        let mut ws: Vec<_> = (1..=3).map(|n| launch(&mut l, n)).collect();
        for (x, w) in (2u64..).zip(ws.iter_mut()) {
            w.setup();
            let got: u64 = w.call(task::batch_ref(tasks::square), (x,));
            assert_eq!(got, x * x, "{method:?}");
        }
        for w in ws {
            w.exit();
        }
        l.shutdown().unwrap();
        assert_gone(server);

        // Two asked for, two launched: the second request found no spare ready, by
        // design (both were sent at once), which does not make the server keep more than
        // one spare from then on.
        let (mut l, server) = begun(method, 2);
        let ws: Vec<_> = (1..=2).map(|n| launch(&mut l, n)).collect();
        let handed: Vec<u32> = ws.iter().map(|w| w.worker.pid()).collect();
        one_spare_stays(method, server, &handed);
        for mut w in ws {
            w.setup();
            w.exit();
        }
        l.shutdown().unwrap();
        assert_gone(server);

        // Three asked for, one launched: the other two are forked all the same, and end
        // with the server.
        let (mut l, server) = begun(method, 3);
        let mut w = launch(&mut l, 1);
        w.setup();
        let deadline = Instant::now() + WAIT;
        let kids = loop {
            let kids = children_of(server);
            if kids.len() >= 3 {
                break kids;
            }
            assert!(Instant::now() < deadline, "{method:?}: children {kids:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        w.exit();
        l.shutdown().unwrap();
        assert_gone(server);
        for k in kids {
            assert_gone(k);
        }
    }
}

/// With `fork_initial_here`, a Fork launcher's first initial workers are this process's
/// own children, forked with the zygote, and the zygote forks the other initial workers
/// (asked for with its start) and every later one; each runs tasks. The zygote still forks
/// its spare, once it has been asked for nothing for a moment.
#[test]
fn fork_initial_workers_are_forked_here_and_later_ones_by_the_zygote() {
    let me = std::process::id();
    for (initial, here) in [(2, 2), (1, 1), (3, 2)] {
        let o = opts().initial_workers(initial).fork_initial_here(here);
        let mut l = Launcher::begin(StartMethod::Fork, o).unwrap();
        l.ready().unwrap();
        let server = l.server_pid().unwrap();
        let mut ws: Vec<_> = (1..=initial as u32 + 1)
            .map(|n| launch(&mut l, n))
            .collect();
        let pids: Vec<u32> = ws.iter().map(|w| w.worker.pid()).collect();
        let (mine, zygotes) = (children_of(me), children_of(server));
        for (i, p) in pids.iter().enumerate() {
            assert_eq!(
                mine.contains(p),
                i < here,
                "{here}/{initial}: {pids:?}, ours {mine:?}"
            );
            assert_eq!(
                zygotes.contains(p),
                i >= here,
                "{here}/{initial}: {pids:?}, the zygote's {zygotes:?}"
            );
        }
        for (x, w) in (2u64..).zip(ws.iter_mut()) {
            w.setup();
            let got: u64 = w.call(task::batch_ref(tasks::square), (x,));
            assert_eq!(got, x * x, "{here}/{initial}");
        }
        let spare = the_spare(server, &pids[here..]);
        assert!(!pids.contains(&spare));
        for w in ws {
            w.exit();
        }
        l.shutdown().unwrap();
        assert_gone(server);
        assert_gone(spare);
    }
}

/// After a launch said to end a batch (`last_of_batch`: a pool's initial workers), the
/// fork server (and the zygote) still forks its next spare, once it has been asked for
/// nothing for a moment; a request that comes before, finding no spare, is answered by a
/// fork then, and does not make the server keep more spares from then on (it held the
/// spare back on purpose).
#[test]
fn a_spare_held_back_after_a_batch_comes_later_and_more_are_not_kept() {
    for method in [StartMethod::Forkserver, StartMethod::Fork] {
        let mut l = launcher(method);
        let server = l.server_pid().unwrap();
        let mut w1 = launch(&mut l, 1);
        w1.setup();
        let _ = the_spare(server, &[w1.worker.pid()]);
        l.last_of_batch();
        let mut w2 = launch(&mut l, 2);
        w2.setup();
        // Asked again at once: answered all the same.
        let mut w3 = launch(&mut l, 3);
        w3.setup();
        assert_eq!(
            w3.call::<_, u64>(task::batch_ref(tasks::square), (6u64,)),
            36
        );
        let handed = [w1.worker.pid(), w2.worker.pid(), w3.worker.pid()];
        // One spare comes, and one only stays: the server did not start keeping two.
        one_spare_stays(method, server, &handed);
        for w in [w1, w2, w3] {
            w.exit();
        }
        l.shutdown().unwrap();
        assert_gone(server);
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Launcher>();
    send_sync::<pool_spawn::Worker>();
    send_sync::<pool_spawn::Error>();
    send_sync::<pool_spawn::task::FnRef>();
    send_sync::<pool_spawn::protocol::ToWorker>();
    send_sync::<pool_spawn::protocol::FromWorker>();
    let _ = driver::WAIT;
}

fn survives_the_launching_thread(method: StartMethod) {
    // PR_SET_PDEATHSIG follows the thread that forked: launching from a thread that then
    // exits must not kill the worker.
    let (l, mut w) = std::thread::spawn(move || {
        let mut l = launcher(method);
        let mut w = launch(&mut l, 1);
        // Ready: the worker has armed its parent-death signal.
        w.setup();
        (l, w)
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        w.worker.try_wait().unwrap().is_none(),
        "the worker died with its launching thread"
    );
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(tasks::square), (12u64,)),
        144
    );
    w.exit();
    l.shutdown().unwrap();
}
per_method!(
    survives_the_launching_thread,
    super::survives_the_launching_thread
);

/// Starts an unrelated process that leads its own group, with pid `pid` (so group id `pid`),
/// by steering the kernel's next pid. `None` where that is not allowed (not root) or the pid
/// went elsewhere.
fn squat_pid(pid: u32) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).ok()?;
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .ok()?;
        if c.id() == pid {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// Once a worker is gone, its pid (and group id) may be reused: handles must not signal
/// that group any more: not `signal_group`, not `terminate`, not dropping the handle.
fn no_signal_to_a_reused_group(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 1);
    w.setup();
    let pid = w.worker.pid();
    w.send(&pool_spawn::protocol::ToWorker::Exit);
    w.expect_eof();
    if method != StartMethod::Forkserver {
        // A direct child holds its pid until reaped.
        w.wait();
    }
    assert_gone(pid);
    let Some(mut squatter) = squat_pid(pid) else {
        eprintln!("skipped: cannot place a process at pid {pid} (needs root)");
        return;
    };
    let e = w.worker.signal_group(Signal::KILL).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::SRCH.raw_os_error()),
        "{method:?}: {e}"
    );
    let _ = w.worker.terminate(Duration::from_millis(100));
    drop(w);
    std::thread::sleep(Duration::from_millis(100));
    let untouched = squatter.try_wait().unwrap().is_none();
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        untouched,
        "{method:?}: the process now at pid {pid} was signalled"
    );
}

per_method!(reused_group, super::no_signal_to_a_reused_group);

/// A timeout too long to represent (`Duration::MAX`) means "no limit", never a panic.
fn unbounded_timeouts(method: StartMethod) {
    let mut l = Launcher::new(method, opts().handshake_timeout(Duration::MAX)).unwrap();
    let mut w = launch(&mut l, 1);
    w.setup();
    w.send(&pool_spawn::protocol::ToWorker::Exit);
    let status = w.worker.wait_timeout(Duration::MAX).unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert!(w.worker.terminate(Duration::MAX).unwrap().success());
}

per_method!(max_timeouts, super::unbounded_timeouts);

/// A launcher begun with `workers` asked for at its start, ready, and its server's pid.
fn begun(method: StartMethod, workers: usize) -> (Launcher, u32) {
    let mut l = Launcher::begin(method, opts().initial_workers(workers)).unwrap();
    l.ready().unwrap();
    let server = l.server_pid().unwrap();
    (l, server)
}

/// Waits for the server's spare beside the workers it `handed` out, then checks for 200 ms
/// that it keeps that one and no more.
fn one_spare_stays(method: StartMethod, server: u32, handed: &[u32]) {
    let _ = the_spare(server, handed);
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        let kids = children_of(server);
        let spares = kids.iter().filter(|p| !handed.contains(p)).count();
        assert_eq!(spares, 1, "{method:?}: one spare, not more: {kids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
