//! `procpool map`: persistent workers in any language, with Python's Pool semantics.
//!
//! Each pool worker keeps one child running CMD (the "worker command"), started by the
//! pool's initializer (so a replacement starts it while the worker it replaces finishes),
//! and feeds it the lines of each task it gets, [`map_chunk`]: one line in, one line out.
//! Recycling (`--max-tasks-per-child`) is the pool's own: the pool worker's last task ends
//! its worker command. The worker command runs in a process group of its own; a timeout
//! or a fault ends the whole group, and the next line gets a fresh worker command.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use procpool::{AsyncResult, TaskErrorKind};
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::common::{self, Ev, Progress, Tally};
use crate::proc::{self, Ended, Watched};

pub(crate) const HELP: &str = "\
CMD is started once per worker (-j of them) and kept running: a persistent worker, in any
language. Any command works, `ssh HOST worker.py` included: that is how to spread workers
over several hosts (one -j slot per ssh connection).

Protocol (--framing lines, the default): procpool writes one task per line on the worker's
stdin; the worker writes exactly one line per task on its stdout, in the same order, and
flushes it (Python: print(result, flush=True)), and nothing else: a banner or a log line
on stdout would be taken for an answer (log to stderr, which goes to procpool's stderr).
A worker may answer the lines it has read in a batch and flush once.
At end of input the worker's stdin is closed: it should exit then.
    import sys
    for line in sys.stdin:
        print(line.rstrip('\\n').upper(), flush=True)
--framing length, for payloads holding newlines: each task and each reply is its length in
bytes as a decimal number on a line of its own, then exactly that many bytes.

Input: one task per line of stdin (or --arg-file; NUL-separated with -0). Output: one line
per input, in input order (completion order with --unordered); with -0, NUL-terminated.
A task that fails prints an empty line in its place, and a message on stderr.
--json: one JSON record per input instead: seq, input, ok, output, error, pid (of the
worker command), attempts, duration_s, exit_code and signal (of a worker that died).

A worker command that exits, is killed, runs past --timeout on a task (its process group
gets SIGTERM, then SIGKILL 0.5 s later), or writes output nobody asked for or that breaks
the framing fails the task it was working on; it is replaced by a fresh one, and that task
runs again on a fresh worker, up to --retries times, then is reported with the input line
and the exit code or signal. Lines it had not started are sent to a fresh worker. A worker
command that keeps exiting before answering anything (three lines in a row) stops the run.
--max-tasks-per-child K: each worker command handles at most K tasks, then its stdin is
closed and it is replaced (tasks then go one at a time).
--init CMD: a shell command run before each worker command starts (in the same place);
if it keeps failing, the run stops.

A progress bar is drawn on stderr when it is a terminal; a summary line ends the run.
Ctrl-C (or SIGTERM) stops handing out tasks, ends every worker and worker command, prints
the summary and exits 130 (143); a second Ctrl-C kills at once.

Exit status: 0 if every task succeeded; otherwise the number of failed tasks, at most 101;
128+N when stopped by signal N (130 for Ctrl-C); 255 for a usage error (bad option, CMD
not found, unreadable --arg-file).";

/// How tasks and replies are delimited on the worker command's stdin and stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub(crate) enum Framing {
    /// One line per task and per reply.
    #[default]
    Lines,
    /// A line with the length in bytes, then the bytes.
    Length,
}

