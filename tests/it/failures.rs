//! Failures: panics, dead workers, encoding errors. Each is that task's error, the pool goes on.

use std::time::{Duration, Instant};

use procpool::{Options, TaskErrorKind, current_process};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::util::{
    METHODS, alive, append_line, builder, kill_new_workers, my_pid, parent_of, shut_down, square,
    stopped, wait_for,
};

pub(crate) fn boom(x: u32) -> u32 {
    if x > 0 {
        panic!("boom at {x}");
    }
    x
}

fn die_by_signal(_x: u32) -> u32 {
    std::process::abort()
}

fn exit_with(code: i32) -> u32 {
    std::process::exit(code)
}

fn exit_zero() -> u32 {
    std::process::exit(0)
}

fn hang_then_pid(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    current_process().pid()
}

#[test]
fn a_panic_is_that_tasks_error_and_the_worker_survives() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let before = pool.apply(my_pid, ()).unwrap();
        let e = pool.apply(boom, (3,)).unwrap_err();
        assert!(e.is_panic(), "{method:?}: {e}");
        assert!(e.panic_message().unwrap().contains("boom at 3"), "{e}");
        assert_eq!(e.pid(), Some(before));
        assert!(e.to_string().contains("task panicked"), "{e}");
        assert_eq!(
            pool.apply(my_pid, ()).unwrap(),
            before,
            "same worker survived"
        );
        // In a map, the first failing item is named.
        let e = pool.map(boom, vec![0, 0, 5, 6]).unwrap_err();
        assert_eq!(e.item_index(), Some(2), "{e}");
        let per_item: Vec<_> = pool.imap(boom, vec![0u32, 1, 0]).collect();
        assert!(per_item[0].is_ok() && per_item[1].is_err() && per_item[2].is_ok());
        shut_down(pool);
    }
}

#[test]
fn a_dead_worker_fails_its_task_with_pid_and_signal_and_is_replaced() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let started = Instant::now();
        let e = pool.apply(die_by_signal, (1,)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        assert_eq!(e.signal(), Some(6), "{e}");
        let pid = e.pid().expect("the error names the pid");
        assert!(e.to_string().contains("SIGABRT"), "{e}");
        assert!(e.to_string().contains(&pid.to_string()), "{e}");
        wait_for("the replacement", Duration::from_secs(10), || {
            let w = pool.workers();
            w.len() == 2 && w.iter().all(|w| w.pid() != pid)
        });
        assert!(!alive(pid), "{method:?}: the dead worker was reaped");
        let e = pool.apply(exit_with, (3,)).unwrap_err();
        assert_eq!(e.exit_code(), Some(3), "{e}");
        let e = pool.apply(exit_zero, ()).unwrap_err();
        assert_eq!(
            e.kind(),
            TaskErrorKind::WorkerLost,
            "exit(0) mid-task is a loss: {e}"
        );
        assert_eq!(pool.map(square, 0..20u64).unwrap().len(), 20);
        assert_eq!(pool.metrics().died, 3);
        shut_down(pool);
    }
}

#[test]
fn killing_a_busy_worker_fails_only_its_tasks() {
    let pool = builder(Default::default()).build().unwrap();
    let victim = pool.apply_async(hang_then_pid, (5_000,));
    let bystander = pool.apply_async(hang_then_pid, (300,));
    std::thread::sleep(Duration::from_millis(100));
    // Find the worker running the long task: the one whose pid the bystander is not.
    let workers = pool.workers();
    assert_eq!(workers.len(), 2);
    let by_pid = bystander.get().unwrap();
    let target = workers.iter().find(|w| w.pid() != by_pid).unwrap().pid();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(target as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let t = Instant::now();
    let e = victim.get().unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "event-driven, not the task's 5s"
    );
    assert_eq!(e.signal(), Some(9));
    assert!(e.to_string().contains("SIGKILL"), "{e}");
    assert_eq!(pool.apply(square, (4,)).unwrap(), 16);
    shut_down(pool);
}

