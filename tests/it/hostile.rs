//! Tasks that write to their own channel: stray text, random bytes, crafted frame headers,
//! messages out of turn. The pool never hangs, holds no unbounded memory, and fails only the
//! offending worker's task.

use std::time::{Duration, Instant};

use procpool::TaskErrorKind;

use crate::util::{
    METHODS, append_line, builder, rss_kib, shut_down, square, write_to_channel,
    write_to_channel_and_wait,
};

#[test]
fn a_line_of_text_on_the_channel_fails_that_task_at_once() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let t = Instant::now();
        // "1234" reads as the header of an 835 MB frame. (A task that returned before the
        // pool read the stray line would have its result delivered from the worker's result
        // area: this one is still running.)
        let e = pool
            .apply(
                write_to_channel_and_wait,
                (b"1234 printed to the wrong fd\n".to_vec(),),
            )
            .unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{method:?}: took {:?}",
            t.elapsed()
        );
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        let text = e.to_string();
        assert!(text.contains("stray bytes"), "{method:?}: {text}");
        // The pool killed it: no hint at the out-of-memory killer.
        assert_eq!(e.signal(), Some(9), "{text}");
        assert!(text.contains("sent by the pool"), "{text}");
        assert!(!text.contains("out-of-memory"), "{method:?}: {text}");
        assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
        shut_down(pool);
    }
}

/// A deterministic stream of pseudo-random bytes (xorshift), so a failure reproduces.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A complete frame: little-endian length, then `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Runs `apply(write_to_channel, bytes)` on a pool of two, next to a bystander task on the
/// other worker; the offender's task may fail (as a lost worker) or succeed, the bystander
/// always succeeds, and the pool goes on.
fn survive(what: &str, bytes: Vec<u8>) {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let before = rss_kib();
        let bystander = pool.apply_async(crate::util::sleep_ms, (200,));
        let t = Instant::now();
        let r = pool
            .apply_async(write_to_channel, (bytes.clone(),))
            .get_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{method:?} {what}: hangs ({e})"));
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{method:?} {what}: took {:?}",
            t.elapsed()
        );
        if let Err(e) = &r {
            assert_eq!(
                e.kind(),
                TaskErrorKind::WorkerLost,
                "{method:?} {what}: {e}"
            );
            assert!(!e.to_string().contains("out-of-memory"), "{e}");
        }
        bystander
            .get_timeout(Duration::from_secs(15))
            .expect("the bystander finishes in time")
            .unwrap_or_else(|e| panic!("{method:?} {what}: the bystander failed: {e}"));
        assert_eq!(
            pool.map(square, 0..20u64).unwrap().len(),
            20,
            "{method:?} {what}"
        );
        let grew = rss_kib().saturating_sub(before);
        assert!(
            grew < 64 * 1024,
            "{method:?} {what}: the parent grew {grew} KiB"
        );
        shut_down(pool);
    }
}

#[test]
fn random_bytes_on_the_channel() {
    for seed in [1u64, 7, 42] {
        survive(&format!("noise {seed}"), noise(seed, 4096));
    }
}

#[test]
fn crafted_headers_on_the_channel() {
    // Unannounced large frames, plain and after a valid small frame.
    survive("a 1 GiB header", (1u32 << 30).to_le_bytes().to_vec());
    survive("a 2 GiB - 1 header", u32::MAX.to_le_bytes().to_vec());
    let mut v = frame(&[0]);
    v.extend_from_slice(&(100u32 << 20).to_le_bytes());
    survive("a small frame, then a 100 MiB header", v);
    // Control frames: oversized, empty, unknown, a shared-memory reference to nowhere.
    survive(
        "an oversized control frame",
        (0x8000_0000u32 | 4096).to_le_bytes().to_vec(),
    );
    survive(
        "an empty control frame",
        0x8000_0000u32.to_le_bytes().to_vec(),
    );
    let mut v = (0x8000_0000u32 | 4).to_le_bytes().to_vec();
    v.extend_from_slice(&[99, 0, 0, 0]);
    survive("an unknown control frame", v);
    let mut v = (0x8000_0000u32 | 16).to_le_bytes().to_vec();
    v.extend_from_slice(&[2, 0, 0, 0]);
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    v.extend_from_slice(&1000u32.to_le_bytes());
    survive("a shared-memory reference without a region", v);
    // Complete frames that are not messages.
    survive("garbage in a frame", frame(&noise(3, 100)));
    survive("an empty frame", frame(&[]));
}

