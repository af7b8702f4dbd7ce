//! The outcome of a failed task ([`TaskError`]), and the pool's own errors ([`BuildError`], [`Error`]).

use std::fmt;
use std::time::Duration;

use pool_spawn::ExitStatus;

/// What went wrong with a task. More kinds may be added; match with a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// The task's function panicked in the worker. The worker survived.
    Panicked,
    /// The worker running the task died (signal, `exit`, abort, OOM kill) before sending its
    /// result. The error names the worker's pid and how it ended.
    WorkerLost,
    /// The task's arguments could not be encoded in the parent, or its result in the worker.
    Encode,
    /// The result could not be decoded in the parent, or the arguments in the worker.
    Decode,
    /// The pool was closed or terminated: the task was refused, or dropped before it ran.
    PoolClosed,
    /// Workers could not start because the initializer kept failing.
    InitializerFailed,
    /// The task ran past its time limit (`task_timeout`, or the call's `timeout`): its
    /// worker was stopped with its process group (the task's children die with it) and
    /// replaced. The error names the limit, how long the task ran, the worker and the
    /// function.
    TimedOut,
    /// The task was cancelled ([`AsyncResult::cancel`](crate::AsyncResult::cancel)): it never
    /// ran, or its worker was stopped while it ran.
    Cancelled,
    /// The worker died at its hard memory cap
    /// ([`memory_limit_per_child`](crate::PoolBuilder::memory_limit_per_child)): an
    /// allocation beyond it failed and the process aborted.
    MemoryLimit,
    /// Workers could not start although the initializer did not fail: they were killed or
    /// crashed while starting, or could not be launched at all (out of file descriptors or
    /// processes, say); the message says which. The pool pauses its restarts, tries again,
    /// and takes tasks again once a worker starts.
    StartFailed,
}

/// Why a task failed: one value per failed task, with the details a user needs to act on it.
///
/// Modelled on a join error: ask [`kind`](TaskError::kind), or the `is_*` predicates, then the
/// accessors for details (pid, exit status, panic message, item index in a `map`).
///
/// It is one pointer wide (the details are boxed), so `Result<T, TaskError>` stays small.
///
/// ```
/// # mod procpool { pub use pool_core::*; pub use pool_spawn::{current_process, init, StartMethod}; }
/// fn check(x: u32) -> u32 {
///     assert!(x < 3, "{x} is too big");
///     x
/// }
///
/// fn main() -> Result<(), procpool::Error> {
///     procpool::init(); // first line of main: workers start here
///     let pool = procpool::Pool::builder().processes(2).build()?;
///     let e = pool.map(check, 0..5u32).unwrap_err();
///     assert!(e.is_panic());
///     assert_eq!(e.item_index(), Some(3)); // the first item that failed
///     assert!(e.panic_message().unwrap().contains("3 is too big"));
///     assert!(e.pid().is_some()); // the worker that ran it, which lives on
///     assert_eq!(pool.apply(check, (1,))?, 1);
///     pool.close();
///     pool.join()?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError(Box<Details>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Details {
    kind: TaskErrorKind,
    message: String,
    worker: Option<WorkerRef>,
    status: Option<ExitStatus>,
    ran_for: Option<Duration>,
    item: Option<usize>,
    backtrace: Option<String>,
    /// For WorkerLost: the task never started (workers kept dying before they began it).
    never_started: bool,
    /// The task's function (its Rust path).
    function: Option<&'static str>,
    /// For TimedOut: the limit.
    limit: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct WorkerRef {
    name: String,
    pid: u32,
}

impl TaskError {
    pub(crate) fn new(kind: TaskErrorKind, message: impl Into<String>) -> Self {
        TaskError(Box::new(Details {
            kind,
            message: message.into(),
            worker: None,
            status: None,
            ran_for: None,
            item: None,
            backtrace: None,
            never_started: false,
            function: None,
            limit: None,
        }))
    }

    /// A task that ran past `limit` (for `ran_for`) in worker `name`, which was stopped.
    pub(crate) fn timed_out(
        name: &str,
        pid: u32,
        limit: Duration,
        ran_for: Option<Duration>,
    ) -> Self {
        let mut e = TaskError::new(TaskErrorKind::TimedOut, String::new());
        e.0.worker = Some(WorkerRef {
            name: name.to_string(),
            pid,
        });
        e.0.limit = Some(limit);
        e.0.ran_for = ran_for;
        e
    }

