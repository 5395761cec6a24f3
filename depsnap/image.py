"""Image surgery for depsnap: the base image's manifest and config, one layer appended (config
``rootfs.diff_ids`` and ``history`` updated), the result pushed under the key's tag.

Registry traffic goes through the project's registry client (:mod:`bootseer.registry`: Docker credentials,
bearer tokens, ``hosts.toml`` mirrors, verified digests).  Only the new layer, the new config and the new
manifest are uploaded; the base's layers are never downloaded — they are already in the base's repository,
and the registry links them into the snapshot's repository (cross-repository mount) or, for a base in
another registry, they are streamed across once.

Everything here is deterministic: the same base, the same layer bytes and the same ``created_by`` give the
same config and manifest digests, so two builders of one key push the same image.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bootseer.reference import Reference
from bootseer.registry import (
    MT_DOCKER_LAYER,
    MT_DOCKER_MANIFEST,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    Manifest,
    NotFound,
    RegistryClient,
    RegistryError,
    default_client,
)


class ImageError(RuntimeError):
    pass


def client(plain_http: bool = False) -> RegistryClient:
    return default_client(plain_http=plain_http)


def exists(image: str, plain_http: bool = False) -> str | None:
    """The manifest digest ``image`` points at if the registry has it, else None."""
    try:
        desc = client(plain_http).head_manifest(Reference.parse(image))
    except (RegistryError, ValueError) as e:  # ValueError: not a valid reference
        raise ImageError(f"cannot look up {image}: {e}") from e
    return desc.digest if desc and desc.digest else None


@dataclass
class BaseImage:
    """The base as the registry has it: the (platform) image manifest and its config."""

    ref: Reference
    manifest: Manifest
    config_raw: bytes

    @property
    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.config_raw))

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def epoch(self) -> int:
        """The base's creation time (config ``created``; 0 if absent): the deterministic clock of snapshots
        built on it — mtimes in the new layer are clamped to it and its history entry carries it."""
        created = str(self.config.get("created") or "")
        try:
            return calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")) if created else 0
        except ValueError:
            return 0


def load_base(image: str, plain_http: bool = False, platform: str | None = None) -> BaseImage:
    reg = client(plain_http)
    try:
        ref = Reference.parse(image)
    except ValueError as e:
        raise ImageError(str(e)) from e
    try:
        manifest, _ = reg.resolve_image(ref, platform)
        if manifest.config is None:
            raise ImageError(f"{image}: manifest {manifest.digest} has no config (not a container image)")
        return BaseImage(ref, manifest, reg.get_blob(ref, manifest.config.digest))
    except NotFound as e:
        raise ImageError(f"base image {image} not found: {e}") from e
    except RegistryError as e:
        raise ImageError(f"cannot read base image {image}: {e}") from e


@dataclass
class Layer:
    path: Path
    digest: str  # of the gzip blob
    size: int
    diff_id: str  # of the uncompressed tar


def write_layer_blob(dest_dir: Path, write_tar: Callable[[IO[bytes]], Any]) -> Layer:
    """Gzip what ``write_tar`` writes into a file under ``dest_dir`` (gzip header without name or time, so the
    blob depends on the tar bytes only), hashing both the blob and the tar on the way."""
    outer, inner = hashlib.sha256(), hashlib.sha256()

    class Tee:
        def __init__(self, f: IO[bytes], h: Any) -> None:
            self.f, self.h = f, h

        def write(self, b: bytes) -> int:
            self.h.update(b)
            return self.f.write(b)

        def flush(self) -> None:
            self.f.flush()

    fd, tmp = tempfile.mkstemp(prefix="layer-", dir=dest_dir)
    with os.fdopen(fd, "wb") as raw, \
            gzip.GzipFile(fileobj=Tee(raw, outer), mode="wb", mtime=0, compresslevel=6) as gz:
        write_tar(Tee(gz, inner))  # type: ignore[arg-type]
    path = Path(tmp)
    return Layer(path, "sha256:" + outer.hexdigest(), path.stat().st_size, "sha256:" + inner.hexdigest())


def compose(base: BaseImage, layer: Layer, created_by: str, epoch: int) -> tuple[bytes, bytes, str]:
    """(manifest, config, manifest media type) of the base plus ``layer``, in the base's manifest format."""
    config = base.config
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(layer.diff_id)
    config.setdefault("history", []).append({
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)), "created_by": created_by,
        "comment": "bootseer depsnap"})
    config_raw = json.dumps(config, separators=(",", ":")).encode()
    doc = json.loads(base.manifest.raw)
    media_type = base.manifest.media_type
    if media_type not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST):
        raise ImageError(f"base manifest type {media_type} is not an image manifest")
    doc["config"] = {**doc["config"], "digest": "sha256:" + hashlib.sha256(config_raw).hexdigest(),
                     "size": len(config_raw)}
    layer_type = MT_DOCKER_LAYER if media_type == MT_DOCKER_MANIFEST else MT_OCI_LAYER_GZIP
    doc["layers"] = [*doc["layers"], {"mediaType": layer_type, "digest": layer.digest, "size": layer.size}]
    # OCI's base-image annotations: a node prefetches the base's recorded hot blocks for the layers the two
    # share before this image has a recording of its own (snapshotter.lazy.prefetcher)
    name = base.ref.name + (f":{base.ref.tag}" if base.ref.tag else "")  # the digest has its own annotation
    doc["annotations"] = {**(doc.get("annotations") or {}), "org.opencontainers.image.base.name": name,
                          "org.opencontainers.image.base.digest": base.digest}
    return json.dumps(doc, separators=(",", ":")).encode(), config_raw, media_type


def publish(base: BaseImage, layer: Layer, manifest_raw: bytes, config_raw: bytes, media_type: str, dest: str,
            plain_http: bool = False) -> str:
    """Push the snapshot image to ``dest`` (``host/repo:tag``); returns its manifest digest.

    Blobs first (the base's layers mounted from the base's repository or copied, then the new layer and the
    config), the manifest last: a tag never points at an image whose blobs are not all there."""
    reg = client(plain_http)
    target = Reference.parse(dest)
    try:
        same_registry = target.registry == base.ref.registry
        for desc in base.manifest.layers:
            if reg.blob_exists(target, desc.digest) is not None:
                continue
            if same_registry and reg.mount_blob(target, desc.digest, base.ref.repository):
                continue
            with tempfile.NamedTemporaryFile(prefix="bs-depsnap-blob-") as fh:  # another registry: copy it once
                reg.fetch_blob(base.ref, desc.digest, fh, desc.size)
                fh.flush()
                reg.push_blob(target, Path(fh.name), desc.digest, chunk_size=64 << 20)
        reg.push_blob(target, layer.path, layer.digest, chunk_size=64 << 20)
        reg.push_blob(target, config_raw)
        return reg.put_manifest(target, manifest_raw, media_type)
    except RegistryError as e:
        raise ImageError(f"pushing {dest} failed: {e}") from e
