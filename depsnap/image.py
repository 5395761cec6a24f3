"""Image surgery for depsnap: take the base image as an OCI layout, append one layer (config
``rootfs.diff_ids`` and ``history`` updated), push the result under the key's tag.

Registry traffic goes through skopeo (a real, widely used client), so base images in any registry skopeo
can read work, and the base's layers are copied registry-side without recompression.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageError(RuntimeError):
    pass


def _skopeo(*args: str, plain_http: bool) -> subprocess.CompletedProcess[str]:
    flags: list[str] = []
    if plain_http:
        copy = args[0] == "copy"
        flags = ["--src-tls-verify=false", "--dest-tls-verify=false"] if copy else ["--tls-verify=false"]
    proc = subprocess.run(["skopeo", args[0], *flags, "--retry-times", "2", *args[1:]], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ImageError(f"skopeo {args[0]} failed: {proc.stderr.strip()}")
    return proc


def exists(image: str, plain_http: bool = False) -> str | None:
    """The manifest digest of ``image`` if the registry has it, else None."""
    try:
        raw = _skopeo("inspect", "--raw", f"docker://{image}", plain_http=plain_http).stdout
    except ImageError as e:
        if "manifest unknown" in str(e) or "not found" in str(e).lower():
            return None
        raise
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def put(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    def manifest_for(self, tag: str) -> dict[str, Any]:
        index = json.loads((self.root / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return dict(json.loads(self.blob(m["digest"]).read_bytes()))
        raise ImageError(f"tag {tag} not in layout {self.root}")


def fetch_base(image: str, dest: Path, plain_http: bool = False) -> Layout:
    _skopeo("copy", "--quiet", f"docker://{image}", f"oci:{dest}:base", plain_http=plain_http)
    return Layout(dest)


def base_epoch(layout: Layout) -> int:
    """The base image's creation time (its config ``created``; 0 if absent): the deterministic clock of a
    snapshot built on it — mtimes in the new layer are clamped to it and its history entry carries it."""
    manifest = layout.manifest_for("base")
    config = json.loads(layout.blob(manifest["config"]["digest"]).read_bytes())
    created = str(config.get("created") or "")
    if not created:
        return 0
    try:
        return int(calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return 0


def append_layer(layout: Layout, write_tar: Callable[[IO[bytes]], Any], created_by: str, tag: str,
                 epoch: int | None = None) -> str:
    """Append a gzip layer written by ``write_tar`` to the ``base`` image of ``layout`` as ``tag``.

    With ``epoch`` the new config and manifest depend only on the base, the layer and ``created_by`` (history
    time = ``epoch``), so builders that produce the same layer produce the same image digest."""
    tmp = layout.root / "layer.incoming"
    outer, inner = hashlib.sha256(), hashlib.sha256()

    class Tee:
        def __init__(self, f: IO[bytes], h: Any) -> None:
            self.f, self.h = f, h

        def write(self, b: bytes) -> int:
            self.h.update(b)
            return self.f.write(b)

        def flush(self) -> None:
            self.f.flush()

    with open(tmp, "wb") as raw:
        tee = Tee(raw, outer)
        with gzip.GzipFile(fileobj=tee, mode="wb", mtime=0, compresslevel=6) as gz:  # type: ignore[arg-type]
            write_tar(Tee(gz, inner))  # type: ignore[arg-type]
    digest = "sha256:" + outer.hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, layout.blob(digest))
    manifest = layout.manifest_for("base")
    config = json.loads(layout.blob(manifest["config"]["digest"]).read_bytes())
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append("sha256:" + inner.hexdigest())
    config.setdefault("history", []).append({
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch if epoch is not None else time.time())),
        "created_by": created_by,
        "comment": "bootseer depsnap"})
    cfg_digest, cfg_size = layout.put(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [*manifest["layers"], {"mediaType": MT_OCI_LAYER_GZIP, "digest": digest, "size": size}],
    }
    m_digest, m_size = layout.put(json.dumps(manifest).encode())
    index = json.loads((layout.root / "index.json").read_text())
    index["manifests"].append({"mediaType": MT_OCI_MANIFEST, "digest": m_digest, "size": m_size,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    (layout.root / "index.json").write_text(json.dumps(index))
    return m_digest


def push(layout: Layout, tag: str, dest: str, plain_http: bool = False) -> None:
    _skopeo("copy", "--quiet", f"oci:{layout.root}:{tag}", f"docker://{dest}", plain_http=plain_http)
