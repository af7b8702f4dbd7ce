//! Child processes of the pool's workers (the commands of `procpool run`, the persistent
//! workers of `procpool map`), and the sweep the `procpool` process itself does at the end.
//!
//! Every such child starts in a process group of its own, so that a timeout or a stop
//! ends the whole group (what the command started too), and so that a terminal's Ctrl-C
//! reaches only `procpool`, which then stops everything in order. Waits go through a pidfd
//! with `poll`, so a deadline never needs a polling loop or a thread.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

/// How long a process group has between `SIGTERM` and `SIGKILL`.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);

/// How a child ended, in a form that crosses the process boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Ended {
    /// Its exit code, if it exited.
    pub(crate) code: Option<i32>,
    /// The signal that killed it, if one did.
    pub(crate) signal: Option<i32>,
}

impl Ended {
    pub(crate) fn from_status(s: ExitStatus) -> Ended {
        Ended {
            code: s.code(),
            signal: s.signal(),
        }
    }

    pub(crate) fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exited with status {c}"),
            (None, Some(s)) => write!(f, "was killed by signal {s} ({})", signal_name(s)),
            (None, None) => write!(f, "ended in an unknown way"),
        }
    }
}

/// The usual name of signal `n`.
pub(crate) fn signal_name(n: i32) -> &'static str {
    match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => "signal",
    }
}

/// Polls `fds` until one is ready or `deadline` passes (`None`: no deadline). Returns
/// false on timeout. EINTR counts as "look again".
pub(crate) fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<bool> {
    let timeout = deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        }
    });
    match rustix::event::poll(fds, timeout.as_ref()) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::INTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// True if `fd` reports readable (or hung up) within `timeout`.
pub(crate) fn readable_within(fd: impl AsFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll_until(&mut fds, Some(deadline)) {
            Ok(true) if !fds[0].revents().is_empty() => return true,
            Ok(true) => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Ok(false) | Err(_) => return false,
        }
    }
}

/// A started child with a pidfd, in its own process group.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) child: Child,
    pub(crate) pidfd: OwnedFd,
}

impl Watched {
    /// Watches `child` (started with `process_group(0)`).
    pub(crate) fn new(child: Child) -> io::Result<Watched> {
        let pid = pid_of(&child);
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
        Ok(Watched { child, pidfd })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once the child has exited (it is not reaped yet).
    pub(crate) fn exited(&self) -> bool {
        readable_within(&self.pidfd, Duration::ZERO)
    }

    /// Ends the child's whole process group: `SIGTERM`, up to `grace`, then `SIGKILL`;
    /// reaps the child. Members of the group that outlive its leader are killed before the
    /// leader is reaped (while the group id is still certainly theirs).
    pub(crate) fn end_group(self, grace: Duration) -> Ended {
        let pid = pid_of(&self.child);
        if !self.exited() {
            let _ = rustix::process::kill_process_group(pid, Signal::TERM);
            if !readable_within(&self.pidfd, grace) {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
        }
        self.reap()
    }

    /// Waits for the child to exit by itself for up to `patience`, then ends its group.
    pub(crate) fn finish(self, patience: Duration, grace: Duration) -> Ended {
        if readable_within(&self.pidfd, patience) {
            self.reap()
        } else {
            self.end_group(grace)
        }
    }

    /// Kills what is left of the group, then reaps the (exited or dying) leader.
    pub(crate) fn reap(mut self) -> Ended {
        let pid = pid_of(&self.child);
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        match self.child.wait() {
            Ok(s) => Ended::from_status(s),
            Err(_) => Ended::default(),
        }
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).expect("a child's pid is positive")
}

/// Reads what is available from a readable pipe into `buf`; false at end of file.
pub(crate) fn read_some(r: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Makes this process the reaper of its orphaned descendants: a command or worker whose
/// parent (a pool worker) died becomes our child, so that [`sweep`] can end it.
pub(crate) fn become_subreaper() {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
}

/// The children of this process but `spare`, as `/proc` lists them: `(pid, process group)`.
fn children(spare: Option<Pid>) -> Vec<(Pid, Pid)> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let mut text = String::new();
        if File::open(entry.path().join("stat"))
            .and_then(|mut f| f.read_to_string(&mut text))
            .is_err()
        {
            continue;
        }
        // pid (comm) state ppid pgrp ...: comm may hold anything, so split after its ')'.
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (_state, ppid, pgrp) = (fields.next(), fields.next(), fields.next());
        if ppid.and_then(|p| p.parse::<i32>().ok()) == Some(me)
            && Pid::from_raw(pid) != spare
            && let (Some(p), Some(g)) = (
                Pid::from_raw(pid),
                pgrp.and_then(|g| g.parse::<i32>().ok())
                    .and_then(Pid::from_raw),
            )
        {
            out.push((p, g));
        }
    }
    out
}

/// Ends every child this process still has but the seed (call it once the pool is gone, so
/// that the only children left are orphans of the pool's workers: commands, persistent
/// workers and what they started; the seed `procpool::init` made ends with this process).
/// Each is given `patience` to exit by itself (a persistent worker whose input closed),
/// then its process group gets `SIGTERM`, then after [`TERM_GRACE`] `SIGKILL`; `hurry` (a
/// second Ctrl-C) skips straight to `SIGKILL`. Every child is reaped. Returns how many
/// there were.
pub(crate) fn sweep(patience: Duration, hurry: &AtomicBool) -> usize {
    let seed = procpool::seed_pid().and_then(|p| Pid::from_raw(p as i32));
    sweep_sparing(patience, hurry, seed)
}

/// [`sweep`], leaving `spare` alone.
fn sweep_sparing(patience: Duration, hurry: &AtomicBool, spare: Option<Pid>) -> usize {
    let mine = rustix::process::getpgrp();
    let signal = |pid: Pid, pgid: Pid, sig: Signal| {
        if pgid == mine {
            let _ = rustix::process::kill_process(pid, sig);
        } else {
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    };
    let start = Instant::now();
    let term_at = start + patience;
    let kill_at = term_at + TERM_GRACE;
    let give_up = kill_at + Duration::from_secs(5);
    let mut seen = std::collections::HashSet::new();
    let mut termed = std::collections::HashSet::new();
    loop {
        let kids = children(spare);
        for &(pid, _) in &kids {
            seen.insert(pid);
            let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
        }
        let kids = children(spare);
        if kids.is_empty() {
            return seen.len();
        }
        let now = Instant::now();
        let hurry = hurry.load(Ordering::Relaxed);
        if now >= kill_at || hurry {
            for &(pid, pgid) in &kids {
                signal(pid, pgid, Signal::KILL);
            }
        } else if now >= term_at {
            for &(pid, pgid) in &kids {
                if termed.insert(pid) {
                    signal(pid, pgid, Signal::TERM);
                }
            }
        }
        if now >= give_up {
            return seen.len();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
