//! The forkserver start method: one single-threaded server process, started by spawn,
//! forks each worker on request.
//!
//! The parent and the server talk over a `SOCK_SEQPACKET` socketpair (message boundaries
//! are kept, so each postcard message is one record and descriptors travel with the record
//! that names them). Requests: [`Request::Fork`], [`Request::Shutdown`]. Replies:
//! [`Reply::Forked`] (with the parent's end of the worker's channel and a pidfd of the
//! worker attached), [`Reply::ForkFailed`], and unsolicited [`Reply::Exited`] reports: the
//! server is the workers' parent, so only it can reap them; it waits for their pidfds to
//! become readable and reports each exit status.
//!
//! A pool's initial workers are asked for with the server's start ([`ServerLink::begin`]):
//! the requests wait in the control socket while the server's program loads, and it
//! answers them as soon as it is up, while the parent readies the pool meanwhile; the
//! parent reads the server's hello first, then the replies, in order.
//!
//! The server keeps spare workers forked ahead, the first as soon as it starts: a fork
//! request is answered at once with a spare, and the next spare is forked after the
//! answer (when no other request waits), while the parent goes on. It keeps one spare, and
//! one more (up to four) each time a request finds none ready: a pool that replaces its
//! workers faster than one fork at a time (`max_tasks_per_child` of 1, say) finds them
//! ready. Once no request has come for [`SPARES_IDLE`], it goes back to keeping one (the
//! others see their channel end and exit). After the last of a pool's initial workers
//! (a `quiet` request), the next spare waits until no request has come for
//! [`SPARE_DEFER`] (or one of the workers it handed out ends: a replacement is likely
//! asked for next): the pool's first tasks run meanwhile, without a fork beside them. A spare that has not been handed out is the
//! server's own business: if it dies it is reaped without a report and replaced.
//!
//! A parent that launches a worker for about every task (a pool that recycles its workers
//! after one task or a few) asks ahead: each launch also sends the request for a later
//! one, whose answer (the worker's channel and pidfd) then waits in the parent, so that a
//! launch takes a worker already there rather than waiting a round trip to the server,
//! which may be in the middle of a fork (see `ServerLink::fork`). The workers so asked for
//! are let go once the parent has launched none for a while.
//!
//! The server dies with the pool: it has `PR_SET_PDEATHSIG(SIGKILL)`, rechecks its parent
//! pid, and treats end of file on its control socket as shutdown. It never leaves orphans:
//! each worker has `PR_SET_PDEATHSIG(SIGKILL)` towards the server, and a server that stops
//! kills and reaps its remaining workers first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvFlags, SendFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use serde::{Deserialize, Serialize};

use crate::child::{ChildProc, poll, poll_readable};
use crate::error::{Error, ErrorKind, Result};
use crate::role::Role;
use crate::status::ExitStatus;
use crate::sys;

const EIO: i32 = rustix::io::Errno::IO.raw_os_error();

/// Parent → server.
#[derive(Serialize, Deserialize, Debug)]
enum Request {
    /// Fork a worker; answer `Forked` or `ForkFailed`. With `quiet`, the parent asks for no
    /// other worker soon (the last of a pool's initial workers): the next spare waits until
    /// no request has come for [`SPARE_DEFER`], rather than being forked at once, while the
    /// new workers take their first tasks. With `batch`, the request is one of those sent
    /// together with the server's start (a pool's initial workers, asked for before the
    /// server is up): that it finds no spare ready is by design, not a sign that requests
    /// outrun forks.
    Fork { quiet: bool, batch: bool },
    /// Kill and reap the remaining workers, report them, then exit.
    Shutdown,
}

/// Server → parent.
#[derive(Serialize, Deserialize, Debug)]
enum Reply {
    /// A worker was forked. Attached: our end of its channel, then its pidfd if `pidfd`.
    Forked { serial: u64, pid: u32, pidfd: bool },
    /// `fork` (or the socketpair) failed with this errno.
    ForkFailed { errno: i32 },
    /// Worker `serial` ended and was reaped.
    Exited { serial: u64, status: ExitStatus },
}

/// The most workers the server keeps forked ahead: it starts keeping one, and one more
/// each time a request finds none ready (a pool that replaces workers faster than one
/// fork at a time), up to this many.
const MAX_SPARES: usize = 4;

/// How long without a fork request before the server lets its spares beyond the first go.
const SPARES_IDLE: Duration = Duration::from_secs(1);

/// How long after a `quiet` fork request the server waits before forking its next spare
/// (see [`Request::Fork`]). Long enough to stay out of the way of a new pool's first work
/// (a map of 200 000 tiny items takes a few milliseconds, and a spare forked 2 ms after the
/// start took some 100 us of CPU in its middle); a worker that ends meanwhile ends the
/// wait at once, so a replacement still finds its spare.
const SPARE_DEFER: Duration = Duration::from_millis(50);

/// Large enough for any `Request` or `Reply`.
const MSG_MAX: usize = 64;

/// Up to this many kids (less one), the server's loop polls them from arrays on its stack.
const POLL_INLINE: usize = 32;

