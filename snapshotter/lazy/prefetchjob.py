"""A prefetch job: make given byte ranges of one lazy layer local, in the order given (glossary meaning 2 of
"prefetch" in docs/architecture.md).  :meth:`LazyLayer.prefetch <snapshotter.lazy.layer.LazyLayer.prefetch>`
starts one; the hot-block prefetcher and the control op ``prefetch`` call that.

The ranges are cut into runs of chunks in first-access order, each run all missing (fetch it as kind
``prefetch``, then push it into the page cache) or all local (push only: a second start of the image after
its layers were released).  ``concurrency`` workers take runs in that order; a worker may send several
missing runs in one multi-range request (``Fetcher.ensure_runs``) when they are due close together.

From its start to its end a job holds the daemon's background fill back (``Scheduler.hold_background``), and
past its end until the recorded start-up it serves has read for the last time: a start-up with prefetch
moves its hot set and its demand reads over the link, never fill requests between them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import Cancelled, FetchError
from snapshotter.lazy.fetcher import Fetcher
from snapshotter.lazy.scheduling import PREFETCH
from snapshotter.lazy.spec import BlobSpec, coalesce, split_ranges

_BATCH_RUNS = 16  # prefetch runs in one multi-range request at most (Fetcher.ensure_runs)


class Prefetch:
    """A running prefetch of byte ranges (in the given order); ``done`` is set when it ends."""

    def __init__(self, total: int) -> None:
        self.total = total  # chunks to prefetch
        self.fetched = 0  # chunks made local (by this prefetch, or by a reader it waited for)
        self.failed = 0
        self.warmed = 0  # bytes pushed into the kernel's page cache of the FUSE file (see fusefs)
        self.done = threading.Event()
        self.started = time.monotonic()
        self.finished: float | None = None


def due_times(spec: BlobSpec, ranges: Sequence[Sequence[int]], start: float | None) -> dict[int, float]:
    """Chunk → when the start-up is expected to read it first: ``start`` + the range's recorded time (its
    optional third item, ns), earliest per chunk; empty without ``start``."""
    due_of: dict[int, float] = {}
    if start is not None:
        for r in ranges:
            if len(r) > 2:
                when = start + r[2] / 1e9
                for i in spec.chunks_for(r[0], r[1]):
                    due_of[i] = min(due_of.get(i, when), when)
    return due_of


def runs_to_do(spec: BlobSpec, cache: ChunkCache, ranges: Sequence[Sequence[int]],
               max_run_bytes: int) -> list[tuple[list[int], bool]]:
    """``(run of chunk indices, fetch it?)`` in first-access order, each run all missing or all local."""
    tasks: list[tuple[list[int], bool]] = []
    chunks = split_ranges([(r[0], r[1]) for r in ranges], spec)
    for run in coalesce(chunks, max(1, max_run_bytes // spec.chunk_size)):
        for local, part in itertools.groupby(run, cache.has):
            tasks.append((list(part), not local))
    return tasks


def batchable(first_due: float | None, due: float | None, window: float) -> bool:
    """Whether a run due at ``due`` may join a multi-range request admitted for ``first_due``.

    Only runs due within ``window`` seconds of each other: a request is admitted by its earliest run, and
    the requests in flight share the link, so a batch carrying runs due much later takes link share from runs
    due sooner (docs/bench/design-measurements.md).  Without recorded times (no schedule to keep) runs are
    batched in order."""
    if window <= 0:
        return False
    if first_due is None or due is None:
        return first_due is None and due is None
    return due - first_due <= window


def _due(run: list[int], due_of: dict[int, float]) -> float | None:
    return min((due_of[i] for i in run if i in due_of), default=None)


def start(spec: BlobSpec, cache: ChunkCache, fetcher: Fetcher, ranges: Sequence[Sequence[int]], *,
          concurrency: int, start_time: float | None, batch_window: float, cancel: threading.Event,
          warm: Callable[[list[int]], int], before: Callable[[], None], name: str
          ) -> tuple[Prefetch, list[threading.Thread]]:
    """Start a prefetch job: ``before()`` runs first when there is anything to do (the layer moves onto the
    page cache), ``warm(run)`` pushes a local run into the page cache (bytes pushed), ``cancel`` stops the
    workers.  Returns the job and its worker threads (started)."""
    due_of = due_times(spec, ranges, start_time)
    cap = fetcher.config.max_range_bytes
    tasks = runs_to_do(spec, cache, ranges, cap)
    job = Prefetch(sum(len(run) for run, fetch in tasks if fetch))
    release = fetcher.scheduler.hold_background(max(due_of.values(), default=None))
    try:
        if tasks:
            before()
    except BaseException:
        release()
        raise
    lock = threading.Lock()
    workers = max(1, min(concurrency, len(tasks) or 1))
    left = [workers]

    def worker() -> None:
        try:
            while not cancel.is_set():
                with lock:
                    if not tasks:
                        return
                    run, fetch = tasks.pop(0)
                    batch, n = [run], len(run)  # the next runs to fetch, up to one request's worth
                    first_due = _due(run, due_of)
                    while (fetch and tasks and tasks[0][1] and len(batch) < _BATCH_RUNS
                           and (n + len(tasks[0][0])) * spec.chunk_size <= cap
                           and batchable(first_due, _due(tasks[0][0], due_of), batch_window)):
                        batch.append(tasks.pop(0)[0])
                        n += len(batch[-1])
                if fetch:
                    try:
                        fetcher.ensure_runs(batch, PREFETCH, cancel=cancel, due=first_due)
                    except Cancelled:
                        return
                    except FetchError:
                        with lock:
                            job.failed += n
                        continue
                warmed = sum(warm(r) for r in batch)
                with lock:
                    job.fetched += n if fetch else 0
                    job.warmed += warmed
        finally:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                job.finished = time.monotonic()
                release()
                job.done.set()

    threads = []
    for k in range(workers):
        t = threading.Thread(target=worker, name=f"prefetch-{name}-{k}", daemon=True)
        threads.append(t)
        t.start()
    return job, threads
