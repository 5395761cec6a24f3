"""The read-only FUSE mount: a thin pyfuse3 adapter over :class:`~ckptfs.reader.Checkpoint`.

Design points (and why):

* **All I/O off the event loop.**  pyfuse3 runs request handlers as trio tasks; a handler that blocked
  on the store would stall every other request.  Reads whose chunks are already in memory are answered
  directly (a slice copy); every other read runs :meth:`Checkpoint.read` via ``trio.to_thread`` under a
  capacity limiter, so many page faults / reads are served in parallel and each can fan out further.
* **Kernel page cache on, ``keep_cache``.**  A checkpoint never changes under a mount, so pages stay
  valid across opens, and ``mmap`` works (``torch.load(mmap=True)``, safetensors) — ``direct_io``
  would forbid shared mmaps on most kernels.  Long attribute/entry timeouts for the same reason.
* **Large reads.**  The kernel asks for at most the FUSE bdi's ``read_ahead_kb`` per sequential step
  (128 KiB by default); after mounting we raise it (root only; skipped otherwise), so a sequential
  reader produces few, large FUSE requests.
* **Pages pushed, not pulled.**  Read-ahead chunks, once fetched and verified, are written into the
  kernel's page cache (``FUSE_NOTIFY_STORE``) by a pusher thread, so a sequential reader mostly finds
  its pages cached and skips the FUSE round trip; without it the single pyfuse3 thread (a copy per
  request, one request at a time) capped a cold local read (docs/bench/design-measurements.md).  Pushing stops
  half a read-ahead window past the last chunk the kernel asked for: the reader must come back through
  FUSE now and then, and those reads are what move read-ahead forward (a reader on cached pages is
  invisible to us).  Each chunk is pushed at most once per inode.
* **EIO, never wrong bytes.**  A chunk that fails its sha256 on every retry, or cannot be fetched at
  all, fails the read with EIO; the page is not filled, so a later access retries.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from bootseer import events
from bootseer.log import redact
from ckptfs import prefetch as ahead
from ckptfs.manifest import ChunkRef, FileEntry
from ckptfs.reader import Checkpoint, ReadState

log = logging.getLogger("ckptfs.fuse")

_TIMEOUT = 3600.0  # attributes never change while mounted
_BLKSIZE = 1 << 20  # st_blksize: makes buffered readers (Python's io) issue 1 MiB reads
DEFAULT_READ_AHEAD_KB = 8192
_PUSH_PIECE = 4 << 20


@dataclass
class _Stream:
    """Per-inode push state: how far pushing may run, and which chunks are already in the kernel."""

    trip: int = -1  # push chunks with index <= trip
    read_to: int = -1  # highest chunk the kernel asked for: no point pushing at or before it
    pushed: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Node:
    path: str
    is_dir: bool
    mode: int
    size: int
    mtime_ns: int
    entry: FileEntry | None = None


class CkptOperations(pyfuse3.Operations):
    """Inode table built once from the manifest; reads delegated to the checkpoint's reader."""

    enable_writeback_cache = False

    def __init__(self, ckpt: Checkpoint, *, threads: int = 16) -> None:
        super().__init__()
        self.ckpt = ckpt
        # every open sets keep_cache: what the kernel was given stays in its page cache
        ckpt.source.consumer_keeps_pages = True
        self._limiter = trio.CapacityLimiter(max(1, threads))
        self._uid, self._gid = os.getuid(), os.getgid()
        self._nodes: dict[int, _Node] = {}
        self._by_path: dict[str, int] = {}
        self._fh: dict[int, tuple[int, FileEntry, ReadState]] = {}
        # per open file: when it was opened and the bytes served to it, for the start-up profile's
        # "checkpoint_load" (open → release), written at release
        self._loads: dict[int, tuple[events.Stamp, list[int]]] = {}
        self._streams: dict[int, _Stream] = {}
        self.pusher: PagePusher | None = None
        self._fh_ids = itertools.count(1)
        self.reads = 0  # FUSE read requests served
        self.read_bytes = 0
        self.fast_reads = 0  # answered from memory on the event loop, without a thread hop
        self.pushed_bytes = 0  # written into the kernel page cache ahead of the reader
        m = ckpt.manifest
        newest = max([f.mtime_ns for f in m.files] + [d.mtime_ns for d in m.dirs] + [0])
        self._add(pyfuse3.ROOT_INODE, _Node("", True, 0o555, 0, newest))
        ino = pyfuse3.ROOT_INODE + 1
        for path in _walk(ckpt, ""):
            if ckpt.is_dir(path):
                d = ckpt.dir_entry(path)
                node = _Node(path, True, (d.mode if d else 0o755) & 0o555, 0, d.mtime_ns if d else newest)
            else:
                f = ckpt.file(path)
                node = _Node(path, False, f.mode & 0o555, f.size, f.mtime_ns, f)  # never setuid/setgid/sticky
            self._add(ino, node)
            ino += 1

        # digest -> every (inode, file offset) holding that chunk: where a fetched chunk gets pushed.
        self.locations: dict[str, list[tuple[int, int]]] = {}
        cs = m.chunk_size
        for i, node in self._nodes.items():
            if node.entry is not None:
                for k, c in enumerate(node.entry.chunks):
                    self.locations.setdefault(c.digest, []).append((i, k * cs))

    def _add(self, ino: int, node: _Node) -> None:
        self._nodes[ino] = node
        self._by_path[node.path] = ino

    def _node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self._node(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = _TIMEOUT
        a.attr_timeout = _TIMEOUT
        a.st_mode = (stat.S_IFDIR if n.is_dir else stat.S_IFREG) | n.mode
        a.st_nlink = 2 if n.is_dir else 1
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_rdev = 0
        a.st_size = n.size
        a.st_blksize = _BLKSIZE
        a.st_blocks = (n.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
        return a

    # -- metadata ------------------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        nm = os.fsdecode(name)
        if nm == ".":
            return self._attr(parent_inode)
        if nm == "..":
            up = parent.path.rsplit("/", 1)[0] if "/" in parent.path else ""
            return self._attr(self._by_path[up])
        ino = self._by_path.get(f"{parent.path}/{nm}" if parent.path else nm)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        names = self.ckpt.listdir(node.path)
        for i in range(start_id, len(names)):
            child = f"{node.path}/{names[i]}" if node.path else names[i]
            ino = self._by_path[child]
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(ino), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.ckpt.manifest.total_bytes + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        assert node.entry is not None
        fh = next(self._fh_ids)
        self._fh[fh] = (inode, node.entry, ReadState())
        # FUSE names the opening *thread*; one of ours is this mount's prefetch, which reports itself
        if not os.path.exists(f"/proc/self/task/{ctx.pid}"):
            self._loads[fh] = (events.now(), [0])
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        # (pyfuse3's stub says bytes; it takes any contiguous buffer, see the fast path below)
        try:
            ino, entry, state = self._fh[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        try:
            data: bytes | memoryview
            ready = self.ckpt.read_ready(entry, off, size, state)
            if ready is None:
                data = await trio.to_thread.run_sync(self.ckpt.read, entry, off, size, state,
                                                     limiter=self._limiter)
            else:
                # A view of the pinned pool buffer, no copy: pyfuse3 replies with it (the kernel
                # copies it) in this same task step, before the loop runs anything else; the pin is
                # released on the loop's next turn, after that reply.
                data, release = ready
                trio.lowlevel.current_trio_token().run_sync_soon(release)
                self.fast_reads += 1
            self.reads += 1
            self.read_bytes += len(data)
            load = self._loads.get(fh)
            if load is not None:
                load[1][0] += len(data)
            if self.pusher is not None and data:
                self._advance(ino, entry, (off + len(data) - 1) // self.ckpt.manifest.chunk_size)
            return data
        except OSError as e:
            log.error("read %s @%d+%d failed: %s", entry.path, off, size, e)
            raise pyfuse3.FUSEError(errno.EIO) from e

    async def release(self, fh: int) -> None:
        opened = self._fh.pop(fh, None)
        load = self._loads.pop(fh, None)
        if opened is not None and load is not None:
            # bytes: what reached FUSE for this open (pages pushed ahead or already cached are not counted)
            events.emit("checkpoint_load", load[0], events.now(), component="ckptfs mount",
                        uri=redact(self.ckpt.store.uri), path=opened[1].path, size=opened[1].size,
                        bytes=load[1][0])

    # -- page pushing --------------------------------------------------------------------------------
    def _advance(self, ino: int, entry: FileEntry, chunk: int) -> None:
        """The kernel read chunk ``chunk`` of ``ino`` through FUSE: let pushing run further ahead."""
        assert self.pusher is not None
        st = self._streams.get(ino)
        if st is None:
            st = self._streams[ino] = _Stream()
        trip = min(len(entry.chunks) - 1, chunk + max(1, self.ckpt.readahead // 2))
        with st.lock:
            st.read_to = max(st.read_to, chunk)
            if trip <= st.trip:
                return
            first = max(st.trip + 1, chunk + 1)
            st.trip = trip
            todo = [k for k in range(first, trip + 1) if k not in st.pushed]
        for k in todo:
            self.pusher.offer(ino, k)

    def on_fetched(self, ref: ChunkRef) -> None:
        """A chunk became available: push it wherever pushing has been allowed to reach."""
        if self.pusher is None:
            return
        cs = self.ckpt.manifest.chunk_size
        for ino, off in self.locations.get(ref.digest, ()):
            st = self._streams.get(ino)
            if st is not None and st.read_to < off // cs <= st.trip:
                self.pusher.offer(ino, off // cs)

    def push(self, ino: int, k: int) -> bool:
        """Push chunk ``k`` of ``ino`` if it is in memory and not pushed yet; False if the kernel
        refuses pushes altogether."""
        node = self._nodes[ino]
        st = self._streams[ino]
        assert node.entry is not None
        with st.lock:
            if k in st.pushed or k <= st.read_to:
                return True
        ref = node.entry.chunks[k]
        off = k * self.ckpt.manifest.chunk_size
        with self.ckpt.source.pinned_if_ready(ref) as view:
            if view is None:
                return True  # not fetched yet: on_fetched offers it again
            with st.lock:
                if k in st.pushed:
                    return True
                st.pushed.add(k)
            for lo in range(0, len(view), _PUSH_PIECE):
                try:
                    # pyfuse3 takes any contiguous buffer here (its stub says bytes): no copy.
                    pyfuse3.notify_store(ino, off + lo, view[lo : lo + _PUSH_PIECE])  # type: ignore[arg-type]
                except OSError as e:
                    if e.errno == errno.ENOENT:  # inode dropped from the kernel's cache meanwhile
                        return True
                    log.info("page push disabled: %s", e)
                    return False
                self.pushed_bytes += min(_PUSH_PIECE, len(view) - lo)
        return True


class PagePusher:
    """The thread that runs :meth:`CkptOperations.push`.

    ``notify_store`` waits for page locks, and a FUSE read in flight holds the locks of its pages until
    the event loop answers it — so pushing must never run inside a read handler or inside a fetch that
    a read handler waits for.  Failures only cost the speed-up (the kernel then asks with a normal
    read), so they are logged once and pushing stops.
    """

    def __init__(self, ops: CkptOperations) -> None:
        self._ops = ops
        self._q: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="ckptfs-push", daemon=True)
        self._enabled = True

    def start(self) -> None:
        self._thread.start()

    def offer(self, ino: int, k: int) -> None:
        if self._enabled:
            self._q.put((ino, k))

    def stop(self) -> None:
        """Stop pushing.  A push blocked on a page lock of an unanswered read is abandoned (the
        unmount that follows aborts it) rather than waited for."""
        self._enabled = False
        self._q.put(None)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            log.warning("page pusher still blocked at shutdown; abandoning it")

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._enabled and not self._ops.push(*item):
                self._enabled = False


def _walk(ckpt: Checkpoint, path: str) -> list[str]:
    out: list[str] = []
    for name in ckpt.listdir(path):
        child = f"{path}/{name}" if path else name
        out.append(child)
        if ckpt.is_dir(child):
            out.extend(_walk(ckpt, child))
    return out


def _raise_read_ahead(mountpoint: str, kb: int) -> None:
    """Set the mount's bdi read-ahead so sequential reads arrive as large, parallel FUSE requests."""
    st = os.stat(mountpoint)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:  # not root, or a kernel without per-bdi sysfs: correct, only slower
        log.info("could not raise read-ahead (%s): %s", path, e)


def mount(
    ckpt: Checkpoint,
    mountpoint: str,
    *,
    threads: int = 16,
    allow_other: bool = False,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    push_pages: bool = True,
    handle_signals: bool = True,
    on_ready: Callable[[], None] | None = None,
    prefetch: Sequence[str] = (),
    prefetch_max_bytes: int | None = None,
) -> None:
    """Mount ``ckpt`` read-only at ``mountpoint`` and serve until SIGINT/SIGTERM or an external unmount.

    Blocks; always unmounts before returning.  ``on_ready`` runs once the mount answers requests.
    ``prefetch``: patterns of files read into the page cache once the mount is up, at most
    ``prefetch_max_bytes`` (default: half the available memory) — :mod:`ckptfs.prefetch`.
    """
    if not os.path.isdir(mountpoint):
        raise NotADirectoryError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise OSError(errno.EBUSY, f"{mountpoint} is already a mount point")
    ops = CkptOperations(ckpt, threads=threads)
    options = set(pyfuse3.default_options) | {"fsname=ckptfs", "subtype=ckptfs", "ro"}
    if allow_other:
        options.add("allow_other")

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    planned = ahead.plan(((f.path, f.size) for f in ckpt.manifest.files), prefetch,
                         ahead.default_max_bytes() if prefetch_max_bytes is None else prefetch_max_bytes)
    if prefetch and not planned:
        log.warning("prefetch: no file of the checkpoint matches %s (or no memory to spare)", list(prefetch))

    async def when_up() -> None:
        await trio.to_thread.run_sync(_raise_read_ahead, mountpoint, read_ahead_kb)
        if on_ready is not None:
            on_ready()
        if planned:  # a thread of its own: its reads are served by this loop
            threading.Thread(target=ahead.read_into_page_cache, args=(mountpoint, planned),
                             name="ckptfs-prefetch", daemon=True).start()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(watch_signals)
            nursery.start_soon(when_up)
            await pyfuse3.main(min_tasks=2, max_tasks=max(8, threads * 2))
            nursery.cancel_scope.cancel()

    # Until trio takes SIGTERM over, let it unwind like Ctrl-C so the mount is still removed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if handle_signals else None
    try:
        pyfuse3.init(ops, mountpoint, options)
        pusher = PagePusher(ops) if push_pages else None
        if pusher is not None:
            ops.pusher = pusher
            pusher.start()
            ckpt.source.on_fetched = ops.on_fetched
        try:
            trio.run(serve)
        finally:
            if pusher is not None:
                ckpt.source.on_fetched = None
                pusher.stop()
                ops.pusher = None
            pyfuse3.close(unmount=True)
            st = ckpt.source.stats
            log.info("served %d reads (%d from memory on the loop), %d bytes, pushed %d bytes; fetched %d "
                     "bytes in %d reads (%d retries, %d corrupt), %d bytes from the disk cache", ops.reads,
                     ops.fast_reads, ops.read_bytes, ops.pushed_bytes, st.store_bytes, st.store_reads,
                     st.retries, st.corrupt, st.cache_bytes)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
