"""The parallel striped reader: the core under both the FUSE mount and the Python API.

A read of a byte range becomes chunk requests.  Chunks come, in order of preference, from

1. the in-memory pool (chunks fetched or prefetched recently; bounded by ``memory_budget``),
2. the on-disk :class:`~ckptfs.cache.DigestCache` (verified again before use: disks rot too),
3. the store, by a ranged read of the chunk's stripe object, verified against its sha256 and retried
   with backoff on any failure — a mismatch included, since a bad proxy or a torn connection is more
   likely than bad bytes at rest.  Only when every attempt failed does the read fail, with EIO.

Sequential reading (a file handle whose reads follow each other) triggers read-ahead of the next
``readahead`` chunks on a thread pool.  Because consecutive chunks sit on consecutive stripes, that
read-ahead is what turns one reader into ``stripes`` parallel streams, each limited only by its own
per-connection rate.  A single large read (``torch.load`` reads a whole tensor at once) is spread the
same way.  The pool never holds more than ``memory_budget`` bytes for read-ahead: read-ahead stops
when it would exceed it, and only chunks already read from are evicted for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from bootseer import events
from bootseer.log import redact
from ckptfs.cache import DigestCache
from ckptfs.errors import CheckpointNotFound, ChunkReadError, CorruptChunkError
from ckptfs.manifest import MANIFEST_NAME, ChunkRef, DirEntry, FileEntry, Manifest, normalise_path
from ckptfs.store import Store, StoreOptions, open_store

log = logging.getLogger("ckptfs")

DEFAULT_THREADS = 16
DEFAULT_MEMORY_BUDGET = 2 << 30
_KEEP_READ_CHUNKS = 4  # chunks already read from that stay pooled for near re-reads (mmap, zip lookups)


@dataclass
class ReaderOptions:
    threads: int = DEFAULT_THREADS  # concurrent store reads
    readahead: int | None = None  # chunks ahead of a sequential reader; None: 2 × stripes (≥ 4)
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of chunks held in memory
    retries: int = 3  # extra attempts per chunk before EIO
    backoff: float = 0.05  # seconds before the first retry; doubles, capped at 2 s
    cache: DigestCache | None = None
    verify: bool = True  # sha256 every chunk before serving it (turn off only to measure its cost)


@dataclass
class ReadStats:
    store_bytes: int = 0
    store_reads: int = 0
    cache_bytes: int = 0
    retries: int = 0
    corrupt: int = 0


class _Entry:
    __slots__ = ("buf", "future", "length", "pins", "used")

    def __init__(self, length: int) -> None:
        self.future: Future[None] = Future()
        self.buf: mmap.mmap | None = None
        self.length = length
        self.pins = 0
        self.used = False  # read from at least once: evictable for read-ahead

    def view(self) -> memoryview:
        assert self.buf is not None
        return memoryview(self.buf)[: self.length]


@dataclass
class ReadState:
    """Per-handle sequential-access detector (one per open file / FUSE file handle)."""

    last_end: int = -1
    ahead_to: int = 0  # chunks before this index were already handed to read-ahead
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, offset: int, end: int, chunk_size: int) -> bool:
        """Record a read; True when it continues the previous one closely enough to read ahead.

        The slack of one chunk either way tolerates the kernel's concurrent, slightly reordered
        read-ahead requests.  A jump resets the read-ahead mark, so a re-read is read ahead again.
        """
        with self.lock:
            seq = offset == 0 or (self.last_end >= 0 and self.last_end - chunk_size <= offset <= self.last_end
                                  + chunk_size)
            if seq:
                self.last_end = max(self.last_end, end)
            else:
                self.last_end = end
                self.ahead_to = 0
            return seq


class ChunkSource:
    """Verified chunk bytes by :class:`ChunkRef`, with a bounded pool, prefetch, disk cache and retries.

    Chunk buffers are recycled rather than allocated per chunk: on a VM, first-touching fresh memory
    (page faults, zeroing) cost more system time than the reads themselves and capped a cold read at a
    third of the disk's speed.  A buffer goes back to the free list when its chunk is evicted, and is
    never reused while a reader has the chunk pinned.
    """

    def __init__(self, store: Store, manifest: Manifest, opts: ReaderOptions) -> None:
        if opts.threads <= 0 or opts.memory_budget <= 0 or opts.retries < 0:
            raise ValueError("threads and memory budget must be positive, retries not negative")
        self.store = store
        self.manifest = manifest
        self.opts = opts
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._pool: OrderedDict[str, _Entry] = OrderedDict()  # digest -> entry, least recent first
        self._used = 0
        self._free: list[mmap.mmap] = []
        self._exec = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="ckptfs-fetch")
        self._closed = False
        # Called (in the fetching thread, after waiters were released) for each chunk that became
        # available; the FUSE adapter uses it to push chunks into the kernel's page cache.
        self.on_fetched: Callable[[ChunkRef], None] | None = None
        # Set by the FUSE adapter: what was read from a chunk stays in the kernel's page cache, so a chunk
        # recycled after use is not read ahead again (see :meth:`prefetch`).
        self.consumer_keeps_pages = False
        self._delivered: set[str] = set()  # digests recycled after use while consumer_keeps_pages

    # -- buffers -------------------------------------------------------------------------------------
    def _take_buffer(self) -> mmap.mmap:
        """A chunk buffer: a free one, else the least recent chunk already read from, else a new one.

        Recycling read chunks before allocating keeps the resident set at about read-ahead + in-flight
        chunks instead of the whole budget; re-reads are the page cache's (FUSE) or the disk cache's job.
        """
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._used_entries_locked() > _KEEP_READ_CHUNKS:
                for digest, e in self._pool.items():
                    if e.used and not e.pins and e.buf is not None and e.future.done():
                        del self._pool[digest]
                        self._used -= e.length
                        self._retire_locked(digest)
                        buf, e.buf = e.buf, None
                        return buf
        # Anonymous mmap: page-aligned, as O_DIRECT reads into it require.
        return mmap.mmap(-1, self.manifest.chunk_size, flags=mmap.MAP_PRIVATE)

    def _used_entries_locked(self) -> int:
        return sum(1 for e in self._pool.values() if e.used and not e.pins)

    def _retire_locked(self, digest: str) -> None:
        if self.consumer_keeps_pages:
            self._delivered.add(digest)

    def _give_buffer_locked(self, buf: mmap.mmap | None) -> None:
        if buf is not None and (len(self._free) + 1) * len(buf) <= self.opts.memory_budget:
            self._free.append(buf)

    # -- fetching ------------------------------------------------------------------------------------
    def _fill(self, ref: ChunkRef, entry: _Entry) -> None:
        """Load the chunk into a buffer of ``entry`` (sets ``entry.buf`` only on success)."""
        buf = self._take_buffer()
        try:
            self._load(ref, memoryview(buf)[: ref.length])
        except BaseException:
            with self._lock:
                self._give_buffer_locked(buf)
            raise
        entry.buf = buf

    def has(self, ref: ChunkRef) -> bool:
        """Whether the chunk is pooled or being fetched (a read of it should wait for that, not refetch)."""
        with self._lock:
            return ref.digest in self._pool

    def read_direct(self, ref: ChunkRef, out: memoryview) -> Future[None]:
        """Fetch ``ref`` on the pool's threads straight into ``out`` (a caller's buffer), verified there.

        No pool buffer and no copy: a large read lands where the caller wants it, with as many chunks
        in flight as there are threads.  ``out`` holds unverified bytes until the future succeeds; on
        failure the caller gets the error, never the bytes.
        """
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed checkpoint")
        return self._exec.submit(self._load, ref, out)

    def _load(self, ref: ChunkRef, out: memoryview) -> None:
        cache = self.opts.cache
        h = hashlib.sha256() if self.opts.verify else None
        if cache is not None and cache.get_into(ref.digest, out, h):
            if h is None or h.hexdigest() == ref.digest:
                with self._lock:
                    self.stats.cache_bytes += ref.length
                return
            log.warning("cached chunk %s is corrupt; dropping it and refetching", ref.digest[:12])
            cache.discard(ref.digest)
        self.fetch_into(ref, out)
        if cache is not None:
            cache.put(ref.digest, out)

    def fetch_into(self, ref: ChunkRef, out: memoryview) -> None:
        """Read ``ref`` from the store into ``out`` and verify it, retrying; EIO-type errors at the end."""
        obj = self.manifest.objects[ref.obj]
        last: str = ""
        corrupt = False
        for attempt in range(self.opts.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(min(self.opts.backoff * 2 ** (attempt - 1), 2.0))
            h = hashlib.sha256() if self.opts.verify else None
            try:
                self.store.read_range_into(obj.path, ref.offset, out, h)
            except OSError as e:
                last, corrupt = f"{type(e).__name__}: {e}", False
                log.warning("reading chunk %s from %s failed (attempt %d): %s", ref.digest[:12], obj.path,
                            attempt + 1, last)
                continue
            with self._lock:
                self.stats.store_bytes += ref.length
                self.stats.store_reads += 1
            if h is not None and h.hexdigest() != ref.digest:
                last, corrupt = "sha256 mismatch", True
                with self._lock:
                    self.stats.corrupt += 1
                log.warning("chunk %s at %s+%d failed verification (attempt %d)", ref.digest[:12], obj.path,
                            ref.offset, attempt + 1)
                continue
            return
        where = f"{self.store.uri}: {obj.path} @ {ref.offset} (+{ref.length})"
        if corrupt:
            raise CorruptChunkError(f"chunk {ref.digest[:16]} is corrupt in the store ({where})")
        raise ChunkReadError(f"cannot read chunk {ref.digest[:16]} ({where}): {last}")

    def _complete(self, digest: str, entry: _Entry) -> None:
        """Done-callback: a failed fetch leaves the pool so the next reader retries from scratch."""
        if entry.future.exception() is not None:
            with self._lock:
                if self._pool.get(digest) is entry:
                    del self._pool[digest]
                    self._used -= entry.length

    def _run(self, ref: ChunkRef, entry: _Entry) -> None:
        if not entry.future.set_running_or_notify_cancel():
            return
        try:
            self._fill(ref, entry)
        except BaseException as e:
            entry.future.set_exception(e)
        else:
            entry.future.set_result(None)
            hook = self.on_fetched
            if hook is not None:
                hook(ref)

    # -- pool ----------------------------------------------------------------------------------------
    def _evict_locked(self, need: int, *, demand: bool) -> bool:
        """Make room for ``need`` bytes; read-ahead may only push out chunks someone already read."""
        if self._used + need <= self.opts.memory_budget:
            return True
        for digest in list(self._pool):
            e = self._pool[digest]
            if e.pins or not e.future.done() or not (e.used or demand):
                continue
            del self._pool[digest]
            self._used -= e.length
            if e.used:
                self._retire_locked(digest)
            self._give_buffer_locked(e.buf)
            e.buf = None
            if self._used + need <= self.opts.memory_budget:
                return True
        return False

    def _new_entry_locked(self, ref: ChunkRef) -> _Entry:
        e = _Entry(ref.length)
        self._pool[ref.digest] = e
        self._used += ref.length
        digest = ref.digest

        def done(_f: Future[None]) -> None:
            self._complete(digest, e)

        e.future.add_done_callback(done)
        return e

    def prefetch(self, refs: Iterable[ChunkRef]) -> int:
        """Start fetching ``refs`` in the background, in order, until the memory budget is reached.

        Returns how many of ``refs`` (from the start) are now pooled, in flight or passed over.  Passed over,
        when ``consumer_keeps_pages``: chunks already read from and recycled.  Their bytes sit in the kernel's
        page cache, which answers the reader without asking us; reading them ahead again fetched them for
        nobody — with two readers on one file (the mount's prefetch and the job's ``torch.load``) each one's
        read-ahead refetched what the other had already delivered (docs/bench/design-measurements.md).
        """
        n = 0
        for ref in refs:
            with self._lock:
                if self._closed:
                    return n
                if ref.digest in self._delivered:
                    n += 1
                    continue
                if ref.digest not in self._pool:
                    if not self._evict_locked(ref.length, demand=False):
                        return n
                    e = self._new_entry_locked(ref)
                    self._exec.submit(self._run, ref, e)
            n += 1
        return n

    @contextlib.contextmanager
    def chunk(self, ref: ChunkRef) -> Iterator[memoryview]:
        """Pin the chunk's verified bytes for the duration of the ``with`` block (fetching if needed).

        A chunk not already pooled or in flight is fetched in the calling thread, so a demand read
        never waits behind queued read-ahead.
        """
        with self._lock:
            e = self._pool.get(ref.digest)
            if e is not None:
                self._pool.move_to_end(ref.digest)
                e.pins += 1
                mine = False
            else:
                if ref.digest in self._delivered:
                    # asked again for a chunk it had: the page cache let pages go (memory pressure, a
                    # drop_caches), so read-ahead must fetch what it passes over again
                    self._delivered.clear()
                self._evict_locked(ref.length, demand=True)  # demand reads proceed even over budget
                e = self._new_entry_locked(ref)
                e.pins = 1
                mine = True
        try:
            if mine:
                self._run(ref, e)
            e.future.result()
            e.used = True
            yield e.view()
        finally:
            with self._lock:
                e.pins -= 1

    @contextlib.contextmanager
    def pinned_if_ready(self, ref: ChunkRef) -> Iterator[memoryview | None]:
        """Pin the chunk if it is in memory and verified (yields its bytes), else yield ``None``."""
        with self._lock:
            e = self._pool.get(ref.digest)
            if e is None or not e.future.done() or e.future.exception() is not None or e.buf is None:
                e = None
            else:
                e.pins += 1
        if e is None:
            yield None
            return
        try:
            yield e.view()
        finally:
            with self._lock:
                e.pins -= 1
                e.used = True

    def peek_slice(self, ref: ChunkRef, lo: int, hi: int) -> tuple[memoryview, Callable[[], None]] | None:
        """``[lo, hi)`` of the chunk, pinned, if already fetched and verified, else ``None``.

        Never blocks on I/O, which lets the FUSE loop answer it without a thread hop, and copies
        nothing: the caller gets a view of the pool buffer and must call the returned ``release`` once
        it is done with it (until then the buffer cannot be recycled).
        """
        with self._lock:
            e = self._pool.get(ref.digest)
            if e is None or not e.future.done() or e.future.exception() is not None or e.buf is None:
                return None
            self._pool.move_to_end(ref.digest)
            e.used = True
            e.pins += 1
        entry = e

        def release() -> None:
            with self._lock:
                entry.pins -= 1

        return entry.view()[lo:hi], release

    def wait_idle(self) -> None:
        """Wait until every fetch started so far (read-ahead included) has ended, so counters are final."""
        with self._lock:
            futs = [e.future for e in self._pool.values()]
        wait(futs)

    @property
    def pooled_bytes(self) -> int:
        return self._used

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._exec.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._pool.clear()
            self._free.clear()
            self._used = 0


def _nothing() -> None:
    return None


def alloc_buffer(size: int) -> memoryview:
    """A writable, page-aligned buffer of ``size`` bytes, not touched yet.

    An anonymous mapping rather than a ``bytearray``: ``bytearray(n)`` zeroes all ``n`` bytes in the
    calling thread before the first read starts (a serial pass over the whole file), whereas a
    mapping's pages are zero-filled by the kernel on first touch, i.e. in whichever fetch thread fills
    them; and page alignment lets local reads use O_DIRECT straight into it.
    """
    if size <= 0:
        return memoryview(bytearray(0))
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


def load_manifest(store: Store) -> Manifest:
    try:
        raw = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError as e:
        raise CheckpointNotFound(
            f"no checkpoint at {store.uri} (no {MANIFEST_NAME}: nothing stored there, or a put has not finished)"
        ) from e
    except OSError as e:
        if not store.exists(MANIFEST_NAME):
            raise CheckpointNotFound(
                f"no checkpoint at {store.uri} (no {MANIFEST_NAME}: nothing stored there, or a put has not "
                "finished)"
            ) from e
        raise
    return Manifest.from_json(raw)


class Checkpoint:
    """An opened checkpoint: its tree, and parallel reads of its files.

    Thread-safe; one instance serves any number of concurrent readers (the FUSE mount uses one).
    """

    def __init__(
        self,
        uri: str | Store,
        *,
        store_options: StoreOptions | None = None,
        reader_options: ReaderOptions | None = None,
    ) -> None:
        self.store = uri if isinstance(uri, Store) else open_store(uri, store_options)
        try:
            self.manifest = load_manifest(self.store)
        except BaseException:
            self.store.close()
            raise
        self.opts = reader_options or ReaderOptions()
        ra = self.opts.readahead if self.opts.readahead is not None else max(4, 2 * self.manifest.stripes)
        # Never plan more read-ahead than the budget can hold beside the chunk being read.
        self.readahead = max(0, min(ra, self.opts.memory_budget // max(1, self.manifest.chunk_size) - 1))
        self.source = ChunkSource(self.store, self.manifest, self.opts)
        self._files = {f.path: f for f in self.manifest.files}
        self._dirs: dict[str, DirEntry] = {d.path: d for d in self.manifest.dirs}
        self._children: dict[str, list[str]] = {"": []}
        for p in sorted(set(self._dirs) | set(self._files)):
            parent = p.rsplit("/", 1)[0] if "/" in p else ""
            # Parents the manifest does not list (hand-made manifests) still appear as directories.
            anc = parent
            while anc and anc not in self._children:
                self._children[anc] = []
                up = anc.rsplit("/", 1)[0] if "/" in anc else ""
                self._children.setdefault(up, []).append(anc.rsplit("/", 1)[-1])
                anc = up
            self._children.setdefault(parent, []).append(p.rsplit("/", 1)[-1])
            if p in self._dirs:
                self._children.setdefault(p, [])

    # -- tree ----------------------------------------------------------------------------------------
    def file(self, path: str) -> FileEntry:
        key = normalise_path(path)
        f = self._files.get(key)
        if f is None:
            if key in self._children:
                raise IsADirectoryError(f"{key or '/'} is a directory in {self.store.uri}")
            raise FileNotFoundError(f"no file {key!r} in checkpoint {self.store.uri}")
        return f

    def is_dir(self, path: str) -> bool:
        return normalise_path(path) in self._children

    def dir_entry(self, path: str) -> DirEntry | None:
        return self._dirs.get(normalise_path(path))

    def listdir(self, path: str = "") -> list[str]:
        key = normalise_path(path)
        if key not in self._children:
            raise NotADirectoryError(f"no directory {key!r} in checkpoint {self.store.uri}")
        return sorted(self._children[key])

    # -- reads ---------------------------------------------------------------------------------------
    def _read_ahead(self, f: FileEntry, i: int, last: int, state: ReadState | None, seq: bool) -> None:
        """Keep chunks ``i+1 … last`` (the rest of this read) and, if sequential, ``readahead`` more
        in flight.  Each chunk is handed over once per sequential run (``state.ahead_to``), so a chunk
        consumed and recycled is not fetched again behind the reader's back.
        """
        stop = min(len(f.chunks), last + 1 + (self.readahead if seq else 0))
        start = i + 1
        if state is not None:
            with state.lock:
                start = max(start, state.ahead_to)
        if start >= stop:
            return
        n = self.source.prefetch(f.chunks[start:stop])
        if state is not None and seq:
            with state.lock:
                state.ahead_to = max(state.ahead_to, start + n)

    def readinto(self, f: FileEntry, offset: int, buf: memoryview, state: ReadState | None = None) -> int:
        """Fill ``buf`` from ``offset`` of ``f``; returns the byte count (short only at end of file).

        Chunks the read covers whole and that nobody is fetching yet are read by the fetch threads
        straight into ``buf``, all at once; only the partial chunks at either end (and chunks already
        pooled by read-ahead) go through the pool and are copied.  So a large read (``read_file``, a
        tensor's storage) costs no copy and no serial loop, and uses every thread.
        """
        if offset < 0:
            raise ValueError("negative offset")
        end = min(f.size, offset + len(buf))
        if end <= offset:
            return 0
        cs = self.manifest.chunk_size
        first, last = offset // cs, (end - 1) // cs
        seq = state.observe(offset, end, cs) if state is not None else True
        direct: dict[int, Future[None]] = {}
        ok = False
        try:
            for i in range(first, last + 1):
                ref = f.chunks[i]
                lo = i * cs
                if lo >= offset and lo + ref.length <= end and not self.source.has(ref):
                    direct[i] = self.source.read_direct(ref, buf[lo - offset : lo - offset + ref.length])
            if last != first and last not in direct:
                self.source.prefetch([f.chunks[last]])  # the partial tail, beside the head
            # Keep read-ahead going past this read for a sequential reader.
            self._read_ahead(f, last, last, state, seq)
            for i in range(first, last + 1):
                if i in direct:
                    continue
                lo = max(offset, i * cs) - i * cs
                hi = min(end, (i + 1) * cs) - i * cs
                pos = i * cs + lo - offset
                with self.source.chunk(f.chunks[i]) as data:
                    buf[pos : pos + hi - lo] = data[lo:hi]
            ok = True
        finally:
            # Never return (or raise) while a thread may still write into the caller's buffer; after
            # a failure, chunks not started yet are not worth reading.
            futs = list(direct.values())
            if futs:
                done, pending = wait(futs, return_when=FIRST_EXCEPTION)
                if not ok or any(not d.cancelled() and d.exception() is not None for d in done):
                    for p in pending:
                        p.cancel()
                wait(futs)
        for fut in direct.values():
            if not fut.cancelled():
                fut.result()  # the first failure, as EIO / CorruptChunkError
        return end - offset

    def read(self, f: FileEntry, offset: int, size: int, state: ReadState | None = None) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
        end = min(f.size, offset + max(0, size))
        if end <= offset:
            return b""
        cs = self.manifest.chunk_size
        if offset // cs == (end - 1) // cs:  # the common small read: one slice, no extra buffer
            i = offset // cs
            seq = state.observe(offset, end, cs) if state is not None else True
            self._read_ahead(f, i, i, state, seq)
            with self.source.chunk(f.chunks[i]) as data:
                return bytes(data[offset - i * cs : end - i * cs])
        out = bytearray(end - offset)
        self.readinto(f, offset, memoryview(out), state)
        return bytes(out)

    def read_ready(
        self, f: FileEntry, offset: int, size: int, state: ReadState | None = None
    ) -> tuple[memoryview, Callable[[], None]] | None:
        """Like :meth:`read` but only from a chunk already in memory, else ``None``; never blocks on I/O.

        Returns a pinned view of the pool buffer and the ``release`` to call once it was consumed (see
        :meth:`ChunkSource.peek_slice`).  The FUSE adapter answers most sequential reads this way on
        its event loop, skipping a thread hop and a copy per request; anything else goes to
        :meth:`read` on a worker thread.
        """
        end = min(f.size, offset + max(0, size))
        if end <= offset:
            return memoryview(b""), _nothing
        cs = self.manifest.chunk_size
        i = offset // cs
        if i != (end - 1) // cs:
            return None
        got = self.source.peek_slice(f.chunks[i], offset - i * cs, end - i * cs)
        if got is None:
            return None
        seq = state.observe(offset, end, cs) if state is not None else True
        if seq:
            self._read_ahead(f, i, i, state, seq)
        return got

    def read_file(self, path: str, out: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """The whole file, read with all stripes in parallel; ``out`` may be a preallocated buffer.

        Without ``out`` the result is a memoryview of a fresh anonymous mapping (see :func:`alloc_buffer`).
        """
        f = self.file(path)
        buf = out if out is not None else alloc_buffer(f.size)
        if len(buf) < f.size:
            raise ValueError(f"buffer of {len(buf)} bytes is too small for {path} ({f.size} bytes)")
        with events.span("checkpoint_load", component="ckptfs", uri=redact(self.store.uri), path=f.path,
                         bytes=f.size):
            n = self.readinto(f, 0, memoryview(buf)[: f.size], ReadState())
        assert n == f.size
        return buf

    def verify(self, on_bytes: Callable[[int], None] | None = None) -> list[str]:
        """Read every chunk from the store (bypassing caches) and check it; returns problems found."""
        problems: list[str] = []
        seen: set[str] = set()
        refs: list[tuple[str, ChunkRef]] = []
        for f, off, c in self.manifest.iter_chunks():
            if c.digest not in seen:
                seen.add(c.digest)
                refs.append((f"{f.path}@{off}", c))
        buffers: list[mmap.mmap] = []
        src = ChunkSource(self.store, self.manifest,
                          ReaderOptions(threads=self.opts.threads, retries=self.opts.retries, cache=None,
                                        backoff=self.opts.backoff))
        try:
            with ThreadPoolExecutor(max_workers=self.opts.threads) as pool:
                # Collect as we go: progress stays current and the future list stays short.
                window = 2 * self.opts.threads
                futs: list[tuple[str, ChunkRef, Future[int]]] = []
                for where, c in refs:
                    futs.append((where, c, pool.submit(self._verify_one, src, c, buffers)))
                    if len(futs) >= window:
                        self._collect(futs[: len(futs) - window // 2], problems, on_bytes)
                        del futs[: len(futs) - window // 2]
                self._collect(futs, problems, on_bytes)
        finally:
            src.close()
        return problems

    @staticmethod
    def _verify_one(src: ChunkSource, c: ChunkRef, buffers: list[mmap.mmap]) -> int:
        buf = buffers.pop() if buffers else mmap.mmap(-1, src.manifest.chunk_size, flags=mmap.MAP_PRIVATE)
        try:
            src.fetch_into(c, memoryview(buf)[: c.length])
        finally:
            buffers.append(buf)
        return c.length

    @staticmethod
    def _collect(
        futs: list[tuple[str, ChunkRef, Future[int]]],
        problems: list[str],
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        for where, c, fut in futs:
            try:
                fut.result()
            except OSError as e:
                problems.append(f"{where}: {e}")
            if on_bytes:
                on_bytes(c.length)

    def close(self) -> None:
        self.source.close()
        self.store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
