"""Referrers: the referrers API, and for registries without it (distribution 2.8) the referrers *tag schema*:
an OCI index tagged ``sha256-<hex>`` listing the artifacts whose ``subject`` is that manifest.  Pushing a
referrer updates that index unless the registry answers the manifest ``PUT`` with ``OCI-Subject``.  A
registry whose referrers route answers a bare 404 (no OCI error body: the route does not exist) is asked
through the tag schema only for the next :data:`REFERRERS_API_RECHECK` seconds — one round trip less per
lookup (the snapshotter looks up two referrers per image pull).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urlencode

from bootseer.reference import Reference
from bootseer.registry.errors import NotFound, RegistryError
from bootseer.registry.manifests import Manifests
from bootseer.registry.oci import (
    MAX_MANIFEST_BYTES,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    Manifest,
    referrers_tag,
)
from bootseer.registry.transport import as_reference

log = logging.getLogger("bootseer.registry")

REFERRERS_API_RECHECK = 600.0  # seconds a registry without the referrers API is not asked for it again


class Referrers(Manifests):
    def referrers(self, ref: Reference | str, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        """Artifacts whose ``subject`` is ``subject``: referrers API, else the ``sha256-<hex>`` tag schema."""
        ref = as_reference(ref)
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
        ref = as_reference(ref)
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
