"""A pull-through mirror that has not cached a blob answers range requests with the whole blob (``200``):
the fetcher closes that answer unread and waits for the mirror, instead of reading through it (which costs the
node the blob's prefix and the origin a stream of the blob per request: snapshotter.lazy.mirrorfill), and goes
past a mirror that never serves ranges, or when a read cannot wait.  The mirror and the registry are
fault-injecting proxies serving the blob themselves; ``ignore_range`` is the mirror still filling."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootseer.index import chunk_digests
from bootseer.testkit import wait_until
from integration.faultproxy import FaultProxy
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.scheduling import DEMAND, PREFETCH, Scheduler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.transport import HttpClient

CS = 64 << 10
DATA = random.Random(23).randbytes(20 * CS - 999)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def servers() -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """(mirror, registry), both serving the blob."""
    with FaultProxy(origin={DIGEST: DATA}) as mirror, FaultProxy(origin={DIGEST: DATA}) as registry:
        yield mirror, registry


def _fetcher(tmp_path: Path, mirror: FaultProxy, registry: FaultProxy, **cfg: Any) -> Fetcher:
    spec = BlobSpec(registry=registry.url, repository="t/blob", digest=DIGEST, size=len(DATA), chunk_size=CS,
                    chunks=chunk_digests(DATA, CS), mirrors=(mirror.url,))
    return Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(8, 2), client=HttpClient(),
                   config=FetchConfig(**{"mirror_probe": 0.02, "mirror_probe_max": 0.05, **cfg}))


def _answers(srv: FaultProxy) -> list[tuple[str | None, int]]:
    return [(e.range, e.status) for e in list(srv.exchanges) if e.method == "GET"]


def test_a_filling_mirror_is_waited_for_not_read_through(tmp_path: Path,
                                                          servers: tuple[FaultProxy, FaultProxy]) -> None:
    """Two whole-blob answers (the mirror copying the blob), then its range answer is what the read uses; the
    registry is never asked, and the mirror is not marked down for it."""
    mirror, registry = servers
    mirror.add("ignore_range", times=2)
    f = _fetcher(tmp_path, mirror, registry)
    assert f.read(15 * CS + 7, 100) == DATA[15 * CS + 7 : 15 * CS + 107]
    span = f"bytes={15 * CS}-{16 * CS - 1}"
    assert _answers(mirror) == [(span, 200), (span, 200), (span, 206)]
    assert _answers(registry) == []
    assert f.client.down(f.spec.endpoints()) is None and f.stats.failures == 0


def test_prefetch_runs_wait_for_the_mirror_then_use_it(tmp_path: Path,
                                                       servers: tuple[FaultProxy, FaultProxy]) -> None:
    """A multi-range request answered with the whole blob by a mirror that has served no range yet means "not
    cached": single-range probes follow, the one answered whole is asked again (never read through), and a
    206 proves the fill done; every run comes from the mirror."""
    mirror, registry = servers
    mirror.add("ignore_range", times=2)
    f = _fetcher(tmp_path, mirror, registry)
    f.ensure_runs([[7, 8], [2], [12]], PREFETCH)
    got = _answers(mirror)
    assert got[0][1] == 200 and "," in (got[0][0] or "")  # the multi-range request, answered whole
    runs = [f"bytes={7 * CS}-{9 * CS - 1}", f"bytes={2 * CS}-{3 * CS - 1}", f"bytes={12 * CS}-{13 * CS - 1}"]
    assert got[1:] == [(runs[0], 200), (runs[0], 206), (runs[1], 206), (runs[2], 206)]
    assert _answers(registry) == []
    assert f.read(7 * CS, 2 * CS) == DATA[7 * CS : 9 * CS] and f.read(12 * CS, CS) == DATA[12 * CS : 13 * CS]


def test_reads_go_past_a_mirror_that_never_serves_ranges(tmp_path: Path,
                                                         servers: tuple[FaultProxy, FaultProxy]) -> None:
    """A mirror answering every range request with the whole blob is given up after ``mirror_fill_wait``; a
    demand read whose deadline comes before the mirror's next probe goes to the registry at once."""
    mirror, registry = servers
    mirror.add("ignore_range", rate=1.0)
    f = _fetcher(tmp_path, mirror, registry, mirror_fill_wait=0.3)
    f.ensure(range(3, 5), PREFETCH)
    assert [s for _, s in _answers(registry)] == [206] and f.read(3 * CS, 2 * CS) == DATA[3 * CS : 5 * CS]
    assert {s for _, s in _answers(mirror)} == {200}
    n = len(_answers(mirror))
    f.ensure([9], DEMAND)  # the mirror is given up for this blob: not asked again
    assert len(_answers(mirror)) == n and len(_answers(registry)) == 2

    slow = _fetcher(tmp_path / "slow", mirror, registry, mirror_probe=30.0, mirror_probe_max=30.0,
                    read_timeout=5.0)
    assert slow.read(0, 10) == DATA[:10]  # 200 from the mirror; its next probe is past the read's deadline
    assert len(_answers(registry)) == 3 and slow.stats.failures == 0


def test_one_request_finds_out_whether_the_mirror_has_the_blob(tmp_path: Path,
                                                               servers: tuple[FaultProxy, FaultProxy]) -> None:
    """Readers of one blob at once send the mirror one request while its answer is unknown (each whole-blob
    answer costs the origin a stream of the blob); the others wait for that answer, then use the mirror."""
    mirror, registry = servers
    mirror.add("ignore_range", times=1)
    f = _fetcher(tmp_path, mirror, registry)
    mirror.hold()
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            assert f.read(i * CS, 10) == DATA[i * CS : i * CS + 10]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in (1, 5, 9, 13)]
    for t in threads:
        t.start()
    try:
        # the first reader's request reaches the mirror on its own schedule: wait for it as well
        wait_until(lambda: f.stats.retry_reasons.get("mirror_filling", 0) >= 3 and len(_answers(mirror)) >= 1,
                   10, "3 readers waiting and the first one's request at the mirror")
        assert len(_answers(mirror)) == 1  # the first one, held: the others did not ask
    finally:
        mirror.release()
    for t in threads:
        t.join(10)
    assert not errors and _answers(mirror)[0][1] == 200 and _answers(registry) == []
    assert sorted(s for _, s in _answers(mirror)[1:]) == [206] * 4
