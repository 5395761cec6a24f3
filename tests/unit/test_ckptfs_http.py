"""ckptfs over ``http(s)://``: chunk reads by ranged GET straight into the reader's buffer (ckptfs.httpranges).

A real HTTP server on loopback serves a striped checkpoint; it can be told to misbehave the ways a store's
server or a proxy in front of it does: ignore ``Range``, answer another range, cut a body short, fail with a
503 now and then, close kept-alive connections, redirect (to itself or to another host).  Every one must end
in the right bytes or a clear error, never in wrong bytes, and credentials must go only to their own host.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptfs
from ckptfs.httpranges import HttpRanges
from ckptfs.reader import Checkpoint, ReaderOptions
from ckptfs.store import open_store

CS = 64 << 10


class _Server:
    """A threading HTTP/1.1 server over a directory, with Range support and switchable faults."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: set[str] = set()
        self.fail_every = 0  # with "503": every n-th GET fails
        self.redirect_to: str | None = None  # with "redirect": Location prefix
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                # one reading of the faults per request: a test switches them between its reads, and a switch
                # must not reach a request whose answer the client has already received
                with server.lock:
                    faults = set(server.faults)
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "range": self.headers.get("Range"), "port": server.port,
                                            "peer": self.client_address[1]})
                    n = len(server.requests)
                if "redirect" in faults and server.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "503" in faults and server.fail_every and n % server.fail_every == 0 and not head:
                    body = b"busy, try again"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                path = server.root / self.path.lstrip("/").split("?")[0]
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                m = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range") or "")
                if m and "ignore-range" not in faults:
                    lo, hi = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
                    if "wrong-range" in faults:
                        lo, hi = lo + 1, hi + 1
                    body = data[lo : hi + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if "close" in faults:
                    self.send_header("Connection", "close")
                self.end_headers()
                if head:
                    return
                if "short" in faults and len(body) > 100:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)
                if "silent-close" in faults:
                    self.close_connection = True  # closed without saying so, as an idle timeout or a proxy does

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_Server, dict[str, bytes]]]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"model.bin": bytes(range(256)) * (12 * CS // 256) + b"tail", "sub/small.txt": b"hello"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    ckptfs.put(src, str(tmp_path / "www" / "ck"), chunk_size=CS, stripes=3)
    srv = _Server(tmp_path / "www")
    try:
        yield srv, files
    finally:
        srv.close()


def test_checkpoint_over_http_reads_every_file_by_ranged_gets(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, files = served
    with Checkpoint(f"{srv.url}/ck") as ck:
        assert ck.store.kind == "http"
        for rel, data in files.items():
            assert ck.read_file(rel) == data
    chunk_gets = [r for r in srv.requests if r["range"]]
    assert chunk_gets, "chunk reads must be ranged GETs"
    assert all(re.fullmatch(r"bytes=\d+-\d+", r["range"]) for r in chunk_gets)


def test_keepalive_connections_are_reused(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, _ = served
    store = open_store(f"{srv.url}/ck")
    try:
        out = memoryview(bytearray(CS))
        ranges = store.ranges
        assert ranges is not None
        for i in range(2):
            store.read_range_into(_stripe(srv), i * CS, out)
        # one thread, one host: one connection, opened once
        assert len({r["peer"] for r in srv.requests if r["range"]}) == 1
        # the server now closes after each answer: the first goes over the kept connection, each later one
        # over a new socket, and the thread keeps one connection object throughout
        srv.faults.add("close")
        for i in range(3):
            store.read_range_into(_stripe(srv), i * CS, out)
        assert len({r["peer"] for r in srv.requests if r["range"]}) == 3
        assert len(ranges._all) == 1
    finally:
        store.close()


def test_a_kept_connection_the_server_closed_silently_is_retried_once_on_a_new_one(
        served: tuple[_Server, dict[str, bytes]]) -> None:
    """A server (or a proxy's idle timeout) may close a kept-alive connection without a ``Connection: close``;
    the next request on it fails before any byte of an answer and must go out again on a new socket."""
    srv, _ = served
    srv.faults.add("silent-close")
    stripe = _stripe(srv)
    want = (srv.root / "ck" / stripe).read_bytes()
    ranges = HttpRanges(timeout=10)
    try:
        for i in range(3):
            out = memoryview(bytearray(CS))
            ranges.read_into(f"{srv.url}/ck/{stripe}", i * CS, out)
            assert bytes(out) == want[i * CS : (i + 1) * CS]
        # each request after the first found its kept connection closed and was sent again on a new socket;
        # the server saw each read once
        ranged = [r for r in srv.requests if r["range"]]
        assert len(ranged) == 3
        assert len({r["peer"] for r in ranged}) == 3
    finally:
        ranges.close()


def _stripe(srv: _Server) -> str:
    """The name of a stripe object of the test checkpoint (relative to the store root)."""
    names = sorted(p.relative_to(srv.root / "ck").as_posix() for p in (srv.root / "ck").rglob("*")
                   if p.is_file() and p.stat().st_size >= 2 * CS)
    return names[0]


@pytest.mark.parametrize("fault", ["ignore-range", "wrong-range", "short"])
def test_a_misbehaving_server_is_an_error_not_data(served: tuple[_Server, dict[str, bytes]], fault: str) -> None:
    """Range ignored (a whole object where a chunk was asked), another range, a body cut short: an OSError
    that names the problem; the reader turns it into EIO after its retries, never into bytes."""
    srv, _ = served
    srv.faults.add(fault)
    ranges = HttpRanges(timeout=10)
    try:
        out = memoryview(bytearray(CS))
        with pytest.raises(OSError, match=r"ignored the Range|Content-Range|short read|IncompleteRead"):
            ranges.read_into(f"{srv.url}/ck/{_stripe(srv)}", CS, out)
    finally:
        ranges.close()
    srv.faults.clear()
    with Checkpoint(f"{srv.url}/ck", reader_options=ReaderOptions(retries=0)) as ck:
        srv.faults.add(fault)
        with pytest.raises(OSError):
            ck.read_file("model.bin")


def test_range_ignored_is_accepted_only_for_a_whole_small_object(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, _ = served
    srv.faults.add("ignore-range")
    obj = srv.root / "ck" / "whole.bin"
    obj.write_bytes(b"0123456789")
    ranges = HttpRanges(timeout=10)
    try:
        out = memoryview(bytearray(10))
        ranges.read_into(f"{srv.url}/ck/whole.bin", 0, out)
        assert bytes(out) == b"0123456789"
        with pytest.raises(OSError, match="ignored the Range"):
            ranges.read_into(f"{srv.url}/ck/whole.bin", 2, memoryview(bytearray(4)))
    finally:
        ranges.close()


def test_transient_503s_are_retried_by_the_reader(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, files = served
    with Checkpoint(f"{srv.url}/ck", reader_options=ReaderOptions(retries=3, backoff=0.001)) as ck:
        srv.faults.add("503")
        srv.fail_every = 3
        assert ck.read_file("model.bin") == files["model.bin"]
        assert ck.source.stats.retries >= 1


def test_connections_the_server_closes_are_reopened(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, files = served
    srv.faults.add("close")
    with Checkpoint(f"{srv.url}/ck", reader_options=ReaderOptions(retries=0)) as ck:
        assert ck.read_file("model.bin") == files["model.bin"]


def test_missing_object_is_file_not_found(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, _ = served
    ranges = HttpRanges(timeout=10)
    try:
        with pytest.raises(FileNotFoundError, match="404"):
            ranges.read_into(f"{srv.url}/ck/nope", 0, memoryview(bytearray(10)))
    finally:
        ranges.close()


def test_credentials_go_to_their_host_only_and_never_into_errors(served: tuple[_Server, dict[str, bytes]],
                                                                   tmp_path: Path) -> None:
    """user:password in the URI is a Basic header to that host; a redirect to another host gets none; an
    error message masks the password."""
    srv, _ = served
    other = _Server(srv.root)
    try:
        stripe = _stripe(srv)
        want = (srv.root / "ck" / stripe).read_bytes()[CS : 2 * CS]
        ranges = HttpRanges(timeout=10)
        try:
            out = memoryview(bytearray(CS))
            ranges.read_into(f"http://alice:s3cret@127.0.0.1:{srv.port}/ck/{stripe}", CS, out)
            assert bytes(out) == want
            basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
            assert srv.requests[-1]["auth"] == basic
            # the first host redirects to another one: the credentials stay behind
            srv.faults.add("redirect")
            srv.redirect_to = other.url
            out2 = memoryview(bytearray(CS))
            h = hashlib.sha256()
            ranges.read_into(f"http://alice:s3cret@127.0.0.1:{srv.port}/ck/{stripe}", CS, out2, h)
            assert bytes(out2) == want and h.digest() == hashlib.sha256(want).digest()
            assert other.requests and all(r["auth"] is None for r in other.requests)
            # an error names the URL without the password
            with pytest.raises(FileNotFoundError) as e:
                ranges.read_into(f"http://alice:s3cret@127.0.0.1:{other.port}/ck/nope", 0,
                                 memoryview(bytearray(4)))
            assert "s3cret" not in str(e.value)
        finally:
            ranges.close()
    finally:
        other.close()


def test_redirect_loops_end(served: tuple[_Server, dict[str, bytes]]) -> None:
    srv, _ = served
    srv.faults.add("redirect")
    srv.redirect_to = srv.url
    ranges = HttpRanges(timeout=10)
    try:
        with pytest.raises(OSError, match="redirects"):
            ranges.read_into(f"{srv.url}/ck/{_stripe(srv)}", 0, memoryview(bytearray(CS)))
    finally:
        ranges.close()
