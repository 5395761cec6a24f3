"""A minimal OCI image-layout writer: enough to build test images here, offline, and hand them to
``skopeo copy oci:DIR:TAG docker://...`` for pushing.

Layers are gzip-compressed tar streams.  Digests of the compressed blob and of the uncompressed stream
(the ``diff_id``) are computed in one pass while compressing, so a 1 GB layer is read once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class Layer:
    digest: str
    diff_id: str
    size: int
    comment: str = ""


class _HashingWriter(io.RawIOBase):
    """File-like sink that hashes and counts what passes through to ``dst``."""

    def __init__(self, dst: IO[bytes]) -> None:
        self.dst, self.sha, self.n = dst, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.dst.write(mv)
        self.n += len(mv)
        return len(mv)


@dataclass
class Layout:
    """An OCI image layout directory being filled with one image."""

    root: Path
    layers: list[Layer] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._blob_path(digest).write_bytes(data)
        return digest, len(data)

    def add_layer(self, write_tar: Callable[[IO[bytes]], None], comment: str = "", level: int = 6) -> Layer:
        """Add a gzip layer whose uncompressed tar stream ``write_tar`` writes into the file it is given."""
        tmp = self.root / "blobs" / ".incoming"
        with open(tmp, "wb") as raw:
            outer = _HashingWriter(raw)
            with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=level, mtime=0) as gz:  # type: ignore[arg-type]
                inner = _HashingWriter(gz)  # type: ignore[arg-type]
                write_tar(inner)  # type: ignore[arg-type]
        layer = Layer("sha256:" + outer.sha.hexdigest(), "sha256:" + inner.sha.hexdigest(), outer.n, comment)
        os.replace(tmp, self._blob_path(layer.digest))
        self.layers.append(layer)
        return layer

    def add_tar_file(self, tar_path: Path, comment: str = "") -> Layer:
        """Add an existing uncompressed tar file as a layer."""

        def copy(dst: IO[bytes]) -> None:
            with open(tar_path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)

        return self.add_layer(copy, comment)

    def add_entries(self, entries: Iterable[tuple[tarfile.TarInfo, bytes | None]], comment: str = "") -> Layer:
        """Add a layer from explicit tar entries (so tests control whiteouts, xattrs, links exactly)."""

        def write(dst: IO[bytes]) -> None:
            with tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                for info, data in entries:
                    tf.addfile(info, io.BytesIO(data) if data is not None else None)

        return self.add_layer(write, comment)

    def finish(self, tag: str, config: dict[str, Any] | None = None, arch: str = "amd64") -> str:
        """Write config, manifest and index.json; return the manifest digest."""
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": [ly.diff_id for ly in self.layers]},
            "history": [{"created_by": ly.comment or "bootseer test image"} for ly in self.layers],
        }
        cfg_digest, cfg_size = self.put_bytes(json.dumps(cfg, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": [{"mediaType": MT_LAYER_GZIP, "digest": ly.digest, "size": ly.size} for ly in self.layers],
        }
        m_digest, m_size = self.put_bytes(json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST, "digest": m_digest, "size": m_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": arch, "os": "linux"},
            }],
        }
        (self.root / "index.json").write_text(json.dumps(index))
        return m_digest


def entry(
    name: str,
    data: bytes | None = None,
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    linkname: str = "",
    xattrs: dict[str, str] | None = None,
    devmajor: int = 0,
    devminor: int = 0,
    mtime: int = 1_700_000_000,
) -> tuple[tarfile.TarInfo, bytes | None]:
    """One tar entry for :meth:`Layout.add_entries`; ``xattrs`` become PAX ``SCHILY.xattr.*`` records."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    info.linkname = linkname
    info.devmajor, info.devminor = devmajor, devminor
    if data is not None:
        info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def push(layout_dir: Path, tag: str, dest: str, plain_http: bool = True, cert_dir: Path | None = None) -> None:
    """Push ``layout_dir:tag`` to ``dest`` (``host:port/repo:tag``) with skopeo; over TLS when not
    ``plain_http``, trusting the ``*.crt`` CAs in ``cert_dir``."""
    import subprocess

    args = ["skopeo", "copy", "--quiet", "--retry-times", "3"]
    if plain_http:
        args.append("--dest-tls-verify=false")
    elif cert_dir is not None:
        args.append(f"--dest-cert-dir={cert_dir}")
    with tempfile.TemporaryDirectory() as tmp:  # no ~/.config writes: skopeo's own state in scratch
        env = dict(os.environ, XDG_RUNTIME_DIR=tmp, HOME=os.environ.get("HOME", tmp))
        args += [f"oci:{layout_dir}:{tag}", f"docker://{dest}"]
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy to {dest} failed: {proc.stderr.strip()}")


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed PAX tar of ``entries`` (from :func:`entry`), in memory: a layer for tests."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
