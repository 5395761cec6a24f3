"""Pull + unpack benchmark: the realistic image through BootSeer's snapshotter vs containerd's ``overlayfs``.

``bootseer bench unpack [--runs N] [--json FILE]`` (or ``python -m integration.bench.unpack``).

Both snapshotters sit behind the same containerd of one local stack, so the registry, the link (loopback),
the disk and containerd's own work (fetch, gunzip, tar apply) are shared; what differs is the snapshotter:
a Go plugin inside containerd vs our Python daemon behind a gRPC proxy.  On an ordinary (non-lazy) pull the
snapshotter does little — Prepare, Commit (which walks the layer for its usage), Stat/List — so the goal is
parity (ratio ≤ 1.1).

Each run is a full ``ctr image pull`` (blobs re-downloaded, every layer applied); between runs the image is
removed with ``--sync`` so containerd's garbage collector removes its content and snapshots, and dirty pages
are flushed so one run's writeback does not land in the next one's time.  The two snapshotters alternate
which goes first.  Results are medians over ``--runs``.

On a shared 2-core machine the wall times move by ±15 % with whatever else runs (containerd's gunzip and tar
apply are CPU-bound), so the JSON also carries what is attributable to the snapshotter alone: the CPU time
our daemon used per pull (vs containerd's), and the median of the per-pair ratios (each bootseer run against
the overlayfs run next to it), which slow drifts of background load affect less than two separate medians.

JSON: ``ratios.bootseer_vs_overlayfs`` (ratio of the median times, lower is better), ``ratios.paired_median``,
per-run seconds and CPU seconds, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bootseer.testkit import drop_caches as drop_caches_
from integration import images
from integration.stack import Stack, StackConfig, running

GOAL = 1.1
SNAPSHOTTERS = ("overlayfs", "bootseer")
NAMESPACE = "bench-unpack"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench unpack", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per snapshotter (median taken; ≥ 3)")
    p.add_argument("--json", dest="json_path", help="write the result as JSON here")
    p.add_argument("--drop-caches", action="store_true",
                   help="also drop the page cache before each run (colder, noisier)")
    p.add_argument("--root", type=Path, default=None, help="stack scratch dir (default: a fresh /tmp/bs-unpack-*)")
    return p


def _settle(drop_caches: bool) -> None:
    os.sync()
    if drop_caches:
        assert drop_caches_(), "dropping the page cache needs root"


def _remove_image(st: Stack, ref: str) -> None:
    st.ctr("image", "rm", "--sync", ref, namespace=NAMESPACE, check=False)


def _snapshot_count(st: Stack, snapshotter: str) -> int:
    out = st.ctr("snapshots", "--snapshotter", snapshotter, "ls", namespace=NAMESPACE).stdout
    return max(0, len(out.strip().splitlines()) - 1)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pull_once(st: Stack, ref: str, snapshotter: str, drop_caches: bool) -> tuple[float, float, float]:
    """One full pull; returns (wall seconds, our daemon's CPU seconds, containerd's CPU seconds)."""
    _remove_image(st, ref)
    if _snapshot_count(st, snapshotter):
        raise RuntimeError(f"{snapshotter}: snapshots left after removing the image")
    _settle(drop_caches)
    ours, ctd = st.info.pids["snapshotter"], st.info.pids["containerd"]
    c0, k0 = _cpu_seconds(ours), _cpu_seconds(ctd)
    t0 = time.monotonic()
    st.ctr("image", "pull", "--plain-http", "--snapshotter", snapshotter, ref, namespace=NAMESPACE, timeout=1800)
    elapsed = time.monotonic() - t0
    cpu_ours, cpu_ctd = _cpu_seconds(ours) - c0, _cpu_seconds(ctd) - k0
    if _snapshot_count(st, snapshotter) < 1:
        raise RuntimeError(f"{snapshotter}: the pull unpacked nothing")
    return elapsed, cpu_ours, cpu_ctd


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3 (a median of fewer says little)")
    root = args.root or Path("/tmp") / f"bs-unpack-{secrets.token_hex(3)}"
    with running(StackConfig(root=root, snapshotter=True, sidecar=False)) as st:  # no conversion load
        if not st.info.snapshotter_socket:
            raise SystemExit("the stack did not start BootSeer's snapshotter")
        print("pushing the realistic image (built once, then cached) ...", file=sys.stderr, flush=True)
        ref = images.push_realistic(st.info.registry)
        secs: dict[str, list[float]] = {s: [] for s in SNAPSHOTTERS}
        daemon_cpu: dict[str, list[float]] = {s: [] for s in SNAPSHOTTERS}
        containerd_cpu: dict[str, list[float]] = {s: [] for s in SNAPSHOTTERS}
        for i in range(args.runs):
            order = SNAPSHOTTERS if i % 2 == 0 else SNAPSHOTTERS[::-1]
            for sn in order:
                t, cpu_ours, cpu_ctd = pull_once(st, ref, sn, args.drop_caches)
                secs[sn].append(round(t, 3))
                daemon_cpu[sn].append(round(cpu_ours, 3))
                containerd_cpu[sn].append(round(cpu_ctd, 3))
                print(f"run {i + 1}/{args.runs} {sn:9s} {t:6.2f} s (containerd CPU {cpu_ctd:5.2f} s, "
                      f"bootseer daemon CPU {cpu_ours:4.2f} s)", file=sys.stderr, flush=True)
        _remove_image(st, ref)
    med = {s: statistics.median(v) for s, v in secs.items()}
    ratio = med["bootseer"] / med["overlayfs"]
    paired = statistics.median(b / o for b, o in zip(secs["bootseer"], secs["overlayfs"], strict=True))
    return {
        "benchmark": "unpack",
        "image": ref.split("/", 1)[1],
        "layers": len(images.build_realistic().layers),
        "runs": args.runs,
        "drop_caches": args.drop_caches,
        "seconds": secs,
        "median_seconds": med,
        "containerd_cpu_seconds": containerd_cpu,
        "bootseer_daemon_cpu_seconds": daemon_cpu,
        "goal": {"bootseer_vs_overlayfs": GOAL},
        "ratios": {"bootseer_vs_overlayfs": round(ratio, 4), "paired_median": round(paired, 4)},
        "meets_goal": ratio <= GOAL,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    m = result["median_seconds"]
    print(f"pull+unpack median: overlayfs {m['overlayfs']:.2f} s, bootseer {m['bootseer']:.2f} s")
    r = result["ratios"]
    print(f"ratio bootseer/overlayfs: {r['bootseer_vs_overlayfs']:.3f} (paired runs: {r['paired_median']:.3f}; "
          f"goal ≤ {GOAL})")
    cpu = statistics.median(result["bootseer_daemon_cpu_seconds"]["bootseer"])
    print(f"bootseer daemon CPU per pull: {cpu:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
