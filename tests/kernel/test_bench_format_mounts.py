"""The format study's reads (issue 20) on a small tree: each candidate blob built with the deterministic options
mounts through a loop device and erofs's file-backed mount, a copy written in the chunk cache's order mounts the
same, overlayfs over each serves the file's bytes, and nothing stays mounted or attached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from integration.bench import format as fmt
from integration.stack import loops_below, mounts_below


@pytest.mark.parametrize("name", ["lz4hc", "plain", "lz4"])
def test_each_format_reads_back_the_file_through_every_mount(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    target = root / fmt.SEQ_FILE
    target.parent.mkdir(parents=True)
    data = os.urandom(1 << 20) + bytes(3 << 20)  # some incompressible, some not
    target.write_bytes(data)
    cand = next(c for c in fmt.CANDIDATES if c.name == name)
    blob = tmp_path / "blob.erofs"
    fmt.build_blob(cand, "mkfs.erofs", root, blob, "sha256:" + "1" * 64, 1_700_000_000)
    again = tmp_path / "again.erofs"
    fmt.build_blob(cand, "mkfs.erofs", root, again, "sha256:" + "1" * 64, 1_700_000_000)
    assert blob.read_bytes() == again.read_bytes()  # deterministic, as the converter's blobs are
    copy = tmp_path / "cache.erofs"
    fmt.write_as_cache(blob, copy, [3, 0, 7], sync_every=256 << 10)
    scratch = tmp_path / "seq"
    for how, src in (("dir", root), ("loop", blob), ("file", blob), ("loop", copy)):
        assert fmt.seq_read(how, src, scratch) > 0, how
    # the bytes served through overlayfs over the erofs mount are the file's
    with fmt.mounted_erofs(copy, scratch / "mnt", "loop") as mnt, \
            fmt.overlay(mnt, scratch / "ovl", scratch / "empty") as ovl:
        assert hashlib.sha256((ovl / fmt.SEQ_FILE).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not mounts_below(tmp_path) and not loops_below(tmp_path)
