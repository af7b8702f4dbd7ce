//! Sender/Receiver/Duplex over real pipes and socketpairs, in one process.

use std::time::{Duration, Instant};

use pool_ipc::{Config, ErrorKind, FrameBuf, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::helpers::{raw_frame, write_all};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Msg {
    id: u64,
    name: String,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

fn msg(id: u64, n: usize) -> Msg {
    Msg {
        id,
        name: format!("m{id}"),
        data: (0..n).map(|i| (i * 7 + id as usize) as u8).collect(),
    }
}

#[test]
fn pipe_roundtrip_feed_flush() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<Msg>::new(w);
        let mut rx = Receiver::<Msg>::new(r);
        let t = std::thread::spawn(move || {
            for i in 0..10_000 {
                tx.feed(&msg(i, (i % 50) as usize)).unwrap();
            }
            tx.flush().unwrap();
        });
        for i in 0..10_000 {
            assert_eq!(rx.recv().unwrap(), msg(i, (i % 50) as usize));
        }
        t.join().unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn large_frames_over_socket() {
    crate::helpers::bounded(60, || {
        let (mut a, mut b) = pool_ipc::duplex::<Msg, Msg>().unwrap();
        let sizes = [0usize, 1, 127 * 1024, 128 * 1024, 128 * 1024 + 1, 3 << 20];
        let t = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                a.send(&msg(i as u64, n)).unwrap();
            }
            a
        });
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(b.recv().unwrap(), msg(i as u64, n));
        }
        drop(t.join().unwrap());
        assert_eq!(b.recv().unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn mixed_sizes_in_one_burst_reassemble_as_the_read_buffer_grows() {
    // The read buffer starts small and grows: frames around each of its sizes, queued
    // back to back so that reads cut them anywhere.
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<Msg>::new(w);
        let mut rx = Receiver::<Msg>::new(r);
        let mut sizes = Vec::new();
        for k in [4usize, 8, 16, 32, 64, 128, 256] {
            let n = k * 1024;
            sizes.extend([n - 40, n - 1, n, n + 1, 3, n + 5000]);
        }
        let expected = sizes.clone();
        let t = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                tx.feed(&msg(i as u64, n)).unwrap();
            }
            tx.flush().unwrap();
        });
        for (i, &n) in expected.iter().enumerate() {
            assert_eq!(
                rx.recv().unwrap(),
                msg(i as u64, n),
                "frame {i} of {n} bytes"
            );
        }
        t.join().unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn oversized_frame_is_rejected_before_allocating() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut rx = Receiver::<Vec<u8>>::with_config(r, Config::new().max_frame_len(1000));
        // Announce 2 GiB - 1 bytes but send only a few: the receiver must refuse on the header.
        let mut b = (0x7fff_ffffu32).to_le_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3]);
        write_all(&w, &b);
        let e = rx.recv().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
        assert!(e.to_string().contains("exceeds the limit of 1000"), "{e}");
        // The error repeats: the stream cannot be resynchronised.
        assert_eq!(rx.try_recv().unwrap_err().kind(), ErrorKind::FrameTooLarge);
    });
}

