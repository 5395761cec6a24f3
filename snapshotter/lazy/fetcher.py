"""Getting chunks from the registry: range GETs, coalesced, de-duplicated, prioritised, verified.

Everything here is plain blocking Python run in worker threads (never on the FUSE loop), testable against
any HTTP server.  The rules, and why:

* **Verified or nothing.**  Every chunk is hashed against the spec before it is stored or returned.  A
  mismatch is logged (blob, chunk, expected and received digests), counted, retried like a transport
  error, and in the end raised as :class:`FetchError` (EIO) — the reader gets an error, never wrong bytes,
  and nothing unverified reaches the cache.
* **One fetch per missing chunk.**  A chunk being fetched is registered as *in flight*; a second reader of
  it waits for that fetch instead of issuing its own (containers read the same hot files from many
  processes at once, and the kernel's read-ahead overlaps the reads that follow it).
* **Coalescing.**  Adjacent missing chunks claimed by one caller go out as one range request, up to
  ``max_range_bytes``: fewer round trips for sequential reads and background fill.  Prefetch, whose runs
  follow the recorded first-access order and so are scattered over the blob, sends its next runs as one
  *multi-range* request where the registry serves ``multipart/byteranges`` (:meth:`Fetcher.ensure_runs`;
  only runs due close together, see :meth:`LazyLayer.prefetch <snapshotter.lazy.layer.LazyLayer.prefetch>`):
  the torch start-up's registry CPU fell by 35–40 % at the same start-up time.
* **Chunks as they arrive.**  Each chunk of a response is verified, stored and handed to its waiters as
  soon as its bytes are in, not when the whole response is.
* **Demand first.**  All fetchers of a daemon share a :class:`Scheduler`: a bounded number of requests in
  flight, demand reads always admitted first, prefetch next, background fill only when no demand read is
  waiting or running, and through a token bucket that caps its bandwidth.
* **Bounded time.**  A demand read has a deadline (``read_timeout``); connect and socket-read timeouts are
  clipped to it and the body is read against it, so a registry that hangs costs the reader EIO after the
  deadline, not a hung process.  A chunk whose demand read just failed fails again at once for
  ``failure_memo`` seconds: the kernel retries a failed read-ahead page with a synchronous read, which would
  otherwise wait out a second deadline.
* **Transient errors are retried, within the deadline.**  Registries under a fleet's load answer 429 and
  5xx, reset connections and cut bodies off; a start-up makes hundreds of range requests, so with 20 % of
  them failing a fixed handful of attempts still loses some read, and one lost read is an import that dies.
  So a demand read retries a transient error (5xx but 501/505, 408, 429, a reset or refused connection, a
  timeout, a body cut short) with jittered exponential backoff for as long as its deadline allows, a
  prefetch or background fetch for ``retry_window`` seconds after its first failure; each retry goes to the
  next endpoint where there are several (mirrors from ``hosts.toml``, then the registry).  ``Retry-After``
  (seconds or a date) holds back requests to *that* endpoint until then; a read whose deadline comes first
  fails at once rather than waiting for nothing.  Not transient: any other 4xx (a 404 moves on to the next
  endpoint, then fails; it is never retried), a malformed answer, and a chunk that failed verification —
  that one is retried at most ``retries`` times, then EIO for the read that needs it, never wrong bytes.
* **Down means down, not one failure.**  Every request's outcome is reported to the :class:`HttpClient`
  all blobs share, and any bytes arriving from the endpoints clear their record.  They are marked *down*
  for ``failure_memo`` seconds when, with no bytes arriving from them meanwhile, either
  ``down_after_failures`` distinct reads (of any blob and kind) had requests fail over at least
  ``down_after_seconds``, or a demand read spent its whole deadline failing.  While they are down, every
  demand read of a missing chunk, of any blob served by those endpoints, fails at once, and every retry
  loop gives up: one ``read(2)`` of a file makes the kernel issue several read-ahead requests for
  different chunks, one after the other through the loop device; without this each would wait out its own
  deadline and the reader would see EIO only after several times ``read_timeout``.  Distinct reads, not
  requests: one read retrying through a run of bad luck is no outage (at 25 % errors, five failures in a
  row come once in a thousand requests, and a start-up makes more; marking the registry down on that, or
  on one read giving up, cost a start-up every read for a second).  A corrupt chunk does not count: the
  registry answered.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter

from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.spec import AuthHook, BlobSpec, coalesce, no_auth

_T = TypeVar("_T")

log = logging.getLogger("bootseer.lazy.fetch")

DEMAND = "demand"
PREFETCH = "prefetch"
BACKGROUND = "background"
KINDS = (DEMAND, PREFETCH, BACKGROUND)


class FetchError(OSError):
    """A chunk could not be fetched and verified in time.  Always EIO: that is what the reader sees.

    ``reason`` names the failure for metrics (``http_503``, ``reset``, ``timeout``, ``cut``, ``corrupt``, …);
    ``transient``: worth retrying (see the module doc); ``retry_after``: seconds the endpoint asked us to
    wait (``Retry-After``)."""

    def __init__(self, message: str, reason: str = "other", *, transient: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(errno.EIO, message)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class Cancelled(FetchError):
    """The fetch was abandoned because its layer is going away (background fill, prefetch)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "cancelled", transient=False)


