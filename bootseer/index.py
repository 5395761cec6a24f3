"""The BootSeer index: which EROFS blob stands for which layer of an image, and how to verify it chunk by chunk.

Wire format
-----------
The index is an OCI artifact attached to the image manifest as a *referrer*:

* **artifact manifest** — an OCI image manifest (``application/vnd.oci.image.manifest.v1+json``) with
  ``artifactType: application/vnd.bootseer.index.v1+json`` (:data:`ARTIFACT_TYPE`), the empty config
  (``application/vnd.oci.empty.v1+json``, ``{}``), ``subject`` = the image manifest's descriptor, and layers:

  1. the **index blob** (media type :data:`INDEX_MEDIA_TYPE`, the same string as the artifact type);
  2. every blob nodes fetch from (the wire blob of a v3 layer, media type :data:`WIRE_MEDIA_TYPE`; the EROFS
     blob otherwise, :data:`EROFS_MEDIA_TYPE`; annotation ``io.bootseer.layer.digest`` = the original layer
     digest) — listed so that registry garbage collection keeps them alive as long as the index exists, and
     so ``skopeo copy --all`` / ``oras copy`` carry them.

  It is pushed by digest and found with the referrers API or, on registries without it (distribution 2.8),
  the referrers tag schema (``sha256-<hex>`` tag on an OCI index), see :meth:`RegistryClient.referrers`.

* **index blob** — canonical JSON (sorted keys, no whitespace), so converting the same image twice yields
  the same bytes, hence the same digests all the way up::

      {"schemaVersion": 3,
       "mediaType": "application/vnd.bootseer.index.v1+json",
       "subject": "sha256:<image manifest digest>",
       "converter": {"format": "erofs", "compression": "lz4hc", "version": 3},
       "layers": [{"digest": "sha256:<original layer>", "mediaType": "<its media type>", "size": <its size>,
                   "diffID": "sha256:<sha256 of its uncompressed tar>",
                   "blob": {"mediaType": "application/vnd.bootseer.layer.v1.erofs",
                            "digest": "sha256:<erofs blob>", "size": <bytes>},
                   "chunkSize": 131072,
                   "chunks": ["<sha256 hex of chunk 0>", ...],
                   "wire": {"codec": "zstd",
                            "blob": {"mediaType": "application/vnd.bootseer.layer.v1.erofs.zstd-frames",
                                     "digest": "sha256:<wire blob>", "size": <bytes>},
                            "frames": "<base64 of one little-endian uint32 per chunk>"}}],
       "skipped": [{"digest": "sha256:...", "mediaType": "...", "reason": "..."}]}

  Chunk *i* covers bytes ``[i*chunkSize, min((i+1)*chunkSize, size))`` of the EROFS blob; the last chunk is
  short.  Every lazily fetched range is checked against these digests before it is served or cached.
  ``skipped`` lists layers that have no EROFS blob (unknown media type, refused as hostile, …), with the
  reason; nodes pull those the ordinary way.

  ``wire`` (new in schema version 3; a v2 index has none and its blobs are fetched as stored): chunk *i*
  travels as frame *i* of the wire blob, the frames back to back (``frames`` are their sizes), so a run of
  chunks is one byte range of it.  The chunk digests stay those of the EROFS bytes: a node inflates each frame
  into at most its chunk's length (:func:`inflate`) and checks the digest before serving or caching it.  The
  registry holds only the wire blob (the EROFS blob is rebuilt from it; :func:`fetch_node_blob` for tools).
  A node passes over a layer whose ``codec`` it does not know (that layer is pulled the ordinary way).

  ``diffID`` (new in schema version 2) is the sha256 of the tar stream the converter unpacked: it binds the
  EROFS blob to what the image's config says the layer is.  A node uses an entry only if its (``digest``,
  ``diffID``) equal the pulled manifest's layer digest and the pulled config's diffID at that position
  (docs/security.md); a node refuses a schema version it does not know and pulls the ordinary way.

  Bounds, checked before anything is materialised: the blob at most :data:`MAX_INDEX_BYTES`, at most
  :data:`MAX_LAYERS` layers, a chunk size of at most :data:`MAX_CHUNK_SIZE`, exactly as many chunk digests as
  the blob size needs, each 64 hex digits; a frame table of exactly one frame per chunk, adding up to the wire
  blob's size, no frame empty or over :func:`frame_bound` of its chunk.

* **signature** — the artifact manifest is signed by the converter in cosign's key-based format
  (:mod:`bootseer.trust`); nodes take the newest index that carries a signature their policy trusts.

Chunk arithmetic — which bytes chunk *i* covers, which chunks a byte range touches, the digests of a blob's
chunks — is defined here once (:func:`n_chunks`, :func:`chunk_span`, :func:`chunks_covering`,
:func:`chunk_digests`, :func:`hash_chunks`): the converter, the snapshotter's data path and the hot-block
manifest all cut blobs the same way.

The registry sidecar writes the index (:func:`push_index`); the snapshotter reads it on ``Prepare``
(:class:`snapshotter.lazy.index_reader.IndexReader`, over :func:`find_index`); the recorder and depsnap find
it with :func:`find_index`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from bootseer.reference import Reference
from bootseer.registry import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    MT_OCI_EMPTY,
    MT_OCI_MANIFEST,
    Descriptor,
    Manifest,
    NotFound,
    RegistryClient,
    RegistryError,
    sha256_digest,
)
from bootseer.trust import Signer, TrustPolicy, sign_artifact

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.bootseer.index.v1+json"
INDEX_MEDIA_TYPE = ARTIFACT_TYPE
EROFS_MEDIA_TYPE = "application/vnd.bootseer.layer.v1.erofs"
LAYER_ANNOTATION = "io.bootseer.layer.digest"
# on a *bound* image manifest (``bootseer convert --bind``): the digest of its index artifact, so that the
# digest a user pins names the index too (SOCI's index manifest v2 idea)
BOUND_INDEX_ANNOTATION = "io.bootseer.index.digest"
BOUND_FROM_ANNOTATION = "io.bootseer.index.subject"  # ... and the manifest it was bound from (the index's subject)
# 128 KiB: the unit of every lazy fetch, verification and cache bit.  Smaller chunks fetch a smaller hot set
# but cost more per-chunk hashing and bookkeeping in Python; 128 KiB is also the largest read FUSE and erofs
# read-ahead send (figures: docs/bench/design-measurements.md).
DEFAULT_CHUNK_SIZE = 128 << 10
# 2: per-layer diffID; 3: a layer may name a *wire* blob (its chunks compressed one frame each) beside the node
# blob.  A node reads the versions in READ_VERSIONS and passes over any other index (the ordinary pull).
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
WIRE_MEDIA_TYPE = "application/vnd.bootseer.layer.v1.erofs.zstd-frames"
WIRE_CODECS = ("zstd",)  # codecs this code decompresses; a layer of another codec is pulled the ordinary way
MAX_CHUNK_SIZE = 4 << 20  # a chunk is one bytearray on the node: a registry must not choose its size
MAX_INDEX_BYTES = 16 << 20  # ~250k chunk digests: 32 GB of blobs at the default chunk size
MAX_CANDIDATES = 64  # referrers of one image looked at, newest first: a registry writer cannot make a node
# check thousands (unsigned answers are cached too, see TrustPolicy.signature)
MAX_LAYERS = 1024  # images have at most a few hundred layers (containerd's overlay caps lowerdirs at 500)
CONVERTER = {"format": "erofs", "compression": "lz4hc", "version": FORMAT_VERSION}


def frame_bound(length: int) -> int:
    """The largest frame accepted for a chunk of ``length`` bytes: zstd's worst case (ZSTD_compressBound:
    incompressible data stored raw, plus block and frame headers) with room to spare, so a hostile frame
    table cannot make one chunk's request many times the chunk."""
    return length + (length >> 7) + 1024


