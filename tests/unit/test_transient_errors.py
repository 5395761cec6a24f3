"""Transient registry errors are not outages (issue 23, item 6), without a kernel: the lazy fetcher and the
registry client against a real docker-registry behind :class:`~integration.faultproxy.FaultProxy`, which answers
chosen (or a seeded fraction of) requests with 503 / 429 + ``Retry-After``, or cuts their bodies off half-way.

What is asserted: a transient error is retried (by reason, in the counters) and the read returns the right
bytes; ``Retry-After`` holds requests to that endpoint back, and a retry goes to the next endpoint; a 404 is
not retried; the endpoints are marked down only after failed requests in a row over a window, never after one
read gave up, and then reads fail fast; every read ends within its deadline."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bootseer.registry import MT_OCI_MANIFEST, RegistryClient, TransientError, sha256_digest
from integration.faultproxy import FaultProxy
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.errors import FetchError
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.scheduling import PREFETCH, Scheduler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.testing import Registry, push_blob, spec_for
from snapshotter.lazy.transport import HttpClient

CS = 64 << 10
REPO = "bootseer/transient"
BLOBS = "/blobs/"


@dataclass
class World:
    registry: Registry
    data: bytes
    digest: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        data = random.Random(23).randbytes(160 * CS + 999)
        yield World(reg, data, push_blob(reg.url, REPO, data))
    finally:
        reg.stop()


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    with FaultProxy(world.registry.url.removeprefix("http://"), seed=23) as p:
        yield p


@dataclass
class Sink:
    """A :class:`~snapshotter.lazy.fetcher.MetricsSink` that keeps what it was told."""

    retries: dict[tuple[str, str], int] = field(default_factory=dict)
    downs: int = 0
    failures: int = 0

    def fetched(self, kind: str, nbytes: int, seconds: float) -> None:
        pass

    def corrupt(self, spec: BlobSpec, index: int) -> None:
        pass

    def failed(self, kind: str) -> None:
        self.failures += 1

    def retried(self, kind: str, reason: str) -> None:
        self.retries[(kind, reason)] = self.retries.get((kind, reason), 0) + 1

    def marked_down(self) -> None:
        self.downs += 1


def fetcher(tmp_path: Path, world: World, *bases: str, client: HttpClient | None = None, **cfg: Any) -> Fetcher:
    """A fetcher of the world's blob from ``bases`` (mirrors first, the registry last)."""
    spec = spec_for(bases[-1], REPO, world.data, CS)
    spec = BlobSpec(registry=spec.registry, mirrors=tuple(bases[:-1]), repository=spec.repository, digest=spec.digest,
                    size=spec.size, chunk_size=CS, chunks=spec.chunks)
    cache = ChunkCache(tmp_path / f"cache-{secrets.token_hex(3)}", spec)
    return Fetcher(spec, cache, scheduler=Scheduler(8, 2), client=client or HttpClient(),
                   config=FetchConfig(**{"backoff": 0.05, **cfg}), metrics=Sink())


def chunk(world: World, i: int, n: int = 1) -> bytes:
    return world.data[i * CS : (i + n) * CS]


def ranged_gets(p: FaultProxy) -> int:
    return sum(1 for m, path, _ in p.hits if m == "GET" and BLOBS in path)


# ------------------------------------------------------------------------------------------------ fetcher
def test_one_503_is_retried_counted_by_reason_and_not_an_outage(tmp_path: Path, world: World,
                                                                  proxy: FaultProxy) -> None:
    proxy.add("status", status=503, ranged=True)
    f = fetcher(tmp_path, world, f"http://{proxy.address}")
    assert f.read(3 * CS, 2 * CS) == chunk(world, 3, 2)
    assert ranged_gets(proxy) == 2
    assert f.stats.retry_reasons == {"http_503": 1} and f.stats.failures == 0
    assert f.metrics.retries == {("demand", "http_503"): 1}  # type: ignore[union-attr]
    assert f.client.down(f.spec.endpoints()) is None


