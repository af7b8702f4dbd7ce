//! The callback thread: runs `Callbacks` (and fills their slots) off the driver thread, one
//! pool-wide thread started on first use.

use std::sync::PoisonError;
use std::thread::JoinHandle;

use super::decode::drop_payload;
use super::shared::Shared;

/// The callback thread and the queue it runs.
pub(super) struct CallbackThread {
    tx: flume::Sender<Box<dyn FnOnce() + Send>>,
    handle: JoinHandle<()>,
}

impl Shared {
    /// Runs `job` on the pool's callback thread (started on first use).
    pub(crate) fn run_callback(&self, job: Box<dyn FnOnce() + Send>) {
        let mut g = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if g.is_none() {
            let (tx, rx) = flume::unbounded::<Box<dyn FnOnce() + Send>>();
            let handle = std::thread::Builder::new()
                .name("procpool-callbacks".into())
                .spawn(move || {
                    ON_CALLBACK_THREAD.set(true);
                    while let Ok(job) = rx.recv() {
                        // Jobs catch their callbacks' panics; whatever still escapes must
                        // not stop the thread, or the jobs queued behind would never run.
                        if let Err(payload) =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                        {
                            drop_payload(payload);
                        }
                    }
                });
            match handle {
                Ok(handle) => *g = Some(CallbackThread { tx, handle }),
                Err(_) => {
                    drop(g);
                    job();
                    return;
                }
            }
        }
        let cb = g.as_ref().expect("callback thread exists");
        if let Err(e) = cb.tx.send(job) {
            drop(g);
            (e.into_inner())();
        }
    }

    /// True on a pool's callback thread (a callback is running this code).
    pub(crate) fn on_callback_thread() -> bool {
        ON_CALLBACK_THREAD.get()
    }

    /// Waits for queued callbacks to finish and stops the callback thread (called from the
    /// callback thread itself, it only tells it to stop after the queue).
    pub(crate) fn stop_callbacks(&self) {
        let cb = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(cb) = cb {
            drop(cb.tx);
            // A callback may itself join or drop the pool: the callback thread cannot wait
            // for itself; it runs what is queued and ends once this callback returns.
            if cb.handle.thread().id() != std::thread::current().id() {
                let _ = cb.handle.join();
            }
        }
    }
}

thread_local! {
    /// Set on callback threads, which must never wait for themselves.
    static ON_CALLBACK_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
