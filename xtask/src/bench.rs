//! `cargo xtask bench [--quick] [--publish] [--cli-only]`: procpool beside CPython's
//! `multiprocessing.Pool` and procspawn, in one run, on this machine; and the `procpool`
//! command's `run` and `map` beside xargs, GNU parallel and CPython's Pool (`--cli-only`:
//! that part alone).
//!
//! Steps: build `procpool` (pool-cli) in release mode, as shipped (statically linked on a
//! `*-linux-gnu` host: see `ShippedCli`), and the procspawn comparison
//! (`bench/procspawn`, outside the workspace) where it builds; run `procpool bench
//! --reference --procspawn ...`: run by run, procpool with each start method, then
//! `bench/reference/mp_pool.py` (built into the command) with `python3` for each start
//! method, then procspawn, so that all are measured in the same minutes; then the criterion
//! micro-benchmarks (skipped with `--quick`), whose policy figures by pool size become a
//! section of the report; then `bench/report.py` turns all the JSON lines into a markdown
//! table (stdout), `target/bench/results.json`, `target/bench/ratios.svg` and
//! `target/bench/BENCHMARKS.md`.
//! With `--publish`, that report replaces the repository's `BENCHMARKS.md` (chart and data
//! in `bench/results/`).

use std::fs::{self, File};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ShippedCli, cargo, root, step, target_dir};

/// Runs the benchmark suite.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let runs = if quick { "2" } else { "5" };
    let root = root();
    let out_dir = root.join("target/bench");
    fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
    let raw_path = out_dir.join("raw.jsonl");
    let mut raw = File::create(&raw_path).map_err(|e| format!("create raw.jsonl: {e}"))?;
    let started = Instant::now();

    // The command as shipped (see `ShippedCli`): what is measured, and what the report
    // says about its linking.
    let cli = ShippedCli::for_host();
    step(
        &format!("build procpool (release, {})", cli.linking()),
        &mut cli.cargo("build", &["--release"]),
    )?;
    let exe = cli.release_exe();
    if args.iter().any(|a| a == "--cli-only") {
        // Only the command line against xargs, GNU parallel and CPython's Pool.
        return cli_comparisons(&root, &out_dir, &exe, quick);
    }
    // procspawn's comparison program, built first so that it runs beside procpool.
    let procspawn = procspawn_exe(&root);
    if procspawn.is_none() {
        writeln!(
            raw,
            "{{\"system\":\"procspawn\",\"workload\":\"apply_rtt\",\"ok\":false,\"reason\":\"procspawn did not build here\"}}"
        )
        .map_err(|e| e.to_string())?;
    }
    // procpool, each run followed by CPython's Pool (the reference script is built into
    // the command) and procspawn on the same workload, all as JSON lines.
    println!(
        "==> procpool bench --reference (procpool, CPython's multiprocessing.Pool and \
         procspawn, run by run)"
    );
    // The procpool just built: where cargo put it (not a stale one in `target/` when
    // CARGO_TARGET_DIR points elsewhere).
    let mut cmd = Command::new(&exe);
    cmd.args(["bench", "--reference", "--runs", runs]);
    if let Some(exe) = &procspawn {
        cmd.arg("--procspawn").arg(exe);
    }
    if quick {
        cmd.arg("--quick");
    }
    collect(&mut cmd, &mut raw)?;
    drop(raw);

    // The command line against xargs, GNU parallel and CPython's Pool: a section of the
    // report (none, rather than an old one, if it cannot run).
    let cli_path = out_dir.join("CLI.md");
    let _ = fs::remove_file(&cli_path);
    if let Err(e) = cli_comparisons(&root, &out_dir, &exe, quick) {
        eprintln!("    command-line comparisons: {e}");
    }

    // The criterion micro-benchmarks (not with --quick); the policy's cost by pool size
    // goes into the report as a section of its own.
    let dispatch_path = out_dir.join("dispatch.md");
    let _ = fs::remove_file(&dispatch_path);
    if !quick {
        step(
            "criterion micro-benchmarks",
            // The bench targets only (libtest would refuse criterion's options), each
            // function warmed up for 1 s and measured for 3 (criterion's 3 and 5 took the
            // full bench past its 15 minutes).
            cargo()
                .args([
                    "bench",
                    "--workspace",
                    "--bench",
                    "*",
                    "--",
                    "--warm-up-time",
                    "1",
                    "--measurement-time",
                    "3",
                ])
                .env("PROCPOOL_DISPATCH_OUT", out_dir.join("dispatch.json")),
        )?;
        let section = dispatch_summary(&out_dir.join("dispatch.json"));
        println!("{section}");
        fs::write(&dispatch_path, section)
            .map_err(|e| format!("write {}: {e}", dispatch_path.display()))?;
    }

    let report = root.join("bench/report.py");
    if report.exists() {
        step(
            "report",
            Command::new("python3")
                .arg(&report)
                .arg(&raw_path)
                .arg("--out")
                .arg(&out_dir)
                .args(["--mode", if quick { "quick" } else { "full" }])
                .args(
                    [&dispatch_path, &cli_path]
                        .into_iter()
                        .filter(|p| p.exists())
                        .flat_map(|p| ["--section".as_ref(), p.as_os_str()]),
                )
                .args([
                    "--command",
                    if quick {
                        "cargo xtask bench --quick"
                    } else {
                        "cargo xtask bench"
                    },
                ]),
        )?;
    } else {
        eprintln!(
            "    (no report script; raw results in {})",
            raw_path.display()
        );
    }
    if args.iter().any(|a| a == "--publish") {
        publish(&root, &out_dir)?;
    }
    println!(
        "==> bench done in {:.0}s; raw results in {}",
        started.elapsed().as_secs_f64(),
        raw_path.display()
    );
    Ok(())
}

