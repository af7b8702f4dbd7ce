//! Bytes a task writes to its own channel by mistake: the parent is told at once, it never
//! waits for a frame that will not come.

use std::time::{Duration, Instant};

use pool_ipc::{ErrorKind as IpcKind, FramedConn};
use pool_spawn::StartMethod;
use pool_spawn::protocol::{self, ImageId, ToWorker};
use pool_spawn::task;
use serde_bytes::ByteBuf;

use crate::driver::{launcher, opts};
use crate::{per_method, tasks};

/// Reads frames until one fails to parse, or `within` passes (then `None`).
fn first_error(conn: &mut FramedConn, within: Duration) -> Option<pool_ipc::Error> {
    let deadline = Instant::now() + within;
    loop {
        match conn.next_frame() {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => return Some(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = [rustix::event::PollFd::new(
            &*conn,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: left.min(Duration::from_millis(50)).as_nanos() as i64,
        };
        let _ = rustix::event::poll(&mut pfd, Some(&ts));
        conn.fill().expect("fill");
    }
}

fn a_line_on_the_channel_is_refused_at_once(method: StartMethod) {
    let _ = opts();
    let mut l = launcher(method);
    let name = format!("{}-1", method.worker_name_prefix());
    let mut worker = l.launch(&name).expect("launch");
    let mut conn =
        FramedConn::new(worker.take_channel().unwrap(), protocol::channel_config()).unwrap();
    let setup = ToWorker::<ByteBuf>::Setup {
        name,
        max_tasks: None,
        image: ImageId::current(),
        init: None,
        progress: None,
        limits: Default::default(),
    };
    conn.queue_msg(&setup).unwrap();
    let payload = postcard::to_allocvec(&vec![(b"1234 a line for stdout\n".to_vec(),)]).unwrap();
    conn.queue_msg(&ToWorker::Run {
        id: 1,
        func: task::batch_ref(tasks::write_to_channel),
        timed: false,
        payload: ByteBuf::from(payload),
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !conn.flush().unwrap() {
        assert!(
            Instant::now() < deadline,
            "{method:?}: the worker does not read its channel"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Ready first, then the stray line (whose "1234" reads as an 835 MiB header).
    let e = first_error(&mut conn, Duration::from_secs(10))
        .expect("the stray line is refused, not waited for");
    assert_eq!(e.kind(), IpcKind::FrameTooLarge, "{method:?}: {e}");
    assert!(e.to_string().contains("stray bytes"), "{e}");
    // The worker itself is fine; the pool would kill it now.
    worker.terminate(Duration::ZERO).unwrap();
}
per_method!(
    a_line_on_the_channel_is_refused_at_once,
    super::a_line_on_the_channel_is_refused_at_once
);
