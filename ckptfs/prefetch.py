"""Read a checkpoint's files into the page cache as soon as the mount is up, before the job opens them.

Why: a training job opens its checkpoint only after its image is pulled and its imports are done (seconds on a
cold node), and then waits for the whole read.  The mount exists from the job's first moment (the launcher
starts it beside the pull), so the store's bandwidth is idle exactly while the job is busy with everything
else.  ``bootseer ckptfs mount --prefetch PATTERN`` reads the matching files through the mount itself, the
kernel's page cache keeps the pages (the mount sets ``keep_cache``, a checkpoint never changes), and the job's
later reads are page-cache hits.  Run:ai's model streamer and nydus's prefetch start the same way: at mount.

Reading through the mount, not beside it: the pages must land in the *mount's* page cache, and the ordinary
read path already verifies every chunk, reads ahead in parallel stripes and pushes pages ahead of the reader
(:mod:`ckptfs.fusefs`).  ``sendfile`` to ``/dev/null`` makes the kernel fill the page cache without copying
the bytes to this process.

Bounded: only up to ``max_bytes`` (default half of the memory available when the mount starts), so a
checkpoint larger than the node's memory does not evict itself while it is being read; what is beyond the
bound is read when the job asks, as without prefetch.  A read error (a corrupt chunk after its retries, the
store gone) stops the prefetch and is logged: the job's own read of that part fails or succeeds on its own.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bootseer import events

log = logging.getLogger("ckptfs.prefetch")

_STEP = 64 << 20  # bytes per sendfile call: big enough to keep the reader's parallel read-ahead full


@dataclass(frozen=True)
class Planned:
    """One file to read ahead: its path in the checkpoint and how many of its first bytes."""

    path: str
    nbytes: int


def plan(files: Iterable[tuple[str, int]], patterns: Sequence[str], max_bytes: int) -> list[Planned]:
    """The files (path, size) matching any of ``patterns`` (``fnmatch``, against the path in the checkpoint;
    ``*`` = every file), in checkpoint order, cut off once ``max_bytes`` are planned (the last file partly)."""
    out: list[Planned] = []
    left = max(0, max_bytes)
    for path, size in files:
        if left == 0:
            break
        if not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            continue
        n = min(size, left)
        if n > 0:
            out.append(Planned(path, n))
            left -= n
    return out


def default_max_bytes() -> int:
    """Half of ``MemAvailable``: the prefetched pages must still be cached when the job reads them."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: prefetch nothing rather than risk evicting what the job is about to read


def read_into_page_cache(mountpoint: str, planned: Sequence[Planned]) -> int:
    """Read every planned file through the mount (the kernel keeps the pages); return the bytes read.

    Emits one ``prefetch`` event (component ``ckptfs mount``) for the whole run, so the start-up profile shows
    the checkpoint arriving beside the image pull and the imports."""
    t0 = events.now()
    done = 0
    status = "ok"
    try:
        with open(os.devnull, "wb") as null:
            for item in planned:
                fd = os.open(os.path.join(mountpoint, item.path), os.O_RDONLY)
                try:
                    done += _drain(fd, null.fileno(), item.nbytes)
                finally:
                    os.close(fd)
    except OSError as e:
        status = "error"
        log.warning("checkpoint prefetch stopped after %d bytes: %s", done, e)
    events.emit("prefetch", t0, events.now(), component="ckptfs mount", status=status, bytes=done,
                files=len(planned))
    log.info("prefetched %d bytes of %d file(s) into the page cache", done, len(planned))
    return done


def _drain(fd: int, null: int, nbytes: int) -> int:
    off = 0
    while off < nbytes:
        try:
            n = os.sendfile(null, fd, off, min(_STEP, nbytes - off))
        except OSError as e:
            if e.errno not in (22, 38):  # EINVAL/ENOSYS: no splice here; read instead (one copy)
                raise
            n = len(os.pread(fd, min(8 << 20, nbytes - off), off))
        if n == 0:
            break
        off += n
    return off