def test_cut_bodies_are_retried_and_what_arrived_is_kept(tmp_path: Path, world: World, proxy: FaultProxy) -> None:
    proxy.add("cut", ranged=True, times=2)
    f = fetcher(tmp_path, world, f"http://{proxy.address}")
    assert f.read(10 * CS, 8 * CS) == chunk(world, 10, 8)
    assert proxy.count("206 cut") == 2 and f.stats.retry_reasons.get("cut") == 2, proxy.hits
    assert f.metrics.retries == {("demand", "cut"): 2}  # type: ignore[union-attr]


def test_a_fifth_of_reads_failing_fails_no_read(tmp_path: Path, world: World, proxy: FaultProxy) -> None:
    """20 % 503 and 5 % cut bodies, seeded, over every chunk read one after the other (so the draws fall on
    the same requests every run): every read returns its bytes, nothing is marked down."""
    proxy.add("status", status=503, rate=0.20, ranged=True)
    proxy.add("cut", rate=0.05, ranged=True)
    f = fetcher(tmp_path, world, f"http://{proxy.address}")
    for i in range(f.spec.n_chunks):
        assert f.read(i * CS, 100) == world.data[i * CS : i * CS + 100], i
    assert f.stats.failures == 0
    assert proxy.count("status 503") >= 20 and proxy.count("206 cut") >= 3
    assert f.stats.retry_reasons["http_503"] == proxy.count("status 503")
    assert f.metrics.downs == 0  # type: ignore[union-attr]


def test_prefetch_retries_too_and_its_failure_does_not_fail_demand_reads(tmp_path: Path, world: World,
                                                                          proxy: FaultProxy) -> None:
    # a prefetch that gives up (its retry window spent) leaves the chunk to the container's own read
    proxy.add("status", status=503, ranged=True, range=f"^bytes={40 * CS}-", times=1000)
    g = fetcher(tmp_path, world, f"http://{proxy.address}")
    g.config.retry_window = 0.3
    with pytest.raises(FetchError):
        g.ensure_runs([[40]], PREFETCH)
    proxy.clear()
    assert g.read(40 * CS, 10) == world.data[40 * CS : 40 * CS + 10]

    proxy.add("status", status=503, ranged=True, times=2)
    f = fetcher(tmp_path, world, f"http://{proxy.address}")
    f.ensure_runs([[20, 21], [30]], PREFETCH)
    assert all(f.cache.has(i) for i in (20, 21, 30)) and f.stats.retry_reasons == {"http_503": 2}
    assert f.metrics.retries == {("prefetch", "http_503"): 2}  # type: ignore[union-attr]


def test_retry_after_holds_that_endpoint_back_and_the_retry_goes_to_the_next(tmp_path: Path, world: World,
                                                                             proxy: FaultProxy) -> None:
    proxy.add("status", status=429, retry_after="1", ranged=True)
    f = fetcher(tmp_path, world, f"http://{proxy.address}")
    assert f.read(50 * CS, 10) == world.data[50 * CS : 50 * CS + 10]
    assert [h[2] for h in proxy.hits] == ["status 429", "206"]
    assert proxy.stamps[1] - proxy.stamps[0] >= 1.0  # honoured: not one request before the second was up
    assert f.stats.retry_reasons == {"http_429": 1}

    # a mirror answering 429 + Retry-After: 60: the retry goes to the registry, and so do the next reads
    with FaultProxy(world.registry.url.removeprefix("http://")) as origin:
        proxy.clear()
        proxy.add("status", status=429, retry_after="60", ranged=True, times=1000)
        g = fetcher(tmp_path, world, f"http://{proxy.address}", f"http://{origin.address}")
        assert g.read(60 * CS, 10) == world.data[60 * CS : 60 * CS + 10]
        assert g.read(70 * CS, 10) == world.data[70 * CS : 70 * CS + 10]
        assert proxy.count("status 429") == 1 and origin.count("206") == 2