/// Starts `sleep 60` holding inheritable copies of every socket this worker has open (its
/// channel to the pool among them), writes the sleeper's pid to `path`, then hangs: when
/// the worker dies, its channel does not end.
fn hang_holding_the_channel(path: String) -> u32 {
    let mut copies = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("socket:") {
            let n: i32 = entry.file_name().to_string_lossy().parse().unwrap();
            // SAFETY: `n` was just listed in /proc/self/fd, and nothing in this task closes
            // it while it is borrowed for the `dup`.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
            // Without close-on-exec: the sleeper inherits it.
            copies.push(rustix::io::dup(fd).unwrap());
        }
    }
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(&path, child.id().to_string()).unwrap();
    let _ = child.wait();
    0
}

/// `apply` waits on its worker itself (the answer wakes only the caller): a worker killed
/// meanwhile whose channel stays open (a grandchild holds it) still fails the call at once,
/// with the signal, and the pool goes on.
#[test]
fn an_apply_whose_dead_worker_leaves_its_channel_open_fails_at_once() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        // A ready worker: the call below waits on it, not on the pool.
        assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
        let path = std::env::temp_dir().join(format!(
            "procpool-held-channel-{}-{method:?}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let arg = path.display().to_string();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.apply(hang_holding_the_channel, (arg.clone(),)));
            wait_for("the sleeper's pid", Duration::from_secs(10), || {
                std::fs::read_to_string(&path).is_ok_and(|t| !t.is_empty())
            });
            let worker = pool.workers()[0].pid();
            let t = Instant::now();
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(worker as i32).unwrap(),
                rustix::process::Signal::KILL,
            )
            .unwrap();
            let e = waiter.join().unwrap().unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(3), "{method:?}: {e}");
            assert_eq!(e.signal(), Some(9), "{method:?}: {e}");
        });
        let sleeper: i32 = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(sleeper).unwrap(),
            rustix::process::Signal::KILL,
        );
        wait_for("the sleeper to die", Duration::from_secs(10), || {
            !alive(sleeper as u32)
        });
        let _ = std::fs::remove_file(&path);
        assert_eq!(pool.apply(square, (4,)).unwrap(), 16, "{method:?}");
        shut_down(pool);
    }
}

/// A value whose encoding always fails.
#[derive(Debug)]
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this value refuses to be encoded",
        ))
    }
}

impl<'de> Deserialize<'de> for Unencodable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("never decoded"))
    }
}

fn take(_u: Unencodable) -> u8 {
    1
}

/// A result that encodes in the worker but refuses to decode in the parent.
#[derive(Debug)]
struct Undecodable;

impl Serialize for Undecodable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(1)
    }
}

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("this value refuses to be decoded"))
    }
}

fn give() -> Undecodable {
    Undecodable
}

fn give_unencodable() -> Unencodable {
    Unencodable
}

/// Encodes only when its flag is true.
#[derive(Debug)]
struct Picky(bool);

impl Serialize for Picky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 {
            s.serialize_bool(true)
        } else {
            Err(serde::ser::Error::custom("picky value refuses"))
        }
    }
}

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bool::deserialize(d).map(Picky)
    }
}

fn picky(p: Picky) -> u8 {
    u8::from(p.0)
}

/// Its `Deserialize` panics: in the pool's process, when a result comes back.
#[derive(Debug)]
struct PanicsOnDecode;

impl Serialize for PanicsOnDecode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for PanicsOnDecode {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("this type never decodes")
    }
}

fn give_panicky() -> PanicsOnDecode {
    PanicsOnDecode
}

fn give_panicky_item(_: u8) -> PanicsOnDecode {
    PanicsOnDecode
}

/// Encodes as its byte; refuses to decode 0 (and panics decoding 255), in the worker.
#[derive(Debug)]
struct Fussy(u8);

impl Serialize for Fussy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for Fussy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Err(serde::de::Error::custom("zero is refused")),
            255 => panic!("255 is unbearable"),
            v => Ok(Fussy(v)),
        }
    }
}

fn fussy(f: Fussy) -> u8 {
    f.0
}

