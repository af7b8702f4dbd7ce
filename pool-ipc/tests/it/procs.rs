//! Real child processes: the test binary re-executes itself to run a helper "test" that
//! plays the peer. The channel reaches the child as its stdin (and, for a second fd, its
//! stderr), which `std::process` sets up safely; every other fd stays close-on-exec.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool_ipc::shm::{Bell, Segment, futex_wait, futex_wake};
use pool_ipc::{Config, Duplex, ErrorKind, FramedConn, Receiver, Sender};

use crate::helpers::bounded;

const ROLE: &str = "POOL_IPC_TEST_ROLE";
const FD: &str = "POOL_IPC_TEST_FD";
const SHM: &str = "POOL_IPC_TEST_SHM";
const PARENT: &str = "POOL_IPC_TEST_PARENT";

/// A child process that is killed and reaped if the test fails early.
struct Kid(Child);

impl Kid {
    /// Waits (bounded) for the child to exit; returns its exit code (-1 for a signal).
    fn wait(mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "child did not exit in {secs} s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Re-executes this test binary to run `helper` with `role`; `input` becomes the child's
/// stdin and `output` its stderr.
fn spawn(
    role: &str,
    input: Option<OwnedFd>,
    output: Option<OwnedFd>,
    env: &[(&str, String)],
) -> Kid {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "procs::helper",
        "--test-threads=1",
        "-q",
    ]);
    cmd.env(ROLE, role)
        .env(PARENT, std::process::id().to_string());
    cmd.stdin(input.map_or_else(Stdio::null, Stdio::from))
        .stdout(Stdio::null());
    if let Some(o) = output {
        cmd.stderr(Stdio::from(o));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Kid(cmd.spawn().unwrap())
}

/// The channel the parent passed as stdin (a close-on-exec duplicate).
fn channel_in() -> OwnedFd {
    std::io::stdin().as_fd().try_clone_to_owned().unwrap()
}

/// The channel the parent passed as stderr (a close-on-exec duplicate).
fn channel_out() -> OwnedFd {
    std::io::stderr().as_fd().try_clone_to_owned().unwrap()
}

fn shm_cfg() -> Config {
    match std::env::var(SHM) {
        Ok(t) => Config::new().shm_threshold(Some(t.parse().unwrap())),
        Err(_) => Config::new(),
    }
}

/// The peer side, run in the child. Not a real test.
#[test]
#[ignore = "helper: run via re-exec"]
fn helper() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "echo" => {
            let mut d = Duplex::<Vec<u8>, Vec<u8>>::with_config(channel_in(), shm_cfg()).unwrap();
            loop {
                match d.recv() {
                    Ok(v) => d.send(&v).unwrap(),
                    Err(e) if e.kind() == ErrorKind::Closed => break,
                    Err(e) => panic!("echo child: {e}"),
                }
            }
        }
        "sum_pipe" => {
            let mut rx = Receiver::<u64>::new(channel_in());
            let mut tx = Sender::<u64>::new(channel_out());
            let mut sum = 0;
            loop {
                match rx.recv() {
                    Ok(v) => sum += v,
                    Err(e) if e.kind() == ErrorKind::Closed => break,
                    Err(e) => panic!("sum child: {e}"),
                }
            }
            tx.send(&sum).unwrap();
        }
        "die_mid_frame" => {
            let fd = channel_in();
            let mut b = 100u32.to_le_bytes().to_vec();
            b.extend_from_slice(&[1; 10]);
            rustix::io::write(&fd, &b).unwrap();
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL)
                .unwrap();
            unreachable!("killed");
        }
        "take_fd" => {
            let sock = channel_in();
            let mut buf = [0u8; 16];
            let (n, fds) = pool_ipc::fdpass::recv_fds(sock.as_fd(), &mut buf, 4).unwrap();
            assert_eq!(&buf[..n], b"pipe");
            for fd in &fds {
                let fl = rustix::io::fcntl_getfd(fd).unwrap();
                assert!(fl.contains(rustix::io::FdFlags::CLOEXEC));
            }
            rustix::io::write(&fds[0], b"hello from the child").unwrap();
        }
        "segment" => {
            // Open the parent's segment through /proc, without any fd passing.
            let pid: u32 = std::env::var(PARENT).unwrap().parse().unwrap();
            let n: i32 = std::env::var(FD).unwrap().parse().unwrap();
            let seg = Segment::open_in_process(pid, n).unwrap();
            seg.write_at(64, b"written by the child");
            seg.atomic_u32(0).store(1, Ordering::Release);
            futex_wake(seg.atomic_u32(0), 1).unwrap();
            // Wait (bounded) for the parent's answer through the futex.
            let w = seg.atomic_u32(0);
            let deadline = Instant::now() + Duration::from_secs(20);
            while w.load(Ordering::Acquire) != 2 {
                assert!(Instant::now() < deadline, "parent never answered");
                futex_wait(w, 1, Some(Duration::from_secs(1))).unwrap();
            }
        }
        "bell_echo" => {
            // Answers each message on its channel, ringing the parent's bell after every
            // write: the parent waits on the bell, not the socket.
            let pid: u32 = std::env::var(PARENT).unwrap().parse().unwrap();
            let n: i32 = std::env::var(FD).unwrap().parse().unwrap();
            let seg: &'static Segment =
                Box::leak(Box::new(Segment::open_in_process(pid, n).unwrap()));
            let mut d = Duplex::<u64, u64>::new(channel_in()).unwrap();
            let word = seg.atomic_u32(0);
            d.sender()
                .on_write(Box::new(move || Bell::new(word).ring()));
            loop {
                match d.recv() {
                    Ok(v) => d.send(&(v + 1)).unwrap(),
                    Err(e) if e.kind() == ErrorKind::Closed => break,
                    Err(e) => panic!("bell child: {e}"),
                }
            }
        }
        "leak_check" => {
            // A fresh single-threaded process: every fd the crate opens must be closed
            // again once its owners are dropped.
            let before = crate::helpers::open_fds();
            {
                let cfg = Config::new().shm_threshold(Some(1000));
                let (mut a, mut b) =
                    pool_ipc::duplex_with_config::<Vec<u8>, Vec<u8>>(cfg.clone()).unwrap();
                for n in [10usize, 100_000, 3 << 20, 50_000] {
                    a.send(&vec![1; n]).unwrap();
                    assert_eq!(b.recv().unwrap().len(), n);
                    b.send(&vec![2; n]).unwrap();
                    assert_eq!(a.recv().unwrap().len(), n);
                }
                let (x, y) = pool_ipc::socketpair().unwrap();
                let mut conn = FramedConn::new(x, cfg.clone()).unwrap();
                let mut peer = Duplex::<Vec<u8>, Vec<u8>>::with_config(y, cfg).unwrap();
                peer.send(&vec![3; 200_000]).unwrap();
                assert_eq!(
                    crate::conn::next_blocking(&mut conn)
                        .unwrap()
                        .unwrap()
                        .len(),
                    200_003
                );
                conn.queue_msg(&vec![4u8; 200_000]).unwrap();
                assert!(conn.flush().unwrap());
                // Queued but never sent: the ring's fd must not leak either.
                conn.queue_msg(&vec![5u8; 300_000]).unwrap();
                let seg = Segment::create("leak", 4096).unwrap();
                let _again = Segment::from_fd(seg.as_fd().try_clone_to_owned().unwrap()).unwrap();
                let (r, w) = pool_ipc::pipe().unwrap();
                let mut tx = Sender::<u8>::new(w);
                tx.send(&1).unwrap();
                assert_eq!(Receiver::<u8>::new(r).recv().unwrap(), 1);
            }
            assert_eq!(crate::helpers::open_fds(), before, "fds leaked");
        }
        other => panic!("unknown role {other}"),
    }
}

