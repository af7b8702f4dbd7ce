//! What a worker may send, and when: the checks that keep one lying or stalled worker from
//! being believed.
//!
//! A worker's messages follow its life: `Ready` or `SetupFailed` once, before anything else;
//! then only results (`Part`, `PartTail`, `Done`, `Skipped`) and `Recycling`. A message out of that order (a task that writes a forged
//! `SetupFailed` on its channel, say) is a fault of that worker: it is killed and only the
//! task it was running fails, with a note saying why. Believing it instead would requeue the
//! running task (so it ran twice) and count a start failure that never happened.
//!
//! A frame that starts arriving and then stops (a worker stopped, or a task writing on the
//! channel) would otherwise hold the worker's channel forever: when part of a frame has
//! waited [`PARTIAL_FRAME_STALL`] with no new bytes, the worker is killed the same way.

use std::time::{Duration, Instant};

use pool_spawn::Signal;
use pool_spawn::protocol::FromWorker;

use super::shared::Inner;
use super::worker_io::WorkerIo;

/// How long part of a frame may wait for the rest with no new bytes before its worker is
/// killed.
pub(crate) const PARTIAL_FRAME_STALL: Duration = Duration::from_secs(5);

/// Where a worker is in its conversation with the pool, as its messages show.
#[derive(Debug, Default)]
pub(super) struct Guard {
    /// It said `Ready` (or `SetupFailed`): its setup is over.
    set_up: bool,
    /// It said `Ready`: results may come.
    ready: bool,
    /// Since when part of a frame has waited for the rest, with no bytes arriving.
    partial_since: Option<Instant>,
}

impl Guard {
    /// Checks `msg` against the phase and advances it: `Err` with a note for the task's
    /// error when the message is out of phase.
    pub(super) fn admit<B>(&mut self, msg: &FromWorker<B>) -> Result<(), String> {
        let (what, ok) = match msg {
            FromWorker::Ready { .. } => ("Ready", !self.set_up),
            FromWorker::SetupFailed { .. } => ("SetupFailed", !self.set_up),
            FromWorker::Done { .. }
            | FromWorker::Part { .. }
            | FromWorker::PartTail { .. }
            | FromWorker::Skipped { .. } => ("a result", self.ready),
            FromWorker::Recycling { .. } => ("a recycling notice", self.ready),
        };
        if !ok {
            let when = if self.ready {
                "after it was ready"
            } else if self.set_up {
                "after its setup failed"
            } else {
                "before it was ready"
            };
            return Err(format!(
                "it sent {what} {when}, a message out of phase for a worker; it was killed \
                 as faulty"
            ));
        }
        match msg {
            FromWorker::Ready { .. } => (self.set_up, self.ready) = (true, true),
            FromWorker::SetupFailed { .. } => self.set_up = true,
            _ => {}
        }
        Ok(())
    }

    /// It said `Ready`.
    pub(super) fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether the worker may still answer tasks: it is ready, or has not finished its
    /// setup yet (a worker whose setup failed never will).
    pub(super) fn may_answer(&self) -> bool {
        self.ready || !self.set_up
    }

    /// Records, after a read, whether part of a frame waits for the rest. Called only when
    /// bytes arrived (the socket was readable), so a partial frame still waiting restarts
    /// the clock.
    pub(super) fn after_read(&mut self, partial: bool, now: Instant) {
        self.partial_since = partial.then_some(now);
    }
}

/// Checks a message from worker `w` against its phase; when it is out of phase, notes why
/// on the worker (for its task's error) and returns `true`: the caller treats the channel
/// as broken, which kills the worker.
pub(super) fn out_of_phase<B>(w: Option<&mut WorkerIo>, msg: &FromWorker<B>) -> bool {
    let Some(w) = w else { return false };
    match w.guard.admit(msg) {
        Ok(()) => false,
        Err(note) => {
            tracing::warn!(worker = %w.name, %note, "worker sent a message out of phase");
            w.exit_note.get_or_insert(note);
            true
        }
    }
}

/// When the oldest partial frame runs out of time, if any waits.
pub(super) fn stall_deadline(g: &Inner) -> Option<Instant> {
    g.io.values()
        .filter_map(|w| w.guard.partial_since)
        .min()
        .map(|t| t + PARTIAL_FRAME_STALL)
}

/// Kills the workers whose partial frame made no progress for [`PARTIAL_FRAME_STALL`];
/// their exit is then handled as any other (the task each was running fails).
pub(super) fn kill_stalled(g: &mut Inner, now: Instant) {
    for w in g.io.values_mut() {
        if w.guard
            .partial_since
            .is_some_and(|t| now >= t + PARTIAL_FRAME_STALL)
        {
            w.guard.partial_since = None;
            tracing::warn!(worker = %w.name, "a message from a worker stopped arriving");
            w.exit_note.get_or_insert_with(|| {
                format!(
                    "a message from it stopped arriving partway (no new bytes for {} s); \
                     it was killed as faulty",
                    PARTIAL_FRAME_STALL.as_secs()
                )
            });
            if let Some(h) = &w.handle {
                let _ = h.signal_group(Signal::KILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_spawn::protocol::SetupFailure;

    fn failed() -> FromWorker<()> {
        FromWorker::SetupFailed {
            reason: SetupFailure::Initializer,
            message: "x".into(),
        }
    }

    fn ready() -> FromWorker<()> {
        FromWorker::Ready { pid: 1 }
    }

    fn done() -> FromWorker<()> {
        FromWorker::Done {
            id: 1,
            items: 1,
            outcome: Ok(()),
        }
    }

    #[test]
    fn setup_messages_only_before_ready_and_results_only_after() {
        let mut g = Guard::default();
        assert!(
            g.admit(&done())
                .unwrap_err()
                .contains("before it was ready")
        );
        assert!(g.admit(&ready()).is_ok());
        assert!(g.admit(&done()).is_ok());
        let e = g.admit(&failed()).unwrap_err();
        assert!(e.contains("SetupFailed after it was ready"), "{e}");
        assert!(g.admit(&ready()).is_err());
        let mut g = Guard::default();
        assert!(g.admit(&failed()).is_ok());
        assert!(g.admit(&failed()).is_err());
        assert!(g.admit(&ready()).is_err());
        assert!(g.admit(&done()).is_err());
    }

    #[test]
    fn a_partial_frame_is_timed_from_the_last_bytes_that_arrived() {
        let mut g = Guard::default();
        let t0 = Instant::now();
        g.after_read(true, t0);
        assert_eq!(g.partial_since, Some(t0));
        let t1 = t0 + Duration::from_secs(1);
        g.after_read(true, t1);
        assert_eq!(g.partial_since, Some(t1), "progress restarts the clock");
        g.after_read(false, t1);
        assert_eq!(g.partial_since, None);
    }
}
