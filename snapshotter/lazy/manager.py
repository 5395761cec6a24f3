"""LayerManager: every lazy layer of a daemon, their records, the cache budget, restart and metrics.

The snapshotter's gRPC side calls :meth:`LayerManager.acquire` on a remote Prepare (with the :class:`BlobSpec`
read from the image's index) and uses the returned directory as the layer's lowerdir; it calls
:meth:`release` when the snapshot is removed and :meth:`retain` once at start with the owners its metadata
still knows.  All methods block and may be called from any thread except the FUSE thread.

On-disk layout under ``root``::

    fuse/                 the FUSE mount: one file per blob still served lazily
    cache/<name>/         chunk cache of a blob (see :mod:`snapshotter.lazy.cache`)
    mnt/<name>/           erofs mount of a blob (the lowerdir handed to the snapshotter)
    layers/<name>.json    the layer's record: spec, owners, last use, loop device, swapped

**Restart.**  The records are the daemon's memory.  :meth:`start` mounts a fresh FUSE fs (lazily detaching
the dead one), then looks at each recorded layer as the kernel has it: a mount whose loop device reads the
local cache file is *swapped* and left alone — it kept working while no daemon ran; a mount whose loop device
still points at the old FUSE file is re-attached to the new one with ``LOOP_CHANGE_FD`` (reads fail with EIO
while no daemon runs, and resume); a layer with owners but no mount (a reboot) is set up again from its cache.

**Cache budget.**  Released layers are unmounted but their caches stay, so a layer pulled again is local at
once; when the caches together exceed ``cache_cap_bytes``, the least recently used caches of layers nobody
owns are deleted.  Layers in use are never evicted (the budget can be exceeded by what is in use).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from snapshotter.lazy.cache import ChunkCache, atomic_write
from snapshotter.lazy.fetcher import KINDS, FetchConfig, Fetcher, HttpClient, Scheduler
from snapshotter.lazy.fusefs import AccessLog, BlobFS, FuseServer
from snapshotter.lazy.layer import FillConfig, LayerBusy, LayerPaths, LazyLayer, Prefetch
from snapshotter.lazy.spec import AuthHook, BlobSpec, no_auth

log = logging.getLogger("bootseer.lazy")


@dataclass
class LazyConfig:
    """Knobs of the lazy data path (all optional; ``from_dict`` reads them from a config file's table)."""

    fetch: FetchConfig = field(default_factory=FetchConfig)
    fill: FillConfig = field(default_factory=FillConfig)
    max_requests: int = 8  # range requests in flight, all blobs together
    background_requests: int = 2  # of which background fill may use
    fill_rate: float | None = None  # bytes/s cap of background fill (None: uncapped, still yields to demand)
    fill_idle: float = 2.0  # background fill waits until reads, fetches and prefetch have been quiet this long
    fill_max_wait: float = 30.0  # ... but reads alone (all served locally) hold it back at most this long
    cache_cap_bytes: int | None = None  # disk budget of the caches of unused layers
    verify_cache_on_load: bool = False  # re-hash cached chunks when a layer's cache is opened
    housekeeping_interval: float = 1.0  # flush bitmaps, swap complete layers, enforce the budget
    fuse_threads: int = 16  # worker threads for FUSE reads that wait on the network
    page_cache: bool = True  # FUSE files through the page cache, prefetched chunks pushed into it (fusefs)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LazyConfig:
        doc = dict(doc)
        fetch = FetchConfig(**doc.pop("fetch", {}))
        fill = FillConfig(**doc.pop("fill", {}))
        known = {f.name for f in fields(cls)} - {"fetch", "fill"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown lazy config keys: {', '.join(sorted(unknown))}")
        return cls(fetch=fetch, fill=fill, **doc)


class Metrics:
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


@dataclass
class _Record:
    spec: BlobSpec
    owners: set[str] = field(default_factory=set)
    last_used: float = 0.0
    loop: int | None = None
    mounted: bool = False
    swapped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "owners": sorted(self.owners), "last_used": self.last_used,
                "loop": self.loop, "mounted": self.mounted, "swapped": self.swapped}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> _Record:
        return cls(BlobSpec.from_json(doc["spec"]), set(doc.get("owners", ())), float(doc.get("last_used", 0)),
                   doc.get("loop"), bool(doc.get("mounted")), bool(doc.get("swapped")))


class LayerManager:
    def __init__(self, root: Path, config: LazyConfig | None = None, *, auth: AuthHook = no_auth,
                 registry: CollectorRegistry | None = None, access_log: AccessLog | None = None) -> None:
        self.root = Path(root)
        self.config = config or LazyConfig()
        self.metrics = Metrics(registry)
        self.client = HttpClient(auth, self.config.fetch.tls_verify, pool=self.config.max_requests)
        self.scheduler = Scheduler(self.config.max_requests, self.config.background_requests, self.config.fill_rate,
                                   self.config.fill_idle, self.config.fill_max_wait)
        self.fs = BlobFS(threads=self.config.fuse_threads, access_log=access_log,
                         page_cache=self.config.page_cache)
        self.server: FuseServer | None = None
        self._lock = threading.Lock()  # records and the layer table; never held while calling into a layer
        self._write_lock = threading.Lock()  # record files (taken before _lock, never inside it)
        self._digest_locks: dict[str, threading.Lock] = {}
        self._records: dict[str, _Record] = {}
        self._layers: dict[str, LazyLayer] = {}  # layers with live objects (mounted, or going away)
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._static_access_log = access_log
        self._recordings: dict[str, Recording] = {}
        for d in ("cache", "mnt", "layers"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        try:
            self.fuse_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a killed daemon's FUSE mount (ENOTCONN): FuseServer.start() detaches it
            if e.errno != errno.ENOTCONN:
                raise

    # ------------------------------------------------------------------------------------ paths
    @property
    def fuse_dir(self) -> Path:
        return self.root / "fuse"

    def _paths(self, spec: BlobSpec) -> LayerPaths:
        return LayerPaths(cache=self.root / "cache" / spec.name, mountpoint=self.root / "mnt" / spec.name,
                          fuse_file=self.fuse_dir / spec.name)

    def _record_path(self, name: str) -> Path:
        return self.root / "layers" / f"{name}.json"

    # ------------------------------------------------------------------------------------ start / stop
    def start(self) -> dict[str, str]:
        """Serve FUSE and bring back every recorded layer; returns ``{digest: outcome}``."""
        self.server = FuseServer(self.fs, self.fuse_dir)
        self.server.start()
        outcomes: dict[str, str] = {}
        for path in sorted((self.root / "layers").glob("*.json")):
            try:
                rec = _Record.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError) as e:
                log.error("ignoring unreadable layer record %s: %s", path, e)
                continue
            with self._lock:
                self._records[rec.spec.digest] = rec
            outcomes[rec.spec.digest] = self._restore(rec)
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="lazy-housekeeping", daemon=True)
        self._housekeeper.start()
        if outcomes:
            log.info("restored lazy layers: %s", ", ".join(f"{d[7:19]}={o}" for d, o in outcomes.items()))
        return outcomes

    def _restore(self, rec: _Record) -> str:
        digest = rec.spec.digest
        with self._digest_lock(digest):
            layer = self._new_layer(rec.spec)
            try:
                outcome = layer.adopt()
                if outcome == "absent" and rec.owners:
                    layer.setup()
                    outcome = "remounted"
            except Exception as e:
                log.exception("could not restore lazy layer %s", digest)
                with contextlib.suppress(Exception):
                    layer.close()
                return f"failed: {e}"
            if outcome == "absent":
                layer.cache.close()
                self._save(layer, mounted=False)
                return "cached"
            with self._lock:
                self._layers[digest] = layer
            if not rec.owners:  # mounted, but nobody uses it any more: finish what a crash interrupted
                self._teardown(layer, force=False)
                return f"{outcome}, released"
            return outcome

    def close(self, *, teardown: bool = False) -> None:
        """Stop the daemon's side.  ``teardown=True`` also unmounts every layer (stack down); otherwise mounts
        stay: swapped layers keep working, layers still behind FUSE fail until the next daemon re-serves them."""
        self._stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(10)
        for rid in list(self._recordings):
            with contextlib.suppress(Exception):
                self.stop_recording(rid)
        with self._lock:
            layers = list(self._layers.values())
        for layer in layers:
            try:
                if teardown:
                    layer.teardown(force=True)
                else:
                    layer.close()
            except Exception:
                log.exception("closing layer %s", layer.spec.digest)
        if teardown:
            with self._lock:
                self._layers.clear()
        behind_fuse = any(layer.mounted and not layer.swapped for layer in layers) and not teardown
        if self.server is not None:
            self.server.stop(unmount=not behind_fuse)
            self.server = None

    # ------------------------------------------------------------------------------------ API
    def acquire(self, spec: BlobSpec, owner: str, *, replaces: str | None = None) -> Path:
        """Make the blob available as a mounted erofs tree and return its directory; ``owner`` (e.g. the
        snapshot's namespace/key) now holds it.  Idempotent per (digest, owner).  Raises OSError (and leaves
        nothing behind) if the layer cannot be set up — the caller then takes the ordinary pull path.

        ``replaces``: an owner whose hold ``owner`` takes over (a layer set up ahead of its Prepare): dropped
        in the same step, so the layer is never unheld in between and its record is written once.  The
        owners change before the set-up, whose own record write (loop device, mount) then carries them: one
        durable write per acquire instead of two (each is two fsyncs, serialised across layers, on the
        Prepare's path)."""
        if self.server is None:
            raise RuntimeError("LayerManager.start() first")
        with self._digest_lock(spec.digest):
            with self._lock:
                layer = self._layers.get(spec.digest)
            if layer is None:
                layer = self._new_layer(spec)
                with self._lock:
                    self._layers[spec.digest] = layer
            fresh = not layer.mounted
            with self._lock:
                rec = self._records.setdefault(spec.digest, _Record(spec))
                had = owner in rec.owners
                dropped = replaces if replaces is not None and replaces != owner and replaces in rec.owners else None
                rec.owners.add(owner)
                if dropped is not None:
                    rec.owners.discard(dropped)
                rec.last_used = time.time()
            try:
                layer.setup()  # a fresh set-up writes the record (hooks.changed), owners included
            except Exception:
                with self._lock:
                    self._layers.pop(spec.digest, None)
                    if not had:
                        rec.owners.discard(owner)
                    if dropped is not None:
                        rec.owners.add(dropped)
                    unheld = not rec.owners
                with contextlib.suppress(Exception):
                    layer.teardown(force=True)
                if unheld:
                    self._forget(spec.name, keep_cache=True, spec=spec)
                raise
            if not fresh:
                self._save(layer)
        if fresh:
            self._enforce_cap()
        return layer.paths.mountpoint

    def release(self, owner: str, digest: str | None = None, *, force: bool = False) -> list[str]:
        """``owner`` no longer uses the layer (``digest``, or every layer it holds).  A layer nobody holds
        is unmounted (its cache stays, evictable).  Returns the digests that were unmounted.  A mount still
        in use stays until housekeeping finds it free, unless ``force`` (lazy detach)."""
        with self._lock:
            digests = [d for d, r in self._records.items() if owner in r.owners and (digest is None or d == digest)]
        gone: list[str] = []
        for d in digests:
            with self._digest_lock(d):
                with self._lock:
                    rec = self._records.get(d)
                    if rec is None:
                        continue
                    rec.owners.discard(owner)
                    rec.last_used = time.time()
                    unused = not rec.owners
                    layer = self._layers.get(d)
                if layer is None:
                    self._write_record(rec)
                    continue
                self._save(layer)
                if unused and self._teardown(layer, force=force):
                    gone.append(d)
        return gone

    def retain(self, owners: Iterable[str]) -> list[str]:
        """Drop every owner not in ``owners`` (at start, with the snapshots the metadata still holds)."""
        keep = set(owners)
        with self._lock:
            stale = {o for r in self._records.values() for o in r.owners if o not in keep}
        gone: list[str] = []
        for o in sorted(stale):
            gone += self.release(o)
        return gone

    def mountpoint(self, digest: str) -> Path | None:
        with self._lock:
            layer = self._layers.get(digest)
            return layer.paths.mountpoint if layer is not None and layer.mounted else None

    def layer(self, digest: str) -> LazyLayer | None:
        with self._lock:
            return self._layers.get(digest)

    def prefetch(self, digest: str, ranges: Sequence[Sequence[int]], concurrency: int | None = None,
                 start: float | None = None) -> Prefetch:
        """See :meth:`LazyLayer.prefetch`."""
        layer = self.layer(digest)
        if layer is None:
            raise KeyError(digest)
        return layer.prefetch(ranges, concurrency, start)

    # -------------------------------------------------------------------------------- access recording
    def record(self, path: Path | str, digests: Iterable[str] | None = None, *, hold_swap: bool = True) -> Recording:
        """Start logging every FUSE read (of ``digests``, or of every blob) to ``path`` as JSON lines (see
        :class:`Recording`); :meth:`stop_recording` ends it.  Several recordings may run at once."""
        rid = f"rec-{time.monotonic_ns():x}-{len(self._recordings)}"
        rec = Recording(rid, Path(path), frozenset(digests) if digests is not None else None, hold_swap)
        with self._lock:
            self._recordings[rid] = rec
        self.fs.access_log = self._log_access
        log.info("recording FUSE accesses to %s (%s)%s", path, "all blobs" if digests is None else
                 ", ".join(d[:19] for d in rec.digests or ()), "; swaps held" if hold_swap else "")
        return rec

    def stop_recording(self, rid: str) -> dict[str, Any]:
        with self._lock:
            rec = self._recordings.pop(rid, None)
            if not self._recordings:
                self.fs.access_log = self._static_access_log
        if rec is None:
            raise KeyError(f"no recording {rid!r}")
        out = rec.close()
        log.info("recording %s ended: %d reads logged to %s", rid, out["records"], rec.path)
        return out

    def swap_held(self) -> bool:
        with self._lock:
            return any(r.hold_swap for r in self._recordings.values())

    def _log_access(self, name: str, offset: int, length: int, t_ns: int) -> None:
        """The FUSE thread's hook: must not block (appends to a buffered local file)."""
        if self._static_access_log is not None:
            self._static_access_log(name, offset, length, t_ns)
        with self._lock:
            recs = list(self._recordings.values())
        for r in recs:
            r.write(name, offset, length, t_ns)

    def wait_swapped(self, digest: str, timeout: float | None = None) -> bool:
        layer = self.layer(digest)
        return layer is not None and layer.wait_swapped(timeout)

    def status(self) -> list[dict[str, Any]]:
        """Per layer: digest, size, bytes local, bytes fetched by kind, swapped, mount, owners …"""
        with self._lock:
            layers = dict(self._layers)
            records = {d: (sorted(r.owners), r.last_used) for d, r in self._records.items()}
            specs = {d: r.spec for d, r in self._records.items()}
        out: list[dict[str, Any]] = []
        for digest, (owners, last_used) in sorted(records.items()):
            layer = layers.get(digest)
            if layer is not None:
                doc = layer.status()
            else:
                spec = specs[digest]
                doc = {"digest": digest, "size": spec.size, "mounted": False, "swapped": False,
                       "bytes_local": self._disk_bytes(spec.name)}
            doc["owners"] = owners
            doc["last_used"] = last_used
            out.append(doc)
        return out

    def housekeeping(self) -> None:
        """Flush cache bitmaps, swap layers that became complete, unmount released layers that were busy,
        enforce the cache budget, refresh gauges.  Runs every ``housekeeping_interval`` seconds."""
        with self._lock:
            layers = list(self._layers.values())
            unowned = {d for d, r in self._records.items() if not r.owners}
        for layer in layers:
            try:
                if layer.cache.dirty:
                    layer.cache.flush()
                if layer.mounted and not layer.swapped and layer.cache.complete:
                    layer.swap()
                if layer.spec.digest in unowned:
                    with self._digest_lock(layer.spec.digest):
                        with self._lock:
                            rec = self._records.get(layer.spec.digest)
                            still_unowned = rec is not None and not rec.owners
                        if still_unowned and self._layers.get(layer.spec.digest) is layer:
                            self._teardown(layer, force=False, quiet=True)
            except Exception:
                log.exception("housekeeping of %s", layer.spec.digest)
        self._enforce_cap()
        with self._lock:
            layers = list(self._layers.values())
        self.metrics.layers.labels("fuse").set(sum(1 for x in layers if x.mounted and not x.swapped))
        self.metrics.layers.labels("swapped").set(sum(1 for x in layers if x.mounted and x.swapped))

    def set_fill(self, enabled: bool) -> None:
        """Pause or resume background fill of every layer (a recording or a measurement of demand reads
        wants it paused); demand reads and prefetch go on either way."""
        self.config.fill.enabled = enabled  # the layers share this FillConfig and look at it per run
        if enabled:
            with self._lock:
                layers = list(self._layers.values())
            for layer in layers:
                layer.start_fill()
        log.info("background fill %s", "resumed" if enabled else "paused")

    def evict(self, need_bytes: int = 0, cap: int | None = None) -> list[str]:
        """Delete caches of unowned, unmounted layers (least recently used first) until the caches fit the
        budget (``cap``, default the configured one) with ``need_bytes`` to spare.  Returns the evicted
        digests."""
        cap = self.config.cache_cap_bytes if cap is None else cap
        with self._lock:
            candidates = sorted((r.last_used, d, r.spec) for d, r in self._records.items()
                                if not r.owners and d not in self._layers)
        total = self._total_disk_bytes()
        self.metrics.cache_bytes.set(total)
        evicted: list[str] = []
        for _, digest, spec in candidates:
            if cap is None or total + need_bytes <= cap:
                break
            with self._digest_lock(digest):
                with self._lock:
                    rec = self._records.get(digest)
                    if rec is None or rec.owners or digest in self._layers:
                        continue
                freed = self._disk_bytes(spec.name)
                self._forget(spec.name, keep_cache=False, spec=spec)
            total -= freed
            evicted.append(digest)
            log.info("evicted cache of %s (%d MiB)", digest[:19], freed >> 20)
        self.metrics.cache_bytes.set(total)
        return evicted

    # ------------------------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _digest_lock(self, digest: str) -> Iterator[None]:
        with self._lock:
            lk = self._digest_locks.setdefault(digest, threading.Lock())
        with lk:
            yield

    def _new_layer(self, spec: BlobSpec) -> LazyLayer:
        def fetcher(cache: ChunkCache) -> Fetcher:
            return Fetcher(spec, cache, scheduler=self.scheduler, client=self.client, config=self.config.fetch,
                           metrics=self.metrics)

        return LazyLayer(spec, self._paths(spec), fetcher_factory=fetcher, fs=self.fs, server=self.server,
                         hooks=_Hooks(self), fill=self.config.fill, verify_cache=self.config.verify_cache_on_load)

    def _teardown(self, layer: LazyLayer, *, force: bool, quiet: bool = False) -> bool:
        """Unmount an unowned layer (caller holds its digest lock); False if it is still busy."""
        try:
            layer.teardown(force=force)
        except LayerBusy:
            if not quiet:
                log.info("layer %s released but its mount is busy; will retry", layer.spec.digest[:19])
            return False
        with self._lock:
            if self._layers.get(layer.spec.digest) is layer:
                del self._layers[layer.spec.digest]
        self._save(layer, mounted=False)
        return True

    def _save(self, layer: LazyLayer, *, mounted: bool | None = None) -> None:
        with self._lock:
            rec = self._records.setdefault(layer.spec.digest, _Record(layer.spec))
            rec.spec = layer.spec
            rec.loop = layer.loop_number
            rec.mounted = layer.mounted if mounted is None else mounted
            rec.swapped = layer.swapped and rec.mounted
            if not rec.mounted:
                rec.loop = None
        self._write_record(rec)

    def _write_record(self, rec: _Record) -> None:
        # serialised (and the state snapshotted inside) so the last writer always writes the newest state
        with self._write_lock:
            with self._lock:
                if self._records.get(rec.spec.digest) is not rec:
                    return  # forgotten (evicted) meanwhile: do not bring its file back
                data = json.dumps(rec.to_json(), indent=1).encode()
            atomic_write(self._record_path(rec.spec.name), data)

    def _forget(self, name: str, *, keep_cache: bool, spec: BlobSpec) -> None:
        with self._write_lock:
            with self._lock:
                self._records.pop(spec.digest, None)
            with contextlib.suppress(FileNotFoundError):
                self._record_path(name).unlink()
        if not keep_cache:
            shutil.rmtree(self.root / "cache" / name, ignore_errors=True)

    def _disk_bytes(self, name: str) -> int:
        try:
            return os.stat(self.root / "cache" / name / "data").st_blocks * 512
        except OSError:
            return 0

    def _total_disk_bytes(self) -> int:
        with self._lock:
            names = [r.spec.name for r in self._records.values()]
        return sum(self._disk_bytes(n) for n in names)

    def _enforce_cap(self) -> None:
        if self.config.cache_cap_bytes is not None:
            self.evict()

    def _housekeeping_loop(self) -> None:
        while not self._stop.wait(self.config.housekeeping_interval):
            try:
                self.housekeeping()
            except Exception:
                log.exception("housekeeping failed")


