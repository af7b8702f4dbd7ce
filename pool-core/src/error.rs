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
    /// Workers could not start although the initializer did not fail: they were killed or
    /// crashed while starting, or could not be launched at all (out of file descriptors or
    /// processes, say); the message says which. The pool pauses its restarts, tries again,
    /// and takes tasks again once a worker starts.
    StartFailed,
    /// [`AsyncResult::get_timeout`](crate::AsyncResult::get_timeout) gave up waiting; the
    /// task goes on and its result can still be fetched.
    NotReady,
    /// The result was already taken out of this handle.
    ResultTaken,
}

/// Why a task failed: one value per failed task, with the details a user needs to act on it.
///
/// Modelled on a join error: ask [`kind`](TaskError::kind), or the `is_*` predicates, then the
/// accessors for details (pid, exit status, panic message, item index in a `map`).
///
/// It is one pointer wide (the details are boxed), so `Result<T, TaskError>` stays small.
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
        }))
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
                if self.0.never_started {
                    write!(f, " before starting this task")?;
                } else {
                    write!(f, " while running this task")?;
                }
                if let Some(d) = self.0.ran_for {
                    write!(f, " ({:.3}s after it started)", d.as_secs_f64())?;
                }
                match self.0.status {
                    Some(s) => write!(f, ": {s}")?,
                    None => write!(f, ": exit status unknown")?,
                }
                // A note says why the pool killed it; without one, the kill came from outside.
                if self.0.status.and_then(|s| s.signal()) == Some(9) && self.0.message.is_empty() {
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
            TaskErrorKind::NotReady => write!(f, "result not ready: {}", self.0.message),
            TaskErrorKind::ResultTaken => write!(f, "the result was already taken"),
        }
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

    pub(crate) fn start(source: pool_spawn::Error) -> Self {
        BuildError {
            kind: BuildErrorKind::Start,
            message: "could not start the pool's workers".into(),
            source: Some(source),
        }
    }

    /// Worker `started + 1` of `processes` could not be started: as [`BuildError::start`],
    /// saying so, and when the process ran out of file descriptors, what a worker costs and
    /// what the limit is.
    pub(crate) fn start_worker(
        source: pool_spawn::Error,
        started: usize,
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
            "could not start worker {} of {processes} ({started} started)",
            started + 1
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
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Any error procpool returns: a failed build, a failed task, or a shutdown problem.
///
/// `?` converts [`BuildError`] and [`TaskError`] into it, so a `main` returning
/// `Result<(), procpool::Error>` can use `?` on every pool call.
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
            Repr::Build(e) => Some(e),
            Repr::Task(e) => Some(e),
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