def test_a_404_is_not_retried_but_moves_on_to_the_next_endpoint(tmp_path: Path, world: World,
                                                                  proxy: FaultProxy) -> None:
    mirror = FaultProxy(world.registry.url.removeprefix("http://")).start()
    try:
        mirror.add("status", status=404, code="BLOB_UNKNOWN", ranged=True, times=1000)
        f = fetcher(tmp_path, world, f"http://{mirror.address}", f"http://{proxy.address}")
        assert f.read(80 * CS, 10) == world.data[80 * CS : 80 * CS + 10]  # the mirror lacks it: the registry
        assert mirror.count("status 404") == 1 and f.stats.retries == 0
        proxy.add("status", status=404, code="BLOB_UNKNOWN", ranged=True, times=1000)
        with pytest.raises(FetchError, match="HTTP 404"):
            f.read(90 * CS, 10)
        assert mirror.count("status 404") == 2 and proxy.count("status 404") == 1  # each asked once
        assert f.stats.retries == 0 and f.client.down(f.spec.endpoints()) is None
    finally:
        mirror.stop()


def test_one_read_giving_up_is_no_outage_failures_of_several_reads_over_a_window_are(
        tmp_path: Path, world: World, proxy: FaultProxy) -> None:
    client = HttpClient()
    f = fetcher(tmp_path, world, f"http://{proxy.address}", client=client, read_timeout=1.0, failure_memo=30)
    proxy.add("status", status=503, ranged=True, range=f"^bytes={100 * CS}-", times=10**6)  # one chunk, always
    stop = threading.Event()
    others: list[bytes] = []

    def elsewhere() -> None:  # another container keeps reading other chunks meanwhile
        while not stop.is_set():
            others.append(fetcher(tmp_path, world, f"http://{proxy.address}", client=client).read(101 * CS, 10))

    t = threading.Thread(target=elsewhere)
    t.start()
    try:
        with pytest.raises(FetchError):
            f.read(100 * CS, 10)  # gives up at its deadline
    finally:
        stop.set()
        t.join(30)
    assert others and set(others) == {world.data[101 * CS : 101 * CS + 10]}
    assert client.down(f.spec.endpoints()) is None and f.metrics.downs == 0  # type: ignore[union-attr]
    assert f.read(102 * CS, 10) == world.data[102 * CS : 102 * CS + 10]  # the registry is not "down"

    # now everything fails: three reads (deadline 30 s) retry until, 2 s after the first failure with nothing
    # arriving, the endpoints are marked down; then they give up at once
    proxy.add("status", status=503, ranged=True, times=10**6)
    g = fetcher(tmp_path, world, f"http://{proxy.address}", client=client, read_timeout=30, failure_memo=30)
    errors: dict[int, str] = {}

    def read(k: int) -> None:
        try:
            g.read(k * CS, 10)
        except FetchError as e:
            errors[k] = str(e)

    t0 = time.monotonic()
    readers = [threading.Thread(target=read, args=(k,)) for k in (110, 111, 112)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(60)
    took = time.monotonic() - t0
    assert sorted(errors) == [110, 111, 112] and all("unreachable" in e for e in errors.values()), errors
    assert 2.0 <= took < 20, took  # the window, and far less than the reads' own deadline
    assert g.metrics.downs == 1  # type: ignore[union-attr]
    # ... and reads of other chunks, of another blob behind the same endpoints too, fail at once
    sent = ranged_gets(proxy)
    other = fetcher(tmp_path, world, f"http://{proxy.address}", client=client, failure_memo=30)
    for k in range(5):
        with pytest.raises(FetchError, match="unreachable"):
            other.read((130 + k) * CS, 10)
    assert ranged_gets(proxy) == sent
    # bytes arriving end it
    proxy.clear()
    client.request_succeeded(f.spec.endpoints())
    assert other.read(140 * CS, 10) == world.data[140 * CS : 140 * CS + 10]


def test_every_read_ends_within_its_deadline(tmp_path: Path, world: World, proxy: FaultProxy) -> None:
    # Retry-After beyond the deadline: one request, then EIO at once (no waiting for nothing)
    proxy.add("status", status=503, retry_after="30", ranged=True, times=1000)
    f = fetcher(tmp_path, world, f"http://{proxy.address}", read_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="Retry-After"):
        f.read(0, 10)
    assert time.monotonic() - t0 < 2.0 and ranged_gets(proxy) == 1
    # 503 without Retry-After: retried with backoff until the deadline, then EIO
    proxy.clear()
    proxy.add("status", status=503, ranged=True, times=1000)
    g = fetcher(tmp_path, world, f"http://{proxy.address}", read_timeout=2.0, down_after_seconds=60)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as ei:
        g.read(CS, 10)
    took = time.monotonic() - t0
    # It gives up once the next jittered backoff (0.05 s doubling, 50-100 %) would end past the deadline: at the
    # earliest after ~0.75 s of the 2 s (five retries at the low end of their jitter, then a sixth that no longer
    # fits); the upper slack is for a loaded machine.
    assert ei.value.reason in ("http_503", "timeout") and 0.7 <= took < 2.0 + 1.0, took
    assert ranged_gets(proxy) >= 4  # (0.05 s doubling, jittered: several retries fit in 2 s)


# ---------------------------------------------------------------------------------------- registry client
def _push_image(world: World) -> str:
    client = RegistryClient(plain_http=True)
    ref = f"{world.registry.url.removeprefix('http://')}/{REPO}"
    cfg = client.push_blob(ref, b"{}")
    doc = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg.digest, "size": 2},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": world.digest,
                       "size": len(world.data)}]}
    raw = json.dumps(doc).encode()
    client.put_manifest(f"{ref}:v1", raw, MT_OCI_MANIFEST, "v1")
    return sha256_digest(raw)


