"""Loop devices through their ioctls (``linux/loop.h``), without ``losetup``.

Why not ``losetup``: the backing file is usually our own FUSE file, and ``losetup`` (or udev's probing) reads
it — from a process we would then have to keep apart from the FUSE loop anyway.  The ioctls give the same
effect with exact control of flags and without parsing output:

* ``LOOP_CTL_GET_FREE`` on ``/dev/loop-control`` names a free device; another process may take it before
  we configure it, so configuring retries on ``EBUSY`` with a new one.
* ``LOOP_CONFIGURE`` (Linux 5.8) binds the backing fd, flags and block size in one step; older kernels get
  ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64``.  Lazy layers are always ``LO_FLAGS_READ_ONLY`` (a precondition of
  ``LOOP_CHANGE_FD``) and ``LO_FLAGS_AUTOCLEAR`` (the device detaches itself when the last opener — the
  erofs mount — goes away, so a crash of the daemon can never leak devices that nothing uses).
* ``LOOP_CHANGE_FD`` swaps the backing file of a bound read-only device for another of the same size: how a
  complete layer leaves FUSE, and how a restarted daemon re-attaches layers to its new FUSE mount.

Every call here may make the kernel read the backing file (``LOOP_CHANGE_FD`` fsyncs the new file, and
releases the old one), so none may run on the FUSE loop's thread.  ``fcntl.ioctl`` releases the GIL for
integer arguments and buffers up to 1 KiB, which is all we pass, so the FUSE thread keeps running Python
meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CHANGE_FD = 0x4C06
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LOOP_MAJOR = 7
LO_NAME_SIZE = 64
# struct loop_info64: 5×u64 (device, inode, rdevice, offset, sizelimit), 4×u32 (number, encrypt_type,
# encrypt_key_size, flags), file_name[64], crypt_name[64], encrypt_key[32], u64 init[2]
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64, u64 reserved[8]
_CONFIG = struct.Struct(f"=II{_INFO64.size}s64x")
assert _INFO64.size == 232 and _CONFIG.size == 304


@dataclass(frozen=True)
class LoopStatus:
    number: int
    backing_dev: int  # st_dev of the backing file
    backing_ino: int  # st_ino of the backing file
    flags: int
    file_name: str  # lo_file_name (what we set, truncated to 63 bytes)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)


def device_path(number: int) -> str:
    return f"/dev/loop{number}"


def _open_dev(number: int, write: bool = False) -> int:
    path = device_path(number)
    for _ in range(50):  # udev may not have created the node yet for a fresh device
        try:
            return os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            os.mknod(path, 0o660 | 0o060000, os.makedev(LOOP_MAJOR, number))  # S_IFBLK
        except FileExistsError:
            continue
    raise OSError(errno.ENODEV, f"cannot open {path}")


def get_free() -> int:
    """The number of a free loop device (the kernel creates one if needed)."""
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        return int(fcntl.ioctl(fd, LOOP_CTL_GET_FREE))
    finally:
        os.close(fd)


def _info64(flags: int, name: str) -> bytes:
    raw = name.encode()[: LO_NAME_SIZE - 1]
    return _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, raw, b"", b"", 0, 0)


class LoopDevice:
    """A bound loop device plus an open descriptor of it.

    The descriptor matters with ``LO_FLAGS_AUTOCLEAR``: the device detaches when its last opener closes,
    so keep it open until whatever uses the device (a mount) has opened it, then :meth:`close`."""

    def __init__(self, number: int, fd: int) -> None:
        self.number = number
        self.fd = fd

    @property
    def path(self) -> str:
        return device_path(self.number)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoopDevice({self.path})"


def attach(backing_fd: int, *, read_only: bool = True, autoclear: bool = True, block_size: int = 0,
           name: str = "", attempts: int = 20) -> LoopDevice:
    """Bind a free loop device to ``backing_fd``; returns it with an open descriptor (see :class:`LoopDevice`)."""
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    last: OSError | None = None
    for _ in range(attempts):
        number = get_free()
        fd = _open_dev(number, write=not read_only)
        try:
            _configure(fd, backing_fd, flags, block_size, name)
            return LoopDevice(number, fd)
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EBUSY:  # EBUSY: someone took the device between GET_FREE and CONFIGURE
                raise
            last = e
    raise OSError(errno.EBUSY, f"no free loop device after {attempts} attempts: {last}")


def _configure(fd: int, backing_fd: int, flags: int, block_size: int, name: str) -> None:
    cfg = _CONFIG.pack(backing_fd, block_size, _info64(flags, name))
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, cfg)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # Before Linux 5.8: bind, then set flags (a short window where the device is bound without them).
    fcntl.ioctl(fd, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _info64(flags, name))
        if block_size:
            fcntl.ioctl(fd, LOOP_SET_BLOCK_SIZE, block_size)
    except OSError:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, LOOP_CLR_FD)
        raise


def set_read_ahead_kb(number: int, kb: int) -> None:
    """The device's read-ahead (sysfs ``queue/read_ahead_kb``): what a filesystem on it reads beyond a request."""
    Path(f"/sys/block/loop{number}/queue/read_ahead_kb").write_text(f"{int(kb)}\n")


def change_fd(number: int, new_backing_fd: int) -> None:
    """Switch a bound read-only device to another backing file of the same size (``LOOP_CHANGE_FD``)."""
    fd = _open_dev(number)
    try:
        fcntl.ioctl(fd, LOOP_CHANGE_FD, new_backing_fd)
    finally:
        os.close(fd)


def set_direct_io(number: int, on: bool) -> None:
    fd = _open_dev(number)
    try:
        fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1 if on else 0)
    finally:
        os.close(fd)


def detach(number: int) -> bool:
    """``LOOP_CLR_FD``; False if the device was not bound.  On a device still in use with autoclear set,
    the kernel only marks it and detaches when the last user goes."""
    try:
        fd = _open_dev(number)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
        return True
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    finally:
        os.close(fd)


def status(number: int) -> LoopStatus | None:
    """``LOOP_GET_STATUS64``, or None if the device is not bound."""
    try:
        fd = _open_dev(number)
    except OSError:
        return None
    try:
        buf = bytearray(_INFO64.size)
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            raise
    finally:
        os.close(fd)
    f = _INFO64.unpack(bytes(buf))
    return LoopStatus(number=f[5], backing_dev=f[0], backing_ino=f[1], flags=f[8],
                      file_name=f[9].split(b"\0", 1)[0].decode(errors="replace"))


def backing_file(number: int) -> str | None:
    """The backing file's path as the kernel reports it (sysfs); None if unbound."""
    try:
        return Path(f"/sys/block/loop{number}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None


def backed_by(number: int, path: Path | str) -> bool:
    """Is the device bound to the file at ``path`` (same device and inode)?"""
    st = status(number)
    if st is None:
        return False
    try:
        s = os.stat(path)
    except OSError:
        return False
    return st.backing_dev == s.st_dev and st.backing_ino == s.st_ino


def number_of(dev: int) -> int | None:
    """Loop number of a block device number (st_rdev, a mount's major:minor); None if not a loop device.

    Resolved through sysfs rather than computed: with ``max_part`` set, minors are not loop numbers."""
    if os.major(dev) != LOOP_MAJOR:
        return None
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        return None
    return int(name[4:]) if name.startswith("loop") and name[4:].isdigit() else None
