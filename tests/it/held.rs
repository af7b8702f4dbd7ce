//! Answers held back: a worker that finishes a task while more requests wait may keep its
//! answer (on its progress page) to write it with the next ones. A worker that dies holding
//! answers loses none of them: the tasks they answer are delivered, not failed, and not
//! run again. A long task begun right after brief ones does not keep their answers waiting
//! (the pool takes them from the page), and a task cancelled while the answers before it
//! are held is stopped as the running task it is.

use std::io::Write;
use std::time::{Duration, Instant};

use procpool::{AsyncResult, CancelOutcome, Options, Pool, TaskErrorKind};

use crate::util::{METHODS, alive, append_line, builder, shut_down, square, wait_for};

/// Records its run in the file at `path` (one `O_APPEND` write), then aborts its worker if
/// `x` is `die_at`; returns `x`.
fn record_or_abort((path, x, die_at): (String, u64, u64)) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open the runs file");
    f.write_all(format!("{x}\n").as_bytes())
        .expect("record the run");
    if x == die_at {
        std::process::abort();
    }
    x
}

#[test]
fn answers_held_when_a_worker_dies_are_delivered_once() {
    for method in METHODS {
        let path =
            std::env::temp_dir().join(format!("procpool-held-{}-{method:?}", std::process::id()));
        std::fs::File::create(&path).expect("create the runs file");
        let p = path.to_string_lossy().into_owned();
        // One worker, many tiny tasks: it holds several at once, and answers some late.
        let pool = builder(method).processes(1).build().unwrap();
        pool.map(square, 0..1000u64).unwrap();
        let n = 2000u64;
        let die_at = 1500u64;
        let items: Vec<_> = (0..n).map(|x| (p.clone(), x, die_at)).collect();
        let got: Vec<_> = pool
            .imap_with(record_or_abort, items, Options::new().chunksize(1))
            .collect();
        assert_eq!(got.len() as u64, n);
        for (x, r) in (0..n).zip(&got) {
            if x == die_at {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
            } else {
                assert_eq!(r.as_ref().ok(), Some(&x), "{method:?}: item {x}: {r:?}");
            }
        }
        // Every task ran exactly once (the one that killed its worker too).
        let runs = std::fs::read_to_string(&path).expect("read the runs file");
        let mut count = vec![0u32; n as usize];
        for line in runs.lines() {
            count[line.parse::<usize>().expect("a run's line")] += 1;
        }
        let _ = std::fs::remove_file(&path);
        for (x, c) in count.iter().enumerate() {
            assert_eq!(*c, 1, "{method:?}: item {x} ran {c} times");
        }
        shut_down(pool);
    }
}

/// Appends `x` to the file at `path` (if any), then sleeps `ms` milliseconds; returns `x`.
fn mark_and_nap((path, x, ms): (String, u64, u64)) -> u64 {
    if !path.is_empty() {
        append_line(&path, x);
    }
    std::thread::sleep(Duration::from_millis(ms));
    x
}

/// Brief tasks of one item each: the pool learns to send many at once.
fn warm_up(pool: &Pool) {
    let squares = pool
        .map_with(square, 0..1000u64, Options::new().chunksize(1))
        .unwrap();
    assert_eq!(squares.len(), 1000);
}

/// On a pool of one worker sending many tasks at once: a 50 ms task, seven brief ones
/// (sent while it runs, so that the worker holds their answers back), then one of 10 s
/// (which marks the file at `path` when it begins, if `path` is not empty).
fn brief_then_long(pool: &Pool, path: &str) -> (Vec<AsyncResult<u64>>, AsyncResult<u64>) {
    warm_up(pool);
    let first = pool.apply_async(mark_and_nap, ((String::new(), 0, 50),));
    let brief: Vec<_> = (1..=7u64)
        .map(|x| pool.apply_async(mark_and_nap, ((String::new(), x, 0),)))
        .collect();
    let long = pool.apply_async(mark_and_nap, ((path.to_owned(), 8, 10_000),));
    assert_eq!(first.get().unwrap(), 0);
    (brief, long)
}

