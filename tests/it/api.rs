//! The multiprocessing.Pool API, under each start method.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use procpool::{Options, TaskErrorKind, WaitError, current_process};

use crate::util::{METHODS, add, builder, shut_down, sleep_ms, square};

fn three(a: u8, b: String, c: Vec<u16>) -> String {
    format!("{a}-{b}-{}", c.len())
}

fn name_and_pid() -> (String, u32) {
    let p = current_process();
    assert!(p.is_worker());
    (p.name().to_string(), p.pid())
}

#[test]
fn apply_map_starmap_give_python_results_under_every_method() {
    for method in METHODS {
        let pool = builder(method).build().expect("build");
        assert_eq!(pool.apply(square, (7,)).unwrap(), 49, "{method:?}");
        assert_eq!(pool.apply(add, (2, 3)).unwrap(), 5);
        assert_eq!(
            pool.apply(three, (1, "x".to_string(), vec![1, 2, 3]))
                .unwrap(),
            "1-x-3"
        );
        // A non-capturing closure is a task too.
        assert_eq!(pool.apply(|x: i32| x - 1, (10,)).unwrap(), 9);
        let want: Vec<u64> = (0..1000).map(|x| x * x).collect();
        assert_eq!(pool.map(square, 0..1000u64).unwrap(), want);
        assert_eq!(
            pool.map_with(square, 0..1000u64, Options::new().chunksize(1))
                .unwrap(),
            want
        );
        assert_eq!(
            pool.map_with(square, 0..1000u64, Options::new().chunksize(333))
                .unwrap(),
            want
        );
        assert_eq!(
            pool.map(square, Vec::<u64>::new()).unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)]).unwrap(), vec![3, 7]);
        let (name, pid) = pool.apply(name_and_pid, ()).unwrap();
        assert!(name.starts_with(method.worker_name_prefix()), "{name}");
        assert!(
            pool.workers()
                .iter()
                .any(|w| w.pid() == pid && w.name() == name)
        );
        shut_down(pool);
    }
}

#[test]
fn async_results_wait_ready_successful_and_timeouts() {
    let pool = builder(Default::default()).build().unwrap();
    let slow = pool.apply_async(sleep_ms, (300,));
    assert!(!slow.ready());
    assert_eq!(slow.successful(), Ok(None));
    // Running out of time to wait is not the task's failure: it cannot pass as one.
    let e = slow.get_timeout(Duration::from_millis(10)).unwrap_err();
    assert_eq!(e, WaitError::TimedOut);
    assert!(slow.wait_timeout(Duration::from_secs(10)));
    assert!(slow.ready());
    assert_eq!(slow.successful(), Ok(Some(true)));
    let pid = slow.get_timeout(Duration::from_secs(1)).unwrap().unwrap();
    assert!(pool.workers().iter().any(|w| w.pid() == pid));
    let again = slow.get_timeout(Duration::from_secs(1)).unwrap_err();
    assert_eq!(again, WaitError::Taken);
    assert_eq!(slow.successful(), Err(WaitError::Taken));

    let m = pool.map_async(square, 0..10u64);
    m.wait();
    assert_eq!(m.get().unwrap()[9], 81);
    let s = pool.starmap_async(add, vec![(1, 1)]);
    assert_eq!(s.get().unwrap(), vec![2]);
    shut_down(pool);
}

#[test]
fn callbacks_run_before_the_result_is_ready_and_cannot_break_the_pool() {
    let pool = builder(Default::default()).build().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = Arc::clone(&seen);
    let r = pool.apply_async_with(
        square,
        (9,),
        Options::new().on_success(move |v: &u64| s2.store(*v, Ordering::SeqCst)),
    );
    assert_eq!(r.get().unwrap(), 81);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        81,
        "callback ran before get returned"
    );

    // A panicking callback is caught: the result still arrives and the pool goes on.
    let r = pool.apply_async_with(
        square,
        (3,),
        Options::new().on_success(|_: &u64| panic!("callback bug")),
    );
    assert_eq!(r.get().unwrap(), 9);
    let errors = Arc::new(AtomicU64::new(0));
    let e2 = Arc::clone(&errors);
    let r = pool.apply_async_with(
        crate::failures::boom,
        (1,),
        Options::new().on_error(move |_e| {
            e2.fetch_add(1, Ordering::SeqCst);
        }),
    );
    assert!(r.get().unwrap_err().is_panic());
    assert_eq!(errors.load(Ordering::SeqCst), 1);
    let all = pool.map_async_with(square, 0..4u64, Options::new().chunksize(1));
    assert_eq!(all.get().unwrap(), vec![0, 1, 4, 9]);
    assert_eq!(pool.apply(square, (2,)).unwrap(), 4);
    shut_down(pool);
}

