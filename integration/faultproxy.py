"""A small fault-injecting HTTP proxy to put in front of a real registry in tests.

It forwards every request to the upstream (keeping the client's ``Host`` so the registry's ``Location``
headers point back at the proxy) and, on the requests a :class:`Fault` matches, injects a failure instead:
an HTTP status (5xx, 429), a dropped connection (TCP reset before any answer), a response cut off half-way
through its body, a slow answer (``delay`` seconds before forwarding), or a corrupted body.  It can also play an
authenticating registry: ``auth="bearer"`` answers 401 with a ``WWW-Authenticate: Bearer`` challenge and serves
``/token`` (checking basic credentials when ``username`` is set); ``auth="basic"`` wants basic credentials.

Faults fire on the next ``times`` matching requests, or, with ``rate``, on that fraction of them (transient
registry errors under load: ``add("status", status=503, rate=0.2, ranged=True)``), decided by a random
generator seeded with the proxy's ``seed`` so that a run is repeatable: each request that some rate fault
matches takes one draw, and the rate faults split that draw in the order they were added (so 20 % 503 and
5 % cut are 20 % and 5 % of the requests, never both on one).  ``ranged=True`` matches only requests with a
``Range`` header (lazy blob reads, not whole-blob or manifest GETs), ``range`` those whose ``Range`` a regex finds.

With ``origin`` (digest → bytes) it is the registry itself for those blobs — ``GET``/``HEAD`` of
``/v2/<repo>/blobs/<digest>``, one range per request (a multi-range request gets the whole blob, as an object
store answers it) — for unit tests that run without a registry process; every fault works the same way there.

For tests that need to see what reached the registry, ``exchanges`` logs each forwarded request with its
``Range`` and the bytes served (:meth:`FaultProxy.blob_requests`, :meth:`FaultProxy.served_bytes`);
:meth:`FaultProxy.hold` holds ranged responses until :meth:`FaultProxy.release` (concurrent readers made to
overlap deterministically), and the ``hang`` action accepts a request and answers nothing until the fault is
removed (:meth:`FaultProxy.clear`, :meth:`FaultProxy.remove`) or the proxy stops: a registry that stalls.

Used by the registry client's, the converter's, the lazy fetcher's and the lazy data path's tests and the
transient-error benchmark; ``hits`` records what happened to each request.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade"}


@dataclass(eq=False)  # identity: a test removes the fault it added, not one equal to it
class Fault:
    """Inject ``action`` into the next ``times`` requests matching ``method`` and the ``path`` regex.

    Actions: ``status`` (answer ``status``, with ``Retry-After: retry_after`` when set), ``drop`` (reset the
    connection), ``cut`` (send half the upstream body then reset), ``delay`` (wait ``delay`` s, then forward),
    ``corrupt`` (flip the first byte of the body, or the byte at blob offset ``at`` where the answer covers it),
    ``hang`` (answer nothing while the fault is in place), ``stall`` (send ``after`` bytes of the body, then
    nothing more while the fault is in place), ``drip`` (a tarpit: send the body one byte every ``delay`` s
    while the fault is in place, the rest at once when it is removed; ``hits`` then says ``dripped``),
    ``drip_head`` (the same with the status line and headers), ``ignore_range`` (answer the whole blob,
    200, as a server without range support).  ``rate``: fire on that fraction of the matching requests
    (seeded, see the module doc) instead of the next ``times``; ``ranged``: match only requests with a
    ``Range`` header.
    """

    action: str
    path: str = ".*"
    method: str = ".*"
    times: int = 1
    status: int = 503
    code: str = "UNAVAILABLE"  # the registry error code a ``status`` answer carries
    delay: float = 0.0
    retry_after: str | None = None  # the Retry-After header of a ``status`` answer (seconds or an HTTP date)
    rate: float | None = None  # fire on this fraction of matching requests (``times`` is then ignored)
    ranged: bool = False  # only requests carrying a Range header
    range: str | None = None  # only requests whose Range header this regex finds (e.g. "^bytes=0-")
    at: int | None = None  # corrupt: the blob offset whose byte is flipped (when the answer covers it)
    after: int = 0  # stall: bytes of the body sent before the answer stops (until the fault is removed)
    hits: int = 0
    fired: threading.Event = field(default_factory=threading.Event)  # set when the fault first fires

    def matches(self, method: str, path: str, range_header: str | None = None) -> bool:
        if self.rate is None and self.hits >= self.times:
            return False
        if (self.ranged or self.range is not None) and range_header is None:
            return False
        if self.range is not None and re.search(self.range, range_header or "") is None:
            return False
        return re.fullmatch(self.method, method) is not None and re.search(self.path, path) is not None


@dataclass
class Exchange:
    """One request the proxy forwarded: what was asked and what went back."""

    method: str
    path: str
    range: str | None
    status: int = 0
    nbytes: int = 0  # body bytes sent back (a GET)

    def span(self) -> tuple[int, int] | None:
        """(first, last) byte of a ``bytes=a-b`` range."""
        if not self.range or not self.range.startswith("bytes=") or "," in self.range:
            return None
        a, _, b = self.range[6:].partition("-")
        return int(a), int(b)


@dataclass
class FaultProxy:
    upstream: str = ""  # host:port of the real registry (plain HTTP); unused for ``origin`` blobs
    origin: dict[str, bytes] | None = None  # blobs served by the proxy itself (digest → bytes)
    auth: str | None = None  # None | "bearer" | "basic" | "static" (only ``Authorization: Bearer static_token``)
    static_token: str = ""
    username: str = ""
    password: str = ""
    faults: list[Fault] = field(default_factory=list)
    seed: int = 0  # of the draws that decide which requests a ``rate`` fault hits
    hits: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() of each of ``hits``
    exchanges: list[Exchange] = field(default_factory=list)  # forwarded requests, in arrival order
    tokens_issued: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _tokens: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)  # faults removed, gate, stop
    _gate: threading.Event | None = None
    _stopping: bool = False

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self.release()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def add(self, action: str, **kw: Any) -> Fault:
        f = Fault(action, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def remove(self, fault: Fault) -> None:
        """Take ``fault`` out (a ``hang`` ends: its held requests go on)."""
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)
        with self._changed:
            self._changed.notify_all()

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.hits.clear()
            self.stamps.clear()
            self.exchanges.clear()
            self._rng = None
        with self._changed:
            self._changed.notify_all()

    def hold(self) -> threading.Event:
        """Hold every ranged response, once its bytes are in from upstream, until :meth:`release`."""
        gate = threading.Event()
        self._gate = gate
        return gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def blob_requests(self, digest: str) -> list[Exchange]:
        """The GETs of blob ``digest`` forwarded so far."""
        with self._lock:
            return [e for e in self.exchanges if e.method == "GET" and e.path.endswith("/blobs/" + digest)]

    def served_bytes(self, digest: str) -> int:
        return sum(e.nbytes for e in self.blob_requests(digest))

    def _hang(self, fault: Fault) -> None:
        """Wait while ``fault`` is in place (the injected stall itself; bounded so a test that forgets it
        cannot keep a thread forever)."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or fault not in self.faults, timeout=300)

    def _drip_wait(self, fault: Fault) -> bool:
        """Wait ``fault.delay`` s between two dripped bytes; True as soon as the fault is removed (or the proxy
        stops)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._stopping or fault not in self.faults, timeout=fault.delay)

    def _take(self, method: str, path: str, range_header: str | None = None) -> Fault | None:
        with self._lock:
            counted = [f for f in self.faults if f.rate is None and f.matches(method, path, range_header)]
            if counted:
                counted[0].hits += 1
                counted[0].fired.set()
                return counted[0]
            rated = [f for f in self.faults if f.rate is not None and f.matches(method, path, range_header)]
            if not rated:
                return None
            if self._rng is None:
                self._rng = random.Random(self.seed)
            draw = self._rng.random()
            for f in rated:
                draw -= f.rate or 0.0
                if draw < 0:
                    f.hits += 1
                    f.fired.set()
                    return f
        return None

    def count(self, what: str) -> int:
        """How many requests were answered with ``what`` (a prefix of ``hits``' third field: "status 503",
        "cut", "drop", "206", ...)."""
        with self._lock:
            return sum(1 for h in self.hits if h[2].startswith(what))

    def _record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.hits.append((method, path, what))
            self.stamps.append(time.monotonic())

    def _new_token(self) -> str:
        tok = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens.add(tok)
            self.tokens_issued += 1
        return tok

    def _token_ok(self, tok: str) -> bool:
        with self._lock:
            return tok in self._tokens

    def _basic_ok(self, header: str) -> bool:
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.username and pw == self.password


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client closing its connection while we read or write is no error of ours (clients drop a
        keep-alive connection whose response they abandon, or one we cut); anything else is printed."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: with Nagle's algorithm, a small body waits for the client's
    # delayed ACK (40 ms) — a cost of this proxy, not of the registry it stands for (which answers in one)
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Close with RST, so the client sees a connection reset, not a clean end."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        p = self.owner
        if p._stopping:  # stopped: a kept-alive connection must not go on serving (an outage is total)
            return self._reset()
        path = self.path
        body = self._body()
        if urlsplit(path).path == "/token":
            return self._token()
        if p.auth and not self._authorized():
            return
        fault = p._take(self.command, path, self.headers.get("Range"))
        if fault and fault.action == "status":
            p._record(self.command, path, f"status {fault.status}")
            err = {"errors": [{"code": fault.code, "message": "injected fault", "detail": None}]}
            headers = {"Content-Type": "application/json"}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            return self._send(fault.status, json.dumps(err).encode(), headers)
        if fault and fault.action == "drop":
            p._record(self.command, path, "drop")
            return self._reset()
        if fault and fault.action == "hang":
            p._record(self.command, path, "hang")
            p._hang(fault)
            if p._stopping:
                return self._reset()
        if fault and fault.action == "delay":
            # one record per request: the client has usually given up on this one before it is answered
            p._record(self.command, path, f"delay {fault.delay}")
            time.sleep(fault.delay)  # the injected slowness itself
        self._forward(body, fault)

    def _authorized(self) -> bool:
        p = self.owner
        got = self.headers.get("Authorization", "")
        host = self.headers.get("Host", p.address)
        if p.auth == "static":
            if got == f"Bearer {p.static_token}":
                return True
            p._record(self.command, self.path, "401 static")
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                       {"Content-Type": "application/json"})
            return False
        if p.auth == "basic":
            if p._basic_ok(got):
                return True
            p._record(self.command, self.path, "401 basic")
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                       {"WWW-Authenticate": 'Basic realm="faultproxy"', "Content-Type": "application/json"})
            return False
        if got.lower().startswith("bearer ") and p._token_ok(got[7:]):
            return True
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags|referrers)/", self.path)
        scope = f',scope="repository:{m.group(1)}:pull"' if m else ""
        p._record(self.command, self.path, "401 bearer")
        challenge = f'Bearer realm="http://{host}/token",service="faultproxy"{scope}'
        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                   {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        return False

    def _token(self) -> None:
        p = self.owner
        q = parse_qs(urlsplit(self.path).query)
        if p.username and not p._basic_ok(self.headers.get("Authorization", "")):
            p._record(self.command, self.path, "token refused")
            return self._send(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        if q.get("service") != ["faultproxy"]:
            return self._send(400, b'{"details":"wrong service"}', {"Content-Type": "application/json"})
        tok = p._new_token()
        p._record(self.command, "/token", "token")
        self._send(200, json.dumps({"token": tok, "expires_in": 300}).encode(), {"Content-Type": "application/json"})

    def _upstream(self, body: bytes, fault: Fault | None) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The upstream's answer (status, headers, body), or None once a 502 went back."""
        p = self.owner
        conn = http.client.HTTPConnection(p.upstream, timeout=60)
        skip = HOP_BY_HOP | {"authorization", "content-length"}
        if fault is not None and fault.action == "ignore_range":
            skip = skip | {"range"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            p._record(self.command, self.path, "upstream error")
            self._send(502, b"upstream unreachable")
            return None
        finally:
            conn.close()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
        if self.command == "HEAD":
            out.append(("Content-Length", resp.getheader("Content-Length") or "0"))
        return resp.status, out, data

    def _own(self, blobs: dict[str, bytes], fault: Fault | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer for a blob of ``origin``: one range (206), or the whole blob (200) when there is no
        range, more than one, or ``ignore_range``."""
        m = re.fullmatch(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})", urlsplit(self.path).path)
        data = blobs.get(m.group(1)) if m and self.command in ("GET", "HEAD") else None
        if data is None:
            return 404, [("Content-Type", "application/json")], b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        status, headers, body = 200, [("Content-Type", "application/octet-stream")], data
        if rng and not (fault is not None and fault.action == "ignore_range"):
            start = int(rng.group(1))
            end = min(len(data), int(rng.group(2)) + 1 if rng.group(2) else len(data))
            if start >= end:
                return 416, [("Content-Range", f"bytes */{len(data)}")], b""
            status, body = 206, data[start:end]
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"))
        if self.command == "HEAD":
            headers.append(("Content-Length", str(len(body))))
        return status, headers, body

    def _forward(self, body: bytes, fault: Fault | None) -> None:
        p = self.owner
        if p.origin is not None:
            status, out_headers, data = self._own(p.origin, fault)
        else:
            got = self._upstream(body, fault)
            if got is None:
                return
            status, out_headers, data = got
        what = f"{status}"
        with p._lock:  # logged before a held answer waits: a test sees the request while it is held
            p.exchanges.append(Exchange(self.command, self.path, self.headers.get("Range"), status,
                                        len(data) if self.command == "GET" else 0))
        gate = p._gate
        if gate is not None and self.headers.get("Range"):
            gate.wait(60)
        if fault and fault.action == "corrupt" and data:
            flip = 0
            if fault.at is not None:
                crange = dict((k.lower(), v) for k, v in out_headers).get("content-range", "bytes 0-")
                flip = fault.at - int(re.findall(r"\d+", crange)[0])
            if 0 <= flip < len(data):
                data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1:]
                what += " corrupted"
        cut = fault is not None and fault.action == "cut" and len(data) > 1 and self.command != "HEAD"
        if cut:
            what += " cut"
        # Recorded before the answer goes out, so a client that has its answer finds it in ``hits``; a delayed
        # request was recorded when its delay began.
        if not (fault and fault.action == "delay"):
            p._record(self.command, self.path, what)
        self.send_response(status)
        for k, v in out_headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        if fault is not None and fault.action == "drip_head":
            buffered: list[bytes] = getattr(self, "_headers_buffer", [])  # what end_headers() would send
            head = b"".join(buffered) + b"\r\n"
            buffered.clear()
            if not self._drip(fault, head):
                return
        else:
            self.end_headers()
        if self.command == "HEAD":
            return
        if cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        if fault is not None and fault.action == "stall" and 0 < fault.after < len(data):
            self.wfile.write(data[: fault.after])
            self.wfile.flush()
            p._hang(fault)  # the rest goes once the fault is removed
            if p._stopping:
                return self._reset()
            data = data[fault.after:]
        if fault is not None and fault.action == "drip" and not self._drip(fault, data):
            return
        if fault is None or fault.action != "drip":
            self.wfile.write(data)

    def _drip(self, fault: Fault, data: bytes) -> bool:
        """Send ``data`` one byte every ``fault.delay`` s (each read stays under its timeout) while the fault
        is in place, the rest at once when it is removed; False if the answer ends here (stopping, or the
        client went away)."""
        p = self.owner
        try:
            for i in range(len(data)):
                if p._drip_wait(fault):
                    if p._stopping:
                        self._reset()
                        return False
                    self.wfile.write(data[i:])  # the fault was removed
                    break
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
        except OSError:  # the client gave up on the tarpit
            return False
        p._record(self.command, self.path, "dripped")
        return True

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle
