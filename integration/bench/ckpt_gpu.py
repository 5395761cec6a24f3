"""ckptfs figures on a GPU node in one run of at most ~5 minutes (issue 21).

    OUT=/some/dir python3 integration/bench/ckpt_gpu.py          # from the repository root, as root

Writes ``$OUT/ckpt_gpu.json`` and prints a compact summary last.  Made for a node whose Python stack is
not known in advance and that may have no network: it first prints what it finds (``python3
--version``, ``nvidia-smi``, which of torch / safetensors / pyarrow / numpy / pyfuse3 import), installs
a missing package from PyPI only if PyPI answers within 3 s, and otherwise measures what it can and
says what it skipped.  Steps:

1. a safetensors checkpoint (BF16 tensors over incompressible bytes, written without torch) on local
   disk, ``CKPT_GPU_SIZE`` (8GiB) in ``CKPT_GPU_FILES`` (4) files, stored with ``ckptfs.put`` into a
   ``file://`` store (8 stripes, 64 MiB chunks);
2. ``CKPT_GPU_REPEATS`` (5) rounds, page cache dropped before every read, modes rotating: raw parallel
   (``CKPT_GPU_THREADS`` (16) threads of ``pread`` on the originals), ``Checkpoint.read_file``,
   ``ckptfs.load_safetensors(device="cuda")`` (``cpu`` without a GPU), ``safetensors.torch.load_file(
   device="cuda")`` on the originals, one stream per file, and the FUSE mount if pyfuse3 and /dev/fuse
   are there;
3. medians with min-max, ratios paired per round, goals: API >= 0.9x raw parallel, FUSE >= 0.8x,
   GPU load >= 0.8x ("inconclusive" when the spread straddles the goal).

Other knobs: ``CKPT_GPU_WORKDIR`` (default: /var/tmp, else /tmp — never tmpfs), ``CKPT_GPU_BUDGET_S``
(270: no new round starts that would end later), ``CKPT_GPU_PREFAULT_GIB`` (2).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a copy of the working tree: the repo's packages are not installed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the mount

T0 = time.monotonic()
PACKAGES = {"torch": "torch", "safetensors": "safetensors", "pyarrow": "pyarrow", "numpy": "numpy",
            "pyfuse3": "pyfuse3", "trio": "trio", "typer": "typer", "rich": "rich"}


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(cmd: list[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({' '.join(cmd)}: {e})"


def importable(mod: str) -> str | None:
    """The module's version if it imports, else None."""
    try:
        m = importlib.import_module(mod)
    except Exception:
        return None
    return str(getattr(m, "__version__", "?"))


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def survey() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sh([sys.executable, "--version"]), "python3": sh(["python3", "--version"]),
                            "platform": platform.platform(), "cpus": os.cpu_count(), "root": os.geteuid() == 0}
    print(f"python3 --version: {info['python3']} (running {sys.executable}: {info['python']})")
    print(f"platform: {info['platform']}, {info['cpus']} CPUs, root: {info['root']}")
    with open("/proc/meminfo") as f:
        info["mem_total"] = f.readline().strip()
    print(info["mem_total"])
    smi = sh(["nvidia-smi"]) if shutil.which("nvidia-smi") else "(no nvidia-smi)"
    print("nvidia-smi:\n" + smi)
    info["nvidia_smi"] = smi
    found = {name: importable(mod) for name, mod in PACKAGES.items()}
    missing = [n for n in ("torch", "safetensors", "pyarrow") if found[n] is None]
    if missing:
        if pypi_reachable():
            say(f"installing {missing} from PyPI")
            print(sh([sys.executable, "-m", "pip", "install", "--quiet", *missing], timeout=180))
            importlib.invalidate_caches()
            found.update({n: importable(PACKAGES[n]) for n in missing})
        else:
            say(f"missing {missing} and PyPI is not reachable: measuring without them")
    for name, ver in found.items():
        print(f"  import {name:<12} {'ok ' + ver if ver else 'MISSING'}")
    info["packages"] = found
    cuda = False
    if found["torch"]:
        import torch

        try:
            cuda = torch.cuda.is_available()
            if cuda:
                info["gpu"] = torch.cuda.get_device_name(0)
                torch.zeros(1, device="cuda")  # CUDA context up front: not part of any timed load
        except Exception as e:  # a broken driver: measure the rest
            print(f"CUDA does not work: {type(e).__name__}: {e}")
            cuda = False
    print(f"torch sees a GPU: {cuda}")
    info["cuda"] = cuda
    return info


