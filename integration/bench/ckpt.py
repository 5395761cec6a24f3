"""Checkpoint-load benchmark: striped parallel reads vs one stream, and the FUSE mount vs a raw local read.

``bootseer bench ckpt [--json FILE]`` (or ``python -m integration.bench.ckpt``).

Remote part — why nginx: the thing under test is "every connection to the store is slow, the store as
a whole is not" (HDFS datanodes, S3 prefixes, object gateways all behave like that).  nginx's
``limit_rate`` shapes each response independently and serves the stripe objects with ``sendfile``, so
the server costs almost no CPU on the 2-core machine and the client (ours) is what gets measured.  A
Python token-bucket server would compete with the reader for the same two cores.  The reader reaches
it through fsspec's HTTP filesystem behind pyarrow's ``FSSpecHandler`` — the same generic path any
fsspec store takes.  Each configuration reads a prefix of the checkpoint sized to take about
``--seconds`` at its bound, so every number is a steady-state rate over the same wall time; the bound
is ``min(N × per-stream rate, link)``, with the link measured as unshaped parallel range GETs.

Local part: a checkpoint on local disk, read once raw (the original file) and once through a fresh
ckptfs mount of its striped store, page cache dropped before each.  Before each timed read the
benchmark touches and frees some anonymous memory: on a Firecracker guest with free-page reporting,
the first CPU write to memory the host has taken back costs a host fault per page, which taxes a FUSE
read (the kernel copies every page it fills) far more than a disk read (filled by DMA) and would make
the result depend on what the machine did seconds before.  Bare-metal GPU nodes have no such tax.

Results are medians over ``--repeats`` runs.  JSON: ``ratios`` holds ``striped_vs_bound_n8``,
``striped_vs_single``, ``fuse_vs_raw_local`` (plus the other stripe counts).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mmap
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckptfs.baseline import read_file_single_stream
from ckptfs.manifest import MANIFEST_NAME
from ckptfs.put import put
from ckptfs.reader import Checkpoint, ReaderOptions, ReadState
from ckptfs.sizes import human, parse_size
from ckptfs.testing import free_port, mounted, wait_until

GOAL_BOUND = 0.8
GOAL_FUSE = 0.7


# -- helpers --------------------------------------------------------------------------------------------
def _write_random(path: Path, size: int) -> None:
    """Incompressible data, written in 64 MiB blocks (seeded, so runs are comparable)."""
    import random

    rng = random.Random(1234)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(rng.randbytes(n))
            left -= n


def _drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _prefault(gib: float) -> None:
    """Touch then free ``gib`` GiB, so the next allocations get pages the host has backed (see above)."""
    if gib <= 0:
        return
    m = mmap.mmap(-1, int(gib * (1 << 30)), flags=mmap.MAP_PRIVATE)
    try:
        step = mmap.PAGESIZE
        for off in range(0, len(m), step):
            m[off] = 1
    finally:
        m.close()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- nginx ----------------------------------------------------------------------------------------------
NGINX_CONF = """
worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    sendfile_max_chunk 256k;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{shaped};
        root {docroot};
        limit_rate {rate};
        limit_rate_after 0;
    }}
    server {{
        listen 127.0.0.1:{open};
        root {docroot};
    }}
}}
"""


def nginx_binary() -> str:
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("nginx not found: install nginx-light (integration/install.sh does)")


@contextlib.contextmanager
def nginx(docroot: Path, root: Path, rate: int) -> Iterator[tuple[int, int]]:
    """nginx serving ``docroot`` on two loopback ports: one shaped per connection, one not."""
    shaped, open_ = free_port(), free_port()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, docroot=docroot, rate=rate, shaped=shaped, open=open_))
    with open(root / "stderr.log", "wb") as errlog:
        proc = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(root)],
                                stdout=subprocess.DEVNULL, stderr=errlog)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(root / 'stderr.log').read_text()}")
            try:
                for port in (shaped, open_):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(up, 10, "nginx")
        yield shaped, open_
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_link(port: int, docroot: Path, rel_objects: list[str], streams: int, seconds: float) -> float:
    """Unshaped throughput of ``streams`` parallel plain range GETs (no hashing): the link's ceiling."""
    stop = time.monotonic() + seconds
    total = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        buf = bytearray(1 << 20)
        k = i
        try:
            while time.monotonic() < stop:
                rel = rel_objects[k % len(rel_objects)]
                k += streams
                conn.request("GET", "/" + rel)
                r = conn.getresponse()
                got = 0
                while time.monotonic() < stop:
                    n = r.readinto(buf)
                    if not n:
                        break
                    got += n
                with lock:
                    total[0] += got
                if not r.isclosed():
                    r.close()
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port)
        finally:
            conn.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(worker, range(streams)))
    return total[0] / (time.monotonic() - t0)


