"""The baseline: one stream, one request at a time — what an HDFS-FUSE style reader does today.

It reads the same store and manifest as the striped reader, chunk after chunk in file order, each with
a single ranged read and the same sha256 check, with no read-ahead and no parallelism.  So on a store
whose every connection is rate-limited it is capped at one connection's rate, whatever the striping:
the benchmark's reference point.
"""

from __future__ import annotations

import hashlib

from ckptfs.errors import CorruptChunkError
from ckptfs.reader import load_manifest
from ckptfs.store import Store, StoreOptions, open_store


def read_file_single_stream(
    uri: str | Store,
    path: str,
    *,
    options: StoreOptions | None = None,
    verify: bool = True,
    limit: int | None = None,
) -> bytearray:
    """``path`` read through one stream (its first ``limit`` bytes, rounded up to whole chunks, if
    given); ``CorruptChunkError`` on a bad chunk."""
    store = uri if isinstance(uri, Store) else open_store(uri, options)
    try:
        manifest = load_manifest(store)
        f = manifest.file(path)
        chunks = f.chunks
        if limit is not None:
            chunks = chunks[: -(-limit // manifest.chunk_size)]
        out = bytearray(sum(c.length for c in chunks))
        view = memoryview(out)
        pos = 0
        for c in chunks:
            obj = manifest.objects[c.obj]
            data = store.read_range(obj.path, c.offset, c.length)
            if verify and hashlib.sha256(data).hexdigest() != c.digest:
                raise CorruptChunkError(f"chunk {c.digest[:16]} of {path} is corrupt ({obj.path} @ {c.offset})")
            view[pos : pos + c.length] = data
            pos += c.length
        return out
    finally:
        if not isinstance(uri, Store):
            store.close()
