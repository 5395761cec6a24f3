"""Loading tensors from a striped checkpoint straight into device memory.

    import ckptfs
    state = ckptfs.load_safetensors("s3://bucket/run7/step-12000", "model.safetensors", device="cuda")
    state = ckptfs.torch_load("hdfs://nn:8020/ckpt", "optim.pt", map_location="cpu")

:func:`load_safetensors` streams: the checkpoint's chunks are fetched by the reader's threads, each into
one of a ring of host staging buffers (page-locked when CUDA is available, so the copy to the device is
a DMA that needs no CPU), verified there, and copied into the destination tensors with ``non_blocking``
copies on a side CUDA stream while the next chunks are still being read.  A staging buffer is reused
only once its copy has completed (a CUDA event per buffer).  So the load runs at the store's read rate
(the idea of Run:ai's model streamer: many concurrent reads into a pool of pinned buffers, one copy
stream), instead of read everything → parse → copy.  Without CUDA the same code path loads to CPU
memory; that is what the tests run.

Trust: the safetensors header comes from the store, so it is parsed as hostile input — its length is
bounded before anything is allocated, every dtype, shape and offset is checked against the file's size
and against each other (no overlaps), duplicate names are refused — and no byte of a chunk reaches a
tensor before the chunk's sha256 matched the manifest.  A corrupt chunk fails the whole load with
:class:`~ckptfs.errors.CorruptChunkError`; the partly filled tensors are dropped, never returned.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from ckptfs.errors import CkptfsError
from ckptfs.manifest import FileEntry
from ckptfs.reader import Checkpoint, ReaderOptions
from ckptfs.store import StoreOptions

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100 << 20  # the limit safetensors itself enforces; a larger claim is hostile or broken

# safetensors dtype names → torch dtype attribute names (those this torch lacks are refused at load)
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class SafetensorsHeaderError(CkptfsError, ValueError):
    """The file is not a well-formed safetensors file (bad length, JSON, dtype, shape or offsets)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section (after the header)
    end: int


def _int(v: object, what: str) -> int:
    if type(v) is not int or v < 0:  # bool is an int in Python: refused too
        raise SafetensorsHeaderError(f"{what} must be a non-negative integer, not {v!r}")
    return v


def parse_header(raw: bytes, data_size: int) -> tuple[list[TensorSpec], dict[str, str]]:
    """Check a safetensors JSON header against a data section of ``data_size`` bytes.

    Returns the tensors sorted by offset and the ``__metadata__`` map.  Every problem is a
    :class:`SafetensorsHeaderError` naming the tensor.
    """
    import torch

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise SafetensorsHeaderError(f"duplicate key {k!r} in the safetensors header")
            d[k] = v
        return d

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except SafetensorsHeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsHeaderError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise SafetensorsHeaderError("safetensors header is not a JSON object")
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsHeaderError("safetensors __metadata__ must map strings to strings")
    specs: list[TensorSpec] = []
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsHeaderError(f"tensor {name!r}: want exactly dtype, shape, data_offsets")
        dt = info["dtype"]
        if not isinstance(dt, str) or dt not in _DTYPES or not hasattr(torch, _DTYPES[dt]):
            raise SafetensorsHeaderError(f"tensor {name!r}: unsupported dtype {dt!r}")
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 64:
            raise SafetensorsHeaderError(f"tensor {name!r}: shape must be a list of at most 64 sizes")
        dims = tuple(_int(d, f"tensor {name!r}: a dimension") for d in shape)
        if not isinstance(offs, list) or len(offs) != 2:
            raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = (_int(o, f"tensor {name!r}: an offset") for o in offs)
        if not begin <= end <= data_size:
            raise SafetensorsHeaderError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data section ({data_size} bytes)")
        numel = 1
        for d in dims:
            numel *= d
        itemsize = getattr(torch, _DTYPES[dt]).itemsize
        if numel * itemsize != end - begin:
            raise SafetensorsHeaderError(
                f"tensor {name!r}: {dt}{list(dims)} needs {numel * itemsize} bytes, its offsets span {end - begin}")
        specs.append(TensorSpec(name, dt, dims, begin, end))
    specs.sort(key=lambda s: (s.begin, s.end))
    for a, b in itertools.pairwise(specs):
        if b.begin < a.end:
            raise SafetensorsHeaderError(f"tensors {a.name!r} and {b.name!r} overlap in the data section")
    return specs, meta


@contextlib.contextmanager
def _opened(
    src: str | Checkpoint, store_options: StoreOptions | None, reader_options: ReaderOptions | None
) -> Iterator[Checkpoint]:
    if isinstance(src, Checkpoint):
        yield src
        return
    with Checkpoint(src, store_options=store_options, reader_options=reader_options) as ckpt:
        yield ckpt


