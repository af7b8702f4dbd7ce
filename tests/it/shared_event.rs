//! The process-shared Event (the `stop_tasks_with_event` example): tasks stop early when it is set; the pool stays usable.

use std::time::{Duration, Instant};

use procpool::Event;

use crate::util::{METHODS, builder, shut_down, sleep_ms, square};

fn run_until_set(id: u32, event: Event) -> (u32, bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if event.wait_timeout(Duration::from_millis(20)) {
            return (id, true);
        }
    }
    (id, false)
}

#[test]
fn setting_an_event_stops_running_tasks_under_every_method() {
    for method in METHODS {
        let event = Event::new().unwrap();
        let pool = builder(method).processes(4).build().unwrap();
        let items: Vec<(u32, Event)> = (0..4).map(|i| (i, event.clone())).collect();
        let r = pool.starmap_async(run_until_set, items);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!r.ready(), "{method:?}: tasks wait for the event");
        let t = Instant::now();
        event.set();
        let got = r.get().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(got, (0..4).map(|i| (i, true)).collect::<Vec<_>>());
        // The pool is reusable: no worker was killed.
        assert_eq!(pool.metrics().died, 0);
        assert_eq!(pool.apply(square, (6,)).unwrap(), 36);
        event.clear();
        assert!(!event.is_set());
        shut_down(pool);
    }
}

fn set_later(e: Event, ms: u64) -> bool {
    std::thread::sleep(Duration::from_millis(ms));
    e.set();
    e.is_set()
}

#[test]
fn a_worker_setting_the_event_wakes_a_waiter_in_the_parent() {
    let event = Event::new().unwrap();
    let pool = builder(Default::default()).build().unwrap();
    assert!(!event.wait_timeout(Duration::from_millis(20)));
    let r = pool.apply_async(set_later, (event.clone(), 100));
    let t = Instant::now();
    assert!(
        event.wait_timeout(Duration::from_secs(10)),
        "the worker's set is seen here"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(r.get().unwrap());
    shut_down(pool);
}

fn is_set(e: Event) -> bool {
    e.is_set()
}

fn initializer_keeps(e: Event) {
    assert!(!e.is_set());
}

#[test]
fn an_event_dropped_right_after_submitting_still_reaches_the_worker() {
    // The pool keeps the event open until its tasks are done, under every method, and for
    // workers started later by the initializer too.
    for method in METHODS {
        let pool = builder(method)
            .processes(1)
            .max_tasks_per_child(1)
            .initializer(initializer_keeps, (Event::new().unwrap(),))
            .build()
            .unwrap();
        let results: Vec<_> = (0..3)
            .map(|_| {
                let e = Event::new().unwrap();
                e.set();
                pool.apply_async(is_set, (e,))
            })
            .collect();
        for r in results {
            assert!(
                r.get_timeout(Duration::from_secs(20)).unwrap().unwrap(),
                "{method:?}"
            );
        }
        assert_eq!(pool.metrics().init_failed, 0, "{method:?}");
        shut_down(pool);
    }
}

fn wait_forever(e: Event) -> bool {
    e.wait();
    true
}

/// `set` wakes every waiter at once: threads here and tasks blocked in `wait` in several
/// workers.
#[test]
fn set_wakes_every_waiter_in_every_process() {
    let ev = Event::new().unwrap();
    let pool = builder(Default::default()).processes(3).build().unwrap();
    let in_workers: Vec<_> = (0..3)
        .map(|_| pool.apply_async(wait_forever, (ev.clone(),)))
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let ev = ev.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                assert!(ev.wait_timeout(Duration::from_secs(20)));
                t.elapsed()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    ev.set();
    for t in threads {
        assert!(
            t.join().unwrap() < Duration::from_secs(10),
            "a thread slept through set()"
        );
    }
    for r in in_workers {
        assert!(
            r.get_timeout(Duration::from_secs(10)).unwrap().unwrap(),
            "a worker slept through set()"
        );
    }
    shut_down(pool);
}

fn event_is_set(event: Event) -> bool {
    event.is_set()
}

/// The child half of the non-dumpable test: run only when the parent half re-executes this
/// binary with `PROCPOOL_TEST_NOT_DUMPABLE` set; this process makes itself non-dumpable (so
/// its `/proc/<pid>/fd` opens for nobody else), then prints `RESULT ok` if an Event reaches
/// a worker and time limits work, item by item: the pool times a task by the progress
/// page its worker keeps, so without the page an item that overruns its limit would run
/// to its end.
#[test]
#[ignore = "run by an_event_and_the_progress_page_reach_workers_of_a_non_dumpable_process"]
fn not_dumpable_child() {
    use procpool::{Options, TaskErrorKind};
    if !crate::util::as_not_dumpable_child() {
        return;
    }
    for method in METHODS {
        let event = Event::new().unwrap();
        event.set();
        let pool = builder(method).processes(1).build().unwrap();
        let got = pool.apply(event_is_set, (event.clone(),));
        assert!(got.as_ref().is_ok_and(|&set| set), "{method:?}: {got:?}");
        // Each item of a chunk has its own limit...
        let items = pool.map_with(
            sleep_ms,
            [150u64, 150, 150],
            Options::new()
                .chunksize(3)
                .timeout(Duration::from_millis(400)),
        );
        assert!(items.is_ok(), "{method:?}: {items:?}");
        // ... and an item that overruns it is stopped.
        let t = Instant::now();
        let over = pool.map_with(
            sleep_ms,
            [5_000u64],
            Options::new().timeout(Duration::from_millis(300)),
        );
        assert!(
            over.as_ref()
                .is_err_and(|e| e.kind() == TaskErrorKind::TimedOut),
            "{method:?}: {over:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(4), "{method:?}");
        shut_down(pool);
    }
    println!("RESULT ok");
}

/// Workers of a process that is not dumpable cannot open its `/proc/<pid>/fd`: the pool
/// passes them the Event's and the progress page's descriptors over their channel instead.
#[test]
fn an_event_and_the_progress_page_reach_workers_of_a_non_dumpable_process() {
    crate::util::not_dumpable_child_ok("shared_event::not_dumpable_child");
}