    /// A cancelled task: `began` if its worker was stopped while it ran.
    pub(crate) fn cancelled(began: bool) -> Self {
        TaskError::new(
            TaskErrorKind::Cancelled,
            if began {
                "cancelled while it ran: its worker was stopped and replaced"
            } else {
                "cancelled before it began: it never ran"
            },
        )
    }

    /// Names the task's function in the error.
    pub(crate) fn with_function(mut self, name: &'static str) -> Self {
        self.0.function = Some(name);
        self
    }

    /// The task's function, as its Rust path (`my_crate::resize_image`), where the error
    /// concerns a task that ran or was to run.
    pub fn function(&self) -> Option<&str> {
        self.0.function
    }

    /// For [`TaskErrorKind::TimedOut`]: the time limit the task ran past.
    pub fn time_limit(&self) -> Option<Duration> {
        self.0.limit
    }

    /// How long the task ran before it ended without a result (worker lost, timed out),
    /// when known.
    pub fn ran_for(&self) -> Option<Duration> {
        self.0.ran_for
    }

    /// True for [`TaskErrorKind::TimedOut`].
    pub fn is_timeout(&self) -> bool {
        self.0.kind == TaskErrorKind::TimedOut
    }

    /// True for [`TaskErrorKind::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        self.0.kind == TaskErrorKind::Cancelled
    }

    /// Turns a worker-lost error into a memory-limit one (the worker aborted at its cap).
    pub(crate) fn at_memory_cap(mut self, cap: u64) -> Self {
        self.0.kind = TaskErrorKind::MemoryLimit;
        self.0.message = format!(
            "it hit its memory limit of {} MiB (memory_limit_per_child): an allocation beyond \
             it failed and the process aborted",
            cap / (1 << 20)
        );
        self
    }

    /// A panic error from the worker's report: the message, then maybe a backtrace (present
    /// when `RUST_BACKTRACE` is set), which is kept apart from the message.
    pub(crate) fn panicked(report: String) -> Self {
        TaskError::with_report(TaskErrorKind::Panicked, report)
    }

    /// An error of `kind` from a worker's panic report: the backtrace, when the report
    /// holds one, is kept apart from the message.
    pub(crate) fn with_report(kind: TaskErrorKind, report: String) -> Self {
        const MARK: &str = "\nstack backtrace:\n";
        match report.split_once(MARK) {
            Some((msg, bt)) => {
                let mut e = TaskError::new(kind, msg);
                e.0.backtrace = Some(bt.to_owned());
                e
            }
            None => TaskError::new(kind, report),
        }
    }

    /// The worker's backtrace of the panic behind this error (in the task, the initializer,
    /// or a `Deserialize` of the arguments), if `RUST_BACKTRACE` was set in the worker's
    /// environment. It is kept out of the message.
    pub fn backtrace(&self) -> Option<&str> {
        self.0.backtrace.as_deref()
    }

    pub(crate) fn worker_lost(
        name: &str,
        pid: u32,
        status: Option<ExitStatus>,
        ran_for: Option<Duration>,
    ) -> Self {
        let mut e = TaskError::new(TaskErrorKind::WorkerLost, String::new());
        e.0.worker = Some(WorkerRef {
            name: name.to_string(),
            pid,
        });
        e.0.status = status;
        e.0.ran_for = ran_for;
        e
    }

    /// A WorkerLost for a task that never started: `times` workers in a row died holding
    /// it before they began it.
    pub(crate) fn never_started(
        name: &str,
        pid: u32,
        status: Option<ExitStatus>,
        times: u32,
    ) -> Self {
        let mut e = TaskError::worker_lost(name, pid, status, None);
        e.0.never_started = true;
        e.0.message = format!(
            "{times} workers in a row died holding it before starting it, so it is not sent \
             again"
        );
        e
    }

    pub(crate) fn with_worker(mut self, name: &str, pid: u32) -> Self {
        self.0.worker = Some(WorkerRef {
            name: name.to_string(),
            pid,
        });
        self
    }

    pub(crate) fn with_note(mut self, note: &str) -> Self {
        self.0.message = note.to_string();
        self
    }

    pub(crate) fn with_item(mut self, index: usize) -> Self {
        self.0.item = Some(index);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TaskErrorKind {
        self.0.kind
    }

    /// True if the task panicked; [`panic_message`](Self::panic_message) has the message.
    pub fn is_panic(&self) -> bool {
        self.0.kind == TaskErrorKind::Panicked
    }

    /// True if the worker running the task died before sending its result.
    pub fn is_worker_lost(&self) -> bool {
        self.0.kind == TaskErrorKind::WorkerLost
    }

    /// The panic message (with its source location) if the task panicked.
    pub fn panic_message(&self) -> Option<&str> {
        (self.0.kind == TaskErrorKind::Panicked).then_some(self.0.message.as_str())
    }

    /// The pid of the worker involved, where one was.
    pub fn pid(&self) -> Option<u32> {
        self.0.worker.as_ref().map(|w| w.pid)
    }

    /// The name of the worker involved (`ForkserverPoolWorker-3`), where one was.
    pub fn worker_name(&self) -> Option<&str> {
        self.0.worker.as_ref().map(|w| w.name.as_str())
    }

    /// How a lost worker ended, when it could be reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.0.status
    }

    /// The exit code of a lost worker that exited by itself.
    pub fn exit_code(&self) -> Option<i32> {
        self.0.status.and_then(|s| s.code())
    }

    /// The signal number that killed a lost worker.
    pub fn signal(&self) -> Option<i32> {
        self.0.status.and_then(|s| s.signal())
    }

    /// For a task submitted as part of `map`, `starmap` or `imap`: the index of the failing item.
    pub fn item_index(&self) -> Option<usize> {
        self.0.item
    }

    /// The detail text (panic message, encoder error, ...), without the leading sentence.
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.0.item {
            write!(f, "item {i}: ")?;
        }
        let worker = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if let Some(w) = &self.0.worker {
                write!(f, " in worker {} (pid {})", w.name, w.pid)?;
            }
            Ok(())
        };
        let function = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if let Some(name) = self.0.function {
                write!(f, " running `{name}`")?;
            }
            Ok(())
        };
        match self.0.kind {
            TaskErrorKind::Panicked => {
                write!(f, "task panicked")?;
                worker(f)?;
                write!(f, ": {}", self.0.message)
            }
            TaskErrorKind::WorkerLost => {
                match &self.0.worker {
                    Some(w) => write!(f, "worker {} (pid {}) died", w.name, w.pid)?,
                    None => write!(f, "the worker died")?,
                }
                match (self.0.never_started, self.0.function) {
                    (true, Some(name)) => write!(f, " before starting its task `{name}`")?,
                    (true, None) => write!(f, " before starting this task")?,
                    (false, Some(name)) => write!(f, " while running `{name}`")?,
                    (false, None) => write!(f, " while running this task")?,
                }
                if let Some(d) = self.0.ran_for {
                    write!(f, " ({:.3}s after it started)", d.as_secs_f64())?;
                }
                match self.0.status {
                    Some(s) if s.sent_by_pool() => write!(f, ": {s}, sent by the pool")?,
                    Some(s) => write!(f, ": {s}")?,
                    None => write!(f, ": exit status unknown")?,
                }
                if self
                    .0
                    .status
                    .is_some_and(|s| s.signal() == Some(9) && !s.sent_by_pool())
                {
                    write!(
                        f,
                        "; SIGKILL from outside the pool often means the out-of-memory killer"
                    )?;
                }
                if !self.0.message.is_empty() {
                    write!(f, " ({})", self.0.message)?;
                }
                Ok(())
            }
            TaskErrorKind::Encode => {
                write!(f, "could not encode")?;
                worker(f)?;
                write!(f, ": {}", self.0.message)
            }
            TaskErrorKind::Decode => {
                write!(f, "could not decode")?;
                worker(f)?;
                write!(f, ": {}", self.0.message)
            }
            TaskErrorKind::PoolClosed => write!(f, "{}", self.0.message),
            TaskErrorKind::InitializerFailed | TaskErrorKind::StartFailed => {
                write!(f, "workers cannot start: {}", self.0.message)
            }
            TaskErrorKind::TimedOut => {
                write!(f, "task")?;
                function(f)?;
                write!(f, " ran past its time limit")?;
                if let Some(l) = self.0.limit {
                    write!(f, " of {}", secs(l))?;
                }
                if let Some(d) = self.0.ran_for {
                    write!(f, " (ran {})", secs(d))?;
                }
                if let Some(w) = &self.0.worker {
                    write!(
                        f,
                        "; worker {} (pid {}) was stopped with its process group and replaced",
                        w.name, w.pid
                    )?;
                }
                Ok(())
            }
            TaskErrorKind::Cancelled => {
                write!(f, "task")?;
                function(f)?;
                write!(f, " {}", self.0.message)
            }
            TaskErrorKind::MemoryLimit => {
                match &self.0.worker {
                    Some(w) => write!(f, "worker {} (pid {}) died", w.name, w.pid)?,
                    None => write!(f, "the worker died")?,
                }
                function(f)?;
                write!(f, ": {}", self.0.message)?;
                if let Some(s) = self.0.status {
                    write!(f, " ({s})")?;
                }
                Ok(())
            }
        }
    }
}

