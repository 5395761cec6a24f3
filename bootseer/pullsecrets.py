"""Kubernetes pull secrets on a node: the credentials each CRI ``PullImage`` carried, kept for lazy reads.

kubelet resolves an image's pull secrets itself (the pod's ``imagePullSecrets``, its service account's, a
credential provider plugin) and hands the result to the runtime inside each ``PullImage`` as a CRI
``AuthConfig``; nothing reaches the node's docker config.  containerd uses it for that pull and forgets it.
A lazy layer keeps reading the registry long after the pull returned — every chunk not yet local, after a
restart of the daemon too — so the snapshotter needs those credentials kept.  This module is that memory; the
gRPC side (:mod:`snapshotter.criproxy`) only feeds it.

* **Whose.**  Credentials belong to the registry host and the repository they were given for (the image's),
  and are looked up by exactly that pair: a mirror, another registry or another repository on the same
  registry never gets them (a pod may hold a secret for one team's repository and not for another's).  An
  ``AuthConfig.server_address`` naming another host than the image's is not kept, as containerd does not use
  it either.  Nothing found: the fallback (the node's docker config) is asked.
* **Newest wins.**  kubelet pulls again (a new pod, an ``Always`` policy) with whatever the secret holds now:
  tokens rotate and passwords change.  A pull's credentials are used from the moment it starts (containerd
  prepares the layers, and the snapshotter reads the index and mounts them, *during* the pull) and replace
  the kept ones when the pull succeeds; a pull that fails (wrong password) leaves the previous ones in place.
* **Kept across a restart.**  Committed credentials are written to one JSON file, created 0600 in the
  daemon's root-only state directory, atomically (temporary file, fsync, rename); a file another user could
  read or that is not this process's is not loaded.  Secrets never reach a log or an exception message, and
  ``repr`` masks them (:class:`PullAuth`, :class:`Grant`, :class:`~bootseer.auth.Credentials`).
* **Bounded.**  At most ``max_entries`` (host, repository) pairs; the least recently given go first.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootseer.auth import Credentials, CredentialSource, normalize_host
from bootseer.reference import Reference, ReferenceError

log = logging.getLogger("bootseer.pullsecrets")

FILE_VERSION = 1
Key = tuple[str, str]  # (normalized registry host, repository)


@dataclass(frozen=True)
class PullAuth:
    """CRI's ``AuthConfig`` as one ``PullImage`` carried it (field for field)."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)  # base64("user:password"), docker config.json style
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    FIELDS = ("username", "password", "auth", "server_address", "identity_token", "registry_token")

    def __repr__(self) -> str:
        return f"PullAuth(username={self.username!r}, server_address={self.server_address!r}, ...)"

    def credentials(self) -> Credentials | None:
        """The credentials in it, read as containerd reads them (``username``/``password``, else ``auth``;
        the identity token as the OAuth2 refresh token); None when it holds none.  Raises ValueError (without
        the value) on an ``auth`` that is not base64 ``user:password``."""
        user, password = self.username, self.password
        if not user and self.auth:
            try:
                raw = base64.b64decode(self.auth, validate=False).decode()
            except (binascii.Error, UnicodeDecodeError) as e:
                raise ValueError("AuthConfig.auth is not base64") from e
            if ":" not in raw:
                raise ValueError("AuthConfig.auth has no ':' between user and password")
            user, password = raw.split(":", 1)
            password = password.strip("\x00")
        if not (user or password or self.identity_token or self.registry_token):
            return None
        return Credentials(user, password, self.identity_token, self.registry_token)

    def names(self, host: str) -> bool:
        """Whether these credentials were given for ``host``: an empty ``server_address`` means the image's."""
        if not self.server_address:
            return True
        return normalize_host(self.server_address) == normalize_host(host)


