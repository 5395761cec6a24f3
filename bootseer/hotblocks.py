"""The hot-block manifest: which byte ranges of which lazy layer a start-up read, and in what order.

Built by ``bootseer record`` from the reads that reached FUSE while an image ran once from cold caches, and
read by the snapshotter's prefetcher, which fetches the ranges of a freshly mounted layer in the same order
before the container asks for them.  The format and its rules need no kernel and no daemon, so every rule
below is unit-tested on its own; only :func:`push` / :func:`fetch` talk to a registry.

From access records to ranges (:func:`build`)
---------------------------------------------
* Every access ``(blob, offset, length, t_ns)`` is widened to whole *units* — the layer's chunk size from the
  BootSeer index (128 KiB by default): the fetcher moves, verifies and caches whole chunks, so a finer
  manifest would only pretend to be cheaper than it is.  Sub-chunk gaps between reads disappear this way.
* De-duplicated: a unit read many times keeps its *first* access time (times are relative to the start of
  the recording, so recordings can be compared and merged).
* Coalesced: units that are adjacent (or separated by at most ``gap`` bytes of units nobody read, which are
  then fetched too: one request instead of two) become one range, but a range is cut where it would exceed
  ``max_range`` bytes or where its units were first read more than ``window_ns`` apart — so a library read
  sequentially over seconds stays spread over time in the order, and the prefetcher keeps fetching in the
  order the container will read.
* Ordered by first access: ``seq`` numbers the ranges of the whole image (all layers) by
  ``(first_access_ns, layer position, offset)``.

Parquet schema (one row per range; written with pyarrow, zstd-compressed)
-------------------------------------------------------------------------
=================  ========  ==================================================================
column             type      meaning
=================  ========  ==================================================================
``layer_digest``   string    the image layer (as in the image manifest), dictionary-encoded
``blob_digest``    string    its EROFS blob (as in the BootSeer index): the offsets are in this blob
``offset``         int64     first byte of the range in the blob (a multiple of the chunk size)
``length``         int64     bytes (whole chunks; the blob's last chunk may be short)
``first_access_ns`` int64    first read of any byte of the range, ns after the recording started
``seq``            int64     position in the image's prefetch order (0, 1, …; by first access)
=================  ========  ==================================================================

The schema's metadata key ``bootseer.hotblocks`` holds JSON: ``{"version": 1, "subject": "<image manifest
digest>", "blobs": [{"digest": "<blob digest>", "layer": "<layer digest>", "size": N, "chunk_size": N}, …]
(in image layer order), "recordings": N, "commands": [[argv...], ...], "created": "<RFC 3339>"}``.
A file that does not follow all of this (or whose ranges fall outside their blob, overlap, or exceed
:data:`MAX_RANGE`) is rejected as :class:`BadManifest` — the prefetcher then ignores it with a warning, it
never fetches from a manifest it cannot trust.  The file is a registry writer's: before any column is decoded
its footer and every page header are held to :data:`MAX_ROWS` rows and :data:`MAX_DECODED_BYTES` unpacked
(:mod:`bootseer.parquetbounds`), the metadata to :data:`MAX_META_BYTES` with every field typed and capped, and
a blob's size must be the one its index states (:meth:`HotBlockManifest.check`): only that size bounds what a
range may ask for.

Where the ranges come from: the access log (:mod:`bootseer.accesslog`), one line per read that reached FUSE.

Merging (:func:`merge`) takes the union of the units of several manifests of one image, each unit keeping
its earliest first access, and coalesces again: a manifest recorded for one command plus one recorded for
another prefetches what either read, in the order either read it first.

The artifact in the registry (:func:`push`, :func:`candidates`, :func:`fetch`)
-----------------------------------------------------------------------------
The manifest is an OCI artifact whose ``subject`` is the image manifest.  Wire format (beside the BootSeer
index, found the same way — referrers API, or the ``sha256-<hex>`` tag schema on registries without it)::

    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.bootseer.hotblocks.v1",
     "config": <the empty descriptor, application/vnd.oci.empty.v1+json>,
     "layers": [{"mediaType": "application/vnd.bootseer.hotblocks.v1.parquet", "digest": ..., "size": ...}],
     "subject": <the image manifest's descriptor>,
     "annotations": {"io.bootseer.hotblocks.version": "1", "io.bootseer.hotblocks.created": "<RFC 3339>",
                     "io.bootseer.hotblocks.recordings": "<n>", "io.bootseer.hotblocks.bytes": "<hot bytes>"}}

The image's tag and digests never change.  Each recording pushes a new artifact (a merge includes the old
one's ranges); readers take the newest by its ``created`` annotation, falling back to listing order.
Only the newest is ever used: an older one that is corrupt is not looked at, a newest one that is corrupt
(or another image's) is ignored with a warning — no prefetch then, never a wrong one.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bootseer.accesslog import Access
from bootseer.index import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_INDEX_BYTES, MAX_LAYERS, chunks_covering
from bootseer.parquetbounds import BadParquet, decoded_bytes
from bootseer.reference import Reference
from bootseer.registry import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    MT_OCI_EMPTY,
    MT_OCI_MANIFEST,
    Descriptor,
    DigestMismatch,
    NotFound,
    RegistryClient,
)

log = logging.getLogger("bootseer.hotblocks")

FORMAT_VERSION = 1
META_KEY = b"bootseer.hotblocks"
DEFAULT_CHUNK = DEFAULT_CHUNK_SIZE  # tests only: a real manifest takes each blob's from its index
PAGE = 4096  # granularity of read_bytes
DEFAULT_MAX_RANGE = 8 << 20  # the fetcher's largest range request
DEFAULT_WINDOW_NS = 250_000_000  # units first read further apart than this start a new range

ARTIFACT_TYPE = "application/vnd.bootseer.hotblocks.v1"
PARQUET_MEDIA_TYPE = "application/vnd.bootseer.hotblocks.v1.parquet"
ANN_PREFIX = "io.bootseer.hotblocks."
MAX_MANIFEST_BLOB = 64 << 20
# Bounds, checked before a column is decoded (the footer's claims, then every page header: see
# bootseer.parquetbounds), then on every value, so that a registry writer cannot make a node materialise
# millions of rows or gigabytes of strings.  What a real start-up records: ranges are disjoint runs of whole
# chunks, coalesced up to DEFAULT_MAX_RANGE; the torch start-up read ~135 MB, about a thousand 128 KiB
# chunks (docs/bench/startup.md).  2^18 ranges is 32 GiB read as scattered single chunks at the default chunk
# size, beyond what any start-up reads before the workload itself begins, and parsed in about a hundred MB
# (HotRange has slots; docs/bench/design-measurements.md).
MAX_ROWS = 1 << 18
MAX_DECODED_BYTES = 32 << 20  # every page once unpacked; a real manifest needs ~40 bytes a row
MAX_PAGES = 1 << 14  # pyarrow writes a page per 20k rows of a column (and one dictionary page per chunk)
MAX_ROW_GROUPS = 1024  # pyarrow writes one per write_table call
MAX_META_BYTES = 1 << 20  # the JSON metadata (blobs, commands, read_bytes): what the caps below need
MAX_RANGE = 64 << 20  # one range's length: the recorder cuts at max_range (default 8 MiB) or one chunk
MAX_BLOB_SIZE = (MAX_INDEX_BYTES // 64) * MAX_CHUNK_SIZE  # the largest blob an index can describe (64-hex digests)
# commands kept in the metadata (for `bootseer hotblocks show`): the newest, each argv cut; UTF-8, these fit in
# MAX_META_BYTES beside MAX_LAYERS blobs
MAX_COMMANDS = 16
MAX_ARGS = 32
MAX_ARG_CHARS = 256
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,128}")

SCHEMA = pa.schema([
    pa.field("layer_digest", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    pa.field("blob_digest", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
    pa.field("first_access_ns", pa.int64(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
])


class BadManifest(ValueError):
    """A hot-block manifest that cannot be trusted (corrupt, another image's, inconsistent)."""


@dataclass(frozen=True)
class BlobInfo:
    """What the index says about a layer's blob: enough to align and bound its ranges."""

    layer: str
    size: int
    chunk_size: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"blob of layer {self.layer}: bad size {self.size} / chunk size {self.chunk_size}")


