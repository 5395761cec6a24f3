"""The hot-block prefetcher: replays a recording's hot blocks on every lazy mount (the snapshotter's side of
record-and-prefetch; the recording side is :mod:`recorder`).

When a remote ``Prepare`` has set a lazy layer up, :meth:`HotBlockPrefetcher.on_prepare` looks for the image's
hot-block manifest (a referrer of the image manifest, see :mod:`bootseer.hotblocks`) and hands the layer's
recorded ranges, in first-access order, to :meth:`LayerManager.prefetch
<snapshotter.lazy.manager.LayerManager.prefetch>` — before the container exists, so by the time it reads,
most of what it reads is local.  The rules the data path already guarantees, and why they matter here:

* **Demand first.**  Prefetch requests go through the fetchers' shared scheduler behind demand reads (and
  ahead of background fill): a container that outruns the prefetcher is never queued behind it.
* **No double fetch.**  Chunks already local or in flight are skipped or waited for, never requested twice.
* **One order for the whole image.**  The recording's first-access times count from the image's first
  Prepare, so every request is *due* at a moment of this start-up, and the scheduler admits prefetch
  requests earliest due first across layers (and images): the link carries what the container reads next,
  whichever layer it lives in, instead of splitting between layers in parallel.
* **Bounded.**  ``concurrency`` runs of coalesced chunks at a time per layer.
* **Stops with the snapshot.**  Removing the snapshot tears the layer down, which cancels its prefetch.

Nothing here blocks ``Prepare``: the lookup (a referrers listing per pull; the Parquet blob only when a new
recording was pushed) and the prefetch run
in a worker thread.  A manifest that is missing, corrupt, recorded on another blob of the layer, or names
layers the image does not have is ignored with a warning — no prefetch, never a wrong one (and the fetcher
verifies every chunk against the index regardless).

Metrics (Prometheus, in the manager's registry, so the daemon's ``metrics`` control op shows them):
``bootseer_hotblocks_hot_set_bytes_total`` (bytes of the ranges prefetch was asked to make local),
``bootseer_hotblocks_prefetched_bytes_total`` (bytes prefetch fetched itself),
``bootseer_hotblocks_page_cache_bytes_total`` (hot bytes pushed into the kernel's page cache of the FUSE
file: the container's reads of them are answered by the kernel and never reach FUSE — see
:mod:`snapshotter.lazy.fusefs`),
``bootseer_hotblocks_demand_bytes_total{result="hit"|"miss"}`` (reads reaching FUSE that touched a recorded range:
already local thanks to prefetch, or not yet: :meth:`PrefetchTarget.observe_demand`),
``bootseer_hotblocks_prefetch_seconds`` (Prepare → prefetch of the layer done),
``bootseer_hotblocks_prefetches_total{outcome}`` and ``bootseer_hotblocks_prefetch_running``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from bootseer import events, hotblocks
from bootseer.hotblocks import BadManifest, HotBlockManifest
from bootseer.registry import RegistryError

if TYPE_CHECKING:
    from bootseer.registry import RegistryClient
    from snapshotter.lazy.spec import BlobSpec

log = logging.getLogger("bootseer.lazy.prefetcher")

LOOKUP_DEADLINE = 60.0  # seconds for a hot-block manifest lookup's requests, retries included
OUTCOMES = ("done", "cancelled", "partial", "no_manifest", "not_recorded", "ignored", "error")


DemandObserver = Callable[[int, int, bool], None]  # (offset, length, already local), on the FUSE loop


class PrefetchJob(Protocol):
    """A running prefetch job (:class:`snapshotter.lazy.prefetchjob.Prefetch`): counts in chunks, ``warmed`` in
    bytes; ``done`` is set when it ends."""

    total: int
    fetched: int
    failed: int
    warmed: int
    done: threading.Event


class PrefetchTarget(Protocol):
    """What the hot-block prefetcher may see of the lazy layers (:class:`~snapshotter.lazy.manager.LayerManager`
    provides it): start a prefetch job, read the layer's prefetch byte counter, watch its demand reads."""

    def prefetch(self, digest: str, ranges: Sequence[Sequence[int]], concurrency: int | None = None,
                 start: float | None = None) -> PrefetchJob: ...

    def prefetched_bytes(self, digest: str) -> int: ...

    def observe_demand(self, digest: str, observer: DemandObserver | None) -> bool: ...


BASE_NAME = "org.opencontainers.image.base.name"  # OCI's pre-defined annotations: what an image is built on
BASE_DIGEST = "org.opencontainers.image.base.digest"