def _read_exact(ckpt: Checkpoint, f: FileEntry, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    if ckpt.readinto(f, offset, memoryview(buf)) != n:
        raise SafetensorsHeaderError(f"{f.path}: file ends inside its safetensors header")
    return bytes(buf)


def read_header(ckpt: Checkpoint, path: str) -> tuple[FileEntry, int, list[TensorSpec], dict[str, str]]:
    """The file entry, the data section's file offset, the tensors and the metadata of ``path``."""
    f = ckpt.file(path)
    if f.size < 8:
        raise SafetensorsHeaderError(f"{path}: {f.size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", _read_exact(ckpt, f, 0, 8))
    if n > MAX_HEADER or 8 + n > f.size:
        raise SafetensorsHeaderError(
            f"{path}: header length {n} is beyond the limit ({MAX_HEADER}) or the file ({f.size} bytes)")
    specs, meta = parse_header(_read_exact(ckpt, f, 8, n), f.size - 8 - n)
    return f, 8 + n, specs, meta


class _Slots:
    """The ring of host staging buffers, one chunk each; page-locked when copying to a CUDA device."""

    def __init__(self, count: int, size: int, pinned: bool) -> None:
        import torch

        self.tensors: list[torch.Tensor] = []
        self.views: list[memoryview] = []
        self._maps: list[mmap.mmap] = []
        for _ in range(count):
            if pinned:
                t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                v = t.numpy().data.cast("B")
            else:
                # Page-aligned and untouched until a fetch thread fills it (see reader.alloc_buffer).
                m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
                self._maps.append(m)
                t = torch.frombuffer(m, dtype=torch.uint8)
                v = memoryview(m)
            self.tensors.append(t)
            self.views.append(v)


def load_safetensors(
    src: str | Checkpoint,
    path: str,
    *,
    device: str | torch.device = "cpu",
    store_options: StoreOptions | None = None,
    reader_options: ReaderOptions | None = None,
    staging_buffers: int | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path`` in the checkpoint ``src`` (a URI or an open
    :class:`Checkpoint`), on ``device``; like ``safetensors.torch.load_file(..., device=device)``.

    ``staging_buffers``: chunks in flight (default: the reader's threads + 2, within its memory budget).
    """
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    with _opened(src, store_options, reader_options) as ckpt:
        f, data_start, specs, _meta = read_header(ckpt, path)
        out = {s.name: torch.empty(s.shape, dtype=getattr(torch, _DTYPES[s.dtype]), device=dev) for s in specs}
        # Each tensor as a flat byte view: a chunk's bytes are copied into it wherever they fall.
        flat = {s.name: out[s.name].reshape(-1).view(torch.uint8) for s in specs if s.end > s.begin}
        todo = [s for s in specs if s.end > s.begin]
        cs = ckpt.manifest.chunk_size
        if not todo:
            return out
        first, last = (data_start + todo[0].begin) // cs, (data_start + todo[-1].end - 1) // cs
        n_chunks = last - first + 1
        opts = ckpt.opts
        count = staging_buffers or min(opts.threads + 2, max(2, opts.memory_budget // cs))
        count = max(1, min(count, n_chunks))
        slots = _Slots(count, cs, pinned=cuda and torch.cuda.is_available())
        stream = torch.cuda.Stream(device=dev) if cuda else None  # type: ignore[no-untyped-call]
        if stream is not None:
            # The destination tensors were allocated on the current stream: order the copies after it.
            stream.wait_stream(torch.cuda.current_stream(dev))
        free = list(range(count))
        copying: deque[tuple[int, Any]] = deque()  # (slot, CUDA event of its last copy)
        inflight: deque[tuple[int, int, Future[None]]] = deque()  # (chunk index, slot, fetch)
        j = 0  # first tensor that may still receive bytes
        k = first
        try:
            while k <= last or inflight:
                while k <= last and (free or copying):
                    if not free:
                        slot, ev = copying.popleft()
                        ev.synchronize()  # its previous chunk reached the device: reuse it
                        free.append(slot)
                    slot = free.pop()
                    ref = f.chunks[k]
                    view = slots.views[slot][: ref.length]
                    if ckpt.source.has(ref):  # e.g. the chunk the header was read from: no second fetch
                        done: Future[None] = Future()
                        with ckpt.source.chunk(ref) as data:
                            view[:] = data
                        done.set_result(None)
                        inflight.append((k, slot, done))
                    else:
                        inflight.append((k, slot, ckpt.source.read_direct(ref, view)))
                    k += 1
                idx, slot, fut = inflight.popleft()
                fut.result()  # verified (sha256) before any of its bytes reach a tensor; raises otherwise
                lo = idx * cs - data_start  # the chunk's span in data-section coordinates
                hi = lo + f.chunks[idx].length
                staged = slots.tensors[slot]
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    while j < len(todo) and todo[j].end <= lo:
                        j += 1
                    i = j
                    while i < len(todo) and todo[i].begin < hi:
                        s = todo[i]
                        a, b = max(s.begin, lo), min(s.end, hi)
                        flat[s.name][a - s.begin : b - s.begin].copy_(staged[a - lo : b - lo], non_blocking=cuda)
                        i += 1
                if stream is not None:
                    ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    ev.record(stream)
                    copying.append((slot, ev))
                else:
                    free.append(slot)
            if stream is not None:
                stream.synchronize()
        except BaseException:
            # Fetches still running write into the staging buffers: stop what has not started and wait
            # for the rest before the buffers (and the half-filled tensors) are dropped.
            for _, _, fut in inflight:
                fut.cancel()
            wait([fut for _, _, fut in inflight])
            if stream is not None:
                stream.synchronize()
            raise
        return out


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (``io.BytesIO`` would)."""

    def __init__(self, buf: memoryview | bytearray) -> None:
        super().__init__()
        self._buf = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), len(self._buf) - self._pos))
        view[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._buf)}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def torch_load(
    src: str | Checkpoint,
    path: str,
    *,
    map_location: Any = None,
    store_options: StoreOptions | None = None,
    reader_options: ReaderOptions | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.load`` of ``path`` in the checkpoint ``src``: the whole file is read with every stripe in
    parallel (and verified) first, then unpickled from memory; ``kwargs`` go to ``torch.load``
    (``weights_only`` keeps torch's default)."""
    import torch

    with _opened(src, store_options, reader_options) as ckpt:
        buf = ckpt.read_file(path)
    return torch.load(cast("IO[bytes]", _MemoryFile(buf)), map_location=map_location, **kwargs)