@dataclass(frozen=True, slots=True)
class HotRange:
    layer_digest: str
    blob_digest: str
    offset: int
    length: int
    first_access_ns: int
    seq: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class HotBlockManifest:
    subject: str  # the image manifest digest the recording ran
    blobs: dict[str, BlobInfo]  # blob digest → its layer, size, chunk size (in image layer order)
    ranges: list[HotRange] = field(default_factory=list)  # in seq order
    recordings: int = 1
    commands: list[list[str]] = field(default_factory=list)
    created: str = ""
    # blob → bytes the recorded reads really asked for (distinct 4 KiB pages): what the chunk-aligned hot set
    # costs over it is the price of fetching and verifying whole chunks (a merge keeps the largest recording's)
    read_bytes: dict[str, int] = field(default_factory=dict)

    # -- queries ------------------------------------------------------------------------------------
    def layer_order(self) -> list[str]:
        return [b.layer for b in self.blobs.values()]

    def blob_of(self, layer_digest: str) -> str | None:
        return next((d for d, b in self.blobs.items() if b.layer == layer_digest), None)

    def ranges_for(self, layer_digest: str) -> list[tuple[int, int, int]]:
        """``(offset, length, first_access_ns)`` of one layer's ranges, in prefetch order (what the prefetcher
        is given: the time lets it fetch every layer's ranges in one image-wide order, see
        :mod:`snapshotter.lazy.prefetcher`)."""
        return [(r.offset, r.length, r.first_access_ns) for r in self.ranges if r.layer_digest == layer_digest]

    def hot_bytes(self, layer_digest: str | None = None) -> int:
        return sum(r.length for r in self.ranges if layer_digest is None or r.layer_digest == layer_digest)

    def duration_ns(self) -> int:
        return max((r.first_access_ns for r in self.ranges), default=0)

    def summary(self, buckets: int = 10) -> dict[str, Any]:
        """Per layer: ranges, hot bytes, share of the layer's blob; for the image: the share of all blobs and
        how the hot bytes spread over the recording's time (cumulative share per time bucket)."""
        total_blob = sum(b.size for b in self.blobs.values())
        hot = self.hot_bytes()
        layers = []
        for blob, info in self.blobs.items():
            hb = self.hot_bytes(info.layer)
            layers.append({"layer": info.layer, "blob": blob, "blob_size": info.size, "chunk_size": info.chunk_size,
                           "ranges": sum(1 for r in self.ranges if r.blob_digest == blob), "hot_bytes": hb,
                           "read_bytes": self.read_bytes.get(blob, 0),
                           "share_of_layer": round(hb / info.size, 4),
                           "share_of_hot_set": round(hb / hot, 4) if hot else 0.0})
        span = self.duration_ns()
        spread = []
        if self.ranges and buckets > 0:
            done = 0
            by_time = sorted(self.ranges, key=lambda r: r.first_access_ns)
            k = 0
            for b in range(1, buckets + 1):
                limit = span * b // buckets
                while k < len(by_time) and by_time[k].first_access_ns <= limit:
                    done += by_time[k].length
                    k += 1
                spread.append({"until_s": round(limit / 1e9, 3), "hot_bytes": done,
                               "share": round(done / hot, 4) if hot else 0.0})
        return {"subject": self.subject, "recordings": self.recordings, "commands": self.commands,
                "created": self.created, "ranges": len(self.ranges), "hot_bytes": hot, "image_blob_bytes": total_blob,
                "read_bytes": sum(self.read_bytes.values()),
                "share_of_image": round(hot / total_blob, 4) if total_blob else 0.0,
                "duration_s": round(span / 1e9, 3), "layers": layers, "spread": spread}

    # -- validation ---------------------------------------------------------------------------------
    def check(self, image_layers: Sequence[str], index_blobs: Mapping[str, str] | None = None,
              index_sizes: Mapping[str, int] | None = None) -> None:
        """Raise :class:`BadManifest` unless this manifest fits the image: every layer it names is one of the
        image's ``image_layers``; (with ``index_blobs``, layer → EROFS blob digest from the image's index)
        its blob is the one the index names now — offsets into another blob would prefetch the wrong bytes;
        and (with ``index_sizes``, blob digest → size from the index) the blob has the size the index says.
        The parser checked every range against the size the manifest claims; only the (signed) index's size
        may bound what a range asks for, so a claim that differs from it refuses the whole manifest."""
        known = set(image_layers)
        for blob, info in self.blobs.items():
            if info.layer not in known:
                raise BadManifest(f"layer {info.layer} is not a layer of the image")
            if index_blobs is not None:
                now = index_blobs.get(info.layer)
                if now is not None and now != blob:
                    raise BadManifest(f"layer {info.layer}: recorded on blob {blob}, the index now says {now}")
            if index_sizes is not None:
                size = index_sizes.get(blob)
                if size is not None and size != info.size:
                    raise BadManifest(f"blob {blob}: {info.size} bytes in the manifest, {size} in the index")

    # -- Parquet ------------------------------------------------------------------------------------
    def to_parquet(self) -> bytes:
        cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
        for r in self.ranges:
            cols["layer_digest"].append(r.layer_digest)
            cols["blob_digest"].append(r.blob_digest)
            cols["offset"].append(r.offset)
            cols["length"].append(r.length)
            cols["first_access_ns"].append(r.first_access_ns)
            cols["seq"].append(r.seq)
        meta = {"version": FORMAT_VERSION, "subject": self.subject, "recordings": self.recordings,
                "commands": _bounded_commands(self.commands), "created": self.created, "read_bytes": self.read_bytes,
                "blobs": [{"digest": d, "layer": b.layer, "size": b.size, "chunk_size": b.chunk_size}
                          for d, b in self.blobs.items()]}
        raw = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
        schema = SCHEMA.with_metadata({META_KEY: raw})
        table = pa.table(cols, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes) -> HotBlockManifest:
        """Parse and check a manifest; anything malformed or beyond the bounds (see :data:`MAX_ROWS`) is
        :class:`BadManifest`, never another exception and never a partial result: the bytes come from
        whoever can push to the repository."""
        try:
            return cls._from_parquet(data)
        except BadManifest:
            raise
        except BadParquet as e:
            raise BadManifest(str(e)) from e
        except (pa.ArrowException, OSError) as e:
            raise BadManifest(f"not a readable Parquet file: {e}") from e
        except Exception as e:  # any failure on untrusted bytes (JSON nested too deep, Infinity, …)
            raise BadManifest(f"malformed: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_parquet(cls, data: bytes) -> HotBlockManifest:
        if len(data) > MAX_MANIFEST_BLOB:
            raise BadManifest(f"{len(data)} bytes, more than {MAX_MANIFEST_BLOB}")
        # no reader threads: a manifest is small, and pyarrow's thread pool still running at interpreter
        # exit aborted short CLI runs ("terminate called without an active exception").
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose first import holds
        # the snapshotter's GIL at the first Prepare of a pull, while its layers are set up
        # (figures: docs/bench/design-measurements.md)
        pf = pq.ParquetFile(io.BytesIO(data), thrift_string_size_limit=4 * MAX_META_BYTES,
                            thrift_container_size_limit=1 << 16)
        _check_footer(pf)
        decoded_bytes(data, pf.metadata, limit=MAX_DECODED_BYTES, max_pages=MAX_PAGES)
        subject, blobs, recordings, commands, created, read_bytes = _parse_meta(pf.schema_arrow.metadata or {})
        table = pf.read(use_threads=False)  # bounded now: rows, pages and what they unpack to
        if table.num_rows != pf.metadata.num_rows:
            raise BadManifest(f"{table.num_rows} rows read, the footer says {pf.metadata.num_rows}")
        ranges = _ranges(table, blobs)
        return cls(subject, blobs, ranges, recordings, commands, created, read_bytes)


def _check_footer(pf: pq.ParquetFile) -> None:
    """Refuse, from the footer alone, a manifest too large to decode or not of this schema (see
    :data:`MAX_ROWS`); the page headers are checked next (:func:`bootseer.parquetbounds.decoded_bytes`)."""
    meta = pf.metadata
    if meta.num_rows > MAX_ROWS:
        raise BadManifest(f"{meta.num_rows} rows, more than {MAX_ROWS}")
    if meta.num_row_groups > MAX_ROW_GROUPS:
        raise BadManifest(f"{meta.num_row_groups} row groups, more than {MAX_ROW_GROUPS}")
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if decoded > MAX_DECODED_BYTES:
        raise BadManifest(f"{decoded} bytes of columns once decoded, more than {MAX_DECODED_BYTES}")
    if meta.num_columns != len(SCHEMA) or not pf.schema_arrow.remove_metadata().equals(SCHEMA):
        raise BadManifest(f"not the hot-block schema: {pf.schema_arrow.remove_metadata()}")


def _int(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` if it is an int in ``[lo, hi]`` (not a bool, float or string), else :class:`BadManifest`."""
    if type(value) is not int or not lo <= value <= hi:
        raise BadManifest(f"{what}: {str(value)[:40]!r} is not an integer in {lo}..{hi}")
    return value


def _str(value: object, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadManifest(f"{what}: not a string of at most {limit} characters")
    return value


def _digest(value: object, what: str) -> str:
    s = _str(value, what)
    if not _DIGEST.fullmatch(s):
        raise BadManifest(f"{what}: {s[:80]!r} is not a digest")
    return s


def _parse_meta(schema_meta: Mapping[bytes, bytes]) -> tuple[str, dict[str, BlobInfo], int, list[list[str]], str,
                                                             dict[str, int]]:
    """The ``bootseer.hotblocks`` JSON, every field typed and bounded (see the module doc)."""
    raw = schema_meta.get(META_KEY)
    if raw is None:
        raise BadManifest("no bootseer.hotblocks metadata in the Parquet schema")
    if len(raw) > MAX_META_BYTES:
        raise BadManifest(f"metadata of {len(raw)} bytes, more than {MAX_META_BYTES}")
    meta = json.loads(raw)  # (nesting too deep is a RecursionError: BadManifest, see from_parquet)
    if not isinstance(meta, dict):
        raise BadManifest("the metadata is not a JSON object")
    if meta.get("version") != FORMAT_VERSION:
        raise BadManifest(f"unsupported hot-block manifest version {str(meta.get('version'))[:40]}")
    entries = meta.get("blobs")
    if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
        raise BadManifest(f"blobs: not a list of at most {MAX_LAYERS}")
    blobs: dict[str, BlobInfo] = {}
    for b in entries:
        if not isinstance(b, dict):
            raise BadManifest("blobs: an entry is not an object")
        digest = _digest(b.get("digest"), "blob digest")
        if digest in blobs:
            raise BadManifest(f"blob {digest} listed twice")
        blobs[digest] = BlobInfo(_digest(b.get("layer"), "layer digest"),
                                 _int(b.get("size"), "blob size", 1, MAX_BLOB_SIZE),
                                 _int(b.get("chunk_size"), "chunk size", 1, MAX_CHUNK_SIZE))
    subject = _digest(meta.get("subject"), "subject")
    recordings = _int(meta.get("recordings", 1), "recordings", 1, 1 << 31)
    commands = meta.get("commands") or []
    if not isinstance(commands, list) or len(commands) > MAX_COMMANDS:
        raise BadManifest(f"commands: not a list of at most {MAX_COMMANDS}")
    argvs: list[list[str]] = []
    for c in commands:
        if not isinstance(c, list) or len(c) > MAX_ARGS:
            raise BadManifest(f"commands: an entry is not a list of at most {MAX_ARGS} arguments")
        argvs.append([_str(a, "command argument", MAX_ARG_CHARS) for a in c])
    created = _str(meta.get("created", ""), "created", 64)
    read = meta.get("read_bytes") or {}
    if not isinstance(read, dict):
        raise BadManifest("read_bytes: not an object")
    read_bytes: dict[str, int] = {}
    for d, n in read.items():
        if d not in blobs:
            raise BadManifest(f"read_bytes: {str(d)[:80]!r} is not a blob of the manifest")
        read_bytes[d] = _int(n, f"read_bytes of {d}", 0, blobs[d].size)
    return subject, blobs, recordings, argvs, created, read_bytes


def _strings(column: pa.ChunkedArray, known: Mapping[str, str], what: str) -> list[str]:
    """A dictionary-encoded column as one str per row, each the metadata's own object (``known``'s value):
    never a string per row decoded from the file, and only values the metadata names."""
    out: list[str] = []
    for chunk in column.chunks:
        if len(chunk.dictionary) > MAX_LAYERS:
            raise BadManifest(f"{what}: a dictionary of {len(chunk.dictionary)} values")
        values = [known.get(v) if isinstance(v, str) else None for v in chunk.dictionary.to_pylist()]
        for k in chunk.indices.to_pylist():
            s = values[k] if k is not None and 0 <= k < len(values) else None
            if s is None:
                raise BadManifest(f"row {len(out)}: {what} is not one of the metadata's blobs")
            out.append(s)
    return out


def _ranges(table: pa.Table, blobs: Mapping[str, BlobInfo]) -> list[HotRange]:
    """Every row, checked: a blob (and its layer) of the metadata, ``0 <= offset``, ``0 < length <=
    MAX_RANGE``, inside the blob as the metadata says (:meth:`HotBlockManifest.check` holds that size to the
    index's), disjoint from the blob's other ranges, ``first_access_ns >= 0``, ``seq`` numbering 0..n-1."""
    blob_col = _strings(table.column("blob_digest"), {d: d for d in blobs}, "blob_digest")
    layer_col = _strings(table.column("layer_digest"), {b.layer: b.layer for b in blobs.values()}, "layer_digest")
    offsets, lengths, times, seqs = (table.column(n).to_pylist() for n in ("offset", "length", "first_access_ns",
                                                                            "seq"))
    ranges: list[HotRange] = []
    for i, (blob, layer, off, length, t, seq) in enumerate(zip(blob_col, layer_col, offsets, lengths, times, seqs,
                                                              strict=True)):
        info = blobs[blob]
        if info.layer != layer:
            raise BadManifest(f"row {i}: blob {blob} is not of layer {layer}")
        if not (isinstance(off, int) and isinstance(length, int) and isinstance(t, int) and isinstance(seq, int)):
            raise BadManifest(f"row {i}: a null value")
        if off < 0 or not 0 < length <= MAX_RANGE or off + length > info.size or t < 0:
            raise BadManifest(f"row {i}: range {off}+{length} outside blob {blob} ({info.size} bytes), longer "
                              f"than {MAX_RANGE}, or bad time {t}")
        ranges.append(HotRange(layer, blob, off, length, t, seq))
    del offsets, lengths, times, seqs, blob_col, layer_col
    ranges.sort(key=lambda r: r.seq)
    if any(r.seq != k for k, r in enumerate(ranges)):
        raise BadManifest("seq is not 0..n-1")
    by_place = sorted(ranges, key=lambda r: (r.blob_digest, r.offset))
    for a, b in itertools.pairwise(by_place):
        if a.blob_digest == b.blob_digest and b.offset < a.end:
            raise BadManifest(f"ranges {a.offset}+{a.length} and {b.offset}+{b.length} of blob {a.blob_digest} "
                              "overlap")
    return ranges


def _bounded_commands(commands: Sequence[Sequence[str]]) -> list[list[str]]:
    """What the metadata keeps of the recordings' commands: the newest :data:`MAX_COMMANDS`, each argv cut to
    :data:`MAX_ARGS` arguments of :data:`MAX_ARG_CHARS` characters (they are for people to read)."""
    return [[str(a)[:MAX_ARG_CHARS] for a in c[:MAX_ARGS]] for c in commands[-MAX_COMMANDS:]]

# ------------------------------------------------------------------------------------------- building
def _units(blob: BlobInfo, offset: int, length: int) -> range:
    return chunks_covering(blob.size, blob.chunk_size, offset, length)


def _coalesce(layer: str, blob_digest: str, blob: BlobInfo, first: Mapping[int, int], *, gap: int, max_range: int,
              window_ns: int) -> list[tuple[int, int, int]]:
    """Unit → first access time, to ``(offset, length, first_access_ns)`` ranges (see the module doc)."""
    cs = blob.chunk_size
    gap_units = max(0, gap // cs)
    max_units = max(1, max_range // cs)
    out: list[tuple[int, int, int]] = []
    start = prev = -1
    t_first = t_min = 0
    for u in sorted(first):
        t = first[u]
        if start >= 0 and u - prev - 1 <= gap_units and u - start < max_units and abs(t - t_first) <= window_ns:
            prev = u
            t_min = min(t_min, t)
            continue
        if start >= 0:
            out.append(_span(blob, start, prev, t_min))
        start = prev = u
        t_first = t_min = t
    if start >= 0:
        out.append(_span(blob, start, prev, t_min))
    return out


def _span(blob: BlobInfo, first_unit: int, last_unit: int, t: int) -> tuple[int, int, int]:
    off = first_unit * blob.chunk_size
    end = min(blob.size, (last_unit + 1) * blob.chunk_size)
    return off, end - off, t


def _assemble(subject: str, blobs: Mapping[str, BlobInfo], firsts: Mapping[str, Mapping[int, int]], *, gap: int,
              max_range: int, window_ns: int) -> list[HotRange]:
    position = {d: i for i, d in enumerate(blobs)}
    rows: list[tuple[int, int, int, str, int]] = []  # (t, layer position, offset, blob, length)
    for blob_digest, first in firsts.items():
        info = blobs[blob_digest]
        for off, length, t in _coalesce(info.layer, blob_digest, info, first, gap=gap, max_range=max_range,
                                        window_ns=window_ns):
            rows.append((t, position[blob_digest], off, blob_digest, length))
    rows.sort()
    return [HotRange(blobs[b].layer, b, off, length, t, seq) for seq, (t, _, off, b, length) in enumerate(rows)]


def build(subject: str, blobs: Mapping[str, BlobInfo], accesses: Iterable[Access], *, gap: int = 0,
          max_range: int = DEFAULT_MAX_RANGE, window_ns: int = DEFAULT_WINDOW_NS, start_ns: int | None = None,
          command: Sequence[str] | None = None) -> HotBlockManifest:
    """A manifest from the access records of one recording (see the module doc).

    ``blobs`` maps each lazily served blob of the image to its layer (in image order); accesses of other
    blobs are ignored.  Times become relative to ``start_ns`` (default: the first access)."""
    _check_max_range(max_range)
    acc = [a for a in accesses if a.blob in blobs]
    base = start_ns if start_ns is not None else min((a.t_ns for a in acc), default=0)
    firsts: dict[str, dict[int, int]] = {}
    pages: dict[str, set[int]] = {}
    for a in acc:
        size = blobs[a.blob].size
        end = min(size, a.offset + a.length)
        if a.offset >= 0 and a.offset < end:
            pages.setdefault(a.blob, set()).update(range(a.offset // PAGE, (end - 1) // PAGE + 1))
        first = firsts.setdefault(a.blob, {})
        t = max(0, a.t_ns - base)
        for u in _units(blobs[a.blob], a.offset, a.length):
            old = first.get(u)
            if old is None or t < old:
                first[u] = t
    ranges = _assemble(subject, blobs, firsts, gap=gap, max_range=max_range, window_ns=window_ns)
    read = {b: min(blobs[b].size, len(p) * PAGE) for b, p in pages.items()}
    return HotBlockManifest(subject, dict(blobs), ranges, 1, _bounded_commands([command] if command else []), _now(),
                            read)


def merge(*manifests: HotBlockManifest, gap: int = 0, max_range: int = DEFAULT_MAX_RANGE,
          window_ns: int = DEFAULT_WINDOW_NS) -> HotBlockManifest:
    """The union of several manifests of one image; every unit keeps its earliest first access.

    All must have the same subject; a blob recorded with another chunk size (a re-conversion) cannot be
    merged — the caller should drop the older manifest then (:class:`BadManifest`)."""
    if not manifests:
        raise ValueError("nothing to merge")
    _check_max_range(max_range)
    subject = manifests[0].subject
    blobs: dict[str, BlobInfo] = {}
    firsts: dict[str, dict[int, int]] = {}
    for m in manifests:
        if m.subject != subject:
            raise BadManifest(f"cannot merge manifests of {subject} and {m.subject}")
        for d, info in m.blobs.items():
            have = blobs.setdefault(d, info)
            if have != info:
                raise BadManifest(f"blob {d}: recorded as {have} and as {info}")
        for r in m.ranges:
            first = firsts.setdefault(r.blob_digest, {})
            for u in _units(blobs[r.blob_digest], r.offset, r.length):
                old = first.get(u)
                if old is None or r.first_access_ns < old:
                    first[u] = r.first_access_ns
    ranges = _assemble(subject, blobs, firsts, gap=gap, max_range=max_range, window_ns=window_ns)
    commands = _bounded_commands([c for m in manifests for c in m.commands])
    read = {b: max(m.read_bytes.get(b, 0) for m in manifests) for b in blobs}
    return HotBlockManifest(subject, blobs, ranges, sum(m.recordings for m in manifests), commands, _now(), read)


def _check_max_range(max_range: int) -> None:
    if not 0 < max_range <= MAX_RANGE:
        raise ValueError(f"max_range {max_range} not in 1..{MAX_RANGE}: readers refuse longer ranges")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------- artifact


@dataclass
class Found:
    """A hot-block artifact fetched from the registry."""

    digest: str  # the artifact manifest's digest
    blob: str  # the Parquet blob's digest
    manifest: HotBlockManifest


def artifact_manifest(blob: Descriptor, subject: Descriptor, hb: HotBlockManifest) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_OCI_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": PARQUET_MEDIA_TYPE, "digest": blob.digest, "size": blob.size}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANN_PREFIX + "version": "1", ANN_PREFIX + "created": hb.created,
                        ANN_PREFIX + "recordings": str(hb.recordings), ANN_PREFIX + "bytes": str(hb.hot_bytes())},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push(client: RegistryClient, image: Reference | str, subject: Descriptor, hb: HotBlockManifest) -> str:
    """Push the Parquet blob, the empty config and the artifact manifest (a referrer of ``subject``);
    return the artifact manifest's digest."""
    ref = _repo(image)
    if hb.subject != subject.digest:
        raise ValueError(f"manifest recorded for {hb.subject}, not {subject.digest}")
    data = hb.to_parquet()
    desc = client.push_blob(ref, data)
    client.push_blob(ref, EMPTY_JSON)
    raw = artifact_manifest(Descriptor(PARQUET_MEDIA_TYPE, desc.digest, desc.size), subject, hb)
    return client.push_referrer(ref, raw, MT_OCI_MANIFEST)


def candidates(client: RegistryClient, image: Reference | str, manifest_digest: str) -> list[Descriptor]:
    """The image's hot-block artifacts, newest first."""
    ref = _repo(image)
    descs = client.referrers(ref, manifest_digest, ARTIFACT_TYPE)
    order = {d.digest: i for i, d in enumerate(descs)}
    return sorted(descs, key=lambda d: ((d.annotations or {}).get(ANN_PREFIX + "created", ""), order[d.digest]),
                  reverse=True)


def fetch(client: RegistryClient, image: Reference | str, manifest_digest: str, *,
          image_layers: Sequence[str] | None = None, index_blobs: Mapping[str, str] | None = None,
          index_sizes: Mapping[str, int] | None = None, descs: Sequence[Descriptor] | None = None) -> Found | None:
    """The newest hot-block manifest of the image, or None (none, or the newest is unusable: warned).

    With ``image_layers`` (the image's layer digests), ``index_blobs`` (layer → EROFS blob of the index) and
    ``index_sizes`` (blob → its size in the index), a manifest that does not fit the image is ignored too
    (:meth:`HotBlockManifest.check`).  ``descs``: :func:`candidates` if already listed.
    Registry errors other than "not found" propagate."""
    ref = _repo(image)
    for desc in descs if descs is not None else candidates(client, ref, manifest_digest):
        try:
            man = client.get_manifest(ref.with_digest(desc.digest))
        except NotFound:
            continue  # a stale entry of the tag schema
        layer = next((d for d in man.layers if d.media_type == PARQUET_MEDIA_TYPE), None)
        if layer is None or (man.subject is not None and man.subject.digest != manifest_digest):
            log.warning("hot-block artifact %s of %s is malformed; ignored", desc.digest, manifest_digest)
            return None
        try:
            if layer.size > MAX_MANIFEST_BLOB:
                raise BadManifest(f"{layer.size} bytes is more than a hot-block manifest can be")
            hb = HotBlockManifest.from_parquet(client.get_blob(ref, layer.digest, max_size=MAX_MANIFEST_BLOB))
            if hb.subject != manifest_digest:
                raise BadManifest(f"recorded for image {hb.subject}")
            if image_layers is not None:
                hb.check(image_layers, index_blobs, index_sizes)
        except (BadManifest, DigestMismatch, NotFound) as e:  # a blob gone or not what it claims: corrupt too
            log.warning("hot-block manifest %s of %s ignored: %s", desc.digest, manifest_digest, e)
            return None
        return Found(desc.digest, layer.digest, hb)
    return None


def _repo(image: Reference | str) -> Reference:
    ref = image if isinstance(image, Reference) else Reference.parse(image)
    return ref.in_repository(ref.repository)
