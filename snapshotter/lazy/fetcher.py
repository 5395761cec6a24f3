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
  the registry's CPU per start-up falls by a third at the same start-up time (docs/bench/design-measurements.md).
* **Chunks as they arrive.**  Each chunk of a response is verified, stored and handed to its waiters as
  soon as its bytes are in, not when the whole response is.
* **Bounded time.**  A demand read has a deadline (``read_timeout``), every prefetch or background request
  one of its own (``request_timeout``); connect and socket-read timeouts are clipped to it, the body is read
  against it, and the client's watchdog shuts the request's socket down when it passes (a registry dripping
  its headers or an error body keeps every socket read under its timeout), so a registry that hangs costs the
  reader EIO after the deadline, not a hung process or worker.  A chunk whose demand read just failed fails
  again at once for ``failure_memo`` seconds: the kernel retries a failed read-ahead page with a synchronous
  read, which would otherwise wait out a second deadline.
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
* **A mirror that has not cached the blob is waited for, not read through.**  A pull-through cache answers a
  range request for a blob it is still copying with the whole blob (``200``), costing the origin a stream of
  it per request; reads wait for it within their deadline instead (:mod:`snapshotter.lazy.mirrorfill`).
* **Demand first** and **down means down** are the shared parts: the :class:`~snapshotter.lazy.scheduling.Scheduler`
  admits requests across all blobs, the :class:`~snapshotter.lazy.transport.HttpClient` keeps each endpoint's
  health; failures are classified in :mod:`snapshotter.lazy.errors`, multi-range answers parsed in
  :mod:`snapshotter.lazy.multipart`.
