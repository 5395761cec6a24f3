"""The machine's CPU time, sampled beside a benchmark run, so a phase's wall time can be split into the
measured program's own CPU, everyone else's CPU and idle (waiting on the network or a disk).

Why a whole-machine figure: what slows a training job's first step on a node is whatever else runs beside it
(the snapshotter's background fill and its whole-blob hash, the checkpoint mount's last chunks), and those are
other processes; the job's own CPU comes from its ``getrusage`` (``integration/job/train.py``)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_HZ = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU-seconds all cores spent on anything but idle and I/O wait since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _HZ


def process_seconds(pid: int | None) -> float | None:
    """CPU-seconds (user + system, its own threads; reaped children too) process ``pid`` has used; None when
    there is no such process.  Read at two moments, the difference is what it spent between them."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return sum(int(x) for x in fields[11:15]) / _HZ  # utime stime cutime cstime


class MachineCpu:
    """Samples :func:`busy_seconds` every ``interval`` on a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, busy seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-cpu", daemon=True)

    def __enter__(self) -> MachineCpu:
        self.samples.append((time.monotonic(), busy_seconds()))
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), busy_seconds()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic(), busy_seconds()))

    def busy_between(self, start: float, end: float) -> float:
        """CPU-seconds the machine was busy between two monotonic times (linear between samples)."""
        return _at(self.samples, end) - _at(self.samples, start)


def _at(samples: list[tuple[float, float]], t: float) -> float:
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, b0), (t1, b1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return samples[-1][1]


def split(wall: float, busy: float, own_user: float, own_sys: float, cores: int) -> dict[str, float]:
    """A phase's time, split: the program's own CPU (user, system), the rest of the machine's CPU, and idle
    core-seconds (``cores × wall`` minus all busy time)."""
    other = max(0.0, busy - own_user - own_sys)
    return {"wall_s": round(wall, 3), "own_user_s": round(own_user, 3), "own_sys_s": round(own_sys, 3),
            "other_cpu_s": round(other, 3), "idle_core_s": round(idle_core_seconds(wall, busy, cores), 3)}


def idle_core_seconds(wall: float, busy: float, cores: int) -> float:
    """Core-seconds no one used over ``wall`` seconds in which the machine was ``busy`` CPU-seconds."""
    return max(0.0, cores * wall - busy)


def trainer_phases(events: Path, job_id: str, cpu: MachineCpu) -> dict[str, dict[str, float]]:
    """Per trainer phase: its wall time split into the trainer's own CPU, the rest of the machine's and idle."""
    out = {}
    for ln in events.read_text().splitlines():
        ev = json.loads(ln)
        if ev.get("component") == "trainer" and ev.get("job") == job_id and "user_s" in ev.get("attrs", {}):
            a, b = ev["start_mono"], ev["end_mono"]
            out[ev["phase"]] = split(b - a, cpu.busy_between(a, b), ev["attrs"]["user_s"], ev["attrs"]["sys_s"],
                                     os.cpu_count() or 1)
    return out


def median_split(rs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per trainer phase, the median of each part of :func:`integration.bench.cpu.split` over the runs."""
    out: dict[str, dict[str, float]] = {}
    for phase in sorted({p for r in rs for p in r.get("cpu", {})}):
        parts = [r["cpu"][phase] for r in rs if phase in r.get("cpu", {})]
        out[phase] = {k: round(statistics.median(x[k] for x in parts), 3) for k in parts[0]}
    return out


def cpu_table(result: dict[str, Any], modes: Sequence[str]) -> list[str]:
    """Markdown: where the trainer's phases went, per mode (the first rate measured)."""
    rows = []
    for rk, per in list(result.get("median", {}).items())[:1]:
        for mode in modes:
            for phase, c in per.get(mode, {}).get("cpu", {}).items():
                rows.append(f"| {mode} @ {rk} | {phase} | {c['wall_s']:.2f} | {c['own_user_s']:.2f} | "
                            f"{c['own_sys_s']:.2f} | {c['other_cpu_s']:.2f} | {c['idle_core_s']:.2f} |")
    if not rows:
        return []
    return ["", "Where the trainer's phases went (medians; core-seconds on this machine's "
            f"{result.get('cores', '?')} cores: the trainer's own CPU from its getrusage, every other process's "
            "CPU from /proc/stat, idle = cores × wall − all busy time):", "",
            "| mode | phase | wall s | trainer user | trainer system | other processes | idle |",
            "|---|---|---:|---:|---:|---:|---:|", *rows]