/// Builds the procspawn comparison (`bench/procspawn`, outside the workspace, with its own
/// target directory); its program, if it built.
fn procspawn_exe(root: &std::path::Path) -> Option<std::path::PathBuf> {
    let manifest = root.join("bench/procspawn/Cargo.toml");
    if !manifest.exists() {
        return None;
    }
    println!("==> build the procspawn comparison");
    let built = cargo()
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", root.join("target/procspawn-bench"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let exe = root.join("target/procspawn-bench/release/procspawn-bench");
    (built && exe.exists()).then_some(exe)
}

/// `--publish`: the report becomes the repository's `BENCHMARKS.md`, its chart and data go
/// to `bench/results/`.
fn publish(root: &std::path::Path, out_dir: &std::path::Path) -> Result<(), String> {
    let results = root.join("bench/results");
    fs::create_dir_all(&results).map_err(|e| format!("create {}: {e}", results.display()))?;
    for name in ["ratios.svg", "results.json"] {
        fs::copy(out_dir.join(name), results.join(name))
            .map_err(|e| format!("copy {name}: {e}"))?;
    }
    let md = fs::read_to_string(out_dir.join("BENCHMARKS.md"))
        .map_err(|e| format!("read BENCHMARKS.md: {e}"))?
        .replace("](ratios.svg)", "](bench/results/ratios.svg)");
    fs::write(root.join("BENCHMARKS.md"), md).map_err(|e| format!("write BENCHMARKS.md: {e}"))?;
    println!("==> published BENCHMARKS.md and bench/results/");
    Ok(())
}

/// Runs `cmd`, echoes and appends its JSON lines to `raw`.
fn collect(cmd: &mut Command, raw: &mut File) -> Result<(), String> {
    let out = cmd
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        println!("    {line}");
        writeln!(raw, "{line}").map_err(|e| e.to_string())?;
    }
    if !out.status.success() {
        return Err(format!(
            "{:?} exited with {}",
            cmd.get_program(),
            out.status
        ));
    }
    Ok(())
}

/// One measured cell of the command-line comparison.
struct Cell {
    workload: String,
    system: &'static str,
    /// Throughput (jobs or lines per second) and overhead per job (s), or why not.
    value: Result<(f64, f64), String>,
}

/// How long one run of a command in the command-line comparison may take before it is
/// killed and its cell says it timed out (a run takes a few seconds).
const CMD_LIMIT: Duration = Duration::from_secs(120);