/// An argument that does not decode in the worker fails that item, with its own index; the
/// items before it in the chunk run; the ones after it fail saying why.
#[test]
fn an_argument_that_does_not_decode_fails_its_own_item() {
    let pool = builder(Default::default()).build().unwrap();
    for bad in [0u8, 255] {
        let items = vec![Fussy(1), Fussy(2), Fussy(bad), Fussy(4)];
        let got: Vec<_> = pool
            .imap_with(fussy, items, Options::new().chunksize(4))
            .collect();
        assert_eq!(got[0].as_ref().unwrap(), &1);
        assert_eq!(got[1].as_ref().unwrap(), &2);
        let e = got[2].as_ref().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::Decode, "{e}");
        assert_eq!(e.item_index(), Some(2), "{e}");
        // postcard keeps no message of a custom decoding error; a panic keeps its own.
        let why = if bad == 0 {
            "cannot be decoded"
        } else {
            "255 is unbearable"
        };
        assert!(e.to_string().contains(why), "{e}");
        let e = got[3].as_ref().unwrap_err();
        assert_eq!(e.item_index(), Some(3), "{e}");
        assert!(e.to_string().contains("earlier item"), "{e}");
        assert!(!e.to_string().contains(why), "{e}");
    }
    // `map` names the first failing item.
    let e = pool.map(fussy, vec![Fussy(3), Fussy(0)]).unwrap_err();
    assert_eq!(e.item_index(), Some(1), "{e}");
    shut_down(pool);
}

#[test]
fn encoding_and_decoding_failures_are_that_tasks_error() {
    let pool = builder(Default::default()).build().unwrap();
    let e = pool.apply(take, (Unencodable,)).unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::Encode, "{e}");
    assert!(e.to_string().contains("arguments cannot be encoded"), "{e}");
    // The type's own words, which postcard drops, are recovered.
    assert!(
        e.to_string().contains("this value refuses to be encoded"),
        "{e}"
    );
    let e = pool.apply(give, ()).unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::Decode, "{e}");
    let e = pool.apply(give_unencodable, ()).unwrap_err();
    assert_eq!(
        e.kind(),
        TaskErrorKind::Encode,
        "result encoding in the worker: {e}"
    );
    assert!(
        e.to_string().contains("this value refuses to be encoded"),
        "{e}"
    );
    // Only the item that cannot be encoded fails; its chunk-mates run.
    let items = vec![Picky(true), Picky(false), Picky(true)];
    let got: Vec<_> = pool
        .imap_with(picky, items, Options::new().chunksize(3))
        .collect();
    assert_eq!(got[0].as_ref().unwrap(), &1);
    assert_eq!(got[1].as_ref().unwrap_err().kind(), TaskErrorKind::Encode);
    assert_eq!(got[1].as_ref().unwrap_err().item_index(), Some(1));
    let e = got[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("picky value refuses"), "{e}");
    assert_eq!(got[2].as_ref().unwrap(), &1);
    // A result whose decoding panics (in this process) fails that task only.
    let e = pool
        .apply_async(give_panicky, ())
        .get_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::Decode, "{e}");
    assert!(e.to_string().contains("this type never decodes"), "{e}");
    let e = pool
        .map_async(give_panicky_item, 0..10u8)
        .get_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::Decode, "{e}");
    assert_eq!(pool.apply(square, (5,)).unwrap(), 25);
    shut_down(pool);
}

#[test]
fn tasks_queued_behind_a_killed_worker_run_elsewhere() {
    // One worker holds the hanging task and the quick one queued behind it; killing it fails
    // only the running task, and the queued one completes on the replacement.
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let first = pool.apply(my_pid, ()).unwrap();
        let running = pool.apply_async(hang_then_pid, (10_000,));
        let queued = pool.apply_async(square, (12,));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !queued.ready(),
            "{method:?}: queued behind the hanging task"
        );
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(first as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let e = running
            .get_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        assert_eq!(e.pid(), Some(first));
        assert_eq!(
            queued
                .get_timeout(Duration::from_secs(10))
                .unwrap()
                .unwrap(),
            144
        );
        let m = pool.metrics();
        assert_eq!((m.lost, m.died), (1, 1), "{method:?}: {m:?}");
        shut_down(pool);
    }
}

