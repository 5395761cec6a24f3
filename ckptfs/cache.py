"""A size-capped, LRU, on-disk chunk cache keyed by the chunk's sha256.

Keyed by digest (not by checkpoint/path) so that a tensor file unchanged between two checkpoints — the
frozen embedding, the tokenizer, a shard that did not move — is fetched once per node, and so that an
entry can always be checked against the manifest before it is served.  One file per chunk under
``<dir>/<2 hex>/<digest>``; recency is the file's mtime (bumped on every hit), so the LRU order survives
a remount or a reboot without an index file that could go stale.  Writes go to a temporary name and are
renamed into place: a crash never leaves a half-written entry under a digest's name.

Several processes may share one directory; each keeps its own size accounting from a scan at start, so
the cap is approximate (each may overshoot by what the others added since) but never grows unbounded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

_TMP_MARK = ".tmp-"


class DigestCache:
    """Verified checkpoint chunks on local disk, named by their sha256 and evicted oldest first past ``capacity``
    bytes: a chunk shared by two checkpoints (or two files) is stored once, and a reader checks it again on use."""

    def __init__(self, directory: str | os.PathLike[str], capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("cache size must be positive")
        self.dir = Path(directory)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._used = 0
        self.hits = 0
        self.misses = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.dir / digest[:2] / digest

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []
        for sub in self.dir.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for p in sub.iterdir():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if _TMP_MARK in p.name:  # left by a crash mid-write
                    p.unlink(missing_ok=True)
                    continue
                found.append((st.st_mtime_ns, p.name, st.st_size))
        found.sort()
        for _, digest, size in found:
            self._entries[digest] = size
            self._used += size
        self._evict_locked()

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def get(self, digest: str) -> bytes | None:
        """The cached bytes, or ``None``.  The caller verifies them and calls :meth:`discard` if bad."""
        path = self._path(digest)
        with self._lock:
            known = digest in self._entries
        if not known:
            self.misses += 1
            return None
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:  # evicted by another process sharing the directory
            self._forget(digest)
            self.misses += 1
            return None
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
        self.hits += 1
        return data

    def get_into(self, digest: str, out: memoryview, hasher: Any = None) -> bool:
        """Fill ``out`` with the cached chunk (feeding ``hasher`` as it goes); False when absent."""
        with self._lock:
            size = self._entries.get(digest)
        if size is None:
            self.misses += 1
            return False
        if size != len(out):
            self.discard(digest)
            self.misses += 1
            return False
        path = self._path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                got = 0
                while got < len(out):
                    piece = out[got : got + (1 << 20)]
                    n = f.readinto(piece)
                    if not n:
                        break
                    if hasher is not None:
                        hasher.update(piece[:n])
                    got += n
            os.utime(path)
        except FileNotFoundError:  # evicted by another process sharing the directory
            self._forget(digest)
            self.misses += 1
            return False
        if got != len(out):
            self.discard(digest)
            self.misses += 1
            return False
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
        self.hits += 1
        return True

    def put(self, digest: str, data: bytes | memoryview) -> None:
        size = len(data)
        if size > self.capacity:
            return
        path = self._path(digest)
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or read-only cache disk must not fail the read that wanted to cache
        with self._lock:
            if digest not in self._entries:
                self._entries[digest] = size
                self._used += size
            self._evict_locked()

    def discard(self, digest: str) -> None:
        """Drop an entry, e.g. one whose bytes no longer match its digest."""
        self._forget(digest)
        with contextlib.suppress(FileNotFoundError):
            self._path(digest).unlink()

    def _forget(self, digest: str) -> None:
        with self._lock:
            size = self._entries.pop(digest, None)
            if size is not None:
                self._used -= size

    def _evict_locked(self) -> None:
        while self._used > self.capacity and self._entries:
            digest, size = self._entries.popitem(last=False)
            self._used -= size
            with contextlib.suppress(FileNotFoundError):
                self._path(digest).unlink()
