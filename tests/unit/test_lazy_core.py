"""The lazy data path's plain cores, without a kernel: BlobSpec, the crash-safe chunk cache, the fetcher
(against a real HTTP server in this process: coalescing, de-duplication, verification, timeouts, retries,
auth, mirrors), the scheduler's priorities, and the FUSE operations driven by trio directly."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from bootseer.index import chunk_digests
from bootseer.testkit import free_port, run_with_deadline, wait_until
from integration.faultproxy import FaultProxy
from snapshotter.lazy import prefetchjob
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import FetchError
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.fusefs import BlobFS
from snapshotter.lazy.layerstate import LayerState, LayerStateFiles
from snapshotter.lazy.scheduling import BACKGROUND, DEMAND, PREFETCH, Scheduler, TokenBucket
from snapshotter.lazy.spec import BlobSpec, digest_of_name, split_ranges
from snapshotter.lazy.transport import HttpClient

CS = 64 << 10  # small chunks keep these tests fast; the kernel tests use 256 KiB
REPO = "t/blob"


def _blob(n_chunks: int = 20, tail: int = 1234, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n_chunks * CS - CS + tail)


def _spec(data: bytes, base: str, **kw: Any) -> BlobSpec:
    return BlobSpec(registry=base, repository=REPO, digest="sha256:" + hashlib.sha256(data).hexdigest(),
                    size=len(data), chunk_size=CS, chunks=chunk_digests(data, CS), **kw)


# ----------------------------------------------------------------------------------------------- spec
def test_spec_chunk_math_and_json_round_trip() -> None:
    data = _blob()
    spec = _spec(data, "http://127.0.0.1:1")
    assert spec.n_chunks == 20
    assert spec.chunk_span(19) == (19 * CS, 1234)
    assert list(spec.chunks_for(CS - 1, 2)) == [0, 1]
    assert list(spec.chunks_for(len(data) - 1, 100)) == [19]
    assert list(spec.chunks_for(len(data), 10)) == []
    assert split_ranges([(5 * CS, 10), (0, 2 * CS), (5 * CS + 1, 1)], spec) == [5, 0, 1]
    assert BlobSpec.from_json(spec.to_json()) == spec
    assert spec.name == spec.key.replace(":", "-") and spec.key.startswith(spec.digest + "+")
    with pytest.raises(ValueError):
        BlobSpec(registry="http://x", repository=REPO, digest=spec.digest, size=len(data), chunk_size=CS,
                 chunks=spec.chunks[:-1])
    with pytest.raises(ValueError):
        BlobSpec(registry="x:5000", repository=REPO, digest=spec.digest, size=len(data), chunk_size=CS,
                 chunks=spec.chunks)


def test_spec_key_binds_the_chunk_table_and_the_source_not_the_digest_alone() -> None:
    """Two specs claiming one blob digest share a layer (mount, cache) only if their chunk tables and
    sources match: a tenant's index from its own registry cannot make the node serve its chunk table's bytes
    to another image's layer.  Mirrors and headers are transport, not identity."""
    data = _blob()
    spec = _spec(data, "http://127.0.0.1:1")
    others = [
        BlobSpec(registry=spec.registry, repository=REPO, digest=spec.digest, size=spec.size, chunk_size=CS,
                 chunks=("0" * 64,) * spec.n_chunks),  # another chunk table
        _spec(data, "http://127.0.0.1:2"),  # another registry
        BlobSpec(registry=spec.registry, repository="evil/blob", digest=spec.digest, size=spec.size,
                 chunk_size=CS, chunks=spec.chunks),  # another repository
    ]
    keys = {spec.key, *(o.key for o in others)}
    assert len(keys) == 4 and len({spec.name, *(o.name for o in others)}) == 4
    assert all(k.startswith(spec.digest + "+") for k in keys)
    same = _spec(data, "http://127.0.0.1:1/", mirrors=("http://mirror:5000",), headers={"User-Agent": "x"})
    assert same.key == spec.key
    assert digest_of_name(spec.name) == spec.digest == digest_of_name(spec.digest.replace(":", "-"))


