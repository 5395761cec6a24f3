"""``bootseer pull IMAGE``: put an image into containerd so that its indexed layers are lazy.

``ctr image pull`` downloads and applies every layer; the CRI plugin passes the labels that make a
snapshotter serve a layer remotely, but only for pods.  This is the third way in, for ``ctr run
--snapshotter bootseer`` and scripts: a containerd client doing what the CRI plugin's pull does with
``disable_snapshot_annotations = false`` — and what stargz's ``ctr-remote image rpull`` does:

1. resolve the image in the registry (an index is narrowed to the host platform) and store the manifest,
   the index and the config in containerd's content store, with the ``containerd.io/gc.ref.*`` labels
   containerd's own unpacker writes, so garbage collection keeps exactly what the image needs;
2. for each layer, bottom up, ``Prepare`` through *containerd's* snapshots service (so containerd's
   metadata knows every snapshot) with ``containerd.io/snapshot.ref=<chain ID>`` and the CRI labels
   (image ref, manifest digest, layer digest, following layers).  The snapshotter answers
   ``ALREADY_EXISTS`` for a layer it serves lazily; otherwise (no index, a skipped layer, a lazy path that
   failed) the layer is downloaded into the content store, applied with containerd's diff service onto the
   returned mounts, checked against the config's diff ID and committed under its chain ID — so mixed
   images work and nothing depends on the lazy path working;
3. create (or update) the image record.  Everything happens under a lease, so a concurrent garbage
   collection cannot take half of it away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from bootseer import events
from bootseer.containerd import Containerd, Descriptor
from bootseer.reference import Reference
from bootseer.registry import Platform, RegistryClient

log = logging.getLogger("bootseer.pull")

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
LABEL_REMOTE = "containerd.io/snapshot/remote"
_LAYERS_LABEL_MAX = 4096  # containerd bounds a label (key + value) to 4 KiB


class PullError(RuntimeError):
    pass


@dataclass
class LayerOutcome:
    digest: str
    chain_id: str
    size: int
    mode: str  # "lazy" (remote snapshot), "present" (already there), "pulled" (downloaded and applied)
    seconds: float = 0.0


@dataclass
class PullResult:
    image: str
    manifest: str
    snapshotter: str
    layers: list[LayerOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def downloaded_bytes(self) -> int:
        return sum(lo.size for lo in self.layers if lo.mode == "pulled")

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "manifest": self.manifest, "snapshotter": self.snapshotter,
                "seconds": round(self.seconds, 3), "downloaded_bytes": self.downloaded_bytes,
                "lazy_layers": sum(lo.mode == "lazy" for lo in self.layers),
                "layers": [{"digest": lo.digest, "chain_id": lo.chain_id, "size": lo.size, "mode": lo.mode,
                            "seconds": round(lo.seconds, 3)} for lo in self.layers]}


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def layer_labels(image: str, manifest_digest: str, layers: list[str], i: int, chain_id: str) -> dict[str, str]:
    """The labels the CRI plugin puts on a layer's Prepare (containerd's snapshotters.AppendInfoHandlerWrapper)."""
    following = ""
    for d in layers[i:]:
        nxt = f"{following},{d}" if following else d
        if len(LABEL_CRI_IMAGE_LAYERS) + len(nxt) > _LAYERS_LABEL_MAX:
            break
        following = nxt
    return {LABEL_SNAPSHOT_REF: chain_id, LABEL_CRI_IMAGE_REF: image, LABEL_CRI_MANIFEST_DIGEST: manifest_digest,
            LABEL_CRI_LAYER_DIGEST: layers[i], LABEL_CRI_IMAGE_LAYERS: following}


Progress = Callable[[str, dict[str, Any]], None]  # (event, details): "layer" after each layer


def pull(image: str, *, address: str, namespace: str = "default", snapshotter: str = "bootseer",
         client: RegistryClient | None = None, platform: str | None = None,
         progress: Progress | None = None) -> PullResult:
    """Pull ``image`` into the containerd at ``address`` (see the module doc); returns what each layer took."""
    with events.span("image_pull", component="bootseer pull", image=image) as attrs:
        res = _pull(image, address=address, namespace=namespace, snapshotter=snapshotter, client=client,
                    platform=platform, progress=progress)
        attrs.update(layers=len(res.layers), lazy=sum(lo.mode == "lazy" for lo in res.layers),
                     downloaded_bytes=res.downloaded_bytes)
    return res


def _pull(image: str, *, address: str, namespace: str, snapshotter: str, client: RegistryClient | None,
          platform: str | None, progress: Progress | None) -> PullResult:
    from bootseer.registry import default_client

    t0 = time.monotonic()
    ref = Reference.parse(image)
    reg = client or default_client()
    manifest, index = reg.resolve_image(ref, Platform.parse(platform) if platform else None)
    config_desc = manifest.config
    if config_desc is None:
        raise PullError(f"{ref}: manifest {manifest.digest} has no config (not a container image)")
    config_raw = reg.get_blob(ref, config_desc.digest)
    try:
        diff_ids = [str(d) for d in json.loads(config_raw)["rootfs"]["diff_ids"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PullError(f"{ref}: config {config_desc.digest} has no rootfs.diff_ids: {e}") from e
    layers = manifest.layers
    if len(layers) != len(diff_ids):
        raise PullError(f"{ref}: {len(layers)} layers but {len(diff_ids)} diff IDs in the config")
    chains = chain_ids(diff_ids)
    name = str(ref)
    result = PullResult(name, manifest.digest, snapshotter)
    layer_digests = [d.digest for d in layers]

    with Containerd(address, namespace) as cd, cd.leased():
        parent = ""
        for i, (desc, chain) in enumerate(zip(layers, chains, strict=True)):
            t1 = time.monotonic()
            labels = layer_labels(name, manifest.digest, layer_digests, i, chain)
            mode = _layer(cd, reg, ref, snapshotter, desc, diff_ids[i], chain, parent, labels)
            lo = LayerOutcome(desc.digest, chain, desc.size, mode, time.monotonic() - t1)
            result.layers.append(lo)
            log.info("layer %d/%d %s: %s in %.2fs", i + 1, len(layers), desc.digest[:19], mode, lo.seconds)
            if progress is not None:
                progress("layer", {"index": i, "count": len(layers), **result.to_dict()["layers"][-1]})
            parent = chain

        # content, top down is the order containerd's GC labels point: image → index → manifest → config
        cfg_labels = {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {}
        cd.put_bytes(config_raw, config_desc.digest, cfg_labels)
        if cfg_labels:
            cd.set_content_labels(config_desc.digest, cfg_labels)  # it may have existed without them
        man_labels = {"containerd.io/gc.ref.content.config": config_desc.digest}
        for i, desc in enumerate(layers):
            if cd.content_exists(desc.digest):  # only what is there: lazy layers' tars never are
                man_labels[f"containerd.io/gc.ref.content.l.{i}"] = desc.digest
        cd.put_bytes(manifest.raw, manifest.digest, man_labels)
        cd.set_content_labels(manifest.digest, man_labels)
        target = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        if index is not None:
            pos = next((k for k, m in enumerate(index.manifests) if m.digest == manifest.digest), 0)
            idx_labels = {f"containerd.io/gc.ref.content.m.{pos}": manifest.digest}
            cd.put_bytes(index.raw, index.digest, idx_labels)
            cd.set_content_labels(index.digest, idx_labels)
            target = Descriptor(index.media_type, index.digest, len(index.raw))
        cd.put_image(name, target)
    result.seconds = time.monotonic() - t0
    return result


def _layer(cd: Containerd, reg: RegistryClient, ref: Reference, snapshotter: str, desc: Any, diff_id: str,
           chain: str, parent: str, labels: dict[str, str]) -> str:
    """Make the snapshot ``chain`` exist: lazily if the snapshotter can, else by download + apply."""
    if cd.stat(snapshotter, chain) is not None:
        return "present"
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
    try:
        mounts = cd.prepare(snapshotter, key, parent, labels)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            info = cd.stat(snapshotter, chain)
            return "lazy" if info is not None and info.labels.get(LABEL_REMOTE) else "present"
        raise PullError(f"prepare of layer {desc.digest} in {snapshotter}: {e.details()}") from e
    try:
        if not cd.content_exists(desc.digest):
            _download(cd, reg, ref, desc)
        applied = cd.apply(Descriptor(desc.media_type, desc.digest, desc.size), mounts)
        if applied.digest != diff_id:
            raise PullError(f"layer {desc.digest} unpacked to {applied.digest}, the config says {diff_id}")
        cd.commit(snapshotter, chain, key, {LABEL_SNAPSHOT_REF: chain})
    except grpc.RpcError as e:
        cd.remove(snapshotter, key)
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # another pull committed it meanwhile
            return "present"
        raise PullError(f"layer {desc.digest}: {e.details()}") from e
    except BaseException:
        cd.remove(snapshotter, key)
        raise
    return "pulled"


def _download(cd: Containerd, reg: RegistryClient, ref: Reference, desc: Any) -> None:
    """The layer tar into containerd's content store, verified on the way (registry client) and on commit."""
    with tempfile.TemporaryFile(prefix="bootseer-pull-") as fh:
        reg.fetch_blob(ref, desc.digest, fh, desc.size)
        fh.seek(0)

        def chunks() -> Iterator[bytes]:
            while data := fh.read(1 << 20):
                yield data

        cd.write_content(f"bootseer-pull-{desc.digest}", chunks(), desc.size, desc.digest,
                         {f"containerd.io/distribution.source.{ref.registry}": ref.repository})