# ------------------------------------------------------------------------------------ chunk arithmetic
def n_chunks(size: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` cut ``size`` bytes (the last one may be short)."""
    return (size + chunk_size - 1) // chunk_size


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a ``size``-byte blob."""
    off = index * chunk_size
    return off, min(chunk_size, size - off)


def chunks_covering(size: int, chunk_size: int, offset: int, length: int) -> range:
    """Indices of the chunks that cover ``[offset, offset+length)`` of a ``size``-byte blob (clamped to it;
    empty for an empty or out-of-blob range)."""
    end = min(size, offset + length)
    if length <= 0 or offset < 0 or offset >= end:
        return range(0)
    return range(offset // chunk_size, (end - 1) // chunk_size + 1)


def chunk_digests(data: bytes | memoryview, chunk_size: int) -> tuple[str, ...]:
    """The per-chunk sha256 list of ``data`` (what the index records)."""
    view = memoryview(data)
    return tuple(hashlib.sha256(view[o : o + chunk_size]).hexdigest() for o in range(0, len(view), chunk_size))


def hash_chunks(path: Path, chunk_size: int) -> tuple[str, int, tuple[str, ...]]:
    """(sha256 digest of the file, its size, sha256 hex of each ``chunk_size`` chunk) in one read."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            data = fh.read(chunk_size)
            if not data:
                break
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
            size += len(data)
    return "sha256:" + whole.hexdigest(), size, tuple(chunks)


# ------------------------------------------------------------------------------------------- wire frames
_zstd = threading.local()  # .d: this thread's ZstdDecompressor (one is not safe to share between threads)
MAX_WINDOW = 8 << 20  # a frame of one chunk (at most MAX_CHUNK_SIZE) never needs a larger window: refuse one


class CorruptFrame(ValueError):
    """A wire frame that does not decompress to exactly its chunk's length."""


def inflate(frame: bytes | memoryview, length: int) -> bytes:
    """Frame → the ``length`` bytes of its chunk, never more: a frame whose header announces another size is
    refused before anything is allocated, one without a size is decompressed into at most ``length`` bytes
    (a zstd bomb cannot inflate past its chunk).  The caller still checks the chunk's digest."""
    d = getattr(_zstd, "d", None)
    if d is None:
        d = _zstd.d = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    try:
        announced = zstandard.frame_content_size(frame)  # -1: the frame does not say
        if announced != -1 and announced != length:
            raise CorruptFrame(f"frame announces {announced} bytes for a chunk of {length}")
        out = d.decompress(frame, max_output_size=length)
    except zstandard.ZstdError as e:
        raise CorruptFrame(str(e)) from e
    if len(out) != length:
        raise CorruptFrame(f"frame decompressed to {len(out)} bytes for a chunk of {length}")
    return bytes(out)


# ------------------------------------------------------------------------------------------ the format
class BadIndex(RegistryError):
    """The index artifact exists but is malformed."""


class UnsupportedIndex(BadIndex):
    """An index of a schema version this code does not read (a newer converter's, or an old v1 one)."""


_HEX = frozenset("0123456789abcdef")


def _is_sha256(digest: str) -> bool:
    return digest.startswith("sha256:") and len(digest) == 71 and _HEX.issuperset(digest[7:])


@dataclass(frozen=True)
class WireBlob:
    """How a layer's chunks travel (index v3): chunk *i* of the node blob is frame *i* of ``blob``, the frames
    back to back, compressed with ``codec``.  The node decompresses each frame and checks the chunk's digest
    (of the node bytes) before anything is served or cached.  ``frames`` is empty for a codec this code does
    not know (its table is not parsed: the node pulls that layer the ordinary way)."""

    codec: str
    blob: Descriptor
    frames: tuple[int, ...]

    @property
    def known(self) -> bool:
        return self.codec in WIRE_CODECS

    def offsets(self) -> tuple[int, ...]:
        """Start of every frame in the wire blob, and its end last."""
        out = [0]
        for f in self.frames:
            out.append(out[-1] + f)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec,
                "blob": {"mediaType": self.blob.media_type, "digest": self.blob.digest, "size": self.blob.size},
                "frames": pack_frames(self.frames)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], node_size: int, chunk_size: int, layer: str) -> WireBlob:
        """Parse and bound the wire object of a layer whose node blob is ``node_size`` bytes (a hostile index:
        the frame table must cut exactly the wire blob, one frame per chunk, none over :func:`frame_bound`)."""
        codec = d["codec"]
        try:
            blob = Descriptor.from_dict(d["blob"])
        except RegistryError as e:
            raise BadIndex(f"layer {layer}: wire blob: {e}") from e
        if not isinstance(codec, str) or not codec:
            raise BadIndex(f"layer {layer}: wire codec {codec!r} is not a name")
        if not _is_sha256(blob.digest) or not isinstance(blob.size, int) or blob.size <= 0:
            raise BadIndex(f"layer {layer}: wire blob {blob.digest!r} of {blob.size!r} bytes")
        if codec not in WIRE_CODECS:
            return cls(codec, blob, ())
        frames = unpack_frames(d["frames"], n_chunks(node_size, chunk_size), layer)
        if sum(frames) != blob.size:
            raise BadIndex(f"layer {layer}: frames add up to {sum(frames)} bytes, the wire blob has {blob.size}")
        for i, f in enumerate(frames):
            length = chunk_span(node_size, chunk_size, i)[1]
            if not 0 < f <= frame_bound(length):
                raise BadIndex(f"layer {layer}: frame {i} of {f} bytes for a chunk of {length}")
        return cls(codec, blob, frames)


def pack_frames(frames: tuple[int, ...] | list[int]) -> str:
    """The frame table as the index holds it: little-endian uint32 per frame, base64."""
    return base64.b64encode(struct.pack(f"<{len(frames)}I", *frames)).decode()


def unpack_frames(text: object, count: int, layer: str = "") -> tuple[int, ...]:
    """The inverse of :func:`pack_frames`, for exactly ``count`` frames (else :class:`BadIndex`)."""
    if not isinstance(text, str) or len(text) != 4 * ((4 * count + 2) // 3):
        raise BadIndex(f"layer {layer}: the frame table is not {count} packed uint32")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise BadIndex(f"layer {layer}: the frame table is not base64: {e}") from e
    if len(raw) != 4 * count:
        raise BadIndex(f"layer {layer}: {len(raw) // 4} frames for {count} chunks")
    return struct.unpack(f"<{count}I", raw)


@dataclass(frozen=True)
class LayerBlob:
    """The EROFS stand-in of one original layer."""

    layer_digest: str
    layer_media_type: str
    layer_size: int
    blob: Descriptor
    chunk_size: int
    chunks: tuple[str, ...]  # sha256 hex per chunk
    diff_id: str = ""  # sha256 of the uncompressed tar the blob was built from ("" only in a v1 index)
    source: str = ""  # "registry/repository" to fetch the blob from (set by the reader)
    wire: WireBlob | None = None  # index v3: the chunks travel compressed, in this blob; None: as stored

    @property
    def fetched(self) -> Descriptor:
        """The blob a node fetches chunks from, and the registry must keep: the wire blob, or the node blob."""
        return self.wire.blob if self.wire is not None else self.blob

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk ``i`` in the blob."""
        if not 0 <= i < len(self.chunks):
            raise IndexError(f"chunk {i} out of range (0..{len(self.chunks) - 1})")
        return chunk_span(self.blob.size, self.chunk_size, i)

    def verify_chunk(self, i: int, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() == self.chunks[i]

    def to_dict(self) -> dict[str, Any]:
        out = {"digest": self.layer_digest, "mediaType": self.layer_media_type, "size": self.layer_size,
               "diffID": self.diff_id,
               "blob": {"mediaType": self.blob.media_type, "digest": self.blob.digest, "size": self.blob.size},
               "chunkSize": self.chunk_size, "chunks": list(self.chunks)}
        if self.wire is not None:
            out["wire"] = self.wire.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "", version: int = FORMAT_VERSION) -> LayerBlob:
        """Parse and bound one layer entry; ``wire`` is read only in a v3 index (a v2 index has none)."""
        blob = Descriptor.from_dict(d["blob"])
        chunk_size = int(d["chunkSize"])
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise BadIndex(f"layer {d.get('digest')}: chunk size {chunk_size} not in 1..{MAX_CHUNK_SIZE}")
        if blob.size < 0 or not isinstance(d["chunks"], list) or len(d["chunks"]) != n_chunks(blob.size, chunk_size):
            raise BadIndex(f"layer {d.get('digest')}: {len(d['chunks'])} chunk digests for {blob.size} bytes "
                           f"in chunks of {chunk_size}")
        chunks = tuple(str(c) for c in d["chunks"])
        if not all(len(c) == 64 and _HEX.issuperset(c) for c in chunks):
            raise BadIndex(f"layer {d.get('digest')}: a chunk digest is not 64 hex digits")
        diff_id = str(d["diffID"])
        if not _is_sha256(diff_id) or not _is_sha256(str(d["digest"])) or not _is_sha256(blob.digest):
            raise BadIndex(f"layer {d.get('digest')}: digests must be sha256:<64 hex>")
        wire = None
        if version >= 3 and d.get("wire") is not None:
            if not isinstance(d["wire"], dict):
                raise BadIndex(f"layer {d.get('digest')}: wire is not an object")
            wire = WireBlob.from_dict(d["wire"], blob.size, chunk_size, str(d.get("digest")))
        return cls(str(d["digest"]), str(d.get("mediaType", "")), int(d.get("size", 0)), blob, chunk_size, chunks,
                   diff_id, source, wire)


@dataclass
class ImageIndex:
    subject: str
    layers: dict[str, LayerBlob] = field(default_factory=dict)  # original layer digest → blob, in image order
    skipped: list[dict[str, str]] = field(default_factory=list)
    version: int = FORMAT_VERSION  # schema version written (and read): 2 has no wire blobs

    def to_json(self) -> bytes:
        if self.version not in READ_VERSIONS:
            raise ValueError(f"index version {self.version} is not one of {READ_VERSIONS}")
        if self.version < 3 and any(lb.wire is not None for lb in self.layers.values()):
            raise ValueError("an index of version 2 cannot name wire blobs")
        doc = {"schemaVersion": self.version, "mediaType": INDEX_MEDIA_TYPE, "subject": self.subject,
               "converter": {**CONVERTER, "version": self.version},
               "layers": [lb.to_dict() for lb in self.layers.values()],
               "skipped": self.skipped}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str = "") -> ImageIndex:
        if len(raw) > MAX_INDEX_BYTES:
            raise BadIndex(f"index of {len(raw)} bytes, more than {MAX_INDEX_BYTES}")
        try:
            doc = json.loads(raw)
            if doc.get("mediaType") != INDEX_MEDIA_TYPE:
                raise BadIndex(f"not a BootSeer index ({doc.get('mediaType')!r})")
            version = doc.get("schemaVersion")
            if type(version) is not int or version not in READ_VERSIONS:
                raise UnsupportedIndex(f"BootSeer index schema version {version!r}; this node reads versions "
                                       f"{', '.join(map(str, READ_VERSIONS))}")
            if len(doc.get("layers") or []) > MAX_LAYERS:
                raise BadIndex(f"index of {len(doc['layers'])} layers, more than {MAX_LAYERS}")
            layers = [LayerBlob.from_dict(d, source, version) for d in doc.get("layers") or []]
            return cls(str(doc["subject"]), {lb.layer_digest: lb for lb in layers}, list(doc.get("skipped") or []),
                       version)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadIndex(f"malformed BootSeer index: {e}") from e


def read_chunk(client: RegistryClient, ref: Reference | str, lb: LayerBlob, i: int) -> bytes:
    """Chunk ``i`` of ``lb``'s node blob, fetched the way a node does (its frame decompressed, for a v3
    layer) and verified: for tools and tests; the snapshotter's data path is :mod:`snapshotter.lazy.fetcher`."""
    off, length = lb.chunk_range(i)
    if lb.wire is None:
        data = client.get_blob_range(ref, lb.blob.digest, off, length)
    else:
        if not lb.wire.known:
            raise BadIndex(f"layer {lb.layer_digest}: wire codec {lb.wire.codec!r} is not one this code reads")
        offsets = lb.wire.offsets()
        try:
            data = inflate(client.get_blob_range(ref, lb.wire.blob.digest, offsets[i], offsets[i + 1] - offsets[i]),
                           length)
        except CorruptFrame as e:
            raise BadIndex(f"layer {lb.layer_digest}: chunk {i}: {e}") from e
    if not lb.verify_chunk(i, data):
        raise BadIndex(f"layer {lb.layer_digest}: chunk {i} does not match its digest")
    return data


def fetch_node_blob(client: RegistryClient, ref: Reference | str, lb: LayerBlob, dest: IO[bytes]) -> None:
    """Write ``lb``'s whole node blob (the EROFS image) to ``dest``, every chunk verified: the blob itself, or
    for a v3 layer its wire blob (all the registry holds of it), downloaded whole and inflated frame by frame."""
    if lb.wire is not None and not lb.wire.known:
        raise BadIndex(f"layer {lb.layer_digest}: wire codec {lb.wire.codec!r} is not one this code reads")
    got = lb.fetched
    with tempfile.TemporaryFile() as tmp:
        client.fetch_blob(ref, got.digest, tmp, got.size)  # (verified against its digest on the way)
        at = lb.wire.offsets() if lb.wire is not None else None
        for i in range(lb.chunk_count):
            off, length = lb.chunk_range(i)
            if at is None:
                tmp.seek(off)
                data = tmp.read(length)
            else:
                tmp.seek(at[i])
                try:
                    data = inflate(tmp.read(at[i + 1] - at[i]), length)
                except CorruptFrame as e:
                    raise BadIndex(f"layer {lb.layer_digest}: chunk {i}: {e}") from e
            if not lb.verify_chunk(i, data):
                raise BadIndex(f"layer {lb.layer_digest}: chunk {i} does not match its digest")
            dest.write(data)


def artifact_manifest(index_blob: Descriptor, subject: Descriptor, layers: list[LayerBlob],
                      version: int = FORMAT_VERSION) -> bytes:
    """The referrer manifest for an index blob (canonical JSON, deterministic).  It lists the blobs nodes
    fetch (the wire blob of a v3 layer, which is all the registry holds of it; the EROFS blob otherwise)."""
    blobs: dict[str, dict[str, Any]] = {}
    for lb in layers:  # one entry per distinct blob (two identical layers share one)
        got = lb.fetched
        blobs.setdefault(got.digest, {"mediaType": WIRE_MEDIA_TYPE if lb.wire is not None else EROFS_MEDIA_TYPE,
                                      "digest": got.digest, "size": got.size,
                                      "annotations": {LAYER_ANNOTATION: lb.layer_digest}})
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_OCI_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": INDEX_MEDIA_TYPE, "digest": index_blob.digest, "size": index_blob.size},
                   *blobs.values()],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {"io.bootseer.index.version": str(version)},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push_index(client: RegistryClient, repo: Reference | str, index: ImageIndex, subject: Descriptor,
               signer: Signer | None = None) -> str:
    """Push the index blob, the empty config and the artifact manifest (as a referrer), signed by ``signer``
    (cosign format, :mod:`bootseer.trust`); return the artifact's digest.

    The EROFS blobs must already be in ``repo``.  Idempotent: same index, same digests, nothing new stored
    but a fresh signature.
    """
    ref = repo if isinstance(repo, Reference) else Reference.parse(repo)
    raw = index.to_json()
    desc = client.push_blob(ref, raw)
    client.push_blob(ref, EMPTY_JSON)
    manifest = artifact_manifest(Descriptor(INDEX_MEDIA_TYPE, desc.digest, desc.size), subject,
                                 list(index.layers.values()), index.version)
    digest = client.push_referrer(ref, manifest, MT_OCI_MANIFEST)
    if signer is not None:
        sign_artifact(client, ref, digest, signer)
    return digest


def find_index(client: RegistryClient, repo: Reference | str, manifest_digest: str,
               policy: TrustPolicy | None = None) -> tuple[str, ImageIndex] | None:
    """The index attached to ``manifest_digest`` in ``repo``: (artifact manifest digest, index), or None.

    Without a policy (or with mode ``off`` for the repository) the newest referrer wins.  With ``require``
    only indexes signed by a trusted key are candidates, the newest *signed* one (by its signed time, then
    digest: deterministic) first; with ``prefer`` the same, falling back to the newest unsigned one when none
    is signed.  Candidates that are malformed or of another schema version are passed over (logged).
    """
    ref = repo if isinstance(repo, Reference) else Reference.parse(repo)
    ref = ref.in_repository(ref.repository)
    descs = client.referrers(ref, manifest_digest, ARTIFACT_TYPE)
    mode = policy.rule_for(ref.name).mode if policy is not None else "off"
    ordered = list(reversed(descs))  # the newest referrer first (unsigned order: the registry's)
    if mode != "off":
        assert policy is not None
        signed: list[tuple[str, str, Descriptor]] = []
        for desc in ordered[:MAX_CANDIDATES]:
            v = policy.signature(client, ref, desc.digest)
            if v is not None:
                signed.append((v.signed_at, desc.digest, desc))
            else:
                log.info("index %s of %s@%s carries no signature by a trusted key; ignored", desc.digest[:19],
                         ref.name, manifest_digest[:19])
        signed.sort(key=lambda t: (t[0], t[1]), reverse=True)
        ordered = [d for _, _, d in signed] + (ordered if mode == "prefer" else [])
    for desc in ordered[:MAX_CANDIDATES]:
        index = _load(client, ref, desc.digest, manifest_digest)
        if index is not None:
            return desc.digest, index
    return None


def _load(client: RegistryClient, ref: Reference, artifact: str, subject: str) -> ImageIndex | None:
    """The index in artifact manifest ``artifact`` made for image manifest ``subject``, or None (gone,
    malformed, another schema version, made for another image: logged)."""
    try:
        man = client.get_manifest(ref.with_digest(artifact))
    except NotFound:
        return None  # a stale entry of the tag schema
    blob = next((d for d in man.layers if d.media_type == INDEX_MEDIA_TYPE), None)
    if blob is None or (man.subject and man.subject.digest != subject) or blob.size > MAX_INDEX_BYTES:
        return None
    try:
        index = ImageIndex.from_json(client.get_blob(ref, blob.digest, max_size=MAX_INDEX_BYTES), source=ref.name)
    except BadIndex as e:
        log.warning("index %s of %s@%s not used: %s", artifact[:19], ref.name, subject[:19], e)
        return None
    if index.subject != subject:
        log.warning("index %s is for %s, attached to %s; not used", blob.digest, index.subject, subject)
        return None
    return index


def bound_index(client: RegistryClient, repo: Reference | str, manifest: Manifest,
                policy: TrustPolicy | None = None) -> tuple[str, ImageIndex] | None:
    """The index a *bound* image manifest names (annotation :data:`BOUND_INDEX_ANNOTATION`), or None if it
    names none.  The digest pins exactly one index — no referrer lookup, no newer index can replace it — but
    the policy still decides whether its converter is trusted (an image author could otherwise bind its own
    EROFS blobs to another image's diffIDs, see docs/security.md).  Raises :class:`BadIndex` when the
    manifest names an index that cannot be used: the caller pulls the ordinary way, not some other index.

    The bound manifest is the original one plus two annotations (same config, same layers): the index's
    artifact digest and the original manifest's digest, the index's subject.  Neither is taken on trust: the
    signature vouches for the index, and the node still binds each entry to the pulled manifest's layer
    digest and the pulled config's diffID (:meth:`IndexReader.bound`)."""
    artifact = (manifest.doc.get("annotations") or {}).get(BOUND_INDEX_ANNOTATION)
    if artifact is None:
        return None
    if not (isinstance(artifact, str) and artifact.startswith("sha256:") and len(artifact) == 71):
        raise BadIndex(f"manifest {manifest.digest[:19]}: {BOUND_INDEX_ANNOTATION} is not a sha256 digest")
    ref = repo if isinstance(repo, Reference) else Reference.parse(repo)
    ref = ref.in_repository(ref.repository)
    if policy is not None and policy.rule_for(ref.name).mode == "require" and policy.signature(
            client, ref, artifact) is None:
        raise BadIndex(f"bound index {artifact[:19]} of {ref.name} carries no signature by a trusted key")
    index = _load(client, ref, artifact, unbound_digest(manifest))
    if index is None:
        raise BadIndex(f"bound index {artifact[:19]} of {ref.name}@{manifest.digest[:19]} is missing or not "
                       "for this image")
    return artifact, index


def bind_manifest(manifest: Manifest, artifact: str) -> bytes:
    """The bound form of ``manifest``: the same document plus the annotation naming index ``artifact``
    (serialised canonically, so binding the same pair twice gives the same digest)."""
    doc = dict(manifest.doc)
    doc["annotations"] = {**(doc.get("annotations") or {}), BOUND_INDEX_ANNOTATION: artifact,
                          BOUND_FROM_ANNOTATION: manifest.digest}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def unbound_digest(manifest: Manifest) -> str:
    """The digest of the manifest a bound one was made from (its annotation; the manifest itself otherwise)."""
    original = (manifest.doc.get("annotations") or {}).get(BOUND_FROM_ANNOTATION)
    return original if isinstance(original, str) else manifest.digest


def manifest_descriptor(man: Manifest) -> Descriptor:
    return Descriptor(man.media_type, man.digest, len(man.raw))


__all__ = [
    "ARTIFACT_TYPE",
    "BOUND_INDEX_ANNOTATION",
    "DEFAULT_CHUNK_SIZE",
    "EROFS_MEDIA_TYPE",
    "FORMAT_VERSION",
    "INDEX_MEDIA_TYPE",
    "READ_VERSIONS",
    "WIRE_CODECS",
    "WIRE_MEDIA_TYPE",
    "BadIndex",
    "CorruptFrame",
    "ImageIndex",
    "LayerBlob",
    "UnsupportedIndex",
    "WireBlob",
    "artifact_manifest",
    "bind_manifest",
    "bound_index",
    "chunk_digests",
    "chunk_span",
    "chunks_covering",
    "fetch_node_blob",
    "find_index",
    "frame_bound",
    "hash_chunks",
    "inflate",
    "manifest_descriptor",
    "n_chunks",
    "pack_frames",
    "push_index",
    "read_chunk",
    "sha256_digest",
    "unbound_digest",
    "unpack_frames",
]
