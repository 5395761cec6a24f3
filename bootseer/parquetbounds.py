"""How much memory a Parquet file from an untrusted writer makes pyarrow decode, read before it decodes anything.

The footer's sizes and row counts are the writer's claim.  What the reader allocates comes from each page's
own header: it decompresses a page into a buffer of the header's ``uncompressed_page_size`` and decodes a
dictionary page whole, whatever the footer says — a zstd page of a few KiB unpacks to gigabytes, so a file
whose footer claims a few small rows can still take the node's memory.  :func:`decoded_bytes` walks the page
headers of every column chunk over the byte range the reader reads (computed as it computes it) and sums what
they unpack to, without decompressing anything; :mod:`bootseer.hotblocks` refuses a manifest above its cap
before pyarrow reads a column.

Only the Thrift compact protocol's framing is read here (enough to find each header's end and its two size
fields); a header that does not parse, or a page that does not fit its column chunk, is :class:`BadParquet`.
"""

from __future__ import annotations

import pyarrow.parquet as pq

MAX_HEADER_BYTES = 64 << 10  # a page header: a few fields and, at most, min/max statistics of short strings
MAX_DEPTH = 8  # nesting of Thrift structs/lists in a page header (a real one nests two deep)

# Thrift compact protocol type ids (what the low nibble of a field header or a list header says)
_TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT, _UUID = range(1, 14)


class BadParquet(ValueError):
    """A Parquet file whose pages cannot be bounded: malformed headers, pages outside their column chunk."""


class _Compact:
    """A reader of Thrift compact-protocol framing over ``data[pos:end]`` (every read bounds-checked)."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise BadParquet(f"page header runs past byte {self.end}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def skip_bytes(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise BadParquet(f"page header field of {n} bytes runs past byte {self.end}")
        self.pos += n

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise BadParquet("page header varint longer than 10 bytes")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def skip(self, kind: int, depth: int, in_list: bool = False) -> None:
        """Skip one value of type ``kind`` (in a list a bool takes a byte; as a field, none)."""
        if depth > MAX_DEPTH:
            raise BadParquet(f"page header nested more than {MAX_DEPTH} deep")
        if kind in (_TRUE, _FALSE):
            if in_list:
                self.skip_bytes(1)
        elif kind == _I8:
            self.skip_bytes(1)
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.skip_bytes(8)
        elif kind == _UUID:
            self.skip_bytes(16)
        elif kind == _BINARY:
            self.skip_bytes(self.varint())
        elif kind in (_LIST, _SET):
            head = self.byte()
            n = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(n):  # each element takes at least a byte: n is bounded by what is left
                self.skip(head & 0x0F, depth + 1, in_list=True)
        elif kind == _MAP:
            n = self.varint()
            if n:
                types = self.byte()
                for _ in range(n):
                    self.skip(types >> 4, depth + 1, in_list=True)
                    self.skip(types & 0x0F, depth + 1, in_list=True)
        elif kind == _STRUCT:
            self.struct(depth + 1, {})
        else:
            raise BadParquet(f"page header has a field of unknown type {kind}")

    def struct(self, depth: int, wanted: dict[int, int | None]) -> None:
        """Read a struct; the i32 fields whose ids are keys of ``wanted`` are stored there, the rest skipped."""
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            kind, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            if fid in wanted and kind == _I32:
                wanted[fid] = self.zigzag()
            else:
                self.skip(kind, depth)


def chunk_range(col: pq.ColumnChunkMetaData) -> tuple[int, int]:
    """``(start, end)`` of a column chunk's pages in the file, as pyarrow's reader computes it: from the
    dictionary page when there is one before the data pages, ``total_compressed_size`` bytes."""
    start = col.data_page_offset
    dict_at = col.dictionary_page_offset
    if col.has_dictionary_page and dict_at is not None and 0 < dict_at < start:
        start = dict_at
    return start, start + col.total_compressed_size


def decoded_bytes(data: bytes, meta: pq.FileMetaData, *, limit: int, max_pages: int) -> int:
    """The bytes every page of ``data`` unpacks to (the sum of the page headers' ``uncompressed_page_size``);
    raises :class:`BadParquet` above ``limit`` or ``max_pages`` pages, or on a page that does not fit.

    Only files written by parquet-cpp (pyarrow) are accepted: for a parquet-mr writer older than 1.2.9 the
    reader reads up to 100 bytes past each column chunk's end (PARQUET-816), pages this walk would not see."""
    if not (meta.created_by or "").startswith("parquet-cpp"):
        raise BadParquet(f"written by {meta.created_by!r}, not by parquet-cpp (pyarrow)")
    total = pages = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.file_path:
                raise BadParquet(f"column chunk {g}/{c} lives in another file ({col.file_path!r})")
            start, end = chunk_range(col)
            if start < 0 or end < start or end > len(data):
                raise BadParquet(f"column chunk {g}/{c} at bytes {start}-{end}, outside the file")
            pos = start
            while pos < end:
                pages += 1
                if pages > max_pages:
                    raise BadParquet(f"more than {max_pages} pages")
                reader = _Compact(data, pos, min(end, pos + MAX_HEADER_BYTES))
                sizes: dict[int, int | None] = {2: None, 3: None}  # uncompressed, compressed page size
                reader.struct(0, sizes)
                unpacked, packed = sizes[2], sizes[3]
                if unpacked is None or packed is None or unpacked < 0 or packed < 0:
                    raise BadParquet(f"column chunk {g}/{c}: a page header without valid sizes")
                pos = reader.pos + packed
                if pos > end:
                    raise BadParquet(f"column chunk {g}/{c}: a page of {packed} bytes runs past its end")
                total += unpacked
                if total > limit:
                    raise BadParquet(f"its pages unpack to more than {limit} bytes")
    return total
