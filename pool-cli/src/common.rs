//! What `procpool run` and `procpool map` share: reading the input on a thread of its own,
//! Ctrl-C, starting the pool and hearing from its tasks, the progress bar, the summary line
//! and the exit status.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use procpool::{Options, Pool, PoolBuilder};

/// Exit status for a usage error (as GNU parallel).
pub(crate) const EXIT_USAGE: u8 = 255;
/// The largest exit status that counts failed jobs (as GNU parallel).
pub(crate) const EXIT_MAX_FAILED: u64 = 101;

/// What the main loop of `run` and `map` waits for: every source sends into one channel.
#[derive(Debug)]
pub(crate) enum Ev {
    /// The next input item.
    Item(Vec<u8>),
    /// The input ended; with a message if reading it failed.
    InputEnd(Option<String>),
    /// The pool finished the task with this key (its result is ready to take).
    Done(u64),
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
}

/// The options `procpool run` and `procpool map` share word for word (flattened last,
/// before CMD, where each command's help lists them).
#[derive(Debug, clap::Args)]
pub(crate) struct SharedArgs {
    /// No progress bar, no summary line.
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// How the pool starts its workers.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) start_method: crate::Method,
}

/// Says `procpool CMD: MESSAGE` on stderr; the exit status of a usage error.
pub(crate) fn usage_error(cmd: &str, message: &str) -> ExitCode {
    eprintln!("procpool {cmd}: {message}");
    ExitCode::from(EXIT_USAGE)
}

/// A pool builder with the chosen start method and, when given, `jobs` workers. The
/// workers may be forks of this process although it runs threads (the input and signal
/// threads).
pub(crate) fn pool_builder(method: crate::Method, jobs: Option<usize>) -> PoolBuilder {
    let builder = Pool::builder()
        .start_method(method.into())
        .allow_fork_with_threads(true);
    match jobs {
        Some(j) => builder.processes(j),
        None => builder,
    }
}

/// Builds the pool of `procpool CMD`; a failure is a usage error, said as `cannot start
/// WHAT: ...`.
pub(crate) fn start_pool(builder: PoolBuilder, cmd: &str, what: &str) -> Result<Pool, ExitCode> {
    builder
        .build()
        .map_err(|e| usage_error(cmd, &format!("cannot start {what}: {e}")))
}

/// Task options whose callbacks send [`Ev::Done`]`(key)` when the task ends, whichever way.
pub(crate) fn notify_done<T>(tx: &Sender<Ev>, key: u64) -> Options<T> {
    let (tx1, tx2) = (tx.clone(), tx.clone());
    Options::new()
        .on_success(move |_| {
            let _ = tx1.send(Ev::Done(key));
        })
        .on_error(move |_| {
            let _ = tx2.send(Ev::Done(key));
        })
}

/// The next event of the main loop: one already waiting, else (after `before_waiting`,
/// which flushes what is buffered) the next one to come; `None` once every sender is gone.
pub(crate) fn next_event(rx: &Receiver<Ev>, before_waiting: impl FnOnce()) -> Option<Ev> {
    match rx.try_recv() {
        Ok(ev) => Some(ev),
        Err(_) => {
            before_waiting();
            rx.recv().ok()
        }
    }
}

/// Input items read ahead of the workers: at most this many...
const READ_AHEAD_ITEMS: usize = 100_000;
/// ... and this many bytes (one item may be larger).
const READ_AHEAD_BYTES: usize = 256 << 20;

/// Items read but not yet taken by the main loop, so that the reader stays a bounded
/// distance ahead (an endless input works; a file's total is known early).
#[derive(Debug, Default)]
pub(crate) struct Gate {
    held: Mutex<(usize, usize)>,
    freed: Condvar,
}

impl Gate {
    fn admit(&self, len: usize) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.0 >= READ_AHEAD_ITEMS || (held.0 > 0 && held.1 >= READ_AHEAD_BYTES) {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.0 += 1;
        held.1 += len;
    }

    /// The main loop took an item of `len` bytes.
    pub(crate) fn taken(&self, len: usize) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 = held.0.saturating_sub(1);
        held.1 = held.1.saturating_sub(len);
        self.freed.notify_one();
    }
}

/// Opens the input: `path` (`--arg-file`; `-` is stdin) or stdin.
pub(crate) fn open_input(path: Option<&Path>) -> Result<Box<dyn Read + Send>, String> {
    match path {
        None => Ok(Box::new(std::io::stdin())),
        Some(p) if p == Path::new("-") => Ok(Box::new(std::io::stdin())),
        Some(p) => match std::fs::File::open(p) {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_dir()) => {
                Err(format!("cannot read {}: it is a directory", p.display()))
            }
            Ok(f) => Ok(Box::new(f)),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        },
    }
}

