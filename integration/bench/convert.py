"""EROFS conversion benchmark: the realistic image's layers through the converter vs a plain ``gunzip | tar -x``.

``bootseer bench convert [--runs N] [--parallel P] [--json FILE]`` (or ``python -m integration.bench.convert``).

What the sidecar does per layer, on local files (the registry round trips are not the converter's cost):
verified decompression and safe unpack into a scratch dir, ``mkfs.erofs -zlz4hc,4 -C65536``, chunk hashing.  The
baseline, measured in the same run on the same layer files, is what any node does to use a layer at all:
``gzip -dc LAYER | tar -x`` (GNU tar, as root: owners, modes and xattrs kept) into a scratch dir.  The
ratio says how much more CPU-time one conversion costs than one ordinary unpack — paid once per layer on
the registry's host instead of on every node's start-up path.

Each run converts every layer one after the other (per-layer seconds, MB/s of compressed input and of
unpacked data), then the whole image with ``--parallel`` layers at once (as the sidecar does; the wall time
of the image).  Runs alternate which side goes first; results are medians over ``--runs``.

JSON: ``ratios.convert_vs_unpack`` (sum of per-layer convert medians / sum of unpack medians; > 1 means
conversion is slower), ``ratios.per_layer``, ``ratios.image_parallel_vs_unpack``; MB/s; layer sizes
(compressed, unpacked, EROFS); the phase split (unpack, mkfs, hash).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from integration import images
from registry_sidecar.convert import ConvertOptions, LocalLayer, convert_layer_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs (median taken; ≥ 1, 3 or more for a real figure)")
    p.add_argument("--parallel", type=int, default=2, help="layers converted at once in the whole-image pass")
    p.add_argument("--json", dest="json_path", help="write the result as JSON here")
    p.add_argument("--scratch", type=Path, default=None, help="scratch parent dir (default $TMPDIR)")
    return p


def _layers() -> list[tuple[Path, str, int, str]]:
    """(blob path, digest, compressed size, comment) of the realistic image's layers, from the image cache."""
    img = images.build_realistic()
    out = []
    for ly in img.layers:
        path = img.layout / "blobs" / "sha256" / ly["digest"].split(":", 1)[1]
        out.append((path, ly["digest"], int(ly["size"]), ly.get("comment", "")))
    return out