#[test]
fn imap_is_ordered_lazy_and_works_on_endless_input() {
    let pool = builder(Default::default()).build().unwrap();
    let got: Vec<u64> = pool.imap(square, 0..500u64).map(Result::unwrap).collect();
    assert_eq!(got, (0..500).map(|x| x * x).collect::<Vec<_>>());
    // An endless iterator: take what we need; the input is read only as workers free up.
    let mut pulled = 0u64;
    let counting = (0u64..).inspect(|_| pulled += 1);
    let first: Vec<u64> = pool
        .imap(square, counting)
        .take(50)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first[49], 49 * 49);
    let mut unordered: Vec<u64> = pool
        .imap_unordered_with(square, 0..300u64, Options::new().chunksize(7))
        .map(Result::unwrap)
        .collect();
    unordered.sort_unstable();
    assert_eq!(unordered, (0..300).map(|x| x * x).collect::<Vec<_>>());
    let chunked: Vec<u64> = pool
        .imap_with(square, 0..100u64, Options::new().chunksize(9))
        .map(Result::unwrap)
        .collect();
    assert_eq!(chunked.len(), 100);
    shut_down(pool);
}

#[test]
fn imap_reads_its_input_lazily() {
    let pool = builder(Default::default()).build().unwrap();
    let pulled = Arc::new(AtomicU64::new(0));
    let p2 = Arc::clone(&pulled);
    let input = (0u64..).inspect(move |_| {
        p2.fetch_add(1, Ordering::SeqCst);
    });
    let mut it = pool.imap(square, input);
    for _ in 0..10 {
        it.next().unwrap().unwrap();
    }
    let read = pulled.load(Ordering::SeqCst);
    // The input is endless: what was read is the window (two workers, 64 chunks of one item
    // each at most, once the pool has seen how brief the tasks are) plus the 10 consumed.
    assert!(
        read <= 10 + 2 * 64,
        "imap read {read} items ahead of 10 consumed: not lazy"
    );
    drop(it);
    shut_down(pool);
}

fn byte_count(b: serde_bytes::ByteBuf) -> u64 {
    b.len() as u64
}

/// An imap of brief tasks may read further ahead (more chunks in flight keep the workers
/// busy), but not one of large items: it keeps at most 32 per worker in flight, however
/// brief the pool's earlier tasks were (the window's rule itself is unit-tested in
/// pool-core).
#[test]
fn an_imap_of_large_items_keeps_at_most_32_per_worker_in_flight() {
    let pool = builder(Default::default()).build().unwrap();
    // Tiny tasks first: the pool then lets each worker hold hundreds.
    pool.map_with(square, 0..20_000u64, Options::new().chunksize(1))
        .unwrap();
    let pulled = Arc::new(AtomicU64::new(0));
    let p2 = Arc::clone(&pulled);
    let input = (0u64..).map(move |_| {
        p2.fetch_add(1, Ordering::SeqCst);
        serde_bytes::ByteBuf::from(vec![1u8; 512 << 10])
    });
    let mut it = pool.imap(byte_count, input);
    for _ in 0..5 {
        assert_eq!(it.next().unwrap().unwrap(), 512 << 10);
    }
    let read = pulled.load(Ordering::SeqCst);
    // Two workers: 32 chunks each at most once 8 MiB are in flight, plus the 5 consumed and
    // the chunk that crossed the limit.
    assert!(
        read <= 5 + 2 * 32 + 1,
        "imap read {read} items of 512 KiB ahead of 5 consumed"
    );
    drop(it);
    shut_down(pool);
}

