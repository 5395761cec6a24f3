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

Local part: a checkpoint of safetensors files on local disk and its 8-stripe local store, read by
every mode in turn, page cache dropped before each read: the original files with N threads of
``pread`` (raw parallel: the disk's bound) and one stream per file (raw sequential); the store through
``Checkpoint.read_file`` (api), through a fresh FUSE mount with N threads of ``pread`` (fuse_parallel)
and one stream (fuse_sequential); with a GPU, ``ckptfs.load_safetensors(device="cuda")`` (gpu_load) and
``safetensors.torch.load_file(device="cuda")`` on the originals for reference.  Before each timed read
the benchmark touches and frees some anonymous memory: on a Firecracker guest with free-page reporting,
the first CPU write to memory the host has taken back costs a host fault per page, which taxes a FUSE
read (the kernel copies every page it fills) far more than a disk read (filled by DMA) and would make
the result depend on what the machine did seconds before.  Bare-metal GPU nodes have no such tax.
Each ratio is taken per repeat (modes rotate their order from one repeat to the next) and reported as
median [min-max]; a goal is "inconclusive" when that spread straddles it.

Results are medians over ``--repeats`` (remote) / ``--local-repeats`` runs.  JSON: ``ratios`` holds
``striped_vs_bound_n8``, ``striped_vs_single``, ``api_vs_raw_parallel_local``, ``fuse_vs_raw_parallel_local``,
``fuse_vs_raw_local``, ``gpu_load_vs_raw_parallel`` (medians); ``goals`` their goal and status.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bootseer.testkit import drop_caches, free_port, wait_until
from ckptfs.baseline import read_file_single_stream
from ckptfs.manifest import MANIFEST_NAME
from ckptfs.put import put
from ckptfs.reader import Checkpoint, ReaderOptions, ReadState
from ckptfs.sizes import human, parse_size
from ckptfs.testing import mounted

GOAL_BOUND = 0.8
GOAL_FUSE = 0.7
GOAL_API_PAR = 0.9  # Checkpoint.read_file vs N threads of pread on the original files
GOAL_FUSE_PAR = 0.8  # N threads of pread on the mount vs the same on the original files
GOAL_GPU = 0.8  # load_safetensors into GPU memory vs the raw parallel read


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


_drop_caches = drop_caches  # (the GPU script calls it by this name)


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


# -- local: API, FUSE and GPU loads vs raw reads ----------------------------------------------------------
TENSOR_BYTES = 64 << 20


def write_safetensors_files(dst: Path, total: int, files: int, seed: int = 1234) -> list[Path]:
    """``files`` safetensors files of ``total`` bytes in all, written without torch: a JSON header of
    BF16 tensors (64 MiB each, the last one shorter) over incompressible bytes.  Every 64 MiB block is
    distinct (a counter in its first bytes), so no two chunks share a digest and nothing is deduplicated.
    """
    import random

    dst.mkdir(parents=True, exist_ok=True)
    block = bytearray(random.Random(seed).randbytes(TENSOR_BYTES))
    per_file = max(2, total // files // 2 * 2)
    out: list[Path] = []
    counter = 0
    for fi in range(files):
        sizes = [TENSOR_BYTES] * (per_file // TENSOR_BYTES)
        if per_file % TENSOR_BYTES:
            sizes.append(per_file % TENSOR_BYTES)
        header: dict[str, Any] = {}
        off = 0
        for ti, n in enumerate(sizes):
            header[f"layers.{ti}.weight"] = {"dtype": "BF16", "shape": [n // 2], "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # safetensors pads the header so tensor data is aligned
        path = dst / f"model-{fi + 1:05d}-of-{files:05d}.safetensors"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for n in sizes:
                counter += 1
                block[:8] = counter.to_bytes(8, "little")
                f.write(memoryview(block)[:n])
        out.append(path)
    return out


def raw_parallel_read(paths: list[Path], threads: int, piece: int = 8 << 20) -> int:
    """Read ``paths`` with ``threads`` threads of ``pread`` (8 MiB pieces, round-robin): the disk's
    bound for a reader that does nothing with the bytes.  Returns the bytes read."""
    work = [(p, off, min(piece, p.stat().st_size - off)) for p in paths for off in range(0, p.stat().st_size, piece)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    total = [0] * threads

    def worker(t: int) -> None:
        buf = memoryview(bytearray(piece))
        for p, off, n in work[t::threads]:
            got = os.preadv(fds[p], [buf[:n]], off)
            if got != n:
                raise RuntimeError(f"short read of {p} at {off}")
            total[t] += got

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(total)


def sequential_read(paths: list[Path]) -> int:
    """One stream per file, file after file (8 MiB ``readinto`` loop): what a plain ``cp`` does."""
    buf = memoryview(bytearray(8 << 20))
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n


def api_read(store: str, names: list[str], threads: int) -> int:
    """``Checkpoint.read_file`` of every file, one after the other (open and close included)."""
    n = 0
    with Checkpoint(store, reader_options=ReaderOptions(threads=threads)) as ckpt:
        for name in names:
            n += len(ckpt.read_file(name))
    return n


def gpu_load(store: str, names: list[str], threads: int, device: str) -> int:
    """``ckptfs.load_safetensors`` of every file into ``device`` memory, synchronised.  Returns the
    files' sizes (the rate's basis, as for the raw reads) once the tensors' bytes add up."""
    import torch

    from ckptfs.loader import load_safetensors, read_header

    n = 0
    with Checkpoint(store, reader_options=ReaderOptions(threads=threads)) as ckpt:
        for name in names:
            tensors = load_safetensors(ckpt, name, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            f, start, _, _ = read_header(ckpt, name)
            if sum(t.numel() * t.element_size() for t in tensors.values()) == f.size - start:
                n += f.size
            del tensors
    return n


def safetensors_load(paths: list[Path], device: str) -> int:
    """``safetensors.torch.load_file(device=...)`` on the original files (a reference, no goal)."""
    import torch
    from safetensors.torch import load_file

    n = 0
    for p in paths:
        tensors = load_file(str(p), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if tensors:
            n += p.stat().st_size
        del tensors
    return n


def spread(xs: list[float]) -> dict[str, Any]:
    return {"runs": xs, "median": _median(xs), "min": min(xs) if xs else float("nan"),
            "max": max(xs) if xs else float("nan")}


def goal_status(ratio_runs: list[float], goal: float) -> str:
    """met when even the worst run reaches the goal, missed when even the best one does not, else
    inconclusive (the runs' spread straddles the goal: the noise is larger than the distance)."""
    if not ratio_runs:
        return "not measured"
    if min(ratio_runs) >= goal:
        return "met"
    if max(ratio_runs) < goal:
        return "missed"
    return "inconclusive"


def _fmt_rate(sp: dict[str, Any]) -> str:
    return f"{sp['median'] / 1e9:.2f} GB/s [{sp['min'] / 1e9:.2f}-{sp['max'] / 1e9:.2f}]"


def _fmt_ratio(sp: dict[str, Any]) -> str:
    return f"{sp['median']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}]"


# ratio name -> (mode, reference mode, goal or None)
LOCAL_RATIOS: dict[str, tuple[str, str, float | None]] = {
    "api_vs_raw_parallel_local": ("api", "raw_parallel", GOAL_API_PAR),
    "fuse_vs_raw_parallel_local": ("fuse_parallel", "raw_parallel", GOAL_FUSE_PAR),
    "gpu_load_vs_raw_parallel": ("gpu_load", "raw_parallel", GOAL_GPU),
    "fuse_vs_raw_local": ("fuse_sequential", "raw_sequential", GOAL_FUSE),
    "cpu_load_vs_raw_parallel": ("cpu_load", "raw_parallel", None),
    "safetensors_cuda_vs_raw_parallel": ("safetensors_cuda", "raw_parallel", None),
    "raw_sequential_vs_raw_parallel": ("raw_sequential", "raw_parallel", None),
}


def run_local_modes(
    modes: dict[str, Callable[[], int | tuple[int, float]]], repeats: int, prefault_gib: float, expect: int,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), deadline: float | None = None,
) -> dict[str, Any]:
    """Run every mode ``repeats`` times, page cache dropped (and memory pre-faulted) before each read,
    in a rotated order per repeat so a slow spell of the disk does not always hit the same mode.
    A mode returns the bytes it read, timed here, or (bytes, seconds) when it times itself (to leave
    out a set-up such as mounting).  A mode that fails is reported and dropped, the others go on."""
    runs: dict[str, list[float | None]] = {m: [] for m in modes}
    errors: dict[str, str] = {}
    names = list(modes)
    dropped = True
    done = 0
    for r in range(repeats):
        started = time.monotonic()
        order = names[r % len(names):] + names[: r % len(names)]
        for m in order:
            if m in errors:
                runs[m].append(None)
                continue
            dropped = _drop_caches() and dropped
            _prefault(prefault_gib)
            t0 = time.perf_counter()
            try:
                got = modes[m]()
            except Exception as e:  # one broken mode must not cost the others' figures
                errors[m] = f"{type(e).__name__}: {e}"
                runs[m].append(None)
                log(f"local: {m} failed: {errors[m]}")
                continue
            n, dt = got if isinstance(got, tuple) else (got, time.perf_counter() - t0)
            if n != expect:
                errors[m] = f"read {n} bytes, expected {expect}"
                runs[m].append(None)
                log(f"local: {m}: {errors[m]}")
                continue
            runs[m].append(n / dt)
            log(f"local: repeat {r + 1}/{repeats} {m}: {n / dt / 1e9:.2f} GB/s")
        done = r + 1
        if deadline is not None and done < repeats and time.monotonic() + (time.monotonic() - started) > deadline:
            log(f"local: stopping after {done} of {repeats} repeats: the next would overrun the time budget")
            break
    out: dict[str, Any] = {"page_cache_dropped": dropped, "modes": {}, "ratios": {}, "errors": errors,
                           "repeats_done": done}
    for m, xs in runs.items():
        vals = [x for x in xs if x is not None]
        if vals:
            out["modes"][m] = spread(vals)
    for name, (m, ref, goal) in LOCAL_RATIOS.items():
        if m not in out["modes"] or ref not in out["modes"]:
            continue
        paired = [a / b for a, b in zip(runs[m], runs[ref], strict=True) if a is not None and b is not None]
        sp = spread(paired)
        if goal is not None:
            sp["goal"] = goal
            sp["status"] = goal_status(paired, goal)
        out["ratios"][name] = sp
    return out


def print_local_summary(res: dict[str, Any], file: Any = sys.stderr) -> None:
    for m, sp in res["modes"].items():
        print(f"  {m:<18} {_fmt_rate(sp)}", file=file)
    for name, sp in res["ratios"].items():
        goal = f"  goal >= {sp['goal']}: {sp['status']}" if "goal" in sp else ""
        print(f"  {name:<34} {_fmt_ratio(sp)}{goal}", file=file)
    for m, e in res.get("errors", {}).items():
        print(f"  {m}: not measured ({e})", file=file)


def bench_local(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Raw reads of the original files vs the API, the FUSE mount and (with a GPU) device loads of the
    same files from their striped local store; see :func:`run_local_modes`."""
    size = parse_size(args.local_size)
    src = work / "local-src"
    print(f"local: generating {human(size)} in {args.local_files} safetensors files", file=sys.stderr)
    paths = write_safetensors_files(src, size, args.local_files)
    total = sum(p.stat().st_size for p in paths)
    store = work / "local-store"
    put(src, str(store), stripes=8)
    names = [p.name for p in paths]
    threads = args.threads
    mnt = work / "mnt"
    _drop_caches()
    sequential_read(paths)  # settle write-back; not counted

    def fuse(parallel: bool) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            # Timed from the first read to the last byte: the mount's start-up (a Python process
            # importing pyarrow and trio) is not part of reading through it.
            with mounted(str(store), mnt, ["--no-cache", "--threads", str(threads)]):
                files = [mnt / n for n in names]
                _drop_caches()
                t0 = time.perf_counter()
                n = raw_parallel_read(files, threads) if parallel else sequential_read(files)
                return n, time.perf_counter() - t0
        return run

    modes: dict[str, Callable[[], int | tuple[int, float]]] = {
        "raw_parallel": lambda: raw_parallel_read(paths, threads),
        "api": lambda: api_read(str(store), names, threads),
        "raw_sequential": lambda: sequential_read(paths),
    }
    if not args.skip_fuse:
        modes["fuse_parallel"] = fuse(True)
        modes["fuse_sequential"] = fuse(False)
    devices = _torch_devices()
    if "cuda" in devices:
        modes["gpu_load"] = lambda: gpu_load(str(store), names, threads, "cuda")
        modes["safetensors_cuda"] = lambda: safetensors_load(paths, "cuda")
    elif "cpu" in devices and args.cpu_load:
        modes["cpu_load"] = lambda: gpu_load(str(store), names, threads, "cpu")
    res = run_local_modes(modes, args.local_repeats, args.prefault_gib, total)
    res.update({"bytes": total, "files": len(paths), "threads": threads, "prefault_gib": args.prefault_gib,
                "chunk_size": 64 << 20, "stripes": 8, "repeats": args.local_repeats})
    print_local_summary(res)
    return res


def _torch_devices() -> list[str]:
    try:
        import safetensors.torch  # noqa: F401
        import torch
    except Exception:  # no torch here: the GPU figures are skipped, and said so
        return []
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


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
        ref = loc["modes"].get("raw_parallel", {}).get("median", 0.0)
        for m, label in (("raw_parallel", "raw par"), ("api", "API"), ("fuse_parallel", "FUSE par"),
                         ("raw_sequential", "raw seq"), ("fuse_sequential", "FUSE seq"), ("gpu_load", "GPU"),
                         ("cpu_load", "CPU load")):
            if m in loc["modes"]:
                bars.append((label, loc["modes"][m]["median"], ref))
    if not bars:
        return
    w, h, left, bottom, top = 760, 360, 70, 50, 40
    peak = max(max(b[1], b[2]) for b in bars) / 1e6 * 1.1
    bw = (w - left - 20) / len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="22" font-size="14">ckptfs load rate (MB/s, medians); outline = bound '
             f'(min(N × per-stream, link), or the raw parallel local read)</text>']
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
        color = "#d9822b" if label.startswith(("single", "raw")) else "#2b7bd9"
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
    p.add_argument("--local-size", default="2GiB", help="Size of the local checkpoint (all files).")
    p.add_argument("--local-files", type=int, default=2, help="Safetensors files the local checkpoint has.")
    p.add_argument("--threads", type=int, default=16, help="Threads of the raw parallel read and of ckptfs.")
    p.add_argument("--skip-fuse", action="store_true", help="No FUSE figures (no pyfuse3 or /dev/fuse).")
    p.add_argument("--cpu-load", action="store_true",
                   help="Without a GPU, also time load_safetensors(device='cpu') (the loader's CI path).")
    p.add_argument("--prefault-gib", type=float, default=4.0,
                   help="Memory touched before each local read (VM free-page-reporting, see docs).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per remote configuration.")
    p.add_argument("--local-repeats", type=int, default=5, help="Runs of each local mode (medians, min-max).")
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
        goals: dict[str, Any] = {}
        if "striped_vs_bound_n8" in ratios:
            goals["striped_vs_bound_n8"] = {"goal": GOAL_BOUND, "met": ratios["striped_vs_bound_n8"] >= GOAL_BOUND}
        if not args.skip_local:
            loc = bench_local(work, args)
            result["local"] = loc
            for name, sp in loc["ratios"].items():
                ratios[name] = sp["median"]
                if "goal" in sp:
                    goals[name] = {"goal": sp["goal"], "status": sp["status"], "median": sp["median"],
                                   "min": sp["min"], "max": sp["max"]}
        result["ratios"] = ratios
        result["goals"] = goals
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
    if "local" in result:
        print("local (median [min-max] over runs; ratios paired per run):")
        print_local_summary(result["local"], file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
