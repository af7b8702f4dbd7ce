//! Criterion benches of pool-ipc between two processes, each side by side with a raw
//! `read`/`write` reference over a bare pipe between the same kind of processes.
//!
//! The bench binary re-executes itself as the child (an env marker selects the child's
//! role); the channel is the child's stdin (and stdout for the raw pipe pair).
//!
//! * `roundtrip_small`: one small message there and back;
//! * `burst_small`: 10 000 small messages one way (`feed` + one `flush`), then an ack;
//! * `blob_1mib`: a 1 MiB payload one way (shm mode, and inline for reference), then an ack;
//! * `codec_1k_items`: in one process, encoding 1 000 small items into a frame (whole, and
//!   item by item as a pool encodes a chunk) and decoding them, beside plain postcard.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use pool_ipc::{Config, Duplex, ErrorKind, Receiver, Sender};
use serde::{Deserialize, Serialize};

const ROLE: &str = "POOL_IPC_BENCH_ROLE";
const BURST: usize = 10_000;
const BLOB: usize = 1 << 20;
const RAW_MSG: usize = 16;

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Small {
    id: u64,
    tag: u32,
}

fn shm_config() -> Config {
    Config::new().shm_threshold(Some(64 * 1024))
}

// ----------------------------------------------------------------------------------------
// Children
// ----------------------------------------------------------------------------------------

fn stdin_fd() -> OwnedFd {
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdin")
}

fn stdout_fd() -> OwnedFd {
    std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdout")
}

