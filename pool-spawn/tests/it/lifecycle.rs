//! Start, run, fail and end: one worker per test, for every start method.

use std::time::Duration;

use pool_spawn::protocol::ToWorker;
use pool_spawn::task::{self, ItemErrorKind};
use pool_spawn::{Signal, StartMethod};
use serde_bytes::ByteBuf;

use crate::driver::{self, assert_dies, assert_gone, launch, launcher};
use crate::per_method;
use crate::tasks;

fn run_tasks(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 1);
    w.setup();
    // fn items with 0, 1, 2 and 3 arguments
    assert_eq!(w.call::<(), u32>(task::batch_ref(tasks::answer), ()), 42);
    let sq = w.run::<(u64,), u64>(1, task::batch_ref(tasks::square), &[(3,), (4,), (5,)]);
    assert_eq!(sq.unwrap(), vec![Ok(9), Ok(16), Ok(25)]);
    assert_eq!(w.call::<_, i32>(task::batch_ref(tasks::add), (2, 40)), 42);
    let s: String = w.call(task::batch_ref(tasks::join3), ("a".to_owned(), 7u8, true));
    assert_eq!(s, "a-7-true");
    // closures with 1, 2 and 3 arguments
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(|x: u64| x + 1), (41u64,)),
        42
    );
    assert_eq!(
        w.call::<_, i64>(task::batch_ref(|a: i64, b: i64| a * b), (6i64, 7i64)),
        42
    );
    let f = task::batch_ref(|a: u8, b: u8, c: u8| u32::from(a) + u32::from(b) + u32::from(c));
    assert_eq!(w.call::<_, u32>(f, (40u8, 1u8, 1u8)), 42);
    // an empty batch
    assert_eq!(
        w.run::<(u64,), u64>(2, task::batch_ref(tasks::square), &[])
            .unwrap(),
        vec![]
    );
    // the worker knows who it is
    let (name, pid, is_worker) =
        w.call::<_, (String, u32, bool)>(task::batch_ref(tasks::whoami), ());
    assert_eq!(name, format!("{}-1", method.worker_name_prefix()));
    assert_eq!(pid, w.worker.pid());
    assert!(is_worker);
    assert_eq!(pool_spawn::current_process().name(), "MainProcess");
    w.exit();
    l.shutdown().unwrap();
}
per_method!(run_tasks, super::run_tasks);

fn panic_in_task(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 2);
    w.setup();
    let r = w
        .run::<(i32,), i32>(1, task::batch_ref(tasks::boom), &[(1,), (3,), (5,)])
        .unwrap();
    assert_eq!(r[0], Ok(10));
    assert_eq!(r[2], Ok(50));
    let e = r[1].clone().unwrap_err();
    assert_eq!(e.kind, ItemErrorKind::Panicked);
    assert!(e.message.contains("boom at 3"), "{}", e.message);
    assert!(
        e.message.contains("tasks.rs:"),
        "location missing: {}",
        e.message
    );
    // A whole-batch panic in a closure too; the worker survives both.
    let r = w.run::<(), u8>(
        2,
        task::batch_ref(|| -> u8 { panic!("closure says no") }),
        &[()],
    );
    let e = r.unwrap()[0].clone().unwrap_err();
    assert!(e.message.contains("closure says no"), "{}", e.message);
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(tasks::square), (9u64,)),
        81
    );
    w.exit();
}
per_method!(panic_in_task, super::panic_in_task);

fn killed_worker(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 3);
    w.setup();
    w.worker.signal(Signal::KILL).unwrap();
    w.expect_eof();
    let s = w.wait();
    assert_eq!(s.signal(), Some(9), "{s}");
    assert_eq!(s.signal_name(), Some("SIGKILL"));
    assert_eq!(s.to_string(), "signal 9 (SIGKILL)");
    assert_gone(w.worker.pid());
    // Signalling a reaped worker is an error, not a stray kill.
    assert!(w.worker.signal(Signal::KILL).is_err());
}
per_method!(killed_worker, super::killed_worker);

fn abort_in_task(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 4);
    w.setup();
    w.send_run::<()>(1, task::batch_ref(tasks::abort_now), &[()]);
    w.expect_eof();
    let s = w.wait();
    assert_eq!(
        s.signal(),
        Some(rustix::process::Signal::ABORT.as_raw()),
        "{s}"
    );
    assert_eq!(s.signal_name(), Some("SIGABRT"));
    assert_gone(w.worker.pid());
}
per_method!(abort_in_task, super::abort_in_task);

