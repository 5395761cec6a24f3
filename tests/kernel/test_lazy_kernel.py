"""The kernel adapters of the lazy data path on their own (no FUSE): loop devices through ioctls, erofs
mounted through mount(2), LOOP_CHANGE_FD under a live erofs mount, autoclear on unmount."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootseer.testkit import drop_caches, wait_until
from snapshotter.lazy import loop
from snapshotter.lazy import mount as mnt
from snapshotter.lazy.testing import build_erofs, cleanup_root, make_tree, tree_digest


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    cleanup_root(tmp_path)


def test_loop_configure_mount_change_fd_and_autoclear(work: Path) -> None:
    src = make_tree(work / "src", random_mib=1, b64_mib=1, small_files=20)
    img = build_erofs(src, work / "img.erofs", compressor="lz4")
    copy = work / "copy.erofs"
    shutil.copyfile(img, copy)
    target = work / "mnt"
    target.mkdir()

    fd = os.open(img, os.O_RDONLY)
    dev = loop.attach(fd, read_only=True, autoclear=True, block_size=4096, name="bootseer-test")
    os.close(fd)
    with dev:
        st = loop.status(dev.number)
        assert st is not None and st.read_only and st.flags & loop.LO_FLAGS_AUTOCLEAR
        assert st.file_name == "bootseer-test"
        assert loop.backed_by(dev.number, img) and loop.backing_file(dev.number) == str(img)
        mnt.mount_erofs(dev.path, target)
    top = mnt.top_mount(target)
    assert top is not None and top.fstype == "erofs" and loop.number_of(top.dev) == dev.number
    assert tree_digest(target) == tree_digest(src)

    # A file of another size is refused; one of the same size is taken under the live mount.
    small = work / "small"
    small.write_bytes(b"\0" * 4096)
    sfd = os.open(small, os.O_RDONLY)
    with pytest.raises(OSError) as ei:
        loop.change_fd(dev.number, sfd)
    os.close(sfd)
    assert ei.value.errno == errno.EINVAL
    cfd = os.open(copy, os.O_RDONLY)
    loop.change_fd(dev.number, cfd)
    os.close(cfd)
    assert loop.backed_by(dev.number, copy) and not loop.backed_by(dev.number, img)
    img.unlink()  # the old backing file is no longer needed by anyone
    drop_caches()
    assert tree_digest(target) == tree_digest(src)

    mnt.umount(target)
    wait_until(lambda: loop.status(dev.number) is None or not loop.backed_by(dev.number, copy), 10,
               "autoclear after unmount")
    assert mnt.mounts_at(target) == []


def test_clear_mountpoint_detaches_stacked_mounts(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    for _ in range(2):
        mnt.mount("tmpfs", target, "tmpfs", mnt.MS_RDONLY)
    assert len(mnt.mounts_at(target)) == 2
    assert mnt.clear_mountpoint(target) == 2
    assert mnt.mounts_at(target) == []
    with pytest.raises(OSError) as ei:
        mnt.mount("/nonexistent-device", target, "erofs", mnt.MS_RDONLY)
    assert ei.value.errno in (errno.ENOENT, errno.ENOTBLK)