#[test]
fn a_closed_pool_refuses_new_tasks_with_pool_closed() {
    let pool = builder(Default::default()).build().unwrap();
    let e = pool.join().unwrap_err();
    assert!(e.to_string().contains("close()"), "{e}");
    pool.close();
    let e = pool.apply(square, (1,)).unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::PoolClosed);
    assert!(pool.map(square, 0..3u64).is_err());
    assert!(
        pool.imap(square, 0u64..).next().unwrap().is_err(),
        "endless input stops"
    );
    pool.join().unwrap();
}

/// Reverses the buffer and appends a checksum, so a corrupted or swapped payload shows.
fn reverse_and_sum(b: serde_bytes::ByteBuf) -> (serde_bytes::ByteBuf, u64) {
    let sum = b.iter().map(|&x| u64::from(x)).sum();
    let mut v = b.into_vec();
    v.reverse();
    (serde_bytes::ByteBuf::from(v), sum)
}

fn payload(i: usize, len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(
        (0..len)
            .map(|j| (j.wrapping_mul(31) ^ i) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn many_large_payloads_in_flight_at_once_arrive_intact_under_every_method() {
    // Sizes around the shared-memory threshold and well past it, all submitted before any
    // result is read: nothing deadlocks, nothing is mixed up.
    let sizes = [0usize, 1, 65_535, 65_536, 65_537, 300_000, 1 << 20, 3 << 20];
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let inputs: Vec<serde_bytes::ByteBuf> = (0..40)
            .map(|i| payload(i, sizes[i % sizes.len()]))
            .collect();
        let pending: Vec<_> = inputs
            .iter()
            .map(|b| pool.apply_async(reverse_and_sum, (b.clone(),)))
            .collect();
        for (input, r) in inputs.iter().zip(pending) {
            let (out, sum) = r.get_timeout(Duration::from_secs(60)).unwrap().unwrap();
            let mut expected = input.to_vec();
            expected.reverse();
            assert_eq!(out.len(), expected.len(), "{method:?}");
            assert!(
                out.as_slice() == expected.as_slice(),
                "{method:?}: payload differs"
            );
            assert_eq!(sum, input.iter().map(|&x| u64::from(x)).sum::<u64>());
        }
        shut_down(pool);
    }
}

fn reversed(b: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf {
    let mut v = b.into_vec();
    v.reverse();
    serde_bytes::ByteBuf::from(v)
}

fn reversed_vec(mut v: Vec<u8>) -> Vec<u8> {
    v.reverse();
    v
}

#[test]
fn byte_string_results_of_every_size_come_back_intact() {
    // Byte-string results take shortcuts (sent from where they lie, decoded into reused
    // buffers): sizes around each threshold (16 KiB, the 256 KiB shared-memory threshold,
    // the worker's 1 MiB result area), alone and several in one chunk.
    let sizes = [
        0usize,
        1,
        16 * 1024 - 1,
        16 * 1024,
        256 * 1024 + 1,
        (1 << 20) - 8,
        1 << 20,
        (3 << 20) + 5,
    ];
    let pool = builder(procpool::StartMethod::Forkserver).build().unwrap();
    let inputs: Vec<serde_bytes::ByteBuf> = (0..24)
        .map(|i| payload(i, sizes[i % sizes.len()]))
        .collect();
    let expected: Vec<Vec<u8>> = inputs
        .iter()
        .map(|b| b.iter().rev().copied().collect())
        .collect();
    for chunk in [1, 3] {
        let got = pool
            .map_with(reversed, inputs.clone(), Options::new().chunksize(chunk))
            .unwrap();
        assert!(
            got.iter()
                .map(|b| b.as_slice())
                .eq(expected.iter().map(Vec::as_slice))
        );
        let vecs = inputs.iter().map(|b| b.to_vec());
        let got = pool
            .map_with(reversed_vec, vecs, Options::new().chunksize(chunk))
            .unwrap();
        assert!(got == expected, "Vec<u8> results, chunks of {chunk}");
    }
    shut_down(pool);
}

/// Aborts the worker after `ms`.
fn abort_after(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::abort();
}

#[test]
fn large_arguments_queued_behind_a_worker_that_dies_are_sent_again_intact() {
    // Large byte strings go to the worker as a frame of their own, from the caller's
    // buffer; a worker that dies before beginning them must not lose them: they go to its
    // replacement whole.
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        // Short tasks first: the worker is then sent several tasks ahead, so the large
        // ones are queued on it when it dies.
        pool.map(square, 0..50u64).unwrap();
        let die = pool.apply_async(abort_after, (300,));
        let queued: Vec<_> = (1..6)
            .map(|i| {
                let b = payload(i, (1 << 20) + i);
                (b.clone(), pool.map_async(reversed, vec![b]))
            })
            .collect();
        let e = die
            .get_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}");
        for (b, r) in queued {
            let got = r.get_timeout(Duration::from_secs(60)).unwrap().unwrap();
            let expected: Vec<u8> = b.iter().rev().copied().collect();
            assert!(got[0].as_slice() == expected.as_slice(), "{method:?}");
        }
        assert_eq!(pool.metrics().died, 1, "{method:?}");
        shut_down(pool);
    }
}

#[test]
fn pools_and_results_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<procpool::Pool>();
    send_sync::<procpool::TaskError>();
    send::<procpool::AsyncResult<u64>>();
    send_sync::<procpool::Event>();
    // One pool, submitted to from several threads at once.
    let pool = builder(Default::default()).build().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || pool.map(square, (t * 100)..(t * 100 + 100)).unwrap())
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            let t = t as u64;
            let expected: Vec<u64> = ((t * 100)..(t * 100 + 100)).map(|x| x * x).collect();
            assert_eq!(h.join().unwrap(), expected);
        }
    });
    shut_down(pool);
}