fn slow_start(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn tasks_sent_to_a_worker_that_dies_while_starting_run_on_its_replacement() {
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .initializer(slow_start, (400,))
            .build()
            .unwrap();
        // Sent at once to the only worker, which is still in its initializer.
        let pending: Vec<_> = (0..3u64).map(|i| pool.apply_async(square, (i,))).collect();
        let mut pid = None;
        wait_for("the starting worker's pid", Duration::from_secs(10), || {
            pid = pool.workers().first().map(|w| w.pid());
            pid.is_some()
        });
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid.unwrap() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        for (i, r) in pending.into_iter().enumerate() {
            let v = r.get_timeout(Duration::from_secs(15)).unwrap().unwrap();
            assert_eq!(v, (i * i) as u64, "{method:?}");
        }
        let m = pool.metrics();
        assert_eq!(m.lost, 0, "{method:?}: nothing it held had started: {m:?}");
        assert_eq!(m.start_failures, 1, "{method:?}: {m:?}");
        shut_down(pool);
    }
}

fn failing_init() {
    panic!("the database is gone");
}

/// A pool whose initializer always fails breaks after a few starts: every task, pending or
/// later, fails with `InitializerFailed` naming the cause, and close + join return.
#[test]
fn a_failing_initializer_fails_every_task_and_join_returns() {
    // Generous: with RUST_BACKTRACE set, each failing worker symbolizes its panic's
    // backtrace (slow in a debug test binary on a loaded machine) before it reports.
    const T: Duration = Duration::from_secs(60);
    for method in METHODS {
        for processes in [1, 3] {
            let pool = builder(method)
                .processes(processes)
                .initializer(failing_init, ())
                .build()
                .unwrap();
            let pending: Vec<_> = (0..12u64).map(|i| pool.apply_async(square, (i,))).collect();
            let mapped = pool.map_async(square, 0..40u64);
            for (i, r) in pending.into_iter().enumerate() {
                let e = r.get_timeout(T).unwrap().unwrap_err();
                assert_eq!(
                    e.kind(),
                    TaskErrorKind::InitializerFailed,
                    "{method:?} processes={processes} task {i}: {e}"
                );
                assert!(e.to_string().contains("the database is gone"), "{e}");
            }
            let e = mapped.get_timeout(T).unwrap().unwrap_err();
            assert_eq!(e.kind(), TaskErrorKind::InitializerFailed, "{e}");
            let e = pool.apply(square, (1,)).unwrap_err();
            assert_eq!(e.kind(), TaskErrorKind::InitializerFailed, "{e}");
            pool.close();
            pool.join_timeout(T).unwrap();
        }
    }
}

/// Fails (panics) the first time it runs with `path`, which it creates; succeeds after.
fn fail_first_start(path: String) {
    let first = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .is_ok();
    if first {
        panic!("the first start fails");
    }
}

/// The first `apply` on a new pool goes to a worker that has not said `Ready` yet, whose
/// answers its caller reads itself: when that worker's setup fails, the task runs once, on
/// the replacement, and the caller gets its result; when the initializer takes a while, the
/// caller waits through it.
#[test]
fn the_first_apply_outlives_a_failed_first_start_and_runs_once() {
    for method in METHODS {
        let dir = std::env::temp_dir();
        let tag = format!("{}-{method:?}", std::process::id());
        let flag = dir.join(format!("procpool-first-start-{tag}"));
        let runs = dir.join(format!("procpool-first-runs-{tag}"));
        let (flag, runs) = (
            flag.to_string_lossy().into_owned(),
            runs.to_string_lossy().into_owned(),
        );
        let _ = std::fs::remove_file(&flag);
        let _ = std::fs::remove_file(&runs);
        let pool = builder(method)
            .processes(1)
            .initializer(fail_first_start, (flag.clone(),))
            .build()
            .unwrap();
        assert_eq!(pool.apply(record_run, (runs.clone(), 7)).unwrap(), 7);
        let m = pool.metrics();
        assert_eq!(m.start_failures, 1, "{method:?}: {m:?}");
        let text = std::fs::read_to_string(&runs).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["7"],
            "{method:?}: ran once"
        );
        shut_down(pool);
        let _ = std::fs::remove_file(&flag);
        let _ = std::fs::remove_file(&runs);

        let pool = builder(method)
            .processes(1)
            .initializer(slow_start, (300,))
            .build()
            .unwrap();
        assert_eq!(pool.apply(square, (9,)).unwrap(), 81, "{method:?}");
        shut_down(pool);
    }
}

