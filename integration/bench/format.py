"""Lazy-layer format study (issue 20): which blob format moves the fewest bytes for a start-up's hot set and reads
at local-disk speed once a layer is complete — decided by measurement on the realistic image.

``bootseer bench format [--image realistic|realistic-split] [--json FILE] [--md FILE] [--seq-runs N]
[--mkfs-new PATH | --build-mkfs]`` (or ``python -m integration.bench.format``); ``--render FILE.json`` redraws the
Markdown of an earlier run.

Candidates, each built from the same unpacked layers (unpacked once; that time is common to all of them):

* (a) ``lz4hc`` — today's blob: ``mkfs.erofs -zlz4hc,4 -C65536`` (:func:`registry_sidecar.convert.build_erofs`),
  fetched in 128 KiB chunks as stored.
* (b) ``plain`` (no compression) and ``lz4`` (``-zlz4 -C65536``) EROFS on the node, with every chunk compressed on
  its own with zstd for the wire (levels 3 and 19; the daemon would decompress a chunk as it arrives, before it
  verifies and caches it): what nydus does.  The zstd sizes are computed here on the blobs, chunk by chunk;
  the node's format is mounted and read for real.
* (c) EROFS with a stronger codec the kernel reads (``zstd``, ``lzma``, ``deflate``), written by a newer
  erofs-utils than Debian 12's 1.5 (lz4 only): Debian 13's 1.8.6 built from its source package
  (``--build-mkfs``: ``apt-get source`` from a private trixie deb-src list, autotools, ``make``; about half a
  minute here) or any ``--mkfs-new`` binary.
* (d) finer hot ranges: for every format, the bytes the start really read (distinct 4 KiB pages of the blob, as
  the kernel asked for them through the loop device) against whole chunks of 16 KiB … 1 MiB.

The hot set is recorded for every candidate the node can mount: the image is indexed with that candidate's blobs
(a signed index, as the sidecar pushes), and ``bootseer record``'s recorder runs the realistic command once from
cold caches on the local stack, keeping every read that reached FUSE.  Per candidate: the wire bytes of that hot
set (chunks covering the reads, compressed per chunk where the wire codec is zstd), disk per layer on the node
(the blob, all of which the node keeps once the layer is complete; the hot chunks at the start), conversion
time (mkfs, chunk hashing, per-chunk zstd), and the cold sequential read of ``libtorch_cpu.so`` through overlayfs
over the mounted format (loop device on the complete blob — what a swapped layer is — and erofs's file-backed
mount) against overlayfs over the unpacked layer on local disk, page cache dropped before each read.

What this does *not* measure is a start-up through a daemon that decompresses zstd chunks: that needs the
format implemented.  The start-up time a format would give is estimated from its hot-set wire bytes over the
link (a lower bound beside the floor), and the daemon's decompression speed is measured on the hot chunks.

JSON: ``layers`` (digest, compressed and unpacked size, unpack seconds), ``formats`` (per candidate: how it was
built, per layer blob size and conversion seconds, the recorded reads, ``seq_read_mb_s``), ``wire`` (per wire
variant: hot-set bytes, whole-image bytes, conversion seconds, node disk), ``finer`` (hot bytes by chunk size),
``overlay_seq_read_mb_s``, ``decompress_mb_s``, ``notes``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootseer.testkit import drop_caches
from integration.bench.stats import ratio_spread

PAGE = 4096
CHUNK = 128 << 10  # the index's chunk size today
FINER = (16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20)  # chunk sizes of the (d) sweep
WIRE_FINER = (32 << 10, 64 << 10)  # of those, the ones that also get a row of their own among the wire variants
# The smallest chunk a format may choose: the index holds one digest per chunk and a node refuses an index over
# MAX_INDEX_BYTES (about 250k digests), so 64 KiB chunks still index 16 GB of blobs, 16 KiB chunks only 4 GB.
MIN_CHUNK = 64 << 10
ZSTD_LEVELS = (3, 19)
NEW_MKFS = Path("/var/cache/bootseer/erofs-utils-1.8.6/mkfs.erofs")
DEBIAN_SOURCE = "erofs-utils"  # Debian 13 (trixie) has 1.8.6
SEQ_FILE = "usr/local/lib/python3.11/dist-packages/torch/lib/libtorch_cpu.so"
RATES = {"1gbit": 125e6, "200mbit": 25e6}  # link bytes per second


@dataclass(frozen=True)
class Candidate:
    name: str
    study: str  # which of the brief's candidates: a, b, c
    new_mkfs: bool  # needs erofs-utils newer than Debian 12's
    args: tuple[str, ...]  # mkfs.erofs options besides the deterministic ones
    label: str
    kernel: tuple[int, int]  # the first Linux whose erofs reads it (LZMA also needs CONFIG_EROFS_FS_ZIP_LZMA)


CANDIDATES = (
    Candidate("lz4hc", "a", False, ("-zlz4hc,4", "-C65536"), "EROFS LZ4HC level 4, 64 KiB pclusters (today)",
              (5, 13)),  # big pclusters: 5.13
    Candidate("plain", "b", False, (), "EROFS uncompressed", (5, 4)),
    Candidate("lz4", "b", False, ("-zlz4", "-C65536"), "EROFS LZ4, 64 KiB pclusters", (5, 13)),
    Candidate("zstd", "c", True, ("-zzstd,level=3", "-C65536"), "EROFS zstd level 3, 64 KiB pclusters", (6, 10)),
    Candidate("lzma", "c", True, ("-zlzma,level=6", "-C65536"), "EROFS MicroLZMA level 6, 64 KiB pclusters",
              (5, 16)),
    Candidate("deflate", "c", True, ("-zlibdeflate,level=6", "-C65536"), "EROFS deflate (libdeflate) level 6, "
              "64 KiB pclusters", (6, 6)),
)
NODE_KERNEL = (6, 1)  # Debian 12's: the nodes BootSeer supports (README) must mount the format
# node format → the per-chunk zstd levels computed for its wire (a compressed blob gains little from it: one row)
ZSTD_WIRE = {"plain": ZSTD_LEVELS, "lz4": ZSTD_LEVELS, "lz4hc": (3,)}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- pure parts
def pages_read(accesses: Iterable[tuple[int, int]], size: int) -> set[int]:
    """Distinct 4 KiB pages of a blob of ``size`` bytes that ``(offset, length)`` reads touched."""
    pages: set[int] = set()
    for off, length in accesses:
        end = min(size, off + length)
        if 0 <= off < end:
            pages.update(range(off // PAGE, (end - 1) // PAGE + 1))
    return pages


def first_chunks(accesses: Iterable[tuple[int, int]], size: int, chunk_size: int = CHUNK) -> list[int]:
    """Chunks of a blob in the order the reads first touched them: the order prefetch writes them on a node."""
    seen: dict[int, None] = {}
    for off, length in accesses:
        end = min(size, off + length)
        if 0 <= off < end:
            for c in range(off // chunk_size, (end - 1) // chunk_size + 1):
                seen.setdefault(c, None)
    return list(seen)


def chunks_of(pages: Iterable[int], chunk_size: int) -> set[int]:
    """Chunks of ``chunk_size`` (a multiple of 4 KiB) holding any of ``pages``."""
    per = chunk_size // PAGE
    return {p // per for p in pages}


def chunk_bytes(chunks: Iterable[int], chunk_size: int, size: int) -> int:
    """Bytes of those chunks of a blob of ``size`` (the last one may be short)."""
    return sum(max(0, min(size, (c + 1) * chunk_size) - c * chunk_size) for c in chunks)


def transfer_seconds(nbytes: int, rate: str) -> float:
    return nbytes / RATES[rate]


# -------------------------------------------------------------------------------------- building
def mkfs_argv(mkfs: str, cand: Candidate, layer_digest: str, out: Path, root: Path) -> list[str]:
    from registry_sidecar.convert import erofs_uuid

    return [mkfs, "--quiet", *cand.args, f"-U{erofs_uuid(layer_digest)}", str(out), str(root)]


def build_blob(cand: Candidate, mkfs: str, root: Path, out: Path, layer_digest: str, epoch: int) -> float:
    """Build one candidate's blob as the converter would (deterministic options); return mkfs seconds."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(max(epoch, 0)), LC_ALL="C")
    t = time.monotonic()
    proc = subprocess.run(mkfs_argv(mkfs, cand, layer_digest, out, root), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cand.name}: mkfs.erofs failed: {proc.stderr.strip()[-500:]}")
    return time.monotonic() - t