/// Callbacks that keep the pool alive (to submit follow-up work, say) may be the last to
/// hold it, or join it: dropping or joining the pool from its own callback thread works,
/// even while the callback panics.
#[test]
fn a_callback_may_drop_or_join_the_pool() {
    use std::sync::atomic::AtomicBool;
    for how in ["drop", "join", "drop then panic"] {
        let pool = Arc::new(builder(Default::default()).build().unwrap());
        let (p, after) = (Arc::clone(&pool), Arc::new(AtomicBool::new(false)));
        let seen = Arc::clone(&after);
        let r = pool.apply_async_with(
            square,
            (2,),
            Options::new().on_success(move |v: &u64| {
                assert_eq!(*v, 4);
                if how == "join" {
                    p.close();
                    p.join().unwrap();
                } else {
                    drop(p);
                }
                seen.store(true, Ordering::SeqCst);
                if how == "drop then panic" {
                    panic!("a callback that panics after dropping the pool");
                }
            }),
        );
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
        drop(pool);
        assert_eq!(
            r.get_timeout(Duration::from_secs(20)).unwrap().unwrap(),
            4,
            "{how}"
        );
        crate::util::wait_for("the callback to finish", Duration::from_secs(20), || {
            after.load(Ordering::SeqCst)
        });
        for pid in pids {
            crate::util::wait_for("workers gone", Duration::from_secs(10), || {
                !crate::util::alive(pid)
            });
        }
    }
}

/// `join_timeout` after another join has returned, or beside others, reports success.
#[test]
fn join_timeout_after_or_beside_other_joins_succeeds() {
    let pool = builder(Default::default()).build().unwrap();
    pool.close();
    pool.join().unwrap();
    pool.join().unwrap();
    pool.join_timeout(Duration::from_secs(5)).unwrap();
    let pool = Arc::new(builder(Default::default()).build().unwrap());
    let r = pool.apply_async(sleep_ms, (100,));
    pool.close();
    let joins: Vec<_> = (0..3)
        .map(|_| {
            let p = Arc::clone(&pool);
            std::thread::spawn(move || p.join_timeout(Duration::from_secs(10)))
        })
        .collect();
    for j in joins {
        j.join().unwrap().unwrap();
    }
    r.get().unwrap();
}

