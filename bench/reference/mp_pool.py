#!/usr/bin/env python3
"""CPython reference for `cargo xtask bench`: multiprocessing.Pool on the standard workloads.

Usage:
    python3 mp_pool.py --method fork|spawn|forkserver|all --workload NAME|all --runs N [--quick]
                       [--timeout SECS] [--victim waiter|holder]

Workloads: apply_rtt, map_tiny_chunk1, map_tiny_auto, echo_1mib, cpu_speedup, startup,
recycle, replace_latency, imap_memory (see SIZES for the counts; --quick scales them down),
and the task-control ones, which multiprocessing.Pool cannot do (it has no per-task time
limit and cannot cancel a running task): map_tiny_chunk1_timeout, timeout_latency and
cancel_latency run on pebble's ProcessPool when pebble is installed; without it,
timeout_latency and cancel_latency use a process per task watched by the calling thread
(the row says which), and map_tiny_chunk1_timeout reports "pebble not installed".
Units: "s" and "bytes" (lower is better), "tasks/s", "B/s" and "x" (higher is better).

Prints one JSON line per run on stdout:
    {"system":"cpython-<method>","workload":NAME,"value":...,"unit":...,"ok":true,"run":i,...}
or, when the run could not produce a figure:
    {"system":"cpython-<method>","workload":NAME,"unit":...,"ok":false,"reason":"...","run":i}

Each run executes in a fresh interpreter (a child of this script, in its own process
group), so no run inherits another's pool, memory or stuck threads, and a run that hangs is
killed by the driver after a hard time limit and reported as "timed out after Xs".  Inside
the run a softer alarm fires first, so a workload that can report partial progress (imap
memory) does so.  After a run that timed out, the remaining runs of that workload are
skipped (the row says how many in "skipped_runs"): a hang repeats, and more runs would
only spend the time budget.

Only the standard library is used, and pebble where it is installed.
"""

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOADS = [
    "apply_rtt",
    "apply_rtt_one_cpu",
    "apply_rtt_two_cpus",
    "map_tiny_chunk1",
    "imap_tiny_chunk1",
    "map_tiny_auto",
    "echo_1mib",
    "cpu_speedup",
    "startup",
    "recycle",
    "replace_latency",
    "imap_memory",
    "map_tiny_chunk1_timeout",
    "timeout_latency",
    "cancel_latency",
    "map_tiny_64w",
    "map_10m_memory",
]
METHODS = ["fork", "spawn", "forkserver"]
UNITS = {
    "apply_rtt": "s",
    "apply_rtt_one_cpu": "s",
    "apply_rtt_two_cpus": "s",
    "map_tiny_chunk1": "tasks/s",
    "imap_tiny_chunk1": "tasks/s",
    "map_tiny_auto": "tasks/s",
    "echo_1mib": "B/s",
    "cpu_speedup": "x",
    "startup": "s",
    "recycle": "tasks/s",
    "replace_latency": "s",
    "imap_memory": "bytes",
    "map_tiny_chunk1_timeout": "tasks/s",
    "timeout_latency": "s",
    "cancel_latency": "s",
    "map_tiny_64w": "tasks/s",
    "map_10m_memory": "bytes",
}

# Sizes per workload: (full, quick).  The same counts as `procpool bench`
# (pool-cli/src/bench.rs, `Scale`), so that fixed costs weigh the same on both sides;
# except the apply round trips, whose figure is the median of each call's time (no fixed
# cost in it): 5000 of CPython's calls, at 0.3-0.8 ms each, made one placement's
# references take 64 s on a slow machine (three contexts, three runs each), where 5000 of
# procpool's take a fraction of a second. A thousand samples are plenty for a median.
SIZES = {
    "apply_rtt": (1000, 500),  # round trips per run
    "apply_rtt_one_cpu": (1000, 500),
    "apply_rtt_two_cpus": (1000, 500),
    "map_tiny_chunk1": (20_000, 2_000),  # tasks
    "imap_tiny_chunk1": (20_000, 2_000),  # tasks
    "map_tiny_auto": (200_000, 20_000),  # tasks
    "echo_1mib": (200, 20),  # 1 MiB tasks
    "cpu_speedup": (16, 4),  # ~20 ms tasks
    "startup": (1, 1),
    "recycle": (200, 40),  # tasks, one per worker process
    "replace_latency": (1, 1),
    "imap_memory": (100_000, 5_000),  # results consumed
    "map_tiny_chunk1_timeout": (20_000, 2_000),  # tasks, each with a 10 s limit
    "timeout_latency": (7, 7),  # tasks that sleep forever under a 50 ms limit
    "cancel_latency": (7, 7),  # running tasks cancelled
    "map_tiny_64w": (20_000, 2_000),  # tasks, 64 processes
    "map_10m_memory": (10_000_000, 1_000_000),  # items
}
# Hard per-run limit enforced by the driver (seconds): (full, quick).
HARD_TIMEOUT = (120.0, 20.0)
# Soft limit inside the run (the alarm); a bit below the hard limit.
SOFT_MARGIN = 5.0

MIB = 1 << 20


# --------------------------------------------------------------------------- tasks
# Module-level so that spawn and forkserver workers can import them by name.


def square(x):
    return x * x


def sleep_forever():
    while True:
        time.sleep(3600)


def echo(b):
    return b


def burn(n):
    s = 0
    for i in range(n):
        s += i * i
    return s


def pid_after(delay):
    if delay:
        time.sleep(delay)
    return os.getpid()


# --------------------------------------------------------------------------- helpers


class SoftTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise SoftTimeout()


def rss_bytes(field="VmRSS:"):
    """Resident set size of this process (or the `field` line given, such as its peak
    "VmHWM:"), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def worker_pids(pool):
    # Pool._pool is the list of live worker Process objects; private but stable since 2.6.
    return [p.pid for p in list(pool._pool)]


def current_syscall(pid):
    """Number of the syscall `pid` is blocked in (0 = read, 202 = futex on x86-64), or None."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            field = f.read().split()[0]
        return int(field)
    except (OSError, ValueError, IndexError):
        return None


def calibrate_burn(target_s):
    n = 200_000
    while True:
        t0 = time.perf_counter()
        burn(n)
        dt = time.perf_counter() - t0
        if dt > 0.05:
            break
        n *= 2
    return max(1, int(n * target_s / dt))


# --------------------------------------------------------------------------- workloads
# Each returns (value, extra_dict); raising SoftTimeout or anything else is reported.


def _place(pool, two_cpus):
    """Holds every thread of this process on one CPU it may use, and every thread of the
    pool's workers on the same CPU, or (two_cpus) on another."""
    cpus = sorted(os.sched_getaffinity(0))
    if two_cpus and len(cpus) < 2:
        raise RuntimeError(f"needs two CPUs; this process may use {cpus}")
    ours, theirs = (cpus[1], cpus[0]) if two_cpus else (cpus[0], cpus[0])
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {ours})
    for p in pool._pool:
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            os.sched_setaffinity(int(tid), {theirs})


def w_apply_rtt(ctx, n, state, placement=None):
    with ctx.Pool(2) as pool:
        for _ in range(50):
            pool.apply(square, (7,))
        if placement is not None:
            _place(pool, placement == "two_cpus")
            for _ in range(50):
                pool.apply(square, (7,))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = pool.apply(square, (7,))
            times.append(time.perf_counter() - t0)
            assert r == 49
        return statistics.median(times), {"calls": n, "mean_s": statistics.fmean(times)}


def w_apply_rtt_one_cpu(ctx, n, state):
    return w_apply_rtt(ctx, n, state, "one_cpu")


def w_apply_rtt_two_cpus(ctx, n, state):
    return w_apply_rtt(ctx, n, state, "two_cpus")


def _map_throughput(ctx, n, chunksize):
    with ctx.Pool(2) as pool:
        pool.map(square, range(200), chunksize=1)  # warm up, all workers alive
        t0 = time.perf_counter()
        out = pool.map(square, range(n), chunksize=chunksize)
        dt = time.perf_counter() - t0
        assert len(out) == n and out[-1] == (n - 1) ** 2
        return n / dt, {"tasks": n, "elapsed_s": dt}


def w_map_tiny_chunk1(ctx, n, state):
    return _map_throughput(ctx, n, 1)


def w_imap_tiny_chunk1(ctx, n, state):
    with ctx.Pool(2) as pool:
        pool.map(square, range(200), chunksize=1)  # warm up, all workers alive
        t0 = time.perf_counter()
        got = 0
        for r in pool.imap(square, range(n), chunksize=1):
            assert r == got * got
            got += 1
        dt = time.perf_counter() - t0
        assert got == n
        return n / dt, {"tasks": n, "elapsed_s": dt}


def w_map_tiny_auto(ctx, n, state):
    return _map_throughput(ctx, n, None)


def w_map_tiny_64w(ctx, n, state):
    with ctx.Pool(64) as pool:
        pool.map(square, range(6400), chunksize=1)
        t0 = time.perf_counter()
        out = pool.map(square, range(n), chunksize=1)
        dt = time.perf_counter() - t0
        assert len(out) == n
    return n / dt, {"tasks": n, "processes": 64}


