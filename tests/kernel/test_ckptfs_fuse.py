"""ckptfs through a real FUSE mount: torch.load (plain and mmap), safetensors, torch.distributed.checkpoint,
EIO on a corrupt chunk, read-only, clean unmount on SIGTERM.

The state dicts are generated here (random tensors, ~200 MB in all) — big enough for many chunks on
every stripe and for the read-ahead, page pushing and FUSE read paths to all be exercised."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch  # the dev extra installs both: a missing one is a failure
import torch

import ckptfs
from bootseer.testkit import wait_until
from ckptfs.manifest import MANIFEST_NAME
from ckptfs.reader import Checkpoint
from ckptfs.testing import mounted

CHUNK = 4 << 20


def _state_dict(seed: int, scale: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(scale * 256, 1024, generator=g),  # scale=64: 64 MiB
        "layers.0.attn.qkv": torch.randn(3 * 1024, 1024, generator=g, dtype=torch.float32).to(torch.bfloat16),
        "layers.0.mlp.w1": torch.randn(4096, 1024, generator=g),
        "layers.0.norm": torch.ones(1024),
        "step": torch.tensor(1000),
        "ids": torch.randint(0, 1 << 30, (12345,), generator=g, dtype=torch.int64),
    }


def _assert_equal(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, object]]]:
    root = tmp_path_factory.mktemp("ckptfs-fuse")
    src = root / "src"
    (src / "dcp").mkdir(parents=True)
    sds = {"model.pt": _state_dict(1, 96), "model.safetensors": _state_dict(2, 64), "dcp": _state_dict(3, 8)}
    torch.save(sds["model.pt"], src / "model.pt")  # ~130 MB
    safetensors_torch.save_file(sds["model.safetensors"], str(src / "model.safetensors"))  # type: ignore[arg-type]
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled … single process": intended
        dcp.save(sds["dcp"], checkpoint_id=str(src / "dcp"))
    store = root / "store"
    ckptfs.put(src, str(store), chunk_size=CHUNK, stripes=4, segment_chunks=4)
    return store, sds


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torch_safetensors_and_dcp_load_unchanged_from_the_mount(
    ckpt: tuple[Path, dict[str, dict[str, object]]], tmp_path: Path
) -> None:
    store, sds = ckpt
    mnt = tmp_path / "mnt"
    with mounted(str(store), mnt, ["--threads", "4", "--readahead", "4", "--memory", "64MiB"]):
        assert sorted(os.listdir(mnt)) == ["dcp", "model.pt", "model.safetensors"]
        st = os.stat(mnt / "model.pt")
        assert st.st_size == Checkpoint(str(store)).manifest.file("model.pt").size
        _assert_equal(torch.load(mnt / "model.pt", weights_only=True), sds["model.pt"])
        _assert_equal(torch.load(mnt / "model.pt", mmap=True, weights_only=True), sds["model.pt"])
        _assert_equal(safetensors_torch.load_file(str(mnt / "model.safetensors")), sds["model.safetensors"])

        import torch.distributed.checkpoint as dcp

        target = {k: torch.zeros_like(v) for k, v in sds["dcp"].items()}  # type: ignore[arg-type]
        dcp.load(target, checkpoint_id=str(mnt / "dcp"))
        _assert_equal(target, sds["dcp"])

        with pytest.raises(OSError) as ei, open(mnt / "model.pt", "r+b"):
            pass
        assert ei.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")


def test_python_api_loads_the_same(ckpt: tuple[Path, dict[str, dict[str, object]]]) -> None:
    store, sds = ckpt
    with ckptfs.open(str(store), "model.pt") as f:
        _assert_equal(torch.load(f, weights_only=True), sds["model.pt"])
    raw = ckptfs.read_file(str(store), "model.safetensors")
    _assert_equal(safetensors_torch.load(bytes(raw)), sds["model.safetensors"])


def _corrupt(store: Path, path: str, which: int) -> None:
    with Checkpoint(str(store)) as ck:
        ref = ck.manifest.file(path).chunks[which]
        obj = store / ck.manifest.objects[ref.obj].path
    with open(obj, "r+b") as fh:
        fh.seek(ref.offset + 4096)
        fh.write(b"\x00garbage\x00")


_TOUCH_ALL = """
import sys, safetensors.torch
sd = safetensors.torch.load_file(sys.argv[1])
print(sum(float(t.double().sum()) for t in sd.values()))
print("loaded")
"""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_corrupt_chunk_reads_as_eio_on_the_mount(
    ckpt: tuple[Path, dict[str, dict[str, object]]], tmp_path: Path
) -> None:
    store, sds = ckpt
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(store), str(bad)], check=True)
    _corrupt(bad, "model.safetensors", 12)
    _corrupt(bad, "model.pt", 5)
    mnt = tmp_path / "mnt"
    with mounted(str(bad), mnt, ["--retries", "1"]):
        with open(mnt / "model.safetensors", "rb") as fh:
            assert len(fh.read(CHUNK)) == CHUNK  # chunks before the bad one read fine
            with pytest.raises(OSError) as ei:
                fh.read()
            assert ei.value.errno == errno.EIO
        with pytest.raises(Exception, match=r"(?i)input/output|read"):
            torch.load(mnt / "model.pt", weights_only=True)
        # safetensors maps the file: a page that cannot be read is SIGBUS for the reader (the kernel's
        # EIO for mmap) — never tensors with wrong values.  Run it where that cannot kill the suite.
        r = subprocess.run([sys.executable, "-c", _TOUCH_ALL, str(mnt / "model.safetensors")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "loaded" not in r.stdout
        # files without a bad chunk in the same store still load
        import torch.distributed.checkpoint as dcp

        target = {k: torch.zeros_like(v) for k, v in sds["dcp"].items()}  # type: ignore[arg-type]
        dcp.load(target, checkpoint_id=str(mnt / "dcp"))
        _assert_equal(target, sds["dcp"])


def test_sigterm_unmounts_cleanly(ckpt: tuple[Path, dict[str, dict[str, object]]], tmp_path: Path) -> None:
    store, _ = ckpt
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ckptfs.cli", "mount", str(store), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.ismount(mnt) or proc.poll() is not None, 60, "mount")
        assert os.path.ismount(mnt)
        with open(mnt / "model.pt", "rb") as fh:
            assert fh.read(2) == b"PK"  # torch's zip format
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_mount_of_an_http_store_with_allow_other(ckpt: tuple[Path, dict[str, dict[str, object]]],
                                                tmp_path: Path) -> None:
    """The store served over HTTP by nginx (as an object store's HTTP endpoint is), mounted with
    ``--allow-other``: another user (uid 65534, as a training container's user may be) reads the exact bytes
    (without the option FUSE refuses every user but the one that mounted)."""
    import hashlib
    import tempfile

    from integration.bench.ckpt import nginx

    store, _ = ckpt
    scratch = Path(tempfile.mkdtemp(prefix="bs-ckpt-ao-", dir="/tmp"))  # traversable by the other user
    scratch.chmod(0o755)
    (scratch / "src").mkdir(mode=0o755)  # the checkpoint keeps its files' modes: readable by others
    original = Path(shutil.copy(store.parent / "src" / "model.safetensors", scratch / "src"))
    original.chmod(0o644)
    served = scratch / "store"  # where nginx's unprivileged workers can read it
    ckptfs.put(scratch / "src", str(served), chunk_size=CHUNK, stripes=4)
    mnt = scratch / "mnt"
    mnt.mkdir()
    proc = None
    try:
        with nginx(served, tmp_path / "nginx", rate=1 << 30) as (_, port):
            proc = subprocess.Popen([sys.executable, "-m", "ckptfs.cli", "mount", "--allow-other",
                                     f"http://127.0.0.1:{port}", str(mnt)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            wait_until(lambda: os.path.ismount(mnt) or proc.poll() is not None, 60, "mount")
            assert os.path.ismount(mnt), proc.stderr.read().decode() if proc.stderr else ""
            other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                    "sha256sum", str(mnt / "model.safetensors")], capture_output=True, text=True,
                                   timeout=120)
            assert other.returncode == 0, other.stderr
            assert other.stdout.split()[0] == hashlib.sha256(original.read_bytes()).hexdigest()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def test_mount_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "mnt").mkdir()
    r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "mount", str(tmp_path / "empty"), str(tmp_path / "mnt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no checkpoint" in r.stderr and MANIFEST_NAME in r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.slow
def test_multi_gb_state_dict_through_the_mount(tmp_path: Path) -> None:
    """The acceptance case at full size: a ~2.5 GB state dict, default chunking, torch.load on the mount."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(11)
    sd = {f"layers.{i}.w": torch.randn(8192, 8192, generator=g) for i in range(10)}  # 10 × 256 MiB
    torch.save(sd, src / "model.pt")
    store = tmp_path / "store"
    try:
        ckptfs.put(src, str(store), stripes=8)
        (src / "model.pt").unlink()
        with mounted(str(store), tmp_path / "mnt"):
            _assert_equal(torch.load(tmp_path / "mnt" / "model.pt", weights_only=True), sd)
            _assert_equal(torch.load(tmp_path / "mnt" / "model.pt", mmap=True, weights_only=True), sd)
    finally:  # 2.5 GB: do not leave it for pytest's tmp rotation
        shutil.rmtree(store, ignore_errors=True)
        (src / "model.pt").unlink(missing_ok=True)


def test_prefetch_reads_the_matching_files_before_the_job_opens_them(
        ckpt: tuple[Path, dict[str, dict[str, object]]], tmp_path: Path) -> None:
    """``--prefetch model.pt``: once the mount is up it reads model.pt into the page cache on its own, so the
    job's later read needs the store no more — here the store is moved away after the prefetch reported, and
    model.pt still reads back exactly, while model.safetensors (not matched) fails with EIO.  The prefetch's
    own read is logged as ``prefetch``, not as the job's ``checkpoint_load``."""
    import hashlib
    import json

    store, _ = ckpt
    mine = tmp_path / "store"
    shutil.copytree(store, mine)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ckptfs.cli", "mount", str(mine), str(mnt), "--prefetch",
                             "model.pt"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "BOOTSEER_EVENTS": str(log)})

    def lines() -> list[dict[str, object]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    try:
        wait_until(lambda: any(e["phase"] == "prefetch" for e in lines()) or proc.poll() is not None, 120,
                   "the prefetch event")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        (ev,) = [e for e in lines() if e["phase"] == "prefetch"]
        size = (store.parent / "src" / "model.pt").stat().st_size
        assert ev["status"] == "ok" and ev["component"] == "ckptfs mount"
        assert ev["attrs"] == {"bytes": size, "files": 1}  # type: ignore[comparison-overlap]
        assert not any(e["phase"] == "checkpoint_load" for e in lines())
        mine.rename(tmp_path / "gone")  # the store is unreachable from here on
        got = hashlib.sha256((mnt / "model.pt").read_bytes()).hexdigest()
        assert got == hashlib.sha256((store.parent / "src" / "model.pt").read_bytes()).hexdigest()
        with pytest.raises(OSError) as ei:
            (mnt / "model.safetensors").read_bytes()
        assert ei.value.errno == errno.EIO
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        loads = [e for e in lines() if e["phase"] == "checkpoint_load"]
        assert {e["attrs"]["path"] for e in loads} >= {"model.pt"}  # type: ignore[index]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
