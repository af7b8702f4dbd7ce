//! `procpool bench`: the standard workloads, one JSON line per run; with `--reference`,
//! CPython's `multiprocessing.Pool` on the same workloads (and with `--procspawn PATH`,
//! procspawn), run by run beside procpool's; with `--out DIR`, a report.
//!
//! The same workloads, names and JSON schema as the CPython reference script
//! (`bench/reference/mp_pool.py`), so a report can set them side by side:
//! `{"system": "procpool-forkserver", "workload": "apply_rtt", "value": 1.2e-5,
//! "unit": "s", "ok": true}` or `{"ok": false, "reason": "..."}`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use procpool::{Options, Pool, StartMethod, TaskErrorKind};
use serde_bytes::ByteBuf;

/// Options of `procpool bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Start methods to measure (default: all three).
    #[arg(long = "method", value_enum)]
    methods: Vec<crate::Method>,
    /// Workloads to run (default: all).
    #[arg(long = "workload", value_enum)]
    workloads: Vec<Workload>,
    /// Runs per workload (at least 11 of map_tiny_auto, echo_1mib and startup, unless
    /// --quick: see `NOISY`).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Smaller counts, and the references (CPython, procspawn) in the first run of each
    /// workload only, for a smoke run (CPython's pools take most of a run's time).
    #[arg(long)]
    quick: bool,
    /// Seconds a single run may take before it is reported as timed out.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Also run CPython's multiprocessing.Pool (`python3`) on the same workloads, run by
    /// run beside procpool's, for ratios measured in the same minutes.
    #[arg(long)]
    reference: bool,
    /// Also run the procspawn comparison program at this path (`bench/procspawn`, built
    /// by `cargo xtask bench`) on the workloads it can do, run by run beside procpool's.
    #[arg(long, value_name = "PATH")]
    procspawn: Option<std::path::PathBuf>,
    /// Write the results, a markdown report and a ratio chart (SVG) into this directory
    /// (the report needs `python3`).
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
    /// Internal: one run, `METHOD:WORKLOAD`, measured in this process.
    #[arg(long, hide = true)]
    one: Option<String>,
}

/// A standard workload, as `--workload` names it; every workload, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum Workload {
    /// Round trip of one apply.
    ApplyRtt,
    /// The same with the caller and the worker held on one CPU.
    ApplyRttOneCpu,
    /// The same with the caller and the worker held on two different CPUs.
    ApplyRttTwoCpus,
    /// 20k tiny tasks, chunk 1.
    MapTinyChunk1,
    /// The same through imap: results in order as they come.
    ImapTinyChunk1,
    /// 200k tiny tasks, automatic chunks.
    MapTinyAuto,
    /// 200 echoes of 1 MiB.
    #[value(name = "echo_1mib", alias = "echo1mib")]
    Echo1mib,
    /// echo_1mib with the payloads in shared memory (SharedBytes), not copied.
    #[value(name = "echo_1mib_shared")]
    Echo1mibShared,
    /// CPU-bound speedup, 2 workers against 1.
    CpuSpeedup,
    /// Start to first result.
    Startup,
    /// max_tasks_per_child = 1.
    Recycle,
    /// SIGKILL to replacement.
    ReplaceLatency,
    /// Parent memory growth over an endless imap.
    ImapMemory,
    /// 20k tiny tasks, chunk 1, each with a time limit.
    MapTinyChunk1Timeout,
    /// A 50 ms limit's TimedOut error, past the limit.
    TimeoutLatency,
    /// Cancel of a running task to its error.
    CancelLatency,
    /// map_tiny_chunk1 with 64 workers, however few the cores.
    #[value(name = "map_tiny_64w")]
    MapTiny64w,
    /// The parent's peak memory growth over a map of 10M tiny items.
    #[value(name = "map_10m_memory")]
    Map10mMemory,
}

impl Workload {
    /// Its `--workload` name, which results and the report use too.
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("no workload is skipped")
            .get_name()
            .to_string()
    }
}

/// Workloads whose median needs more runs than the others: one run of map_tiny_auto lasts
/// some 4 ms, and one of echo_1mib moves 400 MiB through the memory the other processes of
/// this shared machine use too, so their runs spread by 20% or more either way from one
/// run to the next. Five runs gave medians that differed by 20% between start methods
/// whose costs, measured over 101 and 301 interleaved runs, are within 3% of each other
/// (and, per process, the same CPU time and page faults). One run of startup is one pool
/// started in a fresh process, a chain of process wake-ups on both CPUs: two full runs of
/// the same program 40 minutes apart had forkserver medians (of five) of 1.34x and 1.63x
/// their /bin/true floors.
const NOISY: &[&str] = &["map_tiny_auto", "echo_1mib", "startup"];

/// The fewest runs of a [`NOISY`] workload (outside `--quick`). 21 kept the medians within
/// a few percent, but with the references beside them took the full bench past its 15
/// minutes (about 16); 11 keep it near 13.
const NOISY_MIN_RUNS: usize = 11;

