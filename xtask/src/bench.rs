//! `cargo xtask bench [--quick] [--publish]`: procpool beside CPython's `multiprocessing.Pool` and
//! procspawn, in one run, on this machine.
//!
//! Steps: build `procpool` (pool-cli) in release mode and run `procpool bench --reference`
//! (procpool with each start method, then `bench/reference/mp_pool.py`, built into the
//! command, with `python3` for each start method); build and run the
//! procspawn comparison (`bench/procspawn`, outside the workspace) where it builds; then
//! `bench/report.py` turns all the JSON lines into a markdown table (stdout),
//! `target/bench/results.json`, `target/bench/ratios.svg` and `target/bench/BENCHMARKS.md`.
//! With `--publish`, that report replaces the repository's `BENCHMARKS.md` (chart and data
//! in `bench/results/`). Finally the criterion micro-benchmarks run (skipped with
//! `--quick`).

use std::fs::{self, File};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{root, step};

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

    step(
        "build procpool (release)",
        Command::new(cargo()).args(["build", "--release", "-p", "pool-cli"]),
    )?;
    // procpool, then CPython's Pool on the same workloads (the reference script is built
    // into the command), all as JSON lines.
    println!("==> procpool bench --reference (procpool, then CPython's multiprocessing.Pool)");
    let mut cmd = Command::new(root.join("target/release/procpool"));
    cmd.args(["bench", "--reference", "--runs", runs]);
    if quick {
        cmd.arg("--quick");
    }
    collect(&mut cmd, &mut raw)?;

    let procspawn = root.join("bench/procspawn/Cargo.toml");
    if procspawn.exists() {
        println!("==> procspawn (where it can do the workload)");
        let built = Command::new(cargo())
            .args(["build", "--release", "--manifest-path"])
            .arg(&procspawn)
            .env("CARGO_TARGET_DIR", root.join("target/procspawn-bench"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let exe = root.join("target/procspawn-bench/release/procspawn-bench");
        if built && exe.exists() {
            let mut cmd = Command::new(exe);
            cmd.args(["--workload", "all", "--runs", runs]);
            if quick {
                cmd.arg("--quick");
            }
            if let Err(e) = collect(&mut cmd, &mut raw) {
                eprintln!("    procspawn: {e}");
            }
        } else {
            writeln!(
                raw,
                "{{\"system\":\"procspawn\",\"workload\":\"apply_rtt\",\"ok\":false,\"reason\":\"procspawn did not build here\"}}"
            )
            .map_err(|e| e.to_string())?;
        }
    }
    drop(raw);

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
    if !quick {
        step(
            "criterion micro-benchmarks",
            Command::new(cargo()).args(["bench", "--workspace"]),
        )?;
    }
    println!(
        "==> bench done in {:.0}s; raw results in {}",
        started.elapsed().as_secs_f64(),
        raw_path.display()
    );
    Ok(())
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

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
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
