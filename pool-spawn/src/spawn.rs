//! The spawn start method: re-execute the current executable with a role marker, keep one
//! socket across exec, and wait for the child's hello.
//!
//! The fork and exec happen on a thread that lives as long as the process: the main thread
//! when it is the caller, else a dedicated thread ("procpool-spawner"). `PR_SET_PDEATHSIG`
//! fires when the *thread* that forked a child exits, not the process, so children forked
//! from a short-lived thread (a test, a request handler) would be killed with it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::RecvFlags;
use rustix::process::Pid;

use crate::child::{ChildProc, poll};
use crate::error::{Error, ErrorKind, Result};
use crate::role::{self, HELLO_LEN, Marker, ROLE_ENV, Role};

/// A started child and our end of its socket, after a successful handshake.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) child: ChildProc,
    pub(crate) sock: OwnedFd,
}

/// The arguments that make a libtest binary run only the `enable_test_support!()` entry.
pub(crate) fn libtest_args(entry: &str) -> Vec<OsString> {
    [
        entry,
        "--nocapture",
        "--test-threads=1",
        "-q",
        "--include-ignored",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// The executable to re-execute: `/proc/self/exe` (which survives the file being moved or
/// replaced), else `current_exe()`.
fn exe_path() -> io::Result<PathBuf> {
    let proc = PathBuf::from("/proc/self/exe");
    if rustix::fs::access(&proc, rustix::fs::Access::EXISTS).is_ok() {
        Ok(proc)
    } else {
        std::env::current_exe()
    }
}

/// A child started by [`begin`] whose hello has not (all) arrived yet.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The child (or the error of its spawn), once the spawner has forked and executed
    /// it...
    child: Option<io::Result<ChildProc>>,
    /// ... which it hands back here.
    spawned: Option<mpsc::Receiver<io::Result<ChildProc>>>,
    sock: OwnedFd,
    role: Role,
    timeout: Duration,
    deadline: Instant,
    buf: [u8; HELLO_LEN],
    got: usize,
}

/// Starts a child of `role` without waiting for it: the fork and exec happen on the
/// spawner thread (or here, on the main thread), and [`Pending::read_hello`] or
/// [`Pending::wait`] take the hello. A caller off the main thread goes on at once; our end
/// of the child's socket becomes readable when the hello comes, or when the spawn failed
/// or the child died (its end closed), which `read_hello` then tells.
///
/// # Errors
///
/// [`ErrorKind::Io`] if the socket cannot be created.
pub(crate) fn begin(role: Role, handshake_timeout: Duration, test_entry: &str) -> Result<Pending> {
    let (ours, theirs) = match role {
        Role::Worker => pool_ipc::socketpair(),
        Role::Forkserver => crate::forkserver::control_socketpair(),
    }
    .map_err(|e| Error::io("creating a socketpair", e))?;
    let parent = rustix::process::getpid();
    let marker = Marker {
        role,
        ppid: parent,
        fd: theirs.as_raw_fd(),
    };
    let args = if crate::init_called() {
        Vec::new()
    } else {
        libtest_args(test_entry)
    };
    let exe = exe_path().map_err(|e| Error::io("finding the current executable", e))?;
    // The program's name, its libtest arguments, and this environment with the marker.
    let arg0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| exe.clone().into_os_string());
    let argv = std::iter::once(arg0).chain(args);
    let envp = std::env::vars_os()
        .filter(|(k, _)| k != ROLE_ENV)
        .map(|(k, v)| {
            let mut e = k;
            e.push("=");
            e.push(v);
            e
        })
        .chain(std::iter::once(OsString::from(format!(
            "{ROLE_ENV}={}",
            marker.to_env_value()
        ))));
    let plan = crate::fork::ExecPlan::new(exe.as_os_str(), argv, envp)
        .map_err(|e| Error::io("preparing the command line", e))?;
    let spawned = spawner_job(move || -> io::Result<ChildProc> {
        let pid = crate::fork::spawn_exec(&plan, marker.fd, parent)?;
        drop(theirs);
        Ok(ChildProc::adopt(pid))
    });
    Ok(Pending {
        child: None,
        spawned: Some(spawned),
        sock: ours,
        role,
        timeout: handshake_timeout,
        deadline: crate::child::deadline_after(handshake_timeout),
        buf: [0; HELLO_LEN],
        got: 0,
    })
}

impl Pending {
    /// A child started some other way than spawn (the seed forked it), whose hello is
    /// awaited on `sock`.
    pub(crate) fn adopted(
        sock: OwnedFd,
        child: ChildProc,
        role: Role,
        handshake_timeout: Duration,
    ) -> Pending {
        Pending {
            child: Some(Ok(child)),
            spawned: None,
            sock,
            role,
            timeout: handshake_timeout,
            deadline: crate::child::deadline_after(handshake_timeout),
            buf: [0; HELLO_LEN],
            got: 0,
        }
    }

