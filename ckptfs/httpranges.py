"""Ranged GETs of an ``http(s)://`` store, received straight into the reader's chunk buffer.

Why not fsspec's HTTP filesystem (which ckptfs still uses for an http store's listing and its manifest):
on a read it runs every connection's bytes through one asyncio thread (aiohttp), then hands them through
pyarrow as new ``bytes`` that the reader copies once more.  A mount prefetching a 2 GiB checkpoint over 16
connections spent 2.3–2.5 core-seconds per GiB that way against 1.3 here, hashing included, and its event
loop thread was the mount's busiest (docs/bench/design-measurements.md): on a node whose cores also
unpickle the checkpoint and import torch, that CPU is start-up time.  Here each fetch thread owns its
keep-alive connections (``http.client``) and ``readinto`` fills the chunk buffer from the socket, the
hash following each piece while it is still in cache.

What a store's server may do wrong is checked, never trusted: a ``206`` must carry the ``Content-Range``
asked for, a ``200`` (Range ignored) is accepted only when it is exactly the range (the whole object), a body
that ends early is a short read, and a redirect is followed a few times, its ``Location`` resolved against
the request.  Credentials in the URI (``https://user:password@host/…``) become a Basic header sent only to
that host, never to one a redirect names, and never printed.  Every failure is an ``OSError`` (a missing
object ``FileNotFoundError``), so the reader's retries and EIO apply as for any store.
"""

from __future__ import annotations

import base64
import http.client
import re
import ssl
import threading
import urllib.parse
import weakref
from typing import Any

from bootseer.log import redact

_PIECE = 256 << 10  # receive/hash granularity (see ckptfs.store._PIECE)
_MAX_REDIRECTS = 5
_ERROR_BODY = 4096  # bytes of an error response kept for the message
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")
# A kept-alive connection the server has since closed fails on its next request before any byte of a
# response: that is not the store failing, so it is retried once on a new connection, uncounted.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class HttpRanges:
    """Ranged reads of objects under one ``http(s)://`` root, thread-safe (connections are per thread)."""

    def __init__(self, *, timeout: float = 60.0, context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self._context = context
        self._local = threading.local()
        self._lock = threading.Lock()
        # every thread's connections, for close(); weak, so a finished thread's go with its thread-local
        self._all: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()

    # -- connections ---------------------------------------------------------------------------------
    def _conns(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        conns: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = self._conns()
        c = conns.get((scheme, netloc))
        if c is None:
            host = netloc.rsplit("@", 1)[-1]
            if scheme == "https":
                if self._context is None:
                    self._context = ssl.create_default_context()  # system CAs, SSL_CERT_FILE/SSL_CERT_DIR
                c = http.client.HTTPSConnection(host, timeout=self.timeout, context=self._context)
            else:
                c = http.client.HTTPConnection(host, timeout=self.timeout)
            conns[(scheme, netloc)] = c
            with self._lock:
                self._all.add(c)
        return c

    def _drop(self, scheme: str, netloc: str) -> None:
        """Close this thread's socket to ``netloc``; the connection object opens a new one on its next request."""
        c = self._conns().get((scheme, netloc))
        if c is not None:
            c.close()

    def close(self) -> None:
        """Close every thread's connections (the store is closed; threads may still hold references)."""
        with self._lock:
            conns = list(self._all)
        for c in conns:
            c.close()

    # -- reads ---------------------------------------------------------------------------------------
    def read_into(self, url: str, offset: int, out: memoryview, hasher: Any = None) -> None:
        """Fill ``out`` with the bytes of ``url`` from ``offset``, feeding ``hasher`` as they arrive."""
        n = len(out)
        if n == 0:
            return
        origin = urllib.parse.urlsplit(url)
        auth = _basic_auth(origin)
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise OSError(f"cannot read {redact(url)}: not an http(s) URL")
            headers = {"Range": f"bytes={offset}-{offset + n - 1}", "Accept-Encoding": "identity"}
            if auth is not None and parts.netloc == origin.netloc and parts.scheme == origin.scheme:
                headers["Authorization"] = auth  # only to the host the credentials came with
            resp = self._request(parts, headers)
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise OSError(f"{redact(url)}: HTTP {resp.status} without a Location")
                    url = urllib.parse.urljoin(url, location)
                    self._finish(parts, resp)
                    continue
                self._receive(url, parts, resp, offset, out, hasher)
                return
            except BaseException:
                self._drop(parts.scheme, parts.netloc)  # a half-read response leaves the connection unusable
                raise
        raise OSError(f"{redact(url)}: more than {_MAX_REDIRECTS} redirects")

    def _request(self, parts: urllib.parse.SplitResult, headers: dict[str, str]) -> http.client.HTTPResponse:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        for attempt in (0, 1):
            c = self._connect(parts.scheme, parts.netloc)
            reused = c.sock is not None
            try:
                c.request("GET", target, headers=headers)
                return c.getresponse()
            except _STALE:
                self._drop(parts.scheme, parts.netloc)
                if not reused or attempt:
                    raise
            except (OSError, http.client.HTTPException) as e:
                self._drop(parts.scheme, parts.netloc)
                if isinstance(e, OSError):
                    raise
                raise OSError(f"{parts.scheme}://{parts.hostname}: {e!r}") from e
        raise AssertionError("unreachable")

    def _receive(self, url: str, parts: urllib.parse.SplitResult, resp: http.client.HTTPResponse, offset: int,
                 out: memoryview, hasher: Any) -> None:
        n = len(out)
        where = f"{redact(url)} bytes {offset}-{offset + n - 1}"
        if resp.status == 404:
            raise FileNotFoundError(f"{where}: HTTP 404")
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
            if not m or int(m.group(1)) != offset or int(m.group(2)) != offset + n - 1:
                raise OSError(f"{where}: the server answered Content-Range {resp.getheader('Content-Range')!r}")
        elif resp.status == 200:
            # Range ignored: usable only if the whole object is exactly the range; never read a body
            # bigger than what was asked for.
            if offset != 0 or resp.length != n:
                raise OSError(f"{where}: the server ignored the Range header (HTTP 200, "
                              f"{resp.length if resp.length is not None else 'unknown'} bytes)")
        else:
            body = resp.read(_ERROR_BODY).decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"{where}: HTTP {resp.status} {resp.reason}" + (f": {body[0][:200]}" if body else ""))
        if resp.length is not None and resp.length != n:
            raise OSError(f"{where}: the server sends {resp.length} bytes")
        got = 0
        try:
            while got < n:
                piece = out[got : min(n, got + _PIECE)]
                k = resp.readinto(piece)
                if not k:
                    raise OSError(f"{where}: short read, the body ended after {got} bytes")
                if hasher is not None:
                    hasher.update(piece[:k])
                got += k
        except (TimeoutError, http.client.HTTPException) as e:
            raise OSError(f"{where}: {e!r} after {got} bytes") from e
        self._finish(parts, resp)

    def _finish(self, parts: urllib.parse.SplitResult, resp: http.client.HTTPResponse) -> None:
        """Leave the connection ready for the next request: drain a small remaining body, else close."""
        if resp.length is not None and resp.length <= _ERROR_BODY:
            resp.read()
        if not resp.isclosed() or resp.will_close:
            self._drop(parts.scheme, parts.netloc)


def _basic_auth(parts: urllib.parse.SplitResult) -> str | None:
    if parts.username is None:
        return None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
