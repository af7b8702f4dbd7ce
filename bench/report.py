#!/usr/bin/env python3
"""Benchmark report: JSON-lines results in; markdown tables, results.json, a ratio chart out.

Usage:
    python3 bench/report.py RESULTS.jsonl [MORE.jsonl ...] [--out DIR] [--mode quick|full]
                            [--command "cargo xtask bench ..."] [--date YYYY-MM-DD] [--demo]

Input rows (one JSON object a line; other lines are ignored):
    {"system": "procpool-forkserver", "workload": "apply_rtt", "value": 1.2e-5,
     "unit": "s", "ok": true, ...}
    {"system": "procspawn", "workload": "imap_memory", "unit": "bytes",
     "ok": false, "reason": "..."}
A row may carry "runs": [v1, v2, ...] instead of (or besides) "value"; otherwise each
row is one run.  Extra keys ("note", "extra", "run", "quick", "wall_s") are kept.

Output:
    stdout             markdown: a table of medians per workload and system, and a table
                       of ratios procpool-<method> / cpython-<method> (and / procspawn)
    DIR/results.json   everything computed, plus the input rows
    DIR/ratios.svg     bar chart of the ratios, log scale
    DIR/BENCHMARKS.md  the tables, the chart, the machine, the date and the notes
DIR defaults to target/bench under the repository root.

--demo renders the chart even when there are no procpool rows, by putting another
system in the numerator (procspawn, or --demo-ours NAME); the chart's title then says
DEMO.  Nothing is made up: every bar comes from rows in the input.

Only the standard library is used (no matplotlib).
"""

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from collections import OrderedDict, defaultdict
from html import escape

