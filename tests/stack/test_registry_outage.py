"""A registry outage on a node (issue 23, item 5), on the local stack: two images pulled lazily through a front
(:class:`~integration.faultproxy.FaultProxy`) that then goes away (connection refused).

* the image whose layers are complete locally keeps starting containers;
* ``bootseer status`` says which layers still need the registry (the other image's: background fill was
  paused, so only what its first run read is local) and, once a read failed, that the registry is down;
* a read of a part that is not local fails with EIO instead of hanging, and the daemon stays up;
* a new pull from the registry fails at once with a clear error."""

from __future__ import annotations

import json
import os
import secrets
import shutil
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
from bootseer.testkit import drop_caches
from integration import images
from integration.faultproxy import FaultProxy
from integration.stack import Stack, StackConfig, running
from registry_sidecar.convert import convert_image
from tests.conftest import scratch_root

BIG = ["/bin/sh", "-c", "cat /data/keep.txt; sha256sum /data/big.bin"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(StackConfig(root=scratch_root("out"), cri_snapshotter="bootseer", sidecar=False)) as st:
        yield st


def _cli(st: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _pull(st: Stack, ns: str, ref: str) -> subprocess.CompletedProcess[str]:
    return _cli(st, "pull", "--json", "-a", st.info.containerd_socket, "-n", ns, "--control",
                str(st.info.snapshotter_control), ref)


def test_an_outage_leaves_complete_layers_working_and_says_which_need_the_registry(stack: Stack) -> None:
    reg = stack.info.registry
    client = RegistryClient(plain_http=True)
    complete_ref = images.push_tiny(reg, "outage/complete")
    partial_ref = images.push_small(reg, repo="outage/partial")  # 32 MiB /data/big.bin: not read by its first run
    for ref in (complete_ref, partial_ref):
        convert_image(client, ref, signer=stack.index_signer())
    ctl = Control(str(stack.info.snapshotter_control), timeout=120)
    ns = "bs-out-" + secrets.token_hex(3)
    proxy = FaultProxy(reg).start()
    try:
        via = {ref: ref.replace(reg, proxy.address, 1) for ref in (complete_ref, partial_ref)}
        pulled = _pull(stack, ns, via[complete_ref])
        assert pulled.returncode == 0, pulled.stderr
        blobs = [lo for lo in json.loads(pulled.stdout)["layers"]]
        assert {lo["mode"] for lo in blobs} == {"lazy"}
        status = {r["digest"]: r for r in json.loads(_cli(stack, "status", "--json", "--control",
                                                          str(stack.info.snapshotter_control)).stdout)["layers"]}
        for digest in [d for d, r in status.items() if r["repository"].endswith("outage/complete")]:
            assert ctl.call("wait_swapped", digest=digest, timeout=120), digest  # background fill completed it
        ctl.call("set_fill", enabled=False)  # the other image keeps only what its run reads
        try:
            assert _pull(stack, ns, via[partial_ref]).returncode == 0
            run = stack.ctr("run", "--rm", "--snapshotter", "bootseer", via[partial_ref], "t-" + secrets.token_hex(3),
                            "/bin/sh", "-c", "cat /data/keep.txt", namespace=ns)
            assert run.stdout == "kept\n"

            proxy.stop()  # the outage: connection refused from now on

            again = stack.ctr("run", "--rm", "--snapshotter", "bootseer", via[complete_ref],
                              "t-" + secrets.token_hex(3), *images.TINY_CMD, namespace=ns)
            assert again.stdout == "kept\n"  # complete locally: starts as if nothing happened
            rows = json.loads(_cli(stack, "status", "--json", "--control", str(stack.info.snapshotter_control)).stdout)
            by_repo: dict[bool, set[bool]] = {}
            for r in rows["layers"]:
                if "outage/" in (r["repository"] or ""):
                    by_repo.setdefault(r["repository"].endswith("outage/complete"), set()).add(r["needs_registry"])
            assert by_repo[True] == {False}  # the complete image needs no registry
            assert True in by_repo[False]  # the partial one does (its big file was never read)

            broken = stack.ctr("run", "--rm", "--snapshotter", "bootseer", via[partial_ref],
                               "t-" + secrets.token_hex(3), *BIG, namespace=ns, check=False)
            assert broken.returncode != 0 and "kept" in broken.stdout  # what is local reads; the rest is EIO
            assert "Input/output error" in broken.stderr, broken.stderr
            rows = json.loads(_cli(stack, "status", "--json", "--control", str(stack.info.snapshotter_control)).stdout)
            down = [r for r in rows["layers"] if r["needs_registry"] and "outage/partial" in (r["repository"] or "")]
            assert any(r["registry_down"] for r in down), down  # the failed reads marked it down
            assert ctl.call("ping") is not None  # the daemon is up

            new = _pull(stack, ns + "-new", via[partial_ref].replace(":v1", ":v2"))
            assert new.returncode != 0 and "connection refused" in new.stderr, new.stderr
        finally:
            ctl.call("set_fill", enabled=True)
    finally:
        proxy.stop()
        for n in (ns, ns + "-new"):
            for item in stack.ctr("images", "ls", "-q", namespace=n, check=False).stdout.split():
                stack.ctr("images", "rm", "--sync", item, namespace=n, check=False)
            stack.ctr("namespaces", "rm", n, check=False)


def _kill_snapshotter(stack: Stack) -> None:
    ctl = Control(str(stack.info.snapshotter_control), timeout=30)
    os.kill(int(ctl.call("ping")["pid"]), signal.SIGKILL)


def _layers_of(stack: Stack, repo: str) -> list[dict[str, Any]]:
    rows = json.loads(_cli(stack, "status", "--json", "--control", str(stack.info.snapshotter_control)).stdout)
    return [r for r in rows["layers"] if (r["repository"] or "").endswith(repo)]


def test_a_snapshot_removed_while_the_daemon_was_down_releases_its_layer(stack: Stack) -> None:
    """The daemon's metadata lost the snapshot while it was down (containerd cannot reach a dead proxy, but a
    node's state can be repaired or restored by hand): at start the lazy layer nobody uses any more is
    released — unmounted, no owner — instead of staying mounted for ever."""
    ref = images.push_tiny(stack.info.registry, "reconcile/removed")
    convert_image(RegistryClient(plain_http=True), ref, signer=stack.index_signer())
    ns = "bs-rc-" + secrets.token_hex(3)
    try:
        pulled = _pull(stack, ns, ref)
        assert pulled.returncode == 0, pulled.stderr
        [chain] = [lo["chain_id"] for lo in json.loads(pulled.stdout)["layers"]]
        [before] = _layers_of(stack, "reconcile/removed")
        assert before["mounted"] and before["owners"]
        _kill_snapshotter(stack)
        db = sqlite3.connect(Path(stack.info.snapshotter_root or "") / "metadata.db")
        with db:
            assert db.execute("DELETE FROM snapshots WHERE key = ?", (chain,)).rowcount == 1
        db.close()
        stack.restart_snapshotter()
        [after] = _layers_of(stack, "reconcile/removed")
        assert not after["mounted"] and after["owners"] == [], after
    finally:
        for item in stack.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
            stack.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
        stack.ctr("namespaces", "rm", ns, check=False)


def test_a_lazy_layer_whose_cache_is_gone_is_served_again_from_the_registry(stack: Stack) -> None:
    """The chunk cache of a mounted lazy layer disappeared while the daemon was down (a wiped disk, an
    operator's rm): at start the layer is set up again and its reads go to the registry — the container still
    starts — instead of failing until the image is pulled again."""
    ref = images.push_tiny(stack.info.registry, "reconcile/cache-gone")
    convert_image(RegistryClient(plain_http=True), ref, signer=stack.index_signer())
    ctl = Control(str(stack.info.snapshotter_control), timeout=120)
    ctl.call("set_fill", enabled=False)  # stays on FUSE: its reads come from the cache or the registry
    ns = "bs-rc-" + secrets.token_hex(3)
    try:
        assert _pull(stack, ns, ref).returncode == 0
        run = stack.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3),
                        *images.TINY_CMD, namespace=ns)
        assert run.stdout == "kept\n"
        [layer] = _layers_of(stack, "reconcile/cache-gone")
        assert layer["mounted"] and not layer["swapped"]
        name = Path(layer["detail"]["mountpoint"]).name
        _kill_snapshotter(stack)
        shutil.rmtree(Path(stack.info.snapshotter_root or "") / "lazy" / "cache" / name)
        drop_caches()  # no page-cache copy of the layer left either
        stack.restart_snapshotter()
        again = stack.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3),
                          *images.TINY_CMD, namespace=ns, check=False)
        assert (again.returncode, again.stdout) == (0, "kept\n"), again.stderr
    finally:
        Control(str(stack.info.snapshotter_control), timeout=120).call("set_fill", enabled=True)
        for item in stack.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
            stack.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
        stack.ctr("namespaces", "rm", ns, check=False)


