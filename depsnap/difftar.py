"""Turn an overlayfs upper directory (what a container's install step changed) into an OCI layer tar.

overlayfs records a deletion as a 0/0 character device and a replaced directory as a directory with
``trusted.overlay.opaque=y``; the OCI layer format says ``.wh.<name>`` and ``.wh..wh..opq``.  Hardlinks
within the diff stay hardlinks; xattrs travel as PAX ``SCHILY.xattr.*`` records (overlay's own
``trusted.overlay.*`` bookkeeping is not part of the image).  Paths that are caches, not results
(pip's and apt's caches, apt lists, /tmp) are left out: they would only make the layer bigger.

A directory renamed with overlay's ``redirect_dir`` feature cannot be expressed in a tar diff; such an upper
dir is refused rather than turned into a wrong layer.

The tar is deterministic, so two builders that install the same files push the same layer (and so the same
image): entries in sorted order, no user/group *names* (they come from the building host's passwd), and with
``epoch`` every mtime newer than it clamped to it (the reproducible-builds ``SOURCE_DATE_EPOCH`` rule; the
install runs with ``SOURCE_DATE_EPOCH`` set so Python writes hash-checked ``.pyc`` files, which stay valid).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

DEFAULT_EXCLUDES = (
    "root/.cache",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/lib/apt/lists",
    "var/log/apt",
    "var/log/dpkg.log",
    "tmp",
    "run",
)
OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"


class DiffError(ValueError):
    pass


def _excluded(rel: str, excludes: Iterable[str]) -> bool:
    return any(rel == e or rel.startswith(e + "/") for e in excludes)


def _xattrs(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in sorted(names):
        if name.startswith("trusted.overlay."):
            continue
        value = os.getxattr(path, name, follow_symlinks=False)
        out[name] = value.decode("utf-8", "surrogateescape")
    return out


def _overlay_xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _normalize(info: tarfile.TarInfo, epoch: int | None) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    mtime = int(info.mtime)
    info.mtime = min(mtime, epoch) if epoch is not None else mtime
    return info


def write_layer(upper: Path, dst: IO[bytes], excludes: Iterable[str] = DEFAULT_EXCLUDES,
                epoch: int | None = None) -> dict[str, int]:
    """Write the OCI layer tar of ``upper`` to ``dst``; return counts (files, whiteouts, opaque, bytes).

    ``epoch``: clamp mtimes to it (seconds since 1970), for a layer that depends only on the files' content."""
    excludes = tuple(excludes)
    stats = {"entries": 0, "whiteouts": 0, "opaque": 0, "bytes": 0}
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            if rel_dir and _excluded(rel_dir, excludes):
                dirnames[:] = []
                continue
            if rel_dir:
                if _overlay_xattr(dirpath, REDIRECT) is not None:
                    raise DiffError(f"{rel_dir}: renamed with overlay redirect_dir; mount with redirect_dir=off")
                info = _normalize(tf.gettarinfo(dirpath, rel_dir), epoch)
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in _xattrs(dirpath).items()}
                tf.addfile(info)
                stats["entries"] += 1
                if _overlay_xattr(dirpath, OPAQUE) == b"y":
                    tf.addfile(_whiteout(f"{rel_dir}/.wh..wh..opq", int(info.mtime)))
                    stats["opaque"] += 1
            # symlinks to directories show up in dirnames: treat them as files
            entries = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
            for name in entries:
                full = os.path.join(dirpath, name)
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if _excluded(rel, excludes):
                    continue
                st = os.lstat(full)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    mtime = int(st.st_mtime) if epoch is None else min(int(st.st_mtime), epoch)
                    tf.addfile(_whiteout(f"{rel_dir}/.wh.{name}" if rel_dir else f".wh.{name}", mtime))
                    stats["whiteouts"] += 1
                    continue
                info = _normalize(tf.gettarinfo(full, rel), epoch)
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in _xattrs(full).items()}
                ident = (st.st_dev, st.st_ino)
                if info.isreg() and st.st_nlink > 1:
                    if ident in links:
                        info.type, info.linkname, info.size = tarfile.LNKTYPE, links[ident], 0
                        tf.addfile(info)
                        stats["entries"] += 1
                        continue
                    links[ident] = rel
                if info.isreg():
                    with open(full, "rb") as fh:
                        tf.addfile(info, fh)
                    stats["bytes"] += info.size
                else:
                    tf.addfile(info)
                stats["entries"] += 1
    return stats


def _whiteout(name: str, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = tarfile.REGTYPE, 0o644, 0, mtime
    return info
