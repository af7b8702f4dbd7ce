//! The worker main loop (child side): Setup → image check → initializer → Ready → Run/Done.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pool_ipc::{Duplex, ErrorKind as IpcKind, Sender};

use crate::error::Chain;
use crate::protocol::{
    self, EXIT_IMAGE_MISMATCH, EXIT_INIT_FAILED, EXIT_PROTOCOL, FromWorker, SetupFailure, ToWorker,
    page,
};
use crate::sys;
use crate::task::{self, ItemError, ItemErrorKind, ItemSink};
use crate::watch;

/// Why the loop ended abnormally.
enum Stop {
    /// The parent is gone or closed the channel mid-way: nobody to tell.
    Lost,
    /// A message we cannot make sense of.
    Protocol(String),
}

/// Runs the worker loop on `chan` and exits the process; never returns.
pub(crate) fn run(chan: OwnedFd) -> ! {
    // Asked once: the worker names itself and tells the pool its pid with it.
    let pid = rustix::process::getpid();
    task::install_panic_hook();
    sys::term_kills_group(pid);
    let code = match serve(chan, pid) {
        Ok(code) => code,
        Err(Stop::Lost) => 0,
        Err(Stop::Protocol(m)) => {
            eprintln!("procpool worker (pid {}): {m}", std::process::id());
            EXIT_PROTOCOL
        }
    };
    sys::flush_and_exit(code)
}

/// How long the ring that carries large results may sit unused before its memory is given
/// back (up to 256 MiB per worker after large results).
const RING_IDLE: Duration = Duration::from_secs(1);

/// The next message, with the descriptors passed with it.
fn recv(conn: &mut Duplex<FromWorker, ToWorker>) -> Result<Option<(ToWorker, Vec<OwnedFd>)>, Stop> {
    let got = conn.recv_with_fds(|bytes, fds| (postcard::from_bytes::<ToWorker>(bytes), fds));
    match got {
        Ok((Ok(m), fds)) => Ok(Some((m, fds))),
        Ok((Err(e), _)) => Err(Stop::Protocol(format!("bad message from the parent: {e}"))),
        Err(e) => recv_failed(&e).map_or(Ok(None), Err),
    }
}

/// Why a receive failed: `None` when the parent closed the channel (the worker exits).
fn recv_failed(e: &pool_ipc::Error) -> Option<Stop> {
    match e.kind() {
        IpcKind::Closed => None,
        IpcKind::Io => Some(Stop::Lost),
        _ => Some(Stop::Protocol(format!(
            "bad message from the parent: {}",
            Chain(e)
        ))),
    }
}

fn send(conn: &mut Duplex<FromWorker, ToWorker>, msg: &FromWorker) -> Result<(), Stop> {
    conn.send(msg).map_err(send_failed)
}

/// Why a send failed.
fn send_failed(e: pool_ipc::Error) -> Stop {
    match e.kind() {
        IpcKind::Io | IpcKind::Closed => Stop::Lost,
        _ => Stop::Protocol(format!("cannot send a message: {}", Chain(&e))),
    }
}

/// Reports a failed setup to the pool: the exit code the worker ends with.
fn fail_setup(
    conn: &mut Duplex<FromWorker, ToWorker>,
    reason: SetupFailure,
    message: String,
) -> Result<i32, Stop> {
    let code = match reason {
        SetupFailure::ImageMismatch => EXIT_IMAGE_MISMATCH,
        SetupFailure::Initializer => EXIT_INIT_FAILED,
    };
    send(conn, &FromWorker::SetupFailed { reason, message })?;
    Ok(code)
}