#[test]
fn a_frame_that_stops_half_way() {
    // A header for 100 bytes, 3 of them, then nothing: only a bound on how long a frame may
    // stay unfinished frees the parent.
    let mut v = 100u32.to_le_bytes().to_vec();
    v.extend_from_slice(&[1, 2, 3]);
    survive("a frame that stops half-way", v);
    // A valid announcement of 512 MiB and its header, then nothing.
    let len = 512u32 << 20;
    let mut v = (0x8000_0000u32 | 12).to_le_bytes().to_vec();
    v.extend_from_slice(&[3, 0, 0, 0]);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&(len ^ 0x434f_5250).to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    survive("an announced 512 MiB frame that never comes", v);
}

fn encoded(m: &pool_spawn::protocol::FromWorker) -> Vec<u8> {
    frame(&postcard::to_allocvec(m).unwrap())
}

#[test]
fn messages_out_of_turn_on_the_channel() {
    use pool_spawn::protocol::FromWorker;
    use serde_bytes::ByteBuf;
    survive(
        "a second Ready",
        encoded(&FromWorker::Ready {
            pid: std::process::id(),
        }),
    );
    survive(
        "a result for a task never sent",
        encoded(&FromWorker::Done {
            id: u64::MAX,
            items: 1,
            outcome: Ok(ByteBuf::from(vec![1, 0])),
        }),
    );
    survive(
        "a result for the next task",
        encoded(&FromWorker::Done {
            id: 1,
            items: 1,
            outcome: Ok(ByteBuf::from(vec![0])),
        }),
    );
}

#[test]
fn a_forged_setup_failure_from_a_running_worker() {
    use pool_spawn::protocol::{FromWorker, SetupFailure};
    survive(
        "a SetupFailed while running",
        encoded(&FromWorker::SetupFailed {
            reason: SetupFailure::Initializer,
            message: "forged".to_owned(),
        }),
    );
}

#[test]
fn a_forged_skip_of_its_own_task() {
    use pool_spawn::protocol::FromWorker;
    // In `survive`, the bystander is task 1 and the offender task 2: a Skipped for it, which
    // nobody cancelled, took its record and left it without an outcome (found by the fuzz).
    survive(
        "a Skipped for its own task",
        encoded(&FromWorker::Skipped { id: 2 }),
    );
    survive(
        "a Skipped for the bystander's task",
        encoded(&FromWorker::Skipped { id: 1 }),
    );
}

#[test]
fn a_forged_result_tail_never_swallows_the_real_result() {
    use pool_spawn::protocol::FromWorker;
    use serde_bytes::ByteBuf;
    // A PartTail says the next frame is raw result bytes: forged for its own task (2), the
    // next frame would be its real Done, taken for bytes, leaving the task without an
    // outcome (found by the fuzz). A tail must be large and of the announced length.
    for len in [5, 300_000] {
        survive(
            &format!("a PartTail announcing {len} bytes"),
            encoded(&FromWorker::PartTail {
                id: 2,
                head: ByteBuf::from(vec![0]),
                len,
            }),
        );
    }
}

/// Writes `bytes` to its channel, then takes a moment (the pool reads them while it runs).
fn write_then_linger(bytes: Vec<u8>) -> u32 {
    write_to_channel(bytes);
    std::thread::sleep(Duration::from_millis(300));
    std::process::id()
}

/// A task forges the head of a large result of its own (a `PartTail`) and ends: the pool
/// may read the head and the task's real answer, left in the worker's page for the waiting
/// `apply`, at one go. The head then waits for a tail that never comes; it must not take
/// the next task's answer for that tail, failing a task that did nothing wrong.
#[test]
fn a_forged_result_head_never_takes_a_later_tasks_answer_for_its_tail() {
    use pool_spawn::protocol::FromWorker;
    use serde_bytes::ByteBuf;
    for method in METHODS {
        // One worker, so that the map's tasks go where the forgery was; the first task has
        // id 1.
        let pool = builder(method).processes(1).build().unwrap();
        let head = encoded(&FromWorker::PartTail {
            id: 1,
            head: ByteBuf::from(vec![0]),
            len: 300_000,
        });
        if let Err(e) = pool.apply(write_to_channel, (head,)) {
            assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        }
        let squares = pool
            .map(square, 0..20u64)
            .unwrap_or_else(|e| panic!("{method:?}: a task after the forgery failed: {e}"));
        assert_eq!(squares, (0..20u64).map(|x| x * x).collect::<Vec<_>>());
        shut_down(pool);
    }
}

