//! `procpool run`: one command per input item, run by the pool's workers (what `xargs -P`
//! and GNU parallel do).
//!
//! Each job is one pool task, [`run_job`]: the worker starts the command in a process group
//! of its own, captures its stdout and stderr whole, and ends the group when the command
//! exits (nothing it started outlives it) or runs past `--timeout`. This process feeds the
//! pool a bounded window of jobs, retries failed ones, and prints each job's output whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdout, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use procpool::{AsyncResult, TaskError, TaskErrorKind};
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::common::{self, Ev, Progress, Tally};
use crate::proc::{self, Ended, Watched};

pub(crate) const HELP: &str = "\
Input: one item per line of stdin (or of --arg-file; NUL-separated with -0). Each item
runs CMD once: `{}` in CMD or its arguments is replaced by the item; without any `{}`,
the item is added as the last argument. Also: {.} the item without its extension, {/} its
base name, {//} its directory, {/.} its base name without extension, {#} the job number.
CMD runs directly (no shell): use `sh -c '... \"$1\" ...' sh {}` for pipes and redirects.
An empty input runs nothing.

Each job's stdout and stderr are kept whole and printed when it ends (in input order with
--keep-order), never mixed with another job's. A job runs in a process group of its own;
when it exits, anything it left running in that group is killed. Jobs read stdin from
/dev/null.

A job fails when it exits with a non-zero status, is killed by a signal, cannot be started,
or runs past --timeout (its whole process group gets SIGTERM, then SIGKILL 0.5 s later).
A failed job runs again, up to --retries times; the run goes on.

--joblog FILE: one tab-separated line per job, as GNU parallel writes it (Seq, Host,
Starttime, JobRuntime, Send, Receive, Exitval, Signal, Command).
--json: one JSON record per job on stdout instead of the output itself: seq, input,
command, ok, exit_code, signal, timed_out, error, attempts, pid, start, duration_s, stdout,
stderr.

A progress bar is drawn on stderr when it is a terminal; a summary line ends the run.
Ctrl-C (or SIGTERM) stops handing out jobs, ends every running job's process group and
every worker, prints the summary and exits 130 (143); a second Ctrl-C kills at once.

Exit status: 0 if every job succeeded; otherwise the number of failed jobs, at most 101;
128+N when stopped by signal N (130 for Ctrl-C); 255 for a usage error (bad option, CMD
not found, unreadable --arg-file).";

/// Options of `procpool run`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = HELP)]
pub(crate) struct Args {
    /// Jobs to run at once [default: the usable CPUs].
    #[arg(short = 'j', long = "jobs", value_name = "N")]
    jobs: Option<usize>,
    /// Kill a job (its whole process group) that runs longer than this: 30s, 500ms, 2m.
    #[arg(long, value_parser = common::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// Run a failed job again, up to R more times.
    #[arg(long, default_value_t = 0, value_name = "R")]
    retries: u32,
    /// Print job outputs in input order (default: as jobs finish).
    #[arg(short = 'k', long)]
    keep_order: bool,
    /// Write a job log (GNU parallel's format) to FILE.
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,
    /// Print one JSON record per job instead of its output.
    #[arg(long)]
    json: bool,
    /// Read the items from FILE instead of stdin.
    #[arg(short = 'a', long, value_name = "FILE")]
    arg_file: Option<PathBuf>,
    /// Items are separated by NUL bytes, not newlines.
    #[arg(short = '0', long)]
    null: bool,
    #[command(flatten)]
    shared: common::SharedArgs,
    /// The command and its arguments; `{}` stands for the item.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// One job, as a pool task receives it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobSpec {
    argv: Vec<ByteBuf>,
    /// Where `argv[0]` was found in `PATH`, when the parent could look it up once.
    path: Option<ByteBuf>,
    timeout_ms: Option<u64>,
}

/// How one run of a job went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct JobOutcome {
    pid: u32,
    ended: Ended,
    timed_out: bool,
    /// Why the command could not be started.
    error: Option<String>,
    stdout: ByteBuf,
    stderr: ByteBuf,
    start: f64,
    secs: f64,
}