def _unpack_baseline(blob: Path, scratch: Path) -> float:
    dest = Path(tempfile.mkdtemp(prefix="bench-tar-", dir=scratch))
    try:
        t = time.monotonic()
        gz = subprocess.Popen(["gzip", "-dc", str(blob)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "--xattrs", "--xattrs-include=*", "--same-owner", "-p", "-C", str(dest)],
                             stdin=gz.stdout, capture_output=True)
        assert gz.stdout is not None
        gz.stdout.close()
        if gz.wait() != 0 or tar.returncode != 0:
            raise RuntimeError(f"gzip|tar of {blob.name} failed: {tar.stderr.decode(errors='replace')[-300:]}")
        os.sync()  # the converter's output is on disk too (mkfs.erofs writes its image)
        return time.monotonic() - t
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _convert(blob: Path, digest: str, scratch: Path, media_type: str) -> tuple[float, LocalLayer]:
    out = Path(tempfile.mkdtemp(prefix="bench-erofs-", dir=scratch))
    try:
        t = time.monotonic()
        local = convert_layer_file(blob, media_type, digest, out, ConvertOptions())
        os.sync()
        return time.monotonic() - t, local
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(runs: int, parallel: int, scratch_parent: Path | None) -> dict[str, Any]:
    from rich.progress import Progress

    layers = _layers()
    mt = "application/vnd.oci.image.layer.v1.tar+gzip"
    scratch = Path(tempfile.mkdtemp(prefix="bs-bench-convert-", dir=scratch_parent))
    unpack_s: list[list[float]] = [[] for _ in layers]
    convert_s: list[list[float]] = [[] for _ in layers]
    phases: list[dict[str, list[float]]] = [{} for _ in layers]
    image_s: list[float] = []
    info: list[dict[str, Any]] = [{} for _ in layers]
    try:
        with Progress(transient=True) as prog:
            task = prog.add_task("convert bench", total=runs * (2 * len(layers) + 1))
            for r in range(runs):
                for i, (blob, digest, size, comment) in enumerate(layers):
                    order = ("unpack", "convert") if r % 2 == 0 else ("convert", "unpack")
                    for side in order:
                        prog.update(task, description=f"run {r + 1}/{runs} layer {i + 1} {side}")
                        if side == "unpack":
                            unpack_s[i].append(_unpack_baseline(blob, scratch))
                        else:
                            secs, local = _convert(blob, digest, scratch, mt)
                            convert_s[i].append(secs)
                            for k, v in local.seconds.items():
                                phases[i].setdefault(k, []).append(v)
                            info[i] = {"digest": digest, "comment": comment, "compressed_bytes": size,
                                       "unpacked_bytes": local.stats.bytes, "tar_bytes": local.stats.tar_bytes,
                                       "erofs_bytes": local.blob.blob.size, "erofs_digest": local.blob.blob.digest,
                                       "chunks": local.blob.chunk_count, "entries": local.stats.entries}
                        prog.advance(task)
                prog.update(task, description=f"run {r + 1}/{runs} whole image, {parallel} at once")
                t = time.monotonic()
                with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                    list(pool.map(lambda ly: _convert(ly[0], ly[1], scratch, mt), layers))
                image_s.append(time.monotonic() - t)
                prog.advance(task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med_u = [statistics.median(v) for v in unpack_s]
    med_c = [statistics.median(v) for v in convert_s]
    total_in = sum(x["compressed_bytes"] for x in info)
    total_unpacked = sum(x["unpacked_bytes"] for x in info)
    for i, x in enumerate(info):
        x["unpack_seconds"], x["convert_seconds"] = med_u[i], med_c[i]
        x["phase_seconds"] = {k: round(statistics.median(v), 3) for k, v in phases[i].items()}
        x["convert_mb_per_s"] = round(x["compressed_bytes"] / 1e6 / med_c[i], 2)
        x["convert_unpacked_mb_per_s"] = round(x["unpacked_bytes"] / 1e6 / med_c[i], 2)
        x["ratio_convert_vs_unpack"] = round(med_c[i] / med_u[i], 3)
    med_image = statistics.median(image_s)
    return {
        "benchmark": "convert",
        "runs": runs,
        "parallel": parallel,
        "cpus": os.cpu_count(),
        "layers": info,
        "compressed_bytes": total_in,
        "unpacked_bytes": total_unpacked,
        "erofs_bytes": sum(x["erofs_bytes"] for x in info),
        "median_seconds": {"unpack_sum": round(sum(med_u), 3), "convert_sum": round(sum(med_c), 3),
                           "convert_image_parallel": round(med_image, 3)},
        "per_run_seconds": {"unpack": unpack_s, "convert": convert_s, "convert_image_parallel": image_s},
        "mb_per_s": {"convert_sequential": round(total_in / 1e6 / sum(med_c), 2),
                     "convert_image_parallel": round(total_in / 1e6 / med_image, 2),
                     "convert_sequential_unpacked": round(total_unpacked / 1e6 / sum(med_c), 2),
                     "unpack_baseline": round(total_in / 1e6 / sum(med_u), 2)},
        "ratios": {"convert_vs_unpack": round(sum(med_c) / sum(med_u), 3),
                   "image_parallel_vs_unpack": round(med_image / sum(med_u), 3),
                   "per_layer": [round(c / u, 3) for c, u in zip(med_c, med_u, strict=True)]},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if shutil.which("mkfs.erofs") is None:
        raise SystemExit("mkfs.erofs not found (erofs-utils; integration/install.sh installs it)")
    res = run(args.runs, args.parallel, args.scratch)
    print(f"realistic image, {len(res['layers'])} layers, medians of {res['runs']} run(s), {res['cpus']} CPUs:")
    print(f"{'layer':<14}{'gzip MB':>9}{'unpacked MB':>13}{'EROFS MB':>10}{'tar -x s':>10}{'convert s':>11}"
          f"{'MB/s':>8}{'ratio':>7}  phases (s)")
    for x in res["layers"]:
        ph = " ".join(f"{k} {v:.1f}" for k, v in x["phase_seconds"].items())
        print(f"{x['digest'][7:19]:<14}{x['compressed_bytes'] / 1e6:>9.1f}{x['unpacked_bytes'] / 1e6:>13.1f}"
              f"{x['erofs_bytes'] / 1e6:>10.1f}{x['unpack_seconds']:>10.2f}{x['convert_seconds']:>11.2f}"
              f"{x['convert_mb_per_s']:>8.1f}{x['ratio_convert_vs_unpack']:>7.2f}  {ph}")
    m, r = res["mb_per_s"], res["ratios"]
    print(f"conversion: {m['convert_sequential']:.1f} MB/s compressed ({m['convert_sequential_unpacked']:.1f} MB/s "
          f"unpacked) one layer at a time; whole image with {res['parallel']} at once "
          f"{res['median_seconds']['convert_image_parallel']:.1f} s = {m['convert_image_parallel']:.1f} MB/s")
    print(f"baseline gzip -dc | tar -x: {res['median_seconds']['unpack_sum']:.1f} s ({m['unpack_baseline']:.1f} MB/s)")
    print(f"ratio convert/unpack: {r['convert_vs_unpack']:.2f} (per layer {r['per_layer']}); "
          f"image, parallel: {r['image_parallel_vs_unpack']:.2f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