/// The loop; `Ok(code)` is the exit code.
fn serve(chan: OwnedFd, pid: rustix::process::Pid) -> Result<i32, Stop> {
    // The pool passes the descriptors of the events a task takes, and of the progress page,
    // with the messages that refer to them.
    // A recycled worker reads a few small messages in its life: its receive buffer starts
    // small (see `Config::small_read_buffer`).
    let config = protocol::channel_config()
        .accept_fds(true)
        .small_read_buffer(true);
    let mut conn = Duplex::<FromWorker, ToWorker>::with_config(chan, config)
        .map_err(|e| Stop::Protocol(format!("cannot use the channel: {}", Chain(&e))))?;
    // A watcher this process inherited is not its own (see `watch::reset`).
    watch::reset();
    let (max_tasks, same, page, limits) = match recv(&mut conn)? {
        None | Some((ToWorker::Exit, _)) => return Ok(0),
        Some((ToWorker::Run { .. } | ToWorker::RunTail { .. }, _)) => {
            return Err(Stop::Protocol(
                "a Run message arrived before Setup".to_owned(),
            ));
        }
        Some((
            ToWorker::Setup {
                name,
                max_tasks,
                image,
                init,
                progress,
                limits,
            },
            fds,
        )) => {
            // The page and the initializer's events open from these (closed at the end).
            let _passed = protocol::passing(fds);
            // A worker given a page keeps it or does not start: the pool may mark tasks
            // cancelled on it before the worker has opened it, and a worker without it would
            // run them.
            // Kept mapped for the rest of the process (a worker gets one Setup): its exit
            // unmaps it with everything else, sparing a separate unmap and close as the
            // worker ends, which for a worker recycled after each task is a good part of
            // its system calls.
            let page: Option<&'static pool_ipc::shm::Segment> =
                match progress.map(|page| page.open_taken()) {
                    None => None,
                    Some(Ok(seg)) if seg.len() >= protocol::page::AREA_OFFSET => {
                        Some(&*Box::leak(Box::new(seg)))
                    }
                    Some(Ok(seg)) => {
                        let message = format!(
                            "cannot map the pool's progress page: {} bytes, too short",
                            seg.len()
                        );
                        return fail_setup(&mut conn, SetupFailure::Initializer, message);
                    }
                    Some(Err(e)) => {
                        let message = format!("cannot map the pool's progress page: {e}");
                        return fail_setup(&mut conn, SetupFailure::Initializer, message);
                    }
                };
            if let Some(page) = page {
                // Tells the pool that the count in word 0 is kept.
                // Nothing taken up yet.
                page.atomic_u64(protocol::page::CURRENT)
                    .store(protocol::page::ENDED, Ordering::Release);
                page.atomic_u64(protocol::page::KEPT)
                    .store(protocol::PROGRESS_KEPT, Ordering::Release);
                // A caller may wait on the bell for what the worker writes (see
                // `page::BELL`).
                let bell = protocol::page::bell(page);
                conn.sender().on_write(Box::new(move || bell.ring()));
            }
            // `ForkserverPoolWorker-3` shows as `myprog:w3`.
            let number = name.rsplit('-').next().unwrap_or(&name);
            sys::set_process_name(&[":w", number], pid);
            sys::set_identity(name, pid);
            let same = match image.verify() {
                Ok(same) => same,
                Err(message) => {
                    return fail_setup(&mut conn, SetupFailure::ImageMismatch, message);
                }
            };
            if let Some(cap) = limits.memory_cap
                && let Err(e) = set_memory_cap(cap)
            {
                let message = format!("cannot set the memory limit of {cap} bytes: {e}");
                return fail_setup(&mut conn, SetupFailure::Initializer, message);
            }
            if let Some((f, args)) = init
                && let Err(message) = task::call_init(&same, f, &args)
            {
                return fail_setup(&mut conn, SetupFailure::Initializer, message);
            }
            (max_tasks, same, page, limits)
        }
    };
    send(
        &mut conn,
        &FromWorker::Ready {
            pid: pid.as_raw_nonzero().get() as u32,
        },
    )?;
    let mut runs = 0u64;
    let mut results = Results::new(page);
    // A task a caller left in the page (see `page::DOOR`).
    let mut paged = Vec::new();
    // A worker that proves long-lived has its channel watched, and sleeps on its doorbell
    // without a time limit from then on (see `crate::watch`); not one recycled sooner.
    let watch_at = match max_tasks {
        Some(m) if m < 2 * watch::WATCH_AFTER => None,
        _ => page.map(|_| watch::WATCH_AFTER),
    };
    loop {
        if watch_at == Some(runs)
            && let Some(page) = page
        {
            watch::start(conn.as_fd(), page.atomic_u32(page::DOOR));
        }
        // Every result has been written already: wait for the next request. With nothing
        // buffered and no chore for idle moments, the worker sleeps on its page's doorbell
        // (a task may come through the page; the pool rings it when it writes to the
        // channel); otherwise, or after a while, it blocks reading the channel.
        let read_now =
            conn.receiver().has_partial_frame() || conn.sender().ring_dirty_since().is_some();
        if let Some(page) = page
            && door_wait(page, read_now, conn.receiver().bytes_read(), &mut paged)
        {
            let (tx, _) = conn.halves();
            let step = match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(&paged) {
                Ok(ToWorker::Run {
                    id,
                    func,
                    timed,
                    payload,
                }) => run_task(
                    &mut results,
                    tx,
                    &same,
                    (id, func, timed),
                    payload,
                    Vec::new(),
                ),
                Ok(_) => Step::Bad("a message other than Run came through the page".to_owned()),
                Err(e) => Step::Bad(format!("bad task in the page: {e}")),
            };
            match after_step(&mut conn, &mut results, step, &mut runs, max_tasks, &limits)? {
                Some(code) => return Ok(code),
                None => continue,
            }
        }
        // Block for the next request (one that is already buffered is handed over
        // without a system call). Each request is decoded
        // in place, its payload borrowed from the receive buffer; results that outgrow the
        // result area go out while it is still borrowed. A ring that carried large results
        // and has sat unused for RING_IDLE meanwhile gives its memory back.
        if let Some(since) = conn.sender().ring_dirty_since() {
            let wait = (since + RING_IDLE).saturating_duration_since(Instant::now());
            // An error here shows again in the receive below.
            if let Ok(false) = conn.receiver().wait_timeout(wait) {
                conn.sender().release_idle_ring();
                continue;
            }
        }
        let (tx, rx) = conn.halves();
        let step = rx.recv_with_fds(|bytes: &[u8], fds| -> Step {
            match postcard::from_bytes::<ToWorker<&serde_bytes::Bytes>>(bytes) {
                Ok(ToWorker::Exit) => Step::Exit,
                Ok(ToWorker::Setup { .. }) => {
                    Step::Bad("a second Setup message arrived".to_owned())
                }
                Ok(ToWorker::Run {
                    id,
                    func,
                    timed,
                    payload,
                }) => run_task(&mut results, tx, &same, (id, func, timed), payload, fds),
                Ok(ToWorker::RunTail {
                    id,
                    func,
                    timed,
                    head,
                }) => Step::Tail((id, func, timed), head.to_vec(), fds),
                Err(e) => Step::Bad(format!("bad message from the parent: {e}")),
            }
        });
        let step = match step {
            Ok(Step::Tail(run, head, fds)) => match conn.receiver().recv_frame() {
                // The frame after a `RunTail`: the rest of the arguments, as they are.
                Ok(tail) => {
                    let (tx, _) = conn.halves();
                    Ok(task::with_arg_tail(tail, || {
                        run_task(&mut results, tx, &same, run, &head, fds)
                    }))
                }
                Err(e) => Err(e),
            },
            other => other,
        };
        if let Some(page) = page {
            // Read: the page's task area is looked at again before the next wait.
            page.atomic_u32(page::DOOR)
                .store(page::AWAKE, Ordering::SeqCst);
        }
        let step = match step {
            Ok(step) => step,
            Err(e) => match recv_failed(&e) {
                None => Step::Exit,
                Some(stop) => return Err(stop),
            },
        };
        if let Some(code) =
            after_step(&mut conn, &mut results, step, &mut runs, max_tasks, &limits)?
        {
            return Ok(code);
        }
    }
}

