"""What the data path needs to know about one lazily served blob, and nothing more.

A :class:`BlobSpec` is produced by whoever reads the image's index (the registry client) and handed to
:class:`~snapshotter.lazy.manager.LayerManager`.  It is plain data — JSON-serialisable, persisted beside each
layer — so a restarted daemon can serve the blob again without asking the index.  Credentials are *not*
part of it: they expire and must never be written to disk, so they come from an :class:`AuthHook` that the
daemon installs once and that is asked again on every 401.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bootseer.index import WIRE_CODECS, LayerBlob, chunk_span, chunks_covering, frame_bound, n_chunks

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobSpec:
    """An EROFS blob in a registry, cut into fixed chunks whose sha256 digests are known in advance.

    ``registry`` is a base URL (``http://host:port`` or ``https://host``); ``mirrors`` are tried first, in
    order (a P2P engine such as Dragonfly, a pull-through cache), the registry last.  ``chunks`` holds the
    lowercase hex sha256 of every chunk; the last chunk may be shorter than ``chunk_size``.

    With a ``codec`` (index v3) the chunks travel compressed: chunk *i* is frame *i* (``frames[i]`` bytes) of
    the wire blob ``wire_digest``, the frames back to back; everything that speaks blob offsets (the cache,
    reads, hot-block manifests) still speaks those of the node blob ``digest``, only the requests speak wire
    offsets (:meth:`wire_span`).
    """

    registry: str
    repository: str
    digest: str  # sha256:<hex> of the whole EROFS blob
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    # Extra, non-secret request headers (e.g. a User-Agent); secrets come from the AuthHook.
    headers: Mapping[str, str] = field(default_factory=dict)
    codec: str = ""  # "": fetched as stored; else the wire codec (one of bootseer.index.WIRE_CODECS)
    wire_digest: str = ""
    wire_size: int = 0
    frames: tuple[int, ...] = ()
    _wire_offsets: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _DIGEST.match(self.digest):
            raise ValueError(f"blob digest must be sha256:<64 hex>, not {self.digest!r}")
        if self.size <= 0 or self.chunk_size <= 0 or self.chunk_size % 4096:
            raise ValueError(f"bad size {self.size} / chunk size {self.chunk_size} (a multiple of 4096)")
        if len(self.chunks) != n_chunks(self.size, self.chunk_size):
            raise ValueError(f"{len(self.chunks)} chunk digests for {n_chunks(self.size, self.chunk_size)} chunks")
        for c in self.chunks:
            if not _HEX.match(c):
                raise ValueError(f"chunk digest must be 64 lowercase hex characters, not {c!r}")
        if not self.registry.startswith(("http://", "https://")):
            raise ValueError(f"registry must be a base URL (http[s]://host[:port]), not {self.registry!r}")
        if self.codec or self.wire_digest or self.frames:
            self._check_wire()

    def _check_wire(self) -> None:
        """The frame table must cut exactly the wire blob, one frame per chunk, none past its bound (the index
        checked this too; a spec is also read back from disk)."""
        if self.codec not in WIRE_CODECS:
            raise ValueError(f"wire codec {self.codec!r} is not one of {WIRE_CODECS}")
        if not _DIGEST.match(self.wire_digest):
            raise ValueError(f"wire digest must be sha256:<64 hex>, not {self.wire_digest!r}")
        if len(self.frames) != len(self.chunks) or sum(self.frames) != self.wire_size:
            raise ValueError(f"{len(self.frames)} frames of {sum(self.frames)} bytes for {len(self.chunks)} chunks "
                             f"and a wire blob of {self.wire_size}")
        offsets = [0]
        for i, f in enumerate(self.frames):
            if not 0 < f <= frame_bound(self.chunk_span(i)[1]):
                raise ValueError(f"frame {i} of {f} bytes for a chunk of {self.chunk_span(i)[1]}")
            offsets.append(offsets[-1] + f)
        object.__setattr__(self, "_wire_offsets", tuple(offsets))

    # -- identity ----------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """What a lazy layer on the node is keyed by: ``<blob digest>+<16 hex>``, the suffix a digest of the
        chunk table (:meth:`identity`) and the source (registry and repository).  Two specs that share a
        blob digest but not the chunk table or the source never share a mount or a cache: the bytes a layer
        served were verified against *its* chunk table, fetched from *its* registry, and nothing else."""
        h = hashlib.sha256(f"{self.identity()}\n{self.registry.rstrip('/')}\n{self.repository}\n".encode())
        if self.codec:  # fetched from another blob: never the layer of a spec fetching the node blob as stored
            h.update(f"{self.codec}\n{self.wire_digest}\n".encode())
        return f"{self.digest}+{h.hexdigest()[:16]}"

    @property
    def name(self) -> str:
        """File-system-safe name of the layer (:attr:`key`): the FUSE file, cache dir and mount dir are called
        this.  Layers persisted before keys existed keep their old name (``sha256-<hex>``, see
        :mod:`~snapshotter.lazy.layerstate`)."""
        return self.key.replace(":", "-")

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the blob."""
        return chunk_span(self.size, self.chunk_size, index)

    @property
    def fetch_digest(self) -> str:
        """The blob the requests ask for: the wire blob, or the node blob itself."""
        return self.wire_digest if self.codec else self.digest

    @property
    def fetch_size(self) -> int:
        return self.wire_size if self.codec else self.size

    def wire_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``'s bytes in the fetched blob (its frame, or the chunk itself)."""
        if not self.codec:
            return self.chunk_span(index)
        off = self._wire_offsets[index]
        return off, self._wire_offsets[index + 1] - off

    def chunks_for(self, offset: int, length: int) -> range:
        """Indices of the chunks that cover ``[offset, offset+length)`` (clamped to the blob)."""
        return chunks_covering(self.size, self.chunk_size, offset, length)

    def identity(self) -> str:
        """A digest of everything that decides the cached bytes: a cache built for another spec is discarded."""
        h = hashlib.sha256(f"{self.digest}\n{self.size}\n{self.chunk_size}\n".encode())
        for c in self.chunks:
            h.update(c.encode())
        return h.hexdigest()

    def endpoints(self) -> list[str]:
        return [*self.mirrors, self.registry]

    def blob_url(self, base: str) -> str:
        return f"{base.rstrip('/')}/v2/{self.repository}/blobs/{self.fetch_digest}"

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"registry": self.registry, "repository": self.repository, "digest": self.digest,
                               "size": self.size, "chunk_size": self.chunk_size, "chunks": list(self.chunks),
                               "mirrors": list(self.mirrors), "headers": dict(self.headers)}
        if self.codec:
            doc["wire"] = {"codec": self.codec, "digest": self.wire_digest, "size": self.wire_size,
                           "frames": list(self.frames)}
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BlobSpec:
        wire = doc.get("wire") or {}
        return cls(registry=str(doc["registry"]), repository=str(doc["repository"]), digest=str(doc["digest"]),
                   size=int(doc["size"]), chunk_size=int(doc["chunk_size"]),
                   chunks=tuple(str(c) for c in doc["chunks"]), mirrors=tuple(doc.get("mirrors", ())),
                   headers=dict(doc.get("headers", {})), codec=str(wire.get("codec", "")),
                   wire_digest=str(wire.get("digest", "")), wire_size=int(wire.get("size", 0)),
                   frames=tuple(int(f) for f in wire.get("frames", ())))


