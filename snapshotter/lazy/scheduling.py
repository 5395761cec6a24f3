"""Admission of range requests across all blobs of a daemon: demand reads first, then prefetch, then
background fill.

**Demand first.**  All fetchers of a daemon share a :class:`Scheduler`: a bounded number of requests in
flight, demand reads always admitted first, prefetch next, background fill only when no demand read is
waiting or running, and through a token bucket that caps its bandwidth.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from snapshotter.lazy.errors import Cancelled, FetchError

DEMAND = "demand"
PREFETCH = "prefetch"
BACKGROUND = "background"
KINDS = (DEMAND, PREFETCH, BACKGROUND)


class TokenBucket:
    """Bandwidth cap for background fill: ``rate`` bytes/s with a burst of ``burst`` bytes.

    A request larger than the burst is admitted when the bucket is full and drives it negative, so the
    long-run rate holds without splitting requests."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0) / 4
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int, cancel: threading.Event | None = None) -> None:
        if not self.rate:
            return
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(n, self.burst):
                    self._tokens -= n
                    return
                wait = (min(n, self.burst) - self._tokens) / self.rate
            if cancel is not None:
                if cancel.wait(wait):
                    raise Cancelled("cancelled while rate-limited")
            else:
                time.sleep(wait)  # rate limiting, not synchronisation


