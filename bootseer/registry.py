"""OCI distribution client on ``requests``: what the converter, the sidecar, the snapshotter's fetcher, the
recorder and depsnap need from a registry, and nothing that ties them to one registry product.

* **Manifests**: Docker schema 2, OCI image manifests, manifest lists / OCI indexes with platform selection;
  every manifest fetched by digest, or whose registry names its digest, is checked against its bytes.
* **Blobs**: whole downloads are streamed, resumed with ``Range`` after a dropped connection and verified
  against their digest (:class:`DigestMismatch` otherwise); range reads (:meth:`RegistryClient.get_blob_range`)
  are left to the caller to verify, since only it knows the chunk digests.  Uploads: monolithic or chunked
  (``PATCH`` with ``Content-Range``), and cross-repository mounts, so a blob converted once is linked, not
  re-sent.  An upload that fails half-way is restarted from scratch (a ``PATCH`` is not idempotent).
* **Referrers**: the referrers API, and for registries without it (distribution 2.8) the referrers *tag schema*:
  an OCI index tagged ``sha256-<hex>`` listing the artifacts whose ``subject`` is that manifest.  Pushing a
  referrer updates that index unless the registry answers the manifest ``PUT`` with ``OCI-Subject``.  A
  registry whose referrers route answers a bare 404 (no OCI error body: the route does not exist) is asked
  through the tag schema only for the next :data:`REFERRERS_API_RECHECK` seconds — one round trip less per
  lookup (the snapshotter looks up two referrers per image pull).
* **Transport**: endpoints (mirrors, TLS, headers) from containerd's ``hosts.toml``
  (:mod:`bootseer.hosts`); auth from docker's config and the token flow (:mod:`bootseer.auth`); retries with
  exponential backoff and jitter on 408/429/5xx (not 501/505), timeouts, connection resets and bodies cut
  off (manifests, referrers, small blobs are read again), honouring ``Retry-After``; a mirror answering 404
  or failing hands over to the next endpoint, as containerd does.  A 4xx other than 408/429 is an answer,
  not retried.  ``with client.deadline(seconds):`` bounds every call in the block, retries and their waits
  included (a ``Retry-After`` that ends past it fails the call at once): the snapshotter's Prepare path
  uses it, since containerd is waiting.

Nothing here logs a header value or a URL with credentials (we never put credentials in URLs).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import platform as _platform
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urljoin

import requests
import urllib3

from bootseer import __version__
from bootseer.auth import Authenticator, AuthError, Credentials, DockerConfig
from bootseer.hosts import Endpoint, HostsResolver
from bootseer.log import redact
from bootseer.reference import Reference

log = logging.getLogger(__name__)

REFERRERS_API_RECHECK = 600.0  # seconds a registry without the referrers API is not asked for it again
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
IMAGE_MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (*IMAGE_MANIFEST_TYPES, *INDEX_TYPES)
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest()
RETRY_STATUS = frozenset({408, 429, *range(500, 600)} - {501, 505})  # worth asking again: load, gateways
MAX_MANIFEST_BYTES = 4 << 20


# ----------------------------------------------------------------------------------------------- errors
class RegistryError(RuntimeError):
    """A registry request failed for good; ``status`` and ``code`` (the registry's error code) when known."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(redact(message))
        self.status, self.code = status, code


class NotFound(RegistryError):
    pass


class Unauthorized(RegistryError):
    pass


class DigestMismatch(RegistryError):
    """Downloaded bytes do not hash to the digest they were asked for (or the size is wrong)."""


class TransientError(RegistryError):
    """Retries exhausted on 5xx / timeouts / resets: worth trying again later."""


# ------------------------------------------------------------------------------------------ descriptors
@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None
    platform: dict[str, Any] | None = None
    urls: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        try:
            return cls(d.get("mediaType", ""), d["digest"], int(d["size"]), d.get("annotations"),
                       d.get("artifactType"), d.get("platform"), d.get("urls"))
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"malformed descriptor {json.dumps(d)[:200]}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass
class Manifest:
    """A manifest or index exactly as the registry served it (``raw`` is what its digest covers)."""

    media_type: str
    digest: str
    raw: bytes
    doc: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_bytes(cls, raw: bytes, media_type: str | None = None, digest: str | None = None) -> Manifest:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise RegistryError(f"manifest is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise RegistryError("manifest is not a JSON object")
        mt = doc.get("mediaType") or media_type or ""
        if not mt:  # OCI allows omitting mediaType: tell index from manifest by shape
            mt = MT_OCI_INDEX if "manifests" in doc else MT_OCI_MANIFEST
        return cls(mt, digest or sha256_digest(raw), raw, doc)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_dict(d) for d in self.doc.get("layers") or []]

    @property
    def manifests(self) -> list[Descriptor]:
        return [Descriptor.from_dict(d) for d in self.doc.get("manifests") or []]

    @property
    def config(self) -> Descriptor | None:
        c = self.doc.get("config")
        return Descriptor.from_dict(c) if c else None

    @property
    def subject(self) -> Descriptor | None:
        s = self.doc.get("subject")
        return Descriptor.from_dict(s) if s else None

    @property
    def artifact_type(self) -> str | None:
        at = self.doc.get("artifactType")
        if at:
            return str(at)
        c = self.config
        return c.media_type if c and c.media_type not in (MT_OCI_CONFIG, MT_DOCKER_CONFIG, MT_OCI_EMPTY) else None

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw), artifact_type=self.artifact_type)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hasher(digest: str) -> Any:
    algo = digest.split(":", 1)[0]
    if algo not in ("sha256", "sha512"):
        raise RegistryError(f"unsupported digest algorithm {algo!r}")
    return hashlib.new(algo)