def build_new_mkfs(dest: Path = NEW_MKFS, log: Callable[[str], None] = _log) -> tuple[Path, float]:
    """Debian 13's erofs-utils built from its source package (the binary, seconds it took): ``apt-get source``
    from a private trixie deb-src list (the machine's own sources are not touched), then autotools and
    ``make``.  Needs network, a compiler, autoconf/automake/libtool and liblz4/liblzma/libzstd/libdeflate
    headers (``apt-get install liblz4-dev liblzma-dev libzstd-dev libdeflate-dev autoconf automake libtool``)."""
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bs-erofs-utils-"))
    try:
        lists = work / "lists"
        (lists / "partial").mkdir(parents=True)
        (work / "sources.list").write_text("deb-src http://deb.debian.org/debian trixie main\n")
        apt = ["-o", f"Dir::Etc::SourceList={work / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={lists}"]
        log("erofs-utils: apt-get source from Debian 13 (private source list) ...")
        subprocess.run(["apt-get", *apt, "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", *apt, "source", "--download-only", DEBIAN_SOURCE], check=True, cwd=work,
                       capture_output=True, timeout=300)
        orig = next(work.glob(f"{DEBIAN_SOURCE}_*.orig.tar.*"))
        subprocess.run(["tar", "-xf", str(orig)], check=True, cwd=work)
        src = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith(DEBIAN_SOURCE + "-"))
        log(f"erofs-utils: building {src.name} ...")
        for cmd in (["./autogen.sh"], ["./configure", "--enable-lz4", "--enable-lzma", "--with-libzstd",
                                       "--with-libdeflate", "--disable-fuse", "--disable-multithreading"],
                    ["make", f"-j{os.cpu_count() or 1}"]):
            proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"erofs-utils: {' '.join(cmd)} failed: {proc.stderr.strip()[-1500:]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "mkfs" / "mkfs.erofs", dest)
        return dest, time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mkfs_version(mkfs: str) -> str:
    proc = subprocess.run([mkfs, "-V"], capture_output=True, text=True)
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return first[0] if first and "erofs-utils" in first[0] else "erofs-utils 1.5 (Debian 12)"


# ------------------------------------------------------------------------------------ per-chunk zstd
_local = threading.local()


def _compressor(level: int) -> Any:
    import zstandard

    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def zstd_chunk_sizes(blob: Path, chunk_size: int, level: int, threads: int) -> tuple[list[int], float]:
    """Every chunk of ``blob`` compressed on its own: (compressed size per chunk, seconds)."""
    data = blob.read_bytes()
    view = memoryview(data)
    offsets = range(0, len(data), chunk_size)

    def one(off: int) -> int:
        return len(_compressor(level).compress(view[off:off + chunk_size]))

    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sizes = list(pool.map(one, offsets, chunksize=64))
    return sizes, time.monotonic() - t


def decompress_rate(blob: Path, chunks: Sequence[int], chunk_size: int, level: int) -> float:
    """MB/s (of output) one thread decompresses ``chunks`` of ``blob`` compressed with zstd at ``level``: the
    daemon's added work per fetched chunk."""
    import zstandard

    data = blob.read_bytes()
    frames = [_compressor(level).compress(data[c * chunk_size:(c + 1) * chunk_size]) for c in chunks]
    d = zstandard.ZstdDecompressor()
    out = 0
    t = time.monotonic()
    for f in frames:
        out += len(d.decompress(f, max_output_size=chunk_size))
    return out / max(1e-9, time.monotonic() - t) / 1e6


