//! Two processes talking through pool-ipc alone: the parent re-executes this example as
//! a child, hands it one end of a socketpair as its stdin, and plays ping-pong with it.
//!
//! Run with `cargo run -p pool-ipc --example ping --release`.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pool_ipc::{Config, Duplex, ErrorKind};
use serde::{Deserialize, Serialize};

/// Set in the child's environment.
const CHILD_MARKER: &str = "POOL_IPC_PING_CHILD";

#[derive(Serialize, Deserialize, Debug)]
enum Ping {
    Ping { seq: u64 },
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The sending side's view of [`Ping`]: same encoding, but borrows the blob.
#[derive(Serialize)]
enum PingRef<'a> {
    #[allow(dead_code, reason = "mirrors Ping's variant order")]
    Ping {
        seq: u64,
    },
    Blob(#[serde(with = "serde_bytes")] &'a [u8]),
}

#[derive(Serialize, Deserialize, Debug)]
enum Pong {
    Pong { seq: u64, pid: u32 },
    BlobLen(usize),
}

fn config() -> Config {
    // Payloads above 64 KiB travel through shared memory.
    Config::new().shm_threshold(Some(64 * 1024))
}

fn child() -> Result<(), pool_ipc::Error> {
    // The parent passed our end of the socketpair as stdin.
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let mut chan = Duplex::<Pong, Ping>::with_config(fd, config())?;
    loop {
        match chan.recv() {
            Ok(Ping::Ping { seq }) => chan.send(&Pong::Pong {
                seq,
                pid: std::process::id(),
            })?,
            Ok(Ping::Blob(b)) => chan.send(&Pong::BlobLen(b.len()))?,
            Err(e) if e.kind() == ErrorKind::Closed => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os(CHILD_MARKER).is_some() {
        return Ok(child()?);
    }
    let (ours, theirs) = pool_ipc::socketpair()?;
    let mut kid = Command::new(std::env::current_exe()?)
        .env(CHILD_MARKER, "1")
        .stdin(Stdio::from(theirs))
        .spawn()?;
    let ours2 = ours.try_clone()?;
    let mut chan = Duplex::<Ping, Pong>::with_config(ours, config())?;

    for seq in 0..3 {
        let t = Instant::now();
        chan.send(&Ping::Ping { seq })?;
        let reply = chan.recv()?;
        println!("ping {seq} -> {reply:?} in {:?}", t.elapsed());
    }

    let n = 20_000;
    let mut times = Vec::with_capacity(n);
    for seq in 0..n as u64 {
        let t = Instant::now();
        chan.send(&Ping::Ping { seq })?;
        match chan.recv()? {
            Pong::Pong { seq: s, .. } if s == seq => {}
            other => return Err(format!("unexpected reply {other:?}").into()),
        }
        times.push(t.elapsed());
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / n as u32;
    println!(
        "{n} round trips: mean {mean:?}, p50 {:?}, p99 {:?}, max {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[n - 1]
    );

    // A second view of the same socket for the borrowed message type. Only one of the
    // two is used at a time, so their frames never interleave.
    chan.flush()?;
    let mut blob_chan = Duplex::<PingRef<'_>, Pong>::with_config(ours2, config())?;
    let blob = vec![7u8; 1 << 20];
    let rounds = 200;
    let t = Instant::now();
    for _ in 0..rounds {
        // Encoded straight into the shared ring: one copy on this side.
        blob_chan.send(&PingRef::Blob(&blob))?;
        match blob_chan.recv()? {
            Pong::BlobLen(l) if l == blob.len() => {}
            other => return Err(format!("unexpected reply {other:?}").into()),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{rounds} x 1 MiB through shared memory: {:.0} MiB/s ({:.0} us per round trip)",
        rounds as f64 / secs,
        secs * 1e6 / rounds as f64
    );

    drop((chan, blob_chan));
    let status = kid.wait()?;
    println!("child exited: {status}");
    Ok(())
}