/// As in Python: an imap made before `close` still yields every result after it (it goes
/// on sending its items); `join` ends that, and what was not sent then fails clearly.
#[test]
fn an_imap_made_before_close_yields_everything_after_it() {
    let pool = builder(Default::default()).build().unwrap();
    // No length known: chunks of one, many more than the window, so most are sent after
    // close.
    let it = pool.imap(square, (0..1000u64).filter(|_| true));
    let unordered = pool.imap_unordered(square, (0..300u64).filter(|_| true));
    pool.close();
    let got: Vec<u64> = it.map(Result::unwrap).collect();
    assert_eq!(got, (0..1000).map(|x| x * x).collect::<Vec<_>>());
    let mut got: Vec<u64> = unordered.map(Result::unwrap).collect();
    got.sort_unstable();
    assert_eq!(got, (0..300).map(|x| x * x).collect::<Vec<_>>());
    // Made after close: refused.
    assert!(pool.imap(square, 0..3u64).next().unwrap().is_err());
    pool.join_timeout(Duration::from_secs(20)).unwrap();

    // join before consuming: the first window was sent at creation and completes; the rest
    // fails with PoolClosed, and nothing hangs.
    let pool = builder(Default::default()).build().unwrap();
    let it = pool.imap(square, 0u64..);
    pool.close();
    pool.join_timeout(Duration::from_secs(20)).unwrap();
    let mut ok = 0;
    let mut closed = None;
    for r in it.take(10_000) {
        match r {
            Ok(v) => {
                assert_eq!(v, ok * ok);
                ok += 1;
            }
            Err(e) => {
                closed = Some(e);
                break;
            }
        }
    }
    assert!(ok > 0, "the items sent before join completed");
    let e = closed.expect("items not sent before join fail");
    assert_eq!(e.kind(), TaskErrorKind::PoolClosed, "{e}");
    assert!(e.to_string().contains("before join()"), "{e}");
}

/// `Duration::MAX` as a timeout means no limit, never a panic.
#[test]
fn timeouts_of_duration_max_wait_without_limit() {
    let pool = builder(Default::default()).build().unwrap();
    let r = pool.apply_async(square, (3,));
    assert!(r.wait_timeout(Duration::MAX));
    assert_eq!(r.get_timeout(Duration::MAX).unwrap().unwrap(), 9);
    let e = procpool::Event::new().unwrap();
    e.set();
    assert!(e.wait_timeout(Duration::MAX));
    pool.close();
    pool.join_timeout(Duration::MAX).unwrap();
}

/// Every one of several concurrent joins returns only once the callbacks have run.
#[test]
fn concurrent_joins_all_wait_for_the_callbacks() {
    let pool = builder(Default::default()).build().unwrap();
    let ran = Arc::new(AtomicU64::new(0));
    let results: Vec<_> = (0..4u64)
        .map(|i| {
            let ran = Arc::clone(&ran);
            pool.apply_async_with(
                square,
                (i,),
                Options::new().on_success(move |_| {
                    std::thread::sleep(Duration::from_millis(50));
                    ran.fetch_add(1, Ordering::SeqCst);
                }),
            )
        })
        .collect();
    pool.close();
    let seen: Vec<(u64, bool)> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    pool.join_timeout(Duration::from_secs(20)).unwrap();
                    (
                        ran.load(Ordering::SeqCst),
                        results.iter().all(|r| r.ready()),
                    )
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert!(seen.iter().all(|&(n, ready)| n == 4 && ready), "{seen:?}");
}

/// A panic payload whose own `Drop` panics.
struct NastyPayload;

impl Drop for NastyPayload {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload panics when dropped");
        }
    }
}

/// A callback whose panic cannot even be dropped quietly still does not stop the callbacks
/// queued behind it.
#[test]
fn a_callback_panicking_with_a_nasty_payload_does_not_stop_later_callbacks() {
    let pool = builder(Default::default()).build().unwrap();
    let a = pool.apply_async_with(
        square,
        (2,),
        Options::new().on_success(|_| {
            std::thread::sleep(Duration::from_millis(100));
            std::panic::panic_any(NastyPayload);
        }),
    );
    let b = pool.apply_async_with(square, (3,), Options::new().on_success(|_| {}));
    assert_eq!(a.get_timeout(Duration::from_secs(20)).unwrap().unwrap(), 4);
    assert_eq!(b.get_timeout(Duration::from_secs(20)).unwrap().unwrap(), 9);
    shut_down(pool);
}

