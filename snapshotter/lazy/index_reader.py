"""The snapshotter's reader of BootSeer indexes (the format: :mod:`bootseer.index`).

Asked on every remote ``Prepare`` whether the image's index has an EROFS blob for the layer; it remembers
answers in memory and on disk so a burst of Prepares, or a restarted daemon, does not ask the registry again.

Only an index its :class:`~bootseer.trust.TrustPolicy` accepts is used (signed by a trusted key, unless the
repository's mode says otherwise), and only for a layer it binds to the pulled image: :meth:`IndexReader.bound`
answers a layer only if the index entry's (layer digest, diffID) equal the manifest's layer digest and the
config's diffID at that position — the manifest fetched by its digest, the config by the manifest's, both
verified and size-bounded, remembered per manifest.  The disk cache lives under the daemon's 0700 root and is
keyed by the policy too, so a changed policy (a rotated key) does not serve an index the new one would refuse.
A *bound* image (``bootseer convert --bind``: its manifest names its index) uses that index or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from bootseer.index import MAX_LAYERS, BadIndex, ImageIndex, LayerBlob, bound_index, find_index
from bootseer.reference import Reference
from bootseer.registry import Manifest, RegistryClient, RegistryError
from bootseer.trust import TrustPolicy

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 8 << 20  # an image config is a few KiB; long histories make it tens of KiB


class ImageMismatch(RegistryError):
    """The pulled image and its index (or the Prepare) disagree: the ordinary pull decides."""


@dataclass(frozen=True)
class ImageLayers:
    """What the pulled image says its layers are: the manifest's layer digests and the config's diffIDs, in
    order (verified against the manifest digest and the manifest's config digest)."""

    layers: tuple[str, ...]
    diff_ids: tuple[str, ...]
    manifest: Manifest | None = field(default=None, compare=False, repr=False)  # as pulled (its annotations)

    def positions(self, layer_digest: str) -> list[int]:
        return [i for i, d in enumerate(self.layers) if d == layer_digest]

    def chain_id(self, position: int) -> str:
        """containerd's chain ID of the layers up to ``position``: ChainID(L0) = DiffID(L0),
        ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln)) (the OCI image spec)."""
        chain = self.diff_ids[0]
        for d in self.diff_ids[1 : position + 1]:
            chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
        return chain


def image_layers(client: RegistryClient, ref: Reference, manifest_digest: str) -> ImageLayers:
    """Fetch the image manifest by digest and its config by the manifest's digest (both verified, bounded)."""
    man = client.get_manifest(ref.with_digest(manifest_digest))
    cfg = man.config
    if man.is_index or cfg is None:
        raise ImageMismatch(f"{ref.name}@{manifest_digest} is not an image manifest")
    if cfg.size > MAX_CONFIG_BYTES:
        raise ImageMismatch(f"image config of {cfg.size} bytes (more than {MAX_CONFIG_BYTES})")
    raw = client.get_blob(ref.in_repository(ref.repository), cfg.digest, max_size=MAX_CONFIG_BYTES)
    try:
        diff_ids = json.loads(raw)["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise TypeError("rootfs.diff_ids is not a list of strings")
    except (ValueError, KeyError, TypeError) as e:
        raise ImageMismatch(f"image config {cfg.digest}: {e}") from e
    layers = tuple(d.digest for d in man.layers)
    if len(layers) != len(diff_ids) or len(layers) > MAX_LAYERS:
        raise ImageMismatch(f"image {manifest_digest}: {len(layers)} layers, {len(diff_ids)} diffIDs")
    return ImageLayers(layers, tuple(diff_ids), man)


class IndexReader:
    """Answers the snapshotter's question on ``Prepare``: is there an EROFS blob for this layer, and what are
    its chunk digests?  Cached in memory (LRU) and, with ``cache_dir``, on disk across restarts; a miss is
    remembered for ``negative_ttl`` seconds so a burst of ``Prepare`` calls for an unconverted image costs one
    registry round trip, yet a conversion that lands later is picked up.  Thread-safe; concurrent lookups
    of one image share one fetch.
    """

    def __init__(self, client: RegistryClient | None = None, *, cache_dir: Path | str | None = None,
                 negative_ttl: float = 30.0, max_images: int = 256, policy: TrustPolicy | None = None) -> None:
        self.client = client or RegistryClient()
        self.policy = policy  # None: signatures not looked at (tools reading an index; not the snapshotter)
        self._images: OrderedDict[tuple[str, str], ImageLayers] = OrderedDict()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.negative_ttl = negative_ttl
        self.max_images = max_images
        self._mem: OrderedDict[tuple[str, str], ImageIndex] = OrderedDict()
        self._misses: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], threading.Lock] = {}

    def answered(self, image_ref: str, manifest_digest: str) -> bool:
        """Whether :meth:`bound` and :meth:`image_layers` for this image would answer from memory, without a
        request (the image's layers are known, and its index or a fresh "none")."""
        key = (Reference.parse(image_ref).name, manifest_digest)
        with self._lock:
            miss = self._misses.get(key)
            return key in self._images and (key in self._mem or (miss is not None and miss > time.monotonic()))

    def lookup(self, image_ref: str, manifest_digest: str, layer_digest: str) -> LayerBlob | None:
        """The EROFS blob of ``layer_digest`` in image ``image_ref`` (manifest ``manifest_digest``), or None."""
        idx = self.image_index(image_ref, manifest_digest)
        return idx.layers.get(layer_digest) if idx else None

    def bound(self, image_ref: str, manifest_digest: str, layer_digest: str) -> tuple[LayerBlob, ImageLayers] | None:
        """The layer's EROFS blob, only if the index binds it to the pulled image (layer digest and diffID at
        every position the layer has in the manifest), with the image's layers; None if there is no blob, or
        its chunks travel in a codec this node does not know (index v3: that layer is pulled the ordinary way).
        Raises :class:`ImageMismatch` when index and image disagree."""
        blob = self.lookup(image_ref, manifest_digest, layer_digest)
        if blob is None:
            return None
        if blob.wire is not None and not blob.wire.known:
            log.warning("layer %s of %s: its index sends chunks with codec %r, which this node does not read; "
                        "ordinary pull of that layer", layer_digest[:19], image_ref, blob.wire.codec)
            return None
        img = self.image_layers(image_ref, manifest_digest)
        where = img.positions(layer_digest)
        if not where:
            raise ImageMismatch(f"layer {layer_digest} is not in image {manifest_digest}")
        for i in where:
            if blob.diff_id != img.diff_ids[i]:
                raise ImageMismatch(f"layer {layer_digest}: the index's diffID {blob.diff_id[:19]} is not the "
                                    f"config's {img.diff_ids[i][:19]} at position {i}")
        return blob, img

    def image_layers(self, image_ref: str, manifest_digest: str) -> ImageLayers:
        """The pulled image's layers and diffIDs (cached per image)."""
        ref = Reference.parse(image_ref)
        key = (ref.name, manifest_digest)
        with self._lock:
            hit = self._images.get(key)
            if hit is not None:
                self._images.move_to_end(key)
                return hit
        img = image_layers(self.client, ref, manifest_digest)
        with self._lock:
            self._images[key] = img
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return img

    def image_index(self, image_ref: str, manifest_digest: str) -> ImageIndex | None:
        """The whole index of an image, or None if it has none (yet).  Registry errors propagate."""
        ref = Reference.parse(image_ref)
        key = (ref.name, manifest_digest)
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
                return hit
            miss = self._misses.get(key)
            if miss is not None and miss > time.monotonic():
                return None
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:
            with self._lock:  # someone else may have fetched it while we waited
                if key in self._mem:
                    return self._mem[key]
            try:
                idx = self._from_disk(ref, manifest_digest)
                if idx is None:
                    found = self._find(image_ref, ref, manifest_digest)
                    idx = found[1] if found else None
                    if idx is not None:
                        self._to_disk(ref, manifest_digest, idx)
            except BaseException:
                with self._lock:
                    self._inflight.pop(key, None)
                raise
            with self._lock:
                self._inflight.pop(key, None)
                if idx is None:
                    self._misses[key] = time.monotonic() + self.negative_ttl
                    return None
                self._misses.pop(key, None)
                self._mem[key] = idx
                while len(self._mem) > self.max_images:
                    self._mem.popitem(last=False)
            return idx

    def _find(self, image_ref: str, ref: Reference, manifest_digest: str) -> tuple[str, ImageIndex] | None:
        """A bound image's own index (its manifest names it: ``bootseer convert --bind``), else the newest
        trusted referrer.  A bound image whose index cannot be used gets none (the ordinary pull), never a
        referrer in its place: its author pinned that one."""
        try:
            man = self.image_layers(image_ref, manifest_digest).manifest  # cached: bound() needs it next
        except ImageMismatch:  # a config that cannot bind layers: still look for the index (tools read it)
            man = self.client.get_manifest(ref.with_digest(manifest_digest))
        if man is not None:
            try:
                found = bound_index(self.client, ref, man, self.policy)
            except BadIndex as e:
                log.warning("%s@%s: %s; ordinary pull", ref.name, manifest_digest[:19], e)
                return None
            if found is not None:
                return found
        return find_index(self.client, ref, manifest_digest, self.policy)

    def invalidate(self, image_ref: str | None = None, manifest_digest: str | None = None) -> None:
        """Forget cached answers (all, or one image's) — e.g. after a conversion finished."""
        with self._lock:
            if image_ref is None:
                self._mem.clear()
                self._misses.clear()
                return
            key = (Reference.parse(image_ref).name, manifest_digest or "")
            self._mem.pop(key, None)
            self._misses.pop(key, None)

    def _disk_path(self, ref: Reference, manifest_digest: str) -> Path | None:
        if not self.cache_dir:
            return None
        policy = self.policy.fingerprint if self.policy is not None else "none"
        name = hashlib.sha256(f"{ref.name}@{manifest_digest}#{policy}".encode()).hexdigest()
        return self.cache_dir / f"{name}.json"

    def _from_disk(self, ref: Reference, manifest_digest: str) -> ImageIndex | None:
        path = self._disk_path(ref, manifest_digest)
        if path is None or not path.exists():
            return None
        try:
            idx = ImageIndex.from_json(path.read_bytes(), source=ref.name)
        except (OSError, BadIndex) as e:
            log.warning("ignoring unreadable index cache %s: %s", path, e)
            return None
        return idx if idx.subject == manifest_digest else None

    def _to_disk(self, ref: Reference, manifest_digest: str, idx: ImageIndex) -> None:
        path = self._disk_path(ref, manifest_digest)
        if path is None:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(idx.to_json())
            os.replace(tmp, path)
        except OSError as e:  # a cache, not the truth: the registry still has the index
            log.warning("cannot cache index at %s: %s", path, e)
            tmp.unlink(missing_ok=True)
