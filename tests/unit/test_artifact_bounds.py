"""Bounds on what a registry artifact can make a node do (issue 18 item 4): hot-block manifests too large to
decode (10^7 rows, a footer that lies about pages that unpack to gigabytes), ranges of 2^62 bytes or beyond
the blob the index describes, metadata that breaks the parser, multipart answers that never end or name
ranges never asked for, and lazy requests against a registry that drips its headers, body or error body.
No root: Parquet bytes, subprocesses to measure memory, a real HTTP server
(:class:`~integration.faultproxy.FaultProxy` as the registry) and the fetcher."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bootseer.hotblocks import (
    MAX_ARG_CHARS,
    MAX_ARGS,
    MAX_COMMANDS,
    MAX_DECODED_BYTES,
    MAX_MANIFEST_BLOB,
    MAX_RANGE,
    MAX_ROWS,
    META_KEY,
    SCHEMA,
    BadManifest,
    BlobInfo,
    HotBlockManifest,
    HotRange,
    merge,
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
GiB = 1 << 30

# Parses a manifest file in a fresh process (so that the peaks are this parse's alone) and prints the verdict,
# Arrow's peak allocation and the growth of the peak RSS over the parse (VmHWM: ru_maxrss would carry the
# forking test process's peak across exec).
PROBE = """\
import re, sys, pyarrow as pa
from bootseer.hotblocks import HotBlockManifest, BadManifest
def peak():
    return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
data = open(sys.argv[1], 'rb').read()
before = peak()
try:
    print('accepted', len(HotBlockManifest.from_parquet(data).ranges))
except BadManifest as e:
    print('refused:', str(e).splitlines()[0])
