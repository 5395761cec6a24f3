"""The lazy data path end to end, with real parts: a docker-registry holding an EROFS blob built here
(mkfs.erofs -zlz4hc), a counting / misbehaving proxy in front of it, and the data-path daemon
(``python -m snapshotter.lazy.serve``: FUSE → loop device → erofs) in a child process we can SIGKILL.

Why a child process: pyfuse3 allows one FUSE mount per process, and crashes and restarts are process
events; the test process only reads the mounts, like a container would.  Every test removes what it
mounted; the ones that shut the daemon down with teardown also assert that nothing was left behind."""

from __future__ import annotations

import errno
import itertools
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootseer.control import ControlError
from bootseer.testkit import drop_caches, run_with_deadline, wait_until
from integration.faultproxy import FaultProxy
from snapshotter.lazy import loop
from snapshotter.lazy import mount as mnt
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.testing import (
    LazyDaemon,
    Registry,
    build_erofs,
    cleanup_root,
    loops_below,
    make_tree,
    push_blob,
    read_eio,
    spec_for,
    tree_digest,
)

REPO = "bootseer/lazytest"
CHUNK = 256 << 10
NO_FILL = {"fill": {"enabled": False}}


@dataclass
class World:
    src: Path
    data: bytes
    digest: str
    registry: Registry
    tree: dict[str, str]

    def spec(self, base: str) -> BlobSpec:
        return spec_for(base, REPO, self.data, CHUNK)

    def chunk_inside(self, rel: str) -> int:
        """A chunk of the blob made only of bytes of file ``rel`` (stored raw: incompressible data)."""
        content = (self.src / rel).read_bytes()
        inside = [k for k in range(len(self.data) // CHUNK)
                  if content.find(self.data[k * CHUNK : (k + 1) * CHUNK]) >= 0]
        assert inside, f"no chunk lies entirely inside {rel}"
        return inside[len(inside) // 2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("lazy")
    src = make_tree(base / "src")
    data = build_erofs(src, base / "img.erofs").read_bytes()
    assert len(data) > 40 * CHUNK
    reg = Registry(base / "registry").start()
    try:
        digest = push_blob(reg.url, REPO, data)
        yield World(src, data, digest, reg, tree_digest(src))
    finally:
        reg.stop()


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    with FaultProxy(world.registry.url.removeprefix("http://")) as p:
        yield p


@pytest.fixture
def daemon_root() -> Iterator[Path]:
    """A short unique root (the control socket path must stay under 108 bytes); cleaned whatever happens."""
    root = Path("/tmp") / f"bs-lazy-{secrets.token_hex(3)}"
    yield root
    cleanup_root(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start(daemon_root: Path) -> Iterator[Callable[..., LazyDaemon]]:
    started: list[LazyDaemon] = []

    def make(config: dict[str, Any] | None = None) -> LazyDaemon:
        d = LazyDaemon(daemon_root, config).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop(teardown=True)


def _acquire(d: LazyDaemon, spec: BlobSpec, owner: str = "ns/layer1") -> Path:
    return Path(d.call("acquire", spec=spec.to_json(), owner=owner)["mountpoint"])


def _read(path: Path, timeout: float = 30) -> bytes:
    return run_with_deadline(path.read_bytes, timeout, f"read {path}")


def _disjoint(reqs: list[Any]) -> bool:
    spans = sorted(r.span() for r in reqs)
    return all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def _assert_clean(d: LazyDaemon, root: Path) -> None:
    """Shut the daemon down with teardown and check that it left no mount and no loop device behind."""
    d.stop(teardown=True)
    assert cleanup_root(root) == []


# ---------------------------------------------------------------------------------------------------
def test_lazy_mount_reads_the_tree_fetching_only_what_is_read(world: World, proxy: FaultProxy,
                                                              start: Callable[..., LazyDaemon],
                                                              daemon_root: Path) -> None:
    d = start(NO_FILL)
    mp = _acquire(d, world.spec(proxy.url))
    assert mnt.top_mount(mp) is not None and mnt.top_mount(mp).fstype == "erofs"  # type: ignore[union-attr]
    rel = "dir/sub3/file10.txt"
    assert _read(mp / rel) == (world.src / rel).read_bytes()
    partial = proxy.served_bytes(world.digest)
    assert 0 < partial <= len(world.data) // 10, f"{partial} of {len(world.data)} bytes for one small file"
    print(f"one small file: registry served {partial} of {len(world.data)} bytes")

    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree
    reqs = proxy.blob_requests(world.digest)
    assert _disjoint(reqs), "a chunk was fetched twice"
    st = d.status(world.digest)
    assert st["fetched"]["bytes"]["demand"] == proxy.served_bytes(world.digest) <= len(world.data)
    assert st["fetched"]["bytes"]["background"] == 0 and st["fuse"]["errors"] == 0
    assert not st["swapped"] and st["fuse"]["reads"] > 0

    # Releasing the only owner unmounts and frees the loop device, but keeps the cache.
    assert d.call("release", owner="ns/layer1")["gone"] == [world.digest]
    assert mnt.mounts_at(mp) == [] and loops_below(daemon_root) == []
    assert world.spec(proxy.url).name not in os.listdir(daemon_root / "fuse")
    st = d.status(world.digest)
    assert not st["mounted"] and st["bytes_local"] > 0 and st["owners"] == []
    _assert_clean(d, daemon_root)


def test_concurrent_readers_of_a_missing_chunk_cause_one_fetch(world: World, proxy: FaultProxy,
                                                               start: Callable[..., LazyDaemon]) -> None:
    d = start(NO_FILL)
    spec = world.spec(proxy.url)
    _acquire(d, spec)
    k = world.chunk_inside("rand.bin")
    fuse_file = d.root / "fuse" / spec.name
    before = len(proxy.blob_requests(world.digest))
    gate = proxy.hold()
    got: dict[int, bytes] = {}

    def reader(j: int) -> None:
        fd = os.open(fuse_file, os.O_RDONLY)
        try:
            got[j] = os.pread(fd, 4096, k * CHUNK + j * 8192)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(j,), daemon=True) for j in range(4)]
    for t in threads:
        t.start()
    # the proxy logs a request once upstream has answered it (then holds the answer): the readers may be
    # waiting on the fetch before its request shows in the log
    wait_until(lambda: d.status(world.digest)["fetched"]["dedup_waits"] >= 3
               and len(proxy.blob_requests(world.digest)) > before, 20, "3 readers waiting on 1 fetch")
    assert len(proxy.blob_requests(world.digest)) == before + 1
    gate.set()
    for t in threads:
        t.join(20)
    assert {j: got.get(j) for j in range(4)} == {
        j: world.data[k * CHUNK + j * 8192 : k * CHUNK + j * 8192 + 4096] for j in range(4)}
    covering = [r for r in proxy.blob_requests(world.digest) if r.span()[0] <= k * CHUNK <= r.span()[1]]
    assert len(covering) == 1


def test_corrupt_chunk_in_registry_storage_is_eio_for_that_file_only(world: World, proxy: FaultProxy,
                                                                     start: Callable[..., LazyDaemon]) -> None:
    k = world.chunk_inside("rand.bin")
    blob = world.registry.blob_data(world.digest)
    original = blob.read_bytes()[k * CHUNK : (k + 1) * CHUNK]
    with open(blob, "r+b") as f:
        f.seek(k * CHUNK + 1000)
        f.write(b"\xde\xad\xbe\xef")
    try:
        d = start({"fill": {"enabled": False}, "fetch": {"retries": 1, "backoff": 0.05}})
        mp = _acquire(d, world.spec(proxy.url))
        assert run_with_deadline(lambda: read_eio(mp / "rand.bin"), 30, "reading the corrupt file")
        for rel in ("seq.txt", "b64.txt", "dir/sub0/file0.txt", "link"):
            assert _read(mp / rel) == (world.src / rel).read_bytes(), rel
        st = d.status(world.digest)
        assert st["fetched"]["corrupt"] >= 2 and st["fuse"]["errors"] >= 1  # first attempt + retry
        assert "failed verification" in d.tail(200)
        assert run_with_deadline(lambda: read_eio(mp / "rand.bin"), 30, "reading it again")  # still no bytes
    finally:
        with open(blob, "r+b") as f:
            f.seek(k * CHUNK)
            f.write(original)


def test_fill_swaps_off_fuse_and_survives_sigkill(world: World, proxy: FaultProxy,
                                                  start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    d = start({"fill_rate": 64 << 20})
    spec = world.spec(proxy.url)
    mp = _acquire(d, spec)
    assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    assert d.call("wait_swapped", digest=world.digest, timeout=60)["swapped"]
    st = d.status(world.digest)
    assert st["swapped"] and st["chunks_local"] == st["chunks"] and st["fetched"]["bytes"]["background"] > 0
    number = int(st["loop"].removeprefix("/dev/loop"))
    assert loop.backed_by(number, daemon_root / "cache" / spec.name / "data")
    assert spec.name not in os.listdir(daemon_root / "fuse")
    assert _disjoint(proxy.blob_requests(world.digest))
    assert proxy.served_bytes(world.digest) == len(world.data)  # every chunk exactly once

    fuse_reads = st["fuse"]["reads"]
    drop_caches()
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the swapped tree") == world.tree
    assert d.status(world.digest)["fuse"]["reads"] == fuse_reads, "FUSE served reads after the swap"

    d.kill()
    drop_caches()
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading with the daemon dead") == world.tree
    mnt.umount(mp)
    wait_until(lambda: loops_below(daemon_root) == [], 10, "loop device autoclear")


def test_restart_before_swap_resumes_reads(world: World, proxy: FaultProxy, start: Callable[..., LazyDaemon],
                                          daemon_root: Path) -> None:
    d = start(NO_FILL)
    mp = _acquire(d, world.spec(proxy.url))
    assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    d.kill()
    # a dead FUSE server fails reads (the kernel aborts the connection); run_with_deadline fails the test if the
    # read hangs instead — no wall-clock bound here, this machine is shared
    assert run_with_deadline(lambda: read_eio(mp / "b64.txt"), 30, "reading with the daemon dead")

    d2 = start(NO_FILL)
    st = d2.status(world.digest)
    assert st["mounted"] and not st["swapped"] and st["owners"] == ["ns/layer1"]
    assert _read(mp / "b64.txt") == (world.src / "b64.txt").read_bytes()
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree
    assert "re-attached" in d2.tail(100)
    _assert_clean(d2, daemon_root)


def test_registry_down_is_eio_within_the_timeout_and_works_when_back(world: World, proxy: FaultProxy,
                                                                     start: Callable[..., LazyDaemon]) -> None:
    timeout = 2.0
    d = start({"fill": {"enabled": False}, "fetch": {"read_timeout": timeout, "io_timeout": 1.0,
                                                      "connect_timeout": 1.0, "failure_memo": 1.0}})
    mp = _acquire(d, world.spec(proxy.url))
    hang = proxy.add("hang", rate=1.0)
    t0 = time.monotonic()
    assert run_with_deadline(lambda: read_eio(mp / "b64.txt"), 30, "read with the registry hanging")
    took = time.monotonic() - t0
    print(f"registry hanging: EIO after {took:.2f}s (read_timeout {timeout}s)")
    # one deadline for the whole read(2), not one per read-ahead request (those ran 4x the timeout); the
    # slack is for a loaded machine
    assert took < 3 * timeout
    proxy.remove(hang)
    drop = proxy.add("drop", rate=1.0)  # connections dropped: also EIO, no hang
    assert run_with_deadline(lambda: read_eio(mp / "seq.txt"), 30, "read with the registry dropping connections")
    proxy.remove(drop)

    def works() -> bool:
        try:
            return (mp / "b64.txt").read_bytes() == (world.src / "b64.txt").read_bytes()
        except OSError:
            return False

    wait_until(lambda: run_with_deadline(works, 30, "read"), 15, "reads after the registry is back")
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree


def test_shared_layer_refcount_and_complete_cache_mounts_without_fuse(world: World, proxy: FaultProxy,
                                                                      start: Callable[..., LazyDaemon],
                                                                      daemon_root: Path) -> None:
    d = start()
    spec = world.spec(proxy.url)
    mp = _acquire(d, spec, "ns/a")
    assert _acquire(d, spec, "ns/b") == mp
    assert d.call("wait_swapped", digest=world.digest, timeout=60)["swapped"]
    assert d.call("release", owner="ns/a")["gone"] == []
    assert mnt.top_mount(mp) is not None
    assert d.call("release", owner="ns/b")["gone"] == [world.digest]
    assert mnt.mounts_at(mp) == [] and loops_below(daemon_root) == []
    served = proxy.served_bytes(world.digest)

    mp2 = _acquire(d, spec, "ns/c")  # the cache is complete: mounted straight on the local file
    st = d.status(world.digest)
    assert st["swapped"] and proxy.served_bytes(world.digest) == served
    assert run_with_deadline(lambda: tree_digest(mp2), 60, "reading the tree") == world.tree
    assert d.status(world.digest)["fuse"]["reads"] == 0
    _assert_clean(d, daemon_root)


def test_cache_budget_evicts_released_layers_only(world: World, proxy: FaultProxy,
                                                  start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    d = start({"cache_cap_bytes": 1 << 20, "housekeeping_interval": 3600})
    spec = world.spec(proxy.url)
    mp = _acquire(d, spec)
    assert d.call("wait_swapped", digest=world.digest, timeout=60)["swapped"]
    d.call("housekeeping")
    assert (daemon_root / "cache" / spec.name / "data").exists()  # over budget, but in use
    assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    d.call("release", owner="ns/layer1")
    d.call("housekeeping")
    assert not (daemon_root / "cache" / spec.name).exists()
    assert d.call("status")["layers"] == []
    assert "evicted cache" in d.tail(50)
    _assert_clean(d, daemon_root)


def test_bad_blob_fails_acquire_and_leaves_nothing(world: World, proxy: FaultProxy,
                                                   start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    d = start({"fill": {"enabled": False}, "fetch": {"retries": 0, "read_timeout": 5}})
    good = world.spec(proxy.url)
    # The index promises chunks the registry does not have: every read is EIO, so erofs cannot mount.
    bad = BlobSpec(registry=good.registry, repository=REPO, digest=good.digest, size=good.size,
                   chunk_size=good.chunk_size, chunks=tuple("0" * 64 for _ in good.chunks))
    with pytest.raises(RuntimeError) as ei:
        _acquire(d, bad)
    # erofs could not read its superblock: EIO, passed on by the daemon (not any error at all)
    assert isinstance(ei.value, ControlError) and ei.value.errno == errno.EIO, ei.value
    assert d.call("status")["layers"] == []
    assert mnt.mounts_at(daemon_root / "mnt" / good.name) == [] and loops_below(daemon_root) == []
    mp = _acquire(d, good)  # and the right spec still works afterwards
    assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    _assert_clean(d, daemon_root)


def test_recording_logs_every_fuse_read_and_holds_the_swap(world: World, proxy: FaultProxy,
                                                           start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    """What the recorder relies on: while a recording runs, every read reaching FUSE for the blob is logged
    (blob digest, offset, length, monotonic ns) and the layer stays behind FUSE even once it is complete."""
    d = start({"fill_rate": 64 << 20})
    spec = world.spec(proxy.url)
    log_path = daemon_root / "rec" / "reads.jsonl"
    rec = d.call("record_start", path=str(log_path), digests=[world.digest], hold_swap=True)
    mp = _acquire(d, spec)
    assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    wait_until(lambda: d.status(world.digest)["chunks_local"] == d.status(world.digest)["chunks"], 60,
               "background fill complete")
    d.call("housekeeping")
    assert not d.status(world.digest)["swapped"]  # held: the recording must keep seeing reads
    assert _read(mp / "b64.txt") == (world.src / "b64.txt").read_bytes()
    # nothing is pushed into the page cache while recording: it would hide the container's reads
    job = d.call("prefetch", digest=world.digest, ranges=[[0, spec.size]], wait=30)
    assert job["done"] and job["page_cache_bytes"] == 0
    fuse_reads = d.status(world.digest)["fuse"]["reads"]
    out = d.call("record_stop", id=rec["id"])
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert out["records"] == len(lines) == fuse_reads > 0
    assert {x["blob"] for x in lines} == {world.digest}
    assert all(0 <= x["offset"] < spec.size and x["length"] > 0 for x in lines)
    assert [x["t_ns"] for x in lines] == sorted(x["t_ns"] for x in lines)
    d.call("housekeeping")  # the hold is gone: the complete layer leaves FUSE
    assert d.call("wait_swapped", digest=world.digest, timeout=60)["swapped"]
    _assert_clean(d, daemon_root)


@pytest.mark.parametrize("page_cache", [True, False])
def test_prefetched_chunks_are_read_from_the_page_cache_without_fuse(world: World, proxy: FaultProxy,
                                                                      start: Callable[..., LazyDaemon],
                                                                      daemon_root: Path, page_cache: bool) -> None:
    """What saves a prefetched start-up its FUSE round trips: prefetch pushes the chunks it made local into
    the kernel's page cache of the FUSE file, so the container's reads of them never reach the daemon.  With
    ``page_cache = false`` (direct I/O) every read still does — the contrast shows the push is what works."""
    d = start({**NO_FILL, "page_cache": page_cache})
    spec = world.spec(proxy.url)
    mp = _acquire(d, spec)
    job = d.call("prefetch", digest=world.digest, ranges=[[0, spec.size]], wait=60)
    assert job["done"] and job["failed"] == 0
    assert job["page_cache_bytes"] == (spec.size if page_cache else 0)
    before = d.status(world.digest)
    reads, demand = before["fuse"]["reads"], before["fetched"]["bytes"]["demand"]  # the mount's superblock
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree  # right bytes
    more = d.status(world.digest)["fuse"]["reads"] - reads
    if page_cache:
        assert more == 0, f"{more} reads of prefetched data reached FUSE"
    else:
        assert more > 0
    assert d.status(world.digest)["fetched"]["bytes"]["demand"] == demand  # prefetch had fetched the rest
    _assert_clean(d, daemon_root)


def test_prefetch_runs_go_out_as_one_multi_range_request(world: World, proxy: FaultProxy,
                                                         start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    """docker-registry serves ``multipart/byteranges``: the next runs of a prefetch share one request (the
    registry spends ~4 ms of CPU per request, whatever its size), and every chunk still verifies."""
    d = start(NO_FILL)
    mp = _acquire(d, world.spec(proxy.url))
    proxy.clear()
    ranges = [[20 * CHUNK, 2 * CHUNK], [10 * CHUNK, 1], [30 * CHUNK + 5, 100]]  # first-access order
    job = d.call("prefetch", digest=world.digest, ranges=ranges, wait=60)
    assert job["done"] and job["failed"] == 0 and job["fetched"] == 4
    reqs = proxy.blob_requests(world.digest)
    assert [r.range for r in reqs] == [f"bytes={20 * CHUNK}-{22 * CHUNK - 1},{10 * CHUNK}-{11 * CHUNK - 1},"
                                       f"{30 * CHUNK}-{31 * CHUNK - 1}"]
    assert reqs[0].status == 206 and d.status(world.digest)["fetched"]["bytes"]["prefetch"] == 4 * CHUNK
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree  # right bytes
    _assert_clean(d, daemon_root)


def test_only_runs_due_close_together_share_a_multi_range_request(
        world: World, proxy: FaultProxy, start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    """With recorded first-access times, a request carries only runs due within ``prefetch_batch_window``
    (0.05 s) of its first: a batch admitted for its earliest run must not carry bytes due much later (at
    200 Mbit/s that took link share from the runs due next)."""
    d = start(NO_FILL)
    _acquire(d, world.spec(proxy.url))
    proxy.clear()
    ms = 1_000_000
    ranges = [[20 * CHUNK, 2 * CHUNK, 0], [10 * CHUNK, 1, 30 * ms], [30 * CHUNK + 5, 100, 400 * ms],
              [40 * CHUNK, 1, 420 * ms]]
    job = d.call("prefetch", digest=world.digest, ranges=ranges, concurrency=1, start=time.monotonic(), wait=60)
    assert job["done"] and job["failed"] == 0 and job["fetched"] == 5
    assert [r.range for r in proxy.blob_requests(world.digest)] == [
        f"bytes={20 * CHUNK}-{22 * CHUNK - 1},{10 * CHUNK}-{11 * CHUNK - 1}",
        f"bytes={30 * CHUNK}-{31 * CHUNK - 1},{40 * CHUNK}-{41 * CHUNK - 1}"]
    _assert_clean(d, daemon_root)


def test_a_hold_taken_over_keeps_the_layer_mounted_and_is_recorded_in_one_write(
        world: World, proxy: FaultProxy, start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    """A Prepare taking over a layer set up ahead of it: the new owner replaces the provisional one in one step
    (the layer is never unheld, so never unmounted in between), and the record on disk names the new owner
    — which is what a restarted daemon re-mounts the layer for."""
    d = start(NO_FILL)
    mp = _acquire(d, world.spec(proxy.url), owner="ahead/sha256:m/sha256:l")
    loop_before = d.status(world.digest)["loop"]
    again = Path(d.call("acquire", spec=world.spec(proxy.url).to_json(), owner="ns/chain-1",
                        replaces="ahead/sha256:m/sha256:l")["mountpoint"])
    st = d.status(world.digest)
    assert again == mp and st["mounted"] and st["loop"] == loop_before and st["owners"] == ["ns/chain-1"]
    records = [json.loads(p.read_text()) for p in (daemon_root / "layers").glob("*.json")]
    assert [r["owners"] for r in records] == [["ns/chain-1"]]
    assert run_with_deadline(lambda: tree_digest(mp), 60, "reading the tree") == world.tree
    _assert_clean(d, daemon_root)


def test_specs_sharing_a_blob_digest_from_another_source_do_not_share_a_mount(
        world: World, proxy: FaultProxy, start: Callable[..., LazyDaemon], daemon_root: Path) -> None:
    """The layer an index from one registry set up is not handed to a spec from another registry (or with
    another chunk table) that claims the same blob digest: each gets its own mount and cache."""
    d = start(NO_FILL)
    here, there = world.spec(proxy.url), world.spec(world.registry.url)
    assert here.digest == there.digest and here.key != there.key
    mp_here = _acquire(d, here, "ns/a")
    mp_there = _acquire(d, there, "ns/b")
    assert mp_here != mp_there
    assert {x["key"] for x in d.call("status")["layers"]} == {here.key, there.key}
    assert (daemon_root / "cache" / here.name).is_dir() and (daemon_root / "cache" / there.name).is_dir()
    for mp in (mp_here, mp_there):
        assert _read(mp / "seq.txt") == (world.src / "seq.txt").read_bytes()
    assert d.call("release", owner="ns/a")["gone"] == [world.digest]
    assert mnt.top_mount(mp_there) is not None  # the other source's layer stays
    _assert_clean(d, daemon_root)
