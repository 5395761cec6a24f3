"""One lazily pulled layer, from first mount to leaving the data path.

Lifecycle (every step runs in a manager or worker thread, never on the FUSE thread)::

    setup()     register the blob's FUSE file → open it → bind a read-only, autoclear loop device to it →
                mount erofs from the loop device at the layer's mount dir → close our descriptors
                (from here the mount is the loop device's only user: unmounting it frees the device)
    fill        a thread fetches the chunks nobody asked for yet, as "background" (bandwidth-capped,
                admitted only while no demand read waits), in coalesced runs
    verify      once every chunk is local, the fill thread hashes the whole file against the blob digest; a
                mismatch discards the cache (the layer stays on FUSE, chunks are fetched and verified again)
    swap()      once every chunk is local, durable and the whole blob verified: LOOP_CHANGE_FD from the
                FUSE file to the cache's data file (read-only) — the kernel now reads local disk, FUSE serves
                nothing more for the blob, and the daemon may die without breaking the mount; the FUSE name
                is removed
    reattach()  after a daemon restart, for a layer that was not swapped yet: register the file in the new
                FUSE mount and LOOP_CHANGE_FD the existing loop device from the dead FUSE file to it
    teardown()  stop fill and prefetch, unmount, make sure the loop device is gone, unregister, close or
                drop the cache

The layer is the FUSE file's :class:`~snapshotter.lazy.fusefs.BlobSource`: reads of local chunks are
answered from the cache, others go through the fetcher (demand kind).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from snapshotter.lazy import loop, prefetchjob
from snapshotter.lazy import mount as mnt
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import Cancelled, FetchError
from snapshotter.lazy.fetcher import Fetcher
from snapshotter.lazy.fusefs import BlobFS, FuseServer
from snapshotter.lazy.prefetchjob import Prefetch
from snapshotter.lazy.scheduling import BACKGROUND, DEMAND
from snapshotter.lazy.spec import BlobSpec, coalesce

log = logging.getLogger("bootseer.lazy.layer")

_STORE_BYTES = 1 << 20  # one page-cache push (FUSE notify_store) at most
_VERIFY_ATTEMPTS = 2  # whole-blob hashes that may fail before fill gives up (the layer stays on FUSE)


class LayerBusy(OSError):
    """The layer's mount is still in use (an overlay above it); it was left mounted."""


class LayerHooks(Protocol):
    """What a layer tells its manager (persisting its record, metrics)."""

    def changed(self, layer: LazyLayer) -> None: ...

    def cache_hit(self) -> None: ...

    def swapped(self, layer: LazyLayer) -> None: ...

    def may_swap(self) -> bool:
        """False while something (a recording) needs every read of the layer to keep reaching FUSE."""
        ...


@dataclass(frozen=True)
class LayerPaths:
    cache: Path  # the chunk cache directory
    mountpoint: Path  # where erofs is mounted (the layer's lowerdir)
    fuse_file: Path  # the blob's file in the FUSE mount


@dataclass
class FillConfig:
    enabled: bool = True
    run_bytes: int = 4 << 20  # chunks per background request (coalesced)
    retry_max: float = 30.0  # longest pause between attempts after background failures
    prefetch_concurrency: int = 4
    # prefetch runs the start-up first read within this many seconds of each other (recorded time) may go out
    # as one multi-range request (Fetcher.ensure_runs); 0: one run per request.  Bounded so that a request
    # admitted for its earliest run does not carry bytes due much later (see LazyLayer.prefetch)
    prefetch_batch_window: float = 0.05
    # nice value of the fill threads (download, per-chunk sha256, cache writes, the whole-blob hash, swap):
    # on a node with few cores a fill at the containers' priority takes CPU from the workload it runs for
    # (docs/bench/design-measurements.md); 0 keeps the daemon's priority
    nice: int = 10
    direct_io_after_swap: bool = False  # loop reads the cache file with O_DIRECT: one page-cache copy
    # read-ahead of the loop device (erofs reads ahead, and faults around mmap'ed pages, by this much):
    # None keeps the kernel's default; smaller values fetch less around each lazy read
    read_ahead_kb: int | None = None