/// Appends `i` to the file `path`; exits with code 3 when `i` is 10.
fn record_run(path: String, i: u64) -> u64 {
    append_line(&path, i);
    if i == 10 {
        std::process::exit(3);
    }
    i
}

/// A worker that dies after finishing tasks sent to it together with the fatal one: the
/// finished tasks keep their results, only the task it was running fails, and no task runs
/// twice.
#[test]
fn a_dead_worker_blames_only_the_task_it_was_running_and_reruns_nothing() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        // Tiny tasks deepen the worker's queue, so the eleven below go out together.
        pool.map_with(square, 0..3000u64, Options::new().chunksize(1))
            .unwrap();
        let path = std::env::temp_dir()
            .join(format!("procpool-runs-{}-{method:?}", std::process::id()))
            .to_string_lossy()
            .into_owned();
        let _ = std::fs::remove_file(&path);
        let pending: Vec<_> = (0..12u64)
            .map(|i| pool.apply_async(record_run, (path.clone(), i)))
            .collect();
        let results: Vec<_> = pending
            .into_iter()
            .map(|r| r.get_timeout(Duration::from_secs(20)).expect("in time"))
            .collect();
        for (i, r) in results.iter().enumerate() {
            if i == 10 {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
                assert_eq!(e.exit_code(), Some(3), "{method:?}: {e}");
            } else {
                assert_eq!(
                    r.as_ref().ok(),
                    Some(&(i as u64)),
                    "{method:?} task {i}: {r:?}"
                );
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut runs = std::collections::BTreeMap::<u64, usize>::new();
        for l in text.lines() {
            *runs.entry(l.parse().unwrap()).or_default() += 1;
        }
        assert_eq!(runs.len(), 12, "{method:?}: every task ran: {runs:?}");
        assert!(
            runs.values().all(|&n| n == 1),
            "{method:?}: ran twice: {runs:?}"
        );
        shut_down(pool);
    }
}

fn byte_len(b: serde_bytes::ByteBuf) -> usize {
    b.len()
}

/// Arguments over the 1 GiB message limit fail as `Encode` in this process; no worker is
/// sent them, none dies.
#[test]
fn arguments_over_the_message_limit_are_an_encode_error() {
    let pool = builder(Default::default()).processes(1).build().unwrap();
    let before = pool.workers()[0].pid();
    let huge = serde_bytes::ByteBuf::from(vec![0u8; (1 << 30) + 1]);
    let e = pool.apply(byte_len, (huge,)).unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::Encode, "{e}");
    assert!(e.to_string().contains("over the limit"), "{e}");
    assert_eq!(
        pool.apply(my_pid, ()).unwrap(),
        before,
        "the worker lives on"
    );
    assert_eq!(pool.metrics().died, 0);
    shut_down(pool);
}

/// Workers killed from outside while in their initializer (an operator, the OOM killer) are
/// replaced like any other: a few such deaths do not break the pool.
#[test]
fn workers_killed_in_their_initializer_are_replaced() {
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .initializer(slow_start, (300,))
            .build()
            .unwrap();
        // Each 50 ms after it appears: well inside its 300 ms initializer.
        kill_new_workers(
            &pool,
            method,
            3,
            Duration::from_millis(50),
            Duration::from_secs(20),
        );
        let r = pool
            .apply_async(square, (7,))
            .get_timeout(Duration::from_secs(20));
        assert_eq!(r.unwrap().unwrap(), 49, "{method:?}");
        shut_down(pool);
    }
}