#[test]
fn sender_refuses_frames_over_its_limit() {
    crate::helpers::bounded(60, || {
        let (_r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<Vec<u8>>::with_config(w, Config::new().max_frame_len(10));
        assert_eq!(
            tx.send(&vec![0u8; 100]).unwrap_err().kind(),
            ErrorKind::FrameTooLarge
        );
        let mut f = FrameBuf::new();
        f.extend_from_slice(&[0; 11]);
        assert_eq!(
            tx.send_frame(f).unwrap_err().kind(),
            ErrorKind::FrameTooLarge
        );
        tx.send(&vec![1u8; 5]).unwrap();
    });
}

#[test]
fn eof_inside_frame_is_truncated_not_closed() {
    crate::helpers::bounded(60, || {
        for cut in [1usize, 3, 4, 5, 9] {
            let (r, w) = pool_ipc::pipe().unwrap();
            let mut rx = Receiver::<Vec<u8>>::new(r);
            let f = raw_frame(&postcard::to_allocvec(&vec![7u8; 6]).unwrap());
            assert!(cut < f.len());
            write_all(&w, &f[..cut]);
            drop(w);
            assert_eq!(
                rx.recv().unwrap_err().kind(),
                ErrorKind::Truncated,
                "cut at {cut}"
            );
        }
        // A large frame cut short (read into its own buffer).
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut rx = Receiver::<Vec<u8>>::new(r);
        let t = std::thread::spawn(move || {
            let f = raw_frame(&vec![0u8; 1 << 20]);
            write_all(&w, &f[..f.len() - 1]);
        });
        assert_eq!(rx.recv_frame().unwrap_err().kind(), ErrorKind::Truncated);
        t.join().unwrap();
    });
}

#[test]
fn payloads_are_lent_in_place_and_buffered_ones_need_no_read() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<Msg>::new(w);
        let mut rx = Receiver::<Msg>::new(r);
        assert!(
            rx.try_recv_buffered().unwrap().is_none(),
            "nothing buffered yet"
        );
        for i in 0..3 {
            tx.feed(&msg(i, 300)).unwrap();
        }
        tx.flush().unwrap();
        // The first receive reads all three frames; the other two are then buffered.
        let first = rx
            .recv_with(|b| postcard::from_bytes::<Msg>(b).unwrap())
            .unwrap();
        assert_eq!(first, msg(0, 300));
        let second = rx
            .try_recv_buffered_with(|b| postcard::from_bytes::<Msg>(b).unwrap())
            .unwrap();
        assert_eq!(second, Some(msg(1, 300)));
        assert_eq!(rx.try_recv_buffered().unwrap(), Some(msg(2, 300)));
        assert_eq!(rx.try_recv_buffered().unwrap(), None);
        drop(tx);
        assert_eq!(
            rx.recv_with(|b| b.len()).unwrap_err().kind(),
            ErrorKind::Closed
        );
    });
}

#[test]
fn try_recv_and_recv_timeout() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut rx = Receiver::<u32>::new(r);
        assert_eq!(rx.try_recv().unwrap(), None);
        let t0 = Instant::now();
        assert_eq!(rx.recv_timeout(Duration::from_millis(50)).unwrap(), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Half a frame: still nothing, and it stays buffered.
        let f = raw_frame(&postcard::to_allocvec(&300u32).unwrap());
        write_all(&w, &f[..3]);
        assert_eq!(rx.try_recv().unwrap(), None);
        assert_eq!(rx.recv_timeout(Duration::from_millis(10)).unwrap(), None);
        assert!(rx.has_partial_frame());
        write_all(&w, &f[3..]);
        assert_eq!(rx.try_recv().unwrap(), Some(300));
        // A message arriving while we wait.
        let mut tx = Sender::<u32>::new(w);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(&5).unwrap();
            tx
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Some(5));
        drop(t.join().unwrap());
        assert_eq!(rx.try_recv().unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(1)).unwrap_err().kind(),
            ErrorKind::Closed
        );
    });
}

#[test]
fn bad_payload_is_skipped() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut rx = Receiver::<String>::new(r);
        write_all(&w, &raw_frame(&[5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]));
        let mut tx = Sender::<str>::new(w);
        tx.send("ok").unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
        assert_eq!(rx.recv().unwrap(), "ok");
    });
}

#[test]
fn control_frame_without_shm_mode_is_a_decode_error() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut rx = Receiver::<u8>::new(r);
        write_all(&w, &[4, 0, 0, 0x80, 1, 0, 0, 0]);
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
    });
}

