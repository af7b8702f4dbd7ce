//! When the policy may start workers after failures: restart intensity, backoff with
//! jitter, and a token bucket for replacing crashed workers (what Erlang/OTP supervisors
//! and systemd do, without their permanent give-up).
//!
//! - **Backoff.** After the second start failure in a row (a worker whose initializer
//!   failed, that died before it was ready, or that could not be launched), each further
//!   start waits `BACKOFF_BASE · 2^(k-2)`, capped at `BACKOFF_MAX`, times a jitter in
//!   [½, 1]. A first failure is retried at once.
//! - **Intensity.** `limit` start failures within [`PERIOD`] (or `init_limit` initializer
//!   failures in a row, Python's semantic of an initializer that keeps failing) trip the
//!   breaker: the policy fails what waits and refuses new tasks, naming the cause, and
//!   probes with a single worker after a pause (1 s, doubling to [`TRIP_MAX`], jittered).
//!   The first worker that becomes ready closes the breaker again: the pool recovers.
//! - **Rate.** Replacing workers that crashed while running tasks costs a token; the
//!   bucket holds `burst` tokens and refills `rate` per second. A single death is replaced
//!   at once; a crash storm (every task aborts) is paced instead of forking thousands of
//!   processes a second.
//!
//! Time comes in through [`Restarts::advance`]: until it is called, nothing is ever held
//! back (and a tripped breaker never probes), which keeps time-free tests exact.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window of the restart intensity.
pub(crate) const PERIOD: Duration = Duration::from_secs(10);
/// Delay before the third start after two failures in a row; doubles with each failure.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// The longest delay between two starts while the breaker is closed.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The first pause of a tripped breaker before its probe; doubles with each trip.
const TRIP_FIRST: Duration = Duration::from_secs(1);
/// The longest pause of a tripped breaker.
const TRIP_MAX: Duration = Duration::from_secs(30);

/// Why a worker could not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// It reported that its setup failed (the initializer panicked or returned an error, or
    /// the image differs): the message.
    Initializer(String),
    /// It died before it was ready (killed from outside, or crashed while starting).
    Died,
    /// It could not be launched at all (out of file descriptors or processes, say): why.
    Launch(String),
}

impl Cause {
    fn describe(&self) -> String {
        match self {
            Cause::Initializer(m) => format!("the initializer failed: {m}"),
            Cause::Died => "the worker died before it was ready (killed, or crashed while \
                            starting or in its initializer)"
                .to_owned(),
            Cause::Launch(m) => format!("a worker could not be launched: {m}"),
        }
    }
}

/// A tripped breaker: why, and when it probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Trip {
    /// The message for the tasks it fails.
    pub(crate) why: String,
    /// The initializer itself failed (the tasks fail as `InitializerFailed`).
    pub(crate) initializer: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Restarts {
    init_limit: u32,
    limit: u32,
    burst: f64,
    rate: f64,
    now: Option<Instant>,
    /// Start failures within the last [`PERIOD`].
    window: VecDeque<Instant>,
    /// Start failures in a row of any cause, and of the initializer.
    in_a_row: u32,
    init_in_a_row: u32,
    /// No start before this: the backoff after failed starts (lifted by a ready worker),
    /// and the wait for a token (not lifted).
    hold_until: Option<Instant>,
    token_until: Option<Instant>,
    /// The breaker: tripped, how often in a row, when it probes (`None` while a probe
    /// runs, or without a clock).
    trip: Option<Trip>,
    trips: u32,
    probe_at: Option<Instant>,
    tokens: f64,
    refilled_at: Option<Instant>,
    rng: u64,
}

impl Restarts {
    /// For a pool of `processes` workers: `init_limit` initializer failures in a row, or
    /// `limit` start failures of any kind within [`PERIOD`], trip it.
    pub(crate) fn new(processes: usize, init_limit: u32, limit: u32) -> Self {
        let p = processes as f64;
        let burst = (2.0 * p).max(8.0);
        Restarts {
            init_limit: init_limit.max(1),
            limit: limit.max(1),
            burst,
            rate: p.max(4.0),
            now: None,
            window: VecDeque::new(),
            in_a_row: 0,
            init_in_a_row: 0,
            hold_until: None,
            token_until: None,
            trip: None,
            trips: 0,
            probe_at: None,
            tokens: burst,
            refilled_at: None,
            rng: 0x9E37_79B9_7F4A_7C15 ^ processes as u64,
        }
    }