class CorruptChunk(FetchError):
    """Bytes arrived but failed sha256 verification (the registry is reachable; the data is wrong)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "corrupt")


def transient_status(status: int) -> bool:
    """A status worth asking again for: overload and gateway errors, not a request that is wrong."""
    return status in (408, 429) or (status >= 500 and status not in (501, 505))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from now that a ``Retry-After`` header (delta-seconds or an HTTP date) asks for, capped at an
    hour; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(3600.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(3600.0, max(0.0, when.timestamp() - (time.time() if now is None else now)))


def status_error(url: str, what: str, resp: requests.Response) -> FetchError:
    """The :class:`FetchError` for an unexpected HTTP status."""
    code = resp.status_code
    after = retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
    return FetchError(f"GET {url} {what}: HTTP {code}" + (f" (Retry-After {after:.0f}s)" if after else ""),
                      f"http_{code}", transient=transient_status(code), retry_after=after)


def transport_error(url: str, what: str, e: requests.RequestException) -> FetchError:
    """The :class:`FetchError` for an exception of ``requests`` (connecting, sending or reading a body)."""
    text = str(e)
    if isinstance(e, requests.Timeout) or "timed out" in text.lower():
        reason = "timeout"
    elif isinstance(e, requests.exceptions.ChunkedEncodingError):
        reason = "cut"  # the connection ended inside the body
    elif isinstance(e, requests.ConnectionError):
        reason = "reset"
    else:  # an invalid URL, too many redirects, …: asking again gives the same answer
        return FetchError(f"GET {url} {what}: {type(e).__name__}: {text}", "other", transient=False)
    return FetchError(f"GET {url} {what}: {type(e).__name__}: {text}", reason)


class _Memo(FetchError):
    """A read refused at once: the registry is marked down, or the chunk failed a moment ago."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "down", transient=False)


@dataclass
class _RetryState:
    """The retry budget of one :meth:`Fetcher.ensure` call."""

    until: float | None  # no retry may start after this (demand: the read's deadline)
    began: float = field(default_factory=time.monotonic)
    attempt: int = 0  # retries so far
    corrupt: int = 0  # attempts that ended in a chunk failing verification


@dataclass
class FetchConfig:
    max_range_bytes: int = 8 << 20  # coalescing cap of one range request
    connect_timeout: float = 5.0
    io_timeout: float = 10.0  # longest silence of the server inside one request
    read_timeout: float = 30.0  # whole budget of a demand read, retries of transient errors included
    retry_window: float = 30.0  # prefetch / background: retry transient errors this long after the first
    retries: int = 3  # extra attempts after a chunk failed verification (transient errors: see above)
    backoff: float = 0.005  # first retry delay (jittered: 50-100 %); doubles, capped by backoff_max
    backoff_max: float = 2.0
    failure_memo: float = 1.0  # a chunk whose demand read failed, and endpoints marked down, fail fast this long
    down_after_failures: int = 3  # distinct reads with failed requests that mark the endpoints down ...
    down_after_seconds: float = 2.0  # ... when nothing arrived for this long since the first failure
    tls_verify: bool | str = True  # False, True, or a CA bundle path


class MetricsSink(Protocol):
    """What the fetcher reports (the manager's Prometheus metrics implement it)."""

    def fetched(self, kind: str, nbytes: int, seconds: float) -> None: ...

    def corrupt(self, spec: BlobSpec, index: int) -> None: ...

    def failed(self, kind: str) -> None: ...

    def retried(self, kind: str, reason: str) -> None: ...

    def marked_down(self) -> None: ...


@dataclass
class FetchStats:
    """Per-blob counters, for ``bootseer status`` and the tests."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)  # retries by the reason of the failure before
    corrupt: int = 0  # chunks that failed verification (each failed attempt counts)
    failures: int = 0  # ensure() calls that ended in FetchError
    dedup_waits: int = 0  # times a caller waited on a fetch another caller had in flight

    def as_dict(self) -> dict[str, object]:
        return {"bytes": dict(self.bytes), "requests": dict(self.requests), "retries": self.retries,
                "retry_reasons": dict(self.retry_reasons), "corrupt": self.corrupt, "failures": self.failures,
                "dedup_waits": self.dedup_waits}


# ----------------------------------------------------------------------------------------- scheduling
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
    ``background_idle`` seconds.  Reads served from the local cache count as activity too (see
    :meth:`note_read`): a start-up whose hot blocks were prefetched makes no fetches at all, and a fill
    started then competes with it for the CPU (hashing, copying) and the disk.  So that a workload reading
    without pause still gets its layers completed (and off FUSE), a fill held back by reads alone for
    ``background_max_wait`` seconds proceeds anyway.

    Why the idle window: a container's start-up reads come in bursts separated by short compute gaps.  A
    background request started in such a gap holds the link (a 4 MiB run is 0.17 s at 200 Mbit/s) when the
    next demand read arrives, and over a whole start-up the fill took half the link from the reads the
    container was waiting for.  Filling once the start-up has gone quiet costs nothing that matters."""

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

    def _may_start(self, kind: str, due: float | None = None) -> bool:
        total = sum(self._active.values())
        if kind == DEMAND:
            return total < self.max_requests
        if kind == PREFETCH:
            return (total < self.max_requests - 1 and not self._waiting[DEMAND]
                    and (due is None or not self._prefetch_due or due <= min(self._prefetch_due)))
        if not (total < self.max_requests - 1 and self._active[BACKGROUND] < self.background_requests
                and not self._waiting[DEMAND] and not self._waiting[PREFETCH] and not self._active[DEMAND]
                and not self._active[PREFETCH]):
            return False
        now = self._clock()
        if now - self._last_foreground < self.background_idle:
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