/// What follows a request the worker took (from its channel or its page): its answer
/// goes out (or is held, or left in the page), and the worker goes on (`None`) or exits
/// with a code (`Some`).
fn after_step(
    conn: &mut Duplex<FromWorker, ToWorker>,
    results: &mut Results<'_>,
    step: Step,
    runs: &mut u64,
    max_tasks: Option<u64>,
    limits: &protocol::Limits,
) -> Result<Option<i32>, Stop> {
    match step {
        Step::Exit => {
            // Best effort: a pool that closed the channel reads them from the page.
            let _ = results.unpost(conn.sender());
            let _ = results.flush_held(conn.sender());
            return Ok(Some(0));
        }
        Step::Lost => return Err(Stop::Lost),
        Step::Bad(m) => return Err(Stop::Protocol(m)),
        Step::Tail(..) => {
            return Err(Stop::Protocol(
                "internal: a RunTail left without its tail".to_owned(),
            ));
        }
        Step::Done(Reply::Skipped(id)) => {
            // Not a task run: it does not count toward `max_tasks`.
            send(conn, &FromWorker::Skipped { id })?;
            results.held_sent();
            return Ok(None);
        }
        Step::Done(Reply::Done(id, outcome)) => {
            // While another request waits (read already, whole or in part), the answer
            // may wait for the next ones, to go out with them in one write; not the
            // last answer before the worker exits (see HOLD_ANSWERS).
            let last = max_tasks.is_some_and(|m| *runs + 1 >= m);
            let hold = protocol::HOLD_ANSWERS && conn.receiver().has_partial_frame() && !last;
            // Nor is the last answer passed through the page (see `page::ANSWER`), nor
            // one that a recycle for memory may follow: a worker writes every answer
            // before it exits by itself.
            let post = !last && limits.max_rss.is_none();
            results.finish(conn, id, outcome, hold, post)?;
        }
    }
    *runs += 1;
    if max_tasks.is_some_and(|m| *runs >= m) {
        return Ok(Some(0));
    }
    if let Some(limit) = limits.max_rss
        && let Some(rss) = resident_bytes()
        && rss > limit
    {
        // (No answer was left in the page: see `post` above.)
        send(conn, &FromWorker::Recycling { rss })?;
        return Ok(Some(0));
    }
    Ok(None)
}

/// Waits, idle, for the next request by the page's doorbell (see [`page::DOOR`]): `true`
/// with a task a caller left in the page (its payload copied into `task`); `false` once
/// the channel is to be read (the doorbell then says [`page::RECEIVING`]): at once with
/// `read_now` (bytes buffered, or a chore for idle moments), as soon as the pool wrote
/// more than the `bytes_read` the worker read, or after [`page::DOOR_WAIT_NS`] asleep (with
/// the channel watched, once the watcher saw it close: see `crate::watch`).
fn door_wait(
    page: &pool_ipc::shm::Segment,
    read_now: bool,
    bytes_read: u64,
    task: &mut Vec<u8>,
) -> bool {
    let door = page.atomic_u32(page::DOOR);
    let sent = page.atomic_u64(page::SENT);
    let mut until = None;
    let mut woken = false;
    loop {
        let now = door.load(Ordering::SeqCst);
        match now {
            page::RUNG => {
                // The caller stored the task before its swap to RUNG (release): ours.
                let len = page.atomic_u64(page::TASK_LEN).load(Ordering::Acquire);
                let len = usize::try_from(len).map_or(page::TASK_MAX, |l| l.min(page::TASK_MAX));
                task.clear();
                page.read_to_vec(page::TASK_OFFSET, len, task);
                door.store(page::AWAKE, Ordering::SeqCst);
                return true;
            }
            page::SLEEPING => {
                // With the channel watched, the wait has no time limit: the watcher wakes
                // it if the channel closes (see `crate::watch`), and no clock is read.
                // Otherwise the clock is read only once a wait was woken with nothing for
                // us (the first wait mostly ends with a request, or runs its whole length).
                let untimed = watch::watching();
                let (t, end) = match until {
                    _ if untimed => (0, u64::MAX),
                    Some(end) => (protocol::monotonic_ns(), end),
                    None if woken => {
                        let t = protocol::monotonic_ns();
                        let end = t.saturating_add(page::DOOR_WAIT_NS);
                        until = Some(end);
                        (t, end)
                    }
                    None => (0, page::DOOR_WAIT_NS),
                };
                // Stored SLEEPING (sequentially consistent) before this load: bytes the
                // pool wrote are seen here, or the pool sees SLEEPING and wakes us.
                if read_now
                    || sent.load(Ordering::SeqCst) != bytes_read
                    || t >= end
                    || (untimed && watch::closed())
                {
                    if door
                        .compare_exchange(
                            page::SLEEPING,
                            page::RECEIVING,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_ok()
                    {
                        return false;
                    }
                    continue;
                }
                // Woken, timed out or interrupted: look again. An error (none expected on
                // a mapped word) falls back to reading the channel after the wait.
                let wait = (!untimed).then(|| Duration::from_nanos(end - t));
                page.atomic_u64(page::DOOR_CPU)
                    .store(rustix::thread::sched_getcpu() as u64 + 1, Ordering::Relaxed);
                match pool_ipc::shm::futex_wait(door, page::SLEEPING, wait) {
                    Ok(true) => woken = true,
                    Ok(false) | Err(_) => until = Some(0),
                }
            }
            page::RECEIVING if read_now => return false,
            // AWAKE (or woken by the pool: AWAKE again), or RECEIVING from a read before.
            _ => {
                let next = if read_now {
                    page::RECEIVING
                } else {
                    page::SLEEPING
                };
                if door
                    .compare_exchange(now, next, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                    && next == page::RECEIVING
                {
                    return false;
                }
            }
        }
    }
}

/// Sets the hard cap on this process's private memory.
fn set_memory_cap(bytes: u64) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::Data,
        Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        },
    )
    .map_err(std::io::Error::from)
}

