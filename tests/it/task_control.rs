//! Task control: time limits that stop a task's worker, cancellation, memory limits, imap's
//! input and its async form.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use procpool::{CancelOutcome, Options, TaskErrorKind, current_process};

use crate::util::{METHODS, alive, append_line, builder, shut_down, sleep_ms, square, wait_for};

/// The time limit the tests use: short, so that they run fast.
const LIMIT: Duration = Duration::from_millis(200);
/// An upper bound for "promptly" that only a hang exceeds (the machine may be loaded).
const PROMPT: Duration = Duration::from_secs(10);

fn spin() -> u32 {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Blocks in `read` on a pipe nobody writes to.
fn read_forever() -> u32 {
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let mut buf = [0u8; 1];
    let _ = rustix::io::read(&r, &mut buf);
    0
}

/// Ignores SIGTERM (replacing the worker's own handler), then sleeps for good.
fn deaf_to_sigterm() -> u32 {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; no other thread of the
    // worker changes signal dispositions.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Starts a grandchild that ignores SIGTERM, writes its pid to `path`, and waits for it.
fn with_stubborn_child(path: String) -> u32 {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "trap '' TERM; while :; do sleep 0.05; done"])
        .spawn()
        .unwrap();
    std::fs::write(&path, child.id().to_string()).unwrap();
    let _ = child.wait();
    0
}

/// Appends `i` to the file at `path` (one line a run), then sleeps `ms`.
fn record(path: String, i: u64, ms: u64) -> u64 {
    append_line(&path, i);
    std::thread::sleep(Duration::from_millis(ms));
    i
}

/// As [`record`], but item `hang` never ends.
fn record_or_hang(path: String, i: u64, hang: u64) -> u64 {
    record(path, i, 0);
    if i == hang {
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    i
}

/// How often each item was recorded in the file at `path`.
fn runs(path: &Path) -> BTreeMap<u64, u32> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *m.entry(line.parse().unwrap()).or_default() += 1;
    }
    m
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("procpool-tc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn a_task_past_its_limit_is_stopped_the_worker_replaced_and_the_pool_goes_on() {
    for method in METHODS {
        let pool = builder(method).task_timeout(LIMIT).build().unwrap();
        let before: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
        for (what, e) in [
            ("endless loop", pool.apply(spin, ()).unwrap_err()),
            ("blocked read", pool.apply(read_forever, ()).unwrap_err()),
        ] {
            assert_eq!(e.kind(), TaskErrorKind::TimedOut, "{method:?} {what}: {e}");
            assert_eq!(e.time_limit(), Some(LIMIT));
            assert!(e.ran_for().unwrap() >= LIMIT, "{e}");
            assert!(e.function().unwrap().contains("task_control::"), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("ran past its time limit of 200.0ms"),
                "{text}"
            );
            assert!(text.contains(e.worker_name().unwrap()), "{text}");
        }
        // Stopped workers were replaced; tasks run as before.
        assert_eq!(pool.apply(square, (7,)).unwrap(), 49);
        let after: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
        assert!(
            before.iter().any(|p| !after.contains(p)),
            "{method:?}: no worker replaced"
        );
        let m = pool.metrics();
        assert_eq!(
            (m.timed_out, m.died, m.lost),
            (2, 0, 0),
            "{method:?}: {m:?}"
        );
        shut_down(pool);
    }
}

#[test]
fn a_timeout_kills_the_tasks_children_even_those_that_ignore_sigterm() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let path = scratch(&format!("child-{method:?}"));
        let started = Instant::now();
        let e = pool
            .apply_with(
                with_stubborn_child,
                (path.display().to_string(),),
                Options::new().timeout(LIMIT),
            )
            .unwrap_err();
        assert!(e.is_timeout(), "{method:?}: {e}");
        assert!(started.elapsed() < PROMPT);
        let child: u32 = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        wait_for(&format!("grandchild {child} to die"), PROMPT, || {
            !alive(child)
        });
        shut_down(pool);
    }
}

