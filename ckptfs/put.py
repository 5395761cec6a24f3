"""``put``: store a checkpoint directory as striped, checksummed chunks, manifest last.

Why it is shaped like this:

* **Deterministic plan.**  The layout (which chunk goes to which stripe, segment and offset) follows from
  the file list, sizes, chunk size and stripe count alone, before any byte is read.  So a rerun after a
  crash computes the same plan, finds the segments that were finished (``.done`` markers, written after
  the segment object is closed) and uploads only the rest.  The plan id (a hash of those inputs and the
  files' mtimes) names the data directory, so a rerun against a changed source starts clean instead of
  mixing old and new bytes.
* **Segments.**  Each stripe is cut into segment objects of ``segment_chunks`` chunks: that is the unit
  of parallel upload and of resume.  Object stores cannot append, so resuming inside one huge stripe
  object would be impossible; a killed upload loses at most one segment per worker.
* **Manifest last, atomically, durably.**  Readers look only at ``MANIFEST.json``; until it exists there
  is no checkpoint, whatever data objects are already there.  Every data object is made durable (closed
  on object stores, ``fsync``-ed with its directories on local/NFS ones) before its ``.done`` marker and
  before the manifest, so a crash or power loss never leaves a manifest over missing bytes; the manifest
  is published without replacing one (``link`` on filesystems).
* **One writer per URI.**  A put holds a lock for its whole run (see :class:`PutLock`): without it a
  second put would delete the first one's data as "stale" and publish its manifest over it, or the two
  would replace each other's manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ckptfs.errors import CheckpointBusy, CheckpointExists, CkptfsError
from ckptfs.manifest import DATA_DIR, MANIFEST_NAME, ChunkRef, DataObject, DirEntry, FileEntry, Manifest
from ckptfs.store import Store, StoreOptions, open_store

DEFAULT_CHUNK_SIZE = 64 << 20
DEFAULT_STRIPES = 8
DEFAULT_SEGMENT_CHUNKS = 16
_IO_PIECE = 1 << 20  # bytes read/hashed/written at a time: bounds memory, hashes while in cache
_ALIGN = 4096  # chunk offsets inside a segment object
LOCK_DIR = "PUT-LOCKS"
LOCK_TTL = 120.0  # seconds a claim stays valid without a refresh (refreshed every TTL/4 while a put runs)


@dataclass
class PutStats:
    plan_id: str
    files: int
    bytes_total: int
    bytes_uploaded: int
    segments_total: int
    segments_skipped: int
    seconds: float
    already_complete: bool = False


@dataclass
class _Planned:
    file_index: int
    file_offset: int
    length: int
    obj: int
    obj_offset: int


class _Pacer:
    """Caps the upload rate across all workers (``--max-rate``), so a put can run beside training."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self._rate
        if start > now:
            time.sleep(start - now)