fn exit_in_task(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 5);
    w.setup();
    w.send_run(1, task::batch_ref(tasks::exit_with), &[(3,)]);
    w.expect_eof();
    let s = w.wait();
    assert_eq!(s.code(), Some(3), "{s}");
    assert_eq!(s.to_string(), "exit code 3");
    assert_gone(w.worker.pid());
}
per_method!(exit_in_task, super::exit_in_task);

fn max_tasks(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 6);
    match w.setup_with(Some(2), None, pool_spawn::protocol::ImageId::current()) {
        pool_spawn::protocol::FromWorker::Ready { .. } => {}
        other => panic!("expected Ready, got {other:?}"),
    }
    let f = task::batch_ref(tasks::square);
    assert_eq!(w.run::<_, u64>(1, f, &[(2u64,)]).unwrap(), vec![Ok(4)]);
    // Queue two more in one write: the worker answers the first of them (its second run)
    // and exits without reading the other.
    for (id, x) in [(2, 3u64), (3, 4u64)] {
        let payload = ByteBuf::from(postcard::to_allocvec(&[(x,)][..]).unwrap());
        w.chan
            .feed(&ToWorker::Run {
                id,
                func: f,
                timed: false,
                payload,
            })
            .unwrap();
    }
    w.chan.flush().unwrap();
    assert_eq!(w.done::<u64>(2).unwrap(), vec![Ok(9)]);
    w.expect_eof();
    assert!(w.wait().success());
    assert_gone(w.worker.pid());
}
per_method!(max_tasks, super::max_tasks);

fn terminate_busy(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 7);
    w.setup();
    w.send_run(1, task::batch_ref(tasks::sleep_ms), &[(60_000u64,)]);
    std::thread::sleep(Duration::from_millis(50));
    let s = w.worker.terminate(Duration::from_secs(5)).unwrap();
    // A worker answers SIGTERM by killing its whole process group (itself included).
    assert_eq!(
        s.signal(),
        Some(rustix::process::Signal::KILL.as_raw()),
        "{s}"
    );
    assert!(s.sent_by_pool(), "{s}");
    assert_gone(w.worker.pid());
    // Idempotent.
    assert_eq!(w.worker.terminate(Duration::ZERO).unwrap(), s);
}
per_method!(terminate_busy, super::terminate_busy);

fn drop_kills(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 8);
    w.setup();
    let pid = w.worker.pid();
    drop(w);
    assert_gone(pid);
    l.shutdown().unwrap();
}
per_method!(drop_kills, super::drop_kills);

fn group_signal_reaches_grandchildren(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 9);
    w.setup();
    let grandchild: u32 = w.call(task::batch_ref(tasks::start_grandchild), ());
    assert!(driver::alive(grandchild));
    w.worker.signal_group(Signal::KILL).unwrap();
    let s = w.wait();
    assert_eq!(s.signal(), Some(9));
    assert_dies(grandchild, driver::WAIT);
}
per_method!(
    group_signal_reaches_grandchildren,
    super::group_signal_reaches_grandchildren
);

fn ignores_sigint(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 10);
    w.setup();
    w.worker.signal(Signal::INT).unwrap();
    w.worker.signal_group(Signal::INT).unwrap();
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(tasks::square), (5u64,)),
        25
    );
    assert!(w.worker.try_wait().unwrap().is_none());
    w.exit();
}
per_method!(ignores_sigint, super::ignores_sigint);

fn several_workers(method: StartMethod) {
    let mut l = launcher(method);
    let mut ws: Vec<_> = (1..=4).map(|n| launch(&mut l, n)).collect();
    for w in &mut ws {
        w.setup();
    }
    for (i, w) in ws.iter_mut().enumerate() {
        let x = i as u64 + 2;
        assert_eq!(
            w.call::<_, u64>(task::batch_ref(tasks::square), (x,)),
            x * x
        );
    }
    // Each worker is its own process group leader.
    for w in &ws {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.worker.pid())).unwrap();
        let pgrp: u32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(pgrp, w.worker.pid());
    }
    for w in ws {
        w.exit();
    }
    l.shutdown().unwrap();
}
per_method!(several_workers, super::several_workers);