    /// Takes the spawner's answer if it has come (`block`: waits for it; it has come, or is
    /// about to, once the hello or an end of file arrived).
    fn receive(&mut self, block: bool) {
        if self.child.is_some() {
            return;
        }
        let Some(rx) = &self.spawned else {
            return;
        };
        let got = if block {
            rx.recv().ok()
        } else {
            match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.spawned = None;
        self.child =
            Some(got.unwrap_or_else(|| Err(io::Error::other("the spawner thread's job panicked"))));
    }

    /// The child, waiting for the spawner to hand it over.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the process could not be started.
    fn child(&mut self) -> Result<&mut ChildProc> {
        self.receive(true);
        self.handed_over()
    }

    /// The child if the spawner has handed it over, without waiting.
    ///
    /// # Errors
    ///
    /// As [`Pending::child`].
    fn try_child(&mut self) -> Result<Option<&mut ChildProc>> {
        self.receive(false);
        if self.child.is_none() {
            return Ok(None);
        }
        self.handed_over().map(Some)
    }

    /// The child handed over, or the error of its spawn (told once).
    fn handed_over(&mut self) -> Result<&mut ChildProc> {
        if matches!(self.child, Some(Err(_)))
            && let Some(Err(e)) = self.child.take()
        {
            return Err(Error::io("starting a process", e));
        }
        match &mut self.child {
            Some(Ok(c)) => Ok(c),
            _ => Err(not_started()),
        }
    }

    /// The child's pid, once the spawner has handed the child over (`None` before, or if
    /// the spawn failed).
    pub(crate) fn pid(&mut self) -> Option<u32> {
        self.receive(false);
        match &self.child {
            Some(Ok(c)) => Some(c.pid().as_raw_nonzero().get() as u32),
            _ => None,
        }
    }

    /// Our end of the child's socket: readable when (more of) the hello has come, or the
    /// child has closed it.
    pub(crate) fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The child's pidfd (readable once it has exited), where the kernel gives one and
    /// the spawner has handed the child over.
    pub(crate) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.child {
            Some(Ok(c)) => c.pidfd(),
            _ => None,
        }
    }