/// This process's resident memory, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// The results of the running task: kept on the progress page's result area as each item
/// ends (so that they survive the worker), sent in [`FromWorker::Done`] when it ends, and
/// in [`FromWorker::Part`]s before that when they outgrow the area.
struct Results<'p> {
    page: Option<&'p pool_ipc::shm::Segment>,
    /// The page's [`page::AREA_BYTES`] and [`page::AREA_ITEMS`] words, written after every
    /// item (looked up once).
    area_words: Option<(&'p AtomicU64, &'p AtomicU64)>,
    /// The size of the result area.
    area_len: usize,
    /// Whether the page has the cancel slots (a page as large as `page::LEN`).
    cancels: bool,
    /// Bytes of results in the area.
    used: usize,
    /// Items whose results are in the area.
    items: u64,
    /// Items of the running task already sent in parts.
    sent: u64,
    id: u64,
    timed: bool,
    /// Without a page: the results collected in memory.
    local: Vec<u8>,
    scratch: Vec<u8>,
    /// The page's [`page::HELD_COUNT`], [`page::HELD_BYTES`] and [`page::HELD_GEN`]
    /// words, if the page has a held area: answers may then be held back (see
    /// [`Results::finish`]).
    held_words: Option<(&'p AtomicU64, &'p AtomicU64, &'p AtomicU64)>,
    /// How many times the held area was emptied.
    held_gen: u64,
    /// Answers queued on the channel but not written yet, kept in the held area too.
    held: u64,
    /// Bytes of the held area they fill.
    held_bytes: usize,
    /// An answer being encoded.
    answer: Vec<u8>,
    /// When (`CLOCK_MONOTONIC` ns) the running task was taken up.
    began_ns: u64,
    /// When the task of the oldest answer held back began.
    held_since_ns: u64,
    /// The answer of the task last ended was passed through the page (see
    /// [`page::ANSWER`]), unless the pool has taken it already.
    posted: bool,
}

/// Answers held back at most: the pool sends the next tasks as answers arrive, so a
/// worker holding too many would run out of work before they come.
const HELD_MAX: u64 = 256;
/// The largest answer that may be held back (larger ones are sent at once).
const HELD_ANSWER_MAX: usize = 4096;
/// Answers held back go out before the next task begins once this long has passed since
/// the first of their tasks began: a task that took this long has its answer written before
/// the worker goes on, and brief ones are held for about this long at most. (A long task
/// begun right after brief ones keeps their answers here until it ends; the pool takes
/// them from the page meanwhile.)
const HOLD_AGE_NS: u64 = page::HOLD_AGE_NS;

impl<'p> Results<'p> {
    fn new(page: Option<&'p pool_ipc::shm::Segment>) -> Self {
        Results {
            page,
            area_words: page.map(|p| {
                (
                    p.atomic_u64(page::AREA_BYTES),
                    p.atomic_u64(page::AREA_ITEMS),
                )
            }),
            area_len: page.map_or(0, |p| {
                p.len()
                    .min(page::HELD_OFFSET)
                    .saturating_sub(page::AREA_OFFSET)
            }),
            cancels: page.is_some_and(|p| p.len() >= page::LEN),
            used: 0,
            items: 0,
            sent: 0,
            id: 0,
            timed: false,
            local: Vec::new(),
            scratch: Vec::new(),
            held_words: page
                .filter(|p| p.len() >= page::HELD_OFFSET + page::HELD_LEN)
                .map(|p| {
                    (
                        p.atomic_u64(page::HELD_COUNT),
                        p.atomic_u64(page::HELD_BYTES),
                        p.atomic_u64(page::HELD_GEN),
                    )
                }),
            held_gen: 0,
            held: 0,
            held_bytes: 0,
            answer: Vec::new(),
            began_ns: 0,
            held_since_ns: 0,
            posted: false,
        }
    }

    /// Whether the answers held back have waited long enough to go out now (see
    /// [`HOLD_AGE_NS`]).
    fn held_too_long(&self, now: u64) -> bool {
        self.held > 0 && now.saturating_sub(self.held_since_ns) >= HOLD_AGE_NS
    }

    /// Ends task `id`: its `Done` goes out now, with any held before it; or, with `hold`,
    /// is queued on the channel and kept in the page's held area (so that it survives the
    /// worker), to go out with the next write.
    ///
    /// With `post`, an answer a caller waits for, awake, is left to it in the page instead
    /// (see [`page::ANSWER`]).
    fn finish(
        &mut self,
        conn: &mut Duplex<FromWorker, ToWorker>,
        id: u64,
        outcome: Result<(), ItemError>,
        hold: bool,
        post: bool,
    ) -> Result<(), Stop> {
        if hold && self.held < HELD_MAX && self.hold(conn.sender(), id, &outcome)? {
            self.ended(id);
            return Ok(());
        }
        if post && outcome.is_ok() && self.post(id) {
            self.ended(id);
            return Ok(());
        }
        self.send_done(conn.sender(), id, outcome)?;
        self.held_sent();
        self.ended(id);
        Ok(())
    }