def test_legacy_layer_state_keeps_its_name_and_gets_its_key(tmp_path: Path) -> None:
    """A state written before keys existed (file ``sha256-<hex>.json``, no ``name``) still loads: it keeps its
    directory name (its mount, loop device and cache stay where they are) and is keyed by its spec's key."""
    spec = _spec(_blob(), "http://127.0.0.1:1")
    legacy = spec.digest.replace(":", "-")
    files = LayerStateFiles(tmp_path)
    doc = {"spec": spec.to_json(), "owners": ["ns/a"], "last_used": 1.0, "loop": 7, "mounted": True,
           "swapped": False}
    files.path(legacy).write_text(json.dumps(doc))
    (rec,) = list(files.load())
    assert rec.name == legacy and rec.key == spec.key and rec.owners == {"ns/a"} and rec.loop == 7
    files.write(rec.name, files.encode(rec))
    (again,) = list(files.load())
    assert again.name == legacy
    assert LayerState(spec).name == spec.name
    files.path("sha256-" + "0" * 64).write_text(json.dumps(doc))  # a file naming another blob is refused
    assert [r.name for r in files.load()] == [legacy]


# ---------------------------------------------------------------------------------------------- cache
def test_cache_is_complete_only_once_the_whole_blob_hashes_to_its_digest(tmp_path: Path) -> None:
    """Every chunk matching the chunk table is not enough: an index whose chunk table describes other
    bytes than the blob digest names gets its cache discarded, never a "verified" mark."""
    data = _blob(n_chunks=5, tail=CS)
    good = _spec(data, "http://127.0.0.1:1")
    forged = BlobSpec(registry=good.registry, repository=REPO, digest="sha256:" + "ab" * 32, size=good.size,
                      chunk_size=CS, chunks=good.chunks)  # chunk table of `data`, digest of something else
    bad = ChunkCache(tmp_path / "bad", forged)
    for i in range(5):
        bad.put(i, data[i * CS : (i + 1) * CS])
    assert bad.complete and not bad.verified
    assert bad.verify_blob() is False
    assert bad.present_chunks == 0 and not bad.complete and not bad.verified
    bad.close()
    assert ChunkCache(tmp_path / "bad", forged).present_chunks == 0  # discarded on disk too

    ok = ChunkCache(tmp_path / "ok", good)
    for i in range(4):
        ok.put(i, data[i * CS : (i + 1) * CS])
    assert ok.verify_blob() is None  # not complete yet: nothing to hash
    ok.put(4, data[4 * CS :])
    assert not ok.verified and ok.verify_blob() is True and ok.verified
    ok.close()
    assert ChunkCache(tmp_path / "ok", good).verified  # persisted: no re-hash on the next mount
    assert not ChunkCache(tmp_path / "ok", good, verify=True).verified  # re-verify asked: hash again


def test_cache_bits_become_durable_only_at_flush(tmp_path: Path) -> None:
    data = _blob()
    spec = _spec(data, "http://127.0.0.1:1")
    a = ChunkCache(tmp_path / "c", spec)
    assert os.stat(a.data_path).st_size == len(data) and a.disk_bytes() == 0  # sparse
    a.put(3, data[3 * CS : 4 * CS])
    a.put(19, data[19 * CS :])
    assert a.has(3) and a.has(19) and not a.has(4)
    assert a.read(3 * CS + 10, 100) == data[3 * CS + 10 : 3 * CS + 110]
    assert a.local_bytes() == CS + 1234
    # A crash now (no flush): a new instance must not believe in chunks whose bytes may not be on disk.
    b = ChunkCache(tmp_path / "c", spec)
    assert b.present_chunks == 0
    b.close()
    a.flush()
    c = ChunkCache(tmp_path / "c", spec)
    assert c.missing(range(0, 5)) == [0, 1, 2, 4] and c.has(19)
    c.close()
    a.close()


def test_cache_verify_on_load_drops_bad_chunks_and_foreign_spec_resets(tmp_path: Path) -> None:
    data = _blob()
    spec = _spec(data, "http://127.0.0.1:1")
    a = ChunkCache(tmp_path / "c", spec)
    for i in (0, 1, 2):
        off, n = spec.chunk_span(i)
        a.put(i, data[off : off + n])
    a.close()
    with open(tmp_path / "c" / "data", "r+b") as f:  # the disk lied about chunk 1
        f.seek(CS + 100)
        f.write(b"\0garbage\0")
    b = ChunkCache(tmp_path / "c", spec, verify=True)
    assert [b.has(i) for i in range(3)] == [True, False, True]
    b.close()
    assert ChunkCache(tmp_path / "c", spec).missing(range(3)) == [1]  # the repair was persisted
    other = _spec(_blob(seed=8), "http://127.0.0.1:1")
    c = ChunkCache(tmp_path / "c", other)
    assert c.present_chunks == 0
    c.close()