/// The references (CPython's pools, procspawn) of one workload run beside each of its
/// runs until they have taken this long in all, and then stop once they have had
/// [`REF_MIN_RUNS`] runs: CPython's pools with a fresh process per task (`recycle`
/// under spawn: 17-56 tasks/s) or many processes took 23 s a run on a slow day, more
/// than all of procpool's runs of every workload, and took the full bench past its 15
/// minutes.
const REF_BUDGET: Duration = Duration::from_secs(20);
/// See [`REF_BUDGET`].
const REF_MIN_RUNS: usize = 3;
/// The references of one workload stop after this long in all even short of
/// [`REF_MIN_RUNS`] runs. CPython's forkserver pool runs some workloads several times slower
/// than its fork and spawn pools here, and unevenly (100 000 results of an imap in 29 s to
/// 70 s, where fork and spawn took 5 s): its three runs of `imap_memory` alone took 165 s of
/// a full bench that went past its 15 minutes. The figures of a workload cut short this way
/// say how many runs they come from (`n=`).
const REF_CAP: Duration = Duration::from_secs(60);

/// How many runs of `workload` to make when `asked` are asked for.
fn runs_of(workload: &str, asked: usize, quick: bool) -> usize {
    if !quick && NOISY.contains(&workload) {
        asked.max(NOISY_MIN_RUNS)
    } else {
        asked.max(1)
    }
}

/// The time limit of `timeout_latency`.
const TIMEOUT_LIMIT: Duration = Duration::from_millis(50);

fn sleep_forever() -> u32 {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn echo(b: ByteBuf) -> ByteBuf {
    b
}

fn echo_shared(b: procpool::SharedBytes) -> procpool::SharedBytes {
    b
}

fn my_pid() -> u32 {
    std::process::id()
}

/// About 20 ms of arithmetic on this kind of machine.
fn burn(n: u64) -> u64 {
    let mut x = n | 1;
    for i in 0..12_000_000u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
    }
    x
}

struct Scale {
    apply_calls: usize,
    tiny_chunk1: u64,
    tiny_auto: u64,
    echo_tasks: usize,
    cpu_tasks: u64,
    recycle_tasks: u64,
    imap_items: usize,
    big_map: u64,
    forks: usize,
    execs: usize,
    ring_mib: usize,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Scale {
                apply_calls: 500,
                tiny_chunk1: 2_000,
                tiny_auto: 20_000,
                echo_tasks: 20,
                cpu_tasks: 4,
                recycle_tasks: 40,
                imap_items: 5_000,
                big_map: 1_000_000,
                forks: 200,
                execs: 40,
                ring_mib: 200,
            }
        } else {
            Scale {
                apply_calls: 5_000,
                tiny_chunk1: 20_000,
                tiny_auto: 200_000,
                echo_tasks: 200,
                cpu_tasks: 16,
                recycle_tasks: 200,
                imap_items: 100_000,
                big_map: 10_000_000,
                forks: 2_000,
                execs: 200,
                ring_mib: 2_000,
            }
        }
    }
}

