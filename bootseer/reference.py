"""Image references: ``[registry[:port]/]repository[:tag][@digest]`` as docker and containerd read them.

The rules are docker's, because that is what people type and what containerd's CRI plugin hands us:

* the first path component is a registry only if it looks like a host (contains ``.`` or ``:``, or is
  ``localhost``); otherwise the registry is ``docker.io``;
* on ``docker.io`` a single-component repository is an official image and gets ``library/``;
* with neither tag nor digest the tag is ``latest``; a reference may carry both (the digest wins when
  fetching, the tag is kept for display and for pushes).

``docker.io`` is a name, not an endpoint: :attr:`Reference.api_host` is where its API lives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?)(?::[0-9]{1,5})?$")


class ReferenceError(ValueError):
    """The string is not a valid image reference (the message says which part is wrong)."""


@dataclass(frozen=True)
class Reference:
    registry: str  # "docker.io", "127.0.0.1:5000", "ghcr.io"
    repository: str  # "library/busybox", "bootseer/small"
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``; defaults filled in (registry, ``library/``, tag ``latest`` without a digest)."""
        s = text.strip()
        if not s:
            raise ReferenceError("empty image reference")
        if "://" in s:
            raise ReferenceError(f"{text!r}: an image reference has no scheme")
        digest = None
        if "@" in s:
            s, digest = s.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise ReferenceError(f"{text!r}: invalid digest {digest!r}")
            if digest.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ReferenceError(f"{text!r}: a sha256 digest is 64 lowercase hex characters")
        registry = DEFAULT_REGISTRY
        first, sep, rest = s.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
            if not _HOST_RE.match(first):
                raise ReferenceError(f"{text!r}: invalid registry host {first!r}")
            registry, s = first, rest
        tag = None
        last_slash = s.rfind("/")
        colon = s.rfind(":")
        if colon > last_slash:
            s, tag = s[:colon], s[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise ReferenceError(f"{text!r}: invalid tag {tag!r}")
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in s:
            s = "library/" + s
        if not _REPO_RE.match(s):
            raise ReferenceError(f"{text!r}: invalid repository name {s!r} (lowercase, digits, . _ - /)")
        if len(registry) + 1 + len(s) > 255:
            raise ReferenceError(f"{text!r}: name longer than 255 characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, s, tag, digest)

    # ----------------------------------------------------------------------------------------- views
    @property
    def api_host(self) -> str:
        """The host serving the registry API (Docker Hub's name and API host differ)."""
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        return replace(self, tag=tag)

    def in_repository(self, repository: str) -> Reference:
        """Same registry, another repository (cross-repo mounts, referrer lookups)."""
        return replace(self, repository=repository, tag=None, digest=None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def familiar(self) -> str:
        """The short form people type: ``busybox:1.36`` for ``docker.io/library/busybox:1.36``."""
        out = str(self)
        if self.registry == DEFAULT_REGISTRY:
            out = out[len(DEFAULT_REGISTRY) + 1 :]
            if out.startswith("library/"):
                out = out[len("library/") :]
        return out


def parse(text: str) -> Reference:
    return Reference.parse(text)


def is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` names this machine (plain HTTP is acceptable there by default)."""
    h = host
    if h.startswith("["):
        h = h[1 : h.index("]")]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h == "localhost" or h.startswith("127.") or h == "::1"