    /// Leaves the answer of task `id` in the result area for the caller that waits for it,
    /// awake (see [`page::ANSWER`]): `false` if none waits, or the answer is not all there
    /// (parts sent, results kept in memory, a timed task's) or answers held back must go
    /// out before it.
    fn post(&mut self, id: u64) -> bool {
        let Some(page) = self.page else {
            return false;
        };
        if self.held > 0 || self.sent > 0 || self.timed || self.id != id {
            return false;
        }
        let word = page.atomic_u64(page::ANSWER);
        // Mostly nobody waits (a map's tasks, an answer to a caller asleep): a load spares
        // those the swap.
        if word.load(Ordering::Relaxed) != id | page::WAITING {
            return false;
        }
        // The area's words were stored (release) as its items ended: the swap publishes
        // them with it.
        self.posted = word
            .compare_exchange(
                id | page::WAITING,
                id | page::POSTED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        if self.posted {
            // The caller may sleep on the bell rather than poll.
            page::bell(page).ring();
        }
        self.posted
    }

    /// Before anything else is written to the channel or to the result area: the answer
    /// left in the page, if the pool has not taken it, is taken back and written.
    fn unpost(&mut self, tx: &mut Sender<FromWorker>) -> Result<(), Stop> {
        if !std::mem::take(&mut self.posted) {
            return Ok(());
        }
        let Some(page) = self.page else {
            return Ok(());
        };
        let id = self.id;
        let mine = page
            .atomic_u64(page::ANSWER)
            .compare_exchange(id | page::POSTED, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if mine {
            self.send_done(tx, id, Ok(()))?;
        }
        Ok(())
    }

    /// Task `id` has ended, its answer written or held: the page says so.
    fn ended(&self, id: u64) {
        if let Some(w) = self.word(page::CURRENT) {
            w.store(id | page::ENDED, Ordering::Release);
        }
    }

    /// Holds back the `Done` of task `id` if it is small and the held area has room:
    /// `Ok(false)` if it does not.
    fn hold(
        &mut self,
        tx: &mut Sender<FromWorker>,
        id: u64,
        outcome: &Result<(), ItemError>,
    ) -> Result<bool, Stop> {
        let (Some(page), Some((count, bytes, _))) = (self.page, self.held_words) else {
            return Ok(false);
        };
        if outcome.is_err() || self.sent > 0 || self.used > HELD_ANSWER_MAX {
            return Ok(false);
        }
        let mut answer = std::mem::take(&mut self.answer);
        answer.clear();
        let done = FromWorker::<&serde_bytes::Bytes>::Done {
            id,
            items: self.items,
            outcome: Ok(serde_bytes::Bytes::new(self.tail())),
        };
        let fits = pool_ipc::encode_append(&mut answer, &done).is_ok()
            && answer.len() <= HELD_ANSWER_MAX
            && self.held_bytes + 4 + answer.len() <= page::HELD_LEN;
        if fits {
            // The bytes, then the count that makes them part of the held area; then onto
            // the channel's queue.
            let at = page::HELD_OFFSET + self.held_bytes;
            page.write_at(at, &(answer.len() as u32).to_le_bytes());
            page.write_at(at + 4, &answer);
            self.held_bytes += 4 + answer.len();
            if self.held == 0 {
                self.held_since_ns = self.began_ns;
            }
            self.held += 1;
            bytes.store(self.held_bytes as u64, Ordering::Release);
            count.store(self.held, Ordering::Release);
            tx.queue_pieces(&[&answer]).map_err(send_failed)?;
        }
        self.answer = answer;
        Ok(fits)
    }

    /// Writes the answers held back, if any.
    fn flush_held(&mut self, tx: &mut Sender<FromWorker>) -> Result<(), Stop> {
        if self.held > 0 {
            tx.flush().map_err(send_failed)?;
            self.held_sent();
        }
        Ok(())
    }

    /// The channel's queue was written out: no answer is held back any more. (Only
    /// after the write: an answer held that was written too is recognised as such by the
    /// pool, one lost from both is not.)
    fn held_sent(&mut self) {
        if self.held == 0 {
            return;
        }
        self.held = 0;
        self.held_bytes = 0;
        if let Some((count, _, generation)) = self.held_words {
            // The new generation first: a reader that copies what the next answers are
            // written over sees it changed (see `page::HELD_GEN`).
            self.held_gen += 1;
            generation.store(self.held_gen, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Release);
            count.store(0, Ordering::Release);
        }
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.page.map(|p| p.atomic_u64(i))
    }

    fn area_len(&self) -> usize {
        self.area_len
    }

    /// Takes up task `id`: `false` if the pool cancelled it (it counts as begun, and is
    /// skipped). Otherwise the area is the task's, and the task counts as begun.
    fn take_up(&mut self, id: u64, timed: bool, now: u64) -> bool {
        self.id = id;
        self.began_ns = now;
        self.timed = timed;
        self.used = 0;
        self.items = 0;
        self.sent = 0;
        self.local.clear();
        let Some(page) = self.page else { return true };
        // When it began, published by the store of CURRENT: a pool that sees the task
        // running sees when it began, not when the one before did.
        page.atomic_u64(page::STARTED_NS)
            .store(now, Ordering::Relaxed);
        if timed {
            // (Its items' beginnings go to STARTED_NS.)
            page.atomic_u64(page::TAKEN_NS)
                .store(now, Ordering::Relaxed);
        }
        // Store-then-load against the pool's store of a cancel slot (and of MARKED) then
        // load of CURRENT: either we see its mark, or it sees that we took the task up.
        page.atomic_u64(page::CURRENT).store(id, Ordering::SeqCst);
        let cancelled = self.cancels
            && page.atomic_u64(page::MARKED).load(Ordering::SeqCst) != 0
            && (0..page::CANCEL_PROBES).any(|k| {
                page.atomic_u64(page::cancel_slot(id, k))
                    .load(Ordering::SeqCst)
                    == id
            });
        if cancelled {
            page.atomic_u64(page::CURRENT)
                .store(id | page::ENDED | page::SKIPPED, Ordering::Release);
        } else {
            page.atomic_u64(page::AREA_ITEMS)
                .store(0, Ordering::Relaxed);
            page.atomic_u64(page::AREA_BYTES)
                .store(0, Ordering::Relaxed);
            page.atomic_u64(page::AREA_BASE).store(0, Ordering::Relaxed);
            page.atomic_u64(page::AREA_TASK)
                .store(id, Ordering::Relaxed);
        }
        page.atomic_u64(page::BEGUN).fetch_add(1, Ordering::Release);
        !cancelled
    }

    fn sink<'a>(&'a mut self, tx: &'a mut Sender<FromWorker>) -> AreaSink<'a, 'p> {
        AreaSink {
            results: self,
            tx,
            lost: false,
        }
    }

    /// The results not sent in parts, one after the other.
    fn tail(&mut self) -> &[u8] {
        match self.page {
            Some(page) => {
                self.local.clear();
                page.read_to_vec(page::AREA_OFFSET, self.used, &mut self.local);
                &self.local
            }
            None => &self.local,
        }
    }

    /// Sends the task's `Done`.
    fn send_done(
        &mut self,
        tx: &mut Sender<FromWorker>,
        id: u64,
        outcome: Result<(), ItemError>,
    ) -> Result<(), Stop> {
        let (items, outcome) = match outcome {
            Ok(()) => (self.items, Ok(())),
            Err(e) => (0, Err(e)),
        };
        let done = FromWorker::<&serde_bytes::Bytes>::Done {
            id,
            items,
            outcome: outcome.map(|()| serde_bytes::Bytes::new(self.tail())),
        };
        if let Err(e) = tx.send_frame_of(&done) {
            match e.kind() {
                IpcKind::Io | IpcKind::Closed => return Err(Stop::Lost),
                // Too large, or unencodable: the batch fails, the worker lives on.
                _ => {
                    let outcome = Err(ItemError::new(
                        ItemErrorKind::Encode,
                        format!("the batch's results cannot be sent: {}", Chain(&e)),
                    ));
                    let done = FromWorker::<&serde_bytes::Bytes>::Done {
                        id,
                        items: 0,
                        outcome,
                    };
                    tx.send_frame_of(&done).map_err(send_failed)?;
                }
            }
        }
        Ok(())
    }
}

/// The [`ItemSink`] of a running task: see [`Results`].
struct AreaSink<'a, 'p> {
    results: &'a mut Results<'p>,
    tx: &'a mut Sender<FromWorker>,
    /// Sending a part failed: the parent is gone.
    lost: bool,
}

impl AreaSink<'_, '_> {
    /// Sends `bytes` (`items` results) as a part of the running task.
    fn send_part(&mut self, items: u64, bytes: &[u8]) {
        self.send_part_pieces(items, bytes, &[]);
    }

