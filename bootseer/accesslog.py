"""The access log: one JSON line per read that reached FUSE, what ``bootseer record`` turns into hot blocks.

Line format (JSON lines, in arrival order)::

    {"blob": "sha256:<EROFS blob digest>", "offset": 1048576, "length": 131072, "t_ns": 123456789}

``t_ns`` is ``time.monotonic_ns()`` of the daemon that served the read (only differences mean something).
Written by the snapshotter (:class:`AccessLogWriter`: a recording started over its control socket, or the
static ``access_log = PATH`` config key) and read by the recorder (:func:`read_access_log`).  A torn last
line (a daemon killed mid-write) is skipped on reading; any other malformed line is an error.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Access:
    """One read that reached FUSE: ``length`` bytes at ``offset`` of ``blob``, at daemon time ``t_ns``."""

    blob: str
    offset: int
    length: int
    t_ns: int

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Access:
        return cls(str(doc["blob"]), int(doc["offset"]), int(doc["length"]), int(doc["t_ns"]))


def format_line(blob: str, offset: int, length: int, t_ns: int) -> str:
    """One access as a log line (with its newline)."""
    return json.dumps({"blob": blob, "offset": offset, "length": length, "t_ns": t_ns}) + "\n"


class AccessLogWriter:
    """Appends access lines to ``path`` (buffered: it is written from the FUSE thread, which must not block),
    only for ``digests`` (None: every blob).  Thread-safe; :meth:`close` flushes and fsyncs."""

    def __init__(self, path: Path | str, digests: frozenset[str] | None = None) -> None:
        self.path = Path(path)
        self.digests = digests
        self.records = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()

    def write(self, blob: str, offset: int, length: int, t_ns: int) -> None:
        if self.digests is not None and blob not in self.digests:
            return
        line = format_line(blob, offset, length, t_ns)
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line)
            self.records += 1

    def close(self, *, sync: bool = True) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                if sync:
                    os.fsync(self._fh.fileno())
                self._fh.close()


def read_access_log(path: str, blobs: Iterable[str] | None = None) -> list[Access]:
    """The accesses logged in ``path`` (of ``blobs`` only, if given), in log order (see the module doc)."""
    want = set(blobs) if blobs is not None else None
    out: list[Access] = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            a = Access.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            if n == len(lines):  # unterminated last line
                continue
            raise ValueError(f"{path}:{n}: bad access record: {e}") from e
        if want is None or a.blob in want:
            out.append(a)
    return out