fn echo_roundtrips(cfg: Config, shm: Option<usize>) {
    let (a, b) = pool_ipc::socketpair().unwrap();
    let env: Vec<(&str, String)> = shm.map(|t| (SHM, t.to_string())).into_iter().collect();
    let kid = spawn("echo", Some(b), None, &env);
    let mut d = Duplex::<Vec<u8>, Vec<u8>>::with_config(a, cfg).unwrap();
    for n in [0usize, 1, 1000, 100_000, 1 << 20, 3 << 20, 5] {
        let v: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        d.send(&v).unwrap();
        assert_eq!(d.recv_timeout(Duration::from_secs(20)).unwrap().unwrap(), v);
    }
    drop(d);
    assert_eq!(kid.wait(20), 0);
}

#[test]
fn child_echo_over_socketpair() {
    bounded(60, || echo_roundtrips(Config::new(), None));
}

#[test]
fn child_echo_shm_mode_1mib() {
    bounded(60, || {
        echo_roundtrips(
            Config::new().shm_threshold(Some(64 * 1024)),
            Some(64 * 1024),
        )
    });
}

#[test]
fn child_pipes_both_ways() {
    bounded(60, || {
        let (r1, w1) = pool_ipc::pipe().unwrap();
        let (r2, w2) = pool_ipc::pipe().unwrap();
        let kid = spawn("sum_pipe", Some(r1), Some(w2), &[]);
        let mut tx = Sender::<u64>::new(w1);
        for i in 0..100_000u64 {
            tx.feed(&i).unwrap();
        }
        drop(tx.into_fd());
        let mut rx = Receiver::<u64>::new(r2);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(20)).unwrap(),
            Some(99_999 * 100_000 / 2)
        );
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(kid.wait(20), 0);
    });
}

