"""The FUSE side: one flat, read-only directory with one file per lazily served blob.

**Process and thread model — and why.**  pyfuse3 keeps its session in module globals, so a process has at
most one FUSE mount; every blob of the daemon is a file in that one mount, registered and removed at run
time through a thread-safe table (:meth:`BlobFS.add` / :meth:`BlobFS.remove`) that the request handlers
consult on each lookup.  :class:`FuseServer` runs pyfuse3's trio main loop in a dedicated thread
(``bootseer-fuse``); everything else of the daemon — gRPC handlers, the layer manager, background fill —
runs in other threads.  That split is not a style choice:

* Mounting erofs, configuring a loop device on a FUSE file, ``LOOP_CHANGE_FD``, unmounting, and every read
  of an erofs mount go through *our own* FUSE file.  The thread issuing such a syscall sleeps in the kernel
  until the FUSE requests it caused are answered — by the FUSE thread.  Issued from the FUSE thread itself
  they would deadlock the daemon; from any other thread they are ordinary blocking calls.  (The syscalls
  release the GIL — ctypes for mount/umount, ``fcntl.ioctl`` for the loop ioctls — so the FUSE thread can
  run Python while another thread waits in the kernel.)
* Request handlers never block: a read whose chunks are all local is answered on the loop with one
  ``pread`` of the cache file; any read that needs the network runs in a trio worker thread
  (``trio.to_thread``, bounded by a capacity limiter), so one slow fetch never stalls other requests.

**Direct I/O, and the page cache for prefetched data.** A blob file is first opened with ``direct_io``: the
loop device's reads bypass the page cache of the FUSE file and reach us as they are — the only cached copy of
the layer is the erofs mount's, a read arrives as one request however large (the fetcher turns it into one
range request), and the recorder sees every read. Once a hot-block prefetch starts for the layer (and
``page_cache`` is on, the default), the layer re-opens the file through the page cache
(:meth:`BlobFS.cache_opens`, then ``LOOP_CHANGE_FD`` to the new descriptor) and pushes every chunk the
prefetch made local into that cache (:meth:`FuseServer.store`, FUSE's ``notify_store``): the container's reads
of prefetched data are then answered by the kernel — loop device → page cache — without a FUSE round trip, the
daemon's GIL or a thread switch (most FUSE reads of a prefetched start-up disappear; figures in
docs/bench/design-measurements.md). The price is a second, compressed copy of the hot set next to the erofs
mount's decompressed one, until the layer leaves FUSE; blobs are content-addressed and inode numbers never
reused, so a cached page can never be stale. Why not the page cache from the start: the kernel then splits
every read into 128 KiB read-ahead requests, one range request each — a start-up without prefetch made twice
the requests and was slower. While an access log is active (``bootseer record``) files stay in direct I/O and
nothing is pushed: a pushed page would hide the read it answers. Attributes never change while a blob is
registered, so attribute timeouts are long; names are removed when a layer leaves FUSE, so entry timeouts are
short.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyfuse3
import trio

from snapshotter.lazy import mount as mnt

log = logging.getLogger("bootseer.lazy.fuse")

_ATTR_TIMEOUT = 3600.0
_ENTRY_TIMEOUT = 1.0

AccessLog = Callable[[str, int, int, int], None]  # (blob name, offset, length, time.monotonic_ns())


class BlobSource(Protocol):
    """What a FUSE file reads from (a lazy layer implements it)."""

    @property
    def size(self) -> int: ...

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes if every covering chunk is local, else None.  Runs on the FUSE loop: no network."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """The bytes, fetching what is missing; blocks; raises OSError.  Runs in a worker thread."""
        ...


@dataclass
class FileStats:
    reads: int = 0  # FUSE read requests
    bytes: int = 0
    cached: int = 0  # of which answered on the loop from local chunks
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"reads": self.reads, "bytes": self.bytes, "cached": self.cached, "errors": self.errors}


@dataclass
class _File:
    ino: int
    name: str
    source: BlobSource
    size: int
    mtime_ns: int
    opens: int = 0
    linked: bool = True
    want_cache: bool = False  # opens go through the page cache (the layer moves its loop device onto one)
    stats: FileStats = field(default_factory=FileStats)


class BlobFS(pyfuse3.Operations):
    """The operations; a plain object (its async methods can be driven by trio without a kernel)."""

    enable_writeback_cache = False

    def __init__(self, *, threads: int = 16, access_log: AccessLog | None = None, page_cache: bool = True) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}  # by inode; kept while open even after remove()
        self._names: dict[str, int] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._limiter = trio.CapacityLimiter(max(1, threads))
        self._uid, self._gid = os.getuid(), os.getgid()
        self._born = time.time_ns()
        self.access_log = access_log
        self.page_cache = page_cache

    # -- registry (any thread) -----------------------------------------------------------------------
    def add(self, name: str, source: BlobSource) -> int:
        """Make ``name`` appear in the directory; returns its inode.  Idempotent for the same source."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad file name {name!r}")
        with self._lock:
            ino = self._names.get(name)
            if ino is not None:
                if self._files[ino].source is source:
                    return int(ino)
                raise FileExistsError(errno.EEXIST, f"{name} is already served")
            ino = self._next_ino  # never reused: the kernel may still cache an old inode number
            self._next_ino += 1
            self._files[ino] = _File(ino, name, source, source.size, time.time_ns())
            self._names[name] = ino
            return int(ino)

    def remove(self, name: str) -> bool:
        """Unlink ``name``.  Open files (a loop device not yet switched away) keep being served."""
        with self._lock:
            ino = self._names.pop(name, None)
            if ino is None:
                return False
            f = self._files[ino]
            f.linked = False
            if f.opens == 0:
                del self._files[ino]
            return True

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def stats(self, name: str) -> FileStats | None:
        with self._lock:
            ino = self._names.get(name)
            return None if ino is None else self._files[ino].stats

    def cache_opens(self, ino: int, on: bool = True) -> bool:
        """Make the next opens of ``ino`` go through the page cache (or, ``on=False``, back to direct I/O);
        False (nothing changes) when the page cache is off in this daemon or a recording runs."""
        with self._lock:
            f = self._files.get(ino)
            if f is None or (on and (not self.page_cache or self.access_log is not None)):
                return False
            f.want_cache = on
            return True

    def open_count(self, name: str) -> int:
        with self._lock:
            ino = self._names.get(name)
            return 0 if ino is None else self._files[ino].opens

    # -- helpers -------------------------------------------------------------------------------------
    def _get(self, ino: int) -> _File:
        f = self._files.get(ino)
        if f is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return f

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = _ENTRY_TIMEOUT
        a.attr_timeout = _ATTR_TIMEOUT
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_blksize = 1 << 20
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._born
            return a
        f = self._get(ino)
        a.st_mode = stat.S_IFREG | 0o444
        a.st_nlink = 1 if f.linked else 0
        a.st_size = f.size
        a.st_blocks = (f.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = f.mtime_ns
        return a

    # -- metadata ------------------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        nm = os.fsdecode(name)
        if nm in (".", ".."):
            return self._attr(pyfuse3.ROOT_INODE)
        with self._lock:
            ino = self._names.get(nm)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        with self._lock:
            return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The offset handed back is the inode number: inodes only grow, so a listing that races with
        # add/remove neither repeats nor skips a name that stayed.
        with self._lock:
            entries = sorted((ino, f.name) for ino, f in self._files.items() if f.linked and ino > start_id)
        for ino, name in entries:
            with self._lock:
                if ino not in self._files:
                    continue
                attr = self._attr(ino)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, ino):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        with self._lock:
            s.f_blocks = sum((f.size + 4095) // 4096 for f in self._files.values())
            s.f_files = len(self._files) + 1
        s.f_bfree = s.f_bavail = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        with self._lock:
            f = self._get(inode)
            direct = not (f.want_cache and self.page_cache) or self.access_log is not None
            f.opens += 1
        # keep_cache: the content never changes (content-addressed, inode numbers never reused)
        return pyfuse3.FileInfo(fh=inode, direct_io=direct, keep_cache=not direct)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off >= f.size or size <= 0:
            return b""
        size = min(size, f.size - off)
        st = f.stats
        st.reads += 1
        if self.access_log is not None:
            try:
                self.access_log(f.name, off, size, time.monotonic_ns())
            except Exception:  # a broken recorder must not break reads
                log.exception("access log hook failed; disabling it")
                self.access_log = None
        try:
            data = f.source.read_cached(off, size)
            if data is not None:
                st.cached += 1
            else:
                data = await trio.to_thread.run_sync(f.source.read, off, size, limiter=self._limiter)
        except OSError as e:
            st.errors += 1
            log.error("read %s @%d+%d: %s", f.name, off, size, e.strerror or e)
            raise pyfuse3.FUSEError(errno.EIO) from e
        except Exception as e:
            st.errors += 1
            log.exception("read %s @%d+%d failed unexpectedly", f.name, off, size)
            raise pyfuse3.FUSEError(errno.EIO) from e
        st.bytes += len(data)
        return data

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # read-only: nothing to sync (LOOP_CHANGE_FD fsyncs the new backing file)

    async def release(self, fh: int) -> None:
        with self._lock:
            f = self._files.get(fh)
            if f is None:
                return
            f.opens -= 1
            if f.opens <= 0 and not f.linked:
                del self._files[fh]

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        return None


class FuseServer:
    """Runs :class:`BlobFS` mounted at ``mountpoint`` in a dedicated thread (one per process, see above)."""

    _instance_lock = threading.Lock()
    _running = False

    def __init__(self, fs: BlobFS, mountpoint: Path, *, min_tasks: int = 4, max_tasks: int = 64) -> None:
        self.fs = fs
        self.mountpoint = Path(mountpoint)
        self.min_tasks = min_tasks
        self.max_tasks = max_tasks
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._unmount = True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        with FuseServer._instance_lock:
            if FuseServer._running:
                raise RuntimeError("pyfuse3 supports one FUSE mount per process; a FuseServer is already running")
            FuseServer._running = True
        try:
            stale = mnt.clear_mountpoint(self.mountpoint)  # a crashed daemon's dead mount: ENOTCONN on access
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            if stale:
                log.info("detached %d stale mount(s) at %s", stale, self.mountpoint)
            self._thread = threading.Thread(target=self._run, name="bootseer-fuse", daemon=True)
            self._thread.start()
            if not self._ready.wait(timeout):
                raise TimeoutError(f"FUSE server did not start within {timeout}s")
            if self._error is not None:
                raise RuntimeError(f"FUSE server failed to start: {self._error}") from self._error
        except BaseException:
            with FuseServer._instance_lock:
                FuseServer._running = False
            raise

    def _options(self) -> set[str]:
        # No max_read: libfuse insists the init() callback sets the same value, and pyfuse3's does not;
        # the size of a read is bounded by the kernel's max_pages (1 MiB with libfuse 3.x) instead.
        return set(pyfuse3.default_options) | {"fsname=bootseer", "subtype=bootseer", "ro"}

    def _run(self) -> None:
        try:
            pyfuse3.init(self.fs, str(self.mountpoint), self._options())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("FUSE loop crashed")
        finally:
            try:
                pyfuse3.close(unmount=self._unmount)
            except Exception:
                log.exception("closing the FUSE session failed")
            with FuseServer._instance_lock:
                FuseServer._running = False
            self._ready.set()
            log.info("FUSE server at %s stopped", self.mountpoint)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await pyfuse3.main(min_tasks=self.min_tasks, max_tasks=self.max_tasks)

    def invalidate(self, name: str) -> None:
        """Drop the kernel's cached dentry of ``name`` (after :meth:`BlobFS.remove`).  Never call this from
        the FUSE thread: it waits for related requests in flight."""
        if not self.alive:
            return
        try:
            pyfuse3.invalidate_entry(pyfuse3.ROOT_INODE, os.fsencode(name))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
                log.debug("invalidate %s: %s", name, e)

    def store(self, ino: int, offset: int, data: bytes) -> bool:
        """Push ``data`` (verified bytes of the blob at ``offset``) into the kernel's page cache of ``ino``, so
        reads of it never reach us; False if that is impossible or not wanted right now (a recording must
        see every read; the kernel forgot the inode; the session is gone).  The caller knows whether its
        loop device reads ``ino`` through the page cache.  Any thread but the FUSE thread; releases the GIL."""
        if not self.alive or self.fs.access_log is not None:
            return False
        try:
            pyfuse3.notify_store(ino, offset, data)
        except OSError as e:  # ENOENT: the kernel forgot the inode; ENOTCONN: the session ended
            log.debug("page-cache store into inode %d @%d: %s", ino, offset, e)
            return False
        return True

    def stop(self, *, unmount: bool = True, timeout: float = 10.0) -> None:
        """End the loop.  ``unmount=False`` leaves the mount for the process's exit to abort — which is what a
        restart does anyway; files still in use by loop devices then fail until the next daemon re-serves them."""
        if self._thread is None:
            return
        self._unmount = unmount
        token = self._token
        if token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError, RuntimeError):
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("FUSE thread did not stop within %.0fs", timeout)
        self._thread = None