impl JobOutcome {
    fn ok(&self) -> bool {
        self.error.is_none() && !self.timed_out && self.ended.success()
    }

    fn failed_because(e: String) -> JobOutcome {
        JobOutcome {
            error: Some(e),
            start: common::unix_now(),
            ..JobOutcome::default()
        }
    }

    fn reason(&self, timeout: Option<Duration>) -> String {
        if let Some(e) = &self.error {
            e.clone()
        } else if self.timed_out {
            format!(
                "timed out after {} and was killed",
                timeout.map_or_else(String::new, |t| format!("{:?}", t))
            )
        } else {
            self.ended.to_string()
        }
    }
}

/// A job's stdout and stderr, read as the command writes them, until each is closed.
struct Pipes {
    out: ChildStdout,
    err: ChildStderr,
    obuf: Vec<u8>,
    ebuf: Vec<u8>,
    o_open: bool,
    e_open: bool,
}

impl Pipes {
    /// Adds to `fds` one entry for each pipe still open: stdout's, then stderr's.
    fn watch<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        if self.o_open {
            fds.push(PollFd::new(&self.out, PollFlags::IN));
        }
        if self.e_open {
            fds.push(PollFd::new(&self.err, PollFlags::IN));
        }
    }

    /// Reads the pipes that polled ready: `ready` holds their entries in [`Pipes::watch`]'s
    /// order.
    fn read_ready(&mut self, ready: &[bool]) {
        let mut i = 0;
        if self.o_open {
            if ready[i] {
                self.o_open = proc::read_some(&mut self.out, &mut self.obuf);
            }
            i += 1;
        }
        if self.e_open && ready[i] {
            self.e_open = proc::read_some(&mut self.err, &mut self.ebuf);
        }
    }
}

