//! The scheduling policy's cost per task, with workers that start and answer at once: what
//! the pool's own bookkeeping adds to every task, apart from processes and I/O.
//!
//! `cargo bench -p pool-core` (part of `cargo xtask bench`). After criterion's own
//! measurements, a bench run (not `cargo test`) also measures the pool sizes interleaved:
//! round after round, one run of each size, in an order that rotates, so that a slow
//! minute of a shared machine falls on every size alike rather than on whichever size
//! criterion was measuring then. Each round gives each size's ratio to 2 workers; the
//! median of those ratios is the figure. With `PROCPOOL_DISPATCH_OUT` set, it is written
//! there as JSON for `cargo xtask bench`'s report.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use pool_core::__bench_policy::run;

const TASKS: u64 = 10_000;
const SIZES: [usize; 4] = [2, 16, 64, 256];

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_per_task");
    g.throughput(Throughput::Elements(TASKS));
    for workers in SIZES {
        g.bench_function(format!("submit_dispatch_done/{workers}_workers"), |b| {
            b.iter(|| assert_eq!(run(black_box(TASKS), workers, None), TASKS));
        });
    }
    g.bench_function("submit_dispatch_done/2_workers_recycle_every_task", |b| {
        b.iter(|| assert_eq!(run(black_box(TASKS), 2, Some(1)), TASKS));
    });
    g.finish();
}

criterion_group!(benches, policy);

/// Time per task of one run of `workers`, in ns.
fn one_run(workers: usize) -> f64 {
    let t = Instant::now();
    assert_eq!(run(black_box(TASKS), workers, None), TASKS);
    t.elapsed().as_nanos() as f64 / TASKS as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The sizes measured in rotating rounds for `budget`: per size, the median time per task
/// and the median of its per-round ratios to 2 workers.
fn interleaved(budget: Duration) -> Vec<(usize, f64, f64)> {
    for &w in &SIZES {
        one_run(w); // warm up
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < budget || round < 3 {
        let mut this = [0.0; SIZES.len()];
        for k in 0..SIZES.len() {
            let i = (k + round) % SIZES.len();
            this[i] = one_run(SIZES[i]);
        }
        for i in 0..SIZES.len() {
            times[i].push(this[i]);
            ratios[i].push(this[i] / this[0]);
        }
        round += 1;
    }
    SIZES
        .iter()
        .zip(times.into_iter().zip(ratios))
        .map(|(&w, (t, r))| (w, median(t), median(r)))
        .collect()
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (criterion then runs
    // each function once, as a test), and then neither does this.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rows = interleaved(Duration::from_secs(4));
    let mut json = String::from("[");
    for (n, (w, ns, ratio)) in rows.iter().enumerate() {
        println!("interleaved {w:>3} workers: {ns:.1} ns per task, {ratio:.2}x 2 workers");
        if n > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"workers\":{w},\"ns_per_task\":{ns:.2},\"ratio_to_2\":{ratio:.4}}}"
        ));
    }
    json.push(']');
    if let Ok(path) = std::env::var("PROCPOOL_DISPATCH_OUT")
        && let Err(e) = std::fs::write(&path, json)
    {
        eprintln!("write {path}: {e}");
    }
}
