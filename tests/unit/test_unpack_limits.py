"""Bombs in a pushed layer are refused before they cost memory or disk (issue 18): a PAX header of megabytes,
millions of entries, a stream that inflates far beyond its compressed size.  A full scratch disk is the host's
failure, not the layer's: see tests/kernel/test_unpack_host_errors.py."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import zstandard

from integration.oci import entry, tar_of
from registry_sidecar.unpack import MAX_HEADER_BYTES, LayerError, Unpacker, open_layer_stream


def _root(tmp_path: Path) -> str:
    root = tmp_path / "root"
    root.mkdir(parents=True)
    return str(root)


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info, data = entry("f", b"x")
    info.pax_headers = {"comment": "x" * (MAX_HEADER_BYTES + 1)}
    with pytest.raises(LayerError, match="extended header"):
        Unpacker(_root(tmp_path)).unpack(io.BytesIO(tar_of([(info, data)])))
    info.pax_headers = {"comment": "x" * 1000}  # an ordinary one is fine
    stats = Unpacker(_root(tmp_path / "ok")).unpack(io.BytesIO(tar_of([(info, data)])))
    assert stats.files == 1


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    layer = tar_of([entry(f"f{i}", b"") for i in range(20)])
    with pytest.raises(LayerError, match="more than 10 entries"):
        Unpacker(_root(tmp_path), max_entries=10).unpack(io.BytesIO(layer))
    assert Unpacker(_root(tmp_path / "ok"), max_entries=20).unpack(io.BytesIO(layer)).files == 20


def test_a_decompression_bomb_is_refused_by_its_ratio(tmp_path: Path) -> None:
    zeros = tar_of([entry("zeros", bytes(64 << 20))])
    blob = zstandard.ZstdCompressor(level=3).compress(zeros)
    assert len(zeros) > 1000 * len(blob)  # what makes it a bomb
    with pytest.raises(LayerError, match="decompression bomb"):
        Unpacker(_root(tmp_path), compressed_size=len(blob), ratio_floor=1 << 20).unpack(
            open_layer_stream(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+zstd"))
    # the same ratio under the floor is a small layer of zeros, which is fine
    stats = Unpacker(_root(tmp_path / "ok"), compressed_size=len(blob)).unpack(
        open_layer_stream(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+zstd"))
    assert stats.files == 1 and os.path.getsize(tmp_path / "ok" / "root" / "zeros") == 64 << 20
