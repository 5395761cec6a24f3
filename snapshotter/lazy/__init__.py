"""Lazy layers: a verified chunk cache served over FUSE, under a loop device, under an erofs mount.

Modules, bottom up (each testable alone; only ``fusefs``, ``loop``, ``mount`` and ``layer`` touch the kernel):

* :mod:`~snapshotter.lazy.spec` — :class:`BlobSpec`, what the index says about a blob (and the auth hook);
  the chunk arithmetic is the index format's (:mod:`bootseer.index`).
* :mod:`~snapshotter.lazy.cache` — per-blob chunk cache: sparse file + crash-safe bitmap.
* :mod:`~snapshotter.lazy.fetcher` — HTTP range fetches: coalesced, de-duplicated, prioritised, verified.
* :mod:`~snapshotter.lazy.fusefs` — the FUSE mount with one file per blob (and the process/thread model).
* :mod:`~snapshotter.lazy.loop`, :mod:`~snapshotter.lazy.mount` — ioctl and mount(2) adapters.
* :mod:`~snapshotter.lazy.layer` — one layer's lifecycle: setup, fill, swap (``LOOP_CHANGE_FD``), teardown.
* :mod:`~snapshotter.lazy.manager` — :class:`LayerManager`: all layers, records, restart, cache budget, metrics.
* :mod:`~snapshotter.lazy.serve` — the same in a child process behind a unix socket (tests, debugging), and
  the server side of the control protocol (:mod:`bootseer.control`) the snapshotter daemon serves.
* :mod:`~snapshotter.lazy.index_reader` — :class:`IndexReader`: the image's BootSeer index, cached.
* :mod:`~snapshotter.lazy.prefetcher` — :class:`HotBlockPrefetcher`: replays recorded hot blocks on a mount.
* :mod:`~snapshotter.lazy.handler` — the snapshotter's RemoteHandler: CRI labels → index → LayerManager.
* :mod:`~snapshotter.lazy.daemon` — how ``bootseer snapshotter serve`` embeds all this (``remote_snapshots``).

The control socket: what the recorder and ``bootseer status`` use
-----------------------------------------------------------------
The snapshotter daemon (config ``remote_snapshots = true``) serves a root-only **control socket** at
``control_address`` (default ``<gRPC socket>.ctl``; the local stack's is ``StackInfo.snapshotter_control``).
Protocol: one JSON request per connection, ``{"op": ..., ...}`` → one JSON line ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": ..., "errno": ...}``; client: :class:`bootseer.control.Control`.

* **Recording** — ``{"op": "record_start", "path": "/abs/file.jsonl", "digests": ["sha256:<blob>", ...] | null,
  "hold_swap": true}`` → ``{"id": ..., "path": ...}``; ``{"op": "record_stop", "id": ...}`` →
  ``{"id", "path", "records"}``.  While it runs, every read that reaches FUSE for those blobs (all blobs if
  ``digests`` is null) is appended to ``path`` as an access-log line (:mod:`bootseer.accesslog`) in arrival
  order (FUSE files use direct I/O, so the loop
  device's reads arrive as issued; the erofs page cache above still hides re-reads: drop caches first).
  ``hold_swap`` keeps every layer behind FUSE for the duration (no LOOP_CHANGE_FD, and complete caches are
  mounted through FUSE too).  For a cold recording also pause background fill (``{"op": "set_fill",
  "enabled": false}``) and start from evicted caches (``{"op": "evict", "cap": 0}`` drops every cache no
  snapshot uses).  Blob digest → layer digest: the image's index (:class:`~snapshotter.lazy.index_reader.IndexReader`,
  ``LayerBlob.layer_digest`` / ``.blob.digest``).  In-process: :meth:`LayerManager.record` /
  :meth:`LayerManager.stop_recording`; the static config key ``access_log = PATH`` logs everything, always.
* **Prefetch** — ``{"op": "prefetch", "digest": "sha256:<blob>", "ranges": [[offset, length], ...],
  "concurrency": 4, "wait": seconds | null}`` → ``{"total", "fetched", "failed", "done"}`` (chunks).  Ranges
  are fetched in the order given (first access first), as kind ``prefetch`` (after demand reads, before
  background fill), never twice.  In-process: :meth:`LayerManager.prefetch` returns a
  :class:`~snapshotter.lazy.prefetchjob.Prefetch` job.  To prefetch on every lazy mount, pass a
  :class:`~snapshotter.lazy.handler.PrefetchHook` to :class:`~snapshotter.lazy.handler.LazyHandler`
  (``LazyService.start`` in :mod:`snapshotter.lazy.daemon` is where it is wired).  To see how the container's
  reads fared, call ``LayerManager.observe_demand(digest, fn(offset, length, local: bool))``: ``fn`` is called on
  the FUSE loop for every read of that blob (cheap, must not block; an observer that raises is dropped).
* **Status / metrics** — ``{"op": "status"}`` → ``{"layers": [...]}`` (``bootseer status --json`` prints the
  stable subset); ``{"op": "metrics"}`` → Prometheus text; ``{"op": "wait_swapped", "digest", "timeout"}``.
"""

from bootseer.index import chunk_digests
from snapshotter.lazy.errors import FetchError
from snapshotter.lazy.fetcher import FetchConfig
from snapshotter.lazy.layer import FillConfig, LayerBusy
from snapshotter.lazy.manager import LayerManager, LazyConfig
from snapshotter.lazy.spec import AuthHook, BlobSpec, no_auth

__all__ = ["AuthHook", "BlobSpec", "FetchConfig", "FetchError", "FillConfig", "LayerBusy", "LayerManager",
           "LazyConfig", "chunk_digests", "no_auth"]