/// As with Python's shared queue, short tasks do not wait behind a long one while another
/// worker is free.
#[test]
fn short_tasks_do_not_wait_behind_a_long_one() {
    let pool = builder(Default::default()).build().unwrap();
    let long = pool.apply_async(sleep_ms, (3000,));
    let short: Vec<_> = (0..3).map(|_| pool.apply_async(sleep_ms, (100,))).collect();
    for r in &short {
        assert!(
            r.wait_timeout(Duration::from_secs(20)),
            "a short task never finished"
        );
    }
    assert!(
        !long.ready(),
        "the short tasks finished only after the long one: they waited behind it"
    );
    long.get_timeout(Duration::from_secs(20)).unwrap().unwrap();
    shut_down(pool);
}

/// Triples `x`; `fail` panics.
fn triple_or_fail(x: u64, fail: u64) -> u64 {
    assert!(x != fail, "item {x} fails");
    x * 3
}

/// Triples `x`; the first item is slow, so the chunks after the first come back before
/// it; `fail` (if not 0) panics.
fn triple_slow_start(x: u64, fail: u64) -> u64 {
    if x == 0 {
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(fail == 0 || x != fail, "item {x} fails");
    x * 3
}

#[test]
fn a_map_whose_chunks_come_back_out_of_order_gathers_them_in_order_and_names_a_late_failure() {
    for method in METHODS {
        let pool = builder(method).build().expect("build");
        // Chunks large enough to decode onto the result (64 items or more); a bounded wait.
        let map = |fail: u64| {
            let items = (0..4000u64).map(move |x| (x, fail));
            pool.starmap_async_with(triple_slow_start, items, Options::new().chunksize(64))
                .get_timeout(Duration::from_secs(60))
                .expect("the map ends")
        };
        let want: Vec<u64> = (0..4000).map(|x| x * 3).collect();
        // Every chunk but the first is back before it: they wait, then follow it in order.
        assert_eq!(map(0).unwrap(), want, "{method:?}");
        // The same in one-item chunks, by a `map` that makes them as the queue has room.
        let items = (0..4000u64).map(|x| (x, 0));
        let got = pool.starmap_with(triple_slow_start, items, Options::new().chunksize(1));
        assert_eq!(got.unwrap(), want, "{method:?}");
        // A failure in the second chunk, in one further on and in the last, each back
        // before the first.
        for fail in [70, 2001, 3999] {
            let e = map(fail).unwrap_err();
            assert_eq!(e.kind(), TaskErrorKind::Panicked, "{method:?}: {e}");
            assert_eq!(e.item_index(), Some(fail as usize), "{method:?}: {e}");
        }
        // In order, mostly: the failing chunk is due next when it comes back, its values
        // not gathered onto the result, and the results before it kept apart.
        let items = (0..4000u64).map(|x| (x, 3000));
        let e = pool
            .starmap_async_with(triple_or_fail, items, Options::new().chunksize(64))
            .get_timeout(Duration::from_secs(60))
            .expect("the map ends")
            .unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::Panicked, "{method:?}: {e}");
        assert_eq!(e.item_index(), Some(3000), "{method:?}: {e}");
        // The pool goes on.
        assert_eq!(pool.map(square, 0..1000u64).unwrap().len(), 1000);
        shut_down(pool);
    }
}

/// Negates `x`; 7 panics.
fn negate_but_seven(x: i64) -> i64 {
    assert!(x != 7, "seven");
    x.wrapping_neg()
}

fn halve(x: f64) -> f64 {
    x / 2.0
}

fn flip(b: bool) -> bool {
    !b
}

fn widest(x: u8) -> (u64,) {
    (u64::MAX - u64::from(x),)
}

fn as_i16(x: u16) -> i16 {
    x as i16
}

