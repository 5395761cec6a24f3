"""LayerManager: every lazy layer of a daemon, their persisted states, the cache budget, restart and metrics.

The snapshotter's gRPC side calls :meth:`LayerManager.acquire` on a remote Prepare (with the :class:`BlobSpec`
read from the image's index) and uses the returned directory as the layer's lowerdir; it calls
:meth:`release` when the snapshot is removed and :meth:`retain` once at start with the owners its metadata
still knows.  All methods block and may be called from any thread except the FUSE thread.

On-disk layout under ``root``::

    fuse/                 the FUSE mount: one file per layer still served lazily
    cache/<name>/         chunk cache of a layer (see :mod:`snapshotter.lazy.cache`)
    mnt/<name>/           erofs mount of a layer (the lowerdir handed to the snapshotter)
    layers/<name>.json    the layer's state: spec, owners, last use, loop device, swapped

**Keyed by what was verified.**  A layer is keyed by :attr:`BlobSpec.key` — the blob digest *and* a digest
of its chunk table and source (registry, repository) — and ``<name>`` is that key, file-system safe.  A spec
from another registry, or with another chunk table, that claims the same blob digest gets a layer, a mount
and a cache of its own: it never reads bytes verified against someone else's chunk table.  The methods that
take a ``blob`` accept the key, or a plain blob digest (the first layer of that blob: the control API, and
snapshot labels written before keys existed).  Before a layer is declared complete — mounted on its local
file, swapped off FUSE — the whole blob is hashed against its digest (:meth:`ChunkCache.verify_blob`, in the
fill thread, off the start-up path); a cache that fails is discarded and its chunks fetched again.

**Restart.**  The layer states are the daemon's memory.  :meth:`start` mounts a fresh FUSE fs (lazily
detaching the dead one), then looks at each layer it has a state for as the kernel has it: a mount whose
loop device reads the local cache file is *swapped* and left alone — it kept working while no daemon ran; a
mount whose loop device still points at the old FUSE file is re-attached to the new one with
``LOOP_CHANGE_FD`` (reads fail with EIO while no daemon runs, and resume); a layer with owners but no mount
(a reboot) is set up again from its cache.

**Cache budget.**  Released layers are unmounted but their caches stay, so a layer pulled again is local at
once; when the caches together exceed ``cache_cap_bytes``, the least recently used caches of layers nobody
owns are deleted.  Layers in use are never evicted (the budget can be exceeded by what is in use).  The
budget sees the caches the layer states name, so none may outlive its state: a set-up that fails takes a
new layer's cache with it, and the start deletes caches whose state went first (a kill mid-eviction).

**Garbage collection.**  containerd's Cleanup (after its own garbage collection) hands the remote snapshots
the metadata holds to :meth:`LayerManager.retain`: holds no snapshot has are dropped — except provisional
set-ups ahead and holds younger than ``collect_grace`` (a Prepare's, whose snapshot is being recorded) — and
the caches are brought under the budget at once, not at the next housekeeping.  What containerd removed
while the daemon was down it collects when the daemon starts again (:mod:`snapshotter.reconcile`).

Beside it, by concern: the persisted layer states (:mod:`~snapshotter.lazy.layerstate`), access recording
(:mod:`~snapshotter.lazy.recording`), metrics (:mod:`~snapshotter.lazy.metrics`); one layer's own lifecycle
is :mod:`~snapshotter.lazy.layer`.  The manager keeps the layer table, the owners, eviction and restart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bootseer.accesslog import AccessLogWriter
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.fusefs import BlobFS, FuseServer
from snapshotter.lazy.layer import FillConfig, LayerBusy, LayerPaths, LazyLayer
from snapshotter.lazy.layerstate import LayerState, LayerStateFiles
from snapshotter.lazy.metrics import LazyMetrics
from snapshotter.lazy.prefetchjob import Prefetch
from snapshotter.lazy.recording import Recording, Recordings
from snapshotter.lazy.scheduling import PREFETCH, Scheduler
from snapshotter.lazy.spec import AuthHook, BlobSpec, TlsHook, no_auth
from snapshotter.lazy.transport import HttpClient

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
    # containerd's Cleanup releases holds no snapshot has, except those younger than this: a Prepare holds its
    # layer a moment before the core records the snapshot
    collect_grace: float = 60.0

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


class LayerManager:
    def __init__(self, root: Path, config: LazyConfig | None = None, *, auth: AuthHook = no_auth,
                 registry: CollectorRegistry | None = None, access_log: AccessLogWriter | None = None,
                 tls: TlsHook | None = None) -> None:
        self.root = Path(root)
        self.config = config or LazyConfig()
        self.metrics = LazyMetrics(registry)
        self.client = HttpClient(auth, self.config.fetch.tls_verify, pool=self.config.max_requests, tls=tls)
        self.scheduler = Scheduler(self.config.max_requests, self.config.background_requests, self.config.fill_rate,
                                   self.config.fill_idle, self.config.fill_max_wait)
        self.fs = BlobFS(threads=self.config.fuse_threads, page_cache=self.config.page_cache)
        self.recordings = Recordings(self.fs, access_log)
        self.server: FuseServer | None = None
        self._lock = threading.Lock()  # layer states and the layer table; never held while calling into a layer
        self._write_lock = threading.Lock()  # state files (taken before _lock, never inside it)
        self._digest_locks: dict[str, threading.Lock] = {}
        self._states: dict[str, LayerState] = {}  # persisted per layer (self.state_files)
        self._held_since: dict[tuple[str, str], float] = {}  # (key, owner) → monotonic time of its acquire
        self._layers: dict[str, LazyLayer] = {}  # layers with live objects (mounted, or going away)
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self.state_files = LayerStateFiles(self.root / "layers")
        for d in ("cache", "mnt"):
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

    def _paths(self, name: str) -> LayerPaths:
        return LayerPaths(cache=self.root / "cache" / name, mountpoint=self.root / "mnt" / name,
                          fuse_file=self.fuse_dir / name)

    # ------------------------------------------------------------------------------------ start / stop
    def start(self) -> dict[str, str]:
        """Serve FUSE and bring back every layer with a persisted state; returns ``{key: outcome}``."""
        self.server = FuseServer(self.fs, self.fuse_dir)
        self.server.start()
        outcomes: dict[str, str] = {}
        for rec in self.state_files.load():
            with self._lock:
                if rec.key in self._states:  # a legacy state beside its keyed successor: one of them
                    log.error("ignoring a second layer state of %s (%s)", rec.key, rec.name)
                    continue
                self._states[rec.key] = rec
            outcomes[rec.key] = self._restore(rec)
        self._remove_strays()
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="lazy-housekeeping", daemon=True)
        self._housekeeper.start()
        if outcomes:
            log.info("restored lazy layers: %s", ", ".join(f"{d[7:19]}={o}" for d, o in outcomes.items()))
        return outcomes

    def _restore(self, rec: LayerState) -> str:
        key = rec.key
        with self._digest_lock(key):
            layer = self._new_layer(rec.spec, rec.name)
            try:
                outcome = layer.adopt()
                if outcome == "absent" and rec.owners:
                    layer.setup()
                    outcome = "remounted"
            except Exception as e:
                log.exception("could not restore lazy layer %s", key)
                with contextlib.suppress(Exception):
                    layer.close()
                return f"failed: {e}"
            if outcome == "absent":
                layer.cache.close()
                self._save(layer, mounted=False)
                return "cached"
            with self._lock:
                self._layers[key] = layer
            if not rec.owners:  # mounted, but nobody uses it any more: finish what a crash interrupted
                self._teardown(layer, force=False)
                return f"{outcome}, released"
            return outcome

    def _remove_strays(self) -> list[str]:
        """Delete caches and empty mount directories no layer state names.  A state is deleted before its cache
        (eviction), so a daemon killed in between — or a set-up that failed and left what it fetched — leaves
        a cache nobody counts against ``cache_cap_bytes`` and nothing would ever evict.  A mount point still
        mounted is left alone (and said): only a state could tell what it serves."""
        with self._lock:
            named = {r.name for r in self._states.values()}
        named |= self.state_files.names()
        removed: list[str] = []
        for d in ("cache", "mnt"):
            for entry in sorted((self.root / d).iterdir()):
                if entry.name in named:
                    continue
                if d == "mnt":
                    if os.path.ismount(entry):
                        log.warning("%s is mounted but no layer state names it; left alone", entry)
                        continue
                    with contextlib.suppress(OSError):
                        entry.rmdir()
                else:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
                    removed.append(entry.name)
        if removed:
            log.info("deleted %d caches no layer state names (an eviction or set-up cut short): %s",
                     len(removed), ", ".join(n[:19] for n in removed))
        return removed

    def close(self, *, teardown: bool = False) -> None:
        """Stop the daemon's side.  ``teardown=True`` also unmounts every layer (stack down); otherwise mounts
        stay: swapped layers keep working, layers still behind FUSE fail until the next daemon re-serves them."""
        self._stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(10)
        for rid in self.recordings.ids():
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
        snapshot's namespace/key) now holds it.  Idempotent per (:attr:`BlobSpec.key`, owner).  Raises
        OSError (and leaves nothing behind) if the layer cannot be set up — the caller then takes the
        ordinary pull path.

        ``replaces``: an owner whose hold ``owner`` takes over (a layer set up ahead of its Prepare): dropped
        in the same step, so the layer is never unheld in between and its state is written once.  The
        owners change before the set-up, whose own state write (loop device, mount) then carries them: one
        durable write per acquire instead of two (each is two fsyncs, serialised across layers, on the
        Prepare's path)."""
        if self.server is None:
            raise RuntimeError("LayerManager.start() first")
        key = spec.key
        with self._digest_lock(key):
            with self._lock:
                layer = self._layers.get(key)
                known = self._states.get(key)
            if layer is None:
                layer = self._new_layer(spec, known.name if known is not None else spec.name)
                with self._lock:
                    self._layers[key] = layer
            fresh = not layer.mounted
            with self._lock:
                rec = self._states.setdefault(key, LayerState(spec))
                had = owner in rec.owners
                dropped = replaces if replaces is not None and replaces != owner and replaces in rec.owners else None
                rec.owners.add(owner)
                self._held_since[(key, owner)] = time.monotonic()
                if dropped is not None:
                    rec.owners.discard(dropped)
                    self._held_since.pop((key, dropped), None)
                rec.last_used = time.time()
            try:
                layer.setup()  # a fresh set-up writes the state (hooks.changed), owners included
            except Exception:
                with self._lock:
                    self._layers.pop(key, None)
                    if not had:
                        rec.owners.discard(owner)
                        self._held_since.pop((key, owner), None)
                    if dropped is not None:
                        rec.owners.add(dropped)
                    unheld = not rec.owners
                with contextlib.suppress(Exception):
                    layer.teardown(force=True)
                if unheld and known is None:  # nothing of it was here before: leave nothing behind
                    self._forget(rec, keep_cache=False)
                elif unheld:  # a cached layer nobody holds, as before: counted against the budget, evictable
                    with self._lock:
                        rec.mounted, rec.swapped, rec.loop = False, False, None
                    self._write_state(rec)
                raise
            if not fresh:
                self._save(layer)
        if fresh:
            self._enforce_cap()
        return layer.paths.mountpoint

    def release(self, owner: str, digest: str | None = None, *, force: bool = False) -> list[str]:
        """``owner`` no longer uses the layer (``digest``: its key or blob digest; or every layer it holds).
        A layer nobody holds is unmounted (its cache stays, evictable).  Returns the blob digests of the
        layers that were unmounted.  A mount still in use stays until housekeeping finds it free, unless
        ``force`` (lazy detach)."""
        with self._lock:
            keys = [k for k, r in self._states.items()
                    if owner in r.owners and (digest is None or digest in (k, r.spec.digest))]
        gone: list[str] = []
        for d in keys:
            with self._digest_lock(d):
                with self._lock:
                    rec = self._states.get(d)
                    if rec is None:
                        continue
                    rec.owners.discard(owner)
                    self._held_since.pop((d, owner), None)
                    rec.last_used = time.time()
                    unused = not rec.owners
                    layer = self._layers.get(d)
                if layer is None:
                    self._write_state(rec)
                    continue
                self._save(layer)
                if unused and self._teardown(layer, force=force):
                    gone.append(rec.spec.digest)
        return gone

    def retain(self, owners: Iterable[str], *, spare: Callable[[str], bool] | None = None,
               grace: float = 0.0) -> list[str]:
        """Drop every owner not in ``owners`` (the snapshots the metadata holds: at start, and on containerd's
        Cleanup), except those ``spare`` says to keep and holds taken less than ``grace`` seconds ago — a
        Prepare holds its layer a moment before the core records its snapshot."""
        keep = set(owners)
        now = time.monotonic()
        with self._lock:
            stale = {o for k, r in self._states.items() for o in r.owners
                     if o not in keep and not (spare is not None and spare(o))
                     and now - self._held_since.get((k, o), float("-inf")) >= grace}
        gone: list[str] = []
        for o in sorted(stale):
            gone += self.release(o)
        return gone

    def mountpoint(self, digest: str) -> Path | None:
        layer = self.layer(digest)
        return layer.paths.mountpoint if layer is not None and layer.mounted else None

    def layer(self, digest: str) -> LazyLayer | None:
        """The live layer of a key — or of a plain blob digest, the first one of that blob."""
        with self._lock:
            layer = self._layers.get(digest)
            if layer is None and "+" not in digest:
                layer = next((x for k, x in sorted(self._layers.items()) if x.spec.digest == digest), None)
            return layer

    def prefetch(self, digest: str, ranges: Sequence[Sequence[int]], concurrency: int | None = None,
                 start: float | None = None) -> Prefetch:
        """See :meth:`LazyLayer.prefetch`."""
        layer = self.layer(digest)
        if layer is None:
            raise KeyError(digest)
        return layer.prefetch(ranges, concurrency, start)

    def prefetched_bytes(self, digest: str) -> int:
        """Bytes the mounted layer of ``digest`` fetched as kind ``prefetch`` so far (0 if none is mounted)."""
        layer = self.layer(digest)
        return int(layer.fetcher.stats.bytes.get(PREFETCH, 0)) if layer is not None else 0

    def observe_demand(self, digest: str, observer: Callable[[int, int, bool], None] | None) -> bool:
        """Have ``observer(offset, length, local)`` called on the FUSE loop for every read of the mounted layer
        of ``digest`` (replacing its observer; None removes it): cheap, must not block, dropped if it raises.
        False if no layer of ``digest`` is mounted."""
        layer = self.layer(digest)
        if layer is None:
            return False
        layer.demand_observer = observer
        return True

    # -------------------------------------------------------------------------------- access recording
    def record(self, path: Path | str, digests: Iterable[str] | None = None, *, hold_swap: bool = True) -> Recording:
        """Start logging every FUSE read (of ``digests``, or of every blob) to ``path`` (see
        :mod:`snapshotter.lazy.recording`); :meth:`stop_recording` ends it.  Several recordings may run at once."""
        return self.recordings.start(path, digests, hold_swap=hold_swap)

    def stop_recording(self, rid: str) -> dict[str, Any]:
        return self.recordings.stop(rid)

    def swap_held(self) -> bool:
        return self.recordings.swap_held()

    def wait_swapped(self, digest: str, timeout: float | None = None) -> bool:
        layer = self.layer(digest)
        return layer is not None and layer.wait_swapped(timeout)

    def status(self) -> list[dict[str, Any]]:
        """Per layer: digest, size, bytes local, bytes fetched by kind, swapped, mount, owners …"""
        with self._lock:
            layers = dict(self._layers)
            records = {d: (sorted(r.owners), r.last_used) for d, r in self._states.items()}
            specs = {d: r.spec for d, r in self._states.items()}
            names = {d: r.name for d, r in self._states.items()}
        out: list[dict[str, Any]] = []
        for key, (owners, last_used) in sorted(records.items()):
            layer = layers.get(key)
            spec = specs[key]
            if layer is not None:
                doc = layer.status()
            else:
                doc = {"digest": spec.digest, "wire_digest": spec.fetch_digest, "size": spec.size,
                       "mounted": False, "swapped": False,
                       "bytes_local": self._disk_bytes(names[key])}
            doc["key"] = key
            doc["owners"] = owners
            doc["last_used"] = last_used  # where the blob comes from, so `bootseer status` can be matched to images
            doc["repository"] = f"{spec.registry.split('://', 1)[-1].rstrip('/')}/{spec.repository}"
            # what an operator asks during a registry outage: which layers still read from it, and is it down
            chunks, local = doc.get("chunks"), doc.get("chunks_local")
            complete = (local >= chunks) if isinstance(chunks, int) and isinstance(local, int) \
                else int(str(doc.get("bytes_local", 0))) >= spec.size
            doc["needs_registry"] = not (complete or doc.get("swapped"))
            doc["registry_down"] = self.client.down(spec.endpoints())
            out.append(doc)
        return out

    def housekeeping(self) -> None:
        """Flush cache bitmaps, swap layers that became complete, unmount released layers that were busy,
        enforce the cache budget, refresh gauges.  Runs every ``housekeeping_interval`` seconds."""
        with self._lock:
            layers = list(self._layers.values())
            unowned = {d for d, r in self._states.items() if not r.owners}
        for layer in layers:
            key = layer.spec.key
            try:
                if layer.cache.dirty:
                    layer.cache.flush()
                if layer.mounted and not layer.swapped and layer.cache.complete:
                    if layer.cache.verified:
                        layer.swap()
                    else:  # demand reads or prefetch completed it: the fill thread hashes it, then swaps
                        layer.start_fill()
                if key in unowned:
                    with self._digest_lock(key):
                        with self._lock:
                            rec = self._states.get(key)
                            still_unowned = rec is not None and not rec.owners
                        if still_unowned and self._layers.get(key) is layer:
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

    def evict(self, need_bytes: int = 0, cap: int | None = None, digests: Collection[str] | None = None) -> list[str]:
        """Delete caches of unowned, unmounted layers (least recently used first; only ``digests`` when given)
        until the caches fit the budget (``cap``, default the configured one) with ``need_bytes`` to spare.
        ``digests`` and the result name layers by key (a plain blob digest in ``digests`` covers its layers)."""
        cap = self.config.cache_cap_bytes if cap is None else cap
        with self._lock:
            candidates = sorted((r.last_used, k) for k, r in self._states.items()
                                if not r.owners and k not in self._layers
                                and (digests is None or k in digests or r.spec.digest in digests))
        total = self._total_disk_bytes()
        self.metrics.cache_bytes.set(total)
        evicted: list[str] = []
        for _, key in candidates:
            if cap is None or total + need_bytes <= cap:
                break
            with self._digest_lock(key):
                with self._lock:
                    rec = self._states.get(key)
                    if rec is None or rec.owners or key in self._layers:
                        continue
                freed = self._disk_bytes(rec.name)
                self._forget(rec, keep_cache=False)
            total -= freed
            evicted.append(key)
            log.info("evicted cache of %s (%d MiB)", key[:19], freed >> 20)
        self.metrics.cache_bytes.set(total)
        return evicted

    # ------------------------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _digest_lock(self, digest: str) -> Iterator[None]:  # per layer key
        with self._lock:
            lk = self._digest_locks.setdefault(digest, threading.Lock())
        with lk:
            yield

    def _new_layer(self, spec: BlobSpec, name: str) -> LazyLayer:
        def fetcher(cache: ChunkCache) -> Fetcher:
            return Fetcher(spec, cache, scheduler=self.scheduler, client=self.client, config=self.config.fetch,
                           metrics=self.metrics)

        return LazyLayer(spec, self._paths(name), fetcher_factory=fetcher, fs=self.fs, server=self.server,
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
            if self._layers.get(layer.spec.key) is layer:
                del self._layers[layer.spec.key]
        self._save(layer, mounted=False)
        return True

    def _save(self, layer: LazyLayer, *, mounted: bool | None = None) -> None:
        with self._lock:
            rec = self._states.setdefault(layer.spec.key, LayerState(layer.spec, name=layer.name))
            rec.spec = layer.spec
            rec.loop = layer.loop_number
            rec.mounted = layer.mounted if mounted is None else mounted
            rec.swapped = layer.swapped and rec.mounted
            if not rec.mounted:
                rec.loop = None
        self._write_state(rec)

    def _write_state(self, rec: LayerState) -> None:
        # serialised (and the state snapshotted inside) so the last writer always writes the newest state
        with self._write_lock:
            with self._lock:
                if self._states.get(rec.key) is not rec:
                    return  # forgotten (evicted) meanwhile: do not bring its file back
                data = self.state_files.encode(rec)
            self.state_files.write(rec.name, data)

    def _forget(self, rec: LayerState, *, keep_cache: bool) -> None:
        with self._write_lock:
            with self._lock:
                if self._states.get(rec.key) is rec:
                    del self._states[rec.key]
            self.state_files.delete(rec.name)
        if not keep_cache:
            shutil.rmtree(self.root / "cache" / rec.name, ignore_errors=True)

    def _disk_bytes(self, name: str) -> int:
        try:
            return os.stat(self.root / "cache" / name / "data").st_blocks * 512
        except OSError:
            return 0

    def _total_disk_bytes(self) -> int:
        with self._lock:
            names = [r.name for r in self._states.values()]
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


class _Hooks:
    """A layer's view of its manager (persisted state and metrics)."""

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
