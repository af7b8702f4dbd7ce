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
