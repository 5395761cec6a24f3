"""Layer → EROFS blob, and image → index referrer: the sidecar's work, also run directly by ``bootseer convert``.

One layer: download the blob into a scratch dir (streamed, resumed, verified against the layer digest — a
manifest whose layer digest does not match the content is refused here, before anything is unpacked), unpack
it with :mod:`registry_sidecar.unpack` (overlay whiteouts, every attribute kept, hostile entries refused), then

    SOURCE_DATE_EPOCH=<newest mtime in the layer> mkfs.erofs -zlz4hc,4 -C65536 -U<uuid from the layer digest> blob root

Why these options: LZ4HC is decompressed by the kernel inside erofs, so no byte of file data passes through Python
on the node; level 4 rather than mkfs's default 9 because it costs a third less CPU for a blob half a percent larger
(docs/bench/design-measurements.md), and LZ4 decompresses equally fast at any level. ``SOURCE_DATE_EPOCH`` fixes the
superblock build time and clamps nothing (it is the layer's own newest mtime), so per-file mtimes survive — Python's
``.pyc`` files are validated against them — while the output depends only on the layer's content; the UUID is
derived from the layer digest. mkfs.erofs sorts directory entries, so readdir order of the scratch dir does not leak
in either: the same layer always gives the same blob, byte for byte.

Then the blob is cut into chunks (128 KiB default) and hashed, pushed into the image's repository (or mounted
from another repository that has it), and finally the index artifact is pushed as a referrer of the image
manifest (:mod:`bootseer.index`).  Layers that cannot be converted — unknown media type, hostile or
corrupt content — are listed in the index as skipped, with the reason; the rest of the image is still indexed.
An image none of whose layers could be converted gets no index at all (nodes pull it the ordinary way).
Scratch data is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import zstandard

from bootseer.index import (
    BOUND_INDEX_ANNOTATION,
    DEFAULT_CHUNK_SIZE,
    EROFS_MEDIA_TYPE,
    FORMAT_VERSION,
    WIRE_MEDIA_TYPE,
    ImageIndex,
    LayerBlob,
    WireBlob,
    bind_manifest,
    find_index,
    hash_chunks,
    manifest_descriptor,
    push_index,
)
from bootseer.reference import Reference
from bootseer.registry import (
    Descriptor,
    DigestMismatch,
    Manifest,
    Platform,
    RegistryClient,
)
from bootseer.trust import Signer, TrustPolicy
from registry_sidecar.unpack import (
    LayerError,
    Unpacker,
    UnpackStats,
    UnsupportedMediaType,
    layer_compression,
    open_layer_stream,
)

log = logging.getLogger(__name__)

MKFS = "mkfs.erofs"


class ConvertError(RuntimeError):
    """Conversion failed for a reason that may go away (tool failure, disk full); worth retrying."""


@dataclass
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression: str = "lz4hc,4"  # mkfs.erofs -z argument ("lz4hc,4", "lz4hc" = level 9, "lz4hc,12", "lz4")
    # mkfs.erofs -C: largest physical cluster (bytes of compressed data decompressed as one).  64 KiB instead
    # of mkfs's 4 KiB: the blobs shrink and the start-up hot set with them, which the prefetched start-up
    # gains more from than it loses to more decompression per small random read
    # (docs/bench/design-measurements.md).  None: mkfs's default.
    pcluster_size: int | None = 64 << 10
    allow_devices: bool = True
    max_bytes: int | None = None  # refuse layers unpacking to more file data than this
    parallel: int = 2  # layers converted at once (mkfs is single-threaded)
    upload_chunk: int = 32 << 20  # bigger blobs are pushed in PATCH chunks of this size
    nice: int = 0  # run mkfs.erofs niced (the sidecar shares the registry's host)
    workdir: Path | None = None  # scratch parent; default $TMPDIR
    # 3: each chunk also compressed (zstd, one frame per chunk) into a wire blob, the only blob pushed: fewer
    # bytes per lazy start for the same node blob (docs/bench/format.md).  2: the EROFS blob itself is pushed
    # and fetched as stored (what nodes that read only index v2 need).
    index_version: int = FORMAT_VERSION
    wire_level: int = 3  # zstd level of the wire frames (19 saves a few % more for minutes of CPU per GB)


# ------------------------------------------------------------------------------------------ layer map
@dataclass
class ConvertedLayer:
    blob: LayerBlob
    repos: list[str] = field(default_factory=list)  # repositories known to hold the EROFS blob


class LayerMap(Protocol):
    """Original layer digest → its EROFS blob, across repositories, so a layer is converted once."""

    def get_layer(self, layer_digest: str) -> ConvertedLayer | None: ...

    def put_layer(self, blob: LayerBlob, repo: str) -> None: ...

    def forget_layer(self, layer_digest: str) -> None: ...


class MemoryLayerMap:
    def __init__(self) -> None:
        self._d: dict[str, ConvertedLayer] = {}
        self._lock = threading.Lock()

    def get_layer(self, layer_digest: str) -> ConvertedLayer | None:
        with self._lock:
            return self._d.get(layer_digest)

    def put_layer(self, blob: LayerBlob, repo: str) -> None:
        with self._lock:
            rec = self._d.setdefault(blob.layer_digest, ConvertedLayer(blob))
            rec.blob = blob
            if repo not in rec.repos:
                rec.repos.append(repo)

    def forget_layer(self, layer_digest: str) -> None:
        with self._lock:
            self._d.pop(layer_digest, None)


# ---------------------------------------------------------------------------------------------- progress
class Progress(Protocol):
    def phase(self, layer: str, name: str, total: int | None) -> None: ...

    def advance(self, layer: str, n: int) -> None: ...

    def done(self, result: LayerResult) -> None: ...


class _NoProgress:
    def phase(self, layer: str, name: str, total: int | None) -> None:
        pass

    def advance(self, layer: str, n: int) -> None:
        pass

    def done(self, result: LayerResult) -> None:
        pass


# ------------------------------------------------------------------------------------------------ results
@dataclass
class LayerResult:
    digest: str
    media_type: str
    size: int  # compressed layer bytes
    status: str = "pending"  # converted | reused | skipped
    reason: str = ""
    blob: LayerBlob | None = None
    unpacked_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # fetch, unpack, mkfs, cleanup, hash, push

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest, "mediaType": self.media_type, "size": self.size,
                               "status": self.status, "unpacked_bytes": self.unpacked_bytes,
                               "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if self.reason:
            out["reason"] = self.reason
        if self.blob:
            out["blob"] = {"digest": self.blob.blob.digest, "size": self.blob.blob.size,
                           "chunks": self.blob.chunk_count}
            if self.blob.wire is not None:
                out["wire"] = {"digest": self.blob.wire.blob.digest, "size": self.blob.wire.blob.size,
                               "codec": self.blob.wire.codec}
        return out


@dataclass
class ImageResult:
    ref: str
    manifest_digest: str
    index_digest: str | None = None
    already_indexed: bool = False
    bound: str | None = None  # ``repo@digest`` of the bound image (:func:`bind_image`), when one was pushed
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        conv = [lr for lr in self.layers if lr.status == "converted"]
        bytes_in = sum(lr.size for lr in conv)
        bytes_out = sum(lr.blob.blob.size for lr in conv if lr.blob)
        pushed = sum(lr.blob.fetched.size for lr in conv if lr.blob)  # the wire blobs of a v3 index
        return {
            "ref": self.ref, "manifest": self.manifest_digest, "index": self.index_digest,
            "already_indexed": self.already_indexed, "bound": self.bound,
            "layers": len(self.layers), "converted": len(conv),
            "reused": sum(lr.status == "reused" for lr in self.layers),
            "skipped": [{"digest": lr.digest, "reason": lr.reason} for lr in self.layers if lr.status == "skipped"],
            "bytes_in": bytes_in, "bytes_out": bytes_out, "bytes_pushed": pushed,
            "unpacked_bytes": sum(lr.unpacked_bytes for lr in conv),
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(bytes_in / 1e6 / self.seconds, 2) if self.seconds > 0 and bytes_in else 0.0,
            "layer_details": [lr.to_dict() for lr in self.layers],
        }


# ---------------------------------------------------------------------------------------------- one layer
def erofs_uuid(layer_digest: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(b"bootseer-erofs\0" + layer_digest.encode()).digest()[:16], version=4))


def build_erofs(root: Path, out: Path, layer_digest: str, epoch: int, opts: ConvertOptions) -> None:
    """``mkfs.erofs`` with the deterministic options (see the module docstring)."""
    argv = [MKFS, "--quiet", f"-z{opts.compression}", f"-U{erofs_uuid(layer_digest)}"]
    if opts.pcluster_size:
        argv.append(f"-C{opts.pcluster_size}")
    argv += [str(out), str(root)]
    if opts.nice:
        argv = ["nice", "-n", str(opts.nice), *argv]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(max(epoch, 0)), LC_ALL="C")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ConvertError(f"mkfs.erofs failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


class _Hashing:
    """The uncompressed tar stream as the unpacker reads it, hashed on the way: the layer's diffID without a
    second pass over the layer."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src, self.sha = src, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.sha.update(data)
        return data

    def finish(self) -> str:
        """Read what the unpacker left (the tar's end padding) and return ``sha256:<hex>``."""
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