# ---------------------------------------------------------------------------------------- seq read
def write_as_cache(blob: Path, dest: Path, first: Sequence[int], *, sync_every: int = 16 << 20) -> None:
    """Copy ``blob`` to ``dest`` the way a node's chunk cache comes to hold it: a sparse file of the blob's size,
    the start's chunks written first in the order it read them (prefetch), then the rest in ascending order
    (background fill), made durable batch by batch (the cache's flusher syncs every second) — so the file's
    blocks land on disk in that order, not in the file's: what a swapped layer's loop device reads."""
    size = blob.stat().st_size
    n = (size + CHUNK - 1) // CHUNK
    head = list(dict.fromkeys(c for c in first if 0 <= c < n))
    rest = sorted(set(range(n)) - set(head))
    src = os.open(blob, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(dst, size)
        pending = 0
        for c in head + rest:
            data = os.pread(src, CHUNK, c * CHUNK)
            os.pwrite(dst, data, c * CHUNK)
            pending += len(data)
            if pending >= sync_every:
                os.fdatasync(dst)
                pending = 0
        os.fdatasync(dst)
    finally:
        os.close(src)
        os.close(dst)



def read_file(path: Path) -> float:
    """MB/s of one sequential read of ``path`` in 1 MiB reads (as the start-up benchmark's container does)."""
    fd = os.open(path, os.O_RDONLY)
    n = 0
    t = time.monotonic()
    try:
        while b := os.read(fd, 1 << 20):
            n += len(b)
    finally:
        os.close(fd)
    return n / max(1e-9, time.monotonic() - t) / 1e6


@contextlib.contextmanager
def mounted_erofs(blob: Path, target: Path, how: str) -> Any:
    """``blob`` mounted read-only at ``target``: through a loop device (what a swapped lazy layer is: the loop
    device on the complete cache file, buffered) or erofs's own file-backed mount."""
    from snapshotter.lazy import loop
    from snapshotter.lazy.mount import MS_RDONLY, mount, umount

    target.mkdir(parents=True, exist_ok=True)
    dev = None
    if how == "loop":
        fd = os.open(blob, os.O_RDONLY)
        try:
            dev = loop.attach(fd, read_only=True, autoclear=True, name=f"bench-format-{blob.name}")
        finally:
            os.close(fd)
        mount(dev.path, target, "erofs", MS_RDONLY)
        dev.close()  # autoclear: the mount holds it now
    else:
        mount(str(blob), target, "erofs", MS_RDONLY)
    try:
        yield target
    finally:
        umount(target)


@contextlib.contextmanager
def overlay(lower: Path, target: Path, empty: Path) -> Any:
    """A read-only overlay of ``lower`` (plus an empty layer: overlayfs wants two lowers without an upper)."""
    from snapshotter.lazy.mount import MS_RDONLY, mount, umount

    target.mkdir(parents=True, exist_ok=True)
    empty.mkdir(parents=True, exist_ok=True)
    mount("overlay", target, "overlay", MS_RDONLY, f"lowerdir={lower}:{empty}")
    try:
        yield target
    finally:
        umount(target)


def seq_read(how: str, lower_or_blob: Path, scratch: Path) -> float:
    """Cold (page cache dropped) sequential read of the seq file through overlayfs over ``how``: ``dir`` (the
    unpacked layer on local disk), ``loop`` or ``file`` (the blob mounted)."""
    mnt, ovl, empty = scratch / "mnt", scratch / "ovl", scratch / "empty"
    if how == "dir":
        with overlay(lower_or_blob, ovl, empty):
            drop_caches()
            return read_file(ovl / SEQ_FILE)
    with mounted_erofs(lower_or_blob, mnt, how), overlay(mnt, ovl, empty):
        drop_caches()
        return read_file(ovl / SEQ_FILE)


# ---------------------------------------------------------------------------------------- the image
@dataclass
class Layer:
    digest: str
    media_type: str
    size: int  # compressed
    diff_id: str
    blob: Path  # the original layer blob (gzip tar)
    root: Path | None = None  # unpacked
    unpacked_bytes: int = 0
    max_mtime: int = 0
    unpack_seconds: float = 0.0


def image_layers(name: str, cache: Path) -> tuple[Path, str, list[Layer]]:
    """(layout, tag, layers) of a built-in image, from its cached OCI layout."""
    from integration import images
    from integration.bench import imagesource

    if name == "realistic":
        img = images.build_realistic(cache)
        layout, tag = img.layout, img.tag
    elif name == "realistic-split":
        layout, tag = imagesource.build_split(cache)
    else:
        raise ValueError(f"--image {name}: choose realistic or realistic-split")

    def blob(digest: str) -> Path:
        return layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    index = json.loads((layout / "index.json").read_text())
    man = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    cfg = json.loads(blob(man["config"]["digest"]).read_bytes())
    return layout, tag, [Layer(d["digest"], d["mediaType"], int(d["size"]), diff, blob(d["digest"]))
                         for d, diff in zip(man["layers"], cfg["rootfs"]["diff_ids"], strict=True)]


def unpack(layer: Layer, dest: Path) -> None:
    """The converter's unpack (overlay whiteouts, every attribute kept) into ``dest``."""
    from registry_sidecar.unpack import Unpacker, open_layer_stream

    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    t = time.monotonic()
    with open(layer.blob, "rb") as fh:
        stats = Unpacker(str(dest), allow_devices=True, compressed_size=layer.size).unpack(
            open_layer_stream(fh, layer.media_type))  # type: ignore[arg-type]
    layer.root, layer.unpacked_bytes, layer.max_mtime = dest, stats.bytes, stats.max_mtime
    layer.unpack_seconds = time.monotonic() - t


# ----------------------------------------------------------------------------- index and recording
def publish(st: Any, layout: Path, tag: str, ref: str, layers: list[Layer],
            blobs: list[Path]) -> list[tuple[str, float]]:
    """Push the image as ``ref`` with ``blobs`` as its lazy layers (a signed index, as the sidecar makes);
    return per layer the blob's digest and the chunk-hashing seconds (part of every format's conversion)."""
    from bootseer.index import EROFS_MEDIA_TYPE, ImageIndex, LayerBlob, hash_chunks, manifest_descriptor, push_index
    from bootseer.reference import Reference
    from bootseer.registry import Descriptor, RegistryClient
    from integration.oci import push

    push(layout, tag, ref)
    client = RegistryClient(plain_http=True)
    r = Reference.parse(ref)
    manifest, _ = client.resolve_image(r)
    index = ImageIndex(manifest.digest)
    out = []
    for desc, layer, path in zip(manifest.layers, layers, blobs, strict=True):
        t = time.monotonic()
        digest, size, chunks = hash_chunks(path, CHUNK)
        out.append((digest, time.monotonic() - t))
        client.push_blob(r, path, digest, chunk_size=32 << 20)
        index.layers[desc.digest] = LayerBlob(desc.digest, desc.media_type, desc.size,
                                              Descriptor(EROFS_MEDIA_TYPE, digest, size), CHUNK, chunks,
                                              layer.diff_id)
    push_index(client, r, index, manifest_descriptor(manifest), st.index_signer())
    return out


def record_reads(bench: Any, ref: str, command: list[str], expect: str) -> dict[str, list[tuple[int, int]]]:
    """One recording of ``ref``'s start from cold caches (everything reset first): blob → ``(offset, length)``
    of every read that reached FUSE, stopped at the expected line as the start-up benchmark's runs are."""
    import re

    from recorder.record import Recorder, RecordOptions

    kept: list[Any] = []

    class Keeping(Recorder):
        """The recorder, keeping the raw reads it builds the (chunk-aligned) manifest from."""

        def _record_once(self, client: Any, blobs: Any) -> Any:
            outcome, accesses, logged = super()._record_once(client, blobs)
            kept[:] = accesses
            return outcome, accesses, logged

    bench.reset()
    st = bench.st
    rec = Keeping(RecordOptions(image=ref, command=command, ready_line=re.escape(expect), push=False,
                                address=st.info.containerd_socket, control=st.info.snapshotter_control,
                                hosts_dir=str(bench.cdir / "certs.d"), plain_http=True, echo=False))
    rec.run()
    out: dict[str, list[tuple[int, int]]] = {}
    for a in kept:
        out.setdefault(a.blob, []).append((a.offset, a.length))
    return out


# ------------------------------------------------------------------------------------------ driver
@dataclass
class Built:
    cand: Candidate
    mkfs: str
    blobs: list[Path]
    mkfs_seconds: list[float]
    sizes: list[int] | None = None
    digests: list[str] | None = None
    hash_seconds: list[float] | None = None
    pages: list[set[int]] | None = None  # per layer: 4 KiB pages the recorded starts read (their union)
    first: list[list[int]] | None = None  # per layer: 128 KiB chunks in the order the first start read them
    recorded_bytes: list[int] | None = None  # per recording: bytes of the pages it read (how much they differ)


def _mb(n: float) -> float:
    return round(n / 1e6, 2)


def wire_rows(built: dict[str, Built], levels: Sequence[int], threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(wire variants, finer sweep) from the recorded pages of every built format (see the module doc)."""
    wire: dict[str, Any] = {}
    finer: dict[str, Any] = {}
    for name, b in built.items():
        if b.pages is None:
            continue
        sizes = b.sizes or [p.stat().st_size for p in b.blobs]
        convert = [m + h for m, h in zip(b.mkfs_seconds, b.hash_seconds or [0.0] * len(sizes), strict=True)]
        hot_chunks = [chunks_of(pg, CHUNK) for pg in b.pages]
        raw_hot = [chunk_bytes(c, CHUNK, sz) for c, sz in zip(hot_chunks, sizes, strict=True)]
        wire[name] = {"node": name, "wire_codec": "none (as stored)", "chunk_size": CHUNK, "hot_bytes": sum(raw_hot),
                      "hot_bytes_per_layer": raw_hot, "whole_bytes": sum(sizes), "node_disk_per_layer": sizes,
                      "node_disk_hot": sum(raw_hot), "convert_seconds": round(sum(convert), 2)}
        finer[name] = {"pages": sum(min(sz, len(pg) * PAGE) for pg, sz in zip(b.pages, sizes, strict=True)),
                       "chunks": {str(cs): sum(chunk_bytes(chunks_of(pg, cs), cs, sz)
                                               for pg, sz in zip(b.pages, sizes, strict=True)) for cs in FINER}}
        for lv in ZSTD_WIRE.get(name, ()):
            if lv not in levels:
                continue
            _log(f"{name}: every 128 KiB chunk through zstd -{lv} ...")
            per = [zstd_chunk_sizes(p, CHUNK, lv, threads) for p in b.blobs]
            hot = [sum(cs[c] for c in hc) for (cs, _), hc in zip(per, hot_chunks, strict=True)]
            wire[f"{name}+zstd{lv}"] = {
                "node": name, "wire_codec": f"zstd -{lv} per 128 KiB chunk", "chunk_size": CHUNK, "hot_bytes": sum(hot),
                "hot_bytes_per_layer": hot, "whole_bytes": sum(sum(cs) for cs, _ in per),
                "node_disk_per_layer": sizes, "node_disk_hot": sum(raw_hot),
                "convert_seconds": round(sum(convert) + sum(secs for _, secs in per), 2),
                "zstd_seconds": round(sum(secs for _, secs in per), 2)}
        if name in ZSTD_WIRE and 3 in levels:  # (b) and (d) together: finer chunks, each compressed
            sweep: dict[str, dict[str, int]] = {}
            for cs in FINER:
                _log(f"{name}: every {cs >> 10} KiB chunk through zstd -3 ...")
                runs = [zstd_chunk_sizes(p, cs, 3, threads) for p in b.blobs]
                frames: list[list[int]] = [f for f, _ in runs]
                hot_cs = [sum(sz[c] for c in chunks_of(pg, cs)) for sz, pg in zip(frames, b.pages, strict=True)]
                sweep[str(cs)] = {"hot_bytes": sum(hot_cs), "whole_bytes": sum(sum(sz) for sz in frames)}
                if cs in WIRE_FINER:
                    wire[f"{name}+zstd3@{cs >> 10}k"] = {
                        "node": name, "wire_codec": f"zstd -3 per {cs >> 10} KiB chunk", "chunk_size": cs,
                        "hot_bytes": sum(hot_cs), "hot_bytes_per_layer": hot_cs,
                        "whole_bytes": sweep[str(cs)]["whole_bytes"], "node_disk_per_layer": sizes,
                        "node_disk_hot": sum(chunk_bytes(chunks_of(pg, cs), cs, sz)
                                             for pg, sz in zip(b.pages, sizes, strict=True)),
                        "convert_seconds": round(sum(convert) + sum(secs for _, secs in runs), 2),
                        "zstd_seconds": round(sum(secs for _, secs in runs), 2)}
            finer[f"{name}+zstd3"] = sweep
    return wire, finer


def run(args: argparse.Namespace) -> dict[str, Any]:
    from integration.bench import imagesource, startup
    from integration.stack import StackConfig, detach_loops_below, running, unmount_below

    work = imagesource.workload(imagesource.ImageSource("builtin", args.image), None, None, None)
    wanted = [c for c in CANDIDATES if c.name in args.formats]
    notes: list[str] = []
    new_mkfs: str | None = None
    mkfs_build_seconds = None
    if any(c.new_mkfs for c in wanted):
        path = Path(args.mkfs_new) if args.mkfs_new else NEW_MKFS
        if args.build_mkfs and not path.exists():
            try:
                built_at, mkfs_build_seconds = build_new_mkfs(path)
                new_mkfs = str(built_at)
            except (RuntimeError, subprocess.SubprocessError, OSError, StopIteration) as e:
                notes.append(f"erofs-utils from Debian 13's source did not build here: {e}")
        elif path.exists():
            new_mkfs = str(path)
    skipped = {c.name: "no erofs-utils newer than 1.5 (give --mkfs-new PATH or --build-mkfs)"
               for c in wanted if c.new_mkfs and new_mkfs is None}
    cands = [c for c in wanted if c.name not in skipped]
    scratch = Path(tempfile.mkdtemp(prefix="bs-format-", dir=args.scratch))
    root = args.root or scratch / "stack"
    t_start = time.time()
    try:
        layout, tag, layers = image_layers(args.image, args.cache)
        for i, ly in enumerate(layers):
            _log(f"unpacking layer {i + 1}/{len(layers)} {ly.digest[:19]} ...")
            unpack(ly, scratch / f"root-{i}")
        seq_layer = next((i for i, ly in enumerate(layers) if ly.root and (ly.root / SEQ_FILE).is_file()), None)
        built: dict[str, Built] = {}
        for c in cands:
            mkfs = new_mkfs if c.new_mkfs and new_mkfs else "mkfs.erofs"
            (scratch / c.name).mkdir()
            b = Built(c, mkfs, [], [])
            for i, ly in enumerate(layers):
                _log(f"{c.name}: mkfs.erofs {' '.join(c.args)} layer {i + 1}/{len(layers)} ...")
                out = scratch / c.name / f"{i}.erofs"
                assert ly.root is not None
                b.mkfs_seconds.append(build_blob(c, mkfs, ly.root, out, ly.digest, ly.max_mtime))
                b.blobs.append(out)
            b.sizes = [p.stat().st_size for p in b.blobs]
            built[c.name] = b
        if not args.no_record:
            cfg = StackConfig(root=root, sidecar=False, snapshotter=True)
            with running(cfg) as st:
                bench = startup.Bench(st, cfg, [], None, _log)
                for name, b in built.items():
                    ref = f"{st.info.registry}/bench/format-{name}:{tag}"
                    _log(f"{name}: pushing the image with its blobs and a signed index, recording its start ...")
                    pub = publish(st, layout, tag, ref, layers, b.blobs)
                    b.digests, b.hash_seconds = [d for d, _ in pub], [s for _, s in pub]
                    sizes = b.sizes or []
                    b.pages, b.recorded_bytes = [set() for _ in sizes], []
                    for k in range(args.recordings):
                        reads = record_reads(bench, ref, work.command, work.expect)
                        pages = [pages_read(reads.get(d, []), sz) for d, sz in zip(b.digests, sizes, strict=True)]
                        if k == 0:
                            b.first = [first_chunks(reads.get(d, []), sz) for d, sz in zip(b.digests, sizes,
                                                                                           strict=True)]
                        for union, pg in zip(b.pages, pages, strict=True):
                            union |= pg
                        b.recorded_bytes.append(sum(len(pg) for pg in pages) * PAGE)
                        _log(f"{name}: recording {k + 1} read {b.recorded_bytes[-1] / 1e6:.1f} MB of blob pages")
                bench.reset()
        wire, finer = wire_rows(built, args.levels, args.threads)
        decompress: dict[str, float] = {}
        if "plain" in built and built["plain"].pages is not None and seq_layer is not None:
            b = built["plain"]
            assert b.pages is not None
            hot = sorted(chunks_of(b.pages[seq_layer], CHUNK))[:2000]
            for lv in args.levels:
                decompress[f"zstd{lv}"] = round(decompress_rate(b.blobs[seq_layer], hot, CHUNK, lv), 1)
        seq: dict[str, dict[str, list[float]]] = {}
        if seq_layer is not None and args.seq_runs > 0:
            # Every source is written anew just before the reads: this machine's disk is a VM's, cached by its
            # host where drop_caches cannot reach, so a file written minutes earlier and one written just now
            # do not read alike.  Written together, they are read under the same conditions.
            _log("writing every source of the sequential reads anew ...")
            fresh = scratch / "fresh"
            shutil.copytree(layers[seq_layer].root or Path(), fresh / "dir", symlinks=True)
            items: list[tuple[str, str, Path]] = [("overlayfs", "dir", fresh / "dir")]
            for name, b in built.items():
                copy = fresh / f"{name}.erofs"
                shutil.copyfile(b.blobs[seq_layer], copy)
                items += [(name, "loop", copy), (name, "file", copy)]
                if b.first is not None:  # the node's own file, as its chunk cache wrote it (needs the start's order)
                    cached = fresh / f"{name}.cache"
                    write_as_cache(b.blobs[seq_layer], cached, b.first[seq_layer])
                    items.append((name, "cache", cached))
            os.sync()
            for r in range(args.seq_runs):
                k = r % len(items)
                for name, how, path in items[k:] + items[:k]:
                    v = seq_read("file" if how == "file" else "dir" if how == "dir" else "loop", path,
                                 scratch / "seq")
                    seq.setdefault(name, {}).setdefault(how, []).append(round(v, 1))
                    _log(f"seq read {name} ({how}): {v:.0f} MB/s")
        else:
            notes.append(f"no sequential read: the image has no {SEQ_FILE}")
    finally:
        unmount_below(scratch)
        detach_loops_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize(args, layers, built, wire, finer, seq, decompress, skipped, notes, work.command,
                     mkfs_build_seconds, time.time() - t_start)


def summarize(args: argparse.Namespace, layers: list[Layer], built: dict[str, Built], wire: dict[str, Any],
              finer: dict[str, Any], seq: dict[str, dict[str, list[float]]], decompress: dict[str, float],
              skipped: dict[str, str], notes: list[str], command: list[str], mkfs_build_seconds: float | None,
              seconds: float) -> dict[str, Any]:
    overlay_runs = seq.get("overlayfs", {}).get("dir", [])
    formats: dict[str, dict[str, Any]] = {}
    for name, b in built.items():
        runs = seq.get(name, {})
        sizes = b.sizes or [0] * len(b.blobs)
        formats[name] = {
            "label": b.cand.label, "study": b.cand.study, "mkfs": mkfs_version(b.mkfs), "mkfs_args": list(b.cand.args),
            "layers": [{"blob_size": sizes[i], "mkfs_seconds": round(m, 2),
                        "hash_seconds": None if b.hash_seconds is None else round(b.hash_seconds[i], 2),
                        "digest": None if b.digests is None else b.digests[i]}
                       for i, m in enumerate(b.mkfs_seconds)],
            "recorded_page_bytes": b.recorded_bytes,
            "seq_read_mb_s": runs,
            # paired by round (each round reads every way once, in a rotated order): the machine's drift
            # between rounds cancels out of each pair
            "seq_read_vs_overlay": {how: round(ratio_spread(v, overlay_runs).median, 3)
                                    for how, v in runs.items() if v and overlay_runs},
            "seq_read_vs_overlay_spread": {how: ratio_spread(v, overlay_runs).as_dict(3)
                                           for how, v in runs.items() if v and overlay_runs}}
    for w in wire.values():
        w["hot_seconds_at"] = {rate: round(transfer_seconds(w["hot_bytes"], rate), 2) for rate in RATES}
        node = formats.get(w["node"], {}).get("seq_read_vs_overlay", {})
        w["seq_read_vs_overlay"] = node.get("loop")
    return {
        "benchmark": "format", "image": args.image, "command": command, "chunk_size": CHUNK,
        "layers": [{"digest": ly.digest, "size": ly.size, "unpacked_bytes": ly.unpacked_bytes,
                    "unpack_seconds": round(ly.unpack_seconds, 2)} for ly in layers],
        "formats": formats, "skipped": skipped, "wire": wire, "finer": finer,
        "overlay_seq_read_mb_s": overlay_runs, "decompress_mb_s": decompress, "seq_file": SEQ_FILE,
        "mkfs_build_seconds": None if mkfs_build_seconds is None else round(mkfs_build_seconds, 1),
        "wall_seconds": round(seconds, 1), "notes": notes,
        "command_line": getattr(args, "command_line", "bootseer bench format"),
    }


# ------------------------------------------------------------------------------------------ report
WAYS = {"loop": "fresh loop", "file": "file-backed", "cache": "cache-written"}
IMPLEMENTING = ["", "## What implementing it takes", "",
                "A chunk's bytes on the wire are no longer its bytes on the node, so the index says both; nothing "
                "else the node does changes shape.",
                "",
                "- **Index v3** (`bootseer.index`, `FORMAT_VERSION = 3`).  Per layer, beside today's fields (layer "
                "digest, diffID, `chunkSize`, one sha256 per chunk): `blob` stays the node's file (the EROFS image "
                "the loop device reads: its digest is what the complete cache is hashed against, its size bounds "
                "every range), and a new `wire` object names the codec (`\"zstd\"`), the wire blob's descriptor "
                "(the frames, one per chunk, back to back; a media type of its own) and the frames' sizes (packed "
                "`uint32`, base64: a few bytes per chunk, far under the index's size bound).  The chunk digests "
                "stay those of the *decompressed* chunk: every byte is verified after decompression, before it is "
                "served or cached, exactly as today.  `converter` says the node format (`erofs`, `lz4`).",
                "- **Versions.**  A node of today reads only version 2 and passes over any other index "
                "(`ImageIndex.from_json` raises `UnsupportedIndex`, `find_index` logs it and goes on; no index → "
                "the ordinary pull): nothing to change there.  A v3 node reads v2 (no `wire`: fetched as stored) "
                "and v3; a v3 layer whose codec it does not know takes the ordinary path for that layer.  During a "
                "roll-out the sidecar attaches both a v2 and a v3 index (two referrers; each node takes the newest "
                "it reads); `bootseer convert --index-version` picks.",
                "- **Sidecar** (`registry_sidecar.convert`).  `mkfs.erofs` with the chosen node codec, then per "
                "chunk: hash the raw chunk, compress it, append the frame; push the frames blob only (the node's "
                "file is rebuilt from the frames and never fetched whole, so the registry does not need it).  "
                "Conversion time grows by the per-chunk compression in the table; level 3 costs little, level 19 "
                "costs minutes per GB on one core.",
                "- **Node** (`snapshotter.lazy`).  `BlobSpec` carries the frame table; the fetcher maps a run of "
                "missing chunks to one byte range of the wire blob (frames are contiguous, so coalescing and "
                "multi-range requests work unchanged), decompresses each frame with `max_output_size` = the "
                "chunk's length (a hostile frame cannot inflate past it), checks the digest, writes the chunk at "
                "its node offset.  `ChunkCache`, swap, the whole-blob check, hot-block manifests and the recorder "
                "are untouched: they all speak node offsets.  The fetch counters count wire bytes.",
                "- **Tests.**  Conversion of the small image to v3 and a lazy pull of it; a frame that inflates past "
                "its chunk, a frame table that does not add up to the wire blob, a digest mismatch after "
                "decompression: refused; a v2-only node given a v3 index pulls the ordinary way; a v3 node given a "
                "v3 layer of an unknown codec pulls that layer the ordinary way."]


def _recordings(result: dict[str, Any]) -> int:
    return max((len(f.get("recorded_page_bytes") or [0]) for f in result["formats"].values()), default=1)


def _ratio_text(v: float | None, sp: dict[str, float] | None) -> str:
    if v is None:
        return "–"
    if sp and sp.get("n", 1) > 1 and sp["min"] != sp["max"]:
        return f"{v:.2f} [{sp['min']:.2f}–{sp['max']:.2f}]"
    return f"{v:.2f}"


def _med(v: Sequence[float]) -> float | None:
    return statistics.median(v) if v else None


def node_read(result: dict[str, Any], node: str) -> float | None:
    """How a node format reads against overlayfs: on the file as the node's chunk cache writes it when that was
    measured (what a swapped layer is), else on the blob as written."""
    ratios = result.get("formats", {}).get(node, {}).get("seq_read_vs_overlay", {})
    v = ratios.get("cache", ratios.get("loop"))
    return None if v is None else float(v)


def decision(result: dict[str, Any], min_read: float = 0.95, close: float = 0.05) -> dict[str, Any]:
    """What the figures support: of the wire variants whose node format a Debian 12 node mounts and reads at
    ≥ ``min_read`` × overlayfs, the one moving the fewest hot-set bytes (``choice``); of those within ``close``
    of it, the one converting fastest (``cheapest``); the fewest bytes of all, whatever reads them."""
    wire = result.get("wire", {})
    kernels = {c.name: c.kernel for c in CANDIDATES}
    today = wire.get("lz4hc", {}).get("hot_bytes")

    def qualifies(w: dict[str, Any]) -> bool:
        return ((node_read(result, w["node"]) or 0) >= min_read and kernels.get(w["node"], (99, 0)) <= NODE_KERNEL
                and w.get("chunk_size", CHUNK) >= MIN_CHUNK)

    ok = {k: w for k, w in wire.items() if qualifies(w)}
    best = min(ok, key=lambda k: ok[k]["hot_bytes"]) if ok else None
    out: dict[str, Any] = {"min_read_vs_overlay": min_read, "node_kernel": ".".join(map(str, NODE_KERNEL)),
                           "min_chunk": MIN_CHUNK,
                           "choice": best, "cheapest": None,
                           "fewest_bytes": min(wire, key=lambda k: wire[k]["hot_bytes"]) if wire else None,
                           "qualifying": sorted(ok, key=lambda k: ok[k]["hot_bytes"])}
    if best:
        near = [k for k in ok if ok[k]["hot_bytes"] <= ok[best]["hot_bytes"] * (1 + close)]
        out["cheapest"] = min(near, key=lambda k: ok[k]["convert_seconds"])
    if best and today:
        for key in ("choice", "cheapest"):
            k = out[key]
            out[f"{key}_hot_vs_today"] = round(wire[k]["hot_bytes"] / today, 3)
            out[f"{key}_disk_vs_today"] = round(sum(wire[k]["node_disk_per_layer"]) /
                                                sum(wire["lz4hc"]["node_disk_per_layer"]), 3)
    return out


def markdown(result: dict[str, Any]) -> str:
    fm, wire = result["formats"], result["wire"]
    layers = result["layers"]
    out = [f"# Lazy-layer format study: {result['image']} image", "",
           f"Produced by `{result.get('command_line', 'bootseer bench format')}` "
           f"({result.get('wall_seconds', 0) / 60:.0f} min).  Hot set: the union of "
           f"{_recordings(result)} recorded start(s) (`bootseer record`'s recorder, cold caches, local stack) of "
           f"`{shlex.join(result['command'])}` per candidate, on that candidate's own blobs, stopped at its "
           "output line.  Chunk size as today: 128 KiB.  Timings come from a shared 2-core machine "
           "(other sessions' tests ran beside it): conversion seconds and read speeds are noisy, sizes and bytes "
           "are exact.", "",
           "Layers: " + ", ".join(f"{i + 1}: {ly['size'] / 1e6:.0f} MB compressed, {ly['unpacked_bytes'] / 1e6:.0f} "
                                  f"MB unpacked (unpack {ly['unpack_seconds']:.1f} s, common to every format)"
                                  for i, ly in enumerate(layers)) + ".", ""]
    out += ["## Node formats", "",
            "| format | study | built with | blob MB per layer | total MB | mkfs s | start read MB (4 KiB pages: "
            "union; each recording) | "
            "seq read MB/s: " + " / ".join(WAYS.values()) + " | × overlayfs: same order |",
            "|---|---|---|---|---:|---:|---:|---|---|"]
    overlay = _med(result.get("overlay_seq_read_mb_s", []))
    for name, f in fm.items():
        sizes = [ly["blob_size"] or 0 for ly in f["layers"]]
        reads = f.get("seq_read_mb_s", {})
        speeds = [_med(reads.get(way, [])) for way in WAYS]
        pages = result.get("finer", {}).get(name, {}).get("pages")
        spreads = f.get("seq_read_vs_overlay_spread", {})
        ratios = [_ratio_text(f.get("seq_read_vs_overlay", {}).get(way), spreads.get(way)) for way in WAYS]
        out.append(f"| `{name}` {f['label']} | ({f['study']}) | {f['mkfs']} `{' '.join(f['mkfs_args'])}` | "
                   + " / ".join(f"{s / 1e6:.0f}" for s in sizes) + f" | {sum(sizes) / 1e6:.0f} | "
                   f"{sum(ly['mkfs_seconds'] for ly in f['layers']):.1f} | "
                   + (f"{pages / 1e6:.1f}" if pages is not None else "–")
                   + (" (" + ", ".join(f"{x / 1e6:.1f}" for x in f["recorded_page_bytes"]) + ")"
                      if f.get("recorded_page_bytes") else "") + " | "
                   + " / ".join(f"{v:.0f}" if v else "–" for v in speeds) + " | "
                   + " / ".join(ratios) + " |")
    if overlay:
        runs = result.get("overlay_seq_read_mb_s", [])
        out += ["", f"Overlayfs over the unpacked layer on local disk: {overlay:.0f} MB/s (median of {len(runs)}: "
                + ", ".join(f"{v:.0f}" for v in runs) + ").  Each read: overlayfs over the mounted format (as in a "
                "container), page cache dropped, 1 MiB reads of `" + result["seq_file"].rsplit("/", 1)[-1] + "`.  "
                "Every source was written anew just before the reads (the VM's disk is cached by its host, "
                "beyond drop_caches: files written at different times do not read alike).  "
                "Mounted from: *fresh loop* — a loop device on a sequential copy of the blob; *file-backed* — erofs "
                "mounting that file itself; *cache-written* — a loop device on a copy written the way the node's "
                "chunk cache writes it (sparse file, the start's chunks first in the order it read them, then the "
                "rest ascending, synced every 16 MB): what a swapped layer reads today.  The ratios pair each read "
                "with the overlayfs read of its round (median [min–max] of the rounds)."]
    for name, why in result.get("skipped", {}).items():
        out.append(f"\nNot built: `{name}`: {why}")
    out += ["", "## The hot set on the wire", "",
            "| node format + wire codec | hot set MB on the wire | × today | at 1 Gbit/s s | at 200 Mbit/s s | "
            "whole image MB on the wire | node disk MB (complete) | node disk MB at start | conversion s | "
            "seq read × overlayfs (fresh loop / cache-written) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    today = wire.get("lz4hc", {}).get("hot_bytes")
    for name, w in sorted(wire.items(), key=lambda kv: kv[1]["hot_bytes"]):
        node = fm.get(w["node"], {}).get("seq_read_vs_overlay", {})
        ratio = " / ".join(f"{node[k]:.2f}" if node.get(k) is not None else "–" for k in ("loop", "cache"))
        out.append(f"| `{name}` ({w['wire_codec']}) | {w['hot_bytes'] / 1e6:.1f} | "
                   + (f"{w['hot_bytes'] / today:.2f}" if today else "–")
                   + f" | {w['hot_seconds_at']['1gbit']:.2f} | {w['hot_seconds_at']['200mbit']:.2f} | "
                   f"{w['whole_bytes'] / 1e6:.0f} | {sum(w['node_disk_per_layer']) / 1e6:.0f} | "
                   f"{w['node_disk_hot'] / 1e6:.0f} | {w['convert_seconds']:.0f} | {ratio} |")
    out += ["", "Seconds at a rate: the hot set's bytes over the link alone (a lower bound of the start beside the "
            "floor, not a measured start).  Conversion: mkfs + chunk hashing (+ per-chunk zstd), one core per "
            "layer, unpack not included."]
    dec = result.get("decompress_mb_s", {})
    if dec:
        out += ["", "Decompressing the hot 128 KiB chunks of the torch layer on one core (Python `zstandard`, what "
                "the daemon would add per fetched chunk): " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in dec.items())
                + " of output."]
    finer = result.get("finer", {})
    if finer:
        sizes = [str(cs) for cs in FINER]
        out += ["", "## Finer hot ranges", "",
                "Bytes to fetch for the recorded start when the unit of fetching is the 4 KiB page it really read, "
                "or a chunk of the size given (raw, as stored; `+ zstd -3`: each chunk compressed with zstd -3).",
                "", "| format | pages read MB | " + " | ".join(f"{int(c) >> 10} KiB" for c in sizes) + " |",
                "|---|---:|" + "---:|" * len(sizes)]
        for name, f in finer.items():
            if name.endswith("+zstd3"):
                row = " | ".join(f"{f[c]['hot_bytes'] / 1e6:.1f}" for c in sizes if c in f)
                out.append(f"| `{name[:-6]}` + zstd -3 per chunk | – | {row} |")
            else:
                row = " | ".join(f"{f['chunks'][c] / 1e6:.1f}" for c in sizes)
                out.append(f"| `{name}` | {f['pages'] / 1e6:.1f} | {row} |")
    d = decision(result)
    if d.get("choice"):
        wire_ = result["wire"]

        def said(key: str) -> str:
            k = d[key]
            return (f"`{k}`: {wire_[k]['hot_bytes'] / 1e6:.1f} MB, {d[f'{key}_hot_vs_today']:.2f} × today's hot set, "
                    f"{d[f'{key}_disk_vs_today']:.2f} × today's disk per complete layer, "
                    f"{wire_[k]['convert_seconds']:.0f} s of conversion")

        out += ["", "## What the figures support", "",
                f"Rule: a node format that a Linux {d['node_kernel']} node (Debian 12) mounts and that reads at "
                f"≥ {d['min_read_vs_overlay']} × overlayfs (as the node's cache writes the file), chunks of at "
                f"least {d.get('min_chunk', MIN_CHUNK) >> 10} KiB (the index holds a digest per chunk and a node "
                "refuses an index over 16 MiB: 64 KiB chunks still index 16 GB of blobs), then the fewest hot-set "
                "bytes on the wire; within 5 % of those, the fastest conversion.",
                "", f"- Fewest bytes under the rule: {said('choice')}.",
                f"- Within 5 % of it, converting fastest: {said('cheapest')}.",
                f"- Fewest bytes of all, whatever reads them: `{d['fewest_bytes']}` "
                f"({wire_[d['fewest_bytes']]['hot_bytes'] / 1e6:.1f} MB).",
                "- Qualifying, fewest bytes first: " + ", ".join(f"`{k}`" for k in d["qualifying"]) + "."]
        out += IMPLEMENTING if "+zstd" in str(d["cheapest"]) else []
    for note in result.get("notes", []):
        out += ["", note]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench format", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="realistic", choices=("realistic", "realistic-split"))
    p.add_argument("--formats", default=",".join(c.name for c in CANDIDATES),
                   help="comma-separated subset of " + ",".join(c.name for c in CANDIDATES))
    p.add_argument("--levels", default="3,19", help="zstd levels of the per-chunk wire codec")
    p.add_argument("--recordings", type=int, default=2,
                   help="cold recordings of each candidate's start; the hot set is their union (a merged manifest)")
    p.add_argument("--seq-runs", type=int, default=5, help="cold sequential reads per format and mount (median)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="threads compressing chunks")
    p.add_argument("--mkfs-new", help=f"a mkfs.erofs with zstd/lzma/deflate (default {NEW_MKFS} if present)")
    p.add_argument("--build-mkfs", action="store_true",
                   help="build erofs-utils from Debian 13's source package when --mkfs-new is absent")
    p.add_argument("--no-record", action="store_true", help="sizes and reads only: no stack, no hot set")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--md", dest="md_path")
    p.add_argument("--render", metavar="JSON", help="only redraw --md from an earlier --json result")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence to add to the result's notes (repeatable; with --render, kept in --json too)")
    p.add_argument("--root", type=Path, default=None, help="stack scratch dir (default: below the scratch dir)")
    p.add_argument("--scratch", type=Path, default=None, help="scratch parent (blobs and unpacked layers: ~5 GB)")
    p.add_argument("--cache", type=Path, default=Path("/var/cache/bootseer/images"), help="image cache")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments; ValueError names a bad one."""
    args = build_parser().parse_args(argv)
    names = [c.name for c in CANDIDATES]
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in names]
    if bad or not fmts:
        raise ValueError(f"unknown format(s) {', '.join(bad) or '(none given)'}: choose from {', '.join(names)}")
    args.formats = list(dict.fromkeys(fmts))
    try:
        args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--levels {args.levels}: zstd levels are integers, e.g. 3,19") from None
    if any(not 1 <= lv <= 22 for lv in args.levels):
        raise ValueError("--levels: zstd levels run from 1 to 22")
    if args.seq_runs < 0 or args.threads < 1 or args.recordings < 1:
        raise ValueError("--seq-runs must be ≥ 0, --threads and --recordings ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result["notes"] = [*result.get("notes", []), *args.note]
        if args.json_path and args.note:
            Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
    else:
        if os.geteuid() != 0:
            print("error: the format study needs root (mounts, loop devices, drop_caches, the local stack)",
                  file=sys.stderr)
            return 2
        args.command_line = "bootseer bench format " + shlex.join(argv if argv is not None else sys.argv[1:])
        result = run(args)
        result["notes"] = [*result.get("notes", []), *args.note]
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    if args.md_path:
        Path(args.md_path).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
