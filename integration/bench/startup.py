"""Start-up benchmark: time from "pull the image" to the command's output, every way this machine can start
an image, side by side in one run on one shaped link.

``bootseer bench startup [--image IMG --command CMD --expect TEXT] [--runs N] [--rates 1gbit,200mbit] [--modes …]
[--json FILE] [--md FILE] [--png FILE]`` (or ``python -m integration.bench.startup``).  ``--render FILE.json``
redraws the table and chart of an earlier run without running anything.

One local stack (containerd 1.6, docker-registry in a network namespace behind a ``tbf``-shaped veth), an image
and these modes.  The image is by default the realistic one (Debian + python3 + numpy + torch CPU, three layers)
with its command ``python3 -c "import torch; print(torch.ones(2).sum())"``; ``--image realistic-split`` is the same
files in about eight layers (a second shape), and ``--image REF`` / ``oci-archive:PATH`` is the operator's own,
copied into the benchmark's registry first, with ``--command`` (one shell-quoted string) and ``--expect`` (text of
the stdout line that marks the start as done; the container is killed once it came, if it does not exit by
itself) — see :mod:`integration.bench.imagesource`.

* ``overlayfs``: ``ctr image pull`` (download, gunzip, unpack every layer) then ``ctr run`` — what a node does today.
* ``floor``: the image already unpacked on the node, page cache dropped: ``ctr run`` only.  No way of getting the
  image onto the node can beat it; the distance to it is the figure that counts.
* ``stargz`` / ``stargz-optimized``: the peer, stargz-snapshotter 0.12 (Debian's library sources built into a
  proxy snapshotter, :mod:`integration.bench.peer`): the image converted to eStargz with ``ctr-remote``, pulled
  with ``ctr-remote image rpull`` and run lazily; ``-optimized`` is ``ctr-remote image optimize`` running the
  same command, so stargz prefetches the files it touched.
* ``lazy``: BootSeer without prefetch: the image indexed (``bootseer convert``), ``bootseer pull`` and
  ``ctr run --snapshotter bootseer``.
* ``prefetch``: the same after ``bootseer record`` pushed the hot-block manifest (another repository, so the
  ``lazy`` mode's image has none).

The BootSeer modes plug in through the ``bootseer`` command; when this checkout lacks a command they need, they
are skipped with a message saying which.

Every run is cold: containerd, the stargz peer and BootSeer's snapshotter are stopped, their state (content,
snapshots, caches) deleted, the page cache dropped and all of them started again — a fresh containerd also
redials the proxy snapshotters at once (one restarted under a running containerd can wait out a long gRPC
back-off).  The time runs from the start of the pull command to the moment the expected line arrives; a run
without it, or whose command exits non-zero, fails.  Bytes: what crossed the shaped link until that moment
(the host end's receive counter) and what the registry logged as served, beside the hot set — the image bytes
in the page cache after a floor run (uncompressed, what start-up reads), and the recorded hot-block manifest's
bytes when BootSeer's recorder is present.  For the BootSeer modes, per layer at that moment: the EROFS blob's
size, the bytes BootSeer fetched of it, and the disk its chunk cache takes on the node (allocated blocks of the
cache files).  Modes rotate their order from run to run; medians over ``--runs``.

JSON: ``all_runs`` (every run, with its round), ``run_counts`` (what was measured; ``runs`` is what was asked),
``median_seconds`` and ``seconds`` (median, min, max, n), ``bytes`` (per rate and mode: ``link_to_output``, the
wire bytes, and ``registry_to_output``), ``layers`` (per rate and BootSeer mode, one row per lazy layer:
``position``, ``layer``, ``blob``, ``blob_size``, ``fetched_to_output``, ``disk_at_output``, medians over the
runs), ``image`` and ``image_layers`` (compressed sizes), ``ratios`` (time ratios of medians, e.g.
``prefetch_vs_floor_1g``; ``fetched_vs_hotset_<rate>``) with ``ratio_spreads`` (the per-round ratios' range),
``goals`` (each with its verdict: met, not met, inconclusive when the spread straddles the bound, or not
measured), ``cpu_seconds`` (per rate and mode, medians from the pull's start to its end, ``pull``, and to the
output, ``to_output``: the machine's ``busy`` and ``idle`` core-seconds and the CPU-seconds of the
``registry``, the node's ``snapshotter`` and ``containerd`` — the registry shares this machine's cores, which
a remote one would not), ``cores``, ``skipped``.  Five runs or more for figures that are quoted: three leave
the spread meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bootseer.testkit import drop_caches
from integration.bench.cpu import busy_seconds, idle_core_seconds, process_seconds
from integration.bench.imagesource import REALISTIC_SEQ_READ_FILE, ImageSource, Workload
from integration.bench.stats import Spread, ratio_spread, spread, verdict

MODES = ("overlayfs", "floor", "stargz", "stargz-optimized", "lazy", "prefetch")
DEFAULT_RATES = ("1gbit", "200mbit")
NS = "bench-startup"
# ratio → (op, bound): the goals of issues 6 and 20, judged on each ratio's spread (integration/bench/stats.py)
GOALS: dict[str, tuple[Literal["<=", ">="], float]] = {
    "prefetch_vs_full_pull_1g": ("<=", 0.2),
    "prefetch_vs_floor_1g": ("<=", 1.2),
    "prefetch_vs_floor_200m": ("<=", 2.0),
    "fetched_vs_hotset_1g": ("<=", 1.2),
    "fetched_vs_hotset_200m": ("<=", 1.2),
    "prefetch_vs_stargz_opt_1g": ("<=", 0.45),
    "prefetch_vs_stargz_opt_200m": ("<=", 0.5),
    "swapped_seq_read_vs_overlay": (">=", 0.95),
}
# short names used in ratio keys
RATIO_NAMES = {"overlayfs": "full_pull", "floor": "floor", "stargz": "stargz", "stargz-optimized": "stargz_opt",
               "lazy": "lazy", "prefetch": "prefetch"}
# (numerator, denominator) pairs reported per rate, when both were measured
RATIO_PAIRS = [
    ("prefetch", "overlayfs"), ("prefetch", "floor"), ("prefetch", "stargz-optimized"), ("prefetch", "stargz"),
    ("lazy", "overlayfs"), ("lazy", "floor"), ("lazy", "stargz"),
    ("stargz-optimized", "floor"), ("stargz-optimized", "overlayfs"),
    ("stargz", "floor"), ("stargz", "overlayfs"), ("floor", "overlayfs"),
]
LABELS = {"overlayfs": "overlayfs (full pull)", "floor": "floor (local, cold cache)", "stargz": "stargz",
          "stargz-optimized": "stargz optimized", "lazy": "BootSeer lazy", "prefetch": "BootSeer lazy + prefetch"}


# ----------------------------------------------------------------------------------------- pure parts
def rate_key(rate: str) -> str:
    """'1gbit' → '1g', '200mbit' → '200m' (the suffix of ratio keys)."""
    from integration.netns import parse_rate

    bps = parse_rate(rate)
    for div, unit in ((10**9, "g"), (10**6, "m"), (10**3, "k")):
        if bps % div == 0:
            return f"{bps // div}{unit}"
    return str(bps)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none given)'}: choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def parse_rates(text: str) -> list[str]:
    rates = [r.strip() for r in text.split(",") if r.strip()]
    if not rates:
        raise ValueError("no rate given (e.g. 1gbit,200mbit)")
    keys = [rate_key(r) for r in rates]  # raises ValueError on a bad rate
    if len(set(keys)) != len(keys):
        raise ValueError(f"a rate is given twice: {text}")
    return rates


def registry_bytes(lines: Iterable[str]) -> int:
    """Bytes the registry wrote in GET responses, from its JSON log ("response completed" lines)."""
    total = 0
    for line in lines:
        if not line.startswith("{") or '"response completed"' not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("http.request.method") == "GET":
            total += int(doc.get("http.response.written") or 0)
    return total


def cpu_spent(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """CPU-seconds each process spent between two :meth:`Bench.cpu_now` readings, the machine's busy
    CPU-seconds and its idle core-seconds (cores × wall − busy) over the ``wall`` seconds between them."""
    out = {k: round(after[k] - before[k], 3) for k in after if k in before}
    if "busy" in out:
        out["idle"] = round(idle_core_seconds(wall, out["busy"], os.cpu_count() or 1), 3)
    return out


def cpu_text(c: dict[str, float]) -> str:
    """The log's note on a pull's CPU: how much of the machine was busy, and who."""
    if "busy" not in c:
        return ""
    who = ", ".join(f"{k} {c[k]:.2f}" for k in ("registry", "snapshotter", "containerd") if k in c)
    return f"; pull CPU {c['busy']:.2f} core-s busy, {c.get('idle', 0):.2f} idle ({who})"


def median_cpu(readings: list[dict[str, float]]) -> dict[str, float]:
    """Per part of :func:`cpu_spent`, its median over the runs that have it."""
    keys = sorted({k for r in readings for k in r})
    return {k: round(statistics.median(r[k] for r in readings if k in r), 3) for k in keys}


def cpu_table(result: dict[str, Any]) -> list[str]:
    """Markdown: CPU-seconds per mode from the pull's start, to the pull's end and to the output."""
    rows = []
    for rk, per in result.get("cpu_seconds", {}).items():
        for mode in MODES:
            for part, label in (("pull", "pull"), ("to_output", "to output")):
                c = per.get(mode, {}).get(part)
                if not c:
                    continue
                cells = " | ".join(f"{c[k]:.2f}" if k in c else "–"
                                   for k in ("busy", "idle", "registry", "snapshotter", "containerd"))
                rows.append(f"| {LABELS[mode]} @ {rk} | {label} | {cells} |")
    if not rows:
        return []
    return ["", f"CPU from the pull's start (medians; core-seconds on this machine's {result.get('cores', '?')} "
            "cores, which the registry shares here — a real registry runs elsewhere): the whole machine busy and "
            "idle, the registry, the node's snapshotter (BootSeer's or stargz's), containerd:", "",
            "| mode | until | machine busy | idle | registry | snapshotter | containerd |",
            "|---|---|---:|---:|---:|---:|---:|", *rows]


def by_round(runs: list[Run], rate: str, mode: str) -> dict[int, float]:
    """Seconds of ``mode``'s runs at ``rate``, by the round they ran in (modes alternate within a round)."""
    return {int(r.extra.get("round", i)): r.seconds
            for i, r in enumerate(x for x in runs if x.rate == rate and x.mode == mode)}