/// Options of `procpool map`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = HELP)]
pub(crate) struct Args {
    /// Worker commands to keep running [default: the usable CPUs].
    #[arg(short = 'j', long = "jobs", value_name = "N")]
    jobs: Option<usize>,
    /// Replace a worker command after it has handled K tasks.
    #[arg(long, value_name = "K")]
    max_tasks_per_child: Option<u64>,
    /// Kill a worker command (its whole process group) that takes longer than this on one
    /// task: 30s, 500ms, 2m.
    #[arg(long, value_parser = common::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// Run a task whose worker died, timed out or misbehaved again, up to R more times.
    #[arg(long, default_value_t = 0, value_name = "R")]
    retries: u32,
    /// Print results as they come, not in input order.
    #[arg(long)]
    unordered: bool,
    /// Print one JSON record per input instead of the bare output.
    #[arg(long)]
    json: bool,
    /// A shell command run before each worker command starts.
    #[arg(long, value_name = "CMD")]
    init: Option<String>,
    /// How tasks and replies are delimited on the worker's stdin and stdout.
    #[arg(long, value_enum, default_value_t)]
    framing: Framing,
    /// Read the tasks from FILE instead of stdin.
    #[arg(short = 'a', long, value_name = "FILE")]
    arg_file: Option<PathBuf>,
    /// Tasks (and results) are separated by NUL bytes, not newlines.
    #[arg(short = '0', long)]
    null: bool,
    /// Lines handed to a worker at once [default: adapts to how long tasks take].
    #[arg(long, value_name = "N")]
    chunk_size: Option<usize>,
    #[command(flatten)]
    shared: common::SharedArgs,
    /// The worker command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// What each pool worker needs to run its worker command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct WorkerConfig {
    argv: Vec<ByteBuf>,
    /// Where `argv[0]` was found.
    path: ByteBuf,
    framing: Framing,
    timeout_ms: Option<u64>,
    init: Option<String>,
    /// The pool's max_tasks_per_child: the task that reaches it ends the worker command.
    tasks_per_child: Option<u64>,
}

/// How one line went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum LineResult {
    Ok {
        out: ByteBuf,
        pid: u32,
        secs: f64,
    },
    Failed {
        error: String,
        pid: u32,
        secs: f64,
        ended: Option<Ended>,
        /// The worker command had answered nothing before (it may exit at once on start).
        fresh: bool,
    },
    /// Not sent, or sent to a worker command that failed before reaching it.
    NotRun,
}

/// How one task (a chunk of lines) went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ChunkOutcome {
    results: Vec<LineResult>,
    /// Worker commands started to replace one that failed.
    restarts: u32,
    /// The worker command was ended after its last task (`--max-tasks-per-child`).
    recycled: bool,
    /// Faults that no line is to blame for (output written between tasks).
    notes: Vec<String>,
}

/// A running worker command.
struct Foreign {
    w: Watched,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    rbuf: Vec<u8>,
    /// See [`parse_reply`].
    scanned: usize,
    answered: u64,
}

struct WorkerState {
    cfg: WorkerConfig,
    fw: Option<Foreign>,
    tasks: u64,
}

/// The pool worker's state: its config and its worker command.
static STATE: Mutex<Option<WorkerState>> = Mutex::new(None);

/// Replies larger than this are a fault (a worker that never writes a newline, or a
/// length line gone wrong).
const MAX_REPLY: usize = 1 << 30;

fn spawn_foreign(cfg: &WorkerConfig) -> Result<Foreign, String> {
    let Some((program, args)) = cfg.argv.split_first() else {
        return Err("empty worker command".into());
    };
    let mut child = Command::new(OsStr::from_bytes(&cfg.path))
        .arg0(OsStr::from_bytes(program))
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", common::preview(program)))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let _ = rustix::io::ioctl_fionbio(stdin.as_fd(), true);
    let _ = rustix::io::ioctl_fionbio(stdout.as_fd(), true);
    let w = Watched::new(child).map_err(|e| format!("cannot watch the worker command: {e}"))?;
    Ok(Foreign {
        w,
        stdin: Some(stdin),
        stdout,
        rbuf: Vec::new(),
        scanned: 0,
        answered: 0,
    })
}

/// The pool's initializer: runs `--init`, then starts the worker command.
pub(crate) fn map_init(cfg: WorkerConfig) -> Result<(), String> {
    if let Some(init) = &cfg.init {
        // Its output goes to stderr: this process's stdout is procpool's results.
        let to_stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())?;
        let st = Command::new("/bin/sh")
            .args(["-c", init])
            .stdin(Stdio::null())
            .stdout(Stdio::from(to_stderr))
            .status()
            .map_err(|e| format!("cannot run the --init command: {e}"))?;
        if !st.success() {
            return Err(format!(
                "the --init command {init:?} {}",
                Ended::from_status(st)
            ));
        }
    }
    let fw = spawn_foreign(&cfg)?;
    *STATE.lock().unwrap_or_else(PoisonError::into_inner) = Some(WorkerState {
        cfg,
        fw: Some(fw),
        tasks: 0,
    });
    Ok(())
}