/// Wall time of `cmd` with stdin from `input` and stdout discarded (or kept to check it),
/// median over `runs`; an error if it fails, is missing or runs past [`CMD_LIMIT`].
fn time_cmd(
    cmd: &mut Command,
    input: &std::path::Path,
    runs: usize,
    check: Option<&str>,
) -> Result<f64, String> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let stdin = File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
        let t = Instant::now();
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (out, dt) = output_within(cmd, t, CMD_LIMIT)?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        if let Some(expected) = check
            && String::from_utf8_lossy(&out.stdout) != expected
        {
            return Err(format!("{:?} gave wrong results", cmd.get_program()));
        }
        times.push(dt);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs `cmd` (its stdout and stderr piped) as `Command::output` does, but for at most
/// `limit`: its output and the seconds from `start` to its exit (to the millisecond), or an
/// error once it has run past `limit` (it is killed; whatever it started may go on, and its
/// output is not waited for).
fn output_within(
    cmd: &mut Command,
    start: Instant,
    limit: Duration,
) -> Result<(std::process::Output, f64), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {limit:?}"));
            }
        }
    };
    let dt = start.elapsed().as_secs_f64();
    let output = std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    Ok((output, dt))
}

fn gnu_parallel() -> bool {
    Command::new("parallel")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("GNU parallel"))
}

