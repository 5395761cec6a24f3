"""The Python API: the striped reader without FUSE, for loaders that want a file object or bytes.

    import ckptfs, torch
    with ckptfs.open("s3://bucket/ckpt/step-1000", "model.pt") as f:
        state = torch.load(f)                    # a seekable, readable binary file object
    raw = ckptfs.read_file("hdfs://nn:8020/ckpt", "model.safetensors")   # memoryview, all stripes at once
    state = safetensors.torch.load(bytes(raw))
    state = ckptfs.load_safetensors("hdfs://nn:8020/ckpt", "model.safetensors", device="cuda")  # no detour

For several files of one checkpoint, open a :class:`~ckptfs.reader.Checkpoint` once and call its
``open``-like helpers, so the manifest is read once and the chunk pool is shared.
"""

from __future__ import annotations

import io
import os
from typing import Any

from bootseer import events
from bootseer.log import redact
from ckptfs.reader import Checkpoint, ReaderOptions, ReadState
from ckptfs.store import StoreOptions


class CkptFile(io.RawIOBase):
    """A read-only, seekable binary file over one file of a checkpoint.

    Sequential ``read``/``readinto`` calls trigger read-ahead across the stripes; one large read (a
    tensor's storage) is itself fetched from all stripes in parallel.
    """

    def __init__(self, ckpt: Checkpoint, path: str, *, owns_checkpoint: bool = False) -> None:
        super().__init__()
        self._ckpt = ckpt
        self._entry = ckpt.file(path)
        self._pos = 0
        self._state = ReadState()
        self._owns = owns_checkpoint
        self.name = path
        self._opened = events.now()  # open → close is one "checkpoint_load" in the start-up profile
        self._read = 0

    @property
    def size(self) -> int:
        return self._entry.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(b).cast("B")
        n = self._ckpt.readinto(self._entry, self._pos, view, self._state)
        self._pos += n
        self._read += n
        return n

    def readall(self) -> bytes:
        out = bytearray(max(0, self._entry.size - self._pos))
        n = self.readinto(out)
        return bytes(out[:n])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._entry.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            events.emit("checkpoint_load", self._opened, events.now(), component="ckptfs",
                        uri=redact(self._ckpt.store.uri), path=self._entry.path, bytes=self._read)
            if self._owns:
                self._ckpt.close()
        super().close()


def open(  # mirrors the builtin on purpose: ckptfs.open(uri, path)
    uri: str,
    path: str,
    *,
    store_options: StoreOptions | None = None,
    reader_options: ReaderOptions | None = None,
) -> CkptFile:
    """Open ``path`` of the checkpoint at ``uri`` for reading (closing it closes the checkpoint)."""
    ckpt = Checkpoint(uri, store_options=store_options, reader_options=reader_options)
    try:
        return CkptFile(ckpt, path, owns_checkpoint=True)
    except BaseException:
        ckpt.close()
        raise


def read_file(
    uri: str,
    path: str,
    *,
    out: bytearray | memoryview | None = None,
    store_options: StoreOptions | None = None,
    reader_options: ReaderOptions | None = None,
) -> bytearray | memoryview:
    """All bytes of ``path``, fetched from every stripe in parallel straight into ``out`` if given, else
    into a fresh page-aligned mapping (returned as a memoryview)."""
    with Checkpoint(uri, store_options=store_options, reader_options=reader_options) as ckpt:
        return ckpt.read_file(path, out)
