//! fd passing in one process.

use std::os::fd::AsFd;

use pool_ipc::fdpass::{recv_fds, send_fds};

#[test]
fn passes_fds_cloexec() {
    crate::helpers::bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let (r, w) = pool_ipc::pipe().unwrap();
        send_fds(a.as_fd(), b"xy", &[r.as_fd(), w.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"xy");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let fl = rustix::io::fcntl_getfd(fd).unwrap();
            assert!(fl.contains(rustix::io::FdFlags::CLOEXEC));
        }
        // The passed write end works.
        rustix::io::write(&fds[1], b"z").unwrap();
        let mut one = [0u8; 1];
        rustix::io::read(&r, &mut one).unwrap();
        assert_eq!(&one, b"z");
    });
}

#[test]
fn too_many_fds_is_an_error() {
    crate::helpers::bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let (r, w) = pool_ipc::pipe().unwrap();
        send_fds(a.as_fd(), b"x", &[r.as_fd(), w.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let e = recv_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    });
}

#[test]
fn empty_bytes_rejected() {
    crate::helpers::bounded(60, || {
        let (a, _b) = pool_ipc::socketpair().unwrap();
        let (r, _w) = pool_ipc::pipe().unwrap();
        let e = send_fds(a.as_fd(), b"", &[r.as_fd()]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    });
}

/// The inode of what `fd` refers to (a pipe here): tells which descriptor arrived.
fn inode(fd: impl AsFd) -> u64 {
    rustix::fs::fstat(fd).unwrap().st_ino
}

#[test]
fn descriptors_queued_with_frames_arrive_with_those_frames() {
    use pool_ipc::{Config, Duplex, FramedConn};
    crate::helpers::bounded(60, || {
        let (a, b) = pool_ipc::socketpair().unwrap();
        let cfg = Config::new().shm_threshold(Some(64 * 1024));
        let mut conn = FramedConn::new(a, cfg.clone()).unwrap();
        let mut peer = Duplex::<u32, Vec<u8>>::with_config(b, cfg.accept_fds(true)).unwrap();
        let (r, _w) = pool_ipc::pipe().unwrap();
        let pipes: Vec<_> = (0..4).map(|_| pool_ipc::pipe().unwrap()).collect();
        let dups = |k: usize| -> Vec<std::os::fd::OwnedFd> {
            (0..k)
                .map(|i| pipes[i % 4].0.try_clone().unwrap())
                .collect()
        };
        // (payload size, descriptors): some without, one large (through shared memory),
        // one with more than a message carries (only the first 253 go).
        let plan = [
            (10, 0),
            (10, 3),
            (10, 0),
            (200_000, 2),
            (5000, 300),
            (10, 1),
        ];
        for (i, &(len, k)) in plan.iter().enumerate() {
            let mut f = pool_ipc::FrameBuf::new();
            f.encode(&vec![i as u8; len]).unwrap();
            conn.queue_with_fds(f, dups(k));
        }
        while !conn.flush().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for (i, &(len, k)) in plan.iter().enumerate() {
            let (payload, fds) = peer
                .recv_with_fds(|bytes, fds| (postcard::from_bytes::<Vec<u8>>(bytes).unwrap(), fds))
                .unwrap();
            assert_eq!(payload, vec![i as u8; len], "frame {i}");
            assert_eq!(fds.len(), k.min(pool_ipc::fdpass::MAX_FDS), "frame {i}");
            for (j, fd) in fds.iter().enumerate() {
                assert_eq!(inode(fd), inode(&pipes[j % 4].0), "frame {i}, slot {j}");
            }
        }
        // A receiver that does not accept descriptors refuses them.
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut conn = FramedConn::new(a, Config::new()).unwrap();
        let mut peer = Duplex::<u32, u32>::new(b).unwrap();
        let mut f = pool_ipc::FrameBuf::new();
        f.encode(&7u32).unwrap();
        conn.queue_with_fds(f, vec![r.try_clone().unwrap()]);
        while !conn.flush().unwrap() {}
        let e = peer.recv().unwrap_err();
        assert_eq!(e.kind(), pool_ipc::ErrorKind::Decode, "{e}");
        assert_eq!(peer.recv().unwrap(), 7);
    });
}
