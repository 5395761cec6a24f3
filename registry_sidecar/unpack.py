"""Unpack one OCI layer into a scratch directory, safely, in the form an overlayfs lower layer needs.

This is containerd's overlay applier re-done for a scratch dir, with the hostile cases refused rather than
tolerated, because a blob built here is served to every node that pulls the image.

What is kept: regular files (sparse where they are zero), directories, symlinks, hardlinks, char/block devices
(``allow_devices``), FIFOs; numeric uid/gid, permission bits incl. setuid/setgid/sticky, nanosecond mtimes,
``SCHILY.xattr.*`` PAX records (``security.capability``, ``user.*``, …).  OCI whiteouts become overlay ones:
``.wh.NAME`` → char device 0/0 ``NAME``; ``.wh..wh..opq`` → ``trusted.overlay.opaque=y`` on the directory.

What is refused (:class:`LayerError`, and the caller removes the scratch dir):

* entry or hardlink names that are absolute or contain ``..`` (containerd would clean and clamp them; a
  well-formed layer never has them);
* writing through a symlink that leads out of the layer root: parents are resolved one component at a time
  from a directory fd with ``O_NOFOLLOW``; a symlink met on the way is resolved *inside* the root
  (absolute targets from the root, as containerd's ``fs.RootPath`` does) and refused if its ``..`` would climb
  above the root; more than 40 symlinks on one path is a loop;
* hardlinks whose target is not an earlier non-directory entry of this layer (overlay's lower layers are
  separate filesystems, so a link into another layer cannot exist);
* ``trusted.overlay.*`` xattrs in the tar (they would let a layer forge whiteouts or redirects),
  AUFS metadata (``.wh..wh.*`` other than the opaque marker), a whiteout for a name the same layer creates,
  unknown entry types, device nodes when ``allow_devices`` is off;
* **bombs**: more than ``max_bytes`` of file data, more than ``max_entries`` entries, a PAX or GNU long-name
  header over :data:`MAX_HEADER_BYTES` (Python's tarfile would read any size into memory), a tar stream more
  than ``max_ratio`` times the compressed layer (once past :data:`RATIO_FLOOR`).

The host's own failures are not the layer's: ENOSPC, EIO, ENOMEM and the like while writing the scratch dir
propagate as the ``OSError`` they are, so the job is retried later instead of the layer being listed as
skipped for good.

**Duplicate entries** are refused too, except a directory repeated over a directory (its later metadata
applies, its contents stay — tools do emit parent directories twice).  containerd lets a later entry replace
an earlier one, but two entries for one path let a scanner that reads the first and an unpacker that keeps
the last see different files; a refused layer is merely pulled the ordinary way by nodes, so refusing costs
laziness, never correctness.  The same goes for a non-directory over a directory the layer created implicitly
for earlier entries.  ``.wh.x`` followed by ``x`` is not a duplicate: it replaces a lower ``x`` (docker writes
that when a directory becomes a file), which in overlay form is just the new ``x``.

Known difference: parents implied by an entry but absent from the tar are created ``root:root 0755``;
containerd copies their metadata from the lower layers, which a per-layer converter cannot see.  Layers written
by docker, buildkit, kaniko and ``integration/oci.py`` always list parent directories.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
import tarfile as tarfile_mod
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import IO

import zstandard

MAX_SYMLINK_HOPS = 40
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY = 1 << 20
MAX_HEADER_BYTES = 1 << 20  # one PAX record set or GNU long name/link; real ones are a few hundred bytes
DEFAULT_MAX_ENTRIES = 2_000_000  # a large conda environment has ~500 k files
DEFAULT_MAX_RATIO = 1000  # tar bytes per compressed byte; gzip tops out near 1030:1 on zeros
RATIO_FLOOR = 1 << 30  # below this much tar the ratio is not checked (small layers of zeros are fine)
# errors of this host, not of the layer: worth another try later
HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                         errno.EROFS})


class LayerError(Exception):
    """The layer is malformed or hostile; converting it again will not help."""


class UnsupportedMediaType(LayerError):
    pass


# --------------------------------------------------------------------------------------- decompression
class _Decompressed:
    """A read()-able view of a gzip or zstd stream that notices truncation and bounds its memory use.

    Python's ``gzip`` reports truncation but ``zstandard``'s stream reader returns EOF silently on a cut frame,
    so both are done here on the incremental decompressors, frame by frame (multi-member gzip and
    multi-frame zstd are both legal in layers).
    """

    _IN = 64 << 10

    def __init__(self, src: IO[bytes], kind: str) -> None:
        self.src, self.kind = src, kind
        self._buf = bytearray()
        self._dec: object | None = None
        self._tail = b""  # compressed input not consumed yet
        self._eof = False
        self._started = False

    def _new(self) -> object:
        if self.kind == "gzip":
            return zlib.decompressobj(wbits=31)
        return zstandard.ZstdDecompressor().decompressobj()

    def _feed(self) -> None:
        data = self._tail or self.src.read(self._IN)
        self._tail = b""
        if not data:
            if self._dec is not None:
                raise LayerError(f"truncated {self.kind} stream (ended inside a compressed member)")
            if not self._started:
                raise LayerError(f"empty {self.kind} stream")
            self._eof = True
            return
        if self._dec is None:
            if self._started and not data.strip(b"\0"):
                return  # zero padding after the last member (tar writers pad to records)
            magic = b"\x1f\x8b" if self.kind == "gzip" else b"\x28\xb5\x2f\xfd"
            if not data.startswith(magic[: len(data)]):
                raise LayerError(f"not a {self.kind} stream (bad magic {data[:4].hex()})")
            self._dec = self._new()
            self._started = True
        dec = self._dec
        try:
            if self.kind == "gzip":
                out = dec.decompress(data, _COPY)  # type: ignore[attr-defined]
                self._tail = dec.unconsumed_tail  # type: ignore[attr-defined]
                ended = dec.eof  # type: ignore[attr-defined]
            else:
                # feed zstd in small slices: its output is unbounded per call (RLE blocks)
                piece, self._tail = data[:8192], data[8192:]
                out = dec.decompress(piece)  # type: ignore[attr-defined]
                ended = dec.eof  # type: ignore[attr-defined]
        except (zlib.error, zstandard.ZstdError) as e:
            raise LayerError(f"corrupt {self.kind} stream: {e}") from e
        self._buf += out
        if ended:
            rest = dec.unused_data  # type: ignore[attr-defined]
            self._tail = bytes(rest) + self._tail
            self._dec = None

    def read(self, n: int = -1) -> bytes:
        want = n if n is not None and n >= 0 else 1 << 62
        while len(self._buf) < want and not self._eof:
            self._feed()
        out = bytes(self._buf[:want])
        del self._buf[:want]
        return out


def open_layer_stream(src: IO[bytes], media_type: str) -> IO[bytes]:
    """The uncompressed tar stream of a layer blob of ``media_type``."""
    kind = layer_compression(media_type)
    if kind == "tar":
        return src
    return _Decompressed(src, kind)  # type: ignore[return-value]


def layer_compression(media_type: str) -> str:
    """"tar", "gzip" or "zstd" for a layer media type; :class:`UnsupportedMediaType` otherwise."""
    mt = media_type.strip().lower()
    if "foreign" in mt:
        raise UnsupportedMediaType(f"foreign layer ({media_type}): its content is not stored in the registry")
    if mt in ("application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar",
              "application/vnd.docker.image.rootfs.diff.tar"):
        return "tar"
    if mt in ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip",
              "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"):
        return "gzip"
    if mt in ("application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.zstd",
              "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"):
        return "zstd"
    raise UnsupportedMediaType(f"unsupported layer media type {media_type!r}")


# --------------------------------------------------------------------------------------------- unpack
@dataclass
class UnpackStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0  # regular file data written
    tar_bytes: int = 0  # uncompressed tar stream size
    max_mtime: int = 0  # seconds; the layer's own clock, used as the EROFS build time
    whiteouts: int = 0
    opaque_dirs: int = 0
    hardlinks: int = 0
    devices: int = 0
    duplicates: int = 0


@dataclass
class _Counting:
    src: IO[bytes]
    n: int = 0
    limit: int | None = None  # tar bytes allowed (the decompression-ratio bound)

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.n += len(data)
        if self.limit is not None and self.n > self.limit:
            raise LayerError(f"the tar stream exceeds {self.limit} bytes, too many times the compressed layer "
                             "(a decompression bomb?)")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header whole, whatever size it claims: bound it first."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile_mod.GNUTYPE_LONGNAME, tarfile_mod.GNUTYPE_LONGLINK, tarfile_mod.XHDTYPE,
                         tarfile_mod.XGLTYPE, tarfile_mod.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_BYTES:
            raise LayerError(f"a {self.size}-byte extended header (more than {MAX_HEADER_BYTES})")
        return super()._proc_member(tarfile)  # type: ignore[misc, no-any-return]


@dataclass
class Unpacker:
    """Unpacks one layer into ``root`` (an empty directory we own).  Not reusable."""

    root: str
    allow_devices: bool = True
    max_bytes: int | None = None
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    compressed_size: int | None = None  # of the layer blob: bounds the tar stream to max_ratio times it
    max_ratio: int = DEFAULT_MAX_RATIO
    ratio_floor: int = RATIO_FLOOR
    progress: Callable[[int], None] | None = None
    stats: UnpackStats = field(default_factory=UnpackStats)
    _root_fd: int = -1
    _dir_times: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    _implied: list[tuple[str, ...]] = field(default_factory=list)
    _seen: set[tuple[str, ...]] = field(default_factory=set)
    _whiteouts: set[tuple[str, ...]] = field(default_factory=set)  # whiteouts this layer made (not chr 0/0 entries)

    def unpack(self, tar_stream: IO[bytes]) -> UnpackStats:
        limit = None if self.compressed_size is None else max(self.ratio_floor,
                                                                   self.max_ratio * self.compressed_size)
        counting = _Counting(tar_stream, limit=limit)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                tf = tarfile.open(fileobj=counting, mode="r|", errorlevel=2, tarinfo=_BoundedTarInfo)  # type: ignore[call-overload]  # noqa: SIM115
            except tarfile.ReadError as e:
                raise LayerError(f"not a tar stream: {e}") from e
            except EOFError as e:
                raise LayerError(f"truncated stream: {e}") from e
            with tf:
                while True:
                    try:
                        member = tf.next()
                    except (tarfile.ReadError, EOFError) as e:
                        raise LayerError(f"corrupt or truncated tar stream after {self.stats.entries} entries: "
                                         f"{e}") from e
                    if member is None:
                        break
                    self.stats.entries += 1
                    if self.max_entries is not None and self.stats.entries > self.max_entries:
                        raise LayerError(f"more than {self.max_entries} entries")
                    self._entry(tf, member)
                # drain: the digest was checked on the blob, but a tar followed by garbage is still odd;
                # read to the end so truncation of the compressed stream after the tar is noticed too
                try:
                    while tar_stream.read(_COPY):
                        pass
                except (EOFError, OSError) as e:
                    raise LayerError(f"corrupt stream after the tar end: {e}") from e
            self._finish()
        finally:
            os.close(self._root_fd)
        self.stats.tar_bytes = counting.n
        return self.stats

    # ------------------------------------------------------------------------------------- resolution
    def _walk(self, comps: list[str], create: bool, what: str) -> tuple[int, tuple[str, ...]]:
        """Open the directory ``comps`` (relative to the root), creating missing ones when ``create``.

        Returns a new fd (caller closes) and the real path (symlinks resolved).  Never leaves the root.
        """
        fds = [os.dup(self._root_fd)]
        real: list[str] = []
        pending = list(comps)
        hops = 0
        try:
            while pending:
                name = pending.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if not real:
                        raise LayerError(f"{what}: a symlink on its path leads out of the layer")
                    real.pop()
                    os.close(fds.pop())
                    continue
                cur = fds[-1]
                try:
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        raise LayerError(f"{what}: {'/'.join([*real, name])} does not exist in this layer") from None
                    os.mkdir(name, 0o755, dir_fd=cur)
                    os.chown(name, 0, 0, dir_fd=cur, follow_symlinks=False)
                    os.chmod(name, 0o755, dir_fd=cur)
                    self._implied.append((*real, name))
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise LayerError(f"{what}: too many levels of symlinks")
                    target = os.readlink(name, dir_fd=cur)
                    if target.startswith("/"):
                        while len(fds) > 1:
                            os.close(fds.pop())
                        real = []
                    pending = [p for p in target.split("/") if p] + pending
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise LayerError(f"{what}: {'/'.join([*real, name])} is not a directory")
                fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur))
                real.append(name)
            out = fds.pop()
            return out, tuple(real)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _split(name: str, what: str) -> list[str]:
        if name.startswith("/"):
            raise LayerError(f"{what} {name!r}: absolute path")
        comps = [c for c in name.split("/") if c not in ("", ".")]
        if ".." in comps:
            raise LayerError(f"{what} {name!r}: contains '..'")
        if any("\0" in c for c in comps):
            raise LayerError(f"{what} {name!r}: contains NUL")
        return comps

    # ------------------------------------------------------------------------------------------ entries
    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        comps = self._split(m.name, "entry")
        if not comps:
            return  # the layer root: containerd ignores its metadata too
        base = comps[-1]
        mtime_ns = _mtime_ns(m)
        self.stats.max_mtime = max(self.stats.max_mtime, mtime_ns // 1_000_000_000)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(comps, m, mtime_ns)
            return
        xattrs = _xattrs(m)
        dfd, real_parent = self._walk(comps[:-1], True, f"entry {m.name!r}")
        try:
            key = (*real_parent, base)
            try:
                existing = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and key in self._whiteouts:
                # ".wh.x" then "x": the lower x is hidden and replaced — in overlay form simply the new x
                os.unlink(base, dir_fd=dfd)
                self._whiteouts.discard(key)
                self.stats.whiteouts -= 1
                existing = None
            elif existing is not None:
                if not (stat.S_ISDIR(existing.st_mode) and m.isdir()):
                    raise LayerError(f"entry {m.name!r}: duplicate of an earlier entry ({'/'.join(key)})")
                if key in self._seen:
                    self.stats.duplicates += 1
            self._seen.add(key)
            self._create(tf, m, dfd, base, key, exists=existing is not None)
            self._metadata(m, dfd, base, xattrs, mtime_ns, key)
        finally:
            os.close(dfd)

    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, dfd: int, base: str, key: tuple[str, ...],
                exists: bool) -> None:
        """Create the node with safe temporary permissions; :meth:`_metadata` sets the real ones."""
        try:
            if m.isdir():
                if not exists:
                    os.mkdir(base, 0o700, dir_fd=dfd)
            elif m.isreg():
                self._write_file(tf, m, dfd, base)
            elif m.issym():
                if not m.linkname:
                    raise LayerError(f"entry {m.name!r}: symlink with an empty target")
                os.symlink(m.linkname, base, dir_fd=dfd)
            elif m.islnk():
                self._hardlink(m, dfd, base, key)
            elif m.ischr() or m.isblk():
                if not self.allow_devices:
                    raise LayerError(f"entry {m.name!r}: device nodes are not allowed by policy")
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=dfd)
                self.stats.devices += 1
            elif m.isfifo():
                os.mkfifo(base, 0o600, dir_fd=dfd)
            else:
                raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
        except LayerError:
            raise
        except OSError as e:
            if e.errno in HOST_ERRNOS:
                raise  # the scratch disk, not the layer: the job is retried
            raise LayerError(f"entry {m.name!r}: {e.strerror or e}") from e

    def _write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, dfd: int, base: str) -> None:
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            left = m.size
            hole = False
            while left > 0 and src is not None:
                try:
                    chunk = src.read(min(_COPY, left))
                except (tarfile.ReadError, EOFError, OSError) as e:
                    raise LayerError(f"entry {m.name!r}: truncated or corrupt data: {e}") from e
                if not chunk:
                    raise LayerError(f"entry {m.name!r}: truncated data ({left} bytes missing)")
                left -= len(chunk)
                self.stats.bytes += len(chunk)
                if self.max_bytes is not None and self.stats.bytes > self.max_bytes:
                    raise LayerError(f"layer unpacks to more than {self.max_bytes} bytes of file data")
                if chunk.count(0) == len(chunk):  # keep the scratch copy sparse
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                    hole = True
                else:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    hole = False
                if self.progress:
                    self.progress(len(chunk))
            if hole or m.size == 0:
                os.ftruncate(fd, m.size)
            self.stats.files += 1
        finally:
            os.close(fd)

    def _hardlink(self, m: tarfile.TarInfo, dfd: int, base: str, key: tuple[str, ...]) -> None:
        tcomps = self._split(m.linkname, f"hardlink {m.name!r} → target")
        if not tcomps:
            raise LayerError(f"hardlink {m.name!r}: empty target")
        tfd, treal = self._walk(tcomps[:-1], False, f"hardlink {m.name!r} → {m.linkname!r}")
        try:
            try:
                st = os.stat(tcomps[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(f"hardlink {m.name!r}: target {m.linkname!r} is not in this layer") from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"hardlink {m.name!r}: target {m.linkname!r} is a directory")
            if (*treal, tcomps[-1]) == key:
                raise LayerError(f"hardlink {m.name!r}: links to itself")
            os.link(tcomps[-1], base, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
            self.stats.hardlinks += 1
        finally:
            os.close(tfd)

    def _metadata(self, m: tarfile.TarInfo, dfd: int, base: str, xattrs: dict[str, bytes], mtime_ns: int,
                  key: tuple[str, ...]) -> None:
        try:
            os.chown(base, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
            if not m.issym() and not m.islnk():  # base is not a symlink: we just created it
                os.chmod(base, m.mode & 0o7777, dir_fd=dfd)
            proc = f"/proc/self/fd/{dfd}/{base}"
            for name, value in xattrs.items():
                try:
                    os.setxattr(proc, name, value, follow_symlinks=False)
                except OSError as e:
                    # as containerd: user.* cannot be set on symlinks/devices, some filesystems lack a namespace
                    if e.errno in (errno.EPERM, errno.ENOTSUP) and name.startswith("user."):
                        continue
                    raise LayerError(f"entry {m.name!r}: cannot set xattr {name}: {e.strerror}") from e
            if m.isdir():
                self._dir_times.append((key, mtime_ns))
            else:
                os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
        except LayerError:
            raise
        except OSError as e:
            raise LayerError(f"entry {m.name!r}: {e.strerror or e}") from e

    def _whiteout(self, comps: list[str], m: tarfile.TarInfo, mtime_ns: int) -> None:
        base = comps[-1]
        dfd, real_parent = self._walk(comps[:-1], True, f"whiteout {m.name!r}")
        try:
            if base == OPAQUE_MARKER:
                os.setxattr(f"/proc/self/fd/{dfd}", OPAQUE_XATTR, b"y")
                self.stats.opaque_dirs += 1
                return
            if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                raise LayerError(f"entry {m.name!r}: AUFS metadata is not supported")
            victim = base[len(WHITEOUT_PREFIX):]
            if victim in ("", ".", ".."):
                raise LayerError(f"entry {m.name!r}: whiteout of nothing")
            with contextlib.suppress(FileNotFoundError):
                os.stat(victim, dir_fd=dfd, follow_symlinks=False)
                raise LayerError(f"entry {m.name!r}: whiteout for {victim!r}, which this layer also creates")
            os.mknod(victim, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dfd)
            os.utime(victim, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
            self._seen.add((*real_parent, victim))
            self._whiteouts.add((*real_parent, victim))
            self.stats.whiteouts += 1
        except LayerError:
            raise
        except OSError as e:
            raise LayerError(f"entry {m.name!r}: {e.strerror or e}") from e
        finally:
            os.close(dfd)

    def _finish(self) -> None:
        """Directory times last (creating children changed them), deepest first; implied dirs get the layer's
        newest time so the build does not depend on the clock."""
        epoch_ns = self.stats.max_mtime * 1_000_000_000
        items = [(k, epoch_ns) for k in self._implied] + self._dir_times
        for key, ns in sorted(items, key=lambda kv: -len(kv[0])):
            try:
                dfd, _ = self._walk(list(key[:-1]), False, "dir")
            except LayerError:
                continue  # replaced by a later entry
            try:
                os.utime(key[-1], ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)
        os.utime(self._root_fd, ns=(epoch_ns, epoch_ns))


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get("mtime") if m.pax_headers else None
    try:
        ns = int(Decimal(raw) * 1_000_000_000) if raw is not None else int(m.mtime) * 1_000_000_000
    except (InvalidOperation, ValueError, TypeError):
        ns = int(float(m.mtime) * 1_000_000_000)
    return max(0, min(ns, (1 << 63) - 1))


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in (m.pax_headers or {}).items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        if name.startswith("trusted.overlay."):
            raise LayerError(f"entry {m.name!r}: carries overlay metadata xattr {name} (refused: it could forge "
                             "whiteouts or redirects)")
        out[name] = value.encode("utf-8", "surrogateescape")
    return dict(sorted(out.items()))


def unpack(src: IO[bytes], media_type: str, root: str, **kw: object) -> UnpackStats:
    """Unpack the layer blob ``src`` of ``media_type`` into the empty directory ``root``."""
    stream = open_layer_stream(src, media_type)
    return Unpacker(root, **kw).unpack(stream)  # type: ignore[arg-type]
