"""Bounds on what a registry artifact can make a node do (issue 18 item 4): hot-block manifests too large to
decode, ranges beyond the blob the index describes, multipart answers that never end, and background
requests against a registry that drips its answer.  No root: Parquet bytes, a real HTTP server
(:class:`~integration.faultproxy.FaultProxy` as the registry) and the fetcher."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bootseer.hotblocks import (
    MAX_MANIFEST_BLOB,
    MAX_ROWS,
    META_KEY,
    SCHEMA,
    BadManifest,
    BlobInfo,
    HotBlockManifest,
    HotRange,
)
from bootseer.index import chunk_digests
from integration.faultproxy import FaultProxy
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import FetchError
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.multipart import BodyReader, read_parts
from snapshotter.lazy.prefetcher import plan
from snapshotter.lazy.scheduling import BACKGROUND, Scheduler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.transport import HttpClient

LAYER = "sha256:" + "1" * 64
BLOB = "sha256:" + "2" * 64
SUBJECT = "sha256:" + "3" * 64


def _manifest_bytes(rows: int, batch: int, blob_size: int, length: int) -> bytes:
    """A hot-block manifest of ``rows`` identical-looking rows, written ``batch`` rows at a time (so that
    building it costs the test little memory; zstd makes it small on the wire)."""
    meta = {"version": 1, "subject": SUBJECT, "recordings": 1, "commands": [], "created": "", "read_bytes": {},
            "blobs": [{"digest": BLOB, "layer": LAYER, "size": blob_size, "chunk_size": 1 << 20}]}
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as w:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            cols = {"layer_digest": pa.array([LAYER] * n).dictionary_encode(),
                    "blob_digest": pa.array([BLOB] * n).dictionary_encode(),
                    "offset": pa.array([0] * n, pa.int64()), "length": pa.array([length] * n, pa.int64()),
                    "first_access_ns": pa.array([0] * n, pa.int64()),
                    "seq": pa.array(range(start, start + n), pa.int64())}
            w.write_table(pa.table(cols, schema=schema))
    return buf.getvalue()


def test_ten_million_rows_are_refused_from_the_footer_with_bounded_memory(tmp_path: Path) -> None:
    data = _manifest_bytes(10**7, 10**6, 1 << 30, 1 << 20)
    assert len(data) < MAX_MANIFEST_BLOB  # small enough on the wire: the blob's size cap alone does not stop it
    (tmp_path / "hb.parquet").write_bytes(data)
    # a fresh process, so that the peak of Arrow's memory pool is this parse's alone
    probe = ("import sys, resource, pyarrow as pa\n"
             "from bootseer.hotblocks import HotBlockManifest, BadManifest\n"
             "try:\n"
             "    HotBlockManifest.from_parquet(open(sys.argv[1], 'rb').read())\n"
             "    print('accepted')\n"
             "except BadManifest as e:\n"
             "    print('refused:', e)\n"
             "print(pa.default_memory_pool().max_memory())\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "hb.parquet")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    verdict, peak = out.stdout.splitlines()
    assert verdict == f"refused: {10**7} rows, more than {MAX_ROWS}"
    assert int(peak) < 16 << 20, f"Arrow allocated {int(peak)} bytes to refuse it"


def test_a_range_the_manifest_bounds_only_by_its_own_claim_is_not_prefetched() -> None:
    """The manifest says its blob has 2^63-1 bytes and asks for 2^62 of them; the index says 1 MiB.  Planning
    with the index's size refuses it (without it, 2^62 bytes would become 2^45 chunk numbers)."""
    huge = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, (1 << 63) - 1, 1 << 20)},
                            [HotRange(LAYER, BLOB, 0, 1 << 62, 0, 0)])
    again = HotBlockManifest.from_parquet(huge.to_parquet())  # self-consistent: the parser alone accepts it
    assert plan(again, LAYER, BLOB) == [(0, 1 << 62, 0)]
    assert plan(again, LAYER, BLOB, size=1 << 20) is None
    honest = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, 1 << 20, 1 << 20)}, [HotRange(LAYER, BLOB, 0, 4096,
                                                                                              0, 0)])
    assert plan(honest, LAYER, BLOB, size=1 << 20) == [(0, 4096, 0)]