enum Fault {
    Died,
    Closed,
    Timeout,
    Garbage(String),
}

/// Takes one complete reply off `buf[*pos..]`, moving `*pos` past it: `Ok(None)` if it is
/// not all there. `scanned`: how many bytes from `*pos` on are known to hold no newline (so
/// that a long reply arriving in many reads is scanned once, not once per read). The caller
/// drops the bytes before `*pos` once it has taken every reply (one move per read, not one
/// per reply).
fn parse_reply<'b>(
    buf: &'b [u8],
    pos: &mut usize,
    scanned: &mut usize,
    framing: Framing,
) -> Result<Option<&'b [u8]>, String> {
    let rest = &buf[*pos..];
    let from = (*scanned).min(rest.len());
    let newline = rest[from..]
        .iter()
        .position(|&c| c == b'\n')
        .map(|i| i + from);
    *scanned = if newline.is_some() { 0 } else { rest.len() };
    match framing {
        Framing::Lines => match newline {
            Some(i) => {
                *pos += i + 1;
                Ok(Some(&rest[..i]))
            }
            None if rest.len() > MAX_REPLY => Err(format!(
                "a line of more than {MAX_REPLY} bytes without a newline"
            )),
            None => Ok(None),
        },
        Framing::Length => {
            let Some(i) = newline else {
                if rest.len() > 20 || rest.iter().any(|c| !c.is_ascii_digit()) {
                    return Err(format!(
                        "expected a length line, got {}",
                        common::preview(&rest[..rest.len().min(60)])
                    ));
                }
                return Ok(None);
            };
            let header = &rest[..i];
            let n: usize = std::str::from_utf8(header)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .filter(|&n| n <= MAX_REPLY)
                .ok_or_else(|| {
                    format!(
                        "expected a length line (a number of bytes), got {}",
                        common::preview(header)
                    )
                })?;
            if rest.len() < i + 1 + n {
                // The header is whole: search for the next one only after the body.
                *scanned = 0;
                return Ok(None);
            }
            *pos += i + 1 + n;
            Ok(Some(&rest[i + 1..i + 1 + n]))
        }
    }
}

fn encode_tasks(lines: &[ByteBuf], framing: Framing) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 12).sum());
    for l in lines {
        if framing == Framing::Length {
            let _ = writeln!(out, "{}", l.len());
            out.extend_from_slice(l);
        } else {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
    }
    out
}

/// The replies of one [`exchange`]: `asked` lines, whose results go into `results` from
/// index `base` on.
struct Replies<'r> {
    framing: Framing,
    asked: usize,
    base: usize,
    results: &'r mut Vec<LineResult>,
    /// When the worker command began on the line it is answering now.
    head_start: Instant,
}

impl Replies<'_> {
    /// Every line asked has its reply.
    fn complete(&self) -> bool {
        self.results.len() - self.base == self.asked
    }

    /// Moves the complete replies in the worker's read buffer into `results`. A reply
    /// beyond the last line asked is a fault.
    fn take(&mut self, fw: &mut Foreign) -> Result<(), Fault> {
        let mut pos = 0;
        let taken = loop {
            match parse_reply(&fw.rbuf, &mut pos, &mut fw.scanned, self.framing) {
                Ok(Some(reply)) => {
                    if self.complete() {
                        break Err(Fault::Garbage(format!(
                            "a line nobody asked for: {}",
                            common::preview(reply)
                        )));
                    }
                    let now = Instant::now();
                    self.results.push(LineResult::Ok {
                        out: ByteBuf::from(reply),
                        pid: fw.w.pid(),
                        secs: (now - self.head_start).as_secs_f64(),
                    });
                    fw.answered += 1;
                    self.head_start = now;
                }
                Ok(None) => break Ok(()),
                Err(m) => break Err(Fault::Garbage(m)),
            }
        };
        fw.rbuf.drain(..pos);
        taken
    }

    /// After the worker command stopped taking input or closed its output: takes the
    /// replies it still wrote, then says how it ended (`None`: it had answered everything).
    fn wind_down(&mut self, fw: &mut Foreign) -> Option<Fault> {
        while proc::readable_within(&fw.stdout, Duration::from_millis(200))
            && proc::read_some(&mut fw.stdout, &mut fw.rbuf)
        {}
        if let Err(f) = self.take(fw) {
            return Some(f);
        }
        if self.complete() {
            return None;
        }
        Some(
            if proc::readable_within(&fw.w.pidfd, Duration::from_secs(1)) {
                Fault::Died
            } else {
                Fault::Closed
            },
        )
    }
}

