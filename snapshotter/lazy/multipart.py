"""Reading a ``multipart/byteranges`` answer to a multi-range request (RFC 9110, section 14.6).

The parser accepts exactly the parts that were asked for and nothing else: a part we did not ask for, a missing
one, a malformed or over-long header line, too many header or empty lines, a body that ends early — each is a
:class:`FetchError`, and what was settled before stays (each chunk was verified as it arrived).  It always
ends: every part is one asked for (at most one each), lines are bounded in length and number, payload sizes
come from the ranges asked for (never from the server), and the deadline is checked as each piece arrives.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import requests

from snapshotter.lazy.errors import FetchError, transport_error
from snapshotter.lazy.transport import body_pieces

MAX_PART_HEADERS = 32  # header lines of one part (a registry sends two or three)
MAX_BLANK_LINES = 16  # empty lines between parts (RFC 9110: one CRLF before each delimiter)


class BodyReader:
    """Buffered reading of a streamed response body: lines (multipart headers) and exact byte counts.

    The unread bytes are ``_buf[_pos:]``; payload is copied once, from the network piece into the part's
    buffer (no slicing of the remainder per part: a hot set is ~130 MiB through here)."""

    def __init__(self, resp: requests.Response, url: str, deadline: float | None) -> None:
        self._it = body_pieces(resp)
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self.url = url
        self.deadline = deadline

    def _more(self) -> None:
        try:
            piece = next(self._it)
        except StopIteration:
            raise FetchError(f"GET {self.url}: the multipart body ended early", "cut") from None
        except requests.RequestException as e:
            raise transport_error(self.url, "(multipart body)", e) from e
        if self._pos >= len(self._buf):
            self._buf, self._pos = piece, 0
        else:  # a line or part split across pieces: keep the rest, then the new piece
            self._buf, self._pos = self._buf[self._pos:] + piece, 0
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FetchError(f"GET {self.url}: timed out", "timeout")

    def readline(self, limit: int = 8192) -> bytes:
        while True:
            k = self._buf.find(b"\n", self._pos)
            if k >= 0:
                line = bytes(self._buf[self._pos : k + 1])
                self._pos = k + 1
                return line
            if len(self._buf) - self._pos > limit:
                raise FetchError(f"GET {self.url}: a multipart header line longer than {limit} bytes", "protocol",
                                 transient=False)
            self._more()

    def read_into(self, out: bytearray, arrived: Callable[[bytearray, int], None]) -> None:
        got = 0
        while got < len(out):
            if self._pos >= len(self._buf):
                self._more()
            k = min(len(out) - got, len(self._buf) - self._pos)
            with memoryview(self._buf) as view:
                out[got : got + k] = view[self._pos : self._pos + k]
            self._pos += k
            got += k
            arrived(out, got)


def read_parts(body: BodyReader, boundary: bytes, url: str,
               wanted: dict[int, tuple[int, Callable[[bytearray, int], None]]], size: int | None = None) -> int:
    """Read a ``multipart/byteranges`` body whose parts must be exactly the ranges ``wanted`` (start →
    (end, arrived)) of a blob of ``size`` bytes; returns the payload bytes.  Anything else — a part we did not
    ask for (or asked for already), a missing one, another blob size, a malformed header — is a
    :class:`FetchError` (what was settled before stays: it was verified)."""
    total = 0
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    blank = 0
    while wanted:
        line = body.readline().strip()
        if not line:
            blank += 1
            if blank > MAX_BLANK_LINES:
                raise FetchError(f"GET {url}: more than {MAX_BLANK_LINES} empty lines between multipart parts",
                                 "protocol", transient=False)
            continue
        blank = 0
        if line == close:
            break
        if line != delimiter:
            raise FetchError(f"GET {url}: unexpected line in the multipart body: {line[:80]!r}", "protocol",
                             transient=False)
        crange = ""
        headers = 0
        while header := body.readline().strip():
            headers += 1
            if headers > MAX_PART_HEADERS:
                raise FetchError(f"GET {url}: a multipart part with more than {MAX_PART_HEADERS} header lines",
                                 "protocol", transient=False)
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                crange = value.strip()
        # (at most 19 digits: int() refuses over 4300, with a ValueError no caller expects)
        m = re.fullmatch(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)", crange)
        part = wanted.pop(int(m.group(1)), None) if m else None
        if m is None or part is None or part[0] != int(m.group(2)) + 1:
            raise FetchError(f"GET {url}: a multipart part we did not ask for (Content-Range {crange[:80]!r})",
                             "protocol", transient=False)
        if size is not None and m.group(3) != "*" and int(m.group(3)) != size:
            raise FetchError(f"GET {url}: a multipart part of a blob of {m.group(3)} bytes, not {size}",
                             "protocol", transient=False)
        buf = bytearray(part[0] - int(m.group(1)))
        body.read_into(buf, part[1])
        total += len(buf)
    if wanted:
        raise FetchError(f"GET {url}: the multipart body lacks {len(wanted)} of the ranges asked for", "cut")
    return total