#[test]
fn a_task_that_ignores_sigterm_is_killed_after_the_grace() {
    for method in METHODS {
        let grace = Duration::from_millis(300);
        let pool = builder(method).stop_grace(grace).build().unwrap();
        let t = Instant::now();
        let e = pool
            .apply_with(deaf_to_sigterm, (), Options::new().timeout(LIMIT))
            .unwrap_err();
        assert!(e.is_timeout(), "{method:?}: {e}");
        // SIGTERM did nothing: the worker went at SIGKILL, after the grace.
        assert!(
            t.elapsed() >= LIMIT + grace,
            "{method:?}: {:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < PROMPT);
        assert_eq!(pool.apply(square, (2,)).unwrap(), 4);
        shut_down(pool);
    }
}

#[test]
fn the_clock_starts_when_the_task_begins_not_when_it_was_submitted() {
    let pool = builder(Default::default()).processes(1).build().unwrap();
    let first = pool.apply_async(sleep_ms, (300,));
    // Waits ~300 ms behind `first`, then runs 100 ms: within a 200 ms limit.
    let second = pool.apply_async_with(sleep_ms, (100,), Options::new().timeout(LIMIT));
    first.get().unwrap();
    second.get().unwrap();
    shut_down(pool);
}

#[test]
fn tasks_queued_behind_a_task_that_times_out_run_elsewhere_once() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let path = scratch(&format!("queued-{method:?}"));
        let p = path.display().to_string();
        let stuck = pool.apply_async_with(spin, (), Options::new().timeout(LIMIT));
        let rest: Vec<_> = (0..20)
            .map(|i| pool.apply_async(record, (p.clone(), i, 0)))
            .collect();
        // Bounded: `spin` never ends by itself.
        let stuck = stuck
            .get_timeout(PROMPT)
            .expect("the stuck task ends in time");
        assert!(stuck.unwrap_err().is_timeout());
        for (i, r) in rest.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), i as u64);
        }
        let runs = runs(&path);
        assert_eq!(runs.len(), 20);
        assert!(runs.values().all(|&n| n == 1), "{method:?}: {runs:?}");
        shut_down(pool);
    }
}

#[test]
fn in_a_map_the_limit_applies_to_each_item_and_only_the_one_that_overran_fails() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let path = scratch(&format!("map-{method:?}"));
        let p = path.display().to_string();
        let items = (0..1000u64).map(|i| (p.clone(), i, 537u64));
        let got: Vec<_> = pool
            .imap_with(
                |(p, i, h): (String, u64, u64)| record_or_hang(p, i, h),
                items,
                Options::new().chunksize(50).timeout(LIMIT * 2),
            )
            .collect();
        assert_eq!(got.len(), 1000);
        for (i, r) in got.iter().enumerate() {
            if i == 537 {
                let e = r.as_ref().unwrap_err();
                assert!(e.is_timeout(), "{method:?}: {e}");
                assert_eq!(e.item_index(), Some(537));
            } else {
                assert_eq!(r.as_ref().ok(), Some(&(i as u64)), "{method:?} item {i}");
            }
        }
        let runs = runs(&path);
        assert_eq!(runs.len(), 1000, "{method:?}");
        assert!(
            runs.values().all(|&n| n == 1),
            "{method:?}: an item ran twice"
        );
        // The same through `map`: the error of the item that overran.
        let e = pool
            .map_with(
                |(p, i, h): (String, u64, u64)| record_or_hang(p, i, h),
                (0..40u64).map(|i| (p.clone(), i, 7u64)),
                Options::new().timeout(LIMIT),
            )
            .unwrap_err();
        assert_eq!(
            (e.kind(), e.item_index()),
            (TaskErrorKind::TimedOut, Some(7))
        );
        shut_down(pool);
    }
}