print(pa.default_memory_pool().max_memory())
print(peak() - before)
"""


def _probe(path: Path) -> tuple[str, int, int]:
    """(verdict, Arrow's peak bytes, RSS growth in bytes) of parsing ``path`` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    verdict, arrow, rss = out.stdout.splitlines()
    return verdict, int(arrow), int(rss)


def _meta(**over: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"version": 1, "subject": SUBJECT, "recordings": 1, "commands": [], "created": "",
                            "read_bytes": {}, "blobs": [{"digest": BLOB, "layer": LAYER, "size": GiB,
                                                         "chunk_size": 1 << 20}]}
    meta.update(over)
    return meta


def _write(batches: list[dict[str, pa.Array]], meta: dict[str, Any] | bytes, schema: pa.Schema = SCHEMA) -> bytes:
    """A Parquet file of ``batches`` (one row group each) with ``meta`` as the hot-block metadata."""
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    schema = schema.with_metadata({META_KEY: raw})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as w:
        for cols in batches:
            w.write_table(pa.table(cols, schema=schema))
    return buf.getvalue()


def _rows(n: int, start: int = 0, *, offset: int | None = None, length: int = 1 << 20) -> dict[str, pa.Array]:
    """``n`` rows of one blob: disjoint ``length``-byte ranges (or all at ``offset``), seq from ``start``."""
    offsets = [offset] * n if offset is not None else range(start * length, (start + n) * length, length)
    return {"layer_digest": pa.array([LAYER] * n).dictionary_encode(),
            "blob_digest": pa.array([BLOB] * n).dictionary_encode(),
            "offset": pa.array(offsets, pa.int64()), "length": pa.array([length] * n, pa.int64()),
            "first_access_ns": pa.array(range(start, start + n), pa.int64()),
            "seq": pa.array(range(start, start + n), pa.int64())}


# ------------------------------------------------------------------------------- manifest size and rows
def test_ten_million_rows_are_refused_from_the_footer_with_bounded_memory(tmp_path: Path) -> None:
    data = _write([_rows(10**6, k * 10**6, offset=0) for k in range(10)], _meta())
    assert len(data) < MAX_MANIFEST_BLOB  # small enough on the wire: the blob's size cap alone does not stop it
    (tmp_path / "hb.parquet").write_bytes(data)
    verdict, arrow, rss = _probe(tmp_path / "hb.parquet")
    assert verdict == f"refused: {10**7} rows, more than {MAX_ROWS}"
    assert arrow < 16 << 20, f"Arrow allocated {arrow} bytes to refuse it"
    assert rss < 64 << 20, f"the parse grew the process by {rss} bytes"


def test_a_manifest_at_the_row_cap_parses_in_bounded_memory(tmp_path: Path) -> None:
    """The largest manifest accepted is parsed in well under 200 MB (before the cap was lowered and the rows
    decoded lean, the cap's worth of rows took several hundred MB)."""
    data = _write([_rows(MAX_ROWS)], _meta(blobs=[{"digest": BLOB, "layer": LAYER, "size": MAX_ROWS << 20,
                                                   "chunk_size": 1 << 20}]))
    (tmp_path / "hb.parquet").write_bytes(data)
    verdict, _, rss = _probe(tmp_path / "hb.parquet")
    assert verdict == f"accepted {MAX_ROWS}"
    assert rss < 160 << 20, f"parsing {MAX_ROWS} rows grew the process by {rss} bytes"


def lying_footer(batches: int, unpacked: int) -> bytes:
    """``batches`` row groups of 4 rows whose layer dictionary is one string of ``unpacked`` bytes (zstd
    makes each a few KiB); each row group's footer ``total_byte_size`` is rewritten to claim 2 MiB."""
    big = pa.array(["x" * unpacked])
    cols = {**_rows(4), "layer_digest": pa.DictionaryArray.from_arrays(pa.array([0] * 4, pa.int32()), big)}
    data = _write([{**cols, "seq": pa.array(range(k * 4, k * 4 + 4), pa.int64())} for k in range(batches)], _meta())
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    claims = {meta.row_group(g).total_byte_size for g in range(batches)}
    footer_at = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    head, footer = data[:footer_at], data[footer_at:]
    for claim in claims:  # RowGroup field 2 (i64, compact protocol: header 0x16, then a zigzag varint)
        old = b"\x16" + _varint(claim * 2)
        assert footer.count(old) >= 1
        footer = footer.replace(old, b"\x16" + _varint((2 << 20) * 2, len(old) - 1))
    return head + footer


def _varint(v: int, width: int = 0) -> bytes:
    """``v`` as a varint of at least ``width`` bytes (padded with zero groups: same value, same length)."""
    out = bytearray()
    while True:
        out.append(v & 0x7F)
        v >>= 7
        if not v and len(out) >= width:
            return bytes(out)
        out[-1] |= 0x80


def test_a_footer_that_lies_cannot_make_the_pages_unpack_to_gigabytes(tmp_path: Path) -> None:
    """The footer says each row group decodes to 2 MiB; its dictionary page unpacks to 64 MiB.  The page
    headers are what the reader allocates by: refused from them, before a page is unpacked."""
    data = lying_footer(4, 64 << 20)
    assert len(data) < 1 << 20
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert sum(meta.row_group(g).total_byte_size for g in range(4)) < MAX_DECODED_BYTES  # the lie holds
    (tmp_path / "hb.parquet").write_bytes(data)
    verdict, arrow, rss = _probe(tmp_path / "hb.parquet")
    assert arrow < 16 << 20, f"Arrow allocated {arrow} bytes to refuse it"
    assert rss < 64 << 20, f"the parse grew the process by {rss} bytes"
    assert verdict == f"refused: its pages unpack to more than {MAX_DECODED_BYTES} bytes"


# ------------------------------------------------------------------------------------------- ranges
def test_ranges_of_2_62_bytes_are_refused_by_the_parser() -> None:
    """A blob said to have 2^63-1 bytes and a 2^62-byte range in it: self-consistent, yet no index describes
    such a blob and no recording makes such a range (it would become 2^45 chunk numbers in the prefetcher)."""
    huge = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, (1 << 63) - 1, 1 << 20)},
                            [HotRange(LAYER, BLOB, 0, 1 << 62, 0, 0)])
    with pytest.raises(BadManifest, match="blob size"):
        HotBlockManifest.from_parquet(huge.to_parquet())
    plausible = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, 1 << 40, 1 << 20)},
                                 [HotRange(LAYER, BLOB, 0, 1 << 39, 0, 0)])  # a blob an index can describe
    with pytest.raises(BadManifest, match=f"longer than {MAX_RANGE}"):
        HotBlockManifest.from_parquet(plausible.to_parquet())