class Scheduler:
    """Admission of range requests across all blobs of a daemon: demand > prefetch > background.

    ``max_requests`` bounds requests in flight; one slot is kept for demand reads (prefetch and background
    may not take the last one), background fill runs at most ``background_requests`` at once, through
    ``bucket``, and only while no demand read or prefetch is waiting or in flight and none has been for
    ``background_idle`` seconds, and no prefetch job holds it back (:meth:`hold_background`: a job from its
    start to its end, then the idle window; and until the recorded start-up it serves is over).  Reads
    served from the local cache count as activity too (see :meth:`note_read`): a start-up whose hot blocks
    were prefetched makes no fetches at all, and a fill started then competes with it for the CPU (hashing,
    copying) and the disk.  So that a workload reading without pause still gets its layers completed (and
    off FUSE), a fill held back by reads alone for ``background_max_wait`` seconds proceeds anyway.

    Why the idle window: a container's start-up reads come in bursts separated by short compute gaps.  A
    background request started in such a gap holds the link (a 4 MiB run is 0.17 s at 200 Mbit/s) when the
    next demand read arrives, and over a whole start-up the fill took half the link from the reads the
    container was waiting for.  Filling once the start-up has gone quiet costs nothing that matters.

    Why prefetch *jobs* hold it, not only their requests: between two requests of a job (its workers push
    the chunks they got into the page cache, the layer moves onto the page cache, a batch waits for the
    next), nothing is waiting or in flight, and without ``background_idle`` a fill request took the link
    there.  And once a job is done the start-up it served is not: the container reads what was pushed into
    the page cache without reaching FUSE (no :meth:`note_read`), so "quiet" says nothing then — the
    recording says how long the start-up reads, and fill waits for that (at most ``background_max_wait``
    seconds from the job's start, so a wrong recording cannot hold fill back for long)."""

    def __init__(self, max_requests: int = 8, background_requests: int = 2,
                 background_rate: float | None = None, background_idle: float = 0.0,
                 background_max_wait: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_requests = max(2, max_requests)
        self.background_requests = max(1, background_requests)
        self.background_idle = max(0.0, background_idle)
        self.bucket = TokenBucket(background_rate)
        self._clock = clock
        self._last_foreground = -float("inf")  # when a demand read or prefetch last started or ended
        self._last_read = -float("inf")  # when a read was last served from the local cache
        self.background_max_wait = background_max_wait
        self._held_by_reads_since: float | None = None
        self._cond = threading.Condition()
        self._active = dict.fromkeys(KINDS, 0)
        self._waiting = dict.fromkeys(KINDS, 0)
        self._prefetch_due: list[float] = []  # due times of the prefetch requests waiting for a slot
        self._jobs = 0  # prefetch jobs running (hold_background)
        self._held_until = -float("inf")  # background held back until then (the recorded start-ups' ends)

    def _may_start(self, kind: str, due: float | None = None) -> bool:
        total = sum(self._active.values())
        if kind == DEMAND:
            return total < self.max_requests
        if kind == PREFETCH:
            return (total < self.max_requests - 1 and not self._waiting[DEMAND]
                    and (due is None or not self._prefetch_due or due <= min(self._prefetch_due)))
        if not (total < self.max_requests - 1 and self._active[BACKGROUND] < self.background_requests):
            return False
        return self._quiet()

    def _quiet(self) -> bool:
        """Whether background work (a fill request, hashing a completed layer) may run now, slots aside."""
        if (self._jobs or self._waiting[DEMAND] or self._waiting[PREFETCH] or self._active[DEMAND]
                or self._active[PREFETCH]):
            return False
        now = self._clock()
        if now - self._last_foreground < self.background_idle or now < self._held_until:
            return False
        if now - self._last_read >= self.background_idle:
            self._held_by_reads_since = None
            return True
        if self._held_by_reads_since is None:
            self._held_by_reads_since = now
        return now - self._held_by_reads_since >= self.background_max_wait

    def note_mount(self) -> None:
        """A lazy layer was just mounted: a container is about to start reading, so background fill waits
        ``background_idle`` as after a foreground fetch (without this every new layer's fill took the
        link for one run before the container's first read, or the hot-block prefetch, came in)."""
        with self._cond:
            self._last_foreground = max(self._last_foreground, self._clock())

    def hold_background(self, until: float | None = None) -> Callable[[], None]:
        """A prefetch job starts: background fill waits until the returned function is called (the job's
        end; the idle window counts from then) and, with ``until`` (a clock value: when the recorded
        start-up the job serves reads for the last time), until then — at most ``background_max_wait``
        seconds from now.  The function may be called more than once."""
        released = [False]
        with self._cond:
            self._jobs += 1
            if until is not None:
                self._held_until = max(self._held_until, min(until, self._clock() + self.background_max_wait))

        def release() -> None:
            with self._cond:
                if released[0]:
                    return
                released[0] = True
                self._jobs -= 1
                self._last_foreground = max(self._last_foreground, self._clock())
                self._cond.notify_all()

        return release

    def wait_quiet(self, cancel: threading.Event) -> bool:
        """Block until background work may run (:meth:`_quiet`, no slot taken: hashing a layer that demand
        reads or prefetch completed is CPU a start-up would otherwise share); False if ``cancel`` was set."""
        with self._cond:
            while not self._quiet():
                if cancel.is_set():
                    return False
                self._cond.wait(0.5)  # time-based conditions (the idle window) are re-checked
        return not cancel.is_set()

    def note_read(self) -> None:
        """A read was served from the local cache (called on every FUSE read; a plain store, no lock)."""
        self._last_read = self._clock()

    @contextlib.contextmanager
    def slot(self, kind: str, nbytes: int, deadline: float | None = None,
             cancel: threading.Event | None = None, due: float | None = None) -> Iterator[None]:
        """Hold one request slot of ``kind``.  Prefetch requests are admitted earliest ``due`` first (a
        ``time.monotonic()`` value: when the container is expected to read the bytes; None: now), across
        all layers and images — so the bytes a start-up needs next are on the link next, whichever layer
        they live in."""
        if kind == BACKGROUND:
            self.bucket.acquire(nbytes, cancel)
        if kind == PREFETCH and due is None:
            due = self._clock()
        with self._cond:
            self._waiting[kind] += 1
            if kind == PREFETCH:
                self._prefetch_due.append(due)  # type: ignore[arg-type]
            try:
                while not self._may_start(kind, due):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled while queued")
                    timeout = 0.5 if cancel is not None else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise FetchError("timed out waiting for a request slot", "timeout")
                        timeout = min(timeout or left, left)
                    self._cond.wait(timeout)
                self._active[kind] += 1
                if kind != BACKGROUND:
                    self._last_foreground = self._clock()
            finally:
                self._waiting[kind] -= 1
                if kind == PREFETCH:
                    self._prefetch_due.remove(due)  # type: ignore[arg-type]
                self._cond.notify_all()  # a waiter's priority may have changed who can start
        try:
            yield
        finally:
            with self._cond:
                self._active[kind] -= 1
                if kind != BACKGROUND:
                    self._last_foreground = self._clock()
                self._cond.notify_all()

    def demand_busy(self) -> bool:
        with self._cond:
            return bool(self._active[DEMAND] or self._waiting[DEMAND])
