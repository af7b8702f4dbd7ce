//! Torture: thousands of tasks (apply, map in chunks, imap in chunks, imap_unordered in
//! automatic chunks) while a killer thread SIGKILLs a random busy worker every few
//! milliseconds. Every task gets exactly one correct outcome (its result, or `WorkerLost`),
//! none runs twice (each run appends one line to a file with a single `O_APPEND` write), a
//! dead worker loses at most the one item it was running (its finished items are delivered,
//! the ones it had not begun run elsewhere), and nothing is left behind.
//!
//! The CI-sized run is [`torture_under_every_start_method`]; `cargo xtask torture` runs
//! [`torture_long`] (ignored here) for minutes with payloads up to megabytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use procpool::{Options, Pool, StartMethod, TaskError, TaskErrorKind};
use serde_bytes::ByteBuf;

use crate::util::{METHODS, builder, env_number, seed_from_env, shut_down};

/// One item: the runs file, its id, its payload.
type Item = (String, u64, ByteBuf);

/// The task: records its run (one `O_APPEND` write of "id pid"), works a little, and
/// returns its id with the payload transformed.
fn run_item(item: Item) -> (u64, ByteBuf) {
    let (path, id, payload) = item;
    let line = format!("{id} {}\n", std::process::id());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open the runs file");
    let n = f.write(line.as_bytes()).expect("append a run");
    assert_eq!(n, line.len(), "one write per run");
    // A few tens of microseconds of work, more for some, so kills land mid-task and
    // mid-chunk.
    let spin = Duration::from_micros(20 + (id % 7) * 60);
    let t = Instant::now();
    while t.elapsed() < spin {
        std::hint::spin_loop();
    }
    (id, ByteBuf::from(transform(id, &payload)))
}

fn transform(id: u64, payload: &[u8]) -> Vec<u8> {
    let k = id as u8;
    payload.iter().rev().map(|b| b ^ k).collect()
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Sizes and counts of one round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Round {
    pub(crate) method: StartMethod,
    pub(crate) processes: usize,
    pub(crate) recycle: Option<u64>,
    pub(crate) applies: u64,
    pub(crate) map_items: u64,
    pub(crate) imap_items: u64,
    pub(crate) unordered_items: u64,
    /// The largest payload; most are small (bytes), a few reach it.
    pub(crate) max_payload: usize,
    /// Kills come every 1..=`kill_every_ms` ms (while some busy worker is there to kill).
    pub(crate) kill_every_ms: u64,
    /// At most this many kills: replacing crashed workers is paced (a token bucket of 8,
    /// refilled at 4 a second for a small pool), so more only make a CI round wait.
    pub(crate) max_kills: u64,
    pub(crate) seed: u64,
}

/// What a round came to.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Figures {
    pub(crate) tasks: u64,
    pub(crate) kills: u64,
    pub(crate) lost: u64,
    /// Lost without ever starting: held by three workers in a row that were killed.
    pub(crate) never_started: u64,
    pub(crate) delivered: u64,
    pub(crate) maps_failed: u64,
    pub(crate) run_twice: u64,
    pub(crate) bytes: u64,
}

impl std::ops::AddAssign for Figures {
    fn add_assign(&mut self, o: Figures) {
        self.tasks += o.tasks;
        self.kills += o.kills;
        self.lost += o.lost;
        self.never_started += o.never_started;
        self.delivered += o.delivered;
        self.maps_failed += o.maps_failed;
        self.run_twice += o.run_twice;
        self.bytes += o.bytes;
    }
}

/// The payload of item `id` in a round: deterministic, so the parent knows the answer.
fn payload(seed: u64, id: u64, max: usize) -> Vec<u8> {
    let mut x = seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let r = xorshift(&mut x);
    let len = match r % 100 {
        0 => max,
        1..=3 => (r >> 8) as usize % max.max(1),
        4..=20 => (r >> 8) as usize % 4096.min(max.max(1)),
        _ => (r >> 8) as usize % 64,
    };
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&xorshift(&mut x).to_le_bytes());
    }
    v.truncate(len);
    v
}

static ROUND: AtomicU64 = AtomicU64::new(0);

/// The runs file of a round, removed when dropped.
struct RunsFile(PathBuf);