/// A duration in the unit that reads best: `50ms`, `1.250s`.
fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

impl std::error::Error for TaskError {}

/// What kind of error a [`BuildError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BuildErrorKind {
    /// A setting is out of range (zero processes, zero tasks per child).
    InvalidConfig,
    /// Workers could not be started: see the source error.
    Start,
}

/// The open-file limit of this process, for error messages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FdLimit {
    pub(crate) soft: u64,
    pub(crate) hard: u64,
}

/// Why [`PoolBuilder::build`](crate::PoolBuilder::build) failed.
///
/// Its message says what failed at the pool's level; the error from below (a system call,
/// the fork refusal, a worker that never ran `procpool::init()`) is its
/// [`source`](std::error::Error::source).
///
/// ```
/// # use pool_core as procpool;
/// use std::error::Error as _;
/// use procpool::{BuildErrorKind, Pool};
///
/// let e = Pool::builder().processes(0).build().unwrap_err();
/// assert_eq!(e.kind(), BuildErrorKind::InvalidConfig);
/// assert_eq!(e.to_string(), "processes must be at least 1");
/// assert!(e.source().is_none());
/// ```
#[derive(Debug)]
pub struct BuildError {
    kind: BuildErrorKind,
    message: String,
    source: Option<pool_spawn::Error>,
}