    /// Sends `head` then `tail` (`items` results in all) as a part of the running task,
    /// each copied once, straight into the frame.
    fn send_part_pieces(&mut self, items: u64, head: &[u8], tail: &[u8]) {
        let part = protocol::part_head(self.results.id, items, head.len() + tail.len());
        if self.tx.send_pieces(&[&part, head, tail]).is_err() {
            self.lost = true;
        } else {
            // The answers held back went out before it.
            self.results.held_sent();
        }
        self.results.sent += items;
    }

    /// Sends one item's result, `head` then the large `tail`, as a part in two frames
    /// ([`FromWorker::PartTail`]): the tail's bytes go into a frame of their own (through
    /// the shared ring), so that the pool receives them in a buffer that becomes the
    /// result as it is.
    fn send_part_tail(&mut self, head: &[u8], tail: &[u8]) {
        let msg = FromWorker::<&serde_bytes::Bytes>::PartTail {
            id: self.results.id,
            head: serde_bytes::Bytes::new(head),
            len: tail.len() as u64,
        };
        if self.tx.feed_frame_of(&msg).is_err() || self.tx.send_pieces(&[tail]).is_err() {
            self.lost = true;
        } else {
            // The answers held back went out before it.
            self.results.held_sent();
        }
        self.results.sent += 1;
    }

    /// Sends the results not sent yet (the area's, or those kept in memory without a
    /// page) as a part.
    fn flush_pending(&mut self) {
        if self.results.page.is_some() {
            self.flush_area();
            return;
        }
        let r = &mut *self.results;
        if r.items == 0 {
            return;
        }
        let items = r.items;
        let bytes = std::mem::take(&mut r.local);
        self.send_part(items, &bytes);
        let r = &mut *self.results;
        r.local = bytes;
        r.local.clear();
        r.items = 0;
    }

    /// Sends the area's results as a part and empties it.
    fn flush_area(&mut self) {
        let r = &mut *self.results;
        let Some(page) = r.page else { return };
        if r.items == 0 {
            return;
        }
        let items = r.items;
        r.local.clear();
        page.read_to_vec(page::AREA_OFFSET, r.used, &mut r.local);
        let bytes = std::mem::take(&mut r.local);
        self.send_part(items, &bytes);
        let r = &mut *self.results;
        r.local = bytes;
        r.used = 0;
        r.items = 0;
        // Sent, then emptied: a pool that finds the area's base behind the parts it
        // received knows the area's items were sent.
        page.atomic_u64(page::AREA_ITEMS)
            .store(0, Ordering::Release);
        page.atomic_u64(page::AREA_BYTES)
            .store(0, Ordering::Release);
        page.atomic_u64(page::AREA_BASE)
            .store(r.sent, Ordering::Release);
    }
}

impl ItemSink for AreaSink<'_, '_> {
    fn begin(&mut self) {
        if self.results.timed
            && let Some(w) = self.results.word(page::STARTED_NS)
        {
            w.store(protocol::monotonic_ns(), Ordering::Release);
        }
    }

    fn scratch(&mut self) -> &mut Vec<u8> {
        self.results.scratch.clear();
        &mut self.results.scratch
    }

    fn commit(&mut self) {
        self.commit_with(&[]);
    }

    fn direct(&mut self) -> Option<task::Direct<'_>> {
        let r = &mut *self.results;
        // A timed task's items each note when they begin (`begin`); a lost parent takes
        // nothing more.
        if r.timed || self.lost {
            return None;
        }
        let (page, words) = (r.page?, r.area_words?);
        Some(task::Direct {
            scratch: &mut r.scratch,
            seg: page,
            offset: page::AREA_OFFSET,
            len: r.area_len,
            used: &mut r.used,
            items: &mut r.items,
            words,
        })
    }