def test_a_chunk_size_beyond_the_index_limit_is_refused() -> None:
    data = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, 1 << 20, 1 << 20)}).to_parquet()
    bad = data.replace(b'"chunk_size": 1048576', b'"chunk_size": 68719476736')
    assert bad != data
    with pytest.raises(BadManifest):
        HotBlockManifest.from_parquet(bad)


# ------------------------------------------------------------------------------------------- multipart
class _Resp:
    """A response whose body is ``data`` (what BodyReader needs of requests' Response)."""

    def __init__(self, data: bytes) -> None:
        import urllib3

        self.raw = urllib3.HTTPResponse(body=io.BytesIO(data), preload_content=False)


def _parse(body: bytes, wanted: dict[int, int]) -> int:
    return read_parts(BodyReader(_Resp(body), "http://r/blob", None), b"B", "http://r/blob",  # type: ignore[arg-type]
                      {a: (b, lambda buf, n: None) for a, b in wanted.items()})


def _part(a: int, b: int, fill: bytes = b"x") -> bytes:
    return b"--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes %d-%d/100\r\n\r\n%s\r\n" % (
        a, b - 1, fill * (b - a))


@pytest.mark.parametrize(("body", "why"), [
    (_part(0, 10) + b"--B--\r\n", "lacks 1"),  # a range missing
    (_part(0, 10) + _part(0, 10) + b"--B--\r\n", "did not ask for"),  # the same part twice
    (_part(0, 10) + _part(50, 60) + b"--B--\r\n", "did not ask for"),  # a part never asked for
    (_part(0, 10)[:30], "ended early"),  # cut inside a part
    (b"--B\r\n" + b"X-Pad: y\r\n" * 10_000, "header lines"),  # headers without end
    (b"\r\n" * 10_000, "empty lines"),  # empty lines without end
    (b"--B\r\nContent-Range: bytes 0-9/100" + b"y" * 20_000, "longer than"),  # one endless header line
])
def test_a_hostile_multipart_answer_is_an_error_and_ends(body: bytes, why: str) -> None:
    with pytest.raises(FetchError, match=why):
        _parse(body, {0: 10, 20: 30})


def test_the_multipart_answer_asked_for_is_read() -> None:
    assert _parse(b"\r\n" + _part(0, 10) + _part(20, 30, b"y") + b"--B--\r\n", {0: 10, 20: 30}) == 20


# ------------------------------------------------------------------------------------ request deadlines
def test_a_background_request_to_a_dripping_registry_ends_at_its_deadline(tmp_path: Path) -> None:
    """Prefetch and background fill have no read deadline of their own; each request still ends within
    ``request_timeout``.  Without it (and with ``iter_content``, which waits for 256 KiB per piece) the fill
    would take the dripped body to its end: 64 KiB at 1 byte per 20 ms is ~20 minutes."""
    blob = bytes(range(256)) * 256  # 64 KiB
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with FaultProxy(origin={digest: blob}) as proxy:
        proxy.add("drip", method="GET", path="/blobs/", delay=0.02, times=10**6)
        spec = BlobSpec(registry=proxy.url, repository="tarpit/img", digest=digest, size=len(blob),
                        chunk_size=len(blob), chunks=chunk_digests(blob, len(blob)))
        fetcher = Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(4, 1), client=HttpClient(),
                          config=FetchConfig(request_timeout=1.0, io_timeout=5.0, retry_window=0.0))
        with pytest.raises(FetchError, match="timed out"):
            fetcher.ensure([0], BACKGROUND)
