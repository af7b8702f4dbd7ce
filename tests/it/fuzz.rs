//! Hostile-worker fuzz: tasks write generated inputs to their own channel (random bytes,
//! crafted frame headers, frames of garbage, real worker messages with random fields and
//! out of turn, concatenations of these, now and then a frame that stops half-way). A
//! seeded generator makes every input reproducible (the seed is printed). Each input runs
//! beside a bystander task: the parent never hangs (every wait is bounded), its memory stays
//! bounded, the bystander always gets its correct result, and only the offender's own task
//! may fail.
//!
//! [`hostile_worker_fuzz`] runs 600 inputs in CI (about 40 s: each pool takes 8, as many as
//! its restart pacing replaces at once); `cargo xtask fuzz` runs
//! [`fuzz_long`] (ignored here), a million by default.

use std::time::{Duration, Instant};

use pool_spawn::protocol::{FromWorker, SetupFailure};
use pool_spawn::task::{ItemError, ItemErrorKind};
use procpool::{StartMethod, TaskErrorKind};
use serde_bytes::ByteBuf;

use crate::util::{
    METHODS, alive, builder, env_number, rss_kib, seed_from_env, square, wait_for, write_to_channel,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next() >> 24) as u8).collect()
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A worker message with random fields; `ids` bounds the task ids (the pool's are small,
/// so some forge results for real tasks, the offender's own or a bystander's).
fn message(r: &mut Rng, ids: u64) -> FromWorker {
    let id = if r.below(8) == 0 {
        r.next()
    } else {
        r.below(ids)
    };
    let items = [0, 1, 1, 2, 7, u64::MAX][r.below(6) as usize];
    let len = r.below(24) as usize;
    let bytes = ByteBuf::from(r.bytes(len));
    match r.below(8) {
        0 => FromWorker::Ready {
            pid: r.next() as u32,
        },
        1 => FromWorker::SetupFailed {
            reason: if r.below(2) == 0 {
                SetupFailure::Initializer
            } else {
                SetupFailure::ImageMismatch
            },
            message: "forged".to_owned(),
        },
        2 => FromWorker::Done {
            id,
            items,
            outcome: Ok(bytes),
        },
        3 => FromWorker::Done {
            id,
            items,
            outcome: Err(ItemError::new(
                [
                    ItemErrorKind::Panicked,
                    ItemErrorKind::Encode,
                    ItemErrorKind::Decode,
                ][r.below(3) as usize],
                "forged",
            )),
        },
        4 => FromWorker::Part {
            id,
            items,
            results: bytes,
        },
        5 => FromWorker::Skipped { id },
        6 => FromWorker::PartTail {
            id,
            head: bytes,
            len: [0, 1, 300_000, r.next()][r.below(4) as usize],
        },
        _ => FromWorker::Recycling { rss: r.next() },
    }
}

/// One piece of an input.
fn piece(r: &mut Rng, ids: u64) -> Vec<u8> {
    match r.below(6) {
        // Random bytes.
        0 => {
            let n = r.below(2048) as usize + 1;
            r.bytes(n)
        }
        // A header, plain or control, with a few bytes after it.
        1 => {
            let len = match r.below(4) {
                0 => r.next() as u32,
                1 => 0x8000_0000 | r.below(64) as u32,
                2 => r.below(1 << 30) as u32,
                _ => 0,
            };
            let mut v = len.to_le_bytes().to_vec();
            let tail = r.below(16) as usize;
            v.extend(r.bytes(tail));
            v
        }
        // A complete frame of garbage.
        2 => {
            let n = r.below(256) as usize;
            frame(&r.bytes(n))
        }
        // A control frame with a known kind and random fields.
        3 => {
            let body_len = [4usize, 8, 12, 16][r.below(4) as usize];
            let mut body = (r.below(5) as u32).to_le_bytes().to_vec();
            body.extend(r.bytes(body_len - 4));
            let mut v = (0x8000_0000u32 | body_len as u32).to_le_bytes().to_vec();
            v.extend(body);
            v
        }
        // A real message, out of turn or forged.
        _ => frame(&postcard::to_allocvec(&message(r, ids)).unwrap()),
    }
}

/// Input number `n` of the run seeded `seed`: a few pieces; rarely, the last one cut short
/// (it then costs the parent's stall limit, 5 s, on that worker).
fn input(seed: u64, n: u64, ids: u64, cut_one_in: u64) -> Vec<u8> {
    let mut r = Rng(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v = Vec::new();
    for _ in 0..1 + r.below(3) {
        v.extend(piece(&mut r, ids));
    }
    if r.below(cut_one_in) == 0 && v.len() > 1 {
        let cut = 1 + r.below(v.len() as u64 - 1) as usize;
        v.truncate(cut);
    }
    v
}

/// What a fuzz run came to.
#[derive(Debug, Default)]
struct Figures {
    inputs: u64,
    pools: u64,
    offender_failed: u64,
    offender_ok: u64,
    bystanders: u64,
    slowest: Duration,
    rss_growth_kib: u64,
}

/// Runs inputs `from..to` of `seed` under `method`, `per_pool` to a pool.
fn fuzz(seed: u64, method: StartMethod, from: u64, to: u64, f: &mut Figures) {
    // Inputs to a pool; one in CUT is cut short.
    const PER_POOL: u64 = 8;
    const CUT: u64 = 5000;
    let per_pool = PER_POOL;
    let mut n = from;
    while n < to {
        let pool = builder(method).processes(3).build().unwrap();
        f.pools += 1;
        let end = to.min(n + per_pool);
        for k in n..end {
            let bytes = input(seed, k, 4 * per_pool, CUT);
            let what = format!("seed {seed} input {k} ({method:?}, {} bytes)", bytes.len());
            let t = Instant::now();
            let offender = pool.apply_async(write_to_channel, (bytes,));
            let x = k % 1000;
            let bystander = pool.apply_async(square, (x,));
            let got = offender
                .get_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{what}: the offender's task hangs ({e})"));
            match got {
                Ok(_) => f.offender_ok += 1,
                // Any failure of its own task is fair (a forged result for it may say it
                // panicked); a pool-wide one is not.
                Err(e) => {
                    assert!(
                        !matches!(
                            e.kind(),
                            TaskErrorKind::PoolClosed
                                | TaskErrorKind::StartFailed
                                | TaskErrorKind::InitializerFailed
                        ),
                        "{what}: {e}"
                    );
                    f.offender_failed += 1;
                }
            }
            let b = bystander
                .get_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{what}: the bystander hangs ({e})"));
            assert_eq!(
                b.as_ref().ok(),
                Some(&(x * x)),
                "{what}: the bystander: {b:?}"
            );
            f.bystanders += 1;
            f.slowest = f.slowest.max(t.elapsed());
            f.inputs += 1;
        }
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
        pool.close();
        pool.join_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("seed {seed} inputs {n}..{end} ({method:?}): join: {e}"));
        drop(pool);
        for pid in pids {
            wait_for("a worker to be gone", Duration::from_secs(5), || {
                !alive(pid)
            });
        }
        n = end;
    }
}

#[test]
fn hostile_worker_fuzz() {
    let seed = 0xf022;
    let t = Instant::now();
    let mut f = Figures::default();
    let before = rss_kib();
    for (k, method) in METHODS.into_iter().enumerate() {
        let k = k as u64;
        fuzz(seed, method, k * 1000, k * 1000 + 200, &mut f);
    }
    f.rss_growth_kib = rss_kib().saturating_sub(before);
    eprintln!("fuzz: seed {seed}: {f:?} in {:?}", t.elapsed());
    assert!(f.rss_growth_kib < 64 * 1024, "{f:?}");
}

/// `cargo xtask fuzz`: `PROCPOOL_FUZZ_INPUTS` inputs (default a million) from seed
/// `PROCPOOL_FUZZ_SEED` (default: the clock), start methods in turn; prints the figures.
#[test]
#[ignore = "long: cargo xtask fuzz"]
fn fuzz_long() {
    let inputs = env_number("PROCPOOL_FUZZ_INPUTS").unwrap_or(1_000_000);
    let seed = seed_from_env("PROCPOOL_FUZZ_SEED");
    println!("fuzz: seed {seed}, {inputs} inputs (rerun: cargo xtask fuzz --seed {seed})");
    let t = Instant::now();
    let mut f = Figures::default();
    let before = rss_kib();
    let block = 1000;
    let mut n = 0;
    while n < inputs {
        let method = METHODS[(n / block) as usize % METHODS.len()];
        let end = inputs.min(n + block);
        fuzz(seed, method, n, end, &mut f);
        n = end;
        if (n / block).is_multiple_of(10) || n == inputs {
            println!(
                "  {n} inputs, {:.0} s, parent rss +{} KiB",
                t.elapsed().as_secs_f64(),
                rss_kib().saturating_sub(before)
            );
        }
    }
    f.rss_growth_kib = rss_kib().saturating_sub(before);
    println!(
        "fuzz: seed {seed}: {} inputs in {} pools, offender failed {} / ok {}, bystanders all \
         correct ({}), slowest input {:?}, parent rss +{} KiB, wall time {:.1} s",
        f.inputs,
        f.pools,
        f.offender_failed,
        f.offender_ok,
        f.bystanders,
        f.slowest,
        f.rss_growth_kib,
        t.elapsed().as_secs_f64()
    );
    assert!(f.rss_growth_kib < 64 * 1024, "{f:?}");
}

/// Reruns one input alone: `S=seed K=input M=method-index cargo test fuzz_one -- --ignored`.
#[test]
#[ignore = "by hand: one input of a failed run"]
fn fuzz_one() {
    let seed: u64 = std::env::var("S").unwrap().parse().unwrap();
    let k: u64 = std::env::var("K").unwrap().parse().unwrap();
    let m: usize = std::env::var("M").unwrap().parse().unwrap();
    let b = input(seed, k, 40, 5000);
    eprintln!("input {k}: {b:?}");
    let mut f = Figures::default();
    fuzz(seed, METHODS[m], k, k + 1, &mut f);
    eprintln!("{f:?}");
}
