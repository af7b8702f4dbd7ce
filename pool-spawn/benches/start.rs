//! Worker start-up latency: from asking for a worker to its first reply (`Ready`), per start
//! method, beside a bare `fork`+`_exit`+`waitpid` and a bare `fork`+`exec(/bin/true)`+`waitpid`
//! measured in the same run.
//!
//! A harness-less binary: `main` calls `pool_spawn::init()` first, so that spawned workers and
//! the fork server (re-executions of this binary) take their roles instead of benchmarking.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use pool_ipc::Duplex;
use pool_spawn::protocol::{self, FromWorker, ToWorker};
use pool_spawn::{LaunchOptions, Launcher, StartMethod};
use rustix::process::{Pid, WaitOptions};

/// One worker: launch, Setup, wait for Ready (timed); then Exit and reap (not timed).
fn start_to_ready(l: &mut Launcher, n: &mut u64) -> Duration {
    *n += 1;
    let name = format!("{}-{n}", l.method().worker_name_prefix());
    let t = Instant::now();
    let mut w = l.launch(&name).expect("launch");
    let mut chan: Duplex<ToWorker, FromWorker> = Duplex::with_config(
        w.take_channel().expect("channel"),
        protocol::channel_config(),
    )
    .expect("duplex");
    chan.send(&ToWorker::bare_setup(name)).expect("setup");
    match chan.recv().expect("reply") {
        FromWorker::Ready { .. } => {}
        other => panic!("expected Ready, got {other:?}"),
    }
    let d = t.elapsed();
    chan.send(&ToWorker::Exit).expect("exit");
    let s = w
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("worker exited");
    assert!(s.success(), "{s}");
    d
}

fn methods(c: &mut Criterion) {
    let mut g = c.benchmark_group("start_to_ready");
    for method in [
        StartMethod::Fork,
        StartMethod::Forkserver,
        StartMethod::Spawn,
    ] {
        let opts = LaunchOptions::new().allow_fork_with_threads(true);
        let mut l = Launcher::new(method, opts).expect("launcher");
        let mut n = 0;
        g.bench_function(format!("{method:?}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| start_to_ready(&mut l, &mut n)).sum())
        });
        l.shutdown().expect("shutdown");
    }
    g.finish();
}

fn reap(pid: i32) {
    let pid = Pid::from_raw(pid).expect("pid");
    rustix::process::waitpid(Some(pid), WaitOptions::empty()).expect("waitpid");
}

// The baselines call libc's `fork`, `_exit` and `execv` directly: rustix has no public
// equivalent of any of them (its `runtime` module is for libc-free programs).

/// `fork`, the child `_exit`s, the parent reaps it.
fn bare_fork() -> Duration {
    let t = Instant::now();
    // SAFETY: the child only calls `_exit` (async-signal-safe).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        // SAFETY: `_exit` has no preconditions.
        0 => unsafe { libc::_exit(0) },
        pid => reap(pid),
    }
    t.elapsed()
}

/// `fork`, the child execs `/bin/true`, the parent reaps it.
fn bare_fork_exec() -> Duration {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let t = Instant::now();
    // SAFETY: the child only calls `execv` on data prepared before the fork, then `_exit`.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            // SAFETY: `path` and `argv` are valid NUL-terminated C data that outlive the call;
            // `_exit` has no preconditions.
            unsafe {
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(127)
            }
        }
        pid => reap(pid),
    }
    t.elapsed()
}

fn baselines(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    g.bench_function("fork+_exit+waitpid", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| bare_fork()).sum())
    });
    g.bench_function("fork+exec(/bin/true)+waitpid", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| bare_fork_exec()).sum())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = baselines, methods
}

fn main() {
    pool_spawn::init();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
