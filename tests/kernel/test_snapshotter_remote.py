"""The remote snapshot hook of the snapshotter core, driven with a fake handler and mounted with real kernel mounts."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, NotFound
from snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED, Record
from snapshotter.overlay import Mount, Snapshotter
from snapshotter.remote import LABEL_REMOTE, LABEL_SNAPSHOT_REF, RemoteLayer, RemoteRequest

# ------------------------------------------------------------------------------------------------- config


class FakeRemote:
    """Serves layers from prepared directories (standing in for lazily mounted EROFS layers)."""

    def __init__(self, layers: dict[str, Path]) -> None:
        self.layers = layers
        self.requests: list[RemoteRequest] = []
        self.released: list[Path] = []
        self.restored: list[list[Record]] = []
        self.collected: list[list[Record]] = []
        self.fail = False

    def prepare(self, req: RemoteRequest) -> RemoteLayer | None:
        self.requests.append(req)
        if self.fail:
            raise RuntimeError("registry unreachable")
        lower = self.layers.get(req.target)
        return None if lower is None else RemoteLayer(lower, size=123, inodes=4, labels={"extra": "1"})

    def discard(self, req: RemoteRequest, layer: RemoteLayer) -> None:
        self.released.append(layer.lower)

    def release(self, record: Record) -> None:
        self.released.append(Path(record.lower))

    def restore(self, records: list[Record]) -> None:
        self.restored.append(records)

    def collect(self, records: list[Record]) -> list[str]:
        self.collected.append(records)
        return []


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    out = {}
    spec = {"sha256:L1": {"a": "from L1", "both": "L1"}, "sha256:L2": {"b": "from L2", "both": "L2"}}
    for name, files in spec.items():
        d = tmp_path / "remote" / name.replace(":", "_")
        d.mkdir(parents=True)
        for f, content in files.items():
            (d / f).write_text(content)
        out[name] = d
    return out


@pytest.fixture
def core(tmp_path: Path, layers: dict[str, Path]) -> Iterator[tuple[Snapshotter, FakeRemote]]:
    remote = FakeRemote(layers)
    sn = Snapshotter(tmp_path / "root", remote)
    yield sn, remote
    sn.close()


def _mount(m: Mount, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "none" if m.type == "bind" else m.type, "-o", ",".join(m.options), m.source,
                    str(target)], check=True, capture_output=True)


def _ref(chain: str, **more: str) -> dict[str, str]:
    return {LABEL_SNAPSHOT_REF: chain, "containerd.io/snapshot/cri.layer-digest": "sha256:x", **more}


def test_remote_prepare_commits_the_target_and_answers_already_exists(core: tuple[Snapshotter, FakeRemote],
                                                                      layers: dict[str, Path], tmp_path: Path) -> None:
    sn, remote = core
    with pytest.raises(AlreadyExists):
        sn.prepare("", "extract-1 sha256:L1", "", _ref("sha256:L1"))
    with pytest.raises(AlreadyExists):
        sn.prepare("", "extract-2 sha256:L2", "sha256:L1", _ref("sha256:L2"))
    assert [r.target for r in remote.requests] == ["sha256:L1", "sha256:L2"]
    assert remote.requests[1].parent_lowers == (layers["sha256:L1"],)
    l2 = sn.stat("", "sha256:L2")
    assert (l2.kind, l2.parent, l2.lower) == (KIND_COMMITTED, "sha256:L1", str(layers["sha256:L2"]))
    assert l2.labels[LABEL_REMOTE] == "bootseer" and l2.labels["extra"] == "1"
    assert sn.usage("", "sha256:L2") == (123, 4)
    # the follow-up lookup containerd's metadata layer makes
    found = sn.walk(None, [f'labels."{LABEL_SNAPSHOT_REF}"==sha256:L2,parent=="sha256:L1"'])
    assert [r.key for r in found] == ["sha256:L2"]
    # no active snapshot was left behind for the keys containerd asked for
    assert {r.key for r in sn.walk(None, [])} == {"sha256:L1", "sha256:L2"}
    # asking again: already there, the handler is not consulted
    with pytest.raises(AlreadyExists):
        sn.prepare("", "extract-3 sha256:L2", "sha256:L1", _ref("sha256:L2"))
    assert len(remote.requests) == 2

    # a container on top: the remote layers are the lowerdirs, nearest first
    [m] = sn.prepare("", "container", "sha256:L2", {})
    assert f"lowerdir={layers['sha256:L2']}:{layers['sha256:L1']}" in m.options
    target = tmp_path / "mnt"
    _mount(m, target)
    try:
        assert (target / "a").read_text() == "from L1" and (target / "b").read_text() == "from L2"
        assert (target / "both").read_text() == "L2"
        (target / "new").write_text("upper")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (layers["sha256:L2"] / "new").exists() is False  # writes go to the container's upper dir
    [v] = sn.view("", "v", "sha256:L1", {})  # a view of one remote layer: a ro bind of its mount
    assert (v.type, v.source, v.options) == ("bind", str(layers["sha256:L1"]), ("ro", "rbind"))

    sn.remove("", "v")
    sn.remove("", "container")
    sn.remove("", "sha256:L2")
    assert remote.released == [layers["sha256:L2"]]
    assert (layers["sha256:L2"] / "b").exists()  # removing a remote snapshot never deletes through its mount


def test_remote_failures_fall_back_to_the_ordinary_path(core: tuple[Snapshotter, FakeRemote]) -> None:
    sn, remote = core
    [m] = sn.prepare("", "extract-unknown", "", _ref("sha256:NOT-REMOTE"))  # handler says None
    assert m.type == "bind" and sn.stat("", "extract-unknown").kind == KIND_ACTIVE
    remote.fail = True
    [m] = sn.prepare("", "extract-broken", "", _ref("sha256:L1"))  # handler raises
    assert m.type == "bind"
    remote.fail = False
    sn.commit("", "sha256:L1", "extract-broken", {})
    # the name now belongs to an ordinary snapshot, which containerd's follow-up List (by the ref label) would
    # not find: no "already exists" shortcut, no handler call, the ordinary path
    [m] = sn.prepare("", "extract-again", "", _ref("sha256:L1"))
    assert m.type == "bind" and sn.stat("", "sha256:L1").lower is None
    with pytest.raises(NotFound):  # unknown parent: the ordinary error, the handler never asked
        sn.prepare("", "x", "missing-parent", _ref("sha256:L2"))
    assert [r.target for r in remote.requests] == ["sha256:NOT-REMOTE", "sha256:L1"]


def test_restart_hands_remote_snapshots_back_to_the_handler(tmp_path: Path, layers: dict[str, Path]) -> None:
    remote = FakeRemote(layers)
    sn = Snapshotter(tmp_path / "root", remote)
    with pytest.raises(AlreadyExists):
        sn.prepare("", "extract", "", _ref("sha256:L1"))
    sn.prepare("", "ordinary", "", {})
    sn.close()
    remote2 = FakeRemote(layers)
    sn2 = Snapshotter(tmp_path / "root", remote2)
    try:
        assert sn2.recover() == []
        [[rec]] = remote2.restored
        assert (rec.key, rec.lower) == ("sha256:L1", str(layers["sha256:L1"]))
    finally:
        sn2.close()
    shutil.rmtree(tmp_path / "root")


def test_cleanup_hands_the_remote_snapshots_to_the_handler(tmp_path: Path, layers: dict[str, Path]) -> None:
    """containerd's Cleanup reaches the remote handler with the remote snapshots the metadata holds now, so
    it can release lazy layers no snapshot uses (and the daemon's start does not: restore does that)."""
    remote = FakeRemote(layers)
    sn = Snapshotter(tmp_path / "root", remote)
    try:
        with pytest.raises(AlreadyExists):
            sn.prepare("", "extract", "", _ref("sha256:L1"))
        sn.prepare("", "ordinary", "", {})
        assert sn.recover() == [] and remote.collected == []
        sn.cleanup()
        [[rec]] = remote.collected
        assert (rec.key, rec.lower) == ("sha256:L1", str(layers["sha256:L1"]))
    finally:
        sn.close()
    shutil.rmtree(tmp_path / "root")
