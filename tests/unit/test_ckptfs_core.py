"""ckptfs without FUSE: layout, manifest, put/resume, the parallel reader, cache, retries, CLI, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ckptfs
from bootseer.testkit import wait_until
from ckptfs.baseline import read_file_single_stream
from ckptfs.cache import DigestCache
from ckptfs.cli import app
from ckptfs.errors import CheckpointExists, CheckpointNotFound, CkptfsError, CorruptChunkError, ManifestError
from ckptfs.manifest import MANIFEST_NAME, Manifest
from ckptfs.reader import Checkpoint, ReaderOptions, ReadState
from ckptfs.sizes import parse_size
from ckptfs.store import Store, open_store

CS = 64 << 10  # small chunks: many chunks, tails and stripes from little data


def _make_tree(root: Path) -> dict[str, bytes]:
    rng = __import__("random").Random(7)
    files = {
        "model.bin": rng.randbytes(CS * 37 + 123),  # many chunks, short tail
        "optim/state.bin": rng.randbytes(CS * 5),  # exact multiple
        "optim/tiny.json": b'{"step": 10}',
        "empty": b"",
        "zeros.bin": bytes(CS * 3),  # identical chunks (same digest)
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "emptydir").mkdir()
    os.chmod(root / "optim/tiny.json", 0o640)
    return files


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "src"
    src.mkdir()
    return src, _make_tree(src)


def test_put_then_read_every_file_back(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    uri = f"file://{tmp_path}/store"
    stats = ckptfs.put(src, uri, chunk_size=CS, stripes=4, segment_chunks=3)
    assert stats.bytes_uploaded == sum(len(v) for v in files.values())
    with Checkpoint(uri, reader_options=ReaderOptions(threads=4, memory_budget=8 * CS)) as ck:
        m = ck.manifest
        assert {o.stripe for o in m.objects} == {0, 1, 2, 3}
        # round-robin: consecutive chunks of a file sit on consecutive stripes
        stripes = [m.objects[c.obj].stripe for c in m.file("model.bin").chunks[:8]]
        assert len(set(stripes)) == 4 and stripes[:4] != stripes[1:5]
        assert all(c.offset % 4096 == 0 for _, _, c in m.iter_chunks())
        assert ck.listdir("") == ["empty", "emptydir", "model.bin", "optim", "zeros.bin"]
        assert ck.listdir("optim") == ["state.bin", "tiny.json"]
        assert ck.file("optim/tiny.json").mode == 0o640
        for rel, data in files.items():
            assert bytes(ck.read_file(rel)) == data, rel
        assert ck.verify() == []
    assert bytes(ckptfs.read_file(uri, "model.bin")) == files["model.bin"]
    assert bytes(read_file_single_stream(uri, "model.bin")) == files["model.bin"]


def test_open_is_a_seekable_file(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS, stripes=3)
    data = files["model.bin"]
    with ckptfs.open(str(tmp_path / "store"), "/model.bin") as f:
        assert f.size == len(data) and f.seekable() and f.readable()
        assert f.read(10) == data[:10]
        f.seek(CS - 5)
        assert f.read(10) == data[CS - 5 : CS + 5]  # crosses a chunk (and stripe) boundary
        f.seek(-3, os.SEEK_END)
        assert f.read() == data[-3:]
        assert f.read(5) == b""
        f.seek(0)
        buf = bytearray(3 * CS + 7)
        assert f.readinto(buf) == len(buf) and bytes(buf) == data[: len(buf)]
        with pytest.raises(OSError):
            f.seek(-1)
    assert f.closed


def test_put_is_idempotent_and_refuses_other_content(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, _ = tree
    uri = str(tmp_path / "store")
    ckptfs.put(src, uri, chunk_size=CS, stripes=2)
    again = ckptfs.put(src, uri, chunk_size=CS, stripes=2)
    assert again.already_complete and again.bytes_uploaded == 0
    (src / "model.bin").write_bytes(b"changed")
    with pytest.raises(CheckpointExists):
        ckptfs.put(src, uri, chunk_size=CS, stripes=2)


def test_killed_put_leaves_nothing_visible_and_rerun_resumes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(6 << 20)
    (src / "model.bin").write_bytes(payload)
    store = tmp_path / "store"
    # --max-rate makes the put take ~3 s, so it is surely still running when it is killed.
    cmd = [sys.executable, "-m", "ckptfs.cli", "put", str(src), str(store), "--chunk-size", "256KiB",
           "--stripes", "4", "--segment-chunks", "2", "--threads", "4", "--max-rate", "2MiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(list(store.rglob("*.done"))) >= 2, 30, "two finished segments")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (store / MANIFEST_NAME).exists()
    done_before = len(list(store.rglob("*.done")))
    assert 2 <= done_before < 12  # 6 MiB / 256 KiB = 24 chunks → 12 segments
    with pytest.raises(CheckpointNotFound, match="no checkpoint"):
        Checkpoint(str(store))
    result = CliRunner().invoke(app, ["ls", str(store)])
    assert result.exit_code == 1 and "no checkpoint" in result.output

    stats = ckptfs.put(src, str(store), chunk_size=256 << 10, stripes=4, segment_chunks=2)
    assert stats.segments_skipped >= done_before
    assert stats.bytes_uploaded < len(payload)
    assert bytes(ckptfs.read_file(str(store), "model.bin")) == payload


def test_corrupt_chunk_is_an_error_not_data(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    store = tmp_path / "store"
    ckptfs.put(src, str(store), chunk_size=CS, stripes=2)
    with Checkpoint(str(store)) as ck:
        ref = ck.manifest.file("model.bin").chunks[3]
        obj = store / ck.manifest.objects[ref.obj].path
    with open(obj, "r+b") as fh:
        fh.seek(ref.offset + 100)
        b = fh.read(1)
        fh.seek(ref.offset + 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    opts = ReaderOptions(retries=1, backoff=0.001)
    with Checkpoint(str(store), reader_options=opts) as ck:
        f = ck.file("model.bin")
        assert ck.read(f, 0, CS) == files["model.bin"][:CS]  # other chunks are fine
        with pytest.raises(CorruptChunkError) as ei:
            ck.read(f, 3 * CS + 10, 10)
        assert ei.value.errno == errno.EIO
        assert ck.source.stats.corrupt == 2  # first attempt and the retry
        problems = ck.verify()
    assert len(problems) == 1 and "model.bin@" in problems[0]
    with pytest.raises(CorruptChunkError):
        read_file_single_stream(str(store), "model.bin")
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and "bad chunk" in result.output


class _FlakyStore(Store):
    """Fails the first ``failures`` reads with a connection-style error, then behaves."""

    def __init__(self, inner: Store, failures: int) -> None:
        super().__init__(inner.uri, inner.fs, inner.root, kind=inner.kind)
        self.failures = failures

    def read_range_into(self, rel: str, offset: int, out: memoryview, hasher: object = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("injected: connection reset by peer")
        super().read_range_into(rel, offset, out, hasher)


def test_transient_errors_are_retried(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS, stripes=2)
    flaky = _FlakyStore(open_store(str(tmp_path / "store")), failures=2)
    with Checkpoint(flaky, reader_options=ReaderOptions(threads=1, retries=3, backoff=0.001)) as ck:
        assert bytes(ck.read_file("optim/state.bin")) == files["optim/state.bin"]
        assert ck.source.stats.retries == 2
    flaky = _FlakyStore(open_store(str(tmp_path / "store")), failures=100)
    with Checkpoint(flaky, reader_options=ReaderOptions(threads=1, retries=2, backoff=0.001)) as ck:
        with pytest.raises(OSError) as ei:
            ck.read_file("optim/state.bin")
        assert ei.value.errno == errno.EIO and "connection reset" in str(ei.value)


def test_disk_cache_survives_reopen_and_is_verified(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    store = tmp_path / "store"
    ckptfs.put(src, str(store), chunk_size=CS, stripes=2)
    cache_dir = tmp_path / "cache"
    with Checkpoint(str(store), reader_options=ReaderOptions(cache=DigestCache(cache_dir, 1 << 30))) as ck:
        assert bytes(ck.read_file("optim/state.bin")) == files["optim/state.bin"]
        assert ck.source.stats.store_bytes == len(files["optim/state.bin"])
    # A new instance (a remount) is served from the cache alone: remove the data objects entirely.
    cache = DigestCache(cache_dir, 1 << 30)
    assert cache.used == len(files["optim/state.bin"])
    with Checkpoint(str(store), reader_options=ReaderOptions(cache=cache)) as ck:
        for p in (store / "data").rglob("*"):
            if p.is_file():
                p.write_bytes(b"")
        assert bytes(ck.read_file("optim/state.bin")) == files["optim/state.bin"]
        assert ck.source.stats.store_bytes == 0 and ck.source.stats.cache_bytes > 0
    # A rotten cache entry is dropped, not served (and the store is empty now, so the read fails).
    victim = next(p for p in cache_dir.rglob("*") if p.is_file())
    victim.write_bytes(b"x" * victim.stat().st_size)
    opts = ReaderOptions(cache=DigestCache(cache_dir, 1 << 30), retries=0)
    with Checkpoint(str(store), reader_options=opts) as ck, pytest.raises(OSError):
        ck.read_file("optim/state.bin")
    assert not victim.exists()


def test_cache_is_lru_and_capped(tmp_path: Path) -> None:
    import hashlib

    blobs = [bytes([i]) * 1000 for i in range(5)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    c = DigestCache(tmp_path / "c", 3000)
    for d, b in zip(digests[:3], blobs[:3], strict=True):
        c.put(d, b)
    assert c.get(digests[0]) == blobs[0]  # 0 is now the most recent
    c.put(digests[3], blobs[3])  # evicts 1, the least recent
    assert digests[1] not in c and digests[0] in c and c.used <= 3000
    c2 = DigestCache(tmp_path / "c", 2000)  # reopen smaller: evicts the oldest by mtime
    assert c2.used <= 2000 and len(list((tmp_path / "c").rglob("*/*"))) == 2
    with pytest.raises(ValueError):
        c.get("../../etc/passwd")


def test_manifest_rejects_damage(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, _ = tree
    store = tmp_path / "store"
    ckptfs.put(src, str(store), chunk_size=CS, stripes=2)
    raw = (store / MANIFEST_NAME).read_bytes()
    assert Manifest.from_json(raw).total_bytes > 0
    doc = json.loads(raw)
    doc["files"][0]["size"] += 1
    with pytest.raises(ManifestError, match="do not add up"):
        Manifest.from_json(json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="format"):
        Manifest.from_json(b'{"format": "other/9"}')
    with pytest.raises(ManifestError):
        Manifest.from_json(b"not json")


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CkptfsError, match="not a directory"):
        ckptfs.put(tmp_path / "missing", str(tmp_path / "s"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "link").symlink_to("/etc/hostname")
    with pytest.raises(CkptfsError, match="symlinks"):
        ckptfs.put(src, str(tmp_path / "s"))
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3:///nobucket")
    with pytest.raises(ValueError, match="scheme"):
        open_store("nosuchproto://x/y")
    with pytest.raises(ValueError):
        ckptfs.put(src, str(tmp_path / "s"), chunk_size=0)
    for bad in ("", "12XB", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_size("64MiB") == 64 << 20 and parse_size("1.5G") == 1_500_000_000
    r = CliRunner().invoke(app, ["put", str(src), str(tmp_path / "s"), "--chunk-size", "lots"])
    assert r.exit_code == 2 and "not a size" in r.output


def test_cli_put_ls_get(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = tree
    uri = str(tmp_path / "store")
    runner = CliRunner()
    r = runner.invoke(app, ["put", str(src), uri, "--chunk-size", "64KiB", "--stripes", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ls", uri, "-l"])
    assert r.exit_code == 0 and "model.bin" in r.output and "3 stripes" in r.output
    r = runner.invoke(app, ["get", uri, str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    assert (tmp_path / "out" / "emptydir").is_dir()
    assert (tmp_path / "out/optim/tiny.json").stat().st_mode & 0o777 == 0o640
    r = runner.invoke(app, ["get", uri, str(tmp_path / "out2"), "nope.bin"])
    assert r.exit_code == 1 and "no file" in r.output


def test_bootseer_cli_mounts_ckptfs() -> None:
    from bootseer.cli import app as root

    r = CliRunner().invoke(root, ["ckptfs", "--help"])
    assert r.exit_code == 0
    for cmd in ("put", "ls", "verify", "get", "mount"):
        assert cmd in r.output


def test_large_read_lands_in_the_callers_buffer_not_the_pool(tree: tuple[Path, dict[str, bytes]],
                                                              tmp_path: Path) -> None:
    """Whole chunks of a large read are fetched straight into the caller's buffer by the fetch threads:
    only the partial chunks at either end pass through (and stay in) the memory pool."""
    src, files = tree
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS, stripes=4)
    data = files["model.bin"]
    with Checkpoint(str(tmp_path / "store"), reader_options=ReaderOptions(threads=4, memory_budget=64 * CS)) as ck:
        f = ck.file("model.bin")
        off = CS // 2 + 3
        buf = bytearray(20 * CS)  # 19 whole chunks and two partial ones
        assert ck.readinto(f, off, memoryview(buf), ReadState()) == len(buf)
        assert bytes(buf) == data[off : off + len(buf)]
        assert ck.source.pooled_bytes <= 2 * CS
        assert ck.source.stats.store_reads == 21


def test_prefetch_plan_takes_matching_files_in_order_up_to_the_bound() -> None:
    from ckptfs.prefetch import Planned, plan

    files = [("model.pt", 100), ("optim/state.pt", 50), ("model.safetensors", 70), ("README", 5)]
    assert plan(files, ["*.pt"], 1000) == [Planned("model.pt", 100), Planned("optim/state.pt", 50)]
    assert plan(files, ["*"], 120) == [Planned("model.pt", 100), Planned("optim/state.pt", 20)]  # cut at the bound
    assert plan(files, ["model.*"], 0) == []
    assert plan(files, ["nothing"], 1000) == []


def _two_readers(ck: Checkpoint) -> None:
    """Reader A reads chunks 20.. to the end; then reader B starts at chunk 10 and reads on sequentially."""
    f = ck.file("model.bin")
    a, b = ReadState(), ReadState()
    for i in range(20, len(f.chunks)):
        ck.read(f, i * CS, CS, a)
    for i in (10, 11):
        ck.read(f, i * CS, CS, b)
    ck.source.wait_idle()


@pytest.mark.parametrize("keeps_pages", [True, False])
def test_read_ahead_passes_over_chunks_the_page_cache_already_has(tree: tuple[Path, dict[str, bytes]],
                                                                   tmp_path: Path, keeps_pages: bool) -> None:
    """Under a FUSE mount the kernel keeps what it was given: B's read-ahead must not fetch again the chunks A
    already read (they would be fetched for nobody: B finds them in the page cache).  Without that consumer
    (the Python API) a recycled chunk is read ahead again, as a reader of its own needs it."""
    src, _ = tree
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS, stripes=4)
    ck = Checkpoint(str(tmp_path / "store"),
                    reader_options=ReaderOptions(threads=4, readahead=30, memory_budget=64 * CS))
    ck.source.consumer_keeps_pages = keeps_pages
    with ck:
        _two_readers(ck)
    reads = ck.source.stats.store_reads
    once = len(ck.file("model.bin").chunks) - 10
    if keeps_pages:
        assert reads == once  # chunks 10.. each fetched once
    else:
        assert reads > once


def test_a_chunk_asked_for_again_turns_read_ahead_back_on(tree: tuple[Path, dict[str, bytes]],
                                                          tmp_path: Path) -> None:
    """When the kernel asks for a chunk it was already given, its page cache let pages go: from then on
    read-ahead fetches what it had passed over, or a re-read would be one demand fetch at a time."""
    src, files = tree
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS, stripes=4)
    with Checkpoint(str(tmp_path / "store"),
                    reader_options=ReaderOptions(threads=4, readahead=30, memory_budget=64 * CS)) as ck:
        ck.source.consumer_keeps_pages = True
        _two_readers(ck)
        f = ck.file("model.bin")
        before = ck.source.stats.store_reads
        c = ReadState()
        assert ck.read(f, 20 * CS, CS, c) == files["model.bin"][20 * CS : 21 * CS]  # delivered, asked again
        ck.read(f, 21 * CS, CS, c)  # sequential: read-ahead runs over the chunks it passed over before
        ck.source.wait_idle()
        assert ck.source.stats.store_reads >= before + 8
