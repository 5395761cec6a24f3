"""Make a pushed snapshot image lazily loadable: get it converted and indexed like any other image.

A snapshot image is the base's layers plus one new layer.  The registry sidecar converts every push on its
own (registry notifications), so on a stack with a sidecar the index simply appears; ``depsnap`` can also
convert it itself (``auto``), which is what keeps a registry without a sidecar working.  Converting here costs
only the new layer: the base's EROFS blobs are taken from the base image's index (a layer map seeded with
it; the converter mounts those blobs into the snapshot's repository instead of converting them again).
Conversion is deterministic, so when the sidecar and ``depsnap`` both convert, they push the same index.

Modes: ``auto`` (use the index if there is one, else convert here), ``wait`` (leave it to the sidecar and wait
for the index, with a deadline), ``none``.  Without the converter package (``registry_sidecar``) ``auto``
reports that the image stays non-lazy rather than failing the job: the image is correct either way, only
slower to start.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

log = logging.getLogger("bootseer.depsnap")
MODES = ("auto", "wait", "none")


class NotIndexed(RuntimeError):
    pass


def converter_available() -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in
                   ("registry_sidecar.convert", "registry_sidecar.index", "bootseer.registry"))
    except ModuleNotFoundError:
        return False


def _client(plain_http: bool) -> Any:
    from bootseer.registry import default_client

    return default_client(plain_http=plain_http)


def _repo(ref: str) -> str:
    """``host/path:tag`` or ``host/path@digest`` → ``host/path``."""
    name = ref.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else name.split(":", 1)[0]


def find(ref: str, digest: str, plain_http: bool = False) -> str | None:
    """The digest of the index artifact attached to ``digest`` in ``ref``'s repository, or None."""
    from registry_sidecar.index import find_index

    found = find_index(_client(plain_http), _repo(ref), digest)
    return found[0] if found else None


def ensure_indexed(ref: str, digest: str, base: str | None, plain_http: bool = False, mode: str = "auto",
                   timeout: float = 1800) -> str | None:
    """Index of the image ``ref`` (manifest ``digest``) per ``mode``; returns the index artifact's digest."""
    if mode not in MODES:
        raise ValueError(f"index mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if not converter_available():
        log.warning("%s: no converter in this installation; the image is not lazily loadable", ref)
        return None
    existing = find(ref, digest, plain_http)
    if existing:
        return existing
    if mode == "wait":
        deadline = time.monotonic() + timeout
        delay = 0.2
        while time.monotonic() < deadline:
            time.sleep(delay)  # polling the registry for the sidecar's result, with a deadline
            delay = min(delay * 1.5, 5.0)
            found = find(ref, digest, plain_http)
            if found:
                return found
        raise NotIndexed(f"{ref}: no index after {timeout:.0f} s; is the registry sidecar running?")
    return convert(ref, base, plain_http)


def convert(ref: str, base: str | None, plain_http: bool = False) -> str | None:
    """Convert ``ref`` here, reusing the EROFS blobs of ``base``'s index for the layers they share."""
    from registry_sidecar.convert import MemoryLayerMap, convert_image
    from registry_sidecar.index import find_index

    client = _client(plain_http)
    layer_map = MemoryLayerMap()
    if base:
        base_digest = _manifest_digest(client, base)
        found = find_index(client, _repo(base), base_digest) if base_digest else None
        if found:
            for blob in found[1].layers.values():
                layer_map.put_layer(blob, _repository_path(base))
    t0 = time.monotonic()
    result = convert_image(client, ref, layer_map=layer_map)
    summary = result.summary()
    log.info("indexed %s in %.1f s: %s converted, %s reused", ref, time.monotonic() - t0, summary["converted"],
             summary["reused"])
    return result.index_digest


def _repository_path(ref: str) -> str:
    """The repository path (without the registry host) a layer map records."""
    from bootseer.reference import Reference

    return Reference.parse(ref).repository


def _manifest_digest(client: Any, ref: str) -> str | None:
    from bootseer.reference import Reference

    try:
        manifest, _ = client.resolve_image(Reference.parse(ref), None)
    except Exception as e:  # a base we cannot read: convert without reuse
        log.info("base %s not readable for blob reuse: %s", ref, e)
        return None
    return str(manifest.digest)