impl Drop for RunsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pids that have recorded a run (so they are past their start: killing them never
/// counts as a failed start), read incrementally from the runs file.
struct Busy {
    file: std::fs::File,
    partial: String,
    pids: HashSet<u32>,
}

impl Busy {
    fn refresh(&mut self) {
        let mut s = String::new();
        let _ = self.file.read_to_string(&mut s);
        self.partial.push_str(&s);
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            if let Some(pid) = line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                self.pids.insert(pid);
            }
        }
    }
}

/// SIGKILLs `pid` if it is still one of `pool`'s workers (through a pidfd, checked after it
/// is opened: the pid cannot have been reused by then).
fn kill_worker(pool: &Pool, pid: u32) -> bool {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let Some(p) = Pid::from_raw(pid as i32) else {
        return false;
    };
    let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else {
        return false;
    };
    if !pool.workers().iter().any(|w| w.pid() == pid) {
        return false;
    }
    pidfd_send_signal(&fd, Signal::KILL).is_ok()
}

/// One outcome, as the checks need it.
enum Outcome {
    Ok,
    Lost {
        worker: String,
        pid: Option<u32>,
        started: bool,
    },
}

fn lost(e: &TaskError, what: &str) -> Outcome {
    assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{what}: {e}");
    Outcome::Lost {
        worker: e
            .worker_name()
            .expect("a lost task names its worker")
            .to_owned(),
        pid: e.pid(),
        // A task that workers kept dying with before they began it fails too (three in a
        // row: it may be what kills them), saying so; under this killer it happens.
        started: !e.to_string().contains(" before starting "),
    }
}