/// The pool task: runs one command and reports how it went.
pub(crate) fn run_job(spec: JobSpec) -> JobOutcome {
    let start = common::unix_now();
    let t0 = Instant::now();
    let Some((program, args)) = spec.argv.split_first() else {
        return JobOutcome::failed_because("empty command".into());
    };
    let mut cmd = Command::new(OsStr::from_bytes(spec.path.as_deref().unwrap_or(program)));
    cmd.arg0(OsStr::from_bytes(program))
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return JobOutcome {
                error: Some(format!("cannot start {}: {e}", common::preview(program))),
                start,
                secs: t0.elapsed().as_secs_f64(),
                ..JobOutcome::default()
            };
        }
    };
    let mut pipes = Pipes {
        out: child.stdout.take().expect("piped"),
        err: child.stderr.take().expect("piped"),
        obuf: Vec::new(),
        ebuf: Vec::new(),
        o_open: true,
        e_open: true,
    };
    let pid = child.id();
    let watched = match Watched::new(child) {
        Ok(w) => w,
        Err(e) => {
            return JobOutcome::failed_because(format!("cannot watch process {pid}: {e}"));
        }
    };
    let deadline = spec.timeout_ms.map(|ms| t0 + Duration::from_millis(ms));
    let mut exited = false;
    // Read both pipes as the command writes (so it never blocks on a full pipe) until it
    // exits or its time is up.
    while !exited {
        let mut fds = vec![PollFd::new(&watched.pidfd, PollFlags::IN)];
        pipes.watch(&mut fds);
        match proc::poll_until(&mut fds, deadline) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        exited = ready[0];
        pipes.read_ready(&ready[1..]);
    }
    let timed_out = !exited;
    let ended = if timed_out {
        watched.end_group(proc::TERM_GRACE)
    } else {
        // What the command left running in its group dies with it.
        watched.reap()
    };
    // The group is gone: the pipes reach end of file at once, unless something that left
    // the group holds them; that gets a second at most.
    let drain_until = Instant::now() + Duration::from_secs(1);
    while pipes.o_open || pipes.e_open {
        let mut fds = Vec::new();
        pipes.watch(&mut fds);
        if !matches!(proc::poll_until(&mut fds, Some(drain_until)), Ok(true)) {
            break;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        pipes.read_ready(&ready);
    }
    JobOutcome {
        pid,
        ended,
        timed_out,
        error: None,
        stdout: ByteBuf::from(pipes.obuf),
        stderr: ByteBuf::from(pipes.ebuf),
        start,
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// The replacement strings GNU parallel users know, applied to one argument. Returns the
/// argument and whether it held any.
fn substitute(arg: &[u8], item: &[u8], seq: u64) -> (Vec<u8>, bool) {
    const TOKENS: [&[u8]; 6] = [b"{}", b"{.}", b"{/}", b"{//}", b"{/.}", b"{#}"];
    let base = |p: &[u8]| -> Vec<u8> {
        let p = p.strip_suffix(b"/").unwrap_or(p);
        match p.iter().rposition(|&c| c == b'/') {
            Some(i) => p[i + 1..].to_vec(),
            None => p.to_vec(),
        }
    };
    let no_ext = |p: &[u8]| -> Vec<u8> {
        let slash = p.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
        match p[slash..].iter().rposition(|&c| c == b'.') {
            Some(i) if i > 0 => p[..slash + i].to_vec(),
            _ => p.to_vec(),
        }
    };
    let dir = |p: &[u8]| -> Vec<u8> {
        match p.iter().rposition(|&c| c == b'/') {
            Some(0) => b"/".to_vec(),
            Some(i) => p[..i].to_vec(),
            None => b".".to_vec(),
        }
    };
    let mut out = Vec::with_capacity(arg.len() + item.len());
    let mut any = false;
    let mut i = 0;
    'outer: while i < arg.len() {
        if arg[i] == b'{' {
            for t in TOKENS {
                if arg[i..].starts_with(t) {
                    any = true;
                    match t {
                        b"{}" => out.extend_from_slice(item),
                        b"{.}" => out.extend_from_slice(&no_ext(item)),
                        b"{/}" => out.extend_from_slice(&base(item)),
                        b"{//}" => out.extend_from_slice(&dir(item)),
                        b"{/.}" => out.extend_from_slice(&no_ext(&base(item))),
                        _ => out.extend_from_slice(seq.to_string().as_bytes()),
                    }
                    i += t.len();
                    continue 'outer;
                }
            }
        }
        out.push(arg[i]);
        i += 1;
    }
    (out, any)
}

/// The command line of job `seq` for `item`.
fn build_argv(template: &[OsString], item: &[u8], seq: u64) -> Vec<ByteBuf> {
    let mut any = false;
    let mut argv: Vec<ByteBuf> = template
        .iter()
        .map(|a| {
            let (s, hit) = substitute(a.as_bytes(), item, seq);
            any |= hit;
            ByteBuf::from(s)
        })
        .collect();
    if !any {
        argv.push(ByteBuf::from(item.to_vec()));
    }
    argv
}

struct Job {
    seq: u64,
    item: Vec<u8>,
    spec: JobSpec,
    attempts: u32,
}

struct Finished {
    job: Job,
    outcome: JobOutcome,
}

/// Runs `procpool run`.
pub(crate) fn run(args: Args) -> ExitCode {
    let fail = |m: String| common::usage_error("run", &m);
    if args.jobs == Some(0) {
        return fail("-j must be at least 1".into());
    }
    let program = &args.command[0];
    let path = if substitute(program.as_bytes(), b"", 0).1 {
        None
    } else {
        match common::check_program(program) {
            Ok(p) => Some(ByteBuf::from(p.into_os_string().into_vec())),
            Err(e) => return fail(e),
        }
    };
    let input = match common::open_input(args.arg_file.as_deref()) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let mut joblog = match &args.joblog {
        Some(p) => match common::create_file(p) {
            Ok(mut f) => {
                let _ = writeln!(
                    f,
                    "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
                );
                Some(std::io::BufWriter::new(f))
            }
            Err(e) => return fail(e),
        },
        None => None,
    };
    let started = Instant::now();
    proc::become_subreaper();
    let builder = common::pool_builder(args.shared.start_method, args.jobs);
    let pool = match common::start_pool(builder, "run", "the pool") {
        Ok(p) => p,
        Err(code) => return code,
    };
    let (tx, rx) = mpsc::channel::<Ev>();
    let gate = common::spawn_reader(input, if args.null { 0 } else { b'\n' }, tx.clone());
    let hurry = common::watch_signals(tx.clone());
    let mut progress = Progress::new(!args.shared.quiet);
    let window = pool.processes() * 4;
    let timeout_ms = args.timeout.map(|t| t.as_millis().max(1) as u64);

    let mut tally = Tally::default();
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut retry: VecDeque<Job> = VecDeque::new();
    let mut running: HashMap<u64, (Job, AsyncResult<JobOutcome>)> = HashMap::new();
    let mut parked: BTreeMap<u64, Finished> = BTreeMap::new();
    let mut next_print = 1u64;
    let mut next_seq = 1u64;
    let mut next_key = 0u64;
    let mut input_done = false;
    let mut input_error = None;
    let mut stopped_by: Option<i32> = None;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());

    let emit = |f: &Finished,
                out: &mut std::io::BufWriter<std::io::StdoutLock<'_>>,
                progress: &Progress| {
        let ok = f.outcome.ok();
        if args.json {
            let rec = serde_json::json!({
                "seq": f.job.seq,
                "input": common::text(&f.job.item),
                "command": f.job.spec.argv.iter().map(|a| common::text(a)).collect::<Vec<_>>(),
                "ok": ok,
                "exit_code": f.outcome.ended.code,
                "signal": f.outcome.ended.signal,
                "timed_out": f.outcome.timed_out,
                "error": (!ok).then(|| f.outcome.reason(args.timeout)),
                "attempts": f.job.attempts,
                "pid": f.outcome.pid,
                "start": f.outcome.start,
                "duration_s": f.outcome.secs,
                "stdout": common::text(&f.outcome.stdout),
                "stderr": common::text(&f.outcome.stderr),
            });
            let _ = serde_json::to_writer(&mut *out, &rec);
            let _ = out.write_all(b"\n");
            return;
        }
        let _ = out.write_all(&f.outcome.stdout);
        if !f.outcome.stderr.is_empty() || !ok {
            let _ = out.flush();
            progress.suspend(|| {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&f.outcome.stderr);
                if !ok {
                    let _ = writeln!(
                        err,
                        "procpool run: job {} ({}) failed: {}{}",
                        f.job.seq,
                        common::preview(&f.job.item),
                        f.outcome.reason(args.timeout),
                        if f.job.attempts > 1 {
                            format!(" ({} attempts)", f.job.attempts)
                        } else {
                            String::new()
                        }
                    );
                }
            });
        }
    };

    loop {
        // Hand out jobs while the window has room.
        while stopped_by.is_none() && running.len() < window {
            let job = if let Some(j) = retry.pop_front() {
                j
            } else if let Some(item) = (!args.keep_order
                || next_seq < next_print + 64 * window as u64)
                .then(|| pending.pop_front())
                .flatten()
            {
                gate.taken(item.len());
                let seq = next_seq;
                next_seq += 1;
                Job {
                    seq,
                    spec: JobSpec {
                        argv: build_argv(&args.command, &item, seq),
                        path: path.clone(),
                        timeout_ms,
                    },
                    item,
                    attempts: 0,
                }
            } else {
                break;
            };
            let key = next_key;
            next_key += 1;
            let handle =
                pool.apply_async_with(run_job, (job.spec.clone(),), common::notify_done(&tx, key));
            running.insert(key, (job, handle));
        }
        if running.is_empty()
            && (stopped_by.is_some() || (input_done && pending.is_empty() && retry.is_empty()))
        {
            break;
        }
        let Some(ev) = common::next_event(&rx, || {
            let _ = out.flush();
            if let Some(j) = joblog.as_mut() {
                let _ = j.flush();
            }
        }) else {
            break;
        };
        match ev {
            Ev::Item(item) => {
                if stopped_by.is_none() {
                    pending.push_back(item);
                } else {
                    gate.taken(item.len());
                }
            }
            Ev::InputEnd(err) => {
                input_done = true;
                input_error = err;
                progress.set_total(next_seq - 1 + pending.len() as u64);
            }
            Ev::Signal(sig) => {
                if stopped_by.is_none() {
                    stopped_by = Some(sig);
                    tally.not_run += pending.len() as u64 + retry.len() as u64;
                    pending.clear();
                    retry.clear();
                    pool.terminate();
                }
            }
            Ev::Done(key) => {
                let Some((mut job, handle)) = running.remove(&key) else {
                    continue;
                };
                let outcome = match handle.get() {
                    Ok(o) => o,
                    Err(_) if stopped_by.is_some() => {
                        tally.not_run += 1;
                        continue;
                    }
                    Err(e) => pool_failure(&e, &mut tally),
                };
                job.attempts += 1;
                if !outcome.ok() && job.attempts <= args.retries && stopped_by.is_none() {
                    tally.retries += 1;
                    retry.push_back(job);
                    progress.update(&tally);
                    continue;
                }
                tally.done += 1;
                if !outcome.ok() {
                    tally.failed += 1;
                }
                if let Some(j) = joblog.as_mut() {
                    write_joblog(j, &job, &outcome);
                }
                let f = Finished { job, outcome };
                if args.keep_order {
                    parked.insert(f.job.seq, f);
                    while let Some(f) = parked.remove(&next_print) {
                        emit(&f, &mut out, &progress);
                        next_print += 1;
                    }
                } else {
                    emit(&f, &mut out, &progress);
                }
                progress.update(&tally);
            }
        }
    }
    // What a stop left parked behind a job that never finished.
    for f in std::mem::take(&mut parked).into_values() {
        emit(&f, &mut out, &progress);
    }
    let _ = out.flush();
    if let Some(j) = joblog.as_mut() {
        let _ = j.flush();
    }
    pool.close();
    let _ = pool.join();
    drop(pool);
    proc::sweep(Duration::ZERO, &hurry);
    progress.finish();
    if let Some(e) = &input_error {
        eprintln!("procpool run: {e}");
    }
    if !args.shared.quiet {
        eprintln!(
            "{}",
            common::summary("run", "jobs", &tally, started.elapsed(), stopped_by)
        );
    }
    let mut code = common::exit_code(&tally, stopped_by);
    if code == 0 && input_error.is_some() {
        code = 1;
    }
    ExitCode::from(code)
}

