//! Worker lifetime: recycling, replacement, shutdown, and what is left behind (nothing).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use procpool::{Options, Pool, TaskErrorKind, current_process};

use crate::util::{
    METHODS, alive, builder, my_pid, parent_of, shut_down, sleep_ms, square, status_kib, wait_for,
};

fn worker_name(_x: u32) -> String {
    current_process().name().to_string()
}

/// Two workers, three tasks each, ten tasks; names change every three tasks (the
/// `max_tasks_per_child` example).
#[test]
fn max_tasks_per_child_replaces_workers_after_three_tasks() {
    for method in METHODS {
        let pool = builder(method).max_tasks_per_child(3).build().unwrap();
        let pending: Vec<_> = (0..10)
            .map(|i| pool.apply_async(worker_name, (i,)))
            .collect();
        let names: Vec<String> = pending.into_iter().map(|r| r.get().unwrap()).collect();
        let mut per_worker = std::collections::BTreeMap::<String, usize>::new();
        for n in &names {
            *per_worker.entry(n.clone()).or_default() += 1;
        }
        assert!(
            per_worker.values().all(|&c| c <= 3),
            "{method:?}: {per_worker:?}"
        );
        assert!(
            per_worker.len() >= 4,
            "{method:?}: at least four workers: {per_worker:?}"
        );
        let prefix = method.worker_name_prefix();
        assert!(names.iter().all(|n| n.starts_with(prefix)));
        assert!(per_worker.contains_key(&format!("{prefix}-1")));
        assert!(per_worker.contains_key(&format!("{prefix}-4")));
        let m = pool.metrics();
        assert_eq!(m.died, 0, "recycles are not crashes");
        shut_down(pool);
    }
}

/// When it ran, in nanoseconds since the epoch (one clock for every process).
fn timed_sleep(ms: u64) -> (u64, u64) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let start = now();
    std::thread::sleep(Duration::from_millis(ms));
    (start, now())
}

/// The most intervals that overlap at any instant.
fn max_overlap(spans: &[(u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    // At equal times an end comes before a start: touching intervals do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// Recycling never runs more tasks at once than `processes`, although each replacement
/// starts before the worker it replaces has finished.
#[test]
fn recycling_never_runs_more_than_processes_tasks_at_once() {
    for method in METHODS {
        let pool = builder(method).max_tasks_per_child(1).build().unwrap();
        let spans = pool
            .map_with(timed_sleep, vec![60u64; 8], Options::new().chunksize(1))
            .unwrap();
        let most = max_overlap(&spans);
        assert!(most <= 2, "{method:?}: {most} tasks ran at once: {spans:?}");
        let m = pool.metrics();
        assert!(m.recycled >= 6, "{method:?}: {m:?}");
        shut_down(pool);
    }
}

/// CPython's test_pool_worker_lifetime: 3 workers, 10 tasks each, 100 tasks: results right,
/// and the worker pids changed.
#[test]
fn pool_worker_lifetime() {
    let pool = Pool::builder()
        .processes(3)
        .max_tasks_per_child(10)
        .build()
        .unwrap();
    assert_eq!(pool.workers().len(), 3);
    let original: BTreeSet<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    let results: Vec<_> = (0..100u64)
        .map(|i| pool.apply_async(square, (i,)))
        .collect();
    for (j, r) in results.into_iter().enumerate() {
        assert_eq!(r.get().unwrap(), (j * j) as u64);
    }
    // Every worker that reached 10 tasks retires, is reaped and counted as a recycle (not a
    // crash) and is replaced. Live workers hold fewer than 10 each, so at least
    // ceil((100 - 27) / 10) = 8 workers retired.
    wait_for(
        "every retired worker reaped and replaced",
        Duration::from_secs(10),
        || {
            let m = pool.metrics();
            pool.workers().len() == 3 && m.recycled + 3 == m.workers_started
        },
    );
    assert!(pool.metrics().recycled >= 8, "{:?}", pool.metrics());
    let now: BTreeSet<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    // As CPython asserts: the set of worker pids changed.
    assert_ne!(original, now);
    let m = pool.metrics();
    assert_eq!((m.died, m.lost), (0, 0), "{m:?}");
    shut_down(pool);
}

#[test]
fn terminate_fails_pending_tasks_and_reaps_workers_quickly() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
        let running: Vec<_> = (0..6)
            .map(|_| pool.apply_async(sleep_ms, (10_000,)))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        pool.terminate();
        pool.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{method:?}: terminate is prompt"
        );
        for r in running {
            assert_eq!(r.get().unwrap_err().kind(), TaskErrorKind::PoolClosed);
        }
        for pid in pids {
            assert!(!alive(pid), "{method:?}: worker {pid} reaped");
        }
    }
}