impl BuildError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        BuildError {
            kind: BuildErrorKind::InvalidConfig,
            message: message.into(),
            source: None,
        }
    }

    /// Workers could not start because of `source`. The fork refusal gets the pool's own
    /// advice: pool-spawn's names its own option, which a pool's user never sees.
    pub(crate) fn start(source: pool_spawn::Error) -> Self {
        let message = match source.kind() {
            pool_spawn::ErrorKind::ForkUnsafe => {
                "the pool cannot fork its workers: use StartMethod::Forkserver (the default), \
                 or accept the risk with PoolBuilder::allow_fork_with_threads(true)"
            }
            _ => "could not start the pool's workers",
        };
        BuildError {
            kind: BuildErrorKind::Start,
            message: message.into(),
            source: Some(source),
        }
    }

    /// Worker `before + 1` of `processes` could not be started: as [`BuildError::start`],
    /// saying so, and when the process ran out of file descriptors, what a worker costs and
    /// what the limit is.
    pub(crate) fn start_worker(
        source: pool_spawn::Error,
        before: usize,
        processes: usize,
        fds: Option<FdLimit>,
    ) -> Self {
        let mut e = BuildError::start(source);
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            e.source.as_ref().map(|s| s as _);
        let mut out_of_fds = None;
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(23 | 24))
            {
                out_of_fds = Some(io.to_string());
            }
            cause = c.source();
        }
        e.message = format!(
            "could not start worker {} of {processes} ({before} begun before it)",
            before + 1
        );
        if let Some(io) = out_of_fds {
            let limit = fds.map_or_else(String::new, |l| {
                format!(
                    "; the limit (RLIMIT_NOFILE) is {} (hard {}), which build raised as far as \
                     it could",
                    l.soft, l.hard
                )
            });
            e.message = format!(
                "{}: the process ran out of file descriptors ({io}): each worker holds about \
                 {} in this process{limit}; use fewer processes or raise the hard limit",
                e.message,
                crate::builder::FDS_PER_WORKER
            );
        }
        e
    }

    /// What kind of error this is.
    pub fn kind(&self) -> BuildErrorKind {
        self.kind
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A submission refused because the pool's queue is full
/// ([`PoolBuilder::max_queued`](crate::PoolBuilder::max_queued)), with what was submitted:
/// [`Pool::try_apply_async`](crate::Pool::try_apply_async) hands the arguments back and
/// [`Pool::try_map_async`](crate::Pool::try_map_async) the items, as crossbeam's
/// `TrySendError::Full` does the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct QueueFull<T>(pub T);

impl<T> QueueFull<T> {
    /// What was submitted.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for QueueFull<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QueueFull(..)")
    }
}