def compute_ratio_spreads(runs: list[Run], rates: list[str]) -> dict[str, Spread]:
    """``A_vs_B_<rate>`` for every pair of :data:`RATIO_PAIRS` measured at a rate: the ratio of the medians, with
    the spread of the per-round ratios over the rounds both modes ran in."""
    out: dict[str, Spread] = {}
    for rate in rates:
        rk = rate_key(rate)
        for a, b in RATIO_PAIRS:
            ra, rb = by_round(runs, rate, a), by_round(runs, rate, b)
            if not ra or not rb:
                continue
            common = sorted(set(ra) & set(rb))
            if common and len(common) == len(ra) == len(rb):
                s = ratio_spread([ra[i] for i in common], [rb[i] for i in common])
            else:
                s = ratio_spread(list(ra.values()), list(rb.values()), paired=False)
            out[f"{RATIO_NAMES[a]}_vs_{RATIO_NAMES[b]}_{rk}"] = s
    return out


def goal_status(spreads: dict[str, Spread]) -> dict[str, dict[str, Any]]:
    """Each goal: its bound, the ratio's median and spread, and the verdict on the spread."""
    out: dict[str, dict[str, Any]] = {}
    for k, (op, bound) in GOALS.items():
        s = spreads.get(k)
        out[k] = {"op": op, "bound": bound, "value": None if s is None else round(s.median, 4),
                  "spread": None if s is None else [round(s.lo, 4), round(s.hi, 4)], "n": 0 if s is None else s.n,
                  "verdict": verdict(s, bound, op)}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The Markdown table of a result: median seconds per mode and rate, × floor, bytes, then the ratios."""
    rates = result["rates"]
    modes = [m for m in MODES if any(m in result["median_seconds"].get(rate_key(r), {}) for r in rates)]
    counts = sorted({n for per in result.get("run_counts", {}).values() for n in per.values()})
    if not counts:
        runs_text = str(result.get("runs"))
    else:
        runs_text = str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}–{counts[-1]}"
    out = [f"# Start-up benchmark: {result.get('image', 'realistic image')}", "",
           f"Command `{shlex.join(result.get('command', []))}`; median [min–max] of {runs_text} cold runs per mode "
           "and rate; time from the pull's start to the command's output.  Produced by "
           f"`{result.get('command_line', 'bootseer bench startup')}`.", ""]
    head = "| mode |" + "".join(f" {r} s | × floor | MB over link |" for r in rates)
    out += [head, "|---|" + "---:|---:|---:|" * len(rates)]
    for mode in modes:
        row = f"| {LABELS[mode]} |"
        for r in rates:
            rk = rate_key(r)
            med = result["median_seconds"].get(rk, {}).get(mode)
            floor = result["median_seconds"].get(rk, {}).get("floor")
            link = result.get("bytes", {}).get(rk, {}).get(mode, {}).get("link_to_output")
            sp = result.get("seconds", {}).get(rk, {}).get(mode)
            if med and sp and sp["n"] > 1:
                row += f" {med:.2f} [{sp['min']:.2f}–{sp['max']:.2f}] |"
            else:
                row += f" {med:.2f} |" if med else " – |"
            row += f" {med / floor:.2f} |" if med and floor else " – |"
            row += f" {link / 1e6:.0f} |" if link is not None else " – |"
        out.append(row)
    hot = result.get("hot_set", {})
    out.append("")
    if hot.get("page_cache_bytes"):
        out.append(f"Hot set: {hot['page_cache_bytes'] / 1e6:.0f} MB of the image's files in the page cache after "
                   f"a floor run (uncompressed), of {hot.get('image_unpacked_bytes', 0) / 1e6:.0f} MB unpacked "
                   f"and {hot.get('image_compressed_bytes', 0) / 1e6:.0f} MB compressed.")
    if hot.get("manifest_bytes"):
        out.append(f"Recorded hot-block manifest: {hot['manifest_bytes'] / 1e6:.0f} MB of EROFS blob ranges.")
    kinds = result.get("fetched_by_kind_to_output", {})
    for rk, per in kinds.items():
        for mode, k in per.items():
            out.append(f"{LABELS[mode]} at {rk}: BootSeer fetched {k.get('demand', 0) / 1e6:.0f} MB on demand, "
                       f"{k.get('prefetch', 0) / 1e6:.0f} MB by prefetch, {k.get('background', 0) / 1e6:.0f} MB "
                       "in the background by the time of the output (median).")
    seq = result.get("seq_read_mb_s", {})
    seq_file = result.get("seq_read_file") or SEQ_READ_FILE
    if seq.get("overlayfs_local") and seq.get("swapped_lazy"):
        out.append(f"Cold sequential read of `{seq_file.rsplit('/', 1)[1]}` inside a container: overlayfs on "
                   f"local disk {statistics.median(seq['overlayfs_local']):.0f} MB/s, BootSeer lazy layers after "
                   f"they left FUSE {statistics.median(seq['swapped_lazy']):.0f} MB/s (median).")
    out += layer_table(result)
    out += cpu_table(result)
    if result.get("partial"):
        out += ["", "**Partial result**: the run had not finished all rounds when this was written."]
    if result.get("skipped"):
        out += ["", "Not measured: " + "; ".join(f"`{m}`: {why}" for m, why in result["skipped"].items())]
    out += ["", "| ratio | median [min–max] | goal |", "|---|---:|---|"]
    goals = result.get("goals", {})
    spreads = result.get("ratio_spreads", {})
    for k, v in sorted(result.get("ratios", {}).items()):
        g = goals.get(k)
        sp = spreads.get(k)
        vtxt = f"{v:.3f} [{sp['min']:.3f}–{sp['max']:.3f}]" if sp and sp["min"] != sp["max"] else f"{v:.3f}"
        gtxt = ""
        if g and g.get("value") is not None:  # results from before verdicts carried only "met"
            op = g.get("op", "<=").replace("<=", "≤").replace(">=", "≥")
            gtxt = f"{op} {g['bound']} ({g.get('verdict') or ('met' if g.get('met') else 'not met')})"
        out.append(f"| `{k}` | {vtxt} | {gtxt} |")
    out += ["", "A goal is *inconclusive* when the spread of its ratio (per-round ratios of modes measured in the "
            "same rounds) straddles the bound."]
    missing = [k for k, g in goals.items() if g.get("value") is None]
    if missing:
        out += ["", "Goals without a figure (their mode was not measured): " + ", ".join(f"`{k}`" for k in missing)]
    for note in result.get("notes", []):
        out += ["", note]
    return "\n".join(out) + "\n"


def layer_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines: per rate and BootSeer mode, each lazy layer's blob size, bytes fetched and disk used on
    the node at the output (empty when no run measured them)."""
    rows = [(rk, mode, ly) for rk, per in result.get("layers", {}).items() for mode, lys in per.items() for ly in lys]
    if not rows:
        return []
    out = ["", "Per lazy layer at the output (median): the EROFS blob, the bytes BootSeer fetched of it, the disk "
           "its chunk cache takes on the node (allocated blocks).", "",
           "| rate | mode | # | layer | blob MB | fetched MB | disk MB |", "|---|---|---:|---|---:|---:|---:|"]
    for rk, mode, ly in rows:
        out.append(f"| {rk} | {LABELS.get(mode, mode)} | {ly['position']} | `{ly['layer'][7:19]}` | "
                   f"{ly['blob_size'] / 1e6:.1f} | {ly['fetched_to_output'] / 1e6:.1f} | "
                   f"{ly['disk_at_output'] / 1e6:.1f} |")
    return out


