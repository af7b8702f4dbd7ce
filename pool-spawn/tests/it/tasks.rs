//! Task functions the workers run.

use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) fn square(x: u64) -> u64 {
    x * x
}

pub(crate) fn add(a: i32, b: i32) -> i32 {
    a + b
}

pub(crate) fn join3(a: String, b: u8, c: bool) -> String {
    format!("{a}-{b}-{c}")
}

pub(crate) fn answer() -> u32 {
    42
}

pub(crate) fn boom(x: i32) -> i32 {
    if x == 3 {
        panic!("boom at {x}");
    }
    x * 10
}

pub(crate) fn exit_with(code: i32) {
    std::process::exit(code)
}

pub(crate) fn abort_now() {
    std::process::abort()
}

pub(crate) fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ms
}

/// Name, pid and worker flag of the process that runs it.
pub(crate) fn whoami() -> (String, u32, bool) {
    let me = pool_spawn::current_process();
    (me.name().to_owned(), me.pid(), me.is_worker())
}

/// The open descriptors of the process that runs it, with their targets, leaving out the
/// one `read_dir` itself uses.
pub(crate) fn open_fds() -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd") {
        let e = e.expect("entry");
        let fd: i32 = e.file_name().to_string_lossy().parse().expect("fd number");
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with("/proc/") && target.ends_with("/fd") {
            continue;
        }
        v.push((fd, target));
    }
    v.sort();
    v
}

/// Starts `sleep 60` as a child of the worker (in its process group); returns its pid.
pub(crate) fn start_grandchild() -> u32 {
    let child = std::process::Command::new("sleep")
        .arg("60")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    std::mem::forget(child);
    pid
}

pub(crate) static INIT_VALUE: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init_store(v: u64) {
    INIT_VALUE.store(v, Ordering::SeqCst);
}

pub(crate) fn init_panics(v: u64) {
    panic!("initializer refuses {v}");
}

pub(crate) fn init_fails(v: u64) -> Result<(), String> {
    Err(format!("no good: {v}"))
}

pub(crate) fn read_init_value() -> u64 {
    INIT_VALUE.load(Ordering::SeqCst)
}

/// A duplicate of the worker's channel: its only socket above stdio.
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
            // A duplicate taken through a pidfd of ourselves: no raw descriptor to trust.
            let me = rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty())
                .expect("pidfd_open");
            return rustix::process::pidfd_getfd(&me, fd, PidfdGetfdFlags::empty())
                .expect("pidfd_getfd");
        }
    }
    panic!("no channel socket among this worker's descriptors")
}

/// Writes `bytes` to the worker's own channel, as a library writing to the wrong
/// descriptor would; returns how many were written.
pub(crate) fn write_to_channel(bytes: Vec<u8>) -> usize {
    rustix::io::write(channel_fd(), &bytes).expect("write to the channel")
}

/// The signals this process ignores, from `/proc/self/status`.
pub(crate) fn ignored_signals() -> Vec<i32> {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).expect("SigIgn mask"))
        .expect("a SigIgn line");
    (1..=64).filter(|s| mask & (1 << (s - 1)) != 0).collect()
}

/// Prints `line` on stdout (flushed); returns its length.
pub(crate) fn print_line(line: String) -> usize {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("print");
    out.flush().expect("flush");
    line.len()
}

/// This process's short name (`/proc/self/comm`).
pub(crate) fn comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("read /proc/self/comm")
        .trim_end()
        .to_owned()
}
