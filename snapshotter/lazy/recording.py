"""Access recording in the daemon: the static access log and the recordings started over the control socket.

Both write the access-log format of :mod:`bootseer.accesslog`.  While a recording with ``hold_swap`` runs,
no layer leaves FUSE (no swap, and complete caches are mounted through FUSE too), so every read that misses
the erofs page cache is seen; drop the page cache first for a cold run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bootseer.accesslog import AccessLogWriter
from snapshotter.lazy.fusefs import BlobFS
from snapshotter.lazy.spec import digest_of_name

log = logging.getLogger("bootseer.lazy")


class Recording:
    """An access log being written for a recording started over the control socket."""

    def __init__(self, rid: str, path: Path, digests: frozenset[str] | None, hold_swap: bool) -> None:
        self.id = rid
        self.hold_swap = hold_swap
        self.started_ns = time.monotonic_ns()
        self.log = AccessLogWriter(path, digests)  # digests None: every blob

    @property
    def path(self) -> Path:
        return self.log.path

    @property
    def digests(self) -> frozenset[str] | None:
        return self.log.digests

    @property
    def records(self) -> int:
        return self.log.records

    def close(self) -> dict[str, Any]:
        self.log.close()
        return {"id": self.id, "path": str(self.path), "records": self.records}


class Recordings:
    """The recordings of one daemon, and its static access log (``access_log = PATH``: every read, for as
    long as the daemon runs).  Installs itself as the FUSE file system's access-log hook while either is
    active, and only then: the hook makes FUSE serve files with direct I/O (see :mod:`~snapshotter.lazy.fusefs`)."""

    def __init__(self, fs: BlobFS, static: AccessLogWriter | None = None) -> None:
        self._fs = fs
        self._static = static
        self._lock = threading.Lock()
        self._active: dict[str, Recording] = {}
        fs.access_log = self._log if static is not None else None

    def start(self, path: Path | str, digests: Iterable[str] | None = None, *, hold_swap: bool = True) -> Recording:
        """Start logging every FUSE read (of ``digests``, or of every blob) to ``path``; several may run."""
        with self._lock:
            rid = f"rec-{time.monotonic_ns():x}-{len(self._active)}"
        rec = Recording(rid, Path(path), frozenset(digests) if digests is not None else None, hold_swap)
        with self._lock:
            self._active[rid] = rec
        self._fs.access_log = self._log
        log.info("recording FUSE accesses to %s (%s)%s", path, "all blobs" if digests is None else
                 ", ".join(d[:19] for d in rec.digests or ()), "; swaps held" if hold_swap else "")
        return rec

    def stop(self, rid: str) -> dict[str, Any]:
        with self._lock:
            rec = self._active.pop(rid, None)
            if not self._active:
                self._fs.access_log = self._log if self._static is not None else None
        if rec is None:
            raise KeyError(f"no recording {rid!r}")
        out = rec.close()
        log.info("recording %s ended: %d reads logged to %s", rid, out["records"], rec.path)
        return out

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def swap_held(self) -> bool:
        with self._lock:
            return any(r.hold_swap for r in self._active.values())

    def _log(self, name: str, offset: int, length: int, t_ns: int) -> None:
        """The FUSE thread's hook (``name``: the blob's FUSE file): must not block (appends to buffered local
        files)."""
        digest = digest_of_name(name)  # the log speaks of blobs, whatever the layer key
        if self._static is not None:
            self._static.write(digest, offset, length, t_ns)
        with self._lock:
            recs = list(self._active.values())
        for r in recs:
            r.log.write(digest, offset, length, t_ns)
