//! Helpers shared by the end-to-end tests.

use std::io::Read;
use std::process::{Child, ExitStatus, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use procpool::{Pool, PoolBuilder, StartMethod};

/// Appends `i` as a line to the file at `path`, in one write: lines of concurrent runs never
/// mix (O_APPEND).
pub(crate) fn append_line(path: &str, i: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{i}\n").as_bytes()).unwrap();
}

/// Runs the ignored test `test` of this binary in a child process with `env` set, and
/// returns what it printed after `RESULT ` (bounded: a hang is killed and reported as
/// `what`).
pub(crate) fn child_result(test: &str, env: &[(&str, String)], what: &str) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--ignored", "--nocapture"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd.spawn().unwrap(), Duration::from_secs(60), what).stdout;
    let out = String::from_utf8_lossy(&out);
    out.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("{what}: the child said nothing: {out}"))
        .to_owned()
}

/// Runs the ignored test `test` of this binary in a child process that is not dumpable
/// (`PROCPOOL_TEST_NOT_DUMPABLE`; as nobody when run as root, since root opens any
/// process's `/proc/<pid>/fd`), and checks that it printed `RESULT ok` (within 60 s).
pub(crate) fn not_dumpable_child_ok(test: &str) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--ignored", "--nocapture"])
        .env("PROCPOOL_TEST_NOT_DUMPABLE", "1")
        .stdout(std::process::Stdio::piped());
    if rustix::process::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    let child = cmd.spawn().unwrap();
    let out = output_within(child, Duration::from_secs(60), "the non-dumpable child").stdout;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("RESULT ok"), "{out}");
}

/// The child half of a test run by [`not_dumpable_child_ok`]: `false` (return at once)
/// unless its parent half started this process; otherwise makes this process non-dumpable
/// and returns `true`.
pub(crate) fn as_not_dumpable_child() -> bool {
    if std::env::var_os("PROCPOOL_TEST_NOT_DUMPABLE").is_none() {
        return false;
    }
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable).unwrap();
    true
}

/// Runs the ignored test `test` of this binary alone in a child process (within `within`,
/// named `what` if it hangs) and returns what it printed, once it passed; panics with its
/// output if it failed.
pub(crate) fn helper_passed(test: &str, within: Duration, what: &str) -> String {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = output_within(child, within, what);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every start method, for tests that must hold under each.
pub(crate) const METHODS: [StartMethod; 3] = [
    StartMethod::Forkserver,
    StartMethod::Spawn,
    StartMethod::Fork,
];

/// A builder for `method`; Fork is allowed although the test harness runs threads.
pub(crate) fn builder(method: StartMethod) -> PoolBuilder {
    Pool::builder()
        .processes(2)
        .start_method(method)
        .allow_fork_with_threads(true)
}

/// The field `name` (in kB) of `/proc/<pid>/status`, `pid` being a number or `self`; `None`
/// when the process or the field is not there.
pub(crate) fn status_kib(pid: impl std::fmt::Display, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The parent's resident memory, in KiB.
pub(crate) fn rss_kib() -> u64 {
    status_kib("self", "VmRSS").unwrap()
}

/// The number in environment variable `name`, when it holds one.
pub(crate) fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The seed in environment variable `name`, else one from the clock.
pub(crate) fn seed_from_env(name: &str) -> u64 {
    env_number(name).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

/// True while a process with this pid exists (zombies included).
pub(crate) fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The parent process of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: the fields after it follow its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(1).unwrap().parse().unwrap()
}

/// True once every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`). A SIGSTOP has not stopped a process when `kill` returns: one
/// of its threads takes the signal and stops the others, so until then another thread (a
/// worker running tasks off its main thread, as under libtest) can go on running.
pub(crate) fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The command name may hold spaces: the state follows its closing parenthesis.
            stat[stat.rfind(')').map_or(0, |i| i + 2)..].starts_with('T')
        })
    })
}

/// Waits (bounded) until `cond` holds; panics with `what` otherwise.
pub(crate) fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills (SIGKILL) `n` workers of `pool` one after another, each `after` it was first seen
/// (inside its initializer, when that is slower). Panics, naming
/// `method`, when `within` passes first.
pub(crate) fn kill_new_workers(
    pool: &Pool,
    method: StartMethod,
    n: usize,
    after: Duration,
    within: Duration,
) {
    let mut killed: Vec<u32> = Vec::new();
    let deadline = Instant::now() + within;
    while killed.len() < n {
        assert!(Instant::now() < deadline, "{method:?}: no worker to kill");
        if let Some(w) = pool
            .workers()
            .into_iter()
            .find(|w| !killed.contains(&w.pid()))
        {
            std::thread::sleep(after);
            let pid = rustix::process::Pid::from_raw(w.pid() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            killed.push(w.pid());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded) for `child` to exit; past `within`, kills and reaps it and panics, saying
/// `what` did not end.
pub(crate) fn wait_child(child: &mut Child, within: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// [`wait_child`], and what `child` wrote to its piped stdout and stderr (empty where not
/// piped), read while it runs so that a full pipe cannot hold it. The reading is bounded by
/// the same deadline: a descendant left holding a pipe fails the test instead of hanging it.
pub(crate) fn output_within(mut child: Child, within: Duration, what: &str) -> Output {
    fn read_all<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            let _ = tx.send(v);
        });
        rx
    }
    let deadline = Instant::now() + within;
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let status = wait_child(&mut child, within, what);
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1)),
        )
        .unwrap_or_else(|_| panic!("{what}: its output was still open after {within:?}"))
    };
    Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

/// Closes and joins `pool`, then checks that none of its workers is left, not even a zombie.
pub(crate) fn shut_down(pool: Pool) {
    let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid()).collect();
    pool.close();
    pool.join().expect("join after close");
    drop(pool);
    for pid in pids {
        wait_for(
            &format!("worker {pid} to be gone"),
            Duration::from_secs(5),
            || !alive(pid),
        );
    }
}

pub(crate) fn square(x: u64) -> u64 {
    x * x
}

pub(crate) fn add(a: u64, b: u64) -> u64 {
    a + b
}

pub(crate) fn sleep_ms(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

/// [`write_to_channel`], then waits (for the pool to notice) before returning: the task is
/// still running when its stray bytes are found.
pub(crate) fn write_to_channel_and_wait(bytes: Vec<u8>) -> u32 {
    write_to_channel(bytes);
    std::thread::sleep(Duration::from_secs(30));
    std::process::id()
}

pub(crate) fn my_pid() -> u32 {
    std::process::id()
}

/// In a worker: a duplicate of its channel to the pool, the only socket above stdio (taken
/// through a pidfd of itself, so no raw descriptor number is trusted).
pub(crate) fn channel_fd() -> std::os::fd::OwnedFd {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags};
    for e in std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd") {
        let e = e.expect("entry");
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if fd > 2 && is_socket {
            let me = rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty())
                .expect("pidfd_open");
            return rustix::process::pidfd_getfd(&me, fd, PidfdGetfdFlags::empty())
                .expect("pidfd_getfd");
        }
    }
    panic!("no channel socket among this worker's descriptors")
}

/// In a worker: writes `bytes` to its own channel, as a library writing to the wrong
/// descriptor would.
pub(crate) fn write_to_channel(bytes: Vec<u8>) -> u32 {
    let fd = channel_fd();
    let mut b = &bytes[..];
    while !b.is_empty() {
        let n = rustix::io::write(&fd, b).expect("write to the channel");
        b = &b[n..];
    }
    std::process::id()
}
