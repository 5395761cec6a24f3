"""ckptfs against a hostile store or a concurrent writer (issue 18, item 8).

Whoever can write a checkpoint's store must not be able to make a reader read, or ``get`` write, outside
the checkpoint, nor plant setuid files; two puts to one URI must not interleave; and a published
manifest must never point at bytes a crash could lose.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ckptfs
from ckptfs.cli import app
from ckptfs.errors import CheckpointBusy, ManifestError
from ckptfs.manifest import MANIFEST_NAME
from ckptfs.put import LOCK_DIR
from ckptfs.reader import Checkpoint

CS = 64 << 10


def _store(tmp_path: Path, payload: bytes = b"x" * (3 * CS + 5), name: str = "store") -> Path:
    src = tmp_path / f"src-{name}"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(payload)
    (src / "sub" / "a.txt").write_bytes(b"hello")
    ckptfs.put(src, str(tmp_path / name), chunk_size=CS, stripes=2)
    return tmp_path / name


def _rewrite(store: Path, edit: Any) -> None:
    doc = json.loads((store / MANIFEST_NAME).read_bytes())
    edit(doc)
    (store / MANIFEST_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("object", "../../outside"), ("object", "/etc/passwd"), ("object", "data/../../x"),
        ("file", "../evil"), ("file", "/abs/evil"), ("file", "sub/../../evil"), ("file", "a//b"),
        ("file", "./model.bin"), ("dir", "../escaped"), ("dir", "/tmp/escaped"), ("dir", "sub/.."),
    ],
)
def test_manifest_paths_outside_the_checkpoint_are_refused(tmp_path: Path, where: str, bad: str) -> None:
    store = _store(tmp_path)

    def edit(doc: dict[str, Any]) -> None:
        if where == "object":
            doc["objects"][0][0] = bad
        elif where == "file":
            doc["files"][0]["path"] = bad
        else:
            doc["dirs"][0][0] = bad

    _rewrite(store, edit)
    with pytest.raises(ManifestError, match=r"not a plain relative path|not under data/"):
        Checkpoint(str(store))


def test_hostile_object_path_cannot_read_a_file_outside_the_store(tmp_path: Path) -> None:
    """A manifest naming ``../secret`` (with the right digest, which an attacker may know for a
    well-known file) would serve a file outside the store through the reader or the mount."""
    store = _store(tmp_path)
    secret = b"root:x:0:0:root:/root:/bin/bash\n"
    (tmp_path / "secret").write_bytes(secret)

    def edit(doc: dict[str, Any]) -> None:
        doc["objects"].append(["../secret", 0, len(secret)])
        doc["files"].append({"path": "leak", "size": len(secret), "mode": 0o644, "mtime_ns": 0,
                             "chunks": [[hashlib.sha256(secret).hexdigest(), len(doc["objects"]) - 1, 0,
                                         len(secret)]]})

    _rewrite(store, edit)
    with pytest.raises(ManifestError):
        ckptfs.read_file(str(store), "leak")


def test_hostile_dir_path_cannot_make_get_write_outside_dest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    outside = tmp_path / "escaped"

    def edit(doc: dict[str, Any]) -> None:
        doc["dirs"].append([str(outside), 0o755, 0])  # absolute
        doc["dirs"].append(["../escaped-too", 0o755, 0])

    _rewrite(store, edit)
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    res = CliRunner().invoke(app, ["get", str(store), str(dest)])
    assert res.exit_code == 1
    assert "not a plain relative path" in " ".join(res.output.split())
    assert not outside.exists() and not (tmp_path / "dest" / "escaped-too").exists()


def test_get_and_mount_never_apply_setuid_bits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o6755)
    ckptfs.put(src, str(tmp_path / "store"), chunk_size=CS)
    # Even a hand-written manifest claiming every special bit gets plain permissions.
    _rewrite(tmp_path / "store", lambda doc: doc["files"][0].update(mode=0o7777))
    dest = tmp_path / "dest"
    res = CliRunner().invoke(app, ["get", str(tmp_path / "store"), str(dest)])
    assert res.exit_code == 0, res.output
    mode = stat.S_IMODE((dest / "tool").stat().st_mode)
    assert mode & 0o7000 == 0 and mode == 0o777

    from ckptfs.fusefs import CkptOperations

    with Checkpoint(str(tmp_path / "store")) as ck:
        ops = CkptOperations(ck)
        ino = next(i for i, n in ops._nodes.items() if n.path == "tool")
        assert stat.S_IMODE(ops._attr(ino).st_mode) == 0o555


@pytest.mark.parametrize("hook", ["on_plan", "on_bytes"])
def test_a_second_put_to_the_same_uri_is_refused_while_the_first_runs(tmp_path: Path, hook: str) -> None:
    """Before the lock, the second put deleted the first one's data as stale and published its manifest,
    which the first then replaced: a checkpoint its writer was told was stored silently vanished."""
    uri = str(tmp_path / "store")
    a_src, b_src = tmp_path / "a", tmp_path / "b"
    for d, fill in ((a_src, b"a"), (b_src, b"b")):
        d.mkdir()
        (d / "model.bin").write_bytes(fill * (8 * CS))
    outcome: list[BaseException | None] = []

    def other_put(*_: int) -> None:  # runs inside the first put: before (on_plan) or while uploading
        if outcome:
            return
        try:
            ckptfs.put(b_src, uri, chunk_size=CS, stripes=2)
            outcome.append(None)
        except CheckpointBusy as e:
            outcome.append(e)

    hooks: dict[str, Any] = {hook: other_put}
    ckptfs.put(a_src, uri, chunk_size=CS, stripes=2, segment_chunks=1, **hooks)
    assert outcome and isinstance(outcome[0], CheckpointBusy), outcome
    with Checkpoint(uri) as ck:
        assert ck.verify() == []
        assert bytes(ck.read_file("model.bin")) == b"a" * (8 * CS)
    assert not os.path.exists(os.path.join(uri, LOCK_DIR))  # the lock is released


def test_lock_left_by_a_dead_put_is_taken_over_but_a_live_one_is_not(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "m").write_bytes(b"z" * CS)
    uri = tmp_path / "store"
    (uri / LOCK_DIR).mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    claim = {"host": socket.gethostname(), "pid": int(dead.stdout), "expires": time.time() + 3600}
    (uri / LOCK_DIR / "000-dead").write_text(json.dumps(claim))
    ckptfs.put(src, str(uri), chunk_size=CS)  # the dead holder's claim does not block a rerun
    assert not (uri / LOCK_DIR).exists()

    other = tmp_path / "store2"
    (other / LOCK_DIR).mkdir(parents=True)
    live = {"host": "another-node", "pid": 1, "expires": time.time() + 3600}
    (other / LOCK_DIR / "000-live").write_text(json.dumps(live))
    with pytest.raises(CheckpointBusy, match="another-node"):
        ckptfs.put(src, str(other), chunk_size=CS)
    assert not (other / MANIFEST_NAME).exists()


def test_data_is_durable_before_the_manifest_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every data object (and the directories naming it) is fsynced before MANIFEST.json appears."""
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(a: Any, b: Any, *args: Any, **kw: Any) -> None:
        events.append(("publish", str(b)))
        real_link(a, b, *args, **kw)

    def replace(a: Any, b: Any, *args: Any, **kw: Any) -> None:
        events.append(("publish", str(b)))
        real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    store = _store(tmp_path)
    monkeypatch.undo()
    at = events.index(("publish", str(store / MANIFEST_NAME)))
    synced_before = {p for kind, p in events[:at] if kind == "fsync"}
    with Checkpoint(str(store)) as ck:
        objects = [str(store / o.path) for o in ck.manifest.objects]
    assert objects and all(o in synced_before for o in objects), (objects, synced_before)
    for o in objects:  # the directory entries too, up to the root
        assert os.path.dirname(o) in synced_before
    assert str(store) in synced_before
    assert ("fsync", str(store)) in events[at:]  # the manifest's own directory entry
