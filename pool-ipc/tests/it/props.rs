//! Property tests of the framing: round trips under arbitrary splits, and garbage input.

use std::os::fd::OwnedFd;

use pool_ipc::{Config, ErrorKind, FrameBuf, FramedConn, Receiver};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::helpers::write_all;

// The strategies the crate exports under its `proptest` feature, compiled in here.
#[path = "../../src/strategies.rs"]
#[allow(
    dead_code,
    unreachable_pub,
    reason = "shared with the library; not all used here"
)]
mod strategies;

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Msg {
    Unit,
    Num(u64, i32),
    Text { s: String, tags: Vec<u16> },
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        Just(Msg::Unit),
        (any::<u64>(), any::<i32>()).prop_map(|(a, b)| Msg::Num(a, b)),
        (".{0,40}", proptest::collection::vec(any::<u16>(), 0..20))
            .prop_map(|(s, tags)| Msg::Text { s, tags }),
        strategies::payload(3000).prop_map(Msg::Bytes),
    ]
}

/// The wire bytes of `msgs`, each encoded through a FrameBuf.
fn stream_of(msgs: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let mut f = FrameBuf::new();
        f.encode(m).unwrap();
        out.extend_from_slice(&strategies::frame_bytes(f.payload()));
    }
    out
}

fn drain(rx: &mut Receiver<Msg>, got: &mut Vec<Msg>) {
    loop {
        match rx.try_recv() {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return,
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => panic!("{e}"),
        }
    }
}

fn drain_conn(conn: &mut FramedConn, got: &mut Vec<Msg>) {
    conn.fill().unwrap();
    while let Some(p) = conn.next_frame().unwrap() {
        got.push(postcard::from_bytes(&p).unwrap());
    }
}

fn pair(cfg: Config) -> (OwnedFd, Receiver<Msg>) {
    let (a, b) = pool_ipc::socketpair().unwrap();
    (a, Receiver::with_config(b, cfg))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Messages written in arbitrary chunks, read with `try_recv` between chunks, come
    /// out whole and in order; then a clean close is `Closed`.
    #[test]
    fn messages_roundtrip_in_arbitrary_chunks(
        msgs in proptest::collection::vec(msg(), 0..30),
        sizes in strategies::chunk_sizes(200, 4096),
    ) {
        let bytes = stream_of(&msgs);
        let (w, mut rx) = pair(Config::new());
        let mut got = Vec::new();
        for chunk in strategies::split(&bytes, &sizes) {
            write_all(&w, chunk);
            drain(&mut rx, &mut got);
        }
        drop(w);
        drain(&mut rx, &mut got);
        prop_assert_eq!(&got, &msgs);
        prop_assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
    }

    /// The same through a FramedConn.
    #[test]
    fn framed_conn_reassembles_arbitrary_chunks(
        msgs in proptest::collection::vec(msg(), 0..30),
        sizes in strategies::chunk_sizes(200, 4096),
    ) {
        let bytes = stream_of(&msgs);
        let (a, b) = pool_ipc::socketpair().unwrap();
        let mut conn = FramedConn::new(b, Config::new()).unwrap();
        let mut got = Vec::new();
        for chunk in strategies::split(&bytes, &sizes) {
            write_all(&a, chunk);
            drain_conn(&mut conn, &mut got);
        }
        drop(a);
        drain_conn(&mut conn, &mut got);
        prop_assert_eq!(&got, &msgs);
        prop_assert!(conn.is_eof());
    }

    /// Large frames (read straight into their own buffer) in arbitrary chunks, from a
    /// writer thread.
    #[test]
    fn large_frames_roundtrip(
        payloads in proptest::collection::vec(
            prop_oneof![strategies::payload(100), (100_000usize..400_000).prop_map(|n| vec![n as u8; n])],
            1..5,
        ),
        sizes in strategies::chunk_sizes(50, 300_000),
    ) {
        let mut bytes = Vec::new();
        for p in &payloads {
            bytes.extend_from_slice(&strategies::frame_bytes(p));
        }
        let (w, r) = pool_ipc::socketpair().unwrap();
        let mut rx = Receiver::<()>::new(r);
        let t = std::thread::spawn(move || {
            for chunk in strategies::split(&bytes, &sizes) {
                write_all(&w, chunk);
            }
        });
        for p in &payloads {
            prop_assert_eq!(&rx.recv_frame().unwrap(), p);
        }
        t.join().unwrap();
        prop_assert_eq!(rx.recv_frame().unwrap_err().kind(), ErrorKind::Closed);
    }

    /// Arbitrary garbage never panics or hangs: every outcome is a decoded message or one
    /// of the framing errors, ending in Closed/Truncated/FrameTooLarge.
    #[test]
    fn garbage_yields_errors_not_panics(
        junk in strategies::garbage(600),
        small_limit in any::<bool>(),
        shm in any::<bool>(),
    ) {
        let mut cfg = Config::new();
        if small_limit {
            cfg = cfg.max_frame_len(256);
        }
        if shm {
            cfg = cfg.shm_threshold(Some(16));
        }
        let (w, r) = pool_ipc::socketpair().unwrap();
        write_all(&w, &junk);
        drop(w);
        let mut rx = Receiver::<Msg>::with_config(r, cfg.clone());
        let mut ended = false;
        for _ in 0..=junk.len() + 1 {
            match rx.recv() {
                Ok(_) => {}
                Err(e) => match e.kind() {
                    ErrorKind::Decode => {}
                    ErrorKind::Closed | ErrorKind::Truncated | ErrorKind::FrameTooLarge => {
                        ended = true;
                        break;
                    }
                    other => prop_assert!(false, "unexpected error kind {:?}", other),
                },
            }
        }
        prop_assert!(ended);

        // The same bytes through a FramedConn.
        let (w, r) = pool_ipc::socketpair().unwrap();
        write_all(&w, &junk);
        drop(w);
        let mut conn = FramedConn::new(r, cfg).unwrap();
        let mut ended = false;
        for _ in 0..=junk.len() + 1 {
            conn.fill().unwrap();
            match conn.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => {
                    prop_assert!(conn.is_eof());
                    ended = true;
                    break;
                }
                Err(e) => match e.kind() {
                    ErrorKind::Decode => {}
                    ErrorKind::Truncated | ErrorKind::FrameTooLarge => {
                        ended = true;
                        break;
                    }
                    other => prop_assert!(false, "unexpected error kind {:?}", other),
                },
            }
        }
        prop_assert!(ended);
    }
}

