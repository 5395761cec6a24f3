"""Index v3: chunks travel as zstd frames of a wire blob (issue 20, docs/bench/format.md).

The index round trip and its bounds on a hostile frame table; the converter's frames; the node's fetcher
reading a wire blob through a real HTTP server (the fault proxy's own origin) and a real docker-registry
(multi-range requests): ranges in wire offsets, chunks decompressed, bounded and verified before they are
served or cached."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bootseer.index import (
    EROFS_MEDIA_TYPE,
    WIRE_MEDIA_TYPE,
    BadIndex,
    CorruptFrame,
    ImageIndex,
    LayerBlob,
    WireBlob,
    artifact_manifest,
    frame_bound,
    inflate,
    pack_frames,
)
from bootseer.registry import Descriptor
from integration.faultproxy import FaultProxy
from registry_sidecar.convert import compress_chunks
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import FetchError
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.scheduling import DEMAND, PREFETCH, Scheduler
from snapshotter.lazy.spec import BlobSpec, wire_fields
from snapshotter.lazy.testing import Registry, push_blob
from snapshotter.lazy.transport import HttpClient

CS = 64 << 10
REPO = "t/wire"
SUBJECT = "sha256:" + "3" * 64


def _node_blob(n_chunks: int = 16, tail: int = 777, seed: int = 11) -> bytes:
    """Compressible, not trivially: base64 of random bytes (what zstd shrinks by about a quarter)."""
    raw = base64.b64encode(random.Random(seed).randbytes(n_chunks * CS))
    return raw[: n_chunks * CS - CS + tail]


def _layer(tmp_path: Path, data: bytes) -> tuple[LayerBlob, bytes]:
    """The v3 layer entry of ``data`` as the converter makes it, and its wire blob."""
    (tmp_path / "node").write_bytes(data)
    digest, size, chunks, wire = compress_chunks(tmp_path / "node", CS, tmp_path / "wire")
    lb = LayerBlob("sha256:" + "1" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 10,
                   Descriptor(EROFS_MEDIA_TYPE, digest, size), CS, chunks, "sha256:" + "4" * 64, wire=wire)
    return lb, (tmp_path / "wire").read_bytes()


def _doc(lb: LayerBlob) -> dict[str, Any]:
    return dict(json.loads(ImageIndex(SUBJECT, {lb.layer_digest: lb}).to_json()))


# ------------------------------------------------------------------------------------------- the index
def test_v3_index_round_trip_and_v2_still_written_and_read(tmp_path: Path) -> None:
    data = _node_blob()
    lb, wire = _layer(tmp_path, data)
    assert lb.wire is not None and lb.wire.blob.size == len(wire) < len(data)
    assert lb.wire.blob.digest == "sha256:" + hashlib.sha256(wire).hexdigest()
    assert lb.fetched == lb.wire.blob and lb.wire.blob.media_type == WIRE_MEDIA_TYPE
    offsets = lb.wire.offsets()
    for i in range(lb.chunk_count):  # frame i is chunk i: decompressed, the node bytes the index hashes
        off, n = lb.chunk_range(i)
        assert inflate(wire[offsets[i] : offsets[i + 1]], n) == data[off : off + n]
    idx = ImageIndex(SUBJECT, {lb.layer_digest: lb})
    doc = json.loads(idx.to_json())
    assert doc["schemaVersion"] == 3 and doc["layers"][0]["wire"]["codec"] == "zstd"
    assert ImageIndex.from_json(idx.to_json()) == idx
    art = json.loads(artifact_manifest(Descriptor("x", "sha256:" + "5" * 64, 1), Descriptor("y", SUBJECT, 1),
                                       [lb], 3))
    assert [(d["digest"], d["mediaType"]) for d in art["layers"][1:]] == [(lb.wire.blob.digest, WIRE_MEDIA_TYPE)]
    # version 2: no wire object, written and read as before (a v2-only node reads only this)
    v2 = LayerBlob(**{**lb.__dict__, "wire": None})
    old = ImageIndex(SUBJECT, {v2.layer_digest: v2}, version=2)
    assert json.loads(old.to_json())["schemaVersion"] == 2 and ImageIndex.from_json(old.to_json()) == old
    with pytest.raises(ValueError, match="version 2"):
        ImageIndex(SUBJECT, {lb.layer_digest: lb}, version=2).to_json()
    # a wire object in a v2 document is not read (a v2 layer is fetched as stored)
    doc["schemaVersion"] = 2
    assert ImageIndex.from_json(json.dumps(doc).encode()).layers[lb.layer_digest].wire is None
    # on the node: the spec persists its frame table, and never shares a layer with the as-stored spec
    spec, plain = _spec(lb, "http://127.0.0.1:1"), _spec(v2, "http://127.0.0.1:1")
    assert BlobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec and spec.key != plain.key
    assert spec.blob_url("http://h").endswith(lb.wire.blob.digest) and plain.blob_url("http://h").endswith(
        lb.blob.digest)
    assert "wire" not in plain.to_json()  # (a v2 layer's persisted spec is what it always was)


def _frames(doc: dict[str, Any]) -> list[int]:
    raw = base64.b64decode(doc["layers"][0]["wire"]["frames"])
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


@pytest.mark.parametrize("hostile", ["sum", "count", "oversized", "empty", "base64"])
def test_hostile_frame_tables_are_refused(tmp_path: Path, hostile: str) -> None:
    lb, _ = _layer(tmp_path, _node_blob())
    doc = _doc(lb)
    wire = doc["layers"][0]["wire"]
    frames = _frames(doc)
    if hostile == "sum":  # the frames do not cut the wire blob
        wire["blob"]["size"] += 1
    elif hostile == "count":  # one frame too few: the same total, in fewer frames
        wire["frames"] = pack_frames([frames[0] + frames[1], *frames[2:]])
    elif hostile == "oversized":  # one chunk's frame past any compressor's output for it (sums kept right)
        frames[0] = frame_bound(CS) + 1
        wire["blob"]["size"] = sum(frames)
        wire["frames"] = pack_frames(frames)
    elif hostile == "empty":
        frames[1] += frames[0]
        frames[0] = 0
        wire["frames"] = pack_frames(frames)
    else:
        wire["frames"] = "!" * len(wire["frames"])
    with pytest.raises(BadIndex):
        ImageIndex.from_json(json.dumps(doc).encode())
    if hostile in ("sum", "count", "oversized", "empty"):  # a spec persisted on a node is checked the same way
        with pytest.raises(ValueError):
            BlobSpec(registry="http://127.0.0.1:1", repository=REPO, digest=lb.blob.digest, size=lb.blob.size,
                     chunk_size=CS, chunks=lb.chunks, codec="zstd", wire_digest=wire["blob"]["digest"],
                     wire_size=wire["blob"]["size"], frames=tuple(frames[1:] if hostile == "count" else frames))


def test_a_layer_of_an_unknown_codec_is_read_but_not_known(tmp_path: Path) -> None:
    lb, _ = _layer(tmp_path, _node_blob())
    doc = _doc(lb)
    doc["layers"][0]["wire"].update(codec="brotli", frames="whatever a newer converter writes")
    got = ImageIndex.from_json(json.dumps(doc).encode()).layers[lb.layer_digest]
    assert got.wire is not None and not got.wire.known and got.wire.codec == "brotli"
    assert ImageIndex.from_json(ImageIndex(SUBJECT, {got.layer_digest: got}).to_json()).layers == {
        got.layer_digest: got}  # (the node's disk cache of the index keeps it)
    with pytest.raises(ValueError, match="codec"):
        BlobSpec(registry="http://127.0.0.1:1", repository=REPO, digest=got.blob.digest, size=got.blob.size,
                 chunk_size=CS, chunks=got.chunks, **wire_fields(got))


def test_a_frame_never_inflates_past_its_chunk() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (64 << 20))  # announces 64 MiB
    quiet = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\0" * (64 << 20))
    assert len(bomb) < frame_bound(CS) and len(quiet) < frame_bound(CS)  # both pass the index's bound
    with pytest.raises(CorruptFrame, match="announces"):
        inflate(bomb, CS)
    with pytest.raises(CorruptFrame):
        inflate(quiet, CS)
    short = zstandard.ZstdCompressor(level=3).compress(b"\0" * (CS - 1))
    with pytest.raises(CorruptFrame):
        inflate(short, CS)
    assert inflate(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\1" * CS), CS) == b"\1" * CS


# ------------------------------------------------------------------------------------------ the fetcher
def _spec(lb: LayerBlob, base: str) -> BlobSpec:
    return BlobSpec(registry=base, repository=REPO, digest=lb.blob.digest, size=lb.blob.size, chunk_size=CS,
                    chunks=lb.chunks, **wire_fields(lb))


def _fetcher(tmp_path: Path, spec: BlobSpec, **cfg: Any) -> Fetcher:
    return Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(8, 2), client=HttpClient(),
                   config=FetchConfig(**cfg))


def _spans(srv: FaultProxy) -> list[tuple[int, int]]:
    return [(s[0], s[1] + 1) for e in list(srv.exchanges) if e.method == "GET" and (s := e.span()) is not None]


def test_v3_reads_are_wire_ranges_coalesced_and_counted_in_wire_bytes(tmp_path: Path) -> None:
    data = _node_blob()
    lb, wire = _layer(tmp_path, data)
    assert lb.wire is not None
    at = lb.wire.offsets()
    with FaultProxy(origin={lb.wire.blob.digest: wire}) as srv:
        f = _fetcher(tmp_path, _spec(lb, srv.url), max_range_bytes=3 * CS)
        assert f.read(CS + 5, 2 * CS) == data[CS + 5 : 3 * CS + 5]  # chunks 1..3: one range of frames 1..3
        assert _spans(srv) == [(at[1], at[4])]
        assert all(e.path.endswith(lb.wire.blob.digest) for e in srv.exchanges)  # never the node blob
        srv.exchanges.clear()
        f.ensure(range(0, 10), PREFETCH)  # chunk 0 | 4..6 | 7..9: runs capped in chunks
        assert _spans(srv) == [(at[0], at[1]), (at[4], at[7]), (at[7], at[10])]
        assert f.stats.bytes[DEMAND] == at[4] - at[1] and f.stats.bytes[PREFETCH] == at[1] + at[10] - at[4]
        for i in range(10):
            off, n = lb.chunk_range(i)
            assert f.cache.read(off, n) == data[off : off + n]
        assert f.read(len(data) - 100, 500) == data[-100:]  # the short last chunk, clamped


def _forged(lb: LayerBlob, wire: bytes, which: int, frame: bytes) -> tuple[LayerBlob, bytes]:
    """``lb`` whose frame ``which`` is ``frame`` (the frame table and wire descriptor made to fit it: only
    the chunk digests, the node's own, stand between the node and those bytes)."""
    assert lb.wire is not None
    at = lb.wire.offsets()
    forged = wire[: at[which]] + frame + wire[at[which + 1] :]
    frames = list(lb.wire.frames)
    frames[which] = len(frame)
    w = WireBlob("zstd", Descriptor(WIRE_MEDIA_TYPE, "sha256:" + hashlib.sha256(forged).hexdigest(), len(forged)),
                 tuple(frames))
    return LayerBlob(**{**lb.__dict__, "wire": w}), forged


@pytest.mark.parametrize("forgery", ["other-bytes", "bomb", "not-zstd"])
def test_a_forged_frame_is_eio_and_never_cached(tmp_path: Path, forgery: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A frame that decompresses to other bytes of the right length (a digest mismatch after decompression),
    one that would inflate past its chunk, one that is no zstd at all: the read of that chunk fails (EIO),
    the chunk is never cached; its neighbours in the same range request are served."""
    data = _node_blob()
    lb, wire = _layer(tmp_path, data)
    frame = {"other-bytes": zstandard.ZstdCompressor(level=3).compress(bytes(reversed(data[3 * CS : 4 * CS]))),
             "bomb": zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\0" * (256 << 20)),
             "not-zstd": b"\x28\xb5\x2f\xfd" + b"\xff" * 64}[forgery]
    lb, wire = _forged(lb, wire, 3, frame)
    assert ImageIndex.from_json(ImageIndex(SUBJECT, {lb.layer_digest: lb}).to_json())  # the index is sound
    with FaultProxy(origin={lb.fetched.digest: wire}) as srv:
        f = _fetcher(tmp_path, _spec(lb, srv.url), retries=1, backoff=0.01)
        with caplog.at_level(logging.ERROR, "bootseer.lazy.fetch"), pytest.raises(FetchError) as ei:
            f.read(2 * CS, 3 * CS)  # chunks 2, 3, 4 in one range request
        assert ei.value.errno == errno.EIO
        assert "failed verification" in caplog.text and lb.chunks[3] in caplog.text
        assert f.cache.has(2) and f.cache.has(4) and not f.cache.has(3)
        assert f.stats.corrupt == 2  # the first attempt and the retry
        assert f.read(4 * CS, 10) == data[4 * CS : 4 * CS + 10]


# ----------------------------------------------------------------------------- a real registry: multi-range
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


def test_v3_prefetch_runs_go_as_one_multi_range_request_of_frames(tmp_path: Path, registry: Registry) -> None:
    data = _node_blob(n_chunks=24)
    lb, wire = _layer(tmp_path, data)
    assert lb.wire is not None
    push_blob(registry.url, REPO, wire)
    at = lb.wire.offsets()
    with FaultProxy(registry.url.removeprefix("http://")) as proxy:
        f = _fetcher(tmp_path, _spec(lb, proxy.url))
        f.ensure_runs([[7, 8], [2], [12]], PREFETCH)
        multi = [e.range for e in list(proxy.exchanges) if e.method == "GET" and e.range and "," in e.range]
        assert multi == [f"bytes={at[7]}-{at[9] - 1},{at[2]}-{at[3] - 1},{at[12]}-{at[13] - 1}"]
        assert f.stats.requests[PREFETCH] == 1 and f.stats.bytes[PREFETCH] == at[9] - at[7] + at[3] - at[2] + \
            at[13] - at[12]
        for i in (2, 7, 8, 12):
            off, n = lb.chunk_range(i)
            assert f.cache.has(i) and f.cache.read(off, n) == data[off : off + n]
        assert not f.cache.has(3)


def test_tools_read_the_node_blob_back_from_the_wire_blob(tmp_path: Path, registry: Registry) -> None:
    """What a tool (or a test) that needs the EROFS image itself does with a v3 layer: the registry holds only
    the wire blob; the node blob is inflated from it, every chunk verified."""
    from bootseer.index import fetch_node_blob, read_chunk
    from bootseer.registry import RegistryClient

    data = _node_blob(n_chunks=9)
    lb, wire = _layer(tmp_path, data)
    push_blob(registry.url, REPO, wire)
    client, ref = RegistryClient(plain_http=True), f"{registry.url.removeprefix('http://')}/{REPO}"
    with open(tmp_path / "back", "w+b") as fh:
        fetch_node_blob(client, ref, lb, fh)
    assert (tmp_path / "back").read_bytes() == data
    assert read_chunk(client, ref, lb, 8) == data[8 * CS :]
    forged, bad = _forged(lb, wire, 2, zstandard.ZstdCompressor().compress(bytes(CS)))
    push_blob(registry.url, REPO, bad)
    with open(tmp_path / "bad", "wb") as fh, pytest.raises(BadIndex, match="chunk 2"):
        fetch_node_blob(client, ref, forged, fh)
