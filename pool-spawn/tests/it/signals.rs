//! What a parent's signal settings do to its workers: nothing.

use std::time::Duration;

use pool_spawn::{StartMethod, task};

use crate::driver::{WAIT, launch, launcher};
use crate::{helper, tasks};

const METHODS: [StartMethod; 3] = [
    StartMethod::Fork,
    StartMethod::Spawn,
    StartMethod::Forkserver,
];

/// Ignored in every worker: SIGINT, SIGPIPE (Rust's convention), SIGTTIN, SIGTTOU.
const WORKER_IGNORES: [i32; 4] = [2, 13, 21, 22];

#[test]
fn a_parent_that_ignores_sigchld_still_learns_how_workers_ended() {
    let mut child = helper::spawn("signals::helper_ignores_sigchld", &[]);
    let rx = helper::lines(child.stdout.take().unwrap());
    for method in METHODS {
        let ign = helper::expect_line(&rx, &format!("{method:?} IGNORES "), WAIT);
        let expected = format!("{WORKER_IGNORES:?}");
        assert_eq!(ign, expected, "{method:?}: signals the worker ignores");
        let status = helper::expect_line(&rx, &format!("{method:?} ENDED "), WAIT);
        assert!(
            status.starts_with("signal 6 (SIGABRT)"),
            "{method:?}: the abort is reported as {status}"
        );
    }
    assert!(helper::wait(&mut child, WAIT).success());
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_ignores_sigchld() {
    use std::io::Write;
    // SAFETY: installs no handler code; the helper process is ours alone.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    for method in METHODS {
        let mut l = launcher(method);
        let mut w = launch(&mut l, 1);
        w.setup();
        let mut ign: Vec<i32> = w.call(task::batch_ref(tasks::ignored_signals), ());
        // The C library reserves 32 and 33 for itself (no `sigaction` for them).
        ign.retain(|&s| s < 32);
        println!("{method:?} IGNORES {ign:?}");
        w.send_run(2, task::batch_ref(tasks::abort_now), &[()]);
        let status = match w.worker.wait_timeout(WAIT) {
            Ok(Some(s)) => s.to_string(),
            Ok(None) => "still running".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        println!("{method:?} ENDED {status}");
        std::io::stdout().flush().unwrap();
        drop(w);
        l.shutdown().unwrap();
    }
    std::thread::sleep(Duration::from_millis(10));
}

fn a_status_tells_whether_the_handle_sent_the_signal(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 1);
    w.setup();
    w.worker.signal_group(pool_spawn::Signal::KILL).unwrap();
    let s = w.wait();
    assert_eq!(s.signal(), Some(9));
    assert!(s.sent_by_pool(), "{method:?}: {s}");
    // Killed from outside (an operator, the OOM killer): not ours.
    let mut w = launch(&mut l, 2);
    w.setup();
    let pid = rustix::process::Pid::from_raw(w.worker.pid() as i32).unwrap();
    rustix::process::kill_process(pid, pool_spawn::Signal::KILL).unwrap();
    let s = w.wait();
    assert_eq!(s.signal(), Some(9));
    assert!(!s.sent_by_pool(), "{method:?}: {s}");
    // An exit code is never the pool's doing, whatever it sent.
    let mut w = launch(&mut l, 3);
    w.setup();
    w.worker.signal(pool_spawn::Signal::CONT).unwrap();
    w.send_run(1, task::batch_ref(tasks::exit_with), &[(7,)]);
    let s = w.wait();
    assert_eq!(s.code(), Some(7));
    assert!(!s.sent_by_pool());
}
crate::per_method!(
    a_status_tells_whether_the_handle_sent_the_signal,
    super::a_status_tells_whether_the_handle_sent_the_signal
);

#[test]
fn workers_print_to_a_terminal_with_tostop() {
    // Under a pseudo-terminal (`script`) with `stty tostop`: a worker, in a process group of
    // its own, is a background job there; its first print would stop it with SIGTTOU.
    let exe = std::env::current_exe().expect("current_exe");
    let cmd = format!(
        "stty tostop && exec '{}' --exact signals::helper_prints_to_terminal --ignored \
         --nocapture --test-threads=1",
        exe.display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let rx = helper::lines(child.stdout.take().unwrap());
    // Reaped whatever happens (`script` is not in the helper's process group).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    for method in METHODS {
        let said = helper::expect_line(&rx, &format!("{method:?} PRINT "), WAIT);
        assert_eq!(said, "done", "{method:?}");
    }
    assert!(helper::wait(&mut child.0, WAIT).success());
}

#[test]
#[ignore = "helper: run via re-exec"]
fn helper_prints_to_terminal() {
    use std::io::Write;
    for method in METHODS {
        let mut l = launcher(method);
        let mut w = launch(&mut l, 1);
        w.setup();
        w.send_run(
            1,
            task::batch_ref(tasks::print_line),
            &[(format!("hello from {method:?}"),)],
        );
        let said = match w.chan.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(_)) => "done".to_owned(),
            Ok(None) => "stopped (no answer in 5 s)".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        println!("{method:?} PRINT {said}");
        std::io::stdout().flush().unwrap();
        drop(w);
        l.shutdown().unwrap();
    }
}

fn workers_are_named_after_the_program(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 3);
    w.setup();
    let comm: String = w.call(task::batch_ref(tasks::comm), ());
    // The test binary is `it-<hash>`: cut to fit, then the worker's number.
    assert!(comm.starts_with("it-"), "{method:?}: {comm}");
    assert!(comm.ends_with(":w3"), "{method:?}: {comm}");
    assert_eq!(comm.len(), 15, "{method:?}: {comm}");
    if let Some(server) = l.server_pid() {
        let comm = std::fs::read_to_string(format!("/proc/{server}/comm")).unwrap();
        assert!(comm.trim_end().ends_with(":forksrv"), "{comm}");
    }
    w.exit();
}
crate::per_method!(
    workers_are_named_after_the_program,
    super::workers_are_named_after_the_program
);