class Recording:
    """An access log being written: one JSON object per FUSE read of a blob, in arrival order::

        {"blob": "sha256:<hex>", "offset": 1048576, "length": 131072, "t_ns": 123456789}

    ``t_ns`` is ``time.monotonic_ns()`` of the daemon (only differences mean something).  While a recording
    with ``hold_swap`` runs, no layer leaves FUSE (no swap, and complete caches are mounted through FUSE
    too), so every read that misses the erofs page cache is seen; drop the page cache first for a cold run.
    """

    def __init__(self, rid: str, path: Path, digests: frozenset[str] | None, hold_swap: bool) -> None:
        self.id = rid
        self.path = Path(path)
        self.digests = digests  # None: every blob
        self.hold_swap = hold_swap
        self.records = 0
        self.started_ns = time.monotonic_ns()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()

    def write(self, name: str, offset: int, length: int, t_ns: int) -> None:
        digest = name.replace("-", ":", 1)
        if self.digests is not None and digest not in self.digests:
            return
        line = json.dumps({"blob": digest, "offset": offset, "length": length, "t_ns": t_ns}) + "\n"
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line)
            self.records += 1

    def close(self) -> dict[str, Any]:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
        return {"id": self.id, "path": str(self.path), "records": self.records}


class _Hooks:
    """A layer's view of its manager (records and metrics)."""

    def __init__(self, manager: LayerManager) -> None:
        self._m = manager

    def changed(self, layer: LazyLayer) -> None:
        self._m._save(layer)

    def cache_hit(self) -> None:
        self._m.metrics.cache_hits.inc()

    def swapped(self, layer: LazyLayer) -> None:
        self._m.metrics.swaps.inc()

    def may_swap(self) -> bool:
        return not self._m.swap_held()