impl<T> fmt::Display for QueueFull<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the pool's queue is full (max_queued)")
    }
}

impl<T> std::error::Error for QueueFull<T> {}

/// An error and its causes on one line (pool-spawn's formatter, shared).
pub(crate) use pool_spawn::Chain;

/// Any error procpool returns: a failed build, a failed task, or a shutdown problem.
///
/// `?` converts [`BuildError`] and [`TaskError`] into it, so a `main` returning
/// `Result<(), procpool::Error>` can use `?` on every pool call. It is transparent: its
/// message is the inner error's, and its [`source`](std::error::Error::source) is the inner
/// error's source, so an error reporter shows each cause once.
#[derive(Debug)]
pub struct Error {
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    Build(BuildError),
    Task(TaskError),
    Join(String),
}

/// What kind of error an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The pool could not be built.
    Build,
    /// A task failed.
    Task,
    /// `join` was misused or timed out.
    Join,
}

impl Error {
    pub(crate) fn join(message: impl Into<String>) -> Self {
        Error {
            repr: Repr::Join(message.into()),
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self.repr {
            Repr::Build(_) => ErrorKind::Build,
            Repr::Task(_) => ErrorKind::Task,
            Repr::Join(_) => ErrorKind::Join,
        }
    }

    /// The task error inside, if this is one.
    pub fn as_task_error(&self) -> Option<&TaskError> {
        match &self.repr {
            Repr::Task(t) => Some(t),
            _ => None,
        }
    }

    /// The build error inside, if this is one.
    pub fn as_build_error(&self) -> Option<&BuildError> {
        match &self.repr {
            Repr::Build(b) => Some(b),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Build(e) => e.fmt(f),
            Repr::Task(e) => e.fmt(f),
            Repr::Join(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.repr {
            Repr::Build(e) => e.source(),
            Repr::Task(e) => e.source(),
            Repr::Join(_) => None,
        }
    }
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Self {
        Error {
            repr: Repr::Build(e),
        }
    }
}

impl From<TaskError> for Error {
    fn from(e: TaskError) -> Self {
        Error {
            repr: Repr::Task(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_report_keeps_its_backtrace_out_of_the_message() {
        let e = TaskError::panicked(
            "panicked at src/x.rs:1:2: boom\nstack backtrace:\n   0: frame".to_owned(),
        );
        assert_eq!(e.panic_message(), Some("panicked at src/x.rs:1:2: boom"));
        assert_eq!(e.backtrace(), Some("   0: frame"));
        assert!(!e.to_string().contains("frame"), "{e}");
        let plain = TaskError::panicked("panicked at src/x.rs:1:2: boom".to_owned());
        assert_eq!(plain.backtrace(), None);
        let init = TaskError::with_report(
            TaskErrorKind::InitializerFailed,
            "3 consecutive worker starts failed; the last: the initializer panicked at \
             src/x.rs:1:2: db gone\nstack backtrace:\n   0: frame"
                .to_owned(),
        );
        assert!(init.to_string().ends_with("db gone"), "{init}");
        assert_eq!(init.backtrace(), Some("   0: frame"));
    }
}
