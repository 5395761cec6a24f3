"""Lazy layers: a verified chunk cache served over FUSE, under a loop device, under an erofs mount.

Modules, bottom up (each testable alone; only ``fusefs``, ``loop``, ``mount`` and ``layer`` touch the kernel):

* :mod:`~snapshotter.lazy.spec` — :class:`BlobSpec`, what the index says about a blob (and the auth hook).
* :mod:`~snapshotter.lazy.cache` — per-blob chunk cache: sparse file + crash-safe bitmap.
* :mod:`~snapshotter.lazy.fetcher` — HTTP range fetches: coalesced, de-duplicated, prioritised, verified.
* :mod:`~snapshotter.lazy.fusefs` — the FUSE mount with one file per blob (and the process/thread model).
* :mod:`~snapshotter.lazy.loop`, :mod:`~snapshotter.lazy.mount` — ioctl and mount(2) adapters.
* :mod:`~snapshotter.lazy.layer` — one layer's lifecycle: setup, fill, swap (``LOOP_CHANGE_FD``), teardown.
* :mod:`~snapshotter.lazy.manager` — :class:`LayerManager`: all layers, records, restart, cache budget, metrics.
* :mod:`~snapshotter.lazy.serve` — the same in a child process behind a unix socket (tests, debugging).
"""

from snapshotter.lazy.fetcher import FetchConfig, FetchError
from snapshotter.lazy.layer import FillConfig, LayerBusy
from snapshotter.lazy.manager import LayerManager, LazyConfig
from snapshotter.lazy.spec import AuthHook, BlobSpec, chunk_digests, no_auth

__all__ = ["AuthHook", "BlobSpec", "FetchConfig", "FetchError", "FillConfig", "LayerBusy", "LayerManager",
           "LazyConfig", "chunk_digests", "no_auth"]
