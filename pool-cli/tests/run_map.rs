//! `procpool run` and `procpool map`, run as a user runs them: the built binary, real
//! commands, a Python worker script, signals sent from outside.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_procpool");

/// Starts `procpool ARGS` with `input` on its stdin (written by a thread).
fn start(args: &[&str], input: Vec<u8>) -> Child {
    let mut child = Command::new(EXE)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start procpool");
    let mut stdin = child.stdin.take().expect("piped");
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    child
}

/// Waits for `child` with a deadline (a hang fails the test instead of stalling it); its
/// output is read meanwhile, and waited for within the same deadline (a worker left holding
/// a pipe fails the test instead of hanging it).
fn finish(child: Child, what: &str, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    let mut child = child;
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        rx
    };
    let (o, e) = (read(Box::new(out)), read(Box::new(err)));
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("procpool {what} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left.max(Duration::from_secs(1)))
            .unwrap_or_else(|_| panic!("procpool {what}: its output was still open"))
    };
    Output {
        status,
        stdout: collect(o),
        stderr: collect(e),
    }
}

fn procpool(args: &[&str], input: &[u8]) -> Output {
    finish(
        start(args, input.to_vec()),
        &args.join(" "),
        Duration::from_secs(60),
    )
}

fn lines(n: usize) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// `lines(n)`, then `middle`, then `lines(n)` again.
fn lines_around(middle: &[u8], n: usize) -> Vec<u8> {
    let mut input = lines(n);
    input.extend_from_slice(middle);
    input.extend_from_slice(&lines(n));
    input
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A private directory with the Python worker script (`worker.py DIR`): it answers a line
/// `N` with `2N PID`, exits with status 3 on `boom`, hangs on `hang`, and hangs on
/// `hang-once` only the first time (a file in DIR remembers).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("procpool-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("worker.py"),
        r#"import os, sys, time
here = sys.argv[1]
for line in sys.stdin:
    x = line.rstrip("\n")
    if x == "boom":
        sys.exit(3)
    if x == "hang":
        time.sleep(60)
    if x == "hang-once":
        flag = os.path.join(here, "hung")
        if not os.path.exists(flag):
            open(flag, "w").close()
            time.sleep(60)
    out = str(2 * int(x)) if x.isdigit() else x.upper()
    print(out, os.getpid(), flush=True)
"#,
    )
    .unwrap();
    dir
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Waits until `cond` holds (up to `limit`).
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn sigint(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
}