fn read_exact(fd: &OwnedFd, mut buf: &mut [u8]) -> bool {
    while !buf.is_empty() {
        match rustix::io::read(fd, &mut *buf) {
            Ok(0) => return false,
            Ok(n) => buf = &mut buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    true
}

fn write_all(fd: &OwnedFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

fn until_closed<T>(r: pool_ipc::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if e.kind() == ErrorKind::Closed => None,
        Err(e) => panic!("child: {e}"),
    }
}

fn run_child(role: &str) {
    match role {
        // Echo small messages over a socket Duplex.
        "echo_duplex" => {
            let mut d = Duplex::<Small, Small>::new(stdin_fd()).unwrap();
            while let Some(m) = until_closed(d.recv()) {
                d.send(&m).unwrap();
            }
        }
        // Echo small messages over two pipes (stdin/stdout).
        "echo_pipes" => {
            let mut rx = Receiver::<Small>::new(stdin_fd());
            let mut tx = Sender::<Small>::new(stdout_fd());
            while let Some(m) = until_closed(rx.recv()) {
                tx.send(&m).unwrap();
            }
        }
        // Echo fixed-size raw records over two pipes.
        "echo_raw" => {
            let (r, w) = (stdin_fd(), stdout_fd());
            let mut b = [0u8; RAW_MSG];
            while read_exact(&r, &mut b) {
                write_all(&w, &b);
            }
        }
        // Receive bursts; ack each burst's last message.
        "sink_duplex" => {
            let mut d = Duplex::<u64, Small>::new(stdin_fd()).unwrap();
            let mut n = 0u64;
            while let Some(m) = until_closed(d.recv()) {
                n += 1;
                if m.tag == 1 {
                    d.send(&n).unwrap();
                }
            }
        }
        // Receive raw bursts of BURST records; ack each with one byte.
        "sink_raw" => {
            let (r, w) = (stdin_fd(), stdout_fd());
            let mut buf = vec![0u8; BURST * RAW_MSG];
            while read_exact(&r, &mut buf) {
                write_all(&w, &[1]);
            }
        }
        // Receive blobs (shm mode or inline); ack with the length.
        "blob_shm" | "blob_inline" => {
            let cfg = if role == "blob_shm" {
                shm_config()
            } else {
                Config::new()
            };
            let mut d = Duplex::<u64, ()>::with_config(stdin_fd(), cfg).unwrap();
            while let Some(v) = until_closed(d.recv_frame()) {
                d.send(&(v.len() as u64)).unwrap();
            }
        }
        // Receive raw 1 MiB blobs into a reused buffer; ack with one byte.
        "blob_raw" => {
            let (r, w) = (stdin_fd(), stdout_fd());
            let mut buf = vec![0u8; BLOB];
            while read_exact(&r, &mut buf) {
                write_all(&w, &[1]);
            }
        }
        other => panic!("unknown bench child role {other}"),
    }
}

// ----------------------------------------------------------------------------------------
// Parent
// ----------------------------------------------------------------------------------------

/// A child process, killed and reaped on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(role: &str, stdin: OwnedFd, stdout: Option<OwnedFd>) -> Kid {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE, role).stdin(Stdio::from(stdin));
    if let Some(o) = stdout {
        cmd.stdout(Stdio::from(o));
    }
    Kid(cmd.spawn().expect("spawn bench child"))
}

/// A socket Duplex to a new child playing `role`.
fn duplex_child<S: ?Sized, R>(role: &str, cfg: Config) -> (Duplex<S, R>, Kid) {
    let (a, b) = pool_ipc::socketpair().unwrap();
    let kid = spawn(role, b, None);
    (Duplex::with_config(a, cfg).unwrap(), kid)
}

/// Two pipes to a new child playing `role`: (to child, from child).
fn pipes_child(role: &str) -> (OwnedFd, OwnedFd, Kid) {
    let (r1, w1) = pool_ipc::pipe().unwrap();
    let (r2, w2) = pool_ipc::pipe().unwrap();
    let kid = spawn(role, r1, Some(w2));
    (w1, r2, kid)
}

fn roundtrip_small(c: &mut Criterion) {
    let mut g = c.benchmark_group("roundtrip_small");
    g.throughput(Throughput::Elements(1));
    // Round trips are dominated by wakeups, which vary with scheduling: take more samples.
    g.sample_size(30);
    let m = Small { id: 7, tag: 0 };

    let (mut d, kid) = duplex_child::<Small, Small>("echo_duplex", Config::new());
    g.bench_function("pool_ipc_duplex_socket", |b| {
        b.iter(|| {
            d.send(&m).unwrap();
            d.recv().unwrap()
        })
    });
    drop((d, kid));

    let (w, r, kid) = pipes_child("echo_pipes");
    let (mut tx, mut rx) = (Sender::<Small>::new(w), Receiver::<Small>::new(r));
    g.bench_function("pool_ipc_pipes", |b| {
        b.iter(|| {
            tx.send(&m).unwrap();
            rx.recv().unwrap()
        })
    });
    drop((tx, rx, kid));

    let (w, r, kid) = pipes_child("echo_raw");
    let mut buf = [0u8; RAW_MSG];
    g.bench_function("raw_pipe", |b| {
        b.iter(|| {
            write_all(&w, &buf.clone());
            assert!(read_exact(&r, &mut buf));
        })
    });
    drop((w, r, kid));
    g.finish();
}

fn burst_small(c: &mut Criterion) {
    let mut g = c.benchmark_group("burst_small");
    g.throughput(Throughput::Elements(BURST as u64));

    let (mut d, kid) = duplex_child::<Small, u64>("sink_duplex", Config::new());
    g.bench_function("pool_ipc_feed_flush", |b| {
        b.iter(|| {
            for i in 0..BURST as u64 {
                let tag = u32::from(i + 1 == BURST as u64);
                d.feed(&Small { id: i, tag }).unwrap();
            }
            d.flush().unwrap();
            d.recv().unwrap()
        })
    });
    drop((d, kid));

    let (w, r, kid) = pipes_child("sink_raw");
    let burst = vec![3u8; BURST * RAW_MSG];
    g.bench_function("raw_pipe_one_write", |b| {
        b.iter(|| {
            write_all(&w, &burst);
            let mut ack = [0u8; 1];
            assert!(read_exact(&r, &mut ack));
        })
    });
    drop((w, r, kid));
    g.finish();
}

fn blob_1mib(c: &mut Criterion) {
    let mut g = c.benchmark_group("blob_1mib");
    g.throughput(Throughput::Bytes(BLOB as u64));
    let blob: Vec<u8> = (0..BLOB).map(|i| i as u8).collect();

    for (name, role, cfg) in [
        ("pool_ipc_shm", "blob_shm", shm_config()),
        ("pool_ipc_inline_socket", "blob_inline", Config::new()),
    ] {
        let (mut d, kid) = duplex_child::<serde_bytes::Bytes, u64>(role, cfg);
        g.bench_function(name, |b| {
            b.iter(|| {
                d.send(serde_bytes::Bytes::new(&blob)).unwrap();
                d.recv().unwrap()
            })
        });
        drop((d, kid));
    }

    let (w, r, kid) = pipes_child("blob_raw");
    g.bench_function("raw_pipe", |b| {
        b.iter(|| {
            write_all(&w, &blob);
            let mut ack = [0u8; 1];
            assert!(read_exact(&r, &mut ack));
        })
    });
    drop((w, r, kid));
    g.finish();
}

fn codec_1k_items(c: &mut Criterion) {
    let items: Vec<Small> = (0..1000u64)
        .map(|id| Small { id, tag: id as u32 })
        .collect();
    let mut g = c.benchmark_group("codec_1k_items");
    g.throughput(Throughput::Elements(items.len() as u64));
    let mut frame = pool_ipc::FrameBuf::with_capacity(16 * 1024);
    g.bench_function("framebuf_encode", |b| {
        b.iter(|| {
            frame.clear();
            frame.encode(std::hint::black_box(&items)).unwrap();
        })
    });
    let mut out = Vec::with_capacity(16 * 1024);
    g.bench_function("encode_append_each", |b| {
        b.iter(|| {
            out.clear();
            pool_ipc::encode_seq_len(&mut out, items.len());
            for it in std::hint::black_box(&items) {
                pool_ipc::encode_append(&mut out, it).unwrap();
            }
        })
    });
    g.bench_function("postcard_to_allocvec", |b| {
        b.iter(|| postcard::to_allocvec(std::hint::black_box(&items)).unwrap())
    });
    let bytes = postcard::to_allocvec(&items).unwrap();
    g.bench_function("postcard_decode", |b| {
        b.iter(|| postcard::from_bytes::<Vec<Small>>(std::hint::black_box(&bytes)).unwrap())
    });
    g.finish();
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        run_child(&role);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    roundtrip_small(&mut c);
    burst_small(&mut c);
    blob_1mib(&mut c);
    codec_1k_items(&mut c);
    c.final_summary();
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read(&mut []);
}