#[test]
fn send_to_closed_peer_is_closed() {
    crate::helpers::bounded(60, || {
        let (mut a, b) = pool_ipc::duplex::<u32, u32>().unwrap();
        drop(b);
        let e = a.send(&1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    });
}

#[test]
fn framebuf_encode_is_atomic_on_error() {
    crate::helpers::bounded(60, || {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::{Error, SerializeTuple};
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(&1u32)?;
                Err(S::Error::custom("nope"))
            }
        }
        let mut f = FrameBuf::new();
        f.encode(&7u8).unwrap();
        assert_eq!(f.encode(&Bad).unwrap_err().kind(), ErrorKind::Encode);
        assert_eq!(f.payload(), &[7]);
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<Bad>::new(w);
        assert_eq!(tx.send(&Bad).unwrap_err().kind(), ErrorKind::Encode);
        drop(tx);
        let mut rx = Receiver::<u8>::new(r);
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn send_frame_and_recv_frame() {
    crate::helpers::bounded(60, || {
        let (mut a, mut b) = pool_ipc::duplex::<Msg, Msg>().unwrap();
        let m = msg(3, 10_000);
        let mut f = FrameBuf::with_capacity(16);
        f.encode(&m).unwrap();
        a.send_frame(f.clone()).unwrap();
        a.sender().feed_frame(f).unwrap();
        a.flush().unwrap();
        assert_eq!(b.recv().unwrap(), m);
        let raw = b.recv_frame().unwrap();
        assert_eq!(postcard::from_bytes::<Msg>(&raw).unwrap(), m);
        assert!(b.receiver().try_recv_frame().unwrap().is_none());
    });
}

#[test]
fn duplex_needs_a_socket() {
    crate::helpers::bounded(60, || {
        let (r, _w) = pool_ipc::pipe().unwrap();
        assert_eq!(
            pool_ipc::Duplex::<u8, u8>::new(r).unwrap_err().kind(),
            ErrorKind::Io
        );
    });
}

#[test]
fn into_fd_flushes() {
    crate::helpers::bounded(60, || {
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = Sender::<u16>::new(w);
        tx.feed(&9).unwrap();
        let w = tx.into_fd();
        let mut rx = Receiver::<u16>::new(r);
        assert_eq!(rx.recv().unwrap(), 9);
        drop(w);
    });
}

#[test]
fn large_typed_messages_reuse_buffers() {
    crate::helpers::bounded(60, || {
        for cfg in [Config::new(), Config::new().shm_threshold(Some(100_000))] {
            let (mut a, mut b) = pool_ipc::duplex_with_config::<Msg, Msg>(cfg).unwrap();
            let sizes = [3 << 20, 200_000, 1 << 20, 150_000, 3 << 20, 140_000];
            let t = std::thread::spawn(move || {
                for (i, &n) in sizes.iter().enumerate() {
                    a.send(&msg(i as u64, n)).unwrap();
                }
            });
            for (i, &n) in sizes.iter().enumerate() {
                assert_eq!(b.recv().unwrap(), msg(i as u64, n));
            }
            t.join().unwrap();
        }
    });
}

#[test]
fn an_idle_ring_gives_its_memory_back_only_once_drained() {
    crate::helpers::bounded(60, || {
        let cfg = Config::new().shm_threshold(Some(100_000));
        let (mut a, mut b) = pool_ipc::duplex_with_config::<Msg, Msg>(cfg).unwrap();
        assert_eq!(a.sender().ring_dirty_since(), None, "no ring yet");
        a.send(&msg(1, 1 << 20)).unwrap();
        assert!(a.sender().ring_dirty_since().is_some());
        // Nothing is wiped while the peer has not taken the payload.
        assert!(!a.sender().release_idle_ring());
        assert!(a.sender().ring_dirty_since().is_some());
        assert_eq!(b.recv().unwrap(), msg(1, 1 << 20));
        assert!(a.sender().release_idle_ring());
        assert_eq!(a.sender().ring_dirty_since(), None);
        assert!(!a.sender().release_idle_ring(), "nothing left to give back");
        // The ring still carries payloads, intact.
        a.send(&msg(2, 1 << 20)).unwrap();
        assert_eq!(b.recv().unwrap(), msg(2, 1 << 20));
    });
}

#[test]
fn wait_timeout_says_whether_something_can_be_received() {
    crate::helpers::bounded(60, || {
        let (mut a, mut b) = pool_ipc::duplex::<u32, u32>().unwrap();
        let t = Instant::now();
        assert!(
            !b.receiver()
                .wait_timeout(Duration::from_millis(50))
                .unwrap()
        );
        assert!(t.elapsed() >= Duration::from_millis(50));
        a.send(&7).unwrap();
        assert!(b.receiver().wait_timeout(Duration::from_secs(10)).unwrap());
        // Nothing was consumed.
        assert_eq!(b.recv().unwrap(), 7);
        drop(a);
        assert!(
            b.receiver().wait_timeout(Duration::from_secs(10)).unwrap(),
            "end of stream"
        );
    });
}