/// Sends SIGINT to `child`, waits for it (up to 10 s) and checks that it says it was
/// stopped by SIGINT and exits with status 130.
fn interrupt(child: Child, what: &str) -> Output {
    sigint(&child);
    let out = finish(child, what, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_stderr_has(&out, "stopped by SIGINT");
    out
}

fn assert_stderr_has(out: &Output, needle: &str) {
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

/// Checks that, within `limit`, no process's command line contains `marker`.
fn assert_none_left(marker: &str, limit: Duration) {
    assert!(
        eventually(limit, || processes_with(marker).is_empty()),
        "left behind: {:?}",
        processes_with(marker)
    );
}

/// The Python worker script of [`scratch`], in its private directory.
struct Worker {
    dir: PathBuf,
    script: String,
}

impl Worker {
    fn new(name: &str) -> Self {
        let dir = scratch(name);
        let script = dir.join("worker.py").to_str().unwrap().to_string();
        Worker { dir, script }
    }

    /// `map OPTIONS -- python3 worker.py DIR`.
    fn map_args<'a>(&'a self, options: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["map"];
        args.extend_from_slice(options);
        args.extend(["--", "python3", &self.script, self.dir.to_str().unwrap()]);
        args
    }

    /// Runs `procpool map OPTIONS -- python3 worker.py DIR` on `input`.
    fn map(&self, options: &[&str], input: &[u8]) -> Output {
        procpool(&self.map_args(options), input)
    }

    fn remove(self) {
        let _ = std::fs::remove_dir_all(self.dir);
    }
}

#[test]
fn run_keeps_input_order_over_1000_jobs() {
    let out = procpool(
        &["run", "-j", "4", "--keep-order", "--", "echo", "line", "{}"],
        &lines(1000),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout(&out), expected);
    assert_stderr_has(&out, "procpool run: 1000 jobs, 0 failed");
}

#[test]
fn run_keeps_each_jobs_output_whole() {
    // Each job writes three lines with pauses: without grouping they would interleave.
    let out = procpool(
        &[
            "run",
            "-j",
            "4",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo \"$1-$i\"; sleep 0.01; done",
            "sh",
        ],
        &lines(12),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 36);
    for block in got.chunks(3) {
        let job = block[0].split('-').next().unwrap();
        assert_eq!(
            block,
            [format!("{job}-1"), format!("{job}-2"), format!("{job}-3")]
        );
    }
}

#[test]
fn run_reports_failures_in_json_and_the_exit_status_counts_them() {
    let out = procpool(
        &[
            "run",
            "-j",
            "3",
            "--json",
            "--retries",
            "1",
            "--",
            "sh",
            "-c",
            "echo o$1; echo e$1 >&2; exit $(($1 % 3 == 0))",
            "sh",
        ],
        &lines(9),
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 9);
    for r in &recs {
        let n: u64 = r["input"].as_str().unwrap().parse().unwrap();
        let fails = n.is_multiple_of(3);
        assert_eq!(r["ok"], !fails, "{r}");
        assert_eq!(r["stdout"], format!("o{n}\n"));
        assert_eq!(r["stderr"], format!("e{n}\n"));
        assert_eq!(r["attempts"], if fails { 2 } else { 1 });
        assert_eq!(r["exit_code"], i64::from(fails));
        assert_eq!(r["command"][4], n.to_string());
    }
    assert_stderr_has(&out, "9 jobs, 3 failed, 3 retries");
}

#[test]
fn run_exit_status_is_capped_at_101() {
    let out = procpool(&["run", "-q", "-j", "4", "false"], &lines(120));
    assert_eq!(out.status.code(), Some(101));
}

#[test]
fn run_timeout_kills_the_whole_process_group() {
    let marker = "33.7071";
    let t = Instant::now();
    let out = procpool(
        &[
            "run",
            "--timeout",
            "300ms",
            "--json",
            "--",
            "sh",
            "-c",
            "sleep $1 & sleep $1; echo never",
            "sh",
        ],
        format!("{marker}\n").as_bytes(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(10));
    let r = &json_lines(&out)[0];
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("timed out"), "{r}");
    assert_none_left(marker, Duration::from_secs(2));
}

#[test]
fn run_writes_a_joblog() {
    let dir = scratch("joblog");
    let log = dir.join("jobs.tsv");
    let out = procpool(
        &[
            "run",
            "-q",
            "--joblog",
            log.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "exit $1",
            "sh",
        ],
        b"0\n2\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows[0][0], "Seq");
    assert_eq!(rows.len(), 3, "{text}");
    let exitvals: Vec<&str> = {
        let mut v: Vec<&str> = rows[1..].iter().map(|r| r[6]).collect();
        v.sort();
        v
    };
    assert_eq!(exitvals, ["0", "2"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn map_recycles_worker_commands_after_k_tasks() {
    let worker = Worker::new("recycle");
    let out = worker.map(
        &["-j", "2", "--max-tasks-per-child", "3", "--json"],
        &lines(30),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 30);
    let mut per_pid = std::collections::HashMap::<u64, usize>::new();
    for (i, r) in recs.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(r["seq"], n, "in input order");
        assert_eq!(r["input"], n.to_string());
        let output = r["output"].as_str().unwrap();
        let (value, pid) = output.split_once(' ').unwrap();
        assert_eq!(value, (2 * n).to_string());
        assert_eq!(pid.parse::<u64>().unwrap(), r["pid"].as_u64().unwrap());
        assert_eq!(r["attempts"], 1);
        *per_pid.entry(r["pid"].as_u64().unwrap()).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    assert!(per_pid.len() >= 10, "{per_pid:?}");
    assert_stderr_has(&out, "recycles");
    worker.remove();
}

/// `procpool map` ends once its worker commands have. What it sweeps at the end (orphans
/// of the pool's workers, given two seconds to exit by themselves) leaves out the seed
/// `init()` made, a child of the command for its whole life: sweeping it cost every map
/// those two seconds. Timed against `procpool run` over the same lines, which starts the
/// same pool and sweeps without waiting, so that a slow machine slows both alike.
#[test]
fn map_ends_once_its_worker_commands_have_without_waiting_for_the_seed() {
    let timed = |args: &[&str]| {
        let t = Instant::now();
        let out = procpool(args, &lines(4));
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "1\n2\n3\n4\n");
        t.elapsed()
    };
    let run = timed(&["run", "-q", "-j", "2", "--keep-order", "--", "echo", "{}"]);
    let map = timed(&["map", "-q", "-j", "2", "--", "cat"]);
    assert!(
        map < run + Duration::from_millis(1500),
        "map took {map:?}, run {run:?}: map waited for something"
    );
}

#[test]
fn map_reports_the_line_that_crashed_its_worker_and_goes_on() {
    let worker = Worker::new("crash");
    let out = worker.map(&["-j", "2"], &lines_around(b"boom\n", 20));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 41);
    for (i, line) in got.iter().enumerate() {
        if i == 20 {
            assert_eq!(*line, "", "the failed line keeps its place, empty");
        } else {
            let n = if i < 20 { i + 1 } else { i - 20 };
            assert_eq!(
                line.split(' ').next().unwrap(),
                (2 * n).to_string(),
                "{text}"
            );
        }
    }
    let err = stderr(&out);
    assert!(err.contains("line 21 (\"boom\") failed"), "{err}");
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("41 lines, 1 failed"), "{err}");
    worker.remove();
}

#[test]
fn map_times_out_a_hung_worker_and_retries_the_line_on_a_fresh_one() {
    let worker = Worker::new("hang");
    // The limit counts from when a line is sent, and a fresh worker's first line waits for
    // python to start: 2 s, not less, so that a loaded machine (the suite runs tests side
    // by side on two cores) does not time out the lines that do not hang.
    let out = worker.map(
        &["-j", "2", "--timeout", "2s", "--retries", "1", "--json"],
        b"1\nhang-once\n3\nhang\n5\n",
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 5);
    assert_eq!(
        recs[1]["ok"], true,
        "retried on a fresh worker: {}",
        recs[1]
    );
    assert_eq!(recs[1]["attempts"], 2);
    assert!(
        recs[1]["output"]
            .as_str()
            .unwrap()
            .starts_with("HANG-ONCE ")
    );
    assert_eq!(recs[3]["ok"], false, "{}", recs[3]);
    assert_eq!(recs[3]["attempts"], 2);
    assert!(
        recs[3]["error"].as_str().unwrap().contains("timed out"),
        "{}",
        recs[3]
    );
    for i in [0, 2, 4] {
        assert_eq!(recs[i]["ok"], true, "{}", recs[i]);
    }
    assert_none_left(&worker.script, Duration::from_secs(2));
    worker.remove();
}

#[test]
fn map_stops_a_worker_command_that_exits_at_once() {
    let t = Instant::now();
    let out = procpool(
        &[
            "map",
            "-j",
            "2",
            "--retries",
            "5",
            "--",
            "sh",
            "-c",
            "exit 1",
        ],
        &lines(50),
    );
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(20));
    let err = stderr(&out);
    assert!(err.contains("keeps exiting before it answers"), "{err}");
}

#[test]
fn map_carries_a_100_mib_line() {
    let mut big = vec![b'x'; 100 << 20];
    big.push(b'\n');
    big.extend_from_slice(b"small\n");
    let out = procpool(&["map", "-q", "-j", "2", "cat"], &big);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), (100 << 20) + 1 + 6);
    assert!(out.stdout.ends_with(b"\nsmall\n"));
}