"""

from __future__ import annotations

import contextlib
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

from bootseer.index import CorruptFrame, inflate
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import Cancelled, CorruptChunk, FetchError, status_error, transport_error
from snapshotter.lazy.mirrorfill import MirrorFilling, MirrorFills
from snapshotter.lazy.multipart import BodyReader, read_parts
from snapshotter.lazy.scheduling import DEMAND, KINDS, PREFETCH, Scheduler
from snapshotter.lazy.spec import BlobSpec, coalesce
from snapshotter.lazy.transport import HttpClient, body_pieces, drain

_T = TypeVar("_T")

log = logging.getLogger("bootseer.lazy.fetch")


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
    request_timeout: float = 120.0  # prefetch / background: longest one request may take, body included
    retry_window: float = 30.0  # prefetch / background: retry transient errors this long after the first
    retries: int = 3  # extra attempts after a chunk failed verification (transient errors: see above)
    backoff: float = 0.005  # first retry delay (jittered: 50-100 %); doubles, capped by backoff_max
    backoff_max: float = 2.0
    failure_memo: float = 1.0  # a chunk whose demand read failed, and endpoints marked down, fail fast this long
    down_after_failures: int = 3  # distinct reads with failed requests that mark the endpoints down ...
    down_after_seconds: float = 2.0  # ... when nothing arrived for this long since the first failure
    tls_verify: bool | str = True  # False, True, or a CA bundle path
    mirror_fill_wait: float = 120.0  # reads wait this long for a mirror filling a blob, then go past it
    mirror_probe: float = 0.5  # first wait before asking a filling mirror again; doubles up to mirror_probe_max
    mirror_probe_max: float = 2.0


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
        cfg = self.config
        self._mirrors = MirrorFills(spec.mirrors, wait=cfg.mirror_fill_wait, probe=cfg.mirror_probe,
                                    probe_max=cfg.mirror_probe_max)

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
        fetch that is itself queued behind them (that priority inversion made prefetch wait for chunks the
        fill had claimed and could not fetch until prefetch was over; docs/bench/design-measurements.md)."""
        cap = max(1, self.config.max_range_bytes // self.spec.chunk_size)
        self._ensure(indices, kind, deadline, cancel, due,
                     lambda todo: [[run] for run in coalesce(sorted(todo), cap)])

    def ensure_runs(self, runs: Sequence[Sequence[int]], kind: str = PREFETCH, *,
                    cancel: threading.Event | None = None, due: float | None = None) -> None:
        """Like :meth:`ensure` for several runs of chunks (prefetch: the next runs in first-access order),
        fetched in *one* request slot with *one* multi-range request (``Range: bytes=a-b,c-d,…``) where the
        registry answers those with ``multipart/byteranges``.  Why: a registry spends CPU on every request
        whatever its size (docker-registry 2.8: docs/bench/design-measurements.md), and on a node every
        request costs this daemon too.
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
        if isinstance(last, MirrorFilling):
            return self._wait_for_mirror(last, kind, retry, cancel)
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

    def _wait_for_mirror(self, last: MirrorFilling, kind: str, retry: _RetryState,
                         cancel: threading.Event | None) -> None:
        """Until the next probe of a filling mirror; at once when the read cannot wait that long (its next
        attempt goes past the mirror).  Prefetch and background fill wait as long as the mirror may fill."""
        now = time.monotonic()
        if kind != DEMAND:  # (no deadline of their own: the retry window, or as long as the mirror may fill)
            retry.until = max(retry.until or now + self.config.retry_window, self._mirrors.window_end())
        delay = self._mirrors.next_probe_in()
        if retry.until is not None and now + delay >= retry.until:
            delay = 0.0
        with self._lock:
            self.stats.retries += 1
            self.stats.retry_reasons[last.reason] = self.stats.retry_reasons.get(last.reason, 0) + 1
        if self.metrics is not None:
            self.metrics.retried(kind, last.reason)
        if cancel is not None:
            if cancel.wait(delay):
                raise Cancelled("cancelled")
        elif delay > 0:
            time.sleep(delay)  # waiting for the mirror's next probe

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
        nbytes = sum(self.spec.wire_span(i)[1] for i in need)  # what crosses the link
        with self.scheduler.slot(kind, nbytes, deadline, cancel, due):
            with self._lock:
                need, theirs = self._split(every)
                for i in need:
                    self._inflight[i] = _Pending()
                self.stats.dedup_waits += len(theirs)
            error: FetchError | None = None
            try:
                pieces = coalesce(need)
                if len(pieces) > 1 and self._multi_range and not self._mirrors.filling() \
                        and self._fetch_multi(pieces, kind, deadline):
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
        start = self.spec.wire_span(run[0])[0]  # frames are contiguous: a run of chunks is one range
        last_off, last_len = self.spec.wire_span(run[-1])
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
        """``arrived(buffer, n)`` for the body of ``run`` (starting at offset ``start`` of the fetched blob):
        settles each chunk once its bytes (its frame, on a compressed wire) are among the first ``n``."""
        settled = 0  # chunks of run handled so far

        def arrived(buf: bytearray, got: int) -> None:
            nonlocal settled
            while settled < len(run):
                i = run[settled]
                off, length = self.spec.wire_span(i)
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
            last_off, last_len = self.spec.wire_span(piece[-1])
            spans.append((self.spec.wire_span(piece[0])[0], last_off + last_len))
        bad: list[int] = []
        t0 = time.monotonic()

        def get(base: str) -> int | None:
            until = self._request_deadline(deadline)
            with self._guarded(until):
                return read(base, until)

        def read(base: str, until: float) -> int | None:
            url, resp = self._request(base, ",".join(f"{a}-{b - 1}" for a, b in spans), until)
            try:
                ctype = resp.headers.get("Content-Type", "")
                boundary = re.search(r'boundary="?([^";]+)"?', ctype)
                if resp.status_code != 206 or not ctype.startswith("multipart/byteranges") or boundary is None:
                    if resp.status_code == 200 and self._mirrors.unproven(base):
                        raise self._mirrors.answered_whole(base, url)
                    if resp.status_code in (200, 206):
                        self._multi_range = False
                        log.info("%s answers multi-range requests with %d %s; one range per request from now on",
                                 urlparse(url).netloc, resp.status_code, ctype or "(no content type)")
                        return None
                    if resp.status_code == 401:
                        return None
                    drain(resp)
                    raise status_error(url, f"({len(spans)} ranges)", resp)
                self._mirrors.served_range(base)
                wanted = {a: (b, self._settler(piece, a, bad)) for piece, (a, b) in zip(pieces, spans, strict=True)}
                return read_parts(BodyReader(resp, url, until), boundary.group(1).encode(), url, wanted,
                                  self.spec.fetch_size)
            finally:
                resp.close()

        total = self._on_endpoint(get)
        if total is None:
            return False
        self._account(kind, total, time.monotonic() - t0, bad)
        return True

    def _settle(self, i: int, piece: memoryview, bad: list[int]) -> None:
        """Verify chunk ``i`` (on a compressed wire: its frame, decompressed) and store it (its waiters go
        on), or count it in ``bad``: a frame that does not inflate to exactly its chunk fails as a digest does."""
        off, length = self.spec.chunk_span(i)
        try:
            data = inflate(piece, length) if self.spec.codec else piece
            got = hashlib.sha256(data).hexdigest()
        except CorruptFrame as e:
            got = f"no chunk (its {self.spec.codec} frame refused: {e})"
        if got != self.spec.chunks[i]:
            log.error("blob %s chunk %d (bytes %d-%d) failed verification: expected sha256 %s, got %s",
                      self.spec.digest, i, off, off + length - 1, self.spec.chunks[i], got)
            bad.append(i)
            with self._lock:
                self.stats.corrupt += 1
            if self.metrics is not None:
                self.metrics.corrupt(self.spec, i)
            return
        piece = memoryview(data)
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
        reader = getattr(_current, "reader", None)
        for idx in order:
            route = self._mirrors.route(endpoints[idx], None if reader is None else reader.until)
            if route == "skip":
                continue
            if route == "wait":
                raise MirrorFilling(f"waiting for {endpoints[idx]} to fill {self.spec.digest[:19]}")
            try:
                try:
                    out = fn(endpoints[idx])
                finally:
                    self._mirrors.answered(endpoints[idx])  # a first answer awaited no longer holds others back
                self._endpoint = idx
                return out
            except MirrorFilling:
                self._endpoint = idx  # not an outage, and the blob is asked of this mirror again
                raise
            except FetchError as e:
                self._endpoint = idx + 1  # mirrors first, the registry last, round and round
                if e.retry_after is not None:
                    self.client.hold(endpoints[idx], e.retry_after)
                if not e.transient:
                    err = e
                    continue
                cfg = self.config
                if self.client.request_failed(endpoints, id(reader) if reader is not None else 0,
                                              e.strerror or str(e), after=cfg.down_after_failures,
                                              span=cfg.down_after_seconds, seconds=cfg.failure_memo):
                    self._marked_down(f"{cfg.down_after_failures} reads failed", e)
                raise
        assert err is not None
        raise err

    def _request_deadline(self, deadline: float | None) -> float:
        """One request's deadline: the demand read's, or — prefetch and background fill have none of their
        own — ``request_timeout`` from now, so that a registry dripping its answer cannot hold the worker."""
        return deadline if deadline is not None else time.monotonic() + self.config.request_timeout

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
            return url, self.client.session().get(url, headers=headers, stream=True, timeout=timeout,
                                                  **self.client.tls_args(self.spec, base))
        except requests.RequestException as e:
            raise transport_error(url, f"bytes {ranges}", e) from e

    def _get_from(self, base: str, start: int, end: int, deadline: float | None,
                  arrived: Callable[[bytearray, int], None] | None = None) -> bytearray:
        refreshed = False
        while True:
            until = self._request_deadline(deadline)
            with self._guarded(until):
                url, resp = self._request(base, f"{start}-{end - 1}", until, refresh=refreshed)
                try:
                    if resp.status_code == 401 and not refreshed:
                        refreshed = True
                        continue
                    if resp.status_code == 200 and (start, end) != (0, self.spec.fetch_size) \
                            and self._mirrors.unproven(base):
                        raise self._mirrors.answered_whole(base, url)  # closed unread (see mirrorfill)
                    if resp.status_code == 206:
                        self._mirrors.served_range(base)
                    return self._body(resp, url, start, end, until, arrived)
                finally:
                    resp.close()

    @contextlib.contextmanager
    def _guarded(self, until: float) -> Iterator[None]:
        """The request inside ends by ``until`` whatever the server does (the client's watchdog shuts its
        socket down then, see :mod:`snapshotter.lazy.transport`): what that breaks is reported as a timeout.
        An HTTP status that arrived in time stays what it is."""
        with self.client.guard(until) as guard:
            try:
                yield
            except FetchError as e:
                if not guard.fired or e.reason == "timeout" or e.reason.startswith("http_"):
                    raise
                raise FetchError(f"timed out: {e.strerror}", "timeout") from e

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
            drain(resp)
            raise status_error(url, f"bytes {start}-{end - 1}", resp)
        want = end - start
        buf = bytearray(want)
        got = 0
        try:
            for piece in body_pieces(resp):
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
