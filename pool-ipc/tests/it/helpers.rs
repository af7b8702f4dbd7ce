//! Shared helpers: raw frame bytes and fd counting.

use std::os::fd::OwnedFd;

/// A raw frame: little-endian length, then the payload.
pub(crate) fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Writes all of `b` to `fd` with plain `write` calls.
pub(crate) fn write_all(fd: &OwnedFd, mut b: &[u8]) {
    while !b.is_empty() {
        let n = rustix::io::write(fd, b).expect("write");
        b = &b[n..];
    }
}

/// Number of open fds of this process.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs` seconds,
/// so that a bug shows up as a failure instead of a hung test run.
pub(crate) fn bounded<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(()) => t.join().expect("test thread"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: re-raise its panic.
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {secs} s"),
    }
}
