"""The BootSeer index: which EROFS blob stands for which layer of an image, and how to verify it chunk by chunk.

Wire format
-----------
The index is an OCI artifact attached to the image manifest as a *referrer*:

* **artifact manifest** — an OCI image manifest (``application/vnd.oci.image.manifest.v1+json``) with
  ``artifactType: application/vnd.bootseer.index.v1+json`` (:data:`ARTIFACT_TYPE`), the empty config
  (``application/vnd.oci.empty.v1+json``, ``{}``), ``subject`` = the image manifest's descriptor, and layers:

  1. the **index blob** (media type :data:`INDEX_MEDIA_TYPE`, the same string as the artifact type);
  2. every EROFS blob it names (media type :data:`EROFS_MEDIA_TYPE`, annotation
     ``io.bootseer.layer.digest`` = the original layer digest) — listed so that registry garbage collection
     keeps them alive as long as the index exists, and so ``skopeo copy --all`` / ``oras copy`` carry them.

  It is pushed by digest and found with the referrers API or, on registries without it (distribution 2.8),
  the referrers tag schema (``sha256-<hex>`` tag on an OCI index), see :meth:`RegistryClient.referrers`.

* **index blob** — canonical JSON (sorted keys, no whitespace), so converting the same image twice yields
  the same bytes, hence the same digests all the way up::

      {"schemaVersion": 2,
       "mediaType": "application/vnd.bootseer.index.v1+json",
       "subject": "sha256:<image manifest digest>",
       "converter": {"format": "erofs", "compression": "lz4hc", "version": 2},
       "layers": [{"digest": "sha256:<original layer>", "mediaType": "<its media type>", "size": <its size>,
                   "diffID": "sha256:<sha256 of its uncompressed tar>",
                   "blob": {"mediaType": "application/vnd.bootseer.layer.v1.erofs",
                            "digest": "sha256:<erofs blob>", "size": <bytes>},
                   "chunkSize": 1048576,
                   "chunks": ["<sha256 hex of chunk 0>", ...]}],
       "skipped": [{"digest": "sha256:...", "mediaType": "...", "reason": "..."}]}

  Chunk *i* covers bytes ``[i*chunkSize, min((i+1)*chunkSize, size))`` of the EROFS blob; the last chunk is
  short.  Every lazily fetched range is checked against these digests before it is served or cached.
  ``skipped`` lists layers that have no EROFS blob (unknown media type, refused as hostile, …), with the
  reason; nodes pull those the ordinary way.

  ``diffID`` (new in schema version 2) is the sha256 of the tar stream the converter unpacked: it binds the
  EROFS blob to what the image's config says the layer is.  A node uses an entry only if its (``digest``,
  ``diffID``) equal the pulled manifest's layer digest and the pulled config's diffID at that position
  (docs/security.md); a node refuses a schema version it does not know and pulls the ordinary way.

  Bounds, checked before anything is materialised: the blob at most :data:`MAX_INDEX_BYTES`, at most
  :data:`MAX_LAYERS` layers, a chunk size of at most :data:`MAX_CHUNK_SIZE`, exactly as many chunk digests as
  the blob size needs, each 64 hex digits.

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

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
FORMAT_VERSION = 2  # 2: per-layer diffID (a node refuses any other version and pulls the ordinary way)
MAX_CHUNK_SIZE = 4 << 20  # a chunk is one bytearray on the node: a registry must not choose its size
MAX_INDEX_BYTES = 16 << 20  # ~250k chunk digests: 32 GB of blobs at the default chunk size
MAX_CANDIDATES = 64  # referrers of one image looked at, newest first: a registry writer cannot make a node
# check thousands (unsigned answers are cached too, see TrustPolicy.signature)
MAX_LAYERS = 1024  # images have at most a few hundred layers (containerd's overlay caps lowerdirs at 500)
CONVERTER = {"format": "erofs", "compression": "lz4hc", "version": FORMAT_VERSION}


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


# ------------------------------------------------------------------------------------------ the format
class BadIndex(RegistryError):
    """The index artifact exists but is malformed."""


class UnsupportedIndex(BadIndex):
    """An index of a schema version this code does not read (a newer converter's, or an old v1 one)."""


_HEX = frozenset("0123456789abcdef")


def _is_sha256(digest: str) -> bool:
    return digest.startswith("sha256:") and len(digest) == 71 and _HEX.issuperset(digest[7:])


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
        return {"digest": self.layer_digest, "mediaType": self.layer_media_type, "size": self.layer_size,
                "diffID": self.diff_id,
                "blob": {"mediaType": self.blob.media_type, "digest": self.blob.digest, "size": self.blob.size},
                "chunkSize": self.chunk_size, "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> LayerBlob:
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
        return cls(str(d["digest"]), str(d.get("mediaType", "")), int(d.get("size", 0)), blob, chunk_size, chunks,
                   diff_id, source)


@dataclass
class ImageIndex:
    subject: str
    layers: dict[str, LayerBlob] = field(default_factory=dict)  # original layer digest → blob, in image order
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> bytes:
        doc = {"schemaVersion": FORMAT_VERSION, "mediaType": INDEX_MEDIA_TYPE, "subject": self.subject,
               "converter": CONVERTER, "layers": [lb.to_dict() for lb in self.layers.values()],
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
            if doc.get("schemaVersion") != FORMAT_VERSION:
                raise UnsupportedIndex(f"BootSeer index schema version {doc.get('schemaVersion')!r}; this node "
                                       f"reads version {FORMAT_VERSION}")
            if len(doc.get("layers") or []) > MAX_LAYERS:
                raise BadIndex(f"index of {len(doc['layers'])} layers, more than {MAX_LAYERS}")
            layers = [LayerBlob.from_dict(d, source) for d in doc.get("layers") or []]
            return cls(str(doc["subject"]), {lb.layer_digest: lb for lb in layers}, list(doc.get("skipped") or []))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadIndex(f"malformed BootSeer index: {e}") from e


def artifact_manifest(index_blob: Descriptor, subject: Descriptor, layers: list[LayerBlob]) -> bytes:
    """The referrer manifest for an index blob (canonical JSON, deterministic)."""
    blobs: dict[str, dict[str, Any]] = {}
    for lb in layers:  # one entry per distinct blob (two identical layers share one)
        blobs.setdefault(lb.blob.digest, {"mediaType": EROFS_MEDIA_TYPE, "digest": lb.blob.digest,
                                          "size": lb.blob.size, "annotations": {LAYER_ANNOTATION: lb.layer_digest}})
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_OCI_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": INDEX_MEDIA_TYPE, "digest": index_blob.digest, "size": index_blob.size},
                   *blobs.values()],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {"io.bootseer.index.version": str(FORMAT_VERSION)},
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
                                 list(index.layers.values()))
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
    "INDEX_MEDIA_TYPE",
    "BadIndex",
    "ImageIndex",
    "LayerBlob",
    "UnsupportedIndex",
    "artifact_manifest",
    "bind_manifest",
    "bound_index",
    "chunk_digests",
    "chunk_span",
    "chunks_covering",
    "find_index",
    "hash_chunks",
    "manifest_descriptor",
    "n_chunks",
    "push_index",
    "sha256_digest",
    "unbound_digest",
]