/// Runs one round and checks it; returns its figures.
pub(crate) fn round(r: Round) -> Figures {
    let n = ROUND.fetch_add(1, Ordering::Relaxed);
    let file =
        RunsFile(std::env::temp_dir().join(format!("procpool-torture-{}-{n}", std::process::id())));
    std::fs::File::create(&file.0).expect("create the runs file");
    let path = file.0.to_string_lossy().into_owned();
    let what = format!("{r:?}");

    let mut b = builder(r.method).processes(r.processes);
    if let Some(k) = r.recycle {
        b = b.max_tasks_per_child(k);
    }
    let pool = b.build().unwrap();
    let item = |id: u64| -> Item {
        (
            path.clone(),
            id,
            ByteBuf::from(payload(r.seed, id, r.max_payload)),
        )
    };
    let check = |id: u64, got: &(u64, ByteBuf)| {
        assert_eq!(got.0, id, "{what}: a result for another item");
        let want = transform(id, &payload(r.seed, id, r.max_payload));
        assert!(*got.1 == want, "{what}: wrong result for item {id}");
    };
    // How item `id` came out: its result (checked, its bytes counted) or its worker lost.
    let outcome = |id: u64, got: Result<(u64, ByteBuf), TaskError>, figures: &mut Figures| match got
    {
        Ok(v) => {
            check(id, &v);
            figures.bytes += v.1.len() as u64;
            Outcome::Ok
        }
        Err(e) => lost(&e, &what),
    };

    let stop = AtomicBool::new(false);
    let kills = AtomicU64::new(0);
    let mut outcomes: HashMap<u64, Outcome> = HashMap::new();
    let mut figures = Figures::default();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let limit = Duration::from_secs(60).max(Duration::from_millis(
        (r.applies + r.map_items + r.imap_items + r.unordered_items) * 2,
    ));
    std::thread::scope(|s| {
        // The watchdog: every wait below is bounded by it (an imap's next has no timeout).
        let w = what.clone();
        s.spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
                eprintln!("{w}: hangs (no end within {limit:?}); aborting");
                std::process::abort();
            }
        });
        // The killer.
        s.spawn(|| {
            let mut busy = Busy {
                file: std::fs::File::open(&file.0).expect("open the runs file"),
                partial: String::new(),
                pids: HashSet::new(),
            };
            let mut killed = HashSet::new();
            let mut x = r.seed ^ 0xdead_beef;
            while !stop.load(Ordering::Relaxed) && kills.load(Ordering::Relaxed) < r.max_kills {
                std::thread::sleep(Duration::from_millis(
                    1 + xorshift(&mut x) % r.kill_every_ms,
                ));
                busy.refresh();
                let targets: Vec<u32> = pool
                    .workers()
                    .iter()
                    .map(|w| w.pid())
                    .filter(|p| busy.pids.contains(p) && !killed.contains(p))
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                let pid = targets[xorshift(&mut x) as usize % targets.len()];
                if kill_worker(&pool, pid) {
                    killed.insert(pid);
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        });

        // Ends the killer and the watchdog however this body ends (a failed check too).
        struct End<'a>(&'a AtomicBool, mpsc::Sender<()>);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
                let _ = self.1.send(());
            }
        }
        let _end = End(&stop, done_tx);
        let mut id = 0u64;
        let mut next = || {
            id += 1;
            id
        };
        // apply, all submitted at once.
        let applies: Vec<_> = (0..r.applies)
            .map(|_| {
                let i = next();
                (i, pool.apply_async(run_item, (item(i),)))
            })
            .collect();
        // map, in chunks of 7.
        let map_ids: Vec<u64> = (0..r.map_items).map(|_| next()).collect();
        let map = pool.map_async_with(
            run_item,
            map_ids.iter().map(|&i| item(i)).collect::<Vec<_>>(),
            Options::new().chunksize(7),
        );
        // imap in chunks of 5, in order: the nth result is item n's.
        let imap_ids: Vec<u64> = (0..r.imap_items).map(|_| next()).collect();
        let imap = pool.imap_with(
            run_item,
            imap_ids.iter().map(|&i| item(i)).collect::<Vec<_>>(),
            Options::new().chunksize(5),
        );
        for (k, got) in imap.enumerate() {
            let i = imap_ids[k];
            let o = outcome(i, got, &mut figures);
            assert!(outcomes.insert(i, o).is_none());
        }
        // imap_unordered, automatic chunks: the results carry their ids.
        let un_ids: Vec<u64> = (0..r.unordered_items).map(|_| next()).collect();
        let mut yielded = 0;
        for got in pool.imap_unordered(
            run_item,
            un_ids.iter().map(|&i| item(i)).collect::<Vec<_>>(),
        ) {
            yielded += 1;
            let (i, o) = match got {
                Ok(v) => {
                    assert!(un_ids.contains(&v.0), "{what}: unknown id {}", v.0);
                    check(v.0, &v);
                    figures.bytes += v.1.len() as u64;
                    (v.0, Outcome::Ok)
                }
                Err(e) => {
                    // The item's place in the input.
                    let k = e.item_index().expect("an imap error names its item");
                    (un_ids[k], lost(&e, &what))
                }
            };
            assert!(outcomes.insert(i, o).is_none(), "{what}: {i} twice");
        }
        assert_eq!(
            yielded,
            un_ids.len(),
            "{what}: imap_unordered yields each item once"
        );
        for (i, a) in applies {
            let got = a
                .get_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{what}: apply {i} hangs ({e})"));
            let o = outcome(i, got, &mut figures);
            assert!(outcomes.insert(i, o).is_none());
        }
        match map
            .get_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: map hangs ({e})"))
        {
            Ok(vs) => {
                assert_eq!(vs.len(), map_ids.len());
                for (i, v) in map_ids.iter().zip(&vs) {
                    check(*i, v);
                    figures.bytes += v.1.len() as u64;
                    outcomes.insert(*i, Outcome::Ok);
                }
            }
            Err(e) => {
                // A map fails as a whole with its first failing item's error.
                let _ = lost(&e, &what);
                figures.maps_failed += 1;
            }
        }
    });
    shut_down(pool);

    // The runs: none twice; a delivered result ran exactly once; a lost one at most once,
    // in the worker that lost it.
    let text = std::fs::read_to_string(&file.0).expect("read the runs file");
    let mut runs: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(i), Some(p)) = (w.next(), w.next()) else {
            panic!("{what}: a torn run record {line:?}");
        };
        runs.entry(i.parse().unwrap())
            .or_default()
            .push(p.parse().unwrap());
    }
    figures.run_twice = runs.values().filter(|v| v.len() > 1).count() as u64;
    assert_eq!(
        figures.run_twice,
        0,
        "{what}: items that ran twice: {:?}",
        runs.iter().filter(|(_, v)| v.len() > 1).collect::<Vec<_>>()
    );
    let mut lost_by_worker: HashMap<&str, u32> = HashMap::new();
    for (i, o) in &outcomes {
        let ran = runs.get(i).map_or(&[][..], |v| &v[..]);
        match o {
            Outcome::Ok => {
                figures.delivered += 1;
                assert_eq!(ran.len(), 1, "{what}: item {i} delivered but ran {ran:?}");
            }
            Outcome::Lost { started: false, .. } => {
                figures.never_started += 1;
                assert!(
                    ran.is_empty(),
                    "{what}: item {i} never started but ran {ran:?}"
                );
            }
            Outcome::Lost { worker, pid, .. } => {
                figures.lost += 1;
                *lost_by_worker.entry(worker).or_default() += 1;
                if let (Some(pid), [ran_in]) = (pid, ran) {
                    assert_eq!(pid, ran_in, "{what}: item {i} lost by another worker");
                }
            }
        }
    }
    // A killed worker loses only the item it was running: the finished ones of its chunk
    // were delivered, the ones it had not begun ran elsewhere.
    for (w, k) in &lost_by_worker {
        if *k != 1 {
            for (i, o) in &outcomes {
                if let Outcome::Lost { worker, pid, .. } = o
                    && worker == w
                {
                    eprintln!("lost {i} pid {pid:?} ran {:?}", runs.get(i));
                }
            }
        }
        assert_eq!(*k, 1, "{what}: worker {w} lost {k} items");
    }
    figures.kills = kills.load(Ordering::Relaxed);
    assert!(
        figures.lost <= figures.kills,
        "{what}: {} lost for {} kills",
        figures.lost,
        figures.kills
    );
    let whole = r.applies + r.imap_items + r.unordered_items;
    assert_eq!(
        outcomes.len() as u64,
        whole
            + if figures.maps_failed == 0 {
                r.map_items
            } else {
                0
            },
        "{what}: every task has one outcome"
    );
    figures.tasks = whole + r.map_items;
    figures
}