#[test]
fn terminating_while_a_spawned_replacement_starts_is_prompt() {
    // Each task retires its worker, whose replacement (spawned: milliseconds to load and
    // answer) is still starting when the pool is terminated: it is stopped, not waited for,
    // and the pool's end is as prompt as ever.
    for _ in 0..5 {
        let pool = builder(procpool::StartMethod::Spawn)
            .processes(1)
            .max_tasks_per_child(1)
            .build()
            .unwrap();
        let first = pool.apply(my_pid, ()).unwrap();
        let t = Instant::now();
        pool.terminate();
        pool.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        assert!(!alive(first), "worker {first} reaped");
        assert!(pool.workers().is_empty());
    }
}

#[test]
fn dropping_a_pool_terminates_and_reaps_it() {
    let pool = builder(Default::default()).build().unwrap();
    let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    let pending = pool.apply_async(sleep_ms, (10_000,));
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(pool);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(pending.get().unwrap_err().kind(), TaskErrorKind::PoolClosed);
    for pid in pids {
        assert!(!alive(pid));
    }
}

#[test]
fn close_then_join_drains_the_queue() {
    let pool = builder(Default::default()).build().unwrap();
    let pending: Vec<_> = (0..8).map(|_| pool.apply_async(sleep_ms, (20,))).collect();
    pool.close();
    pool.join().unwrap();
    for r in pending {
        assert!(r.get().is_ok());
    }
}

#[test]
fn join_timeout_escalates_and_returns() {
    let pool = builder(Default::default()).build().unwrap();
    let stuck = pool.apply_async(sleep_ms, (60_000,));
    pool.close();
    let t = Instant::now();
    assert!(pool.join_timeout(Duration::from_millis(200)).is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(stuck.get().unwrap_err().kind(), TaskErrorKind::PoolClosed);
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Each open fd above 2 and what it points at.
fn list_fds() -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .filter(|(fd, _)| *fd > 2)
        .collect();
    v.sort();
    v
}

/// A worker holds stdio, its channel and its progress page, nothing of the parent's.
#[test]
fn workers_inherit_no_stray_fds() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let fds = pool.apply(list_fds, ()).unwrap();
        let sockets = fds.iter().filter(|(_, t)| t.starts_with("socket:")).count();
        let pages = fds
            .iter()
            .filter(|(_, t)| t.contains("memfd:procpool-progress"))
            .count();
        // Besides those, only the directory read_dir opened to list them.
        let others: Vec<_> = fds
            .iter()
            .filter(|(_, t)| {
                !t.starts_with("socket:")
                    && !t.contains("memfd:procpool-progress")
                    && !t.ends_with("/fd")
            })
            .collect();
        assert_eq!((sockets, pages), (1, 1), "{method:?}: worker fds {fds:?}");
        assert!(others.is_empty(), "{method:?}: stray fds {others:?}");
        shut_down(pool);
    }
}