/// A task submitted right after an idle worker was killed, before the pool noticed, never
/// reached that worker: it runs on the replacement instead of failing.
#[test]
fn a_task_sent_just_after_an_idle_worker_died_runs_elsewhere() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        for round in 0..15 {
            let pid = pool.apply(my_pid, ()).unwrap();
            let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
            rustix::process::kill_process(p, rustix::process::Signal::KILL).unwrap();
            if round % 3 == 1 {
                // Also after the process is surely gone, not only right away.
                wait_for("the killed worker to die", Duration::from_secs(10), || {
                    !alive(pid)
                });
            }
            let r = pool
                .apply_async(square, (round,))
                .get_timeout(Duration::from_secs(20));
            assert_eq!(
                r.unwrap().unwrap(),
                round * round,
                "{method:?} round {round}"
            );
        }
        shut_down(pool);
    }
}

/// A pool whose workers are all gone already when it is closed (here: its initializer broke
/// it) still finishes: join returns.
#[test]
fn closing_a_pool_with_no_worker_left_lets_join_return() {
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .initializer(failing_init, ())
            .build()
            .unwrap();
        let e = pool
            .apply_async(square, (1,))
            .get_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::InitializerFailed, "{e}");
        wait_for("every worker gone", Duration::from_secs(60), || {
            pool.workers().is_empty()
        });
        // Let the pool thread go back to sleep with nothing to watch.
        std::thread::sleep(Duration::from_millis(50));
        pool.close();
        pool.join_timeout(Duration::from_secs(20)).unwrap();
    }
}

/// What an error reporter prints (anyhow, eyre): the error, then each `source()` below it.
fn report(e: &dyn std::error::Error) -> String {
    let mut out = format!("Error: {e}");
    let mut next = e.source();
    if next.is_some() {
        out.push_str("\n\nCaused by:");
    }
    while let Some(cause) = next {
        out.push_str(&format!("\n    {cause}"));
        next = cause.source();
    }
    out
}

#[test]
fn the_fork_refusal_names_each_cause_once_and_the_pools_own_option() {
    // A parked thread makes the process threaded whichever thread the harness runs us on.
    let (keep, parked) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || parked.recv());
    let built = procpool::Pool::builder()
        .start_method(procpool::StartMethod::Fork)
        .build();
    drop(keep);
    let _ = thread.join();
    let e = built.expect_err("Fork in a threaded process is refused");
    assert_eq!(e.kind(), procpool::BuildErrorKind::Start);
    // As `main` returning `Result<(), Box<dyn Error>>` gets it, through `?`.
    let boxed: Box<dyn std::error::Error> = Box::new(procpool::Error::from(e));
    let chain = report(&*boxed);
    println!("{chain}\n\nmain prints (Debug): Error: {boxed:?}");
    for once in [
        "the pool cannot fork its workers",
        "PoolBuilder::allow_fork_with_threads(true)",
        "refusing to fork",
        "threads, and a lock one of them holds",
    ] {
        assert_eq!(chain.matches(once).count(), 1, "{once:?} in:\n{chain}");
        // `main` itself prints the Debug form, a dump of the fields: nothing twice there.
        let debug = format!("{boxed:?}");
        assert!(debug.matches(once).count() <= 1, "{once:?} in:\n{debug}");
    }
    assert!(!chain.contains("LaunchOptions"), "{chain}");
    assert_eq!(
        chain.lines().filter(|l| !l.is_empty()).count(),
        3,
        "{chain}"
    );
}

/// Item 0 aborts its worker; the others return their pid.
fn abort_at_zero(x: u32) -> u32 {
    if x == 0 {
        std::process::abort();
    }
    x
}

/// A chunk whose first item kills its worker: only that item fails; the rest of the chunk
/// never began and runs on the replacement (all of it failed, found by the torture test).
#[test]
fn a_chunk_whose_first_item_kills_its_worker_fails_only_that_item() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let got: Vec<_> = pool
            .imap_with(
                abort_at_zero,
                [1, 2, 3, 0, 4, 5],
                Options::new().chunksize(3),
            )
            .collect();
        assert_eq!(got.len(), 6);
        let e = got[3].as_ref().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        assert_eq!(e.item_index(), Some(3), "{method:?}: {e}");
        for (k, want) in [(0, 1), (1, 2), (2, 3), (4, 4), (5, 5)] {
            assert_eq!(
                got[k].as_ref().ok(),
                Some(&want),
                "{method:?}: item {k}: {got:?}"
            );
        }
        shut_down(pool);
    }
}