/// A stream cut at every byte boundary reassembles.
#[test]
fn split_at_every_byte_boundary() {
    crate::helpers::bounded(60, || {
        let msgs = vec![
            Msg::Unit,
            Msg::Num(u64::MAX, -1),
            Msg::Text {
                s: "héllo".into(),
                tags: vec![1, 300, 65535],
            },
            Msg::Bytes(vec![]),
            Msg::Bytes((0..300).map(|i| i as u8).collect()),
        ];
        let bytes = stream_of(&msgs);
        for k in 0..=bytes.len() {
            let (w, mut rx) = pair(Config::new());
            let mut got = Vec::new();
            write_all(&w, &bytes[..k]);
            drain(&mut rx, &mut got);
            write_all(&w, &bytes[k..]);
            drain(&mut rx, &mut got);
            assert_eq!(got, msgs, "cut at {k}");
            drop(w);
            assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Closed);
        }
    });
}

/// Writes some bytes, then fails when asked to.
struct FailsPartway(bool);

impl Serialize for FailsPartway {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeTuple};
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&0x1234_5678u64)?;
        if self.0 {
            return Err(S::Error::custom("fails part way"));
        }
        t.serialize_element(&1u8)?;
        t.end()
    }
}

proptest! {
    /// Values appended one after another are the bytes `encode` of each gives; one that
    /// fails leaves nothing behind, and the ones after it follow as if it had not been.
    #[test]
    fn an_appender_writes_what_encode_of_each_writes(
        msgs in proptest::collection::vec((msg(), any::<bool>()), 0..20)
    ) {
        let mut one_by_one = FrameBuf::new();
        let mut appended = FrameBuf::new();
        let mut sizes = Vec::new();
        {
            let mut out = appended.appender();
            for (m, fail) in &msgs {
                match out.encode(&FailsPartway(*fail)) {
                    Ok(n) => sizes.push(n),
                    Err(e) => prop_assert!(*fail, "{e}"),
                }
                let n = out.encode(m).unwrap();
                prop_assert_eq!(n, postcard::to_allocvec(m).unwrap().len());
                sizes.push(n);
            }
        }
        for (m, fail) in &msgs {
            prop_assert!(one_by_one.encode(&FailsPartway(*fail)).is_err() == *fail);
            one_by_one.encode(m).unwrap();
        }
        prop_assert_eq!(appended.payload(), one_by_one.payload());
        prop_assert_eq!(sizes.iter().sum::<usize>(), appended.payload_len());
    }
}
