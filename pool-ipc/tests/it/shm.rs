//! Segments, futexes and shm mode in one process, including a hostile peer.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool_ipc::fdpass::send_fds;
use pool_ipc::shm::{Segment, futex_wait, futex_wake};
use pool_ipc::{Config, ErrorKind, Receiver};

use crate::helpers::write_all;

const MAGIC: u32 = 0x5049_5043;
const HDR: usize = 4096;

#[test]
fn segment_create_and_share() {
    crate::helpers::bounded(60, || {
        let seg = Segment::create("t", 8192).unwrap();
        assert_eq!(seg.len(), 8192);
        assert!(!seg.is_empty());
        let fl = rustix::io::fcntl_getfd(seg.as_fd()).unwrap();
        assert!(fl.contains(rustix::io::FdFlags::CLOEXEC));
        let other = Segment::from_fd(seg.as_fd().try_clone_to_owned().unwrap()).unwrap();
        seg.atomic_u64(3).store(u64::MAX - 1, Ordering::SeqCst);
        assert_eq!(other.atomic_u64(3).load(Ordering::SeqCst), u64::MAX - 1);
        other.write_at(8190, &[1, 2]);
        let mut b = [0; 2];
        seg.read_at(8190, &mut b);
        assert_eq!(b, [1, 2]);
        // SAFETY: no thread writes the segment while the slice lives.
        let s = unsafe { seg.as_slice() };
        assert_eq!(&s[8190..], &[1, 2]);
        assert_eq!(
            Segment::create("t", 0).unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
        let own =
            Segment::open_in_process(std::process::id(), seg.as_fd().as_raw_fd_i32()).unwrap();
        assert_eq!(own.atomic_u64(3).load(Ordering::SeqCst), u64::MAX - 1);
    });
}

trait RawI32 {
    fn as_raw_fd_i32(&self) -> i32;
}
impl RawI32 for std::os::fd::BorrowedFd<'_> {
    fn as_raw_fd_i32(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.as_raw_fd()
    }
}

/// `zero` clears every written byte, seen through another mapping too: a small written
/// range in place (its memory stays), a large one given back (it reads as a hole again).
#[test]
fn zero_clears_every_written_byte_and_gives_back_large_ranges() {
    use pool_ipc::shm::ZERO_IN_PLACE;
    use rustix::fs::SeekFrom;
    let len = 1 << 20;
    let seg = Segment::create_sparse("t", len).unwrap();
    let peer = Segment::from_fd(seg.as_fd().try_clone_to_owned().unwrap()).unwrap();
    seg.atomic_u64(1).store(u64::MAX, Ordering::SeqCst);
    seg.write_at(4096, &[0xab; 100]);
    let big = 256 << 10;
    seg.write_at(len - big - 8192, &vec![0xcd; big]);
    seg.write_at(len - 3, &[1, 2, 3]);
    seg.zero().unwrap();
    // The small range at the start is still there (data), the large one is a hole. (Looked
    // at before reading the whole segment: a read through a mapping fills holes.)
    let first = rustix::fs::seek(seg.as_fd(), SeekFrom::Data(0)).unwrap();
    assert_eq!(first, 0);
    let hole = rustix::fs::seek(seg.as_fd(), SeekFrom::Hole(0)).unwrap() as usize;
    assert!(
        hole <= ZERO_IN_PLACE,
        "the small range kept its memory, no more: hole at {hole}"
    );
    let next = rustix::fs::seek(seg.as_fd(), SeekFrom::Data(hole as u64)).unwrap() as usize;
    assert!(
        next >= len - 4096,
        "the large range was given back: data at {next}"
    );
    let mut all = vec![1u8; len];
    peer.read_at(0, &mut all);
    assert!(all.iter().all(|&b| b == 0), "every byte reads as zero");
    // Zeroing a segment nobody wrote, or one zeroed already, is fine.
    seg.zero().unwrap();
    Segment::create_sparse("t", 8192).unwrap().zero().unwrap();
}