    /// The time is now `now` (never goes back).
    pub(crate) fn advance(&mut self, now: Instant) {
        if self.now.is_some_and(|t| t > now) {
            return;
        }
        self.now = Some(now);
        if let Some(last) = self.refilled_at {
            let gained = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + gained).min(self.burst);
        }
        self.refilled_at = Some(now);
    }

    /// The breaker, when tripped.
    pub(crate) fn tripped(&self) -> Option<&Trip> {
        self.trip.as_ref()
    }

    /// The later of the two holds.
    fn held_until(&self) -> Option<Instant> {
        match (self.hold_until, self.token_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a start may happen now; when tripped, only the one probe once it is due
    /// (taking it: the next needs another trip).
    pub(crate) fn may_launch(&mut self) -> bool {
        if self
            .held_until()
            .is_some_and(|t| self.now.is_some_and(|n| n < t))
        {
            return false;
        }
        if self.trip.is_some() {
            let due = self
                .probe_at
                .is_some_and(|t| self.now.is_some_and(|n| n >= t));
            if !due {
                return false;
            }
            self.probe_at = None;
        }
        true
    }

    /// When the policy wants to be woken to start a worker it holds back.
    pub(crate) fn wakeup(&self) -> Option<Instant> {
        let h = self
            .held_until()
            .filter(|&t| self.now.is_some_and(|n| n < t));
        match (&self.trip, self.probe_at) {
            (Some(_), Some(p)) => Some(h.map_or(p, |h| h.max(p))),
            (Some(_), None) => None,
            (None, _) => h,
        }
    }

    /// A worker became ready: starts work again; a tripped breaker closes.
    pub(crate) fn started(&mut self) {
        self.in_a_row = 0;
        self.init_in_a_row = 0;
        self.hold_until = None;
        self.window.clear();
        self.trip = None;
        self.trips = 0;
        self.probe_at = None;
    }

    /// A worker that was running tasks died unexpectedly: its replacement costs a token,
    /// and with none left, starts wait for the next.
    pub(crate) fn crashed(&mut self) {
        let Some(now) = self.now else { return };
        self.tokens -= 1.0;
        if self.tokens < 0.0 {
            // The debt stays: the next start waits until it is paid back.
            let wait = Duration::from_secs_f64(-self.tokens / self.rate);
            let until = now + wait;
            self.token_until = Some(self.token_until.map_or(until, |h| h.max(until)));
        }
    }

    /// A worker could not start. Returns the breaker's state when this failure trips it
    /// (or trips it again, while probing).
    pub(crate) fn failed(&mut self, cause: &Cause) -> Option<&Trip> {
        self.in_a_row += 1;
        if matches!(cause, Cause::Initializer(_)) {
            self.init_in_a_row += 1;
        } else {
            self.init_in_a_row = 0;
        }
        let mut in_window = self.in_a_row as usize;
        if let Some(now) = self.now {
            self.window.push_back(now);
            while self.window.front().is_some_and(|&t| now - t > PERIOD) {
                self.window.pop_front();
            }
            in_window = self.window.len();
            if self.in_a_row >= 2 {
                let exp = (self.in_a_row - 2).min(16);
                let d = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX);
                self.hold_until = Some(now + self.jitter(d));
            }
        }
        let trips = self.trip.is_some()
            || self.init_in_a_row >= self.init_limit
            || in_window >= self.limit as usize;
        if !trips {
            return None;
        }
        self.trips += 1;
        let pause = TRIP_FIRST
            .saturating_mul(1 << (self.trips - 1).min(16))
            .min(TRIP_MAX);
        let pause = self.jitter(pause);
        self.probe_at = self.now.map(|n| n + pause);
        let count = if self.init_in_a_row >= self.init_limit {
            format!("{} worker starts in a row failed", self.init_in_a_row)
        } else if self.now.is_some() {
            format!(
                "{in_window} worker starts failed within {} s",
                PERIOD.as_secs()
            )
        } else {
            format!("{} worker starts in a row failed", self.in_a_row)
        };
        let retry = if self.now.is_some() {
            format!("; the pool tries again in {:.1} s", pause.as_secs_f64())
        } else {
            String::new()
        };
        self.trip = Some(Trip {
            why: format!("{count}; the last: {}{retry}", cause.describe()),
            initializer: matches!(cause, Cause::Initializer(_)),
        });
        self.trip.as_ref()
    }

    /// `d` scaled by a pseudo-random factor in [½, 1] (xorshift: no syscall, reproducible).
    fn jitter(&mut self, d: Duration) -> Duration {
        let f =
            0.5 + (crate::rng::xorshift(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        d.mul_f64(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_first_failure_is_retried_at_once_then_backoff_grows_with_jitter() {
        let t0 = Instant::now();
        let mut r = Restarts::new(1, 3, 100);
        r.advance(t0);
        assert!(r.failed(&Cause::Died).is_none());
        assert!(r.may_launch(), "a first failure is retried at once");
        let mut last = Duration::ZERO;
        for k in 2..8u32 {
            assert!(r.failed(&Cause::Died).is_none());
            assert!(!r.may_launch(), "failure {k} holds the next start");
            let wait = r.wakeup().unwrap() - t0;
            let full = BACKOFF_BASE * (1 << (k - 2));
            assert!(wait >= full / 2 && wait <= full, "failure {k}: {wait:?}");
            assert!(wait >= last / 2);
            last = wait;
        }
        r.advance(at(t0, 5_000));
        assert!(r.may_launch());
    }

    #[test]
    fn intensity_trips_names_the_cause_probes_after_a_pause_and_a_ready_worker_recovers() {
        let t0 = Instant::now();
        let mut r = Restarts::new(1, 3, 5);
        r.advance(t0);
        for _ in 0..4 {
            assert!(
                r.failed(&Cause::Launch("Too many open files".into()))
                    .is_none()
            );
        }
        let trip = r
            .failed(&Cause::Launch("Too many open files".into()))
            .unwrap();
        assert!(!trip.initializer);
        assert!(
            trip.why.contains("5 worker starts failed within 10 s"),
            "{}",
            trip.why
        );
        assert!(trip.why.contains("Too many open files"), "{}", trip.why);
        let probe = r.wakeup().unwrap();
        assert!(probe >= at(t0, 500) && probe <= at(t0, 1_000), "{probe:?}");
        r.advance(at(t0, 400));
        assert!(!r.may_launch(), "no start during the pause");
        r.advance(probe);
        assert!(r.may_launch(), "one probe");
        assert!(!r.may_launch(), "only one");
        // The probe fails: tripped again, a longer pause.
        assert!(r.failed(&Cause::Died).is_some());
        let second = r.wakeup().unwrap() - probe;
        assert!(second >= Duration::from_secs(1), "{second:?}");
        r.advance(r.wakeup().unwrap());
        assert!(r.may_launch());
        r.started();
        assert!(r.tripped().is_none(), "a ready worker closes the breaker");
        assert!(r.may_launch() && r.may_launch());
    }

    #[test]
    fn failures_older_than_the_period_do_not_count() {
        let t0 = Instant::now();
        let mut r = Restarts::new(1, 3, 3);
        for i in 0..20u64 {
            r.advance(at(t0, i * 6_000));
            assert!(r.failed(&Cause::Died).is_none(), "failure {i}");
            r.started();
        }
    }

    #[test]
    fn an_initializer_that_keeps_failing_trips_after_three_in_a_row() {
        let mut r = Restarts::new(4, 3, 100);
        assert!(r.failed(&Cause::Initializer("boom".into())).is_none());
        assert!(r.failed(&Cause::Initializer("boom".into())).is_none());
        let trip = r.failed(&Cause::Initializer("boom".into())).unwrap();
        assert!(trip.initializer);
        assert!(
            trip.why.contains("the initializer failed: boom"),
            "{}",
            trip.why
        );
        assert!(
            !r.may_launch(),
            "without a clock, a tripped breaker never probes"
        );
    }

    #[test]
    fn a_crash_storm_is_paced_but_a_single_death_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut r = Restarts::new(2, 3, 100);
        r.advance(t0);
        r.crashed();
        assert!(r.may_launch(), "one death: replaced at once");
        let mut now = t0;
        let mut launched = 0u32;
        // A storm: every replacement crashes at once, for ten seconds of fake time.
        while now < at(t0, 10_000) {
            if r.may_launch() {
                launched += 1;
                // Each replacement becomes ready, then crashes on its task.
                r.started();
                r.crashed();
            } else {
                now = r.wakeup().unwrap().max(now + Duration::from_millis(1));
                r.advance(now);
            }
        }
        // The burst (8), then 4 a second.
        assert!((40..=50).contains(&launched), "{launched} starts in 10 s");
    }
}
