//! `cargo xtask`: the project's own tasks.
//!
//! - `cargo xtask test`: formatting, clippy, every test (nextest when installed, else
//!   `cargo test`), doc tests, rustdoc warnings, then a check that the run left no worker
//!   process and no shared-memory file behind.
//! - `cargo xtask bench [--quick] [--publish]`: procpool beside CPython's `multiprocessing.Pool` (and
//!   procspawn where it can do the workload), with a markdown table, JSON and an SVG chart.
#![forbid(unsafe_code)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod bench;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask test | cargo xtask bench [--quick] [--publish]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Runs one step, printing it first; fails with the step's name.
pub(crate) fn step(name: &str, cmd: &mut Command) -> Result<(), String> {
    println!("==> {name}");
    let start = Instant::now();
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("{name}: could not start: {e}"))?;
    println!("    ({name}: {:.1}s)", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

/// Like [`step`], but the command (and everything it started, in its own process group)
/// is killed once `limit` has passed: a test that hangs fails the run instead of stalling
/// it. (nextest also ends a test that runs over 2 minutes; `cargo test` has no such limit.)
fn bounded_step(name: &str, cmd: &mut Command, limit: std::time::Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    println!("==> {name}");
    let start = Instant::now();
    let mut child = cmd
        .current_dir(root())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{name}: could not start: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < limit => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(None) | Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                return Err(format!(
                    "{name} did not finish within {} s: killed",
                    limit.as_secs()
                ));
            }
        }
    };
    println!("    ({name}: {:.1}s)", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

/// The longest the whole test run may take (the suite takes well under a minute here).
const TEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn test(args: &[String]) -> Result<(), String> {
    let fast = args.iter().any(|a| a == "--no-lint");
    let before = Leftovers::snapshot();
    if !fast {
        step("fmt", cargo().args(["fmt", "--all", "--check"]))?;
        step(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    if has_nextest() {
        bounded_step(
            "tests (nextest)",
            cargo().args([
                "nextest",
                "run",
                "--workspace",
                "--no-fail-fast",
                "--profile",
                "ci",
            ]),
            TEST_LIMIT,
        )?;
    } else {
        bounded_step(
            "tests (cargo test)",
            cargo().args(["test", "--workspace", "--all-targets", "--no-fail-fast"]),
            TEST_LIMIT,
        )?;
    }
    step("doc tests", cargo().args(["test", "--workspace", "--doc"]))?;
    if !fast {
        step(
            "rustdoc",
            cargo()
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )?;
    }
    // Workers exit within moments of their pool; give stragglers a bounded grace.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let after = Leftovers::snapshot();
        let new = after.new_since(&before);
        if new.is_empty() {
            println!("==> leftovers: none (no worker process, no /dev/shm file)");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the tests left things behind:\n  {}",
                new.join("\n  ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What a test run might leave behind: processes running from this checkout's `target/`
/// and files in `/dev/shm`.
struct Leftovers {
    items: Vec<String>,
}

impl Leftovers {
    fn snapshot() -> Self {
        let mut items = Vec::new();
        let target = root().join("target");
        let target = target.to_string_lossy().into_owned();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == std::process::id() {
                    continue;
                }
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'));
                let ours = exe.starts_with(&target) || cmdline.starts_with(&target);
                if ours && !exe.contains("/xtask") && !cmdline.contains("/xtask") {
                    items.push(format!("process {pid}: {}", cmdline.trim()));
                } else if zombie && ours {
                    items.push(format!("zombie {pid}: {}", cmdline.trim()));
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir("/dev/shm") {
            for entry in dir.flatten() {
                items.push(format!("/dev/shm/{}", entry.file_name().to_string_lossy()));
            }
        }
        Leftovers { items }
    }

    fn new_since(&self, before: &Leftovers) -> Vec<String> {
        self.items
            .iter()
            .filter(|i| !before.items.contains(i))
            .cloned()
            .collect()
    }
}