class _ReadProgress:
    def __init__(self, fh: IO[bytes], cb: Callable[[int], None]) -> None:
        self.fh, self.cb = fh, cb

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.cb(len(data))
        return data


@dataclass
class LocalLayer:
    """A converted layer on local disk, before it is pushed."""

    path: Path  # the EROFS blob
    blob: LayerBlob
    stats: UnpackStats
    seconds: dict[str, float]
    wire_path: Path | None = None  # the wire blob of a v3 layer (pushed instead of the EROFS blob)

    @property
    def push_path(self) -> Path:
        return self.wire_path if self.wire_path is not None else self.path


def compress_chunks(path: Path, chunk_size: int, out: Path,
                    level: int = 3) -> tuple[str, int, tuple[str, ...], WireBlob]:
    """Like :func:`~bootseer.index.hash_chunks` (digests of the node bytes, which nodes verify after
    decompressing), and in the same read each chunk compressed as one zstd frame appended to ``out``: the
    wire blob and its frame table.  Frames carry their content size, so a node can refuse a frame that
    announces more than its chunk before decompressing it."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    whole, wire = hashlib.sha256(), hashlib.sha256()
    chunks: list[str] = []
    frames: list[int] = []
    size = 0
    with open(path, "rb", buffering=0) as fh, open(out, "wb") as dst:
        while True:
            data = fh.read(chunk_size)
            if not data:
                break
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
            size += len(data)
            frame = cctx.compress(data)
            wire.update(frame)
            dst.write(frame)
            frames.append(len(frame))
    desc = Descriptor(WIRE_MEDIA_TYPE, "sha256:" + wire.hexdigest(), sum(frames))
    return "sha256:" + whole.hexdigest(), size, tuple(chunks), WireBlob("zstd", desc, tuple(frames))


def convert_layer_file(blob_path: Path, media_type: str, layer_digest: str, out_dir: Path,
                       opts: ConvertOptions | None = None, progress: Callable[[str, int | None], None] | None = None,
                       advance: Callable[[int], None] | None = None) -> LocalLayer:
    """Convert a local (verified) layer blob into ``out_dir/<hex>.erofs``.

    Raises :class:`LayerError` for hostile/corrupt layers; nothing of the layer is left in ``out_dir`` then.
    """
    opts = opts or ConvertOptions()
    layer_compression(media_type)  # UnsupportedMediaType early
    hexd = layer_digest.split(":", 1)[-1]
    root = Path(tempfile.mkdtemp(prefix=f"root-{hexd[:12]}-", dir=out_dir))
    out = out_dir / f"{hexd}.erofs"
    seconds: dict[str, float] = {}
    try:
        os.chmod(root, 0o755)
        t = time.monotonic()
        if progress:
            progress("unpack", blob_path.stat().st_size)
        with open(blob_path, "rb") as fh:
            src: Any = _ReadProgress(fh, advance) if advance else fh
            tar = _Hashing(open_layer_stream(src, media_type))
            stats = Unpacker(str(root), allow_devices=opts.allow_devices, max_bytes=opts.max_bytes,
                             compressed_size=blob_path.stat().st_size).unpack(tar)  # type: ignore[arg-type]
            diff_id = tar.finish()
        seconds["unpack"] = time.monotonic() - t
        t = time.monotonic()
        if progress:
            progress("mkfs", None)
        build_erofs(root, out, layer_digest, stats.max_mtime, opts)
        seconds["mkfs"] = time.monotonic() - t
        t = time.monotonic()
        shutil.rmtree(root)
        seconds["cleanup"] = time.monotonic() - t
        t = time.monotonic()
        wire: WireBlob | None = None
        wire_path: Path | None = None
        if opts.index_version >= 3:
            wire_path = out_dir / f"{hexd}.zst-frames"
            digest, size, chunks, wire = compress_chunks(out, opts.chunk_size, wire_path, opts.wire_level)
        else:
            digest, size, chunks = hash_chunks(out, opts.chunk_size)
        seconds["hash"] = time.monotonic() - t
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        for leftover in (out, out_dir / f"{hexd}.zst-frames"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    blob = LayerBlob(layer_digest, media_type, blob_path.stat().st_size, Descriptor(EROFS_MEDIA_TYPE, digest, size),
                     opts.chunk_size, chunks, diff_id, wire=wire)
    return LocalLayer(out, blob, stats, seconds, wire_path)


# ---------------------------------------------------------------------------------------------- an image
class ImageConverter:
    """Converts images of one registry; holds the client, options and the layer map."""

    def __init__(self, client: RegistryClient, opts: ConvertOptions | None = None,
                 layer_map: LayerMap | None = None, signer: Signer | None = None) -> None:
        self.client = client
        self.signer = signer  # signs every index pushed (cosign format); None: unsigned (nodes with
        # ``require`` ignore such an index)
        self.opts = opts or ConvertOptions()
        self.layer_map: LayerMap = layer_map if layer_map is not None else MemoryLayerMap()

    def convert(self, image: Reference | str, *, platform: Platform | str | None = None,
                manifest: Manifest | None = None, force: bool = False,
                progress: Progress | None = None) -> ImageResult:
        """Convert every layer of ``image`` (on ``platform``) and push its index; see the module docstring.

        Registry and tool failures raise (the sidecar retries them); layer problems end up in the index's
        ``skipped`` list.  With an existing index and not ``force``, nothing is done.
        """
        ref = image if isinstance(image, Reference) else Reference.parse(image)
        t0 = time.monotonic()
        if manifest is None:
            manifest, _ = self.client.resolve_image(ref, platform)
        if manifest.is_index:
            raise ValueError(f"{ref}: {manifest.digest} is an index, convert one of its manifests")
        result = ImageResult(str(ref), manifest.digest)
        repo = ref.in_repository(ref.repository)
        if not force:
            # an existing index counts only if it is of this format and, when we sign, carries our signature
            policy = None if self.signer is None else TrustPolicy.for_signer(self.signer)
            existing = find_index(self.client, repo, manifest.digest, policy)
            if existing and existing[1].version == self.opts.index_version:
                result.index_digest, result.already_indexed = existing[0], True
                result.seconds = time.monotonic() - t0
                return result
        prog = progress or _NoProgress()
        seen: dict[str, LayerResult] = {}
        order: list[LayerResult] = []
        for d in manifest.layers:
            if d.digest not in seen:
                seen[d.digest] = LayerResult(d.digest, d.media_type, d.size)
            order.append(seen[d.digest])
        unique = list(seen.values())
        if self.opts.workdir:
            self.opts.workdir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="bs-convert-", dir=self.opts.workdir))
        try:
            with ThreadPoolExecutor(max_workers=max(1, self.opts.parallel), thread_name_prefix="convert") as pool:
                futures = [pool.submit(self._layer, repo, lr, scratch, prog) for lr in unique]
                errors = []
                for f in futures:
                    try:
                        f.result()
                    except BaseException as e:  # collect; the first is re-raised below
                        errors.append(e)
                if errors:
                    raise errors[0]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        index = ImageIndex(manifest.digest, version=self.opts.index_version)
        for lr in unique:
            if lr.blob is not None:
                index.layers[lr.digest] = lr.blob
            else:
                index.skipped.append({"digest": lr.digest, "mediaType": lr.media_type, "reason": lr.reason})
        result.layers = order if len(order) == len(unique) else unique
        if not index.layers:
            # Nothing a node could mount lazily: attaching an index would only cost readers a fetch (and add a
            # writer to the subject's referrers tag index); nodes pull such an image the ordinary way.
            result.seconds = time.monotonic() - t0
            log.warning("%s@%s: no layer could be converted; no index attached", repo, manifest.digest)
            return result
        result.index_digest = push_index(self.client, repo, index, manifest_descriptor(manifest), self.signer)
        result.seconds = time.monotonic() - t0
        log.info("indexed %s@%s: %d converted, %d reused, %d skipped in %.1fs", repo, manifest.digest,
                 sum(lr.status == "converted" for lr in unique), sum(lr.status == "reused" for lr in unique),
                 sum(lr.status == "skipped" for lr in unique), result.seconds)
        return result

    def _layer(self, repo: Reference, lr: LayerResult, scratch: Path, prog: Progress) -> None:
        try:
            layer_compression(lr.media_type)
        except UnsupportedMediaType as e:
            self._skip(lr, str(e), prog)
            return
        rec = self.layer_map.get_layer(lr.digest)
        if rec is not None and not rec.blob.diff_id:  # converted by a version that did not record it
            self.layer_map.forget_layer(lr.digest)
            rec = None
        if rec is not None and (rec.blob.wire is not None) != (self.opts.index_version >= 3):
            rec = None  # converted for the other index version: its pushed blob is not the one wanted here
        if rec is not None and self._reuse(repo, rec):
            lr.blob = LayerBlob(**{**rec.blob.__dict__, "layer_media_type": lr.media_type, "layer_size": lr.size,
                                   "source": ""})
            lr.status = "reused"
            self.layer_map.put_layer(lr.blob, repo.repository)
            prog.done(lr)
            return
        hexd = lr.digest.split(":", 1)[-1]
        ldir = scratch / hexd[:16]
        ldir.mkdir()
        try:
            blob_path = ldir / "layer.blob"
            t = time.monotonic()
            prog.phase(lr.digest, "fetch", lr.size)
            for attempt in (1, 2):  # a second download tells bytes damaged in transit from a wrong manifest
                try:
                    with open(blob_path, "wb") as fh:
                        self.client.fetch_blob(repo, lr.digest, fh, lr.size, lambda n: prog.advance(lr.digest, n))
                    break
                except DigestMismatch as e:
                    if attempt == 2:
                        self._skip(lr, f"layer content does not match the manifest: {e}", prog)
                        return
                    log.warning("layer %s: %s; downloading it again", lr.digest, e)
            lr.seconds["fetch"] = time.monotonic() - t
            try:
                local = convert_layer_file(blob_path, lr.media_type, lr.digest, ldir, self.opts,
                                           progress=lambda name, total: prog.phase(lr.digest, name, total),
                                           advance=lambda n: prog.advance(lr.digest, n))
            except LayerError as e:
                self._skip(lr, f"refused: {e}", prog)
                return
            blob_path.unlink()
            lr.seconds.update(local.seconds)
            lr.unpacked_bytes = local.stats.bytes
            t = time.monotonic()
            pushed = local.blob.fetched  # the wire blob of a v3 layer (the EROFS blob is never fetched whole)
            prog.phase(lr.digest, "push", pushed.size)
            chunk = self.opts.upload_chunk if pushed.size > self.opts.upload_chunk else None
            self.client.push_blob(repo, local.push_path, pushed.digest, chunk_size=chunk,
                                  progress=lambda n: prog.advance(lr.digest, n))
            lr.seconds["push"] = time.monotonic() - t
            lr.blob, lr.status = local.blob, "converted"
            self.layer_map.put_layer(local.blob, repo.repository)
            prog.done(lr)
        finally:
            shutil.rmtree(ldir, ignore_errors=True)

    def _reuse(self, repo: Reference, rec: ConvertedLayer) -> bool:
        """Make the known blob available in ``repo`` without converting: present already, or mounted."""
        digest = rec.blob.fetched.digest
        if self.client.blob_exists(repo, digest) is not None:
            return True
        for other in rec.repos:
            if other != repo.repository and self.client.mount_blob(repo, digest, other):
                return True
        log.info("layer %s: its EROFS blob %s is gone from %s; converting again", rec.blob.layer_digest, digest,
                 ", ".join(rec.repos) or "everywhere")
        self.layer_map.forget_layer(rec.blob.layer_digest)
        return False

    @staticmethod
    def _skip(lr: LayerResult, reason: str, prog: Progress) -> None:
        lr.status, lr.reason = "skipped", reason
        log.warning("layer %s skipped: %s", lr.digest, reason)
        prog.done(lr)


def bind_image(client: RegistryClient, image: Reference | str, result: ImageResult, tag: str) -> str:
    """Push the *bound* form of the converted image — its manifest plus annotations naming the index — as
    ``tag`` in the image's repository; return ``repo@digest`` of it (and set ``result.bound``).

    The bound image has the same config and layers, hence the same content, under a new digest: users who
    pin by digest pin the index too, and no later referrer can change which index a node uses for it
    (docs/security.md, "Pinned indexes").  The trade-off: a new digest to roll out, and a re-conversion
    (a new converter version) means binding, and rolling out, again."""
    ref = image if isinstance(image, Reference) else Reference.parse(image)
    if result.index_digest is None:
        raise ConvertError(f"{ref}: no index to bind (no layer could be converted)")
    repo = ref.in_repository(ref.repository)
    manifest = client.get_manifest(repo.with_digest(result.manifest_digest))
    if BOUND_INDEX_ANNOTATION in (manifest.doc.get("annotations") or {}):
        raise ConvertError(f"{ref}: already a bound image; bind the image it was made from")
    digest = client.put_manifest(repo, bind_manifest(manifest, result.index_digest), manifest.media_type,
                                 reference=tag)
    result.bound = f"{repo.name}@{digest}"
    return result.bound


def convert_image(client: RegistryClient, image: Reference | str, *, platform: Platform | str | None = None,
                  opts: ConvertOptions | None = None, layer_map: LayerMap | None = None, force: bool = False,
                  progress: Progress | None = None, signer: Signer | None = None) -> ImageResult:
    """One-shot :meth:`ImageConverter.convert`."""
    return ImageConverter(client, opts, layer_map, signer).convert(image, platform=platform, force=force,
                                                                   progress=progress)
