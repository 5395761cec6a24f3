"""Disk a lazy layer leaves behind that ``cache_cap_bytes`` never sees (issue 23, item 4): the budget counts
and evicts the caches its layer states name, so a cache without a state is on disk for ever.  With the
data-path daemon (``python -m snapshotter.lazy.serve``: FUSE → loop → erofs) and a docker-registry."""

from __future__ import annotations

import os
import random
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootseer.control import ControlError
from snapshotter.lazy.testing import LazyDaemon, Registry, build_erofs, cleanup_root, push_blob, spec_for

REPO = "bootseer/lazygc"
CHUNK = 256 << 10


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("reg") / "registry").start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path("/tmp") / f"bs-lgc-{secrets.token_hex(3)}"  # short: the control socket's path is limited
    yield path
    cleanup_root(path)
    shutil.rmtree(path, ignore_errors=True)


def _blob(tmp_path: Path) -> bytes:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.bin").write_bytes(random.Random(7).randbytes(2 << 20))
    return build_erofs(src, tmp_path / "img.erofs").read_bytes()


def test_a_cache_whose_state_went_first_is_deleted_at_start(registry: Registry, root: Path, tmp_path: Path) -> None:
    """Eviction deletes a layer's state, then its cache: a daemon killed in between leaves a cache that no
    state names — never counted, never evicted.  The next start deletes it, and nothing else."""
    data = _blob(tmp_path)
    spec = spec_for(registry.url, REPO, data, CHUNK)
    push_blob(registry.url, REPO, data)
    d = LazyDaemon(root).start()
    try:
        mp = Path(d.call("acquire", spec=spec.to_json(), owner="ns/gone")["mountpoint"])
        assert (mp / "d" / "f.bin").read_bytes()[:4]  # some of it is local now
        d.call("release", owner="ns/gone")
        [layer] = d.call("status")["layers"]
        assert layer["bytes_local"] > 0 and not layer["mounted"], layer
        d.kill()
        # what a kill between the two steps of an eviction leaves
        (root / "layers" / f"{spec.name}.json").unlink()
        (root / "cache" / "unrelated-file").write_text("not a cache directory either")
        d.start()
        assert d.call("status")["layers"] == []
        assert sorted(os.listdir(root / "cache")) == [], os.listdir(root / "cache")
    finally:
        d.stop(teardown=True)


def test_a_layer_that_cannot_be_set_up_leaves_no_cache(registry: Registry, root: Path) -> None:
    """A blob whose chunks verify but which is no erofs image: its chunks are fetched and cached, then the
    mount fails and the Prepare takes the ordinary path.  What was fetched must go with it — there is no state
    to count or evict it by."""
    data = random.Random(3).randbytes(1 << 20)
    spec = spec_for(registry.url, REPO, data, CHUNK)
    push_blob(registry.url, REPO, data)
    d = LazyDaemon(root).start()
    try:
        with pytest.raises(ControlError):
            d.call("acquire", spec=spec.to_json(), owner="ns/broken")
        assert d.call("status")["layers"] == []
        assert not (root / "cache" / spec.name).exists(), os.listdir(root / "cache" / spec.name)
    finally:
        d.stop(teardown=True)
