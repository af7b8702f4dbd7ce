//! procpool: a process pool for Rust, with the API of Python's `multiprocessing.Pool`.
//!
//! Threads already give Rust parallelism. Processes give what threads cannot: **isolation**
//! (a segfault, abort, out-of-memory kill or leak in a native library costs one worker, not
//! the service), **recycling** (`max_tasks_per_child`, or a memory limit, frees what a worker
//! leaked), and **hard stops**: a task past its time limit, or cancelled while it runs, has
//! its worker stopped together with the processes it started, and only that task fails;
//! [`Pool::terminate`] stops them all; an [`Event`] lets tasks stop cooperatively.
//!
//! procpool runs on Linux only: it watches workers through pidfds, shares memory through
//! memfds, waits on futexes, ties workers' lives to the parent with `PR_SET_PDEATHSIG` and
//! re-executes `/proc/self/exe`. On other systems the build stops with a message saying so.
//!
//! # Quick start
//!
//! ```
//! use procpool::{Pool, StartMethod};
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! fn add(a: u64, b: u64) -> u64 {
//!     a + b
//! }
//!
//! fn main() -> Result<(), procpool::Error> {
//!     procpool::init(); // first line of main: this is where workers start
//!     let pool = Pool::builder()
//!         .processes(2)
//!         .max_tasks_per_child(100)
//!         .start_method(StartMethod::Forkserver)
//!         .build()?;
//!     assert_eq!(pool.apply(square, (7,))?, 49);
//!     assert_eq!(pool.map(square, 0..4u64)?, vec![0, 1, 4, 9]);
//!     assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)])?, vec![3, 7]);
//!     let pending = pool.apply_async(square, (8,));
//!     assert_eq!(pending.get()?, 64);
//!     for r in pool.imap(square, 0..) {
//!         if r? > 100 {
//!             break;
//!         }
//!     }
//!     pool.close();
//!     pool.join()?;
//!     Ok(())
//! }
//! ```
//!
//! # Tasks
//!
//! A task is a plain `fn` item or a closure that captures nothing (both are zero-sized), with
//! arguments and a result that implement serde's `Serialize` and `Deserialize`. Functions of
//! up to eight arguments work; arguments travel as a tuple (`pool.apply(add, (1, 2))`). A
//! capturing closure is refused at compile time:
//!
//! ```compile_fail
//! # fn main() -> Result<(), procpool::Error> {
//! let pool = procpool::Pool::builder().build()?;
//! let offset = 5u64;
//! pool.apply(move |x: u64| x + offset, (1u64,))?; // captures `offset`: does not compile
//! # Ok(()) }
//! ```
//!
//! Workers run the same executable as the parent; each checks that it does before it runs
//! anything, and refuses with a clear error otherwise.
//!
//! Results are decoded on the pool's own thread as they arrive, before they are handed to
//! the caller: a result type whose `Deserialize` takes two seconds delays every other result
//! (and the sending of queued tasks) by two seconds. Keep result decoding cheap, or return
//! the bytes (`serde_bytes::ByteBuf`) and decode them in the thread that asked. (A thread
//! blocked in [`Pool::apply`], or in [`AsyncResult::get`] on an `apply_async`, usually reads
//! and decodes its answer itself, straight from the worker: the answer then wakes only that
//! thread.)
//!
//! # Start methods
//!
//! - [`StartMethod::Forkserver`] (the default): a small server process, a fresh copy of the
//!   program, forks each worker. Cheap starts, and safe whatever threads the parent runs.
//! - [`StartMethod::Spawn`]: each worker is a fresh run of the executable.
//! - [`StartMethod::Fork`]: `build` forks the parent into a *zygote* that stays
//!   single-threaded and forks every worker, replacements included, but the first two
//!   (`build` forks them itself, at the same moment, rather than wait for the zygote to
//!   start and fork them).
//!   Workers start with a copy of the parent's memory as it was at `build`:
//!   what the parent changes afterwards is not inherited, not even by replacements.
//!   Forking a process with other threads is hazardous (a lock another thread holds stays
//!   locked forever in the child), so `build` counts the threads and refuses then, unless
//!   [`PoolBuilder::allow_fork_with_threads`] says otherwise. (procpool's own launcher
//!   thread is not counted while it sits idle; another live pool's driver thread is.) The
//!   pool's own threads never matter: the parent is forked only at `build`.
//!
//! Spawn and Forkserver re-run the executable, so [`init`] must be the first line of `main`.
//! In test binaries (whose `main` belongs to the test harness) put
//! [`enable_test_support!()`](enable_test_support) at the crate root once.
//!
//! A Forkserver pool need not re-run the executable for its server: [`init`] makes a *seed*,
//! a copy of the program forked there and then, while it has one thread and has done
//! nothing else yet, and each Forkserver pool's server is forked from it. That spares the
//! server's exec and start-up, most of a Forkserver pool's start (`BENCHMARKS.md`). The
//! server gets the program's working directory, stdout and stderr as they are when the pool
//! is built. If the program has changed anything else a child inherits since `init()` (its
//! environment, user, umask, resource limits, namespaces, seccomp filters and the like,
//! compared at each build; the seed reads them in `/proc` itself, so a program that gave up a
//! right cannot get it back through the seed), the pool starts its server fresh instead, as
//! it does when there is no seed: other threads were running when `init()` came, or
//! `PROCPOOL_SEED=0` is set.
//! The seed is one more child process for the whole life of the program (`<program>:seed`
//! in `ps`), ended with it; a program that waits for all of its children to end should
//! leave out the one [`seed_pid`] names, or set `PROCPOOL_SEED=0`. It starts on another CPU
//! than the program's, so as not to wait behind it (some kernels leave a forked child on its
//! parent's CPU while another idles): until the first Forkserver pool asks it for a server,
//! `taskset -p` shows it allowed fewer CPUs than the program, whose affinity it takes back
//! then, before it compares or forks anything.
//!
//! Most of the time `build` takes with Spawn, and with Forkserver when its server starts
//! fresh, is that re-run: the program
//! loading up to [`init`] (what procpool does after it, until the first result, is about a
//! third). How the program is linked decides much of that load. Measured on the machine of
//! `BENCHMARKS.md` (a virtual machine), one run of the `procpool` command (4.8 MB) took
//! about 1.1 ms where `/bin/true` took 0.6 ms. The difference, by cause:
//!
//! - `libgcc_s`, which a dynamically linked Rust program loads only for its unwinder
//!   (panics, backtraces): 0.1 to 0.2 ms, loading it and running its start-up code, which
//!   asks the CPU for its features with `cpuid` (an instruction a virtual machine traps:
//!   about 8 µs each there). Link the unwinder into your program instead, as the `procpool`
//!   command does, with one line in your binary crate's `build.rs`:
//!
//!   ```text
//!   println!("cargo::rustc-link-lib=static=gcc_eh");
//!   ```
//!
//!   (on `*-linux-gnu` targets, not with `+crt-static`, which links it already). Panics,
//!   `catch_unwind` and backtraces work the same; only a program that also loads a C++
//!   library whose exceptions cross into Rust frames should keep the shared one. It took the
//!   `procpool` command's own run from 1.11 to 1.00 ms, and a pool of two to its first result
//!   from 1.84 to 1.67 ms with Forkserver and from 1.70 to 1.60 ms with Spawn (medians of
//!   61 runs each, interleaved, at real-time priority, load 7).
//! - Each other shared library: about 0.09 ms for `libm` (which procpool does not need;
//!   the `procpool` command loads it for its progress bar).
//! - Rust's runtime start before `main`: about 0.13 ms there, 0.09 ms of which is the C
//!   library reading `/proc/self/maps` to find the main thread's stack.
//! - Relocations: packing them (`-z pack-relative-relocs`, glibc 2.36 or later) made no
//!   difference that could be measured.
//!
//! One cost no way of linking removes: glibc's own start-up, in every program it runs
//! (static or dynamic, `/bin/true` as well), asks the CPU for its features and cache sizes
//! with `cpuid`, tens of times. On the virtual machine of `BENCHMARKS.md`, the day this was
//! measured, one `cpuid` took 3.6 µs, and in a profile of 150 Spawn pool starts that
//! probing was a sixth of each worker's CPU time from its exec to its exit, and more than a
//! quarter of `/bin/true`'s.
//! Forkserver and Fork workers are forked, not executed, and never pay it.
//!
//! Linking statically (`-C target-feature=+crt-static` on a `*-linux-gnu` target, or a
//! musl target) removes all of the loading: the same command then started in 0.68 ms, and a
//! pool of two with Forkserver reached its first result about 0.4 ms sooner than with the
//! default dynamic build (shared unwinder included). procpool works
//! the same (a statically linked glibc cannot load the modules some user and host name
//! lookups need; musl has no such limit). Where pools are built often (a short-lived
//! command), that is worth it. Give the flag with an explicit target, so that it does not
//! reach build scripts and procedural macros, which cannot be linked statically:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
//! ```
//!
//! The `procpool` command is shipped that way (`cargo xtask bench` measures it so, and
//! `cargo xtask test` runs its tests so too): there, a pool of two reached its first
//! result with Forkserver in 0.82x the time of the dynamic build, with Spawn in 0.69x, and
//! with Fork, whose workers are forked from a process with fewer pages to copy, in 0.89x
//! (medians of 15 interleaved runs each, at real-time priority); one run of the command
//! took 0.61x as long.
//!
//! Adding `-C relocation-model=static` makes a program at a fixed address instead of a
//! static PIE, which rewrites its own pointers (some thousands in a program like this one)
//! at each start: a pool of two with Forkserver then reached its first result in another
//! 0.82x the time. The price is that the program's own code and data are no longer placed
//! at a random address; the `procpool` command keeps that protection.
//!
//! # Failures
//!
//! Every task ends with exactly one outcome: its value, or a [`TaskError`] saying what
//! happened: the task panicked (the worker survives), its worker died while running it (pid,
//! exit code or signal named; the worker is replaced at once, and tasks queued to it that
//! had not started run elsewhere), it could not be encoded or decoded, its initializer keeps
//! failing, or the pool was closed. No task runs twice: a worker sends each result before
//! it starts its next task and counts the tasks it begins on a page it shares with the
//! pool, so when a worker dies the pool knows whether it was running a task, and which;
//! tasks it had been sent but not begun run elsewhere. Of a chunk of a `map` whose worker
//! died, the items that finished are delivered (each worker keeps its results on a page
//! shared with the pool as each item ends), the one that was running fails, and the ones
//! after it run on another worker.
//!
//! Each worker holds a few tasks at a time so that short tasks do not wait on round trips:
//! one while their length is unknown or when they take 20 ms or more (so no task waits
//! behind a long one while another worker idles), and below that as many as take about half
//! a millisecond together, up to 1024 ([`Metrics::in_flight_per_worker`] shows the current depth,
//! [`PoolBuilder::in_flight_per_worker`] bounds or fixes it). No more than `processes`
//! workers run tasks at once, recycling included. Nothing hangs: a dead worker is noticed
//! from its channel and its pidfd, not by polling.
//!
//! A worker is trusted only as far as its messages make sense: one that sends a message out
//! of order (a setup report once it runs tasks, a result before it is ready), or whose
//! message stops arriving partway for five seconds, is killed as faulty, and only the task
//! it was running fails, saying why.
//!
//! Some edges, and what to do about them:
//!
//! - **Processes a task starts outlive a clean exit.** A time limit, a cancel, `terminate`
//!   or the drop of a pool kill a worker's whole process group, so what its tasks started
//!   dies with it. A worker that retires cleanly (after `close` and `join`, or recycled by
//!   [`PoolBuilder::max_tasks_per_child`]) leaves alone the processes its tasks started and
//!   did not wait for, as Python's pool does: a task that starts a child should wait for it,
//!   or the child should be meant to outlive the task.
//! - **A callback must not wait for another result of its pool.** Callbacks
//!   ([`Options::on_success`], [`Options::on_error`]) run one at a time on the pool's
//!   callback thread, and a result with callbacks becomes ready only after its callbacks
//!   ran there: a callback that waits for it (`get`, `wait`) waits for ever, as in Python.
//!   Hand the work to another thread, or chain it through that result's own callback.
//! - **Backtraces cost once per worker.** With `RUST_BACKTRACE` set, a panic in a task
//!   carries its backtrace ([`TaskError::backtrace`]); the first one in each worker reads
//!   the executable's debug information (about a tenth of a second for a large binary, as
//!   in any Rust program's first backtrace). Recycling every few tasks pays it again each
//!   time; leave `RUST_BACKTRACE` unset where panics are frequent and expected.
//!
//! # Task control: time limits, cancellation, memory limits
//!
//! ```
//! use std::time::Duration;
//! use procpool::{CancelOutcome, Options, Pool, TaskErrorKind};
//!
//! fn slow(ms: u64) -> u64 {
//!     std::thread::sleep(Duration::from_millis(ms));
//!     ms
//! }
//!
//! fn main() -> Result<(), procpool::Error> {
//!     procpool::init();
//!     let pool = Pool::builder()
//!         .processes(2)
//!         .task_timeout(Duration::from_secs(60)) // every task; a call's Options override it
//!         .max_memory_per_child(512 << 20) // recycle a worker grown past 512 MiB
//!         .build()?;
//!     // A limit per call, from when the task begins in its worker.
//!     let e = pool
//!         .apply_with(slow, (5_000,), Options::new().timeout(Duration::from_millis(50)))
//!         .unwrap_err();
//!     assert_eq!(e.kind(), TaskErrorKind::TimedOut);
//!     // Cancel: what has not begun never runs; what runs has its worker stopped.
//!     let r = pool.apply_async(slow, (5_000,));
//!     std::thread::sleep(Duration::from_millis(100));
//!     assert_eq!(r.cancel(), CancelOutcome::WhileRunning);
//!     assert!(r.get().unwrap_err().is_cancelled());
//!     // Waiting is not failing: a wait that runs out says so, apart from the task's result.
//!     let r = pool.apply_async(slow, (200,));
//!     assert!(r.get_timeout(Duration::from_millis(1)).is_err()); // WaitError::TimedOut
//!     assert_eq!(r.get_timeout(Duration::from_secs(10)).unwrap()?, 200);
//!     pool.close();
//!     pool.join()?;
//!     Ok(())
//! }
//! ```
//!
//! A time limit ([`PoolBuilder::task_timeout`], [`Options::timeout`]) counts from when the
//! task begins in its worker, not from its submission. Past it, the worker's process group
//! gets SIGTERM (a worker answers by killing its whole group, so the processes a task
//! started die with it, even those that ignore SIGTERM), then SIGKILL after
//! [`PoolBuilder::stop_grace`]; the task fails with [`TaskErrorKind::TimedOut`] naming the
//! limit, how long it ran, the worker and the function; the worker is replaced at once and
//! the tasks queued to it run elsewhere. In a `map`, the limit applies to each item.
//! [`AsyncResult::cancel`] (also on a whole `map`) says what it did ([`CancelOutcome`]);
//! dropping an [`Imap`] cancels the items it sent that have not begun.
//! [`PoolBuilder::memory_limit_per_child`] caps a worker's memory: a task that goes over it
//! fails with [`TaskErrorKind::MemoryLimit`] instead of waking the kernel's OOM killer.
//!
//! # Stopping tasks cooperatively
//!
//! An [`Event`] is a process-shared flag that can be passed to tasks as an argument; tasks
//! poll it and return early, and the pool stays usable (Python's pattern of a managed
//! `Event`, without a manager process).
//!
//! # Large payloads without copies
//!
//! Arguments and results travel encoded (postcard); payloads above 256 KiB go through a
//! shared-memory ring instead of the socket, and byte strings (`serde_bytes::ByteBuf`,
//! `Vec<u8>`) take shortcuts, but their bytes are still copied on the way. A
//! [`SharedBytes`] is not: it is made once in sealed shared memory, and only its descriptor
//! crosses to the worker (and back, as a result), which maps the same bytes.
//!
//! # Signals (Ctrl-C, SIGTERM)
//!
//! Workers ignore SIGINT, so a Ctrl-C at a terminal reaches only the program. What happens
//! then is the program's choice:
//!
//! - **Default handlers**: SIGINT or SIGTERM ends the program at once. Every worker and
//!   the fork server (or Fork's zygote) have a parent-death signal and die with it: a
//!   program holding a busy pool leaves no process behind, within a couple of milliseconds
//!   (measured: about 1 ms after the signal under each start method). Running tasks are
//!   lost, of course.
//! - **A handler that drops the pool** (with the `signal-hook` or `ctrlc` crate, say: set a
//!   flag, and let the main thread drop the pool when it sees it): the drop terminates the
//!   pool in order: unfinished tasks fail with
//!   [`TaskErrorKind::PoolClosed`], workers get SIGTERM (their process group, so processes
//!   they started too) and SIGKILL after a grace, and every worker and the fork server are
//!   reaped before `drop` returns (about 1 ms for two busy workers). To let queued work
//!   finish instead, call [`Pool::close`] and [`Pool::join`] there, or
//!   [`Pool::join_timeout`] to bound the wait.
//!
//! # Watching and steering a pool
//!
//! - **tracing**: a span per pool (`pool{id start_method processes}`) and per task
//!   (`task{task function item items worker pid queue_wait run_time}`), with events at
//!   each step of a task (`task queued`, `task sent` at trace level; `task started`,
//!   `task finished`, `task failed` with its `kind` at debug) and of a worker
//!   (`worker started`, `worker ready`, `worker replaced`, `worker recycled` with its
//!   `reason`, `worker died` with its `status`). With no subscriber listening they cost a
//!   check of a cached flag each. `examples/pool_life.rs` prints a pool's life.
//! - [`Pool::metrics`]: a serde-serializable [`Metrics`] snapshot: outcomes by kind,
//!   recycles by reason, worker starts and deaths, queue depth, queue-wait and run-time
//!   summaries with histograms; its docs say how to export it to Prometheus or
//!   OpenTelemetry.
//! - [`Pool::workers`]: per worker, its tasks done, the task it runs and for how long, its
//!   resident memory.
//! - [`Pool::resize`]: grow or shrink a live pool; [`PoolBuilder::max_queued`]:
//!   backpressure for producers faster than the pool; [`AsyncResult::progress`]: items
//!   done of a long map (`examples/map_progress.rs` draws a bar).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

pub use pool_core::{
    AsyncResult, BuildError, BuildErrorKind, CancelOutcome, Error, ErrorKind, Event, Imap, Metrics,
    Options, Outcomes, Pool, PoolBuilder, Progress, QueueFull, Recycles, SharedBytes, Summary,
    Task, TaskError, TaskErrorKind, WaitError, WorkerInfo,
};
pub use pool_spawn::task::{InitOutput, TaskFn};
pub use pool_spawn::{
    ExitStatus, ProcessInfo, StartMethod, current_process, enable_test_support, seed_pid,
};

/// Worker entry: call it first in `main`.
///
/// In the parent it makes the seed Forkserver pools fork their servers from (see the crate
/// docs, "Start methods"), then returns. In a process the pool started as a worker (or as
/// its fork server) it runs that role and never returns. Anything `main` does before this
/// line also happens in every spawned worker.
pub fn init() {
    pool_spawn::init();
}