    fn commit_with(&mut self, tail: &[u8]) {
        if protocol::collected_any() {
            let fds = protocol::take_collected_so_far();
            if self.lost {
                return;
            }
            // The descriptors travel with a frame, not through the result area (which
            // survives the worker, while they would not): the results before this one go
            // first, then this one alone, with its descriptors.
            self.flush_pending();
            let r = &mut *self.results;
            let scratch = std::mem::take(&mut r.scratch);
            let part = protocol::part_head(r.id, 1, scratch.len() + tail.len());
            if self
                .tx
                .send_pieces_with_fds(&[&part, &scratch, tail], fds)
                .is_err()
            {
                self.lost = true;
            } else {
                // The answers held back went out before it.
                self.results.held_sent();
            }
            let r = &mut *self.results;
            r.scratch = scratch;
            r.sent += 1;
            if let Some(page) = r.page {
                page.atomic_u64(page::AREA_BASE)
                    .store(r.sent, Ordering::Release);
            }
            return;
        }
        if self.lost {
            return;
        }
        let Some(page) = self.results.page else {
            let r = &mut *self.results;
            r.local.extend_from_slice(&r.scratch);
            r.local.extend_from_slice(tail);
            r.items += 1;
            return;
        };
        let n = self.results.scratch.len() + tail.len();
        if self.results.used + n > self.results.area_len() {
            self.flush_area();
            if n > self.results.area_len() {
                // Larger than the whole area: straight out.
                let scratch = std::mem::take(&mut self.results.scratch);
                if tail.len() > protocol::SHM_THRESHOLD {
                    self.send_part_tail(&scratch, tail);
                } else {
                    self.send_part_pieces(1, &scratch, tail);
                }
                self.results.scratch = scratch;
                page.atomic_u64(page::AREA_BASE)
                    .store(self.results.sent, Ordering::Release);
                return;
            }
        }
        let r = &mut *self.results;
        page.write_at(page::AREA_OFFSET + r.used, &r.scratch);
        page.write_at(page::AREA_OFFSET + r.used + r.scratch.len(), tail);
        r.used += n;
        r.items += 1;
        // Bytes first, then the count that makes them part of the area.
        if let Some((bytes, items)) = r.area_words {
            bytes.store(r.used as u64, Ordering::Release);
            items.store(r.items, Ordering::Release);
        }
    }
}

/// Runs task `id` of `func` on `payload` (unless it was cancelled before it began), with
/// `fds`, the descriptors passed with it.
fn run_task(
    results: &mut Results<'_>,
    tx: &mut Sender<FromWorker>,
    same: &protocol::SameImage,
    (id, func, timed): (u64, task::FnRef, bool),
    payload: &[u8],
    fds: Vec<std::os::fd::OwnedFd>,
) -> Step {
    // An answer left in the page and not taken goes out first, before the area is reused.
    if results.unpost(tx).is_err() {
        return Step::Lost;
    }
    let now = protocol::monotonic_ns();
    // No answer waits long: those held back since a task that began HOLD_AGE_NS ago go out
    // first.
    if results.held_too_long(now) && results.flush_held(tx).is_err() {
        return Step::Lost;
    }
    if !results.take_up(id, timed, now) {
        return Step::Done(Reply::Skipped(id));
    }
    // The events among the arguments open from these (closed after the task).
    let _passed = protocol::passing(fds);
    let mut sink = results.sink(tx);
    // Descriptors the results pass (shared bytes, say) go with them.
    protocol::start_collecting();
    let outcome = task::call_batch(same, func, payload, &mut sink);
    drop(protocol::take_collected());
    if sink.lost {
        return Step::Lost;
    }
    Step::Done(Reply::Done(id, outcome))
}

/// What handling one request came to.
enum Step {
    /// A `RunTail` (its task, head and descriptors): its tail frame is to be read next.
    Tail((u64, task::FnRef, bool), Vec<u8>, Vec<std::os::fd::OwnedFd>),
    /// Exit (asked to, or the parent closed the channel).
    Exit,
    /// A task was taken up: what to answer.
    Done(Reply),
    /// The parent went away while the task sent results.
    Lost,
    /// A request that makes no sense here.
    Bad(String),
}

