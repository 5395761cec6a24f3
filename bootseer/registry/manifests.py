"""Manifests: fetched by tag or digest and checked against their bytes (by the digest asked for, or the one the
registry announces), resolved through an index to one platform, pushed, listed and deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import requests

from bootseer.reference import Reference
from bootseer.registry.errors import DigestMismatch, NotFound
from bootseer.registry.oci import (
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Manifest,
    Platform,
    select_platform,
    sha256_digest,
    verify_bytes,
)
from bootseer.registry.transport import Transport, as_reference

log = logging.getLogger("bootseer.registry")

class Manifests(Transport):
    def get_manifest(self, ref: Reference | str, accept: Iterable[str] = MANIFEST_TYPES) -> Manifest:
        """Fetch a manifest or index by tag or digest, verified against the digest asked for or announced."""
        ref = as_reference(ref)
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
        ref = as_reference(ref)
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
        ref = as_reference(ref)
        top = self.get_manifest(ref)
        if not top.is_index:
            return top, None
        want = Platform.parse(platform) if isinstance(platform, str) else (platform or Platform.host())
        child = select_platform(top, want)
        return self.get_manifest(ref.with_digest(child.digest)), top

    def put_manifest(self, ref: Reference | str, raw: bytes, media_type: str, reference: str | None = None) -> str:
        """Upload a manifest under ``reference`` (a tag, or by default its own digest); return its digest."""
        digest, _ = self._put_manifest(as_reference(ref), raw, media_type, reference)
        return digest

    def _put_manifest(self, ref: Reference, raw: bytes, media_type: str,
                      reference: str | None) -> tuple[str, requests.Response]:
        digest = sha256_digest(raw)
        target = reference or (ref.tag if ref.tag and not ref.digest else None) or digest
        # DIGEST_INVALID on a manifest we hashed ourselves: docker-registry 2.8 read the link file of a blob the
        # manifest names while another push of that blob rewrote it (its filesystem driver truncates, then
        # writes), and answers this beside MANIFEST_BLOB_UNKNOWN (seen in CI with two `depsnap run` builders
        # pushing the same image).  Once that write ends the link reads again: sent again after a pause.
        _, resp = self._request(ref, "PUT", f"/{ref.repository}/manifests/{target}", capability="push", push=True,
                                ok=(200, 201, 202), headers={"Content-Type": media_type}, data=raw,
                                retry_codes=("DIGEST_INVALID",))
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced != digest:
            raise DigestMismatch(f"registry stored the manifest as {announced}, we sent {digest}")
        return digest, resp

    def list_tags(self, ref: Reference | str) -> list[str]:
        ref = as_reference(ref)
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
        ref = as_reference(ref)
        self._request(ref, "DELETE", f"/{ref.repository}/manifests/{digest}", capability="push", push=True,
                      ok=(200, 202))