@dataclass(frozen=True)
class Grant:
    """One pull's credentials, in use while the pull runs; committed or dropped when it ends."""

    key: Key
    credentials: Credentials = field(repr=False)
    seq: int

    def __repr__(self) -> str:
        return f"Grant({self.key[0]}/{self.key[1]}, #{self.seq})"


@dataclass
class _Entry:
    credentials: Credentials
    seq: int
    given: float  # wall-clock time of the pull that gave them (kept across restarts; orders eviction)


class PullCredentials:
    """The store: :meth:`pull_started` / :meth:`pull_succeeded` / :meth:`pull_failed` from the CRI proxy,
    :meth:`get` (a :class:`~bootseer.auth.CredentialSource`) from the daemon's registry client.  Thread-safe.

    ``path`` None keeps everything in memory (tests; a daemon without a state directory)."""

    def __init__(self, path: Path | None, fallback: CredentialSource | None = None, *,
                 max_entries: int = 4096) -> None:
        self.path = path
        self.fallback = fallback
        self.max_entries = max_entries
        self._entries: dict[Key, _Entry] = {}
        self._pending: dict[Key, list[Grant]] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer of the file at a time, in seq order
        self._listeners: list[Callable[[str, str], None]] = []

    def __repr__(self) -> str:
        return f"PullCredentials({self.path}, {len(self._entries)} kept, {len(self._pending)} pulling)"

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        """``listener(host, repository)`` is called when the credentials for that pair change (a pull started
        with new ones, or one that failed handed back the old): tokens earned with the old ones go."""
        self._listeners.append(listener)

    # ----------------------------------------------------------------------------------------- lookups
    def get(self, host: str, repository: str = "") -> Credentials | None:
        """The newest credentials given for ``(host, repository)`` — a pull running now first — else the
        fallback's.  No repository (a request without a repository scope): only the fallback is asked."""
        if repository:
            key = (normalize_host(host), repository)
            with self._lock:
                pending = self._pending.get(key)
                if pending:
                    return pending[-1].credentials
                entry = self._entries.get(key)
                if entry is not None:
                    return entry.credentials
        return self.fallback.get(host, repository) if self.fallback is not None else None

    def keys(self) -> list[Key]:
        """The (host, repository) pairs kept (no secrets): for status and tests."""
        with self._lock:
            return sorted(self._entries)

    # ------------------------------------------------------------------------------------------- pulls
    def pull_started(self, image: str, auth: PullAuth | None) -> Grant | None:
        """A ``PullImage`` of ``image`` with ``auth`` is being forwarded: its credentials are used from now on
        for the image's repository.  None when there is nothing to keep (no auth, anonymous, given for another
        host, an unreadable reference or ``auth`` — logged without any secret)."""
        if auth is None:
            return None
        try:
            ref = Reference.parse(image)
            creds = auth.credentials()
        except (ReferenceError, ValueError) as e:
            log.warning("PullImage %s: credentials not kept: %s", image[:200], e)
            return None
        if creds is None:
            return None
        if not auth.names(ref.registry):
            log.warning("PullImage %s: its credentials name another registry (%s); not kept", image[:200],
                        normalize_host(auth.server_address))
            return None
        key = (normalize_host(ref.registry), ref.repository)
        with self._lock:
            self._seq += 1
            grant = Grant(key, creds, self._seq)
            self._pending.setdefault(key, []).append(grant)
        self._notify(key)
        return grant

    def pull_succeeded(self, grant: Grant | None) -> None:
        """The pull worked: its credentials are the ones kept (unless a later pull's already are), and saved."""
        if grant is None:
            return
        with self._lock:
            self._drop_pending(grant)
            entry = self._entries.get(grant.key)
            if entry is not None and entry.seq > grant.seq:
                return
            self._entries[grant.key] = _Entry(grant.credentials, grant.seq, time.time())
            self._evict()
        log.info("pull secrets for %s/%s kept (%s)", grant.key[0], grant.key[1], _kind(grant.credentials))
        self.save()

    def pull_failed(self, grant: Grant | None) -> None:
        """The pull failed: its credentials are dropped, the ones kept before are used again."""
        if grant is None:
            return
        with self._lock:
            self._drop_pending(grant)
        self._notify(grant.key)

    def _drop_pending(self, grant: Grant) -> None:
        pending = self._pending.get(grant.key, [])
        with contextlib.suppress(ValueError):
            pending.remove(grant)
        if not pending:
            self._pending.pop(grant.key, None)

    def _evict(self) -> None:
        over = len(self._entries) - self.max_entries
        if over > 0:
            for key in sorted(self._entries, key=lambda k: self._entries[k].given)[:over]:
                del self._entries[key]

    def _notify(self, key: Key) -> None:
        for listener in self._listeners:
            try:
                listener(*key)
            except Exception:
                log.exception("pull secrets listener failed")

    # ------------------------------------------------------------------------------------- persistence
    def save(self) -> None:
        """Write the kept credentials to :attr:`path`: a new file created 0600 (never readable by others,
        not even for a moment), fsynced, renamed over the old one."""
        if self.path is None:
            return
        with self._write_lock:
            with self._lock:
                doc = {"version": FILE_VERSION, "entries": [
                    {"host": k[0], "repository": k[1], "given": e.given, "username": e.credentials.username,
                     "password": e.credentials.password, "identity_token": e.credentials.identity_token,
                     "registry_token": e.credentials.registry_token}
                    for k, e in sorted(self._entries.items(), key=lambda kv: kv[1].seq)]}
            data = json.dumps(doc).encode()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)  # whatever the umask
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except OSError as e:
                log.error("cannot save pull secrets to %s: %s (they stay in memory)", self.path,
                          e.__class__.__name__)
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def load(self) -> int:
        """Read :attr:`path` (kept by an earlier run); return how many entries it held.  A file that is not a
        regular file of this user readable by it alone is not used: whatever it holds may have been seen or
        planted by someone else.  kubelet's next pulls give the credentials again."""
        if self.path is None:
            return 0
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("pull secrets file %s not loaded: %s", self.path, e.__class__.__name__)
            return 0
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                log.warning("pull secrets file %s not loaded: it must be a regular file of uid %d, mode 0600 "
                            "(it is uid %d, mode %o)", self.path, os.geteuid(), st.st_uid, stat.S_IMODE(st.st_mode))
                return 0
            raw = fh.read()
        try:
            doc = json.loads(raw)
            rows = doc["entries"] if doc.get("version") == FILE_VERSION else []
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("pull secrets file %s not loaded: not a version %d file", self.path, FILE_VERSION)
            return 0
        loaded: dict[Key, _Entry] = {}
        for row in rows:
            entry = _entry(row)
            if entry is not None:
                loaded[(normalize_host(str(row["host"])), str(row["repository"]))] = entry
        with self._lock:
            for key, entry in loaded.items():  # seq 0: older than any pull of this run
                if key not in self._entries:  # given by a pull since the daemon started: newer
                    self._entries[key] = entry
            self._evict()
            n = len(self._entries)
        log.info("pull secrets: %d (registry, repository) pairs kept by an earlier run", len(loaded))
        return n


def _entry(row: Any) -> _Entry | None:
    try:
        creds = Credentials(str(row.get("username", "")), str(row.get("password", "")),
                            str(row.get("identity_token", "")), str(row.get("registry_token", "")))
        if not (row["host"] and row["repository"]):
            return None
        return _Entry(creds, 0, float(row.get("given", 0.0)))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _kind(creds: Credentials) -> str:
    """What sort of credentials (for logs: never the values)."""
    kinds = [name for name, present in (("registry token", creds.registry_token),
                                        ("identity token", creds.identity_token),
                                        ("user and password", creds.username or creds.password)) if present]
    return ", ".join(kinds)
