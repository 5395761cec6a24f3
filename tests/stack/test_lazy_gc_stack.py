"""Lazy-layer garbage collection (issue 23, item 4) with containerd's own collector, on the local stack.

* ``ctr images rm --sync`` — containerd's garbage collection, which removes the image's snapshots from this
  snapshotter and then calls its Cleanup — leaves nothing of the image's lazy layers mounted or held, and the
  chunk caches of unused layers within ``cache_cap_bytes`` (the least recently used go first), while the
  layers of images still there stay mounted and their containers start;
* an image removed while the daemon was down (containerd's collection cannot reach it then, and does not try
  again) is collected at the daemon's next start: its layer released and its snapshot gone."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootseer.control import Control
from bootseer.registry import RegistryClient
from integration import images
from integration.stack import Stack, StackConfig, running, wait_for
from registry_sidecar.convert import convert_image
from tests.conftest import scratch_root

MIB = 1 << 20
# four tiny images' layers (a blob of 1-1.3 MiB each, fully cached once filled) are over the cap, three are not
CAP = 4 * MIB


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = scratch_root("lgc").resolve()
    cfg = StackConfig(root=root, cri_snapshotter="bootseer", sidecar=False,
                      # only containerd's Cleanup and set-ups enforce the cap here: housekeeping would in a second
                      lazy_config={"cache_cap_bytes": CAP, "housekeeping_interval": 3600.0},
                      snapshotter_config={"containerd_address": str(root / "containerd.sock")})
    with running(cfg) as st:
        yield st


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _pull(st: Stack, ns: str, ref: str) -> list[dict[str, Any]]:
    res = _cli("pull", "--json", "-a", st.info.containerd_socket, "-n", ns, "--control",
               str(st.info.snapshotter_control), ref)
    assert res.returncode == 0, res.stderr
    layers: list[dict[str, Any]] = json.loads(res.stdout)["layers"]
    assert {lo["mode"] for lo in layers} == {"lazy"}, layers
    return layers


def _layers(st: Stack) -> list[dict[str, Any]]:
    res = _cli("status", "--json", "--control", str(st.info.snapshotter_control))
    assert res.returncode == 0, res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)["layers"]
    return rows


def _of(rows: list[dict[str, Any]], repo: str) -> list[dict[str, Any]]:
    return [r for r in rows if (r["repository"] or "").endswith("/" + repo)]


def _images(st: Stack, repos: list[str]) -> dict[str, str]:
    client = RegistryClient(plain_http=True)
    refs = {repo: images.push_tiny(st.info.registry, repo) for repo in repos}
    for ref in refs.values():
        convert_image(client, ref, signer=st.index_signer())
    return refs


def _run(st: Stack, ns: str, ref: str) -> subprocess.CompletedProcess[str]:
    return st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3), *images.TINY_CMD,
                  namespace=ns, check=False)


def _remove_all(st: Stack, ns: str) -> None:
    for item in st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
        st.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
    st.ctr("namespaces", "rm", ns, check=False)


def _records(st: Stack) -> set[str]:
    db = sqlite3.connect(Path(st.info.snapshotter_root or "") / "metadata.db")
    try:
        return {k for (k,) in db.execute("SELECT key FROM snapshots")}
    finally:
        db.close()


def test_containerd_gc_releases_removed_images_layers_and_keeps_the_cache_within_its_cap(stack: Stack) -> None:
    tag = secrets.token_hex(3)
    repos = [f"lgc/{n}-{tag}" for n in ("kept", "first", "second", "third")]
    kept, first, second, third = repos
    refs = _images(stack, repos)
    ns = "bs-lgc-" + tag
    ctl = Control(str(stack.info.snapshotter_control), timeout=180)
    try:
        for repo in repos:
            _pull(stack, ns, refs[repo])
        for row in _layers(stack):  # fully cached: the caches' sizes no longer move
            if any(row["repository"].endswith("/" + r) for r in repos):
                assert ctl.call("wait_swapped", digest=row["detail"]["key"], timeout=120)["swapped"], row
        rows = _layers(stack)
        size = {r: _of(rows, r)[0]["bytes_local"] for r in repos}
        assert all(MIB < s <= MIB * 4 // 3 for s in size.values()), size  # (what CAP is made for)
        mounts = {r: _of(rows, r)[0]["detail"]["mountpoint"] for r in repos}

        # one image at a time, oldest first, as a node's image GC removes them
        for repo in (first, second):
            stack.ctr("images", "rm", "--sync", refs[repo], namespace=ns)
        rows = _layers(stack)
        # the first one's layer was released and, the caches being over the cap with it, its cache deleted:
        # nothing of it is left on the node
        assert _of(rows, first) == [], _of(rows, first)
        assert not os.path.ismount(mounts[first])
        # the second one's was released too, but its cache fits the cap: kept, so a pull again is local at once
        [cached] = _of(rows, second)
        assert (cached["owners"], cached["mounted"], cached["bytes_local"]) == ([], False, size[second]), cached
        assert not os.path.ismount(mounts[second])
        assert sum(r["bytes_local"] for r in rows) <= CAP, rows
        # the layers of the images still there are untouched, and their containers start
        for repo in (kept, third):
            [row] = _of(rows, repo)
            assert row["mounted"] and row["owners"], row
        assert (_run(stack, ns, refs[kept]).stdout, _run(stack, ns, refs[third]).stdout) == ("kept\n", "kept\n")
    finally:
        _remove_all(stack, ns)


def test_an_image_removed_while_the_daemon_was_down_is_collected_at_its_start(stack: Stack) -> None:
    tag = secrets.token_hex(3)
    kept, gone = f"lgc/down-kept-{tag}", f"lgc/down-gone-{tag}"
    refs = _images(stack, [kept, gone])
    ns = "bs-lgcd-" + tag
    try:
        [gone_chain] = [lo["chain_id"] for lo in _pull(stack, ns, refs[gone])]
        _pull(stack, ns, refs[kept])
        [before] = _of(_layers(stack), gone)
        assert before["mounted"] and before["owners"], before

        ctl = Control(str(stack.info.snapshotter_control), timeout=30)
        os.kill(int(ctl.call("ping")["pid"]), signal.SIGKILL)
        # containerd drops the image and its snapshot from its metadata; its collection of this snapshotter
        # fails (connection refused) and is not tried again
        stack.ctr("images", "rm", "--sync", refs[gone], namespace=ns)
        assert gone_chain in _records(stack)

        stack.restart_snapshotter(probe=False)  # (a probe would have containerd collect it soon after)
        wait_for("the snapshotter's start-up reconciliation with containerd",
                 lambda: Control(str(stack.info.snapshotter_control), timeout=30).call("ping").get("reconcile")
                 == "done", 120)
        [after] = _of(_layers(stack), gone)
        assert (after["owners"], after["mounted"]) == ([], False), after
        assert not os.path.ismount(before["detail"]["mountpoint"])
        assert gone_chain not in _records(stack)
        [still] = _of(_layers(stack), kept)
        assert still["mounted"] and still["owners"], still
        assert _run(stack, ns, refs[kept]).stdout == "kept\n"
    finally:
        _remove_all(stack, ns)


def test_a_containerd_plugin_served_by_another_daemon_is_named_and_left_clean(stack: Stack, tmp_path: Path) -> None:
    """A daemon whose ``containerd_snapshotter`` names another daemon's plugin finds out from its probe (it
    never arrives) and says so instead of reporting a collection that did not happen; the probe is gone
    from containerd and from the daemon it went to, and so is the probe's namespace."""
    from snapshotter.overlay import Snapshotter
    from snapshotter.reconcile import NAMESPACE, NotThisDaemon, Reconciler

    core = Snapshotter(tmp_path / "another")
    try:
        with pytest.raises(NotThisDaemon, match="'bootseer' is not this daemon"):
            Reconciler(core, stack.info.containerd_socket, "bootseer").run_once()
    finally:
        core.close()
    assert not [k for k in _records(stack) if k.startswith(NAMESPACE + "/")]
    assert NAMESPACE not in stack.ctr("namespaces", "ls", "-q").stdout.split()
