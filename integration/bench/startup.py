"""Start-up benchmark: time from "pull the image" to the command's output, every way this machine can start
the realistic image, side by side in one run on one shaped link.

``bootseer bench startup [--runs N] [--rates 1gbit,200mbit] [--modes …] [--json FILE] [--md FILE] [--png FILE]``
(or ``python -m integration.bench.startup``).  ``--render FILE.json`` redraws the table and chart of an earlier
run without running anything.

One local stack (containerd 1.6, docker-registry in a network namespace behind a ``tbf``-shaped veth), the
realistic image (Debian + python3 + numpy + torch CPU, three layers), its command ``python3 -c "import torch;
print(torch.ones(2).sum())"``, and these modes:

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
back-off).  Each container's stdout is checked against the expected output.  The time runs from the start of
the pull command to the moment the output line arrives.  Bytes: what crossed the shaped link until that moment
(the host end's receive counter) and what the registry logged as served, beside the hot set — the image bytes
in the page cache after a floor run (uncompressed, what start-up reads), and the recorded hot-block manifest's
bytes when BootSeer's recorder is present.  Modes rotate their order from run to run; medians over ``--runs``.

JSON: ``all_runs`` (every run, with its round), ``run_counts`` (what was measured; ``runs`` is what was asked),
``median_seconds`` and ``seconds`` (median, min, max, n), ``bytes``, ``ratios`` (time ratios of medians, e.g.
``prefetch_vs_floor_1g``; ``fetched_vs_hotset_<rate>``) with ``ratio_spreads`` (the per-round ratios' range),
``goals`` (each with its verdict: met, not met, inconclusive when the spread straddles the bound, or not
measured), ``skipped``.  Five runs or more for figures that are quoted: three leave the spread meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
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
    if seq.get("overlayfs_local") and seq.get("swapped_lazy"):
        out.append(f"Cold sequential read of `{SEQ_READ_FILE.rsplit('/', 1)[1]}` inside a container: overlayfs on "
                   f"local disk {statistics.median(seq['overlayfs_local']):.0f} MB/s, BootSeer lazy layers after "
                   f"they left FUSE {statistics.median(seq['swapped_lazy']):.0f} MB/s (median).")
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
    ax.set_title(f"Cold start of the realistic image ({result.get('runs')} runs per bar)")
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

    def __init__(self, st: Any, cfg: Any, modes: list[str], peer_binary: Path | None, log: Callable[[str], None]):
        from integration import images
        from integration.bench import peer

        self.st, self.cfg, self.modes, self.log = st, cfg, modes, log
        self.root = Path(st.info.root)
        self.cdir = Path(st.info.containerd_config).parent
        self.refs: dict[str, str] = {}
        self.cmd = list(images.REALISTIC_CMD)
        self.expected = images.REALISTIC_OUTPUT
        self.peer: Any = None
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
        from integration.bench import peer

        self.log("pushing the realistic image (built once, then cached) ...")
        base = images.push_realistic(self.st.info.registry)
        self.refs["overlayfs"] = self.refs["floor"] = base
        for mode, opt in (("stargz", None), ("stargz-optimized", self.cmd)):
            if mode not in self.modes:
                continue
            tag = "v1-esgz" if opt is None else "v1-esgz-opt"
            ref = base.rsplit(":", 1)[0] + ":" + tag
            key = hashlib.sha256(json.dumps([images.realistic_key(), tag, opt, _package_version("stargz-snapshotter")])
                                 .encode()).hexdigest()[:16]
            layout = cache / f"realistic-{key}-{tag}"
            if not (layout / "index.json").exists():
                self.log(f"{mode}: converting with ctr-remote (minutes; cached in {layout}) ...")
                peer.convert_estargz(self.st, base, ref, NS, optimize_cmd=opt)
                _skopeo_to_layout(ref, layout, tag)
            else:
                from integration.oci import push

                push(layout, tag, ref)
            self.refs[mode] = ref
        repo = base.rsplit(":", 1)[0]
        if "lazy" in self.modes:
            self.refs["lazy"] = self._indexed(base, repo + "-lazy:v1")
        if "prefetch" in self.modes:
            self.refs["prefetch"] = self._indexed(base, repo + "-prefetch:v1")
            self._record(self.refs["prefetch"])

    def _indexed(self, base: str, ref: str) -> str:
        """``base`` copied to ``ref`` and indexed with ``bootseer convert`` (BootSeer's EROFS blobs)."""
        self.log(f"indexing {ref} with bootseer convert ...")
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{base}", f"docker://{ref}"], check=True,
                       capture_output=True)
        self.bootseer("convert", "--plain-http", "--state-dir", str(self.root / "convert-state"), ref)
        return ref

    def _record(self, ref: str) -> None:
        self.log(f"recording the hot blocks of {ref} with bootseer record ...")
        self.reset()
        out = self.bootseer("record", ref, "--address", self.st.info.containerd_socket, "--control",
                            str(getattr(self.st.info, "snapshotter_control", "")), "--plain-http", "--json",
                            "--", *self.cmd, timeout=1800).stdout
        with contextlib.suppress(ValueError):
            self.recorded = json.loads(out)

    # -------------------------------------------------------------------------------- runs
    def run_container(self, snapshotter: str, ref: str, at_output: Callable[[], None] = lambda: None,
                      cmd: list[str] | None = None) -> tuple[float, str]:
        """``ctr run --rm``: (the monotonic time the first stdout line arrived — ``at_output`` is called then —,
        stdout); fails unless the container exits 0 and, for the benchmark's command, prints exactly the
        expected output."""
        self.counter += 1
        name = f"startup-{os.getpid()}-{self.counter}"
        proc = subprocess.Popen(["ctr", "-a", self.st.info.containerd_socket, "-n", NS, "run", "--rm",
                                 "--snapshotter", snapshotter, ref, name, *(cmd or self.cmd)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else ""), daemon=True)
        reader.start()
        assert proc.stdout is not None
        first = proc.stdout.readline()
        t_out = time.monotonic()
        at_output()
        rest = proc.stdout.read()
        rc = proc.wait(timeout=1800)
        reader.join(timeout=60)
        out = first + rest
        if rc != 0 or (cmd is None and out != self.expected):
            raise RuntimeError(f"{snapshotter}: container output {out!r} (exit {rc}), expected {self.expected!r}; "
                               f"stderr: {''.join(err).strip()[-1500:]}")
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
        t0 = time.monotonic()
        if mode != "floor":
            self.pull(mode)
        t_pull = time.monotonic()
        at: dict[str, int] = {}

        def sample() -> None:
            at["rx"], at["log"] = self.link_rx(), self.registry_log_size()
            if mode in ("lazy", "prefetch"):
                at.update(self.fetched_by_kind())

        t_out, _ = self.run_container(self.snapshotter_of(mode), self.refs[mode], sample)
        run = Run(mode, rate, round(t_out - t0, 3), round(t_pull - t0, 3), at["rx"] - rx0,
                  self.registry_served(log0, at["log"]))
        run.extra.update({f"fetched_{k}": at[k] for k in ("demand", "prefetch", "background") if k in at})
        if mode == "floor":
            run.extra["page_cache_bytes"], run.extra["unpacked_bytes"] = page_cache_bytes(
                sorted((self.cdir / "root" / "io.containerd.snapshotter.v1.overlayfs" / "snapshots").glob("*/fs")))
        return run

    def fetched_by_kind(self) -> dict[str, int]:
        """BootSeer's snapshotter's own count of the bytes it fetched, by kind (demand, prefetch, background),
        over all lazy layers — asked on its control socket, fast enough to call the moment the output arrives."""
        ctl = self.st.info.snapshotter_control
        out = {"demand": 0, "prefetch": 0, "background": 0}
        if not ctl:
            self.log("no fetch counters: the stack runs no lazy snapshotter")
            return {}
        try:
            from bootseer.control import Control

            for ly in Control(ctl, timeout=10).call("status")["layers"]:
                for k, v in ((ly.get("fetched") or {}).get("bytes") or {}).items():
                    if k in out:
                        out[k] += int(v)
        except Exception as e:  # the figure is extra; a daemon without it must not fail the run
            self.log(f"no fetch counters from the snapshotter: {type(e).__name__}: {e}")
            return {}
        return out

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
        _, out = self.run_container(self.snapshotter_of(mode), self.refs[mode], cmd=SEQ_READ_CMD)
        n, secs = out.split()
        if int(n) < 100 << 20:
            raise RuntimeError(f"seq read: read only {n} bytes of {SEQ_READ_FILE}")
        return int(n) / float(secs) / 1e6


