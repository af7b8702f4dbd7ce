//! The worker main loop (child side): Setup → image check → initializer → Ready → Run/Done.

use std::os::fd::OwnedFd;

use pool_ipc::{Duplex, ErrorKind as IpcKind};
use serde_bytes::ByteBuf;

use crate::error::Chain;
use crate::protocol::{
    self, EXIT_IMAGE_MISMATCH, EXIT_INIT_FAILED, EXIT_PROTOCOL, FromWorker, SetupFailure, ToWorker,
};
use crate::sys;
use crate::task::{self, ItemError, ItemErrorKind};

/// Why the loop ended abnormally.
enum Stop {
    /// The parent is gone or closed the channel mid-way: nobody to tell.
    Lost,
    /// A message we cannot make sense of.
    Protocol(String),
}

/// Runs the worker loop on `chan` and exits the process; never returns.
pub(crate) fn run(chan: OwnedFd) -> ! {
    task::install_panic_hook();
    let code = match serve(chan) {
        Ok(code) => code,
        Err(Stop::Lost) => 0,
        Err(Stop::Protocol(m)) => {
            eprintln!("procpool worker (pid {}): {m}", std::process::id());
            EXIT_PROTOCOL
        }
    };
    sys::flush_and_exit(code)
}

fn recv(conn: &mut Duplex<FromWorker, ToWorker>) -> Result<Option<ToWorker>, Stop> {
    match conn.recv() {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            IpcKind::Closed => Ok(None),
            IpcKind::Io => Err(Stop::Lost),
            _ => Err(Stop::Protocol(format!(
                "bad message from the parent: {}",
                Chain(&e)
            ))),
        },
    }
}

fn send(conn: &mut Duplex<FromWorker, ToWorker>, msg: &FromWorker) -> Result<(), Stop> {
    conn.send(msg).map_err(|e| match e.kind() {
        IpcKind::Io | IpcKind::Closed => Stop::Lost,
        _ => Stop::Protocol(format!("cannot send a message: {}", Chain(&e))),
    })
}

/// The loop; `Ok(code)` is the exit code.
fn serve(chan: OwnedFd) -> Result<i32, Stop> {
    let mut conn = Duplex::<FromWorker, ToWorker>::with_config(chan, protocol::channel_config())
        .map_err(|e| Stop::Protocol(format!("cannot use the channel: {}", Chain(&e))))?;
    let (max_tasks, same, page) = match recv(&mut conn)? {
        None | Some(ToWorker::Exit) => return Ok(0),
        Some(ToWorker::Run { .. }) => {
            return Err(Stop::Protocol(
                "a Run message arrived before Setup".to_owned(),
            ));
        }
        Some(ToWorker::Setup {
            name,
            max_tasks,
            image,
            init,
            progress,
        }) => {
            // Best effort: without the page the pool assumes the oldest task it sent was
            // running.
            let page = progress
                .and_then(|(pid, fd)| pool_ipc::shm::Segment::open_in_process(pid, fd).ok())
                .filter(|seg| seg.len() >= 16);
            if let Some(page) = &page {
                // Tells the pool that the count in word 0 is kept (the page may not open:
                // /proc missing, or the pool's process not readable to us).
                page.atomic_u64(1).store(
                    protocol::PROGRESS_KEPT,
                    std::sync::atomic::Ordering::Release,
                );
            }
            // `ForkserverPoolWorker-3` shows as `myprog:w3`.
            let number = name.rsplit('-').next().unwrap_or(&name);
            sys::set_process_name(&format!(":w{number}"));
            sys::set_identity(name);
            let same = match image.verify() {
                Ok(same) => same,
                Err(message) => {
                    send(
                        &mut conn,
                        &FromWorker::SetupFailed {
                            reason: SetupFailure::ImageMismatch,
                            message,
                        },
                    )?;
                    return Ok(EXIT_IMAGE_MISMATCH);
                }
            };
            if let Some((f, args)) = init
                && let Err(message) = task::call_init(&same, f, &args)
            {
                send(
                    &mut conn,
                    &FromWorker::SetupFailed {
                        reason: SetupFailure::Initializer,
                        message,
                    },
                )?;
                return Ok(EXIT_INIT_FAILED);
            }
            (max_tasks, same, page)
        }
    };
    send(
        &mut conn,
        &FromWorker::Ready {
            pid: std::process::id(),
        },
    )?;
    let mut runs = 0u64;
    // Each request is decoded in place, its payload borrowed from the receive buffer. Each
    // result is written before the next task starts: whenever the worker dies, every result
    // of a task it finished is already with the parent, so the parent knows the task that
    // was running (the oldest without a result), and runs no task twice.
    let handle = |bytes: &[u8]| -> Step {
        match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(bytes) {
            Ok(ToWorker::Exit) => Step::Exit,
            Ok(ToWorker::Setup { .. }) => Step::Bad("a second Setup message arrived".to_owned()),
            Ok(ToWorker::Run { id, func, payload }) => {
                if let Some(page) = &page {
                    page.atomic_u64(0)
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                let outcome = task::call_batch(&same, func, payload).map(ByteBuf::from);
                Step::Done(FromWorker::Done { id, outcome })
            }
            Err(e) => Step::Bad(format!("bad message from the parent: {}", Chain(&e))),
        }
    };
    loop {
        // Every result has been written already: block for the next request (one that is
        // already buffered is handed over without a system call).
        let step = match conn.recv_with(handle) {
            Ok(step) => step,
            Err(e) => match e.kind() {
                IpcKind::Closed => Step::Exit,
                IpcKind::Io => return Err(Stop::Lost),
                _ => {
                    return Err(Stop::Protocol(format!(
                        "bad message from the parent: {}",
                        Chain(&e)
                    )));
                }
            },
        };
        let done = match step {
            Step::Exit => return Ok(0),
            Step::Bad(m) => return Err(Stop::Protocol(m)),
            Step::Done(done) => done,
        };
        if let Err(e) = conn.feed(&done) {
            match e.kind() {
                IpcKind::Io | IpcKind::Closed => return Err(Stop::Lost),
                // Too large, or unencodable: the batch fails, the worker lives on.
                _ => {
                    let FromWorker::Done { id, .. } = done else {
                        unreachable!("only results are fed here")
                    };
                    let outcome = Err(ItemError::new(
                        ItemErrorKind::Encode,
                        format!("the batch's results cannot be sent: {}", Chain(&e)),
                    ));
                    send(&mut conn, &FromWorker::Done { id, outcome })?;
                }
            }
        }
        flush(&mut conn)?;
        runs += 1;
        if max_tasks.is_some_and(|m| runs >= m) {
            return Ok(0);
        }
    }
}

/// What handling one request came to.
enum Step {
    /// Exit (asked to, or the parent closed the channel).
    Exit,
    /// A task ran: its result message.
    Done(FromWorker),
    /// A request that makes no sense here.
    Bad(String),
}

fn flush(conn: &mut Duplex<FromWorker, ToWorker>) -> Result<(), Stop> {
    conn.flush().map_err(|e| match e.kind() {
        IpcKind::Io | IpcKind::Closed => Stop::Lost,
        _ => Stop::Protocol(format!("cannot send a message: {}", Chain(&e))),
    })
}
