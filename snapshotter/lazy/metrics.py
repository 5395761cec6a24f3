"""Prometheus metrics of the lazy data path (``bootseer_lazy_*``; the hot-block prefetcher's are
:class:`snapshotter.lazy.prefetcher.PrefetchMetrics`)."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from snapshotter.lazy.scheduling import KINDS
from snapshotter.lazy.spec import BlobSpec

log = logging.getLogger("bootseer.lazy")


class LazyMetrics:
    """Prometheus metrics of the lazy data path (names prefixed ``bootseer_lazy_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        try:
            self._make(reg)
        except ValueError:  # already registered by another manager in this process (tests): keep ours apart
            log.debug("lazy metrics already registered; using a private registry")
            self._make(CollectorRegistry())

    def _make(self, reg: CollectorRegistry) -> None:
        self.registry = reg
        self.fetched_bytes = Counter("bootseer_lazy_fetched_bytes", "Bytes fetched from registries, by kind",
                                     ["kind"], registry=reg)
        self.fetch_seconds = Histogram("bootseer_lazy_fetch_seconds", "Latency of one range request, by kind",
                                       ["kind"], registry=reg,
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.fetch_failures = Counter("bootseer_lazy_fetch_failures", "Reads/fills that ended in EIO, by kind",
                                      ["kind"], registry=reg)
        self.fetch_retries = Counter("bootseer_lazy_fetch_retries", "Range requests sent again after a transient "
                                     "error or a corrupt chunk, by kind and by the reason of the failure before",
                                     ["kind", "reason"], registry=reg)
        self.registry_down = Counter("bootseer_lazy_registry_marked_down", "Times an endpoint set was marked down "
                                     "(failed requests in a row over a window): reads fail fast for a moment",
                                     registry=reg)
        self.cache_hits = Counter("bootseer_lazy_cache_hits", "FUSE reads answered from local chunks",
                                  registry=reg)
        self.corrupt_chunks = Counter("bootseer_lazy_corrupt_chunks", "Chunks that failed sha256 verification",
                                      registry=reg)
        self.swaps = Counter("bootseer_lazy_layers_swapped", "Layers switched to their local file (LOOP_CHANGE_FD)",
                             registry=reg)
        self.layers = Gauge("bootseer_lazy_layers", "Mounted lazy layers by state (fuse, swapped)", ["state"],
                            registry=reg)
        self.cache_bytes = Gauge("bootseer_lazy_cache_bytes", "Disk used by chunk caches", registry=reg)
        for kind in KINDS:
            self.fetched_bytes.labels(kind)
            self.fetch_failures.labels(kind)
            for reason in ("http_503", "http_429", "reset", "timeout", "cut"):  # the usual ones, at 0 from the start
                self.fetch_retries.labels(kind, reason)

    # MetricsSink
    def fetched(self, kind: str, nbytes: int, seconds: float) -> None:
        self.fetched_bytes.labels(kind).inc(nbytes)
        self.fetch_seconds.labels(kind).observe(seconds)

    def corrupt(self, spec: BlobSpec, index: int) -> None:
        self.corrupt_chunks.inc()

    def failed(self, kind: str) -> None:
        self.fetch_failures.labels(kind).inc()

    def retried(self, kind: str, reason: str) -> None:
        self.fetch_retries.labels(kind, reason).inc()

    def marked_down(self) -> None:
        self.registry_down.inc()