# ---------------------------------------------------------------------------------------------- HTTP
@dataclass
class _Health:
    """Outcome of the recent requests to one endpoint set (see the module doc, "Down means down")."""

    failures: int = 0  # failed requests since the last success
    readers: set[int] = field(default_factory=set)  # the reads (ensure calls) that made them
    since: float = 0.0  # when the first of them was seen
    until: float = 0.0  # marked down until then (0: not marked)
    marked: float = 0.0  # when it was marked down
    why: str = ""


class HttpClient:
    """One ``requests.Session`` per thread (sessions are not documented thread-safe) plus the auth hook, and
    what all blobs share about their endpoints: which are down, which asked us to come back later."""

    def __init__(self, auth: AuthHook = no_auth, tls_verify: bool | str = True, pool: int = 4) -> None:
        self.auth = auth
        self.tls_verify = tls_verify
        self._pool = pool
        self._local = threading.local()
        self._health: dict[tuple[str, ...], _Health] = {}  # endpoint set → recent outcomes
        self._last_ok: dict[tuple[str, ...], float] = {}  # endpoint set → when bytes last arrived
        self._not_before: dict[str, float] = {}  # endpoint → time.monotonic() its Retry-After ends
        self._down_lock = threading.Lock()

    # -- outages (see the module doc: one outage costs a reader one deadline, not one per chunk) ----------
    def request_failed(self, endpoints: Sequence[str], reader: int, why: str, *, after: int, span: float,
                       seconds: float) -> bool:
        """A request to ``endpoints`` made by read ``reader`` failed transiently.  Marks them down for
        ``seconds`` once ``after`` distinct reads have had requests fail, the first failure seen ``span``
        seconds ago or more, with no bytes arriving since; True if this call marked them down.

        Distinct reads, not requests: one read retrying through a run of bad luck (at 25 % errors five in a
        row come every thousand requests, and a start-up makes more) is not an outage — while it retries,
        others' reads succeed, or there are none.  Seen, not begun: a request slow to fail (a big range
        through a loaded mirror) must not make a window of its own."""
        now = time.monotonic()
        with self._down_lock:
            h = self._health.setdefault(tuple(endpoints), _Health())
            if h.failures == 0:
                h.since = now
            h.failures += 1
            h.readers.add(reader)
            h.why = why
            return self._mark(h, now, len(h.readers) >= max(1, after) and now - h.since >= span, seconds)

    def read_gave_up(self, endpoints: Sequence[str], began: float, why: str, *, seconds: float) -> bool:
        """A demand read that began at ``began`` ran out of time (its deadline) on
        transient failures of ``endpoints``: marks them down for ``seconds`` if no bytes arrived from them
        since it began; True if this call marked them down.  (The kernel issues a file's read-ahead requests
        one after the other: without this each would wait out its own deadline before the distinct reads
        added up.  A whole deadline of failures with nothing arriving is no run of bad luck: at 25 % errors
        that takes a dozen failures in a row.)"""
        key = tuple(endpoints)
        if self._last_ok.get(key, -1.0) >= began:
            return False
        now = time.monotonic()
        with self._down_lock:
            h = self._health.get(key)
            if h is None or h.failures == 0:
                return False
            h.why = why
            return self._mark(h, now, True, seconds)

    @staticmethod
    def _mark(h: _Health, now: float, due: bool, seconds: float) -> bool:
        if due and seconds > 0 and now >= h.until:
            h.until, h.marked = now + seconds, now
            return True
        return False

    def request_succeeded(self, endpoints: Sequence[str]) -> None:
        """Bytes arrived from ``endpoints`` (a verified chunk, even of a request cut off later): whatever
        outage there was is over.  Called for every chunk, so the common case takes no lock."""
        key = tuple(endpoints)
        self._last_ok[key] = time.monotonic()  # (a plain store: this runs for every chunk)
        if key not in self._health:
            return
        with self._down_lock:
            self._health.pop(key, None)

    def mark_up(self, endpoints: Sequence[str]) -> None:
        self.request_succeeded(endpoints)

    def down(self, endpoints: Sequence[str]) -> str | None:
        """Why ``endpoints`` count as unreachable right now, or None."""
        now = time.monotonic()
        with self._down_lock:
            h = self._health.get(tuple(endpoints))
            if h is None or now >= h.until:
                return None
            n, first, marked, until, why = h.failures, h.since, h.marked, h.until, h.why
        return (f"{why} (registry unreachable: {n} requests failed and none answered over {marked - first:.1f}s, "
                f"marked down {now - marked:.1f}s ago; retrying after {until - now:.1f}s)")

    def hold(self, endpoint: str, seconds: float) -> None:
        """``endpoint`` answered ``Retry-After: seconds``: no request goes there before then."""
        with self._down_lock:
            self._not_before[endpoint] = max(self._not_before.get(endpoint, 0.0), time.monotonic() + seconds)

    def held(self, endpoint: str) -> float:
        """Seconds until ``endpoint`` may be asked again (0: now)."""
        with self._down_lock:
            until = self._not_before.get(endpoint)
            if until is None:
                return 0.0
            left = until - time.monotonic()
            if left <= 0:
                del self._not_before[endpoint]
                return 0.0
            return left

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self._pool, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.verify = self.tls_verify
            s.trust_env = False  # proxies from the environment must not silently reroute blob reads
            self._local.session = s
        return s