def test_cache_complete_means_the_data_file_is_the_blob(tmp_path: Path) -> None:
    data = _blob(n_chunks=5, tail=CS)
    spec = _spec(data, "http://127.0.0.1:1")
    a = ChunkCache(tmp_path / "c", spec)
    for i in reversed(range(5)):
        a.put(i, data[i * CS : (i + 1) * CS])
    assert a.complete
    a.close()
    assert (tmp_path / "c" / "data").read_bytes() == data
    with pytest.raises(ValueError):
        ChunkCache(tmp_path / "c", spec).put(0, b"short")


# ------------------------------------------------------------------------------------- a blob server
@pytest.fixture
def served() -> Iterator[tuple[bytes, FaultProxy]]:
    """One blob served by the fault-injecting proxy itself (no registry process: these tests run without root)."""
    data = _blob()
    with FaultProxy(origin={"sha256:" + hashlib.sha256(data).hexdigest(): data}) as srv:
        yield data, srv


def _spans(srv: FaultProxy) -> list[tuple[int, int]]:
    """The single-range GETs the server answered, as [start, end) byte spans, in order."""
    return [(s[0], s[1] + 1) for e in list(srv.exchanges) if e.method == "GET" and (s := e.span()) is not None]


def _multi(srv: FaultProxy) -> list[str]:
    """The Range headers of the multi-range GETs it answered."""
    return [e.range for e in list(srv.exchanges) if e.method == "GET" and e.range and "," in e.range]


def _fetcher(tmp_path: Path, spec: BlobSpec, *, auth: Any = None, sched: Scheduler | None = None,
             **cfg: Any) -> Fetcher:
    client = HttpClient(auth) if auth is not None else HttpClient()
    return Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=sched or Scheduler(8, 2),
                   client=client, config=FetchConfig(**cfg))