/// Sends `lines` to the worker command and collects its replies into `results`, until all
/// are answered or it faults (then the fault; the line at `results.len()` is the one it
/// was working on).
fn exchange(
    fw: &mut Foreign,
    cfg: &WorkerConfig,
    lines: &[ByteBuf],
    results: &mut Vec<LineResult>,
) -> Option<Fault> {
    let mut replies = Replies {
        framing: cfg.framing,
        asked: lines.len(),
        base: results.len(),
        results,
        head_start: Instant::now(),
    };
    let out = encode_tasks(lines, cfg.framing);
    let mut written = 0;
    let timeout = cfg.timeout_ms.map(Duration::from_millis);
    loop {
        if let Err(f) = replies.take(fw) {
            return Some(f);
        }
        if replies.complete() {
            if fw.rbuf.is_empty() {
                return None;
            }
            // Part of a reply beyond the last task: output nobody asked for.
            return Some(Fault::Garbage(format!(
                "output nobody asked for: {}",
                common::preview(&fw.rbuf)
            )));
        }
        let deadline = timeout.map(|t| replies.head_start + t);
        let (exited, readable, writable) = {
            let mut fds = vec![
                PollFd::new(&fw.w.pidfd, PollFlags::IN),
                PollFd::new(&fw.stdout, PollFlags::IN),
            ];
            if written < out.len()
                && let Some(stdin) = &fw.stdin
            {
                fds.push(PollFd::new(stdin, PollFlags::OUT));
            }
            match proc::poll_until(&mut fds, deadline) {
                Ok(true) => {}
                Ok(false) => return Some(Fault::Timeout),
                Err(_) => return Some(Fault::Died),
            }
            let ready = |i: usize| fds.get(i).is_some_and(|f| !f.revents().is_empty());
            (ready(0), ready(1), ready(2))
        };
        if writable && let Some(stdin) = fw.stdin.as_mut() {
            match stdin.write(&out[written..]) {
                Ok(n) => written += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                // It closed its stdin, or died.
                Err(_) => {
                    fw.stdin = None;
                    return replies.wind_down(fw);
                }
            }
        }
        if readable && !proc::read_some(&mut fw.stdout, &mut fw.rbuf) {
            // End of its stdout: it exited or closed it.
            return replies.wind_down(fw);
        }
        if exited && !readable {
            return replies.wind_down(fw);
        }
    }
}