/// Run in a fresh process (re-exec) so that other tests' threads cannot disturb the count.
#[test]
#[ignore = "helper: run via re-exec"]
fn helper_fd_balance() {
    let before = count_fds();
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
        let _ = pool.apply(my_pid, ());
        shut_down(pool);
    }
    let after = count_fds();
    assert_eq!(
        before, after,
        "fds leaked by pools: {before} before, {after} after"
    );
}

#[test]
fn pools_leave_no_fd_behind() {
    let out = crate::util::helper_passed(
        "lifetime::helper_fd_balance",
        Duration::from_secs(60),
        "the fd balance helper",
    );
    assert!(out.contains("1 passed"), "{out}");
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// A stopped (SIGSTOP) fork server is given up within about a second and a new one forks
/// the replacement: the driver is not held for the 15 s handshake timeout. The server may
/// have forked its spare worker (handed out without a word from it) before it stopped, so
/// the first replacement can come without asking it: workers are killed until one has to.
#[test]
fn a_stopped_fork_server_is_replaced_quickly() {
    use rustix::process::Signal;
    let pool = builder(procpool::StartMethod::Forkserver)
        .processes(1)
        .build()
        .unwrap();
    let mut worker = pool.apply(my_pid, ()).unwrap();
    let server = parent_of(worker);
    signal(server, Signal::STOP);
    // The spare, if there was one, and then one the stopped server would have to fork.
    for _ in 0..2 {
        signal(worker, Signal::KILL);
        let t = Instant::now();
        let r = pool.apply_async(my_pid, ());
        worker = r.get_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
    }
    assert_ne!(parent_of(worker), server, "forked by a new server");
    assert_eq!(pool.apply(square, (3,)).unwrap(), 9);
    wait_for(
        "the stopped server to be reaped",
        Duration::from_secs(5),
        || !alive(server),
    );
    shut_down(pool);
}

fn shmem_kib(pid: u32) -> u64 {
    status_kib(pid, "RssShmem").unwrap_or(0)
}

fn echo_bytes(b: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf {
    b
}

/// The shared rings that carry large payloads give their memory back once they have sat
/// unused for a second, in both directions: after forty 8 MiB round trips, the pool's
/// process and its worker each hold tens of MiB of shared memory; a few seconds later,
/// almost none (and the pool still carries large payloads).
#[test]
fn idle_shared_rings_give_their_memory_back() {
    let pool = builder(Default::default()).processes(1).build().unwrap();
    let worker = pool.apply(my_pid, ()).unwrap();
    let me = std::process::id();
    let (before_me, before_worker) = (shmem_kib(me), shmem_kib(worker));
    let payload = serde_bytes::ByteBuf::from(vec![7u8; 8 << 20]);
    for _ in 0..40 {
        let back = pool.apply(echo_bytes, (payload.clone(),)).unwrap();
        assert_eq!(back.len(), payload.len());
    }
    let (held_me, held_worker) = (shmem_kib(me), shmem_kib(worker));
    assert!(
        held_me > before_me + 16 * 1024 && held_worker > before_worker + 16 * 1024,
        "the rings should hold memory now: {before_me} -> {held_me} KiB here, \
         {before_worker} -> {held_worker} KiB in the worker"
    );
    wait_for(
        "the idle rings to give memory back",
        Duration::from_secs(10),
        || shmem_kib(me) < before_me + 4 * 1024 && shmem_kib(worker) < before_worker + 4 * 1024,
    );
    let back = pool.apply(echo_bytes, (payload.clone(),)).unwrap();
    assert_eq!(back, payload);
    assert_eq!(pool.apply(my_pid, ()).unwrap(), worker);
    shut_down(pool);
}

/// The processes a process forked and has not reaped yet, from `/proc` (each thread lists
/// those it forked).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
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

/// The worker's parent: the fork server (or zygote).
fn parent_pid(_x: u32) -> u32 {
    std::os::unix::process::parent_id()
}

fn pid_of_task(_x: u32) -> u32 {
    std::process::id()
}

/// A pool that replaces its workers after every task has its next workers forked ahead
/// (waiting in the pool, and as the server's spares); those killed before they are used
/// are passed over: every task after runs once, each in a fresh worker, none in a killed
/// one.
#[test]
fn workers_forked_ahead_that_die_before_use_are_passed_over() {
    for method in [
        procpool::StartMethod::Forkserver,
        procpool::StartMethod::Fork,
    ] {
        let pool = builder(method).max_tasks_per_child(1).build().unwrap();
        let server = pool
            .map_with(parent_pid, 0..20u32, Options::new().chunksize(1))
            .unwrap()[19];
        // The spares are forked while the map's last tasks run, and may not be there yet
        // when it returns (two busy CPUs): they are waited for, a bounded while.
        let mut idle: Vec<u32> = Vec::new();
        wait_for(
            &format!("{method:?}: a worker forked ahead"),
            Duration::from_secs(10),
            || {
                let workers: BTreeSet<u32> = pool.workers().iter().map(|w| w.pid()).collect();
                idle = children_of(server)
                    .into_iter()
                    .filter(|p| !workers.contains(p))
                    .collect();
                !idle.is_empty()
            },
        );
        for &pid in &idle {
            let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        for &pid in &idle {
            wait_for(
                &format!("{method:?}: killed worker {pid} to be gone"),
                Duration::from_secs(5),
                || !alive(pid),
            );
        }
        let pids = pool
            .map_with(pid_of_task, 0..20u32, Options::new().chunksize(1))
            .unwrap();
        let distinct: BTreeSet<u32> = pids.iter().copied().collect();
        assert_eq!(distinct.len(), 20, "{method:?}: one fresh worker per task");
        assert!(
            pids.iter().all(|p| !idle.contains(p)),
            "{method:?}: a killed worker ran a task"
        );
        shut_down(pool);
    }
}

/// A fork server that forked spares ahead while a pool replaced a worker after every task
/// goes back to one spare once no worker has been asked for in a while: an idle pool does not
/// keep up to four idle processes for good.
#[test]
fn the_fork_servers_extra_spares_go_once_the_pool_is_idle() {
    for method in [
        procpool::StartMethod::Forkserver,
        procpool::StartMethod::Fork,
    ] {
        let pool = builder(method).max_tasks_per_child(1).build().unwrap();
        let mut most = 0;
        let mut server = 0;
        for _ in 0..10 {
            let parents = pool.map(parent_pid, 0..40u32).unwrap();
            server = parents[39];
            most = most.max(children_of(server).len());
        }
        // The two workers, and one spare.
        wait_for(
            &format!("{method:?}: the fork server to keep one spare ({most} children at most)"),
            Duration::from_secs(10),
            || children_of(server).len() <= 3,
        );
        println!("{method:?}: {most} children of the fork server at most, then 3 or fewer");
        // It still answers at once.
        assert_eq!(pool.map(square, 0..20u64).unwrap().len(), 20);
        shut_down(pool);
    }
}

/// Under Fork, the pool's initial workers are this process's own children (`build` forks
/// them beside the zygote), and every replacement is the zygote's: each of six tasks runs
/// in a fresh worker, two of them ours, the rest all the zygote's.
#[test]
fn a_fork_pools_initial_workers_are_forked_by_build_and_the_others_by_its_zygote() {
    let pool = builder(procpool::StartMethod::Fork)
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let parents = pool
        .map_with(parent_pid, 0..6u32, Options::new().chunksize(1))
        .unwrap();
    let me = std::process::id();
    assert_eq!(
        parents.iter().filter(|&&p| p == me).count(),
        2,
        "{parents:?}"
    );
    let zygote = parents.iter().find(|&&p| p != me).copied().unwrap();
    assert!(
        parents.iter().all(|&p| p == me || p == zygote),
        "{parents:?}"
    );
    shut_down(pool);
}