def test_cleanup_releases_lazy_layers_no_snapshot_uses(tmp_path: Path) -> None:
    """containerd's Cleanup (it calls it after its garbage collection) releases a lazy layer held by an owner
    with no snapshot — here a hold left by a Prepare whose snapshot was never recorded — while the layers of
    recorded snapshots stay mounted, and brings the unused caches under their budget.  Before, only a daemon
    restart did either."""
    from bootseer.index import find_index
    from snapshotter.lazy.spec import BlobSpec, wire_fields
    from tests.snapshotter_fixtures import Client

    cfg = StackConfig(root=scratch_root("gc"), cri_snapshotter="bootseer", sidecar=False,
                      lazy_config={"collect_grace": 0.0, "cache_cap_bytes": 0, "housekeeping_interval": 3600.0})
    with running(cfg) as st:
        client = RegistryClient(plain_http=True)
        kept, leaked = (images.push_tiny(st.info.registry, f"gc/{n}") for n in ("kept", "leaked"))
        for ref in (kept, leaked):
            convert_image(client, ref, signer=st.index_signer())
        ns = "bs-gc-" + secrets.token_hex(3)
        assert _pull(st, ns, kept).returncode == 0  # a recorded snapshot holds this one
        man, _ = client.resolve_image(leaked)
        found = find_index(client, leaked, man.digest)
        assert found is not None
        blob = next(iter(found[1].layers.values()))
        spec = BlobSpec(registry=f"http://{st.info.registry}", repository="gc/leaked", digest=blob.blob.digest,
                        size=blob.blob.size, chunk_size=blob.chunk_size, chunks=tuple(blob.chunks),
                        **wire_fields(blob))
        ctl = Control(str(st.info.snapshotter_control), timeout=120)
        ctl.call("acquire", spec=spec.to_json(), owner=f"{ns}/sha256:never-recorded")  # the abandoned hold
        [leaked_before], [kept_before] = _layers_of(st, "gc/leaked"), _layers_of(st, "gc/kept")
        assert leaked_before["mounted"] and kept_before["mounted"]

        grpc_client = Client(Path(st.info.snapshotter_socket or ""), None)
        try:
            grpc_client.cleanup()
        finally:
            grpc_client.close()
        # released, unmounted, and its cache evicted (the budget is 0 and nothing uses it; housekeeping would
        # take an hour here): the node has nothing of it left
        assert _layers_of(st, "gc/leaked") == []
        assert not os.path.ismount(leaked_before["detail"]["mountpoint"])
        [kept_after] = _layers_of(st, "gc/kept")
        assert kept_after["mounted"] and kept_after["owners"], kept_after
        assert stack_ctr_rm(st, ns)


def stack_ctr_rm(st: Stack, ns: str) -> bool:
    for item in st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
        st.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
    return st.ctr("namespaces", "rm", ns, check=False).returncode == 0
