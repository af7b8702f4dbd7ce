//! FramedConn against a blocking Duplex peer.

use std::time::{Duration, Instant};

use pool_ipc::{Config, Duplex, ErrorKind, FrameBuf, FramedConn};

use crate::helpers::{raw_frame, write_all};

/// Calls `fill` until `next_frame` yields something (or EOF), within 10 s.
pub(crate) fn next_blocking(conn: &mut FramedConn) -> pool_ipc::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(f) = conn.next_frame()? {
            return Ok(Some(f));
        }
        if conn.is_eof() {
            return Ok(None);
        }
        assert!(Instant::now() < deadline, "timed out waiting for a frame");
        let mut pfd = [rustix::event::PollFd::new(
            conn,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        rustix::event::poll(&mut pfd, Some(&ts)).unwrap();
        conn.fill()?;
    }
}

fn conn_with_peer(cfg: Config) -> (FramedConn, Duplex<Vec<u8>, Vec<u8>>) {
    let (a, b) = pool_ipc::socketpair().unwrap();
    (
        FramedConn::new(a, cfg.clone()).unwrap(),
        Duplex::with_config(b, cfg).unwrap(),
    )
}

fn exchange(cfg: Config) {
    let (mut conn, mut peer) = conn_with_peer(cfg);
    let sizes = [0usize, 10, 5000, 200_000, 2 << 20, 17, 1 << 20];
    let t = std::thread::spawn(move || {
        for &n in &sizes {
            let v: Vec<u8> = peer.recv().unwrap();
            assert_eq!(v.len(), n);
            peer.send(&v).unwrap();
        }
        peer
    });
    for (i, &n) in sizes.iter().enumerate() {
        let payload = vec![i as u8; n];
        if i % 2 == 0 {
            conn.queue_msg(&payload).unwrap();
        } else {
            let mut f = FrameBuf::new();
            f.encode(&payload).unwrap();
            conn.queue(f);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !conn.flush().unwrap() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!conn.wants_write());
        let back = next_blocking(&mut conn).unwrap().unwrap();
        assert_eq!(postcard::from_bytes::<Vec<u8>>(&back).unwrap(), payload);
    }
    drop(t.join().unwrap());
    assert_eq!(next_blocking(&mut conn).unwrap(), None);
    assert!(conn.is_eof());
    assert!(!conn.fill().unwrap());
}

#[test]
fn framed_conn_with_blocking_duplex() {
    crate::helpers::bounded(60, || {
        exchange(Config::new());
    });
}

#[test]
fn framed_conn_with_blocking_duplex_shm() {
    crate::helpers::bounded(60, || {
        exchange(Config::new().shm_threshold(Some(4096)));
    });
}

#[test]
fn framed_conn_truncated_and_too_large() {
    crate::helpers::bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut conn = FramedConn::new(a, Config::new()).unwrap();
        let f = raw_frame(&[1, 2, 3, 4]);
        write_all(&b, &f);
        write_all(&b, &f[..5]);
        drop(b);
        assert_eq!(next_blocking(&mut conn).unwrap().unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(
            next_blocking(&mut conn).unwrap_err().kind(),
            ErrorKind::Truncated
        );

        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut conn = FramedConn::new(a, Config::new().max_frame_len(8)).unwrap();
        write_all(&b, &raw_frame(&[1]));
        write_all(&b, &raw_frame(&[0; 9]));
        assert_eq!(next_blocking(&mut conn).unwrap().unwrap(), vec![1]);
        assert_eq!(
            next_blocking(&mut conn).unwrap_err().kind(),
            ErrorKind::FrameTooLarge
        );
    });
}