def wire_fields(blob: LayerBlob) -> dict[str, Any]:
    """The :class:`BlobSpec` fields for how an index entry's chunks travel (none: as stored)."""
    if blob.wire is None:
        return {}
    return {"codec": blob.wire.codec, "wire_digest": blob.wire.blob.digest, "wire_size": blob.wire.blob.size,
            "frames": blob.wire.frames}


def digest_of_name(name: str) -> str:
    """The blob digest a layer's file name (:attr:`BlobSpec.name`, or a legacy ``sha256-<hex>``) stands for."""
    return name.split("+", 1)[0].replace("-", ":", 1)


class AuthHook(Protocol):
    """Returns the headers (``Authorization: Bearer …``) for requests about ``spec`` to the endpoint ``base``
    (the registry or one of its mirrors).

    Credentials belong to a host: the answer for ``base`` must be what that host's own credentials earned, so a
    mirror never receives the upstream registry's token or password.  ``refresh=True`` after a 401: the hook
    must fetch a new token rather than return a cached one.  Implementations do their own caching and locking;
    they are called from fetch worker threads.
    """

    def __call__(self, spec: BlobSpec, base: str, *, refresh: bool) -> Mapping[str, str]: ...


def no_auth(spec: BlobSpec, base: str, *, refresh: bool) -> Mapping[str, str]:
    """The hook for anonymous registries."""
    return {}


TlsSettings = tuple["bool | str", "tuple[str, str] | str | None"]  # requests' (verify, cert)


class TlsHook(Protocol):
    """The TLS settings for requests about ``spec`` to endpoint ``base``: ``(verify, cert)`` as ``requests``
    takes them (a CA bundle path, or True/False; a client certificate), or None for the defaults.  They come
    from the endpoint's ``hosts.toml`` entry, as containerd's do: a private CA or a client certificate given
    for the registry must reach the lazy blob reads too, not only the index lookups."""

    def __call__(self, spec: BlobSpec, base: str) -> TlsSettings | None: ...


def coalesce(indices: Iterable[int], cap: int | None = None) -> list[list[int]]:
    """Runs of consecutive chunk indices (each at most ``cap`` chunks), in the order given: one range
    request per run.  Sort first for blob order; keep the order for first-access order (prefetch)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and (cap is None or len(runs[-1]) < cap):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def split_ranges(spans: Sequence[tuple[int, int]], spec: BlobSpec) -> list[int]:
    """Chunk indices covering byte ranges ``(offset, length)``, in first-seen order, de-duplicated.

    Used by prefetch (hot-block manifests list byte ranges in first-access order)."""
    seen: set[int] = set()
    out: list[int] = []
    for off, length in spans:
        for i in spec.chunks_for(off, length):
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out