def verify_bytes(data: bytes, digest: str) -> None:
    h = _hasher(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise DigestMismatch(f"content hashes to {got}, expected {digest}")


# ----------------------------------------------------------------------------------------------- platforms
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) < 2 or len(parts) > 3 or not all(parts):
            raise ValueError(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        arch = _ARCH.get(_platform.machine(), _platform.machine())
        return cls("linux", arch, "v8" if arch == "arm64" else None)

    def matches(self, p: dict[str, Any] | None) -> bool:
        if not p:
            return False
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        want = self.variant or ("v8" if self.architecture == "arm64" else None)
        got = p.get("variant") or ("v8" if self.architecture == "arm64" else None)
        return want is None or want == got

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def select_platform(index: Manifest, want: Platform) -> Descriptor:
    """The entry of ``index`` for ``want`` (attestation entries ``unknown/unknown`` never match)."""
    for d in index.manifests:
        if want.matches(d.platform):
            return d
    have = ", ".join(sorted({_fmt_platform(d.platform) for d in index.manifests})) or "none"
    raise NotFound(f"{index.digest}: no manifest for platform {want} (has: {have})")


def _fmt_platform(p: dict[str, Any] | None) -> str:
    if not p:
        return "?"
    return "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)


# ------------------------------------------------------------------------------------------------- client
Body = bytes | Callable[[], Iterable[bytes] | IO[bytes] | bytes] | None


class RegistryClient:
    """One client per process is enough: it is thread-safe (a ``requests`` session per thread, shared auth).

    ``plain_http`` makes registries without a ``hosts.toml`` use ``http://`` (loopback hosts do anyway);
    ``insecure`` skips TLS verification for them.  ``credentials`` is a docker config path, a
    :class:`DockerConfig`, or ``{host: Credentials}``.
    """

    def __init__(
        self,
        *,
        hosts_dir: Path | str | None = None,
        credentials: DockerConfig | dict[str, Credentials] | Path | str | None = None,
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

    # ------------------------------------------------------------------------------------------ transport
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
    ) -> requests.Response:
        """One logical request to one endpoint: auth challenges answered, transient failures retried."""
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
                                                                self._cred_host(ep))
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
            raise _error_from(resp, method, url, ep.host)

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

    # ------------------------------------------------------------------------------------------ manifests
    def get_manifest(self, ref: Reference | str, accept: Iterable[str] = MANIFEST_TYPES) -> Manifest:
        """Fetch a manifest or index by tag or digest, verified against the digest asked for or announced."""
        ref = _ref(ref)
        resp, raw = self._get_small(ref, f"/{ref.repository}/manifests/{ref.reference}", MAX_MANIFEST_BYTES,
                                    "manifest", capability="pull" if ref.digest else "resolve",
                                    headers={"Accept": ", ".join(accept)})
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if ref.digest:
            verify_bytes(raw, ref.digest)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced.startswith("sha256:") and not ref.digest:
            verify_bytes(raw, announced)
        return Manifest.from_bytes(raw, ctype if ctype in MANIFEST_TYPES else None)

    def head_manifest(self, ref: Reference | str, accept: Iterable[str] = MANIFEST_TYPES) -> Descriptor | None:
        """The descriptor of a tag or digest, or None if absent (cheap existence check)."""
        ref = _ref(ref)
        try:
            _, resp = self._request(ref, "HEAD", f"/{ref.repository}/manifests/{ref.reference}",
                                    capability="pull" if ref.digest else "resolve",
                                    headers={"Accept": ", ".join(accept)})
        except NotFound:
            return None
        digest = resp.headers.get("Docker-Content-Digest") or ref.digest or ""
        size = int(resp.headers.get("Content-Length") or 0)
        return Descriptor(resp.headers.get("Content-Type", "").split(";")[0], digest, size)

    def resolve_image(self, ref: Reference | str, platform: Platform | str | None = None
                      ) -> tuple[Manifest, Manifest | None]:
        """(image manifest, index it was selected from or None) for ``ref`` on ``platform`` (default: host)."""
        ref = _ref(ref)
        top = self.get_manifest(ref)
        if not top.is_index:
            return top, None
        want = Platform.parse(platform) if isinstance(platform, str) else (platform or Platform.host())
        child = select_platform(top, want)
        return self.get_manifest(ref.with_digest(child.digest)), top

    def put_manifest(self, ref: Reference | str, raw: bytes, media_type: str, reference: str | None = None) -> str:
        """Upload a manifest under ``reference`` (a tag, or by default its own digest); return its digest."""
        digest, _ = self._put_manifest(_ref(ref), raw, media_type, reference)
        return digest

    def _put_manifest(self, ref: Reference, raw: bytes, media_type: str,
                      reference: str | None) -> tuple[str, requests.Response]:
        digest = sha256_digest(raw)
        target = reference or (ref.tag if ref.tag and not ref.digest else None) or digest
        _, resp = self._request(ref, "PUT", f"/{ref.repository}/manifests/{target}", capability="push", push=True,
                                ok=(200, 201, 202), headers={"Content-Type": media_type}, data=raw)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced != digest:
            raise DigestMismatch(f"registry stored the manifest as {announced}, we sent {digest}")
        return digest, resp

    def list_tags(self, ref: Reference | str) -> list[str]:
        ref = _ref(ref)
        tags: list[str] = []
        path: str | None = f"/{ref.repository}/tags/list?n=1000"
        while path:
            _, resp = self._request(ref, "GET", path, capability="resolve")
            tags += resp.json().get("tags") or []
            link = resp.headers.get("Link", "")
            path = None
            if 'rel="next"' in link:
                nxt = link.split(";")[0].strip().strip("<>")
                path = nxt[len("/v2"):] if nxt.startswith("/v2/") else None
        return tags

    def delete_manifest(self, ref: Reference | str, digest: str) -> None:
        ref = _ref(ref)
        self._request(ref, "DELETE", f"/{ref.repository}/manifests/{digest}", capability="push", push=True,
                      ok=(200, 202))

    # ---------------------------------------------------------------------------------------------- blobs
    def blob_exists(self, ref: Reference | str, digest: str) -> int | None:
        """The blob's size if the repository has it, else None."""
        ref = _ref(ref)
        try:
            _, resp = self._request(ref, "HEAD", f"/{ref.repository}/blobs/{digest}", capability="pull")
        except NotFound:
            return None
        return int(resp.headers.get("Content-Length") or 0)

    def get_blob(self, ref: Reference | str, digest: str, max_size: int = 64 << 20) -> bytes:
        """A small blob (config, index) in memory, verified."""
        ref = _ref(ref)
        _, data = self._get_small(ref, f"/{ref.repository}/blobs/{digest}", max_size, f"blob {digest}",
                                  capability="pull")
        verify_bytes(data, digest)
        return data

    def fetch_blob(self, ref: Reference | str, digest: str, dest: IO[bytes], size: int | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
        """Stream a blob into ``dest`` (a seekable binary file at position 0), resuming with ``Range`` after a
        dropped connection; verify size and digest.  Returns the byte count.  On :class:`DigestMismatch` the
        caller must discard ``dest``."""
        ref = _ref(ref)
        h = _hasher(digest)
        written = 0
        attempt = 0
        while True:
            headers = {"Range": f"bytes={written}-"} if written else {}
            _, resp = self._request(ref, "GET", f"/{ref.repository}/blobs/{digest}", capability="pull",
                                    ok=(200, 206), headers=headers, stream=True)
            if written and resp.status_code == 200:  # the server ignored Range: start over
                dest.seek(0)
                dest.truncate()
                h, written = _hasher(digest), 0
            try:
                for chunk in resp.iter_content(1 << 20):
                    h.update(chunk)
                    dest.write(chunk)
                    written += len(chunk)
                    if progress:
                        progress(len(chunk))
                    if size is not None and written > size:
                        raise DigestMismatch(f"blob {digest}: more than the {size} bytes announced")
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                resp.close()
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest}: download failed after {attempt + 1} tries: {e}") from e
                log.info("blob %s: connection lost at %d bytes (%s); resuming", digest, written, e.__class__.__name__)
                self._sleep_backoff(attempt, what=f"blob {digest}: {e}", reason="cut")
                attempt += 1
                continue
            break
        if size is not None and written != size:
            raise DigestMismatch(f"blob {digest}: got {written} bytes, the manifest says {size}")
        got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if got != digest:
            raise DigestMismatch(f"blob {digest}: content hashes to {got}")
        return written

    def get_blob_range(self, ref: Reference | str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (the caller verifies them against its chunk digests)."""
        ref = _ref(ref)
        end = offset + length - 1
        attempt = 0
        while True:
            _, resp = self._request(ref, "GET", f"/{ref.repository}/blobs/{digest}", capability="pull",
                                    ok=(200, 206), headers={"Range": f"bytes={offset}-{end}"}, stream=True)
            try:
                if resp.status_code == 206:
                    data = bytes(resp.raw.read(length + 1, decode_content=True))
                else:  # no range support (some mirrors): skip to the range
                    buf = bytearray()
                    skipped = 0
                    for chunk in resp.iter_content(1 << 20):
                        if skipped + len(chunk) <= offset:
                            skipped += len(chunk)
                            continue
                        buf += chunk[max(0, offset - skipped):]
                        skipped = offset
                        if len(buf) >= length:
                            break
                    data = bytes(buf[:length])
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    OSError) as e:
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest} [{offset}, +{length}): {e}") from e
                self._sleep_backoff(attempt, what=f"blob {digest} [{offset}, +{length}): {e}", reason="cut")
                attempt += 1
                continue
            finally:
                resp.close()
            if len(data) != length:
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest} [{offset}, +{length}): got {len(data)} bytes")
                self._sleep_backoff(attempt, what=f"blob {digest} [{offset}, +{length}): short", reason="cut")
                attempt += 1
                continue
            return data

    def mount_blob(self, ref: Reference | str, digest: str, from_repo: str) -> bool:
        """Link ``digest`` from ``from_repo`` into ``ref``'s repository without sending it; True if mounted."""
        ref = _ref(ref)
        q = urlencode({"mount": digest, "from": from_repo})
        ep, resp = self._request(ref, "POST", f"/{ref.repository}/blobs/uploads/?{q}", capability="push",
                                 push=True, ok=(201, 202), extra_scopes=(f"repository:{from_repo}:pull",),
                                 headers={"Content-Length": "0"})
        if resp.status_code == 201:
            return True
        loc = resp.headers.get("Location")
        if loc:  # the registry opened an upload instead: cancel it, the caller decides what to do
            with contextlib.suppress(RegistryError):
                self._send(ep, "DELETE", urljoin(ep.base + "/", loc), scopes=(), ok=(200, 202, 204, 404),
                           retries=0)
        return False

    def push_blob(self, ref: Reference | str, source: bytes | Path | str, digest: str | None = None, *,
                  chunk_size: int | None = None, mount_from: Iterable[str] = (),
                  progress: Callable[[int], None] | None = None) -> Descriptor:
        """Upload a blob (bytes or a file) unless the repository has it; try ``mount_from`` repositories first.

        ``chunk_size`` None: one ``PUT``; otherwise ``PATCH`` chunks of that size, then the closing ``PUT``.
        """
        ref = _ref(ref)
        if isinstance(source, (str, Path)):
            body: bytes | Path = Path(source)
            size = Path(source).stat().st_size
            digest = digest or _file_digest(Path(source))
        else:
            size, body = len(source), source
            digest = digest or sha256_digest(source)
        desc = Descriptor("application/octet-stream", digest, size)
        have = self.blob_exists(ref, digest)
        if have is not None:
            return desc
        for repo in mount_from:
            if repo != ref.repository and self.mount_blob(ref, digest, repo):
                log.debug("mounted %s from %s into %s", digest, repo, ref.repository)
                return desc
        attempt = 0
        while True:
            try:
                self._upload(ref, body, size, digest, chunk_size, progress)
                return desc
            except TransientError:
                if attempt >= self.retries:
                    raise
                log.info("upload of %s failed; restarting it", digest)
            except RegistryError as e:
                # Another pusher's upload of the same blob committed meanwhile: docker-registry 2.8 commits every
                # upload onto the blob's one path and may answer the loser DIGEST_INVALID (seen with two
                # `depsnap run` builders pushing the same base blobs).  The blob is there: done.  Not yet there:
                # the other commit is under way — look again, or upload again, after a pause.
                if e.code != "DIGEST_INVALID" or attempt >= self.retries:
                    raise
                log.info("upload of %s lost a race with another upload of it; looking again", digest)
            self._sleep_backoff(attempt)
            attempt += 1
            if self.blob_exists(ref, digest) is not None:  # (another upload of it may have committed)
                return desc

    def _upload(self, ref: Reference, source: bytes | Path, size: int, digest: str, chunk_size: int | None,
                progress: Callable[[int], None] | None) -> None:
        scopes = (f"repository:{ref.repository}:pull,push",)
        ep, resp = self._request(ref, "POST", f"/{ref.repository}/blobs/uploads/", capability="push", push=True,
                                 ok=(202,), headers={"Content-Length": "0"})
        loc = _location(ep, resp)

        def reader(start: int, n: int) -> Callable[[], bytes | IO[bytes] | Iterable[bytes]]:
            if isinstance(source, bytes):
                return lambda: source[start : start + n]
            return lambda: _file_slice(source, start, n, progress)

        if chunk_size is None or size <= chunk_size:
            if isinstance(source, bytes) and progress:
                progress(size)
            resp = self._send(ep, "PUT", _with_query(loc, digest=digest), scopes=scopes, ok=(201,), retries=0,
                              headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                              data=reader(0, size))
        else:
            for start in range(0, size, chunk_size):
                n = min(chunk_size, size - start)
                resp = self._send(ep, "PATCH", loc, scopes=scopes, ok=(202,), retries=0,
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                           "Content-Range": f"{start}-{start + n - 1}"},
                                  data=reader(start, n))
                loc = _location(ep, resp)
                if isinstance(source, bytes) and progress:
                    progress(n)
            resp = self._send(ep, "PUT", _with_query(loc, digest=digest), scopes=scopes, ok=(201,), retries=0,
                              headers={"Content-Length": "0"})
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatch(f"registry stored the upload as {got}, expected {digest}")

    # ------------------------------------------------------------------------------------------ referrers
    def referrers(self, ref: Reference | str, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        """Artifacts whose ``subject`` is ``subject``: referrers API, else the ``sha256-<hex>`` tag schema."""
        ref = _ref(ref)
        path = f"/{ref.repository}/referrers/{subject}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        if self._no_referrers_api.get(ref.registry, 0.0) <= time.monotonic():
            try:
                resp, raw = self._get_small(ref, path, MAX_MANIFEST_BYTES, "referrers", capability="pull",
                                            headers={"Accept": MT_OCI_INDEX})
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
                if ctype == MT_OCI_INDEX or ctype == "application/json":
                    descs = Manifest.from_bytes(raw, MT_OCI_INDEX).manifests
                    if artifact_type and "artifactType" not in resp.headers.get("OCI-Filters-Applied", ""):
                        descs = [d for d in descs if d.artifact_type == artifact_type]
                    return descs
            except RegistryError as e:
                if not isinstance(e, NotFound) and e.status not in (400, 405):
                    raise
                if e.code is None:  # not an OCI error (NAME_UNKNOWN, …) of a registry that has the route
                    self._no_referrers_api[ref.registry] = time.monotonic() + REFERRERS_API_RECHECK
        index = self._referrers_tag_index(ref, subject)
        descs = index.manifests if index else []
        return [d for d in descs if not artifact_type or d.artifact_type == artifact_type]

    def _referrers_tag_index(self, ref: Reference, subject: str) -> Manifest | None:
        try:
            return self.get_manifest(ref.in_repository(ref.repository).with_tag(referrers_tag(subject)),
                                     accept=(MT_OCI_INDEX,))
        except NotFound:
            return None

    def push_referrer(self, ref: Reference | str, raw: bytes, media_type: str = MT_OCI_MANIFEST) -> str:
        """Push an artifact manifest carrying ``subject`` and make it discoverable from its subject.

        Registries with the referrers API index it themselves (they answer ``OCI-Subject``); for the others
        we add it to the ``sha256-<hex>`` tag index.  Updating that tag is read-modify-write: concurrent
        writers in one process are serialised; across processes (the sidecar's index, the recorder's hot
        blocks) distribution has no conditional PUT, so after writing we read the tag back and add our entry
        again if another writer's update replaced ours.  That narrows the race to a writer whose read-back
        falls between its own write and the other's; one sidecar per registry keeps index writes serial.
        """
        ref = _ref(ref)
        man = Manifest.from_bytes(raw, media_type)
        subject = man.subject
        if subject is None:
            raise ValueError("a referrer manifest needs a subject")
        digest, resp = self._put_manifest(ref.in_repository(ref.repository), raw, media_type, None)
        if resp.headers.get("OCI-Subject") == subject.digest:
            return digest
        tag = referrers_tag(subject.digest)
        entry = Descriptor(media_type, digest, len(raw), annotations=man.doc.get("annotations"),
                           artifact_type=man.artifact_type).to_dict()
        with self._lock_for(f"{ref.name}:{tag}"):
            for _ in range(4):
                index = self._referrers_tag_index(ref, subject.digest)
                doc: dict[str, Any] = index.doc if index else {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                                               "manifests": []}
                if any(m.get("digest") == digest for m in doc.get("manifests") or []):
                    return digest
                doc["manifests"] = [*(doc.get("manifests") or []), entry]
                body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
                self._put_manifest(ref.in_repository(ref.repository), body, MT_OCI_INDEX, tag)
            log.warning("referrers tag %s of %s: our entry %s keeps being replaced by other writers", tag,
                        ref.name, digest)
        return digest

    def _lock_for(self, key: str) -> threading.Lock:
        with self._ref_locks_guard:
            return self._ref_locks.setdefault(key, threading.Lock())


# ------------------------------------------------------------------------------------------------ helpers
def referrers_tag(digest: str) -> str:
    """The referrers tag schema: ``<alg>-<ref>`` truncated to a valid tag length."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]


def _ref(ref: Reference | str) -> Reference:
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


def _location(ep: Endpoint, resp: requests.Response) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise RegistryError(f"upload: HTTP {resp.status_code} without a Location header")
    return urljoin(ep.base + "/", loc)


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _FileSlice:
    """``n`` bytes of a file from ``start`` with a ``len()``, so ``requests`` sends Content-Length (not chunked
    transfer encoding, which distribution rejects on uploads) and streams it in 1 MiB pieces."""

    def __init__(self, path: Path, start: int, n: int, progress: Callable[[int], None] | None) -> None:
        self._path, self._start, self._n, self._progress = path, start, n, progress

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[bytes]:
        with open(self._path, "rb") as fh:
            fh.seek(self._start)
            left = self._n
            while left > 0:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    raise RegistryError(f"{self._path}: shorter than expected while uploading")
                left -= len(chunk)
                if self._progress:
                    self._progress(len(chunk))
                yield chunk


def _file_slice(path: Path, start: int, n: int, progress: Callable[[int], None] | None) -> IO[bytes]:
    return _FileSlice(path, start, n, progress)  # type: ignore[return-value]  # iterable body


def default_client(plain_http: bool = False, **kw: Any) -> RegistryClient:
    """A client configured from the environment: ``BOOTSEER_HOSTS_DIR`` (default containerd's certs.d)."""
    hosts_dir = os.environ.get("BOOTSEER_HOSTS_DIR") or "/etc/containerd/certs.d"
    return RegistryClient(hosts_dir=hosts_dir, plain_http=plain_http, **kw)
