//! The spawn start method: re-execute the current executable with a role marker, keep one
//! socket across exec, and wait for the child's hello.
//!
//! The fork and exec happen on a thread that lives as long as the process: the main thread
//! when it is the caller, else a dedicated thread ("procpool-spawner"). `PR_SET_PDEATHSIG`
//! fires when the *thread* that forked a child exits, not the process, so children forked
//! from a short-lived thread (a test, a request handler) would be killed with it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
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

/// Starts a child of `role` and waits for its hello.
///
/// # Errors
///
/// [`ErrorKind::Io`] if the process or socket cannot be created,
/// [`ErrorKind::InitNotCalled`] if the child exits or stays silent for `handshake_timeout`
/// (it is killed and reaped), [`ErrorKind::Handshake`] if it says something unexpected.
pub(crate) fn start(role: Role, handshake_timeout: Duration, test_entry: &str) -> Result<Started> {
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
    let mut child = on_spawner_thread(move || -> io::Result<ChildProc> {
        let mut cmd = Command::new(&exe);
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
        cmd.args(&args)
            .env(ROLE_ENV, marker.to_env_value())
            .stdin(Stdio::null())
            .process_group(0);
        crate::fork::prepare_exec(&mut cmd, marker.fd, parent);
        let child = cmd.spawn()?;
        let pid = Pid::from_raw(child.id() as i32).ok_or(io::ErrorKind::InvalidData)?;
        // `Child` neither kills nor waits on drop: from here `ChildProc` owns the process.
        drop(child);
        drop(theirs);
        Ok(ChildProc::adopt(pid))
    })
    .map_err(|e| Error::io("starting a process", e))?;
    handshake(&ours, &mut child, role, handshake_timeout)?;
    tracing::debug!(
        pid = child.pid().as_raw_nonzero().get(),
        ?role,
        "child process answered"
    );
    Ok(Started { child, sock: ours })
}

/// Reads the child's hello, watching for its early exit and the deadline.
fn handshake(sock: &OwnedFd, child: &mut ChildProc, role: Role, timeout: Duration) -> Result<()> {
    let pid = child.pid().as_raw_nonzero().get();
    let deadline = crate::child::deadline_after(timeout);
    let mut buf = [0u8; HELLO_LEN];
    let mut got = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let status = describe(child.kill_and_reap(Duration::from_secs(5)));
            return Err(Error::new(
                ErrorKind::InitNotCalled,
                format!(
                    "process {pid} did not answer within {timeout:?} and was killed ({status})"
                ),
            ));
        }
        let (sock_ready, exited) = {
            let mut fds = vec![PollFd::new(sock, PollFlags::IN)];
            let slice = match child.pidfd() {
                Some(p) => {
                    fds.push(PollFd::from_borrowed_fd(p, PollFlags::IN));
                    left
                }
                None => left.min(Duration::from_millis(20)),
            };
            poll(&mut fds, Some(slice)).map_err(|e| Error::io("waiting for the child", e))?;
            (
                !fds[0].revents().is_empty(),
                fds.get(1).is_some_and(|f| !f.revents().is_empty()),
            )
        };
        if sock_ready {
            match rustix::io::read(sock.as_fd(), &mut buf[got..]) {
                Ok(0) => return Err(early_exit(child, pid)),
                Ok(n) => {
                    got += n;
                    if got == HELLO_LEN {
                        return match role::check_hello(&buf, role) {
                            Ok(p) if p == pid as u32 => Ok(()),
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
                        };
                    }
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(e) => {
                    let _ = child.kill_and_reap(Duration::from_secs(5));
                    return Err(Error::io("reading the child's hello", e.into()));
                }
            }
        } else if exited || child.try_wait()?.is_some() {
            return Err(early_exit(child, pid));
        }
    }
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
    if rustix::thread::gettid() == rustix::process::getpid() {
        return f();
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
    let (rtx, rrx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = rtx.send(f());
    });
    SPAWNER_BUSY.fetch_add(1, Ordering::SeqCst);
    match tx {
        Some(tx) => {
            if let Err(mpsc::SendError(job)) = tx.send(job) {
                job();
            }
        }
        None => job(),
    }
    let out = rrx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread's job panicked")));
    SPAWNER_BUSY.fetch_sub(1, Ordering::SeqCst);
    out
}