type Measured = Result<(f64, &'static str), String>;

fn pool(method: StartMethod, processes: usize) -> Result<Pool, String> {
    Pool::builder()
        .processes(processes)
        .start_method(method)
        .allow_fork_with_threads(true)
        .build()
        .map_err(|e| e.to_string())
}

fn finish(pool: Pool) -> Result<(), String> {
    pool.close();
    pool.join().map_err(|e| e.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The amount of memory that line `field` (`VmRSS:`, ...) of /proc/self/status gives, in
/// bytes (0 when it cannot be read).
fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// The parent's peak resident memory since the last [`reset_peak_rss`].
fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// Resets the peak that [`peak_rss_bytes`] reads to the current resident memory.
fn reset_peak_rss() -> Result<(), String> {
    std::fs::write("/proc/self/clear_refs", "5").map_err(|e| format!("reset peak RSS: {e}"))
}

/// Times `map_with(square, 0..n, opts)` on `p`, then shuts `p` down: tasks per second.
fn square_rate(p: Pool, n: u64, opts: Options<Vec<u64>>) -> Measured {
    let t = Instant::now();
    let v = p.map_with(square, 0..n, opts).map_err(|e| e.to_string())?;
    let dt = t.elapsed().as_secs_f64();
    finish(p)?;
    Ok((v.len() as f64 / dt, "tasks/s"))
}

fn measure(name: &str, method: StartMethod, s: &Scale) -> Measured {
    let err = |e: procpool::TaskError| e.to_string();
    match name {
        "apply_rtt" | "apply_rtt_one_cpu" | "apply_rtt_two_cpus" => {
            let p = pool(method, 2)?;
            for _ in 0..100 {
                p.apply(square, (7,)).map_err(err)?;
            }
            if let Some(placement) = Placement::of(name) {
                let pids: Vec<u32> = p.workers().iter().map(|w| w.pid()).collect();
                placement.apply(&pids)?;
                for _ in 0..100 {
                    p.apply(square, (7,)).map_err(err)?;
                }
            }
            let mut times = Vec::with_capacity(s.apply_calls);
            for _ in 0..s.apply_calls {
                let t = Instant::now();
                p.apply(square, (7,)).map_err(err)?;
                times.push(t.elapsed().as_secs_f64());
            }
            finish(p)?;
            Ok((median(times), "s"))
        }
        "map_tiny_chunk1" => {
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            square_rate(p, s.tiny_chunk1, Options::new().chunksize(1))
        }
        "imap_tiny_chunk1" => {
            // map_tiny_chunk1 through imap: the input is read as the workers free up and
            // each result is taken in order as it comes.
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            let n = s.tiny_chunk1;
            let t = Instant::now();
            let mut got = 0u64;
            for r in p.imap_with(square, 0..n, Options::new().chunksize(1)) {
                if r.map_err(err)? != square(got) {
                    return Err("the imap came back wrong".into());
                }
                got += 1;
            }
            let dt = t.elapsed().as_secs_f64();
            if got != n {
                return Err(format!("the imap yielded {got} of {n} results"));
            }
            finish(p)?;
            Ok((n as f64 / dt, "tasks/s"))
        }
        "map_tiny_64w" => {
            // map_tiny_chunk1 with 64 workers on however few cores: the pool's cost per
            // task must not grow with its workers.
            let p = pool(method, 64)?;
            p.map_with(square, 0..6400u64, Options::new().chunksize(1))
                .map_err(err)?;
            square_rate(p, s.tiny_chunk1, Options::new().chunksize(1))
        }
        "map_10m_memory" => {
            // The parent's peak memory growth over a map of many tiny items, against the
            // 16 bytes per item of the u64s in and out themselves.
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            reset_peak_rss()?;
            let before = rss_bytes();
            let v = p.map(square, 0..s.big_map).map_err(err)?;
            let peak = peak_rss_bytes();
            if v.len() as u64 != s.big_map || v.last() != Some(&square(s.big_map - 1)) {
                return Err("the map came back wrong".into());
            }
            drop(v);
            finish(p)?;
            Ok((peak.saturating_sub(before) as f64, "bytes"))
        }
        "map_tiny_auto" => {
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            square_rate(p, s.tiny_auto, Options::new())
        }
        "echo_1mib" => {
            let p = pool(method, 2)?;
            let buf = ByteBuf::from(vec![7u8; 1 << 20]);
            p.apply(echo, (buf.clone(),)).map_err(err)?;
            let items: Vec<ByteBuf> = (0..s.echo_tasks).map(|_| buf.clone()).collect();
            let t = Instant::now();
            let out = p
                .map_with(echo, items, Options::new().chunksize(1))
                .map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            if out.iter().any(|b| b.len() != 1 << 20) {
                return Err("an echo came back wrong".into());
            }
            finish(p)?;
            Ok(((2 * s.echo_tasks * (1 << 20)) as f64 / dt, "B/s"))
        }
        "echo_1mib_shared" => {
            // echo_1mib with SharedBytes: the payloads are made in shared memory before
            // the clock starts (as echo_1mib's ByteBufs are made), and only their
            // descriptors cross to the workers and back.
            let p = pool(method, 2)?;
            let make = || {
                procpool::SharedBytes::with_len(1 << 20, |b| b.fill(7)).map_err(|e| e.to_string())
            };
            p.apply(echo_shared, (make()?,)).map_err(err)?;
            let items = (0..s.echo_tasks)
                .map(|_| make())
                .collect::<Result<Vec<_>, _>>()?;
            let t = Instant::now();
            let out = p
                .map_with(echo_shared, items, Options::new().chunksize(1))
                .map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            if out
                .iter()
                .any(|b| b.len() != 1 << 20 || b[(1 << 20) - 1] != 7)
            {
                return Err("an echo came back wrong".into());
            }
            drop(out);
            finish(p)?;
            Ok(((2 * s.echo_tasks * (1 << 20)) as f64 / dt, "B/s"))
        }
        "cpu_speedup" => {
            let mut times = [0.0; 2];
            for (i, n) in [1usize, 2].into_iter().enumerate() {
                let p = pool(method, n)?;
                p.map(square, 0..10u64).map_err(err)?;
                let t = Instant::now();
                p.map_with(burn, 0..s.cpu_tasks, Options::new().chunksize(1))
                    .map_err(err)?;
                times[i] = t.elapsed().as_secs_f64();
                finish(p)?;
            }
            Ok((times[0] / times[1], "x"))
        }
        "startup" => {
            let t = Instant::now();
            let p = pool(method, 2)?;
            p.apply(square, (7,)).map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            finish(p)?;
            Ok((dt, "s"))
        }
        "recycle" => {
            let p = Pool::builder()
                .processes(2)
                .start_method(method)
                .max_tasks_per_child(1)
                .allow_fork_with_threads(true)
                .build()
                .map_err(|e| e.to_string())?;
            square_rate(p, s.recycle_tasks, Options::new().chunksize(1))
        }
        "map_tiny_chunk1_timeout" => {
            // map_tiny_chunk1 with a time limit on every task (never reached): the cost of
            // the clock the pool keeps for each.
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            let opts = Options::new().chunksize(1).timeout(Duration::from_secs(10));
            square_rate(p, s.tiny_chunk1, opts)
        }
        "timeout_latency" => {
            // A task that sleeps forever under a 50 ms limit: the time from the limit to
            // its TimedOut error (measured from the submission, so it includes sending it).
            let p = pool(method, 1)?;
            let mut times = Vec::new();
            for _ in 0..7 {
                p.apply(square, (7,)).map_err(err)?;
                let t = Instant::now();
                let e = p
                    .apply_with(sleep_forever, (), Options::new().timeout(TIMEOUT_LIMIT))
                    .expect_err("a task that sleeps forever times out");
                let dt = t.elapsed();
                if e.kind() != TaskErrorKind::TimedOut {
                    return Err(format!("expected a time-out, got: {e}"));
                }
                times.push(dt.saturating_sub(TIMEOUT_LIMIT).as_secs_f64());
            }
            finish(p)?;
            Ok((median(times), "s"))
        }
        "cancel_latency" => {
            // Cancel a running task: the time from `cancel` to its Cancelled error.
            let p = pool(method, 1)?;
            let mut times = Vec::new();
            for _ in 0..7 {
                p.apply(square, (7,)).map_err(err)?;
                let r = p.apply_async(sleep_forever, ());
                std::thread::sleep(Duration::from_millis(20));
                let t = Instant::now();
                let how = r.cancel();
                let e = r.get().expect_err("a cancelled task fails");
                let dt = t.elapsed().as_secs_f64();
                if how != procpool::CancelOutcome::WhileRunning || !e.is_cancelled() {
                    return Err(format!("expected a cancel while running, got {how:?}: {e}"));
                }
                times.push(dt);
            }
            finish(p)?;
            Ok((median(times), "s"))
        }
        "replace_latency" => {
            let p = pool(method, 1)?;
            let mut times = Vec::new();
            for _ in 0..5 {
                let old = p.apply(my_pid, ()).map_err(err)?;
                let pid = rustix::process::Pid::from_raw(old as i32).ok_or("bad pid")?;
                let t = Instant::now();
                rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                    .map_err(|e| e.to_string())?;
                loop {
                    match p.apply(my_pid, ()) {
                        Ok(new) if new != old => break,
                        Ok(_) => continue,
                        Err(e) if e.kind() == TaskErrorKind::WorkerLost => continue,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                times.push(t.elapsed().as_secs_f64());
            }
            finish(p)?;
            Ok((median(times), "s"))
        }
        "imap_memory" => {
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            let before = rss_bytes();
            let mut n = 0usize;
            for r in p.imap(square, 0u64..) {
                r.map_err(err)?;
                n += 1;
                if n == s.imap_items {
                    break;
                }
            }
            let after = rss_bytes();
            finish(p)?;
            Ok((after.saturating_sub(before) as f64, "bytes"))
        }
        other => Err(format!("unknown workload {other}")),
    }
}

/// Runs the requested workloads, each run in a child process of its own (so a run that
/// hangs or crashes is reported and the others go on), each run followed by the references
/// asked for, then the report if asked.
pub(crate) fn run(args: Args) -> ExitCode {
    if let Some(spec) = &args.one {
        return run_in_this_process(spec, args.quick);
    }
    let methods: &[crate::Method] = if args.methods.is_empty() {
        <crate::Method as clap::ValueEnum>::value_variants()
    } else {
        &args.methods
    };
    let chosen: &[Workload] = if args.workloads.is_empty() {
        <Workload as clap::ValueEnum>::value_variants()
    } else {
        &args.workloads
    };
    let workloads: Vec<String> = chosen.iter().map(|w| w.name()).collect();
    if let Some(dir) = &args.out
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        // Before the run, not after minutes of it.
        eprintln!("procpool bench: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    // How this program is linked, first: the report says it beside the `startup` figures.
    let build = crate::reference::build_row();
    println!("{build}");
    let mut rows = vec![build];
    let limit = Duration::from_secs(args.timeout);
    let refs = match crate::reference::References::new(args.reference, args.procspawn.clone()) {
        Ok(refs) => refs,
        Err(e) => {
            eprintln!("procpool bench: the CPython reference cannot run: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Run by run, each method's run of a workload, then one run of each floor under it
    // (the machine's own cost, no pool) and of each reference: the floors and the
    // references are measured in the same minutes as the figures they are set against, so
    // the report can tell a slow machine from a slow pool and give each goal as a ratio.
    // (How fast this shared machine wakes a process changes from one minute to the next:
    // floors measured at the end once compared a fast-waking minute with a slow one.)
    // Where the bench's own minutes go, per workload: its runs, its floors, its references.
    let mut took: Vec<(&str, [Duration; 3])> = Vec::new();
    for w in &workloads {
        // Time the references of this workload have taken so far (see REF_BUDGET).
        let mut refs_took = Duration::ZERO;
        let (mut ours_took, mut floors_took) = (Duration::ZERO, Duration::ZERO);
        for run in 0..runs_of(w, args.runs, args.quick) {
            let started = std::time::Instant::now();
            for method in methods {
                let line = run_isolated(w, *method, args.quick, limit);
                println!("{line}");
                rows.push(line);
            }
            ours_took += started.elapsed();
            let started = std::time::Instant::now();
            for &(system, workload, beside) in FLOORS {
                if beside != w {
                    continue;
                }
                let spec = format!("raw:{system}:{workload}");
                let line = run_isolated_spec(system, &spec, workload, args.quick, limit);
                println!("{line}");
                rows.push(line);
            }
            floors_took += started.elapsed();
            let refs_due = if args.quick {
                run == 0
            } else {
                (run < REF_MIN_RUNS && refs_took < REF_CAP) || refs_took < REF_BUDGET
            };
            if refs_due {
                let started = std::time::Instant::now();
                rows.extend(refs.run(methods, w, args.quick));
                refs_took += started.elapsed();
            }
        }
        took.push((w, [ours_took, floors_took, refs_took]));
    }
    report_time(&took);
    if let Some(dir) = &args.out
        && let Err(e) = crate::reference::report(dir, &rows, args.quick)
    {
        eprintln!("procpool bench: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs one `(method, workload)` as `procpool bench --one METHOD:WORKLOAD` and returns its
/// JSON line; past `limit` the child is killed and the line says it timed out.
fn run_isolated(workload: &str, method: crate::Method, quick: bool, limit: Duration) -> String {
    let system = format!("procpool-{}", method.name());
    let spec = format!("{}:{workload}", method.name());
    run_isolated_spec(&system, &spec, workload, quick, limit)
}

/// Prints (to stderr, beside the progress) the seconds each workload took: procpool's runs,
/// the floors measured beside them and the references, and the sums: what to look at when
/// the full bench nears its time limit on a slow machine.
fn report_time(took: &[(&str, [Duration; 3])]) {
    let secs = |d: Duration| d.as_secs_f64();
    let mut sum = [0.0; 3];
    eprintln!("procpool bench: seconds per workload (procpool, floors, references)");
    for (w, t) in took {
        eprintln!(
            "  {w:<24} {:>7.1} {:>7.1} {:>7.1}",
            secs(t[0]),
            secs(t[1]),
            secs(t[2])
        );
        for (s, t) in sum.iter_mut().zip(t) {
            *s += secs(*t);
        }
    }
    eprintln!(
        "  {:<24} {:>7.1} {:>7.1} {:>7.1}  ({:.0} s)",
        "all",
        sum[0],
        sum[1],
        sum[2],
        sum.iter().sum::<f64>()
    );
}

/// Runs `procpool bench --one SPEC` in a child process; see [`run_isolated`].
fn run_isolated_spec(
    system: &str,
    spec: &str,
    workload: &str,
    quick: bool,
    limit: Duration,
) -> String {
    let failed = |reason: String| failed_line(system, workload, &reason);
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot find this program: {e}")),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "--one", spec]);
    if quick {
        cmd.arg("--quick");
    }
    cmd.stderr(std::process::Stdio::inherit());
    // Its workers die with it (they watch their parent).
    let (status, text) = match run_bounded(&mut cmd, limit, false) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot start a run: {e}")),
    };
    match status {
        None => failed(format!("timed out after {}s", limit.as_secs())),
        Some(st) => match text.lines().find(|l| l.starts_with('{')) {
            Some(line) => line.to_string(),
            None => failed(format!("the run ended without a result ({st})")),
        },
    }
}

/// `--one METHOD:WORKLOAD`: measures once in this process and prints the JSON line.
fn run_in_this_process(spec: &str, quick: bool) -> ExitCode {
    let Some((m, workload)) = spec.split_once(':') else {
        eprintln!("procpool bench: --one takes METHOD:WORKLOAD");
        return ExitCode::FAILURE;
    };
    if m == "raw" {
        let (system, workload) = workload.split_once(':').unwrap_or(("", workload));
        let line = match measure_floor(system, workload, &Scale::new(quick)) {
            Ok((v, unit)) => ok_line(system, workload, v, unit),
            Err(e) => failed_line(system, workload, &e),
        };
        println!("{line}");
        return ExitCode::SUCCESS;
    }
    if m == "pipe-echo" {
        return pipe_echo();
    }
    if m == "socket-echo" {
        return socket_echo();
    }
    if m == "ring-sink" {
        return ring_sink();
    }
    let Ok(method) = <crate::Method as clap::ValueEnum>::from_str(m, false) else {
        eprintln!("procpool bench: unknown start method {m:?}: fork, spawn or forkserver");
        return ExitCode::FAILURE;
    };
    let system = format!("procpool-{}", method.name());
    let line = match measure(workload, method.into(), &Scale::new(quick)) {
        Ok((value, unit)) => ok_line(&system, workload, value, unit),
        Err(reason) => failed_line(&system, workload, &reason),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    ExitCode::SUCCESS
}

/// The machine's floors: `(system, workload, beside)`, run when the workload `beside` is.
/// `bench/report.py` keeps them out of the tables and prints each goal as a ratio to them.
const FLOORS: &[(&str, &str, &str)] = &[
    // One-byte round trip through a pair of pipes: the floor under apply_rtt.
    ("raw-pipe", "apply_rtt", "apply_rtt"),
    // The pipe round trip with both sides held on one CPU, then on two: the floors under
    // apply_rtt placed the same way. (Unplaced, the scheduler keeps a ping-pong pair on
    // one CPU or on two, run by run; on a virtual machine the two differ several times.)
    ("raw-pipe", "apply_rtt_one_cpu", "apply_rtt_one_cpu"),
    ("raw-pipe", "apply_rtt_two_cpus", "apply_rtt_two_cpus"),
    // The same through a Unix socketpair, each side waiting in poll() as the pool does:
    // the floor of the pool's own transport, unplaced and on one CPU.
    ("raw-socket", "apply_rtt", "apply_rtt"),
    ("raw-socket", "apply_rtt_one_cpu", "apply_rtt_one_cpu"),
    // Bare fork + _exit + waitpid, one after another: the rate under recycle...
    ("raw-fork", "fork_rate", "recycle"),
    // ... and the latency of one (median).
    ("raw-fork", "fork_latency", "recycle"),
    // fork + exec(/bin/true) + wait (std::process): the floor under startup.
    ("raw-exec", "startup", "startup"),
    // The same with this program (`procpool -V`) instead of /bin/true: not a goal's floor,
    // but what one exec of this (larger, dynamically linked) program costs, which spawn
    // pays per worker and forkserver once for its server; the rest of their startup is the
    // pool's own work.
    ("raw-exec", "startup_self", "startup"),
    // A forkserver pool of 2 to its first result with its server executed, as it is when the
    // program has no seed (`PROCPOOL_SEED=0`): not a floor, but what the seed saves.
    ("raw-exec", "startup_executed", "startup"),
    // 1 MiB payloads through pool-ipc's shared ring to another process: under echo_1mib
    // (and beside echo_1mib_shared, for comparison).
    ("raw-ring", "echo_1mib", "echo_1mib"),
    ("raw-ring", "echo_1mib", "echo_1mib_shared"),
    // One thread copying echo_1mib's number of distinct 1 MiB buffers into as many others:
    // not a goal's floor, but what memory itself allows payloads that, as echo_1mib's,
    // come from and go to memory no cache holds (the ring's floor copies one payload that
    // stays in the caches).
    ("raw-copy", "echo_1mib", "echo_1mib"),
];

/// Measures one floor of [`FLOORS`].
fn measure_floor(system: &str, workload: &str, s: &Scale) -> Measured {
    match (system, workload) {
        ("raw-pipe", "apply_rtt") => Ok((raw_pipe_rtt(s.apply_calls, None)?, "s")),
        ("raw-pipe", w @ ("apply_rtt_one_cpu" | "apply_rtt_two_cpus")) => {
            Ok((raw_pipe_rtt(s.apply_calls, Placement::of(w))?, "s"))
        }
        ("raw-socket", "apply_rtt") => Ok((raw_socket_rtt(s.apply_calls, None)?, "s")),
        ("raw-socket", w @ "apply_rtt_one_cpu") => {
            Ok((raw_socket_rtt(s.apply_calls, Placement::of(w))?, "s"))
        }
        ("raw-fork", "fork_rate") => {
            let fork = || {
                pool_spawn::bench_support::bare_fork_exit_wait().map_err(|e| format!("fork: {e}"))
            };
            for _ in 0..20 {
                fork()?;
            }
            let t = Instant::now();
            for _ in 0..s.forks {
                fork()?;
            }
            Ok((s.forks as f64 / t.elapsed().as_secs_f64(), "tasks/s"))
        }
        ("raw-fork", "fork_latency") => {
            let mut times = Vec::with_capacity(s.forks);
            for i in 0..s.forks + 20 {
                let t = Instant::now();
                pool_spawn::bench_support::bare_fork_exit_wait()
                    .map_err(|e| format!("fork: {e}"))?;
                if i >= 20 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok((median(times), "s"))
        }
        ("raw-exec", "startup") => {
            let mut times = Vec::with_capacity(s.execs);
            for i in 0..s.execs + 5 {
                let t = Instant::now();
                let st = std::process::Command::new("/bin/true")
                    .status()
                    .map_err(|e| format!("/bin/true: {e}"))?;
                if !st.success() {
                    return Err(format!("/bin/true ended with {st}"));
                }
                if i >= 5 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok((median(times), "s"))
        }
        ("raw-exec", "startup_self") => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut times = Vec::with_capacity(s.execs);
            for i in 0..s.execs + 5 {
                let t = Instant::now();
                let st = std::process::Command::new(&exe)
                    .arg("-V")
                    .stdout(std::process::Stdio::null())
                    .status()
                    .map_err(|e| format!("{} -V: {e}", exe.display()))?;
                if !st.success() {
                    return Err(format!("{} -V ended with {st}", exe.display()));
                }
                if i >= 5 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok((median(times), "s"))
        }
        ("raw-exec", "startup_executed") => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut times = Vec::with_capacity(s.execs);
            for _ in 0..s.execs.min(25) {
                let out = std::process::Command::new(&exe)
                    .args(["bench", "--one", "forkserver:startup"])
                    // No seed in that process (see procpool's "Start methods").
                    .env("PROCPOOL_SEED", "0")
                    .stderr(std::process::Stdio::null())
                    .output()
                    .map_err(|e| format!("{}: {e}", exe.display()))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let value = text
                    .lines()
                    .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .and_then(|v| v.get("value").and_then(serde_json::Value::as_f64))
                    .ok_or_else(|| format!("a run with PROCPOOL_SEED=0 said: {text}"))?;
                times.push(value);
            }
            Ok((median(times), "s"))
        }
        ("raw-ring", "echo_1mib") => Ok((ring_bandwidth(s.ring_mib)?, "B/s")),
        ("raw-copy", "echo_1mib") => Ok((distinct_copy_bandwidth(s.echo_tasks), "B/s")),
        _ => Err(format!("unknown floor {system}:{workload}")),
    }
}

/// Starts this program as `procpool bench --one ROLE` (a floor's other side) with one end
/// of a new socketpair as its stdin; returns the other end and the child.
fn spawn_peer(role: &str) -> Result<(std::os::fd::OwnedFd, std::process::Child), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (ours, theirs) = pool_ipc::socketpair().map_err(|e| e.to_string())?;
    let child = std::process::Command::new(exe)
        .args(["bench", "--one", role])
        .stdin(std::process::Stdio::from(theirs))
        .spawn()
        .map_err(|e| format!("cannot start `procpool bench --one {role}`: {e}"))?;
    Ok((ours, child))
}

/// The socket [`spawn_peer`] gave this process as its stdin.
fn stdin_socket() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    std::io::stdin().as_fd().try_clone_to_owned().ok()
}

/// The shm threshold of the ring floor: the pool's.
const RING_THRESHOLD: usize = 256 * 1024;

/// Bytes per second of 1 MiB payloads sent through pool-ipc's shared ring to another
/// process (`procpool bench --one ring-sink:`), which copies each out and acknowledges it:
/// no pool, no task, one copy in and one out. At most two payloads are in flight, so each
/// goes through the ring (whose 4 MiB would not take a third with the wrap) and none inline.
fn ring_bandwidth(payloads: usize) -> Result<f64, String> {
    let (ours, mut child) = spawn_peer("ring-sink:")?;
    let cfg = pool_ipc::Config::new().shm_threshold(Some(RING_THRESHOLD));
    let mut ch: pool_ipc::Duplex<ByteBuf, u32> =
        pool_ipc::Duplex::with_config(ours, cfg).map_err(|e| e.to_string())?;
    let payload = ByteBuf::from(vec![7u8; 1 << 20]);
    let mut run = |n: usize| -> Result<(), String> {
        let e = |e: pool_ipc::Error| e.to_string();
        let window = 2.min(n);
        for _ in 0..window {
            ch.send(&payload).map_err(e)?;
        }
        for i in 0..n {
            let len = ch.recv().map_err(e)?;
            if !(1 << 20..(1 << 20) + 8).contains(&(len as usize)) {
                return Err(format!("the ring sink got {len} bytes"));
            }
            if i + window < n {
                ch.send(&payload).map_err(e)?;
            }
        }
        Ok(())
    };
    run(10)?;
    let t = Instant::now();
    run(payloads)?;
    let bw = (payloads << 20) as f64 / t.elapsed().as_secs_f64();
    drop(ch);
    let _ = child.wait();
    Ok(bw)
}

/// Bytes per second of one thread copying `n` distinct 1 MiB buffers into `n` others, every
/// page of both written before the clock starts (no page fault is timed).
fn distinct_copy_bandwidth(n: usize) -> f64 {
    let from: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 1 << 20]).collect();
    let mut to: Vec<Vec<u8>> = (0..n).map(|_| vec![0xff; 1 << 20]).collect();
    let t = Instant::now();
    for (to, from) in to.iter_mut().zip(&from) {
        to.copy_from_slice(std::hint::black_box(from));
    }
    let dt = t.elapsed().as_secs_f64();
    std::hint::black_box(&to);
    (n << 20) as f64 / dt
}

/// The receiving side of [`ring_bandwidth`]: on the socket that is its stdin, copies each
/// payload out of the ring and answers its length, until the channel closes.
fn ring_sink() -> ExitCode {
    let Some(fd) = stdin_socket() else {
        return ExitCode::FAILURE;
    };
    let cfg = pool_ipc::Config::new().shm_threshold(Some(RING_THRESHOLD));
    let Ok(mut ch) = pool_ipc::Duplex::<u32, ByteBuf>::with_config(fd, cfg) else {
        return ExitCode::FAILURE;
    };
    loop {
        // The encoded payload: a length prefix, then the bytes.
        let got = ch.recv_with(|b| b.len() as u32);
        match got {
            Ok(n) => {
                if ch.send(&n).is_err() {
                    return ExitCode::FAILURE;
                }
            }
            Err(_) => return ExitCode::SUCCESS,
        }
    }
}

/// The median round trip of one byte through a pair of pipes to a child process that echoes
/// it (`procpool bench --one pipe-echo:`): no pool, no framing, no encoding.
fn raw_pipe_rtt(rounds: usize, placement: Option<Placement>) -> Result<f64, String> {
    use std::io::Read;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(["bench", "--one", "pipe-echo:"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the echo process: {e}"))?;
    if let Some(placement) = placement {
        placement.apply(&[child.id()])?;
    }
    let mut to = child.stdin.take().expect("piped");
    let mut from = child.stdout.take().expect("piped");
    let mut byte = [0u8; 1];
    let mut round = |to: &mut std::process::ChildStdin| -> Result<(), String> {
        to.write_all(&[7]).map_err(|e| e.to_string())?;
        from.read_exact(&mut byte).map_err(|e| e.to_string())
    };
    for _ in 0..100 {
        round(&mut to)?;
    }
    // Timed one by one, as apply_rtt is: the two medians compare like with like.
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        round(&mut to)?;
        times.push(t.elapsed().as_secs_f64());
    }
    drop(to);
    let _ = child.wait();
    Ok(median(times))
}

/// The median round trip of one byte through a Unix socketpair to a child process that
/// echoes it (`procpool bench --one socket-echo:`), each side waiting for the byte in
/// `poll` (for input only, as the pool's waiting threads do) and then reading it; both held as
/// `placement` says, if it says.
fn raw_socket_rtt(rounds: usize, placement: Option<Placement>) -> Result<f64, String> {
    let (ours, mut child) = spawn_peer("socket-echo:")?;
    if let Some(placement) = placement {
        placement.apply(&[child.id()])?;
    }
    let round = || -> Result<(), String> {
        let e = |e: rustix::io::Errno| e.to_string();
        rustix::io::write(&ours, &[7]).map_err(e)?;
        wait_readable(&ours).map_err(e)?;
        let mut byte = [0u8; 1];
        match rustix::io::read(&ours, &mut byte).map_err(e)? {
            1 => Ok(()),
            _ => Err("the echo process ended".into()),
        }
    };
    for _ in 0..100 {
        round()?;
    }
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        round()?;
        times.push(t.elapsed().as_secs_f64());
    }
    drop(ours);
    let _ = child.wait();
    Ok(median(times))
}

/// Where a round trip's two sides run: held on one CPU, or on two different CPUs.
#[derive(Clone, Copy, Debug)]
enum Placement {
    OneCpu,
    TwoCpus,
}

impl Placement {
    /// The placement a workload's name asks for (`..._one_cpu`, `..._two_cpus`).
    fn of(workload: &str) -> Option<Placement> {
        if workload.ends_with("_one_cpu") {
            Some(Placement::OneCpu)
        } else if workload.ends_with("_two_cpus") {
            Some(Placement::TwoCpus)
        } else {
            None
        }
    }

    /// Holds every thread of this process on one CPU it may use and every thread of the
    /// processes `pids` on the same CPU (`OneCpu`) or on another (`TwoCpus`).
    fn apply(self, pids: &[u32]) -> Result<(), String> {
        use rustix::thread::{CpuSet, Pid, sched_getaffinity, sched_setaffinity};
        let allowed = sched_getaffinity(None).map_err(|e| format!("sched_getaffinity: {e}"))?;
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .collect();
        let (ours, theirs) = match (self, cpus.as_slice()) {
            (Placement::OneCpu, [c, ..]) => (*c, *c),
            (Placement::TwoCpus, [a, b, ..]) => (*b, *a),
            _ => return Err(format!("needs two CPUs; this process may use {cpus:?}")),
        };
        let only = |cpu: usize| {
            let mut set = CpuSet::new();
            set.set(cpu);
            set
        };
        let hold = |dir: String, cpu: usize| -> Result<(), String> {
            let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
            for t in tasks.flatten() {
                let tid = t.file_name().to_string_lossy().parse::<i32>().ok();
                if let Some(tid) = tid.and_then(Pid::from_raw) {
                    sched_setaffinity(Some(tid), &only(cpu))
                        .map_err(|e| format!("sched_setaffinity({tid:?}): {e}"))?;
                }
            }
            Ok(())
        };
        hold("/proc/self/task".into(), ours)?;
        for &pid in pids {
            hold(format!("/proc/{pid}/task"), theirs)?;
        }
        Ok(())
    }
}

/// Waits in `poll` until `fd` is readable.
fn wait_readable(fd: &impl std::os::fd::AsFd) -> rustix::io::Result<()> {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map(drop),
        }
    }
}

/// The echo side of [`raw_socket_rtt`]: on the socket that is its stdin, waits for a byte
/// in `poll`, reads it and sends it back, until the socket closes.
fn socket_echo() -> ExitCode {
    let Some(sock) = stdin_socket() else {
        return ExitCode::FAILURE;
    };
    let mut byte = [0u8; 1];
    while wait_readable(&sock).is_ok() {
        match rustix::io::read(&sock, &mut byte) {
            Ok(1) if rustix::io::write(&sock, &byte).is_ok() => {}
            _ => break,
        }
    }
    ExitCode::SUCCESS
}

/// The echo side of [`raw_pipe_rtt`]: copies stdin to stdout a byte at a time until EOF.
fn pipe_echo() -> ExitCode {
    use std::io::Read;
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut byte = [0u8; 1];
    while input.read_exact(&mut byte).is_ok() {
        if output
            .write_all(&byte)
            .and_then(|()| output.flush())
            .is_err()
        {
            break;
        }
    }
    ExitCode::SUCCESS
}

/// A result line: `{"system", "workload", "value", "unit", "ok": true}`.
pub(crate) fn ok_line(system: &str, workload: &str, value: f64, unit: &str) -> String {
    serde_json::json!({
        "system": system,
        "workload": workload,
        "value": value,
        "unit": unit,
        "ok": true,
    })
    .to_string()
}

/// A line for a run that could not measure: `{"system", "workload", "ok": false, "reason"}`.
/// Runs `cmd`, its stdout piped, for at most `limit`: its exit status (`None` if it ran past
/// `limit` and was killed) and what it printed, read on a thread so that the wait can time
/// out. With `group` it runs in a process group of its own, killed whole once it has ended
/// or timed out: whatever it left there (a pool's processes) goes too, and cannot hold its
/// output open; without, only `cmd`'s process is killed.
pub(crate) fn run_bounded(
    cmd: &mut std::process::Command,
    limit: Duration,
    group: bool,
) -> std::io::Result<(Option<std::process::ExitStatus>, String)> {
    use std::os::unix::process::CommandExt;
    cmd.stdout(std::process::Stdio::piped());
    if group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => break None,
        }
    };
    if group && let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok((status, reader.join().unwrap_or_default()))
}

pub(crate) fn failed_line(system: &str, workload: &str, reason: &str) -> String {
    serde_json::json!({
        "system": system,
        "workload": workload,
        "ok": false,
        "reason": reason,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The noisy workloads are named as `--workload` names them (a renamed one would
    /// silently get five runs again), and get their minimum of runs outside `--quick`.
    #[test]
    fn noisy_workloads_get_enough_runs() {
        let names: Vec<String> = <Workload as clap::ValueEnum>::value_variants()
            .iter()
            .map(|w| w.name())
            .collect();
        for w in NOISY {
            assert!(names.iter().any(|n| n == w), "{w} is no workload");
            assert_eq!(runs_of(w, 5, false), NOISY_MIN_RUNS);
            assert_eq!(runs_of(w, 40, false), 40);
            assert_eq!(runs_of(w, 2, true), 2);
        }
        assert_eq!(runs_of("apply_rtt", 5, false), 5);
        assert_eq!(runs_of("apply_rtt", 0, false), 1);
    }
}
