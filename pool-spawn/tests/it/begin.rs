//! Launches begun without waiting for a spawned worker's hello
//! (`Launcher::begin_meanwhile`): what an event loop relies on to go on while a worker
//! loads.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use pool_ipc::Duplex;
use pool_spawn::protocol;
use pool_spawn::task;
use pool_spawn::{ErrorKind, Launch, Progress, StartMethod, Starting, Worker};
use rustix::event::{PollFd, PollFlags};

use crate::driver::{Driven, WAIT, alive, assert_gone, launcher, opts};
use crate::tasks;

/// Waits up to `within` for `fd` (or `also`) to become readable.
fn readable(fd: BorrowedFd<'_>, also: Option<BorrowedFd<'_>>, within: Duration) {
    let mut fds = vec![PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    if let Some(a) = also {
        fds.push(PollFd::from_borrowed_fd(a, PollFlags::IN));
    }
    let ts = rustix::event::Timespec {
        tv_sec: within.as_secs() as _,
        tv_nsec: within.subsec_nanos() as _,
    };
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}

/// Polls a starting worker, waiting for its channel (or pidfd) in between, until it
/// answers or fails (bounded).
fn settle(mut s: Starting) -> Result<Worker, pool_spawn::Error> {
    let deadline = Instant::now() + WAIT;
    loop {
        readable(s.channel_fd(), s.exit_fd(), Duration::from_millis(100));
        match s.poll()? {
            Progress::Done(w) => return Ok(w),
            Progress::Waiting(next) => s = next,
        }
        assert!(Instant::now() < deadline, "no answer within {WAIT:?}");
    }
}

fn begin(l: &mut pool_spawn::Launcher) -> Starting {
    let mut ran = 0;
    let launch = l
        .begin_meanwhile("SpawnPoolWorker-1", || ran += 1)
        .expect("begin");
    assert_eq!(ran, 1, "`meanwhile` runs once");
    match launch {
        Launch::Starting(s) => s,
        Launch::Ready(w) => panic!("a spawn is begun, not finished: {w:?}"),
    }
}

#[test]
fn a_begun_spawn_answers_through_poll_and_runs_tasks() {
    let mut l = launcher(StartMethod::Spawn);
    let mut worker = settle(begin(&mut l)).expect("the worker answers");
    let chan = Duplex::with_config(
        worker.take_channel().expect("channel"),
        protocol::channel_config(),
    )
    .expect("duplex");
    let mut w = Driven { worker, chan };
    w.setup();
    assert_eq!(w.call::<(), u32>(task::batch_ref(tasks::answer), ()), 42);
    w.exit();
    // The other methods have nothing to wait for: their launch is finished at once.
    let mut l = launcher(StartMethod::Forkserver);
    match l.begin_meanwhile("ForkserverPoolWorker-1", || ()).unwrap() {
        Launch::Ready(mut w) => {
            let _ = w.terminate(Duration::ZERO);
        }
        Launch::Starting(_) => panic!("a fork-server launch is finished at once"),
    }
    l.shutdown().unwrap();
}

#[test]
fn a_begun_spawn_that_never_enters_its_role_fails_through_poll() {
    // The re-executed test binary finds no such test, runs nothing and exits.
    let mut l = pool_spawn::Launcher::new(
        StartMethod::Spawn,
        opts().test_entry("no_such_entry_in_this_binary"),
    )
    .unwrap();
    let e = settle(begin(&mut l)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("call procpool::init() first in main"), "{msg}");
    assert!(msg.contains("exit code 0"), "{msg}");
}

/// A start that stays silent: its pid, once the spawner has handed it over.
fn silent(l: &mut pool_spawn::Launcher) -> (Starting, u32) {
    let mut s = begin(l);
    let deadline = Instant::now() + WAIT;
    let pid = loop {
        if let Some(pid) = s.pid() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no pid within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(1));
    };
    (s, pid)
}

#[test]
fn a_silent_start_expires_killed_and_reaped() {
    let o = opts()
        .test_entry("hygiene::helper_sleeps_without_init")
        .handshake_timeout(Duration::from_millis(500));
    let mut l = pool_spawn::Launcher::new(StartMethod::Spawn, o).unwrap();
    let (mut s, pid) = silent(&mut l);
    assert!(alive(pid));
    while Instant::now() < s.deadline() {
        readable(s.channel_fd(), s.exit_fd(), Duration::from_millis(100));
        s = match s.poll().expect("silent, not failed") {
            Progress::Waiting(s) => s,
            Progress::Done(w) => panic!("a silent child answered: {w:?}"),
        };
    }
    let e = s.expire();
    assert_eq!(e.kind(), ErrorKind::InitNotCalled, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(msg.contains("signal 9 (SIGKILL)"), "{msg}");
    assert!(msg.contains(&pid.to_string()), "{msg}");
    assert_gone(pid);
}

#[test]
fn dropping_a_start_kills_and_reaps_it() {
    let o = opts().test_entry("hygiene::helper_sleeps_without_init");
    let mut l = pool_spawn::Launcher::new(StartMethod::Spawn, o).unwrap();
    let (s, pid) = silent(&mut l);
    assert!(alive(pid));
    drop(s);
    assert_gone(pid);
}
