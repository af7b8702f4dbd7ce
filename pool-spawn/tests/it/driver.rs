//! A small, blocking driver for one worker: what pool-core does, minus the scheduling.

use std::time::{Duration, Instant};

use pool_ipc::Duplex;
use pool_spawn::protocol::{self, FromWorker, ImageId, ToWorker};
use pool_spawn::task::{FnRef, ItemError};
use pool_spawn::{ExitStatus, LaunchOptions, Launcher, StartMethod, Worker};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;

/// Every wait in these tests is bounded by this.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Options for tests: the test process always has several threads, so `Fork` needs the
/// explicit opt-in.
pub(crate) fn opts() -> LaunchOptions {
    LaunchOptions::new().allow_fork_with_threads(true)
}

pub(crate) fn launcher(method: StartMethod) -> Launcher {
    Launcher::new(method, opts()).expect("launcher")
}

/// A launched worker and the parent's end of its channel.
pub(crate) struct Driven {
    pub(crate) worker: Worker,
    pub(crate) chan: Duplex<ToWorker, FromWorker>,
}

/// Launches worker `<prefix>-<n>`.
pub(crate) fn launch(l: &mut Launcher, n: u32) -> Driven {
    let name = format!("{}-{n}", l.method().worker_name_prefix());
    let mut worker = l.launch(&name).expect("launch");
    assert_eq!(worker.name(), name);
    let chan = Duplex::with_config(
        worker.take_channel().expect("channel"),
        protocol::channel_config(),
    )
    .expect("duplex");
    assert!(worker.take_channel().is_none());
    Driven { worker, chan }
}

impl Driven {
    pub(crate) fn send(&mut self, m: &ToWorker) {
        self.chan.send(m).expect("send");
    }

    /// The next message (bounded wait).
    pub(crate) fn recv(&mut self) -> FromWorker {
        match self.chan.recv_timeout(WAIT) {
            Ok(Some(m)) => m,
            Ok(None) => panic!(
                "no message from worker {} within {WAIT:?}",
                self.worker.pid()
            ),
            Err(e) => panic!("channel of worker {} failed: {e}", self.worker.pid()),
        }
    }

    /// Sends Setup (with this process's image) and returns the answer.
    pub(crate) fn setup_with(
        &mut self,
        max_tasks: Option<u64>,
        init: Option<(FnRef, Vec<u8>)>,
        image: ImageId,
    ) -> FromWorker {
        let name = self.worker.name().to_owned();
        self.send(&ToWorker::Setup {
            name,
            max_tasks,
            image,
            init: init.map(|(f, a)| (f, ByteBuf::from(a))),
            progress: None,
            limits: Default::default(),
        });
        self.recv()
    }

    /// Sends Setup and expects Ready.
    pub(crate) fn setup(&mut self) {
        match self.setup_with(None, None, ImageId::current()) {
            FromWorker::Ready { pid } => assert_eq!(pid, self.worker.pid()),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    /// Runs one batch and decodes its results.
    pub(crate) fn run<A: Serialize, R: DeserializeOwned + 'static>(
        &mut self,
        id: u64,
        func: FnRef,
        args: &[A],
    ) -> Result<Vec<Result<R, ItemError>>, ItemError> {
        self.send_run(id, func, args);
        self.done(id)
    }

    pub(crate) fn send_run<A: Serialize>(&mut self, id: u64, func: FnRef, args: &[A]) {
        let payload = ByteBuf::from(postcard::to_allocvec(args).expect("encode args"));
        self.send(&ToWorker::Run {
            id,
            func,
            timed: false,
            payload,
        });
    }

    /// Reads the Done for `id` and decodes it.
    pub(crate) fn done<R: DeserializeOwned + 'static>(
        &mut self,
        id: u64,
    ) -> Result<Vec<Result<R, ItemError>>, ItemError> {
        match self.recv() {
            FromWorker::Done {
                id: got,
                items,
                outcome,
            } => {
                assert_eq!(got, id);
                outcome.map(|b| {
                    let mut out = Vec::new();
                    pool_spawn::protocol::decode_results(items, &b, &mut out)
                        .expect("decode results");
                    out
                })
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    /// Runs `f(args)` for one item and returns its result.
    pub(crate) fn call<A: Serialize, R: DeserializeOwned + 'static>(
        &mut self,
        func: FnRef,
        args: A,
    ) -> R {
        let mut v = self.run::<A, R>(7, func, &[args]).expect("batch");
        assert_eq!(v.len(), 1);
        v.pop().unwrap().expect("item")
    }

    /// Waits (bounded) for the worker to exit.
    pub(crate) fn wait(&mut self) -> ExitStatus {
        self.worker
            .wait_timeout(WAIT)
            .expect("wait")
            .expect("worker did not exit in time")
    }

    /// Sends Exit, expects end of file and exit code 0; checks the process is gone.
    pub(crate) fn exit(mut self) {
        self.send(&ToWorker::Exit);
        self.expect_eof();
        let status = self.wait();
        assert!(status.success(), "{status}");
        assert_gone(self.worker.pid());
    }

    /// Expects end of file on the channel (the worker closed it).
    pub(crate) fn expect_eof(&mut self) {
        match self.chan.recv_timeout(WAIT) {
            Err(e) if e.kind() == pool_ipc::ErrorKind::Closed => {}
            other => panic!("expected end of file, got {other:?}"),
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Asserts that `/proc/<pid>` is gone: the process exited *and* was reaped.
pub(crate) fn assert_gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {pid} still exists (not reaped?)"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `pid` is dead (gone, or a zombie of someone else).
pub(crate) fn assert_dies(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
