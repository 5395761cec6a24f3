"""The HTTP side all blobs of a daemon share: one ``requests`` session per thread, the auth hook, and what
is known about each endpoint set — whether it is down, and which endpoint asked us to come back later.

**Down means down, not one failure.**  Every request's outcome is reported to the :class:`HttpClient`
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

**Every request ends by its deadline.**  Socket timeouts bound each wait for a byte, not the request: a
registry (or anything in between) that drips its status line, headers or body a byte every few seconds keeps
each read under the timeout for as long as it likes.  So every request of a blob goes out inside
:meth:`HttpClient.guard`, and a watchdog thread shuts the request's socket down when its deadline passes —
whichever phase it is in (headers, body, or the error body :func:`drain` reads) — and the fetcher reports it
as a timeout.  The socket is known from the moment the response is awaited (the pool's connection class arms
the thread's guard); sessions are per thread, so a connection the guard still names is never in another
request's hands.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from snapshotter.lazy.spec import AuthHook, BlobSpec, TlsHook, no_auth


@dataclass
class _Health:
    """Outcome of the recent requests to one endpoint set (see the module doc, "Down means down")."""

    failures: int = 0  # failed requests since the last success
    readers: set[int] = field(default_factory=set)  # the reads (ensure calls) that made them
    since: float = 0.0  # when the first of them was seen
    until: float = 0.0  # marked down until then (0: not marked)
    marked: float = 0.0  # when it was marked down
    why: str = ""


class Guard:
    """The deadline of one request (see the module doc, "Every request ends by its deadline"): once it has
    passed, the request's socket is shut down and ``fired`` is set."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False
        self.active = True
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def arm(self, sock: socket.socket | None) -> None:
        """The request's socket, as its response is awaited (a connection of this thread's session)."""
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shut()

    def fire(self) -> None:
        with self._lock:
            if self.active:
                self.fired = True
                self._shut()

    def disarm(self) -> None:
        with self._lock:
            self.active = False
            self._sock = None

    def _shut(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing left to interrupt
                self._sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for the process: fires each armed :class:`Guard` whose deadline has passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Guard]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, guard: Guard) -> None:
        with self._cond:
            heapq.heappush(self._heap, (guard.deadline, next(self._seq), guard))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lazy-request-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is guard:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)  # ended in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, guard = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
            guard.fire()


_watchdog = _Watchdog()
_armed = threading.local()  # .guard: the Guard of the request this thread is making, if any


def _arm(sock: socket.socket | None) -> None:
    guard: Guard | None = getattr(_armed, "guard", None)
    if guard is not None:
        guard.arm(sock)


class _GuardedHTTPConnection(HTTPConnection):
    def getresponse(self) -> Any:
        _arm(self.sock)
        return super().getresponse()


class _GuardedHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> Any:
        _arm(self.sock)
        return super().getresponse()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    """An adapter whose connections arm the thread's :class:`Guard` when they await a response."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class HttpClient:
    """One ``requests.Session`` per thread (sessions are not documented thread-safe) plus the auth hook, and
    what all blobs share about their endpoints: which are down, which asked us to come back later."""

    def __init__(self, auth: AuthHook = no_auth, tls_verify: bool | str = True, pool: int = 4,
                 tls: TlsHook | None = None) -> None:
        self.auth = auth
        self.tls_verify = tls_verify
        self.tls = tls
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

    def tls_args(self, spec: BlobSpec, base: str) -> dict[str, Any]:
        """``verify``/``cert`` keyword arguments for a request about ``spec`` to ``base`` (the endpoint's own
        TLS settings, see :class:`~snapshotter.lazy.spec.TlsHook`); none: the session's default."""
        settings = self.tls(spec, base) if self.tls is not None else None
        if settings is None:
            return {}
        verify, cert = settings
        return {"verify": verify, "cert": cert}

    @contextlib.contextmanager
    def guard(self, deadline: float) -> Iterator[Guard]:
        """Requests this thread makes through :meth:`session` inside the block end by ``deadline``
        (time.monotonic()): past it their socket is shut down, and the guard's ``fired`` says so."""
        g = Guard(deadline)
        outer = getattr(_armed, "guard", None)
        _armed.guard = g
        _watchdog.watch(g)
        try:
            yield g
        finally:
            g.disarm()
            _armed.guard = outer

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = _GuardedAdapter(pool_connections=4, pool_maxsize=self._pool, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.verify = self.tls_verify
            s.trust_env = False  # proxies from the environment must not silently reroute blob reads
            self._local.session = s
        return s



def drain(resp: requests.Response, limit: int = 64 << 10) -> None:
    """Read a small error body, so that the connection goes back to the pool instead of being closed (a
    registry answering 503 to a fifth of the requests would otherwise cost a new connection for each)."""
    try:
        if int(resp.headers.get("Content-Length") or limit + 1) <= limit:
            resp.content  # noqa: B018 - reading it is the point
    except (ValueError, requests.RequestException):
        pass


def body_pieces(resp: requests.Response, size: int = 256 << 10) -> Iterator[bytes]:
    """A streamed body as it arrives: each piece is what one socket read brought (at most ``size`` bytes).

    Not ``iter_content(size)``: that waits for ``size`` bytes (or the end), so a server dripping a byte at a
    time, each inside the socket timeout, would hold the reader far past its deadline; the caller checks its
    deadline between pieces.  urllib3's errors are raised as ``requests``' (what ``iter_content`` does), so
    :func:`~snapshotter.lazy.errors.transport_error` classifies them."""
    raw = resp.raw
    while True:
        try:
            piece = raw.read1(size, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as e:
            raise requests.exceptions.ConnectionError(f"Read timed out: {e}") from e
        except urllib3.exceptions.ProtocolError as e:  # includes a body shorter than its Content-Length
            raise requests.exceptions.ChunkedEncodingError(e) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise requests.exceptions.ConnectionError(e) from e
        if not piece:
            return
        yield piece
