"""Make a pushed snapshot image lazily loadable: get it converted and indexed like any other image.

A snapshot image is the base's layers plus one new layer.  The registry sidecar converts every push on its
own (registry notifications), so on a registry with a sidecar the index simply appears; ``depsnap`` can also
convert it itself (``auto``), which keeps a registry without a sidecar working.  Converting here costs only
the new layer: the base's EROFS blobs are taken from the base image's index (a layer map seeded with it; the
converter mounts those blobs into the snapshot's repository instead of converting them again).  Conversion is
deterministic, so when the sidecar and ``depsnap`` both convert, they push the same index.

Modes: ``auto`` (use the index if there is one, else convert here), ``wait`` (leave it to the sidecar and wait
for the index, with a deadline), ``none``.
"""

from __future__ import annotations

import logging
import time

from bootseer.index import find_index
from bootseer.reference import Reference
from bootseer.registry import RegistryClient, RegistryError
from bootseer.trust import Signer, TrustPolicy
from depsnap import image
from registry_sidecar.convert import MemoryLayerMap, convert_image

log = logging.getLogger("bootseer.depsnap")
MODES = ("auto", "wait", "none")


class NotIndexed(RuntimeError):
    pass


def find(client: RegistryClient, ref: str, digest: str, signer: Signer | None = None) -> str | None:
    """The digest of the index artifact attached to manifest ``digest`` in ``ref``'s repository, or None.
    With ``signer``, only an index carrying its signature counts (an unsigned one is what nodes that require
    signatures ignore: it would be converted again, and signed)."""
    policy = TrustPolicy.for_signer(signer) if signer is not None else None
    found = find_index(client, Reference.parse(ref), digest, policy)
    return found[0] if found else None


def ensure_indexed(ref: str, digest: str, base: str | None, plain_http: bool = False, mode: str = "auto",
                   timeout: float = 1800, signer: Signer | None = None) -> str | None:
    """Index of the image ``ref`` (manifest ``digest``) per ``mode``; returns the index artifact's digest.
    ``signer`` signs an index converted here (and, in ``auto``, makes an unsigned existing one not count)."""
    if mode not in MODES:
        raise ValueError(f"index mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "none":
        return None
    client = image.client(plain_http)
    try:
        existing = find(client, ref, digest, signer)
        if existing:
            return existing
        if mode == "wait":
            deadline = time.monotonic() + timeout
            delay = 0.2
            while time.monotonic() < deadline:
                time.sleep(delay)  # polling the registry for the sidecar's result, with a deadline
                delay = min(delay * 1.5, 5.0)
                found = find(client, ref, digest, signer)
                if found:
                    return found
            raise NotIndexed(f"{ref}: no index after {timeout:.0f} s; is the registry sidecar running?")
        return convert(client, ref, base, signer)
    except RegistryError as e:
        raise NotIndexed(f"{ref}: indexing failed: {e}") from e


def convert(client: RegistryClient, ref: str, base: str | None, signer: Signer | None = None) -> str | None:
    """Convert ``ref`` here, reusing the EROFS blobs of ``base``'s index for the layers they share."""
    layer_map = MemoryLayerMap()
    if base:
        base_ref = Reference.parse(base)
        try:
            manifest, _ = client.resolve_image(base_ref, None)
            found = find_index(client, base_ref, manifest.digest)
        except RegistryError as e:  # a base we cannot read: convert without reuse
            log.info("base %s not readable for blob reuse: %s", base, e)
            found = None
        if found:
            for blob in found[1].layers.values():
                layer_map.put_layer(blob, base_ref.repository)
    t0 = time.monotonic()
    result = convert_image(client, ref, layer_map=layer_map, signer=signer)
    summary = result.summary()
    log.info("indexed %s in %.1f s: %s converted, %s reused", ref, time.monotonic() - t0, summary["converted"],
             summary["reused"])
    return result.index_digest