/// The pool task: runs `lines` through this worker's worker command.
pub(crate) fn map_chunk(lines: Vec<ByteBuf>) -> ChunkOutcome {
    let mut guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut outcome = ChunkOutcome::default();
    let Some(st) = guard.as_mut() else {
        outcome.results = lines
            .iter()
            .map(|_| LineResult::Failed {
                error: "this worker has no worker command (its initializer did not run)".into(),
                pid: 0,
                secs: 0.0,
                ended: None,
                fresh: true,
            })
            .collect();
        return outcome;
    };
    st.tasks += 1;
    let mut results: Vec<LineResult> = Vec::with_capacity(lines.len());
    while results.len() < lines.len() {
        let fw = match st.fw.as_mut() {
            Some(fw) => fw,
            None => match spawn_foreign(&st.cfg) {
                Ok(fw) => {
                    outcome.restarts += 1;
                    st.fw.insert(fw)
                }
                Err(e) => {
                    results.push(LineResult::Failed {
                        error: e,
                        pid: 0,
                        secs: 0.0,
                        ended: None,
                        fresh: true,
                    });
                    results.resize(lines.len(), LineResult::NotRun);
                    break;
                }
            },
        };
        // Between tasks it should have been silent and alive.
        if fw.rbuf.is_empty() && proc::readable_within(&fw.stdout, Duration::ZERO) {
            let _ = proc::read_some(&mut fw.stdout, &mut fw.rbuf);
        }
        if !fw.rbuf.is_empty() || fw.w.exited() {
            let fw = st.fw.take().expect("present");
            let pid = fw.w.pid();
            let note = if fw.rbuf.is_empty() {
                format!("worker command {pid} {} while idle; replaced", {
                    fw.w.end_group(proc::TERM_GRACE)
                })
            } else {
                let said = common::preview(&fw.rbuf);
                fw.w.end_group(proc::TERM_GRACE);
                format!("worker command {pid} wrote output nobody asked for ({said}); replaced")
            };
            outcome.notes.push(note);
            continue;
        }
        let start = results.len();
        let t0 = Instant::now();
        let Some(fault) = exchange(fw, &st.cfg, &lines[start..], &mut results) else {
            continue;
        };
        let fw = st.fw.take().expect("present");
        let pid = fw.w.pid();
        let fresh = fw.answered == 0;
        let ended = fw.w.end_group(proc::TERM_GRACE);
        let died = matches!(fault, Fault::Died);
        let error = match fault {
            Fault::Died => format!("worker command {pid} {ended} while working on it"),
            Fault::Closed => format!("worker command {pid} closed its stdout"),
            Fault::Timeout => format!(
                "timed out after {:?}: worker command {pid} was killed",
                st.cfg
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or_default()
            ),
            Fault::Garbage(m) => format!("worker command {pid} broke the protocol: {m}"),
        };
        let failed = LineResult::Failed {
            error,
            pid,
            secs: t0.elapsed().as_secs_f64(),
            ended: died.then_some(ended),
            fresh,
        };
        if results.len() == lines.len() {
            // Every line was answered, then came garbage: the last answer is suspect.
            *results.last_mut().expect("non-empty") = failed;
        } else {
            results.push(failed);
        }
        if fresh {
            // It may exit at once on start: let the parent decide before starting more.
            results.resize(lines.len(), LineResult::NotRun);
        }
    }
    if st.cfg.tasks_per_child.is_some_and(|k| st.tasks >= k)
        && let Some(mut fw) = st.fw.take()
    {
        // The pool ends this worker after this task: end the worker command first (its
        // stdin closes; it has a second to exit).
        fw.stdin = None;
        fw.w.finish(Duration::from_secs(1), proc::TERM_GRACE);
        outcome.recycled = true;
    }
    outcome.results = results;
    outcome
}

/// One input line in the parent.
#[derive(Debug)]
struct Line {
    seq: u64,
    item: Vec<u8>,
    attempts: u32,
}

struct Done {
    line: Line,
    result: LineResult,
}

/// In input order, how far past the oldest unprinted line tasks may be handed out (the
/// results held back for order).
const REORDER_LIMIT: u64 = 64 * 1024;

/// After this many different lines in a row whose worker command exited before answering
/// anything, the run stops: the command is crash-looping.
const CRASH_LOOP: usize = 3;

