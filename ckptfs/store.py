"""Stores: a checkpoint URI → a ``pyarrow.fs`` filesystem and a root path inside it.

Supported URIs
--------------
``/abs/path``, ``file:///abs/path``
    The local filesystem (or anything mounted locally: NFS, Lustre, a disk).
``s3://bucket/prefix``
    ``pyarrow.fs.S3FileSystem``.  Endpoint, scheme, region and credentials come from
    :class:`StoreOptions` (the CLI's ``--s3-*`` options), else from the query string
    (``?endpoint_override=host:port&scheme=http&region=…``), else from the AWS SDK's usual sources
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance role).
    Keep secrets out of URIs: URIs are printed.
``hdfs://namenode:port/path``
    ``pyarrow.fs.HadoopFileSystem``, through libhdfs (JNI).  Needs, on the reading host: a JVM with
    ``JAVA_HOME`` set, ``HADOOP_HOME`` (``libhdfs.so`` under ``$HADOOP_HOME/lib/native``, or
    ``ARROW_LIBHDFS_DIR``), and ``CLASSPATH`` set to the output of ``hadoop classpath --glob``.  Kerberos
    clusters also need a ticket (``kinit``) and ``?kerb_ticket=/path`` in the URI.  Not exercised by the
    tests here (no Hadoop on the test machines); it goes through the same ``pyarrow.fs`` calls as S3.
``fsspec+PROTO://…`` or any other protocol fsspec knows (``http://``, ``gs://``, ``abfs://``…)
    ``fsspec.filesystem(PROTO)`` behind pyarrow's ``FSSpecHandler``.  ``http(s)://`` is read-only; a chunk read is
    exactly one ranged GET, received by :mod:`ckptfs.httpranges` into the reader's buffer (fsspec lists the
    store and reads its manifest; with ``fsspec_options`` set, fsspec does the reads too).

The reader only needs ``read_range``; ``put`` needs ``open_output``/``write_atomic``.  Everything else in
ckptfs talks to a :class:`Store`, never to a filesystem directly, so a new backend is one branch here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import urllib.parse
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from ckptfs.httpranges import HttpRanges

_PIECE = 256 << 10  # copy/hash granularity: small enough to stay in L2 between the copy and the hash
_LOCAL_PIECE = 1 << 20  # local reads: 1 MiB O_DIRECT requests, hashed as each lands
_DIRECT_ALIGN = 4096
_HANDLE_CAP = 256  # open read handles kept per store (LRU); a handle per object saves a HEAD per read


@dataclass
class StoreOptions:
    """Backend settings that do not belong in a URI (credentials) or that a user wants to override."""

    s3_endpoint: str | None = None  # "host:port" or "http://host:port"
    s3_scheme: str | None = None  # "http" or "https"
    s3_region: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_anonymous: bool = False
    fsspec_options: dict[str, Any] = field(default_factory=dict)


def _s3_filesystem(parsed: urllib.parse.ParseResult, opts: StoreOptions) -> pafs.S3FileSystem:
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
    kw: dict[str, Any] = {}
    endpoint = opts.s3_endpoint or q.get("endpoint_override") or q.get("endpoint") or os.environ.get(
        "AWS_ENDPOINT_URL_S3"
    ) or os.environ.get("AWS_ENDPOINT_URL")
    scheme = opts.s3_scheme or q.get("scheme")
    if endpoint:
        if "://" in endpoint:
            ep = urllib.parse.urlparse(endpoint)
            scheme = scheme or ep.scheme
            endpoint = ep.netloc
        kw["endpoint_override"] = endpoint
    if scheme:
        if scheme not in ("http", "https"):
            raise ValueError(f"S3 scheme must be http or https, not {scheme!r}")
        kw["scheme"] = scheme
    region = opts.s3_region or q.get("region")
    if region:
        kw["region"] = region
    if opts.s3_anonymous:
        kw["anonymous"] = True
    elif opts.s3_access_key or opts.s3_secret_key:
        if not (opts.s3_access_key and opts.s3_secret_key):
            raise ValueError("give both the S3 access key and the secret key, or neither")
        kw["access_key"] = opts.s3_access_key
        kw["secret_key"] = opts.s3_secret_key
    return pafs.S3FileSystem(**kw)


def _fsspec_filesystem(proto: str, uri: str, opts: StoreOptions) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with torch and most stacks
        raise ValueError(f"{proto}:// needs fsspec (pip install fsspec)") from e
    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ValueError, ImportError) as e:
        raise ValueError(f"unsupported checkpoint URI scheme {proto!r}: {e}") from e
    kw = dict(opts.fsspec_options)
    if proto in ("http", "https"):
        kw.setdefault("cache_type", "none")  # one ranged GET per chunk read, no over-fetch
    fs = fsspec.filesystem(proto, **kw)
    root = cls._strip_protocol(uri)
    if proto in ("http", "https") and not str(root).startswith(proto + "://"):
        root = uri
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), str(root).rstrip("/")


def open_store(uri: str, options: StoreOptions | None = None) -> Store:
    """Resolve ``uri`` to a :class:`Store`; a malformed or unsupported URI fails with ``ValueError``."""
    opts = options or StoreOptions()
    if not uri:
        raise ValueError("empty checkpoint URI")
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URIs must be absolute local paths, got {uri!r}")
        path = urllib.parse.unquote(parsed.path) if scheme == "file" else uri
        return Store(uri, pafs.LocalFileSystem(), os.path.abspath(path).rstrip("/") or "/", kind="local")
    if scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3:// URI without a bucket: {uri!r}")
        fs = _s3_filesystem(parsed, opts)
        root = (parsed.netloc + "/" + parsed.path.strip("/")).rstrip("/")
        return Store(uri, fs, root, kind="s3")
    if scheme in ("hdfs", "viewfs"):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as e:
            raise ValueError(
                f"cannot open {uri}: {e} (HDFS needs JAVA_HOME, HADOOP_HOME/libhdfs and CLASSPATH; "
                "see ckptfs.store)"
            ) from e
        return Store(uri, fs, path.rstrip("/"), kind="hdfs")
    if scheme.startswith("fsspec+"):
        proto = scheme.split("+", 1)[1]
        fs, root = _fsspec_filesystem(proto, uri.split("+", 1)[1], opts)
        return Store(uri, fs, root, kind="fsspec")
    fs, root = _fsspec_filesystem(scheme, uri, opts)
    if scheme in ("http", "https") and not opts.fsspec_options:
        # chunk reads bypass fsspec (ckptfs.httpranges says why); fsspec still lists and reads the manifest
        return Store(uri, fs, root, kind="http", ranges=HttpRanges())
    return Store(uri, fs, root, kind="fsspec")


class Store:
    """A checkpoint root inside a filesystem, with the few operations ckptfs needs.

    Read handles are cached (LRU) because opening an object costs a round trip (HEAD on S3/HTTP) and a
    mount reads the same few stripe objects thousands of times.  Native pyarrow handles are thread-safe
    for ``read_at`` and shared; fsspec handles are not, so those are cached per thread.
    """

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str, *, kind: str,
                 ranges: HttpRanges | None = None) -> None:
        self.uri = uri
        self.fs = fs
        self.root = root
        self.kind = kind
        self.ranges = ranges  # http(s): chunk reads straight into the caller's buffer
        self._lock = threading.Lock()
        self._handles: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._per_thread = kind in ("fsspec", "http")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def join(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- reads ---------------------------------------------------------------------------------------
    def _handle(self, rel: str) -> Any:
        key = (threading.get_ident() if self._per_thread else 0, rel)
        with self._lock:
            h = self._handles.get(key)
            if h is not None:
                self._handles.move_to_end(key)
                return h
        h = _Fd(self.join(rel)) if self.kind == "local" else self.fs.open_input_file(self.join(rel))
        with self._lock:
            self._handles[key] = h
            while len(self._handles) > _HANDLE_CAP:
                _, old = self._handles.popitem(last=False)
                _close_quietly(old)
        return h

    def _drop_handle(self, rel: str) -> None:
        key = (threading.get_ident() if self._per_thread else 0, rel)
        with self._lock:
            h = self._handles.pop(key, None)
        if h is not None:
            _close_quietly(h)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of object ``rel``; ``OSError`` on failure or short read."""
        if self.ranges is not None:
            buf = bytearray(length)
            self.ranges.read_into(self.join(rel), offset, memoryview(buf))
            return bytes(buf)
        try:
            h = self._handle(rel)
            parts: list[bytes] = []
            got = 0
            while got < length:
                b = h.read_at(length - got, offset + got)
                if not b:
                    raise OSError(f"short read: {rel} has no bytes at {offset + got} (wanted {length})")
                parts.append(b)
                got += len(b)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except Exception:
            self._drop_handle(rel)  # a broken connection or a replaced object: reopen on retry
            raise

    def read_range_into(self, rel: str, offset: int, out: memoryview, hasher: Any = None) -> None:
        """Fill ``out`` from ``offset`` of ``rel``, feeding ``hasher`` as the bytes arrive.

        Hashing piece by piece, right after each piece is copied, hashes data that is still in the CPU
        cache (faster by half than one call over the whole chunk: docs/bench/design-measurements.md), and
        verification is the largest CPU cost of a load.
        """
        n = len(out)
        if self.ranges is not None:
            self.ranges.read_into(self.join(rel), offset, out, hasher)
            return
        if self.kind != "local":
            data = memoryview(self.read_range(rel, offset, n))
            for lo in range(0, n, _PIECE):
                out[lo : lo + _PIECE] = data[lo : lo + _PIECE]
                if hasher is not None:
                    hasher.update(out[lo : lo + _PIECE])
            return
        try:
            h = self._handle(rel)
            got = 0
            while got < n:
                piece = out[got : got + _LOCAL_PIECE]
                k = h.pread_into(piece, offset + got)
                if k <= 0:
                    raise OSError(f"short read: {rel} has no bytes at {offset + got} (wanted {n})")
                if hasher is not None:
                    hasher.update(piece[:k])
                got += k
        except Exception:
            self._drop_handle(rel)
            raise

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return bytes(f.read())

    def exists(self, rel: str) -> bool:
        return bool(self.fs.get_file_info(self.join(rel)).type != pafs.FileType.NotFound)

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        sel = pafs.FileSelector(self.join(rel), allow_not_found=True, recursive=False)
        return sorted(os.path.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(sel))

    # -- writes --------------------------------------------------------------------------------------
    def _makedirs_for(self, rel: str) -> None:
        if self.kind in ("local", "hdfs", "fsspec"):
            parent = os.path.dirname(self.join(rel))
            if parent:
                self.fs.create_dir(parent, recursive=True)

    def open_output(self, rel: str) -> Any:
        """A write stream; on S3 the object only appears when the stream is closed successfully."""
        self._makedirs_for(rel)
        return self.fs.open_output_stream(self.join(rel))

    def write_atomic(self, rel: str, data: bytes, *, exclusive: bool = False) -> None:
        """Make ``rel`` appear with ``data`` all at once, durably: rename (link when ``exclusive``)
        of a synced temporary on filesystems, a single PUT on S3.

        ``exclusive``: fail with ``FileExistsError`` rather than replace an existing ``rel`` — atomic
        on local/NFS stores (``link`` never replaces); elsewhere a check before the write, which is
        why ``put`` also holds a lock.
        """
        self._makedirs_for(rel)
        if self.kind == "local":
            path = self.join(rel)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if exclusive:
                    os.link(tmp, path)
                else:
                    os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
        elif self.kind == "hdfs":
            if exclusive and self.exists(rel):
                raise FileExistsError(errno.EEXIST, f"{self.join(rel)} exists")
            tmp = f"{rel}.tmp-{uuid.uuid4().hex[:12]}"
            with self.fs.open_output_stream(self.join(tmp)) as f:
                f.write(data)
            self.fs.move(self.join(tmp), self.join(rel))
        else:
            if exclusive and self.exists(rel):
                raise FileExistsError(errno.EEXIST, f"{self.join(rel)} exists")
            with self.fs.open_output_stream(self.join(rel)) as f:
                f.write(data)

    def sync(self, rels: list[str]) -> None:
        """Make written objects durable, with the directory entries that name them (local stores:
        ``fsync`` of each file, then of every directory up to the root).  On S3 an object is durable
        once its upload completed (``close``); HDFS likewise on close."""
        if self.kind != "local":
            return
        dirs: set[str] = set()
        for rel in rels:
            fd = os.open(self.join(rel), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(rel)
            while parent:
                dirs.add(parent)
                parent = os.path.dirname(parent)
        for d in sorted(dirs, key=len, reverse=True):
            _fsync_dir(self.join(d))
        _fsync_dir(self.root)

    def delete_file(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.join(rel))

    def delete_dir(self, rel: str) -> None:
        info = self.fs.get_file_info(self.join(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.join(rel))

    def close(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            _close_quietly(h)
        if self.ranges is not None:
            self.ranges.close()


class _Fd:
    """Local object: an O_DIRECT descriptor for aligned pieces, a buffered one for the rest.

    O_DIRECT lets the disk DMA straight into the reader's (recycled, page-aligned) chunk buffer: no
    copy out of the page cache and no page-cache pages to allocate (docs/bench/design-measurements.md).  ``put``
    aligns chunk offsets to 4 KiB so nearly every piece qualifies; filesystems without O_DIRECT
    (tmpfs) and unaligned pieces use the buffered descriptor.
    """

    __slots__ = ("direct", "fd")

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.direct: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            self.direct = None

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = len(buf)
        if self.direct is not None and offset % _DIRECT_ALIGN == 0 and n % _DIRECT_ALIGN == 0:
            try:
                return os.preadv(self.direct, [buf], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: buffer not aligned (a caller's bytearray)
                    raise
        k = os.preadv(self.fd, [buf], offset)
        # Buffered pieces: drop their pages, the bytes now live in the caller's buffer.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, k, os.POSIX_FADV_DONTNEED)
        return k

    def read_at(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct is not None:
            os.close(self.direct)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_quietly(h: Any) -> None:
    # Closing a handle whose connection already broke is not an error worth raising.
    with contextlib.suppress(Exception):
        h.close()
