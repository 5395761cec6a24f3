"""mount(2)/umount2(2) through ctypes, and /proc/self/mountinfo.

Why ctypes and not mount(8): mount(8) would do the same syscall from a child process, plus blkid probing
of the device — which, for a lazy layer, reads our own FUSE file.  ctypes releases the GIL around the call,
so the FUSE thread of this process keeps serving the superblock reads that mounting erofs triggers.  The
caller must still never be the FUSE thread itself (see :mod:`snapshotter.lazy.fusefs`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: Path | str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode() or None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {source} {target}: {os.strerror(e)}")


def umount(target: Path | str, *, detach: bool = False, force: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0) | (MNT_FORCE if force else 0)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


def mount_erofs(device: str, target: Path | str) -> None:
    """Mount the erofs image on ``device`` read-only at ``target``.

    No ``nosuid``/``nodev``: the mount stands for an image layer, whose set-uid binaries and device nodes
    must behave as they do in containerd's own (plain directory) layers."""
    mount(device, target, "erofs", MS_RDONLY)


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    dev: int  # st_dev of the mounted filesystem (os.makedev(major, minor))
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 …)."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1 : i + 4]) == 3 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[MountInfo]:
    out: list[MountInfo] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            major, minor = (int(x) for x in a[2].split(":"))
            out.append(MountInfo(int(a[0]), int(a[1]), os.makedev(major, minor), _unescape(a[3]), _unescape(a[4]),
                                 b[0], _unescape(b[1]) if len(b) > 1 else "", b[2] if len(b) > 2 else ""))
    return out


def mounts_at(target: Path | str) -> list[MountInfo]:
    """Mounts whose mount point is exactly ``target`` (stacked ones in mount order)."""
    t = os.path.abspath(target)
    return [m for m in mountinfo() if m.mountpoint == t]


def top_mount(target: Path | str) -> MountInfo | None:
    ms = mounts_at(target)
    return ms[-1] if ms else None


def clear_mountpoint(target: Path | str) -> int:
    """Lazily detach everything mounted at ``target`` (e.g. the dead FUSE mount of a crashed daemon, which
    no longer answers even ``stat``).  Returns how many mounts were removed."""
    n = 0
    while mounts_at(target):
        try:
            umount(target, detach=True)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                break
            raise
        n += 1
    return n