def scan_source(src: Path) -> tuple[list[FileEntry], list[DirEntry]]:
    """Regular files and directories under ``src`` in a stable order; anything else is refused."""
    if not src.is_dir():
        raise CkptfsError(f"source {src} is not a directory")
    files: list[FileEntry] = []
    dirs: list[DirEntry] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(src).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise CkptfsError(f"symlinks are not supported in a checkpoint: {rel}")
            if stat.S_ISDIR(st.st_mode):
                dirs.append(DirEntry(rel, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
            elif stat.S_ISREG(st.st_mode):
                files.append(FileEntry(rel, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
            else:
                raise CkptfsError(f"not a regular file or directory: {rel}")
    files.sort(key=lambda f: f.path)
    dirs.sort(key=lambda d: d.path)
    return files, dirs


def plan_layout(
    files: list[FileEntry], chunk_size: int, stripes: int, segment_chunks: int
) -> tuple[str, list[DataObject], list[list[_Planned]]]:
    """Assign chunks round-robin to stripes and pack each stripe's chunks into segments.

    Returns the plan id, the data objects and, per object, the chunks it holds in write order.
    """
    key = json.dumps(
        [chunk_size, stripes, segment_chunks, [(f.path, f.size, f.mtime_ns) for f in files]]
    ).encode()
    plan_id = hashlib.sha256(key).hexdigest()[:16]
    per_stripe: list[list[tuple[int, int, int]]] = [[] for _ in range(stripes)]
    g = 0
    for fi, f in enumerate(files):
        for off in range(0, f.size, chunk_size):
            per_stripe[g % stripes].append((fi, off, min(chunk_size, f.size - off)))
            g += 1
    objects: list[DataObject] = []
    contents: list[list[_Planned]] = []
    for s, chunks in enumerate(per_stripe):
        for seg_no, start in enumerate(range(0, len(chunks), segment_chunks)):
            idx = len(objects)
            planned: list[_Planned] = []
            pos = 0
            for fi, off, n in chunks[start : start + segment_chunks]:
                pos = -(-pos // _ALIGN) * _ALIGN  # aligned offsets let readers use O_DIRECT
                planned.append(_Planned(fi, off, n, idx, pos))
                pos += n
            objects.append(DataObject(f"{DATA_DIR}/{plan_id}/s{s:03d}/{seg_no:05d}", s, pos))
            contents.append(planned)
    return plan_id, objects, contents


def _upload_segment(
    store: Store,
    src: Path,
    files: list[FileEntry],
    obj: DataObject,
    planned: list[_Planned],
    on_bytes: Callable[[int], None],
    pacer: _Pacer | None,
) -> list[str]:
    digests: list[str] = []
    fds: dict[int, int] = {}
    try:
        with store.open_output(obj.path) as out:
            written = 0
            for p in planned:
                if p.obj_offset > written:  # alignment padding after a short (tail) chunk
                    out.write(bytes(p.obj_offset - written))
                    written = p.obj_offset
                fd = fds.get(p.file_index)
                if fd is None:
                    fd = fds[p.file_index] = os.open(src / files[p.file_index].path, os.O_RDONLY)
                h = hashlib.sha256()
                done = 0
                while done < p.length:
                    n = min(_IO_PIECE, p.length - done)
                    piece = os.pread(fd, n, p.file_offset + done)
                    if len(piece) != n:
                        raise CkptfsError(f"{files[p.file_index].path} changed while being stored (short read)")
                    h.update(piece)
                    if pacer:
                        pacer.take(n)
                    out.write(piece)
                    done += n
                    on_bytes(n)
                written += p.length
                digests.append(h.hexdigest())
    finally:
        for fd in fds.values():
            os.close(fd)
    # The marker makes the segment count as done on a rerun; it is written only after a clean close
    # and once the bytes are durable.
    store.sync([obj.path])
    store.write_atomic(obj.path + ".done", json.dumps({"size": obj.size, "digests": digests}).encode())
    return digests


def _finished_segment(store: Store, obj: DataObject, n_chunks: int) -> list[str] | None:
    try:
        doc = json.loads(store.read_bytes(obj.path + ".done"))
        digests = [str(d) for d in doc["digests"]]
        if int(doc["size"]) != obj.size or len(digests) != n_chunks:
            return None
        info = store.fs.get_file_info(store.join(obj.path))
        return digests if info.size == obj.size else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PutLock:
    """Mutual exclusion of ``put`` runs on one URI, on any store, without a conditional PUT.

    Each candidate writes its own claim object ``PUT-LOCKS/<token>`` (holder, pid, expiry), then lists
    the claims.  It holds the lock only if it sees no other live claim; otherwise it removes its claim
    and fails with :class:`CheckpointBusy`.  With read-after-write and list consistency (local and NFS
    filesystems, HDFS, S3 since 2020) two candidates can never both win: the later of the two writes
    its claim after the earlier one listed, so the later one's listing shows the earlier claim.  (Both
    may lose; the caller retries.)  A claim is live until its expiry, which the holder pushes forward
    every ``ttl / 4`` seconds; one left by a dead process on this host is stale at once, so a rerun
    after a crash resumes immediately, and one from another host after ``ttl``.
    """

    def __init__(self, store: Store, ttl: float = LOCK_TTL) -> None:
        self.store = store
        self.ttl = ttl
        self.token = f"{time.time_ns():020d}-{secrets.token_hex(8)}"
        self.rel = f"{LOCK_DIR}/{self.token}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl}).encode()

    def _live(self, name: str) -> dict[str, object] | None:
        """The other claim's content if it is live, else ``None`` (and a stale claim is removed)."""
        try:
            doc = json.loads(self.store.read_bytes(f"{LOCK_DIR}/{name}"))
            host, pid, expires = str(doc["host"]), int(doc["pid"]), float(doc["expires"])
        except FileNotFoundError:
            return None  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: a claim being written right now, or garbage.  Treat it as live (safe side).
            return {"host": "?", "pid": "?", "expires": "?"}
        dead = expires < time.time() or (host == socket.gethostname() and not _pid_alive(pid))
        if dead:
            self.store.delete_file(f"{LOCK_DIR}/{name}")
            return None
        return dict(doc)

    def acquire(self) -> None:
        self.store.write_atomic(self.rel, self._claim())
        for name in self.store.list_dir(LOCK_DIR):
            if name == self.token or ".tmp-" in name:
                continue
            other = self._live(name)
            if other is not None:
                self.store.delete_file(self.rel)
                raise CheckpointBusy(
                    f"another put to {self.store.uri} is running (host {other.get('host')}, pid "
                    f"{other.get('pid')}); wait for it, or if it died on another host, retry after "
                    f"{self.ttl:.0f} s (its claim {LOCK_DIR}/{name} expires)")
        self._thread = threading.Thread(target=self._refresh, name="ckptfs-put-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(OSError):
                self.store.write_atomic(self.rel, self._claim())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.delete_file(self.rel)
        if self.store.kind == "local":  # an empty directory left behind would be noise; others may hold claims
            with contextlib.suppress(OSError):
                os.rmdir(self.store.join(LOCK_DIR))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def put(
    src_dir: str | os.PathLike[str],
    uri: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    stripes: int = DEFAULT_STRIPES,
    segment_chunks: int = DEFAULT_SEGMENT_CHUNKS,
    threads: int | None = None,
    max_rate: float | None = None,
    options: StoreOptions | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> PutStats:
    """Store ``src_dir`` at ``uri``; rerunning after a crash resumes, rerunning after success is a no-op.

    ``on_plan(total_bytes, bytes_already_stored)`` is called once before uploading and ``on_bytes(n)``
    as bytes go out, for progress display.
    """
    if chunk_size <= 0 or stripes <= 0 or segment_chunks <= 0:
        raise ValueError("chunk size, stripes and segment chunks must be positive")
    if max_rate is not None and max_rate <= 0:
        raise ValueError("max rate must be positive")
    t0 = time.monotonic()
    src = Path(src_dir)
    files, dirs = scan_source(src)
    plan_id, objects, contents = plan_layout(files, chunk_size, stripes, segment_chunks)
    total = sum(f.size for f in files)
    store = open_store(uri, options)
    try:
        done = _already_stored(store, uri, plan_id)
        if done:
            return PutStats(plan_id, len(files), total, 0, len(objects), len(objects),
                            time.monotonic() - t0, already_complete=True)
        lock = PutLock(store)
        lock.acquire()
        try:
            return _put_locked(store, uri, src, files, dirs, plan_id, objects, contents, total, t0,
                               threads or min(stripes, 16), max_rate, on_bytes, on_plan,
                               chunk_size, stripes)
        finally:
            lock.release()
    finally:
        store.close()


def _already_stored(store: Store, uri: str, plan_id: str) -> bool:
    """True if this very checkpoint is complete at ``uri``; ``CheckpointExists`` if another one is."""
    if not store.exists(MANIFEST_NAME):
        return False
    existing = Manifest.from_json(store.read_bytes(MANIFEST_NAME))
    if existing.plan_id == plan_id:
        return True
    raise CheckpointExists(f"{uri} already holds a different checkpoint; store this one elsewhere")


def _put_locked(
    store: Store, uri: str, src: Path, files: list[FileEntry], dirs: list[DirEntry], plan_id: str,
    objects: list[DataObject], contents: list[list[_Planned]], total: int, t0: float, workers: int,
    max_rate: float | None, on_bytes: Callable[[int], None] | None, on_plan: Callable[[int, int], None] | None,
    chunk_size: int, stripes: int,
) -> PutStats:
    # Under the lock, look again: a put that finished while we waited for the listing counts.
    if _already_stored(store, uri, plan_id):
        return PutStats(plan_id, len(files), total, 0, len(objects), len(objects), time.monotonic() - t0,
                        already_complete=True)
    for stale in store.list_dir(DATA_DIR):
        if stale != plan_id:  # leftovers of an interrupted put of other content (no put runs: we hold the lock)
            store.delete_dir(f"{DATA_DIR}/{stale}")

    digests: list[list[str] | None] = [
        _finished_segment(store, o, len(c)) for o, c in zip(objects, contents, strict=True)
    ]
    todo = [i for i, d in enumerate(digests) if d is None]
    # Upload segment k of every stripe before segment k+1 of any: all stripes advance together.
    todo.sort(key=lambda i: (objects[i].path.rsplit("/", 1)[1], objects[i].stripe))
    already = sum(objects[i].size for i, d in enumerate(digests) if d is not None)
    if on_plan:
        on_plan(total, already)
    uploaded = [0]
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            uploaded[0] += n
        if on_bytes:
            on_bytes(n)

    pacer = _Pacer(max_rate) if max_rate else None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptfs-put") as pool:
        futs = {
            pool.submit(_upload_segment, store, src, files, objects[i], contents[i], count, pacer): i
            for i in todo
        }
        done, pending = wait(futs, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            digests[futs[f]] = f.result()  # re-raises the first failure

    _order_chunks(files, contents, digests)
    manifest = Manifest(chunk_size, stripes, plan_id, objects, files, dirs)
    manifest.validate()
    # Segments kept from an earlier run were synced before their marker; syncing again is cheap and
    # covers markers written by older versions.
    store.sync([o.path for o in objects])
    try:
        store.write_atomic(MANIFEST_NAME, manifest.to_json(), exclusive=True)
    except FileExistsError as e:
        raise CheckpointExists(f"{uri} already holds a checkpoint (published while this put ran)") from e
    return PutStats(plan_id, len(files), total, uploaded[0], len(objects), len(objects) - len(todo),
                    time.monotonic() - t0)


def _order_chunks(
    files: list[FileEntry], contents: list[list[_Planned]], digests: list[list[str] | None]
) -> None:
    """Give each file its chunk list in file-offset order (objects are laid out stripe by stripe)."""
    by_file: dict[int, list[tuple[int, ChunkRef]]] = {}
    for oi, planned in enumerate(contents):
        ds = digests[oi]
        assert ds is not None
        for p, d in zip(planned, ds, strict=True):
            by_file.setdefault(p.file_index, []).append((p.file_offset, ChunkRef(d, oi, p.obj_offset, p.length)))
    for fi, f in enumerate(files):
        f.chunks = [c for _, c in sorted(by_file.get(fi, []), key=lambda t: t[0])]