fn as_u32(x: i8) -> u32 {
    x as u32
}

fn smallest(x: usize) -> isize {
    isize::MIN + x as isize
}

fn tenth(x: f32) -> f32 {
    x / 10.0
}

/// Maps over plain numbers (their arguments and results written and read by hand, not by
/// serde: see `pool_spawn::plain`) give the values postcard would carry, extremes included,
/// and a panic in the middle of a chunk fails that item alone, with its index.
#[test]
fn maps_over_plain_numbers_give_every_value_and_a_panic_its_own_index() {
    for method in METHODS {
        let pool = builder(method).build().expect("build");
        let ints: Vec<i64> = (-300..300).chain([i64::MIN, i64::MAX]).collect();
        let got = pool
            .imap_with(negate_but_seven, ints.clone(), Options::new().chunksize(50))
            .collect::<Vec<_>>();
        for (x, r) in ints.iter().zip(&got) {
            match r {
                Ok(v) => assert_eq!(*v, x.wrapping_neg(), "{method:?}"),
                Err(e) => {
                    assert_eq!(*x, 7, "{method:?}: {e}");
                    assert_eq!(e.kind(), TaskErrorKind::Panicked, "{method:?}: {e}");
                    assert_eq!(e.item_index(), Some(307), "{method:?}: {e}");
                }
            }
        }
        let e = pool
            .map_with(negate_but_seven, ints, Options::new().chunksize(50))
            .unwrap_err();
        assert_eq!(e.item_index(), Some(307), "{method:?}: {e}");
        let floats = vec![0.0, -1.5, f64::MAX, f64::MIN_POSITIVE, 1e300];
        let want: Vec<f64> = floats.iter().map(|x| x / 2.0).collect();
        assert_eq!(
            pool.map_with(halve, floats, Options::new().chunksize(2))
                .unwrap(),
            want
        );
        let nan = pool
            .map_with(halve, vec![f64::NAN; 3], Options::new().chunksize(2))
            .unwrap();
        assert!(nan.iter().all(|x| x.is_nan()), "{method:?}: {nan:?}");
        let bools = vec![true, false, true];
        assert_eq!(
            pool.map_with(flip, bools, Options::new().chunksize(2))
                .unwrap(),
            [false, true, false]
        );
        let bytes: Vec<u8> = (0..=255).collect();
        let want: Vec<(u64,)> = bytes.iter().map(|&x| (u64::MAX - u64::from(x),)).collect();
        assert_eq!(
            pool.map_with(widest, bytes, Options::new().chunksize(100))
                .unwrap(),
            want
        );
        let shorts: Vec<u16> = (0..=u16::MAX).step_by(97).chain([u16::MAX]).collect();
        let want: Vec<i16> = shorts.iter().map(|&x| x as i16).collect();
        assert_eq!(
            pool.map_with(as_i16, shorts, Options::new().chunksize(64))
                .unwrap(),
            want
        );
        let signed: Vec<i8> = (-128..=127).collect();
        let want: Vec<u32> = signed.iter().map(|&x| x as u32).collect();
        assert_eq!(
            pool.map_with(as_u32, signed, Options::new().chunksize(64))
                .unwrap(),
            want
        );
        let sizes = vec![0usize, 1, 1 << 40, usize::MAX >> 1];
        let want: Vec<isize> = sizes.iter().map(|&x| isize::MIN + x as isize).collect();
        assert_eq!(
            pool.map_with(smallest, sizes, Options::new().chunksize(3))
                .unwrap(),
            want
        );
        let singles = vec![1.0f32, -0.0, f32::MAX, 3.25];
        let want: Vec<f32> = singles.iter().map(|x| x / 10.0).collect();
        assert_eq!(
            pool.map_with(tenth, singles, Options::new().chunksize(3))
                .unwrap(),
            want
        );
        shut_down(pool);
    }
}

/// Sleeps `us` microseconds; returns it.
fn nap_us(us: u64) -> u64 {
    std::thread::sleep(Duration::from_micros(us));
    us
}

