"""The per-blob chunk cache: a sparse local file the size of the blob plus a persisted bitmap.

Layout of a cache directory::

    meta.json   spec identity, size, chunk size (written once, atomically); a mismatch resets the cache
    data        sparse file, exactly ``size`` bytes: chunk i lives at i*chunk_size — so once complete it *is*
                the blob, and the loop device can be switched to it as is
    bitmap      one bit per chunk, set = "these bytes are verified and durable"
    verified    present once the whole data file was hashed and matched the blob digest (holds the spec
                identity it was verified for): only then is the layer complete (mounted on, swapped to the file)

Crash safety rests on one ordering rule: a bit reaches the bitmap file only after the chunk's bytes were
``fdatasync``\\ ed.  :meth:`ChunkCache.put` writes the verified bytes and marks the chunk *present* in memory
at once (so readers are served without waiting for a disk flush); :meth:`ChunkCache.flush` — called by the
manager's flusher every second, before a swap and at close — snapshots the present set, syncs the data
file, then writes that snapshot to the bitmap and syncs it.  A crash loses at most the chunks of the last
second; it never leaves a bit set over bytes that are not on disk.  Bits only ever go from 0 to 1, so the
bitmap is rewritten in place: a torn write leaves each sector old or new, and both are true statements.
``verify=True`` on open re-hashes every chunk marked present (a disk that lies about durability, or a
cache copied around by hand) and clears the bits that do not match.

**The whole blob, not just its chunks.**  Chunks are verified against the index's chunk table as they
arrive; that the chunk table describes the blob the digest names is checked only by hashing the whole
file: :meth:`ChunkCache.verify_blob`, called once the cache is complete, in the layer's fill thread (never on
a Prepare's path).  It writes ``verified`` when the hash matches; when it does not, the cache is discarded
(every bit cleared: the chunks are fetched and verified again).  :attr:`ChunkCache.verified` is what the
layer checks before it mounts on, or swaps to, the local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

from snapshotter.lazy.spec import BlobSpec

log = logging.getLogger("bootseer.lazy.cache")

META = "meta.json"
DATA = "data"
BITMAP = "bitmap"
VERIFIED = "verified"
_HASH_READ = 4 << 20  # bytes per read while hashing the whole blob


class ChunkCache:
    """Thread-safe: fetch threads :meth:`put`, FUSE reads :meth:`read`, the flusher :meth:`flush`."""

    def __init__(self, directory: Path, spec: BlobSpec, *, verify: bool = False) -> None:
        self.dir = Path(directory)
        self.spec = spec
        self._lock = threading.Lock()
        self._present = bytearray((spec.n_chunks + 7) // 8)  # in memory: readable now
        self._durable = bytearray(len(self._present))  # what the bitmap file says
        self._count = 0
        self._dirty = False
        self._closed = False
        self._epoch = 0  # bumped by discard(): a flush that began before it must not write old bits back
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open(verify)

    # -- open / create -------------------------------------------------------------------------------
    def _open(self, verify: bool) -> None:
        meta = self.dir / META
        want = {"identity": self.spec.identity(), "digest": self.spec.digest, "size": self.spec.size,
                "chunk_size": self.spec.chunk_size, "n_chunks": self.spec.n_chunks}
        have: dict[str, object] | None = None
        with contextlib.suppress(OSError, ValueError):
            have = json.loads(meta.read_text())
        if have != want:
            if have is not None:
                log.warning("cache %s belongs to another spec; starting it afresh", self.dir)
            for name in (DATA, BITMAP, VERIFIED, META):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
            atomic_write(meta, json.dumps(want).encode())
        self._data_fd = os.open(self.dir / DATA, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._data_fd).st_size != self.spec.size:
            os.ftruncate(self._data_fd, self.spec.size)  # sparse: costs no disk until chunks arrive
        self._bitmap_fd = os.open(self.dir / BITMAP, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        raw = os.pread(self._bitmap_fd, len(self._present), 0)
        self._present[: len(raw)] = raw
        # Bits past the last chunk must be zero or `complete` lies.
        for i in range(self.spec.n_chunks, len(self._present) * 8):
            self._present[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        if verify:
            self._verify()
        self._durable[:] = self._present
        self._count = sum(bin(b).count("1") for b in self._present)
        self._verified = False
        with contextlib.suppress(OSError):
            self._verified = (self.complete and not verify
                              and (self.dir / VERIFIED).read_text().strip() == self.spec.identity())

    def _verify(self) -> None:
        bad = 0
        for i in range(self.spec.n_chunks):
            if not _bit(self._present, i):
                continue
            off, length = self.spec.chunk_span(i)
            data = os.pread(self._data_fd, length, off)
            if hashlib.sha256(data).hexdigest() != self.spec.chunks[i]:
                _clear(self._present, i)
                bad += 1
        if bad:
            log.warning("cache %s: %d chunks failed verification on load; they will be fetched again", self.dir, bad)
            os.pwrite(self._bitmap_fd, bytes(self._present), 0)
            os.fdatasync(self._bitmap_fd)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.dir / DATA

    def has(self, index: int) -> bool:
        return _bit(self._present, index)

    def has_all(self, indices: range) -> bool:
        p = self._present
        return all(p[i >> 3] >> (i & 7) & 1 for i in indices)

    def missing(self, indices: range | None = None) -> list[int]:
        p = self._present
        return [i for i in (indices if indices is not None else range(self.spec.n_chunks))
                if not p[i >> 3] >> (i & 7) & 1]

    @property
    def present_chunks(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.spec.n_chunks

    @property
    def verified(self) -> bool:
        """Complete, and the whole file hashed to the blob digest (:meth:`verify_blob`)."""
        return self._verified and self.complete

    def verify_blob(self, cancel: threading.Event | None = None) -> bool | None:
        """Hash the whole (complete) data file against the blob digest.  True: it matches, and that is
        recorded; False: it does not — the cache is discarded (:meth:`discard`); None: not complete, or
        ``cancel`` was set meanwhile.  Reads the file in large pieces; meant for a background thread."""
        if self._verified:
            return True
        if not self.complete:
            return None
        h = hashlib.sha256()
        off = 0
        while off < self.spec.size:
            if cancel is not None and cancel.is_set():
                return None
            data = os.pread(self._data_fd, min(_HASH_READ, self.spec.size - off), off)
            if not data:
                raise OSError(f"{self.data_path}: short file at {off}")
            h.update(data)
            off += len(data)
        if "sha256:" + h.hexdigest() != self.spec.digest:
            log.error("cache %s: every chunk matched the chunk table, but the blob hashes to sha256:%s, not %s; "
                      "discarding it", self.dir, h.hexdigest(), self.spec.digest)
            self.discard()
            return False
        self.flush()  # the marker must not get ahead of the bitmap it vouches for
        atomic_write(self.dir / VERIFIED, self.spec.identity().encode())
        self._verified = True
        return True

    def discard(self) -> None:
        """Forget every chunk (in memory and on disk): reads go to the network again and are re-verified.
        The data file keeps its bytes until they are overwritten; nothing reads a chunk whose bit is clear."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / VERIFIED).unlink()
        with self._lock:
            self._verified = False
            self._epoch += 1
            self._present[:] = bytes(len(self._present))
            self._durable[:] = self._present
            self._count = 0
            self._dirty = False
            os.pwrite(self._bitmap_fd, bytes(self._present), 0)
        os.fdatasync(self._bitmap_fd)

    def local_bytes(self) -> int:
        """Bytes of the blob held locally (counted by chunk, not by disk blocks)."""
        last = self.spec.n_chunks - 1
        n = self._count * self.spec.chunk_size
        if self.has(last):
            n -= self.spec.chunk_size - self.spec.chunk_span(last)[1]
        return n

    def disk_bytes(self) -> int:
        """Disk space the cache occupies (allocated blocks of the sparse file)."""
        return os.fstat(self._data_fd).st_blocks * 512

    # -- data ----------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``; the caller made sure every covering chunk is present."""
        return os.pread(self._data_fd, length, offset)

    def put(self, index: int, data: bytes | memoryview) -> None:
        """Store the *verified* bytes of chunk ``index``; readable at once, durable at the next flush."""
        off, length = self.spec.chunk_span(index)
        if len(data) != length:
            raise ValueError(f"chunk {index}: {len(data)} bytes, expected {length}")
        view = memoryview(data)
        done = 0
        while done < length:  # pwrite may be short on some filesystems
            done += os.pwrite(self._data_fd, view[done:], off + done)
        with self._lock:
            if not _bit(self._present, index):
                _set(self._present, index)
                self._count += 1
                self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def flush(self) -> None:
        """Make every chunk present so far durable, then record it in the bitmap (in that order)."""
        with self._lock:
            if not self._dirty or self._closed:
                return
            snapshot = bytes(self._present)
            epoch = self._epoch
            self._dirty = False
        try:
            os.fdatasync(self._data_fd)
            with self._lock:
                if epoch != self._epoch:
                    return  # discarded meanwhile
                # Never clear a bit another flush already made durable; only add ours.
                merged = bytes(a | b for a, b in zip(snapshot, self._durable, strict=True))
                if merged == bytes(self._durable):
                    return
                os.pwrite(self._bitmap_fd, merged, 0)
                self._durable[:] = merged
            os.fdatasync(self._bitmap_fd)
        except OSError:
            with self._lock:
                self._dirty = True  # try again next time
            raise

    def open_readonly(self) -> int:
        """A read-only descriptor of the data file (what the loop device is switched to)."""
        return os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
            os.close(self._data_fd)
            os.close(self._bitmap_fd)

    def drop(self) -> None:
        """Close and delete the cache (the blob must not be in use)."""
        with contextlib.suppress(OSError):
            self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _bit(bits: bytearray, i: int) -> bool:
    return bool(bits[i >> 3] >> (i & 7) & 1)


def _set(bits: bytearray, i: int) -> None:
    bits[i >> 3] |= 1 << (i & 7)


def _clear(bits: bytearray, i: int) -> None:
    bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF


def atomic_write(path: Path, data: bytes) -> None:
    """Write-to-temp, fsync, rename, fsync the directory: the file is either old or new after a crash."""
    # one temp name per thread: two threads saving the same record must not rename each other's file away
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