WORKLOADS = [
    "apply_rtt",
    "apply_rtt_one_cpu",
    "apply_rtt_two_cpus",
    "map_tiny_chunk1",
    "imap_tiny_chunk1",
    "map_tiny_auto",
    "echo_1mib",
    "echo_1mib_shared",
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
TITLES = {
    "apply_rtt": "apply round trip",
    "apply_rtt_one_cpu": "apply round trip, caller and worker on one CPU",
    "apply_rtt_two_cpus": "apply round trip, caller and worker on two CPUs",
    "map_tiny_chunk1": "map 20k tiny, chunk 1",
    "imap_tiny_chunk1": "imap 20k tiny, chunk 1, each result taken in order",
    "map_tiny_auto": "map 200k tiny, auto chunk",
    "echo_1mib": "200 × 1 MiB echo",
    "echo_1mib_shared": "200 × 1 MiB echo, SharedBytes (no copy)",
    "cpu_speedup": "CPU-bound speedup (2 vs 1)",
    "startup": "start to first result",
    "recycle": "max_tasks_per_child=1",
    "replace_latency": "SIGKILL → replacement",
    "imap_memory": "imap endless: parent RSS growth",
    "map_tiny_chunk1_timeout": "map 20k tiny, chunk 1, each with a time limit",
    "timeout_latency": "50 ms limit → TimedOut error, past the limit",
    "cancel_latency": "cancel a running task → its error",
    "map_tiny_64w": "map 20k tiny, chunk 1, 64 processes",
    "map_10m_memory": "map 10M tiny: parent peak RSS growth",
}
# The unit of each workload, for rows that do not carry one (failure rows often do not).
UNITS = {
    "apply_rtt": "s",
    "apply_rtt_one_cpu": "s",
    "apply_rtt_two_cpus": "s",
    "map_tiny_chunk1": "tasks/s",
    "imap_tiny_chunk1": "tasks/s",
    "map_tiny_auto": "tasks/s",
    "echo_1mib": "B/s",
    "echo_1mib_shared": "B/s",
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
METHODS = ["forkserver", "spawn", "fork"]
SYSTEM_ORDER = (
    [f"procpool-{m}" for m in METHODS] + [f"cpython-{m}" for m in METHODS] + ["procspawn"]
)
LOWER_IS_BETTER = {"s", "bytes"}
# imap growth can be ~0; ratios use at least one page so they stay finite.
BYTES_FLOOR = 4096
COLOURS = {
    "forkserver": "#1f77b4",
    "spawn": "#ff7f0e",
    "fork": "#2ca02c",
    "procspawn": "#9467bd",
    "default": "#8c564b",
}


# ------------------------------------------------------------------------- input


RAW_SYSTEM = "raw-pipe"
# Floors: systems named raw-* are the machine's own costs, measured in the same run (no
# pool); they are kept out of the tables. Each goal is a ratio of a procpool figure to one:
# (workload, floor system, floor workload, what the floor is, goal, "max" or "min").
FLOOR_GOALS = [
    ("apply_rtt", "raw-pipe", "apply_rtt", "pipe round trip, 1 byte", 1.3, "max"),
    ("apply_rtt", "raw-socket", "apply_rtt", "socketpair round trip, 1 byte, poll + read", None, None),
    ("apply_rtt_one_cpu", "raw-pipe", "apply_rtt_one_cpu", "pipe round trip, 1 byte, on one CPU", 1.3, "max"),
    ("apply_rtt_one_cpu", "raw-socket", "apply_rtt_one_cpu", "socketpair round trip, 1 byte, poll + read, on one CPU", None, None),
    ("apply_rtt_two_cpus", "raw-pipe", "apply_rtt_two_cpus", "pipe round trip, 1 byte, on two CPUs", 1.3, "max"),
    ("startup", "raw-exec", "startup", "fork + exec(/bin/true) + wait", 1.5, "max"),
    ("startup", "raw-exec", "startup_self", "fork + exec(procpool -V) + wait (informative)", None, None),
    ("startup", "raw-exec", "startup_executed", "forkserver pool of 2 to first result, server executed: PROCPOOL_SEED=0 (informative)", None, None),
    ("recycle", "raw-fork", "fork_rate", "bare fork + _exit + waitpid, rate", 0.60, "min"),
    ("echo_1mib", "raw-ring", "echo_1mib", "1 MiB payloads through the shared ring", 0.50, "min"),
    ("echo_1mib_shared", "raw-ring", "echo_1mib", "1 MiB payloads through the shared ring", None, None),
    ("echo_1mib", "raw-copy", "echo_1mib", "memcpy of distinct 1 MiB buffers, one thread (informative)", None, None),
]
FLOOR_TITLES = {
    ("raw-pipe", "apply_rtt"): "pipe round trip, 1 byte (no pool, no encoding)",
    ("raw-pipe", "apply_rtt_one_cpu"): "pipe round trip, 1 byte, both processes held on one CPU",
    ("raw-pipe", "apply_rtt_two_cpus"): "pipe round trip, 1 byte, the two processes held on two different CPUs",
    ("raw-socket", "apply_rtt"): "Unix socketpair round trip, 1 byte, each side in poll() then read() (the pool's transport and wait, no pool)",
    ("raw-socket", "apply_rtt_one_cpu"): "the same socketpair round trip, both processes held on one CPU",
    ("raw-fork", "fork_rate"): "bare fork + _exit + waitpid, one after another (rate)",
    ("raw-fork", "fork_latency"): "bare fork + _exit + waitpid (median latency)",
    ("raw-exec", "startup"): "fork + exec(/bin/true) + wait (std::process, median)",
    ("raw-exec", "startup_executed"): "a forkserver pool of 2 to its first result, its server executed rather than forked from the seed (`PROCPOOL_SEED=0`; median of up to 25 runs, each in a process of its own): what the seed saves, not a floor",
    ("raw-exec", "startup_self"): "fork + exec of this procpool binary (`procpool -V`) + wait (std::process, median): one exec of the program itself, not a goal's floor",
    ("raw-ring", "echo_1mib"): "1 MiB payloads through pool-ipc's shared ring to another process",
    ("raw-copy", "echo_1mib"): "one thread copying echo_1mib's distinct 1 MiB buffers into as many others, no page fault timed: what memory allows payloads no cache holds (the ring's figure copies one payload the caches keep); not a goal's floor",
}


def floor_section(cells, floors):
    """Markdown lines: the floors measured in this run, and each goal as a ratio to one."""
    if not floors:
        return []
    out = ["## Floors (the machine's own costs, same run, no pool)", ""]
    out.append("| floor | figure |\n|---|---|")
    for key, c in sorted(floors.items()):
        if c.get("median") is None:
            continue
        out.append(
            f"| {FLOOR_TITLES.get(key, key[0] + ' ' + key[1])} | "
            f"{fmt_value(c['unit'], c['median'], c['spread'])} (n={c['n']}) |"
        )
    ours = sorted({s for s, _ in cells if s.startswith("procpool-")})
    rows = []
    for w, fs, fw, what, goal, kind in FLOOR_GOALS:
        f = floors.get((fs, fw))
        if not f or f.get("median") is None:
            continue
        for s in ours:
            c = cells.get((s, w))
            if not c or c.get("median") is None:
                continue
            r = c["median"] / f["median"]
            if goal is None:
                verdict, goal_text = "", ""
            elif kind == "max":
                verdict, goal_text = ("met" if r <= goal else "not met"), f"≤ {goal:g}x"
            else:
                verdict, goal_text = ("met" if r >= goal else "not met"), f"≥ {goal:.0%}"
            # Near its goal a figure gets the digits that tell which side it is on.
            near = goal is not None and abs(r - goal) < 0.01 * goal
            if kind == "min":
                shown = f"{r:.1%}" if near else f"{r:.0%}"
            else:
                shown = f"{r:.3f}x" if near else f"{r:.3g}x"
            rows.append(f"| {w} | {s} | {what} | {shown} | {goal_text} | {verdict} |")
    if rows:
        out += [
            "",
            "Goals as ratios of procpool's median to the floor's median in this run:",
            "",
            "| workload | system | floor | procpool / floor | goal | |\n|---|---|---|---|---|---|",
        ] + rows
    return out + [""]


def read_rows(paths):
    """The measured rows (those with "system" and "workload"), and how the procpool
    program measured is linked (its row {"build": ...}; its loading is part of startup)."""
    rows = []
    build = None
    for path in paths:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    print(f"report: {path}:{lineno}: not JSON, skipped", file=sys.stderr)
                    continue
                if "system" in row and "workload" in row:
                    rows.append(row)
                elif isinstance(row.get("build"), str):
                    build = row["build"]
    return rows, build


def summarize(rows):
    """Per (system, workload): values of good runs, failures, unit, notes."""
    cells = defaultdict(
        lambda: {"values": [], "failures": [], "unit": None, "notes": [], "quick": False}
    )
    for r in rows:
        c = cells[(r["system"], r["workload"])]
        if r.get("unit"):
            c["unit"] = r["unit"]
        if r.get("quick"):
            c["quick"] = True
        if r.get("note") and r["note"] not in c["notes"]:
            c["notes"].append(r["note"])
        # How a reference measured a workload it has more than one way to run (CPython's
        # task-control rows: pebble, or a process per task without it).
        via = (r.get("extra") or {}).get("via")
        if via and f"measured with {via}" not in c["notes"]:
            c["notes"].append(f"measured with {via}")
        if r.get("ok", True) is False:
            c["failures"].append(r.get("reason", "failed"))
            continue
        vals = []
        if isinstance(r.get("runs"), list):
            vals.extend(float(v) for v in r["runs"] if isinstance(v, (int, float)))
        elif isinstance(r.get("value"), (int, float)):
            vals.append(float(r["value"]))
        c["values"].extend(v for v in vals if math.isfinite(v))
    out = {}
    for key, c in cells.items():
        v = sorted(c["values"])
        s = dict(c)
        s["unit"] = s["unit"] or UNITS.get(key[1])
        s["n"] = len(v)
        if v:
            med = statistics.median(v)
            s["median"] = med
            s["min"], s["max"] = v[0], v[-1]
            if len(v) >= 4:
                q = statistics.quantiles(v, n=4, method="inclusive")
                s["q1"], s["q3"] = q[0], q[2]
            # The spread shown in the table: the largest distance of any run from the median.
            s["spread"] = max(med - v[0], v[-1] - med)
        out[key] = s
    return out


# ------------------------------------------------------------------------- formatting


def fmt_num(x, digits=3):
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def scale_for(unit, x):
    """(factor, label) so that x / factor reads well."""
    ax = abs(x)
    if unit == "s":
        for f, lab in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if ax >= f or f == 1e-9:
                return f, lab
    if unit in ("tasks/s",):
        for f, lab in ((1e6, "M tasks/s"), (1e3, "k tasks/s"), (1, "tasks/s")):
            if ax >= f or f == 1:
                return f, lab
    if unit == "B/s":
        for f, lab in ((1 << 30, "GiB/s"), (1 << 20, "MiB/s"), (1 << 10, "KiB/s"), (1, "B/s")):
            if ax >= f or f == 1:
                return f, lab
    if unit == "bytes":
        for f, lab in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B")):
            if ax >= f or f == 1:
                return f, lab
    if unit == "x":
        return 1, "×"
    return 1, unit or ""


def fmt_value(unit, x, spread=None):
    f, lab = scale_for(unit, x)
    s = fmt_num(x / f)
    if spread is not None:
        s += f" ± {fmt_num(spread / f, 2) if spread else '0'}"
    return f"{s} {lab}".strip()


def short_reason(reasons):
    if not reasons:
        return "failed"
    # The most common reason; ties go to the first seen.
    counts = OrderedDict()
    for r in reasons:
        counts[r] = counts.get(r, 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1])[0]
    return best.replace("|", "/").replace("\n", " ")


def cell_text(s):
    if s is None:
        return "not run"
    if s["n"] == 0:
        why = short_reason(s["failures"])
        # A run killed at its time limit could, given longer: it did not fail to.
        return why if why.startswith("timed out") else "cannot: " + why
    text = fmt_value(s["unit"], s["median"], s["spread"]) + f" (n={s['n']})"
    if s["failures"]:
        text += f"; {len(s['failures'])} run(s) failed: " + short_reason(s["failures"])
    return text


# ------------------------------------------------------------------------- ratios


def ratio(ours, ref):
    """(ratio, low, high, why) with >1 meaning `ours` is better; ratio None when impossible."""
    if ours is None:
        return None, None, None, "ours not run"
    if ref is None:
        return None, None, None, "reference not run"
    if ours["n"] == 0:
        return None, None, None, "ours cannot (see figures)"
    if ref["n"] == 0:
        return None, None, None, "reference cannot (see figures)"
    unit = ours["unit"] or ref["unit"]
    floor = BYTES_FLOOR if unit == "bytes" else 0.0

    def r(o, f):
        o, f = max(o, floor), max(f, floor)
        if unit in LOWER_IS_BETTER:
            return f / o if o > 0 else math.inf
        return o / f if f > 0 else math.inf

    mid = r(ours["median"], ref["median"])
    # Range over the extremes of both sides: worst ours against best reference and back.
    if unit in LOWER_IS_BETTER:
        lo, hi = r(ours["max"], ref["min"]), r(ours["min"], ref["max"])
    else:
        lo, hi = r(ours["min"], ref["max"]), r(ours["max"], ref["min"])
    return mid, lo, hi, None


def ratio_columns(systems_present, ours_prefix="procpool"):
    """[(label, ours_system, ref_system, series_key)] for every comparison to draw."""
    cols = []
    for m in METHODS:
        cols.append((f"{ours_prefix}-{m} / cpython-{m}", f"{ours_prefix}-{m}", f"cpython-{m}", m))
    # Each system's default start method against the other's historical Linux default:
    # procpool's forkserver against CPython's fork.
    cols.append(
        (
            f"{ours_prefix}-forkserver / cpython-fork",
            f"{ours_prefix}-forkserver",
            "cpython-fork",
            "default",
        )
    )
    if "procspawn" in systems_present:
        cols.append(
            (f"{ours_prefix}-spawn / procspawn", f"{ours_prefix}-spawn", "procspawn", "procspawn")
        )
    return cols


def demo_columns(ours):
    """Comparisons for --demo: `ours` (one system) over each CPython method."""
    return [(f"{ours} / cpython-{m}", ours, f"cpython-{m}", m) for m in METHODS]


def fmt_ratio(mid, lo, hi, why):
    if mid is None:
        return "n/a: " + why
    if math.isinf(mid):
        return "∞"
    return f"{fmt_num(mid)} ({fmt_num(lo, 2)}–{fmt_num(hi, 2)})"


# ------------------------------------------------------------------------- machine


def machine_info():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown CPU",
        "cores": ncpu,
        "kernel": platform.release(),
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def machine_line(m):
    mem = f", {m['memory_bytes'] / (1 << 30):.0f} GiB" if m.get("memory_bytes") else ""
    return f"{m['cpu']}, {m['cores']} cores{mem}, Linux {m['kernel']}"


# ------------------------------------------------------------------------- SVG


def render_svg(series, workloads, title, subtitle, note, ylabel):
    """series: [(label, key, {workload: (mid, lo, hi) or None})]."""
    W, H = 1200, 620
    left, right, top, bottom = 80, 20, 92, 150
    pw, ph = W - left - right, H - top - bottom
    vals = [
        v
        for _, _, d in series
        for t in d.values()
        if t is not None
        for v in (t[0], t[1], t[2])
        if v is not None and v > 0 and math.isfinite(v)
    ]
    lo_dec, hi_dec = -1, 3  # 0.1 .. 1000
    if vals:
        lo_dec = min(lo_dec, math.floor(math.log10(min(vals))))
        hi_dec = max(hi_dec, math.ceil(math.log10(max(vals))))

    def y(v):
        v = min(max(v, 10.0**lo_dec), 10.0**hi_dec)
        return top + ph * (hi_dec - math.log10(v)) / (hi_dec - lo_dec)

    out = []
    a = out.append
    a(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
    )
    a(f'<rect width="{W}" height="{H}" fill="#ffffff"/>')
    a(f'<text x="{W / 2}" y="28" text-anchor="middle" font-size="18" font-weight="bold">{escape(title)}</text>')
    a(f'<text x="{W / 2}" y="50" text-anchor="middle" font-size="12" fill="#444">{escape(subtitle)}</text>')
    a(f'<text x="{W / 2}" y="68" text-anchor="middle" font-size="11" fill="#666">{escape(note)}</text>')
    # Gridlines, one per decade, and the axis label.
    for d in range(lo_dec, hi_dec + 1):
        gy = y(10.0**d)
        label = f"{10.0 ** d:g}"
        strong = d == 0
        style = 'stroke="#333" stroke-width="1.5"' if strong else 'stroke="#ccc" stroke-dasharray="4 3"'
        a(f'<line x1="{left}" x2="{left + pw}" y1="{gy:.1f}" y2="{gy:.1f}" {style}/>')
        a(f'<text x="{left - 8}" y="{gy + 4:.1f}" text-anchor="end" font-size="12">{label}</text>')
    a(
        f'<text transform="translate(20 {top + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{escape(ylabel)}</text>'
    )
    a(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    # Bars grow from the ratio-1 line: up when better, down when worse.
    ng = len(workloads)
    gw = pw / max(ng, 1)
    ns = max(len(series), 1)
    bw = min(26.0, gw * 0.8 / ns)
    base = y(1.0)
    for gi, w in enumerate(workloads):
        gx = left + gi * gw + (gw - bw * ns) / 2
        if gi:
            sx = left + gi * gw
            a(f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        for si, (label, key, data) in enumerate(series):
            x = gx + si * bw
            t = data.get(w)
            colour = COLOURS.get(key, "#777")
            if t is None or t[0] is None:
                cx = x + bw / 2
                a(
                    f'<text transform="translate({cx + 3:.1f} {base - 5:.1f}) rotate(-90)" '
                    f'font-size="9" fill="#999">n/a</text>'
                )
                continue
            mid, lo, hi = t
            top_y = y(mid) if math.isfinite(mid) else top
            y0, y1 = sorted((base, top_y))
            a(
                f'<rect x="{x + 1:.1f}" y="{y0:.1f}" width="{bw - 2:.1f}" height="{max(y1 - y0, 1):.1f}" '
                f'fill="{colour}"><title>{escape(label)} {escape(w)}: {mid:.3g}</title></rect>'
            )
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                cx = x + bw / 2
                a(
                    f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" '
                    f'stroke="#222" stroke-width="1"/>'
                )
            whisk_hi = y(hi) if hi is not None and math.isfinite(hi) else top_y
            whisk_lo = y(lo) if lo is not None and math.isfinite(lo) else top_y
            ty = (min(top_y, whisk_hi) - 4) if mid >= 1 else (max(top_y, whisk_lo) + 11)
            a(
                f'<text x="{x + bw / 2:.1f}" y="{ty:.1f}" text-anchor="middle" font-size="9" '
                f'fill="#222">{fmt_num(mid, 2) if math.isfinite(mid) else "∞"}</text>'
            )
        # Workload label, two lines: name and description.
        cx = left + gi * gw + gw / 2
        a(f'<text x="{cx:.1f}" y="{top + ph + 18}" text-anchor="middle" font-size="11" font-weight="bold">{escape(w)}</text>')
        words = TITLES.get(w, "").split()
        lines, cur = [], ""
        for word in words:
            if len(cur) + len(word) + 1 > 18 and cur:
                lines.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}".strip()
        if cur:
            lines.append(cur)
        for li, line in enumerate(lines[:3]):
            a(
                f'<text x="{cx:.1f}" y="{top + ph + 33 + 13 * li}" text-anchor="middle" '
                f'font-size="10" fill="#555">{escape(line)}</text>'
            )
    # Legend.
    # Entries flow left to right and wrap to a new row when the next would not fit.
    x, ly = left, H - 58
    for label, key, _ in series:
        width = 20 + 6.8 * len(label) + 28
        if x > left and x + width > W - right:
            x, ly = left, ly + 20
        a(f'<rect x="{x}" y="{ly}" width="14" height="14" fill="{COLOURS.get(key, "#777")}"/>')
        a(f'<text x="{x + 20}" y="{ly + 12}" font-size="12">{escape(label)}</text>')
        x += width
    a(
        f'<text x="{left}" y="{H - 10}" font-size="10" fill="#666">Bars: median ratio; '
        f'whiskers: worst and best run pairs; n/a: no figure (the table says why).</text>'
    )
    a("</svg>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------- main


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description="procpool benchmark report")
    ap.add_argument("inputs", nargs="+", help="JSON-lines result files")
    ap.add_argument("--out", default=None, help="output directory (default: <repo>/target/bench)")
    ap.add_argument("--demo", action="store_true", help="draw the chart from non-procpool rows")
    ap.add_argument("--demo-ours", default="procspawn", help="numerator system for --demo")
    ap.add_argument("--date", default=None, help="date to print (default: today, UTC)")
    ap.add_argument("--command", default=None, help="the command that produced the results")
    ap.add_argument(
        "--section",
        action="append",
        default=[],
        help="a markdown file to include as a section after the goals (repeatable)",
    )
    ap.add_argument(
        "--mode", choices=["quick", "full"], default=None,
        help="label the run (default: quick if any row says \"quick\": true)",
    )
    a = ap.parse_args(argv)

    out_dir = a.out or os.path.join(repo_root(), "target", "bench")
    os.makedirs(out_dir, exist_ok=True)
    rows, build = read_rows(a.inputs)
    if not rows:
        print("report: no result rows in the input", file=sys.stderr)
        return 1
    cells = summarize(rows)
    # The machine's floors (raw-*) are context for the reader, not systems to rank.
    floors = {k: cells.pop(k) for k in [k for k in cells if k[0].startswith("raw-")]}
    floor = floors.get((RAW_SYSTEM, "apply_rtt"))
    floor_line = None
    if floor and floor.get("median") is not None:
        floor_line = (
            f"The machine in this run: a one-byte round trip through a pair of pipes between "
            f"two processes (no pool, no encoding) took {fmt_value('s', floor['median'], floor['spread'])} "
            f"(n={floor['n']}): the floor under every `apply_rtt` figure. Process wakeups on "
            f"shared virtual machines vary a lot from day to day, and they bound procpool's "
            f"small-task figures far more than CPython's."
        )
    present = {s for s, _ in cells}
    systems = [s for s in SYSTEM_ORDER if s in present or s.startswith("procpool-")]
    systems += sorted(present - set(systems))
    workloads = [w for w in WORKLOADS if any(k[1] == w for k in cells)]
    workloads += sorted({w for _, w in cells} - set(workloads))
    quick = any(c["quick"] for c in cells.values())
    date = a.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    mach = machine_info()
    if floor and floor.get("median") is not None:
        mach["raw_pipe_rtt_s"] = floor["median"]

    # Table 1: medians.
    md = []
    md.append(
        "| workload | unit | " + " | ".join(systems) + " |\n|---|---|" + "---|" * len(systems)
    )
    for w in workloads:
        unit = next(
            (cells[(s, w)]["unit"] for s in systems if (s, w) in cells and cells[(s, w)]["unit"]),
            UNITS.get(w, ""),
        )
        better = "lower is better" if unit in LOWER_IS_BETTER else "higher is better"
        md.append(
            f"| {w} | {unit} ({better}) | "
            + " | ".join(cell_text(cells.get((s, w))) for s in systems)
            + " |"
        )
    table1 = "\n".join(md)

    # Table 2: ratios.
    have_procpool = any(s.startswith("procpool-") for s in present)
    cols = ratio_columns(present)
    demo = a.demo and not have_procpool
    if demo:
        if a.demo_ours not in present:
            print(f"report: --demo needs rows for {a.demo_ours}", file=sys.stderr)
            return 1
        chart_cols = demo_columns(a.demo_ours)
    else:
        chart_cols = cols
    ratios = {}
    for label, ours, ref, key in cols + (chart_cols if demo else []):
        for w in workloads:
            ratios[(label, w)] = ratio(cells.get((ours, w)), cells.get((ref, w)))
    md = []
    md.append(
        "| workload | "
        + " | ".join(label for label, *_ in cols)
        + " |\n|---|"
        + "---|" * len(cols)
    )
    for w in workloads:
        md.append(
            f"| {w} | " + " | ".join(fmt_ratio(*ratios[(label, w)]) for label, *_ in cols) + " |"
        )
    table2 = "\n".join(md)

    spread_note = (
        "Cells: median ± the largest distance of any run from the median, (n = runs). "
        "\"cannot\": the system could not do the workload (reason given); "
        "\"not run\": no rows for that system."
    )
    ratio_note = (
        "Ratios oriented so that > 1 means procpool is better: for times and bytes "
        "reference / procpool, for throughputs and speedups procpool / reference. "
        "In brackets: the range over the worst and best runs of both sides. "
        f"Memory growth below {BYTES_FLOOR} B counts as {BYTES_FLOOR} B in ratios."
    )
    mode = a.mode or ("quick" if quick else "full")
    print(f"## Results ({mode} run, {date}, {machine_line(mach)})\n")
    if floor_line:
        print(floor_line + "\n")
    print(spread_note + "\n")
    print(table1 + "\n")
    print("## Ratios (> 1: procpool better)\n")
    print(ratio_note + "\n")
    print(table2)
    goals = floor_section(cells, floors)
    if goals:
        print("\n" + "\n".join(goals))
    sections = []
    for path in a.section:
        with open(path) as f:
            sections += f.read().rstrip("\n").split("\n") + [""]
    if sections:
        print("\n" + "\n".join(sections))

    # Chart.
    series = []
    for label, ours, ref, key in chart_cols:
        data = {}
        for w in workloads:
            mid, lo, hi, _ = ratios[(label, w)]
            data[w] = None if mid is None else (mid, lo, hi)
        series.append((label, key, data))
    title = (
        f"DEMO: {a.demo_ours} / CPython multiprocessing.Pool per workload"
        if demo
        else "procpool / reference, per workload (> 1: procpool better)"
    )
    subtitle = f"{date} · {machine_line(mach)} · {mode} run"
    note = (
        "DEMO from real rows: no procpool results were given, so another system is the numerator"
        if demo
        else "times and memory: reference / procpool; throughputs and speedup: procpool / reference"
    )
    ylabel = (
        f"ratio (log scale; > 1: {a.demo_ours} better)" if demo else "ratio (log scale; > 1: procpool better)"
    )
    svg = render_svg(series, workloads, title, subtitle, note, ylabel)
    with open(os.path.join(out_dir, "ratios.svg"), "w") as f:
        f.write(svg)

    # results.json
    def cell_json(s):
        keep = ("unit", "n", "median", "spread", "min", "max", "q1", "q3", "values", "failures", "notes")
        return {k: s[k] for k in keep if k in s}

    result = {
        "date": date,
        "mode": mode,
        "machine": mach,
        "command": a.command,
        "systems": systems,
        "workloads": workloads,
        "cells": {
            s: {w: cell_json(cells[(s, w)]) for w in workloads if (s, w) in cells} for s in systems
        },
        "ratios": {
            label: {
                w: dict(
                    zip(("ratio", "low", "high", "missing"), ratios[(label, w)])
                )
                for w in workloads
            }
            for label, *_ in (cols + (chart_cols if demo else []))
        },
        "orientation": "ratio > 1 means the numerator system is better",
        "demo": demo,
        "rows": rows,
    }

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(clean(result), f, indent=1)

    # BENCHMARKS.md
    notes = []
    for s in systems:
        for w in workloads:
            c = cells.get((s, w))
            if c and c["notes"]:
                for n in c["notes"]:
                    notes.append(f"- **{s}**, {w}: {n}")
    bm = [
        "# Benchmarks",
        "",
        f"Run on {date}, {machine_line(mach)}, Python {mach['python']} ({mode} run"
        + (f": `{a.command}`" if a.command else "")
        + ").",
        "",
        "![procpool / reference ratio per workload](ratios.svg)",
        "",
    ]
    if build:
        bm += [
            f"The procpool program measured ({build}) is the one that spawn executes again "
            "for each worker: spawn's `startup` includes its loading (see the guide's "
            "\"Start methods\" on how the way a program is linked changes it). A forkserver "
            "pool's server is forked from the seed that `init()` made when the measuring "
            "process started (one fork, before the clock starts; `procpool -V`, measured "
            "beside `startup`, includes it), and executed only where the program changed "
            "since (`PROCPOOL_SEED=0` executes it always).",
            "",
        ]
    if floor_line:
        bm += [floor_line, ""]
    bm += floor_section(cells, floors)
    bm += sections
    bm += [
        "## Ratios (> 1: procpool better)",
        "",
        ratio_note,
        "",
        table2,
        "",
        "## Figures",
        "",
        spread_note,
        "",
        table1,
        "",
        "## Workloads",
        "",
    ]
    for w in workloads:
        bm.append(f"- `{w}`: {TITLES.get(w, w)}")
    if notes:
        bm += ["", "## Notes from the runs", ""] + notes
    bm += [
        "",
        "Each run is a fresh process; figures are medians over runs. The machine is shared "
        "and has few cores, so treat differences under ~20 % as noise.",
        "",
    ]
    with open(os.path.join(out_dir, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(bm))
    print(f"\nwrote {os.path.join(out_dir, 'results.json')}, ratios.svg, BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
