//! The scheduling policy's cost per task, with workers that start and answer at once: what
//! the pool's own bookkeeping adds to every task, apart from processes and I/O.
//!
//! `cargo bench -p pool-core` (part of `cargo xtask bench`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pool_core::__bench_policy::run;

const TASKS: u64 = 10_000;

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_per_task");
    g.throughput(Throughput::Elements(TASKS));
    for workers in [2usize, 16, 64, 256] {
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
criterion_main!(benches);