#[test]
fn cancel_says_what_it_did_and_a_cancelled_task_never_runs() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let path = scratch(&format!("cancel-{method:?}"));
        let p = path.display().to_string();
        let running = pool.apply_async(sleep_ms, (10_000,));
        let queued = pool.apply_async(record, (p.clone(), 1, 0));
        wait_for("the long task to begin", PROMPT, || {
            pool.metrics().running >= 1
        });
        // Queued behind the running one (in the worker or the pool): it never runs.
        assert_eq!(queued.cancel(), CancelOutcome::BeforeStart, "{method:?}");
        let e = queued.get().unwrap_err();
        assert!(e.is_cancelled(), "{e}");
        std::thread::sleep(Duration::from_millis(100));
        let pid = pool.workers()[0].pid();
        let t = Instant::now();
        assert_eq!(running.cancel(), CancelOutcome::WhileRunning, "{method:?}");
        let e = running.get().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::Cancelled, "{e}");
        assert!(t.elapsed() < PROMPT);
        wait_for("the stopped worker to go", PROMPT, || !alive(pid));
        let done = pool.apply_async(square, (5,));
        assert!(done.wait_timeout(PROMPT));
        assert_eq!(done.cancel(), CancelOutcome::AlreadyFinished);
        assert_eq!(done.get().unwrap(), 25);
        assert!(runs(&path).is_empty(), "{method:?}: the cancelled task ran");
        let m = pool.metrics();
        assert_eq!(
            (m.cancelled, m.died, m.stopped),
            (2, 0, 1),
            "{method:?}: {m:?}"
        );
        shut_down(pool);
    }
}

/// Waits until a file exists at `path` (for at most 20 s), then returns 0.
fn wait_for_file(path: String) -> u32 {
    let t = Instant::now();
    while !Path::new(&path).exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
    0
}

#[test]
fn cancelling_hundreds_of_tasks_sent_to_one_worker_runs_none_of_them() {
    // A worker holding a hundred tasks (a fixed depth: the depth the pool picks follows
    // measured task times, which a loaded machine stretches) behind one that waits for a
    // file. Cancelling them marks every one of them for the worker, however many (more
    // than the 32 marks a worker once had room for): none runs.
    let depth = 100;
    let pool = builder(Default::default())
        .processes(1)
        .in_flight_per_worker(depth..=depth)
        .build()
        .unwrap();
    let gate = scratch("cancel-many-gate");
    let path = scratch("cancel-many");
    let p = path.display().to_string();
    let blocker = pool.apply_async(wait_for_file, (gate.display().to_string(),));
    let n = (depth - 2) as u64;
    let m = pool.starmap_async_with(
        record,
        (0..n).map(|i| (p.clone(), i, 0)),
        Options::new().chunksize(1),
    );
    wait_for("every task to be sent to the worker", PROMPT, || {
        pool.metrics().queued == 0
    });
    assert_eq!(m.cancel(), CancelOutcome::BeforeStart);
    assert!(m.get().unwrap_err().is_cancelled());
    std::fs::write(&gate, b"go").unwrap();
    assert_eq!(blocker.get().unwrap(), 0);
    // The worker has gone past every cancelled task once a task sent after them is done.
    assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
    let ran = runs(&path);
    assert!(ran.is_empty(), "{} of {n} cancelled tasks ran", ran.len());
    assert_eq!(pool.metrics().cancelled, n);
    shut_down(pool);
}

#[test]
fn cancelling_a_map_half_way_stops_what_runs_and_drops_the_rest() {
    let pool = builder(Default::default()).build().unwrap();
    let path = scratch("cancel-map");
    let p = path.display().to_string();
    let m = pool.starmap_async_with(
        record,
        (0..40u64).map(|i| (p.clone(), i, 100)),
        Options::new().chunksize(1),
    );
    wait_for("a few items to run", PROMPT, || runs(&path).len() >= 4);
    assert_eq!(m.cancel(), CancelOutcome::WhileRunning);
    assert!(m.get().unwrap_err().is_cancelled());
    let ran = runs(&path).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(runs(&path).len(), ran, "items ran after the cancel");
    assert!(ran < 40);
    assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
    shut_down(pool);
}