/// A pool of one worker that ran tasks 1 to 20, quick ones: it has learnt to keep several
/// in flight per worker, so that tasks 21 and 22 go to the worker together.
fn one_warm_worker(method: procpool::StartMethod) -> procpool::Pool {
    let pool = builder(method).processes(1).build().unwrap();
    for x in 0..20 {
        assert_eq!(pool.apply(square, (x,)).unwrap(), x * x);
    }
    pool
}

/// A forged answer for task 22: one item, its result the byte 0.
fn forged_answer_for_22() -> Vec<u8> {
    use pool_spawn::protocol::FromWorker;
    encoded(&FromWorker::Done {
        id: 22,
        items: 1,
        outcome: Ok(serde_bytes::ByteBuf::from(vec![0])),
    })
}

/// The outcome of `r` (waited for 20 s at most), which may only fail with `WorkerLost`.
fn ok_or_lost<T>(r: procpool::AsyncResult<T>, what: &str) -> Option<T> {
    match r.get_timeout(Duration::from_secs(20)) {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{what}: {e}");
            None
        }
        Err(e) => panic!("{what}: the task does not end: {e}"),
    }
}

#[test]
fn a_forged_result_for_the_task_queued_behind() {
    for method in METHODS {
        // One worker: the second task waits behind the first in the same worker, and the
        // first forges its result (0 instead of 49), which was delivered as its own.
        let pool = one_warm_worker(method);
        let offender = pool.apply_async(write_then_linger, (forged_answer_for_22(),));
        let victim = pool.apply_async(square, (7,));
        let what = format!("{method:?}, the offender");
        if let Err(e) = offender.get_timeout(Duration::from_secs(20)).expect(&what) {
            assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{what}: {e}");
            assert!(e.to_string().contains("not running"), "{what}: {e}");
        }
        let v = ok_or_lost(victim, &format!("{method:?}, the victim"));
        assert_eq!(v, Some(49), "{method:?}");
        shut_down(pool);
    }
}

/// Appends a line to the file at `path` (its run), then takes a moment.
fn record_then_linger(path: String) -> u32 {
    append_line(&path, 1);
    std::thread::sleep(Duration::from_millis(300));
    std::process::id()
}

#[test]
fn a_task_begun_by_a_worker_then_killed_as_faulty_never_runs_again() {
    for method in METHODS {
        let path =
            std::env::temp_dir().join(format!("procpool-faulty-{}-{method:?}", std::process::id()));
        std::fs::File::create(&path).expect("create the runs file");
        let p = path.to_string_lossy().into_owned();
        let pool = one_warm_worker(method);
        // Task 21 forges an answer for task 22, queued behind it in the same worker, and
        // returns at once: task 22 begins while the pool reads the forgery and kills the
        // worker as faulty (its real answer to 21, after the forgery, is not believed).
        // Both had begun: they fail, and neither runs again elsewhere.
        let offender = pool.apply_async(write_to_channel, (forged_answer_for_22(),));
        let victim = pool.apply_async(record_then_linger, (p.clone(),));
        ok_or_lost(offender, &format!("{method:?}, the offender"));
        ok_or_lost(victim, &format!("{method:?}, the victim"));
        shut_down(pool);
        let runs = std::fs::read_to_string(&path).expect("read the runs file");
        let _ = std::fs::remove_file(&path);
        assert!(
            runs.lines().count() <= 1,
            "{method:?}: the task behind the forgery ran {} times",
            runs.lines().count()
        );
    }
}

#[test]
fn a_forged_recycling_notice_does_not_hold_up_join() {
    use pool_spawn::protocol::FromWorker;
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        // The worker says it is over its memory limit and will exit, then does not: join
        // waited for it for ever (found by the fuzz).
        let notice = encoded(&FromWorker::Recycling { rss: 1 });
        let _ = pool.apply(write_to_channel, (notice,));
        assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
        pool.close();
        pool.join_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{method:?}: join: {e}"));
    }
}
