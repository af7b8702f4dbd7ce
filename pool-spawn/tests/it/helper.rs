//! Running an `#[ignore]`d helper test of this binary in a process of its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts this test binary running only the ignored test `name`, with `env` added and
/// stdout piped.
pub(crate) fn spawn(name: &str, env: &[(&str, &str)]) -> Child {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn helper")
}

/// Reads the helper's stdout lines on a thread (the workers share that pipe, so it may
/// stay open after the helper dies).
pub(crate) fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `prefix`; returns what follows it.
pub(crate) fn expect_line(rx: &mpsc::Receiver<String>, prefix: &str, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                // libtest's "test … ... " may precede it on the same line.
                if let Some(at) = l.find(prefix) {
                    return l[at + prefix.len()..].trim().to_owned();
                }
            }
            Err(e) => panic!("no line starting with {prefix:?} from the helper: {e}"),
        }
    }
}

/// Waits (bounded) for the helper to exit.
pub(crate) fn wait(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("helper did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
