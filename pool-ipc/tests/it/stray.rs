//! Bytes that do not belong on a channel: large frames are announced, so stray bytes are
//! refused at once instead of being waited for; an unfinished frame is visible with its age.

use std::time::{Duration, Instant};

use pool_ipc::{Config, Duplex, ErrorKind, FrameBuf, FramedConn, Receiver};

use crate::conn::next_blocking;
use crate::helpers::{bounded, raw_frame, write_all};

fn strict() -> Config {
    Config::new().announce_above(Some(64 * 1024))
}

#[test]
fn a_line_of_text_is_refused_at_once() {
    bounded(10, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut conn = FramedConn::new(a, strict()).unwrap();
        // "1234" read as a header is 875 770 417 bytes.
        write_all(&b, b"1234 hello from the wrong fd\n");
        conn.fill().unwrap();
        let e = conn.next_frame().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        assert!(e.to_string().contains("stray bytes"), "{e}");
        assert!(e.to_string().contains("875770417"), "{e}");
        // The error repeats: the stream cannot resync.
        assert_eq!(
            conn.next_frame().unwrap_err().kind(),
            ErrorKind::FrameTooLarge
        );
        // The blocking receiver refuses it the same way.
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut rx = Receiver::<u32>::with_config(a, strict());
        write_all(&b, b"1234 hello\n");
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::FrameTooLarge);
    });
}

#[test]
fn without_announcements_a_line_of_text_is_a_huge_frame() {
    // The default keeps the old behaviour: such a header is only checked against the limit.
    let (a, b) = pool_ipc::socketpair().unwrap();
    let mut conn = FramedConn::new(a, Config::new()).unwrap();
    write_all(&b, b"1234 hello\n");
    conn.fill().unwrap();
    assert_eq!(conn.next_frame().unwrap(), None);
}

#[test]
fn large_frames_are_announced_on_every_path() {
    // Bounded: the peer thread's receives and the join have no deadline of their own.
    bounded(60, || {
        for shm in [None, Some(256 * 1024)] {
            let cfg = strict().shm_threshold(shm);
            let (a, b) = pool_ipc::socketpair().unwrap();
            let mut conn = FramedConn::new(a, cfg.clone()).unwrap();
            let mut peer = Duplex::<Vec<u8>, Vec<u8>>::with_config(b, cfg).unwrap();
            let sizes = [10usize, 64 * 1024, 64 * 1024 + 1, 200_000, 3 << 20, 5];
            let t = std::thread::spawn(move || {
                for &n in &sizes {
                    let v: Vec<u8> = peer.recv().unwrap();
                    assert_eq!(v.len(), n);
                    peer.send(&v).unwrap();
                }
                // Queued together, the frames share buffers.
                for &n in &sizes {
                    peer.feed(&vec![7u8; n]).unwrap();
                }
                peer.flush().unwrap();
                peer
            });
            for (i, &n) in sizes.iter().enumerate() {
                let payload = vec![i as u8; n];
                match i % 3 {
                    0 => conn.queue_msg(&payload).unwrap(),
                    1 => {
                        let mut f = FrameBuf::new();
                        f.encode(&payload).unwrap();
                        conn.queue(f);
                    }
                    _ => {
                        let mut f = FrameBuf::new();
                        f.encode(&payload).unwrap();
                        conn.queue_copy(&f);
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while !conn.flush().unwrap() {
                    assert!(Instant::now() < deadline, "flush timed out");
                    std::thread::sleep(Duration::from_millis(1));
                }
                let back = next_blocking(&mut conn).unwrap().unwrap();
                let back: Vec<u8> = postcard::from_bytes(&back).unwrap();
                assert_eq!(back, payload, "size {n}, shm {shm:?}");
            }
            for &n in &sizes {
                let back = next_blocking(&mut conn).unwrap().unwrap();
                let back: Vec<u8> = postcard::from_bytes(&back).unwrap();
                assert_eq!(back.len(), n);
            }
            assert!(conn.partial_frame_since().is_none());
            drop(t.join().unwrap());
        }
    });
}

#[test]
fn an_announcement_must_match_its_frame() {
    // A forged announcement of 100 000 bytes, then a header of 200 000.
    let mut bytes = vec![];
    bytes.extend_from_slice(&((1u32 << 31) | 12).to_le_bytes());
    bytes.extend_from_slice(&[3, 0, 0, 0]);
    bytes.extend_from_slice(&100_000u32.to_le_bytes());
    bytes.extend_from_slice(&(100_000u32 ^ 0x434f_5250).to_le_bytes());
    let mut wrong = bytes.clone();
    wrong.extend_from_slice(&200_000u32.to_le_bytes());
    let (a, b) = pool_ipc::socketpair().unwrap();
    let mut conn = FramedConn::new(a, strict()).unwrap();
    write_all(&b, &wrong);
    conn.fill().unwrap();
    let e = conn.next_frame().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    assert!(e.to_string().contains("after an announcement"), "{e}");
    // A bad check word is refused too.
    let mut bad = bytes.clone();
    bad[12] ^= 1;
    let (a, b) = pool_ipc::socketpair().unwrap();
    let mut conn = FramedConn::new(a, strict()).unwrap();
    write_all(&b, &bad);
    conn.fill().unwrap();
    assert_eq!(conn.next_frame().unwrap_err().kind(), ErrorKind::Decode);
    // The right one is accepted, also by a receiver that does not require announcements.
    let payload = postcard::to_allocvec(&vec![1u8; 99_997]).unwrap();
    assert_eq!(payload.len(), 100_000);
    let mut good = bytes.clone();
    good.extend_from_slice(&raw_frame(&payload));
    for cfg in [strict(), Config::new()] {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut rx = Receiver::<Vec<u8>>::with_config(a, cfg);
        write_all(&b, &good);
        assert_eq!(rx.recv().unwrap().len(), 99_997);
    }
}

#[test]
fn an_unfinished_frame_shows_since_when() {
    let (a, b) = pool_ipc::socketpair().unwrap();
    let mut conn = FramedConn::new(a, strict()).unwrap();
    conn.fill().unwrap();
    assert!(conn.partial_frame_since().is_none());
    // 3 of 10 payload bytes.
    write_all(&b, &[10, 0, 0, 0, 1, 2, 3]);
    conn.fill().unwrap();
    let first = conn.partial_frame_since().expect("incomplete");
    std::thread::sleep(Duration::from_millis(20));
    conn.fill().unwrap();
    assert_eq!(conn.partial_frame_since(), Some(first), "nothing arrived");
    // More bytes arrive: the clock starts again.
    write_all(&b, &[4, 5]);
    conn.fill().unwrap();
    let second = conn.partial_frame_since().expect("still incomplete");
    assert!(second > first);
    write_all(&b, &[6, 7, 8, 9, 10]);
    conn.fill().unwrap();
    assert!(conn.partial_frame_since().is_none());
    assert_eq!(
        conn.next_frame().unwrap().unwrap(),
        (1..=10).collect::<Vec<u8>>()
    );
    // An announcement alone leaves its frame due.
    let mut ann = vec![];
    ann.extend_from_slice(&((1u32 << 31) | 12).to_le_bytes());
    ann.extend_from_slice(&[3, 0, 0, 0]);
    ann.extend_from_slice(&100_000u32.to_le_bytes());
    ann.extend_from_slice(&(100_000u32 ^ 0x434f_5250).to_le_bytes());
    write_all(&b, &ann);
    conn.fill().unwrap();
    assert_eq!(conn.next_frame().unwrap(), None);
    assert!(conn.partial_frame_since().is_some());
}