def base_of(annotations: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(base image reference, its manifest digest) from an image manifest's OCI base annotations, or None."""
    name, digest = (annotations or {}).get(BASE_NAME), (annotations or {}).get(BASE_DIGEST)
    if isinstance(name, str) and isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return name, digest
    return None


def plan(hb: HotBlockManifest, layer_digest: str, blob_digest: str,
         size: int | None = None) -> list[tuple[int, int, int]] | None:
    """The ranges to prefetch for one layer, in first-access order, as ``(offset, length, first_access_ns)``;
    None when the manifest was recorded on another blob of that layer (a re-conversion: its offsets mean
    nothing in this blob), or when it says the blob has another ``size`` than the layer's index does: the
    manifest checked its ranges against the size it claims itself, and only the (signed) index's size bounds
    what a range may ask for (a 2^62-byte range would become 2^45 chunk numbers)."""
    recorded = hb.blob_of(layer_digest)
    if recorded is None:
        return []
    if recorded != blob_digest:
        return None
    info = hb.blobs[recorded]
    if size is not None and info.size != size:
        log.warning("hot-block manifest: blob %s of %d bytes, its index says %d; ignored", recorded[:19], info.size,
                    size)
        return None
    return hb.ranges_for(layer_digest)


class PrefetchMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        try:
            self._make(reg)
        except ValueError:  # a second prefetcher in this process (tests): keep its metrics apart
            self._make(CollectorRegistry())

    def _make(self, reg: CollectorRegistry) -> None:
        self.registry = reg
        self.hot_set = Counter("bootseer_hotblocks_hot_set_bytes", "Bytes of recorded hot ranges handed to "
                               "prefetch", registry=reg)
        self.prefetched = Counter("bootseer_hotblocks_prefetched_bytes", "Bytes fetched by hot-block prefetch",
                                  registry=reg)
        self.warmed = Counter("bootseer_hotblocks_page_cache_bytes", "Prefetched bytes pushed into the kernel's "
                              "page cache (their reads never reach FUSE)", registry=reg)
        self.demand = Counter("bootseer_hotblocks_demand_bytes", "Demand reads reaching FUSE that touch recorded "
                              "hot ranges: already local (hit) or not (miss)", ["result"], registry=reg)
        self.seconds = Histogram("bootseer_hotblocks_prefetch_seconds", "Prepare to hot-block prefetch done, "
                                 "per layer", registry=reg,
                                 buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.outcomes = Counter("bootseer_hotblocks_prefetches", "Layer prefetches by outcome", ["outcome"],
                                registry=reg)
        self.running = Gauge("bootseer_hotblocks_prefetch_running", "Layer prefetches running", registry=reg)
        for r in ("hit", "miss"):
            self.demand.labels(r)
        for o in OUTCOMES:
            self.outcomes.labels(o)


@dataclass
class LayerPrefetch:
    """One layer's prefetch, for status and metrics."""

    image: str
    layer: str
    blob: str
    chunk_size: int
    prepared: float  # time.monotonic() of the Prepare
    size: int | None = None  # the blob's size as its index says (None: not known here, e.g. tests)
    started: float | None = None  # time.monotonic() of the image's first Prepare: the recording's time zero
    state: str = "looking up"
    ranges: int = 0
    hot_bytes: int = 0
    chunks: int = 0
    chunks_fetched: int = 0
    chunks_failed: int = 0
    prefetched_bytes: int = 0
    page_cache_bytes: int = 0
    demand_hit_bytes: int = 0
    demand_miss_bytes: int = 0
    seconds: float | None = None
    hot_chunks: frozenset[int] = field(default_factory=frozenset, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "layer": self.layer, "blob": self.blob, "state": self.state,
                "ranges": self.ranges, "hot_bytes": self.hot_bytes, "chunks": self.chunks,
                "chunks_fetched": self.chunks_fetched, "chunks_failed": self.chunks_failed,
                "prefetched_bytes": self.prefetched_bytes, "page_cache_bytes": self.page_cache_bytes,
                "demand_hit_bytes": self.demand_hit_bytes,
                "demand_miss_bytes": self.demand_miss_bytes,
                "seconds": None if self.seconds is None else round(self.seconds, 3)}


class HotBlockPrefetcher:
    """Looks up hot-block manifests and starts the prefetch of each lazily prepared layer (see the module doc).

    ``client`` is the daemon's registry client (mirrors, credentials).  Freshness: a recording pushed a
    moment ago must be used by the very next pull (CI records, then starts), and a pull's own Prepares must
    not hide it (``bootseer record`` pulls the image before it pushes) — so every lookup lists the image's
    hot-block referrers (one small request), and only the Parquet blob of a new newest artifact is fetched;
    within ``reuse_for`` seconds a lookup is reused as is (the Prepares of one pull come in a burst)."""

    def __init__(self, manager: PrefetchTarget, client: RegistryClient, *, concurrency: int | None = None,
                 reuse_for: float = 1.0, max_images: int = 64, start_window: float = 30.0,
                 registry: CollectorRegistry | None = None, enabled: bool = True) -> None:
        self.manager = manager
        self.client = client
        self.concurrency = concurrency
        self.reuse_for = reuse_for
        self.max_images = max_images
        self.enabled = enabled
        self.metrics = PrefetchMetrics(registry)
        self._lock = threading.Lock()
        # (repository, manifest digest) → (reuse until, newest artifact digest, its manifest or None if unusable)
        self._cache: OrderedDict[tuple[str, str], tuple[float, str | None, HotBlockManifest | None]] = OrderedDict()
        # image manifests are immutable: their layers and the base image they name (a depsnap image's)
        self._layers_of: dict[tuple[str, str], tuple[list[str], tuple[str, str] | None]] = {}
        self._gates: dict[tuple[str, str], threading.Lock] = {}
        self._looking: set[tuple[str, str]] = set()  # early lookups (lookup()) under way
        self._layers: dict[str, LayerPrefetch] = {}  # by blob digest: the latest prefetch of each blob
        self._starts: dict[str, float] = {}  # image manifest digest → its current start-up's first Prepare
        self.start_window = start_window
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    # ------------------------------------------------------------------------------------------ API
    def on_prepare(self, image_ref: str, manifest_digest: str, layer_digest: str, blob_digest: str,
                   chunk_size: int, *, index_blobs: Mapping[str, str] | None = None,
                   wait: bool = False, size: int | None = None) -> LayerPrefetch | None:
        """A lazy layer of ``image_ref`` was just set up: prefetch its recorded ranges (in a worker thread
        unless ``wait``).  ``index_blobs`` (layer → blob of the image's index) lets a manifest recorded on
        other blobs be rejected as a whole.  Never raises."""
        if not self.enabled or self._closed.is_set():
            return None
        lp = LayerPrefetch(image_ref, layer_digest, blob_digest, chunk_size, time.monotonic(), size=size)
        with self._lock:
            self._layers[blob_digest] = lp
            lp.started = self._start_of(manifest_digest, lp.prepared)
        args = (lp, manifest_digest, dict(index_blobs) if index_blobs is not None else None)
        if wait:
            self._run(*args)
            return lp
        t = threading.Thread(target=self._run, args=args, name=f"hotblocks-{blob_digest[7:15]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return lp

    def on_mount(self, image_ref: str, manifest_digest: str, layer_digest: str, spec: BlobSpec) -> None:
        """The handler's :class:`~snapshotter.lazy.handler.PrefetchHook`: a lazy layer was just mounted.
        Starts its prefetch in a worker thread."""
        self.on_prepare(image_ref, manifest_digest, layer_digest, spec.digest, spec.chunk_size, size=spec.size)

    def lookup(self, image_ref: str, manifest_digest: str) -> None:
        """Start looking up the image's hot-block manifest now, in a worker thread, so that it is at hand
        when its first lazy layer is mounted (the handler calls this as a Prepare begins: the lookup's
        requests — referrers, artifact manifest, Parquet blob — then overlap the layer's index lookup and
        mount instead of following them).  Does nothing if a lookup is fresh or under way.  Never raises."""
        if not self.enabled or self._closed.is_set():
            return
        try:
            from bootseer.reference import Reference

            key = (Reference.parse(image_ref).name, manifest_digest)
        except ValueError:
            return
        with self._lock:
            hit = self._cache.get(key)
            if (hit is not None and hit[0] > time.monotonic()) or key in self._looking:
                return
            self._looking.add(key)

        def run() -> None:
            try:
                self.manifest(image_ref, manifest_digest)  # concurrent lookups of the image share its gate
            except Exception as e:  # the layer's own lookup tries again, and reports
                log.debug("early hot-block manifest lookup for %s failed: %s", image_ref, e)
            finally:
                with self._lock:
                    self._looking.discard(key)

        t = threading.Thread(target=run, name=f"hotblocks-lookup-{manifest_digest[7:15]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def manifest(self, image_ref: str, manifest_digest: str,
                 index_blobs: Mapping[str, str] | None = None) -> HotBlockManifest | None:
        """The image's usable hot-block manifest (cached; concurrent lookups of one image share a fetch)."""
        from bootseer.reference import Reference

        ref = Reference.parse(image_ref)
        key = (ref.name, manifest_digest)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self._cache.move_to_end(key)
                return hit[2]
            gate = self._gates.setdefault(key, threading.Lock())
        # a deadline on the lookup's requests: a registry dripping its answer must not keep this image's
        # gate (and the prefetch waiting on it) for longer
        with gate, self.client.deadline(LOOKUP_DEADLINE):
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None and hit[0] > time.monotonic():
                    return hit[2]
                known = self._layers_of.get(key)
            if known is None:
                man = self.client.get_manifest(ref.with_digest(manifest_digest))
                known = ([d.digest for d in man.layers], base_of(man.doc.get("annotations")))
            layers, base = known
            descs = hotblocks.candidates(self.client, ref, manifest_digest)
            newest = descs[0].digest if descs else None
            if hit is not None and hit[1] == newest:
                parsed = hit[2]  # nothing new was pushed: the parsed manifest (or the verdict on it) still holds
                hb = parsed
                if hb is not None and index_blobs is not None:
                    try:
                        hb.check(layers, index_blobs)
                    except BadManifest as e:
                        log.warning("hot-block manifest of %s ignored: %s", ref.name, e)
                        hb = None
            else:
                found = hotblocks.fetch(self.client, ref, manifest_digest, image_layers=layers,
                                       index_blobs=index_blobs, descs=descs)
                if found is None and base is not None:
                    found = self._base_manifest(ref.name, base, layers, index_blobs)
                parsed = hb = found.manifest if found is not None else None
                if found is not None:
                    log.info("hot-block manifest %s of %s: %d ranges, %.1f MiB", found.digest[:19], ref.name,
                             len(found.manifest.ranges), found.manifest.hot_bytes() / (1 << 20))
            with self._lock:
                self._cache[key] = (time.monotonic() + self.reuse_for, newest, parsed)
                self._layers_of[key] = known
                while len(self._cache) > self.max_images:
                    old, _ = self._cache.popitem(last=False)
                    self._layers_of.pop(old, None)
                self._gates.pop(key, None)
            return hb

    def _base_manifest(self, name: str, base: tuple[str, str], layers: list[str],
                       index_blobs: Mapping[str, str] | None) -> hotblocks.Found | None:
        """The hot-block manifest of the image this one is built on (its manifest names it: depsnap's images
        do), for an image not recorded itself.  Hot ranges are recorded per layer and blob, so the base's serve
        the layers the two share — every base layer, when the index reused the base's EROFS blobs — and
        :func:`plan` skips a layer whose blob differs.  The base's manifest must fit this image's layers."""
        from bootseer.reference import Reference

        base_name, base_digest = base
        try:
            base_ref = Reference.parse(base_name)
            found = hotblocks.fetch(self.client, base_ref, base_digest, image_layers=layers, index_blobs=index_blobs)
        except (ValueError, RegistryError) as e:  # the base is gone or unreadable: no prefetch, as before
            log.info("hot-block manifest of %s's base %s not used: %s", name, base_name, e)
            return None
        if found is not None:
            log.info("%s has no hot-block manifest of its own: using its base %s@%s's", name, base_ref.name,
                     base_digest[:19])
        return found

    def _start_of(self, manifest_digest: str, now: float) -> float:
        """When this start-up of the image began: its first Prepare, unless that was ``start_window``
        seconds ago (then this Prepare begins a new start-up).  The recorded first-access times of every
        layer count from it, so all layers share one prefetch order.  Call with the lock held."""
        first = self._starts.get(manifest_digest)
        if first is None or now - first > self.start_window:
            first = self._starts[manifest_digest] = now
            while len(self._starts) > self.max_images:
                self._starts.pop(next(iter(self._starts)))
        return first

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [lp.as_dict() for lp in self._layers.values()]

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------------ internals
    def _finish(self, lp: LayerPrefetch, state: str, outcome: str) -> None:
        lp.state = state
        self.metrics.outcomes.labels(outcome).inc()

    def _run(self, lp: LayerPrefetch, manifest_digest: str, index_blobs: dict[str, str] | None) -> None:
        try:
            try:
                hb = self.manifest(lp.image, manifest_digest, index_blobs)
            except Exception as e:  # the registry is down, say: the container reads on demand
                log.warning("no hot-block prefetch for %s: looking up its manifest failed: %s", lp.image, e)
                self._finish(lp, "lookup failed", "error")
                return
            if hb is None:
                self._finish(lp, "no manifest", "no_manifest")
                return
            ranges = plan(hb, lp.layer, lp.blob, lp.size)
            if ranges is None:
                log.warning("hot-block manifest of %s was recorded on another blob of layer %s, or does not "
                            "fit it; ignored", lp.image, lp.layer[:19])
                self._finish(lp, "ignored (other blob)", "ignored")
                return
            if not ranges:
                self._finish(lp, "nothing recorded", "not_recorded")
                return
            self._prefetch(lp, ranges)
        except Exception:
            log.exception("hot-block prefetch of %s failed", lp.blob[:19])
            self._finish(lp, "failed", "error")

    def _prefetch(self, lp: LayerPrefetch, ranges: list[tuple[int, int, int]]) -> None:
        cs = lp.chunk_size
        lp.ranges = len(ranges)
        lp.hot_bytes = sum(r[1] for r in ranges)
        lp.hot_chunks = frozenset(i for off, n, _ in ranges for i in range(off // cs, (off + n - 1) // cs + 1))
        self.metrics.hot_set.inc(lp.hot_bytes)
        before = self.manager.prefetched_bytes(lp.blob)
        self.manager.observe_demand(lp.blob, self._observer(lp))
        self.metrics.running.inc()
        began = events.now()
        try:
            job = self.manager.prefetch(lp.blob, ranges, self.concurrency, start=lp.started)
            lp.chunks = int(job.total)
            lp.state = "prefetching"
            log.info("prefetching %d hot ranges (%.1f MiB, %d chunks missing) of layer %s", len(ranges),
                     lp.hot_bytes / (1 << 20), job.total, lp.layer[:19])
            while not job.done.wait(0.5):  # bounded waits: a closing daemon does not wait for the network
                lp.chunks_fetched, lp.chunks_failed = int(job.fetched), int(job.failed)
                if self._closed.is_set():
                    break
        finally:
            self.metrics.running.dec()
        lp.chunks_fetched, lp.chunks_failed = int(job.fetched), int(job.failed)
        lp.prefetched_bytes = max(0, self.manager.prefetched_bytes(lp.blob) - before)
        lp.page_cache_bytes = int(job.warmed)
        self.metrics.prefetched.inc(lp.prefetched_bytes)
        self.metrics.warmed.inc(lp.page_cache_bytes)
        lp.seconds = time.monotonic() - lp.prepared
        self.metrics.seconds.observe(lp.seconds)
        if lp.chunks_fetched + lp.chunks_failed < lp.chunks:
            self._finish(lp, "cancelled", "cancelled")  # the layer went away (snapshot removed)
        elif lp.chunks_failed:
            self._finish(lp, "partial", "partial")
        else:
            self._finish(lp, "done", "done")
        # the start-up's `prefetch` phase for `bootseer profile` (untagged: attributed to a job by the image)
        events.emit("prefetch", began, events.now(), component="bootseer snapshotter",
                    status="ok" if lp.state == "done" else lp.state, image=lp.image, layer=lp.layer,
                    chunks=lp.chunks, fetched_bytes=lp.prefetched_bytes)
        log.info("hot-block prefetch of layer %s %s in %.2fs: %d/%d chunks, %.1f MiB fetched", lp.layer[:19],
                 lp.state, lp.seconds, lp.chunks_fetched, lp.chunks, lp.prefetched_bytes / (1 << 20))

    def _observer(self, lp: LayerPrefetch) -> DemandObserver:
        """Runs on the FUSE loop for every read of the layer: must be cheap and never raise."""
        hit_c, miss_c = self.metrics.demand.labels("hit"), self.metrics.demand.labels("miss")

        def observe(offset: int, length: int, hit: bool) -> None:
            with contextlib.suppress(Exception):
                cs = lp.chunk_size
                first, last = offset // cs, (offset + max(length, 1) - 1) // cs
                if not any(i in lp.hot_chunks for i in range(first, last + 1)):
                    return
                if hit:
                    lp.demand_hit_bytes += length
                    hit_c.inc(length)
                else:
                    lp.demand_miss_bytes += length
                    miss_c.inc(length)

        return observe

