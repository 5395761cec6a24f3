"""The hot-block manifest in the registry: an OCI artifact whose ``subject`` is the image manifest.

Wire format (beside the BootSeer index, found the same way — referrers API, or the ``sha256-<hex>`` tag
schema on registries without it)::

    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.bootseer.hotblocks.v1",
     "config": <the empty descriptor, application/vnd.oci.empty.v1+json>,
     "layers": [{"mediaType": "application/vnd.bootseer.hotblocks.v1.parquet", "digest": ..., "size": ...}],
     "subject": <the image manifest's descriptor>,
     "annotations": {"io.bootseer.hotblocks.version": "1", "io.bootseer.hotblocks.created": "<RFC 3339>",
                     "io.bootseer.hotblocks.recordings": "<n>", "io.bootseer.hotblocks.bytes": "<hot bytes>"}}

The image's tag and digests never change.  Each recording pushes a new artifact (a merge includes the old
one's ranges); readers take the newest by its ``created`` annotation, falling back to listing order.
Only the newest is ever used: an older one that is corrupt is not looked at, a newest one that is corrupt
(or another image's) is ignored with a warning — no prefetch then, never a wrong one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bootseer.reference import Reference
from bootseer.registry import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    MT_OCI_EMPTY,
    MT_OCI_MANIFEST,
    Descriptor,
    DigestMismatch,
    NotFound,
    RegistryClient,
)
from recorder.hotblocks import BadManifest, HotBlockManifest

log = logging.getLogger("bootseer.recorder")

ARTIFACT_TYPE = "application/vnd.bootseer.hotblocks.v1"
PARQUET_MEDIA_TYPE = "application/vnd.bootseer.hotblocks.v1.parquet"
ANN_PREFIX = "io.bootseer.hotblocks."
MAX_MANIFEST_BLOB = 64 << 20


@dataclass
class Found:
    """A hot-block artifact fetched from the registry."""

    digest: str  # the artifact manifest's digest
    blob: str  # the Parquet blob's digest
    manifest: HotBlockManifest


def artifact_manifest(blob: Descriptor, subject: Descriptor, hb: HotBlockManifest) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_OCI_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": PARQUET_MEDIA_TYPE, "digest": blob.digest, "size": blob.size}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANN_PREFIX + "version": "1", ANN_PREFIX + "created": hb.created,
                        ANN_PREFIX + "recordings": str(hb.recordings), ANN_PREFIX + "bytes": str(hb.hot_bytes())},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push(client: RegistryClient, image: Reference | str, subject: Descriptor, hb: HotBlockManifest) -> str:
    """Push the Parquet blob, the empty config and the artifact manifest (a referrer of ``subject``);
    return the artifact manifest's digest."""
    ref = _repo(image)
    if hb.subject != subject.digest:
        raise ValueError(f"manifest recorded for {hb.subject}, not {subject.digest}")
    data = hb.to_parquet()
    desc = client.push_blob(ref, data)
    client.push_blob(ref, EMPTY_JSON)
    raw = artifact_manifest(Descriptor(PARQUET_MEDIA_TYPE, desc.digest, desc.size), subject, hb)
    return client.push_referrer(ref, raw, MT_OCI_MANIFEST)


def candidates(client: RegistryClient, image: Reference | str, manifest_digest: str) -> list[Descriptor]:
    """The image's hot-block artifacts, newest first."""
    ref = _repo(image)
    descs = client.referrers(ref, manifest_digest, ARTIFACT_TYPE)
    order = {d.digest: i for i, d in enumerate(descs)}
    return sorted(descs, key=lambda d: ((d.annotations or {}).get(ANN_PREFIX + "created", ""), order[d.digest]),
                  reverse=True)


def fetch(client: RegistryClient, image: Reference | str, manifest_digest: str, *,
          image_layers: Sequence[str] | None = None, index_blobs: Mapping[str, str] | None = None,
          descs: Sequence[Descriptor] | None = None) -> Found | None:
    """The newest hot-block manifest of the image, or None (none, or the newest is unusable: warned).

    With ``image_layers`` (the image's layer digests) and ``index_blobs`` (layer → EROFS blob of the index),
    a manifest that does not fit the image is ignored too.  ``descs``: :func:`candidates` if already listed.
    Registry errors other than "not found" propagate."""
    ref = _repo(image)
    for desc in descs if descs is not None else candidates(client, ref, manifest_digest):
        try:
            man = client.get_manifest(ref.with_digest(desc.digest))
        except NotFound:
            continue  # a stale entry of the tag schema
        layer = next((d for d in man.layers if d.media_type == PARQUET_MEDIA_TYPE), None)
        if layer is None or (man.subject is not None and man.subject.digest != manifest_digest):
            log.warning("hot-block artifact %s of %s is malformed; ignored", desc.digest, manifest_digest)
            return None
        try:
            if layer.size > MAX_MANIFEST_BLOB:
                raise BadManifest(f"{layer.size} bytes is more than a hot-block manifest can be")
            hb = HotBlockManifest.from_parquet(client.get_blob(ref, layer.digest, max_size=MAX_MANIFEST_BLOB))
            if hb.subject != manifest_digest:
                raise BadManifest(f"recorded for image {hb.subject}")
            if image_layers is not None:
                hb.check(image_layers, index_blobs)
        except (BadManifest, DigestMismatch, NotFound) as e:  # a blob gone or not what it claims: corrupt too
            log.warning("hot-block manifest %s of %s ignored: %s", desc.digest, manifest_digest, e)
            return None
        return Found(desc.digest, layer.digest, hb)
    return None


def _repo(image: Reference | str) -> Reference:
    ref = image if isinstance(image, Reference) else Reference.parse(image)
    return ref.in_repository(ref.repository)
