"""How every registry request is made: endpoints (mirrors, TLS, headers) from containerd's ``hosts.toml``
(:mod:`bootseer.hosts`), auth from docker's config and the token flow (:mod:`bootseer.auth`), retries with
exponential backoff and jitter on 408/429/5xx (not 501/505), timeouts, connection resets and bodies cut off,
honouring ``Retry-After``; a mirror answering 404 or failing hands over to the next endpoint, as containerd
does.  A 4xx other than 408/429 is an answer, not retried.  ``with client.deadline(seconds):`` bounds every
call in the block, retries and their waits included, and bodies are read as they arrive so that the deadline
holds against a server that drips them: the snapshotter's Prepare path uses it, since containerd is waiting.

Nothing here logs a header value or a URL with credentials (we never put credentials in URLs).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import requests
import urllib3

from bootseer import __version__
from bootseer.auth import Authenticator, AuthError, Credentials, CredentialSource, DockerConfig
from bootseer.hosts import Endpoint, HostsResolver
from bootseer.log import redact
from bootseer.reference import Reference
from bootseer.registry.errors import (
    NotFound,
    RegistryError,
    TransientError,
    Unauthorized,
)

log = logging.getLogger("bootseer.registry")

RETRY_STATUS = frozenset({408, 429, *range(500, 600)} - {501, 505})  # worth asking again: load, gateways
Body = bytes | Callable[[], Iterable[bytes] | IO[bytes] | bytes] | None


class Transport:
    """The client's state and its request machinery (the operations are in :mod:`~bootseer.registry.manifests`,
    :mod:`~bootseer.registry.blobs` and :mod:`~bootseer.registry.referrers`); thread-safe: a ``requests``
    session per thread, shared auth."""


    def __init__(
        self,
        *,
        hosts_dir: Path | str | None = None,
        credentials: CredentialSource | dict[str, Credentials] | Path | str | None = None,
        plain_http: bool = False,
        insecure: bool = False,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        user_agent: str = f"bootseer/{__version__}",
    ) -> None:
        self.hosts = HostsResolver(Path(hosts_dir) if hosts_dir else None, plain_http, insecure)
        if isinstance(credentials, (str, Path)):
            credentials = DockerConfig(credentials)
        self._local = threading.local()
        self.auth = Authenticator(credentials, timeout=read_timeout)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.timeout = (connect_timeout, read_timeout)
        self.user_agent = user_agent
        self._ref_locks: dict[str, threading.Lock] = {}
        self._ref_locks_guard = threading.Lock()
        self._no_referrers_api: dict[str, float] = {}  # registry → time.monotonic() to ask the API again
        self.retried: dict[str, int] = {}  # retries by reason (http_503, reset, cut, …), for logs and tests

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # no proxy or ~/.netrc credentials from the environment: hosts.toml says where
            s.headers["User-Agent"] = self.user_agent
            self._local.session = s
        return s

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Calls made in this thread inside the block end within ``seconds`` (or by an enclosing deadline),
        retries included: requests' timeouts are clipped to what is left, and no retry starts whose wait
        (backoff, ``Retry-After``) would end past it — the call raises :class:`TransientError` instead."""
        outer = getattr(self._local, "deadline", None)
        mine = time.monotonic() + seconds
        self._local.deadline = mine if outer is None else min(outer, mine)
        try:
            yield
        finally:
            self._local.deadline = outer

    def _left(self) -> float | None:
        d = getattr(self._local, "deadline", None)
        return None if d is None else d - time.monotonic()

    def _timeout(self, what: str) -> tuple[float, float]:
        """(connect, read) timeouts for the next request, clipped to the deadline; raises past it."""
        left = self._left()
        if left is None:
            return self.timeout
        if left <= 0:
            raise TransientError(f"{what}: deadline passed")
        return (min(self.timeout[0], left), min(self.timeout[1], left))

    def _count(self, reason: str) -> None:
        with self._ref_locks_guard:
            self.retried[reason] = self.retried.get(reason, 0) + 1

    def _sleep_backoff(self, attempt: int, resp: requests.Response | None = None, what: str = "request",
                       reason: str = "other") -> None:
        """Wait before retry ``attempt + 1``: jittered exponential backoff, at least the server's
        ``Retry-After``; raises :class:`TransientError` if that wait would end past the call's deadline."""
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
        asked = _retry_after(resp.headers.get("Retry-After")) if resp is not None else None
        if asked is not None:
            delay = max(delay, asked)
            if self._left() is None:
                delay = min(delay, max(self.max_backoff, 60.0))  # no deadline: still not forever
        left = self._left()
        if left is not None and delay >= left:
            why = f"Retry-After {asked:.0f}s" if asked is not None and asked >= left else "no time left to retry"
            raise TransientError(f"{what}: {why} ({max(0.0, left):.1f}s left of the deadline)")
        self._count(reason)
        time.sleep(delay)  # backoff between retries, not synchronisation

    def _send(
        self,
        ep: Endpoint,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...],
        ok: Iterable[int] = (200,),
        headers: dict[str, str] | None = None,
        data: Body = None,
        stream: bool = False,
        retries: int | None = None,
        redirects: bool = True,
        retry_codes: tuple[str, ...] = (),
    ) -> requests.Response:
        """One logical request to one endpoint: auth challenges answered, transient failures retried — and a
        4xx answer whose (first) error code is in ``retry_codes``, which for this request means "a moment
        later it succeeds"."""
        ok = tuple(ok)
        retries = self.retries if retries is None else retries
        authed = False
        attempt = 0
        last: str = ""
        while True:
            hdrs = {k: v for k, v in ep.headers}
            hdrs.update(headers or {})
            cached = self.auth.cached_header(ep.auth_host, scopes, self._cred_host(ep))
            if cached and "Authorization" not in hdrs:
                hdrs["Authorization"] = cached
            body = data() if callable(data) else data
            log.debug("%s %s", method, url)
            try:
                resp = self.session.request(method, url, headers=hdrs, data=body, stream=stream,
                                            timeout=self._timeout(f"{method} {_path(url)} on {ep.host}"),
                                            verify=ep.verify, cert=ep.client_cert, allow_redirects=redirects)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{e.__class__.__name__}: {e}"
                if attempt < retries:
                    log.info("%s %s: %s; retrying", method, _path(url), redact(last)[:200])
                    self._sleep_backoff(attempt, what=f"{method} {_path(url)} on {ep.host}: {redact(last)[:200]}",
                                        reason="timeout" if isinstance(e, requests.Timeout) else "reset")
                    attempt += 1
                    continue
                raise TransientError(f"{method} {_path(url)} on {ep.host}: {last}") from e
            finally:
                if hasattr(body, "close"):
                    body.close()  # type: ignore[union-attr]
            if resp.status_code in ok:
                return resp
            if resp.status_code == 401 and not authed:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                if not challenge:
                    raise Unauthorized(f"{method} {_path(url)} on {ep.host}: 401 without a challenge", 401)
                try:
                    headers = dict(headers or {})
                    headers["Authorization"] = self.auth.answer(ep.auth_host, challenge, scopes,
                                                                self._cred_host(ep), verify=ep.verify,
                                                                cert=ep.client_cert)
                except AuthError as e:
                    raise Unauthorized(str(e), 401) from e
                authed = True
                continue
            if resp.status_code in RETRY_STATUS and attempt < retries:
                log.info("%s %s: HTTP %d; retrying", method, _path(url), resp.status_code)
                resp.close()
                self._sleep_backoff(attempt, resp, f"{method} {_path(url)} on {ep.host}: HTTP {resp.status_code}",
                                    f"http_{resp.status_code}")
                attempt += 1
                continue
            err = _error_from(resp, method, url, ep.host)
            if retry_codes and err.code in retry_codes and attempt < retries:
                log.info("%s %s: %s; retrying", method, _path(url), err.code)
                self._sleep_backoff(attempt, what=str(err), reason=f"code_{err.code}")
                attempt += 1
                continue
            raise err

    @staticmethod
    def _cred_host(ep: Endpoint) -> str:
        return ep.auth_host

    def _endpoints(self, ref: Reference, capability: str) -> list[Endpoint]:
        eps = self.hosts.endpoints(ref.registry, capability)
        if not eps:
            raise RegistryError(f"{ref.registry}: no endpoint in hosts.toml has the {capability!r} capability")
        return eps

    def _request(self, ref: Reference, method: str, path: str, *, capability: str, push: bool = False,
                 extra_scopes: tuple[str, ...] = (), **kw: Any) -> tuple[Endpoint, requests.Response]:
        """A request for ``path`` (below ``/v2``), tried on each endpoint with ``capability`` in turn."""
        scopes = (f"repository:{ref.repository}:{'pull,push' if push else 'pull'}", *extra_scopes)
        eps = self._endpoints(ref, capability)
        err: RegistryError | None = None
        for i, ep in enumerate(eps):
            url = ep.url(path, ref.registry)
            try:
                return ep, self._send(ep, method, url, scopes=scopes, **kw)
            except RegistryError as e:
                # a mirror that does not have it, or is down, hands over to the next endpoint
                handover = isinstance(e, (NotFound, TransientError)) or (e.status or 0) >= 500
                if i == len(eps) - 1 or not handover:
                    raise
                log.info("%s %s via %s failed (%s); trying the next endpoint", method, path, ep.host, e)
                err = e
        raise err or RegistryError("no endpoint")

    def _get_small(self, ref: Reference, path: str, limit: int, what: str, *, capability: str,
                   headers: dict[str, str] | None = None) -> tuple[requests.Response, bytes]:
        """(response, body) of a GET whose body is read whole (manifests, referrers, configs, indexes): a body
        cut off or stalled is asked for again, like a transient status (:meth:`_send` retries those)."""
        attempt = 0
        while True:
            _, resp = self._request(ref, "GET", path, capability=capability, headers=headers, stream=True)
            try:
                return resp, _read_limited(resp, limit, what, self._left)
            except TransientError as e:
                if attempt >= self.retries:
                    raise
                log.info("%s of %s: %s; retrying", what, ref.name, e)
                self._sleep_backoff(attempt, what=str(e), reason="cut")
                attempt += 1