/// `procpool run` against `xargs -P 2` and GNU parallel (2 000 jobs of `true` and of a
/// 5 ms `sleep`), and `procpool map` with a Python worker against CPython's
/// `multiprocessing.Pool` and against `xargs -P 2` starting python once per line. Nothing
/// is installed: a missing tool's cells say so. Writes `cli.jsonl` and `CLI.md` in
/// `out_dir` and prints the table.
fn cli_comparisons(
    root: &std::path::Path,
    out_dir: &std::path::Path,
    exe: &std::path::Path,
    quick: bool,
) -> Result<(), String> {
    println!("==> procpool run / map against xargs, GNU parallel and CPython's Pool");
    let worker = root.join("bench/cli/worker.py");
    let batched = root.join("bench/cli/worker_batched.py");
    let mp_pool = root.join("bench/cli/mp_pool_lines.py");
    let runs = if quick { 1 } else { 3 };
    // `--quick` is a check that everything runs (under 2 minutes with the rest): its `run`
    // jobs are fewer, and its one-python-per-line map starts 10 interpreters, not 40
    // (they took 14 s and 6 s of its minutes).
    let jobs = if quick { 500usize } else { 2000 };
    let lines = if quick { 20_000 } else { 200_000 };
    let per_process_lines = if quick { 10 } else { 200 };
    let write = |name: &str, text: String| -> Result<std::path::PathBuf, String> {
        let p = out_dir.join(name);
        fs::write(&p, text).map_err(|e| format!("write {}: {e}", p.display()))?;
        Ok(p)
    };
    let ones = write("cli-ones.txt", "1\n".repeat(jobs))?;
    let sleeps = write("cli-sleeps.txt", "0.005\n".repeat(jobs))?;
    let numbers = write(
        "cli-lines.txt",
        (1..=lines).map(|i| format!("{i}\n")).collect(),
    )?;
    let few = write(
        "cli-lines-few.txt",
        (1..=per_process_lines).map(|i| format!("{i}\n")).collect(),
    )?;
    let expect = |n: usize| -> String {
        (1..=n as u64)
            .map(|i| format!("{}\n", (i * i + 7) % 1_000_003))
            .collect()
    };
    let expect_many = expect(lines);
    let parallel = gnu_parallel();
    let mut cells = Vec::new();

    // procpool run, xargs and GNU parallel: (jobs/s, overhead per job on each of 2 slots).
    let (run_true, run_sleep) = (
        format!("run: {jobs} × true"),
        format!("run: {jobs} × sleep 5 ms"),
    );
    for (workload, input, job_secs, args) in [
        (&run_true, &ones, 0.0, vec!["true"]),
        (&run_sleep, &sleeps, 0.005, vec!["sleep"]),
    ] {
        let rate = |secs: f64| (jobs as f64 / secs, secs * 2.0 / jobs as f64 - job_secs);
        let mut pp = Command::new(exe);
        pp.args(["run", "-q", "-j", "2"]).args(&args);
        cells.push(Cell {
            workload: workload.to_string(),
            system: "procpool run -j 2",
            value: time_cmd(&mut pp, input, runs, None).map(rate),
        });
        let mut xa = Command::new("xargs");
        xa.args(["-P", "2", "-n", "1"]).args(&args);
        cells.push(Cell {
            workload: workload.to_string(),
            system: "xargs -P 2",
            value: time_cmd(&mut xa, input, runs, None).map(rate),
        });
        let value = if parallel {
            let mut gp = Command::new("parallel");
            gp.args(["--will-cite", "-j", "2"]).args(&args);
            time_cmd(&mut gp, input, runs, None).map(rate)
        } else {
            Err("not installed (Debian package `parallel`)".into())
        };
        cells.push(Cell {
            workload: workload.to_string(),
            system: "GNU parallel -j 2",
            value,
        });
    }

    // procpool map against CPython's Pool and one python per line: lines/s.
    let workload = &format!("map: {}k lines, tiny Python computation", lines / 1000);
    let per_line = |n: usize| move |secs: f64| (n as f64 / secs, secs * 2.0 / n as f64);
    for (script, system) in [
        (&worker, "procpool map -j 2 (worker flushes each line)"),
        (&batched, "procpool map -j 2 (worker answers in batches)"),
    ] {
        let mut pm = Command::new(exe);
        pm.args(["map", "-q", "-j", "2", "--", "python3"])
            .arg(script);
        cells.push(Cell {
            workload: workload.to_string(),
            system,
            value: time_cmd(&mut pm, &numbers, runs, Some(&expect_many)).map(per_line(lines)),
        });
    }
    let mut mp = Command::new("python3");
    mp.arg(&mp_pool).arg("2");
    cells.push(Cell {
        workload: workload.to_string(),
        system: "CPython multiprocessing.Pool(2).map",
        value: time_cmd(&mut mp, &numbers, runs, Some(&expect_many)).map(per_line(lines)),
    });
    let mut xp = Command::new("xargs");
    xp.args([
        "-P",
        "2",
        "-n",
        "1",
        "python3",
        "-c",
        "import sys; n = int(sys.argv[1]); print((n * n + 7) % 1000003)",
    ]);
    // Order is not kept by xargs -P: only the exit status is checked.
    cells.push(Cell {
        workload: workload.to_string(),
        system: "xargs -P 2, one python per line",
        value: time_cmd(&mut xp, &few, runs, None).map(per_line(per_process_lines)),
    });

    // Table, JSON lines, goals.
    let mut md = String::from(
        "| workload | system | throughput | overhead per job and slot |\n|---|---|---|---|\n",
    );
    let mut jsonl = String::new();
    for c in &cells {
        match &c.value {
            Ok((rate, over)) => {
                md.push_str(&format!(
                    "| {} | {} | {:.0} /s | {:.3} ms |\n",
                    c.workload,
                    c.system,
                    rate,
                    over * 1e3
                ));
                jsonl.push_str(&format!(
                    "{{\"workload\":\"{}\",\"system\":\"{}\",\"per_second\":{rate:e},\"overhead_s\":{over:e},\"ok\":true}}\n",
                    c.workload, c.system
                ));
            }
            Err(e) => {
                md.push_str(&format!("| {} | {} | {e} | |\n", c.workload, c.system));
                jsonl.push_str(&format!(
                    "{{\"workload\":\"{}\",\"system\":\"{}\",\"ok\":false,\"reason\":\"{}\"}}\n",
                    c.workload,
                    c.system,
                    e.replace(['"', '\\'], "'")
                ));
            }
        }
    }
    let rate = |system: &str, workload_prefix: &str| {
        cells
            .iter()
            .find(|c| c.system == system && c.workload.starts_with(workload_prefix))
            .and_then(|c| c.value.as_ref().ok())
            .map(|v| v.0)
    };
    let mut goals = String::new();
    for w in [run_true.as_str(), &run_sleep] {
        if let Some(pp) = rate("procpool run -j 2", w) {
            for other in ["xargs -P 2", "GNU parallel -j 2"] {
                if let Some(o) = rate(other, w) {
                    goals.push_str(&format!(
                        "- {w}: procpool run / {other} = {:.2}× (goal: > 1)\n",
                        pp / o
                    ));
                }
            }
        }
    }
    if let (Some(simple), Some(batched), Some(py), Some(xp)) = (
        rate("procpool map -j 2 (worker flushes each line)", "map"),
        rate("procpool map -j 2 (worker answers in batches)", "map"),
        rate("CPython multiprocessing.Pool(2).map", "map"),
        rate("xargs -P 2, one python per line", "map"),
    ) {
        goals.push_str(&format!(
            "- map: CPython Pool / procpool map = {:.2}× with the per-line worker, {:.2}× with the batching worker (goal: ≤ 1.5)\n",
            py / simple,
            py / batched
        ));
        goals.push_str(&format!(
            "- map: procpool map / one python per line = {:.0}× (per-line worker; goal: ≥ 20)\n",
            simple / xp
        ));
    }
    let text = format!(
        "## The `procpool` command: `run` and `map` beside xargs, GNU parallel and CPython's \
         Pool\n\n\
         Each figure is the median of {runs} run(s) of the whole command, start to exit: \
         {jobs} jobs for `run`, {lines} lines for `map` ({per_process_lines} for one python \
         per line). The last column is the wall time per job times the 2 slots.\n\n{md}\n\
         {goals}"
    );
    println!("{text}");
    fs::write(out_dir.join("CLI.md"), &text).map_err(|e| format!("write CLI.md: {e}"))?;
    fs::write(out_dir.join("cli.jsonl"), jsonl).map_err(|e| format!("write cli.jsonl: {e}"))?;
    Ok(())
}

