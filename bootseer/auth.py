"""Registry authentication: Docker-style credentials and the challenge/token flow of the distribution spec.

* Credentials come from ``~/.docker/config.json`` (or ``$DOCKER_CONFIG``, or a given file): ``auths``
  entries with a base64 ``auth`` (``user:password``), ``username``/``password`` or an ``identitytoken``, and the
  ``credHelpers`` / ``credsStore`` helpers (``docker-credential-<name> get``), exactly the places ``docker login``
  and ``nerdctl login`` write to, so a node needs no BootSeer-specific secret.
* A 401 carries ``WWW-Authenticate``.  ``Basic`` → send the credentials.  ``Bearer realm=…,service=…,scope=…`` →
  ask the realm for a token for the scopes we need (anonymously when we have no credentials; with an
  identity token through the OAuth2 refresh-token grant), cache it per (host, scopes) until shortly before it
  expires, and retry the request with it.

Secrets never reach logs or exception messages: :class:`Credentials` masks itself in ``repr``, and messages
built here never include header values.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import requests

from bootseer.log import redact
from bootseer.reference import DEFAULT_REGISTRY, is_loopback

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
# how long a registry token (CRI's AuthConfig.registry_token) is sent before its source is asked again: it
# comes without an expiry, and a newer one may have replaced it there
REGISTRY_TOKEN_TTL = 300.0


class AuthError(RuntimeError):
    """Authentication failed; the message names the host and the reason, never a secret."""


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    # a bearer token for the registry itself, as CRI's AuthConfig.registry_token carries it: sent as is,
    # no token realm is asked
    registry_token: str = field(default="", repr=False)

    def __repr__(self) -> str:  # dataclass repr would already hide them; be explicit about why
        token = "***" if self.identity_token else ""
        registry = ", registry_token=***" if self.registry_token else ""
        return f"Credentials(username={self.username!r}, password=***, identity_token={token}{registry})"

    @property
    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class CredentialSource(Protocol):
    """Where an :class:`Authenticator` finds credentials: ``get(host, repository)``.  ``repository`` (from the
    request's scope; "" when there is none) lets a source keep credentials per repository, as the CRI pull
    secrets of :mod:`bootseer.pullsecrets` are; a docker config ignores it."""

    def get(self, host: str, repository: str = "") -> Credentials | None: ...


def normalize_host(key: str) -> str:
    """A registry's name as credentials are keyed: ``https://index.docker.io/v1/`` → ``docker.io``."""
    return _normalize_host(key)


def _normalize_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``; ``http://h:5000/x`` → ``h:5000``."""
    host = key
    if "://" in host:
        host = urlparse(host).netloc or host
    host = host.split("/", 1)[0]
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = DEFAULT_REGISTRY
    return host


class DockerConfig:
    """Credentials from a docker ``config.json``."""

    def __init__(self, path: Path | str | None = None) -> None:
        if path is None:
            base = os.environ.get("DOCKER_CONFIG")
            path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
        self.path = Path(path)
        self._doc: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._doc is None:
            try:
                self._doc = json.loads(self.path.read_text())
            except FileNotFoundError:
                self._doc = {}
            except (OSError, ValueError) as e:
                raise AuthError(f"cannot read docker config {self.path}: {e.__class__.__name__}") from e
        return self._doc

    def get(self, host: str, repository: str = "") -> Credentials | None:
        """Credentials for ``host`` (a registry name like ``docker.io`` or ``h:5000``), or None (a docker config
        is per host: ``repository`` is not used)."""
        doc = self._load()
        want = _normalize_host(host)
        helper = (doc.get("credHelpers") or {}).get(want) or (doc.get("credHelpers") or {}).get(host)
        if helper:
            return _from_helper(helper, want)
        for key, entry in (doc.get("auths") or {}).items():
            if _normalize_host(key) != want or not isinstance(entry, dict):
                continue
            creds = _from_entry(entry, key)
            if creds:
                return creds
        if doc.get("credsStore"):
            return _from_helper(doc["credsStore"], want)
        return None


def _from_entry(entry: dict[str, Any], key: str) -> Credentials | None:
    user, pw = entry.get("username", ""), entry.get("password", "")
    if entry.get("auth"):
        try:
            raw = base64.b64decode(entry["auth"], validate=False).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise AuthError(f"docker config: the 'auth' of {key} is not base64 user:password") from e
        if ":" not in raw:
            raise AuthError(f"docker config: the 'auth' of {key} has no ':' between user and password")
        user, pw = raw.split(":", 1)
    token = entry.get("identitytoken", "")
    if user or pw or token:
        return Credentials(user, pw, token)
    return None


def _from_helper(helper: str, host: str) -> Credentials | None:
    server = "https://index.docker.io/v1/" if host == DEFAULT_REGISTRY else host
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=server, capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError as e:
        raise AuthError(f"credential helper docker-credential-{helper} not found") from e
    if proc.returncode != 0:
        if "credentials not found" in proc.stdout.lower() + proc.stderr.lower():
            return None
        raise AuthError(f"credential helper {helper} failed for {host} (exit {proc.returncode})")
    doc = json.loads(proc.stdout)
    user, secret = doc.get("Username", ""), doc.get("Secret", "")
    if user == "<token>":
        return Credentials("", "", secret)
    return Credentials(user, secret)


# ------------------------------------------------------------------------------------------ challenges
@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: dict[str, str]


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value: ``Bearer realm="…",service="…",scope="a b"`` (quoted commas kept)."""
    out: list[Challenge] = []
    i, n = 0, len(header)
    current: Challenge | None = None
    while i < n:
        while i < n and header[i] in " ,":
            i += 1
        start = i
        while i < n and header[i] not in " =,":
            i += 1
        token = header[start:i]
        if not token:
            break
        j = i
        while j < n and header[j] == " ":
            j += 1
        if j < n and header[j] == "=" and current is not None:
            i = j + 1
            while i < n and header[i] == " ":
                i += 1
            if i < n and header[i] == '"':
                i += 1
                buf = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(header[i])
                    i += 1
                i += 1
                value = "".join(buf)
            else:
                vs = i
                while i < n and header[i] != ",":
                    i += 1
                value = header[vs:i].strip()
            current.params[token.lower()] = value
        else:
            current = Challenge(token.lower(), {})
            out.append(current)
            i = j
    return out


def _repository(scopes: tuple[str, ...]) -> str:
    """The repository of the first ``repository:<name>:<actions>`` scope, or ""."""
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        if kind == "repository" and ":" in rest:
            return rest.rpartition(":")[0]
    return ""


# ---------------------------------------------------------------------------------------- authenticator
@dataclass
class _Token:
    value: str
    expires: float


class Authenticator:
    """Answers 401 challenges and remembers what worked, per host and scope set.

    Thread-safe: the fetcher and the sidecar's workers share one.
    """

    def __init__(self, credentials: CredentialSource | dict[str, Credentials] | None = None,
                 session: requests.Session | None = None, timeout: float = 30.0) -> None:
        self._creds = credentials if credentials is not None else DockerConfig()
        if session is None:
            session = requests.Session()
            session.trust_env = False  # ~/.netrc must not add credentials to a token request
        self._session = session
        self._timeout = timeout
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic_hosts: set[str] = set()
        self._lock = threading.Lock()

    def credentials(self, host: str, scopes: tuple[str, ...] = ()) -> Credentials | None:
        """What the source has for ``host`` and the repository of the first ``repository:<name>:…`` scope."""
        if isinstance(self._creds, dict):
            return self._creds.get(_normalize_host(host)) or self._creds.get(host)
        return self._creds.get(host, _repository(scopes))

    def cached_header(self, host: str, scopes: tuple[str, ...], cred_host: str | None = None) -> str | None:
        """An ``Authorization`` value to send up front, if an earlier challenge told us what works."""
        with self._lock:
            tok = self._tokens.get((host, " ".join(scopes)))
            if tok and tok.expires > time.monotonic():
                return "Bearer " + tok.value
            if host in self._basic_hosts:
                creds = self.credentials(cred_host or host, scopes)
                return creds.basic if creds else None
        return None

    def answer(self, host: str, www_authenticate: str, scopes: tuple[str, ...],
               cred_host: str | None = None, *, verify: bool | str = True,
               cert: tuple[str, str] | str | None = None) -> str:
        """Return the ``Authorization`` value that answers the challenge; raise :class:`AuthError` if none can.

        ``verify`` and ``cert`` are the registry endpoint's TLS settings (``hosts.toml``'s ``ca`` and ``client``):
        the token realm is asked with them, as containerd's per-host client and Docker's endpoint transport ask
        it — an operator's realm on another host has its certificate from the same private CA."""
        challenges = parse_www_authenticate(www_authenticate)
        creds = self.credentials(cred_host or host, scopes)
        for ch in challenges:
            if ch.scheme == "bearer" and "realm" in ch.params:
                if creds and creds.registry_token:  # a token for this registry already: no realm to ask
                    with self._lock:
                        self._tokens[(host, " ".join(scopes))] = _Token(creds.registry_token,
                                                                         time.monotonic() + REGISTRY_TOKEN_TTL)
                    return "Bearer " + creds.registry_token
                token = self._fetch_token(host, ch.params, scopes, creds, verify, cert)
                return "Bearer " + token
        for ch in challenges:
            if ch.scheme == "basic":
                if not creds or not (creds.username or creds.password):
                    raise AuthError(f"{host} asks for basic auth and no credentials are configured for it")
                with self._lock:
                    self._basic_hosts.add(host)
                return creds.basic
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise AuthError(f"{host}: unsupported authentication challenge ({schemes})")

    def forget(self, host: str, scopes: tuple[str, ...]) -> None:
        with self._lock:
            self._tokens.pop((host, " ".join(scopes)), None)

    def forget_repository(self, host: str, repository: str) -> None:
        """Drop the tokens earned for ``repository`` on ``host`` (its credentials changed: a token from the old
        ones must not outlive them here)."""
        want = _normalize_host(host)
        with self._lock:
            for key in [k for k in self._tokens if _normalize_host(k[0]) == want
                        and repository in (_repository((s,)) for s in k[1].split())]:
                del self._tokens[key]

    def _fetch_token(self, host: str, params: dict[str, str], scopes: tuple[str, ...],
                     creds: Credentials | None, verify: bool | str = True,
                     cert: tuple[str, str] | str | None = None) -> str:
        realm = params["realm"]
        rhost = urlparse(realm).hostname or ""
        # the credentials travel to the realm, so the realm's link is what must be safe: a loopback registry
        # (a node-local mirror) naming a plain-HTTP realm on another host must not send them there in clear
        if urlparse(realm).scheme != "https" and creds and not is_loopback(rhost):
            raise AuthError(f"{host}: refusing to send credentials to a non-TLS token realm ({rhost})")
        all_scopes = list(dict.fromkeys([*scopes, *params.get("scope", "").split()]))
        all_scopes = [s for s in all_scopes if s]
        service = params.get("service")
        try:
            if creds and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "bootseer", "scope": " ".join(all_scopes)}
                if service:
                    form["service"] = service
                resp = self._session.post(realm, data=form, timeout=self._timeout, verify=verify, cert=cert)
            else:
                q: list[tuple[str, str]] = [("service", service)] if service else []
                q += [("scope", s) for s in all_scopes]
                auth = (creds.username, creds.password) if creds and (creds.username or creds.password) else None
                resp = self._session.get(realm, params=q, auth=auth, timeout=self._timeout, verify=verify,
                                         cert=cert)
        except requests.RequestException as e:
            raise AuthError(f"{host}: token request to {rhost} failed: {redact(str(e))}") from e
        if resp.status_code in (401, 403):
            raise AuthError(f"{host}: token realm {rhost} refused the credentials (HTTP {resp.status_code})")
        if resp.status_code != 200:
            raise AuthError(f"{host}: token realm {rhost} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError as e:
            raise AuthError(f"{host}: token realm {rhost} returned no JSON") from e
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise AuthError(f"{host}: token realm {rhost} returned no token")
        ttl = float(doc.get("expires_in") or 60)
        with self._lock:
            self._tokens[(host, " ".join(scopes))] = _Token(token, time.monotonic() + max(ttl - 10, ttl / 2))
        log.debug("got a bearer token for %s (%s), valid %.0fs", host, " ".join(all_scopes), ttl)
        return str(token)