# -------------------------------------------------------------------------------------------- fetcher
def test_fetch_reads_correct_bytes_coalesced_and_capped(tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    data, srv = served
    f = _fetcher(tmp_path, _spec(data, srv.url), max_range_bytes=3 * CS)
    assert f.read(CS + 5, 10) == data[CS + 5 : CS + 15]
    assert _spans(srv) == [(CS, 2 * CS)]  # chunk granularity: the whole chunk, once
    assert f.read(CS + 100, 50) == data[CS + 100 : CS + 150] and len(_spans(srv)) == 1  # local now
    srv.exchanges.clear()
    f.ensure(range(0, 8), BACKGROUND)  # chunk 1 is local: 0 | 2..7 in runs of at most 3 chunks
    assert _spans(srv) == [(0, CS), (2 * CS, 5 * CS), (5 * CS, 8 * CS)]
    assert f.read(len(data) - 3000, 5000) == data[-3000:]  # clamped at the end of the blob
    assert f.stats.bytes[BACKGROUND] == 7 * CS and f.stats.requests[BACKGROUND] == 3


def test_concurrent_readers_of_one_missing_chunk_cause_one_fetch(tmp_path: Path,
                                                                  served: tuple[bytes, FaultProxy]) -> None:
    data, srv = served
    f = _fetcher(tmp_path, _spec(data, srv.url))
    srv.hold()
    results: list[bytes] = []

    def reader(k: int) -> None:
        results.append(f.read(4 * CS + k * 1000, 500))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    wait_until(lambda: f.stats.dedup_waits == 4 and len(_spans(srv)) == 1, 10, "4 readers waiting on 1 fetch")
    srv.release()
    for t in threads:
        t.join(10)
    assert sorted(results) == sorted(data[4 * CS + k * 1000 : 4 * CS + k * 1000 + 500] for k in range(5))
    assert _spans(srv) == [(4 * CS, 5 * CS)]


def test_chunks_of_a_run_are_usable_as_they_arrive(tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    """A prefetch run of 8 chunks is one request; a reader of its first chunk goes on once that chunk is in,
    not when the whole run is (with 8 MiB runs sharing the link, that was most of a second)."""
    data, srv = served
    f = _fetcher(tmp_path, _spec(data, srv.url))
    stall = srv.add("stall", after=4 * CS)
    t = threading.Thread(target=f.ensure, args=(range(0, 8), PREFETCH))
    t.start()
    try:
        assert stall.fired.wait(10), "the server never sent the first part"
        f.config.read_timeout = 5.0
        assert f.read(CS + 3, 100) == data[CS + 3 : CS + 103]  # while the rest of the run is still missing
        assert stall in srv.faults and not any(f.cache.has(i) for i in range(4, 8))
    finally:
        srv.remove(stall)
        t.join(10)
    assert [f.cache.has(i) for i in range(8)] == [True] * 8 and _spans(srv) == [(0, 8 * CS)]


def test_runs_fall_back_to_one_range_per_request_where_multi_range_is_not_served(
        tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    """A server answering a multi-range request with the whole blob (an object store behind a redirect) is
    asked one range per request, then and from then on; the bytes are right either way."""
    data, srv = served
    f = _fetcher(tmp_path, _spec(data, srv.url))
    f.ensure_runs([[7, 8], [2], [12]], PREFETCH)
    assert _multi(srv) == [f"bytes={7 * CS}-{9 * CS - 1},{2 * CS}-{3 * CS - 1},{12 * CS}-{13 * CS - 1}"]
    assert _spans(srv) == [(7 * CS, 9 * CS), (2 * CS, 3 * CS), (12 * CS, 13 * CS)]  # in the order given
    f.ensure_runs([[4], [15]], PREFETCH)
    assert len(_multi(srv)) == 1 and _spans(srv)[3:] == [(4 * CS, 5 * CS), (15 * CS, 16 * CS)]
    for i in (2, 4, 7, 8, 12, 15):
        assert f.read(i * CS, CS) == data[i * CS : (i + 1) * CS]
    assert f.stats.bytes[PREFETCH] == 6 * CS


def test_multipart_byteranges_bodies_are_read_strictly() -> None:
    """Parts may come in any order; a part we did not ask for, a missing or a truncated one is an error."""
    from snapshotter.lazy.multipart import BodyReader, read_parts

    class Raw:
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def read1(self, size: int, decode_content: bool = True) -> bytes:
            piece = self.data[self.pos : self.pos + min(size, 7)]  # small pieces: lines and parts split anywhere
            self.pos += len(piece)
            return piece

    class Resp:
        def __init__(self, raw: bytes) -> None:
            self.raw = Raw(raw)

    def body(*parts: tuple[int, bytes]) -> bytes:
        out = b"\r\n"
        for start, data in parts:
            out += (b"--XYZ\r\nContent-Type: application/octet-stream\r\n"
                    + f"Content-Range: bytes {start}-{start + len(data) - 1}/1000\r\n\r\n".encode() + data + b"\r\n")
        return out + b"--XYZ--\r\n"

    def read(raw: bytes, want: dict[int, int]) -> dict[int, bytes]:
        got: dict[int, bytes] = {}

        def keep(start: int) -> Any:
            return lambda buf, n: got.__setitem__(start, bytes(buf[:n]))

        read_parts(BodyReader(Resp(raw), "u", None), b"XYZ", "u",  # type: ignore[arg-type]
                    {a: (b, keep(a)) for a, b in want.items()})
        return got

    assert read(body((100, b"b" * 20), (0, b"a" * 10)), {0: 10, 100: 120}) == {0: b"a" * 10, 100: b"b" * 20}
    for raw in (body((0, b"a" * 10), (50, b"x" * 5)),  # a part nobody asked for
                body((0, b"a" * 10)),  # one missing
                body((0, b"a" * 10), (100, b"b" * 20))[:-40]):  # truncated
        with pytest.raises(FetchError):
            read(raw, {0: 10, 100: 120})


def test_corrupt_chunk_is_eio_and_never_cached_neighbours_are_fine(
        tmp_path: Path, served: tuple[bytes, FaultProxy], caplog: pytest.LogCaptureFixture) -> None:
    data, srv = served
    bad = srv.add("corrupt", at=3 * CS, rate=1.0)
    f = _fetcher(tmp_path, _spec(data, srv.url), retries=1, backoff=0.01)
    with caplog.at_level(logging.ERROR, "bootseer.lazy.fetch"), pytest.raises(FetchError) as ei:
        f.read(2 * CS, 3 * CS)  # chunks 2, 3, 4 in one range request
    assert ei.value.errno == errno.EIO
    assert "failed verification" in caplog.text and f.spec.chunks[3] in caplog.text
    assert f.cache.has(2) and f.cache.has(4) and not f.cache.has(3)
    assert f.stats.corrupt == 2  # first attempt and the retry
    assert f.read(2 * CS, 10) == data[2 * CS : 2 * CS + 10]
    with pytest.raises(FetchError):  # still corrupt upstream: still an error, fast (failure memo)
        f.read(3 * CS, 10)
    srv.remove(bad)
    f.config.failure_memo = 0
    assert f.read(3 * CS, 10) == data[3 * CS : 3 * CS + 10]


def test_hanging_registry_is_eio_within_the_deadline_then_recovers(tmp_path: Path,
                                                                    served: tuple[bytes, FaultProxy]) -> None:
    data, srv = served
    f = _fetcher(tmp_path, _spec(data, srv.url), read_timeout=1.5, io_timeout=0.5, connect_timeout=0.5,
                 backoff=0.05, failure_memo=30)  # a window that outlasts any load on the machine
    hang = srv.add("hang", rate=1.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as ei:
        run_with_deadline(lambda: f.read(0, 10), 10, "read from a hanging registry")
    took = time.monotonic() - t0
    assert ei.value.errno == errno.EIO
    assert took < 10, took  # bounded by the deadline, not hung (the exact figure is the daemon test's)
    sent = len(srv.hits)  # every request that reached the server, hanging ones included
    with pytest.raises(FetchError):  # the same chunk again at once: fails without asking the registry
        f.read(0, 10)
    # Another chunk, even of another blob behind the same registry: one outage costs one deadline, not
    # one per chunk the kernel's read-ahead asks for.
    other = Fetcher(f.spec, ChunkCache(tmp_path / "cache2", f.spec), scheduler=f.scheduler, client=f.client,
                    config=f.config)
    with pytest.raises(FetchError, match="unreachable"):
        other.read(5 * CS, 10)
    assert len(srv.hits) == sent
    f.client.mark_up(f.spec.endpoints())  # what the end of the window does
    f.config.failure_memo = 0
    srv.remove(hang)
    assert wait_until(lambda: _try_read(f, 0, 10), 5, "read after the registry is back") == data[:10]


def _try_read(f: Fetcher, off: int, n: int) -> bytes | None:
    try:
        return f.read(off, n)
    except FetchError:
        return None


def test_retries_auth_refresh_mirrors_and_servers_ignoring_range(tmp_path: Path,
                                                                 served: tuple[bytes, FaultProxy]) -> None:
    data, srv = served
    srv.add("status", status=503, times=2)
    f = _fetcher(tmp_path / "a", _spec(data, srv.url), retries=3, backoff=0.01)
    assert f.read(0, 100) == data[:100] and f.stats.retries == 2

    srv.auth, srv.static_token = "static", "fresh"
    calls: list[bool] = []

    def auth(spec: BlobSpec, base: str, *, refresh: bool) -> dict[str, str]:
        calls.append(refresh)
        return {"Authorization": "Bearer " + ("fresh" if refresh else "stale")}

    f = _fetcher(tmp_path / "b", _spec(data, srv.url), auth=auth)
    assert f.read(CS, 100) == data[CS : CS + 100]
    assert calls == [False, True]
    srv.auth = None

    dead = f"http://127.0.0.1:{free_port()}"  # a mirror that is down: the registry answers
    f = _fetcher(tmp_path / "c", _spec(data, srv.url, mirrors=(dead,)), retries=2, backoff=0.01)
    assert f.read(2 * CS, 100) == data[2 * CS : 2 * CS + 100]

    srv.add("ignore_range", rate=1.0)
    f = _fetcher(tmp_path / "d", _spec(data, srv.url))
    assert f.read(5 * CS + 7, 100) == data[5 * CS + 7 : 5 * CS + 107]


def test_http_error_is_eio_not_retried_forever(tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    data, srv = served
    spec = _spec(data, srv.url)
    wrong = BlobSpec(registry=srv.url, repository="t/other", digest="sha256:" + "0" * 64, size=spec.size,
                     chunk_size=CS, chunks=spec.chunks)
    f = _fetcher(tmp_path, wrong, retries=2, backoff=0.01)
    with pytest.raises(FetchError, match="HTTP 404"):
        f.read(0, 10)
    assert f.stats.failures == 1


# ------------------------------------------------------------------------------------------ scheduler
def test_background_yields_to_demand() -> None:
    s = Scheduler(max_requests=3, background_requests=1)
    order: list[str] = []
    demand_in = threading.Event()
    demand_out = threading.Event()

    def demand() -> None:
        with s.slot(DEMAND, 1):
            demand_in.set()
            demand_out.wait(10)
            order.append("demand done")

    def background() -> None:
        with s.slot(BACKGROUND, 1, cancel=threading.Event()):
            order.append("background ran")

    td = threading.Thread(target=demand)
    td.start()
    demand_in.wait(10)
    tb = threading.Thread(target=background)
    tb.start()
    tb.join(0.3)  # bounded wait: background must still be blocked while a demand read is in flight
    assert tb.is_alive() and order == []
    demand_out.set()
    td.join(10)
    tb.join(10)
    assert order == ["demand done", "background ran"]


def test_background_waits_for_demand_and_prefetch_to_go_quiet() -> None:
    now = [100.0]
    s = Scheduler(max_requests=4, background_requests=1, background_idle=2.0, clock=lambda: now[0])
    assert s._may_start(BACKGROUND)  # nothing has been read yet: fill may start at once
    with s.slot(PREFETCH, 1):
        assert not s._may_start(BACKGROUND)  # a running prefetch holds background back
    assert not s._may_start(BACKGROUND)  # just ended: the idle window starts now
    now[0] += 1.9
    assert not s._may_start(BACKGROUND)
    with s.slot(DEMAND, 1):
        now[0] += 5.0
    assert not s._may_start(BACKGROUND)  # the window counts from the end of the last demand read
    now[0] += 2.0
    assert s._may_start(BACKGROUND)
    assert s._may_start(DEMAND) and s._may_start(PREFETCH)  # foreground never waits for the window


def test_cached_reads_hold_background_back_but_not_forever() -> None:
    now = [100.0]
    s = Scheduler(max_requests=4, background_requests=1, background_idle=2.0, background_max_wait=30.0,
                  clock=lambda: now[0])
    s.note_read()
    now[0] += 1.0
    assert not s._may_start(BACKGROUND)  # a container is reading (from the cache): no fill yet
    now[0] += 1.5
    assert s._may_start(BACKGROUND)  # quiet for 2.5 s
    for _ in range(40):  # a workload that never pauses
        s.note_read()
        now[0] += 1.0
        if s._may_start(BACKGROUND):
            break
    assert 29.0 <= now[0] - 102.5 <= 32.0  # fill proceeds after about background_max_wait seconds of reads
    now[0] += 5.0
    assert s._may_start(BACKGROUND)  # quiet again


def test_prefetch_requests_of_all_layers_are_admitted_earliest_due_first() -> None:
    s = Scheduler(max_requests=2)  # prefetch may hold one slot (the other is kept for demand reads)
    held, gate = threading.Event(), threading.Event()
    order: list[float] = []

    def holder() -> None:
        with s.slot(PREFETCH, 1, due=0.0):
            held.set()
            gate.wait(10)

    def waiter(due: float) -> None:
        with s.slot(PREFETCH, 1, due=due):
            order.append(due)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    held.wait(10)
    for due in (3.0, 1.0, 2.0):  # arrival order is not admission order
        threads.append(threading.Thread(target=waiter, args=(due,)))
        threads[-1].start()
    wait_until(lambda: s._waiting[PREFETCH] == 3, 10, "three prefetch requests queued")
    gate.set()
    for t in threads:
        t.join(10)
    assert order == [1.0, 2.0, 3.0]


def test_mount_holds_background_back_for_the_idle_window() -> None:
    now = [100.0]
    s = Scheduler(max_requests=4, background_requests=1, background_idle=2.0, clock=lambda: now[0])
    assert s._may_start(BACKGROUND)
    s.note_mount()  # a layer was just mounted: its container is about to read
    now[0] += 1.9
    assert not s._may_start(BACKGROUND) and s._may_start(PREFETCH)
    now[0] += 0.2
    assert s._may_start(BACKGROUND)


def test_a_prefetch_job_holds_background_back_until_the_start_up_it_serves_is_over() -> None:
    """Fill waits for a prefetch job from its start to its end — also while none of its requests is queued
    or in flight — then for the idle window, and until the recorded start-up has read for the last time
    (the container reads prefetched chunks from the page cache, which the daemon never sees)."""
    now = [100.0]
    s = Scheduler(max_requests=4, background_requests=1, background_idle=2.0, background_max_wait=30.0,
                  clock=lambda: now[0])
    release = s.hold_background(until=112.0)  # the recording's last first read: 12 s into the start-up
    now[0] += 5.0
    assert not s._may_start(BACKGROUND) and s._may_start(PREFETCH)  # quiet for 5 s, but the job runs
    release()
    release()  # idempotent
    now[0] += 3.0
    assert not s._may_start(BACKGROUND)  # t=108: quiet since the job's end, but the start-up reads until 112
    now[0] = 112.0
    assert s._may_start(BACKGROUND)

    s.hold_background(until=now[0] + 3600.0)()  # a recording far off holds fill back for at most max_wait
    now[0] += 29.0
    assert not s._may_start(BACKGROUND)
    now[0] += 2.0
    assert s._may_start(BACKGROUND)

    cancel, quiet = threading.Event(), []  # hashing a completed layer waits for the same quiet
    release = s.hold_background()
    t = threading.Thread(target=lambda: quiet.append(s.wait_quiet(cancel)))
    t.start()
    t.join(0.3)  # bounded wait: still held while the job runs
    assert t.is_alive()
    release()
    now[0] += 2.0
    t.join(10)
    assert quiet == [True]
    s.hold_background()
    cancel.set()
    assert s.wait_quiet(cancel) is False


def test_fill_of_a_layer_waits_while_a_prefetch_job_of_another_is_between_requests(
        tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    """A prefetch job's worker pushing its first run into the page cache has no request queued or in flight;
    another layer's fill must not take the link then (nor with no idle window at all): every byte the
    job fetches goes out before any fill request."""
    data, srv = served
    sched = Scheduler(8, 2)  # no idle window: only the job's hold keeps the fill back
    spec = _spec(data, srv.url)
    a, b = _fetcher(tmp_path / "a", spec, sched=sched), _fetcher(tmp_path / "b", spec, sched=sched)
    warming, gate = threading.Event(), threading.Event()

    def warm(run: list[int]) -> int:
        warming.set()
        gate.wait(10)
        return 0

    job, workers = prefetchjob.start(spec, b.cache, b, [(0, CS), (4 * CS, CS)], concurrency=1, start_time=None,
                                     batch_window=0.0, cancel=threading.Event(), warm=warm, before=lambda: None,
                                     name="b")
    assert warming.wait(10)  # chunk 0 fetched, the worker is between its two requests
    fill = threading.Thread(target=a.ensure, args=(range(10, 20), BACKGROUND), kwargs={"cancel": threading.Event()})
    fill.start()
    wait_until(lambda: sched._waiting[BACKGROUND] == 1 or not fill.is_alive(), 10, "fill queued (or done)")
    gate.set()
    assert job.done.wait(10) and job.fetched == 2
    fill.join(10)
    for w in workers:
        w.join(10)
    assert _spans(srv) == [(0, CS), (4 * CS, 5 * CS), (10 * CS, len(data))]
    assert a.stats.bytes[BACKGROUND] == len(data) - 10 * CS  # and the fill does complete afterwards


def test_queued_background_fetch_claims_nothing_a_demand_read_needs(tmp_path: Path,
                                                                   served: tuple[bytes, FaultProxy]) -> None:
    """A background fetch waiting for its slot must not hold the chunks it will fetch: a demand read of them
    would otherwise wait for the background fetch, which waits for the demand read to end (inversion)."""
    data, srv = served
    sched = Scheduler(8, 2, background_idle=3600.0)
    f = _fetcher(tmp_path, _spec(data, srv.url), sched=sched)
    sched.note_mount()  # background held back for an hour
    cancel = threading.Event()
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            f.ensure(range(2, 6), BACKGROUND, cancel=cancel)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=fill)
    t.start()
    try:
        wait_until(lambda: sched._waiting[BACKGROUND] == 1, 10, "background fetch queued for a slot")
        # within the demand deadline (1 s) even though the queued fill "covers" chunk 3
        f.config.read_timeout = 1.0
        assert f.read(3 * CS + 7, 100) == data[3 * CS + 7 : 3 * CS + 107]
        assert _spans(srv) == [(3 * CS, 4 * CS)] and f.stats.bytes[BACKGROUND] == 0
    finally:
        cancel.set()
        t.join(10)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], FetchError)


def test_token_bucket_caps_the_rate() -> None:
    b = TokenBucket(rate=4 << 20, burst=1 << 20)
    t0 = time.monotonic()
    for _ in range(5):
        b.acquire(1 << 20)  # 5 MiB at 4 MiB/s with a 1 MiB burst: >= 1 s
    assert time.monotonic() - t0 >= 0.9
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FetchError):
        b.acquire(4 << 20, cancel)


# ------------------------------------------------------------------------------------ FUSE operations
class _Source:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.local: set[int] = set()
        self.slow_reads = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        return self.data[offset : offset + length] if offset in self.local else None

    def read(self, offset: int, length: int) -> bytes:
        self.slow_reads += 1
        if offset == 666:
            raise FetchError("boom")
        return self.data[offset : offset + length]


def test_blobfs_operations_without_a_kernel() -> None:
    fs = BlobFS(threads=2)
    log: list[tuple[str, int, int]] = []
    fs.access_log = lambda name, off, n, t: log.append((name, off, n))
    src = _Source(bytes(range(256)) * 100)
    ino = fs.add("sha256-abc", src)
    assert fs.add("sha256-abc", src) == ino
    with pytest.raises(FileExistsError):
        fs.add("sha256-abc", _Source(b"x"))
    ctx: Any = None

    async def scenario() -> None:
        attr = await fs.lookup(pyfuse3.ROOT_INODE, b"sha256-abc", ctx)
        assert attr.st_ino == ino and attr.st_size == 25600 and attr.st_mode & 0o777 == 0o444
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.lookup(pyfuse3.ROOT_INODE, b"nope", ctx)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(ino, os.O_RDWR, ctx)
        assert e.value.errno == errno.EROFS
        fi = await fs.open(ino, os.O_RDONLY, ctx)
        assert fi.direct_io and not fi.keep_cache
        assert await fs.read(fi.fh, 10, 5) == src.data[10:15]  # through a worker thread
        src.local.add(20)
        assert await fs.read(fi.fh, 20, 5) == src.data[20:25]  # answered on the loop
        assert await fs.read(fi.fh, 25590, 100) == src.data[25590:]  # clamped
        assert await fs.read(fi.fh, 30000, 100) == b""
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.read(fi.fh, 666, 10)
        assert e.value.errno == errno.EIO
        assert fs.remove("sha256-abc")  # unlinked while open: still served
        assert await fs.read(fi.fh, 0, 3) == src.data[:3]
        with pytest.raises(pyfuse3.FUSEError):
            await fs.lookup(pyfuse3.ROOT_INODE, b"sha256-abc", ctx)
        await fs.release(fi.fh)
        with pytest.raises(pyfuse3.FUSEError):
            await fs.getattr(ino, ctx)

    trio.run(scenario)
    assert src.slow_reads == 4
    assert log[0] == ("sha256-abc", 10, 5) and len(log) == 5  # not the read past the end
    st = fs.stats("sha256-abc")
    assert st is None  # gone with the last close
    assert fs.add("sha256-abc", src) > ino  # inode numbers are never reused


class _Hooks:
    def changed(self, layer: Any) -> None:
        return None

    def cache_hit(self) -> None:
        return None

    def swapped(self, layer: Any) -> None:
        return None

    def may_swap(self) -> bool:
        return True


def test_layer_tells_its_demand_observer_about_every_read(tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    """What the hot-block prefetcher counts: each read reaching FUSE, and whether its chunks were local."""
    from snapshotter.lazy.layer import LayerPaths, LazyLayer

    data, srv = served
    spec = _spec(data, srv.url)
    paths = LayerPaths(cache=tmp_path / "c", mountpoint=tmp_path / "m", fuse_file=tmp_path / "f")
    layer = LazyLayer(spec, paths, fetcher_factory=lambda cache: Fetcher(spec, cache, scheduler=Scheduler(4, 1),
                                                                         client=HttpClient()),
                      fs=BlobFS(threads=1), server=None, hooks=_Hooks())
    seen: list[tuple[int, int, bool]] = []
    layer.demand_observer = lambda off, n, local: seen.append((off, n, local))
    assert layer.read_cached(CS + 10, 100) is None  # missing: the FUSE side then calls read()
    assert layer.read(CS + 10, 100) == data[CS + 10 : CS + 110]
    assert layer.read_cached(CS + 200, 50) == data[CS + 200 : CS + 250]
    layer.demand_observer = lambda off, n, local: 1 / 0  # a broken observer is dropped, reads go on
    assert layer.read_cached(CS, 10) == data[CS : CS + 10] and layer.demand_observer is None
    assert seen == [(CS + 10, 100, False), (CS + 200, 50, True)]
    layer.cache.close()


def test_fill_runs_at_a_lower_cpu_priority_than_the_daemon(tmp_path: Path, served: tuple[bytes, FaultProxy]) -> None:
    """Fill (download, sha256, cache writes) on a node with few cores must not take CPU from the containers
    it runs for: its thread runs at ``FillConfig.nice``, the daemon's other threads do not."""
    from snapshotter.lazy.layer import FillConfig, LayerPaths, LazyLayer

    data, srv = served
    spec = _spec(data, srv.url)
    sched = Scheduler(4, 1)
    release = sched.hold_background()  # the fill thread waits for its first slot
    paths = LayerPaths(cache=tmp_path / "c", mountpoint=tmp_path / "m", fuse_file=tmp_path / "f")
    layer = LazyLayer(spec, paths, fetcher_factory=lambda cache: Fetcher(spec, cache, scheduler=sched,
                                                                         client=HttpClient()),
                      fs=BlobFS(threads=1), server=None, hooks=_Hooks(), fill=FillConfig(nice=10))
    layer.mounted = True  # as if set up: the fill may start
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        layer.start_fill()
        wait_until(lambda: sched._waiting[BACKGROUND] == 1, 10, "the fill thread queued for a slot")
        thread = layer._fill_thread
        assert thread is not None and thread.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == max(10, own)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    finally:
        layer.stop_workers()
        release()
        layer.cache.close()