#[test]
fn torture_under_every_start_method() {
    let mut total = Figures::default();
    let t = Instant::now();
    for (k, method) in METHODS.into_iter().enumerate() {
        for recycle in [None, Some(40)] {
            let t = Instant::now();
            total += round(Round {
                method,
                processes: 3,
                recycle,
                applies: 400,
                map_items: 300,
                imap_items: 400,
                unordered_items: 400,
                max_payload: 300 << 10,
                kill_every_ms: 8,
                max_kills: 10,
                seed: 0x5eed + k as u64,
            });
            eprintln!("{method:?} {recycle:?}: {:?}", t.elapsed());
        }
    }
    eprintln!("torture: {total:?} in {:?}", t.elapsed());
    assert!(total.kills > 0, "the killer killed nobody");
}

/// `cargo xtask torture`: rounds under every start method, recycling on, payloads from
/// bytes to megabytes, until `PROCPOOL_TORTURE_SECS` (default 120) have passed; prints the
/// figures. With `PROCPOOL_TORTURE_FORK_ONLY` set, every round is the Fork one with
/// recycling after 27 tasks and payloads up to 4 MiB (the rounds that found a replacement
/// worker's held answers delivered twice when its `Ready` was read after them).
#[test]
#[ignore = "minutes long: cargo xtask torture"]
fn torture_long() {
    let secs = env_number("PROCPOOL_TORTURE_SECS").unwrap_or(120);
    let seed = seed_from_env("PROCPOOL_TORTURE_SEED");
    println!("torture: seed {seed}, {secs} s");
    let t = Instant::now();
    let mut total = Figures::default();
    let mut k = 0u64;
    let fork_only = std::env::var_os("PROCPOOL_TORTURE_FORK_ONLY").is_some();
    while t.elapsed() < Duration::from_secs(secs) {
        let method = if fork_only {
            StartMethod::Fork
        } else {
            METHODS[k as usize % METHODS.len()]
        };
        let f = round(Round {
            method,
            processes: 6,
            recycle: Some(if fork_only { 27 } else { 25 + k % 50 }),
            applies: 1000,
            map_items: 1000,
            imap_items: 1000,
            unordered_items: 1000,
            max_payload: if fork_only || k.is_multiple_of(2) {
                4 << 20
            } else {
                64 << 10
            },
            kill_every_ms: 5,
            // Replacements are paced (12 at once, then 6 a second for 6 workers): more
            // kills per round would only make it wait.
            max_kills: 40,
            seed: seed.wrapping_add(k),
        });
        println!("  round {k} {method:?}: {f:?}");
        total += f;
        k += 1;
    }
    println!(
        "torture: {} rounds, {} tasks, {} kills, {} lost (+{} never started), {} delivered, \
         {} maps failed whole, run twice {}, {} MiB of results, wall time {:.1} s",
        k,
        total.tasks,
        total.kills,
        total.lost,
        total.never_started,
        total.delivered,
        total.maps_failed,
        total.run_twice,
        total.bytes >> 20,
        t.elapsed().as_secs_f64()
    );
}
