//! The Setup handshake: initializers, the image check, protocol edge cases.

use pool_spawn::StartMethod;
use pool_spawn::protocol::{
    EXIT_IMAGE_MISMATCH, EXIT_INIT_FAILED, FromWorker, ImageId, SetupFailure, ToWorker,
};
use pool_spawn::task::{self, ItemErrorKind};
use serde_bytes::ByteBuf;

use crate::driver::{assert_gone, launch, launcher};
use crate::per_method;
use crate::tasks;

fn initializer_runs(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 1);
    let init = (
        task::init_ref(tasks::init_store),
        postcard::to_allocvec(&(77u64,)).unwrap(),
    );
    match w.setup_with(None, Some(init), ImageId::current()) {
        FromWorker::Ready { .. } => {}
        other => panic!("expected Ready, got {other:?}"),
    }
    assert_eq!(
        w.call::<_, u64>(task::batch_ref(tasks::read_init_value), ()),
        77
    );
    w.exit();
}
per_method!(initializer_runs, super::initializer_runs);

fn expect_setup_failure(method: StartMethod, reply: FromWorker, reason: SetupFailure, text: &str) {
    match reply {
        FromWorker::SetupFailed { reason: r, message } => {
            assert_eq!(r, reason, "{message}");
            assert!(message.contains(text), "{method:?}: {message}");
        }
        other => panic!("expected SetupFailed, got {other:?}"),
    }
}

fn initializer_panics(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 2);
    let init = (
        task::init_ref(tasks::init_panics),
        postcard::to_allocvec(&(5u64,)).unwrap(),
    );
    let reply = w.setup_with(None, Some(init), ImageId::current());
    expect_setup_failure(
        method,
        reply,
        SetupFailure::Initializer,
        "initializer refuses 5",
    );
    w.expect_eof();
    assert_eq!(w.wait().code(), Some(EXIT_INIT_FAILED));
    assert_gone(w.worker.pid());

    // An initializer returning Err fails the same way.
    let mut w = launch(&mut l, 3);
    let init = (
        task::init_ref(tasks::init_fails),
        postcard::to_allocvec(&(6u64,)).unwrap(),
    );
    let reply = w.setup_with(None, Some(init), ImageId::current());
    expect_setup_failure(method, reply, SetupFailure::Initializer, "no good: 6");
    assert_eq!(w.wait().code(), Some(EXIT_INIT_FAILED));
}
per_method!(initializer_panics, super::initializer_panics);

fn image_mismatch(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 4);
    // Same layout as ImageId: dev, inode, size, mtime (s, ns), link offset, protocol.
    let forged: ImageId = postcard::from_bytes(
        &postcard::to_allocvec(&(1u64, 2u64, 3u64, 4i64, 5i64, 6i64, 1u32)).unwrap(),
    )
    .unwrap();
    assert_ne!(forged, ImageId::current());
    let reply = w.setup_with(None, None, forged);
    expect_setup_failure(
        method,
        reply,
        SetupFailure::ImageMismatch,
        "different executable image",
    );
    w.expect_eof();
    assert_eq!(w.wait().code(), Some(EXIT_IMAGE_MISMATCH));
    assert_gone(w.worker.pid());
}
per_method!(image_mismatch, super::image_mismatch);

fn exit_or_eof_before_setup(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 5);
    w.send(&ToWorker::Exit);
    w.expect_eof();
    assert!(w.wait().success());
    let w = launch(&mut l, 6);
    let pid = w.worker.pid();
    let mut worker = w.worker;
    drop(w.chan);
    let s = worker.wait_timeout(crate::driver::WAIT).unwrap().unwrap();
    assert!(s.success(), "{s}");
    assert_gone(pid);
}
per_method!(exit_or_eof_before_setup, super::exit_or_eof_before_setup);

fn bad_runs_fail_the_batch_only(method: StartMethod) {
    let mut l = launcher(method);
    let mut w = launch(&mut l, 7);
    w.setup();
    // An initializer reference used as a task.
    let r = w.run::<(u64,), ()>(1, task::init_ref(tasks::init_store), &[(1u64,)]);
    assert_eq!(r.unwrap_err().kind, ItemErrorKind::Decode);
    // Arguments that do not decode as the function's types.
    w.send(&ToWorker::Run {
        id: 2,
        func: task::batch_ref(tasks::join3),
        timed: false,
        payload: ByteBuf::from(vec![1, 0xff]),
    });
    // The one item fails, with a decoding error of its own.
    let items = w.done::<String>(2).unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].as_ref().unwrap_err().kind, ItemErrorKind::Decode);
    // Not even an item count: the batch as a whole fails.
    w.send(&ToWorker::Run {
        id: 4,
        func: task::batch_ref(tasks::join3),
        timed: false,
        payload: ByteBuf::from(vec![]),
    });
    assert_eq!(w.done::<String>(4).unwrap_err().kind, ItemErrorKind::Decode);
    // A result that does not encode fails only its item.
    let f = task::batch_ref(|n: u8| -> Result<u8, NotSerializable> {
        if n == 1 { Err(NotSerializable) } else { Ok(n) }
    });
    let r = w
        .run::<(u8,), Result<u8, ()>>(3, f, &[(0,), (1,), (2,)])
        .unwrap();
    assert_eq!(r[0], Ok(Ok(0)));
    assert_eq!(r[1].as_ref().unwrap_err().kind, ItemErrorKind::Encode);
    assert_eq!(r[2], Ok(Ok(2)));
    // Still alive and well.
    assert_eq!(w.call::<_, u64>(task::batch_ref(tasks::square), (3u64,)), 9);
    w.exit();
}
per_method!(
    bad_runs_fail_the_batch_only,
    super::bad_runs_fail_the_batch_only
);

/// A value whose serialization always fails.
#[derive(Debug)]
struct NotSerializable;

impl serde::Serialize for NotSerializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("NotSerializable refuses"))
    }
}