#[test]
fn length_framing_carries_newlines() {
    let worker = r#"import sys
i, o = sys.stdin.buffer, sys.stdout.buffer
while True:
    h = i.readline()
    if not h:
        break
    d = i.read(int(h)).upper()
    o.write(b"%d\n" % len(d) + d)
    o.flush()
"#;
    let out = procpool(
        &[
            "map",
            "-q",
            "-0",
            "--framing",
            "length",
            "--json",
            "python3",
            "-c",
            worker,
        ],
        b"a\nb\0c\0",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = json_lines(&out);
    assert_eq!(recs[0]["output"], "A\nB");
    assert_eq!(recs[1]["output"], "C");
}

#[test]
fn sigint_stops_run_and_leaves_no_process() {
    let marker = "31.4159";
    let input: String = (0..8).map(|i| format!("{marker}{i}\n")).collect();
    let child = start(
        &[
            "run",
            "-j",
            "2",
            "--",
            "sh",
            "-c",
            "sleep $1 & sleep $1",
            "sh",
        ],
        input.into_bytes(),
    );
    assert!(
        eventually(Duration::from_secs(10), || processes_with(marker).len()
            >= 4),
        "the jobs did not start"
    );
    interrupt(child, "run (SIGINT)");
    assert_none_left(marker, Duration::from_secs(1));
}

#[test]
fn sigint_stops_map_and_leaves_no_process() {
    let worker = Worker::new("sigint");
    let child = start(
        &worker.map_args(&["-j", "2", "--chunk-size", "1"]),
        lines_around(b"hang\nhang\n", 10),
    );
    let s = &worker.script;
    assert!(
        eventually(Duration::from_secs(10), || processes_with(s).len() >= 3),
        "the workers did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    interrupt(child, "map (SIGINT)");
    // Only procpool's own command line names the script: once it is gone, nothing is.
    assert_none_left(s, Duration::from_secs(1));
    worker.remove();
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = procpool(&["run", "--", "no-such-command-here"], b"1\n");
    assert_eq!(out.status.code(), Some(255));
    assert_stderr_has(&out, "no-such-command-here");
    let out = procpool(&["map", "--", "no-such-command-here"], b"1\n");
    assert_eq!(out.status.code(), Some(255));
    assert_stderr_has(&out, "command not found");
    let out = procpool(&["run", "--arg-file", "/no/such/file", "echo"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert_stderr_has(&out, "/no/such/file");
    let out = procpool(&["run", "--no-such-flag", "echo"], b"");
    assert_eq!(out.status.code(), Some(255));
    let out = procpool(&["map", "--timeout", "soon", "cat"], b"");
    assert_eq!(out.status.code(), Some(255));
    // An empty input runs nothing and succeeds.
    for cmd in ["run", "map"] {
        let out = procpool(&[cmd, "cat"], b"");
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    // A 100 MiB argument cannot be passed to a command: that job fails, saying why.
    let mut big = vec![b'x'; 100 << 20];
    big.push(b'\n');
    let out = procpool(&["run", "echo"], &big);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "Argument list too long");
}

#[test]
fn help_documents_the_protocol_and_exit_status() {
    let out = procpool(&["map", "--help"], b"");
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(help.contains("Protocol"), "{help}");
    assert!(help.contains("ssh"), "{help}");
    assert!(help.contains("Exit status"), "{help}");
    let out = procpool(&["run", "--help"], b"");
    assert!(stdout(&out).contains("at most 101"));
    let out = procpool(&["completions", "bash"], b"");
    assert!(out.status.success());
    assert!(stdout(&out).contains("procpool"));
}