# -- remote: striped vs single --------------------------------------------------------------------------
def _read_prefix_striped(uri: str, path: str, nbytes: int, stripes: int) -> float:
    """Seconds to read the first ``nbytes`` of ``path`` with the striped reader (``stripes`` streams)."""
    # One thread per stripe: N connections at most, so the bound N × per-stream rate is the real one.
    opts = ReaderOptions(threads=stripes, readahead=2 * stripes, memory_budget=1 << 30)
    t0 = time.perf_counter()
    with Checkpoint(uri, reader_options=opts) as ckpt:
        f = ckpt.file(path)
        buf = memoryview(bytearray(min(nbytes, f.size)))
        n = ckpt.readinto(f, 0, buf, ReadState())
        assert n == len(buf)
    return time.perf_counter() - t0


def _read_prefix_single(uri: str, path: str, nbytes: int) -> float:
    """The same through the single-stream baseline (whole chunks: ``nbytes`` is rounded up)."""
    t0 = time.perf_counter()
    read_file_single_stream(uri, path, limit=nbytes)
    return time.perf_counter() - t0


def bench_remote(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    rate = parse_size(args.per_stream_rate)
    chunk = parse_size(args.chunk_size)
    counts = sorted({int(x) for x in args.stripes.split(",")})
    top = max(counts)
    size = max(chunk * top * 2, int(top * rate * args.seconds))
    size = -(-size // (chunk * top)) * chunk * top
    src = work / "src"
    src.mkdir()
    print(f"remote: generating {human(size)}", file=sys.stderr)
    _write_random(src / "model.bin", size)
    docroot = work / "www"
    for n in counts:
        put(src, str(docroot / f"n{n}"), chunk_size=chunk, stripes=n, segment_chunks=1 << 20)
    out: dict[str, Any] = {"per_stream_rate": rate, "chunk_size": chunk, "checkpoint_bytes": size}
    with nginx(docroot, work / "nginx", rate) as (shaped, unshaped):
        objs = [str(p.relative_to(docroot)) for p in (docroot / f"n{top}").rglob("*")
                if p.is_file() and not p.name.endswith((".done", MANIFEST_NAME))]
        link = measure_link(unshaped, docroot, objs, top, min(3.0, args.seconds))
        out["link_bytes_per_s"] = link
        print(f"remote: link (unshaped, {top} streams) {human(link)}/s", file=sys.stderr)

        # Single stream: the baseline reader, same store layout as N=8 (any N would do: one stream).
        base_uri = f"http://127.0.0.1:{shaped}/n{8 if 8 in counts else top}"
        nbytes = int(rate * args.seconds)
        runs = []
        for _ in range(args.repeats):
            dt = _read_prefix_single(base_uri, "model.bin", nbytes)
            got = -(-nbytes // chunk) * chunk
            runs.append(got / dt)
        out["single_stream"] = {"bytes": -(-nbytes // chunk) * chunk, "runs_bytes_per_s": runs,
                                "median_bytes_per_s": _median(runs),
                                "median_seconds": (-(-nbytes // chunk) * chunk) / _median(runs),
                                "bound_bytes_per_s": min(rate, link)}
        print(f"remote: single stream {human(_median(runs))}/s", file=sys.stderr)
        out["striped"] = {}
        for n in counts:
            bound = min(n * rate, link)
            nbytes = min(size, max(chunk * n * 2, int(bound * args.seconds)))
            nbytes = -(-nbytes // (chunk * n)) * chunk * n
            uri = f"http://127.0.0.1:{shaped}/n{n}"
            runs = []
            for _ in range(args.repeats):
                dt = _read_prefix_striped(uri, "model.bin", nbytes, n)
                runs.append(nbytes / dt)
            med = _median(runs)
            out["striped"][str(n)] = {"bytes": nbytes, "runs_bytes_per_s": runs, "median_bytes_per_s": med,
                                      "median_seconds": nbytes / med, "bound_bytes_per_s": bound,
                                      "ratio_to_bound": med / bound}
            print(f"remote: striped N={n}: {human(med)}/s = {med / bound:.2f} of bound {human(bound)}/s",
                  file=sys.stderr)
    return out


# -- local: FUSE vs raw ---------------------------------------------------------------------------------
def _timed_read(path: Path, prefault_gib: float) -> float:
    _drop_caches()
    _prefault(prefault_gib)
    buf = memoryview(bytearray(8 << 20))
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    dt = time.perf_counter() - t0
    if n != path.stat().st_size:
        raise RuntimeError(f"short read of {path}: {n}")
    return dt


def bench_local(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Raw read of the original file vs the same file through a fresh mount of its striped store.

    The virtual disk's speed drifts by ±30 % from minute to minute on a shared host, so runs are taken
    in pairs, in alternating order (raw-FUSE, FUSE-raw, …), and the reported ratio is the median of the
    per-pair ratios; the rates are medians too.
    """
    size = parse_size(args.local_size)
    src = work / "local-src"
    src.mkdir()
    print(f"local: generating {human(size)}", file=sys.stderr)
    _write_random(src / "model.bin", size)
    store = work / "local-store"
    put(src, str(store), stripes=8)
    dropped = _drop_caches()
    _timed_read(src / "model.bin", 0)  # settle write-back; not counted
    raw: list[float] = []
    fuse: list[float] = []

    def one_raw() -> None:
        raw.append(size / _timed_read(src / "model.bin", args.prefault_gib))

    def one_fuse() -> None:
        with mounted(str(store), work / "mnt", ["--no-cache"]):
            fuse.append(size / _timed_read(work / "mnt" / "model.bin", args.prefault_gib))

    for i in range(args.repeats):
        for step in ((one_raw, one_fuse) if i % 2 == 0 else (one_fuse, one_raw)):
            step()
    pair_ratios = [f / r for f, r in zip(fuse, raw, strict=True)]
    out = {"bytes": size, "page_cache_dropped": dropped, "prefault_gib": args.prefault_gib,
           "raw_runs_bytes_per_s": raw, "fuse_runs_bytes_per_s": fuse, "pair_ratios": pair_ratios,
           "raw_median_bytes_per_s": _median(raw), "fuse_median_bytes_per_s": _median(fuse),
           "raw_median_seconds": size / _median(raw), "fuse_median_seconds": size / _median(fuse),
           "median_pair_ratio": _median(pair_ratios)}
    print(f"local: raw {human(_median(raw))}/s, FUSE {human(_median(fuse))}/s, "
          f"median pair ratio {_median(pair_ratios):.2f}", file=sys.stderr)
    return out


# -- chart ----------------------------------------------------------------------------------------------
def write_svg(result: dict[str, Any], path: Path) -> None:
    """A plain SVG bar chart (no plotting library): measured rate and bound per configuration."""
    bars: list[tuple[str, float, float]] = []
    rem = result.get("remote")
    if rem:
        s = rem["single_stream"]
        bars.append(("single", s["median_bytes_per_s"], s["bound_bytes_per_s"]))
        for n, r in rem["striped"].items():
            bars.append((f"N={n}", r["median_bytes_per_s"], r["bound_bytes_per_s"]))
    loc = result.get("local")
    if loc:
        bars.append(("local raw", loc["raw_median_bytes_per_s"], loc["raw_median_bytes_per_s"]))
        bars.append(("local FUSE", loc["fuse_median_bytes_per_s"], loc["raw_median_bytes_per_s"]))
    if not bars:
        return
    w, h, left, bottom, top = 760, 360, 70, 50, 40
    peak = max(max(b[1], b[2]) for b in bars) / 1e6 * 1.1
    bw = (w - left - 20) / len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="22" font-size="14">ckptfs load rate (MB/s, medians); outline = bound '
             f'(min(N × per-stream, link), or raw local read)</text>']
    plot_h = h - bottom - top
    for i in range(6):
        v = peak * i / 5
        y = h - bottom - plot_h * i / 5
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - 20}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for i, (label, val, bound) in enumerate(bars):
        x = left + i * bw + bw * 0.15
        bh = plot_h * (val / 1e6) / peak
        bb = plot_h * (bound / 1e6) / peak
        color = "#d9822b" if label.startswith("single") or label == "local raw" else "#2b7bd9"
        parts.append(f'<rect x="{x:.1f}" y="{h - bottom - bh:.1f}" width="{bw * 0.7:.1f}" height="{bh:.1f}" '
                     f'fill="{color}"/>')
        parts.append(f'<rect x="{x:.1f}" y="{h - bottom - bb:.1f}" width="{bw * 0.7:.1f}" height="{bb:.1f}" '
                     f'fill="none" stroke="black" stroke-dasharray="4 2"/>')
        parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{h - bottom + 16}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{h - bottom - bh - 4:.1f}" text-anchor="middle">'
                     f'{val / 1e6:.0f}</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


# -- main -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench ckpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", dest="json_path", help="Write the results as JSON to this file.")
    p.add_argument("--chart", help="Write an SVG bar chart to this file.")
    p.add_argument("--per-stream-rate", default="16MiB", help="nginx limit_rate per connection (bytes/s).")
    p.add_argument("--chunk-size", default="4MiB", help="Chunk size of the remote checkpoints.")
    p.add_argument("--stripes", default="1,4,8,16", help="Stripe counts to measure.")
    p.add_argument("--seconds", type=float, default=4.0, help="Target duration of each remote read.")
    p.add_argument("--local-size", default="2GiB", help="Size of the local FUSE-vs-raw file.")
    p.add_argument("--prefault-gib", type=float, default=4.0,
                   help="Memory touched before each local read (VM free-page-reporting, see docs).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per configuration (local: pairs).")
    p.add_argument("--skip-remote", action="store_true")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument("--workdir", help="Scratch parent directory (default /tmp); removed afterwards.")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or "/tmp") / f"bs-ckptbench-{secrets.token_hex(3)}"
    work.mkdir(parents=True)
    try:
        result: dict[str, Any] = {"benchmark": "ckpt", "config": {k: v for k, v in vars(args).items()}}
        ratios: dict[str, float] = {}
        if not args.skip_remote:
            rem = bench_remote(work, args)
            result["remote"] = rem
            single = rem["single_stream"]["median_bytes_per_s"]
            for n, r in rem["striped"].items():
                ratios[f"striped_vs_bound_n{n}"] = r["ratio_to_bound"]
            if "8" in rem["striped"]:
                ratios["striped_vs_single"] = rem["striped"]["8"]["median_bytes_per_s"] / single
            ratios["single_vs_bound"] = single / rem["single_stream"]["bound_bytes_per_s"]
        if not args.skip_local:
            loc = bench_local(work, args)
            result["local"] = loc
            ratios["fuse_vs_raw_local"] = loc["median_pair_ratio"]
        result["ratios"] = ratios
        result["goals"] = {
            "striped_vs_bound_n8": {"goal": GOAL_BOUND, "met": ratios.get("striped_vs_bound_n8", 0) >= GOAL_BOUND},
            "fuse_vs_raw_local": {"goal": GOAL_FUSE, "met": ratios.get("fuse_vs_raw_local", 0) >= GOAL_FUSE},
        }
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    if args.chart:
        write_svg(result, Path(args.chart))
    print(json.dumps(result["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