#[test]
fn framed_conn_outbox_backpressure() {
    crate::helpers::bounded(60, || {
        // Queue far more than the socket buffer holds; flush reports false until the peer
        // reads, and everything arrives in order.
        let (mut conn, mut peer) = conn_with_peer(Config::new());
        let n = 20_000u32;
        for i in 0..n {
            conn.queue_msg(&vec![i as u8; 100]).unwrap();
        }
        assert!(!conn.flush().unwrap());
        assert!(conn.wants_write());
        let t = std::thread::spawn(move || {
            for i in 0..n {
                assert_eq!(peer.recv().unwrap(), vec![i as u8; 100]);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !conn.flush().unwrap() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().unwrap();
    });
}

#[test]
fn queue_copy_sends_the_frame_and_leaves_it_to_the_caller() {
    // Small (coalesced), medium (copied into a chunk) and large (shared ring) frames, each
    // queued twice from the same FrameBuf: both copies arrive intact.
    for cfg in [Config::new(), Config::new().shm_threshold(Some(64 * 1024))] {
        let (mut conn, mut peer) = conn_with_peer(cfg);
        let sizes = [3usize, 20_000, 1 << 20];
        let frames: Vec<FrameBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut f = FrameBuf::new();
                f.encode(&vec![i as u8 + 1; n]).unwrap();
                f
            })
            .collect();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..sizes.len() * 2 {
                let v: Vec<u8> = peer.recv().unwrap();
                got.push((
                    v.len(),
                    v.first().copied(),
                    v.iter().all(|&b| Some(b) == v.first().copied()),
                ));
            }
            got
        });
        for f in &frames {
            conn.queue_copy(f);
            conn.queue_copy(f);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !conn.flush().unwrap() {
            assert!(Instant::now() < deadline, "flush did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = t.join().unwrap();
        for (k, &(len, first, uniform)) in got.iter().enumerate() {
            let i = k / 2;
            assert_eq!(len, sizes[i]);
            assert_eq!(first, Some(i as u8 + 1));
            assert!(uniform);
        }
        assert!(
            frames[2].payload_len() > 1 << 20,
            "the caller still has its frame"
        );
    }
}

/// `fill_level` stops at a short read; a reader that waits level-triggered (poll) between
/// calls still gets every frame, in order, even when descriptors (the shared ring's, for
/// the large payloads) split the stream into pieces a single read does not cross.
#[test]
fn fill_level_with_a_level_triggered_wait_gets_every_frame() {
    crate::helpers::bounded(60, || {
        let (mut conn, mut peer) = conn_with_peer(Config::new().shm_threshold(Some(4096)));
        let sizes: Vec<usize> = (0..40)
            .map(|i| [3usize, 100_000, 17, 5000, 300_000][i % 5])
            .collect();
        let sent = sizes.clone();
        let t = std::thread::spawn(move || {
            for (i, &n) in sent.iter().enumerate() {
                peer.send(&vec![i as u8; n]).unwrap();
            }
            peer
        });
        let mut got = 0;
        let mut reads = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < sizes.len() {
            assert!(Instant::now() < deadline, "stalled after {got} frames");
            while let Some(f) = conn.next_frame().unwrap() {
                let v: Vec<u8> = postcard::from_bytes(&f).unwrap();
                assert_eq!((v.len(), v.first()), (sizes[got], Some(&(got as u8))));
                got += 1;
            }
            if got == sizes.len() {
                break;
            }
            let mut pfd = [rustix::event::PollFd::new(
                &conn,
                rustix::event::PollFlags::IN,
            )];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            rustix::event::poll(&mut pfd, Some(&ts)).unwrap();
            assert!(conn.fill_level().unwrap());
            reads += 1;
        }
        drop(t.join().unwrap());
        assert!(reads > 0);
        assert_eq!(next_blocking(&mut conn).unwrap(), None);
    });
}

#[test]
fn only_the_frame_queued_alone_and_unwritten_is_taken_back() {
    let (a, b) = pool_ipc::socketpair().unwrap();
    let mut conn = FramedConn::new(a, Config::default()).unwrap();
    let frame = |bytes: &[u8]| {
        let mut f = FrameBuf::new();
        f.extend_from_slice(bytes);
        f
    };
    let (one, other) = (frame(b"one task"), frame(b"two task"));
    // Another payload of the same length: kept.
    conn.queue_copy_with_fds(&one, Vec::new());
    assert!(!conn.take_back_unwritten(other.payload()));
    assert!(conn.wants_write());
    // Its own: taken back, nothing written.
    assert!(conn.take_back_unwritten(one.payload()));
    assert!(!conn.wants_write());
    assert_eq!(conn.stream_end(), 0);
    // Behind another frame, or once written: kept.
    conn.queue_copy_with_fds(&other, Vec::new());
    conn.queue_copy_with_fds(&one, Vec::new());
    assert!(!conn.take_back_unwritten(one.payload()));
    assert!(matches!(conn.flush(), Ok(true)));
    assert!(!conn.take_back_unwritten(one.payload()));
    let mut peer = Duplex::<Vec<u8>, Vec<u8>>::new(b).unwrap();
    assert_eq!(peer.receiver().recv_frame().unwrap(), b"two task");
    assert_eq!(peer.receiver().recv_frame().unwrap(), b"one task");
}