SEQ_READ_FILE = "/usr/local/lib/python3.11/dist-packages/torch/lib/libtorch_cpu.so"  # ~400 MB, the largest
SEQ_READ_CMD = ["python3", "-c", "import sys, time\n"
                "t = time.monotonic(); n = 0\n"
                "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
                "    while (b := f.read(1 << 20)): n += len(b)\n"
                "print(n, time.monotonic() - t)", SEQ_READ_FILE]


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
    return p


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from integration import images
    from integration.bench import peer
    from integration.netns import ShapedLink, parse_rate
    from integration.stack import StackConfig, running

    rates, modes = parse_rates(args.rates), parse_modes(args.modes)
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
    image_compressed = sum(ly["size"] for ly in images.build_realistic().layers)
    seq: dict[str, list[float]] = {}
    manifest_bytes: int | None = None

    def result(partial: bool) -> dict[str, Any]:
        out = summarize(runs, rates, modes, args.runs, skipped, manifest_bytes, image_compressed,
                        time.time() - t_start, seq)
        out["partial"] = partial
        return out

    with running(cfg) as st:
        bench = Bench(st, cfg, modes, peer_binary, _log)
        bench.reset()
        bench.setup(args.cache)
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
                         f" link {r.link_bytes / 1e6:7.1f} MB, registry {r.registry_bytes / 1e6:7.1f} MB")
                write_outputs(result(partial=True), args)  # a long run interrupted still leaves its figures
            if n_rate == 0 and "lazy" in modes and not args.no_seq_read:  # the link does not matter to it
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


def summarize(runs: list[Run], rates: list[str], modes: list[str], n: int, skipped: dict[str, str],
              manifest_bytes: int | None, image_compressed: int, seconds: float,
              seq: dict[str, list[float]] | None = None) -> dict[str, Any]:
    from integration import images

    med: dict[str, dict[str, float]] = {}
    spreads: dict[str, dict[str, dict[str, float | int]]] = {}
    byts: dict[str, dict[str, dict[str, float]]] = {}
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
        "image": "bootseer/realistic:v1 (Debian bookworm + python3 + numpy + torch CPU)",
        "command": list(images.REALISTIC_CMD),
        "rates": rates,
        "modes": modes,
        "runs": n,  # requested per mode and rate; run_counts: what was measured
        "run_counts": counts,
        "skipped": skipped,
        "median_seconds": med,
        "seconds": spreads,
        "bytes": byts,
        "hot_set": hot,
        "fetched_by_kind_to_output": fetched_kinds,
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
        print(f"at {rk}: " + ", ".join(f"{mode} {v:.2f} s" + (f" ({v / floor:.2f}× floor)" if floor else "")
                                       for mode, v in m.items()))
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