def write_png(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: median seconds per mode, one group per rate, the floor as a dashed line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["rates"]
    modes = [m for m in MODES if any(m in result["median_seconds"].get(rate_key(r), {}) for r in rates)]
    colors = {"overlayfs": "#7f7f7f", "floor": "#2ca02c", "stargz": "#ffbb78", "stargz-optimized": "#ff7f0e",
              "lazy": "#9ecae1", "prefetch": "#1f77b4"}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.8 / max(1, len(modes))
    top = 0.0
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, r in enumerate(rates):
            v = result["median_seconds"].get(rate_key(r), {}).get(mode)
            if v:
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(v)
        top = max([top, *ys])
        bars = ax.bar(xs, ys, width * 0.95, label=LABELS[mode], color=colors[mode])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rates)), [f"registry link {r}" for r in rates])
    ax.set_ylabel("seconds from pull start to output (median)")
    image = str(result.get("image") or "the realistic image").split(" (", 1)[0]
    ax.set_title(f"Cold start of {image} ({result.get('runs')} runs per bar)")
    ax.set_ylim(0, top * 1.35)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the machine parts
def _which_bootseer_commands() -> set[str]:
    """The top-level ``bootseer`` commands of this checkout (the CLI mounts the parts that exist)."""
    try:
        import typer.main

        from bootseer.cli import app

        group = typer.main.get_command(app)
        return set(getattr(group, "commands", {}))
    except Exception as e:  # a part that fails to import: its commands are missing
        _log(f"the bootseer CLI did not load ({type(e).__name__}: {e})")
        return set()


def bootseer_mode_missing(mode: str, commands: set[str]) -> str | None:
    need = {"lazy": ["convert", "pull"], "prefetch": ["convert", "pull", "record"]}.get(mode, [])
    lacking = [c for c in need if c not in commands]
    return f"this checkout has no `bootseer {'`, `bootseer '.join(lacking)}`" if lacking else None


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _stop(pid: int | None, grace: float = 30.0) -> None:
    """SIGTERM a daemon this process started, wait for it, SIGKILL it if it does not go."""
    if not pid or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)  # polling a process's exit with a deadline


def page_cache_bytes(dirs: list[Path]) -> tuple[int, int]:
    """(bytes of the regular files below ``dirs`` that are in the page cache, their total size), by fincore."""
    files: list[str] = []
    size = 0
    for d in dirs:
        for root, _dirs, names in os.walk(d):
            for n in names:
                p = os.path.join(root, n)
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if st.st_size and (st.st_mode & 0o170000) == 0o100000:
                        files.append(p)
                        size += st.st_size
    res = 0
    for i in range(0, len(files), 500):
        proc = subprocess.run(["fincore", "-J", "-b", "-o", "RES", *files[i:i + 500]], capture_output=True, text=True)
        with contextlib.suppress(ValueError):
            res += sum(int(x["res"]) for x in json.loads(proc.stdout or "{}").get("fincore", []))
    return res, size


