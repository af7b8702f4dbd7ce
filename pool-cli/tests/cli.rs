//! The `procpool` command, run as a user runs it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the command with a deadline (a hang fails the test instead of stalling it).
fn procpool(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_procpool"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start procpool");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("procpool {args:?} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn bench_prints_one_ok_json_line_per_run_and_method() {
    let out = procpool(&[
        "bench",
        "--quick",
        "--runs",
        "2",
        "--workload",
        "apply_rtt",
        "--method",
        "fork",
        "--method",
        "forkserver",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    // First how the program is linked (for the report); then run by run: each method,
    // then each of the machine's raw round trips (the floors under apply_rtt: a pipe, and
    // a socketpair waited on with poll).
    assert_eq!(lines.len(), 9, "{text}");
    assert!(
        lines[0] == r#"{"build":"statically linked"}"#
            || lines[0].starts_with(r#"{"build":"dynamically linked, loading "#),
        "{text}"
    );
    let lines = &lines[1..];
    let run = [
        "procpool-fork",
        "procpool-forkserver",
        "raw-pipe",
        "raw-socket",
    ];
    for (line, system) in lines.iter().zip(run.iter().chain(&run)) {
        assert!(line.contains(&format!("\"system\":\"{system}\"")), "{line}");
        assert!(line.contains("\"workload\":\"apply_rtt\""), "{line}");
        assert!(line.contains("\"ok\":true"), "{line}");
        assert!(line.contains("\"unit\":\"s\""), "{line}");
    }
}

#[test]
fn an_unknown_workload_is_a_clear_error() {
    let out = procpool(&["bench", "--workload", "nonesuch"]);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid value 'nonesuch'"), "{err}");
    assert!(
        err.contains("apply_rtt"),
        "the message lists the workloads: {err}"
    );
}

#[test]
fn info_reports_the_defaults() {
    let out = procpool(&["info"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("default start method: Forkserver"), "{text}");
    assert!(text.contains("ForkserverPoolWorker-N"), "{text}");
}

#[test]
fn an_output_directory_that_cannot_be_made_fails_before_the_run() {
    let t = std::time::Instant::now();
    let out = procpool(&["bench", "--out", "/proc/no-such-dir/x"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot create"), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "it ran the benchmarks first"
    );
}