def test_ranges_are_bounded_by_the_index_blob_size_not_the_manifest_claim() -> None:
    """The manifest says its blob has 1 GiB and asks for 8 MiB at 512 MiB; the index says 1 MiB."""
    liar = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, GiB, 1 << 20)},
                            [HotRange(LAYER, BLOB, 512 << 20, 8 << 20, 0, 0)])
    parsed = HotBlockManifest.from_parquet(liar.to_parquet())  # within its own claim: the parser accepts it
    parsed.check([LAYER], {LAYER: BLOB})
    with pytest.raises(BadManifest, match=f"{GiB} bytes in the manifest, {1 << 20} in the index"):
        parsed.check([LAYER], {LAYER: BLOB}, {BLOB: 1 << 20})
    assert plan(parsed, LAYER, BLOB, size=1 << 20) is None  # the prefetcher's per-layer check agrees
    honest = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, 1 << 20, 1 << 20)},
                              [HotRange(LAYER, BLOB, 0, 4096, 0, 0)])
    HotBlockManifest.from_parquet(honest.to_parquet()).check([LAYER], {LAYER: BLOB}, {BLOB: 1 << 20})


@pytest.mark.parametrize(("rows", "why"), [
    ({**_rows(2), "offset": pa.array([0, 512 << 10], pa.int64())}, "overlap"),  # second starts inside the first
    ({**_rows(1), "blob_digest": pa.array(["sha256:" + "9" * 64]).dictionary_encode()}, "not one of"),
    ({**_rows(1), "offset": pa.array([-4096], pa.int64())}, "outside"),
    ({**_rows(1), "length": pa.array([0], pa.int64())}, "outside"),
    ({**_rows(1), "offset": pa.array([GiB - 4096], pa.int64())}, "outside"),  # ends past the blob
    ({**_rows(2), "seq": pa.array([0, 0], pa.int64())}, "seq"),
])
def test_bad_rows_are_refused(rows: dict[str, pa.Array], why: str) -> None:
    with pytest.raises(BadManifest, match=why):
        HotBlockManifest.from_parquet(_write([rows], _meta()))


# ----------------------------------------------------------------------------------------- metadata
_DEEP = b'{"version": 1, "commands": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(("meta", "schema"), [
    (_DEEP, SCHEMA),  # RecursionError in json.loads
    (b'{"version": Infinity}', SCHEMA),  # OverflowError in int()
    (b"[1, 2]", SCHEMA),  # not an object
    (_meta(commands=[["x"]] * (MAX_COMMANDS + 1)), SCHEMA),
    (_meta(commands=[["x"] * (MAX_ARGS + 1)]), SCHEMA),
    (_meta(commands=[["x" * (MAX_ARG_CHARS + 1)]]), SCHEMA),
    (_meta(commands=[[1]]), SCHEMA),
    (_meta(read_bytes={"sha256:" + "9" * 64: 1}), SCHEMA),  # a blob the manifest does not have
    (_meta(read_bytes={BLOB: GiB + 1}), SCHEMA),  # more than the blob
    (_meta(recordings=True), SCHEMA),
    (_meta(subject="../../etc"), SCHEMA),
    (_meta(blobs=[{"digest": BLOB, "layer": LAYER, "size": GiB, "chunk_size": 1 << 20}] * 2), SCHEMA),
    (_meta(blobs=[{"digest": BLOB, "layer": LAYER, "size": GiB, "chunk_size": 64 << 30}]), SCHEMA),
    (_meta(), pa.schema([f if f.name != "offset" else pa.field("offset", pa.float64(), nullable=False)
                         for f in SCHEMA])),  # another column type (an ∞ would be an OverflowError)
])
def test_hostile_metadata_is_a_bad_manifest_never_another_exception(meta: dict[str, Any] | bytes,
                                                                    schema: pa.Schema) -> None:
    rows = _rows(1)
    if schema.field("offset").type == pa.float64():
        rows["offset"] = pa.array([float("inf")])
    with pytest.raises(BadManifest):
        HotBlockManifest.from_parquet(_write([rows], meta, schema))