#[test]
fn a_long_task_after_brief_ones_does_not_keep_their_answers() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let (brief, long) = brief_then_long(&pool, "");
        // Each waits on the worker's socket itself (`get` on an `apply_async`).
        let t = Instant::now();
        for (x, r) in (1..).zip(brief) {
            let got = r.get_timeout(Duration::from_secs(5));
            assert_eq!(got, Ok(Ok(x)), "{method:?}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{method:?}: the brief tasks' answers waited {:?} behind the long one",
            t.elapsed()
        );
        // (It may not have begun yet, if the pool sent it after the brief ones' answers.)
        assert_ne!(long.cancel(), CancelOutcome::AlreadyFinished, "{method:?}");
        // The same when the driver delivers them (to callbacks, here through `imap`).
        let items = (0..9u64).map(|x| {
            let ms = match x {
                0 => 50,
                8 => 10_000,
                _ => 0,
            };
            (String::new(), x, ms)
        });
        warm_up(&pool);
        let mut it = pool.imap_with(mark_and_nap, items, Options::new().chunksize(1));
        assert_eq!(it.next().unwrap().unwrap(), 0);
        let t = Instant::now();
        for x in 1..=7 {
            assert_eq!(it.next().unwrap().unwrap(), x, "{method:?}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{method:?}: the brief items' answers waited {:?} behind the long one",
            t.elapsed()
        );
        pool.terminate();
        drop(it);
        shut_down(pool);
    }
}

#[test]
fn a_task_cancelled_while_the_answers_before_it_are_held_is_stopped_as_running() {
    for method in METHODS {
        let path =
            std::env::temp_dir().join(format!("procpool-held-c-{}-{method:?}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p = path.to_string_lossy().into_owned();
        let pool = builder(method).processes(1).build().unwrap();
        let pid = pool.workers()[0].pid();
        let (brief, long) = brief_then_long(&pool, &p);
        // As soon as the long task begins (the answers of the brief ones before it are
        // held back by the worker for a while): it is running, whatever came back so far.
        // (Looked at without sleeping: the pool takes the held answers from the worker's
        // page once it has been silent for a millisecond.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            assert!(
                Instant::now() < deadline,
                "{method:?}: the long task never began"
            );
            std::thread::yield_now();
        }
        let t = Instant::now();
        assert_eq!(long.cancel(), CancelOutcome::WhileRunning, "{method:?}");
        assert_eq!(
            long.get().unwrap_err().kind(),
            TaskErrorKind::Cancelled,
            "{method:?}"
        );
        wait_for("the stopped worker to go", Duration::from_secs(5), || {
            !alive(pid)
        });
        assert!(t.elapsed() < Duration::from_secs(5), "{method:?}");
        // The brief ones had finished: their results stand.
        for (x, r) in (1..).zip(brief) {
            assert_eq!(r.get(), Ok(x), "{method:?}");
        }
        let _ = std::fs::remove_file(&path);
        shut_down(pool);
    }
}

#[test]
fn a_timed_task_that_overruns_after_brief_ones_is_timed_out_and_their_answers_delivered() {
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        warm_up(&pool);
        let limit = || Options::new().timeout(Duration::from_millis(300));
        let first = pool.apply_async_with(mark_and_nap, ((String::new(), 0, 50),), limit());
        let brief: Vec<_> = (1..=7u64)
            .map(|x| pool.apply_async_with(mark_and_nap, ((String::new(), x, 0),), limit()))
            .collect();
        let long = pool.apply_async_with(mark_and_nap, ((String::new(), 8, 10_000),), limit());
        assert_eq!(first.get().unwrap(), 0);
        let t = Instant::now();
        let e = long.get().unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::TimedOut, "{method:?}: {e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{method:?}: {:?}",
            t.elapsed()
        );
        for (x, r) in (1..).zip(brief) {
            assert_eq!(r.get(), Ok(x), "{method:?}");
        }
        shut_down(pool);
    }
}