#[test]
fn dropping_an_imap_cancels_the_items_it_sent_that_have_not_begun() {
    let pool = builder(Default::default()).build().unwrap();
    let path = scratch("imap-drop");
    let p = path.display().to_string();
    let endless = (0u64..).map(move |i| (p.clone(), i, 50));
    let mut it = pool.imap(|(p, i, ms): (String, u64, u64)| record(p, i, ms), endless);
    assert_eq!(it.next().unwrap().unwrap(), 0);
    assert_eq!(it.next().unwrap().unwrap(), 1);
    drop(it);
    // What was running when it was dropped finishes; nothing else begins.
    std::thread::sleep(Duration::from_millis(500));
    let ran = runs(&path).len();
    assert!(ran < 10, "{ran} items ran for nobody (64 were sent)");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(runs(&path).len(), ran);
    assert_eq!(pool.apply(square, (4,)).unwrap(), 16);
    shut_down(pool);
}

/// An input iterator that panics after `n` items.
struct Fragile(u64, u64);

impl Iterator for Fragile {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        assert!(self.0 < self.1, "the input broke after {} items", self.1);
        self.0 += 1;
        Some(self.0 - 1)
    }
}

#[test]
fn an_imap_whose_input_panics_yields_what_was_computed_then_panics() {
    let pool = builder(Default::default()).build().unwrap();
    for ordered in [true, false] {
        let mut got = Vec::new();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let it = if ordered {
                pool.imap(square, Fragile(0, 3))
            } else {
                pool.imap_unordered(square, Fragile(0, 3))
            };
            for r in it {
                got.push(r.unwrap());
            }
        }));
        let payload = outcome.expect_err("the input's panic resumes");
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(msg.contains("broke after 3"), "{msg}");
        got.sort_unstable();
        assert_eq!(got, [0, 1, 4], "ordered: {ordered}");
    }
    shut_down(pool);
}

/// Runs `fut` to completion on this thread: the smallest executor there is.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + PROMPT;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(Instant::now() < deadline, "the future did not complete");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// Every item of `s`, awaited one by one.
async fn collect<S: futures_core::Stream + Unpin>(mut s: S) -> Vec<S::Item> {
    let mut out = Vec::new();
    while let Some(x) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut s).poll_next(cx)).await {
        out.push(x);
    }
    out
}

#[test]
fn an_imap_is_a_stream_and_a_result_a_future() {
    fn assert_send<T: Send>(_: &T) {}
    let pool = builder(Default::default()).build().unwrap();
    let stream = pool.imap(square, 0..50u64);
    assert_send(&stream);
    let got: Vec<u64> = block_on(collect(stream))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, (0..50u64).map(|x| x * x).collect::<Vec<_>>());
    let unordered = block_on(collect(pool.imap_unordered(square, 0..20u64)));
    assert_eq!(unordered.len(), 20);
    assert_eq!(block_on(pool.apply_async(square, (9,))).unwrap(), 81);
    shut_down(pool);
}

/// Keeps `mib` MiB more of touched memory alive for the rest of the worker's life.
fn leak(mib: usize) -> u32 {
    let v = vec![1u8; mib << 20];
    std::mem::forget(std::hint::black_box(v));
    current_process().pid()
}

#[test]
fn a_worker_over_its_memory_limit_is_recycled_not_counted_as_a_crash() {
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .max_memory_per_child(100 << 20)
            .build()
            .unwrap();
        let pids: Vec<u32> = (0..6).map(|_| pool.apply(leak, (50,)).unwrap()).collect();
        let m = pool.metrics();
        assert!(m.recycled_memory >= 2, "{method:?}: {m:?} {pids:?}");
        assert_eq!((m.died, m.lost), (0, 0), "{method:?}: {m:?}");
        let distinct: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
        assert!(distinct.len() >= 3, "{method:?}: {pids:?}");
        shut_down(pool);
    }
}

/// Allocates (and touches) memory without bound.
fn hog() -> u32 {
    let mut keep = Vec::new();
    loop {
        keep.push(vec![7u8; 16 << 20]);
        std::hint::black_box(&keep);
    }
}

#[test]
fn a_task_over_the_hard_memory_cap_fails_saying_so() {
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .memory_limit_per_child(256 << 20)
            .build()
            .unwrap();
        let e = pool.apply(hog, ()).unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::MemoryLimit, "{method:?}: {e}");
        assert!(e.to_string().contains("memory limit of 256 MiB"), "{e}");
        assert_eq!(pool.apply(square, (6,)).unwrap(), 36);
        shut_down(pool);
    }
}