@dataclass
class Run:
    mode: str
    rate: str
    seconds: float
    pull_seconds: float
    link_bytes: int  # crossed the shaped link (registry → node) until the output
    registry_bytes: int  # GET response bytes the registry logged as completed until the output
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """The stack plus the peer, restarted cold for every run."""

    def __init__(self, st: Any, cfg: Any, modes: list[str], peer_binary: Path | None, log: Callable[[str], None],
                 source: ImageSource | None = None, work: Workload | None = None, exit_timeout: float = 120.0):
        from integration.bench import imagesource, peer

        self.st, self.cfg, self.modes, self.log = st, cfg, modes, log
        self.root = Path(st.info.root)
        self.cdir = Path(st.info.containerd_config).parent
        self.refs: dict[str, str] = {}
        self.source = source or ImageSource("builtin", "realistic")
        self.work = work or imagesource.workload(self.source, None, None, None)
        self.cmd = list(self.work.command)
        self.expected = self.work.expect
        self.exit_timeout = exit_timeout
        self.blob_layers: dict[str, dict[str, dict[str, Any]]] = {}  # mode → EROFS blob → its layer, position
        self.peer: Any = None
        self.index_version: int | None = None  # `bootseer convert --index-version` (None: its default)
        if peer_binary is not None:
            self.peer = peer.Peer(peer_binary, self.root / "stargz", self.root / "stargz.sock",
                                  self.root / "logs" / "stargz.log")
            from integration import containerd_config

            conf = Path(st.info.containerd_config)
            conf.write_text(conf.read_text() + "\n" + containerd_config.proxy_plugin(
                self.peer.socket, self.peer.root, name=peer.SNAPSHOTTER))
        self.host_if = f"bs{st.info.netns_id}h" if st.info.netns_id else None
        self.counter = 0
        self.recorded: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- daemons
    def _start_containerd(self) -> None:
        from integration.stack import wait_for

        proc = self.st._spawn("containerd", ["containerd", "--config", self.st.info.containerd_config])
        wait_for("containerd", self.st._containerd_ready, 60, proc, Path(self.st.info.logs["containerd"]))

    def reset(self, wipe: bool = True) -> None:
        """Stop containerd and the snapshotters; with ``wipe`` delete all their state; drop the page cache;
        start them again (snapshotters first: containerd dials its proxy plugins when it starts)."""
        from integration.stack import detach_loops_below, unmount_below

        with contextlib.suppress(Exception):
            self.st._kill_tasks()
        _stop(self.st.info.pids.get("containerd"))
        if self.peer is not None:
            self.peer.stop(wipe=True)  # the peer keeps nothing across a containerd wipe: always cold
        sroot = self.st.info.snapshotter_root
        if sroot and wipe:
            _stop(self.st.info.pids.get("snapshotter"))
            unmount_below(Path(sroot))
            detach_loops_below(Path(sroot))
            shutil.rmtree(sroot, ignore_errors=True)
        unmount_below(self.cdir)
        if wipe:
            for d in ("root", "state"):
                shutil.rmtree(self.cdir / d, ignore_errors=True)
        drop_caches()
        if sroot and wipe:
            self.st._start_snapshotter(self.cfg)
        if self.peer is not None:
            self.peer.start()
        self._start_containerd()

    def ctr(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return self.st.ctr(*args, namespace=NS, timeout=timeout)

    def link_rx(self) -> int:
        if not self.host_if:
            return 0
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def registry_log_size(self) -> int:
        return Path(self.st.info.logs["registry"]).stat().st_size

    def registry_served(self, start: int, end: int) -> int:
        with open(self.st.info.logs["registry"], "rb") as fh:
            fh.seek(start)
            data = fh.read(max(0, end - start)).decode(errors="replace")
        return registry_bytes(data.splitlines())

    def bootseer(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "BOOTSEER_HOSTS_DIR": str(self.cdir / "certs.d"),
                                                    # convert signs with the stack's key (its snapshotter
                                                    # requires signed indexes)
                                                    "BOOTSEER_SIGNING_KEY": str(self.st.info.signing_key)})
        if proc.returncode != 0:
            raise RuntimeError(f"bootseer {' '.join(args)} (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    # ------------------------------------------------------------------------------ set-up
    def setup(self, cache: Path) -> None:
        """Every mode's image in the registry (conversions are cached: eStargz of 1 GB takes minutes)."""
        from integration import images
        from integration.bench import imagesource, peer

        self.log(f"pushing the image {self.source.label()} (built-in images are built once, then cached) ...")
        base = imagesource.push_image(self.source, self.st.info.registry, cache)
        self.refs["overlayfs"] = self.refs["floor"] = base
        self.facts = imagesource.image_facts(base)
        for mode, opt in (("stargz", None), ("stargz-optimized", self.cmd)):
            if mode not in self.modes:
                continue
            tag = "v1-esgz" if opt is None else "v1-esgz-opt"
            ref = base.rsplit(":", 1)[0] + ":" + tag
            # the realistic image keeps its old key (its conversions cached on machines stay valid); any
            # other image is keyed by what was pushed
            what = images.realistic_key() if self.source.value == "realistic" else self.facts.manifest_digest
            key = hashlib.sha256(json.dumps([what, tag, opt, _package_version("stargz-snapshotter")])
                                 .encode()).hexdigest()[:16]
            name = "realistic" if self.source.value == "realistic" else "image"
            layout = cache / f"{name}-{key}-{tag}"
            if not (layout / "index.json").exists():
                self.log(f"{mode}: converting with ctr-remote (minutes; cached in {layout}) ...")
                peer.convert_estargz(self.st, base, ref, NS, optimize_cmd=opt)
                _skopeo_to_layout(ref, layout, tag)
            else:
                from integration.oci import push

                push(layout, tag, ref)
            self.refs[mode] = ref
        repo = base.rsplit(":", 1)[0]
        for mode in ("lazy", "prefetch"):
            if mode in self.modes:
                self.refs[mode] = self._indexed(base, f"{repo}-{mode}:v1")
                self.blob_layers[mode] = self._blob_layers(self.refs[mode])
        if "prefetch" in self.modes:
            self._record(self.refs["prefetch"])

    def _blob_layers(self, ref: str) -> dict[str, dict[str, Any]]:
        """EROFS blob digest → ``{"layer", "position"}`` from ``ref``'s BootSeer index."""
        from bootseer.status import image_blobs

        return image_blobs(ref, str(self.cdir / "certs.d"), True, None)

    def _indexed(self, base: str, ref: str) -> str:
        """``base`` copied to ``ref`` and indexed with ``bootseer convert`` (BootSeer's EROFS blobs)."""
        self.log(f"indexing {ref} with bootseer convert ...")
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{base}", f"docker://{ref}"], check=True,
                       capture_output=True)
        version = [] if self.index_version is None else ["--index-version", str(self.index_version)]
        self.bootseer("convert", "--plain-http", "--state-dir", str(self.root / "convert-state"), *version, ref)
        return ref

    def _record(self, ref: str) -> None:
        self.log(f"recording the hot blocks of {ref} with bootseer record ...")
        self.reset()
        # stopped at the expected line, as the timed runs are: what the command reads after it is no start-up
        out = self.bootseer("record", ref, "--address", self.st.info.containerd_socket, "--control",
                            str(getattr(self.st.info, "snapshotter_control", "")), "--plain-http", "--json",
                            "--ready-line", re.escape(self.expected), "--", *self.cmd, timeout=1800).stdout
        with contextlib.suppress(ValueError):
            self.recorded = json.loads(out)

    # -------------------------------------------------------------------------------- runs
    def run_container(self, snapshotter: str, ref: str, at_output: Callable[[], None] = lambda: None,
                      cmd: list[str] | None = None) -> tuple[float, str]:
        """``ctr run --rm``: (the monotonic time the expected line arrived — ``at_output`` is called then —,
        stdout).  The benchmark's command must print a line containing the expected text and then exit 0, or
        still run ``exit_timeout`` seconds later (a server: its task is killed then); ``cmd`` (another command)
        must exit 0, and its whole stdout is returned."""
        self.counter += 1
        name = f"startup-{os.getpid()}-{self.counter}"
        proc = subprocess.Popen(["ctr", "-a", self.st.info.containerd_socket, "-n", NS, "run", "--rm",
                                 "--snapshotter", snapshotter, ref, name, *(cmd or self.cmd)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else ""), daemon=True)
        reader.start()
        assert proc.stdout is not None
        lines: list[str] = []
        t_out: float | None = None
        if cmd is None:
            span = self.expected.count("\n") + 1  # an expected output of several lines is matched across lines
            for line in proc.stdout:
                lines.append(line)
                if self.expected in line or (span > 1 and self.expected in "".join(lines[-span:])):
                    t_out = time.monotonic()
                    at_output()
                    break
        rest: list[str] = []
        drain = threading.Thread(target=lambda: rest.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
        drain.start()  # a server keeps writing: its pipe must not fill while we wait for it
        killed = False
        try:
            rc = proc.wait(timeout=self.exit_timeout if t_out is not None else 1800)
        except subprocess.TimeoutExpired:
            killed = True  # it started (the line came) and keeps running: what a server does
            self.st.ctr("task", "kill", "--signal", "SIGKILL", name, namespace=NS, check=False)
            rc = proc.wait(timeout=120)
        drain.join(timeout=60)
        reader.join(timeout=60)
        out = "".join(lines + rest)
        if cmd is not None:
            t_out = time.monotonic()
        if t_out is None or (rc != 0 and not killed):
            raise RuntimeError(f"{snapshotter}: container output {out[-1500:]!r} (exit {rc}), expected a line with "
                               f"{self.expected!r} and exit 0; stderr: {''.join(err).strip()[-1500:]}")
        return t_out, out

    def pull(self, mode: str) -> None:
        ref = self.refs[mode]
        if mode in ("overlayfs", "floor"):
            self.ctr("image", "pull", "--plain-http", ref)
        elif mode in ("stargz", "stargz-optimized"):
            from integration.bench import peer

            peer.ctr_remote(self.st, "image", "rpull", "--plain-http", "--snapshotter", peer.SNAPSHOTTER, ref,
                            namespace=NS)
        else:
            ctl = ["--control", self.st.info.snapshotter_control] if self.st.info.snapshotter_control else []
            out = self.bootseer("pull", "--address", self.st.info.containerd_socket, "--namespace", NS,
                                "--plain-http", "--json", *ctl, ref).stdout
            if not json.loads(out).get("lazy_layers"):  # a fallback to an ordinary pull is not what is measured
                raise RuntimeError(f"{mode}: bootseer pull served no layer lazily: {out.strip()[-1500:]}")

    def snapshotter_of(self, mode: str) -> str:
        return {"overlayfs": "overlayfs", "floor": "overlayfs", "stargz": "stargz",
                "stargz-optimized": "stargz"}.get(mode, "bootseer")

    def run_once(self, mode: str, rate: str) -> Run:
        self.reset()
        if mode == "floor":
            self.pull(mode)  # not timed: the floor starts with the image on the node
            self.reset(wipe=False)
        rx0, log0 = self.link_rx(), self.registry_log_size()
        cpu0 = self.cpu_now(mode)
        t0 = time.monotonic()
        if mode != "floor":
            self.pull(mode)
        t_pull = time.monotonic()
        cpu_pull = self.cpu_now(mode)
        at: dict[str, int] = {}
        cpu_out: dict[str, float] = {}

        layers: list[dict[str, Any]] = []

        def sample() -> None:
            at["rx"], at["log"] = self.link_rx(), self.registry_log_size()
            cpu_out.update(self.cpu_now(mode))
            if mode in ("lazy", "prefetch"):
                docs = self.lazy_layers_now()
                at.update(fetched_by_kind(docs))
                layers.extend(self.layer_rows(mode, docs))

        t_out, _ = self.run_container(self.snapshotter_of(mode), self.refs[mode], sample)
        run = Run(mode, rate, round(t_out - t0, 3), round(t_pull - t0, 3), at["rx"] - rx0,
                  self.registry_served(log0, at["log"]))
        run.extra.update({f"fetched_{k}": at[k] for k in ("demand", "prefetch", "background") if k in at})
        if mode != "floor":  # the floor starts with the image on the node: no pull
            run.extra["cpu_pull"] = cpu_spent(cpu0, cpu_pull, t_pull - t0)
        run.extra["cpu_to_output"] = cpu_spent(cpu0, cpu_out, t_out - t0)
        if layers:
            run.extra["layers"] = layers
        if mode == "floor":
            run.extra["page_cache_bytes"], run.extra["unpacked_bytes"] = page_cache_bytes(
                sorted((self.cdir / "root" / "io.containerd.snapshotter.v1.overlayfs" / "snapshots").glob("*/fs")))
        return run

    def cpu_now(self, mode: str) -> dict[str, float]:
        """CPU-seconds used so far by the machine (``busy``) and by the processes serving ``mode``'s start:
        the registry, the node's snapshotter (BootSeer's or the stargz peer) and containerd.  Why: all of them
        share this machine's cores, and a remote registry would not — a start that saturates them says so."""
        node: int | None = None
        if self.snapshotter_of(mode) == "bootseer":
            node = self.st.info.pids.get("snapshotter")
        elif self.snapshotter_of(mode) == "stargz" and self.peer is not None and self.peer.proc is not None:
            node = self.peer.proc.pid
        out = {"busy": busy_seconds()}
        for name, pid in (("registry", self.st.info.pids.get("registry")), ("snapshotter", node),
                          ("containerd", self.st.info.pids.get("containerd"))):
            v = process_seconds(pid)
            if v is not None:
                out[name] = v
        return out

    def lazy_layers_now(self) -> list[dict[str, Any]] | None:
        """The snapshotter's status of its lazy layers (asked on its control socket, fast enough to call the
        moment the output arrives); None when it cannot say."""
        ctl = self.st.info.snapshotter_control
        if not ctl:
            self.log("no fetch counters: the stack runs no lazy snapshotter")
            return None
        try:
            from bootseer.control import Control

            return list(Control(ctl, timeout=10).call("status")["layers"])
        except Exception as e:  # the figure is extra; a daemon without it must not fail the run
            self.log(f"no fetch counters from the snapshotter: {type(e).__name__}: {e}")
            return None

    def layer_rows(self, mode: str, docs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Per lazy layer of ``mode``'s image: blob size, bytes fetched, disk its chunk cache takes now."""
        sroot = self.st.info.snapshotter_root
        caches = cache_dirs(Path(sroot) / "lazy" / "cache") if sroot else {}  # LayerManager's root: <root>/lazy
        return layer_rows(docs or [], self.blob_layers.get(mode, {}), caches)

    # ---------------------------------------------------------------- sequential read, swapped layer
    def lazy_status(self) -> list[dict[str, Any]]:
        ctl = getattr(self.st.info, "snapshotter_control", None)
        if not ctl:
            return []
        return list(json.loads(self.bootseer("status", "--json", "--control", ctl, timeout=60).stdout)["layers"])

    def seq_read(self, mode: str, timeout: float) -> float | None:
        """MB/s of a cold sequential read of the image's largest file inside a container: from overlayfs on
        local disk (``floor``) or from BootSeer's lazy layers once every layer has left FUSE (``lazy``).
        None when the lazy layers did not all swap within ``timeout``."""
        self.reset()
        self.pull(mode)
        if mode == "lazy":
            deadline = time.monotonic() + timeout
            while True:  # polling the daemon's state with a deadline
                layers = self.lazy_status()
                if layers and all(ly.get("swapped") for ly in layers):
                    break
                if time.monotonic() > deadline:
                    self.log(f"seq read: lazy layers not all swapped after {timeout:.0f} s: "
                             + ", ".join(f"{ly['digest'][:19]} swapped={ly.get('swapped')}" for ly in layers))
                    return None
                time.sleep(1)
        drop_caches()
        path = self.work.seq_read_file or SEQ_READ_FILE
        _, out = self.run_container(self.snapshotter_of(mode), self.refs[mode], cmd=seq_read_cmd(path))
        n, secs = out.split()
        if int(n) < 100 << 20:
            raise RuntimeError(f"seq read: read only {n} bytes of {path}")
        return int(n) / float(secs) / 1e6


SEQ_READ_FILE = REALISTIC_SEQ_READ_FILE  # ~400 MB, the largest


def seq_read_cmd(path: str) -> list[str]:
    """A cold sequential read of ``path`` in 1 MiB reads inside the container (its python3): prints bytes, s."""
    return ["python3", "-c", "import sys, time\n"
            "t = time.monotonic(); n = 0\n"
            "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
            "    while (b := f.read(1 << 20)): n += len(b)\n"
            "print(n, time.monotonic() - t)", path]


SEQ_READ_CMD = seq_read_cmd(SEQ_READ_FILE)


def cache_dirs(root: Path) -> dict[str, Path]:
    """EROFS blob digest → its chunk cache directory below the snapshotter's ``cache/`` (from each cache's
    ``meta.json``)."""
    out: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for d in root.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                out[str(json.loads((d / "meta.json").read_text())["digest"])] = d
    return out


def allocated_bytes(directory: Path) -> int:
    """Disk the files below ``directory`` take (allocated blocks: a sparse chunk cache counts what it holds)."""
    total = 0
    for root, _dirs, names in os.walk(directory):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
    return total


def fetched_by_kind(docs: list[dict[str, Any]] | None) -> dict[str, int]:
    """Bytes BootSeer fetched over all lazy layers by kind (demand, prefetch, background); {} when unknown."""
    if docs is None:
        return {}
    out = {"demand": 0, "prefetch": 0, "background": 0}
    for ly in docs:
        for k, v in ((ly.get("fetched") or {}).get("bytes") or {}).items():
            if k in out:
                out[k] += int(v)
    return out


def layer_rows(docs: list[dict[str, Any]], blob_layers: dict[str, dict[str, Any]],
               caches: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per lazy layer of the image (``blob_layers``: blob → its layer and position), in layer order:
    the blob's size, the bytes fetched of it (all kinds), the disk its chunk cache takes."""
    rows = []
    for doc in docs:
        where = blob_layers.get(str(doc.get("digest")))
        if where is None:
            continue  # another image's layer (none after a cold reset)
        fetched = sum(int(v) for v in ((doc.get("fetched") or {}).get("bytes") or {}).values())
        cache = caches.get(str(doc["digest"]))
        rows.append({"position": int(where["position"]), "layer": str(where["layer"]), "blob": str(doc["digest"]),
                     "blob_size": int(doc.get("size") or 0), "fetched_to_output": fetched,
                     "disk_at_output": allocated_bytes(cache) if cache is not None else 0})
    return sorted(rows, key=lambda r: r["position"])


def _package_version(package: str) -> str:
    with contextlib.suppress(OSError):
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True,
                              text=True).stdout.strip()
    return ""


def _skopeo_to_layout(ref: str, layout: Path, tag: str) -> None:
    tmp = layout.with_name(layout.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{tmp}:{tag}"], check=True, capture_output=True)
    shutil.rmtree(layout, ignore_errors=True)
    os.replace(tmp, layout)


# ------------------------------------------------------------------------------------------ driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="realistic",
                   help="realistic (default), realistic-split (the same files in ~8 layers), a registry reference "
                        "(docker://REF or REF), oci-archive:PATH or oci:DIR — copied into the benchmark's registry")
    p.add_argument("--command", help="the command to run in the image, one shell-quoted string (required with an "
                                     "image other than the built-in ones)")
    p.add_argument("--expect", help="text of the stdout line that ends the start (required with --command on an "
                                    "image of your own); a command still running 'exit-timeout' s later is killed")
    p.add_argument("--exit-timeout", type=float, default=120.0,
                   help="seconds a command may run on after the expected line before its task is killed")
    p.add_argument("--seq-read-file", help="file of the sequential-read figure (read with the image's python3); "
                                           "default: libtorch_cpu.so for the built-in images, none otherwise")
    p.add_argument("--runs", type=int, default=5,
                   help="cold runs per mode and rate (median and spread; ≥ 5 for results)")
    p.add_argument("--rates", default=",".join(DEFAULT_RATES), help="registry link rates, e.g. 1gbit,200mbit")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--json", dest="json_path", help="write the result as JSON here")
    p.add_argument("--md", dest="md_path", help="write the Markdown table here")
    p.add_argument("--png", dest="png_path", help="write the chart here")
    p.add_argument("--render", metavar="JSON", help="only redraw --md/--png from an earlier --json result")
    p.add_argument("--no-seq-read", action="store_true",
                   help="skip the sequential read of a large file in a swapped lazy layer vs overlayfs")
    p.add_argument("--swap-timeout", type=float, default=300,
                   help="seconds to wait for BootSeer's lazy layers to leave FUSE before the sequential read")
    p.add_argument("--root", type=Path, default=None, help="stack scratch dir (default: a fresh /tmp/bs-startup-*)")
    p.add_argument("--cache", type=Path, default=Path("/var/cache/bootseer/images"),
                   help="where converted images and the peer's build are kept")
    p.add_argument("--index-version", type=int, choices=(2, 3), default=None,
                   help="the BootSeer index format the image is converted to (default: bootseer convert's)")
    return p


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from integration.bench import imagesource, peer
    from integration.netns import ShapedLink, parse_rate
    from integration.stack import StackConfig, running

    rates, modes = parse_rates(args.rates), parse_modes(args.modes)
    source = imagesource.parse_image(args.image)
    work = imagesource.workload(source, args.command, args.expect, args.seq_read_file)
    skipped: dict[str, str] = {}
    commands = _which_bootseer_commands() if {"lazy", "prefetch"} & set(modes) else set()
    for m in ("lazy", "prefetch"):
        why = bootseer_mode_missing(m, commands) if m in modes else None
        if why:
            skipped[m] = why
    peer_binary = None
    if {"stargz", "stargz-optimized"} & set(modes):
        try:
            _log("building the stargz peer (once per source version) ...")
            peer_binary = peer.build(args.cache.parent / "stargz-peer")
        except peer.PeerUnavailable as e:
            for m in ("stargz", "stargz-optimized"):
                if m in modes:
                    skipped[m] = str(e)
    for m, why in skipped.items():
        _log(f"skipping mode {m}: {why}")
    modes = [m for m in modes if m not in skipped]
    root = args.root or Path("/tmp") / f"bs-startup-{secrets.token_hex(3)}"
    runs: list[Run] = []
    t_start = time.time()
    cfg = StackConfig(root=root, rate=rates[0], sidecar=False,
                      snapshotter=bool({"lazy", "prefetch"} & set(modes)))
    seq: dict[str, list[float]] = {}
    manifest_bytes: int | None = None
    layer_sizes: list[int] = []

    def result(partial: bool) -> dict[str, Any]:
        out = summarize(runs, rates, modes, args.runs, skipped, manifest_bytes, sum(layer_sizes),
                        time.time() - t_start, seq, image=image_label(source), command=work.command,
                        layer_sizes=layer_sizes, seq_read_file=work.seq_read_file)
        out["partial"] = partial
        return out

    with running(cfg) as st:
        bench = Bench(st, cfg, modes, peer_binary, _log, source, work, args.exit_timeout)
        bench.index_version = args.index_version
        bench.reset()
        bench.setup(args.cache)
        layer_sizes = bench.facts.layer_sizes
        manifest_bytes = _manifest_hot_bytes(bench) if "prefetch" in modes else None
        if "prefetch" in modes and not manifest_bytes:  # a prefetch mode without a manifest is a lazy mode
            raise RuntimeError("the prefetch image has no hot-block manifest (did `bootseer record` fail?): "
                               f"{bench.recorded or 'no recording result'}")
        for n_rate, rate in enumerate(rates):
            ShapedLink(st.info.netns_id or "", 0).set_rate(parse_rate(rate))
            for i in range(args.runs):
                order = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in order:
                    r = bench.run_once(mode, rate)
                    r.extra["round"] = i
                    runs.append(r)
                    _log(f"{rate} run {i + 1}/{args.runs} {mode:17s} {r.seconds:6.2f} s (pull {r.pull_seconds:5.2f} s)"
                         f" link {r.link_bytes / 1e6:7.1f} MB, registry {r.registry_bytes / 1e6:7.1f} MB"
                         + cpu_text(r.extra.get("cpu_pull", {})))
                write_outputs(result(partial=True), args)  # a long run interrupted still leaves its figures
            if n_rate == 0 and "lazy" in modes and not args.no_seq_read and work.seq_read_file:
                # (the link does not matter to it)
                for i in range(args.runs):
                    for mode in ("floor", "lazy") if i % 2 == 0 else ("lazy", "floor"):
                        v = bench.seq_read(mode, timeout=args.swap_timeout)
                        if v is not None:
                            seq.setdefault(mode, []).append(round(v, 1))
                            _log(f"seq read {mode}: {v:.0f} MB/s")
                write_outputs(result(partial=True), args)
    return result(partial=False)


def _manifest_hot_bytes(bench: Bench) -> int | None:
    """The recorded hot set's bytes, from ``bootseer hotblocks show --json`` (None when it cannot say)."""
    with contextlib.suppress(Exception):
        doc = json.loads(bench.bootseer("hotblocks", "show", "--json", "--plain-http", bench.refs["prefetch"],
                                        timeout=120).stdout)
        for key in ("hot_bytes", "bytes", "total_bytes"):
            if isinstance(doc.get(key), int):
                return int(doc[key])
    return None


def image_label(source: ImageSource) -> str:
    if source.value == "realistic":
        return "bootseer/realistic:v1 (Debian bookworm + python3 + numpy + torch CPU)"
    if source.value == "realistic-split":
        return "bootseer/realistic-split:v1 (the realistic image's files in ~8 layers)"
    return source.label()


def layer_medians(runs: list[Run]) -> list[dict[str, Any]]:
    """Per layer position, the medians over ``runs`` of the per-layer figures each run took at its output."""
    by_pos: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        for row in r.extra.get("layers", []):
            by_pos.setdefault(int(row["position"]), []).append(row)
    out = []
    for pos, rows in sorted(by_pos.items()):
        out.append({"position": pos, "layer": rows[0]["layer"], "blob": rows[0]["blob"],
                    "blob_size": rows[0]["blob_size"],
                    "fetched_to_output": int(statistics.median(x["fetched_to_output"] for x in rows)),
                    "disk_at_output": int(statistics.median(x["disk_at_output"] for x in rows)), "n": len(rows)})
    return out


def summarize(runs: list[Run], rates: list[str], modes: list[str], n: int, skipped: dict[str, str],
              manifest_bytes: int | None, image_compressed: int, seconds: float,
              seq: dict[str, list[float]] | None = None, *, image: str | None = None,
              command: list[str] | None = None, layer_sizes: list[int] | None = None,
              seq_read_file: str | None = SEQ_READ_FILE) -> dict[str, Any]:
    from integration import images

    med: dict[str, dict[str, float]] = {}
    spreads: dict[str, dict[str, dict[str, float | int]]] = {}
    byts: dict[str, dict[str, dict[str, float]]] = {}
    layers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    cpus: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for rate in rates:
        rk = rate_key(rate)
        for mode in modes:
            rs = [r for r in runs if r.rate == rate and r.mode == mode]
            if not rs:
                continue
            med.setdefault(rk, {})[mode] = round(statistics.median(r.seconds for r in rs), 3)
            spreads.setdefault(rk, {})[mode] = spread([r.seconds for r in rs]).as_dict(3)
            byts.setdefault(rk, {})[mode] = {
                "link_to_output": int(statistics.median(r.link_bytes for r in rs)),
                "registry_to_output": int(statistics.median(r.registry_bytes for r in rs))}
            cpu = {part: median_cpu([r.extra.get(f"cpu_{part}", {}) for r in rs]) for part in ("pull", "to_output")}
            if any(cpu.values()):
                cpus.setdefault(rk, {})[mode] = cpu
            per_layer = layer_medians(rs)
            if per_layer:
                layers.setdefault(rk, {})[mode] = per_layer
    floors = [r for r in runs if r.mode == "floor" and "page_cache_bytes" in r.extra]
    hot: dict[str, Any] = {"image_compressed_bytes": image_compressed}
    if floors:
        hot["page_cache_bytes"] = int(statistics.median(r.extra["page_cache_bytes"] for r in floors))
        hot["image_unpacked_bytes"] = int(floors[0].extra["unpacked_bytes"])
    kinds: dict[str, dict[str, dict[str, list[int]]]] = {}  # rate → mode → kind → per run
    for r in runs:
        if "fetched_demand" in r.extra:
            d = kinds.setdefault(rate_key(r.rate), {}).setdefault(r.mode, {})
            for k in ("demand", "prefetch", "background"):
                d.setdefault(k, []).append(int(r.extra[f"fetched_{k}"]))
    fetched_kinds = {rk: {m: {k: int(statistics.median(v)) for k, v in d.items()} for m, d in per.items()}
                     for rk, per in kinds.items()}
    ratio_spreads = compute_ratio_spreads(runs, rates)
    if manifest_bytes:
        hot["manifest_bytes"] = manifest_bytes
        for rate in rates:  # per rate: the link is not the only thing that differs between them
            pre = [r for r in runs if r.mode == "prefetch" and r.rate == rate]
            if pre:
                ratio_spreads[f"fetched_vs_hotset_{rate_key(rate)}"] = spread(
                    [r.link_bytes / manifest_bytes for r in pre])
                dp = [(r.extra["fetched_demand"] + r.extra["fetched_prefetch"]) / manifest_bytes for r in pre
                      if "fetched_demand" in r.extra]
                if dp:
                    ratio_spreads[f"demand_prefetch_vs_hotset_{rate_key(rate)}"] = spread(dp)
    if seq and seq.get("floor") and seq.get("lazy"):
        ratio_spreads["swapped_seq_read_vs_overlay"] = ratio_spread(seq["lazy"], seq["floor"])
    ratios = {k: round(s.median, 4) for k, s in ratio_spreads.items()}
    counts = {rk: {m: int(s["n"]) for m, s in per.items()} for rk, per in spreads.items()}
    notes = ["Bytes over link: what the host end of the registry's shaped veth received from the pull's start to "
             "the output — everything, including the peer's and BootSeer's background fill. `fetched_vs_hotset` "
             "is that figure for lazy + prefetch over the recorded manifest's bytes; `demand_prefetch_vs_hotset` "
             "counts only BootSeer's demand and prefetch fetches (its own counters at the moment of the output)."]
    pre_runs = [r for r in runs if r.mode == "prefetch" and "fetched_prefetch" in r.extra]
    if pre_runs and not any(r.extra["fetched_prefetch"] for r in pre_runs):
        notes.append("**In the `prefetch` mode the snapshotter fetched 0 bytes by prefetch**: the hot-block manifest "
                     "was recorded and pushed, but nothing replayed it, so those figures are lazy pulls without "
                     "prefetch.")
    return {
        "benchmark": "startup",
        "image": image or image_label(ImageSource("builtin", "realistic")),
        "image_layers": list(layer_sizes or []),
        "command": list(command or images.REALISTIC_CMD),
        "rates": rates,
        "modes": modes,
        "runs": n,  # requested per mode and rate; run_counts: what was measured
        "run_counts": counts,
        "skipped": skipped,
        "median_seconds": med,
        "seconds": spreads,
        "bytes": byts,
        "cpu_seconds": cpus,
        "cores": os.cpu_count(),
        "layers": layers,
        "hot_set": hot,
        "fetched_by_kind_to_output": fetched_kinds,
        "seq_read_file": seq_read_file,
        "seq_read_mb_s": {"overlayfs_local": (seq or {}).get("floor", []),
                          "swapped_lazy": (seq or {}).get("lazy", [])},
        "ratios": ratios,
        "ratio_spreads": {k: s.as_dict() for k, s in ratio_spreads.items()},
        "goals": goal_status(ratio_spreads),
        "all_runs": [r.__dict__ for r in runs],
        "wall_seconds": round(seconds, 1),
        "notes": notes,
    }


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    if getattr(args, "command_line", None):
        result["command_line"] = args.command_line
    if args.json_path and not args.render:
        Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
    if args.md_path:
        Path(args.md_path).write_text(markdown(result))
    if args.png_path:
        write_png(result, Path(args.png_path))


def report(result: dict[str, Any]) -> None:
    for rk, m in result["median_seconds"].items():
        floor = m.get("floor")
        wire = result.get("bytes", {}).get(rk, {})

        def notes(mode: str, v: float, floor: float | None = floor, wire: dict[str, Any] = wire) -> str:
            link = wire.get(mode, {}).get("link_to_output")
            parts = ([f"{v / floor:.2f}× floor"] if floor else []) + \
                ([f"{link / 1e6:.0f} MB wire"] if link is not None else [])
            return f" ({', '.join(parts)})" if parts else ""

        print(f"at {rk}: " + ", ".join(f"{mode} {v:.2f} s{notes(mode, v)}" for mode, v in m.items()))
        for mode, lys in result.get("layers", {}).get(rk, {}).items():
            for ly in lys:
                print(f"  {mode} layer {ly['position']} {ly['layer'][:19]}: blob {ly['blob_size'] / 1e6:.1f} MB, "
                      f"fetched {ly['fetched_to_output'] / 1e6:.1f} MB, disk {ly['disk_at_output'] / 1e6:.1f} MB")
    spreads = result.get("ratio_spreads", {})
    for k, v in sorted(result["ratios"].items()):
        g = result["goals"].get(k)
        sp = spreads.get(k)
        rng = f" [{sp['min']:.3f}–{sp['max']:.3f}]" if sp and sp["n"] > 1 else ""
        verdict_ = (g.get("verdict") or ("met" if g.get("met") else "not met")) if g else ""
        print(f"  {k} = {v:.3f}{rng}" + (f"  (goal {g.get('op', '<=')} {g['bound']}: {verdict_})" if g else ""))
    for m, why in result["skipped"].items():
        print(f"  not measured: {m}: {why}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parse_rates(args.rates), parse_modes(args.modes)
        if not args.render:
            from integration.bench import imagesource

            imagesource.workload(imagesource.parse_image(args.image), args.command, args.expect, args.seq_read_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.render:
        result = json.loads(Path(args.render).read_text())
    else:
        if os.geteuid() != 0:
            print("error: the start-up benchmark needs root (network namespaces, mounts, drop_caches)",
                  file=sys.stderr)
            return 2
        if args.runs < 1:
            print("error: --runs must be at least 1", file=sys.stderr)
            return 2
        if args.runs < 5:
            _log(f"--runs {args.runs}: fine for trying it out; results need ≥ 5 (the spread says how far to trust "
                 "them)")
        args.command_line = "bootseer bench startup " + shlex.join(argv if argv is not None else sys.argv[1:])
        result = run(args)
    write_outputs(result, args)
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