/// Runs `procpool map`.
pub(crate) fn run(args: Args) -> ExitCode {
    let fail = |m: String| common::usage_error("map", &m);
    if args.jobs == Some(0) {
        return fail("-j must be at least 1".into());
    }
    if args.max_tasks_per_child == Some(0) {
        return fail("--max-tasks-per-child must be at least 1".into());
    }
    if args.chunk_size == Some(0) {
        return fail("--chunk-size must be at least 1".into());
    }
    let program = match common::check_program(&args.command[0]) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let input = match common::open_input(args.arg_file.as_deref()) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let started = Instant::now();
    proc::become_subreaper();
    let cfg = WorkerConfig {
        argv: args
            .command
            .iter()
            .map(|a| ByteBuf::from(a.as_bytes().to_vec()))
            .collect(),
        path: ByteBuf::from(program.into_os_string().into_vec()),
        framing: args.framing,
        timeout_ms: args.timeout.map(|t| t.as_millis().max(1) as u64),
        init: args.init.clone(),
        tasks_per_child: args.max_tasks_per_child,
    };
    let mut builder =
        common::pool_builder(args.shared.start_method, args.jobs).initializer(map_init, (cfg,));
    if let Some(k) = args.max_tasks_per_child {
        builder = builder.max_tasks_per_child(k);
    }
    let pool = match common::start_pool(builder, "map", "the workers") {
        Ok(p) => p,
        Err(code) => return code,
    };
    let sep = if args.null { 0 } else { b'\n' };
    let (tx, rx) = mpsc::channel::<Ev>();
    let gate = common::spawn_reader(input, sep, tx.clone());
    let hurry = common::watch_signals(tx.clone());
    let mut progress = Progress::new(!args.shared.quiet);
    let window = pool.processes() * 4;

    let mut tally = Tally::default();
    let mut pending: VecDeque<Line> = VecDeque::new();
    let mut retry: VecDeque<Line> = VecDeque::new();
    let mut running: HashMap<u64, (Vec<Line>, AsyncResult<ChunkOutcome>)> = HashMap::new();
    let mut parked: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next_print = 1u64;
    let mut next_seq = 1u64;
    let mut next_key = 0u64;
    let mut input_done = false;
    let mut input_error = None;
    let mut stopped_by: Option<i32> = None;
    let mut fatal: Option<String> = None;
    let mut crash_lines: BTreeSet<u64> = BTreeSet::new();
    // Seconds per line, smoothed: sets the chunk size.
    let mut per_line: Option<f64> = None;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());

    let emit = |d: &Done,
                out: &mut std::io::BufWriter<std::io::StdoutLock<'_>>,
                progress: &Progress| {
        if args.json {
            let (ok, output, error, pid, secs, ended) = match &d.result {
                LineResult::Ok { out, pid, secs } => {
                    (true, Some(common::text(out)), None, Some(*pid), *secs, None)
                }
                LineResult::Failed {
                    error,
                    pid,
                    secs,
                    ended,
                    ..
                } => (false, None, Some(error.clone()), Some(*pid), *secs, *ended),
                LineResult::NotRun => (false, None, Some("not run".to_string()), None, 0.0, None),
            };
            let rec = serde_json::json!({
                "seq": d.line.seq,
                "input": common::text(&d.line.item),
                "ok": ok,
                "output": output,
                "error": error,
                "pid": pid,
                "attempts": d.line.attempts,
                "duration_s": secs,
                "exit_code": ended.and_then(|e| e.code),
                "signal": ended.and_then(|e| e.signal),
            });
            let _ = serde_json::to_writer(&mut *out, &rec);
            let _ = out.write_all(b"\n");
            return;
        }
        match &d.result {
            LineResult::Ok { out: o, .. } => {
                let _ = out.write_all(o);
            }
            LineResult::Failed { error, .. } => {
                let _ = out.flush();
                progress.suspend(|| {
                    eprintln!(
                        "procpool map: line {} ({}) failed{}: {error}",
                        d.line.seq,
                        common::preview(&d.line.item),
                        if d.line.attempts > 1 {
                            format!(" after {} attempts", d.line.attempts)
                        } else {
                            String::new()
                        }
                    );
                });
            }
            LineResult::NotRun => {}
        }
        let _ = out.write_all(&[sep]);
    };

    loop {
        while stopped_by.is_none() && fatal.is_none() && running.len() < window {
            let size = match (args.max_tasks_per_child, args.chunk_size) {
                (Some(_), _) => 1,
                (None, Some(c)) => c,
                (None, None) => {
                    let target = per_line.map_or(1.0, |s| (0.002 / s.max(1e-7)).clamp(1.0, 256.0));
                    let mut c = target as usize;
                    if input_done {
                        let spread = pending.len().div_ceil(pool.processes() * 2);
                        c = c.min(spread.max(1));
                    }
                    c.max(1)
                }
            };
            let mut chunk = Vec::with_capacity(size);
            while chunk.len() < size {
                if let Some(l) = retry.pop_front() {
                    chunk.push(l);
                } else if pending
                    .front()
                    .is_some_and(|l| args.unordered || l.seq < next_print + REORDER_LIMIT)
                    && let Some(l) = pending.pop_front()
                {
                    gate.taken(l.item.len());
                    chunk.push(l);
                } else {
                    break;
                }
            }
            if chunk.is_empty() {
                break;
            }
            // A line holding a newline cannot be sent as a line (only NUL-separated input
            // can hold one).
            if args.framing == Framing::Lines && args.null {
                let (bad, good): (Vec<Line>, Vec<Line>) =
                    chunk.into_iter().partition(|l| l.item.contains(&b'\n'));
                for line in bad {
                    tally.done += 1;
                    tally.failed += 1;
                    let d = Done {
                        line,
                        result: LineResult::Failed {
                            error: "it holds a newline: use --framing length".into(),
                            pid: 0,
                            secs: 0.0,
                            ended: None,
                            fresh: false,
                        },
                    };
                    if args.unordered {
                        emit(&d, &mut out, &progress);
                    } else {
                        parked.insert(d.line.seq, d);
                    }
                }
                chunk = good;
                if chunk.is_empty() {
                    continue;
                }
            }
            let items: Vec<ByteBuf> = chunk
                .iter()
                .map(|l| ByteBuf::from(l.item.clone()))
                .collect();
            let key = next_key;
            next_key += 1;
            let handle = pool.apply_async_with(map_chunk, (items,), common::notify_done(&tx, key));
            running.insert(key, (chunk, handle));
        }
        if !args.unordered {
            while let Some(d) = parked.remove(&next_print) {
                emit(&d, &mut out, &progress);
                next_print += 1;
            }
        }
        if running.is_empty()
            && (stopped_by.is_some()
                || fatal.is_some()
                || (input_done && pending.is_empty() && retry.is_empty()))
        {
            break;
        }
        let Some(ev) = common::next_event(&rx, || {
            let _ = out.flush();
        }) else {
            break;
        };
        match ev {
            Ev::Item(item) => {
                if stopped_by.is_none() && fatal.is_none() {
                    pending.push_back(Line {
                        seq: next_seq,
                        item,
                        attempts: 0,
                    });
                    next_seq += 1;
                } else {
                    gate.taken(item.len());
                }
            }
            Ev::InputEnd(err) => {
                input_done = true;
                input_error = err;
                progress.set_total(next_seq - 1);
            }
            Ev::Signal(sig) => {
                if stopped_by.is_none() {
                    stopped_by = Some(sig);
                    pool.terminate();
                }
            }
            Ev::Done(key) => {
                let Some((lines, handle)) = running.remove(&key) else {
                    continue;
                };
                let outcome = match handle.get() {
                    Ok(o) => o,
                    Err(_) if stopped_by.is_some() || fatal.is_some() => {
                        tally.not_run += lines.len() as u64;
                        continue;
                    }
                    Err(e) if e.kind() == TaskErrorKind::InitializerFailed => {
                        fatal = Some(format!("the workers cannot start: {}", e.message()));
                        tally.not_run += lines.len() as u64;
                        pool.terminate();
                        continue;
                    }
                    Err(e) => {
                        if e.kind() == TaskErrorKind::WorkerLost {
                            tally.restarts += 1;
                        }
                        let msg = format!("the pool's worker failed: {e}");
                        ChunkOutcome {
                            results: lines
                                .iter()
                                .map(|_| LineResult::Failed {
                                    error: msg.clone(),
                                    pid: e.pid().unwrap_or(0),
                                    secs: 0.0,
                                    ended: None,
                                    fresh: false,
                                })
                                .collect(),
                            ..ChunkOutcome::default()
                        }
                    }
                };
                tally.restarts += u64::from(outcome.restarts);
                tally.recycles += u64::from(outcome.recycled);
                for n in &outcome.notes {
                    progress.suspend(|| eprintln!("procpool map: {n}"));
                }
                let mut secs_sum = 0.0;
                let mut oks = 0u32;
                for (mut line, result) in lines.into_iter().zip(outcome.results) {
                    match &result {
                        LineResult::NotRun => {
                            retry.push_front(line);
                            continue;
                        }
                        LineResult::Ok { secs, .. } => {
                            secs_sum += secs;
                            oks += 1;
                            crash_lines.clear();
                            line.attempts += 1;
                        }
                        LineResult::Failed { fresh, .. } => {
                            line.attempts += 1;
                            if *fresh {
                                crash_lines.insert(line.seq);
                            }
                            if line.attempts <= args.retries
                                && stopped_by.is_none()
                                && crash_lines.len() < CRASH_LOOP
                            {
                                tally.retries += 1;
                                retry.push_back(line);
                                continue;
                            }
                            tally.failed += 1;
                        }
                    }
                    tally.done += 1;
                    let d = Done { line, result };
                    if args.unordered {
                        emit(&d, &mut out, &progress);
                    } else {
                        parked.insert(d.line.seq, d);
                    }
                }
                if oks > 0 {
                    let s = secs_sum / f64::from(oks);
                    per_line = Some(per_line.map_or(s, |p| 0.7 * p + 0.3 * s));
                }
                if crash_lines.len() >= CRASH_LOOP && fatal.is_none() {
                    fatal = Some(format!(
                        "the worker command keeps exiting before it answers anything \
                         ({CRASH_LOOP} lines in a row); stopping"
                    ));
                    pool.terminate();
                }
                progress.update(&tally);
            }
        }
    }
    // Lines never finished (a stop): counted, not printed; what finished is printed in
    // order, around the gaps.
    tally.not_run += (pending.len() + retry.len()) as u64
        + running.values().map(|(l, _)| l.len() as u64).sum::<u64>();
    for d in std::mem::take(&mut parked).into_values() {
        emit(&d, &mut out, &progress);
    }
    let _ = out.flush();
    pool.close();
    let _ = pool.join();
    drop(pool);
    proc::sweep(
        if stopped_by.is_some() {
            Duration::ZERO
        } else {
            Duration::from_secs(2)
        },
        &hurry,
    );
    progress.finish();
    if let Some(e) = &input_error {
        eprintln!("procpool map: {e}");
    }
    if let Some(f) = &fatal {
        eprintln!("procpool map: {f}");
    }
    if !args.shared.quiet {
        eprintln!(
            "{}",
            common::summary("map", "lines", &tally, started.elapsed(), stopped_by)
        );
    }
    let mut code = common::exit_code(&tally, stopped_by);
    if code == 0 && (input_error.is_some() || fatal.is_some()) {
        code = 1;
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`parse_reply`] on the front of `b`, then the reply taken off it.
    fn next_reply(b: &mut Vec<u8>, framing: Framing) -> Result<Option<Vec<u8>>, String> {
        let mut pos = 0;
        let reply = parse_reply(b, &mut pos, &mut 0, framing)?.map(<[u8]>::to_vec);
        b.drain(..pos);
        Ok(reply)
    }

    #[test]
    fn replies_are_parsed_whole() {
        let mut b = b"ab\ncd".to_vec();
        assert_eq!(next_reply(&mut b, Framing::Lines), Ok(Some(b"ab".to_vec())));
        assert_eq!(next_reply(&mut b, Framing::Lines), Ok(None));
        let mut b = b"3\na\nb2\nxy".to_vec();
        assert_eq!(
            next_reply(&mut b, Framing::Length),
            Ok(Some(b"a\nb".to_vec()))
        );
        assert_eq!(
            next_reply(&mut b, Framing::Length),
            Ok(Some(b"xy".to_vec()))
        );
        assert_eq!(next_reply(&mut b, Framing::Length), Ok(None));
        let mut b = b"hello\n".to_vec();
        assert!(next_reply(&mut b, Framing::Length).is_err());
        let mut b = b"12".to_vec();
        assert_eq!(next_reply(&mut b, Framing::Length), Ok(None));
        let mut b = b"x".to_vec();
        assert!(next_reply(&mut b, Framing::Length).is_err());
    }

    #[test]
    fn tasks_are_framed() {
        let lines = vec![
            ByteBuf::from(b"a".to_vec()),
            ByteBuf::from(b"b\nc".to_vec()),
        ];
        assert_eq!(encode_tasks(&lines[..1], Framing::Lines), b"a\n");
        assert_eq!(encode_tasks(&lines, Framing::Length), b"1\na3\nb\nc");
    }
}