#[test]
fn a_task_whose_fork_server_died_says_so() {
    let pool = builder(procpool::StartMethod::Forkserver)
        .processes(1)
        .build()
        .unwrap();
    let worker = pool.apply(my_pid, ()).unwrap();
    let server = parent_of(worker);
    let running = pool.apply_async(hang_then_pid, (60_000,));
    // Killed before its worker began it, the task would rightly run again on a replacement
    // (and sleep its minute): wait until the worker has begun it.
    crate::util::wait_for("the task to begin", Duration::from_secs(10), || {
        pool.workers().iter().any(|w| w.current_task().is_some())
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(server as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let e = running
        .get_timeout(Duration::from_secs(20))
        .expect("the task ends in time")
        .unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{e}");
    assert!(e.to_string().contains("fork server"), "{e}");
    // A new fork server takes over.
    assert_eq!(pool.apply(square, (5,)).unwrap(), 25);
    shut_down(pool);
}

/// Appends `i` to the file `path`, then takes a moment.
fn note_run(path: String, i: u64) -> u64 {
    append_line(&path, i);
    // Long enough for kills to land mid-task now and then.
    std::thread::sleep(Duration::from_micros(300));
    i * 2
}

/// Threads calling `apply` (each waits on its worker's socket itself) while workers are
/// killed under them: every call returns, with its value or the worker's death, and no task
/// runs twice; the ones that returned a value ran exactly once.
#[test]
fn concurrent_applies_survive_workers_killed_under_them() {
    const THREADS: u64 = 3;
    const CALLS: u64 = 150;
    let pool = builder(Default::default()).processes(2).build().unwrap();
    assert_eq!(pool.apply(square, (2,)).unwrap(), 4);
    let path = std::env::temp_dir()
        .join(format!("procpool-applies-{}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let _ = std::fs::remove_file(&path);
    let done = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let (outcomes, kills) = std::thread::scope(|s| {
        for t in 0..THREADS {
            let (pool, path, tx, done) = (&pool, path.clone(), tx.clone(), &done);
            s.spawn(move || {
                let mut got = Vec::new();
                for c in 0..CALLS {
                    let i = t * CALLS + c;
                    got.push((i, pool.apply(note_run, (path.clone(), i))));
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tx.send(got).unwrap();
            });
        }
        drop(tx);
        let killer = s.spawn(|| {
            let mut kills = 0;
            while done.load(std::sync::atomic::Ordering::SeqCst) < THREADS {
                std::thread::sleep(Duration::from_millis(8));
                if let Some(w) = pool
                    .workers()
                    .into_iter()
                    .find(|w| w.current_task().is_some())
                {
                    let pid = rustix::process::Pid::from_raw(w.pid() as i32).unwrap();
                    if rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok() {
                        kills += 1;
                    }
                }
            }
            kills
        });
        // Bounded: a call that never returns fails the test here.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut outcomes = Vec::new();
        for _ in 0..THREADS {
            let left = deadline.saturating_duration_since(Instant::now());
            outcomes.extend(rx.recv_timeout(left).expect("every apply returns"));
        }
        (outcomes, killer.join().unwrap())
    });
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let mut runs = std::collections::BTreeMap::<u64, usize>::new();
    for l in text.lines() {
        *runs.entry(l.parse().unwrap()).or_default() += 1;
    }
    assert!(kills > 0, "no worker was killed");
    assert!(runs.values().all(|&n| n == 1), "ran twice: {runs:?}");
    let mut lost = 0;
    for (i, r) in &outcomes {
        match r {
            Ok(v) => {
                assert_eq!(*v, i * 2);
                assert_eq!(
                    runs.get(i),
                    Some(&1),
                    "task {i} returned but did not run once"
                );
            }
            Err(e) => {
                assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "task {i}: {e}");
                lost += 1;
            }
        }
    }
    assert_eq!(outcomes.len() as u64, THREADS * CALLS);
    assert!(lost <= kills, "{lost} calls lost to {kills} kills");
    eprintln!("{kills} kills, {lost} calls lost");
    assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
    shut_down(pool);
}

/// A fork server (or zygote) with more children than its loop polls from arrays on its
/// stack (fewer than 32) reaps and reports each of them all the same: among 40 workers, a
/// worker that dies fails its task with its pid and signal and is replaced, recycled
/// workers are replaced after each task, every task runs once, and none is left behind.
#[test]
fn a_fork_server_with_many_workers_reports_each_end() {
    for method in [
        procpool::StartMethod::Forkserver,
        procpool::StartMethod::Fork,
    ] {
        let pool = builder(method).processes(40).build().unwrap();
        assert_eq!(pool.map(square, 0..400u64).unwrap().len(), 400);
        let e = pool.apply(die_by_signal, (1,)).unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        assert_eq!(e.signal(), Some(6), "{method:?}: {e}");
        let pid = e.pid().expect("the error names the pid");
        wait_for("the replacement", Duration::from_secs(10), || {
            let w = pool.workers();
            w.len() == 40 && w.iter().all(|w| w.pid() != pid)
        });
        assert!(!alive(pid), "{method:?}: the dead worker was reaped");
        shut_down(pool);

        let pool = builder(method)
            .processes(40)
            .max_tasks_per_child(1)
            .build()
            .unwrap();
        let pids = pool
            .map_with(hang_then_pid, vec![1u64; 200], Options::new().chunksize(1))
            .unwrap();
        let mut distinct = pids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 200, "{method:?}: one fresh worker per task");
        assert_eq!(pool.metrics().died, 0, "{method:?}");
        for pid in pids {
            wait_for(
                "a recycled worker to be reaped",
                Duration::from_secs(10),
                || !alive(pid),
            );
        }
        shut_down(pool);
    }
}

/// Appends this worker's pid to the file `path` and returns it.
fn note_pid(path: String) -> u32 {
    let pid = std::process::id();
    append_line(&path, u64::from(pid));
    pid
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig)
        .unwrap();
}

/// An idle worker takes a caller's task from its page (see `protocol::page::DOOR`): one
/// killed before it took it up never ran it, and the task runs once, elsewhere; one killed
/// while running it fails it with its pid and signal, and it never runs again.
#[test]
fn a_task_handed_through_the_page_runs_once_whatever_becomes_of_its_worker() {
    use rustix::process::Signal;
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        // Ready and idle, asleep on its page's doorbell.
        let worker = pool.apply(my_pid, ()).unwrap();
        let path = std::env::temp_dir().join(format!(
            "procpool-page-task-{}-{method:?}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let arg = path.display().to_string();
        let lines = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count()
        };
        // Stopped (every thread of it), it cannot take up the task left for it; then killed.
        signal(worker, Signal::STOP);
        wait_for("the worker to stop", Duration::from_secs(10), || {
            stopped(worker)
        });
        std::thread::scope(|s| {
            let caller = s.spawn(|| pool.apply(note_pid, (arg.clone(),)));
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(lines(), 0, "{method:?}: a stopped worker ran nothing");
            signal(worker, Signal::KILL);
            let ran_on = caller.join().unwrap().unwrap();
            assert_ne!(ran_on, worker, "{method:?}");
        });
        assert_eq!(lines(), 1, "{method:?}: run once, by the replacement");
        // Killed while it runs a task it took from its page.
        let worker = pool.apply(my_pid, ()).unwrap();
        std::thread::scope(|s| {
            let caller = s.spawn(|| pool.apply(hang_then_pid, (60_000,)));
            wait_for("the task to begin", Duration::from_secs(10), || {
                pool.workers()
                    .iter()
                    .any(|w| w.pid() == worker && w.running_for().is_some())
            });
            signal(worker, Signal::KILL);
            let e = caller.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
            assert_eq!(e.signal(), Some(9), "{method:?}: {e}");
            assert_eq!(e.pid(), Some(worker), "{method:?}: {e}");
        });
        assert_eq!(pool.metrics().died, 2, "{method:?}");
        assert_eq!(pool.apply(square, (5,)).unwrap(), 25, "{method:?}");
        let _ = std::fs::remove_file(&path);
        shut_down(pool);
    }
}
