"""OCI and Docker image formats as the registry serves them: media types, descriptors, manifests and
indexes (kept byte for byte: ``raw`` is what the digest covers), digests, platforms, the referrers tag name.
Pure data: nothing here talks to a registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from bootseer.registry.errors import DigestMismatch, NotFound, RegistryError

log = logging.getLogger("bootseer.registry")

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
MAX_MANIFEST_BYTES = 4 << 20


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


def referrers_tag(digest: str) -> str:
    """The referrers tag schema: ``<alg>-<ref>`` truncated to a valid tag length."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]
