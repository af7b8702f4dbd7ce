//! `procpool bench`: the standard workloads, one JSON line per run.
//!
//! The same workloads, names and JSON schema as the CPython reference script
//! (`bench/reference/mp_pool.py`), so a report can set them side by side:
//! `{"system": "procpool-forkserver", "workload": "apply_rtt", "value": 1.2e-5,
//! "unit": "s", "ok": true}` or `{"ok": false, "reason": "..."}`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use procpool::{Pool, StartMethod, TaskErrorKind};
use serde_bytes::ByteBuf;

/// Options of `procpool bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Start methods to measure (default: all three).
    #[arg(long = "method", value_parser = parse_method)]
    methods: Vec<StartMethod>,
    /// Workloads to run (default: all).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// Runs per workload.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Smaller counts, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Seconds a single run may take before it is reported as timed out.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn parse_method(s: &str) -> Result<StartMethod, String> {
    match s {
        "fork" => Ok(StartMethod::Fork),
        "spawn" => Ok(StartMethod::Spawn),
        "forkserver" => Ok(StartMethod::Forkserver),
        _ => Err(format!(
            "unknown start method {s:?}: fork, spawn or forkserver"
        )),
    }
}

fn method_name(m: StartMethod) -> &'static str {
    match m {
        StartMethod::Fork => "fork",
        StartMethod::Spawn => "spawn",
        _ => "forkserver",
    }
}

/// Every workload, in report order.
pub(crate) const WORKLOADS: [&str; 9] = [
    "apply_rtt",
    "map_tiny_chunk1",
    "map_tiny_auto",
    "echo_1mib",
    "cpu_speedup",
    "startup",
    "recycle",
    "replace_latency",
    "imap_memory",
];

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn echo(b: ByteBuf) -> ByteBuf {
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
                imap_items: 20_000,
            }
        } else {
            Scale {
                apply_calls: 5_000,
                tiny_chunk1: 20_000,
                tiny_auto: 200_000,
                echo_tasks: 200,
                cpu_tasks: 16,
                recycle_tasks: 400,
                imap_items: 200_000,
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

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn measure(name: &str, method: StartMethod, s: &Scale) -> Measured {
    let err = |e: procpool::TaskError| e.to_string();
    match name {
        "apply_rtt" => {
            let p = pool(method, 2)?;
            for _ in 0..100 {
                p.apply(square, (7,)).map_err(err)?;
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
            let t = Instant::now();
            let v = p.map_chunked(square, 0..s.tiny_chunk1, 1).map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            finish(p)?;
            Ok((v.len() as f64 / dt, "tasks/s"))
        }
        "map_tiny_auto" => {
            let p = pool(method, 2)?;
            p.map(square, 0..100u64).map_err(err)?;
            let t = Instant::now();
            let v = p.map(square, 0..s.tiny_auto).map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            finish(p)?;
            Ok((v.len() as f64 / dt, "tasks/s"))
        }
        "echo_1mib" => {
            let p = pool(method, 2)?;
            let buf = ByteBuf::from(vec![7u8; 1 << 20]);
            p.apply(echo, (buf.clone(),)).map_err(err)?;
            let items: Vec<ByteBuf> = (0..s.echo_tasks).map(|_| buf.clone()).collect();
            let t = Instant::now();
            let out = p.map_chunked(echo, items, 1).map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            if out.iter().any(|b| b.len() != 1 << 20) {
                return Err("an echo came back wrong".into());
            }
            finish(p)?;
            Ok(((2 * s.echo_tasks * (1 << 20)) as f64 / dt, "B/s"))
        }
        "cpu_speedup" => {
            let mut times = [0.0; 2];
            for (i, n) in [1usize, 2].into_iter().enumerate() {
                let p = pool(method, n)?;
                p.map(square, 0..10u64).map_err(err)?;
                let t = Instant::now();
                p.map_chunked(burn, 0..s.cpu_tasks, 1).map_err(err)?;
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
            let t = Instant::now();
            let v = p.map_chunked(square, 0..s.recycle_tasks, 1).map_err(err)?;
            let dt = t.elapsed().as_secs_f64();
            finish(p)?;
            Ok((v.len() as f64 / dt, "tasks/s"))
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

/// Runs the requested workloads.
pub(crate) fn run(args: Args) -> ExitCode {
    let methods = if args.methods.is_empty() {
        vec![
            StartMethod::Forkserver,
            StartMethod::Spawn,
            StartMethod::Fork,
        ]
    } else {
        args.methods.clone()
    };
    let workloads: Vec<String> = if args.workloads.is_empty() {
        WORKLOADS.iter().map(|s| s.to_string()).collect()
    } else {
        args.workloads.clone()
    };
    let scale = Scale::new(args.quick);
    let stdout = std::io::stdout();
    for method in &methods {
        for w in &workloads {
            for _ in 0..args.runs.max(1) {
                let line = run_one(w, *method, &scale, Duration::from_secs(args.timeout));
                let mut out = stdout.lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }
    ExitCode::SUCCESS
}

fn run_one(workload: &str, method: StartMethod, scale: &Scale, limit: Duration) -> String {
    let system = format!("procpool-{}", method_name(method));
    // A watchdog: procpool promises not to hang, but a benchmark must end even if it did.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (sys, wl) = (system.clone(), workload.to_string());
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            println!(
                "{{\"system\":\"{sys}\",\"workload\":\"{wl}\",\"ok\":false,\"reason\":\"timed out after {}s\"}}",
                limit.as_secs()
            );
            std::process::exit(3);
        }
    });
    let r = measure(workload, method, scale);
    let _ = tx.send(());
    let _ = watchdog.join();
    match r {
        Ok((value, unit)) => format!(
            "{{\"system\":\"{system}\",\"workload\":\"{workload}\",\"value\":{value:e},\"unit\":\"{unit}\",\"ok\":true}}"
        ),
        Err(reason) => format!(
            "{{\"system\":\"{system}\",\"workload\":\"{workload}\",\"ok\":false,\"reason\":{}}}",
            json_string(&reason)
        ),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