def as_reference(ref: Reference | str) -> Reference:
    """Every operation takes a reference or its string form; the modules of the package share this one coercion."""
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def _path(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header (delta-seconds or an HTTP date) asks for; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return None if when is None else max(0.0, when.timestamp() - time.time())


def _read_limited(resp: requests.Response, limit: int, what: str,
                  left: Callable[[], float | None] = lambda: None) -> bytes:
    """The whole body, at most ``limit`` bytes, read before the call's deadline (``left()``: seconds left, or
    None).  ``read1`` returns what one socket read brings, so the deadline is checked as bytes arrive: a
    registry dripping a byte at a time keeps each read under its timeout, but not the body past the deadline."""
    buf = bytearray()
    try:
        while True:
            chunk = resp.raw.read1(64 << 10, decode_content=True)
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                raise RegistryError(f"{what} larger than {limit} bytes")
            remaining = left()
            if remaining is not None and remaining <= 0:
                raise TransientError(f"{what}: deadline passed after {len(buf)} bytes of the body")
    except (urllib3.exceptions.HTTPError, OSError, requests.RequestException) as e:
        raise TransientError(f"{what}: connection lost while reading: {e}") from e
    finally:
        resp.close()
    return bytes(buf)


def _error_from(resp: requests.Response, method: str, url: str, host: str) -> RegistryError:
    code = None
    detail = ""
    try:
        text = resp.text[:2000]
        doc = json.loads(text) if text.strip().startswith("{") else {}
        errs = doc.get("errors") or []
        if errs:
            code = errs[0].get("code")
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs)
        else:
            detail = text.strip().splitlines()[0][:200] if text.strip() else ""
    except (ValueError, AttributeError, requests.RequestException):
        pass
    finally:
        resp.close()
    msg = f"{method} {_path(url)} on {host}: HTTP {resp.status_code}" + (f" ({detail})" if detail else "")
    if resp.status_code == 404:
        return NotFound(msg, 404, code)
    if resp.status_code in (401, 403):
        return Unauthorized(msg, resp.status_code, code)
    if resp.status_code in RETRY_STATUS:
        return TransientError(msg, resp.status_code, code)
    return RegistryError(msg, resp.status_code, code)
