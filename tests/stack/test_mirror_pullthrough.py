"""Lazy reads through a real pull-through mirror: docker-registry 2.8 in proxy mode in front of a real origin.

A cold mirror answers a range request with the whole blob (``200``) and streams it from the origin again for
every such request until it has stored the blob (registry/proxy/proxyblobstore.go).  The fetcher must close
that answer unread and wait for the mirror (snapshotter.lazy.mirrorfill): read through, a chunk near the end
of the blob costs the node the blob's whole prefix and the origin a second stream of it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bootseer.index import chunk_digests
from bootseer.registry import RegistryClient, sha256_digest
from bootseer.testkit import free_port, wait_until
from integration.bench.fleet import log_totals, registry_doc
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.fetcher import FetchConfig, Fetcher
from snapshotter.lazy.scheduling import DEMAND, PREFETCH, Scheduler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.transport import HttpClient

CS = 256 << 10
SIZE = 64 << 20


def _registry(root: Path, name: str, proxy: str | None = None) -> tuple[subprocess.Popen[bytes], str, Path]:
    addr = f"127.0.0.1:{free_port()}"
    conf, log = root / f"{name}.yml", root / f"{name}.log"
    conf.write_text(json.dumps(registry_doc(root / name, addr, proxy=proxy)))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    wait_until(lambda: _up(addr), 30, f"{name} registry")
    return proc, addr, log


def _up(addr: str) -> bool:
    try:
        return requests.get(f"http://{addr}/v2/", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def origin_and_mirror(tmp_path: Path) -> Iterator[tuple[str, Path, str, Path]]:
    """(origin host:port, its log, mirror host:port, its log): two docker-registry processes on loopback."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, origin, olog = _registry(tmp_path, "origin")
        procs.append(proc)
        proc, mirror, mlog = _registry(tmp_path, "mirror", proxy=f"http://{origin}")
        procs.append(proc)
        yield origin, olog, mirror, mlog
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_reads_through_a_cold_pull_through_mirror_cost_the_origin_one_copy(
        tmp_path: Path, origin_and_mirror: tuple[str, Path, str, Path]) -> None:
    """A prefetch of scattered runs and demand reads near the end of a 64 MiB blob, at once, through a cold
    mirror: right bytes, nothing asked of the origin but by the mirror, and the origin serves the blob about
    once (the mirror's own copy, plus what the sockets held of the answers closed unread)."""
    origin, olog, mirror, mlog = origin_and_mirror
    data = os.urandom(SIZE)
    digest = sha256_digest(data)
    RegistryClient().push_blob(f"{origin}/t/pullthrough", data)
    o0 = olog.stat().st_size
    spec = BlobSpec(registry=f"http://{origin}", repository="t/pullthrough", digest=digest, size=SIZE,
                    chunk_size=CS, chunks=chunk_digests(data, CS), mirrors=(f"http://{mirror}",))
    f = Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(8, 2), client=HttpClient(),
                config=FetchConfig(mirror_probe=0.2, mirror_probe_max=0.5))
    n = SIZE // CS
    got: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def demand(i: int) -> None:
        try:
            got[i] = f.read(i * CS + 10, 1000)
        except BaseException as e:  # reported below
            errors.append(e)

    readers = [threading.Thread(target=demand, args=(i,)) for i in (n - 1, n - 7, n // 2)]
    for t in readers:
        t.start()
    f.ensure_runs([[n - 3, n - 2], [5], [n - 20]], PREFETCH)
    for t in readers:
        t.join(120)
    assert not errors, errors
    assert got == {i: data[i * CS + 10 : i * CS + 1010] for i in (n - 1, n - 7, n // 2)}
    for i in (5, n - 20, n - 3, n - 2):
        assert f.read(i * CS, CS) == data[i * CS : (i + 1) * CS]
    assert f.stats.failures == 0 and f.stats.bytes[DEMAND] + f.stats.bytes[PREFETCH] <= 12 * CS
    wait_until(lambda: log_totals(_since(olog, o0)).bytes >= SIZE, 30, "the mirror's copy logged by the origin")
    at_origin = log_totals(_since(olog, o0))
    asked = [json.loads(x) for x in _since(olog, o0) if '"response completed' in x]
    assert {d["http.request.useragent"] for d in asked} == {"Go-http-client/1.1"}  # the mirror alone asked
    assert at_origin.bytes <= 1.6 * SIZE, f"the origin served {at_origin.bytes / SIZE:.2f} copies of the blob"
    at_mirror = log_totals(_since(mlog, 0))
    assert at_mirror.blob_partial >= 1  # ranges came from the mirror's storage


def _since(log: Path, offset: int) -> list[str]:
    with open(log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace").splitlines()