/// The answer to a `Run`.
enum Reply {
    /// It ran: its id and whether the batch as a whole worked.
    Done(u64, Result<(), ItemError>),
    /// It was cancelled before it began.
    Skipped(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{VecSink, run_local};

    /// Panics on 3, returns a large byte string on 5, a small one otherwise.
    fn mixed(x: u32) -> serde_bytes::ByteBuf {
        assert!(x != 3, "three");
        let len = if x == 5 { 40_000 } else { x as usize };
        serde_bytes::ByteBuf::from(vec![x as u8; len])
    }

    /// What a worker with a result area of `area` bytes sends and keeps for a batch of
    /// `input`: the results of its parts, then those left in the area.
    fn through_area(area: usize, input: &[u8]) -> (u64, Vec<u8>) {
        let seg =
            pool_ipc::shm::Segment::create("procpool-test-area", page::AREA_OFFSET + area).unwrap();
        let (mut conn, mut peer) = pool_ipc::duplex::<FromWorker, ToWorker>().unwrap();
        let mut results = Results::new(Some(&seg));
        assert!(results.take_up(1, false, 0));
        let mut sink = results.sink(conn.sender());
        run_local(mixed, input, &mut sink).unwrap();
        assert!(!sink.lost);
        let (mut items, mut bytes) = (0, Vec::new());
        // Each part in its own frame; the tail of a `PartTail` is the frame after it.
        while results.sent > items {
            match peer.recv().unwrap() {
                FromWorker::Part {
                    items: n, results, ..
                } => {
                    items += n;
                    bytes.extend_from_slice(&results);
                }
                FromWorker::PartTail { head, len, .. } => {
                    items += 1;
                    bytes.extend_from_slice(&head);
                    let tail = peer.recv_frame().unwrap();
                    assert_eq!(tail.len() as u64, len);
                    bytes.extend_from_slice(&tail);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let tail = results.tail().to_vec();
        bytes.extend_from_slice(&tail);
        (items + results.items, bytes)
    }

    #[test]
    fn results_kept_in_the_area_are_those_a_plain_sink_gets_whatever_its_room() {
        let items: Vec<(u32,)> = (0..40).map(|x| (x % 9,)).collect();
        let input = postcard::to_allocvec(&items).unwrap();
        let mut plain = VecSink::default();
        run_local(mixed, &input, &mut plain).unwrap();
        assert_eq!(plain.items, 40);
        // Room for every result, for a few, for none.
        for area in [1 << 20, 64, 9, 1] {
            let (n, bytes) = through_area(area, &input);
            assert_eq!(n, 40, "area of {area} bytes");
            assert!(bytes == plain.out, "area of {area} bytes: other results");
        }
    }

    #[test]
    fn an_item_that_does_not_decode_fails_the_rest_of_its_batch_in_the_area_too() {
        // Three items announced, two present and a stray byte: the third does not decode.
        let mut input = postcard::to_allocvec(&vec![(1u32,), (2,), (4,)]).unwrap();
        input.truncate(input.len() - 1);
        input.push(0xff);
        let mut plain = VecSink::default();
        run_local(mixed, &input, &mut plain).unwrap();
        let (n, bytes) = through_area(1 << 20, &input);
        assert_eq!((n, plain.items), (3, 3));
        assert!(bytes == plain.out);
    }

    #[test]
    fn an_idle_worker_takes_a_task_from_its_page_or_reads_its_channel_when_told() {
        let seg = pool_ipc::shm::Segment::create("procpool-test-door", page::LEN).unwrap();
        let door = seg.atomic_u32(page::DOOR);
        let sent = seg.atomic_u64(page::SENT);
        let mut task = Vec::new();
        // Bytes buffered (or a chore for idle moments): the channel, at once.
        assert!(!door_wait(&seg, true, 0, &mut task));
        assert_eq!(door.load(Ordering::SeqCst), page::RECEIVING);
        // The pool wrote more than the worker read: the channel, without sleeping.
        sent.store(10, Ordering::SeqCst);
        let t = Instant::now();
        assert!(!door_wait(&seg, false, 4, &mut task));
        assert!(t.elapsed() < Duration::from_nanos(page::DOOR_WAIT_NS));
        assert_eq!(door.load(Ordering::SeqCst), page::RECEIVING);
        // Nothing comes: asleep for the wait's length, then the channel.
        let t = Instant::now();
        assert!(!door_wait(&seg, false, 10, &mut task));
        assert!(t.elapsed() >= Duration::from_nanos(page::DOOR_WAIT_NS));
        let asleep = || {
            while door.load(Ordering::SeqCst) != page::SLEEPING {
                std::thread::yield_now();
            }
        };
        // As the pool does: from SLEEPING to `to`, then the wake.
        let wake_to = |to: u32| {
            let swapped =
                door.compare_exchange(page::SLEEPING, to, Ordering::SeqCst, Ordering::SeqCst);
            assert!(swapped.is_ok());
            pool_ipc::shm::futex_wake(door, 1).unwrap();
        };
        // A task left in the page while it sleeps: taken, the doorbell awake again.
        std::thread::scope(|s| {
            s.spawn(|| {
                asleep();
                seg.write_at(page::TASK_OFFSET, b"a task");
                seg.atomic_u64(page::TASK_LEN).store(6, Ordering::Relaxed);
                wake_to(page::RUNG);
            });
            assert!(door_wait(&seg, false, 10, &mut task));
        });
        assert_eq!(task, b"a task");
        assert_eq!(door.load(Ordering::SeqCst), page::AWAKE);
        // Woken by a write to its channel: it reads the channel, long before the wait's end.
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                asleep();
                sent.store(20, Ordering::SeqCst);
                wake_to(page::AWAKE);
            });
            assert!(!door_wait(&seg, false, 10, &mut task));
        });
        assert!(t.elapsed() < Duration::from_nanos(page::DOOR_WAIT_NS));
        assert_eq!(door.load(Ordering::SeqCst), page::RECEIVING);
    }

    #[test]
    fn an_answer_is_left_in_the_page_only_for_a_caller_waiting_awake_and_written_if_not_taken() {
        let seg = pool_ipc::shm::Segment::create("procpool-test-post", page::LEN).unwrap();
        let (mut conn, mut peer) = pool_ipc::duplex::<FromWorker, ToWorker>().unwrap();
        let answer = seg.atomic_u64(page::ANSWER);
        let mut results = Results::new(Some(&seg));
        let items = postcard::to_allocvec(&vec![(2u32,)]).unwrap();
        let run = |results: &mut Results<'_>, conn: &mut Duplex<FromWorker, ToWorker>, id| {
            assert!(results.unpost(conn.sender()).is_ok());
            assert!(results.take_up(id, false, 0));
            let mut sink = results.sink(conn.sender());
            run_local(mixed, &items, &mut sink).unwrap();
            assert!(results.finish(conn, id, Ok(()), false, true).is_ok());
        };
        let nothing_sent = |peer: &mut Duplex<ToWorker, FromWorker>| {
            !peer.receiver().wait_timeout(Duration::ZERO).unwrap()
        };
        // Nobody waits: written.
        run(&mut results, &mut conn, 1);
        assert!(matches!(
            peer.recv().unwrap(),
            FromWorker::Done { id: 1, .. }
        ));
        // A caller waits: left in the page, the area holding its results.
        answer.store(2 | page::WAITING, Ordering::SeqCst);
        run(&mut results, &mut conn, 2);
        assert!(nothing_sent(&mut peer));
        assert_eq!(answer.load(Ordering::SeqCst), 2 | page::POSTED);
        assert_eq!(seg.atomic_u64(page::AREA_TASK).load(Ordering::SeqCst), 2);
        assert_eq!(seg.atomic_u64(page::AREA_ITEMS).load(Ordering::SeqCst), 1);
        // Taken by the pool: never written.
        answer.store(0, Ordering::SeqCst);
        answer.store(3 | page::WAITING, Ordering::SeqCst);
        run(&mut results, &mut conn, 3);
        assert!(nothing_sent(&mut peer));
        // Not taken before the next task: written first, then the next one's.
        run(&mut results, &mut conn, 4);
        assert_eq!(answer.load(Ordering::SeqCst), 0);
        assert!(matches!(
            peer.recv().unwrap(),
            FromWorker::Done {
                id: 3,
                items: 1,
                ..
            }
        ));
        assert!(matches!(
            peer.recv().unwrap(),
            FromWorker::Done { id: 4, .. }
        ));
        assert!(nothing_sent(&mut peer));
    }
}