/// Reads `input` on a thread: one [`Ev::Item`] per `sep`-terminated item (the last one may
/// lack it), then [`Ev::InputEnd`].
pub(crate) fn spawn_reader(input: Box<dyn Read + Send>, sep: u8, tx: Sender<Ev>) -> Arc<Gate> {
    let gate = Arc::new(Gate::default());
    let g = Arc::clone(&gate);
    std::thread::Builder::new()
        .name("procpool-input".into())
        .spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, input);
            loop {
                let mut item = Vec::new();
                match r.read_until(sep, &mut item) {
                    Ok(0) => {
                        let _ = tx.send(Ev::InputEnd(None));
                        return;
                    }
                    Ok(_) => {
                        if item.last() == Some(&sep) {
                            item.pop();
                        }
                        g.admit(item.len());
                        if tx.send(Ev::Item(item)).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::InputEnd(Some(format!("reading the input: {e}"))));
                        return;
                    }
                }
            }
        })
        .expect("start the input thread");
    gate
}

/// Sends SIGINT, SIGTERM and SIGHUP to the main loop as [`Ev::Signal`]; from the second
/// one on, the returned flag is set ("hurry": kill at once).
pub(crate) fn watch_signals(tx: Sender<Ev>) -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let hurry = Arc::new(AtomicBool::new(false));
    let h = Arc::clone(&hurry);
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("procpool-signals".into())
                .spawn(move || {
                    let mut seen = 0;
                    for sig in signals.forever() {
                        seen += 1;
                        if seen >= 2 {
                            h.store(true, Ordering::SeqCst);
                        }
                        let _ = tx.send(Ev::Signal(sig));
                    }
                })
                .expect("start the signal thread");
        }
        Err(e) => eprintln!("procpool: cannot watch for Ctrl-C ({e}); it will kill at once"),
    }
    hurry
}

/// Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 30s, 500ms, 2m, 1h)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?}: a timeout must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checks that `program` can be started: an executable file, found through `PATH` when
/// the name has no `/`. Returns its path (so that each job does not search `PATH` again).
pub(crate) fn check_program(program: &OsStr) -> Result<PathBuf, String> {
    let shown = String::from_utf8_lossy(program.as_bytes()).into_owned();
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_bytes().contains(&b'/') {
        return if runnable(Path::new(program)) {
            Ok(PathBuf::from(program))
        } else if Path::new(program).exists() {
            Err(format!("cannot run {shown}: not an executable file"))
        } else {
            Err(format!("cannot run {shown}: no such file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("cannot run {shown}: command not found in PATH"))
}

/// The text of an input item or output for messages and JSON (lossy UTF-8).
pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A short quote of an item for messages: at most 60 characters.
pub(crate) fn preview(b: &[u8]) -> String {
    let t = text(b);
    if t.chars().count() > 60 {
        let cut: String = t.chars().take(57).collect();
        format!("{cut:?}... ({} bytes)", b.len())
    } else {
        format!("{t:?}")
    }
}

/// Counters shown on the progress bar and in the summary.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub(crate) done: u64,
    pub(crate) failed: u64,
    pub(crate) retries: u64,
    pub(crate) restarts: u64,
    pub(crate) recycles: u64,
    pub(crate) not_run: u64,
}

/// The progress bar on stderr when it is a terminal (hidden otherwise).
#[derive(Debug)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    counted: bool,
}

impl Progress {
    pub(crate) fn new(show: bool) -> Progress {
        if !show || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                counted: false,
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(8));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {pos} done  {per_sec}  {msg}")
                .expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(125));
        Progress {
            bar: Some(bar),
            counted: false,
        }
    }

    /// The total is known (the input ended).
    pub(crate) fn set_total(&mut self, total: u64) {
        if let Some(bar) = &self.bar
            && !self.counted
        {
            self.counted = true;
            bar.set_length(total);
            bar.set_style(
                ProgressStyle::with_template("[{bar:30}] {pos}/{len}  {per_sec}  ETA {eta}  {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
        }
    }

    pub(crate) fn update(&self, t: &Tally) {
        if let Some(bar) = &self.bar {
            bar.set_position(t.done);
            bar.set_message(format!(
                "{} failed, {} retries, {} restarts",
                t.failed, t.retries, t.restarts
            ));
        }
    }

    /// Runs `f` (which writes to the terminal) with the bar out of the way.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The summary line on stderr.
pub(crate) fn summary(
    cmd: &str,
    noun: &str,
    t: &Tally,
    wall: Duration,
    stopped_by: Option<i32>,
) -> String {
    let mut s = format!(
        "procpool {cmd}: {} {noun}, {} failed, {} retries, {} restarts, {} recycles, {:.2} s",
        t.done,
        t.failed,
        t.retries,
        t.restarts,
        t.recycles,
        wall.as_secs_f64()
    );
    if let Some(sig) = stopped_by {
        s.push_str(&format!(
            "; stopped by {} ({} not run or not finished)",
            crate::proc::signal_name(sig),
            t.not_run
        ));
    } else if t.not_run > 0 {
        s.push_str(&format!("; {} not run", t.not_run));
    }
    s
}

/// The exit status: 128 + the signal that stopped the run, else the failed jobs (not-run
/// ones included) capped at 101.
pub(crate) fn exit_code(t: &Tally, stopped_by: Option<i32>) -> u8 {
    match stopped_by {
        Some(sig) => (128 + sig).clamp(0, 255) as u8,
        None => (t.failed + t.not_run).min(EXIT_MAX_FAILED) as u8,
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Creates an output file (`--joblog`).
pub(crate) fn create_file(p: &PathBuf) -> Result<std::fs::File, String> {
    std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))
}