def test_what_the_writer_keeps_the_reader_accepts() -> None:
    """Many merged recordings with long command lines: the metadata keeps the newest commands, cut to the
    caps, so a manifest the recorder pushes is never one a node refuses."""
    one = HotBlockManifest(SUBJECT, {BLOB: BlobInfo(LAYER, GiB, 1 << 20)}, [HotRange(LAYER, BLOB, 0, 4096, 0, 0)],
                           commands=[["python", "-c", "é" * 10_000, *map(str, range(100))]])
    many = merge(*[one] * (MAX_COMMANDS + 5))
    back = HotBlockManifest.from_parquet(many.to_parquet())
    assert back.recordings == MAX_COMMANDS + 5
    assert len(back.commands) == MAX_COMMANDS
    assert back.commands[0][:2] == ["python", "-c"] and len(back.commands[0]) == MAX_ARGS
    assert len(back.commands[0][2]) == MAX_ARG_CHARS
    with pytest.raises(ValueError, match="max_range"):
        merge(one, max_range=MAX_RANGE + 1)


# ------------------------------------------------------------------------------------------- multipart
class _Resp:
    """A response whose body is ``data`` (what BodyReader needs of requests' Response)."""

    def __init__(self, data: bytes) -> None:
        import urllib3

        self.raw = urllib3.HTTPResponse(body=io.BytesIO(data), preload_content=False)


def _parse(body: bytes, wanted: dict[int, int], size: int | None = None) -> int:
    return read_parts(BodyReader(_Resp(body), "http://r/blob", None), b"B", "http://r/blob",  # type: ignore[arg-type]
                      {a: (b, lambda buf, n: None) for a, b in wanted.items()}, size)


def _part(a: int, b: int, fill: bytes = b"x", total: bytes = b"100") -> bytes:
    return b"--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes %d-%d/%s\r\n\r\n%s\r\n" % (
        a, b - 1, total, fill * (b - a))


@pytest.mark.parametrize(("body", "why"), [
    (_part(0, 10) + b"--B--\r\n", "lacks 1"),  # a range missing
    (_part(0, 10) + _part(0, 10) + b"--B--\r\n", "did not ask for"),  # the same part twice
    (_part(0, 10) + _part(50, 60) + b"--B--\r\n", "did not ask for"),  # a part never asked for
    (_part(0, 10) + _part(20, 25) + b"--B--\r\n", "did not ask for"),  # a part shorter than asked
    (_part(0, 10) + _part(15, 30) + b"--B--\r\n", "did not ask for"),  # overlapping, starting elsewhere
    (_part(0, 10, total=b"99") + b"--B--\r\n", "blob of 99 bytes"),  # another blob
    (b"--B\r\nContent-Range: bytes " + b"0" * 5000 + b"-9/100\r\n\r\n", "did not ask for"),  # int() refuses it
    (_part(0, 10)[:30], "ended early"),  # cut inside a part
    (_part(0, 10) + b"x" * 50 + b"\r\n", "unexpected line"),  # no boundary after a part
    (b"--B\r\n" + b"X-Pad: y\r\n" * 10_000, "header lines"),  # headers without end
    (b"\r\n" * 10_000, "empty lines"),  # empty lines without end
    (b"--B\r\nContent-Range: bytes 0-9/100" + b"y" * 20_000, "longer than"),  # one endless header line
])
def test_a_hostile_multipart_answer_is_an_error_and_ends(body: bytes, why: str) -> None:
    with pytest.raises(FetchError, match=why):
        _parse(body, {0: 10, 20: 30}, 100)