#[test]
fn child_dies_mid_frame_is_truncated() {
    bounded(60, || {
        // Through a blocking Receiver...
        let (a, b) = pool_ipc::socketpair().unwrap();
        let kid = spawn("die_mid_frame", Some(b), None, &[]);
        let mut rx = Receiver::<Vec<u8>>::new(a);
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Truncated);
        assert_ne!(kid.wait(20), 0);
        // ...and through a FramedConn.
        let (a, b) = pool_ipc::socketpair().unwrap();
        let kid = spawn("die_mid_frame", Some(b), None, &[]);
        let mut conn = FramedConn::new(a, Config::new()).unwrap();
        let e = crate::conn::next_blocking(&mut conn).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated);
        assert_ne!(kid.wait(20), 0);
    });
}

#[test]
fn child_receives_fds() {
    bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let kid = spawn("take_fd", Some(b), None, &[]);
        let (r, w) = pool_ipc::pipe().unwrap();
        pool_ipc::fdpass::send_fds(a.as_fd(), b"pipe", &[w.as_fd()]).unwrap();
        drop(w);
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = rustix::io::read(&r, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"hello from the child");
        assert_eq!(kid.wait(20), 0);
    });
}

#[test]
fn child_shares_segment_and_futex() {
    bounded(60, || {
        let seg = Segment::create("shared", 4096).unwrap();
        // The child opens it through /proc/<our pid>/fd/<n>: it inherits nothing.
        let n = seg.as_fd().as_raw_fd();
        let kid = spawn("segment", None, None, &[(FD, n.to_string())]);
        let w = seg.atomic_u32(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while w.load(Ordering::Acquire) != 1 {
            assert!(Instant::now() < deadline, "child never signalled");
            futex_wait(w, 0, Some(Duration::from_secs(1))).unwrap();
        }
        let mut b = [0u8; 20];
        seg.read_at(64, &mut b);
        assert_eq!(&b, b"written by the child");
        w.store(2, Ordering::Release);
        futex_wake(w, 1).unwrap();
        assert_eq!(kid.wait(20), 0);
    });
}

#[test]
fn bell_wakes_parent_for_each_write_of_child() {
    bounded(60, || {
        let seg = Segment::create("bell", 4096).unwrap();
        let n = seg.as_fd().as_raw_fd();
        let (a, b) = pool_ipc::socketpair().unwrap();
        let kid = spawn("bell_echo", Some(b), None, &[(FD, n.to_string())]);
        let mut d = Duplex::<u64, u64>::new(a).unwrap();
        let bell = Bell::new(seg.atomic_u32(0));
        for i in 0..200u64 {
            let seen = bell.count();
            d.send(&i).unwrap();
            // Woken by the child's write: the answer is on the socket by then. A missed
            // ring would time out.
            assert!(
                bell.wait_past(seen, Duration::from_secs(20)).unwrap(),
                "round {i}"
            );
            let waiting = rustix::io::ioctl_fionread(d.receiver().as_fd()).unwrap();
            assert!(waiting > 0, "round {i}: the bell rang before the write");
            assert_eq!(d.recv().unwrap(), i + 1);
        }
        drop(d);
        assert_eq!(kid.wait(20), 0);
    });
}

#[test]
fn framed_conn_parent_with_child_duplex_shm() {
    bounded(60, || {
        let t = 64 * 1024;
        let (a, b) = pool_ipc::socketpair().unwrap();
        let kid = spawn("echo", Some(b), None, &[(SHM, t.to_string())]);
        let mut conn = FramedConn::new(a, Config::new().shm_threshold(Some(t))).unwrap();
        for round in 0..20u8 {
            let v = vec![round; if round % 2 == 0 { 1 << 20 } else { 10 }];
            conn.queue_msg(&v).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !conn.flush().unwrap() {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
            let back = crate::conn::next_blocking(&mut conn).unwrap().unwrap();
            assert_eq!(postcard::from_bytes::<Vec<u8>>(&back).unwrap(), v);
        }
        drop(conn);
        assert_eq!(kid.wait(20), 0);
    });
}

#[test]
fn no_fds_leak_in_a_fresh_process() {
    bounded(60, || {
        let kid = spawn("leak_check", None, None, &[]);
        assert_eq!(kid.wait(30), 0);
    });
}