def test_registry_client_retries_cut_manifest_and_blob_bodies(world: World, proxy: FaultProxy) -> None:
    digest = _push_image(world)
    ref = f"{proxy.address}/{REPO}:v1"
    client = RegistryClient(plain_http=True, backoff=0.01)
    proxy.add("cut", method="GET", path="/manifests/", times=2)
    man = client.get_manifest(ref)
    assert man.digest == digest and proxy.count("200 cut") == 2
    cfg = man.config
    assert cfg is not None
    proxy.add("cut", method="GET", path="/blobs/", times=1)
    assert client.get_blob(ref, cfg.digest) == b"{}"
    assert hashlib.sha256(client.get_blob_range(ref, world.digest, 5, 100)).digest() == \
        hashlib.sha256(world.data[5:105]).digest()


def test_registry_client_keeps_the_calls_deadline(world: World, proxy: FaultProxy) -> None:
    _push_image(world)
    ref = f"{proxy.address}/{REPO}:v1"
    client = RegistryClient(plain_http=True, backoff=0.01, retries=10)
    proxy.add("status", status=503, retry_after="1", method="GET", path="/manifests/", times=1)
    t0 = time.monotonic()
    client.get_manifest(ref)  # Retry-After honoured
    assert proxy.stamps[-1] - proxy.stamps[0] >= 1.0 and time.monotonic() - t0 < 5
    proxy.clear()
    proxy.add("status", status=503, retry_after="30", method="GET", path="/manifests/", times=1000)
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="Retry-After"), client.deadline(2.0):
        client.get_manifest(ref)
    assert time.monotonic() - t0 < 2.0 and proxy.count("status 503") == 1
    proxy.clear()
    proxy.add("status", status=502, method="GET", path="/manifests/", times=1000)
    t0 = time.monotonic()
    with pytest.raises(TransientError), client.deadline(1.5):
        client.get_manifest(ref)  # 10 retries allowed, but not the time for them
    assert time.monotonic() - t0 < 1.5 + 1.0