def test_a_cut_multipart_answer_is_retried_a_malformed_one_is_not() -> None:
    with pytest.raises(FetchError) as cut:
        _parse(_part(0, 10)[:30], {0: 10})
    assert (cut.value.reason, cut.value.transient) == ("cut", True)
    with pytest.raises(FetchError) as bad:
        _parse(_part(50, 60), {0: 10})
    assert (bad.value.reason, bad.value.transient) == ("protocol", False)


def test_the_multipart_answer_asked_for_is_read() -> None:
    body = b"\r\n" + _part(0, 10) + _part(20, 30, b"y", b"*") + b"--B--\r\n"
    assert _parse(body, {0: 10, 20: 30}, 100) == 20


# ------------------------------------------------------------------------------------ request deadlines
def _fetcher(tmp_path: Path, proxy: FaultProxy, blob: bytes) -> Fetcher:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    spec = BlobSpec(registry=proxy.url, repository="tarpit/img", digest=digest, size=len(blob),
                    chunk_size=len(blob), chunks=chunk_digests(blob, len(blob)))
    return Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(4, 1), client=HttpClient(),
                   config=FetchConfig(request_timeout=1.0, io_timeout=5.0, retry_window=0.0))


BLOB_64K = bytes(range(256)) * 256


def test_a_background_request_to_a_dripping_registry_ends_at_its_deadline(tmp_path: Path) -> None:
    """Prefetch and background fill have no read deadline of their own; each request still ends within
    ``request_timeout``.  Without it (and with ``iter_content``, which waits for 256 KiB per piece) the fill
    would take the dripped body to its end: 64 KiB at 1 byte per 20 ms is ~20 minutes."""
    digest = "sha256:" + hashlib.sha256(BLOB_64K).hexdigest()
    with FaultProxy(origin={digest: BLOB_64K}) as proxy:
        proxy.add("drip", method="GET", path="/blobs/", delay=0.02, times=10**6)
        with pytest.raises(FetchError, match="timed out"):
            _fetcher(tmp_path, proxy, BLOB_64K).ensure([0], BACKGROUND)


def test_a_registry_dripping_its_headers_cannot_hold_a_background_request(tmp_path: Path) -> None:
    """Status line and headers a byte every 50 ms (about 10 s of them): every socket read stays under its
    timeout, so only the watchdog ends the request at its 1 s deadline — while the proxy is still dripping.
    Without it the request waited for the whole head, then failed on the body's deadline check."""
    digest = "sha256:" + hashlib.sha256(BLOB_64K).hexdigest()
    with FaultProxy(origin={digest: BLOB_64K}) as proxy:
        proxy.add("drip_head", method="GET", path="/blobs/", delay=0.05, times=10**6)
        with pytest.raises(FetchError, match="timed out") as e:
            _fetcher(tmp_path, proxy, BLOB_64K).ensure([0], BACKGROUND)
        assert proxy.count("dripped") == 0, "the request outlived the tarpit's whole head"
        assert e.value.reason == "timeout"


def test_a_registry_dripping_an_error_body_cannot_hold_a_background_request(tmp_path: Path) -> None:
    """A 404 whose small body (read to keep the connection) comes a byte every 300 ms, about 10 s: the
    request ends at its deadline with the status it got, while the proxy is still dripping."""
    with FaultProxy(origin={}) as proxy:  # the blob is unknown: 404
        proxy.add("drip", method="GET", path="/blobs/", delay=0.3, times=10**6)
        with pytest.raises(FetchError, match="HTTP 404"):
            _fetcher(tmp_path, proxy, BLOB_64K).ensure([0], BACKGROUND)
        assert proxy.count("dripped") == 0, "the request outlived the tarpit's error body"