def w_map_10m_memory(ctx, n, state):
    """Peak parent RSS growth over pool.map(square, range(n)) (VmHWM, reset first)."""
    with ctx.Pool(2) as pool:
        pool.map(square, range(100))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_bytes()
        out = pool.map(square, range(n))
        peak = rss_bytes("VmHWM:")
        assert len(out) == n
    return peak - base, {"items": n}


def w_echo_1mib(ctx, n, state):
    payload = os.urandom(MIB)
    with ctx.Pool(2) as pool:
        pool.map(square, range(10), chunksize=1)
        t0 = time.perf_counter()
        out = pool.map(echo, [payload] * n, chunksize=1)
        dt = time.perf_counter() - t0
        assert len(out) == n and out[0] == payload and out[-1] == payload
        moved = 2 * n * MIB
        return moved / dt, {"tasks": n, "bytes_moved": moved, "elapsed_s": dt}


def w_cpu_speedup(ctx, n, state):
    iters = calibrate_burn(0.020)
    times = {}
    for procs in (1, 2):
        with ctx.Pool(procs) as pool:
            pool.map(square, range(procs * 4), chunksize=1)
            pool.map(burn, [iters // 10] * procs, chunksize=1)  # warm the worker code path
            t0 = time.perf_counter()
            pool.map(burn, [iters] * n, chunksize=1)
            times[procs] = time.perf_counter() - t0
    return times[1] / times[2], {
        "tasks": n,
        "task_iters": iters,
        "t_pool1_s": times[1],
        "t_pool2_s": times[2],
    }


def w_startup(ctx, n, state):
    t0 = time.perf_counter()
    pool = ctx.Pool(2)
    try:
        r = pool.apply(square, (7,))
        dt = time.perf_counter() - t0
        assert r == 49
    finally:
        pool.terminate()
        pool.join()
    return dt, {}


def w_recycle(ctx, n, state):
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        pool.map(square, range(2), chunksize=1)
        t0 = time.perf_counter()
        out = pool.map(square, range(n), chunksize=1)
        dt = time.perf_counter() - t0
        assert len(out) == n
        return n / dt, {"tasks": n, "elapsed_s": dt}


def w_replace_latency(ctx, n, state):
    """SIGKILL an idle worker; time until a new worker exists and has completed a task.

    An idle CPython worker is blocked either reading the task pipe while holding the
    queue's read lock, or waiting for that lock.  Killing the lock holder leaves the lock
    held forever and the pool never runs another task (so a pool of one worker cannot do
    this workload at all), hence a pool of two, and the victim is the worker that waits
    for the lock (seen through /proc/<pid>/syscall): CPython's best case.  `--victim
    holder` kills the lock holder instead, to show the hang.

    Right after the kill two tasks go in: a 0.3 s sleep, which the surviving worker (the
    lock holder) takes, then an instant probe, which stays queued until the replacement
    is ready and takes it.  Nothing spins while the replacement starts.
    """
    victim_kind = state.get("victim", "waiter")
    hold = 0.3
    pool = ctx.Pool(2)
    try:
        # Warm up and let both workers settle into their idle waits.
        pool.map(pid_after, [0.01, 0.01], chunksize=1)
        time.sleep(0.2)
        old = worker_pids(pool)
        want = 202 if victim_kind == "waiter" else 0  # futex / read
        calls = {pid: current_syscall(pid) for pid in old}
        victims = [pid for pid, sc in calls.items() if sc == want]
        victim = victims[0] if victims else old[0]
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        t_appear = None
        rounds = 0
        while True:
            rounds += 1
            pool.apply_async(pid_after, (hold,))
            probe = pool.apply_async(pid_after, (0,))
            while not probe.ready():
                if t_appear is None and any(p not in old for p in worker_pids(pool)):
                    t_appear = time.perf_counter() - t0
                probe.wait(0.0005)
            if probe.get() not in old:
                t_done = time.perf_counter() - t0
                break
        return t_done, {
            "appear_s": t_appear,
            "rounds": rounds,
            "victim": victim_kind,
            "victim_syscall": calls.get(victim),
        }
    except SoftTimeout:
        # Terminating a wedged pool blocks on the same lock; leave the cleanup to the
        # driver, which kills this run's process group.
        state["wedged"] = True
        raise SoftTimeout(
            "replacement never completed a task: the killed worker held the task "
            "queue's read lock, so the pool is wedged"
        )
    except BaseException:
        state["wedged"] = True
        raise
    finally:
        if not state.get("wedged"):
            pool.terminate()
            pool.join()


def w_imap_memory(ctx, n, state):
    """Consume `n` results of imap over an endless generator; report parent RSS growth.

    The value is the peak RSS growth over the pre-run baseline, sampled every 1000
    results.  `extra.produced` counts how far the pool read ahead of the consumer.
    """
    produced = [0]

    def endless():
        for i in itertools.count():
            produced[0] = i + 1
            yield i

    samples = []
    with ctx.Pool(2) as pool:
        pool.map(square, range(10), chunksize=1)
        base = rss_bytes()
        t0 = time.perf_counter()
        consumed = 0
        peak = base
        try:
            for r in pool.imap(square, endless()):
                consumed += 1
                if consumed % 1000 == 0:
                    now = rss_bytes()
                    peak = max(peak, now)
                    if consumed % min(20000, n) == 0:
                        samples.append((consumed, produced[0], now - base))
                if consumed >= n:
                    break
        except SoftTimeout:
            now = rss_bytes()
            peak = max(peak, now)
            state["wedged"] = True  # skip the pool's shutdown; the driver cleans up
            state["partial"] = {
                "value": peak - base,
                "extra": {
                    "consumed": consumed,
                    "produced": produced[0],
                    "elapsed_s": time.perf_counter() - t0,
                    "stopped": "time limit",
                },
            }
            raise
        dt = time.perf_counter() - t0
        end = rss_bytes()
        peak = max(peak, end)
        extra = {
            "end_growth": end - base,
            "consumed": consumed,
            "produced": produced[0],
            "elapsed_s": dt,
            "samples": samples[-5:],
        }
        # Stop the feeder thread from reading the endless generator while we shut down.
        pool.terminate()
        return peak - base, extra


def _pebble():
    try:
        import pebble  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return pebble


TIMEOUT_LIMIT = 0.05


def w_map_tiny_chunk1_timeout(ctx, n, state):
    pebble = _pebble()
    if pebble is None:
        raise RuntimeError("pebble not installed (pip install pebble)")
    with pebble.ProcessPool(max_workers=2, context=ctx) as pool:
        list(pool.map(square, range(200), chunksize=1, timeout=10).result())
        t0 = time.perf_counter()
        out = list(pool.map(square, range(n), chunksize=1, timeout=10).result())
        dt = time.perf_counter() - t0
        assert len(out) == n
        return n / dt, {"tasks": n, "elapsed_s": dt, "via": f"pebble {pebble.__version__}"}


def w_timeout_latency(ctx, n, state):
    """A task that sleeps forever under a 50 ms limit: time from the limit to the error."""
    pebble = _pebble()
    times = []
    if pebble is not None:
        from concurrent.futures import TimeoutError as FutTimeout  # noqa: PLC0415

        with pebble.ProcessPool(max_workers=1, context=ctx) as pool:
            for _ in range(n):
                pool.schedule(square, (7,)).result()
                t0 = time.perf_counter()
                f = pool.schedule(sleep_forever, timeout=TIMEOUT_LIMIT)
                try:
                    f.result()
                    raise AssertionError("no time-out")
                except FutTimeout:
                    pass
                times.append(time.perf_counter() - t0 - TIMEOUT_LIMIT)
        via = f"pebble {pebble.__version__}"
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            p = ctx.Process(target=sleep_forever)
            p.start()
            p.join(TIMEOUT_LIMIT)
            p.terminate()
            p.join()
            times.append(time.perf_counter() - t0 - TIMEOUT_LIMIT)
        via = "a process per task watched by the calling thread (pebble not installed)"
    return statistics.median(times), {"tasks": n, "via": via}


def w_cancel_latency(ctx, n, state):
    """Cancel a running task: time from the cancel to its error."""
    pebble = _pebble()
    times = []
    if pebble is not None:
        from concurrent.futures import CancelledError  # noqa: PLC0415

        with pebble.ProcessPool(max_workers=1, context=ctx) as pool:
            for _ in range(n):
                pool.schedule(square, (7,)).result()
                f = pool.schedule(sleep_forever)
                time.sleep(0.02)
                t0 = time.perf_counter()
                f.cancel()
                try:
                    f.result()
                    raise AssertionError("not cancelled")
                except CancelledError:
                    pass
                times.append(time.perf_counter() - t0)
        via = f"pebble {pebble.__version__}"
    else:
        for _ in range(n):
            p = ctx.Process(target=sleep_forever)
            p.start()
            time.sleep(0.02)
            t0 = time.perf_counter()
            p.terminate()
            p.join()
            times.append(time.perf_counter() - t0)
        via = "a process per task, terminated by the calling thread (pebble not installed)"
    return statistics.median(times), {"tasks": n, "via": via}


FUNCS = {name: globals()["w_" + name] for name in WORKLOADS}


# --------------------------------------------------------------------------- one run


def one_run(method, workload, quick, soft_timeout, victim):
    system = f"cpython-{method}"
    row = {"system": system, "workload": workload, "unit": UNITS[workload]}
    ctx = mp.get_context(method)
    n = SIZES[workload][1 if quick else 0]
    state = {"victim": victim}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    t0 = time.perf_counter()
    try:
        value, extra = FUNCS[workload](ctx, n, state)
        signal.setitimer(signal.ITIMER_REAL, 0)
        row.update(value=value, ok=True, extra=extra)
    except SoftTimeout as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        partial = state.get("partial")
        if partial is not None:
            row.update(
                value=partial["value"],
                ok=True,
                extra=partial["extra"],
                note=f"stopped at the {soft_timeout:.0f}s limit; value is growth so far",
            )
        else:
            msg = str(e) or "no result"
            row.update(ok=False, reason=f"timed out after {soft_timeout:.0f}s: {msg}")
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not crash
        signal.setitimer(signal.ITIMER_REAL, 0)
        row.update(ok=False, reason=f"{type(e).__name__}: {e}")
    row["wall_s"] = round(time.perf_counter() - t0, 4)
    print(json.dumps(row), flush=True)
    if not row["ok"] or state.get("wedged"):
        # Leave at once: a wedged pool's threads must not keep this interpreter alive;
        # the driver kills the process group and removes leftover semaphores.
        os._exit(0)
    # Otherwise exit normally so multiprocessing's finalizers release semaphores.


# --------------------------------------------------------------------------- driver


def _shm_semaphores():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


def _last_row(out):
    row = None
    for line in (out or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                pass
    return row


def drive(method, workload, runs, quick, hard_timeout, victim):
    system = f"cpython-{method}"
    soft = max(1.0, hard_timeout - SOFT_MARGIN)
    for i in range(runs):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--one-run",
            "--method",
            method,
            "--workload",
            workload,
            "--soft-timeout",
            str(soft),
            "--victim",
            victim,
        ]
        if quick:
            cmd.append("--quick")
        sems_before = _shm_semaphores()
        # Output goes to files, not pipes: a wedged run's workers keep inherited
        # descriptors open, and only the run's main process is waited for.
        with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
            proc = subprocess.Popen(
                cmd, stdout=fout, stderr=ferr, start_new_session=True, text=True
            )
            timed_out = False
            try:
                proc.wait(timeout=hard_timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            fout.seek(0)
            ferr.seek(0)
            out, err = fout.read(), ferr.read()
        # The run's whole process group: workers, fork server, resource tracker.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        # Semaphores a killed run could not unlink (spawn/forkserver name them in /dev/shm).
        for name in _shm_semaphores() - sems_before:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        row = _last_row(out)
        if row is None:
            if timed_out:
                reason = f"timed out after {hard_timeout:.0f}s"
            else:
                tail = " | ".join((err or "").strip().splitlines()[-3:])
                reason = f"run produced no result (exit {proc.returncode}): {tail}"
            row = {
                "system": system,
                "workload": workload,
                "unit": UNITS[workload],
                "ok": False,
                "reason": reason,
            }
        elif timed_out:
            row["note"] = (row.get("note", "") + " (run hung on shutdown; killed)").strip()
        row["run"] = i
        row["quick"] = quick
        stop = not row.get("ok") and "timed out" in row.get("reason", "")
        if stop and i + 1 < runs:
            # A hang repeats; more runs would only spend the time budget.
            row["skipped_runs"] = runs - i - 1
        print(json.dumps(row), flush=True)
        if stop:
            break


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=METHODS + ["all"])
    ap.add_argument("--workload", required=True, choices=WORKLOADS + ["all"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller counts, short time limits")
    ap.add_argument(
        "--timeout", type=float, default=None, help="hard per-run limit in seconds"
    )
    ap.add_argument(
        "--victim",
        choices=["waiter", "holder"],
        default="waiter",
        help="replace_latency: kill the worker waiting for the queue lock (default) or the one holding it",
    )
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--soft-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.one_run:
        one_run(a.method, a.workload, a.quick, a.soft_timeout, a.victim)
        return 0
    hard = a.timeout if a.timeout is not None else HARD_TIMEOUT[1 if a.quick else 0]
    methods = METHODS if a.method == "all" else [a.method]
    workloads = WORKLOADS if a.workload == "all" else [a.workload]
    for m in methods:
        for w in workloads:
            drive(m, w, a.runs, a.quick, hard, a.victim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
