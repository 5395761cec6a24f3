"""The snapshotter's reader of BootSeer indexes (the format: :mod:`bootseer.index`).

Asked on every remote ``Prepare`` whether the image's index has an EROFS blob for the layer; it remembers
answers in memory and on disk so a burst of Prepares, or a restarted daemon, does not ask the registry again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from bootseer.index import BadIndex, ImageIndex, LayerBlob, find_index
from bootseer.reference import Reference
from bootseer.registry import RegistryClient

log = logging.getLogger(__name__)


class IndexReader:
    """Answers the snapshotter's question on ``Prepare``: is there an EROFS blob for this layer, and what are
    its chunk digests?  Cached in memory (LRU) and, with ``cache_dir``, on disk across restarts; a miss is
    remembered for ``negative_ttl`` seconds so a burst of ``Prepare`` calls for an unconverted image costs one
    registry round trip, yet a conversion that lands later is picked up.  Thread-safe; concurrent lookups
    of one image share one fetch.
    """

    def __init__(self, client: RegistryClient | None = None, *, cache_dir: Path | str | None = None,
                 negative_ttl: float = 30.0, max_images: int = 256) -> None:
        self.client = client or RegistryClient()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.negative_ttl = negative_ttl
        self.max_images = max_images
        self._mem: OrderedDict[tuple[str, str], ImageIndex] = OrderedDict()
        self._misses: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], threading.Lock] = {}

    def lookup(self, image_ref: str, manifest_digest: str, layer_digest: str) -> LayerBlob | None:
        """The EROFS blob of ``layer_digest`` in image ``image_ref`` (manifest ``manifest_digest``), or None."""
        idx = self.image_index(image_ref, manifest_digest)
        return idx.layers.get(layer_digest) if idx else None

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
                    found = find_index(self.client, ref, manifest_digest)
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
        name = hashlib.sha256(f"{ref.name}@{manifest_digest}".encode()).hexdigest()
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