def pick_workdir() -> Path:
    """A directory on a disk: tmpfs would make every 'disk' read a memory copy."""
    cands = [os.environ.get("CKPT_GPU_WORKDIR"), "/var/tmp", "/tmp", str(ROOT.parent)]
    for c in cands:
        if not c or not os.path.isdir(c) or not os.access(c, os.W_OK):
            continue
        fstype = sh(["stat", "-f", "-c", "%T", c])
        if fstype not in ("tmpfs", "ramfs") or c == os.environ.get("CKPT_GPU_WORKDIR"):
            return Path(c)
    return Path("/tmp")


def parse_size(text: str) -> int:
    """``8GiB``, ``512MiB``, bytes: enough for this script when ckptfs (and its parser) cannot import."""
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("G", 1 << 30), ("M", 1 << 20)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def raw_only(paths: list[Path], threads: int, repeats: int, cuda: bool) -> dict[str, Any]:
    """Without pyarrow ckptfs cannot run: the disk's bound and safetensors' own load, no ratios."""
    from concurrent.futures import ThreadPoolExecutor

    def drop() -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass

    def par() -> float:
        piece = 8 << 20
        work = [(p, o) for p in paths for o in range(0, p.stat().st_size, piece)]
        fds = {p: os.open(p, os.O_RDONLY) for p in paths}

        def w(t: int) -> None:
            buf = memoryview(bytearray(piece))
            for p, o in work[t::threads]:
                os.preadv(fds[p], [buf], o)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(w, range(threads)))
        for fd in fds.values():
            os.close(fd)
        return time.perf_counter() - t0

    def st_cuda() -> float:
        import torch
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        for p in paths:
            load_file(str(p), device="cuda")
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    total = sum(p.stat().st_size for p in paths)
    runs: dict[str, list[float]] = {"raw_parallel": []}
    if cuda and importable("safetensors"):
        runs["safetensors_cuda"] = []
    for _ in range(repeats):
        for m, fn in (("raw_parallel", par), ("safetensors_cuda", st_cuda)):
            if m in runs:
                drop()
                runs[m].append(total / fn())
                say(f"{m} {runs[m][-1] / 1e9:.2f} GB/s")
    return {"bytes": total, "modes": {m: {"runs": xs, "median": sorted(xs)[len(xs) // 2], "min": min(xs),
                                          "max": max(xs)} for m, xs in runs.items()}}


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    size_text = os.environ.get("CKPT_GPU_SIZE", "8GiB")
    files = int(os.environ.get("CKPT_GPU_FILES", "4"))
    repeats = int(os.environ.get("CKPT_GPU_REPEATS", "5"))
    threads = int(os.environ.get("CKPT_GPU_THREADS", "16"))
    budget = float(os.environ.get("CKPT_GPU_BUDGET_S", "270"))
    prefault = float(os.environ.get("CKPT_GPU_PREFAULT_GIB", "2"))
    info = survey()
    result: dict[str, Any] = {"benchmark": "ckpt_gpu", "node": info, "skipped": {}}
    pk = info["packages"]
    if not info["root"]:
        say("not root: the page cache cannot be dropped, reads after the first are warm (marked in the JSON)")
    if not pk["pyarrow"]:
        result["skipped"]["ckptfs"] = "pyarrow does not import: ckptfs (API, GPU load, FUSE) not measured"
    if not (pk["torch"] and pk["safetensors"]):
        result["skipped"]["loads"] = "torch or safetensors does not import: no tensor loads measured"
    fuse_ok = bool(pk["pyfuse3"] and pk["trio"] and pk["typer"] and pk["rich"] and os.path.exists("/dev/fuse")
                   and info["root"] and shutil.which("fusermount3"))
    if not fuse_ok:
        result["skipped"]["fuse"] = "pyfuse3/trio/typer/rich, /dev/fuse, fusermount3 or root missing: no FUSE figures"
    if not info["cuda"]:
        result["skipped"]["gpu"] = "no CUDA device visible to torch: the loader is timed on CPU instead"

    work = pick_workdir() / f"ckpt-gpu-bench-{os.getpid()}"
    say(f"work dir {work} ({sh(['stat', '-f', '-c', '%T', str(work.parent)])}); "
        f"{sh(['df', '-h', str(work.parent)]).splitlines()[-1]}")
    bench: Any = None
    try:
        if pk["pyarrow"]:
            from ckptfs.put import put
            from integration.bench import ckpt as bench
        else:
            bench = None
        size = parse_size(size_text)
        say(f"writing {size / (1 << 30):.1f} GiB in {files} safetensors files")
        if bench is None:
            # The same layout as integration.bench.ckpt.write_safetensors_files, which needs ckptfs to import.
            work.mkdir(parents=True)
            paths = []
            block = os.urandom(64 << 20)
            for i in range(files):
                p = work / f"model-{i}.safetensors"
                hdr = json.dumps({"w": {"dtype": "U8", "shape": [size // files], "data_offsets": [0, size // files]}})
                raw = hdr.encode() + b" " * (-(8 + len(hdr)) % 8)
                with open(p, "wb") as f:
                    f.write(len(raw).to_bytes(8, "little") + raw)
                    for off in range(0, size // files, len(block)):
                        f.write(block[: min(len(block), size // files - off)])
                paths.append(p)
            result["local"] = raw_only(paths, threads, repeats, info["cuda"])
        else:
            src = work / "src"
            paths = bench.write_safetensors_files(src, size, files)
            os.sync()
            say("ckptfs put (8 stripes, 64 MiB chunks)")
            t = time.perf_counter()
            store = work / "store"
            put(src, f"file://{store}", stripes=8)
            result["put_seconds"] = time.perf_counter() - t
            say(f"put took {result['put_seconds']:.1f} s")
            names = [p.name for p in paths]
            total = sum(p.stat().st_size for p in paths)
            modes: dict[str, Any] = {
                "raw_parallel": lambda: bench.raw_parallel_read(paths, threads),
                "api": lambda: bench.api_read(str(store), names, threads),
            }
            if pk["torch"] and pk["safetensors"]:
                dev = "cuda" if info["cuda"] else "cpu"
                modes["gpu_load" if info["cuda"] else "cpu_load"] = lambda: bench.gpu_load(str(store), names,
                                                                                          threads, dev)
                if info["cuda"]:
                    modes["safetensors_cuda"] = lambda: bench.safetensors_load(paths, "cuda")
            modes["raw_sequential"] = lambda: bench.sequential_read(paths)
            if fuse_ok:
                from ckptfs.testing import mounted

                mnt = work / "mnt"

                def fuse() -> tuple[int, float]:
                    with mounted(str(store), mnt, ["--no-cache", "--threads", str(threads)]):
                        bench._drop_caches()
                        t0 = time.perf_counter()
                        n = bench.raw_parallel_read([mnt / n for n in names], threads)
                        return n, time.perf_counter() - t0

                modes["fuse_parallel"] = fuse
            left = budget - (time.monotonic() - T0)
            say(f"{repeats} rounds of {list(modes)}, page cache dropped before each read; {left:.0f} s of budget left")
            res = bench.run_local_modes(modes, repeats, prefault, total, log=say,
                                        deadline=time.monotonic() + left)
            res.update({"bytes": total, "files": files, "threads": threads, "chunk_size": 64 << 20, "stripes": 8,
                        "prefault_gib": prefault})
            result["local"] = res
    except Exception:  # still write what was measured, and why it stopped
        result["error"] = traceback.format_exc()
        print(result["error"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.setdefault("local", {"modes": {}, "ratios": {}})
    result["seconds"] = time.monotonic() - T0
    path = out_dir / "ckpt_gpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print("\n==== ckptfs on this node: summary ====")
    gpu = info.get("gpu", "no GPU")
    print(f"{info['cpus']} CPUs, {gpu}, {result['local'].get('bytes', 0) / (1 << 30):.1f} GiB in {files} files, "
          f"{threads} threads, rounds done: {result['local'].get('repeats_done', 0)}, "
          f"page cache dropped: {result['local'].get('page_cache_dropped', info['root'])}")
    if "error" in result:
        print(f"  STOPPED EARLY: {result['error'].strip().splitlines()[-1]}")
    if bench is not None and "ratios" in result["local"]:
        bench.print_local_summary(result["local"], file=sys.stdout)
    else:
        for m, sp in result["local"].get("modes", {}).items():
            print(f"  {m:<18} {sp['median'] / 1e9:.2f} GB/s [{sp['min'] / 1e9:.2f}-{sp['max'] / 1e9:.2f}]")
    for what, why in result["skipped"].items():
        print(f"  skipped {what}: {why}")
    print(f"JSON: {path}; total {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