# ------------------------------------------------------------------------------------------- fetcher
_current = threading.local()  # .reader: the _RetryState of the ensure() call this thread is serving
class _Pending:
    """A chunk in flight: waiters block on ``done``; ``error`` says how it ended if it failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: FetchError | None = None


class Fetcher:
    """Fetches the chunks of one blob into its :class:`ChunkCache`."""

    def __init__(self, spec: BlobSpec, cache: ChunkCache, *, scheduler: Scheduler, client: HttpClient,
                 config: FetchConfig | None = None, metrics: MetricsSink | None = None) -> None:
        self.spec = spec
        self.cache = cache
        self.scheduler = scheduler
        self.client = client
        self.config = config or FetchConfig()
        self.metrics = metrics
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[int, _Pending] = {}
        self._failed: dict[int, tuple[float, FetchError]] = {}
        self._endpoint = 0  # index into spec.endpoints() of the one that last worked
        self._multi_range = True  # until the registry answers a multi-range request otherwise

    # -- public --------------------------------------------------------------------------------------
    def read(self, offset: int, length: int, kind: str = DEMAND) -> bytes:
        """Bytes ``[offset, offset+length)`` of the blob (clamped to its end), fetching what is missing."""
        length = max(0, min(length, self.spec.size - offset))
        if length == 0:
            return b""
        chunks = self.spec.chunks_for(offset, length)
        if not self.cache.has_all(chunks):
            self.ensure(chunks, kind)
        return self.cache.read(offset, length)

    def ensure(self, indices: Sequence[int], kind: str = DEMAND, *, deadline: float | None = None,
               cancel: threading.Event | None = None, due: float | None = None) -> None:
        """Return once every chunk in ``indices`` is in the cache; raise :class:`FetchError` otherwise.

        Missing chunks go out in coalesced runs; a chunk another caller is fetching right now is waited
        for, not fetched twice.  A chunk is claimed only once its request holds a scheduler slot: a fetch
        still queued for a slot claims nothing, so a demand read or a prefetch never waits on a background
        fetch that is itself queued behind them (that priority inversion cost the start-up benchmark 2 s:
        prefetch waited for chunks the fill had claimed and could not fetch until prefetch was over)."""
        cap = max(1, self.config.max_range_bytes // self.spec.chunk_size)
        self._ensure(indices, kind, deadline, cancel, due,
                     lambda todo: [[run] for run in coalesce(sorted(todo), cap)])

    def ensure_runs(self, runs: Sequence[Sequence[int]], kind: str = PREFETCH, *,
                    cancel: threading.Event | None = None, due: float | None = None) -> None:
        """Like :meth:`ensure` for several runs of chunks (prefetch: the next runs in first-access order),
        fetched in *one* request slot with *one* multi-range request (``Range: bytes=a-b,c-d,…``) where the
        registry answers those with ``multipart/byteranges``.  Why: docker-registry 2.8 spends ~4 ms of CPU
        on every request whatever its size (measured: 256 requests of 128 KiB cost it 1.05 CPU-s, the same
        bytes in 32 requests of 8 ranges 0.25 CPU-s), and on a node every request costs this daemon too.
        A registry that answers otherwise (a CDN or object store behind a redirect answers ``200`` with the
        whole blob, or one range) is asked one range per request from then on: the body is never read."""
        order = [list(r) for r in runs if r]
        self._ensure([i for r in order for i in r], kind, None, cancel, due,
                     lambda todo: [[[i for i in r if i in todo] for r in order if any(i in todo for i in r)]])

    def _ensure(self, indices: Sequence[int], kind: str, deadline: float | None, cancel: threading.Event | None,
                due: float | None, batches: Callable[[set[int]], list[list[list[int]]]]) -> None:
        """The attempt loop of :meth:`ensure` / :meth:`ensure_runs`: each attempt fetches ``batches(todo)``,
        each batch (a list of runs) in one request slot; between attempts :meth:`_next_attempt` decides
        whether and when to try again."""
        if deadline is None and kind == DEMAND:
            deadline = time.monotonic() + self.config.read_timeout
        todo = [i for i in indices if not self.cache.has(i)]
        if not todo:
            return
        last: FetchError | None = None
        retry = _RetryState(deadline)
        outer = getattr(_current, "reader", None)
        _current.reader = retry  # the read the requests below belong to (outage tracking counts reads)
        try:
            if kind == DEMAND:
                self._fail_fast(todo)
            while True:
                theirs: list[tuple[int, _Pending]] = []
                for batch in batches(set(todo)):
                    if deadline is not None and time.monotonic() >= deadline:
                        raise FetchError(f"timed out ({last.strerror if last else 'no answer'})", "timeout")
                    try:
                        theirs += self._fetch_runs(batch, kind, deadline, cancel, due)
                    except Cancelled:
                        raise
                    except FetchError as e:
                        last = e
                for i, p in theirs:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not p.done.wait(left):
                        raise FetchError(f"timed out waiting for chunk {i} fetched by another reader", "timeout")
                    if p.error is not None and not self.cache.has(i):
                        last = p.error  # their attempt failed: ours is the next one
                todo = [i for i in todo if not self.cache.has(i)]
                if not todo:
                    return
                self._next_attempt(last or FetchError("fetch failed"), kind, retry, cancel)
        except FetchError as e:
            self._failed_for_good(todo, kind, e, last, retry.began)
            raise
        finally:
            _current.reader = outer

    def _next_attempt(self, last: FetchError, kind: str, retry: _RetryState, cancel: threading.Event | None) -> None:
        """After a failed attempt: return when the next one may go out, or raise — the error is not worth
        retrying, a chunk failed verification ``retries`` times, the endpoints are marked down, or the wait
        (backoff, or the endpoints' ``Retry-After``) would end past the deadline."""
        if not last.transient:
            raise last
        if isinstance(last, CorruptChunk):
            retry.corrupt += 1
            if retry.corrupt > self.config.retries:
                raise last
        now = time.monotonic()
        down = self.client.down(self.spec.endpoints())
        if down is not None:
            raise _Memo(down)
        if retry.until is None:  # prefetch / background: a window from the first failure
            retry.until = now + self.config.retry_window
        retry.attempt += 1
        delay = min(self.config.backoff * 2 ** (retry.attempt - 1), self.config.backoff_max)
        delay *= 0.5 + random.random() / 2  # jitter: a fleet's nodes must not come back in step
        held = min(self.client.held(ep) for ep in self.spec.endpoints())  # Retry-After of every endpoint
        if held > delay:
            delay = held
        left = retry.until - now
        if delay >= left:
            asked = held > 0 and held >= left
            why = f"Retry-After {held:.1f}s" if asked else "no time left to retry"
            raise FetchError(f"{last.strerror} ({why}: {max(0.0, left):.1f}s left of the deadline)",
                             last.reason if asked else "timeout")
        with self._lock:
            self.stats.retries += 1
            self.stats.retry_reasons[last.reason] = self.stats.retry_reasons.get(last.reason, 0) + 1
        if self.metrics is not None:
            self.metrics.retried(kind, last.reason)
        log.debug("%s: retrying in %.2fs (%s, attempt %d): %s", self.spec.digest[:19], delay, kind,
                  retry.attempt + 1, last.strerror)
        if cancel is not None:
            if cancel.wait(delay):
                raise Cancelled("cancelled")
        elif delay > 0:
            time.sleep(delay)  # back-off between attempts

    def busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    # -- internals -----------------------------------------------------------------------------------
    def _fail_fast(self, todo: Sequence[int]) -> None:
        """Demand reads: fail at once while the registry is known down, or a chunk failed a moment ago."""
        down = self.client.down(self.spec.endpoints())
        if down is not None:
            raise _Memo(down)
        now = time.monotonic()
        with self._lock:
            for i in todo:
                failed = self._failed.get(i)
                if failed is not None and now - failed[0] < self.config.failure_memo:
                    raise _Memo(f"{failed[1].strerror} (failed {now - failed[0]:.1f}s ago)")

    def _marked_down(self, after: str, e: FetchError) -> None:
        log.warning("%s marked down for %.1fs (%s, and nothing arrived meanwhile): %s",
                    urlparse(self.spec.registry).netloc, self.config.failure_memo, after, e.strerror)
        if self.metrics is not None:
            self.metrics.marked_down()

    def _failed_for_good(self, todo: Sequence[int], kind: str, e: FetchError, last: FetchError | None,
                         began: float | None = None) -> None:
        """Book-keeping of an ensure() that raises: counters, the failure memo, the outage mark, a log line."""
        with self._lock:
            self.stats.failures += 1
        if self.metrics is not None:
            self.metrics.failed(kind)
        if isinstance(e, _Memo):
            return  # already failed a moment ago: counted, not logged again
        todo = [i for i in todo if not self.cache.has(i)]
        if isinstance(e, Cancelled) or not todo:
            return
        cause = last if last is not None else e
        if kind == DEMAND and e.reason == "timeout" and began is not None and cause.transient \
                and not isinstance(cause, CorruptChunk) \
                and self.client.read_gave_up(self.spec.endpoints(), began, cause.strerror or str(cause),
                                             seconds=self.config.failure_memo):
            self._marked_down(f"a {kind} read ran out of time", cause)
        if kind == DEMAND:  # (a prefetch that gave up must not fail the container's own read of the chunk)
            now = time.monotonic()
            with self._lock:
                for i in todo:
                    self._failed[i] = (now, e)
        log.warning("%s: %d chunk(s) from #%d failed (%s): %s", self.spec.digest[:19], len(todo), todo[0], kind,
                    e.strerror)

    def _split(self, run: Sequence[int]) -> tuple[list[int], list[tuple[int, _Pending]]]:
        """(chunks of ``run`` nobody has or fetches, chunks someone is fetching with their pending entry);
        call with the lock held."""
        need: list[int] = []
        theirs: list[tuple[int, _Pending]] = []
        for i in run:
            if self.cache.has(i):
                continue
            p = self._inflight.get(i)
            if p is None:
                need.append(i)
            else:
                theirs.append((i, p))
        return need, theirs

    def _fetch_runs(self, runs: list[list[int]], kind: str, deadline: float | None,
                    cancel: threading.Event | None, due: float | None = None) -> list[tuple[int, _Pending]]:
        """One attempt at ``runs``: take a request slot, claim the chunks still missing and not in flight,
        fetch them (contiguous pieces; one range request, or one multi-range request for all of them),
        verify and store them.  Returns the chunks other callers were fetching (for the caller to wait on);
        raises on failure.  Always settles the pending entries it created."""
        every = [i for run in runs for i in run]
        with self._lock:
            need, theirs = self._split(every)
        if not need:  # all being fetched by others: no slot needed to wait for them
            with self._lock:
                self.stats.dedup_waits += len(theirs)
            return theirs
        nbytes = sum(self.spec.chunk_span(i)[1] for i in need)
        with self.scheduler.slot(kind, nbytes, deadline, cancel, due):
            with self._lock:
                need, theirs = self._split(every)
                for i in need:
                    self._inflight[i] = _Pending()
                self.stats.dedup_waits += len(theirs)
            error: FetchError | None = None
            try:
                pieces = coalesce(need)
                if len(pieces) > 1 and self._multi_range and self._fetch_multi(pieces, kind, deadline):
                    pass
                else:
                    for piece in pieces:
                        if not all(self.cache.has(i) for i in piece):
                            self._fetch_piece(piece, kind, deadline)
            except FetchError as e:
                error = e
                raise
            finally:
                with self._lock:
                    for i in need:
                        p = self._inflight.pop(i, None)
                        if p is not None:
                            if not self.cache.has(i):
                                p.error = error if error is not None else FetchError(f"chunk {i} not fetched")
                            p.done.set()
        return theirs

    def _fetch_piece(self, run: list[int], kind: str, deadline: float | None) -> None:
        """GET the contiguous chunks ``run`` (the caller holds a slot and has claimed them); each chunk is
        verified and stored the moment its last byte arrives, and its waiters go on then — a reader needing
        the first chunk of an 8 MiB prefetch run does not wait for the other 63."""
        start = self.spec.chunk_span(run[0])[0]
        last_off, last_len = self.spec.chunk_span(run[-1])
        end = last_off + last_len
        bad: list[int] = []
        t0 = time.monotonic()
        data = self._get(start, end, deadline, self._settler(run, start, bad))
        self._account(kind, len(data), time.monotonic() - t0, bad)

    def _account(self, kind: str, nbytes: int, elapsed: float, bad: list[int]) -> None:
        """One request's bytes arrived: count them; chunks that failed verification make it a failure."""
        self.client.request_succeeded(self.spec.endpoints())  # bytes arrived: whatever outage there was is over
        with self._lock:
            self.stats.bytes[kind] += nbytes
            self.stats.requests[kind] += 1
        if self.metrics is not None:
            self.metrics.fetched(kind, nbytes, elapsed)
        if bad:
            raise CorruptChunk(f"chunk(s) {bad} of {self.spec.digest} failed sha256 verification")

    def _settler(self, run: list[int], start: int, bad: list[int]) -> Callable[[bytearray, int], None]:
        """``arrived(buffer, n)`` for the body of ``run`` (starting at blob offset ``start``): settles each
        chunk once its bytes are among the first ``n``."""
        settled = 0  # chunks of run handled so far

        def arrived(buf: bytearray, got: int) -> None:
            nonlocal settled
            while settled < len(run):
                i = run[settled]
                off, length = self.spec.chunk_span(i)
                if off - start + length > got:
                    return
                self._settle(i, memoryview(buf)[off - start : off - start + length], bad)
                settled += 1

        return arrived

    def _fetch_multi(self, pieces: list[list[int]], kind: str, deadline: float | None) -> bool:
        """GET the contiguous chunk runs ``pieces`` with one multi-range request and settle every chunk as it
        arrives (see :meth:`ensure_runs`).  False — nothing fetched — if the registry does not answer with
        ``multipart/byteranges`` (then no multi-range request is sent again) or wants authentication first
        (the single-range path refreshes the token); raises :class:`FetchError` on failure."""
        spans = []
        for piece in pieces:
            last_off, last_len = self.spec.chunk_span(piece[-1])
            spans.append((self.spec.chunk_span(piece[0])[0], last_off + last_len))
        bad: list[int] = []
        t0 = time.monotonic()

        def get(base: str) -> int | None:
            url, resp = self._request(base, ",".join(f"{a}-{b - 1}" for a, b in spans), deadline)
            try:
                ctype = resp.headers.get("Content-Type", "")
                boundary = re.search(r'boundary="?([^";]+)"?', ctype)
                if resp.status_code != 206 or not ctype.startswith("multipart/byteranges") or boundary is None:
                    if resp.status_code in (200, 206):
                        self._multi_range = False
                        log.info("%s answers multi-range requests with %d %s; one range per request from now on",
                                 urlparse(url).netloc, resp.status_code, ctype or "(no content type)")
                        return None
                    if resp.status_code == 401:
                        return None
                    _drain(resp)
                    raise status_error(url, f"({len(spans)} ranges)", resp)
                wanted = {a: (b, self._settler(piece, a, bad)) for piece, (a, b) in zip(pieces, spans, strict=True)}
                return _read_parts(_Body(resp, url, deadline), boundary.group(1).encode(), url, wanted)
            finally:
                resp.close()

        total = self._on_endpoint(get)
        if total is None:
            return False
        self._account(kind, total, time.monotonic() - t0, bad)
        return True

    def _settle(self, i: int, piece: memoryview, bad: list[int]) -> None:
        """Verify chunk ``i`` and store it (its waiters go on), or count it in ``bad``."""
        got = hashlib.sha256(piece).hexdigest()
        if got != self.spec.chunks[i]:
            bad.append(i)
            off = self.spec.chunk_span(i)[0]
            log.error("blob %s chunk %d (bytes %d-%d) failed verification: expected sha256 %s, got %s",
                      self.spec.digest, i, off, off + len(piece) - 1, self.spec.chunks[i], got)
            with self._lock:
                self.stats.corrupt += 1
            if self.metrics is not None:
                self.metrics.corrupt(self.spec, i)
            return
        self.cache.put(i, piece)
        # Progress, not only a whole answer, proves the endpoints alive: with 8 MiB requests in flight a
        # few short failures would otherwise count "in a row" while the big answers are still arriving.
        self.client.request_succeeded(self.spec.endpoints())
        with self._lock:
            self._failed.pop(i, None)
            p = self._inflight.get(i)
        if p is not None:
            p.done.set()  # readers of this chunk may go on while the rest of the run arrives

    def _get(self, start: int, end: int, deadline: float | None,
             arrived: Callable[[bytearray, int], None] | None = None) -> bytearray:
        """GET bytes [start, end) from the endpoint that last worked; move on to the next one on failure.
        ``arrived(buffer, n)`` is called whenever the first ``n`` bytes of the buffer are in."""
        return self._on_endpoint(lambda base: self._get_from(base, start, end, deadline, arrived))

    def _on_endpoint(self, fn: Callable[[str], _T]) -> _T:
        """``fn(base URL)`` on the endpoint that last worked (skipping one that asked us, with Retry-After, to
        come back later while another has not).  A transient failure is reported to the client's outage
        tracking and raised (the retry, after the backoff, goes to the next endpoint); any other failure — a
        mirror without the blob answers 404 — moves on to the next endpoint at once, and is raised once
        every endpoint answered so."""
        endpoints = self.spec.endpoints()
        n = len(endpoints)
        first = self._endpoint % n
        ready = [k for k in range(n) if not self.client.held(endpoints[(first + k) % n])]
        order = [(first + k) % n for k in (ready + [k for k in range(n) if k not in ready])]
        err: FetchError | None = None
        for idx in order:
            try:
                out = fn(endpoints[idx])
                self._endpoint = idx
                return out
            except FetchError as e:
                self._endpoint = idx + 1  # mirrors first, the registry last, round and round
                if e.retry_after is not None:
                    self.client.hold(endpoints[idx], e.retry_after)
                if not e.transient:
                    err = e
                    continue
                cfg = self.config
                reader = getattr(_current, "reader", None)
                if self.client.request_failed(endpoints, id(reader) if reader is not None else 0,
                                              e.strerror or str(e), after=cfg.down_after_failures,
                                              span=cfg.down_after_seconds, seconds=cfg.failure_memo):
                    self._marked_down(f"{cfg.down_after_failures} reads failed", e)
                raise
        assert err is not None
        raise err

    def _request(self, base: str, ranges: str, deadline: float | None,
                 refresh: bool = False) -> tuple[str, requests.Response]:
        """(url, streamed response) of ``GET`` with ``Range: bytes=<ranges>`` at endpoint ``base``, within
        the deadline and the configured timeouts."""
        cfg = self.config
        url = self.spec.blob_url(base)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise FetchError("timed out", "timeout")
        budget = left if left is not None else max(cfg.connect_timeout, cfg.io_timeout)
        timeout = (min(cfg.connect_timeout, budget), min(cfg.io_timeout, budget))
        headers = {**self.spec.headers, **self.client.auth(self.spec, base, refresh=refresh),
                   "Range": f"bytes={ranges}", "Accept-Encoding": "identity"}
        try:
            return url, self.client.session().get(url, headers=headers, stream=True, timeout=timeout)
        except requests.RequestException as e:
            raise transport_error(url, f"bytes {ranges}", e) from e

    def _get_from(self, base: str, start: int, end: int, deadline: float | None,
                  arrived: Callable[[bytearray, int], None] | None = None) -> bytearray:
        refreshed = False
        while True:
            url, resp = self._request(base, f"{start}-{end - 1}", deadline, refresh=refreshed)
            try:
                if resp.status_code == 401 and not refreshed:
                    refreshed = True
                    continue
                return self._body(resp, url, start, end, deadline, arrived)
            finally:
                resp.close()

    @staticmethod
    def _body(resp: requests.Response, url: str, start: int, end: int, deadline: float | None,
              arrived: Callable[[bytearray, int], None] | None = None) -> bytearray:
        if resp.status_code == 206:
            cr = resp.headers.get("Content-Range", "")
            if not cr.startswith(f"bytes {start}-"):
                raise FetchError(f"GET {url}: Content-Range {cr!r} does not start at {start}", "protocol",
                                 transient=False)
            skip = 0
        elif resp.status_code == 200:
            skip = start  # the server ignored Range: correct but slow, so say so
            log.warning("GET %s: server ignored Range (200); skipping %d bytes", url, start)
        else:
            _drain(resp)
            raise status_error(url, f"bytes {start}-{end - 1}", resp)
        want = end - start
        buf = bytearray(want)
        got = 0
        try:
            for piece in resp.iter_content(chunk_size=256 << 10):
                if skip:
                    if len(piece) <= skip:
                        skip -= len(piece)
                        continue
                    piece = piece[skip:]
                    skip = 0
                n = min(len(piece), want - got)
                buf[got : got + n] = piece[:n]
                got += n
                if arrived is not None:
                    arrived(buf, got)
                if got >= want:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FetchError(f"GET {url}: timed out after {got} of {want} bytes", "timeout")
        except requests.RequestException as e:
            raise transport_error(url, f"after {got} of {want} bytes", e) from e
        if got < want:
            raise FetchError(f"GET {url}: short body, {got} of {want} bytes", "cut")
        return buf


def _drain(resp: requests.Response, limit: int = 64 << 10) -> None:
    """Read a small error body, so that the connection goes back to the pool instead of being closed (a
    registry answering 503 to a fifth of the requests would otherwise cost a new connection for each)."""
    try:
        if int(resp.headers.get("Content-Length") or limit + 1) <= limit:
            resp.content  # noqa: B018 - reading it is the point
    except (ValueError, requests.RequestException):
        pass


class _Body:
    """Buffered reading of a streamed response body: lines (multipart headers) and exact byte counts.

    The unread bytes are ``_buf[_pos:]``; payload is copied once, from the network piece into the part's
    buffer (no slicing of the remainder per part: a hot set is ~130 MiB through here)."""

    def __init__(self, resp: requests.Response, url: str, deadline: float | None) -> None:
        self._it = resp.iter_content(chunk_size=256 << 10)
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self.url = url
        self.deadline = deadline

    def _more(self) -> None:
        try:
            piece = next(self._it)
        except StopIteration:
            raise FetchError(f"GET {self.url}: the multipart body ended early", "cut") from None
        except requests.RequestException as e:
            raise transport_error(self.url, "(multipart body)", e) from e
        if self._pos >= len(self._buf):
            self._buf, self._pos = piece, 0
        else:  # a line or part split across pieces: keep the rest, then the new piece
            self._buf, self._pos = self._buf[self._pos:] + piece, 0
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FetchError(f"GET {self.url}: timed out", "timeout")

    def readline(self, limit: int = 8192) -> bytes:
        while True:
            k = self._buf.find(b"\n", self._pos)
            if k >= 0:
                line = bytes(self._buf[self._pos : k + 1])
                self._pos = k + 1
                return line
            if len(self._buf) - self._pos > limit:
                raise FetchError(f"GET {self.url}: a multipart header line longer than {limit} bytes", "protocol",
                                 transient=False)
            self._more()

    def read_into(self, out: bytearray, arrived: Callable[[bytearray, int], None]) -> None:
        got = 0
        while got < len(out):
            if self._pos >= len(self._buf):
                self._more()
            k = min(len(out) - got, len(self._buf) - self._pos)
            with memoryview(self._buf) as view:
                out[got : got + k] = view[self._pos : self._pos + k]
            self._pos += k
            got += k
            arrived(out, got)


def _read_parts(body: _Body, boundary: bytes, url: str,
                wanted: dict[int, tuple[int, Callable[[bytearray, int], None]]]) -> int:
    """Read a ``multipart/byteranges`` body whose parts must be exactly the ranges ``wanted`` (start →
    (end, arrived)); returns the payload bytes.  Anything else — a part we did not ask for, a missing one,
    a malformed header — is a :class:`FetchError` (what was settled before stays: it was verified)."""
    total = 0
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    while wanted:
        line = body.readline().strip()
        if not line:
            continue
        if line == close:
            break
        if line != delimiter:
            raise FetchError(f"GET {url}: unexpected line in the multipart body: {line[:80]!r}", "protocol",
                             transient=False)
        crange = ""
        while header := body.readline().strip():
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                crange = value.strip()
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", crange)
        part = wanted.pop(int(m.group(1)), None) if m else None
        if m is None or part is None or part[0] != int(m.group(2)) + 1:
            raise FetchError(f"GET {url}: a multipart part we did not ask for (Content-Range {crange!r})",
                             "protocol", transient=False)
        buf = bytearray(part[0] - int(m.group(1)))
        body.read_into(buf, part[1])
        total += len(buf)
    if wanted:
        raise FetchError(f"GET {url}: the multipart body lacks {len(wanted)} of the ranges asked for", "cut")
    return total