/// The policy's cost per task by pool size, from criterion's saved samples, as a markdown
/// section of the report: the fastest sample and the median besides criterion's mean, and
/// the sizes measured interleaved (`interleaved`: the bench's JSON), which give the verdict.
/// This VM has minutes when every sample runs much slower (a neighbour on the same CPUs);
/// criterion measures one size after another, so a slow minute lands on one size's samples
/// and moves its figures; measured in rotating rounds, a slow minute falls on every size
/// alike, and each round's ratio to 2 workers compares sizes measured within milliseconds.
fn dispatch_summary(interleaved: &std::path::Path) -> String {
    let dir = target_dir().join("criterion/policy_per_task");
    let rounds = fs::read_to_string(interleaved).unwrap_or_default();
    let mut md = vec![
        "## Dispatch cost by pool size (criterion, the policy alone)".to_string(),
        String::new(),
        "The scheduling policy's own cost per task (`cargo bench -p pool-core`: submit, \
         dispatch and answer, with workers that start and answer at once), per sample of \
         runs of 10 000 tasks; then the sizes measured interleaved (round after round, one \
         run of each size in a rotating order, for 4 s; each round's ratio to 2 workers, \
         the median of those). Goal: at most 1.5x from 2 to 256 workers."
            .to_string(),
        String::new(),
        "| workers | fastest sample | median | mean | fastest / 2 workers | median / 2 workers \
         | interleaved median | interleaved / 2 workers |"
            .to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut base: Option<(f64, f64)> = None;
    let mut worst = (0.0f64, 0.0f64, None::<f64>);
    for workers in [2, 16, 64, 256] {
        let path = dir.join(format!(
            "submit_dispatch_done_{workers}_workers/new/sample.json"
        ));
        let (ins, iratio) = match interleaved_row(&rounds, workers) {
            Some((ns, r)) => {
                worst.2 = Some(worst.2.unwrap_or(0.0).max(r));
                (format!("{ns:.1} ns"), format!("{r:.2}x"))
            }
            None => ("not measured".into(), String::new()),
        };
        let Some(mut per_task) = fs::read_to_string(&path)
            .ok()
            .and_then(|text| per_task_ns(&text))
        else {
            md.push(format!(
                "| {workers} | no samples | | | | | {ins} | {iratio} |"
            ));
            continue;
        };
        per_task.sort_by(f64::total_cmp);
        let fastest = per_task[0];
        let median = per_task[per_task.len() / 2];
        let mean = per_task.iter().sum::<f64>() / per_task.len() as f64;
        let (f2, m2) = *base.get_or_insert((fastest, median));
        worst = (worst.0.max(fastest / f2), worst.1.max(median / m2), worst.2);
        md.push(format!(
            "| {workers} | {fastest:.1} ns | {median:.1} ns | {mean:.1} ns | {:.2}x | {:.2}x \
             | {ins} | {iratio} |",
            fastest / f2,
            median / m2,
        ));
    }
    let verdict = |r: f64| if r <= 1.5 { "met" } else { "not met" };
    md.push(String::new());
    if let Some(r) = worst.2 {
        md.push(format!(
            "Largest ratio to 2 workers, interleaved: {r:.2}x ({}).",
            verdict(r)
        ));
    }
    if base.is_some() {
        md.push(format!(
            "Criterion's, one size after another: fastest samples {:.2}x, medians {:.2}x.",
            worst.0, worst.1,
        ));
    }
    md.push(String::new());
    md.join("\n")
}

/// From the interleaved measurement's JSON (an array of `{"workers", "ns_per_task",
/// "ratio_to_2"}`): the row for `workers`, as (ns per task, ratio to 2 workers).
fn interleaved_row(json: &str, workers: u64) -> Option<(f64, f64)> {
    let key = format!("{{\"workers\":{workers},");
    let row = &json[json.find(&key)? + key.len()..];
    let row = &row[..row.find('}')?];
    let field = |name: &str| -> Option<f64> {
        let at = row.find(&format!("\"{name}\":"))? + name.len() + 3;
        row[at..].split(',').next()?.trim().parse().ok()
    };
    Some((field("ns_per_task")?, field("ratio_to_2")?))
}

/// From criterion's `sample.json` (`"iters"` and `"times"`, in ns, of runs of 10 000
/// tasks): each sample's time per task.
fn per_task_ns(text: &str) -> Option<Vec<f64>> {
    let array = |key: &str| -> Option<Vec<f64>> {
        let at = text.find(key)? + key.len();
        let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
        let body = rest.strip_prefix('[')?;
        let body = &body[..body.find(']')?];
        body.split(',').map(|n| n.trim().parse().ok()).collect()
    };
    let (iters, times) = (array("\"iters\"")?, array("\"times\"")?);
    (!iters.is_empty() && iters.len() == times.len()).then(|| {
        iters
            .iter()
            .zip(&times)
            .map(|(n, t)| t / n / 10_000.0)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::{interleaved_row, output_within, per_task_ns};

    #[test]
    fn reads_the_interleaved_rows() {
        let json = r#"[{"workers":2,"ns_per_task":76.60,"ratio_to_2":1.0000},{"workers":256,"ns_per_task":96.61,"ratio_to_2":1.2400}]"#;
        assert_eq!(interleaved_row(json, 2), Some((76.6, 1.0)));
        assert_eq!(interleaved_row(json, 256), Some((96.61, 1.24)));
        assert_eq!(interleaved_row(json, 16), None);
        assert_eq!(interleaved_row("", 2), None);
    }

    #[test]
    fn reads_criterion_samples_as_time_per_task() {
        let text = r#"{"sampling_mode":"Linear","iters":[2.0,4.0, 6.0],"times":[1000000.0,2.2e6,3000000.0]}"#;
        assert_eq!(per_task_ns(text), Some(vec![50.0, 55.0, 50.0]));
        assert_eq!(per_task_ns(r#"{"iters":[1.0],"times":[]}"#), None);
        assert_eq!(per_task_ns(r#"{"iters":[1.0],"times":[x]}"#), None);
    }

    /// A command of the comparison gives its output and its time; one that runs past its
    /// limit is killed and is an error saying so, instead of holding up the bench.
    #[test]
    fn a_command_past_its_limit_is_killed_and_is_an_error() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out; echo err >&2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (out, dt) = output_within(&mut ok, Instant::now(), Duration::from_secs(30)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(dt < 30.0, "{dt}");

        let mut slow = Command::new("sleep");
        slow.arg("30").stdout(Stdio::piped()).stderr(Stdio::piped());
        let t = Instant::now();
        let e = output_within(&mut slow, t, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e, "timed out after 200ms");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