    /// When the child's silence becomes an error ([`Pending::expire`]).
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Takes what has arrived of the hello, without waiting; `Ok(true)` once it is whole
    /// and right.
    ///
    /// # Errors
    ///
    /// As [`Pending::finish`]'s, the child killed and reaped: it ended before answering, or its
    /// hello is wrong.
    pub(crate) fn read_hello(&mut self) -> Result<bool> {
        loop {
            match rustix::net::recv(&self.sock, &mut self.buf[self.got..], RecvFlags::DONTWAIT) {
                // End of file, or (when requests were sent ahead to a fork server that
                // never read them) the connection reset by its exit.
                Ok((0, _)) | Err(rustix::io::Errno::CONNRESET) => {
                    let child = self.child()?;
                    let pid = child.pid().as_raw_nonzero().get();
                    return Err(early_exit(child, pid));
                }
                Ok((n, _)) => {
                    self.got += n;
                    if self.got == HELLO_LEN {
                        self.child()?;
                        return self.check().map(|()| true);
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => {
                    let _ = self.child()?.kill_and_reap(Duration::from_secs(5));
                    return Err(Error::io("reading the child's hello", e.into()));
                }
            }
        }
        // Not handed over yet: a spawn that failed closed our socket's other end, which the
        // read above saw; otherwise the child runs (or is about to).
        let Some(child) = self.try_child()? else {
            return Ok(false);
        };
        if child.try_wait()?.is_some() {
            let pid = child.pid().as_raw_nonzero().get();
            return Err(early_exit(child, pid));
        }
        Ok(false)
    }

    /// The child stayed silent past its deadline: it is killed and reaped, and this is the
    /// error.
    pub(crate) fn expire(&mut self) -> Error {
        let child = match self.child() {
            Ok(c) => c,
            Err(e) => return e,
        };
        let pid = child.pid().as_raw_nonzero().get();
        let status = describe(child.kill_and_reap(Duration::from_secs(5)));
        let timeout = self.timeout;
        Error::new(
            ErrorKind::InitNotCalled,
            format!("process {pid} did not answer within {timeout:?} and was killed ({status})"),
        )
    }

    /// The hello, read whole: checks it names this child in its role.
    fn check(&mut self) -> Result<()> {
        let role = self.role;
        let checked = role::check_hello(&self.buf, role);
        let child = self.child()?;
        let pid = child.pid().as_raw_nonzero().get();
        match checked {
            Ok(p) if p == pid as u32 => {
                tracing::debug!(pid, ?role, "child process answered");
                Ok(())
            }
            Ok(p) => {
                let _ = child.kill_and_reap(Duration::from_secs(5));
                Err(Error::new(
                    ErrorKind::Handshake,
                    format!("process {pid} introduced itself as {p}"),
                ))
            }
            Err(m) => {
                let _ = child.kill_and_reap(Duration::from_secs(5));
                Err(Error::new(
                    ErrorKind::Handshake,
                    format!("process {pid}: {m}"),
                ))
            }
        }
    }

    /// Waits for the hello (until the deadline), watching for the child's early exit.
    ///
    /// # Errors
    ///
    /// As [`Pending::finish`]'s.
    pub(crate) fn wait(&mut self) -> Result<()> {
        self.child()?;
        loop {
            if self.read_hello()? {
                return Ok(());
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.expire());
            }
            let mut fds = vec![PollFd::new(&self.sock, PollFlags::IN)];
            let slice = match self.exit_fd() {
                Some(p) => {
                    fds.push(PollFd::from_borrowed_fd(p, PollFlags::IN));
                    left
                }
                None => left.min(Duration::from_millis(20)),
            };
            poll(&mut fds, Some(slice)).map_err(|e| Error::io("waiting for the child", e))?;
        }
    }

    /// Waits for the hello, then hands over the started child and our end of its socket.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the process could not be started,
    /// [`ErrorKind::InitNotCalled`] if the child exits or stays silent past its deadline (it
    /// is killed and reaped), [`ErrorKind::Handshake`] if it says something unexpected.
    pub(crate) fn finish(mut self) -> Result<Started> {
        self.wait()?;
        self.into_started()
    }

    /// The started child and our end of its socket, once the hello was read.
    ///
    /// # Errors
    ///
    /// As [`Pending::child`].
    pub(crate) fn into_started(mut self) -> Result<Started> {
        self.child()?;
        let Some(Ok(child)) = self.child.take() else {
            return Err(not_started());
        };
        Ok(Started {
            child,
            sock: self.sock,
        })
    }
}

/// The error of a child that is not there: its spawn failed (and said so already).
fn not_started() -> Error {
    Error::io(
        "starting a process",
        io::Error::other("the process was not started"),
    )
}

fn early_exit(child: &mut ChildProc, pid: i32) -> Error {
    let status = match child.wait_timeout(Duration::from_secs(2)) {
        Ok(Some(s)) => s.to_string(),
        _ => describe(child.kill_and_reap(Duration::from_secs(5))),
    };
    Error::new(
        ErrorKind::InitNotCalled,
        format!("process {pid} ended ({status}) before answering"),
    )
}

fn describe(r: Result<crate::ExitStatus>) -> String {
    match r {
        Ok(s) => s.to_string(),
        Err(e) => crate::error::Chain(&e).to_string(),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The spawner thread of this process (a forked child must start its own).
struct Spawner {
    owner: Pid,
    tx: mpsc::Sender<Job>,
}

static SPAWNER: Mutex<Option<Spawner>> = Mutex::new(None);

/// Jobs handed to the spawner thread and not yet finished.
static SPAWNER_BUSY: AtomicUsize = AtomicUsize::new(0);

/// True if this process has a spawner thread and it is parked waiting for work: it holds no
/// lock then, so it does not make a fork hazardous. (Only another thread can hand it a job,
/// and that thread is counted itself.)
pub(crate) fn spawner_is_idle() -> bool {
    let g = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    g.as_ref()
        .is_some_and(|s| s.owner == rustix::process::getpid())
        && SPAWNER_BUSY.load(Ordering::SeqCst) == 0
}

/// Runs `f` on a thread that lives as long as the process: the calling thread if it is the
/// main thread, else the process's spawner thread (started on first use); the calling thread
/// if that cannot be started.
pub(crate) fn on_spawner_thread<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    spawner_job(f)
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread's job panicked")))
}

/// Counts a job handed to the spawner thread until it is dropped (the job done, or
/// unwound).
struct Busy;

impl Busy {
    fn new() -> Busy {
        SPAWNER_BUSY.fetch_add(1, Ordering::SeqCst);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        SPAWNER_BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// As [`on_spawner_thread`], without waiting: `f`'s result comes on the returned channel
/// (at once when the caller is the main thread, which runs `f` itself). A result nobody
/// receives any more is dropped on the spawner thread.
pub(crate) fn spawner_job<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> mpsc::Receiver<io::Result<T>> {
    let (rtx, rrx) = mpsc::sync_channel(1);
    if rustix::thread::gettid() == rustix::process::getpid() {
        let _ = rtx.send(f());
        return rrx;
    }
    let tx = {
        let mut g = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        let me = rustix::process::getpid();
        if g.as_ref().is_none_or(|s| s.owner != me) {
            let (tx, rx) = mpsc::channel::<Job>();
            // Fork workers may run on a copy of this thread: give it a main-sized stack
            // (only the pages used are paid for).
            let started = std::thread::Builder::new()
                .name("procpool-spawner".into())
                .stack_size(8 << 20)
                .spawn(move || {
                    for job in rx {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                });
            *g = match started {
                Ok(_) => Some(Spawner { owner: me, tx }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the spawner thread; spawning from this thread");
                    None
                }
            };
        }
        g.as_ref().map(|s| s.tx.clone())
    };
    let busy = Busy::new();
    let job: Job = Box::new(move || {
        let r = f();
        drop(busy);
        let _ = rtx.send(r);
    });
    match tx {
        Some(tx) => {
            if let Err(mpsc::SendError(job)) = tx.send(job) {
                job();
            }
        }
        None => job(),
    }
    rrx
}