/// A job whose pool task failed (its worker died, or the task could not be sent): an
/// outcome that says so.
fn pool_failure(e: &TaskError, tally: &mut Tally) -> JobOutcome {
    if e.kind() == TaskErrorKind::WorkerLost {
        tally.restarts += 1;
    }
    JobOutcome::failed_because(format!("the pool's worker failed: {e}"))
}

fn write_joblog(w: &mut impl Write, job: &Job, o: &JobOutcome) {
    let command: Vec<String> = job.spec.argv.iter().map(|a| common::text(a)).collect();
    let exitval = if o.timed_out || o.error.is_some() {
        -1
    } else {
        o.ended.code.unwrap_or(-1)
    };
    let _ = writeln!(
        w,
        "{}\t:\t{:.3}\t{:.3}\t0\t{}\t{}\t{}\t{}",
        job.seq,
        o.start,
        o.secs,
        o.stdout.len(),
        exitval,
        o.ended.signal.unwrap_or(0),
        command.join(" ").replace(['\n', '\t'], " ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(arg: &str, item: &str) -> String {
        String::from_utf8(substitute(arg.as_bytes(), item.as_bytes(), 7).0).unwrap()
    }

    #[test]
    fn replacement_strings() {
        assert_eq!(sub("x{}y", "a/b.c"), "xa/b.cy");
        assert_eq!(sub("{.}", "a/b.c"), "a/b");
        assert_eq!(sub("{/}", "a/b.c"), "b.c");
        assert_eq!(sub("{//}", "a/b.c"), "a");
        assert_eq!(sub("{//}", "b.c"), ".");
        assert_eq!(sub("{/.}", "a/b.c"), "b");
        assert_eq!(sub("{#}", "x"), "7");
        assert_eq!(sub("{.}", "a.d/b"), "a.d/b");
        assert_eq!(sub("{x}", "a"), "{x}");
        let argv = build_argv(&["echo".into(), "-n".into()], b"hi", 1);
        assert_eq!(argv.len(), 3);
        assert_eq!(&argv[2][..], b"hi");
    }
}