#[test]
fn a_map_that_waits_for_its_result_keeps_its_queue_short_and_map_async_hands_over_all() {
    // One worker and 4000 one-item chunks of 0.1 ms or more: a `map` (its caller waits)
    // makes its chunks as the queue has room, never more than about a thousand waiting
    // (plus the batch that crossed the line); `map_async` hands every chunk to the pool
    // before it returns.
    let pool = builder(Default::default()).processes(1).build().unwrap();
    let one = || Options::new().chunksize(1);
    let items = || (0..4000u64).map(|i| 100 + i % 2);
    let done = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                most = most.max(pool.metrics().queued);
                std::thread::sleep(Duration::from_micros(200));
            }
            most
        });
        let got = pool.map_with(nap_us, items(), one()).unwrap();
        done.store(true, Ordering::SeqCst);
        assert_eq!(got, items().collect::<Vec<_>>());
        sampler.join().unwrap()
    });
    assert!(
        (100..=1024 + 256).contains(&most),
        "a map kept {most} chunks waiting at most"
    );
    let before = pool.metrics().submitted;
    let r = pool.map_async_with(nap_us, items(), one());
    assert_eq!(pool.metrics().submitted - before, 4000, "all handed over");
    assert_eq!(r.get().unwrap().len(), 4000);
    shut_down(pool);
}

/// Runs a `map` of `n` items of 0.2 ms on its own thread: its result, bounded.
fn map_aside(
    pool: &Arc<procpool::Pool>,
    n: u64,
) -> impl FnOnce() -> Result<Vec<u64>, procpool::TaskError> + use<> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = Arc::clone(pool);
    let map = std::thread::spawn(move || {
        let items = (0..n).map(|_| 200);
        let _ = tx.send(p.map_with(nap_us, items, Options::new().chunksize(1)));
    });
    move || {
        let got = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the map returns");
        map.join().unwrap();
        got
    }
}

/// A pool of one worker running a map of `n` one-item chunks of 0.2 ms in another thread
/// (see [`map_aside`]), once the map has begun.
fn map_begun(
    n: u64,
) -> (
    Arc<procpool::Pool>,
    impl FnOnce() -> Result<Vec<u64>, procpool::TaskError>,
) {
    let pool = Arc::new(builder(Default::default()).processes(1).build().unwrap());
    let map = map_aside(&pool, n);
    crate::util::wait_for("the map to begin", Duration::from_secs(30), || {
        pool.metrics().completed > 10
    });
    (pool, map)
}

/// Shuts down a pool whose other handles (a map's thread) are gone.
fn shut_down_shared(pool: Arc<procpool::Pool>) {
    let Ok(pool) = Arc::try_unwrap(pool) else {
        panic!("the map's thread is done, its pool handle dropped");
    };
    shut_down(pool);
}

#[test]
fn a_map_waiting_for_room_goes_on_after_close_and_join_waits_for_it() {
    // One worker, 3000 one-item chunks of 0.2 ms: the map waits for room in the queue for
    // most of its run. A close meanwhile (from another thread) lets it send the rest, as
    // an imap made before it would; a join waits for it to send them all, as Python's
    // join waits for a map begun before close; only terminate stops it.
    let (pool, map) = map_begun(3000);
    pool.close();
    assert_eq!(map().expect("every item runs after close").len(), 3000);
    pool.join().unwrap();
    shut_down_shared(pool);

    let (pool, map) = map_begun(3000);
    pool.close();
    pool.join_timeout(Duration::from_secs(60)).unwrap();
    // Every chunk was handed over and ran before the join returned.
    let m = pool.metrics();
    assert_eq!((m.submitted, m.completed), (3000, 3000), "{m:?}");
    assert_eq!(
        map().expect("every item runs before join returns").len(),
        3000
    );
    shut_down_shared(pool);

    // terminate stops it: what it had not run fails, and nothing hangs.
    let (pool, map) = map_begun(3000);
    pool.terminate();
    pool.join_timeout(Duration::from_secs(60)).unwrap();
    let e = map().unwrap_err();
    assert_eq!(e.kind(), TaskErrorKind::PoolClosed, "{e}");
    assert!(pool.metrics().completed < 3000);
    shut_down_shared(pool);
}