class LazyLayer:
    def __init__(self, spec: BlobSpec, paths: LayerPaths, *, fetcher_factory: Callable[[ChunkCache], Fetcher],
                 fs: BlobFS, server: FuseServer | None, hooks: LayerHooks, fill: FillConfig | None = None,
                 verify_cache: bool = False) -> None:
        self.spec = spec
        self.paths = paths
        self.fs = fs
        self.server = server
        self.hooks = hooks
        self.fill_config = fill or FillConfig()
        self.cache = ChunkCache(paths.cache, spec, verify=verify_cache)
        self.fetcher = fetcher_factory(self.cache)
        self.loop_number: int | None = None
        self._ino: int | None = None  # of the FUSE file while registered
        self._page_cached = False  # the loop device reads the FUSE file through the page cache
        self.mounted = False
        self.swapped = False
        self.last_error: str | None = None
        self._life = threading.RLock()  # serialises setup / swap / reattach / teardown
        self._cancel = threading.Event()  # set at teardown: stops fill and prefetch
        self._fill_thread: threading.Thread | None = None
        self._prefetch_threads: list[threading.Thread] = []
        self._swapped_event = threading.Event()
        self.blob_mismatches = 0  # whole-blob hashes that failed (each discarded the cache)
        self.io = {"reads": 0, "cached": 0, "bytes": 0, "errors": 0}  # reads that reached FUSE for this blob
        # (offset, length, all chunks local?) for every read reaching FUSE, on the FUSE loop: the hot-block
        # prefetcher counts how many of the container's reads its prefetch had made local.  Must be cheap.
        self.demand_observer: Callable[[int, int, bool], None] | None = None

    # -- BlobSource (FUSE) ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def name(self) -> str:
        """The layer's FUSE file name (:attr:`BlobSpec.name`, or the legacy name its state kept)."""
        return self.paths.fuse_file.name

    def _loop_name(self) -> str:
        """What the loop device's file name is set to (63 bytes at most): unique per layer key."""
        if "+" not in self.name:
            return self.name[:63]
        blob, suffix = self.name.split("+", 1)
        return f"{blob[7:47]}+{suffix}"

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """Every FUSE read starts here (on the FUSE loop), so this is where they are counted."""
        length = max(0, min(length, self.spec.size - offset))
        self.io["reads"] += 1
        self.fetcher.scheduler.note_read()  # holds background fill back while the container is reading
        local = self.cache.has_all(self.spec.chunks_for(offset, length))
        observer = self.demand_observer
        if observer is not None:
            try:
                observer(offset, length, local)
            except Exception:  # an observer must never break reads
                log.exception("demand observer of %s failed; removing it", self.spec.digest[:19])
                self.demand_observer = None
        if not local:
            return None
        self.hooks.cache_hit()
        data = self.cache.read(offset, length)
        self.io["cached"] += 1
        self.io["bytes"] += len(data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = self.fetcher.read(offset, length, DEMAND)
        except OSError:
            self.io["errors"] += 1
            raise
        self.io["bytes"] += len(data)
        return data

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Serve the blob over FUSE, bind a loop device to it and mount erofs (see the module doc).

        A layer already mounted returns at once, without waiting for ``_life``: a Prepare of a layer set up
        ahead must not wait behind its prefetch moving the loop device onto the page cache (a
        ``LOOP_CHANGE_FD`` freezes the device's queue; docs/bench/design-measurements.md).  The caller (the
        manager, under the layer's digest lock) keeps a teardown from racing this."""
        if self.mounted:
            return
        with self._life:
            if self.mounted:
                return
            self._cancel.clear()
            if self.cache.verified and self.hooks.may_swap():
                self._setup_on(self.cache.open_readonly(), via_fuse=False)
            else:
                self._register()
                self._setup_on(os.open(self.paths.fuse_file, os.O_RDONLY | os.O_CLOEXEC), via_fuse=True)
                self.fetcher.scheduler.note_mount()
            self.hooks.changed(self)
        self.start_fill()

    def _setup_on(self, backing_fd: int, *, via_fuse: bool) -> None:
        """Bind + mount on ``backing_fd`` (a FUSE file, or the complete cache file: no need for FUSE then)."""
        self.paths.mountpoint.mkdir(parents=True, exist_ok=True)
        block = 4096 if self.spec.size % 4096 == 0 else 512
        try:
            dev = loop.attach(backing_fd, read_only=True, autoclear=True, block_size=block, name=self._loop_name())
        finally:
            os.close(backing_fd)
        with dev:  # keep the device open until the mount holds it, or autoclear would detach it
            if self.fill_config.read_ahead_kb is not None:
                loop.set_read_ahead_kb(dev.number, self.fill_config.read_ahead_kb)
            try:
                mnt.mount_erofs(dev.path, self.paths.mountpoint)
            except OSError as e:
                self.last_error = str(e)
                raise
            self.loop_number = dev.number
        self.mounted = True
        self.swapped = not via_fuse
        if self.swapped:
            self._swapped_event.set()
        log.info("layer %s mounted at %s on %s (%s)", self.spec.digest[:19], self.paths.mountpoint, dev.path,
                 "FUSE" if via_fuse else "local cache")

    def _register(self) -> None:
        self._ino = self.fs.add(self.name, self)
        self._page_cached = False  # a new FUSE file: opened with direct I/O until a prefetch moves it

    def _unregister(self) -> None:
        if self.fs.remove(self.name) and self.server is not None:
            self.server.invalidate(self.name)

    # -- restart -------------------------------------------------------------------------------------
    def adopt(self) -> str:
        """After a daemon restart: find what survived and continue from there.

        Returns what was found: ``"swapped"`` (the mount reads the local cache file: left alone),
        ``"reattached"`` (the loop device was moved from the dead FUSE file to the new one), or
        ``"absent"`` (nothing mounted: the caller decides whether to :meth:`setup` again)."""
        with self._life:
            top = mnt.top_mount(self.paths.mountpoint)
            number = loop.number_of(top.dev) if top is not None and top.fstype == "erofs" else None
            if number is None:
                self.mounted = False
                self.loop_number = None
                return "absent"
            self.loop_number = number
            self.mounted = True
            if loop.backed_by(number, self.cache.data_path):
                self.swapped = True
                self._swapped_event.set()
                self.hooks.changed(self)
                return "swapped"
            self._register()
            fd = os.open(self.paths.fuse_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                loop.change_fd(number, fd)
            finally:
                os.close(fd)
            self.swapped = False
            self.hooks.changed(self)
            log.info("layer %s re-attached: %s now reads the new FUSE file", self.spec.digest[:19],
                     loop.device_path(number))
        self.start_fill()
        return "reattached"

    # -- background fill -----------------------------------------------------------------------------
    def start_fill(self) -> None:
        if self.swapped or not self.mounted:
            return
        if self._fill_thread is not None and self._fill_thread.is_alive():
            return
        self._fill_thread = threading.Thread(target=self._fill_at_low_priority, name=f"fill-{self.name[7:19]}",
                                             daemon=True)
        self._fill_thread.start()

    def _fill_at_low_priority(self) -> None:
        """The fill thread: :meth:`_fill` at ``FillConfig.nice`` (Linux: per thread).  A thread's nice value
        does not hold the GIL longer: its CPU-heavy steps (sha256, file I/O) release it."""
        if self.fill_config.nice > 0:
            try:
                tid = threading.get_native_id()  # never raised above the daemon's own priority
                os.setpriority(os.PRIO_PROCESS, tid, max(self.fill_config.nice, os.getpriority(os.PRIO_PROCESS, tid)))
            except OSError as e:  # the fill runs at the daemon's priority then
                log.info("background fill of %s at normal priority: %s", self.spec.digest[:19], e)
        self._fill()

    def _fill(self) -> None:
        pause = 0.5
        while not self._cancel.is_set():
            missing = self.cache.missing()
            if not missing:
                break
            if not self.fill_config.enabled:
                return  # demand reads and prefetch may still complete the layer; housekeeping swaps it then
            try:
                for run in self._runs(missing, self.fill_config.run_bytes):
                    if self._cancel.is_set() or not self.fill_config.enabled:
                        return  # torn down, or fill paused (set_fill): resumed by a new start_fill()
                    self.fetcher.ensure(run, BACKGROUND, cancel=self._cancel)
                pause = 0.5
            except Cancelled:
                return
            except FetchError as e:
                self.last_error = e.strerror
                log.info("background fill of %s paused %.1fs: %s", self.spec.digest[:19], pause, e.strerror)
                if self._cancel.wait(pause):
                    return
                pause = min(pause * 2, self.fill_config.retry_max)
        if not self._cancel.is_set() and self.cache.complete:
            # hashing the whole blob is background work too: a layer that demand reads or prefetch
            # completed waits, like a fill request, until no start-up needs the CPU
            if not self.cache.verified and not self.fetcher.scheduler.wait_quiet(self._cancel):
                return
            try:
                ok = self.cache.verify_blob(self._cancel)
            except OSError as e:
                self.last_error = str(e)
                log.error("hashing %s failed: %s", self.spec.digest[:19], e)
                return
            if ok is False:
                self.blob_mismatches += 1
                self.last_error = "blob digest mismatch: cache discarded"
                if self.blob_mismatches < _VERIFY_ATTEMPTS and not self._cancel.wait(0.5):
                    self._fill()  # fetch (and verify) every chunk again, once
                else:  # the chunk table does not describe this blob: never complete, stays on FUSE
                    log.error("layer %s: the blob never matched its digest; it stays on FUSE",
                              self.spec.digest[:19])
                return
            if ok is None:
                return
            try:
                self.swap()
            except OSError as e:
                self.last_error = str(e)
                log.error("swapping %s to its local file failed: %s", self.spec.digest[:19], e)

    def _runs(self, indices: list[int], cap_bytes: int) -> list[list[int]]:
        """Runs of at most ``cap_bytes``, the order of ``indices`` (blob order, or first-access order) kept."""
        return coalesce(indices, max(1, cap_bytes // self.spec.chunk_size))

    # -- prefetch ------------------------------------------------------------------------------------
    def prefetch(self, ranges: Sequence[Sequence[int]], concurrency: int | None = None,
                 start: float | None = None) -> Prefetch:
        """Fetch the chunks covering ``ranges`` in the given order, ``concurrency`` runs at a time, as
        "prefetch" (ahead of background fill, behind demand reads), and push them into the page cache (see
        :mod:`~snapshotter.lazy.prefetchjob`).  Chunks already local or in flight are not fetched twice.
        Stops when the layer is torn down.

        A range may carry a third item, when the recorded start-up first read it (ns after its start);
        with ``start`` (the ``time.monotonic()`` the start-up began, for this image) each request is then
        due at ``start`` + that time, and the daemon's scheduler admits prefetch requests of all layers
        earliest due first."""
        job, threads = prefetchjob.start(
            self.spec, self.cache, self.fetcher, ranges,
            concurrency=concurrency or self.fill_config.prefetch_concurrency, start_time=start,
            batch_window=self.fill_config.prefetch_batch_window, cancel=self._cancel, warm=self._warm,
            before=self._use_page_cache, name=self.name[7:15])
        self._prefetch_threads = [t for t in [*self._prefetch_threads, *threads] if t.is_alive()]
        return job

    # -- page-cache warming ---------------------------------------------------------------------------
    def _use_page_cache(self) -> None:
        """Re-open the FUSE file through the page cache and move the loop device onto it (``LOOP_CHANGE_FD``),
        so prefetched chunks pushed into that cache answer the container's reads (see :mod:`fusefs`).
        Not on the FUSE thread: the ioctl waits for FUSE requests."""
        with self._life:
            ino, number = self._ino, self.loop_number
            if (self._page_cached or self.swapped or not self.mounted or number is None or ino is None
                    or self.server is None or not self.fs.cache_opens(ino)):
                return
            try:
                fd = os.open(self.paths.fuse_file, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    loop.change_fd(number, fd)
                finally:
                    os.close(fd)
                self._page_cached = True
            except OSError as e:  # the layer keeps working in direct I/O; prefetch still makes chunks local
                self.fs.cache_opens(ino, False)
                log.warning("layer %s: moving %s onto the page cache failed: %s", self.spec.digest[:19],
                            loop.device_path(number), e)

    def _warm(self, run: list[int]) -> int:
        """Push the (local, verified) chunks ``run`` into the kernel's page cache of the FUSE file, so the
        container's reads of them are answered without a FUSE round trip; bytes pushed (0 when the file is
        served with direct I/O, recorded, swapped away or gone)."""
        ino, server = self._ino, self.server
        if ino is None or server is None or self.swapped or not self._page_cached:
            return 0
        start = self.spec.chunk_span(run[0])[0]
        last_off, last_len = self.spec.chunk_span(run[-1])
        end = last_off + last_len
        pushed = 0
        for off in range(start, end, _STORE_BYTES):
            data = self.cache.read(off, min(_STORE_BYTES, end - off))
            if not server.store(ino, off, data):
                break
            pushed += len(data)
        return pushed

    # -- leaving the data path ----------------------------------------------------------------------
    def swap(self) -> bool:
        """Switch the loop device to the local cache file.  True if it is (now or already) swapped."""
        with self._life:
            if self.swapped:
                return True
            if self._cancel.is_set() or not self.mounted or self.loop_number is None or not self.cache.verified:
                return False  # (a complete, unverified cache: the fill thread hashes it first)
            if not self.hooks.may_swap():
                return False  # housekeeping swaps it once the hold is lifted
            self.cache.flush()  # the bitmap must say "complete" before the kernel depends on the file
            st = loop.status(self.loop_number)
            if st is None:
                raise OSError(errno.ENXIO, f"{loop.device_path(self.loop_number)} is no longer bound")
            fd = self.cache.open_readonly()
            try:
                t0 = time.monotonic()
                loop.change_fd(self.loop_number, fd)
            finally:
                os.close(fd)
            if self.fill_config.direct_io_after_swap:
                try:
                    loop.set_direct_io(self.loop_number, True)
                except OSError as e:
                    log.info("direct I/O on %s refused (%s); the loop reads through the page cache",
                             loop.device_path(self.loop_number), e)
            self.swapped = True
            self._swapped_event.set()
            self._unregister()
            self.hooks.changed(self)
            self.hooks.swapped(self)
            log.info("layer %s swapped to its local file in %.1f ms; FUSE is off its data path",
                     self.spec.digest[:19], (time.monotonic() - t0) * 1e3)
            return True

    def wait_swapped(self, timeout: float | None) -> bool:
        return self._swapped_event.wait(timeout)

    # -- teardown ------------------------------------------------------------------------------------
    def stop_workers(self, timeout: float = 10.0) -> None:
        self._cancel.set()
        deadline = time.monotonic() + timeout
        for t in [self._fill_thread, *self._prefetch_threads]:
            if t is not None and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._fill_thread = None
        self._prefetch_threads = []

    def teardown(self, *, drop_cache: bool = False, force: bool = False) -> None:
        """Unmount and release everything; the layer object is finished afterwards.

        A mount still in use (an overlay above it) raises :class:`LayerBusy` and leaves the layer intact,
        unless ``force``: then the mount is detached lazily and, if the layer still reads through FUSE, its
        open FUSE file keeps being served (from this object) until its last user goes."""
        # Workers first and outside the lifecycle lock: the fill thread takes that lock to swap.
        self.stop_workers()
        with self._life:
            busy = False
            if self.mounted and mnt.mounts_at(self.paths.mountpoint):
                try:
                    mnt.umount(self.paths.mountpoint)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    if not force:
                        self._cancel.clear()
                        self.start_fill()
                        raise LayerBusy(errno.EBUSY, f"{self.paths.mountpoint} is in use") from e
                    mnt.umount(self.paths.mountpoint, detach=True)
                    busy = True
                    log.warning("%s was in use: detached lazily", self.paths.mountpoint)
            self.mounted = False
            number, self.loop_number = self.loop_number, None
            if number is not None and not busy:
                self._ensure_detached(number)
            self._unregister()  # the name goes; a file the loop device still holds stays served
            with contextlib.suppress(OSError):
                self.paths.mountpoint.rmdir()
            self.hooks.changed(self)
            if busy and not self.swapped:
                return  # the cache must stay open for the detached mount's remaining reads
            if drop_cache:
                self.cache.drop()  # a swapped loop device keeps reading the unlinked file until it goes
            else:
                self.cache.close()

    def _ensure_detached(self, number: int) -> None:
        """Autoclear detaches the device when the mount goes; make sure it did and it is not ours anymore."""
        st = loop.status(number)
        if st is None or st.file_name != self._loop_name():
            return
        with contextlib.suppress(OSError):
            loop.detach(number)

    def close(self) -> None:
        """Daemon shutdown: stop workers and flush; mounts, loop devices and FUSE names stay as they are."""
        self.stop_workers()
        with contextlib.suppress(OSError):
            self.cache.flush()

    # -- status --------------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        return {
            "digest": self.spec.digest,
            "wire_digest": self.spec.fetch_digest,  # the blob the registry serves for it (index format 3: not `digest`)
            "size": self.spec.size,
            "chunk_size": self.spec.chunk_size,
            "chunks": self.spec.n_chunks,
            "chunks_local": self.cache.present_chunks,
            "verified": self.cache.verified,
            "blob_mismatches": self.blob_mismatches,
            "bytes_local": self.cache.local_bytes(),
            "fetched": self.fetcher.stats.as_dict(),
            "fuse": dict(self.io),
            "mounted": self.mounted,
            "swapped": self.swapped,
            "mountpoint": str(self.paths.mountpoint),
            "loop": loop.device_path(self.loop_number) if self.loop_number is not None else None,
            "last_error": self.last_error,
        }