#[test]
fn from_fd_refuses_unsealed_and_non_memfd() {
    crate::helpers::bounded(60, || {
        let fd = rustix::fs::memfd_create("u", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(Segment::from_fd(fd).is_err());
        let fd = rustix::fs::memfd_create(
            "g",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::GROW).unwrap();
        assert_eq!(
            Segment::from_fd(fd).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        let (r, _w) = pool_ipc::pipe().unwrap();
        assert!(Segment::from_fd(r).is_err());
    });
}

#[test]
#[allow(
    clippy::should_panic_without_expect,
    reason = "not used; checked with catch_unwind"
)]
fn atomic_out_of_range_panics() {
    let seg = Segment::create("p", 16).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        seg.atomic_u64(2);
    }));
    assert!(r.is_err());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seg.write_at(15, &[0, 0])));
    assert!(r.is_err());
}

#[test]
fn futex_between_threads() {
    crate::helpers::bounded(60, || {
        let seg = Arc::new(Segment::create("f", 4096).unwrap());
        let s2 = seg.clone();
        let t = std::thread::spawn(move || {
            let w = s2.atomic_u32(0);
            let deadline = Instant::now() + Duration::from_secs(10);
            while w.load(Ordering::Acquire) == 0 {
                assert!(Instant::now() < deadline);
                futex_wait(w, 0, Some(Duration::from_secs(1))).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        seg.atomic_u32(0).store(1, Ordering::Release);
        futex_wake(seg.atomic_u32(0), u32::MAX).unwrap();
        t.join().unwrap();
        assert!(!futex_wait(seg.atomic_u32(0), 1, Some(Duration::from_millis(5))).unwrap());
    });
}

#[test]
fn futex_wake_of_u32_max_wakes_every_waiter() {
    crate::helpers::bounded(60, || {
        let seg = Arc::new(Segment::create("f", 4096).unwrap());
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let seg = Arc::clone(&seg);
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let w = seg.atomic_u32(0);
                    while w.load(Ordering::Acquire) == 0 && t.elapsed() < Duration::from_secs(20) {
                        futex_wait(w, 0, Some(Duration::from_secs(20))).unwrap();
                    }
                    t.elapsed()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        seg.atomic_u32(0).store(1, Ordering::Release);
        futex_wake(seg.atomic_u32(0), u32::MAX).unwrap();
        for w in waiters {
            let waited = w.join().unwrap();
            assert!(
                waited < Duration::from_secs(10),
                "a waiter slept through the wake"
            );
        }
    });
}

#[test]
fn shm_mode_moves_large_payloads_through_the_ring() {
    crate::helpers::bounded(60, || {
        let cfg = Config::new().shm_threshold(Some(64 * 1024));
        let (mut a, mut b) = pool_ipc::duplex_with_config::<Vec<u8>, Vec<u8>>(cfg).unwrap();
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        a.send(&big).unwrap();
        assert_eq!(b.recv().unwrap(), big);
        // Small messages stay inline and interleave in order.
        let t = std::thread::spawn(move || {
            for i in 0..50u8 {
                a.feed(&vec![i; (i as usize) * 5000]).unwrap();
            }
            a.flush().unwrap();
        });
        for i in 0..50u8 {
            assert_eq!(b.recv().unwrap(), vec![i; (i as usize) * 5000]);
        }
        t.join().unwrap();
    });
}

#[test]
fn shm_mode_puts_only_a_reference_on_the_socket() {
    crate::helpers::bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut tx =
            pool_ipc::Sender::<Vec<u8>>::with_config(a, Config::new().shm_threshold(Some(100)));
        tx.send(&vec![5u8; 1 << 20]).unwrap();
        tx.send(&vec![6u8; 1 << 20]).unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = pool_ipc::fdpass::recv_fds(b.as_fd(), &mut buf, 4).unwrap();
        // A region frame (8 bytes, with the ring's memfd) and two 20-byte references.
        assert_eq!(fds.len(), 1);
        let mut total = n;
        while total < 48 {
            let (m, more) = pool_ipc::fdpass::recv_fds(b.as_fd(), &mut buf[total..], 4).unwrap();
            assert!(more.is_empty() && m > 0);
            total += m;
        }
        assert_eq!(total, 48);
        assert_eq!(&buf[..4], &((1u32 << 31) | 4).to_le_bytes());
        let seg = Segment::from_fd(fds.into_iter().next().unwrap()).unwrap();
        assert_eq!(seg.atomic_u32(0).load(Ordering::Relaxed), MAGIC);
    });
}

#[test]
fn shm_ring_full_falls_back_inline() {
    crate::helpers::bounded(60, || {
        let cfg = Config::new().shm_threshold(Some(1000));
        let (mut a, mut b) = pool_ipc::duplex_with_config::<Vec<u8>, Vec<u8>>(cfg).unwrap();
        let n = 40usize;
        let t = std::thread::spawn(move || {
            // Far more than the ring holds, with nobody reading yet: must not block forever
            // on ring space (it blocks on the socket only, until the reader starts).
            for i in 0..n {
                a.send(&vec![i as u8; 700_000]).unwrap();
            }
            a
        });
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..n {
            let v = b.recv().unwrap();
            assert_eq!(v.len(), 700_000);
            assert!(v.iter().all(|&x| x == i as u8), "payload {i} corrupted");
        }
        drop(t.join().unwrap());
        assert_eq!(b.recv().unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn shm_mode_on_pipe_is_inline() {
    crate::helpers::bounded(60, || {
        let cfg = Config::new().shm_threshold(Some(10));
        let (r, w) = pool_ipc::pipe().unwrap();
        let mut tx = pool_ipc::Sender::<Vec<u8>>::with_config(w, cfg.clone());
        let mut rx = Receiver::<Vec<u8>>::with_config(r, cfg);
        let t = std::thread::spawn(move || tx.send(&vec![3u8; 300_000]).unwrap());
        assert_eq!(rx.recv().unwrap(), vec![3u8; 300_000]);
        t.join().unwrap();
    });
}

// ---- a hostile peer writing raw control frames ----

fn region_frame() -> Vec<u8> {
    let mut f = ((1u32 << 31) | 4).to_le_bytes().to_vec();
    f.extend_from_slice(&[1, 0, 0, 0]);
    f
}

fn ref_frame(off: u64, len: u32) -> Vec<u8> {
    let mut f = ((1u32 << 31) | 16).to_le_bytes().to_vec();
    f.extend_from_slice(&[2, 0, 0, 0]);
    f.extend_from_slice(&off.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f
}

fn hostile_pair() -> (OwnedFd, Receiver<Vec<u8>>) {
    let (a, b) = pool_ipc::socketpair().unwrap();
    let cfg = Config::new().shm_threshold(Some(16)).max_frame_len(1 << 20);
    (a, Receiver::with_config(b, cfg))
}

fn good_region(cap: usize) -> Segment {
    let seg = Segment::create("hostile", HDR + cap).unwrap();
    seg.atomic_u32(0).store(MAGIC, Ordering::Relaxed);
    seg
}

#[test]
fn hostile_ref_before_region() {
    crate::helpers::bounded(60, || {
        let (a, mut rx) = hostile_pair();
        write_all(&a, &ref_frame(0, 4));
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
    });
}

#[test]
fn hostile_region_without_fd() {
    crate::helpers::bounded(60, || {
        let (a, mut rx) = hostile_pair();
        write_all(&a, &region_frame());
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
    });
}

#[test]
fn hostile_region_unsealed_or_bad_magic() {
    crate::helpers::bounded(60, || {
        let (a, mut rx) = hostile_pair();
        let fd = rustix::fs::memfd_create("u", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        send_fds(a.as_fd(), &region_frame(), &[fd.as_fd()]).unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
        let seg = Segment::create("nomagic", HDR + 4096).unwrap();
        send_fds(a.as_fd(), &region_frame(), &[seg.as_fd()]).unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
        // A pipe instead of a memfd.
        let (r, _w) = pool_ipc::pipe().unwrap();
        send_fds(a.as_fd(), &region_frame(), &[r.as_fd()]).unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
    });
}

#[test]
fn hostile_refs_out_of_bounds() {
    crate::helpers::bounded(60, || {
        let (a, mut rx) = hostile_pair();
        let cap = 1 << 16;
        let seg = good_region(cap);
        send_fds(a.as_fd(), &region_frame(), &[seg.as_fd()]).unwrap();
        // Garbage in the ring: decodes as garbage, never UB/panic.
        seg.write_at(HDR, &[3, 9, 9, 9]);
        write_all(&a, &ref_frame(0, 4));
        assert_eq!(rx.recv().unwrap(), vec![9, 9, 9]);
        let bad = [
            (0u64, 4u32),            // before the last consumed position
            (cap as u64 - 2, 4),     // wraps past the end of the data area
            (u64::MAX - 1, 4),       // overflows
            (4 + 2 * cap as u64, 4), // skips more than the ring
            (8, (cap + 1) as u32),   // longer than the ring
        ];
        for (off, len) in bad {
            write_all(&a, &ref_frame(off, len));
            assert_eq!(
                rx.recv().unwrap_err().kind(),
                ErrorKind::Decode,
                "{off} {len}"
            );
        }
        write_all(&a, &ref_frame(8, (2 << 20) as u32));
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::FrameTooLarge);
        // Still usable after all that: a valid reference.
        seg.write_at(HDR + 100, &[2, 7, 7]);
        write_all(&a, &ref_frame(100, 3));
        assert_eq!(rx.recv().unwrap(), vec![7, 7]);
        // A ring that is too large for the limits of the crate.
        // A (sparse) ring larger than the crate ever creates or accepts.
        let huge = rustix::fs::memfd_create(
            "huge",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        rustix::fs::ftruncate(&huge, (HDR + (512 << 20)) as u64).unwrap();
        rustix::fs::fcntl_add_seals(&huge, rustix::fs::SealFlags::SHRINK).unwrap();
        Segment::from_fd(huge.try_clone().unwrap())
            .unwrap()
            .atomic_u32(0)
            .store(MAGIC, Ordering::Relaxed);
        send_fds(a.as_fd(), &region_frame(), &[huge.as_fd()]).unwrap();
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
        // Malformed control frames: skipped with a Decode error...
        for f in [vec![0, 0, 0, 0x80], vec![2, 0, 0, 0x80, 9, 9]] {
            write_all(&a, &f);
            assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Decode);
        }
        // ...except an oversized one, which is fatal.
        write_all(&a, &[65, 0, 0, 0x80]);
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::FrameTooLarge);
        assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::FrameTooLarge);
    });
}

#[test]
fn writes_of_every_small_length_land_whole_and_touch_nothing_else() {
    let seg = Segment::create("t", 4096).unwrap();
    for n in 0..=40usize {
        let at = 1000 + n;
        // Around the write: a fence of known bytes.
        seg.write_at(at - 8, &[0xEE; 8]);
        seg.write_at(at + n, &[0xEE; 8]);
        let data: Vec<u8> = (0..n).map(|i| i as u8 + 1).collect();
        seg.write_at(at, &data);
        let mut back = vec![0; n + 16];
        seg.read_at(at - 8, &mut back);
        assert_eq!(&back[..8], &[0xEE; 8], "before, n = {n}");
        assert_eq!(&back[8..8 + n], &data[..], "n = {n}");
        assert_eq!(&back[8 + n..], &[0xEE; 8], "after, n = {n}");
    }
    // The last bytes of the segment, at every small length.
    for n in 1..=16usize {
        let data = vec![n as u8; n];
        seg.write_at(4096 - n, &data);
        let mut back = vec![0; n];
        seg.read_at(4096 - n, &mut back);
        assert_eq!(back, data);
    }
}

#[test]
fn a_frame_sent_in_pieces_arrives_as_one_inline_or_through_the_ring() {
    crate::helpers::bounded(60, || {
        let cfg = Config::new()
            .shm_threshold(Some(64 * 1024))
            .announce_above(Some(8 * 1024));
        let (mut a, mut b) = pool_ipc::duplex_with_config::<Vec<u8>, Vec<u8>>(cfg).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        for len in [0, 5, 20_000, big.len()] {
            // postcard of a Vec<u8>: the length as a varint, then the bytes, here sent as
            // a head, the first byte and the rest.
            let mut head = Vec::new();
            pool_ipc::encode_seq_len(&mut head, len);
            let body = &big[..len];
            let (first, rest) = body.split_at(len.min(1));
            a.sender().send_pieces(&[&head, first, rest]).unwrap();
            assert_eq!(b.recv().unwrap(), body, "{len} bytes");
        }
        // Over the limit: refused, nothing sent.
        let cfg = Config::new().max_frame_len(10);
        let (mut a, mut b) = pool_ipc::duplex_with_config::<Vec<u8>, Vec<u8>>(cfg).unwrap();
        let e = a.sender().send_pieces(&[&[5], &[1; 10]]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
        a.sender().send_pieces(&[&[1], &[9]]).unwrap();
        assert_eq!(b.recv().unwrap(), [9]);
    });
}

#[test]
fn frozen_segments_hold_their_bytes_and_refuse_every_change() {
    use pool_ipc::shm::FrozenSegment;
    use rustix::mm::{MapFlags, ProtFlags};
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let copied = FrozenSegment::copy_from("t", &data).unwrap();
    let filled = FrozenSegment::with_fill("t", data.len(), |b| b.copy_from_slice(&data)).unwrap();
    for seg in [&copied, &filled] {
        assert_eq!(seg.as_slice(), &data[..]);
        // A peer's view, from a read-only descriptor as much as a read-write one.
        let ro = rustix::fs::open(
            format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&seg.as_fd())
            ),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert_eq!(FrozenSegment::from_fd(ro).unwrap().as_slice(), &data[..]);
        // Nobody can change the bytes: no write, no writable shared mapping, no hole, no
        // truncation.
        let fd = seg.as_fd().try_clone_to_owned().unwrap();
        assert!(rustix::io::pwrite(&fd, b"x", 0).is_err());
        // SAFETY: a fresh range; the call is expected to fail, and is unmapped if not.
        let w = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        };
        assert!(w.is_err(), "a writable shared mapping of frozen bytes");
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        assert!(rustix::fs::fallocate(&fd, punch, 0, 4096).is_err());
        assert!(rustix::fs::ftruncate(&fd, 10).is_err());
        assert_eq!(seg.as_slice(), &data[..]);
    }
    // A plain segment (writable) is refused, and nothing is empty.
    let plain = Segment::create("t", 4096).unwrap();
    let e = FrozenSegment::from_fd(plain.as_fd().try_clone_to_owned().unwrap()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(FrozenSegment::copy_from("t", &[]).is_err());
    // A fill that panics leaves nothing behind (its mapping and descriptor are freed).
    let r = std::panic::catch_unwind(|| FrozenSegment::with_fill("t", 4096, |_| panic!("boom")));
    assert!(r.is_err());
}

#[test]
fn bell_loses_no_ring_however_the_waiter_and_the_ringer_interleave() {
    crate::helpers::bounded(60, || {
        use pool_ipc::shm::Bell;
        use std::sync::atomic::{AtomicU32, AtomicU64};
        let seg = Arc::new(Segment::create("bell", 4096).unwrap());
        // How many rounds the waiter has begun (read its count for).
        let asked = Arc::new(AtomicU64::new(0));
        const ROUNDS: u64 = 5000;
        let ringer = {
            let (seg, asked) = (Arc::clone(&seg), Arc::clone(&asked));
            std::thread::spawn(move || {
                let bell = Bell::new(seg.atomic_u32(8));
                for i in 1..=ROUNDS {
                    while asked.load(Ordering::SeqCst) < i {
                        std::hint::spin_loop();
                    }
                    // Sometimes before the waiter sleeps, sometimes after.
                    if i % 3 == 0 {
                        std::thread::yield_now();
                    }
                    bell.ring();
                }
            })
        };
        let bell = Bell::new(seg.atomic_u32(8));
        for i in 1..=ROUNDS {
            let seen = bell.count();
            asked.store(i, Ordering::SeqCst);
            // Every ring comes after `seen` was read: a wait that times out lost it.
            assert!(
                bell.wait_past(seen, Duration::from_secs(10)).unwrap(),
                "round {i}"
            );
        }
        ringer.join().unwrap();
        assert_eq!(bell.count(), ROUNDS as u32);
        // A bell nobody rings times out.
        let word = AtomicU32::new(0);
        let quiet = Bell::new(&word);
        assert!(
            !quiet
                .wait_past(quiet.count(), Duration::from_millis(5))
                .unwrap()
        );
    });
}