/// Moves the owners (`owners[i]` is `fds[i]`'s) of the readable `fds` to the front of
/// `owners`, in order; returns how many.
fn keep_ready(fds: &[PollFd<'_>], owners: &mut [u64]) -> usize {
    let mut k = 0;
    for (i, f) in fds.iter().enumerate() {
        if !f.revents().is_empty() {
            owners[k] = owners[i];
            k += 1;
        }
    }
    k
}

/// Encodes a control message into a fixed buffer; returns it and the length used.
fn encode<T: Serialize>(msg: &T) -> ([u8; MSG_MAX], usize) {
    let mut buf = [0u8; MSG_MAX];
    // Cannot fail: every message is a few varints, far below `MSG_MAX`.
    let len = postcard::to_slice(msg, &mut buf).map_or(0, |b| b.len());
    (buf, len)
}

// ---------------------------------------------------------------------------------------
// Server side.

struct Kid {
    serial: u64,
    pid: Pid,
    pidfd: Option<OwnedFd>,
    /// Handed to the parent, which expects its exit report; `false` for the spare.
    handed: bool,
}

/// A worker forked ahead of a request: its kid entry holds the pid and pidfd; this holds
/// the parent's end of its channel until it is handed out.
struct Spare {
    serial: u64,
    ours: OwnedFd,
}

struct Server {
    ctl: OwnedFd,
    /// This process's id (asked once: each fork names it as the worker's parent).
    pid: Pid,
    parent: Option<Pid>,
    kids: Vec<Kid>,
    next_serial: u64,
    /// Workers forked ahead, oldest first...
    spares: std::collections::VecDeque<Spare>,
    /// ... and how many it keeps (1 to [`MAX_SPARES`]).
    keep: usize,
    /// When the last fork request came (or the server started).
    asked_at: Instant,
    /// Not before then is the next spare forked (after a `quiet` request).
    defer_until: Option<Instant>,
    /// Whether [`Server::warm_up`] has run (before the first fork).
    warmed: bool,
}

/// Runs the fork server on `ctl`; never returns.
pub(crate) fn serve(ctl: OwnedFd) -> ! {
    // Whatever `main` did before `init()` happened here too: signal settings it changed
    // are put back to a worker's.
    sys::worker_signals();
    serve_prepared(ctl)
}

/// Runs the fork server on `ctl` in a process that has a worker's signal settings already
/// (a zygote, prepared as a worker is); never returns.
pub(crate) fn serve_prepared(ctl: OwnedFd) -> ! {
    serve_zygote(ctl, false)
}

/// [`serve_prepared`] for a zygote whose pool's initial workers were all forked beside it
/// (see `fork::fork_own_worker`): its first spare is held back as after a `quiet` request
/// (until no request has come for [`SPARE_DEFER`]), so that its fork does not compete for
/// the CPU with those workers' first tasks.
pub(crate) fn serve_prepared_holding(ctl: OwnedFd) -> ! {
    serve_zygote(ctl, true)
}

/// The server the seed forked (see `crate::seed`), with its [`Gate`]: forks its first
/// spare, and more, up to the workers its pool will ask for at once, while the seed's
/// verdict on the gate has not come; then waits for the verdict (it exits on any but
/// [`GATE_OPEN`]), puts back the gate's affinity (its own and its spares': the seed moved
/// it to another CPU to start), says hello and serves. Until then it has read nothing from
/// its control socket, nor handed anything out.
pub(crate) fn serve_gated(ctl: OwnedFd, gate: Gate) -> ! {
    serve_zygote_gated(ctl, false, Some(gate))
}

/// The byte a gated server waits for ([`serve_gated`]).
pub(crate) const GATE_OPEN: u8 = b'g';

fn serve_zygote(ctl: OwnedFd, hold_spare: bool) -> ! {
    serve_zygote_gated(ctl, hold_spare, None)
}

/// A gated server's gate (the pipe the seed's verdict comes on), how many workers its pool
/// asks for at once, and the affinity it puts back once the gate opens (see
/// [`serve_gated`]).
pub(crate) type Gate = (OwnedFd, usize, Option<rustix::thread::CpuSet>);

fn serve_zygote_gated(ctl: OwnedFd, hold_spare: bool, gate: Option<Gate>) -> ! {
    let pid = rustix::process::getpid();
    sys::set_process_name(&[":forksrv"], pid);
    let mut s = Server {
        ctl,
        pid,
        parent: rustix::process::getppid(),
        kids: Vec::new(),
        next_serial: 1,
        spares: std::collections::VecDeque::new(),
        keep: 1,
        asked_at: Instant::now(),
        defer_until: None,
        warmed: false,
    };
    // The first spare now, while the parent still readies the pool after the hello: its
    // first request is answered at once too. (A failure here is not the parent's: the
    // first request forks afresh and reports it.)
    if hold_spare {
        s.defer_until = Some(Instant::now() + SPARE_DEFER);
    } else {
        s.fork_spare();
    }
    if let Some((gate, ahead, affinity)) = gate {
        // The pool's next workers, forked while the verdict has not come (each takes about
        // as long as the seed's comparison; forked afterwards, they would hold up `build`).
        while s.spares.len() < ahead.min(MAX_SPARES)
            && !poll_readable(gate.as_fd(), Some(Duration::ZERO)).unwrap_or(true)
        {
            let before = s.spares.len();
            s.fork_spare();
            if s.spares.len() == before {
                break;
            }
        }
        let mut b = [0u8; 1];
        loop {
            match rustix::io::read(&gate, &mut b) {
                Ok(1) if b[0] == GATE_OPEN => break,
                Err(rustix::io::Errno::INTR) => {}
                // Not allowed (end of file: refused, or the seed is gone): the spares are
                // killed and reaped first.
                _ => {
                    s.stop(false);
                    sys::exit_now(0)
                }
            }
        }
        drop(gate);
        // Moved to another CPU to start (see `sys::Spread`): its affinity and its spares'
        // (forked meanwhile) put back before its hello, so before the program can have
        // anything from it.
        if let Some(set) = affinity {
            let _ = rustix::thread::sched_setaffinity(None, &set);
            for spare in &s.spares {
                if let Some(kid) = s.kids.iter().find(|k| k.serial == spare.serial) {
                    let _ = rustix::thread::sched_setaffinity(Some(kid.pid), &set);
                }
            }
        }
        if crate::role::send_hello(&s.ctl, Role::Forkserver).is_err() {
            sys::exit_now(0);
        }
    }
    s.run();
    sys::flush_and_exit(0)
}

/// Does once, in the server, what every worker would otherwise do first in its own
/// short life: lazy set-ups whose state a forked worker inherits done (see
/// [`Server::warm_up`]).
///
/// - rustix finds the vDSO (for the clock a worker reads as it begins each task) and the
///   page size through the auxiliary vector the first time it needs them, checking the
///   vDSO's ELF header;
/// - std's stdout is set up at its first use, which for a worker that never prints is
///   the flush on its way out;
/// - the program's name, which a worker puts in its process name, is read from the
///   arguments once.
///
/// Each costs a worker page faults and system calls; a worker recycled after every task
/// paid them for each task.
fn warm_up() {
    use std::io::Write;
    let _ = crate::protocol::monotonic_ns();
    let _ = rustix::param::page_size();
    let _ = std::io::stdout().flush();
    sys::program_name();
}

impl Server {
    /// Readies the server for its first fork: what its workers inherit, done once here
    /// rather than in each of them. Not sooner: a zygote whose pool's initial workers were
    /// forked beside it waits before its first fork (see [`serve_prepared_holding`]), and
    /// its start competes for the CPU with those workers' first tasks.
    fn warm_up(&mut self) {
        if std::mem::replace(&mut self.warmed, true) {
            return;
        }
        // Its workers inherit these as they are (`fork::fork_worker` relies on it, and on
        // stdin being `/dev/null` already: spawn starts the server so, and a zygote is
        // prepared as a worker is): a worker's signal settings and the worker loop's panic
        // hook. Neither changes while it serves.
        crate::task::install_panic_hook();
        // Likewise the worker loop's thread-local list of the descriptors passed with a
        // message: its first use registers a destructor with the C library, which resolves a
        // symbol lazily (a lookup through every loaded library's symbol table, faulting in
        // their pages); done once here, a forked worker inherits it done.
        drop(crate::protocol::passing(Vec::new()));
        // And the worker loop's other thread-locals, whose destructors it registers the
        // same way.
        crate::task::register_thread_locals();
        // And the worker's SIGTERM handler, which a worker then need not install (the
        // server leads its own process group, as each worker does).
        sys::term_kills_group(self.pid);
        warm_up();
    }

    fn run(&mut self) {
        let mut buf = [0u8; MSG_MAX];
        loop {
            // Without pidfds, fall back to polling the children's status.
            let slow = self.kids.iter().any(|k| k.pidfd.is_none());
            let timeout = if self.spares.len() < self.keep {
                // A spare to fork, once nothing else waits (and its deferral is over).
                self.defer_until.map_or(Duration::ZERO, |t| {
                    t.saturating_duration_since(Instant::now())
                })
            } else if slow {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(1)
            };
            // The serials of the kids whose pidfds are readable: on the stack while they are
            // few, so that the loop writes to no heap memory, which every fork shares with
            // the new child until one of them writes it, at the cost of copying the page.
            let mut inline = [0u64; POLL_INLINE];
            let mut many = Vec::new();
            let Ok((ctl_ready, n)) = self.poll_once(timeout, &mut inline, &mut many) else {
                self.stop(false);
                return;
            };
            let ready = if self.kids.len() < POLL_INLINE {
                &inline[..n]
            } else {
                &many[..n]
            };
            if rustix::process::getppid() != self.parent {
                self.stop(false);
                return;
            }
            if !self.reap(ready, slow) {
                self.stop(false);
                return;
            }
            if !ctl_ready {
                if self.spares.len() < self.keep {
                    if self.defer_until.is_some_and(|t| Instant::now() < t) {
                        continue;
                    }
                    self.defer_until = None;
                    self.fork_spare();
                } else if self.keep > 1 && self.asked_at.elapsed() >= SPARES_IDLE {
                    self.shrink_spares();
                }
                continue;
            }
            {
                let req = match rustix::net::recv(&self.ctl, &mut buf, RecvFlags::empty()) {
                    Ok((0, _)) => None,
                    Ok((n, _)) => postcard::from_bytes::<Request>(&buf[..n]).ok(),
                    Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                    Err(_) => None,
                };
                match req {
                    Some(Request::Fork { quiet, batch }) => {
                        self.asked_at = Instant::now();
                        if !self.fork(batch) {
                            self.stop(false);
                            return;
                        }
                        self.defer_until = quiet.then(|| Instant::now() + SPARE_DEFER);
                    }
                    Some(Request::Shutdown) => {
                        self.stop(true);
                        return;
                    }
                    // End of file (the pool is gone) or garbage: stop.
                    None => {
                        self.stop(false);
                        return;
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` for a request on the control socket or the end of a kid (one
    /// with a pidfd). Returns whether a request waits and how many kids ended, whose
    /// serials it wrote to the front of `inline`, or of `many` when there are
    /// [`POLL_INLINE`] kids or more (then it fills `many`).
    fn poll_once(
        &self,
        timeout: Duration,
        inline: &mut [u64; POLL_INLINE],
        many: &mut Vec<u64>,
    ) -> io::Result<(bool, usize)> {
        if self.kids.len() < POLL_INLINE {
            let mut fds: [PollFd<'_>; POLL_INLINE] =
                std::array::from_fn(|_| PollFd::new(&self.ctl, PollFlags::IN));
            let n = self.fill_poll(&mut fds, inline);
            poll(&mut fds[..=n], Some(timeout))?;
            Ok((
                !fds[0].revents().is_empty(),
                keep_ready(&fds[1..=n], inline),
            ))
        } else {
            let mut fds = vec![PollFd::new(&self.ctl, PollFlags::IN); 1 + self.kids.len()];
            many.resize(self.kids.len(), 0);
            let n = self.fill_poll(&mut fds, many);
            poll(&mut fds[..=n], Some(timeout))?;
            Ok((!fds[0].revents().is_empty(), keep_ready(&fds[1..=n], many)))
        }
    }

    /// Puts the control socket in `fds[0]`, then each kid's pidfd, its serial in `owners`
    /// at the same place less one; returns how many kids (`fds` and `owners` are large
    /// enough).
    fn fill_poll<'a>(&'a self, fds: &mut [PollFd<'a>], owners: &mut [u64]) -> usize {
        fds[0] = PollFd::new(&self.ctl, PollFlags::IN);
        let mut n = 0;
        for k in &self.kids {
            if let Some(p) = &k.pidfd {
                fds[1 + n] = PollFd::new(p, PollFlags::IN);
                owners[n] = k.serial;
                n += 1;
            }
        }
        n
    }

    /// Reaps the kids in `ready` (and, when `all`, every kid without a pidfd); reports
    /// them. `false` if the parent is gone.
    fn reap(&mut self, ready: &[u64], all: bool) -> bool {
        let mut i = 0;
        while i < self.kids.len() {
            let k = &self.kids[i];
            if !(ready.contains(&k.serial) || (all && k.pidfd.is_none())) {
                i += 1;
                continue;
            }
            let r = match &k.pidfd {
                Some(fd) => rustix::process::waitid(
                    WaitId::PidFd(fd.as_fd()),
                    WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
                ),
                None => rustix::process::waitid(
                    WaitId::Pid(k.pid),
                    WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
                ),
            };
            let status = match r {
                Ok(Some(st)) => ExitStatus::from_waitid(&st),
                // ECHILD: reaped by the kernel (never, here: the server's SIGCHLD has its
                // default action); the pidfd still tells on Linux 6.15 and later.
                Err(rustix::io::Errno::CHILD) => Some(
                    k.pidfd
                        .as_ref()
                        .and_then(|fd| ExitStatus::from_pidfd(fd.as_fd()))
                        .unwrap_or(ExitStatus::from_code(-1)),
                ),
                _ => None,
            };
            match status {
                Some(_) if !k.handed => {
                    // The spare died before anyone asked for it (killed from outside, say):
                    // nobody expects a report; the next request forks afresh.
                    let k = self.kids.swap_remove(i);
                    self.spares.retain(|s| s.serial != k.serial);
                }
                Some(status) => {
                    // A worker of the pool ended: its replacement is likely asked for next,
                    // so a spare held back (`quiet`) is held back no longer.
                    self.defer_until = None;
                    let k = self.kids.swap_remove(i);
                    if !self.send(
                        &Reply::Exited {
                            serial: k.serial,
                            status,
                        },
                        &[],
                    ) {
                        return false;
                    }
                }
                None => i += 1,
            }
        }
        true
    }

    /// Answers a fork request with a spare, or a worker forked now (`batch`: one of the
    /// requests sent with the server's start). `false` if the parent is gone.
    fn fork(&mut self, batch: bool) -> bool {
        let spare = self.spares.pop_front().map(|s| (s.serial, s.ours));
        if spare.is_none() && self.defer_until.is_none() && !batch {
            // Asked faster than spares were forked (not one the server held back on
            // purpose): keep one more from now on.
            self.keep = (self.keep + 1).min(MAX_SPARES);
        }
        let (serial, ours) = match spare {
            Some(s) => s,
            None => match self.fork_one() {
                Ok(w) => w,
                Err(errno) => return self.send(&Reply::ForkFailed { errno }, &[]),
            },
        };
        let Some(i) = self.kids.iter().position(|k| k.serial == serial) else {
            return self.send(
                &Reply::ForkFailed {
                    errno: rustix::io::Errno::CHILD.raw_os_error(),
                },
                &[],
            );
        };
        self.kids[i].handed = true;
        let k = &self.kids[i];
        let reply = Reply::Forked {
            serial,
            pid: k.pid.as_raw_nonzero().get() as u32,
            pidfd: k.pidfd.is_some(),
        };
        let sent = match &k.pidfd {
            Some(p) => self.send(&reply, &[ours.as_fd(), p.as_fd()]),
            None => self.send(&reply, &[ours.as_fd()]),
        };
        drop(ours);
        // The next spare is forked by the loop, once no request waits.
        sent
    }

    /// Goes back to keeping one spare: the newest others are let go (their channel closed
    /// here, they exit; reaped without a report, as spares are).
    fn shrink_spares(&mut self) {
        self.keep = 1;
        while self.spares.len() > self.keep {
            drop(self.spares.pop_back());
        }
    }

    /// Forks one more spare (a failure is not the parent's: the next request forks afresh
    /// and reports it; a spare that cannot be forked is not tried again before then).
    fn fork_spare(&mut self) {
        match self.fork_one() {
            Ok((serial, ours)) => self.spares.push_back(Spare { serial, ours }),
            Err(_) => self.keep = self.spares.len(),
        }
    }

    /// Forks one worker (not yet handed out); returns its serial and the parent's end of
    /// its channel, or the errno.
    fn fork_one(&mut self) -> std::result::Result<(u64, OwnedFd), i32> {
        self.warm_up();
        let (ours, theirs) = pool_ipc::socketpair().map_err(|e| e.raw_os_error().unwrap_or(EIO))?;
        let pid = crate::fork::fork_worker(theirs, self.pid)
            .map_err(|e| e.raw_os_error().unwrap_or(EIO))?;
        let serial = self.next_serial;
        self.next_serial += 1;
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
        self.kids.push(Kid {
            serial,
            pid,
            pidfd,
            handed: false,
        });
        Ok((serial, ours))
    }

    fn send(&self, reply: &Reply, fds: &[std::os::fd::BorrowedFd<'_>]) -> bool {
        let (buf, len) = encode(reply);
        pool_ipc::fdpass::send_fds(self.ctl.as_fd(), &buf[..len], fds).is_ok()
    }

    /// Kills and reaps every remaining worker; reports them if `report`.
    fn stop(&mut self, report: bool) {
        for k in &self.kids {
            let _ = rustix::process::kill_process_group(k.pid, Signal::KILL);
            match &k.pidfd {
                Some(fd) => {
                    let _ = rustix::process::pidfd_send_signal(fd, Signal::KILL);
                }
                None => {
                    let _ = rustix::process::kill_process(k.pid, Signal::KILL);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for k in std::mem::take(&mut self.kids) {
            let mut child = ChildProc::from_parts(k.pid, k.pidfd);
            let left = deadline.saturating_duration_since(Instant::now());
            match child.wait_timeout(left) {
                Ok(Some(status)) => {
                    if report && k.handed {
                        let _ = self.send(
                            &Reply::Exited {
                                serial: k.serial,
                                status,
                            },
                            &[],
                        );
                    }
                }
                // Stuck (uninterruptible sleep): leave it to whoever inherits it.
                _ => child.forget(),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parent side.

/// A worker the server forked for us.
#[derive(Debug)]
pub(crate) struct Forked {
    pub(crate) serial: u64,
    pub(crate) pid: Pid,
    pub(crate) chan: OwnedFd,
    pub(crate) pidfd: Option<OwnedFd>,
    /// Its answer was read before the call that takes it (it was asked for ahead).
    waited: bool,
}

/// The parent's connection to its fork server, shared by the launcher and the workers'
/// handles (which need the server's exit reports).
#[derive(Debug)]
pub(crate) struct ServerLink {
    state: Mutex<LinkState>,
    server_pid: u32,
    timeout: Duration,
}

#[derive(Debug)]
struct LinkState {
    ctl: Option<OwnedFd>,
    reports: HashMap<u64, ExitStatus>,
    abandoned: HashSet<u64>,
    server: Option<ChildProc>,
    lost: Option<String>,
    /// Fork requests sent ahead of the launch they serve and not yet taken by one: those
    /// sent with the server's start (see [`ServerLink::begin`]) and those a launch sends for
    /// the next (see [`ServerLink::fork`]). The next `fork` calls take them in order, one
    /// each, without asking again.
    ahead: usize,
    /// Answers to fork requests read (by any pump) but not yet taken, oldest first: the
    /// server answers its requests in order, so the oldest is the next caller's.
    answers: VecDeque<Result<Forked>>,
}

enum Pumped {
    Nothing,
    Report,
    /// The answer to a fork request, kept in `answers`.
    Answer,
}

/// A fork server begun by [`ServerLink::begin`], whose hello has not been read yet.
#[derive(Debug)]
pub(crate) struct StartingServer {
    /// (In a mutex only to be `Sync`, as the launcher that holds it is.)
    pending: Mutex<crate::spawn::Pending>,
    ahead: usize,
    timeout: Duration,
}

impl StartingServer {
    /// Waits for the server's hello; the link to it.
    ///
    /// # Errors
    ///
    /// Those of starting it (see `spawn::start`): the server is killed and reaped then.
    pub(crate) fn finish(self) -> Result<Arc<ServerLink>> {
        let mut pending = self
            .pending
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        pending.wait()?;
        let started = pending.into_started()?;
        let link = ServerLink::new(started.sock, started.child, self.timeout, self.ahead);
        tracing::debug!(pid = link.server_pid, "fork server started");
        Ok(link)
    }
}

impl ServerLink {
    /// Starts a fork server.
    pub(crate) fn start(handshake_timeout: Duration, test_entry: &str) -> Result<Arc<ServerLink>> {
        ServerLink::begin(handshake_timeout, test_entry, 0)?.finish()
    }

    /// Begins starting a fork server, without waiting for its hello, and asks it for
    /// `ahead` workers at once: the requests wait in its control socket, so that it forks
    /// them as soon as it is up, rather than one round trip after another once its hello
    /// has come (the last of them `quiet`: a pool's initial workers).
    pub(crate) fn begin(
        handshake_timeout: Duration,
        test_entry: &str,
        ahead: usize,
    ) -> Result<StartingServer> {
        let pending = match crate::seed::begin_server(handshake_timeout, ahead) {
            Some(p) => p,
            None => crate::spawn::begin(Role::Forkserver, handshake_timeout, test_entry)?,
        };
        let ahead = ask_ahead(pending.sock(), ahead);
        Ok(StartingServer {
            pending: Mutex::new(pending),
            ahead,
            timeout: handshake_timeout,
        })
    }

    /// Forks a zygote: a fork server that is a fork of this process rather than a fresh
    /// exec (for [`StartMethod::Fork`](crate::StartMethod::Fork)); see
    /// `fork::fork_zygote`. `timeout` bounds each fork request; `ahead` workers are asked
    /// for at once, as [`ServerLink::begin`] does.
    ///
    /// With `own` workers, this process forks that many workers itself first, at the same
    /// moment (see `fork::fork_own_worker`): they come back as our end of each channel
    /// and the child (or the error of its fork), in order. A zygote asked for no worker at
    /// its start then holds its first spare back.
    pub(crate) fn start_zygote(
        timeout: Duration,
        ahead: usize,
        own: usize,
    ) -> Result<(Arc<ServerLink>, Vec<io::Result<OwnForked>>)> {
        let (ours, theirs) =
            control_socketpair().map_err(|e| Error::io("creating a socketpair", e))?;
        let ahead = ask_ahead(ours.as_fd(), ahead);
        // Read once here, where it is usually read already, rather than in each copy (every
        // worker puts it in its process name).
        sys::program_name();
        // From a thread that lives as long as the process, for the parent-death signal of
        // each, in one job: the zygote first, so that its own start (it readies itself as a
        // worker does) runs while this process forks the workers and readies the pool, not
        // when the workers' first tasks and their callers need the processor; the workers
        // after it.
        let (pid, forked) = crate::spawn::on_spawner_thread(move || {
            let pid = crate::fork::fork_zygote(theirs, own > 0 && ahead == 0)?;
            let forked: Vec<io::Result<OwnForked>> = (0..own).map(|_| fork_own()).collect();
            Ok((pid, forked))
        })
        .map_err(|e| Error::io("fork", e))?;
        let link = ServerLink::new(ours, ChildProc::adopt(pid), timeout, ahead);
        tracing::debug!(pid = link.server_pid, "fork zygote started");
        Ok((link, forked))
    }

    /// The link to `server`, a fork server started either way, reached through `ctl`;
    /// `timeout` bounds each fork request; `ahead` requests were sent already.
    fn new(ctl: OwnedFd, server: ChildProc, timeout: Duration, ahead: usize) -> Arc<ServerLink> {
        let server_pid = server.pid().as_raw_nonzero().get() as u32;
        Arc::new(ServerLink {
            state: Mutex::new(LinkState {
                ctl: Some(ctl),
                reports: HashMap::new(),
                abandoned: HashSet::new(),
                server: Some(server),
                lost: None,
                ahead,
                answers: VecDeque::new(),
            }),
            server_pid,
            timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn server_pid(&self) -> u32 {
        self.server_pid
    }

    /// Whether the server is gone (or was shut down).
    pub(crate) fn is_lost(&self) -> bool {
        self.lock().lost.is_some()
    }

    /// Asks the server for a worker; runs `meanwhile` (if it is still there) once the request
    /// is sent, while the server forks. `quiet`: no other request follows soon (see
    /// [`Request::Fork`]). A request sent with the server's start is not sent again: its
    /// reply is the next one (the server answers in order).
    ///
    /// With `ahead`, the request for the next call goes out now too, before this call waits
    /// for its own answer: the server answers it while the caller readies this worker and
    /// goes about its business, and the next call finds its answer waiting rather than
    /// waiting a round trip for it (and for a fork the server may be in the middle of), as
    /// every call does otherwise. For a pool that replaces its workers one after another
    /// (`max_tasks_per_child`), which launches a worker for about every task. The worker
    /// so answered waits here, unset-up, until the next call (or the link's end: dropped,
    /// it sees its channel end and exits); one found dead by then is passed over.
    pub(crate) fn fork(
        &self,
        meanwhile: &mut Option<impl FnOnce()>,
        quiet: bool,
        ahead: usize,
    ) -> Result<Forked> {
        let mut st = self.lock();
        loop {
            // The oldest request not answered to a caller is this call's: one sent ahead,
            // or else one sent now.
            if st.ahead > 0 {
                st.ahead -= 1;
            } else {
                st.send(&Request::Fork {
                    quiet,
                    batch: false,
                })?;
            }
            while !quiet && st.ahead < ahead {
                st.send(&Request::Fork {
                    quiet: false,
                    batch: false,
                })?;
                st.ahead += 1;
            }
            if let Some(f) = meanwhile.take() {
                f();
            }
            let answer = self.answer(&mut st);
            // An answer that waited here may be of a worker that has died since (killed
            // from outside): not handed on; the next request's answer serves instead.
            if let Ok(f) = &answer
                && f.waited
                && f.pidfd.as_ref().is_some_and(|fd| {
                    poll_readable(fd.as_fd(), Some(Duration::ZERO)).unwrap_or(false)
                })
            {
                st.abandoned.insert(f.serial);
                continue;
            }
            return answer;
        }
    }

    /// Lets the workers asked for ahead go (see [`ServerLink::fork`]): their answers are
    /// taken (waited for, if they have not come: the server answers at once unless it is
    /// forking) and dropped; each worker sees its channel end and exits, its report
    /// forgotten. For a pool that has launched none for a while: it keeps no idle process
    /// for good. Whether there were any.
    pub(crate) fn let_ahead_go(&self) -> bool {
        let mut st = self.lock();
        if st.ahead == 0 {
            return false;
        }
        // No call is under way (it would hold the lock): every answer not taken, come or
        // to come, is of a request sent ahead.
        let deadline = crate::child::deadline_after(self.timeout);
        while st.answers.len() < st.ahead && Instant::now() < deadline {
            if st.pump(FORK_SLICE).is_err() {
                return true;
            }
        }
        st.ahead = 0;
        while let Some(a) = st.answers.pop_front() {
            if let Ok(f) = a {
                st.abandoned.insert(f.serial);
            }
        }
        true
    }

    /// Waits for the oldest answer to a fork request not yet taken (see [`ServerLink::fork`]).
    fn answer(&self, st: &mut LinkState) -> Result<Forked> {
        let deadline = crate::child::deadline_after(self.timeout);
        let mut stopped_since = None;
        let mut waited = true;
        loop {
            if let Some(a) = st.answers.pop_front() {
                return a.map(|f| Forked { waited, ..f });
            }
            waited = false;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.lose("it did not answer a fork request in time");
                return Err(st.lost_error());
            }
            // Wait in slices, looking after a slice that brought nothing whether the server
            // is stopped (not before the first: it answers at once as a rule, and the look
            // reads /proc).
            match st.pump(left.min(FORK_SLICE))? {
                Pumped::Nothing => {
                    if st.stopped_too_long(self.server_pid, &mut stopped_since) {
                        return Err(st.lost_error());
                    }
                }
                Pumped::Report | Pumped::Answer => {}
            }
        }
    }

    /// Waits up to `timeout` for the server's exit report on worker `serial`.
    ///
    /// # Errors
    /// [`ErrorKind::ServerLost`] if the server is gone and never reported it.
    pub(crate) fn wait_report(&self, serial: u64, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = crate::child::deadline_after(timeout);
        let mut stopped_since = None;
        let mut first = true;
        loop {
            let mut st = self.lock();
            if let Some(s) = st.reports.remove(&serial) {
                return Ok(Some(s));
            }
            if st.lost.is_some() {
                return Err(st.lost_error());
            }
            // Take what is already there without waiting.
            while let Pumped::Report | Pumped::Answer = st.pump(Duration::ZERO)? {}
            if let Some(s) = st.reports.remove(&serial) {
                return Ok(Some(s));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Not before the first wait: the report usually follows the worker's exit by
            // moments (the server is woken by it too), and the look reads /proc.
            if !std::mem::take(&mut first)
                && st.stopped_too_long(self.server_pid, &mut stopped_since)
            {
                return Err(st.lost_error());
            }
            // Wait in short slices so that other users of the link get their turn.
            let _ = st.pump(left.min(Duration::from_millis(10)))?;
        }
    }

    /// Forgets worker `serial`: its report, when it comes, is dropped.
    pub(crate) fn abandon(&self, serial: u64) {
        let mut st = self.lock();
        if st.reports.remove(&serial).is_none() && st.lost.is_none() {
            st.abandoned.insert(serial);
        }
    }

    /// Stops the server (it kills and reaps its remaining workers, reporting them) and
    /// reaps it.
    pub(crate) fn shutdown(&self) -> Result<()> {
        let mut st = self.lock();
        if st.ctl.is_some() && st.send(&Request::Shutdown).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                // A stopped server cannot answer: it is killed below instead.
                if left.is_zero() || is_stopped(self.server_pid) {
                    break;
                }
                match st.pump(left.min(FORK_SLICE)) {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        st.ctl = None;
        if st.lost.is_none() {
            st.lost = Some("it was shut down".to_owned());
        }
        let Some(mut server) = st.server.take() else {
            return Ok(());
        };
        drop(st);
        let grace = if is_stopped(self.server_pid) {
            Duration::ZERO
        } else {
            Duration::from_secs(5)
        };
        match server.wait_timeout(grace)? {
            Some(s) if s.success() => Ok(()),
            Some(s) => {
                tracing::debug!(status = %s, "fork server exited");
                Ok(())
            }
            None => {
                server.kill_and_reap(Duration::from_secs(5))?;
                Ok(())
            }
        }
    }
}

/// A worker that the launcher of a Fork pool forked itself, beside the zygote (see
/// [`ServerLink::start_zygote`]): our end of its channel, and the child.
pub(crate) type OwnForked = (OwnedFd, ChildProc);

/// Forks one worker of this process's own, with a new channel (see
/// [`ServerLink::start_zygote`]).
fn fork_own() -> io::Result<OwnForked> {
    let (ours, theirs) = pool_ipc::socketpair()?;
    let pid = crate::fork::fork_own_worker(theirs)?;
    Ok((ours, ChildProc::adopt(pid)))
}

/// Sends `n` fork requests on `ctl`, a new server's control socket, the last one `quiet`
/// (see [`ServerLink::begin`]); returns how many were sent (a failure stops them: the
/// server is gone, which its start tells).
fn ask_ahead(ctl: std::os::fd::BorrowedFd<'_>, n: usize) -> usize {
    (0..n)
        .take_while(|&i| {
            let quiet = i + 1 == n;
            send_request(ctl, &Request::Fork { quiet, batch: true }).is_ok()
        })
        .count()
}

/// Sends one request on the control socket `ctl` (one record; `EINTR` is retried).
fn send_request(ctl: std::os::fd::BorrowedFd<'_>, req: &Request) -> rustix::io::Result<()> {
    let (buf, len) = encode(req);
    loop {
        match rustix::net::send(ctl, &buf[..len], SendFlags::NOSIGNAL) {
            Err(rustix::io::Errno::INTR) => {}
            r => return r.map(drop),
        }
    }
}

/// The socketpair between a parent and its fork server (`SOCK_SEQPACKET`, close-on-exec).
pub(crate) fn control_socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// How long [`ServerLink::fork`] waits between looks at the server's state.
const FORK_SLICE: Duration = Duration::from_millis(50);

/// How long a fork server may stay stopped while a fork request waits before it is given up
/// (killed, so that a new one is started).
const STOPPED_GRACE: Duration = Duration::from_millis(500);

/// Whether process `pid` is stopped: state `T` (by a signal) or `t` (at a tracer's stop) in
/// `/proc/<pid>/stat`. False when it cannot be read.
fn is_stopped(pid: u32) -> bool {
    matches!(
        sys::proc_state(format!("/proc/{pid}/stat")),
        Some('T' | 't')
    )
}

impl Drop for ServerLink {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl LinkState {
    fn lose(&mut self, why: &str) {
        if self.lost.is_none() {
            self.lost = Some(why.to_owned());
        }
        self.ctl = None;
        self.ahead = 0;
        self.answers.clear();
        // Reap it now (killing it if it only stopped answering), rather than leave a zombie
        // for as long as handles to its workers live.
        if let Some(mut server) = self.server.take() {
            let _ = server.kill_and_reap(Duration::from_secs(2));
        }
    }

    /// Whether the server (`pid`) has been stopped for [`STOPPED_GRACE`] (`since`: when
    /// the caller's earlier looks first saw it stopped): then it is given up (killed and
    /// reaped), for it cannot answer and may never be resumed.
    fn stopped_too_long(&mut self, pid: u32, since: &mut Option<Instant>) -> bool {
        if !is_stopped(pid) {
            *since = None;
            return false;
        }
        if since.get_or_insert_with(Instant::now).elapsed() < STOPPED_GRACE {
            return false;
        }
        self.lose("it is stopped (SIGSTOP or a tracer) and does not answer");
        true
    }

    fn lost_error(&self) -> Error {
        Error::new(ErrorKind::ServerLost, self.lost.clone().unwrap_or_default())
    }

    fn send(&mut self, req: &Request) -> Result<()> {
        let Some(ctl) = &self.ctl else {
            return Err(self.lost_error());
        };
        if let Err(e) = send_request(ctl.as_fd(), req) {
            self.lose(&format!("its control socket failed: {e}"));
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// Reads one message if one arrives within `timeout`; keeps exit reports.
    fn pump(&mut self, timeout: Duration) -> Result<Pumped> {
        let Some(ctl) = &self.ctl else {
            return Err(self.lost_error());
        };
        let mut buf = [0u8; MSG_MAX];
        // What is there already is read at once, without polling first: as a rule the
        // answer or report looked for has come (the answers to requests sent ahead, the
        // reports drained after a read).
        let got = match pool_ipc::fdpass::try_recv_fds_or_short(ctl.as_fd(), &mut buf, 2) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if timeout.is_zero() {
                    return Ok(Pumped::Nothing);
                }
                let ready = poll_readable(ctl.as_fd(), Some(timeout))
                    .map_err(|e| Error::io("polling the fork server's socket", e))?;
                if !ready {
                    return Ok(Pumped::Nothing);
                }
                pool_ipc::fdpass::recv_fds_or_short(ctl.as_fd(), &mut buf, 2)
            }
            r => r,
        };
        let (n, fds, short) = match got {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Pumped::Nothing),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pumped::Nothing),
            // It exited with requests unread (sent with its start, say): as end of file.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (0, Vec::new(), false),
            Err(e) => {
                self.lose(&format!("its control socket failed: {e}"));
                return Err(self.lost_error());
            }
        };
        if short && n > 0 {
            // This process is out of descriptors: a new worker's channel and pidfd did not
            // reach it. The link goes on (the reply itself arrived whole); that worker sees
            // its channel end and exits, and its exit report is dropped. The request's
            // caller gets the error.
            drop(fds);
            let e = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
            if let Ok(Reply::Forked { serial, .. }) = postcard::from_bytes::<Reply>(&buf[..n]) {
                self.abandoned.insert(serial);
                self.answers
                    .push_back(Err(Error::io("receiving a new worker's descriptors", e)));
                return Ok(Pumped::Answer);
            }
            return Err(Error::io("receiving a new worker's descriptors", e));
        }
        if n == 0 {
            self.lose("it exited (end of file on its control socket)");
            return Err(self.lost_error());
        }
        match postcard::from_bytes::<Reply>(&buf[..n]) {
            Ok(Reply::Exited { serial, status }) => {
                if !self.abandoned.remove(&serial) {
                    self.reports.insert(serial, status);
                }
                Ok(Pumped::Report)
            }
            Ok(Reply::Forked { serial, pid, pidfd }) => {
                let mut fds = fds.into_iter();
                let chan = fds.next();
                let pidfd = if pidfd { fds.next() } else { None };
                let (Some(chan), Some(pid)) = (chan, Pid::from_raw(pid as i32)) else {
                    self.lose("a fork reply came without its channel");
                    return Err(self.lost_error());
                };
                self.answers.push_back(Ok(Forked {
                    serial,
                    pid,
                    chan,
                    pidfd,
                    waited: false,
                }));
                Ok(Pumped::Answer)
            }
            Ok(Reply::ForkFailed { errno }) => {
                self.answers.push_back(Err(Error::io(
                    "the fork server could not fork",
                    io::Error::from_raw_os_error(errno),
                )));
                Ok(Pumped::Answer)
            }
            Err(e) => {
                self.lose(&format!("it sent an undecodable message: {e}"));
                Err(self.lost_error())
            }
        }
    }
}
